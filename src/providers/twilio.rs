//! The Twilio provider: the Messages (and Calls) HTTP API shape, against a
//! configurable base URL, so tests point it at a local fake.
//!
//! Delivery arrives later on Herald's status callback, which checks
//! `X-Twilio-Signature`: base64 HMAC-SHA1, under the auth token, of the full
//! callback URL followed by every POST parameter, sorted by name, as
//! `name` + `value`.

use async_trait::async_trait;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha1::Sha1;

use super::{classify_http_status, transport_error, OutboundMessage, Provider};
use crate::domain::{Channel, ExecutionStatus, SendResult};

pub struct TwilioAccount {
    pub base_url: String,
    pub account_sid: String,
    pub auth_token: String,
    pub from: String,
}

pub struct Twilio {
    http: reqwest::Client,
    account: TwilioAccount,
    status_callback: String,
}

#[derive(Debug, Deserialize)]
struct Created {
    sid: String,
}

impl Twilio {
    pub fn new(http: reqwest::Client, account: TwilioAccount, status_callback: String) -> Self {
        Self {
            http,
            account,
            status_callback,
        }
    }
}

/// Twilio's request signature for `url` and form `params`.
pub fn signature(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    let mut mac = Hmac::<Sha1>::new_from_slice(auth_token.as_bytes()).expect("HMAC takes any key");
    mac.update(url.as_bytes());
    for (name, value) in sorted {
        mac.update(name.as_bytes());
        mac.update(value.as_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Maps a Twilio message status to a receipt: `Some(delivered?)` for final
/// statuses, `None` for intermediate ones (queued, sending, sent).
pub fn receipt_of(status: &str) -> Option<bool> {
    match status {
        "delivered" | "read" => Some(true),
        "undelivered" | "failed" => Some(false),
        _ => None,
    }
}

fn escape_xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[async_trait]
impl Provider for Twilio {
    async fn send(&self, message: &OutboundMessage) -> SendResult {
        let from = message
            .from
            .clone()
            .unwrap_or_else(|| self.account.from.clone());
        let (resource, mut form) = match message.channel {
            Channel::Voice => (
                "Calls",
                vec![(
                    "Twiml".to_owned(),
                    format!(
                        "<Response><Say>{}</Say></Response>",
                        escape_xml(&message.body)
                    ),
                )],
            ),
            _ => ("Messages", vec![("Body".to_owned(), message.body.clone())]),
        };
        form.push(("To".into(), message.to.clone()));
        form.push(("From".into(), from));
        form.push(("StatusCallback".into(), self.status_callback.clone()));
        let url = format!(
            "{}/2010-04-01/Accounts/{}/{resource}.json",
            self.account.base_url, self.account.account_sid
        );
        let response = self
            .http
            .post(url)
            .basic_auth(&self.account.account_sid, Some(&self.account.auth_token))
            .header("i-twilio-idempotency-token", &message.id)
            .form(&form)
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
        match serde_json::from_str::<Created>(&text) {
            Ok(created) => SendResult::Delivered {
                status: ExecutionStatus::Completed,
                provider_id: Some(created.sid),
                duration_seconds: None,
            },
            Err(_) => SendResult::Retriable {
                status: ExecutionStatus::Failed,
                provider_id: None,
                reason: "Twilio answered 2xx without a sid".into(),
            },
        }
    }
}

/// Whether `s` has the shape of a Twilio message or call sid: `SM`, `MM`
/// or `CA` and 32 hex digits.
pub fn is_sid(s: &str) -> bool {
    s.len() == 34
        && ["SM", "MM", "CA"].iter().any(|p| s.starts_with(p))
        && s[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sids_are_recognised_by_shape() {
        assert!(is_sid("SM0123456789abcdef0123456789ABCDEF"));
        assert!(is_sid("CA00000000000000000000000000000001"));
        assert!(!is_sid("SMunknown"));
        assert!(!is_sid("XX0123456789abcdef0123456789abcdef"));
        assert!(!is_sid("SM0123456789abcdef0123456789abcdeg"));
        assert!(!is_sid("SMé123456789abcdef0123456789abcde"));
    }

    /// The example from Twilio's security documentation.
    #[test]
    fn signature_matches_twilios_documented_example() {
        let params: Vec<(String, String)> = [
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675310"),
            ("Digits", "1234"),
            ("From", "+14158675310"),
            ("To", "+18005551212"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(
            signature(
                "12345",
                "https://mycompany.com/myapp.php?foo=1&bar=2",
                &params
            ),
            "GvWf1cFY/Q7PnoempGyD5oXAezc="
        );
    }

    #[test]
    fn statuses_map_to_receipts() {
        assert_eq!(receipt_of("delivered"), Some(true));
        assert_eq!(receipt_of("undelivered"), Some(false));
        assert_eq!(receipt_of("sent"), None);
    }
}
