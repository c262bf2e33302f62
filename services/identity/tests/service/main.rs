//! Service tests of usher-identity: the real handlers against a fresh
//! PostgreSQL database and a Redis key prefix of their own, called with a
//! verified principal as the guard would attach it (no network, no gateway;
//! see `usher_identity::testing`). One test binary, one module per area; the
//! pure rules are unit-tested beside their code in `src/domain/`.

// Test code: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod accounts;
mod audit;
mod auth;
mod common;
mod directory;
mod roles;
mod teams;
mod users;
