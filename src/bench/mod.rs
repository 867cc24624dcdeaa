//! Benchmarks that print figures. Speed targets live here, never in timed
//! tests. Each starts what it needs in-process, on a temporary database and
//! loopback only, and stops by itself.

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::api::ApiConfig;
use crate::startup::{Application, ServerConfig};

mod arrival;
mod engine;
mod fanout;
mod import;
mod peers;
mod rest;
mod subscribers;

pub use engine::EngineArgs;
pub use fanout::FanoutArgs;
pub use import::ImportArgs;
pub use rest::RestArgs;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Stream a generated CSV through the HTTP import: rows/s and peak RSS.
    Import(ImportArgs),
    /// Run SMS campaigns on the simulated provider: recipients/s from start
    /// to the run's final counters, and peak RSS.
    Engine(EngineArgs),
    /// Open N seed-000 WebSocket subscribers on one running campaign (the
    /// server runs as a child process): commit→receipt latency percentiles
    /// and server RSS per connection.
    Fanout(FanoutArgs),
    /// Load the seed REST reads of a finished campaign with concurrent
    /// clients: seed 002 status/analytics throughput and latency, seed 001
    /// execution pages from the first to the deepest, by offset and cursor.
    Rest(RestArgs),
    /// Every scenario in turn at the sizes the targets name, then one table.
    All(AllArgs),
}

#[derive(Debug, Args)]
pub struct AllArgs {
    /// Tiny sizes (seconds, not minutes): checks the harness, not the speed.
    #[arg(long)]
    quick: bool,
    /// Also measure the engine on Postgres (a server URL; see `bench engine`).
    #[arg(long)]
    postgres: Option<String>,
}

pub async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Import(args) => import::run(&args).await?.finish(),
        BenchCommand::Engine(args) => engine::run(&args).await?.finish(),
        BenchCommand::Fanout(args) => fanout::run(&args).await?.finish(),
        BenchCommand::Rest(args) => rest::run(&args).await?.finish(),
        BenchCommand::All(args) => all(&args).await,
    }
}

async fn all(args: &AllArgs) -> anyhow::Result<()> {
    let mut all = Report::new("all");
    for name in ["engine", "fanout", "rest", "import"] {
        let report = match name {
            "engine" => engine::run(&EngineArgs::for_all(args)).await?,
            "fanout" => fanout::run(&FanoutArgs::for_all(args)).await?,
            "rest" => rest::run(&RestArgs::for_all(args)).await?,
            _ => import::run(&ImportArgs::for_all(args)).await?,
        };
        all.rows.extend(report.rows.iter().map(|row| Row {
            figure: format!("{name}: {}", row.figure),
            ..row.clone()
        }));
        all.raw.insert(name.to_owned(), report.json());
        // Written as each finishes: a later failure keeps what was measured.
        report.finish()?;
    }
    println!();
    all.finish()
}

/// A figure's target, from the performance issue.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    AtLeast(f64),
    AtMost(f64),
}

impl Target {
    fn met(self, value: f64) -> bool {
        match self {
            Target::AtLeast(t) => value >= t,
            Target::AtMost(t) => value <= t,
        }
    }
}

#[derive(Debug, Clone)]
struct Row {
    figure: String,
    value: f64,
    unit: &'static str,
    target: Option<Target>,
}

/// What a scenario measured: figures with their targets, printed as a
/// table and written, with the raw numbers, to `bench/results/<name>.json`.
pub struct Report {
    name: String,
    rows: Vec<Row>,
    raw: serde_json::Map<String, Value>,
}

impl Report {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            rows: Vec::new(),
            raw: Default::default(),
        }
    }

    fn row(
        &mut self,
        figure: impl Into<String>,
        value: f64,
        unit: &'static str,
        target: Option<Target>,
    ) {
        self.rows.push(Row {
            figure: figure.into(),
            value,
            unit,
            target,
        });
    }

    /// Adds the fields of `value` (an object) to the JSON.
    fn raw(&mut self, value: Value) {
        if let Value::Object(fields) = value {
            self.raw.extend(fields);
        }
    }

    fn json(&self) -> Value {
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|row| {
                json!({"figure": row.figure, "value": row.value, "unit": row.unit,
                       "target": row.target.map(|t| format_target(t, row.unit)),
                       "met": row.target.map(|t| t.met(row.value))})
            })
            .collect();
        let mut out = self.raw.clone();
        out.insert("scenario".into(), json!(self.name));
        out.insert("machine".into(), machine());
        out.insert("rows".into(), Value::Array(rows));
        Value::Object(out)
    }

    /// Prints the table and writes the JSON.
    fn finish(self) -> anyhow::Result<()> {
        let width = self
            .rows
            .iter()
            .map(|r| r.figure.chars().count())
            .max()
            .unwrap_or(6)
            .max(6);
        println!(
            "\n{} — {}",
            self.name,
            machine()["summary"].as_str().unwrap_or_default()
        );
        println!(
            "{:<width$}  {:>14}  {:>14}  met",
            "figure", "value", "target"
        );
        for row in &self.rows {
            let met = match row.target {
                Some(t) if t.met(row.value) => "yes",
                Some(_) => "NO",
                None => "—",
            };
            println!(
                "{:<width$}  {:>14}  {:>14}  {met}",
                row.figure,
                format_value(row.value, row.unit),
                row.target
                    .map_or_else(|| "—".into(), |t| format_target(t, row.unit)),
            );
        }
        write_result(&self.name, self.json())
    }
}

