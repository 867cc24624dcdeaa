//! A bounded soak: one `herald` process runs campaign after campaign for a
//! minute while WebSocket subscribers come and go, and its memory, its open
//! file descriptors and its log stay clean. (Longer soaks are a matter of
//! `SOAK_SECONDS`; CI runs one minute per backend.)

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};

use crate::helpers::fresh_database_url;
use crate::process::{create_campaign, create_key, rss_of, Node, NodeOptions};

const SOAK_SECONDS: u64 = 60;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[tokio::test]
async fn a_minute_of_campaigns_and_subscribers_leaves_memory_fds_and_logs_clean() {
    let dir = tempfile::tempdir().unwrap();
    let database_url = fresh_database_url(dir.path()).await;
    let key = create_key(&database_url, "soak");
    let log = dir.path().join("herald.log");
    let options = NodeOptions {
        in_flight: 16,
        ..NodeOptions::default()
    };
    let node = Node::start(&database_url, options, &log).await;
    let provider = json!({"kind": "simulated", "latency_ms": 5, "receipt_delay_ms": 100});
    let client = reqwest::Client::new();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(SOAK_SECONDS);

    // Subscribers: each follows the newest campaign for a moment, leaves,
    // and comes back, until the soak ends.
    let newest = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let mut subscribers = tokio::task::JoinSet::new();
    for n in 0..16u64 {
        let (newest, ws_base, key) = (
            newest.clone(),
            node.base.replacen("http", "ws", 1),
            key.clone(),
        );
        subscribers.spawn(async move {
            let mut frames = 0u64;
            while Instant::now() < deadline {
                let id = newest.load(std::sync::atomic::Ordering::Relaxed);
                if id == 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                let url = format!("{ws_base}/ws/campaigns/{id}/progress?token={key}");
                let Ok((mut socket, _)) = tokio_tungstenite::connect_async(&url).await else {
                    continue;
                };
                let stay = Duration::from_millis(300 + 70 * n);
                let until = tokio::time::Instant::now() + stay;
                while let Ok(Some(Ok(_))) = tokio::time::timeout_at(until, socket.next()).await {
                    frames += 1;
                }
            }
            frames
        });
    }

    let mut campaigns = Vec::new();
    let mut baseline = None;
    while Instant::now() < deadline {
        let id = create_campaign(&node, &key, provider.clone(), 300).await;
        node.start_campaign(&key, id).await;
        newest.store(id, std::sync::atomic::Ordering::Relaxed);
        campaigns.push(id);
        // The baseline is taken once everything has been exercised.
        if baseline.is_none() && started.elapsed() > Duration::from_secs(10) {
            baseline = Some((rss_of(node.pid()), open_fds(node.pid())));
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let mut frames = 0;
    while let Some(seen) = subscribers.join_next().await {
        frames += seen.unwrap();
    }

    // Every campaign finishes with every recipient accounted for.
    for &id in &campaigns {
        let done = node
            .wait_for(&key, id, 60, |c| c["status"] == "completed")
            .await;
        let p = &done["progress"];
        assert_eq!(
            p["sent"].as_i64().unwrap() + p["failed"].as_i64().unwrap(),
            300,
            "{done}"
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss_start, fds_start) = baseline.expect("the soak ran past its warm-up");
    let (rss_end, fds_end) = (rss_of(node.pid()), open_fds(node.pid()));
    let mib = |bytes: u64| bytes as f64 / 1048576.0;
    println!(
        "soak: {} campaigns × 300 recipients and {frames} frames to coming and going \
         subscribers in {SOAK_SECONDS} s; RSS {:.1} → {:.1} MiB, open fds {fds_start} → {fds_end}",
        campaigns.len(),
        mib(rss_start),
        mib(rss_end)
    );
    assert!(campaigns.len() >= 20, "{} campaigns", campaigns.len());
    assert!(frames > 100, "subscribers received progress: {frames}");
    assert!(
        rss_end < rss_start + 24 * 1024 * 1024,
        "memory stays flat: {rss_start} → {rss_end} bytes"
    );
    assert!(
        fds_end <= fds_start + 8,
        "no descriptor leaks: {fds_start} → {fds_end}"
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    let errors: Vec<&str> = logged.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(errors.is_empty(), "error logs: {errors:#?}");
    let health: Value = client
        .get(format!("{}/healthz", node.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(health.is_object());
}
