//! The invitation page at `/invite?token=…`: what an invitee's link opens;
//! and the password pages `/reset` and `/set-password` (see the `password` module).
//!
//! Server-rendered (minijinja, HTML auto-escaping), English or French, no
//! script and no external asset. The language is the page's switch (`lang`),
//! else the invitation's locale (from `PreviewInvitation`; for the password
//! pages, the `locale` their link carries), else `Accept-Language`, else
//! English.
//! `GET` shows the invitation from `PreviewInvitation` (consuming nothing)
//! and a form for a name and a password, with the password policy; `POST`
//! accepts or declines. Every unusable link shows the same page.
//!
//! The page calls the invitation service through the rest of the gateway's
//! own stack, in process: the calls are routed, authorized (they are PUBLIC
//! RPCs), rate limited per client IP like any other public call, signed and
//! forwarded exactly as a gRPC client's would be.
//!
//! Responses carry a strict Content-Security-Policy (no script, only the
//! page's own inline style by hash, forms to this origin only), no referrer
//! (the URL holds the token), no caching and no framing.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use base64::Engine as _;
use futures::future::BoxFuture;
use http::{
    HeaderMap, HeaderValue, Method, Request, Response, StatusCode,
    header::{
        ACCEPT_LANGUAGE, ALLOW, CACHE_CONTROL, CONTENT_LANGUAGE, CONTENT_SECURITY_POLICY,
        CONTENT_TYPE, REFERRER_POLICY, RETRY_AFTER, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
    },
};
use http_body_util::BodyExt;
use minijinja::{Environment, context};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tonic::{Code, body::Body, transport::server::TcpConnectInfo};
use tower::{Layer, Service, ServiceExt};
use usher_kit::error::{ApiError, Reason};
use usher_proto::invitation::v1::{self as pb, invitation_service_client::InvitationServiceClient};

mod password;

pub use password::PasswordPage;

/// The invitation page's path.
pub const PATH: &str = "/invite";
/// The password-reset page's path (the link of a reset email).
pub const RESET_PATH: &str = "/reset";
/// The set-password page's path (the link emailed to a user created without
/// a password).
pub const SET_PASSWORD_PATH: &str = "/set-password";
/// Largest form body accepted.
const MAX_FORM_BYTES: usize = 16 * 1024;
/// Longest token passed on (the service refuses longer ones anyway).
const MAX_TOKEN_CHARS: usize = 128;

const TEMPLATE: &str = include_str!("page.html");
const STYLE: &str = "body{font:16px/1.5 system-ui,sans-serif;margin:0;background:#f5f5f7;color:#1d1d1f}\
main{max-width:28rem;margin:3rem auto;padding:2rem;background:#fff;border-radius:12px;box-shadow:0 1px 4px #0002}\
nav{text-align:right;font-size:.9rem}h1{font-size:1.5rem;margin:.5rem 0 1rem}.lead{font-size:1.1rem}\
dl{display:grid;grid-template-columns:auto 1fr;gap:.25rem 1rem}dt{color:#6e6e73}dd{margin:0}\
label{display:block;margin-top:1rem;font-weight:600}input{width:100%;box-sizing:border-box;padding:.6rem;font:inherit;border:1px solid #c7c7cc;border-radius:8px}\
.hint{color:#6e6e73;font-size:.9rem}.error{color:#b00020;font-weight:600}\
button{margin-top:1.25rem;width:100%;padding:.7rem;font:inherit;font-weight:600;color:#fff;background:#0a58ca;border:0;border-radius:8px;cursor:pointer}\
button.secondary{background:none;color:#6e6e73;font-weight:400;margin-top:.5rem}";

/// A language of the page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lang {
    /// English (the default).
    En,
    /// French.
    Fr,
}

