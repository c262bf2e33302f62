//! The password pages: `/reset?token=…` (the link of a password-reset email)
//! and `/set-password?token=…` (the link emailed to a user created without a
//! password). Same hardening as the invitation page (see the parent module).
//!
//! `GET` shows a form for the new password, consuming nothing (there is no
//! preview of a reset token: the link is checked when the form is sent).
//! `POST` (form fields `token`, `lang`, `password`) calls
//! `AuthService.ResetPassword` or `AuthService.SetPassword` through the
//! gateway's own stack, like any public call (rate limited per client IP).
//! Every unusable link shows the same page. The session the RPC returns is
//! not used: the user signs in to the platform's own application.
//!
//! Language: the switch (`lang`), else the `locale` the link carries (the
//! user's, written by identity), else `Accept-Language`, else English.

use http::{
    HeaderValue, Method, Request, Response, StatusCode,
    header::{ACCEPT_LANGUAGE, ALLOW, RETRY_AFTER},
};
use http_body_util::BodyExt;
use tonic::{Code, body::Body, transport::server::TcpConnectInfo};
use tower::Service;
use usher_kit::error::{ApiError, Reason};
use usher_proto::identity::v1::{self as pb, auth_service_client::AuthServiceClient};

use super::{
    BoxError, Chooser, Lang, Loopback, MAX_FORM_BYTES, MAX_TOKEN_CHARS, Pages, View, failure,
    passed_headers, query_param, texts,
};

/// Which password page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PasswordPage {
    /// `/reset`: a password-reset link.
    Reset,
    /// `/set-password`: the first password of a directly created user.
    SetPassword,
}

impl PasswordPage {
    /// The page's path.
    pub fn path(self) -> &'static str {
        match self {
            Self::Reset => super::RESET_PATH,
            Self::SetPassword => super::SET_PASSWORD_PATH,
        }
    }

    /// The template's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Reset => "reset",
            Self::SetPassword => "set",
        }
    }
}

/// The form fields of a POST.
#[derive(Debug, Default)]
struct Form {
    token: String,
    lang: String,
    password: String,
}

fn parse_form(body: &[u8]) -> Form {
    let mut form = Form::default();
    for (key, value) in url::form_urlencoded::parse(body) {
        let field = match key.as_ref() {
            "token" => &mut form.token,
            "lang" => &mut form.lang,
            "password" => &mut form.password,
            _ => continue,
        };
        *field = value.into_owned();
    }
    form
}

fn usable(token: &str) -> bool {
    !token.is_empty() && token.len() <= MAX_TOKEN_CHARS
}

/// Answers `GET`, `HEAD` and `POST` of `page`.
pub(super) async fn handle<S>(
    pages: &Pages,
    inner: S,
    request: Request<Body>,
    page: PasswordPage,
) -> Response<Body>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send,
{
    let path = page.path();
    let (parts, body) = request.into_parts();
    let accept_language = parts
        .headers
        .get(ACCEPT_LANGUAGE)
        .and_then(|v| v.to_str().ok());
    match parts.method {
        Method::GET | Method::HEAD => {
            let query = parts.uri.query();
            let switch = query_param(query, "lang");
            let locale = query_param(query, "locale");
            let chooser = Chooser {
                switch: switch.as_deref(),
                accept_language,
            };
            let lang = chooser.lang(locale.as_deref());
            let token = query_param(query, "token").unwrap_or_default();
            if !usable(&token) {
                return pages.render_at(path, StatusCode::GONE, lang, "", View::PasswordFailed);
            }
            let view = View::PasswordForm { page, error: None };
            pages.render_at(path, StatusCode::OK, lang, &token, view)
        }
        Method::POST => {
            let lang = Lang::negotiate(None, None, accept_language);
            let bytes = match http_body_util::Limited::new(body, MAX_FORM_BYTES)
                .collect()
                .await
            {
                Ok(collected) => collected.to_bytes(),
                Err(_) => {
                    return pages.render_at(
                        path,
                        StatusCode::PAYLOAD_TOO_LARGE,
                        lang,
                        "",
                        View::PasswordFailed,
                    );
                }
            };
            let form = parse_form(&bytes);
            let lang = Lang::negotiate(Some(&form.lang), None, accept_language);
            if !usable(&form.token) {
                return pages.render_at(path, StatusCode::GONE, lang, "", View::PasswordFailed);
            }
            let mut client = AuthServiceClient::new(Loopback {
                inner,
                connection: parts.extensions.get::<TcpConnectInfo>().cloned(),
                headers: passed_headers(&parts.headers),
            });
            let outcome = match page {
                PasswordPage::Reset => client
                    .reset_password(pb::ResetPasswordRequest {
                        token: form.token.clone(),
                        new_password: form.password,
                    })
                    .await
                    .map(|r| r.into_inner().user),
                PasswordPage::SetPassword => client
                    .set_password(pb::SetPasswordRequest {
                        token: form.token.clone(),
                        new_password: form.password,
                    })
                    .await
                    .map(|r| r.into_inner().user),
            };
            saved_or_failed(pages, page, lang, &form.token, outcome)
        }
        _ => {
            let mut response = pages.render_at(
                path,
                StatusCode::METHOD_NOT_ALLOWED,
                Lang::En,
                "",
                View::PasswordFailed,
            );
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD, POST"));
            response
        }
    }
}

/// The page after the call.
fn saved_or_failed(
    pages: &Pages,
    page: PasswordPage,
    lang: Lang,
    token: &str,
    outcome: Result<Option<pb::User>, tonic::Status>,
) -> Response<Body> {
    let path = page.path();
    match outcome {
        Ok(user) => {
            let user = user.unwrap_or_default();
            let login = if user.email.is_empty() {
                user.username
            } else {
                user.email
            };
            pages.render_at(
                path,
                StatusCode::OK,
                lang,
                "",
                View::PasswordSaved { login },
            )
        }
        Err(status) if status.code() == Code::InvalidArgument => match ApiError::from(status) {
            ApiError::InvalidArgument(violations)
                if violations.iter().any(|v| v.field == "new_password") =>
            {
                let view = View::PasswordForm {
                    page,
                    error: Some(texts(lang).bad_new_password),
                };
                pages.render_at(path, StatusCode::UNPROCESSABLE_ENTITY, lang, token, view)
            }
            _ => pages.render_at(path, StatusCode::GONE, lang, "", View::PasswordFailed),
        },
        Err(status) => {
            if ApiError::from(status.clone()).reason() == Reason::ResetTokenNotUsable {
                return pages.render_at(path, StatusCode::GONE, lang, "", View::PasswordFailed);
            }
            let (code, view) = match failure(&status) {
                (_, View::Failed) => (StatusCode::GONE, View::PasswordFailed),
                other => other,
            };
            let mut response = pages.render_at(path, code, lang, "", view);
            if code == StatusCode::TOO_MANY_REQUESTS {
                response
                    .headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from_static("60"));
            }
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_fields_are_decoded() {
        let form = parse_form(b"token=a%2Bb&lang=fr&password=p%26w+x&action=x");
        assert_eq!(form.token, "a+b");
        assert_eq!(form.lang, "fr");
        assert_eq!(form.password, "p&w x");
    }
}
