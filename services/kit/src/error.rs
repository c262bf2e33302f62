//! One error type for every RPC, one mapping to `tonic::Status`
//! (CONVENTIONS.md #4, AIP-193). Each rejection carries a stable reason as
//! `google.rpc.ErrorInfo` (domain [`ERROR_DOMAIN`]); input errors carry
//! `google.rpc.BadRequest` field violations; internal errors are logged with a
//! correlation id and returned opaque (P21).

use std::{fmt, time::Duration};

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

/// `ErrorInfo.domain` of every Usher error.
pub const ERROR_DOMAIN: &str = "usher.dev";

/// The stable reasons of `docs/contracts.md`. The string form never changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Input failed validation; see the field violations.
    InvalidArgument,
    /// No valid credential.
    Unauthenticated,
    /// The caller lacks the permission the RPC requires.
    PermissionDenied,
    /// Unknown id, or an id of another account (indistinguishable, P14).
    NotFound,
    /// A unique value is taken (slug, email, name).
    AlreadyExists,
    /// One answer for every sign-in failure (P7).
    InvalidCredentials,
    /// One answer for expired, used, superseded, revoked or unknown links.
    InvitationNotUsable,
    /// One answer for every unusable password-reset link.
    ResetTokenNotUsable,
    /// The account's seats are all used.
    SeatLimitReached,
    /// The account's plan has a single seat: inviting is off.
    SingleUserPlan,
    /// The change would leave no active user who can manage users.
    LastManager,
    /// The owner cannot be edited by others, deactivated, deleted or demoted.
    OwnerProtected,
    /// Built-in roles cannot be changed or deleted.
    BuiltInRole,
    /// The role still has members; reassign them first.
    RoleInUse,
    /// A product that is not enabled on the account.
    ProductNotEnabled,
    /// The email's domain is not in the account's allowed domains.
    DomainNotAllowed,
    /// The resource is not in a state that allows the operation.
    InvalidState,
    /// The invitation is being accepted right now.
    InvitationBeingAccepted,
    /// Resent too recently.
    ResendCooldown,
    /// Resent too often.
    ResendLimitReached,
    /// The account's hourly quota is used up.
    QuotaExceeded,
    /// Too many calls; retry later.
    RateLimited,
    /// The same `request_id` came with a different request.
    IdempotencyConflict,
    /// The user must choose a new password first.
    PasswordChangeRequired,
    /// A dependency (database, Redis, broker) is unavailable.
    Unavailable,
    /// Something failed inside; see the correlation id in the logs.
    Internal,
}

impl Reason {
    /// Every reason.
    pub const ALL: [Self; 26] = [
        Self::InvalidArgument,
        Self::Unauthenticated,
        Self::PermissionDenied,
        Self::NotFound,
        Self::AlreadyExists,
        Self::InvalidCredentials,
        Self::InvitationNotUsable,
        Self::ResetTokenNotUsable,
        Self::SeatLimitReached,
        Self::SingleUserPlan,
        Self::LastManager,
        Self::OwnerProtected,
        Self::BuiltInRole,
        Self::RoleInUse,
        Self::ProductNotEnabled,
        Self::DomainNotAllowed,
        Self::InvalidState,
        Self::InvitationBeingAccepted,
        Self::ResendCooldown,
        Self::ResendLimitReached,
        Self::QuotaExceeded,
        Self::RateLimited,
        Self::IdempotencyConflict,
        Self::PasswordChangeRequired,
        Self::Unavailable,
        Self::Internal,
    ];

