//! The webhook and Twilio providers against local fake servers (wiremock),
//! with signatures checked on both sides.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use reqwest::StatusCode;
use serde_json::{json, Value};
use wiremock::matchers::{header_exists, method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::helpers::{count_by_status, spawn_app};

const SECRET: &str = "a-webhook-secret-of-some-length";

/// A webhook receiver that checks Herald's signature and answers `busy`
/// to each recipient's first `busy_first` attempts.
#[derive(Clone, Default)]
struct Receiver {
    busy_first: u32,
    attempts: Arc<Mutex<HashMap<String, Vec<String>>>>,
    bad_signatures: Arc<AtomicUsize>,
}

impl Respond for Receiver {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let header = |name: &str| {
            request
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        let timestamp: i64 = header("x-herald-timestamp").parse().unwrap_or(0);
        let expected = herald::providers::webhook::signature(SECRET, timestamp, &request.body);
        if header("x-herald-signature") != expected
            || (chrono::Utc::now().timestamp() - timestamp).abs() > 300
        {
            self.bad_signatures.fetch_add(1, Ordering::SeqCst);
            return ResponseTemplate::new(401);
        }
        let body: Value = serde_json::from_slice(&request.body).unwrap();
        let to = body["to"].as_str().unwrap().to_owned();
        let mut attempts = self.attempts.lock().unwrap();
        let seen = attempts.entry(to).or_default();
        seen.push(body["id"].as_str().unwrap().to_owned());
        if seen.len() as u32 <= self.busy_first {
            ResponseTemplate::new(200).set_body_json(
                json!({"id": format!("wh-{}", body["execution_id"]), "status": "busy"}),
            )
        } else {
            ResponseTemplate::new(200).set_body_json(json!({"id": format!("wh-{}", body["execution_id"]), "status": "completed", "duration_seconds": 31}))
        }
    }
}

#[tokio::test]
async fn webhook_busy_twice_then_completed_is_retried_with_fresh_ids() {
    let app = spawn_app().await;
    let fake = MockServer::start().await;
    let receiver = Receiver {
        busy_first: 2,
        ..Default::default()
    };
    Mock::given(method("POST"))
        .and(path("/hook"))
        .respond_with(receiver.clone())
        .mount(&fake)
        .await;

    let c = app
        .campaign_with_contacts(
            json!({"channel": "voice", "template": "Hi {{name}}", "sender": "+15550001234", "max_attempts": 3,
                   "provider": {"kind": "webhook", "url": format!("{}/hook", fake.uri()), "secret": SECRET}}),
            40,
        )
        .await;
    app.post_empty(&format!("/v1/campaigns/{}/start", c["id"]))
        .await;
    let done = app.wait_status(&c["id"], "completed", 60).await;
    assert_eq!(done["progress"]["sent"], 40);
    assert_eq!(receiver.bad_signatures.load(Ordering::SeqCst), 0);
    let attempts = receiver.attempts.lock().unwrap().clone();
    assert_eq!(attempts.len(), 40);
    for ids in attempts.values() {
        assert_eq!(ids.len(), 3, "busy, busy, completed");
        let suffixes: Vec<&str> = ids
            .iter()
            .map(|id| id.rsplit(':').next().unwrap())
            .collect();
        assert_eq!(
            suffixes,
            ["1", "2", "3"],
            "each attempt has its own idempotency key"
        );
    }
    for e in app.all_executions(&c["id"]).await {
        assert_eq!(e["status"], "completed");
        assert_eq!(e["execution_data"]["attempts"], 3);
        assert_eq!(e["execution_data"]["duration_seconds"], 31);
        assert!(e["call_id"].as_str().unwrap().starts_with("wh-"));
    }
}

#[tokio::test]
async fn a_provider_refusing_our_credentials_fails_the_run_and_refunds() {
    let app = spawn_app().await;
    let ws = app.store.workspace_by_name("alpha").await.unwrap().unwrap();
    app.store.add_credits(ws.id, 5_000, None).await.unwrap();
    let fake = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(401).set_body_string("bad token"))
        .mount(&fake)
        .await;
    let c = app
        .campaign_with_contacts(
            json!({"channel": "sms", "template": "Hi {{name}}",
                   "provider": {"kind": "webhook", "url": format!("{}/hook", fake.uri()), "secret": SECRET}}),
            2_500,
        )
        .await;
    app.post_empty(&format!("/v1/campaigns/{}/start", c["id"]))
        .await;
    let failed = app.wait_status(&c["id"], "failed", 30).await;
    let p = &failed["progress"];
    assert_eq!(p["sent"], 0);
    assert_eq!(
        p["failed"].as_i64().unwrap() + p["skipped"].as_i64().unwrap(),
        2_500
    );
    assert!(
        p["skipped"].as_i64().unwrap() >= 1_500,
        "it stops after the first slice: {p}"
    );
    assert!(fake.received_requests().await.unwrap().len() <= 1_000);
    let runs = app.runs(&c["id"]).await;
    assert!(runs["runs"][0]["error"]
        .as_str()
        .unwrap()
        .contains("misconfigured"));
    let credits: Value = app.get("/v1/credits").await.json().await.unwrap();
    assert_eq!(credits["balance"], 5_000, "everything unsent is refunded");
}

