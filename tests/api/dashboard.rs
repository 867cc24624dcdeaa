//! The dashboard in a real headless Chromium, driven by Playwright for
//! Python (tests/python/dashboard.py). `./test.sh` installs Debian's
//! chromium and the playwright package.

use std::time::Duration;

use serde_json::json;

use crate::helpers::spawn_app_with;

#[tokio::test]
async fn the_dashboard_signs_in_creates_starts_pauses_and_resumes() {
    let app = spawn_app_with(|c| {
        if let Some(engine) = c.engine.as_mut() {
            engine.in_flight = 8;
            engine.slice = 32;
        }
    })
    .await;
    let slow = app
        .campaign_with_contacts(
            json!({"channel": "sms", "template": "Hi {{name}}", "name": "Slow one",
                   "provider": {"kind": "simulated", "latency_ms": 25, "receipt_delay_ms": 0}}),
            1500,
        )
        .await;
    let python = std::env::var("HERALD_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let shots = format!("{}/target/test-artifacts", env!("CARGO_MANIFEST_DIR"));
    let child = tokio::process::Command::new(python)
        .arg(format!(
            "{}/tests/python/dashboard.py",
            env!("CARGO_MANIFEST_DIR")
        ))
        .env("HERALD_BASE", &app.base)
        .env("HERALD_TOKEN", &app.key)
        .env("HERALD_SLOW_CAMPAIGN", slow["id"].to_string())
        .env("HERALD_SCREENSHOTS", &shots)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python runs (use ./test.sh, which installs playwright and chromium)");
    let out = tokio::time::timeout(Duration::from_secs(240), child.wait_with_output())
        .await
        .expect("the browser test finished in time")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("dashboard ok"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::path::Path::new(&format!("{shots}/dashboard-campaign.png")).exists());
    let served = app.client.get(app.url("/")).send().await.unwrap();
    assert!(served.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("default-src 'self'"));
}
