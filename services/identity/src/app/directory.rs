//! DirectoryService as load → decide → persist: each function opens the
//! transaction, loads what the rules of `domain::reservations` judge through
//! `store::directory`, asks them, and writes their answer and its effects
//! (`store::effects`) in that transaction.
//!
//! Seats: reservations and releases first lock the account row
//! (`accounts::lock`), like every other change that counts seats, so two
//! concurrent reservations are counted one after the other and never exceed
//! the limit. Activation hashes the password before opening the transaction
//! (argon2id takes tens of milliseconds and must not hold locks).

use std::collections::{BTreeMap, HashMap, HashSet};

use usher_kit::{
    email::canonical_domain,
    error::{ApiError, ApiResult},
    sessions::{IssuedSession, SessionMeta},
};
use usher_proto::identity::{internal::v1 as internal, v1 as pb};
use uuid::Uuid;

use crate::{
    app::view as convert,
    domain::accounts::require_enabled,
    domain::{
        USERS_MANAGE, UserStatus,
        effects::Actor,
        grants::{self, Grant, Grantor},
        reservations::{
            self, Acceptance, Invitee, Member, ReleaseKey, ReleaseTarget, Released, Reservation,
            Reserved,
        },
    },
    state::Identity,
    store::{
        accounts::{self, Holder, HolderRecord},
        directory::{self as store, InvitedRows},
        effects, principals, scoped,
        users::search_text,
    },
};

/// Who invites, as named by the calling service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Inviter {
    /// A user of the account.
    User(Uuid),
    /// An API key of the account.
    ApiKey(Uuid),
}

/// A validated GetInvitationContext.
#[derive(Clone, Debug)]
pub struct ContextQuery {
    /// The account.
    pub account_id: Uuid,
    /// The role to describe, if any.
    pub role_id: Option<Uuid>,
    /// The team to describe, if any.
    pub team_id: Option<Uuid>,
    /// The inviter to describe, if any.
    pub inviter: Option<Inviter>,
    /// What the inviter holds is read for this holder (P26).
    pub holder: Option<Holder>,
}

/// Whether `holder` may grant `role` (P26): nothing for no holder.
async fn may_grant<C: sea_orm::ConnectionTrait>(
    db: &C,
    account: &crate::store::entities::account::Model,
    role: &crate::store::entities::role::Model,
    holder: Option<Holder>,
    now: chrono::DateTime<chrono::Utc>,
) -> ApiResult<()> {
    let granted = accounts::effective_permissions_in(db, role, account).await?;
    let held = match holder {
        Some(holder) => accounts::held_permissions(db, account, holder, now).await?,
        None => Vec::new(),
    };
    check_may_grant(role, &held, &granted)
}

/// Whether what a holder `held` covers `granted`, the permissions of `role`.
fn check_may_grant(
    role: &crate::store::entities::role::Model,
    held: &[String],
    granted: &[String],
) -> ApiResult<()> {
    grants::check_grant(
        &Grantor {
            user_id: None,
            role_id: None,
            permissions: held,
        },
        &Grant::Role {
            user: None,
            role_id: role.id,
            permissions: granted,
        },
    )
}

/// The context of an invitation: the account, inviter, role and team.
pub async fn invitation_context(
    state: &Identity,
    query: ContextQuery,
) -> ApiResult<internal::GetInvitationContextResponse> {
    let db = &state.db;
    let account_id = query.account_id;
    let account = accounts::find(db, account_id).await?;
    let seats_used = accounts::seats_used(db, account_id).await?;
    let mut response = describe(state, db, &account, query.inviter, seats_used).await?;
    if let Some(role_id) = query.role_id {
        let role = scoped::role(db, account_id, role_id).await?;
        // The rule of ReserveInvitees (P26), for callers that hand the role
        // out again (ResendInvitations).
        let may = query.inviter.is_some()
            && may_grant(db, &account, &role, query.holder, state.clock.now())
                .await
                .is_ok();
        describe_role(&mut response, &role, may);
    }
    if let Some(team_id) = query.team_id {
        response.team_name = scoped::team(db, account_id, team_id).await?.name;
    }
    Ok(response)
}

