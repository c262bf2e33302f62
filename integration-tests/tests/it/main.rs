//! Usher's end-to-end tests: one test binary that starts the real service
//! binaries against the real PostgreSQL, Redis and RabbitMQ on this machine
//! (started by `deploy/local/services.sh`). Each test gets a fresh database,
//! a Redis key prefix and its own RabbitMQ vhost, so tests run in parallel.

// The whole crate is test code: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod access;
mod account_journey;
mod browser;
mod external_pipeline;
mod faults;
mod gateway;
mod grants;
mod grpc_web;
mod harness;
mod health;
mod identity;
mod input;
mod invitation;
mod journey;
mod limits;
mod malformed;
mod notification;
mod password_change;
mod proxy;
mod raw;
mod redis_topologies;
mod replicas;
mod set_password;
mod shutdown;
mod traces;
// The SMTP sink of the notification crate's tests, shared rather than copied.
#[allow(dead_code)]
#[path = "../../../services/notification/tests/common/smtp_sink.rs"]
mod smtp_sink;
