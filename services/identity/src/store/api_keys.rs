//! API keys: account-scoped keys created with AuthService.CreateApiKey, and
//! platform keys created by operators. Only the keyed hash of a secret is
//! stored (`TokenPurpose::ApiKey`), with a short non-secret prefix to tell
//! keys apart in lists.
//!
//! The gateway resolves a key from Redis, never from this table: identity
//! writes an [`ApiKeySnapshot`] under the secret's hash after a key is
//! created (the operator's CLI for platform keys), rewrites the snapshots of
//! an account's active keys when its products change (see
//! [`refresh_account`]), and deletes the snapshot before answering a
//! revocation, so it takes effect on the next call. A key without a snapshot
//! is no key at the gateway (fail closed); the table stays the source of
//! truth and [`publish`] rebuilds a snapshot from it.

use std::collections::BTreeSet;

use chrono::{DateTime, Duration, Utc};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    sea_query::Expr,
};
use usher_kit::{
    error::{ApiError, ApiResult},
    principal::{Principal, PrincipalKind},
    sessions::{ApiKeySnapshot, SessionStore},
    tokens::{API_KEY_PREFIX, TokenPurpose},
};
use uuid::Uuid;

use super::entities::{account, api_key, product};
pub use crate::domain::api_keys::{enabled_permissions, is_active, secret_prefix};
use crate::{domain::CATALOGUE, state::Identity};
use usher_kit::{
    convert,
    db::{StoreError, StoreResult},
};

/// Longest secret looked up; anything longer is no key of ours.
pub const MAX_SECRET_CHARS: usize = 128;
/// `last_use_time` is written at most this often per key.
const LAST_USE_RESOLUTION: Duration = Duration::seconds(60);

/// The condition "usable at `now`".
pub fn active_condition(now: DateTime<Utc>) -> Condition {
    Condition::all()
        .add(api_key::Column::RevokeTime.is_null())
        .add(
            Condition::any()
                .add(api_key::Column::ExpireTime.is_null())
                .add(api_key::Column::ExpireTime.gt(now)),
        )
}

/// The account key `id` of `account_id`, or the one NOT_FOUND (an id of
/// another account, or of a platform key, answers the same as an unknown one).
pub async fn find_in_account<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    id: Uuid,
) -> StoreResult<api_key::Model> {
    api_key::Entity::find_by_id(id)
        .filter(api_key::Column::AccountId.eq(account_id))
        .filter(api_key::Column::Platform.eq(false))
        .one(db)
        .await?
        .ok_or(StoreError::NotFound("api key"))
}

/// The key whose secret hashes to `hash`, of any account.
pub async fn find_by_secret_hash<C: ConnectionTrait>(
    db: &C,
    hash: &str,
) -> StoreResult<Option<api_key::Model>> {
    Ok(api_key::Entity::find()
        .filter(api_key::Column::SecretHash.eq(hash))
        .one(db)
        .await?)
}

/// Permissions `account` can grant: the core catalogue and those of its
/// enabled products.
pub async fn grantable_permissions<C: ConnectionTrait>(
    db: &C,
    account: &account::Model,
) -> StoreResult<BTreeSet<String>> {
    let mut known: BTreeSet<String> = CATALOGUE.iter().map(|(p, _)| (*p).to_owned()).collect();
    let codes = convert::strings(&account.products);
    if !codes.is_empty() {
        let products = product::Entity::find()
            .filter(product::Column::Code.is_in(codes))
            .all(db)
            .await?;
        for product in &products {
            known.extend(super::accounts::product_permission_names(product));
        }
    }
    Ok(known)
}

/// A new key of an account, as stored.
#[derive(Clone, Debug)]
pub struct NewAccountKey {
    /// The account.
    pub account_id: Uuid,
    /// Its name.
    pub name: String,
    /// The keyed hash of its secret (`TokenPurpose::ApiKey`).
    pub secret_hash: String,
    /// The non-secret beginning of the secret.
    pub secret_prefix: String,
    /// Its permissions.
    pub permissions: Vec<String>,
    /// Who created it.
    pub creator_user_id: Option<Uuid>,
    /// When it expires.
    pub expire_time: Option<DateTime<Utc>>,
}

