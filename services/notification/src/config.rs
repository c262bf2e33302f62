//! Configuration of usher-notification. Every key can be set in the TOML file or
//! as `USHER_<SECTION>__<KEY>`; with nothing set it targets the local
//! PostgreSQL, RabbitMQ and an SMTP server on 127.0.0.1:25.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};
use usher_kit::{
    cli::ServiceConfig,
    config::{
        AmqpConfig, ConfigError, DatabaseConfig, Environment, LinksConfig, Secret, ServerConfig,
        TelemetryConfig, Validate,
    },
    principal::AssertionConfig,
    seal::SealConfig,
};

/// usher-notification's configuration.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `development` (default) or `production`.
    pub environment: Environment,
    /// gRPC server and limits; port 50063, metrics 9103.
    pub server: ServerConfig,
    /// The notification database (deliveries and the outbox).
    pub database: DatabaseConfig,
    /// Consumes email jobs; publishes delivery results.
    pub amqp: AmqpConfig,
    /// Logs.
    pub telemetry: TelemetryConfig,
    /// Keys of the principal assertions.
    pub assertion: AssertionConfig,
    /// The key that opens the links sealed in email jobs (the producers'
    /// `seal` section).
    pub seal: SealConfig,
    /// The public base URL every link in an email must start with.
    pub links: LinksConfig,
    /// How emails leave: SMTP or a mail folder.
    pub smtp: SmtpConfig,
    /// Consumer, retries and message identity.
    pub delivery: DeliveryConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            environment: Environment::default(),
            server: ServerConfig::with_ports(50063, 9103),
            database: DatabaseConfig::local("usher_notification"),
            amqp: AmqpConfig::default(),
            telemetry: TelemetryConfig::default(),
            assertion: AssertionConfig::default(),
            seal: SealConfig::default(),
            links: LinksConfig::default(),
            smtp: SmtpConfig::default(),
            delivery: DeliveryConfig::default(),
        }
    }
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        self.server.validate()?;
        self.telemetry.validate()?;
        self.database.validate()?;
        self.amqp.validate()?;
        self.seal.validate_for(self.environment)?;
        self.links.validate_for(self.environment)?;
        self.smtp.validate_for(self.environment)?;
        self.delivery.validate()?;
        // One send is several SMTP commands, each with its own deadline: the
        // lease must outlast them, or a slow send would be taken over by a
        // duplicate copy of its job.
        if u64::from(self.delivery.lease_secs) * 1_000 < 4 * self.smtp.timeout_ms {
            return Err(ConfigError::invalid(
                "delivery.lease_secs",
                "must be at least 4 × smtp.timeout_ms",
            ));
        }
        self.assertion.validate_for(self.environment)
    }
}

impl ServiceConfig for Config {
    fn telemetry(&self) -> &TelemetryConfig {
        &self.telemetry
    }
}

/// Where rendered emails go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// An SMTP server (production).
    #[default]
    Smtp,
    /// `.eml` files in `smtp.folder` (`usher dev`).
    File,
}

/// How the SMTP connection is secured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Plain text (a local relay or a test sink only; refused in production).
    #[default]
    None,
    /// Plain connect, then `STARTTLS` (required).
    Starttls,
    /// TLS from the first byte (SMTPS, usually port 465).
    Tls,
}

/// The outgoing mail server (section `smtp`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SmtpConfig {
    /// `smtp` or `file`.
    pub transport: TransportKind,
    /// Server host name (also the TLS server name).
    pub host: String,
    /// Server port.
    pub port: u16,
    /// `none`, `starttls` or `tls`.
    pub tls: TlsMode,
    /// User name for `AUTH`; empty for no authentication.
    pub username: String,
    /// Password for `AUTH`.
    pub password: Secret,
    /// Deadline of each SMTP command, in milliseconds; far below the broker's
    /// consumer timeout (30 minutes by default), so an unacked job never
    /// outlives its delivery.
    pub timeout_ms: u64,
    /// Most SMTP connections, kept open and reused: also how many emails
    /// are handed over at once (sends beyond it wait for a connection).
    pub pool_max_size: u32,
    /// The `From` mailbox, e.g. `Usher <no-reply@usher.example>`.
    pub from: String,
    /// Folder of `.eml` files when `transport = "file"`.
    pub folder: PathBuf,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        Self {
            transport: TransportKind::Smtp,
            host: "127.0.0.1".into(),
            port: 25,
            tls: TlsMode::None,
            username: String::new(),
            password: Secret::default(),
            timeout_ms: 30_000,
            pool_max_size: 64,
            from: "Usher <no-reply@usher.localhost>".into(),
            folder: PathBuf::from("usher-mail"),
        }
    }
}

