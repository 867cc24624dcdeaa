//! Writing a campaign's seed-000 frames to all of its sockets.
//!
//! A campaign's direct subscribers (see [`super::outbox`]) are split into
//! shards of at most [`SHARD_SIZE`]; each shard is one task that owns its
//! sockets' outboxes and, for each event, encodes nothing (the frame is
//! encoded once, on the event) and offers it to each socket in turn. The
//! shards of one event run on all the runtime's workers at once.
//!
//! A shard that falls behind skips to the newest event waiting for it:
//! every seed-000 frame is the campaign's whole state, so the newest says
//! all the older ones did, and a busy server sends fewer frames instead of
//! a growing backlog.
//!
//! The shards run on a small runtime of their own ([`sweepers`]), not on
//! the one that serves requests and runs the engine. A shard's sweep is
//! milliseconds of `send`s with no `.await` between them, and a task woken
//! from another thread (an engine transaction's statement returning from
//! SQLite's thread) waited behind every sweep queued on its worker: with
//! ten thousand subscribers watching, a campaign ran a third slower and
//! each commit reached the hub later. A sweep also gives up its core every
//! [`YIELD_EVERY`] sockets, so the kernel does not hold those threads back
//! for the rest of its time slice either.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::mpsc;

use super::outbox::{Offered, Outbox};
use super::HubEvent;

/// Sockets per shard task: enough that a frame to ten thousand sockets is
/// a handful of tasks, few enough that every worker gets a share.
const SHARD_SIZE: usize = 1024;

/// Sockets a sweep writes before it offers its core to the process's other
/// threads (`sched_yield`). Linux lets a running thread finish its time
/// slice (about 1.5 ms on two cores) before a thread it woke gets the core,
/// and an engine transaction is a dozen statements, each a wake-up of
/// SQLite's thread and then of a tokio worker: behind sweeps that never
/// yield, one transaction in a hundred took 24–33 ms; yielding every 64
/// sockets (about 0.3 ms of `send`s), 13–25 ms, and the fan-out's p50 and
/// p99 fell by about 10 ms. Every 16 or every 256 measured worse than 64.
const YIELD_EVERY: usize = 64;

enum Command {
    Add(Arc<Outbox>),
    Send(Arc<HubEvent>),
}

struct Shard {
    commands: mpsc::UnboundedSender<Command>,
    /// Sockets the shard holds (it counts down as it finds them closed).
    members: Arc<AtomicUsize>,
}

/// The fan-out's runtime: one thread per core, started with the first
/// direct subscriber and kept for the life of the process. Its shards need
/// neither its I/O driver (they write with `try_write` to sockets the main
/// runtime drives) nor timers.
fn sweepers() -> &'static tokio::runtime::Handle {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get()))
                .thread_name("herald-fanout")
                .build()
                .expect("the fan-out's runtime starts")
        })
        .handle()
}

/// One campaign's direct subscribers.
#[derive(Default)]
pub struct Fanout {
    shards: Vec<Shard>,
    /// Where the shards run; `None` is [`sweepers`]. Tests run them on
    /// their own runtime, to decide when they run.
    runtime: Option<tokio::runtime::Handle>,
}

impl Fanout {
    #[cfg(test)]
    fn on(runtime: tokio::runtime::Handle) -> Self {
        Self {
            shards: Vec::new(),
            runtime: Some(runtime),
        }
    }

    /// Adds a socket to the emptiest shard, or to a new one.
    pub fn add(&mut self, outbox: Arc<Outbox>) {
        let emptiest = self
            .shards
            .iter()
            .filter(|s| s.members.load(Ordering::Relaxed) < SHARD_SIZE)
            .min_by_key(|s| s.members.load(Ordering::Relaxed));
        let shard = match emptiest {
            Some(shard) => shard,
            None => {
                let (commands, received) = mpsc::unbounded_channel();
                let members = Arc::new(AtomicUsize::new(0));
                let runtime = self.runtime.as_ref().unwrap_or_else(|| sweepers());
                runtime.spawn(run_shard(received, members.clone()));
                self.shards.push(Shard { commands, members });
                self.shards.last().expect("just pushed")
            }
        };
        shard.members.fetch_add(1, Ordering::Relaxed);
        let _ = shard.commands.send(Command::Add(outbox));
    }

