//! The invitation database and the token keys in Redis. Every function
//! here answers [`StoreResult`]: database errors are classified once by the
//! kit (`From<DbErr> for StoreError`), and the kit calls that answer an
//! `ApiResult` (idempotency, the TTL store) are classified by [`from_api`].

pub mod entities;
pub mod invitations;
pub mod schema;
pub mod tokens;

use usher_kit::{
    db::{StoreError, StoreResult},
    error::ApiError,
};

pub use invitations::{Repository, Tx};

/// A failure of a kit call that answers an `ApiResult`, as a store
/// failure: UNAVAILABLE stays unavailable, anything else is internal.
pub fn from_api(err: ApiError) -> StoreError {
    match err {
        ApiError::Unavailable(detail) => StoreError::Unavailable(detail),
        ApiError::Internal(err) => StoreError::Internal(err),
        other => StoreError::Internal(anyhow::Error::new(other)),
    }
}

/// The result of a kit call that answers an `ApiResult`, as a store result.
pub(crate) fn classified<T>(result: Result<T, ApiError>) -> StoreResult<T> {
    result.map_err(from_api)
}