impl Lang {
    fn code(self) -> &'static str {
        match self {
            Self::En => "en",
            Self::Fr => "fr",
        }
    }

    fn other(self) -> Self {
        match self {
            Self::En => Self::Fr,
            Self::Fr => Self::En,
        }
    }

    fn parse(tag: &str) -> Option<Self> {
        let primary = tag.trim().split(['-', '_']).next()?.to_ascii_lowercase();
        match primary.as_str() {
            "en" => Some(Self::En),
            "fr" => Some(Self::Fr),
            _ => None,
        }
    }

    /// The language asked for explicitly (the page's switch, `lang`), else
    /// the one the link or its invitation names (`preferred`: the
    /// invitation's or the user's locale), else the best of
    /// `Accept-Language` we speak, else English.
    pub fn negotiate(
        explicit: Option<&str>,
        preferred: Option<&str>,
        accept_language: Option<&str>,
    ) -> Self {
        if let Some(lang) = explicit.and_then(Self::parse) {
            return lang;
        }
        if let Some(lang) = preferred.and_then(Self::parse) {
            return lang;
        }
        let mut best: Option<(Self, f32)> = None;
        for item in accept_language.unwrap_or_default().split(',').take(20) {
            let mut parts = item.split(';');
            let Some(lang) = parts.next().and_then(Self::parse) else {
                continue;
            };
            let q = parts
                .find_map(|p| p.trim().strip_prefix("q="))
                .and_then(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            if q > 0.0 && best.is_none_or(|(_, b)| q > b) {
                best = Some((lang, q));
            }
        }
        best.map_or(Self::En, |(lang, _)| lang)
    }
}

/// The words of the page in one language.
#[derive(Serialize)]
struct Texts {
    title: &'static str,
    switch: &'static str,
    heading: &'static str,
    invited_by: &'static str,
    email: &'static str,
    role: &'static str,
    team: &'static str,
    expires: &'static str,
    name: &'static str,
    password: &'static str,
    policy: &'static str,
    accept: &'static str,
    decline: &'static str,
    accepted_heading: &'static str,
    accepted: &'static str,
    sign_in_hint: &'static str,
    declined_heading: &'static str,
    declined: &'static str,
    failed_heading: &'static str,
    failed: &'static str,
    busy_heading: &'static str,
    busy: &'static str,
    unavailable_heading: &'static str,
    unavailable: &'static str,
    bad_name: &'static str,
    bad_password: &'static str,
    bad_input: &'static str,
    reset_title: &'static str,
    reset_lead: &'static str,
    set_title: &'static str,
    set_lead: &'static str,
    new_password: &'static str,
    password_hint: &'static str,
    save: &'static str,
    saved_heading: &'static str,
    saved: &'static str,
    password_failed: &'static str,
    bad_new_password: &'static str,
}

const EN: Texts = Texts {
    title: "Your invitation",
    switch: "Français",
    heading: "You are invited",
    invited_by: "{inviter} invited you to join {account}.",
    email: "Email",
    role: "Role",
    team: "Team",
    expires: "Link valid until",
    name: "Your name",
    password: "Choose a password",
    policy: "Between {min} and {max} characters.",
    accept: "Accept the invitation",
    decline: "Decline",
    accepted_heading: "Welcome!",
    accepted: "You are now a member of {account}.",
    sign_in_hint: "Sign in with {email} and the password you just chose.",
    declined_heading: "Invitation declined",
    declined: "You declined the invitation. You can close this page.",
    failed_heading: "This link cannot be used",
    failed: "The invitation may have expired, been used already or been withdrawn. Ask the person who invited you to send a new invitation.",
    busy_heading: "Too many attempts",
    busy: "Please wait a minute, then open your link again.",
    unavailable_heading: "Temporarily unavailable",
    unavailable: "We could not reach the service. Please try again in a few minutes.",
    bad_name: "Enter your name (at most 200 characters).",
    bad_password: "Choose a password within the length shown.",
    bad_input: "Please check what you entered.",
    reset_title: "Choose a new password",
    reset_lead: "Choose the new password of your account. Every device signed in with the old one is signed out.",
    set_title: "Choose your password",
    set_lead: "Your account is ready. Choose the password you will sign in with.",
    new_password: "New password",
    password_hint: "Use a long password: a phrase of several words is easy to remember.",
    save: "Save the password",
    saved_heading: "Password saved",
    saved: "You can now sign in with {login} and your new password.",
    password_failed: "The link may have expired or been used already. Ask for a new password-reset email, or ask your administrator to send you one.",
    bad_new_password: "This password does not meet the rules (too short or too long). Choose another one.",
};

