//! The rules every request field is checked against before anything is
//! loaded: ids, bulk id lists, link tokens and the invitee's answer to an
//! invitation. Each names the field at fault.

use std::collections::HashSet;

use usher_kit::error::{ApiError, ApiResult, Reason, Violations};
use uuid::Uuid;

/// Most ids in one bulk call.
pub const MAX_BULK_IDS: usize = 1_000;
/// Longest token looked up; anything longer is no token of ours.
pub const MAX_TOKEN_CHARS: usize = 128;
/// Longest name an invitee may choose.
pub const MAX_NAME_CHARS: usize = 200;
/// Password length bounds checked before the claim (identity applies the
/// deployment's policy too).
pub const PASSWORD_CHARS: std::ops::RangeInclusive<usize> = 8..=128;

/// A UUID field.
pub fn parse_id(field: &str, value: &str) -> ApiResult<Uuid> {
    Uuid::parse_str(value.trim()).map_err(|_| ApiError::invalid(field, "must be a UUID"))
}

/// An optional UUID field (empty for none).
pub fn parse_optional_id(field: &str, value: &str) -> ApiResult<Option<Uuid>> {
    if value.trim().is_empty() {
        Ok(None)
    } else {
        parse_id(field, value).map(Some)
    }
}

/// The ids of a bulk call: 1..1,000 distinct UUIDs.
pub fn parse_ids(ids: &[String]) -> ApiResult<Vec<Uuid>> {
    const FIELD: &str = "invitation_ids";
    if ids.is_empty() {
        return Err(ApiError::invalid(FIELD, "at least one id is required"));
    }
    if ids.len() > MAX_BULK_IDS {
        return Err(ApiError::invalid(FIELD, "at most 1000 ids per call"));
    }
    let mut seen = HashSet::with_capacity(ids.len());
    ids.iter()
        .enumerate()
        .map(|(i, id)| {
            let id = parse_id(&format!("{FIELD}[{i}]"), id)?;
            if !seen.insert(id) {
                return Err(ApiError::invalid(format!("{FIELD}[{i}]"), "duplicate id"));
            }
            Ok(id)
        })
        .collect()
}

/// The one answer to every link that cannot be used, whatever the cause
/// (unknown, expired, revoked, used, resent since): a link tells nothing
/// about its invitation unless it works.
pub fn not_usable() -> ApiError {
    ApiError::rejected(
        Reason::InvitationNotUsable,
        "this invitation link cannot be used; ask for a new invitation",
    )
}

/// The `token` field of a public call: present and not too long.
pub fn check_token(token: &str) -> ApiResult<()> {
    if token.is_empty() {
        return Err(ApiError::invalid("token", "is required"));
    }
    if token.len() > MAX_TOKEN_CHARS {
        return Err(ApiError::invalid("token", "must be at most 128 characters"));
    }
    Ok(())
}

/// The invitee's answer to an invitation (AcceptInvitation), checked
/// before the claim: every field at fault at once. Returns the name, trimmed.
pub fn check_answer<'a>(token: &str, display_name: &'a str, password: &str) -> ApiResult<&'a str> {
    check_token(token)?;
    let name = display_name.trim();
    let mut violations = Violations::new();
    if name.is_empty()
        || name.chars().count() > MAX_NAME_CHARS
        || name.chars().any(char::is_control)
    {
        violations.add("display_name", "1 to 200 characters, no control characters");
    }
    if !PASSWORD_CHARS.contains(&password.chars().count()) {
        violations.add("password", "must be 8 to 128 characters");
    }
    violations.into_result()?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::fixtures::fields;

    #[test]
    fn ids_are_uuids_and_empty_means_none() {
        let id = Uuid::from_u128(7);
        assert_eq!(parse_id("x", &format!(" {id} ")).unwrap(), id);
        assert_eq!(
            fields(parse_id("role_id", "nope").unwrap_err()),
            ["role_id"]
        );
        assert_eq!(parse_optional_id("team_id", "  ").unwrap(), None);
        assert_eq!(
            parse_optional_id("team_id", &id.to_string()).unwrap(),
            Some(id)
        );
    }

    #[test]
    fn bulk_ids_are_one_to_a_thousand_distinct_uuids() {
        assert_eq!(fields(parse_ids(&[]).unwrap_err()), ["invitation_ids"]);
        let many: Vec<String> = (0..=MAX_BULK_IDS as u128)
            .map(|i| Uuid::from_u128(i).to_string())
            .collect();
        assert_eq!(fields(parse_ids(&many).unwrap_err()), ["invitation_ids"]);
        assert_eq!(
            parse_ids(&many[..MAX_BULK_IDS]).unwrap().len(),
            MAX_BULK_IDS
        );
        let twice = [many[1].clone(), many[2].clone(), many[1].clone()];
        assert_eq!(
            fields(parse_ids(&twice).unwrap_err()),
            ["invitation_ids[2]"]
        );
        let bad = [many[1].clone(), "x".into()];
        assert_eq!(fields(parse_ids(&bad).unwrap_err()), ["invitation_ids[1]"]);
    }

    #[test]
    fn tokens_are_required_and_bounded() {
        assert_eq!(fields(check_token("").unwrap_err()), ["token"]);
        assert_eq!(
            fields(check_token(&"a".repeat(129)).unwrap_err()),
            ["token"]
        );
        assert!(check_token(&"a".repeat(128)).is_ok());
        assert_eq!(not_usable().reason(), Reason::InvitationNotUsable);
    }

    #[test]
    fn an_answer_names_every_field_at_fault() {
        assert_eq!(
            check_answer("t", "  Ivy  ", "a long enough passphrase").unwrap(),
            "Ivy"
        );
        assert_eq!(
            fields(check_answer("t", " ", "short").unwrap_err()),
            ["display_name", "password"]
        );
        assert_eq!(
            fields(check_answer("t", "a\u{7}b", &"p".repeat(129)).unwrap_err()),
            ["display_name", "password"]
        );
        assert_eq!(
            fields(check_answer("t", &"n".repeat(201), "12345678").unwrap_err()),
            ["display_name"]
        );
        assert_eq!(fields(check_answer("", "Ivy", "x").unwrap_err()), ["token"]);
    }
}
