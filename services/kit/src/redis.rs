//! Redis: one multiplexed connection per service that reconnects by
//! itself, created lazily so a service starts (and reports `NOT_SERVING`)
//! while Redis is down, and a key builder that namespaces every key.
//!
//! The URL's scheme chooses the topology ([`Topology`]):
//! - `redis://` / `rediss://`: one server (TLS with `rediss`);
//! - `redis+sentinel://` / `rediss+sentinel://`: the master of a Sentinel
//!   group, asked of the sentinels at first use and again whenever the
//!   server in use stops being a writable master (a failover);
//! - `redis+cluster://` / `rediss+cluster://`: a Redis Cluster, every command
//!   routed to the master of its key's slot. A pipeline whose keys fall in
//!   several slots is sent as one pipeline per slot, at once; a transaction
//!   (`MULTI`/`EXEC`) or a script must keep its keys in one slot.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use redis::{
    Arg, Client, Cmd, IntoConnectionInfo, Pipeline, RedisError, RedisFuture, RedisResult, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::{ClusterClient, ClusterClientBuilder},
    cluster_async::ClusterConnection,
    cluster_routing::{RoutingInfo, Slot},
    io::tcp::TcpSettings,
    sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType},
};
use tokio::sync::{Mutex, OnceCell};
use tracing::Instrument as _;

use crate::config::RedisConfig;

/// Where a Redis URL points: one server, a Sentinel group's master, or a
/// Cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Topology {
    /// One server: the URL as given.
    Standalone,
    /// A Sentinel group: the sentinels' URLs and the group's master name.
    Sentinel {
        /// `redis://host:port` (or `rediss://`) of each sentinel.
        sentinels: Vec<String>,
        /// The name the sentinels monitor the master under.
        master: String,
    },
    /// A Cluster: the URLs of the nodes to learn the cluster's layout from.
    Cluster {
        /// `redis://[user:password@]host:port` (or `rediss://`) of each seed.
        nodes: Vec<String>,
    },
}

/// The parts of a `redis+sentinel://` or `redis+cluster://` URL.
struct Parsed {
    /// `redis` or `rediss`.
    scheme: &'static str,
    /// `user:password` as written (percent-encoded), if any.
    userinfo: Option<String>,
    /// `host:port` of each node, the default port added where missing.
    hosts: Vec<String>,
    /// The path without its leading `/`.
    path: String,
}

fn parse_multi_host(rest: &str, scheme: &'static str, default_port: u16) -> Result<Parsed, String> {
    if rest.contains(['?', '#']) {
        return Err("takes no query or fragment".into());
    }
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (Some(userinfo.to_owned()), hosts),
        None => (None, authority),
    };
    let hosts = hosts
        .split(',')
        .map(|host| {
            let host = host.trim();
            if host.is_empty() {
                return Err("names an empty host".to_owned());
            }
            // `[::1]:6379`, `host:6379`, `host`.
            let has_port = match host.rfind(']') {
                Some(bracket) => host[bracket..].contains(':'),
                None => host.contains(':'),
            };
            if has_port {
                let port = host.rsplit_once(':').map(|(_, port)| port).unwrap_or("");
                port.parse::<u16>()
                    .map_err(|_| format!("has an invalid port in {host:?}"))?;
                Ok(host.to_owned())
            } else {
                Ok(format!("{host}:{default_port}"))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Parsed {
        scheme,
        userinfo,
        hosts,
        path: path.trim_end_matches('/').to_owned(),
    })
}

impl Topology {
    /// The topology `url` names, or why it names none.
    pub fn of(url: &str) -> Result<Self, String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| "must be a redis:// URL".to_owned())?;
        match scheme {
            "redis" | "rediss" => Ok(Self::Standalone),
            "redis+sentinel" | "rediss+sentinel" => {
                let tls = if scheme.starts_with("rediss") {
                    "rediss"
                } else {
                    "redis"
                };
                let parsed = parse_multi_host(rest, tls, 26_379)?;
                let mut path = parsed.path.splitn(2, '/');
                let master = path.next().unwrap_or_default();
                if master.is_empty() {
                    return Err("must name the master after the hosts: …/<master name>".into());
                }
                if let Some(db) = path.next()
                    && db.parse::<u32>().is_err()
                {
                    return Err(format!("has an invalid database number {db:?}"));
                }
                Ok(Self::Sentinel {
                    sentinels: parsed
                        .hosts
                        .iter()
                        .map(|host| format!("{}://{host}", parsed.scheme))
                        .collect(),
                    master: master.to_owned(),
                })
            }
            "redis+cluster" | "rediss+cluster" => {
                let tls = if scheme.starts_with("rediss") {
                    "rediss"
                } else {
                    "redis"
                };
                let parsed = parse_multi_host(rest, tls, 6_379)?;
                if !parsed.path.is_empty() {
                    return Err("takes no path: a cluster has one database".into());
                }
                let userinfo = parsed
                    .userinfo
                    .as_ref()
                    .map(|userinfo| format!("{userinfo}@"))
                    .unwrap_or_default();
                Ok(Self::Cluster {
                    nodes: parsed
                        .hosts
                        .iter()
                        .map(|host| format!("{}://{userinfo}{host}", parsed.scheme))
                        .collect(),
                })
            }
            _ => Err(
                "must be a redis://, rediss://, redis+sentinel://, rediss+sentinel://, \
                 redis+cluster:// or rediss+cluster:// URL"
                    .into(),
            ),
        }
    }
}