#[tokio::test]
async fn rejected_and_flaky_sends_end_failed_after_their_attempts() {
    let app = spawn_app().await;
    let fake = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/reject"))
        .respond_with(ResponseTemplate::new(400))
        .mount(&fake)
        .await;
    Mock::given(method("POST"))
        .and(path("/flaky"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&fake)
        .await;
    Mock::given(method("POST"))
        .and(path("/garbled"))
        .respond_with(ResponseTemplate::new(200).set_body_string("<html>"))
        .mount(&fake)
        .await;

    for (route, expected_requests) in [("reject", 10), ("flaky", 20), ("garbled", 20)] {
        let c = app
            .campaign_with_contacts(
                json!({"channel": "sms", "template": "Hi {{name}}", "max_attempts": 2,
                       "provider": {"kind": "webhook", "url": format!("{}/{route}", fake.uri()), "secret": SECRET}}),
                10,
            )
            .await;
        app.post_empty(&format!("/v1/campaigns/{}/start", c["id"]))
            .await;
        let failed = app.wait_status(&c["id"], "failed", 30).await;
        assert_eq!(failed["progress"]["failed"], 10, "{route}");
        let executions = app.all_executions(&c["id"]).await;
        assert_eq!(count_by_status(&executions)["failed"], 10);
        assert!(executions[0]["execution_data"]["error_details"].is_string());
        let requests = fake
            .received_requests()
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.url.path() == format!("/{route}"))
            .count();
        assert_eq!(
            requests, expected_requests,
            "{route}: 4xx is final, 5xx and garbage are retried"
        );
    }
}

/// An SMS campaign of `n` contacts sending through the fake Twilio at
/// `fake` (account AC123, auth token `tok-secret`).
async fn twilio_campaign(app: &crate::helpers::TestApp, fake: &MockServer, n: usize) -> Value {
    app.campaign_with_contacts(
        json!({"channel": "sms", "template": "Hi {{name}}",
               "provider": {"kind": "twilio", "base_url": fake.uri(), "account_sid": "AC123",
                            "auth_token": "tok-secret", "from": "+15550009999"}}),
        n,
    )
    .await
}

