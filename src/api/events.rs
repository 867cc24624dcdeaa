//! Campaign events over HTTP: producers `POST` them for campaigns Herald
//! does not run itself (channel `external`), and anyone may read every
//! campaign's event log live as Server-Sent Events, resuming with
//! `Last-Event-ID`.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::{BroadcastStream, ReceiverStream};
use utoipa::ToSchema;

use super::extract::{ApiJson, Auth, QueryParams};
use super::{ApiError, AppState};
use crate::domain::{CampaignStatus, Channel};
use crate::store::StoredEvent;
use crate::streams::protocol::{burki_data, snapshot_of, EXTERNAL_KINDS};
use crate::streams::{coalesce, Format, HubEvent};

/// Largest `data` of one posted event, serialised.
pub const MAX_EVENT_BYTES: usize = 64 * 1024;
/// Events one request may post.
pub const MAX_EVENTS_PER_REQUEST: usize = 100;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/campaigns/{id}/events", get(stream).post(post))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PostedEvent {
    /// One of the seed event names: iteration_start, evaluation_complete,
    /// iteration_complete, campaign_complete, error, job_progress,
    /// job_complete, file_uploaded.
    #[serde(rename = "type")]
    kind: String,
    /// The event's fields, as the seed shows them.
    #[schema(value_type = Object)]
    #[serde(default)]
    data: Value,
}

/// One event, or `{"events": [...]}` for up to 100.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum PostEvents {
    Batch { events: Vec<PostedEvent> },
    One(PostedEvent),
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Accepted {
    pub accepted: usize,
    /// `{seq, type}` of each stored event, in order.
    #[schema(value_type = Vec<Object>)]
    pub events: Vec<Value>,
}

