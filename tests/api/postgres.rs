//! What only Postgres does, always on Postgres (`HERALD_TEST_POSTGRES_URL`,
//! set by test.sh) whatever the backend of the run. Several Herald nodes on
//! one database, as separate processes: they share a run's batches without
//! sending anyone twice, a socket on one node streams a run another node
//! works (through `LISTEN/NOTIFY`, even across a listener outage), and a
//! node killed mid-run is finished by the other. Statement timeouts are 503s.

use std::collections::{BTreeSet, HashMap};
use std::process::Command;
use std::time::Duration;

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{distinct_phones, postgres_database_url, HERALD};
use crate::process::{create_campaign, create_key, CountingProvider, Node, NodeOptions};

fn progress(view: &Value, field: &str) -> i64 {
    view["progress"][field].as_i64().unwrap()
}

/// Counters of the campaign's run against its execution rows, read
/// straight from the database.
async fn assert_counters_equal_rows(database_url: &str, view: &Value) {
    let mut db = PgConnection::connect(database_url).await.unwrap();
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT status, COUNT(*) FROM executions WHERE campaign_id = $1 GROUP BY status",
    )
    .bind(view["id"].as_i64().unwrap())
    .fetch_all(&mut db)
    .await
    .unwrap();
    let rows: HashMap<String, i64> = rows.into_iter().collect();
    let count = |status: &str| rows.get(status).copied().unwrap_or(0);
    assert_eq!(count("completed"), progress(view, "sent"), "{rows:?}");
    assert_eq!(count("failed"), progress(view, "failed"), "{rows:?}");
    assert_eq!(count("pending") + count("in_progress"), 0, "{rows:?}");
}

/// Waits for the campaign's run to complete after a fault, then checks what
/// every fault must leave: no one sent twice, every recipient sent or
/// failed, at most the two slices in hand per run task (4 × in-flight each:
/// the one on the wire and the one claimed ahead) written off as "outcome
/// unknown", and counters equal to rows. Returns the final view.
async fn assert_recovered_at_most_once(
    node: &Node,
    key: &str,
    id: i64,
    recipients: i64,
    provider: &CountingProvider,
    database_url: &str,
) -> Value {
    let done = node
        .wait_for(key, id, 120, |v| v["status"] == "completed")
        .await;
    assert_eq!(provider.most_to_one_recipient(), 1, "no one sent twice");
    let (sent, failed) = (progress(&done, "sent"), progress(&done, "failed"));
    assert_eq!(sent + failed, recipients);
    let in_hand = NodeOptions::default().sends_in_hand(database_url);
    assert!(failed <= in_hand, "{failed} written off, above {in_hand}");
    assert_counters_equal_rows(database_url, &done).await;
    done
}

