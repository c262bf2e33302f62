//! The invitation flows end to end against the real PostgreSQL, Redis and
//! the identity service over gRPC (see `common`).

// Test code: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use chrono::Duration;
use common::{Harness, create_request, public, reason, request};
use tonic::Code;
use usher_identity::testing::member;
use usher_proto::{
    identity::v1::{self as id, user_service_server::UserService},
    invitation::v1::{self as pb, invitation_service_server::InvitationService},
};
use uuid::Uuid;

fn verdicts(response: &pb::CreateInvitationsResponse) -> Vec<pb::InviteeVerdict> {
    response.results.iter().map(|r| r.verdict()).collect()
}

fn invitation_id(response: &pb::CreateInvitationsResponse, index: usize) -> String {
    response.results[index]
        .invitation
        .as_ref()
        .expect("an invitation")
        .id
        .clone()
}

async fn user_status(
    h: &Harness,
    account: &common::Account,
    user_id: &str,
) -> Option<id::UserStatus> {
    UserService::get_user(
        &h.identity.api,
        request(
            &account.admin,
            id::GetUserRequest {
                user_id: user_id.to_owned(),
            },
        ),
    )
    .await
    .ok()
    .map(|r| r.into_inner().user.expect("user").status())
}

fn accept(token: &str) -> pb::AcceptInvitationRequest {
    pb::AcceptInvitationRequest {
        token: token.to_owned(),
        display_name: "Ivy Invitee".into(),
        password: "a long enough passphrase".into(),
        locale: String::new(),
    }
}

async fn count(h: &Harness, sql: &str) -> i64 {
    h.count(sql).await
}

#[tokio::test]
async fn pasted_list_gets_one_verdict_per_address_and_emails_only_the_invited() {
    let h = Harness::start().await;
    let account = h.account(50).await;
    let mut message = create_request(&account, &[]);
    message.raw_text = format!(
        "Ann <ann@acme.example>, ANN@acme.example; not-an-address\nbob@acme.example\n{}",
        "owner@acme.example"
    );
    let response = h.create(&account, message).await.expect("created");
    assert_eq!(
        verdicts(&response),
        [
            pb::InviteeVerdict::Invited,
            pb::InviteeVerdict::DuplicateInRequest,
            pb::InviteeVerdict::InvalidAddress,
            pb::InviteeVerdict::Invited,
            pb::InviteeVerdict::AlreadyMember,
        ]
    );
    assert_eq!((response.invited_count, response.not_invited_count), (2, 3));
    assert_eq!(response.results[0].display_name, "Ann");
    assert!(
        !response.results[2].reason.is_empty(),
        "an invalid address says why"
    );
    // The seats: owner plus two invited.
    assert_eq!(response.seats_used, 3);

    let jobs = h.email_jobs().await;
    let recipients: Vec<&str> = jobs.iter().map(|j| j.recipient_email.as_str()).collect();
    assert_eq!(recipients, ["ann@acme.example", "bob@acme.example"]);
    let invited = response.results[0].invitation.as_ref().unwrap();
    assert_eq!(invited.state(), pb::InvitationState::Pending);
    assert_eq!(
        user_status(&h, &account, &invited.user_id).await,
        Some(id::UserStatus::Invited)
    );
    // Inviting the same address again says so, and sends nothing.
    let again = h.invite(&account, &["ann@acme.example"]).await.unwrap();
    assert_eq!(verdicts(&again), [pb::InviteeVerdict::AlreadyInvited]);
    assert_eq!(again.results[0].existing_invitation_id, invited.id);
    assert_eq!(h.email_jobs().await.len(), 2);
    h.stop().await;
}

#[tokio::test]
async fn bad_requests_name_the_field_and_store_nothing() {
    let h = Harness::start().await;
    let account = h.account(10).await;
    let too_many: Vec<String> = (0..1_001).map(|i| format!("u{i}@acme.example")).collect();
    let refs: Vec<&str> = too_many.iter().map(String::as_str).collect();
    let cases: Vec<(pb::CreateInvitationsRequest, &str)> = vec![
        (create_request(&account, &refs), "invitees"),
        (create_request(&account, &[]), "invitees"),
        (
            pb::CreateInvitationsRequest {
                role_id: "not-a-uuid".into(),
                ..create_request(&account, &["a@acme.example"])
            },
            "role_id",
        ),
        (
            pb::CreateInvitationsRequest {
                role_id: String::new(),
                ..create_request(&account, &["a@acme.example"])
            },
            "role_id",
        ),
        (
            pb::CreateInvitationsRequest {
                raw_text: "a@acme.example".into(),
                ..create_request(&account, &["a@acme.example"])
            },
            "raw_text",
        ),
    ];
    for (message, field) in cases {
        let status = h.create(&account, message).await.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(field), "{field}: {status:?}");
    }
    // A role of another account is not found, not used.
    let other = h.account(10).await;
    let mut foreign = create_request(&account, &["a@acme.example"]);
    foreign.role_id = other.user_role.clone();
    let status = h.create(&account, foreign).await.expect_err("refused");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");

    for token in [String::new(), "x".repeat(129)] {
        let status = h
            .api
            .preview_invitation(public(pb::PreviewInvitationRequest { token }))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument);
    }
    assert_eq!(count(&h, "SELECT count(*) AS n FROM invitations").await, 0);
    assert!(h.email_jobs().await.is_empty());
    h.stop().await;
}