/// A field an event type needs, and the check of its JSON type.
type RequiredField = (&'static str, fn(&Value) -> bool);

/// Checks a posted event's fields against its type.
fn check(index: Option<usize>, event: &PostedEvent) -> Result<(), ApiError> {
    let at = |field: &str| match index {
        Some(i) => format!("events[{i}].{field}"),
        None => field.to_owned(),
    };
    if !EXTERNAL_KINDS.contains(&event.kind.as_str()) {
        return Err(ApiError::invalid(
            at("type"),
            format!(
                "'{}' is not an event type; expected one of {}",
                event.kind,
                EXTERNAL_KINDS.join(", ")
            ),
        ));
    }
    let Some(data) = event.data.as_object() else {
        return Err(ApiError::invalid(at("data"), "data must be a JSON object"));
    };
    if data.contains_key("campaign") {
        return Err(ApiError::invalid(
            at("data.campaign"),
            "'campaign' is reserved",
        ));
    }
    let size = event.data.to_string().len();
    if size > MAX_EVENT_BYTES {
        return Err(ApiError::invalid(
            at("data"),
            format!("data is {size} bytes; the limit is {MAX_EVENT_BYTES}"),
        ));
    }
    let required: &[RequiredField] = match event.kind.as_str() {
        "iteration_start" | "iteration_complete" => &[("iteration", Value::is_i64)],
        "evaluation_complete" => &[
            ("iteration", Value::is_i64),
            ("evaluation_index", Value::is_i64),
        ],
        "campaign_complete" => &[("status", Value::is_string)],
        "error" => &[("code", Value::is_string), ("message", Value::is_string)],
        "job_progress" => &[("progress", Value::is_number)],
        "job_complete" => &[("status", Value::is_string)],
        "file_uploaded" => &[("fileId", Value::is_string), ("name", Value::is_string)],
        _ => &[],
    };
    for (field, is_type) in required {
        match data.get(*field) {
            Some(value) if is_type(value) => {}
            Some(_) => {
                return Err(ApiError::invalid(
                    at(&format!("data.{field}")),
                    format!("{field} has the wrong type"),
                ))
            }
            None => {
                return Err(ApiError::invalid(
                    at(&format!("data.{field}")),
                    format!("{} needs data.{field}", event.kind),
                ))
            }
        }
    }
    if event.kind == "job_progress" {
        let progress = data["progress"].as_f64().unwrap_or(-1.0);
        if !(0.0..=100.0).contains(&progress) {
            return Err(ApiError::invalid(
                at("data.progress"),
                "progress must be from 0 to 100",
            ));
        }
    }
    Ok(())
}

#[utoipa::path(post, path = "/v1/campaigns/{id}/events", tag = "streams",
    params(("id" = String, Path, description = "Campaign id (integer) or uuid")),
    request_body = PostEvents,
    responses(
        (status = 201, description = "Stored in the log and streamed", body = Accepted),
        (status = 400, description = "Malformed JSON", body = super::ErrorBody),
        (status = 401, description = "Missing or invalid key", body = super::ErrorBody),
        (status = 403, description = "Another workspace's campaign", body = super::ErrorBody),
        (status = 404, description = "No such campaign", body = super::ErrorBody),
        (status = 409, description = "Not an external campaign, or already finished", body = super::ErrorBody),
        (status = 413, description = "Body too large", body = super::ErrorBody),
        (status = 422, description = "Unknown type or a missing or bad field", body = super::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn post(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<PostEvents>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let campaign = auth.campaign(&state, &id).await?;
    let events = match body {
        PostEvents::One(event) => {
            check(None, &event)?;
            vec![event]
        }
        PostEvents::Batch { events } => {
            if events.is_empty() || events.len() > MAX_EVENTS_PER_REQUEST {
                return Err(ApiError::invalid(
                    "events",
                    format!("send 1 to {MAX_EVENTS_PER_REQUEST} events per request"),
                ));
            }
            for (i, event) in events.iter().enumerate() {
                check(Some(i), event)?;
            }
            events
        }
    };
    if campaign.channel != Channel::External {
        return Err(ApiError::Conflict {
            message: format!(
                "campaign is {}; Herald runs it and writes its events itself — post events to an external campaign",
                campaign.channel.as_str()
            ),
            current_status: None,
        });
    }
    if campaign.status.is_terminal() {
        return Err(ApiError::Conflict {
            message: format!("campaign is {}; it takes no more events", campaign.status),
            current_status: Some(campaign.status),
        });
    }
    let finish = events
        .iter()
        .rev()
        .find(|e| e.kind == "campaign_complete")
        .map(|e| match e.data["status"].as_str() {
            Some("failed") => CampaignStatus::Failed,
            Some("cancelled") => CampaignStatus::Cancelled,
            _ => CampaignStatus::Completed,
        });
    let pairs: Vec<(String, Value)> = events.into_iter().map(|e| (e.kind, e.data)).collect();
    let stored = state
        .store
        .append_external_events(campaign.id, &pairs, finish)
        .await?;
    state.published(&campaign);
    Ok((
        StatusCode::CREATED,
        Json(Accepted {
            accepted: pairs.len(),
            events: stored
                .iter()
                .map(|e| json!({"seq": e.seq, "type": e.kind}))
                .collect(),
        }),
    ))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct StreamParams {
    /// Resume after this sequence (same as the `Last-Event-ID` header).
    since: Option<String>,
}

fn sse_event(event: &StoredEvent) -> Event {
    let frame = HubEvent::new(event.clone()).frame(Format::Sse);
    Event::default()
        .id(event.seq.to_string())
        .event(event.kind.clone())
        .data(frame.as_ref().map_or("{}", |f| f.as_str()))
}

#[utoipa::path(get, path = "/v1/campaigns/{id}/events", tag = "streams",
    params(("id" = String, Path, description = "Campaign id (integer) or uuid"), StreamParams,
           ("Last-Event-ID" = Option<String>, Header, description = "Resume after this sequence")),
    responses(
        (status = 200, description = "text/event-stream: `snapshot`, then every event with its seq as id", content_type = "text/event-stream"),
        (status = 401, description = "Missing or invalid key", body = super::ErrorBody),
        (status = 403, description = "Another workspace's campaign", body = super::ErrorBody),
        (status = 404, description = "No such campaign", body = super::ErrorBody),
        (status = 422, description = "Bad Last-Event-ID or since", body = super::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn stream(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    QueryParams(params): QueryParams<StreamParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let campaign = auth.campaign(&state, &id).await?;
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or(params.since);
    let since = resume
        .as_deref()
        .map(|s| {
            s.trim()
                .parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| {
                    ApiError::invalid("Last-Event-ID", format!("'{s}' is not a sequence number"))
                })
        })
        .transpose()?;
    let current = state.store.last_seq(campaign.id).await?;
    let subscription = state
        .hub
        .subscribe(campaign.id, campaign.workspace_id, current);
    let position = subscription.from_seq;
    let oldest = state.store.oldest_seq(campaign.id).await?;
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(64);
    let store = state.store.clone();
    let shutdown = state.shutdown.clone();
    tokio::spawn(async move {
        let mut last = position;
        let replayable = since.is_some_and(|s| s <= position && oldest.is_none_or(|o| o <= s + 1));
        if replayable {
            let mut after = since.unwrap_or(0);
            while after < position {
                let Ok(events) = store.events_since(campaign.id, after, 1000).await else {
                    return;
                };
                let Some(tail) = events.last() else { break };
                after = tail.seq;
                for event in coalesce(events.into_iter().filter(|e| e.seq <= position).collect()) {
                    if tx.send(Ok(sse_event(&event))).await.is_err() {
                        return;
                    }
                }
            }
        } else {
            if since.is_some() {
                let note = Event::default()
                    .event("replay_unavailable")
                    .data(json!({"requested_since": since, "oldest_seq": oldest}).to_string());
                if tx.send(Ok(note)).await.is_err() {
                    return;
                }
            }
            let run = store.latest_run(campaign.id).await.ok().flatten();
            let snapshot = snapshot_of(&campaign, run.as_ref());
            let event = Event::default()
                .id(position.to_string())
                .event("snapshot")
                .data(burki_data(campaign.id, &snapshot).to_string());
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
        }
        let mut live = BroadcastStream::new(subscription.receiver);
        loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => return,
                () = tx.closed() => return,
                next = live.next() => next,
            };
            match next {
                Some(Ok(event)) if event.seq() > last => {
                    last = event.seq();
                    if tx.send(Ok(sse_event(&event.event))).await.is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(BroadcastStreamRecvError::Lagged(_))) => {
                    let Ok(events) = store.events_since(campaign.id, last, 1000).await else {
                        return;
                    };
                    for event in coalesce(events) {
                        last = event.seq;
                        if tx.send(Ok(sse_event(&event))).await.is_err() {
                            return;
                        }
                    }
                }
                None => return,
            }
        }
    });
    Ok(Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}
