//! Seed 002 (Briq): status, analytics, run detail and frozen snapshot
//! under `/v1/campaign/{campaign_id}`, in the `{success, data, errors,
//! request_id}` envelope. Runs show `claimed` as `running`; rates are
//! 0.0–1.0 floats or null; phone numbers are E.164 digits without `+`.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::extract::{Auth, QueryParams};
use super::views::{rfc3339, rfc3339_opt};
use super::{ApiError, AppState};
use crate::domain::{Channel, ExecutionStatus, Scope, Template};
use crate::store::{Campaign, ExecutionQuery, RunRecord};

/// Recipients listed in a run detail; `recipient_summary` stays exact past it.
pub const MAX_RECIPIENTS: i64 = 500;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/campaign/{campaign_id}/status", get(status))
        .route("/v1/campaign/{campaign_id}/analytics", get(analytics))
        .route("/v1/campaign/{campaign_id}/runs/{run_id}", get(run_detail))
        .route(
            "/v1/campaign/{campaign_id}/runs/{run_id}/snapshot",
            get(snapshot),
        )
}

/// The envelope of every Briq answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Envelope {
    pub success: bool,
    /// The answer; null when `success` is false.
    #[schema(value_type = Option<Object>)]
    pub data: Value,
    #[schema(value_type = Option<Vec<Object>>)]
    pub errors: Option<Value>,
    pub request_id: String,
}

/// The request id the middleware gave this request.
fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("req_unknown")
        .to_owned()
}

pub struct BriqError {
    error: ApiError,
    request_id: String,
}

impl IntoResponse for BriqError {
    fn into_response(self) -> Response {
        self.error.log();
        let body = Envelope {
            success: false,
            data: Value::Null,
            errors: Some(json!([{
                "code": self.error.code(),
                "message": self.error.public_message(),
                "field": self.error.field(),
            }])),
            request_id: self.request_id,
        };
        (self.error.status(), Json(body)).into_response()
    }
}

/// Wraps a handler's result in the envelope, success or not.
fn envelope(request_id: String, answer: Result<Value, ApiError>) -> Result<Response, BriqError> {
    match answer {
        Ok(data) => Ok(ok(request_id, data)),
        Err(error) => Err(BriqError { error, request_id }),
    }
}

fn ok(request_id: String, data: Value) -> Response {
    (
        StatusCode::OK,
        Json(Envelope {
            success: true,
            data,
            errors: None,
            request_id,
        }),
    )
        .into_response()
}

/// Authenticates and loads the campaign, with errors in the envelope.
async fn campaign_for(
    state: &AppState,
    auth: Result<Auth, ApiError>,
    campaign_id: &str,
) -> Result<Campaign, ApiError> {
    auth?.campaign(state, campaign_id).await
}

async fn run_of(
    state: &AppState,
    campaign: &Campaign,
    run_id: &str,
) -> Result<RunRecord, ApiError> {
    let not_found = || ApiError::NotFound(format!("run '{run_id}' of this campaign"));
    let run = match run_id.parse::<i64>() {
        Ok(id) => state.store.run(id).await?,
        Err(_) => state.store.run_by_uuid(run_id).await?,
    }
    .ok_or_else(not_found)?;
    if run.campaign_id != campaign.id {
        return Err(not_found());
    }
    Ok(run)
}

fn digits(phone: &str) -> String {
    phone.trim_start_matches('+').to_owned()
}

fn channel_name(channel: Channel) -> &'static str {
    match channel {
        Channel::Sms => "SMS",
        Channel::Voice => "Voice",
        Channel::External => "External",
    }
}

fn rate(numerator: i64, denominator: i64) -> Value {
    if denominator <= 0 {
        return Value::Null;
    }
    let r = numerator as f64 / denominator as f64;
    json!((r * 10_000.0).round() / 10_000.0)
}

