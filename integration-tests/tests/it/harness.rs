//! Starts the real binaries on free ports, each test with its own database,
//! Redis key prefix and RabbitMQ vhost, and tears them down afterwards.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use tokio::process::{Child, Command};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// The local servers the tests use (see `deploy/local/services.sh`).
pub const POSTGRES: &str = "127.0.0.1:5432";
/// The shared Redis.
pub const REDIS: &str = "127.0.0.1:6379";
/// The shared RabbitMQ.
pub const RABBITMQ_HOST: &str = "127.0.0.1:5672";

/// A binary of the workspace, next to this test binary's `deps/` folder.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// A loopback port for a binary to listen on, free when handed out.
///
/// Between this check and the binary's own bind the port is unheld, so it is
/// taken below Linux's ephemeral range (32768–60999): there, any outgoing
/// connection of a parallel test (to PostgreSQL, Redis, RabbitMQ, a service)
/// could be given it by the kernel, and the binary would fail with "address
/// already in use". Ports are handed out once per process, in turn from a
/// start that depends on the process id, so two tests never get the same one.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(613) % SPAN;
    for _ in 0..SPAN {
        let turn = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = u16::try_from(FIRST + (start + turn) % SPAN).expect("below 32000");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {FIRST}..{}", FIRST + SPAN);
}

/// Resources isolated for one test: database names, a Redis prefix, a vhost.
pub struct Isolation {
    /// Unique id of the test run.
    pub id: String,
    /// The RabbitMQ vhost of the test.
    pub vhost: String,
    databases: Vec<String>,
}

impl Isolation {
    /// Creates the vhost; databases are created by the services themselves.
    pub fn new() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let vhost = format!("usher-it-{id}");
        rabbitmqctl(&["add_vhost", &vhost]);
        rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
        Self {
            id,
            vhost,
            databases: Vec::new(),
        }
    }

    /// A fresh database name for `service`, dropped at teardown.
    pub fn database(&mut self, service: &str) -> String {
        let name = format!("usher_it_{}_{service}", self.id);
        self.databases.push(name.clone());
        name
    }

    /// The AMQP URL of the test's vhost.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@{RABBITMQ_HOST}/{}", self.vhost)
    }

    /// The Redis key prefix of the test.
    pub fn redis_prefix(&self) -> String {
        format!("it:{}:", self.id)
    }
}

impl Drop for Isolation {
    fn drop(&mut self) {
        rabbitmqctl(&["delete_vhost", &self.vhost]);
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
    }
}

fn rabbitmqctl(args: &[&str]) {
    let status = std::process::Command::new("rabbitmqctl")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("rabbitmqctl runs (deploy/local/services.sh installs it)");
    assert!(status.success(), "rabbitmqctl {args:?} failed");
}

/// One running binary.
pub struct Service {
    /// The binary's name.
    pub name: &'static str,
    /// Its gRPC address.
    pub grpc: SocketAddr,
    /// Its metrics address.
    pub metrics: SocketAddr,
    child: std::sync::Mutex<Option<Child>>,
}

impl Service {
    /// Starts `name` with `env` (on top of the test's ports).
    pub fn start(name: &'static str, env: &[(&str, String)]) -> Self {
        let grpc = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
        Self::start_at(name, grpc, metrics, env)
    }

    /// Starts the same binary again on the same ports (after [`Self::terminate`]).
    pub fn restart(&self, env: &[(&str, String)]) -> Self {
        Self::start_at(self.name, self.grpc, self.metrics, env)
    }