    /// The reason named `name` (its [`as_str`](Self::as_str)).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|reason| reason.as_str() == name)
    }

    /// The stable UPPER_SNAKE string sent as `ErrorInfo.reason`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InvalidArgument => "INVALID_ARGUMENT",
            Self::Unauthenticated => "UNAUTHENTICATED",
            Self::PermissionDenied => "PERMISSION_DENIED",
            Self::NotFound => "NOT_FOUND",
            Self::AlreadyExists => "ALREADY_EXISTS",
            Self::InvalidCredentials => "INVALID_CREDENTIALS",
            Self::InvitationNotUsable => "INVITATION_NOT_USABLE",
            Self::ResetTokenNotUsable => "RESET_TOKEN_NOT_USABLE",
            Self::SeatLimitReached => "SEAT_LIMIT_REACHED",
            Self::SingleUserPlan => "SINGLE_USER_PLAN",
            Self::LastManager => "LAST_MANAGER",
            Self::OwnerProtected => "OWNER_PROTECTED",
            Self::BuiltInRole => "BUILT_IN_ROLE",
            Self::RoleInUse => "ROLE_IN_USE",
            Self::ProductNotEnabled => "PRODUCT_NOT_ENABLED",
            Self::DomainNotAllowed => "DOMAIN_NOT_ALLOWED",
            Self::InvalidState => "INVALID_STATE",
            Self::InvitationBeingAccepted => "INVITATION_BEING_ACCEPTED",
            Self::ResendCooldown => "RESEND_COOLDOWN",
            Self::ResendLimitReached => "RESEND_LIMIT_REACHED",
            Self::QuotaExceeded => "QUOTA_EXCEEDED",
            Self::RateLimited => "RATE_LIMITED",
            Self::IdempotencyConflict => "IDEMPOTENCY_CONFLICT",
            Self::PasswordChangeRequired => "PASSWORD_CHANGE_REQUIRED",
            Self::Unavailable => "UNAVAILABLE",
            Self::Internal => "INTERNAL",
        }
    }

    /// The gRPC code this reason is sent with.
    pub const fn code(self) -> Code {
        match self {
            Self::InvalidArgument | Self::ProductNotEnabled | Self::DomainNotAllowed => {
                Code::InvalidArgument
            }
            Self::Unauthenticated | Self::InvalidCredentials => Code::Unauthenticated,
            Self::PermissionDenied => Code::PermissionDenied,
            Self::NotFound => Code::NotFound,
            Self::AlreadyExists | Self::IdempotencyConflict => Code::AlreadyExists,
            Self::InvitationNotUsable
            | Self::ResetTokenNotUsable
            | Self::SeatLimitReached
            | Self::SingleUserPlan
            | Self::LastManager
            | Self::OwnerProtected
            | Self::BuiltInRole
            | Self::RoleInUse
            | Self::InvalidState
            | Self::PasswordChangeRequired => Code::FailedPrecondition,
            Self::InvitationBeingAccepted => Code::Aborted,
            Self::ResendCooldown
            | Self::ResendLimitReached
            | Self::QuotaExceeded
            | Self::RateLimited => Code::ResourceExhausted,
            Self::Unavailable => Code::Unavailable,
            Self::Internal => Code::Internal,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One input field at fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Path of the field, e.g. `invitees[3].email`.
    pub field: String,
    /// What is wrong with it, in words a user understands.
    pub description: String,
}

/// Every way an RPC can fail.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Input errors, one violation per field at fault.
    #[error("invalid argument: {}", .0.iter().map(|v| v.field.as_str()).collect::<Vec<_>>().join(", "))]
    InvalidArgument(Vec<Violation>),
    /// A rule of the product refused the call.
    #[error("{reason}: {message}")]
    Rejected {
        /// The stable reason.
        reason: Reason,
        /// A sentence for humans.
        message: String,
        /// When the caller may retry (rate limits, quotas).
        retry_after: Option<Duration>,
    },
    /// A dependency is down; the caller may retry. Details are logged only.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A bug or an unexpected failure. Details are logged only.
    #[error("internal: {0:#}")]
    Internal(#[from] anyhow::Error),
}

/// The result type of RPC handlers and domain functions.
pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    /// One field at fault.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![Violation {
            field: field.into(),
            description: description.into(),
        }])
    }

    /// A rejection for `reason`.
    pub fn rejected(reason: Reason, message: impl Into<String>) -> Self {
        Self::Rejected {
            reason,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The one `NOT_FOUND` answer, the same for unknown ids and ids of another account.
    pub fn not_found(what: &str) -> Self {
        Self::rejected(Reason::NotFound, format!("{what} not found"))
    }

    /// A rejection the caller may retry after `after`.
    pub fn retry_later(reason: Reason, message: impl Into<String>, after: Duration) -> Self {
        Self::Rejected {
            reason,
            message: message.into(),
            retry_after: Some(after),
        }
    }

    /// The stable reason of this error.
    pub fn reason(&self) -> Reason {
        match self {
            Self::InvalidArgument(_) => Reason::InvalidArgument,
            Self::Rejected { reason, .. } => *reason,
            Self::Unavailable(_) => Reason::Unavailable,
            Self::Internal(_) => Reason::Internal,
        }
    }
}

/// Collects field violations, for validating a whole request at once and
/// reporting every field at fault in one answer.
#[derive(Debug, Default)]
pub struct Violations {
    fields: Vec<Violation>,
    other: Option<ApiError>,
}

impl Violations {
    /// An empty collection.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a violation.
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.fields.push(Violation {
            field: field.into(),
            description: description.into(),
        });
    }

    /// Adds the violations of a validation error; any other error is kept
    /// and returned by [`Violations::into_result`] in their place.
    pub fn absorb(&mut self, err: ApiError) {
        match err {
            ApiError::InvalidArgument(fields) => self.fields.extend(fields),
            other => {
                self.other.get_or_insert(other);
            }
        }
    }

    /// `Ok` when nothing was added, else the `INVALID_ARGUMENT` error.
    pub fn into_result(self) -> ApiResult<()> {
        if let Some(other) = self.other {
            return Err(other);
        }
        if self.fields.is_empty() {
            Ok(())
        } else {
            Err(ApiError::InvalidArgument(self.fields))
        }
    }
}

