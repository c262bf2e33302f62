//! Storage of the identity service: the schema, its sea-orm entities and the
//! repositories the domain calls.

pub mod accounts;
pub mod api_keys;
pub mod audit;
pub mod auth;
pub mod directory;
pub mod effects;
pub mod entities;
pub mod events;
pub mod holders;
pub mod idempotency;
pub mod principals;
pub mod roles;
pub mod schema;
pub mod scoped;
pub mod seats;
pub mod teams;
pub mod users;

pub use usher_kit::db::contains_pattern;
