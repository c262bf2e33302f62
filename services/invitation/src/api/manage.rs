//! The admin side: list, get, resend, revoke and delete.

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, EntityTrait, IntoActiveModel, PaginatorTrait,
    QueryFilter, QueryOrder, QuerySelect, TransactionTrait,
    sea_query::{Expr, ExprTrait, LikeExpr},
};
use serde::{Deserialize, Serialize};
use usher_kit::{
    db::contains_pattern,
    error::{ApiError, ApiResult, Reason},
    idempotency::IdempotencyKey,
    outbox, pagination,
    principal::Principal,
};
use usher_proto::{
    identity::internal::v1 as internal, invitation::v1 as pb, notification::v1 as notification,
};
use uuid::Uuid;

use super::{
    InvitationApi, convert, item_error, lifetime, messages, parse_id, parse_ids, parse_optional_id,
};
use crate::store::{
    entities::invitation::{self, Column},
    tokens::{TokenEntry, TokenStore},
};

/// Shortest and longest email search.
const QUERY_CHARS: std::ops::RangeInclusive<usize> = 3..=254;

/// The filters of a list, fingerprinted into its page tokens.
#[derive(Serialize)]
struct ListQuery<'a> {
    states: Vec<i32>,
    query: &'a str,
    inviter: &'a str,
    role: Option<Uuid>,
    team: Option<Uuid>,
    order: i32,
}

/// What a list is sorted by (then by id).
#[derive(Clone, Copy, PartialEq, Eq)]
enum SortKey {
    Create,
    Expire,
    Email,
}

/// The sort key of the last invitation of a page.
#[derive(Serialize, Deserialize)]
struct Cursor {
    time: Option<DateTime<Utc>>,
    email: Option<String>,
    id: Uuid,
    /// The matching invitations counted for the first page, carried so
    /// later pages do not count again. Absent in older tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    total: Option<u64>,
}

/// The condition "reads as `state` at `now`".
fn state_condition(state: pb::InvitationState, now: DateTime<Utc>) -> Condition {
    let claim_over = Condition::all()
        .add(Column::State.eq(convert::ACCEPTING))
        .add(Column::ClaimUntil.lte(now));
    let open = Condition::any()
        .add(Column::State.eq(convert::PENDING))
        .add(claim_over);
    match state {
        pb::InvitationState::Pending => Condition::all().add(open).add(Column::ExpireTime.gt(now)),
        pb::InvitationState::Expired => Condition::all().add(open).add(Column::ExpireTime.lte(now)),
        pb::InvitationState::Accepting => Condition::all()
            .add(Column::State.eq(convert::ACCEPTING))
            .add(Column::ClaimUntil.gt(now)),
        pb::InvitationState::Accepted => Condition::all().add(Column::State.eq(convert::ACCEPTED)),
        pb::InvitationState::Revoked => Condition::all().add(Column::State.eq(convert::REVOKED)),
        pb::InvitationState::Declined => Condition::all().add(Column::State.eq(convert::DECLINED)),
        pb::InvitationState::Unspecified => Condition::all(),
    }
}

/// Whether `model` may be resent, revoked or deleted as an open invitation
/// (PENDING or EXPIRED), or why not.
fn open_or_busy(model: &invitation::Model, now: DateTime<Utc>) -> Result<bool, ApiError> {
    match convert::state(model, now) {
        pb::InvitationState::Pending | pb::InvitationState::Expired => Ok(true),
        pb::InvitationState::Accepting => Err(ApiError::rejected(
            Reason::InvitationBeingAccepted,
            "the invitee is accepting this invitation right now",
        )),
        _ => Ok(false),
    }
}

