//! Another team's pipeline takes over the invitation emails
//! (docs/notification.md, "Taking over delivery"): the notification service
//! runs with `delivery.external_sources = ["invitation"]`, and the reference
//! consumer in Python (`examples/python-consumer`) consumes the jobs from its
//! own queue, opens the sealed links with the shared key, sends them to its
//! own SMTP server and publishes the delivery results. Every invitation is
//! delivered once by it (a job published again too), reads SENT, and its link
//! works; the built-in service sends nothing.
//!
//! The consumer runs in a virtual environment under the target folder, made
//! once with `pip install -r requirements.txt`; its protobuf module is
//! generated from `proto/` by `generate.sh` for each run.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use prost::Message as _;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};
use usher_kit::amqp::{
    ConfirmedPublisher, EMAIL_EXCHANGE, EMAIL_SEND_ROUTING_KEY, email_job_message,
};
use usher_proto::{
    identity::v1::{SignInRequest, auth_service_client::AuthServiceClient, sign_in_request::Login},
    invitation::v1::{self as pb, invitation_service_client::InvitationServiceClient},
    notification::v1::{DeliveryStatus, EmailJob},
};

use crate::{
    harness::{OWNER_PASSWORD, bearer, bound_queues, create_account, role_id, sign_in},
    journey::{MailStack, accept_on_page, link_token},
    smtp_sink::SmtpSink,
};

/// The seal key every producer and the external pipeline share (bytes 1 to
/// 32, base64), and its id.
const SEAL_KEY: &str = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";
const SEAL_KEY_ID: &str = "it-2026-12";
/// Invitees of the test.
const INVITEES: usize = 20;
/// Generous: the machine is loaded.
const DEADLINE: Duration = Duration::from_secs(180);

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python-consumer")
}

