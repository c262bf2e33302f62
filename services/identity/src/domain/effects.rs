//! What a decision causes besides the rows it changes: the audit entries and
//! the domain events. A domain function returns them with its verdict, so a
//! rule and the audit and event it causes are decided (and unit-tested)
//! together; the store writes them in the transaction of the change
//! (`store::effects::apply`), so an entry exists if and only if the change
//! committed.

use chrono::{DateTime, Utc};
use prost::Message;
use serde_json::Value as Json;
use usher_kit::{
    amqp::OutgoingMessage,
    events::DomainEvent,
    principal::{Principal, PrincipalKind},
};
use uuid::Uuid;

/// Who did something.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Actor {
    /// `user`, `api_key`, `platform`, `system` or `anonymous`.
    pub kind: &'static str,
    /// The user id, API key id, or empty.
    pub id: String,
    /// A name for humans, as it was at the time.
    pub name: String,
}

impl Actor {
    /// The actor behind a verified principal; `name` is the user's display
    /// name when known.
    pub fn from_principal(principal: &Principal, name: impl Into<String>) -> Self {
        let (kind, id) = match principal.kind {
            PrincipalKind::User => ("user", principal.user_id.map(|u| u.to_string())),
            PrincipalKind::ApiKey => ("api_key", principal.credential_id.clone()),
            PrincipalKind::Platform => ("platform", principal.credential_id.clone()),
            PrincipalKind::Service => ("system", principal.service.clone()),
            PrincipalKind::Anonymous => ("anonymous", None),
        };
        Self {
            kind,
            id: id.unwrap_or_default(),
            name: name.into(),
        }
    }

    /// Usher itself (expiry, migrations).
    pub fn system() -> Self {
        Self {
            kind: "system",
            id: String::new(),
            name: "Usher".into(),
        }
    }

    /// The protobuf form.
    pub fn to_proto(&self) -> usher_proto::identity::v1::Actor {
        use usher_proto::identity::v1::ActorKind;
        let kind = match self.kind {
            "user" => ActorKind::User,
            "api_key" => ActorKind::ApiKey,
            "platform" => ActorKind::Platform,
            "system" => ActorKind::System,
            "anonymous" => ActorKind::Anonymous,
            _ => ActorKind::Unspecified,
        };
        usher_proto::identity::v1::Actor {
            kind: kind as i32,
            id: self.id.clone(),
            display_name: self.name.clone(),
        }
    }
}

/// One audit entry a decision causes; who and which request are the call's
/// (given once when the effects are applied).
#[derive(Clone, Debug, PartialEq)]
pub struct Audit {
    /// The account it belongs to.
    pub account_id: Uuid,
    /// What, e.g. `user.deactivated`.
    pub action: &'static str,
    /// The kind of target: `user`, `role`, `team`, `account`, `api_key`.
    pub target_type: &'static str,
    /// The target's id.
    pub target_id: String,
    /// The target's name at the time.
    pub target_name: String,
    /// Details (changed fields, old and new values); never secrets.
    pub details: Option<Json>,
}

/// The audit entries and events of one decision, in the order they happened.
#[derive(Clone, Debug, Default)]
pub struct Effects {
    /// Audit entries to write.
    pub audit: Vec<Audit>,
    /// Events to put in the outbox.
    pub events: Vec<OutgoingMessage>,
}

impl Effects {
    /// No effects.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an audit entry.
    pub fn audit(&mut self, entry: Audit) -> &mut Self {
        self.audit.push(entry);
        self
    }

    /// Adds the event `kind` (a `usher.events.v1` message name) with routing
    /// key `routing_key` about `subject`, published by the identity service.
    pub fn event<M: Message>(
        &mut self,
        routing_key: &str,
        kind: &str,
        subject: impl Into<String>,
        account_id: Option<Uuid>,
        payload: &M,
        now: DateTime<Utc>,
    ) -> &mut Self {
        let message = DomainEvent {
            routing_key,
            service: "identity",
            subject: subject.into(),
            account_id,
            time: now,
        }
        .into_message(kind, payload);
        self.events.push(message);
        self
    }

    /// Appends `other`'s effects after these.
    pub fn extend(&mut self, other: Effects) -> &mut Self {
        self.audit.extend(other.audit);
        self.events.extend(other.events);
        self
    }

    /// The actions audited, in order (for tests and logs).
    pub fn actions(&self) -> Vec<&'static str> {
        self.audit.iter().map(|a| a.action).collect()
    }

    /// Whether nothing is to be written.
    pub fn is_empty(&self) -> bool {
        self.audit.is_empty() && self.events.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effects_keep_their_order_and_merge() {
        let account = Uuid::nil();
        let entry = |action| Audit {
            account_id: account,
            action,
            target_type: "user",
            target_id: "u".into(),
            target_name: "Ada".into(),
            details: None,
        };
        let mut first = Effects::new();
        first.audit(entry("user.created"));
        let now = DateTime::from_timestamp(1_800_000_000, 0).expect("time");
        first.event(
            "identity.user.created",
            "usher.events.v1.UserCreated",
            "u",
            Some(account),
            &prost_types::Timestamp::default(),
            now,
        );
        let mut second = Effects::new();
        second.audit(entry("user.role_changed"));
        first.extend(second);
        assert_eq!(first.actions(), ["user.created", "user.role_changed"]);
        assert_eq!(first.events.len(), 1);
        assert!(!first.is_empty());
        assert!(Effects::new().is_empty());
    }

    #[test]
    fn actors_name_their_principal() {
        let actor = Actor::from_principal(&Principal::anonymous(), "");
        assert_eq!(actor.kind, "anonymous");
        assert_eq!(Actor::system().name, "Usher");
        assert_eq!(
            Actor::system().to_proto().kind,
            usher_proto::identity::v1::ActorKind::System as i32
        );
    }
}
