//! The conformance cases, written once against [`SessionStore`] and run
//! against both stores by `conformance_suite!` in the parent module.

use super::*;
use crate::tokens::TokenPurpose;

fn meta() -> SessionMeta {
    SessionMeta {
        client_ip: Some("203.0.113.7".into()),
        user_agent: Some("usher-test/1.0".into()),
        password_change_required: true,
    }
}

async fn sign_in(h: &Harness, user_id: Uuid) -> IssuedSession {
    h.store
        .create(Uuid::new_v4(), user_id, meta())
        .await
        .expect("create")
}

async fn resolve(h: &Harness, token: &Token) -> Option<SessionRecord> {
    h.store
        .resolve_access(token.as_str())
        .await
        .expect("resolve")
}

async fn refresh(h: &Harness, token: &Token) -> Result<IssuedSession, SessionError> {
    h.store.refresh(token.as_str()).await
}

fn assert_not_usable(result: Result<IssuedSession, SessionError>) {
    assert!(
        matches!(result, Err(SessionError::NotUsable)),
        "expected NotUsable, got {result:?}"
    );
}

pub(super) async fn create_then_resolve(h: &Harness) {
    let (account_id, user_id) = (Uuid::new_v4(), Uuid::new_v4());
    let issued = h
        .store
        .create(account_id, user_id, meta())
        .await
        .expect("create");
    let record = &issued.record;
    assert_eq!((record.account_id, record.user_id), (account_id, user_id));
    assert_eq!(record.id.get_version_num(), 4);
    assert_eq!(record.created_at, start());
    assert_eq!(issued.access_expiry, start() + h.config.access_ttl());
    assert_eq!(issued.refresh_expiry, start() + h.config.idle_timeout());
    assert_eq!(
        record.absolute_expiry,
        start() + h.config.absolute_timeout()
    );
    assert_eq!(record.client_ip.as_deref(), Some("203.0.113.7"));
    assert_eq!(record.user_agent.as_deref(), Some("usher-test/1.0"));
    assert!(record.password_change_required);
    assert_ne!(issued.access_token.as_str(), issued.refresh_token.as_str());

    assert_eq!(
        resolve(h, &issued.access_token).await.as_ref(),
        Some(record)
    );
    // A refresh token is no access token (P5), and guesses find nothing.
    assert_eq!(resolve(h, &issued.refresh_token).await, None);
    assert_eq!(
        h.store
            .resolve_access("not-a-token")
            .await
            .expect("resolve"),
        None
    );

    // Every sign-in is a new session.
    let again = h
        .store
        .create(account_id, user_id, SessionMeta::default())
        .await
        .expect("create");
    assert_ne!(again.record.id, record.id);
    assert_eq!(again.record.client_ip, None);
}

pub(super) async fn access_token_expires(h: &Harness) {
    let issued = sign_in(h, Uuid::new_v4()).await;
    let ttl = i64::try_from(h.config.access_ttl_secs).expect("small");
    h.advance(ttl - 1);
    assert!(resolve(h, &issued.access_token).await.is_some());
    h.advance(1);
    assert_eq!(resolve(h, &issued.access_token).await, None);
    // The session lives on: a refresh gives a working access token.
    let refreshed = refresh(h, &issued.refresh_token).await.expect("refresh");
    assert!(resolve(h, &refreshed.access_token).await.is_some());
}

