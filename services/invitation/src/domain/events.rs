//! What the invitation service writes to its outbox: email jobs (with the
//! link sealed for the notification service) and `invitation.*` events.
//! Pure builders: a transition calls them so the change and what it emits
//! are decided together.

use chrono::{DateTime, Utc};
use usher_kit::{
    amqp::{OutgoingMessage, email_job_message},
    convert::timestamp,
    error::{ApiError, ApiResult},
    events::DomainEvent,
    seal::Sealer,
    tokens::Token,
};
use usher_proto::{
    events::v1 as events, identity::v1 as identity, invitation::v1 as pb,
    notification::v1 as notification,
};
use uuid::Uuid;

use super::{
    Invitation, InvitationState,
    actors::{invitee, inviter},
};

/// The emitting service in event sources.
const SOURCE: &str = "invitation";

/// What an invitation email shows beyond the invitation itself.
#[derive(Clone, Debug, Default)]
pub struct EmailContext {
    /// The account's name.
    pub account_name: String,
    /// The account's default locale (the fallback).
    pub account_locale: String,
    /// The request id of the call, for log correlation.
    pub request_id: String,
}

/// Where links point and how they are sealed for the notification service.
#[derive(Clone, Copy, Debug)]
pub struct Links<'a> {
    /// Seals the link in the email job.
    pub sealer: &'a Sealer,
    /// `<public_base_url>` without a trailing `/`.
    pub base: &'a str,
}

/// The invitation (or reinvitation) email of `model`, carrying `token`
/// sealed: returns the outbox message and the job id.
pub fn invitation_email(
    links: Links<'_>,
    model: &Invitation,
    token: &Token,
    template: notification::EmailTemplate,
    context: &EmailContext,
    now: DateTime<Utc>,
) -> ApiResult<(OutgoingMessage, String)> {
    let job_id = Uuid::now_v7().to_string();
    let link = format!("{}/invite?token={}", links.base, token.as_str());
    let sealed_link = links
        .sealer
        .try_seal(&job_id, &link)
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("sealing the link: {e}")))?;
    let job = notification::EmailJob {
        job_id: job_id.clone(),
        account_id: model.account_id.to_string(),
        template: template as i32,
        recipient_email: model.email.clone(),
        recipient_name: model.display_name.clone(),
        locale: model.locale.clone(),
        account_default_locale: context.account_locale.clone(),
        variables: Some(notification::EmailVariables {
            account_name: context.account_name.clone(),
            inviter_name: model.inviter_name.clone(),
            expire_time: Some(timestamp(model.expire_time)),
            role_name: model.role_name.clone(),
            ..Default::default()
        }),
        sealed_link,
        seal_key_id: links.sealer.key_id().to_owned(),
        source: notification::EmailSource::Invitation as i32,
        invitation_id: model.id.to_string(),
        user_id: model.user_id.to_string(),
        token_version: model.token_version,
        create_time: Some(timestamp(now)),
        request_id: context.request_id.clone(),
    };
    Ok((email_job_message(&job), job_id))
}

/// The recipient of an "invitation accepted" email.
#[derive(Clone, Debug)]
pub struct InviterAddress {
    /// The inviter's user id.
    pub user_id: String,
    /// The inviter's email.
    pub email: String,
    /// The inviter's name.
    pub name: String,
    /// The inviter's locale.
    pub locale: String,
}

/// The "invitation accepted" email to the inviter of `model`, who joined as
/// `invitee_name`.
pub fn accepted_email(
    model: &Invitation,
    inviter: &InviterAddress,
    invitee_name: &str,
    context: &EmailContext,
    now: DateTime<Utc>,
) -> OutgoingMessage {
    let job = notification::EmailJob {
        job_id: Uuid::now_v7().to_string(),
        account_id: model.account_id.to_string(),
        template: notification::EmailTemplate::InvitationAccepted as i32,
        recipient_email: inviter.email.clone(),
        recipient_name: inviter.name.clone(),
        locale: inviter.locale.clone(),
        account_default_locale: context.account_locale.clone(),
        variables: Some(notification::EmailVariables {
            account_name: context.account_name.clone(),
            invitee_name: invitee_name.to_owned(),
            invitee_email: model.email.clone(),
            event_time: Some(timestamp(now)),
            ..Default::default()
        }),
        source: notification::EmailSource::Invitation as i32,
        invitation_id: model.id.to_string(),
        user_id: inviter.user_id.clone(),
        create_time: Some(timestamp(now)),
        request_id: context.request_id.clone(),
        ..Default::default()
    };
    email_job_message(&job)
}