/// The part of an invitation's context that needs no role or team: the
/// account with `seats_used` and its effective invitation lifetime, the
/// password rules, and the inviter, if any (NOT_FOUND when it is not of the
/// account).
async fn describe<C: sea_orm::ConnectionTrait>(
    state: &Identity,
    db: &C,
    account: &crate::store::entities::account::Model,
    inviter: Option<Inviter>,
    seats_used: u64,
) -> ApiResult<internal::GetInvitationContextResponse> {
    let record = match inviter {
        None => None,
        Some(Inviter::User(id)) => {
            Some(HolderRecord::User(scoped::user(db, account.id, id).await?))
        }
        Some(Inviter::ApiKey(id)) => Some(HolderRecord::ApiKey(
            store::inviter_key(db, account.id, id).await?,
        )),
    };
    Ok(describe_record(state, account, record.as_ref(), seats_used))
}

/// [`describe`] with the inviter's record already read.
fn describe_record(
    state: &Identity,
    account: &crate::store::entities::account::Model,
    inviter: Option<&HolderRecord>,
    seats_used: u64,
) -> internal::GetInvitationContextResponse {
    let policy = &state.password_policy;
    let mut response = internal::GetInvitationContextResponse {
        password_policy: Some(pb::PasswordPolicy {
            min_length: i32::try_from(policy.min_length()).unwrap_or(i32::MAX),
            max_length: i32::try_from(policy.max_length()).unwrap_or(i32::MAX),
        }),
        ..Default::default()
    };
    match inviter {
        Some(HolderRecord::User(inviter)) => {
            response.inviter_email = inviter
                .email
                .clone()
                .or_else(|| inviter.email_canonical.clone())
                .unwrap_or_default();
            response.inviter_active = inviter.status == UserStatus::Active;
            response.inviter_display_name = inviter.display_name.clone();
            response.inviter_locale = inviter.locale.clone();
        }
        Some(HolderRecord::ApiKey(key)) => {
            let now = state.clock.now();
            response.inviter_active =
                key.revoke_time.is_none() && key.expire_time.is_none_or(|at| at > now);
            response.inviter_display_name = key.name.clone();
        }
        None => {}
    }
    // With the effective lifetime: the account's, or the deployment default.
    response.account = Some(convert::account(
        account,
        seats_used,
        state.settings.default_invitation_lifetime,
    ));
    response
}

/// `context` with the seats used the reservation found.
fn with_seats(
    context: &internal::GetInvitationContextResponse,
    seats_used: u64,
) -> internal::GetInvitationContextResponse {
    let mut context = context.clone();
    if let Some(account) = context.account.as_mut() {
        account.seats_used = i32::try_from(seats_used).unwrap_or(i32::MAX);
    }
    context
}

/// Adds the role to a context.
fn describe_role(
    response: &mut internal::GetInvitationContextResponse,
    role: &crate::store::entities::role::Model,
    inviter_may_grant: bool,
) {
    response.role_manages_users = convert::strings(&role.permissions)
        .iter()
        .any(|p| p == USERS_MANAGE);
    response.inviter_may_grant_role = inviter_may_grant;
    response.role_name = role.name.clone();
}

/// A validated ReserveInvitees.
#[derive(Clone, Debug)]
pub struct ReserveInvitees {
    /// The account.
    pub account_id: Uuid,
    /// The role the invitees get.
    pub role_id: Uuid,
    /// The team they join.
    pub team_id: Option<Uuid>,
    /// The products granted.
    pub products: Vec<String>,
    /// Platform metadata.
    pub metadata: Option<serde_json::Value>,
    /// Their locale (empty: the account's).
    pub locale: String,
    /// The invitees, each address and invitation id once.
    pub invitees: Vec<Invitee>,
    /// Decide without writing.
    pub dry_run: bool,
    /// Whose permissions bound the role granted (P26).
    pub holder: Option<Holder>,
    /// The actor of the audit entries and events.
    pub actor: Actor,
}

/// A reservation's answer with the names the invitation service shows.
#[derive(Clone, Debug)]
pub struct ReservationAnswer {
    /// The verdicts and seat count.
    pub reserved: Reserved,
    /// The account's seat limit.
    pub seat_limit: i32,
    /// The role's name.
    pub role_name: String,
    /// The team's name (empty for none).
    pub team_name: String,
    /// The context GetInvitationContext answers for this account, inviter,
    /// role and team, as read before the reservation.
    pub context: internal::GetInvitationContextResponse,
}

/// A reservation waiting for its batch.
#[derive(Debug)]
pub struct QueuedReservation {
    request_id: String,
    command: ReserveInvitees,
}

