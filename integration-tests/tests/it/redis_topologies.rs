//! The whole stack on a real Redis Sentinel group and on a real Redis
//! Cluster (kit's `testing::topologies`), with `redis.wait_replicas = 1`:
//! invitations are created through the gateway (the caller's session, the
//! rate-limit counters and the links' tokens all in that Redis), and
//! accepted as their emails arrive, while the master fails over. The services follow the new master within seconds
//! without a restart, and nothing acknowledged is lost: every invitation
//! whose create was answered OK is emailed and its link works (from
//! PostgreSQL if a forced failover dropped its Redis key), and the session
//! signed in before the failover still works after it.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tonic_health::pb::health_check_response::ServingStatus;
use usher_kit::testing::topologies::{RedisCluster, SentinelGroup};
use usher_proto::{
    identity::v1::{SignInRequest, auth_service_client::AuthServiceClient, sign_in_request::Login},
    invitation::v1::{self as pb, invitation_service_client::InvitationServiceClient},
};

use crate::{
    harness::{
        Isolation, OWNER_PASSWORD, POSTGRES, Service, create_account, reason, role_id, service_env,
        sign_in, upstreams,
    },
    journey::{BASE_URL, link_token},
    replicas::invite,
    smtp_sink::SmtpSink,
};

/// The password invitees choose.
const MEMBER_PASSWORD: &str = "a long enough passphrase";

/// The stack on one Redis URL.
struct OnRedis {
    identity: Service,
    invitation: Service,
    notification: Service,
    gateway: Service,
    sink: Arc<SmtpSink>,
    _isolation: Isolation,
}

impl OnRedis {
    async fn start(redis_url: &str) -> Self {
        let sink = Arc::new(SmtpSink::start().await);
        let mut isolation = Isolation::new();
        let redis = [
            ("USHER_REDIS__URL", redis_url.to_owned()),
            ("USHER_REDIS__WAIT_REPLICAS", "1".to_owned()),
            ("USHER_REDIS__WAIT_TIMEOUT_MS", "1000".to_owned()),
        ];
        let mut identity_env = service_env(&mut isolation, "identity", POSTGRES);
        identity_env.extend(redis.clone());
        identity_env.push(("USHER_LINKS__PUBLIC_BASE_URL", BASE_URL.to_owned()));
        let identity = Service::start("usher-identity", &identity_env);
        let mut invitation_env = service_env(&mut isolation, "invitation", POSTGRES);
        invitation_env.extend(redis.clone());
        invitation_env.extend([
            ("USHER_IDENTITY__URL", format!("http://{}", identity.grpc)),
            ("USHER_LINKS__PUBLIC_BASE_URL", BASE_URL.to_owned()),
            ("USHER_INVITATIONS__HOURLY_QUOTA", "100000".to_owned()),
        ]);
        let invitation = Service::start("usher-invitation", &invitation_env);
        let mut notification_env = service_env(&mut isolation, "notification", POSTGRES);
        notification_env.extend([
            ("USHER_SMTP__PORT", sink.port.to_string()),
            ("USHER_LINKS__PUBLIC_BASE_URL", BASE_URL.to_owned()),
        ]);
        let notification = Service::start("usher-notification", &notification_env);
        let mut gateway_env = upstreams(&identity, &invitation, &notification);
        gateway_env.extend([
            ("USHER_REDIS__KEY_PREFIX", isolation.redis_prefix()),
            // Counted in this Redis, high enough never to refuse the test.
            ("USHER_RATE_LIMITS__PUBLIC__LIMIT", "100000".to_owned()),
            ("USHER_RATE_LIMITS__INVITATIONS__LIMIT", "100000".to_owned()),
        ]);
        gateway_env.extend(redis);
        let gateway = Service::start("usher-gateway", &gateway_env);
        for (service, name) in [
            (&identity, "usher.identity.v1.AuthService"),
            (&invitation, "usher.invitation.v1.InvitationService"),
            (&notification, "usher.notification.v1.NotificationService"),
            (&gateway, ""),
        ] {
            service
                .wait_for(name, ServingStatus::Serving, Duration::from_secs(60))
                .await;
        }
        Self {
            identity,
            invitation,
            notification,
            gateway,
            sink,
            _isolation: isolation,
        }
    }

