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

    let pii = herald(
        &app.database_url,
        &["keys", "create", "--workspace", "gamma", "--scope", "pii"],
    );
    assert!(pii.status.success());
    let pii_key = String::from_utf8(pii.stdout).unwrap().trim().to_owned();
    let listed = herald(&app.database_url, &["keys", "list", "--workspace", "gamma"]);
    let listing = String::from_utf8(listed.stdout).unwrap();
    let prefix = &key[3..13];
    assert!(
        listing.contains(prefix) && listing.contains("active"),
        "{listing}"
    );
    let scopes_of = |prefix: &str| {
        let line = listing.lines().find(|l| l.contains(prefix)).unwrap();
        line.split_whitespace().nth(3).unwrap().to_owned()
    };
    assert_eq!(scopes_of(prefix), "-", "{listing}");
    assert_eq!(scopes_of(&pii_key[3..13]), "pii", "{listing}");
    assert!(!listing.contains(key), "list never shows a secret");

    let revoked = herald(
        &app.database_url,
        &["keys", "revoke", "--workspace", "gamma", prefix],
    );
    assert!(revoked.status.success());
    // The server caches keys it has seen for at most KEY_CACHE_TTL (1 s), so
    // a revoke from another process takes effect within it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let status = app
            .client
            .get(app.url("/v1/workspace"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
            .status();
        if status == StatusCode::UNAUTHORIZED {
            break;
        }
        assert_eq!(status, StatusCode::OK);
        assert!(
            std::time::Instant::now() < deadline,
            "a key revoked by the CLI was still accepted after 5 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn keys_commands_refuse_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_database_url(dir.path()).await;
    let unknown = herald(&url, &["keys", "list", "--workspace", "nobody"]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no workspace named 'nobody'"));
    let empty = herald(&url, &["keys", "create", "--workspace", "  "]);
    assert!(!empty.status.success());
    let bad_scope = herald(
        &url,
        &["keys", "create", "--workspace", "w", "--scope", "root"],
    );
    assert!(!bad_scope.status.success());
    let stderr = String::from_utf8_lossy(&bad_scope.stderr);
    assert!(
        stderr.contains("--scope") && stderr.contains("unknown scope 'root'"),
        "{stderr}"
    );
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

use crate::helpers::{free_port, fresh_database_url, wait_healthy};

/// First start prints a working demo key; SIGTERM stops the server cleanly;
/// a second start on the same database prints no key.
#[tokio::test]
async fn serve_prints_a_demo_key_once_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_database_url(dir.path()).await;
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

async fn herald_async(app: &crate::helpers::TestApp, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(HERALD)
        .args(args)
        .env("HERALD_URL", &app.base)
        .env("HERALD_KEY", &app.key)
        .output()
        .await
        .expect("herald runs")
}

fn spawn_watch(base: &str, key: &str, campaign: &str, json: bool) -> tokio::process::Child {
    let mut args = vec!["watch", campaign];
    if json {
        args.push("--json");
    }
    tokio::process::Command::new(HERALD)
        .args(&args)
        .env("HERALD_URL", base)
        .env("HERALD_KEY", key)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn exit_of(child: tokio::process::Child, secs: u64) -> (i32, String) {
    let out = tokio::time::timeout(Duration::from_secs(secs), child.wait_with_output())
        .await
        .expect("watch exits in time")
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test]
async fn watch_exits_by_outcome_and_prints_json_lines() {
    let app = crate::helpers::spawn_app_with(|c| {
        if let Some(engine) = c.engine.as_mut() {
            engine.in_flight = 16;
        }
    })
    .await;
    let c = app
        .campaign_with_contacts(
            serde_json::json!({"channel": "sms", "template": "Hi {{name}}", "provider": {"kind": "simulated", "latency_ms": 5}}),
            400,
        )
        .await;
    let id = c["id"].to_string();
    let watcher = spawn_watch(&app.base, &app.key, &id, true);
    tokio::time::sleep(Duration::from_millis(500)).await;
    app.post_empty(&format!("/v1/campaigns/{id}/start")).await;
    let (code, stdout) = exit_of(watcher, 60).await;
    assert_eq!(code, 0, "completed exits 0");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["type"], "connection_ack");
    assert_eq!(lines.last().unwrap()["data"]["status"], "completed");

    // A cancelled campaign exits 2.
    let slow = app
        .campaign_with_contacts(
            serde_json::json!({"channel": "sms", "template": "Hi {{name}}", "provider": {"kind": "simulated", "latency_ms": 50}}),
            2000,
        )
        .await;
    let slow_id = slow["id"].to_string();
    app.post_empty(&format!("/v1/campaigns/{slow_id}/start"))
        .await;
    let watcher = spawn_watch(&app.base, &app.key, &slow_id, false);
    tokio::time::sleep(Duration::from_millis(500)).await;
    app.post_empty(&format!("/v1/campaigns/{slow_id}/cancel"))
        .await;
    assert_eq!(exit_of(watcher, 30).await.0, 2, "cancelled exits 2");

    // Refusals exit 3.
    assert_eq!(
        exit_of(spawn_watch(&app.base, &app.key, "424242", false), 10)
            .await
            .0,
        3
    );
    assert_eq!(
        exit_of(spawn_watch(&app.base, "hk_wrong", &id, false), 10)
            .await
            .0,
        3
    );
}

#[tokio::test]
async fn campaign_and_contacts_commands_work_and_refuse_bad_input() {
    let app = crate::helpers::spawn_app_with(|c| c.engine = None).await;
    let created = herald_async(
        &app,
        &[
            "campaign",
            "create",
            "--name",
            "From the CLI",
            "--template",
            "Hi {{name}}",
        ],
    )
    .await;
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let campaign: serde_json::Value = serde_json::from_slice(&created.stdout).unwrap();
    let id = campaign["id"].to_string();

    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("contacts.csv");
    std::fs::write(&csv, "phone,name\n+15551234567,Ann\nnope,Bob\n").unwrap();
    let imported = herald_async(&app, &["contacts", "import", &id, csv.to_str().unwrap()]).await;
    let report = String::from_utf8_lossy(&imported.stdout);
    assert!(imported.status.success());
    assert!(
        report.contains("imported 1, duplicates 0, invalid 1"),
        "{report}"
    );
    assert!(report.contains("line 3: phone:"), "{report}");

    let listed = herald_async(&app, &["campaign", "list"]).await;
    assert!(String::from_utf8_lossy(&listed.stdout).contains("From the CLI"));
    let started = herald_async(&app, &["campaign", "start", &id]).await;
    assert!(started.status.success());
    let shown: serde_json::Value =
        serde_json::from_slice(&herald_async(&app, &["campaign", "show", &id]).await.stdout)
            .unwrap();
    assert_eq!(shown["status"], "running");
    let paused = herald_async(&app, &["campaign", "pause", &id]).await;
    assert!(paused.status.success());
    let again = herald_async(&app, &["campaign", "pause", &id]).await;
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("409"),
        "names the conflict"
    );

    for (args, needle) in [
        (vec!["campaign", "show", "999"], "404"),
        (
            vec!["campaign", "create", "--name", "x", "--channel", "fax"],
            "channel",
        ),
        (
            vec!["campaign", "create", "--name", "x", "--provider", "{nope"],
            "--provider",
        ),
        (
            vec!["contacts", "import", id.as_str(), "/no/such/file.csv"],
            "cannot open",
        ),
    ] {
        let out = herald_async(&app, &args).await;
        assert!(!out.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(needle),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let wrong_key = tokio::process::Command::new(HERALD)
        .args(["campaign", "list"])
        .env("HERALD_URL", &app.base)
        .env("HERALD_KEY", "hk_wrong")
        .output()
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&wrong_key.stderr).contains("401"));
}

#[tokio::test]
async fn watch_reconnects_after_the_server_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_database_url(dir.path()).await;
    let key = String::from_utf8(herald(&url, &["keys", "create", "--workspace", "w"]).stdout)
        .unwrap()
        .trim()
        .to_owned();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let start_server = || crate::helpers::start_server_process(&url, port);
    let mut server = start_server();
    wait_healthy(&base).await;
    let client = reqwest::Client::new();
    let campaign: serde_json::Value = client
        .post(format!("{base}/v1/campaigns"))
        .bearer_auth(&key)
        .json(&serde_json::json!({"name": "r", "channel": "sms", "template": "Hi {{name}}", "provider": {"kind": "simulated", "latency_ms": 10}}))
        .send().await.unwrap().json().await.unwrap();
    let id = campaign["id"].to_string();
    let mut csv = String::from("phone,name\n");
    for i in 0..1500 {
        csv.push_str(&format!("+1555{i:07},P{i}\n"));
    }
    client
        .post(format!("{base}/v1/campaigns/{id}/contacts:import"))
        .bearer_auth(&key)
        .header("content-type", "text/csv")
        .body(csv)
        .send()
        .await
        .unwrap();
    client
        .post(format!("{base}/v1/campaigns/{id}/start"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    let watcher = spawn_watch(&base, &key, &id, true);
    tokio::time::sleep(Duration::from_millis(700)).await;
    server.kill().unwrap();
    server.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut server = start_server();
    let (code, stdout) = exit_of(watcher, 90).await;
    server.kill().unwrap();
    server.wait().unwrap();
    assert_eq!(code, 0, "{stdout}");
    let acks = stdout
        .lines()
        .filter(|l| l.contains("connection_ack"))
        .count();
    assert!(acks >= 2, "it reconnected: {acks} connections");
    let seqs: Vec<i64> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|m| m["seq"].as_i64())
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] <= w[1]),
        "resumed after what it saw: {seqs:?}"
    );
}

