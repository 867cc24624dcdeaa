//! Live streams with real WebSocket clients (tokio-tungstenite) and SSE,
//! against real campaigns: every seed message type and close code, replay
//! with `since`, coalescing, limits and bad input.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{error_of, spawn_app_with, TestApp};

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Client {
    socket: Socket,
}

impl Client {
    async fn connect(app: &TestApp, path: &str) -> Self {
        let url = format!("{}{}", app.base.replacen("http", "ws", 1), path);
        let (socket, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket connects");
        Self { socket }
    }

    /// The next JSON message, skipping pings; panics after `secs`.
    async fn next(&mut self, secs: u64) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let message = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .expect("a message in time")
                .expect("socket open")
                .expect("frame");
            match message {
                Message::Text(text) => return serde_json::from_str(&text).unwrap(),
                Message::Close(frame) => panic!("closed: {frame:?}"),
                _ => continue,
            }
        }
    }

    /// Messages until one satisfies `done` (included), within `secs`.
    async fn until(&mut self, secs: u64, done: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut seen = Vec::new();
        loop {
            let message = self.next(secs).await;
            let stop = done(&message);
            seen.push(message);
            if stop {
                return seen;
            }
        }
    }

    async fn send(&mut self, value: Value) {
        self.socket
            .send(Message::Text(value.to_string().into()))
            .await
            .unwrap();
    }

    /// Waits for the server's close frame: its code and reason.
    async fn closed(&mut self, secs: u64) -> (u16, String) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            match tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .expect("closed in time")
            {
                Some(Ok(Message::Close(Some(frame)))) => {
                    return (frame.code.into(), frame.reason.to_string())
                }
                Some(Ok(Message::Close(None))) | None | Some(Err(_)) => return (0, String::new()),
                Some(Ok(_)) => continue,
            }
        }
    }
}

fn slow_engine_app(
    configure: impl FnOnce(&mut herald::startup::ServerConfig) + Send,
) -> impl std::future::Future<Output = TestApp> {
    spawn_app_with(move |c| {
        if let Some(engine) = c.engine.as_mut() {
            engine.in_flight = 16;
            engine.slice = 64;
        }
        c.api.streams.coalesce = Duration::from_millis(100);
        configure(c);
    })
}

async fn slow_campaign(app: &TestApp, n: usize) -> Value {
    app.campaign_with_contacts(
        json!({"channel": "sms", "template": "Hi {{name}}",
               "provider": {"kind": "simulated", "latency_ms": 10, "receipt_delay_ms": 0}}),
        n,
    )
    .await
}

fn seqs(messages: &[Value]) -> Vec<i64> {
    messages.iter().filter_map(|m| m["seq"].as_i64()).collect()
}

fn strictly_increasing(seqs: &[i64]) -> bool {
    seqs.windows(2).all(|w| w[0] < w[1])
}

#[tokio::test]
async fn seed_000_streams_a_campaign_from_draft_to_completed() {
    let app = slow_engine_app(|_| {}).await;
    let c = slow_campaign(&app, 1200).await;
    let id = c["id"].as_i64().unwrap();
    let mut ws = Client::connect(
        &app,
        &format!("/ws/campaigns/{id}/progress?token={}", app.key),
    )
    .await;

    let ack = ws.next(5).await;
    assert_eq!(ack["type"], "connection_ack");
    assert_eq!(ack["campaign_id"], id);
    assert!(ack["timestamp"].is_f64());
    let initial = ws.next(5).await;
    assert_eq!(initial["type"], "initial_progress");
    let data = &initial["data"];
    assert_eq!(data["campaign_id"], id);
    assert_eq!(data["status"], "draft");
    assert_eq!(data["progress"]["total_contacts"], 1200);
    assert_eq!(data["progress"]["pending"], 1200);
    assert_eq!(data["recent_activity"], json!([]));
    for field in [
        "completed",
        "failed",
        "processing",
        "pending",
        "total_contacts",
    ] {
        assert!(data["progress"][field].is_i64(), "{field}");
    }
    assert!(
        data["progress"]["progress_percentage"].is_f64()
            && data["progress"]["success_rate"].is_f64()
    );

    app.post_empty(&format!("/v1/campaigns/{id}/start")).await;
    let updates = ws.until(60, |m| m["data"]["status"] == "completed").await;
    assert!(updates.iter().all(|m| m["type"] == "progress_update"));
    assert!(
        strictly_increasing(&seqs(&updates)),
        "seq strictly increases"
    );
    let last = updates.last().unwrap();
    let campaign = app.campaign(&c["id"]).await;
    assert_eq!(
        last["data"]["progress"]["completed"],
        campaign["progress"]["sent"]
    );
    assert_eq!(
        last["data"]["progress"]["failed"],
        campaign["progress"]["failed"]
    );
    assert_eq!(last["data"]["progress"]["progress_percentage"], 100.0);
    assert!(last["data"]["started_at"].is_string() && last["data"]["completed_at"].is_string());
    // Coalescing: far fewer frames than events in the log.
    let logged = app.store.last_seq(id).await.unwrap();
    assert!(
        (updates.len() as i64) < logged,
        "{} frames for {logged} events",
        updates.len()
    );

    // Client messages.
    ws.send(json!({"type": "ping"})).await;
    let pong = ws.next(5).await;
    assert_eq!(pong["type"], "pong");
    ws.send(json!({"type": "request_update"})).await;
    let update = ws.next(5).await;
    assert_eq!(update["type"], "progress_update");
    assert_eq!(update["data"]["status"], "completed");
    ws.send(json!({"type": "request_history", "hours": 1}))
        .await;
    let history = ws.next(5).await;
    assert_eq!(history["type"], "metrics_history");
    let buckets = history["data"].as_array().unwrap();
    let completed: i64 = buckets
        .iter()
        .map(|b| b["completed"].as_i64().unwrap())
        .sum();
    let failed: i64 = buckets.iter().map(|b| b["failed"].as_i64().unwrap()).sum();
    assert_eq!(json!(completed), campaign["progress"]["sent"]);
    assert_eq!(json!(failed), campaign["progress"]["failed"]);
    assert!(buckets[0]["timestamp"].is_string() && buckets[0]["success_rate"].is_number());

    // Bad input gets an error message, and the socket stays up.
    ws.socket
        .send(Message::Text("{not json".into()))
        .await
        .unwrap();
    assert_eq!(ws.next(5).await["type"], "error");
    ws.send(json!({"type": "dance"})).await;
    let unknown = ws.next(5).await;
    assert!(unknown["message"].as_str().unwrap().contains("dance"));
    ws.send(json!({"type": "request_history", "hours": 0}))
        .await;
    assert_eq!(ws.next(5).await["type"], "error");
    ws.socket
        .send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    assert_eq!(ws.next(5).await["type"], "error");
    ws.send(json!({"type": "ping", "padding": "x".repeat(20_000)}))
        .await;
    assert!(ws.next(5).await["message"]
        .as_str()
        .unwrap()
        .contains("over the limit"));
    ws.send(json!({"type": "ping"})).await;
    assert_eq!(ws.next(5).await["type"], "pong");
}

