//! The WebSocket surfaces of seeds 000, 003 and 004.
//!
//! | route | seed | subscribes to |
//! |---|---|---|
//! | `/ws/campaigns/{id}/progress` | 000 | one campaign, `progress_update` frames |
//! | `/ws/campaigns/monitor` | 000 | campaigns chosen with `subscribe` / `unsubscribe` |
//! | `/api/v1/ws/{client_id}` | 003 | every campaign of the key's workspace, as jobs |
//! | `/v1/ws/campaigns/{id}`, `/api/v1/ws/campaigns/{id}` | 004 | one campaign, as iterations |
//!
//! Authentication is `?token=` (browsers cannot send headers): a bad token
//! is closed at once with 1008; an unknown campaign, or another workspace's,
//! with 4004; an internal failure with 4000; shutdown with 1001. Every
//! server message carries `seq`, the campaign log position it reflects.
//! `?since=N` replays the events after N from the log, then goes live; when
//! the log no longer holds them the client gets `replay_unavailable` and a
//! fresh snapshot. A client that does not take frames for `send_timeout` is
//! closed with 4008.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::time::{sleep_until, Instant};
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::StreamMap;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use super::extract::{authenticate, Auth};
use super::upgrade::{Socket, WsUpgrade};
use super::{ApiError, AppState};
use crate::store::{Campaign, CampaignRef, StoredEvent};
use crate::streams::outbox::{text_frame, Outbox};
use crate::streams::protocol::{burki_data, snapshot_of};
use crate::streams::{coalesce, is_coalescable, Format, HubEvent, Subscription};

pub const CLOSE_NORMAL: u16 = 1000;
pub const CLOSE_GOING_AWAY: u16 = 1001;
pub const CLOSE_AUTH: u16 = 1008;
pub const CLOSE_INTERNAL: u16 = 4000;
pub const CLOSE_NOT_FOUND: u16 = 4004;
pub const CLOSE_TOO_SLOW: u16 = 4008;
pub const CLOSE_TOO_MANY: u16 = 4029;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/ws/campaigns/monitor", get(monitor))
        .route("/ws/campaigns/{id}/progress", get(progress))
        .route("/api/v1/ws/{client_id}", get(jobs))
        .route("/v1/ws/campaigns/{id}", get(iterations))
        .route("/api/v1/ws/campaigns/{id}", get(iterations))
}

#[derive(Debug, Deserialize)]
pub struct WsParams {
    token: Option<String>,
    /// Replay events after this sequence before going live.
    since: Option<String>,
}

/// Small buffers keep an idle connection cheap: tungstenite zero-fills its
/// whole read buffer before every read, so all of it stays resident for as
/// long as the connection waits for a client message. Client messages are
/// short (subscribe, ping); a longer one grows the buffer as it arrives.
fn upgrade(ws: WsUpgrade, state: &AppState) -> WsUpgrade {
    let max = state.config.streams.max_client_message_bytes;
    ws.config(
        WebSocketConfig::default()
            .read_buffer_size(1024)
            .write_buffer_size(4 * 1024)
            .max_message_size(Some(max * 4))
            .max_frame_size(Some(max * 4)),
    )
}

fn unix_now() -> f64 {
    chrono::Utc::now().timestamp_micros() as f64 / 1e6
}

/// Why a session ended.
enum End {
    Close(u16, &'static str),
    /// The peer is gone or too slow to close politely.
    Drop,
}

/// A store failure ends the socket with 1011, "internal error".
fn internal(_: crate::store::StoreError) -> End {
    End::Close(CLOSE_INTERNAL, "internal error")
}

/// One connected socket and the campaigns it follows.
struct Session {
    socket: Socket,
    state: AppState,
    format: Format,
    /// The newest seq sent per campaign, to skip repeats.
    sent: HashMap<i64, i64>,
    live: StreamMap<i64, BroadcastStream<Arc<HubEvent>>>,
    /// Every campaign of a workspace at once (seed 003), instead of `live`.
    workspace: Option<BroadcastStream<Arc<HubEvent>>>,
    /// The campaign whose live frames the hub's fan-out writes to this
    /// socket itself, bypassing `sent` (a seed-000 progress socket).
    direct: Option<i64>,
    /// Paces the client's messages; the excess is dropped.
    inbound: governor::DefaultDirectRateLimiter,
    /// When the client was last told it sends too fast.
    warned_at: Option<std::time::Instant>,
    /// Messages sent, resolved once: ten thousand sockets count every frame.
    messages: metrics::Counter,
    /// Messages not yet added to `messages`: the counter is one atomic that
    /// every socket shares, so sockets add to it in steps, not per frame.
    unreported_messages: u64,
}

impl Session {
    fn new(socket: Socket, state: AppState, format: Format) -> Self {
        metrics::gauge!("herald_stream_connections", "protocol" => protocol_name(format))
            .increment(1.0);
        let rate = std::num::NonZeroU32::new(state.config.streams.client_messages_per_second)
            .unwrap_or(std::num::NonZeroU32::MIN);
        let burst = rate.saturating_mul(std::num::NonZeroU32::new(2).expect("2 > 0"));
        Self {
            inbound: governor::RateLimiter::direct(
                governor::Quota::per_second(rate).allow_burst(burst),
            ),
            warned_at: None,
            messages: metrics::counter!("herald_stream_messages_total",
                "protocol" => protocol_name(format)),
            unreported_messages: 0,
            socket,
            state,
            format,
            sent: HashMap::new(),
            live: StreamMap::new(),
            workspace: None,
            direct: None,
        }
    }