/// Inserts `key`, created at `now`.
pub async fn insert<C: ConnectionTrait>(
    db: &C,
    key: NewAccountKey,
    now: DateTime<Utc>,
) -> StoreResult<api_key::Model> {
    use sea_orm::{ActiveModelTrait, Set};
    Ok(api_key::ActiveModel {
        id: Set(Uuid::now_v7()),
        account_id: Set(Some(key.account_id)),
        name: Set(key.name),
        secret_hash: Set(key.secret_hash),
        secret_prefix: Set(key.secret_prefix),
        permissions: Set(convert::json_strings(key.permissions)),
        platform: Set(false),
        creator_user_id: Set(key.creator_user_id),
        create_time: Set(now),
        expire_time: Set(key.expire_time),
        last_use_time: Set(None),
        revoke_time: Set(None),
    }
    .insert(db)
    .await?)
}

/// Whether an active key of the account already has `name`.
pub async fn active_name_taken<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    name: &str,
    now: DateTime<Utc>,
) -> StoreResult<bool> {
    Ok(api_key::Entity::find()
        .select_only()
        .column(api_key::Column::Id)
        .filter(api_key::Column::AccountId.eq(account_id))
        .filter(api_key::Column::Platform.eq(false))
        .filter(api_key::Column::Name.eq(name))
        .filter(active_condition(now))
        .into_tuple::<Uuid>()
        .one(db)
        .await?
        .is_some())
}

/// One page of the account's keys, newest first, after the cursor
/// `(create_time, id)`; `limit` rows at most.
pub async fn page<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    active_at: Option<DateTime<Utc>>,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: u64,
) -> StoreResult<Vec<api_key::Model>> {
    let mut select = api_key::Entity::find()
        .filter(api_key::Column::AccountId.eq(account_id))
        .filter(api_key::Column::Platform.eq(false));
    if let Some(now) = active_at {
        select = select.filter(active_condition(now));
    }
    if let Some((time, id)) = after {
        select = select.filter(
            Condition::any()
                .add(api_key::Column::CreateTime.lt(time))
                .add(
                    Condition::all()
                        .add(api_key::Column::CreateTime.eq(time))
                        .add(api_key::Column::Id.lt(id)),
                ),
        );
    }
    Ok(select
        .order_by_desc(api_key::Column::CreateTime)
        .order_by_desc(api_key::Column::Id)
        .limit(limit)
        .all(db)
        .await?)
}

/// Sets `revoke_time` if the key is not revoked yet; whether this call did it
/// (so two concurrent revocations record one revocation).
pub async fn revoke<C: ConnectionTrait>(db: &C, id: Uuid, now: DateTime<Utc>) -> StoreResult<bool> {
    let result = api_key::Entity::update_many()
        .col_expr(api_key::Column::RevokeTime, Expr::value(Some(now)))
        .filter(api_key::Column::Id.eq(id))
        .filter(api_key::Column::RevokeTime.is_null())
        .exec(db)
        .await?;
    Ok(result.rows_affected == 1)
}

/// The principal of an API key secret (for the gateway): `None` for anything
/// that is not an active key — unknown, revoked, expired, or of an account that
/// no longer exists. An account key holds its permissions minus those of
/// products the account no longer has; a platform key (`platform`, created by
/// operators) is a PLATFORM principal. Records the use, at most once a minute.
pub async fn resolve_api_key(state: &Identity, secret: &str) -> ApiResult<Option<Principal>> {
    if !secret.starts_with(API_KEY_PREFIX) || secret.chars().count() > MAX_SECRET_CHARS {
        return Ok(None);
    }
    let hash = state.tokens.hash(TokenPurpose::ApiKey, secret);
    let Some(key) = api_key::Entity::find()
        .filter(api_key::Column::SecretHash.eq(hash))
        .one(&state.db)
        .await?
    else {
        return Ok(None);
    };
    let now = state.clock.now();
    if !is_active(&key, now) {
        return Ok(None);
    }
    let permissions = convert::strings(&key.permissions);
    let principal = if key.platform {
        Principal {
            kind: PrincipalKind::Platform,
            account_id: None,
            user_id: None,
            credential_id: Some(key.id.to_string()),
            permissions,
            service: None,
            password_change_required: false,
        }
    } else {
        let Some(account_id) = key.account_id else {
            return Ok(None);
        };
        let Some(account) = account::Entity::find_by_id(account_id)
            .one(&state.db)
            .await?
        else {
            return Ok(None);
        };
        let products = convert::strings(&account.products);
        let permissions = enabled_permissions(permissions, &products);
        Principal {
            kind: PrincipalKind::ApiKey,
            account_id: Some(account_id),
            user_id: None,
            credential_id: Some(key.id.to_string()),
            permissions,
            service: None,
            password_change_required: false,
        }
    };
    api_key::Entity::update_many()
        .col_expr(api_key::Column::LastUseTime, Expr::value(Some(now)))
        .filter(api_key::Column::Id.eq(key.id))
        .filter(
            Condition::any()
                .add(api_key::Column::LastUseTime.is_null())
                .add(api_key::Column::LastUseTime.lt(now - LAST_USE_RESOLUTION)),
        )
        .exec(&state.db)
        .await?;
    Ok(Some(principal))
}

