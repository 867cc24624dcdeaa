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
        } => engine(recipients, latency_ms, in_flight, receipt_delay_ms).await,
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

async fn engine(
    recipients: u64,
    latency_ms: u64,
    in_flight: usize,
    receipt_delay_ms: u64,
) -> anyhow::Result<()> {
    let engine = crate::engine::EngineConfig {
        in_flight,
        slice: 1000,
        ..Default::default()
    };
    let bench = BenchServer::start(Some(engine)).await?;
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
    println!("running the campaign (simulated provider, {latency_ms} ms latency, {in_flight} in flight) …");
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
    write_result(
        "engine",
        json!({"scenario": "engine", "recipients": recipients, "latency_ms": latency_ms,
               "seconds": elapsed.as_secs_f64(), "recipients_per_second": rate,
               "peak_rss_bytes": peak_rss}),
    )?;
    bench.stop().await
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
        let dir = tempfile_dir()?;
        let app = Application::build(ServerConfig {
            addr: "127.0.0.1:0".into(),
            database_url: format!("sqlite://{}/bench.db", dir.display()),
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
