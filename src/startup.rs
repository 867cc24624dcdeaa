//! Building and running the server: [`Application::build`] binds the
//! listener and opens the store, [`Application::run_until_stopped`] serves
//! until a shutdown signal. Tests build the same application on port 0.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiConfig, AppState};
use crate::engine::{Engine, EngineConfig};
use crate::store::{self, Store, StoreOptions};

/// Everything `herald serve` needs to start.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub addr: String,
    pub database_url: String,
    /// Pool size, statement timeout, migrations at start.
    pub store: StoreOptions,
    pub api: ApiConfig,
    /// How long events, executions and metrics are kept.
    pub retention: crate::retention::RetentionConfig,
    /// Create a demo workspace and print its key when the database is new.
    pub demo: bool,
    /// Run workers in this process; `None` serves the API only.
    pub engine: Option<EngineConfig>,
    /// How providers reach this node (Twilio's status callback); defaults
    /// to `http://{addr}`.
    pub public_url: Option<String>,
}

pub struct Application {
    listener: TcpListener,
    state: AppState,
    /// The key printed for a brand-new database's demo workspace.
    demo_key: Option<String>,
    engine: Option<EngineConfig>,
    public_url: String,
    /// Cancelled at shutdown: stops the engine and the stream hub.
    stop: CancellationToken,
}

impl Application {
    pub async fn build(config: ServerConfig) -> anyhow::Result<Self> {
        let store = store::connect(&config.database_url, &config.store)
            .await
            .with_context(|| "opening the database")?;
        let demo_key = if config.demo {
            create_demo_workspace(store.as_ref(), &config).await?
        } else {
            None
        };
        let listener = TcpListener::bind(&config.addr)
            .await
            .with_context(|| format!("binding {}", config.addr))?;
        let public_url = config
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", listener.local_addr().expect("bound")));
        crate::telemetry::metrics();
        let limiter = api::key_limiter(config.api.rate_limit_per_key);
        let stop = CancellationToken::new();
        let hub =
            crate::streams::Hub::start(store.clone(), config.api.streams.coalesce, stop.clone());
        tokio::spawn(crate::retention::purge_loop(
            store.clone(),
            config.retention,
            stop.clone(),
        ));
        let receipts = crate::engine::receipts::ReceiptBatcher::start(store.clone(), hub.clone());
        Ok(Self {
            listener,
            state: AppState {
                store,
                config: Arc::new(config.api),
                engine_wakeup: Arc::new(Notify::new()),
                public_url: public_url.clone().into(),
                hub,
                sockets: Default::default(),
                shutdown: stop.clone(),
                limiter,
                keys: Default::default(),
                receipts,
            },
            demo_key,
            engine: config.engine,
            public_url,
            stop,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    pub fn store(&self) -> Arc<dyn Store> {
        self.state.store.clone()
    }

    pub fn demo_key(&self) -> Option<&str> {
        self.demo_key.as_deref()
    }

    /// Serves (and works runs, when the engine is on) until `shutdown`
    /// completes; then in-flight requests finish and every run in hand is
    /// released for another worker.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let stop = self.stop;
        let grace = self.engine.as_ref().map(|config| config.drain_grace);
        let engine = self.engine.map(|config| {
            let engine = Engine::new(
                self.state.store.clone(),
                config,
                self.public_url.clone(),
                self.state.engine_wakeup.clone(),
                self.state.hub.clone(),
                stop.clone(),
            );
            tokio::spawn(engine.run())
        });
        let header_read_timeout = self.state.config.header_read_timeout;
        let app = api::app(self.state);
        let signal = stop.clone();
        crate::http::serve(self.listener, app, header_read_timeout, async move {
            tokio::select! {
                () = shutdown => {}
                () = signal.cancelled() => {}
            }
            signal.cancel();
        })
        .await;
        stop.cancel();
        if let (Some(engine), Some(grace)) = (engine, grace) {
            match tokio::time::timeout(grace, engine).await {
                Ok(done) => done.context("engine task")?,
                Err(_) => tracing::warn!(
                    grace_seconds = grace.as_secs(),
                    "drain grace period passed with sends in flight; their batches pass to \
                     another worker when the leases expire"
                ),
            }
        }
        Ok(())
    }

    pub fn public_url(&self) -> &str {
        &self.public_url
    }
}

/// On a database with no workspace at all, creates `demo` and a key for it.
async fn create_demo_workspace(
    store: &dyn Store,
    config: &ServerConfig,
) -> anyhow::Result<Option<String>> {
    if store.workspace_count().await? > 0 {
        return Ok(None);
    }
    let workspace = store.ensure_workspace("demo").await?;
    store
        .set_workspace_region(workspace.id, config.api.default_region.code())
        .await?;
    // The operator's own key: every scope, recipients included.
    let (_, key) = api::keys::issue_key(
        store,
        workspace.id,
        Some("demo"),
        &crate::domain::Scope::ALL,
    )
    .await?;
    Ok(Some(key))
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received; shutting down"),
        () = terminate => tracing::info!("SIGTERM received; shutting down"),
    }
}
