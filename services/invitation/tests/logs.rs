//! No raw invitation token in any log line, Redis key, database row or
//! queued message: the invitation service's logs at TRACE are captured while
//! a link is created and used. A binary of its own, so the capturing
//! subscriber can be global.

// Test code: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::{Harness, public};
use usher_proto::invitation::v1::{self as pb, invitation_service_server::InvitationService};

/// Everything logged, at every level, by every thread of this test binary.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test]
async fn raw_tokens_are_stored_and_logged_nowhere() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    // Global, in a test binary of its own: no other test's threads, and no
    // callsite interest cached before the subscriber existed.
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
    let h = Harness::start().await;
    let account = h.account(10).await;
    h.invite(&account, &["ann@acme.example"]).await.unwrap();
    let token = h.token_for("ann@acme.example").await;
    // Use the link the ways that log the most: preview, a failed accept.
    h.api
        .preview_invitation(public(pb::PreviewInvitationRequest {
            token: token.clone(),
        }))
        .await
        .expect("preview");
    h.api
        .accept_invitation(public(pb::AcceptInvitationRequest {
            token: token.clone(),
            display_name: "Ann".into(),
            password: "short".into(),
            locale: String::new(),
        }))
        .await
        .expect_err("weak");
    let logged = logs.text();
    assert!(
        logged.contains("created database"),
        "the capture sees the services' logs"
    );
    assert!(!logged.contains(&token), "the token was logged");
    assert!(token.len() >= 32, "a link carries a long random token");
    // Redis holds the token's keyed hash only.
    let keys = h.redis_keys().await;
    assert!(keys.iter().any(|k| k.starts_with("inv:tok:")), "{keys:?}");
    assert!(keys.iter().all(|k| !k.contains(&token)), "{keys:?}");
    // PostgreSQL: neither the invitations nor the outbox carry it in clear.
    let found = h
        .count(
        &format!(
            "SELECT count(*) AS n FROM invitations WHERE row_to_json(invitations)::text LIKE '%{token}%'"
        ),
    )
    .await;
    assert_eq!(found, 0);
    let in_outbox = h
        .count(
        &format!(
            "SELECT count(*) AS n FROM usher_outbox WHERE position(convert_to('{token}', 'UTF8') in payload) > 0"
        ),
    )
    .await;
    assert_eq!(in_outbox, 0, "the link is sealed in the email job");
    h.stop().await;
}