/// The batches of reservations, one worker per lane (see
/// [`usher_kit::coalesce`] and [`RESERVATION_LANES`]).
pub type Reservations =
    usher_kit::coalesce::Coalescer<u8, QueuedReservation, ApiResult<ReservationAnswer>>;

/// Reservations per batch at most (each holds up to 1,000 invitees).
pub const RESERVATION_BATCH: usize = 64;

/// Invitees per batch at most: a batch's reads name each invitee's address
/// and invitation (two parameters each), far below PostgreSQL's 65,535
/// parameters per statement, and its memory stays bounded.
pub const RESERVATION_INVITEES: usize = 8_000;

/// The batches of reservations of one service.
pub fn reservations() -> Reservations {
    Reservations::new(RESERVATION_BATCH).with_max_weight(RESERVATION_INVITEES)
}

/// The lanes reservations are batched in. Every account belongs to one lane
/// (by its id), so its reservations are always batched, decided and
/// committed in arrival order by that lane's worker; a lane's batch holds the
/// reservations of every account of the lane that arrived while the last one
/// ran, committed together. More lanes run more transactions at once; fewer
/// gather more accounts into each commit. Four keep two cores busy while a
/// batch waits for its commit.
pub const RESERVATION_LANES: u8 = 4;

/// The lane of `account_id`.
fn lane(account_id: Uuid) -> u8 {
    // The low bits of a v4 or v7 id are random.
    u8::try_from(account_id.as_u128() % u128::from(RESERVATION_LANES)).unwrap_or(0)
}

/// Reserves a seat for each invitee that may have one.
///
/// The call joins its lane's next batch (see [`RESERVATION_LANES`]):
/// concurrent reservations are checked and written together in one
/// transaction — the batch's accounts locked in one statement in id order;
/// the roles, teams and inviters all its calls name, the inviters' roles and
/// the products read in one query each; the seat counters and the existing
/// invitees of all its accounts in one query each; then the new users, audit
/// entries and events written in one statement each and one commit — and
/// each call is decided
/// in arrival order against what the calls of its account before it took,
/// exactly as if they had run one after the other. A batch that fails as a
/// whole is run again call by call, so each caller gets its own answer.
pub async fn reserve_invitees(
    state: &Identity,
    request_id: &str,
    command: ReserveInvitees,
) -> ApiResult<ReservationAnswer> {
    let lane = lane(command.account_id);
    let weight = command.invitees.len().max(1);
    let queued = QueuedReservation {
        request_id: request_id.to_owned(),
        command,
    };
    let batch_state = state.clone();
    state
        .reservations
        .submit_weighted(lane, queued, weight, move |batch| {
            let state = batch_state.clone();
            async move { reserve_batch(&state, batch).await }
        })
        .await
        .map_err(|err| ApiError::Unavailable(err.to_string()))?
}

/// Runs one batch of reservations; a batch that fails as a whole is run
/// again one reservation at a time.
async fn reserve_batch(
    state: &Identity,
    batch: Vec<QueuedReservation>,
) -> Vec<ApiResult<ReservationAnswer>> {
    match reserve_together(state, &batch).await {
        Ok(answers) => answers,
        Err(err) if batch.len() == 1 => vec![Err(err)],
        Err(err) => {
            tracing::debug!(error = %err, size = batch.len(), "reservation batch retried call by call");
            let mut answers = Vec::with_capacity(batch.len());
            for one in &batch {
                answers.push(
                    match reserve_together(state, std::slice::from_ref(one)).await {
                        Ok(mut answer) => answer.pop().unwrap_or_else(|| Err(missing())),
                        Err(err) => Err(err),
                    },
                );
            }
            answers
        }
    }
}

/// Whether `err` is a failure of the database (the batch as a whole fails
/// and is retried call by call) rather than one call's refusal.
fn fails_the_batch(err: &ApiError) -> bool {
    matches!(err, ApiError::Unavailable(_) | ApiError::Internal(_))
}

/// A reservation whose role, team, grant and inviter were checked in its
/// batch: what its decision needs.
struct Checked {
    context: internal::GetInvitationContextResponse,
    role: crate::store::entities::role::Model,
    team: Option<crate::store::entities::team::Model>,
    /// The command's actor, named after the inviter when the caller did not.
    actor: Actor,
}

