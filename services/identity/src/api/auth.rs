//! AuthService: sign-in and sessions, the caller's own profile and password,
//! password reset by email, and (in [`super::api_keys`]) the account's API
//! keys. Each RPC decodes its request into a command (every violation at
//! once), calls one function of `app::auth` or `app::api_keys`, and maps the
//! result; the rules (one answer per failure, throttling, password links,
//! sessions) are described and kept in `domain::auth`,
//! `domain::password_links` and `app::auth`.

use tonic::{Request, Response, Status};
use usher_kit::{
    email::EmailAddress,
    error::{ApiError, ApiResult, Violations},
    sessions::IssuedSession,
    tokens::TokenPurpose,
};
use usher_proto::identity::v1 as pb;
use uuid::Uuid;

use super::{Call, IdentityApi, call, convert, mask_paths, status};
use crate::{
    app::auth as app,
    domain::{
        auth::{
            Login, MAX_DISPLAY_NAME, MAX_EMAIL_CHARS, MAX_SLUG_CHARS, MAX_TOKEN_CHARS,
            MAX_USER_AGENT_BYTES, MAX_USERNAME_CHARS, ProfileUpdate, SignIn, bounded,
            session_caller,
        },
        validate_locale, validate_name,
    },
    passwords::{MAX_PASSWORD_CHARS, normalize},
    store::auth::NamedUser,
};

fn internal(error: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(anyhow::anyhow!("{error}"))
}

/// The `user-agent` of a call, for the session record.
fn user_agent<T>(request: &Request<T>) -> Option<String> {
    request
        .metadata()
        .get("user-agent")
        .and_then(|v| v.to_str().ok())
        .filter(|ua| ua.len() <= MAX_USER_AGENT_BYTES)
        .map(str::to_owned)
}

/// A session as the API shows it.
fn session_view(issued: &IssuedSession, password_change_required: bool) -> pb::Session {
    let record = &issued.record;
    pb::Session {
        id: record.id.to_string(),
        access_token: issued.access_token.as_str().to_owned(),
        access_token_expire_time: Some(convert::timestamp(issued.access_expiry)),
        refresh_token: issued.refresh_token.as_str().to_owned(),
        expire_time: Some(convert::timestamp(record.absolute_expiry)),
        user_id: record.user_id.to_string(),
        account_id: record.account_id.to_string(),
        password_change_required,
    }
}

/// A user as the API shows it, with the names of its role and team.
fn user_view(named: &NamedUser) -> pb::User {
    convert::user(&named.user, &named.role_name, named.team_name.as_deref())
}

/// The session and user of a sign-in or a used password link.
fn signed_in_view(signed_in: &app::SignedIn) -> (pb::Session, pb::User) {
    let required = signed_in.user.user.password_change_required;
    (
        session_view(&signed_in.session, required),
        user_view(&signed_in.user),
    )
}

// ---------------------------------------------------------------------------
// Commands

/// A SignIn request, validated.
fn sign_in_command(request: pb::SignInRequest) -> ApiResult<SignIn> {
    use pb::sign_in_request::Login as Wire;
    let mut violations = Violations::new();
    let slug = request.account_slug.trim().to_ascii_lowercase();
    bounded(&mut violations, "account_slug", &slug, MAX_SLUG_CHARS);
    let login = match &request.login {
        None => {
            violations.add("email", "an email or a username is required");
            None
        }
        Some(Wire::Email(email)) => {
            let email = email.trim();
            bounded(&mut violations, "email", email, MAX_EMAIL_CHARS).then(|| {
                Login::Email(
                    EmailAddress::parse(email)
                        .ok()
                        .map(EmailAddress::into_canonical),
                )
            })
        }
        Some(Wire::Username(username)) => {
            let username = username.trim().to_lowercase();
            bounded(&mut violations, "username", &username, MAX_USERNAME_CHARS)
                .then_some(Login::Username(username))
        }
    };
    bounded(
        &mut violations,
        "password",
        &request.password,
        MAX_PASSWORD_CHARS,
    );
    violations.into_result()?;
    let Some(login) = login else {
        return Err(internal("validated login missing"));
    };
    // Throttled per account and login, whether they exist or not.
    let (method, login_key) = match (&login, &request.login) {
        (Login::Email(Some(canonical)), _) => ("email", canonical.clone()),
        (Login::Email(None), Some(Wire::Email(raw))) => ("email", raw.trim().to_lowercase()),
        (Login::Username(username), _) => ("username", username.clone()),
        _ => ("email", String::new()),
    };
    Ok(SignIn {
        slug,
        login,
        method,
        login_key,
        password: request.password,
    })
}

