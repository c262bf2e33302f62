//! `usher dev`: the three services and the gateway in one process, for a
//! newcomer's first minutes and for local development.
//!
//! - The gateway listens on `--listen` (127.0.0.1:8080); the services on free
//!   loopback ports chosen at start, known only to this process.
//! - Backends: embedded by default — SQLite files, an in-process cache
//!   (sessions, invitation tokens, rate limits; `usher_kit::cache`) and an
//!   in-process broker fed by the same outboxes (`usher_kit::broker`) — so
//!   nothing needs installing. `--database-url postgres://…` (one database per
//!   service), `--redis-url` and `--amqp-url` switch each to the real one;
//!   several `usher dev` can run side by side, isolated.
//! - Emails are written to `--mail-dir` (or sent to `--smtp-url`), and each
//!   one is announced on stdout with its recipient and link ([`mail`]).
//! - On first start a demo account is created and its owner's credentials
//!   printed; they are kept in a state file, so a restart prints them again
//!   instead of creating a second account ([`demo`]).

pub mod demo;
pub mod mail;

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use usher_kit::{
    broker::{Broker, MemoryBroker},
    cache::Cache,
    clock::SystemClock,
    config::{LogFormat, Secret, TelemetryConfig},
    tokens::TokenHasher,
};
use usher_notification::config::{SmtpConfig, TlsMode, TransportKind};

use crate::output::{line, note};

/// `usher dev`.
#[derive(Debug, Clone, clap::Args)]
pub struct DevArgs {
    /// Where the gateway listens (gRPC, gRPC-Web and the invitation page).
    #[arg(long, env = "USHER_DEV_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// The address links in emails point to; default: the gateway's.
    #[arg(long, env = "USHER_DEV_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// The services' databases, created when missing: SQLite files
    /// (`sqlite://usher-dev.db` → `usher-dev_identity.db`, …) or PostgreSQL
    /// (`postgres://…/<name>` → databases `<name>_identity`,
    /// `<name>_invitation`, `<name>_notification`).
    #[arg(
        long,
        env = "USHER_DEV_DATABASE_URL",
        default_value = "sqlite://usher-dev.db",
        hide_env_values = true
    )]
    pub database_url: String,
    /// Redis for sessions, invitation tokens and rate limits (e.g.
    /// `redis://127.0.0.1:6379`); default: kept in this process, gone when
    /// it stops.
    #[arg(long, env = "USHER_DEV_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Prefix of every Redis key.
    #[arg(long, env = "USHER_DEV_REDIS_PREFIX", default_value = "usher:")]
    pub redis_prefix: String,
    /// RabbitMQ for email jobs, results and events (e.g.
    /// `amqp://guest:guest@127.0.0.1:5672/%2f`; the vhost is the path);
    /// default: an in-process broker.
    #[arg(long, env = "USHER_DEV_AMQP_URL", hide_env_values = true)]
    pub amqp_url: Option<String>,
    /// Send emails to this SMTP server (`smtp://[user:pass@]host[:port]`, or
    /// `smtps://` for TLS) instead of writing them to the mail folder.
    #[arg(long, env = "USHER_DEV_SMTP_URL", hide_env_values = true)]
    pub smtp_url: Option<String>,
    /// Folder the emails are written to, as `.eml` files.
    #[arg(long, env = "USHER_DEV_MAIL_DIR", default_value = "usher-mail")]
    pub mail_dir: PathBuf,
    /// The demo account's credentials; default: `usher-dev.json` next to
    /// the mail folder.
    #[arg(long, env = "USHER_DEV_STATE_FILE")]
    pub state_file: Option<PathBuf>,
    /// Do not create a demo account.
    #[arg(long)]
    pub no_demo: bool,
    /// Log filter of the services (e.g. `info`, `usher_invitation=debug`).
    #[arg(long, env = "USHER_DEV_LOG", default_value = "warn")]
    pub log: String,
}

impl DevArgs {
    /// The state file's path.
    pub fn state_path(&self) -> PathBuf {
        self.state_file
            .clone()
            .unwrap_or_else(|| self.mail_dir.with_file_name("usher-dev.json"))
    }
}

