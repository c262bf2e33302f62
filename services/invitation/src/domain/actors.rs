//! Who acted on an invitation, as events and identity's audit log show it:
//! the caller (a user, an API key, a platform credential, a service), the
//! inviter recorded on the invitation, or the invitee using their link.

use usher_kit::principal::{Principal, PrincipalKind};
use usher_proto::identity::v1 as identity;

use super::Invitation;

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

/// The actor kind of a stored name (unknown names read UNSPECIFIED).
pub fn actor_kind(stored: &str) -> identity::ActorKind {
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

/// This service acting on its own (a rolled-back create releases its
/// reservations as it).
pub fn this_service() -> identity::Actor {
    actor(&Principal::service(crate::SERVICE))
}

/// The inviter recorded on `invitation`.
pub fn inviter(invitation: &Invitation) -> identity::Actor {
    identity::Actor {
        kind: actor_kind(&invitation.inviter_kind) as i32,
        id: invitation.inviter_id.clone(),
        display_name: invitation.inviter_name.clone(),
    }
}

/// The invitee of `invitation` using their link, under `name`.
pub fn invitee(invitation: &Invitation, name: &str) -> identity::Actor {
    identity::Actor {
        kind: identity::ActorKind::Anonymous as i32,
        id: invitation.user_id.to_string(),
        display_name: name.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;
    use crate::domain::fixtures::invitation;

    #[test]
    fn kinds_are_stored_by_name_and_read_back() {
        for kind in [
            identity::ActorKind::User,
            identity::ActorKind::ApiKey,
            identity::ActorKind::Platform,
            identity::ActorKind::Anonymous,
            identity::ActorKind::System,
            identity::ActorKind::Unspecified,
        ] {
            assert_eq!(actor_kind(actor_kind_name(kind)), kind);
        }
        assert_eq!(actor_kind("robot"), identity::ActorKind::Unspecified);
    }

    #[test]
    fn callers_act_under_their_own_id() {
        let user = Uuid::from_u128(9);
        let caller = Principal {
            kind: PrincipalKind::User,
            user_id: Some(user),
            ..Principal::anonymous()
        };
        let shown = actor(&caller);
        assert_eq!(shown.kind(), identity::ActorKind::User);
        assert_eq!(shown.id, user.to_string());
        assert!(shown.display_name.is_empty());
        let service = this_service();
        assert_eq!(service.kind(), identity::ActorKind::System);
        assert_eq!(service.id, crate::SERVICE);
        assert_eq!(actor(&Principal::anonymous()).id, "");
    }

    #[test]
    fn the_inviter_and_the_invitee_come_from_the_invitation() {
        let invitation = invitation();
        let inviter = inviter(&invitation);
        assert_eq!(inviter.kind(), identity::ActorKind::User);
        assert_eq!(inviter.display_name, "Olga Owner");
        let invitee = invitee(&invitation, "Ivy");
        assert_eq!(invitee.kind(), identity::ActorKind::Anonymous);
        assert_eq!(invitee.id, invitation.user_id.to_string());
        assert_eq!(invitee.display_name, "Ivy");
    }
}
