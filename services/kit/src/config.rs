//! Layered configuration (CONVENTIONS.md #5): built-in defaults → a TOML file
//! (`--config FILE`, `USHER_CONFIG`, or `./usher.toml` when present) →
//! `USHER_*` environment variables (`USHER_DATABASE__URL` sets `database.url`),
//! then [`Validate`]. Unknown keys are errors; secrets are redacted in `Debug`.

use std::{fmt, net::SocketAddr, path::Path, time::Duration};

use figment::{
    Figment,
    providers::{Format, Serialized, Toml},
    value::Value,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Environment variable naming the configuration file.
pub const CONFIG_ENV: &str = "USHER_CONFIG";
/// Prefix of every configuration environment variable.
pub const ENV_PREFIX: &str = "USHER_";
/// Prefixes of variables that belong to the `usher` command line
/// (`USHER_CLI_TOKEN`, `USHER_DEV_LISTEN`, …), not to a service's
/// configuration: skipped here, so a shell that sets them can still start
/// the services.
pub const RESERVED_ENV_PREFIXES: [&str; 2] = ["USHER_CLI_", "USHER_DEV_"];

/// Why configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A source could not be read or a value has the wrong type or name.
    #[error("invalid configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    /// The values parse but break a rule.
    #[error("invalid configuration: {field}: {message}")]
    Invalid {
        /// The dotted key at fault, e.g. `database.max_connections`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
}

impl ConfigError {
    /// A rule broken by the value at `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Checks that loaded values make sense together.
pub trait Validate {
    /// Returns the first rule broken.
    fn validate(&self) -> Result<(), ConfigError>;
}

/// Loads `T` from its defaults, the file and the environment, then validates it.
pub fn load<T>(file: Option<&Path>) -> Result<T, ConfigError>
where
    T: Serialize + DeserializeOwned + Default + Validate,
{
    let figment = figment_for::<T>(file, std::env::vars());
    let config: T = figment.extract().map_err(Box::new)?;
    config.validate()?;
    Ok(config)
}

/// The figment behind [`load`], with the environment given as values so tests
/// never mutate the process environment.
pub fn figment_for<T: Serialize + Default>(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Figment {
    let env: Vec<(String, String)> = env.into_iter().collect();
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    let named = file.map(Path::to_path_buf).or_else(|| {
        env.iter()
            .find(|(k, _)| k == CONFIG_ENV)
            .map(|(_, v)| std::path::PathBuf::from(v))
    });
    match named {
        Some(path) => figment = figment.merge(Toml::file_exact(path)),
        None => figment = figment.merge(Toml::file("usher.toml")),
    }
    for (key, value) in env {
        let Some(rest) = key.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if key == CONFIG_ENV
            || rest.is_empty()
            || RESERVED_ENV_PREFIXES.iter().any(|p| key.starts_with(p))
        {
            continue;
        }
        let path = rest
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect::<Vec<_>>()
            .join(".");
        let value: Value = match value.parse() {
            Ok(value) => value,
            Err(never) => match never {},
        };
        figment = figment.merge(Serialized::global(&path, value));
    }
    figment
}

/// A secret value (URL with a password, key material). Never printed by `Debug`
/// or `Display`; read it with [`Secret::expose`].
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret value, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether no value was given.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "Secret(<empty>)"
        } else {
            "Secret(<redacted>)"
        })
    }
}

/// Whether this deployment is a development or a production one. Production
/// refuses the built-in development keys and a `links.public_base_url` that
/// is not `https`; reflection does not depend on it (`server.reflection`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    /// Local development and tests (the default).
    #[default]
    Development,
    /// A real deployment.
    Production,
}