    /// The socket's writing side, which the hub's fan-out also writes to.
    fn outbox(&self) -> &Arc<Outbox> {
        self.socket.get_ref().outbox()
    }

    async fn send_json(&mut self, value: &Value) -> Result<(), End> {
        self.send_text(Utf8Bytes::from(value.to_string())).await
    }

    async fn send_text(&mut self, text: Utf8Bytes) -> Result<(), End> {
        self.queue_text(text).await?;
        self.flush().await
    }

    /// Buffers a message without writing it out yet (unless the buffer is
    /// full): [`Session::flush`] then writes everything queued at once.
    async fn queue_text(&mut self, text: Utf8Bytes) -> Result<(), End> {
        self.unreported_messages += 1;
        if self.unreported_messages >= 64 {
            self.report_messages();
        }
        let timeout = self.state.config.streams.send_timeout;
        let queued = futures::SinkExt::feed(&mut self.socket, Message::Text(text));
        Self::within_send_timeout(tokio::time::timeout(timeout, queued).await)
    }

    fn report_messages(&mut self) {
        self.messages
            .increment(std::mem::take(&mut self.unreported_messages));
    }

    async fn flush(&mut self) -> Result<(), End> {
        let timeout = self.state.config.streams.send_timeout;
        let flushed = futures::SinkExt::flush(&mut self.socket);
        Self::within_send_timeout(tokio::time::timeout(timeout, flushed).await)
    }

    fn within_send_timeout(
        result: Result<
            Result<(), tokio_tungstenite::tungstenite::Error>,
            tokio::time::error::Elapsed,
        >,
    ) -> Result<(), End> {
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(End::Drop),
            Err(_) => Err(End::Close(CLOSE_TOO_SLOW, "client too slow to read")),
        }
    }