/// The settings of the data nodes of a Sentinel URL: credentials, database
/// and TLS, as a `redis://` URL of the first sentinel would carry them.
fn sentinel_node_info(url: &str, tcp: TcpSettings) -> RedisResult<SentinelNodeConnectionInfo> {
    let (scheme, rest) = url.split_once("://").unwrap_or(("redis", url));
    let tls = scheme.starts_with("rediss");
    let parsed =
        parse_multi_host(rest, if tls { "rediss" } else { "redis" }, 26_379).map_err(|why| {
            RedisError::from((redis::ErrorKind::InvalidClientConfig, "redis.url", why))
        })?;
    let db = parsed.path.split_once('/').map(|(_, db)| db).unwrap_or("0");
    let userinfo = parsed
        .userinfo
        .map(|userinfo| format!("{userinfo}@"))
        .unwrap_or_default();
    let host = parsed.hosts.first().cloned().unwrap_or_default();
    let info = format!("redis://{userinfo}{host}/{db}").into_connection_info()?;
    let mut node = SentinelNodeConnectionInfo::default()
        .set_redis_connection_info(info.redis_settings().clone())
        .set_tcp_settings(tcp);
    if tls {
        node = node.set_tls_mode(redis::TlsMode::Secure);
    }
    Ok(node)
}

