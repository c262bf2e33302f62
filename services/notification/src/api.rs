//! The gRPC handlers of usher-notification: the account's deliveries and
//! template previews. The account comes only from the verified principal
//! (P14); another account's delivery ids answer NOT_FOUND like unknown ones.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, Condition, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};
use usher_kit::{
    clock::SharedClock,
    convert::{optional_timestamp, timestamp},
    email::EmailAddress,
    error::{ApiError, ApiResult},
    pagination,
    principal::Principal,
    server::principal,
};
use usher_proto::notification::v1 as pb;
use uuid::Uuid;

use crate::{
    store::{self, Status as DeliveryStatus, delivery},
    templates::{self, EmailValues, Templates},
};

/// Longest locale tag accepted by PreviewEmail.
const MAX_LOCALE_CHARS: usize = 35;

/// The handlers of every notification RPC.
#[derive(Clone, Debug)]
pub struct NotificationApi {
    db: DatabaseConnection,
    templates: Arc<Templates>,
    link_base: String,
    clock: SharedClock,
}

/// The filters of a list query, fingerprinted into its page tokens.
#[derive(Serialize)]
struct ListQuery<'a> {
    status: i32,
    template: i32,
    invitation_id: &'a str,
    user_id: &'a str,
    recipient_email: &'a str,
    start: Option<i64>,
    end: Option<i64>,
}

/// The keyset cursor: the last row's receive time (µs) and id.
#[derive(Serialize, Deserialize)]
struct Cursor(i64, Uuid);

impl NotificationApi {
    /// Handlers over the deliveries in `db`; previews link to `link_base`.
    pub fn new(
        db: DatabaseConnection,
        templates: Arc<Templates>,
        link_base: impl Into<String>,
        clock: SharedClock,
    ) -> Self {
        Self {
            db,
            templates,
            link_base: link_base.into(),
            clock,
        }
    }

    /// ListDeliveries for `caller`.
    pub async fn list(
        &self,
        caller: &Principal,
        request: pb::ListDeliveriesRequest,
    ) -> ApiResult<pb::ListDeliveriesResponse> {
        let account_id = caller.account()?;
        let page_size = pagination::page_size(request.page_size)?;
        let status = pb::DeliveryStatus::try_from(request.status)
            .map_err(|_| ApiError::invalid("status", "unknown status"))?;
        let template = pb::EmailTemplate::try_from(request.template)
            .map_err(|_| ApiError::invalid("template", "unknown template"))?;
        let invitation_id = optional_id("invitation_id", &request.invitation_id)?;
        let user_id = optional_id("user_id", &request.user_id)?;
        let recipient = request.recipient_email.trim();
        let recipient = if recipient.is_empty() {
            String::new()
        } else {
            if recipient.len() > 254 {
                return Err(ApiError::invalid(
                    "recipient_email",
                    "must be at most 254 characters",
                ));
            }
            EmailAddress::parse(recipient)
                .map_err(|_| ApiError::invalid("recipient_email", "is not an email address"))?
                .into_canonical()
        };
        let start = time("start_time", request.start_time.as_ref())?;
        let end = time("end_time", request.end_time.as_ref())?;
        if let (Some(start), Some(end)) = (start, end)
            && start > end
        {
            return Err(ApiError::invalid(
                "start_time",
                "must not be after end_time",
            ));
        }
        let invitation_text = invitation_id.map(|id| id.to_string()).unwrap_or_default();
        let user_text = user_id.map(|id| id.to_string()).unwrap_or_default();
        let fingerprint = pagination::fingerprint(&ListQuery {
            status: status as i32,
            template: template as i32,
            invitation_id: &invitation_text,
            user_id: &user_text,
            recipient_email: &recipient,
            start: start.map(|t| t.timestamp_micros()),
            end: end.map(|t| t.timestamp_micros()),
        });
        let cursor: Option<Cursor> = pagination::decode_token(&fingerprint, &request.page_token)?;

        use delivery::Column;
        let mut filter = Condition::all().add(Column::AccountId.eq(account_id));
        if let Some(status) = status_filter(status) {
            filter = filter.add(Column::Status.eq(status.as_str()));
        }
        if template != pb::EmailTemplate::Unspecified {
            filter = filter.add(Column::Template.eq(template as i32));
        }
        if invitation_id.is_some() {
            filter = filter.add(Column::InvitationId.eq(invitation_text.clone()));
        }
        if user_id.is_some() {
            filter = filter.add(Column::UserId.eq(user_text.clone()));
        }
        if !recipient.is_empty() {
            filter = filter.add(Column::RecipientEmail.eq(recipient.clone()));
        }
        if let Some(start) = start {
            filter = filter.add(Column::CreateTime.gte(start));
        }
        if let Some(end) = end {
            filter = filter.add(Column::CreateTime.lt(end));
        }
        if let Some(Cursor(micros, id)) = cursor {
            let at = DateTime::<Utc>::from_timestamp_micros(micros)
                .ok_or_else(|| ApiError::invalid("page_token", "is not a token of this query"))?;
            filter = filter.add(
                Condition::any().add(Column::CreateTime.lt(at)).add(
                    Condition::all()
                        .add(Column::CreateTime.eq(at))
                        .add(Column::Id.lt(id)),
                ),
            );
        }
        let mut rows = delivery::Entity::find()
            .filter(filter)
            .order_by_desc(Column::CreateTime)
            .order_by_desc(Column::Id)
            .limit(page_size + 1)
            .all(&self.db)
            .await?;
        let more = rows.len() as u64 > page_size;
        rows.truncate(usize::try_from(page_size).unwrap_or(usize::MAX));
        let next_page_token = match (more, rows.last()) {
            (true, Some(last)) => pagination::encode_token(
                &fingerprint,
                &Cursor(last.create_time.timestamp_micros(), last.id),
            ),
            _ => String::new(),
        };
        Ok(pb::ListDeliveriesResponse {
            deliveries: rows.iter().map(to_proto).collect(),
            next_page_token,
        })
    }

