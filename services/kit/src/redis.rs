//! Redis: one multiplexed connection manager per service that reconnects by
//! itself, created lazily so a service starts (and reports `NOT_SERVING`)
//! while Redis is down, and a key builder that namespaces every key.

use std::time::Duration;

use redis::{
    Client, RedisError,
    aio::{ConnectionManager, ConnectionManagerConfig},
};

use crate::config::RedisConfig;

/// A Redis connection and the key namespace of this deployment.
#[derive(Clone)]
pub struct Redis {
    connection: ConnectionManager,
    prefix: String,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Redis {
    /// Prepares the connection; it is opened on first use and re-opened after
    /// failures, with every command bounded by `command_timeout_ms`. Must be
    /// called inside a tokio runtime.
    pub fn connect(config: &RedisConfig) -> Result<Self, RedisError> {
        let client = Client::open(config.url.expose())?;
        let timeout = Duration::from_millis(config.command_timeout_ms);
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        let connection = ConnectionManager::new_lazy_with_config(client, manager_config)?;
        Ok(Self {
            connection,
            prefix: config.key_prefix.clone(),
        })
    }

    /// A handle for commands (cheap to clone; all handles share one connection).
    pub fn connection(&self) -> ConnectionManager {
        self.connection.clone()
    }

    /// The key `<prefix><parts joined by ':'>`, e.g. `usher:inv:tok:<hash>`.
    pub fn key(&self, parts: &[&str]) -> String {
        let mut key = self.prefix.clone();
        key.push_str(&parts.join(":"));
        key
    }

    /// Whether Redis answers `PING`.
    pub async fn ping(&self) -> bool {
        let mut conn = self.connection();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[tokio::test]
    async fn keys_are_namespaced() {
        let redis = Redis::connect(&RedisConfig {
            key_prefix: "t1:".into(),
            ..Default::default()
        })
        .expect("lazy connect never fails on a valid url");
        assert_eq!(redis.key(&["inv", "tok", "abc"]), "t1:inv:tok:abc");
    }

    #[tokio::test]
    async fn ping_reports_reachability() {
        let up = Redis::connect(&RedisConfig::default()).expect("url");
        assert!(up.ping().await, "local redis should answer");
        let down = Redis::connect(&RedisConfig {
            url: Secret::new("redis://127.0.0.1:1"),
            command_timeout_ms: 200,
            ..Default::default()
        })
        .expect("url");
        assert!(!down.ping().await);
    }
}