#[tokio::test]
async fn demo_serves_a_running_campaign_and_says_how_to_watch_it() {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut demo = tokio::process::Command::new(HERALD)
        .args(["demo", "--contacts", "2000"])
        .env("HERALD_DATABASE_URL", fresh_database_url(dir.path()).await)
        .env("HERALD_ADDR", format!("127.0.0.1:{port}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(demo.stdout.take().unwrap()).lines();
    let mut watch_line = None;
    while let Ok(Ok(Some(line))) =
        tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await
    {
        if line.trim_start().starts_with("herald watch ") {
            watch_line = Some(line.trim().to_owned());
            break;
        }
    }
    let watch_line = watch_line.expect("the demo prints how to watch");
    let words: Vec<&str> = watch_line.split_whitespace().collect();
    let (id, key) = (words[2], words[words.len() - 1]);
    let campaign: serde_json::Value = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/v1/campaigns/{id}"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(campaign["contact_count"], 2000);
    assert!(
        ["running", "completed"].contains(&campaign["status"].as_str().unwrap()),
        "{campaign}"
    );
    demo.kill().await.unwrap();
}

/// The benchmarks run end to end at tiny sizes and write their figures.
#[test]
fn benchmarks_run_at_small_sizes_and_write_results() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(HERALD)
        .args(["bench", "all", "--quick"])
        .current_dir(dir.path())
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result = |name: &str| -> serde_json::Value {
        let path = dir.path().join(format!("bench/results/{name}.json"));
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    };
    // One table per scenario and one for all, each figure with its target.
    for name in ["engine", "fanout", "rest", "import", "all"] {
        assert!(
            stdout.contains(&format!("\n{name} — ")),
            "{name} table: {stdout}"
        );
        let report = result(name);
        assert_eq!(report["scenario"], name);
        assert!(report["machine"]["cores"].as_u64().unwrap() > 0);
        let rows = report["rows"].as_array().unwrap();
        assert!(!rows.is_empty(), "{name}");
        for row in rows {
            assert!(row["value"].is_number(), "{row}");
            assert_eq!(row["target"].is_null(), row["met"].is_null(), "{row}");
        }
    }
    assert!(stdout.contains("figure") && stdout.contains("target") && stdout.contains("met"));
    assert_eq!(result("import")["csv_rows"], 500);
    assert!(result("import")["rows_per_second"].as_f64().unwrap() > 0.0);
    let engine = result("engine");
    assert_eq!(engine["recipients"], 2000);
    let latencies: Vec<u64> = engine["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["latency_ms"].as_u64().unwrap())
        .collect();
    assert_eq!(latencies, [0, 50]);
    assert_eq!(
        result("fanout")["final_seen"],
        50,
        "every subscriber saw the end"
    );
    assert_eq!(result("rest")["executions"], 1000);
    // Pages are read from a campaign of their own: the first, one at a
    // depth, and the last, the latter two by offset and by cursor.
    assert_eq!(result("rest")["page_executions"], 3000);
    let phases: Vec<String> = result("rest")["phases"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    for phase in [
        "status_and_analytics",
        "first_page",
        "deep_page_by_offset",
        "deep_page_by_cursor",
        "last_page_by_offset",
        "last_page_by_cursor",
    ] {
        assert!(phases.iter().any(|p| p == phase), "{phase}: {phases:?}");
    }
    // Latencies end where the answer reached the client's socket, which is
    // no later than the client's thread read it.
    let at_read = |figures: &serde_json::Value, arrived: &str, read: &str| {
        let (arrived, read) = (figures[arrived].as_f64(), figures[read].as_f64());
        assert!(arrived.unwrap() > 0.0 && arrived <= read, "{figures}");
    };
    for (_, phase) in result("rest")["phases"].as_object().unwrap() {
        at_read(phase, "p99_ms", "p99_read_ms");
    }
    at_read(&result("fanout"), "p99_ms", "read_p99_ms");
    // What the machine allows the fan-out: one event to every subscriber at
    // the measured CPU a frame. The search for how many Herald holds at the
    // target is off at these sizes.
    let fanout = result("fanout");
    assert!(fanout["sweep_ms"].as_f64().unwrap() > 0.0, "{fanout}");
    assert!(fanout["held_at_target_p99"].is_null(), "{fanout}");
    // Memory per connection: the least while the run went on, and the peak
    // while they all connected.
    for rss in [
        "rss_per_connection_bytes",
        "rss_per_connection_connecting_peak_bytes",
    ] {
        assert!(fanout[rss].as_f64().is_some(), "{rss}: {fanout}");
    }
    // The peers (bench/setup.sh, run by test.sh) are measured in the same run.
    for name in ["fanout", "rest"] {
        assert_eq!(
            result(name)["peer"]["measured"],
            true,
            "{name}: {}",
            result(name)["peer"]
        );
    }
    assert!(stdout.contains("FastAPI peer ÷ Herald") && stdout.contains("Herald ÷ FastAPI peer"));
    let all = result("all");
    assert_eq!(
        all["rows"].as_array().unwrap().len(),
        ["engine", "fanout", "rest", "import"]
            .iter()
            .map(|n| result(n)["rows"].as_array().unwrap().len())
            .sum::<usize>()
    );
    // A bad value is refused, with the flag named.
    for (scenario, flag, value) in [
        ("engine", "--latency-ms", "fast"),
        ("fanout", "--capacity-search", "maybe"),
    ] {
        let refused = Command::new(HERALD)
            .args(["bench", scenario, flag, value])
            .output()
            .unwrap();
        assert!(!refused.status.success(), "{flag} {value}");
        assert!(String::from_utf8_lossy(&refused.stderr).contains(flag));
    }
}

#[tokio::test]
async fn backup_during_a_run_is_consistent_and_migrate_refuses_a_newer_database() {
    // SQLite on every pass: `backup` is `VACUUM INTO`, and the future
    // migration is written into the copy's SQLite file.
    let app = crate::helpers::spawn_sqlite_app_with(|c| {
        if let Some(engine) = c.engine.as_mut() {
            engine.in_flight = 8;
            engine.slice = 32;
        }
    })
    .await;
    let c = app
        .campaign_with_contacts(
            serde_json::json!({"channel": "sms", "template": "Hi {{name}}", "provider": {"kind": "simulated", "latency_ms": 10}}),
            1500,
        )
        .await;
    app.post_empty(&format!("/v1/campaigns/{}/start", c["id"]))
        .await;
    app.wait_campaign(&c["id"], 30, |c| {
        c["progress"]["sent"].as_i64().unwrap_or(0) > 100
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.db");
    let out = herald(&app.database_url, &["backup", copy.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = herald(&app.database_url, &["backup", copy.to_str().unwrap()]);
    assert!(
        !again.status.success(),
        "an existing file is never overwritten"
    );

    // The copy opens, and its counters equal its rows: a consistent snapshot.
    let copy_url = format!("sqlite://{}", copy.display());
    let store = herald::store::connect(&copy_url, &Default::default())
        .await
        .unwrap();
    let run = store
        .latest_run(c["id"].as_i64().unwrap())
        .await
        .unwrap()
        .unwrap();
    let counted = |status| {
        let store = store.clone();
        let id = c["id"].as_i64().unwrap();
        async move { store.count_executions(id, Some(status)).await.unwrap() }
    };
    use herald::domain::ExecutionStatus::*;
    assert_eq!(run.counters.sent, counted(Completed).await);
    assert_eq!(run.counters.pending, counted(Pending).await);
    assert_eq!(run.counters.processing, counted(InProgress).await);
    assert!(
        run.counters.sent > 100 && run.counters.sent < 1500,
        "taken mid-run: {}",
        run.counters.sent
    );

    // A database migrated by a newer Herald is refused with a clear error.
    let sqlite = record_future_migration(&copy_url).await;
    assert!(sqlite.is_ok());
    let refused = herald(&copy_url, &["migrate"]);
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.contains("migration") && message.contains("9999"),
        "{message}"
    );
    let ok = herald(&app.database_url, &["migrate"]);
    assert!(String::from_utf8_lossy(&ok.stdout).contains("up to date"));
}

/// Records a migration this binary does not know, as a newer Herald would.
async fn record_future_migration(url: &str) -> Result<(), String> {
    let output = Command::new("python3")
        .args([
            "-c",
            "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); \
             c.execute(\"INSERT INTO _sqlx_migrations (version, description, installed_on, success, checksum, execution_time) VALUES (9999, 'from the future', CURRENT_TIMESTAMP, 1, x'00', 0)\"); c.commit()",
            url.trim_start_matches("sqlite://"),
        ])
        .output()
        .map_err(|e| e.to_string())?;
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

#[test]
fn configuration_layers_are_file_then_environment_then_flags() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("herald.toml"),
        "addr = \"127.0.0.1:9001\"\nin_flight = 64\nrate-limit = 50\n",
    )
    .unwrap();
    let check = |env: &[(&str, &str)], args: &[&str]| {
        let mut command = Command::new(HERALD);
        command
            .current_dir(dir.path())
            .arg("config")
            .arg("check")
            .args(args);
        for (k, v) in env {
            command.env(k, v);
        }
        let out = command.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let value = |text: &str, key: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{key} ")))
            .map(|l| l.split(" = ").nth(1).unwrap().trim().to_owned())
            .unwrap()
    };
    let from_file = check(&[], &[]);
    assert_eq!(value(&from_file, "addr"), "127.0.0.1:9001");
    assert_eq!(value(&from_file, "in_flight"), "64");
    assert_eq!(value(&from_file, "rate_limit"), "50");
    assert!(value(&from_file, "config").ends_with("herald.toml"));
    let from_env = check(&[("HERALD_IN_FLIGHT", "99")], &[]);
    assert_eq!(
        value(&from_env, "in_flight"),
        "99",
        "environment beats the file"
    );
    let from_flag = check(&[("HERALD_IN_FLIGHT", "99")], &["--in-flight", "7"]);
    assert_eq!(
        value(&from_flag, "in_flight"),
        "7",
        "flags beat the environment"
    );
    let redacted = check(
        &[("HERALD_DATABASE_URL", "postgres://u:hunter2@db/herald")],
        &[],
    );
    assert!(!redacted.contains("hunter2"), "secrets are redacted");
    assert_eq!(
        value(&from_file, "tasks_per_run"),
        "(2 on Postgres, 1 on SQLite)"
    );
    let tasks = check(&[("HERALD_TASKS_PER_RUN", "3")], &[]);
    assert_eq!(value(&tasks, "tasks_per_run"), "3");

    std::fs::write(
        dir.path().join("db.toml"),
        "database_pool_size = 4\ndatabase_statement_timeout_ms = 1500\nno_migrate = true\n",
    )
    .unwrap();
    let database = check(&[], &["--config", "db.toml"]);
    assert_eq!(value(&database, "database_pool_size"), "4");
    assert_eq!(value(&database, "database_statement_timeout_ms"), "1500");
    assert_eq!(value(&database, "no_migrate"), "true");

    std::fs::write(
        dir.path().join("retention.toml"),
        "execution_retention_days = 30\nmetrics_retention_days = 7\n",
    )
    .unwrap();
    let retention = check(
        &[("HERALD_METRICS_RETENTION_DAYS", "14")],
        &["--config", "retention.toml"],
    );
    assert_eq!(value(&retention, "execution_retention_days"), "30");
    assert_eq!(value(&retention, "metrics_retention_days"), "14");

    for (file, needle) in [
        ("adress = 1\n", "unknown key 'adress'"),
        ("in_flight = \"many\"\n", "many"),
        ("addr = \n", "not valid TOML"),
        ("database_pool_size = 0\n", "0 is not in 1..=1000"),
        (
            "database_statement_timeout_ms = 5\n",
            "5 is not in 100..=3600000",
        ),
        ("no_migrate = \"perhaps\"\n", "perhaps"),
        ("drain_seconds = 0\n", "0 is not in 1..=3600"),
        ("tasks_per_run = 0\n", "0 is not in 1..=16"),
        ("tasks_per_run = 17\n", "17 is not in 1..=16"),
        ("execution_retention_days = -1\n", "-1"),
        ("metrics_retention_days = \"forever\"\n", "forever"),
        ("event_retention_count = -5\n", "-5"),
        (
            "event_retention_hours = 9999999\n",
            "9999999 is not in 0..=876000",
        ),
    ] {
        std::fs::write(dir.path().join("bad.toml"), file).unwrap();
        let out = Command::new(HERALD)
            .current_dir(dir.path())
            .args(["--config", "bad.toml", "config", "check"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{file}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(needle),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The README's configuration table and the binary's flags cannot drift.
#[test]
fn the_readme_configuration_table_matches_the_flags() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let help =
        String::from_utf8(Command::new(HERALD).arg("--help").output().unwrap().stdout).unwrap();
    let documented: std::collections::BTreeSet<String> = readme
        .lines()
        .filter(|l| l.starts_with("| `--"))
        .filter_map(|l| l.split('`').nth(3).map(str::to_owned))
        .collect();
    let offered: std::collections::BTreeSet<String> = help
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("HERALD_") && w.len() > "HERALD_".len())
        .map(str::to_owned)
        .collect();
    assert!(!documented.is_empty());
    let undocumented: Vec<_> = offered.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&offered).collect();
    assert!(
        undocumented.is_empty(),
        "flags missing from the README table: {undocumented:?}"
    );
    assert!(
        stale.is_empty(),
        "README rows for flags that do not exist: {stale:?}"
    );
}

/// `--no-migrate` refuses a database that lacks migrations until `herald
/// migrate` applies them; an unknown URL scheme is refused by name.
#[tokio::test]
async fn no_migrate_refuses_an_unmigrated_database_until_herald_migrate() {
    let dir = tempfile::tempdir().unwrap();
    let url = crate::helpers::fresh_database_url(dir.path()).await;
    let refused = herald(
        &url,
        &["--no-migrate", "keys", "create", "--workspace", "w"],
    );
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("herald migrate"), "{stderr}");
    let migrated = herald(&url, &["migrate"]);
    assert!(migrated.status.success(), "{migrated:?}");
    let created = herald(
        &url,
        &["--no-migrate", "keys", "create", "--workspace", "w"],
    );
    assert!(created.status.success(), "{created:?}");
    assert!(String::from_utf8_lossy(&created.stdout).starts_with("hk_"));

    let unknown = herald("mysql://u@h/db", &["keys", "list", "--workspace", "w"]);
    assert!(!unknown.status.success());
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        stderr.contains("expected sqlite://PATH or postgres://"),
        "{stderr}"
    );
}
