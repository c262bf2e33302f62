//! The invitee's side, reached only with the token of a link: preview,
//! accept, decline. Every failure of a token is the same
//! INVITATION_NOT_USABLE, whatever the cause; a dependency that is down is
//! UNAVAILABLE.

use usher_kit::{
    convert::{json_to_struct, timestamp},
    error::{ApiError, ApiResult, Reason},
};
use usher_proto::{identity::internal::v1 as internal, invitation::v1 as pb};

use crate::{
    domain::{
        Invitation,
        actors::{invitee, inviter},
        events::{EmailContext, InviterAddress},
        input::{check_answer, check_token, not_usable},
        ports::{DirectoryPort, TokenPort},
        transitions::{RowChange, claim_until, inviter_to_notify},
    },
    state::Invitations,
    store::tokens::TokenTarget,
};

impl Invitations {
    /// What a link's token points at: its Redis key or, when Redis has lost
    /// the key (a failover that dropped a recent write, a flushed or
    /// replaced Redis), the PENDING invitation PostgreSQL holds under the
    /// token's hash. Either way PostgreSQL then decides whether it is
    /// usable, so the fallback revives no dead link.
    async fn target(&self, token: &str) -> ApiResult<TokenTarget> {
        if let Some(target) = self.tokens.get(token).await? {
            return Ok(target);
        }
        let hash = self.tokens.hash_of(token).ok_or_else(not_usable)?;
        let model = self
            .repo
            .find_pending_by_token_hash(&hash)
            .await?
            .ok_or_else(not_usable)?;
        metrics::counter!("usher_invitation_token_key_misses_total").increment(1);
        Ok(TokenTarget {
            invitation_id: model.id,
            version: model.token_version,
        })
    }

    /// The invitation a token points at, if the link is usable now.
    async fn by_token(&self, token: &str) -> ApiResult<Invitation> {
        let target = self.target(token).await?;
        let model = self
            .repo
            .find_by_id(target.invitation_id)
            .await?
            .ok_or_else(not_usable)?;
        if !model.usable(target.version, self.clock.now()) {
            return Err(not_usable());
        }
        Ok(model)
    }

    /// PreviewInvitation: reads only.
    pub async fn preview(
        &self,
        request: &pb::PreviewInvitationRequest,
        call_id: &str,
    ) -> ApiResult<pb::PreviewInvitationResponse> {
        check_token(&request.token)?;
        let model = self.by_token(&request.token).await?;
        let context = self
            .directory
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
            expire_time: Some(timestamp(model.expire_time)),
            password_policy: context.password_policy,
        })
    }

    /// AcceptInvitation: the claim saga of ARCHITECTURE.md. The claim makes
    /// one accept the winner; identity activates the user; the invitation
    /// becomes ACCEPTED if the claim still holds; the member is signed in.
    pub async fn accept(
        &self,
        request: pb::AcceptInvitationRequest,
        user_agent: &str,
        call_id: &str,
    ) -> ApiResult<pb::AcceptInvitationResponse> {
        let name = check_answer(&request.token, &request.display_name, &request.password)?;

        // 1. Which invitation, which version.
        let target = self.target(&request.token).await?;
        // 2. The claim: one winner, and the row it claimed.
        let now = self.clock.now();
        let until = claim_until(
            chrono::Duration::seconds(i64::from(self.rules.claim_secs)),
            now,
        );
        let model = self
            .repo
            .claim(target.invitation_id, target.version, until, now)
            .await?
            .ok_or_else(not_usable)?;

        // 3. Activate the INVITED user (idempotent per invitation).
        let activate = internal::ActivateInvitedUserRequest {
            invitation_id: model.id.to_string(),
            account_id: model.account_id.to_string(),
            user_id: model.user_id.to_string(),
            display_name: name.to_owned(),
            password: request.password.clone(),
            metadata: model.metadata.as_ref().map(json_to_struct),
            locale: request.locale.trim().to_owned(),
        };
        let user = match self.directory.activate(activate, call_id).await {
            Ok(answer) => answer.user,
            Err(err) => {
                self.release_claim(&model).await;
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
            .directory
            .context(model.account_id, Some(inviter(&model)), None, None, call_id)
            .await
            .unwrap_or_default();
        let account = context.account.clone().unwrap_or_default();
        let now = self.clock.now();
        let tell = inviter_to_notify(
            context.inviter_active,
            InviterAddress {
                user_id: model.inviter_id.clone(),
                email: context.inviter_email.clone(),
                name: context.inviter_display_name.clone(),
                locale: context.inviter_locale.clone(),
            },
        );
        let email = EmailContext {
            account_name: account.name.clone(),
            account_locale: account.default_locale.clone(),
            request_id: call_id.to_owned(),
        };
        let transition = model.accept(name, tell.as_ref(), &email, now);
        let RowChange::Update(accepted) = &transition.row else {
            return Err(ApiError::Internal(anyhow::anyhow!(
                "an accept changes its row"
            )));
        };
        let won = self
            .repo
            .finish_accept(accepted, target.version, &transition.emit)
            .await?;
        if let Some(hash) = &transition.dead_token {
            self.tokens
                .forget(std::slice::from_ref(hash), "accepted")
                .await;
        }
        if !won {
            // The claim ran out and another accept finished first: that one
            // signed the member in; this one answers like any used link.
            return Err(not_usable());
        }
        metrics::counter!("usher_invitations_accepted_total").increment(1);
        let session = self
            .directory
            .create_session(
                internal::CreateSessionRequest {
                    account_id: model.account_id.to_string(),
                    user_id: model.user_id.to_string(),
                    invitation_id: model.id.to_string(),
                    client_ip: String::new(),
                    user_agent: user_agent.to_owned(),
                },
                call_id,
            )
            .await?
            .session;
        Ok(pb::AcceptInvitationResponse {
            user,
            session,
            account_slug: account.slug,
        })
    }

    /// Gives a claimed invitation back (the link works again).
    async fn release_claim(&self, model: &Invitation) {
        if let Err(err) = self.repo.release_claim(model.id, model.token_version).await {
            tracing::warn!(error = %err, invitation_id = %model.id, "claim not released; it expires by itself");
        }
    }

    /// DeclineInvitation: the row is locked while identity releases the user,
    /// so a concurrent accept or revoke waits and then finds it DECLINED.
    pub async fn decline(
        &self,
        request: &pb::DeclineInvitationRequest,
        call_id: &str,
    ) -> ApiResult<pb::DeclineInvitationResponse> {
        check_token(&request.token)?;
        let target = self.target(&request.token).await?;
        let tx = self.repo.begin().await?;
        let model = tx
            .lock_one(None, target.invitation_id)
            .await?
            .ok_or_else(not_usable)?;
        let transition = model.decline(target.version, self.clock.now())?;
        if let Some(target) = transition.release {
            self.directory
                .release(
                    model.account_id,
                    invitee(&model, &model.display_name),
                    &[target],
                    internal::ReleaseReason::Declined,
                    call_id,
                )
                .await?;
        }
        tx.apply(&transition.row).await?;
        tx.emit(&transition.emit).await?;
        tx.commit().await?;
        if let Some(hash) = &transition.dead_token {
            self.tokens
                .forget(std::slice::from_ref(hash), "declined")
                .await;
        }
        Ok(pb::DeclineInvitationResponse {})
    }
}
