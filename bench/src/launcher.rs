//! Starts the real release binaries, isolated like the integration harness
//! does it: a database per service, a RabbitMQ vhost, a Redis key prefix and
//! free ports for this run; everything is removed at the end.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, bail};
use tokio::{
    process::{Child, Command},
    time::Instant,
};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// The local PostgreSQL (trust auth).
pub const POSTGRES: &str = "127.0.0.1:5432";
/// The local RabbitMQ.
pub const RABBITMQ: &str = "127.0.0.1:5672";
/// The local Redis.
pub const REDIS: &str = "redis://127.0.0.1:6379";
/// The public base URL links in emails point to.
pub const BASE_URL: &str = "https://usher.bench.example";

/// A free loopback port.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The run's isolated resources; [`Isolation::cleanup`] removes them.
#[derive(Debug)]
pub struct Isolation {
    /// Unique id of the run.
    pub id: String,
    /// The RabbitMQ vhost.
    pub vhost: String,
    databases: Vec<String>,
}

impl Isolation {
    /// Creates the vhost; databases are created by the services (or by
    /// [`Isolation::database`] callers).
    pub fn new() -> anyhow::Result<Self> {
        let id = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
        let vhost = format!("usher-bench-{id}");
        rabbitmqctl(&["add_vhost", &vhost])?;
        rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"])?;
        Ok(Self {
            id,
            vhost,
            databases: Vec::new(),
        })
    }

    /// A database name for `what`, dropped at cleanup.
    pub fn database(&mut self, what: &str) -> String {
        let name = format!("usher_bench_{}_{what}", self.id);
        self.databases.push(name.clone());
        name
    }

    /// The URL of database `name`.
    pub fn database_url(name: &str) -> String {
        format!("postgres://postgres@{POSTGRES}/{name}")
    }

    /// The AMQP URL of the vhost.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@{RABBITMQ}/{}", self.vhost)
    }

    /// The Redis key prefix.
    pub fn redis_prefix(&self) -> String {
        format!("bench:{}:", self.id)
    }

    /// Drops the databases and the vhost, and deletes the Redis keys.
    pub async fn cleanup(&self) {
        let _ = rabbitmqctl(&["delete_vhost", &self.vhost]);
        for db in &self.databases {
            let _ = std::process::Command::new("psql")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                    "-qAtc",
                ])
                .arg(format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if let Ok(client) = redis::Client::open(REDIS)
            && let Ok(mut conn) = client.get_multiplexed_async_connection().await
        {
            // SCAN, not KEYS: the server is shared with whatever else runs.
            let keys = match usher_kit::redis::Redis::connect(&usher_kit::config::RedisConfig {
                url: usher_kit::config::Secret::new(REDIS),
                key_prefix: String::new(),
                ..Default::default()
            }) {
                Ok(redis) => redis
                    .scan_keys(&format!("{}*", self.redis_prefix()))
                    .await
                    .unwrap_or_default(),
                Err(_) => Vec::new(),
            };
            for chunk in keys.chunks(1_000) {
                let _: Result<(), _> = redis::cmd("DEL").arg(chunk).query_async(&mut conn).await;
            }
        }
    }
}

fn rabbitmqctl(args: &[&str]) -> anyhow::Result<()> {
    let status = std::process::Command::new("rabbitmqctl")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("rabbitmqctl must be installed (deploy/local/services.sh)")?;
    if !status.success() {
        bail!("rabbitmqctl {args:?} failed");
    }
    Ok(())
}

/// One running binary.
#[derive(Debug)]
pub struct Service {
    /// The binary's name, e.g. `usher-identity`.
    pub name: &'static str,
    /// Its gRPC address.
    pub grpc: SocketAddr,
    /// Its Prometheus metrics address.
    pub metrics: SocketAddr,
    /// The process id.
    pub pid: u32,
    /// When it was spawned.
    pub spawned: Instant,
    child: Child,
}

