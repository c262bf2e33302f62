//! AccountService: accounts (created by the platform), the caller's account
//! settings, subscriptions and the product catalogue.

use std::collections::BTreeSet;

use chrono::Duration;
use prost_types::FieldMask;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, EntityTrait, IntoActiveModel, PaginatorTrait, QueryFilter,
    QueryOrder, QuerySelect, Set, TransactionTrait, sea_query::ExprTrait,
};
use tonic::{Request, Response, Status};
use usher_kit::{
    email::{EmailAddress, canonical_domain},
    error::{ApiError, ApiResult, Reason, Violations},
    pagination,
};
use usher_proto::{events::v1 as events, identity::v1 as pb};
use uuid::Uuid;

use super::{IdentityApi, call, convert, mask_paths, status, validate::validate_product_code};
use crate::{
    domain::{self, Origin, UserStatus, validate_locale, validate_name, validate_slug},
    store::{
        accounts,
        audit::{self, Actor, AuditEntry},
        entities::{account, product, user},
        events::emit,
        idempotency::IdempotencyKey,
    },
};

const MAX_PRODUCTS: usize = 50;
const MAX_DOMAINS: usize = 100;
const MAX_PRODUCT_PERMISSIONS: usize = 100;
const CORE_NAMESPACES: &[&str] = &["users", "roles", "teams", "account", "audit"];

