//! The product's journey as its users live it (issue #7's eight steps),
//! driven only through the gateway's public API, its invitation page and the
//! emails an SMTP sink records — once in English and once in French:
//!
//! 1. a platform creates an account with 5 seats and products A and B; the
//!    owner signs in;
//! 2. the owner pastes six addresses (a duplicate in another case, an invalid
//!    one) with role User, team Support and product A: four invited, a
//!    verdict for each of the others, four emails with four links;
//! 3. a custom role "Operator" without `users.manage`; an invitee accepts
//!    on the page, signs in, is listed ACTIVE with the role, team and
//!    product she was invited with; made an Operator, she cannot manage
//!    users (an INVITED user's role is changed by reinviting, not edited);
//! 4. a reinvite kills the first link, the new one works; a withdrawn
//!    invitation's link fails and its seat is free again; inviting past the
//!    seat limit is refused with the seat verdict;
//! 5. search by part of a name, filter INVITED, a bulk role change, a
//!    deactivation that ends the session at once, a reactivation; the owner
//!    is protected from another admin and cannot be demoted, so the account
//!    always keeps a manager;
//! 6. a password reset by email: the old password stops working and the
//!    user is told;
//! 7. the audit log shows it all with actors and targets, and every step
//!    published its events on `usher.events`;
//! 8. all of it in French: emails and page.

use std::collections::{HashMap, HashSet};

use lapin::types::AMQPValue;
use tonic::Code;
use usher_kit::amqp::{Amqp, EVENTS_EXCHANGE};
use usher_proto::{
    identity::v1::{
        self as id, UserStatus, account_service_client::AccountServiceClient,
        audit_service_client::AuditServiceClient, auth_service_client::AuthServiceClient,
        role_service_client::RoleServiceClient, sign_in_request::Login,
        team_service_client::TeamServiceClient, user_service_client::UserServiceClient,
    },
    invitation::v1::{
        self as pb, InviteeVerdict, invitation_service_client::InvitationServiceClient,
    },
};

use crate::{
    gateway::create_platform_key,
    harness::{bearer, bound_queues, http, reason},
    journey::{MailStack, link_token},
};

/// What each language's emails and page say, in part.
struct Words {
    code: &'static str,
    invited: &'static str,
    reminder: &'static str,
    joined: &'static str,
    reset: &'static str,
    changed: &'static str,
    page: &'static str,
    welcome: &'static str,
    unusable: &'static str,
}

const EN: Words = Words {
    code: "en",
    invited: "invited you to join",
    reminder: "Reminder: join",
    joined: "joined",
    reset: "Choose a new password",
    changed: "was changed",
    page: "You are invited",
    welcome: "Welcome!",
    unusable: "This link cannot be used",
};

const FR: Words = Words {
    code: "fr",
    invited: "vous invite à rejoindre",
    reminder: "Rappel : rejoignez",
    joined: "a rejoint",
    reset: "Choisissez un nouveau mot de passe",
    changed: "a été modifié",
    page: "Vous êtes invité",
    welcome: "Bienvenue !",
    unusable: "Ce lien ne peut pas être utilisé",
};

const OWNER_PASSWORD: &str = "owner passphrase 1";

/// One journey: the stack, who is who, and the events seen.
struct Journey {
    stack: MailStack,
    words: &'static Words,
    domain: String,
    slug: String,
    amqp: Amqp,
}

/// An invitee of step 2.
struct Invitee {
    email: String,
    user_id: String,
    invitation_id: String,
    token: String,
}

impl Journey {
    async fn start(words: &'static Words) -> Self {
        let stack = MailStack::start().await;
        // Every event from now on, bound before anything happens.
        let amqp = bound_queues(
            &stack.isolation,
            "it-journey",
            &[("it.events", EVENTS_EXCHANGE, "#")],
        )
        .await;
        let id = stack.isolation.id.clone();
        Self {
            stack,
            words,
            domain: format!("{}.journey.example", words.code),
            slug: format!("journey-{}-{id}", words.code),
            amqp,
        }
    }

