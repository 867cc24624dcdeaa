//! Campaigns: what is sent, through which provider, and the status machine
//! that every state change goes through.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// How a campaign reaches its recipients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    Sms,
    Voice,
    /// Work Herald does not execute; its producer posts progress events.
    External,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Sms => "sms",
            Channel::Voice => "voice",
            Channel::External => "external",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "sms" => Some(Channel::Sms),
            "voice" => Some(Channel::Voice),
            "external" => Some(Channel::External),
            _ => None,
        }
    }

    /// SMS and voice campaigns send a rendered message to each contact.
    pub fn sends_messages(self) -> bool {
        !matches!(self, Channel::External)
    }
}

/// The campaign status machine of DESIGN.md:
/// `draft → scheduled → running ⇄ paused → completed | cancelled | failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CampaignStatus {
    Draft,
    Scheduled,
    Running,
    Paused,
    Completed,
    Cancelled,
    Failed,
}

/// Something a user or the engine asks of a campaign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Schedule,
    Start,
    Pause,
    Resume,
    Cancel,
    /// A new run of a finished campaign (run again, or resend to failures).
    Rerun,
    Complete,
    Fail,
}

/// An action the current status does not allow; the API answers 409 with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {action} a campaign that is {current}")]
pub struct IllegalTransition {
    pub action: &'static str,
    pub current: CampaignStatus,
}

impl CampaignStatus {
    pub const ALL: [CampaignStatus; 7] = [
        CampaignStatus::Draft,
        CampaignStatus::Scheduled,
        CampaignStatus::Running,
        CampaignStatus::Paused,
        CampaignStatus::Completed,
        CampaignStatus::Cancelled,
        CampaignStatus::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CampaignStatus::Draft => "draft",
            CampaignStatus::Scheduled => "scheduled",
            CampaignStatus::Running => "running",
            CampaignStatus::Paused => "paused",
            CampaignStatus::Completed => "completed",
            CampaignStatus::Cancelled => "cancelled",
            CampaignStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            CampaignStatus::Completed | CampaignStatus::Cancelled | CampaignStatus::Failed
        )
    }

    /// Only a draft may be edited or deleted: once scheduled, what will be
    /// sent is fixed.
    pub fn is_editable(self) -> bool {
        self == CampaignStatus::Draft
    }

    /// The status `action` leads to, or why it is not allowed.
    pub fn apply(self, action: Action) -> Result<CampaignStatus, IllegalTransition> {
        use CampaignStatus::*;
        let next = match (self, action) {
            (Draft | Scheduled, Action::Schedule) => Some(Scheduled),
            (Draft | Scheduled, Action::Start) => Some(Running),
            (Running, Action::Pause) => Some(Paused),
            (Paused, Action::Resume) => Some(Running),
            (Scheduled | Running | Paused, Action::Cancel) => Some(Cancelled),
            (Completed | Cancelled | Failed, Action::Rerun) => Some(Running),
            (Running | Paused, Action::Complete) => Some(Completed),
            (Scheduled | Running | Paused, Action::Fail) => Some(Failed),
            _ => None,
        };
        next.ok_or(IllegalTransition {
            action: action.as_str(),
            current: self,
        })
    }
}

impl fmt::Display for CampaignStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Schedule => "schedule",
            Action::Start => "start",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Cancel => "cancel",
            Action::Rerun => "run again",
            Action::Complete => "complete",
            Action::Fail => "fail",
        }
    }
}

/// A campaign's display name: trimmed, 1 to 200 characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CampaignName(String);

