//! The invitation database and the token keys in Redis.

pub mod entities;
pub mod schema;
pub mod tokens;