impl InvitationApi {
    /// ListInvitations.
    pub(super) async fn list(
        &self,
        caller: &Principal,
        request: pb::ListInvitationsRequest,
    ) -> ApiResult<pb::ListInvitationsResponse> {
        let account_id = caller.account()?;
        let page_size = pagination::page_size(request.page_size)?;
        let query = request.query.trim();
        if !query.is_empty() && !QUERY_CHARS.contains(&query.chars().count()) {
            return Err(ApiError::invalid("query", "must be 3 to 254 characters"));
        }
        let inviter = request.inviter_id.trim();
        if !inviter.is_empty() {
            parse_id("inviter_id", inviter)?;
        }
        let role = parse_optional_id("role_id", &request.role_id)?;
        let team = parse_optional_id("team_id", &request.team_id)?;
        let order = pb::InvitationOrderBy::try_from(request.order_by)
            .map_err(|_| ApiError::invalid("order_by", "unknown order"))?;
        let mut states = Vec::with_capacity(request.states.len());
        for (i, state) in request.states.iter().enumerate() {
            let state = pb::InvitationState::try_from(*state)
                .ok()
                .filter(|s| *s != pb::InvitationState::Unspecified)
                .ok_or_else(|| ApiError::invalid(format!("states[{i}]"), "unknown state"))?;
            states.push(state);
        }
        let fingerprint = pagination::fingerprint(&ListQuery {
            states: states.iter().map(|s| *s as i32).collect(),
            query,
            inviter,
            role,
            team,
            order: order as i32,
        });
        let cursor: Option<Cursor> = pagination::decode_token(&fingerprint, &request.page_token)?;

        let now = self.now();
        let mut filter = Condition::all().add(Column::AccountId.eq(account_id));
        if !states.is_empty() {
            let mut any = Condition::any();
            for state in &states {
                any = any.add(state_condition(*state, now));
            }
            filter = filter.add(any);
        }
        if !query.is_empty() {
            filter = filter.add(
                Expr::col(Column::Email)
                    .like(LikeExpr::new(contains_pattern(&query.to_lowercase())).escape('\\')),
            );
        }
        if !inviter.is_empty() {
            filter = filter.add(Column::InviterId.eq(inviter.to_lowercase()));
        }
        if let Some(role) = role {
            filter = filter.add(Column::RoleId.eq(role));
        }
        if let Some(team) = team {
            filter = filter.add(Column::TeamId.eq(team));
        }
        let total = match cursor.as_ref().and_then(|c| c.total) {
            Some(total) => total,
            None => {
                invitation::Entity::find()
                    .filter(filter.clone())
                    .count(&self.state.db)
                    .await?
            }
        };

        let (key, ascending) = match order {
            pb::InvitationOrderBy::Unspecified | pb::InvitationOrderBy::CreateTimeDesc => {
                (SortKey::Create, false)
            }
            pb::InvitationOrderBy::CreateTimeAsc => (SortKey::Create, true),
            pb::InvitationOrderBy::ExpireTimeAsc => (SortKey::Expire, true),
            pb::InvitationOrderBy::Email => (SortKey::Email, true),
        };
        let column = match key {
            SortKey::Create => Column::CreateTime,
            SortKey::Expire => Column::ExpireTime,
            SortKey::Email => Column::Email,
        };
        let mut select = invitation::Entity::find().filter(filter);
        if let Some(cursor) = cursor {
            let after = |value: sea_orm::Value| {
                let (past, tie) = if ascending {
                    (
                        Expr::col(column).gt(value.clone()),
                        Column::Id.gt(cursor.id),
                    )
                } else {
                    (
                        Expr::col(column).lt(value.clone()),
                        Column::Id.lt(cursor.id),
                    )
                };
                Condition::any()
                    .add(past)
                    .add(Condition::all().add(Expr::col(column).eq(value)).add(tie))
            };
            let value = match (&cursor.time, &cursor.email) {
                (Some(time), _) => sea_orm::Value::from(*time),
                (None, Some(email)) => sea_orm::Value::from(email.clone()),
                (None, None) => {
                    return Err(ApiError::invalid(
                        "page_token",
                        "is not a token of this query",
                    ));
                }
            };
            select = select.filter(after(value));
        }
        let direction = if ascending {
            sea_orm::Order::Asc
        } else {
            sea_orm::Order::Desc
        };
        let mut rows = select
            .order_by(column, direction.clone())
            .order_by(Column::Id, direction)
            .limit(page_size + 1)
            .all(&self.state.db)
            .await?;
        let more = rows.len() as u64 > page_size;
        rows.truncate(usize::try_from(page_size).unwrap_or(usize::MAX));
        let next_page_token = match rows.last() {
            Some(last) if more => pagination::encode_token(
                &fingerprint,
                &Cursor {
                    time: match key {
                        SortKey::Create => Some(last.create_time),
                        SortKey::Expire => Some(last.expire_time),
                        SortKey::Email => None,
                    },
                    email: (key == SortKey::Email).then(|| last.email.clone()),
                    id: last.id,
                    total: Some(total),
                },
            ),
            _ => String::new(),
        };
        Ok(pb::ListInvitationsResponse {
            invitations: rows.iter().map(|m| convert::invitation(m, now)).collect(),
            next_page_token,
            total_size: i32::try_from(total).unwrap_or(i32::MAX),
        })
    }

