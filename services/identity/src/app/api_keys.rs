//! The account's API keys, as load → decide → persist: CreateApiKey
//! (idempotent, its secret kept sealed in the stored answer), ListApiKeys and
//! RevokeApiKey. The rules are `domain::api_keys`'; the SQL `store::api_keys`'.
//!
//! The gateway knows a key only from its snapshot in the session store:
//! written before a creation answers (so the key works as soon as the caller
//! has it), deleted before a revocation answers (so it fails on its next
//! call).

use anyhow::anyhow;
use chrono::{DateTime, Utc};
use usher_kit::{
    error::{ApiError, ApiResult, Reason},
    pagination,
    tokens::{API_KEY_PREFIX, Token, TokenPurpose},
};
use usher_proto::identity::v1 as pb;
use uuid::Uuid;

use super::auth::require_settled_password;
use crate::{
    app::Call,
    domain::{
        api_keys::{self as rules, NewKeyRequest, SEALED_SECRET_PREFIX},
        effects::Actor,
        grants::Grant,
    },
    state::Identity,
    store::{accounts, api_keys as store, effects, entities::api_key, idempotency::IdempotencyKey},
};

fn internal(error: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(anyhow!("{error}"))
}

/// An API key as the API shows it (never its secret).
pub fn view(model: &api_key::Model) -> pb::ApiKey {
    use usher_kit::convert;
    pb::ApiKey {
        id: model.id.to_string(),
        name: model.name.clone(),
        secret_prefix: model.secret_prefix.clone(),
        permissions: convert::strings(&model.permissions),
        creator_user_id: model
            .creator_user_id
            .map(|id| id.to_string())
            .unwrap_or_default(),
        create_time: Some(convert::timestamp(model.create_time)),
        expire_time: convert::optional_timestamp(model.expire_time),
        last_use_time: convert::optional_timestamp(model.last_use_time),
        revoke_time: convert::optional_timestamp(model.revoke_time),
    }
}

/// A new key and its secret (shown once).
#[derive(Debug)]
pub struct CreatedKey {
    /// The key.
    pub key: api_key::Model,
    /// The secret, in clear.
    pub secret: String,
}

/// What CreateApiKey answers: a new key, or the answer of an earlier
/// identical call (its secret opened again).
#[derive(Debug)]
pub enum Created {
    /// Created by this call.
    New(CreatedKey),
    /// Replayed from an earlier call with the same request id.
    Replayed(pb::CreateApiKeyResponse),
}

/// Creates an API key of the caller's account: no more than the caller
/// holds, no name of an active key twice; idempotent by `request_id`, with
/// the secret sealed in the stored answer (which holds the key as [`view`]
/// shows it; the stored answer is the API's, so this one answers in protobuf).
pub async fn create(
    state: &Identity,
    call: &Call,
    request_id: &str,
    idempotent: &pb::CreateApiKeyRequest,
    request: NewKeyRequest,
) -> ApiResult<pb::CreateApiKeyResponse> {
    let principal = &call.principal;
    let account_id = principal.account()?;
    require_settled_password(state, principal).await?;
    let idempotency = IdempotencyKey::new(
        principal,
        "usher.identity.v1.AuthService/CreateApiKey",
        request_id,
        idempotent,
    )?;
    if let Some(key) = &idempotency
        && let Some(done) = key.replay::<_, pb::CreateApiKeyResponse>(&state.db).await?
    {
        let done = unseal_secret(state, key, done)?;
        // The first answer may have failed after the commit, before its
        // snapshot was written: write it again (a no-op when it was).
        let hash = state
            .tokens
            .hash(TokenPurpose::ApiKey, done.secret.as_str());
        if let Some(model) = store::find_by_secret_hash(&state.db, &hash).await? {
            let now = state.clock.now();
            store::publish(&state.db, state.sessions.as_ref(), &model, now).await?;
        }
        return Ok(done);
    }

    let now = state.clock.now();
    let account = accounts::find(&state.db, account_id).await?;
    let known = store::grantable_permissions(&state.db, &account).await?;
    let new = rules::validate_new_key(&request, &known, now)?;
    // No escalation: a key never holds what its creator does not.
    crate::store::roles::check_grant(&state.db, principal, &Grant::Permissions(&new.permissions))
        .await?;

    let secret = Token::try_generate_with_prefix(API_KEY_PREFIX).map_err(internal)?;
    let txn = usher_kit::db::begin(&state.db).await?;
    accounts::lock(&txn, account_id).await?;
    if store::active_name_taken(&txn, account_id, &new.name, now).await? {
        return Err(ApiError::rejected(
            Reason::AlreadyExists,
            "an active API key has that name",
        ));
    }
    let created = store::insert(
        &txn,
        store::NewAccountKey {
            account_id,
            name: new.name.clone(),
            secret_hash: state.tokens.hash(TokenPurpose::ApiKey, secret.as_str()),
            secret_prefix: rules::secret_prefix(secret.as_str()),
            permissions: new.permissions.clone(),
            creator_user_id: principal.user_id,
            expire_time: new.expire_time,
        },
        now,
    )
    .await?;
    let actor_name = crate::store::users::display_name(&txn, principal.user_id).await?;
    let actor = Actor::from_principal(principal, actor_name);
    let decided = rules::created(account_id, &created, &new, &actor, now);
    effects::apply(&txn, decided, &actor, &call.request_id, now).await?;
    let response = pb::CreateApiKeyResponse {
        api_key: Some(view(&created)),
        secret: secret.as_str().to_owned(),
    };
    if let Some(key) = &idempotency {
        // The stored answer holds the secret sealed, never in clear.
        let sealed = state
            .sealer
            .try_seal(&rules::seal_context(key), secret.as_str())
            .map_err(internal)?;
        let stored = pb::CreateApiKeyResponse {
            api_key: response.api_key.clone(),
            secret: format!("{SEALED_SECRET_PREFIX}{}", hex::encode(&sealed)),
        };
        key.remember(&txn, &stored, now).await?;
    }
    txn.commit().await?;
    // The gateway knows the key only from its snapshot: written before
    // answering, so the key works as soon as the caller has it.
    store::publish(&state.db, state.sessions.as_ref(), &created, now).await?;
    Ok(response)
}

