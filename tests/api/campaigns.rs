//! Campaign CRUD, the status machine, and bad input on every field.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{error_of, spawn_app, spawn_app_with};

#[tokio::test]
async fn create_returns_the_campaign_with_both_ids_and_defaults() {
    let app = spawn_app().await;
    let c = app.sms_campaign().await;
    assert!(c["id"].is_i64());
    assert!(uuid::Uuid::parse_str(c["uuid"].as_str().unwrap()).is_ok());
    assert_eq!(c["status"], "draft");
    assert_eq!(c["channel"], "sms");
    assert_eq!(c["provider"], json!({"kind": "simulated"}));
    assert_eq!(c["max_attempts"], 3);
    assert_eq!(c["contact_count"], 0);

    let by_id: Value = app
        .get(&format!("/v1/campaigns/{}", c["id"]))
        .await
        .json()
        .await
        .unwrap();
    let by_uuid: Value = app
        .get(&format!("/v1/campaigns/{}", c["uuid"].as_str().unwrap()))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(by_id, c);
    assert_eq!(by_uuid, c);
}

#[tokio::test]
async fn provider_secrets_are_never_echoed() {
    let app = spawn_app().await;
    let c = app
        .create_campaign(json!({
            "name": "Hooked", "channel": "sms", "template": "x",
            "provider": {"kind": "webhook", "url": "http://127.0.0.1:9/hook", "secret": "a-very-secret-value"}
        }))
        .await;
    assert_eq!(c["provider"]["kind"], "webhook");
    assert_ne!(c["provider"]["secret"], "a-very-secret-value");
}

#[tokio::test]
async fn list_is_paginated_newest_first_and_filterable() {
    let app = spawn_app().await;
    for name in ["one", "two", "three"] {
        app.create_campaign(json!({"name": name, "channel": "voice"}))
            .await;
    }
    let page1: Value = app
        .get("/v1/campaigns?per_page=2")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page1["campaigns"].as_array().unwrap().len(), 2);
    assert_eq!(page1["campaigns"][0]["name"], "three");
    assert_eq!(
        page1["pagination"],
        json!({"page": 1, "per_page": 2, "total_items": 3, "total_pages": 2, "has_next": true, "has_prev": false})
    );
    let page2: Value = app
        .get("/v1/campaigns?per_page=2&page=2")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page2["campaigns"][0]["name"], "one");
    assert_eq!(page2["pagination"]["has_next"], false);

    let drafts: Value = app
        .get("/v1/campaigns?status=draft")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(drafts["pagination"]["total_items"], 3);
    let running: Value = app
        .get("/v1/campaigns?status=running")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(running["pagination"]["total_items"], 0);

    for bad in ["?status=exploded", "?page=0", "?per_page=1001", "?page=abc"] {
        let err = error_of(
            app.get(&format!("/v1/campaigns{bad}")).await,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
        assert!(err["field"].is_string(), "{bad}: {err}");
    }
}

