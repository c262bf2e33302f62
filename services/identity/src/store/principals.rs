//! Principal snapshots: what the gateway needs to build a signed-in user's
//! principal (status, role, permissions) without asking identity. Identity
//! rewrites a user's snapshot after every committed change of their role,
//! status or permissions, so the change applies on the user's next call; a
//! user who can no longer act (inactive, invited, deleted) has none.
//!
//! Versions: a snapshot carries a version its writer took *before* reading
//! the database, so a slow writer that read older rows never replaces a newer
//! snapshot (the store ignores a version not above the one stored). The
//! version is the clock in microseconds, kept strictly increasing within the
//! process (a manual clock in tests, two refreshes in one microsecond);
//! across replicas it follows their clocks.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicU64, Ordering},
};

use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt, stream};
use sea_orm::{ColumnTrait, EntityTrait, JoinType, QueryFilter, QuerySelect};
use usher_kit::{
    error::ApiResult,
    sessions::{PrincipalSnapshot, UserStatus as SnapshotStatus},
};
use uuid::Uuid;

use super::entities::{role, user};
use crate::{domain::UserStatus, state::Identity};

/// Snapshot writes in flight at once when many users change together.
const CONCURRENT_WRITES: usize = 16;
/// Users read per query when a whole role changes.
const USERS_PER_QUERY: u64 = 1_000;

/// Rewrites the snapshot of `user_id` from the database: the current role's
/// permissions when the user is ACTIVE, no snapshot otherwise.
pub async fn refresh_user(state: &Identity, user_id: Uuid) -> ApiResult<()> {
    refresh_users(state, &[user_id]).await
}

/// Rewrites the snapshots of `user_ids` (one query joining each user's role,
/// two more per built-in Admin role for its account's products, then the
/// writes, a few at a time).
pub async fn refresh_users(state: &Identity, user_ids: &[Uuid]) -> ApiResult<()> {
    if user_ids.is_empty() {
        return Ok(());
    }
    let base_version = version_now(state.clock.now());
    let mut users = Vec::with_capacity(user_ids.len());
    let mut roles: HashMap<Uuid, role::Model> = HashMap::new();
    for chunk in user_ids.chunks(USERS_PER_QUERY as usize) {
        let found = user::Entity::find()
            .join(JoinType::LeftJoin, super::users::role_join())
            .select_also(role::Entity)
            .filter(user::Column::Id.is_in(chunk.iter().copied()))
            .all(&state.db)
            .await?;
        for (user, role) in found {
            if let Some(role) = role {
                roles.entry(role.id).or_insert(role);
            }
            users.push(user);
        }
    }
    // The built-in Admin's permissions depend on the account's products.
    let mut permissions: HashMap<Uuid, Vec<String>> = HashMap::with_capacity(roles.len());
    for (id, role) in &roles {
        permissions.insert(
            *id,
            super::accounts::effective_permissions(&state.db, role).await?,
        );
    }
    let found: HashMap<Uuid, &user::Model> = users.iter().map(|u| (u.id, u)).collect();
    // Collected first: a lazy iterator of borrowing closures would make the
    // future non-`Send` for tonic.
    let writes: Vec<_> = user_ids
        .iter()
        .map(|id| {
            let snapshot = found
                .get(id)
                .and_then(|u| snapshot_of(u, permissions.get(&u.role_id), base_version));
            write(state, *id, snapshot)
        })
        .collect();
    stream::iter(writes)
        .buffer_unordered(CONCURRENT_WRITES)
        .try_collect::<()>()
        .await
}

/// Rewrites the snapshots of every user holding `role_id` (after its
/// permissions changed, or it was deleted with its users reassigned).
pub async fn refresh_role(state: &Identity, role_id: Uuid) -> ApiResult<()> {
    let mut after: Option<Uuid> = None;
    loop {
        let mut select = user::Entity::find()
            .select_only()
            .column(user::Column::Id)
            .filter(user::Column::RoleId.eq(role_id));
        if let Some(after) = after {
            select = select.filter(user::Column::Id.gt(after));
        }
        let ids: Vec<Uuid> = sea_orm::QueryOrder::order_by_asc(select, user::Column::Id)
            .limit(USERS_PER_QUERY)
            .into_tuple()
            .all(&state.db)
            .await?;
        let Some(last) = ids.last().copied() else {
            return Ok(());
        };
        refresh_users(state, &ids).await?;
        if (ids.len() as u64) < USERS_PER_QUERY {
            return Ok(());
        }
        after = Some(last);
    }
}

/// The last version handed out by this process.
static LAST_VERSION: AtomicU64 = AtomicU64::new(0);

/// The version of a refresh, taken before reading: now in microseconds, or
/// one more than the last version of this process if the clock has not moved.
pub(crate) fn version_now(now: DateTime<Utc>) -> u64 {
    let now = u64::try_from(now.timestamp_micros()).unwrap_or_default();
    let previous = LAST_VERSION
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
            Some(now.max(last.saturating_add(1)))
        })
        .unwrap_or(now);
    now.max(previous.saturating_add(1))
}

/// The snapshot of an ACTIVE user; `None` for anyone who may not act.
fn snapshot_of(
    model: &user::Model,
    permissions: Option<&Vec<String>>,
    version: u64,
) -> Option<PrincipalSnapshot> {
    let permissions = permissions?;
    if model.status != UserStatus::Active {
        return None;
    }
    Some(PrincipalSnapshot {
        account_id: model.account_id,
        user_id: model.id,
        status: SnapshotStatus::Active,
        permissions: permissions.clone(),
        role_id: model.role_id,
        password_change_required: model.password_change_required,
        version,
    })
}

async fn write(
    state: &Identity,
    user_id: Uuid,
    snapshot: Option<PrincipalSnapshot>,
) -> ApiResult<()> {
    match snapshot {
        None => {
            state.sessions.delete_principal(user_id).await?;
        }
        Some(snapshot) => {
            state.sessions.put_principal(snapshot).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_increase_even_when_the_clock_stands_still() {
        let now = DateTime::from_timestamp(1_800_000_000, 0).expect("time");
        let first = version_now(now);
        let second = version_now(now);
        assert!(second > first);
        let later = now + chrono::Duration::seconds(1);
        assert!(version_now(later) >= u64::try_from(later.timestamp_micros()).expect("positive"));
    }
}
