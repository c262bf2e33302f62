//! The client commands, one module per command group. Each talks to a
//! gateway through [`crate::client::Client`].

pub mod accounts;
pub mod audit;
pub mod directory;
pub mod invitations;
pub mod invite;
pub mod login;
pub mod parked;
pub mod platform_keys;
pub mod resolve;
pub mod users;
