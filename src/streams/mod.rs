//! Live progress: one broadcast channel per campaign per node.
//!
//! Writers (the engine, the API) append events to the store's log and then
//! [`Hub::notify`] the campaign, or hand the hub the events they committed
//! ([`Hub::publish`], the engine's way). The hub's single task reads new
//! events from the log once — however many subscribers there are — unless
//! it was handed them and they follow the last it read; it coalesces
//! progress (at most one frame per `coalesce` window per campaign; the
//! newest counters win; nothing else is ever dropped) and broadcasts
//! `Arc<HubEvent>`s. Subscribers never read the database for live events.
//!
//! On Postgres, other nodes write too: [`Hub::start`] also follows the
//! store's change feed (`LISTEN/NOTIFY`), and a notification from any node
//! is handled like a local one — the payload names the campaign, the rows
//! come from the log, so an outage of the feed loses nothing (a resync
//! re-reads every watched campaign from where it stopped).
//!
//! Every protocol (seed 000, 003, 004, SSE) renders a [`HubEvent`] in its
//! own format; the rendering is cached on the event, so a frame is
//! serialised once for all clients of that protocol.

pub mod fanout;
pub mod outbox;
pub mod protocol;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use bytes::Bytes;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use self::fanout::Fanout;
use self::outbox::Outbox;

use crate::store::{Change, Store, StoredEvent};

/// Per-campaign channel capacity: a receiver further behind than this
/// lags and catches up from the log instead.
const CHANNEL_CAPACITY: usize = 256;
/// Events read from the log per notification.
const READ_LIMIT: i64 = 1000;

/// Which wire format a frame is rendered in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Burki = 0,
    Jobs = 1,
    Iterations = 2,
    Sse = 3,
}

/// One event of a campaign, with its renderings cached. A rendering is
/// WebSocket text (`Utf8Bytes`, reference-counted): every subscriber sends
/// the same buffer, so a frame costs one serialisation and no copy per
/// subscriber before the socket's own.
#[derive(Debug)]
pub struct HubEvent {
    pub event: StoredEvent,
    frames: [OnceLock<Option<Utf8Bytes>>; 4],
    /// The seed-000 rendering as a whole WebSocket frame, for the fan-out.
    ws_frame: OnceLock<Option<Bytes>>,
}

impl HubEvent {
    pub fn new(event: StoredEvent) -> Self {
        Self {
            event,
            frames: Default::default(),
            ws_frame: OnceLock::new(),
        }
    }

    /// The seed-000 [`HubEvent::frame`] encoded as a WebSocket text frame,
    /// once (the fan-out sends seed 000).
    pub fn seed000_ws_frame(&self) -> Option<Bytes> {
        self.ws_frame
            .get_or_init(|| {
                self.frame(Format::Burki)
                    .map(|text| outbox::text_frame(text.as_bytes()))
            })
            .clone()
    }

    pub fn seq(&self) -> i64 {
        self.event.seq
    }

    /// The event in `format`, serialised once; `None` when that protocol
    /// has no message for this kind of event.
    pub fn frame(&self, format: Format) -> Option<Utf8Bytes> {
        self.frames[format as usize]
            .get_or_init(|| {
                protocol::render(&self.event, format).map(|v| Utf8Bytes::from(v.to_string()))
            })
            .clone()
    }
}

/// Whether `committed` are the events right after sequence `read`, with
/// none missing between them.
fn follows(read: i64, committed: &[StoredEvent]) -> bool {
    !committed.is_empty()
        && committed
            .iter()
            .enumerate()
            .all(|(n, event)| event.seq == read + 1 + n as i64)
}

/// Whether an event may be merged into a later one of the same kind.
pub fn is_coalescable(kind: &str) -> bool {
    kind == "progress"
}

/// Keeps, of every run of consecutive coalescable events, only the last.
pub fn coalesce(events: Vec<StoredEvent>) -> Vec<StoredEvent> {
    let mut out: Vec<StoredEvent> = Vec::with_capacity(events.len());
    for event in events {
        if let Some(last) = out.last() {
            if is_coalescable(&last.kind) && is_coalescable(&event.kind) {
                out.pop();
            }
        }
        out.push(event);
    }
    out
}

#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    notify: mpsc::UnboundedSender<Notice>,
}

