//! AuthService against a real PostgreSQL and Redis: sign-in and its one
//! generic answer, throttling, sessions, the caller's profile and password,
//! reset and set-password links (single use, expiry, no token stored), and
//! API keys (idempotent creation, snapshots, revocation). Moved from the
//! handler file; the pure rules are unit-tested in `src/domain/auth.rs`,
//! `src/domain/password_links.rs` and `src/domain/api_keys.rs`.

use std::sync::Arc;

use argon2::PasswordHasher as _;
use chrono::{DateTime, Duration};
use prost::Message;
use prost_types::FieldMask;
use redis::AsyncCommands;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, IntoActiveModel,
    QueryFilter, Set, Statement,
};
use tonic::{Code, Response, Status};
use usher_identity::{
    api::{Call, convert},
    domain::{Origin, USER_ROLE, UserStatus},
    store::{
        api_keys,
        entities::{api_key, password_reset, role, user},
    },
    testing::{TestIdentity, admin_permissions, member, new_account_request, platform, request},
};
use usher_kit::{
    clock::{Clock, ManualClock, SystemClock},
    email::EmailAddress,
    principal::{Principal, PrincipalKind},
    tokens::{API_KEY_PREFIX, Token, TokenPurpose},
};
use usher_proto::{
    events::v1 as events,
    identity::v1::{
        self as pb, account_service_server::AccountService, auth_service_server::AuthService,
        user_service_server::UserService,
    },
    notification::v1 as notification,
};
use uuid::Uuid;

const OWNER_PASSWORD: &str = "correct horse battery";
const PASSWORD: &str = "a long enough secret";
const PHC_PREFIX: &str = "$argon2id$v=19$m=19456,t=2,p=1$";

fn reason(status: &Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default()
}

fn fields(status: &Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|f| f.field.clone()).collect())
        .unwrap_or_default()
}

fn assert_reason(status: &Status, code: Code, expected: &str) {
    assert_eq!(
        (status.code(), reason(status).as_str()),
        (code, expected),
        "{status:?}"
    );
}

fn anonymous() -> Principal {
    Principal::anonymous()
}

/// An account with its owner, as its admin sees it.
struct Tenant {
    account_id: Uuid,
    slug: String,
    owner_id: Uuid,
    admin: Principal,
}

async fn tenant(test: &TestIdentity) -> Tenant {
    let created = test
        .api
        .create_account(request(&platform(), new_account_request(20)))
        .await
        .expect("account")
        .into_inner();
    let account = created.account.expect("account");
    let account_id: Uuid = account.id.parse().expect("uuid");
    let owner_id: Uuid = created.owner.expect("owner").id.parse().expect("uuid");
    Tenant {
        account_id,
        slug: account.slug,
        owner_id,
        admin: member(account_id, owner_id, &admin_permissions()),
    }
}

/// A user of `tenant` with the built-in User role, inserted directly.
async fn add_user(
    test: &TestIdentity,
    tenant: &Tenant,
    email: Option<&str>,
    username: Option<&str>,
    status: UserStatus,
    password: Option<&str>,
) -> Uuid {
    let role = role::Entity::find()
        .filter(role::Column::AccountId.eq(tenant.account_id))
        .filter(role::Column::Name.eq(USER_ROLE))
        .one(&test.state.db)
        .await
        .expect("query")
        .expect("user role");
    let hash = match password {
        Some(password) => Some(
            test.state
                .passwords
                .hash(password.to_owned())
                .await
                .expect("hash"),
        ),
        None => None,
    };
    let now = test.state.clock.now();
    let canonical = email.map(|e| EmailAddress::parse(e).expect("email").into_canonical());
    let id = Uuid::new_v4();
    user::ActiveModel {
        id: Set(id),
        account_id: Set(tenant.account_id),
        email: Set(email.map(str::to_owned)),
        email_canonical: Set(canonical.clone()),
        username: Set(username.map(str::to_owned)),
        display_name: Set(format!("User {}", &id.simple().to_string()[..6])),
        search_text: Set(String::new()),
        status: Set(status),
        role_id: Set(role.id),
        team_id: Set(None),
        products: Set(convert::json_strings(Vec::<String>::new())),
        locale: Set(String::new()),
        metadata: Set(None),
        owner: Set(false),
        origin: Set(Origin::Direct),
        password_hash: Set(hash),
        password_change_required: Set(false),
        invitation_id: Set(None),
        invited_by: Set(None),
        create_time: Set(now),
        update_time: Set(now),
        activate_time: Set(Some(now)),
        deactivate_time: Set(None),
        last_sign_in_time: Set(None),
    }
    .insert(&test.state.db)
    .await
    .expect("user");
    id
}

async fn stored_user(test: &TestIdentity, id: Uuid) -> user::Model {
    user::Entity::find_by_id(id)
        .one(&test.state.db)
        .await
        .expect("query")
        .expect("user")
}

fn sign_in_request(slug: &str, email: &str, password: &str) -> pb::SignInRequest {
    pb::SignInRequest {
        account_slug: slug.into(),
        login: Some(pb::sign_in_request::Login::Email(email.into())),
        password: password.into(),
    }
}

async fn sign_in(
    test: &TestIdentity,
    slug: &str,
    email: &str,
    password: &str,
) -> Result<pb::SignInResponse, Status> {
    test.api
        .sign_in(request(
            &anonymous(),
            sign_in_request(slug, email, password),
        ))
        .await
        .map(Response::into_inner)
}

async fn session_of(test: &TestIdentity, slug: &str, email: &str, password: &str) -> pb::Session {
    sign_in(test, slug, email, password)
        .await
        .expect("signed in")
        .session
        .expect("session")
}

/// The principal the gateway builds for an access token, if it still works.
async fn principal_of(test: &TestIdentity, access_token: &str) -> Option<Principal> {
    let record = test
        .state
        .sessions
        .resolve_access(access_token)
        .await
        .expect("resolve")?;
    let snapshot = test
        .state
        .sessions
        .get_principal(record.user_id)
        .await
        .expect("snapshot")?;
    snapshot.principal_for(&record)
}

async fn works(test: &TestIdentity, session: &pb::Session) -> bool {
    principal_of(test, &session.access_token).await.is_some()
}

async fn outbox_rows(test: &TestIdentity) -> Vec<(serde_json::Value, Vec<u8>)> {
    let rows = test
        .state
        .db
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT message::text AS message, payload FROM usher_outbox ORDER BY id",
        ))
        .await
        .expect("outbox");
    rows.iter()
        .map(|row| {
            let message: String = row.try_get("", "message").expect("message");
            (
                serde_json::from_str(&message).expect("json"),
                row.try_get("", "payload").expect("payload"),
            )
        })
        .collect()
}

async fn email_jobs(test: &TestIdentity) -> Vec<(serde_json::Value, notification::EmailJob)> {
    outbox_rows(test)
        .await
        .into_iter()
        .filter(|(envelope, _)| envelope["kind"] == usher_kit::amqp::EMAIL_JOB_TYPE)
        .map(|(envelope, payload)| {
            (
                envelope,
                notification::EmailJob::decode(payload.as_slice()).expect("email job"),
            )
        })
        .collect()
}

async fn jobs_to(
    test: &TestIdentity,
    template: notification::EmailTemplate,
    email: &str,
) -> Vec<notification::EmailJob> {
    email_jobs(test)
        .await
        .into_iter()
        .map(|(_, job)| job)
        .filter(|job| job.template == template as i32 && job.recipient_email == email)
        .collect()
}

async fn events_of<M: Message + Default>(test: &TestIdentity, routing_key: &str) -> Vec<M> {
    outbox_rows(test)
        .await
        .into_iter()
        .filter(|(envelope, _)| {
            envelope["exchange"] == "usher.events" && envelope["routing_key"] == routing_key
        })
        .map(|(_, payload)| M::decode(payload.as_slice()).expect("event"))
        .collect()
}

async fn audit_actions(test: &TestIdentity, target: Uuid) -> Vec<String> {
    usher_identity::store::entities::audit_event::Entity::find()
        .filter(
            usher_identity::store::entities::audit_event::Column::TargetId.eq(target.to_string()),
        )
        .all(&test.state.db)
        .await
        .expect("audit")
        .into_iter()
        .map(|e| e.action)
        .collect()
}

/// The token inside the sealed link of a reset email.
fn token_in(test: &TestIdentity, job: &notification::EmailJob) -> String {
    link_parts(test, job, "/reset").0
}

/// The token and the locale of the sealed link to the page `path`.
fn link_parts(test: &TestIdentity, job: &notification::EmailJob, path: &str) -> (String, String) {
    let link = test
        .state
        .sealer
        .open(&job.job_id, &job.sealed_link)
        .expect("the sealed link opens");
    let query = link
        .strip_prefix(&format!(
            "{}{path}?token=",
            test.state.settings.public_base_url
        ))
        .expect("a link to the page");
    match query.split_once("&locale=") {
        Some((token, locale)) => (token.to_owned(), locale.to_owned()),
        None => (query.to_owned(), String::new()),
    }
}

/// The built-in User role of `tenant`.
async fn user_role(test: &TestIdentity, tenant: &Tenant) -> Uuid {
    role::Entity::find()
        .filter(role::Column::AccountId.eq(tenant.account_id))
        .filter(role::Column::Name.eq(USER_ROLE))
        .one(&test.state.db)
        .await
        .expect("query")
        .expect("user role")
        .id
}

/// A user created by the admin with an email and no password.
async fn create_without_password(
    test: &TestIdentity,
    tenant: &Tenant,
    username: &str,
    email: &str,
    locale: &str,
) -> pb::User {
    let role_id = user_role(test, tenant).await;
    test.api
        .create_user(request(
            &tenant.admin,
            pb::CreateUserRequest {
                username: username.into(),
                email: email.into(),
                display_name: format!("User {username}"),
                role_id: role_id.to_string(),
                locale: locale.into(),
                ..Default::default()
            },
        ))
        .await
        .expect("created")
        .into_inner()
        .user
        .expect("user")
}