/// Longest `grpc-message`, in characters. A message that quotes the
/// caller's input (an unknown product code, say) stays far below the HTTP/2
/// header limits, which would otherwise reset the stream.
const MAX_MESSAGE_CHARS: usize = 1_000;

/// `message`, shortened to [`MAX_MESSAGE_CHARS`] with an ellipsis.
fn bounded(message: String) -> String {
    if message.chars().count() <= MAX_MESSAGE_CHARS {
        return message;
    }
    let mut short: String = message.chars().take(MAX_MESSAGE_CHARS - 1).collect();
    short.push('…');
    short
}

fn status(reason: Reason, message: String, mut details: ErrorDetails) -> Status {
    let message = bounded(message);
    details.set_error_info(
        reason.as_str(),
        ERROR_DOMAIN,
        std::collections::HashMap::new(),
    );
    Status::with_error_details(reason.code(), message, details)
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Self {
        match err {
            ApiError::InvalidArgument(violations) => {
                let message = format!(
                    "invalid argument: {}",
                    violations
                        .iter()
                        .map(|v| format!("{}: {}", v.field, v.description))
                        .collect::<Vec<_>>()
                        .join("; ")
                );
                let fields: Vec<FieldViolation> = violations
                    .into_iter()
                    .map(|v| FieldViolation::new(bounded(v.field), bounded(v.description)))
                    .collect();
                status(
                    Reason::InvalidArgument,
                    message,
                    ErrorDetails::with_bad_request(fields),
                )
            }
            ApiError::Rejected {
                reason,
                message,
                retry_after,
            } => {
                let details = match retry_after {
                    Some(after) => ErrorDetails::with_retry_info(Some(after)),
                    None => ErrorDetails::new(),
                };
                status(reason, message, details)
            }
            ApiError::Unavailable(detail) => {
                tracing::warn!(error = %detail, "dependency unavailable");
                status(
                    Reason::Unavailable,
                    "a dependency is unavailable, retry shortly".into(),
                    ErrorDetails::with_retry_info(Some(Duration::from_secs(1))),
                )
            }
            ApiError::Internal(error) => {
                let correlation_id = uuid::Uuid::new_v4();
                tracing::error!(%correlation_id, error = format!("{error:#}"), "internal error");
                let mut details = ErrorDetails::new();
                details.set_error_info(
                    Reason::Internal.as_str(),
                    ERROR_DOMAIN,
                    std::collections::HashMap::from([(
                        "correlation_id".to_owned(),
                        correlation_id.to_string(),
                    )]),
                );
                Status::with_error_details(
                    Code::Internal,
                    format!("internal error (correlation id {correlation_id})"),
                    details,
                )
            }
        }
    }
}

