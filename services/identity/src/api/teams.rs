//! TeamService: the teams of the caller's account. A user belongs to at most
//! one team; deleting a team leaves its members team-less.
//!
//! Every query is scoped to the account of the verified principal (P14): a
//! team id of another account answers the same NOT_FOUND as an unknown id.
//! Creates and renames lock the account row, so two concurrent calls with the
//! same name are checked one after the other (one of them ALREADY_EXISTS).

use prost_types::FieldMask;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, ConnectionTrait, EntityTrait, IntoActiveModel,
    PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, Set, TransactionTrait,
    sea_query::{Expr, Func},
};
use tonic::{Request, Response, Status};
use usher_kit::{
    error::{ApiError, ApiResult, Reason, Violations},
    pagination,
};
use usher_proto::{events::v1 as events, identity::v1 as pb};
use uuid::Uuid;

use super::{
    Call, IdentityApi, call, convert, mask_paths,
    roles::{actor, checked, is_unique_violation, page_size, same_name},
    status,
};
use crate::store::scoped;
use crate::{
    domain::{self, validate_name, validate_text},
    store::{
        accounts,
        audit::{self, AuditEntry},
        entities::{team, user},
        events::emit,
        idempotency::IdempotencyKey,
    },
};

/// Most teams an account may hold.
pub const MAX_TEAMS: u64 = 1_000;
/// Longest team name.
const MAX_NAME_CHARS: usize = 100;
/// Longest team description.
const MAX_DESCRIPTION_CHARS: usize = 500;
/// ListTeams page size when the caller sends 0.
const DEFAULT_PAGE_SIZE: u64 = 100;
/// Largest ListTeams page.
const MAX_PAGE_SIZE: u64 = 500;

/// Whether another team of the account has `name` (case-insensitively).
async fn team_name_taken<C: ConnectionTrait>(
    db: &C,
    account_id: Uuid,
    name: &str,
    except: Option<Uuid>,
) -> ApiResult<bool> {
    let mut select = team::Entity::find()
        .filter(team::Column::AccountId.eq(account_id))
        .filter(same_name((team::Entity, team::Column::Name), name));
    if let Some(except) = except {
        select = select.filter(team::Column::Id.ne(except));
    }
    Ok(select.count(db).await? > 0)
}

impl IdentityApi {
    async fn list_teams(
        &self,
        call: Call,
        request: pb::ListTeamsRequest,
    ) -> ApiResult<pb::ListTeamsResponse> {
        use sea_orm::sea_query::ExprTrait;

        let account_id = call.principal.account()?;
        let size = page_size(request.page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)?;
        let query = request.query.trim().to_lowercase();
        if !query.is_empty() && !(3..=100).contains(&query.chars().count()) {
            return Err(ApiError::invalid("query", "must be 3 to 100 characters"));
        }
        let fingerprint = pagination::fingerprint(&("teams", &query));
        let cursor: Option<(String, Uuid)> =
            pagination::decode_token(&fingerprint, &request.page_token)?;
        let db = &self.state.db;
        let mut select = team::Entity::find().filter(team::Column::AccountId.eq(account_id));
        if !query.is_empty() {
            select = select.filter(
                Expr::expr(Func::lower(Expr::col((team::Entity, team::Column::Name))))
                    .like(crate::store::contains_pattern(&query)),
            );
        }
        let total = select.clone().count(db).await?;
        if let Some((name, id)) = cursor {
            select = select.filter(
                Condition::any()
                    .add(team::Column::Name.gt(name.clone()))
                    .add(
                        Condition::all()
                            .add(team::Column::Name.eq(name))
                            .add(team::Column::Id.gt(id)),
                    ),
            );
        }
        let rows = select
            .order_by_asc(team::Column::Name)
            .order_by_asc(team::Column::Id)
            .limit(size + 1)
            .all(db)
            .await?;
        let more = rows.len() as u64 > size;
        let rows: Vec<_> = rows
            .into_iter()
            .take(usize::try_from(size).unwrap_or(usize::MAX))
            .collect();
        let next_page_token = match (more, rows.last()) {
            (true, Some(last)) => pagination::encode_token(&fingerprint, &(&last.name, last.id)),
            _ => String::new(),
        };
        let counts = crate::store::users::count_by(
            db,
            account_id,
            user::Column::TeamId,
            rows.iter().map(|t| t.id).collect(),
        )
        .await?;
        Ok(pb::ListTeamsResponse {
            teams: rows
                .iter()
                .map(|t| convert::team(t, counts.get(&t.id).copied().unwrap_or(0)))
                .collect(),
            next_page_token,
            total_size: i32::try_from(total).unwrap_or(i32::MAX),
        })
    }