/// The checks of the calls of one account of a batch, on what the batch
/// read for all its accounts ([`store::Named`]), each result once per
/// account: the permissions granted by each role and held by each holder,
/// and the context of each inviter.
struct BatchReads<'a> {
    state: &'a Identity,
    account: &'a crate::store::entities::account::Model,
    named: &'a store::Named,
    now: chrono::DateTime<chrono::Utc>,
    granted: HashMap<Uuid, Vec<String>>,
    held: HashMap<Holder, Vec<String>>,
    described: HashMap<Option<Inviter>, internal::GetInvitationContextResponse>,
}

impl<'a> BatchReads<'a> {
    fn new(
        state: &'a Identity,
        account: &'a crate::store::entities::account::Model,
        named: &'a store::Named,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Self {
        Self {
            state,
            account,
            named,
            now,
            granted: HashMap::new(),
            held: HashMap::new(),
            described: HashMap::new(),
        }
    }

    /// The record of `holder` if it is of the account.
    fn record(&self, holder: Holder) -> Option<HolderRecord> {
        let account_id = self.account.id;
        match holder {
            Holder::User(id) => self
                .named
                .users
                .get(&id)
                .filter(|u| u.account_id == account_id)
                .cloned()
                .map(HolderRecord::User),
            Holder::ApiKey(id) => self
                .named
                .keys
                .get(&id)
                .filter(|k| k.account_id == Some(account_id))
                .cloned()
                .map(HolderRecord::ApiKey),
        }
    }

    /// The checks of one reservation that need no seat, in the order a
    /// caller sees their refusals: the role exists in the account, the
    /// inviter may grant it (P26: the invitees' role carries nothing the
    /// inviter lacks, read here, not taken from the calling service), the
    /// team exists, the products are enabled and the account may invite.
    /// Then the context the caller would otherwise ask for separately (its
    /// seats used are those the batch finds before it).
    async fn check<C: sea_orm::ConnectionTrait>(
        &mut self,
        db: &C,
        command: &ReserveInvitees,
    ) -> ApiResult<Checked> {
        let account_id = self.account.id;
        let role = self
            .named
            .roles
            .get(&command.role_id)
            .filter(|r| r.account_id == account_id)
            .cloned()
            .ok_or_else(|| ApiError::not_found("role"))?;
        let granted = self
            .granted
            .entry(role.id)
            .or_insert_with(|| {
                accounts::effective_permissions_with(&role, self.account, &self.named.products)
            })
            .clone();
        let held = match command.holder {
            None => Vec::new(),
            Some(holder) => match self.held.get(&holder) {
                Some(held) => held.clone(),
                None => {
                    let record = self.record(holder);
                    let holder_role = match &record {
                        Some(HolderRecord::User(user)) => self.named.roles.get(&user.role_id),
                        _ => None,
                    };
                    let held = accounts::held_with(
                        db,
                        self.account,
                        record.as_ref(),
                        holder_role,
                        &self.named.products,
                        self.now,
                    )
                    .await?;
                    self.held.insert(holder, held.clone());
                    held
                }
            },
        };
        check_may_grant(&role, &held, &granted)?;
        let team = match command.team_id {
            None => None,
            Some(team_id) => Some(
                self.named
                    .teams
                    .get(&team_id)
                    .filter(|t| t.account_id == account_id)
                    .cloned()
                    .ok_or_else(|| ApiError::not_found("team"))?,
            ),
        };
        require_enabled(self.account, &command.products)?;
        reservations::check_inviting_allowed(self.account.seat_limit)?;
        let inviter = command.holder.map(|holder| match holder {
            Holder::User(id) => Inviter::User(id),
            Holder::ApiKey(id) => Inviter::ApiKey(id),
        });
        let mut context = match self.described.get(&inviter) {
            Some(context) => context.clone(),
            None => {
                // The inviter is the holder, whose record the grant check read.
                let record = match command.holder {
                    None => None,
                    Some(holder) => Some(self.record(holder).ok_or_else(|| {
                        ApiError::not_found(match holder {
                            Holder::User(_) => "user",
                            Holder::ApiKey(_) => "inviter",
                        })
                    })?),
                };
                let context = describe_record(self.state, self.account, record.as_ref(), 0);
                self.described.insert(inviter, context.clone());
                context
            }
        };
        describe_role(&mut context, &role, inviter.is_some());
        if let Some(team) = &team {
            context.team_name = team.name.clone();
        }
        let mut actor = command.actor.clone();
        if actor.name.is_empty() {
            // The audit log names the inviter even when the caller did not.
            actor.name = context.inviter_display_name.clone();
        }
        Ok(Checked {
            context,
            role,
            team,
            actor,
        })
    }
}

