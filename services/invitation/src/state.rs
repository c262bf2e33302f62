//! What every handler shares.

use sea_orm::DatabaseConnection;
use usher_kit::{client::ServiceChannel, clock::SharedClock, seal::Sealer};
use usher_proto::identity::internal::v1::directory_service_client::DirectoryServiceClient;

use crate::{config::InvitationsConfig, store::tokens::TokenStore};

/// The invitation service's state.
#[derive(Debug)]
pub struct Invitations {
    /// The invitation database.
    pub db: DatabaseConnection,
    /// Time, injectable in tests.
    pub clock: SharedClock,
    /// Token keys and the hourly quota in Redis.
    pub tokens: TokenStore,
    /// Identity's internal DirectoryService.
    pub directory: DirectoryServiceClient<ServiceChannel>,
    /// Seals the links in email jobs.
    pub sealer: Sealer,
    /// `<public_base_url>` without a trailing `/`.
    pub link_base: String,
    /// Resend and quota rules.
    pub rules: InvitationsConfig,
}
