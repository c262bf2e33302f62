//! The gRPC handlers of usher-identity: each decodes and validates a request,
//! calls the domain and store, and maps errors to `Status` (CONVENTIONS #3).
//! The account of a call always comes from the verified principal (P14).

use std::sync::Arc;

use tonic::{Request, Status};
use usher_kit::error::ApiError;

use crate::state::Identity;

pub mod accounts;
pub mod api_keys;
/// The protobuf views of stored rows (they live in `app::view`, which builds
/// some answers itself).
pub use crate::app::view as convert;
pub mod validate;

/// The handlers of every identity RPC.
#[derive(Clone, Debug)]
pub struct IdentityApi {
    pub(crate) state: Arc<Identity>,
}

impl IdentityApi {
    /// Handlers over `state`.
    pub fn new(state: Arc<Identity>) -> Self {
        Self { state }
    }
}

pub use crate::app::Call;

/// The verified caller and request id of `request`, once its text fields
/// passed the one text rule ([`usher_kit::text`]) and its `x-request-id` the
/// one request-id rule ([`usher_kit::server::request_id`]).
pub fn call<T: prost::Message + prost::Name>(request: &Request<T>) -> Result<Call, Status> {
    let principal = usher_kit::server::principal(request)?;
    let request_id = usher_kit::server::request_id(request)?;
    usher_kit::text::check_request(request)?;
    Ok(Call {
        principal,
        request_id,
    })
}

/// Maps a domain error to the wire.
pub fn status(err: ApiError) -> Status {
    err.into()
}

use usher_proto::identity::internal::v1 as internal;

pub mod audit;
pub mod auth;
pub mod directory;
pub mod roles;
pub mod teams;
pub mod users;

/// The paths of a required `update_mask`, each one of `allowed`.
pub fn mask_paths(
    mask: Option<&prost_types::FieldMask>,
    allowed: &[&str],
) -> Result<Vec<String>, ApiError> {
    let paths = mask.map(|m| m.paths.clone()).unwrap_or_default();
    if paths.is_empty() {
        return Err(ApiError::invalid(
            "update_mask",
            "must name at least one field",
        ));
    }
    for (index, path) in paths.iter().enumerate() {
        if !allowed.contains(&path.as_str()) {
            return Err(ApiError::invalid(
                format!("update_mask.paths[{index}]"),
                format!("must be one of {}", allowed.join(", ")),
            ));
        }
    }
    Ok(paths)
}