#[tokio::test]
async fn a_bulk_of_a_thousand_gives_one_verdict_each_and_one_invitation_per_address() {
    let h = Harness::start().await;
    let account = h.account(2_000).await;
    // 900 distinct addresses, 50 repeats differing in case and spacing, 50
    // invalid entries: 1,000 entries of pasted text.
    let mut lines: Vec<String> = (0..900).map(|i| format!("user{i}@acme.example")).collect();
    lines.extend((0..50).map(|i| format!("  USER{i}@Acme.Example\t")));
    lines.extend((0..50).map(|i| format!("user{i}.acme.example")));
    let mut message = create_request(&account, &[]);
    message.raw_text = lines.join("\n");
    let response = h.create(&account, message).await.expect("created");
    assert_eq!(response.results.len(), 1_000);
    let of = |verdict: pb::InviteeVerdict| {
        response
            .results
            .iter()
            .filter(|r| r.verdict() == verdict)
            .count()
    };
    assert_eq!(of(pb::InviteeVerdict::Invited), 900);
    assert_eq!(of(pb::InviteeVerdict::DuplicateInRequest), 50);
    assert_eq!(of(pb::InviteeVerdict::InvalidAddress), 50);
    for (i, result) in response.results.iter().enumerate().skip(900).take(50) {
        assert_eq!(result.email, format!("user{}@acme.example", i - 900));
    }
    assert_eq!(
        count(&h, "SELECT count(DISTINCT email) AS n FROM invitations").await,
        900
    );
    assert_eq!(
        count(&h, "SELECT count(*) AS n FROM invitations").await,
        900
    );
    assert_eq!(h.email_jobs().await.len(), 900);
    assert_eq!(h.tokens().await.len(), 900, "one distinct link per address");
    h.stop().await;
}

#[tokio::test]
async fn a_dry_run_gives_verdicts_and_changes_nothing() {
    let h = Harness::start().await;
    let account = h.account(2).await;
    let mut message = create_request(&account, &["a@acme.example", "b@acme.example"]);
    message.dry_run = true;
    let response = h.create(&account, message).await.unwrap();
    assert!(response.dry_run);
    assert_eq!(
        verdicts(&response),
        [
            pb::InviteeVerdict::Invited,
            pb::InviteeVerdict::SeatLimitReached
        ]
    );
    assert_eq!(count(&h, "SELECT count(*) AS n FROM invitations").await, 0);
    assert!(h.outbox_kinds().await.is_empty());
    assert!(
        h.redis_keys()
            .await
            .iter()
            .all(|k| !k.starts_with("inv:tok:")),
        "no token keys"
    );
    // The seat is still free for a real call.
    let real = h.invite(&account, &["b@acme.example"]).await.unwrap();
    assert_eq!(verdicts(&real), [pb::InviteeVerdict::Invited]);
    h.stop().await;
}

