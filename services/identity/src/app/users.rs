//! UserService's commands: list, read, create (shared devices), edit, bulk
//! role or team change, deactivate, reactivate and delete the users of the
//! caller's account.
//!
//! Every query is scoped to the caller's account (P14): a user id of another
//! account answers the same NOT_FOUND as an unknown one. Every change runs in
//! one transaction that first locks the account row (`accounts::lock`), so
//! the seat limit and the at-least-one-manager rule hold under concurrency
//! (two admins demoting each other: one of them is refused), and writes its
//! audit entry and domain event in that transaction. After the commit the
//! user's principal snapshot is rewritten, so a role change or a
//! deactivation applies on the user's next call.

use sea_orm::{ConnectionTrait, DatabaseTransaction};
use usher_kit::{
    error::{ApiError, ApiResult},
    pagination,
    principal::Principal,
};
use usher_proto::identity::v1 as pb;
use uuid::Uuid;

use crate::{
    api::IdentityApi,
    app::{Call, view as convert},
    domain::accounts::require_enabled,
    domain::{
        effects::{Actor, Effects},
        grants::{Grant, Grantor},
        managers::{self, ManagerChange, check_managers_remain},
        seats,
        users::{
            self as rules, BatchFacts, BatchUpdate, CreateUser, Cursor, ListFilter, NewRole,
            UpdateUser, UserOrder,
        },
    },
    store::{
        accounts,
        effects::apply,
        entities::{team, user},
        idempotency::IdempotencyKey,
        principals, scoped,
        users::{self, NewUser, UserRow},
    },
};

/// What a ListUsers asks for, validated.
#[derive(Clone, Debug)]
pub struct ListUsers {
    /// Which users.
    pub filter: ListFilter,
    /// In which order.
    pub order: UserOrder,
    /// The order as asked (part of the page token's fingerprint).
    pub order_by: i32,
    /// Users per page.
    pub page_size: u64,
    /// Where the page starts.
    pub page_token: String,
}

/// What BatchUpdateUsers answers for each user.
#[derive(Debug)]
pub struct BatchOutcome {
    /// The failed items, by id.
    pub errors: std::collections::HashMap<Uuid, ApiError>,
    /// The users as they are now, by id.
    pub shown: std::collections::HashMap<Uuid, pb::User>,
}

/// The API form of a listed user.
fn view(row: &UserRow) -> pb::User {
    convert::user(&row.user, &row.role_name, row.team_name.as_deref())
}

/// One user of the account as the API shows it, or NOT_FOUND.
async fn shown<C: ConnectionTrait>(db: &C, account_id: Uuid, user_id: Uuid) -> ApiResult<pb::User> {
    Ok(view(&users::row(db, account_id, user_id).await?))
}

/// The caller as an audit actor (the user's display name when a user calls).
async fn actor<C: ConnectionTrait>(db: &C, principal: &Principal) -> ApiResult<Actor> {
    let name = users::display_name(db, principal.user_id).await?;
    Ok(Actor::from_principal(principal, name))
}

/// Writes `effects` of `call` at `now` in `txn`.
async fn write(
    txn: &DatabaseTransaction,
    effects: Effects,
    actor: &Actor,
    call: &Call,
    now: chrono::DateTime<chrono::Utc>,
) -> ApiResult<()> {
    Ok(apply(txn, effects, actor, &call.request_id, now).await?)
}

/// The optional team of the account, or NOT_FOUND.
async fn find_optional_team<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    team_id: Option<Uuid>,
) -> ApiResult<Option<team::Model>> {
    match team_id {
        Some(team_id) => scoped::team(db, account_id, team_id).await.map(Some),
        None => Ok(None),
    }
}

/// Refuses removing the last active manager: `target` goes from its current
/// role to one that manages users (`manager_after`) or not.
async fn check_manager_left(
    txn: &DatabaseTransaction,
    account_id: Uuid,
    target: &user::Model,
    manager_after: bool,
) -> ApiResult<()> {
    let roles = users::roles_of(txn, account_id).await?;
    let before = users::role_manages(&roles)
        .get(&target.role_id)
        .copied()
        .unwrap_or(false);
    let change = ManagerChange::of(target.owner, target.status, before, manager_after);
    if !change.removes_manager() {
        return Ok(());
    }
    let managers_now = users::count_managers(txn, account_id, &roles).await?;
    check_managers_remain(managers_now, &[change])
}

