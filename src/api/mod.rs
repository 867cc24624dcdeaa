//! The HTTP layer: routers per area, merged in [`app`].
//!
//! Handlers parse requests into domain values, call the [`Store`], and turn
//! results into JSON. They never run SQL and never hold a transaction.
//!
//! [`Store`]: crate::store::Store

pub mod briq;
pub mod burki;
pub mod campaigns;
pub mod contacts;
pub mod error;
pub mod events;
pub mod extract;
pub mod health;
pub mod key_cache;
pub mod keys;
pub mod runs;
pub mod upgrade;
pub mod views;
pub mod ws;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, Request};
use axum::routing::get;
use axum::{Json, Router};
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

pub use error::{ApiError, ErrorBody};

use crate::domain::Region;
use crate::store::Store;

/// Settings the handlers read on every request.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Largest JSON body accepted; larger ones get 413.
    pub max_body_bytes: usize,
    /// Largest CSV upload accepted; checked while streaming.
    pub max_import_bytes: usize,
    /// Region for workspaces created without one.
    pub default_region: Region,
    pub streams: StreamConfig,
    /// REST requests per second per API key (bursts of twice that); 0 = off.
    pub rate_limit_per_key: u32,
    /// Origins allowed to call the API from a browser; empty = CORS off.
    pub cors_origins: Vec<String>,
    /// How long a client may take to send a request's headers before its
    /// connection is closed (half-open sockets, slowloris).
    pub header_read_timeout: Duration,
}

/// Limits and timings of the live streams.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// At most one progress frame per campaign per this window.
    pub coalesce: Duration,
    /// WebSocket ping frames (seed 004 documents 30 s).
    pub ping_interval: Duration,
    /// Seed 004 sockets close after this long without campaign activity.
    pub idle_timeout: Duration,
    /// Simultaneous seed-004 sockets per API key.
    pub max_sockets_per_key: usize,
    /// Largest message a client may send.
    pub max_client_message_bytes: usize,
    /// Messages a client may send per second, per socket (bursts of twice
    /// that): a flood costs the server one rate check per message.
    pub client_messages_per_second: u32,
    /// A client that does not take a frame within this is disconnected.
    pub send_timeout: Duration,
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            coalesce: Duration::from_millis(250),
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(600),
            max_sockets_per_key: 10,
            max_client_message_bytes: 16 * 1024,
            client_messages_per_second: 20,
            send_timeout: Duration::from_secs(10),
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 10 * 1024 * 1024,
            max_import_bytes: 1024 * 1024 * 1024,
            default_region: Region::default(),
            streams: StreamConfig::default(),
            rate_limit_per_key: 1000,
            cors_origins: Vec::new(),
            // Hyper's own default, were it given a timer.
            header_read_timeout: Duration::from_secs(30),
        }
    }
}

/// Shared by every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub config: Arc<ApiConfig>,
    /// Poked after a campaign changes so a worker looks for due runs now.
    pub engine_wakeup: Arc<tokio::sync::Notify>,
    /// How providers reach this node; callbacks are signed against it.
    pub public_url: Arc<str>,
    /// Live event fan-out; told after every write that appends events.
    pub hub: crate::streams::Hub,
    /// Open WebSockets per API key, for the per-key limit.
    pub sockets: Arc<std::sync::Mutex<std::collections::HashMap<i64, usize>>>,
    /// Cancelled when the node shuts down: streams close with 1001.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Per-key request budget for the REST API.
    pub limiter: Option<Arc<KeyedLimiter>>,
    /// Recently seen API keys; see [`key_cache`].
    pub keys: Arc<key_cache::KeyCache>,
    /// Writes providers' delivery callbacks by group commit.
    pub receipts: crate::engine::receipts::ReceiptBatcher,
}

pub type KeyedLimiter = governor::DefaultKeyedRateLimiter<i64>;

/// Builds the per-key limiter from the configured rate.
pub fn key_limiter(per_second: u32) -> Option<Arc<KeyedLimiter>> {
    let rate = std::num::NonZeroU32::new(per_second)?;
    let burst = rate.saturating_mul(std::num::NonZeroU32::new(2).expect("2 > 0"));
    Some(Arc::new(governor::RateLimiter::keyed(
        governor::Quota::per_second(rate).allow_burst(burst),
    )))
}