impl Service {
    /// Starts `dir/name` on free ports with `env`; its log goes to
    /// `log_dir/<name>-<port>.log`.
    pub fn start(
        dir: &Path,
        log_dir: &Path,
        name: &'static str,
        env: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        let binary = dir.join(name);
        if !binary.exists() {
            bail!(
                "{} is missing: build the services first (cargo build --release --bins)",
                binary.display()
            );
        }
        let grpc = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        std::fs::create_dir_all(log_dir)?;
        let log = std::fs::File::create(log_dir.join(format!("{name}-{}.log", grpc.port())))?;
        let mut command = Command::new(&binary);
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("USHER_SERVER__LISTEN", grpc.to_string())
            .env("USHER_SERVER__METRICS_LISTEN", metrics.to_string())
            .env("USHER_SERVER__SHUTDOWN_DRAIN_MS", "100")
            .env("USHER_TELEMETRY__LOG_FILTER", "warn")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .envs(
                EXTRA_ENV
                    .get()
                    .into_iter()
                    .flatten()
                    .filter(|extra| extra.service == name)
                    .map(|extra| (extra.key.as_str(), extra.value.as_str())),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        let spawned = Instant::now();
        let child = command
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        let pid = child.id().context("child pid")?;
        Ok(Self {
            name,
            grpc,
            metrics,
            pid,
            spawned,
            child,
        })
    }

    /// A channel to the gRPC port (one HTTP/2 connection, made on first use).
    pub fn channel(&self) -> Channel {
        channel(self.grpc)
    }

    /// Waits until health reports SERVING for `service` (empty: the server
    /// itself), polling every 2 ms; returns the time since spawn.
    pub async fn wait_serving(
        &mut self,
        service: &str,
        within: Duration,
    ) -> anyhow::Result<Duration> {
        let mut client = HealthClient::new(self.channel());
        loop {
            let request = HealthCheckRequest {
                service: service.to_owned(),
            };
            if let Ok(Ok(answer)) =
                tokio::time::timeout(Duration::from_millis(500), client.check(request)).await
                && answer.into_inner().status() == ServingStatus::Serving
            {
                return Ok(self.spawned.elapsed());
            }
            if let Ok(Some(exit)) = self.child.try_wait() {
                bail!("{} exited with {exit} (see its log)", self.name);
            }
            if self.spawned.elapsed() > within {
                bail!("{} not SERVING within {within:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Resident memory (VmRSS), in MiB; 0 when unreadable.
    pub fn rss_mib(&self) -> f64 {
        rss_mib(self.pid)
    }

    /// SIGTERM, then waits up to 10 s (kills after that).
    pub async fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// Calls of `method` (e.g. `ListRoles`) the service counted in
/// `usher_grpc_requests_total`, all codes; `None` when the metrics cannot be
/// read.
pub async fn requests_counted(metrics: SocketAddr, method: &str) -> Option<f64> {
    let body = scrape(metrics).await?;
    Some(sum_counter(&body, "usher_grpc_requests_total", method))
}

/// The Prometheus text a service serves on `metrics`; `None` when it cannot
/// be read.
pub async fn scrape(metrics: SocketAddr) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(metrics).await.ok()?;
    let request = format!("GET /metrics HTTP/1.0\r\nHost: {metrics}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut body))
        .await
        .ok()?
        .ok()?;
    Some(body)
}

/// The mean of histogram `name` over the samples whose labels mention
/// `label_text`, between two scrapes, in milliseconds; `None` without
/// samples in between.
pub fn mean_ms_between(before: &str, after: &str, name: &str, label_text: &str) -> Option<f64> {
    let (sum, count) = (format!("{name}_sum"), format!("{name}_count"));
    let sum = sum_counter(after, &sum, label_text) - sum_counter(before, &sum, label_text);
    let count = sum_counter(after, &count, label_text) - sum_counter(before, &count, label_text);
    (count > 0.0).then(|| sum / count * 1e3)
}

/// The sum of the samples of counter `name` whose labels mention `label_text`.
pub fn sum_counter(text: &str, name: &str, label_text: &str) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(name) && line[name.len()..].starts_with('{'))
        .filter(|line| line.contains(label_text))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A lazily connected channel to `addr`.
pub fn channel(addr: SocketAddr) -> Channel {
    // `http://<socket addr>` is always a valid URI.
    match Endpoint::from_shared(format!("http://{addr}")) {
        Ok(endpoint) => endpoint
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy(),
        Err(_) => Endpoint::from_static("http://127.0.0.1:1").connect_lazy(),
    }
}

/// VmRSS of process `pid`, in MiB; 0 when unreadable.
pub fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| parse_vm_rss_kib(&status))
        .map_or(0.0, |kib| kib as f64 / 1024.0)
}

/// The `VmRSS:` line of a `/proc/PID/status` text, in KiB.
pub fn parse_vm_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// The environment of a service that owns database `db`.
pub fn service_env(iso: &Isolation, db: &str, redis: bool) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("USHER_DATABASE__URL", Isolation::database_url(db)),
        ("USHER_AMQP__URL", iso.amqp_url()),
        ("USHER_LINKS__PUBLIC_BASE_URL", BASE_URL.to_owned()),
    ];
    if redis {
        env.push(("USHER_REDIS__KEY_PREFIX", iso.redis_prefix()));
    }
    env
}

/// The binaries of the stack and how each is started.
/// A setting given to one binary on top of the bench's own
/// (`--service-env`), to compare configurations in one build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtraEnv {
    /// The binary, e.g. `usher-identity`.
    pub service: String,
    /// The variable, e.g. `USHER_PASSWORDS__THREAD_NICE`.
    pub key: String,
    /// Its value.
    pub value: String,
}

