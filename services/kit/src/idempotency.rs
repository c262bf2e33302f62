//! Idempotent creates: the answer to a call with a `request_id` is stored in
//! the transaction of the change, so a retry gets the same answer and changes
//! nothing; the same `request_id` with a different request is refused.

use crate::{
    error::{ApiError, ApiResult, Reason},
    principal::Principal,
};
use chrono::{DateTime, Utc};
use prost::Message;
use sea_orm::{ActiveModelTrait, ConnectionTrait, EntityTrait, Set};
use sha2::{Digest, Sha256};

/// The `idempotency_keys` table (`CREATE TABLE IF NOT EXISTS`), for a
/// service's schema migration: the stored answers, keyed by
/// `(scope, request_id)`.
pub fn create_table() -> sea_orm_migration::prelude::TableCreateStatement {
    use sea_orm_migration::{prelude::*, schema::*};
    #[derive(DeriveIden)]
    enum IdempotencyKeys {
        Table,
        Scope,
        RequestId,
        RequestHash,
        Response,
        CreateTime,
    }
    Table::create()
        .table(IdempotencyKeys::Table)
        .if_not_exists()
        .col(string(IdempotencyKeys::Scope))
        .col(string(IdempotencyKeys::RequestId))
        .col(string(IdempotencyKeys::RequestHash))
        .col(blob(IdempotencyKeys::Response))
        .col(
            timestamp_with_time_zone(IdempotencyKeys::CreateTime)
                .default(Expr::current_timestamp()),
        )
        .primary_key(
            Index::create()
                .col(IdempotencyKeys::Scope)
                .col(IdempotencyKeys::RequestId),
        )
        .to_owned()
}

pub mod idempotency_key {
    use sea_orm::entity::prelude::*;

    /// One remembered answer.
    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "idempotency_keys")]
    pub struct Model {
        /// The account, caller and RPC ([`super::scope`]).
        #[sea_orm(primary_key, auto_increment = false)]
        pub scope: String,
        /// The caller's request id.
        #[sea_orm(primary_key, auto_increment = false)]
        pub request_id: String,
        /// SHA-256 of the request, hex.
        pub request_hash: String,
        /// The encoded response.
        pub response: Vec<u8>,
        /// When it was stored.
        pub create_time: DateTimeUtc,
    }

    /// No relations.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Largest accepted `request_id`, in characters.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// The one rule of a request id, the `request_id` field of creating RPCs
/// and the `x-request-id` header alike: at most [`MAX_REQUEST_ID_LEN`]
/// printable ASCII characters (U+0020..U+007E). Anything else is
/// `INVALID_ARGUMENT` on `field`, never cut or cleaned.
pub fn validate_request_id(field: &str, request_id: &str) -> ApiResult<()> {
    if request_id.len() > MAX_REQUEST_ID_LEN {
        return Err(ApiError::invalid(
            field,
            format!("must be at most {MAX_REQUEST_ID_LEN} characters"),
        ));
    }
    if !request_id.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err(ApiError::invalid(
            field,
            "must be printable ASCII characters (a UUID is recommended)",
        ));
    }
    Ok(())
}

/// The scope of an idempotency key: the caller's account (`platform` for a
/// platform caller), the caller (the user, else the API key or credential,
/// else the calling service) and the RPC's full name. Two callers, or two
/// RPCs, never share a key.
pub fn scope(principal: &Principal, rpc: &str) -> String {
    let account = principal
        .account_id
        .map_or_else(|| "platform".to_owned(), |id| id.to_string());
    let caller = principal
        .user_id
        .map(|id| format!("user:{id}"))
        .or_else(|| {
            principal
                .credential_id
                .as_ref()
                .map(|id| format!("credential:{id}"))
        })
        .or_else(|| {
            principal
                .service
                .as_ref()
                .map(|name| format!("service:{name}"))
        })
        .unwrap_or_else(|| "anonymous".to_owned());
    format!("{account}/{caller}/{rpc}")
}

/// The key of one idempotent call.
#[derive(Clone, Debug)]
pub struct IdempotencyKey {
    /// The account, caller and RPC ([`scope`]).
    pub scope: String,
    /// The caller's `request_id`.
    pub request_id: String,
    /// A hash of the request (with its `request_id` cleared).
    pub request_hash: String,
}