/// A Redis connection and the key namespace of this deployment.
#[derive(Clone)]
pub struct Redis {
    backend: Backend,
    prefix: String,
    /// `WAIT`'s replicas and timeout for [`Redis::replicate`]; none when 0.
    wait: Option<(u32, u64)>,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
enum Backend {
    Standalone(ConnectionManager),
    Sentinel(Arc<SentinelBackend>),
    Cluster(Arc<ClusterBackend>),
}

impl Redis {
    /// Prepares the connection; it is opened on first use (within
    /// `connect_timeout_ms`) and re-opened after failures, with every command
    /// bounded by `command_timeout_ms`. Must be called inside a tokio runtime.
    pub fn connect(config: &RedisConfig) -> Result<Self, RedisError> {
        // One multiplexed connection carries every caller's commands: with
        // Nagle's algorithm on, a command written while another is
        // unacknowledged waits for the server's delayed ACK (40 ms on Linux).
        let tcp = TcpSettings::default().set_nodelay(true);
        let connect_timeout = Duration::from_millis(config.connect_timeout_ms);
        let command_timeout = Duration::from_millis(config.command_timeout_ms);
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(command_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        let url = config.url.expose();
        let topology = Topology::of(url).map_err(|why| {
            RedisError::from((redis::ErrorKind::InvalidClientConfig, "redis.url", why))
        })?;
        let backend = match topology {
            Topology::Standalone => {
                let info = url.into_connection_info()?.set_tcp_settings(tcp);
                let client = Client::open(info)?;
                Backend::Standalone(ConnectionManager::new_lazy_with_config(
                    client,
                    manager_config,
                )?)
            }
            Topology::Sentinel { sentinels, master } => {
                let sentinels = sentinels
                    .iter()
                    .map(|sentinel| {
                        let info = sentinel.as_str().into_connection_info()?;
                        let mut settings = info.redis_settings().clone();
                        if !config.sentinel_password.is_empty() {
                            settings = settings.set_password(config.sentinel_password.expose());
                        }
                        Ok(info
                            .set_redis_settings(settings)
                            .set_tcp_settings(tcp.clone()))
                    })
                    .collect::<RedisResult<Vec<_>>>()?;
                let client = SentinelClient::build(
                    sentinels,
                    master,
                    Some(sentinel_node_info(url, tcp)?),
                    SentinelServerType::Master,
                )?;
                Backend::Sentinel(Arc::new(SentinelBackend {
                    resolver: Mutex::new(client),
                    current: RwLock::new(None),
                    manager_config,
                    resolve_timeout: connect_timeout * 3,
                }))
            }
            Topology::Cluster { nodes } => {
                let seed = nodes
                    .first()
                    .map(String::as_str)
                    .unwrap_or_default()
                    .into_connection_info()?;
                let client = ClusterClientBuilder::new(nodes)
                    .connection_timeout(connect_timeout)
                    .response_timeout(command_timeout)
                    .tcp_settings(tcp)
                    .retries(3)
                    .build()?;
                Backend::Cluster(Arc::new(ClusterBackend {
                    client,
                    seed,
                    connection: OnceCell::new(),
                    connect_timeout,
                }))
            }
        };
        Ok(Self {
            backend,
            prefix: config.key_prefix.clone(),
            wait: (config.wait_replicas > 0)
                .then_some((config.wait_replicas, config.wait_timeout_ms)),
        })
    }

    /// A handle for commands (cheap to clone; all handles share one
    /// connection). With traces exported, each command or pipeline sent on
    /// it is a `redis` span of the current trace.
    pub fn connection(&self) -> Connection {
        Connection {
            backend: self.backend.clone(),
        }
    }

    /// The key `<prefix><parts joined by ':'>`, e.g. `usher:inv:tok:<hash>`.
    pub fn key(&self, parts: &[&str]) -> String {
        let mut key = self.prefix.clone();
        key.push_str(&parts.join(":"));
        key
    }

    /// Every key matching `pattern` (e.g. `<prefix>inv:*`), found with `SCAN`
    /// in bounded steps (on every master of a Cluster). Tests and tools use
    /// it instead of `KEYS`, which walks the whole keyspace in one command
    /// and stalls every other client of a shared server (on a busy host,
    /// past their command deadline).
    pub async fn scan_keys(&self, pattern: &str) -> Result<Vec<String>, RedisError> {
        let mut keys = Vec::new();
        match &self.backend {
            Backend::Cluster(cluster) => {
                let mut conn = cluster.connection().await?;
                for (host, port) in cluster_masters(&mut conn).await? {
                    // A connection of its own to each master, with the
                    // seeds' credentials and TLS.
                    let info = cluster.seed.clone().set_addr(match cluster.seed.addr() {
                        redis::ConnectionAddr::TcpTls {
                            insecure,
                            tls_params,
                            ..
                        } => redis::ConnectionAddr::TcpTls {
                            host,
                            port,
                            insecure: *insecure,
                            tls_params: tls_params.clone(),
                        },
                        _ => redis::ConnectionAddr::Tcp(host, port),
                    });
                    let node = Client::open(info)?
                        .get_multiplexed_async_connection()
                        .await?;
                    scan_with(pattern, &mut keys, |cmd| {
                        let mut node = node.clone();
                        async move { node.req_packed_command(&cmd).await }
                    })
                    .await?;
                }
            }
            _ => {
                let conn = self.connection();
                scan_with(pattern, &mut keys, |cmd| {
                    let mut conn = conn.clone();
                    async move { conn.req_packed_command(&cmd).await }
                })
                .await?;
            }
        }
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    /// Makes the writes sent so far durable as `redis.wait_replicas` asks:
    /// waits (`WAIT`) until that many replicas hold them, or fails with an
    /// I/O error (`UNAVAILABLE` to callers) when fewer did within
    /// `redis.wait_timeout_ms`. Nothing to do when `wait_replicas` is 0.
    /// On a Cluster every master is asked (the writes may span them).
    pub async fn replicate(&self) -> RedisResult<()> {
        let Some((replicas, timeout_ms)) = self.wait else {
            return Ok(());
        };
        let mut wait = redis::cmd("WAIT");
        wait.arg(replicas).arg(timeout_ms);
        let acknowledged: i64 = match &self.backend {
            Backend::Cluster(cluster) => redis::from_redis_value(
                cluster
                    .connection()
                    .await?
                    .route_command(
                        wait,
                        RoutingInfo::MultiNode((
                            redis::cluster_routing::MultipleNodeRoutingInfo::AllMasters,
                            Some(redis::cluster_routing::ResponsePolicy::Aggregate(
                                redis::cluster_routing::AggregateOp::Min,
                            )),
                        )),
                    )
                    .await
                    // A node that stopped being a master mid-failover
                    // refuses WAIT: the write's fate is not known yet.
                    .map_err(|err| {
                        RedisError::from(std::io::Error::other(format!(
                            "replicas could not be counted: {err}"
                        )))
                    })?,
            )?,
            _ => wait.query_async(&mut self.connection()).await?,
        };
        if acknowledged < i64::from(replicas) {
            metrics::counter!("usher_redis_unreplicated_writes_total").increment(1);
            return Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "{acknowledged} of {replicas} replicas acknowledged the write within {timeout_ms} ms"
                ),
            )));
        }
        Ok(())
    }

    /// Whether Redis answers `PING` (every master of a Cluster).
    pub async fn ping(&self) -> bool {
        if let Backend::Cluster(cluster) = &self.backend {
            let Ok(mut conn) = cluster.connection().await else {
                return false;
            };
            return conn
                .route_command(
                    redis::cmd("PING"),
                    RoutingInfo::MultiNode((
                        redis::cluster_routing::MultipleNodeRoutingInfo::AllMasters,
                        Some(redis::cluster_routing::ResponsePolicy::AllSucceeded),
                    )),
                )
                .await
                .is_ok();
        }
        let mut conn = self.connection();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .is_ok()
    }
}

