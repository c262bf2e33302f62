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
pub mod pools;
pub mod principals;
pub mod roles;
pub mod schema;
pub mod scoped;
pub mod seats;
pub mod teams;
pub mod users;

pub use usher_kit::db::contains_pattern;

/// `query` taking its rows' exclusive locks (`FOR UPDATE`) until the end of
/// the transaction on PostgreSQL; unchanged on SQLite, whose writers are
/// serialised anyway.
pub fn for_update<Q: sea_orm::QuerySelect>(query: Q, backend: sea_orm::DbBackend) -> Q {
    if backend == sea_orm::DbBackend::Postgres {
        query.lock_exclusive()
    } else {
        query
    }
}