#[utoipa::path(get, path = "/v1/campaign/{campaign_id}/status", tag = "seed-002",
    params(("campaign_id" = String, Path, description = "Campaign uuid (or id)")),
    responses(
        (status = 200, description = "Latest run's status and counters, or the NO_RUN sentinel", body = Envelope),
        (status = 401, description = "Missing or invalid X-API-Key", body = Envelope),
        (status = 403, description = "Another workspace's campaign", body = Envelope),
        (status = 404, description = "No such campaign", body = Envelope),
    ),
    security(("api_key" = [])))]
pub async fn status(
    State(state): State<AppState>,
    headers: HeaderMap,
    auth: Result<Auth, ApiError>,
    Path(campaign_id): Path<String>,
) -> Result<Response, BriqError> {
    let request_id = request_id(&headers);
    let answer = async {
        // The campaign and its latest run in one statement: this is polled.
        let store = &state.store;
        let (campaign, run) = auth?
            .campaign_with(&campaign_id, |by| async move {
                store.campaign_status(&by).await
            })
            .await?;
        let Some(run) = run else {
            return Ok(json!({"campaign_id": campaign.uuid, "status": "NO_RUN"}));
        };
        let c = run.counters;
        Ok::<_, ApiError>(json!({
            "campaign_id": campaign.uuid,
            "campaign_run_id": run.uuid,
            "status": run.status.public(),
            "current_batch": run.completed_batches,
            "total_batches": run.total_batches,
            "recipient_count": c.total,
            "sent": c.sent,
            "failed": c.failed,
            "skipped": c.skipped,
            "delivered": c.delivered,
            "updated_at": rfc3339(run.updated_at),
        }))
    }
    .await;
    envelope(request_id, answer)
}

#[utoipa::path(get, path = "/v1/campaign/{campaign_id}/analytics", tag = "seed-002",
    params(("campaign_id" = String, Path, description = "Campaign uuid (or id)")),
    responses(
        (status = 200, description = "Aggregate analytics across runs; zeroed with null rates before any data", body = Envelope),
        (status = 401, description = "Missing or invalid X-API-Key", body = Envelope),
        (status = 403, description = "Another workspace's campaign", body = Envelope),
        (status = 404, description = "No such campaign", body = Envelope),
    ),
    security(("api_key" = [])))]
pub async fn analytics(
    State(state): State<AppState>,
    headers: HeaderMap,
    auth: Result<Auth, ApiError>,
    Path(campaign_id): Path<String>,
) -> Result<Response, BriqError> {
    let request_id = request_id(&headers);
    let answer = async {
        // The campaign and its totals in one statement: this is what
        // dashboards poll.
        let store = &state.store;
        let (campaign, totals) = auth?
            .campaign_with(&campaign_id, |by| async move {
                store.campaign_totals(&by).await
            })
            .await?;
        let mut c = totals.counters;
        // A connected call has no later delivery report: it is delivered.
        if campaign.channel != Channel::Sms {
            c.delivered = c.sent;
        }
        let has_data = c.sent + c.failed > 0;
        let pending_delivery = if campaign.channel == Channel::Sms {
            (c.sent - c.delivered - c.failed_delivery).max(0)
        } else {
            0
        };
        Ok::<_, ApiError>(json!({
            "campaign_id": campaign.uuid,
            "campaign_run_id": totals.last_ended_run,
            "workspace_id": format!("ws_{}", campaign.workspace_id),
            "total_recipients": c.total,
            "sent_count": c.sent,
            "failed_count": c.failed,
            "skipped_count": c.skipped,
            "cancelled_count": totals.cancelled,
            "delivered_count": c.delivered,
            "failed_delivery_count": c.failed_delivery,
            "pending_delivery_count": pending_delivery,
            "delivery_rate": if has_data { rate(c.delivered, c.sent) } else { Value::Null },
            "failure_rate": if has_data { rate(c.failed, c.total) } else { Value::Null },
            "first_sent_at": rfc3339_opt(totals.first_sent_at),
            "last_sent_at": rfc3339_opt(totals.last_sent_at),
            "completed_at": rfc3339_opt(totals.last_ended_at),
        }))
    }
    .await;
    envelope(request_id, answer)
}

