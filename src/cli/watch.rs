//! `herald watch CAMPAIGN`: a live progress bar over the seed-000
//! WebSocket, reconnecting with backoff and resuming with `since`.
//!
//! Exit codes, for scripts: 0 completed, 1 failed, 2 cancelled, 3 refused
//! (bad key or unknown campaign).

use std::process::ExitCode;
use std::time::Duration;

use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use super::remote::Remote;

pub async fn watch(remote: Remote, campaign: String, json: bool) -> anyhow::Result<ExitCode> {
    let ws_base = remote.url.trim_end_matches('/').replacen("http", "ws", 1);
    let bar = ProgressBar::hidden();
    if !json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{bar:40}] {pos}/{len} {percent}% {per_sec} eta {eta}\n  {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
    }
    let mut since: Option<i64> = None;
    let mut backoff = Duration::from_millis(250);
    loop {
        let url = match since {
            Some(seq) => format!(
                "{ws_base}/ws/campaigns/{campaign}/progress?token={}&since={seq}",
                remote.key
            ),
            None => format!(
                "{ws_base}/ws/campaigns/{campaign}/progress?token={}",
                remote.key
            ),
        };
        let mut socket = match tokio_tungstenite::connect_async(&url).await {
            Ok((socket, _)) => {
                backoff = Duration::from_millis(250);
                socket
            }
            Err(err) => {
                bar.set_message(format!("reconnecting in {backoff:?}: {err}"));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        while let Some(frame) = socket.next().await {
            let text = match frame {
                Ok(Message::Text(text)) => text,
                Ok(Message::Close(Some(close))) => {
                    let code: u16 = close.code.into();
                    if code == 1008 || code == 4004 {
                        bar.abandon();
                        eprintln!("herald watch: refused ({code}): {}", close.reason);
                        return Ok(ExitCode::from(3));
                    }
                    break;
                }
                Ok(_) => continue,
                Err(_) => break,
            };
            if json {
                println!("{text}");
            }
            let Ok(message) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            if let Some(seq) = message["seq"].as_i64() {
                since = Some(since.map_or(seq, |s| s.max(seq)));
            }
            if !matches!(
                message["type"].as_str(),
                Some("initial_progress" | "progress_update")
            ) {
                continue;
            }
            let data = &message["data"];
            let p = &data["progress"];
            let total = p["total_contacts"].as_u64().unwrap_or(0);
            let done = p["completed"].as_u64().unwrap_or(0) + p["failed"].as_u64().unwrap_or(0);
            bar.set_length(total.max(1));
            bar.set_position(done.min(total));
            let status = data["status"].as_str().unwrap_or("unknown").to_owned();
            bar.set_message(format!(
                "{status}: {} sent, {} failed, {} in flight, {} pending, success {}%",
                p["completed"], p["failed"], p["processing"], p["pending"], p["success_rate"]
            ));
            let code = match status.as_str() {
                "completed" => Some(0),
                "failed" => Some(1),
                "cancelled" => Some(2),
                _ => None,
            };
            if let Some(code) = code {
                bar.finish();
                if !json {
                    eprintln!("campaign {campaign} {status}");
                }
                return Ok(ExitCode::from(code));
            }
        }
        bar.set_message(format!("connection lost; reconnecting in {backoff:?}"));
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}
