//! Traces over OTLP/HTTP (issue #10): a `herald` process with
//! `--otlp-endpoint` exports its request and run spans to a collector,
//! flushes them when SIGTERM stops it, and never exports a key or a phone
//! number; a bad endpoint refuses to start, naming it.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use prost::Message as _;
use serde_json::json;

use crate::helpers::{free_port, fresh_database_url, HERALD};
use crate::process::{create_campaign, create_key, Node, NodeOptions};

/// What a fake OTLP/HTTP collector received: each body raw and decoded.
#[derive(Clone, Default)]
struct Collector {
    bodies: Arc<Mutex<Vec<Vec<u8>>>>,
}

/// One exported span: its name, attributes and its resource's attributes.
struct Span {
    name: String,
    attributes: BTreeMap<String, String>,
    resource: BTreeMap<String, String>,
}

fn strings(attributes: &[KeyValue]) -> BTreeMap<String, String> {
    attributes
        .iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => s.clone(),
                Some(any_value::Value::IntValue(n)) => n.to_string(),
                Some(any_value::Value::BoolValue(b)) => b.to_string(),
                Some(any_value::Value::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

impl Collector {
    /// Serves `POST /v1/traces` on a free port; returns its base URL.
    async fn serve() -> (Self, String) {
        let collector = Self::default();
        let bodies = collector.bodies.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let bodies = bodies.clone();
                async move {
                    bodies.lock().unwrap().push(body.to_vec());
                    // An empty ExportTraceServiceResponse: everything accepted.
                    (
                        [("content-type", "application/x-protobuf")],
                        Vec::<u8>::new(),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (collector, base)
    }

    fn spans(&self) -> Vec<Span> {
        let mut spans = Vec::new();
        for body in self.bodies.lock().unwrap().iter() {
            let request = ExportTraceServiceRequest::decode(body.as_slice())
                .expect("the body is an OTLP protobuf ExportTraceServiceRequest");
            for resource_spans in request.resource_spans {
                let resource = strings(
                    &resource_spans
                        .resource
                        .map(|r| r.attributes)
                        .unwrap_or_default(),
                );
                for scope in resource_spans.scope_spans {
                    for span in scope.spans {
                        spans.push(Span {
                            name: span.name,
                            attributes: strings(&span.attributes),
                            resource: resource.clone(),
                        });
                    }
                }
            }
        }
        spans
    }

    /// Whether any body holds `needle`, in any field, events included.
    fn contains(&self, needle: &str) -> bool {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .any(|body| body.windows(needle.len()).any(|w| w == needle.as_bytes()))
    }
}

#[tokio::test]
async fn spans_reach_an_otlp_collector_flushed_at_sigterm_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let database_url = fresh_database_url(dir.path()).await;
    let key = create_key(&database_url, "traces");
    let (collector, endpoint) = Collector::serve().await;
    let mut herald = Node::start_with_env(
        &database_url,
        free_port(),
        NodeOptions::default(),
        &dir.path().join("herald.log"),
        // No path: Herald adds /v1/traces. The node logs at warn only;
        // traces do not depend on RUST_LOG.
        &[("HERALD_OTLP_ENDPOINT", &endpoint)],
    )
    .await;

    let provider = json!({"kind": "simulated", "latency_ms": 5});
    let id = create_campaign(&herald, &key, provider, 5).await;
    herald.start_campaign(&key, id).await;
    herald
        .wait_for(&key, id, 30, |c| c["status"] == "completed")
        .await;
    // The last request, answered just before SIGTERM: only the flush at
    // exit exports it (batches otherwise leave every 5 s).
    let last = reqwest::Client::new()
        .get(format!("{}/v1/campaigns/{id}/runs", herald.base))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert!(last.status().is_success());
    herald.terminate();
    let status = herald.exited(Duration::from_secs(30)).await;
    assert!(status.success(), "clean exit after SIGTERM: {status}");

    let last_path = format!("/v1/campaigns/{id}/runs");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let spans = loop {
        let spans = collector.spans();
        let has = |name: &str, path: Option<&str>| {
            spans.iter().any(|s| {
                s.name == name && path.is_none_or(|p| s.attributes.get("path") == Some(&p.into()))
            })
        };
        if has("http", Some(&last_path)) && has("run", None) && has("slice", None) {
            break spans;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the collector received {:?}",
            spans
                .iter()
                .map(|s| (&s.name, &s.attributes))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    for span in &spans {
        assert_eq!(span.resource.get("service.name").unwrap(), "herald");
        assert_eq!(
            span.resource.get("service.version").unwrap(),
            env!("CARGO_PKG_VERSION")
        );
    }
    let request = spans
        .iter()
        .find(|s| s.name == "http" && s.attributes.get("path") == Some(&last_path))
        .unwrap();
    assert_eq!(request.attributes.get("method").unwrap(), "GET");
    assert!(
        request
            .attributes
            .get("request_id")
            .is_some_and(|id| !id.is_empty() && id != "-"),
        "{:?}",
        request.attributes
    );
    let run = spans.iter().find(|s| s.name == "run").unwrap();
    assert_eq!(run.attributes.get("campaign").unwrap(), &id.to_string());

    // Keys by prefix at most, never whole; no recipient's number.
    let secret = key.rsplit('_').next().unwrap();
    assert!(!collector.contains(&key), "the API key was exported");
    assert!(!collector.contains(secret), "the key's secret was exported");
    assert!(!collector.contains("+1555"), "a phone number was exported");
    assert!(
        !collector.contains("1555000000"),
        "a phone number was exported"
    );
}

/// A bad endpoint stops `herald` before it starts, from a flag, the
/// environment or herald.toml, naming the option, the value and what is
/// allowed; a good one shows in `config check` with /v1/traces added.
#[test]
fn a_bad_otlp_endpoint_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let database_url = format!("sqlite://{}", dir.path().join("never.db").display());
    let herald = |args: &[&str], env: &[(&str, &str)]| {
        let mut command = Command::new(HERALD);
        command
            .current_dir(dir.path())
            .args(args)
            .env("HERALD_DATABASE_URL", &database_url)
            .env("HERALD_ADDR", format!("127.0.0.1:{}", free_port()))
            .env("HERALD_NO_DEMO", "1");
        for (k, v) in env {
            command.env(k, v);
        }
        // Refused values exit at once; one accepted by mistake would serve
        // forever, so it is stopped after a while (and the test fails).
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait_with_output().unwrap()
    };
    let refused = |out: std::process::Output, value: &str| {
        assert!(!out.status.success(), "{value} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        for needle in ["--otlp-endpoint", value, "an http:// or https:// URL"] {
            assert!(stderr.contains(needle), "{value}: {needle} in {stderr}");
        }
    };
    refused(
        herald(&["serve", "--otlp-endpoint", "ftp://x"], &[]),
        "ftp://x",
    );
    refused(herald(&["--otlp-endpoint", "notaurl"], &[]), "notaurl");
    refused(
        herald(&["serve"], &[("HERALD_OTLP_ENDPOINT", "notaurl")]),
        "notaurl",
    );
    std::fs::write(
        dir.path().join("herald.toml"),
        "otlp_endpoint = \"ftp://x\"\n",
    )
    .unwrap();
    refused(herald(&["config", "check"], &[]), "ftp://x");
    assert!(
        !dir.path().join("never.db").exists(),
        "refused before opening the database"
    );

    std::fs::write(
        dir.path().join("herald.toml"),
        "otlp_endpoint = \"https://otel:hunter2@collector.example:4318\"\n",
    )
    .unwrap();
    let out = herald(&["config", "check"], &[]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let line = stdout
        .lines()
        .find(|l| l.starts_with("otlp_endpoint "))
        .expect("config check lists otlp_endpoint");
    assert!(
        line.ends_with("= https://otel:********@collector.example:4318/v1/traces"),
        "{line}"
    );
    std::fs::remove_file(dir.path().join("herald.toml")).unwrap();
    let unset = String::from_utf8(herald(&["config", "check"], &[]).stdout).unwrap();
    assert!(unset.contains("(none: no trace export)"), "{unset}");
}
