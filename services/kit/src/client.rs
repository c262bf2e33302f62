//! Calls from one Usher service to another (today: invitation → identity's
//! internal DirectoryService).
//!
//! [`ServiceChannel`] wraps a tonic [`Channel`] and signs, for every call, a
//! principal assertion naming this service ([`Principal::service`]) and the
//! exact method path, so the callee's [`CallGuard`](crate::server::CallGuard)
//! lets it through `ACCESS_INTERNAL` rules and nothing else. The request id of
//! the current call, when given, travels along for log correlation.
//!
//! Deadlines: every call gets the configured timeout; a callee that is down
//! answers `UNAVAILABLE`, which callers surface as such (fail closed).

use std::{
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::{HeaderValue, Request, Response};
use serde::{Deserialize, Serialize};
use tonic::{
    body::Body,
    transport::{Channel, Endpoint},
};
use tower::Service;

use crate::{
    clock::SharedClock,
    config::ConfigError,
    principal::{ASSERTION_HEADER, AssertionSigner, Principal},
};

/// Where and how to reach another service.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The service's gRPC address, e.g. `http://usher-identity:50061`.
    pub url: String,
    /// Deadline of each call, in milliseconds.
    pub timeout_ms: u64,
    /// TCP connect timeout, in milliseconds.
    pub connect_timeout_ms: u64,
}

impl UpstreamConfig {
    /// The default for a service on this machine listening on `port`.
    pub fn local(port: u16) -> Self {
        Self {
            url: format!("http://127.0.0.1:{port}"),
            timeout_ms: 10_000,
            connect_timeout_ms: 2_000,
        }
    }

    /// Checks the address and the timeouts; `section` names the config
    /// section in errors.
    pub fn validate(&self, section: &str) -> Result<(), ConfigError> {
        self.endpoint(section)?;
        if self.timeout_ms == 0 || self.timeout_ms > 120_000 {
            return Err(ConfigError::invalid(
                format!("{section}.timeout_ms"),
                "must be between 1 and 120000",
            ));
        }
        if self.connect_timeout_ms == 0 || self.connect_timeout_ms > 60_000 {
            return Err(ConfigError::invalid(
                format!("{section}.connect_timeout_ms"),
                "must be between 1 and 60000",
            ));
        }
        Ok(())
    }

    fn endpoint(&self, section: &str) -> Result<Endpoint, ConfigError> {
        let url = self.url.trim();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(ConfigError::invalid(
                format!("{section}.url"),
                "must be an http:// or https:// address",
            ));
        }
        Endpoint::from_shared(url.to_owned())
            .map_err(|e| ConfigError::invalid(format!("{section}.url"), e.to_string()))
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self::local(50061)
    }
}

/// A lazily connected channel to another service that signs a service
/// assertion on every call. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ServiceChannel {
    channel: Channel,
    signer: Arc<AssertionSigner>,
    principal: Arc<Principal>,
    clock: SharedClock,
}

impl ServiceChannel {
    /// A channel to `config.url` (connected on first use, reconnected as
    /// needed) whose calls assert the service `signer` issues as.
    pub fn connect_lazy(
        config: &UpstreamConfig,
        section: &str,
        signer: AssertionSigner,
        clock: SharedClock,
    ) -> Result<Self, ConfigError> {
        let channel = config
            .endpoint(section)?
            .timeout(Duration::from_millis(config.timeout_ms))
            .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true)
            .connect_lazy();
        let principal = Principal::service(signer.issuer());
        Ok(Self {
            channel,
            signer: Arc::new(signer),
            principal: Arc::new(principal),
            clock,
        })
    }
}

impl Service<Request<Body>> for ServiceChannel {
    type Response = Response<Body>;
    type Error = tonic::transport::Error;
    type Future = <Channel as Service<Request<Body>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::<Request<Body>>::poll_ready(&mut self.channel, cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let request_id = request
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let assertion = self.signer.sign(
            &self.principal,
            request.uri().path(),
            request_id.as_deref(),
            self.clock.now(),
        );
        // The assertion is base64url and '.', always a valid header value.
        if let Ok(value) = HeaderValue::from_str(&assertion) {
            request.headers_mut().insert(ASSERTION_HEADER, value);
        }
        crate::telemetry::inject_into(request.headers_mut());
        self.channel.call(request)
    }
}

/// Puts `request_id` on an outgoing request, for log correlation across
/// services. Ids that are not valid header values are left out.
pub fn with_request_id<T>(message: T, request_id: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(value) = request_id.parse() {
        request.metadata_mut().insert("x-request-id", value);
    }
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_config_names_the_field_at_fault() {
        let mut config = UpstreamConfig::local(1);
        assert!(config.validate("identity").is_ok());
        config.url = "127.0.0.1:50061".into();
        let err = config.validate("identity").unwrap_err().to_string();
        assert!(err.contains("identity.url"), "{err}");
        let mut config = UpstreamConfig::local(1);
        config.timeout_ms = 0;
        let err = config.validate("identity").unwrap_err().to_string();
        assert!(err.contains("identity.timeout_ms"), "{err}");
    }

    #[test]
    fn request_ids_travel_when_valid() {
        let request = with_request_id((), "abc-123");
        assert_eq!(
            request
                .metadata()
                .get("x-request-id")
                .map(|v| v.to_str().ok()),
            Some(Some("abc-123"))
        );
        let request = with_request_id((), "bad\nid");
        assert!(request.metadata().get("x-request-id").is_none());
    }
}