/// A campaign's log has new events: these, if the writer has them.
struct Notice {
    campaign_id: i64,
    workspace_id: i64,
    committed: Vec<StoredEvent>,
}

#[derive(Default)]
struct State {
    campaigns: HashMap<i64, Channel>,
    /// Every event of a workspace's campaigns (seed 003 streams by client).
    workspaces: HashMap<i64, broadcast::Sender<Arc<HubEvent>>>,
}

struct Channel {
    workspace_id: i64,
    sender: broadcast::Sender<Arc<HubEvent>>,
    /// The last sequence read from the log for this campaign.
    read_seq: i64,
    /// Progress waiting for its coalescing window.
    held: Option<StoredEvent>,
    last_progress_at: Option<Instant>,
    /// Seed-000 sockets written to directly (see [`fanout`]).
    fanout: Fanout,
    /// What the last event handed to the fan-out showed seed 000.
    fanout_shown: protocol::Seed000Shown,
}

/// A live subscription: events with `seq` greater than `from_seq` arrive
/// on `receiver`, in order (a held progress frame may repeat an older seq:
/// skip anything not newer than what was sent). Events up to `from_seq`
/// were broadcast before the subscription and are read from the log.
pub struct Subscription {
    pub receiver: broadcast::Receiver<Arc<HubEvent>>,
    pub from_seq: i64,
}

impl State {
    fn listened(&self, channel: &Channel) -> bool {
        channel.sender.receiver_count() > 0
            || channel.fanout.members() > 0
            || self
                .workspaces
                .get(&channel.workspace_id)
                .is_some_and(|w| w.receiver_count() > 0)
    }

    /// The channel a new subscriber of a campaign joins. `current_seq` is
    /// the log's newest sequence as the caller just read it.
    fn subscriber_channel(
        &mut self,
        campaign_id: i64,
        workspace_id: i64,
        current_seq: i64,
    ) -> &mut Channel {
        let unwatched = match self.campaigns.get(&campaign_id) {
            Some(channel) => !self.listened(channel),
            None => true,
        };
        let channel = self.channel(campaign_id, workspace_id, current_seq);
        if unwatched {
            // Nobody listened, so nothing was read: start from now.
            channel.read_seq = current_seq;
            channel.held = None;
        }
        channel
    }

    fn channel(&mut self, campaign_id: i64, workspace_id: i64, read_seq: i64) -> &mut Channel {
        self.campaigns
            .entry(campaign_id)
            .or_insert_with(|| Channel {
                workspace_id,
                sender: broadcast::channel(CHANNEL_CAPACITY).0,
                read_seq,
                held: None,
                last_progress_at: None,
                fanout: Fanout::default(),
                fanout_shown: protocol::Seed000Shown::default(),
            })
    }
}