/// What a batch writes at its end: the new users and the effects of every
/// call that reserved, whatever its account.
#[derive(Default)]
struct BatchWrites<'b> {
    new_users: Vec<crate::store::entities::user::ActiveModel>,
    effects: Vec<(crate::domain::effects::Effects, Actor, &'b str)>,
}

/// The calls of one account of a batch, with their checks.
struct AccountCalls<'b> {
    account: crate::store::entities::account::Model,
    /// Indexes into the batch, in arrival order.
    indices: Vec<usize>,
    calls: Vec<&'b QueuedReservation>,
    checked: Vec<ApiResult<Checked>>,
}

/// The invitees of the calls of `group` that passed their checks.
fn checked_invitees<'g>(group: &AccountCalls<'g>) -> Vec<&'g Invitee> {
    group
        .calls
        .iter()
        .zip(&group.checked)
        .filter(|(_, checked)| checked.is_ok())
        .flat_map(|(queued, _)| queued.command.invitees.iter())
        .collect()
}

/// Checks, decides and writes `batch` in one transaction under the locks of
/// its accounts: load (the accounts locked, what the calls name read for
/// all of them, each call's checks, then the seat counters and existing
/// invitees of all of them in one query each),
/// decide each account's calls in arrival order, write. The outer error
/// fails the whole batch (nothing written); the inner ones are each call's
/// own refusals.
async fn reserve_together(
    state: &Identity,
    batch: &[QueuedReservation],
) -> ApiResult<Vec<ApiResult<ReservationAnswer>>> {
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    let now = state.clock.now();
    // The batch's accounts in id order, each with its calls in arrival order.
    let mut by_account: BTreeMap<Uuid, Vec<usize>> = BTreeMap::new();
    for (index, queued) in batch.iter().enumerate() {
        by_account
            .entry(queued.command.account_id)
            .or_default()
            .push(index);
    }
    let mut answers: Vec<Option<ApiResult<ReservationAnswer>>> =
        std::iter::repeat_with(|| None).take(batch.len()).collect();
    let txn = usher_kit::db::begin(&state.writes).await?;
    // Every change that counts seats takes its account's lock first:
    // concurrent reservations (of other replicas too) are counted one after
    // the other.
    let mut locked = accounts::lock_all(&txn, by_account.keys().copied().collect()).await?;
    // What the calls name, for all the accounts at once.
    let commands = || batch.iter().map(|queued| &queued.command);
    let holders = || commands().filter_map(|command| command.holder);
    let named = store::read_named(
        &txn,
        commands().map(|c| c.role_id).collect(),
        commands().filter_map(|c| c.team_id).collect(),
        holders()
            .filter_map(|h| match h {
                Holder::User(id) => Some(id),
                Holder::ApiKey(_) => None,
            })
            .collect(),
        holders()
            .filter_map(|h| match h {
                Holder::ApiKey(id) => Some(id),
                Holder::User(_) => None,
            })
            .collect(),
        locked
            .values()
            .flat_map(|account| convert::strings(&account.products))
            .collect::<HashSet<String>>()
            .into_iter()
            .collect(),
    )
    .await?;
    let mut groups = Vec::with_capacity(by_account.len());
    for (account_id, indices) in by_account {
        let Some(account) = locked.remove(&account_id) else {
            for index in indices {
                answers[index] = Some(Err(ApiError::not_found("account")));
            }
            continue;
        };
        let calls: Vec<&QueuedReservation> = indices.iter().map(|&i| &batch[i]).collect();
        let mut reads = BatchReads::new(state, &account, &named, now);
        let mut checked = Vec::with_capacity(calls.len());
        for queued in &calls {
            match reads.check(&txn, &queued.command).await {
                Err(err) if fails_the_batch(&err) => return Err(err),
                one => checked.push(one),
            }
        }
        groups.push(AccountCalls {
            account,
            indices,
            calls,
            checked,
        });
    }
    let ids: Vec<Uuid> = groups.iter().map(|g| g.account.id).collect();
    let mut seats = crate::store::seats::used_by(&txn, &ids).await?;
    let emails = groups
        .iter()
        .map(|group| {
            let emails = checked_invitees(group)
                .iter()
                .map(|i| i.email.canonical().to_owned())
                .collect();
            (group.account.id, emails)
        })
        .collect();
    let invitation_ids = groups
        .iter()
        .flat_map(|group| checked_invitees(group).into_iter().map(|i| i.invitation_id))
        .collect();
    let mut existing = store::existing_invitees(&txn, emails, invitation_ids).await?;
    let mut writes = BatchWrites::default();
    for group in groups {
        let seats_used = seats.remove(&group.account.id).unwrap_or(0);
        let decided = decide_in_account(
            group.calls,
            group.checked,
            &group.account,
            DecideIn {
                seats_used,
                existing: &mut existing,
                writes: &mut writes,
                now,
            },
        );
        for (&index, answer) in group.indices.iter().zip(decided) {
            answers[index] = Some(answer);
        }
    }
    if writes.new_users.is_empty() {
        txn.rollback().await?;
    } else {
        // The whole batch's users, audit entries and events: one statement
        // each (chunked far below PostgreSQL's bind limit).
        store::insert_users(&txn, writes.new_users).await?;
        let all = writes
            .effects
            .iter_mut()
            .map(|(effects, actor, request_id)| (std::mem::take(effects), &*actor, *request_id))
            .collect();
        effects::apply_all(&txn, all, now).await?;
        txn.commit().await?;
    }
    Ok(answers
        .into_iter()
        .map(|answer| answer.unwrap_or_else(|| Err(missing())))
        .collect())
}

