//! Two replicas of every binary on the shared PostgreSQL, Redis and
//! RabbitMQ, as the Helm chart runs them: each service's replicas behind a
//! [`Balancer`] that spreads connections over them (a Kubernetes Service),
//! and load through both gateways. Nothing is done twice and nothing is
//! lost: every invitation is emailed once, every event published once,
//! `invitation.expired` once although both replicas sweep, and the
//! gateways' rate limits and invitation's hourly quota are counted once for
//! all replicas. Then a rolling restart under load — SIGTERM to one replica
//! at a time, as Kubernetes does — loses no invitation whose create was
//! answered OK, and no email.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use usher_kit::amqp::EVENTS_EXCHANGE;
use usher_proto::{
    identity::v1::{
        SignInRequest, UpdateAccountRequest, account_service_client::AccountServiceClient,
        auth_service_client::AuthServiceClient, sign_in_request::Login,
    },
    invitation::v1::{self as pb, invitation_service_client::InvitationServiceClient},
};

use crate::{
    harness::{
        Isolation, OWNER_PASSWORD, POSTGRES, Service, bearer, bound_queues, create_account,
        role_id, service_env,
    },
    journey::BASE_URL,
    smtp_sink::SmtpSink,
};

/// Each account's hourly invitation quota, on both invitation replicas.
const QUOTA: usize = 100;
/// Calls through the gateways' public limit, per client address per minute.
const PUBLIC_LIMIT: usize = 10;
/// Generous: the machine is shared and loaded.
const DEADLINE: Duration = Duration::from_secs(120);

/// A TCP load balancer in front of a service's replicas, as a Kubernetes
/// Service: each new connection goes to the replica with the fewest open
/// connections (the next in turn on a tie), or to another when that one
/// refuses (stopped). A connection stays with its replica until either side
/// closes it, as gRPC's HTTP/2 connections do. Fewest-connections rather
/// than plain turns, so the callers' connections spread over both replicas
/// whatever other connections (health probes, reconnects) came first.
pub struct Balancer {
    /// The address callers use.
    pub addr: SocketAddr,
    accept: tokio::task::JoinHandle<()>,
    open: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Balancer {
    /// Balances 127.0.0.1:<port> over `backends`.
    pub async fn start(backends: Vec<SocketAddr>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let open: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let connections = open.clone();
        // Open connections per backend.
        let load: Arc<Vec<AtomicUsize>> =
            Arc::new(backends.iter().map(|_| AtomicUsize::new(0)).collect());
        let accept = tokio::spawn(async move {
            let next = AtomicUsize::new(0);
            while let Ok((mut inbound, _)) = listener.accept().await {
                let turn = next.fetch_add(1, Ordering::SeqCst);
                let count = backends.len();
                let mut order: Vec<usize> = (0..count).map(|i| (turn + i) % count).collect();
                order.sort_by_key(|&i| load[i].load(Ordering::SeqCst));
                // Counted at once, so the next connection (accepted before
                // this one's connect completes) sees it.
                load[order[0]].fetch_add(1, Ordering::SeqCst);
                let backends = backends.clone();
                let load = load.clone();
                let task = tokio::spawn(async move {
                    for (n, i) in order.into_iter().enumerate() {
                        if n > 0 {
                            load[i].fetch_add(1, Ordering::SeqCst);
                        }
                        let connect = tokio::time::timeout(
                            Duration::from_secs(1),
                            tokio::net::TcpStream::connect(backends[i]),
                        )
                        .await;
                        if let Ok(Ok(mut outbound)) = connect {
                            let _ = outbound.set_nodelay(true);
                            let _ = inbound.set_nodelay(true);
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                            load[i].fetch_sub(1, Ordering::SeqCst);
                            return;
                        }
                        load[i].fetch_sub(1, Ordering::SeqCst);
                    }
                });
                connections.lock().expect("lock").push(task.abort_handle());
            }
        });
        Self { addr, accept, open }
    }

    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A channel through the balancer.
    pub fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(self.url())
            .expect("endpoint")
            .connect_timeout(Duration::from_secs(1))
            .connect_lazy()
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.accept.abort();
        for task in self.open.lock().expect("lock").drain(..) {
            task.abort();
        }
    }
}

