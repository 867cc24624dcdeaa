//! Crash safety: SIGKILL the process that runs a campaign, start it again,
//! and check that no recipient was sent twice and every counter equals its
//! rows. The provider is a fake HTTP server in this test process that
//! counts what it receives.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;

use crate::helpers::{count_by_status, fresh_database_url};
use crate::process::{create_campaign, create_key, CountingProvider, Node, NodeOptions};

/// Small in-flight: a slice is 4 × 8 = 32 sends, and a dead node holds at
/// most two: the one on the wire and the one claimed ahead of it.
const OPTIONS: NodeOptions = NodeOptions {
    engine: true,
    in_flight: 8,
    drain_seconds: 30,
    json_logs: false,
};

#[tokio::test]
async fn a_killed_worker_never_sends_twice_and_its_run_completes() {
    let dir = tempfile::tempdir().unwrap();
    let database_url = fresh_database_url(dir.path()).await;
    let log = dir.path().join("herald.log");
    let key = create_key(&database_url, "crash");
    let (provider, settings) = CountingProvider::serve(Duration::from_millis(15)).await;
    let mut herald = Node::start(&database_url, OPTIONS, &log).await;
    let id = create_campaign(&herald, &key, settings, 1500).await;
    herald.start_campaign(&key, id).await;
    herald
        .wait_for(&key, id, 30, |c| {
            c["progress"]["sent"].as_i64().unwrap() > 300
        })
        .await;
    herald.kill(); // SIGKILL: no shutdown path runs.
    assert!(provider.total() < 1500, "the crash came mid-run");

    let herald = Node::start_on(&database_url, herald.port, OPTIONS, &log).await;
    let done = herald
        .wait_for(&key, id, 60, |c| c["status"] == "completed")
        .await;
    let counts = provider.counts();
    let duplicates: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        duplicates.is_empty(),
        "recipients sent twice: {duplicates:?}"
    );

    // Counters equal rows: read every execution back.
    let executions = herald.executions(&key, id).await;
    assert_eq!(executions.len(), 1500);
    let by_status = count_by_status(&executions);
    let p = &done["progress"];
    assert_eq!(by_status["completed"], p["sent"].as_i64().unwrap());
    assert_eq!(
        by_status.get("failed").copied().unwrap_or(0),
        p["failed"].as_i64().unwrap()
    );
    assert_eq!(
        p["sent"].as_i64().unwrap() + p["failed"].as_i64().unwrap(),
        1500
    );
    assert_eq!(
        p["sent"].as_i64().unwrap(),
        counts.len() as i64 - lost_but_sent(&executions, &counts)
    );
    // What the dead worker had in flight is written off, never resent.
    let unknown = executions
        .iter()
        .filter(|e| {
            e["execution_data"]["error_details"]
                .as_str()
                .is_some_and(|s| s.starts_with("outcome unknown"))
        })
        .count();
    assert_eq!(unknown as i64, p["failed"].as_i64().unwrap());
    let in_hand = OPTIONS.sends_in_hand(&database_url);
    assert!(
        unknown as i64 <= in_hand,
        "at most two slices a task are lost: {unknown} (of {in_hand})"
    );
}

/// Recipients the provider saw whose execution was written off because the
/// worker died before recording the answer.
fn lost_but_sent(executions: &[Value], counts: &HashMap<String, u32>) -> i64 {
    executions
        .iter()
        .filter(|e| {
            e["status"] == "failed" && counts.contains_key(e["contact_phone"].as_str().unwrap())
        })
        .count() as i64
}

