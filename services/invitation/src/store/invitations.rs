//! The invitation rows, behind one [`Repository`]: every SQL statement of
//! the service is here. Reads return domain [`Invitation`]s; writes take
//! what a domain transition decided ([`RowChange`], messages for the
//! outbox). A [`Tx`] locks what a command needs, then applies its changes
//! and commits them with their outbox messages in one transaction.
//!
//! [`state_condition`] is the SQL twin of
//! [`InvitationState::read`](crate::domain::InvitationState::read): list
//! filters, the claim and the expiry sweep select with it, and the store
//! tests prove the two readings agree at every boundary.

use chrono::{DateTime, Utc};
use prost::Message;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, ConnectionTrait, DatabaseConnection, EntityTrait,
    IntoActiveModel, Order as Direction, QueryFilter, QueryOrder, QuerySelect, Value,
    sea_query::{Expr, ExprTrait, LikeExpr, LockBehavior, LockType},
};
use usher_kit::{
    amqp::OutgoingMessage,
    db::{StoreResult, contains_pattern},
    error::ApiResult,
    idempotency::IdempotencyKey,
    outbox,
};
use uuid::Uuid;

use super::{
    entities::invitation::{self, Column, StoredState},
    from_api,
};
use crate::domain::{
    Invitation, InvitationState,
    delivery::DeliveryReport,
    list::{After, ListFilter, Order, SortKey, SortValue},
    ports::RepositoryPort,
    transitions::RowChange,
};

/// Rows inserted per statement.
const INSERT_CHUNK: usize = 200;

/// The condition "reads as `state` at `now`": the SQL twin of
/// [`InvitationState::read`]. An ACCEPTING row whose claim ran out (or that
/// holds none) reads as the state it would return to.
pub fn state_condition(state: InvitationState, now: DateTime<Utc>) -> Condition {
    let claim_over = Condition::all()
        .add(Column::State.eq(StoredState::Accepting))
        .add(
            Condition::any()
                .add(Column::ClaimUntil.is_null())
                .add(Column::ClaimUntil.lte(now)),
        );
    let open = Condition::any()
        .add(Column::State.eq(StoredState::Pending))
        .add(claim_over);
    match state {
        InvitationState::Pending => Condition::all().add(open).add(Column::ExpireTime.gt(now)),
        InvitationState::Expired => Condition::all().add(open).add(Column::ExpireTime.lte(now)),
        InvitationState::Accepting => Condition::all()
            .add(Column::State.eq(StoredState::Accepting))
            .add(Column::ClaimUntil.gt(now)),
        InvitationState::Accepted => Condition::all().add(Column::State.eq(StoredState::Accepted)),
        InvitationState::Revoked => Condition::all().add(Column::State.eq(StoredState::Revoked)),
        InvitationState::Declined => Condition::all().add(Column::State.eq(StoredState::Declined)),
    }
}

/// The condition "a link of `version` is usable at `now`": the SQL twin of
/// [`Invitation::usable`].
pub fn usable_condition(version: i64, now: DateTime<Utc>) -> Condition {
    Condition::all()
        .add(Column::TokenVersion.eq(version))
        .add(Column::ExpireTime.gt(now))
        .add(state_condition(InvitationState::Pending, now))
}

/// The account's invitations `filter` selects at `now`.
fn filter_condition(account_id: Uuid, filter: &ListFilter, now: DateTime<Utc>) -> Condition {
    let mut condition = Condition::all().add(Column::AccountId.eq(account_id));
    if !filter.states.is_empty() {
        let mut any = Condition::any();
        for state in &filter.states {
            any = any.add(state_condition(*state, now));
        }
        condition = condition.add(any);
    }
    if !filter.email_contains.is_empty() {
        condition = condition.add(
            Expr::col(Column::Email)
                .like(LikeExpr::new(contains_pattern(&filter.email_contains)).escape('\\')),
        );
    }
    if !filter.inviter_id.is_empty() {
        condition = condition.add(Column::InviterId.eq(filter.inviter_id.clone()));
    }
    if let Some(role) = filter.role_id {
        condition = condition.add(Column::RoleId.eq(role));
    }
    if let Some(team) = filter.team_id {
        condition = condition.add(Column::TeamId.eq(team));
    }
    condition
}

/// The row to write for `invitation`: every column set.
fn active(invitation: &Invitation) -> invitation::ActiveModel {
    invitation::Model::from(invitation)
        .into_active_model()
        .reset_all()
}

fn rows(models: Vec<invitation::Model>) -> Vec<Invitation> {
    models.into_iter().map(Invitation::from).collect()
}

