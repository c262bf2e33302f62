//! UserService handlers: each decodes its request into a command (every
//! violation at once), calls one command of [`crate::app::users`] and maps
//! the answer. The rules are in `domain::users`, `domain::managers` and
//! `domain::seats`; the queries in `store::users`.

use std::collections::{BTreeSet, HashSet};

use tonic::{Request, Response, Status};
use usher_kit::{
    email::EmailAddress,
    error::{ApiError, ApiResult, Violations},
    pagination,
};
use usher_proto::identity::v1 as pb;

use super::{
    Call, IdentityApi, call, mask_paths, status,
    validate::{validate_metadata, validate_products},
};
use crate::{
    app::users::ListUsers,
    domain::{
        UserStatus, parse_id, parse_optional_id,
        users::{
            BATCH_PATHS, BatchUpdate, CreateUser, ListFilter, MAX_BATCH, MAX_DISPLAY_NAME,
            MAX_QUERY_CHARS, MIN_QUERY_CHARS, UPDATE_PATHS, UpdateUser, UserOrder, item_message,
            validate_username,
        },
        validate_locale, validate_name,
    },
    store::idempotency::IdempotencyKey,
};

/// The error of a decoder whose checked fields went missing (a bug).
fn missing() -> ApiError {
    ApiError::Internal(anyhow::anyhow!("validated fields missing"))
}

/// The order of a ListUsers.
fn order_of(value: i32) -> ApiResult<UserOrder> {
    match pb::UserOrderBy::try_from(value) {
        Ok(pb::UserOrderBy::Unspecified | pb::UserOrderBy::DisplayName) => {
            Ok(UserOrder::DisplayName)
        }
        Ok(pb::UserOrderBy::Email) => Ok(UserOrder::Email),
        Ok(pb::UserOrderBy::CreateTimeDesc) => Ok(UserOrder::Newest),
        Err(_) => Err(ApiError::invalid("order_by", "is not a known order")),
    }
}

/// Decodes a ListUsers.
fn list_query(call: &Call, request: pb::ListUsersRequest) -> ApiResult<ListUsers> {
    let account_id = call.principal.account()?;
    let mut violations = Violations::new();
    let size = pagination::page_size(request.page_size)
        .map_err(|e| violations.absorb(e))
        .ok();
    let status = match pb::UserStatus::try_from(request.status) {
        Ok(pb::UserStatus::Unspecified) => None,
        Ok(pb::UserStatus::Invited) => Some(UserStatus::Invited),
        Ok(pb::UserStatus::Active) => Some(UserStatus::Active),
        Ok(pb::UserStatus::Inactive) => Some(UserStatus::Inactive),
        Err(_) => {
            violations.add("status", "is not a known status");
            None
        }
    };
    let role_id = parse_optional_id("role_id", &request.role_id)
        .map_err(|e| violations.absorb(e))
        .ok()
        .flatten();
    let team_id = parse_optional_id("team_id", &request.team_id)
        .map_err(|e| violations.absorb(e))
        .ok()
        .flatten();
    let term = request.query.trim();
    if !term.is_empty() && !(MIN_QUERY_CHARS..=MAX_QUERY_CHARS).contains(&term.chars().count()) {
        violations.add(
            "query",
            format!("must be {MIN_QUERY_CHARS} to {MAX_QUERY_CHARS} characters"),
        );
    }
    let order = order_of(request.order_by)
        .map_err(|e| violations.absorb(e))
        .ok();
    violations.into_result()?;
    let (Some(page_size), Some(order)) = (size, order) else {
        return Err(missing());
    };
    Ok(ListUsers {
        filter: ListFilter {
            account_id,
            status,
            role_id,
            team_id,
            term: term.to_lowercase(),
        },
        order,
        order_by: request.order_by,
        page_size,
        page_token: request.page_token,
    })
}

impl IdentityApi {
    /// Decodes a CreateUser: the command and the password, checked against
    /// the policy.
    fn create_command(
        &self,
        request: &pb::CreateUserRequest,
    ) -> ApiResult<(CreateUser, Option<String>)> {
        let mut violations = Violations::new();
        let username = validate_username("username", &request.username)
            .map_err(|e| violations.absorb(e))
            .ok();
        let email = if request.email.trim().is_empty() {
            None
        } else {
            EmailAddress::parse(&request.email)
                .map_err(|e| violations.add("email", e.to_string()))
                .ok()
        };
        let display_name = validate_name("display_name", &request.display_name, MAX_DISPLAY_NAME)
            .map_err(|e| violations.absorb(e))
            .ok();
        let locale = validate_locale("locale", &request.locale)
            .map_err(|e| violations.absorb(e))
            .ok()
            .flatten();
        let role_id = parse_id("role_id", &request.role_id)
            .map_err(|e| violations.absorb(e))
            .ok();
        let team_id = parse_optional_id("team_id", &request.team_id)
            .map_err(|e| violations.absorb(e))
            .ok()
            .flatten();
        let products = validate_products("products", &request.products)
            .map_err(|e| violations.absorb(e))
            .ok();
        let metadata = validate_metadata("metadata", request.metadata.as_ref())
            .map_err(|e| violations.absorb(e))
            .ok()
            .flatten();
        let password = if request.password.is_empty() {
            None
        } else {
            self.state
                .password_policy
                .check(&request.password, "password")
                .map_err(|e| violations.absorb(e))
                .ok()
        };
        violations.into_result()?;
        let (Some(username), Some(display_name), Some(role_id), Some(products)) =
            (username, display_name, role_id, products)
        else {
            return Err(missing());
        };
        let command = CreateUser {
            username,
            email,
            display_name,
            locale: locale.unwrap_or_default(),
            role_id,
            team_id,
            products,
            metadata,
            require_password_change: request.require_password_change,
        };
        Ok((command, password))
    }

