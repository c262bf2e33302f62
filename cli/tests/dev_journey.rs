//! The newcomer's journey, end to end, through the real binary: `usher dev`
//! runs as a process (against this machine's PostgreSQL, Redis and RabbitMQ,
//! isolated: its own databases, Redis prefix, vhost, port and folders), and
//! the `usher` CLI signs in with the printed credentials, invites three
//! addresses (one invalid, whose verdict is shown), the link is read from
//! the mail folder and accepted through the gateway's API, and `users list`
//! shows the new member ACTIVE, as a table and as JSON. A restart prints the
//! same credentials instead of creating a second account.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    path::{Path, PathBuf},
    process::{Output, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};
use usher_proto::invitation::v1::{
    AcceptInvitationRequest, invitation_service_client::InvitationServiceClient,
};

const USHER: &str = env!("CARGO_BIN_EXE_usher");

/// The databases, vhost and Redis prefix of this test, removed at the end.
struct Isolation {
    id: String,
    vhost: String,
}

impl Isolation {
    fn new() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let vhost = format!("usher-cli-it-{id}");
        rabbitmqctl(&["add_vhost", &vhost]);
        rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
        Self { id, vhost }
    }

    fn database_base(&self) -> String {
        format!("usher_cli_it_{}", self.id)
    }
}

