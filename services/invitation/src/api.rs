//! The gRPC handlers of usher-invitation. The RPC logic arrives with the
//! invitation issue; until then every RPC answers `UNIMPLEMENTED`.

use usher_proto::invitation::v1 as invitation;

/// The handlers of every invitation RPC.
#[derive(Clone, Debug, Default)]
pub struct InvitationApi;

#[tonic::async_trait]
impl invitation::invitation_service_server::InvitationService for InvitationApi {}