/// SIGTERM mid-run: subscribers are told 1001, the process exits 0, the run
/// is released, and a restart finishes it with no recipient sent twice.
#[tokio::test]
async fn sigterm_drains_and_a_restart_finishes_the_run() {
    use futures::StreamExt;
    let dir = tempfile::tempdir().unwrap();
    let database_url = fresh_database_url(dir.path()).await;
    let log = dir.path().join("herald.log");
    let key = create_key(&database_url, "drain");
    let (provider, settings) = CountingProvider::serve(Duration::from_millis(15)).await;
    let mut herald = Node::start(&database_url, OPTIONS, &log).await;
    let id = create_campaign(&herald, &key, settings, 1200).await;
    let (mut socket, _) = tokio_tungstenite::connect_async(format!(
        "ws://127.0.0.1:{}/ws/campaigns/{id}/progress?token={key}",
        herald.port
    ))
    .await
    .unwrap();
    herald.start_campaign(&key, id).await;
    herald
        .wait_for(&key, id, 30, |c| {
            c["progress"]["sent"].as_i64().unwrap() > 200
        })
        .await;

    herald.terminate();
    let mut close_code = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Ok(Some(frame)) = tokio::time::timeout_at(deadline, socket.next()).await {
        if let Ok(tokio_tungstenite::tungstenite::Message::Close(Some(frame))) = frame {
            close_code = Some(u16::from(frame.code));
            break;
        }
    }
    assert_eq!(
        close_code,
        Some(1001),
        "subscribers are told the server is going away"
    );
    let status = herald.exited(Duration::from_secs(15)).await;
    assert!(status.success(), "a drained node exits 0: {status}");
    assert!(provider.total() < 1200, "stopped mid-run");

    let herald = Node::start_on(&database_url, herald.port, OPTIONS, &log).await;
    let done = herald
        .wait_for(&key, id, 60, |c| c["status"] == "completed")
        .await;
    let counts = provider.counts();
    assert!(counts.values().all(|n| *n == 1), "no recipient sent twice");
    assert_eq!(
        counts.len(),
        1200,
        "a drain loses nothing: every recipient was sent once"
    );
    assert_eq!(done["progress"]["sent"], 1200);
}

/// A provider that stops answering cannot hold a draining node: past
/// `--drain-seconds` it exits 0 anyway, and the next start finishes the run
/// without sending anyone twice (the unanswered sends are written off).
#[tokio::test]
async fn a_hung_provider_cannot_hold_the_drain_past_its_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let database_url = fresh_database_url(dir.path()).await;
    let log = dir.path().join("herald.log");
    let key = create_key(&database_url, "grace");
    let (provider, settings) = CountingProvider::serve(Duration::from_millis(15)).await;
    let options = NodeOptions {
        drain_seconds: 2,
        ..OPTIONS
    };
    let mut herald = Node::start(&database_url, options, &log).await;
    let id = create_campaign(&herald, &key, settings, 600).await;
    herald.start_campaign(&key, id).await;
    herald
        .wait_for(&key, id, 30, |c| {
            c["progress"]["sent"].as_i64().unwrap() > 100
        })
        .await;
    provider.set_delay(Duration::from_secs(600));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let asked = std::time::Instant::now();
    herald.terminate();
    let status = herald.exited(Duration::from_secs(15)).await;
    assert!(status.success(), "exits 0 after the grace period: {status}");
    assert!(
        asked.elapsed() >= Duration::from_secs(2),
        "it waited for the sends in flight first"
    );

    provider.set_delay(Duration::from_millis(1));
    let herald = Node::start_on(&database_url, herald.port, options, &log).await;
    let done = herald
        .wait_for(&key, id, 60, |c| c["status"] == "completed")
        .await;
    assert_eq!(provider.most_to_one_recipient(), 1, "no one sent twice");
    let p = &done["progress"];
    let (sent, failed) = (p["sent"].as_i64().unwrap(), p["failed"].as_i64().unwrap());
    assert_eq!(sent + failed, 600);
    assert!(
        (1..=64).contains(&failed),
        "the hung slice and the one claimed ahead are written off: {failed}"
    );
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: std::path::PathBuf, size: &str) -> Self {
        std::fs::create_dir_all(&at).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&at)
            .status()
            .expect("mount runs");
        assert!(
            status.success(),
            "mounting a tmpfs needs root (CI and ./test.sh run as root)"
        );
        Self(at)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A full disk under SQLite: writes fail with a clear 503 and roll back