    /// GetDelivery for `caller`.
    pub async fn get(
        &self,
        caller: &Principal,
        request: pb::GetDeliveryRequest,
    ) -> ApiResult<pb::GetDeliveryResponse> {
        let account_id = caller.account()?;
        let id = Uuid::parse_str(request.delivery_id.trim())
            .map_err(|_| ApiError::invalid("delivery_id", "must be a UUID"))?;
        let row = store::get(&self.db, account_id, id)
            .await?
            .ok_or_else(|| ApiError::not_found("delivery"))?;
        Ok(pb::GetDeliveryResponse {
            delivery: Some(to_proto(&row)),
        })
    }

    /// PreviewEmail for `caller`: sample data, nothing sent.
    pub async fn preview(
        &self,
        caller: &Principal,
        request: &pb::PreviewEmailRequest,
    ) -> ApiResult<pb::PreviewEmailResponse> {
        let account_id = caller.account()?;
        let template = pb::EmailTemplate::try_from(request.template)
            .ok()
            .filter(|t| *t != pb::EmailTemplate::Unspecified)
            .ok_or_else(|| ApiError::invalid("template", "must name a template"))?;
        let tag = request.locale.trim();
        if tag.chars().count() > MAX_LOCALE_CHARS
            || !tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        {
            return Err(ApiError::invalid("locale", "is not a locale tag"));
        }
        // The account's default locale lives in identity; the newest job of
        // the account carries it, else the fallback is English.
        let account_locale = match templates::supported(tag) {
            Some(_) => None,
            None => store::account_locale(&self.db, account_id).await?,
        };
        let locale = templates::resolve_locale(tag, account_locale.as_deref().unwrap_or(""));
        let now = self.clock.now();
        let path = match template {
            pb::EmailTemplate::PasswordReset => "reset",
            pb::EmailTemplate::SetPassword => "set-password",
            _ => "invite",
        };
        let values = EmailValues {
            recipient_name: "Ada Lovelace".into(),
            account_name: "Example Account".into(),
            inviter_name: "Grace Hopper".into(),
            role_name: "User".into(),
            invitee_name: "Ada Lovelace".into(),
            invitee_email: "ada@example.com".into(),
            expire_time: Some(now + chrono::Duration::hours(24)),
            event_time: Some(now),
            link: templates::needs_link(template)
                .then(|| format!("{}/{path}?token=preview", self.link_base)),
        };
        let email = self
            .templates
            .render(template, locale, &values)
            .map_err(|error| ApiError::Internal(anyhow::anyhow!("preview: {error}")))?;
        Ok(pb::PreviewEmailResponse {
            subject: email.subject,
            html_body: email.html,
            text_body: email.text,
            locale: email.locale.to_owned(),
        })
    }
}