/// What the decisions of one account of a batch start from and add to.
struct DecideIn<'x, 'b> {
    /// The account's seats used before the batch.
    seats_used: u64,
    /// The users the batch's invitees name (of any account: the rules match
    /// emails within the account and invitation ids everywhere); each call
    /// adds those it invites, for the calls after it.
    existing: &'x mut Vec<Member>,
    writes: &'x mut BatchWrites<'b>,
    now: chrono::DateTime<chrono::Utc>,
}

/// Decides the calls of one account of a batch, in arrival order, each
/// against what the calls before it took; adds what they reserve to
/// `writes`. Each answer is the call's own verdicts or refusal.
fn decide_in_account<'b>(
    calls: Vec<&'b QueuedReservation>,
    checked: Vec<ApiResult<Checked>>,
    account: &crate::store::entities::account::Model,
    into: DecideIn<'_, 'b>,
) -> Vec<ApiResult<ReservationAnswer>> {
    let DecideIn {
        mut seats_used,
        existing,
        writes,
        now,
    } = into;
    let account_id = account.id;
    let allowed: HashSet<String> = convert::strings(&account.allowed_email_domains)
        .iter()
        .filter_map(|d| canonical_domain(d).ok())
        .collect();
    let mut answers = Vec::with_capacity(calls.len());
    for (queued, checked) in calls.into_iter().zip(checked) {
        let command = &queued.command;
        let checked = match checked.and_then(|checked| {
            reservations::check_invitation_ids(account_id, &command.invitees, existing)
                .map(|()| checked)
        }) {
            Ok(checked) => checked,
            Err(err) => {
                answers.push(Err(err));
                continue;
            }
        };
        let team_id = checked.team.as_ref().map(|t| t.id);
        let reservation = Reservation {
            account_id,
            seat_limit: account.seat_limit,
            seats_used,
            allowed_domains: &allowed,
            role_id: checked.role.id,
            team_id,
            products: &command.products,
            dry_run: command.dry_run,
        };
        let seats_before = seats_used;
        let mut reserved = reservations::reserve(
            &reservation,
            &command.invitees,
            existing,
            &checked.actor,
            now,
            Uuid::new_v4,
        );
        let answer_effects = std::mem::take(&mut reserved.effects);
        if !command.dry_run && !reserved.new_users.is_empty() {
            let invited_by = format!("{}:{}", checked.actor.kind, checked.actor.id);
            writes.new_users.extend(store::invited_rows(
                &InvitedRows {
                    account_id,
                    role_id: checked.role.id,
                    team_id,
                    products: &command.products,
                    locale: &command.locale,
                    metadata: command.metadata.as_ref(),
                    invited_by: &invited_by,
                },
                &reserved.new_users,
                now,
            ));
            writes.effects.push((
                answer_effects,
                checked.actor.clone(),
                queued.request_id.as_str(),
            ));
            // The calls after this one see its invitees as taken.
            seats_used = reserved.seats_used;
            existing.extend(reserved.new_users.iter().map(|new| Member {
                id: new.id,
                account_id,
                email: Some(new.email.clone()),
                display_name: new.display_name.clone(),
                status: UserStatus::Invited,
                invitation_id: Some(new.invitation_id),
            }));
        }
        answers.push(Ok(ReservationAnswer {
            reserved,
            seat_limit: account.seat_limit,
            role_name: checked.role.name.clone(),
            team_name: checked
                .team
                .as_ref()
                .map(|t| t.name.clone())
                .unwrap_or_default(),
            context: with_seats(&checked.context, seats_before),
        }));
    }
    answers
}