/// Runs `SCAN … MATCH pattern` to its end through `send`, adding every key
/// found to `keys`.
async fn scan_with<F, Fut>(pattern: &str, keys: &mut Vec<String>, send: F) -> RedisResult<()>
where
    F: Fn(Cmd) -> Fut,
    Fut: Future<Output = RedisResult<Value>>,
{
    let mut cursor: u64 = 0;
    loop {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1_000);
        let (next, batch): (u64, Vec<String>) = redis::from_redis_value(send(cmd).await?)?;
        keys.extend(batch);
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// `host` and `port` of every master of the cluster, from `CLUSTER NODES`.
async fn cluster_masters(conn: &mut ClusterConnection) -> RedisResult<Vec<(String, u16)>> {
    let nodes: String = redis::cmd("CLUSTER").arg("NODES").query_async(conn).await?;
    Ok(nodes
        .lines()
        .filter_map(|line| {
            // <id> <ip:port@cport[,hostname]> <flags> <master> …
            let mut fields = line.split(' ');
            let address = fields.nth(1)?;
            let flags = fields.next()?;
            let flags: Vec<&str> = flags.split(',').collect();
            if !flags.contains(&"master") || flags.contains(&"fail") {
                return None;
            }
            let address = address.split(['@', ',']).next()?;
            let (host, port) = address.rsplit_once(':')?;
            Some((host.to_owned(), port.parse().ok()?))
        })
        .collect())
}

/// The master of a Sentinel group, found through the sentinels.
struct SentinelBackend {
    /// Asks the sentinels; locked while asking, so callers that see the
    /// master fail at once ask once.
    resolver: Mutex<SentinelClient>,
    current: RwLock<Option<Arc<SentinelMaster>>>,
    manager_config: ConnectionManagerConfig,
    /// Bound on one round of asking the sentinels and checking the master.
    resolve_timeout: Duration,
}

/// The master in use.
struct SentinelMaster {
    /// Increases with every round of asking.
    generation: u64,
    asked_at: Instant,
    address: String,
    manager: ConnectionManager,
}

/// How soon the sentinels are asked again when the master they named
/// still fails: often enough to follow a failover within a second, rarely
/// enough that a Redis outage is not also a storm of sentinel queries.
const REASK_AFTER: Duration = Duration::from_millis(250);

impl SentinelBackend {
    fn current(&self) -> Option<Arc<SentinelMaster>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The master to send to: the one in use, or the sentinels' answer.
    async fn master(&self) -> RedisResult<Arc<SentinelMaster>> {
        match self.current() {
            Some(master) => Ok(master),
            None => self.ask(0).await,
        }
    }

    /// Asks the sentinels for the master, unless another caller did since
    /// `seen` (a generation) or did so very recently.
    async fn ask(&self, seen: u64) -> RedisResult<Arc<SentinelMaster>> {
        let mut resolver = self.resolver.lock().await;
        let previous = self.current();
        if let Some(previous) = &previous
            && (previous.generation > seen || previous.asked_at.elapsed() < REASK_AFTER)
        {
            return Ok(previous.clone());
        }
        let client = tokio::time::timeout(self.resolve_timeout, resolver.async_get_client())
            .await
            .map_err(|_| {
                RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no sentinel named a reachable master in time",
                ))
            })??;
        let address = client.get_connection_info().addr().to_string();
        let manager = match &previous {
            // The same server: keep its connection.
            Some(previous) if previous.address == address => previous.manager.clone(),
            _ => {
                if let Some(previous) = &previous {
                    tracing::warn!(
                        from = %previous.address,
                        to = %address,
                        "the sentinels name a new redis master; switching to it"
                    );
                }
                ConnectionManager::new_lazy_with_config(client, self.manager_config.clone())?
            }
        };
        let master = Arc::new(SentinelMaster {
            generation: previous.as_ref().map_or(0, |p| p.generation) + 1,
            asked_at: Instant::now(),
            address,
            manager,
        });
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(master.clone());
        Ok(master)
    }

    /// Sends through `send` to the master; when the server answers that it
    /// is no longer a writable master, or cannot be reached, asks the
    /// sentinels again and, if the request provably did not run, sends it
    /// once more to the master they name.
    async fn run<T, F, Fut>(&self, send: F) -> RedisResult<T>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let master = self.master().await?;
        let err = match send(master.manager.clone()).await {
            Ok(value) => return Ok(value),
            Err(err) => err,
        };
        if !master_may_have_moved(&err) {
            return Err(err);
        }
        let next = self.ask(master.generation).await?;
        if next.address != master.address && not_run(&err) {
            send(next.manager.clone()).await
        } else {
            Err(err)
        }
    }
}