/// whole (a 50,000-row import leaves no contact behind), reads keep
/// working, and once space is freed the same import succeeds, without a
/// restart.
#[tokio::test]
async fn a_full_disk_is_a_503_that_writes_nothing_and_passes_once_space_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Tmpfs::mount(dir.path().join("disk"), "8m");
    let database_url = format!("sqlite://{}/herald.db", disk.0.display());
    let key = create_key(&database_url, "disk");
    let options = NodeOptions {
        engine: false,
        ..OPTIONS
    };
    let node = Node::start(&database_url, options, &dir.path().join("herald.log")).await;
    let client = reqwest::Client::new();
    let id = create_campaign(&node, &key, serde_json::json!({"kind": "simulated"}), 0).await;

    // Fill the disk to the last byte.
    let filler = disk.0.join("filler");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        while file.write_all(&block).is_ok() {}
        let _ = file.write_all(&[0u8; 512]);
        let _ = file.sync_all();
    }
    let mut csv = String::from("phone,name\n");
    for i in 0..50_000 {
        csv.push_str(&format!("+1555{i:07},Person {i}\n"));
    }
    let import = |csv: String| {
        client
            .post(format!("{}/v1/campaigns/{id}/contacts:import", node.base))
            .bearer_auth(&key)
            .header("content-type", "text/csv")
            .body(csv)
            .send()
    };
    let full = import(csv.clone()).await.unwrap();
    assert_eq!(full.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = full.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("disk is full"),
        "{body}"
    );
    let campaign = node.campaign(&key, id).await;
    assert_eq!(
        campaign["contact_count"], 0,
        "nothing half-written: {campaign}"
    );

    std::fs::remove_file(&filler).unwrap();
    let freed = import(csv).await.unwrap();
    let status = freed.status();
    let report: Value = freed.json().await.unwrap();
    assert_eq!(status, reqwest::StatusCode::OK, "{report}");
    assert_eq!(report["imported"], 50_000, "{report}");
    assert_eq!(node.campaign(&key, id).await["contact_count"], 50_000);
}

