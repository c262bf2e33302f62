//! The application layer of usher-identity: each function runs one command
//! as load → decide → persist. It opens the transaction, loads what the rules
//! need through `store`, asks the pure rules in `domain`, and writes their
//! answer (rows, audit entries, events) in that transaction. The handlers in
//! `api` only decode requests into commands and map the answers.

use usher_kit::principal::Principal;

pub mod accounts;
pub mod api_keys;
pub mod auth;
pub mod directory;
pub mod roles;
pub mod teams;
pub mod users;
pub mod view;

/// Who calls and under which request id: what every command knows about its
/// call (the handlers build it from the verified principal).
#[derive(Clone, Debug)]
pub struct Call {
    /// The verified caller.
    pub principal: Principal,
    /// The request id (for the audit log and logs).
    pub request_id: String,
}