/// A query string serde cannot read (a repeated parameter, a number out of
/// range) is Herald's JSON 422 naming the parameter, like any bad value.
#[tokio::test]
async fn a_malformed_query_string_is_a_json_422_naming_the_parameter() {
    let app = spawn_app().await;
    let c = app
        .campaign_with_contacts(json!({"channel": "sms"}), 1)
        .await;
    for (path, field) in [
        (
            "/v1/campaigns?status=draft&status=running".to_owned(),
            "status",
        ),
        ("/v1/campaigns?per_page=1&per_page=2".to_owned(), "per_page"),
        (
            format!("/v1/campaigns/{}/contacts?page=1&page=2", c["id"]),
            "page",
        ),
        (
            format!("/v1/campaigns/{}/events?since=1&since=2", c["id"]),
            "since",
        ),
    ] {
        let err = error_of(app.get(&path).await, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(err["field"], field, "{path}: {err}");
    }
    // Nothing was changed by the bad requests.
    let list: Value = app.get("/v1/campaigns").await.json().await.unwrap();
    assert_eq!(list["campaigns"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn bad_fields_are_422_naming_the_field() {
    let app = spawn_app().await;
    let cases = [
        (json!({"channel": "sms"}), "name"),
        (json!({"name": "  ", "channel": "sms"}), "name"),
        (json!({"name": "x"}), "channel"),
        (json!({"name": "x", "channel": "fax"}), "channel"),
        (
            json!({"name": "x", "channel": "sms", "template": "Hi {{name"}),
            "template",
        ),
        (
            json!({"name": "x", "channel": "sms", "template": "Hi {{ bad name }}"}),
            "template",
        ),
        (
            json!({"name": "x", "channel": "sms", "sender": "WAYTOOLONGSENDER"}),
            "sender",
        ),
        (
            json!({"name": "x", "channel": "voice", "sender": "ACME"}),
            "sender",
        ),
        (
            json!({"name": "x", "channel": "sms", "max_attempts": 0}),
            "max_attempts",
        ),
        (
            json!({"name": "x", "channel": "sms", "max_attempts": "three"}),
            "max_attempts",
        ),
        (
            json!({"name": "x", "channel": "sms", "provider": {"kind": "carrier-pigeon"}}),
            "provider.kind",
        ),
        (
            json!({"name": "x", "channel": "sms", "provider": {"kind": "webhook", "url": "not a url", "secret": "0123456789abcdef"}}),
            "provider.url",
        ),
        (
            json!({"name": "x", "channel": "sms", "provider": {"kind": "simulated", "outcomes": {"exploded": 1.0}}}),
            "provider.outcomes",
        ),
        (
            json!({"name": "x", "channel": "sms", "colour": "red"}),
            "colour",
        ),
        (json!(42), "body"),
        // No field takes a NUL character, and Postgres cannot store one.
        (
            json!({"name": "x", "channel": "sms", "template": "\u{0}Hi"}),
            "template",
        ),
        (
            json!({"name": "x", "channel": "sms", "provider": {"kind": "simulated", "outcomes": {"sent\u{0}": 1.0}}}),
            "provider.outcomes",
        ),
    ];
    for (body, field) in cases {
        let err = error_of(
            app.post("/v1/campaigns", &body).await,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
        assert_eq!(err["code"], "invalid_field");
        assert_eq!(err["field"], field, "for {body}: {err}");
    }
    let listed: Value = app.get("/v1/campaigns").await.json().await.unwrap();
    assert_eq!(
        listed["pagination"]["total_items"], 0,
        "nothing was created"
    );
}

#[tokio::test]
async fn malformed_json_wrong_type_and_oversized_bodies() {
    let app = spawn_app_with(|c| c.api.max_body_bytes = 1024 * 1024).await;
    let malformed = app
        .request(Method::POST, "/v1/campaigns")
        .header("content-type", "application/json")
        .body("{\"name\": ")
        .send()
        .await
        .unwrap();
    let err = error_of(malformed, StatusCode::BAD_REQUEST).await;
    assert!(err["message"].as_str().unwrap().contains("malformed JSON"));

    let wrong_type = app
        .request(Method::POST, "/v1/campaigns")
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    error_of(wrong_type, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;

    let huge = format!(
        "{{\"name\":\"{}\",\"channel\":\"sms\"}}",
        "x".repeat(20 * 1024 * 1024)
    );
    let too_large = app
        .request(Method::POST, "/v1/campaigns")
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    let err = error_of(too_large, StatusCode::PAYLOAD_TOO_LARGE).await;
    assert_eq!(err["code"], "payload_too_large");
}

#[tokio::test]
async fn drafts_can_be_edited_and_deleted_but_nothing_else() {
    // No engine: the run must not finish while the test drives the machine.
    let app = spawn_app_with(|c| c.engine = None).await;
    let c = app.sms_campaign().await;
    let path = format!("/v1/campaigns/{}", c["id"]);
    let updated: Value = app
        .request(Method::PATCH, &path)
        .json(&json!({"name": "Renamed", "max_attempts": 1}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(updated["name"], "Renamed");
    assert_eq!(updated["max_attempts"], 1);
    assert_eq!(updated["template"], c["template"], "unsent fields are kept");

    let bad = app
        .request(Method::PATCH, &path)
        .json(&json!({"sender": "!!"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(bad, StatusCode::UNPROCESSABLE_ENTITY).await["field"],
        "sender"
    );

    // Once started, the campaign is frozen.
    app.post(&format!("{path}/contacts"), &json!({"contacts": [{"phone": "+15551234567", "name": "Ann", "variables": {"day": "Monday"}}]})).await;
    assert_eq!(
        app.post_empty(&format!("{path}/start")).await.status(),
        StatusCode::OK
    );
    let frozen = app
        .request(Method::PATCH, &path)
        .json(&json!({"name": "Nope"}))
        .send()
        .await
        .unwrap();
    let err = error_of(frozen, StatusCode::CONFLICT).await;
    assert_eq!(err["current_status"], "running");
    let undeletable = app.request(Method::DELETE, &path).send().await.unwrap();
    assert_eq!(
        error_of(undeletable, StatusCode::CONFLICT).await["current_status"],
        "running"
    );

    let other = app
        .create_campaign(json!({"name": "Temp", "channel": "voice"}))
        .await;
    let other_path = format!("/v1/campaigns/{}", other["id"]);
    let deleted = app
        .request(Method::DELETE, &other_path)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    error_of(app.get(&other_path).await, StatusCode::NOT_FOUND).await;
}

#[tokio::test]
async fn the_status_machine_is_enforced_with_409_naming_the_current_status() {
    // No engine: the run must not finish while the test drives the machine.
    let app = spawn_app_with(|c| c.engine = None).await;
    let c = app.sms_campaign().await;
    let path = format!("/v1/campaigns/{}", c["id"]);

    let early_pause = app.post_empty(&format!("{path}/pause")).await;
    let err = error_of(early_pause, StatusCode::CONFLICT).await;
    assert_eq!(err["current_status"], "draft");
    assert!(err["message"].as_str().unwrap().contains("draft"));

    app.post(&format!("{path}/contacts"), &json!({"contacts": [{"phone": "+15551234567", "name": "Ann", "variables": {"day": "Monday"}}]})).await;
    let steps = [
        ("start", StatusCode::OK, "running"),
        ("start", StatusCode::CONFLICT, "running"),
        ("resume", StatusCode::CONFLICT, "running"),
        ("pause", StatusCode::OK, "paused"),
        ("pause", StatusCode::CONFLICT, "paused"),
        ("resume", StatusCode::OK, "running"),
        ("cancel", StatusCode::OK, "cancelled"),
        ("resume", StatusCode::CONFLICT, "cancelled"),
        ("start", StatusCode::CONFLICT, "cancelled"),
        ("cancel", StatusCode::CONFLICT, "cancelled"),
    ];
    for (action, status, expected) in steps {
        let response = app.post_empty(&format!("{path}/{action}")).await;
        assert_eq!(response.status(), status, "{action}");
        let body: Value = response.json().await.unwrap();
        let shown = if status == StatusCode::OK {
            &body["status"]
        } else {
            &body["error"]["current_status"]
        };
        assert_eq!(shown, expected, "{action}: {body}");
    }
    let final_state: Value = app.get(&path).await.json().await.unwrap();
    assert_eq!(final_state["status"], "cancelled");
    assert!(final_state["started_at"].is_string());
    assert!(final_state["completed_at"].is_string());
}

#[tokio::test]
async fn starting_checks_template_contacts_and_every_variable() {
    let app = spawn_app().await;
    let no_template = app
        .create_campaign(json!({"name": "x", "channel": "sms"}))
        .await;
    let err = error_of(
        app.post_empty(&format!("/v1/campaigns/{}/start", no_template["id"]))
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(err["field"], "template");

    let c = app.sms_campaign().await;
    let path = format!("/v1/campaigns/{}", c["id"]);
    let err = error_of(
        app.post_empty(&format!("{path}/start")).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(err["field"], "contacts");

    // Contacts imported before the template changed may lack a variable.
    let plain = app
        .create_campaign(json!({"name": "p", "channel": "sms", "template": "Hello"}))
        .await;
    let plain_path = format!("/v1/campaigns/{}", plain["id"]);
    app.post(
        &format!("{plain_path}/contacts"),
        &json!({"contacts": [
            {"phone": "+15551234567", "name": "Ann", "variables": {"day": "Mon"}},
            {"phone": "+15551234568", "name": "Bob"},
        ]}),
    )
    .await;
    app.request(Method::PATCH, &plain_path)
        .json(&json!({"template": "Hi {{name}} on {{day}}"}))
        .send()
        .await
        .unwrap();
    let err = error_of(
        app.post_empty(&format!("{plain_path}/start")).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    let message = err["message"].as_str().unwrap();
    assert!(
        message.contains("+15551234568") && message.contains("'day'"),
        "{message}"
    );
    assert!(err["field"].as_str().unwrap().ends_with("variables.day"));
    let still: Value = app.get(&plain_path).await.json().await.unwrap();
    assert_eq!(still["status"], "draft", "a refused start changes nothing");
}

#[tokio::test]
async fn scheduling_takes_a_future_rfc3339_time() {
    // No engine: the run must not finish while the test drives the machine.
    let app = spawn_app_with(|c| c.engine = None).await;
    let c = app.sms_campaign().await;
    let path = format!("/v1/campaigns/{}", c["id"]);
    app.post(&format!("{path}/contacts"), &json!({"contacts": [{"phone": "+15551234567", "name": "Ann", "variables": {"day": "Monday"}}]})).await;

    for bad in [
        json!({"start_at": "tomorrow"}),
        json!({"start_at": "2001-01-01T00:00:00Z"}),
        json!({}),
    ] {
        let err = error_of(
            app.post(&format!("{path}/schedule"), &bad).await,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
        assert_eq!(err["field"], "start_at", "{bad}");
    }
    let when = (chrono::Utc::now() + chrono::Duration::hours(2)).to_rfc3339();
    let scheduled: Value = app
        .post(&format!("{path}/schedule"), &json!({"start_at": when}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(scheduled["status"], "scheduled");
    let start_at =
        chrono::DateTime::parse_from_rfc3339(scheduled["start_at"].as_str().unwrap()).unwrap();
    let asked = chrono::DateTime::parse_from_rfc3339(&when).unwrap();
    assert!((start_at - asked).num_milliseconds().abs() < 1000);

    let started: Value = app
        .post_empty(&format!("{path}/start"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(started["status"], "running");
}

#[tokio::test]
async fn unknown_ids_and_routes_are_404() {
    let app = spawn_app().await;
    for path in [
        "/v1/campaigns/999",
        "/v1/campaigns/not-a-uuid",
        "/v1/campaigns/00000000-0000-0000-0000-000000000000",
        "/v1/nothing-here",
    ] {
        error_of(app.get(path).await, StatusCode::NOT_FOUND).await;
    }
    error_of(
        app.post_empty("/v1/campaigns/999/start").await,
        StatusCode::NOT_FOUND,
    )
    .await;
}

#[tokio::test]
async fn openapi_and_health_probes_are_served() {
    let app = spawn_app().await;
    let doc: Value = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let paths = doc["paths"].as_object().unwrap();
    for path in [
        "/v1/campaigns",
        "/v1/campaigns/{id}",
        "/v1/campaigns/{id}/start",
        "/v1/campaigns/{id}/schedule",
        "/v1/campaigns/{id}/pause",
        "/v1/campaigns/{id}/resume",
        "/v1/campaigns/{id}/cancel",
        "/v1/campaigns/{id}/contacts",
        "/v1/campaigns/{id}/contacts:import",
        "/v1/keys",
        "/v1/keys/{id}",
        "/v1/workspace",
        "/healthz",
        "/readyz",
    ] {
        assert!(paths.contains_key(path), "OpenAPI lacks {path}");
    }
    assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
    let health = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let ready: Value = app
        .client
        .get(app.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "ready");
}
