//! Herald as separate processes, for the tests that kill, signal, restart
//! or multiply it (`crash.rs`, `postgres.rs`): a [`Node`], a provider that
//! counts what it receives, and the key/campaign/contacts set-up they share.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{free_port, wait_healthy, HERALD};

/// How a node runs.
#[derive(Clone, Copy)]
pub struct NodeOptions {
    /// Work runs (`false`: `--no-engine`, API and streams only).
    pub engine: bool,
    /// Sends in flight; a dead node's claimed slice is 4 × this.
    pub in_flight: u32,
    /// `--drain-seconds`.
    pub drain_seconds: u64,
    /// JSON logs at info level, the engine's at debug (default: warnings,
    /// as text).
    pub json_logs: bool,
}

/// Tasks a node runs on one run by default on the database at
/// `database_url` (`--tasks-per-run`).
fn tasks_per_run(database_url: &str) -> i64 {
    if database_url.starts_with("postgres") {
        2
    } else {
        1
    }
}

impl NodeOptions {
    /// The most sends a node with these options holds at once on the
    /// database at `database_url`, so the most one killed mid-run leaves
    /// as "outcome unknown": each run task holds two slices (the one on
    /// the wire and the one claimed ahead) of 4 × in-flight each.
    pub fn sends_in_hand(&self, database_url: &str) -> i64 {
        tasks_per_run(database_url) * 2 * 4 * i64::from(self.in_flight)
    }
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            engine: true,
            in_flight: 64,
            drain_seconds: 30,
            json_logs: false,
        }
    }
}

/// One `herald` process on `database_url`, with a 2 s lease so takeovers
/// are quick. Killed (SIGKILL) when dropped; its log is kept in `log`.
pub struct Node {
    process: Child,
    pub base: String,
    pub port: u16,
}

impl Node {
    /// Starts a node on a free port and waits until it is healthy.
    pub async fn start(database_url: &str, options: NodeOptions, log: &std::path::Path) -> Self {
        Self::start_on(database_url, free_port(), options, log).await
    }

    /// Starts a node on `port` (a restart reuses its predecessor's).
    pub async fn start_on(
        database_url: &str,
        port: u16,
        options: NodeOptions,
        log: &std::path::Path,
    ) -> Self {
        Self::start_with_env(database_url, port, options, log, &[]).await
    }