    async fn close(mut self, code: u16, reason: &'static str) {
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            self.socket.send(close_message(code, reason)),
        )
        .await;
    }

    async fn error(&mut self, message: String) -> Result<(), End> {
        self.send_json(&json!({"type": "error", "message": message, "timestamp": unix_now()}))
            .await
    }

    /// Queues each of `events` (see [`Session::queue`]).
    async fn queue_all(
        &mut self,
        events: impl IntoIterator<Item = Arc<HubEvent>>,
    ) -> Result<(), End> {
        for event in events {
            self.queue(&event).await?;
        }
        Ok(())
    }

    /// Queues an event if it is newer than what this campaign last got;
    /// the caller flushes (see [`Session::queue_text`]).
    async fn queue(&mut self, event: &HubEvent) -> Result<bool, End> {
        let last = self
            .sent
            .get(&event.event.campaign_id)
            .copied()
            .unwrap_or(0);
        if event.seq() <= last {
            return Ok(false);
        }
        self.sent.insert(event.event.campaign_id, event.seq());
        match event.frame(self.format) {
            Some(frame) => {
                self.queue_text(frame).await?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Sends the log's events of a campaign after `after`, coalesced.
    async fn replay(
        &mut self,
        campaign_id: i64,
        after: i64,
        until: Option<i64>,
    ) -> Result<(), End> {
        let mut from = after;
        loop {
            let events = self
                .state
                .store
                .events_since(campaign_id, from, 1000)
                .await
                .map_err(internal)?;
            let Some(last) = events.last() else {
                return Ok(());
            };
            from = last.seq;
            let full = events.len() == 1000;
            let events: Vec<StoredEvent> = events
                .into_iter()
                .filter(|e| until.is_none_or(|u| e.seq <= u))
                .collect();
            let reached_until = until.is_some_and(|u| from >= u);
            // A page of the log goes out in one write, like live events.
            for event in coalesce(events) {
                self.queue(&HubEvent::new(event)).await?;
            }
            self.flush().await?;
            if !full || reached_until {
                return Ok(());
            }
        }
    }

    /// Follows a campaign it has subscribed to; replays from `since` or
    /// sends `initial`.
    async fn follow(
        &mut self,
        campaign: &Campaign,
        source: impl Into<LiveSource>,
        since: Option<i64>,
        initial: Initial,
    ) -> Result<(), End> {
        match source.into() {
            LiveSource::Broadcast(subscription) => {
                self.live
                    .insert(campaign.id, BroadcastStream::new(subscription.receiver));
                self.catch_up_then_live(campaign, subscription.from_seq, since, initial)
                    .await
            }
            LiveSource::Direct { from_seq } => {
                self.catch_up_then_live(campaign, from_seq, since, initial)
                    .await?;
                // The fan-out's frames start after what was just sent.
                let sent = self.sent.get(&campaign.id).copied().unwrap_or(from_seq);
                self.outbox().resume(sent);
                self.direct = Some(campaign.id);
                Ok(())
            }
        }
    }

    /// Replays from `since` or sends `initial`, as of log position
    /// `position`, after which live events start.
    async fn catch_up_then_live(
        &mut self,
        campaign: &Campaign,
        position: i64,
        since: Option<i64>,
        initial: Initial,
    ) -> Result<(), End> {
        if let Some(since) = since {
            let oldest = self
                .state
                .store
                .oldest_seq(campaign.id)
                .await
                .map_err(internal)?;
            let unavailable = since > position || oldest.is_some_and(|o| o > since + 1);
            if !unavailable {
                self.sent.insert(campaign.id, since);
                self.replay(campaign.id, since, Some(position)).await?;
                self.sent.insert(campaign.id, position.max(since));
                return Ok(());
            }
            self.send_json(&json!({
                "type": "replay_unavailable",
                "campaign_id": campaign.id,
                "requested_since": since,
                "oldest_seq": oldest,
                "seq": position,
            }))
            .await?;
        }
        self.sent.insert(campaign.id, position);
        self.send_initial(campaign, position, initial).await
    }

    async fn send_initial(
        &mut self,
        campaign: &Campaign,
        position: i64,
        initial: Initial,
    ) -> Result<(), End> {
        if initial == Initial::None {
            return Ok(());
        }
        let state = self.state.clone();
        let snapshot = snapshot(&state, campaign, position).await?;
        let mut data = burki_data(campaign.id, &snapshot);
        data["recent_activity"] = json!([]);
        self.send_json(&json!({"type": "initial_progress", "data": data, "seq": position}))
            .await?;
        self.outbox().sent(position);
        Ok(())
    }

    /// A fresh `progress_update` of one campaign, read from the store: the
    /// reply to `request_update`.
    async fn fresh_update(&mut self, campaign_id: i64) -> Result<(), End> {
        let campaign = self
            .state
            .store
            .campaign(&CampaignRef::Id(campaign_id))
            .await
            .map_err(internal)?
            .ok_or(End::Close(CLOSE_NOT_FOUND, "campaign not found"))?;
        let sent = self.sent.get(&campaign_id).copied().unwrap_or(0);
        let current = self
            .state
            .store
            .last_seq(campaign_id)
            .await
            .map_err(internal)?;
        let position = current.max(sent);
        let snapshot = snapshot(&self.state, &campaign, position).await?;
        let reply = json!({"type": "progress_update",
                           "data": burki_data(campaign_id, &snapshot), "seq": position});
        // Live events no newer, still on their way from the hub, are now
        // repeats: they would take the client back in time.
        self.sent.insert(campaign_id, position);
        if self.direct != Some(campaign_id) {
            return self.send_json(&reply).await;
        }
        // The fan-out writes this campaign's live frames, not this task: the
        // outbox skips the reply should a newer frame have gone out since
        // the store was read. What tungstenite holds goes out first.
        self.flush().await?;
        let frame = text_frame(reply.to_string().as_bytes());
        if self
            .outbox()
            .reply(position, frame)
            .map_err(|_| End::Drop)?
        {
            self.unreported_messages += 1;
        }
        Ok(())
    }

    /// After a lag, catches a campaign up from the log.
    async fn catch_up(&mut self, campaign_id: i64) -> Result<(), End> {
        let after = self.sent.get(&campaign_id).copied().unwrap_or(0);
        self.replay(campaign_id, after, None).await
    }
}

/// The campaign as of log position `position` (the event's own
/// snapshot), or as stored now when the log is empty.
async fn snapshot(state: &AppState, campaign: &Campaign, position: i64) -> Result<Value, End> {
    if position > 0 {
        let events = state
            .store
            .events_since(campaign.id, position - 1, 1)
            .await
            .map_err(internal)?;
        if let Some(event) = events.first() {
            return Ok(event.data["campaign"].clone());
        }
    }
    let run = state
        .store
        .latest_run(campaign.id)
        .await
        .map_err(internal)?;
    Ok(snapshot_of(campaign, run.as_ref()))
}

impl Drop for Session {
    fn drop(&mut self) {
        self.report_messages();
        metrics::gauge!("herald_stream_connections", "protocol" => protocol_name(self.format))
            .decrement(1.0);
    }
}

fn protocol_name(format: Format) -> &'static str {
    match format {
        Format::Burki => "seed000",
        Format::Jobs => "seed003",
        Format::Iterations => "seed004",
        Format::Sse => "sse",
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Initial {
    None,
    Progress,
}

fn parse_since(raw: Option<&str>) -> Result<Option<i64>, String> {
    match raw {
        None => Ok(None),
        Some(s) => s
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .map(Some)
            .ok_or_else(|| format!("since must be a sequence number ≥ 0, got '{s}'")),
    }
}

/// How a socket gets a campaign's live events.
enum LiveSource {
    /// Through its own task, from the hub's broadcast channel.
    Broadcast(Subscription),
    /// Written by the hub's fan-out straight to the socket (seed 000's
    /// progress stream); live frames start after `from_seq`.
    Direct { from_seq: i64 },
}

impl From<Subscription> for LiveSource {
    fn from(subscription: Subscription) -> Self {
        Self::Broadcast(subscription)
    }
}

/// Authenticates and loads the path's campaign, or says how to close.
async fn open(
    state: &AppState,
    token: Option<&str>,
    id: &str,
) -> Result<(Auth, Campaign), (u16, &'static str)> {
    let auth = authenticate(state, token)
        .await
        .map_err(|_| (CLOSE_AUTH, "authentication failed"))?;
    match auth.campaign(state, id).await {
        Ok(campaign) => Ok((auth, campaign)),
        Err(ApiError::NotFound(_) | ApiError::Forbidden(_)) => {
            Err((CLOSE_NOT_FOUND, "campaign not found"))
        }
        Err(_) => Err((CLOSE_INTERNAL, "internal error")),
    }
}

/// Subscribes to a campaign's live events. The campaign streams subscribe
/// before the upgrade completes: a client that sees its socket open may at
/// once cause events (a seed 004 producer posts right after connecting),
/// and every one of them must reach it.
async fn subscribe(
    state: &AppState,
    campaign: &Campaign,
) -> Result<Subscription, (u16, &'static str)> {
    let current = newest_seq(state, campaign).await?;
    Ok(state
        .hub
        .subscribe(campaign.id, campaign.workspace_id, current))
}

/// [`subscribe`] for the hub's fan-out, which writes to `outbox`.
async fn subscribe_direct(
    state: &AppState,
    campaign: &Campaign,
    outbox: Arc<Outbox>,
) -> Result<LiveSource, (u16, &'static str)> {
    let current = newest_seq(state, campaign).await?;
    let from_seq = state
        .hub
        .subscribe_direct(campaign.id, campaign.workspace_id, current, outbox);
    Ok(LiveSource::Direct { from_seq })
}

/// The campaign log's newest sequence, as a subscription starts.
async fn newest_seq(state: &AppState, campaign: &Campaign) -> Result<i64, (u16, &'static str)> {
    state
        .store
        .last_seq(campaign.id)
        .await
        .map_err(|_| (CLOSE_INTERNAL, "internal error"))
}

/// [`open`], then [`subscribe`].
async fn open_subscribed(
    state: &AppState,
    token: Option<&str>,
    id: &str,
) -> Result<(Auth, Campaign, Subscription), (u16, &'static str)> {
    let (auth, campaign) = open(state, token, id).await?;
    let subscription = subscribe(state, &campaign).await?;
    Ok((auth, campaign, subscription))
}

async fn close_now(mut socket: Socket, code: u16, reason: &'static str) {
    let _ = socket.send(close_message(code, reason)).await;
}

fn close_message(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    }))
}

