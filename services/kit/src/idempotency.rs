//! Idempotent creates: the answer to a call with a `request_id` is stored in
//! the transaction of the change, so a retry gets the same answer and changes
//! nothing; the same `request_id` with a different request is refused.

use crate::error::{ApiError, ApiResult, Reason};
use chrono::{DateTime, Utc};
use prost::Message;
use sea_orm::{ActiveModelTrait, ConnectionTrait, EntityTrait, Set};
use sha2::{Digest, Sha256};

/// The stored answers, table `idempotency_keys` (primary key scope +
/// request id).
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
        /// The RPC and caller scope.
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

/// Largest accepted `request_id`.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// The key of one idempotent call.
#[derive(Clone, Debug)]
pub struct IdempotencyKey {
    /// The RPC and caller scope, e.g. `account:<id>:CreateRole`.
    pub scope: String,
    /// The caller's `request_id`.
    pub request_id: String,
    /// A hash of the request (with its `request_id` cleared).
    pub request_hash: String,
}

impl IdempotencyKey {
    /// The key for `request` (whose `request_id` the caller already cleared),
    /// or `None` when no `request_id` was sent.
    pub fn new<M: Message>(
        scope: String,
        request_id: &str,
        request: &M,
    ) -> ApiResult<Option<Self>> {
        let request_id = request_id.trim();
        if request_id.is_empty() {
            return Ok(None);
        }
        if request_id.len() > MAX_REQUEST_ID_LEN {
            return Err(ApiError::invalid(
                "request_id",
                "must be at most 128 characters",
            ));
        }
        let request_hash = hex(&Sha256::digest(request.encode_to_vec()));
        Ok(Some(Self {
            scope,
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
        idempotency_key::ActiveModel {
            scope: Set(self.scope.clone()),
            request_id: Set(self.request_id.clone()),
            request_hash: Set(self.request_hash.clone()),
            response: Set(response.encode_to_vec()),
            create_time: Set(now),
        }
        .insert(db)
        .await?;
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