/// Whether `status` was raised by this side's transport — a refused,
/// reset or broken HTTP/2 stream or connection (tonic reports a stream
/// refused by a peer's graceful shutdown as INTERNAL) — rather than
/// answered by the peer.
fn transport_failure(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if error.is::<h2::Error>() || error.is::<hyper::Error>() || error.is::<std::io::Error>() {
            return true;
        }
        source = error.source();
    }
    false
}

/// An error answered by another Usher service, passed on: its reason and
/// field violations are kept; a service that cannot be reached, does not
/// answer in time or whose connection breaks is UNAVAILABLE; anything
/// unexpected is INTERNAL here.
impl From<Status> for ApiError {
    fn from(status: Status) -> Self {
        if transport_failure(&status) {
            return Self::Unavailable(format!("upstream connection: {}", status.message()));
        }
        match status.code() {
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::ResourceExhausted
                if status.get_details_error_info().is_none_or(|info| {
                    Reason::parse(&info.reason).is_none_or(|r| r == Reason::Unavailable)
                }) =>
            {
                // A delay the upstream asked for (a full hashing queue says
                // how long it needs) is passed on as it is.
                if let Some(after) = status
                    .get_details_retry_info()
                    .and_then(|info| info.retry_delay)
                {
                    return Self::retry_later(Reason::Unavailable, status.message(), after);
                }
                return Self::Unavailable(format!("upstream: {}", status.message()));
            }
            _ => {}
        }
        let details = status.get_error_details();
        if let Some(bad_request) = details.bad_request() {
            let violations: Vec<Violation> = bad_request
                .field_violations
                .iter()
                .map(|v| Violation {
                    field: v.field.clone(),
                    description: v.description.clone(),
                })
                .collect();
            if !violations.is_empty() {
                return Self::InvalidArgument(violations);
            }
        }
        let reason = details
            .error_info()
            .filter(|info| info.domain == ERROR_DOMAIN)
            .and_then(|info| Reason::parse(&info.reason));
        match reason {
            Some(Reason::Internal) | None => Self::Internal(anyhow::anyhow!(
                "upstream answered {:?}: {}",
                status.code(),
                status.message()
            )),
            Some(Reason::Unavailable) => {
                Self::Unavailable(format!("upstream: {}", status.message()))
            }
            Some(reason) => Self::Rejected {
                reason,
                message: status.message().to_owned(),
                retry_after: details.retry_info().and_then(|info| info.retry_delay),
            },
        }
    }
}

impl From<sea_orm::DbErr> for ApiError {
    fn from(err: sea_orm::DbErr) -> Self {
        if crate::db::is_passing(&err) {
            Self::Unavailable(err.to_string())
        } else {
            Self::Internal(anyhow::Error::new(err))
        }
    }
}