impl Hub {
    /// Starts the hub's task; it stops with `shutdown`.
    pub fn start(store: Arc<dyn Store>, coalesce: Duration, shutdown: CancellationToken) -> Self {
        let (notify, notified) = mpsc::unbounded_channel();
        let hub = Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                notify,
            }),
        };
        tokio::spawn(
            hub.clone()
                .follow_other_nodes(store.clone(), shutdown.clone()),
        );
        tokio::spawn(hub.clone().run(store, coalesce, notified, shutdown));
        hub
    }

    /// Turns other nodes' announcements into notifications.
    async fn follow_other_nodes(self, store: Arc<dyn Store>, shutdown: CancellationToken) {
        let mut feed = loop {
            match store.watch_changes().await {
                Ok(Some(feed)) => break feed,
                Ok(None) => return,
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for other nodes' events yet");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        loop {
            let change = tokio::select! {
                () = shutdown.cancelled() => return,
                change = feed.recv() => change,
            };
            match change {
                Some(Change::Appended {
                    campaign_id,
                    workspace_id,
                }) => self.notify(campaign_id, workspace_id),
                Some(Change::Resync) => {
                    let watched: Vec<(i64, i64)> = {
                        let state = self.inner.state.lock().expect("hub lock");
                        state
                            .campaigns
                            .iter()
                            .map(|(id, channel)| (*id, channel.workspace_id))
                            .collect()
                    };
                    for (campaign_id, workspace_id) in watched {
                        self.notify(campaign_id, workspace_id);
                    }
                }
                None => return,
            }
        }
    }

    /// Tells the hub that a campaign's log has new events.
    pub fn notify(&self, campaign_id: i64, workspace_id: i64) {
        self.publish(campaign_id, workspace_id, Vec::new());
    }

    /// Tells the hub of the events one transaction appended to a
    /// campaign's log, once it committed. When they follow the last event
    /// the hub read, it broadcasts them as they are; otherwise (another
    /// writer's events came between) it reads the log, as for
    /// [`Hub::notify`]. Reading back what the engine just wrote was a round
    /// trip to the database's thread on every commit, and on a busy server
    /// each such hop waits for a core.
    pub fn publish(&self, campaign_id: i64, workspace_id: i64, committed: Vec<StoredEvent>) {
        let _ = self.inner.notify.send(Notice {
            campaign_id,
            workspace_id,
            committed,
        });
    }

    /// Subscribes to a campaign. `current_seq` is the log's newest sequence
    /// as the caller just read it.
    pub fn subscribe(&self, campaign_id: i64, workspace_id: i64, current_seq: i64) -> Subscription {
        let mut state = self.inner.state.lock().expect("hub lock");
        let channel = state.subscriber_channel(campaign_id, workspace_id, current_seq);
        Subscription {
            receiver: channel.sender.subscribe(),
            from_seq: channel.read_seq,
        }
    }

    /// Subscribes a seed-000 socket to a campaign: the fan-out writes its
    /// frames to `outbox`, which holds them until it is resumed. Returns
    /// the log position live frames start after (see [`Subscription`]).
    pub fn subscribe_direct(
        &self,
        campaign_id: i64,
        workspace_id: i64,
        current_seq: i64,
        outbox: Arc<Outbox>,
    ) -> i64 {
        let mut state = self.inner.state.lock().expect("hub lock");
        let channel = state.subscriber_channel(campaign_id, workspace_id, current_seq);
        channel.fanout.add(outbox);
        channel.read_seq
    }

    /// Subscribes to every campaign of a workspace. `current` holds each
    /// existing campaign's newest sequence; campaigns created later are
    /// streamed from their first event.
    pub fn subscribe_workspace(
        &self,
        workspace_id: i64,
        current: &[(i64, i64)],
    ) -> broadcast::Receiver<Arc<HubEvent>> {
        let mut state = self.inner.state.lock().expect("hub lock");
        let receiver = state
            .workspaces
            .entry(workspace_id)
            .or_insert_with(|| broadcast::channel(CHANNEL_CAPACITY).0)
            .subscribe();
        for &(campaign_id, seq) in current {
            let fresh = !state.campaigns.contains_key(&campaign_id);
            let idle = state
                .campaigns
                .get(&campaign_id)
                .is_some_and(|c| c.sender.receiver_count() == 0);
            let channel = state.channel(campaign_id, workspace_id, seq);
            if fresh || idle {
                channel.read_seq = channel.read_seq.max(seq);
            }
        }
        receiver
    }

    async fn run(
        self,
        store: Arc<dyn Store>,
        window: Duration,
        mut notified: mpsc::UnboundedReceiver<Notice>,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(window.max(Duration::from_millis(10)) / 2);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                note = notified.recv() => match note {
                    Some(notice) => self.pull(&store, notice, window).await,
                    None => return,
                },
                _ = tick.tick() => self.flush_held(window),
            }
        }
    }

    /// Reads a campaign's new events and broadcasts them, if anyone listens.
    async fn pull(&self, store: &Arc<dyn Store>, notice: Notice, window: Duration) {
        let Notice {
            campaign_id,
            workspace_id,
            committed,
        } = notice;
        let from = {
            let mut state = self.inner.state.lock().expect("hub lock");
            let workspace_listens = state
                .workspaces
                .get(&workspace_id)
                .is_some_and(|w| w.receiver_count() > 0);
            match state.campaigns.get(&campaign_id) {
                Some(channel) if state.listened(channel) => channel.read_seq,
                Some(_) => return,
                // Created after the workspace's listeners subscribed.
                None if workspace_listens => state.channel(campaign_id, workspace_id, 0).read_seq,
                None => return,
            }
        };
        if follows(from, &committed) {
            self.dispatch(campaign_id, workspace_id, committed, window);
            return;
        }
        if committed.last().is_some_and(|last| last.seq <= from) {
            // Read already, with a later writer's.
            return;
        }
        let mut after = from;
        loop {
            let events = match store.events_since(campaign_id, after, READ_LIMIT).await {
                Ok(events) => events,
                Err(err) => {
                    tracing::warn!(campaign = campaign_id, error = %err, "reading events for streams failed");
                    return;
                }
            };
            let Some(last) = events.last() else { return };
            after = last.seq;
            let full = events.len() as i64 == READ_LIMIT;
            if !self.dispatch(campaign_id, workspace_id, events, window) || !full {
                return;
            }
        }
    }

    /// Broadcasts a campaign's events, the next in its log after those the
    /// hub has read; false if the campaign's channel is gone.
    fn dispatch(
        &self,
        campaign_id: i64,
        workspace_id: i64,
        events: Vec<StoredEvent>,
        window: Duration,
    ) -> bool {
        let Some(last) = events.last() else {
            return true;
        };
        let read_seq = last.seq;
        metrics::counter!("herald_events_streamed_total").increment(events.len() as u64);
        let mut state = self.inner.state.lock().expect("hub lock");
        let workspace = state.workspaces.get(&workspace_id).cloned();
        let Some(channel) = state.campaigns.get_mut(&campaign_id) else {
            return false;
        };
        channel.read_seq = read_seq;
        for event in coalesce(events) {
            channel.offer(event, window, workspace.as_ref());
        }
        true
    }

    /// Sends progress held back by the coalescing window once it has passed,
    /// and forgets channels nobody listens to.
    fn flush_held(&self, window: Duration) {
        let mut state = self.inner.state.lock().expect("hub lock");
        state.workspaces.retain(|_, w| w.receiver_count() > 0);
        let workspaces = state.workspaces.clone();
        for channel in state.campaigns.values_mut() {
            let due = channel
                .last_progress_at
                .is_none_or(|at| at.elapsed() >= window);
            if due {
                if let Some(held) = channel.held.take() {
                    channel.send_progress(held, workspaces.get(&channel.workspace_id));
                }
            }
        }
    }
}

