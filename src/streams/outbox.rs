//! A WebSocket connection's writing side, shared by the socket's own task
//! and the hub's fan-out.
//!
//! Ten thousand subscribers of one campaign used to mean ten thousand tasks
//! woken for every frame: each took its event from a broadcast channel,
//! encoded the frame and wrote it, and about half of the server's CPU per
//! frame was that machinery rather than the kernel's `send`. Now the hub's
//! fan-out ([`super::fanout`]) writes the frame, encoded once, straight to
//! each idle socket with a non-blocking `try_write`, and wakes a socket's
//! task only when the socket could not take it all.
//!
//! Both writers go through one ordered queue of whole frames, so their bytes
//! never interleave: whoever finds the queue empty may write; anyone else
//! appends, and the socket's task drains the queue as the socket becomes
//! writable ([`Conn`]'s `poll_flush`). tungstenite writes through [`Conn`]
//! like any stream, so pings, replies and close frames take the same queue.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// What became of a live frame offered to a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    /// Written, or kept for the socket's task to write.
    Sent,
    /// The socket was sent this log position, or a newer one, already.
    Had,
    /// The socket is closed: forget it.
    Gone,
}

/// One connection's writing side (see the module docs).
pub struct Outbox {
    queue: Mutex<Queue>,
    /// Tells the socket's task that frames wait in the queue.
    waiting: Notify,
}

#[derive(Default)]
struct Queue {
    /// Set once the HTTP upgrade completes (a subscription starts before it,
    /// so that no event is missed, and live frames wait until then); taken
    /// when the socket's task ends, which closes the connection at once.
    tcp: Option<TcpStream>,
    /// Whole frames in order; the first may be partly written already.
    frames: VecDeque<Queued>,
    /// Bytes of the first frame already written.
    head_written: usize,
    /// Live frames wait in `held` until the socket's task has sent what
    /// comes before them (the initial snapshot, a replay).
    paused: bool,
    held: Option<(i64, Bytes)>,
    /// The newest log position sent; older live frames are skipped.
    sent_seq: i64,
    closed: bool,
}

struct Queued {
    bytes: Bytes,
    /// A live snapshot a newer one may replace while it waits unwritten.
    live: bool,
}

