//! Retention: the purge removes exactly what the settings say, in chunks,
//! and the seed endpoints answer correctly afterwards — totals from the
//! runs' counters unchanged, seed-001 pages over what is kept.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{spawn_app, spawn_app_with, TestApp};

/// An SMS campaign of `n` contacts run to the end, receipts included.
async fn finished_sms_campaign(app: &TestApp, n: usize) -> Value {
    let c = app
        .campaign_with_contacts(
            json!({"channel": "sms", "template": "Hello {{name}}", "sender": "HERALD",
                   "provider": {"kind": "simulated", "receipt_delay_ms": 0}}),
            n,
        )
        .await;
    app.post_empty(&format!("/v1/campaigns/{}/start", c["id"]))
        .await;
    wait_settled(app, &c["id"], 1).await;
    c
}

/// Waits until the campaign has `runs` runs, the last one completed with
/// every receipt in.
async fn wait_settled(app: &TestApp, id: &Value, runs: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let c = app.campaign(id).await;
        let p = &c["progress"];
        let settled = c["status"] == "completed"
            && p["delivered"].as_i64().unwrap() + p["failed_delivery"].as_i64().unwrap()
                == p["sent"].as_i64().unwrap();
        if settled && app.runs(id).await["runs"].as_array().unwrap().len() == runs {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "not settled: {c}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Purges the executions of every run ended so far, `chunk` at a time.
async fn purge_every_ended_run(app: &TestApp, chunk: i64) {
    while app
        .store
        .purge_executions(herald::store::now_ms() + 1, chunk)
        .await
        .unwrap()
        > 0
    {}
}

async fn page(app: &TestApp, id: &Value, query: &str) -> Value {
    let response = app
        .get(&format!("/api/v1/campaigns/{id}/executions?{query}"))
        .await;
    assert_eq!(response.status(), StatusCode::OK, "{query}");
    response.json().await.unwrap()
}

#[tokio::test]
async fn purging_an_ended_run_keeps_its_totals_and_the_newer_runs_pages() {
    let app = spawn_app().await;
    let c = finished_sms_campaign(&app, 300).await;
    let id = c["id"].as_i64().unwrap();
    let uuid = c["uuid"].as_str().unwrap().to_owned();
    let first_run_id = app.briq(&format!("/v1/campaign/{uuid}/status")).await["campaign_run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let rerun = app
        .post(
            &format!("/v1/campaigns/{id}/runs"),
            &json!({"recipients": "all"}),
        )
        .await;
    assert_eq!(rerun.status(), StatusCode::CREATED);
    wait_settled(&app, &c["id"], 2).await;

    let before = app.all_executions(&c["id"]).await;
    assert_eq!(before.len(), 600);
    let runs = app.store.runs_of(id).await.unwrap();
    let (second, first) = (&runs[0], &runs[1]);
    let second_ended = second.completed_at.unwrap();
    assert!(first.completed_at.unwrap() < second_ended);
    let status = app.briq(&format!("/v1/campaign/{uuid}/status")).await;
    let analytics = app.briq(&format!("/v1/campaign/{uuid}/analytics")).await;
    let first_run_path = format!("/v1/campaign/{uuid}/runs/{first_run_id}");
    let mut first_run = app.briq(&first_run_path).await;

    // Retention "ended before the second run ended": the first run goes,
    // 64 rows at a time; the second stays.
    let mut steps = 0;
    while app.store.purge_executions(second_ended, 64).await.unwrap() > 0 {
        steps += 1;
        assert!(steps < 100, "the purge does not end");
    }
    assert!(steps >= 300 / 64, "purged in chunks: {steps} steps");

    // Seed 001 counts and pages over the second run's executions exactly
    // as it did before: the same rows at the same offsets.
    let kept = app.all_executions(&c["id"]).await;
    assert_eq!(kept, before[..300]);
    let first_page = page(&app, &c["id"], "per_page=7&page=1").await;
    assert_eq!(
        first_page["pagination"],
        json!({"page": 1, "per_page": 7, "total_items": 300, "total_pages": 43,
               "has_next": true, "has_prev": false})
    );
    for n in [2, 20, 43] {
        let got = page(&app, &c["id"], &format!("per_page=7&page={n}")).await;
        let from = (n - 1) * 7;
        let expected = &before[from..(from + 7).min(300)];
        assert_eq!(got["executions"].as_array().unwrap(), expected, "page {n}");
    }
    let delivered_kept = before[..300]
        .iter()
        .filter(|e| e["status"] == "completed")
        .count();
    let completed = page(&app, &c["id"], "status=completed&per_page=1000").await;
    assert_eq!(
        completed["executions"].as_array().unwrap().len(),
        delivered_kept
    );

    // Totals come from the runs' counters: unchanged.
    assert_eq!(
        app.briq(&format!("/v1/campaign/{uuid}/status")).await,
        status
    );
    assert_eq!(
        app.briq(&format!("/v1/campaign/{uuid}/analytics")).await,
        analytics
    );
    // The run's detail keeps its counters; its recipients are gone.
    let mut first_run_after = app.briq(&first_run_path).await;
    assert_eq!(first_run_after["recipients"], json!([]));
    first_run_after["recipients"] = Value::Null;
    first_run["recipients"] = Value::Null;
    first_run_after["recipients_truncated"] = Value::Null;
    first_run["recipients_truncated"] = Value::Null;
    assert_eq!(first_run_after, first_run);

    // Once the second run's time is up too, nothing is listed and nothing
    // else changes.
    purge_every_ended_run(&app, 1000).await;
    let empty = page(&app, &c["id"], "per_page=50").await;
    assert_eq!(empty["executions"], json!([]));
    assert_eq!(empty["pagination"]["total_items"], 0);
    assert_eq!(
        app.briq(&format!("/v1/campaign/{uuid}/analytics")).await,
        analytics
    );
    assert_eq!(app.campaign(&c["id"]).await["progress"]["total"], 300);
}

#[tokio::test]
async fn the_metrics_purge_removes_only_buckets_older_than_the_cut() {
    let app = spawn_app().await;
    let c = finished_sms_campaign(&app, 200).await;
    let id = c["id"].as_i64().unwrap();
    let buckets = app.store.metrics_history(id, 0).await.unwrap();
    assert!(!buckets.is_empty());
    let newest = buckets.iter().map(|b| b.minute).max().unwrap();
    let older = buckets.iter().filter(|b| b.minute < newest).count() as u64;

    let mut purged = 0;
    loop {
        let n = app.store.purge_metrics(newest, 1).await.unwrap();
        if n == 0 {
            break;
        }
        purged += n;
    }
    assert_eq!(purged, older);
    let left = app.store.metrics_history(id, 0).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].minute, newest);
}

/// The background purge, configured as an operator would: executions of
/// ended runs go, the campaign's totals stay.
#[tokio::test]
async fn the_background_purge_follows_the_execution_retention_setting() {
    let app = spawn_app_with(|c| {
        c.retention.execution_age = Some(Duration::ZERO);
        c.retention.interval = Duration::from_millis(100);
    })
    .await;
    // Receipts may find their executions gone: only the sends are awaited.
    let c = app
        .campaign_with_contacts(
            json!({"channel": "sms", "template": "Hello {{name}}", "sender": "HERALD",
                   "provider": {"kind": "simulated", "receipt_delay_ms": 0}}),
            250,
        )
        .await;
    app.post_empty(&format!("/v1/campaigns/{}/start", c["id"]))
        .await;
    app.wait_status(&c["id"], "completed", 60).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !app.all_executions(&c["id"]).await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "executions not purged"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = app.campaign(&c["id"]).await;
    assert_eq!(after["progress"]["total"], 250);
    assert_eq!(
        after["progress"]["sent"].as_i64().unwrap() + after["progress"]["failed"].as_i64().unwrap(),
        250
    );
}

/// Provider message ids live in a table of their own (receipts and
/// callbacks are matched through it), which must hold exactly the kept
/// executions' current ids: a retried call's first id goes when the retry's
/// replaces it, and a purged run's ids go with its executions. Read from
/// the SQLite file, as an operator auditing what is stored would.
#[tokio::test]
async fn provider_ids_are_exactly_those_of_the_kept_executions() {
    use std::collections::BTreeSet;
    let app = crate::helpers::spawn_sqlite_app_with(|_| {}).await;
    let c = app
        .campaign_with_contacts(
            json!({"channel": "voice", "template": "Hello {{name}}", "sender": "+15550001234",
                   "max_attempts": 3,
                   "provider": {"kind": "simulated", "seed": 4,
                                "outcomes": {"completed": 0.4, "no_answer": 0.6}}}),
            300,
        )
        .await;
    app.post_empty(&format!("/v1/campaigns/{}/start", c["id"]))
        .await;
    app.wait_status(&c["id"], "completed", 60).await;
    let retried = app
        .all_executions(&c["id"])
        .await
        .into_iter()
        .filter(|e| e["execution_data"]["attempts"].as_i64().unwrap() > 1)
        .count();
    assert!(retried > 100, "only {retried} calls were retried");

    let db = sqlx::sqlite::SqlitePoolOptions::new()
        .connect_with(
            <sqlx::sqlite::SqliteConnectOptions as std::str::FromStr>::from_str(&app.database_url)
                .unwrap()
                .read_only(true),
        )
        .await
        .unwrap();
    let stored = |sql: &'static str| {
        let db = db.clone();
        async move {
            sqlx::query_as::<_, (String, i64)>(sql)
                .fetch_all(&db)
                .await
                .unwrap()
                .into_iter()
                .collect::<BTreeSet<_>>()
        }
    };
    let current = stored(
        "SELECT provider_message_id, id FROM executions WHERE provider_message_id IS NOT NULL",
    )
    .await;
    assert_eq!(current.len(), 300, "every call got through to the provider");
    let matched_by =
        stored("SELECT provider_message_id, execution_id FROM provider_messages").await;
    assert_eq!(matched_by, current);

    purge_every_ended_run(&app, 64).await;
    assert_eq!(
        stored("SELECT provider_message_id, execution_id FROM provider_messages").await,
        BTreeSet::new()
    );
}