/// The caller as a grantor of roles to users.
fn grantor(principal: &Principal) -> Grantor<'_> {
    Grantor {
        user_id: principal.user_id,
        role_id: None,
        permissions: &principal.permissions,
    }
}

/// The reads of [`IdentityApi::list_user_page`], on `db`.
async fn read_user_page<C: ConnectionTrait>(
    db: &C,
    query: &ListUsers,
) -> ApiResult<pb::ListUsersResponse> {
    let filter = &query.filter;
    let fingerprint = pagination::fingerprint(&(
        filter.account_id,
        filter.status.map(|s| s.as_str()),
        filter.role_id,
        filter.team_id,
        &filter.term,
        query.order_by,
    ));
    let cursor: Option<Cursor> = pagination::decode_token(&fingerprint, &query.page_token)?;
    // The owner heads the first page when it matches the filters; the
    // keyset then walks the other users.
    let mut page: Vec<pb::User> = Vec::new();
    if cursor.is_none()
        && let Some(owner) = users::matching_owner(db, filter).await?
    {
        page.push(view(&owner));
    }
    let wanted = query.page_size.saturating_sub(page.len() as u64);
    // One row more than shown tells whether a next page exists. The first
    // page counts the others up to COUNT_CAP + 1 in the same walk; with
    // the owner, the capped count. Later pages repeat the first's count.
    let after = cursor.as_ref().and_then(|c| c.after.as_ref());
    let count_cap = cursor.is_none().then_some(rules::COUNT_CAP);
    let listed = users::page(db, filter, query.order, after, wanted + 1, count_cap)
        .await?
        .ok_or_else(rules::invalid_token)?;
    let (total, capped) = match &cursor {
        None => rules::capped_count(listed.matched + page.len() as u64),
        Some(Cursor {
            total: Some(total),
            capped,
            ..
        }) => (*total, *capped),
        Some(_) => rules::capped_count(users::count_up_to(db, filter, rules::COUNT_CAP).await?),
    };
    let more = listed.users.len() as u64 > wanted;
    let shown = listed
        .users
        .get(..usize::try_from(wanted).unwrap_or(usize::MAX))
        .unwrap_or(&listed.users);
    page.extend(shown.iter().map(|(_, row)| view(row)));
    let next_page_token = if more {
        pagination::encode_token(
            &fingerprint,
            &Cursor {
                after: shown.last().map(|(last, _)| last.key(query.order)),
                total: Some(total),
                capped,
            },
        )
    } else {
        String::new()
    };
    Ok(pb::ListUsersResponse {
        users: page,
        next_page_token,
        total_size: i32::try_from(total).unwrap_or(i32::MAX),
        total_size_capped: capped,
    })
}

impl IdentityApi {
    /// ListUsers: the owner first (on the first page, when it matches), then
    /// the others in keyset order. The first page counts the matches up to
    /// [`rules::COUNT_CAP`] in the same keyset query as its rows; later
    /// pages repeat that count from the token.
    ///
    /// A filtered listing (a search term, a status, a role or a team) runs
    /// its reads in a transaction that plans each of them for its own
    /// values (`plan_cache_mode = force_custom_plan`, PostgreSQL): after
    /// five executions of a prepared statement PostgreSQL may keep one
    /// generic plan for every value, and for a search that plan guesses
    /// the term's matches from nothing (measured: a generic bitmap plan
    /// reading and sorting every match of `son 001`, 30–60 ms at 100,000
    /// users; planned for each term, none took 25 ms).
    pub(crate) async fn list_user_page(
        &self,
        query: ListUsers,
    ) -> ApiResult<pb::ListUsersResponse> {
        let filter = &query.filter;
        let filtered = !filter.term.is_empty()
            || filter.status.is_some()
            || filter.role_id.is_some()
            || filter.team_id.is_some();
        let db = &self.state.db;
        if !filtered || db.get_database_backend() != sea_orm::DbBackend::Postgres {
            return read_user_page(db, &query).await;
        }
        let txn = usher_kit::db::begin(db).await?;
        txn.execute_unprepared("SET LOCAL plan_cache_mode = force_custom_plan")
            .await?;
        let page = read_user_page(&txn, &query).await?;
        txn.commit().await?;
        Ok(page)
    }