#[tokio::test]
async fn seed_000_sends_progress_only_when_what_it_shows_changes() {
    // Seed 000 sends `progress_update` "whenever progress changes". A
    // delivery receipt changes none of its counters, so the receipts'
    // events of a run (in the log, and on the other protocols) are not
    // sent to a campaign's progress sockets.
    let app = slow_engine_app(|c| c.api.streams.coalesce = Duration::ZERO).await;
    let c = app
        .campaign_with_contacts(
            json!({"channel": "sms", "template": "Hi {{name}}",
                   "provider": {"kind": "simulated", "latency_ms": 10, "receipt_delay_ms": 20}}),
            600,
        )
        .await;
    let id = c["id"].as_i64().unwrap();
    let mut ws = Client::connect(
        &app,
        &format!("/ws/campaigns/{id}/progress?token={}", app.key),
    )
    .await;
    assert_eq!(ws.next(5).await["type"], "connection_ack");
    let initial = ws.next(5).await;
    assert_eq!(initial["type"], "initial_progress");
    app.post_empty(&format!("/v1/campaigns/{id}/start")).await;
    let updates = ws.until(60, |m| m["data"]["status"] == "completed").await;
    assert!(updates.iter().all(|m| m["type"] == "progress_update"));
    for pair in updates.windows(2) {
        assert_ne!(
            pair[0]["data"], pair[1]["data"],
            "seq {} and {} show the same",
            pair[0]["seq"], pair[1]["seq"]
        );
    }
    let last = updates.last().unwrap();
    let campaign = app.campaign(&c["id"]).await;
    assert_eq!(
        last["data"]["progress"]["completed"],
        campaign["progress"]["sent"]
    );
    assert_eq!(last["data"]["progress"]["progress_percentage"], 100.0);
    // The receipts' events before the end are in the log and were not sent.
    let sent: std::collections::HashSet<i64> = seqs(&updates).into_iter().collect();
    let events = app.store.events_since(id, 0, 10_000).await.unwrap();
    let receipts_before_the_end: Vec<i64> = events
        .iter()
        .filter(|e| e.seq < last["seq"].as_i64().unwrap() && !e.data["receipts"].is_null())
        .map(|e| e.seq)
        .collect();
    assert!(
        !receipts_before_the_end.is_empty(),
        "no receipts during the run"
    );
    assert!(
        receipts_before_the_end
            .iter()
            .all(|seq| !sent.contains(seq)),
        "a receipt's event was sent: {receipts_before_the_end:?} among {sent:?}"
    );
}

#[tokio::test]
async fn seed_000_close_codes() {
    let app = slow_engine_app(|_| {}).await;
    let c = app.sms_campaign().await;
    let id = c["id"].as_i64().unwrap();
    let mut bad =
        Client::connect(&app, &format!("/ws/campaigns/{id}/progress?token=hk_nope")).await;
    assert_eq!(bad.closed(5).await.0, 1008);
    let mut missing = Client::connect(&app, &format!("/ws/campaigns/{id}/progress")).await;
    assert_eq!(missing.closed(5).await.0, 1008);
    let mut unknown = Client::connect(
        &app,
        &format!("/ws/campaigns/999999/progress?token={}", app.key),
    )
    .await;
    assert_eq!(unknown.closed(5).await.0, 4004);
    let other = app.new_key("beta").await;
    let mut foreign =
        Client::connect(&app, &format!("/ws/campaigns/{id}/progress?token={other}")).await;
    let (code, reason) = foreign.closed(5).await;
    assert_eq!(code, 4004, "never another workspace's data");
    assert!(!reason.contains("Reminders"));
}