const FR: Texts = Texts {
    title: "Votre invitation",
    switch: "English",
    heading: "Vous êtes invité",
    invited_by: "{inviter} vous invite à rejoindre {account}.",
    email: "E-mail",
    role: "Rôle",
    team: "Équipe",
    expires: "Lien valable jusqu’au",
    name: "Votre nom",
    password: "Choisissez un mot de passe",
    policy: "Entre {min} et {max} caractères.",
    accept: "Accepter l’invitation",
    decline: "Refuser",
    accepted_heading: "Bienvenue !",
    accepted: "Vous êtes maintenant membre de {account}.",
    sign_in_hint: "Connectez-vous avec {email} et le mot de passe que vous venez de choisir.",
    declined_heading: "Invitation refusée",
    declined: "Vous avez refusé l’invitation. Vous pouvez fermer cette page.",
    failed_heading: "Ce lien ne peut pas être utilisé",
    failed: "L’invitation a peut-être expiré, déjà été utilisée ou été retirée. Demandez à la personne qui vous a invité de vous envoyer une nouvelle invitation.",
    busy_heading: "Trop de tentatives",
    busy: "Patientez une minute, puis rouvrez votre lien.",
    unavailable_heading: "Service momentanément indisponible",
    unavailable: "Le service n’a pas pu être joint. Réessayez dans quelques minutes.",
    bad_name: "Indiquez votre nom (200 caractères au plus).",
    bad_password: "Choisissez un mot de passe de la longueur indiquée.",
    bad_input: "Vérifiez ce que vous avez saisi.",
    reset_title: "Choisissez un nouveau mot de passe",
    reset_lead: "Choisissez le nouveau mot de passe de votre compte. Tous les appareils connectés avec l’ancien sont déconnectés.",
    set_title: "Choisissez votre mot de passe",
    set_lead: "Votre compte est prêt. Choisissez le mot de passe avec lequel vous vous connecterez.",
    new_password: "Nouveau mot de passe",
    password_hint: "Choisissez un mot de passe long : une phrase de plusieurs mots se retient facilement.",
    save: "Enregistrer le mot de passe",
    saved_heading: "Mot de passe enregistré",
    saved: "Vous pouvez maintenant vous connecter avec {login} et votre nouveau mot de passe.",
    password_failed: "Le lien a peut-être expiré ou déjà été utilisé. Demandez un nouvel e-mail de réinitialisation du mot de passe, ou demandez à votre administrateur de vous l’envoyer.",
    bad_new_password: "Ce mot de passe ne respecte pas les règles (trop court ou trop long). Choisissez-en un autre.",
};

fn texts(lang: Lang) -> &'static Texts {
    match lang {
        Lang::En => &EN,
        Lang::Fr => &FR,
    }
}

/// The template and the headers every page carries.
#[derive(Debug)]
pub struct Pages {
    env: Environment<'static>,
    csp: HeaderValue,
}

impl Pages {
    /// Compiles the template.
    pub fn new() -> anyhow::Result<Self> {
        let mut env = Environment::new();
        // `.html` templates are auto-escaped: every value from the services
        // (names, emails) is text, never markup.
        env.add_template("page.html", TEMPLATE)?;
        let digest = Sha256::digest(STYLE.as_bytes());
        let hash = base64::engine::general_purpose::STANDARD.encode(digest);
        let csp = format!(
            "default-src 'none'; style-src 'sha256-{hash}'; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'"
        );
        Ok(Self {
            env,
            csp: HeaderValue::from_str(&csp)?,
        })
    }

    fn render(&self, status: StatusCode, lang: Lang, token: &str, view: View) -> Response<Body> {
        self.render_at(PATH, status, lang, token, view)
    }

