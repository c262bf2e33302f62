//! The ports of the create saga (`crate::app::create`): what it needs from
//! identity, from the token keys and from the database, as traits, so its
//! compensation paths run against fakes in unit tests. The service's
//! adapters implement them: [`crate::directory::Directory`],
//! [`crate::store::tokens::TokenStore`] and [`crate::store::Repository`].

use std::future::Future;

use chrono::{DateTime, Utc};
use prost::Message;
use usher_kit::{
    amqp::OutgoingMessage, db::StoreResult, error::ApiResult, idempotency::IdempotencyKey,
    tokens::Token,
};
use usher_proto::identity::{internal::v1 as internal, v1 as identity};
use uuid::Uuid;

use super::Invitation;

/// One token key to write: the token's hash, what it points at, until when.
#[derive(Clone, Debug)]
pub struct TokenEntry {
    /// HMAC of the token.
    pub hash: String,
    /// The invitation.
    pub invitation_id: Uuid,
    /// The invitation's token version this token carries.
    pub version: i64,
    /// When the link stops working.
    pub expire_time: DateTime<Utc>,
}

impl TokenEntry {
    /// The key of the current link of `invitation`.
    pub fn of(invitation: &Invitation) -> Self {
        Self {
            hash: invitation.token_hash.clone(),
            invitation_id: invitation.id,
            version: invitation.token_version,
            expire_time: invitation.expire_time,
        }
    }
}

/// Identity, as the create saga asks it.
pub trait DirectoryPort: Send + Sync {
    /// What identity knows of the account, the inviter, the role and team.
    fn context(
        &self,
        account_id: Uuid,
        inviter: Option<identity::Actor>,
        role_id: Option<Uuid>,
        team_id: Option<Uuid>,
        request_id: &str,
    ) -> impl Future<Output = ApiResult<internal::GetInvitationContextResponse>> + Send;

    /// Reserves an INVITED user per invitee.
    fn reserve(
        &self,
        request: internal::ReserveInviteesRequest,
        request_id: &str,
    ) -> impl Future<Output = ApiResult<internal::ReserveInviteesResponse>> + Send;

    /// Releases `(user, invitation)` reservations.
    fn release(
        &self,
        account_id: Uuid,
        actor: identity::Actor,
        targets: &[(Uuid, Uuid)],
        reason: internal::ReleaseReason,
        request_id: &str,
    ) -> impl Future<Output = ApiResult<()>> + Send;

    /// Releases, as a rollback, whatever a reservation whose answer was lost
    /// reserved: each `(canonical email, invitation)` only while that
    /// address is still INVITED for that invitation (nothing otherwise).
    fn release_unanswered(
        &self,
        account_id: Uuid,
        targets: &[(String, Uuid)],
        request_id: &str,
    ) -> impl Future<Output = ApiResult<()>> + Send;
}

/// The token keys and the hourly quota.
pub trait TokenPort: Send + Sync {
    /// A new token and its hash.
    fn generate(&self) -> (Token, String);

    /// Takes up to `wanted` sends of the account's hourly `limit`; returns
    /// how many were granted.
    fn take_quota(
        &self,
        account: Uuid,
        wanted: u32,
        limit: u32,
        now: DateTime<Utc>,
    ) -> impl Future<Output = StoreResult<u32>> + Send;

    /// Gives `count` unused sends back.
    fn give_back_quota(
        &self,
        account: Uuid,
        count: u32,
        limit: u32,
        now: DateTime<Utc>,
    ) -> impl Future<Output = StoreResult<()>> + Send;

    /// Writes token keys.
    fn put(
        &self,
        entries: &[TokenEntry],
        now: DateTime<Utc>,
    ) -> impl Future<Output = StoreResult<()>> + Send;

    /// Deletes the keys of dead links, best effort (logged as `what`).
    fn forget(&self, hashes: &[String], what: &str) -> impl Future<Output = ()> + Send;
}

/// The invitation database, as the create saga writes it.
pub trait RepositoryPort: Send + Sync {
    /// The stored answer of an earlier identical call (the kit's
    /// idempotency rule answers its own IDEMPOTENCY_CONFLICT, hence the
    /// `ApiResult`).
    fn replay<R: Message + Default>(
        &self,
        key: &IdempotencyKey,
    ) -> impl Future<Output = ApiResult<Option<R>>> + Send;

    /// Inserts new invitations with their outbox messages and, for an
    /// idempotent call, its answer, in one transaction (which may also
    /// carry other calls' invitations: all or none of a call's are
    /// committed when this returns).
    fn insert_created<R: Message>(
        &self,
        created: Vec<Invitation>,
        emit: Vec<OutgoingMessage>,
        answer: Option<(&IdempotencyKey, &R)>,
        now: DateTime<Utc>,
    ) -> impl Future<Output = StoreResult<()>> + Send;
}