#[tokio::test]
async fn seed_000_monitor_follows_several_campaigns() {
    let app = slow_engine_app(|_| {}).await;
    let a = slow_campaign(&app, 300).await;
    let b = slow_campaign(&app, 200).await;
    let mut ws = Client::connect(&app, &format!("/ws/campaigns/monitor?token={}", app.key)).await;
    assert_eq!(ws.next(5).await["type"], "connection_ack");
    let overview = ws.next(5).await;
    assert_eq!(overview["type"], "campaigns_overview");
    assert_eq!(overview["data"].as_array().unwrap().len(), 2);
    ws.send(json!({"type": "subscribe", "campaign_ids": [a["id"], b["id"], 424242]}))
        .await;
    let replies = ws.until(5, |m| m["type"] == "error").await;
    let initial: Vec<&Value> = replies
        .iter()
        .filter(|m| m["type"] == "initial_progress")
        .collect();
    assert_eq!(initial.len(), 2);
    assert_eq!(replies.last().unwrap()["campaign_id"], "424242");
    for c in [&a, &b] {
        app.post_empty(&format!("/v1/campaigns/{}/start", c["id"]))
            .await;
    }
    let mut done = std::collections::HashSet::new();
    while done.len() < 2 {
        let m = ws.next(60).await;
        if m["type"] == "progress_update" && m["data"]["status"] == "completed" {
            done.insert(m["data"]["campaign_id"].as_i64().unwrap());
        }
    }
    ws.send(json!({"type": "unsubscribe", "campaign_id": a["id"]}))
        .await;
    let reply = ws.until(5, |m| m["type"] == "unsubscribed").await;
    assert_eq!(reply.last().unwrap()["campaign_id"], a["id"]);
    ws.send(json!({"type": "subscribe"})).await;
    assert_eq!(
        ws.until(5, |m| m["type"] == "error").await.last().unwrap()["type"],
        "error"
    );
}

#[tokio::test]
async fn reconnecting_with_since_misses_nothing_and_repeats_nothing() {
    let app = slow_engine_app(|_| {}).await;
    let c = slow_campaign(&app, 1500).await;
    let id = c["id"].as_i64().unwrap();
    let path = |since: Option<i64>| match since {
        Some(s) => format!("/ws/campaigns/{id}/progress?token={}&since={s}", app.key),
        None => format!("/ws/campaigns/{id}/progress?token={}", app.key),
    };
    let mut first = Client::connect(&app, &path(None)).await;
    first.next(5).await;
    first.next(5).await;
    app.post_empty(&format!("/v1/campaigns/{id}/start")).await;
    let before = first
        .until(30, |m| {
            m["data"]["progress"]["completed"].as_i64().unwrap_or(0) > 200
        })
        .await;
    let last_seen = *seqs(&before).last().unwrap();
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut second = Client::connect(&app, &path(Some(last_seen))).await;
    assert_eq!(second.next(5).await["type"], "connection_ack");
    let after = second
        .until(60, |m| m["data"]["status"] == "completed")
        .await;
    assert!(
        after.iter().all(|m| m["type"] == "progress_update"),
        "no initial_progress after a replay"
    );
    let resumed = seqs(&after);
    assert!(resumed[0] > last_seen, "nothing repeated");
    assert!(strictly_increasing(&resumed));
    let final_counts = &after.last().unwrap()["data"]["progress"];
    assert_eq!(
        final_counts["completed"],
        app.campaign(&c["id"]).await["progress"]["sent"]
    );

    // A replay of the whole log from 0 ends in the same state.
    let mut replay = Client::connect(&app, &path(Some(0))).await;
    replay.next(5).await;
    let all = replay
        .until(10, |m| m["data"]["status"] == "completed")
        .await;
    assert!(strictly_increasing(&seqs(&all)));
    assert_eq!(all.last().unwrap()["data"]["progress"], *final_counts);

    // A position the log never had: told so, then a fresh snapshot.
    let mut ahead = Client::connect(&app, &path(Some(1_000_000))).await;
    ahead.next(5).await;
    let note = ahead.next(5).await;
    assert_eq!(note["type"], "replay_unavailable");
    assert_eq!(note["requested_since"], 1_000_000);
    assert_eq!(ahead.next(5).await["type"], "initial_progress");
}

#[tokio::test]
async fn a_reader_that_never_reads_does_not_delay_others() {
    let app = slow_engine_app(|c| c.api.streams.send_timeout = Duration::from_millis(500)).await;
    let c = slow_campaign(&app, 800).await;
    let id = c["id"].as_i64().unwrap();
    let _stalled = Client::connect(
        &app,
        &format!("/ws/campaigns/{id}/progress?token={}", app.key),
    )
    .await;
    let mut fast = Client::connect(
        &app,
        &format!("/ws/campaigns/{id}/progress?token={}", app.key),
    )
    .await;
    fast.next(5).await;
    fast.next(5).await;
    app.post_empty(&format!("/v1/campaigns/{id}/start")).await;
    let updates = fast.until(60, |m| m["data"]["status"] == "completed").await;
    assert!(!updates.is_empty());
}

