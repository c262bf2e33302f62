//! Configuration of usher-invitation. Every key can be set in the TOML file or
//! as `USHER_<SECTION>__<KEY>`; with nothing set it targets the local
//! PostgreSQL, Redis, RabbitMQ and identity service.

use serde::{Deserialize, Serialize};
use usher_kit::{
    cli::ServiceConfig,
    client::UpstreamConfig,
    config::{
        AmqpConfig, ConfigError, DatabaseConfig, Environment, LinksConfig, RedisConfig,
        ServerConfig, TelemetryConfig, Validate,
    },
    principal::AssertionConfig,
    seal::SealConfig,
    tokens::TokenConfig,
};

/// usher-invitation's configuration.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `development` (default) or `production`.
    pub environment: Environment,
    /// gRPC server and limits; port 50062, metrics 9102.
    pub server: ServerConfig,
    /// The invitation database.
    pub database: DatabaseConfig,
    /// Invitation tokens (hashed, with their TTL) and the hourly quota.
    pub redis: RedisConfig,
    /// Publishes invite email jobs and invitation events; consumes delivery results.
    pub amqp: AmqpConfig,
    /// Logs.
    pub telemetry: TelemetryConfig,
    /// Keys of the principal assertions (this service signs its calls to
    /// identity with its own key).
    pub assertion: AssertionConfig,
    /// The identity service (its internal DirectoryService).
    pub identity: UpstreamConfig,
    /// The key of the token hashes (the same as identity's, so one key
    /// rotation covers every token).
    pub tokens: TokenConfig,
    /// The key sealing links in email jobs (shared with notification only).
    pub seal: SealConfig,
    /// Where invitation links point: `<public_base_url>/invite?token=…`.
    pub links: LinksConfig,
    /// Resend and quota rules.
    pub invitations: InvitationsConfig,
}

/// Rules of the invitation flows (section `invitations`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct InvitationsConfig {
    /// Invitations an account may send (creates and resends) per clock
    /// hour; 0 turns the quota off.
    pub hourly_quota: u32,
    /// Shortest time between two sends of one invitation, in seconds.
    pub resend_cooldown_secs: u32,
    /// Most resends of one invitation.
    pub max_resends: u32,
    /// How long an accept may hold its claim before another may retry, in
    /// seconds (ACCEPTING state).
    pub claim_secs: u32,
    /// How often expired invitations are looked for (to publish
    /// `invitation.expired` once), in seconds; 0 turns the sweep off.
    pub expiry_sweep_secs: u32,
}

impl Default for InvitationsConfig {
    fn default() -> Self {
        Self {
            hourly_quota: 5_000,
            resend_cooldown_secs: 60,
            max_resends: 10,
            claim_secs: 30,
            expiry_sweep_secs: 30,
        }
    }
}

impl Validate for InvitationsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.resend_cooldown_secs > 24 * 3600 {
            return Err(ConfigError::invalid(
                "invitations.resend_cooldown_secs",
                "must be at most 86400",
            ));
        }
        if !(5..=600).contains(&self.claim_secs) {
            return Err(ConfigError::invalid(
                "invitations.claim_secs",
                "must be between 5 and 600",
            ));
        }
        if self.expiry_sweep_secs > 3600 {
            return Err(ConfigError::invalid(
                "invitations.expiry_sweep_secs",
                "must be at most 3600",
            ));
        }
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            environment: Environment::default(),
            server: ServerConfig::with_ports(50062, 9102),
            database: DatabaseConfig::local("usher_invitation"),
            redis: RedisConfig::default(),
            amqp: AmqpConfig::default(),
            telemetry: TelemetryConfig::default(),
            assertion: AssertionConfig::default(),
            identity: UpstreamConfig::local(50061),
            tokens: TokenConfig::default(),
            seal: SealConfig::default(),
            links: LinksConfig::default(),
            invitations: InvitationsConfig::default(),
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
        self.assertion.validate_for(self.environment)?;
        self.identity.validate("identity")?;
        self.tokens.validate_for(self.environment)?;
        self.seal.validate_for(self.environment)?;
        self.links.validate_for(self.environment)?;
        self.invitations.validate()
    }
}

impl ServiceConfig for Config {
    fn telemetry(&self) -> &TelemetryConfig {
        &self.telemetry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert!(Config::default().validate().is_ok());
    }

    #[test]
    fn bad_rules_name_their_field() {
        let mut config = Config::default();
        config.invitations.claim_secs = 1;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("invitations.claim_secs"), "{err}");
        let mut config = Config::default();
        config.identity.url = "nope".into();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("identity.url"), "{err}");
    }

    #[test]
    fn production_refuses_development_keys() {
        let config = Config {
            environment: Environment::Production,
            ..Config::default()
        };
        assert!(config.validate().is_err());
    }
}
