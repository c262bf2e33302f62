//! Input rules shared by several RPCs (users created directly, invitees
//! reserved by the invitation service).

use std::collections::BTreeSet;

use serde_json::Value as Json;
use usher_kit::{
    error::{ApiError, ApiResult, Violations},
    pagination,
};

use super::convert;

/// Most products one user may be granted.
pub const MAX_PRODUCTS: usize = 50;
/// Largest platform metadata, as encoded JSON.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;

/// A product code: 1..63 characters of `[a-z0-9_-]`, starting with a letter.
pub fn validate_product_code(field: &str, code: &str) -> ApiResult<()> {
    let ok = (1..=63).contains(&code.len())
        && code.starts_with(|c: char| c.is_ascii_lowercase())
        && code
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if !ok {
        return Err(ApiError::invalid(
            field,
            "must be 1 to 63 characters of a-z, 0-9, '_' and '-', starting with a letter",
        ));
    }
    Ok(())
}

/// Product codes, trimmed and deduplicated; each must be a product code
/// ([`validate_product_code`]), so no caller text of any length is echoed
/// in a later answer.
pub fn validate_products(field: &str, products: &[String]) -> ApiResult<Vec<String>> {
    if products.len() > MAX_PRODUCTS {
        return Err(ApiError::invalid(
            field,
            format!("must hold at most {MAX_PRODUCTS} products"),
        ));
    }
    let mut codes = BTreeSet::new();
    for (index, code) in products.iter().enumerate() {
        let code = code.trim();
        if code.is_empty() {
            return Err(ApiError::invalid(
                format!("{field}[{index}]"),
                "must not be empty",
            ));
        }
        validate_product_code(&format!("{field}[{index}]"), code)?;
        codes.insert(code.to_owned());
    }
    Ok(codes.into_iter().collect())
}

/// Platform metadata as JSON, at most [`MAX_METADATA_BYTES`] once encoded; an
/// absent or empty struct is `None`.
pub fn validate_metadata(
    field: &str,
    metadata: Option<&prost_types::Struct>,
) -> ApiResult<Option<Json>> {
    let Some(metadata) = metadata.filter(|m| !m.fields.is_empty()) else {
        return Ok(None);
    };
    let json = convert::struct_to_json(metadata);
    let size = serde_json::to_vec(&json).map_or(usize::MAX, |bytes| bytes.len());
    if size > MAX_METADATA_BYTES {
        return Err(ApiError::invalid(
            field,
            format!("must be at most {MAX_METADATA_BYTES} bytes as JSON"),
        ));
    }
    Ok(Some(json))
}

pub use crate::domain::accounts::require_enabled;

/// A page size: negative is INVALID_ARGUMENT on `page_size`, 0 is `default`,
/// anything above `max` is `max`.
pub fn page_size(requested: i32, default: u64, max: u64) -> ApiResult<u64> {
    if requested == 0 {
        return Ok(default);
    }
    Ok(pagination::page_size(requested)?.min(max))
}

/// The value of a validator's result, its field violations added to
/// `violations` instead (so a request reports every bad field at once).
pub fn checked<T>(violations: &mut Violations, result: ApiResult<T>) -> ApiResult<Option<T>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(ApiError::InvalidArgument(list)) => {
            for violation in list {
                violations.add(violation.field, violation.description);
            }
            Ok(None)
        }
        Err(other) => Err(other),
    }
}
