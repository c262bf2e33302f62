//! AccountService's commands: create an account with its owner, read and
//! edit the caller's account, change a subscription, list accounts, and
//! register and list products. Each change runs in one transaction that
//! writes its audit entry and events (domain::accounts decides them).

use chrono::{DateTime, Utc};
use usher_kit::{
    email::EmailAddress,
    error::{ApiError, ApiResult, Reason},
    pagination,
};
use usher_proto::identity::v1 as pb;
use uuid::Uuid;

use crate::{
    api::IdentityApi,
    app::{Call, view as convert},
    domain::{self, accounts as rules, effects::Actor},
    store::{
        accounts,
        effects::apply,
        entities::{account, product},
        idempotency::IdempotencyKey,
        users::{self, NewUser},
    },
};

/// A validated CreateAccount.
#[derive(Clone, Debug)]
pub struct CreateAccount {
    /// The account's name.
    pub name: String,
    /// Its unique slug.
    pub slug: String,
    /// Its default locale.
    pub default_locale: String,
    /// The owner's locale (empty: the account's).
    pub owner_locale: String,
    /// The owner's email.
    pub owner_email: EmailAddress,
    /// The owner's display name.
    pub owner_display_name: String,
    /// The owner's password (checked against the policy).
    pub owner_password: String,
    /// The seats of the plan.
    pub seat_limit: i32,
    /// The products enabled (codes, sorted, unique).
    pub products: Vec<String>,
    /// The allowed email domains (canonical).
    pub allowed_email_domains: Vec<String>,
    /// The invitation lifetime in seconds (`None`: the default).
    pub invitation_lifetime_secs: Option<i32>,
}

/// A validated UpdateAccount: `None` leaves a setting as it is.
#[derive(Clone, Debug, Default)]
pub struct UpdateAccount {
    /// The mask paths, for the audit entry and the event.
    pub paths: Vec<String>,
    /// A new name.
    pub name: Option<String>,
    /// A new default locale.
    pub default_locale: Option<String>,
    /// New allowed email domains.
    pub allowed_email_domains: Option<Vec<String>>,
    /// A new invitation lifetime (`Some(None)`: the default).
    pub invitation_lifetime_secs: Option<Option<i32>>,
}

/// A validated UpdateSubscription.
#[derive(Clone, Debug)]
pub struct UpdateSubscription {
    /// The account changed.
    pub account_id: Uuid,
    /// The mask paths.
    pub paths: Vec<String>,
    /// A new seat limit.
    pub seat_limit: Option<i32>,
    /// New products (checked registered).
    pub products: Option<Vec<String>>,
}

