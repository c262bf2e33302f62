//! Service tests of AuditService: what the log holds, its filters and its
//! pages, against PostgreSQL and Redis.

use std::collections::HashSet;

use chrono::Duration;
use usher_kit::{clock::Clock, principal::Principal};
use usher_proto::identity::v1 as pb;
use uuid::Uuid;

use pb::{
    audit_service_server::AuditService, role_service_server::RoleService,
    team_service_server::TeamService,
};

use usher_identity::{
    api::convert,
    testing::{TestIdentity, member, request},
};

use crate::common::{invalid, start, tenant};

async fn list(
    test: &TestIdentity,
    caller: &Principal,
    message: pb::ListAuditEventsRequest,
) -> pb::ListAuditEventsResponse {
    AuditService::list_audit_events(&test.api, request(caller, message))
        .await
        .expect("audit events")
        .into_inner()
}

fn actions(page: &pb::ListAuditEventsResponse) -> Vec<&str> {
    page.audit_events
        .iter()
        .map(|e| e.action.as_str())
        .collect()
}

#[tokio::test]
async fn every_role_and_team_change_is_in_the_log_newest_first() {
    let (test, clock) = start().await;
    let a = tenant(&test, &[]).await;
    let t0 = clock.now();
    let step = || clock.advance(Duration::seconds(10));

    step();
    let role = RoleService::create_role(
        &test.api,
        request(
            &a.admin,
            pb::CreateRoleRequest {
                name: "Clerks".into(),
                permissions: vec!["users.read".into()],
                ..Default::default()
            },
        ),
    )
    .await
    .expect("role")
    .into_inner()
    .role
    .expect("role");
    step();
    RoleService::update_role(
        &test.api,
        request(
            &a.admin,
            pb::UpdateRoleRequest {
                role_id: role.id.clone(),
                description: "Front desk".into(),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["description".into()],
                }),
                ..Default::default()
            },
        ),
    )
    .await
    .expect("updated");
    step();
    let t_team = clock.now();
    let team = TeamService::create_team(
        &test.api,
        request(
            &a.admin,
            pb::CreateTeamRequest {
                name: "Packers".into(),
                ..Default::default()
            },
        ),
    )
    .await
    .expect("team")
    .into_inner()
    .team
    .expect("team");
    step();
    TeamService::update_team(
        &test.api,
        request(
            &a.admin,
            pb::UpdateTeamRequest {
                team_id: team.id.clone(),
                name: "Senior packers".into(),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["name".into()],
                }),
                ..Default::default()
            },
        ),
    )
    .await
    .expect("renamed");
    step();
    TeamService::delete_team(
        &test.api,
        request(
            &a.admin,
            pb::DeleteTeamRequest {
                team_id: team.id.clone(),
            },
        ),
    )
    .await
    .expect("deleted");
    step();
    RoleService::delete_role(
        &test.api,
        request(
            &a.admin,
            pb::DeleteRoleRequest {
                role_id: role.id.clone(),
                ..Default::default()
            },
        ),
    )
    .await
    .expect("deleted");

    let auditor = member(a.account, a.owner, &["audit.read"]);
    let all = list(&test, &auditor, pb::ListAuditEventsRequest::default()).await;
    assert_eq!(
        actions(&all),
        [
            "role.deleted",
            "team.deleted",
            "team.updated",
            "team.created",
            "role.updated",
            "role.created",
            "account.created"
        ]
    );
    assert!(all.next_page_token.is_empty());
    let renamed = &all.audit_events[2];
    let actor = renamed.actor.clone().expect("actor");
    assert_eq!(actor.kind, pb::ActorKind::User as i32);
    assert_eq!(
        (actor.id.clone(), actor.display_name.as_str()),
        (a.owner.to_string(), "Olive Owner")
    );
    assert_eq!(
        (renamed.target_type.as_str(), renamed.target_id.as_str()),
        ("team", team.id.as_str())
    );
    assert_eq!(renamed.target_display_name, "Senior packers");
    let details = convert::struct_to_json(renamed.details.as_ref().expect("details"));
    assert_eq!(details["name"]["old"], "Packers");
    assert_eq!(
        renamed.event_time.expect("time").seconds,
        t0.timestamp() + 40
    );
    let created = all.audit_events.last().expect("account.created");
    assert_eq!(
        created.actor.clone().expect("actor").kind,
        pb::ActorKind::Platform as i32
    );

    // Keyset pages of 2: newest first, no gaps, no duplicates.
    let mut token = String::new();
    let mut walked = Vec::new();
    loop {
        let page = list(
            &test,
            &auditor,
            pb::ListAuditEventsRequest {
                page_size: 2,
                page_token: token,
                ..Default::default()
            },
        )
        .await;
        assert!(page.audit_events.len() <= 2);
        walked.extend(page.audit_events.into_iter().map(|e| e.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(
        walked,
        all.audit_events
            .iter()
            .map(|e| e.id.clone())
            .collect::<Vec<_>>()
    );
    assert_eq!(walked.iter().collect::<HashSet<_>>().len(), walked.len());

    // Filters combine with AND.
    let filter = |f: fn(&mut pb::ListAuditEventsRequest)| {
        let mut message = pb::ListAuditEventsRequest::default();
        f(&mut message);
        message
    };
    let teams = list(&test, &auditor, filter(|m| m.action = "team.".into())).await;
    assert_eq!(
        actions(&teams),
        ["team.deleted", "team.updated", "team.created"]
    );
    let exact = list(
        &test,
        &auditor,
        filter(|m| m.action = "role.updated".into()),
    )
    .await;
    assert_eq!(actions(&exact), ["role.updated"]);
    let mut on_role = pb::ListAuditEventsRequest {
        target_type: "role".into(),
        target_id: role.id.to_uppercase(),
        ..Default::default()
    };
    assert_eq!(
        actions(&list(&test, &auditor, on_role.clone()).await),
        ["role.deleted", "role.updated", "role.created"]
    );
    on_role.action = "role.created".into();
    assert_eq!(
        actions(&list(&test, &auditor, on_role).await),
        ["role.created"]
    );
    let by_owner = list(
        &test,
        &auditor,
        pb::ListAuditEventsRequest {
            actor_id: a.owner.to_string(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(by_owner.audit_events.len(), 6);
    let window = pb::ListAuditEventsRequest {
        start_time: Some(convert::timestamp(t_team)),
        end_time: Some(convert::timestamp(t_team + Duration::seconds(20))),
        ..Default::default()
    };
    assert_eq!(
        actions(&list(&test, &auditor, window).await),
        ["team.updated", "team.created"]
    );
    let nobody = list(
        &test,
        &auditor,
        pb::ListAuditEventsRequest {
            actor_id: Uuid::new_v4().to_string(),
            ..Default::default()
        },
    )
    .await;
    assert!(nobody.audit_events.is_empty());
    test.stop().await;
}

#[tokio::test]
async fn bad_filters_and_tokens_are_invalid_arguments() {
    let (test, clock) = start().await;
    let a = tenant(&test, &[]).await;
    let auditor = member(a.account, a.owner, &["audit.read"]);
    let call = |message: pb::ListAuditEventsRequest| {
        let api = test.api.clone();
        let auditor = auditor.clone();
        async move { AuditService::list_audit_events(&api, request(&auditor, message)).await }
    };
    invalid(
        call(pb::ListAuditEventsRequest {
            page_size: -1,
            ..Default::default()
        })
        .await,
        "page_size",
    );
    invalid(
        call(pb::ListAuditEventsRequest {
            target_type: "planet".into(),
            ..Default::default()
        })
        .await,
        "target_type",
    );
    invalid(
        call(pb::ListAuditEventsRequest {
            target_id: "id with spaces".into(),
            ..Default::default()
        })
        .await,
        "target_id",
    );
    invalid(
        call(pb::ListAuditEventsRequest {
            actor_id: "x".repeat(129),
            ..Default::default()
        })
        .await,
        "actor_id",
    );
    invalid(
        call(pb::ListAuditEventsRequest {
            action: "a".repeat(101),
            ..Default::default()
        })
        .await,
        "action",
    );
    let now = clock.now();
    invalid(
        call(pb::ListAuditEventsRequest {
            start_time: Some(convert::timestamp(now)),
            end_time: Some(convert::timestamp(now - Duration::seconds(1))),
            ..Default::default()
        })
        .await,
        "start_time",
    );
    invalid(
        call(pb::ListAuditEventsRequest {
            end_time: Some(prost_types::Timestamp {
                seconds: 0,
                nanos: -1,
            }),
            ..Default::default()
        })
        .await,
        "end_time",
    );
    // A token is only valid with the filters it was made for.
    for _ in 0..3 {
        TeamService::create_team(
            &test.api,
            request(
                &a.admin,
                pb::CreateTeamRequest {
                    name: Uuid::new_v4().to_string(),
                    ..Default::default()
                },
            ),
        )
        .await
        .expect("team");
    }
    let page = list(
        &test,
        &auditor,
        pb::ListAuditEventsRequest {
            page_size: 1,
            action: "team.".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(!page.next_page_token.is_empty());
    invalid(
        call(pb::ListAuditEventsRequest {
            page_size: 1,
            page_token: page.next_page_token.clone(),
            ..Default::default()
        })
        .await,
        "page_token",
    );
    invalid(
        call(pb::ListAuditEventsRequest {
            page_token: "not a token".into(),
            ..Default::default()
        })
        .await,
        "page_token",
    );
    test.stop().await;
}

#[tokio::test]
async fn an_account_reads_only_its_own_log() {
    let (test, _clock) = start().await;
    let a = tenant(&test, &[]).await;
    let b = tenant(&test, &[]).await;
    let team = TeamService::create_team(
        &test.api,
        request(
            &a.admin,
            pb::CreateTeamRequest {
                name: "Packers".into(),
                ..Default::default()
            },
        ),
    )
    .await
    .expect("team")
    .into_inner()
    .team
    .expect("team");

    let b_log = list(&test, &b.admin, pb::ListAuditEventsRequest::default()).await;
    assert_eq!(actions(&b_log), ["account.created"]);
    assert_eq!(b_log.audit_events[0].target_id, b.account.to_string());
    for message in [
        pb::ListAuditEventsRequest {
            target_id: team.id.clone(),
            ..Default::default()
        },
        pb::ListAuditEventsRequest {
            actor_id: a.owner.to_string(),
            ..Default::default()
        },
        pb::ListAuditEventsRequest {
            target_id: a.account.to_string(),
            ..Default::default()
        },
    ] {
        assert!(list(&test, &b.admin, message).await.audit_events.is_empty());
    }
    // A's own token does not open A's log to B either: every page is B's.
    let a_page = list(
        &test,
        &a.admin,
        pb::ListAuditEventsRequest {
            page_size: 1,
            ..Default::default()
        },
    )
    .await;
    let b_next = list(
        &test,
        &b.admin,
        pb::ListAuditEventsRequest {
            page_size: 1,
            page_token: a_page.next_page_token,
            ..Default::default()
        },
    )
    .await;
    assert!(
        b_next
            .audit_events
            .iter()
            .all(|e| e.target_id != team.id && e.target_id != a.account.to_string())
    );
    assert_eq!(
        actions(&list(&test, &a.admin, pb::ListAuditEventsRequest::default()).await),
        ["team.created", "account.created"]
    );
    test.stop().await;
}
