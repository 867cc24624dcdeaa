//! Runs and executions: statuses, outcomes, and the retry policy.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A run's status as stored. `Claimed` is internal: every API shows it as
/// `running`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Scheduled,
    Claimed,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Scheduled => "scheduled",
            RunStatus::Claimed => "claimed",
            RunStatus::Running => "running",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            RunStatus::Scheduled,
            RunStatus::Claimed,
            RunStatus::Running,
            RunStatus::Completed,
            RunStatus::Failed,
            RunStatus::Cancelled,
        ]
        .into_iter()
        .find(|status| status.as_str() == s)
    }

    /// What clients see: the internal `claimed` sentinel reads `running`.
    pub fn public(self) -> &'static str {
        match self {
            RunStatus::Claimed => "running",
            other => other.as_str(),
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunStatus::Completed | RunStatus::Failed | RunStatus::Cancelled
        )
    }
}

/// Which contacts a run sends to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum Recipients {
    /// Every contact of the campaign.
    #[default]
    All,
    /// Contacts whose last execution failed, got no answer or was busy.
    Failed,
}

impl Recipients {
    pub fn as_str(self) -> &'static str {
        match self {
            Recipients::All => "all",
            Recipients::Failed => "failed",
        }
    }
}

/// An execution's status (seed 001's enum).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExecutionStatus {
    Pending,
    InProgress,
    Completed,
    Failed,
    NoAnswer,
    Busy,
    Voicemail,
    Skipped,
}

impl ExecutionStatus {
    pub const ALL: [ExecutionStatus; 8] = [
        ExecutionStatus::Pending,
        ExecutionStatus::InProgress,
        ExecutionStatus::Completed,
        ExecutionStatus::Failed,
        ExecutionStatus::NoAnswer,
        ExecutionStatus::Busy,
        ExecutionStatus::Voicemail,
        ExecutionStatus::Skipped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ExecutionStatus::Pending => "pending",
            ExecutionStatus::InProgress => "in_progress",
            ExecutionStatus::Completed => "completed",
            ExecutionStatus::Failed => "failed",
            ExecutionStatus::NoAnswer => "no_answer",
            ExecutionStatus::Busy => "busy",
            ExecutionStatus::Voicemail => "voicemail",
            ExecutionStatus::Skipped => "skipped",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == s)
    }

    /// A final outcome that reached the recipient.
    pub fn is_success(self) -> bool {
        matches!(
            self,
            ExecutionStatus::Completed | ExecutionStatus::Voicemail
        )
    }

    /// A final outcome that did not reach the recipient; such recipients
    /// are what "resend to failures" targets.
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            ExecutionStatus::Failed | ExecutionStatus::NoAnswer | ExecutionStatus::Busy
        )
    }
}

/// What one send attempt produced, as the engine classifies it.
#[derive(Debug, Clone, PartialEq)]
pub enum SendResult {
    /// Reached the recipient (SMS accepted, call answered or voicemail).
    Delivered {
        status: ExecutionStatus,
        provider_id: Option<String>,
        duration_seconds: Option<i64>,
    },
    /// Did not reach them; worth another attempt (no answer, busy, 429,
    /// 5xx, the provider could not be reached at all).
    Retriable {
        status: ExecutionStatus,
        provider_id: Option<String>,
        reason: String,
    },
    /// Throttled or down, and the provider said when to come back (a 429
    /// or 503 with `Retry-After`): retried no sooner than `wait`.
    RetryAfter {
        wait: std::time::Duration,
        reason: String,
    },
    /// Will never succeed for this recipient (invalid number, 4xx).
    Permanent {
        provider_id: Option<String>,
        reason: String,
    },
    /// The request may have reached the provider but no answer came (a
    /// timeout or a reset after it was sent): the message may be on its
    /// way. Never resent, so no one is contacted twice; it counts as
    /// failed ("outcome unknown") and as a provider fault.
    Unknown { reason: String },
    /// The provider refuses every send (bad credentials, unknown account):
    /// the run fails instead of burning every recipient.
    Misconfigured { reason: String },
}

/// Exponential backoff with jitter: `base · 2^(attempt-1)`, capped, then
/// scaled by a factor in [0.5, 1.0] so retries of one batch spread out.
/// `jitter` is a number in [0, 1).
pub fn retry_delay(base: Duration, attempt: u32, cap: Duration, jitter: f64) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let capped = exp.min(cap);
    capped.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claimed_is_shown_as_running() {
        assert_eq!(RunStatus::Claimed.public(), "running");
        assert_eq!(RunStatus::Completed.public(), "completed");
        for s in [
            "scheduled",
            "claimed",
            "running",
            "completed",
            "failed",
            "cancelled",
        ] {
            assert_eq!(RunStatus::parse(s).unwrap().as_str(), s);
        }
    }

    #[test]
    fn outcome_classes() {
        assert!(ExecutionStatus::Voicemail.is_success());
        assert!(ExecutionStatus::Busy.is_failure());
        assert!(!ExecutionStatus::Skipped.is_failure());
        assert!(!ExecutionStatus::Pending.is_success());
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_secs(2);
        let cap = Duration::from_secs(60);
        assert_eq!(retry_delay(base, 1, cap, 1.0), Duration::from_secs(2));
        assert_eq!(retry_delay(base, 3, cap, 1.0), Duration::from_secs(8));
        assert_eq!(retry_delay(base, 3, cap, 0.0), Duration::from_secs(4));
        assert_eq!(retry_delay(base, 30, cap, 1.0), cap);
    }
}
