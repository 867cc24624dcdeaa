//! Runs of a campaign (`/v1/campaigns/{id}/runs`), credits (`/v1/credits`)
//! and provider callbacks (`/v1/providers/twilio/status`).

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::extract::{ApiJson, Auth};
use super::views::{rfc3339, rfc3339_opt, CampaignView};
use super::{ApiError, AppState};
use crate::domain::{Action, CampaignStatus, ProviderSettings, Recipients};
use crate::providers::twilio;
use crate::store::{Counters, Receipt, RunRecord};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/campaigns/{id}/runs", post(create_run).get(list_runs))
        .route("/v1/credits", get(credits))
        .route("/v1/providers/twilio/status", post(twilio_status))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRun {
    /// `all` (default) or `failed`: only contacts whose last execution
    /// failed, got no answer or was busy.
    #[serde(default)]
    recipients: Recipients,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RunView {
    pub id: i64,
    pub uuid: String,
    /// `claimed` is shown as `running`.
    pub status: String,
    pub recipients: Recipients,
    #[schema(value_type = Object)]
    pub counters: Counters,
    pub total_batches: i64,
    pub completed_batches: i64,
    pub cost_units: i64,
    pub error: Option<String>,
    pub scheduled_at: String,
    pub started_at: Option<String>,
    pub completed_at: Option<String>,
}

impl From<&RunRecord> for RunView {
    fn from(r: &RunRecord) -> Self {
        Self {
            id: r.id,
            uuid: r.uuid.clone(),
            status: r.status.public().to_owned(),
            recipients: r.recipients,
            counters: r.counters,
            total_batches: r.total_batches,
            completed_batches: r.completed_batches,
            cost_units: r.cost_units,
            error: r.error.clone(),
            scheduled_at: rfc3339(r.scheduled_at),
            started_at: rfc3339_opt(r.started_at),
            completed_at: rfc3339_opt(r.completed_at),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RunList {
    pub runs: Vec<RunView>,
}

#[utoipa::path(post, path = "/v1/campaigns/{id}/runs", tag = "campaigns",
    params(("id" = String, Path, description = "Campaign id (integer) or uuid")),
    request_body = CreateRun,
    responses(
        (status = 201, description = "A new run is scheduled now; the campaign is running", body = CampaignView),
        (status = 400, description = "Malformed JSON", body = super::ErrorBody),
        (status = 401, description = "Missing or invalid key", body = super::ErrorBody),
        (status = 403, description = "Another workspace's campaign", body = super::ErrorBody),
        (status = 404, description = "No such campaign", body = super::ErrorBody),
        (status = 409, description = "A run is in progress; names the current status", body = super::ErrorBody),
        (status = 422, description = "Invalid field", body = super::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn create_run(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<CreateRun>,
) -> Result<(StatusCode, Json<CampaignView>), ApiError> {
    let campaign = auth.campaign(&state, &id).await?;
    // A draft's first run is a plain start; a finished campaign runs again.
    let action = match campaign.status {
        CampaignStatus::Draft | CampaignStatus::Scheduled if body.recipients == Recipients::All => {
            Action::Start
        }
        _ => Action::Rerun,
    };
    let view = super::campaigns::drive(&state, &campaign, action, None, body.recipients).await?;
    Ok((StatusCode::CREATED, view))
}

#[utoipa::path(get, path = "/v1/campaigns/{id}/runs", tag = "campaigns",
    params(("id" = String, Path, description = "Campaign id (integer) or uuid")),
    responses(
        (status = 200, description = "The campaign's runs, newest first", body = RunList),
        (status = 401, description = "Missing or invalid key", body = super::ErrorBody),
        (status = 403, description = "Another workspace's campaign", body = super::ErrorBody),
        (status = 404, description = "No such campaign", body = super::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn list_runs(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<RunList>, ApiError> {
    let campaign = auth.campaign(&state, &id).await?;
    let runs = state.store.runs_of(campaign.id).await?;
    Ok(Json(RunList {
        runs: runs.iter().map(RunView::from).collect(),
    }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Credits {
    /// Null: unlimited (credit accounting is off until the first top-up).
    pub balance: Option<i64>,
    /// Newest first; `amount`s add up to `balance`.
    #[schema(value_type = Vec<Object>)]
    pub ledger: Vec<serde_json::Value>,
}

#[utoipa::path(get, path = "/v1/credits", tag = "keys",
    responses(
        (status = 200, description = "Balance and the last 1000 ledger entries", body = Credits),
        (status = 401, description = "Missing or invalid key", body = super::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn credits(State(state): State<AppState>, auth: Auth) -> Result<Json<Credits>, ApiError> {
    let workspace = state.store.workspace(auth.workspace_id).await?;
    let ledger = state.store.credit_ledger(auth.workspace_id, 1000).await?;
    Ok(Json(Credits {
        balance: workspace.credit_balance,
        ledger: ledger
            .into_iter()
            .map(|e| {
                serde_json::json!({
                    "id": e.id, "run_id": e.run_id, "kind": e.kind, "amount": e.amount,
                    "balance_after": e.balance_after, "note": e.note,
                    "created_at": rfc3339(e.created_at),
                })
            })
            .collect(),
    }))
}

/// How long a callback naming no recorded message waits for it: a provider
/// can call back before the engine has written the send's outcome (it
/// records a slice once all of it is answered).
const UNRECORDED_SEND_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The run of a message, waiting up to [`UNRECORDED_SEND_WAIT`] for the
/// send of anything shaped like a Twilio message or call sid to be recorded.
async fn run_of_message(
    state: &AppState,
    sid: &str,
) -> Result<Option<crate::store::RunRecord>, ApiError> {
    let wait = if twilio::is_sid(sid) {
        UNRECORDED_SEND_WAIT
    } else {
        std::time::Duration::ZERO
    };
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Some(run) = state.store.run_of_message(sid).await? {
            return Ok(Some(run));
        }
        if tokio::time::Instant::now() >= deadline || state.shutdown.is_cancelled() {
            return Ok(None);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[utoipa::path(post, path = "/v1/providers/twilio/status", tag = "providers",
    request_body(content = String, content_type = "application/x-www-form-urlencoded",
        description = "Twilio status callback: MessageSid, MessageStatus, ErrorCode…"),
    responses(
        (status = 204, description = "Applied, or acknowledged (unknown or intermediate status)"),
        (status = 403, description = "X-Twilio-Signature does not match"),
        (status = 415, description = "Not a form post"),
        (status = 422, description = "No MessageSid or CallSid", body = super::ErrorBody),
        (status = 503, description = "The receipt could not be written: try again", body = super::ErrorBody),
    ))]
pub async fn twilio_status(
    State(state): State<AppState>,
    headers: HeaderMap,
    Form(params): Form<Vec<(String, String)>>,
) -> Result<StatusCode, ApiError> {
    let field = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let Some(sid) = field("MessageSid").or_else(|| field("CallSid")) else {
        return Err(ApiError::invalid("MessageSid", "MessageSid is required"));
    };
    let Some(run) = run_of_message(&state, sid).await? else {
        // Acknowledge, so Twilio does not retry a message we never sent.
        tracing::warn!(sid, "Twilio status for an unknown message acknowledged");
        return Ok(StatusCode::NO_CONTENT);
    };
    let Some(ProviderSettings::Twilio { auth_token, .. }) = run.snapshot.map(|s| s.provider) else {
        return Err(ApiError::Forbidden(
            "this message; it was not sent through Twilio".into(),
        ));
    };
    let url = format!(
        "{}/v1/providers/twilio/status",
        state.public_url.trim_end_matches('/')
    );
    let presented = headers
        .get("x-twilio-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let expected = twilio::signature(&auth_token, &url, &params);
    if !bool::from(subtle::ConstantTimeEq::ct_eq(
        presented.as_bytes(),
        expected.as_bytes(),
    )) {
        tracing::warn!(sid, "Twilio status callback with a bad signature refused");
        return Err(ApiError::Forbidden(
            "this callback: X-Twilio-Signature does not match".into(),
        ));
    }
    let status = field("MessageStatus")
        .or_else(|| field("CallStatus"))
        .unwrap_or("");
    if let Some(delivered) = twilio::receipt_of(status) {
        let error = field("ErrorCode").map(|code| format!("Twilio error {code}: {status}"));
        // Answered once the receipt is written (a 503 otherwise, so
        // Twilio's retry is not lost), in a transaction shared with the
        // callbacks that arrived meanwhile.
        state
            .receipts
            .record(Receipt {
                provider_id: sid.to_owned(),
                delivered,
                error: if delivered {
                    None
                } else {
                    error.or(Some(status.to_owned()))
                },
            })
            .await?;
    }
    Ok(StatusCode::NO_CONTENT)
}