/// Two nodes with default options on one database, logging to `a.log` and
/// `b.log` in `dir`.
async fn two_nodes(database_url: &str, dir: &std::path::Path) -> (Node, Node) {
    let a = Node::start(database_url, NodeOptions::default(), &dir.join("a.log")).await;
    let b = Node::start(database_url, NodeOptions::default(), &dir.join("b.log")).await;
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_a_100k_run_and_send_no_one_twice() {
    let dir = tempfile::tempdir().unwrap();
    let database_url = postgres_database_url().await;
    let (a, b) = two_nodes(&database_url, dir.path()).await;
    let (provider, provider_settings) = CountingProvider::serve(Duration::ZERO).await;
    let key = create_key(&database_url, "multi");
    let id = create_campaign(&a, &key, provider_settings, 100_000).await;
    b.start_campaign(&key, id).await;

    let done = a
        .wait_for(&key, id, 300, |v| v["status"] == "completed")
        .await;
    assert_eq!(progress(&done, "total"), 100_000);
    assert_eq!(progress(&done, "sent"), 100_000, "{done}");
    assert_eq!(provider.total(), 100_000, "every recipient reached");
    assert_eq!(provider.most_to_one_recipient(), 1, "no one sent twice");
    assert_counters_equal_rows(&database_url, &done).await;

    // Both nodes worked batches of the run.
    let mut db = PgConnection::connect(&database_url).await.unwrap();
    let per_worker: Vec<(String, i64)> = sqlx::query_as(
        "SELECT split_part(b.lease_owner, '/', 1), CAST(SUM(b.sent) AS BIGINT) FROM batches b
         JOIN runs r ON r.id = b.run_id WHERE r.campaign_id = $1
         GROUP BY split_part(b.lease_owner, '/', 1)",
    )
    .bind(id)
    .fetch_all(&mut db)
    .await
    .unwrap();
    assert_eq!(per_worker.len(), 2, "batches per worker: {per_worker:?}");
    assert!(
        per_worker.iter().all(|(_, sent)| *sent > 0),
        "{per_worker:?}"
    );
    drop((a, b));
}

/// Seed 004 frames of campaign `id` from the node at `base` until the run ends.
async fn iterations(base: String, key: String, id: i64) -> Vec<Value> {
    let url = format!(
        "{}/v1/ws/campaigns/{id}?token={key}",
        base.replacen("http", "ws", 1)
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut frames = Vec::new();
    loop {
        let message = tokio::time::timeout(Duration::from_secs(60), socket.next())
            .await
            .expect("a frame in time")
            .expect("socket open")
            .expect("frame");
        if let Message::Text(text) = message {
            let frame: Value = serde_json::from_str(&text).unwrap();
            let end = frame["type"] == "campaign_complete";
            frames.push(frame);
            if end {
                return frames;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_on_one_node_streams_a_run_another_node_works_across_a_listener_outage() {
    let dir = tempfile::tempdir().unwrap();
    let database_url = postgres_database_url().await;
    // A serves the socket and never sends; B works the run.
    let a = Node::start(
        &database_url,
        NodeOptions {
            engine: false,
            ..Default::default()
        },
        &dir.path().join("a.log"),
    )
    .await;
    let b = Node::start(
        &database_url,
        NodeOptions::default(),
        &dir.path().join("b.log"),
    )
    .await;
    let slow = json!({"kind": "simulated", "seed": 7, "latency_ms": 20,
                      "outcomes": {"completed": 1.0}});
    let key = create_key(&database_url, "multi");
    let id = create_campaign(&a, &key, slow, 8_000).await;
    let watcher = tokio::spawn(iterations(a.base.clone(), key.clone(), id));
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.start_campaign(&key, id).await;

    // Mid-run, cut every node's LISTEN connection: events appended while
    // the listeners reconnect must still reach the socket.
    a.wait_for(&key, id, 60, |v| progress(v, "sent") > 1000)
        .await;
    let mut db = PgConnection::connect(&database_url).await.unwrap();
    let cut: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE application_name = 'herald' AND query LIKE 'LISTEN%'",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    assert!(cut.len() >= 2, "both nodes listen: {cut:?}");

    let frames = watcher.await.unwrap();
    let done = a
        .wait_for(&key, id, 60, |v| v["status"] == "completed")
        .await;
    assert_eq!(progress(&done, "sent"), 8_000);

    // Every batch started and completed once, in order, with rising seqs.
    let seqs: Vec<i64> = frames.iter().filter_map(|f| f["seq"].as_i64()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "seqs rise: {seqs:?}");
    let of_type = |kind: &str| -> Vec<i64> {
        frames
            .iter()
            .filter(|f| f["type"] == kind)
            .map(|f| f["data"]["iteration"].as_i64().unwrap())
            .collect()
    };
    // The node's two tasks work batches side by side, so iterations may
    // overlap and finish out of order; each starts once and completes once,
    // after it started.
    let (starts, completes) = (of_type("iteration_start"), of_type("iteration_complete"));
    let sorted = |mut list: Vec<i64>| {
        list.sort_unstable();
        list
    };
    assert_eq!(
        sorted(starts.clone()),
        (1..=8).collect::<Vec<_>>(),
        "{starts:?}"
    );
    assert_eq!(
        sorted(completes.clone()),
        (1..=8).collect::<Vec<_>>(),
        "{completes:?}"
    );
    let at = |kind: &str, iteration: i64| {
        frames
            .iter()
            .position(|f| f["type"] == kind && f["data"]["iteration"] == iteration)
            .unwrap()
    };
    assert!(
        (1..=8).all(|i| at("iteration_start", i) < at("iteration_complete", i)),
        "{frames:?}"
    );
    // Nothing the log holds for the socket was missed.
    let logged: BTreeSet<i64> = sqlx::query_scalar(
        "SELECT seq FROM events WHERE campaign_id = $1
         AND kind IN ('batch_started', 'batch_completed', 'run_completed')",
    )
    .bind(id)
    .fetch_all(&mut db)
    .await
    .unwrap()
    .into_iter()
    .collect();
    let received: BTreeSet<i64> = seqs.into_iter().collect();
    assert!(
        logged.is_subset(&received),
        "missed: {:?}",
        logged.difference(&received).collect::<Vec<_>>()
    );
    // The listeners came back.
    let listening: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = 'herald' AND query LIKE 'LISTEN%'",
    )
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert!(listening >= 2, "{listening} listeners after the outage");
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_one_node_is_killed_mid_run_the_other_finishes_it() {
    let dir = tempfile::tempdir().unwrap();
    let database_url = postgres_database_url().await;
    let (mut a, b) = two_nodes(&database_url, dir.path()).await;
    let (provider, provider_settings) = CountingProvider::serve(Duration::from_millis(5)).await;
    let key = create_key(&database_url, "multi");
    let id = create_campaign(&a, &key, provider_settings, 20_000).await;
    a.start_campaign(&key, id).await;

    b.wait_for(&key, id, 60, |v| progress(v, "sent") > 4000)
        .await;
    a.kill();
    let sent_at_kill = provider.total();
    assert!(sent_at_kill < 20_000, "the kill came mid-run");

    // Only the two slices the dead node had claimed are written off;
    // some of them may have reached the provider.
    let done = assert_recovered_at_most_once(&b, &key, id, 20_000, &provider, &database_url).await;
    let (sent, failed) = (progress(&done, "sent"), progress(&done, "failed"));
    let reached = i64::from(provider.total());
    assert!(
        reached >= sent && reached <= sent + failed,
        "{reached} reached, {sent} sent"
    );
    drop(b);
}

#[tokio::test]
async fn the_engine_benchmark_compares_one_and_two_postgres_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let server = std::env::var("HERALD_TEST_POSTGRES_URL")
        .expect("Postgres tests need HERALD_TEST_POSTGRES_URL; run ./test.sh");
    let bench = |extra: &[&str]| {
        Command::new(HERALD)
            .args([
                "bench",
                "engine",
                "--recipients",
                "2000",
                "--in-flight",
                "64",
            ])
            .args(extra)
            .current_dir(dir.path())
            .env("RUST_LOG", "error")
            .output()
            .unwrap()
    };
    let refused = bench(&["--nodes", "2"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--nodes above 1 needs --postgres"));
    let out = bench(&["--postgres", &server, "--nodes", "1,2"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("Postgres, 2 nodes, 0 ms latency: vs 1 node"),
        "{stdout}"
    );
    let result: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("bench/results/engine.json")).unwrap(),
    )
    .unwrap();
    let runs: Vec<(String, u64)> = result["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["recipients"], 2000);
            assert!(r["recipients_per_second"].as_f64().unwrap() > 0.0);
            (
                r["backend"].as_str().unwrap().to_owned(),
                r["nodes"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        runs,
        [
            ("SQLite".into(), 1),
            ("Postgres".into(), 1),
            ("Postgres".into(), 2)
        ]
    );
    // graphile-worker (bench/setup.sh, run by test.sh) on the same server.
    assert_eq!(
        result["peer"]["name"], "graphile-worker",
        "{}",
        result["peer"]
    );
    assert!(result["peer"]["jobs_per_second"].as_f64().unwrap() > 0.0);
    assert!(
        stdout.contains("Postgres, 1 node: Herald ÷ graphile-worker"),
        "{stdout}"
    );
    // Its databases are dropped afterwards.
    let mut db = PgConnection::connect(&server).await.unwrap();
    let left: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM pg_database WHERE datname LIKE 'herald_bench_%'")
            .fetch_one(&mut db)
            .await
            .unwrap();
    assert_eq!(left, 0);
}

/// On Postgres one node works a run with two tasks, each leasing batches of
/// its own, so one's executions are written while the other's transaction
/// holds the run's row; they share the run without sending anyone twice,
/// and the executions' rewrites stay on their pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_works_a_run_with_two_tasks_on_their_own_batches() {
    let app = crate::helpers::spawn_postgres_app_with(|_| {}).await;
    let ws = app.store.workspace_by_name("alpha").await.unwrap().unwrap();
    app.store.add_credits(ws.id, 50_000, None).await.unwrap();
    let c = app
        .campaign_with_contacts(
            json!({"channel": "sms", "template": "Hi {{name}}", "sender": "ACME",
                   "provider": {"kind": "simulated", "seed": 3, "latency_ms": 20,
                                "receipt_delay_ms": 10}}),
            30_000,
        )
        .await;
    let id = c["id"].as_i64().unwrap();
    let started = app.post_empty(&format!("/v1/campaigns/{id}/start")).await;
    assert_eq!(started.status(), StatusCode::OK);
    let done = app.wait_status(&c["id"], "completed", 120).await;
    assert_eq!(
        progress(&done, "sent") + progress(&done, "failed"),
        30_000,
        "{done}"
    );
    assert_counters_equal_rows(&app.database_url, &done).await;

    let mut db = PgConnection::connect(&app.database_url).await.unwrap();
    let per_task: Vec<(String, i64)> = sqlx::query_as(
        "SELECT b.lease_owner, CAST(SUM(b.sent) AS BIGINT) FROM batches b
         JOIN runs r ON r.id = b.run_id WHERE r.campaign_id = $1 GROUP BY b.lease_owner",
    )
    .bind(id)
    .fetch_all(&mut db)
    .await
    .unwrap();
    assert_eq!(per_task.len(), 2, "batches per task: {per_task:?}");
    assert!(per_task.iter().all(|(_, sent)| *sent > 0), "{per_task:?}");
    let executions = app.all_executions(&c["id"]).await;
    assert_eq!(executions.len(), 30_000);
    assert_eq!(distinct_phones(&executions), 30_000, "every recipient once");
    assert_execution_updates_stay_on_their_pages(&app.database_url, 2 * 30_000).await;
}

/// Every rewrite of an execution (claim, send, receipt) must find room on
/// its own page, a HOT update that adds no index entry: an update that
/// moves costs an entry in each of the four indexes and bloats them
/// (migration 0010). Waits up to 30 s for the server's statistics, which
/// each connection reports when idle, to count at least `at_least` updates
/// and stop changing.
async fn assert_execution_updates_stay_on_their_pages(database_url: &str, at_least: i64) {
    let mut db = PgConnection::connect(database_url).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut last = (0i64, 0i64);
    let (updates, hot) = loop {
        let now: (i64, i64) = sqlx::query_as(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'executions'",
        )
        .fetch_one(&mut db)
        .await
        .unwrap();
        if (now.0 >= at_least && now == last) || std::time::Instant::now() > deadline {
            break now;
        }
        last = now;
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert!(
        updates >= at_least,
        "{updates} updates counted, expected {at_least}"
    );
    assert!(
        hot * 100 >= updates * 99,
        "{hot} of {updates} execution updates were HOT"
    );
}

/// A statement that cannot get its lock in time is cancelled by the
/// statement timeout: the request gets a clear 503, nothing is half-written,
/// and the same request succeeds once the lock is gone.
#[tokio::test]
async fn a_statement_timeout_is_a_503_and_the_next_request_succeeds() {
    let app = crate::helpers::spawn_postgres_app_with(|config| {
        config.store.statement_timeout = Duration::from_millis(300);
    })
    .await;
    let created = app
        .create_campaign(json!({"name": "locked", "channel": "sms", "template": "Hi"}))
        .await;
    let id = created["id"].as_i64().unwrap();
    let mut blocker = PgConnection::connect(&app.database_url).await.unwrap();
    let mut tx = blocker.begin().await.unwrap();
    sqlx::query("LOCK TABLE campaigns IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .unwrap();
    let renamed = app
        .request(reqwest::Method::PATCH, &format!("/v1/campaigns/{id}"))
        .json(&json!({"name": "renamed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(renamed.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = renamed.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    tx.rollback().await.unwrap();

    assert_eq!(app.campaign(&json!(id)).await["name"], "locked");
    let renamed = app
        .request(reqwest::Method::PATCH, &format!("/v1/campaigns/{id}"))
        .json(&json!({"name": "renamed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(renamed.status(), StatusCode::OK);
    assert_eq!(app.campaign(&json!(id)).await["name"], "renamed");
}

/// Postgres going away under load, as a restart looks to its clients: every
/// connection Herald holds is cut and new ones are refused for a while.
/// Meanwhile requests fail with 503 `unavailable` (never a 500, never a
/// hang); once the database is back, everything recovers by itself: the
/// run completes, no one is sent twice, counters equal rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_going_away_under_load_is_503s_then_recovers_by_itself() {
    let dir = tempfile::Builder::new()
        .disable_cleanup(true)
        .tempdir()
        .unwrap();
    eprintln!("DIR {:?}", dir.path());
    let database_url = postgres_database_url().await;
    let node = Node::start(
        &database_url,
        NodeOptions::default(),
        &dir.path().join("node.log"),
    )
    .await;
    let (provider, provider_settings) = CountingProvider::serve(Duration::from_millis(2)).await;
    let key = create_key(&database_url, "outage");
    let id = create_campaign(&node, &key, provider_settings, 20_000).await;
    node.start_campaign(&key, id).await;
    node.wait_for(&key, id, 60, |v| progress(v, "sent") > 2_000)
        .await;

    let name = database_url
        .rsplit('/')
        .next()
        .unwrap()
        .split('?')
        .next()
        .unwrap()
        .to_owned();
    let server = std::env::var("HERALD_TEST_POSTGRES_URL").unwrap();
    let mut admin = PgConnection::connect(&server).await.unwrap();
    sqlx::query(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"))
        .execute(&mut admin)
        .await
        .unwrap();
    let cut: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(&name)
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert!(!cut.is_empty(), "Herald's connections were cut");
    let sent_at_outage = provider.total();

    let client = reqwest::Client::new();
    let mut unavailable = 0;
    let outage_ends = tokio::time::Instant::now() + Duration::from_secs(4);
    while tokio::time::Instant::now() < outage_ends {
        let response = client
            .get(format!("{}/v1/campaigns/{id}", node.base))
            .bearer_auth(&key)
            .timeout(Duration::from_secs(15))
            .send()
            .await
            .expect("answered, not hung");
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        match status {
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(body["error"]["code"], "unavailable", "{body}");
                unavailable += 1;
            }
            other => panic!("during the outage: {other} {body}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(unavailable >= 3, "{unavailable} answers during the outage");
    // Sends stop with the database: nothing is sent that cannot be recorded.
    assert!(
        i64::from(provider.total())
            <= i64::from(sent_at_outage) + NodeOptions::default().sends_in_hand(&database_url),
        "{} sent during the outage",
        provider.total() - sent_at_outage
    );

    sqlx::query(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"))
        .execute(&mut admin)
        .await
        .unwrap();
    assert_recovered_at_most_once(&node, &key, id, 20_000, &provider, &database_url).await;
    let ready = client
        .get(format!("{}/readyz", node.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::OK, "ready again");
    drop(node);
}