/// The gRPC server of a service: addresses and limits (P22, P23).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address the gRPC server listens on.
    pub listen: SocketAddr,
    /// Address of the Prometheus `/metrics` endpoint; `None` turns it off.
    pub metrics_listen: Option<SocketAddr>,
    /// Serve gRPC reflection (v1 and v1alpha).
    pub reflection: bool,
    /// Deadline applied to a call that carries none, in milliseconds.
    pub request_timeout_ms: u64,
    /// Calls handled at once before new ones are shed with `UNAVAILABLE`.
    pub concurrency_limit: usize,
    /// Largest accepted request message, in bytes.
    pub max_message_bytes: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// HTTP/2 keepalive ping interval, in seconds.
    pub keepalive_interval_secs: u64,
    /// How long a SIGTERM waits, health already `NOT_SERVING`, before the
    /// listener closes, in milliseconds (lets load balancers notice).
    pub shutdown_drain_ms: u64,
    /// How long in-flight calls get to finish after the listener closes.
    pub shutdown_grace_ms: u64,
}

impl ServerConfig {
    /// Defaults with the given gRPC and metrics ports.
    pub fn with_ports(grpc: u16, metrics: u16) -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], grpc)),
            metrics_listen: Some(SocketAddr::from(([0, 0, 0, 0], metrics))),
            reflection: true,
            request_timeout_ms: 10_000,
            concurrency_limit: 1_024,
            max_message_bytes: 4 * 1024 * 1024,
            max_concurrent_streams: 256,
            keepalive_interval_secs: 30,
            shutdown_drain_ms: 1_000,
            shutdown_grace_ms: 20_000,
        }
    }

    /// The default deadline of a call.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self::with_ports(0, 0)
    }
}

impl Validate for ServerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.request_timeout_ms == 0 {
            return Err(ConfigError::invalid(
                "server.request_timeout_ms",
                "must be positive",
            ));
        }
        if self.concurrency_limit == 0 {
            return Err(ConfigError::invalid(
                "server.concurrency_limit",
                "must be positive",
            ));
        }
        if !(1024..=64 * 1024 * 1024).contains(&self.max_message_bytes) {
            return Err(ConfigError::invalid(
                "server.max_message_bytes",
                "must be between 1024 and 67108864",
            ));
        }
        if self.max_concurrent_streams == 0 {
            return Err(ConfigError::invalid(
                "server.max_concurrent_streams",
                "must be positive",
            ));
        }
        Ok(())
    }
}

/// A PostgreSQL database (or SQLite, for `usher dev` only).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Connection URL, e.g. `postgres://user:pass@host:5432/usher_identity`.
    pub url: Secret,
    /// Largest number of pooled connections.
    pub max_connections: u32,
    /// Connections kept open when idle.
    pub min_connections: u32,
    /// How long a call waits for a pooled connection, opening one included,
    /// in milliseconds. A refused connection is retried until then; under
    /// load it is queueing time, so it stays well above scheduling delays on
    /// a saturated host (and below the calls' deadline).
    pub connect_timeout_ms: u64,
    /// Apply pending migrations when `serve` starts (a Helm hook Job runs
    /// `migrate` instead and sets this to false).
    pub migrate_on_start: bool,
}

impl DatabaseConfig {
    /// Defaults for the local PostgreSQL and the named database.
    pub fn local(database: &str) -> Self {
        Self {
            url: Secret::new(format!("postgres://postgres@127.0.0.1:5432/{database}")),
            max_connections: 16,
            min_connections: 1,
            connect_timeout_ms: 5_000,
            migrate_on_start: true,
        }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self::local("usher")
    }
}

impl Validate for DatabaseConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let url = self.url.expose();
        if !(url.starts_with("postgres://")
            || url.starts_with("postgresql://")
            || url.starts_with("sqlite:"))
        {
            return Err(ConfigError::invalid(
                "database.url",
                "must be a postgres:// (or, for usher dev, sqlite:) URL",
            ));
        }
        if self.max_connections == 0 || self.min_connections > self.max_connections {
            return Err(ConfigError::invalid(
                "database.max_connections",
                "must be positive and at least database.min_connections",
            ));
        }
        Ok(())
    }
}