fn event(
    routing_key: &'static str,
    model: &Invitation,
    now: DateTime<Utc>,
) -> DomainEvent<'static> {
    DomainEvent {
        routing_key,
        service: SOURCE,
        subject: model.id.to_string(),
        account_id: Some(model.account_id),
        time: now,
    }
}

/// `invitation.created`.
pub fn created(
    model: &Invitation,
    actor: &identity::Actor,
    request_id: &str,
    now: DateTime<Utc>,
) -> OutgoingMessage {
    event("invitation.created", model, now).into_message(
        "InvitationCreated",
        &events::InvitationCreated {
            invitation_id: model.id.to_string(),
            account_id: model.account_id.to_string(),
            actor: Some(actor.clone()),
            email: model.email.clone(),
            user_id: model.user_id.to_string(),
            role_id: model.role_id.to_string(),
            team_id: model.team_id.map(|id| id.to_string()).unwrap_or_default(),
            products: model.products.clone(),
            locale: model.locale.clone(),
            expire_time: Some(timestamp(model.expire_time)),
            request_id: request_id.to_owned(),
        },
    )
}

/// `invitation.resent`.
pub fn resent(model: &Invitation, actor: &identity::Actor, now: DateTime<Utc>) -> OutgoingMessage {
    event("invitation.resent", model, now).into_message(
        "InvitationResent",
        &events::InvitationResent {
            invitation_id: model.id.to_string(),
            account_id: model.account_id.to_string(),
            actor: Some(actor.clone()),
            email: model.email.clone(),
            token_version: model.token_version,
            expire_time: Some(timestamp(model.expire_time)),
            resend_count: model.resend_count,
        },
    )
}

/// `invitation.revoked` or `invitation.deleted`, from `previous` state.
pub fn removed(
    model: &Invitation,
    actor: &identity::Actor,
    previous: InvitationState,
    deleted: bool,
    now: DateTime<Utc>,
) -> OutgoingMessage {
    if deleted {
        event("invitation.deleted", model, now).into_message(
            "InvitationDeleted",
            &events::InvitationDeleted {
                invitation_id: model.id.to_string(),
                account_id: model.account_id.to_string(),
                actor: Some(actor.clone()),
                email: model.email.clone(),
                user_id: model.user_id.to_string(),
                previous_state: pb::InvitationState::from(previous) as i32,
            },
        )
    } else {
        event("invitation.revoked", model, now).into_message(
            "InvitationRevoked",
            &events::InvitationRevoked {
                invitation_id: model.id.to_string(),
                account_id: model.account_id.to_string(),
                actor: Some(actor.clone()),
                email: model.email.clone(),
                user_id: model.user_id.to_string(),
                previous_state: pb::InvitationState::from(previous) as i32,
            },
        )
    }
}

/// `invitation.accepted`.
pub fn accepted(model: &Invitation, name: &str, now: DateTime<Utc>) -> OutgoingMessage {
    event("invitation.accepted", model, now).into_message(
        "InvitationAccepted",
        &events::InvitationAccepted {
            invitation_id: model.id.to_string(),
            account_id: model.account_id.to_string(),
            actor: Some(invitee(model, name)),
            email: model.email.clone(),
            user_id: model.user_id.to_string(),
            inviter: Some(inviter(model)),
            role_id: model.role_id.to_string(),
            team_id: model.team_id.map(|id| id.to_string()).unwrap_or_default(),
            products: model.products.clone(),
        },
    )
}

/// `invitation.declined`.
pub fn declined(model: &Invitation, now: DateTime<Utc>) -> OutgoingMessage {
    event("invitation.declined", model, now).into_message(
        "InvitationDeclined",
        &events::InvitationDeclined {
            invitation_id: model.id.to_string(),
            account_id: model.account_id.to_string(),
            actor: Some(invitee(model, &model.display_name)),
            email: model.email.clone(),
            user_id: model.user_id.to_string(),
        },
    )
}

/// `invitation.expired`.
pub fn expired(model: &Invitation, now: DateTime<Utc>) -> OutgoingMessage {
    event("invitation.expired", model, now).into_message(
        "InvitationExpired",
        &events::InvitationExpired {
            invitation_id: model.id.to_string(),
            account_id: model.account_id.to_string(),
            actor: Some(identity::Actor {
                kind: identity::ActorKind::System as i32,
                ..Default::default()
            }),
            email: model.email.clone(),
            user_id: model.user_id.to_string(),
            token_version: model.token_version,
            expire_time: Some(timestamp(model.expire_time)),
        },
    )
}