    /// Sends an event's seed-000 frame to every socket.
    pub fn send(&self, event: &Arc<HubEvent>) {
        for shard in &self.shards {
            let _ = shard.commands.send(Command::Send(event.clone()));
        }
    }

    /// Sockets still open, as far as the shards know.
    pub fn members(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.members.load(Ordering::Relaxed))
            .sum()
    }
}

async fn run_shard(mut commands: mpsc::UnboundedReceiver<Command>, members: Arc<AtomicUsize>) {
    let mut outboxes: Vec<Arc<Outbox>> = Vec::new();
    let messages = metrics::counter!("herald_stream_messages_total", "protocol" => "seed000");
    let mut waiting = Vec::new();
    // Sockets that closed are dropped at the next frame, or, for a campaign
    // that has none, once as many have joined as the shard holds: a shard
    // of a quiet campaign that clients keep opening and closing never
    // grows past twice its open sockets.
    let mut joined_since_pruned = 0;
    while commands.recv_many(&mut waiting, 256).await > 0 {
        // Sockets join in order with the events, and of the events only
        // the newest is sent (it supersedes the rest).
        let mut newest: Option<Arc<HubEvent>> = None;
        for command in waiting.drain(..) {
            match command {
                Command::Add(outbox) => {
                    outboxes.push(outbox);
                    joined_since_pruned += 1;
                    if joined_since_pruned * 2 >= outboxes.len() {
                        joined_since_pruned = 0;
                        let before = outboxes.len();
                        outboxes.retain(|outbox| !outbox.is_closed());
                        members.fetch_sub(before - outboxes.len(), Ordering::Relaxed);
                    }
                }
                Command::Send(event) => {
                    // Events come in log order: the last is the newest.
                    if newest.replace(event).is_some() {
                        metrics::counter!("herald_stream_frames_coalesced_total").increment(1);
                    }
                }
            }
        }
        let Some(event) = newest else { continue };
        let Some(frame) = event.seed000_ws_frame() else {
            continue;
        };
        let seq = event.seq();
        let before = outboxes.len();
        let mut offered = 0;
        outboxes.retain(|outbox| {
            offered += 1;
            if offered % YIELD_EVERY == 0 {
                std::thread::yield_now();
            }
            outbox.offer(seq, &frame) == Offered::Taken
        });
        members.fetch_sub(before - outboxes.len(), Ordering::Relaxed);
        messages.increment(outboxes.len() as u64);
        // Let the other shards of this event, and everything else, run.
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoredEvent;
    use crate::streams::outbox::tests::{next_seq, pair};

    fn event(seq: i64) -> Arc<HubEvent> {
        Arc::new(HubEvent::new(StoredEvent {
            campaign_id: 1,
            seq,
            kind: "progress".into(),
            data: serde_json::json!({}),
            created_at: 0,
        }))
    }

    /// Lets the shard tasks run (the test runtime has one thread).
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn every_socket_gets_the_newest_frame_and_closed_ones_are_forgotten() {
        let mut fanout = Fanout::on(tokio::runtime::Handle::current());
        let mut sockets = Vec::new();
        for _ in 0..3 {
            let (outbox, conn, client) = pair().await;
            outbox.resume(0);
            fanout.add(outbox);
            sockets.push((conn, client));
        }
        // Three events before the shard runs: it sends only the newest.
        for seq in 1..=3 {
            fanout.send(&event(seq));
        }
        settle().await;
        for (_, client) in &mut sockets {
            assert_eq!(next_seq(client).await, Some(3));
        }
        assert_eq!(fanout.members(), 3);
        // A socket whose task ended is dropped at the next frame.
        let (conn, _) = sockets.remove(0);
        drop(conn);
        fanout.send(&event(4));
        settle().await;
        assert_eq!(fanout.members(), 2);
        for (_, client) in &mut sockets {
            assert_eq!(next_seq(client).await, Some(4));
        }
    }

    #[tokio::test]
    async fn sweeps_run_on_their_own_threads() {
        let mut fanout = Fanout::default();
        let (outbox, _conn, _client) = pair().await;
        outbox.resume(0);
        fanout.add(outbox.clone());
        fanout.send(&event(5));
        // The test's runtime is blocked here, yet the frame goes out.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while outbox.sent_seq() < 5 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(outbox.sent_seq(), 5);
    }
}