/// Client messages of seed 000 (and the monitor's subscribe/unsubscribe).
#[derive(Debug, Deserialize)]
struct ClientMessage {
    #[serde(rename = "type")]
    kind: String,
    hours: Option<Value>,
    campaign_id: Option<Value>,
    campaign_ids: Option<Vec<Value>>,
}

/// Reads one client frame: `Ok(None)` to ignore it, `Err` when the peer left.
async fn client_message(
    session: &mut Session,
    message: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
) -> Result<Option<ClientMessage>, End> {
    let text = match message {
        None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Err(End::Drop),
        Some(Ok(Message::Text(_) | Message::Binary(_))) if session.inbound.check().is_err() => {
            // One error a second at most: answering every dropped message
            // would let a flood make the server write as fast as it reads.
            metrics::counter!("herald_stream_client_messages_dropped_total").increment(1);
            let now = std::time::Instant::now();
            if session
                .warned_at
                .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1))
            {
                session.warned_at = Some(now);
                session
                    .error(format!(
                        "too many messages: at most {} a second; the excess is dropped",
                        session.state.config.streams.client_messages_per_second
                    ))
                    .await?;
            }
            return Ok(None);
        }
        Some(Ok(Message::Text(text))) => text,
        Some(Ok(Message::Binary(_))) => {
            session
                .error("binary frames are not supported; send JSON text".into())
                .await?;
            return Ok(None);
        }
        Some(Ok(_)) => return Ok(None),
    };
    if text.len() > session.state.config.streams.max_client_message_bytes {
        session
            .error(format!(
                "message of {} bytes is over the limit of {}",
                text.len(),
                session.state.config.streams.max_client_message_bytes
            ))
            .await?;
        return Ok(None);
    }
    match serde_json::from_str::<ClientMessage>(&text) {
        Ok(message) => Ok(Some(message)),
        Err(err) => {
            session.error(format!("malformed message: {err}")).await?;
            Ok(None)
        }
    }
}