impl Channel {
    fn offer(
        &mut self,
        event: StoredEvent,
        window: Duration,
        workspace: Option<&broadcast::Sender<Arc<HubEvent>>>,
    ) {
        if is_coalescable(&event.kind) {
            let recent = self
                .last_progress_at
                .is_some_and(|at| at.elapsed() < window);
            if recent {
                if self.held.is_some() {
                    metrics::counter!("herald_stream_frames_coalesced_total").increment(1);
                }
                self.held = Some(event);
            } else {
                self.held = None;
                self.send_progress(event, workspace);
            }
            return;
        }
        // Anything else goes now, after the progress it follows.
        if let Some(held) = self.held.take() {
            self.send_progress(held, workspace);
        }
        self.send(Arc::new(HubEvent::new(event)), workspace);
    }

    fn send_progress(
        &mut self,
        event: StoredEvent,
        workspace: Option<&broadcast::Sender<Arc<HubEvent>>>,
    ) {
        self.last_progress_at = Some(Instant::now());
        self.send(Arc::new(HubEvent::new(event)), workspace);
    }

    fn send(&mut self, event: Arc<HubEvent>, workspace: Option<&broadcast::Sender<Arc<HubEvent>>>) {
        if let Some(workspace) = workspace {
            let _ = workspace.send(event.clone());
        }
        if self.shows_the_fanout_something_new(&event) {
            self.fanout.send(&event);
        }
        let _ = self.sender.send(event);
    }

