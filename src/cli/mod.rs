//! The `herald` command line.
//!
//! With no subcommand, `herald` serves the API (what `cargo run --release`
//! does). The other commands work on the database directly, so an operator
//! can create the first key before anything is running.

mod config_file;
mod remote;
mod watch;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::api::ApiConfig;
use crate::domain::{Region, Scope};
use crate::engine::EngineConfig;
use crate::startup::{shutdown_signal, Application, ServerConfig};
use crate::store::StoreOptions;
use crate::telemetry::{self, LogFormat, OtlpEndpoint};

#[derive(Debug, Parser)]
#[command(
    name = "herald",
    version,
    about = "Herald: run SMS and voice campaigns and stream their progress live",
    long_about = "Herald runs SMS and voice campaigns (contacts, runs, batches, retries, \
                  delivery receipts) and streams every campaign's progress over REST, \
                  WebSocket and SSE.\n\nWith no command, `herald` serves the API on \
                  HERALD_ADDR using the database at HERALD_DATABASE_URL."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Args, Clone)]
pub struct GlobalArgs {
    /// Configuration file (TOML); default ./herald.toml when it exists.
    /// Precedence: defaults < file < HERALD_* environment < flags.
    #[arg(long, env = "HERALD_CONFIG", global = true)]
    pub config: Option<std::path::PathBuf>,
    /// Database URL: sqlite://PATH (created if missing) or
    /// postgres://USER:PASSWORD@HOST:PORT/DB (several nodes may share it).
    #[arg(
        long,
        env = "HERALD_DATABASE_URL",
        default_value = "sqlite://herald.db",
        global = true
    )]
    pub database_url: String,
    /// Postgres connections per node (SQLite uses one writer and eight readers).
    #[arg(long, env = "HERALD_DATABASE_POOL_SIZE", default_value_t = 16, global = true,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub database_pool_size: u32,
    /// Postgres statement timeout in milliseconds: a longer statement is cancelled.
    #[arg(long, env = "HERALD_DATABASE_STATEMENT_TIMEOUT_MS", default_value_t = 30_000, global = true,
          value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub database_statement_timeout_ms: u64,
    /// Do not apply migrations at start; refuse a database that needs them
    /// (apply them with `herald migrate`).
    #[arg(long, env = "HERALD_NO_MIGRATE", global = true,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub no_migrate: bool,
    /// Log format on stderr; the level comes from RUST_LOG (default info).
    #[arg(long, env = "HERALD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Export traces (request, run and slice spans) over OTLP/HTTP to this
    /// collector, e.g. http://localhost:4318 (/v1/traces is added to a URL
    /// without a path). Unset: no export.
    #[arg(long, env = "HERALD_OTLP_ENDPOINT", global = true, value_name = "URL",
          value_parser = OtlpEndpoint::parse)]
    pub otlp_endpoint: Option<OtlpEndpoint>,
}