    async fn create_team(
        &self,
        call: Call,
        mut request: pb::CreateTeamRequest,
    ) -> ApiResult<pb::CreateTeamResponse> {
        let account_id = call.principal.account()?;
        let request_id = std::mem::take(&mut request.request_id);
        let idempotency = IdempotencyKey::new(
            &call.principal,
            "usher.identity.v1.TeamService/CreateTeam",
            &request_id,
            &request,
        )?;
        if let Some(key) = &idempotency
            && let Some(done) = key.replay(&self.state.db).await?
        {
            return Ok(done);
        }

        let mut violations = Violations::new();
        let name = checked(
            &mut violations,
            validate_name("name", &request.name, MAX_NAME_CHARS),
        )?;
        let description = checked(
            &mut violations,
            validate_text("description", &request.description, MAX_DESCRIPTION_CHARS),
        )?;
        violations.into_result()?;
        let (Some(name), Some(description)) = (name, description) else {
            return Err(ApiError::Internal(anyhow::anyhow!(
                "validated fields missing"
            )));
        };

        let now = self.state.clock.now();
        let txn = self.state.db.begin().await?;
        // Serialises creates of one account: the name check, the team count
        // and a concurrent retry with the same request_id.
        accounts::lock(&txn, account_id).await?;
        if let Some(key) = &idempotency
            && let Some(done) = key.replay(&txn).await?
        {
            return Ok(done);
        }
        if team_name_taken(&txn, account_id, &name, None).await? {
            return Err(ApiError::rejected(
                Reason::AlreadyExists,
                "a team with this name exists",
            ));
        }
        let count = team::Entity::find()
            .filter(team::Column::AccountId.eq(account_id))
            .count(&txn)
            .await?;
        if count >= MAX_TEAMS {
            return Err(ApiError::invalid(
                "name",
                format!("the account already has the maximum of {MAX_TEAMS} teams"),
            ));
        }
        let inserted = team::ActiveModel {
            id: Set(Uuid::new_v4()),
            account_id: Set(account_id),
            name: Set(name.clone()),
            description: Set(description.clone()),
            create_time: Set(now),
            update_time: Set(now),
        }
        .insert(&txn)
        .await;
        let created = match inserted {
            Ok(created) => created,
            Err(err) if is_unique_violation(&err) => {
                return Err(ApiError::rejected(
                    Reason::AlreadyExists,
                    "a team with this name exists",
                ));
            }
            Err(err) => return Err(err.into()),
        };
        let actor = actor(&txn, &call.principal).await?;
        audit::record(
            &txn,
            AuditEntry {
                account_id,
                actor: &actor,
                action: "team.created",
                target_type: "team",
                target_id: created.id.to_string(),
                target_name: name.clone(),
                details: Some(serde_json::json!({"description": description})),
                request_id: &call.request_id,
            },
            now,
        )
        .await?;
        emit(
            &txn,
            "team.created",
            "TeamCreated",
            created.id.to_string(),
            Some(account_id),
            &events::TeamCreated {
                team_id: created.id.to_string(),
                account_id: account_id.to_string(),
                actor: Some(actor.to_proto()),
                name,
            },
            now,
        )
        .await?;
        let response = pb::CreateTeamResponse {
            team: Some(convert::team(&created, 0)),
        };
        if let Some(key) = &idempotency {
            key.remember(&txn, &response, now).await?;
        }
        txn.commit().await?;
        Ok(response)
    }

