//! The HTTP accept loop: axum's router served over HTTP/1.1 (with
//! WebSocket upgrades, see `api::upgrade`) and HTTP/2 by hyper, with the
//! timeouts `axum::serve` leaves out.
//!
//! Hyper enforces a header-read timeout only when it is given a timer, and
//! `axum::serve` gives it none: a client that opens a connection and sends
//! half a request — a half-open socket, or a slowloris attack — would hold
//! a task and a file descriptor for ever. Here every connection has until
//! [`ApiConfig::header_read_timeout`] to send its first byte, and then as
//! long again to finish each request's headers (also the longest a
//! keep-alive connection may sit idle between requests).
//!
//! [`ApiConfig::header_read_timeout`]: crate::api::ApiConfig::header_read_timeout

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::ServiceExt;

/// Serves `app` on `listener` until `shutdown` completes; then stops
/// accepting, lets each connection finish its request in hand, and returns
/// once every connection has closed (live streams close themselves on the
/// same shutdown signal).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    header_read_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                // A connection reset before it was accepted: the client's
                // business.
                Err(err) if is_connection_error(&err) => continue,
                Err(err) => {
                    // Out of file descriptors, most likely: back off for a
                    // second, as axum::serve does, instead of spinning.
                    tracing::error!(error = %err, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Small frames (progress events, short JSON) go out at once.
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone().map_request(
            |req: axum::http::Request<hyper::body::Incoming>| req.map(axum::body::Body::new),
        ));
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            // Hyper's timer starts once it reads an HTTP/1 request; telling
            // HTTP/1 from HTTP/2 comes before that and waits for a first
            // byte with no limit, so a silent connection is timed here.
            let mut first = [0u8; 1];
            match tokio::time::timeout(header_read_timeout, stream.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return, // silent, or closed before a byte came
            }
            let connection = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .into_owned();
            if let Err(err) = watcher.watch(connection).await {
                // Timeouts and resets are the client's business.
                tracing::debug!(%peer, error = %err, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

fn is_connection_error(err: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(
        err.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}