/// Answers the client messages every seed-000 socket understands.
async fn answer_common(
    session: &mut Session,
    message: &ClientMessage,
    campaign_ids: &[i64],
) -> Result<bool, End> {
    match message.kind.as_str() {
        "ping" => {
            session
                .send_json(&json!({"type": "pong", "timestamp": unix_now()}))
                .await?;
        }
        "request_update" => {
            for id in campaign_ids {
                session.fresh_update(*id).await?;
            }
        }
        "request_history" => {
            let hours = match message.hours.as_ref().map(Value::as_i64) {
                None => 24,
                Some(Some(h)) if (1..=720).contains(&h) => h,
                Some(_) => {
                    session
                        .error("hours must be an integer from 1 to 720".into())
                        .await?;
                    return Ok(true);
                }
            };
            let since_minute = (chrono::Utc::now().timestamp() / 60) - hours * 60;
            let mut data = Vec::new();
            for id in campaign_ids {
                let buckets = session
                    .state
                    .store
                    .metrics_history(*id, since_minute)
                    .await
                    .map_err(internal)?;
                for b in buckets {
                    let attempts = b.completed + b.failed;
                    data.push(json!({
                        "timestamp": chrono::DateTime::from_timestamp(b.minute * 60, 0)
                            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
                        "completed": b.completed,
                        "failed": b.failed,
                        "success_rate": if attempts > 0 { (b.completed as f64 * 10_000.0 / attempts as f64).round() / 100.0 } else { 0.0 },
                    }));
                }
            }
            session
                .send_json(&json!({"type": "metrics_history", "data": data}))
                .await?;
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// Waits for the next live event, if any stream is followed.
/// What the live side of a session produced.
enum Live {
    Event(Arc<HubEvent>),
    /// The session fell behind: catch this campaign (or, `None`, every
    /// campaign it has sent) up from the log.
    Lagged(Option<i64>),
    /// The workspace stream closed.
    Ended,
    Nothing,
}

/// The next live event of the session's campaigns or workspace; pends
/// while it follows nothing.
async fn next_live(
    live: &mut StreamMap<i64, BroadcastStream<Arc<HubEvent>>>,
    workspace: &mut Option<BroadcastStream<Arc<HubEvent>>>,
) -> Live {
    if let Some(workspace) = workspace {
        return match workspace.next().await {
            Some(Ok(event)) => Live::Event(event),
            Some(Err(BroadcastStreamRecvError::Lagged(_))) => Live::Lagged(None),
            None => Live::Ended,
        };
    }
    if live.is_empty() {
        std::future::pending::<()>().await;
    }
    match live.next().await {
        Some((_, Ok(event))) => Live::Event(event),
        Some((id, Err(BroadcastStreamRecvError::Lagged(_)))) => Live::Lagged(Some(id)),
        None => Live::Nothing,
    }
}

/// What a protocol does with the messages its clients send; everything
/// else about a socket is the same for all of them (see [`serve`]).
trait Protocol: Send {
    fn on_message(
        &mut self,
        session: &mut Session,
        message: ClientMessage,
    ) -> impl std::future::Future<Output = Result<(), End>> + Send;
}

/// At most this many frames go out in one write, so one socket far behind
/// does not hold its worker thread from the others for long.
const MOST_FRAMES_PER_WRITE: usize = 64;

/// Sends what the hub has for a socket: the event, and with it every event
/// already waiting, in one write rather than a system call each (sockets
/// fall behind when ten thousand share a busy server); or, after a lag, a
/// catch-up from the log.
///
/// Of the waiting events, a snapshot that a newer one of the same campaign
/// supersedes is skipped — the hub's own coalescing rule, applied per
/// socket: a socket that fell behind is sent the current counters, not the
/// backlog, so the further behind it is the less it costs to catch up.
async fn on_live(session: &mut Session, live: Live) -> Result<(), End> {
    use futures::FutureExt as _;
    let mut waiting: Vec<Arc<HubEvent>> = Vec::new();
    let mut next = Some(live);
    while let Some(live) = next.take() {
        match live {
            Live::Event(event) => {
                supersede(&mut waiting, event, session.format);
                if waiting.len() < MOST_FRAMES_PER_WRITE {
                    next = next_live(&mut session.live, &mut session.workspace).now_or_never();
                }
            }
            // Frames already waiting go out ahead of the replay, which flushes.
            Live::Lagged(lagged) => {
                session.queue_all(waiting.drain(..)).await?;
                let ids: Vec<i64> = match lagged {
                    Some(id) => vec![id],
                    None => session.sent.keys().copied().collect(),
                };
                for id in ids {
                    session.catch_up(id).await?;
                }
            }
            Live::Ended => {
                session.queue_all(waiting.drain(..)).await?;
                session.flush().await?;
                return Err(End::Close(CLOSE_INTERNAL, "stream ended"));
            }
            Live::Nothing => {}
        }
    }
    session.queue_all(waiting).await?;
    session.flush().await
}

/// Adds `event` to the frames waiting for a socket, dropping the waiting
/// snapshot of the same campaign it supersedes: a progress event's, or in
/// seed 000 (where every message is a `progress_update` of the campaign's
/// whole state, so the newest says everything the older ones did) any.
fn supersede(waiting: &mut Vec<Arc<HubEvent>>, event: Arc<HubEvent>, format: Format) {
    let is_snapshot = |e: &HubEvent| format == Format::Burki || is_coalescable(&e.event.kind);
    let campaign_id = event.event.campaign_id;
    if is_snapshot(&event) {
        let previous = waiting
            .iter()
            .rposition(|e| e.event.campaign_id == campaign_id);
        if let Some(at) = previous.filter(|&at| is_snapshot(&waiting[at])) {
            waiting.remove(at);
        }
    }
    waiting.push(event);
}

/// Runs a socket until it ends, for every protocol: server shutdown (1001),
/// the client's messages (each handed to `protocol`), live events, pings,
/// and with `idle` a timeout that each delivered event resets.
async fn serve(
    session: &mut Session,
    idle: Option<Duration>,
    protocol: &mut impl Protocol,
) -> Result<(), End> {
    // The timers and the shutdown signal are made once and kept across
    // iterations: a frame wakes the loop twice, and registering new ones
    // each time was a timer-wheel insert and removal per frame per socket.
    let ping_every = session.state.config.streams.ping_interval;
    let ping = tokio::time::sleep(ping_every);
    // Each delivered event moves the idle deadline; the timer itself is
    // reset only when it fires early.
    let mut idle_until = Instant::now() + idle.unwrap_or_default();
    let idle_timer = sleep_until(idle_until);
    let shutdown = session.state.shutdown.clone();
    let cancelled = shutdown.cancelled();
    let outbox = session.outbox().clone();
    tokio::pin!(ping, idle_timer, cancelled);
    loop {
        tokio::select! {
            // Live events first: when one woke the loop, the other branches
            // are not polled again for it.
            biased;
            () = &mut cancelled => return Err(End::Close(CLOSE_GOING_AWAY, "server shutting down")),
            live = next_live(&mut session.live, &mut session.workspace) => {
                if let (Live::Event(_), Some(idle)) = (&live, idle) {
                    idle_until = Instant::now() + idle;
                }
                on_live(session, live).await?;
            }
            // Frames the fan-out could not write at once.
            () = outbox.frames_waiting() => session.flush().await?,
            incoming = session.socket.next() => {
                if let Some(message) = client_message(session, incoming).await? {
                    protocol.on_message(session, message).await?;
                }
            }
            () = &mut ping => {
                ping.as_mut().reset(Instant::now() + ping_every);
                session.report_messages();
                session.socket.send(Message::Ping(Default::default())).await.map_err(|_| End::Drop)?;
            }
            () = &mut idle_timer, if idle.is_some() => {
                if Instant::now() < idle_until {
                    idle_timer.as_mut().reset(idle_until);
                } else {
                    return Err(End::Close(CLOSE_NORMAL, "idle timeout: no campaign activity"));
                }
            }
        }
    }
}

// ---------------------------------------------------------------- seed 000

pub async fn progress(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(params): Query<WsParams>,
    ws: WsUpgrade,
) -> Response {
    // Subscribed before the upgrade completes (see [`subscribe`]); the
    // fan-out holds the frames until the socket has its first snapshot.
    let outbox = Outbox::new();
    let opened = match open(&state, params.token.as_deref(), &id).await {
        Ok((_, campaign)) => subscribe_direct(&state, &campaign, outbox.clone())
            .await
            .map(|source| (campaign, source)),
        Err(refusal) => Err(refusal),
    };
    upgrade(ws, &state).on_upgrade_with(outbox, move |socket| async move {
        let (campaign, subscription) = match opened {
            Ok(opened) => opened,
            Err((code, reason)) => return close_now(socket, code, reason).await,
        };
        let mut session = Session::new(socket, state, Format::Burki);
        let end = run_progress(
            &mut session,
            &campaign,
            subscription,
            params.since.as_deref(),
        )
        .await;
        finish(session, end).await;
    })
}

async fn finish(session: Session, end: End) {
    match end {
        End::Close(code, reason) => session.close(code, reason).await,
        End::Drop => {}
    }
}

/// Seed 000 progress: the common messages about its one campaign.
struct Progress {
    ids: [i64; 1],
}

impl Protocol for Progress {
    async fn on_message(
        &mut self,
        session: &mut Session,
        message: ClientMessage,
    ) -> Result<(), End> {
        if !answer_common(session, &message, &self.ids).await? {
            session
                .error(format!("unknown message type '{}'", message.kind))
                .await?;
        }
        Ok(())
    }
}

async fn run_progress(
    session: &mut Session,
    campaign: &Campaign,
    subscription: LiveSource,
    since: Option<&str>,
) -> End {
    let result: Result<(), End> = async {
        session
            .send_json(&json!({"type": "connection_ack", "campaign_id": campaign.id, "timestamp": unix_now()}))
            .await?;
        let since = match parse_since(since) {
            Ok(since) => since,
            Err(message) => {
                session.error(message).await?;
                None
            }
        };
        session
            .follow(campaign, subscription, since, Initial::Progress)
            .await?;
        serve(session, None, &mut Progress { ids: [campaign.id] }).await
    }
    .await;
    match result {
        Ok(()) => End::Close(CLOSE_NORMAL, "bye"),
        Err(end) => end,
    }
}

pub async fn monitor(
    State(state): State<AppState>,
    Query(params): Query<WsParams>,
    ws: WsUpgrade,
) -> Response {
    upgrade(ws, &state).on_upgrade(move |socket| async move {
        let auth = match authenticate(&state, params.token.as_deref()).await {
            Ok(auth) => auth,
            Err(_) => return close_now(socket, CLOSE_AUTH, "authentication failed").await,
        };
        let mut session = Session::new(socket, state, Format::Burki);
        let end = run_monitor(&mut session, &auth).await;
        finish(session, end).await;
    })
}

fn ids_of(message: &ClientMessage) -> Vec<String> {
    let mut ids: Vec<String> = message
        .campaign_ids
        .iter()
        .flatten()
        .chain(message.campaign_id.iter())
        .map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect();
    ids.dedup();
    ids
}

/// Seed 000 monitor: subscribes and unsubscribes campaigns of the key's
/// workspace, and answers the common messages about those it follows.
struct Monitor<'a> {
    auth: &'a Auth,
    followed: HashSet<i64>,
}

impl Protocol for Monitor<'_> {
    async fn on_message(
        &mut self,
        session: &mut Session,
        message: ClientMessage,
    ) -> Result<(), End> {
        match message.kind.as_str() {
            "subscribe" => {
                let ids = ids_of(&message);
                if ids.is_empty() {
                    session
                        .error("subscribe needs campaign_id or campaign_ids".into())
                        .await?;
                }
                for id in ids {
                    match self.auth.campaign(&session.state, &id).await {
                        Ok(campaign) if self.followed.insert(campaign.id) => {
                            let subscription = subscribe(&session.state, &campaign)
                                .await
                                .map_err(|(code, reason)| End::Close(code, reason))?;
                            session
                                .follow(&campaign, subscription, None, Initial::Progress)
                                .await?;
                            session
                                .send_json(
                                    &json!({"type": "subscribed", "campaign_id": campaign.id}),
                                )
                                .await?;
                        }
                        Ok(_) => {}
                        Err(_) => {
                            session.send_json(&json!({"type": "error", "campaign_id": id,
                                "code": CLOSE_NOT_FOUND, "message": format!("campaign '{id}' not found")})).await?;
                        }
                    }
                }
            }
            "unsubscribe" => {
                for id in ids_of(&message) {
                    if let Ok(id) = id.parse::<i64>() {
                        self.followed.remove(&id);
                        session.live.remove(&id);
                        session.sent.remove(&id);
                        session
                            .send_json(&json!({"type": "unsubscribed", "campaign_id": id}))
                            .await?;
                    }
                }
            }
            _ => {
                let ids: Vec<i64> = self.followed.iter().copied().collect();
                if !answer_common(session, &message, &ids).await? {
                    session
                        .error(format!("unknown message type '{}'", message.kind))
                        .await?;
                }
            }
        }
        Ok(())
    }
}

async fn run_monitor(session: &mut Session, auth: &Auth) -> End {
    let result: Result<(), End> = async {
        session
            .send_json(&json!({"type": "connection_ack", "campaign_id": null, "timestamp": unix_now()}))
            .await?;
        let (campaigns, _) = session
            .state
            .store
            .list_campaigns(auth.workspace_id, None, 0, 100)
            .await
            .map_err(internal)?;
        let overview: Vec<Value> = campaigns
            .iter()
            .map(|c| json!({"campaign_id": c.id, "uuid": c.uuid, "name": c.name, "status": c.status}))
            .collect();
        session
            .send_json(&json!({"type": "campaigns_overview", "data": overview}))
            .await?;
        let mut monitor = Monitor {
            auth,
            followed: HashSet::new(),
        };
        serve(session, None, &mut monitor).await
    }
    .await;
    match result {
        Ok(()) => End::Close(CLOSE_NORMAL, "bye"),
        Err(end) => end,
    }
}

// ---------------------------------------------------------------- seed 003

pub async fn jobs(
    State(state): State<AppState>,
    Path(client_id): Path<String>,
    Query(params): Query<WsParams>,
    ws: WsUpgrade,
) -> Response {
    // Decided before the upgrade completes, so a client whose socket opened
    // holds its client id.
    let valid_id = !client_id.is_empty()
        && client_id.len() <= 128
        && client_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    let admitted = match authenticate(&state, params.token.as_deref()).await {
        Err(_) => Err("authentication failed"),
        Ok(_) if !valid_id => Err("client_id must be 1-128 letters, digits, '-' or '_'"),
        Ok(auth) => match ClientIdClaim::take(&state, auth.workspace_id, &client_id) {
            Some(claim) => Ok((auth, claim)),
            None => Err("client_id already connected"),
        },
    };
    // Subscribed before the upgrade completes too (see [`subscribe`]).
    let subscribed = match admitted {
        Ok((auth, claim)) => subscribe_workspace(&state, &auth)
            .await
            .map(|subscribed| (claim, subscribed)),
        Err(reason) => Err((CLOSE_AUTH, reason)),
    };
    upgrade(ws, &state).on_upgrade(move |socket| async move {
        let (_claim, subscribed) = match subscribed {
            Ok(subscribed) => subscribed,
            Err((code, reason)) => return close_now(socket, code, reason).await,
        };
        let mut session = Session::new(socket, state, Format::Jobs);
        let end = run_jobs(&mut session, subscribed).await;
        finish(session, end).await;
    })
}

/// A subscription to every campaign of a workspace, with the log position
/// each existing campaign had when it began.
struct WorkspaceSubscription {
    receiver: tokio::sync::broadcast::Receiver<Arc<HubEvent>>,
    current: Vec<(i64, i64)>,
}

async fn subscribe_workspace(
    state: &AppState,
    auth: &Auth,
) -> Result<WorkspaceSubscription, (u16, &'static str)> {
    // One read for all of them, however many (a workspace may have more
    // campaigns than a page lists).
    let current = state
        .store
        .last_seqs_of_workspace(auth.workspace_id)
        .await
        .map_err(|_| (CLOSE_INTERNAL, "internal error"))?;
    let receiver = state.hub.subscribe_workspace(auth.workspace_id, &current);
    Ok(WorkspaceSubscription { receiver, current })
}

/// Holds a client id for the life of its socket (each must be distinct).
struct ClientIdClaim {
    state: AppState,
    key: i64,
}

impl ClientIdClaim {
    fn take(state: &AppState, workspace_id: i64, client_id: &str) -> Option<Self> {
        // Client ids share the socket table under a hashed key; collisions
        // between workspaces are harmless (the second waits its turn).
        let key =
            -(1 + (workspace_id.wrapping_mul(1_000_003) ^ fxhash(client_id)).abs() % i64::MAX / 2);
        let mut sockets = state.sockets.lock().expect("socket table lock");
        if sockets.get(&key).copied().unwrap_or(0) > 0 {
            return None;
        }
        sockets.insert(key, 1);
        Some(Self {
            state: state.clone(),
            key,
        })
    }
}

impl Drop for ClientIdClaim {
    fn drop(&mut self) {
        self.state
            .sockets
            .lock()
            .expect("socket table lock")
            .remove(&self.key);
    }
}

fn fxhash(s: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h >> 1) as i64
}