#[derive(Debug, Args, Clone)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "HERALD_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// Largest JSON request body, in bytes (larger ones get 413).
    #[arg(long, env = "HERALD_MAX_BODY_BYTES", default_value_t = 10 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Largest CSV upload, in bytes (checked while streaming).
    #[arg(long, env = "HERALD_MAX_IMPORT_BYTES", default_value_t = 1024 * 1024 * 1024)]
    pub max_import_bytes: usize,
    /// Region for phone numbers written without a country code, for new workspaces.
    #[arg(long, env = "HERALD_DEFAULT_REGION", default_value = "US", value_parser = parse_region)]
    pub default_region: Region,
    /// Do not create the demo workspace on a new database.
    #[arg(long, env = "HERALD_NO_DEMO", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_demo: bool,
    /// At most one progress frame per campaign per this many milliseconds.
    #[arg(long, env = "HERALD_COALESCE_MS", default_value_t = 250)]
    pub coalesce_ms: u64,
    /// Seed-004 sockets close after this many seconds without campaign activity.
    #[arg(long, env = "HERALD_WS_IDLE_SECONDS", default_value_t = 600)]
    pub ws_idle_seconds: u64,
    /// Simultaneous seed-004 WebSockets per API key.
    #[arg(long, env = "HERALD_WS_MAX_PER_KEY", default_value_t = 10)]
    pub ws_max_per_key: usize,
    /// Messages per second a WebSocket client may send (bursts of twice
    /// that); the rest are dropped with one error a second.
    #[arg(long, env = "HERALD_WS_MESSAGES_PER_SECOND", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub ws_messages_per_second: u32,
    /// REST requests per second per API key (bursts of twice that; 0 = no limit).
    /// Over it: 429 with Retry-After.
    #[arg(long, env = "HERALD_RATE_LIMIT", default_value_t = 1000)]
    pub rate_limit: u32,
    /// Browser origins allowed to call the API (comma-separated); CORS is off when empty.
    #[arg(long, env = "HERALD_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
    /// Keep events at least this many hours…
    #[arg(long, env = "HERALD_EVENT_RETENTION_HOURS", default_value_t = 24,
          value_parser = clap::value_parser!(u64).range(0..=876_000))]
    pub event_retention_hours: u64,
    /// …and at least this many newest events per campaign.
    #[arg(long, env = "HERALD_EVENT_RETENTION_COUNT", default_value_t = 100_000,
          value_parser = clap::value_parser!(i64).range(0..))]
    pub event_retention_count: i64,
    /// Delete the executions (per-recipient rows) of runs that ended this
    /// many days ago; run counters and credits stay. 0 keeps them for ever.
    #[arg(long, env = "HERALD_EXECUTION_RETENTION_DAYS", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=36_500))]
    pub execution_retention_days: u32,
    /// Delete per-minute send counts (throughput charts) older than this
    /// many days. 0 keeps them for ever.
    #[arg(long, env = "HERALD_METRICS_RETENTION_DAYS", default_value_t = 90,
          value_parser = clap::value_parser!(u32).range(0..=36_500))]
    pub metrics_retention_days: u32,
    /// Serve the API only; run workers elsewhere with `herald worker`.
    #[arg(long, env = "HERALD_NO_ENGINE", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_engine: bool,
    /// URL providers use to call back (Twilio status callbacks); default http://ADDR.
    #[arg(long, env = "HERALD_PUBLIC_URL")]
    pub public_url: Option<String>,
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// How workers send.
#[derive(Debug, Args, Clone)]
pub struct EngineArgs {
    /// Sends in flight at once per run.
    #[arg(long, env = "HERALD_IN_FLIGHT", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub in_flight: u32,
    /// Runs worked at once by this node.
    #[arg(long, env = "HERALD_MAX_RUNS", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_runs: u32,
    /// Tasks of this node that work one run at once, each on its own
    /// batches (default: 2 on Postgres, where one task's writes overlap
    /// another's; 1 on SQLite, whose single writer would queue them).
    #[arg(long, env = "HERALD_TASKS_PER_RUN", value_parser = clap::value_parser!(u32).range(1..=16))]
    pub tasks_per_run: Option<u32>,
    /// Seconds a worker's claim on a run lasts without renewal.
    #[arg(long, env = "HERALD_LEASE_SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(2..=3600))]
    pub lease_seconds: u64,
    /// First retry delay in milliseconds; doubles per attempt, with jitter.
    #[arg(long, env = "HERALD_RETRY_BASE_MS", default_value_t = 5000)]
    pub retry_base_ms: u64,
    /// Executions marked in progress per slice (default: 4 × in-flight, at
    /// most 1000). Smaller slices lose fewer sends to a crash.
    #[arg(long, env = "HERALD_SLICE", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub slice: Option<u32>,
    /// Sends per second per sender id (0 = no limit).
    #[arg(long, env = "HERALD_SENDER_RATE", default_value_t = 0)]
    pub sender_rate: u32,
    /// On SIGTERM, seconds in-flight sends get to finish and be recorded
    /// before the node exits anyway (their batches then pass to another worker).
    #[arg(long, env = "HERALD_DRAIN_SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub drain_seconds: u64,
}

