//! Building and running the server: [`Application::build`] binds the
//! listener and opens the store, [`Application::run_until_stopped`] serves
//! until a shutdown signal. Tests build the same application on port 0.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::api::{self, ApiConfig, AppState};
use crate::store::{self, Store};

/// Everything `herald serve` needs to start.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub addr: String,
    pub database_url: String,
    pub api: ApiConfig,
    /// Create a demo workspace and print its key when the database is new.
    pub demo: bool,
}

pub struct Application {
    listener: TcpListener,
    state: AppState,
    /// The key printed for a brand-new database's demo workspace.
    demo_key: Option<String>,
}

impl Application {
    pub async fn build(config: ServerConfig) -> anyhow::Result<Self> {
        let store = store::connect(&config.database_url)
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
        Ok(Self {
            listener,
            state: AppState {
                store,
                config: Arc::new(config.api),
            },
            demo_key,
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

    /// Serves until `shutdown` completes, then lets in-flight requests finish.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let app = api::app(self.state);
        axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .context("serving HTTP")
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
    let (_, key) = api::keys::issue_key(store, workspace.id, Some("demo")).await?;
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