#[tokio::test]
async fn an_inviter_cannot_invite_to_a_role_beyond_its_own() {
    use id::role_service_server::RoleService;
    let h = Harness::start().await;
    let account = h.account(10).await;
    // A member whose role holds users.read + users.invite only.
    let inviters = RoleService::create_role(
        &h.identity.api,
        request(
            &account.admin,
            id::CreateRoleRequest {
                name: "Inviters".into(),
                permissions: vec!["users.read".into(), "users.invite".into()],
                ..Default::default()
            },
        ),
    )
    .await
    .expect("role")
    .into_inner()
    .role
    .expect("role");
    let ivy = UserService::create_user(
        &h.identity.api,
        request(
            &account.admin,
            id::CreateUserRequest {
                username: "ivy".into(),
                display_name: "Ivy".into(),
                password: "a long enough passphrase".into(),
                role_id: inviters.id.clone(),
                ..Default::default()
            },
        ),
    )
    .await
    .expect("ivy")
    .into_inner()
    .user
    .expect("ivy");
    let as_ivy = member(
        account.id,
        ivy.id.parse().expect("uuid"),
        &["users.read", "users.invite"],
    );

    // The Admin role: refused as a whole, dry run or not; nothing reserved,
    // stored or sent.
    for dry_run in [true, false] {
        let mut message = create_request(&account, &["mallory@acme.example"]);
        message.role_id = account.admin_role.clone();
        message.dry_run = dry_run;
        let status = h
            .api
            .create_invitations(request(&as_ivy, message))
            .await
            .expect_err("beyond the inviter");
        assert_eq!(status.code(), Code::PermissionDenied);
        assert_eq!(reason(&status), "PERMISSION_DENIED");
    }
    assert_eq!(count(&h, "SELECT count(*) AS n FROM invitations").await, 0);
    assert!(h.outbox_kinds().await.is_empty());
    let users = UserService::list_users(
        &h.identity.api,
        request(&account.admin, id::ListUsersRequest::default()),
    )
    .await
    .expect("users")
    .into_inner();
    assert_eq!(users.total_size, 2, "the owner and Ivy only");

    // Her own role or User: invited, and the invitee holds no more.
    for role in [inviters.id.clone(), account.user_role.clone()] {
        let mut message = create_request(&account, &[&format!("{}@acme.example", Uuid::new_v4())]);
        message.role_id = role;
        let response = h
            .api
            .create_invitations(request(&as_ivy, message))
            .await
            .expect("within the inviter")
            .into_inner();
        assert_eq!(verdicts(&response), [pb::InviteeVerdict::Invited]);
    }

    // A resend hands the role out again: Ivy cannot resend an admin's
    // invitation to the Admin role (an expired one would come back to life
    // with every permission); the item is refused, nothing is sent.
    let mut message = create_request(&account, &["ada@acme.example"]);
    message.role_id = account.admin_role.clone();
    let created = h.create(&account, message).await.expect("by the admin");
    let admins_invitation = created.results[0]
        .invitation
        .as_ref()
        .expect("invited")
        .id
        .clone();
    let emails_before = h.outbox_kinds().await.len();
    let resent = h
        .api
        .resend_invitations(request(
            &as_ivy,
            pb::ResendInvitationsRequest {
                invitation_ids: vec![admins_invitation.clone()],
                ..Default::default()
            },
        ))
        .await
        .expect("per item")
        .into_inner();
    assert_eq!(resent.failed_count, 1);
    let error = resent.results[0].error.as_ref().expect("refused");
    assert_eq!(error.reason, "PERMISSION_DENIED", "{error:?}");
    assert_eq!(h.outbox_kinds().await.len(), emails_before, "nothing sent");
    // The admin holds the role: not refused for it (at most the cool-down).
    let by_admin = h
        .api
        .resend_invitations(request(
            &account.admin,
            pb::ResendInvitationsRequest {
                invitation_ids: vec![admins_invitation],
                ..Default::default()
            },
        ))
        .await
        .expect("per item")
        .into_inner();
    if let Some(error) = &by_admin.results[0].error {
        assert_ne!(error.reason, "PERMISSION_DENIED", "{error:?}");
    }
    h.stop().await;
}

#[tokio::test]
async fn a_repeated_request_id_answers_the_first_result_without_new_invitations() {
    let h = Harness::start().await;
    let account = h.account(10).await;
    let mut message = create_request(&account, &["a@acme.example", "b@acme.example"]);
    message.request_id = "batch-7".into();
    let first = h.create(&account, message.clone()).await.unwrap();
    let second = h.create(&account, message.clone()).await.unwrap();
    assert_eq!(first, second);
    assert_eq!(count(&h, "SELECT count(*) AS n FROM invitations").await, 2);
    assert_eq!(h.email_jobs().await.len(), 2);
    // The same id with a different body is a conflict.
    message.invitees.pop();
    let status = h.create(&account, message).await.expect_err("conflict");
    assert_eq!(reason(&status), "IDEMPOTENCY_CONFLICT");
    h.stop().await;
}

#[tokio::test]
async fn the_hourly_quota_invites_in_request_order_then_refuses() {
    let h = Harness::start_with(|c| c.invitations.hourly_quota = 3).await;
    let account = h.account(50).await;
    let emails: Vec<String> = (0..5).map(|i| format!("u{i}@acme.example")).collect();
    let refs: Vec<&str> = emails.iter().map(String::as_str).collect();
    let response = h.invite(&account, &refs).await.unwrap();
    use pb::InviteeVerdict::{Invited, QuotaExceeded};
    assert_eq!(
        verdicts(&response),
        [Invited, Invited, Invited, QuotaExceeded, QuotaExceeded]
    );
    // A new clock hour opens a new quota.
    h.clock.advance(Duration::hours(1));
    let later = h.invite(&account, &refs[3..]).await.unwrap();
    assert_eq!(verdicts(&later), [Invited, Invited]);
    h.stop().await;
}

