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
    let mut sockets = ShardSockets::new(members);
    let mut waiting = Vec::new();
    while commands.recv_many(&mut waiting, 256).await > 0 {
        let mut newest = sockets.take(waiting.drain(..));
        sockets.prune_if_many_joined();
        // A sweep that learns of a newer event on its way sends that one
        // to the sockets it has still to reach, and then sweeps again for
        // those it passed: none waits for the rest of a stale sweep.
        while let Some(event) = newest {
            newest = sockets.sweep(&event, || {
                let mut arrived = Vec::new();
                while let Ok(command) = commands.try_recv() {
                    arrived.push(command);
                }
                arrived
            });
            // Let the other shards, and everything else, run.
            tokio::task::yield_now().await;
        }
    }
}

/// A shard's sockets, and what it does with the commands it is sent.
struct ShardSockets {
    outboxes: Vec<Arc<Outbox>>,
    /// Sockets that closed are dropped after a sweep that found one, or,
    /// for a campaign that has no frames, once as many have joined as the
    /// shard holds: a shard of a quiet campaign that clients keep opening
    /// and closing never grows past twice its open sockets.
    joined_since_pruned: usize,
    members: Arc<AtomicUsize>,
    messages: metrics::Counter,
}

impl ShardSockets {
    fn new(members: Arc<AtomicUsize>) -> Self {
        Self {
            outboxes: Vec::new(),
            joined_since_pruned: 0,
            members,
            messages: metrics::counter!("herald_stream_messages_total", "protocol" => "seed000"),
        }
    }

    /// Adds the sockets that joined; the newest event sent, if any. Sockets
    /// join in order with the events, and of the events only the newest is
    /// sent (it supersedes the rest).
    fn take(&mut self, commands: impl IntoIterator<Item = Command>) -> Option<Arc<HubEvent>> {
        let mut newest: Option<Arc<HubEvent>> = None;
        for command in commands {
            match command {
                Command::Add(outbox) => {
                    self.outboxes.push(outbox);
                    self.joined_since_pruned += 1;
                }
                Command::Send(event) => {
                    // Events come in log order: the last is the newest.
                    if newest.replace(event).is_some() {
                        metrics::counter!("herald_stream_frames_coalesced_total").increment(1);
                    }
                }
            }
        }
        newest
    }

    fn prune_if_many_joined(&mut self) {
        if self.joined_since_pruned * 2 >= self.outboxes.len() {
            self.prune();
        }
    }

    fn prune(&mut self) {
        self.joined_since_pruned = 0;
        let before = self.outboxes.len();
        self.outboxes.retain(|outbox| !outbox.is_closed());
        self.members
            .fetch_sub(before - self.outboxes.len(), Ordering::Relaxed);
    }

    /// Offers `event`'s frame to every socket in turn. Every
    /// [`YIELD_EVERY`] sockets it takes the commands that came meanwhile
    /// (`arrived`): sockets that joined are swept too, and a newer event's
    /// frame replaces the one being sent for the sockets still ahead. Then
    /// that newer event is returned, for a sweep of the sockets behind
    /// (those ahead already have it, and skip it cheaply).
    fn sweep(
        &mut self,
        event: &Arc<HubEvent>,
        mut arrived: impl FnMut() -> Vec<Command>,
    ) -> Option<Arc<HubEvent>> {
        let mut frame = event.seed000_ws_frame()?.clone();
        let mut seq = event.seq();
        let mut newer = None;
        let (mut sent, mut gone) = (0, false);
        let mut at = 0;
        while at < self.outboxes.len() {
            match self.outboxes[at].offer(seq, &frame) {
                Offered::Sent => sent += 1,
                Offered::Had => {}
                Offered::Gone => gone = true,
            }
            at += 1;
            if at % YIELD_EVERY == 0 {
                std::thread::yield_now();
                if let Some(event) = self.take(arrived()) {
                    if let Some(newest) = event.seed000_ws_frame() {
                        frame = newest.clone();
                        seq = event.seq();
                        newer = Some(event);
                    }
                }
            }
        }
        self.messages.increment(sent);
        if gone {
            self.prune();
        } else {
            self.prune_if_many_joined();
        }
        newer
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
    async fn a_newer_event_goes_to_the_sockets_ahead_of_a_sweep_and_then_to_those_behind() {
        let mut sockets = ShardSockets::new(Arc::new(AtomicUsize::new(0)));
        let mut opened = Vec::new();
        for _ in 0..YIELD_EVERY * 2 {
            let (outbox, conn, client) = pair().await;
            outbox.resume(0);
            assert!(sockets.take([Command::Add(outbox)]).is_none());
            opened.push((conn, client));
        }
        // At the sweep's first checkpoint a socket joins and event 2 comes.
        let (late, late_conn, late_client) = pair().await;
        late.resume(0);
        let mut arrivals = vec![vec![Command::Add(late), Command::Send(event(2))]].into_iter();
        let newer = sockets.sweep(&event(1), || arrivals.next().unwrap_or_default());
        assert_eq!(newer.as_ref().map(|event| event.seq()), Some(2));
        // The sweep the shard then makes for event 2, with nothing newer.
        assert!(sockets.sweep(&newer.unwrap(), Vec::new).is_none());
        opened.push((late_conn, late_client));
        for (at, (_, client)) in opened.iter_mut().enumerate() {
            if at < YIELD_EVERY {
                assert_eq!(next_seq(client).await, Some(1), "socket {at}");
            }
            assert_eq!(next_seq(client).await, Some(2), "socket {at}");
        }
        assert_eq!(sockets.outboxes.len(), YIELD_EVERY * 2 + 1);
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
