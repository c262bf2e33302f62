//! What every handler shares.

use usher_kit::{clock::SharedClock, seal::Sealer};

use crate::{
    config::InvitationsConfig,
    directory::Directory,
    store::{Repository, tokens::TokenStore},
};

/// The invitation service's state.
#[derive(Debug)]
pub struct Invitations {
    /// The invitation database.
    pub repo: Repository,
    /// Time, injectable in tests.
    pub clock: SharedClock,
    /// Token keys and the hourly quota in Redis.
    pub tokens: TokenStore,
    /// Identity's internal DirectoryService.
    pub directory: Directory,
    /// Seals the links in email jobs.
    pub sealer: Sealer,
    /// `<public_base_url>` without a trailing `/`.
    pub link_base: String,
    /// Resend and quota rules.
    pub rules: InvitationsConfig,
}
