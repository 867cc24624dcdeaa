//! Contact imports: JSON bulk add and streamed CSV, with every kind of bad row.

use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{error_of, spawn_app, spawn_app_with};

async fn contacts_of(app: &crate::helpers::TestApp, campaign: &Value) -> Vec<Value> {
    let body: Value = app
        .get(&format!(
            "/v1/campaigns/{}/contacts?per_page=1000",
            campaign["id"]
        ))
        .await
        .json()
        .await
        .unwrap();
    body["contacts"].as_array().unwrap().clone()
}

#[tokio::test]
async fn json_add_keeps_good_contacts_and_reports_bad_ones() {
    let app = spawn_app().await;
    let c = app.sms_campaign().await;
    let report: Value = app
        .post(
            &format!("/v1/campaigns/{}/contacts", c["id"]),
            &json!({"contacts": [
                {"phone": "+1 (555) 123-4567", "name": "Ann", "variables": {"day": "Monday"}},
                {"phone": "not a phone", "name": "Bad", "variables": {"day": "Monday"}},
                {"phone": "+15551234568", "name": "Bob"},
                {"phone": "555-123-4567", "name": "Ann again", "variables": {"day": 3}},
                {"phone": "+15551234569", "name": "Cy", "variables": {"day": {"nested": true}}},
            ]}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(report["imported"], 1);
    assert_eq!(report["duplicates"], 1);
    assert_eq!(report["invalid"], 3);
    let errors = report["errors"].as_array().unwrap();
    assert_eq!(errors[0]["index"], 1);
    assert_eq!(errors[0]["column"], "phone");
    assert_eq!(errors[1]["index"], 2);
    assert_eq!(errors[1]["column"], "day");
    assert!(errors[1]["reason"]
        .as_str()
        .unwrap()
        .contains("missing template variable"));
    assert_eq!(errors[2]["column"], "variables.day");

    let stored = contacts_of(&app, &c).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0]["phone"], "+15551234567");
    assert_eq!(
        stored[0]["name"], "Ann again",
        "the later duplicate's values win"
    );
    assert_eq!(stored[0]["variables"]["day"], "3");
    let campaign: Value = app
        .get(&format!("/v1/campaigns/{}", c["id"]))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(campaign["contact_count"], 1);
}

#[tokio::test]
async fn csv_with_bom_crlf_and_quoted_commas_imports() {
    let app = spawn_app().await;
    let c = app.sms_campaign().await;
    let csv = "\u{feff}phone,name,day,note\r\n\
               +15551234567,\"Smith, Ann\",Monday,\"says \"\"hi\"\"\"\r\n\
               (202) 555-0143,Bob,Tuesday,\r\n";
    let response = app.import_csv(&c, csv).await;
    assert_eq!(response.status(), StatusCode::OK);
    let report: Value = response.json().await.unwrap();
    assert_eq!(
        report,
        json!({"imported": 2, "duplicates": 0, "invalid": 0, "errors": [], "errors_truncated": false})
    );
    let stored = contacts_of(&app, &c).await;
    assert_eq!(stored[0]["name"], "Smith, Ann");
    assert_eq!(
        stored[0]["variables"],
        json!({"day": "Monday", "note": "says \"hi\""})
    );
    assert_eq!(stored[1]["phone"], "+12025550143");
}