impl Outbox {
    /// A paused outbox: live frames wait for [`Outbox::resume`].
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            queue: Mutex::new(Queue {
                paused: true,
                ..Queue::default()
            }),
            waiting: Notify::new(),
        })
    }

    /// Connects the outbox to its socket, once the upgrade has completed.
    pub fn attach(self: &Arc<Self>, tcp: TcpStream) -> Conn {
        self.lock().tcp = Some(tcp);
        Conn(self.clone())
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Offers a live frame (a whole, encoded WebSocket frame) carrying log
    /// position `seq`. Every live frame is a snapshot of the campaign's
    /// state, so one still waiting is replaced by a newer one: a socket
    /// that falls behind gets the current state, not the backlog.
    pub fn offer(&self, seq: i64, frame: &Bytes) -> Offered {
        let mut queue = self.lock();
        if queue.closed {
            return Offered::Gone;
        }
        if queue.paused {
            if queue.held.as_ref().is_none_or(|(held, _)| *held < seq) {
                queue.held = Some((seq, frame.clone()));
            }
            return Offered::Sent;
        }
        if seq <= queue.sent_seq {
            return Offered::Had;
        }
        queue.sent_seq = seq;
        match self.write_live(queue, frame) {
            Ok(()) => Offered::Sent,
            Err(_) => Offered::Gone,
        }
    }

    /// The socket's task has sent everything up to `sent_seq`: live frames
    /// flow from here on, starting with the newest one held meanwhile.
    pub fn resume(&self, sent_seq: i64) {
        let mut queue = self.lock();
        queue.paused = false;
        queue.sent_seq = queue.sent_seq.max(sent_seq);
        if let Some((seq, frame)) = queue.held.take() {
            if seq > queue.sent_seq {
                queue.sent_seq = seq;
                queue.enqueue(frame, 0, true);
            }
        }
        let waiting = !queue.frames.is_empty();
        drop(queue);
        if waiting {
            self.waiting.notify_one();
        }
    }

    /// The newest log position written or queued to the socket.
    #[cfg(test)]
    pub(in crate::streams) fn sent_seq(&self) -> i64 {
        self.lock().sent_seq
    }

    /// The socket's task sent a snapshot as of `seq` itself (a fresh update
    /// it was asked for): live frames no newer are skipped.
    pub fn sent(&self, seq: i64) {
        let mut queue = self.lock();
        queue.sent_seq = queue.sent_seq.max(seq);
    }

    /// Writes a snapshot as of `seq` that the socket's task read itself (the
    /// reply to a client's `request_update`), unless a newer frame went out
    /// meanwhile: the task read the store after the request came, so a newer
    /// frame was sent after the request and answers it, and this one would
    /// take the client back in time. `Ok(false)` when skipped.
    pub fn reply(&self, seq: i64, frame: Bytes) -> io::Result<bool> {
        let mut queue = self.lock();
        if seq < queue.sent_seq {
            return Ok(false);
        }
        queue.sent_seq = seq;
        self.write_live(queue, &frame)?;
        Ok(true)
    }

    /// Writes a live frame, or queues it and wakes the socket's task to
    /// write it; after an error the task is woken too, to end.
    fn write_live(&self, mut queue: MutexGuard<'_, Queue>, frame: &Bytes) -> io::Result<()> {
        let written = queue.write_or_queue(frame, || frame.clone(), true);
        drop(queue);
        if !matches!(written, Ok(false)) {
            self.waiting.notify_one();
        }
        written.map(|_| ())
    }

    /// Completes when frames wait for the socket's task to write them.
    pub async fn frames_waiting(&self) {
        self.waiting.notified().await;
    }

    /// Closes the connection; the fan-out forgets the outbox at its next
    /// frame.
    pub fn close(&self) {
        self.lock().close();
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }
}

impl Queue {
    fn close(&mut self) {
        self.closed = true;
        self.tcp = None;
        self.frames.clear();
        self.held = None;
    }

    /// Writes `bytes` (one whole frame, or whatever tungstenite hands over)
    /// at once when nothing waits before them and the socket takes them all;
    /// otherwise queues them whole, made by `to_owned`, with what went out
    /// marked written. `Ok(true)` when something was queued; an error
    /// closes the connection.
    fn write_or_queue(
        &mut self,
        bytes: &[u8],
        to_owned: impl FnOnce() -> Bytes,
        live: bool,
    ) -> io::Result<bool> {
        let Some(tcp) = &self.tcp else {
            return Err(io::ErrorKind::BrokenPipe.into());
        };
        let written = if self.frames.is_empty() {
            match tcp.try_write(bytes) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => {
                    self.close();
                    return Err(e);
                }
            }
        } else {
            0
        };
        if written == bytes.len() {
            return Ok(false);
        }
        self.enqueue(to_owned(), written, live);
        Ok(true)
    }

    /// Appends a frame of which `written` bytes went out (only ever the
    /// first in the queue); a live one replaces a live one that waits with
    /// none of it written.
    fn enqueue(&mut self, bytes: Bytes, written: usize, live: bool) {
        if self.frames.is_empty() {
            self.head_written = written;
        } else if live {
            let untouched = |at: usize| at > 0 || self.head_written == 0;
            if let Some(at) = self
                .frames
                .iter()
                .rposition(|q| q.live)
                .filter(|&at| untouched(at))
            {
                metrics::counter!("herald_stream_frames_coalesced_total").increment(1);
                self.frames.remove(at);
            }
        }
        self.frames.push_back(Queued { bytes, live });
    }
}

/// The socket's own task's view of its connection: reads straight from the
/// TCP stream, writes through the outbox's queue. tungstenite runs on it.
pub struct Conn(Arc<Outbox>);

