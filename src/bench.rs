//! Benchmarks that print figures. Targets live here, never in timed tests.

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Import a generated CSV through the HTTP API and print rows/s and peak RSS.
    Import {
        /// Rows in the generated CSV.
        #[arg(long, default_value_t = 1_000_000)]
        rows: u64,
    },
}

pub async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Import { rows } => import(rows).await,
    }
}

async fn import(_rows: u64) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