async fn set_password(
    test: &TestIdentity,
    token: &str,
    password: &str,
) -> Result<pb::SetPasswordResponse, Status> {
    test.api
        .set_password(request(
            &anonymous(),
            pb::SetPasswordRequest {
                token: token.into(),
                new_password: password.into(),
            },
        ))
        .await
        .map(Response::into_inner)
}

async fn request_reset(test: &TestIdentity, slug: &str, email: &str) -> Result<(), Status> {
    test.api
        .request_password_reset(request(
            &anonymous(),
            pb::RequestPasswordResetRequest {
                account_slug: slug.into(),
                email: email.into(),
                locale: String::new(),
            },
        ))
        .await
        .map(|_| ())
}

/// Requests a reset for `email` and returns the token of the new link.
async fn reset_token(test: &TestIdentity, slug: &str, email: &str) -> String {
    request_reset(test, slug, email).await.expect("requested");
    let canonical = EmailAddress::parse(email).expect("email").into_canonical();
    let jobs = jobs_to(test, notification::EmailTemplate::PasswordReset, &canonical).await;
    token_in(test, jobs.last().expect("a reset email"))
}

async fn reset(
    test: &TestIdentity,
    token: &str,
    password: &str,
) -> Result<pb::ResetPasswordResponse, Status> {
    test.api
        .reset_password(request(
            &anonymous(),
            pb::ResetPasswordRequest {
                token: token.into(),
                new_password: password.into(),
            },
        ))
        .await
        .map(Response::into_inner)
}

/// Every Redis key and value of the test, as text.
async fn redis_dump(test: &TestIdentity) -> Vec<String> {
    let mut conn = test.redis.connection();
    let keys = test
        .redis
        .scan_keys(&test.redis.key(&["*"]))
        .await
        .expect("keys");
    let mut dump = Vec::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .expect("type");
        let values: Vec<String> = match kind.as_str() {
            "string" => vec![conn.get(&key).await.expect("get")],
            "zset" => conn.zrange(&key, 0, -1).await.expect("zrange"),
            "hash" => {
                let map: std::collections::HashMap<String, String> =
                    conn.hgetall(&key).await.expect("hgetall");
                map.into_iter().flat_map(|(k, v)| [k, v]).collect()
            }
            "set" => conn.smembers(&key).await.expect("smembers"),
            "list" => conn.lrange(&key, 0, -1).await.expect("lrange"),
            other => panic!("unexpected type {other} of {key}"),
        };
        dump.push(key);
        dump.extend(values);
    }
    dump
}

/// P1: `secret` appears in no row of any table (as text or as the hex of
/// bytes), in no outbox payload, and in no Redis key or value.
async fn assert_stored_nowhere(test: &TestIdentity, secret: &str) {
    let db = &test.state.db;
    let hex_secret = hex::encode(secret.as_bytes());
    let tables = db
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'",
        ))
        .await
        .expect("tables");
    let mut scanned = 0;
    for table in tables {
        let table: String = table.try_get("", "tablename").expect("name");
        let rows = db
            .query_all_raw(Statement::from_string(
                DbBackend::Postgres,
                format!("SELECT t::text AS row FROM \"{table}\" t"),
            ))
            .await
            .expect("rows");
        for row in rows {
            let row: String = row.try_get("", "row").expect("row");
            assert!(
                !row.contains(secret) && !row.contains(&hex_secret),
                "secret in a row of {table}"
            );
            scanned += 1;
        }
    }
    assert!(scanned > 0);
    for (_, payload) in outbox_rows(test).await {
        assert!(
            !payload
                .windows(secret.len())
                .any(|w| w == secret.as_bytes()),
            "secret in an outbox payload"
        );
    }
    for text in redis_dump(test).await {
        assert!(!text.contains(secret), "secret in redis");
    }
}

#[test]
fn auth_config_sections_validate() {
    use usher_kit::config::{Environment, Validate};

    use usher_identity::config::{Config, LinksConfig, ThrottleConfig};
    Config::default()
        .validate()
        .expect("the defaults are valid");
    let links = |url: &str| LinksConfig {
        public_base_url: url.into(),
    };
    assert_eq!(
        links("https://usher.example/ ").base(),
        "https://usher.example"
    );
    links("https://usher.example/app")
        .validate_for(Environment::Production)
        .expect("https with a path");
    links("http://127.0.0.1:8080")
        .validate_for(Environment::Development)
        .expect("http in development");
    for bad in [
        ("http://usher.example", Environment::Production),
        ("https://usher.example/?x=1", Environment::Development),
        ("https://usher.example/#top", Environment::Development),
        ("https://user:pw@usher.example", Environment::Development),
        ("ftp://usher.example", Environment::Development),
        ("/relative", Environment::Development),
    ] {
        let err = links(bad.0).validate_for(bad.1).expect_err(bad.0);
        assert!(err.to_string().contains("links.public_base_url"), "{err}");
    }
    let throttle = ThrottleConfig {
        sign_in_max_failures: 0,
        ..ThrottleConfig::default()
    };
    assert!(
        throttle
            .validate()
            .expect_err("zero")
            .to_string()
            .contains("throttle.sign_in_max_failures")
    );
    let throttle = ThrottleConfig {
        reset_window_secs: 0,
        ..ThrottleConfig::default()
    };
    assert!(
        throttle
            .validate()
            .expect_err("zero")
            .to_string()
            .contains("throttle.reset_window_secs")
    );
    let production = Config {
        environment: Environment::Production,
        ..Config::default()
    };
    assert!(
        production.validate().is_err(),
        "development keys and http links are refused in production"
    );
}

// -----------------------------------------------------------------------
// Sign-in

#[tokio::test]
async fn auth_sign_in_creates_a_session_a_snapshot_and_an_audit_entry() {
    let test = TestIdentity::start(SystemClock::shared()).await;
    let t = tenant(&test).await;
    let signed = sign_in(&test, &t.slug, "  OWNER@ACME.example ", OWNER_PASSWORD)
        .await
        .expect("signed in");
    let session = signed.session.expect("session");
    let user = signed.user.expect("user");
    assert_eq!(user.id, t.owner_id.to_string());
    assert!(user.last_sign_in_time.is_some());
    assert_eq!(
        (session.user_id.as_str(), session.account_id.as_str()),
        (user.id.as_str(), user.account_id.as_str())
    );
    assert_eq!(session.access_token.len(), 43);
    assert_ne!(session.access_token, session.refresh_token);
    assert!(!session.password_change_required);
    assert!(
        session.expire_time.expect("expiry").seconds
            > session.access_token_expire_time.expect("expiry").seconds
    );
    let principal = principal_of(&test, &session.access_token)
        .await
        .expect("the session works");
    assert_eq!(
        (principal.account_id, principal.user_id),
        (Some(t.account_id), Some(t.owner_id))
    );
    assert!(principal.has_permission("account.manage"));
    assert_eq!(
        principal.credential_id.as_deref(),
        Some(session.id.as_str())
    );

    let stored = stored_user(&test, t.owner_id).await;
    assert!(
        stored
            .password_hash
            .as_deref()
            .expect("hash")
            .starts_with(PHC_PREFIX)
    );
    let audit = usher_identity::store::entities::audit_event::Entity::find()
        .filter(usher_identity::store::entities::audit_event::Column::Action.eq("auth.signed_in"))
        .one(&test.state.db)
        .await
        .expect("audit")
        .expect("signed-in entry");
    assert_eq!(audit.details.expect("details")["session_id"], session.id);

    // Each sign-in is a new session.
    let again = session_of(&test, &t.slug, "owner@acme.example", OWNER_PASSWORD).await;
    assert_ne!(again.id, session.id);
    assert!(works(&test, &session).await && works(&test, &again).await);

    // Username users, compared lower-cased.
    let kiosk = add_user(
        &test,
        &t,
        None,
        Some("kiosk-1"),
        UserStatus::Active,
        Some(PASSWORD),
    )
    .await;
    let signed = test
        .api
        .sign_in(request(
            &anonymous(),
            pb::SignInRequest {
                account_slug: t.slug.to_uppercase(),
                login: Some(pb::sign_in_request::Login::Username("KIOSK-1".into())),
                password: PASSWORD.into(),
            },
        ))
        .await
        .expect("username sign-in")
        .into_inner();
    assert_eq!(signed.user.expect("user").id, kiosk.to_string());
    test.stop().await;
}

#[tokio::test]
async fn auth_sign_in_rehashes_weaker_hashes() {
    let test = TestIdentity::start(SystemClock::shared()).await;
    let t = tenant(&test).await;
    let id = add_user(
        &test,
        &t,
        Some("weak@acme.example"),
        None,
        UserStatus::Active,
        None,
    )
    .await;
    let weak = argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon2::Params::new(8_192, 1, 1, None).expect("params"),
    )
    .hash_password(PASSWORD.as_bytes())
    .expect("hash")
    .to_string();
    let mut active = stored_user(&test, id).await.into_active_model();
    active.password_hash = Set(Some(weak));
    active.update(&test.state.db).await.expect("update");
    session_of(&test, &t.slug, "weak@acme.example", PASSWORD).await;
    let rehashed = stored_user(&test, id).await.password_hash.expect("hash");
    assert!(rehashed.starts_with(PHC_PREFIX), "{}", &rehashed[..30]);
    session_of(&test, &t.slug, "weak@acme.example", PASSWORD).await;
    test.stop().await;
}

