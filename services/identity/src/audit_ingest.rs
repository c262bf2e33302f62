//! Ingests the invitation service's `invitation.*` domain events into the
//! account's audit log (audit_service.proto, docs/identity.md).
//!
//! The events arrive on identity's own durable quorum queue
//! ([`AUDIT_QUEUE`], bound to `usher.events` with `invitation.*`), declared by
//! both identity and the invitation service so that nothing published while
//! identity is down or not yet started is lost. Delivery is at-least-once;
//! each event becomes one entry whose id is the event's CloudEvents id, and
//! the insert does nothing when that id is already there, so a redelivered
//! event leaves a single entry. A message is acked only once its entry is
//! committed. While the database refuses the insert, the consumer keeps the
//! message and retries with backoff (it never requeues it, so a broker-side
//! delivery limit cannot drop it); if the service stops meanwhile, the
//! unacked message goes back to the queue. A message that cannot be read
//! (not a known `invitation.*` event, undecodable, without a UUID id or
//! account) would never be read on a redelivery either: it is acked and
//! logged. The consumer re-subscribes whenever the connection comes back.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::FutureExt;
use prost::Message;
use sea_orm::{ConnectionTrait, DatabaseConnection, EntityTrait, sea_query::OnConflict};
use serde_json::{Value as Json, json};
use tokio_util::sync::CancellationToken;
use usher_kit::{
    broker::{Broker, Received},
    clock::SharedClock,
    error::ApiResult,
    events::AUDIT_QUEUE,
};
use usher_proto::{events::v1 as events, identity::v1 as pb};
use uuid::Uuid;

use crate::store::{
    audit::{self, Actor, AuditEntry},
    entities::{api_key, audit_event, user},
};

/// Unacknowledged events in flight.
const PREFETCH: u16 = 32;
/// The longest wait between two attempts at a refused insert.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(10);
/// The longest actor id or name kept.
const MAX_ACTOR_CHARS: usize = 200;

/// One `invitation.*` event as the audit log records it.
#[derive(Clone, Debug, PartialEq)]
pub struct Ingested {
    /// The CloudEvents id, which becomes the entry's id.
    pub id: Uuid,
    /// The account.
    pub account_id: Uuid,
    /// The routing key, e.g. `invitation.revoked`.
    pub action: &'static str,
    /// When the change was committed.
    pub time: DateTime<Utc>,
    /// Who did it.
    pub actor: Actor,
    /// The invitation.
    pub invitation_id: String,
    /// The invitee's email, the entry's target name.
    pub email: String,
    /// Non-secret details.
    pub details: Json,
}

/// Why a message is not an event the audit log can record.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unreadable(String);

fn unreadable(text: impl Into<String>) -> Unreadable {
    Unreadable(text.into())
}

fn actor_of(actor: Option<&pb::Actor>) -> Actor {
    let Some(actor) = actor else {
        return Actor::system();
    };
    let kind = match pb::ActorKind::try_from(actor.kind) {
        Ok(pb::ActorKind::User) => "user",
        Ok(pb::ActorKind::ApiKey) => "api_key",
        Ok(pb::ActorKind::Platform) => "platform",
        Ok(pb::ActorKind::Anonymous) => "anonymous",
        Ok(pb::ActorKind::System) => "system",
        Ok(pb::ActorKind::Unspecified) | Err(_) => "system",
    };
    if kind == "system" && actor.id.is_empty() && actor.display_name.is_empty() {
        return Actor::system();
    }
    let clean = |text: &str| {
        text.chars()
            .filter(|c| !c.is_control())
            .take(MAX_ACTOR_CHARS)
            .collect::<String>()
    };
    Actor {
        kind,
        id: clean(&actor.id),
        name: clean(&actor.display_name),
    }
}

fn state_name(state: i32) -> String {
    usher_proto::invitation::v1::InvitationState::try_from(state)
        .map(|s| s.as_str_name().to_owned())
        .unwrap_or_default()
}