fn status_filter(status: pb::DeliveryStatus) -> Option<DeliveryStatus> {
    match status {
        pb::DeliveryStatus::Unspecified => None,
        pb::DeliveryStatus::Queued => Some(DeliveryStatus::Queued),
        pb::DeliveryStatus::Sent => Some(DeliveryStatus::Sent),
        pb::DeliveryStatus::Failed => Some(DeliveryStatus::Failed),
    }
}

fn optional_id(field: &str, value: &str) -> ApiResult<Option<Uuid>> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(None);
    }
    Uuid::parse_str(value)
        .map(Some)
        .map_err(|_| ApiError::invalid(field, "must be a UUID"))
}

fn time(field: &str, value: Option<&prost_types::Timestamp>) -> ApiResult<Option<DateTime<Utc>>> {
    value
        .map(|t| {
            u32::try_from(t.nanos)
                .ok()
                .and_then(|nanos| DateTime::<Utc>::from_timestamp(t.seconds, nanos))
                .ok_or_else(|| ApiError::invalid(field, "is not a valid time"))
        })
        .transpose()
}

/// The API view of a row: no link, no token, nothing sealed.
pub fn to_proto(row: &delivery::Model) -> pb::Delivery {
    let status = DeliveryStatus::parse(&row.status)
        .map(|s| s.proto())
        .unwrap_or(pb::DeliveryStatus::Unspecified);
    pb::Delivery {
        id: row.id.to_string(),
        template: row.template,
        recipient_email: row.recipient_email.clone(),
        recipient_name: row.recipient_name.clone(),
        locale: row.locale.clone(),
        status: status as i32,
        reason: row.reason.clone(),
        attempts: row.attempts,
        invitation_id: row.invitation_id.clone(),
        user_id: row.user_id.clone(),
        token_version: row.token_version,
        create_time: Some(timestamp(row.create_time)),
        update_time: Some(timestamp(row.update_time)),
        send_time: optional_timestamp(row.send_time),
        message_id: row.message_id.clone(),
    }
}

#[tonic::async_trait]
impl pb::notification_service_server::NotificationService for NotificationApi {
    async fn list_deliveries(
        &self,
        request: Request<pb::ListDeliveriesRequest>,
    ) -> Result<Response<pb::ListDeliveriesResponse>, Status> {
        let caller = principal(&request)?;
        usher_kit::text::check_request(&request)?;
        Ok(Response::new(
            self.list(&caller, request.into_inner()).await?,
        ))
    }

    async fn get_delivery(
        &self,
        request: Request<pb::GetDeliveryRequest>,
    ) -> Result<Response<pb::GetDeliveryResponse>, Status> {
        let caller = principal(&request)?;
        usher_kit::text::check_request(&request)?;
        Ok(Response::new(
            self.get(&caller, request.into_inner()).await?,
        ))
    }

    async fn preview_email(
        &self,
        request: Request<pb::PreviewEmailRequest>,
    ) -> Result<Response<pb::PreviewEmailResponse>, Status> {
        let caller = principal(&request)?;
        usher_kit::text::check_request(&request)?;
        Ok(Response::new(
            self.preview(&caller, request.get_ref()).await?,
        ))
    }
}
