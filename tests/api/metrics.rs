//! `/metrics` scraped from a real server process during and after a run;
//! the Prometheus text is parsed and its counters checked against the run.

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const HERALD: &str = env!("CARGO_BIN_EXE_herald");

/// Parses Prometheus text format: `name{labels} value` → value, keyed by
/// the name and the label set as written.
pub fn parse(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("a sample is 'series value'");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        samples.insert(series.to_owned(), value);
    }
    samples
}

/// Sums the samples of `name` whose labels include every `labels` pair.
pub fn sum(samples: &HashMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(series, _)| {
            series.split('{').next() == Some(name)
                && labels
                    .iter()
                    .all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|(_, v)| v)
        .sum()
}

#[tokio::test]
async fn metrics_count_what_a_run_did() {
    let dir = tempfile::tempdir().unwrap();
    let url = crate::helpers::fresh_database_url(dir.path()).await;
    let key_out = Command::new(HERALD)
        .args(["keys", "create", "--workspace", "m"])
        .env("HERALD_DATABASE_URL", &url)
        .output()
        .unwrap();
    let key = String::from_utf8(key_out.stdout).unwrap().trim().to_owned();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = crate::helpers::start_server_process(&url, port);
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let campaign: Value = client
        .post(format!("{base}/v1/campaigns"))
        .bearer_auth(&key)
        .json(&json!({"name": "m", "channel": "voice", "template": "Hi {{name}}", "sender": "+15550001234", "max_attempts": 2,
                      "provider": {"kind": "simulated", "outcomes": {"completed": 0.6, "busy": 0.4}}}))
        .send().await.unwrap().json().await.unwrap();
    let id = campaign["id"].clone();
    let mut csv = String::from("phone,name\n");
    for i in 0..400 {
        csv.push_str(&format!("+1555{i:07},P{i}\n"));
    }
    client
        .post(format!("{base}/v1/campaigns/{id}/contacts:import"))
        .bearer_auth(&key)
        .header("content-type", "text/csv")
        .body(csv)
        .send()
        .await
        .unwrap();
    client
        .post(format!("{base}/v1/campaigns/{id}/start"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    let done = loop {
        let c: Value = client
            .get(format!("{base}/v1/campaigns/{id}"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if c["status"] == "completed" {
            break c;
        }
        assert!(
            Instant::now() < deadline + Duration::from_secs(60),
            "run did not finish"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let response = client.get(format!("{base}/metrics")).send().await.unwrap();
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let samples = parse(&response.text().await.unwrap());
    server.kill().unwrap();
    server.wait().unwrap();

    let sent = done["progress"]["sent"].as_f64().unwrap();
    let failed = done["progress"]["failed"].as_f64().unwrap();
    let voice = [("channel", "voice"), ("provider", "simulated")];
    assert_eq!(
        sum(
            &samples,
            "herald_sends_total",
            &[voice[0], voice[1], ("outcome", "completed")]
        ),
        sent
    );
    assert_eq!(
        sum(
            &samples,
            "herald_sends_total",
            &[voice[0], ("outcome", "busy")]
        ),
        failed
    );
    let retries = sum(&samples, "herald_retries_total", &[]);
    assert_eq!(
        sum(&samples, "herald_sends_total", &[("outcome", "retry")]),
        retries
    );
    assert!(retries > 0.0, "busy was retried once each");
    assert_eq!(
        sum(
            &samples,
            "herald_runs_finished_total",
            &[("status", "completed")]
        ),
        1.0
    );
    assert_eq!(sum(&samples, "herald_runs_claimed_total", &[]), 1.0);
    assert!(sum(&samples, "herald_provider_latency_seconds_count", &[]) >= sent + failed);
    assert!(
        sum(
            &samples,
            "herald_http_requests_total",
            &[("route", "/v1/campaigns/{id}"), ("status", "200")]
        ) >= 1.0
    );
    assert_eq!(
        sum(
            &samples,
            "herald_http_requests_total",
            &[("route", "/v1/campaigns/{id}/start")]
        ),
        1.0
    );
    assert!(
        sum(
            &samples,
            "herald_http_request_duration_seconds_count",
            &[("route", "/v1/campaigns")]
        ) >= 1.0
    );
    // Database pools: SQLite has a single writer and readers beside it,
    // Postgres one pool; each pool's connections are in use or idle.
    let pools: &[&str] = if crate::helpers::backend_is_postgres() {
        &["main"]
    } else {
        &["writer", "reader"]
    };
    for pool in pools {
        let max = sum(&samples, "herald_db_connections_max", &[("pool", pool)]);
        let open = sum(&samples, "herald_db_connections", &[("pool", pool)]);
        assert!(max >= 1.0, "{pool}: max {max}");
        assert!(open >= 1.0 && open <= max, "{pool}: {open} of {max}");
    }
    if !crate::helpers::backend_is_postgres() {
        assert_eq!(
            sum(&samples, "herald_db_connections_max", &[("pool", "writer")]),
            1.0,
            "one SQLite writer"
        );
    }
    // No unbounded labels: no campaign id or key appears in any series.
    assert!(samples
        .keys()
        .all(|series| !series.contains(&key) && !series.contains("campaign_id")));
}

/// JSON logs: a run's lines carry its ids in a `run` span and each slice's
/// in a `slice` span naming its batches; keys appear by prefix only and
/// phone numbers never in full.
#[tokio::test]
async fn json_logs_carry_run_and_batch_spans_and_no_secrets() {
    use crate::process::{create_campaign, create_key, Node, NodeOptions};
    let dir = tempfile::tempdir().unwrap();
    let database_url = crate::helpers::fresh_database_url(dir.path()).await;
    let log = dir.path().join("herald.log");
    let key = create_key(&database_url, "logs");
    let options = NodeOptions {
        json_logs: true,
        ..Default::default()
    };
    let mut herald = Node::start(&database_url, options, &log).await;
    let provider = serde_json::json!({"kind": "simulated", "seed": 3, "receipt_delay_ms": 0});
    let id = create_campaign(&herald, &key, provider, 1500).await;
    herald.start_campaign(&key, id).await;
    herald
        .wait_for(&key, id, 60, |c| c["status"] == "completed")
        .await;
    // A graceful stop: the run's last lines are written before the exit.
    herald.terminate();
    assert!(herald.exited(Duration::from_secs(15)).await.success());

    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let finished = lines
        .iter()
        .find(|l| l["fields"]["message"] == "run finished")
        .expect("a 'run finished' line");
    let run_span = finished["spans"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "run")
        .expect("the run span");
    assert_eq!(run_span["campaign"], id);
    assert!(run_span["run"].is_i64());
    // Each slice's line (debug, on here) is inside a span naming its batches.
    let in_slice = lines
        .iter()
        .filter_map(|l| l["spans"].as_array())
        .flatten()
        .filter(|s| s["name"] == "slice")
        .count();
    assert!(in_slice > 0, "some line carries a slice span");
    assert!(!text.contains(&key), "no full key in the logs");
    let prefix = key.split('_').nth(1).unwrap();
    assert!(text.contains(prefix), "keys appear by prefix");
    assert!(!text.contains("+15550000001"), "no full phone number");
}
