//! The invitee's side, reached only with the token of a link: preview,
//! accept, decline. Every failure of a token is the same
//! INVITATION_NOT_USABLE, whatever the cause; a dependency that is down is
//! UNAVAILABLE.

use chrono::{DateTime, Duration, Utc};
use sea_orm::{
    ColumnTrait, Condition, EntityTrait, QueryFilter, QuerySelect, TransactionTrait,
    sea_query::Expr,
};
use usher_kit::{
    client::with_request_id,
    error::{ApiError, ApiResult, Reason},
    outbox,
};
use usher_proto::{identity::internal::v1 as internal, invitation::v1 as pb};

use super::{InvitationApi, convert, messages};
use crate::store::{
    entities::invitation::{self, Column},
    tokens::MAX_TOKEN_CHARS,
};

/// Longest name an invitee may choose.
const MAX_NAME_CHARS: usize = 200;
/// Password length bounds checked before the claim (identity applies the
/// deployment's policy too).
const PASSWORD_CHARS: std::ops::RangeInclusive<usize> = 8..=128;

fn not_usable() -> ApiError {
    ApiError::rejected(
        Reason::InvitationNotUsable,
        "this invitation link cannot be used; ask for a new invitation",
    )
}

fn check_token(token: &str) -> ApiResult<()> {
    if token.is_empty() {
        return Err(ApiError::invalid("token", "is required"));
    }
    if token.len() > MAX_TOKEN_CHARS {
        return Err(ApiError::invalid("token", "must be at most 128 characters"));
    }
    Ok(())
}

/// Whether `model` is usable with a link of `version` at `now`.
fn usable(model: &invitation::Model, version: i64, now: DateTime<Utc>) -> bool {
    model.token_version == version
        && model.expire_time > now
        && convert::state(model, now) == pb::InvitationState::Pending
}

impl InvitationApi {
    /// The invitation a token points at, if the link is usable now.
    async fn by_token(&self, token: &str) -> ApiResult<(invitation::Model, i64)> {
        let target = self.state.tokens.get(token).await?.ok_or_else(not_usable)?;
        let model = invitation::Entity::find_by_id(target.invitation_id)
            .one(&self.state.db)
            .await?
            .ok_or_else(not_usable)?;
        if !usable(&model, target.version, self.now()) {
            return Err(not_usable());
        }
        Ok((model, target.version))
    }

    /// PreviewInvitation: reads only.
    pub(super) async fn preview(
        &self,
        request: &pb::PreviewInvitationRequest,
        call_id: &str,
    ) -> ApiResult<pb::PreviewInvitationResponse> {
        check_token(&request.token)?;
        let (model, _) = self.by_token(&request.token).await?;
        let context = self
            .context(model.account_id, None, None, None, call_id)
            .await?;
        let account = context.account.unwrap_or_default();
        Ok(pb::PreviewInvitationResponse {
            locale: if model.locale.is_empty() {
                account.default_locale.clone()
            } else {
                model.locale.clone()
            },
            account_name: account.name,
            inviter_display_name: model.inviter_name.clone(),
            email: model.email.clone(),
            display_name: model.display_name.clone(),
            role_name: model.role_name.clone(),
            team_name: model.team_name.clone(),
            expire_time: Some(usher_kit::convert::timestamp(model.expire_time)),
            password_policy: context.password_policy,
        })
    }

