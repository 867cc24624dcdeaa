//! The seeds' own Python clients (tests/python/), changed only in host and
//! token, run against the server and their output is checked.
//! `./test.sh` installs `websockets` in a venv and sets HERALD_TEST_PYTHON.

use std::process::Stdio;
use std::time::Duration;

use serde_json::json;

use crate::helpers::{spawn_app_with, TestApp};

fn python() -> String {
    std::env::var("HERALD_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

async fn run_client(app: &TestApp, script: &str, campaign: &str) -> tokio::process::Child {
    let host = app.base.trim_start_matches("http://").to_owned();
    tokio::process::Command::new(python())
        .arg(format!(
            "{}/tests/python/{script}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .env("HERALD_WS_HOST", host)
        .env("HERALD_TOKEN", &app.key)
        .env("HERALD_CAMPAIGN_ID", campaign)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python runs (use ./test.sh, which installs the websockets package)")
}

async fn output_of(child: tokio::process::Child) -> String {
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the client finished in time")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "client failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test]
async fn the_seed_000_python_monitor_follows_a_campaign_to_completion() {
    let app = spawn_app_with(|c| {
        if let Some(engine) = c.engine.as_mut() {
            engine.in_flight = 16;
            engine.slice = 64;
        }
    })
    .await;
    let c = app
        .campaign_with_contacts(
            json!({"channel": "sms", "template": "Hi {{name}}", "provider": {"kind": "simulated", "latency_ms": 5}}),
            500,
        )
        .await;
    let id = c["id"].to_string();
    let client = run_client(&app, "seed000_monitor.py", &id).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    app.post_empty(&format!("/v1/campaigns/{id}/start")).await;
    let stdout = output_of(client).await;
    assert!(
        stdout.contains(&format!("Connection confirmed for campaign {id}")),
        "{stdout}"
    );
    assert!(stdout.contains("Status: draft"), "{stdout}");
    assert!(stdout.contains("Progress: 0/500 (0.0%)"), "{stdout}");
    assert!(stdout.contains("Status: completed"), "{stdout}");
    assert!(
        stdout.trim_end().ends_with("Campaign completed!"),
        "{stdout}"
    );
    let sent = app.campaign(&c["id"]).await["progress"]["sent"].clone();
    assert!(
        stdout.contains(&format!("Progress: {sent}/500 (100.0%)")),
        "{stdout}"
    );
}

#[tokio::test]
async fn the_seed_004_python_monitor_reads_a_producers_iterations() {
    let app = spawn_app_with(|_| {}).await;
    let c = app
        .create_campaign(json!({"name": "optimiser", "channel": "external"}))
        .await;
    let uuid = c["uuid"].as_str().unwrap().to_owned();
    let client = run_client(&app, "seed004_monitor.py", &uuid).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let path = format!("/v1/campaigns/{}/events", c["id"]);
    for (i, hv) in [(1, 0.41), (2, 0.5523), (3, 0.68219)] {
        app.post(
            &path,
            &json!({"type": "iteration_start", "data": {"iteration": i}}),
        )
        .await;
        app.post(
            &path,
            &json!({"type": "iteration_complete", "data": {"iteration": i, "hypervolume": hv}}),
        )
        .await;
    }
    app.post(&path, &json!({"type": "campaign_complete", "data": {"status": "converged", "total_iterations": 3}})).await;
    let stdout = output_of(client).await;
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            "Iter 1: HV=0.4100",
            "Iter 2: HV=0.5523",
            "Iter 3: HV=0.6822",
            "Campaign finished!"
        ]
    );
}