fn format_value(value: f64, unit: &str) -> String {
    if !value.is_finite() {
        return "n/a".into();
    }
    match unit {
        "/s" | "" => {
            let digits = format!("{:.0}", value);
            let mut out = String::new();
            for (i, c) in digits.chars().enumerate() {
                if i > 0 && (digits.len() - i) % 3 == 0 && c != '-' {
                    out.push(',');
                }
                out.push(c);
            }
            if unit.is_empty() {
                out
            } else {
                format!("{out}/s")
            }
        }
        "×" => format!("{value:.2}×"),
        unit => format!("{value:.1} {unit}"),
    }
}

fn format_target(target: Target, unit: &str) -> String {
    match target {
        Target::AtLeast(t) => format!("≥ {}", format_value(t, unit)),
        Target::AtMost(t) => format!("≤ {}", format_value(t, unit)),
    }
}

/// Cores and CPU model: figures only compare on the same machine.
fn machine() -> Value {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    json!({"cores": cores, "cpu": model, "summary": format!("{cores} cores, {model}")})
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

/// A generated CSV of `rows` contacts (`phone,name,day`), streamed in
/// chunks so a million rows never sit in memory at once.
fn csv_body(rows: u64) -> reqwest::Body {
    use futures::StreamExt as _;
    const PER_CHUNK: u64 = 5_000;
    let header =
        futures::stream::once(async { Ok::<_, std::io::Error>("phone,name,day\n".to_owned()) });
    let chunks = futures::stream::iter((0..rows).step_by(PER_CHUNK as usize))
        .map(move |first| Ok(csv_rows(first, PER_CHUNK.min(rows - first))));
    reqwest::Body::wrap_stream(header.chain(chunks))
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

/// RSS of another process, in bytes.
fn rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The least and the most RSS a process had while this sampled it, every
/// 100 ms from a task of its own, until [`RssSampler::stop`].
///
/// One reading at a chosen moment depends on the allocator's timing: after
/// ten thousand WebSocket handshakes at once the server held up to 75 MB
/// more than a second later, freed but not yet given back (mimalloc returns
/// a thread's free pages on that thread's next allocations), so the same
/// build measured 7.8 to 14.8 KiB per idle connection from run to run.
struct RssSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sampling: tokio::task::JoinHandle<Option<(u64, u64)>>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let sampling = tokio::spawn(async move {
            let mut seen: Option<(u64, u64)> = None;
            loop {
                if let Some(rss) = rss_of(pid) {
                    seen = Some(
                        seen.map_or((rss, rss), |(least, most)| (least.min(rss), most.max(rss))),
                    );
                }
                if stopped.load(Ordering::Relaxed) {
                    return seen;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        });
        Self { stop, sampling }
    }

    /// The least and the most RSS seen, taking one last reading now.
    async fn stop(self) -> Option<(u64, u64)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.sampling.await.ok().flatten()
    }
}

/// CPU time a process has used so far, user and system, in seconds
/// (Linux's `/proc`; `None` elsewhere).
fn cpu_seconds_of(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces: count after it.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let (user, system): (u64, u64) = (fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?);
    // Clock ticks: 100 a second on every Linux this runs on.
    Some((user + system) as f64 / 100.0)
}

/// The CPU time another process uses from when this is started.
struct CpuClock {
    pid: u32,
    at_start: Option<f64>,
}

impl CpuClock {
    fn start(pid: u32) -> Self {
        Self {
            pid,
            at_start: cpu_seconds_of(pid),
        }
    }

    /// Seconds of CPU since [`CpuClock::start`] (`None` without `/proc`).
    fn used(&self) -> Option<f64> {
        self.at_start
            .zip(cpu_seconds_of(self.pid))
            .map(|(before, after)| after - before)
    }
}

/// Has `command`'s process stopped (SIGTERM) when the bench process ends,
/// however it ends. `kill_on_drop` covers a bench that returns or fails;
/// one killed by hand left its servers and peers running, idle, through
/// every later measurement on the machine.
///
/// Linux sends the signal when the thread that spawned the child exits, so
/// this is for children spawned from the runtime's worker threads (or the
/// main thread), which live as long as the bench.
fn dies_with_bench(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: `pre_exec` runs between fork and exec; the closure calls only
    // async-signal-safe functions (prctl, getppid) and allocates nothing.
    let bench = std::process::id() as libc::pid_t;
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            // The bench may have died before the prctl: then no signal comes.
            if libc::getppid() != bench {
                return Err(std::io::Error::other("the bench process has ended"));
            }
            Ok(())
        });
    }
}

