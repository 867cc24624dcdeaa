//! `spawn_app()` and typed helpers shared by the integration tests.

use std::sync::Arc;

use herald::api::ApiConfig;
use herald::startup::{Application, ServerConfig};
use herald::store::Store;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::sync::oneshot;

pub struct TestApp {
    pub base: String,
    /// A key of workspace "alpha".
    pub key: String,
    pub client: reqwest::Client,
    pub store: Arc<dyn Store>,
    pub database_url: String,
    _dir: TempDir,
    shutdown: Option<oneshot::Sender<()>>,
}

/// Engine settings that keep tests quick: short retries, leases and polls.
pub fn test_engine() -> herald::engine::EngineConfig {
    herald::engine::EngineConfig {
        retry_base: std::time::Duration::from_millis(20),
        retry_cap: std::time::Duration::from_millis(200),
        lease: std::time::Duration::from_secs(3),
        poll: std::time::Duration::from_millis(50),
        ..Default::default()
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Whether this run puts the integration tests on Postgres
/// (`HERALD_TEST_BACKEND=postgres`, as `./test.sh` does in its second pass).
pub fn backend_is_postgres() -> bool {
    std::env::var("HERALD_TEST_BACKEND").is_ok_and(|b| b == "postgres")
}

/// A SQLite database in `dir`, whatever the backend of this run: for tests of
/// SQLite-only features.
pub fn sqlite_database_url(dir: &std::path::Path) -> String {
    format!("sqlite://{}", dir.join("herald.db").display())
}

/// A new, empty database for one test on this run's backend: a SQLite file
/// in `dir`, or a fresh database on the `HERALD_TEST_POSTGRES_URL` server.
pub async fn fresh_database_url(dir: &std::path::Path) -> String {
    if !backend_is_postgres() {
        return sqlite_database_url(dir);
    }
    postgres_database_url().await
}

/// A new, empty database on the `HERALD_TEST_POSTGRES_URL` server, whatever
/// the backend of this run: for the multi-node tests.
pub async fn postgres_database_url() -> String {
    use sqlx::{Connection, Executor};
    let server = std::env::var("HERALD_TEST_POSTGRES_URL")
        .expect("Postgres tests need HERALD_TEST_POSTGRES_URL (a server to create databases on); run ./test.sh");
    let now = chrono::Utc::now().timestamp();
    let name = format!("herald_test_{now}_{}", uuid::Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect(&server)
        .await
        .unwrap_or_else(|e| panic!("connecting to HERALD_TEST_POSTGRES_URL={server}: {e}"));
    sweep_old_test_databases(&mut admin, now).await;
    admin
        .execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
    let _ = admin.close().await;
    with_database_name(&server, &name)
}

/// Drops, once per test process, the databases that earlier runs created
/// over an hour ago: a test cannot drop its own (its server still holds
/// connections when it ends), and a reused server would fill up.
async fn sweep_old_test_databases(admin: &mut sqlx::PgConnection, now: i64) {
    use sqlx::{Executor, Row};
    static SWEPT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if SWEPT.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    let names =
        sqlx::query("SELECT datname FROM pg_database WHERE datname LIKE 'herald\\_test\\_%'")
            .fetch_all(&mut *admin)
            .await
            .unwrap_or_default();
    for row in names {
        let name: String = row.get(0);
        let created = name
            .trim_start_matches("herald_test_")
            .split('_')
            .next()
            .and_then(|t| t.parse::<i64>().ok());
        // Names without a time are from before names had one.
        if created.is_none_or(|t| now - t > 3600) {
            let _ = admin
                .execute(format!("DROP DATABASE IF EXISTS {name}").as_str())
                .await;
        }
    }
}

/// `url` with its database (the path) replaced by `name`; the query stays.
fn with_database_name(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority = base.find("://").map_or(0, |i| i + 3);
    let server = match base[authority..].find('/') {
        Some(slash) => &base[..authority + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{server}/{name}?{query}"),
        None => format!("{server}/{name}"),
    }
}

pub async fn spawn_app_with(configure: impl FnOnce(&mut ServerConfig)) -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    let database_url = fresh_database_url(dir.path()).await;
    spawn_app_on(dir, database_url, configure).await
}

/// `spawn_app_with` on SQLite whatever the backend of this run, for tests of
/// SQLite-only features (`herald backup`).
pub async fn spawn_sqlite_app_with(configure: impl FnOnce(&mut ServerConfig)) -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    let database_url = sqlite_database_url(dir.path());
    spawn_app_on(dir, database_url, configure).await
}

/// `spawn_app_with` on a fresh Postgres database whatever the backend of
/// this run, for Postgres-only behaviour.
pub async fn spawn_postgres_app_with(configure: impl FnOnce(&mut ServerConfig)) -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    let database_url = postgres_database_url().await;
    spawn_app_on(dir, database_url, configure).await
}

async fn spawn_app_on(
    dir: TempDir,
    database_url: String,
    configure: impl FnOnce(&mut ServerConfig),
) -> TestApp {
    let mut config = ServerConfig {
        addr: "127.0.0.1:0".into(),
        database_url: database_url.clone(),
        store: herald::store::StoreOptions::default(),
        api: ApiConfig::default(),
        retention: Default::default(),
        demo: false,
        engine: Some(test_engine()),
        public_url: None,
    };
    configure(&mut config);
    let app = Application::build(config).await.expect("app builds");
    let base = format!("http://{}", app.local_addr());
    let store = app.store();
    let (shutdown, stopped) = oneshot::channel::<()>();
    tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    let mut test_app = TestApp {
        base,
        key: String::new(),
        client: reqwest::Client::new(),
        store,
        database_url,
        _dir: dir,
        shutdown: Some(shutdown),
    };
    test_app.key = test_app.new_key("alpha").await;
    test_app
}

impl TestApp {
    /// Sends the server its shutdown signal (as SIGTERM would).
    pub fn stop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }

    /// Creates a key (and the workspace, if new) straight in the store.
    pub async fn new_key(&self, workspace: &str) -> String {
        let ws = self.store.ensure_workspace(workspace).await.unwrap();
        herald::api::keys::issue_key(self.store.as_ref(), ws.id, None, &[])
            .await
            .unwrap()
            .1
    }

    /// Like [`Self::new_key`], with scopes.
    pub async fn new_key_with(&self, workspace: &str, scopes: &[herald::domain::Scope]) -> String {
        let ws = self.store.ensure_workspace(workspace).await.unwrap();
        herald::api::keys::issue_key(self.store.as_ref(), ws.id, None, scopes)
            .await
            .unwrap()
            .1
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.request_as(&self.key, method, path)
    }

    pub fn request_as(&self, key: &str, method: Method, path: &str) -> RequestBuilder {
        self.client.request(method, self.url(path)).bearer_auth(key)
    }

    pub async fn get(&self, path: &str) -> Response {
        self.request(Method::GET, path).send().await.unwrap()
    }

    pub async fn post(&self, path: &str, body: &Value) -> Response {
        self.post_as(&self.key, path, body).await
    }

    pub async fn post_as(&self, key: &str, path: &str, body: &Value) -> Response {
        self.request_as(key, Method::POST, path)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn post_empty(&self, path: &str) -> Response {
        self.request(Method::POST, path).send().await.unwrap()
    }

    pub async fn create_campaign(&self, body: Value) -> Value {
        let response = self.post("/v1/campaigns", &body).await;
        assert_eq!(response.status(), StatusCode::CREATED, "creating {body}");
        response.json().await.unwrap()
    }

    /// A draft SMS campaign whose template uses `{{name}}` and `{{day}}`.
    pub async fn sms_campaign(&self) -> Value {
        self.create_campaign(json!({
            "name": "Reminders",
            "channel": "sms",
            "template": "Hi {{name}}, see you {{day}}",
            "sender": "ACME",
        }))
        .await
    }

    pub async fn import_csv(&self, campaign: &Value, csv: impl Into<reqwest::Body>) -> Response {
        self.request(
            Method::POST,
            &format!("/v1/campaigns/{}/contacts:import", campaign["id"]),
        )
        .header("content-type", "text/csv")
        .body(csv)
        .send()
        .await
        .unwrap()
    }
}

/// Reads an error response and checks its shape.
pub async fn error_of(response: Response, status: StatusCode) -> Value {
    assert_eq!(response.status(), status);
    let body: Value = response.json().await.unwrap();
    let error = &body["error"];
    assert!(error["code"].is_string(), "error has a code: {body}");
    assert!(error["message"].is_string(), "error has a message: {body}");
    assert!(error.get("field").is_some(), "error has a field: {body}");
    error.clone()
}

impl TestApp {
    /// A campaign with `n` contacts `+1555xxxxxxx` named `P{i}`.
    pub async fn campaign_with_contacts(&self, mut body: Value, n: usize) -> Value {
        if body.get("name").is_none() {
            body["name"] = json!("Engine test");
        }
        let campaign = self.create_campaign(body).await;
        let mut csv = String::from("phone,name\n");
        for i in 0..n {
            csv.push_str(&format!("+1555{i:07},P{i}\n"));
        }
        let report: Value = self.import_csv(&campaign, csv).await.json().await.unwrap();
        assert_eq!(report["imported"], n as u64, "{report}");
        campaign
    }

    pub async fn campaign(&self, id: &Value) -> Value {
        self.get(&format!("/v1/campaigns/{id}"))
            .await
            .json()
            .await
            .unwrap()
    }

    /// Polls the campaign until `done` holds, for at most `secs` seconds.
    pub async fn wait_campaign(
        &self,
        id: &Value,
        secs: u64,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            let campaign = self.campaign(id).await;
            if done(&campaign) {
                return campaign;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting; last: {campaign}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_status(&self, id: &Value, status: &str, secs: u64) -> Value {
        self.wait_campaign(id, secs, |c| c["status"] == status)
            .await
    }

    /// Every execution of a campaign, read page by page through seed 001.
    /// `GET /v1/campaigns/{id}/runs`: the campaign's runs, newest first.
    pub async fn runs(&self, id: &Value) -> Value {
        self.get(&format!("/v1/campaigns/{id}/runs"))
            .await
            .json()
            .await
            .unwrap()
    }

    pub async fn all_executions(&self, id: &Value) -> Vec<Value> {
        self.executions_in_pages(id, 1000).await
    }

    /// Every execution of a campaign, read page by page (seed 001, newest
    /// first) until a page says there is no next.
    pub async fn executions_in_pages(&self, id: &Value, per_page: u32) -> Vec<Value> {
        let mut all = Vec::new();
        let mut page = 1;
        loop {
            let body: Value = self
                .get(&format!(
                    "/api/v1/campaigns/{id}/executions?per_page={per_page}&page={page}"
                ))
                .await
                .json()
                .await
                .unwrap();
            all.extend(body["executions"].as_array().unwrap().iter().cloned());
            if body["pagination"]["has_next"] != true {
                return all;
            }
            page += 1;
        }
    }

    pub async fn briq(&self, path: &str) -> Value {
        let response = self
            .client
            .get(self.url(path))
            .header("X-API-Key", &self.key)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["success"], true);
        body["data"].clone()
    }
}

/// Counts executions by status.
pub fn count_by_status(executions: &[Value]) -> std::collections::BTreeMap<String, i64> {
    let mut counts = std::collections::BTreeMap::new();
    for e in executions {
        *counts
            .entry(e["status"].as_str().unwrap().to_owned())
            .or_insert(0) += 1;
    }
    counts
}

/// How many different recipients (phones) the executions reach.
pub fn distinct_phones(executions: &[Value]) -> usize {
    let mut phones: Vec<&str> = executions
        .iter()
        .map(|e| e["contact_phone"].as_str().unwrap())
        .collect();
    phones.sort_unstable();
    phones.dedup();
    phones.len()
}

/// The `herald` binary Cargo built for these tests.
pub const HERALD: &str = env!("CARGO_BIN_EXE_herald");

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `herald` serving `database_url` on `port` as a separate process
/// (small in-flight and a 2 s lease, so takeovers are quick), for tests
/// that kill, signal or restart it.
pub fn start_server_process(database_url: &str, port: u16) -> std::process::Child {
    std::process::Command::new(HERALD)
        .env("HERALD_DATABASE_URL", database_url)
        .env("HERALD_ADDR", format!("127.0.0.1:{port}"))
        .env("HERALD_NO_DEMO", "1")
        .env("HERALD_IN_FLIGHT", "8")
        .env("HERALD_LEASE_SECONDS", "2")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("herald starts")
}

/// Waits until `base` answers `/healthz`.
pub async fn wait_healthy(base: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if let Ok(r) = reqwest::get(format!("{base}/healthz")).await {
            if r.status() == StatusCode::OK {
                return;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("server did not become healthy");
}

#[test]
fn with_database_name_replaces_only_the_path() {
    assert_eq!(
        with_database_name("postgres://herald@127.0.0.1:5432/postgres", "t1"),
        "postgres://herald@127.0.0.1:5432/t1"
    );
    assert_eq!(
        with_database_name("postgres://u:p@db:5432/postgres?sslmode=disable", "t2"),
        "postgres://u:p@db:5432/t2?sslmode=disable"
    );
    assert_eq!(
        with_database_name("postgres://herald@127.0.0.1:5432", "t3"),
        "postgres://herald@127.0.0.1:5432/t3"
    );
}
