//! The fan-out benchmark's subscribers: thousands of WebSocket clients
//! that take as little of the machine as they can.
//!
//! They run on the two cores the server they measure runs on. As tokio
//! tasks reading through tokio-tungstenite they took 8.3 µs of CPU per
//! frame, more than the server took to send it (4.9 µs), and a frame's
//! latency counted the time it waited for a client core as much as the
//! server's work. Here a couple of threads each wait on one `epoll` set
//! (mio) for their share of the sockets, read what arrived, and take the
//! frames apart by hand (RFC 6455: a server's frames are unmasked; pings are
//! answered, fragments joined, a close ends the socket), where they were
//! read when they came whole. Only the opening handshake runs on tokio.
//!
//! The reading threads are `SCHED_BATCH`, so that a frame arriving does
//! not preempt the server's sweep (see [`yield_to_the_server_on_wake_up`]):
//! as ordinary threads, the frames they were sent woke them to preempt the
//! sweep and read a handful of sockets, about 14,000 times a second during
//! a run. As batch threads they took 3.6–4.0 µs of CPU a frame against
//! 4.7–5.2, and the server 6.6–7.2 against 7.3–7.9.
//!
//! A subscriber reads `progress_update` frames, notes the `seq` and `ts`
//! each carries (found by key, not parsed: see [`Update::scan`]), when it
//! reached the socket (the kernel's stamp, see [`super::arrival`]: a batch
//! thread may get a core well after) and when it was read, and stops at the
//! one whose status is `completed`.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::arrival::Times;
use super::fanout::Frame;
use super::yield_to_the_server_on_wake_up;

/// Reading threads: one per core the server leaves them.
const THREADS: usize = 2;

/// Subscribers reading `progress_update` frames.
pub(super) struct Subscribers {
    threads: Vec<std::thread::JoinHandle<Vec<Vec<Frame>>>>,
    stop: Arc<AtomicBool>,
    /// One message per subscriber that saw the final status.
    finals: tokio::sync::mpsc::UnboundedReceiver<()>,
    /// How many connected.
    pub open: usize,
}

impl Subscribers {
    /// Waits until every subscriber has seen the final status, or
    /// `patience` has passed; how many saw it.
    pub async fn wait_for_final(&mut self, patience: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + patience;
        let mut seen = 0;
        while seen < self.open {
            match tokio::time::timeout_at(deadline, self.finals.recv()).await {
                Ok(Some(())) => seen += 1,
                _ => break,
            }
        }
        seen
    }

    /// Closes the sockets; what each connected subscriber read.
    pub fn stop(self) -> Vec<Vec<Frame>> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .flat_map(|thread| thread.join().unwrap_or_default())
            .collect()
    }
}

/// Opens `count` WebSocket subscribers to `url` (`ws://host:port/path`,
/// Herald's or the peer's, which send the same frames) and waits until
/// they are connected.
pub(super) async fn open(url: &str, count: usize) -> anyhow::Result<Subscribers> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| anyhow::anyhow!("{url}: only ws:// URLs"))?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (host, path) = (host.to_owned(), path.to_owned());
    let mut connecting = tokio::task::JoinSet::new();
    for n in 0..count {
        let (host, path) = (host.clone(), path.clone());
        connecting.spawn(async move {
            tokio::time::timeout(Duration::from_secs(60), connect(&host, &path)).await?
        });
        // Keep the accept queue from overflowing.
        if n % 500 == 499 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut sockets = Vec::with_capacity(count);
    let mut failed = 0;
    while let Some(joined) = connecting.join_next().await {
        match joined {
            Ok(Ok(socket)) => sockets.push(socket),
            _ => failed += 1,
        }
    }
    if failed > 0 {
        println!("{failed} subscribers could not connect");
    }
    let open = sockets.len();
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, finals) = tokio::sync::mpsc::unbounded_channel();
    let mut threads = Vec::new();
    let share = open.div_ceil(THREADS).max(1);
    while !sockets.is_empty() {
        let mine: Vec<Socket> = sockets.drain(..share.min(sockets.len())).collect();
        let (stop, tx) = (stop.clone(), tx.clone());
        threads.push(
            std::thread::Builder::new()
                .name("subscribers".into())
                .spawn(move || read_all(mine, &stop, &tx))?,
        );
    }
    // Let the server finish with the upgrades before the run starts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(Subscribers {
        threads,
        stop,
        finals,
        open,
    })
}

