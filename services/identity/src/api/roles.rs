//! RoleService: the roles of the caller's account (built-in `Admin` and
//! `User`, and custom roles) and the permission catalogue available to it.
//! Each handler decodes its request, calls one function of `app::roles` and
//! maps the answer; the rules are in `domain::roles` (and the grant rule in
//! `domain::grants`), the SQL in `store::roles`.
//!
//! Every query is scoped to the account of the verified principal (P14): a
//! role id of another account answers the same NOT_FOUND as an unknown id.

use tonic::{Request, Response, Status};
use usher_kit::{
    error::{ApiError, ApiResult, Violations},
    idempotency::IdempotencyKey,
    pagination,
};
use usher_proto::identity::v1 as pb;

use super::{
    Call, IdentityApi, call, convert, mask_paths, status,
    validate::{checked, page_size},
};
use crate::{
    app::roles::{self as app, NewRole, RoleChange},
    domain::{
        self,
        roles::{Available, validate_permissions},
        validate_name, validate_text,
    },
    store::entities::role,
};

/// Most roles an account may hold, built-in ones included (so one page of
/// ListRoles always holds them all).
pub const MAX_ROLES: u64 = domain::roles::MAX_ROLES;
/// Most permissions in one role.
pub const MAX_ROLE_PERMISSIONS: usize = domain::roles::MAX_ROLE_PERMISSIONS;
/// Longest role name.
const MAX_NAME_CHARS: usize = 100;
/// Longest role description.
const MAX_DESCRIPTION_CHARS: usize = 500;
/// ListRoles page size when the caller sends 0, and the largest one.
const ROLES_PAGE_SIZE: u64 = 100;
/// ListPermissions page size when the caller sends 0, and the largest one.
const PERMISSIONS_PAGE_SIZE: u64 = 500;

/// A role as the API shows it: the built-in Admin lists the permissions of
/// the enabled products too.
fn role_view(model: &role::Model, user_count: u64, product_permissions: &[String]) -> pb::Role {
    let mut view = convert::role(model, user_count);
    if domain::roles::is_admin(model.built_in, &model.name) {
        view.permissions = domain::admin_permissions(product_permissions.iter().cloned());
        view.manages_users = true;
    }
    view
}

impl IdentityApi {
    async fn list_roles(
        &self,
        call: Call,
        request: pb::ListRolesRequest,
    ) -> ApiResult<pb::ListRolesResponse> {
        let account_id = call.principal.account()?;
        let size = page_size(request.page_size, ROLES_PAGE_SIZE, ROLES_PAGE_SIZE)?;
        let fingerprint = pagination::fingerprint(&"roles");
        let cursor: Option<(bool, String, uuid::Uuid)> =
            pagination::decode_token(&fingerprint, &request.page_token)?;
        let (rows, counts, product_permissions) =
            app::list(&self.state, account_id, cursor, size + 1).await?;
        let (rows, next_page_token) = pagination::split_page(rows, size, |last| {
            pagination::encode_token(&fingerprint, &(last.built_in, &last.name, last.id))
        });
        Ok(pb::ListRolesResponse {
            roles: rows
                .iter()
                .map(|r| {
                    role_view(
                        r,
                        counts.get(&r.id).copied().unwrap_or(0),
                        &product_permissions,
                    )
                })
                .collect(),
            next_page_token,
        })
    }

    async fn list_permissions(
        &self,
        call: Call,
        request: pb::ListPermissionsRequest,
    ) -> ApiResult<pb::ListPermissionsResponse> {
        let account_id = call.principal.account()?;
        let size = page_size(
            request.page_size,
            PERMISSIONS_PAGE_SIZE,
            PERMISSIONS_PAGE_SIZE,
        )?;
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        let fingerprint = pagination::fingerprint(&"permissions");
        // The catalogue is small (core + at most 50 products of 100 each):
        // the keyset runs over the ordered list in memory.
        let cursor: Option<(bool, String)> =
            pagination::decode_token(&fingerprint, &request.page_token)?;
        let all = app::available(&self.state, account_id).await?;
        let start = match &cursor {
            None => 0,
            Some((of_product, name)) => all
                .iter()
                .position(|p| {
                    let key = (!p.product_code.is_empty(), p.name.as_str());
                    key > (*of_product, name.as_str())
                })
                .unwrap_or(all.len()),
        };
        let page: Vec<&Available> = all.iter().skip(start).take(size).collect();
        let next_page_token = match page.last() {
            Some(last) if start + page.len() < all.len() => {
                pagination::encode_token(&fingerprint, &(!last.product_code.is_empty(), &last.name))
            }
            _ => String::new(),
        };
        Ok(pb::ListPermissionsResponse {
            permissions: page
                .into_iter()
                .map(|p| pb::Permission {
                    name: p.name.clone(),
                    description: p.description.clone(),
                    product_code: p.product_code.clone(),
                })
                .collect(),
            next_page_token,
        })
    }