impl std::str::FromStr for ExtraEnv {
    type Err = String;

    /// `usher-identity:USHER_PASSWORDS__THREAD_NICE=19`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (service, setting) = text
            .split_once(':')
            .ok_or("expected <binary>:<VARIABLE>=<value>")?;
        let (key, value) = setting
            .split_once('=')
            .ok_or("expected <binary>:<VARIABLE>=<value>")?;
        if !key.starts_with("USHER_") {
            return Err(format!("{key} is not an Usher setting (USHER_…)"));
        }
        Ok(Self {
            service: service.to_owned(),
            key: key.to_owned(),
            value: value.to_owned(),
        })
    }
}

/// The `--service-env` settings of this run, given once at its start.
pub static EXTRA_ENV: std::sync::OnceLock<Vec<ExtraEnv>> = std::sync::OnceLock::new();

#[derive(Debug)]
pub struct Stack {
    /// usher-identity.
    pub identity: Service,
    /// usher-invitation.
    pub invitation: Service,
    /// usher-notification.
    pub notification: Service,
    /// usher-gateway.
    pub gateway: Service,
    /// The environment each was started with (to start a second copy).
    pub envs: Vec<(&'static str, Vec<(&'static str, String)>)>,
}

/// Directory of the service binaries: next to this binary by default.
pub fn default_bin_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("target/release"))
}