impl CampaignName {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let name = raw.trim();
        if name.is_empty() {
            return Err("name must not be empty".into());
        }
        if name.chars().count() > 200 {
            return Err("name must be at most 200 characters".into());
        }
        if name.chars().any(char::is_control) {
            return Err("name must not contain control characters".into());
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Who a message appears to come from: an E.164 number, or for SMS an
/// alphanumeric sender id of at most 11 characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sender(String);

impl Sender {
    pub fn parse(raw: &str, channel: Channel) -> Result<Self, String> {
        let s = raw.trim();
        let is_number = s.len() >= 8
            && s.len() <= 16
            && s.starts_with('+')
            && s[1..].chars().all(|c| c.is_ascii_digit());
        if is_number {
            return Ok(Self(s.to_owned()));
        }
        let is_alphanumeric_id = !s.is_empty()
            && s.len() <= 11
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == ' ')
            && s.chars().any(|c| c.is_ascii_alphabetic());
        match channel {
            Channel::Sms if is_alphanumeric_id => Ok(Self(s.to_owned())),
            Channel::Sms => Err(
                "sender must be an E.164 number (+15550001234) or an alphanumeric id of at most 11 characters"
                    .into(),
            ),
            Channel::Voice => Err("a voice sender must be an E.164 number such as +15550001234".into()),
            Channel::External if !s.is_empty() && s.len() <= 64 => Ok(Self(s.to_owned())),
            Channel::External => Err("sender must be 1 to 64 characters".into()),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Retries per recipient: 1 (no retry) to 10.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxAttempts(u8);

impl MaxAttempts {
    pub const DEFAULT: MaxAttempts = MaxAttempts(3);

    pub fn parse(n: i64) -> Result<Self, String> {
        if (1..=10).contains(&n) {
            Ok(Self(n as u8))
        } else {
            Err(format!("max_attempts must be between 1 and 10, got {n}"))
        }
    }

    pub fn get(self) -> u8 {
        self.0
    }
}

/// Which provider delivers a campaign's messages, and how to reach it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum ProviderSettings {
    /// Deterministic fake provider: the default, so Herald runs with no account.
    Simulated {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seed: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        latency_ms: Option<u64>,
        /// Outcome weights, e.g. `{"completed": 0.9, "failed": 0.1}`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        outcomes: Option<BTreeMap<String, f64>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        receipt_delay_ms: Option<u64>,
    },
    /// Signed JSON POST to the user's own endpoint.
    Webhook { url: String, secret: String },
    /// The Twilio Messages API shape; `base_url` points at Twilio or a fake.
    Twilio {
        base_url: String,
        account_sid: String,
        auth_token: String,
        from: String,
    },
}

/// Outcomes the simulated provider may be told to produce.
pub const SIMULATED_OUTCOMES: [&str; 8] = [
    "completed",
    "sent",
    "failed",
    "no_answer",
    "busy",
    "voicemail",
    "delivered",
    "failed_delivery",
];

const REDACTED: &str = "********";

impl Default for ProviderSettings {
    fn default() -> Self {
        ProviderSettings::Simulated {
            seed: None,
            latency_ms: None,
            outcomes: None,
            receipt_delay_ms: None,
        }
    }
}

impl ProviderSettings {
    pub fn kind(&self) -> &'static str {
        match self {
            ProviderSettings::Simulated { .. } => "simulated",
            ProviderSettings::Webhook { .. } => "webhook",
            ProviderSettings::Twilio { .. } => "twilio",
        }
    }

    /// Checks values serde cannot: URLs, weights, limits. Returns the
    /// offending field (relative to `provider`) and why.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        match self {
            ProviderSettings::Simulated {
                latency_ms,
                outcomes,
                receipt_delay_ms,
                ..
            } => {
                if latency_ms.is_some_and(|ms| ms > 60_000) {
                    return Err(("latency_ms", "latency_ms must be at most 60000".into()));
                }
                if receipt_delay_ms.is_some_and(|ms| ms > 3_600_000) {
                    return Err((
                        "receipt_delay_ms",
                        "receipt_delay_ms must be at most 3600000".into(),
                    ));
                }
                if let Some(weights) = outcomes {
                    for (outcome, weight) in weights {
                        if !SIMULATED_OUTCOMES.contains(&outcome.as_str()) {
                            return Err((
                                "outcomes",
                                format!(
                                    "unknown outcome '{outcome}'; expected one of {}",
                                    SIMULATED_OUTCOMES.join(", ")
                                ),
                            ));
                        }
                        if !weight.is_finite() || *weight < 0.0 {
                            return Err((
                                "outcomes",
                                format!("weight of '{outcome}' must be a number ≥ 0"),
                            ));
                        }
                    }
                    if weights.values().sum::<f64>() <= 0.0 {
                        return Err(("outcomes", "outcome weights must not all be 0".into()));
                    }
                }
                Ok(())
            }
            ProviderSettings::Webhook { url, secret } => {
                check_http_url(url).map_err(|e| ("url", e))?;
                // Any shared secret signs; a short one is the user's choice.
                if secret.is_empty() || secret.len() > 1024 {
                    return Err(("secret", "secret must be 1 to 1024 characters".into()));
                }
                Ok(())
            }
            ProviderSettings::Twilio {
                base_url,
                account_sid,
                auth_token,
                from,
            } => {
                check_http_url(base_url).map_err(|e| ("base_url", e))?;
                if account_sid.trim().is_empty() {
                    return Err(("account_sid", "account_sid must not be empty".into()));
                }
                if auth_token.trim().is_empty() {
                    return Err(("auth_token", "auth_token must not be empty".into()));
                }
                if from.trim().is_empty() {
                    return Err(("from", "from must not be empty".into()));
                }
                Ok(())
            }
        }
    }

