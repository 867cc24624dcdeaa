//! Logging (human-readable by default, JSON with `--log-format json`, level
//! from `RUST_LOG`), traces (exported over OTLP/HTTP when
//! `--otlp-endpoint` is set) and Prometheus metrics.
//!
//! Metric names follow Prometheus conventions (`herald_…_total`,
//! `_seconds`); labels are bounded sets (channel, provider kind, outcome,
//! route template, protocol), never ids.
//!
//! Traces are Herald's own `tracing` spans (a request with its id, a run, a
//! slice of sends and the batches it spans) at info level, whatever
//! `RUST_LOG` says, with the events logged inside them. Like the logs they
//! name keys by prefix only and never carry a phone number.

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{fmt, EnvFilter, Layer as _};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Where traces go: an OTLP/HTTP collector's `http://` or `https://` URL.
/// A URL without a path gets the traces path, `/v1/traces`, as OTLP
/// exporters do with `OTEL_EXPORTER_OTLP_ENDPOINT`; one with a path is used
/// as it is.
#[derive(Clone, PartialEq, Eq)]
pub struct OtlpEndpoint(reqwest::Url);

impl OtlpEndpoint {
    pub fn parse(s: &str) -> Result<Self, String> {
        let refused =
            || "expected an http:// or https:// URL, such as http://localhost:4318".to_owned();
        let mut url = reqwest::Url::parse(s.trim()).map_err(|_| refused())?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
            return Err(refused());
        }
        if url.path() == "/" {
            url.set_path("/v1/traces");
        }
        Ok(Self(url))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// The URL with a password (if any) hidden, for logs and `config check`.
    pub fn redacted(&self) -> String {
        let mut url = self.0.clone();
        if url.password().is_some() {
            let _ = url.set_password(Some("********"));
        }
        url.to_string()
    }
}

/// Redacted too: `Cli` is `Debug`.
impl std::fmt::Debug for OtlpEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("OtlpEndpoint")
            .field(&self.redacted())
            .finish()
    }
}

impl std::fmt::Display for OtlpEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// What `init` started and `shutdown` must stop: the trace pipeline, when
/// there is one.
#[must_use = "call shutdown() so buffered spans are exported before the process exits"]
pub struct Telemetry {
    /// Buffers finished spans and exports them in batches from a task on
    /// the runtime; holds what has not been sent yet.
    traces: Option<SdkTracerProvider>,
}

/// Longest wait for the last spans to be exported at exit.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

impl Telemetry {
    /// Exports the spans still buffered and stops the exporter, waiting at
    /// most `FLUSH_TIMEOUT`, so a clean exit (after SIGTERM's drain too)
    /// loses none. Without an endpoint there is nothing to do.
    pub async fn shutdown(self) {
        let Some(provider) = self.traces else {
            return;
        };
        // The SDK blocks the calling thread until its batch task answers;
        // that task runs on this runtime, so wait on a blocking thread.
        let stopping = tokio::task::spawn_blocking(move || {
            let flushed = provider.force_flush();
            provider.shutdown().and(flushed)
        });
        match tokio::time::timeout(FLUSH_TIMEOUT, stopping).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(err))) => tracing::warn!(error = %err, "exporting the last spans failed"),
            Ok(Err(err)) => tracing::warn!(error = %err, "exporting the last spans failed"),
            Err(_) => tracing::warn!(
                seconds = FLUSH_TIMEOUT.as_secs(),
                "the OTLP collector did not take the last spans in time"
            ),
        }
    }
}

/// Installs the global subscriber: logs on stderr and, with an endpoint,
/// spans exported over OTLP/HTTP (protobuf). Must run inside the tokio
/// runtime, whose task exports the batches.
pub fn init(format: LogFormat, otlp: Option<&OtlpEndpoint>) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = match format {
        LogFormat::Text => fmt::layer().with_writer(std::io::stderr).boxed(),
        LogFormat::Json => fmt::layer().json().with_writer(std::io::stderr).boxed(),
    }
    .with_filter(filter);
    let provider = otlp.map(tracer_provider).transpose()?;
    // Only Herald's spans: the exporter's own HTTP client never traces
    // itself into a loop, and RUST_LOG=warn still exports traces.
    let traces = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("herald"))
            .with_filter(Targets::new().with_target("herald", LevelFilter::INFO))
    });
    let _ = tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init();
    if let Some(endpoint) = otlp {
        tracing::info!(%endpoint, "exporting traces over OTLP");
    }
    Ok(Telemetry { traces: provider })
}

fn tracer_provider(endpoint: &OtlpEndpoint) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(endpoint.as_str())
        // The client is built with this timeout, so a stalled collector
        // cannot hold an export (or the exit) longer.
        .with_timeout(Duration::from_secs(5))
        .build()
        .map_err(|err| anyhow::anyhow!("cannot export traces to {endpoint}: {err}"))?;
    let batches =
        opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("herald")
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(batches)
        .with_resource(resource)
        .build())
}

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
            .set_buckets(&[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ])
            .expect("valid buckets")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (tests build many apps
        // in one process); then this handle just renders an empty page.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_without_a_path_gets_the_traces_path() {
        let parsed = |s: &str| OtlpEndpoint::parse(s).unwrap().as_str().to_owned();
        assert_eq!(
            parsed("http://collector:4318"),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            parsed("http://collector:4318/"),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            parsed(" https://otel.example "),
            "https://otel.example/v1/traces"
        );
        assert_eq!(
            parsed("https://otel.example/custom/traces"),
            "https://otel.example/custom/traces",
            "a path is used as it is"
        );
    }

    #[test]
    fn an_endpoint_must_be_an_http_url() {
        for bad in [
            "notaurl",
            "ftp://x",
            "localhost:4318",
            "http://",
            "file:///tmp/x",
            "",
        ] {
            let err = OtlpEndpoint::parse(bad).unwrap_err();
            assert!(err.contains("an http:// or https:// URL"), "{bad}: {err}");
        }
    }

    #[test]
    fn an_endpoint_password_is_redacted() {
        let endpoint = OtlpEndpoint::parse("https://user:hunter2@otel.example").unwrap();
        assert!(!endpoint.redacted().contains("hunter2"));
        assert!(!endpoint.to_string().contains("hunter2"));
        assert!(!format!("{endpoint:?}").contains("hunter2"));
        assert!(
            endpoint.as_str().contains("hunter2"),
            "the exporter still gets it"
        );
    }
}
