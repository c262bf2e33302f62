//! sea-orm entities of the invitation database (see `schema.rs`).

#![allow(missing_docs)]

/// Invitations (table `invitations`).
pub mod invitation {
    use sea_orm::entity::prelude::*;

    pub use crate::domain::StoredState;

    /// One invitation (the domain's [`crate::domain::Invitation`] as
    /// stored). `state` is stored as PENDING, ACCEPTING, ACCEPTED, REVOKED
    /// or DECLINED; EXPIRED is PENDING past `expire_time`, derived when read.
    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "invitations")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub account_id: Uuid,
        pub email: String,
        pub display_name: String,
        pub state: StoredState,
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

impl From<invitation::Model> for crate::domain::Invitation {
    fn from(row: invitation::Model) -> Self {
        Self {
            id: row.id,
            account_id: row.account_id,
            email: row.email,
            display_name: row.display_name,
            state: row.state,
            role_id: row.role_id,
            role_name: row.role_name,
            team_id: row.team_id,
            team_name: row.team_name,
            products: usher_kit::convert::strings(&row.products),
            metadata: row.metadata,
            inviter_kind: row.inviter_kind,
            inviter_id: row.inviter_id,
            inviter_name: row.inviter_name,
            user_id: row.user_id,
            locale: row.locale,
            token_version: row.token_version,
            token_hash: row.token_hash,
            create_time: row.create_time,
            update_time: row.update_time,
            expire_time: row.expire_time,
            accept_time: row.accept_time,
            revoke_time: row.revoke_time,
            decline_time: row.decline_time,
            claim_until: row.claim_until,
            resend_count: row.resend_count,
            last_send_time: row.last_send_time,
            delivery_job_id: row.delivery_job_id,
            delivery_status: row.delivery_status,
            delivery_reason: row.delivery_reason,
            delivery_attempts: row.delivery_attempts,
            delivery_update_time: row.delivery_update_time,
            expiry_published: row.expiry_published,
        }
    }
}

impl From<&crate::domain::Invitation> for invitation::Model {
    fn from(invitation: &crate::domain::Invitation) -> Self {
        let invitation = invitation.clone();
        Self {
            id: invitation.id,
            account_id: invitation.account_id,
            email: invitation.email,
            display_name: invitation.display_name,
            state: invitation.state,
            role_id: invitation.role_id,
            role_name: invitation.role_name,
            team_id: invitation.team_id,
            team_name: invitation.team_name,
            products: usher_kit::convert::json_strings(invitation.products),
            metadata: invitation.metadata,
            inviter_kind: invitation.inviter_kind,
            inviter_id: invitation.inviter_id,
            inviter_name: invitation.inviter_name,
            user_id: invitation.user_id,
            locale: invitation.locale,
            token_version: invitation.token_version,
            token_hash: invitation.token_hash,
            create_time: invitation.create_time,
            update_time: invitation.update_time,
            expire_time: invitation.expire_time,
            accept_time: invitation.accept_time,
            revoke_time: invitation.revoke_time,
            decline_time: invitation.decline_time,
            claim_until: invitation.claim_until,
            resend_count: invitation.resend_count,
            last_send_time: invitation.last_send_time,
            delivery_job_id: invitation.delivery_job_id,
            delivery_status: invitation.delivery_status,
            delivery_reason: invitation.delivery_reason,
            delivery_attempts: invitation.delivery_attempts,
            delivery_update_time: invitation.delivery_update_time,
            expiry_published: invitation.expiry_published,
        }
    }
}