fn rfc3339(time: Option<&prost_types::Timestamp>) -> Json {
    time.and_then(|t| DateTime::<Utc>::from_timestamp(t.seconds, 0))
        .map_or(Json::Null, |t| Json::String(t.to_rfc3339()))
}

/// Reads one delivery: its routing key, CloudEvents headers and body. The
/// entry's time is the event's `cloudEvents_time`, else its AMQP timestamp,
/// else `received`.
pub fn read(
    routing_key: &str,
    headers: &std::collections::BTreeMap<String, String>,
    message_id: Option<&str>,
    timestamp: Option<u64>,
    data: &[u8],
    received: DateTime<Utc>,
) -> Result<Ingested, Unreadable> {
    let id = headers
        .get("cloudEvents_id")
        .map(String::as_str)
        .or(message_id)
        .ok_or_else(|| unreadable("no CloudEvents id"))?;
    let id = Uuid::parse_str(id).map_err(|_| unreadable("the CloudEvents id is not a UUID"))?;
    let time = headers
        .get("cloudEvents_time")
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
        .or_else(|| {
            timestamp
                .and_then(|s| i64::try_from(s).ok())
                .and_then(|s| DateTime::from_timestamp(s, 0))
        })
        .unwrap_or(received);
    let decode = |e: prost::DecodeError| unreadable(format!("undecodable {routing_key}: {e}"));
    let (action, account, actor, invitation_id, email, details) = match routing_key {
        "invitation.created" => {
            let e = events::InvitationCreated::decode(data).map_err(decode)?;
            let details = json!({
                "user_id": e.user_id,
                "role_id": e.role_id,
                "team_id": e.team_id,
                "products": e.products,
                "locale": e.locale,
                "expire_time": rfc3339(e.expire_time.as_ref()),
            });
            let actor = actor_of(e.actor.as_ref());
            (
                "invitation.created",
                e.account_id,
                actor,
                e.invitation_id,
                e.email,
                details,
            )
        }
        "invitation.resent" => {
            let e = events::InvitationResent::decode(data).map_err(decode)?;
            let details = json!({
                "token_version": e.token_version,
                "resend_count": e.resend_count,
                "expire_time": rfc3339(e.expire_time.as_ref()),
            });
            let actor = actor_of(e.actor.as_ref());
            (
                "invitation.resent",
                e.account_id,
                actor,
                e.invitation_id,
                e.email,
                details,
            )
        }
        "invitation.revoked" => {
            let e = events::InvitationRevoked::decode(data).map_err(decode)?;
            let details = json!({
                "user_id": e.user_id,
                "previous_state": state_name(e.previous_state),
            });
            let actor = actor_of(e.actor.as_ref());
            (
                "invitation.revoked",
                e.account_id,
                actor,
                e.invitation_id,
                e.email,
                details,
            )
        }
        "invitation.deleted" => {
            let e = events::InvitationDeleted::decode(data).map_err(decode)?;
            let details = json!({
                "user_id": e.user_id,
                "previous_state": state_name(e.previous_state),
            });
            let actor = actor_of(e.actor.as_ref());
            (
                "invitation.deleted",
                e.account_id,
                actor,
                e.invitation_id,
                e.email,
                details,
            )
        }
        "invitation.accepted" => {
            let e = events::InvitationAccepted::decode(data).map_err(decode)?;
            let inviter = actor_of(e.inviter.as_ref());
            let details = json!({
                "user_id": e.user_id,
                "role_id": e.role_id,
                "team_id": e.team_id,
                "products": e.products,
                "inviter_id": inviter.id,
            });
            let actor = actor_of(e.actor.as_ref());
            (
                "invitation.accepted",
                e.account_id,
                actor,
                e.invitation_id,
                e.email,
                details,
            )
        }
        "invitation.declined" => {
            let e = events::InvitationDeclined::decode(data).map_err(decode)?;
            let details = json!({ "user_id": e.user_id });
            let actor = actor_of(e.actor.as_ref());
            (
                "invitation.declined",
                e.account_id,
                actor,
                e.invitation_id,
                e.email,
                details,
            )
        }
        "invitation.expired" => {
            let e = events::InvitationExpired::decode(data).map_err(decode)?;
            let details = json!({
                "user_id": e.user_id,
                "token_version": e.token_version,
                "expire_time": rfc3339(e.expire_time.as_ref()),
            });
            let actor = actor_of(e.actor.as_ref());
            (
                "invitation.expired",
                e.account_id,
                actor,
                e.invitation_id,
                e.email,
                details,
            )
        }
        other => return Err(unreadable(format!("not an invitation event: {other:?}"))),
    };
    let account_id = Uuid::parse_str(&account)
        .map_err(|_| unreadable(format!("{action}: the account id is not a UUID")))?;
    Ok(Ingested {
        id,
        account_id,
        action,
        time,
        actor,
        invitation_id,
        email,
        details,
    })
}