/// The database URL of `service`: the base URL's database name, `_`, and
/// the service's name (`…/usher` → `…/usher_identity`).
pub fn service_database_url(base: &str, service: &str) -> anyhow::Result<String> {
    if let Some(path) = base
        .strip_prefix("sqlite://")
        .or_else(|| base.strip_prefix("sqlite:"))
    {
        return sqlite_service_url(path, service);
    }
    let mut url = url::Url::parse(base)
        .with_context(|| "--database-url must be a URL like postgres://user@host:5432/usher")?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        anyhow::bail!(
            "--database-url must be a postgres:// URL, not {}://",
            url.scheme()
        );
    }
    let name = url.path().trim_matches('/');
    if name.contains('/') {
        anyhow::bail!("--database-url must name one database, not {name:?}");
    }
    let name = if name.is_empty() { "usher" } else { name };
    let database = format!("{name}_{service}");
    url.set_path(&format!("/{database}"));
    Ok(url.into())
}

/// The SQLite file of `service` next to `path` (`dev.db` → `dev_identity.db`),
/// created when missing.
fn sqlite_service_url(path: &str, service: &str) -> anyhow::Result<String> {
    let path = path.split('?').next().unwrap_or_default();
    if path.is_empty() || path.ends_with('/') {
        anyhow::bail!("--database-url sqlite: must name a file, e.g. sqlite://usher-dev.db");
    }
    let file = std::path::Path::new(path);
    let stem = file
        .file_stem()
        .and_then(|s| s.to_str())
        .context("--database-url sqlite: must name a file")?;
    let name = match file.extension().and_then(|e| e.to_str()) {
        Some(ext) => format!("{stem}_{service}.{ext}"),
        None => format!("{stem}_{service}"),
    };
    let service_file = file.with_file_name(name);
    Ok(format!("sqlite://{}?mode=rwc", service_file.display()))
}