/// One subscriber's connection and what it read.
struct Socket {
    tcp: mio::net::TcpStream,
    /// Bytes read and not yet taken apart into frames.
    buffer: Vec<u8>,
    /// A fragmented message's payload so far.
    message: Vec<u8>,
    frames: Vec<Frame>,
    /// Saw the final status, or the connection ended.
    done: bool,
}

/// Connects and completes the opening handshake (RFC 6455 §4.1).
async fn connect(host: &str, path: &str) -> anyhow::Result<Socket> {
    use tokio_tungstenite::tungstenite::handshake::{client::generate_key, derive_accept_key};
    let mut tcp = tokio::net::TcpStream::connect(host).await?;
    let key = generate_key();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await?;
    let mut buffer = Vec::with_capacity(1024);
    let end = loop {
        if tcp.read_buf(&mut buffer).await? == 0 {
            anyhow::bail!("closed during the handshake");
        }
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        anyhow::ensure!(buffer.len() < 16 * 1024, "handshake response too long");
    };
    let head = std::str::from_utf8(&buffer[..end])?.to_ascii_lowercase();
    anyhow::ensure!(
        head.starts_with("http/1.1 101"),
        "no upgrade: {}",
        head.lines().next().unwrap_or_default()
    );
    let accept = derive_accept_key(key.as_bytes()).to_ascii_lowercase();
    anyhow::ensure!(
        head.lines()
            .any(|line| line.strip_prefix("sec-websocket-accept:").map(str::trim) == Some(&accept)),
        "wrong Sec-WebSocket-Accept"
    );
    // Frames that came with the response stay in the buffer.
    buffer.drain(..end);
    let tcp = tcp.into_std()?;
    tcp.set_nodelay(true)?;
    super::arrival::stamp_arrivals(&tcp)?;
    Ok(Socket {
        tcp: mio::net::TcpStream::from_std(tcp),
        buffer,
        message: Vec::new(),
        frames: Vec::new(),
        done: false,
    })
}

/// One thread's share of the subscribers, read until `stop`; what each read.
fn read_all(
    mut sockets: Vec<Socket>,
    stop: &AtomicBool,
    finals: &tokio::sync::mpsc::UnboundedSender<()>,
) -> Vec<Vec<Frame>> {
    yield_to_the_server_on_wake_up();
    let Ok(mut poll) = mio::Poll::new() else {
        return Vec::new();
    };
    for (token, socket) in sockets.iter_mut().enumerate() {
        let registered =
            poll.registry()
                .register(&mut socket.tcp, mio::Token(token), mio::Interest::READABLE);
        if registered.is_err() {
            socket.done = true;
        }
    }
    // Frames that arrived with the handshake.
    for socket in &mut sockets {
        socket.take_buffered_frames(Times::read_now(None), finals);
    }
    let mut events = mio::Events::with_capacity(1024);
    let mut chunk = vec![0u8; 16 * 1024];
    while !stop.load(Ordering::Relaxed) {
        if let Err(e) = poll.poll(&mut events, Some(Duration::from_millis(50))) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        for event in &events {
            let socket = &mut sockets[event.token().0];
            if socket.done {
                continue;
            }
            socket.read_ready(&mut chunk, finals);
            if socket.done {
                let _ = poll.registry().deregister(&mut socket.tcp);
            }
        }
    }
    sockets.into_iter().map(|socket| socket.frames).collect()
}