/// An error a failover causes: the server was demoted, is going down, or
/// cannot be reached.
fn master_may_have_moved(err: &RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    matches!(
        err.kind(),
        ErrorKind::Server(ServerErrorKind::ReadOnly)
            | ErrorKind::Server(ServerErrorKind::MasterDown)
            | ErrorKind::Io
    )
}

/// An error that proves the request did not run: a replica refuses every
/// write (`READONLY`), and a refused connection carried nothing.
fn not_run(err: &RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    err.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly) || err.is_connection_refusal()
}

/// A Redis Cluster, connected at first use.
struct ClusterBackend {
    client: ClusterClient,
    /// The first seed's settings: credentials and TLS for a direct
    /// connection to one node.
    seed: redis::ConnectionInfo,
    connection: OnceCell<ClusterConnection>,
    connect_timeout: Duration,
}

impl ClusterBackend {
    async fn connection(&self) -> RedisResult<ClusterConnection> {
        self.connection
            .get_or_try_init(|| async {
                tokio::time::timeout(self.connect_timeout, self.client.get_async_connection())
                    .await
                    .map_err(|_| {
                        RedisError::from(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "no cluster node answered in time",
                        ))
                    })?
            })
            .await
            .cloned()
    }

    /// Sends a pipeline: a transaction as it is (its keys must share a
    /// slot), any other pipeline as one pipeline per slot, at once, its
    /// replies put back in the pipeline's order.
    async fn pipeline(
        &self,
        pipeline: &Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        let mut conn = self.connection().await?;
        if pipeline.is_transaction() {
            return conn.req_packed_commands(pipeline, offset, count).await;
        }
        let mut groups: HashMap<Option<Slot>, (Vec<usize>, Pipeline)> = HashMap::new();
        for (index, cmd) in pipeline.cmd_iter().enumerate() {
            let slot = first_key(cmd).map(Slot::for_key);
            let (indices, group) = groups
                .entry(slot)
                .or_insert_with(|| (Vec::new(), Pipeline::new()));
            indices.push(index);
            group.add_command(cmd.clone());
        }
        if groups.len() == 1 {
            return conn.req_packed_commands(pipeline, offset, count).await;
        }
        let replies =
            futures::future::try_join_all(groups.into_values().map(|(indices, group)| {
                let mut conn = conn.clone();
                async move {
                    let values = conn.req_packed_commands(&group, 0, group.len()).await?;
                    Ok::<_, RedisError>(indices.into_iter().zip(values))
                }
            }))
            .await?;
        let mut values = vec![Value::Nil; pipeline.len()];
        for (index, value) in replies.into_iter().flatten() {
            values[index] = value;
        }
        Ok(values.into_iter().skip(offset).take(count).collect())
    }
}

/// The first key of `cmd`, for the commands Usher pipelines: the argument
/// after the name, or the first key of a script.
fn first_key(cmd: &Cmd) -> Option<&[u8]> {
    let mut args = cmd.args_iter().map(|arg| match arg {
        Arg::Simple(bytes) => Some(bytes),
        _ => None,
    });
    let name = args.next()??.to_ascii_uppercase();
    match name.as_slice() {
        b"EVAL" | b"EVALSHA" | b"FCALL" => {
            let _script = args.next()?;
            let keys = std::str::from_utf8(args.next()??)
                .ok()?
                .parse::<usize>()
                .ok()?;
            if keys == 0 { None } else { args.next()? }
        }
        b"PING" | b"SCAN" | b"INFO" | b"SCRIPT" | b"CLUSTER" | b"MULTI" | b"EXEC" => None,
        _ => args.next()?,
    }
}

