//! Service tests: the real handlers against a fresh PostgreSQL database and a
//! Redis key prefix of their own, called with a verified principal as the
//! guard would attach it (no network, no gateway).

#![allow(clippy::expect_used)]

use std::sync::Arc;

use tonic::Request;
use usher_kit::{
    clock::SharedClock,
    config::RedisConfig,
    principal::{Principal, PrincipalKind},
    redis::Redis,
    sessions::RedisSessionStore,
    testing::TestDatabase,
    tokens::TokenHasher,
    ttl::RedisTtlStore,
};
use usher_proto::identity::v1 as pb;
use uuid::Uuid;

use crate::{
    api::IdentityApi,
    config::Config,
    migration::Migrator,
    passwords::PasswordHasher,
    state::{Identity, Settings},
};

/// A running identity service for one test.
#[derive(Debug)]
pub struct TestIdentity {
    /// The handlers.
    pub api: IdentityApi,
    /// The state behind them.
    pub state: Arc<Identity>,
    /// The Redis of the test (its keys are under a unique prefix).
    pub redis: Redis,
    database: Option<TestDatabase>,
}

impl TestIdentity {
    /// A fresh database and Redis prefix; `clock` drives time.
    pub async fn start(clock: SharedClock) -> Self {
        let config = Config::default();
        let database = TestDatabase::create("identity")
            .await
            .expect("test database");
        let db = database.migrated::<Migrator>().await.expect("migrations");
        // A pool of its own, as on PostgreSQL in production.
        let writes = database.connect().await.expect("writers' pool");
        let redis = Redis::connect(&RedisConfig {
            key_prefix: format!("t:{}:", Uuid::new_v4().simple()),
            ..RedisConfig::default()
        })
        .expect("redis");
        let sessions = Arc::new(RedisSessionStore::new(
            redis.clone(),
            config.sessions.clone(),
            TokenHasher::from_config(&config.tokens).expect("key"),
            clock.clone(),
        ));
        let state = Arc::new(Identity {
            db,
            writes,
            clock,
            passwords: PasswordHasher::new(&config.passwords),
            password_policy: config.passwords.policy(),
            sessions,
            tokens: TokenHasher::from_config(&config.tokens).expect("key"),
            settings: Arc::new(Settings::from_config(&config)),
            keys: Arc::new(RedisTtlStore::new(redis.clone())),
            sealer: usher_kit::seal::Sealer::from_config(&config.seal).expect("seal key"),
            reservations: crate::app::directory::reservations(),
        });
        Self {
            api: IdentityApi::new(state.clone()),
            state,
            redis,
            database: Some(database),
        }
    }

    /// Drops the database.
    pub async fn stop(mut self) {
        if let Some(database) = self.database.take() {
            database.drop_database().await.expect("drop test database");
        }
    }
}

/// A request as the guard hands it to a handler.
pub fn request<T>(principal: &Principal, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.extensions_mut().insert(principal.clone());
    request
}

/// A platform caller.
pub fn platform() -> Principal {
    Principal {
        kind: PrincipalKind::Platform,
        credential_id: Some("test-platform-key".into()),
        ..Principal::anonymous()
    }
}

/// A member of `account` with `permissions`.
pub fn member(account: Uuid, user: Uuid, permissions: &[&str]) -> Principal {
    Principal {
        kind: PrincipalKind::User,
        account_id: Some(account),
        user_id: Some(user),
        credential_id: Some("test-session".into()),
        permissions: permissions.iter().map(|p| (*p).to_owned()).collect(),
        service: None,
        password_change_required: false,
    }
}

/// Every permission of the catalogue (the built-in Admin's).
pub fn admin_permissions() -> Vec<&'static str> {
    crate::domain::CATALOGUE.iter().map(|(p, _)| *p).collect()
}

/// A valid CreateAccount request with a unique slug.
pub fn new_account_request(seat_limit: i32) -> pb::CreateAccountRequest {
    let slug = format!("acme-{}", &Uuid::new_v4().simple().to_string()[..8]);
    pb::CreateAccountRequest {
        request_id: String::new(),
        name: "Acme".into(),
        slug,
        default_locale: "en".into(),
        owner_email: "Owner@Acme.example".into(),
        owner_display_name: "Olive Owner".into(),
        owner_password: "correct horse battery".into(),
        owner_locale: String::new(),
        seat_limit,
        products: Vec::new(),
        allowed_email_domains: Vec::new(),
        invitation_lifetime: None,
    }
}
