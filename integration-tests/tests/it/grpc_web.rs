//! Browsers through the gateway: gRPC-Web over HTTP/1.1 reaches the same
//! services under the same rules, and cross-origin calls are allowed only
//! from the configured origins.

use prost::Message;
use usher_proto::identity::v1::{
    GetCurrentUserRequest, GetCurrentUserResponse, SignInRequest, SignInResponse,
    sign_in_request::Login,
};

use crate::harness::{
    Isolation, OWNER_PASSWORD, Service, create_account, header, http, identity_and_gateway,
};

const APP: &str = "https://app.example.com";

/// A gRPC-Web request body: one uncompressed message frame.
fn frame(message: &impl Message) -> Vec<u8> {
    let payload = message.encode_to_vec();
    let mut framed = vec![0];
    framed.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    framed.extend_from_slice(&payload);
    framed
}

/// The message frame and the trailers of a gRPC-Web response body.
fn unframe(mut body: &[u8]) -> (Option<Vec<u8>>, String) {
    let (mut message, mut trailers) = (None, String::new());
    while body.len() >= 5 {
        let flag = body[0];
        let len = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
        let data = &body[5..5 + len];
        if flag & 0x80 == 0 {
            message = Some(data.to_vec());
        } else {
            trailers = String::from_utf8_lossy(data).to_lowercase();
        }
        body = &body[5 + len..];
    }
    (message, trailers)
}

/// A gRPC-Web call over HTTP/1.1.
async fn call(
    gateway: &Service,
    path: &str,
    token: Option<&str>,
    message: &impl Message,
) -> (u16, Vec<(String, String)>, Option<Vec<u8>>, String) {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![
        ("content-type", "application/grpc-web+proto"),
        ("x-grpc-web", "1"),
        ("origin", APP),
    ];
    if let Some(bearer) = &bearer {
        headers.push(("authorization", bearer));
    }
    let (status, headers, body) = http(gateway, "POST", path, &headers, &frame(message)).await;
    let (message, mut trailers) = unframe(&body);
    // A refusal is "trailers-only": its status comes in the headers.
    let in_headers = header(&headers, "grpc-status");
    if !in_headers.is_empty() {
        trailers.push_str(&format!("grpc-status:{in_headers}\r\n"));
    }
    (status, headers, message, trailers)
}

#[tokio::test]
async fn browsers_call_through_grpc_web_under_the_same_rules() {
    let mut isolation = Isolation::new();
    let (identity, _, gateway) = identity_and_gateway(
        &mut isolation,
        &[],
        &[("USHER_GRPC_WEB__ALLOWED_ORIGINS", format!("[\"{APP}\"]"))],
    )
    .await;
    let slug = format!("web-{}", isolation.id);
    create_account(
        &identity,
        &slug,
        "Web Co",
        "owner@web.example",
        "Wendy Web",
        5,
    )
    .await;

    // The browser's preflight from an allowed origin, and from another.
    let preflight = |origin: &'static str| {
        let gateway = &gateway;
        async move {
            http(
                gateway,
                "OPTIONS",
                "/usher.identity.v1.AuthService/SignIn",
                &[
                    ("origin", origin),
                    ("access-control-request-method", "POST"),
                    (
                        "access-control-request-headers",
                        "content-type,x-grpc-web,authorization",
                    ),
                ],
                b"",
            )
            .await
        }
    };
    let (status, headers, _) = preflight(APP).await;
    assert!(status < 300, "{status} {headers:?}");
    assert_eq!(header(&headers, "access-control-allow-origin"), APP);
    assert!(header(&headers, "access-control-allow-headers").contains("authorization"));
    let (_, headers, _) = preflight("https://evil.example").await;
    assert_eq!(header(&headers, "access-control-allow-origin"), "");

    // Sign in over gRPC-Web, then a member call with the bearer token.
    let sign_in = SignInRequest {
        account_slug: slug,
        login: Some(Login::Email("owner@web.example".into())),
        password: OWNER_PASSWORD.into(),
    };
    let (status, headers, message, trailers) = call(
        &gateway,
        "/usher.identity.v1.AuthService/SignIn",
        None,
        &sign_in,
    )
    .await;
    assert_eq!(status, 200);
    assert!(header(&headers, "content-type").starts_with("application/grpc-web"));
    assert_eq!(header(&headers, "access-control-allow-origin"), APP);
    assert!(trailers.contains("grpc-status:0"), "{trailers}");
    let signed_in = SignInResponse::decode(message.expect("a response").as_slice()).unwrap();
    let token = signed_in.session.expect("session").access_token;
    let (_, _, message, trailers) = call(
        &gateway,
        "/usher.identity.v1.AuthService/GetCurrentUser",
        Some(&token),
        &GetCurrentUserRequest {},
    )
    .await;
    assert!(trailers.contains("grpc-status:0"), "{trailers}");
    let me = GetCurrentUserResponse::decode(message.expect("a response").as_slice()).unwrap();
    assert_eq!(me.user.expect("user").email, "owner@web.example");

    // The same rules: no credential on a member RPC, and an internal RPC.
    let (_, _, _, trailers) = call(
        &gateway,
        "/usher.identity.v1.AuthService/GetCurrentUser",
        None,
        &GetCurrentUserRequest {},
    )
    .await;
    assert!(
        trailers.contains("grpc-status:16"),
        "UNAUTHENTICATED: {trailers}"
    );
    let (_, _, _, trailers) = call(
        &gateway,
        "/usher.identity.internal.v1.DirectoryService/GetInvitationContext",
        Some(&token),
        &GetCurrentUserRequest {},
    )
    .await;
    assert!(
        trailers.contains("grpc-status:12"),
        "UNIMPLEMENTED: {trailers}"
    );
    // Plain HTTP/1.1 that is neither gRPC-Web nor the page is refused.
    let (status, _, _) = http(&gateway, "GET", "/", &[], b"").await;
    assert_eq!(status, 400);
}