/// An UpdateCurrentUser request, validated.
fn profile_update(request: &pb::UpdateCurrentUserRequest) -> ApiResult<ProfileUpdate> {
    let paths = mask_paths(request.update_mask.as_ref(), &["display_name", "locale"])?;
    let mut violations = Violations::new();
    let mut update = ProfileUpdate::default();
    for path in &paths {
        if path == "display_name" {
            update.display_name =
                validate_name("display_name", &request.display_name, MAX_DISPLAY_NAME)
                    .map_err(|e| violations.absorb(e))
                    .ok();
        } else {
            update.locale = validate_locale("locale", &request.locale)
                .map_err(|e| violations.absorb(e))
                .ok()
                .map(Option::unwrap_or_default);
        }
    }
    violations.into_result()?;
    update.paths = paths;
    Ok(update)
}

impl IdentityApi {
    /// A ChangePassword request, validated against the password policy.
    fn change_password_command(
        &self,
        request: pb::ChangePasswordRequest,
    ) -> ApiResult<app::ChangePassword> {
        let mut violations = Violations::new();
        bounded(
            &mut violations,
            "current_password",
            &request.current_password,
            MAX_PASSWORD_CHARS,
        );
        let new_password = self
            .state
            .password_policy
            .check(&request.new_password, "new_password")
            .map_err(|e| violations.absorb(e))
            .ok();
        if new_password
            .as_deref()
            .is_some_and(|new| new == normalize(&request.current_password))
        {
            violations.add("new_password", "must differ from the current password");
        }
        violations.into_result()?;
        let Some(new_password) = new_password else {
            return Err(internal("validated password missing"));
        };
        Ok(app::ChangePassword {
            current_password: request.current_password,
            new_password,
        })
    }

    /// A ResetPassword or SetPassword request (`token`, `password`) for a
    /// link of `purpose`, validated against the password policy.
    fn use_link_command(
        &self,
        token: String,
        password: &str,
        purpose: TokenPurpose,
    ) -> ApiResult<app::UseLink> {
        let mut violations = Violations::new();
        bounded(&mut violations, "token", &token, MAX_TOKEN_CHARS);
        let new_password = self
            .state
            .password_policy
            .check(password, "new_password")
            .map_err(|e| violations.absorb(e))
            .ok();
        violations.into_result()?;
        let Some(new_password) = new_password else {
            return Err(internal("validated password missing"));
        };
        Ok(app::UseLink {
            token,
            new_password,
            purpose,
        })
    }

    // -----------------------------------------------------------------------
    // What other services' handlers call

    /// Sends a reset link to user `user_id` of the caller's account (an
    /// admin's UserService.SendPasswordReset): NOT_FOUND for an unknown user
    /// or one of another account, INVALID_STATE unless ACTIVE with an email,
    /// RATE_LIMITED past the per-user limit.
    pub async fn send_password_reset(
        &self,
        call: &Call,
        user_id: Uuid,
    ) -> ApiResult<pb::SendPasswordResetResponse> {
        let email = app::send_password_reset(&self.state, call, user_id).await?;
        Ok(pb::SendPasswordResetResponse { email })
    }

    // -----------------------------------------------------------------------
    // The RPCs

    async fn inner_sign_in(
        &self,
        call: Call,
        user_agent: Option<String>,
        request: pb::SignInRequest,
    ) -> ApiResult<pb::SignInResponse> {
        let command = sign_in_command(request)?;
        let signed_in = app::sign_in(&self.state, &call, user_agent, command).await?;
        let (session, user) = signed_in_view(&signed_in);
        Ok(pb::SignInResponse {
            session: Some(session),
            user: Some(user),
        })
    }

