//! `bench engine`: one campaign start to finish, on SQLite or Postgres,
//! with one node or several.

use std::time::Instant;

use serde_json::json;

use super::*;

#[derive(Debug, Clone, clap::Args)]
pub struct EngineArgs {
    /// Recipients in the campaign.
    #[arg(long, default_value_t = 1_000_000)]
    pub recipients: u64,
    /// Simulated provider latency per send, in milliseconds; one
    /// measurement per value (e.g. `0,50`).
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub latency_ms: Vec<u64>,
    /// Sends in flight at once, per node.
    #[arg(long, default_value_t = 1000)]
    pub in_flight: usize,
    /// Delay of the simulated delivery receipts, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub receipt_delay_ms: u64,
    /// Run on Postgres: a server URL (postgres://USER@HOST:PORT/DB) on
    /// which the benchmark creates, and then drops, its own database.
    /// Default: a temporary SQLite file.
    #[arg(long)]
    pub postgres: Option<String>,
    /// Nodes working the run, one measurement per value (e.g. `1,2`):
    /// this process plus `herald worker` processes on the same Postgres.
    #[arg(long, value_delimiter = ',', default_value = "1",
          value_parser = clap::value_parser!(u16).range(1..=16))]
    pub nodes: Vec<u16>,
}

impl EngineArgs {
    pub(super) fn for_all(all: &super::AllArgs) -> Self {
        Self {
            recipients: if all.quick { 2_000 } else { 1_000_000 },
            latency_ms: vec![0, 50],
            in_flight: if all.quick { 64 } else { 1000 },
            receipt_delay_ms: 1000,
            postgres: all.postgres.clone(),
            nodes: vec![1],
        }
    }
}

/// One measured run.
struct Measurement {
    rate: f64,
    seconds: f64,
    peak_rss: u64,
}

/// Every combination of backend, latency and node count the arguments name.
pub(super) async fn run(args: &EngineArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(
        args.postgres.is_some() || args.nodes.iter().all(|&n| n == 1),
        "--nodes above 1 needs --postgres: SQLite serves one node"
    );
    let mut report = Report::new("engine");
    let mut runs = Vec::new();
    let backends: Vec<Option<String>> = match &args.postgres {
        Some(url) => vec![None, Some(url.clone())],
        None => vec![None],
    };
    for postgres in &backends {
        for &latency_ms in &args.latency_ms {
            let node_counts: &[u16] = if postgres.is_some() {
                &args.nodes
            } else {
                &[1]
            };
            let mut first_rate = None;
            for &nodes in node_counts {
                let setup = EngineSetup {
                    recipients: args.recipients,
                    latency_ms,
                    in_flight: args.in_flight,
                    receipt_delay_ms: args.receipt_delay_ms,
                    postgres: postgres.clone(),
                    nodes,
                };
                let m = engine(&setup).await?;
                let backend = if postgres.is_some() {
                    "Postgres"
                } else {
                    "SQLite"
                };
                let target = match (postgres.is_some(), latency_ms) {
                    (false, 0) => Some(Target::AtLeast(50_000.0)),
                    (false, l) if l >= 50 => Some(Target::AtLeast(10_000.0)),
                    (true, 0) if nodes == 1 => Some(Target::AtLeast(30_000.0)),
                    _ => None,
                };
                let label = format!(
                    "{backend}, {nodes} node{}, {latency_ms} ms latency",
                    if nodes == 1 { "" } else { "s" }
                );
                report.row(format!("{label}: recipients"), m.rate, "/s", target);
                if let Some(first) = first_rate {
                    report.row(format!("{label}: vs 1 node"), m.rate / first, "×", None);
                } else {
                    first_rate = Some(m.rate);
                }
                if !postgres.is_some() && latency_ms == 0 {
                    report.row(
                        format!("{label}: peak RSS"),
                        m.peak_rss as f64 / 1_048_576.0,
                        "MiB",
                        Some(Target::AtMost(300.0 * 1e6 / 1_048_576.0)),
                    );
                }
                runs.push(
                    json!({"backend": backend, "nodes": nodes, "latency_ms": latency_ms,
                                 "recipients": args.recipients, "seconds": m.seconds,
                                 "recipients_per_second": m.rate, "peak_rss_bytes": m.peak_rss}),
                );
            }
        }
    }
    let mut peer = json!({"measured": false});
    if let Some(server) = &args.postgres {
        let herald_rate = runs
            .iter()
            .find(|r| r["backend"] == "Postgres" && r["nodes"] == 1 && r["latency_ms"] == 0)
            .and_then(|r| r["recipients_per_second"].as_f64());
        match (super::peers::graphile_missing(), herald_rate) {
            (Some(why), _) => {
                println!("graphile-worker peer: not measured ({why})");
                peer = json!({"measured": false, "why": why});
            }
            (None, None) => {
                peer = json!({"measured": false, "why": "no 1-node, 0 ms Postgres run to compare"});
            }
            (None, Some(herald_rate)) => {
                // Bounded: the peer is an order of magnitude slower.
                let jobs = args.recipients.min(50_000);
                let concurrency = 16;
                println!("graphile-worker peer: {jobs} jobs, concurrency {concurrency} …");
                let url = create_postgres_database(server).await?;
                let rate = super::peers::graphile_jobs_per_second(&url, jobs, concurrency).await;
                drop_postgres_database(server, &url).await?;
                let rate = rate?;
                report.row(
                    format!("graphile-worker, same Postgres ({jobs} jobs): jobs"),
                    rate,
                    "/s",
                    None,
                );
                report.row(
                    "Postgres, 1 node: Herald ÷ graphile-worker",
                    herald_rate / rate,
                    "×",
                    Some(Target::AtLeast(5.0)),
                );
                peer = json!({"measured": true, "name": "graphile-worker", "jobs": jobs,
                              "concurrency": concurrency, "jobs_per_second": rate});
            }
        }
    }
    report.raw(json!({"recipients": args.recipients, "runs": runs, "peer": peer}));
    Ok(report)
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

/// Runs one campaign start to finish.
async fn engine(setup: &EngineSetup) -> anyhow::Result<Measurement> {
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
        let mut worker = std::process::Command::new(std::env::current_exe()?);
        dies_with_bench(&mut worker);
        workers.push(
            worker
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
    client
        .post(format!("{base}/v1/campaigns/{id}/contacts:import"))
        .bearer_auth(&key)
        .header("content-type", "text/csv")
        .body(csv_body(recipients))
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
    for mut worker in workers {
        let _ = worker.kill();
        let _ = worker.wait();
    }
    bench.stop().await?;
    if let (Some(server), Some(url)) = (&setup.postgres, &database_url) {
        drop_postgres_database(server, url).await?;
    }
    Ok(Measurement {
        rate,
        seconds: elapsed.as_secs_f64(),
        peak_rss,
    })
}