#[tokio::test]
async fn twilio_sends_the_messages_api_shape_and_verifies_status_callbacks() {
    let app = spawn_app().await;
    let fake = MockServer::start().await;
    let counter = Arc::new(AtomicUsize::new(0));
    let responder = {
        let counter = counter.clone();
        move |_: &Request| {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            ResponseTemplate::new(201)
                .set_body_json(json!({"sid": format!("SM{n:032}"), "status": "queued"}))
        }
    };
    Mock::given(method("POST"))
        .and(path("/2010-04-01/Accounts/AC123/Messages.json"))
        .and(header_exists("authorization"))
        .respond_with(responder)
        .mount(&fake)
        .await;
    let c = twilio_campaign(&app, &fake, 5).await;
    app.post_empty(&format!("/v1/campaigns/{}/start", c["id"]))
        .await;
    app.wait_status(&c["id"], "completed", 30).await;

    let requests = fake.received_requests().await.unwrap();
    assert_eq!(requests.len(), 5);
    let auth = requests[0]
        .headers
        .get("authorization")
        .unwrap()
        .to_str()
        .unwrap();
    use base64::Engine as _;
    assert_eq!(
        auth,
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("AC123:tok-secret")
        )
    );
    let form: HashMap<String, String> = serde_urlencoded::from_bytes(&requests[0].body).unwrap();
    assert_eq!(form["From"], "+15550009999");
    assert!(form["To"].starts_with("+1555"));
    assert!(form["Body"].starts_with("Hi P"));
    let callback = format!("{}/v1/providers/twilio/status", app.base);
    assert_eq!(form["StatusCallback"], callback);

    let post_status = |sid: String, status: &str, signature: Option<String>| {
        let params = vec![
            ("MessageSid".to_owned(), sid),
            ("MessageStatus".to_owned(), status.to_owned()),
        ];
        let signature = signature.unwrap_or_else(|| {
            herald::providers::twilio::signature("tok-secret", &callback, &params)
        });
        app.client
            .post(&callback)
            .header("X-Twilio-Signature", signature)
            .form(&params)
            .send()
    };
    let sid = |n: usize| format!("SM{n:032}");
    let forged = post_status(sid(0), "delivered", Some("AAAA".into()))
        .await
        .unwrap();
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        post_status(sid(0), "sent", None).await.unwrap().status(),
        StatusCode::NO_CONTENT
    );
    for n in 0..4 {
        assert_eq!(
            post_status(sid(n), "delivered", None)
                .await
                .unwrap()
                .status(),
            StatusCode::NO_CONTENT
        );
    }
    post_status(sid(4), "undelivered", None).await.unwrap();
    // Duplicates and unknown messages are acknowledged, never counted.
    post_status(sid(0), "delivered", None).await.unwrap();
    let unknown = post_status("SMunknown".into(), "delivered", None)
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::NO_CONTENT);

    let done = app.campaign(&c["id"]).await;
    assert_eq!(done["progress"]["delivered"], 4);
    assert_eq!(done["progress"]["failed_delivery"], 1);
}

/// A status callback can overtake the write that records its send: it
/// waits for it, then counts, and only then is answered.
#[tokio::test]
async fn a_twilio_callback_that_overtakes_its_send_is_counted() {
    let app = spawn_app().await;
    let fake = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/2010-04-01/Accounts/AC123/Messages.json"))
        .respond_with(
            ResponseTemplate::new(201)
                .set_body_json(json!({"sid": format!("SM{:032}", 7), "status": "queued"}))
                // Long enough for the callback below to arrive first.
                .set_delay(std::time::Duration::from_millis(800)),
        )
        .mount(&fake)
        .await;
    let c = twilio_campaign(&app, &fake, 1).await;
    let callback = format!("{}/v1/providers/twilio/status", app.base);
    let params = vec![
        ("MessageSid".to_owned(), format!("SM{:032}", 7)),
        ("MessageStatus".to_owned(), "delivered".to_owned()),
    ];
    let signature = herald::providers::twilio::signature("tok-secret", &callback, &params);
    app.post_empty(&format!("/v1/campaigns/{}/start", c["id"]))
        .await;
    let early = app
        .client
        .post(&callback)
        .header("X-Twilio-Signature", signature)
        .form(&params)
        .send()
        .await
        .unwrap();
    assert_eq!(early.status(), StatusCode::NO_CONTENT);
    // Answered after it was written: the count is already there.
    let done = app.campaign(&c["id"]).await;
    assert_eq!(done["progress"]["sent"], 1, "{done}");
    assert_eq!(done["progress"]["delivered"], 1, "{done}");
}

/// A webhook that answers 503 while `down`, and `completed` otherwise,
/// counting the requests it gets while down.
#[derive(Clone, Default)]
struct Outage {
    down: Arc<std::sync::atomic::AtomicBool>,
    during_outage: Arc<AtomicUsize>,
}