impl IdempotencyKey {
    /// The key of the call of `rpc` (its full name, e.g.
    /// `usher.identity.v1.UserService/CreateUser`) by `principal` with
    /// `request_id`, for `request` (whose `request_id` the caller already
    /// cleared); `None` when no `request_id` was sent. A `request_id` that
    /// breaks [`validate_request_id`] is `INVALID_ARGUMENT`.
    pub fn new<M: Message>(
        principal: &Principal,
        rpc: &str,
        request_id: &str,
        request: &M,
    ) -> ApiResult<Option<Self>> {
        if request_id.is_empty() {
            return Ok(None);
        }
        validate_request_id("request_id", request_id)?;
        let request_hash = hex::encode(Sha256::digest(request.encode_to_vec()));
        Ok(Some(Self {
            scope: scope(principal, rpc),
            request_id: request_id.to_owned(),
            request_hash,
        }))
    }

    /// The stored answer of an earlier identical call, decoded as `R`.
    pub async fn replay<C: ConnectionTrait, R: Message + Default>(
        &self,
        db: &C,
    ) -> ApiResult<Option<R>> {
        let stored =
            idempotency_key::Entity::find_by_id((self.scope.clone(), self.request_id.clone()))
                .one(db)
                .await?;
        match stored {
            None => Ok(None),
            Some(row) if row.request_hash != self.request_hash => Err(ApiError::rejected(
                Reason::IdempotencyConflict,
                "request_id was already used with a different request",
            )),
            Some(row) => R::decode(row.response.as_slice()).map(Some).map_err(|e| {
                ApiError::Internal(anyhow::anyhow!("stored response does not decode: {e}"))
            }),
        }
    }

    /// Stores `response` in the caller's transaction.
    pub async fn remember<C: ConnectionTrait, R: Message>(
        &self,
        db: &C,
        response: &R,
        now: DateTime<Utc>,
    ) -> ApiResult<()> {
        self.remember_encoded(db, response.encode_to_vec(), now)
            .await
    }