    /// The page at `path` (the form posts there, the switch links there).
    fn render_at(
        &self,
        path: &str,
        status: StatusCode,
        lang: Lang,
        token: &str,
        view: View,
    ) -> Response<Body> {
        let switch_href = if token.is_empty() {
            format!("{path}?lang={}", lang.other().code())
        } else {
            let token: String = url::form_urlencoded::byte_serialize(token.as_bytes()).collect();
            format!("{path}?token={token}&lang={}", lang.other().code())
        };
        let html = self
            .env
            .get_template("page.html")
            .and_then(|template| {
                template.render(context! {
                    lang => lang.code(),
                    other_lang => lang.other().code(),
                    switch_href,
                    t => minijinja::value::Serde(texts(lang)),
                    style => STYLE,
                    path,
                    token,
                    ..view.context()
                })
            })
            .unwrap_or_else(|err| {
                tracing::error!(error = %err, "invitation page not rendered");
                String::from("<!doctype html><title>Error</title>")
            });
        let mut response = Response::new(Body::new(http_body_util::Full::new(bytes::Bytes::from(
            html,
        ))));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        headers.insert(CONTENT_LANGUAGE, HeaderValue::from_static(lang.code()));
        headers.insert(CONTENT_SECURITY_POLICY, self.csp.clone());
        headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        headers.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        response
    }
}

/// What a page shows.
enum View {
    Form {
        preview: pb::PreviewInvitationResponse,
        display_name: String,
        error: Option<&'static str>,
    },
    Accepted {
        account: String,
        email: String,
    },
    Declined,
    Failed,
    Busy,
    Unavailable,
    /// The form of a reset or set-password page.
    PasswordForm {
        page: PasswordPage,
        error: Option<&'static str>,
    },
    /// The password was saved; `login` is the user's email or username.
    PasswordSaved {
        login: String,
    },
    /// The reset or set-password link cannot be used.
    PasswordFailed,
}

impl View {
    fn context(self) -> minijinja::Value {
        match self {
            Self::Form {
                preview,
                display_name,
                error,
            } => {
                let policy = preview.password_policy.unwrap_or_default();
                let expires = preview
                    .expire_time
                    .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, 0))
                    .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
                    .unwrap_or_default();
                context! {
                    kind => "form",
                    inviter => preview.inviter_display_name,
                    account => preview.account_name,
                    email => preview.email,
                    role => preview.role_name,
                    team => preview.team_name,
                    expires,
                    display_name,
                    error,
                    min_length => policy.min_length.max(1),
                    max_length => if policy.max_length > 0 { policy.max_length } else { 128 },
                }
            }
            Self::Accepted { account, email } => {
                context! { kind => "accepted", account, email }
            }
            Self::PasswordForm { page, error } => {
                context! { kind => "password_form", password_page => page.name(), error }
            }
            Self::PasswordSaved { login } => context! { kind => "password_saved", login },
            Self::PasswordFailed => context! { kind => "password_failed" },
            Self::Declined => context! { kind => "declined" },
            Self::Failed => context! { kind => "failed" },
            Self::Busy => context! { kind => "busy" },
            Self::Unavailable => context! { kind => "unavailable" },
        }
    }
}

/// Layer of [`PageService`].
#[derive(Clone, Debug)]
pub struct PageLayer {
    pages: Arc<Pages>,
}

impl PageLayer {
    /// Serves `pages` at [`PATH`].
    pub fn new(pages: Pages) -> Self {
        Self {
            pages: Arc::new(pages),
        }
    }
}

impl<S> Layer<S> for PageLayer {
    type Service = PageService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        PageService {
            inner,
            pages: self.pages.clone(),
        }
    }
}

