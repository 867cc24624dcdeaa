//! Connections that misbehave below HTTP: a client that sends half a
//! request and then nothing (a half-open socket, or a slowloris attack)
//! is cut off after the header-read timeout instead of holding a task and
//! a file descriptor for ever, and other clients are served meanwhile.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::spawn_app_with;

/// Reads until the server closes the connection; returns what it sent.
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return received,
            Ok(n) => received.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    let app = spawn_app_with(|c| c.api.header_read_timeout = Duration::from_secs(1)).await;
    let addr = app.base.trim_start_matches("http://").to_owned();

    // Half a request: the blank line that ends the headers never comes.
    let mut stalled = Vec::new();
    for _ in 0..20 {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: herald\r\nX-Slow: ")
            .await
            .unwrap();
        stalled.push(stream);
    }
    // Meanwhile everyone else is served.
    let healthy = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(healthy.status(), StatusCode::OK);

    let started = Instant::now();
    for stream in &mut stalled {
        let answer = tokio::time::timeout(Duration::from_secs(10), read_until_closed(stream))
            .await
            .expect("the server closes a connection whose headers never end");
        // Closed without a response being served for the half request.
        assert!(
            !String::from_utf8_lossy(&answer).contains("200 OK"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "all twenty were cut off: {:?}",
        started.elapsed()
    );

    // An idle connection that never sent a byte is closed too, and a
    // complete request on a fresh connection still works.
    let mut idle = TcpStream::connect(&addr).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), read_until_closed(&mut idle))
        .await
        .expect("a silent connection is closed");
    let mut fresh = TcpStream::connect(&addr).await.unwrap();
    fresh
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: herald\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until_closed(&mut fresh).await;
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}
