//! Real Redis topologies for tests, started from the local `redis-server`
//! (Redis 7): a Sentinel group (a master, a replica, three sentinels) and a
//! Cluster (three masters, three replicas), each on free ports of
//! 127.0.0.1 with its files in a directory of its own.
//!
//! Every process is watched by a small shell loop that stops it, and removes
//! the directory, when the test process that started it is gone, so a
//! topology shared by a whole test binary ([`SentinelGroup::shared`],
//! [`RedisCluster::shared`]) outlives no run.

use std::{
    fs,
    io::{self, Write as _},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    thread::sleep,
    time::{Duration, Instant},
};

use rand::Rng as _;
use redis::ConnectionLike as _;

/// How long a topology may take to come up, or to settle after a failover.
const SETTLE: Duration = Duration::from_secs(60);

fn other(why: impl Into<String>) -> io::Error {
    io::Error::other(why.into())
}

/// A free port of 127.0.0.1 (with `port + 10000`, a Cluster's bus, free too
/// when `bus`).
fn free_port(bus: bool) -> io::Result<u16> {
    let mut rng = rand::rng();
    for _ in 0..200 {
        let port = rng.random_range(20_000..30_000);
        let Ok(_held) = TcpListener::bind(("127.0.0.1", port)) else {
            continue;
        };
        if bus && TcpListener::bind(("127.0.0.1", port + 10_000)).is_err() {
            continue;
        }
        return Ok(port);
    }
    Err(other("no free port in 20000..30000"))
}

