//! The WebSocket handshake (RFC 6455), done here rather than by axum's
//! `WebSocketUpgrade` so that Herald keeps the connection's TCP stream:
//! the hub's fan-out writes frames to it directly (`streams::outbox`),
//! which hyper's type-erased `Upgraded` would not allow.

use std::future::Future;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::{header, request::Parts, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto::upgrade::downcast;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

use super::ApiError;
use crate::streams::outbox::{Conn, Outbox};

/// An open WebSocket whose writes share the outbox's queue.
pub type Socket = WebSocketStream<Conn>;

/// A validated WebSocket upgrade request.
pub struct WsUpgrade {
    on_upgrade: hyper::upgrade::OnUpgrade,
    accept: String,
    config: WebSocketConfig,
}

fn header_has(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim().eq_ignore_ascii_case(token))
}

impl<S: Send + Sync> FromRequestParts<S> for WsUpgrade {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let bad = |field: &str, message: &str| ApiError::bad_request(Some(field), message);
        if parts.method != Method::GET {
            return Err(bad("method", "a WebSocket upgrade is a GET request"));
        }
        if !header_has(&parts.headers, header::CONNECTION, "upgrade") {
            return Err(bad(
                "Connection",
                "the Connection header must include 'upgrade' (this is a WebSocket endpoint)",
            ));
        }
        if !header_has(&parts.headers, header::UPGRADE, "websocket") {
            return Err(bad(
                "Upgrade",
                "the Upgrade header must be 'websocket' (this is a WebSocket endpoint)",
            ));
        }
        if parts
            .headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_none_or(|v| v != "13")
        {
            return Err(bad(
                "Sec-WebSocket-Version",
                "the WebSocket version must be 13",
            ));
        }
        let Some(key) = parts.headers.get(header::SEC_WEBSOCKET_KEY) else {
            return Err(bad(
                "Sec-WebSocket-Key",
                "the Sec-WebSocket-Key header is missing",
            ));
        };
        let accept = derive_accept_key(key.as_bytes());
        let Some(on_upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
            return Err(bad(
                "Upgrade",
                "this connection cannot be upgraded: WebSockets are HTTP/1.1 upgrades",
            ));
        };
        Ok(Self {
            on_upgrade,
            accept,
            config: WebSocketConfig::default(),
        })
    }
}

impl WsUpgrade {
    /// Sets the socket's buffer sizes and message limit (see
    /// `api::ws::upgrade` for why they are small).
    pub fn config(mut self, config: WebSocketConfig) -> Self {
        self.config = config;
        self
    }

    /// Answers 101 and, once the connection is switched, runs `serve` on the
    /// socket.
    pub fn on_upgrade<F, Fut>(self, serve: F) -> Response
    where
        F: FnOnce(Socket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.on_upgrade_with(Outbox::new(), serve)
    }

    /// [`WsUpgrade::on_upgrade`] with the socket's writing side made
    /// beforehand, so that a subscription to the fan-out can start first.
    pub fn on_upgrade_with<F, Fut>(self, outbox: Arc<Outbox>, serve: F) -> Response
    where
        F: FnOnce(Socket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Self {
            on_upgrade,
            accept,
            config,
        } = self;
        tokio::spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(error) => {
                    tracing::debug!(%error, "WebSocket upgrade failed");
                    return outbox.close();
                }
            };
            // Herald's accept loop serves TCP streams (`http.rs`).
            let (conn, read_ahead) = match downcast::<TokioIo<TcpStream>>(upgraded) {
                // The parts go out of scope here: their read buffer shares
                // hyper's whole connection buffer, which kept for the
                // socket's life cost about 7 KiB a connection.
                Ok(parts) => (
                    outbox.attach(parts.io.into_inner()),
                    parts.read_buf.to_vec(),
                ),
                Err(_) => {
                    tracing::error!("a WebSocket upgrade not over a TCP stream");
                    return outbox.close();
                }
            };
            let socket =
                WebSocketStream::from_partially_read(conn, read_ahead, Role::Server, Some(config))
                    .await;
            serve(socket).await;
        });
        (
            StatusCode::SWITCHING_PROTOCOLS,
            [
                (header::CONNECTION, HeaderValue::from_static("upgrade")),
                (header::UPGRADE, HeaderValue::from_static("websocket")),
                (
                    header::SEC_WEBSOCKET_ACCEPT,
                    HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
                ),
            ],
        )
            .into_response()
    }
}
