//! Limits (P22): a request of exactly `server.max_message_bytes` is decoded,
//! one byte more is refused before any handler runs (tonic answers
//! OUT_OF_RANGE, "decoded message length too large").

use prost::Message;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use usher_proto::identity::v1::{GetUserRequest, user_service_client::UserServiceClient};

use crate::harness::{Isolation, POSTGRES, Service, admin_request, service_env};

const LIMIT: usize = 4096;

fn request_of_size(size: usize) -> GetUserRequest {
    let mut request = GetUserRequest {
        user_id: String::new(),
    };
    while request.encoded_len() < size {
        request.user_id.push('a');
    }
    assert_eq!(request.encoded_len(), size, "exact size reachable");
    request
}

#[tokio::test]
async fn message_size_limit_is_exact_to_the_byte() {
    let mut isolation = Isolation::new();
    let mut env = service_env(&mut isolation, "identity", POSTGRES);
    env.push(("USHER_SERVER__MAX_MESSAGE_BYTES", LIMIT.to_string()));
    let identity = Service::start("usher-identity", &env);
    identity
        .wait_for(
            "",
            ServingStatus::Serving,
            std::time::Duration::from_secs(60),
        )
        .await;
    let mut client = UserServiceClient::new(identity.channel());
    let path = "/usher.identity.v1.UserService/GetUser";

    let at_limit = client
        .get_user(admin_request(path, request_of_size(LIMIT)))
        .await;
    let code = at_limit.map(|_| Code::Ok).unwrap_or_else(|s| s.code());
    assert_ne!(
        code,
        Code::ResourceExhausted,
        "a message of exactly the limit is accepted"
    );

    let over = client
        .get_user(admin_request(path, request_of_size(LIMIT + 1)))
        .await;
    let refused = over.expect_err("refused");
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    assert!(refused.message().contains("too large"), "{refused:?}");
}