impl EngineArgs {
    pub fn into_config(self) -> EngineConfig {
        EngineConfig {
            slice: i64::from(self.slice.unwrap_or((self.in_flight * 4).clamp(16, 1000))),
            in_flight: self.in_flight as usize,
            max_runs: self.max_runs as usize,
            tasks_per_run: self.tasks_per_run.map(|n| n as usize),
            lease: std::time::Duration::from_secs(self.lease_seconds),
            retry_base: std::time::Duration::from_millis(self.retry_base_ms),
            sender_rate: std::num::NonZeroU32::new(self.sender_rate),
            drain_grace: std::time::Duration::from_secs(self.drain_seconds),
            ..EngineConfig::default()
        }
    }
}

/// A retention in days, where 0 means "keep for ever".
fn days(n: u32) -> Option<Duration> {
    (n > 0).then(|| Duration::from_secs(u64::from(n) * 24 * 3600))
}

fn parse_region(s: &str) -> Result<Region, String> {
    Region::parse(s)
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the API (the default).
    Serve(ServeArgs),
    /// Work runs without serving the API (several workers may share a database).
    Worker(EngineArgs),
    /// Create, list and revoke API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Drive campaigns on a running server (create, list, show, start, pause, resume, cancel).
    Campaign(CampaignArgs),
    /// Import contacts into a campaign on a running server.
    Contacts(ContactsArgs),
    /// Follow a campaign live: a progress bar with rate and ETA; exits 0 when it
    /// completes, 1 when it fails, 2 when it is cancelled, 3 when refused.
    Watch {
        /// Campaign id (or uuid).
        campaign: String,
        /// Print every server message as one JSON line instead of the bar.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: remote::Remote,
    },
    /// Serve with a 100,000-contact demo campaign running on the simulated
    /// provider; prints its id and a key to watch it with.
    Demo {
        #[command(flatten)]
        serve: ServeArgs,
        /// Contacts in the demo campaign.
        #[arg(long, default_value_t = 100_000)]
        contacts: u64,
    },
    /// Copy the database to FILE while Herald keeps running (consistent snapshot).
    Backup {
        /// Where to write the copy; must not exist.
        file: std::path::PathBuf,
    },
    /// Apply pending migrations and exit (the server also does this at start).
    Migrate,
    /// Check the configuration: reads herald.toml (or --config), the
    /// environment and flags, and prints the effective settings, secrets redacted.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Manage a workspace's credit balance.
    #[command(subcommand)]
    Credits(CreditsCommand),
    /// Run a benchmark and print its figures.
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate and print the effective configuration.
    Check {
        #[command(flatten)]
        serve: ServeArgs,
    },
}

#[derive(Debug, Args)]
pub struct CampaignArgs {
    #[command(flatten)]
    remote: remote::Remote,
    #[command(subcommand)]
    command: remote::CampaignCommand,
}

#[derive(Debug, Args)]
pub struct ContactsArgs {
    #[command(flatten)]
    remote: remote::Remote,
    #[command(subcommand)]
    command: ContactsCommand,
}