/// Canonical allowed domains (lower case, punycode), deduplicated.
fn validate_domains(field: &str, domains: &[String]) -> ApiResult<Vec<String>> {
    if domains.len() > MAX_DOMAINS {
        return Err(ApiError::invalid(
            field,
            format!("must hold at most {MAX_DOMAINS} domains"),
        ));
    }
    let mut canonical = BTreeSet::new();
    for (index, domain) in domains.iter().enumerate() {
        let domain = canonical_domain(domain).map_err(|e| {
            ApiError::invalid(
                format!("{field}[{index}]"),
                format!("is not a valid domain: {e}"),
            )
        })?;
        canonical.insert(domain);
    }
    Ok(canonical.into_iter().collect())
}

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
        call: super::Call,
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
        if !(1..=1_000_000).contains(&request.seat_limit) {
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
            Some(email),
            Some(display_name),
            Some(password),
            Some(domains),
        ) = (name, slug, email, display_name, password, domains)
        else {
            return Err(ApiError::Internal(anyhow::anyhow!(
                "validated fields missing"
            )));
        };
        let products: Vec<String> = request
            .products
            .iter()
            .map(|p| p.trim().to_owned())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        accounts::require_products(&self.state.db, "products", &products).await?;
        if accounts::slug_taken(&self.state.db, &slug).await? {
            return Err(ApiError::rejected(Reason::AlreadyExists, "slug is taken"));
        }
        let password_hash = self.state.passwords.hash(password).await?;

        let now = self.state.clock.now();
        let actor = Actor::from_principal(&call.principal, "platform");
        let txn = self.state.db.begin().await?;
        let account_id = Uuid::new_v4();
        let owner_id = Uuid::new_v4();
        let created = account::ActiveModel {
            id: Set(account_id),
            name: Set(name.clone()),
            slug: Set(slug.clone()),
            default_locale: Set(default_locale.clone()),
            owner_user_id: Set(None),
            seat_limit: Set(request.seat_limit),
            products: Set(convert::json_strings(products.clone())),
            allowed_email_domains: Set(convert::json_strings(domains)),
            invitation_lifetime_secs: Set(lifetime),
            create_time: Set(now),
            update_time: Set(now),
        }
        .insert(&txn)
        .await;
        let created = match created {
            Ok(created) => created,
            Err(err)
                if err.to_string().contains("unique") || err.to_string().contains("UNIQUE") =>
            {
                return Err(ApiError::rejected(Reason::AlreadyExists, "slug is taken"));
            }
            Err(err) => return Err(err.into()),
        };
        let (admin, _) = accounts::create_built_in_roles(&txn, account_id, now).await?;
        let owner = user::ActiveModel {
            id: Set(owner_id),
            account_id: Set(account_id),
            email: Set(Some(email.canonical().to_owned())),
            email_canonical: Set(Some(email.canonical().to_owned())),
            username: Set(None),
            display_name: Set(display_name.clone()),
            search_text: Set(crate::store::users::search_text(
                &display_name,
                Some(email.canonical()),
                None,
            )),
            status: Set(UserStatus::Active),
            role_id: Set(admin.id),
            team_id: Set(None),
            products: Set(convert::json_strings(products.clone())),
            locale: Set(owner_locale),
            metadata: Set(None),
            owner: Set(true),
            origin: Set(Origin::Owner),
            password_hash: Set(Some(password_hash)),
            password_change_required: Set(false),
            invitation_id: Set(None),
            invited_by: Set(None),
            create_time: Set(now),
            update_time: Set(now),
            activate_time: Set(Some(now)),
            deactivate_time: Set(None),
            last_sign_in_time: Set(None),
        }
        .insert(&txn)
        .await?;
        let mut active = created.into_active_model();
        active.owner_user_id = Set(Some(owner_id));
        let created = active.update(&txn).await?;

        audit::record(
            &txn,
            AuditEntry {
                account_id,
                actor: &actor,
                action: "account.created",
                target_type: "account",
                target_id: account_id.to_string(),
                target_name: name.clone(),
                details: Some(serde_json::json!({"slug": slug, "seat_limit": request.seat_limit, "products": products})),
                request_id: &call.request_id,
            },
            now,
        )
        .await?;
        let actor_pb = actor.to_proto();
        emit(
            &txn,
            "account.created",
            "AccountCreated",
            account_id.to_string(),
            Some(account_id),
            &events::AccountCreated {
                account_id: account_id.to_string(),
                actor: Some(actor_pb.clone()),
                name: name.clone(),
                slug: slug.clone(),
                default_locale,
                owner_user_id: owner_id.to_string(),
                seat_limit: request.seat_limit,
                products: products.clone(),
            },
            now,
        )
        .await?;
        emit(
            &txn,
            "user.created",
            "UserCreated",
            owner_id.to_string(),
            Some(account_id),
            &events::UserCreated {
                user_id: owner_id.to_string(),
                account_id: account_id.to_string(),
                actor: Some(actor_pb),
                email: owner.email.clone().unwrap_or_default(),
                username: String::new(),
                display_name: owner.display_name.clone(),
                status: pb::UserStatus::Active as i32,
                origin: pb::UserOrigin::AccountOwner as i32,
                role_id: admin.id.to_string(),
                team_id: String::new(),
                products: products.clone(),
                invitation_id: String::new(),
            },
            now,
        )
        .await?;

        let response = pb::CreateAccountResponse {
            account: Some(convert::account(
                &created,
                1,
                self.state.settings.default_invitation_lifetime,
            )),
            owner: Some(convert::user(&owner, &admin.name, None)),
        };
        if let Some(key) = &idempotency {
            key.remember(&txn, &response, now).await?;
        }
        txn.commit().await?;
        Ok(response)
    }

    async fn account_view(&self, account_id: Uuid) -> ApiResult<pb::GetAccountResponse> {
        let db = &self.state.db;
        let account = accounts::find(db, account_id).await?;
        let seats = accounts::seats_used(db, account_id).await?;
        let codes = convert::strings(&account.products);
        let products = product::Entity::find()
            .filter(product::Column::Code.is_in(codes))
            .order_by_asc(product::Column::Code)
            .all(db)
            .await?;
        let settings = &self.state.settings;
        let policy = &self.state.password_policy;
        Ok(pb::GetAccountResponse {
            account: Some(convert::account(
                &account,
                seats,
                self.state.settings.default_invitation_lifetime,
            )),
            products: products.iter().map(product_view).collect(),
            min_invitation_lifetime: Some(prost_types::Duration {
                seconds: settings.min_invitation_lifetime.num_seconds(),
                nanos: 0,
            }),
            max_invitation_lifetime: Some(prost_types::Duration {
                seconds: settings.max_invitation_lifetime.num_seconds(),
                nanos: 0,
            }),
            supported_locales: domain::SUPPORTED_LOCALES
                .iter()
                .map(|l| (*l).to_owned())
                .collect(),
            password_policy: Some(pb::PasswordPolicy {
                min_length: i32::try_from(policy.min_length()).unwrap_or(i32::MAX),
                max_length: i32::try_from(policy.max_length()).unwrap_or(i32::MAX),
            }),
        })
    }

    async fn inner_update_account(
        &self,
        call: super::Call,
        request: pb::UpdateAccountRequest,
    ) -> ApiResult<pb::UpdateAccountResponse> {
        let account_id = call.principal.account()?;
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
        let mut name = None;
        let mut locale = None;
        let mut domains = None;
        let mut lifetime = None;
        for path in &paths {
            match path.as_str() {
                "name" => {
                    name = validate_name("name", &request.name, 200)
                        .map_err(|e| violations.absorb(e))
                        .ok()
                }
                "default_locale" => {
                    match validate_locale("default_locale", &request.default_locale) {
                        Ok(Some(l)) => locale = Some(l),
                        Ok(None) => violations.add("default_locale", "is required"),
                        Err(e) => violations.absorb(e),
                    }
                }
                "allowed_email_domains" => {
                    domains =
                        validate_domains("allowed_email_domains", &request.allowed_email_domains)
                            .map_err(|e| violations.absorb(e))
                            .ok();
                }
                _ => {
                    lifetime = Some(
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

        let now = self.state.clock.now();
        let txn = self.state.db.begin().await?;
        let current = accounts::lock(&txn, account_id).await?;
        let actor_name = crate::store::users::display_name(&txn, call.principal.user_id).await?;
        let actor = Actor::from_principal(&call.principal, actor_name);
        let mut active = current.clone().into_active_model();
        if let Some(name) = name {
            active.name = Set(name);
        }
        if let Some(locale) = locale {
            active.default_locale = Set(locale);
        }
        if let Some(domains) = domains {
            active.allowed_email_domains = Set(convert::json_strings(domains));
        }
        if let Some(lifetime) = lifetime {
            active.invitation_lifetime_secs = Set(lifetime);
        }
        active.update_time = Set(now);
        let updated = active.update(&txn).await?;
        audit::record(
            &txn,
            AuditEntry {
                account_id,
                actor: &actor,
                action: "account.updated",
                target_type: "account",
                target_id: account_id.to_string(),
                target_name: updated.name.clone(),
                details: Some(serde_json::json!({"fields": paths})),
                request_id: &call.request_id,
            },
            now,
        )
        .await?;
        let view = convert::account(
            &updated,
            accounts::seats_used(&txn, account_id).await?,
            self.state.settings.default_invitation_lifetime,
        );
        emit(
            &txn,
            "account.updated",
            "AccountUpdated",
            account_id.to_string(),
            Some(account_id),
            &events::AccountUpdated {
                account_id: account_id.to_string(),
                actor: Some(actor.to_proto()),
                changed_fields: Some(FieldMask {
                    paths: paths.clone(),
                }),
                name: view.name.clone(),
                default_locale: view.default_locale.clone(),
                allowed_email_domains: view.allowed_email_domains.clone(),
                invitation_lifetime: view.invitation_lifetime,
            },
            now,
        )
        .await?;
        txn.commit().await?;
        Ok(pb::UpdateAccountResponse {
            account: Some(view),
        })
    }

    async fn inner_update_subscription(
        &self,
        call: super::Call,
        request: pb::UpdateSubscriptionRequest,
    ) -> ApiResult<pb::UpdateSubscriptionResponse> {
        let account_id = domain::parse_id("account_id", &request.account_id)?;
        let paths = mask_paths(request.update_mask.as_ref(), &["seat_limit", "products"])?;
        let set_seats = paths.iter().any(|p| p == "seat_limit");
        let set_products = paths.iter().any(|p| p == "products");
        if set_seats && !(1..=1_000_000).contains(&request.seat_limit) {
            return Err(ApiError::invalid(
                "seat_limit",
                "must be between 1 and 1000000",
            ));
        }
        let products: Vec<String> = request
            .products
            .iter()
            .map(|p| p.trim().to_owned())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if set_products {
            if products.len() > MAX_PRODUCTS {
                return Err(ApiError::invalid(
                    "products",
                    format!("must hold at most {MAX_PRODUCTS} products"),
                ));
            }
            accounts::require_products(&self.state.db, "products", &products).await?;
        }
        let now = self.state.clock.now();
        let actor = Actor::from_principal(&call.principal, "platform");
        let txn = self.state.db.begin().await?;
        let current = accounts::lock(&txn, account_id).await?;
        let mut active = current.clone().into_active_model();
        if set_seats {
            active.seat_limit = Set(request.seat_limit);
        }
        if set_products {
            active.products = Set(convert::json_strings(products.clone()));
            // Disabled products leave every user's grants.
            let users = user::Entity::find()
                .filter(user::Column::AccountId.eq(account_id))
                .all(&txn)
                .await?;
            for member in users {
                let grants = convert::strings(&member.products);
                let kept: Vec<String> = grants
                    .iter()
                    .filter(|g| products.contains(g))
                    .cloned()
                    .collect();
                if kept.len() != grants.len() {
                    let mut member = member.into_active_model();
                    member.products = Set(convert::json_strings(kept));
                    member.update_time = Set(now);
                    member.update(&txn).await?;
                }
            }
        }
        active.update_time = Set(now);
        let updated = active.update(&txn).await?;
        let seats = accounts::seats_used(&txn, account_id).await?;
        audit::record(&txn, AuditEntry {
            account_id,
            actor: &actor,
            action: "account.subscription_updated",
            target_type: "account",
            target_id: account_id.to_string(),
            target_name: updated.name.clone(),
            details: Some(serde_json::json!({"seat_limit": updated.seat_limit, "products": convert::strings(&updated.products)})),
            request_id: &call.request_id,
        }, now).await?;
        emit(
            &txn,
            "account.subscription_updated",
            "SubscriptionUpdated",
            account_id.to_string(),
            Some(account_id),
            &events::SubscriptionUpdated {
                account_id: account_id.to_string(),
                actor: Some(actor.to_proto()),
                changed_fields: Some(FieldMask { paths }),
                seat_limit: updated.seat_limit,
                products: convert::strings(&updated.products),
                seats_used: i32::try_from(seats).unwrap_or(i32::MAX),
            },
            now,
        )
        .await?;
        txn.commit().await?;
        if set_products {
            // API keys lose the permissions of disabled products at once.
            crate::store::api_keys::refresh_account(&self.state, account_id).await?;
        }
        Ok(pb::UpdateSubscriptionResponse {
            account: Some(convert::account(
                &updated,
                seats,
                self.state.settings.default_invitation_lifetime,
            )),
        })
    }

    async fn inner_list_accounts(
        &self,
        request: pb::ListAccountsRequest,
    ) -> ApiResult<pb::ListAccountsResponse> {
        let size = pagination::page_size(request.page_size)?;
        let query = request.query.trim().to_lowercase();
        if !query.is_empty() && !(3..=200).contains(&query.chars().count()) {
            return Err(ApiError::invalid("query", "must be 3 to 200 characters"));
        }
        let fingerprint = pagination::fingerprint(&(&request.slug, &query));
        let cursor: Option<(chrono::DateTime<chrono::Utc>, Uuid)> =
            pagination::decode_token(&fingerprint, &request.page_token)?;
        let db = &self.state.db;
        let mut select = account::Entity::find();
        if !request.slug.is_empty() {
            select = select.filter(account::Column::Slug.eq(request.slug.clone()));
        }
        if !query.is_empty() {
            let pattern = crate::store::contains_pattern(&query);
            select = select.filter(
                sea_orm::Condition::any()
                    .add(
                        sea_orm::sea_query::Expr::expr(sea_orm::sea_query::Func::lower(
                            sea_orm::sea_query::Expr::col(account::Column::Name),
                        ))
                        .like(pattern.clone()),
                    )
                    .add(account::Column::Slug.like(pattern)),
            );
        }
        let total = select.clone().count(db).await?;
        if let Some((time, id)) = cursor {
            select = select.filter(
                sea_orm::Condition::any()
                    .add(account::Column::CreateTime.lt(time))
                    .add(
                        sea_orm::Condition::all()
                            .add(account::Column::CreateTime.eq(time))
                            .add(account::Column::Id.lt(id)),
                    ),
            );
        }
        let rows = select
            .order_by_desc(account::Column::CreateTime)
            .order_by_desc(account::Column::Id)
            .limit(size + 1)
            .all(db)
            .await?;
        let more = rows.len() as u64 > size;
        let rows: Vec<_> = rows.into_iter().take(size as usize).collect();
        let next_page_token = match (more, rows.last()) {
            (true, Some(last)) => {
                pagination::encode_token(&fingerprint, &(last.create_time, last.id))
            }
            _ => String::new(),
        };
        let mut accounts_out = Vec::with_capacity(rows.len());
        for row in &rows {
            accounts_out.push(convert::account(
                row,
                accounts::seats_used(db, row.id).await?,
                self.state.settings.default_invitation_lifetime,
            ));
        }
        Ok(pb::ListAccountsResponse {
            accounts: accounts_out,
            next_page_token,
            total_size: i32::try_from(total).unwrap_or(i32::MAX),
        })
    }

    async fn inner_register_product(
        &self,
        call: super::Call,
        request: pb::RegisterProductRequest,
    ) -> ApiResult<pb::RegisterProductResponse> {
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
        let mut seen = BTreeSet::new();
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
        let now = self.state.clock.now();
        let txn = self.state.db.begin().await?;
        let existing = product::Entity::find_by_id(code.clone()).one(&txn).await?;
        let created = existing.is_none();
        let model = match existing {
            Some(existing) => {
                let mut active = existing.into_active_model();
                active.display_name = Set(display_name.clone());
                active.permissions = Set(serde_json::Value::Array(permissions));
                active.update_time = Set(now);
                active.update(&txn).await?
            }
            None => {
                product::ActiveModel {
                    code: Set(code.clone()),
                    display_name: Set(display_name.clone()),
                    permissions: Set(serde_json::Value::Array(permissions)),
                    create_time: Set(now),
                    update_time: Set(now),
                }
                .insert(&txn)
                .await?
            }
        };
        let names = accounts::product_permission_names(&model);
        // Permissions dropped from the definition leave every custom role.
        let prefix = format!("{code}.");
        let roles = crate::store::entities::role::Entity::find()
            .filter(crate::store::entities::role::Column::BuiltIn.eq(false))
            .all(&txn)
            .await?;
        for role in roles {
            let held = convert::strings(&role.permissions);
            let kept: Vec<String> = held
                .iter()
                .filter(|p| !p.starts_with(&prefix) || names.contains(p))
                .cloned()
                .collect();
            if kept.len() != held.len() {
                let mut active = role.into_active_model();
                active.permissions = Set(convert::json_strings(kept));
                active.update_time = Set(now);
                active.update(&txn).await?;
            }
        }
        let actor = Actor::from_principal(&call.principal, "platform");
        emit(
            &txn,
            "product.registered",
            "ProductRegistered",
            code.clone(),
            None,
            &events::ProductRegistered {
                code: code.clone(),
                actor: Some(actor.to_proto()),
                display_name,
                permissions: names,
                created,
            },
            now,
        )
        .await?;
        txn.commit().await?;
        Ok(pb::RegisterProductResponse {
            product: Some(product_view(&model)),
            created,
        })
    }

    async fn inner_list_products(
        &self,
        request: pb::ListProductsRequest,
    ) -> ApiResult<pb::ListProductsResponse> {
        let size = if request.page_size == 0 {
            100
        } else {
            pagination::page_size(request.page_size)?
        };
        let fingerprint = pagination::fingerprint(&"products");
        let cursor: Option<String> = pagination::decode_token(&fingerprint, &request.page_token)?;
        let mut select = product::Entity::find();
        if let Some(after) = cursor {
            select = select.filter(product::Column::Code.gt(after));
        }
        let rows = select
            .order_by_asc(product::Column::Code)
            .limit(size + 1)
            .all(&self.state.db)
            .await?;
        let more = rows.len() as u64 > size;
        let rows: Vec<_> = rows.into_iter().take(size as usize).collect();
        let next_page_token = match (more, rows.last()) {
            (true, Some(last)) => pagination::encode_token(&fingerprint, &last.code),
            _ => String::new(),
        };
        Ok(pb::ListProductsResponse {
            products: rows.iter().map(product_view).collect(),
            next_page_token,
        })
    }
}

fn product_view(model: &product::Model) -> pb::Product {
    let permissions = model
        .permissions
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|p| pb::Permission {
                    name: p
                        .get("name")
                        .and_then(|v| v.as_str())
                        .unwrap_or_default()
                        .to_owned(),
                    description: p
                        .get("description")
                        .and_then(|v| v.as_str())
                        .unwrap_or_default()
                        .to_owned(),
                    product_code: model.code.clone(),
                })
                .collect()
        })
        .unwrap_or_default();
    pb::Product {
        code: model.code.clone(),
        display_name: model.display_name.clone(),
        permissions,
        create_time: Some(convert::timestamp(model.create_time)),
        update_time: Some(convert::timestamp(model.update_time)),
    }
}