impl IdentityApi {
    /// CreateAccount: the account, its built-in roles and its owner.
    pub(crate) async fn create_account_with_owner(
        &self,
        call: &Call,
        command: CreateAccount,
        idempotency: Option<IdempotencyKey>,
    ) -> ApiResult<pb::CreateAccountResponse> {
        accounts::require_products(&self.state.db, "products", &command.products).await?;
        if accounts::slug_taken(&self.state.db, &command.slug).await? {
            return Err(ApiError::rejected(Reason::AlreadyExists, "slug is taken"));
        }
        let password_hash = self.state.passwords.hash(command.owner_password).await?;

        let now = self.state.clock.now();
        let actor = Actor::from_principal(&call.principal, "platform");
        let txn = usher_kit::db::begin(&self.state.db).await?;
        let account_id = Uuid::new_v4();
        let owner_id = Uuid::new_v4();
        let row = account::Model {
            id: account_id,
            name: command.name,
            slug: command.slug,
            default_locale: command.default_locale,
            owner_user_id: None,
            seat_limit: command.seat_limit,
            products: convert::json_strings(command.products.clone()),
            allowed_email_domains: convert::json_strings(command.allowed_email_domains),
            invitation_lifetime_secs: command.invitation_lifetime_secs,
            create_time: now,
            update_time: now,
        };
        let created = match accounts::insert(&txn, row).await {
            Ok(created) => created,
            Err(err) if err.is_taken() => {
                return Err(ApiError::rejected(Reason::AlreadyExists, "slug is taken"));
            }
            Err(err) => return Err(err.into()),
        };
        let (admin, _) = accounts::create_built_in_roles(&txn, account_id, now).await?;
        let owner = users::new_owner_row(
            owner_id,
            NewUser {
                account_id,
                email: Some(command.owner_email.canonical().to_owned()),
                username: None,
                display_name: command.owner_display_name,
                role_id: admin.id,
                team_id: None,
                products: command.products.clone(),
                locale: command.owner_locale,
                metadata: None,
            },
            password_hash,
            now,
        );
        let owner = users::insert(&txn, owner).await?;
        let created = accounts::save(
            &txn,
            account::Model {
                owner_user_id: Some(owner_id),
                ..created
            },
        )
        .await?;
        let effects = rules::created(&created, &owner, &command.products, &actor, now);
        apply(&txn, effects, &actor, &call.request_id, now).await?;

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

    /// GetAccount: the account, its products and the bounds of its settings.
    pub(crate) async fn account_view(&self, account_id: Uuid) -> ApiResult<pb::GetAccountResponse> {
        let db = &self.state.db;
        let account = accounts::find(db, account_id).await?;
        let seats = accounts::seats_used(db, account_id).await?;
        let products = accounts::products_by_code(db, convert::strings(&account.products)).await?;
        let settings = &self.state.settings;
        let policy = &self.state.password_policy;
        Ok(pb::GetAccountResponse {
            account: Some(convert::account(
                &account,
                seats,
                settings.default_invitation_lifetime,
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

    /// UpdateAccount: the caller's account settings.
    pub(crate) async fn change_account(
        &self,
        call: &Call,
        command: UpdateAccount,
    ) -> ApiResult<pb::Account> {
        let account_id = call.principal.account()?;
        let now = self.state.clock.now();
        let txn = usher_kit::db::begin(&self.state.db).await?;
        let mut row = accounts::lock(&txn, account_id).await?;
        let actor_name = users::display_name(&txn, call.principal.user_id).await?;
        let actor = Actor::from_principal(&call.principal, actor_name);
        if let Some(name) = command.name {
            row.name = name;
        }
        if let Some(locale) = command.default_locale {
            row.default_locale = locale;
        }
        if let Some(domains) = command.allowed_email_domains {
            row.allowed_email_domains = convert::json_strings(domains);
        }
        if let Some(lifetime) = command.invitation_lifetime_secs {
            row.invitation_lifetime_secs = lifetime;
        }
        row.update_time = now;
        let updated = accounts::save(&txn, row).await?;
        let view = convert::account(
            &updated,
            accounts::seats_used(&txn, account_id).await?,
            self.state.settings.default_invitation_lifetime,
        );
        let effects = rules::updated(&updated, &command.paths, &view, &actor, now);
        apply(&txn, effects, &actor, &call.request_id, now).await?;
        txn.commit().await?;
        Ok(view)
    }

    /// UpdateSubscription: seats and products; a disabled product leaves
    /// every user's grants and every API key's permissions.
    pub(crate) async fn change_subscription(
        &self,
        call: &Call,
        command: UpdateSubscription,
    ) -> ApiResult<pb::Account> {
        let account_id = command.account_id;
        if let Some(products) = &command.products {
            accounts::require_products(&self.state.db, "products", products).await?;
        }
        let now = self.state.clock.now();
        let actor = Actor::from_principal(&call.principal, "platform");
        let txn = usher_kit::db::begin(&self.state.db).await?;
        let mut row = accounts::lock(&txn, account_id).await?;
        if let Some(seat_limit) = command.seat_limit {
            row.seat_limit = seat_limit;
        }
        if let Some(products) = &command.products {
            row.products = convert::json_strings(products.clone());
            accounts::keep_user_products(&txn, account_id, products, now).await?;
        }
        row.update_time = now;
        let updated = accounts::save(&txn, row).await?;
        let seats = accounts::seats_used(&txn, account_id).await?;
        let effects = rules::subscription_updated(&updated, command.paths, seats, &actor, now);
        apply(&txn, effects, &actor, &call.request_id, now).await?;
        txn.commit().await?;
        if command.products.is_some() {
            // API keys lose the permissions of disabled products at once.
            crate::store::api_keys::refresh_account(&self.state, account_id).await?;
        }
        Ok(convert::account(
            &updated,
            seats,
            self.state.settings.default_invitation_lifetime,
        ))
    }

    /// ListAccounts: newest first, by slug or a part of name or slug.
    pub(crate) async fn account_page(
        &self,
        slug: &str,
        query: &str,
        size: u64,
        page_token: &str,
    ) -> ApiResult<pb::ListAccountsResponse> {
        let fingerprint = pagination::fingerprint(&(slug, query));
        let cursor: Option<(DateTime<Utc>, Uuid)> =
            pagination::decode_token(&fingerprint, page_token)?;
        let db = &self.state.db;
        let (rows, total) = accounts::page(db, slug, query, cursor, size + 1).await?;
        let (rows, next_page_token) = pagination::split_page(rows, size, |last| {
            pagination::encode_token(&fingerprint, &(last.create_time, last.id))
        });
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

    /// RegisterProduct: creates or redefines a product; permissions dropped
    /// from its definition leave every custom role.
    pub(crate) async fn define_product(
        &self,
        call: &Call,
        code: String,
        display_name: String,
        permissions: serde_json::Value,
    ) -> ApiResult<pb::RegisterProductResponse> {
        let now = self.state.clock.now();
        let txn = usher_kit::db::begin(&self.state.db).await?;
        let (model, created) =
            accounts::upsert_product(&txn, &code, &display_name, permissions, now).await?;
        let names = accounts::product_permission_names(&model);
        accounts::keep_product_permissions(&txn, &code, &names, now).await?;
        let actor = Actor::from_principal(&call.principal, "platform");
        let effects = rules::product_registered(&code, &display_name, names, created, &actor, now);
        apply(&txn, effects, &actor, &call.request_id, now).await?;
        txn.commit().await?;
        Ok(pb::RegisterProductResponse {
            product: Some(product_view(&model)),
            created,
        })
    }

    /// ListProducts: by code.
    pub(crate) async fn product_page(
        &self,
        size: u64,
        page_token: &str,
    ) -> ApiResult<pb::ListProductsResponse> {
        let fingerprint = pagination::fingerprint(&"products");
        let cursor: Option<String> = pagination::decode_token(&fingerprint, page_token)?;
        let rows = accounts::products_page(&self.state.db, cursor, size + 1).await?;
        let (rows, next_page_token) = pagination::split_page(rows, size, |last| {
            pagination::encode_token(&fingerprint, &last.code)
        });
        Ok(pb::ListProductsResponse {
            products: rows.iter().map(product_view).collect(),
            next_page_token,
        })
    }
}

/// A product as the API shows it.
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
