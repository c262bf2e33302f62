//! Service tests of TeamService: real PostgreSQL and Redis through
//! `TestIdentity`.

use std::collections::HashSet;

use sea_orm::{EntityTrait, Set};
use usher_kit::principal::Principal;
use usher_proto::{events::v1 as events, identity::v1 as pb};
use uuid::Uuid;

use pb::team_service_server::TeamService;

use usher_identity::{
    api::teams::MAX_TEAMS,
    domain::UserStatus,
    store::entities::team,
    testing::{TestIdentity, member, request},
};

use super::roles::{
    add_user, audit_rows, invalid, outbox_events, outbox_keys, refused, start, tenant, user_row,
};

fn create(name: &str) -> pb::CreateTeamRequest {
    pb::CreateTeamRequest {
        request_id: String::new(),
        name: name.into(),
        description: format!("The {name}"),
    }
}

async fn create_team(test: &TestIdentity, caller: &Principal, name: &str) -> pb::Team {
    TeamService::create_team(&test.api, request(caller, create(name)))
        .await
        .expect("team created")
        .into_inner()
        .team
        .expect("team")
}

fn update(team_id: &str, paths: &[&str]) -> pb::UpdateTeamRequest {
    pb::UpdateTeamRequest {
        team_id: team_id.into(),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        }),
        ..Default::default()
    }
}

fn delete(team_id: impl ToString) -> pb::DeleteTeamRequest {
    pb::DeleteTeamRequest {
        team_id: team_id.to_string(),
    }
}

fn list(page_size: i32, page_token: &str, query: &str) -> pb::ListTeamsRequest {
    pb::ListTeamsRequest {
        page_size,
        page_token: page_token.into(),
        query: query.into(),
    }
}

async fn list_teams(
    test: &TestIdentity,
    caller: &Principal,
    message: pb::ListTeamsRequest,
) -> pb::ListTeamsResponse {
    TeamService::list_teams(&test.api, request(caller, message))
        .await
        .expect("teams")
        .into_inner()
}

