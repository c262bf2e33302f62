//! What a delivery result of the notification service changes: it is
//! recorded on the invitation whose latest email it concerns (a result for
//! an older email, before a resend, changes nothing), and a late QUEUED
//! never overwrites a final status (SENT or FAILED).

use usher_proto::notification::v1 as notification;
use uuid::Uuid;

/// Longest failure reason kept.
pub const MAX_REASON_CHARS: usize = 500;

/// A delivery result, as it is recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliveryReport {
    /// The invitation the email was for.
    pub invitation_id: Uuid,
    /// The email job; only the invitation's latest job is updated.
    pub job_id: String,
    /// The new status (`notification.v1.DeliveryStatus`).
    pub status: i32,
    /// Why it failed, cut to [`MAX_REASON_CHARS`].
    pub reason: String,
    /// Attempts so far.
    pub attempts: i32,
    /// Statuses this report must not overwrite.
    pub unless_status_in: Vec<i32>,
}

/// The report of `result`, or none when it names no invitation or no job.
pub fn report(result: &notification::DeliveryResult) -> Option<DeliveryReport> {
    let invitation_id = Uuid::parse_str(&result.invitation_id).ok()?;
    if result.job_id.is_empty() {
        return None;
    }
    let unless_status_in = if result.status == notification::DeliveryStatus::Queued as i32 {
        vec![
            notification::DeliveryStatus::Sent as i32,
            notification::DeliveryStatus::Failed as i32,
        ]
    } else {
        Vec::new()
    };
    Some(DeliveryReport {
        invitation_id,
        job_id: result.job_id.clone(),
        status: result.status,
        reason: result.reason.chars().take(MAX_REASON_CHARS).collect(),
        attempts: result.attempts,
        unless_status_in,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(status: notification::DeliveryStatus) -> notification::DeliveryResult {
        notification::DeliveryResult {
            invitation_id: Uuid::from_u128(1).to_string(),
            job_id: "job".into(),
            status: status as i32,
            reason: "r".repeat(600),
            attempts: 2,
            ..Default::default()
        }
    }

    #[test]
    fn a_late_queued_never_overwrites_a_final_status() {
        let queued = report(&result(notification::DeliveryStatus::Queued)).unwrap();
        assert_eq!(
            queued.unless_status_in,
            [
                notification::DeliveryStatus::Sent as i32,
                notification::DeliveryStatus::Failed as i32
            ]
        );
        let sent = report(&result(notification::DeliveryStatus::Sent)).unwrap();
        assert!(sent.unless_status_in.is_empty());
        assert_eq!(sent.reason.chars().count(), MAX_REASON_CHARS);
        assert_eq!(sent.attempts, 2);
    }

    #[test]
    fn a_result_without_invitation_or_job_is_ignored() {
        let mut no_id = result(notification::DeliveryStatus::Sent);
        no_id.invitation_id = "x".into();
        assert_eq!(report(&no_id), None);
        let mut no_job = result(notification::DeliveryStatus::Sent);
        no_job.job_id.clear();
        assert_eq!(report(&no_job), None);
    }
}