/// The actor's name when the event carries none: the user's display name or
/// the API key's name, as identity knows them now (the event names the actor
/// by id only when the invitation service had no name at hand).
async fn name_actor<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    actor: &mut Actor,
) -> ApiResult<()> {
    if !actor.name.is_empty() {
        return Ok(());
    }
    let Ok(id) = Uuid::parse_str(&actor.id) else {
        return Ok(());
    };
    let name = match actor.kind {
        "user" | "anonymous" => user::Entity::find_by_id(id)
            .one(db)
            .await?
            .filter(|u| u.account_id == account_id)
            .map(|u| u.display_name),
        "api_key" => api_key::Entity::find_by_id(id)
            .one(db)
            .await?
            .filter(|k| k.account_id.is_none_or(|a| a == account_id))
            .map(|k| k.name),
        _ => None,
    };
    if let Some(name) = name {
        actor.name = name.chars().take(MAX_ACTOR_CHARS).collect();
    }
    Ok(())
}

/// Records `events` in their accounts' audit logs, in one transaction and
/// one statement; returns how many were new (an entry whose id is already
/// there is a redelivery, kept as it was).
pub async fn record(db: &DatabaseConnection, events: Vec<Ingested>) -> ApiResult<u64> {
    if events.is_empty() {
        return Ok(0);
    }
    let txn = usher_kit::db::begin(db).await?;
    let mut rows = Vec::with_capacity(events.len());
    for mut event in events {
        name_actor(&txn, event.account_id, &mut event.actor).await?;
        let mut row = audit::row(
            AuditEntry {
                account_id: event.account_id,
                actor: &event.actor,
                action: event.action,
                target_type: "invitation",
                target_id: event.invitation_id,
                target_name: event.email,
                details: Some(event.details),
                request_id: "",
            },
            event.time,
        );
        row.id = sea_orm::Set(event.id);
        rows.push(row);
    }
    let inserted = audit_event::Entity::insert_many(rows)
        .on_conflict(
            OnConflict::column(audit_event::Column::Id)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(&txn)
        .await?;
    txn.commit().await?;
    Ok(inserted)
}

/// Consumes [`AUDIT_QUEUE`] until `shutdown`, re-subscribing after a lost
/// connection.
pub async fn consume(
    broker: Broker,
    db: DatabaseConnection,
    clock: SharedClock,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        if let Err(error) = consume_once(&broker, &db, &clock, &shutdown).await {
            tracing::warn!(%error, "audit event consumer stopped; resubscribing");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

async fn consume_once(
    broker: &Broker,
    db: &DatabaseConnection,
    clock: &SharedClock,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let mut subscription = tokio::select! {
        () = shutdown.cancelled() => return Ok(()),
        subscribed = broker.subscribe(AUDIT_QUEUE, crate::SERVICE, PREFETCH) => subscribed?,
    };
    tracing::info!(
        queue = AUDIT_QUEUE,
        "ingesting invitation events into the audit log"
    );
    loop {
        let first = tokio::select! {
            () = shutdown.cancelled() => break,
            next = subscription.next() => match next {
                Some(delivery) => delivery?,
                None => break,
            },
        };
        // With it, whatever else has arrived already: one transaction for all.
        let mut batch = vec![first];
        while batch.len() < usize::from(PREFETCH) {
            match subscription.next().now_or_never() {
                Some(Some(delivery)) => batch.push(delivery?),
                Some(None) | None => break,
            }
        }
        if !handle(db, batch, clock.now(), shutdown).await? {
            break;
        }
    }
    subscription.close().await;
    Ok(())
}

/// Records a batch of deliveries and acks them; `Ok(false)` when shutdown
/// came first (the deliveries go back to the queue unacked).
async fn handle(
    db: &DatabaseConnection,
    batch: Vec<Received>,
    received: DateTime<Utc>,
    shutdown: &CancellationToken,
) -> anyhow::Result<bool> {
    let mut events = Vec::with_capacity(batch.len());
    let mut held = Vec::with_capacity(batch.len());
    for delivery in batch {
        match read(
            &delivery.routing_key,
            &delivery.headers,
            delivery.message_id.as_deref(),
            delivery.timestamp,
            &delivery.data,
            received,
        ) {
            Ok(event) => {
                events.push(event);
                held.push(delivery);
            }
            Err(error) => {
                tracing::error!(%error, routing_key = %delivery.routing_key, "unreadable event dropped from the audit queue");
                delivery.ack().await?;
            }
        }
    }
    let mut delay = Duration::from_millis(200);
    loop {
        match record(db, events.clone()).await {
            Ok(inserted) => {
                let again = events.len() as u64 - inserted;
                if again > 0 {
                    tracing::debug!(again, "audit events already recorded");
                }
                for delivery in held {
                    delivery.ack().await?;
                }
                return Ok(true);
            }
            Err(error) => {
                tracing::warn!(%error, events = events.len(), "audit events not recorded yet; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(false),
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(MAX_RETRY_DELAY);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]

    use std::sync::Arc;

    use lapin::options::QueueDeclareOptions;
    use usher_kit::{
        amqp::{Amqp, OutgoingMessage},
        broker::MemoryBroker,
        clock::SystemClock,
        config::{AmqpConfig, Secret},
        events::{DomainEvent, audit_topology},
    };
    use usher_proto::identity::v1::{
        account_service_server::AccountService, audit_service_server::AuditService,
    };

    use super::*;
    use crate::testing::{
        TestIdentity, admin_permissions, member, new_account_request, platform, request,
    };

    async fn rabbitmqctl(args: &[&str]) {
        let status = tokio::process::Command::new("rabbitmqctl")
            .arg("-q")
            .args(args)
            .status()
            .await
            .expect("rabbitmqctl runs");
        assert!(status.success(), "rabbitmqctl {args:?}");
    }

    /// A RabbitMQ vhost of the test's own, so the fixed queue name is ours.
    struct Vhost(String);

    impl Vhost {
        async fn create() -> Self {
            let name = format!(
                "usher-identity-audit-{}",
                &Uuid::new_v4().simple().to_string()[..8]
            );
            rabbitmqctl(&["add_vhost", &name]).await;
            rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]).await;
            Self(name)
        }

        fn amqp(&self) -> Amqp {
            self.amqp_named("usher-identity-audit-test")
        }

        fn amqp_named(&self, name: &str) -> Amqp {
            Amqp::start(
                AmqpConfig {
                    url: Secret::new(format!("amqp://guest:guest@127.0.0.1:5672/{}", self.0)),
                    heartbeat_secs: 2,
                    reconnect_min_ms: 100,
                    reconnect_max_ms: 500,
                    ..AmqpConfig::default()
                },
                name,
            )
        }

        async fn delete(self) {
            rabbitmqctl(&["delete_vhost", &self.0]).await;
        }
    }

    /// An account with its owner: `(account, owner id, owner's name, admin)`.
    async fn account(test: &TestIdentity) -> (Uuid, Uuid, String, usher_kit::principal::Principal) {
        let created = test
            .api
            .create_account(request(&platform(), new_account_request(5)))
            .await
            .expect("account")
            .into_inner();
        let account_id: Uuid = created.account.expect("account").id.parse().expect("uuid");
        let owner = created.owner.expect("owner");
        let owner_id: Uuid = owner.id.parse().expect("uuid");
        let admin = member(account_id, owner_id, &admin_permissions());
        (account_id, owner_id, owner.display_name, admin)
    }

    fn revoked(account_id: Uuid, owner_id: Uuid, invitation_id: Uuid) -> OutgoingMessage {
        DomainEvent {
            routing_key: "invitation.revoked",
            service: "invitation",
            subject: invitation_id.to_string(),
            account_id: Some(account_id),
            time: DateTime::from_timestamp(1_800_000_000, 0).expect("time"),
        }
        .into_message(
            "InvitationRevoked",
            &events::InvitationRevoked {
                invitation_id: invitation_id.to_string(),
                account_id: account_id.to_string(),
                // By id only, as the invitation service names a revoking admin.
                actor: Some(pb::Actor {
                    kind: pb::ActorKind::User as i32,
                    id: owner_id.to_string(),
                    display_name: String::new(),
                }),
                email: "ivy@acme.example".into(),
                user_id: Uuid::new_v4().to_string(),
                previous_state: usher_proto::invitation::v1::InvitationState::Pending as i32,
            },
        )
    }

    fn resent(account_id: Uuid, invitation_id: Uuid) -> OutgoingMessage {
        DomainEvent {
            routing_key: "invitation.resent",
            service: "invitation",
            subject: invitation_id.to_string(),
            account_id: Some(account_id),
            time: DateTime::from_timestamp(1_800_000_100, 0).expect("time"),
        }
        .into_message(
            "InvitationResent",
            &events::InvitationResent {
                invitation_id: invitation_id.to_string(),
                account_id: account_id.to_string(),
                actor: Some(pb::Actor {
                    kind: pb::ActorKind::ApiKey as i32,
                    id: Uuid::new_v4().to_string(),
                    display_name: "ci key".into(),
                }),
                email: "ivy@acme.example".into(),
                token_version: 2,
                expire_time: None,
                resend_count: 1,
            },
        )
    }

    async fn invitation_entries(
        test: &TestIdentity,
        admin: &usher_kit::principal::Principal,
    ) -> Vec<pb::AuditEvent> {
        test.api
            .list_audit_events(request(
                admin,
                pb::ListAuditEventsRequest {
                    action: "invitation.".into(),
                    ..Default::default()
                },
            ))
            .await
            .expect("listed")
            .into_inner()
            .audit_events
    }

    async fn wait_for_entries(
        test: &TestIdentity,
        admin: &usher_kit::principal::Principal,
        count: usize,
    ) -> Vec<pb::AuditEvent> {
        for _ in 0..100 {
            let entries = invitation_entries(test, admin).await;
            if entries.len() >= count {
                return entries;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "{count} entries expected: {:?}",
            invitation_entries(test, admin).await
        );
    }

    async fn queue_depth(amqp: &Amqp) -> u32 {
        let channel = amqp.channel().await.expect("channel");
        let queue = channel
            .queue_declare(
                AUDIT_QUEUE.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .expect("the audit queue exists");
        let _ = channel.close(200, "done".into()).await;
        queue.message_count()
    }

    #[tokio::test]
    async fn audit_ingests_invitation_events_from_rabbitmq_once_each() {
        let test = TestIdentity::start(Arc::new(SystemClock)).await;
        let (account_id, owner_id, owner_name, admin) = account(&test).await;
        let vhost = Vhost::create().await;
        let amqp = vhost.amqp();
        amqp.wait_connected(Duration::from_secs(10))
            .await
            .expect("broker");
        let broker = Broker::amqp(amqp.clone());
        broker.declare(audit_topology()).await.expect("declare");

        // Published before the consumer runs (identity down): kept in its queue.
        let invitation_id = Uuid::now_v7();
        let event = revoked(account_id, owner_id, invitation_id);
        let event_id: Uuid = event.message_id.parse().expect("uuid");
        broker.publish(&event).await.expect("publish");
        // The same event again, as a redelivery or a relay retry would bring it.
        broker.publish(&event).await.expect("publish the duplicate");
        // Not an invitation event this queue can read: acked and dropped.
        broker
            .publish(&OutgoingMessage::new(
                usher_kit::amqp::EVENTS_EXCHANGE,
                "invitation.revoked",
                "usher.events.v1.InvitationRevoked",
                vec![0xff, 0xff, 0xff],
            ))
            .await
            .expect("publish garbage");

        let shutdown = CancellationToken::new();
        let consumer = tokio::spawn(consume(
            broker.clone(),
            test.state.db.clone(),
            test.state.clock.clone(),
            shutdown.clone(),
        ));
        let entries = wait_for_entries(&test, &admin, 1).await;
        // Everything was acked, the duplicate included, and left one entry.
        for _ in 0..50 {
            if queue_depth(&amqp).await == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(queue_depth(&amqp).await, 0, "every message acked");
        let entries_now = invitation_entries(&test, &admin).await;
        assert_eq!(
            entries_now.len(),
            1,
            "one entry for a duplicated event: {entries_now:?}"
        );
        let entry = &entries[0];
        assert_eq!(
            entry.id,
            event_id.to_string(),
            "the entry's id is the CloudEvents id"
        );
        assert_eq!(entry.action, "invitation.revoked");
        assert_eq!(entry.target_type, "invitation");
        assert_eq!(entry.target_id, invitation_id.to_string());
        assert_eq!(entry.target_display_name, "ivy@acme.example");
        let actor = entry.actor.clone().expect("actor");
        assert_eq!(actor.kind, pb::ActorKind::User as i32);
        assert_eq!(actor.id, owner_id.to_string());
        assert_eq!(actor.display_name, owner_name, "named by identity");
        assert_eq!(
            entry.event_time.expect("time").seconds,
            1_800_000_000,
            "the time of the change"
        );
        let details = entry.details.clone().expect("details");
        assert_eq!(
            details.fields["previous_state"].kind,
            Some(prost_types::value::Kind::StringValue(
                "INVITATION_STATE_PENDING".into()
            ))
        );

        // The consumer stops (a restart); an event published meanwhile is
        // ingested once it runs again.
        shutdown.cancel();
        consumer.await.expect("consumer stops");
        broker
            .publish(&resent(account_id, invitation_id))
            .await
            .expect("publish while stopped");
        let shutdown = CancellationToken::new();
        let consumer = tokio::spawn(consume(
            broker.clone(),
            test.state.db.clone(),
            test.state.clock.clone(),
            shutdown.clone(),
        ));
        let entries = wait_for_entries(&test, &admin, 2).await;
        let resent = entries
            .iter()
            .find(|e| e.action == "invitation.resent")
            .expect("resent ingested after the restart");
        let actor = resent.actor.clone().expect("actor");
        assert_eq!(actor.kind, pb::ActorKind::ApiKey as i32);
        assert_eq!(actor.display_name, "ci key", "the event's own name kept");

        shutdown.cancel();
        consumer.await.expect("consumer stops");
        broker.close().await;
        vhost.delete().await;
        test.stop().await;
    }

    /// Closes the broker connection named `name` from the broker side, as a
    /// broker restart would.
    async fn close_connection(name: &str) {
        for _ in 0..40 {
            let output = tokio::process::Command::new("rabbitmqctl")
                .args([
                    "-q",
                    "list_connections",
                    "--no-table-headers",
                    "pid",
                    "client_properties",
                ])
                .output()
                .await
                .expect("rabbitmqctl runs");
            let listing = String::from_utf8_lossy(&output.stdout).into_owned();
            if let Some(pid) = listing
                .lines()
                .find(|line| line.contains(name))
                .and_then(|line| line.split_whitespace().next())
            {
                rabbitmqctl(&["close_connection", pid, "audit outage test"]).await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("connection {name} not listed");
    }

    #[tokio::test]
    async fn audit_ingestion_survives_a_broker_outage() {
        let test = TestIdentity::start(Arc::new(SystemClock)).await;
        let (account_id, owner_id, _, admin) = account(&test).await;
        let vhost = Vhost::create().await;
        let name = format!("usher-identity-audit-outage-{}", Uuid::new_v4().simple());
        let consumer_amqp = vhost.amqp_named(&name);
        let consumer_broker = Broker::amqp(consumer_amqp.clone());
        consumer_broker
            .declare(audit_topology())
            .await
            .expect("declare");
        consumer_amqp
            .wait_connected(Duration::from_secs(10))
            .await
            .expect("broker");
        // The invitation service's side: its own connection.
        let publisher_amqp = vhost.amqp();
        publisher_amqp
            .wait_connected(Duration::from_secs(10))
            .await
            .expect("broker");
        let publisher = Broker::amqp(publisher_amqp);
        publisher.declare(audit_topology()).await.expect("declare");
        let shutdown = CancellationToken::new();
        let consumer = tokio::spawn(consume(
            consumer_broker.clone(),
            test.state.db.clone(),
            test.state.clock.clone(),
            shutdown.clone(),
        ));
        publisher
            .publish(&revoked(account_id, owner_id, Uuid::now_v7()))
            .await
            .expect("publish");
        wait_for_entries(&test, &admin, 1).await;

        // The consumer's connection drops; what is published meanwhile waits
        // in the durable queue and is ingested once it is back.
        close_connection(&name).await;
        publisher
            .publish(&resent(account_id, Uuid::now_v7()))
            .await
            .expect("publish during the outage");
        let entries = wait_for_entries(&test, &admin, 2).await;
        assert!(
            entries.iter().any(|e| e.action == "invitation.resent"),
            "{entries:?}"
        );

        shutdown.cancel();
        consumer.await.expect("consumer stops");
        publisher.close().await;
        consumer_broker.close().await;
        vhost.delete().await;
        test.stop().await;
    }

    #[tokio::test]
    async fn audit_ingests_through_the_in_process_broker() {
        let test = TestIdentity::start(Arc::new(SystemClock)).await;
        let (account_id, owner_id, _, admin) = account(&test).await;
        let memory = MemoryBroker::new();
        let broker = Broker::memory(memory.clone());
        broker.declare(audit_topology()).await.expect("declare");
        let event = revoked(account_id, owner_id, Uuid::now_v7());
        broker.publish(&event).await.expect("publish");
        broker.publish(&event).await.expect("publish again");
        let shutdown = CancellationToken::new();
        let consumer = tokio::spawn(consume(
            broker.clone(),
            test.state.db.clone(),
            test.state.clock.clone(),
            shutdown.clone(),
        ));
        let entries = wait_for_entries(&test, &admin, 1).await;
        for _ in 0..50 {
            if memory.depth(AUDIT_QUEUE) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            invitation_entries(&test, &admin).await.len(),
            1,
            "{entries:?}"
        );
        shutdown.cancel();
        consumer.await.expect("consumer stops");
        test.stop().await;
    }

    #[test]
    fn unreadable_messages_are_refused_not_recorded() {
        let headers = std::collections::BTreeMap::new();
        let now = DateTime::from_timestamp(1_800_000_000, 0).expect("time");
        assert!(read("invitation.revoked", &headers, Some("x"), None, &[], now).is_err());
        assert!(
            read(
                "user.deleted",
                &headers,
                Some(&Uuid::new_v4().to_string()),
                None,
                &[],
                now
            )
            .is_err()
        );
        assert!(
            read(
                "invitation.revoked",
                &headers,
                Some(&Uuid::new_v4().to_string()),
                None,
                &[0xff],
                now
            )
            .is_err()
        );
    }
}
