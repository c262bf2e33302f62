//! Configuration of usher-gateway. Every key can be set in the TOML file or
//! as `USHER_<SECTION>__<KEY>`; with nothing set it fronts the services on
//! their default local ports.

use serde::{Deserialize, Serialize};
use usher_kit::{
    cli::ServiceConfig,
    config::{ConfigError, Environment, RedisConfig, ServerConfig, TelemetryConfig, Validate},
    principal::AssertionConfig,
    sessions::SessionConfig,
    tokens::TokenConfig,
};

/// Where the services behind the gateway listen.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamsConfig {
    /// usher-identity's gRPC URL.
    pub identity: String,
    /// usher-invitation's gRPC URL.
    pub invitation: String,
    /// usher-notification's gRPC URL.
    pub notification: String,
}

impl Default for UpstreamsConfig {
    fn default() -> Self {
        Self {
            identity: "http://127.0.0.1:50061".into(),
            invitation: "http://127.0.0.1:50062".into(),
            notification: "http://127.0.0.1:50063".into(),
        }
    }
}

impl Validate for UpstreamsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        for (field, url) in [
            ("upstreams.identity", &self.identity),
            ("upstreams.invitation", &self.invitation),
            ("upstreams.notification", &self.notification),
        ] {
            let parsed = url::Url::parse(url)
                .map_err(|e| ConfigError::invalid(field, format!("not a URL: {e}")))?;
            if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
                return Err(ConfigError::invalid(
                    field,
                    "must be an http:// or https:// URL",
                ));
            }
        }
        Ok(())
    }
}

/// usher-gateway's configuration.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `development` (default) or `production`.
    pub environment: Environment,
    /// Public gRPC server and limits; port 8080, metrics 9100.
    pub server: ServerConfig,
    /// Sessions and rate limits shared by every gateway replica.
    pub redis: RedisConfig,
    /// The services behind the gateway.
    pub upstreams: UpstreamsConfig,
    /// Logs.
    pub telemetry: TelemetryConfig,
    /// The key the gateway signs principal assertions with.
    pub assertion: AssertionConfig,
    /// Session lifetimes; the same section as identity's, which issues the
    /// sessions the gateway resolves.
    pub sessions: SessionConfig,
    /// The key that hashes tokens: it must be identity's, or no access token
    /// resolves.
    pub tokens: TokenConfig,
    /// Rate limits, counted in Redis and shared by every replica (P8).
    pub rate_limits: RateLimitsConfig,
    /// Browsers calling with gRPC-Web from other origins.
    pub grpc_web: GrpcWebConfig,
}

/// gRPC-Web (section `grpc_web`). The translation is always on; these are the
/// origins allowed to call cross-origin (CORS).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcWebConfig {
    /// Exact origins (`https://app.example.com`) whose pages may call the
    /// gateway with gRPC-Web; empty allows none (same-origin only).
    pub allowed_origins: Vec<String>,
}

impl Validate for GrpcWebConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        for (i, origin) in self.allowed_origins.iter().enumerate() {
            let field = format!("grpc_web.allowed_origins[{i}]");
            let parsed = url::Url::parse(origin)
                .map_err(|e| ConfigError::invalid(&field, format!("not a URL: {e}")))?;
            let bare = parsed.path() == "/" && !origin.ends_with('/');
            if !matches!(parsed.scheme(), "http" | "https")
                || parsed.host().is_none()
                || !bare
                || parsed.query().is_some()
                || http::HeaderValue::from_str(origin).is_err()
            {
                return Err(ConfigError::invalid(
                    field,
                    "must be an origin: scheme://host[:port], no path",
                ));
            }
        }
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            environment: Environment::default(),
            server: ServerConfig::with_ports(8080, 9100),
            redis: RedisConfig::default(),
            upstreams: UpstreamsConfig::default(),
            telemetry: TelemetryConfig::default(),
            assertion: AssertionConfig::default(),
            sessions: SessionConfig::default(),
            tokens: TokenConfig::default(),
            rate_limits: RateLimitsConfig::default(),
            grpc_web: GrpcWebConfig::default(),
        }
    }
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        self.server.validate()?;
        self.telemetry.validate()?;
        self.redis.validate()?;
        self.upstreams.validate()?;
        self.sessions.validate()?;
        self.tokens.validate_for(self.environment)?;
        self.assertion.validate_for(self.environment)?;
        self.rate_limits.validate()?;
        self.grpc_web.validate()
    }
}

impl ServiceConfig for Config {
    fn telemetry(&self) -> &TelemetryConfig {
        &self.telemetry
    }
}

/// One rate limit: at most `limit` calls per subject in each window of
/// `window_secs` seconds (a fixed window, counted in Redis).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Calls allowed per window.
    pub limit: u64,
    /// The window's length, in seconds.
    pub window_secs: u64,
}

/// Rate limits (P8), counted in Redis so every gateway replica shares them.
/// Over a limit the gateway answers `RESOURCE_EXHAUSTED` (reason
/// `RATE_LIMITED`, with the delay until the window ends) without calling a
/// service. Both classes fail open when Redis cannot be reached (logged and
/// counted in `usher_gateway_rate_limit_errors_total`): authentication already
/// fails closed, and refusing every sign-in during a Redis blip would lock
/// everyone out.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitsConfig {
    /// Whether rate limits apply at all (default true).
    pub enabled: bool,
    /// Take the client IP from the last `x-forwarded-for` hop instead of the
    /// TCP peer. Only behind a trusted proxy that sets that header: otherwise
    /// any client picks its own IP (default false).
    pub trust_forwarded_for: bool,
    /// Per client IP on the public RPCs (sign-in, refresh, password reset
    /// request and reset, invitation preview, accept and decline); default
    /// 30 calls a minute.
    pub public: RateLimit,
    /// Per account on invitation creates and resends; default 60 calls an
    /// hour.
    pub invitations: RateLimit,
}

impl Default for RateLimitsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            trust_forwarded_for: false,
            public: RateLimit {
                limit: 30,
                window_secs: 60,
            },
            invitations: RateLimit {
                limit: 60,
                window_secs: 3600,
            },
        }
    }
}

/// The longest window accepted: one day.
const MAX_WINDOW_SECS: u64 = 86_400;

impl Validate for RateLimitsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        for (name, limit) in [("public", &self.public), ("invitations", &self.invitations)] {
            if limit.limit == 0 {
                return Err(ConfigError::invalid(
                    format!("rate_limits.{name}.limit"),
                    "must be at least 1 (set rate_limits.enabled = false to turn limits off)",
                ));
            }
            if limit.window_secs == 0 || limit.window_secs > MAX_WINDOW_SECS {
                return Err(ConfigError::invalid(
                    format!("rate_limits.{name}.window_secs"),
                    format!("must be between 1 and {MAX_WINDOW_SECS}"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_web_origins_must_be_bare_origins() {
        let valid = |origins: &[&str]| {
            GrpcWebConfig {
                allowed_origins: origins.iter().map(|o| (*o).to_owned()).collect(),
            }
            .validate()
            .is_ok()
        };
        assert!(valid(&[]));
        assert!(valid(&["https://app.example.com", "http://localhost:3000"]));
        for bad in [
            "app.example.com",
            "https://app.example.com/",
            "https://app.example.com/path",
            "https://app.example.com?x=1",
            "ftp://app.example.com",
            "*",
        ] {
            assert!(!valid(&[bad]), "{bad}");
        }
    }
}
