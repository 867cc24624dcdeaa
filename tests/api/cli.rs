//! The `herald` binary: key management on the database, serving with a demo
//! workspace, and graceful shutdown on SIGTERM.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;

use crate::helpers::spawn_app;

const HERALD: &str = env!("CARGO_BIN_EXE_herald");

fn herald(database_url: &str, args: &[&str]) -> std::process::Output {
    Command::new(HERALD)
        .args(args)
        .env("HERALD_DATABASE_URL", database_url)
        .output()
        .expect("herald runs")
}

#[tokio::test]
async fn keys_create_prints_only_the_key_and_revoke_takes_effect() {
    let app = spawn_app().await;
    let out = herald(
        &app.database_url,
        &["keys", "create", "--workspace", "gamma", "--label", "cli"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let key = stdout.trim();
    assert_eq!(
        stdout.lines().count(),
        1,
        "only the key on stdout: {stdout:?}"
    );
    assert!(key.starts_with("hk_"));

    let ok = app
        .client
        .get(app.url("/v1/workspace"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    let workspace: serde_json::Value = ok.json().await.unwrap();
    assert_eq!(workspace["name"], "gamma");

    let listed = herald(&app.database_url, &["keys", "list", "--workspace", "gamma"]);
    let listing = String::from_utf8(listed.stdout).unwrap();
    let prefix = &key[3..13];
    assert!(
        listing.contains(prefix) && listing.contains("active"),
        "{listing}"
    );
    assert!(!listing.contains(key), "list never shows a secret");

    let revoked = herald(
        &app.database_url,
        &["keys", "revoke", "--workspace", "gamma", prefix],
    );
    assert!(revoked.status.success());
    let refused = app
        .client
        .get(app.url("/v1/workspace"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
}

#[test]
fn keys_commands_refuse_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("h.db").display());
    let unknown = herald(&url, &["keys", "list", "--workspace", "nobody"]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no workspace named 'nobody'"));
    let empty = herald(&url, &["keys", "create", "--workspace", "  "]);
    assert!(!empty.status.success());
    let missing_arg = herald(&url, &["keys", "create"]);
    assert!(!missing_arg.status.success());
    assert!(String::from_utf8_lossy(&missing_arg.stderr).contains("--workspace"));
    let bad_region = Command::new(HERALD)
        .args(["--default-region", "XX", "--addr", "127.0.0.1:0"])
        .env("HERALD_DATABASE_URL", &url)
        .output()
        .unwrap();
    assert!(!bad_region.status.success());
    assert!(String::from_utf8_lossy(&bad_region.stderr).contains("'XX' is not an ISO 3166 region"));
    let bad_url = herald(
        "postgres-ish://nowhere",
        &["keys", "list", "--workspace", "x"],
    );
    assert!(!bad_url.status.success());
}

#[test]
fn help_explains_the_configuration() {
    let out = Command::new(HERALD).arg("--help").output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "HERALD_ADDR",
        "HERALD_DATABASE_URL",
        "HERALD_MAX_BODY_BYTES",
        "keys",
        "serve",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}");
    }
    let keys_help = String::from_utf8(
        Command::new(HERALD)
            .args(["keys", "create", "--help"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(keys_help.contains("--workspace"));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_healthy(base: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(r) = reqwest::get(format!("{base}/healthz")).await {
            if r.status() == StatusCode::OK {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("server did not become healthy");
}

/// First start prints a working demo key; SIGTERM stops the server cleanly;
/// a second start on the same database prints no key.
#[tokio::test]
async fn serve_prints_a_demo_key_once_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("herald.db").display());
    for run in 0..2 {
        let port = free_port();
        let mut child = Command::new(HERALD)
            .env("HERALD_DATABASE_URL", &url)
            .env("HERALD_ADDR", format!("127.0.0.1:{port}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        wait_healthy(&base).await;
        let kill = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "server did not stop on SIGTERM");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(status.success(), "graceful exit: {status}");
        let mut stdout = String::new();
        std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut stdout).unwrap();
        if run == 0 {
            let key = stdout
                .split_whitespace()
                .find(|w| w.starts_with("hk_"))
                .expect("demo key printed");
            assert!(
                stdout.contains("curl -H 'Authorization: Bearer hk_"),
                "{stdout}"
            );
            // The key works against the same database.
            let app_key = key.to_owned();
            let out = herald(&url, &["keys", "list", "--workspace", "demo"]);
            assert!(String::from_utf8_lossy(&out.stdout).contains(&app_key[3..13]));
        } else {
            assert!(
                !stdout.contains("hk_"),
                "the key is printed only once: {stdout}"
            );
        }
    }
}
