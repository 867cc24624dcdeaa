//! The webhook provider: a signed JSON POST to the user's own endpoint.
//!
//! Body: the [`OutboundMessage`] as JSON. Headers: `X-Herald-Timestamp`
//! (Unix seconds) and `X-Herald-Signature: sha256=<hex>`, the HMAC-SHA256 of
//! `"{timestamp}.{body}"` under the campaign's secret. The receiver answers
//! 2xx with `{"id": "<its message id>", "status": "sent"|"completed"|
//! "voicemail"|"no_answer"|"busy"|"failed"}`; `status` defaults to `sent`.

use async_trait::async_trait;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use super::{classify_http_status, transport_error, OutboundMessage, Provider};
use crate::domain::{ExecutionStatus, SendResult};

pub struct Webhook {
    http: reqwest::Client,
    url: String,
    secret: String,
}

#[derive(Debug, Deserialize, Default)]
struct Reply {
    id: Option<String>,
    status: Option<String>,
    duration_seconds: Option<i64>,
    error: Option<String>,
}

/// `sha256=<hex>` of `"{timestamp}.{body}"`; receivers recompute it.
pub fn signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

impl Webhook {
    pub fn new(http: reqwest::Client, url: String, secret: String) -> Self {
        Self { http, url, secret }
    }
}

#[async_trait]
impl Provider for Webhook {
    async fn send(&self, message: &OutboundMessage) -> SendResult {
        let body = serde_json::to_vec(message).expect("message serialises");
        let timestamp = chrono::Utc::now().timestamp();
        let response = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .header("x-herald-timestamp", timestamp.to_string())
            .header(
                "x-herald-signature",
                signature(&self.secret, timestamp, &body),
            )
            .header("idempotency-key", &message.id)
            .body(body)
            .send()
            .await;
        let response = match response {
            Ok(r) => r,
            Err(err) => return transport_error(&err),
        };
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap_or_default();
        if !status.is_success() {
            return classify_http_status(status, &headers, &text);
        }
        let reply: Reply =
            if text.trim().is_empty() {
                Reply::default()
            } else {
                match serde_json::from_str(&text) {
                    Ok(reply) => reply,
                    Err(_) => return SendResult::Retriable {
                        status: ExecutionStatus::Failed,
                        provider_id: None,
                        reason:
                            "the webhook answered 2xx with a body that is not the documented JSON"
                                .into(),
                    },
                }
            };
        let reason = || {
            reply
                .error
                .clone()
                .unwrap_or_else(|| "rejected by the webhook".into())
        };
        match reply.status.as_deref().unwrap_or("sent") {
            "sent" | "queued" | "accepted" | "completed" | "delivered" => SendResult::Delivered {
                status: ExecutionStatus::Completed,
                provider_id: reply.id,
                duration_seconds: reply.duration_seconds,
            },
            "voicemail" => SendResult::Delivered {
                status: ExecutionStatus::Voicemail,
                provider_id: reply.id,
                duration_seconds: reply.duration_seconds,
            },
            "no_answer" => SendResult::Retriable {
                status: ExecutionStatus::NoAnswer,
                provider_id: reply.id,
                reason: reply.error.unwrap_or_else(|| "No answer".into()),
            },
            "busy" => SendResult::Retriable {
                status: ExecutionStatus::Busy,
                provider_id: reply.id,
                reason: reply.error.unwrap_or_else(|| "Line busy".into()),
            },
            "failed" => SendResult::Permanent {
                provider_id: reply.id.clone(),
                reason: reason(),
            },
            other => SendResult::Permanent {
                provider_id: reply.id.clone(),
                reason: format!("the webhook answered an unknown status '{other}'"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_stable_and_keyed() {
        let a = signature("0123456789abcdef", 1700000000, b"{}");
        assert_eq!(a, signature("0123456789abcdef", 1700000000, b"{}"));
        assert_ne!(a, signature("another-secret-00", 1700000000, b"{}"));
        assert_ne!(a, signature("0123456789abcdef", 1700000001, b"{}"));
        assert!(a.starts_with("sha256=") && a.len() == 7 + 64);
    }
}