    async fn create(
        &self,
        call: Call,
        mut request: pb::CreateUserRequest,
    ) -> ApiResult<pb::CreateUserResponse> {
        call.principal.account()?;
        let request_id = std::mem::take(&mut request.request_id);
        let idempotency = IdempotencyKey::new(
            &call.principal,
            "usher.identity.v1.UserService/CreateUser",
            &request_id,
            &request,
        )?;
        if let Some(key) = &idempotency
            && let Some(done) = key.replay(&self.state.db).await?
        {
            return Ok(done);
        }
        let (command, password) = self.create_command(&request)?;
        self.create_direct_user(&call, command, password, idempotency)
            .await
    }
}

/// Decodes an UpdateUser.
fn update_command(request: &pb::UpdateUserRequest) -> ApiResult<UpdateUser> {
    let mut violations = Violations::new();
    let user_id = parse_id("user_id", &request.user_id)
        .map_err(|e| violations.absorb(e))
        .ok();
    let paths: BTreeSet<String> = mask_paths(request.update_mask.as_ref(), UPDATE_PATHS)
        .map_err(|e| violations.absorb(e))
        .unwrap_or_default()
        .into_iter()
        .collect();
    let masked = |path: &str| paths.contains(path);
    let display_name = if masked("display_name") {
        validate_name("display_name", &request.display_name, MAX_DISPLAY_NAME)
            .map_err(|e| violations.absorb(e))
            .ok()
    } else {
        None
    };
    let role_id = if masked("role_id") {
        parse_id("role_id", &request.role_id)
            .map_err(|e| violations.absorb(e))
            .ok()
    } else {
        None
    };
    let team_id = if masked("team_id") {
        parse_optional_id("team_id", &request.team_id)
            .map_err(|e| violations.absorb(e))
            .ok()
    } else {
        None
    };
    let products = if masked("products") {
        validate_products("products", &request.products)
            .map_err(|e| violations.absorb(e))
            .ok()
    } else {
        None
    };
    let locale = if masked("locale") {
        validate_locale("locale", &request.locale)
            .map_err(|e| violations.absorb(e))
            .ok()
            .map(Option::unwrap_or_default)
    } else {
        None
    };
    let metadata = if masked("metadata") {
        validate_metadata("metadata", request.metadata.as_ref())
            .map_err(|e| violations.absorb(e))
            .ok()
    } else {
        None
    };
    violations.into_result()?;
    let Some(user_id) = user_id else {
        return Err(missing());
    };
    Ok(UpdateUser {
        user_id,
        display_name,
        role_id,
        team_id,
        products,
        locale,
        metadata,
    })
}

/// Decodes a BatchUpdateUsers.
fn batch_command(request: &pb::BatchUpdateUsersRequest) -> ApiResult<BatchUpdate> {
    let mut violations = Violations::new();
    if request.user_ids.is_empty() || request.user_ids.len() > MAX_BATCH {
        violations.add("user_ids", format!("must hold 1 to {MAX_BATCH} ids"));
    }
    let mut ids = Vec::with_capacity(request.user_ids.len());
    let mut seen = HashSet::with_capacity(request.user_ids.len());
    for (index, raw) in request.user_ids.iter().enumerate().take(MAX_BATCH) {
        let field = format!("user_ids[{index}]");
        match parse_id(&field, raw) {
            Ok(id) if !seen.insert(id) => violations.add(field, "is listed twice"),
            Ok(id) => ids.push(id),
            Err(e) => violations.absorb(e),
        }
    }
    let paths = mask_paths(request.update_mask.as_ref(), BATCH_PATHS)
        .map_err(|e| violations.absorb(e))
        .unwrap_or_default();
    let set_role = paths.iter().any(|p| p == "role_id");
    let set_team = paths.iter().any(|p| p == "team_id");
    let role_id = if set_role {
        parse_id("role_id", &request.role_id)
            .map_err(|e| violations.absorb(e))
            .ok()
    } else {
        None
    };
    let team_id = if set_team {
        parse_optional_id("team_id", &request.team_id)
            .map_err(|e| violations.absorb(e))
            .ok()
            .flatten()
    } else {
        None
    };
    violations.into_result()?;
    Ok(BatchUpdate {
        user_ids: ids,
        role_id,
        set_team,
        team_id,
    })
}