#[tokio::test]
async fn auth_sign_in_answers_one_generic_error_for_every_cause() {
    let test = TestIdentity::start(SystemClock::shared()).await;
    let t = tenant(&test).await;
    add_user(
        &test,
        &t,
        Some("invited@acme.example"),
        None,
        UserStatus::Invited,
        None,
    )
    .await;
    add_user(
        &test,
        &t,
        Some("gone@acme.example"),
        None,
        UserStatus::Inactive,
        Some(PASSWORD),
    )
    .await;
    let causes = [
        (
            "unknown account",
            sign_in_request("no-such-account", "owner@acme.example", OWNER_PASSWORD),
        ),
        (
            "unknown user",
            sign_in_request(&t.slug, "nobody@acme.example", OWNER_PASSWORD),
        ),
        (
            "wrong password",
            sign_in_request(&t.slug, "owner@acme.example", "not the password"),
        ),
        (
            "invited user",
            sign_in_request(&t.slug, "invited@acme.example", PASSWORD),
        ),
        (
            "inactive user",
            sign_in_request(&t.slug, "gone@acme.example", PASSWORD),
        ),
        (
            "unparsable email",
            sign_in_request(&t.slug, "not an email", PASSWORD),
        ),
    ];
    // Similar timing (P7): every cause costs exactly one argon2id run (the
    // dummy hash's when there is no stored one), the same work as a wrong
    // password. Counted, not timed, so a busy host cannot make it flaky.
    let mut message = None;
    for _ in 0..3 {
        for (cause, sign_in) in &causes {
            let runs = test.state.passwords.runs();
            let err = test
                .api
                .sign_in(request(&anonymous(), sign_in.clone()))
                .await
                .expect_err(cause);
            assert_reason(&err, Code::Unauthenticated, "INVALID_CREDENTIALS");
            let first = message.get_or_insert_with(|| err.message().to_owned());
            assert_eq!(first, err.message(), "{cause}: same words");
            assert_eq!(
                test.state.passwords.runs() - runs,
                1,
                "{cause}: one argon2id run, like a wrong password"
            );
        }
    }
    test.stop().await;
}

#[tokio::test]
async fn auth_sign_in_refuses_missing_and_oversized_fields() {
    let test = TestIdentity::start(SystemClock::shared()).await;
    let cases = [
        (
            pb::SignInRequest {
                account_slug: "acme".into(),
                login: None,
                password: "x".into(),
            },
            "email",
        ),
        (sign_in_request("", "a@b.example", "x"), "account_slug"),
        (
            sign_in_request(&"a".repeat(64), "a@b.example", "x"),
            "account_slug",
        ),
        (sign_in_request("acme", "", "x"), "email"),
        (
            sign_in_request("acme", &format!("{}@b.example", "a".repeat(250)), "x"),
            "email",
        ),
        (sign_in_request("acme", "a@b.example", ""), "password"),
        (
            sign_in_request("acme", "a@b.example", &"p".repeat(129)),
            "password",
        ),
        (
            pb::SignInRequest {
                account_slug: "acme".into(),
                login: Some(pb::sign_in_request::Login::Username("u".repeat(65))),
                password: "x".into(),
            },
            "username",
        ),
    ];
    for (sign_in, field) in cases {
        let err = test
            .api
            .sign_in(request(&anonymous(), sign_in))
            .await
            .expect_err(field);
        assert_reason(&err, Code::InvalidArgument, "INVALID_ARGUMENT");
        assert_eq!(fields(&err), [field]);
    }
    test.stop().await;
}

#[tokio::test]
async fn auth_sign_in_is_throttled_per_account_and_login() {
    let test = TestIdentity::start(SystemClock::shared()).await;
    let t = tenant(&test).await;
    add_user(
        &test,
        &t,
        Some("other@acme.example"),
        None,
        UserStatus::Active,
        Some(PASSWORD),
    )
    .await;
    for _ in 0..10 {
        let err = sign_in(&test, &t.slug, "owner@acme.example", "guess")
            .await
            .expect_err("wrong");
        assert_reason(&err, Code::Unauthenticated, "INVALID_CREDENTIALS");
    }
    // Even the right password is refused now, with the delay to wait.
    let err = sign_in(&test, &t.slug, "Owner@Acme.example", OWNER_PASSWORD)
        .await
        .expect_err("throttled");
    assert_reason(&err, Code::ResourceExhausted, "RATE_LIMITED");
    use tonic_types::StatusExt;
    let delay = err
        .get_error_details()
        .retry_info()
        .and_then(|r| r.retry_delay)
        .expect("retry info");
    assert!((800..=900).contains(&delay.as_secs()), "{delay:?}");
    // One counter, namespaced and hashed (no email in key names).
    let mut conn = test.redis.connection();
    let keys = test
        .redis
        .scan_keys(&test.redis.key(&["rl", "signin", "*"]))
        .await
        .expect("keys");
    assert_eq!(keys.len(), 1);
    assert!(!keys[0].contains("owner"));
    let ttl: i64 = conn.pttl(&keys[0]).await.expect("pttl");
    assert!(ttl > 0 && ttl <= 900_000);
    // Another login of the account is not affected; its success clears
    // its own failures.
    for _ in 0..3 {
        sign_in(&test, &t.slug, "other@acme.example", "guess")
            .await
            .expect_err("wrong");
    }
    session_of(&test, &t.slug, "other@acme.example", PASSWORD).await;
    let keys = test
        .redis
        .scan_keys(&test.redis.key(&["rl", "signin", "*"]))
        .await
        .expect("keys");
    assert_eq!(keys.len(), 1, "the successful login's counter is gone");
    test.stop().await;
}

// -----------------------------------------------------------------------
// Sessions

#[tokio::test]
async fn auth_refresh_rotates_and_fails_generically() {
    let test = TestIdentity::start(SystemClock::shared()).await;
    let t = tenant(&test).await;
    let session = session_of(&test, &t.slug, "owner@acme.example", OWNER_PASSWORD).await;
    let refresh = |token: &str| {
        test.api.refresh_session(request(
            &anonymous(),
            pb::RefreshSessionRequest {
                refresh_token: token.into(),
            },
        ))
    };
    let rotated = refresh(&session.refresh_token)
        .await
        .expect("refreshed")
        .into_inner()
        .session
        .expect("session");
    assert_eq!(rotated.id, session.id);
    assert_ne!(rotated.refresh_token, session.refresh_token);
    assert_ne!(rotated.access_token, session.access_token);
    assert_eq!(
        rotated.expire_time, session.expire_time,
        "same absolute expiry"
    );
    assert!(works(&test, &rotated).await);
    let err = refresh(&session.refresh_token)
        .await
        .expect_err("already used");
    assert_reason(&err, Code::Unauthenticated, "UNAUTHENTICATED");
    let err = refresh("no-such-token").await.expect_err("unknown");
    assert_reason(&err, Code::Unauthenticated, "UNAUTHENTICATED");
    let err = refresh("").await.expect_err("empty");
    assert_eq!(fields(&err), ["refresh_token"]);
    let err = refresh(&"t".repeat(129)).await.expect_err("oversized");
    assert_eq!(fields(&err), ["refresh_token"]);
    test.stop().await;
}

#[tokio::test]
async fn auth_deactivated_or_deleted_users_lose_their_sessions() {
    let test = TestIdentity::start(SystemClock::shared()).await;
    let t = tenant(&test).await;
    let ann = add_user(
        &test,
        &t,
        Some("ann@acme.example"),
        None,
        UserStatus::Active,
        Some(PASSWORD),
    )
    .await;
    let bob = add_user(
        &test,
        &t,
        Some("bob@acme.example"),
        None,
        UserStatus::Active,
        Some(PASSWORD),
    )
    .await;
    let ann_session = session_of(&test, &t.slug, "ann@acme.example", PASSWORD).await;
    let bob_session = session_of(&test, &t.slug, "bob@acme.example", PASSWORD).await;
    assert!(
        test.state
            .sessions
            .resolve_access(&ann_session.access_token)
            .await
            .expect("resolve")
            .is_some()
    );

    UserService::deactivate_user(
        &test.api,
        request(
            &t.admin,
            pb::DeactivateUserRequest {
                user_id: ann.to_string(),
            },
        ),
    )
    .await
    .expect("deactivated");
    assert!(
        test.state
            .sessions
            .resolve_access(&ann_session.access_token)
            .await
            .expect("resolve")
            .is_none()
    );
    assert!(!works(&test, &ann_session).await);
    let err = test
        .api
        .refresh_session(request(
            &anonymous(),
            pb::RefreshSessionRequest {
                refresh_token: ann_session.refresh_token.clone(),
            },
        ))
        .await
        .expect_err("revoked");
    assert_reason(&err, Code::Unauthenticated, "UNAUTHENTICATED");
    let err = sign_in(&test, &t.slug, "ann@acme.example", PASSWORD)
        .await
        .expect_err("inactive");
    assert_reason(&err, Code::Unauthenticated, "INVALID_CREDENTIALS");

    UserService::delete_user(
        &test.api,
        request(
            &t.admin,
            pb::DeleteUserRequest {
                user_id: bob.to_string(),
            },
        ),
    )
    .await
    .expect("deleted");
    assert!(
        test.state
            .sessions
            .resolve_access(&bob_session.access_token)
            .await
            .expect("resolve")
            .is_none()
    );
    test.stop().await;
}

#[tokio::test]
async fn auth_refresh_refuses_a_user_no_longer_active() {
    let test = TestIdentity::start(SystemClock::shared()).await;
    let t = tenant(&test).await;
    let id = add_user(
        &test,
        &t,
        Some("cy@acme.example"),
        None,
        UserStatus::Active,
        Some(PASSWORD),
    )
    .await;
    let session = session_of(&test, &t.slug, "cy@acme.example", PASSWORD).await;
    // Deactivated behind the session store's back: the refresh still checks.
    let mut active = stored_user(&test, id).await.into_active_model();
    active.status = Set(UserStatus::Inactive);
    active.update(&test.state.db).await.expect("update");
    let err = test
        .api
        .refresh_session(request(
            &anonymous(),
            pb::RefreshSessionRequest {
                refresh_token: session.refresh_token.clone(),
            },
        ))
        .await
        .expect_err("inactive");
    assert_reason(&err, Code::Unauthenticated, "UNAUTHENTICATED");
    assert!(
        test.state
            .sessions
            .resolve_access(&session.access_token)
            .await
            .expect("resolve")
            .is_none(),
        "session revoked"
    );
    test.stop().await;
}