async fn external_campaign(app: &TestApp) -> Value {
    app.create_campaign(json!({"name": "optimiser", "channel": "external"}))
        .await
}

#[tokio::test]
async fn seed_004_iterations_from_a_producer() {
    let app = slow_engine_app(|_| {}).await;
    let c = external_campaign(&app).await;
    let id = c["id"].as_i64().unwrap();
    let mut ws = Client::connect(&app, &format!("/v1/ws/campaigns/{id}?token={}", app.key)).await;
    let mut alias = Client::connect(
        &app,
        &format!(
            "/api/v1/ws/campaigns/{}?token={}",
            c["uuid"].as_str().unwrap(),
            app.key
        ),
    )
    .await;
    let events = json!({"events": [
        {"type": "iteration_start", "data": {"iteration": 5, "total_iterations": 20, "phase": "evaluating", "batch_size": 15}},
        {"type": "evaluation_complete", "data": {"iteration": 5, "evaluation_index": 3, "batch_size": 15, "objectives": {"permeability": 28.4, "salt_rejection": 96.2}}},
        {"type": "iteration_complete", "data": {"iteration": 5, "evaluations_completed": 75, "hypervolume": 0.682, "hypervolume_improvement": 0.034, "pareto_size": 11, "surrogate_loss": 0.0192, "best_objectives": {"permeability": 35.1, "salt_rejection": 97.8}}},
        {"type": "error", "data": {"code": "SURROGATE_TRAINING_FAILED", "message": "NaN detected in surrogate predictions", "iteration": 5}},
        {"type": "campaign_complete", "data": {"status": "converged", "total_iterations": 15, "total_evaluations": 225, "final_hypervolume": 0.847, "pareto_size": 18}}
    ]});
    let posted = app
        .post(&format!("/v1/campaigns/{id}/events"), &events)
        .await;
    assert_eq!(posted.status(), StatusCode::CREATED);
    for client in [&mut ws, &mut alias] {
        for expected in events["events"].as_array().unwrap() {
            let m = client.next(5).await;
            assert_eq!(m["type"], expected["type"]);
            assert_eq!(m["data"], expected["data"], "data passes through unchanged");
            assert!(chrono::DateTime::parse_from_rfc3339(m["timestamp"].as_str().unwrap()).is_ok());
            assert!(m["seq"].is_i64());
        }
    }
    assert_eq!(app.campaign(&c["id"]).await["status"], "completed");
    ws.send(json!({"type": "hello"})).await;
    let reply = ws.next(5).await;
    assert_eq!(reply["type"], "error");
    assert!(reply["data"]["code"].is_string() && reply["data"]["message"].is_string());
}

#[tokio::test]
async fn seed_004_batches_of_an_engine_run_read_as_iterations() {
    let app = slow_engine_app(|_| {}).await;
    let c = slow_campaign(&app, 2500).await;
    let id = c["id"].as_i64().unwrap();
    let mut ws = Client::connect(&app, &format!("/v1/ws/campaigns/{id}?token={}", app.key)).await;
    app.post_empty(&format!("/v1/campaigns/{id}/start")).await;
    let messages = ws.until(60, |m| m["type"] == "campaign_complete").await;
    let starts: Vec<&Value> = messages
        .iter()
        .filter(|m| m["type"] == "iteration_start")
        .collect();
    let completes: Vec<&Value> = messages
        .iter()
        .filter(|m| m["type"] == "iteration_complete")
        .collect();
    assert_eq!(starts.len(), 3);
    assert_eq!(completes.len(), 3);
    assert_eq!(
        starts[0]["data"],
        json!({"iteration": 1, "total_iterations": 3, "phase": "sending", "batch_size": 1000})
    );
    let end = messages.last().unwrap();
    assert_eq!(end["data"]["status"], "completed");
    assert_eq!(end["data"]["total_evaluations"], 2500);
}

#[tokio::test]
async fn seed_004_limits_idle_timeout_and_close_codes() {
    let app = slow_engine_app(|c| {
        c.api.streams.max_sockets_per_key = 3;
        c.api.streams.idle_timeout = Duration::from_secs(1);
    })
    .await;
    let c = external_campaign(&app).await;
    let id = c["id"].as_i64().unwrap();
    let path = format!("/v1/ws/campaigns/{id}?token={}", app.key);
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(Client::connect(&app, &path).await);
    }
    let mut fourth = Client::connect(&app, &path).await;
    let (code, reason) = fourth.closed(5).await;
    assert_eq!(code, 4029);
    assert!(reason.contains("too many"));
    // Another key has its own allowance.
    let other_key = app.new_key("alpha").await;
    let mut other =
        Client::connect(&app, &format!("/v1/ws/campaigns/{id}?token={other_key}")).await;
    // Idle: no campaign activity for the timeout closes the socket.
    let (code, reason) = other.closed(5).await;
    assert_eq!(code, 1000);
    assert!(reason.contains("idle"));
    drop(open);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut again = Client::connect(&app, &path).await;
    assert_eq!(
        again.closed(5).await.0,
        1000,
        "slots free when sockets close (then idles out)"
    );
    let mut bad = Client::connect(&app, &format!("/v1/ws/campaigns/{id}?token=nope")).await;
    assert_eq!(bad.closed(5).await.0, 1008);
    let mut unknown =
        Client::connect(&app, &format!("/v1/ws/campaigns/77777?token={}", app.key)).await;
    assert_eq!(unknown.closed(5).await.0, 4004);
}