fn run_json(run: &RunRecord) -> Value {
    let c = run.counters;
    json!({
        "id": run.uuid,
        "campaign_id": run.campaign_id,
        "status": run.status.public(),
        "recipients": run.recipients.as_str(),
        "recipient_count": c.total,
        "pending_count": c.pending + c.processing,
        "sent_count": c.sent,
        "failed_count": c.failed,
        "skipped_count": c.skipped,
        "delivered_count": c.delivered,
        "failed_delivery_count": c.failed_delivery,
        "current_batch": run.completed_batches,
        "total_batches": run.total_batches,
        "error": run.error,
        "scheduled_at": rfc3339(run.scheduled_at),
        "started_at": rfc3339_opt(run.started_at),
        "completed_at": rfc3339_opt(run.completed_at),
        "updated_at": rfc3339(run.updated_at),
    })
}

/// The stable string id of a batch: a UUID v5 of its run and sequence.
pub fn batch_uuid(run_uuid: &str, sequence: i64) -> String {
    let namespace = uuid::Uuid::parse_str(run_uuid).unwrap_or(uuid::Uuid::NAMESPACE_OID);
    uuid::Uuid::new_v5(&namespace, sequence.to_string().as_bytes()).to_string()
}

#[utoipa::path(get, path = "/v1/campaign/{campaign_id}/runs/{run_id}", tag = "seed-002",
    params(
        ("campaign_id" = String, Path, description = "Campaign uuid (or id)"),
        ("run_id" = String, Path, description = "Run id (uuid or integer)"),
    ),
    responses(
        (status = 200, description = "Run, snapshot summary, batches, first 500 recipients, summary", body = Envelope),
        (status = 401, description = "Missing or invalid X-API-Key", body = Envelope),
        (status = 403, description = "Another workspace's campaign", body = Envelope),
        (status = 404, description = "No such campaign, or the run is not this campaign's", body = Envelope),
    ),
    security(("api_key" = [])))]
pub async fn run_detail(
    State(state): State<AppState>,
    headers: HeaderMap,
    auth: Result<Auth, ApiError>,
    Path((campaign_id, run_id)): Path<(String, String)>,
) -> Result<Response, BriqError> {
    let request_id = request_id(&headers);
    let answer = async {
        let campaign = campaign_for(&state, auth, &campaign_id).await?;
        let run = run_of(&state, &campaign, &run_id).await?;
        let batches = state.store.batches(run.id).await?;
        let mut recipients = state
            .store
            .executions(
                campaign.id,
                &ExecutionQuery {
                    run_id: Some(run.id),
                    limit: MAX_RECIPIENTS + 1,
                    ..Default::default()
                },
            )
            .await?;
        let truncated = recipients.len() as i64 > MAX_RECIPIENTS;
        recipients.truncate(MAX_RECIPIENTS as usize);
        recipients.reverse();
        let snapshot = run.snapshot.as_ref();
        let channel = snapshot.map_or(campaign.channel, |s| s.channel);
        let c = run.counters;
        Ok::<_, ApiError>(json!({
            "run": run_json(&run),
            "campaign_name": campaign.name,
            "channel_name": channel_name(channel),
            "channel_provider": snapshot.map_or(campaign.provider.kind(), |s| s.provider.kind()),
            "snapshot": snapshot.map(|s| json!({
                "provider": s.provider.kind(),
                "sender_id": s.sender,
                "channel": channel_name(s.channel),
                "template": s.template,
                "personalized": Template::parse(&s.template).map(|t| !t.variables().is_empty()).unwrap_or(false),
                "frozen_at": rfc3339_opt(run.frozen_at),
            })),
            "batches": batches.iter().map(|b| json!({
                "id": batch_uuid(&run.uuid, b.batch_sequence),
                "batch_sequence": b.batch_sequence,
                "status": b.status,
                "recipient_count": b.recipient_count,
                "sent_count": b.counters.sent,
                "failed_count": b.counters.failed,
                "skipped_count": b.counters.skipped,
                "delivered_count": b.counters.delivered,
                "started_at": rfc3339_opt(b.started_at),
                "completed_at": rfc3339_opt(b.completed_at),
                "error_detail": b.error_detail,
            })).collect::<Vec<_>>(),
            "recipients": recipients.iter().map(|e| {
                let message_status = match (channel, &e.message_status) {
                    (Channel::Sms, status) => status.clone(),
                    (_, _) if e.status == ExecutionStatus::Pending || e.status == ExecutionStatus::InProgress => None,
                    (_, _) => Some(e.status.as_str().to_owned()),
                };
                json!({
                    "recipient_id": e.id.to_string(),
                    "phone_number": digits(&e.phone),
                    "recipient_status": e.status.as_str(),
                    "message_id": e.provider_message_id,
                    "message_status": message_status,
                    "sent_at": if e.status.is_success() { rfc3339_opt(e.executed_at) } else { None },
                })
            }).collect::<Vec<_>>(),
            "recipient_summary": {
                "total": c.total,
                "pending": c.pending + c.processing,
                "sent": c.sent,
                "delivered": c.delivered,
                "failed": c.failed,
            },
            "recipients_truncated": truncated,
        }))
    }
    .await;
    envelope(request_id, answer)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct SnapshotParams {
    /// `true` adds the recipients' phone numbers (PII; the key needs the
    /// `pii` scope); default false.
    include_recipients: Option<String>,
}

#[utoipa::path(get, path = "/v1/campaign/{campaign_id}/runs/{run_id}/snapshot", tag = "seed-002",
    params(
        ("campaign_id" = String, Path, description = "Campaign uuid (or id)"),
        ("run_id" = String, Path, description = "Run id (uuid or integer)"),
        SnapshotParams,
    ),
    responses(
        (status = 200, description = "The frozen dispatch state; recipients only when asked", body = Envelope),
        (status = 401, description = "Missing or invalid X-API-Key", body = Envelope),
        (status = 403, description = "Another workspace's campaign, or recipients asked for by a key without the `pii` scope", body = Envelope),
        (status = 404, description = "No such campaign or run, or no snapshot frozen yet", body = Envelope),
        (status = 422, description = "include_recipients is not true or false", body = Envelope),
    ),
    security(("api_key" = [])))]
