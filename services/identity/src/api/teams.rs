//! TeamService: the teams of the caller's account. A user belongs to at most
//! one team; deleting a team leaves its members team-less. Each handler
//! decodes its request, calls one function of `app::teams` and maps the
//! answer; the rules are in `domain::teams`, the SQL in `store::teams`.
//!
//! Every query is scoped to the account of the verified principal (P14): a
//! team id of another account answers the same NOT_FOUND as an unknown id.

use tonic::{Request, Response, Status};
use usher_kit::{
    error::{ApiError, ApiResult, Violations},
    idempotency::IdempotencyKey,
    pagination,
};
use usher_proto::identity::v1 as pb;
use uuid::Uuid;

use super::{
    Call, IdentityApi, call, convert, mask_paths, status,
    validate::{checked, page_size},
};
use crate::{
    app::teams as app,
    domain::{self, validate_name, validate_text},
};

/// Most teams an account may hold.
pub const MAX_TEAMS: u64 = domain::teams::MAX_TEAMS;
/// Longest team name.
const MAX_NAME_CHARS: usize = 100;
/// Longest team description.
const MAX_DESCRIPTION_CHARS: usize = 500;
/// ListTeams page size when the caller sends 0.
const DEFAULT_PAGE_SIZE: u64 = 100;
/// Largest ListTeams page.
const MAX_PAGE_SIZE: u64 = 500;

impl IdentityApi {
    async fn list_teams(
        &self,
        call: Call,
        request: pb::ListTeamsRequest,
    ) -> ApiResult<pb::ListTeamsResponse> {
        let account_id = call.principal.account()?;
        let size = page_size(request.page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)?;
        let query = request.query.trim().to_lowercase();
        if !query.is_empty() && !(3..=100).contains(&query.chars().count()) {
            return Err(ApiError::invalid("query", "must be 3 to 100 characters"));
        }
        let fingerprint = pagination::fingerprint(&("teams", &query));
        let cursor: Option<(String, Uuid)> =
            pagination::decode_token(&fingerprint, &request.page_token)?;
        let (rows, total) = app::list(&self.state, account_id, &query, cursor, size + 1).await?;
        let (rows, next_page_token) = pagination::split_page(rows, size, |(last, _)| {
            pagination::encode_token(&fingerprint, &(&last.name, last.id))
        });
        Ok(pb::ListTeamsResponse {
            teams: rows
                .iter()
                .map(|(t, count)| convert::team(t, *count))
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
        call.principal.account()?;
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
        app::create(
            &self.state,
            &call.principal,
            &call.request_id,
            idempotency.as_ref(),
            name,
            description,
            |created| pb::CreateTeamResponse {
                team: Some(convert::team(created, 0)),
            },
        )
        .await
    }

    async fn update_team(
        &self,
        call: Call,
        request: pb::UpdateTeamRequest,
    ) -> ApiResult<pb::UpdateTeamResponse> {
        call.principal.account()?;
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
        let (updated, count) = app::update(
            &self.state,
            &call.principal,
            &call.request_id,
            team_id,
            name,
            description,
        )
        .await?;
        Ok(pb::UpdateTeamResponse {
            team: Some(convert::team(&updated, count)),
        })
    }

    async fn delete_team(
        &self,
        call: Call,
        request: pb::DeleteTeamRequest,
    ) -> ApiResult<pb::DeleteTeamResponse> {
        call.principal.account()?;
        let team_id = domain::parse_id("team_id", &request.team_id)?;
        let released = app::delete(&self.state, &call.principal, &call.request_id, team_id).await?;
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