/// A validated ActivateInvitedUser.
#[derive(Clone)]
pub struct ActivateInvitedUser {
    /// The invitation accepted.
    pub invitation_id: Uuid,
    /// The account.
    pub account_id: Uuid,
    /// The invited user.
    pub user_id: Uuid,
    /// The password chosen (checked against the policy).
    pub password: String,
    /// The choices of the invitee.
    pub acceptance: Acceptance,
}

impl std::fmt::Debug for ActivateInvitedUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActivateInvitedUser")
            .field("invitation_id", &self.invitation_id)
            .field("account_id", &self.account_id)
            .field("user_id", &self.user_id)
            .field("password", &"<redacted>")
            .field("acceptance", &self.acceptance)
            .finish()
    }
}

/// The answer to a retry: `Some` when `model` is ACTIVE through
/// `invitation_id`. Rewrites the principal snapshot, in case the first
/// attempt committed and then failed before doing it.
async fn already_activated(
    state: &Identity,
    model: &crate::store::entities::user::Model,
    invitation_id: Uuid,
) -> ApiResult<Option<internal::ActivateInvitedUserResponse>> {
    if !reservations::already_activated(model.status, model.invitation_id, invitation_id) {
        return Ok(None);
    }
    principals::refresh_user(state, model.id).await?;
    Ok(Some(internal::ActivateInvitedUserResponse {
        user: Some(user_view(&state.db, model).await?),
        already_activated: true,
    }))
}

/// A user as the API shows it, with the names of its role and team.
async fn user_view<C: sea_orm::ConnectionTrait>(
    db: &C,
    model: &crate::store::entities::user::Model,
) -> ApiResult<pb::User> {
    let (role_name, team_name) =
        store::role_and_team_names(db, model.role_id, model.team_id).await?;
    Ok(convert::user(
        model,
        role_name.as_deref().unwrap_or_default(),
        team_name.as_deref(),
    ))
}

/// Moves an invited user to ACTIVE with the invitee's choices; a retry (or
/// the loser of a race) answers `already_activated`.
pub async fn activate_invited_user(
    state: &Identity,
    request_id: &str,
    command: ActivateInvitedUser,
) -> ApiResult<internal::ActivateInvitedUserResponse> {
    let ActivateInvitedUser {
        invitation_id,
        account_id,
        user_id,
        password,
        acceptance,
    } = command;
    let current = scoped::user(&state.db, account_id, user_id).await?;
    if let Some(done) = already_activated(state, &current, invitation_id).await? {
        return Ok(done);
    }
    reservations::check_invited(current.status, current.invitation_id, invitation_id)?;
    // Outside the transaction: hashing takes tens of milliseconds.
    let password_hash = state.passwords.hash(password).await?;

    let now = state.clock.now();
    let txn = usher_kit::db::begin(&state.db).await?;
    let account = store::share_account(&txn, account_id).await?;
    let current = scoped::user(&txn, account_id, user_id).await?;
    let change = reservations::activation(
        acceptance,
        &convert::strings(&current.products),
        &convert::strings(&account.products),
    );
    let text = search_text(
        &change.display_name,
        current.email_canonical.as_deref(),
        current.username.as_deref(),
    );
    let activated = store::activate(
        &txn,
        account_id,
        user_id,
        invitation_id,
        &change,
        text,
        password_hash,
        now,
    )
    .await?;
    let Some(activated) = activated else {
        txn.rollback().await?;
        let current = scoped::user(&state.db, account_id, user_id).await?;
        return match already_activated(state, &current, invitation_id).await? {
            Some(done) => Ok(done),
            None => Err(reservations::not_invited()),
        };
    };
    let actor = reservations::invitee_actor(user_id, &change.display_name);
    let caused = reservations::activated(
        &store::activated_user(&activated),
        invitation_id,
        &change.changed,
        &actor,
        now,
    );
    effects::apply(&txn, caused, &actor, request_id, now).await?;
    let user = user_view(&txn, &activated).await?;
    txn.commit().await?;
    // The user may act from the next call on.
    principals::refresh_user(state, user_id).await?;
    Ok(internal::ActivateInvitedUserResponse {
        user: Some(user),
        already_activated: false,
    })
}