impl Respond for Outage {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        if self.down.load(Ordering::SeqCst) {
            self.during_outage.fetch_add(1, Ordering::SeqCst);
            return ResponseTemplate::new(503);
        }
        let body: Value = serde_json::from_slice(&request.body).unwrap();
        ResponseTemplate::new(200).set_body_json(
            json!({"id": format!("wh-{}", body["execution_id"]), "status": "completed"}),
        )
    }
}

/// A provider outage trips the run's circuit breaker: sending pauses after
/// 20 faults in a row instead of spending every recipient's attempts, one
/// send probes after each (doubling) pause, and when the provider is back
/// the run completes with everyone sent and nobody failed.
#[tokio::test]
async fn a_provider_outage_pauses_sending_instead_of_burning_attempts() {
    let app = crate::helpers::spawn_app_with(|c| {
        if let Some(engine) = c.engine.as_mut() {
            engine.in_flight = 8;
            engine.slice = 32;
        }
    })
    .await;
    let fake = MockServer::start().await;
    let outage = Outage::default();
    outage.down.store(true, Ordering::SeqCst);
    Mock::given(method("POST"))
        .and(path("/hook"))
        .respond_with(outage.clone())
        .mount(&fake)
        .await;
    let c = app
        .campaign_with_contacts(
            json!({"channel": "sms", "template": "Hi {{name}}", "max_attempts": 3,
                   "provider": {"kind": "webhook", "url": format!("{}/hook", fake.uri()), "secret": SECRET}}),
            300,
        )
        .await;
    app.post_empty(&format!("/v1/campaigns/{}/start", c["id"]))
        .await;
    // Down for 2.5 s: the first slices trip the breaker, then probes at
    // about 1 s and 3 s (pauses of 1 s and 2 s).
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let tried = outage.during_outage.load(Ordering::SeqCst);
    outage.down.store(false, Ordering::SeqCst);
    // Without the breaker all 300 recipients would be tried (900 requests
    // with their retries) in these 2.5 s; with it, about two slices and a
    // probe.
    assert!(
        (20..=80).contains(&tried),
        "{tried} requests went into the outage"
    );
    let done = app.wait_status(&c["id"], "completed", 60).await;
    assert_eq!(done["progress"]["sent"], 300, "{done}");
    assert_eq!(done["progress"]["failed"], 0, "nobody lost to the outage");
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("herald_provider_circuit_opened_total{provider=\"webhook\"}"),
        "the breaker's trips are counted"
    );
}

/// Spawns an app whose provider requests time out after 300 ms.
async fn spawn_app_with_short_provider_timeout() -> crate::helpers::TestApp {
    crate::helpers::spawn_app_with(|c| {
        c.engine.as_mut().unwrap().provider_timeout = std::time::Duration::from_millis(300)
    })
    .await
}

/// Starts a webhook campaign of `n` contacts at `url`, allowing 3 attempts,
/// and waits for it to end failed; returns its executions.
async fn failed_webhook_run(app: &crate::helpers::TestApp, url: &str, n: usize) -> Vec<Value> {
    let c = app
        .campaign_with_contacts(
            json!({"channel": "sms", "template": "Hi {{name}}", "max_attempts": 3,
                   "provider": {"kind": "webhook", "url": url, "secret": SECRET}}),
            n,
        )
        .await;
    app.post_empty(&format!("/v1/campaigns/{}/start", c["id"]))
        .await;
    let failed = app.wait_status(&c["id"], "failed", 30).await;
    assert_eq!(failed["progress"]["failed"], n as i64, "{failed}");
    app.all_executions(&c["id"]).await
}

fn error_details(execution: &Value) -> &str {
    execution["execution_data"]["error_details"]
        .as_str()
        .unwrap_or_default()
}

#[tokio::test]
async fn a_send_that_times_out_is_written_off_not_resent() {
    let app = spawn_app_with_short_provider_timeout().await;
    let fake = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_delay(std::time::Duration::from_secs(2)))
        .mount(&fake)
        .await;
    let executions = failed_webhook_run(&app, &format!("{}/slow", fake.uri()), 5).await;
    for e in &executions {
        assert!(
            error_details(e).starts_with("outcome unknown: the provider did not answer in time"),
            "{e}"
        );
        assert_eq!(e["execution_data"]["attempts"], 1, "never resent: {e}");
    }
    let requests = fake.received_requests().await.unwrap().len();
    assert_eq!(requests, 5, "the provider saw each recipient once");
}