    /// Whether seed 000 would show the campaign's progress sockets
    /// anything the last event sent to them did not. The seed sends a
    /// `progress_update` "whenever progress changes": a delivery receipt,
    /// for one, changes none of its counters (it has no delivery counts),
    /// and each such frame was ten thousand sends saying the same again.
    /// A socket that joins later is sent the state it joins at, so it has
    /// what a skipped frame would have told it.
    fn shows_the_fanout_something_new(&mut self, event: &HubEvent) -> bool {
        let changed = self.fanout_shown.changed_by(&event.event);
        if !changed {
            metrics::counter!("herald_stream_frames_unchanged_total").increment(1);
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: i64, kind: &str) -> StoredEvent {
        StoredEvent {
            campaign_id: 1,
            seq,
            kind: kind.into(),
            data: serde_json::json!({}),
            created_at: 0,
        }
    }

    #[test]
    fn committed_events_follow_only_when_next_and_unbroken() {
        let seqs = |seqs: &[i64]| -> Vec<StoredEvent> {
            seqs.iter().map(|&seq| event(seq, "progress")).collect()
        };
        assert!(follows(4, &seqs(&[5])));
        assert!(follows(4, &seqs(&[5, 6, 7])));
        assert!(!follows(4, &seqs(&[])));
        assert!(!follows(4, &seqs(&[6])), "an event between was missed");
        assert!(!follows(4, &seqs(&[5, 7])));
        assert!(!follows(4, &seqs(&[4, 5])), "already read");
    }

    /// A SQLite store holding one external campaign: its id, workspace and
    /// newest sequence.
    async fn one_campaign() -> (tempfile::TempDir, Arc<dyn Store>, i64, i64, i64) {
        use crate::domain::{CampaignName, Channel, MaxAttempts};
        let dir = tempfile::tempdir().expect("temporary directory");
        let url = format!("sqlite://{}/hub.db", dir.path().display());
        let store = crate::store::connect(&url, &Default::default())
            .await
            .expect("store");
        let workspace = store.ensure_workspace("hub").await.expect("workspace");
        let spec = crate::store::CampaignSpec {
            name: CampaignName::parse("hub").expect("name"),
            channel: Channel::External,
            template: None,
            sender: None,
            provider: Default::default(),
            max_attempts: MaxAttempts::DEFAULT,
        };
        let campaign = store
            .insert_campaign(workspace.id, &spec)
            .await
            .expect("campaign");
        let newest = store
            .events_since(campaign.id, 0, 1000)
            .await
            .expect("log")
            .last()
            .map_or(0, |e| e.seq);
        (dir, store, campaign.id, workspace.id, newest)
    }

    #[tokio::test]
    async fn published_events_that_follow_go_out_as_given_and_after_a_gap_the_log_is_read() {
        let (_dir, store, campaign, workspace, newest) = one_campaign().await;
        let hub = Hub::start(store.clone(), Duration::ZERO, CancellationToken::new());
        let mut subscription = hub.subscribe(campaign, workspace, newest);
        let append = |n: i64| {
            let store = store.clone();
            async move {
                let kind = "job_progress".to_string();
                let mut events = store
                    .append_external_events(campaign, &[(kind, serde_json::json!({"n": n}))], None)
                    .await
                    .expect("appended");
                events.pop().expect("one event")
            }
        };
        // What the writer hands over is what goes out: the hub does not
        // read back the event that follows the last it read.
        let first = append(1).await;
        let mut handed = first.clone();
        handed.data["n"] = serde_json::json!("as committed");
        hub.publish(campaign, workspace, vec![handed]);
        let sent = subscription.receiver.recv().await.expect("sent");
        assert_eq!(
            (sent.seq(), &sent.event.data["n"]),
            (first.seq, &serde_json::json!("as committed"))
        );
        // An event the writer does not have came between: the log is read.
        let second = append(2).await;
        let third = append(3).await;
        let mut handed = third.clone();
        handed.data["n"] = serde_json::json!("as committed");
        hub.publish(campaign, workspace, vec![handed.clone()]);
        for expected in [&second, &third] {
            let sent = subscription.receiver.recv().await.expect("sent");
            assert_eq!(
                (sent.seq(), &sent.event.data["n"]),
                (expected.seq, &expected.data["n"])
            );
        }
        // Handed over again once read, it is not sent twice.
        hub.publish(campaign, workspace, vec![handed]);
        let fourth = append(4).await;
        hub.publish(campaign, workspace, vec![fourth.clone()]);
        let sent = subscription.receiver.recv().await.expect("sent");
        assert_eq!(sent.seq(), fourth.seq);
    }

    #[test]
    fn coalescing_keeps_the_last_progress_and_every_other_event() {
        let events = vec![
            event(1, "progress"),
            event(2, "progress"),
            event(3, "batch_completed"),
            event(4, "progress"),
            event(5, "progress"),
            event(6, "progress"),
            event(7, "run_completed"),
        ];
        let seqs: Vec<i64> = coalesce(events).iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [2, 3, 6, 7]);
    }
}
