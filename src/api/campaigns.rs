//! `/v1/campaigns`: create, list, read, edit and drive campaigns.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use utoipa::ToSchema;

use super::extract::{ApiJson, Auth, PageParams, Pagination, QueryParams};
use super::views::{CampaignList, CampaignView};
use super::{ApiError, AppState};
use crate::domain::{
    Action, CampaignName, CampaignStatus, Channel, MaxAttempts, ProviderSettings, Recipients,
    Sender, Template,
};
use crate::store::{Campaign, CampaignSpec, RunEffect, Transition};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/campaigns", post(create).get(list))
        .route(
            "/v1/campaigns/{id}",
            get(show).patch(update).delete(delete_campaign),
        )
        .route("/v1/campaigns/{id}/schedule", post(schedule))
        .route("/v1/campaigns/{id}/start", post(start))
        .route("/v1/campaigns/{id}/pause", post(pause))
        .route("/v1/campaigns/{id}/resume", post(resume))
        .route("/v1/campaigns/{id}/cancel", post(cancel))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCampaign {
    /// 1 to 200 characters, not only spaces.
    #[schema(min_length = 1, max_length = 200, pattern = r"\S")]
    name: String,
    channel: Channel,
    /// Message with `{{variables}}`; required before an SMS or voice campaign starts.
    template: Option<String>,
    /// E.164 number, or an SMS alphanumeric sender id.
    sender: Option<String>,
    /// Defaults to `{"kind":"simulated"}`.
    provider: Option<ProviderSettings>,
    /// 1 (no retries) to 10; default 3.
    max_attempts: Option<i64>,
}

/// Every field optional: only the fields sent change. Drafts only.
#[derive(Debug, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct UpdateCampaign {
    #[schema(min_length = 1, max_length = 200, pattern = r"\S")]
    name: Option<String>,
    channel: Option<Channel>,
    template: Option<String>,
    sender: Option<String>,
    provider: Option<ProviderSettings>,
    max_attempts: Option<i64>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleCampaign {
    /// RFC 3339 time in the future, e.g. `2026-12-01T09:00:00Z`.
    start_at: String,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ListParams {
    /// 1-based page number (default 1).
    #[param(value_type = Option<i64>, minimum = 1)]
    page: Option<String>,
    /// Items per page (default 50, at most 1000).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 1000)]
    per_page: Option<String>,
    /// Only campaigns in this status.
    #[param(value_type = Option<CampaignStatus>)]
    status: Option<String>,
}

/// Checks raw settings into a [`CampaignSpec`], naming the first bad field.
fn build_spec(
    name: &str,
    channel: Channel,
    template: Option<&str>,
    sender: Option<&str>,
    provider: Option<ProviderSettings>,
    max_attempts: Option<i64>,
) -> Result<CampaignSpec, ApiError> {
    let name = CampaignName::parse(name).map_err(|e| ApiError::invalid("name", e))?;
    let template = template
        .map(Template::parse)
        .transpose()
        .map_err(|e| ApiError::invalid("template", e.to_string()))?;
    let sender = sender
        .map(|s| Sender::parse(s, channel))
        .transpose()
        .map_err(|e| ApiError::invalid("sender", e))?;
    let provider = provider.unwrap_or_default();
    provider
        .check()
        .map_err(|(field, why)| ApiError::invalid(format!("provider.{field}"), why))?;
    if channel == Channel::External && provider != ProviderSettings::default() {
        return Err(ApiError::invalid(
            "provider",
            "external campaigns are run by their producer; they take no provider",
        ));
    }
    let max_attempts = max_attempts
        .map(MaxAttempts::parse)
        .transpose()
        .map_err(|e| ApiError::invalid("max_attempts", e))?
        .unwrap_or(MaxAttempts::DEFAULT);
    Ok(CampaignSpec {
        name,
        channel,
        template,
        sender,
        provider,
        max_attempts,
    })
}

#[utoipa::path(post, path = "/v1/campaigns", tag = "campaigns",
    request_body = CreateCampaign,
    responses(
        (status = 201, description = "Created", body = CampaignView),
        (status = 400, description = "Malformed JSON", body = super::ErrorBody),
        (status = 401, description = "Missing or invalid key", body = super::ErrorBody),
        (status = 413, description = "Body too large", body = super::ErrorBody),
        (status = 422, description = "Invalid field", body = super::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = [])))]