impl Drop for Isolation {
    fn drop(&mut self) {
        rabbitmqctl(&["delete_vhost", &self.vhost]);
        for service in ["identity", "invitation", "notification"] {
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
                .arg(format!(
                    "DROP DATABASE IF EXISTS \"{}_{service}\" WITH (FORCE)",
                    self.database_base()
                ))
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

/// A running `usher dev` and the lines it printed.
struct Dev {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Dev {
    /// `usher dev` on `database_url`, with the machine's Redis and RabbitMQ
    /// when `real` (isolated by `iso`), else its embedded ones.
    fn start(iso: &Isolation, dir: &Path, database_url: &str, real: bool) -> Self {
        let mut command = Command::new(USHER);
        command
            .arg("dev")
            .args(["--listen", "127.0.0.1:0"])
            .args(["--database-url", database_url])
            .env_remove("USHER_DEV_REDIS_URL")
            .env_remove("USHER_DEV_AMQP_URL");
        if real {
            command
                .args(["--redis-url", "redis://127.0.0.1:6379"])
                .args(["--redis-prefix", &format!("cli-it:{}:", iso.id)])
                .args([
                    "--amqp-url",
                    &format!("amqp://guest:guest@127.0.0.1:5672/{}", iso.vhost),
                ]);
        }
        let mut child = command
            .arg("--mail-dir")
            .arg(dir.join("mail"))
            .env_remove("USHER_DEV_SMTP_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("usher dev starts");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("stdout");
        let sink = lines.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
        Self { child, lines }
    }

    /// The value printed after `key:` once the banner is out.
    fn value(&self, key: &str) -> Option<String> {
        let lines = self.lines.lock().unwrap();
        lines.iter().find_map(|line| {
            line.trim()
                .strip_prefix(key)
                .and_then(|rest| rest.strip_prefix(':'))
                .map(|v| v.trim().to_owned())
        })
    }

    /// Waits for the banner and returns (gateway, account, email, password).
    async fn ready(&mut self) -> (String, String, String, String) {
        for _ in 0..1_200 {
            if self.printed("Press Ctrl-C to stop.") {
                let get = |k: &str| self.value(k).unwrap_or_else(|| panic!("no {k} printed"));
                return (
                    get("gateway"),
                    get("account"),
                    get("owner email"),
                    get("owner password"),
                );
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("usher dev exited with {status}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("usher dev was not ready in 120 s");
    }

    fn printed(&self, text: &str) -> bool {
        self.lines.lock().unwrap().iter().any(|l| l.contains(text))
    }

    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("stops within 30 s")
            .expect("wait");
        assert!(status.success(), "usher dev stopped with {status}");
    }
}

/// Runs the CLI with its config file in `dir`, `stdin` on standard input.
async fn usher(dir: &Path, args: &[&str], stdin: &str) -> Output {
    use tokio::io::AsyncWriteExt;
    let mut child = Command::new(USHER)
        .args(args)
        .env("USHER_CLI_CONFIG_FILE", dir.join("config.toml"))
        .env_remove("USHER_CLI_TOKEN")
        .env_remove("USHER_CLI_GATEWAY")
        .env_remove("USHER_CLI_PROFILE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("usher runs");
    let mut input = child.stdin.take().expect("stdin");
    input
        .write_all(stdin.as_bytes())
        .await
        .expect("write stdin");
    drop(input);
    tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the CLI answers within 60 s")
        .expect("output")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The link of the email to `to` in the mail folder, once it is there.
async fn link_in_mail_folder(folder: &Path, to: &str, gateway: &str) -> String {
    let prefix = format!("{gateway}/invite?token=");
    for _ in 0..300 {
        let files: Vec<PathBuf> = std::fs::read_dir(folder)
            .map(|entries| entries.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        for file in files {
            let Ok(bytes) = std::fs::read(&file) else {
                continue;
            };
            let Some(message) = mail_parser::MessageParser::default().parse(&bytes) else {
                continue;
            };
            let addressed = message
                .to()
                .and_then(|a| a.first())
                .and_then(|a| a.address())
                == Some(to);
            let body = message.body_text(0).unwrap_or_default().into_owned();
            if let (true, Some(start)) = (addressed, body.find(&prefix)) {
                let link: String = body[start..]
                    .chars()
                    .take_while(|c| !c.is_whitespace())
                    .collect();
                return link;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no email to {to} in {}", folder.display());
}

#[tokio::test]
async fn a_newcomer_invites_and_the_invitee_joins_through_usher_dev() {
    let iso = Isolation::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let database_url = format!("postgres://postgres@127.0.0.1:5432/{}", iso.database_base());
    journey(&iso, dir.path(), &database_url, true).await;
}

/// The same journey on the embedded backends, what `usher dev` runs with no
/// flag: SQLite files, the in-process cache and the in-process broker —
/// nothing of the machine's PostgreSQL, Redis or RabbitMQ.
#[tokio::test]
async fn the_journey_works_on_the_embedded_backends() {
    let iso = Isolation::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let database_url = format!("sqlite://{}", dir.path().join("dev.db").display());
    journey(&iso, dir.path(), &database_url, false).await;
    for service in ["identity", "invitation", "notification"] {
        let file = dir.path().join(format!("dev_{service}.db"));
        assert!(file.exists(), "{} holds {service}'s data", file.display());
    }
}

async fn journey(iso: &Isolation, dir: &Path, database_url: &str, real: bool) {
    let mut dev = Dev::start(iso, dir, database_url, real);
    let (gateway, account, email, password) = dev.ready().await;
    let (cache, queue) = if real {
        ("Redis", "RabbitMQ")
    } else {
        ("in-process", "in-process")
    };
    assert_eq!(dev.value("cache").as_deref(), Some(cache));
    assert_eq!(dev.value("queue").as_deref(), Some(queue));
    assert!(gateway.starts_with("http://127.0.0.1:"), "{gateway}");
    assert_eq!(account, "demo");

    // Sign in with the printed credentials; the session lands in a private
    // config file.
    let login = usher(
        dir,
        &[
            "login",
            "--gateway",
            &gateway,
            "--account",
            &account,
            "--email",
            &email,
            "--password-stdin",
        ],
        &format!("{password}\n"),
    )
    .await;
    assert!(login.status.success(), "{}", text(&login.stderr));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("config.toml"))
            .expect("config file written")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let wrong = usher(
        dir,
        &[
            "login",
            "--gateway",
            &gateway,
            "--account",
            &account,
            "--email",
            &email,
            "--password-stdin",
            "--profile",
            "wrong",
        ],
        "not the password\n",
    )
    .await;
    assert!(!wrong.status.success());
    assert!(
        text(&wrong.stderr).contains("reason: INVALID_CREDENTIALS"),
        "{}",
        text(&wrong.stderr)
    );

    // Invite three, one of them invalid: each verdict is shown.
    let invite = usher(
        dir,
        &[
            "invite",
            "ivy@example.com",
            "Bob Builder <bob@example.com>",
            "not-an-email",
        ],
        "",
    )
    .await;
    let shown = text(&invite.stdout);
    assert!(invite.status.success(), "{}", text(&invite.stderr));
    let verdict = |input: &str| {
        shown
            .lines()
            .find(|l| l.contains(input))
            .unwrap_or_else(|| panic!("no row for {input}:\n{shown}"))
            .to_owned()
    };
    assert!(verdict("ivy@example.com").contains("INVITED"), "{shown}");
    assert!(
        verdict("Bob Builder <bob@example.com>").contains("INVITED"),
        "{shown}"
    );
    assert!(
        verdict("not-an-email").contains("INVALID_ADDRESS"),
        "{shown}"
    );
    assert!(
        shown.contains("3 addresses: 2 invited, 1 not invited"),
        "{shown}"
    );

    // A CSV file, and a list longer than one call (1,000 entries), as dry
    // runs: every entry gets its verdict.
    let csv = dir.join("team.csv");
    std::fs::write(&csv, "Name,Email\nCarla Csv,carla@example.com\n").expect("csv");
    let from_csv = usher(
        dir,
        &[
            "invite",
            "--from-file",
            csv.to_str().expect("utf-8 path"),
            "--dry-run",
            "--json",
        ],
        "",
    )
    .await;
    assert!(from_csv.status.success(), "{}", text(&from_csv.stderr));
    let from_csv: serde_json::Value = serde_json::from_slice(&from_csv.stdout).expect("JSON");
    assert_eq!(from_csv["dry_run"], true);
    assert_eq!(from_csv["results"][0]["email"], "carla@example.com");
    assert_eq!(from_csv["results"][0]["display_name"], "Carla Csv");
    assert_eq!(from_csv["results"][0]["verdict"], "INVITEE_VERDICT_INVITED");
    let many: String = (0..1_001).map(|i| format!("p{i}@example.com\n")).collect();
    let list = dir.join("many.txt");
    std::fs::write(&list, many).expect("list");
    let bulk = usher(
        dir,
        &[
            "invite",
            "--from-file",
            list.to_str().expect("utf-8 path"),
            "--dry-run",
            "--json",
        ],
        "",
    )
    .await;
    assert!(bulk.status.success(), "{}", text(&bulk.stderr));
    let bulk: serde_json::Value = serde_json::from_slice(&bulk.stdout).expect("JSON");
    let results = bulk["results"].as_array().expect("results");
    assert_eq!(results.len(), 1_001, "two calls, every entry judged");
    assert_eq!(results[1_000]["input"], "p1000@example.com");

    // The link, read from the mail folder (and announced by usher dev).
    let link = link_in_mail_folder(&dir.join("mail"), "ivy@example.com", &gateway).await;
    for _ in 0..100 {
        if dev.printed(&link) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(dev.printed("usher dev: email to ivy@example.com"));
    assert!(
        dev.printed(&format!("  link: {link}")),
        "the link is printed"
    );

    // The delivery result came back through the queue to the invitation
    // service: the invitation shows its email SENT.
    let mut delivery = serde_json::Value::Null;
    for _ in 0..100 {
        let listed = usher(dir, &["invitations", "list", "--json"], "").await;
        assert!(listed.status.success(), "{}", text(&listed.stderr));
        let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("JSON");
        delivery = listed["invitations"]
            .as_array()
            .expect("invitations")
            .iter()
            .find(|i| i["email"] == "ivy@example.com")
            .expect("ivy's invitation")["latest_delivery"]["status"]
            .clone();
        if delivery == "DELIVERY_STATUS_SENT" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(delivery, "DELIVERY_STATUS_SENT");

    // Accepted through the gateway's API.
    let token = link.rsplit("token=").next().expect("token").to_owned();
    let channel = tonic::transport::Endpoint::from_shared(gateway.clone())
        .expect("endpoint")
        .connect()
        .await
        .expect("gateway reachable");
    let accepted = InvitationServiceClient::new(channel)
        .accept_invitation(AcceptInvitationRequest {
            token,
            display_name: "Ivy Newcomer".into(),
            password: "a long enough passphrase".into(),
            locale: String::new(),
        })
        .await
        .expect("accepted")
        .into_inner();
    assert_eq!(accepted.account_slug, account);

    // The new member is ACTIVE, in the table and in the JSON.
    let table = usher(dir, &["users", "list"], "").await;
    assert!(table.status.success(), "{}", text(&table.stderr));
    let table = text(&table.stdout);
    let ivy = table
        .lines()
        .find(|l| l.contains("ivy@example.com"))
        .unwrap_or_else(|| panic!("ivy is listed:\n{table}"))
        .to_owned();
    assert!(
        ivy.contains("Ivy Newcomer") && ivy.contains("ACTIVE"),
        "{ivy}"
    );

    let json = usher(dir, &["users", "list", "--json"], "").await;
    assert!(json.status.success(), "{}", text(&json.stderr));
    let listed: serde_json::Value =
        serde_json::from_slice(&json.stdout).expect("--json prints JSON");
    let users = listed["users"].as_array().expect("users");
    let ivy = users
        .iter()
        .find(|u| u["email"] == "ivy@example.com")
        .expect("ivy in the JSON");
    assert_eq!(ivy["status"], "USER_STATUS_ACTIVE");
    assert_eq!(ivy["display_name"], "Ivy Newcomer");
    let bob = users
        .iter()
        .find(|u| u["email"] == "bob@example.com")
        .expect("bob in the JSON");
    assert_eq!(bob["status"], "USER_STATUS_INVITED");
    assert_eq!(listed["total_size"], 3);
    assert_eq!(listed["total_size_capped"], false, "3 is the exact count");

    // A refused call shows the reason and fails.
    let refused = usher(dir, &["users", "deactivate", &email], "").await;
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("reason: OWNER_PROTECTED"),
        "{}",
        text(&refused.stderr)
    );

    // An access token the gateway refuses is replaced through the refresh
    // token, and the new one saved.
    let config_path = dir.join("config.toml");
    let saved = std::fs::read_to_string(&config_path).expect("config");
    let access_line = saved
        .lines()
        .find(|l| l.starts_with("access_token"))
        .expect("an access token is saved")
        .to_owned();
    std::fs::write(
        &config_path,
        saved.replace(&access_line, "access_token = \"no-longer-valid\""),
    )
    .expect("config");
    let refreshed = usher(dir, &["whoami"], "").await;
    assert!(refreshed.status.success(), "{}", text(&refreshed.stderr));
    assert!(text(&refreshed.stdout).contains(&email));
    let saved = std::fs::read_to_string(&config_path).expect("config");
    assert!(!saved.contains("no-longer-valid"), "the new token is saved");

    // Signing out forgets the session.
    let logout = usher(dir, &["logout"], "").await;
    assert!(logout.status.success(), "{}", text(&logout.stderr));
    let after = usher(dir, &["users", "list"], "").await;
    assert!(!after.status.success());
    assert!(
        text(&after.stderr).contains("not signed in"),
        "{}",
        text(&after.stderr)
    );

    // A restart prints the same credentials: no second account.
    dev.stop().await;
    let mut again = Dev::start(iso, dir, database_url, real);
    let (_, account_again, email_again, password_again) = again.ready().await;
    assert_eq!(
        (account_again, email_again, password_again),
        (account, email, password)
    );
    again.stop().await;
}