#[tokio::test]
async fn seed_003_jobs_stream_per_client() {
    let app = slow_engine_app(|_| {}).await;
    let c = external_campaign(&app).await;
    let id = c["id"].as_i64().unwrap();
    let mut ws = Client::connect(&app, &format!("/api/v1/ws/client-a1?token={}", app.key)).await;
    let mut twin = Client::connect(&app, &format!("/api/v1/ws/client-a1?token={}", app.key)).await;
    assert_eq!(twin.closed(5).await.0, 1008, "each client id once");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let events = json!({"events": [
        {"type": "job_progress", "data": {"jobId": "job_123", "progress": 65, "processedCount": 65, "totalCount": 100, "currentFile": "document.pdf"}},
        {"type": "file_uploaded", "data": {"fileId": "file_456", "name": "newfile.pdf", "size": 512000}},
        {"type": "error", "data": {"jobId": "job_123", "error": "Permission denied", "code": "PERMISSION_ERROR", "message": "Permission denied"}},
        {"type": "job_complete", "data": {"jobId": "job_123", "status": "completed", "organized": 100, "failed": 0}}
    ]});
    app.post(&format!("/v1/campaigns/{id}/events"), &events)
        .await;
    for expected in events["events"].as_array().unwrap() {
        let m = ws.next(5).await;
        assert_eq!(m["type"], expected["type"]);
        for (key, value) in expected["data"].as_object().unwrap() {
            assert_eq!(&m[key], value, "{key}");
        }
    }
    // An engine campaign of the same workspace shows up as a job.
    let engine = slow_campaign(&app, 300).await;
    app.post_empty(&format!("/v1/campaigns/{}/start", engine["id"]))
        .await;
    let messages = ws.until(60, |m| m["type"] == "job_complete").await;
    let progress = messages
        .iter()
        .find(|m| m["type"] == "job_progress")
        .unwrap();
    assert_eq!(progress["totalCount"], 300);
    let done = messages.last().unwrap();
    assert_eq!(done["status"], "completed");
    assert_eq!(
        done["organized"].as_i64().unwrap() + done["failed"].as_i64().unwrap(),
        300
    );
    let mut bad = Client::connect(&app, "/api/v1/ws/client-b?token=nope").await;
    assert_eq!(bad.closed(5).await.0, 1008);
}

#[tokio::test]
async fn seed_003_a_client_is_sent_what_happens_after_it_connects() {
    let app = slow_engine_app(|_| {}).await;
    let c = external_campaign(&app).await;
    let id = c["id"].as_i64().unwrap();
    let progress = |n: i64| {
        json!({"events": [{"type": "job_progress",
        "data": {"jobId": "job_1", "progress": n, "processedCount": n, "totalCount": 100}}]})
    };
    let before = app
        .post(&format!("/v1/campaigns/{id}/events"), &progress(10))
        .await;
    assert_eq!(before.status(), StatusCode::CREATED);
    let mut ws = Client::connect(&app, &format!("/api/v1/ws/late-client?token={}", app.key)).await;
    app.post(&format!("/v1/campaigns/{id}/events"), &progress(20))
        .await;
    let first = ws.next(5).await;
    assert_eq!(first["type"], "job_progress");
    assert_eq!(
        first["progress"], 20,
        "the event from before it connected is not replayed"
    );
}