/// A fresh directory under the system's temporary directory.
fn fresh_dir(label: &str) -> io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("usher-{label}-{}", uuid::Uuid::new_v4().simple()));
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Runs `redis-server args…` under a shell loop that stops it when this
/// process ends (or the loop is told to stop) and then removes `cleanup`.
fn spawn_watched(args: &[String], cleanup: &Path) -> io::Result<Child> {
    const WATCH: &str = r#"
dir="$1"; shift
redis-server "$@" >/dev/null 2>&1 &
pid=$!
trap 'kill -9 $pid 2>/dev/null; exit 0' TERM
while kill -0 "$PPID" 2>/dev/null && kill -0 "$pid" 2>/dev/null; do sleep 0.3; done
kill -9 "$pid" 2>/dev/null
if ! kill -0 "$PPID" 2>/dev/null; then rm -rf "$dir"; fi
"#;
    Command::new("sh")
        .arg("-c")
        .arg(WATCH)
        .arg("sh")
        .arg(cleanup)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

/// One `redis-server` process (a data node or a sentinel).
#[derive(Debug)]
pub struct RedisNode {
    /// Its port on 127.0.0.1.
    pub port: u16,
    watcher: Child,
}

impl RedisNode {
    fn start(args: Vec<String>, port: u16, cleanup: &Path) -> io::Result<Self> {
        let watcher = spawn_watched(&args, cleanup)?;
        let node = Self { port, watcher };
        node.wait_answering()?;
        Ok(node)
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A direct connection to this node.
    pub fn connect(&self) -> redis::RedisResult<redis::Connection> {
        let client = redis::Client::open(self.url())?;
        let connection = client.get_connection_with_timeout(Duration::from_secs(2))?;
        connection.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(connection)
    }

    /// Runs `cmd` on this node.
    pub fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        cmd.query(&mut self.connect()?)
    }

    fn wait_answering(&self) -> io::Result<()> {
        wait_for(&format!("port {} to answer", self.port), || {
            self.connect().is_ok_and(|mut c| c.check_connection())
        })
    }

    /// Kills the server at once (`SIGKILL`), as a crashed host would stop.
    pub fn kill(&self) -> io::Result<()> {
        let info: String = self
            .query(redis::cmd("INFO").arg("server"))
            .map_err(|err| other(format!("INFO: {err}")))?;
        let pid = info
            .lines()
            .find_map(|line| line.strip_prefix("process_id:"))
            .map(str::trim)
            .ok_or_else(|| other("INFO names no process_id"))?
            .to_owned();
        let status = Command::new("kill").arg("-9").arg(&pid).status()?;
        if !status.success() {
            return Err(other(format!("kill -9 {pid} failed")));
        }
        wait_for(&format!("port {} to close", self.port), || {
            self.connect().is_err()
        })
    }
}

impl Drop for RedisNode {
    fn drop(&mut self) {
        // The watcher kills its server on TERM; `kill` sends KILL to the
        // shell, so signal it through `kill -TERM`.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.watcher.id().to_string())
            .status();
        let _ = self.watcher.wait();
    }
}

/// Polls `ready` until it holds, or fails after [`SETTLE`].
pub fn wait_for(what: &str, mut ready: impl FnMut() -> bool) -> io::Result<()> {
    let deadline = Instant::now() + SETTLE;
    while Instant::now() < deadline {
        if ready() {
            return Ok(());
        }
        sleep(Duration::from_millis(100));
    }
    Err(other(format!("timed out waiting for {what}")))
}

fn data_node_args(port: u16, dir: &Path) -> Vec<String> {
    [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        &dir.display().to_string(),
        "--logfile",
        &dir.join(format!("{port}.log")).display().to_string(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// A Sentinel group: a master, two replicas and three sentinels (quorum 2,
/// a master called down after one second).
#[derive(Debug)]
pub struct SentinelGroup {
    /// The name the sentinels monitor the master under.
    pub name: String,
    /// The three data nodes; which is master changes with failovers.
    pub data: Vec<RedisNode>,
    /// The sentinels.
    pub sentinels: Vec<RedisNode>,
    dir: PathBuf,
}

impl SentinelGroup {
    /// Starts a group of its own and waits until the sentinels know the
    /// master, the replica and each other.
    pub fn start() -> io::Result<Self> {
        let dir = fresh_dir("sentinel")?;
        let name = "usher-master".to_owned();
        let master_port = free_port(false)?;
        let master = RedisNode::start(data_node_args(master_port, &dir), master_port, &dir)?;
        let mut data = vec![master];
        for _ in 0..2 {
            let port = free_port(false)?;
            let mut args = data_node_args(port, &dir);
            args.extend([
                "--replicaof".into(),
                "127.0.0.1".into(),
                master_port.to_string(),
            ]);
            let replica = RedisNode::start(args, port, &dir)?;
            wait_for("the replica to sync", || {
                replica
                    .query::<String>(redis::cmd("INFO").arg("replication"))
                    .is_ok_and(|info| info.contains("master_link_status:up"))
            })?;
            data.push(replica);
        }
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            let port = free_port(false)?;
            let conf = dir.join(format!("sentinel-{port}.conf"));
            let mut file = fs::File::create(&conf)?;
            writeln!(
                file,
                "port {port}\nbind 127.0.0.1\ndir {dir}\nlogfile {log}\n\
                 sentinel monitor {name} 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds {name} 1000\n\
                 sentinel failover-timeout {name} 5000\n\
                 sentinel parallel-syncs {name} 1",
                dir = dir.display(),
                log = dir.join(format!("sentinel-{port}.log")).display(),
            )?;
            drop(file);
            sentinels.push(RedisNode::start(
                vec![conf.display().to_string(), "--sentinel".into()],
                port,
                &dir,
            )?);
        }
        let group = Self {
            name,
            data,
            sentinels,
            dir,
        };
        group.wait_settled()?;
        Ok(group)
    }

    /// A group shared by every test of this process (not to be failed
    /// over: tests that fail a master over start their own).
    // For tests only: a topology that cannot start is a failed test.
    #[allow(clippy::expect_used)]
    pub fn shared() -> &'static Self {
        static GROUP: OnceLock<SentinelGroup> = OnceLock::new();
        GROUP.get_or_init(|| Self::start().expect("start a sentinel group"))
    }

    /// `redis+sentinel://<each sentinel>/<name>`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!("redis+sentinel://{}/{}", hosts.join(","), self.name)
    }

    /// The port of the master every sentinel names, once they agree.
    pub fn master_port(&self) -> io::Result<u16> {
        let mut named = Vec::new();
        for sentinel in &self.sentinels {
            let (_, port): (String, u16) = sentinel
                .query(
                    redis::cmd("SENTINEL")
                        .arg("get-master-addr-by-name")
                        .arg(&self.name),
                )
                .map_err(|err| other(format!("sentinel {}: {err}", sentinel.port)))?;
            named.push(port);
        }
        named.dedup();
        match named.as_slice() {
            [port] => Ok(*port),
            _ => Err(other(format!("the sentinels disagree: {named:?}"))),
        }
    }

    /// The data node that is master now.
    pub fn master(&self) -> io::Result<&RedisNode> {
        let port = self.master_port()?;
        self.data
            .iter()
            .find(|node| node.port == port)
            .ok_or_else(|| other(format!("no data node on port {port}")))
    }

    /// Waits until every sentinel names one master, that master says it is
    /// one with every other live data node as a replica in sync, and the
    /// sentinels know each other and the replicas (what a failover needs).
    pub fn wait_settled(&self) -> io::Result<()> {
        wait_for("the sentinel group to settle", || {
            let Ok(master) = self.master() else {
                return false;
            };
            let live = self
                .data
                .iter()
                .filter(|node| node.connect().is_ok_and(|mut c| c.check_connection()))
                .count();
            let role_ok = master
                .query::<String>(redis::cmd("INFO").arg("replication"))
                .is_ok_and(|info| {
                    info.contains("role:master")
                        && info.contains(&format!("connected_slaves:{}", live - 1))
                        && !info.contains("state=wait_bgsave")
                        && !info.contains("state=send_bulk")
                });
            let sentinels_ok = self.sentinels.iter().all(|sentinel| {
                let peers: redis::RedisResult<Vec<redis::Value>> =
                    sentinel.query(redis::cmd("SENTINEL").arg("sentinels").arg(&self.name));
                let replicas: redis::RedisResult<Vec<redis::Value>> =
                    sentinel.query(redis::cmd("SENTINEL").arg("replicas").arg(&self.name));
                peers.is_ok_and(|p| p.len() == self.sentinels.len() - 1)
                    && replicas.is_ok_and(|r| !r.is_empty())
            });
            role_ok && sentinels_ok
        })
    }

    /// Asks a sentinel for a failover (the master hands over cleanly) and
    /// waits until every sentinel names the new master.
    pub fn fail_over(&self) -> io::Result<u16> {
        let before = self.master_port()?;
        let _: String = self.sentinels[0]
            .query(redis::cmd("SENTINEL").arg("failover").arg(&self.name))
            .map_err(|err| other(format!("SENTINEL FAILOVER: {err}")))?;
        self.wait_new_master(before)
    }

    /// Waits until every sentinel names a master other than `before`.
    pub fn wait_new_master(&self, before: u16) -> io::Result<u16> {
        let mut after = before;
        wait_for("the sentinels to name a new master", || {
            match self.master_port() {
                Ok(port) if port != before => {
                    after = port;
                    true
                }
                _ => false,
            }
        })?;
        Ok(after)
    }

    /// The directory holding the nodes' logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for SentinelGroup {
    fn drop(&mut self) {
        self.sentinels.clear();
        self.data.clear();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of three masters, each with one replica.
#[derive(Debug)]
pub struct RedisCluster {
    /// The six nodes.
    pub nodes: Vec<RedisNode>,
    dir: PathBuf,
}

impl RedisCluster {
    /// Starts a cluster of its own and waits until every node reports
    /// `cluster_state:ok` with every slot served.
    pub fn start() -> io::Result<Self> {
        let dir = fresh_dir("cluster")?;
        let mut nodes = Vec::new();
        for _ in 0..6 {
            let port = free_port(true)?;
            let mut args = data_node_args(port, &dir);
            args.extend(
                [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &format!("nodes-{port}.conf"),
                    "--cluster-node-timeout",
                    "2000",
                ]
                .iter()
                .map(|s| (*s).to_owned()),
            );
            nodes.push(RedisNode::start(args, port, &dir)?);
        }
        let status = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .arg("--cluster-replicas")
            .arg("1")
            .arg("--cluster-yes")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        if !status.success() {
            return Err(other("redis-cli --cluster create failed"));
        }
        let cluster = Self { nodes, dir };
        wait_for("the cluster to serve every slot", || {
            cluster.nodes.iter().all(|node| {
                node.query::<String>(redis::cmd("CLUSTER").arg("INFO"))
                    .is_ok_and(|info| {
                        info.contains("cluster_state:ok")
                            && info.contains("cluster_slots_ok:16384")
                            && info.contains("cluster_known_nodes:6")
                    })
            })
        })?;
        wait_for("every replica to sync", || {
            let roles: Vec<String> = cluster
                .nodes
                .iter()
                .filter_map(|node| node.query(redis::cmd("INFO").arg("replication")).ok())
                .collect();
            roles.len() == 6
                && roles
                    .iter()
                    .filter(|info| {
                        info.contains("role:slave") && info.contains("master_link_status:up")
                    })
                    .count()
                    == 3
        })?;
        Ok(cluster)
    }

    /// A cluster shared by every test of this process.
    // For tests only: a topology that cannot start is a failed test.
    #[allow(clippy::expect_used)]
    pub fn shared() -> &'static Self {
        static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
        CLUSTER.get_or_init(|| Self::start().expect("start a redis cluster"))
    }

    /// `redis+cluster://<every node>`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// How many keys each master holds (`DBSIZE`), masters only.
    pub fn keys_per_master(&self) -> io::Result<Vec<u64>> {
        let mut sizes = Vec::new();
        for node in &self.nodes {
            let info: String = node
                .query(redis::cmd("INFO").arg("replication"))
                .map_err(|err| other(format!("INFO: {err}")))?;
            if info.contains("role:master") {
                sizes.push(
                    node.query(&redis::cmd("DBSIZE"))
                        .map_err(|err| other(format!("DBSIZE: {err}")))?,
                );
            }
        }
        Ok(sizes)
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.nodes.clear();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
