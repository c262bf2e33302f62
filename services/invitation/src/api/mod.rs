//! The gRPC handlers of usher-invitation. Each RPC takes the caller and
//! the request id the guard checked, calls one application function
//! ([`crate::app`]) and maps its result to a response or a status.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use usher_kit::{error::ApiResult, server::principal};
use usher_proto::invitation::v1 as pb;

pub use crate::domain::input::MAX_BULK_IDS;
use crate::{domain::transitions::Removal, state::Invitations};

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
}

/// The request id of a call (set by the gateway), or empty, once the
/// call's text fields passed the one text rule ([`usher_kit::text`]) and its
/// `x-request-id` the one request-id rule.
fn checked<T: prost::Message + prost::Name>(request: &Request<T>) -> Result<String, Status> {
    usher_kit::text::check_request(request)?;
    usher_kit::server::request_id(request)
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
        let saga = self.state.create_saga();
        answer(saga.run(&caller, request.into_inner(), &rid).await)
    }

    async fn resend_invitations(
        &self,
        request: Request<pb::ResendInvitationsRequest>,
    ) -> Result<Response<pb::ResendInvitationsResponse>, Status> {
        let caller = principal(&request)?;
        let rid = checked(&request)?;
        answer(self.state.resend(&caller, request.into_inner(), &rid).await)
    }

    async fn revoke_invitations(
        &self,
        request: Request<pb::RevokeInvitationsRequest>,
    ) -> Result<Response<pb::RevokeInvitationsResponse>, Status> {
        let caller = principal(&request)?;
        let rid = checked(&request)?;
        let ids = request.into_inner().invitation_ids;
        let removed = self
            .state
            .remove(&caller, &ids, Removal::Revoke, &rid)
            .await;
        answer(removed.map(|(results, succeeded_count, failed_count)| {
            pb::RevokeInvitationsResponse {
                results,
                succeeded_count,
                failed_count,
            }
        }))
    }

    async fn delete_invitations(
        &self,
        request: Request<pb::DeleteInvitationsRequest>,
    ) -> Result<Response<pb::DeleteInvitationsResponse>, Status> {
        let caller = principal(&request)?;
        let rid = checked(&request)?;
        let ids = request.into_inner().invitation_ids;
        let removed = self
            .state
            .remove(&caller, &ids, Removal::Delete, &rid)
            .await;
        answer(removed.map(|(results, succeeded_count, failed_count)| {
            pb::DeleteInvitationsResponse {
                results,
                succeeded_count,
                failed_count,
            }
        }))
    }

    async fn list_invitations(
        &self,
        request: Request<pb::ListInvitationsRequest>,
    ) -> Result<Response<pb::ListInvitationsResponse>, Status> {
        let caller = principal(&request)?;
        checked(&request)?;
        answer(self.state.list(&caller, request.get_ref()).await)
    }

    async fn get_invitation(
        &self,
        request: Request<pb::GetInvitationRequest>,
    ) -> Result<Response<pb::GetInvitationResponse>, Status> {
        let caller = principal(&request)?;
        checked(&request)?;
        answer(self.state.get(&caller, request.get_ref()).await)
    }

    async fn preview_invitation(
        &self,
        request: Request<pb::PreviewInvitationRequest>,
    ) -> Result<Response<pb::PreviewInvitationResponse>, Status> {
        let rid = checked(&request)?;
        answer(self.state.preview(request.get_ref(), &rid).await)
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
        answer(
            self.state
                .accept(request.into_inner(), &user_agent, &rid)
                .await,
        )
    }

    async fn decline_invitation(
        &self,
        request: Request<pb::DeclineInvitationRequest>,
    ) -> Result<Response<pb::DeclineInvitationResponse>, Status> {
        let rid = checked(&request)?;
        answer(self.state.decline(request.get_ref(), &rid).await)
    }
}