/// Makes the calling thread `SCHED_BATCH`: what the server sends it makes
/// it runnable but does not preempt the server's thread that sent it; it
/// runs at that thread's next wait, yield or tick, and takes whatever else
/// arrived meanwhile.
///
/// Clients on other machines take none of the server's cores. The bench's
/// clients share them, and as ordinary threads each answer woke one to
/// preempt the server mid-request (a reschedule IPI), so the server's
/// latency figures carried the clients' scheduling as well as its own.
fn yield_to_the_server_on_wake_up() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` is valid for the call; pid 0 is this thread.
        let set = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
        if set != 0 {
            let error = std::io::Error::last_os_error();
            println!("bench clients: not SCHED_BATCH ({error}); they preempt the server");
        }
    }
}

/// Whether a server started beside the benchmark answers `url` (any
/// status) within `attempts` tries, 50 ms apart.
async fn answers_within(url: &str, attempts: u32) -> bool {
    let client = reqwest::Client::new();
    for _ in 0..attempts {
        if client.get(url).send().await.is_ok() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
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
            // Benchmarks load the API harder than one key may by default.
            api: ApiConfig {
                rate_limit_per_key: 0,
                ..ApiConfig::default()
            },
            retention: Default::default(),
            demo: false,
            engine,
            public_url: None,
        })
        .await?;
        let base = format!("http://{}", app.local_addr());
        let store = app.store();
        let workspace = store.ensure_workspace("bench").await?;
        let (_, key) = crate::api::keys::issue_key(store.as_ref(), workspace.id, None, &[]).await?;
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

/// A new directory per measurement: one measurement's database can still
/// be open in a task winding down while the next one starts.
fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "herald-bench-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// A Herald served by a child process (`herald` with `HERALD_*` settings)
/// on a temporary SQLite database, with a key. Its CPU time and RSS are its
/// own, read from `/proc`, apart from what the benchmark's clients cost.
/// The database stays readable after [`ChildServer::stop`] and is removed
/// when the value is dropped.
struct ChildServer {
    base: String,
    port: u16,
    key: String,
    dir: std::path::PathBuf,
    database_url: String,
    process: tokio::process::Child,
}

impl ChildServer {
    /// Starts the server with `settings` (environment variables) on top of
    /// a fixed base (no demo workspace, errors-only logs, no rate limit)
    /// and waits until it answers.
    async fn start(settings: &[(&str, String)]) -> anyhow::Result<Self> {
        let dir = tempfile_dir()?;
        let database_url = format!("sqlite://{}/bench.db", dir.display());
        let exe = std::env::current_exe()?;
        let key_out = std::process::Command::new(&exe)
            .args(["keys", "create", "--workspace", "bench"])
            .env("HERALD_DATABASE_URL", &database_url)
            .output()?;
        anyhow::ensure!(
            key_out.status.success(),
            "herald keys create: {}",
            String::from_utf8_lossy(&key_out.stderr)
        );
        let key = String::from_utf8(key_out.stdout)?.trim().to_owned();
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut command = tokio::process::Command::new(&exe);
        command
            .env("HERALD_DATABASE_URL", &database_url)
            .env("HERALD_ADDR", format!("127.0.0.1:{port}"))
            .env("HERALD_NO_DEMO", "1")
            .env("HERALD_RATE_LIMIT", "0")
            .env("RUST_LOG", "error")
            .kill_on_drop(true);
        dies_with_bench(command.as_std_mut());
        for (name, value) in settings {
            command.env(name, value);
        }
        let process = command.spawn()?;
        let base = format!("http://127.0.0.1:{port}");
        anyhow::ensure!(
            answers_within(&format!("{base}/healthz"), 400).await,
            "the benchmark's server did not answer within 20 s"
        );
        Ok(Self {
            base,
            port,
            key,
            dir,
            database_url,
            process,
        })
    }

    fn pid(&self) -> u32 {
        self.process.id().unwrap_or(0)
    }

    async fn stop(&mut self) {
        let _ = self.process.kill().await;
        let _ = self.process.wait().await;
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        // The child is killed on drop (`kill_on_drop`) if not stopped yet.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn a_client_thread_is_a_batch_thread() {
        let policy = std::thread::spawn(|| {
            yield_to_the_server_on_wake_up();
            // SAFETY: no arguments; pid 0 is this thread.
            unsafe { libc::sched_getscheduler(0) }
        })
        .join()
        .unwrap();
        assert_eq!(policy, libc::SCHED_BATCH);
    }
}