    async fn inner_refresh_session(
        &self,
        request: pb::RefreshSessionRequest,
    ) -> ApiResult<pb::RefreshSessionResponse> {
        let mut violations = Violations::new();
        bounded(
            &mut violations,
            "refresh_token",
            &request.refresh_token,
            MAX_TOKEN_CHARS,
        );
        violations.into_result()?;
        let (issued, required) = app::refresh_session(&self.state, &request.refresh_token).await?;
        Ok(pb::RefreshSessionResponse {
            session: Some(session_view(&issued, required)),
        })
    }

    async fn inner_sign_out(
        &self,
        call: Call,
        request: pb::SignOutRequest,
    ) -> ApiResult<pb::SignOutResponse> {
        let revoked = app::sign_out(&self.state, &call, request.all_sessions).await?;
        Ok(pb::SignOutResponse {
            revoked_sessions: i32::try_from(revoked).unwrap_or(i32::MAX),
        })
    }

    async fn inner_get_current_user(&self, call: Call) -> ApiResult<pb::GetCurrentUserResponse> {
        let current = app::current_user(&self.state, &call.principal).await?;
        let policy = &self.state.password_policy;
        Ok(pb::GetCurrentUserResponse {
            account: Some(convert::account(
                &current.account,
                current.seats_used,
                self.state.settings.default_invitation_lifetime,
            )),
            password_policy: Some(pb::PasswordPolicy {
                min_length: i32::try_from(policy.min_length()).unwrap_or(i32::MAX),
                max_length: i32::try_from(policy.max_length()).unwrap_or(i32::MAX),
            }),
            permissions: current.permissions,
            user: current.user.as_ref().map(user_view),
            session_id: current
                .session_id
                .map(|id| id.to_string())
                .unwrap_or_default(),
            session_expire_time: current.session_expire_time.map(convert::timestamp),
            api_key_id: current
                .api_key_id
                .map(|id| id.to_string())
                .unwrap_or_default(),
        })
    }

    async fn inner_update_current_user(
        &self,
        call: Call,
        request: pb::UpdateCurrentUserRequest,
    ) -> ApiResult<pb::UpdateCurrentUserResponse> {
        let (account_id, user_id, _) = session_caller(&call.principal)?;
        let update = profile_update(&request)?;
        let updated =
            app::update_current_user(&self.state, &call, (account_id, user_id), update).await?;
        Ok(pb::UpdateCurrentUserResponse {
            user: Some(user_view(&updated)),
        })
    }

    async fn inner_change_password(
        &self,
        call: Call,
        user_agent: Option<String>,
        request: pb::ChangePasswordRequest,
    ) -> ApiResult<pb::ChangePasswordResponse> {
        let (account_id, user_id, _) = session_caller(&call.principal)?;
        let command = self.change_password_command(request)?;
        let issued = app::change_password(
            &self.state,
            &call,
            (account_id, user_id),
            user_agent,
            command,
        )
        .await?;
        Ok(pb::ChangePasswordResponse {
            session: Some(session_view(&issued, false)),
        })
    }

    async fn inner_request_password_reset(
        &self,
        call: Call,
        request: pb::RequestPasswordResetRequest,
    ) -> ApiResult<pb::RequestPasswordResetResponse> {
        let mut violations = Violations::new();
        let slug = request.account_slug.trim().to_ascii_lowercase();
        bounded(&mut violations, "account_slug", &slug, MAX_SLUG_CHARS);
        let email = request.email.trim();
        bounded(&mut violations, "email", email, MAX_EMAIL_CHARS);
        let locale = validate_locale("locale", &request.locale)
            .map_err(|e| violations.absorb(e))
            .ok()
            .flatten();
        violations.into_result()?;
        // An address that does not parse belongs to nobody: the same answer.
        let canonical = EmailAddress::parse(email)
            .ok()
            .map(EmailAddress::into_canonical);
        let command = app::ResetRequest {
            slug,
            email: email.to_owned(),
            canonical,
            locale: locale.unwrap_or_default(),
        };
        app::request_password_reset(&self.state, &call, command).await?;
        Ok(pb::RequestPasswordResetResponse {})
    }

