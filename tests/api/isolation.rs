//! A key of workspace B on every route of workspace A's campaign: 403 or
//! 404, and never a byte of A's data.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::spawn_app;

#[tokio::test]
async fn another_workspace_sees_nothing_and_changes_nothing() {
    let app = spawn_app().await;
    let c = app.sms_campaign().await;
    app.post(
        &format!("/v1/campaigns/{}/contacts", c["id"]),
        &json!({"contacts": [{"phone": "+15551234567", "name": "Secret Sam", "variables": {"day": "Monday"}}]}),
    )
    .await;
    let intruder = app.new_key("beta").await;
    let when = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();

    for id in [c["id"].to_string(), c["uuid"].as_str().unwrap().to_owned()] {
        let base = format!("/v1/campaigns/{id}");
        let attempts: Vec<(Method, String, Option<Value>)> = vec![
            (Method::GET, base.clone(), None),
            (Method::PATCH, base.clone(), Some(json!({"name": "pwned"}))),
            (Method::DELETE, base.clone(), None),
            (
                Method::POST,
                format!("{base}/schedule"),
                Some(json!({"start_at": when})),
            ),
            (Method::POST, format!("{base}/start"), None),
            (Method::POST, format!("{base}/pause"), None),
            (Method::POST, format!("{base}/resume"), None),
            (Method::POST, format!("{base}/cancel"), None),
            (Method::GET, format!("{base}/contacts"), None),
            (
                Method::POST,
                format!("{base}/contacts"),
                Some(json!({"contacts": [{"phone": "+15550000000"}]})),
            ),
        ];
        for (method, path, body) in attempts {
            let mut request = app.request_as(&intruder, method.clone(), &path);
            if let Some(body) = body {
                request = request.json(&body);
            }
            let response = request.send().await.unwrap();
            let status = response.status();
            let text = response.text().await.unwrap();
            assert!(
                status == StatusCode::FORBIDDEN || status == StatusCode::NOT_FOUND,
                "{method} {path} gave {status}"
            );
            assert!(
                !text.contains("Secret Sam")
                    && !text.contains("Reminders")
                    && !text.contains("+15551234567"),
                "{text}"
            );
        }
        let import = app
            .request_as(
                &intruder,
                Method::POST,
                &format!("/v1/campaigns/{id}/contacts:import"),
            )
            .header("content-type", "text/csv")
            .body("phone,day\n+15550000000,Monday\n")
            .send()
            .await
            .unwrap();
        assert_eq!(import.status(), StatusCode::FORBIDDEN);
    }

    let listed: Value = app
        .request_as(&intruder, Method::GET, "/v1/campaigns")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["pagination"]["total_items"], 0);
    let owner_keys: Value = app.get("/v1/keys").await.json().await.unwrap();
    let owner_key_id = owner_keys["keys"][0]["id"].clone();
    let revoke = app
        .request_as(
            &intruder,
            Method::DELETE,
            &format!("/v1/keys/{owner_key_id}"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(revoke.status(), StatusCode::NOT_FOUND);

    // The owner's campaign is untouched.
    let after: Value = app
        .get(&format!("/v1/campaigns/{}", c["id"]))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(after["name"], "Reminders");
    assert_eq!(after["status"], "draft");
    assert_eq!(after["contact_count"], 1);
    assert_eq!(
        app.get("/v1/campaigns").await.status(),
        StatusCode::OK,
        "the owner's key still works"
    );
}