    async fn create_role(
        &self,
        call: Call,
        mut request: pb::CreateRoleRequest,
    ) -> ApiResult<pb::CreateRoleResponse> {
        let account_id = call.principal.account()?;
        let request_id = std::mem::take(&mut request.request_id);
        let idempotency = IdempotencyKey::new(
            &call.principal,
            "usher.identity.v1.RoleService/CreateRole",
            &request_id,
            &request,
        )?;
        if let Some(key) = &idempotency
            && let Some(done) = key.replay(&self.state.db).await?
        {
            return Ok(done);
        }

        let available = app::available(&self.state, account_id).await?;
        let mut violations = Violations::new();
        let name = checked(
            &mut violations,
            validate_name("name", &request.name, MAX_NAME_CHARS),
        )?;
        let description = checked(
            &mut violations,
            validate_text("description", &request.description, MAX_DESCRIPTION_CHARS),
        )?;
        let permissions = validate_permissions(&request.permissions, &available, &mut violations);
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
            NewRole {
                name,
                description,
                permissions,
            },
            |created| pb::CreateRoleResponse {
                role: Some(role_view(created, 0, &[])),
            },
        )
        .await
    }

    async fn update_role(
        &self,
        call: Call,
        request: pb::UpdateRoleRequest,
    ) -> ApiResult<pb::UpdateRoleResponse> {
        let account_id = call.principal.account()?;
        let role_id = domain::parse_id("role_id", &request.role_id)?;
        let paths = mask_paths(
            request.update_mask.as_ref(),
            &["name", "description", "permissions"],
        )?;
        let available = app::available(&self.state, account_id).await?;
        let mut violations = Violations::new();
        let mut change = RoleChange {
            role_id,
            name: None,
            description: None,
            permissions: None,
        };
        for path in &paths {
            match path.as_str() {
                "name" => {
                    change.name = checked(
                        &mut violations,
                        validate_name("name", &request.name, MAX_NAME_CHARS),
                    )?;
                }
                "description" => {
                    change.description = checked(
                        &mut violations,
                        validate_text("description", &request.description, MAX_DESCRIPTION_CHARS),
                    )?;
                }
                _ => {
                    change.permissions = Some(validate_permissions(
                        &request.permissions,
                        &available,
                        &mut violations,
                    ))
                }
            }
        }
        violations.into_result()?;
        let (updated, count) =
            app::update(&self.state, &call.principal, &call.request_id, change).await?;
        Ok(pb::UpdateRoleResponse {
            role: Some(role_view(&updated, count, &[])),
        })
    }

    async fn delete_role(
        &self,
        call: Call,
        request: pb::DeleteRoleRequest,
    ) -> ApiResult<pb::DeleteRoleResponse> {
        call.principal.account()?;
        let role_id = domain::parse_id("role_id", &request.role_id)?;
        let reassign_to =
            domain::parse_optional_id("reassign_to_role_id", &request.reassign_to_role_id)?;
        if reassign_to == Some(role_id) {
            return Err(ApiError::invalid(
                "reassign_to_role_id",
                "must be another role than the one deleted",
            ));
        }
        let reassigned = app::delete(
            &self.state,
            &call.principal,
            &call.request_id,
            role_id,
            reassign_to,
        )
        .await?;
        Ok(pb::DeleteRoleResponse {
            role_id: role_id.to_string(),
            reassigned_user_count: reassigned,
        })
    }
}

#[tonic::async_trait]
impl pb::role_service_server::RoleService for IdentityApi {
    async fn list_roles(
        &self,
        request: Request<pb::ListRolesRequest>,
    ) -> Result<Response<pb::ListRolesResponse>, Status> {
        let call = call(&request)?;
        self.list_roles(call, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn list_permissions(
        &self,
        request: Request<pb::ListPermissionsRequest>,
    ) -> Result<Response<pb::ListPermissionsResponse>, Status> {
        let call = call(&request)?;
        self.list_permissions(call, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn create_role(
        &self,
        request: Request<pb::CreateRoleRequest>,
    ) -> Result<Response<pb::CreateRoleResponse>, Status> {
        let call = call(&request)?;
        self.create_role(call, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn update_role(
        &self,
        request: Request<pb::UpdateRoleRequest>,
    ) -> Result<Response<pb::UpdateRoleResponse>, Status> {
        let call = call(&request)?;
        self.update_role(call, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn delete_role(
        &self,
        request: Request<pb::DeleteRoleRequest>,
    ) -> Result<Response<pb::DeleteRoleResponse>, Status> {
        let call = call(&request)?;
        self.delete_role(call, request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }
}