/// A validated ReleaseInvitees.
#[derive(Clone, Debug)]
pub struct ReleaseInvitees {
    /// The account.
    pub account_id: Uuid,
    /// The targets, in the order given.
    pub targets: Vec<ReleaseTarget>,
    /// Why, as recorded in the audit log.
    pub reason: &'static str,
    /// The actor of the audit entries and events.
    pub actor: Actor,
}

/// Deletes the invited users among the targets, in one transaction under
/// the account lock; answers the outcomes and the seats now in use.
pub async fn release_invitees(
    state: &Identity,
    request_id: &str,
    command: ReleaseInvitees,
) -> ApiResult<(Released, u64)> {
    let account_id = command.account_id;
    let now = state.clock.now();
    let txn = usher_kit::db::begin(&state.db).await?;
    accounts::lock(&txn, account_id).await?;
    let (mut ids, mut emails) = (Vec::new(), Vec::new());
    for target in &command.targets {
        match &target.key {
            ReleaseKey::Id(id) => ids.push(*id),
            ReleaseKey::Email(email) => emails.push(email.clone()),
        }
    }
    let found = store::release_targets(&txn, account_id, ids, emails).await?;
    let mut released = reservations::release(
        account_id,
        &command.targets,
        &found,
        command.reason,
        &command.actor,
        now,
    );
    if !released.deleted.is_empty() {
        store::delete_invited(&txn, account_id, &released.deleted).await?;
        let caused = std::mem::take(&mut released.effects);
        effects::apply(&txn, caused, &command.actor, request_id, now).await?;
    }
    let seats_used = accounts::seats_used(&txn, account_id).await?;
    txn.commit().await?;
    Ok((released, seats_used))
}

/// A validated CreateSession.
#[derive(Clone, Debug)]
pub struct CreateSession {
    /// The account.
    pub account_id: Uuid,
    /// The new member.
    pub user_id: Uuid,
    /// The invitation it joined by.
    pub invitation_id: Uuid,
    /// Where the member signs in from.
    pub meta_client_ip: Option<String>,
    /// With what.
    pub meta_user_agent: Option<String>,
}

/// Opens the first session of a member who just joined by an invitation.
pub async fn create_session(state: &Identity, command: CreateSession) -> ApiResult<IssuedSession> {
    let CreateSession {
        account_id,
        user_id,
        invitation_id,
        ..
    } = command;
    let db = &state.db;
    let now = state.clock.now();
    // The check and the sign-in time in one statement; the user is read
    // again only to say why they may not have a session.
    let member = match store::touch_joined(db, account_id, user_id, invitation_id, now).await? {
        Some(member) => member,
        None => {
            let member = scoped::user(db, account_id, user_id).await?;
            reservations::check_joined(member.status, member.invitation_id, invitation_id)?;
            // Activated between the two statements: recorded now.
            store::touch_joined(db, account_id, user_id, invitation_id, now)
                .await?
                .ok_or_else(|| reservations::invalid_state("the user is not active"))?
        }
    };
    // The gateway builds the principal of every call from this snapshot.
    principals::refresh_user(state, user_id).await?;
    let issued = state
        .sessions
        .create(
            account_id,
            user_id,
            SessionMeta {
                client_ip: command.meta_client_ip,
                user_agent: command.meta_user_agent,
                password_change_required: member.password_change_required,
            },
        )
        .await?;
    tracing::info!(
        session_id = %issued.record.id,
        %user_id,
        %account_id,
        %invitation_id,
        "session opened for an accepted invitation"
    );
    Ok(issued)
}

/// Internal error for a decoded command missing a validated field.
pub fn missing() -> ApiError {
    ApiError::Internal(anyhow::anyhow!("validated fields missing"))
}