/// The gateway's snapshot of `key`, for an account with `products` (ignored
/// for a platform key).
pub fn snapshot_of(key: &api_key::Model, products: &[String], version: u64) -> ApiKeySnapshot {
    let permissions = convert::strings(&key.permissions);
    ApiKeySnapshot {
        key_id: key.id,
        account_id: key.account_id,
        platform: key.platform,
        permissions: if key.platform {
            permissions
        } else {
            enabled_permissions(permissions, products)
        },
        expire_time: key.expire_time,
        version,
    }
}

/// Writes the gateway's snapshot of `key` from the database: its
/// permissions minus those of products its account no longer has. A key that
/// is not active (revoked, expired, of a deleted account) gets a deletion
/// instead, so it stays refused.
pub async fn publish<C: ConnectionTrait>(
    db: &C,
    sessions: &dyn SessionStore,
    key: &api_key::Model,
    now: DateTime<Utc>,
) -> ApiResult<()> {
    // Taken before reading, so a slow writer never replaces a newer snapshot.
    let version = crate::store::principals::version_now(now);
    let products = match key.account_id {
        Some(account_id) if !key.platform => {
            match account::Entity::find_by_id(account_id).one(db).await? {
                Some(account) => Some(convert::strings(&account.products)),
                None => None,
            }
        }
        _ => Some(Vec::new()),
    };
    match products {
        Some(products) if is_active(key, now) => {
            sessions
                .put_api_key(
                    key.secret_hash.clone(),
                    snapshot_of(key, &products, version),
                )
                .await?;
        }
        _ => {
            sessions.delete_api_key(key.secret_hash.clone()).await?;
        }
    }
    Ok(())
}

/// Rewrites the snapshots of every active key of `account_id` (after its
/// products changed).
pub async fn refresh_account(state: &Identity, account_id: Uuid) -> ApiResult<()> {
    let now = state.clock.now();
    let keys = api_key::Entity::find()
        .filter(api_key::Column::AccountId.eq(account_id))
        .filter(api_key::Column::Platform.eq(false))
        .filter(active_condition(now))
        .all(&state.db)
        .await?;
    for key in &keys {
        publish(&state.db, state.sessions.as_ref(), key, now).await?;
    }
    Ok(())
}

/// Rewrites the snapshot of every active key, account and platform ones,
/// and returns how many: what an empty cache needs (`usher dev`'s in-process
/// one after a restart, or a Redis that lost its data).
pub async fn publish_all(state: &Identity) -> ApiResult<usize> {
    let now = state.clock.now();
    let keys = api_key::Entity::find()
        .filter(active_condition(now))
        .all(&state.db)
        .await?;
    for key in &keys {
        publish(&state.db, state.sessions.as_ref(), key, now).await?;
    }
    Ok(keys.len())
}

/// A platform key created by an operator: its id and the secret, which is
/// shown once and stored only as its keyed hash.
#[derive(Debug)]
pub struct NewPlatformKey {
    /// The key's id (for revocation).
    pub id: Uuid,
    /// The secret to hand to the platform (`usk_…`).
    pub secret: usher_kit::tokens::Token,
}