#[tokio::test]
async fn producer_events_are_checked() {
    let app = slow_engine_app(|_| {}).await;
    let c = external_campaign(&app).await;
    let path = format!("/v1/campaigns/{}/events", c["id"]);
    let cases = [
        (json!({"type": "dance", "data": {}}), "type"),
        (
            json!({"type": "iteration_start", "data": {}}),
            "data.iteration",
        ),
        (
            json!({"type": "iteration_start", "data": {"iteration": "five"}}),
            "data.iteration",
        ),
        (
            json!({"type": "job_progress", "data": {"progress": 101}}),
            "data.progress",
        ),
        (
            json!({"type": "error", "data": {"code": "X"}}),
            "data.message",
        ),
        (json!({"type": "job_complete", "data": "done"}), "data"),
        (
            json!({"type": "file_uploaded", "data": {"fileId": "f", "name": "n", "blob": "x".repeat(70_000)}}),
            "data",
        ),
        (json!({"events": []}), "events"),
        (
            json!({"events": [{"type": "iteration_start", "data": {"iteration": 1}}, {"type": "nope"}]}),
            "events[1].type",
        ),
    ];
    for (body, field) in cases {
        let err = error_of(
            app.post(&path, &body).await,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
        assert_eq!(err["field"], field, "{body}");
    }
    let many: Vec<Value> = (0..101)
        .map(|i| json!({"type": "iteration_start", "data": {"iteration": i}}))
        .collect();
    error_of(
        app.post(&path, &json!({"events": many})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(
        app.store.last_seq(c["id"].as_i64().unwrap()).await.unwrap(),
        0,
        "nothing was stored"
    );

    let sms = app.sms_campaign().await;
    let err = error_of(
        app.post(
            &format!("/v1/campaigns/{}/events", sms["id"]),
            &json!({"type": "iteration_start", "data": {"iteration": 1}}),
        )
        .await,
        StatusCode::CONFLICT,
    )
    .await;
    assert!(err["message"].as_str().unwrap().contains("external"));
    app.post(
        &path,
        &json!({"type": "campaign_complete", "data": {"status": "converged"}}),
    )
    .await;
    let late = app
        .post(
            &path,
            &json!({"type": "iteration_start", "data": {"iteration": 1}}),
        )
        .await;
    assert_eq!(
        error_of(late, StatusCode::CONFLICT).await["current_status"],
        "completed"
    );
}

/// Reads SSE frames until `count` events (each `id`/`event`/`data`).
async fn sse_events(
    response: reqwest::Response,
    count: usize,
) -> Vec<(Option<i64>, String, Value)> {
    let mut stream = response.bytes_stream();
    let mut buffer = String::new();
    let mut events = Vec::new();
    while events.len() < count {
        let chunk = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("sse in time")
            .unwrap()
            .unwrap();
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let (mut id, mut kind, mut data) = (None, String::new(), Value::Null);
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id: ") {
                    id = v.parse().ok();
                } else if let Some(v) = line.strip_prefix("event: ") {
                    kind = v.to_owned();
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(v).unwrap();
                }
            }
            if !kind.is_empty() {
                events.push((id, kind, data));
            }
        }
    }
    events
}