#[tokio::test]
async fn a_connection_reset_after_the_request_is_written_off_not_resent() {
    let app = spawn_app().await;
    // Reads each request, then hangs up without answering.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/send", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let seen = requests.clone();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let seen = seen.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while let Ok(n) = socket.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buf[..n]);
                    // The JSON body ends the request.
                    if request.ends_with(b"}") {
                        seen.fetch_add(1, Ordering::SeqCst);
                        return; // dropped: the connection closes unanswered
                    }
                }
            });
        }
    });
    let executions = failed_webhook_run(&app, &url, 4).await;
    for e in &executions {
        assert!(
            error_details(e).starts_with("outcome unknown: the connection to the provider failed"),
            "{e}"
        );
        assert_eq!(e["execution_data"]["attempts"], 1, "never resent: {e}");
    }
    assert_eq!(requests.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn a_provider_that_cannot_be_reached_is_retried_up_to_max_attempts() {
    let app = spawn_app().await;
    // A port with nothing listening: the connection is refused, so the
    // provider never saw the send and trying again is safe.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/send", closed.local_addr().unwrap());
    drop(closed);
    let executions = failed_webhook_run(&app, &url, 3).await;
    for e in &executions {
        assert_eq!(e["execution_data"]["attempts"], 3, "{e}");
        assert!(
            error_details(e).contains("could not connect to the provider"),
            "{e}"
        );
        assert!(
            e["execution_data"]["retry_reason"]
                .as_str()
                .unwrap_or_default()
                .contains("gave up after 3 attempts"),
            "{e}"
        );
    }
}

/// Answers each recipient's first send 429 with `Retry-After: 2`, then
/// accepts it; remembers when each send came.
#[derive(Clone, Default)]
struct Throttling {
    seen: Arc<Mutex<HashMap<String, Vec<std::time::Instant>>>>,
}

impl Respond for Throttling {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&request.body).unwrap();
        let mut seen = self.seen.lock().unwrap();
        let sends = seen
            .entry(body["to"].as_str().unwrap().to_owned())
            .or_default();
        sends.push(std::time::Instant::now());
        if sends.len() == 1 {
            ResponseTemplate::new(429)
                .insert_header("retry-after", "2")
                .set_body_string("slow down")
        } else {
            ResponseTemplate::new(200).set_body_json(
                json!({"id": format!("wh-{}", body["execution_id"]), "status": "sent"}),
            )
        }
    }
}

#[tokio::test]
async fn a_429_with_retry_after_is_retried_no_sooner_than_it_says() {
    // The test engine's own backoff is 20 ms: only Retry-After makes the
    // second attempt wait.
    let app = spawn_app().await;
    let fake = MockServer::start().await;
    let throttling = Throttling::default();
    Mock::given(method("POST"))
        .respond_with(throttling.clone())
        .mount(&fake)
        .await;
    let c = app
        .campaign_with_contacts(
            json!({"channel": "sms", "template": "Hi {{name}}", "max_attempts": 3,
                   "provider": {"kind": "webhook", "url": format!("{}/send", fake.uri()), "secret": SECRET}}),
            3,
        )
        .await;
    app.post_empty(&format!("/v1/campaigns/{}/start", c["id"]))
        .await;
    let done = app.wait_status(&c["id"], "completed", 30).await;
    assert_eq!(done["progress"]["sent"], 3, "{done}");
    for (to, sends) in throttling.seen.lock().unwrap().iter() {
        assert_eq!(sends.len(), 2, "{to}: throttled once, then sent");
        let waited = sends[1] - sends[0];
        assert!(
            waited >= std::time::Duration::from_millis(1900),
            "{to}: retried after {waited:?}, before Retry-After's 2 s"
        );
    }
    for e in app.all_executions(&c["id"]).await {
        assert_eq!(e["status"], "completed");
        assert_eq!(e["execution_data"]["attempts"], 2);
    }
}