#[tokio::test]
async fn auth_sign_out_ends_one_or_every_session() {
    let test = TestIdentity::start(SystemClock::shared()).await;
    let t = tenant(&test).await;
    add_user(
        &test,
        &t,
        Some("dee@acme.example"),
        None,
        UserStatus::Active,
        Some(PASSWORD),
    )
    .await;
    let first = session_of(&test, &t.slug, "dee@acme.example", PASSWORD).await;
    let second = session_of(&test, &t.slug, "dee@acme.example", PASSWORD).await;
    let third = session_of(&test, &t.slug, "dee@acme.example", PASSWORD).await;
    let caller = principal_of(&test, &first.access_token)
        .await
        .expect("principal");
    let out = test
        .api
        .sign_out(request(
            &caller,
            pb::SignOutRequest {
                all_sessions: false,
            },
        ))
        .await
        .expect("out")
        .into_inner();
    assert_eq!(out.revoked_sessions, 1);
    assert!(!works(&test, &first).await);
    assert!(works(&test, &second).await && works(&test, &third).await);
    let caller = principal_of(&test, &second.access_token)
        .await
        .expect("principal");
    let out = test
        .api
        .sign_out(request(&caller, pb::SignOutRequest { all_sessions: true }))
        .await
        .expect("out")
        .into_inner();
    assert_eq!(out.revoked_sessions, 2);
    assert!(!works(&test, &second).await && !works(&test, &third).await);

    let key = Principal {
        kind: PrincipalKind::ApiKey,
        user_id: None,
        ..t.admin.clone()
    };
    let err = test
        .api
        .sign_out(request(&key, pb::SignOutRequest { all_sessions: true }))
        .await
        .expect_err("api key");
    assert_reason(&err, Code::PermissionDenied, "PERMISSION_DENIED");
    test.stop().await;
}

// -----------------------------------------------------------------------
// The caller's profile

#[tokio::test]
async fn auth_get_and_update_the_current_user() {
    let test = TestIdentity::start(SystemClock::shared()).await;
    let t = tenant(&test).await;
    let id = add_user(
        &test,
        &t,
        Some("eve@acme.example"),
        None,
        UserStatus::Active,
        Some(PASSWORD),
    )
    .await;
    let session = session_of(&test, &t.slug, "eve@acme.example", PASSWORD).await;
    let eve = principal_of(&test, &session.access_token)
        .await
        .expect("principal");
    let me = test
        .api
        .get_current_user(request(&eve, pb::GetCurrentUserRequest {}))
        .await
        .expect("me")
        .into_inner();
    assert_eq!(me.user.expect("user").email, "eve@acme.example");
    assert_eq!(me.account.expect("account").slug, t.slug);
    assert_eq!(me.permissions, ["users.read"]);
    assert_eq!(me.session_id, session.id);
    assert!(me.session_expire_time.is_some());
    assert_eq!(
        me.session_expire_time, session.expire_time,
        "the absolute end"
    );
    assert!(me.api_key_id.is_empty());
    assert_eq!(me.password_policy.expect("policy").min_length, 8);

    let update = |principal: Principal, name: &str, locale: &str, paths: &[&str]| {
        let message = pb::UpdateCurrentUserRequest {
            display_name: name.into(),
            locale: locale.into(),
            update_mask: Some(FieldMask {
                paths: paths.iter().map(|p| (*p).to_owned()).collect(),
            }),
        };
        test.api.update_current_user(request(&principal, message))
    };
    let updated = update(eve.clone(), "  Eve Example ", "fr", &["display_name"])
        .await
        .expect("updated")
        .into_inner();
    let user = updated.user.expect("user");
    assert_eq!(
        (user.display_name.as_str(), user.locale.as_str()),
        ("Eve Example", ""),
        "only the masked field"
    );
    let user = update(eve.clone(), "", "FR", &["locale"])
        .await
        .expect("updated")
        .into_inner()
        .user
        .expect("user");
    assert_eq!(
        (user.display_name.as_str(), user.locale.as_str()),
        ("Eve Example", "fr")
    );
    assert_eq!(
        stored_user(&test, id).await.search_text,
        "eve example eve@acme.example"
    );
    let updates: Vec<events::UserUpdated> = events_of(&test, "user.updated").await;
    assert_eq!(updates.len(), 2);
    assert_eq!(
        updates[0].changed_fields.as_ref().expect("mask").paths,
        ["display_name"]
    );
    assert_eq!(updates[0].display_name, "Eve Example");
    assert_eq!(
        audit_actions(&test, id)
            .await
            .iter()
            .filter(|a| *a == "user.updated")
            .count(),
        2
    );

    for (name, locale, paths, field) in [
        ("x", "", &["role_id"][..], "update_mask.paths[0]"),
        ("x", "", &[][..], "update_mask"),
        ("x", "de", &["locale"][..], "locale"),
        (" ", "", &["display_name"][..], "display_name"),
    ] {
        let err = update(eve.clone(), name, locale, paths)
            .await
            .expect_err(field);
        assert_eq!(fields(&err), [field]);
    }

    // Must choose a new password first: reading works, editing does not.
    let mut active = stored_user(&test, id).await.into_active_model();
    active.password_change_required = Set(true);
    active.update(&test.state.db).await.expect("update");
    test.api
        .get_current_user(request(&eve, pb::GetCurrentUserRequest {}))
        .await
        .expect("me");
    let err = update(eve.clone(), "Eve", "", &["display_name"])
        .await
        .expect_err("must change password");
    assert_reason(&err, Code::FailedPrecondition, "PASSWORD_CHANGE_REQUIRED");

    // API keys have no profile to edit.
    let created = test
        .api
        .create_api_key(request(
            &t.admin,
            pb::CreateApiKeyRequest {
                name: "reader".into(),
                permissions: vec!["users.read".into()],
                ..Default::default()
            },
        ))
        .await
        .expect("key")
        .into_inner();
    let key = api_keys::resolve_api_key(&test.state, &created.secret)
        .await
        .expect("resolve")
        .expect("key principal");
    let me = test
        .api
        .get_current_user(request(&key, pb::GetCurrentUserRequest {}))
        .await
        .expect("me")
        .into_inner();
    assert_eq!(me.api_key_id, created.api_key.expect("key").id);
    assert!(me.user.is_none() && me.session_id.is_empty());
    assert_eq!(me.permissions, ["users.read"]);
    let err = update(key, "Bot", "", &["display_name"])
        .await
        .expect_err("api key");
    assert_reason(&err, Code::PermissionDenied, "PERMISSION_DENIED");
    test.stop().await;
}

// -----------------------------------------------------------------------
// Passwords

#[tokio::test]
async fn auth_change_password_revokes_other_sessions_and_notifies() {
    let test = TestIdentity::start(SystemClock::shared()).await;
    let t = tenant(&test).await;
    let id = add_user(
        &test,
        &t,
        Some("Fay@Acme.example"),
        None,
        UserStatus::Active,
        Some(PASSWORD),
    )
    .await;
    let mut active = stored_user(&test, id).await.into_active_model();
    active.password_change_required = Set(true);
    active.update(&test.state.db).await.expect("update");
    let first = session_of(&test, &t.slug, "fay@acme.example", PASSWORD).await;
    assert!(first.password_change_required);
    let second = session_of(&test, &t.slug, "fay@acme.example", PASSWORD).await;
    let fay = principal_of(&test, &first.access_token)
        .await
        .expect("principal");
    let change = |current: &str, new: &str| {
        test.api.change_password(request(
            &fay,
            pb::ChangePasswordRequest {
                current_password: current.into(),
                new_password: new.into(),
            },
        ))
    };

    let err = change("wrong password", "a brand new secret")
        .await
        .expect_err("wrong current");
    assert_reason(&err, Code::Unauthenticated, "INVALID_CREDENTIALS");
    let err = change(PASSWORD, PASSWORD).await.expect_err("same");
    assert_eq!(fields(&err), ["new_password"]);
    let err = change(PASSWORD, "short").await.expect_err("policy");
    assert_eq!(fields(&err), ["new_password"]);
    let err = change("", "a brand new secret").await.expect_err("missing");
    assert_eq!(fields(&err), ["current_password"]);

    let changed = change(PASSWORD, "a brand new secret")
        .await
        .expect("changed")
        .into_inner()
        .session
        .expect("session");
    assert!(!changed.password_change_required);
    assert!(
        works(&test, &changed).await,
        "the caller's new session works"
    );
    assert!(
        !works(&test, &first).await && !works(&test, &second).await,
        "every earlier session ended"
    );
    let stored = stored_user(&test, id).await;
    assert!(!stored.password_change_required);
    assert!(
        stored
            .password_hash
            .as_deref()
            .expect("hash")
            .starts_with(PHC_PREFIX)
    );
    let snapshot = test
        .state
        .sessions
        .get_principal(id)
        .await
        .expect("get")
        .expect("snapshot");
    assert!(!snapshot.password_change_required);
    sign_in(&test, &t.slug, "fay@acme.example", PASSWORD)
        .await
        .expect_err("old password");
    session_of(&test, &t.slug, "fay@acme.example", "a brand new secret").await;

    let jobs = jobs_to(
        &test,
        notification::EmailTemplate::PasswordChanged,
        "fay@acme.example",
    )
    .await;
    assert_eq!(jobs.len(), 1, "P24: the user is told");
    assert!(jobs[0].sealed_link.is_empty() && jobs[0].seal_key_id.is_empty());
    assert!(
        jobs[0]
            .variables
            .as_ref()
            .expect("variables")
            .event_time
            .is_some()
    );
    let changes: Vec<events::PasswordChanged> = events_of(&test, "user.password_changed").await;
    assert_eq!(changes.len(), 1);
    assert_eq!(
        changes[0].method,
        events::PasswordChangeMethod::Change as i32
    );
    assert_eq!(
        changes[0].actor.as_ref().expect("actor").kind,
        pb::ActorKind::User as i32
    );
    assert!(
        audit_actions(&test, id)
            .await
            .contains(&"user.password_changed".to_owned())
    );

    let key = Principal {
        kind: PrincipalKind::ApiKey,
        user_id: None,
        ..t.admin.clone()
    };
    let err = test
        .api
        .change_password(request(
            &key,
            pb::ChangePasswordRequest {
                current_password: "x".into(),
                new_password: "y".repeat(9),
            },
        ))
        .await
        .expect_err("api key");
    assert_reason(&err, Code::PermissionDenied, "PERMISSION_DENIED");
    test.stop().await;
}