/// Seed 003 jobs: answers `ping`.
struct Jobs;

impl Protocol for Jobs {
    async fn on_message(
        &mut self,
        session: &mut Session,
        message: ClientMessage,
    ) -> Result<(), End> {
        if message.kind == "ping" {
            session
                .send_json(&json!({"type": "pong", "timestamp": unix_now()}))
                .await
        } else {
            session
                .error(format!("unknown message type '{}'", message.kind))
                .await
        }
    }
}

async fn run_jobs(session: &mut Session, subscribed: WorkspaceSubscription) -> End {
    let result: Result<(), End> = async {
        session.sent.extend(subscribed.current);
        session.workspace = Some(BroadcastStream::new(subscribed.receiver));
        serve(session, None, &mut Jobs).await
    }
    .await;
    match result {
        Ok(()) => End::Close(CLOSE_NORMAL, "bye"),
        Err(end) => end,
    }
}

// ---------------------------------------------------------------- seed 004

/// Counts a key's open seed-004 sockets; the slot frees on drop.
struct SocketSlot {
    state: AppState,
    key_id: i64,
}

impl SocketSlot {
    fn take(state: &AppState, key_id: i64) -> Option<Self> {
        let mut sockets = state.sockets.lock().expect("socket table lock");
        let open = sockets.entry(key_id).or_insert(0);
        if *open >= state.config.streams.max_sockets_per_key {
            return None;
        }
        *open += 1;
        Some(Self {
            state: state.clone(),
            key_id,
        })
    }
}

