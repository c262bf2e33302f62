//! Seats and who may join an account: the seat limit (ACTIVE and INVITED
//! users take a seat, INACTIVE ones free theirs), the single-seat plan that
//! has no room for a second user, and the email-domain allow-list. Pure: the
//! caller counts the seats in use inside a transaction that locked the
//! account row, so two concurrent callers never take the last seat both.

use usher_kit::{
    email::EmailAddress,
    error::{ApiError, ApiResult, Reason},
};

/// How many seats are free: `seats_used` of `seat_limit` are taken.
pub fn free_seats(seat_limit: i32, seats_used: u64) -> u64 {
    u64::try_from(seat_limit)
        .unwrap_or_default()
        .saturating_sub(seats_used)
}

/// Whether one more seat is free: `seats_used` of `seat_limit` are taken.
pub fn has_free_seat(seat_limit: i32, seats_used: u64) -> bool {
    free_seats(seat_limit, seats_used) > 0
}

/// Refuses taking a seat when every seat of the account is taken.
pub fn check_free_seat(seat_limit: i32, seats_used: u64) -> ApiResult<()> {
    if has_free_seat(seat_limit, seats_used) {
        Ok(())
    } else {
        Err(ApiError::rejected(
            Reason::SeatLimitReached,
            "every seat of the account is taken",
        ))
    }
}

/// Refuses adding a user to an account whose plan has a single seat (its
/// owner's).
pub fn check_multi_user_plan(seat_limit: i32) -> ApiResult<()> {
    if seat_limit <= 1 {
        Err(ApiError::rejected(
            Reason::SingleUserPlan,
            "the account's plan has a single seat",
        ))
    } else {
        Ok(())
    }
}

/// Refuses inviting on a single-seat plan (its one seat is the owner's).
pub fn check_inviting_allowed(seat_limit: i32) -> ApiResult<()> {
    if seat_limit <= 1 {
        return Err(ApiError::rejected(
            Reason::SingleUserPlan,
            "the account's plan has a single seat: inviting is off",
        ));
    }
    Ok(())
}

/// Whether the canonical `domain` may join an account allowing the canonical
/// domains `allowed` (any domain when there are none): the allow-list of a
/// batch, read once for all its addresses.
pub fn domain_in(allowed: &std::collections::HashSet<String>, domain: &str) -> bool {
    allowed.is_empty() || allowed.contains(domain)
}

/// Whether `email` may join an account allowing the domains `allowed` (any
/// domain when the list is empty).
pub fn domain_allowed(allowed: &[String], email: &EmailAddress) -> bool {
    allowed.is_empty() || allowed.iter().any(|d| email.domain_matches(d))
}

/// Refuses an email outside the account's allowed domains (when it has any).
pub fn check_allowed_domain(allowed: &[String], email: &EmailAddress) -> ApiResult<()> {
    if domain_allowed(allowed, email) {
        Ok(())
    } else {
        Err(ApiError::rejected(
            Reason::DomainNotAllowed,
            "the email's domain is not allowed in this account",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn email(address: &str) -> EmailAddress {
        EmailAddress::parse(address).expect("valid email")
    }

    #[test]
    fn a_seat_is_free_until_the_limit() {
        assert!(has_free_seat(5, 4));
        assert!(!has_free_seat(5, 5));
        assert!(!has_free_seat(5, 6));
        assert!(!has_free_seat(-1, 0), "a negative limit has no seat");
        assert!(check_free_seat(2, 1).is_ok());
        let err = check_free_seat(2, 2).expect_err("full");
        assert_eq!(err.reason(), Reason::SeatLimitReached);
    }

    #[test]
    fn a_single_seat_plan_takes_no_second_user() {
        for limit in [-1, 0, 1] {
            let err = check_multi_user_plan(limit).expect_err("single seat");
            assert_eq!(err.reason(), Reason::SingleUserPlan);
        }
        assert!(check_multi_user_plan(2).is_ok());
    }

    #[test]
    fn the_allow_list_admits_its_domains_only() {
        let allowed = vec!["acme.example".to_owned(), "@Partner.Example".to_owned()];
        assert!(check_allowed_domain(&allowed, &email("ada@ACME.example")).is_ok());
        assert!(check_allowed_domain(&allowed, &email("bob@partner.example")).is_ok());
        let err = check_allowed_domain(&allowed, &email("eve@sub.acme.example")).expect_err("sub");
        assert_eq!(err.reason(), Reason::DomainNotAllowed);
        assert!(check_allowed_domain(&[], &email("anyone@anywhere.example")).is_ok());
    }
}