    fn start_at(
        name: &'static str,
        grpc: SocketAddr,
        metrics: SocketAddr,
        env: &[(&str, String)],
    ) -> Self {
        let log = std::env::var("USHER_IT_LOG").unwrap_or_else(|_| "warn".into());
        let mut command = Command::new(binary(name));
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("USHER_SERVER__LISTEN", grpc.to_string())
            .env("USHER_SERVER__METRICS_LISTEN", metrics.to_string())
            // The production default: a call already on its way when a
            // service is told to stop reaches it within the drain even on a
            // loaded CI machine (with 100 ms, every create in flight through
            // the gateway and invitation was once still short of identity
            // when its listener closed, and all were refused).
            .env("USHER_SERVER__SHUTDOWN_DRAIN_MS", "1000")
            .env("USHER_TELEMETRY__LOG_FILTER", log)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        // With USHER_IT_LOG_DIR set, each start logs to a file of its own
        // (`<binary>-<port>-<n>.log`) instead of the test's output, so the
        // logs of one process can be read apart from the others'.
        if let Ok(dir) = std::env::var("USHER_IT_LOG_DIR") {
            use std::sync::atomic::{AtomicU32, Ordering};
            static STARTS: AtomicU32 = AtomicU32::new(0);
            let n = STARTS.fetch_add(1, Ordering::SeqCst);
            let path = PathBuf::from(dir).join(format!("{name}-{}-{n}.log", grpc.port()));
            let file = std::fs::File::create(&path)
                .unwrap_or_else(|e| panic!("log file {}: {e}", path.display()));
            let copy = file.try_clone().expect("log file handle");
            command.stdout(file).stderr(copy);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Self {
            name,
            grpc,
            metrics,
            child: std::sync::Mutex::new(Some(child)),
        }
    }

    /// A channel to the service's gRPC port.
    pub fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.grpc))
            .expect("endpoint")
            .connect_timeout(Duration::from_secs(1))
            .connect_lazy()
    }

    /// The health status of `service` (empty for liveness), if the server answers.
    pub async fn health(&self, service: &str) -> Option<ServingStatus> {
        let mut client = HealthClient::new(self.channel());
        let request = HealthCheckRequest {
            service: service.to_owned(),
        };
        let response = tokio::time::timeout(Duration::from_secs(1), client.check(request)).await;
        match response {
            Ok(Ok(r)) => Some(r.into_inner().status()),
            _ => None,
        }
    }

    /// Waits until `service` reports `status`, failing after `within`.
    pub async fn wait_for(&self, service: &str, status: ServingStatus, within: Duration) {
        let started = Instant::now();
        loop {
            let now = self.health(service).await;
            if now == Some(status) {
                return;
            }
            let exited = self
                .child
                .lock()
                .expect("child")
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if let Some(exit) = exited {
                panic!("{} exited with {exit} (its log is above)", self.name);
            }
            assert!(
                started.elapsed() < within,
                "{} did not report {status:?} for {service:?} within {within:?} (last: {now:?})",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub async fn terminate(&self) -> std::process::ExitStatus {
        self.signal_term();
        self.exit().await
    }

    /// Sends SIGTERM (see [`Self::exit`]).
    pub fn signal_term(&self) {
        let pid = self
            .child
            .lock()
            .expect("child")
            .as_ref()
            .and_then(Child::id)
            .expect("still running");
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }

    /// Waits for the process to exit.
    pub async fn exit(&self) -> std::process::ExitStatus {
        let mut child = self
            .child
            .lock()
            .expect("child")
            .take()
            .expect("still running");
        tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .expect("exits within 30 s")
            .expect("wait")
    }
}

/// The gateway's upstreams: `USHER_UPSTREAMS__*` of the three services.
pub fn upstreams(
    identity: &Service,
    invitation: &Service,
    notification: &Service,
) -> Vec<(&'static str, String)> {
    vec![
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
    ]
}

/// The three services and a gateway without rate limits (tests that call
/// every RPC from one address), all serving, with the environments of
/// identity and invitation (their databases, `usher platform-keys`). Bind
/// every service to a name (`invitation: _invitation`, never `_`): a service
/// dropped is stopped.
pub struct MatrixStack {
    pub identity: Service,
    pub invitation: Service,
    pub notification: Service,
    pub gateway: Service,
    pub identity_env: Vec<(&'static str, String)>,
    pub invitation_env: Vec<(&'static str, String)>,
}

impl MatrixStack {
    pub async fn start(isolation: &mut Isolation) -> Self {
        let identity_env = service_env(isolation, "identity", POSTGRES);
        let identity = Service::start("usher-identity", &identity_env);
        let mut invitation_env = service_env(isolation, "invitation", POSTGRES);
        invitation_env.push(("USHER_IDENTITY__URL", format!("http://{}", identity.grpc)));
        let invitation = Service::start("usher-invitation", &invitation_env);
        let notification = Service::start(
            "usher-notification",
            &service_env(isolation, "notification", POSTGRES),
        );
        let gateway = Service::start(
            "usher-gateway",
            &[
                ("USHER_REDIS__KEY_PREFIX", isolation.redis_prefix()),
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
                ("USHER_RATE_LIMITS__ENABLED", "false".to_owned()),
            ],
        );
        for (service, name) in [
            (&identity, "usher.identity.v1.AuthService"),
            (&invitation, "usher.invitation.v1.InvitationService"),
            (&notification, "usher.notification.v1.NotificationService"),
        ] {
            service
                .wait_for(name, ServingStatus::Serving, Duration::from_secs(60))
                .await;
        }
        gateway
            .wait_for("", ServingStatus::Serving, Duration::from_secs(30))
            .await;
        Self {
            identity,
            invitation,
            notification,
            gateway,
            identity_env,
            invitation_env,
        }
    }
}

/// The environment of a service that owns a database.
pub fn service_env(
    iso: &mut Isolation,
    service: &str,
    database_host: &str,
) -> Vec<(&'static str, String)> {
    let db = iso.database(service);
    let mut env = vec![
        (
            "USHER_DATABASE__URL",
            format!("postgres://postgres@{database_host}/{db}"),
        ),
        ("USHER_AMQP__URL", iso.amqp_url()),
    ];
    if service != "notification" {
        env.push(("USHER_REDIS__KEY_PREFIX", iso.redis_prefix()));
    }
    env
}

/// The three services and the gateway, started for one test.
pub struct Stack {
    /// usher-identity.
    pub identity: Service,
    /// usher-invitation.
    pub invitation: Service,
    /// usher-notification.
    pub notification: Service,
    /// usher-gateway.
    pub gateway: Service,
    /// The test's isolated resources, dropped last (after the processes).
    pub _isolation: Isolation,
}

impl Stack {
    /// Starts everything against the shared local servers.
    pub fn start() -> Self {
        let mut isolation = Isolation::new();
        let identity = Service::start(
            "usher-identity",
            &service_env(&mut isolation, "identity", POSTGRES),
        );
        let mut invitation_env = service_env(&mut isolation, "invitation", POSTGRES);
        invitation_env.push(("USHER_IDENTITY__URL", format!("http://{}", identity.grpc)));
        let invitation = Service::start("usher-invitation", &invitation_env);
        let notification = Service::start(
            "usher-notification",
            &service_env(&mut isolation, "notification", POSTGRES),
        );
        let gateway = Service::start(
            "usher-gateway",
            &[
                ("USHER_REDIS__KEY_PREFIX", isolation.redis_prefix()),
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
            ],
        );
        Self {
            identity,
            invitation,
            notification,
            gateway,
            _isolation: isolation,
        }
    }
}

/// A request carrying a principal assertion for `path`, signed with the
/// development key the binaries trust when no key is configured (as the
/// gateway signs them).
pub fn signed_request<T>(
    path: &str,
    principal: &usher_kit::principal::Principal,
    message: T,
) -> tonic::Request<T> {
    use usher_kit::principal::{ASSERTION_HEADER, AssertionConfig};
    #[allow(clippy::disallowed_methods)]
    let now = chrono::Utc::now();
    let token = AssertionConfig::default()
        .signer("usher-gateway")
        .expect("development signer")
        .sign(principal, path, None, now);
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert(ASSERTION_HEADER, token.parse().expect("ascii"));
    request
}

/// [`signed_request`] for an admin of a made-up account holding every permission.
pub fn admin_request<T>(path: &str, message: T) -> tonic::Request<T> {
    use usher_kit::principal::{Principal, PrincipalKind};
    let principal = Principal {
        kind: PrincipalKind::User,
        account_id: Some(uuid::Uuid::new_v4()),
        user_id: Some(uuid::Uuid::new_v4()),
        credential_id: None,
        permissions: [
            "users.read",
            "users.invite",
            "users.manage",
            "roles.manage",
            "teams.manage",
            "account.manage",
            "audit.read",
        ]
        .map(String::from)
        .to_vec(),
        service: None,
        password_change_required: false,
    };
    signed_request(path, &principal, message)
}

/// One HTTP/1.1 exchange with the gateway, as a browser would make it:
/// returns the status, the headers (lower-case names) and the body.
pub async fn http(
    gateway: &Service,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(gateway.grpc)
        .await
        .expect("connect");
    let mut request = format!(
        "{method} {target} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
        gateway.grpc,
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    stream.write_all(&bytes).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .expect("answered in time")
        .expect("read");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("head and body");
    let head = String::from_utf8(raw[..split].to_vec()).expect("ascii head");
    let mut body = &raw[split + 4..];
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    if header(&headers, "transfer-encoding") != "chunked" {
        return (status, headers, body.to_vec());
    }
    // Chunked: `<hex size>\r\n<bytes>\r\n` until a zero size.
    let mut decoded = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size_text = std::str::from_utf8(&body[..line_end]).expect("ascii size");
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .expect("hex chunk size");
        body = &body[line_end + 2..];
        if size == 0 {
            break;
        }
        decoded.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
    (status, headers, decoded)
}

/// The value of header `name` (lower case) in `headers`, or empty.
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map_or("", |(_, v)| v.as_str())
}

/// The password every test account's owner is created with.
pub const OWNER_PASSWORD: &str = "correct horse battery";

/// The embedding platform's back end, as identity sees it.
pub fn platform() -> usher_kit::principal::Principal {
    use usher_kit::principal::{Principal, PrincipalKind};
    Principal {
        kind: PrincipalKind::Platform,
        credential_id: Some("it-platform".into()),
        ..Principal::anonymous()
    }
}

/// Creates an account straight at identity, as the platform would, owned by
/// `owner_email` (named `owner_name`, password [`OWNER_PASSWORD`]).
pub async fn create_account(
    identity: &Service,
    slug: &str,
    name: &str,
    owner_email: &str,
    owner_name: &str,
    seats: i32,
) {
    use usher_proto::identity::v1::{
        CreateAccountRequest, account_service_client::AccountServiceClient,
    };
    AccountServiceClient::new(identity.channel())
        .create_account(signed_request(
            "/usher.identity.v1.AccountService/CreateAccount",
            &platform(),
            CreateAccountRequest {
                name: name.into(),
                slug: slug.into(),
                owner_email: owner_email.into(),
                owner_display_name: owner_name.into(),
                owner_password: OWNER_PASSWORD.into(),
                seat_limit: seats,
                ..Default::default()
            },
        ))
        .await
        .expect("account created");
}

/// Signs in through the gateway; returns the access token.
pub async fn sign_in(
    gateway: &Service,
    slug: &str,
    login: usher_proto::identity::v1::sign_in_request::Login,
    password: &str,
) -> String {
    use usher_proto::identity::v1::{SignInRequest, auth_service_client::AuthServiceClient};
    AuthServiceClient::new(gateway.channel())
        .sign_in(SignInRequest {
            account_slug: slug.into(),
            login: Some(login),
            password: password.into(),
        })
        .await
        .expect("signed in")
        .into_inner()
        .session
        .expect("session")
        .access_token
}

/// `message` with `authorization: Bearer <token>`.
pub fn bearer<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        tonic::metadata::MetadataValue::try_from(format!("Bearer {token}")).expect("ascii"),
    );
    request
}

/// The id of the account's role named `name`, listed through the gateway.
pub async fn role_id(gateway: &Service, token: &str, name: &str) -> String {
    use usher_proto::identity::v1::{ListRolesRequest, role_service_client::RoleServiceClient};
    RoleServiceClient::new(gateway.channel())
        .list_roles(bearer(token, ListRolesRequest::default()))
        .await
        .expect("roles")
        .into_inner()
        .roles
        .into_iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no role {name}"))
        .id
}

/// A TCP proxy to a shared server that a test can cut and restore, so a
/// service loses its dependency without the machine's server being stopped.
pub struct TcpProxy {
    /// The proxy's port on 127.0.0.1.
    pub port: u16,
    state: std::sync::Arc<ProxyState>,
    accept: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct ProxyState {
    cut: std::sync::atomic::AtomicBool,
    open: std::sync::Mutex<Vec<tokio::task::AbortHandle>>,
}

impl TcpProxy {
    /// Forwards 127.0.0.1:`port` to `target`.
    pub async fn start(target: &str) -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let state = std::sync::Arc::new(ProxyState::default());
        let target = target.to_owned();
        let shared = state.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if shared.cut.load(Ordering::SeqCst) {
                    // Refused: the connection is dropped at once.
                    continue;
                }
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                shared.open.lock().expect("lock").push(task.abort_handle());
            }
        });
        Self {
            port,
            state,
            accept,
        }
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.state
            .cut
            .store(true, std::sync::atomic::Ordering::SeqCst);
        for task in self.state.open.lock().expect("lock").drain(..) {
            task.abort();
        }
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.state
            .cut
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// The `ErrorInfo` reason of a refusal, or empty.
pub fn reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .error_info()
        .map(|info| info.reason.clone())
        .unwrap_or_default()
}