#[tokio::test]
async fn csv_bad_rows_are_reported_by_line_and_column_while_good_rows_stay() {
    let app = spawn_app().await;
    let c = app.sms_campaign().await;
    let csv = "phone,name,day\n\
               +15551234567,Ann,Monday\n\
               12,Short,Monday\n\
               +15551234568,NoDay,\n\
               +15551234567,Annie,Friday\n\
               \n\
               +15551234569,Cy,Sunday\n";
    let report: Value = app.import_csv(&c, csv).await.json().await.unwrap();
    assert_eq!(report["imported"], 2);
    assert_eq!(report["duplicates"], 1);
    assert_eq!(report["invalid"], 2);
    assert_eq!(
        report["errors"][0],
        json!({"line": 3, "column": "phone", "reason": report["errors"][0]["reason"]})
    );
    assert_eq!(report["errors"][1]["line"], 4);
    assert_eq!(report["errors"][1]["column"], "day");
    let stored = contacts_of(&app, &c).await;
    assert_eq!(stored.len(), 2);
    assert_eq!(
        stored[0]["name"], "Annie",
        "the later duplicate's values win"
    );
    assert_eq!(
        stored[0]["variables"]["day"], "Friday",
        "duplicates merge into one contact"
    );

    // A second import of the same numbers only merges.
    let again: Value = app
        .import_csv(&c, "phone,name,day\n+15551234569,Cyrus,Mon\n")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (again["imported"].as_u64(), again["duplicates"].as_u64()),
        (Some(0), Some(1))
    );
}

#[tokio::test]
async fn structurally_broken_csv_is_400_and_writes_nothing() {
    let app = spawn_app().await;
    let c = app
        .create_campaign(json!({"name": "x", "channel": "sms", "template": "Hello"}))
        .await;
    for (csv, field) in [
        ("", "body"),
        ("\n\n", "body"),
        ("name,email\nAnn,a@example.com\n", "phone"),
        ("phone,Phone\n+15551234567,+15551234568\n", "phone"),
    ] {
        let err = error_of(app.import_csv(&c, csv).await, StatusCode::BAD_REQUEST).await;
        assert_eq!(err["field"], field, "{csv:?}: {err}");
    }
    assert!(contacts_of(&app, &c).await.is_empty());
}

#[tokio::test]
async fn invalid_utf8_rows_are_reported_not_fatal() {
    let app = spawn_app().await;
    let c = app
        .create_campaign(json!({"name": "x", "channel": "sms", "template": "Hello"}))
        .await;
    let mut csv = b"phone,name\n+15551234567,Ann\n+15551234568,".to_vec();
    csv.extend_from_slice(&[0xff, 0xfe, b'\n']);
    csv.extend_from_slice(b"+15551234569,Cy\n");
    let report: Value = app.import_csv(&c, csv).await.json().await.unwrap();
    assert_eq!(report["imported"], 2);
    assert_eq!(report["invalid"], 1);
    assert_eq!(report["errors"][0]["line"], 3);
}

