//! AccountService handlers: each decodes its request into a command (every
//! violation at once), calls one command of [`crate::app::accounts`] and
//! maps the answer. The rules are in `domain::accounts`; the queries in
//! `store::accounts`.

use chrono::Duration;
use tonic::{Request, Response, Status};
use usher_kit::{
    email::EmailAddress,
    error::{ApiError, ApiResult, Violations},
    pagination,
};
use usher_proto::identity::v1 as pb;

use super::{Call, IdentityApi, call, mask_paths, status, validate::validate_product_code};
use crate::{
    app::accounts::{CreateAccount, UpdateAccount, UpdateSubscription},
    domain::{
        self,
        accounts::{
            CORE_NAMESPACES, MAX_PRODUCT_PERMISSIONS, MAX_PRODUCTS, SEAT_LIMITS, product_codes,
            validate_domains,
        },
        validate_locale, validate_name, validate_slug,
    },
    store::idempotency::IdempotencyKey,
};

impl IdentityApi {
    fn lifetime_secs(
        &self,
        field: &str,
        lifetime: Option<&prost_types::Duration>,
    ) -> ApiResult<Option<i32>> {
        let Some(lifetime) = lifetime else {
            return Ok(None);
        };
        let settings = &self.state.settings;
        let chosen = Duration::seconds(lifetime.seconds);
        if lifetime.nanos != 0
            || chosen < settings.min_invitation_lifetime
            || chosen > settings.max_invitation_lifetime
        {
            return Err(ApiError::invalid(
                field,
                format!(
                    "must be whole seconds between {} and {}",
                    settings.min_invitation_lifetime.num_seconds(),
                    settings.max_invitation_lifetime.num_seconds()
                ),
            ));
        }
        Ok(Some(i32::try_from(lifetime.seconds).unwrap_or(i32::MAX)))
    }

    async fn inner_create_account(
        &self,
        call: Call,
        mut request: pb::CreateAccountRequest,
    ) -> ApiResult<pb::CreateAccountResponse> {
        let request_id = std::mem::take(&mut request.request_id);
        let idempotency = IdempotencyKey::new(
            &call.principal,
            "usher.identity.v1.AccountService/CreateAccount",
            &request_id,
            &request,
        )?;
        if let Some(key) = &idempotency
            && let Some(done) = key.replay(&self.state.db).await?
        {
            return Ok(done);
        }
        let command = self.create_account_command(&request)?;
        self.create_account_with_owner(&call, command, idempotency)
            .await
    }

    /// Decodes a CreateAccount.
    fn create_account_command(
        &self,
        request: &pb::CreateAccountRequest,
    ) -> ApiResult<CreateAccount> {
        let mut violations = Violations::new();
        let name = validate_name("name", &request.name, 200)
            .map_err(|e| violations.absorb(e))
            .ok();
        let slug = validate_slug("slug", &request.slug)
            .map_err(|e| violations.absorb(e))
            .ok();
        let default_locale = validate_locale("default_locale", &request.default_locale)
            .map_err(|e| violations.absorb(e))
            .ok()
            .flatten()
            .unwrap_or_else(|| "en".into());
        let owner_locale = validate_locale("owner_locale", &request.owner_locale)
            .map_err(|e| violations.absorb(e))
            .ok()
            .flatten()
            .unwrap_or_default();
        let email = EmailAddress::parse(&request.owner_email)
            .map_err(|e| violations.add("owner_email", e.to_string()))
            .ok();
        let display_name = validate_name("owner_display_name", &request.owner_display_name, 200)
            .map_err(|e| violations.absorb(e))
            .ok();
        let password = self
            .state
            .password_policy
            .check(&request.owner_password, "owner_password")
            .map_err(|e| violations.absorb(e))
            .ok();
        if !SEAT_LIMITS.contains(&request.seat_limit) {
            violations.add("seat_limit", "must be between 1 and 1000000");
        }
        if request.products.len() > MAX_PRODUCTS {
            violations.add(
                "products",
                format!("must hold at most {MAX_PRODUCTS} products"),
            );
        }
        let domains = validate_domains("allowed_email_domains", &request.allowed_email_domains)
            .map_err(|e| violations.absorb(e))
            .ok();
        let lifetime = self
            .lifetime_secs("invitation_lifetime", request.invitation_lifetime.as_ref())
            .map_err(|e| violations.absorb(e))
            .ok()
            .flatten();
        violations.into_result()?;
        let (
            Some(name),
            Some(slug),
            Some(owner_email),
            Some(owner_display_name),
            Some(owner_password),
            Some(allowed_email_domains),
        ) = (name, slug, email, display_name, password, domains)
        else {
            return Err(ApiError::Internal(anyhow::anyhow!(
                "validated fields missing"
            )));
        };
        Ok(CreateAccount {
            name,
            slug,
            default_locale,
            owner_locale,
            owner_email,
            owner_display_name,
            owner_password,
            seat_limit: request.seat_limit,
            products: product_codes(&request.products),
            allowed_email_domains,
            invitation_lifetime_secs: lifetime,
        })
    }