/// A binary's environment and its two replicas.
type Pair = (Vec<(&'static str, String)>, [Service; 2]);

/// Two replicas of each binary, each service behind its [`Balancer`].
struct Replicas {
    sink: SmtpSink,
    /// (binary, environment, its two replicas) in the order a rolling
    /// restart goes: identity, invitation, notification, gateway.
    services: Vec<Pair>,
    /// The gateways' balancer: where clients call.
    front: Balancer,
    _balancers: Vec<Balancer>,
    isolation: Isolation,
}

impl Replicas {
    async fn start() -> Self {
        let sink = SmtpSink::start().await;
        let mut isolation = Isolation::new();
        let pair = |name: &'static str, env: &[(&'static str, String)]| {
            [Service::start(name, env), Service::start(name, env)]
        };
        let mut identity_env = service_env(&mut isolation, "identity", POSTGRES);
        identity_env.extend([
            ("USHER_LINKS__PUBLIC_BASE_URL", BASE_URL.to_owned()),
            (
                "USHER_ACCOUNTS__MIN_INVITATION_LIFETIME_SECS",
                "1".to_owned(),
            ),
        ]);
        let identity = pair("usher-identity", &identity_env);
        let identity_lb = Balancer::start(identity.iter().map(|s| s.grpc).collect()).await;

        let mut invitation_env = service_env(&mut isolation, "invitation", POSTGRES);
        invitation_env.extend([
            ("USHER_IDENTITY__URL", identity_lb.url()),
            ("USHER_LINKS__PUBLIC_BASE_URL", BASE_URL.to_owned()),
            ("USHER_INVITATIONS__HOURLY_QUOTA", QUOTA.to_string()),
            // Both replicas look for expired invitations every second.
            ("USHER_INVITATIONS__EXPIRY_SWEEP_SECS", "1".to_owned()),
        ]);
        let invitation = pair("usher-invitation", &invitation_env);
        let invitation_lb = Balancer::start(invitation.iter().map(|s| s.grpc).collect()).await;

        let mut notification_env = service_env(&mut isolation, "notification", POSTGRES);
        notification_env.extend([
            ("USHER_SMTP__PORT", sink.port.to_string()),
            ("USHER_LINKS__PUBLIC_BASE_URL", BASE_URL.to_owned()),
        ]);
        let notification = pair("usher-notification", &notification_env);
        let notification_lb = Balancer::start(notification.iter().map(|s| s.grpc).collect()).await;

        let gateway_env = vec![
            ("USHER_REDIS__KEY_PREFIX", isolation.redis_prefix()),
            ("USHER_UPSTREAMS__IDENTITY", identity_lb.url()),
            ("USHER_UPSTREAMS__INVITATION", invitation_lb.url()),
            ("USHER_UPSTREAMS__NOTIFICATION", notification_lb.url()),
            // Behind a load balancer: the client's address is the last
            // `x-forwarded-for` hop, so each client of the test has its own.
            ("USHER_RATE_LIMITS__TRUST_FORWARDED_FOR", "true".to_owned()),
            ("USHER_RATE_LIMITS__PUBLIC__LIMIT", PUBLIC_LIMIT.to_string()),
            ("USHER_RATE_LIMITS__INVITATIONS__LIMIT", "100000".to_owned()),
        ];
        let gateway = pair("usher-gateway", &gateway_env);
        let front = Balancer::start(gateway.iter().map(|s| s.grpc).collect()).await;

        let services = vec![
            (identity_env, identity),
            (invitation_env, invitation),
            (notification_env, notification),
            (gateway_env, gateway),
        ];
        for (_, replicas) in &services {
            for replica in replicas {
                replica
                    .wait_for(
                        readiness(replica.name),
                        ServingStatus::Serving,
                        Duration::from_secs(60),
                    )
                    .await;
            }
        }
        Self {
            sink,
            services,
            front,
            _balancers: vec![identity_lb, invitation_lb, notification_lb],
            isolation,
        }
    }

    /// The replicas of a binary.
    fn replicas(&self, name: &str) -> &[Service; 2] {
        &self
            .services
            .iter()
            .find(|(_, replicas)| replicas[0].name == name)
            .expect("a started binary")
            .1
    }

    /// An account (seat limit 10,000) whose owner is signed in through the
    /// gateways (as client `client`, an `x-forwarded-for` address); returns
    /// the owner's access token and the id of the role `User`.
    async fn account(&self, slug: &str, client: &str) -> (String, String) {
        let owner = format!("owner@{slug}.example");
        create_account(
            &self.replicas("usher-identity")[0],
            slug,
            slug,
            &owner,
            "Oona Owner",
            10_000,
        )
        .await;
        let mut request = tonic::Request::new(SignInRequest {
            account_slug: slug.to_owned(),
            login: Some(Login::Email(owner)),
            password: OWNER_PASSWORD.into(),
        });
        request
            .metadata_mut()
            .insert("x-forwarded-for", client.parse().expect("ascii"));
        let token = AuthServiceClient::new(self.front.channel())
            .sign_in(request)
            .await
            .expect("signed in")
            .into_inner()
            .session
            .expect("session")
            .access_token;
        let role = role_id(&self.replicas("usher-gateway")[0], &token, "User").await;
        (token, role)
    }

    /// Waits until every address of `expected` has an email, then (after
    /// a second for late duplicates) returns how many each address got.
    async fn emails_to(&self, expected: &[String]) -> BTreeMap<String, usize> {
        let tally = || {
            let mut received: BTreeMap<String, usize> = BTreeMap::new();
            for to in self.sink.messages().into_iter().flat_map(|m| m.to) {
                *received.entry(to).or_default() += 1;
            }
            received
        };
        let started = tokio::time::Instant::now();
        loop {
            let received = tally();
            if expected.iter().all(|a| received.contains_key(a)) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                return tally();
            }
            let missing = expected
                .iter()
                .filter(|a| !received.contains_key(*a))
                .count();
            assert!(
                started.elapsed() < DEADLINE,
                "{missing} of {} invitees never emailed",
                expected.len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The health service whose SERVING means a binary is ready: its schema
/// applied and its dependencies reached (the empty name is liveness only).
fn readiness(binary: &str) -> &'static str {
    match binary {
        "usher-identity" => "usher.identity.v1.AuthService",
        "usher-invitation" => "usher.invitation.v1.InvitationService",
        "usher-notification" => "usher.notification.v1.NotificationService",
        _ => "",
    }
}

/// Creates one invitation for `email`; the invitation's id, or the refusal.
pub async fn invite(
    client: &mut InvitationServiceClient<tonic::transport::Channel>,
    token: &str,
    role: &str,
    email: &str,
) -> Result<pb::InviteeResult, tonic::Status> {
    let response = client
        .create_invitations(bearer(
            token,
            pb::CreateInvitationsRequest {
                raw_text: email.to_owned(),
                role_id: role.to_owned(),
                ..Default::default()
            },
        ))
        .await?
        .into_inner();
    Ok(response.results.into_iter().next().expect("one result"))
}

/// The `cloudEvents_subject` (the invitation's id) of every message on
/// `queue`, as they are now.
async fn subjects(amqp: &usher_kit::amqp::Amqp, queue: &str) -> Vec<String> {
    let channel = amqp.channel().await.expect("channel");
    let mut subjects = Vec::new();
    while let Some(message) = channel
        .basic_get(
            queue.into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .expect("basic_get")
    {
        let headers = message
            .delivery
            .properties
            .headers()
            .clone()
            .expect("headers");
        let subject = headers
            .inner()
            .get("cloudEvents_subject")
            .and_then(|v| v.as_long_string())
            .map(ToString::to_string)
            .expect("a subject");
        subjects.push(subject);
    }
    subjects
}

/// How many times each item of `items` occurs.
fn counts(items: impl IntoIterator<Item = String>) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for item in items {
        *counts.entry(item).or_default() += 1;
    }
    counts
}

/// How many of a service's calls of `method` one replica answered, read
/// from its metrics.
async fn answered(service: &Service, method: &str) -> u64 {
    crate::health::scrape(service.metrics)
        .await
        .lines()
        .filter(|line| line.starts_with("usher_grpc_requests_total{") && line.contains(method))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|n| n as u64)
        .sum()
}

#[tokio::test]
async fn two_replicas_of_everything_do_nothing_twice_and_lose_nothing_in_a_rolling_restart() {
    let stack = Replicas::start().await;
    let events = bound_queues(
        &stack.isolation,
        "it-replicas",
        &[
            ("it.created", EVENTS_EXCHANGE, "invitation.created"),
            ("it.expired", EVENTS_EXCHANGE, "invitation.expired"),
        ],
    )
    .await;

    // Load through both gateways: 40 invitations in an account whose
    // links live 4 seconds, 8 calls at a time.
    let (token, role) = stack.account("steady", "198.51.100.1").await;
    AccountServiceClient::new(stack.front.channel())
        .update_account(bearer(
            &token,
            UpdateAccountRequest {
                invitation_lifetime: Some(prost_types::Duration {
                    seconds: 4,
                    nanos: 0,
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["invitation_lifetime".into()],
                }),
                ..Default::default()
            },
        ))
        .await
        .expect("short links");
    let gateways = stack.replicas("usher-gateway");
    let addresses: Vec<String> = (0..40).map(|i| format!("s{i}@steady.example")).collect();
    let created: Vec<String> =
        futures::future::join_all(addresses.chunks(5).enumerate().map(|(n, chunk)| {
            let mut client = InvitationServiceClient::new(gateways[n % 2].channel());
            let (token, role) = (token.clone(), role.clone());
            async move {
                let mut ids = Vec::new();
                for email in chunk {
                    let result = invite(&mut client, &token, &role, email)
                        .await
                        .expect("created");
                    ids.push(result.invitation.expect("invited").id);
                }
                ids
            }
        }))
        .await
        .into_iter()
        .flatten()
        .collect();
    for replica in stack.replicas("usher-invitation") {
        assert!(
            answered(replica, "CreateInvitations").await > 0,
            "the load reached both invitation replicas"
        );
    }
    let emails = stack.emails_to(&addresses).await;
    for address in &addresses {
        assert_eq!(emails[address], 1, "{address} emailed once");
    }
    // Created once each; expired once each although both replicas sweep.
    let mut expired = Vec::new();
    let started = tokio::time::Instant::now();
    while expired.len() < created.len() && started.elapsed() < DEADLINE {
        tokio::time::sleep(Duration::from_secs(1)).await;
        expired.extend(subjects(&events, "it.expired").await);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    expired.extend(subjects(&events, "it.expired").await);
    let expected = counts(created.iter().cloned());
    assert_eq!(
        counts(subjects(&events, "it.created").await),
        expected,
        "invitation.created once per invitation"
    );
    assert_eq!(
        counts(expired),
        expected,
        "invitation.expired once per invitation"
    );

    // Limits are counted once for all replicas. The hourly quota: six calls
    // of 25 invitees, three through each gateway, invite QUOTA in all.
    let (quota_token, quota_role) = stack.account("quota", "198.51.100.2").await;
    let invited: i32 = futures::future::join_all((0..6).map(|n| {
        let mut client = InvitationServiceClient::new(gateways[n % 2].channel());
        let token = quota_token.clone();
        let role = quota_role.clone();
        async move {
            let raw_text = (0..25)
                .map(|i| format!("q{n}-{i}@quota.example"))
                .collect::<Vec<_>>()
                .join("\n");
            client
                .create_invitations(bearer(
                    &token,
                    pb::CreateInvitationsRequest {
                        raw_text,
                        role_id: role,
                        ..Default::default()
                    },
                ))
                .await
                .expect("answered")
                .into_inner()
                .invited_count
        }
    }))
    .await
    .into_iter()
    .sum();
    assert_eq!(
        usize::try_from(invited).expect("count"),
        QUOTA,
        "one quota for both replicas"
    );
    // The gateways' public limit: one client calling through both gateways
    // gets PUBLIC_LIMIT calls a minute in all.
    let mut limited = 0;
    for n in 0..PUBLIC_LIMIT + 6 {
        let mut request = tonic::Request::new(pb::PreviewInvitationRequest {
            token: "no-such-token".into(),
        });
        request
            .metadata_mut()
            .insert("x-forwarded-for", "203.0.113.9".parse().expect("ascii"));
        let answer = InvitationServiceClient::new(gateways[n % 2].channel())
            .preview_invitation(request)
            .await
            .expect_err("no such invitation");
        if answer.code() == Code::ResourceExhausted {
            limited += 1;
        }
    }
    assert_eq!(limited, 6, "one budget for both gateways");

    // A rolling restart under load: four clients create invitations one
    // per call through the gateways' balancer while each replica of each
    // binary is stopped with SIGTERM and started again, in turn.
    let mut accounts = Vec::new();
    for n in 0..12 {
        accounts.push(
            stack
                .account(&format!("rolling{n}"), &format!("198.51.100.{}", 10 + n))
                .await,
        );
    }
    let accounts = Arc::new(Mutex::new(accounts));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|worker| {
            let channel = stack.front.channel();
            let accounts = accounts.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut client = InvitationServiceClient::new(channel);
                let (mut ok, mut failed) = (Vec::new(), Vec::new());
                let mut account = accounts.lock().expect("lock").pop();
                let mut used = 0;
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    // A fresh account before this one's quota runs out.
                    if used == QUOTA - 5 {
                        account = accounts.lock().expect("lock").pop();
                        used = 0;
                    }
                    let Some((token, role)) = &account else { break };
                    let email = format!("r{worker}-{n}@rolling.example");
                    n += 1;
                    used += 1;
                    match invite(&mut client, token, role, &email).await {
                        Ok(result) if result.invitation.is_some() => ok.push(email),
                        Ok(result) => panic!("not invited: {result:?}"),
                        Err(status) => {
                            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                            failed.push(email);
                        }
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The processes started again, on the same ports (stopped at the end).
    let mut restarted = Vec::new();
    for (env, replicas) in &stack.services {
        for replica in replicas {
            replica.terminate().await;
            let again = replica.restart(env);
            // Ready (its database, Redis and broker reached), as Kubernetes
            // waits for before stopping the next one.
            again
                .wait_for(
                    readiness(again.name),
                    ServingStatus::Serving,
                    Duration::from_secs(60),
                )
                .await;
            restarted.push(again);
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    let mut ok = Vec::new();
    let mut failed = Vec::new();
    for worker in workers {
        let (o, f) = worker.await.expect("worker");
        ok.extend(o);
        failed.extend(f);
    }
    eprintln!(
        "rolling restart: {} creates answered OK, {} UNAVAILABLE",
        ok.len(),
        failed.len(),
    );
    assert!(ok.len() >= 40, "the load ran through the restarts");
    let emails = stack.emails_to(&ok).await;
    for address in &ok {
        assert_eq!(emails[address], 1, "{address} emailed once");
    }
    // A call refused with UNAVAILABLE was not carried out: its invitee,
    // never told about, is not emailed (a retry would invite them).
    for address in &failed {
        assert!(
            !emails.contains_key(address),
            "{address} refused, yet emailed"
        );
    }
    events.close().await;
}