impl AppState {
    /// Publishes a campaign's new events to live subscribers.
    pub fn published(&self, campaign: &crate::store::Campaign) {
        self.hub.notify(campaign.id, campaign.workspace_id);
    }
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The whole HTTP application, without a listener, so tests can drive it.
pub fn app(state: AppState) -> Router {
    let max_body = state.config.max_body_bytes;
    let cors = cors_layer(&state.config.cors_origins);
    Router::new()
        .merge(health::router())
        .merge(campaigns::router())
        .merge(contacts::router())
        .merge(keys::router())
        .merge(runs::router())
        .merge(burki::router())
        .merge(briq::router())
        .merge(ws::router())
        .merge(events::router())
        .merge(crate::web::router())
        .route("/openapi.json", get(openapi_json))
        .route("/metrics", get(metrics_text))
        .fallback(|| async { ApiError::NotFound("route".into()) })
        .with_state(state)
        .layer(axum::middleware::from_fn(track_request))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(
            TraceLayer::new_for_http().make_span_with(|request: &Request<_>| {
                let id = request
                    .headers()
                    .get(REQUEST_ID)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-");
                tracing::info_span!("http", method = %request.method(), path = %request.uri().path(), request_id = %id)
            }),
        )
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeBriqRequestId))
        .layer(cors)
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(600),
        ))
}

/// CORS is off unless origins are configured; then browsers on those
/// origins may call the API with a key header.
fn cors_layer(origins: &[String]) -> tower_http::cors::CorsLayer {
    use axum::http::{header, HeaderValue, Method};
    let allowed: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o.trim()).ok())
        .collect();
    if allowed.is_empty() {
        return tower_http::cors::CorsLayer::new();
    }
    tower_http::cors::CorsLayer::new()
        .allow_origin(allowed)
        .allow_methods([Method::GET, Method::POST, Method::PATCH, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("x-api-key"),
            HeaderName::from_static("last-event-id"),
        ])
        .max_age(Duration::from_secs(600))
}

/// Request ids look like Briq's (`req_…`), since seed 002 echoes them.
#[derive(Clone, Copy)]
struct MakeBriqRequestId;

impl MakeRequestId for MakeBriqRequestId {
    fn make_request_id<B>(&mut self, _: &Request<B>) -> Option<RequestId> {
        let id = format!("req_{}", uuid::Uuid::new_v4().simple());
        axum::http::HeaderValue::from_str(&id)
            .ok()
            .map(RequestId::new)
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Herald", description = "Self-hosted campaign engine with live progress streaming."),
    paths(
        health::healthz, health::readyz,
        campaigns::create, campaigns::list, campaigns::show, campaigns::update,
        campaigns::delete_campaign, campaigns::schedule, campaigns::start,
        campaigns::pause, campaigns::resume, campaigns::cancel,
        contacts::add, contacts::import_csv, contacts::list,
        keys::create, keys::list, keys::revoke, keys::show_workspace, keys::update_workspace,
        runs::create_run, runs::list_runs, runs::credits, runs::twilio_status,
        burki::executions,
        briq::status, briq::analytics, briq::run_detail, briq::snapshot,
        events::post, events::stream,
    ),
    components(schemas(ErrorBody, error::ErrorDetail)),
    modifiers(&SecuritySchemes),
    tags(
        (name = "campaigns", description = "Create and drive campaigns"),
        (name = "contacts", description = "Recipients of a campaign"),
        (name = "keys", description = "The workspace and its API keys"),
        (name = "health", description = "Probes"),
        (name = "seed-001", description = "Burki-compatible executions list"),
        (name = "seed-002", description = "Briq-compatible status, analytics and runs"),
        (name = "providers", description = "Provider callbacks"),
        (name = "streams", description = "Campaign events: producer posts and SSE"),
    )
)]
pub struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))),
        );
    }
}

/// Prometheus text exposition of this process's metrics; pool gauges are
/// read at scrape time.
async fn metrics_text(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> impl axum::response::IntoResponse {
    for usage in state.store.pool_usage() {
        let pool = usage.pool;
        metrics::gauge!("herald_db_connections", "pool" => pool, "state" => "in_use")
            .set(f64::from(usage.in_use));
        metrics::gauge!("herald_db_connections", "pool" => pool, "state" => "idle")
            .set(f64::from(usage.idle));
        metrics::gauge!("herald_db_connections_max", "pool" => pool).set(f64::from(usage.max));
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        crate::telemetry::metrics().render(),
    )
}

/// Counts requests by method, route template and status, and times them.
async fn track_request(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let started = std::time::Instant::now();
    let method = request.method().as_str().to_owned();
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("herald_http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("herald_http_request_duration_seconds", "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