/// A Redis server.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// Connection URL. One server: `redis://[user:password@]host:port[/db]`
    /// (`rediss://` for TLS). A Sentinel group's master:
    /// `redis+sentinel://[user:password@]host:port,host:port,…/<master name>[/db]`
    /// (the sentinels' addresses; the credentials and database are the
    /// master's). A Cluster: `redis+cluster://[user:password@]host:port,…`
    /// (nodes to learn the cluster from). `rediss+sentinel://` and
    /// `rediss+cluster://` use TLS to every node.
    pub url: Secret,
    /// Password of the sentinels, when they require one (empty: none).
    /// Only used with `redis+sentinel://`.
    pub sentinel_password: Secret,
    /// Prefix of every key this deployment writes (lets tests and several
    /// deployments share one server).
    pub key_prefix: String,
    /// Deadline to open (or re-open) the connection, in milliseconds: a
    /// Redis that is down or unreachable is detected here (or at once, when
    /// the connection is refused or reset).
    pub connect_timeout_ms: u64,
    /// Deadline of one command on an open connection, in milliseconds. It
    /// only bounds a server that stalls: a live Redis on a saturated host
    /// can answer late, and a late answer is not a Redis that is down, so
    /// it is kept well above scheduling delays (and below the calls'
    /// deadline).
    pub command_timeout_ms: u64,
    /// Replicas that must hold a write that cannot be rebuilt (invitation
    /// tokens, sessions and their revocations, principal and API key
    /// snapshots) before it counts as done (`WAIT`): 0 answers as soon as
    /// the master has it, and a failover may lose it; 1 or more makes such
    /// a write fail (`UNAVAILABLE`) unless that many replicas acknowledged
    /// it within `wait_timeout_ms`.
    pub wait_replicas: u32,
    /// How long a write waits for `wait_replicas` replicas, in milliseconds.
    pub wait_timeout_ms: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: Secret::new("redis://127.0.0.1:6379"),
            sentinel_password: Secret::new(""),
            key_prefix: "usher:".into(),
            connect_timeout_ms: 1_000,
            command_timeout_ms: 5_000,
            wait_replicas: 0,
            wait_timeout_ms: 500,
        }
    }
}

impl Validate for RedisConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        crate::redis::Topology::of(self.url.expose())
            .map_err(|why| ConfigError::invalid("redis.url", why))?;
        if self.connect_timeout_ms == 0 {
            return Err(ConfigError::invalid(
                "redis.connect_timeout_ms",
                "must be positive",
            ));
        }
        if self.command_timeout_ms == 0 {
            return Err(ConfigError::invalid(
                "redis.command_timeout_ms",
                "must be positive",
            ));
        }
        if self.wait_replicas > 0
            && (self.wait_timeout_ms == 0 || self.wait_timeout_ms >= self.command_timeout_ms)
        {
            return Err(ConfigError::invalid(
                "redis.wait_timeout_ms",
                "must be positive and below redis.command_timeout_ms when redis.wait_replicas is set",
            ));
        }
        Ok(())
    }
}

/// A RabbitMQ broker.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpConfig {
    /// Connection URL, `amqp://` or `amqps://` (TLS), with the vhost as path.
    pub url: Secret,
    /// Heartbeat interval negotiated with the broker, in seconds: a dead
    /// connection is noticed within about twice this.
    pub heartbeat_secs: u16,
    /// Smallest delay between reconnection attempts, in milliseconds.
    pub reconnect_min_ms: u64,
    /// Largest delay between reconnection attempts, in milliseconds.
    pub reconnect_max_ms: u64,
    /// Deadline for a publisher confirm, in milliseconds.
    pub confirm_timeout_ms: u64,
    /// Largest AMQP frame asked of the broker, in bytes (it may choose a
    /// smaller one; RabbitMQ offers 131072). The client keeps a send and a
    /// receive buffer of 32 frames each, so this sizes 64 × its value of
    /// memory; a message body larger than a frame is sent in several. A
    /// `frame_max` in the URL's query wins over it.
    pub frame_max_bytes: u32,
}

