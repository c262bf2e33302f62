//! SIGTERM on each service while it is under load (RELIABILITY.md): health
//! says `NOT_SERVING` first, calls in flight when the signal arrives complete, later ones are refused with
//! `UNAVAILABLE` (never half done), the process exits cleanly, and after a
//! restart on the same address nothing is lost — every invitation the
//! caller was told about exists and is emailed exactly once, every session
//! handed out still works.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use usher_proto::{
    identity::v1::{
        GetCurrentUserRequest, ListUsersRequest, SignInRequest,
        auth_service_client::AuthServiceClient, sign_in_request::Login,
        user_service_client::UserServiceClient,
    },
    invitation::v1::{self as pb, invitation_service_client::InvitationServiceClient},
};

use crate::{
    harness::{OWNER_PASSWORD, Service, bearer, create_account, role_id, sign_in},
    journey::MailStack,
};

/// Concurrent callers.
const WORKERS: usize = 8;

/// One call of the load: when it started and ended, and how it went.
struct Outcome {
    label: String,
    started: Instant,
    ended: Instant,
    result: Result<String, (Code, String)>,
}

/// `WORKERS` loops calling `call(label)` until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    last_error: Arc<std::sync::Mutex<Option<tonic::Status>>>,
    tasks: tokio::task::JoinSet<Vec<Outcome>>,
}