/// Answers [`PATH`] itself, calling the invitation service through `inner`
/// (the rest of the gateway); every other path goes to `inner`.
#[derive(Clone, Debug)]
pub struct PageService<S> {
    inner: S,
    pages: Arc<Pages>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S> Service<Request<Body>> for PageService<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        if ![PATH, RESET_PATH, SET_PASSWORD_PATH].contains(&request.uri().path()) {
            let clone = self.inner.clone();
            let inner = std::mem::replace(&mut self.inner, clone);
            return Box::pin(inner.oneshot(request));
        }
        let inner = self.inner.clone();
        let pages = self.pages.clone();
        Box::pin(async move { Ok(handle(&pages, inner, request).await) })
    }
}

/// The inner stack as a gRPC transport, carrying the browser's connection
/// (for per-IP limits) and request id on every call.
#[derive(Clone)]
struct Loopback<S> {
    inner: S,
    connection: Option<TcpConnectInfo>,
    headers: HeaderMap,
}

impl<S> Service<Request<Body>> for Loopback<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        // A gRPC call, whatever the browser's HTTP version (the gRPC-Web
        // layer below refuses other HTTP/1.1 requests).
        *request.version_mut() = http::Version::HTTP_2;
        if let Some(connection) = &self.connection {
            request.extensions_mut().insert(connection.clone());
        }
        for (name, value) in &self.headers {
            request.headers_mut().insert(name, value.clone());
        }
        self.inner.call(request)
    }
}

/// The browser's headers passed on to the calls: the request id (joined
/// logs) and forwarded-for (per-IP limits behind a trusted proxy).
fn passed_headers(headers: &HeaderMap) -> HeaderMap {
    let mut passed = HeaderMap::new();
    for name in ["x-request-id", "x-forwarded-for", "user-agent"] {
        if let Some(value) = headers.get(name) {
            passed.insert(name, value.clone());
        }
    }
    passed
}

/// The form fields of a POST.
#[derive(Debug, Default)]
struct Form {
    token: String,
    lang: String,
    action: String,
    display_name: String,
    password: String,
}

fn parse_form(body: &[u8]) -> Form {
    let mut form = Form::default();
    for (key, value) in url::form_urlencoded::parse(body) {
        let field = match key.as_ref() {
            "token" => &mut form.token,
            "lang" => &mut form.lang,
            "action" => &mut form.action,
            "display_name" => &mut form.display_name,
            "password" => &mut form.password,
            _ => continue,
        };
        *field = value.into_owned();
    }
    form
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

/// The page for a failed call.
fn failure(status: &tonic::Status) -> (StatusCode, View) {
    match status.code() {
        Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, View::Busy),
        Code::Unavailable | Code::DeadlineExceeded | Code::Internal | Code::Unknown => {
            (StatusCode::SERVICE_UNAVAILABLE, View::Unavailable)
        }
        _ => (StatusCode::GONE, View::Failed),
    }
}

async fn handle<S>(pages: &Pages, inner: S, request: Request<Body>) -> Response<Body>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send,
{
    let page = match request.uri().path() {
        RESET_PATH => Some(PasswordPage::Reset),
        SET_PASSWORD_PATH => Some(PasswordPage::SetPassword),
        _ => None,
    };
    if let Some(page) = page {
        return password::handle(pages, inner, request, page).await;
    }
    let (parts, body) = request.into_parts();
    let accept_language = parts
        .headers
        .get(ACCEPT_LANGUAGE)
        .and_then(|v| v.to_str().ok());
    let mut client = InvitationServiceClient::new(Loopback {
        inner,
        connection: parts.extensions.get::<TcpConnectInfo>().cloned(),
        headers: passed_headers(&parts.headers),
    });
    match parts.method {
        Method::GET | Method::HEAD => {
            let query = parts.uri.query();
            let switch = query_param(query, "lang");
            let token = query_param(query, "token").unwrap_or_default();
            show_form(
                pages,
                &mut client,
                Chooser {
                    switch: switch.as_deref(),
                    accept_language,
                },
                token,
            )
            .await
        }
        Method::POST => {
            let lang = Lang::negotiate(None, None, accept_language);
            let bytes = match http_body_util::Limited::new(body, MAX_FORM_BYTES)
                .collect()
                .await
            {
                Ok(collected) => collected.to_bytes(),
                Err(_) => {
                    return pages.render(StatusCode::PAYLOAD_TOO_LARGE, lang, "", View::Failed);
                }
            };
            let form = parse_form(&bytes);
            let lang = Lang::negotiate(Some(&form.lang), None, accept_language);
            submit(pages, &mut client, lang, form).await
        }
        _ => {
            let mut response =
                pages.render(StatusCode::METHOD_NOT_ALLOWED, Lang::En, "", View::Failed);
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD, POST"));
            response
        }
    }
}