    /// Starts a node on `port` with more environment variables (set last,
    /// so they win over the ones `options` sets).
    pub async fn start_with_env(
        database_url: &str,
        port: u16,
        options: NodeOptions,
        log: &std::path::Path,
        env: &[(&str, &str)],
    ) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut command = Command::new(HERALD);
        command
            .env("HERALD_DATABASE_URL", database_url)
            .env("HERALD_ADDR", format!("127.0.0.1:{port}"))
            .env("HERALD_NO_DEMO", "1")
            .env("HERALD_IN_FLIGHT", options.in_flight.to_string())
            .env("HERALD_LEASE_SECONDS", "2")
            .env("HERALD_RATE_LIMIT", "0")
            .env("HERALD_DATABASE_POOL_SIZE", "8")
            .env("HERALD_DRAIN_SECONDS", options.drain_seconds.to_string())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log);
        if !options.engine {
            command.env("HERALD_NO_ENGINE", "1");
        }
        if options.json_logs {
            command
                .env("HERALD_LOG_FORMAT", "json")
                .env("RUST_LOG", "info,herald::engine=debug");
        }
        command.envs(env.iter().copied());
        let node = Self {
            process: command.spawn().expect("herald starts"),
            base: format!("http://127.0.0.1:{port}"),
            port,
        };
        wait_healthy(&node.base).await;
        node
    }

    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }

    /// Sends SIGTERM: the node drains and exits.
    pub fn terminate(&self) {
        let term = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(term.success());
    }

    /// Waits up to `within` for the process to exit; its status.
    pub async fn exited(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.process.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the node exits within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn campaign(&self, key: &str, id: i64) -> Value {
        reqwest::Client::new()
            .get(format!("{}/v1/campaigns/{id}", self.base))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Polls the campaign until `done` holds; panics after `secs`.
    pub async fn wait_for(
        &self,
        key: &str,
        id: i64,
        secs: u64,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let view = self.campaign(key, id).await;
            if done(&view) {
                return view;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out; last: {view}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn start_campaign(&self, key: &str, id: i64) {
        let started = reqwest::Client::new()
            .post(format!("{}/v1/campaigns/{id}/start", self.base))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        assert_eq!(started.status(), StatusCode::OK);
    }

    /// Every execution of the campaign, read through seed 001.
    pub async fn executions(&self, key: &str, id: i64) -> Vec<Value> {
        let mut all = Vec::new();
        for page in 1.. {
            let body: Value = reqwest::Client::new()
                .get(format!(
                    "{}/api/v1/campaigns/{id}/executions?per_page=1000&page={page}",
                    self.base
                ))
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            all.extend(body["executions"].as_array().unwrap().iter().cloned());
            if body["pagination"]["has_next"] != true {
                break;
            }
        }
        all
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A provider endpoint in this process that counts sends per recipient.
#[derive(Clone, Default)]
pub struct CountingProvider {
    sends: Arc<Mutex<HashMap<String, u32>>>,
    /// How long each send takes to answer, in milliseconds.
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
}

impl CountingProvider {
    /// Serves it on a free port; each send answers after `delay`. Returns
    /// the webhook provider settings that point at it.
    pub async fn serve(delay: Duration) -> (Self, Value) {
        let provider = Self::default();
        provider.set_delay(delay);
        let counts = provider.clone();
        let app = axum::Router::new().route(
            "/send",
            axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
                let counts = counts.clone();
                async move {
                    counts.count(body["to"].as_str().unwrap_or_default());
                    tokio::time::sleep(counts.delay()).await;
                    axum::Json(json!({"id": body["id"], "status": "sent"}))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/send", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let settings = json!({"kind": "webhook", "url": url, "secret": "counting-provider-secret"});
        (provider, settings)
    }

    /// Makes every later send answer after `delay`.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms.store(
            delay.as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Counts one send to `to`.
    pub fn count(&self, to: &str) {
        *self.sends.lock().unwrap().entry(to.to_owned()).or_default() += 1;
    }

    /// How long a send takes to answer now.
    pub fn delay(&self) -> Duration {
        Duration::from_millis(self.delay_ms.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Sends per recipient so far.
    pub fn counts(&self) -> HashMap<String, u32> {
        self.sends.lock().unwrap().clone()
    }

    pub fn total(&self) -> u32 {
        self.sends.lock().unwrap().values().sum()
    }

    pub fn most_to_one_recipient(&self) -> u32 {
        self.sends
            .lock()
            .unwrap()
            .values()
            .copied()
            .max()
            .unwrap_or(0)
    }
}

/// A key of a new workspace, made with `herald keys create` on the database.
pub fn create_key(database_url: &str, workspace: &str) -> String {
    let out = Command::new(HERALD)
        .args(["keys", "create", "--workspace", workspace])
        .env("HERALD_DATABASE_URL", database_url)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// An SMS campaign sending through `provider` to `recipients` contacts
/// (+1555…, named P0, P1, …), created and imported through `node`.
pub async fn create_campaign(node: &Node, key: &str, provider: Value, recipients: usize) -> i64 {
    let client = reqwest::Client::new();
    let created: Value = client
        .post(format!("{}/v1/campaigns", node.base))
        .bearer_auth(key)
        .json(
            &json!({"name": "process test", "channel": "sms", "template": "Hi {{name}}",
                      "provider": provider}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["id"].as_i64().expect("campaign created");
    let mut csv = String::from("phone,name\n");
    for i in 0..recipients {
        csv.push_str(&format!("+1555{i:07},P{i}\n"));
    }
    let imported = client
        .post(format!("{}/v1/campaigns/{id}/contacts:import", node.base))
        .bearer_auth(key)
        .header("content-type", "text/csv")
        .body(csv)
        .send()
        .await
        .unwrap();
    assert_eq!(imported.status(), StatusCode::OK);
    id
}

/// `VmRSS` of a process, in bytes.
pub fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}
