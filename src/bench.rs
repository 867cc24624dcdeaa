//! Benchmarks that print figures. Speed targets live here, never in timed
//! tests. Each starts what it needs in-process, on a temporary database and
//! loopback only, and stops by itself.

use std::time::Instant;

use clap::Subcommand;
use futures::StreamExt;
use serde_json::json;

use crate::api::ApiConfig;
use crate::startup::{Application, ServerConfig};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Stream a generated CSV through the HTTP import and print rows/s and peak RSS.
    Import {
        /// Rows in the generated CSV.
        #[arg(long, default_value_t = 1_000_000)]
        rows: u64,
    },
    /// Run one SMS campaign on the simulated provider and print recipients/s
    /// from start to the run's final counters, and peak RSS.
    Engine {
        /// Recipients in the campaign.
        #[arg(long, default_value_t = 1_000_000)]
        recipients: u64,
        /// Simulated provider latency per send, in milliseconds.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Sends in flight at once.
        #[arg(long, default_value_t = 1000)]
        in_flight: usize,
        /// Delay of the simulated delivery receipts, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        receipt_delay_ms: u64,
        /// Run on Postgres: a server URL (postgres://USER@HOST:PORT/DB) on
        /// which the benchmark creates, and then drops, its own database.
        /// Default: a temporary SQLite file.
        #[arg(long)]
        postgres: Option<String>,
        /// Nodes working the run, one measurement per value (e.g. `1,2`):
        /// this process plus `herald worker` processes on the same Postgres.
        #[arg(long, value_delimiter = ',', default_value = "1",
              value_parser = clap::value_parser!(u16).range(1..=16))]
        nodes: Vec<u16>,
    },
    /// Open N seed-000 WebSocket subscribers on one running campaign (the
    /// server runs as a child process) and print commit→receipt latency
    /// percentiles and server RSS per connection.
    Fanout {
        /// Subscribers to open (a process may hold 20,000 descriptors here).
        #[arg(long, default_value_t = 10_000)]
        subscribers: usize,
        /// Recipients in the campaign they watch.
        #[arg(long, default_value_t = 20_000)]
        recipients: u64,
    },
}

pub async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Import { rows } => import(rows).await,
        BenchCommand::Engine {
            recipients,
            latency_ms,
            in_flight,
            receipt_delay_ms,
            postgres,
            nodes,
        } => {
            anyhow::ensure!(
                postgres.is_some() || nodes.iter().all(|&n| n == 1),
                "--nodes above 1 needs --postgres: SQLite serves one node"
            );
            let mut results = Vec::new();
            for &count in &nodes {
                let setup = EngineSetup {
                    recipients,
                    latency_ms,
                    in_flight,
                    receipt_delay_ms,
                    postgres: postgres.clone(),
                    nodes: count,
                };
                results.push((count, engine(&setup).await?));
            }
            if results.len() > 1 {
                println!("\nnodes  recipients/s  vs 1 node");
                let first = results[0].1;
                for (count, rate) in &results {
                    println!("{count:>5}  {rate:>12.0}  {:>8.2}×", rate / first);
                }
            }
            Ok(())
        }
        BenchCommand::Fanout {
            subscribers,
            recipients,
        } => fanout(subscribers, recipients).await,
    }
}

/// Peak resident set size of this process, in bytes (Linux `VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// One CSV chunk of `count` rows starting at `first`, with a valid US number each.
fn csv_rows(first: u64, count: u64) -> String {
    let mut out = String::with_capacity(count as usize * 40);
    for i in first..first + count {
        // 202-555-xxxx style numbers, unique per row.
        out.push_str(&format!(
            "+1{:03}{:07},Person {i},{}\n",
            201 + (i / 10_000_000) % 700,
            i % 10_000_000,
            i % 28 + 1
        ));
    }
    out
}

/// Current resident set size of this process, in bytes (`VmRSS`).
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn write_result(scenario: &str, value: serde_json::Value) -> anyhow::Result<()> {
    let results = std::path::Path::new("bench/results");
    std::fs::create_dir_all(results)?;
    std::fs::write(
        results.join(format!("{scenario}.json")),
        serde_json::to_string_pretty(&value)?,
    )?;
    Ok(())
}

struct EngineSetup {
    recipients: u64,
    latency_ms: u64,
    in_flight: usize,
    receipt_delay_ms: u64,
    postgres: Option<String>,
    nodes: u16,
}

