//! AuditService: the account's audit log, newest first, with filters and
//! keyset pagination on `(event_time, id)`.
//!
//! The account comes only from the verified principal (P14): the request has
//! no account field, and every query filters on it.

use chrono::{DateTime, Utc};
use tonic::{Request, Response, Status};
use usher_kit::{
    error::{ApiResult, Violations},
    pagination,
};
use usher_proto::identity::v1 as pb;
use uuid::Uuid;

use super::{Call, IdentityApi, call, convert, status, validate::page_size};
use crate::store::{
    audit::{self, AuditFilter},
    entities::audit_event,
};

/// Page size when the caller sends 0.
const DEFAULT_PAGE_SIZE: u64 = 50;
/// Largest page.
const MAX_PAGE_SIZE: u64 = 500;
/// Longest `action` filter.
const MAX_ACTION_CHARS: usize = 100;
/// Longest actor or target id filter.
const MAX_ID_CHARS: usize = 128;
/// The kinds of target an entry can have.
pub const TARGET_TYPES: &[&str] = &[
    "account",
    "user",
    "invitation",
    "role",
    "team",
    "api_key",
    "product",
];

/// An actor or target id filter: empty for none, else at most
/// [`MAX_ID_CHARS`] printable ASCII characters (ids are UUIDs, or product
/// codes and platform key ids).
fn id_filter(violations: &mut Violations, field: &str, value: &str) -> Option<String> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    if value.len() > MAX_ID_CHARS || !value.chars().all(|c| c.is_ascii_graphic()) {
        violations.add(
            field,
            format!("must be an id of at most {MAX_ID_CHARS} printable ASCII characters"),
        );
        return None;
    }
    // UUIDs are stored in their canonical lower-case form.
    Some(Uuid::parse_str(value).map_or_else(|_| value.to_owned(), |id| id.to_string()))
}

/// A time bound: unset for none.
fn time_filter(
    violations: &mut Violations,
    field: &str,
    value: Option<&prost_types::Timestamp>,
) -> Option<DateTime<Utc>> {
    let value = value?;
    let time = u32::try_from(value.nanos)
        .ok()
        .filter(|nanos| *nanos < 1_000_000_000)
        .and_then(|nanos| DateTime::from_timestamp(value.seconds, nanos));
    if time.is_none() {
        violations.add(field, "is not a valid timestamp");
    }
    time
}

/// The protobuf kind of a stored actor kind.
fn actor_kind(stored: &str) -> pb::ActorKind {
    match stored {
        "user" => pb::ActorKind::User,
        "api_key" => pb::ActorKind::ApiKey,
        "platform" => pb::ActorKind::Platform,
        "anonymous" => pb::ActorKind::Anonymous,
        "system" => pb::ActorKind::System,
        _ => pb::ActorKind::Unspecified,
    }
}

/// An entry as the API shows it.
fn audit_view(model: &audit_event::Model) -> pb::AuditEvent {
    pb::AuditEvent {
        id: model.id.to_string(),
        event_time: Some(convert::timestamp(model.event_time)),
        actor: Some(pb::Actor {
            kind: actor_kind(&model.actor_kind) as i32,
            id: model.actor_id.clone(),
            display_name: model.actor_name.clone(),
        }),
        action: model.action.clone(),
        target_type: model.target_type.clone(),
        target_id: model.target_id.clone(),
        target_display_name: model.target_name.clone(),
        details: model.details.as_ref().map(convert::json_to_struct),
        request_id: model.request_id.clone(),
        client_ip: model.client_ip.clone(),
    }
}

impl IdentityApi {
    async fn list_audit_events(
        &self,
        call: Call,
        request: pb::ListAuditEventsRequest,
    ) -> ApiResult<pb::ListAuditEventsResponse> {
        let account_id = call.principal.account()?;
        let mut violations = Violations::new();
        let size = match page_size(request.page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE) {
            Ok(size) => size,
            Err(_) => {
                violations.add("page_size", "must not be negative");
                0
            }
        };
        let actor_id = id_filter(&mut violations, "actor_id", &request.actor_id);
        let target_type = request.target_type.trim().to_owned();
        if !target_type.is_empty() && !TARGET_TYPES.contains(&target_type.as_str()) {
            violations.add(
                "target_type",
                format!("must be one of {}", TARGET_TYPES.join(", ")),
            );
        }
        let target_id = id_filter(&mut violations, "target_id", &request.target_id);
        let action = request.action.trim().to_owned();
        if action.chars().count() > MAX_ACTION_CHARS || action.chars().any(char::is_control) {
            violations.add(
                "action",
                format!(
                    "must be at most {MAX_ACTION_CHARS} characters, without control characters"
                ),
            );
        }
        let start = time_filter(&mut violations, "start_time", request.start_time.as_ref());
        let end = time_filter(&mut violations, "end_time", request.end_time.as_ref());
        if let (Some(start), Some(end)) = (start, end)
            && start > end
        {
            violations.add("start_time", "must not be after end_time");
        }
        violations.into_result()?;

        let fingerprint = pagination::fingerprint(&(
            "audit",
            &actor_id,
            &target_type,
            &target_id,
            &action,
            start.map(|t| t.timestamp_micros()),
            end.map(|t| t.timestamp_micros()),
        ));
        let cursor: Option<(DateTime<Utc>, Uuid)> =
            pagination::decode_token(&fingerprint, &request.page_token)?;

        let filter = AuditFilter {
            account_id,
            actor_id,
            target_type,
            target_id,
            action,
            start,
            end,
        };
        let rows = audit::page(&self.state.db, filter, cursor, size + 1).await?;
        let (rows, next_page_token) = pagination::split_page(rows, size, |last| {
            pagination::encode_token(&fingerprint, &(last.event_time, last.id))
        });
        Ok(pb::ListAuditEventsResponse {
            audit_events: rows.iter().map(audit_view).collect(),
            next_page_token,
        })
    }
}

#[tonic::async_trait]
impl pb::audit_service_server::AuditService for IdentityApi {
    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let call = call(&request)?;
        self.list_audit_events(call, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }
}
