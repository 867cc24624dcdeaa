//! The peer stacks Herald is measured against in the same run on the same
//! machine: `bench/peers/fastapi_peer.py` (FastAPI + uvicorn), from the venv
//! `bench/setup.sh` installs. Without it a scenario still runs and says
//! which ratio it could not measure.

use std::path::PathBuf;

/// A running peer process; killed when dropped.
pub(super) struct Peer {
    child: tokio::process::Child,
    pub base: String,
    pub pid: u32,
}

/// `bench/` of the checkout: beside the working directory (`cargo run`) or
/// two levels above the binary (`target/release/herald`).
fn bench_dir() -> Option<PathBuf> {
    let candidates = [
        std::env::current_dir().ok().map(|d| d.join("bench")),
        std::env::current_exe()
            .ok()
            .and_then(|exe| Some(exe.parent()?.parent()?.parent()?.join("bench"))),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|dir| dir.join("peers/fastapi_peer.py").exists())
}

/// Why a peer cannot run here, or `None` when it can.
pub(super) fn fastapi_missing() -> Option<String> {
    match bench_dir() {
        None => Some("bench/peers not found (run from the checkout)".into()),
        Some(dir) if !dir.join(".venv/bin/python").exists() => {
            Some("FastAPI peer not installed: run bench/setup.sh".into())
        }
        Some(_) => None,
    }
}

/// Starts the FastAPI peer; `database` is the SQLite file its REST reads use.
pub(super) async fn start_fastapi(database: Option<&std::path::Path>) -> anyhow::Result<Peer> {
    let dir = bench_dir().ok_or_else(|| anyhow::anyhow!("bench/peers not found"))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut command = tokio::process::Command::new(dir.join(".venv/bin/python"));
    command
        .arg(dir.join("peers/fastapi_peer.py"))
        .arg(port.to_string())
        .kill_on_drop(true);
    super::dies_with_bench(command.as_std_mut());
    if let Some(database) = database {
        command.env("HERALD_PEER_DB", database);
    }
    let child = command.spawn()?;
    let pid = child.id().unwrap_or(0);
    let base = format!("http://127.0.0.1:{port}");
    anyhow::ensure!(
        super::answers_within(&format!("{base}/docs"), 200).await,
        "the FastAPI peer did not start on port {port}"
    );
    Ok(Peer { child, base, pid })
}

impl Peer {
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Why the graphile-worker peer cannot run here, or `None` when it can.
pub(super) fn graphile_missing() -> Option<String> {
    let installed =
        bench_dir().is_some_and(|dir| dir.join("peers/node_modules/graphile-worker").exists());
    if !installed {
        return Some("graphile-worker peer not installed: run bench/setup.sh".into());
    }
    let node = std::process::Command::new("node").arg("--version").output();
    match node {
        Ok(out) if out.status.success() => None,
        _ => Some("node is not installed".into()),
    }
}

/// Works `jobs` graphile-worker jobs on the database at `database_url` (one
/// row update and a counter each) and returns jobs per second.
pub(super) async fn graphile_jobs_per_second(
    database_url: &str,
    jobs: u64,
    concurrency: usize,
) -> anyhow::Result<f64> {
    let dir = bench_dir().ok_or_else(|| anyhow::anyhow!("bench/peers not found"))?;
    let mut command = tokio::process::Command::new("node");
    command
        .arg(dir.join("peers/graphile_peer.js"))
        .arg(database_url)
        .arg(jobs.to_string())
        .arg(concurrency.to_string())
        .kill_on_drop(true);
    super::dies_with_bench(command.as_std_mut());
    let out = command.output().await?;
    anyhow::ensure!(
        out.status.success(),
        "graphile-worker peer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: serde_json::Value = serde_json::from_slice(
        out.stdout
            .split(|b| *b == b'\n')
            .rfind(|line| line.starts_with(b"{"))
            .unwrap_or_default(),
    )?;
    result["jobs_per_second"]
        .as_f64()
        .ok_or_else(|| anyhow::anyhow!("graphile-worker peer printed {result}"))
}