pub(super) async fn refresh_rotates_tokens(h: &Harness) {
    let first = sign_in(h, Uuid::new_v4()).await;
    h.advance(60);
    let second = refresh(h, &first.refresh_token).await.expect("refresh");
    let record = &second.record;
    assert_eq!(record.id, first.record.id);
    assert_eq!(record.created_at, first.record.created_at);
    assert_eq!(record.absolute_expiry, first.record.absolute_expiry);
    assert_eq!(record.rotated_at, Some(start() + secs(60)));
    assert_eq!(
        record.previous_refresh_hash.as_deref(),
        Some(first.record.refresh_hash.as_str())
    );
    assert_eq!(
        second.access_expiry,
        start() + secs(60) + h.config.access_ttl()
    );
    assert_eq!(
        second.refresh_expiry,
        start() + secs(60) + h.config.idle_timeout()
    );
    assert_ne!(second.access_token.as_str(), first.access_token.as_str());
    assert_ne!(second.refresh_token.as_str(), first.refresh_token.as_str());
    assert_eq!(
        resolve(h, &second.access_token).await.as_ref(),
        Some(record)
    );

    // The old refresh token is dead; within the grace the session survives.
    assert!(matches!(
        refresh(h, &first.refresh_token).await,
        Err(SessionError::Superseded)
    ));
    let third = refresh(h, &second.refresh_token).await.expect("refresh");
    assert!(resolve(h, &third.access_token).await.is_some());

    // A replaced access token works until its own expiry, no longer.
    assert!(resolve(h, &first.access_token).await.is_some());
    h.advance(i64::try_from(h.config.access_ttl_secs).expect("small") - 60);
    assert_eq!(resolve(h, &first.access_token).await, None);
    assert!(resolve(h, &third.access_token).await.is_some());
}

pub(super) async fn refresh_reuse_revokes_session(h: &Harness) {
    let user_id = Uuid::new_v4();
    let first = sign_in(h, user_id).await;
    let second = refresh(h, &first.refresh_token).await.expect("refresh");
    h.advance(i64::try_from(h.config.reuse_grace_secs).expect("small") + 1);
    match refresh(h, &first.refresh_token).await {
        Err(SessionError::Reused {
            session_id,
            user_id: reused_by,
        }) => {
            assert_eq!((session_id, reused_by), (first.record.id, user_id));
        }
        other => panic!("expected Reused, got {other:?}"),
    }
    // Every token of the session is dead, the thief's and the owner's.
    assert_eq!(resolve(h, &second.access_token).await, None);
    assert_eq!(resolve(h, &first.access_token).await, None);
    assert_not_usable(refresh(h, &second.refresh_token).await);
    assert_not_usable(refresh(h, &first.refresh_token).await);
}

pub(super) async fn older_refresh_token_revokes_even_within_grace(h: &Harness) {
    let first = sign_in(h, Uuid::new_v4()).await;
    let second = refresh(h, &first.refresh_token).await.expect("refresh");
    let third = refresh(h, &second.refresh_token).await.expect("refresh");
    // Only the token replaced last enjoys the grace.
    assert!(matches!(
        refresh(h, &first.refresh_token).await,
        Err(SessionError::Reused { .. })
    ));
    assert_eq!(resolve(h, &third.access_token).await, None);
    assert_not_usable(refresh(h, &third.refresh_token).await);
}

async fn race(h: &Harness, token: &Token) -> Vec<Result<IssuedSession, SessionError>> {
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let store = h.store.clone();
            let token = token.as_str().to_owned();
            tokio::spawn(async move { store.refresh(&token).await })
        })
        .collect();
    futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(|joined| joined.expect("task"))
        .collect()
}

pub(super) async fn concurrent_refreshes_have_one_winner(h: &Harness) {
    let issued = sign_in(h, Uuid::new_v4()).await;
    let (winners, losers): (Vec<_>, Vec<_>) = race(h, &issued.refresh_token)
        .await
        .into_iter()
        .partition(Result::is_ok);
    assert_eq!(winners.len(), 1, "exactly one refresh wins");
    for loser in &losers {
        assert!(
            matches!(loser, Err(SessionError::Superseded)),
            "losers are refused without revoking: {loser:?}"
        );
    }
    let winner = winners.into_iter().next().expect("one").expect("winner");
    assert!(resolve(h, &winner.access_token).await.is_some());
    refresh(h, &winner.refresh_token)
        .await
        .expect("the winner's refresh token works");
}

