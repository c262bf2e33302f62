//! The gRPC handlers of usher-invitation. Each RPC's logic lives in an
//! inherent method (`create`, `resend`, …) returning [`ApiResult`]; the trait
//! implementation only unwraps the request and maps errors to statuses.

mod convert;
mod create;
mod manage;
mod messages;
mod public;

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use tonic::{Request, Response, Status};
use usher_kit::{
    client::with_request_id,
    error::{ApiError, ApiResult},
    server::principal,
};
use usher_proto::{
    identity::{internal::v1 as internal, v1 as identity},
    invitation::v1 as pb,
};
use uuid::Uuid;

pub use convert::state as state_of;
pub use messages::expired as expired_event;

use crate::state::Invitations;

/// Most ids in one bulk call.
pub const MAX_BULK_IDS: usize = 1_000;

/// The handlers of every invitation RPC.
#[derive(Clone, Debug)]
pub struct InvitationApi {
    state: Arc<Invitations>,
}

impl InvitationApi {
    /// Handlers over `state`.
    pub fn new(state: Arc<Invitations>) -> Self {
        Self { state }
    }

    /// The state behind the handlers.
    pub fn state(&self) -> &Arc<Invitations> {
        &self.state
    }

    fn now(&self) -> DateTime<Utc> {
        self.state.clock.now()
    }

    /// What identity knows of `account` (and of the inviter, role and team
    /// when given).
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
            .state
            .directory
            .clone()
            .get_invitation_context(with_request_id(request, request_id))
            .await?
            .into_inner())
    }

    /// Removes INVITED users from identity (revoke, delete, decline), each
    /// only while still reserved for its invitation.
    async fn release(
        &self,
        account_id: Uuid,
        actor: identity::Actor,
        targets: &[(Uuid, Uuid)],
        reason: internal::ReleaseReason,
        request_id: &str,
    ) -> ApiResult<()> {
        if targets.is_empty() {
            return Ok(());
        }
        let request = internal::ReleaseInviteesRequest {
            account_id: account_id.to_string(),
            actor: Some(actor),
            targets: targets
                .iter()
                .map(|(user_id, invitation_id)| internal::ReleaseTarget {
                    user_id: user_id.to_string(),
                    email: String::new(),
                    invitation_id: invitation_id.to_string(),
                })
                .collect(),
            reason: reason as i32,
        };
        self.state
            .directory
            .clone()
            .release_invitees(with_request_id(request, request_id))
            .await?;
        Ok(())
    }
}

/// The account's effective invitation lifetime (24 hours if identity says
/// nothing).
fn lifetime(context: &internal::GetInvitationContextResponse) -> Duration {
    context
        .account
        .as_ref()
        .and_then(|account| account.invitation_lifetime)
        .map(|d| Duration::seconds(d.seconds))
        .filter(|d| *d > Duration::zero())
        .unwrap_or_else(|| Duration::hours(24))
}

/// The request id of a call (set by the gateway), or empty, once the
/// call's text fields passed the one text rule ([`usher_kit::text`]) and its
/// `x-request-id` the one request-id rule.
fn checked<T: prost::Message + prost::Name>(request: &Request<T>) -> Result<String, Status> {
    usher_kit::text::check_request(request)?;
    usher_kit::server::request_id(request)
}

/// A UUID field.
fn parse_id(field: &str, value: &str) -> ApiResult<Uuid> {
    Uuid::parse_str(value.trim()).map_err(|_| ApiError::invalid(field, "must be a UUID"))
}

/// An optional UUID field (empty for none).
fn parse_optional_id(field: &str, value: &str) -> ApiResult<Option<Uuid>> {
    if value.trim().is_empty() {
        Ok(None)
    } else {
        parse_id(field, value).map(Some)
    }
}

/// The ids of a bulk call: 1..1,000 distinct UUIDs.
fn parse_ids(ids: &[String]) -> ApiResult<Vec<Uuid>> {
    const FIELD: &str = "invitation_ids";
    if ids.is_empty() {
        return Err(ApiError::invalid(FIELD, "at least one id is required"));
    }
    if ids.len() > MAX_BULK_IDS {
        return Err(ApiError::invalid(FIELD, "at most 1000 ids per call"));
    }
    let mut seen = std::collections::HashSet::with_capacity(ids.len());
    ids.iter()
        .enumerate()
        .map(|(i, id)| {
            let id = parse_id(&format!("{FIELD}[{i}]"), id)?;
            if !seen.insert(id) {
                return Err(ApiError::invalid(format!("{FIELD}[{i}]"), "duplicate id"));
            }
            Ok(id)
        })
        .collect()
}

