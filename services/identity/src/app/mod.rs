//! The application layer of usher-identity: one function per command that
//! loads what it needs through `store`, asks `domain` what to change, and
//! writes the change with its audit entries and events in one transaction.
//! Handlers (`api`) decode a request into a command, call one of these and
//! map the result.

pub mod api_keys;
pub mod auth;
