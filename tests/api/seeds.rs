//! Seeds 001 and 002 compared field by field with the seed documents'
//! examples: names, JSON types and nesting; plus their error behaviour.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{spawn_app, spawn_app_with, TestApp};

/// Checks that `actual` has every field of `example`, with the same JSON
/// type (a null in the example accepts anything; an example float accepts
/// any number).
fn assert_shape(actual: &Value, example: &Value, at: &str) {
    match example {
        Value::Null => {}
        Value::Object(fields) => {
            let object = actual
                .as_object()
                .unwrap_or_else(|| panic!("{at}: expected an object, got {actual}"));
            for (key, value) in fields {
                let inner = object
                    .get(key)
                    .unwrap_or_else(|| panic!("{at}.{key} is missing in {actual}"));
                assert_shape(inner, value, &format!("{at}.{key}"));
            }
        }
        Value::Array(items) => {
            let array = actual
                .as_array()
                .unwrap_or_else(|| panic!("{at}: expected an array, got {actual}"));
            if let Some(first) = items.first() {
                for (i, item) in array.iter().enumerate() {
                    assert_shape(item, first, &format!("{at}[{i}]"));
                }
            }
        }
        Value::Number(n) if n.is_f64() => {
            assert!(actual.is_number(), "{at}: expected a number, got {actual}")
        }
        Value::Number(_) => assert!(actual.is_i64(), "{at}: expected an integer, got {actual}"),
        Value::String(_) => assert!(actual.is_string(), "{at}: expected a string, got {actual}"),
        Value::Bool(_) => assert!(
            actual.is_boolean(),
            "{at}: expected a boolean, got {actual}"
        ),
    }
}

fn is_rfc3339(v: &Value) -> bool {
    v.as_str()
        .is_some_and(|s| chrono::DateTime::parse_from_rfc3339(s).is_ok())
}

async fn finished_voice_campaign(app: &TestApp) -> Value {
    let c = app
        .campaign_with_contacts(
            json!({"channel": "voice", "template": "Hi {{name}}, this is Sarah from Acme.", "sender": "+15550001234",
                   "max_attempts": 1, "provider": {"kind": "simulated", "outcomes": {"completed": 0.6, "no_answer": 0.4}}}),
            600,
        )
        .await;
    app.post_empty(&format!("/v1/campaigns/{}/start", c["id"]))
        .await;
    app.wait_status(&c["id"], "completed", 60).await
}