    /// Decodes an UpdateAccount.
    fn update_account_command(
        &self,
        request: &pb::UpdateAccountRequest,
    ) -> ApiResult<UpdateAccount> {
        let paths = mask_paths(
            request.update_mask.as_ref(),
            &[
                "name",
                "default_locale",
                "allowed_email_domains",
                "invitation_lifetime",
            ],
        )?;
        let mut violations = Violations::new();
        let mut command = UpdateAccount::default();
        for path in &paths {
            match path.as_str() {
                "name" => {
                    command.name = validate_name("name", &request.name, 200)
                        .map_err(|e| violations.absorb(e))
                        .ok()
                }
                "default_locale" => {
                    match validate_locale("default_locale", &request.default_locale) {
                        Ok(Some(l)) => command.default_locale = Some(l),
                        Ok(None) => violations.add("default_locale", "is required"),
                        Err(e) => violations.absorb(e),
                    }
                }
                "allowed_email_domains" => {
                    command.allowed_email_domains =
                        validate_domains("allowed_email_domains", &request.allowed_email_domains)
                            .map_err(|e| violations.absorb(e))
                            .ok();
                }
                _ => {
                    command.invitation_lifetime_secs = Some(
                        self.lifetime_secs(
                            "invitation_lifetime",
                            request.invitation_lifetime.as_ref(),
                        )
                        .map_err(|e| violations.absorb(e))
                        .ok()
                        .flatten(),
                    );
                }
            }
        }
        violations.into_result()?;
        command.paths = paths;
        Ok(command)
    }
}

/// Decodes an UpdateSubscription.
fn subscription_command(request: &pb::UpdateSubscriptionRequest) -> ApiResult<UpdateSubscription> {
    let account_id = domain::parse_id("account_id", &request.account_id)?;
    let paths = mask_paths(request.update_mask.as_ref(), &["seat_limit", "products"])?;
    let set_seats = paths.iter().any(|p| p == "seat_limit");
    let set_products = paths.iter().any(|p| p == "products");
    if set_seats && !SEAT_LIMITS.contains(&request.seat_limit) {
        return Err(ApiError::invalid(
            "seat_limit",
            "must be between 1 and 1000000",
        ));
    }
    let products = product_codes(&request.products);
    if set_products && products.len() > MAX_PRODUCTS {
        return Err(ApiError::invalid(
            "products",
            format!("must hold at most {MAX_PRODUCTS} products"),
        ));
    }
    Ok(UpdateSubscription {
        account_id,
        paths,
        seat_limit: set_seats.then_some(request.seat_limit),
        products: set_products.then_some(products),
    })
}