/// The AMQP floor of `frame_max` (AMQP 0-9-1 §4.2.1).
pub const AMQP_FRAME_MIN_BYTES: u32 = 4_096;

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: Secret::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
            heartbeat_secs: 5,
            reconnect_min_ms: 100,
            reconnect_max_ms: 5_000,
            confirm_timeout_ms: 5_000,
            frame_max_bytes: 16_384,
        }
    }
}

impl Validate for AmqpConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let url = self.url.expose();
        if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
            return Err(ConfigError::invalid(
                "amqp.url",
                "must be an amqp:// or amqps:// URL",
            ));
        }
        if self.reconnect_min_ms == 0 || self.reconnect_min_ms > self.reconnect_max_ms {
            return Err(ConfigError::invalid(
                "amqp.reconnect_min_ms",
                "must be positive and at most amqp.reconnect_max_ms",
            ));
        }
        if !(AMQP_FRAME_MIN_BYTES..=1_048_576).contains(&self.frame_max_bytes) {
            return Err(ConfigError::invalid(
                "amqp.frame_max_bytes",
                "must be between 4096 and 1048576",
            ));
        }
        Ok(())
    }
}

/// Logs and traces.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// `tracing` filter directives, e.g. `info,usher_identity=debug`.
    pub log_filter: String,
    /// `json` (one object per line) or `text`.
    pub log_format: LogFormat,
    /// Where to export traces over OTLP/gRPC, e.g.
    /// `http://otel-collector:4317`; empty (the default) exports none.
    pub otlp_endpoint: String,
    /// The share of traces started here that are recorded, 0.0 to 1.0
    /// (default 1.0). A call that arrives with a W3C `traceparent` follows
    /// its caller's decision instead.
    pub trace_sample_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_filter: "info".into(),
            log_format: LogFormat::Json,
            otlp_endpoint: String::new(),
            trace_sample_ratio: 1.0,
        }
    }
}

impl Validate for TelemetryConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(0.0..=1.0).contains(&self.trace_sample_ratio) {
            return Err(ConfigError::invalid(
                "telemetry.trace_sample_ratio",
                "must be between 0.0 and 1.0",
            ));
        }
        if !self.otlp_endpoint.is_empty() {
            let url = url::Url::parse(&self.otlp_endpoint).map_err(|_| {
                ConfigError::invalid("telemetry.otlp_endpoint", "must be an http(s) URL")
            })?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                return Err(ConfigError::invalid(
                    "telemetry.otlp_endpoint",
                    "must be an http(s) URL",
                ));
            }
        }
        Ok(())
    }
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// Human-readable lines.
    Text,
}

/// Where the links in emails point (section `links`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LinksConfig {
    /// The public address of the gateway, e.g. `https://usher.example.com`:
    /// reset links are `<public_base_url>/reset?token=…`,
    /// invitation links `<public_base_url>/invite?token=…`. `https` in
    /// production; no query or fragment.
    pub public_base_url: String,
}

impl Default for LinksConfig {
    fn default() -> Self {
        Self {
            public_base_url: "http://127.0.0.1:8080".into(),
        }
    }
}

impl LinksConfig {
    /// The base URL without a trailing `/`.
    pub fn base(&self) -> &str {
        self.public_base_url.trim().trim_end_matches('/')
    }

