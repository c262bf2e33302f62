//! TeamService as load → decide → persist: creates and renames lock the
//! account row, so two concurrent calls with the same name are checked one
//! after the other (one of them ALREADY_EXISTS); a name taken by a
//! concurrent writer anyway (`StoreError::Taken`) answers the same.

use usher_kit::{
    db::StoreError,
    error::{ApiError, ApiResult},
    idempotency::IdempotencyKey,
    principal::Principal,
};
use uuid::Uuid;

use crate::{
    domain::teams,
    state::Identity,
    store::{accounts, effects, entities::team, roles::actor, scoped, teams as store},
};

/// A name taken by a concurrent writer is the name rule's refusal.
fn taken(err: StoreError) -> ApiError {
    if err.is_taken() {
        teams::name_taken()
    } else {
        err.into()
    }
}

/// One page of teams and the total matching `query`.
pub async fn list(
    state: &Identity,
    account_id: Uuid,
    query: &str,
    cursor: Option<(String, Uuid)>,
    limit: u64,
) -> ApiResult<(Vec<(team::Model, u64)>, u64)> {
    let db = &state.db;
    let (rows, total) = store::page(db, account_id, query, cursor, limit).await?;
    let counts = store::member_counts(db, rows.iter().map(|t| t.id).collect()).await?;
    let rows = rows
        .into_iter()
        .map(|t| {
            let count = counts.get(&t.id).copied().unwrap_or(0);
            (t, count)
        })
        .collect();
    Ok((rows, total))
}

/// Creates a team; a replay of `idempotency` answers the first response.
pub async fn create<R>(
    state: &Identity,
    principal: &Principal,
    request_id: &str,
    idempotency: Option<&IdempotencyKey>,
    name: String,
    description: String,
    respond: impl FnOnce(&team::Model) -> R,
) -> ApiResult<R>
where
    R: prost::Message + Default,
{
    let account_id = principal.account()?;
    let now = state.clock.now();
    let txn = usher_kit::db::begin(&state.db).await?;
    // Serialises creates of one account: the name check, the team count
    // and a concurrent retry with the same request_id.
    accounts::lock(&txn, account_id).await?;
    if let Some(key) = idempotency
        && let Some(done) = key.replay(&txn).await?
    {
        return Ok(done);
    }
    if store::name_taken(&txn, account_id, &name, None).await? {
        return Err(teams::name_taken());
    }
    teams::check_room(store::count(&txn, account_id).await?)?;
    let created = store::insert(&txn, account_id, &name, &description, now)
        .await
        .map_err(taken)?;
    let actor = actor(&txn, principal).await?;
    let caused = teams::created(&store::facts(&created), &actor, now);
    effects::apply(&txn, caused, &actor, request_id, now).await?;
    let response = respond(&created);
    if let Some(key) = idempotency {
        key.remember(&txn, &response, now).await?;
    }
    txn.commit().await?;
    Ok(response)
}

/// Renames or re-describes a team; answers it with its member count.
pub async fn update(
    state: &Identity,
    principal: &Principal,
    request_id: &str,
    team_id: Uuid,
    name: Option<String>,
    description: Option<String>,
) -> ApiResult<(team::Model, u64)> {
    let account_id = principal.account()?;
    let now = state.clock.now();
    let txn = usher_kit::db::begin(&state.db).await?;
    // A rename checks the name under the same lock as creates.
    accounts::lock(&txn, account_id).await?;
    let current = scoped::team(&txn, account_id, team_id).await?;
    let edit = teams::edit(&store::facts(&current), name, description);
    if let Some(name) = &edit.name
        && store::name_taken(&txn, account_id, name, Some(team_id)).await?
    {
        return Err(teams::name_taken());
    }
    let updated = if edit.is_empty() {
        current
    } else {
        let updated = store::update(&txn, current, &edit, now)
            .await
            .map_err(taken)?;
        let actor = actor(&txn, principal).await?;
        let caused = teams::updated(&store::facts(&updated), edit, &actor, now);
        effects::apply(&txn, caused, &actor, request_id, now).await?;
        updated
    };
    let count = store::member_count(&txn, team_id).await?;
    txn.commit().await?;
    Ok((updated, count))
}

/// Deletes a team, leaving its members team-less; answers how many.
pub async fn delete(
    state: &Identity,
    principal: &Principal,
    request_id: &str,
    team_id: Uuid,
) -> ApiResult<i32> {
    let account_id = principal.account()?;
    let now = state.clock.now();
    let txn = usher_kit::db::begin(&state.db).await?;
    let doomed = scoped::team(&txn, account_id, team_id).await?;
    let members = store::members(&txn, account_id, team_id).await?;
    let actor = actor(&txn, principal).await?;
    if !members.is_empty() {
        store::release_members(&txn, account_id, team_id, now).await?;
    }
    store::delete(&txn, team_id).await?;
    let caused = teams::deleted(&store::facts(&doomed), &members, &actor, now);
    effects::apply(&txn, caused, &actor, request_id, now).await?;
    txn.commit().await?;
    Ok(teams::released_count(members.len()))
}