/// Decodes a RegisterProduct: its code, display name and permissions as
/// stored.
fn product_definition(
    request: &pb::RegisterProductRequest,
) -> ApiResult<(String, String, serde_json::Value)> {
    let code = request.code.trim().to_owned();
    validate_product_code("code", &code)?;
    if CORE_NAMESPACES.contains(&code.as_str()) {
        return Err(ApiError::invalid("code", "is a core namespace"));
    }
    let display_name = validate_name("display_name", &request.display_name, 200)?;
    if request.permissions.len() > MAX_PRODUCT_PERMISSIONS {
        return Err(ApiError::invalid(
            "permissions",
            format!("must hold at most {MAX_PRODUCT_PERMISSIONS} permissions"),
        ));
    }
    let mut permissions = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (index, permission) in request.permissions.iter().enumerate() {
        let name = permission.name.trim();
        let action = name.strip_prefix(&format!("{code}.")).unwrap_or_default();
        let valid_action = !action.is_empty()
            && action.len() <= 63
            && action
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
        if !valid_action {
            return Err(ApiError::invalid(
                format!("permissions[{index}].name"),
                format!("must be named {code}.<action> with a-z, 0-9, '_' or '-'"),
            ));
        }
        if !seen.insert(name.to_owned()) {
            return Err(ApiError::invalid(
                format!("permissions[{index}].name"),
                "is listed twice",
            ));
        }
        let description = domain::validate_text(
            &format!("permissions[{index}].description"),
            &permission.description,
            500,
        )?;
        permissions.push(serde_json::json!({"name": name, "description": description}));
    }
    Ok((code, display_name, serde_json::Value::Array(permissions)))
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
impl pb::account_service_server::AccountService for IdentityApi {
    async fn create_account(
        &self,
        request: Request<pb::CreateAccountRequest>,
    ) -> Result<Response<pb::CreateAccountResponse>, Status> {
        answer(request, async |call, request| {
            self.inner_create_account(call, request).await
        })
        .await
    }

    async fn get_account(
        &self,
        request: Request<pb::GetAccountRequest>,
    ) -> Result<Response<pb::GetAccountResponse>, Status> {
        answer(request, async |call, _| {
            self.account_view(call.principal.account()?).await
        })
        .await
    }

    async fn update_account(
        &self,
        request: Request<pb::UpdateAccountRequest>,
    ) -> Result<Response<pb::UpdateAccountResponse>, Status> {
        answer(request, async |call, request| {
            call.principal.account()?;
            let command = self.update_account_command(&request)?;
            let account = self.change_account(&call, command).await?;
            Ok(pb::UpdateAccountResponse {
                account: Some(account),
            })
        })
        .await
    }

    async fn update_subscription(
        &self,
        request: Request<pb::UpdateSubscriptionRequest>,
    ) -> Result<Response<pb::UpdateSubscriptionResponse>, Status> {
        answer(request, async |call, request| {
            let command = subscription_command(&request)?;
            let account = self.change_subscription(&call, command).await?;
            Ok(pb::UpdateSubscriptionResponse {
                account: Some(account),
            })
        })
        .await
    }

    async fn list_accounts(
        &self,
        request: Request<pb::ListAccountsRequest>,
    ) -> Result<Response<pb::ListAccountsResponse>, Status> {
        answer(request, async |_, request: pb::ListAccountsRequest| {
            let size = pagination::page_size(request.page_size)?;
            let query = request.query.trim().to_lowercase();
            if !query.is_empty() && !(3..=200).contains(&query.chars().count()) {
                return Err(ApiError::invalid("query", "must be 3 to 200 characters"));
            }
            self.account_page(&request.slug, &query, size, &request.page_token)
                .await
        })
        .await
    }

    async fn register_product(
        &self,
        request: Request<pb::RegisterProductRequest>,
    ) -> Result<Response<pb::RegisterProductResponse>, Status> {
        answer(request, async |call, request| {
            let (code, display_name, permissions) = product_definition(&request)?;
            self.define_product(&call, code, display_name, permissions)
                .await
        })
        .await
    }

    async fn list_products(
        &self,
        request: Request<pb::ListProductsRequest>,
    ) -> Result<Response<pb::ListProductsResponse>, Status> {
        answer(request, async |_, request: pb::ListProductsRequest| {
            let size = if request.page_size == 0 {
                100
            } else {
                pagination::page_size(request.page_size)?
            };
            self.product_page(size, &request.page_token).await
        })
        .await
    }
}