impl IdentityApi {
    async fn batch(
        &self,
        call: Call,
        request: pb::BatchUpdateUsersRequest,
    ) -> ApiResult<pb::BatchUpdateUsersResponse> {
        call.principal.account()?;
        let command = batch_command(&request)?;
        let mut outcome = self.change_users(&call, command.clone()).await?;
        let mut results = Vec::with_capacity(request.user_ids.len());
        let (mut updated_count, mut failed_count) = (0, 0);
        for (raw, id) in request.user_ids.iter().zip(&command.user_ids) {
            let result = match outcome.errors.remove(id) {
                Some(err) => {
                    failed_count += 1;
                    pb::BatchUpdateUsersResult {
                        user_id: raw.clone(),
                        user: None,
                        error: Some(pb::ItemError {
                            reason: err.reason().as_str().to_owned(),
                            message: item_message(&err),
                        }),
                    }
                }
                None => {
                    updated_count += 1;
                    pb::BatchUpdateUsersResult {
                        user_id: raw.clone(),
                        user: outcome.shown.remove(id),
                        error: None,
                    }
                }
            };
            results.push(result);
        }
        Ok(pb::BatchUpdateUsersResponse {
            results,
            updated_count,
            failed_count,
        })
    }
}

/// Runs `body` with the call of `request` and maps its result to the wire.
async fn answer<T, R, F>(request: Request<T>, body: F) -> Result<Response<R>, Status>
where
    T: prost::Message + prost::Name,
    F: AsyncFnOnce(Call, T) -> ApiResult<R>,
{
    let call = call(&request)?;
    body(call, request.into_inner())
        .await
        .map(Response::new)
        .map_err(status)
}

#[tonic::async_trait]
impl pb::user_service_server::UserService for IdentityApi {
    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        answer(request, async |call, request| {
            self.list_user_page(list_query(&call, request)?).await
        })
        .await
    }

    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::GetUserResponse>, Status> {
        answer(request, async |call, request: pb::GetUserRequest| {
            let account_id = call.principal.account()?;
            let user_id = parse_id("user_id", &request.user_id)?;
            let user = self.find_user(account_id, user_id).await?;
            Ok(pb::GetUserResponse { user: Some(user) })
        })
        .await
    }

    async fn create_user(
        &self,
        request: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::CreateUserResponse>, Status> {
        answer(request, async |call, request| {
            self.create(call, request).await
        })
        .await
    }

    async fn update_user(
        &self,
        request: Request<pb::UpdateUserRequest>,
    ) -> Result<Response<pb::UpdateUserResponse>, Status> {
        answer(request, async |call, request| {
            call.principal.account()?;
            let user = self.change_user(&call, update_command(&request)?).await?;
            Ok(pb::UpdateUserResponse { user: Some(user) })
        })
        .await
    }

    async fn batch_update_users(
        &self,
        request: Request<pb::BatchUpdateUsersRequest>,
    ) -> Result<Response<pb::BatchUpdateUsersResponse>, Status> {
        answer(request, async |call, request| {
            self.batch(call, request).await
        })
        .await
    }

    async fn deactivate_user(
        &self,
        request: Request<pb::DeactivateUserRequest>,
    ) -> Result<Response<pb::DeactivateUserResponse>, Status> {
        answer(request, async |call, request: pb::DeactivateUserRequest| {
            call.principal.account()?;
            let user_id = parse_id("user_id", &request.user_id)?;
            let user = self.deactivate(&call, user_id).await?;
            Ok(pb::DeactivateUserResponse { user: Some(user) })
        })
        .await
    }

    async fn reactivate_user(
        &self,
        request: Request<pb::ReactivateUserRequest>,
    ) -> Result<Response<pb::ReactivateUserResponse>, Status> {
        answer(request, async |call, request: pb::ReactivateUserRequest| {
            call.principal.account()?;
            let user_id = parse_id("user_id", &request.user_id)?;
            let user = self.reactivate(&call, user_id).await?;
            Ok(pb::ReactivateUserResponse { user: Some(user) })
        })
        .await
    }

    async fn delete_user(
        &self,
        request: Request<pb::DeleteUserRequest>,
    ) -> Result<Response<pb::DeleteUserResponse>, Status> {
        answer(request, async |call, request: pb::DeleteUserRequest| {
            call.principal.account()?;
            let user_id = parse_id("user_id", &request.user_id)?;
            self.remove_user(&call, user_id).await?;
            Ok(pb::DeleteUserResponse {
                user_id: user_id.to_string(),
            })
        })
        .await
    }

    async fn send_password_reset(
        &self,
        request: Request<pb::SendPasswordResetRequest>,
    ) -> Result<Response<pb::SendPasswordResetResponse>, Status> {
        let call = call(&request)?;
        let user_id = parse_id("user_id", &request.get_ref().user_id).map_err(status)?;
        // The same single-use link as AuthService.RequestPasswordReset.
        IdentityApi::send_password_reset(self, &call, user_id)
            .await
            .map(Response::new)
            .map_err(status)
    }
}
