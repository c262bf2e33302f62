//! sea-orm entities of the identity schema (see `schema.rs`).

#![allow(missing_docs)]

/// An account: a customer of the embedding platform.
pub mod account {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "accounts")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub name: String,
        #[sea_orm(unique)]
        pub slug: String,
        pub default_locale: String,
        pub owner_user_id: Option<Uuid>,
        pub seat_limit: i32,
        #[sea_orm(column_type = "JsonBinary")]
        pub products: Json,
        #[sea_orm(column_type = "JsonBinary")]
        pub allowed_email_domains: Json,
        pub invitation_lifetime_secs: Option<i32>,
        pub create_time: DateTimeUtc,
        pub update_time: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// A product the platform registered, with its permissions.
pub mod product {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "products")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub code: String,
        pub display_name: String,
        /// `[{"name": …, "description": …}]`.
        #[sea_orm(column_type = "JsonBinary")]
        pub permissions: Json,
        pub create_time: DateTimeUtc,
        pub update_time: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// A role of an account: built-in (Admin, User) or custom.
pub mod role {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "roles")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub account_id: Uuid,
        pub name: String,
        pub description: String,
        #[sea_orm(column_type = "JsonBinary")]
        pub permissions: Json,
        pub built_in: bool,
        pub create_time: DateTimeUtc,
        pub update_time: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// A team of an account.
pub mod team {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "teams")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub account_id: Uuid,
        pub name: String,
        pub description: String,
        pub create_time: DateTimeUtc,
        pub update_time: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// A user of an account, in any status.
pub mod user {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "users")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub account_id: Uuid,
        pub email: Option<String>,
        pub email_canonical: Option<String>,
        pub username: Option<String>,
        pub display_name: String,
        pub search_text: String,
        pub status: crate::domain::UserStatus,
        pub role_id: Uuid,
        pub team_id: Option<Uuid>,
        #[sea_orm(column_type = "JsonBinary")]
        pub products: Json,
        pub locale: String,
        #[sea_orm(column_type = "JsonBinary", nullable)]
        pub metadata: Option<Json>,
        pub owner: bool,
        pub origin: crate::domain::Origin,
        pub password_hash: Option<String>,
        pub password_change_required: bool,
        pub invitation_id: Option<Uuid>,
        pub invited_by: Option<String>,
        pub create_time: DateTimeUtc,
        pub update_time: DateTimeUtc,
        pub activate_time: Option<DateTimeUtc>,
        pub deactivate_time: Option<DateTimeUtc>,
        pub last_sign_in_time: Option<DateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// An API key: account-scoped, or a platform key (`platform`, no account).
pub mod api_key {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "api_keys")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub account_id: Option<Uuid>,
        pub name: String,
        #[sea_orm(unique)]
        pub secret_hash: String,
        pub secret_prefix: String,
        #[sea_orm(column_type = "JsonBinary")]
        pub permissions: Json,
        pub platform: bool,
        pub creator_user_id: Option<Uuid>,
        pub create_time: DateTimeUtc,
        pub expire_time: Option<DateTimeUtc>,
        pub last_use_time: Option<DateTimeUtc>,
        pub revoke_time: Option<DateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// A password-reset link: PostgreSQL is its guard (single use, expiry).
pub mod password_reset {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "password_resets")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub account_id: Uuid,
        pub user_id: Uuid,
        #[sea_orm(unique)]
        pub token_hash: String,
        pub expire_time: DateTimeUtc,
        pub use_time: Option<DateTimeUtc>,
        pub create_time: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// One entry of an account's audit log.
pub mod audit_event {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "audit_events")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub account_id: Uuid,
        pub event_time: DateTimeUtc,
        pub actor_kind: String,
        pub actor_id: String,
        pub actor_name: String,
        pub action: String,
        pub target_type: String,
        pub target_id: String,
        pub target_name: String,
        #[sea_orm(column_type = "JsonBinary", nullable)]
        pub details: Option<Json>,
        pub request_id: String,
        pub client_ip: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The stored answer of a create call, by `(scope, request_id)`.
pub use usher_kit::idempotency::idempotency_key;
