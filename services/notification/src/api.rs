//! The gRPC handlers of usher-notification. The RPC logic arrives with the
//! notification issue; until then every RPC answers `UNIMPLEMENTED`.

use usher_proto::notification::v1 as notification;

/// The handlers of every notification RPC.
#[derive(Clone, Debug, Default)]
pub struct NotificationApi;

#[tonic::async_trait]
impl notification::notification_service_server::NotificationService for NotificationApi {}