    fn address(&self, local: &str) -> String {
        format!("{local}@{}", self.domain)
    }

    async fn sign_in(&self, email: &str, password: &str) -> Result<String, tonic::Status> {
        AuthServiceClient::new(self.stack.gateway.channel())
            .sign_in(id::SignInRequest {
                account_slug: self.slug.clone(),
                login: Some(Login::Email(email.into())),
                password: password.into(),
            })
            .await
            .map(|r| r.into_inner().session.expect("session").access_token)
    }

    async fn me(&self, token: &str) -> Result<id::User, tonic::Status> {
        AuthServiceClient::new(self.stack.gateway.channel())
            .get_current_user(bearer(token, id::GetCurrentUserRequest::default()))
            .await
            .map(|r| r.into_inner().user.expect("user"))
    }

    fn users(&self) -> UserServiceClient<tonic::transport::Channel> {
        UserServiceClient::new(self.stack.gateway.channel())
    }

    fn invitations(&self) -> InvitationServiceClient<tonic::transport::Channel> {
        InvitationServiceClient::new(self.stack.gateway.channel())
    }

    async fn list_users(&self, token: &str, request: id::ListUsersRequest) -> Vec<id::User> {
        self.users()
            .list_users(bearer(token, request))
            .await
            .expect("users listed")
            .into_inner()
            .users
    }

