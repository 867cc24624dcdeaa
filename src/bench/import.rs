//! `bench import`: a generated CSV streamed through the HTTP import.

use std::time::Instant;

use serde_json::json;

use super::*;

#[derive(Debug, Clone, clap::Args)]
pub struct ImportArgs {
    /// Rows in the generated CSV.
    #[arg(long, default_value_t = 1_000_000)]
    pub rows: u64,
}

impl ImportArgs {
    pub(super) fn for_all(all: &super::AllArgs) -> Self {
        Self {
            rows: if all.quick { 500 } else { 1_000_000 },
        }
    }
}

pub(super) async fn run(args: &ImportArgs) -> anyhow::Result<Report> {
    let rows = args.rows;
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

    println!("importing {rows} CSV rows through POST /v1/campaigns/{{id}}/contacts:import …");
    // Sampled while importing, so earlier scenarios of `bench all` in this
    // process do not count.
    let rss_before = rss_bytes().unwrap_or(0);
    let sampled = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(rss_before));
    let sampler = tokio::spawn({
        let sampled = sampled.clone();
        async move {
            loop {
                sampled.fetch_max(
                    rss_bytes().unwrap_or(0),
                    std::sync::atomic::Ordering::Relaxed,
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    });
    let started = Instant::now();
    let report: serde_json::Value = client
        .post(format!(
            "{base}/v1/campaigns/{}/contacts:import",
            campaign["id"]
        ))
        .bearer_auth(&key)
        .header("content-type", "text/csv")
        .body(csv_body(rows))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let elapsed = started.elapsed();
    let rate = rows as f64 / elapsed.as_secs_f64();
    sampler.abort();
    let peak = sampled.load(std::sync::atomic::Ordering::Relaxed);
    let growth = peak.saturating_sub(rss_before);
    println!("imported:   {}", report["imported"]);
    println!("duplicates: {}", report["duplicates"]);
    println!("invalid:    {}", report["invalid"]);
    println!("elapsed:    {:.2} s", elapsed.as_secs_f64());
    println!("rate:       {rate:.0} rows/s");
    println!(
        "RSS:        {:.1} MiB before, {:.1} MiB peak while importing (server and CSV generator)",
        rss_before as f64 / 1048576.0,
        peak as f64 / 1048576.0
    );
    anyhow::ensure!(
        report["imported"].as_u64() == Some(rows),
        "not every row was imported: {report}"
    );

    bench.stop().await?;
    let mut report = Report::new("import");
    report.row(
        format!("{rows} CSV rows"),
        rate,
        "/s",
        Some(Target::AtLeast(200_000.0)),
    );
    report.row(
        "RSS growth while importing (server and generator)",
        growth as f64 / 1_048_576.0,
        "MiB",
        None,
    );
    report.raw(json!({
        "csv_rows": rows, "seconds": elapsed.as_secs_f64(),
        "rows_per_second": rate, "peak_rss_bytes": peak, "rss_growth_bytes": growth,
    }));
    Ok(report)
}