/// A fresh database for one measurement on the Postgres server at
/// `server`, and the URL of the server's own database to drop it from.
async fn create_postgres_database(server: &str) -> anyhow::Result<String> {
    use sqlx::{Connection, Executor};
    let name = format!("herald_bench_{}", uuid::Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect(server).await?;
    admin
        .execute(format!("CREATE DATABASE {name}").as_str())
        .await?;
    let mut url = url_without_database(server);
    url.push('/');
    url.push_str(&name);
    Ok(url)
}

async fn drop_postgres_database(server: &str, database_url: &str) -> anyhow::Result<()> {
    use sqlx::{Connection, Executor};
    let name = database_url.rsplit('/').next().unwrap_or_default();
    let mut admin = sqlx::PgConnection::connect(server).await?;
    admin
        .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
        .await?;
    Ok(())
}

/// `postgres://u@h:p/db?x` → `postgres://u@h:p`.
fn url_without_database(url: &str) -> String {
    let base = url.split('?').next().unwrap_or(url);
    let authority = base.find("://").map_or(0, |i| i + 3);
    match base[authority..].find('/') {
        Some(slash) => base[..authority + slash].to_owned(),
        None => base.to_owned(),
    }
}

/// Runs one campaign start to finish; returns recipients per second.
async fn engine(setup: &EngineSetup) -> anyhow::Result<f64> {
    let &EngineSetup {
        recipients,
        latency_ms,
        in_flight,
        receipt_delay_ms,
        nodes,
        ..
    } = setup;
    let engine = crate::engine::EngineConfig {
        in_flight,
        slice: 1000,
        ..Default::default()
    };
    let database_url = match &setup.postgres {
        Some(server) => Some(create_postgres_database(server).await?),
        None => None,
    };
    let bench = BenchServer::start_on(Some(engine), database_url.clone()).await?;
    // The other nodes: engine-only processes on the same database.
    let mut workers = Vec::new();
    for _ in 1..nodes {
        workers.push(
            std::process::Command::new(std::env::current_exe()?)
                .arg("worker")
                .env(
                    "HERALD_DATABASE_URL",
                    database_url.as_deref().unwrap_or_default(),
                )
                .env("HERALD_IN_FLIGHT", in_flight.to_string())
                .env("HERALD_SLICE", "1000")
                .env("RUST_LOG", "warn")
                .stdout(std::process::Stdio::null())
                .spawn()?,
        );
    }
    let (base, key) = (bench.base.clone(), bench.key.clone());
    let client = reqwest::Client::new();
    let campaign: serde_json::Value = client
        .post(format!("{base}/v1/campaigns"))
        .bearer_auth(&key)
        .json(&json!({"name": "bench", "channel": "sms", "template": "Hi {{name}}, day {{day}}",
                      "provider": {"kind": "simulated", "latency_ms": latency_ms, "receipt_delay_ms": receipt_delay_ms}}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id = campaign["id"].clone();
    println!("importing {recipients} contacts …");
    const PER_CHUNK: u64 = 5_000;
    let header =
        futures::stream::once(async { Ok::<_, std::io::Error>("phone,name,day\n".to_owned()) });
    let body = header.chain(
        futures::stream::iter((0..recipients).step_by(PER_CHUNK as usize))
            .map(move |first| Ok(csv_rows(first, PER_CHUNK.min(recipients - first)))),
    );
    client
        .post(format!("{base}/v1/campaigns/{id}/contacts:import"))
        .bearer_auth(&key)
        .header("content-type", "text/csv")
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await?
        .error_for_status()?;
    let rss_before = rss_bytes().unwrap_or(0);
    let backend = if setup.postgres.is_some() {
        "Postgres"
    } else {
        "SQLite"
    };
    println!(
        "running the campaign on {backend}, {nodes} node(s) (simulated provider, \
         {latency_ms} ms latency, {in_flight} in flight per node) …"
    );
    let started = Instant::now();
    client
        .post(format!("{base}/v1/campaigns/{id}/start"))
        .bearer_auth(&key)
        .send()
        .await?
        .error_for_status()?;
    let mut peak_rss = rss_before;
    let done = loop {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        peak_rss = peak_rss.max(rss_bytes().unwrap_or(0));
        let c: serde_json::Value = client
            .get(format!("{base}/v1/campaigns/{id}"))
            .bearer_auth(&key)
            .send()
            .await?
            .json()
            .await?;
        if c["status"] == "completed" || c["status"] == "failed" {
            break c;
        }
    };
    let elapsed = started.elapsed();
    let rate = recipients as f64 / elapsed.as_secs_f64();
    println!("status:        {}", done["status"]);
    println!(
        "sent / failed: {} / {}",
        done["progress"]["sent"], done["progress"]["failed"]
    );
    println!(
        "elapsed:       {:.2} s (start → final counters)",
        elapsed.as_secs_f64()
    );
    println!("rate:          {rate:.0} recipients/s");
    println!(
        "RSS:           {:.1} MiB before start, {:.1} MiB peak during the run",
        rss_before as f64 / 1048576.0,
        peak_rss as f64 / 1048576.0
    );
    let name = match (&setup.postgres, nodes) {
        (None, _) => "engine".to_owned(),
        (Some(_), n) => format!("engine-postgres-{n}-node"),
    };
    write_result(
        &name,
        json!({"scenario": "engine", "backend": backend, "nodes": nodes,
               "recipients": recipients, "latency_ms": latency_ms,
               "seconds": elapsed.as_secs_f64(), "recipients_per_second": rate,
               "peak_rss_bytes": peak_rss}),
    )?;
    for mut worker in workers {
        let _ = worker.kill();
        let _ = worker.wait();
    }
    bench.stop().await?;
    if let (Some(server), Some(url)) = (&setup.postgres, &database_url) {
        drop_postgres_database(server, url).await?;
    }
    Ok(rate)
}

/// RSS of another process, in bytes.
fn rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

async fn fanout(subscribers: usize, recipients: u64) -> anyhow::Result<()> {
    use futures::StreamExt as _;
    let dir = tempfile_dir()?;
    let database_url = format!("sqlite://{}/bench.db", dir.display());
    let exe = std::env::current_exe()?;
    let key_out = std::process::Command::new(&exe)
        .args(["keys", "create", "--workspace", "bench"])
        .env("HERALD_DATABASE_URL", &database_url)
        .output()?;
    let key = String::from_utf8(key_out.stdout)?.trim().to_owned();
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut server = tokio::process::Command::new(&exe)
        .env("HERALD_DATABASE_URL", &database_url)
        .env("HERALD_ADDR", format!("127.0.0.1:{port}"))
        .env("HERALD_NO_DEMO", "1")
        .env("HERALD_IN_FLIGHT", "64")
        .env("RUST_LOG", "error")
        .kill_on_drop(true)
        .spawn()?;
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    for _ in 0..200 {
        if client.get(format!("{base}/healthz")).send().await.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let campaign: serde_json::Value = client
        .post(format!("{base}/v1/campaigns"))
        .bearer_auth(&key)
        .json(&json!({"name": "fanout", "channel": "sms", "template": "Hi {{name}}, day {{day}}",
                      "provider": {"kind": "simulated", "latency_ms": 20, "receipt_delay_ms": 500}}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id = campaign["id"].clone();
    let mut csv = String::from("phone,name,day\n");
    csv.push_str(&csv_rows(0, recipients));
    client
        .post(format!("{base}/v1/campaigns/{id}/contacts:import"))
        .bearer_auth(&key)
        .header("content-type", "text/csv")
        .body(csv)
        .send()
        .await?
        .error_for_status()?;

    let server_pid = server.id().unwrap_or(0);
    let rss_idle_server = rss_of(server_pid).unwrap_or(0);
    println!("opening {subscribers} subscribers …");
    let url = format!("ws://127.0.0.1:{port}/ws/campaigns/{id}/progress?token={key}");
    let (latencies_tx, mut latencies_rx) = tokio::sync::mpsc::unbounded_channel::<(f64, bool)>();
    let mut tasks = tokio::task::JoinSet::new();
    let connected = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for _ in 0..subscribers {
        let url = url.clone();
        let tx = latencies_tx.clone();
        let connected = connected.clone();
        tasks.spawn(async move {
            let Ok((mut socket, _)) = tokio_tungstenite::connect_async(&url).await else {
                return;
            };
            connected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            while let Some(Ok(message)) = socket.next().await {
                let received = chrono::Utc::now().timestamp_micros() as f64 / 1000.0;
                let tokio_tungstenite::tungstenite::Message::Text(text) = message else {
                    continue;
                };
                let Ok(frame) = serde_json::from_str::<serde_json::Value>(&text) else {
                    continue;
                };
                if frame["type"] != "progress_update" {
                    continue;
                }
                let done = frame["data"]["status"] == "completed";
                if let Some(ts) = frame["ts"].as_f64() {
                    let _ = tx.send((received - ts, done));
                }
                if done {
                    return;
                }
            }
        });
        // Keep the accept queue from overflowing.
        if tasks.len() % 500 == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    drop(latencies_tx);
    let deadline = Instant::now() + std::time::Duration::from_secs(120);
    while connected.load(std::sync::atomic::Ordering::Relaxed) < subscribers
        && Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let open = connected.load(std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let rss_connected = rss_of(server_pid).unwrap_or(0);
    println!("{open} connected; running the campaign …");
    let started = Instant::now();
    client
        .post(format!("{base}/v1/campaigns/{id}/start"))
        .bearer_auth(&key)
        .send()
        .await?
        .error_for_status()?;
    let mut latencies = Vec::new();
    let mut finished = 0usize;
    while let Some((latency, done)) = latencies_rx.recv().await {
        latencies.push(latency);
        finished += usize::from(done);
        if finished == open {
            break;
        }
    }
    let elapsed = started.elapsed();
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let per_connection =
        (rss_connected.saturating_sub(rss_idle_server)) as f64 / open.max(1) as f64;
    let (p50, p99, max) = (
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        latencies.last().copied().unwrap_or(f64::NAN),
    );
    println!("subscribers:          {open} of {subscribers}");
    println!(
        "frames received:      {} ({:.1} per subscriber over {:.1} s)",
        latencies.len(),
        latencies.len() as f64 / open.max(1) as f64,
        elapsed.as_secs_f64()
    );
    println!("saw the final status: {finished}");
    println!("commit → receipt:     p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms");
    println!("server RSS:           {:.1} MiB idle, {:.1} MiB with subscribers: {:.1} KiB per connection",
        rss_idle_server as f64 / 1048576.0, rss_connected as f64 / 1048576.0, per_connection / 1024.0);
    write_result(
        "fanout",
        json!({"scenario": "fanout", "subscribers": open, "frames": latencies.len(),
               "p50_ms": p50, "p99_ms": p99, "max_ms": max, "final_seen": finished,
               "rss_per_connection_bytes": per_connection}),
    )?;
    tasks.abort_all();
    let _ = server.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

async fn import(rows: u64) -> anyhow::Result<()> {
    let bench = BenchServer::start(None).await?;
    let (base, key) = (bench.base.clone(), bench.key.clone());
    let client = reqwest::Client::new();
    let campaign: serde_json::Value = client
        .post(format!("{base}/v1/campaigns"))
        .bearer_auth(&key)
        .json(&json!({"name": "bench", "channel": "sms", "template": "Hi {{name}}, day {{day}}"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;

    const PER_CHUNK: u64 = 5_000;
    let header =
        futures::stream::once(async { Ok::<_, std::io::Error>("phone,name,day\n".to_owned()) });
    let body = header.chain(
        futures::stream::iter((0..rows).step_by(PER_CHUNK as usize))
            .map(move |first| Ok(csv_rows(first, PER_CHUNK.min(rows - first)))),
    );
    println!("importing {rows} CSV rows through POST /v1/campaigns/{{id}}/contacts:import …");
    let started = Instant::now();
    let report: serde_json::Value = client
        .post(format!(
            "{base}/v1/campaigns/{}/contacts:import",
            campaign["id"]
        ))
        .bearer_auth(&key)
        .header("content-type", "text/csv")
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let elapsed = started.elapsed();
    let rate = rows as f64 / elapsed.as_secs_f64();
    let peak = peak_rss_bytes().unwrap_or(0);
    println!("imported:   {}", report["imported"]);
    println!("duplicates: {}", report["duplicates"]);
    println!("invalid:    {}", report["invalid"]);
    println!("elapsed:    {:.2} s", elapsed.as_secs_f64());
    println!("rate:       {rate:.0} rows/s");
    println!(
        "peak RSS:   {:.1} MiB (whole process: server and CSV generator)",
        peak as f64 / 1048576.0
    );
    anyhow::ensure!(
        report["imported"].as_u64() == Some(rows),
        "not every row was imported: {report}"
    );

    write_result(
        "import",
        json!({
            "scenario": "import", "rows": rows, "seconds": elapsed.as_secs_f64(),
            "rows_per_second": rate, "peak_rss_bytes": peak,
        }),
    )?;
    bench.stop().await
}

/// A Herald served in this process on a temporary database, with a key.
struct BenchServer {
    base: String,
    key: String,
    dir: std::path::PathBuf,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl BenchServer {
    async fn start(engine: Option<crate::engine::EngineConfig>) -> anyhow::Result<Self> {
        Self::start_on(engine, None).await
    }

    /// `database_url` defaults to a SQLite file in a temporary directory.
    async fn start_on(
        engine: Option<crate::engine::EngineConfig>,
        database_url: Option<String>,
    ) -> anyhow::Result<Self> {
        let dir = tempfile_dir()?;
        let app = Application::build(ServerConfig {
            addr: "127.0.0.1:0".into(),
            database_url: database_url
                .unwrap_or_else(|| format!("sqlite://{}/bench.db", dir.display())),
            store: crate::store::StoreOptions::default(),
            api: ApiConfig::default(),
            demo: false,
            engine,
            public_url: None,
        })
        .await?;
        let base = format!("http://{}", app.local_addr());
        let store = app.store();
        let workspace = store.ensure_workspace("bench").await?;
        let (_, key) = crate::api::keys::issue_key(store.as_ref(), workspace.id, None).await?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until_stopped(async {
            let _ = stopped.await;
        }));
        Ok(Self {
            base,
            key,
            dir,
            stop,
            server,
        })
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.server.await??;
        let _ = std::fs::remove_dir_all(&self.dir);
        Ok(())
    }
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("herald-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