/// The notification service's transport for `--smtp-url`, or the mail
/// folder.
pub fn smtp_config(
    smtp_url: Option<&str>,
    mail_dir: &std::path::Path,
) -> anyhow::Result<SmtpConfig> {
    let mut config = SmtpConfig {
        folder: mail_dir.to_path_buf(),
        ..SmtpConfig::default()
    };
    let Some(smtp_url) = smtp_url else {
        config.transport = TransportKind::File;
        return Ok(config);
    };
    let url = url::Url::parse(smtp_url)
        .with_context(|| "--smtp-url must be a URL like smtp://127.0.0.1:2525")?;
    let (tls, default_port) = match url.scheme() {
        "smtp" => (TlsMode::None, 25),
        "smtp+starttls" => (TlsMode::Starttls, 587),
        "smtps" => (TlsMode::Tls, 465),
        other => anyhow::bail!(
            "--smtp-url must be smtp://, smtp+starttls:// or smtps://, not {other}://"
        ),
    };
    config.transport = TransportKind::Smtp;
    config.tls = tls;
    config.host = url
        .host_str()
        .filter(|h| !h.is_empty())
        .context("--smtp-url has no host")?
        .to_owned();
    config.port = url.port().unwrap_or(default_port);
    if !url.username().is_empty() {
        let decode = |s: &str| {
            url::form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        config.username = decode(url.username());
        config.password = Secret::new(decode(url.password().unwrap_or_default()));
    }
    Ok(config)
}

/// The base of links when `--public-url` is not given: the gateway's
/// address, with a wildcard address replaced by the loopback.
pub fn default_public_url(gateway: SocketAddr) -> String {
    let host = if gateway.ip().is_unspecified() {
        SocketAddr::from((Ipv4Addr::LOCALHOST, gateway.port()))
    } else {
        gateway
    };
    format!("http://{host}")
}

/// The configuration of every service, wired together.
#[derive(Debug, Clone)]
pub struct Stack {
    /// usher-identity.
    pub identity: usher_identity::Config,
    /// usher-invitation.
    pub invitation: usher_invitation::Config,
    /// usher-notification.
    pub notification: usher_notification::Config,
    /// usher-gateway.
    pub gateway: usher_gateway::Config,
}

/// Configures the four for `args`, with the services at `ports` (identity,
/// invitation, notification) and links to `public_url`.
pub fn stack(
    args: &DevArgs,
    ports: [u16; 3],
    gateway: SocketAddr,
    public_url: &str,
) -> anyhow::Result<Stack> {
    let local = |port: u16| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let upstream = |port: u16| format!("http://127.0.0.1:{port}");
    let telemetry = TelemetryConfig {
        log_filter: args.log.clone(),
        log_format: LogFormat::Text,
        ..TelemetryConfig::default()
    };
    let links = usher_kit::config::LinksConfig {
        public_base_url: public_url.to_owned(),
    };

    let mut identity = usher_identity::Config::default();
    identity.server.listen = local(ports[0]);
    identity.server.metrics_listen = None;
    identity.database.url = Secret::new(service_database_url(&args.database_url, "identity")?);
    if let Some(url) = &args.redis_url {
        identity.redis.url = Secret::new(url.clone());
    }
    identity.redis.key_prefix.clone_from(&args.redis_prefix);
    if let Some(url) = &args.amqp_url {
        identity.amqp.url = Secret::new(url.clone());
    }
    identity.telemetry = telemetry.clone();
    identity.links = links.clone();

    let mut invitation = usher_invitation::Config::default();
    invitation.server.listen = local(ports[1]);
    invitation.server.metrics_listen = None;
    invitation.database.url = Secret::new(service_database_url(&args.database_url, "invitation")?);
    invitation.redis = identity.redis.clone();
    invitation.amqp = identity.amqp.clone();
    invitation.identity.url = upstream(ports[0]);
    invitation.telemetry = telemetry.clone();
    invitation.links = links.clone();

    let mut notification = usher_notification::Config::default();
    notification.server.listen = local(ports[2]);
    notification.server.metrics_listen = None;
    notification.database.url =
        Secret::new(service_database_url(&args.database_url, "notification")?);
    notification.amqp = identity.amqp.clone();
    notification.smtp = smtp_config(args.smtp_url.as_deref(), &args.mail_dir)?;
    notification.telemetry = telemetry.clone();
    notification.links = links;

    let mut gateway_config = usher_gateway::Config::default();
    gateway_config.server.listen = gateway;
    gateway_config.server.metrics_listen = None;
    gateway_config.redis = identity.redis.clone();
    gateway_config.upstreams.identity = upstream(ports[0]);
    gateway_config.upstreams.invitation = upstream(ports[1]);
    gateway_config.upstreams.notification = upstream(ports[2]);
    gateway_config.telemetry = telemetry;

    use usher_kit::config::Validate;
    identity.validate().context("identity's configuration")?;
    invitation
        .validate()
        .context("invitation's configuration")?;
    notification
        .validate()
        .context("notification's configuration")?;
    gateway_config
        .validate()
        .context("the gateway's configuration")?;
    Ok(Stack {
        identity,
        invitation,
        notification,
        gateway: gateway_config,
    })
}

type Tasks = tokio::task::JoinSet<(&'static str, anyhow::Result<()>)>;

/// The cache and the broker the four share: in-process unless `--redis-url`
/// or `--amqp-url` names a real one.
struct Backends {
    cache: Cache,
    /// `None`: each service connects to RabbitMQ itself.
    memory_broker: Option<Broker>,
    amqp: usher_kit::config::AmqpConfig,
}

impl Backends {
    fn new(args: &DevArgs, stack: &Stack) -> anyhow::Result<Self> {
        let clock = SystemClock::shared();
        let cache = match args.redis_url {
            Some(_) => Cache::connect(&stack.identity.redis)?,
            None => Cache::memory(clock.clone()),
        };
        // Identity issues the sessions the gateway resolves: its rules
        // apply to the one in-process session store.
        let _ = cache.sessions(
            stack.identity.sessions.clone(),
            TokenHasher::from_config(&stack.identity.tokens)?,
            clock,
        );
        Ok(Self {
            cache,
            memory_broker: args
                .amqp_url
                .is_none()
                .then(|| Broker::memory(MemoryBroker::new())),
            amqp: stack.identity.amqp.clone(),
        })
    }

    /// The broker of `service`.
    fn broker(&self, service: &str) -> Broker {
        self.memory_broker
            .clone()
            .unwrap_or_else(|| Broker::connect(self.amqp.clone(), service))
    }
}

/// Runs everything until Ctrl-C (or SIGTERM).
pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    init_logging(&args.log);
    let gateway_listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (use --listen)", args.listen))?;
    let gateway_addr = gateway_listener.local_addr()?;
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?);
    }
    let ports = [
        listeners[0].local_addr()?.port(),
        listeners[1].local_addr()?.port(),
        listeners[2].local_addr()?.port(),
    ];
    let public_url = args
        .public_url
        .clone()
        .unwrap_or_else(|| default_public_url(gateway_addr));
    let stack = stack(&args, ports, gateway_addr, &public_url)?;
    let file_transport = stack.notification.smtp.transport == TransportKind::File;
    // Emails already in the folder are old: only new ones are announced.
    let mut mailbox = mail::MailWatcher::new(&args.mail_dir, &public_url);

    let shutdown = usher_kit::server::shutdown_on_signal();
    let mut tasks = Tasks::new();
    let mut listeners = listeners.into_iter();
    let mut next = || listeners.next().context("a listener per service");
    let (identity, invitation, notification) = (next()?, next()?, next()?);
    let identity_config = stack.identity.clone();
    let backends = Backends::new(&args, &stack)?;
    let (cache, broker) = (backends.cache.clone(), backends.broker("usher-identity"));
    spawn(&mut tasks, "usher-identity", shutdown.clone(), |s| {
        usher_identity::serve_with(stack.identity, identity, s, cache, broker)
    });
    let (cache, broker) = (backends.cache.clone(), backends.broker("usher-invitation"));
    spawn(&mut tasks, "usher-invitation", shutdown.clone(), |s| {
        usher_invitation::serve_with(stack.invitation, invitation, s, cache, broker)
    });
    let broker = backends.broker("usher-notification");
    spawn(&mut tasks, "usher-notification", shutdown.clone(), |s| {
        usher_notification::serve_with(stack.notification, notification, s, broker)
    });
    let cache = backends.cache.clone();
    spawn(&mut tasks, "usher-gateway", shutdown.clone(), |s| {
        usher_gateway::serve_with(stack.gateway, gateway_listener, s, cache)
    });

    let gateway_url = default_public_url(gateway_addr);
    let ready = async {
        wait_serving(ports, gateway_addr).await?;
        let credentials = if args.no_demo {
            None
        } else {
            Some(demo::ensure(&args.state_path(), &identity_config, ports[0], &gateway_url).await?)
        };
        anyhow::Ok(credentials)
    };
    let credentials = tokio::select! {
        credentials = ready => credentials,
        Some(joined) = tasks.join_next() => {
            let (name, result) = joined?;
            shutdown.cancel();
            if result.is_ok() {
                // A service ends cleanly only when asked to: Ctrl-C (or
                // SIGTERM) before everything was up.
                while tasks.join_next().await.is_some() {}
                return Ok(());
            }
            let error = result.err().unwrap_or_else(|| anyhow::anyhow!("stopped"));
            while tasks.join_next().await.is_some() {}
            return Err(error.context(format!("{name} stopped while starting")));
        }
    };
    let credentials = match credentials {
        Ok(credentials) => credentials,
        Err(error) => {
            shutdown.cancel();
            while tasks.join_next().await.is_some() {}
            return Err(error);
        }
    };
    banner(
        &gateway_url,
        &public_url,
        &args,
        file_transport,
        credentials.as_ref(),
    );

    if file_transport {
        let watch_shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                for email in mailbox.poll() {
                    mail::announce(&email);
                }
                tokio::select! {
                    () = watch_shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            }
        });
    }

    let mut failure = None;
    while let Some(joined) = tasks.join_next().await {
        let (name, result) = joined?;
        if let Err(err) = result {
            tracing::error!(
                service = name,
                error = format!("{err:#}"),
                "service stopped"
            );
            failure.get_or_insert(anyhow::anyhow!("{name}: {err:#}"));
            shutdown.cancel();
        }
    }
    failure.map_or(Ok(()), Err)
}