#[tonic::async_trait]
impl pb::account_service_server::AccountService for IdentityApi {
    async fn create_account(
        &self,
        request: Request<pb::CreateAccountRequest>,
    ) -> Result<Response<pb::CreateAccountResponse>, Status> {
        let call = call(&request)?;
        self.inner_create_account(call, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn get_account(
        &self,
        request: Request<pb::GetAccountRequest>,
    ) -> Result<Response<pb::GetAccountResponse>, Status> {
        let call = call(&request)?;
        let account_id = call.principal.account().map_err(status)?;
        self.account_view(account_id)
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn update_account(
        &self,
        request: Request<pb::UpdateAccountRequest>,
    ) -> Result<Response<pb::UpdateAccountResponse>, Status> {
        let call = call(&request)?;
        self.inner_update_account(call, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn update_subscription(
        &self,
        request: Request<pb::UpdateSubscriptionRequest>,
    ) -> Result<Response<pb::UpdateSubscriptionResponse>, Status> {
        let call = call(&request)?;
        self.inner_update_subscription(call, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn list_accounts(
        &self,
        request: Request<pb::ListAccountsRequest>,
    ) -> Result<Response<pb::ListAccountsResponse>, Status> {
        call(&request)?;
        self.inner_list_accounts(request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn register_product(
        &self,
        request: Request<pb::RegisterProductRequest>,
    ) -> Result<Response<pb::RegisterProductResponse>, Status> {
        let call = call(&request)?;
        self.inner_register_product(call, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn list_products(
        &self,
        request: Request<pb::ListProductsRequest>,
    ) -> Result<Response<pb::ListProductsResponse>, Status> {
        call(&request)?;
        self.inner_list_products(request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }
}
