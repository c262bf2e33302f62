//! Raw gRPC calls: any bytes as the request frame, any metadata, and the
//! answer's status as the server sent it (trailers-only or in trailers), for
//! tests that call every RPC from the descriptors or send what no generated
//! client would.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tonic::{Status, transport::Channel};
use tower::ServiceExt;

/// A gRPC frame (uncompressed) holding `message`.
pub fn frame(message: &[u8]) -> Vec<u8> {
    let mut frame = vec![0];
    frame.extend_from_slice(&u32::try_from(message.len()).expect("small").to_be_bytes());
    frame.extend_from_slice(message);
    frame
}

/// Sends `body` (the whole HTTP/2 request body, frames included) to `path`
/// with `metadata`; returns the answer's status (code `Ok` on success).
pub async fn call(
    channel: &Channel,
    path: &str,
    metadata: &[(&str, String)],
    body: Vec<u8>,
) -> Status {
    let mut request = http::Request::builder()
        .method(http::Method::POST)
        .uri(path)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "10S");
    for (name, value) in metadata {
        request = request.header(*name, value);
    }
    let request = request
        .body(tonic::body::Body::new(Full::new(Bytes::from(body))))
        .expect("request");
    let response = channel.clone().oneshot(request).await.expect("answered");
    if let Some(status) = Status::from_header_map(response.headers()) {
        return status;
    }
    let collected = response.into_body().collect().await.expect("body");
    collected
        .trailers()
        .and_then(Status::from_header_map)
        .expect("a grpc-status")
}

/// The metadata of a call through the gateway with `token`.
pub fn bearer(token: &str) -> Vec<(&'static str, String)> {
    vec![("authorization", format!("Bearer {token}"))]
}

/// The metadata of a call straight to a service, as `principal`.
pub fn asserted(
    path: &str,
    principal: &usher_kit::principal::Principal,
) -> Vec<(&'static str, String)> {
    use usher_kit::principal::{ASSERTION_HEADER, AssertionConfig};
    #[allow(clippy::disallowed_methods)]
    let now = chrono::Utc::now();
    let token = AssertionConfig::default()
        .signer("usher-gateway")
        .expect("development signer")
        .sign(principal, path, None, now);
    vec![(ASSERTION_HEADER, token)]
}