type Client<S> = InvitationServiceClient<Loopback<S>>;

/// What a GET's language is chosen from: the page's switch (`lang`), the
/// browser's `Accept-Language`, and (see [`Chooser::lang`]) the locale of the
/// invitation or of the link.
#[derive(Clone, Copy)]
struct Chooser<'a> {
    switch: Option<&'a str>,
    accept_language: Option<&'a str>,
}

impl Chooser<'_> {
    /// The switch, else `preferred`, else the browser, else English.
    fn lang(self, preferred: Option<&str>) -> Lang {
        Lang::negotiate(self.switch, preferred, self.accept_language)
    }
}

/// The invitation form (in the invitation's locale unless the switch or, for
/// an invitation without one, the browser says otherwise), or the page saying
/// why it cannot be shown.
async fn show_form<S>(
    pages: &Pages,
    client: &mut Client<S>,
    chooser: Chooser<'_>,
    token: String,
) -> Response<Body>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send,
{
    let lang = chooser.lang(None);
    if token.is_empty() || token.len() > MAX_TOKEN_CHARS {
        return pages.render(StatusCode::GONE, lang, "", View::Failed);
    }
    match client
        .preview_invitation(pb::PreviewInvitationRequest {
            token: token.clone(),
        })
        .await
    {
        Ok(preview) => {
            let preview = preview.into_inner();
            let lang = chooser.lang(Some(&preview.locale));
            let display_name = preview.display_name.clone();
            let view = View::Form {
                preview,
                display_name,
                error: None,
            };
            pages.render(StatusCode::OK, lang, &token, view)
        }
        Err(status) => {
            let (code, view) = failure(&status);
            let mut response = pages.render(code, lang, "", view);
            if code == StatusCode::TOO_MANY_REQUESTS {
                response
                    .headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from_static("60"));
            }
            response
        }
    }
}

