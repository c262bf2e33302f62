//! The application layer of usher-identity: each function runs one command
//! as load → decide → persist. It opens the transaction, loads what the rules
//! need through `store`, asks the pure rules in `domain`, and writes their
//! answer (rows, audit entries, events) in that transaction. The handlers in
//! `api` only decode requests into commands and map the answers.

pub mod accounts;
pub mod api_keys;
pub mod auth;
pub mod directory;
pub mod roles;
pub mod teams;
pub mod users;
