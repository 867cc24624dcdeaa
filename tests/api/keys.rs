//! Authentication, API keys and the workspace over the API.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{error_of, spawn_app};

#[tokio::test]
async fn every_way_of_presenting_a_key_works() {
    let app = spawn_app().await;
    let bearer = app
        .client
        .get(app.url("/v1/campaigns"))
        .bearer_auth(&app.key)
        .send()
        .await
        .unwrap();
    assert_eq!(bearer.status(), StatusCode::OK);
    let header = app
        .client
        .get(app.url("/v1/campaigns"))
        .header("X-API-Key", &app.key)
        .send()
        .await
        .unwrap();
    assert_eq!(header.status(), StatusCode::OK);
    let query = app
        .client
        .get(app.url(&format!("/v1/campaigns?token={}", app.key)))
        .send()
        .await
        .unwrap();
    assert_eq!(query.status(), StatusCode::OK);
}

#[tokio::test]
async fn missing_malformed_and_forged_keys_are_401() {
    let app = spawn_app().await;
    let forged = format!("{}{}", &app.key[..app.key.len() - 4], "AAAA");
    let requests = [
        app.client.get(app.url("/v1/campaigns")),
        app.client
            .get(app.url("/v1/campaigns"))
            .bearer_auth("hk_nope"),
        app.client
            .get(app.url("/v1/campaigns"))
            .header("Authorization", format!("Basic {}", app.key)),
        app.client
            .get(app.url("/v1/campaigns"))
            .bearer_auth(&forged),
        app.client
            .get(app.url("/v1/campaigns"))
            .header("X-API-Key", ""),
        app.client
            .post(app.url("/v1/campaigns"))
            .json(&json!({"name": "x", "channel": "sms"})),
    ];
    for request in requests {
        let err = error_of(request.send().await.unwrap(), StatusCode::UNAUTHORIZED).await;
        assert_eq!(err["code"], "unauthorized");
    }
}

#[tokio::test]
async fn keys_are_created_listed_and_revoked_at_once() {
    let app = spawn_app().await;
    let created = app
        .request(Method::POST, "/v1/keys")
        .json(&json!({"label": "ci"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let created: Value = created.json().await.unwrap();
    let new_key = created["key"].as_str().unwrap().to_owned();
    assert!(new_key.starts_with(&format!("hk_{}_", created["prefix"].as_str().unwrap())));
    assert!(new_key.len() >= 40, "≥128 bits of secret");

    let listed: Value = app
        .request_as(&new_key, Method::GET, "/v1/keys")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let keys = listed["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    assert!(
        keys.iter().all(|k| k.get("key").is_none()),
        "secrets are never listed"
    );
    assert!(!listed.to_string().contains(&new_key[14..]));

    let revoked = app
        .request(Method::DELETE, &format!("/v1/keys/{}", created["id"]))
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), StatusCode::OK);
    let revoked: Value = revoked.json().await.unwrap();
    assert!(revoked["revoked_at"].is_string());
    let refused = app
        .request_as(&new_key, Method::GET, "/v1/campaigns")
        .send()
        .await
        .unwrap();
    error_of(refused, StatusCode::UNAUTHORIZED).await;

    error_of(
        app.request(Method::DELETE, "/v1/keys/99999")
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
    )
    .await;
    let long_label = app
        .request(Method::POST, "/v1/keys")
        .json(&json!({"label": "x".repeat(101)}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(long_label, StatusCode::UNPROCESSABLE_ENTITY).await["field"],
        "label"
    );
    let bad_json = app
        .request(Method::POST, "/v1/keys")
        .header("content-type", "application/json")
        .body("{")
        .send()
        .await
        .unwrap();
    error_of(bad_json, StatusCode::BAD_REQUEST).await;
    // An empty POST makes an unlabelled key.
    assert_eq!(
        app.post_empty("/v1/keys").await.status(),
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn a_key_gives_only_scopes_it_has_and_unknown_scopes_are_refused() {
    let app = spawn_app().await;
    // The everyday key has no scopes, so it cannot mint a `pii` key.
    let escalation = app.post("/v1/keys", &json!({"scopes": ["pii"]})).await;
    let err = error_of(escalation, StatusCode::FORBIDDEN).await;
    assert_eq!(err["code"], "missing_scope");
    assert_eq!(err["field"], "scopes");
    let listed: Value = app.get("/v1/keys").await.json().await.unwrap();
    assert_eq!(listed["keys"].as_array().unwrap().len(), 1, "nothing made");

    // A `pii` key can hand its scope on, and the list shows it.
    let admin = app
        .new_key_with("alpha", &[herald::domain::Scope::Pii])
        .await;
    let made = app
        .post_as(
            &admin,
            "/v1/keys",
            &json!({"label": "exporter", "scopes": ["pii"]}),
        )
        .await;
    assert_eq!(made.status(), StatusCode::CREATED);
    let made: Value = made.json().await.unwrap();
    assert_eq!(made["scopes"], json!(["pii"]));
    let plain: Value = app
        .post_as(&admin, "/v1/keys", &json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(plain["scopes"], json!([]), "scopes are never implied");

    for bad in [
        json!({"scopes": ["admin"]}),
        json!({"scopes": "pii"}),
        json!({"scopes": [1]}),
    ] {
        let refused = app.post_as(&admin, "/v1/keys", &bad).await;
        let err = error_of(refused, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert!(
            err["field"].as_str().unwrap().starts_with("scopes"),
            "{bad}: {err}"
        );
    }
}

#[tokio::test]
async fn the_workspace_is_readable() {
    let app = spawn_app().await;
    let ws: Value = app.get("/v1/workspace").await.json().await.unwrap();
    assert_eq!(ws["name"], "alpha");
    assert_eq!(ws["default_region"], "US");
    assert!(ws["credit_balance"].is_null());
}

#[tokio::test]
async fn a_key_over_its_rate_gets_429_with_retry_after_and_others_do_not() {
    let app = crate::helpers::spawn_app_with(|c| c.api.rate_limit_per_key = 5).await;
    let mut limited = None;
    for _ in 0..30 {
        let response = app.get("/v1/campaigns").await;
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(response);
            break;
        }
    }
    let response = limited.expect("the burst of 10 runs out");
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    assert_eq!(
        error_of(response, StatusCode::TOO_MANY_REQUESTS).await["code"],
        "rate_limited"
    );
    let other = app.new_key("beta").await;
    let fine = app
        .request_as(&other, Method::GET, "/v1/campaigns")
        .send()
        .await
        .unwrap();
    assert_eq!(fine.status(), StatusCode::OK, "each key has its own budget");
}

#[tokio::test]
async fn cors_is_off_by_default_and_allows_only_configured_origins() {
    let preflight = |app: &crate::helpers::TestApp, origin: &str| {
        app.client
            .request(Method::OPTIONS, app.url("/v1/campaigns"))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .header(
                "Access-Control-Request-Headers",
                "authorization,content-type",
            )
            .send()
    };
    let closed = spawn_app().await;
    let response = preflight(&closed, "https://app.example").await.unwrap();
    assert!(response
        .headers()
        .get("access-control-allow-origin")
        .is_none());

    let open =
        crate::helpers::spawn_app_with(|c| c.api.cors_origins = vec!["https://app.example".into()])
            .await;
    let allowed = preflight(&open, "https://app.example").await.unwrap();
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let other = preflight(&open, "https://evil.example").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
}