pub async fn snapshot(
    State(state): State<AppState>,
    headers: HeaderMap,
    auth: Result<Auth, ApiError>,
    Path((campaign_id, run_id)): Path<(String, String)>,
    params: Result<QueryParams<SnapshotParams>, ApiError>,
) -> Result<Response, BriqError> {
    let request_id = request_id(&headers);
    let answer = async {
        let auth = auth?;
        let campaign = auth.campaign(&state, &campaign_id).await?;
        let QueryParams(params) = params?;
        let include = match params.include_recipients.as_deref() {
            None | Some("false") | Some("0") => false,
            Some("true") | Some("1") => true,
            Some(other) => {
                return Err(ApiError::invalid(
                    "include_recipients",
                    format!("include_recipients must be true or false, got '{other}'"),
                ))
            }
        };
        if include {
            // Phone numbers are for admin-tier, server-to-server reads.
            auth.require(Scope::Pii, "include_recipients")?;
        }
        let run = run_of(&state, &campaign, &run_id).await?;
        let snapshot = run
            .snapshot
            .as_ref()
            .ok_or_else(|| ApiError::NotFound(format!("a frozen snapshot of run '{run_id}'")))?;
        let mut data = json!({
            "run_id": run.uuid,
            "campaign_id": campaign.uuid,
            "recipient_count": run.counters.total,
            "content": {
                "channel": channel_name(snapshot.channel),
                "provider": snapshot.provider.kind(),
                "sender_id": snapshot.sender,
                "body": snapshot.template,
            },
            "cost": {
                "total_cost": run.cost_units,
                "currency_units": if snapshot.channel == Channel::Sms { "sms_parts" } else { "calls" },
            },
            "status": run.status.public(),
            "started_at": rfc3339_opt(run.started_at),
            "completed_at": rfc3339_opt(run.completed_at),
        });
        if include {
            let phones = state.store.run_phones(run.id).await?;
            data["recipients"] = json!(phones.iter().map(|p| digits(p)).collect::<Vec<_>>());
        }
        Ok(data)
    }
    .await;
    envelope(request_id, answer)
}
