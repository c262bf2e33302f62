//! AuthService's API key RPCs (CreateApiKey, ListApiKeys, RevokeApiKey):
//! each decodes its request, calls one function of `app::api_keys` and maps
//! the result. The tonic trait itself is implemented in [`super::auth`].

use chrono::{DateTime, Utc};
use usher_kit::error::ApiResult;
use usher_proto::identity::v1 as pb;

use super::{Call, IdentityApi};
use crate::{
    app::api_keys::{self as app, view},
    domain::{api_keys::NewKeyRequest, parse_id},
};

impl IdentityApi {
    pub(super) async fn inner_create_api_key(
        &self,
        call: Call,
        mut request: pb::CreateApiKeyRequest,
    ) -> ApiResult<pb::CreateApiKeyResponse> {
        let request_id = std::mem::take(&mut request.request_id);
        let new = NewKeyRequest {
            name: request.name.clone(),
            permissions: request.permissions.clone(),
            expire_time: request.expire_time.as_ref().map(|at| {
                DateTime::<Utc>::from_timestamp(
                    at.seconds,
                    u32::try_from(at.nanos).unwrap_or(u32::MAX),
                )
            }),
        };
        app::create(&self.state, &call, &request_id, &request, new).await
    }

    pub(super) async fn inner_list_api_keys(
        &self,
        call: Call,
        request: pb::ListApiKeysRequest,
    ) -> ApiResult<pb::ListApiKeysResponse> {
        let (rows, next_page_token) = app::list(
            &self.state,
            &call,
            request.page_size,
            &request.page_token,
            request.show_revoked,
        )
        .await?;
        Ok(pb::ListApiKeysResponse {
            api_keys: rows.iter().map(view).collect(),
            next_page_token,
        })
    }

    pub(super) async fn inner_revoke_api_key(
        &self,
        call: Call,
        request: pb::RevokeApiKeyRequest,
    ) -> ApiResult<pb::RevokeApiKeyResponse> {
        // The caller's account first, then the id (the order of the answers).
        call.principal.account()?;
        let key_id = parse_id("api_key_id", &request.api_key_id)?;
        let current = app::revoke(&self.state, &call, key_id).await?;
        Ok(pb::RevokeApiKeyResponse {
            api_key: Some(view(&current)),
        })
    }
}
