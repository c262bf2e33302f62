//! usher-kit: what every Usher service shares.
//!
//! - [`config`]: layered figment configuration and the common sections;
//! - [`telemetry`]: JSON logs with request ids, and Prometheus metrics;
//! - [`server`]: the gRPC server stack (health, reflection, limits, shutdown);
//! - [`error`]: one error type mapped to `tonic::Status` with stable reasons;
//! - [`clock`]: time as a parameter;
//! - [`db`], [`redis`], [`amqp`], [`outbox`]: the stores and the broker;
//! - [`cache`], [`broker`]: Redis and RabbitMQ, or their in-process stand-ins
//!   for `usher dev`, behind one type each;
//! - [`principal`]: the caller's identity, asserted by the gateway and verified here;
//! - [`text`], [`idempotency`]: the input rules every RPC shares.

pub mod amqp;
pub mod authz;
pub mod broker;
pub mod cache;
pub mod cli;
pub mod client;
pub mod clock;
pub mod coalesce;
pub mod config;
pub mod convert;
pub mod db;
pub mod email;
pub mod error;
pub mod events;
pub mod health;
pub mod idempotency;
pub mod outbox;
pub mod pagination;
pub mod principal;
pub mod redis;
pub mod runtime;
pub mod seal;
pub mod server;
pub mod sessions;
pub mod telemetry;
pub mod testing;
pub mod text;
pub mod tokens;
pub mod ttl;