    /// [`Self::remember`] with the answer already encoded.
    pub async fn remember_encoded<C: ConnectionTrait>(
        &self,
        db: &C,
        response: Vec<u8>,
        now: DateTime<Utc>,
    ) -> ApiResult<()> {
        idempotency_key::ActiveModel {
            scope: Set(self.scope.clone()),
            request_id: Set(self.request_id.clone()),
            request_hash: Set(self.request_hash.clone()),
            response: Set(response),
            create_time: Set(now),
        }
        .insert(db)
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use sea_orm::{ConnectionTrait, DatabaseConnection};
    use sea_orm_migration::prelude::PostgresQueryBuilder;
    use uuid::Uuid;

    use super::*;
    use crate::{principal::PrincipalKind, testing::TestDatabase};

    fn user(account_id: Uuid) -> Principal {
        Principal {
            kind: PrincipalKind::User,
            account_id: Some(account_id),
            user_id: Some(Uuid::new_v4()),
            credential_id: Some(Uuid::new_v4().to_string()),
            permissions: Vec::new(),
            service: None,
            password_change_required: false,
        }
    }

    /// A request and a response: any message will do.
    fn request(name: &str) -> prost_types::Struct {
        prost_types::Struct {
            fields: [(
                "name".to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(name.to_owned())),
                },
            )]
            .into(),
        }
    }

    fn field_of(err: ApiError) -> String {
        match err {
            ApiError::InvalidArgument(list) => list[0].field.clone(),
            other => panic!("not a field error: {other:?}"),
        }
    }

    #[test]
    fn request_ids_are_checked_never_cut() {
        validate_request_id("request_id", &"a".repeat(MAX_REQUEST_ID_LEN)).expect("128");
        validate_request_id("request_id", "0b6d4a3e-1c2f-4e0a-9f1b-5d7c8e9a0b1c").expect("uuid");
        for bad in [
            "a".repeat(MAX_REQUEST_ID_LEN + 1),
            "a\0b".to_owned(),
            "tab\there".to_owned(),
            "é".to_owned(),
        ] {
            let err = validate_request_id("request_id", &bad).expect_err(&bad);
            assert_eq!(field_of(err), "request_id");
        }
        let caller = user(Uuid::new_v4());
        let long = "x".repeat(MAX_REQUEST_ID_LEN + 1);
        let err = IdempotencyKey::new(&caller, "s/Create", &long, &request("a")).expect_err("long");
        assert_eq!(field_of(err), "request_id");
        assert!(
            IdempotencyKey::new(&caller, "s/Create", "", &request("a"))
                .expect("empty")
                .is_none(),
            "an empty request_id means no idempotency"
        );
    }

    #[test]
    fn the_scope_is_the_account_the_caller_and_the_rpc() {
        let account = Uuid::new_v4();
        let ada = user(account);
        let bob = user(account);
        let rpc = "usher.identity.v1.UserService/CreateUser";
        assert_ne!(scope(&ada, rpc), scope(&bob, rpc), "two callers");
        assert_ne!(
            scope(&ada, rpc),
            scope(&ada, "usher.identity.v1.TeamService/CreateTeam"),
            "two RPCs"
        );
        // The same user signed in again (another session) is the same caller.
        let again = Principal {
            credential_id: Some("another session".into()),
            ..ada.clone()
        };
        assert_eq!(scope(&ada, rpc), scope(&again, rpc));
        // API keys and platform callers are told apart by their key.
        let key = |id: &str| Principal {
            kind: PrincipalKind::ApiKey,
            user_id: None,
            credential_id: Some(id.into()),
            ..ada.clone()
        };
        assert_ne!(scope(&key("k1"), rpc), scope(&key("k2"), rpc));
        let platform = Principal {
            kind: PrincipalKind::Platform,
            account_id: None,
            ..key("p1")
        };
        assert!(scope(&platform, rpc).starts_with("platform/credential:p1/"));
    }

    async fn database() -> (TestDatabase, DatabaseConnection) {
        let db = TestDatabase::create("idempotency").await.expect("database");
        let conn = crate::db::connect(&db.config).await.expect("connect");
        conn.execute_unprepared(&create_table().to_string(PostgresQueryBuilder))
            .await
            .expect("table");
        (db, conn)
    }

    #[tokio::test]
    async fn keys_replay_per_caller_and_rpc_and_refuse_a_different_request() {
        let (db, conn) = database().await;
        let now = Utc.timestamp_opt(1_800_000_000, 0).unwrap();
        let account = Uuid::new_v4();
        let (ada, bob) = (user(account), user(account));
        let create_user = "usher.identity.v1.UserService/CreateUser";
        let create_team = "usher.identity.v1.TeamService/CreateTeam";
        let key = |who: &Principal, rpc: &str, body: &str| {
            IdempotencyKey::new(who, rpc, "retry-1", &request(body))
                .expect("valid")
                .expect("a key")
        };

        let first = key(&ada, create_user, "ada's request");
        assert_eq!(
            first
                .replay::<_, prost_types::Struct>(&conn)
                .await
                .expect("none"),
            None
        );
        first
            .remember(&conn, &request("ada's answer"), now)
            .await
            .expect("stored");

        // The same caller, RPC, key and request: the stored answer.
        let replayed = key(&ada, create_user, "ada's request")
            .replay::<_, prost_types::Struct>(&conn)
            .await
            .expect("replay");
        assert_eq!(replayed, Some(request("ada's answer")));

        // The same key with a different request: IDEMPOTENCY_CONFLICT.
        let conflict = key(&ada, create_user, "another request")
            .replay::<_, prost_types::Struct>(&conn)
            .await
            .expect_err("conflict");
        assert_eq!(conflict.reason(), Reason::IdempotencyConflict);

        // Another caller, or another RPC, with the same key: a new call,
        // which can be remembered beside the first.
        for other in [
            key(&bob, create_user, "bob's request"),
            key(&ada, create_team, "team"),
        ] {
            assert_eq!(
                other
                    .replay::<_, prost_types::Struct>(&conn)
                    .await
                    .expect("new"),
                None
            );
            other
                .remember(&conn, &request("its own answer"), now)
                .await
                .expect("no collision");
        }

        conn.close().await.expect("close");
        db.drop_database().await.expect("drop");
    }
}