#[tracing::instrument(skip_all, fields(key = %auth.key_prefix))]
pub async fn create(
    State(state): State<AppState>,
    auth: Auth,
    ApiJson(body): ApiJson<CreateCampaign>,
) -> Result<(StatusCode, Json<CampaignView>), ApiError> {
    let spec = build_spec(
        &body.name,
        body.channel,
        body.template.as_deref(),
        body.sender.as_deref(),
        body.provider,
        body.max_attempts,
    )?;
    let campaign = state
        .store
        .insert_campaign(auth.workspace_id, &spec)
        .await?;
    tracing::info!(campaign = campaign.id, "campaign created");
    Ok((
        StatusCode::CREATED,
        Json(CampaignView::new(&campaign, None)),
    ))
}

#[utoipa::path(get, path = "/v1/campaigns", tag = "campaigns",
    params(ListParams),
    responses(
        (status = 200, description = "A page of campaigns, newest first", body = CampaignList),
        (status = 401, description = "Missing or invalid key", body = super::ErrorBody),
        (status = 422, description = "Bad paging or status filter", body = super::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn list(
    State(state): State<AppState>,
    auth: Auth,
    QueryParams(params): QueryParams<ListParams>,
) -> Result<Json<CampaignList>, ApiError> {
    let page = PageParams {
        page: params.page,
        per_page: params.per_page,
    }
    .parse()?;
    let status = params
        .status
        .as_deref()
        .map(|s| {
            CampaignStatus::parse(s).ok_or_else(|| {
                ApiError::invalid("status", format!("'{s}' is not a campaign status"))
            })
        })
        .transpose()?;
    let (campaigns, total) = state
        .store
        .list_campaigns(auth.workspace_id, status, page.offset(), page.per_page)
        .await?;
    let mut views = Vec::with_capacity(campaigns.len());
    for campaign in &campaigns {
        views.push(CampaignView::with_progress(&state, campaign).await?);
    }
    Ok(Json(CampaignList {
        campaigns: views,
        pagination: Pagination::new(page, total),
    }))
}

#[utoipa::path(get, path = "/v1/campaigns/{id}", tag = "campaigns",
    params(("id" = String, Path, description = "Campaign id (integer) or uuid")),
    responses(
        (status = 200, description = "The campaign", body = CampaignView),
        (status = 401, description = "Missing or invalid key", body = super::ErrorBody),
        (status = 403, description = "Another workspace's campaign", body = super::ErrorBody),
        (status = 404, description = "No such campaign", body = super::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn show(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<CampaignView>, ApiError> {
    let campaign = auth.campaign(&state, &id).await?;
    Ok(Json(CampaignView::with_progress(&state, &campaign).await?))
}

#[utoipa::path(patch, path = "/v1/campaigns/{id}", tag = "campaigns",
    params(("id" = String, Path, description = "Campaign id (integer) or uuid")),
    request_body = UpdateCampaign,
    responses(
        (status = 200, description = "Updated", body = CampaignView),
        (status = 400, description = "Malformed JSON", body = super::ErrorBody),
        (status = 401, description = "Missing or invalid key", body = super::ErrorBody),
        (status = 403, description = "Another workspace's campaign", body = super::ErrorBody),
        (status = 404, description = "No such campaign", body = super::ErrorBody),
        (status = 409, description = "Not a draft", body = super::ErrorBody),
        (status = 422, description = "Invalid field", body = super::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn update(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiJson(patch): ApiJson<UpdateCampaign>,
) -> Result<Json<CampaignView>, ApiError> {
    let current = auth.campaign(&state, &id).await?;
    ensure_editable(&current)?;
    let channel = patch.channel.unwrap_or(current.channel);
    let spec = build_spec(
        patch.name.as_deref().unwrap_or(&current.name),
        channel,
        patch.template.as_deref().or(current.template.as_deref()),
        patch.sender.as_deref().or(current.sender.as_deref()),
        Some(patch.provider.unwrap_or(current.provider)),
        Some(patch.max_attempts.unwrap_or(current.max_attempts.into())),
    )?;
    let campaign = state.store.update_campaign(current.id, &spec).await?;
    Ok(Json(CampaignView::new(&campaign, None)))
}

#[utoipa::path(delete, path = "/v1/campaigns/{id}", tag = "campaigns",
    params(("id" = String, Path, description = "Campaign id (integer) or uuid")),
    responses(
        (status = 204, description = "Deleted with its contacts"),
        (status = 401, description = "Missing or invalid key", body = super::ErrorBody),
        (status = 403, description = "Another workspace's campaign", body = super::ErrorBody),
        (status = 404, description = "No such campaign", body = super::ErrorBody),
        (status = 409, description = "Not a draft", body = super::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn delete_campaign(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let current = auth.campaign(&state, &id).await?;
    ensure_editable(&current)?;
    state.store.delete_campaign(current.id).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn ensure_editable(campaign: &Campaign) -> Result<(), ApiError> {
    if campaign.status.is_editable() {
        Ok(())
    } else {
        Err(ApiError::Conflict {
            message: format!(
                "campaign is {}; only a draft can be changed or deleted",
                campaign.status
            ),
            current_status: Some(campaign.status),
        })
    }
}

/// Refuses to schedule or start what could not be sent: an SMS or voice
/// campaign needs a template, contacts, and every contact must fill every
/// variable — found now, not at send time.
async fn ensure_sendable(state: &AppState, campaign: &Campaign) -> Result<(), ApiError> {
    if !campaign.channel.sends_messages() {
        return Ok(());
    }
    let template = campaign
        .template
        .as_deref()
        .ok_or_else(|| ApiError::invalid("template", "set a template before starting"))?;
    let template =
        Template::parse(template).map_err(|e| ApiError::invalid("template", e.to_string()))?;
    if campaign.contact_count == 0 {
        return Err(ApiError::invalid(
            "contacts",
            "the campaign has no contacts; import some first",
        ));
    }
    let variables = template
        .variables()
        .into_iter()
        .map(str::to_owned)
        .collect();
    if let Some(missing) = state
        .store
        .first_missing_variable(campaign.id, &variables)
        .await?
    {
        return Err(ApiError::invalid(
            format!(
                "contacts[{}].variables.{}",
                missing.contact_id, missing.variable
            ),
            format!(
                "contact {} ({}) has no value for template variable '{}'",
                missing.contact_id, missing.phone, missing.variable
            ),
        ));
    }
    Ok(())
}

/// Applies `action` with a compare-and-set on the status the campaign had,
/// with its effect on runs, and tells the engine and live subscribers.
pub(super) async fn drive(
    state: &AppState,
    campaign: &Campaign,
    action: Action,
    start_at: Option<i64>,
    recipients: Recipients,
) -> Result<Json<CampaignView>, ApiError> {
    let next = campaign.status.apply(action)?;
    let run = match action {
        Action::Schedule => RunEffect::Schedule {
            at: start_at.unwrap_or_else(crate::store::now_ms),
        },
        Action::Start => RunEffect::Schedule {
            at: crate::store::now_ms(),
        },
        Action::Rerun => RunEffect::NewRun { recipients },
        Action::Cancel => RunEffect::CancelUnclaimed,
        _ => RunEffect::None,
    };
    let updated = state
        .store
        .transition_campaign(
            campaign.id,
            &Transition {
                from: campaign.status,
                to: next,
                start_at,
                run,
            },
        )
        .await?;
    state.engine_wakeup.notify_one();
    state.published(&updated);
    tracing::info!(campaign = campaign.id, from = %campaign.status, to = %next, "campaign status changed");
    Ok(Json(CampaignView::with_progress(state, &updated).await?))
}

#[utoipa::path(post, path = "/v1/campaigns/{id}/schedule", tag = "campaigns",
    params(("id" = String, Path, description = "Campaign id (integer) or uuid")),
    request_body = ScheduleCampaign,
    responses(
        (status = 200, description = "Scheduled", body = CampaignView),
        (status = 400, description = "Malformed JSON", body = super::ErrorBody),
        (status = 401, description = "Missing or invalid key", body = super::ErrorBody),
        (status = 403, description = "Another workspace's campaign", body = super::ErrorBody),
        (status = 404, description = "No such campaign", body = super::ErrorBody),
        (status = 409, description = "Illegal transition; names the current status", body = super::ErrorBody),
        (status = 422, description = "Bad start_at, or a contact lacks a template variable", body = super::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn schedule(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ScheduleCampaign>,
) -> Result<Json<CampaignView>, ApiError> {
    let campaign = auth.campaign(&state, &id).await?;
    let start_at = chrono::DateTime::parse_from_rfc3339(body.start_at.trim())
        .map_err(|e| {
            ApiError::invalid(
                "start_at",
                format!("'{}' is not an RFC 3339 time: {e}", body.start_at),
            )
        })?
        .timestamp_millis();
    if start_at <= crate::store::now_ms() {
        return Err(ApiError::invalid(
            "start_at",
            "start_at is in the past; use /start to begin now",
        ));
    }
    campaign.status.apply(Action::Schedule)?;
    ensure_sendable(&state, &campaign).await?;
    drive(
        &state,
        &campaign,
        Action::Schedule,
        Some(start_at),
        Recipients::All,
    )
    .await
}

#[utoipa::path(post, path = "/v1/campaigns/{id}/start", tag = "campaigns",
    params(("id" = String, Path, description = "Campaign id (integer) or uuid")),
    responses(
        (status = 200, description = "Running", body = CampaignView),
        (status = 401, description = "Missing or invalid key", body = super::ErrorBody),
        (status = 403, description = "Another workspace's campaign", body = super::ErrorBody),
        (status = 404, description = "No such campaign", body = super::ErrorBody),
        (status = 409, description = "Illegal transition; names the current status", body = super::ErrorBody),
        (status = 422, description = "No template or contacts, or a contact lacks a variable", body = super::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn start(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<CampaignView>, ApiError> {
    let campaign = auth.campaign(&state, &id).await?;
    campaign.status.apply(Action::Start)?;
    ensure_sendable(&state, &campaign).await?;
    drive(&state, &campaign, Action::Start, None, Recipients::All).await
}

macro_rules! simple_transition {
    ($name:ident, $action:expr, $path:literal, $done:literal) => {
        #[utoipa::path(post, path = $path, tag = "campaigns",
            params(("id" = String, Path, description = "Campaign id (integer) or uuid")),
            responses(
                (status = 200, description = $done, body = CampaignView),
                (status = 401, description = "Missing or invalid key", body = super::ErrorBody),
                (status = 403, description = "Another workspace's campaign", body = super::ErrorBody),
                (status = 404, description = "No such campaign", body = super::ErrorBody),
                (status = 409, description = "Illegal transition; names the current status", body = super::ErrorBody),
            ),
            security(("bearer" = []), ("api_key" = [])))]
        pub async fn $name(
            State(state): State<AppState>,
            auth: Auth,
            Path(id): Path<String>,
        ) -> Result<Json<CampaignView>, ApiError> {
            let campaign = auth.campaign(&state, &id).await?;
            drive(&state, &campaign, $action, None, Recipients::All).await
        }
    };
}

simple_transition!(pause, Action::Pause, "/v1/campaigns/{id}/pause", "Paused");
simple_transition!(
    resume,
    Action::Resume,
    "/v1/campaigns/{id}/resume",
    "Running again"
);
simple_transition!(
    cancel,
    Action::Cancel,
    "/v1/campaigns/{id}/cancel",
    "Cancelled"
);