impl SmtpConfig {
    /// The SMTP command deadline.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// Checks the values; production refuses plain-text SMTP (P17).
    pub fn validate_for(&self, environment: Environment) -> Result<(), ConfigError> {
        if self.from.parse::<lettre::message::Mailbox>().is_err() {
            return Err(ConfigError::invalid("smtp.from", "must be a mailbox"));
        }
        match self.transport {
            TransportKind::File => {
                if self.folder.as_os_str().is_empty() {
                    return Err(ConfigError::invalid("smtp.folder", "must not be empty"));
                }
            }
            TransportKind::Smtp => {
                if self.host.trim().is_empty() {
                    return Err(ConfigError::invalid("smtp.host", "must not be empty"));
                }
                if self.port == 0 {
                    return Err(ConfigError::invalid("smtp.port", "must be positive"));
                }
                if !(1_000..=600_000).contains(&self.timeout_ms) {
                    return Err(ConfigError::invalid(
                        "smtp.timeout_ms",
                        "must be between 1000 and 600000",
                    ));
                }
                if self.pool_max_size == 0 {
                    return Err(ConfigError::invalid(
                        "smtp.pool_max_size",
                        "must be positive",
                    ));
                }
                if environment == Environment::Production && self.tls == TlsMode::None {
                    return Err(ConfigError::invalid(
                        "smtp.tls",
                        "must be starttls or tls in production",
                    ));
                }
                if !self.username.is_empty() && self.password.is_empty() {
                    return Err(ConfigError::invalid(
                        "smtp.password",
                        "required with smtp.username",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The consumer and its retries (section `delivery`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Unacknowledged jobs per consumer channel (the prefetch): a batch
    /// being sent plus the next one waiting. At least `batch_size`.
    pub prefetch: u16,
    /// Consumer channels on the work queue, each sending one batch at a
    /// time: batches of different channels overlap (one is sent while
    /// another is recorded).
    pub consumers: u16,
    /// Most jobs handled together: claimed in one transaction, sent at once
    /// (up to `smtp.pool_max_size` in flight), recorded with their results
    /// in one transaction, then acknowledged with one multiple-ack.
    pub batch_size: u16,
    /// How long a batch waits for more jobs after its first, in
    /// milliseconds, before it is handled as it is.
    pub batch_wait_ms: u64,
    /// Waits before each retry after a transient failure, in milliseconds,
    /// increasing; the last one repeats. One delay queue per value.
    pub retry_delays_ms: Vec<u64>,
    /// Sending attempts before a job that keeps failing transiently is
    /// parked as FAILED.
    pub max_attempts: u32,
    /// The host part of every `Message-ID` (`<job_id@host>`).
    pub message_id_host: String,
    /// How long a job may wait for a free SMTP connection, and then how
    /// long its send may take, in seconds (at least 4 × `smtp.timeout_ms`):
    /// a job being sent is leased to its consumer for twice this before
    /// another copy of it may be sent.
    pub lease_secs: u32,
    /// Sources whose jobs an external pipeline sends: this service acks them
    /// without sending, recording or reporting anything (docs/notification.md,
    /// "Taking over delivery").
    pub external_sources: Vec<ExternalSource>,
}

/// A producer whose emails an external pipeline may take over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExternalSource {
    /// usher-identity's password emails (`EMAIL_SOURCE_IDENTITY`).
    Identity,
    /// usher-invitation's invitation emails (`EMAIL_SOURCE_INVITATION`).
    Invitation,
}

impl ExternalSource {
    /// The `EmailJob.source` value of this producer.
    pub fn proto(self) -> usher_proto::notification::v1::EmailSource {
        use usher_proto::notification::v1::EmailSource;
        match self {
            Self::Identity => EmailSource::Identity,
            Self::Invitation => EmailSource::Invitation,
        }
    }
}

impl DeliveryConfig {
    /// Whether jobs of `source` (an `EmailJob.source` value) are left to an
    /// external pipeline.
    pub fn hands_off(&self, source: i32) -> bool {
        self.external_sources
            .iter()
            .any(|external| external.proto() as i32 == source)
    }
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            prefetch: 256,
            consumers: 2,
            batch_size: 128,
            batch_wait_ms: 5,
            retry_delays_ms: vec![5_000, 30_000, 120_000, 600_000, 1_800_000],
            max_attempts: 12,
            message_id_host: "usher.localhost".into(),
            lease_secs: 120,
            external_sources: Vec::new(),
        }
    }
}

impl Validate for DeliveryConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=1_000).contains(&self.prefetch) {
            return Err(ConfigError::invalid(
                "delivery.prefetch",
                "must be between 1 and 1000",
            ));
        }
        if !(1..=self.prefetch).contains(&self.batch_size) {
            return Err(ConfigError::invalid(
                "delivery.batch_size",
                "must be between 1 and delivery.prefetch",
            ));
        }
        if !(1..=16).contains(&self.consumers) {
            return Err(ConfigError::invalid(
                "delivery.consumers",
                "must be between 1 and 16",
            ));
        }
        if self.batch_wait_ms > 1_000 {
            return Err(ConfigError::invalid(
                "delivery.batch_wait_ms",
                "must be at most 1000",
            ));
        }
        if self.retry_delays_ms.is_empty()
            || self.retry_delays_ms.len() > 20
            || self
                .retry_delays_ms
                .iter()
                .any(|d| !(10..=86_400_000).contains(d))
        {
            return Err(ConfigError::invalid(
                "delivery.retry_delays_ms",
                "must hold 1 to 20 delays between 10 ms and one day",
            ));
        }
        if self.max_attempts == 0 {
            return Err(ConfigError::invalid(
                "delivery.max_attempts",
                "must be positive",
            ));
        }
        let host_ok = !self.message_id_host.is_empty()
            && self.message_id_host.len() <= 200
            && self
                .message_id_host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'));
        if !host_ok {
            return Err(ConfigError::invalid(
                "delivery.message_id_host",
                "must be a host name",
            ));
        }
        if self.lease_secs < 10 {
            return Err(ConfigError::invalid(
                "delivery.lease_secs",
                "must be at least 10",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_in_development() {
        Config::default().validate().expect("valid defaults");
    }

    #[test]
    fn the_lease_must_outlast_a_send() {
        let mut config = Config::default();
        config.delivery.lease_secs = 60;
        assert!(config.validate().is_err());
        config.smtp.timeout_ms = 15_000;
        config.validate().expect("60 s covers 4 × 15 s");
    }

    #[test]
    fn production_refuses_plain_smtp() {
        let smtp = SmtpConfig::default();
        assert!(smtp.validate_for(Environment::Production).is_err());
        let tls = SmtpConfig {
            tls: TlsMode::Starttls,
            ..SmtpConfig::default()
        };
        tls.validate_for(Environment::Production).expect("tls ok");
    }

    #[test]
    fn bad_delivery_values_are_refused() {
        let empty = DeliveryConfig {
            retry_delays_ms: Vec::new(),
            ..DeliveryConfig::default()
        };
        assert!(empty.validate().is_err());
        let host = DeliveryConfig {
            message_id_host: "a b>".into(),
            ..DeliveryConfig::default()
        };
        assert!(host.validate().is_err());
        let batch = DeliveryConfig {
            batch_size: 300,
            prefetch: 256,
            ..DeliveryConfig::default()
        };
        assert!(batch.validate().is_err());
        let consumers = DeliveryConfig {
            consumers: 0,
            ..DeliveryConfig::default()
        };
        assert!(consumers.validate().is_err());
    }

    #[test]
    fn external_sources_name_producers_and_hand_off_only_their_jobs() {
        use usher_proto::notification::v1::EmailSource;
        let delivery: DeliveryConfig =
            serde_json::from_str(r#"{"external_sources": ["invitation"]}"#).expect("parsed");
        assert!(delivery.hands_off(EmailSource::Invitation as i32));
        assert!(!delivery.hands_off(EmailSource::Identity as i32));
        assert!(!delivery.hands_off(EmailSource::Unspecified as i32));
        assert!(!DeliveryConfig::default().hands_off(EmailSource::Invitation as i32));
        let unknown = serde_json::from_str::<DeliveryConfig>(r#"{"external_sources": ["sms"]}"#)
            .expect_err("not a producer");
        assert!(unknown.to_string().contains("sms"), "{unknown}");
    }
}