/// The invitation database.
#[derive(Clone, Debug)]
pub struct Repository {
    db: DatabaseConnection,
    /// Group commit of CreateInvitations' inserts (see [`Self::insert_created`]).
    creates: Creates,
}

/// One CreateInvitations' rows, messages and answer, waiting for the next
/// insert transaction.
#[derive(Debug)]
pub struct PendingCreate {
    rows: Vec<Invitation>,
    emit: Vec<OutgoingMessage>,
    answer: Option<(IdempotencyKey, Vec<u8>)>,
    now: DateTime<Utc>,
}

/// The inserts of concurrent creates, committed together (one lane for the
/// whole service: the rows of different accounts never conflict).
type Creates = usher_kit::coalesce::Coalescer<(), PendingCreate, StoreResult<()>>;

/// Creates per insert transaction at most (each holds up to 1,000
/// invitations).
const CREATES_PER_TRANSACTION: usize = 32;

impl Repository {
    /// The repository on `db`.
    pub fn new(db: DatabaseConnection) -> Self {
        Self {
            db,
            creates: Creates::new(CREATES_PER_TRANSACTION),
        }
    }

    /// Inserts `batch` in one transaction; a batch that fails as a whole is
    /// inserted again create by create, so each caller gets its own answer
    /// (an idempotent retry racing its first call, say, fails alone).
    async fn insert_batch(
        db: &DatabaseConnection,
        batch: Vec<PendingCreate>,
    ) -> Vec<StoreResult<()>> {
        match Self::insert_together(db, &batch).await {
            Ok(()) => batch.iter().map(|_| Ok(())).collect(),
            Err(err) if batch.len() == 1 => vec![Err(err)],
            Err(err) => {
                tracing::debug!(error = %err, size = batch.len(), "insert batch retried create by create");
                let mut answers = Vec::with_capacity(batch.len());
                for one in &batch {
                    answers.push(Self::insert_together(db, std::slice::from_ref(one)).await);
                }
                answers
            }
        }
    }

    /// Inserts the invitations, outbox messages and answers of `batch` in
    /// one transaction: the rows and the messages of all its creates in
    /// one multi-row statement each (per [`INSERT_CHUNK`] rows).
    async fn insert_together(db: &DatabaseConnection, batch: &[PendingCreate]) -> StoreResult<()> {
        let txn = usher_kit::db::begin(db).await?;
        let rows: Vec<&Invitation> = batch.iter().flat_map(|one| &one.rows).collect();
        for chunk in rows.chunks(INSERT_CHUNK) {
            invitation::Entity::insert_many(chunk.iter().map(|row| active(row)))
                .exec_without_returning(&txn)
                .await?;
        }
        let emit: Vec<OutgoingMessage> = batch
            .iter()
            .flat_map(|one| one.emit.iter().cloned())
            .collect();
        outbox::enqueue(&txn, &emit).await?;
        for one in batch {
            if let Some((key, answer)) = &one.answer {
                key.remember_encoded(&txn, answer.clone(), one.now)
                    .await
                    .map_err(from_api)?;
            }
        }
        txn.commit().await?;
        Ok(())
    }

    /// Stores the answer of an idempotent call.
    pub async fn remember<R: Message>(
        &self,
        key: &IdempotencyKey,
        answer: &R,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        key.remember(&self.db, answer, now).await.map_err(from_api)
    }

    /// The invitation `id` of `account_id`.
    pub async fn find(&self, account_id: Uuid, id: Uuid) -> StoreResult<Option<Invitation>> {
        Ok(invitation::Entity::find_by_id(id)
            .filter(Column::AccountId.eq(account_id))
            .one(&self.db)
            .await?
            .map(Invitation::from))
    }

    /// The invitation `id`, whatever its account (the public side, reached
    /// by a link).
    pub async fn find_by_id(&self, id: Uuid) -> StoreResult<Option<Invitation>> {
        Ok(invitation::Entity::find_by_id(id)
            .one(&self.db)
            .await?
            .map(Invitation::from))
    }

    /// The PENDING invitation whose current link has the token hash `hash`
    /// (the partial index `invitations_pending_token`).
    pub async fn find_pending_by_token_hash(&self, hash: &str) -> StoreResult<Option<Invitation>> {
        Ok(invitation::Entity::find()
            .filter(Column::TokenHash.eq(hash))
            // A literal, so the planner matches the partial index's
            // predicate whatever plan it caches.
            .filter(Expr::cust("state = 'PENDING'"))
            .one(&self.db)
            .await?
            .map(Invitation::from))
    }