#[tokio::test]
async fn teams_are_listed_by_name_in_stable_pages() {
    let (test, _clock) = start().await;
    let a = tenant(&test, &[]).await;
    // Created out of order: the list is by name.
    let mut expected = Vec::new();
    for i in (0..25).rev() {
        let name = format!("Team {i:02}");
        create_team(&test, &a.admin, &name).await;
        expected.push(name);
    }
    expected.sort();
    let first = list_teams(&test, &a.admin, list(0, "", "")).await;
    let ten = first
        .teams
        .iter()
        .find(|t| t.name == "Team 10")
        .expect("team")
        .id
        .clone();
    let ten_id = Uuid::parse_str(&ten).expect("uuid");
    for status in [
        UserStatus::Active,
        UserStatus::Invited,
        UserStatus::Inactive,
    ] {
        add_user(&test, a.account, a.user_role, Some(ten_id), status).await;
    }

    let reader = member(a.account, a.owner, &[]);
    let mut token = String::new();
    let mut pages = Vec::new();
    loop {
        let page = list_teams(&test, &reader, list(10, &token, "")).await;
        assert_eq!(page.total_size, 25);
        pages.push(
            page.teams
                .iter()
                .map(|t| (t.name.clone(), t.member_count))
                .collect::<Vec<_>>(),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [10, 10, 5]);
    let walked: Vec<String> = pages
        .iter()
        .flatten()
        .map(|(name, _)| name.clone())
        .collect();
    assert_eq!(walked, expected, "no gaps, no duplicates, by name");
    assert_eq!(walked.iter().collect::<HashSet<_>>().len(), 25);
    let counts: Vec<i32> = pages
        .iter()
        .flatten()
        .filter(|(_, n)| *n > 0)
        .map(|(_, n)| *n)
        .collect();
    assert_eq!(counts, [3]);

    // A case-insensitive substring query, with its own total.
    let found = list_teams(&test, &reader, list(0, "", "  AM 1")).await;
    assert_eq!(found.total_size, 10);
    assert_eq!(found.teams.len(), 10);
    assert!(found.teams.iter().all(|t| t.name.starts_with("Team 1")));
    let narrow = list_teams(&test, &reader, list(2, "", "eam 1")).await;
    assert_eq!((narrow.teams.len(), narrow.total_size), (2, 10));
    // LIKE wildcards are literal.
    assert_eq!(
        list_teams(&test, &reader, list(0, "", "%%%"))
            .await
            .total_size,
        0
    );

    // Bad paging and queries.
    invalid(
        TeamService::list_teams(&test.api, request(&reader, list(-1, "", ""))).await,
        "page_size",
    );
    invalid(
        TeamService::list_teams(&test.api, request(&reader, list(0, "", "ab"))).await,
        "query",
    );
    invalid(
        TeamService::list_teams(&test.api, request(&reader, list(0, "", &"q".repeat(101)))).await,
        "query",
    );
    invalid(
        TeamService::list_teams(
            &test.api,
            request(&reader, list(0, &narrow.next_page_token, "")),
        )
        .await,
        "page_token",
    );
    invalid(
        TeamService::list_teams(&test.api, request(&reader, list(0, "bm9wZQ", ""))).await,
        "page_token",
    );
    test.stop().await;
}

#[tokio::test]
async fn creating_a_team_is_validated_audited_published_and_idempotent() {
    let (test, _clock) = start().await;
    let a = tenant(&test, &[]).await;
    let before = outbox_keys(&test).await.len();
    let team = create_team(&test, &a.admin, "  Night shift ").await;
    assert_eq!(
        (
            team.name.as_str(),
            team.description.as_str(),
            team.member_count
        ),
        // Both trimmed; inner spaces kept.
        ("Night shift", "The   Night shift", 0)
    );
    assert_eq!(outbox_keys(&test).await[before..], ["team.created"]);
    let published: Vec<events::TeamCreated> = outbox_events(&test, "team.created").await;
    assert_eq!(
        (published[0].team_id.as_str(), published[0].name.as_str()),
        (team.id.as_str(), "Night shift")
    );
    assert_eq!(
        published[0].actor.clone().expect("actor").id,
        a.owner.to_string()
    );
    let entry = audit_rows(&test, a.account).await.pop().expect("entry");
    assert_eq!(
        (
            entry.action.as_str(),
            entry.target_type.as_str(),
            entry.target_id.as_str()
        ),
        ("team.created", "team", team.id.as_str())
    );
    assert_eq!(
        (entry.actor_id.clone(), entry.actor_name.as_str()),
        (a.owner.to_string(), "Olive Owner")
    );

    refused(
        TeamService::create_team(&test.api, request(&a.admin, create("NIGHT SHIFT"))).await,
        "ALREADY_EXISTS",
    );
    invalid(
        TeamService::create_team(&test.api, request(&a.admin, create(""))).await,
        "name",
    );
    invalid(
        TeamService::create_team(&test.api, request(&a.admin, create(&"t".repeat(101)))).await,
        "name",
    );
    invalid(
        TeamService::create_team(&test.api, request(&a.admin, create("Line\r\nBreak"))).await,
        "name",
    );
    let mut long = create("Long");
    long.description = "d".repeat(501);
    invalid(
        TeamService::create_team(&test.api, request(&a.admin, long)).await,
        "description",
    );

    let mut keyed = create("Day shift");
    keyed.request_id = "day-shift-1".into();
    let first = TeamService::create_team(&test.api, request(&a.admin, keyed.clone()))
        .await
        .expect("first")
        .into_inner();
    let pending = outbox_keys(&test).await.len();
    let again = TeamService::create_team(&test.api, request(&a.admin, keyed.clone()))
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(first, again);
    assert_eq!(
        outbox_keys(&test).await.len(),
        pending,
        "nothing written twice"
    );
    keyed.description = "Different".into();
    refused(
        TeamService::create_team(&test.api, request(&a.admin, keyed)).await,
        "IDEMPOTENCY_CONFLICT",
    );
    test.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_of_one_name_make_one_team() {
    let (test, _clock) = start().await;
    let a = tenant(&test, &[]).await;
    for round in 0..5 {
        let name = format!("Race {round}");
        let tasks: Vec<_> = [name.clone(), name.to_uppercase()]
            .into_iter()
            .map(|name| {
                let api = test.api.clone();
                let admin = a.admin.clone();
                tokio::spawn(async move {
                    TeamService::create_team(&api, request(&admin, create(&name))).await
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(task.await.expect("task"));
        }
        assert_eq!(
            outcomes.iter().filter(|o| o.is_ok()).count(),
            1,
            "{outcomes:?}"
        );
        let loser = outcomes
            .into_iter()
            .find_map(Result::err)
            .expect("one refused");
        assert_eq!(super::roles::reason(&loser), "ALREADY_EXISTS");
    }
    assert_eq!(
        list_teams(&test, &a.admin, list(0, "", "race"))
            .await
            .total_size,
        5
    );

    // A retry racing its original (same request_id) waits for it and
    // gets the same team.
    let mut keyed = create("Retried");
    keyed.request_id = "retried-1".into();
    let tasks: Vec<_> = (0..2)
        .map(|_| {
            let (api, admin, keyed) = (test.api.clone(), a.admin.clone(), keyed.clone());
            tokio::spawn(
                async move { TeamService::create_team(&api, request(&admin, keyed)).await },
            )
        })
        .collect();
    let mut teams = Vec::new();
    for task in tasks {
        teams.push(
            task.await
                .expect("task")
                .expect("created or replayed")
                .into_inner(),
        );
    }
    assert_eq!(teams[0], teams[1]);
    assert_eq!(
        list_teams(&test, &a.admin, list(0, "", "retried"))
            .await
            .total_size,
        1
    );
    test.stop().await;
}

#[tokio::test]
async fn an_account_holds_at_most_1000_teams() {
    let (test, _clock) = start().await;
    let a = tenant(&test, &[]).await;
    let now = test.state.clock.now();
    let rows: Vec<team::ActiveModel> = (0..MAX_TEAMS)
        .map(|i| team::ActiveModel {
            id: Set(Uuid::new_v4()),
            account_id: Set(a.account),
            name: Set(format!("Team {i:04}")),
            description: Set(String::new()),
            create_time: Set(now),
            update_time: Set(now),
        })
        .collect();
    team::Entity::insert_many(rows)
        .exec(&test.state.db)
        .await
        .expect("teams");
    invalid(
        TeamService::create_team(&test.api, request(&a.admin, create("One more"))).await,
        "name",
    );
    assert_eq!(
        list_teams(&test, &a.admin, list(0, "", ""))
            .await
            .total_size,
        1_000
    );
    test.stop().await;
}

#[tokio::test]
async fn updating_a_team_changes_only_the_named_fields() {
    let (test, _clock) = start().await;
    let a = tenant(&test, &[]).await;
    let team = create_team(&test, &a.admin, "Packers").await;
    create_team(&test, &a.admin, "Drivers").await;
    add_user(
        &test,
        a.account,
        a.user_role,
        Some(Uuid::parse_str(&team.id).expect("uuid")),
        UserStatus::Active,
    )
    .await;

    let mut message = update(&team.id, &["name"]);
    message.name = "Senior packers".into();
    message.description = "not named in the mask".into();
    let renamed = TeamService::update_team(&test.api, request(&a.admin, message))
        .await
        .expect("renamed")
        .into_inner()
        .team
        .expect("team");
    assert_eq!(
        (
            renamed.name.as_str(),
            renamed.description.as_str(),
            renamed.member_count
        ),
        ("Senior packers", "The Packers", 1)
    );
    let mut message = update(&team.id, &["description"]);
    message.description = String::new();
    let cleared = TeamService::update_team(&test.api, request(&a.admin, message))
        .await
        .expect("cleared")
        .into_inner()
        .team
        .expect("team");
    assert_eq!(
        (cleared.name.as_str(), cleared.description.as_str()),
        ("Senior packers", "")
    );

    let published: Vec<events::TeamUpdated> = outbox_events(&test, "team.updated").await;
    assert_eq!(published.len(), 2);
    assert_eq!(
        published[0].changed_fields.clone().expect("mask").paths,
        ["name"]
    );
    assert_eq!(
        published[1].changed_fields.clone().expect("mask").paths,
        ["description"]
    );
    let entry = audit_rows(&test, a.account).await.pop().expect("entry");
    assert_eq!(
        (entry.action.as_str(), entry.target_id.as_str()),
        ("team.updated", team.id.as_str())
    );
    assert_eq!(
        entry.details.expect("details")["description"]["old"],
        "The Packers"
    );

    let mut taken = update(&team.id, &["name"]);
    taken.name = "DRIVERS".into();
    refused(
        TeamService::update_team(&test.api, request(&a.admin, taken)).await,
        "ALREADY_EXISTS",
    );
    invalid(
        TeamService::update_team(&test.api, request(&a.admin, update("x", &["name"]))).await,
        "team_id",
    );
    invalid(
        TeamService::update_team(&test.api, request(&a.admin, update(&team.id, &[]))).await,
        "update_mask",
    );
    invalid(
        TeamService::update_team(
            &test.api,
            request(&a.admin, update(&team.id, &["member_count"])),
        )
        .await,
        "update_mask.paths[0]",
    );
    invalid(
        TeamService::update_team(&test.api, request(&a.admin, update(&team.id, &["name"]))).await,
        "name",
    );
    refused(
        TeamService::update_team(
            &test.api,
            request(
                &a.admin,
                update(&Uuid::new_v4().to_string(), &["description"]),
            ),
        )
        .await,
        "NOT_FOUND",
    );
    test.stop().await;
}

#[tokio::test]
async fn deleting_a_team_releases_its_members() {
    let (test, _clock) = start().await;
    let a = tenant(&test, &[]).await;
    let team = create_team(&test, &a.admin, "Packers").await;
    let other = create_team(&test, &a.admin, "Drivers").await;
    let team_id = Uuid::parse_str(&team.id).expect("uuid");
    let other_id = Uuid::parse_str(&other.id).expect("uuid");
    let members = [
        add_user(
            &test,
            a.account,
            a.user_role,
            Some(team_id),
            UserStatus::Active,
        )
        .await,
        add_user(
            &test,
            a.account,
            a.user_role,
            Some(team_id),
            UserStatus::Invited,
        )
        .await,
    ];
    let bystander = add_user(
        &test,
        a.account,
        a.user_role,
        Some(other_id),
        UserStatus::Active,
    )
    .await;
    let before = outbox_keys(&test).await.len();

    let done = TeamService::delete_team(&test.api, request(&a.admin, delete(team_id)))
        .await
        .expect("deleted")
        .into_inner();
    assert_eq!(
        (done.team_id.as_str(), done.released_member_count),
        (team.id.as_str(), 2)
    );
    for member in members {
        assert_eq!(user_row(&test, member).await.team_id, None);
    }
    assert_eq!(user_row(&test, bystander).await.team_id, Some(other_id));
    assert!(
        team::Entity::find_by_id(team_id)
            .one(&test.state.db)
            .await
            .expect("query")
            .is_none()
    );
    assert_eq!(
        outbox_keys(&test).await[before..],
        ["user.updated", "user.updated", "team.deleted"]
    );
    let published: Vec<events::TeamDeleted> = outbox_events(&test, "team.deleted").await;
    assert_eq!(
        (
            published[0].name.as_str(),
            published[0].released_member_count
        ),
        ("Packers", 2)
    );
    let entry = audit_rows(&test, a.account).await.pop().expect("entry");
    assert_eq!(
        (entry.action.as_str(), entry.target_name.as_str()),
        ("team.deleted", "Packers")
    );

    refused(
        TeamService::delete_team(&test.api, request(&a.admin, delete(team_id))).await,
        "NOT_FOUND",
    );
    invalid(
        TeamService::delete_team(&test.api, request(&a.admin, delete("12345"))).await,
        "team_id",
    );
    let listed = list_teams(&test, &a.admin, list(0, "", "")).await;
    assert_eq!(
        listed
            .teams
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>(),
        ["Drivers"]
    );
    test.stop().await;
}

#[tokio::test]
async fn another_accounts_teams_answer_not_found() {
    let (test, _clock) = start().await;
    let a = tenant(&test, &[]).await;
    let b = tenant(&test, &[]).await;
    let a_team = create_team(&test, &a.admin, "Packers").await;
    let a_team_id = Uuid::parse_str(&a_team.id).expect("uuid");
    let a_member = add_user(
        &test,
        a.account,
        a.user_role,
        Some(a_team_id),
        UserStatus::Active,
    )
    .await;
    // The same name is free in another account.
    create_team(&test, &b.admin, "Packers").await;
    let before = outbox_keys(&test).await.len();

    let foreign = refused(
        TeamService::update_team(
            &test.api,
            request(&b.admin, update(&a_team.id, &["description"])),
        )
        .await,
        "NOT_FOUND",
    );
    let unknown = refused(
        TeamService::update_team(
            &test.api,
            request(
                &b.admin,
                update(&Uuid::new_v4().to_string(), &["description"]),
            ),
        )
        .await,
        "NOT_FOUND",
    );
    assert_eq!(
        (foreign.code(), foreign.message()),
        (unknown.code(), unknown.message()),
        "indistinguishable"
    );
    let mut rename = update(&a_team.id, &["name"]);
    rename.name = "Mine".into();
    refused(
        TeamService::update_team(&test.api, request(&b.admin, rename)).await,
        "NOT_FOUND",
    );
    refused(
        TeamService::delete_team(&test.api, request(&b.admin, delete(a_team_id))).await,
        "NOT_FOUND",
    );
    let a_teams = list_teams(&test, &a.admin, list(0, "", "")).await;
    assert_eq!(
        (
            a_teams.teams[0].name.as_str(),
            a_teams.teams[0].member_count
        ),
        ("Packers", 1)
    );

    assert_eq!(user_row(&test, a_member).await.team_id, Some(a_team_id));
    let b_teams = list_teams(&test, &b.admin, list(0, "", "")).await;
    assert_eq!(b_teams.total_size, 1);
    assert!(b_teams.teams.iter().all(|t| t.id != a_team.id));
    assert_eq!(b_teams.teams[0].member_count, 0);
    assert_eq!(outbox_keys(&test).await.len(), before, "nothing published");
    test.stop().await;
}
