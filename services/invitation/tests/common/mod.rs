//! The invitation service against the real PostgreSQL and Redis, with the
//! real identity service behind a real gRPC server (its DirectoryService
//! verifies this service's signed assertions), both driven by one manual
//! clock. Handlers are called with the principal the guard would attach.

#![allow(dead_code)]

use std::{net::SocketAddr, sync::Arc};

use chrono::{TimeZone, Utc};
use prost::Message;
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::Request;
use usher_identity::testing::{
    TestIdentity, admin_permissions, member, new_account_request, platform,
};
use usher_invitation::{Config, api::InvitationApi, migration::Migrator, state::Invitations};
use usher_kit::{
    amqp::EMAIL_JOB_TYPE,
    authz::Policy,
    clock::{ManualClock, SharedClock},
    config::{RedisConfig, ServerConfig},
    principal::Principal,
    redis::Redis,
    server::{CallGuard, ServiceServer},
    testing::TestDatabase,
};
use usher_proto::{
    identity::{internal::v1::directory_service_server::DirectoryServiceServer, v1 as id},
    invitation::v1 as pb,
    notification::v1 as notification,
};
use uuid::Uuid;

/// Identity and invitation for one test.
pub struct Harness {
    pub clock: Arc<ManualClock>,
    pub identity: TestIdentity,
    pub api: InvitationApi,
    pub state: Arc<Invitations>,
    pub db: DatabaseConnection,
    pub redis: Redis,
    pub redis_prefix: String,
    pub identity_addr: SocketAddr,
    database: Option<TestDatabase>,
    shutdown: CancellationToken,
}