    async fn update_team(
        &self,
        call: Call,
        request: pb::UpdateTeamRequest,
    ) -> ApiResult<pb::UpdateTeamResponse> {
        let account_id = call.principal.account()?;
        let team_id = domain::parse_id("team_id", &request.team_id)?;
        let paths = mask_paths(request.update_mask.as_ref(), &["name", "description"])?;
        let mut violations = Violations::new();
        let mut name = None;
        let mut description = None;
        for path in &paths {
            if path == "name" {
                name = checked(
                    &mut violations,
                    validate_name("name", &request.name, MAX_NAME_CHARS),
                )?;
            } else {
                description = checked(
                    &mut violations,
                    validate_text("description", &request.description, MAX_DESCRIPTION_CHARS),
                )?;
            }
        }
        violations.into_result()?;

        let now = self.state.clock.now();
        let txn = self.state.db.begin().await?;
        // A rename checks the name under the same lock as creates.
        accounts::lock(&txn, account_id).await?;
        let current = scoped::team(&txn, account_id, team_id).await?;
        let mut changed: Vec<String> = Vec::new();
        let mut details = serde_json::Map::new();
        let mut active = current.clone().into_active_model();
        if let Some(name) = name.filter(|n| *n != current.name) {
            if team_name_taken(&txn, account_id, &name, Some(team_id)).await? {
                return Err(ApiError::rejected(
                    Reason::AlreadyExists,
                    "a team with this name exists",
                ));
            }
            details.insert(
                "name".into(),
                serde_json::json!({"old": current.name, "new": name}),
            );
            changed.push("name".into());
            active.name = Set(name);
        }
        if let Some(description) = description.filter(|d| *d != current.description) {
            details.insert(
                "description".into(),
                serde_json::json!({"old": current.description, "new": description}),
            );
            changed.push("description".into());
            active.description = Set(description);
        }
        let updated = if changed.is_empty() {
            current
        } else {
            active.update_time = Set(now);
            let updated = match active.update(&txn).await {
                Ok(updated) => updated,
                Err(err) if is_unique_violation(&err) => {
                    return Err(ApiError::rejected(
                        Reason::AlreadyExists,
                        "a team with this name exists",
                    ));
                }
                Err(err) => return Err(err.into()),
            };
            let actor = actor(&txn, &call.principal).await?;
            audit::record(
                &txn,
                AuditEntry {
                    account_id,
                    actor: &actor,
                    action: "team.updated",
                    target_type: "team",
                    target_id: team_id.to_string(),
                    target_name: updated.name.clone(),
                    details: Some(serde_json::Value::Object(details)),
                    request_id: &call.request_id,
                },
                now,
            )
            .await?;
            emit(
                &txn,
                "team.updated",
                "TeamUpdated",
                team_id.to_string(),
                Some(account_id),
                &events::TeamUpdated {
                    team_id: team_id.to_string(),
                    account_id: account_id.to_string(),
                    actor: Some(actor.to_proto()),
                    changed_fields: Some(FieldMask { paths: changed }),
                    name: updated.name.clone(),
                },
                now,
            )
            .await?;
            updated
        };
        let count =
            crate::store::users::count_by(&txn, account_id, user::Column::TeamId, vec![team_id])
                .await?
                .get(&team_id)
                .copied()
                .unwrap_or(0);
        txn.commit().await?;
        Ok(pb::UpdateTeamResponse {
            team: Some(convert::team(&updated, count)),
        })
    }