fn broken_pipe<T>() -> Poll<io::Result<T>> {
    Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))
}

impl Conn {
    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.0
    }

    /// Writes what waits in the queue until it is empty or the socket is
    /// full (then `Pending`, woken when it is writable again).
    fn poll_drain(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut queue = self.0.lock();
            let Queue {
                tcp: Some(tcp),
                frames,
                head_written,
                ..
            } = &mut *queue
            else {
                return broken_pipe();
            };
            let Some(head) = frames.front() else {
                return Poll::Ready(Ok(()));
            };
            match tcp.try_write(&head.bytes[*head_written..]) {
                Ok(n) if n == head.bytes.len() - *head_written => {
                    frames.pop_front();
                    *head_written = 0;
                }
                Ok(n) => *head_written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(tcp.poll_write_ready(cx))?;
                }
                Err(e) => {
                    queue.close();
                    return Poll::Ready(Err(e));
                }
            }
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let queue = self.0.lock();
            let Some(tcp) = &queue.tcp else {
                return broken_pipe();
            };
            ready!(tcp.poll_read_ready(cx))?;
            match tcp.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for Conn {
    /// Takes all of `buf`: written at once when nothing waits and the
    /// socket has room, queued otherwise (whole, so a live frame never lands
    /// inside it). `poll_flush` writes the queue out.
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut queue = self.0.lock();
        queue.write_or_queue(buf, || Bytes::copy_from_slice(buf), false)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_drain(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The socket closes when the outbox is dropped.
        self.poll_drain(cx)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Encodes `payload` as one unmasked WebSocket text frame (a server's).
pub fn text_frame(payload: &[u8]) -> Bytes {
    let len = payload.len();
    let mut frame = Vec::with_capacity(len + 10);
    frame.push(0x81); // FIN, text
    match len {
        0..=125 => frame.push(len as u8),
        126..=0xFFFF => {
            frame.push(126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            frame.push(127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    Bytes::from(frame)
}

#[cfg(test)]
impl Outbox {
    /// Frames waiting in the queue.
    fn queued(&self) -> usize {
        self.lock().frames.len()
    }

    /// Whether the first waiting frame is partly written.
    fn head_started(&self) -> bool {
        self.lock().head_written > 0
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{protocol::Role, Message};
    use tokio_tungstenite::WebSocketStream;

    /// A connected pair: the server's outbox (attached, as after an
    /// upgrade) and the client's WebSocket.
    pub(in crate::streams) async fn pair() -> (Arc<Outbox>, Conn, WebSocketStream<TcpStream>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let outbox = Outbox::new();
        let conn = outbox.attach(accepted.unwrap().0);
        let client = WebSocketStream::from_raw_socket(client.unwrap(), Role::Client, None).await;
        (outbox, conn, client)
    }

    fn live(seq: i64, padding: usize) -> Bytes {
        let payload = serde_json::json!({"seq": seq, "pad": "x".repeat(padding)}).to_string();
        text_frame(payload.as_bytes())
    }

    pub(in crate::streams) async fn next_seq(
        client: &mut WebSocketStream<TcpStream>,
    ) -> Option<i64> {
        match client.next().await? {
            Ok(Message::Text(text)) => {
                serde_json::from_str::<serde_json::Value>(&text).unwrap()["seq"].as_i64()
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn frames_are_encoded_with_the_length_form_their_size_needs() {
        for len in [0, 125, 126, 65_535, 65_536] {
            let frame = text_frame(&vec![b'a'; len]);
            let header = frame.len() - len;
            let expected = match len {
                0..=125 => 2,
                126..=65_535 => 4,
                _ => 10,
            };
            assert_eq!((frame[0], header), (0x81, expected), "{len} bytes");
        }
    }

    #[tokio::test]
    async fn a_paused_outbox_keeps_the_newest_frame_and_sends_it_if_newer_than_what_went_out() {
        let (outbox, mut conn, mut client) = pair().await;
        for seq in [3, 5, 4] {
            assert_eq!(outbox.offer(seq, &live(seq, 0)), Offered::Sent);
        }
        // What the session sent itself covers up to 4: the held 5 follows.
        outbox.resume(4);
        std::future::poll_fn(|cx| Pin::new(&mut conn).poll_flush(cx))
            .await
            .unwrap();
        assert_eq!(next_seq(&mut client).await, Some(5));
        // Older or repeated frames are skipped from now on.
        for (seq, offered) in [(5, Offered::Had), (2, Offered::Had), (6, Offered::Sent)] {
            assert_eq!(outbox.offer(seq, &live(seq, 0)), offered);
        }
        assert_eq!(next_seq(&mut client).await, Some(6));

        // Held frames no newer than what was sent are dropped on resume.
        let (outbox, _conn, _client) = pair().await;
        outbox.offer(7, &live(7, 0));
        outbox.resume(7);
        assert_eq!(outbox.queued(), 0);
    }

    #[tokio::test]
    async fn a_full_socket_queues_whole_frames_and_a_newer_snapshot_replaces_a_waiting_one() {
        let (outbox, conn, mut client) = pair().await;
        outbox.resume(0);
        // Fill the socket while the client reads nothing.
        let mut seq = 0;
        while outbox.queued() == 0 {
            seq += 1;
            assert!(seq < 10_000, "the socket never filled");
            outbox.offer(seq, &live(seq, 64 * 1024));
        }
        // The frame that did not fit is kept if part of it went out (the
        // rest must follow), replaced by a newer one otherwise.
        let last_whole = if outbox.head_started() { seq } else { seq - 1 };
        outbox.offer(seq + 1, &live(seq + 1, 64 * 1024));
        outbox.offer(seq + 2, &live(seq + 2, 64 * 1024));
        assert_eq!(outbox.queued(), 1 + usize::from(last_whole == seq));
        // The session's own message queues behind them, whole.
        let mut session = WebSocketStream::from_raw_socket(conn, Role::Server, None).await;
        session.feed(Message::text(r#"{"seq": -1}"#)).await.unwrap();
        let flushing = tokio::spawn(async move {
            session.flush().await.unwrap();
            session
        });
        let mut read = Vec::new();
        while let Some(seq) = next_seq(&mut client).await {
            read.push(seq);
            if seq == -1 {
                break;
            }
        }
        flushing.await.unwrap();
        let expected: Vec<i64> = (1..=last_whole).chain([seq + 2, -1]).collect();
        assert_eq!(read, expected);
    }

    #[tokio::test]
    async fn a_reply_older_than_a_frame_already_sent_is_skipped_and_a_newer_one_skips_older_frames()
    {
        let (outbox, _conn, mut client) = pair().await;
        outbox.resume(0);
        outbox.offer(5, &live(5, 0));
        // The session read the store at 4, then the fan-out sent 5.
        assert!(!outbox.reply(4, live(4, 0)).unwrap());
        // A reply as new as what went out is written: the client asked.
        assert!(outbox.reply(5, live(5, 0)).unwrap());
        assert!(outbox.reply(7, live(7, 0)).unwrap());
        // Live frames the reply is newer than are not sent after it.
        outbox.offer(6, &live(6, 0));
        outbox.offer(8, &live(8, 0));
        let mut seqs = Vec::new();
        for _ in 0..4 {
            seqs.push(next_seq(&mut client).await.unwrap());
        }
        assert_eq!(seqs, [5, 5, 7, 8]);
    }

    #[tokio::test]
    async fn closing_an_outbox_closes_the_connection_and_the_fan_out_forgets_it() {
        let (outbox, conn, mut client) = pair().await;
        outbox.resume(0);
        drop(conn);
        assert_eq!(outbox.offer(1, &live(1, 0)), Offered::Gone);
        // The client sees the connection end, not a frame.
        assert!(client.next().await.is_none_or(|m| m.is_err()));
    }
}