/// Logs go to stderr, so stdout carries only what `usher dev` has to say
/// (the banner, the emails).
fn init_logging(filter: &str) {
    use tracing_subscriber::{EnvFilter, fmt, layer::SubscriberExt, util::SubscriberInitExt};
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("warn"));
    let layer = fmt::layer().compact().with_writer(std::io::stderr);
    // Already installed (never, in this binary): keep it.
    drop(
        tracing_subscriber::registry()
            .with(filter)
            .with(layer)
            .try_init(),
    );
}

fn banner(
    gateway: &str,
    public_url: &str,
    args: &DevArgs,
    file_transport: bool,
    credentials: Option<&demo::Credentials>,
) {
    line("usher dev: ready");
    line(format!("  gateway: {gateway}"));
    line(format!(
        "  database: {}",
        if args.database_url.starts_with("sqlite:") {
            "SQLite files"
        } else {
            "PostgreSQL"
        }
    ));
    line(format!(
        "  cache: {}",
        if args.redis_url.is_some() {
            "Redis"
        } else {
            "in-process"
        }
    ));
    line(format!(
        "  queue: {}",
        if args.amqp_url.is_some() {
            "RabbitMQ"
        } else {
            "in-process"
        }
    ));
    if public_url != gateway {
        line(format!("  links: {public_url}"));
    }
    if file_transport {
        line(format!("  mail folder: {}", args.mail_dir.display()));
    }
    if let Some(c) = credentials {
        line(format!("  account: {}", c.account_slug));
        line(format!("  owner email: {}", c.owner_email));
        line(format!("  owner password: {}", c.owner_password));
        line(format!("  (kept in {})", args.state_path().display()));
        line("Sign in from another terminal, then invite someone:");
        line(format!(
            "  usher login --gateway {gateway} --account {} --email {}",
            c.account_slug, c.owner_email
        ));
        line("  usher invite ada@example.com");
    }
    line("Press Ctrl-C to stop.");
}

