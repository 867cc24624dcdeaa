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

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use super::outbox::{Offered, Outbox};
use super::{Format, HubEvent};

/// Sockets per shard task: enough that a frame to ten thousand sockets is
/// a handful of tasks, few enough that every worker gets a share.
const SHARD_SIZE: usize = 1024;

enum Command {
    Add(Arc<Outbox>),
    Send(Arc<HubEvent>),
}

struct Shard {
    commands: mpsc::UnboundedSender<Command>,
    /// Sockets the shard holds (it counts down as it finds them closed).
    members: Arc<AtomicUsize>,
}

/// One campaign's direct subscribers.
#[derive(Default)]
pub struct Fanout {
    shards: Vec<Shard>,
}

impl Fanout {
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
                tokio::spawn(run_shard(received, members.clone()));
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
    while commands.recv_many(&mut waiting, 256).await > 0 {
        // Sockets join in order with the events, and of the events only
        // the newest is sent (it supersedes the rest).
        let mut newest: Option<Arc<HubEvent>> = None;
        for command in waiting.drain(..) {
            match command {
                Command::Add(outbox) => outboxes.push(outbox),
                Command::Send(event) => {
                    // Events come in log order: the last is the newest.
                    if newest.replace(event).is_some() {
                        metrics::counter!("herald_stream_frames_coalesced_total").increment(1);
                    }
                }
            }
        }
        let Some(event) = newest else { continue };
        let Some(frame) = event.ws_frame(Format::Burki) else {
            continue;
        };
        let seq = event.seq();
        let before = outboxes.len();
        outboxes.retain(|outbox| outbox.offer(seq, &frame) == Offered::Taken);
        members.fetch_sub(before - outboxes.len(), Ordering::Relaxed);
        messages.increment(outboxes.len() as u64);
        // Let the other shards of this event, and everything else, run.
        tokio::task::yield_now().await;
    }
}