#[derive(Debug, Subcommand)]
pub enum ContactsCommand {
    /// Upload a CSV (header row with `phone`, optional `name`, other columns become
    /// variables), with a progress bar; prints the counts and every bad row.
    Import {
        /// Campaign id (or uuid).
        campaign: String,
        file: std::path::PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum CreditsCommand {
    /// Add credits to a workspace (negative to remove); prints the new balance.
    /// The first top-up turns credit accounting on for the workspace.
    Add {
        #[arg(long)]
        workspace: String,
        /// Credits: SMS parts for SMS, one per call for voice.
        #[arg(allow_negative_numbers = true)]
        amount: i64,
        #[arg(long)]
        note: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key and print it, alone, on stdout (creates the workspace if needed).
    Create {
        /// Workspace name.
        #[arg(long)]
        workspace: String,
        /// A note to tell keys apart.
        #[arg(long)]
        label: Option<String>,
        /// An extra power for the key; repeatable. `pii`: read recipients'
        /// phone numbers from run snapshots (`include_recipients=true`).
        #[arg(long = "scope", value_name = "SCOPE", value_parser = crate::domain::Scope::parse)]
        scopes: Vec<crate::domain::Scope>,
    },
    /// List a workspace's keys (prefixes only; secrets are never stored).
    List {
        #[arg(long)]
        workspace: String,
    },
    /// Revoke a key by id or prefix; it is refused from the next request on.
    Revoke {
        #[arg(long)]
        workspace: String,
        /// Key id or prefix.
        key: String,
    },
}

impl GlobalArgs {
    fn store_options(&self) -> StoreOptions {
        StoreOptions {
            migrate: !self.no_migrate,
            pool_size: self.database_pool_size,
            statement_timeout: std::time::Duration::from_millis(self.database_statement_timeout_ms),
        }
    }

    async fn connect(&self) -> anyhow::Result<std::sync::Arc<dyn crate::store::Store>> {
        crate::store::connect(&self.database_url, &self.store_options()).await
    }
}

impl ServeArgs {
    fn into_config(self, global: &GlobalArgs) -> ServerConfig {
        ServerConfig {
            addr: self.addr,
            database_url: global.database_url.clone(),
            store: global.store_options(),
            api: ApiConfig {
                max_body_bytes: self.max_body_bytes,
                max_import_bytes: self.max_import_bytes,
                default_region: self.default_region,
                streams: crate::api::StreamConfig {
                    coalesce: std::time::Duration::from_millis(self.coalesce_ms),
                    idle_timeout: std::time::Duration::from_secs(self.ws_idle_seconds),
                    max_sockets_per_key: self.ws_max_per_key,
                    client_messages_per_second: self.ws_messages_per_second,
                    ..Default::default()
                },
                rate_limit_per_key: self.rate_limit,
                cors_origins: self
                    .cors_origins
                    .iter()
                    .flat_map(|o| o.split(','))
                    .map(|o| o.trim().to_owned())
                    .filter(|o| !o.is_empty())
                    .collect(),
                ..Default::default()
            },
            retention: crate::retention::RetentionConfig {
                event_age: Duration::from_secs(self.event_retention_hours * 3600),
                event_count: self.event_retention_count,
                execution_age: days(self.execution_retention_days),
                metrics_age: days(self.metrics_retention_days),
                ..Default::default()
            },
            demo: !self.no_demo,
            engine: (!self.no_engine).then(|| self.engine.into_config()),
            public_url: self.public_url,
        }
    }
}

/// Reads the configuration file into the environment; runs before the
/// async runtime starts. A bad file stops here, naming the key.
pub fn prepare() -> Result<(), ExitCode> {
    let args: Vec<String> = std::env::args().collect();
    let Some(path) = config_file::locate(&args) else {
        return Ok(());
    };
    match config_file::read(&path) {
        Ok(pairs) => {
            config_file::apply(pairs);
            Ok(())
        }
        Err(message) => {
            eprintln!("herald: {message}");
            Err(ExitCode::from(2))
        }
    }
}

/// Hides a database URL's password.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:********{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

fn config_check(global: &GlobalArgs, serve: &ServeArgs) {
    let e = &serve.engine;
    let rows: Vec<(&str, String)> = vec![
        (
            "config",
            config_file::locate(&std::env::args().collect::<Vec<_>>())
                .or_else(|| global.config.clone())
                .map_or_else(|| "(none)".into(), |p| p.display().to_string()),
        ),
        ("database_url", redact_url(&global.database_url)),
        ("database_pool_size", global.database_pool_size.to_string()),
        (
            "database_statement_timeout_ms",
            global.database_statement_timeout_ms.to_string(),
        ),
        ("no_migrate", global.no_migrate.to_string()),
        (
            "log_format",
            format!("{:?}", global.log_format).to_lowercase(),
        ),
        (
            "otlp_endpoint",
            global
                .otlp_endpoint
                .as_ref()
                .map_or_else(|| "(none: no trace export)".into(), OtlpEndpoint::redacted),
        ),
        ("addr", serve.addr.clone()),
        ("max_body_bytes", serve.max_body_bytes.to_string()),
        ("max_import_bytes", serve.max_import_bytes.to_string()),
        ("default_region", serve.default_region.code().to_owned()),
        ("no_demo", serve.no_demo.to_string()),
        ("no_engine", serve.no_engine.to_string()),
        (
            "public_url",
            serve
                .public_url
                .clone()
                .unwrap_or_else(|| "(http://ADDR)".into()),
        ),
        ("coalesce_ms", serve.coalesce_ms.to_string()),
        ("ws_idle_seconds", serve.ws_idle_seconds.to_string()),
        ("ws_max_per_key", serve.ws_max_per_key.to_string()),
        (
            "ws_messages_per_second",
            serve.ws_messages_per_second.to_string(),
        ),
        ("rate_limit", serve.rate_limit.to_string()),
        ("cors_origins", serve.cors_origins.join(",")),
        (
            "event_retention_hours",
            serve.event_retention_hours.to_string(),
        ),
        (
            "event_retention_count",
            serve.event_retention_count.to_string(),
        ),
        (
            "execution_retention_days",
            serve.execution_retention_days.to_string(),
        ),
        (
            "metrics_retention_days",
            serve.metrics_retention_days.to_string(),
        ),
        ("in_flight", e.in_flight.to_string()),
        ("max_runs", e.max_runs.to_string()),
        (
            "tasks_per_run",
            e.tasks_per_run
                .map_or_else(|| "(2 on Postgres, 1 on SQLite)".into(), |n| n.to_string()),
        ),
        ("lease_seconds", e.lease_seconds.to_string()),
        ("retry_base_ms", e.retry_base_ms.to_string()),
        ("drain_seconds", e.drain_seconds.to_string()),
        (
            "slice",
            e.slice
                .map_or_else(|| "(4 × in_flight, ≤ 1000)".into(), |s| s.to_string()),
        ),
        ("sender_rate", e.sender_rate.to_string()),
    ];
    println!("configuration is valid");
    for (key, value) in rows {
        println!("{key:<22} = {value}");
    }
}

pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    // `config check` only prints the endpoint; every other command exports.
    let otlp = match cli.command {
        Some(Command::Config(_)) => None,
        _ => cli.global.otlp_endpoint.as_ref(),
    };
    let telemetry = match telemetry::init(cli.global.log_format, otlp) {
        Ok(telemetry) => telemetry,
        Err(err) => {
            eprintln!("herald: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    let done = |r: anyhow::Result<()>| r.map(|()| ExitCode::SUCCESS);
    let result = match cli.command {
        None => done(serve(cli.serve.into_config(&cli.global), None).await),
        Some(Command::Serve(args)) => done(serve(args.into_config(&cli.global), None).await),
        Some(Command::Demo {
            serve: args,
            contacts,
        }) => done(serve(args.into_config(&cli.global), Some(contacts)).await),
        Some(Command::Keys(cmd)) => done(keys(&cli.global, cmd).await),
        Some(Command::Backup { file }) => done(backup(&cli.global, &file).await),
        Some(Command::Config(ConfigCommand::Check { serve })) => {
            config_check(&cli.global, &serve);
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Migrate) => {
            let options = StoreOptions {
                migrate: true,
                ..cli.global.store_options()
            };
            done(
                crate::store::connect(&cli.global.database_url, &options)
                    .await
                    .map(|_| println!("database is up to date")),
            )
        }
        Some(Command::Worker(args)) => done(worker(&cli.global, args).await),
        Some(Command::Credits(cmd)) => done(credits(&cli.global, cmd).await),
        Some(Command::Bench(cmd)) => done(crate::bench::run(cmd).await),
        Some(Command::Campaign(args)) => done(remote::campaign(args.remote, args.command).await),
        Some(Command::Contacts(args)) => match args.command {
            ContactsCommand::Import { campaign, file } => {
                done(remote::import(args.remote, campaign, file).await)
            }
        },
        Some(Command::Watch {
            campaign,
            json,
            remote,
        }) => watch::watch(remote, campaign, json).await,
    };
    // After the command, including serve's drain on SIGTERM: the last
    // spans are exported before the process exits.
    telemetry.shutdown().await;
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("herald: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: ServerConfig, demo_contacts: Option<u64>) -> anyhow::Result<()> {
    let app = Application::build(config).await?;
    let addr = app.local_addr();
    tracing::info!(%addr, "Herald is listening");
    if let Some(key) = app.demo_key() {
        println!("\nA demo workspace was created. Its API key (shown only now):\n\n    {key}\n");
        println!(
            "Try it:\n\n    curl -H 'Authorization: Bearer {key}' http://{addr}/v1/campaigns\n"
        );
    }
    if let Some(contacts) = demo_contacts {
        let store = app.store();
        let workspace = store.ensure_workspace("demo").await?;
        let (_, key) =
            crate::api::keys::issue_key(store.as_ref(), workspace.id, Some("demo"), &Scope::ALL)
                .await?;
        let base = format!("http://{addr}");
        let serving = tokio::spawn(app.run_until_stopped(shutdown_signal()));
        let id = start_demo_campaign(base.clone(), key.clone(), contacts).await?;
        println!("\nDemo campaign {id} is running ({contacts} contacts, simulated provider).");
        println!("Watch it:\n\n    herald watch {id} --url {base} --key {key}\n");
        println!("or: websocat 'ws://{addr}/ws/campaigns/{id}/progress?token={key}'\n");
        serving.await??;
    } else {
        app.run_until_stopped(shutdown_signal()).await?;
    }
    tracing::info!("Herald stopped");
    Ok(())
}

/// Creates and starts the demo campaign through the public API.
async fn start_demo_campaign(base: String, key: String, contacts: u64) -> anyhow::Result<i64> {
    let client = reqwest::Client::new();
    let campaign: serde_json::Value = client
        .post(format!("{base}/v1/campaigns"))
        .bearer_auth(&key)
        .json(&serde_json::json!({
            "name": "Demo: appointment reminders", "channel": "sms", "sender": "HERALD",
            "template": "Hi {{name}}, see you on day {{day}}.",
            "provider": {"kind": "simulated", "latency_ms": 40, "receipt_delay_ms": 3000}
        }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id = campaign["id"].as_i64().unwrap_or_default();
    let mut csv = String::from("phone,name,day\n");
    for i in 0..contacts {
        csv.push_str(&format!(
            "+1202{:07},Person {i},{}\n",
            i % 10_000_000,
            i % 28 + 1
        ));
    }
    client
        .post(format!("{base}/v1/campaigns/{id}/contacts:import"))
        .bearer_auth(&key)
        .header("content-type", "text/csv")
        .body(csv)
        .send()
        .await?
        .error_for_status()?;
    client
        .post(format!("{base}/v1/campaigns/{id}/start"))
        .bearer_auth(&key)
        .send()
        .await?
        .error_for_status()?;
    Ok(id)
}

async fn backup(global: &GlobalArgs, file: &std::path::Path) -> anyhow::Result<()> {
    anyhow::ensure!(
        !file.exists(),
        "{} already exists; choose a new file",
        file.display()
    );
    let store = global.connect().await?;
    let path = file
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("the backup path must be UTF-8"))?;
    store.backup(path).await?;
    println!("backed up to {}", file.display());
    Ok(())
}

async fn worker(global: &GlobalArgs, args: EngineArgs) -> anyhow::Result<()> {
    let store = global.connect().await?;
    let stop = tokio_util::sync::CancellationToken::new();
    // A worker has no subscribers of its own; its events reach them
    // through the log.
    let hub = crate::streams::Hub::start(
        store.clone(),
        std::time::Duration::from_millis(250),
        stop.clone(),
    );
    let config = args.into_config();
    let grace = config.drain_grace;
    let engine = crate::engine::Engine::new(
        store,
        config,
        String::from("http://127.0.0.1"),
        std::sync::Arc::new(tokio::sync::Notify::new()),
        hub,
        stop.clone(),
    );
    let running = tokio::spawn(engine.run());
    shutdown_signal().await;
    stop.cancel();
    match tokio::time::timeout(grace, running).await {
        Ok(done) => done?,
        Err(_) => tracing::warn!(
            grace_seconds = grace.as_secs(),
            "drain grace period passed with sends in flight; their batches pass to another \
             worker when the leases expire"
        ),
    }
    Ok(())
}

async fn credits(global: &GlobalArgs, cmd: CreditsCommand) -> anyhow::Result<()> {
    let store = global.connect().await?;
    match cmd {
        CreditsCommand::Add {
            workspace,
            amount,
            note,
        } => {
            let ws = store
                .workspace_by_name(&workspace)
                .await?
                .ok_or_else(|| anyhow::anyhow!("no workspace named '{workspace}'"))?;
            let ws = store.add_credits(ws.id, amount, note.as_deref()).await?;
            println!("{}", ws.credit_balance.unwrap_or_default());
        }
    }
    Ok(())
}

async fn keys(global: &GlobalArgs, cmd: KeysCommand) -> anyhow::Result<()> {
    let store = global.connect().await?;
    match cmd {
        KeysCommand::Create {
            workspace,
            label,
            scopes,
        } => {
            let name = workspace.trim();
            anyhow::ensure!(!name.is_empty(), "--workspace must not be empty");
            let ws = store.ensure_workspace(name).await?;
            let (_, key) =
                crate::api::keys::issue_key(store.as_ref(), ws.id, label.as_deref(), &scopes)
                    .await?;
            println!("{key}");
        }
        KeysCommand::List { workspace } => {
            let ws = store
                .workspace_by_name(&workspace)
                .await?
                .ok_or_else(|| anyhow::anyhow!("no workspace named '{workspace}'"))?;
            println!(
                "{:<6} {:<12} {:<10} {:<8} {:<26} LABEL",
                "ID", "PREFIX", "STATUS", "SCOPES", "CREATED"
            );
            for key in store.list_api_keys(ws.id).await? {
                let scopes = Scope::join(&key.scopes);
                println!(
                    "{:<6} {:<12} {:<10} {:<8} {:<26} {}",
                    key.id,
                    key.prefix,
                    if key.revoked_at.is_some() {
                        "revoked"
                    } else {
                        "active"
                    },
                    if scopes.is_empty() { "-" } else { &scopes },
                    crate::api::views::rfc3339(key.created_at),
                    key.label.unwrap_or_default()
                );
            }
        }
        KeysCommand::Revoke { workspace, key } => {
            let ws = store
                .workspace_by_name(&workspace)
                .await?
                .ok_or_else(|| anyhow::anyhow!("no workspace named '{workspace}'"))?;
            let revoked = store
                .revoke_api_key(ws.id, &key)
                .await
                .map_err(|e| match e {
                    crate::store::StoreError::NotFound => {
                        anyhow::anyhow!("no key '{key}' in workspace '{workspace}'")
                    }
                    other => other.into(),
                })?;
            println!("revoked {}", revoked.prefix);
        }
    }
    Ok(())
}
