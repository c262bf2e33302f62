//! The lifetimes of sessions and their tokens (configuration section
//! `sessions`), checked at start-up, and the saturating time arithmetic every
//! expiry goes through.

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, Validate};

/// The configuration section of [`SessionConfig`].
pub const SECTION: &str = "sessions";
/// Longest allowed timeout, so every duration stays far from overflow.
const MAX_TIMEOUT_SECS: u64 = 366 * 24 * 3600;
/// Longest allowed reuse grace.
const MAX_REUSE_GRACE_SECS: u64 = 60;

/// Lifetimes of sessions and their tokens (section `sessions`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    /// Lifetime of an access token, in seconds.
    pub access_ttl_secs: u64,
    /// Lifetime of a refresh token, in seconds: a session not refreshed for
    /// this long ends (the idle timeout).
    pub idle_timeout_secs: u64,
    /// Lifetime of a session from sign-in, in seconds, however often it is
    /// refreshed (the absolute timeout).
    pub absolute_timeout_secs: u64,
    /// How long the refresh token just replaced by a rotation is refused
    /// without revoking the session (concurrent refreshes by one client), in
    /// seconds; 0 treats every reuse as theft.
    pub reuse_grace_secs: u64,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            access_ttl_secs: 900,
            idle_timeout_secs: 7 * 24 * 3600,
            absolute_timeout_secs: 30 * 24 * 3600,
            reuse_grace_secs: 10,
        }
    }
}

impl Validate for SessionConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        for (field, value) in [
            ("access_ttl_secs", self.access_ttl_secs),
            ("idle_timeout_secs", self.idle_timeout_secs),
            ("absolute_timeout_secs", self.absolute_timeout_secs),
        ] {
            if value == 0 || value > MAX_TIMEOUT_SECS {
                return Err(ConfigError::invalid(
                    format!("{SECTION}.{field}"),
                    format!("must be between 1 and {MAX_TIMEOUT_SECS}"),
                ));
            }
        }
        if self.access_ttl_secs > self.idle_timeout_secs {
            return Err(ConfigError::invalid(
                format!("{SECTION}.access_ttl_secs"),
                format!("must be at most {SECTION}.idle_timeout_secs"),
            ));
        }
        if self.idle_timeout_secs > self.absolute_timeout_secs {
            return Err(ConfigError::invalid(
                format!("{SECTION}.idle_timeout_secs"),
                format!("must be at most {SECTION}.absolute_timeout_secs"),
            ));
        }
        if self.reuse_grace_secs > MAX_REUSE_GRACE_SECS {
            return Err(ConfigError::invalid(
                format!("{SECTION}.reuse_grace_secs"),
                format!("must be at most {MAX_REUSE_GRACE_SECS}"),
            ));
        }
        Ok(())
    }
}

impl SessionConfig {
    pub(super) fn access_ttl(&self) -> TimeDelta {
        seconds(self.access_ttl_secs)
    }

    pub(super) fn idle_timeout(&self) -> TimeDelta {
        seconds(self.idle_timeout_secs)
    }

    pub(super) fn absolute_timeout(&self) -> TimeDelta {
        seconds(self.absolute_timeout_secs)
    }

    pub(super) fn reuse_grace(&self) -> TimeDelta {
        seconds(self.reuse_grace_secs)
    }
}

/// `at + delta`, saturating instead of panicking on an absurd (unvalidated) lifetime.
pub(super) fn after(at: DateTime<Utc>, delta: TimeDelta) -> DateTime<Utc> {
    at.checked_add_signed(delta)
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// `secs` seconds, saturating at [`TimeDelta::MAX`].
pub(super) fn seconds(secs: u64) -> TimeDelta {
    i64::try_from(secs)
        .ok()
        .and_then(TimeDelta::try_seconds)
        .unwrap_or(TimeDelta::MAX)
}
