//! sea-orm entities of the invitation database (see `schema.rs`).

#![allow(missing_docs)]

/// Invitations (table `invitations`).
pub mod invitation {
    use sea_orm::entity::prelude::*;

    /// One invitation. `state` is stored as PENDING, ACCEPTING, ACCEPTED,
    /// REVOKED or DECLINED; EXPIRED is PENDING past `expire_time`, derived
    /// when read.
    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "invitations")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub account_id: Uuid,
        pub email: String,
        pub display_name: String,
        pub state: String,
        pub role_id: Uuid,
        pub role_name: String,
        pub team_id: Option<Uuid>,
        pub team_name: String,
        pub products: Json,
        pub metadata: Option<Json>,
        pub inviter_kind: String,
        pub inviter_id: String,
        pub inviter_name: String,
        pub user_id: Uuid,
        pub locale: String,
        pub token_version: i64,
        pub token_hash: String,
        pub create_time: DateTimeUtc,
        pub update_time: DateTimeUtc,
        pub expire_time: DateTimeUtc,
        pub accept_time: Option<DateTimeUtc>,
        pub revoke_time: Option<DateTimeUtc>,
        pub decline_time: Option<DateTimeUtc>,
        pub claim_until: Option<DateTimeUtc>,
        pub resend_count: i32,
        pub last_send_time: DateTimeUtc,
        pub delivery_job_id: String,
        pub delivery_status: i32,
        pub delivery_reason: String,
        pub delivery_attempts: i32,
        pub delivery_update_time: Option<DateTimeUtc>,
        pub expiry_published: bool,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