impl Drop for SocketSlot {
    fn drop(&mut self) {
        let mut sockets = self.state.sockets.lock().expect("socket table lock");
        if let Some(open) = sockets.get_mut(&self.key_id) {
            *open = open.saturating_sub(1);
        }
    }
}

pub async fn iterations(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(params): Query<WsParams>,
    ws: WsUpgrade,
) -> Response {
    // Checked before the upgrade completes, so a client that sees its socket
    // open holds its slot.
    let opened = open_subscribed(&state, params.token.as_deref(), &id).await;
    let slot = match &opened {
        Ok((auth, _, _)) => SocketSlot::take(&state, auth.key_id).ok_or((
            CLOSE_TOO_MANY,
            "too many WebSocket connections for this API key",
        )),
        Err(refusal) => Err(*refusal),
    };
    upgrade(ws, &state).on_upgrade(move |socket| async move {
        let (_slot, campaign, subscription) = match (slot, opened) {
            (Ok(slot), Ok((_, campaign, subscription))) => (slot, campaign, subscription),
            (Err((code, reason)), _) | (_, Err((code, reason))) => {
                return close_now(socket, code, reason).await
            }
        };
        let mut session = Session::new(socket, state, Format::Iterations);
        let end = run_iterations(
            &mut session,
            &campaign,
            subscription,
            params.since.as_deref(),
        )
        .await;
        finish(session, end).await;
    })
}