#[tokio::test]
async fn auth_reset_request_queues_a_sealed_link_and_stores_no_token() {
    let test = TestIdentity::start(SystemClock::shared()).await;
    let t = tenant(&test).await;
    let gus = add_user(
        &test,
        &t,
        Some("Gus@Acme.example"),
        None,
        UserStatus::Active,
        Some(PASSWORD),
    )
    .await;
    add_user(
        &test,
        &t,
        Some("off@acme.example"),
        None,
        UserStatus::Inactive,
        Some(PASSWORD),
    )
    .await;
    add_user(
        &test,
        &t,
        Some("new@acme.example"),
        None,
        UserStatus::Invited,
        None,
    )
    .await;

    // The same empty answer, and nothing sent, for every unknown or unusable address.
    for (slug, email) in [
        ("no-such-account", "gus@acme.example"),
        (t.slug.as_str(), "nobody@acme.example"),
        (t.slug.as_str(), "off@acme.example"),
        (t.slug.as_str(), "new@acme.example"),
        (t.slug.as_str(), "not an email"),
    ] {
        request_reset(&test, slug, email)
            .await
            .expect("same answer");
    }
    assert!(email_jobs(&test).await.is_empty());
    assert!(
        password_reset::Entity::find()
            .all(&test.state.db)
            .await
            .expect("rows")
            .is_empty()
    );

    let now = test.state.clock.now();
    request_reset(&test, &t.slug, " GUS@acme.EXAMPLE")
        .await
        .expect("requested");
    let jobs = email_jobs(&test).await;
    assert_eq!(jobs.len(), 1);
    let (envelope, job) = &jobs[0];
    assert_eq!(envelope["exchange"], "usher.email");
    assert_eq!(envelope["routing_key"], "email.send");
    assert_eq!(envelope["content_type"], "application/protobuf");
    assert_eq!(envelope["kind"], "usher.notification.v1.EmailJob");
    assert_eq!(envelope["message_id"], job.job_id.as_str());
    assert_eq!(envelope["mandatory"], true);
    assert_eq!(
        job.template,
        notification::EmailTemplate::PasswordReset as i32
    );
    assert_eq!(job.source, notification::EmailSource::Identity as i32);
    assert_eq!(job.recipient_email, "gus@acme.example");
    assert_eq!(
        (job.user_id.clone(), job.account_id.clone()),
        (gus.to_string(), t.account_id.to_string())
    );
    assert_eq!(job.seal_key_id, test.state.sealer.key_id());
    assert_eq!(job.account_default_locale, "en");
    let variables = job.variables.clone().expect("variables");
    assert_eq!(variables.account_name, "Acme");
    let expires = variables.expire_time.expect("expiry").seconds;
    assert!(
        (expires - now.timestamp() - 3600).abs() <= 5,
        "valid for the reset lifetime"
    );

    let token = token_in(&test, job);
    assert_eq!(token.len(), 43, "256 bits, base64url");
    let rows = password_reset::Entity::find()
        .all(&test.state.db)
        .await
        .expect("rows");
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0].token_hash,
        test.state.tokens.hash(TokenPurpose::PasswordReset, &token)
    );
    assert_eq!((rows[0].user_id, rows[0].use_time), (gus, None));
    assert!(
        audit_actions(&test, gus)
            .await
            .contains(&"user.password_reset_requested".to_owned())
    );
    assert_stored_nowhere(&test, &token).await;

    // A new request ends the older link at once.
    let newer = reset_token(&test, &t.slug, "gus@acme.example").await;
    assert_ne!(newer, token);
    let err = reset(&test, &token, "the newest secret")
        .await
        .expect_err("superseded");
    assert_reason(&err, Code::FailedPrecondition, "RESET_TOKEN_NOT_USABLE");
    reset(&test, &newer, "the newest secret")
        .await
        .expect("newest link works");
    assert_stored_nowhere(&test, &newer).await;

    for (slug, email, field) in [
        ("", "gus@acme.example", "account_slug"),
        (t.slug.as_str(), "", "email"),
        (t.slug.as_str(), &"g".repeat(255), "email"),
    ] {
        let err = request_reset(&test, slug, email).await.expect_err(field);
        assert_eq!(fields(&err), [field]);
    }
    test.stop().await;
}

#[tokio::test]
async fn auth_reset_requests_are_throttled_per_account_and_email() {
    let test = TestIdentity::start(SystemClock::shared()).await;
    let t = tenant(&test).await;
    for _ in 0..5 {
        request_reset(&test, &t.slug, "nobody@acme.example")
            .await
            .expect("answered");
    }
    let err = request_reset(&test, &t.slug, "Nobody@Acme.example")
        .await
        .expect_err("throttled");
    assert_reason(&err, Code::ResourceExhausted, "RATE_LIMITED");
    request_reset(&test, &t.slug, "owner@acme.example")
        .await
        .expect("another email");
    test.stop().await;
}

