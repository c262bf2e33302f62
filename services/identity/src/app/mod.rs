//! The application layer of usher-identity: each command opens its
//! transaction, loads what it needs through `store`, lets `domain` decide,
//! then persists the rows and applies the decision's effects (audit entries
//! and events) in that transaction. Handlers (`api`) only decode requests
//! into commands and encode the answers.

pub mod accounts;
pub mod api_keys;
pub mod auth;
pub mod users;