/// Waits until the services and the gateway report SERVING.
async fn wait_serving(ports: [u16; 3], gateway: SocketAddr) -> anyhow::Result<()> {
    let gateway_port = gateway.port();
    let checks = [
        (ports[0], "usher.identity.v1.AuthService"),
        (ports[1], "usher.invitation.v1.InvitationService"),
        (ports[2], "usher.notification.v1.NotificationService"),
        (gateway_port, ""),
    ];
    let started = Instant::now();
    let mut reported = false;
    for (port, service) in checks {
        let channel = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(1))
            .connect_lazy();
        let mut client = HealthClient::new(channel);
        loop {
            let status = client
                .check(HealthCheckRequest {
                    service: service.to_owned(),
                })
                .await
                .map(|r| r.into_inner().status());
            if matches!(status, Ok(ServingStatus::Serving)) {
                break;
            }
            if !reported && started.elapsed() > Duration::from_secs(10) {
                note(
                    "usher dev: still waiting for the services' database, Redis or RabbitMQ \
                     (those given by flags; deploy/local/services.sh starts local ones; \
                     --log info shows what fails)",
                );
                reported = true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

fn spawn<F, Fut>(tasks: &mut Tasks, name: &'static str, shutdown: CancellationToken, run: F)
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let future = run(shutdown);
    tasks.spawn(async move { (name, future.await) });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_service_gets_its_own_database() {
        assert_eq!(
            service_database_url("postgres://postgres@127.0.0.1:5432/usher", "identity")
                .expect("url"),
            "postgres://postgres@127.0.0.1:5432/usher_identity"
        );
        assert_eq!(
            service_database_url("postgresql://u:p@db/it_42?sslmode=require", "notification")
                .expect("url"),
            "postgresql://u:p@db/it_42_notification?sslmode=require"
        );
        assert_eq!(
            service_database_url("postgres://db:5432", "invitation").expect("url"),
            "postgres://db:5432/usher_invitation"
        );
        assert_eq!(
            service_database_url("sqlite://data/usher-dev.db", "identity").expect("url"),
            "sqlite://data/usher-dev_identity.db?mode=rwc"
        );
        assert_eq!(
            service_database_url("sqlite:/tmp/dev?mode=rwc", "invitation").expect("url"),
            "sqlite:///tmp/dev_invitation?mode=rwc"
        );
        assert!(service_database_url("sqlite://data/", "identity").is_err());
        assert!(service_database_url("mysql://db/usher", "identity").is_err());
        assert!(service_database_url("postgres://db/a/b", "identity").is_err());
    }

    #[test]
    fn smtp_urls_choose_the_transport() {
        let folder = std::path::Path::new("mail");
        let file = smtp_config(None, folder).expect("file");
        assert_eq!(file.transport, TransportKind::File);
        assert_eq!(file.folder, folder);
        let plain = smtp_config(Some("smtp://127.0.0.1:2525"), folder).expect("smtp");
        assert_eq!(
            (plain.transport, plain.tls, plain.host.as_str(), plain.port),
            (TransportKind::Smtp, TlsMode::None, "127.0.0.1", 2525)
        );
        let tls =
            smtp_config(Some("smtps://me%40x.org:p%20w@mail.example"), folder).expect("smtps");
        assert_eq!((tls.tls, tls.port), (TlsMode::Tls, 465));
        assert_eq!(tls.username, "me@x.org");
        assert_eq!(tls.password.expose(), "p w");
        assert!(smtp_config(Some("http://x"), folder).is_err());
    }

    #[test]
    fn links_point_at_the_gateway() {
        assert_eq!(
            default_public_url("0.0.0.0:8080".parse().expect("addr")),
            "http://127.0.0.1:8080"
        );
        assert_eq!(
            default_public_url("127.0.0.1:9999".parse().expect("addr")),
            "http://127.0.0.1:9999"
        );
    }

    #[test]
    fn the_wired_stack_is_valid_and_isolated() {
        let args = DevArgs {
            listen: "127.0.0.1:0".parse().expect("addr"),
            public_url: None,
            database_url: "postgres://postgres@127.0.0.1:5432/dev_1".into(),
            redis_url: Some("redis://127.0.0.1:6380".into()),
            redis_prefix: "dev1:".into(),
            amqp_url: Some("amqp://guest:guest@127.0.0.1:5672/dev1".into()),
            smtp_url: None,
            mail_dir: PathBuf::from("/tmp/x/mail"),
            state_file: None,
            no_demo: false,
            log: "warn".into(),
        };
        let gateway: SocketAddr = "127.0.0.1:18080".parse().expect("addr");
        let stack = stack(&args, [1, 2, 3], gateway, "http://127.0.0.1:18080").expect("valid");
        assert_eq!(
            stack.identity.database.url.expose(),
            "postgres://postgres@127.0.0.1:5432/dev_1_identity"
        );
        assert_eq!(stack.invitation.identity.url, "http://127.0.0.1:1");
        assert_eq!(stack.gateway.upstreams.notification, "http://127.0.0.1:3");
        assert_eq!(stack.gateway.redis.key_prefix, "dev1:");
        assert_eq!(
            stack.invitation.redis.url.expose(),
            "redis://127.0.0.1:6380"
        );
        assert_eq!(
            stack.notification.amqp.url.expose(),
            "amqp://guest:guest@127.0.0.1:5672/dev1"
        );
        assert_eq!(
            stack.notification.links.public_base_url,
            "http://127.0.0.1:18080"
        );
        assert_eq!(args.state_path(), PathBuf::from("/tmp/x/usher-dev.json"));
    }
}
