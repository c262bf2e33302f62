//! The application layer: each RPC as one function that loads what it
//! needs, asks the domain's rules and state machine ([`crate::domain`]),
//! and persists the decision through the store ([`crate::store`]) and
//! identity ([`crate::directory`]). Handlers (`crate::api`) only decode the
//! request, call one of these and encode the answer.
//!
//! - [`create`]: CreateInvitations, a saga over the ports of
//!   [`crate::domain::ports`], whose compensations are unit-tested with
//!   fakes;
//! - [`manage`]: list, get, resend, revoke, delete;
//! - [`public`]: preview, accept, decline (by link);
//! - [`view`]: invitations as the API shows them.

pub mod create;
pub mod manage;
pub mod public;
pub mod view;

use crate::{
    directory::Directory,
    domain::events::Links,
    state::Invitations,
    store::{Repository, tokens::TokenStore},
};

impl Invitations {
    /// The create saga on this service's identity client, token keys and
    /// database.
    pub fn create_saga(&self) -> create::CreateSaga<'_, Directory, TokenStore, Repository> {
        create::CreateSaga {
            directory: &self.directory,
            tokens: &self.tokens,
            repository: &self.repo,
            links: Links {
                sealer: &self.sealer,
                base: &self.link_base,
            },
            rules: &self.rules,
            clock: &self.clock,
        }
    }
}