    /// GetInvitation.
    pub(super) async fn get(
        &self,
        caller: &Principal,
        request: &pb::GetInvitationRequest,
    ) -> ApiResult<pb::GetInvitationResponse> {
        let account_id = caller.account()?;
        let id = parse_id("invitation_id", &request.invitation_id)?;
        let model = invitation::Entity::find_by_id(id)
            .filter(Column::AccountId.eq(account_id))
            .one(&self.state.db)
            .await?
            .ok_or_else(|| ApiError::not_found("invitation"))?;
        Ok(pb::GetInvitationResponse {
            invitation: Some(convert::invitation(&model, self.now())),
        })
    }

    /// ResendInvitations: each invitation in its own transaction.
    pub(super) async fn resend(
        &self,
        caller: &Principal,
        mut request: pb::ResendInvitationsRequest,
        call_id: &str,
    ) -> ApiResult<pb::ResendInvitationsResponse> {
        let account_id = caller.account()?;
        let ids = parse_ids(&request.invitation_ids)?;
        let request_id = std::mem::take(&mut request.request_id);
        let idempotency = IdempotencyKey::new(
            caller,
            "usher.invitation.v1.InvitationService/ResendInvitations",
            &request_id,
            &request,
        )?;
        if let Some(key) = &idempotency
            && let Some(answer) = key.replay(&self.state.db).await?
        {
            return Ok(answer);
        }
        let context = self.context(account_id, None, None, None, call_id).await?;
        let account = context.account.clone().unwrap_or_default();
        let email_context = messages::EmailContext {
            account_name: account.name.clone(),
            account_locale: account.default_locale.clone(),
            request_id: call_id.to_owned(),
        };
        let actor = convert::actor(caller);
        let mut response = pb::ResendInvitationsResponse::default();
        let mut grantable = HashMap::new();
        for id in ids {
            let outcome = self
                .resend_one(
                    account_id,
                    id,
                    lifetime(&context),
                    &actor,
                    &email_context,
                    &mut grantable,
                )
                .await;
            let result = match outcome {
                Ok(model) => {
                    response.succeeded_count += 1;
                    pb::InvitationResult {
                        invitation_id: id.to_string(),
                        invitation: Some(convert::invitation(&model, self.now())),
                        error: None,
                    }
                }
                Err(err @ (ApiError::Unavailable(_) | ApiError::Internal(_))) => return Err(err),
                Err(err) => {
                    response.failed_count += 1;
                    pb::InvitationResult {
                        invitation_id: id.to_string(),
                        invitation: None,
                        error: Some(item_error(&err)),
                    }
                }
            };
            response.results.push(result);
        }
        if let Some(key) = idempotency {
            key.remember(&self.state.db, &response, self.now()).await?;
        }
        Ok(response)
    }

