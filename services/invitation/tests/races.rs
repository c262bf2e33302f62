//! The single-use guarantee under concurrency, against the real services:
//! many accepts of one link, and reinvites racing accepts. The round counts
//! are the release criteria; `USHER_RACE_ROUNDS` scales them down for a
//! quick local run (e.g. `USHER_RACE_ROUNDS=10`).

// Test code: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::HashMap;

use chrono::Duration;
use common::{Harness, create_request, public, reason, request};
use futures::future::join_all;
use usher_proto::invitation::v1::{self as pb, invitation_service_server::InvitationService};

/// Concurrent accepts of one link.
const CONTENDERS: usize = 64;
/// Rounds run at once (each on its own invitation). Kept low: on a small CI
/// machine hundreds of simultaneous calls only measure the connection pools
/// (a call that waits too long for one is UNAVAILABLE, as it should be).
const PARALLEL_ROUNDS: usize = 4;

/// The two races run one after the other, not against each other.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn rounds(release: usize) -> usize {
    std::env::var("USHER_RACE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(release, |n: usize| n.clamp(1, release))
}

fn emails(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("racer{i}@acme.example")).collect()
}

fn accept(token: &str, password: &str) -> pb::AcceptInvitationRequest {
    pb::AcceptInvitationRequest {
        token: token.to_owned(),
        display_name: "Racer".into(),
        password: password.to_owned(),
        locale: String::new(),
    }
}

/// Invites `emails` in one bulk call; returns address → (invitation id, token).
async fn invite_all(
    h: &Harness,
    account: &common::Account,
    emails: &[String],
) -> HashMap<String, (String, String)> {
    let refs: Vec<&str> = emails.iter().map(String::as_str).collect();
    let response = h
        .create(account, create_request(account, &refs))
        .await
        .expect("created");
    assert_eq!(response.invited_count as usize, emails.len());
    let mut tokens = h.tokens().await;
    response
        .results
        .into_iter()
        .map(|r| {
            let token = tokens.remove(&r.email).expect("a link per invitee");
            (r.email, (r.invitation.expect("invitation").id, token))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_accepts_of_one_link_have_one_winner_whose_password_signs_in() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let n = rounds(200);
    let h = Harness::start().await;
    let account = h.account(i32::try_from(n).unwrap() + 10).await;
    let emails = emails(n);
    let links = invite_all(&h, &account, &emails).await;

    for chunk in emails.chunks(PARALLEL_ROUNDS) {
        let outcomes = join_all(chunk.iter().map(|email| {
            let (_, token) = links[email].clone();
            let api = h.api.clone();
            async move {
                let attempts = (0..CONTENDERS).map(|k| {
                    let api = api.clone();
                    let token = token.clone();
                    let password = format!("password {k} of {token:.6}");
                    tokio::spawn(async move {
                        let result = api
                            .accept_invitation(public(accept(&token, &password)))
                            .await;
                        (password, result)
                    })
                });
                let mut winners = Vec::new();
                let mut losers = Vec::new();
                for joined in join_all(attempts).await {
                    let (password, result) = joined.expect("task");
                    match result {
                        Ok(_) => winners.push(password),
                        Err(status) => {
                            assert!(
                                matches!(
                                    reason(&status).as_str(),
                                    "INVITATION_NOT_USABLE" | "INVITATION_BEING_ACCEPTED"
                                ),
                                "{status:?}"
                            );
                            losers.push(password);
                        }
                    }
                }
                (email.clone(), winners, losers)
            }
        }))
        .await;
        for (email, winners, losers) in outcomes {
            assert_eq!(winners.len(), 1, "{email}: exactly one winner");
            h.sign_in(&account, &email, &winners[0])
                .await
                .expect("the winner's password signs in");
            let status = h
                .sign_in(&account, &email, &losers[0])
                .await
                .expect_err("a loser's password does not");
            assert_eq!(reason(&status), "INVALID_CREDENTIALS");
        }
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reinvite_racing_an_accept_never_leaves_both_links_alive() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let n = rounds(1_000);
    let h = Harness::start().await;
    let account = h.account(i32::try_from(n).unwrap() + 10).await;
    let emails = emails(n);
    let links = invite_all(&h, &account, &emails).await;
    // Past the resend cool-down.
    h.clock.advance(Duration::minutes(2));

    let (mut accepted, mut resent) = (0, 0);
    for chunk in emails.chunks(PARALLEL_ROUNDS) {
        let outcomes = join_all(chunk.iter().enumerate().map(|(i, email)| {
            let (id, token) = links[email].clone();
            let api = h.api.clone();
            let admin = account.admin.clone();
            async move {
                // Resend asks identity for the account first: the accept
                // starts 0–22 ms later, so it lands before, during and
                // after the resend's transaction.
                let delay = std::time::Duration::from_millis(u64::try_from(i % 12 * 2).unwrap());
                let accept = async {
                    tokio::time::sleep(delay).await;
                    api.accept_invitation(public(accept(&token, "a fine passphrase")))
                        .await
                };
                let resend = api.resend_invitations(request(
                    &admin,
                    pb::ResendInvitationsRequest {
                        request_id: String::new(),
                        invitation_ids: vec![id.clone()],
                    },
                ));
                let (accepted, resent) = tokio::join!(accept, resend);
                let resent = resent.expect("resend answers per item").into_inner();
                let after = api
                    .get_invitation(request(
                        &admin,
                        pb::GetInvitationRequest {
                            invitation_id: id.clone(),
                        },
                    ))
                    .await
                    .expect("get")
                    .into_inner()
                    .invitation
                    .expect("invitation");
                (email.clone(), accepted, resent, after)
            }
        }))
        .await;
        for (email, accept_result, resend, after) in outcomes {
            let resend_won = resend.succeeded_count == 1;
            match accept_result {
                Ok(_) => {
                    accepted += 1;
                    assert!(
                        !resend_won,
                        "{email}: old link accepted and a new link sent"
                    );
                    assert_eq!(after.state(), pb::InvitationState::Accepted, "{email}");
                }
                Err(status) => {
                    assert!(
                        matches!(
                            reason(&status).as_str(),
                            "INVITATION_NOT_USABLE" | "INVITATION_BEING_ACCEPTED"
                        ),
                        "{email}: {status:?}"
                    );
                    assert!(
                        resend_won,
                        "{email}: neither accept nor resend won: {resend:?}"
                    );
                    resent += 1;
                    assert_eq!(after.state(), pb::InvitationState::Pending, "{email}");
                }
            }
        }
    }
    eprintln!("{n} rounds: accept won {accepted}, reinvite won {resent}");
    assert_eq!(accepted + resent, n);
    if n >= 200 {
        assert!(accepted > 0 && resent > 0, "both sides must win sometimes");
    }
    // The old links of every resent invitation are dead, the new ones live.
    let tokens = h.tokens().await;
    let mut checked = 0;
    for (email, (_, old)) in &links {
        let new = &tokens[email];
        if new == old {
            continue;
        }
        checked += 1;
        let status = h
            .api
            .preview_invitation(public(pb::PreviewInvitationRequest { token: old.clone() }))
            .await
            .expect_err("old link dead");
        assert_eq!(reason(&status), "INVITATION_NOT_USABLE");
        if checked >= 20 {
            break;
        }
    }
    h.stop().await;
}