/// identity (its environment plus `identity_extra`) and a gateway in front
/// of it (sharing its Redis key prefix, plus `gateway_extra`), both serving.
/// Returns identity's environment too (for `usher platform-keys create`).
pub async fn identity_and_gateway(
    isolation: &mut Isolation,
    identity_extra: &[(&'static str, String)],
    gateway_extra: &[(&'static str, String)],
) -> (Service, Vec<(&'static str, String)>, Service) {
    let mut identity_env = service_env(isolation, "identity", POSTGRES);
    identity_env.extend_from_slice(identity_extra);
    let identity = Service::start("usher-identity", &identity_env);
    // Same key prefix as identity: the gateway reads identity's sessions.
    let mut gateway_env = vec![
        ("USHER_REDIS__KEY_PREFIX", isolation.redis_prefix()),
        (
            "USHER_UPSTREAMS__IDENTITY",
            format!("http://{}", identity.grpc),
        ),
    ];
    gateway_env.extend_from_slice(gateway_extra);
    let gateway = Service::start("usher-gateway", &gateway_env);
    identity
        .wait_for(
            "usher.identity.v1.AuthService",
            ServingStatus::Serving,
            Duration::from_secs(60),
        )
        .await;
    gateway
        .wait_for("", ServingStatus::Serving, Duration::from_secs(30))
        .await;
    (identity, identity_env, gateway)
}

/// A connection to the test's vhost with durable queues of our own bound
/// as `bindings` (queue, exchange, routing key), as another pipeline would
/// bind them; the exchanges are declared as the services declare them.
pub async fn bound_queues(
    isolation: &Isolation,
    name: &'static str,
    bindings: &[(&str, &str, &str)],
) -> usher_kit::amqp::Amqp {
    use usher_kit::{
        amqp::{Amqp, QueueSpec, Topology},
        config::{AmqpConfig, Secret},
    };
    let amqp = Amqp::start(
        AmqpConfig {
            url: Secret::new(isolation.amqp_url()),
            ..AmqpConfig::default()
        },
        name,
    );
    amqp.wait_connected(Duration::from_secs(10))
        .await
        .expect("broker");
    let mut topology = Topology::new();
    for (queue, exchange, key) in bindings {
        topology = topology
            .topic_exchange(*exchange)
            .queue(QueueSpec::durable(*queue))
            .bind(*queue, *exchange, *key);
    }
    amqp.declare(topology).await.expect("bound");
    amqp
}