/// Another process holding SQLite's write lock (a backup tool, an operator
/// in the `sqlite3` shell): reads carry on, a write waits out the busy
/// timeout (10 s) and is then a 503 that changed nothing, and the same write
/// passes once the lock is gone.
#[tokio::test]
async fn a_write_lock_held_elsewhere_is_a_503_for_writes_and_reads_carry_on() {
    use sqlx::Connection as _;
    let app = crate::helpers::spawn_sqlite_app_with(|_| {}).await;
    let c = app.sms_campaign().await;
    let path = format!("/v1/campaigns/{}", c["id"]);

    let mut other = sqlx::SqliteConnection::connect(&app.database_url)
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut other)
        .await
        .unwrap();

    let started = std::time::Instant::now();
    let write = app
        .client
        .patch(app.url(&path))
        .bearer_auth(&app.key)
        .json(&serde_json::json!({"name": "renamed while locked"}))
        .send();
    let read = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let at = started.elapsed();
        let read = app.get(&path).await;
        (read.status(), started.elapsed() - at)
    };
    let (write, (read_status, read_took)) = tokio::join!(write, read);
    assert_eq!(read_status, reqwest::StatusCode::OK);
    assert!(
        read_took < Duration::from_secs(1),
        "reads do not wait for the lock: {read_took:?}"
    );
    let write = write.unwrap();
    assert_eq!(write.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = write.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "the write waited for the lock first"
    );
    assert_eq!(
        app.campaign(&c["id"]).await["name"],
        c["name"],
        "nothing changed"
    );

    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    let again = app
        .client
        .patch(app.url(&path))
        .bearer_auth(&app.key)
        .json(&serde_json::json!({"name": "renamed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), reqwest::StatusCode::OK);
    assert_eq!(app.campaign(&c["id"]).await["name"], "renamed");
}

/// The WAL is copied into the database file within moments of a write, not
/// only once it holds 1,000 pages: the database file alone (what a
/// file-level copy that misses the `-wal` file would keep) has a new
/// campaign soon after it is created. `immutable` makes SQLite read the file
/// as it is, without the WAL.
#[tokio::test]
async fn writes_reach_the_database_file_itself_within_moments() {
    use sqlx::Connection as _;
    use std::str::FromStr as _;
    let app = crate::helpers::spawn_sqlite_app_with(|_| {}).await;
    let c = app.sms_campaign().await;
    let file_only = sqlx::sqlite::SqliteConnectOptions::from_str(&app.database_url)
        .unwrap()
        .read_only(true)
        .immutable(true);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        // The file may be mid-checkpoint under this reader: a failed read
        // is only "not yet".
        let found = match sqlx::SqliteConnection::connect_with(&file_only).await {
            Ok(mut conn) => {
                sqlx::query_scalar::<_, String>("SELECT uuid FROM campaigns WHERE id = ?")
                    .bind(c["id"].as_i64().unwrap())
                    .fetch_optional(&mut conn)
                    .await
                    .ok()
                    .flatten()
            }
            Err(_) => None,
        };
        if let Some(uuid) = found {
            assert_eq!(uuid, c["uuid"].as_str().unwrap());
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "campaign {} still only in the WAL after 10 s",
            c["id"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One statement on the test's database, beside the server: damage or
/// mend rows as only someone with SQL could. How many rows it changed.
async fn execute_sql(database_url: &str, sql: &str) -> u64 {
    use sqlx::Connection as _;
    if database_url.starts_with("postgres") {
        let mut c = sqlx::PgConnection::connect(database_url).await.unwrap();
        sqlx::query(sql)
            .execute(&mut c)
            .await
            .unwrap()
            .rows_affected()
    } else {
        let mut c = sqlx::SqliteConnection::connect(database_url).await.unwrap();
        sqlx::query(sql)
            .execute(&mut c)
            .await
            .unwrap()
            .rows_affected()
    }
}

/// The node's counter `name`, summed over its labels.
async fn counter(node: &Node, name: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", node.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    crate::metrics::sum(&crate::metrics::parse(&text), name, &[])
}

/// A run whose task fails at once every time (rows it cannot read) is held
/// back between tries, 1 s and then twice as long each time, instead of
/// being claimed straight back hundreds of times a second; once the rows
/// are mended it finishes, with every recipient accounted for and none
/// sent twice.
#[tokio::test]
async fn a_run_whose_task_keeps_failing_is_retried_after_growing_waits_and_then_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let database_url = fresh_database_url(dir.path()).await;
    let log = dir.path().join("herald.log");
    let key = create_key(&database_url, "failing");
    let (provider, settings) = CountingProvider::serve(Duration::from_millis(15)).await;
    let herald = Node::start(&database_url, OPTIONS, &log).await;
    let id = create_campaign(&herald, &key, settings, 1000).await;
    herald.start_campaign(&key, id).await;
    herald
        .wait_for(&key, id, 30, |c| {
            c["progress"]["sent"].as_i64().unwrap() > 50
        })
        .await;
    let damaged = execute_sql(
        &database_url,
        "UPDATE executions SET variables = 'not json' WHERE status = 'pending'",
    )
    .await;
    assert!(damaged > 500, "the damage came mid-run ({damaged} rows)");

    // The next slice cannot be read: the task fails, and so does every try.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while counter(&herald, "herald_run_task_failures_total").await < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the task never failed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let claims_before = counter(&herald, "herald_runs_claimed_total").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let claims = counter(&herald, "herald_runs_claimed_total").await - claims_before;
    let failures = counter(&herald, "herald_run_task_failures_total").await;
    // Tries after 1 s and 3 s (and 7 s); claimed straight back, there were
    // hundreds in these four seconds.
    assert!((1.0..=3.0).contains(&claims), "{claims} claims in 4 s");
    assert!(failures >= 2.0, "{failures} failures");
    let stuck = herald.campaign(&key, id).await;
    assert_eq!(stuck["status"], "running", "{stuck}");

    let mended = execute_sql(
        &database_url,
        "UPDATE executions SET variables = '{}' WHERE variables = 'not json'",
    )
    .await;
    assert_eq!(mended, damaged);
    let done = herald
        .wait_for(&key, id, 60, |c| c["status"] == "completed")
        .await;
    let counts = provider.counts();
    assert_eq!(
        provider.most_to_one_recipient(),
        1,
        "a recipient was sent twice"
    );
    let executions = herald.executions(&key, id).await;
    let p = &done["progress"];
    let (sent, failed) = (p["sent"].as_i64().unwrap(), p["failed"].as_i64().unwrap());
    assert_eq!(sent + failed, 1000, "{done}");
    assert_eq!(count_by_status(&executions)["completed"], sent);
    // The slice a failing task had sent but not recorded is written off
    // as "outcome unknown", never sent again; nothing else failed.
    assert_eq!(
        sent,
        counts.len() as i64 - lost_but_sent(&executions, &counts)
    );
    assert!(failed <= 64, "at most two slices are lost: {failed}");
}