#[tokio::test]
async fn seed_001_executions_match_the_documented_shape() {
    let app = spawn_app().await;
    let c = finished_voice_campaign(&app).await;
    let example_execution = json!({
        "id": 1001, "execution_id": 1001, "contact_id": 101, "contact_name": "John Smith",
        "contact_phone": "+15551234567", "status": "completed", "call_id": "CA123abc456def789ghi",
        "sms_id": null, "executed_at": "2024-02-15T14:29:30Z",
        "execution_data": {"from_number": "+15550001234", "to_number": "+15551234567"}
    });
    let example_pagination = json!({"page": 1, "per_page": 50, "total_items": 350, "total_pages": 7, "has_next": true, "has_prev": false});

    let body: Value = app
        .client
        .get(app.url(&format!(
            "/api/v1/campaigns/{}/executions?page=1&per_page=100",
            c["id"]
        )))
        .bearer_auth(&app.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_shape(&body["pagination"], &example_pagination, "pagination");
    assert_eq!(
        body["pagination"],
        json!({"page": 1, "per_page": 100, "total_items": 600, "total_pages": 6, "has_next": true, "has_prev": false})
    );
    let executions = body["executions"].as_array().unwrap();
    assert_eq!(executions.len(), 100);
    for e in executions {
        assert_shape(e, &example_execution, "execution");
        assert_eq!(e["id"], e["execution_id"]);
        assert!(is_rfc3339(&e["executed_at"]));
        assert!(e["sms_id"].is_null(), "voice executions carry call_id");
        let data = &e["execution_data"];
        assert!(data["personalized_welcome_message"]
            .as_str()
            .unwrap()
            .starts_with("Hi P"));
        assert_eq!(data["template_variables_used"]["name"], e["contact_name"]);
        match e["status"].as_str().unwrap() {
            "completed" => assert!(data["duration_seconds"].is_i64()),
            "no_answer" => assert!(data["error_details"].is_string()),
            other => panic!("unexpected status {other}"),
        }
    }
    // Newest first; ids descend.
    assert!(executions
        .windows(2)
        .all(|w| w[0]["id"].as_i64() > w[1]["id"].as_i64()));

    // The default page is 50; status filter and keyset cursor go beyond the seed.
    let default: Value = app
        .get(&format!("/api/v1/campaigns/{}/executions", c["id"]))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(default["executions"].as_array().unwrap().len(), 50);
    let no_answer: Value = app
        .get(&format!(
            "/api/v1/campaigns/{}/executions?status=no_answer&per_page=1000",
            c["id"]
        ))
        .await
        .json()
        .await
        .unwrap();
    let total = no_answer["pagination"]["total_items"].as_i64().unwrap();
    assert_eq!(
        total,
        no_answer["executions"].as_array().unwrap().len() as i64
    );
    assert_eq!(total, c["progress"]["failed"].as_i64().unwrap());
    let ids = |page: &Value| -> Vec<i64> {
        page["executions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_i64().unwrap())
            .collect()
    };
    let mut by_cursor = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(cur) => format!(
                "/api/v1/campaigns/{}/executions?per_page=250&cursor={cur}",
                c["id"]
            ),
            None => format!("/api/v1/campaigns/{}/executions?per_page=250", c["id"]),
        };
        let page: Value = app.get(&path).await.json().await.unwrap();
        by_cursor.extend(ids(&page));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(
        by_cursor.len(),
        600,
        "the cursor walks every execution once"
    );
    // Offset pages read the same sequence, newest first, and end empty.
    let mut by_page = Vec::new();
    for page in 1..=4 {
        let got: Value = app
            .get(&format!(
                "/api/v1/campaigns/{}/executions?per_page=250&page={page}",
                c["id"]
            ))
            .await
            .json()
            .await
            .unwrap();
        by_page.extend(ids(&got));
    }
    assert_eq!(by_page, by_cursor);
    assert!(by_page.windows(2).all(|w| w[0] > w[1]));
    // A deep page of a filtered list is that slice of the filtered list.
    let filtered: Vec<i64> = ids(&no_answer);
    assert!(filtered.len() >= 4, "{} no_answer rows", filtered.len());
    {
        let second: Value = app
            .get(&format!(
                "/api/v1/campaigns/{}/executions?status=no_answer&per_page=2&page=2",
                c["id"]
            ))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(ids(&second), filtered[2..4]);
    }
}

#[tokio::test]
async fn seed_001_errors() {
    let app = spawn_app().await;
    let c = app.sms_campaign().await;
    let path = format!("/api/v1/campaigns/{}/executions", c["id"]);
    let unauthorized = app.client.get(app.url(&path)).send().await.unwrap();
    assert_eq!(unauthorized.status(), StatusCode::UNAUTHORIZED);
    assert!(unauthorized.json::<Value>().await.unwrap()["detail"].is_string());
    // An unknown campaign is a 404 however the rest of the request is wrong.
    for query in ["", "?per_page=0", "?status=exploded", "?cursor=abc"] {
        assert_eq!(
            app.get(&format!("/api/v1/campaigns/424242/executions{query}"))
                .await
                .status(),
            StatusCode::NOT_FOUND,
            "{query}"
        );
    }
    for bad in [
        "per_page=1001",
        "per_page=0",
        "page=-1",
        "status=exploded",
        "cursor=abc",
        "status=queued&status=queued",
        "page=99999999999999999999",
    ] {
        let response = app.get(&format!("{path}?{bad}")).await;
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
        let body: Value = response.json().await.unwrap();
        assert!(body["detail"].is_string(), "{bad}: {body}");
    }
    let other = app.new_key("beta").await;
    let forbidden = app
        .client
        .get(app.url(&path))
        .bearer_auth(other)
        .send()
        .await
        .unwrap();
    assert_eq!(forbidden.status(), StatusCode::FORBIDDEN);
    let empty: Value = app.get(&path).await.json().await.unwrap();
    assert_eq!(empty["executions"], json!([]));
    assert_eq!(empty["pagination"]["total_items"], 0);
}

#[tokio::test]
async fn seed_002_status_and_analytics_match_the_documented_shape() {
    let app = spawn_app().await;
    let c = app
        .campaign_with_contacts(
            json!({"channel": "sms", "template": "Hello, thanks for joining.", "sender": "BRIQ",
                   "provider": {"kind": "simulated", "receipt_delay_ms": 0}}),
            1_500,
        )
        .await;
    let uuid = c["uuid"].as_str().unwrap();

    // Before any run: the NO_RUN sentinel and a zeroed analytics payload.
    let no_run = app.briq(&format!("/v1/campaign/{uuid}/status")).await;
    assert_eq!(no_run, json!({"campaign_id": uuid, "status": "NO_RUN"}));
    let example_analytics = json!({
        "campaign_id": "8d2e1f6a-...", "campaign_run_id": "run_789", "workspace_id": "ws_01J...",
        "total_recipients": 1500, "sent_count": 1495, "failed_count": 5, "skipped_count": 0,
        "cancelled_count": 0, "delivered_count": 1400, "failed_delivery_count": 95,
        "pending_delivery_count": 0, "delivery_rate": 0.9398, "failure_rate": 0.0033,
        "first_sent_at": "2026-05-12T09:12:01.001Z", "last_sent_at": "2026-05-12T09:14:48.812Z",
        "completed_at": "2026-05-12T09:14:59.044Z"
    });
    let zeroed = app.briq(&format!("/v1/campaign/{uuid}/analytics")).await;
    assert_eq!(zeroed["sent_count"], 0);
    assert!(zeroed["delivery_rate"].is_null() && zeroed["failure_rate"].is_null());
    assert!(zeroed["campaign_run_id"].is_null());
    for key in example_analytics.as_object().unwrap().keys() {
        assert!(zeroed.get(key).is_some(), "zeroed analytics lacks {key}");
    }

    app.post_empty(&format!("/v1/campaigns/{}/start", c["id"]))
        .await;
    app.wait_campaign(&c["id"], 60, |c| {
        c["status"] == "completed"
            && c["progress"]["delivered"].as_i64().unwrap()
                + c["progress"]["failed_delivery"].as_i64().unwrap()
                == c["progress"]["sent"].as_i64().unwrap()
    })
    .await;

    let example_status = json!({
        "campaign_id": "8d2e1f6a-...", "campaign_run_id": "run_789", "status": "running",
        "current_batch": 1, "total_batches": 2, "recipient_count": 1500, "sent": 1000, "failed": 5,
        "skipped": 0, "delivered": 800, "updated_at": "2026-05-12T09:14:02.218Z"
    });
    let status = app.briq(&format!("/v1/campaign/{uuid}/status")).await;
    assert_shape(&status, &example_status, "status");
    assert_eq!(status["status"], "completed");
    assert_eq!(
        (
            status["current_batch"].as_i64(),
            status["total_batches"].as_i64()
        ),
        (Some(2), Some(2))
    );
    assert_eq!(status["recipient_count"], 1500);
    assert_eq!(
        status["sent"].as_i64().unwrap() + status["failed"].as_i64().unwrap(),
        1500
    );
    assert!(is_rfc3339(&status["updated_at"]));

    let analytics = app.briq(&format!("/v1/campaign/{uuid}/analytics")).await;
    assert_shape(&analytics, &example_analytics, "analytics");
    assert_eq!(analytics["campaign_run_id"], status["campaign_run_id"]);
    let sent = analytics["sent_count"].as_f64().unwrap();
    let rate = analytics["delivery_rate"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&rate));
    assert!((rate - analytics["delivered_count"].as_f64().unwrap() / sent).abs() < 0.0001);
    let failure = analytics["failure_rate"].as_f64().unwrap();
    assert!((failure - analytics["failed_count"].as_f64().unwrap() / 1500.0).abs() < 0.0001);
    assert!(is_rfc3339(&analytics["first_sent_at"]) && is_rfc3339(&analytics["completed_at"]));
    // Both count what Herald's own campaign view counts, each counter in
    // its place (each is read by column position).
    let progress = app.campaign(&c["id"]).await["progress"].clone();
    for (seed, ours) in [
        ("sent", "sent"),
        ("failed", "failed"),
        ("skipped", "skipped"),
        ("delivered", "delivered"),
    ] {
        assert_eq!(status[seed], progress[ours], "status {seed}");
    }
    for (seed, ours) in [
        ("total_recipients", "total"),
        ("sent_count", "sent"),
        ("failed_count", "failed"),
        ("skipped_count", "skipped"),
        ("delivered_count", "delivered"),
        ("failed_delivery_count", "failed_delivery"),
    ] {
        assert_eq!(analytics[seed], progress[ours], "analytics {seed}");
    }
    assert!(
        progress["delivered"].as_i64().unwrap() > 0 && progress["failed"].as_i64().unwrap() > 0
    );

    // A second run: status follows it at once; once it has ended,
    // analytics names it and counts the recipients of both.
    let first_run = status["campaign_run_id"].clone();
    let response = app
        .client
        .post(app.url(&format!("/v1/campaigns/{}/runs", c["id"])))
        .bearer_auth(&app.key)
        .json(&json!({"recipients": "all"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let second = app.briq(&format!("/v1/campaign/{uuid}/status")).await;
    assert!(second["campaign_run_id"].is_string());
    assert_ne!(second["campaign_run_id"], first_run);
    app.wait_status(&c["id"], "completed", 60).await;
    let analytics = app.briq(&format!("/v1/campaign/{uuid}/analytics")).await;
    assert_eq!(analytics["campaign_run_id"], second["campaign_run_id"]);
    assert_eq!(analytics["total_recipients"], 3000);
}

#[tokio::test]
async fn seed_002_run_detail_and_snapshot_match_the_documented_shape() {
    let app = spawn_app().await;
    let c = app
        .campaign_with_contacts(
            json!({"channel": "sms", "template": "Hello {{name}}", "sender": "BRIQ",
                   "provider": {"kind": "simulated", "receipt_delay_ms": 0}}),
            1_200,
        )
        .await;
    let uuid = c["uuid"].as_str().unwrap();
    app.post_empty(&format!("/v1/campaigns/{}/start", c["id"]))
        .await;
    app.wait_status(&c["id"], "completed", 60).await;
    let run_id = app.briq(&format!("/v1/campaign/{uuid}/status")).await["campaign_run_id"]
        .as_str()
        .unwrap()
        .to_owned();

    let detail = app
        .briq(&format!("/v1/campaign/{uuid}/runs/{run_id}"))
        .await;
    let example_detail = json!({
        "run": {"id": "run_789", "status": "completed"},
        "campaign_name": "x", "channel_name": "SMS", "channel_provider": "mock",
        "snapshot": {"provider": "mock", "sender_id": "BRIQ", "channel": "SMS", "template": "t", "personalized": true, "frozen_at": "2026-05-12T09:12:00.118Z"},
        "batches": [{"id": "uuid", "batch_sequence": 1, "status": "completed", "recipient_count": 1000,
                     "sent_count": 1000, "failed_count": 0, "started_at": null, "completed_at": null, "error_detail": null}],
        "recipients": [{"recipient_id": "r", "phone_number": "255712345678", "recipient_status": "completed",
                        "message_id": null, "message_status": null, "sent_at": null}],
        "recipient_summary": {"total": 1, "pending": 0, "sent": 1, "delivered": 1, "failed": 0},
        "recipients_truncated": true
    });
    assert_shape(&detail, &example_detail, "run detail");
    assert_eq!(detail["recipients"].as_array().unwrap().len(), 500);
    assert_eq!(detail["recipients_truncated"], true);
    assert_eq!(detail["recipient_summary"]["total"], 1200);
    assert_eq!(detail["channel_name"], "SMS");
    assert_eq!(detail["channel_provider"], "simulated");
    let batches = detail["batches"].as_array().unwrap();
    assert_eq!(
        batches
            .iter()
            .map(|b| b["batch_sequence"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(
        batches
            .iter()
            .map(|b| b["recipient_count"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        [1000, 200]
    );
    for r in detail["recipients"].as_array().unwrap() {
        let phone = r["phone_number"].as_str().unwrap();
        assert!(
            phone.chars().all(|ch| ch.is_ascii_digit()),
            "E.164 digits: {phone}"
        );
    }
    let by_int = app
        .briq(&format!("/v1/campaign/{}/runs/{run_id}", c["id"]))
        .await;
    assert_eq!(by_int["run"]["id"], run_id.as_str());

    let example_snapshot = json!({
        "run_id": "run_789", "campaign_id": "8d2e1f6a-...", "recipient_count": 1500,
        "content": {"channel": "SMS", "provider": "mock", "sender_id": "BRIQ", "body": "Hello, thanks for joining."},
        "cost": {"total_cost": 1500, "currency_units": "sms_parts"},
        "status": "running", "started_at": "2026-05-12T09:12:00.118Z", "completed_at": null
    });
    let snapshot = app
        .briq(&format!("/v1/campaign/{uuid}/runs/{run_id}/snapshot"))
        .await;
    assert_shape(&snapshot, &example_snapshot, "snapshot");
    assert!(snapshot.get("recipients").is_none(), "no PII unless asked");
    assert_eq!(
        snapshot["cost"],
        json!({"total_cost": 1200, "currency_units": "sms_parts"})
    );
    // Recipients are PII: a key needs the `pii` scope to read them.
    let pii_path = format!("/v1/campaign/{uuid}/runs/{run_id}/snapshot?include_recipients=true");
    let get_with = |path: &str, key: &str| {
        app.client
            .get(app.url(path))
            .header("X-API-Key", key)
            .send()
    };
    let refused = envelope_error(
        get_with(&pii_path, &app.key).await.unwrap(),
        StatusCode::FORBIDDEN,
    )
    .await;
    assert_eq!(refused["errors"][0]["field"], "include_recipients");
    assert_eq!(refused["errors"][0]["code"], "missing_scope");
    let message = refused["errors"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("'pii' scope") && message.contains("include_recipients"),
        "{refused}"
    );
    assert!(!refused.to_string().contains("15550000000"), "{refused}");
    let pii_key = app
        .new_key_with("alpha", &[herald::domain::Scope::Pii])
        .await;
    let response = get_with(&pii_path, &pii_key).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let with_pii = response.json::<Value>().await.unwrap()["data"].clone();
    let phones = with_pii["recipients"].as_array().unwrap();
    assert_eq!(phones.len(), 1200);
    assert_eq!(phones[0], "15550000000");
}

async fn envelope_error(response: reqwest::Response, status: StatusCode) -> Value {
    assert_eq!(response.status(), status);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["success"], false);
    assert!(body["data"].is_null());
    assert!(body["errors"][0]["message"].is_string());
    assert!(body["request_id"].as_str().unwrap().starts_with("req_"));
    body
}

#[tokio::test]
async fn seed_002_errors_come_in_the_envelope() {
    let app = spawn_app_with(|c| c.engine = None).await;
    let c = app
        .campaign_with_contacts(json!({"channel": "sms", "template": "Hi {{name}}"}), 3)
        .await;
    let uuid = c["uuid"].as_str().unwrap().to_owned();
    let get = |path: String, key: Option<String>| {
        let mut request = app.client.get(app.url(&path));
        if let Some(key) = key {
            request = request.header("X-API-Key", key);
        }
        request.send()
    };
    let status_path = format!("/v1/campaign/{uuid}/status");
    envelope_error(
        get(status_path.clone(), None).await.unwrap(),
        StatusCode::UNAUTHORIZED,
    )
    .await;
    envelope_error(
        get(status_path.clone(), Some("hk_wrong".into()))
            .await
            .unwrap(),
        StatusCode::UNAUTHORIZED,
    )
    .await;
    let intruder = app.new_key("beta").await;
    for suffix in ["status", "analytics", "runs/x", "runs/x/snapshot"] {
        let body = envelope_error(
            get(
                format!("/v1/campaign/{uuid}/{suffix}"),
                Some(intruder.clone()),
            )
            .await
            .unwrap(),
            StatusCode::FORBIDDEN,
        )
        .await;
        assert!(!body.to_string().contains("Hi {{name}}"));
    }
    for path in [
        "/v1/campaign/00000000-0000-0000-0000-000000000000/status",
        "/v1/campaign/00000000-0000-0000-0000-000000000000/analytics",
        "/v1/campaign/not-a-campaign/status",
        "/v1/campaign/not-a-campaign/analytics",
        "/v1/campaign/999999/analytics",
    ] {
        envelope_error(
            get(path.into(), Some(app.key.clone())).await.unwrap(),
            StatusCode::NOT_FOUND,
        )
        .await;
    }

    // A run that exists but is not frozen: no snapshot yet; claimed shows as running.
    app.post_empty(&format!("/v1/campaigns/{}/start", c["id"]))
        .await;
    let run_id = app.briq(&status_path).await["campaign_run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(app.briq(&status_path).await["status"], "scheduled");
    // Analytics names only a run that has ended.
    let analytics = app.briq(&format!("/v1/campaign/{uuid}/analytics")).await;
    assert!(analytics["campaign_run_id"].is_null());
    assert!(analytics["completed_at"].is_null());
    envelope_error(
        get(
            format!("/v1/campaign/{uuid}/runs/{run_id}/snapshot"),
            Some(app.key.clone()),
        )
        .await
        .unwrap(),
        StatusCode::NOT_FOUND,
    )
    .await;
    let claimed = app
        .store
        .claim_run("test-worker", herald::store::now_ms(), 60_000, &[])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claimed.status.as_str(), "claimed");
    assert_eq!(
        app.briq(&status_path).await["status"],
        "running",
        "claimed is shown as running"
    );
    let detail = app
        .briq(&format!("/v1/campaign/{uuid}/runs/{run_id}"))
        .await;
    assert_eq!(detail["run"]["status"], "running");

    // A run of another campaign is 404 here.
    let other = app
        .campaign_with_contacts(json!({"channel": "sms", "template": "Hi {{name}}"}), 1)
        .await;
    let other_uuid = other["uuid"].as_str().unwrap();
    envelope_error(
        get(
            format!("/v1/campaign/{other_uuid}/runs/{run_id}"),
            Some(app.key.clone()),
        )
        .await
        .unwrap(),
        StatusCode::NOT_FOUND,
    )
    .await;
    let bad_flag = get(
        format!("/v1/campaign/{uuid}/runs/{run_id}/snapshot?include_recipients=maybe"),
        Some(app.key.clone()),
    )
    .await
    .unwrap();
    envelope_error(bad_flag, StatusCode::UNPROCESSABLE_ENTITY).await;
}