    /// GetUser.
    pub(crate) async fn find_user(&self, account_id: Uuid, user_id: Uuid) -> ApiResult<pb::User> {
        shown(&self.state.db, account_id, user_id).await
    }

    /// CreateUser: a direct, ACTIVE user with `password` (checked against
    /// the policy) or, with an email and no password, the set-password link
    /// emailed in the same transaction. Replays the answer of an earlier call
    /// with the same `idempotency` key.
    pub(crate) async fn create_direct_user(
        &self,
        call: &Call,
        command: CreateUser,
        password: Option<String>,
        idempotency: Option<IdempotencyKey>,
    ) -> ApiResult<pb::CreateUserResponse> {
        let account_id = call.principal.account()?;
        // Read outside the account lock so that hashing (tens of ms) never
        // holds it; a role edited meanwhile changes nothing here (adding a user
        // can only add managers).
        let role = scoped::role(&self.state.db, account_id, command.role_id).await?;
        // No escalation (P26): the new user's role carries nothing the
        // caller lacks.
        let granted = accounts::effective_permissions(&self.state.db, &role).await?;
        crate::domain::grants::check_grant(
            &grantor(&call.principal),
            &Grant::Role {
                user: None,
                role_id: command.role_id,
                permissions: &granted,
            },
        )?;
        find_optional_team(&self.state.db, account_id, command.team_id).await?;
        let role_manages = managers::manages(&convert::strings(&role.permissions));
        rules::check_password_needed(password.is_some(), role_manages, command.email.is_some())?;
        // The user has an email and no password: it cannot sign in until it
        // chooses one with the link emailed below (AuthService.SetPassword).
        let password_hash = match password {
            Some(password) => Some(self.state.passwords.hash(password).await?),
            None => None,
        };

        let now = self.state.clock.now();
        let txn = usher_kit::db::begin(&self.state.db).await?;
        let account = accounts::lock(&txn, account_id).await?;
        // A concurrent retry with the same key waited for the lock: answer it
        // the stored response.
        if let Some(key) = &idempotency
            && let Some(done) = key.replay(&txn).await?
        {
            return Ok(done);
        }
        seats::check_multi_user_plan(account.seat_limit)?;
        seats::check_free_seat(
            account.seat_limit,
            accounts::seats_used(&txn, account_id).await?,
        )?;
        require_enabled(&account, &command.products)?;
        if let Some(email) = &command.email {
            let allowed = convert::strings(&account.allowed_email_domains);
            seats::check_allowed_domain(&allowed, email)?;
        }
        let email = command.canonical_email();
        if let Some(existing) =
            users::holding_name_or_email(&txn, account_id, &command.username, email.as_deref())
                .await?
        {
            return Err(rules::already_used(&existing, &command.username));
        }

        let row = users::new_direct_row(
            Uuid::new_v4(),
            NewUser {
                account_id,
                email,
                username: Some(command.username.clone()),
                display_name: command.display_name.clone(),
                role_id: command.role_id,
                team_id: command.team_id,
                products: command.products.clone(),
                locale: command.locale.clone(),
                metadata: command.metadata.clone(),
            },
            password_hash,
            command.require_password_change,
            now,
        );
        let inserted = match users::insert(&txn, row).await {
            Ok(inserted) => inserted,
            Err(err) if err.is_taken() => return Err(rules::taken_by_a_concurrent_create()),
            Err(err) => return Err(err.into()),
        };
        // No password: the "choose your password" email, in this
        // transaction (the outbox), so a committed user always gets it.
        let set_password_link = match (&inserted.password_hash, &inserted.email_canonical) {
            (None, Some(_)) => Some(
                crate::app::auth::queue_set_password_link(
                    &self.state,
                    &txn,
                    &account,
                    &inserted,
                    &call.request_id,
                    now,
                )
                .await?,
            ),
            _ => None,
        };
        let actor = actor(&txn, &call.principal).await?;
        let effects = rules::created(&inserted, &command, set_password_link, &actor, now);
        write(&txn, effects, &actor, call, now).await?;
        let response = pb::CreateUserResponse {
            user: Some(shown(&txn, account_id, inserted.id).await?),
        };
        if let Some(key) = &idempotency {
            key.remember(&txn, &response, now).await?;
        }
        txn.commit().await?;
        principals::refresh_user(&self.state, inserted.id).await?;
        Ok(response)
    }