    async fn resend_one(
        &self,
        account_id: Uuid,
        id: Uuid,
        lifetime: Duration,
        actor: &usher_proto::identity::v1::Actor,
        email_context: &messages::EmailContext,
        grantable: &mut HashMap<Uuid, bool>,
    ) -> ApiResult<invitation::Model> {
        let rules = &self.state.rules;
        let txn = self.state.db.begin().await?;
        let now = self.now();
        let mut model = invitation::Entity::find_by_id(id)
            .filter(Column::AccountId.eq(account_id))
            .lock_exclusive()
            .one(&txn)
            .await?
            .ok_or_else(|| ApiError::not_found("invitation"))?;
        if !open_or_busy(&model, now)? {
            return Err(ApiError::rejected(
                Reason::InvalidState,
                "only pending or expired invitations can be resent",
            ));
        }
        // A resend hands the invitation's role out again (an expired one
        // included): the caller must be able to grant it now (P26), as
        // identity judges it; asked once per role of the call.
        let may_grant = match grantable.get(&model.role_id) {
            Some(known) => *known,
            None => {
                let known = self
                    .context(
                        account_id,
                        Some(actor.clone()),
                        Some(model.role_id),
                        None,
                        &email_context.request_id,
                    )
                    .await?
                    .inviter_may_grant_role;
                grantable.insert(model.role_id, known);
                known
            }
        };
        if !may_grant {
            return Err(ApiError::rejected(
                Reason::PermissionDenied,
                "the invitation's role carries a permission you do not hold",
            ));
        }
        let cooldown = Duration::seconds(i64::from(rules.resend_cooldown_secs));
        let since = now - model.last_send_time;
        if since < cooldown {
            return Err(ApiError::retry_later(
                Reason::ResendCooldown,
                "this invitation was sent moments ago; wait before resending",
                (cooldown - since).to_std().unwrap_or_default(),
            ));
        }
        if model.resend_count >= i32::try_from(rules.max_resends).unwrap_or(i32::MAX) {
            return Err(ApiError::rejected(
                Reason::ResendLimitReached,
                "this invitation was resent too many times; revoke it and invite again",
            ));
        }
        if self
            .state
            .tokens
            .take_quota(account_id, 1, rules.hourly_quota, now)
            .await?
            == 0
        {
            return Err(ApiError::retry_later(
                Reason::QuotaExceeded,
                "the account's hourly invitation quota is used up",
                TokenStore::quota_retry_after(now),
            ));
        }
        let old_hash = model.token_hash.clone();
        let (token, hash) = self.state.tokens.generate();
        model.state = convert::PENDING.to_owned();
        model.claim_until = None;
        model.token_version += 1;
        model.token_hash = hash;
        model.expire_time = now + lifetime;
        model.resend_count += 1;
        model.last_send_time = now;
        model.update_time = now;
        model.expiry_published = false;
        let (job, job_id) = messages::invitation_email(
            &self.state,
            &model,
            &token,
            notification::EmailTemplate::Reinvitation,
            email_context,
            now,
        )?;
        model.delivery_job_id = job_id;
        model.delivery_status = notification::DeliveryStatus::Queued as i32;
        model.delivery_reason = String::new();
        model.delivery_attempts = 0;
        model.delivery_update_time = Some(now);
        let written = async {
            model
                .clone()
                .into_active_model()
                .reset_all()
                .update(&txn)
                .await?;
            outbox::enqueue(&txn, &[job, messages::resent(&model, actor, now)]).await?;
            self.state
                .tokens
                .put(
                    &[TokenEntry {
                        hash: model.token_hash.clone(),
                        invitation_id: model.id,
                        version: model.token_version,
                        expire_time: model.expire_time,
                    }],
                    now,
                )
                .await?;
            txn.commit().await?;
            ApiResult::Ok(())
        }
        .await;
        if let Err(err) = written {
            self.give_back(account_id, 1, now).await;
            return Err(err);
        }
        // The version check already makes the old link useless.
        self.state.tokens.forget(&[old_hash], "resent").await;
        Ok(model)
    }