/// A failed item of a bulk call.
fn item_error(err: &ApiError) -> identity::ItemError {
    identity::ItemError {
        reason: err.reason().as_str().to_owned(),
        message: match err {
            ApiError::Rejected { message, .. } => message.clone(),
            ApiError::InvalidArgument(_) => "invalid argument".to_owned(),
            ApiError::Unavailable(_) => "a dependency is unavailable, retry shortly".to_owned(),
            ApiError::Internal(_) => "internal error".to_owned(),
        },
    }
}

fn answer<T>(result: ApiResult<T>) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(Status::from)
}

#[tonic::async_trait]
impl pb::invitation_service_server::InvitationService for InvitationApi {
    async fn create_invitations(
        &self,
        request: Request<pb::CreateInvitationsRequest>,
    ) -> Result<Response<pb::CreateInvitationsResponse>, Status> {
        let caller = principal(&request)?;
        let rid = checked(&request)?;
        answer(self.create(&caller, request.into_inner(), &rid).await)
    }

    async fn resend_invitations(
        &self,
        request: Request<pb::ResendInvitationsRequest>,
    ) -> Result<Response<pb::ResendInvitationsResponse>, Status> {
        let caller = principal(&request)?;
        let rid = checked(&request)?;
        answer(self.resend(&caller, request.into_inner(), &rid).await)
    }

    async fn revoke_invitations(
        &self,
        request: Request<pb::RevokeInvitationsRequest>,
    ) -> Result<Response<pb::RevokeInvitationsResponse>, Status> {
        let caller = principal(&request)?;
        let rid = checked(&request)?;
        let message = request.into_inner();
        answer(
            self.remove(&caller, &message.invitation_ids, false, &rid)
                .await
                .map(
                    |(results, succeeded_count, failed_count)| pb::RevokeInvitationsResponse {
                        results,
                        succeeded_count,
                        failed_count,
                    },
                ),
        )
    }

    async fn delete_invitations(
        &self,
        request: Request<pb::DeleteInvitationsRequest>,
    ) -> Result<Response<pb::DeleteInvitationsResponse>, Status> {
        let caller = principal(&request)?;
        let rid = checked(&request)?;
        let message = request.into_inner();
        answer(
            self.remove(&caller, &message.invitation_ids, true, &rid)
                .await
                .map(
                    |(results, succeeded_count, failed_count)| pb::DeleteInvitationsResponse {
                        results,
                        succeeded_count,
                        failed_count,
                    },
                ),
        )
    }

    async fn list_invitations(
        &self,
        request: Request<pb::ListInvitationsRequest>,
    ) -> Result<Response<pb::ListInvitationsResponse>, Status> {
        let caller = principal(&request)?;
        checked(&request)?;
        answer(self.list(&caller, request.into_inner()).await)
    }

    async fn get_invitation(
        &self,
        request: Request<pb::GetInvitationRequest>,
    ) -> Result<Response<pb::GetInvitationResponse>, Status> {
        let caller = principal(&request)?;
        checked(&request)?;
        answer(self.get(&caller, &request.into_inner()).await)
    }

    async fn preview_invitation(
        &self,
        request: Request<pb::PreviewInvitationRequest>,
    ) -> Result<Response<pb::PreviewInvitationResponse>, Status> {
        let rid = checked(&request)?;
        answer(self.preview(&request.into_inner(), &rid).await)
    }

    async fn accept_invitation(
        &self,
        request: Request<pb::AcceptInvitationRequest>,
    ) -> Result<Response<pb::AcceptInvitationResponse>, Status> {
        let rid = checked(&request)?;
        let user_agent = request
            .metadata()
            .get("user-agent")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.chars().take(512).collect::<String>())
            .unwrap_or_default();
        answer(self.accept(request.into_inner(), &user_agent, &rid).await)
    }

    async fn decline_invitation(
        &self,
        request: Request<pb::DeclineInvitationRequest>,
    ) -> Result<Response<pb::DeclineInvitationResponse>, Status> {
        let rid = checked(&request)?;
        answer(self.decline(&request.into_inner(), &rid).await)
    }
}