/// Runs `command`, failing the test with its output when it fails.
fn run(command: &mut std::process::Command, what: &str) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    assert!(
        output.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The Python of a virtual environment holding `requirements.txt`, made
/// once per version of that file under the target folder (pip from PyPI).
fn python_env() -> PathBuf {
    use std::hash::{Hash, Hasher};
    let requirements = example_dir().join("requirements.txt");
    let pinned = std::fs::read_to_string(&requirements).expect("requirements.txt");
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    pinned.hash(&mut hasher);
    let target = crate::harness::binary("usher-notification")
        .parent()
        .expect("target folder")
        .to_owned();
    let venv = target.join(format!("python-consumer-{:016x}", hasher.finish()));
    let python = venv.join("bin/python");
    let ready = || {
        python.exists()
            && std::process::Command::new(&python)
                .args(["-c", "import pika, nacl, google.protobuf, grpc_tools"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
    };
    if ready() {
        return python;
    }
    // Built aside and renamed, so a half-made environment is never used.
    let building = target.join(format!(
        "{}.building-{}",
        venv.file_name().and_then(|n| n.to_str()).expect("name"),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&building);
    run(
        std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&building),
        "python3 -m venv (python3 ≥ 3.9 with venv is required)",
    );
    run(
        std::process::Command::new(building.join("bin/python"))
            .args(["-m", "pip", "install", "-q", "-r"])
            .arg(&requirements),
        "pip install -r examples/python-consumer/requirements.txt",
    );
    let _ = std::fs::remove_dir_all(&venv);
    if std::fs::rename(&building, &venv).is_err() {
        // Another run made it first.
        let _ = std::fs::remove_dir_all(&building);
    }
    assert!(ready(), "the consumer's environment at {}", venv.display());
    python
}

/// The reference consumer, running until dropped.
struct Consumer {
    child: Child,
    _state: tempfile_dir::TempDir,
    /// Every line it printed so far.
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

/// A temporary folder removed on drop (no extra crate for it).
mod tempfile_dir {
    use std::path::{Path, PathBuf};

    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new(label: &str) -> Self {
            let path = std::env::temp_dir().join(format!(
                "usher-it-{label}-{}",
                uuid::Uuid::new_v4().simple()
            ));
            std::fs::create_dir_all(&path).expect("temp folder");
            Self(path)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Consumer {
    /// Generates the protobuf module, checks the seal test vectors, starts
    /// the consumer on `amqp_url` sending to `smtp_port`, and waits until its
    /// queue is bound.
    async fn start(amqp_url: &str, smtp_port: u16) -> Self {
        let python = python_env();
        let state = tempfile_dir::TempDir::new("python-consumer");
        let generated = state.path().join("gen");
        run(
            std::process::Command::new("bash")
                .arg(example_dir().join("generate.sh"))
                .arg(&generated)
                .env("PYTHON", &python),
            "generate.sh",
        );
        let script = example_dir().join("consumer.py");
        run(
            std::process::Command::new(&python)
                .arg(&script)
                .arg("--check-vectors")
                .env("PYTHONPATH", &generated),
            "the seal test vectors in Python",
        );
        let mut child = Command::new(&python)
            .arg(&script)
            .env("PYTHONPATH", &generated)
            .env("AMQP_URL", amqp_url)
            .env("QUEUE", "partner.invitation-emails")
            .env("SOURCES", "invitation")
            .env("SEAL_KEYS", format!("{SEAL_KEY_ID}={SEAL_KEY}"))
            .env("SMTP_PORT", smtp_port.to_string())
            .env("MESSAGE_ID_HOST", "partner.example")
            .env("STATE_DB", state.path().join("state.sqlite3"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the python consumer starts");
        let stdout = child.stdout.take().expect("stdout");
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let printed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = printed.clone();
        tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[python consumer] {line}");
                kept.lock().expect("lines").push(line.clone());
                if line.starts_with("ready")
                    && let Some(ready) = ready.take()
                {
                    let _ = ready.send(());
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(120), ready_rx)
            .await
            .expect("the consumer bound its queue within 120 s")
            .expect("the consumer exited before it was ready (its log is above)");
        Self {
            child,
            _state: state,
            lines: printed,
        }
    }

    /// Fails the test at once if the consumer exited (its traceback is above).
    fn assert_running(&mut self) {
        if let Ok(Some(exit)) = self.child.try_wait() {
            panic!("the python consumer exited with {exit} (its output is above)");
        }
    }

    /// Waits until the consumer printed `line`.
    async fn printed(&mut self, line: &str) {
        let started = Instant::now();
        while !self.lines.lock().expect("lines").iter().any(|l| l == line) {
            self.assert_running();
            assert!(
                started.elapsed() < DEADLINE,
                "the consumer never printed {line:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test]
async fn an_external_pipeline_in_python_delivers_every_invitation_once() {
    let seal = |binary| {
        [
            (binary, "USHER_SEAL__KEY", SEAL_KEY.to_owned()),
            (binary, "USHER_SEAL__KEY_ID", SEAL_KEY_ID.to_owned()),
        ]
    };
    let mut settings = vec![(
        "usher-notification",
        "USHER_DELIVERY__EXTERNAL_SOURCES",
        r#"["invitation"]"#.to_owned(),
    )];
    for binary in ["usher-identity", "usher-invitation", "usher-notification"] {
        settings.extend(seal(binary));
    }
    let stack = MailStack::start_configured(&settings, &[]).await;
    let partner_sink = SmtpSink::start().await;
    let mut consumer = Consumer::start(&stack.isolation.amqp_url(), partner_sink.port).await;
    // A copy of every job, to publish one again as a producer may.
    let observer = bound_queues(
        &stack.isolation,
        "it-observer",
        &[("it.observed-jobs", EMAIL_EXCHANGE, EMAIL_SEND_ROUTING_KEY)],
    )
    .await;

    let slug = format!("partner-{}", stack.isolation.id);
    create_account(
        &stack.identity,
        &slug,
        "Partner Co",
        "owner@partner.example",
        "Pat Owner",
        i32::try_from(INVITEES).expect("small") + 5,
    )
    .await;
    let admin = sign_in(
        &stack.gateway,
        &slug,
        Login::Email("owner@partner.example".into()),
        OWNER_PASSWORD,
    )
    .await;
    let user_role = role_id(&stack.gateway, &admin, "User").await;
    let addresses: Vec<String> = (0..INVITEES)
        .map(|i| format!("invitee{i}@partner.example"))
        .collect();
    let mut invitations = InvitationServiceClient::new(stack.gateway.channel());
    let created = invitations
        .create_invitations(bearer(
            &admin,
            pb::CreateInvitationsRequest {
                raw_text: addresses.join("\n"),
                role_id: user_role,
                ..Default::default()
            },
        ))
        .await
        .expect("created")
        .into_inner();
    assert_eq!(created.invited_count as usize, INVITEES, "{created:?}");

    // Every invitation reads SENT, from the external pipeline's results.
    let started = Instant::now();
    loop {
        let listed = invitations
            .list_invitations(bearer(
                &admin,
                pb::ListInvitationsRequest {
                    page_size: 100,
                    ..Default::default()
                },
            ))
            .await
            .expect("listed")
            .into_inner()
            .invitations;
        let sent = listed
            .iter()
            .filter(|i| {
                i.latest_delivery
                    .as_ref()
                    .is_some_and(|d| d.status() == DeliveryStatus::Sent)
            })
            .count();
        if listed.len() == INVITEES && sent == INVITEES {
            break;
        }
        consumer.assert_running();
        assert!(
            started.elapsed() < DEADLINE,
            "{sent} of {INVITEES} invitations SENT after {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The invitee's link, from the external pipeline's email, works.
    let first = partner_email_to(&partner_sink, &addresses[0]).await;
    let token = link_token(&first, "/invite");
    let (status, page) = accept_on_page(
        &stack.gateway,
        &token,
        "en",
        "First Invitee",
        "a long enough passphrase",
    )
    .await;
    assert_eq!(status, 200, "{page}");
    AuthServiceClient::new(stack.gateway.channel())
        .sign_in(SignInRequest {
            account_slug: slug,
            login: Some(Login::Email(addresses[0].clone())),
            password: "a long enough passphrase".into(),
        })
        .await
        .expect("the new member signs in");
    // The inviter's "joined" email is an invitation-source job too.
    partner_email_to(&partner_sink, "owner@partner.example").await;

    // Each invitee got exactly one email, from the external pipeline.
    let mut per_recipient: HashMap<String, usize> = HashMap::new();
    for message in partner_sink.messages() {
        *per_recipient.entry(message.to.join(",")).or_insert(0) += 1;
    }
    for address in &addresses {
        assert_eq!(per_recipient.get(address), Some(&1), "{per_recipient:?}");
    }
    assert_eq!(
        partner_sink.count(),
        INVITEES + 1,
        "no duplicates: {per_recipient:?}"
    );
    // A job published again (a producer's relay retrying after a lost
    // confirm): the external pipeline does not send it twice.
    let channel = observer.channel().await.expect("channel");
    let copy = channel
        .basic_get(
            "it.observed-jobs".into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .expect("basic_get")
        .expect("an observed job");
    let job = EmailJob::decode(copy.delivery.data.as_slice()).expect("an email job");
    ConfirmedPublisher::new(observer.clone())
        .publish(&email_job_message(&job))
        .await
        .expect("published again");
    consumer
        .printed(&format!("duplicate job {}: not sent again", job.job_id))
        .await;
    assert_eq!(partner_sink.count(), INVITEES + 1, "sent once");

    // The built-in service took every one of those jobs too (the copy as
    // well), and handed it off: it sent nothing.
    let started = Instant::now();
    let wanted = format!("usher_notification_handed_off_total {}", INVITEES + 2);
    loop {
        let metrics = crate::health::scrape(stack.notification.metrics).await;
        if metrics.lines().any(|line| line == wanted) {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "no `{wanted}` in the notification service's metrics"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(stack.sink.count(), 0, "the built-in service sent an email");
}

/// The text of the external pipeline's email to `address`.
async fn partner_email_to(sink: &SmtpSink, address: &str) -> String {
    let started = Instant::now();
    loop {
        if let Some(message) = sink.messages().into_iter().find(|m| m.to == [address]) {
            let parsed = mail_parser::MessageParser::default()
                .parse(&message.data)
                .expect("a parsable email");
            return parsed.body_text(0).expect("a text part").into_owned();
        }
        assert!(
            started.elapsed() < DEADLINE,
            "no email to {address} from the external pipeline"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
