//! Everything a handler needs, built once at start-up (CONVENTIONS #3).

use std::sync::Arc;

use chrono::Duration;
use sea_orm::DatabaseConnection;
use usher_kit::{
    clock::SharedClock, seal::Sealer, sessions::SessionStore, tokens::TokenHasher,
    ttl::SharedTtlStore,
};

use crate::{
    config::Config,
    passwords::{PasswordHasher, PasswordPolicy},
};

/// The identity service's state, shared by every handler.
#[derive(Clone, Debug)]
pub struct Identity {
    /// The identity database, for calls.
    pub db: DatabaseConnection,
    /// The same database, for the reservation batches: a pool of their own
    /// on PostgreSQL ([`crate::store::pools`]), the same pool otherwise.
    pub writes: DatabaseConnection,
    /// The time.
    pub clock: SharedClock,
    /// argon2id in a bounded pool.
    pub passwords: PasswordHasher,
    /// Password length and character rules.
    pub password_policy: PasswordPolicy,
    /// Sessions and principal snapshots (Redis, or in-process for `usher dev`).
    pub sessions: Arc<dyn SessionStore>,
    /// Keyed hashing of reset tokens and API keys.
    pub tokens: TokenHasher,
    /// Account-level settings and bounds.
    pub settings: Arc<Settings>,
    /// Rate-limit counters (sign-in failures, reset requests): Redis, or
    /// in-process for `usher dev`.
    pub keys: SharedTtlStore,
    /// Seals the links inside queued email jobs.
    pub sealer: Sealer,
    /// Concurrent ReserveInvitees of one account, written in batches.
    pub reservations: crate::app::directory::Reservations,
}

/// Settings the handlers read.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Invitation lifetime when the account sets none.
    pub default_invitation_lifetime: Duration,
    /// Shortest lifetime an account may choose.
    pub min_invitation_lifetime: Duration,
    /// Longest lifetime an account may choose.
    pub max_invitation_lifetime: Duration,
    /// Lifetime of a password-reset link.
    pub reset_token_lifetime: Duration,
    /// Base of the links in emails, without a trailing `/`.
    pub public_base_url: String,
    /// Failed sign-ins per account and login before RATE_LIMITED.
    pub sign_in_max_failures: u32,
    /// The window sign-in failures are counted in.
    pub sign_in_window: Duration,
    /// Reset emails per account and email (or per user) within the window.
    pub reset_max_requests: u32,
    /// The window reset requests are counted in.
    pub reset_window: Duration,
}

impl Settings {
    /// The settings of `config`.
    pub fn from_config(config: &Config) -> Self {
        let accounts = &config.accounts;
        Self {
            default_invitation_lifetime: Duration::seconds(
                accounts.default_invitation_lifetime_secs,
            ),
            min_invitation_lifetime: Duration::seconds(accounts.min_invitation_lifetime_secs),
            max_invitation_lifetime: Duration::seconds(accounts.max_invitation_lifetime_secs),
            reset_token_lifetime: Duration::seconds(accounts.reset_token_lifetime_secs),
            public_base_url: config.links.base().to_owned(),
            sign_in_max_failures: config.throttle.sign_in_max_failures,
            sign_in_window: Duration::seconds(
                i64::try_from(config.throttle.sign_in_window_secs).unwrap_or(900),
            ),
            reset_max_requests: config.throttle.reset_max_requests,
            reset_window: Duration::seconds(
                i64::try_from(config.throttle.reset_window_secs).unwrap_or(3600),
            ),
        }
    }
}
