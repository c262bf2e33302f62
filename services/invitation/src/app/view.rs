//! Invitations as the API shows them, and one failed item of a bulk call.

use chrono::{DateTime, Utc};
use usher_kit::{
    convert::{json_to_struct, optional_timestamp, timestamp},
    error::ApiError,
};
use usher_proto::{identity::v1 as identity, invitation::v1 as pb};

use crate::domain::{Invitation, actors::inviter};

/// An invitation as the API shows it, as of `now`.
pub fn invitation(model: &Invitation, now: DateTime<Utc>) -> pb::Invitation {
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
        state: pb::InvitationState::from(model.state_at(now)) as i32,
        role_id: model.role_id.to_string(),
        role_name: model.role_name.clone(),
        team_id: model.team_id.map(|id| id.to_string()).unwrap_or_default(),
        team_name: model.team_name.clone(),
        products: model.products.clone(),
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

/// A failed item of a bulk call.
pub fn item_error(err: &ApiError) -> identity::ItemError {
    identity::ItemError {
        reason: err.reason().as_str().to_owned(),
        message: match err {
            ApiError::Rejected { message, .. } => message.clone(),
            ApiError::InvalidArgument(_) => "invalid argument".to_owned(),
            ApiError::Unavailable(_) => "a dependency is unavailable, retry shortly".to_owned(),
            ApiError::Internal(_) => "internal error".to_owned(),
        },
    }
}

/// The result of one id of a bulk call: the invitation after the action,
/// or why it failed.
pub fn item(
    id: uuid::Uuid,
    outcome: Result<Option<pb::Invitation>, &ApiError>,
) -> pb::InvitationResult {
    match outcome {
        Ok(invitation) => pb::InvitationResult {
            invitation_id: id.to_string(),
            invitation,
            error: None,
        },
        Err(err) => pb::InvitationResult {
            invitation_id: id.to_string(),
            invitation: None,
            error: Some(item_error(err)),
        },
    }
}