pub(super) async fn concurrent_refreshes_without_grace_revoke(h: &Harness) {
    let issued = sign_in(h, Uuid::new_v4()).await;
    let results = race(h, &issued.refresh_token).await;
    let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(winners.len(), 1, "exactly one refresh wins");
    let mut reused = 0;
    for result in &results {
        match result {
            Ok(_) => {}
            Err(SessionError::Reused { .. }) => reused += 1,
            Err(SessionError::NotUsable) => {}
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert!(reused >= 1, "a reuse was detected");
    // Strict mode: the reuse revoked the session, the winner's tokens too.
    assert_eq!(resolve(h, &winners[0].access_token).await, None);
}

pub(super) async fn idle_timeout_ends_unrefreshed_session(h: &Harness) {
    let idle = i64::try_from(h.config.idle_timeout_secs).expect("small");
    let first = sign_in(h, Uuid::new_v4()).await;
    // Refreshing in time keeps the session beyond one idle period…
    h.advance(idle - 1);
    let second = refresh(h, &first.refresh_token).await.expect("refresh");
    h.advance(idle - 1);
    let third = refresh(h, &second.refresh_token).await.expect("refresh");
    // …not refreshing ends it.
    h.advance(idle);
    assert_not_usable(refresh(h, &third.refresh_token).await);
}

pub(super) async fn absolute_timeout_caps_refresh(h: &Harness) {
    let first = sign_in(h, Uuid::new_v4()).await;
    let absolute = start() + secs(150);
    assert_eq!(first.record.absolute_expiry, absolute);
    h.advance(90);
    let second = refresh(h, &first.refresh_token).await.expect("refresh");
    // Idle would allow 90 + 100 s; the absolute expiry wins.
    assert_eq!(second.refresh_expiry, absolute);
    assert!(second.access_expiry <= absolute);
    assert_eq!(second.record.absolute_expiry, absolute);
    h.advance(59);
    assert!(resolve(h, &second.access_token).await.is_some());
    h.advance(1);
    assert_eq!(resolve(h, &second.access_token).await, None);
    assert_not_usable(refresh(h, &second.refresh_token).await);
}

pub(super) async fn revoke_ends_one_session(h: &Harness) {
    let user_id = Uuid::new_v4();
    let first = sign_in(h, user_id).await;
    let second = sign_in(h, user_id).await;
    assert!(h.store.revoke(first.record.id).await.expect("revoke"));
    assert_eq!(resolve(h, &first.access_token).await, None);
    assert_not_usable(refresh(h, &first.refresh_token).await);
    assert!(resolve(h, &second.access_token).await.is_some());
    assert!(!h.store.revoke(first.record.id).await.expect("revoke"));
    assert!(!h.store.revoke(Uuid::new_v4()).await.expect("revoke"));
}

pub(super) async fn a_live_session_is_found_by_id(h: &Harness) {
    let signed_in = sign_in(h, Uuid::new_v4()).await;
    let id = signed_in.record.id;
    let found = h.store.get(id).await.expect("get").expect("live");
    assert_eq!(found.absolute_expiry, signed_in.record.absolute_expiry);
    assert_eq!(found.user_id, signed_in.record.user_id);
    assert!(h.store.revoke(id).await.expect("revoke"));
    assert_eq!(h.store.get(id).await.expect("get"), None);
    assert_eq!(h.store.get(Uuid::new_v4()).await.expect("get"), None);
}

pub(super) async fn revoke_user_ends_all_sessions_of_user(h: &Harness) {
    let (user, other) = (Uuid::new_v4(), Uuid::new_v4());
    let first = sign_in(h, user).await;
    let second = sign_in(h, user).await;
    let third = sign_in(h, user).await;
    let bystander = sign_in(h, other).await;
    // A rotated session is found through the index too.
    let rotated = refresh(h, &third.refresh_token).await.expect("refresh");

    assert_eq!(h.store.revoke_user(user).await.expect("revoke"), 3);
    for issued in [&first, &second, &rotated] {
        assert_eq!(resolve(h, &issued.access_token).await, None);
        assert_not_usable(refresh(h, &issued.refresh_token).await);
    }
    assert_eq!(resolve(h, &third.access_token).await, None);
    assert!(resolve(h, &bystander.access_token).await.is_some());
    assert_eq!(h.store.revoke_user(user).await.expect("revoke"), 0);
    refresh(h, &bystander.refresh_token)
        .await
        .expect("another user's session is untouched");
}

pub(super) async fn principal_snapshots_are_versioned(h: &Harness) {
    let issued = sign_in(h, Uuid::new_v4()).await;
    let user_id = issued.record.user_id;
    assert_eq!(h.store.get_principal(user_id).await.expect("get"), None);
    let v1 = PrincipalSnapshot {
        account_id: issued.record.account_id,
        user_id,
        status: UserStatus::Active,
        permissions: vec!["users.read".into()],
        role_id: Uuid::new_v4(),
        password_change_required: false,
        version: 1,
    };
    let v2 = PrincipalSnapshot {
        permissions: vec!["users.read".into(), "users.manage".into()],
        // Beyond 2^53: compared exactly, not as a Lua double.
        version: (1 << 60) + 1,
        ..v1.clone()
    };
    let stale = PrincipalSnapshot {
        status: UserStatus::Inactive,
        version: 1 << 60,
        ..v1.clone()
    };
    assert!(h.store.put_principal(v1.clone()).await.expect("put"));
    assert_eq!(
        h.store.get_principal(user_id).await.expect("get"),
        Some(v1.clone())
    );
    assert!(h.store.put_principal(v2.clone()).await.expect("put"));
    assert!(!h.store.put_principal(stale).await.expect("put"));
    assert!(!h.store.put_principal(v2.clone()).await.expect("put"));
    let stored = h.store.get_principal(user_id).await.expect("get");
    assert_eq!(stored.as_ref(), Some(&v2));
    let principal = v2.principal_for(&issued.record).expect("active");
    assert_eq!(principal.permissions, ["users.read", "users.manage"]);
    assert_eq!(principal.credential_id, Some(issued.record.id.to_string()));

    assert!(h.store.delete_principal(user_id).await.expect("delete"));
    assert_eq!(h.store.get_principal(user_id).await.expect("get"), None);
    assert!(!h.store.delete_principal(user_id).await.expect("delete"));
    // Another user's snapshot is unaffected by all of this.
    assert_eq!(
        h.store.get_principal(Uuid::new_v4()).await.expect("get"),
        None
    );
}

fn api_key(secret: &Token, platform: bool) -> (String, ApiKeySnapshot) {
    (
        hasher().hash(TokenPurpose::ApiKey, secret.as_str()),
        ApiKeySnapshot {
            key_id: Uuid::new_v4(),
            account_id: (!platform).then(Uuid::new_v4),
            platform,
            permissions: if platform {
                Vec::new()
            } else {
                vec!["users.read".into()]
            },
            expire_time: None,
            version: 1,
        },
    )
}

fn new_secret() -> Token {
    Token::try_generate_with_prefix(crate::tokens::API_KEY_PREFIX).expect("entropy")
}

pub(super) async fn api_key_snapshots_resolve_to_principals(h: &Harness) {
    let secret = new_secret();
    let (hash, v1) = api_key(&secret, false);
    assert_eq!(
        h.store.get_api_key(secret.as_str()).await.expect("get"),
        None
    );
    assert!(
        h.store
            .put_api_key(hash.clone(), v1.clone())
            .await
            .expect("put")
    );
    let principal = h
        .store
        .get_api_key(secret.as_str())
        .await
        .expect("get")
        .expect("a principal");
    assert_eq!(principal.kind, PrincipalKind::ApiKey);
    assert_eq!(principal.account_id, v1.account_id);
    assert_eq!(principal.user_id, None);
    assert_eq!(principal.credential_id, Some(v1.key_id.to_string()));
    assert_eq!(principal.permissions, ["users.read"]);
    // Versioned: a stale rewrite never replaces a newer one.
    let v2 = ApiKeySnapshot {
        permissions: Vec::new(),
        version: (1 << 60) + 1,
        ..v1.clone()
    };
    let stale = ApiKeySnapshot {
        version: 1 << 60,
        ..v1.clone()
    };
    assert!(h.store.put_api_key(hash.clone(), v2).await.expect("put"));
    assert!(!h.store.put_api_key(hash.clone(), stale).await.expect("put"));
    let principal = h.store.get_api_key(secret.as_str()).await.expect("get");
    assert_eq!(
        principal.expect("a principal").permissions,
        Vec::<String>::new()
    );
    // Only the exact secret resolves; the hash itself is no credential.
    assert_eq!(h.store.get_api_key(&hash).await.expect("get"), None);
    assert_eq!(
        h.store
            .get_api_key(new_secret().as_str())
            .await
            .expect("get"),
        None
    );
    assert_eq!(
        h.store
            .get_api_key(&format!("{}{}", secret.as_str(), "x".repeat(200)))
            .await
            .expect("get"),
        None
    );
    // A platform key is a PLATFORM principal without an account.
    let platform_secret = new_secret();
    let (platform_hash, platform) = api_key(&platform_secret, true);
    assert!(
        h.store
            .put_api_key(platform_hash, platform.clone())
            .await
            .expect("put")
    );
    let principal = h
        .store
        .get_api_key(platform_secret.as_str())
        .await
        .expect("get")
        .expect("a principal");
    assert_eq!(principal.kind, PrincipalKind::Platform);
    assert_eq!(principal.account_id, None);
    assert_eq!(principal.credential_id, Some(platform.key_id.to_string()));
}

pub(super) async fn expired_api_key_is_refused(h: &Harness) {
    let secret = new_secret();
    let (hash, mut snapshot) = api_key(&secret, false);
    snapshot.expire_time = Some(crate::clock::Clock::now(&*h.clock) + Duration::seconds(30));
    assert!(
        h.store
            .put_api_key(hash.clone(), snapshot.clone())
            .await
            .expect("put")
    );
    assert!(
        h.store
            .get_api_key(secret.as_str())
            .await
            .expect("get")
            .is_some()
    );
    h.advance(29);
    assert!(
        h.store
            .get_api_key(secret.as_str())
            .await
            .expect("get")
            .is_some()
    );
    h.advance(1);
    assert_eq!(
        h.store.get_api_key(secret.as_str()).await.expect("get"),
        None
    );
    // Writing an already expired key stores nothing.
    snapshot.version = 2;
    assert!(!h.store.put_api_key(hash, snapshot).await.expect("put"));
    assert_eq!(
        h.store.get_api_key(secret.as_str()).await.expect("get"),
        None
    );
}

pub(super) async fn deleted_api_key_stays_revoked(h: &Harness) {
    let secret = new_secret();
    let (hash, snapshot) = api_key(&secret, false);
    let other = new_secret();
    let (other_hash, other_snapshot) = api_key(&other, false);
    assert!(
        h.store
            .put_api_key(hash.clone(), snapshot.clone())
            .await
            .expect("put")
    );
    assert!(
        h.store
            .put_api_key(other_hash, other_snapshot)
            .await
            .expect("put")
    );
    assert!(h.store.delete_api_key(hash.clone()).await.expect("delete"));
    assert_eq!(
        h.store.get_api_key(secret.as_str()).await.expect("get"),
        None
    );
    assert!(!h.store.delete_api_key(hash.clone()).await.expect("delete"));
    // A slow rewrite that read the key before its revocation cannot
    // bring it back, whatever its version.
    let late = ApiKeySnapshot {
        version: u64::MAX,
        ..snapshot
    };
    assert!(!h.store.put_api_key(hash, late).await.expect("put"));
    assert_eq!(
        h.store.get_api_key(secret.as_str()).await.expect("get"),
        None
    );
    // Another key is untouched.
    assert!(
        h.store
            .get_api_key(other.as_str())
            .await
            .expect("get")
            .is_some()
    );
    // Deleting a key never written leaves a tombstone too.
    let never = new_secret();
    let never_hash = hasher().hash(TokenPurpose::ApiKey, never.as_str());
    assert!(
        !h.store
            .delete_api_key(never_hash.clone())
            .await
            .expect("delete")
    );
    let (_, snapshot) = api_key(&never, false);
    assert!(
        !h.store
            .put_api_key(never_hash, snapshot)
            .await
            .expect("put")
    );
}
