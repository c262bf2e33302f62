//! The admin side: list, get, resend, revoke and delete. Each loads what it
//! needs (locking the rows it changes), asks the state machine
//! ([`crate::domain::transitions`]) and writes the decision with its
//! messages in one transaction.

use std::collections::HashMap;

use usher_kit::{
    error::{ApiError, ApiResult},
    idempotency::IdempotencyKey,
    principal::Principal,
};
use usher_proto::{
    identity::{internal::v1 as internal, v1 as identity},
    invitation::v1 as pb,
};
use uuid::Uuid;

use super::{create::give_back, view};
use crate::{
    domain::{
        Invitation,
        actors::actor,
        create::link_lifetime,
        events::{EmailContext, Links},
        input::parse_id,
        list::{COUNT_CAP, ListCommand},
        ports::{DirectoryPort, RepositoryPort, TokenEntry, TokenPort},
        transitions::{Removal, Resend, ResendRules, RowChange, quota_used_up},
    },
    state::Invitations,
};

/// The RPC whose answers are remembered per `request_id`.
const RESEND_RPC: &str = "usher.invitation.v1.InvitationService/ResendInvitations";

/// What every item of one ResendInvitations call shares.
struct ResendCall<'a> {
    account_id: Uuid,
    lifetime: chrono::Duration,
    actor: &'a identity::Actor,
    email: &'a EmailContext,
    /// Whether the caller may grant a role, asked of identity once per role.
    grantable: HashMap<Uuid, bool>,
}

impl Invitations {
    /// ListInvitations.
    pub async fn list(
        &self,
        caller: &Principal,
        request: &pb::ListInvitationsRequest,
    ) -> ApiResult<pb::ListInvitationsResponse> {
        let account_id = caller.account()?;
        let command = ListCommand::parse(request)?;
        let now = self.clock.now();
        // Up to COUNT_CAP + 1: the token carries it, and the cap shows.
        let total = match command.cursor.as_ref().and_then(|c| c.total) {
            Some(total) => total,
            None => {
                self.repo
                    .count_up_to(account_id, &command.filter, now, COUNT_CAP)
                    .await?
            }
        };
        let after = command.cursor.as_ref().map(|c| c.after()).transpose()?;
        let mut rows = self
            .repo
            .page(
                account_id,
                &command.filter,
                command.order,
                after.as_ref(),
                command.page_size + 1,
                now,
            )
            .await?;
        let more = rows.len() as u64 > command.page_size;
        rows.truncate(usize::try_from(command.page_size).unwrap_or(usize::MAX));
        let next_page_token = match rows.last() {
            Some(last) if more => command.next_page_token(last, total),
            _ => String::new(),
        };
        Ok(pb::ListInvitationsResponse {
            invitations: rows.iter().map(|m| view::invitation(m, now)).collect(),
            next_page_token,
            total_size: i32::try_from(total.min(COUNT_CAP)).unwrap_or(i32::MAX),
            total_size_capped: total > COUNT_CAP,
        })
    }

    /// GetInvitation.
    pub async fn get(
        &self,
        caller: &Principal,
        request: &pb::GetInvitationRequest,
    ) -> ApiResult<pb::GetInvitationResponse> {
        let account_id = caller.account()?;
        let id = parse_id("invitation_id", &request.invitation_id)?;
        let model = self
            .repo
            .find(account_id, id)
            .await?
            .ok_or_else(|| ApiError::not_found("invitation"))?;
        Ok(pb::GetInvitationResponse {
            invitation: Some(view::invitation(&model, self.clock.now())),
        })
    }

    /// ResendInvitations: each invitation in its own transaction; a
    /// dependency that fails fails the call.
    pub async fn resend(
        &self,
        caller: &Principal,
        mut request: pb::ResendInvitationsRequest,
        call_id: &str,
    ) -> ApiResult<pb::ResendInvitationsResponse> {
        let account_id = caller.account()?;
        let ids = crate::domain::input::parse_ids(&request.invitation_ids)?;
        let request_id = std::mem::take(&mut request.request_id);
        let idempotency = IdempotencyKey::new(caller, RESEND_RPC, &request_id, &request)?;
        if let Some(key) = &idempotency
            && let Some(answer) = self.repo.replay(key).await?
        {
            return Ok(answer);
        }
        let context = self
            .directory
            .context(account_id, None, None, None, call_id)
            .await?;
        let account = context.account.clone().unwrap_or_default();
        let email = EmailContext {
            account_name: account.name.clone(),
            account_locale: account.default_locale.clone(),
            request_id: call_id.to_owned(),
        };
        let actor = actor(caller);
        let mut call = ResendCall {
            account_id,
            lifetime: link_lifetime(&context),
            actor: &actor,
            email: &email,
            grantable: HashMap::new(),
        };
        let mut response = pb::ResendInvitationsResponse::default();
        for id in ids {
            let outcome = match self.resend_one(&mut call, id).await {
                Err(err @ (ApiError::Unavailable(_) | ApiError::Internal(_))) => return Err(err),
                outcome => outcome,
            };
            if outcome.is_ok() {
                response.succeeded_count += 1;
            } else {
                response.failed_count += 1;
            }
            let shown = outcome
                .as_ref()
                .map(|model| Some(view::invitation(model, self.clock.now())));
            response.results.push(view::item(id, shown));
        }
        if let Some(key) = idempotency {
            self.repo
                .remember(&key, &response, self.clock.now())
                .await?;
        }
        Ok(response)
    }

