//! Redis: one multiplexed connection manager per service that reconnects by
//! itself, created lazily so a service starts (and reports `NOT_SERVING`)
//! while Redis is down, and a key builder that namespaces every key.

use std::time::Duration;

use redis::{
    Arg, Client, Cmd, IntoConnectionInfo, Pipeline, RedisError, RedisFuture, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    io::tcp::TcpSettings,
};
use tracing::Instrument as _;

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
    /// Prepares the connection; it is opened on first use (within
    /// `connect_timeout_ms`) and re-opened after failures, with every command
    /// bounded by `command_timeout_ms`. Must be called inside a tokio runtime.
    pub fn connect(config: &RedisConfig) -> Result<Self, RedisError> {
        // One multiplexed connection carries every caller's commands: with
        // Nagle's algorithm on, a command written while another is
        // unacknowledged waits for the server's delayed ACK (40 ms on Linux).
        let info = config
            .url
            .expose()
            .into_connection_info()?
            .set_tcp_settings(TcpSettings::default().set_nodelay(true));
        let client = Client::open(info)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(config.connect_timeout_ms)))
            .set_response_timeout(Some(Duration::from_millis(config.command_timeout_ms)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        let connection = ConnectionManager::new_lazy_with_config(client, manager_config)?;
        Ok(Self {
            connection,
            prefix: config.key_prefix.clone(),
        })
    }

    /// A handle for commands (cheap to clone; all handles share one
    /// connection). With traces exported, each command or pipeline sent on
    /// it is a `redis` span of the current trace.
    pub fn connection(&self) -> Connection {
        Connection {
            inner: self.connection.clone(),
        }
    }

    /// The key `<prefix><parts joined by ':'>`, e.g. `usher:inv:tok:<hash>`.
    pub fn key(&self, parts: &[&str]) -> String {
        let mut key = self.prefix.clone();
        key.push_str(&parts.join(":"));
        key
    }

    /// Every key matching `pattern` (e.g. `<prefix>inv:*`), found with `SCAN`
    /// in bounded steps. Tests and tools use it instead of `KEYS`, which
    /// walks the whole keyspace in one command and stalls every other
    /// client of a shared server (on a busy host, past their command
    /// deadline).
    pub async fn scan_keys(&self, pattern: &str) -> Result<Vec<String>, RedisError> {
        let mut conn = self.connection();
        let mut cursor: u64 = 0;
        let mut keys = Vec::new();
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1_000)
                .query_async(&mut conn)
                .await?;
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        keys.sort();
        keys.dedup();
        Ok(keys)
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

/// A command handle of [`Redis`]: the shared connection, with a span per
/// command or pipeline when traces are exported.
#[derive(Clone)]
pub struct Connection {
    inner: ConnectionManager,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").finish_non_exhaustive()
    }
}

impl Connection {
    /// The span of `commands` commands starting with `command`, or none
    /// when traces are off (no cost then).
    fn span(command: Option<&Cmd>, commands: usize) -> Option<tracing::Span> {
        if !crate::telemetry::traces_exported() {
            return None;
        }
        let name = command
            .and_then(|cmd| cmd.args_iter().next())
            .map(|arg| match arg {
                Arg::Simple(bytes) => String::from_utf8_lossy(bytes).to_ascii_uppercase(),
                _ => String::new(),
            })
            .unwrap_or_default();
        Some(tracing::info_span!("redis", command = %name, commands))
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match Self::span(Some(cmd), 1) {
            Some(span) => Box::pin(self.inner.req_packed_command(cmd).instrument(span)),
            None => self.inner.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match Self::span(pipeline.cmd_iter().next(), pipeline.len()) {
            Some(span) => Box::pin(
                self.inner
                    .req_packed_commands(pipeline, offset, count)
                    .instrument(span),
            ),
            None => self.inner.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
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
            connect_timeout_ms: 200,
            command_timeout_ms: 200,
            ..Default::default()
        })
        .expect("url");
        assert!(!down.ping().await);
    }

    #[tokio::test]
    async fn scan_finds_every_key_of_a_prefix_and_no_other() {
        let prefix = format!("t:{}:", uuid::Uuid::new_v4().simple());
        let redis = Redis::connect(&RedisConfig {
            key_prefix: prefix.clone(),
            ..Default::default()
        })
        .expect("url");
        let mut conn = redis.connection();
        let mut written: Vec<String> = (0..2_500)
            .map(|i| redis.key(&["k", &i.to_string()]))
            .collect();
        let mut pipe = redis::pipe();
        for key in &written {
            pipe.cmd("SET")
                .arg(key)
                .arg(1)
                .arg("PX")
                .arg(60_000)
                .ignore();
        }
        let other = format!("t:{}:k:0", uuid::Uuid::new_v4().simple());
        pipe.cmd("SET")
            .arg(&other)
            .arg(1)
            .arg("PX")
            .arg(60_000)
            .ignore();
        let () = pipe.query_async(&mut conn).await.expect("set");
        let found = redis.scan_keys(&redis.key(&["*"])).await.expect("scan");
        written.sort();
        assert_eq!(found, written, "every key of the prefix, once, no other");
        let _: () = redis::cmd("DEL")
            .arg(&written)
            .arg(&other)
            .query_async(&mut conn)
            .await
            .expect("del");
    }
}