    /// How many of the account's invitations `filter` selects at `now`,
    /// counted no further than `cap + 1`: the ids of at most that many are
    /// read, so a first page costs the same in an account of millions.
    pub async fn count_up_to(
        &self,
        account_id: Uuid,
        filter: &ListFilter,
        now: DateTime<Utc>,
        cap: u64,
    ) -> StoreResult<u64> {
        let ids: Vec<Uuid> = invitation::Entity::find()
            .filter(filter_condition(account_id, filter, now))
            .select_only()
            .column(Column::Id)
            .limit(cap.saturating_add(1))
            .into_tuple()
            .all(&self.db)
            .await?;
        Ok(ids.len() as u64)
    }

    /// Up to `limit` of the account's invitations `filter` selects at
    /// `now`, in `order`, starting after `after`.
    pub async fn page(
        &self,
        account_id: Uuid,
        filter: &ListFilter,
        order: Order,
        after: Option<&After>,
        limit: u64,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<Invitation>> {
        let column = match order.key {
            SortKey::Create => Column::CreateTime,
            SortKey::Expire => Column::ExpireTime,
            SortKey::Email => Column::Email,
        };
        let mut select =
            invitation::Entity::find().filter(filter_condition(account_id, filter, now));
        if let Some(after) = after {
            let value = match &after.value {
                SortValue::Time(time) => Value::from(*time),
                SortValue::Email(email) => Value::from(email.clone()),
            };
            let (past, tie) = if order.ascending {
                (Expr::col(column).gt(value.clone()), Column::Id.gt(after.id))
            } else {
                (Expr::col(column).lt(value.clone()), Column::Id.lt(after.id))
            };
            select = select.filter(
                Condition::any()
                    .add(past)
                    .add(Condition::all().add(Expr::col(column).eq(value)).add(tie)),
            );
        }
        let direction = if order.ascending {
            Direction::Asc
        } else {
            Direction::Desc
        };
        Ok(rows(
            select
                .order_by(column, direction.clone())
                .order_by(Column::Id, direction)
                .limit(limit)
                .all(&self.db)
                .await?,
        ))
    }

    /// Takes the claim of an accept with a link of `version` on invitation
    /// `id`: ACCEPTING until `until`, in one guarded update, so exactly one
    /// of concurrent accepts wins. Returns the claimed row if this one did
    /// (read by the same statement).
    pub async fn claim(
        &self,
        id: Uuid,
        version: i64,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Invitation>> {
        let mut claimed = invitation::Entity::update_many()
            .col_expr(Column::State, Expr::value(StoredState::Accepting))
            .col_expr(Column::ClaimUntil, Expr::value(until))
            .filter(Column::Id.eq(id))
            .filter(usable_condition(version, now))
            .exec_with_returning(&self.db)
            .await?;
        Ok(claimed.pop().map(Invitation::from))
    }

    /// Gives a claim taken with a link of `version` back (the link works
    /// again), if it is still held.
    pub async fn release_claim(&self, id: Uuid, version: i64) -> StoreResult<()> {
        invitation::Entity::update_many()
            .col_expr(Column::State, Expr::value(StoredState::Pending))
            .col_expr(
                Column::ClaimUntil,
                Expr::value(Option::<DateTime<Utc>>::None),
            )
            .filter(Column::Id.eq(id))
            .filter(Column::State.eq(StoredState::Accepting))
            .filter(Column::TokenVersion.eq(version))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    /// Finishes an accept with a link of `version`: the row becomes
    /// `accepted` and `emit` goes to the outbox, if the claim is still held
    /// (one transaction). Returns whether it was.
    pub async fn finish_accept(
        &self,
        accepted: &Invitation,
        version: i64,
        emit: &[OutgoingMessage],
    ) -> StoreResult<bool> {
        let txn = usher_kit::db::begin(&self.db).await?;
        let done = invitation::Entity::update_many()
            .col_expr(Column::State, Expr::value(accepted.state))
            .col_expr(Column::AcceptTime, Expr::value(accepted.accept_time))
            .col_expr(Column::UpdateTime, Expr::value(accepted.update_time))
            .col_expr(Column::ClaimUntil, Expr::value(accepted.claim_until))
            .filter(Column::Id.eq(accepted.id))
            .filter(Column::State.eq(StoredState::Accepting))
            .filter(Column::TokenVersion.eq(version))
            .exec(&txn)
            .await?;
        let won = done.rows_affected == 1;
        if won {
            outbox::enqueue(&txn, emit).await?;
        }
        txn.commit().await?;
        Ok(won)
    }

    /// Records delivery `reports` in one transaction, each on its invitation
    /// if the report's job is the invitation's latest email and its status
    /// may be overwritten. Returns how many rows changed.
    pub async fn record_deliveries(
        &self,
        reports: &[DeliveryReport],
        now: DateTime<Utc>,
    ) -> StoreResult<usize> {
        let txn = usher_kit::db::begin(&self.db).await?;
        let mut updated = 0;
        if txn.get_database_backend() == sea_orm::DbBackend::Postgres {
            for round in delivery_rounds(reports) {
                updated += Self::record_delivery_round(&txn, &round, now).await?;
            }
        } else {
            for report in reports {
                updated += usize::from(Self::record_delivery(&txn, report, now).await?);
            }
        }
        txn.commit().await?;
        Ok(updated)
    }

    /// Records `reports`, at most one per invitation, in one statement
    /// (PostgreSQL): each report is a row of a `VALUES` list joined to its
    /// invitation, with the conditions of [`Self::record_delivery`].
    async fn record_delivery_round<C: ConnectionTrait>(
        db: &C,
        reports: &[&DeliveryReport],
        now: DateTime<Utc>,
    ) -> StoreResult<usize> {
        if reports.is_empty() {
            return Ok(0);
        }
        const COLUMNS: usize = 6;
        let mut rows = Vec::with_capacity(reports.len());
        let mut values: Vec<Value> = Vec::with_capacity(reports.len() * COLUMNS + 1);
        values.push(now.into());
        for (index, report) in reports.iter().enumerate() {
            let n = 2 + index * COLUMNS;
            rows.push(format!(
                "(${}::uuid, ${}, ${}::int4, ${}, ${}::int4, ${})",
                n,
                n + 1,
                n + 2,
                n + 3,
                n + 4,
                n + 5
            ));
            let unless: Vec<String> = report
                .unless_status_in
                .iter()
                .map(ToString::to_string)
                .collect();
            values.extend([
                report.invitation_id.into(),
                report.job_id.clone().into(),
                report.status.into(),
                report.reason.clone().into(),
                report.attempts.into(),
                unless.join(",").into(),
            ]);
        }
        let sql = format!(
            "UPDATE invitations AS i SET delivery_status = v.status, \
             delivery_reason = v.reason, delivery_attempts = v.attempts, \
             delivery_update_time = $1, update_time = $1 \
             FROM (VALUES {}) AS v(id, job_id, status, reason, attempts, unless_in) \
             WHERE i.id = v.id AND i.delivery_job_id = v.job_id \
             AND NOT (i.delivery_status = ANY (string_to_array(v.unless_in, ',')::int4[]))",
            rows.join(", ")
        );
        let done = db
            .execute_raw(sea_orm::Statement::from_sql_and_values(
                sea_orm::DbBackend::Postgres,
                sql,
                values,
            ))
            .await?;
        Ok(usize::try_from(done.rows_affected()).unwrap_or(usize::MAX))
    }

    /// Records one delivery report on `db`; whether an invitation changed.
    async fn record_delivery<C: ConnectionTrait>(
        db: &C,
        report: &DeliveryReport,
        now: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let mut update = invitation::Entity::update_many();
        if !report.unless_status_in.is_empty() {
            update = update
                .filter(Column::DeliveryStatus.is_not_in(report.unless_status_in.iter().copied()));
        }
        let updated = update
            .col_expr(Column::DeliveryStatus, Expr::value(report.status))
            .col_expr(Column::DeliveryReason, Expr::value(report.reason.clone()))
            .col_expr(Column::DeliveryAttempts, Expr::value(report.attempts))
            .col_expr(Column::DeliveryUpdateTime, Expr::value(now))
            .col_expr(Column::UpdateTime, Expr::value(now))
            .filter(Column::Id.eq(report.invitation_id))
            .filter(Column::DeliveryJobId.eq(report.job_id.clone()))
            .exec(db)
            .await?;
        Ok(updated.rows_affected > 0)
    }

    /// Opens a transaction.
    pub async fn begin(&self) -> StoreResult<Tx> {
        Ok(Tx {
            txn: usher_kit::db::begin(&self.db).await?,
        })
    }
}

/// `reports` in rounds that each name an invitation at most once, in the
/// order given: a statement updates a row once, so a second report of one
/// invitation (queued, then sent) goes in the next round, after the first.
fn delivery_rounds(reports: &[DeliveryReport]) -> Vec<Vec<&DeliveryReport>> {
    let mut rounds: Vec<Vec<&DeliveryReport>> = Vec::new();
    let mut seen: std::collections::HashMap<Uuid, usize> = std::collections::HashMap::new();
    for report in reports {
        let round = seen.entry(report.invitation_id).or_insert(0);
        if rounds.len() <= *round {
            rounds.push(Vec::new());
        }
        rounds[*round].push(report);
        *round += 1;
    }
    rounds
}

impl RepositoryPort for Repository {
    /// The stored answer of an earlier identical call (the kit's
    /// idempotency rule answers its own IDEMPOTENCY_CONFLICT, hence the
    /// `ApiResult`).
    async fn replay<R: Message + Default>(&self, key: &IdempotencyKey) -> ApiResult<Option<R>> {
        key.replay(&self.db).await
    }

    /// Inserts new invitations with their outbox messages and, for an
    /// idempotent call, its answer, in one transaction — group-committed:
    /// the creates that arrive while a transaction runs are inserted
    /// together in the next one (a lone create waits for nothing), so
    /// concurrent calls share their round trips and their commit.
    async fn insert_created<R: Message>(
        &self,
        created: Vec<Invitation>,
        emit: Vec<OutgoingMessage>,
        answer: Option<(&IdempotencyKey, &R)>,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        let pending = PendingCreate {
            rows: created,
            emit,
            answer: answer.map(|(key, answer)| (key.clone(), answer.encode_to_vec())),
            now,
        };
        let db = self.db.clone();
        self.creates
            .submit((), pending, move |batch| {
                let db = db.clone();
                async move { Self::insert_batch(&db, batch).await }
            })
            .await
            .map_err(|err| usher_kit::db::StoreError::Unavailable(err.to_string()))?
    }
}

/// One transaction: lock, apply, commit. Dropped without
/// [`Tx::commit`], it rolls back.
#[derive(Debug)]
pub struct Tx {
    txn: usher_kit::db::Transaction,
}

impl Tx {
    /// The invitations `ids` of `account_id` that exist, locked until the
    /// transaction ends.
    pub async fn lock(&self, account_id: Uuid, ids: &[Uuid]) -> StoreResult<Vec<Invitation>> {
        Ok(rows(
            invitation::Entity::find()
                .filter(Column::AccountId.eq(account_id))
                .filter(Column::Id.is_in(ids.to_vec()))
                .lock_exclusive()
                .all(&self.txn)
                .await?,
        ))
    }

    /// The invitation `id` (of `account_id` when given), locked until the
    /// transaction ends.
    pub async fn lock_one(
        &self,
        account_id: Option<Uuid>,
        id: Uuid,
    ) -> StoreResult<Option<Invitation>> {
        let mut select = invitation::Entity::find_by_id(id);
        if let Some(account_id) = account_id {
            select = select.filter(Column::AccountId.eq(account_id));
        }
        Ok(select
            .lock_exclusive()
            .one(&self.txn)
            .await?
            .map(Invitation::from))
    }

    /// Up to `limit` PENDING invitations past their expiry at `now` whose
    /// expiry was not published yet, locked; rows another sweep holds are
    /// skipped.
    pub async fn lock_newly_expired(
        &self,
        now: DateTime<Utc>,
        limit: u64,
    ) -> StoreResult<Vec<Invitation>> {
        Ok(rows(
            invitation::Entity::find()
                .filter(Column::State.eq(StoredState::Pending))
                .filter(Column::ExpiryPublished.eq(false))
                .filter(Column::ExpireTime.lte(now))
                .limit(limit)
                .lock_with_behavior(LockType::Update, LockBehavior::SkipLocked)
                .all(&self.txn)
                .await?,
        ))
    }

    /// Writes what a transition decided for the row.
    pub async fn apply(&self, change: &RowChange) -> StoreResult<()> {
        match change {
            RowChange::Keep => {}
            RowChange::Update(row) => {
                active(row).update(&self.txn).await?;
            }
            RowChange::Delete(id) => {
                invitation::Entity::delete_by_id(*id)
                    .exec(&self.txn)
                    .await?;
            }
        }
        Ok(())
    }

    /// Writes `messages` to the outbox: published if and only if the
    /// transaction commits.
    pub async fn emit(&self, messages: &[OutgoingMessage]) -> StoreResult<()> {
        outbox::enqueue(&self.txn, messages).await?;
        Ok(())
    }

    /// Commits.
    pub async fn commit(self) -> StoreResult<()> {
        self.txn.commit().await?;
        Ok(())
    }
}