/// Seed 004 iterations: only sends; any client message is an error.
struct Iterations;

impl Protocol for Iterations {
    async fn on_message(
        &mut self,
        session: &mut Session,
        message: ClientMessage,
    ) -> Result<(), End> {
        let reply = json!({"type": "error", "timestamp": chrono::Utc::now().to_rfc3339(),
            "data": {"code": "UNSUPPORTED_MESSAGE",
                     "message": format!("this stream takes no '{}' messages; it only sends", message.kind)}});
        session.send_json(&reply).await
    }
}

async fn run_iterations(
    session: &mut Session,
    campaign: &Campaign,
    subscription: Subscription,
    since: Option<&str>,
) -> End {
    let result: Result<(), End> = async {
        let since = match parse_since(since) {
            Ok(since) => since,
            Err(message) => {
                session
                    .send_json(
                        &json!({"type": "error", "timestamp": chrono::Utc::now().to_rfc3339(),
                                       "data": {"code": "INVALID_SINCE", "message": message}}),
                    )
                    .await?;
                None
            }
        };
        session
            .follow(campaign, subscription, since, Initial::None)
            .await?;
        let idle = session.state.config.streams.idle_timeout;
        serve(session, Some(idle), &mut Iterations).await
    }
    .await;
    match result {
        Ok(()) => End::Close(CLOSE_NORMAL, "bye"),
        Err(end) => end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(campaign_id: i64, seq: i64, kind: &str) -> Arc<HubEvent> {
        Arc::new(HubEvent::new(StoredEvent {
            campaign_id,
            seq,
            kind: kind.to_owned(),
            data: serde_json::Value::Null,
            created_at: 0,
        }))
    }

    const WAITING: [(i64, i64, &str); 7] = [
        (1, 1, "progress"),
        (2, 2, "progress"),
        (1, 3, "progress"),
        (1, 4, "batch_completed"),
        (1, 5, "progress"),
        (1, 6, "progress"),
        (2, 7, "run_completed"),
    ];

    fn kept(format: Format) -> Vec<(i64, i64)> {
        let mut waiting = Vec::new();
        for (campaign, seq, kind) in WAITING {
            supersede(&mut waiting, event(campaign, seq, kind), format);
        }
        waiting
            .iter()
            .map(|e| (e.event.campaign_id, e.seq()))
            .collect()
    }

    #[test]
    fn a_waiting_snapshot_is_dropped_only_for_a_newer_one_of_its_campaign() {
        // seq 1 gave way to 3 and 5 to 6; campaign 2's progress stays
        // (a status change supersedes nothing), and so does anything that
        // is not a progress snapshot.
        assert_eq!(
            kept(Format::Iterations),
            [(2, 2), (1, 3), (1, 4), (1, 6), (2, 7)]
        );
    }

    #[test]
    fn in_seed_000_every_waiting_frame_is_a_snapshot_of_its_campaign() {
        // Every seed-000 message is the campaign's whole state: only the
        // newest of each campaign goes out, in the order they came.
        assert_eq!(kept(Format::Burki), [(1, 6), (2, 7)]);
    }
}