#[tokio::test]
async fn auth_reset_password_consumes_the_link_once() {
    let test = TestIdentity::start(SystemClock::shared()).await;
    let t = tenant(&test).await;
    let hal = add_user(
        &test,
        &t,
        Some("hal@acme.example"),
        None,
        UserStatus::Active,
        Some(PASSWORD),
    )
    .await;
    let old_session = session_of(&test, &t.slug, "hal@acme.example", PASSWORD).await;
    let mut active = stored_user(&test, hal).await.into_active_model();
    active.password_change_required = Set(true);
    active.update(&test.state.db).await.expect("update");
    let token = reset_token(&test, &t.slug, "hal@acme.example").await;

    // A bad password is refused before the link is touched.
    let err = reset(&test, &token, "short").await.expect_err("policy");
    assert_eq!(fields(&err), ["new_password"]);
    for (bad, field) in [("", "token"), (&*"t".repeat(129), "token")] {
        let err = reset(&test, bad, "a fine new secret")
            .await
            .expect_err(field);
        assert_eq!(fields(&err), [field]);
    }
    let err = reset(&test, "not-a-real-token", "a fine new secret")
        .await
        .expect_err("unknown");
    assert_reason(&err, Code::FailedPrecondition, "RESET_TOKEN_NOT_USABLE");

    let done = reset(&test, &token, "a fine new secret")
        .await
        .expect("reset");
    let session = done.session.expect("session");
    assert_eq!(done.user.expect("user").id, hal.to_string());
    assert!(works(&test, &session).await);
    assert!(
        !works(&test, &old_session).await,
        "every earlier session ended"
    );
    assert!(!stored_user(&test, hal).await.password_change_required);
    let err = reset(&test, &token, "another new secret")
        .await
        .expect_err("used");
    assert_reason(&err, Code::FailedPrecondition, "RESET_TOKEN_NOT_USABLE");
    sign_in(&test, &t.slug, "hal@acme.example", PASSWORD)
        .await
        .expect_err("old password");
    session_of(&test, &t.slug, "hal@acme.example", "a fine new secret").await;

    assert_eq!(
        jobs_to(
            &test,
            notification::EmailTemplate::PasswordChanged,
            "hal@acme.example"
        )
        .await
        .len(),
        1
    );
    let changes: Vec<events::PasswordChanged> = events_of(&test, "user.password_changed").await;
    assert_eq!(changes.len(), 1);
    assert_eq!(
        changes[0].method,
        events::PasswordChangeMethod::Reset as i32
    );
    let actor = changes[0].actor.clone().expect("actor");
    assert_eq!(
        (actor.kind, actor.id),
        (pb::ActorKind::Anonymous as i32, hal.to_string())
    );

    // A link of a user deactivated since it was sent does not work.
    let ivy = add_user(
        &test,
        &t,
        Some("ivy@acme.example"),
        None,
        UserStatus::Active,
        Some(PASSWORD),
    )
    .await;
    let token = reset_token(&test, &t.slug, "ivy@acme.example").await;
    UserService::deactivate_user(
        &test.api,
        request(
            &t.admin,
            pb::DeactivateUserRequest {
                user_id: ivy.to_string(),
            },
        ),
    )
    .await
    .expect("deactivated");
    let err = reset(&test, &token, "a fine new secret")
        .await
        .expect_err("inactive");
    assert_reason(&err, Code::FailedPrecondition, "RESET_TOKEN_NOT_USABLE");
    test.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auth_sixteen_concurrent_resets_have_exactly_one_winner() {
    let test = TestIdentity::start(SystemClock::shared()).await;
    let t = tenant(&test).await;
    let jo = add_user(
        &test,
        &t,
        Some("jo@acme.example"),
        None,
        UserStatus::Active,
        Some(PASSWORD),
    )
    .await;
    let token = reset_token(&test, &t.slug, "jo@acme.example").await;
    let passwords: Vec<String> = (0..16)
        .map(|i| format!("racing password number {i}"))
        .collect();
    let barrier = Arc::new(tokio::sync::Barrier::new(passwords.len()));
    let tasks: Vec<_> = passwords
        .iter()
        .map(|password| {
            let (api, token, password, barrier) = (
                test.api.clone(),
                token.clone(),
                password.clone(),
                barrier.clone(),
            );
            tokio::spawn(async move {
                barrier.wait().await;
                api.reset_password(request(
                    &anonymous(),
                    pb::ResetPasswordRequest {
                        token,
                        new_password: password,
                    },
                ))
                .await
                .map(|_| ())
            })
        })
        .collect();
    let mut winners = Vec::new();
    for (task, password) in tasks.into_iter().zip(&passwords) {
        match task.await.expect("task") {
            Ok(()) => winners.push(password.clone()),
            Err(err) => assert_reason(&err, Code::FailedPrecondition, "RESET_TOKEN_NOT_USABLE"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one reset wins");
    let hash = stored_user(&test, jo).await.password_hash.expect("hash");
    for password in &passwords {
        let verifies = test
            .state
            .passwords
            .verify(password.clone(), &hash)
            .await
            .expect("verify");
        assert_eq!(
            verifies,
            *password == winners[0],
            "only the winner's password verifies"
        );
    }
    assert_eq!(
        events_of::<events::PasswordChanged>(&test, "user.password_changed")
            .await
            .len(),
        1
    );
    test.stop().await;
}

#[tokio::test]
async fn auth_created_user_without_password_gets_a_single_use_set_password_link() {
    let test = TestIdentity::start(SystemClock::shared()).await;
    let t = tenant(&test).await;
    let now = test.state.clock.now();
    let nina = create_without_password(&test, &t, "nina", "Nina@Acme.example", "fr").await;
    let nina_id: Uuid = nina.id.parse().expect("uuid");

    // One SET_PASSWORD email to her, in her locale, its link sealed.
    let jobs = jobs_to(
        &test,
        notification::EmailTemplate::SetPassword,
        "nina@acme.example",
    )
    .await;
    assert_eq!(jobs.len(), 1, "one set-password email");
    let job = &jobs[0];
    assert_eq!(job.source, notification::EmailSource::Identity as i32);
    assert_eq!(job.user_id, nina_id.to_string());
    assert_eq!(job.account_id, t.account_id.to_string());
    assert_eq!(job.locale, "fr");
    assert_eq!(job.seal_key_id, test.state.sealer.key_id());
    let expires = job
        .variables
        .clone()
        .expect("variables")
        .expire_time
        .expect("expiry")
        .seconds;
    let lifetime = test.state.settings.reset_token_lifetime.num_seconds();
    assert!(
        (expires - now.timestamp() - lifetime).abs() <= 5,
        "{expires}"
    );
    let (token, locale) = link_parts(&test, job, "/set-password");
    assert_eq!(locale, "fr", "the page opens in her locale");
    assert_eq!(token.len(), 43);
    assert_stored_nowhere(&test, &token).await;
    assert!(
        jobs_to(
            &test,
            notification::EmailTemplate::PasswordReset,
            "nina@acme.example"
        )
        .await
        .is_empty()
    );

    // Until she chooses a password, sign-in answers the generic failure.
    for password in [PASSWORD, "", "x"] {
        let err = sign_in(&test, &t.slug, "nina@acme.example", password)
            .await
            .expect_err("no password yet");
        if password.is_empty() {
            assert_eq!(err.code(), Code::InvalidArgument);
        } else {
            assert_reason(&err, Code::Unauthenticated, "INVALID_CREDENTIALS");
        }
    }
    // The link is not a reset link (P5), and a password breaking the
    // policy is refused before the link is consumed.
    let err = reset(&test, &token, PASSWORD)
        .await
        .expect_err("not a reset token");
    assert_reason(&err, Code::FailedPrecondition, "RESET_TOKEN_NOT_USABLE");
    let err = set_password(&test, &token, "short")
        .await
        .expect_err("policy");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(fields(&err), ["new_password"]);

    // The link sets the password and signs her in.
    let done = set_password(&test, &token, PASSWORD)
        .await
        .expect("password set");
    assert_eq!(done.user.expect("user").id, nina_id.to_string());
    assert!(works(&test, &done.session.expect("session")).await);
    assert!(
        stored_user(&test, nina_id)
            .await
            .password_hash
            .is_some_and(|h| h.starts_with(PHC_PREFIX))
    );
    // Once.
    let err = set_password(&test, &token, "another long secret")
        .await
        .expect_err("used");
    assert_reason(&err, Code::FailedPrecondition, "RESET_TOKEN_NOT_USABLE");
    session_of(&test, &t.slug, "nina@acme.example", PASSWORD).await;

    // P24: she is told, the event says how, the audit log has it.
    assert_eq!(
        jobs_to(
            &test,
            notification::EmailTemplate::PasswordChanged,
            "nina@acme.example"
        )
        .await
        .len(),
        1
    );
    let changed: Vec<events::PasswordChanged> = events_of(&test, "user.password_changed").await;
    assert_eq!(changed.len(), 1);
    assert_eq!(
        changed[0].method,
        events::PasswordChangeMethod::SetLink as i32
    );
    let actions = audit_actions(&test, nina_id).await;
    assert!(actions.contains(&"user.created".to_owned()), "{actions:?}");
    assert!(
        actions.contains(&"user.password_changed".to_owned()),
        "{actions:?}"
    );

    // A user created with a password, or without an email, gets no link.
    let role_id = user_role(&test, &t).await;
    for (username, email, password) in [
        ("kiosk", "", PASSWORD),
        ("omar", "omar@acme.example", PASSWORD),
    ] {
        test.api
            .create_user(request(
                &t.admin,
                pb::CreateUserRequest {
                    username: username.into(),
                    email: email.into(),
                    display_name: "Someone".into(),
                    password: password.into(),
                    role_id: role_id.to_string(),
                    ..Default::default()
                },
            ))
            .await
            .expect("created");
    }
    let set_links = email_jobs(&test)
        .await
        .into_iter()
        .filter(|(_, job)| job.template == notification::EmailTemplate::SetPassword as i32)
        .count();
    assert_eq!(set_links, 1);
    test.stop().await;
}

#[tokio::test]
async fn auth_set_password_links_expire_with_the_reset_lifetime_and_yield_to_resets() {
    let start = DateTime::from_timestamp(1_780_000_000, 0).expect("time");
    let clock = ManualClock::new(start);
    let test = TestIdentity::start(clock.clone()).await;
    let t = tenant(&test).await;
    let lifetime = test.state.settings.reset_token_lifetime;
    let link = |email: &'static str| {
        let test = &test;
        async move {
            let jobs = jobs_to(test, notification::EmailTemplate::SetPassword, email).await;
            link_parts(
                test,
                jobs.last().expect("a set-password email"),
                "/set-password",
            )
        }
    };

    // No locale on the user: the account's default goes into the link.
    create_without_password(&test, &t, "early", "early@acme.example", "").await;
    let (token, locale) = link("early@acme.example").await;
    assert_eq!(locale, "en");
    clock.advance(lifetime - Duration::seconds(1));
    set_password(&test, &token, PASSWORD)
        .await
        .expect("lifetime - 1 s works");

    create_without_password(&test, &t, "late", "late@acme.example", "").await;
    let (token, _) = link("late@acme.example").await;
    clock.advance(lifetime + Duration::seconds(1));
    let err = set_password(&test, &token, PASSWORD)
        .await
        .expect_err("lifetime + 1 s fails");
    assert_reason(&err, Code::FailedPrecondition, "RESET_TOKEN_NOT_USABLE");
    let err = sign_in(&test, &t.slug, "late@acme.example", PASSWORD)
        .await
        .expect_err("still no password");
    assert_reason(&err, Code::Unauthenticated, "INVALID_CREDENTIALS");

    // An expired link's user asks for a reset: that sets the password,
    // and a reset link replaces a pending set-password link.
    let reset_link = reset_token(&test, &t.slug, "late@acme.example").await;
    reset(&test, &reset_link, PASSWORD).await.expect("reset");
    session_of(&test, &t.slug, "late@acme.example", PASSWORD).await;

    create_without_password(&test, &t, "both", "both@acme.example", "fr").await;
    let (token, _) = link("both@acme.example").await;
    let reset_link = reset_token(&test, &t.slug, "both@acme.example").await;
    let err = set_password(&test, &token, PASSWORD)
        .await
        .expect_err("replaced by the reset link");
    assert_reason(&err, Code::FailedPrecondition, "RESET_TOKEN_NOT_USABLE");
    reset(&test, &reset_link, PASSWORD).await.expect("reset");
    test.stop().await;
}

#[tokio::test]
async fn auth_reset_links_work_until_their_lifetime_and_not_after() {
    let start = DateTime::from_timestamp(1_780_000_000, 0).expect("time");
    let clock = ManualClock::new(start);
    let test = TestIdentity::start(clock.clone()).await;
    let t = tenant(&test).await;
    add_user(
        &test,
        &t,
        Some("kim@acme.example"),
        None,
        UserStatus::Active,
        Some(PASSWORD),
    )
    .await;
    let lifetime = test.state.settings.reset_token_lifetime;

    let token = reset_token(&test, &t.slug, "kim@acme.example").await;
    clock.advance(lifetime - Duration::seconds(1));
    reset(&test, &token, "in time secret")
        .await
        .expect("lifetime - 1 s works");

    let token = reset_token(&test, &t.slug, "kim@acme.example").await;
    clock.advance(lifetime + Duration::seconds(1));
    let err = reset(&test, &token, "too late secret")
        .await
        .expect_err("lifetime + 1 s fails");
    assert_reason(&err, Code::FailedPrecondition, "RESET_TOKEN_NOT_USABLE");
    session_of(&test, &t.slug, "kim@acme.example", "in time secret").await;
    test.stop().await;
}

#[tokio::test]
async fn auth_admins_send_password_resets_to_active_users_of_their_account() {
    let test = TestIdentity::start(SystemClock::shared()).await;
    let t = tenant(&test).await;
    let other = tenant(&test).await;
    let lee = add_user(
        &test,
        &t,
        Some("Lee@Acme.example"),
        None,
        UserStatus::Active,
        Some(PASSWORD),
    )
    .await;
    let off = add_user(
        &test,
        &t,
        Some("off@acme.example"),
        None,
        UserStatus::Inactive,
        Some(PASSWORD),
    )
    .await;
    let kiosk = add_user(
        &test,
        &t,
        None,
        Some("kiosk"),
        UserStatus::Active,
        Some(PASSWORD),
    )
    .await;
    let stranger = add_user(
        &test,
        &other,
        Some("x@other.example"),
        None,
        UserStatus::Active,
        Some(PASSWORD),
    )
    .await;
    let admin = Call {
        principal: t.admin.clone(),
        request_id: "req-1".into(),
    };

    let sent = test
        .api
        .send_password_reset(&admin, lee)
        .await
        .expect("sent");
    assert_eq!(sent.email, "lee@acme.example");
    let jobs = jobs_to(
        &test,
        notification::EmailTemplate::PasswordReset,
        "lee@acme.example",
    )
    .await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].request_id, "req-1");
    let token = token_in(&test, &jobs[0]);
    assert!(
        audit_actions(&test, lee)
            .await
            .contains(&"user.password_reset_sent".to_owned())
    );
    reset(&test, &token, "chosen by lee")
        .await
        .expect("the link works");

    for (user, code, expected) in [
        (off, Code::FailedPrecondition, "INVALID_STATE"),
        (kiosk, Code::FailedPrecondition, "INVALID_STATE"),
        (stranger, Code::NotFound, "NOT_FOUND"),
        (Uuid::new_v4(), Code::NotFound, "NOT_FOUND"),
    ] {
        let err = test
            .api
            .send_password_reset(&admin, user)
            .await
            .expect_err(expected);
        assert_reason(&Status::from(err), code, expected);
    }
    for _ in 0..4 {
        test.api
            .send_password_reset(&admin, lee)
            .await
            .expect("sent");
    }
    let err = test
        .api
        .send_password_reset(&admin, lee)
        .await
        .expect_err("throttled");
    assert_reason(&Status::from(err), Code::ResourceExhausted, "RATE_LIMITED");
    test.stop().await;
}

// -----------------------------------------------------------------------
// API keys

fn key_request(name: &str, permissions: &[&str]) -> pb::CreateApiKeyRequest {
    pb::CreateApiKeyRequest {
        name: name.into(),
        permissions: permissions.iter().map(|p| (*p).to_owned()).collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn auth_api_keys_are_created_once_resolved_and_never_stored_in_clear() {
    let test = TestIdentity::start(SystemClock::shared()).await;
    let t = tenant(&test).await;
    let created = test
        .api
        .create_api_key(request(
            &t.admin,
            key_request("ci", &["users.read", "audit.read", "users.read"]),
        ))
        .await
        .expect("created")
        .into_inner();
    let key = created.api_key.expect("key");
    assert!(
        created.secret.starts_with("usk_") && created.secret.len() == 47,
        "prefix and 256 bits"
    );
    assert_eq!(key.secret_prefix, created.secret[..8]);
    assert_eq!(key.permissions, ["audit.read", "users.read"]);
    assert_eq!(key.creator_user_id, t.owner_id.to_string());
    let stored = api_key::Entity::find_by_id(key.id.parse::<Uuid>().expect("uuid"))
        .one(&test.state.db)
        .await
        .expect("query")
        .expect("row");
    assert_eq!(
        stored.secret_hash,
        test.state
            .tokens
            .hash(TokenPurpose::ApiKey, &created.secret)
    );
    assert_stored_nowhere(&test, &created.secret).await;
    let events: Vec<events::ApiKeyCreated> = events_of(&test, "api_key.created").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].permissions, ["audit.read", "users.read"]);

    let principal = api_keys::resolve_api_key(&test.state, &created.secret)
        .await
        .expect("resolve")
        .expect("principal");
    assert_eq!(principal.kind, PrincipalKind::ApiKey);
    assert_eq!(
        (principal.account_id, principal.user_id),
        (Some(t.account_id), None)
    );
    assert_eq!(principal.credential_id.as_deref(), Some(key.id.as_str()));
    assert_eq!(principal.permissions, ["audit.read", "users.read"]);
    let used = api_key::Entity::find_by_id(stored.id)
        .one(&test.state.db)
        .await
        .expect("query")
        .expect("row");
    assert!(used.last_use_time.is_some());
    for wrong in [
        "usk_nope",
        "not-a-key",
        &created.secret[..46],
        &format!("{}x", created.secret),
    ] {
        assert_eq!(
            api_keys::resolve_api_key(&test.state, wrong)
                .await
                .expect("resolve"),
            None
        );
    }

    // The request's own mistakes.
    let cases = [
        (
            key_request("ci", &["users.read"]),
            Code::AlreadyExists,
            "ALREADY_EXISTS",
        ),
        (
            key_request("other", &["users.fly"]),
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        ),
        (
            key_request("other", &[]),
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        ),
        (
            key_request(" ", &["users.read"]),
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        ),
        (
            pb::CreateApiKeyRequest {
                expire_time: Some(convert::timestamp(
                    test.state.clock.now() - Duration::seconds(1),
                )),
                ..key_request("other", &["users.read"])
            },
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        ),
    ];
    for (create, code, expected) in cases {
        let err = test
            .api
            .create_api_key(request(&t.admin, create.clone()))
            .await
            .expect_err(expected);
        assert_reason(&err, code, expected);
    }
    let err = test
        .api
        .create_api_key(request(&t.admin, key_request("x", &["users.fly"])))
        .await
        .expect_err("unknown");
    assert_eq!(fields(&err), ["permissions[0]"]);

    // No escalation: a member holding account.manage but not users.manage.
    let manager = member(t.account_id, t.owner_id, &["account.manage", "users.read"]);
    let err = test
        .api
        .create_api_key(request(
            &manager,
            key_request("sneaky", &["users.read", "users.manage"]),
        ))
        .await
        .expect_err("escalation");
    assert_reason(&err, Code::PermissionDenied, "PERMISSION_DENIED");
    test.api
        .create_api_key(request(&manager, key_request("fine", &["users.read"])))
        .await
        .expect("subset");

    // Platform keys (made by operators) resolve to PLATFORM principals.
    let secret = Token::generate_with_prefix(API_KEY_PREFIX);
    api_key::ActiveModel {
        id: Set(Uuid::now_v7()),
        account_id: Set(None),
        name: Set("operator".into()),
        secret_hash: Set(test
            .state
            .tokens
            .hash(TokenPurpose::ApiKey, secret.as_str())),
        secret_prefix: Set(api_keys::secret_prefix(secret.as_str())),
        permissions: Set(convert::json_strings(Vec::<String>::new())),
        platform: Set(true),
        creator_user_id: Set(None),
        create_time: Set(test.state.clock.now()),
        expire_time: Set(None),
        last_use_time: Set(None),
        revoke_time: Set(None),
    }
    .insert(&test.state.db)
    .await
    .expect("platform key");
    let platform_principal = api_keys::resolve_api_key(&test.state, secret.as_str())
        .await
        .expect("resolve")
        .expect("principal");
    assert_eq!(
        (platform_principal.kind, platform_principal.account_id),
        (PrincipalKind::Platform, None)
    );
    test.stop().await;
}

/// The gateway's view of a secret: the snapshot identity wrote.
async fn gateway_view(test: &TestIdentity, secret: &str) -> Option<Principal> {
    test.state
        .sessions
        .get_api_key(secret)
        .await
        .expect("store")
}

#[tokio::test]
async fn auth_api_key_snapshot_is_written_on_create_and_gone_on_revoke() {
    let test = TestIdentity::start(SystemClock::shared()).await;
    let t = tenant(&test).await;
    let created = test
        .api
        .create_api_key(request(
            &t.admin,
            key_request("gateway", &["users.read", "audit.read"]),
        ))
        .await
        .expect("created")
        .into_inner();
    let key = created.api_key.expect("key");
    let principal = gateway_view(&test, &created.secret)
        .await
        .expect("snapshot written before the answer");
    assert_eq!(principal.kind, PrincipalKind::ApiKey);
    assert_eq!(
        (principal.account_id, principal.user_id),
        (Some(t.account_id), None)
    );
    assert_eq!(principal.credential_id.as_deref(), Some(key.id.as_str()));
    assert_eq!(principal.permissions, ["audit.read", "users.read"]);
    // The store holds the hash, never the secret (P1).
    assert_stored_nowhere(&test, &created.secret).await;

    // An idempotent replay leaves it in place.
    let replayed = pb::CreateApiKeyRequest {
        request_id: "gateway-2".into(),
        ..key_request("replayed", &["users.read"])
    };
    let first = test
        .api
        .create_api_key(request(&t.admin, replayed.clone()))
        .await
        .expect("created")
        .into_inner();
    let again = test
        .api
        .create_api_key(request(&t.admin, replayed))
        .await
        .expect("replayed")
        .into_inner();
    assert_eq!(again.secret, first.secret);
    assert!(gateway_view(&test, &first.secret).await.is_some());

    let revoke = || {
        test.api.revoke_api_key(request(
            &t.admin,
            pb::RevokeApiKeyRequest {
                api_key_id: key.id.clone(),
            },
        ))
    };
    revoke().await.expect("revoked");
    assert_eq!(
        gateway_view(&test, &created.secret).await,
        None,
        "gone before the answer"
    );
    revoke().await.expect("revoking again is fine");
    assert_eq!(gateway_view(&test, &created.secret).await, None);
    // A late rewrite (e.g. a subscription change that read the key
    // before the revocation) cannot bring it back.
    let model = api_key::Entity::find_by_id(key.id.parse::<Uuid>().expect("uuid"))
        .one(&test.state.db)
        .await
        .expect("query")
        .expect("row");
    let active_copy = api_key::Model {
        revoke_time: None,
        ..model
    };
    api_keys::publish(
        &test.state.db,
        test.state.sessions.as_ref(),
        &active_copy,
        test.state.clock.now(),
    )
    .await
    .expect("publish");
    assert_eq!(gateway_view(&test, &created.secret).await, None);
    // The other key is untouched.
    assert!(gateway_view(&test, &first.secret).await.is_some());
    test.stop().await;
}

/// An empty cache (`usher dev` restarted, Redis flushed) gets every
/// active key's snapshot back from the table, and no revoked one.
#[tokio::test]
async fn auth_api_key_snapshots_are_republished_from_the_table() {
    let test = TestIdentity::start(SystemClock::shared()).await;
    let t = tenant(&test).await;
    let mut secrets = Vec::new();
    for name in ["kept", "revoked"] {
        let created = test
            .api
            .create_api_key(request(&t.admin, key_request(name, &["users.read"])))
            .await
            .expect("created")
            .into_inner();
        secrets.push((created.api_key.expect("key").id, created.secret));
    }
    test.api
        .revoke_api_key(request(
            &t.admin,
            pb::RevokeApiKeyRequest {
                api_key_id: secrets[1].0.clone(),
            },
        ))
        .await
        .expect("revoked");
    // The cache loses everything.
    for (id, secret) in &secrets {
        let row = api_key::Entity::find_by_id(id.parse::<Uuid>().expect("uuid"))
            .one(&test.state.db)
            .await
            .expect("query")
            .expect("row");
        // (A deletion would leave a tombstone: the data is lost instead.)
        let _: () = redis::cmd("DEL")
            .arg(test.redis.key(&["key", &row.secret_hash]))
            .query_async(&mut test.redis.connection())
            .await
            .expect("del");
        assert_eq!(gateway_view(&test, secret).await, None);
    }
    let published = api_keys::publish_all(&test.state)
        .await
        .expect("publish all");
    assert_eq!(published, 1, "only the active key");
    let kept = gateway_view(&test, &secrets[0].1)
        .await
        .expect("the active key resolves again");
    assert_eq!(kept.permissions, ["users.read"]);
    assert_eq!(gateway_view(&test, &secrets[1].1).await, None);
    test.stop().await;
}

#[tokio::test]
async fn auth_api_key_snapshot_loses_disabled_products() {
    let test = TestIdentity::start(SystemClock::shared()).await;
    test.api
        .register_product(request(
            &platform(),
            pb::RegisterProductRequest {
                code: "ledger".into(),
                display_name: "Ledger".into(),
                permissions: vec![pb::Permission {
                    name: "ledger.post".into(),
                    description: "Post entries".into(),
                    product_code: String::new(),
                }],
            },
        ))
        .await
        .expect("registered");
    let mut create = new_account_request(5);
    create.products = vec!["ledger".into()];
    let created = test
        .api
        .create_account(request(&platform(), create))
        .await
        .expect("account")
        .into_inner();
    let account_id: Uuid = created.account.expect("account").id.parse().expect("uuid");
    let owner_id: Uuid = created.owner.expect("owner").id.parse().expect("uuid");
    let mut permissions = admin_permissions();
    permissions.push("ledger.post");
    let admin = member(account_id, owner_id, &permissions);
    let key = test
        .api
        .create_api_key(request(
            &admin,
            key_request("books", &["users.read", "ledger.post"]),
        ))
        .await
        .expect("created")
        .into_inner();
    let principal = gateway_view(&test, &key.secret).await.expect("snapshot");
    assert_eq!(principal.permissions, ["ledger.post", "users.read"]);

    test.api
        .update_subscription(request(
            &platform(),
            pb::UpdateSubscriptionRequest {
                account_id: account_id.to_string(),
                seat_limit: 0,
                products: vec![],
                update_mask: Some(FieldMask {
                    paths: vec!["products".into()],
                }),
            },
        ))
        .await
        .expect("subscription");
    let principal = gateway_view(&test, &key.secret).await.expect("snapshot");
    assert_eq!(
        principal.permissions,
        ["users.read"],
        "a disabled product's permission leaves the key at once"
    );
    test.stop().await;
}

#[tokio::test]
async fn auth_create_api_key_is_idempotent_without_storing_the_secret() {
    let test = TestIdentity::start(SystemClock::shared()).await;
    let t = tenant(&test).await;
    let create = pb::CreateApiKeyRequest {
        request_id: "deploy-7".into(),
        ..key_request("deploy", &["users.read"])
    };
    let first = test
        .api
        .create_api_key(request(&t.admin, create.clone()))
        .await
        .expect("created")
        .into_inner();
    let again = test
        .api
        .create_api_key(request(&t.admin, create.clone()))
        .await
        .expect("replayed")
        .into_inner();
    assert_eq!(again, first, "the same key and secret");
    assert_eq!(
        api_key::Entity::find()
            .all(&test.state.db)
            .await
            .expect("rows")
            .len(),
        1
    );
    assert_stored_nowhere(&test, &first.secret).await;
    let err = test
        .api
        .create_api_key(request(
            &t.admin,
            pb::CreateApiKeyRequest {
                name: "other".into(),
                ..create
            },
        ))
        .await
        .expect_err("conflict");
    assert_reason(&err, Code::AlreadyExists, "IDEMPOTENCY_CONFLICT");
    test.stop().await;
}

#[tokio::test]
async fn auth_api_keys_are_listed_newest_first_and_revoked_idempotently() {
    let clock = ManualClock::new(DateTime::from_timestamp(1_780_000_000, 0).expect("time"));
    let test = TestIdentity::start(clock.clone()).await;
    let t = tenant(&test).await;
    let other = tenant(&test).await;
    let mut ids = Vec::new();
    let mut secrets = Vec::new();
    for name in ["one", "two", "three"] {
        clock.advance(Duration::seconds(1));
        let created = test
            .api
            .create_api_key(request(&t.admin, key_request(name, &["users.read"])))
            .await
            .expect("key")
            .into_inner();
        ids.push(created.api_key.expect("key").id);
        secrets.push(created.secret);
    }
    let expiring = test
        .api
        .create_api_key(request(
            &t.admin,
            pb::CreateApiKeyRequest {
                expire_time: Some(convert::timestamp(clock.now() + Duration::hours(1))),
                ..key_request("short-lived", &["users.read"])
            },
        ))
        .await
        .expect("key")
        .into_inner();
    test.api
        .create_api_key(request(
            &other.admin,
            key_request("theirs", &["users.read"]),
        ))
        .await
        .expect("key");

    let list = |principal: &Principal, page_size: i32, page_token: String, show_revoked: bool| {
        test.api.list_api_keys(request(
            principal,
            pb::ListApiKeysRequest {
                page_size,
                page_token,
                show_revoked,
            },
        ))
    };
    let page = list(&t.admin, 2, String::new(), false)
        .await
        .expect("page")
        .into_inner();
    let names: Vec<_> = page.api_keys.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["short-lived", "three"]);
    let rest = list(&t.admin, 2, page.next_page_token, false)
        .await
        .expect("page")
        .into_inner();
    let names: Vec<_> = rest.api_keys.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["two", "one"]);
    assert!(rest.next_page_token.is_empty());
    let err = list(&t.admin, -1, String::new(), false)
        .await
        .expect_err("negative");
    assert_eq!(fields(&err), ["page_size"]);

    let revoke = |principal: &Principal, id: &str| {
        test.api.revoke_api_key(request(
            principal,
            pb::RevokeApiKeyRequest {
                api_key_id: id.into(),
            },
        ))
    };
    let revoked = revoke(&t.admin, &ids[1])
        .await
        .expect("revoked")
        .into_inner()
        .api_key
        .expect("key");
    assert!(revoked.revoke_time.is_some());
    clock.advance(Duration::seconds(5));
    let again = revoke(&t.admin, &ids[1])
        .await
        .expect("idempotent")
        .into_inner()
        .api_key
        .expect("key");
    assert_eq!(again.revoke_time, revoked.revoke_time, "nothing changes");
    assert_eq!(
        events_of::<events::ApiKeyRevoked>(&test, "api_key.revoked")
            .await
            .len(),
        1
    );
    assert_eq!(
        api_keys::resolve_api_key(&test.state, &secrets[1])
            .await
            .expect("resolve"),
        None,
        "stops working"
    );

    // Expired keys stop working and leave the default list.
    clock.advance(Duration::hours(2));
    assert_eq!(
        api_keys::resolve_api_key(&test.state, &expiring.secret)
            .await
            .expect("resolve"),
        None
    );
    assert!(
        api_keys::resolve_api_key(&test.state, &secrets[0])
            .await
            .expect("resolve")
            .is_some()
    );
    let active = list(&t.admin, 0, String::new(), false)
        .await
        .expect("list")
        .into_inner();
    let names: Vec<_> = active.api_keys.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["three", "one"]);
    let all = list(&t.admin, 0, String::new(), true)
        .await
        .expect("list")
        .into_inner();
    assert_eq!(all.api_keys.len(), 4);

    // Tenant isolation: another account's key id is NOT_FOUND, unchanged.
    let err = revoke(&other.admin, &ids[0])
        .await
        .expect_err("another account");
    assert_reason(&err, Code::NotFound, "NOT_FOUND");
    let err = revoke(&t.admin, &Uuid::new_v4().to_string())
        .await
        .expect_err("unknown");
    assert_reason(&err, Code::NotFound, "NOT_FOUND");
    assert!(
        api_keys::resolve_api_key(&test.state, &secrets[0])
            .await
            .expect("resolve")
            .is_some()
    );
    let theirs = list(&other.admin, 0, String::new(), true)
        .await
        .expect("list")
        .into_inner();
    assert_eq!(theirs.api_keys.len(), 1);
    let err = revoke(&t.admin, "not-a-uuid").await.expect_err("malformed");
    assert_eq!(fields(&err), ["api_key_id"]);
    test.stop().await;
}