    /// RevokeInvitations (`delete` false) and DeleteInvitations (`delete`
    /// true). Rows are locked, identity releases the INVITED users, then the
    /// rows change, all before one commit: if identity fails nothing changes
    /// and the call answers UNAVAILABLE. Returns the results and the counts.
    pub(super) async fn remove(
        &self,
        caller: &Principal,
        ids: &[String],
        delete: bool,
        call_id: &str,
    ) -> ApiResult<(Vec<pb::InvitationResult>, i32, i32)> {
        let account_id = caller.account()?;
        let ids = parse_ids(ids)?;
        let actor = convert::actor(caller);
        let txn = self.state.db.begin().await?;
        let now = self.now();
        let rows = invitation::Entity::find()
            .filter(Column::AccountId.eq(account_id))
            .filter(Column::Id.is_in(ids.clone()))
            .lock_exclusive()
            .all(&txn)
            .await?;
        let mut results = Vec::with_capacity(ids.len());
        let mut to_release: Vec<(Uuid, Uuid)> = Vec::new();
        let mut changed: Vec<(invitation::Model, pb::InvitationState)> = Vec::new();
        for id in &ids {
            let found = rows.iter().find(|m| m.id == *id);
            let verdict = match found {
                None => Err(ApiError::not_found("invitation")),
                Some(model) => {
                    let previous = convert::state(model, now);
                    match open_or_busy(model, now) {
                        Err(err) => Err(err),
                        Ok(true) => Ok(Some((model, previous))),
                        Ok(false) if previous == pb::InvitationState::Revoked => {
                            // Released again: a no-op, unless an earlier
                            // release was lost.
                            to_release.push((model.user_id, model.id));
                            Ok(delete.then_some((model, previous)))
                        }
                        Ok(false) if delete => Ok(Some((model, previous))),
                        Ok(false) => Err(ApiError::rejected(
                            Reason::InvalidState,
                            "accepted or declined invitations cannot be revoked",
                        )),
                    }
                }
            };
            match verdict {
                Err(err) => results.push(pb::InvitationResult {
                    invitation_id: id.to_string(),
                    invitation: None,
                    error: Some(item_error(&err)),
                }),
                Ok(change) => {
                    if let Some((model, previous)) = change {
                        if matches!(
                            previous,
                            pb::InvitationState::Pending | pb::InvitationState::Expired
                        ) {
                            to_release.push((model.user_id, model.id));
                        }
                        changed.push((model.clone(), previous));
                    }
                    results.push(pb::InvitationResult {
                        invitation_id: id.to_string(),
                        invitation: None,
                        error: None,
                    });
                }
            }
        }
        let reason = if delete {
            internal::ReleaseReason::Deleted
        } else {
            internal::ReleaseReason::Revoked
        };
        self.release(account_id, actor.clone(), &to_release, reason, call_id)
            .await?;
        let mut outgoing = Vec::with_capacity(changed.len());
        let mut dead_hashes = Vec::new();
        let mut shown = HashMap::new();
        for (model, previous) in &changed {
            if matches!(
                previous,
                pb::InvitationState::Pending | pb::InvitationState::Expired
            ) {
                dead_hashes.push(model.token_hash.clone());
            }
            if delete {
                invitation::Entity::delete_by_id(model.id)
                    .exec(&txn)
                    .await?;
            } else {
                let mut revoked = model.clone();
                revoked.state = convert::REVOKED.to_owned();
                revoked.revoke_time = Some(now);
                revoked.update_time = now;
                revoked.claim_until = None;
                revoked
                    .clone()
                    .into_active_model()
                    .reset_all()
                    .update(&txn)
                    .await?;
                shown.insert(model.id, revoked);
            }
            outgoing.push(messages::removed(model, &actor, *previous, delete, now));
        }
        outbox::enqueue(&txn, &outgoing).await?;
        txn.commit().await?;
        self.state.tokens.forget(&dead_hashes, "revoked").await;
        // Show the invitation after the action (revoke), including those
        // already revoked.
        if !delete {
            for result in &mut results {
                if result.error.is_none()
                    && let Ok(id) = Uuid::parse_str(&result.invitation_id)
                {
                    let model = shown.get(&id).or_else(|| rows.iter().find(|m| m.id == id));
                    result.invitation = model.map(|m| convert::invitation(m, now));
                }
            }
        }
        let failed = results.iter().filter(|r| r.error.is_some()).count();
        let failed = i32::try_from(failed).unwrap_or(i32::MAX);
        let succeeded = i32::try_from(results.len()).unwrap_or(i32::MAX) - failed;
        Ok((results, succeeded, failed))
    }
}
