//! The simulated provider: no account anywhere, deterministic from a seed.
//!
//! The outcome of a send is a pure function of `(seed, message id)`, so a
//! run replays identically, and a retry (a new attempt, so a new id) can
//! turn out differently, as with a real carrier.

use std::time::Duration;

use async_trait::async_trait;

use super::{OutboundMessage, Provider, ReceiptSender};
use crate::domain::{Channel, ExecutionStatus, ProviderSettings, SendResult};
use crate::store::Receipt;

pub struct Simulated {
    seed: u64,
    latency: Duration,
    /// Send outcomes and their weights.
    outcomes: Vec<(&'static str, f64)>,
    /// Probability that an accepted SMS is later reported delivered.
    delivered_ratio: f64,
    receipt_delay: Duration,
    channel: Channel,
    receipts: ReceiptSender,
}

const SMS_DEFAULT: [(&str, f64); 2] = [("sent", 0.97), ("failed", 0.03)];
const VOICE_DEFAULT: [(&str, f64); 5] = [
    ("completed", 0.70),
    ("voicemail", 0.08),
    ("no_answer", 0.12),
    ("busy", 0.06),
    ("failed", 0.04),
];

impl Simulated {
    pub fn new(settings: &ProviderSettings, channel: Channel, receipts: ReceiptSender) -> Self {
        let ProviderSettings::Simulated {
            seed,
            latency_ms,
            outcomes,
            receipt_delay_ms,
        } = settings
        else {
            unreachable!("built from simulated settings")
        };
        let defaults: &[(&str, f64)] = match channel {
            Channel::Voice => &VOICE_DEFAULT,
            _ => &SMS_DEFAULT,
        };
        let mut send_weights: Vec<(&'static str, f64)> = Vec::new();
        let mut delivered = 0.92;
        if let Some(weights) = outcomes {
            let mut receipt_weights = (0.0, 0.0);
            for known in crate::domain::campaign::SIMULATED_OUTCOMES {
                let Some(weight) = weights.get(known).copied() else {
                    continue;
                };
                match known {
                    "delivered" => receipt_weights.0 = weight,
                    "failed_delivery" => receipt_weights.1 = weight,
                    other => send_weights.push((other, weight)),
                }
            }
            if receipt_weights.0 + receipt_weights.1 > 0.0 {
                delivered = receipt_weights.0 / (receipt_weights.0 + receipt_weights.1);
            }
        }
        if send_weights.iter().map(|(_, w)| w).sum::<f64>() <= 0.0 {
            send_weights = defaults.to_vec();
        }
        Self {
            seed: seed.unwrap_or(42),
            latency: Duration::from_millis(latency_ms.unwrap_or(0)),
            outcomes: send_weights,
            delivered_ratio: delivered,
            receipt_delay: Duration::from_millis(receipt_delay_ms.unwrap_or(1000)),
            channel,
            receipts,
        }
    }

    /// A number in [0, 1) fixed by the seed, the message and a salt.
    fn unit(&self, id: &str, salt: u64) -> f64 {
        let mut h: u64 =
            0xcbf2_9ce4_8422_2325 ^ self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ salt;
        for b in id.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // splitmix64 finaliser spreads the bits.
        h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^= h >> 31;
        (h >> 11) as f64 / (1u64 << 53) as f64
    }

    fn pick(&self, id: &str) -> &'static str {
        let total: f64 = self.outcomes.iter().map(|(_, w)| w).sum();
        let mut r = self.unit(id, 1) * total;
        for (outcome, weight) in &self.outcomes {
            if r < *weight {
                return outcome;
            }
            r -= weight;
        }
        self.outcomes.last().map_or("sent", |(o, _)| o)
    }
}

#[async_trait]
impl Provider for Simulated {
    async fn send(&self, message: &OutboundMessage) -> SendResult {
        if !self.latency.is_zero() {
            let factor = 0.5 + self.unit(&message.id, 2);
            tokio::time::sleep(self.latency.mul_f64(factor)).await;
        }
        let provider_id = || {
            let prefix = if self.channel == Channel::Voice {
                "CA"
            } else {
                "SM"
            };
            // Ordered by execution and attempt: consecutive sends land next to
            // each other in the provider-id index, so a million-message run
            // does not scatter its index writes over every page.
            Some(format!(
                "{prefix}sim{:012}{:02}{:04x}",
                message.execution_id,
                message.attempt.min(99),
                self.seed & 0xffff
            ))
        };
        match self.pick(&message.id) {
            "sent" | "completed" => {
                let id = provider_id();
                if self.channel == Channel::Voice {
                    let duration = 10 + (self.unit(&message.id, 4) * 110.0) as i64;
                    return SendResult::Delivered {
                        status: ExecutionStatus::Completed,
                        provider_id: id,
                        duration_seconds: Some(duration),
                    };
                }
                let delivered = self.unit(&message.id, 5) < self.delivered_ratio;
                let receipt = Receipt {
                    provider_id: id.clone().expect("id set"),
                    delivered,
                    error: (!delivered).then(|| "simulated: handset unreachable".to_owned()),
                };
                let due = tokio::time::Instant::now() + self.receipt_delay;
                let _ = self.receipts.send((due, receipt));
                SendResult::Delivered {
                    status: ExecutionStatus::Completed,
                    provider_id: id,
                    duration_seconds: None,
                }
            }
            "voicemail" => SendResult::Delivered {
                status: ExecutionStatus::Voicemail,
                provider_id: provider_id(),
                duration_seconds: Some(20 + (self.unit(&message.id, 4) * 20.0) as i64),
            },
            "no_answer" => SendResult::Retriable {
                status: ExecutionStatus::NoAnswer,
                provider_id: provider_id(),
                reason: "No answer after 30 seconds".into(),
            },
            "busy" => SendResult::Retriable {
                status: ExecutionStatus::Busy,
                provider_id: provider_id(),
                reason: "Line busy".into(),
            },
            _ => SendResult::Permanent {
                provider_id: provider_id(),
                reason: "simulated: the carrier rejected the message".into(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(outcomes: Option<&[(&str, f64)]>, channel: Channel) -> Simulated {
        let settings = ProviderSettings::Simulated {
            seed: Some(7),
            latency_ms: None,
            outcomes: outcomes.map(|o| o.iter().map(|(k, v)| (k.to_string(), *v)).collect()),
            receipt_delay_ms: Some(0),
        };
        Simulated::new(&settings, channel, tokio::sync::mpsc::unbounded_channel().0)
    }

    #[test]
    fn the_same_message_always_gets_the_same_outcome() {
        let p = provider(None, Channel::Voice);
        for i in 0..100 {
            let id = format!("exe-{i}-1");
            assert_eq!(p.pick(&id), p.pick(&id));
        }
    }

    #[test]
    fn weights_shape_the_mix() {
        let p = provider(Some(&[("completed", 0.75), ("busy", 0.25)]), Channel::Voice);
        let busy = (0..10_000)
            .filter(|i| p.pick(&format!("m{i}")) == "busy")
            .count();
        assert!((2_200..2_800).contains(&busy), "{busy}");
        let only_failed = provider(Some(&[("failed", 1.0)]), Channel::Sms);
        assert!((0..100).all(|i| only_failed.pick(&format!("m{i}")) == "failed"));
    }
}