    /// Opens the invitation page for `token`: status and body.
    async fn page(&self, token: &str) -> (u16, String) {
        let (status, _, body) = http(
            &self.stack.gateway,
            "GET",
            &format!("/invite?token={token}&lang={}", self.words.code),
            &[],
            b"",
        )
        .await;
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// Accepts on the page as a browser posts the form.
    async fn accept_on_page(&self, token: &str, name: &str, password: &str) -> (u16, String) {
        crate::journey::accept_on_page(&self.stack.gateway, token, self.words.code, name, password)
            .await
    }

    /// Every event published so far: (routing key, subject).
    async fn events(&self) -> Vec<(String, String)> {
        let channel = self.amqp.channel().await.expect("channel");
        let mut seen = Vec::new();
        while let Some(message) = channel
            .basic_get(
                "it.events".into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .expect("basic_get")
        {
            let subject = message
                .delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| {
                    h.inner()
                        .iter()
                        .find(|(k, _)| k.as_str() == "cloudEvents_subject")
                        .map(|(_, v)| match v {
                            AMQPValue::LongString(s) => {
                                String::from_utf8_lossy(s.as_bytes()).into_owned()
                            }
                            other => format!("{other:?}"),
                        })
                })
                .unwrap_or_default();
            seen.push((message.delivery.routing_key.to_string(), subject));
        }
        seen
    }

    /// Waits until every `(routing key, subject)` of `expected` was
    /// published (events leave through the outboxes, a moment after the
    /// call); returns all that were.
    async fn wait_for_events(&self, expected: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut all = Vec::new();
        for _ in 0..150 {
            all.extend(self.events().await);
            let missing: Vec<_> = expected
                .iter()
                .filter(|(key, subject)| !all.iter().any(|(k, s)| k == key && s == subject))
                .collect();
            if missing.is_empty() {
                return all;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("events never published: {expected:?} (seen {all:?})");
    }
}

#[tokio::test]
async fn the_whole_journey_in_english() {
    journey(&EN).await;
}

#[tokio::test]
async fn the_whole_journey_in_french() {
    journey(&FR).await;
}

#[allow(clippy::too_many_lines)]
async fn journey(words: &'static Words) {
    let j = Journey::start(words).await;
    let gateway = &j.stack.gateway;

    // 1. The platform registers its products and creates the account.
    let platform = create_platform_key(&j.stack.identity_env, "Journey platform");
    let mut accounts = AccountServiceClient::new(gateway.channel());
    for (code, name) in [("analytics", "Product A"), ("billing", "Product B")] {
        accounts
            .register_product(bearer(
                &platform,
                id::RegisterProductRequest {
                    code: code.into(),
                    display_name: name.into(),
                    permissions: vec![],
                },
            ))
            .await
            .expect("product registered");
    }
    let owner_email = j.address("owner");
    let created = accounts
        .create_account(bearer(
            &platform,
            id::CreateAccountRequest {
                request_id: format!("journey-{}", j.slug),
                name: "Journey Co".into(),
                slug: j.slug.clone(),
                default_locale: words.code.into(),
                owner_email: owner_email.clone(),
                owner_display_name: "Olive Owner".into(),
                owner_password: OWNER_PASSWORD.into(),
                owner_locale: words.code.into(),
                seat_limit: 5,
                products: vec!["analytics".into(), "billing".into()],
                ..Default::default()
            },
        ))
        .await
        .expect("account created")
        .into_inner();
    let account_id = created.account.expect("account").id;
    let owner_id = created.owner.expect("owner").id;
    let owner = j
        .sign_in(&owner_email, OWNER_PASSWORD)
        .await
        .expect("owner signs in");
    assert_eq!(j.me(&owner).await.expect("me").id, owner_id);

    // 2. Team Support, role User, product A; six pasted addresses.
    let support = TeamServiceClient::new(gateway.channel())
        .create_team(bearer(
            &owner,
            id::CreateTeamRequest {
                name: "Support".into(),
                ..Default::default()
            },
        ))
        .await
        .expect("team")
        .into_inner()
        .team
        .expect("team")
        .id;
    let roles = RoleServiceClient::new(gateway.channel())
        .list_roles(bearer(&owner, id::ListRolesRequest::default()))
        .await
        .expect("roles")
        .into_inner()
        .roles;
    let role = |name: &str| {
        roles
            .iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("role {name}"))
            .id
            .clone()
    };
    let (user_role, admin_role) = (role("User"), role("Admin"));
    let pasted = format!(
        "Ann Lee <{ann}>, {bob}\nCy Diaz <{cy}>; {dee}\n{bob_upper}\nnot-an-address",
        ann = j.address("ann"),
        bob = j.address("bob"),
        cy = j.address("cy"),
        dee = j.address("dee"),
        bob_upper = j.address("BOB").to_uppercase(),
    );
    let answer = j
        .invitations()
        .create_invitations(bearer(
            &owner,
            pb::CreateInvitationsRequest {
                raw_text: pasted,
                role_id: user_role.clone(),
                team_id: support.clone(),
                products: vec!["analytics".into()],
                locale: words.code.into(),
                ..Default::default()
            },
        ))
        .await
        .expect("invited")
        .into_inner();
    assert_eq!(answer.invited_count, 4, "{answer:?}");
    assert_eq!(answer.not_invited_count, 2, "{answer:?}");
    let verdicts: Vec<InviteeVerdict> = answer.results.iter().map(|r| r.verdict()).collect();
    assert_eq!(
        verdicts,
        [
            InviteeVerdict::Invited,
            InviteeVerdict::Invited,
            InviteeVerdict::Invited,
            InviteeVerdict::Invited,
            InviteeVerdict::DuplicateInRequest,
            InviteeVerdict::InvalidAddress,
        ],
        "{answer:?}"
    );
    assert!(
        !answer.results[5].reason.is_empty(),
        "the invalid one says why"
    );
    let mut invitees = Vec::new();
    for result in &answer.results[..4] {
        let invitation = result.invitation.clone().expect("invitation");
        let (subject, text) = j.stack.emails_to(&result.email, 1).await.remove(0);
        assert!(subject.contains(words.invited), "{subject}");
        assert!(
            subject.contains("Olive Owner") && subject.contains("Journey Co"),
            "{subject}"
        );
        invitees.push(Invitee {
            email: result.email.clone(),
            user_id: invitation.user_id,
            invitation_id: invitation.id,
            token: link_token(&text, "/invite"),
        });
    }
    let links: HashSet<&str> = invitees.iter().map(|i| i.token.as_str()).collect();
    assert_eq!(links.len(), 4, "each email its own link");
    let [ann, bob, cy, dee] = <[Invitee; 4]>::try_from(invitees).ok().expect("four");

    // 3. Ann accepts on the page; then role Operator (no users.manage).
    let operator = RoleServiceClient::new(gateway.channel())
        .create_role(bearer(
            &owner,
            id::CreateRoleRequest {
                name: "Operator".into(),
                description: "Runs the day-to-day".into(),
                permissions: vec!["users.read".into(), "users.invite".into()],
                ..Default::default()
            },
        ))
        .await
        .expect("role")
        .into_inner()
        .role
        .expect("role");
    assert!(!operator.manages_users);
    let (status, page) = j.page(&ann.token).await;
    assert_eq!(status, 200, "{page}");
    assert!(
        page.contains(words.page) && page.contains("Journey Co"),
        "{page}"
    );
    let (status, page) = j
        .accept_on_page(&ann.token, "Ann Lee", "ann passphrase 1")
        .await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains(words.welcome), "{page}");
    let ann_session = j
        .sign_in(&ann.email, "ann passphrase 1")
        .await
        .expect("Ann signs in");
    let listed = j
        .list_users(
            &owner,
            id::ListUsersRequest {
                status: UserStatus::Active.into(),
                ..Default::default()
            },
        )
        .await;
    let shown = listed
        .iter()
        .find(|u| u.id == ann.user_id)
        .expect("Ann listed");
    assert_eq!(
        (
            shown.status(),
            shown.display_name.as_str(),
            shown.role_name.as_str(),
            shown.team_name.as_str(),
            shown.products.clone()
        ),
        (
            UserStatus::Active,
            "Ann Lee",
            "User",
            "Support",
            vec!["analytics".to_owned()]
        )
    );
    j.users()
        .update_user(bearer(
            &owner,
            id::UpdateUserRequest {
                user_id: ann.user_id.clone(),
                role_id: operator.id.clone(),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["role_id".into()],
                }),
                ..Default::default()
            },
        ))
        .await
        .expect("Ann made an Operator");
    let shown = j
        .users()
        .get_user(bearer(
            &owner,
            id::GetUserRequest {
                user_id: ann.user_id.clone(),
            },
        ))
        .await
        .expect("Ann")
        .into_inner()
        .user
        .expect("user");
    assert_eq!(shown.role_name, "Operator");
    let refused = j
        .users()
        .deactivate_user(bearer(
            &ann_session,
            id::DeactivateUserRequest {
                user_id: dee.user_id.clone(),
            },
        ))
        .await
        .expect_err("an Operator cannot manage users");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let (subject, _) = j.stack.emails_to(&owner_email, 1).await.remove(0);
    assert!(
        subject.contains("Ann Lee") && subject.contains(words.joined),
        "{subject}"
    );

    // 4. Reinvite Bob: the first link dies, the new one works.
    let resent = j
        .invitations()
        .resend_invitations(bearer(
            &owner,
            pb::ResendInvitationsRequest {
                invitation_ids: vec![bob.invitation_id.clone()],
                ..Default::default()
            },
        ))
        .await
        .expect("resent")
        .into_inner();
    assert_eq!(resent.succeeded_count, 1, "{resent:?}");
    let (subject, text) = j.stack.emails_to(&bob.email, 2).await.remove(1);
    assert!(subject.contains(words.reminder), "{subject}");
    let bob_token = link_token(&text, "/invite");
    let (status, page) = j.page(&bob.token).await;
    assert_eq!(status, 410, "{page}");
    assert!(page.contains(words.unusable), "{page}");
    let (status, page) = j
        .accept_on_page(&bob.token, "Bob", "bob passphrase 1")
        .await;
    assert_eq!(status, 410, "the old link cannot accept: {page}");
    let (status, page) = j
        .accept_on_page(&bob_token, "Bob Stone", "bob passphrase 1")
        .await;
    assert_eq!(status, 200, "{page}");
    let bob_session = j
        .sign_in(&bob.email, "bob passphrase 1")
        .await
        .expect("Bob signs in");

    // Withdraw Cy: the link fails and the seat is free again.
    let revoked = j
        .invitations()
        .revoke_invitations(bearer(
            &owner,
            pb::RevokeInvitationsRequest {
                invitation_ids: vec![cy.invitation_id.clone()],
            },
        ))
        .await
        .expect("revoked")
        .into_inner();
    assert_eq!(revoked.succeeded_count, 1, "{revoked:?}");
    let (status, page) = j.page(&cy.token).await;
    assert_eq!(status, 410, "{page}");
    // Owner, Ann, Bob and Dee hold four of five seats: one more fits.
    let past = j
        .invitations()
        .create_invitations(bearer(
            &owner,
            pb::CreateInvitationsRequest {
                raw_text: format!("{}\n{}", j.address("eve"), j.address("fay")),
                role_id: user_role.clone(),
                locale: words.code.into(),
                ..Default::default()
            },
        ))
        .await
        .expect("answered")
        .into_inner();
    let verdicts: Vec<InviteeVerdict> = past.results.iter().map(|r| r.verdict()).collect();
    assert_eq!(
        verdicts,
        [InviteeVerdict::Invited, InviteeVerdict::SeatLimitReached],
        "{past:?}"
    );
    assert_eq!((past.seats_used, past.seat_limit), (5, 5), "{past:?}");
    let eve_user = past.results[0]
        .invitation
        .clone()
        .expect("invitation")
        .user_id;

    // 5. Search, filter, bulk role change, deactivate, reactivate.
    let found = j
        .list_users(
            &owner,
            id::ListUsersRequest {
                query: "nn Le".into(),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(
        found.iter().map(|u| u.id.as_str()).collect::<Vec<_>>(),
        [ann.user_id.as_str()],
        "search by part of a name"
    );
    let invited: HashSet<String> = j
        .list_users(
            &owner,
            id::ListUsersRequest {
                status: UserStatus::Invited.into(),
                ..Default::default()
            },
        )
        .await
        .into_iter()
        .map(|u| u.id)
        .collect();
    assert_eq!(invited, HashSet::from([dee.user_id.clone(), eve_user]));
    let bulk = j
        .users()
        .batch_update_users(bearer(
            &owner,
            id::BatchUpdateUsersRequest {
                user_ids: vec![ann.user_id.clone(), bob.user_id.clone()],
                role_id: admin_role.clone(),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["role_id".into()],
                }),
                ..Default::default()
            },
        ))
        .await
        .expect("bulk role change")
        .into_inner();
    assert_eq!((bulk.updated_count, bulk.failed_count), (2, 0), "{bulk:?}");
    let admins: HashSet<String> = j
        .list_users(
            &owner,
            id::ListUsersRequest {
                role_id: admin_role.clone(),
                ..Default::default()
            },
        )
        .await
        .into_iter()
        .map(|u| u.id)
        .collect();
    assert_eq!(
        admins,
        HashSet::from([owner_id.clone(), ann.user_id.clone(), bob.user_id.clone()])
    );
    j.me(&bob_session).await.expect("Bob's session works");
    j.users()
        .deactivate_user(bearer(
            &owner,
            id::DeactivateUserRequest {
                user_id: bob.user_id.clone(),
            },
        ))
        .await
        .expect("deactivated");
    let ended = j
        .me(&bob_session)
        .await
        .expect_err("the session stops at once");
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    let refused = j
        .sign_in(&bob.email, "bob passphrase 1")
        .await
        .expect_err("an inactive user cannot sign in");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    j.users()
        .reactivate_user(bearer(
            &owner,
            id::ReactivateUserRequest {
                user_id: bob.user_id.clone(),
            },
        ))
        .await
        .expect("reactivated");
    j.sign_in(&bob.email, "bob passphrase 1")
        .await
        .expect("Bob signs in again");

    // Ann, now an admin, cannot edit, deactivate or delete the owner.
    let rename = bearer(
        &ann_session,
        id::UpdateUserRequest {
            user_id: owner_id.clone(),
            display_name: "Taken Over".into(),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["display_name".into()],
            }),
            ..Default::default()
        },
    );
    let refused = j.users().update_user(rename).await.expect_err("owner");
    assert_eq!(reason(&refused), "OWNER_PROTECTED", "{refused:?}");
    let refused = j
        .users()
        .delete_user(bearer(
            &ann_session,
            id::DeleteUserRequest {
                user_id: owner_id.clone(),
            },
        ))
        .await
        .expect_err("owner");
    assert_eq!(reason(&refused), "OWNER_PROTECTED", "{refused:?}");
    let refused = j
        .users()
        .deactivate_user(bearer(
            &ann_session,
            id::DeactivateUserRequest {
                user_id: owner_id.clone(),
            },
        ))
        .await
        .expect_err("owner");
    assert_eq!(reason(&refused), "OWNER_PROTECTED", "{refused:?}");
    // The other managers may go back to User in bulk because the owner
    // stays one; the owner, the account's last guaranteed manager, cannot
    // be demoted — not even by the owner.
    let bulk = j
        .users()
        .batch_update_users(bearer(
            &owner,
            id::BatchUpdateUsersRequest {
                user_ids: vec![ann.user_id.clone(), bob.user_id.clone(), owner_id.clone()],
                role_id: user_role.clone(),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["role_id".into()],
                }),
                ..Default::default()
            },
        ))
        .await
        .expect("bulk answered")
        .into_inner();
    assert_eq!((bulk.updated_count, bulk.failed_count), (2, 1), "{bulk:?}");
    let owner_result = bulk
        .results
        .iter()
        .find(|r| r.user_id == owner_id)
        .expect("owner's result");
    assert_eq!(
        owner_result.error.as_ref().map(|e| e.reason.as_str()),
        Some("OWNER_PROTECTED"),
        "{bulk:?}"
    );
    let me = j.me(&owner).await.expect("owner");
    assert_eq!(me.role_name, "Admin");

    // 6. Ann forgets her password.
    AuthServiceClient::new(gateway.channel())
        .request_password_reset(id::RequestPasswordResetRequest {
            account_slug: j.slug.clone(),
            email: ann.email.clone(),
            locale: String::new(),
        })
        .await
        .expect("reset requested");
    let (subject, text) = j.stack.emails_to(&ann.email, 2).await.remove(1);
    assert!(subject.contains(words.reset), "{subject}");
    let reset = link_token(&text, "/reset");
    AuthServiceClient::new(gateway.channel())
        .reset_password(id::ResetPasswordRequest {
            token: reset.clone(),
            new_password: "ann new passphrase".into(),
        })
        .await
        .expect("reset");
    let refused = j
        .sign_in(&ann.email, "ann passphrase 1")
        .await
        .expect_err("the old password stops working");
    assert_eq!(refused.code(), Code::Unauthenticated);
    let gone = j.me(&ann_session).await.expect_err("her sessions end");
    assert_eq!(gone.code(), Code::Unauthenticated);
    j.sign_in(&ann.email, "ann new passphrase")
        .await
        .expect("the new one works");
    let (subject, _) = j.stack.emails_to(&ann.email, 3).await.remove(2);
    assert!(subject.contains(words.changed), "{subject}");
    AuthServiceClient::new(gateway.channel())
        .reset_password(id::ResetPasswordRequest {
            token: reset,
            new_password: "someone else's".into(),
        })
        .await
        .expect_err("a reset link works once");

    // 7. The audit log: who did what to whom.
    let mut audit = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = AuditServiceClient::new(gateway.channel())
            .list_audit_events(bearer(
                &owner,
                id::ListAuditEventsRequest {
                    page_size: 100,
                    page_token,
                    ..Default::default()
                },
            ))
            .await
            .expect("audit")
            .into_inner();
        audit.extend(page.audit_events);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let actions: HashMap<(&str, &str), Vec<&str>> =
        audit.iter().fold(HashMap::new(), |mut map, event| {
            map.entry((event.action.as_str(), event.target_id.as_str()))
                .or_default()
                .push(event.actor.as_ref().map_or("", |a| a.id.as_str()));
            map
        });
    let by = |action: &str, target: &str, actor: &str| {
        let actors = actions.get(&(action, target));
        assert!(
            actors.is_some_and(|a| a.contains(&actor)),
            "audit lacks {action} on {target} by {actor:?}: {audit:#?}"
        );
    };
    by("team.created", &support, &owner_id);
    by("role.created", &operator.id, &owner_id);
    for user in [&ann.user_id, &bob.user_id, &cy.user_id, &dee.user_id] {
        by("user.created", user, &owner_id);
    }
    by("user.updated", &ann.user_id, &owner_id);
    by("user.activated", &ann.user_id, &ann.user_id);
    by("user.activated", &bob.user_id, &bob.user_id);
    by("user.deleted", &cy.user_id, &owner_id);
    by("user.updated", &bob.user_id, &owner_id);
    by("user.deactivated", &bob.user_id, &owner_id);
    by("user.reactivated", &bob.user_id, &owner_id);
    by("user.password_changed", &ann.user_id, &ann.user_id);
    assert!(
        audit.iter().any(|e| e.action == "account.created"
            && e.target_id == account_id
            && e.actor
                .as_ref()
                .is_some_and(|a| a.kind() == id::ActorKind::Platform)),
        "the platform created the account: {audit:#?}"
    );

    // Every step's events, each about its subject.
    let mut expected = vec![
        ("account.created", account_id.as_str()),
        ("team.created", support.as_str()),
        ("role.created", operator.id.as_str()),
        ("invitation.resent", bob.invitation_id.as_str()),
        ("invitation.revoked", cy.invitation_id.as_str()),
        ("user.deactivated", bob.user_id.as_str()),
        ("user.reactivated", bob.user_id.as_str()),
        ("user.password_changed", ann.user_id.as_str()),
    ];
    for invitee in [&ann, &bob, &cy, &dee] {
        expected.push(("invitation.created", invitee.invitation_id.as_str()));
    }
    for invitee in [&ann, &bob] {
        expected.push(("invitation.accepted", invitee.invitation_id.as_str()));
        expected.push(("user.activated", invitee.user_id.as_str()));
        expected.push(("user.updated", invitee.user_id.as_str()));
    }
    j.wait_for_events(&expected).await;

    // Nothing was sent twice: invitations 4 + 1, a reminder, two "joined"
    // notes to the owner, Ann's reset and its confirmation.
    let owner_notes = j.stack.emails_to(&owner_email, 2).await;
    assert!(owner_notes.iter().all(|(s, _)| s.contains(words.joined)));
    for (address, count) in [
        (ann.email.as_str(), 3),
        (bob.email.as_str(), 2),
        (cy.email.as_str(), 1),
        (dee.email.as_str(), 1),
        (owner_email.as_str(), 2),
    ] {
        let received = j
            .stack
            .sink
            .messages()
            .into_iter()
            .filter(|m| m.to == [address])
            .count();
        assert_eq!(received, count, "emails to {address}");
    }
    j.amqp.close().await;
}