#[tokio::test]
async fn csv_missing_a_template_column_is_422() {
    let app = spawn_app().await;
    let c = app.sms_campaign().await;
    let err = error_of(
        app.import_csv(&c, "phone,name\n+15551234567,Ann\n").await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(err["field"], "day");
    assert!(contacts_of(&app, &c).await.is_empty());
}

#[tokio::test]
async fn csv_needs_its_content_type() {
    let app = spawn_app().await;
    let c = app.sms_campaign().await;
    let response = app
        .request(
            Method::POST,
            &format!("/v1/campaigns/{}/contacts:import", c["id"]),
        )
        .header("content-type", "application/json")
        .body("phone\n+15551234567\n")
        .send()
        .await
        .unwrap();
    error_of(response, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
}

#[tokio::test]
async fn uploads_over_the_import_limit_are_413_and_roll_back() {
    let app = spawn_app_with(|c| c.api.max_import_bytes = 64 * 1024).await;
    let c = app
        .create_campaign(json!({"name": "x", "channel": "sms", "template": "Hello"}))
        .await;
    let mut csv = String::from("phone,name\n");
    for i in 0..5000 {
        csv.push_str(&format!("+1555{:07},Name {i}\n", i));
    }
    // Declared length over the limit: refused before reading.
    error_of(
        app.import_csv(&c, csv.clone()).await,
        StatusCode::PAYLOAD_TOO_LARGE,
    )
    .await;
    // Streamed without a length: refused once the limit is crossed, after
    // some chunks were already written inside the transaction.
    let chunks: Vec<Result<String, std::io::Error>> = csv
        .as_bytes()
        .chunks(8 * 1024)
        .map(|b| Ok(String::from_utf8_lossy(b).into_owned()))
        .collect();
    let body = reqwest::Body::wrap_stream(futures::stream::iter(chunks).boxed());
    error_of(
        app.import_csv(&c, body).await,
        StatusCode::PAYLOAD_TOO_LARGE,
    )
    .await;
    assert!(
        contacts_of(&app, &c).await.is_empty(),
        "nothing is half-written"
    );
    let campaign: Value = app
        .get(&format!("/v1/campaigns/{}", c["id"]))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(campaign["contact_count"], 0);
}

#[tokio::test]
async fn larger_imports_cross_chunk_boundaries_exactly() {
    let app = spawn_app().await;
    let c = app
        .create_campaign(json!({"name": "x", "channel": "voice", "template": "Hi {{name}}"}))
        .await;
    let mut csv = String::from("phone,name\n");
    for i in 0..4500u32 {
        // Every tenth row repeats an earlier number.
        let n = if i % 10 == 9 { i - 5 } else { i };
        csv.push_str(&format!("+1555{:07},Name {n}\n", n));
    }
    let report: Value = app.import_csv(&c, csv).await.json().await.unwrap();
    assert_eq!(report["imported"], 4050);
    assert_eq!(report["duplicates"], 450);
    assert_eq!(report["invalid"], 0);
    let campaign: Value = app
        .get(&format!("/v1/campaigns/{}", c["id"]))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(campaign["contact_count"], 4050);
    let last_page: Value = app
        .get(&format!(
            "/v1/campaigns/{}/contacts?page=41&per_page=100",
            c["id"]
        ))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(last_page["contacts"].as_array().unwrap().len(), 50);
    assert_eq!(last_page["pagination"]["total_items"], 4050);
}

#[tokio::test]
async fn contacts_cannot_be_added_once_running() {
    let app = spawn_app_with(|c| c.engine = None).await;
    let c = app
        .create_campaign(json!({"name": "x", "channel": "sms", "template": "Hello"}))
        .await;
    app.import_csv(&c, "phone\n+15551234567\n").await;
    app.post_empty(&format!("/v1/campaigns/{}/start", c["id"]))
        .await;
    let err = error_of(
        app.import_csv(&c, "phone\n+15551234568\n").await,
        StatusCode::CONFLICT,
    )
    .await;
    assert_eq!(err["current_status"], "running");
    let err = error_of(
        app.post(
            &format!("/v1/campaigns/{}/contacts", c["id"]),
            &json!({"contacts": [{"phone": "+15551234568"}]}),
        )
        .await,
        StatusCode::CONFLICT,
    )
    .await;
    assert_eq!(err["current_status"], "running");
}

#[tokio::test]
async fn the_workspace_region_reads_local_numbers() {
    let app = spawn_app().await;
    let err = error_of(
        app.request(Method::PATCH, "/v1/workspace")
            .json(&json!({"default_region": "Atlantis"}))
            .send()
            .await
            .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(err["field"], "default_region");
    let ws: Value = app
        .request(Method::PATCH, "/v1/workspace")
        .json(&json!({"default_region": "gb"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ws["default_region"], "GB");
    let c = app
        .create_campaign(json!({"name": "x", "channel": "sms", "template": "Hello"}))
        .await;
    let report: Value = app
        .import_csv(&c, "phone\n020 7946 0958\n")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(report["imported"], 1, "{report}");
    assert_eq!(contacts_of(&app, &c).await[0]["phone"], "+442079460958");
}

#[tokio::test]
async fn bad_json_contacts_bodies() {
    let app = spawn_app().await;
    let c = app.sms_campaign().await;
    let path = format!("/v1/campaigns/{}/contacts", c["id"]);
    let err = error_of(
        app.post(&path, &json!({"contacts": "nope"})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(err["field"], "contacts");
    let err = error_of(
        app.post(&path, &json!({"contacts": [{"name": "no phone"}]}))
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(err["field"], "contacts[0].phone");
    let err = error_of(
        app.post(&path, &json!({})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(err["field"], "contacts");
    let err = error_of(
        app.get(&format!("{path}?per_page=0")).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(err["field"], "per_page");
}