impl Socket {
    /// Reads what arrived and takes the frames in it.
    fn read_ready(&mut self, chunk: &mut [u8], finals: &tokio::sync::mpsc::UnboundedSender<()>) {
        loop {
            match super::arrival::read_stamped(&self.tcp, chunk) {
                Ok((0, _)) => {
                    self.done = true;
                    return;
                }
                Ok((n, stamp)) => {
                    let times = Times::read_now(stamp);
                    if self.buffer.is_empty() {
                        // Usually whole frames: taken where they were read,
                        // and only a frame's unread rest is kept.
                        let taken = self.take_frames(&chunk[..n], times, finals);
                        self.buffer.extend_from_slice(&chunk[taken..n]);
                    } else {
                        self.buffer.extend_from_slice(&chunk[..n]);
                        self.take_buffered_frames(times, finals);
                    }
                    // A short read emptied the socket: the next arrival
                    // raises a new edge, so no read just to see WouldBlock.
                    if n < chunk.len() || self.done {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.done = true;
                    return;
                }
            }
        }
    }

    /// Takes every whole frame off the front of the buffer.
    fn take_buffered_frames(
        &mut self,
        times: Times,
        finals: &tokio::sync::mpsc::UnboundedSender<()>,
    ) {
        let mut buffer = std::mem::take(&mut self.buffer);
        let taken = self.take_frames(&buffer, times, finals);
        buffer.drain(..taken);
        self.buffer = buffer;
    }

    /// Takes the whole frames at the front of `bytes`; how many bytes they
    /// were.
    fn take_frames(
        &mut self,
        bytes: &[u8],
        times: Times,
        finals: &tokio::sync::mpsc::UnboundedSender<()>,
    ) -> usize {
        let mut at = 0;
        while !self.done {
            let Some((header, opcode, fin, len)) = frame_header(&bytes[at..]) else {
                break;
            };
            let Some(payload) = bytes.get(at + header..at + header + len) else {
                break;
            };
            match opcode {
                // Text, or the continuation of a fragmented one.
                0x1 | 0x0 => {
                    if fin && self.message.is_empty() {
                        self.frames_read(payload, times, finals);
                    } else {
                        self.message.extend_from_slice(payload);
                        if fin {
                            let message = std::mem::take(&mut self.message);
                            self.frames_read(&message, times, finals);
                        }
                    }
                }
                0x8 => self.done = true,
                0x9 => {
                    let pong = masked_frame(0xA, payload);
                    let _ = self.tcp.write_all(&pong);
                }
                _ => {}
            }
            at += header + len;
        }
        at
    }

    /// Notes a `progress_update` message; the final status ends the socket.
    fn frames_read(
        &mut self,
        payload: &[u8],
        times: Times,
        finals: &tokio::sync::mpsc::UnboundedSender<()>,
    ) {
        let Some(update) = Update::scan(payload) else {
            return;
        };
        if let (Some(seq), Some(committed)) = (update.seq, update.ts) {
            self.frames.push(Frame {
                seq,
                committed,
                arrived: times.arrived,
                read: times.read,
            });
        }
        if update.completed {
            let _ = finals.send(());
            self.done = true;
        }
    }
}

/// What a subscriber needs of a `progress_update` message.
#[derive(Debug, PartialEq)]
struct Update {
    seq: Option<i64>,
    /// When the event it carries was committed (Unix ms).
    ts: Option<f64>,
    /// Its status is `completed`.
    completed: bool,
}

impl Update {
    /// Finds the fields by their keys instead of parsing the message: the
    /// parse was a sixth of the subscribers' CPU, which the server they
    /// measure shares the cores with. Seed 000's `progress_update` has
    /// each of these keys once (`status` inside `data`), and no string
    /// that could hold one. `None` for any other message.
    fn scan(payload: &[u8]) -> Option<Update> {
        if string_after(payload, b"\"type\"")? != b"progress_update" {
            return None;
        }
        let number = |key: &[u8]| {
            let value = value_after(payload, key)?;
            let end = value
                .iter()
                .position(|b| !matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
                .unwrap_or(value.len());
            std::str::from_utf8(&value[..end]).ok()
        };
        Some(Update {
            seq: number(b"\"seq\"").and_then(|n| n.parse().ok()),
            ts: number(b"\"ts\"").and_then(|n| n.parse().ok()),
            completed: string_after(payload, b"\"status\"") == Some(b"completed"),
        })
    }
}

/// The JSON value after `key` (quoted) and its colon.
fn value_after<'a>(payload: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let at = memchr::memmem::find(payload, key)? + key.len();
    let value = payload[at..].trim_ascii_start().strip_prefix(b":")?;
    Some(value.trim_ascii_start())
}

/// The string after `key`, unquoted (none of the ones read has escapes).
fn string_after<'a>(payload: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let value = value_after(payload, key)?.strip_prefix(b"\"")?;
    Some(&value[..memchr::memchr(b'"', value)?])
}

/// A frame's header length, opcode, FIN bit and payload length, once the
/// header is all in `bytes`.
fn frame_header(bytes: &[u8]) -> Option<(usize, u8, bool, usize)> {
    let (&first, &second) = (bytes.first()?, bytes.get(1)?);
    let masked = second & 0x80 != 0;
    let (header, len) = match second & 0x7F {
        126 => (
            4,
            u16::from_be_bytes(bytes.get(2..4)?.try_into().ok()?) as usize,
        ),
        127 => (
            10,
            u64::from_be_bytes(bytes.get(2..10)?.try_into().ok()?) as usize,
        ),
        len => (2, len as usize),
    };
    // A server never masks its frames; were one masked, its key is skipped
    // (the payload is then not readable, and is ignored as not JSON).
    let header = header + if masked { 4 } else { 0 };
    (bytes.len() >= header).then_some((header, first & 0x0F, first & 0x80 != 0, len))
}