impl Load {
    fn start<F, Fut>(call: F) -> Self
    where
        F: Fn(String) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = Result<String, tonic::Status>> + Send,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let last_error = Arc::new(std::sync::Mutex::new(None));
        let mut tasks = tokio::task::JoinSet::new();
        for worker in 0..WORKERS {
            let (call, stop, ok) = (call.clone(), stop.clone(), ok.clone());
            let last_error = last_error.clone();
            tasks.spawn(async move {
                let mut outcomes = Vec::new();
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    let label = format!("w{worker}n{n}");
                    n += 1;
                    let started = Instant::now();
                    let result = call(label.clone()).await.map_err(|status| {
                        let refusal = (status.code(), status.message().to_owned());
                        *last_error.lock().expect("lock") = Some(status);
                        refusal
                    });
                    if result.is_ok() {
                        ok.fetch_add(1, Ordering::SeqCst);
                    } else {
                        // Refused while the service is away: do not spin.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    outcomes.push(Outcome {
                        label,
                        started,
                        ended: Instant::now(),
                        result,
                    });
                }
                outcomes
            });
        }
        Self {
            stop,
            ok,
            last_error,
            tasks,
        }
    }

    /// Waits until `more` further calls succeeded.
    async fn succeed(&self, more: usize, within: Duration) {
        let target = self.ok.load(Ordering::SeqCst) + more;
        let started = Instant::now();
        while self.ok.load(Ordering::SeqCst) < target {
            assert!(
                started.elapsed() < within,
                "the load did not get {more} more calls through within {within:?} \
                 (last refusal: {:?})",
                self.last_error.lock().expect("lock")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn finish(mut self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Vec::new();
        while let Some(outcomes) = self.tasks.join_next().await {
            all.extend(outcomes.expect("worker"));
        }
        all
    }
}

/// Under `load`, SIGTERMs `service` (it must exit cleanly), restarts it on
/// the same address and waits until it serves `health_name` and calls get
/// through again. Returns the moment of the signal.
async fn terminate_under_load(
    load: &Load,
    service: &mut Service,
    env: &[(&'static str, String)],
    health_name: &str,
) -> Instant {
    load.succeed(40, Duration::from_secs(60)).await;
    // Health is watched (a stream) from before the signal: it must say
    // NOT_SERVING before the server goes away.
    let mut health = HealthClient::new(service.channel())
        .watch(HealthCheckRequest {
            service: health_name.to_owned(),
        })
        .await
        .expect("watch")
        .into_inner();
    let first = health.message().await.expect("status").expect("status");
    assert_eq!(first.status(), ServingStatus::Serving);
    let signalled = Instant::now();
    service.signal_term();
    let flipped = tokio::time::timeout(Duration::from_secs(10), health.message())
        .await
        .expect("health changes at once")
        .expect("a status, not a broken stream")
        .expect("a status");
    assert_eq!(
        flipped.status(),
        ServingStatus::NotServing,
        "health flips first"
    );
    drop(health);
    let exit = service.exit().await;
    assert!(exit.success(), "{} exits cleanly: {exit:?}", service.name);
    *service = service.restart(env);
    service
        .wait_for(health_name, ServingStatus::Serving, Duration::from_secs(60))
        .await;
    load.succeed(40, Duration::from_secs(60)).await;
    signalled
}

/// The calls' outcomes: every failure is a refusal — `UNAVAILABLE`, or
/// `CANCELLED` where the client library saw its connection close before
/// the call went out (with the gateway itself stopped); some calls were in
/// flight at the signal and completed. Returns the successes' labels and
/// answers. (That no refused call was carried out is checked on the data.)
fn judged(outcomes: &[Outcome], signalled: Instant) -> HashMap<String, String> {
    let failures: Vec<&(Code, String)> = outcomes
        .iter()
        .filter_map(|o| o.result.as_ref().err())
        .collect();
    assert!(
        failures
            .iter()
            .all(|(c, _)| matches!(c, Code::Unavailable | Code::Cancelled)),
        "refusals only: {failures:?}"
    );
    let spanning = outcomes
        .iter()
        .filter(|o| o.started < signalled && o.ended > signalled && o.result.is_ok())
        .count();
    assert!(spanning > 0, "calls in flight at SIGTERM completed");
    outcomes
        .iter()
        .filter_map(|o| o.result.clone().ok().map(|a| (o.label.clone(), a)))
        .collect()
}

/// A stack with an account (`seats`) whose owner is signed in.
async fn stack(seats: i32) -> (MailStack, String, String, String) {
    // Loads here are far above the per-account limits.
    let stack = MailStack::start_with(&[("USHER_RATE_LIMITS__ENABLED", "false")]).await;
    let slug = format!("term-{}", stack.isolation.id);
    create_account(
        &stack.identity,
        &slug,
        "Shutdown Co",
        "owner@term.example",
        "Owner",
        seats,
    )
    .await;
    let admin = sign_in(
        &stack.gateway,
        &slug,
        Login::Email("owner@term.example".into()),
        OWNER_PASSWORD,
    )
    .await;
    let user_role = role_id(&stack.gateway, &admin, "User").await;
    (stack, slug, admin, user_role)
}

/// Invitation creates, one address a call, through the gateway.
fn invite_load(stack: &MailStack, admin: &str, role: &str) -> Load {
    let (channel, admin, role) = (stack.gateway.channel(), admin.to_owned(), role.to_owned());
    Load::start(move |label| {
        let (channel, admin, role) = (channel.clone(), admin.clone(), role.clone());
        async move {
            InvitationServiceClient::new(channel)
                .create_invitations(bearer(
                    &admin,
                    pb::CreateInvitationsRequest {
                        raw_text: format!("{label}@term.example"),
                        role_id: role,
                        ..Default::default()
                    },
                ))
                .await
                .map(|r| {
                    let answer = r.into_inner();
                    assert_eq!(answer.invited_count, 1, "{answer:?}");
                    answer.results[0].email.clone()
                })
        }
    })
}

/// The addresses of every invitation of the account, page by page.
async fn invited_addresses(stack: &MailStack, admin: &str) -> HashSet<String> {
    let mut stored = HashSet::new();
    let mut page_token = String::new();
    loop {
        let page = InvitationServiceClient::new(stack.gateway.channel())
            .list_invitations(bearer(
                admin,
                pb::ListInvitationsRequest {
                    page_size: 500,
                    page_token,
                    ..Default::default()
                },
            ))
            .await
            .expect("listed")
            .into_inner();
        stored.extend(page.invitations.into_iter().map(|i| i.email));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    stored
}

/// How many users the account holds, counted page by page (the listing's
/// own count stops at 1,000).
async fn users_in_account(stack: &MailStack, admin: &str) -> usize {
    let mut users = 0;
    let mut page_token = String::new();
    loop {
        let page = UserServiceClient::new(stack.gateway.channel())
            .list_users(bearer(
                admin,
                ListUsersRequest {
                    page_size: 500,
                    page_token,
                    ..ListUsersRequest::default()
                },
            ))
            .await
            .expect("users")
            .into_inner();
        users += page.users.len();
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    users
}

/// Every invitation the callers were told about exists, no other does, and
/// each was emailed exactly once.
async fn nothing_lost(stack: &MailStack, admin: &str, told: &HashMap<String, String>) {
    let stored = invited_addresses(stack, admin).await;
    let expected: HashSet<String> = told.values().cloned().collect();
    assert_eq!(
        stored, expected,
        "exactly the invitations callers were told about"
    );
    for address in &expected {
        stack.emails_to(address, 1).await;
    }
    // Late duplicates would arrive within the relay's and consumer's
    // polling periods.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut per_address: HashMap<String, usize> = HashMap::new();
    for message in stack.sink.messages() {
        for to in message.to {
            *per_address.entry(to).or_default() += 1;
        }
    }
    let twice: Vec<_> = per_address.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "emailed more than once: {twice:?}");
    assert_eq!(per_address.len(), expected.len(), "an email per invitation");
}

#[tokio::test]
async fn sigterm_on_the_invitation_service_under_load_loses_nothing() {
    let (mut stack, _, admin, role) = stack(10_000).await;
    let load = invite_load(&stack, &admin, &role);
    let env = stack.invitation_env.clone();
    let signalled = terminate_under_load(
        &load,
        &mut stack.invitation,
        &env,
        "usher.invitation.v1.InvitationService",
    )
    .await;
    let told = judged(&load.finish().await, signalled);
    nothing_lost(&stack, &admin, &told).await;
}

#[tokio::test]
async fn sigterm_on_the_gateway_under_load_loses_nothing() {
    let (mut stack, _, admin, role) = stack(10_000).await;
    let load = invite_load(&stack, &admin, &role);
    let env = stack.gateway_env.clone();
    let signalled = terminate_under_load(&load, &mut stack.gateway, &env, "").await;
    let told = judged(&load.finish().await, signalled);
    nothing_lost(&stack, &admin, &told).await;
}

#[tokio::test]
async fn sigterm_on_the_identity_service_under_load_loses_nothing() {
    let (mut stack, slug, admin, role) = stack(10_000).await;
    // Invitations (identity reserves each invitee) and sign-ins.
    let invites = invite_load(&stack, &admin, &role);
    let channel = stack.gateway.channel();
    let sign_ins = Load::start(move |_| {
        let (channel, slug) = (channel.clone(), slug.clone());
        async move {
            AuthServiceClient::new(channel)
                .sign_in(SignInRequest {
                    account_slug: slug,
                    login: Some(Login::Email("owner@term.example".into())),
                    password: OWNER_PASSWORD.into(),
                })
                .await
                .map(|r| r.into_inner().session.expect("session").access_token)
        }
    });
    sign_ins.succeed(10, Duration::from_secs(60)).await;
    let env = stack.identity_env.clone();
    let signalled = terminate_under_load(
        &invites,
        &mut stack.identity,
        &env,
        "usher.identity.v1.AuthService",
    )
    .await;
    let sessions = judged(&sign_ins.finish().await, signalled);
    let told = judged(&invites.finish().await, signalled);
    // Every session handed out works after the restart.
    for token in sessions.values() {
        AuthServiceClient::new(stack.gateway.channel())
            .get_current_user(bearer(token, GetCurrentUserRequest::default()))
            .await
            .expect("a session handed out still works");
    }
    nothing_lost(&stack, &admin, &told).await;
    // And no invitee was reserved without an invitation: the account
    // holds the owner and exactly the invited users.
    let users = users_in_account(&stack, &admin).await;
    assert_eq!(users, told.len() + 1, "no orphaned invitees");
}

#[tokio::test]
async fn sigterm_on_the_notification_service_while_sending_loses_nothing() {
    let (mut stack, _, admin, role) = stack(10_000).await;
    // Well beyond what is in flight when the signal comes (at most
    // `delivery.consumers` × `delivery.batch_size` = 256 jobs, finished
    // before the exit) and beyond what the pipeline sends between the
    // signal and the exit (more than 1,000 since sends run at over
    // 1,000 a second), so the restart always has emails left to send.
    const CALLS: usize = 4;
    const INVITEES: usize = CALLS * 1_000;
    let raw_text: Vec<String> = (0..INVITEES)
        .map(|i| format!("burst{i}@term.example"))
        .collect();
    for chunk in raw_text.chunks(1_000) {
        let created = InvitationServiceClient::new(stack.gateway.channel())
            .create_invitations(bearer(
                &admin,
                pb::CreateInvitationsRequest {
                    raw_text: chunk.join("\n"),
                    role_id: role.clone(),
                    ..Default::default()
                },
            ))
            .await
            .expect("created")
            .into_inner();
        assert_eq!(created.invited_count as usize, chunk.len());
    }
    // Stopped mid-burst.
    let started = Instant::now();
    while stack.sink.count() < 30 {
        assert!(started.elapsed() < Duration::from_secs(60), "emails flow");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let exit = stack.notification.terminate().await;
    assert!(exit.success(), "exits cleanly: {exit:?}");
    let sent_before_restart = stack.sink.count();
    stack.notification = stack.notification.restart(&stack.notification_env);
    stack
        .notification
        .wait_for(
            "usher.notification.v1.NotificationService",
            ServingStatus::Serving,
            Duration::from_secs(60),
        )
        .await;
    let told: HashMap<String, String> = raw_text.iter().map(|a| (a.clone(), a.clone())).collect();
    nothing_lost(&stack, &admin, &told).await;
    assert!(
        sent_before_restart < INVITEES,
        "the signal came mid-burst ({sent_before_restart} sent before the restart)"
    );
}

#[tokio::test]
async fn creates_whose_callers_give_up_halfway_leave_no_reserved_invitee_behind() {
    let (stack, _, admin, role) = stack(10_000).await;
    let create = |batch: usize, deadline: Option<Duration>| {
        let (channel, admin, role) = (stack.gateway.channel(), admin.clone(), role.clone());
        async move {
            let raw_text: Vec<String> = (0..40)
                .map(|i| format!("gone{batch}x{i}@term.example"))
                .collect();
            let mut request = bearer(
                &admin,
                pb::CreateInvitationsRequest {
                    raw_text: raw_text.join("\n"),
                    role_id: role,
                    ..Default::default()
                },
            );
            if let Some(deadline) = deadline {
                request.set_timeout(deadline);
            }
            InvitationServiceClient::new(channel)
                .create_invitations(request)
                .await
                .map(|_| ())
                .map_err(|status| status.code())
        }
    };
    // How long a create of 40 takes here, unhurried.
    let started = Instant::now();
    create(0, None).await.expect("an unhurried create");
    let whole = started.elapsed();
    // Then creates whose callers give up after 1/20, 2/20, … 30/20 of that:
    // at every step of a create (before identity reserves, between the
    // reservation and the commit, after it). The gateway and the invitation
    // service see the caller go away; what identity reserved must then be
    // invited (or released), never left taking seats with no invitation.
    let mut cut = 0;
    for step in 1..=30 {
        let deadline = (whole * step / 20).max(Duration::from_millis(1));
        match create(usize::try_from(step).expect("small"), Some(deadline)).await {
            Ok(()) => {}
            Err(Code::DeadlineExceeded | Code::Cancelled) => cut += 1,
            Err(other) => panic!("a create answered {other:?}"),
        }
    }
    assert!(cut > 0, "some callers gave up (a create takes {whole:?})");
    // The calls the callers left finish on their own; then every user the
    // account holds beyond its owner has its invitation.
    let started = Instant::now();
    loop {
        let invited = invited_addresses(&stack, &admin).await.len();
        let users = users_in_account(&stack, &admin).await;
        if users == invited + 1 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{} reserved invitees without an invitation ({cut} callers gave up, \
             a create takes {whole:?})",
            users - invited - 1
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