impl From<redis::RedisError> for ApiError {
    fn from(err: redis::RedisError) -> Self {
        use redis::{ErrorKind, ServerErrorKind};
        // A server going away, or one in the middle of a failover (a
        // demoted master, a cluster re-electing, a replica loading), is a
        // passing condition: worth a retry.
        let passing = matches!(
            err.kind(),
            ErrorKind::Server(
                ServerErrorKind::ReadOnly
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::BusyLoading
            ) | ErrorKind::ClusterConnectionNotFound
                | ErrorKind::MasterNameNotFoundBySentinel
        );
        if passing
            || err.is_io_error()
            || err.is_connection_dropped()
            || err.is_timeout()
            || err.is_connection_refusal()
        {
            Self::Unavailable(err.to_string())
        } else {
            Self::Internal(anyhow::Error::new(err))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_parses_back() {
        for reason in Reason::ALL {
            assert_eq!(Reason::parse(reason.as_str()), Some(reason));
        }
        assert_eq!(Reason::parse("NOPE"), None);
    }

    #[test]
    fn upstream_errors_keep_their_reason_and_fields() {
        let status = Status::from(ApiError::invalid("password", "too short"));
        match ApiError::from(status) {
            ApiError::InvalidArgument(v) => assert_eq!(v[0].field, "password"),
            other => panic!("{other:?}"),
        }
        let status = Status::from(ApiError::rejected(Reason::ProductNotEnabled, "no"));
        assert_eq!(ApiError::from(status).reason(), Reason::ProductNotEnabled);
        let down = Status::unavailable("connection refused");
        assert_eq!(ApiError::from(down).reason(), Reason::Unavailable);
        let odd = Status::unknown("??");
        assert_eq!(ApiError::from(odd).reason(), Reason::Internal);
    }

    #[test]
    fn an_upstream_retry_delay_is_passed_on() {
        let asked = Duration::from_millis(240);
        let busy: Status = ApiError::retry_later(Reason::Unavailable, "at capacity", asked).into();
        let passed: Status = ApiError::from(busy).into();
        assert_eq!(passed.code(), Code::Unavailable);
        assert_eq!(
            passed
                .get_error_details()
                .retry_info()
                .map(|i| i.retry_delay),
            Some(Some(asked))
        );
    }

    #[test]
    fn a_stream_broken_by_the_transport_is_unavailable_not_internal() {
        // What tonic makes of a stream refused by the peer's GOAWAY.
        let refused = Status::from_error(Box::new(h2::Error::from(h2::Reason::NO_ERROR)));
        assert_eq!(refused.code(), Code::Internal, "tonic's own mapping");
        assert_eq!(ApiError::from(refused).reason(), Reason::Unavailable);
        let reset = Status::from_error(Box::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        assert_eq!(ApiError::from(reset).reason(), Reason::Unavailable);
        // An INTERNAL the peer answered stays INTERNAL.
        let answered = Status::internal("bug upstream");
        assert_eq!(ApiError::from(answered).reason(), Reason::Internal);
    }

    #[test]
    fn invalid_argument_carries_field_violations_and_reason() {
        let mut v = Violations::new();
        v.add("invitees[2].email", "not an email address");
        v.add("role_id", "required");
        let status: Status = v.into_result().expect_err("violations").into();
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        let fields: Vec<_> = details
            .bad_request()
            .expect("bad request")
            .field_violations
            .iter()
            .map(|f| f.field.clone())
            .collect();
        assert_eq!(fields, ["invitees[2].email", "role_id"]);
        let info = details.error_info().expect("error info");
        assert_eq!(
            (info.reason.as_str(), info.domain.as_str()),
            ("INVALID_ARGUMENT", ERROR_DOMAIN)
        );
    }

    #[test]
    fn rejection_maps_reason_to_code() {
        let status: Status = ApiError::rejected(Reason::SeatLimitReached, "no seats").into();
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(
            status
                .get_error_details()
                .error_info()
                .expect("info")
                .reason,
            "SEAT_LIMIT_REACHED"
        );
        let status: Status =
            ApiError::retry_later(Reason::RateLimited, "slow down", Duration::from_secs(3)).into();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.get_error_details().retry_info().is_some());
    }

    #[test]
    fn messages_quoting_input_stay_small() {
        let huge = "a".repeat(10_000);
        let status: Status =
            ApiError::rejected(Reason::ProductNotEnabled, format!("product {huge}")).into();
        assert!(status.message().chars().count() <= MAX_MESSAGE_CHARS);
        let status: Status = ApiError::invalid(huge.clone(), huge).into();
        assert!(status.message().chars().count() <= MAX_MESSAGE_CHARS);
        let details = status.get_error_details();
        let violation = &details.bad_request().expect("bad request").field_violations[0];
        assert!(violation.field.chars().count() <= MAX_MESSAGE_CHARS);
    }

    #[test]
    fn internal_errors_are_opaque() {
        let err = ApiError::Internal(anyhow::anyhow!(
            "duplicate key value violates unique constraint \"users_pkey\" on host db-7"
        ));
        let status: Status = err.into();
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("users_pkey"));
        assert!(!status.message().contains("db-7"));
        assert!(status.message().contains("correlation id"));
    }
}
