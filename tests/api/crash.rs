//! Crash safety: SIGKILL the process that runs a campaign, start it again,
//! and check that no recipient was sent twice and every counter equals its
//! rows. The provider is a fake HTTP server in this test process that
//! counts what it receives.

use std::collections::HashMap;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::helpers::count_by_status;

const HERALD: &str = env!("CARGO_BIN_EXE_herald");

#[derive(Clone, Default)]
struct CountingProvider {
    by_recipient: Arc<Mutex<HashMap<String, u32>>>,
}

impl Respond for CountingProvider {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&request.body).unwrap();
        *self
            .by_recipient
            .lock()
            .unwrap()
            .entry(body["to"].as_str().unwrap().to_owned())
            .or_default() += 1;
        ResponseTemplate::new(200)
            .set_body_json(json!({"id": body["id"], "status": "sent"}))
            .set_delay(Duration::from_millis(15))
    }
}

fn start_herald(database_url: &str, port: u16) -> Child {
    crate::helpers::start_server_process(database_url, port)
}

async fn wait_until(what: &str, secs: u64, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_killed_worker_never_sends_twice_and_its_run_completes() {
    let dir = tempfile::tempdir().unwrap();
    let database_url = crate::helpers::fresh_database_url(dir.path()).await;
    let key_out = Command::new(HERALD)
        .args(["keys", "create", "--workspace", "crash"])
        .env("HERALD_DATABASE_URL", &database_url)
        .output()
        .unwrap();
    let key = String::from_utf8(key_out.stdout).unwrap().trim().to_owned();
    let fake = MockServer::start().await;
    let provider = CountingProvider::default();
    Mock::given(method("POST"))
        .respond_with(provider.clone())
        .mount(&fake)
        .await;

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let mut herald = start_herald(&database_url, port);
    wait_until("the server", 20, async || {
        client.get(format!("{base}/healthz")).send().await.is_ok()
    })
    .await;

    let campaign: Value = client
        .post(format!("{base}/v1/campaigns"))
        .bearer_auth(&key)
        .json(&json!({"name": "crash", "channel": "sms", "template": "Hi {{name}}",
                      "provider": {"kind": "webhook", "url": format!("{}/send", fake.uri()), "secret": "0123456789abcdef0123"}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = campaign["id"].clone();
    let mut csv = String::from("phone,name\n");
    for i in 0..1500 {
        csv.push_str(&format!("+1555{i:07},P{i}\n"));
    }
    let imported = client
        .post(format!("{base}/v1/campaigns/{id}/contacts:import"))
        .bearer_auth(&key)
        .header("content-type", "text/csv")
        .body(csv)
        .send()
        .await
        .unwrap();
    assert_eq!(imported.status(), StatusCode::OK);
    client
        .post(format!("{base}/v1/campaigns/{id}/start"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();

    let progress = async |client: &reqwest::Client| -> Value {
        client
            .get(format!("{base}/v1/campaigns/{id}"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    wait_until("some sends", 30, async || {
        progress(&client).await["progress"]["sent"]
            .as_i64()
            .unwrap()
            > 300
    })
    .await;
    herald.kill().unwrap(); // SIGKILL: no shutdown path runs.
    herald.wait().unwrap();
    let sent_before_crash: u32 = provider.by_recipient.lock().unwrap().values().sum();
    assert!(sent_before_crash < 1500, "the crash came mid-run");

    let mut herald = start_herald(&database_url, port);
    wait_until("the server again", 20, async || {
        client.get(format!("{base}/healthz")).send().await.is_ok()
    })
    .await;
    wait_until("the run to finish", 60, async || {
        progress(&client).await["status"] == "completed"
    })
    .await;
    let done = progress(&client).await;

    let counts = provider.by_recipient.lock().unwrap().clone();
    let duplicates: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        duplicates.is_empty(),
        "recipients sent twice: {duplicates:?}"
    );

    // Counters equal rows: read every execution back.
    let mut executions = Vec::new();
    for page in 1..=2 {
        let body: Value = client
            .get(format!(
                "{base}/api/v1/campaigns/{id}/executions?per_page=1000&page={page}"
            ))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        executions.extend(body["executions"].as_array().unwrap().iter().cloned());
    }
    herald.kill().unwrap();
    herald.wait().unwrap();
    assert_eq!(executions.len(), 1500);
    let by_status = count_by_status(&executions);
    let p = &done["progress"];
    assert_eq!(by_status["completed"], p["sent"].as_i64().unwrap());
    assert_eq!(
        by_status.get("failed").copied().unwrap_or(0),
        p["failed"].as_i64().unwrap()
    );
    assert_eq!(
        p["sent"].as_i64().unwrap() + p["failed"].as_i64().unwrap(),
        1500
    );
    assert_eq!(
        p["sent"].as_i64().unwrap(),
        counts.len() as i64 - lost_but_sent(&executions, &counts)
    );
    // What the dead worker had in flight is written off, never resent.
    let unknown = executions
        .iter()
        .filter(|e| {
            e["execution_data"]["error_details"]
                .as_str()
                .is_some_and(|s| s.starts_with("outcome unknown"))
        })
        .count();
    assert_eq!(unknown as i64, p["failed"].as_i64().unwrap());
    assert!(unknown <= 32, "at most one slice is lost: {unknown}");
}

/// Recipients the provider saw whose execution was written off because the
/// worker died before recording the answer.
fn lost_but_sent(executions: &[Value], counts: &HashMap<String, u32>) -> i64 {
    executions
        .iter()
        .filter(|e| {
            e["status"] == "failed" && counts.contains_key(e["contact_phone"].as_str().unwrap())
        })
        .count() as i64
}

/// SIGTERM mid-run: subscribers are told 1001, the process exits 0, the run
/// is released, and a restart finishes it with no recipient sent twice.
#[tokio::test]
async fn sigterm_drains_and_a_restart_finishes_the_run() {
    use futures::StreamExt;
    let dir = tempfile::tempdir().unwrap();
    let database_url = crate::helpers::fresh_database_url(dir.path()).await;
    let key = String::from_utf8(
        Command::new(HERALD)
            .args(["keys", "create", "--workspace", "drain"])
            .env("HERALD_DATABASE_URL", &database_url)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_owned();
    let fake = MockServer::start().await;
    let provider = CountingProvider::default();
    Mock::given(method("POST"))
        .respond_with(provider.clone())
        .mount(&fake)
        .await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let mut herald = start_herald(&database_url, port);
    wait_until("the server", 20, async || {
        client.get(format!("{base}/healthz")).send().await.is_ok()
    })
    .await;
    let campaign: Value = client
        .post(format!("{base}/v1/campaigns"))
        .bearer_auth(&key)
        .json(&json!({"name": "drain", "channel": "sms", "template": "Hi {{name}}",
                      "provider": {"kind": "webhook", "url": format!("{}/send", fake.uri()), "secret": "0123456789abcdef0123"}}))
        .send().await.unwrap().json().await.unwrap();
    let id = campaign["id"].clone();
    let mut csv = String::from("phone,name\n");
    for i in 0..1200 {
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
    let (mut socket, _) = tokio_tungstenite::connect_async(format!(
        "ws://127.0.0.1:{port}/ws/campaigns/{id}/progress?token={key}"
    ))
    .await
    .unwrap();
    client
        .post(format!("{base}/v1/campaigns/{id}/start"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    let sent = async |client: &reqwest::Client| -> i64 {
        let c: Value = client
            .get(format!("{base}/v1/campaigns/{id}"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        c["progress"]["sent"].as_i64().unwrap_or(0)
    };
    wait_until("some sends", 30, async || sent(&client).await > 200).await;

    let term = Command::new("kill")
        .args(["-TERM", &herald.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let mut close_code = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Ok(Some(frame)) = tokio::time::timeout_at(deadline, socket.next()).await {
        if let Ok(tokio_tungstenite::tungstenite::Message::Close(Some(frame))) = frame {
            close_code = Some(u16::from(frame.code));
            break;
        }
    }
    assert_eq!(
        close_code,
        Some(1001),
        "subscribers are told the server is going away"
    );
    let exited = Instant::now();
    let status = loop {
        if let Some(status) = herald.try_wait().unwrap() {
            break status;
        }
        assert!(
            exited.elapsed() < Duration::from_secs(15),
            "the node drains in time"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "a drained node exits 0: {status}");
    let at_stop: u32 = provider.by_recipient.lock().unwrap().values().sum();
    assert!(at_stop < 1200, "stopped mid-run");

    let mut herald = start_herald(&database_url, port);
    wait_until("the run to finish after restart", 60, async || {
        let c: Value = match client
            .get(format!("{base}/v1/campaigns/{id}"))
            .bearer_auth(&key)
            .send()
            .await
        {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        };
        c["status"] == "completed"
    })
    .await;
    let done: Value = client
        .get(format!("{base}/v1/campaigns/{id}"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    herald.kill().unwrap();
    herald.wait().unwrap();
    let counts = provider.by_recipient.lock().unwrap().clone();
    assert!(counts.values().all(|n| *n == 1), "no recipient sent twice");
    assert_eq!(
        counts.len(),
        1200,
        "a drain loses nothing: every recipient was sent once"
    );
    assert_eq!(done["progress"]["sent"], 1200);
}