/// Creates a platform key named `name` (operators only: `usher platform-keys
/// create`). Platform keys may create accounts, set subscriptions and
/// register products; they hold no account permission.
pub async fn create_platform_key<C: ConnectionTrait>(
    db: &C,
    tokens: &usher_kit::tokens::TokenHasher,
    name: &str,
    now: DateTime<Utc>,
) -> ApiResult<NewPlatformKey> {
    use sea_orm::{ActiveModelTrait, Set};
    let name = crate::domain::validate_name("name", name, 100)?;
    let secret = usher_kit::tokens::Token::try_generate_with_prefix(API_KEY_PREFIX)
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("no randomness: {e}")))?;
    let id = Uuid::new_v4();
    api_key::ActiveModel {
        id: Set(id),
        account_id: Set(None),
        name: Set(name),
        secret_hash: Set(tokens.hash(TokenPurpose::ApiKey, secret.as_str())),
        secret_prefix: Set(secret_prefix(secret.as_str())),
        permissions: Set(serde_json::Value::Array(Vec::new())),
        platform: Set(true),
        creator_user_id: Set(None),
        create_time: Set(now),
        expire_time: Set(None),
        last_use_time: Set(None),
        revoke_time: Set(None),
    }
    .insert(db)
    .await?;
    Ok(NewPlatformKey { id, secret })
}

/// [`create_platform_key`], then the gateway's snapshot of the new key, so it
/// works at once (what `usher platform-keys create` runs).
pub async fn create_and_publish_platform_key<C: ConnectionTrait>(
    db: &C,
    sessions: &dyn SessionStore,
    tokens: &usher_kit::tokens::TokenHasher,
    name: &str,
    now: DateTime<Utc>,
) -> ApiResult<NewPlatformKey> {
    let key = create_platform_key(db, tokens, name, now).await?;
    let model = api_key::Entity::find_by_id(key.id)
        .one(db)
        .await?
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("platform key vanished")))?;
    publish(db, sessions, &model, now).await?;
    Ok(key)
}

#[cfg(test)]
mod platform_key_tests {
    use std::sync::Arc;

    use usher_kit::{clock::SystemClock, principal::PrincipalKind};

    use super::*;
    use crate::testing::TestIdentity;

    #[tokio::test]
    async fn operators_create_platform_keys_that_resolve_to_platform_principals() {
        let test = TestIdentity::start(Arc::new(SystemClock)).await;
        let now = test.state.clock.now();
        let key = create_platform_key(&test.state.db, &test.state.tokens, "Back office", now)
            .await
            .expect("created");
        assert!(key.secret.as_str().starts_with(API_KEY_PREFIX));
        let stored = api_key::Entity::find_by_id(key.id)
            .one(&test.state.db)
            .await
            .expect("query")
            .expect("row");
        assert!(stored.platform);
        assert!(stored.account_id.is_none());
        assert_ne!(
            stored.secret_hash,
            key.secret.as_str(),
            "only the hash is stored"
        );
        let principal = resolve_api_key(&test.state, key.secret.as_str())
            .await
            .expect("resolves")
            .expect("a principal");
        assert_eq!(principal.kind, PrincipalKind::Platform);
        assert!(principal.account_id.is_none());
        assert!(
            create_platform_key(&test.state.db, &test.state.tokens, " ", now)
                .await
                .is_err()
        );
        // Without a snapshot the gateway knows no such key (fail closed).
        assert_eq!(
            test.state
                .sessions
                .get_api_key(key.secret.as_str())
                .await
                .expect("store"),
            None
        );
        test.stop().await;
    }

    #[tokio::test]
    async fn operators_platform_api_key_snapshot_is_published() {
        let test = TestIdentity::start(Arc::new(SystemClock)).await;
        let now = test.state.clock.now();
        let key = create_and_publish_platform_key(
            &test.state.db,
            test.state.sessions.as_ref(),
            &test.state.tokens,
            "Back office",
            now,
        )
        .await
        .expect("created");
        let principal = test
            .state
            .sessions
            .get_api_key(key.secret.as_str())
            .await
            .expect("store")
            .expect("a principal");
        assert_eq!(principal.kind, PrincipalKind::Platform);
        assert_eq!(principal.account_id, None);
        assert_eq!(principal.credential_id, Some(key.id.to_string()));
        test.stop().await;
    }
}