/// The stored answer of an earlier identical CreateApiKey, with its secret
/// opened.
fn unseal_secret(
    state: &Identity,
    key: &IdempotencyKey,
    mut done: pb::CreateApiKeyResponse,
) -> ApiResult<pb::CreateApiKeyResponse> {
    let sealed = done
        .secret
        .strip_prefix(SEALED_SECRET_PREFIX)
        .and_then(|text| hex::decode(text).ok())
        .ok_or_else(|| internal("stored api key answer without a sealed secret"))?;
    done.secret = state
        .sealer
        .open(&rules::seal_context(key), &sealed)
        .map_err(internal)?;
    Ok(done)
}

/// One page of the caller's account's keys, newest first (active ones only
/// unless `show_revoked`), and the token of the next page (empty at the end).
pub async fn list(
    state: &Identity,
    call: &Call,
    page_size: i32,
    page_token: &str,
    show_revoked: bool,
) -> ApiResult<(Vec<api_key::Model>, String)> {
    let account_id = call.principal.account()?;
    require_settled_password(state, &call.principal).await?;
    let size = pagination::page_size(page_size)?;
    let fingerprint = pagination::fingerprint(&("api_keys", show_revoked));
    let cursor: Option<(DateTime<Utc>, Uuid)> = pagination::decode_token(&fingerprint, page_token)?;
    let active_at = (!show_revoked).then(|| state.clock.now());
    let rows = store::page(&state.db, account_id, active_at, cursor, size + 1).await?;
    let (rows, next_page_token) = pagination::split_page(rows, size, |last| {
        pagination::encode_token(&fingerprint, &(last.create_time, last.id))
    });
    Ok((rows, next_page_token))
}

/// Revokes key `key_id` of the caller's account (recorded once however many
/// calls race) and deletes its snapshot before answering, also when it was
/// already revoked (a retry after a failed deletion repairs it).
pub async fn revoke(state: &Identity, call: &Call, key_id: Uuid) -> ApiResult<api_key::Model> {
    let principal = &call.principal;
    let account_id = principal.account()?;
    require_settled_password(state, principal).await?;
    let now = state.clock.now();
    let txn = usher_kit::db::begin(&state.db).await?;
    let key = store::find_in_account(&txn, account_id, key_id).await?;
    if store::revoke(&txn, key.id, now).await? {
        let actor_name = crate::store::users::display_name(&txn, principal.user_id).await?;
        let actor = Actor::from_principal(principal, actor_name);
        let decided = rules::revoked(account_id, &key, &actor, now);
        effects::apply(&txn, decided, &actor, &call.request_id, now).await?;
    }
    let current = store::find_in_account(&txn, account_id, key_id).await?;
    txn.commit().await?;
    // Before answering, so the key fails on its next call.
    state
        .sessions
        .delete_api_key(current.secret_hash.clone())
        .await?;
    Ok(current)
}