#[tokio::test]
async fn preview_reads_and_accept_activates_once() {
    let h = Harness::start().await;
    let account = h.account(10).await;
    // Platform-defined metadata travels to the user on acceptance.
    let mut message = create_request(&account, &["ivy@acme.example"]);
    message.metadata = Some(prost_types::Struct {
        fields: [(
            "employee_id".to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue("E-42".into())),
            },
        )]
        .into(),
    });
    let created = h.create(&account, message.clone()).await.unwrap();
    let invitation = created.results[0].invitation.clone().unwrap();
    assert_eq!(invitation.metadata, message.metadata);
    let token = h.token_for("ivy@acme.example").await;
    for _ in 0..2 {
        let preview = h
            .api
            .preview_invitation(public(pb::PreviewInvitationRequest {
                token: token.clone(),
            }))
            .await
            .expect("preview consumes nothing")
            .into_inner();
        assert_eq!(preview.email, "ivy@acme.example");
        assert_eq!(preview.account_name, "Acme");
        assert_eq!(preview.role_name, "User");
        assert!(preview.password_policy.is_some());
    }
    // A weak password is refused and the link stays usable.
    let mut weak = accept(&token);
    weak.password = "short".into();
    let status = h
        .api
        .accept_invitation(public(weak))
        .await
        .expect_err("weak");
    assert_eq!(status.code(), Code::InvalidArgument);

    let accepted = h
        .api
        .accept_invitation(public(accept(&token)))
        .await
        .expect("accepted")
        .into_inner();
    let user = accepted.user.expect("user");
    assert_eq!(user.id, invitation.user_id);
    assert_eq!(user.display_name, "Ivy Invitee");
    assert_eq!(user.metadata, message.metadata);
    assert!(!accepted.session.expect("session").access_token.is_empty());
    assert_eq!(
        user_status(&h, &account, &user.id).await,
        Some(id::UserStatus::Active)
    );
    // Used once: every later use of the link fails the same way.
    for attempt in [
        h.api
            .accept_invitation(public(accept(&token)))
            .await
            .map(|_| ()),
        h.api
            .preview_invitation(public(pb::PreviewInvitationRequest {
                token: token.clone(),
            }))
            .await
            .map(|_| ()),
    ] {
        assert_eq!(reason(&attempt.expect_err("used")), "INVITATION_NOT_USABLE");
    }
    let shown = h
        .api
        .get_invitation(request(
            &account.admin,
            pb::GetInvitationRequest {
                invitation_id: invitation.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .invitation
        .unwrap();
    assert_eq!(shown.state(), pb::InvitationState::Accepted);
    let kinds = h.outbox_kinds().await;
    assert!(
        kinds.iter().any(|k| k.ends_with("InvitationAccepted")),
        "{kinds:?}"
    );
    // The inviter hears about it.
    let jobs = h.email_jobs().await;
    assert!(
        jobs.iter()
            .any(|j| j.recipient_email == "owner@acme.example" && j.sealed_link.is_empty()),
        "accepted email to the inviter"
    );
    h.stop().await;
}

#[tokio::test]
async fn concurrent_accepts_of_one_link_have_exactly_one_winner() {
    let h = Harness::start().await;
    let account = h.account(10).await;
    h.invite(&account, &["race@acme.example"]).await.unwrap();
    let token = h.token_for("race@acme.example").await;
    let attempts: Vec<_> = (0..16)
        .map(|_| {
            let api = h.api.clone();
            let token = token.clone();
            tokio::spawn(async move { api.accept_invitation(public(accept(&token))).await })
        })
        .collect();
    let mut won = 0;
    for attempt in attempts {
        match attempt.await.expect("task") {
            Ok(_) => won += 1,
            Err(status) => assert!(
                matches!(
                    reason(&status).as_str(),
                    "INVITATION_NOT_USABLE" | "INVITATION_BEING_ACCEPTED"
                ),
                "{status:?}"
            ),
        }
    }
    assert_eq!(won, 1);
    assert_eq!(
        count(
            &h,
            "SELECT count(*) AS n FROM invitations WHERE state = 'ACCEPTED'"
        )
        .await,
        1
    );
    h.stop().await;
}

/// A link whose Redis key was lost (a Redis failover that dropped the
/// write, a flushed or replaced Redis) still works: PostgreSQL holds its
/// token's hash. The fallback revives no dead link: once used, or past its
/// lifetime, a link is refused as before.
#[tokio::test]
async fn a_link_whose_redis_key_was_lost_still_works_and_revives_nothing() {
    let h = Harness::start().await;
    let account = h.account(10).await;
    h.invite(&account, &["kept@acme.example", "late@acme.example"])
        .await
        .unwrap();
    let kept = h.token_for("kept@acme.example").await;
    let late = h.token_for("late@acme.example").await;
    let lost: Vec<String> = h
        .redis_keys()
        .await
        .into_iter()
        .filter(|k| k.starts_with("inv:tok:"))
        .map(|k| format!("{}{k}", h.redis_prefix))
        .collect();
    assert_eq!(lost.len(), 2);
    let _: i64 = redis::cmd("DEL")
        .arg(&lost)
        .query_async(&mut h.redis.connection())
        .await
        .unwrap();
    let preview = |token: &String| {
        h.api
            .preview_invitation(public(pb::PreviewInvitationRequest {
                token: token.clone(),
            }))
    };
    let shown = preview(&kept)
        .await
        .expect("found in PostgreSQL")
        .into_inner();
    assert_eq!(shown.email, "kept@acme.example");
    h.api
        .accept_invitation(public(accept(&kept)))
        .await
        .expect("accepted without its key");
    assert_eq!(
        reason(&preview(&kept).await.expect_err("used")),
        "INVITATION_NOT_USABLE"
    );
    assert_eq!(
        reason(
            &h.api
                .accept_invitation(public(accept(&kept)))
                .await
                .expect_err("used once")
        ),
        "INVITATION_NOT_USABLE"
    );
    h.clock.advance(Duration::hours(25));
    assert_eq!(
        reason(&preview(&late).await.expect_err("expired")),
        "INVITATION_NOT_USABLE"
    );
    assert_eq!(
        reason(&preview(&"x".repeat(43)).await.expect_err("unknown")),
        "INVITATION_NOT_USABLE"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_link_works_until_its_lifetime_ends_and_not_a_second_after() {
    let h = Harness::start().await;
    let account = h.account(10).await;
    let created = h.invite(&account, &["late@acme.example"]).await.unwrap();
    let token = h.token_for("late@acme.example").await;
    let preview = || {
        h.api
            .preview_invitation(public(pb::PreviewInvitationRequest {
                token: token.clone(),
            }))
    };
    // Previewing neither consumes nor extends the link.
    let before = h.redis_keys().await;
    let key = before
        .iter()
        .find(|k| k.starts_with("inv:tok:"))
        .expect("token key")
        .clone();
    let full_key = format!("{}{key}", h.redis_prefix);
    let mut conn = h.redis.connection();
    let ttl_before: i64 = redis::cmd("PTTL")
        .arg(&full_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    h.clock.advance(Duration::hours(12));
    preview().await.expect("valid");
    let ttl_after: i64 = redis::cmd("PTTL")
        .arg(&full_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl_after <= ttl_before, "preview extended the key");
    // Even a key that lost its TTL does not outlive the invitation.
    let _: i64 = redis::cmd("PERSIST")
        .arg(&full_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    h.clock.advance(Duration::hours(12) - Duration::seconds(1));
    preview().await.expect("still valid a second before");
    h.clock.advance(Duration::seconds(1));
    assert_eq!(
        reason(&preview().await.expect_err("expired")),
        "INVITATION_NOT_USABLE"
    );
    h.clock.advance(Duration::seconds(1));
    assert_eq!(
        reason(&preview().await.expect_err("expired")),
        "INVITATION_NOT_USABLE"
    );
    let status = h
        .api
        .accept_invitation(public(accept(&token)))
        .await
        .expect_err("expired");
    assert_eq!(reason(&status), "INVITATION_NOT_USABLE");
    // Admins see it expired; the seat is still reserved until revoked.
    let listed = h
        .api
        .list_invitations(request(
            &account.admin,
            pb::ListInvitationsRequest {
                states: vec![pb::InvitationState::Expired as i32],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.total_size, 1);
    assert_eq!(listed.invitations[0].id, invitation_id(&created, 0));
    h.stop().await;
}

#[tokio::test]
async fn resending_issues_a_new_link_and_kills_the_old_one() {
    let h = Harness::start().await;
    let account = h.account(10).await;
    let created = h.invite(&account, &["re@acme.example"]).await.unwrap();
    let id = invitation_id(&created, 0);
    let old = h.token_for("re@acme.example").await;
    let resend = || {
        h.api.resend_invitations(request(
            &account.admin,
            pb::ResendInvitationsRequest {
                request_id: String::new(),
                invitation_ids: vec![id.clone()],
            },
        ))
    };
    // Right after sending: the cooldown refuses, per item.
    let early = resend().await.unwrap().into_inner();
    assert_eq!(early.failed_count, 1);
    assert_eq!(
        early.results[0].error.as_ref().unwrap().reason,
        "RESEND_COOLDOWN"
    );

    h.clock.advance(Duration::hours(23));
    let done = resend().await.unwrap().into_inner();
    assert_eq!(done.succeeded_count, 1, "{done:?}");
    let renewed = done.results[0].invitation.clone().unwrap();
    assert_eq!(renewed.state(), pb::InvitationState::Pending);
    let new = h.token_for("re@acme.example").await;
    assert_ne!(old, new);
    let status = h
        .api
        .preview_invitation(public(pb::PreviewInvitationRequest { token: old }))
        .await
        .expect_err("old link is dead");
    assert_eq!(reason(&status), "INVITATION_NOT_USABLE");
    // The new link has a fresh 24 hours.
    h.clock.advance(Duration::hours(23));
    h.api
        .accept_invitation(public(accept(&new)))
        .await
        .expect("new link works");
    h.stop().await;
}

#[tokio::test]
async fn revoking_frees_the_seat_and_kills_the_link() {
    let h = Harness::start().await;
    let account = h.account(2).await; // the owner and one more
    let created = h.invite(&account, &["first@acme.example"]).await.unwrap();
    let id = invitation_id(&created, 0);
    let user_id = created.results[0]
        .invitation
        .as_ref()
        .unwrap()
        .user_id
        .clone();
    let token = h.token_for("first@acme.example").await;
    let full = h.invite(&account, &["second@acme.example"]).await.unwrap();
    assert_eq!(verdicts(&full), [pb::InviteeVerdict::SeatLimitReached]);

    let revoked = h
        .api
        .revoke_invitations(request(
            &account.admin,
            pb::RevokeInvitationsRequest {
                invitation_ids: vec![id.clone()],
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((revoked.succeeded_count, revoked.failed_count), (1, 0));
    assert_eq!(
        user_status(&h, &account, &user_id).await,
        None,
        "invited user removed"
    );
    let status = h
        .api
        .accept_invitation(public(accept(&token)))
        .await
        .expect_err("revoked");
    assert_eq!(reason(&status), "INVITATION_NOT_USABLE");
    let now_free = h.invite(&account, &["second@acme.example"]).await.unwrap();
    assert_eq!(verdicts(&now_free), [pb::InviteeVerdict::Invited]);

    // Deleting removes the record; a second delete finds nothing.
    let delete = || {
        h.api.delete_invitations(request(
            &account.admin,
            pb::DeleteInvitationsRequest {
                invitation_ids: vec![id.clone()],
            },
        ))
    };
    assert_eq!(delete().await.unwrap().into_inner().succeeded_count, 1);
    let again = delete().await.unwrap().into_inner();
    assert_eq!(again.results[0].error.as_ref().unwrap().reason, "NOT_FOUND");
    h.stop().await;
}

#[tokio::test]
async fn declining_removes_the_invited_user() {
    let h = Harness::start().await;
    let account = h.account(10).await;
    let created = h.invite(&account, &["no@acme.example"]).await.unwrap();
    let user_id = created.results[0]
        .invitation
        .as_ref()
        .unwrap()
        .user_id
        .clone();
    let token = h.token_for("no@acme.example").await;
    h.api
        .decline_invitation(public(pb::DeclineInvitationRequest {
            token: token.clone(),
        }))
        .await
        .expect("declined");
    assert_eq!(user_status(&h, &account, &user_id).await, None);
    let status = h
        .api
        .accept_invitation(public(accept(&token)))
        .await
        .expect_err("declined");
    assert_eq!(reason(&status), "INVITATION_NOT_USABLE");
    let shown = h
        .api
        .get_invitation(request(
            &account.admin,
            pb::GetInvitationRequest {
                invitation_id: invitation_id(&created, 0),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .invitation
        .unwrap();
    assert_eq!(shown.state(), pb::InvitationState::Declined);
    h.stop().await;
}

#[tokio::test]
async fn another_account_sees_and_touches_nothing() {
    let h = Harness::start().await;
    let ours = h.account(10).await;
    let theirs = h.account(10).await;
    let created = h.invite(&ours, &["mine@acme.example"]).await.unwrap();
    let id = invitation_id(&created, 0);
    let status = h
        .api
        .get_invitation(request(
            &theirs.admin,
            pb::GetInvitationRequest {
                invitation_id: id.clone(),
            },
        ))
        .await
        .expect_err("not theirs");
    assert_eq!(status.code(), Code::NotFound);
    let revoke = h
        .api
        .revoke_invitations(request(
            &theirs.admin,
            pb::RevokeInvitationsRequest {
                invitation_ids: vec![id.clone()],
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        revoke.results[0].error.as_ref().unwrap().reason,
        "NOT_FOUND"
    );
    let listed = h
        .api
        .list_invitations(request(
            &theirs.admin,
            pb::ListInvitationsRequest::default(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.total_size, 0);
    // A caller without an account is refused before anything is read.
    let stranger = member(Uuid::new_v4(), Uuid::new_v4(), &[]);
    let status = h
        .api
        .list_invitations(request(&stranger, pb::ListInvitationsRequest::default()))
        .await
        .map(|r| r.into_inner().total_size);
    assert_eq!(
        status.ok(),
        Some(0),
        "an unknown account has no invitations"
    );
    h.stop().await;
}

/// The first page counts up to 1,000 matches: exactly 1,000 is exact, one
/// more reads "1,000+" (`total_size` 1,000, `total_size_capped`) on every
/// page of that listing, and a narrower filter is counted exactly again.
#[tokio::test]
async fn list_counts_up_to_a_thousand_then_says_capped() {
    let h = Harness::start().await;
    let account = h.account(2_000).await;
    let emails: Vec<String> = (0..1_000)
        .map(|i| format!("p{i:04}@acme.example"))
        .collect();
    let refs: Vec<&str> = emails.iter().map(String::as_str).collect();
    let created = h.invite(&account, &refs).await.expect("a bulk of 1,000");
    assert_eq!(created.invited_count, 1_000);
    let list = |message: pb::ListInvitationsRequest| {
        h.api.list_invitations(request(&account.admin, message))
    };
    let page = |token: String| pb::ListInvitationsRequest {
        page_size: 10,
        page_token: token,
        ..Default::default()
    };
    let exact = list(page(String::new())).await.expect("list").into_inner();
    assert_eq!((exact.total_size, exact.total_size_capped), (1_000, false));

    h.invite(&account, &["one.more@acme.example"])
        .await
        .expect("invite");
    let first = list(page(String::new())).await.expect("list").into_inner();
    assert_eq!((first.total_size, first.total_size_capped), (1_000, true));
    let second = list(page(first.next_page_token.clone()))
        .await
        .expect("page 2")
        .into_inner();
    assert_eq!((second.total_size, second.total_size_capped), (1_000, true));
    assert_eq!(second.invitations.len(), 10);

    let narrow = list(pb::ListInvitationsRequest {
        query: "one.more".into(),
        ..Default::default()
    })
    .await
    .expect("search")
    .into_inner();
    assert_eq!((narrow.total_size, narrow.total_size_capped), (1, false));
    h.stop().await;
}

#[tokio::test]
async fn list_searches_filters_and_pages() {
    let h = Harness::start().await;
    let account = h.account(50).await;
    let emails: Vec<String> = (0..7).map(|i| format!("person{i}@acme.example")).collect();
    let refs: Vec<&str> = emails.iter().map(String::as_str).collect();
    h.invite(&account, &refs).await.unwrap();
    h.invite(&account, &["zed@other.example"]).await.unwrap();
    let list = |message: pb::ListInvitationsRequest| {
        h.api.list_invitations(request(&account.admin, message))
    };
    let found = list(pb::ListInvitationsRequest {
        query: "other.ex".into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner();
    assert_eq!(found.total_size, 1);
    assert_eq!(found.invitations[0].email, "zed@other.example");

    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = list(pb::ListInvitationsRequest {
            page_size: 3,
            page_token: token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
        assert!(page.invitations.len() <= 3);
        assert_eq!(page.total_size, 8);
        seen.extend(page.invitations.into_iter().map(|i| i.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let distinct: std::collections::HashSet<_> = seen.iter().collect();
    assert_eq!((seen.len(), distinct.len()), (8, 8));

    // A listing keeps the count of its first page; a new one counts again.
    let first = list(pb::ListInvitationsRequest {
        page_size: 3,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner();
    h.invite(&account, &["late@acme.example"]).await.unwrap();
    let second = list(pb::ListInvitationsRequest {
        page_size: 3,
        page_token: first.next_page_token.clone(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner();
    assert_eq!((first.total_size, second.total_size), (8, 8));
    let fresh = list(pb::ListInvitationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fresh.total_size, 9);

    let status = list(pb::ListInvitationsRequest {
        query: "ab".into(),
        ..Default::default()
    })
    .await
    .expect_err("too short");
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = list(pb::ListInvitationsRequest {
        page_token: "garbage".into(),
        ..Default::default()
    })
    .await
    .expect_err("bad token");
    assert_eq!(status.code(), Code::InvalidArgument);
    h.stop().await;
}

#[tokio::test]
async fn with_redis_down_links_answer_unavailable_never_unusable() {
    let h = Harness::start().await;
    let account = h.account(10).await;
    h.invite(&account, &["ann@acme.example"]).await.unwrap();
    let token = h.token_for("ann@acme.example").await;
    // The same service, its Redis now a port where nothing listens.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let down = usher_kit::redis::Redis::connect(&usher_kit::config::RedisConfig {
        url: usher_kit::config::Secret::new(format!("redis://127.0.0.1:{port}")),
        command_timeout_ms: 300,
        ..usher_kit::config::RedisConfig::default()
    })
    .unwrap();
    let mut config = usher_invitation::Config::default();
    config.identity.url = format!("http://{}", h.identity_addr);
    let api = usher_invitation::api::InvitationApi::new(std::sync::Arc::new(
        usher_invitation::state(
            &config,
            h.db.clone(),
            std::sync::Arc::new(usher_kit::ttl::RedisTtlStore::new(down)),
            h.clock.clone(),
        )
        .unwrap(),
    ));
    let started = std::time::Instant::now();
    let preview = api
        .preview_invitation(public(pb::PreviewInvitationRequest {
            token: token.clone(),
        }))
        .await
        .expect_err("no Redis");
    let accepted = api
        .accept_invitation(public(accept(&token)))
        .await
        .expect_err("no Redis");
    let created = api
        .create_invitations(request(
            &account.admin,
            create_request(&account, &["bob@acme.example"]),
        ))
        .await
        .expect_err("no Redis");
    for status in [&preview, &accepted, &created] {
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    // Nothing was half-created, and with Redis back the link still works.
    assert_eq!(count(&h, "SELECT count(*) AS n FROM invitations").await, 1);
    h.api
        .accept_invitation(public(accept(&token)))
        .await
        .expect("the link works again");
    let again = h.invite(&account, &["bob@acme.example"]).await.unwrap();
    assert_eq!(verdicts(&again), [pb::InviteeVerdict::Invited]);
    h.stop().await;
}

#[tokio::test]
async fn request_ids_are_scoped_per_caller_and_checked_never_cut() {
    let h = Harness::start().await;
    let account = h.account(10).await;
    let second = UserService::create_user(
        &h.identity.api,
        request(
            &account.admin,
            id::CreateUserRequest {
                username: "second-admin".into(),
                email: "second@acme.example".into(),
                display_name: "Second Admin".into(),
                password: "a long enough passphrase".into(),
                role_id: account.admin_role.clone(),
                ..Default::default()
            },
        ),
    )
    .await
    .expect("a second admin")
    .into_inner()
    .user
    .expect("user");
    let second = member(
        account.id,
        second.id.parse().expect("uuid"),
        &usher_identity::testing::admin_permissions(),
    );

    // The same request_id from two callers: two calls, not a conflict.
    let mut mine = create_request(&account, &["a@acme.example"]);
    mine.request_id = "shared-key".into();
    let first = h
        .create(&account, mine.clone())
        .await
        .expect("first caller");
    let mut theirs = create_request(&account, &["b@acme.example"]);
    theirs.request_id = "shared-key".into();
    let other = h
        .api
        .create_invitations(request(&second, theirs.clone()))
        .await
        .expect("another caller's key is its own")
        .into_inner();
    assert_eq!(verdicts(&other), [pb::InviteeVerdict::Invited]);
    // Each caller's retry replays its own answer.
    assert_eq!(h.create(&account, mine).await.expect("replay"), first);
    let replay = h
        .api
        .create_invitations(request(&second, theirs))
        .await
        .expect("replay")
        .into_inner();
    assert_eq!(replay, other);
    assert_eq!(count(&h, "SELECT count(*) AS n FROM invitations").await, 2);

    // ResendInvitations: the same key from two callers, each its own call.
    for (caller, invitation) in [
        (&account.admin, invitation_id(&first, 0)),
        (&second, invitation_id(&other, 0)),
    ] {
        h.api
            .resend_invitations(request(
                caller,
                pb::ResendInvitationsRequest {
                    request_id: "shared-key".into(),
                    invitation_ids: vec![invitation],
                },
            ))
            .await
            .expect("not an IDEMPOTENCY_CONFLICT");
    }

    // One rule for request_id: too long or not printable ASCII is refused
    // on the field, never cut.
    for bad in [format!("{}x", "k".repeat(128)), "tab\tkey".to_owned()] {
        let mut message = create_request(&account, &["c@acme.example"]);
        message.request_id = bad;
        let status = h.create(&account, message).await.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("request_id"), "{status:?}");
    }

    // NUL in metadata and in the listing's query: INVALID_ARGUMENT, nothing
    // stored.
    let mut message = create_request(&account, &["d@acme.example"]);
    message.metadata = Some(prost_types::Struct {
        fields: [(
            "line".to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue("a\0b".into())),
            },
        )]
        .into(),
    });
    let status = h.create(&account, message).await.expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("metadata.line"), "{status:?}");
    let status = h
        .api
        .list_invitations(request(
            &account.admin,
            pb::ListInvitationsRequest {
                query: "acme\0".into(),
                ..Default::default()
            },
        ))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(count(&h, "SELECT count(*) AS n FROM invitations").await, 2);
    h.stop().await;
}