/// Accepts or declines with the form's token.
async fn submit<S>(pages: &Pages, client: &mut Client<S>, lang: Lang, form: Form) -> Response<Body>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send,
{
    if form.token.is_empty() || form.token.len() > MAX_TOKEN_CHARS {
        return pages.render(StatusCode::GONE, lang, "", View::Failed);
    }
    if form.action == "decline" {
        return match client
            .decline_invitation(pb::DeclineInvitationRequest { token: form.token })
            .await
        {
            Ok(_) => pages.render(StatusCode::OK, lang, "", View::Declined),
            Err(status) => {
                let (code, view) = failure(&status);
                pages.render(code, lang, "", view)
            }
        };
    }
    // The preview gives the account's name for the welcome page (and checks
    // the link before a password is hashed).
    let preview = match client
        .preview_invitation(pb::PreviewInvitationRequest {
            token: form.token.clone(),
        })
        .await
    {
        Ok(preview) => preview.into_inner(),
        Err(status) => {
            let (code, view) = failure(&status);
            return pages.render(code, lang, "", view);
        }
    };
    let accepted = client
        .accept_invitation(pb::AcceptInvitationRequest {
            token: form.token.clone(),
            display_name: form.display_name.clone(),
            password: form.password,
            locale: lang.code().to_owned(),
        })
        .await;
    match accepted {
        Ok(_) => pages.render(
            StatusCode::OK,
            lang,
            "",
            View::Accepted {
                account: preview.account_name,
                email: preview.email,
            },
        ),
        Err(status) if status.code() == Code::InvalidArgument => {
            let words = texts(lang);
            let error = match ApiError::from(status) {
                ApiError::InvalidArgument(violations)
                    if violations.iter().any(|v| v.field == "password") =>
                {
                    words.bad_password
                }
                ApiError::InvalidArgument(violations)
                    if violations.iter().any(|v| v.field == "display_name") =>
                {
                    words.bad_name
                }
                _ => words.bad_input,
            };
            let view = View::Form {
                preview,
                display_name: form.display_name,
                error: Some(error),
            };
            pages.render(StatusCode::UNPROCESSABLE_ENTITY, lang, &form.token, view)
        }
        Err(status) => {
            if ApiError::from(status.clone()).reason() == Reason::InvitationNotUsable {
                return pages.render(StatusCode::GONE, lang, "", View::Failed);
            }
            let (code, view) = failure(&status);
            pages.render(code, lang, "", view)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_language_follows_the_switch_then_the_browser() {
        assert_eq!(Lang::negotiate(None, None, None), Lang::En);
        assert_eq!(
            Lang::negotiate(None, None, Some("fr-FR,fr;q=0.9,en;q=0.8")),
            Lang::Fr
        );
        assert_eq!(
            Lang::negotiate(None, None, Some("de-DE,en;q=0.5,fr;q=0.7")),
            Lang::Fr
        );
        assert_eq!(Lang::negotiate(None, None, Some("de, ja")), Lang::En);
        assert_eq!(Lang::negotiate(None, None, Some("fr;q=0, en")), Lang::En);
        assert_eq!(Lang::negotiate(Some("en"), None, Some("fr")), Lang::En);
        assert_eq!(Lang::negotiate(Some("xx"), None, Some("fr-CA")), Lang::Fr);
    }

    #[test]
    fn the_invitation_or_link_locale_comes_after_the_switch_and_before_the_browser() {
        // No Accept-Language: the invitation's (or the link's) locale.
        assert_eq!(Lang::negotiate(None, Some("fr"), None), Lang::Fr);
        // It outranks the browser.
        assert_eq!(
            Lang::negotiate(None, Some("fr"), Some("en-US,en")),
            Lang::Fr
        );
        assert_eq!(Lang::negotiate(None, Some("en"), Some("fr")), Lang::En);
        // The switch outranks it.
        assert_eq!(
            Lang::negotiate(Some("en"), Some("fr"), Some("fr")),
            Lang::En
        );
        // None, or one we do not speak: the browser, then English.
        assert_eq!(Lang::negotiate(None, Some(""), Some("fr")), Lang::Fr);
        assert_eq!(Lang::negotiate(None, Some("de"), Some("fr")), Lang::Fr);
        assert_eq!(Lang::negotiate(None, Some("de"), None), Lang::En);
    }

    fn preview(name: &str) -> pb::PreviewInvitationResponse {
        pb::PreviewInvitationResponse {
            account_name: name.into(),
            inviter_display_name: name.into(),
            email: "ivy@example.com".into(),
            display_name: name.into(),
            role_name: "User".into(),
            ..Default::default()
        }
    }

    async fn body_of(response: Response<Body>) -> String {
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        String::from_utf8(bytes.to_vec()).expect("utf-8")
    }

    #[tokio::test]
    async fn names_are_escaped_and_headers_are_strict() {
        let pages = Pages::new().expect("template");
        let hostile = "<script>alert(1)</script><a href=\"https://evil.example\">x</a>{{ t.title }}\r\nBcc: x";
        let response = pages.render(
            StatusCode::OK,
            Lang::En,
            "tok",
            View::Form {
                preview: preview(hostile),
                display_name: String::new(),
                error: None,
            },
        );
        let headers = response.headers().clone();
        let html = body_of(response).await;
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains("https://evil.example\""), "{html}");
        assert!(html.contains("&lt;script&gt;"), "{html}");
        assert!(
            html.contains("{{ t.title }}"),
            "template syntax in data stays text"
        );
        let csp = headers[CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(csp.starts_with("default-src 'none'"), "{csp}");
        assert!(!csp.contains("unsafe"), "{csp}");
        assert_eq!(headers[REFERRER_POLICY], "no-referrer");
        assert_eq!(headers[CACHE_CONTROL], "no-store");
        assert_eq!(headers[CONTENT_LANGUAGE], "en");
    }

    #[tokio::test]
    async fn the_page_speaks_french() {
        let pages = Pages::new().expect("template");
        let response = pages.render(
            StatusCode::OK,
            Lang::Fr,
            "tok",
            View::Form {
                preview: preview("Acme"),
                display_name: String::new(),
                error: None,
            },
        );
        let html = body_of(response).await;
        assert!(html.contains("<html lang=\"fr\">"));
        assert!(
            html.contains("Acme vous invite à rejoindre Acme."),
            "{html}"
        );
        assert!(html.contains("Accepter l’invitation"));
        assert!(html.contains("lang=en"), "a switch to English");
        let failed = body_of(pages.render(StatusCode::GONE, Lang::Fr, "", View::Failed)).await;
        assert!(failed.contains("Ce lien ne peut pas être utilisé"));
    }

    #[tokio::test]
    async fn password_pages_post_to_themselves_in_their_language_with_the_same_headers() {
        let pages = Pages::new().expect("template");
        let response = pages.render_at(
            SET_PASSWORD_PATH,
            StatusCode::OK,
            Lang::Fr,
            "t<o>k",
            View::PasswordForm {
                page: PasswordPage::SetPassword,
                error: None,
            },
        );
        let headers = response.headers().clone();
        let html = body_of(response).await;
        assert!(html.contains("<html lang=\"fr\">"), "{html}");
        assert!(
            html.contains("<title>Choisissez votre mot de passe</title>"),
            "{html}"
        );
        assert!(html.contains("action=\"/set-password\""), "{html}");
        assert!(
            html.contains("value=\"t&lt;o&gt;k\""),
            "the token is escaped: {html}"
        );
        assert!(
            html.contains("set-password?token=t%3Co%3Ek&amp;lang=en\""),
            "{html}"
        );
        assert!(!html.contains("Accepter"), "{html}");
        assert_eq!(headers[CONTENT_SECURITY_POLICY], pages.csp);
        assert_eq!(headers[REFERRER_POLICY], "no-referrer");
        assert_eq!(headers[CACHE_CONTROL], "no-store");
        assert_eq!(headers[CONTENT_LANGUAGE], "fr");

        let reset = body_of(pages.render_at(
            RESET_PATH,
            StatusCode::OK,
            Lang::En,
            "tok",
            View::PasswordForm {
                page: PasswordPage::Reset,
                error: Some(EN.bad_new_password),
            },
        ))
        .await;
        assert!(reset.contains("<h1>Choose a new password</h1>"), "{reset}");
        assert!(reset.contains("action=\"/reset\""), "{reset}");
        assert!(reset.contains(EN.bad_new_password), "{reset}");

        let saved = body_of(pages.render_at(
            RESET_PATH,
            StatusCode::OK,
            Lang::En,
            "",
            View::PasswordSaved {
                login: "<b>sam@example.com</b>".into(),
            },
        ))
        .await;
        assert!(saved.contains("&lt;b&gt;sam@example.com"), "{saved}");
        let failed = body_of(pages.render_at(
            SET_PASSWORD_PATH,
            StatusCode::GONE,
            Lang::Fr,
            "",
            View::PasswordFailed,
        ))
        .await;
        assert!(
            failed.contains("Ce lien ne peut pas être utilisé"),
            "{failed}"
        );
        assert!(!failed.contains("invitation"), "{failed}");
    }

    #[test]
    fn form_fields_are_decoded() {
        let form =
            parse_form(b"token=a%2Bb&lang=fr&action=accept&display_name=Ivy+I&password=p%26w&x=1");
        assert_eq!(form.token, "a+b");
        assert_eq!(form.lang, "fr");
        assert_eq!(form.display_name, "Ivy I");
        assert_eq!(form.password, "p&w");
    }
}
