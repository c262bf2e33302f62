//! How a failed call is shown: the gRPC code's meaning, the stable reason
//! (`google.rpc.ErrorInfo`), the fields at fault (`google.rpc.BadRequest`)
//! and, for `RATE_LIMITED`, when to retry (docs/contracts.md, "Error model").

use std::fmt;

use tonic::{Code, Status};
use tonic_types::StatusExt;

/// A failed RPC, with the details the services attach.
#[derive(Debug, Clone, PartialEq)]
pub struct CallError {
    /// The gRPC code.
    pub code: Code,
    /// The status message.
    pub message: String,
    /// `ErrorInfo.reason`, when the service sent one.
    pub reason: Option<String>,
    /// `BadRequest` field violations: (field path, description).
    pub fields: Vec<(String, String)>,
    /// `RetryInfo.retry_delay`, in seconds.
    pub retry_after_secs: Option<f64>,
}

impl CallError {
    /// Reads the status and its details.
    pub fn from_status(status: &Status) -> Self {
        let details = status.get_error_details();
        let reason = details.error_info().map(|info| info.reason.clone());
        let fields = details
            .bad_request()
            .map(|bad| {
                bad.field_violations
                    .iter()
                    .map(|v| (v.field.clone(), v.description.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let retry_after_secs = details
            .retry_info()
            .and_then(|retry| retry.retry_delay)
            .map(|delay| delay.as_secs_f64());
        Self {
            code: status.code(),
            message: status.message().to_owned(),
            reason,
            fields,
            retry_after_secs,
        }
    }

    /// Whether the reason is `reason` (what clients should branch on).
    pub fn is(&self, reason: &str) -> bool {
        self.reason.as_deref() == Some(reason)
    }
}

impl From<Status> for CallError {
    fn from(status: Status) -> Self {
        Self::from_status(&status)
    }
}

impl std::error::Error for CallError {}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:?})", code_meaning(self.code), self.code)?;
        if let Some(reason) = &self.reason {
            write!(f, "\n  reason: {reason}")?;
            if let Some(hint) = reason_hint(reason) {
                write!(f, " ({hint})")?;
            }
        }
        if !self.message.is_empty() {
            write!(f, "\n  message: {}", self.message)?;
        }
        for (field, description) in &self.fields {
            write!(f, "\n  field {field}: {description}")?;
        }
        if let Some(secs) = self.retry_after_secs {
            write!(f, "\n  retry after {secs:.1} s")?;
        }
        Ok(())
    }
}

/// What a gRPC code means to someone at a terminal.
pub fn code_meaning(code: Code) -> &'static str {
    match code {
        Code::Ok => "success",
        Code::Cancelled => "the call was cancelled",
        Code::Unknown => "unknown error",
        Code::InvalidArgument => "the request is invalid",
        Code::DeadlineExceeded => "the call took too long",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "a limit was reached",
        Code::FailedPrecondition => "refused in the current state",
        Code::Aborted => "the call was interrupted by a concurrent change",
        Code::OutOfRange => "a value is out of range",
        Code::Unimplemented => "not supported by this gateway",
        Code::Internal => "the server failed",
        Code::Unavailable => "the gateway or a service behind it is unavailable",
        Code::DataLoss => "data loss",
        Code::Unauthenticated => "not signed in, or the credential is no longer valid",
    }
}

/// A hint for the reasons where the next step is not obvious.
fn reason_hint(reason: &str) -> Option<&'static str> {
    Some(match reason {
        "UNAUTHENTICATED" => "run `usher login` again",
        "INVALID_CREDENTIALS" => "wrong account, login or password",
        "PASSWORD_CHANGE_REQUIRED" => "change the password first",
        "SEAT_LIMIT_REACHED" => "no seat left on the account",
        "SINGLE_USER_PLAN" => "the account's plan has a single seat",
        "LAST_MANAGER" => "the account must keep an active user who manages users",
        "OWNER_PROTECTED" => "the owner cannot be changed this way",
        "RATE_LIMITED" => "too many requests, retry later",
        "UNAVAILABLE" => "safe to retry",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use tonic_types::{ErrorDetails, FieldViolation};

    use super::*;

    #[test]
    fn reason_and_fields_come_from_the_details() {
        let details = ErrorDetails::with_error_info("INVALID_ARGUMENT", "usher.dev", [])
            .set_bad_request(vec![
                FieldViolation::new("invitees[3].email", "missing @"),
                FieldViolation::new("role_id", "required"),
            ])
            .to_owned();
        let status = Status::with_error_details(Code::InvalidArgument, "bad request", details);
        let error = CallError::from_status(&status);
        assert_eq!(error.reason.as_deref(), Some("INVALID_ARGUMENT"));
        assert_eq!(
            error.fields,
            [
                ("invitees[3].email".to_owned(), "missing @".to_owned()),
                ("role_id".to_owned(), "required".to_owned())
            ]
        );
        let shown = error.to_string();
        assert!(
            shown.starts_with("the request is invalid (InvalidArgument)"),
            "{shown}"
        );
        assert!(
            shown.contains("\n  field invitees[3].email: missing @"),
            "{shown}"
        );
        assert!(shown.contains("\n  reason: INVALID_ARGUMENT"), "{shown}");
    }

    #[test]
    fn retry_delay_is_shown() {
        let details = ErrorDetails::with_retry_info(Some(std::time::Duration::from_secs(3)))
            .set_error_info("RATE_LIMITED", "usher.dev", [])
            .to_owned();
        let status = Status::with_error_details(Code::ResourceExhausted, "slow down", details);
        let error = CallError::from_status(&status);
        assert!(error.is("RATE_LIMITED"));
        assert_eq!(error.retry_after_secs, Some(3.0));
        assert!(error.to_string().contains("retry after 3.0 s"));
    }

    #[test]
    fn a_plain_status_shows_code_and_message() {
        let error = CallError::from_status(&Status::unavailable("connection refused"));
        assert_eq!(error.reason, None);
        assert_eq!(
            error.to_string(),
            "the gateway or a service behind it is unavailable (Unavailable)\n  message: connection refused"
        );
    }
}