#[tokio::test]
async fn sse_streams_events_and_resumes_from_last_event_id() {
    let app = slow_engine_app(|_| {}).await;
    let c = external_campaign(&app).await;
    let path = format!("/v1/campaigns/{}/events", c["id"]);
    for i in 1..=3 {
        app.post(
            &path,
            &json!({"type": "iteration_start", "data": {"iteration": i}}),
        )
        .await;
    }
    let fresh = app.get(&path).await;
    assert_eq!(fresh.headers()["content-type"], "text/event-stream");
    let mut live = sse_events(fresh, 1).await;
    assert_eq!(live[0].1, "snapshot");
    assert_eq!(live[0].0, Some(3));

    let resumed = app
        .request(reqwest::Method::GET, &path)
        .header("Last-Event-ID", "1")
        .send()
        .await
        .unwrap();
    let posting = {
        let app_key = app.key.clone();
        let client = app.client.clone();
        let url = app.url(&path);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            client.post(url).bearer_auth(app_key).json(&json!({"type": "iteration_complete", "data": {"iteration": 3, "hypervolume": 0.5}})).send().await.unwrap();
        })
    };
    let events = sse_events(resumed, 3).await;
    posting.await.unwrap();
    let ids: Vec<Option<i64>> = events.iter().map(|e| e.0).collect();
    assert_eq!(ids, [Some(2), Some(3), Some(4)]);
    assert_eq!(events[0].1, "iteration_start");
    assert_eq!(events[0].2, json!({"iteration": 2}));
    assert_eq!(events[2].1, "iteration_complete");
    live.clear();

    let bad = app
        .request(reqwest::Method::GET, &path)
        .header("Last-Event-ID", "abc")
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(bad, StatusCode::UNPROCESSABLE_ENTITY).await["field"],
        "Last-Event-ID"
    );
    let unauthorized = app.client.get(app.url(&path)).send().await.unwrap();
    assert_eq!(unauthorized.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn purged_events_make_replay_say_so() {
    let app = slow_engine_app(|c| {
        c.retention.event_age = Duration::ZERO;
        c.retention.event_count = 2;
        c.retention.interval = Duration::from_millis(100);
    })
    .await;
    let c = external_campaign(&app).await;
    let id = c["id"].as_i64().unwrap();
    for i in 1..=6 {
        app.post(
            &format!("/v1/campaigns/{id}/events"),
            &json!({"type": "iteration_start", "data": {"iteration": i}}),
        )
        .await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while app.store.oldest_seq(id).await.unwrap() != Some(5) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "purge did not run: oldest {:?} last {:?}",
            app.store.oldest_seq(id).await,
            app.store.last_seq(id).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut gone = Client::connect(
        &app,
        &format!("/v1/ws/campaigns/{id}?token={}&since=1", app.key),
    )
    .await;
    let note = gone.next(5).await;
    assert_eq!(note["type"], "replay_unavailable");
    assert_eq!(note["oldest_seq"], 5);
    let mut kept = Client::connect(
        &app,
        &format!("/v1/ws/campaigns/{id}?token={}&since=4", app.key),
    )
    .await;
    assert_eq!(kept.next(5).await["data"]["iteration"], 5);
    assert_eq!(kept.next(5).await["data"]["iteration"], 6);
}

#[tokio::test]
async fn shutdown_tells_clients_going_away() {
    let mut app = slow_engine_app(|_| {}).await;
    let c = app.sms_campaign().await;
    let mut ws = Client::connect(
        &app,
        &format!("/ws/campaigns/{}/progress?token={}", c["id"], app.key),
    )
    .await;
    ws.next(5).await;
    ws.next(5).await;
    app.stop();
    assert_eq!(ws.closed(5).await.0, 1001);
}

#[tokio::test]
async fn abrupt_disconnects_and_truncated_frames_leave_the_server_serving() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = slow_engine_app(|_| {}).await;
    let c = slow_campaign(&app, 600).await;
    let id = c["id"].as_i64().unwrap();
    let path = format!("/ws/campaigns/{id}/progress?token={}", app.key);
    // Sockets dropped without a close frame, while the campaign runs.
    app.post_empty(&format!("/v1/campaigns/{id}/start")).await;
    for _ in 0..50 {
        let mut ws = Client::connect(&app, &path).await;
        ws.next(5).await;
        drop(ws);
    }
    // A client that sends half a frame and vanishes.
    let addr = app.base.trim_start_matches("http://").to_owned();
    for _ in 0..10 {
        let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut buf = [0u8; 1024];
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 101"));
        // A masked text frame announcing 4096 bytes, of which 5 arrive.
        tcp.write_all(&[
            0x81, 0xFE, 0x10, 0x00, 1, 2, 3, 4, b'{', b'"', b't', b'y', b'p',
        ])
        .await
        .unwrap();
        drop(tcp);
    }
    let mut survivor = Client::connect(&app, &path).await;
    assert_eq!(survivor.next(5).await["type"], "connection_ack");
    survivor
        .until(60, |m| m["data"]["status"] == "completed")
        .await;
    assert_eq!(
        app.client
            .get(app.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn seed_004_sends_ping_frames() {
    let app = slow_engine_app(|c| c.api.streams.ping_interval = Duration::from_millis(200)).await;
    let c = external_campaign(&app).await;
    let mut ws = Client::connect(
        &app,
        &format!("/v1/ws/campaigns/{}?token={}", c["id"], app.key),
    )
    .await;
    let frame = tokio::time::timeout(Duration::from_secs(2), ws.socket.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(frame, Message::Ping(_)), "{frame:?}");
}

/// Reads replies until the socket is quiet for `quiet`.
async fn replies_until_quiet(client: &mut Client, quiet: Duration) -> Vec<Value> {
    let mut replies = Vec::new();
    while let Ok(Some(Ok(message))) = tokio::time::timeout(quiet, client.socket.next()).await {
        if let Message::Text(text) = message {
            replies.push(serde_json::from_str(&text).unwrap());
        }
    }
    replies
}

/// A client flooding its socket is paced per connection: what is over the
/// rate is dropped with one error a second (not one per message), another
/// client on the same campaign is answered at once, and the flooder is
/// answered again once it slows down.
#[tokio::test]
async fn a_client_flooding_its_socket_is_paced_and_others_are_not() {
    let app = slow_engine_app(|c| c.api.streams.client_messages_per_second = 10).await;
    let c = app.sms_campaign().await;
    let path = format!("/ws/campaigns/{}/progress?token={}", c["id"], app.key);
    let mut flooder = Client::connect(&app, &path).await;
    let mut calm = Client::connect(&app, &path).await;
    replies_until_quiet(&mut flooder, Duration::from_millis(300)).await;
    replies_until_quiet(&mut calm, Duration::from_millis(300)).await;

    let ping = Message::Text(json!({"type": "ping"}).to_string().into());
    for _ in 0..500 {
        flooder.socket.feed(ping.clone()).await.unwrap();
    }
    flooder.socket.flush().await.unwrap();
    calm.send(json!({"type": "ping"})).await;
    let answered = calm.until(5, |m| m["type"] == "pong").await;
    assert!(
        answered.iter().all(|m| m["type"] != "error"),
        "the calm client is not paced: {answered:?}"
    );

    let replies = replies_until_quiet(&mut flooder, Duration::from_millis(700)).await;
    let pongs = replies.iter().filter(|m| m["type"] == "pong").count();
    let errors: Vec<&Value> = replies.iter().filter(|m| m["type"] == "error").collect();
    // The burst (twice the rate) is answered, then about the rate.
    assert!((20..=40).contains(&pongs), "{pongs} of 500 pings answered");
    assert!(
        (1..=3).contains(&errors.len()),
        "one error a second, not one per dropped message: {errors:?}"
    );
    assert!(errors[0]["message"]
        .as_str()
        .unwrap()
        .contains("too many messages"));

    tokio::time::sleep(Duration::from_millis(1100)).await;
    flooder.send(json!({"type": "ping"})).await;
    assert_eq!(
        flooder
            .until(5, |m| m["type"] == "pong" || m["type"] == "error")
            .await
            .last()
            .unwrap()["type"],
        "pong",
        "answered again once it slows down"
    );
}

/// Thousands of sockets opened and dropped as fast as a client can (from 64
/// tasks at once, twice for a bounded 3 s) leave a `herald` process serving, with
/// its connection gauge back at zero and its memory near where it began.
#[tokio::test]
async fn a_connect_disconnect_storm_leaves_connections_and_memory_at_baseline() {
    use crate::process::{create_campaign, create_key, rss_of, Node, NodeOptions};
    let dir = tempfile::tempdir().unwrap();
    let database_url = crate::helpers::fresh_database_url(dir.path()).await;
    let key = create_key(&database_url, "storm");
    let options = NodeOptions {
        engine: false,
        ..NodeOptions::default()
    };
    let node = Node::start(&database_url, options, &dir.path().join("herald.log")).await;
    let id = create_campaign(&node, &key, json!({"kind": "simulated"}), 10).await;
    let url = format!(
        "{}/ws/campaigns/{id}/progress?token={key}",
        node.base.replacen("http", "ws", 1)
    );
    let cycle = |url: String| async move {
        let (mut socket, _) = tokio_tungstenite::connect_async(&url).await.ok()?;
        // The first frame (the ack), so the server did set the session up.
        socket.next().await?.ok()?;
        Some(())
    };
    // Warm up the allocator and the hub before taking the baseline.
    for _ in 0..200 {
        cycle(url.clone()).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline = rss_of(node.pid());

    // A storm is a number of cycles, not a duration, so a loaded machine
    // runs the same storm, only slower.
    let storm = |url: String| async move {
        let started = std::time::Instant::now();
        let begun = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..64 {
            let (url, begun) = (url.clone(), begun.clone());
            tasks.spawn(async move {
                let (mut done, mut failed) = (0u32, 0u32);
                while begun.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 1500 {
                    match cycle(url.clone()).await {
                        Some(()) => done += 1,
                        None => failed += 1,
                    }
                }
                (done, failed)
            });
        }
        let (mut cycles, mut failures) = (0, 0);
        while let Some(counts) = tasks.join_next().await {
            let (done, failed) = counts.unwrap();
            cycles += done;
            failures += failed;
        }
        let rate = f64::from(cycles) / started.elapsed().as_secs_f64();
        println!("storm: {cycles} connect/disconnect cycles ({rate:.0}/s), {failures} refused");
        assert_eq!(failures, 0, "every connection was served");
    };
    let open_sessions = || async {
        let client = reqwest::Client::new();
        let mut open = f64::NAN;
        for _ in 0..50 {
            let metrics = client
                .get(format!("{}/metrics", node.base))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            open = crate::metrics::sum(
                &crate::metrics::parse(&metrics),
                "herald_stream_connections",
                &[],
            );
            if open == 0.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        open
    };

    // The first storm sets the allocator's high-water mark; a second one
    // the same size must not add to it, as a leak would.
    storm(url.clone()).await;
    assert_eq!(open_sessions().await, 0.0, "no session outlives its socket");
    let after_first = rss_of(node.pid());
    storm(url.clone()).await;
    assert_eq!(open_sessions().await, 0.0, "no session outlives its socket");
    let after_second = rss_of(node.pid());
    let mib = |bytes: u64| bytes as f64 / 1048576.0;
    println!(
        "storm: RSS {:.1} MiB before, {:.1} MiB after one storm, {:.1} MiB after two",
        mib(baseline),
        mib(after_first),
        mib(after_second)
    );
    assert!(
        after_first < baseline + 24 * 1024 * 1024,
        "one storm's high-water mark: {baseline} → {after_first} bytes"
    );
    assert!(
        after_second < after_first + 4 * 1024 * 1024,
        "a second storm adds nothing lasting: {after_first} → {after_second} bytes"
    );
    // Still serving.
    let mut last = tokio_tungstenite::connect_async(&url).await.unwrap().0;
    let ack: Value = match last.next().await.unwrap().unwrap() {
        Message::Text(text) => serde_json::from_str(&text).unwrap(),
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(ack["type"], "connection_ack");
}

#[tokio::test]
async fn a_websocket_endpoint_names_the_handshake_header_that_is_wrong() {
    let app = spawn_app_with(|_| {}).await;
    let cases: [(&[(&str, &str)], &str); 4] = [
        (&[], "Connection"),
        (&[("Connection", "keep-alive, Upgrade")], "Upgrade"),
        (
            &[
                ("Connection", "Upgrade"),
                ("Upgrade", "websocket"),
                ("Sec-WebSocket-Version", "8"),
                ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ],
            "Sec-WebSocket-Version",
        ),
        (
            &[
                ("Connection", "Upgrade"),
                ("Upgrade", "websocket"),
                ("Sec-WebSocket-Version", "13"),
            ],
            "Sec-WebSocket-Key",
        ),
    ];
    for path in [
        "/ws/campaigns/1/progress",
        "/v1/ws/campaigns/1",
        "/api/v1/ws/me",
    ] {
        for (headers, field) in cases {
            let mut request = app
                .client
                .get(app.url(&format!("{path}?token={}", app.key)));
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            let err = error_of(request.send().await.unwrap(), StatusCode::BAD_REQUEST).await;
            assert_eq!(err["field"], field, "{path} with {headers:?}: {err}");
        }
    }
    // The server still upgrades a proper handshake.
    let campaign = external_campaign(&app).await;
    let mut ws = Client::connect(
        &app,
        &format!(
            "/ws/campaigns/{}/progress?token={}",
            campaign["id"], app.key
        ),
    )
    .await;
    assert_eq!(ws.next(5).await["type"], "connection_ack");
}