    /// The settings with secrets replaced, for API responses and logs.
    pub fn redacted(&self) -> Self {
        let mut copy = self.clone();
        match &mut copy {
            ProviderSettings::Simulated { .. } => {}
            ProviderSettings::Webhook { secret, .. } => *secret = REDACTED.into(),
            ProviderSettings::Twilio { auth_token, .. } => *auth_token = REDACTED.into(),
        }
        copy
    }
}

fn check_http_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("'{url}' is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(format!("'{url}' must be an http(s) URL with a host"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use CampaignStatus::*;

    #[test]
    fn happy_path_through_the_machine() {
        let s = Draft.apply(Action::Schedule).unwrap();
        let s = s.apply(Action::Start).unwrap();
        let s = s.apply(Action::Pause).unwrap();
        let s = s.apply(Action::Resume).unwrap();
        assert_eq!(s.apply(Action::Complete).unwrap(), Completed);
    }

    #[test]
    fn illegal_transitions_name_the_current_status() {
        let err = Draft.apply(Action::Pause).unwrap_err();
        assert_eq!(err.current, Draft);
        assert_eq!(err.to_string(), "cannot pause a campaign that is draft");
        for terminal in [Completed, Cancelled, Failed] {
            for action in [
                Action::Schedule,
                Action::Start,
                Action::Pause,
                Action::Resume,
                Action::Cancel,
            ] {
                assert!(terminal.apply(action).is_err(), "{terminal} {action:?}");
            }
            assert_eq!(terminal.apply(Action::Rerun).unwrap(), Running);
        }
        assert!(Running.apply(Action::Rerun).is_err());
        assert!(Paused.apply(Action::Pause).is_err());
        assert!(Running.apply(Action::Resume).is_err());
        assert!(Draft.apply(Action::Cancel).is_err());
    }

    #[test]
    fn only_drafts_are_editable() {
        for status in CampaignStatus::ALL {
            assert_eq!(status.is_editable(), status == Draft);
            assert_eq!(CampaignStatus::parse(status.as_str()), Some(status));
        }
    }

    #[test]
    fn senders_follow_the_channel() {
        assert!(Sender::parse("+15550001234", Channel::Voice).is_ok());
        assert!(Sender::parse("ACME", Channel::Sms).is_ok());
        assert!(Sender::parse("ACME", Channel::Voice).is_err());
        assert!(Sender::parse("TOOLONGSENDERID", Channel::Sms).is_err());
        assert!(Sender::parse("12345", Channel::Sms).is_err());
    }

    #[test]
    fn provider_settings_are_checked_and_redacted() {
        let p: ProviderSettings = serde_json::from_str(
            r#"{"kind":"webhook","url":"http://127.0.0.1:9/hook","secret":"0123456789abcdef"}"#,
        )
        .unwrap();
        assert!(p.check().is_ok());
        let shown = serde_json::to_value(p.redacted()).unwrap();
        assert_eq!(shown["secret"], "********");

        let bad: ProviderSettings =
            serde_json::from_str(r#"{"kind":"simulated","outcomes":{"exploded":1.0}}"#).unwrap();
        assert_eq!(bad.check().unwrap_err().0, "outcomes");
        let empty_secret: ProviderSettings =
            serde_json::from_str(r#"{"kind":"webhook","url":"http://127.0.0.1:9/h","secret":""}"#)
                .unwrap();
        assert_eq!(empty_secret.check().unwrap_err().0, "secret");
        let bad_url: ProviderSettings = serde_json::from_str(
            r#"{"kind":"webhook","url":"ftp://x","secret":"0123456789abcdef"}"#,
        )
        .unwrap();
        assert_eq!(bad_url.check().unwrap_err().0, "url");
    }

    #[test]
    fn max_attempts_bounds() {
        assert!(MaxAttempts::parse(0).is_err());
        assert_eq!(MaxAttempts::parse(1).unwrap().get(), 1);
        assert!(MaxAttempts::parse(11).is_err());
    }
}