/// An account of the test with its owner (an admin).
pub struct Account {
    pub id: Uuid,
    pub slug: String,
    pub owner: Uuid,
    pub admin: Principal,
    pub admin_role: String,
    pub user_role: String,
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts with `tune` applied to the invitation configuration.
    pub async fn start_with(tune: impl FnOnce(&mut Config)) -> Self {
        let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 3, 2, 9, 0, 0).unwrap());
        let shared: SharedClock = clock.clone();
        let identity = TestIdentity::start(shared.clone()).await;

        // Identity's DirectoryService on a real port, behind the real guard.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let identity_addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let server_config = ServerConfig {
            listen: identity_addr,
            metrics_listen: None,
            ..ServerConfig::default()
        };
        let mut config = Config::default();
        let guard = CallGuard::new(
            Policy::from_contracts().expect("policy"),
            config.assertion.verifier().expect("verifier"),
            shared.clone(),
        );
        let mut server = ServiceServer::new("usher-identity", &server_config, guard);
        server.add_service(DirectoryServiceServer::new(identity.api.clone()));
        tokio::spawn(server.serve(listener, shutdown.clone()));

        let database = TestDatabase::create("invitation").await.expect("database");
        let db = database.migrated::<Migrator>().await.expect("migrations");
        let redis_prefix = format!("t:{}:", Uuid::new_v4().simple());
        let redis = Redis::connect(&RedisConfig {
            key_prefix: redis_prefix.clone(),
            ..RedisConfig::default()
        })
        .expect("redis");
        config.identity.url = format!("http://{identity_addr}");
        tune(&mut config);
        let state = Arc::new(
            usher_invitation::state(
                &config,
                db.clone(),
                std::sync::Arc::new(usher_kit::ttl::RedisTtlStore::new(redis.clone())),
                shared,
            )
            .expect("state"),
        );
        Self {
            clock,
            identity,
            api: InvitationApi::new(state.clone()),
            state,
            db,
            redis,
            redis_prefix,
            identity_addr,
            database: Some(database),
            shutdown,
        }
    }

    /// A new account with `seats` seats; its owner is the admin.
    pub async fn account(&self, seats: i32) -> Account {
        use id::{account_service_server::AccountService, role_service_server::RoleService};
        let created = AccountService::create_account(
            &self.identity.api,
            request(&platform(), new_account_request(seats)),
        )
        .await
        .expect("account")
        .into_inner();
        let created_account = created.account.expect("account");
        let account: Uuid = created_account.id.parse().expect("uuid");
        let owner: Uuid = created.owner.expect("owner").id.parse().expect("uuid");
        let admin = member(account, owner, &admin_permissions());
        let roles = RoleService::list_roles(
            &self.identity.api,
            request(&admin, id::ListRolesRequest::default()),
        )
        .await
        .expect("roles")
        .into_inner()
        .roles;
        let named = |name: &str| {
            roles
                .iter()
                .find(|r| r.name == name)
                .expect("built-in role")
                .id
                .clone()
        };
        Account {
            id: account,
            slug: created_account.slug,
            owner,
            admin_role: named("Admin"),
            user_role: named("User"),
            admin,
        }
    }

    /// Every email job in the outbox, oldest first.
    pub async fn email_jobs(&self) -> Vec<notification::EmailJob> {
        let rows = self
            .db
            .query_all_raw(Statement::from_string(
                self.db.get_database_backend(),
                "SELECT message->>'kind' AS kind, payload FROM usher_outbox ORDER BY id",
            ))
            .await
            .expect("outbox");
        rows.into_iter()
            .filter(|row| row.try_get::<String>("", "kind").expect("kind") == EMAIL_JOB_TYPE)
            .map(|row| {
                let payload: Vec<u8> = row.try_get("", "payload").expect("payload");
                notification::EmailJob::decode(payload.as_slice()).expect("email job")
            })
            .collect()
    }

    /// The kinds of every message in the outbox, oldest first.
    pub async fn outbox_kinds(&self) -> Vec<String> {
        self.db
            .query_all_raw(Statement::from_string(
                self.db.get_database_backend(),
                "SELECT message->>'kind' AS kind FROM usher_outbox ORDER BY id",
            ))
            .await
            .expect("outbox")
            .into_iter()
            .map(|row| row.try_get("", "kind").expect("kind"))
            .collect()
    }

    /// The link token of the newest invitation email sent to `email`.
    pub async fn token_for(&self, email: &str) -> String {
        self.tokens()
            .await
            .remove(email)
            .unwrap_or_else(|| panic!("no invitation email to {email}"))
    }

    /// Recipient → link token of the newest invitation email to each.
    pub async fn tokens(&self) -> std::collections::HashMap<String, String> {
        self.email_jobs()
            .await
            .into_iter()
            .filter(|job| !job.sealed_link.is_empty())
            .map(|job| {
                let link = self
                    .state
                    .sealer
                    .open(&job.job_id, &job.sealed_link)
                    .expect("sealed link opens");
                let token = link
                    .split_once("token=")
                    .map(|(_, token)| token.to_owned())
                    .expect("link carries a token");
                (job.recipient_email, token)
            })
            .collect()
    }

    /// Signs in to the account with `email` and `password`.
    pub async fn sign_in(
        &self,
        account: &Account,
        email: &str,
        password: &str,
    ) -> Result<id::SignInResponse, tonic::Status> {
        use id::auth_service_server::AuthService;
        AuthService::sign_in(
            &self.identity.api,
            request(
                &Principal::anonymous(),
                id::SignInRequest {
                    account_slug: account.slug.clone(),
                    login: Some(id::sign_in_request::Login::Email(email.to_owned())),
                    password: password.to_owned(),
                },
            ),
        )
        .await
        .map(tonic::Response::into_inner)
    }

    /// The `n` column of the one row `sql` returns.
    pub async fn count(&self, sql: &str) -> i64 {
        self.db
            .query_one_raw(Statement::from_string(self.db.get_database_backend(), sql))
            .await
            .expect("query")
            .expect("row")
            .try_get("", "n")
            .expect("n")
    }

    /// Every Redis key of the test, without its prefix.
    pub async fn redis_keys(&self) -> Vec<String> {
        let keys = self
            .redis
            .scan_keys(&format!("{}*", self.redis_prefix))
            .await
            .expect("keys");
        keys.into_iter()
            .map(|k| k[self.redis_prefix.len()..].to_owned())
            .collect()
    }

    /// Creates invitations for `emails` as the account's admin.
    pub async fn invite(
        &self,
        account: &Account,
        emails: &[&str],
    ) -> Result<pb::CreateInvitationsResponse, tonic::Status> {
        self.create(account, create_request(account, emails)).await
    }

    /// CreateInvitations as the account's admin.
    pub async fn create(
        &self,
        account: &Account,
        message: pb::CreateInvitationsRequest,
    ) -> Result<pb::CreateInvitationsResponse, tonic::Status> {
        use pb::invitation_service_server::InvitationService;
        self.api
            .create_invitations(request(&account.admin, message))
            .await
            .map(tonic::Response::into_inner)
    }

    /// Drops the databases and the Redis keys, stops the identity server.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let keys = self.redis_keys().await;
        if !keys.is_empty() {
            let mut conn = self.redis.connection();
            let full: Vec<String> = keys
                .iter()
                .map(|k| format!("{}{k}", self.redis_prefix))
                .collect();
            let _: () = redis::cmd("DEL")
                .arg(full)
                .query_async(&mut conn)
                .await
                .expect("del");
        }
        if let Some(database) = self.database.take() {
            database.drop_database().await.expect("drop");
        }
        self.identity.stop().await;
    }
}

/// A CreateInvitations request for `emails` with the User role.
pub fn create_request(account: &Account, emails: &[&str]) -> pb::CreateInvitationsRequest {
    pb::CreateInvitationsRequest {
        invitees: emails
            .iter()
            .map(|e| pb::InviteeInput {
                email: (*e).to_owned(),
                display_name: String::new(),
            })
            .collect(),
        role_id: account.user_role.clone(),
        ..Default::default()
    }
}

/// A request as the guard hands it to a handler.
pub fn request<T>(principal: &Principal, message: T) -> Request<T> {
    usher_identity::testing::request(principal, message)
}

/// An anonymous (public) request.
pub fn public<T>(message: T) -> Request<T> {
    request(&Principal::anonymous(), message)
}

/// The error reason of a failed call.
pub fn reason(status: &tonic::Status) -> String {
    usher_kit::error::ApiError::from(status.clone())
        .reason()
        .as_str()
        .to_owned()
}