/// A command handle of [`Redis`]: the shared connection, with a span per
/// command or pipeline when traces are exported.
#[derive(Clone)]
pub struct Connection {
    backend: Backend,
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

    fn send_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.backend {
            Backend::Standalone(manager) => manager.req_packed_command(cmd),
            Backend::Sentinel(sentinel) => Box::pin(
                sentinel
                    .run(move |mut manager| async move { manager.req_packed_command(cmd).await }),
            ),
            Backend::Cluster(cluster) => {
                Box::pin(async move { cluster.connection().await?.req_packed_command(cmd).await })
            }
        }
    }

    fn send_pipeline<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.backend {
            Backend::Standalone(manager) => manager.req_packed_commands(pipeline, offset, count),
            Backend::Sentinel(sentinel) => Box::pin(sentinel.run(move |mut manager| async move {
                manager.req_packed_commands(pipeline, offset, count).await
            })),
            Backend::Cluster(cluster) => Box::pin(cluster.pipeline(pipeline, offset, count)),
        }
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match Self::span(Some(cmd), 1) {
            Some(span) => Box::pin(self.send_command(cmd).instrument(span)),
            None => self.send_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match Self::span(pipeline.cmd_iter().next(), pipeline.len()) {
            Some(span) => Box::pin(self.send_pipeline(pipeline, offset, count).instrument(span)),
            None => self.send_pipeline(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.backend {
            Backend::Standalone(manager) => manager.get_db(),
            Backend::Sentinel(sentinel) => sentinel
                .current()
                .map_or(0, |master| master.manager.get_db()),
            Backend::Cluster(_) => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use redis::AsyncCommands as _;

    use super::*;
    use crate::{
        config::Secret,
        testing::topologies::{RedisCluster, SentinelGroup},
    };

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

    /// A fresh prefix on `url`, with `wait_replicas`.
    fn on(url: &str, wait_replicas: u32) -> Redis {
        Redis::connect(&RedisConfig {
            url: Secret::new(url),
            key_prefix: format!("t:{}:", uuid::Uuid::new_v4().simple()),
            wait_replicas,
            ..Default::default()
        })
        .expect("url")
    }

    /// 2,500 keys written in one pipeline (on a Cluster: spread over every
    /// slot, so sent as one pipeline per slot), then found by `SCAN`.
    async fn scan_finds_every_key_of_a_prefix_and_no_other_on(redis: Redis) {
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
        // Replies come back in the pipeline's order, whatever the slots.
        pipe.cmd("GET")
            .arg(&written[0])
            .cmd("GET")
            .arg(&other)
            .cmd("GET")
            .arg(&written[2_499]);
        let replies: (i64, i64, i64) = pipe.query_async(&mut conn).await.expect("set");
        assert_eq!(replies, (1, 1, 1));
        let found = redis.scan_keys(&redis.key(&["*"])).await.expect("scan");
        written.sort();
        assert_eq!(found, written, "every key of the prefix, once, no other");
        let deleted: usize = conn.del(&written).await.expect("del");
        assert_eq!(deleted, written.len());
        let _: usize = conn.del(&other).await.expect("del");
    }

    #[tokio::test]
    async fn scan_finds_every_key_of_a_prefix_and_no_other() {
        scan_finds_every_key_of_a_prefix_and_no_other_on(on("redis://127.0.0.1:6379", 0)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cluster_takes_pipelines_across_slots_and_scans_every_master() {
        let cluster = RedisCluster::shared();
        scan_finds_every_key_of_a_prefix_and_no_other_on(on(&cluster.url(), 0)).await;
        // A transaction whose keys share no slot is refused, not half done.
        let redis = on(&cluster.url(), 0);
        let result: RedisResult<()> = redis::pipe()
            .atomic()
            .set(redis.key(&["a"]), 1)
            .set(redis.key(&["b"]), 1)
            .query_async(&mut redis.connection())
            .await;
        assert!(result.is_err(), "a cross-slot transaction fails");
        assert!(
            redis
                .scan_keys(&redis.key(&["*"]))
                .await
                .expect("scan")
                .is_empty()
        );
        assert!(redis.ping().await);
    }

    #[test]
    fn urls_name_their_topology() {
        assert_eq!(Topology::of("redis://h:1/2"), Ok(Topology::Standalone));
        assert_eq!(Topology::of("rediss://u:p@h"), Ok(Topology::Standalone));
        assert_eq!(
            Topology::of("redis+sentinel://a:1,b,[::1]:3/main/2"),
            Ok(Topology::Sentinel {
                sentinels: vec![
                    "redis://a:1".into(),
                    "redis://b:26379".into(),
                    "redis://[::1]:3".into()
                ],
                master: "main".into(),
            })
        );
        assert_eq!(
            Topology::of("rediss+cluster://u:p%40ss@a:7000,b"),
            Ok(Topology::Cluster {
                nodes: vec![
                    "rediss://u:p%40ss@a:7000".into(),
                    "rediss://u:p%40ss@b:6379".into()
                ],
            })
        );
        for bad in [
            "http://h",
            "h:6379",
            "redis+sentinel://a,b",
            "redis+sentinel://a,,b/m",
            "redis+sentinel://a:x/m",
            "redis+sentinel://a/m/db",
            "redis+cluster://a/0",
            "redis+cluster://a?x=1",
        ] {
            assert!(Topology::of(bad).is_err(), "{bad} is refused");
        }
    }

    #[test]
    fn config_names_the_field_of_a_bad_url_or_wait() {
        use crate::config::Validate as _;
        let err = RedisConfig {
            url: Secret::new("redis+sentinel://a,b"),
            ..Default::default()
        }
        .validate()
        .expect_err("no master name");
        assert!(err.to_string().contains("redis.url"), "{err}");
        let err = RedisConfig {
            wait_replicas: 1,
            wait_timeout_ms: 10_000,
            ..Default::default()
        }
        .validate()
        .expect_err("a wait longer than a command");
        assert!(err.to_string().contains("redis.wait_timeout_ms"), "{err}");
    }

    /// Writes `load:<n>` keys from four tasks until `stop`, each write made
    /// durable ([`Redis::replicate`]); returns the keys whose write was
    /// acknowledged, and when writes failed.
    async fn write_load(
        redis: &Redis,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> (Vec<String>, Vec<Instant>) {
        let tasks: Vec<_> = (0..4)
            .map(|task| {
                let redis = redis.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let mut acked = Vec::new();
                    let mut failures = Vec::new();
                    let mut n = 0_u64;
                    while !*stop.borrow() {
                        n += 1;
                        let key = redis.key(&["load", &format!("{task}-{n}")]);
                        let written: RedisResult<()> = async {
                            let () = redis
                                .connection()
                                .set_options(
                                    &key,
                                    1,
                                    redis::SetOptions::default()
                                        .with_expiration(redis::SetExpiry::PX(300_000)),
                                )
                                .await?;
                            redis.replicate().await
                        }
                        .await;
                        match written {
                            Ok(()) => acked.push(key),
                            Err(_) => {
                                failures.push(Instant::now());
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                    }
                    (acked, failures)
                })
            })
            .collect();
        let mut acked = Vec::new();
        let mut failures = Vec::new();
        for task in tasks {
            let (a, f) = task.await.expect("task");
            acked.extend(a);
            failures.extend(f);
        }
        (acked, failures)
    }

    /// Runs a write load across `disrupt`, then waits for writes to succeed
    /// again; returns (acknowledged writes, of them lost, seconds from the
    /// disruption to the last failed write).
    async fn through<F: FnOnce()>(redis: &Redis, disrupt: F) -> (usize, usize, f64) {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let load = {
            let redis = redis.clone();
            tokio::spawn(async move { write_load(&redis, stop_rx).await })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        let disrupted_at = Instant::now();
        tokio::task::block_in_place(disrupt);
        // Until writes have gone through for two seconds in a row.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut ok_since: Option<Instant> = None;
        while ok_since.is_none_or(|since| since.elapsed() < Duration::from_secs(2)) {
            assert!(Instant::now() < deadline, "writes never recovered");
            let probe: RedisResult<()> = async {
                let () = redis
                    .connection()
                    .set_options(
                        redis.key(&["probe"]),
                        1,
                        redis::SetOptions::default().with_expiration(redis::SetExpiry::PX(60_000)),
                    )
                    .await?;
                redis.replicate().await
            }
            .await;
            match probe {
                Ok(()) => {
                    ok_since.get_or_insert_with(Instant::now);
                }
                Err(_) => ok_since = None,
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop_tx.send(true).expect("stop");
        let (acked, failures) = load.await.expect("load");
        let mut lost = 0;
        for chunk in acked.chunks(500) {
            let found: Vec<Option<i64>> = redis::cmd("MGET")
                .arg(chunk)
                .query_async(&mut redis.connection())
                .await
                .expect("mget");
            lost += found.iter().filter(|v| v.is_none()).count();
        }
        let outage = failures.iter().max().map_or(0.0, |last| {
            last.saturating_duration_since(disrupted_at).as_secs_f64()
        });
        (acked.len(), lost, outage)
    }

    /// The master of a Sentinel group dies (`SIGKILL`): the sentinels
    /// promote a replica and the connection follows within seconds, with no
    /// restart. Without `WAIT` an acknowledged write may be lost (what the
    /// promoted replica had not received); with `wait_replicas = 1` none
    /// is, and durable writes resume once the other replica follows the new
    /// master.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_sentinel_master_crash_is_followed_and_wait_loses_no_write() {
        for wait_replicas in [0, 1] {
            let group = tokio::task::spawn_blocking(SentinelGroup::start)
                .await
                .expect("join")
                .expect("group");
            let redis = on(&group.url(), wait_replicas);
            let (acked, lost, outage) = through(&redis, || {
                group.master().expect("master").kill().expect("kill");
            })
            .await;
            eprintln!(
                "sentinel crash, wait_replicas {wait_replicas}: {acked} writes acknowledged, \
                 {lost} lost, writes failed for {outage:.2} s"
            );
            assert!(acked > 100, "the load ran: {acked}");
            assert!(
                outage < 15.0,
                "followed the failover within seconds: {outage}"
            );
            if wait_replicas > 0 {
                assert_eq!(lost, 0, "an acknowledged write is on the new master");
            }
        }
    }

    /// A failover asked of the sentinels (`SENTINEL FAILOVER`) is followed
    /// the same way.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_sentinel_failover_is_followed_without_a_restart() {
        let group = tokio::task::spawn_blocking(SentinelGroup::start)
            .await
            .expect("join")
            .expect("group");
        let before = group.master_port().expect("master");
        let redis = on(&group.url(), 0);
        let (acked, lost, outage) = through(&redis, || {
            group.fail_over().expect("failover");
        })
        .await;
        eprintln!(
            "sentinel failover: {acked} writes acknowledged, {lost} lost, \
             writes failed for {outage:.2} s"
        );
        assert_ne!(group.master_port().expect("master"), before);
        assert!(acked > 100, "the load ran: {acked}");
        assert!(outage < 15.0, "{outage}");
    }

    /// `wait_replicas` above the replicas there are: every durable write
    /// fails as unavailable, none is taken as done.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_no_replica_acknowledged_fails_as_unavailable() {
        let group = SentinelGroup::shared();
        let redis = Redis::connect(&RedisConfig {
            url: Secret::new(group.url()),
            key_prefix: format!("t:{}:", uuid::Uuid::new_v4().simple()),
            wait_replicas: 3,
            wait_timeout_ms: 100,
            ..Default::default()
        })
        .expect("url");
        let err = redis.replicate().await.expect_err("two replicas of three");
        assert!(matches!(
            crate::error::ApiError::from(err),
            crate::error::ApiError::Unavailable(_)
        ));
        let redis = on(&group.url(), 2);
        redis.replicate().await.expect("both replicas acknowledge");
        let cluster = on(&RedisCluster::shared().url(), 1);
        cluster
            .replicate()
            .await
            .expect("every master's replica acknowledges");
    }

    /// A manual failover of one Cluster master (`CLUSTER FAILOVER` on its
    /// replica) is followed from `MOVED` replies, with nothing lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_cluster_failover_is_followed() {
        let cluster = tokio::task::spawn_blocking(RedisCluster::start)
            .await
            .expect("join")
            .expect("cluster");
        let redis = on(&cluster.url(), 1);
        let (acked, lost, outage) = through(&redis, || {
            let replica = cluster
                .nodes
                .iter()
                .find(|node| {
                    node.query::<String>(redis::cmd("INFO").arg("replication"))
                        .is_ok_and(|info| info.contains("role:slave"))
                })
                .expect("a replica");
            let _: String = replica
                .query(redis::cmd("CLUSTER").arg("FAILOVER"))
                .expect("failover");
            crate::testing::topologies::wait_for("the replica to take over", || {
                replica
                    .query::<String>(redis::cmd("INFO").arg("replication"))
                    .is_ok_and(|info| info.contains("role:master"))
            })
            .expect("promoted");
        })
        .await;
        eprintln!(
            "cluster failover: {acked} writes acknowledged, {lost} lost, \
             writes failed for {outage:.2} s"
        );
        assert!(acked > 100, "the load ran: {acked}");
        assert_eq!(lost, 0);
        assert!(outage < 15.0, "{outage}");
    }
}
