//! Identity's internal DirectoryService as this service uses it: what
//! identity knows of an account and an inviter, the reservation and release
//! of INVITED users, their activation and the invitee's first session. Each
//! call carries the request id of the call that caused it.

use usher_kit::{
    client::{ServiceChannel, with_request_id},
    error::ApiResult,
};
use usher_proto::identity::{
    internal::v1::{self as internal, directory_service_client::DirectoryServiceClient},
    v1 as identity,
};
use uuid::Uuid;

use crate::domain::{actors::this_service, ports::DirectoryPort};

/// The identity client.
#[derive(Clone, Debug)]
pub struct Directory {
    client: DirectoryServiceClient<ServiceChannel>,
}

impl Directory {
    /// Calls identity over `channel`, accepting answers of up to
    /// `max_message_bytes`.
    pub fn new(channel: ServiceChannel, max_message_bytes: usize) -> Self {
        Self {
            client: DirectoryServiceClient::new(channel)
                .max_decoding_message_size(max_message_bytes),
        }
    }

    /// Activates the INVITED user of an accepted invitation (idempotent per
    /// invitation).
    pub async fn activate(
        &self,
        request: internal::ActivateInvitedUserRequest,
        request_id: &str,
    ) -> ApiResult<internal::ActivateInvitedUserResponse> {
        Ok(self
            .client
            .clone()
            .activate_invited_user(with_request_id(request, request_id))
            .await?
            .into_inner())
    }

    /// Signs the new member in.
    pub async fn create_session(
        &self,
        request: internal::CreateSessionRequest,
        request_id: &str,
    ) -> ApiResult<internal::CreateSessionResponse> {
        Ok(self
            .client
            .clone()
            .create_session(with_request_id(request, request_id))
            .await?
            .into_inner())
    }
}

impl DirectoryPort for Directory {
    /// What identity knows of `account_id` (and of the inviter, role and
    /// team when given).
    async fn context(
        &self,
        account_id: Uuid,
        inviter: Option<identity::Actor>,
        role_id: Option<Uuid>,
        team_id: Option<Uuid>,
        request_id: &str,
    ) -> ApiResult<internal::GetInvitationContextResponse> {
        let request = internal::GetInvitationContextRequest {
            account_id: account_id.to_string(),
            inviter,
            role_id: role_id.map(|id| id.to_string()).unwrap_or_default(),
            team_id: team_id.map(|id| id.to_string()).unwrap_or_default(),
        };
        Ok(self
            .client
            .clone()
            .get_invitation_context(with_request_id(request, request_id))
            .await?
            .into_inner())
    }

    /// Reserves an INVITED user per invitee (idempotent per invitation id).
    async fn reserve(
        &self,
        request: internal::ReserveInviteesRequest,
        request_id: &str,
    ) -> ApiResult<internal::ReserveInviteesResponse> {
        Ok(self
            .client
            .clone()
            .reserve_invitees(with_request_id(request, request_id))
            .await?
            .into_inner())
    }

    /// Removes INVITED users from identity (revoke, delete, decline,
    /// rollback), each `(user, invitation)` only while still reserved for
    /// its invitation.
    async fn release(
        &self,
        account_id: Uuid,
        actor: identity::Actor,
        targets: &[(Uuid, Uuid)],
        reason: internal::ReleaseReason,
        request_id: &str,
    ) -> ApiResult<()> {
        let targets = targets
            .iter()
            .map(|(user_id, invitation_id)| internal::ReleaseTarget {
                user_id: user_id.to_string(),
                email: String::new(),
                invitation_id: invitation_id.to_string(),
            })
            .collect();
        self.release_targets(account_id, actor, targets, reason, request_id)
            .await
    }

    async fn release_unanswered(
        &self,
        account_id: Uuid,
        targets: &[(String, Uuid)],
        request_id: &str,
    ) -> ApiResult<()> {
        let targets = targets
            .iter()
            .map(|(email, invitation_id)| internal::ReleaseTarget {
                user_id: String::new(),
                email: email.clone(),
                invitation_id: invitation_id.to_string(),
            })
            .collect();
        self.release_targets(
            account_id,
            this_service(),
            targets,
            internal::ReleaseReason::Rollback,
            request_id,
        )
        .await
    }
}

impl Directory {
    /// One ReleaseInvitees call; nothing is sent for no target.
    async fn release_targets(
        &self,
        account_id: Uuid,
        actor: identity::Actor,
        targets: Vec<internal::ReleaseTarget>,
        reason: internal::ReleaseReason,
        request_id: &str,
    ) -> ApiResult<()> {
        if targets.is_empty() {
            return Ok(());
        }
        let request = internal::ReleaseInviteesRequest {
            account_id: account_id.to_string(),
            actor: Some(actor),
            targets,
            reason: reason as i32,
        };
        self.client
            .clone()
            .release_invitees(with_request_id(request, request_id))
            .await?;
        Ok(())
    }
}
