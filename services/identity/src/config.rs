//! Configuration of usher-identity. Every key can be set in the TOML file or
//! as `USHER_<SECTION>__<KEY>`; with nothing set it targets the local
//! PostgreSQL, Redis and RabbitMQ.

use serde::{Deserialize, Serialize};
use usher_kit::{
    cli::ServiceConfig,
    config::{
        AmqpConfig, ConfigError, DatabaseConfig, Environment, RedisConfig, ServerConfig,
        TelemetryConfig, Validate,
    },
    principal::AssertionConfig,
    seal::SealConfig,
    sessions::SessionConfig,
    tokens::TokenConfig,
};

pub use usher_kit::config::LinksConfig;

use crate::passwords::PasswordConfig;

/// usher-identity's configuration.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `development` (default) or `production`.
    pub environment: Environment,
    /// gRPC server and limits; port 50061, metrics 9101.
    pub server: ServerConfig,
    /// The identity database.
    pub database: DatabaseConfig,
    /// Sessions, reset tokens, rate limits.
    pub redis: RedisConfig,
    /// Publishes email jobs and user events.
    pub amqp: AmqpConfig,
    /// Logs.
    pub telemetry: TelemetryConfig,
    /// Keys of the principal assertions.
    pub assertion: AssertionConfig,
    /// argon2id parameters, the hashing pool and the password policy.
    pub passwords: PasswordConfig,
    /// The key that hashes reset tokens and API keys.
    pub tokens: TokenConfig,
    /// Session lifetimes.
    pub sessions: SessionConfig,
    /// Bounds of account settings.
    pub accounts: AccountsConfig,
    /// Where the links in emails point.
    pub links: LinksConfig,
    /// The key that seals the links inside queued email jobs (shared with the
    /// notification service).
    pub seal: SealConfig,
    /// Sign-in and password-reset throttling per account and login.
    pub throttle: ThrottleConfig,
}

/// Bounds of account settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AccountsConfig {
    /// Invitation link lifetime when the account chooses none (24 h).
    pub default_invitation_lifetime_secs: i64,
    /// Shortest lifetime an account may choose (1 h).
    pub min_invitation_lifetime_secs: i64,
    /// Longest lifetime an account may choose (7 days).
    pub max_invitation_lifetime_secs: i64,
    /// Lifetime of a password-reset link (1 h).
    pub reset_token_lifetime_secs: i64,
}

impl Default for AccountsConfig {
    fn default() -> Self {
        Self {
            default_invitation_lifetime_secs: 24 * 3600,
            min_invitation_lifetime_secs: 3600,
            max_invitation_lifetime_secs: 7 * 24 * 3600,
            reset_token_lifetime_secs: 3600,
        }
    }
}

impl Validate for AccountsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let ok = 0 < self.min_invitation_lifetime_secs
            && self.min_invitation_lifetime_secs <= self.default_invitation_lifetime_secs
            && self.default_invitation_lifetime_secs <= self.max_invitation_lifetime_secs;
        if !ok {
            return Err(ConfigError::invalid(
                "accounts.default_invitation_lifetime_secs",
                "must lie between accounts.min_invitation_lifetime_secs (positive) and accounts.max_invitation_lifetime_secs",
            ));
        }
        if !(60..=7 * 24 * 3600).contains(&self.reset_token_lifetime_secs) {
            return Err(ConfigError::invalid(
                "accounts.reset_token_lifetime_secs",
                "must be between 60 and 604800",
            ));
        }
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            environment: Environment::default(),
            server: ServerConfig::with_ports(50061, 9101),
            database: DatabaseConfig::local("usher_identity"),
            redis: RedisConfig::default(),
            amqp: AmqpConfig::default(),
            telemetry: TelemetryConfig::default(),
            assertion: AssertionConfig::default(),
            passwords: PasswordConfig::default(),
            tokens: TokenConfig::default(),
            sessions: SessionConfig::default(),
            accounts: AccountsConfig::default(),
            links: LinksConfig::default(),
            seal: SealConfig::default(),
            throttle: ThrottleConfig::default(),
        }
    }
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        self.server.validate()?;
        self.telemetry.validate()?;
        self.database.validate()?;
        self.redis.validate()?;
        self.amqp.validate()?;
        self.passwords.validate()?;
        self.tokens.validate_for(self.environment)?;
        self.sessions.validate()?;
        self.accounts.validate()?;
        self.links.validate_for(self.environment)?;
        self.seal.validate_for(self.environment)?;
        self.throttle.validate()?;
        self.assertion.validate_for(self.environment)
    }
}

impl ServiceConfig for Config {
    fn telemetry(&self) -> &TelemetryConfig {
        &self.telemetry
    }
}

/// Throttling of the public credential RPCs per account and login (section
/// `throttle`). Per-IP limits are the gateway's.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ThrottleConfig {
    /// Failed sign-ins (or current-password checks) for one account and login
    /// before further attempts are refused with RATE_LIMITED (10).
    pub sign_in_max_failures: u32,
    /// The window those failures are counted in, in seconds (900).
    pub sign_in_window_secs: u64,
    /// Password-reset emails requested for one account and email, or sent to
    /// one user by admins, within the window (5).
    pub reset_max_requests: u32,
    /// The window those requests are counted in, in seconds (3600).
    pub reset_window_secs: u64,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        Self {
            sign_in_max_failures: 10,
            sign_in_window_secs: 900,
            reset_max_requests: 5,
            reset_window_secs: 3600,
        }
    }
}

impl Validate for ThrottleConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        for (field, value) in [
            (
                "throttle.sign_in_max_failures",
                u64::from(self.sign_in_max_failures),
            ),
            (
                "throttle.reset_max_requests",
                u64::from(self.reset_max_requests),
            ),
        ] {
            if !(1..=10_000).contains(&value) {
                return Err(ConfigError::invalid(field, "must be between 1 and 10000"));
            }
        }
        for (field, value) in [
            ("throttle.sign_in_window_secs", self.sign_in_window_secs),
            ("throttle.reset_window_secs", self.reset_window_secs),
        ] {
            if !(1..=7 * 24 * 3600).contains(&value) {
                return Err(ConfigError::invalid(field, "must be between 1 and 604800"));
            }
        }
        Ok(())
    }
}