    /// AcceptInvitation: the claim saga of ARCHITECTURE.md.
    pub(super) async fn accept(
        &self,
        request: pb::AcceptInvitationRequest,
        user_agent: &str,
        call_id: &str,
    ) -> ApiResult<pb::AcceptInvitationResponse> {
        check_token(&request.token)?;
        let name = request.display_name.trim();
        let mut violations = usher_kit::error::Violations::new();
        if name.is_empty()
            || name.chars().count() > MAX_NAME_CHARS
            || name.chars().any(char::is_control)
        {
            violations.add("display_name", "1 to 200 characters, no control characters");
        }
        if !PASSWORD_CHARS.contains(&request.password.chars().count()) {
            violations.add("password", "must be 8 to 128 characters");
        }
        violations.into_result()?;

        // 1. Which invitation, which version.
        let target = self
            .state
            .tokens
            .get(&request.token)
            .await?
            .ok_or_else(not_usable)?;
        // 2. The claim: one winner.
        let now = self.now();
        let claim_until = now + Duration::seconds(i64::from(self.state.rules.claim_secs));
        let claimed = invitation::Entity::update_many()
            .col_expr(Column::State, Expr::value(convert::ACCEPTING))
            .col_expr(Column::ClaimUntil, Expr::value(claim_until))
            .filter(Column::Id.eq(target.invitation_id))
            .filter(Column::TokenVersion.eq(target.version))
            .filter(Column::ExpireTime.gt(now))
            .filter(
                Condition::any()
                    .add(Column::State.eq(convert::PENDING))
                    .add(
                        Condition::all()
                            .add(Column::State.eq(convert::ACCEPTING))
                            .add(Column::ClaimUntil.lte(now)),
                    ),
            )
            .exec(&self.state.db)
            .await?;
        if claimed.rows_affected != 1 {
            return Err(not_usable());
        }
        let model = invitation::Entity::find_by_id(target.invitation_id)
            .one(&self.state.db)
            .await?
            .ok_or_else(not_usable)?;

        // 3. Activate the INVITED user (idempotent per invitation).
        let activate = internal::ActivateInvitedUserRequest {
            invitation_id: model.id.to_string(),
            account_id: model.account_id.to_string(),
            user_id: model.user_id.to_string(),
            display_name: name.to_owned(),
            password: request.password.clone(),
            metadata: model
                .metadata
                .as_ref()
                .map(usher_kit::convert::json_to_struct),
            locale: request.locale.trim().to_owned(),
        };
        let activated = self
            .state
            .directory
            .clone()
            .activate_invited_user(with_request_id(activate, call_id))
            .await;
        let user = match activated {
            Ok(answer) => answer.into_inner().user,
            Err(status) => {
                self.release_claim(&model).await;
                let err = ApiError::from(status);
                return Err(match err.reason() {
                    // The user was released or activated elsewhere: the link
                    // is no longer usable, like any other dead link.
                    Reason::NotFound | Reason::InvalidState => not_usable(),
                    _ => err,
                });
            }
        };

        // 4. ACCEPTED, events, the inviter's email; then the session.
        let context = self
            .context(
                model.account_id,
                Some(convert::inviter(&model)),
                None,
                None,
                call_id,
            )
            .await
            .unwrap_or_default();
        let account = context.account.clone().unwrap_or_default();
        let now = self.now();
        let mut outgoing = vec![messages::accepted(&model, name, now)];
        if context.inviter_active
            && !context.inviter_email.is_empty()
            && model.inviter_kind == "user"
        {
            outgoing.push(messages::accepted_email(
                &model,
                &messages::InviterAddress {
                    user_id: model.inviter_id.clone(),
                    email: context.inviter_email.clone(),
                    name: context.inviter_display_name.clone(),
                    locale: context.inviter_locale.clone(),
                },
                name,
                &messages::EmailContext {
                    account_name: account.name.clone(),
                    account_locale: account.default_locale.clone(),
                    request_id: call_id.to_owned(),
                },
                now,
            ));
        }
        let txn = self.state.db.begin().await?;
        let done = invitation::Entity::update_many()
            .col_expr(Column::State, Expr::value(convert::ACCEPTED))
            .col_expr(Column::AcceptTime, Expr::value(now))
            .col_expr(Column::UpdateTime, Expr::value(now))
            .col_expr(
                Column::ClaimUntil,
                Expr::value(Option::<DateTime<Utc>>::None),
            )
            .filter(Column::Id.eq(model.id))
            .filter(Column::State.eq(convert::ACCEPTING))
            .filter(Column::TokenVersion.eq(target.version))
            .exec(&txn)
            .await?;
        if done.rows_affected == 1 {
            outbox::enqueue(&txn, &outgoing).await?;
        }
        txn.commit().await?;
        self.state
            .tokens
            .forget(std::slice::from_ref(&model.token_hash), "accepted")
            .await;
        if done.rows_affected != 1 {
            // The claim ran out and another accept finished first: that one
            // signed the member in; this one answers like any used link.
            return Err(not_usable());
        }
        metrics::counter!("usher_invitations_accepted_total").increment(1);
        let session = self
            .state
            .directory
            .clone()
            .create_session(with_request_id(
                internal::CreateSessionRequest {
                    account_id: model.account_id.to_string(),
                    user_id: model.user_id.to_string(),
                    invitation_id: model.id.to_string(),
                    client_ip: String::new(),
                    user_agent: user_agent.to_owned(),
                },
                call_id,
            ))
            .await?
            .into_inner()
            .session;
        Ok(pb::AcceptInvitationResponse {
            user,
            session,
            account_slug: account.slug,
        })
    }

    /// Gives a claimed invitation back (the link works again).
    async fn release_claim(&self, model: &invitation::Model) {
        let released = invitation::Entity::update_many()
            .col_expr(Column::State, Expr::value(convert::PENDING))
            .col_expr(
                Column::ClaimUntil,
                Expr::value(Option::<DateTime<Utc>>::None),
            )
            .filter(Column::Id.eq(model.id))
            .filter(Column::State.eq(convert::ACCEPTING))
            .filter(Column::TokenVersion.eq(model.token_version))
            .exec(&self.state.db)
            .await;
        if let Err(err) = released {
            tracing::warn!(error = %err, invitation_id = %model.id, "claim not released; it expires by itself");
        }
    }

    /// DeclineInvitation: the row is locked while identity releases the user,
    /// so a concurrent accept or revoke waits and then finds it DECLINED.
    pub(super) async fn decline(
        &self,
        request: &pb::DeclineInvitationRequest,
        call_id: &str,
    ) -> ApiResult<pb::DeclineInvitationResponse> {
        check_token(&request.token)?;
        let target = self
            .state
            .tokens
            .get(&request.token)
            .await?
            .ok_or_else(not_usable)?;
        let txn = self.state.db.begin().await?;
        let model = invitation::Entity::find_by_id(target.invitation_id)
            .lock_exclusive()
            .one(&txn)
            .await?
            .ok_or_else(not_usable)?;
        let now = self.now();
        if !usable(&model, target.version, now) {
            return Err(not_usable());
        }
        self.release(
            model.account_id,
            messages::invitee(&model, &model.display_name),
            &[(model.user_id, model.id)],
            internal::ReleaseReason::Declined,
            call_id,
        )
        .await?;
        invitation::Entity::update_many()
            .col_expr(Column::State, Expr::value(convert::DECLINED))
            .col_expr(Column::DeclineTime, Expr::value(now))
            .col_expr(Column::UpdateTime, Expr::value(now))
            .filter(Column::Id.eq(model.id))
            .exec(&txn)
            .await?;
        outbox::enqueue(&txn, &[messages::declined(&model, now)]).await?;
        txn.commit().await?;
        self.state
            .tokens
            .forget(std::slice::from_ref(&model.token_hash), "declined")
            .await;
        Ok(pb::DeclineInvitationResponse {})
    }
}