/// A client's frame: masked, as RFC 6455 requires of clients.
fn masked_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask: [u8; 4] = rand::random();
    let mut frame = vec![0x80 | opcode, 0x80 | payload.len().min(125) as u8];
    frame.extend_from_slice(&mask);
    frame.extend(
        payload
            .iter()
            .take(125)
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4]),
    );
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_of_every_length_form_and_partial_headers() {
        let server = |payload: &[u8]| crate::streams::outbox::text_frame(payload);
        for len in [0, 125, 126, 65_535, 65_536] {
            let frame = server(&vec![b'a'; len]);
            let (header, opcode, fin, read) = frame_header(&frame).unwrap();
            assert_eq!(
                (header + read, opcode, fin, read),
                (frame.len(), 1, true, len)
            );
            // Cut inside the header: not yet readable.
            assert!(frame_header(&frame[..header - 1]).is_none());
        }
    }

    #[test]
    fn a_pong_is_masked_and_unmasks_to_the_ping() {
        let pong = masked_frame(0xA, b"hello");
        let (header, opcode, fin, len) = frame_header(&pong).unwrap();
        assert_eq!((header, opcode, fin, len), (6, 0xA, true, 5));
        let mask = &pong[2..6];
        let unmasked: Vec<u8> = pong[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        assert_eq!(unmasked, b"hello");
    }

    #[test]
    fn an_update_is_read_from_herald_and_python_spacing_and_anything_else_is_not() {
        let herald = br#"{"type":"progress_update","data":{"campaign_id":7,"status":"running","progress":{"total_contacts":10}},"seq":12,"ts":1764625200123}"#;
        assert_eq!(
            Update::scan(herald),
            Some(Update {
                seq: Some(12),
                ts: Some(1764625200123.0),
                completed: false
            })
        );
        let python =
            br#"{"type": "progress_update", "data": {"status": "completed"}, "seq": 3, "ts": 1.5}"#;
        assert_eq!(
            Update::scan(python),
            Some(Update {
                seq: Some(3),
                ts: Some(1.5),
                completed: true
            })
        );
        let no_time =
            br#"{"type":"progress_update","data":{"status":"running"},"seq":4,"ts":null}"#;
        assert_eq!(
            Update::scan(no_time).map(|u| (u.seq, u.ts)),
            Some((Some(4), None))
        );
        assert_eq!(Update::scan(br#"{"type":"pong","seq":1,"ts":2}"#), None);
        assert_eq!(Update::scan(b"not json"), None);
    }

    #[tokio::test]
    async fn subscribers_read_fragments_answer_pings_and_stop_at_the_final_status() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/progress", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
            use futures::{SinkExt, StreamExt};
            use tokio_tungstenite::tungstenite::Message;
            let update = |seq: i64, status: &str| {
                serde_json::json!({"type": "progress_update", "seq": seq, "ts": 1.5,
                                   "data": {"status": status}})
                .to_string()
            };
            ws.send(Message::text(update(1, "running"))).await.unwrap();
            ws.send(Message::Ping(b"are you there".to_vec().into()))
                .await
                .unwrap();
            let pong = ws.next().await.unwrap().unwrap();
            // A message in two fragments, then the final status.
            let text = update(2, "running");
            let (first, second) = text.split_at(10);
            let raw = ws.get_mut();
            let fragment = |opcode: u8, payload: &[u8]| {
                let mut frame = vec![opcode, payload.len() as u8];
                frame.extend_from_slice(payload);
                frame
            };
            raw.write_all(&fragment(0x01, first.as_bytes()))
                .await
                .unwrap();
            raw.write_all(&fragment(0x80, second.as_bytes()))
                .await
                .unwrap();
            ws.send(Message::text(update(3, "completed")))
                .await
                .unwrap();
            // Held open: the subscriber stops by itself.
            tokio::time::sleep(Duration::from_secs(1)).await;
            pong
        });
        let mut subscribers = open(&url, 1).await.unwrap();
        assert_eq!(subscribers.open, 1);
        let finished = subscribers.wait_for_final(Duration::from_secs(10)).await;
        assert_eq!(finished, 1);
        let read = subscribers.stop();
        let seqs: Vec<i64> = read[0].iter().map(|f| f.seq).collect();
        assert_eq!(seqs, [1, 2, 3]);
        assert!(read[0]
            .iter()
            .all(|f| f.committed == 1.5 && f.arrived > 0.0));
        let pong = server.await.unwrap();
        assert_eq!(
            pong,
            tokio_tungstenite::tungstenite::Message::Pong(b"are you there".to_vec().into())
        );
    }
}
