//! Stored invitations as the API shows them, and the actors of principals.

use chrono::{DateTime, Utc};
use usher_kit::{
    convert::{json_to_struct, optional_timestamp, strings, timestamp},
    principal::{Principal, PrincipalKind},
};
use usher_proto::{identity::v1 as identity, invitation::v1 as pb};

use crate::store::entities::invitation;

/// Stored states.
pub const PENDING: &str = "PENDING";
/// Stored state of an invitation whose accept holds the claim.
pub const ACCEPTING: &str = "ACCEPTING";
/// Stored state: accepted.
pub const ACCEPTED: &str = "ACCEPTED";
/// Stored state: revoked by an admin.
pub const REVOKED: &str = "REVOKED";
/// Stored state: declined by the invitee.
pub const DECLINED: &str = "DECLINED";

/// The state of `model` as of `now`: PENDING past its expiry reads EXPIRED;
/// an ACCEPTING claim that ran out reads as the state it would return to.
pub fn state(model: &invitation::Model, now: DateTime<Utc>) -> pb::InvitationState {
    let open = |model: &invitation::Model| {
        if model.expire_time > now {
            pb::InvitationState::Pending
        } else {
            pb::InvitationState::Expired
        }
    };
    match model.state.as_str() {
        PENDING => open(model),
        ACCEPTING if model.claim_until.is_some_and(|until| until > now) => {
            pb::InvitationState::Accepting
        }
        ACCEPTING => open(model),
        ACCEPTED => pb::InvitationState::Accepted,
        REVOKED => pb::InvitationState::Revoked,
        DECLINED => pb::InvitationState::Declined,
        _ => pb::InvitationState::Unspecified,
    }
}

/// The stored name of an actor kind.
pub fn actor_kind_name(kind: identity::ActorKind) -> &'static str {
    match kind {
        identity::ActorKind::User => "user",
        identity::ActorKind::ApiKey => "api_key",
        identity::ActorKind::Platform => "platform",
        identity::ActorKind::Anonymous => "anonymous",
        identity::ActorKind::System => "system",
        identity::ActorKind::Unspecified => "unspecified",
    }
}

fn actor_kind(stored: &str) -> identity::ActorKind {
    match stored {
        "user" => identity::ActorKind::User,
        "api_key" => identity::ActorKind::ApiKey,
        "platform" => identity::ActorKind::Platform,
        "anonymous" => identity::ActorKind::Anonymous,
        "system" => identity::ActorKind::System,
        _ => identity::ActorKind::Unspecified,
    }
}

/// The actor of a verified caller (its display name is identity's to tell).
pub fn actor(principal: &Principal) -> identity::Actor {
    let (kind, id) = match principal.kind {
        PrincipalKind::User => (
            identity::ActorKind::User,
            principal.user_id.map(|id| id.to_string()),
        ),
        PrincipalKind::ApiKey => (identity::ActorKind::ApiKey, principal.credential_id.clone()),
        PrincipalKind::Platform => (
            identity::ActorKind::Platform,
            principal.credential_id.clone(),
        ),
        PrincipalKind::Anonymous => (identity::ActorKind::Anonymous, None),
        PrincipalKind::Service => (identity::ActorKind::System, principal.service.clone()),
    };
    identity::Actor {
        kind: kind as i32,
        id: id.unwrap_or_default(),
        display_name: String::new(),
    }
}

/// The inviter recorded on `model`.
pub fn inviter(model: &invitation::Model) -> identity::Actor {
    identity::Actor {
        kind: actor_kind(&model.inviter_kind) as i32,
        id: model.inviter_id.clone(),
        display_name: model.inviter_name.clone(),
    }
}

/// An invitation as the API shows it, as of `now`.
pub fn invitation(model: &invitation::Model, now: DateTime<Utc>) -> pb::Invitation {
    let delivery = (!model.delivery_job_id.is_empty()).then(|| pb::EmailDelivery {
        job_id: model.delivery_job_id.clone(),
        status: model.delivery_status,
        reason: model.delivery_reason.clone(),
        attempts: model.delivery_attempts,
        update_time: optional_timestamp(model.delivery_update_time),
    });
    pb::Invitation {
        id: model.id.to_string(),
        account_id: model.account_id.to_string(),
        email: model.email.clone(),
        display_name: model.display_name.clone(),
        state: state(model, now) as i32,
        role_id: model.role_id.to_string(),
        role_name: model.role_name.clone(),
        team_id: model.team_id.map(|id| id.to_string()).unwrap_or_default(),
        team_name: model.team_name.clone(),
        products: strings(&model.products),
        metadata: model.metadata.as_ref().map(json_to_struct),
        inviter: Some(inviter(model)),
        user_id: model.user_id.to_string(),
        locale: model.locale.clone(),
        create_time: Some(timestamp(model.create_time)),
        update_time: Some(timestamp(model.update_time)),
        expire_time: Some(timestamp(model.expire_time)),
        accept_time: optional_timestamp(model.accept_time),
        revoke_time: optional_timestamp(model.revoke_time),
        decline_time: optional_timestamp(model.decline_time),
        resend_count: model.resend_count,
        last_send_time: Some(timestamp(model.last_send_time)),
        latest_delivery: delivery,
    }
}
