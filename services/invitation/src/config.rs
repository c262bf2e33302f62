//! Configuration of usher-invitation. Every key can be set in the TOML file or
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
};

/// usher-invitation's configuration.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `development` (default) or `production`.
    pub environment: Environment,
    /// gRPC server and limits; port 50061, metrics 9101.
    pub server: ServerConfig,
    /// The invitation database.
    pub database: DatabaseConfig,
    /// Invitation tokens (hashed, with their TTL).
    pub redis: RedisConfig,
    /// Publishes invite email jobs and invitation events; consumes delivery results.
    pub amqp: AmqpConfig,
    /// Logs.
    pub telemetry: TelemetryConfig,
    /// Keys of the principal assertions.
    pub assertion: AssertionConfig,
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
        }
    }
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        self.server.validate()?;
        self.database.validate()?;
        self.redis.validate()?;
        self.amqp.validate()?;
        self.assertion.validate_for(self.environment)
    }
}

impl ServiceConfig for Config {
    fn telemetry(&self) -> &TelemetryConfig {
        &self.telemetry
    }
}