    async fn delete_team(
        &self,
        call: Call,
        request: pb::DeleteTeamRequest,
    ) -> ApiResult<pb::DeleteTeamResponse> {
        let account_id = call.principal.account()?;
        let team_id = domain::parse_id("team_id", &request.team_id)?;
        let now = self.state.clock.now();
        let txn = self.state.db.begin().await?;
        let doomed = scoped::team(&txn, account_id, team_id).await?;
        let members: Vec<Uuid> = user::Entity::find()
            .select_only()
            .column(user::Column::Id)
            .filter(user::Column::AccountId.eq(account_id))
            .filter(user::Column::TeamId.eq(team_id))
            .order_by_asc(user::Column::Id)
            .into_tuple()
            .all(&txn)
            .await?;
        let actor = actor(&txn, &call.principal).await?;
        if !members.is_empty() {
            user::Entity::update_many()
                .col_expr(user::Column::TeamId, Expr::value(Option::<Uuid>::None))
                .col_expr(user::Column::UpdateTime, Expr::value(now))
                .filter(user::Column::AccountId.eq(account_id))
                .filter(user::Column::TeamId.eq(team_id))
                .exec(&txn)
                .await?;
            for member in &members {
                emit(
                    &txn,
                    "user.updated",
                    "UserUpdated",
                    member.to_string(),
                    Some(account_id),
                    &events::UserUpdated {
                        user_id: member.to_string(),
                        account_id: account_id.to_string(),
                        actor: Some(actor.to_proto()),
                        changed_fields: Some(FieldMask {
                            paths: vec!["team_id".into()],
                        }),
                        team_id: String::new(),
                        ..Default::default()
                    },
                    now,
                )
                .await?;
            }
        }
        team::Entity::delete_by_id(team_id).exec(&txn).await?;
        let released = i32::try_from(members.len()).unwrap_or(i32::MAX);
        audit::record(
            &txn,
            AuditEntry {
                account_id,
                actor: &actor,
                action: "team.deleted",
                target_type: "team",
                target_id: team_id.to_string(),
                target_name: doomed.name.clone(),
                details: Some(serde_json::json!({"released_member_count": released})),
                request_id: &call.request_id,
            },
            now,
        )
        .await?;
        emit(
            &txn,
            "team.deleted",
            "TeamDeleted",
            team_id.to_string(),
            Some(account_id),
            &events::TeamDeleted {
                team_id: team_id.to_string(),
                account_id: account_id.to_string(),
                actor: Some(actor.to_proto()),
                name: doomed.name,
                released_member_count: released,
            },
            now,
        )
        .await?;
        txn.commit().await?;
        Ok(pb::DeleteTeamResponse {
            team_id: team_id.to_string(),
            released_member_count: released,
        })
    }
}

#[tonic::async_trait]
impl pb::team_service_server::TeamService for IdentityApi {
    async fn list_teams(
        &self,
        request: Request<pb::ListTeamsRequest>,
    ) -> Result<Response<pb::ListTeamsResponse>, Status> {
        let call = call(&request)?;
        self.list_teams(call, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn create_team(
        &self,
        request: Request<pb::CreateTeamRequest>,
    ) -> Result<Response<pb::CreateTeamResponse>, Status> {
        let call = call(&request)?;
        self.create_team(call, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn update_team(
        &self,
        request: Request<pb::UpdateTeamRequest>,
    ) -> Result<Response<pb::UpdateTeamResponse>, Status> {
        let call = call(&request)?;
        self.update_team(call, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn delete_team(
        &self,
        request: Request<pb::DeleteTeamRequest>,
    ) -> Result<Response<pb::DeleteTeamResponse>, Status> {
        let call = call(&request)?;
        self.delete_team(call, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use sea_orm::{EntityTrait, Set};
    use usher_kit::principal::Principal;
    use usher_proto::{events::v1 as events, identity::v1 as pb};
    use uuid::Uuid;

    use pb::team_service_server::TeamService;

    use super::MAX_TEAMS;
    use crate::{
        api::roles::tests::{
            add_user, audit_rows, invalid, outbox_events, outbox_keys, refused, start, tenant,
            user_row,
        },
        domain::UserStatus,
        store::entities::team,
        testing::{TestIdentity, member, request},
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
            TeamService::list_teams(&test.api, request(&reader, list(0, "", &"q".repeat(101))))
                .await,
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
            assert_eq!(crate::api::roles::tests::reason(&loser), "ALREADY_EXISTS");
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
            TeamService::update_team(&test.api, request(&a.admin, update(&team.id, &["name"])))
                .await,
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
}
