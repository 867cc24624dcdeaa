//! The engine end to end on the simulated provider: counters against rows,
//! batches, receipts, retries, pause/resume/cancel, resend, credits.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{count_by_status, distinct_phones, error_of, spawn_app, TestApp};
use herald::store::{ExecutionOutcome, PendingExecution, RunRecord, RunSnapshot};

fn progress(c: &Value, key: &str) -> i64 {
    c["progress"][key].as_i64().unwrap()
}

#[tokio::test]
async fn a_10k_sms_campaign_completes_with_counters_equal_to_rows() {
    let app = spawn_app().await;
    let ws = app.store.workspace_by_name("alpha").await.unwrap().unwrap();
    app.store
        .add_credits(ws.id, 50_000, Some("test"))
        .await
        .unwrap();
    let c = app
        .campaign_with_contacts(
            json!({"channel": "sms", "template": "Hi {{name}}, your code is ready", "sender": "ACME",
                   "provider": {"kind": "simulated", "seed": 1, "receipt_delay_ms": 10}}),
            10_000,
        )
        .await;
    assert_eq!(
        app.post_empty(&format!("/v1/campaigns/{}/start", c["id"]))
            .await
            .status(),
        StatusCode::OK
    );
    app.wait_status(&c["id"], "completed", 60).await;
    // Receipts lag sends; wait for every sent message to have one.
    let done = app
        .wait_campaign(&c["id"], 30, |c| {
            progress(c, "delivered") + progress(c, "failed_delivery") == progress(c, "sent")
        })
        .await;

    let executions = app.all_executions(&c["id"]).await;
    assert_eq!(executions.len(), 10_000);
    let by_status = count_by_status(&executions);
    let sent = progress(&done, "sent");
    let failed = progress(&done, "failed");
    assert_eq!(by_status.get("completed").copied().unwrap_or(0), sent);
    assert_eq!(by_status.get("failed").copied().unwrap_or(0), failed);
    assert_eq!(sent + failed, 10_000);
    assert!(
        sent > 9_000 && failed > 0,
        "the default mix has a few failures: {sent}/{failed}"
    );
    let delivered_rows = executions
        .iter()
        .filter(|e| e["execution_data"]["message_status"] == "delivered")
        .count() as i64;
    assert_eq!(delivered_rows, progress(&done, "delivered"));
    assert_eq!(
        progress(&done, "pending") + progress(&done, "processing"),
        0
    );
    assert_eq!(done["progress"]["progress_percentage"], 100.0);

    // Every recipient once, with its personalised message and an sms_id.
    assert_eq!(distinct_phones(&executions), 10_000);
    let one = executions
        .iter()
        .find(|e| e["status"] == "completed")
        .unwrap();
    assert!(one["sms_id"].as_str().unwrap().starts_with("SM"));
    assert_eq!(
        one["execution_data"]["personalized_welcome_message"],
        format!(
            "Hi {}, your code is ready",
            one["contact_name"].as_str().unwrap()
        )
    );

    // Batches: ten of 1000, their counts add up to the run's.
    let runs = app.runs(&c["id"]).await;
    let run_uuid = runs["runs"][0]["uuid"].as_str().unwrap().to_owned();
    let detail = app
        .briq(&format!(
            "/v1/campaign/{}/runs/{run_uuid}",
            c["uuid"].as_str().unwrap()
        ))
        .await;
    let batches = detail["batches"].as_array().unwrap();
    assert_eq!(batches.len(), 10);
    assert!(batches
        .iter()
        .all(|b| b["recipient_count"] == 1000 && b["status"] == "completed"));
    let batch_sent: i64 = batches
        .iter()
        .map(|b| b["sent_count"].as_i64().unwrap())
        .sum();
    let batch_failed: i64 = batches
        .iter()
        .map(|b| b["failed_count"].as_i64().unwrap())
        .sum();
    assert_eq!((batch_sent, batch_failed), (sent, failed));
    assert_eq!(detail["run"]["current_batch"], 10);

    // Credits: 1 part per message; only what was sent is kept.
    let credits: Value = app.get("/v1/credits").await.json().await.unwrap();
    assert_eq!(credits["balance"], 50_000 - sent);
    let ledger = credits["ledger"].as_array().unwrap();
    let ledger_sum: i64 = ledger.iter().map(|e| e["amount"].as_i64().unwrap()).sum();
    assert_eq!(
        ledger_sum,
        credits["balance"].as_i64().unwrap(),
        "the ledger balances"
    );
    let kinds: Vec<&str> = ledger.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["refund", "reserve", "topup"]);
    assert_eq!(ledger[1]["amount"], -10_000);
    assert_eq!(ledger[0]["amount"], failed);

    // Analytics agree with the run.
    let analytics = app
        .briq(&format!(
            "/v1/campaign/{}/analytics",
            c["uuid"].as_str().unwrap()
        ))
        .await;
    assert_eq!(analytics["sent_count"], sent);
    assert_eq!(analytics["failed_count"], failed);
    assert_eq!(analytics["total_recipients"], 10_000);
    assert_eq!(analytics["pending_delivery_count"], 0);
    let rate = analytics["delivery_rate"].as_f64().unwrap();
    let expected = progress(&done, "delivered") as f64 / sent as f64;
    assert!((rate - expected).abs() < 0.0001, "{rate} vs {expected}");
}

