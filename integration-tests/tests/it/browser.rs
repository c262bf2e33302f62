//! A real browser on the invitation page: headless Chromium, driven over
//! WebDriver (chromedriver), opens the link from the queued email, fills the
//! form and accepts; the new member then signs in. Once in English, once
//! after switching the page to French.

use std::{process::Stdio, time::Duration};

use fantoccini::{Client, ClientBuilder, Locator};
use tokio::process::{Child, Command};
use usher_proto::{
    identity::v1::{SignInRequest, auth_service_client::AuthServiceClient, sign_in_request::Login},
    invitation::v1::{self as pb, invitation_service_client::InvitationServiceClient},
};

use crate::{
    harness::{bearer, free_port},
    invitation::{DAY, Setup, next_job, setup, token_of},
};

/// chromedriver on a free port, killed when dropped.
struct Driver {
    url: String,
    _child: Child,
}

impl Driver {
    async fn start() -> Self {
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver runs (deploy/local/test.sh installs chromium-driver)");
        let url = format!("http://127.0.0.1:{port}");
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Self { url, _child: child }
    }

    async fn browser(&self) -> Client {
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                ],
                "prefs": { "intl.accept_languages": "en-US,en" },
            }),
        );
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&self.url)
            .await
            .expect("a Chromium session")
    }
}

/// Fills the open invitation form and submits it; returns the next page's
/// heading.
async fn accept(browser: &Client, name: &str, password: &str) -> String {
    let form_heading = text_once(browser, "h1", |_| true).await;
    let field = browser
        .find(Locator::Id("display_name"))
        .await
        .expect("name field");
    field.clear().await.expect("clear");
    field.send_keys(name).await.expect("type the name");
    browser
        .find(Locator::Id("password"))
        .await
        .expect("password field")
        .send_keys(password)
        .await
        .expect("type the password");
    browser
        .find(Locator::Css("button[value=accept]"))
        .await
        .expect("accept button")
        .click()
        .await
        .expect("submit");
    text_once(browser, "h1", |heading| heading != form_heading).await
}

/// The text of the first `css` element once `ready` accepts it: the page
/// after a click may still be the old one for a moment (or gone mid-read).
async fn text_once(browser: &Client, css: &str, ready: impl Fn(&str) -> bool) -> String {
    for _ in 0..100 {
        if let Ok(element) = browser.find(Locator::Css(css)).await
            && let Ok(text) = element.text().await
            && ready(&text)
        {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no {css} as expected on {:?}", browser.current_url().await);
}

#[tokio::test]
async fn a_browser_accepts_an_invitation_in_english_and_in_french() {
    let Setup {
        gateway,
        amqp,
        admin,
        user_role,
        slug,
        _isolation,
        _identity,
        _invitation,
    } = setup(DAY).await;
    InvitationServiceClient::new(gateway.channel())
        .create_invitations(bearer(
            &admin,
            pb::CreateInvitationsRequest {
                raw_text: "Ann <ann@invite.example>\nFrançois <francois@invite.example>".into(),
                role_id: user_role,
                ..Default::default()
            },
        ))
        .await
        .expect("created");
    let mut links = std::collections::HashMap::new();
    for _ in 0..2 {
        let job = next_job(&amqp).await;
        links.insert(
            job.recipient_email.clone(),
            format!("http://{}/invite?token={}", gateway.grpc, token_of(&job)),
        );
    }
    let driver = Driver::start().await;
    let browser = driver.browser().await;

    // English.
    browser
        .goto(&links["ann@invite.example"])
        .await
        .expect("open the link");
    let lead = browser
        .find(Locator::Css("p.lead"))
        .await
        .expect("lead")
        .text()
        .await
        .expect("text");
    assert_eq!(lead, "Oona Owner invited you to join Invite Co.");
    let heading = accept(&browser, "Ann Browser", "a long enough passphrase").await;
    assert_eq!(heading, "Welcome!");

    // French, through the page's language switch.
    browser
        .goto(&links["francois@invite.example"])
        .await
        .expect("open the link");
    browser
        .find(Locator::Css("nav a"))
        .await
        .expect("switch")
        .click()
        .await
        .expect("to French");
    let lead = text_once(&browser, "p.lead", |lead| lead.contains("vous invite")).await;
    assert_eq!(lead, "Oona Owner vous invite à rejoindre Invite Co.");
    let heading = accept(
        &browser,
        "François Navigateur",
        "une phrase de passe assez longue",
    )
    .await;
    assert_eq!(heading, "Bienvenue !");
    browser.close().await.expect("close the browser");

    let mut auth = AuthServiceClient::new(gateway.channel());
    for (email, password) in [
        ("ann@invite.example", "a long enough passphrase"),
        (
            "francois@invite.example",
            "une phrase de passe assez longue",
        ),
    ] {
        auth.sign_in(SignInRequest {
            account_slug: slug.clone(),
            login: Some(Login::Email(email.into())),
            password: password.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("{email} signs in: {e:?}"));
    }
    amqp.close().await;
}