    async fn resend_one(&self, call: &mut ResendCall<'_>, id: Uuid) -> ApiResult<Invitation> {
        let tx = self.repo.begin().await?;
        let now = self.clock.now();
        let model = tx
            .lock_one(Some(call.account_id), id)
            .await?
            .ok_or_else(|| ApiError::not_found("invitation"))?;
        model.check_resendable(now)?;
        // A resend hands the invitation's role out again (an expired one
        // included): the caller must be able to grant it now, as identity
        // judges it; asked once per role of the call.
        let may_grant = match call.grantable.get(&model.role_id) {
            Some(known) => *known,
            None => {
                let known = self
                    .directory
                    .context(
                        call.account_id,
                        Some(call.actor.clone()),
                        Some(model.role_id),
                        None,
                        &call.email.request_id,
                    )
                    .await?
                    .inviter_may_grant_role;
                call.grantable.insert(model.role_id, known);
                known
            }
        };
        let rules = ResendRules {
            cooldown: chrono::Duration::seconds(i64::from(self.rules.resend_cooldown_secs)),
            max_resends: self.rules.max_resends,
        };
        let (token, hash) = self.tokens.generate();
        let resend = Resend {
            token: &token,
            token_hash: &hash,
            lifetime: call.lifetime,
            may_grant,
            actor: call.actor,
            links: Links {
                sealer: &self.sealer,
                base: &self.link_base,
            },
            email: call.email,
        };
        let transition = model.resend(rules, resend, now)?;
        let RowChange::Update(resent) = &transition.row else {
            return Err(ApiError::Internal(anyhow::anyhow!(
                "a resend changes its row"
            )));
        };
        if self
            .tokens
            .take_quota(call.account_id, 1, self.rules.hourly_quota, now)
            .await?
            == 0
        {
            return Err(quota_used_up(now));
        }
        let written = async {
            tx.apply(&transition.row).await?;
            tx.emit(&transition.emit).await?;
            self.tokens.put(&[TokenEntry::of(resent)], now).await?;
            tx.commit().await?;
            ApiResult::Ok(())
        }
        .await;
        if let Err(err) = written {
            give_back(&self.tokens, &self.rules, call.account_id, 1, now).await;
            return Err(err);
        }
        // The version check already makes the old link useless.
        if let Some(old) = &transition.dead_token {
            self.tokens
                .forget(std::slice::from_ref(old), "resent")
                .await;
        }
        Ok(Invitation::clone(resent))
    }

    /// RevokeInvitations (`how` Revoke) and DeleteInvitations (Delete). Rows
    /// are locked, identity releases the INVITED users, then the rows
    /// change, all before one commit: if identity fails nothing changes and
    /// the call answers UNAVAILABLE. Returns the results and the counts.
    pub async fn remove(
        &self,
        caller: &Principal,
        ids: &[String],
        how: Removal,
        call_id: &str,
    ) -> ApiResult<(Vec<pb::InvitationResult>, i32, i32)> {
        let account_id = caller.account()?;
        let ids = crate::domain::input::parse_ids(ids)?;
        let actor = actor(caller);
        let tx = self.repo.begin().await?;
        let now = self.clock.now();
        let rows = tx.lock(account_id, &ids).await?;
        let mut decided = Vec::with_capacity(ids.len());
        for id in &ids {
            let transition = match rows.iter().find(|m| m.id == *id) {
                None => Err(ApiError::not_found("invitation")),
                Some(model) => model.remove(how, &actor, now).map(|t| (model, t)),
            };
            decided.push((*id, transition));
        }
        let to_release: Vec<(Uuid, Uuid)> = decided
            .iter()
            .filter_map(|(_, t)| t.as_ref().ok().and_then(|(_, t)| t.release))
            .collect();
        let reason = match how {
            Removal::Delete => internal::ReleaseReason::Deleted,
            Removal::Revoke => internal::ReleaseReason::Revoked,
        };
        self.directory
            .release(account_id, actor.clone(), &to_release, reason, call_id)
            .await?;
        let mut outgoing = Vec::with_capacity(decided.len());
        let mut dead_hashes = Vec::new();
        for (_, transition) in decided.iter().filter_map(|(_, t)| t.as_ref().ok()) {
            tx.apply(&transition.row).await?;
            outgoing.extend(transition.emit.iter().cloned());
            dead_hashes.extend(transition.dead_token.clone());
        }
        tx.emit(&outgoing).await?;
        tx.commit().await?;
        self.tokens.forget(&dead_hashes, "revoked").await;
        let results: Vec<pb::InvitationResult> = decided
            .iter()
            .map(|(id, outcome)| {
                // Revoke shows the invitation after the action (including
                // one already revoked); delete shows none.
                let shown = outcome.as_ref().map(|(model, transition)| {
                    let after: &Invitation = match &transition.row {
                        RowChange::Update(row) => row,
                        _ => model,
                    };
                    (how == Removal::Revoke).then(|| view::invitation(after, now))
                });
                view::item(*id, shown)
            })
            .collect();
        let failed = results.iter().filter(|r| r.error.is_some()).count();
        let failed = i32::try_from(failed).unwrap_or(i32::MAX);
        let succeeded = i32::try_from(results.len()).unwrap_or(i32::MAX) - failed;
        Ok((results, succeeded, failed))
    }
}
