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

/// Classifies an HTTP failure the way every HTTP provider should.
pub(crate) fn classify_http_status(status: reqwest::StatusCode, detail: &str) -> SendResult {
    use crate::domain::ExecutionStatus;
    let reason = format!("provider answered {status}: {}", truncate(detail, 200));
    if status == reqwest::StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        SendResult::Retriable {
            status: ExecutionStatus::Failed,
            provider_id: None,
            reason,
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