    /// UpdateUser: the fields of `command` that differ, checked in the order
    /// display name, role, team, products.
    pub(crate) async fn change_user(
        &self,
        call: &Call,
        command: UpdateUser,
    ) -> ApiResult<pb::User> {
        let account_id = call.principal.account()?;
        let user_id = command.user_id;
        let now = self.state.clock.now();
        let txn = usher_kit::db::begin(&self.state.db).await?;
        let account = accounts::lock(&txn, account_id).await?;
        let target = users::lock_user(&txn, account_id, user_id).await?;
        rules::check_editable(&target, call.principal.user_id == Some(target.id))?;
        if let Some(role_id) = command.role_id.filter(|r| *r != target.role_id) {
            let role = scoped::role(&txn, account_id, role_id).await?;
            let granted = accounts::effective_permissions(&txn, &role).await?;
            rules::check_role_change(&target, &grantor(&call.principal), role_id, &granted)?;
            let manages = managers::manages(&convert::strings(&role.permissions));
            check_manager_left(&txn, account_id, &target, manages).await?;
        }
        if let Some(team_id) = command.team_id.filter(|t| *t != target.team_id) {
            find_optional_team(&txn, account_id, team_id).await?;
        }
        if let Some(products) = &command.products {
            require_enabled(&account, products)?;
        }
        let actor = actor(&txn, &call.principal).await?;
        let search_text = |name: &str| {
            users::search_text(
                name,
                target.email_canonical.as_deref(),
                target.username.as_deref(),
            )
        };
        if let Some((row, effects)) = rules::updated(&target, &command, search_text, &actor, now) {
            users::save(&txn, row).await?;
            write(&txn, effects, &actor, call, now).await?;
        }
        let user = shown(&txn, account_id, user_id).await?;
        txn.commit().await?;
        // Also after an update that changed nothing: a retry after a failed
        // refresh repairs the snapshot.
        principals::refresh_user(&self.state, user_id).await?;
        Ok(user)
    }

    /// BatchUpdateUsers: every item judged on its own and across the batch;
    /// the ones that pass change in one statement.
    pub(crate) async fn change_users(
        &self,
        call: &Call,
        command: BatchUpdate,
    ) -> ApiResult<BatchOutcome> {
        let account_id = call.principal.account()?;
        let now = self.state.clock.now();
        let txn = usher_kit::db::begin(&self.state.db).await?;
        accounts::lock(&txn, account_id).await?;
        let roles = users::roles_of(&txn, account_id).await?;
        let new_role = match command.role_id {
            Some(role_id) => Some(
                roles
                    .get(&role_id)
                    .cloned()
                    .ok_or_else(|| ApiError::not_found("role"))?,
            ),
            None => None,
        };
        if command.set_team {
            find_optional_team(&txn, account_id, command.team_id).await?;
        }
        let granted = match &new_role {
            Some(role) => accounts::effective_permissions(&txn, role).await?,
            None => Vec::new(),
        };
        let found = users::lock_users(&txn, account_id, &command.user_ids).await?;
        let managers_now = users::count_managers(&txn, account_id, &roles).await?;
        let actor = actor(&txn, &call.principal).await?;
        let facts = BatchFacts {
            found,
            role_manages: users::role_manages(&roles),
            managers_now,
            new_role: new_role.as_ref().map(|role| NewRole {
                id: role.id,
                manages: managers::manages(&convert::strings(&role.permissions)),
                granted: &granted,
            }),
        };
        let decision = rules::decide_batch(&command, facts, &grantor(&call.principal), &actor, now);
        let changed: Vec<Uuid> = decision.changed().map(|i| i.target.id).collect();
        let refresh: Vec<Uuid> = decision
            .changed()
            .filter(|i| i.role_changes)
            .map(|i| i.target.id)
            .collect();
        if !changed.is_empty() {
            users::set_role_and_team(
                &txn,
                account_id,
                &changed,
                command.role_id,
                command.set_team.then_some(command.team_id),
                now,
            )
            .await?;
            write(&txn, decision.effects, &actor, call, now).await?;
        }
        let ok_ids: Vec<Uuid> = decision.items.iter().map(|i| i.target.id).collect();
        let shown = users::rows(&txn, account_id, &ok_ids)
            .await?
            .into_iter()
            .map(|(id, row)| (id, view(&row)))
            .collect();
        txn.commit().await?;
        principals::refresh_users(&self.state, &refresh).await?;
        Ok(BatchOutcome {
            errors: decision.errors,
            shown,
        })
    }

