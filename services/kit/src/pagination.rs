//! Keyset pagination (AIP-158): `page_size` is normalised, and `page_token`
//! is an opaque, tamper-evident cursor holding the sort key of the last item
//! and a fingerprint of the query, so a token used with other filters is
//! refused instead of silently skipping rows.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::{Serialize, de::DeserializeOwned};
use sha2::{Digest, Sha256};

use crate::error::{ApiError, ApiResult};

/// Default page size when the caller sends 0.
pub const DEFAULT_PAGE_SIZE: u64 = 50;
/// Largest page size; larger requests are clamped.
pub const MAX_PAGE_SIZE: u64 = 500;

/// The number of items to return: 0 means the default, more than the maximum
/// is clamped, negative is an error on `page_size`.
pub fn page_size(requested: i32) -> ApiResult<u64> {
    match requested {
        n if n < 0 => Err(ApiError::invalid("page_size", "must not be negative")),
        0 => Ok(DEFAULT_PAGE_SIZE),
        n => Ok(u64::try_from(n).unwrap_or(MAX_PAGE_SIZE).min(MAX_PAGE_SIZE)),
    }
}

/// A fingerprint of the filters of a query (anything `Serialize`).
pub fn fingerprint<Q: Serialize>(query: &Q) -> String {
    let bytes = serde_json::to_vec(query).unwrap_or_default();
    let digest = Sha256::digest(&bytes);
    URL_SAFE_NO_PAD.encode(&digest[..12])
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Envelope<K> {
    q: String,
    k: K,
}

/// Encodes the cursor `key` for the query with `fingerprint`.
pub fn encode_token<K: Serialize>(fingerprint: &str, key: &K) -> String {
    let envelope = Envelope {
        q: fingerprint.to_owned(),
        k: key,
    };
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(&envelope).unwrap_or_default())
}

/// One page out of `rows`, fetched as `size + 1` to learn whether more
/// follow: the first `size` rows, and the next page's token, made by `token`
/// from the last row kept (empty when no row follows).
pub fn split_page<T>(
    mut rows: Vec<T>,
    size: u64,
    token: impl FnOnce(&T) -> String,
) -> (Vec<T>, String) {
    let keep = usize::try_from(size).unwrap_or(usize::MAX);
    if rows.len() <= keep {
        return (rows, String::new());
    }
    rows.truncate(keep);
    let next = rows.last().map(token).unwrap_or_default();
    (rows, next)
}

/// Decodes a `page_token`: `None` for the first page, the cursor otherwise;
/// `INVALID_ARGUMENT` on `page_token` when malformed or made for other filters.
pub fn decode_token<K: DeserializeOwned>(fingerprint: &str, token: &str) -> ApiResult<Option<K>> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = || ApiError::invalid("page_token", "is not a token of this query");
    if token.len() > 2048 {
        return Err(invalid());
    }
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    let envelope: Envelope<K> = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
    if envelope.q != fingerprint {
        return Err(invalid());
    }
    Ok(Some(envelope.k))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_keeps_size_rows_and_a_token_only_when_more_follow() {
        let token = |last: &u32| format!("after {last}");
        assert_eq!(
            split_page(vec![1, 2, 3], 2, token),
            (vec![1, 2], "after 2".into())
        );
        assert_eq!(
            split_page(vec![1, 2], 2, token),
            (vec![1, 2], String::new())
        );
        assert_eq!(
            split_page(Vec::<u32>::new(), 2, token),
            (vec![], String::new())
        );
        assert_eq!(split_page(vec![1, 2], 0, token), (vec![], String::new()));
    }

    #[test]
    fn page_sizes_are_normalised() {
        assert_eq!(page_size(0).expect("ok"), DEFAULT_PAGE_SIZE);
        assert_eq!(page_size(7).expect("ok"), 7);
        assert_eq!(page_size(100_000).expect("ok"), MAX_PAGE_SIZE);
        assert!(page_size(-1).is_err());
    }

    #[test]
    fn tokens_round_trip_and_are_bound_to_their_query() {
        let q1 = fingerprint(&("active", "abc"));
        let q2 = fingerprint(&("inactive", "abc"));
        let token = encode_token(&q1, &("Ada", "b7a1"));
        let key: Option<(String, String)> = decode_token(&q1, &token).expect("decodes");
        assert_eq!(key, Some(("Ada".into(), "b7a1".into())));
        assert!(decode_token::<(String, String)>(&q2, &token).is_err());
        assert!(decode_token::<(String, String)>(&q1, "not-a-token!").is_err());
        assert_eq!(
            decode_token::<(String, String)>(&q1, "").expect("first page"),
            None
        );
    }
}