#[tokio::test]
async fn a_voice_campaign_retries_then_resends_to_failures() {
    let app = spawn_app().await;
    let c = app
        .campaign_with_contacts(
            json!({"channel": "voice", "template": "Hello {{name}}", "sender": "+15550001234", "max_attempts": 2,
                   "provider": {"kind": "simulated", "seed": 9,
                                "outcomes": {"completed": 0.5, "no_answer": 0.3, "busy": 0.2}}}),
            1_500,
        )
        .await;
    app.post_empty(&format!("/v1/campaigns/{}/start", c["id"]))
        .await;
    let done = app.wait_status(&c["id"], "completed", 60).await;
    let executions = app.all_executions(&c["id"]).await;
    let by_status = count_by_status(&executions);
    let unreached = by_status.get("no_answer").copied().unwrap_or(0)
        + by_status.get("busy").copied().unwrap_or(0);
    assert_eq!(progress(&done, "failed"), unreached);
    assert_eq!(progress(&done, "sent"), by_status["completed"]);
    // Each unreached recipient was tried twice; retries say why.
    for e in executions
        .iter()
        .filter(|e| e["status"] == "no_answer" || e["status"] == "busy")
    {
        assert_eq!(e["execution_data"]["attempts"], 2, "{e}");
        assert_eq!(
            e["execution_data"]["retry_reason"],
            "gave up after 2 attempts"
        );
        assert!(e["call_id"].as_str().unwrap().starts_with("CA"));
    }
    // About half succeed on the first try, a further share on the second.
    let retried_ok = executions
        .iter()
        .filter(|e| e["status"] == "completed" && e["execution_data"]["attempts"] == 2)
        .count();
    assert!(retried_ok > 100, "{retried_ok}");
    assert!(executions
        .iter()
        .filter(|e| e["status"] == "completed")
        .all(|e| e["execution_data"]["duration_seconds"].is_i64()));

    // Resend to failures: a second run with exactly the unreached contacts.
    let rerun = app
        .post(
            &format!("/v1/campaigns/{}/runs", c["id"]),
            &json!({"recipients": "failed"}),
        )
        .await;
    assert_eq!(rerun.status(), StatusCode::CREATED);
    let again = app
        .wait_campaign(&c["id"], 60, |c| {
            c["status"] == "completed" && c["progress"]["total"] == unreached
        })
        .await;
    assert_eq!(
        progress(&again, "sent") + progress(&again, "failed"),
        unreached
    );
    let runs = app.runs(&c["id"]).await;
    assert_eq!(runs["runs"].as_array().unwrap().len(), 2);
    assert_eq!(runs["runs"][0]["recipients"], "failed");
    // Seed 001 pages span both runs, newest first, with nothing skipped or
    // repeated at any offset (pages of 7 cut across the runs' boundary).
    let every = app.all_executions(&c["id"]).await;
    let ids: Vec<i64> = every.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert_eq!(ids.len() as i64, executions.len() as i64 + unreached);
    assert!(
        ids.windows(2).all(|w| w[0] > w[1]),
        "newest first, no repeats"
    );
    for page in [2, 3, (ids.len() / 7) as i64] {
        let got: Value = app
            .get(&format!(
                "/api/v1/campaigns/{}/executions?per_page=7&page={page}",
                c["id"]
            ))
            .await
            .json()
            .await
            .unwrap();
        let got: Vec<i64> = got["executions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_i64().unwrap())
            .collect();
        let from = (page as usize - 1) * 7;
        assert_eq!(got, ids[from..(from + 7).min(ids.len())], "page {page}");
    }

    let bad = app
        .post(
            &format!("/v1/campaigns/{}/runs", c["id"]),
            &json!({"recipients": "some"}),
        )
        .await;
    assert_eq!(
        error_of(bad, StatusCode::UNPROCESSABLE_ENTITY).await["field"],
        "recipients"
    );
}

#[tokio::test]
async fn pause_stops_sending_resume_continues_and_cancel_skips_the_rest() {
    let app = crate::helpers::spawn_app_with(|c| {
        if let Some(engine) = c.engine.as_mut() {
            engine.in_flight = 8;
            engine.slice = 16;
        }
    })
    .await;
    let c = app
        .campaign_with_contacts(
            json!({"channel": "sms", "template": "Hi {{name}}",
                   "provider": {"kind": "simulated", "latency_ms": 20, "receipt_delay_ms": 0}}),
            600,
        )
        .await;
    let id = c["id"].clone();
    app.post_empty(&format!("/v1/campaigns/{id}/start")).await;
    app.wait_campaign(&id, 30, |c| progress(c, "sent") > 50)
        .await;

    let paused = app.post_empty(&format!("/v1/campaigns/{id}/pause")).await;
    assert_eq!(paused.status(), StatusCode::OK);
    // At most the slice in flight finishes after a pause.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let frozen = app.campaign(&id).await;
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    let still = app.campaign(&id).await;
    assert_eq!(still["status"], "paused");
    assert_eq!(
        progress(&frozen, "sent") + progress(&frozen, "failed"),
        progress(&still, "sent") + progress(&still, "failed"),
        "no sends while paused"
    );
    assert_eq!(progress(&still, "processing"), 0);
    assert!(progress(&still, "pending") > 0);

    app.post_empty(&format!("/v1/campaigns/{id}/resume")).await;
    let moving = app
        .wait_campaign(&id, 30, |c| {
            progress(c, "sent") > progress(&still, "sent") + 30
        })
        .await;
    assert_eq!(moving["status"], "running");

    let cancelled = app.post_empty(&format!("/v1/campaigns/{id}/cancel")).await;
    assert_eq!(cancelled.status(), StatusCode::OK);
    let end = app
        .wait_campaign(&id, 30, |c| c["progress"]["run_status"] == "cancelled")
        .await;
    assert_eq!(end["status"], "cancelled");
    let (sent, failed, skipped) = (
        progress(&end, "sent"),
        progress(&end, "failed"),
        progress(&end, "skipped"),
    );
    assert_eq!(sent + failed + skipped, 600);
    assert!(skipped > 0, "unsent recipients are skipped");
    let by_status = count_by_status(&app.all_executions(&id).await);
    assert_eq!(by_status["skipped"], skipped);
    assert_eq!(by_status.get("pending"), None);
    assert_eq!(by_status.get("in_progress"), None);
    let after = app.campaign(&id).await;
    assert_eq!(
        progress(&after, "skipped"),
        skipped,
        "nothing moves after cancel"
    );
}

/// Starts campaign `c` and waits for its run to fail: the run's error.
async fn start_and_read_failure(app: &TestApp, c: &Value) -> String {
    app.post_empty(&format!("/v1/campaigns/{}/start", c["id"]))
        .await;
    app.wait_status(&c["id"], "failed", 30).await;
    let runs = app.runs(&c["id"]).await;
    runs["runs"][0]["error"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_run_the_workspace_cannot_pay_for_fails_at_claim() {
    let app = spawn_app().await;
    let ws = app.store.workspace_by_name("alpha").await.unwrap().unwrap();
    app.store.add_credits(ws.id, 10, None).await.unwrap();
    // 161 GSM characters: two parts per message, 40 parts for 20 contacts.
    let long = format!("{{{{name}}}} {}", "x".repeat(158));
    let c = app
        .campaign_with_contacts(json!({"channel": "sms", "template": long}), 20)
        .await;
    let error = start_and_read_failure(&app, &c).await;
    let failed = app.campaign(&c["id"]).await;
    assert_eq!(progress(&failed, "skipped"), 20);
    assert_eq!(progress(&failed, "sent"), 0);
    assert!(
        error.contains("insufficient credits")
            && error.contains("costs 40")
            && error.contains("has 10"),
        "{error}"
    );
    let credits: Value = app.get("/v1/credits").await.json().await.unwrap();
    assert_eq!(credits["balance"], 10, "nothing was taken");

    // Without variables every message costs the same: 3 parts × 20. A
    // backtick is outside GSM-7, so the 151 characters are UCS-2 (67 a part).
    let fixed = format!("`{}", "y".repeat(150));
    let c = app
        .campaign_with_contacts(json!({"channel": "sms", "template": fixed}), 20)
        .await;
    let error = start_and_read_failure(&app, &c).await;
    assert!(error.contains("costs 60"), "{error}");
}

#[tokio::test]
async fn a_run_is_priced_recipient_by_recipient_across_all_of_it() {
    // Pricing reads a run in parts of 20,000 executions, several at once:
    // 25,000 recipients span two. Each message's parts follow its own
    // name and city; a city with a quote is stored escaped, and one with a
    // backtick (outside GSM-7) makes the message UCS-2.
    let app = spawn_app().await;
    let ws = app.store.workspace_by_name("alpha").await.unwrap().unwrap();
    app.store.add_credits(ws.id, 10, None).await.unwrap();
    let body = format!("{{{{name}}}} {{{{city}}}} {}", "x".repeat(140));
    let c = app
        .create_campaign(json!({"name": "Priced", "channel": "sms", "template": body}))
        .await;
    let long_name = "Bartholomew-Featherstonehaugh";
    let mut csv = String::from("phone,name,city\n");
    let mut expected = 0;
    for i in 0..25_000u32 {
        let long = i % 4 == 0;
        let quoted = i % 5 == 0;
        let name = if long { long_name } else { "Al" };
        let city = if quoted { "\"Q\"\"`s\"" } else { "Paris" };
        csv.push_str(&format!("+1555{i:07},{name},{city}\n"));
        // 149 GSM-7 characters are one part, 176 two (153 a part); 148 or
        // 175 UCS-2 characters are three (67 a part).
        expected += match (long, quoted) {
            (false, false) => 1,
            (true, false) => 2,
            (_, true) => 3,
        };
    }
    assert_eq!(expected, 40_000);
    let report: Value = app.import_csv(&c, csv).await.json().await.unwrap();
    assert_eq!(report["imported"], 25_000, "{report}");
    let error = start_and_read_failure(&app, &c).await;
    assert!(
        error.contains(&format!("costs {expected}")) && error.contains("has 10"),
        "{error}"
    );
}

#[tokio::test]
async fn a_scheduled_campaign_starts_on_time() {
    let app = spawn_app().await;
    let c = app
        .campaign_with_contacts(json!({"channel": "sms", "template": "Hi {{name}}"}), 5)
        .await;
    let at = chrono::Utc::now() + chrono::Duration::milliseconds(1500);
    let scheduled: Value = app
        .post(
            &format!("/v1/campaigns/{}/schedule", c["id"]),
            &json!({"start_at": at.to_rfc3339()}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(scheduled["status"], "scheduled");
    let status = app
        .briq(&format!(
            "/v1/campaign/{}/status",
            c["uuid"].as_str().unwrap()
        ))
        .await;
    assert_eq!(status["status"], "scheduled");
    let running = app
        .wait_campaign(&c["id"], 10, |c| c["status"] != "scheduled")
        .await;
    let started =
        chrono::DateTime::parse_from_rfc3339(running["started_at"].as_str().unwrap()).unwrap();
    let lag = (started.with_timezone(&chrono::Utc) - at).num_milliseconds();
    assert!((0..1000).contains(&lag), "picked up {lag} ms after due");
    app.wait_status(&c["id"], "completed", 30).await;
}

#[tokio::test]
async fn the_per_sender_rate_limit_paces_sends() {
    let app = crate::helpers::spawn_app_with(|c| {
        if let Some(engine) = c.engine.as_mut() {
            engine.sender_rate = std::num::NonZeroU32::new(20);
        }
    })
    .await;
    let c = app
        .campaign_with_contacts(
            json!({"channel": "sms", "template": "Hi {{name}}", "sender": "ACME"}),
            60,
        )
        .await;
    let started = std::time::Instant::now();
    app.post_empty(&format!("/v1/campaigns/{}/start", c["id"]))
        .await;
    app.wait_status(&c["id"], "completed", 30).await;
    // A burst of 20, then 20 per second: the other 40 need two seconds.
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(1800),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_run_freezes_exactly_its_campaigns_contacts_in_import_order_however_they_interleave() {
    // The freeze reads a campaign's contacts along their id range when the
    // ids are dense, and through the campaign's index when other
    // campaigns' contacts sit between them; it numbers them by id when
    // every id of the range is the campaign's, and by a window otherwise.
    // Each must copy the same recipients, numbered in import (id) order.
    let app = spawn_app().await;
    let template = json!({"name": "Freeze", "channel": "sms", "template": "Hi {{name}}"});
    let sparse = app.create_campaign(template.clone()).await;
    let dense = app.create_campaign(template.clone()).await;
    let gappy = app.create_campaign(template).await;
    let csv = |prefix: u32, range: std::ops::Range<u32>| {
        let mut csv = String::from("phone,name\n");
        for i in range {
            csv.push_str(&format!("+1{prefix}{i:07},P{i}\n"));
        }
        csv
    };
    // sparse: 3 contacts, then 40 of dense's, then 3 more of sparse's;
    // gappy: 5 contacts, 2 of sparse's, then 4 more of gappy's (a dense
    // range, not all of it gappy's).
    for (campaign, body) in [
        (&sparse, csv(555, 0..3)),
        (&dense, csv(666, 0..40)),
        (&sparse, csv(555, 3..6)),
        (&gappy, csv(777, 0..5)),
        (&sparse, csv(555, 6..8)),
        (&gappy, csv(777, 5..9)),
    ] {
        let report: Value = app.import_csv(campaign, body).await.json().await.unwrap();
        assert_eq!(report["invalid"], 0, "{report}");
    }
    for (campaign, prefix, count) in [(&sparse, 555, 8), (&dense, 666, 40), (&gappy, 777, 9)] {
        app.post_empty(&format!("/v1/campaigns/{}/start", campaign["id"]))
            .await;
        app.wait_status(&campaign["id"], "completed", 30).await;
        let mut executions = app.all_executions(&campaign["id"]).await;
        executions.sort_by_key(|e| e["id"].as_i64().unwrap());
        let phones: Vec<&str> = executions
            .iter()
            .map(|e| e["contact_phone"].as_str().unwrap())
            .collect();
        let expected: Vec<String> = (0..count).map(|i| format!("+1{prefix}{i:07}")).collect();
        assert_eq!(phones, expected, "campaign {}", campaign["id"]);
        let contact_ids: Vec<i64> = executions
            .iter()
            .map(|e| e["contact_id"].as_i64().unwrap())
            .collect();
        assert!(
            contact_ids.windows(2).all(|w| w[0] < w[1]),
            "numbered in contact order: {contact_ids:?}"
        );
        // Pages by offset (newest first) seek the numbers the freeze gave:
        // small pages must still come out as the whole run, once each.
        let paged: Vec<String> = app
            .executions_in_pages(&campaign["id"], 3)
            .await
            .iter()
            .map(|e| e["contact_phone"].as_str().unwrap().to_owned())
            .collect();
        let newest_first: Vec<String> = expected.iter().rev().cloned().collect();
        assert_eq!(paged, newest_first, "pages of campaign {}", campaign["id"]);
    }
}

/// Starts an SMS campaign of `contacts` through the API, then claims,
/// freezes and starts its run through the store as worker "a" would (the
/// app has no engine): the campaign, the run and the time it used.
async fn run_started_by_hand(app: &TestApp, contacts: usize) -> (Value, RunRecord, i64) {
    use herald::domain::{Channel, ProviderSettings};
    let c = app
        .campaign_with_contacts(
            json!({"channel": "sms", "template": "Hi {{name}}"}),
            contacts,
        )
        .await;
    let started = app
        .post_empty(&format!("/v1/campaigns/{}/start", c["id"]))
        .await;
    assert_eq!(started.status(), StatusCode::OK);
    let now = herald::store::now_ms();
    let run = app
        .store
        .claim_run("a", now, 60_000, &[])
        .await
        .unwrap()
        .expect("the started run is due");
    let snapshot = RunSnapshot {
        channel: Channel::Sms,
        provider: ProviderSettings::default(),
        sender: None,
        template: "Hi {{name}}".into(),
        max_attempts: 1,
    };
    app.store.freeze_run(run.id, &snapshot).await.unwrap();
    app.store
        .start_run(run.id, contacts as i64, now)
        .await
        .unwrap();
    (c, run, now)
}

/// Each execution sent, with a provider id of `prefix` and its id.
fn sent(executions: &[PendingExecution], prefix: &str) -> Vec<ExecutionOutcome> {
    executions
        .iter()
        .map(|e| ExecutionOutcome {
            id: e.id,
            batch_sequence: e.batch_sequence,
            attempt: e.attempt,
            status: herald::domain::ExecutionStatus::Completed,
            message_status: Some("sent"),
            provider_id: Some(format!("{prefix}-{}", e.id)),
            duration_seconds: None,
            error_details: None,
            retry_reason: None,
            next_attempt_at: None,
            charged_units: 1,
        })
        .collect()
}

#[tokio::test]
async fn outcomes_a_worker_records_after_its_sends_were_written_off_are_not_counted() {
    // Worker "a" claims a slice, then stalls past its lease; worker "b"
    // takes the batch over and writes a's sends off as failed (they may or
    // may not have reached anyone). When "a" comes back and records them as
    // sent, nothing changes: each recipient is counted once.
    let app = crate::helpers::spawn_app_with(|config| config.engine = None).await;
    let (c, run, now) = run_started_by_hand(&app, 10).await;
    let store = &app.store;
    let taken = store
        .take_slice(run.id, "a/1", now, now + 1_000, 10)
        .await
        .unwrap();
    assert_eq!(taken.executions.len(), 10);

    // After a's lease: b takes the batch and writes off what a had claimed.
    let later = now + 2_000;
    store
        .take_slice(run.id, "b/1", later, later + 60_000, 10)
        .await
        .unwrap();
    let outcomes = sent(&taken.executions, "late");
    let recorded = store
        .record_outcomes(run.id, &outcomes, later + 1_000)
        .await
        .unwrap();
    let counters = recorded.run.counters;
    assert_eq!(
        (counters.sent, counters.failed, counters.processing),
        (0, 10, 0),
        "{counters:?}"
    );
    let executions = app.all_executions(&c["id"]).await;
    assert_eq!(count_by_status(&executions).get("failed"), Some(&10));
    assert!(
        executions.iter().all(|e| e["sms_id"].is_null()),
        "no late provider id was kept: {executions:?}"
    );
}

#[tokio::test]
async fn a_slices_progress_event_is_its_transactions_last_write_stamped_as_written() {
    // A client measures the stream from an event's `ts` to its arrival, so
    // `ts` must be when the counters it carries were committed: not the
    // time the engine began the transaction, and with the slice it claimed.
    let app = crate::helpers::spawn_app_with(|config| config.engine = None).await;
    let (c, run, now) = run_started_by_hand(&app, 10).await;
    let store = &app.store;
    let taken = store
        .take_slice(run.id, "a/1", now, now + 60_000, 4)
        .await
        .unwrap();
    assert_eq!(taken.executions.len(), 4);
    let outcomes = sent(&taken.executions, "sent");
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let before = herald::store::now_ms();
    let (update, slice) = store
        .record_and_take(run.id, &outcomes, "a/1", now, now + 60_000, 4)
        .await
        .unwrap();
    assert_eq!(slice.executions.len(), 4);
    let progress = update.events.last().expect("events");
    assert_eq!(progress.kind, "progress");
    assert!(
        progress.created_at >= before,
        "stamped {} ms before the write began",
        before - progress.created_at
    );
    // The last in the log, carrying the committed counters: four sent, the
    // next four claimed, two still pending.
    let log = store
        .events_since(c["id"].as_i64().unwrap(), 0, 1000)
        .await
        .unwrap();
    assert_eq!(log.last().map(|e| e.seq), Some(progress.seq));
    let counters = &progress.data["campaign"]["run"]["counters"];
    assert_eq!(
        (
            &counters["sent"],
            &counters["processing"],
            &counters["pending"]
        ),
        (&json!(4), &json!(4), &json!(2)),
        "{counters}"
    );
}

#[tokio::test]
async fn a_slices_events_are_logged_together_in_order_each_with_the_run_as_it_then_was() {
    // One transaction records a slice that finishes batch 1 and claims
    // batch 2: batch 1 closed, batch 2 opened, progress. They are written
    // together at its end, and each must still carry the run as it was
    // when it happened, under the next gap-free sequences.
    let app = crate::helpers::spawn_app_with(|config| config.engine = None).await;
    let (c, run, now) = run_started_by_hand(&app, 1_500).await;
    let campaign = c["id"].as_i64().unwrap();
    let store = &app.store;
    let taken = store
        .take_slice(run.id, "a/1", now, now + 60_000, 1_000)
        .await
        .unwrap();
    assert_eq!(taken.executions.len(), 1_000);
    let seq_before = store.events_since(campaign, 0, 1000).await.unwrap();
    let seq_before = seq_before.last().unwrap().seq;
    let outcomes = sent(&taken.executions, "together");
    let before = herald::store::now_ms();
    let (update, slice) = store
        .record_and_take(run.id, &outcomes, "a/1", now, now + 60_000, 1_000)
        .await
        .unwrap();
    assert_eq!(slice.executions.len(), 500);
    let kinds: Vec<&str> = update.events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["batch_completed", "batch_started", "progress"]);
    let seqs: Vec<i64> = update.events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [seq_before + 1, seq_before + 2, seq_before + 3]);
    assert!(update.events.iter().all(|e| e.created_at >= before));
    // The log holds what the transaction returned.
    let log = store
        .events_since(campaign, seq_before, 1000)
        .await
        .unwrap();
    assert_eq!(log.len(), 3);
    for (logged, returned) in log.iter().zip(&update.events) {
        assert_eq!(
            (logged.seq, &logged.kind, &logged.data, logged.created_at),
            (
                returned.seq,
                &returned.kind,
                &returned.data,
                returned.created_at
            )
        );
    }
    let run_of = |i: usize| &update.events[i].data["campaign"]["run"];
    // Batch 1 closed before batch 2 was claimed: nothing in flight yet.
    assert_eq!(run_of(0)["completed_batches"], 1);
    assert_eq!(run_of(0)["counters"]["sent"], 1_000);
    assert_eq!(run_of(0)["counters"]["processing"], 0);
    assert_eq!(update.events[0].data["batch_sequence"], 1);
    // Then batch 2's 500 were claimed.
    assert_eq!(update.events[1].data["batch_sequence"], 2);
    assert_eq!(run_of(1)["counters"]["processing"], 500);
    assert_eq!(run_of(2)["counters"]["processing"], 500);
    assert_eq!(run_of(2)["counters"]["pending"], 0);
    assert_eq!(update.events[2].data["campaign"]["status"], "running");
}

#[tokio::test]
async fn a_hundred_posted_events_take_a_hundred_sequences_in_the_order_sent() {
    let app = spawn_app().await;
    let c = app
        .create_campaign(json!({"name": "producer", "channel": "external"}))
        .await;
    let campaign = c["id"].as_i64().unwrap();
    let first: Vec<Value> = (0..3)
        .map(|i| json!({"type": "iteration_start", "data": {"iteration": i}}))
        .collect();
    let posted = app
        .post(
            &format!("/v1/campaigns/{campaign}/events"),
            &json!({"events": first}),
        )
        .await;
    assert_eq!(posted.status(), StatusCode::CREATED);
    let hundred: Vec<Value> = (0..100)
        .map(|i| json!({"type": "evaluation_complete", "data": {"iteration": 3, "evaluation_index": i}}))
        .collect();
    let posted = app
        .post(
            &format!("/v1/campaigns/{campaign}/events"),
            &json!({"events": hundred}),
        )
        .await;
    assert_eq!(posted.status(), StatusCode::CREATED);
    let log = app.store.events_since(campaign, 0, 1000).await.unwrap();
    let seqs: Vec<i64> = log.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=log.len() as i64).collect::<Vec<_>>(), "a gap");
    let indexes: Vec<i64> = log
        .iter()
        .filter(|e| e.kind == "evaluation_complete")
        .map(|e| e.data["evaluation_index"].as_i64().unwrap())
        .collect();
    assert_eq!(indexes, (0..100).collect::<Vec<_>>());
    let last = log.last().unwrap();
    assert_eq!(last.data["campaign"]["status"], "running");
}

#[tokio::test]
async fn a_receipt_batchs_progress_event_is_its_transactions_last_write_stamped_as_written() {
    // As for a slice: a batch of delivery receipts moves the counters a
    // client is shown, and its progress event's `ts` must be when they
    // were committed, not when the batch was taken up.
    let app = crate::helpers::spawn_app_with(|config| config.engine = None).await;
    let (c, run, now) = run_started_by_hand(&app, 4).await;
    let store = &app.store;
    let taken = store
        .take_slice(run.id, "a/1", now, now + 60_000, 4)
        .await
        .unwrap();
    let outcomes = sent(&taken.executions, "receipt");
    store.record_outcomes(run.id, &outcomes, now).await.unwrap();
    let receipts: Vec<herald::store::Receipt> = outcomes
        .iter()
        .enumerate()
        .map(|(i, o)| herald::store::Receipt {
            provider_id: o.provider_id.clone().unwrap(),
            delivered: i != 0,
            error: (i == 0).then(|| "unreachable".to_owned()),
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let before = herald::store::now_ms();
    let report = store.record_receipts(&receipts, now).await.unwrap();
    assert_eq!(report.applied, 4);
    let [(campaign, _, progress)] = &report.campaigns[..] else {
        panic!("one campaign moved: {:?}", report.campaigns);
    };
    assert_eq!(*campaign, c["id"].as_i64().unwrap());
    assert_eq!(progress.kind, "progress");
    assert!(
        progress.created_at >= before,
        "stamped {} ms before the write began",
        before - progress.created_at
    );
    let log = store.events_since(*campaign, 0, 1000).await.unwrap();
    assert_eq!(log.last().map(|e| e.seq), Some(progress.seq));
    let counters = &progress.data["campaign"]["run"]["counters"];
    assert_eq!(
        (&counters["delivered"], &counters["failed_delivery"]),
        (&json!(3), &json!(1)),
        "{counters}"
    );
}
