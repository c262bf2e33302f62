//! `usher audit`: the account's audit log, newest first.

use anyhow::Context as _;
use usher_proto::identity::v1::{
    AuditEvent, ListAuditEventsRequest, ListAuditEventsResponse,
    audit_service_client::AuditServiceClient,
};

use crate::{
    client::Client,
    output::{self, line},
    rpc,
};

/// `usher audit`.
#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    /// Only this action (`user.deactivated`), or a prefix ending in `.`
    /// (`invitation.`).
    #[arg(long, default_value = "")]
    pub action: String,
    /// Only events by this actor (user, API key or platform key id).
    #[arg(long, default_value = "")]
    pub actor: String,
    /// Only events on this target type (`user`, `invitation`, `role`, …).
    #[arg(long, default_value = "")]
    pub target_type: String,
    /// Only events on this target id.
    #[arg(long, default_value = "")]
    pub target: String,
    /// Only events at or after this time (RFC 3339, e.g. 2026-01-31T00:00:00Z).
    #[arg(long, value_parser = parse_time)]
    pub since: Option<prost_types::Timestamp>,
    /// Only events before this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    pub until: Option<prost_types::Timestamp>,
    /// Most events to show.
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
}

/// An RFC 3339 time as a protobuf timestamp.
pub fn parse_time(text: &str) -> anyhow::Result<prost_types::Timestamp> {
    let time = chrono::DateTime::parse_from_rfc3339(text)
        .with_context(|| format!("{text:?} is not an RFC 3339 time (2026-01-31T09:00:00Z)"))?;
    Ok(prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: i32::try_from(time.timestamp_subsec_nanos()).unwrap_or(0),
    })
}

/// Lists audit events.
pub async fn run(client: &mut Client, args: AuditArgs) -> anyhow::Result<()> {
    let mut shown = ListAuditEventsResponse::default();
    let mut page_token = String::new();
    loop {
        let wanted = args
            .limit
            .saturating_sub(shown.audit_events.len())
            .clamp(1, 500);
        let page = rpc!(
            client,
            AuditServiceClient,
            list_audit_events,
            ListAuditEventsRequest {
                page_size: i32::try_from(wanted).unwrap_or(500),
                page_token: page_token.clone(),
                actor_id: args.actor.clone(),
                target_type: args.target_type.clone(),
                target_id: args.target.clone(),
                action: args.action.clone(),
                start_time: args.since,
                end_time: args.until,
            }
        )?;
        shown.audit_events.extend(page.audit_events);
        shown.next_page_token = page.next_page_token;
        if shown.next_page_token.is_empty() || shown.audit_events.len() >= args.limit {
            break;
        }
        page_token = shown.next_page_token.clone();
    }
    shown.audit_events.truncate(args.limit);
    if client.json {
        return output::json("usher.identity.v1.ListAuditEventsResponse", &shown);
    }
    line(output::table(
        &["TIME", "ACTOR", "ACTION", "TARGET"],
        shown.audit_events.iter().map(row),
    ));
    Ok(())
}

/// One row of the audit table.
pub fn row(event: &AuditEvent) -> Vec<String> {
    let actor = event.actor.as_ref().map_or_else(String::new, |a| {
        if a.display_name.is_empty() {
            a.id.clone()
        } else {
            a.display_name.clone()
        }
    });
    let target = if event.target_display_name.is_empty() {
        format!("{} {}", event.target_type, event.target_id)
    } else {
        format!("{} {}", event.target_type, event.target_display_name)
    };
    vec![
        output::time(event.event_time.as_ref()),
        actor,
        event.action.clone(),
        target,
    ]
}

#[cfg(test)]
mod tests {
    use usher_proto::identity::v1::Actor;

    use super::*;

    #[test]
    fn times_parse_as_rfc3339() {
        let t = parse_time("2023-11-14T22:13:20Z").expect("parsed");
        assert_eq!(t.seconds, 1_700_000_000);
        let offset = parse_time("2023-11-14T23:13:20+01:00").expect("parsed");
        assert_eq!(offset.seconds, 1_700_000_000);
        assert!(parse_time("yesterday").is_err());
    }

    #[test]
    fn rows_name_actor_and_target() {
        let event = AuditEvent {
            event_time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            actor: Some(Actor {
                display_name: "Jo Owner".into(),
                ..Default::default()
            }),
            action: "user.deactivated".into(),
            target_type: "user".into(),
            target_id: "u1".into(),
            ..Default::default()
        };
        assert_eq!(
            row(&event),
            [
                "2023-11-14 22:13",
                "Jo Owner",
                "user.deactivated",
                "user u1"
            ]
        );
    }
}