    /// Creates invitations through the gateway from four clients while
    /// `fail_over` runs, until creates have succeeded for three seconds in
    /// a row after it; then checks that nothing acknowledged was lost.
    /// Returns how long creates failed after the failover began.
    async fn through_a_failover(&self, slug: &str, fail_over: impl FnOnce() + Send) -> f64 {
        let owner = format!("owner@{slug}.example");
        create_account(&self.identity, slug, slug, &owner, "Oona Owner", 10_000).await;
        let token = sign_in(&self.gateway, slug, Login::Email(owner), OWNER_PASSWORD).await;
        let role = role_id(&self.gateway, &token, "User").await;

        let created: Arc<Mutex<Vec<String>>> = Arc::default();
        let failed: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let clients: Vec<_> = (0..4)
            .map(|client| {
                let mut invitations = InvitationServiceClient::new(self.gateway.channel());
                let (token, role, slug) = (token.clone(), role.clone(), slug.to_owned());
                let (created, failed, stop) = (created.clone(), failed.clone(), stop_rx.clone());
                tokio::spawn(async move {
                    let mut n = 0;
                    while !*stop.borrow() {
                        n += 1;
                        let email = format!("c{client}n{n}@{slug}.example");
                        match invite(&mut invitations, &token, &role, &email).await {
                            Ok(result) => {
                                assert!(result.invitation.is_some(), "created: {result:?}");
                                created.lock().expect("lock").push(email);
                            }
                            Err(status) => {
                                failed
                                    .lock()
                                    .expect("lock")
                                    .push((Instant::now(), format!("{status:?}")));
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                })
            })
            .collect();
        // And one invitee after another accepts, as their email arrives.
        let accepted_so_far = Arc::new(AtomicUsize::new(0));
        let accepter = {
            let (sink, created, stop) = (self.sink.clone(), created.clone(), stop_rx.clone());
            let accepted_so_far = accepted_so_far.clone();
            let mut public = InvitationServiceClient::new(self.gateway.channel());
            let mut auth = AuthServiceClient::new(self.gateway.channel());
            let slug = slug.to_owned();
            tokio::spawn(async move {
                let mut accepted = Vec::new();
                let mut unavailable = 0;
                let mut pending: Option<(String, String, bool)> = None;
                while !*stop.borrow() {
                    let Some((email, link, retried)) = pending.take().or_else(|| {
                        let created = created.lock().expect("lock").clone();
                        let messages = sink.messages();
                        created
                            .iter()
                            .filter(|email| !accepted.contains(*email))
                            .find_map(|email| {
                                let message = messages.iter().find(|m| m.to.contains(email))?;
                                let parsed = mail_parser::MessageParser::default()
                                    .parse(&message.data)
                                    .expect("a parsable email");
                                let text = parsed.body_text(0).expect("a text part");
                                Some((email.clone(), link_token(&text, "/invite"), false))
                            })
                    }) else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    let answer = public
                        .accept_invitation(pb::AcceptInvitationRequest {
                            token: link.clone(),
                            display_name: "New Member".into(),
                            password: MEMBER_PASSWORD.into(),
                            ..Default::default()
                        })
                        .await;
                    match answer {
                        Ok(_) => {
                            accepted.push(email);
                            accepted_so_far.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(status) if status.code() == tonic::Code::Unavailable => {
                            unavailable += 1;
                            pending = Some((email, link, true));
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        // An earlier attempt answered UNAVAILABLE after the
                        // member was activated (only the session failed):
                        // the link is used, and the member signs in.
                        Err(status) if retried && reason(&status) == "INVITATION_NOT_USABLE" => {
                            auth.sign_in(SignInRequest {
                                account_slug: slug.clone(),
                                login: Some(Login::Email(email.clone())),
                                password: MEMBER_PASSWORD.into(),
                            })
                            .await
                            .expect("the member of an accept cut short signs in");
                            accepted.push(email);
                            accepted_so_far.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(status) => panic!("accept of {email}: {status:?}"),
                    }
                }
                (accepted.len(), unavailable)
            })
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = created.lock().expect("lock").len();
        assert!(before > 0, "creates went through before the failover");
        let failing_from = Instant::now();
        tokio::task::block_in_place(fail_over);
        // Until creates have succeeded for three seconds in a row, and
        // accepts went through after the failover began.
        let accepted_before = accepted_so_far.load(Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let last_failure = failed.lock().expect("lock").last().map(|(at, _)| *at);
            let quiet = last_failure.map_or(failing_from, |at| at.max(failing_from));
            if quiet.elapsed() > Duration::from_secs(3)
                && created.lock().expect("lock").len() > before
                && accepted_so_far.load(Ordering::SeqCst) > accepted_before
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "creates or accepts never recovered: {:?}, {} accepted",
                failed.lock().expect("lock").last(),
                accepted_so_far.load(Ordering::SeqCst)
            );
        }
        stop_tx.send(true).expect("stop");
        for client in clients {
            client.await.expect("client");
        }
        let (accepted, accepts_unavailable) = accepter.await.expect("accepter");
        let failures = failed.lock().expect("lock").clone();
        let outage = failures
            .iter()
            .map(|(at, _)| at.saturating_duration_since(failing_from).as_secs_f64())
            .fold(0.0, f64::max);
        for (_, status) in &failures {
            assert!(
                status.contains("Unavailable"),
                "a create during the failover fails as UNAVAILABLE: {status}"
            );
        }
        let created = created.lock().expect("lock").clone();
        eprintln!(
            "{slug}: {} creates OK, {} UNAVAILABLE, creates failed for {outage:.2} s; \
             {accepted} accepted meanwhile ({accepts_unavailable} attempts UNAVAILABLE, retried)",
            created.len(),
            failures.len()
        );

        // Every acknowledged invitation is emailed, and its link works.
        let deadline = Instant::now() + Duration::from_secs(60);
        let links = loop {
            let messages = self.sink.messages();
            let links: Vec<String> = created
                .iter()
                .filter_map(|email| {
                    messages.iter().find(|m| m.to.contains(email)).map(|m| {
                        let parsed = mail_parser::MessageParser::default()
                            .parse(&m.data)
                            .expect("a parsable email");
                        link_token(&parsed.body_text(0).expect("a text part"), "/invite")
                    })
                })
                .collect();
            if links.len() == created.len() {
                break links;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {} invitees never emailed",
                created.len() - links.len(),
                created.len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        // Every link not used by the accepter works; the used ones answer
        // as used links do.
        let mut public = InvitationServiceClient::new(self.gateway.channel());
        let mut usable = Vec::new();
        for link in &links {
            match public
                .preview_invitation(pb::PreviewInvitationRequest {
                    token: link.clone(),
                })
                .await
            {
                Ok(_) => usable.push(link.clone()),
                Err(status) => assert_eq!(reason(&status), "INVITATION_NOT_USABLE"),
            }
        }
        assert_eq!(
            usable.len(),
            links.len() - accepted,
            "every link is usable but the accepted ones"
        );
        let fallbacks: f64 = crate::health::scrape(self.invitation.metrics)
            .await
            .lines()
            .filter(|line| line.starts_with("usher_invitation_token_key_misses_total"))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        eprintln!("{slug}: {fallbacks} links found in PostgreSQL after Redis lost their key");
        // Accepting signs the new member in: a session written after the
        // failover.
        for link in usable.iter().rev().take(3) {
            public
                .accept_invitation(pb::AcceptInvitationRequest {
                    token: link.clone(),
                    display_name: "New Member".into(),
                    password: MEMBER_PASSWORD.into(),
                    ..Default::default()
                })
                .await
                .expect("accepted after the failover");
        }
        // The session signed in before the failover still works.
        role_id(&self.gateway, &token, "User").await;
        outage
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_stack_follows_a_sentinel_failover_and_loses_no_acknowledged_write() {
    let group = tokio::task::spawn_blocking(SentinelGroup::start)
        .await
        .expect("join")
        .expect("sentinel group");
    let stack = OnRedis::start(&group.url()).await;
    let before = group.master_port().expect("master");
    let outage = stack
        .through_a_failover("sentinel", || {
            group.fail_over().expect("failover");
            // The old master rejoins as the new one's replica: until it
            // has, no write is acknowledged by a replica (wait_replicas 1).
            group.wait_settled().expect("a replica again");
        })
        .await;
    assert_ne!(group.master_port().expect("master"), before);
    assert!(outage < 20.0, "recovered within seconds: {outage:.2} s");
    drop((stack.invitation, stack.notification));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_stack_follows_a_cluster_failover_and_loses_no_acknowledged_write() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .expect("join")
        .expect("cluster");
    let stack = OnRedis::start(&cluster.url()).await;
    let outage = stack
        .through_a_failover("cluster", || {
            // Every master hands over to its replica, one after the other.
            let replicas: Vec<_> = cluster
                .nodes
                .iter()
                .filter(|node| {
                    node.query::<String>(redis::cmd("INFO").arg("replication"))
                        .is_ok_and(|info| info.contains("role:slave"))
                })
                .collect();
            for replica in replicas {
                let _: String = replica
                    .query(redis::cmd("CLUSTER").arg("FAILOVER"))
                    .expect("failover");
                usher_kit::testing::topologies::wait_for("the replica to take over", || {
                    replica
                        .query::<String>(redis::cmd("INFO").arg("replication"))
                        .is_ok_and(|info| info.contains("role:master"))
                })
                .expect("promoted");
            }
        })
        .await;
    assert!(outage < 20.0, "recovered within seconds: {outage:.2} s");
    drop((stack.invitation, stack.notification));
}
