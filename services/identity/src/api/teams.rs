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