    /// Checks the URL: absolute, `http(s)` (`https` in production), with a
    /// host and no query, fragment or credentials.
    pub fn validate_for(&self, environment: Environment) -> Result<(), ConfigError> {
        const FIELD: &str = "links.public_base_url";
        let url = url::Url::parse(self.base())
            .map_err(|_| ConfigError::invalid(FIELD, "must be an absolute URL"))?;
        let scheme_ok = match environment {
            Environment::Production => url.scheme() == "https",
            Environment::Development => matches!(url.scheme(), "http" | "https"),
        };
        if !scheme_ok {
            return Err(ConfigError::invalid(
                FIELD,
                "must use https (or http outside production)",
            ));
        }
        if url.host_str().is_none_or(str::is_empty)
            || url.query().is_some()
            || url.fragment().is_some()
            || !url.username().is_empty()
            || url.password().is_some()
        {
            return Err(ConfigError::invalid(
                FIELD,
                "must have a host and no query, fragment or credentials",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Sample {
        server: ServerConfig,
        database: DatabaseConfig,
    }

    impl Validate for Sample {
        fn validate(&self) -> Result<(), ConfigError> {
            self.server.validate()?;
            self.database.validate()
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn amqp_frame_max_defaults_to_16_kib_and_is_bounded_naming_the_key() {
        assert_eq!(AmqpConfig::default().frame_max_bytes, 16_384);
        assert!(AmqpConfig::default().validate().is_ok());
        for bad in [0, 4_095, 1_048_577] {
            let err = AmqpConfig {
                frame_max_bytes: bad,
                ..AmqpConfig::default()
            }
            .validate()
            .expect_err("out of bounds");
            assert!(err.to_string().contains("amqp.frame_max_bytes"), "{err}");
        }
    }

    #[test]
    fn env_overrides_defaults_with_double_underscore_sections() {
        let figment = figment_for::<Sample>(
            None,
            env(&[
                ("USHER_DATABASE__URL", "postgres://u:p@db:5432/x"),
                ("USHER_SERVER__CONCURRENCY_LIMIT", "7"),
                ("HOME", "/root"),
            ]),
        );
        let sample: Sample = figment.extract().expect("extracts");
        assert_eq!(sample.database.url.expose(), "postgres://u:p@db:5432/x");
        assert_eq!(sample.server.concurrency_limit, 7);
        assert_eq!(
            sample.database.max_connections,
            DatabaseConfig::default().max_connections
        );
    }

    #[test]
    fn file_then_env() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("usher.toml");
        std::fs::write(
            &path,
            "[server]\nconcurrency_limit = 5\nrequest_timeout_ms = 99\n",
        )
        .expect("write");
        let figment = figment_for::<Sample>(
            Some(&path),
            env(&[("USHER_SERVER__CONCURRENCY_LIMIT", "6")]),
        );
        let sample: Sample = figment.extract().expect("extracts");
        assert_eq!(sample.server.concurrency_limit, 6);
        assert_eq!(sample.server.request_timeout_ms, 99);
    }

    #[test]
    fn the_command_line_variables_are_not_configuration() {
        let figment = figment_for::<Sample>(
            None,
            env(&[
                ("USHER_CLI_TOKEN", "secret"),
                ("USHER_DEV_LISTEN", "127.0.0.1:0"),
                ("USHER_SERVER__CONCURRENCY_LIMIT", "8"),
            ]),
        );
        let sample: Sample = figment.extract().expect("the CLI's variables are skipped");
        assert_eq!(sample.server.concurrency_limit, 8);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let figment = figment_for::<Sample>(None, env(&[("USHER_SERVER__NO_SUCH_KEY", "1")]));
        let err = figment
            .extract::<Sample>()
            .expect_err("unknown key must fail");
        assert!(err.to_string().contains("no_such_key"), "{err}");
    }

    #[test]
    fn validation_names_the_field() {
        let sample = Sample {
            database: DatabaseConfig {
                url: Secret::new("mysql://x"),
                ..Default::default()
            },
            ..Default::default()
        };
        let err = sample.validate().expect_err("bad url");
        assert!(err.to_string().contains("database.url"), "{err}");
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let db = DatabaseConfig::local("x");
        let shown = format!("{db:?}");
        assert!(!shown.contains("postgres://"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }
}