    async fn inner_reset_password(
        &self,
        call: Call,
        user_agent: Option<String>,
        request: pb::ResetPasswordRequest,
    ) -> ApiResult<pb::ResetPasswordResponse> {
        let command = self.use_link_command(
            request.token,
            &request.new_password,
            TokenPurpose::PasswordReset,
        )?;
        let signed_in = app::use_password_link(&self.state, &call, user_agent, command).await?;
        let (_, user) = signed_in_view(&signed_in);
        Ok(pb::ResetPasswordResponse {
            session: Some(session_view(&signed_in.session, false)),
            user: Some(user),
        })
    }

    async fn inner_set_password(
        &self,
        call: Call,
        user_agent: Option<String>,
        request: pb::SetPasswordRequest,
    ) -> ApiResult<pb::SetPasswordResponse> {
        let command = self.use_link_command(
            request.token,
            &request.new_password,
            TokenPurpose::SetPassword,
        )?;
        let signed_in = app::use_password_link(&self.state, &call, user_agent, command).await?;
        let (_, user) = signed_in_view(&signed_in);
        Ok(pb::SetPasswordResponse {
            session: Some(session_view(&signed_in.session, false)),
            user: Some(user),
        })
    }
}
#[tonic::async_trait]
impl pb::auth_service_server::AuthService for IdentityApi {
    async fn sign_in(
        &self,
        request: Request<pb::SignInRequest>,
    ) -> Result<Response<pb::SignInResponse>, Status> {
        let call = call(&request)?;
        let agent = user_agent(&request);
        self.inner_sign_in(call, agent, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn refresh_session(
        &self,
        request: Request<pb::RefreshSessionRequest>,
    ) -> Result<Response<pb::RefreshSessionResponse>, Status> {
        call(&request)?;
        self.inner_refresh_session(request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn sign_out(
        &self,
        request: Request<pb::SignOutRequest>,
    ) -> Result<Response<pb::SignOutResponse>, Status> {
        let call = call(&request)?;
        self.inner_sign_out(call, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn get_current_user(
        &self,
        request: Request<pb::GetCurrentUserRequest>,
    ) -> Result<Response<pb::GetCurrentUserResponse>, Status> {
        let call = call(&request)?;
        self.inner_get_current_user(call)
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn update_current_user(
        &self,
        request: Request<pb::UpdateCurrentUserRequest>,
    ) -> Result<Response<pb::UpdateCurrentUserResponse>, Status> {
        let call = call(&request)?;
        self.inner_update_current_user(call, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn change_password(
        &self,
        request: Request<pb::ChangePasswordRequest>,
    ) -> Result<Response<pb::ChangePasswordResponse>, Status> {
        let call = call(&request)?;
        let agent = user_agent(&request);
        self.inner_change_password(call, agent, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn request_password_reset(
        &self,
        request: Request<pb::RequestPasswordResetRequest>,
    ) -> Result<Response<pb::RequestPasswordResetResponse>, Status> {
        let call = call(&request)?;
        self.inner_request_password_reset(call, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn reset_password(
        &self,
        request: Request<pb::ResetPasswordRequest>,
    ) -> Result<Response<pb::ResetPasswordResponse>, Status> {
        let call = call(&request)?;
        let agent = user_agent(&request);
        self.inner_reset_password(call, agent, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn set_password(
        &self,
        request: Request<pb::SetPasswordRequest>,
    ) -> Result<Response<pb::SetPasswordResponse>, Status> {
        let call = call(&request)?;
        let agent = user_agent(&request);
        self.inner_set_password(call, agent, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let call = call(&request)?;
        self.inner_create_api_key(call, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        let call = call(&request)?;
        self.inner_list_api_keys(call, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::RevokeApiKeyResponse>, Status> {
        let call = call(&request)?;
        self.inner_revoke_api_key(call, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }
}
