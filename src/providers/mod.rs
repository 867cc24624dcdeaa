//! Providers deliver one message or call each. The engine only sees the
//! [`Provider`] trait and a [`SendResult`]; how a provider classifies its
//! answers (retriable or not, misconfigured or not) is its own business.

pub mod simulated;
pub mod twilio;
pub mod webhook;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::domain::{Channel, ProviderSettings, SendResult};
use crate::store::Receipt;

/// One send, as every provider receives it.
#[derive(Debug, Clone, Serialize)]
pub struct OutboundMessage {
    /// Unique per execution and attempt: a provider that sees it twice may
    /// drop the second.
    pub id: String,
    pub channel: Channel,
    pub to: String,
    pub from: Option<String>,
    pub body: String,
    pub campaign_id: i64,
    pub run_id: String,
    pub execution_id: i64,
    pub attempt: i64,
}

#[async_trait]
pub trait Provider: Send + Sync {
    async fn send(&self, message: &OutboundMessage) -> SendResult;
}

/// Where providers that learn of deliveries later (the simulated one) put
/// their receipts, with the time they are due.
pub type ReceiptSender = mpsc::UnboundedSender<(tokio::time::Instant, Receipt)>;

/// Shared by every provider a node builds.
#[derive(Clone)]
pub struct ProviderContext {
    pub http: reqwest::Client,
    pub receipts: ReceiptSender,
    /// Base URL providers call back on (Twilio's StatusCallback).
    pub public_url: String,
}

impl ProviderContext {
    pub fn new(receipts: ReceiptSender, public_url: String, timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(64)
            .build()
            .expect("HTTP client builds");
        Self {
            http,
            receipts,
            public_url,
        }
    }
}

/// Builds the provider a run's frozen settings name.
pub fn build(
    settings: &ProviderSettings,
    channel: Channel,
    ctx: &ProviderContext,
) -> Arc<dyn Provider> {
    match settings {
        ProviderSettings::Simulated { .. } => Arc::new(simulated::Simulated::new(
            settings,
            channel,
            ctx.receipts.clone(),
        )),
        ProviderSettings::Webhook { url, secret } => Arc::new(webhook::Webhook::new(
            ctx.http.clone(),
            url.clone(),
            secret.clone(),
        )),
        ProviderSettings::Twilio {
            base_url,
            account_sid,
            auth_token,
            from,
        } => Arc::new(twilio::Twilio::new(
            ctx.http.clone(),
            twilio::TwilioAccount {
                base_url: base_url.trim_end_matches('/').to_owned(),
                account_sid: account_sid.clone(),
                auth_token: auth_token.clone(),
                from: from.clone(),
            },
            format!(
                "{}/v1/providers/twilio/status",
                ctx.public_url.trim_end_matches('/')
            ),
        )),
    }
}

/// Classifies an HTTP failure the way every HTTP provider should. A 429
/// or 503 may say when to come back (`Retry-After`); the retry waits at
/// least that long.
pub(crate) fn classify_http_status(
    status: reqwest::StatusCode,
    headers: &reqwest::header::HeaderMap,
    detail: &str,
) -> SendResult {
    use crate::domain::ExecutionStatus;
    let reason = format!("provider answered {status}: {}", truncate(detail, 200));
    if status == reqwest::StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        match headers
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry_after(v, chrono::Utc::now()))
        {
            Some(wait) => SendResult::RetryAfter { wait, reason },
            None => SendResult::Retriable {
                status: ExecutionStatus::Failed,
                provider_id: None,
                reason,
            },
        }
    } else if matches!(status.as_u16(), 401 | 403 | 404) {
        SendResult::Misconfigured { reason }
    } else {
        SendResult::Permanent {
            provider_id: None,
            reason,
        }
    }
}

/// Reads a `Retry-After` value: seconds, or an HTTP date (RFC 9110).
fn retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    Some(
        (at.with_timezone(&chrono::Utc) - now)
            .to_std()
            .unwrap_or(Duration::ZERO),
    )
}

/// Classifies a request that got no HTTP answer. Only a failure to
/// connect proves the provider never saw the send, so only that is
/// retried; a timeout or a reset after the request went out may have left
/// the message on its way, and sending it again could reach the recipient
/// twice.
pub(crate) fn transport_error(err: &reqwest::Error) -> SendResult {
    if err.is_connect() {
        return SendResult::Retriable {
            status: crate::domain::ExecutionStatus::Failed,
            provider_id: None,
            reason: "could not connect to the provider".into(),
        };
    }
    let what = if err.is_timeout() {
        "the provider did not answer in time"
    } else {
        "the connection to the provider failed mid-request"
    };
    SendResult::Unknown {
        reason: what.into(),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_read_as_seconds_or_an_http_date() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-30T08:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            retry_after("Mon, 30 Nov 2026 08:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        // A date already past means "now".
        assert_eq!(
            retry_after("Mon, 30 Nov 2026 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after("soon", now), None);
        assert_eq!(retry_after("-5", now), None);
    }
}