    /// DeactivateUser: frees the seat and signs the user out everywhere.
    pub(crate) async fn deactivate(&self, call: &Call, user_id: Uuid) -> ApiResult<pb::User> {
        let account_id = call.principal.account()?;
        let now = self.state.clock.now();
        let txn = usher_kit::db::begin(&self.state.db).await?;
        accounts::lock(&txn, account_id).await?;
        let target = users::lock_user(&txn, account_id, user_id).await?;
        rules::check_deactivate(&target, call.principal.user_id == Some(target.id))?;
        check_manager_left(&txn, account_id, &target, false).await?;
        let actor = actor(&txn, &call.principal).await?;
        let (row, effects) = rules::deactivated(&target, &actor, now);
        users::save(&txn, row).await?;
        write(&txn, effects, &actor, call, now).await?;
        let user = shown(&txn, account_id, user_id).await?;
        self.sign_out_everywhere(user_id).await?;
        txn.commit().await?;
        self.sign_out_after_commit(user_id).await?;
        Ok(user)
    }

    /// ReactivateUser: needs a free seat.
    pub(crate) async fn reactivate(&self, call: &Call, user_id: Uuid) -> ApiResult<pb::User> {
        let account_id = call.principal.account()?;
        let now = self.state.clock.now();
        let txn = usher_kit::db::begin(&self.state.db).await?;
        let account = accounts::lock(&txn, account_id).await?;
        let target = users::lock_user(&txn, account_id, user_id).await?;
        rules::check_reactivate(&target)?;
        seats::check_free_seat(
            account.seat_limit,
            accounts::seats_used(&txn, account_id).await?,
        )?;
        let actor = actor(&txn, &call.principal).await?;
        let (row, effects) = rules::reactivated(&target, &actor, now);
        users::save(&txn, row).await?;
        write(&txn, effects, &actor, call, now).await?;
        let user = shown(&txn, account_id, user_id).await?;
        txn.commit().await?;
        principals::refresh_user(&self.state, user_id).await?;
        Ok(user)
    }

    /// DeleteUser: removes the user and its sessions.
    pub(crate) async fn remove_user(&self, call: &Call, user_id: Uuid) -> ApiResult<()> {
        let account_id = call.principal.account()?;
        let now = self.state.clock.now();
        let txn = usher_kit::db::begin(&self.state.db).await?;
        accounts::lock(&txn, account_id).await?;
        let target = users::lock_user(&txn, account_id, user_id).await?;
        rules::check_delete(&target, call.principal.user_id == Some(target.id))?;
        check_manager_left(&txn, account_id, &target, false).await?;
        users::delete(&txn, account_id, user_id).await?;
        let actor = actor(&txn, &call.principal).await?;
        write(
            &txn,
            rules::deleted(&target, &actor, now),
            &actor,
            call,
            now,
        )
        .await?;
        self.sign_out_everywhere(user_id).await?;
        txn.commit().await?;
        self.sign_out_after_commit(user_id).await
    }

    /// Ends every session of a user who may no longer act; called before the
    /// commit, so that if the session store is down the change is not made
    /// (fail closed).
    async fn sign_out_everywhere(&self, user_id: Uuid) -> ApiResult<()> {
        self.state.sessions.revoke_user(user_id).await?;
        self.state.sessions.delete_principal(user_id).await?;
        Ok(())
    }

    /// Again after the commit: a sign-in that read the user before the commit
    /// may have created a session meanwhile; and the snapshot follows the
    /// committed state.
    async fn sign_out_after_commit(&self, user_id: Uuid) -> ApiResult<()> {
        self.state.sessions.revoke_user(user_id).await?;
        principals::refresh_user(&self.state, user_id).await
    }
}