impl Stack {
    /// Starts every binary against the run's isolated resources, emails
    /// going to the SMTP sink on `smtp_port`. Returns the stack and, per
    /// binary, the time from spawn to SERVING on this first start (which
    /// includes creating the database and migrating it).
    pub async fn start(
        dir: &Path,
        log_dir: &Path,
        iso: &mut Isolation,
        smtp_port: u16,
    ) -> anyhow::Result<(Self, Vec<(&'static str, Duration)>)> {
        let within = Duration::from_secs(120);
        let identity_db = iso.database("identity");
        let identity_env = service_env(iso, &identity_db, true);
        let mut identity = Service::start(dir, log_dir, "usher-identity", &identity_env)?;
        let mut first = vec![(
            "usher-identity",
            identity
                .wait_serving("usher.identity.v1.AuthService", within)
                .await?,
        )];

        let invitation_db = iso.database("invitation");
        let mut invitation_env = service_env(iso, &invitation_db, true);
        invitation_env.extend([
            ("USHER_IDENTITY__URL", format!("http://{}", identity.grpc)),
            // No hourly quota: the benchmark sends far more than 5,000 an hour.
            ("USHER_INVITATIONS__HOURLY_QUOTA", "0".to_owned()),
        ]);
        let mut invitation = Service::start(dir, log_dir, "usher-invitation", &invitation_env)?;

        let notification_db = iso.database("notification");
        let mut notification_env = service_env(iso, &notification_db, false);
        notification_env.push(("USHER_SMTP__PORT", smtp_port.to_string()));
        let mut notification =
            Service::start(dir, log_dir, "usher-notification", &notification_env)?;
        first.push((
            "usher-invitation",
            invitation
                .wait_serving("usher.invitation.v1.InvitationService", within)
                .await?,
        ));
        first.push((
            "usher-notification",
            notification
                .wait_serving("usher.notification.v1.NotificationService", within)
                .await?,
        ));

        let gateway_env = vec![
            ("USHER_REDIS__KEY_PREFIX", iso.redis_prefix()),
            // Throughput runs would hit the per-IP and per-account limits.
            ("USHER_RATE_LIMITS__ENABLED", "false".to_owned()),
            (
                "USHER_UPSTREAMS__IDENTITY",
                format!("http://{}", identity.grpc),
            ),
            (
                "USHER_UPSTREAMS__INVITATION",
                format!("http://{}", invitation.grpc),
            ),
            (
                "USHER_UPSTREAMS__NOTIFICATION",
                format!("http://{}", notification.grpc),
            ),
        ];
        let mut gateway = Service::start(dir, log_dir, "usher-gateway", &gateway_env)?;
        first.push(("usher-gateway", gateway.wait_serving("", within).await?));
        Ok((
            Self {
                identity,
                invitation,
                notification,
                gateway,
                envs: vec![
                    ("usher-identity", identity_env),
                    ("usher-invitation", invitation_env),
                    ("usher-notification", notification_env),
                    ("usher-gateway", gateway_env),
                ],
            },
            first,
        ))
    }

    /// The four services, in start order.
    pub fn services(&self) -> [&Service; 4] {
        [
            &self.identity,
            &self.invitation,
            &self.notification,
            &self.gateway,
        ]
    }

    /// Stops every binary.
    pub async fn stop(self) {
        self.gateway.stop().await;
        self.notification.stop().await;
        self.invitation.stop().await;
        self.identity.stop().await;
    }
}

/// The health service name each binary reports SERVING for once ready.
pub fn ready_service(name: &str) -> &'static str {
    match name {
        "usher-identity" => "usher.identity.v1.AuthService",
        "usher-invitation" => "usher.invitation.v1.InvitationService",
        "usher-notification" => "usher.notification.v1.NotificationService",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_service_setting_names_its_binary_variable_and_value() {
        let extra: ExtraEnv = "usher-identity:USHER_PASSWORDS__THREAD_NICE=19"
            .parse()
            .unwrap();
        assert_eq!(extra.service, "usher-identity");
        assert_eq!(extra.key, "USHER_PASSWORDS__THREAD_NICE");
        assert_eq!(extra.value, "19");
        assert!("usher-identity:PATH=/".parse::<ExtraEnv>().is_err());
        assert!("USHER_X=1".parse::<ExtraEnv>().is_err());
    }

    #[test]
    fn a_histogram_mean_is_taken_between_two_scrapes() {
        let before = "h_sum{step=\"a\"} 1.0\nh_count{step=\"a\"} 10\nh_sum{step=\"b\"} 5\nh_count{step=\"b\"} 1\n";
        let after = "h_sum{step=\"a\"} 1.5\nh_count{step=\"a\"} 20\nh_sum{step=\"b\"} 5\nh_count{step=\"b\"} 1\n";
        let mean = mean_ms_between(before, after, "h", "step=\"a\"").unwrap();
        assert!((mean - 50.0).abs() < 1e-9, "{mean}");
        assert_eq!(mean_ms_between(before, after, "h", "step=\"b\""), None);
    }

    #[test]
    fn vm_rss_is_read_from_proc_status() {
        let status = "Name:\tx\nVmPeak:\t  9000 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss_kib(status), Some(12_345));
        assert_eq!(parse_vm_rss_kib("Name:\tx\n"), None);
    }

    #[test]
    fn counters_are_summed_over_matching_labels() {
        let text = "# TYPE usher_grpc_requests_total counter\n\
            usher_grpc_requests_total{method=\"/a.RoleService/ListRoles\",code=\"OK\"} 7\n\
            usher_grpc_requests_total{method=\"/a.RoleService/ListRoles\",code=\"UNAUTHENTICATED\"} 2\n\
            usher_grpc_requests_total{method=\"/a.UserService/ListUsers\",code=\"OK\"} 100\n\
            usher_grpc_requests_total_other{method=\"ListRoles\"} 50\n";
        assert_eq!(
            sum_counter(text, "usher_grpc_requests_total", "ListRoles"),
            9.0
        );
        assert_eq!(
            sum_counter(text, "usher_grpc_requests_total", "Nothing"),
            0.0
        );
    }

    #[test]
    fn this_process_has_a_resident_size() {
        assert!(rss_mib(std::process::id()) > 0.0);
    }
}
