//! `/v1/keys` and `/v1/workspace`: the caller's workspace and its API keys.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use utoipa::ToSchema;

use super::extract::{parse_json, ApiJson, Auth};
use super::views::{ApiKeyList, ApiKeyView, CreatedApiKey, WorkspaceView};
use super::{ApiError, AppState};
use crate::domain::{NewApiKey, Region, Scope};
use crate::store::{ApiKeyRecord, Store, StoreError};
use axum::body::Bytes;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/keys", post(create).get(list))
        .route("/v1/keys/{id}", delete(revoke))
        .route("/v1/workspace", get(show_workspace).patch(update_workspace))
}

#[derive(Debug, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    /// A note to tell keys apart, e.g. "ci" or "dashboard".
    label: Option<String>,
    /// Extra powers, e.g. `["pii"]`; only scopes the calling key has can
    /// be given.
    #[serde(default)]
    scopes: Vec<Scope>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateWorkspace {
    /// ISO 3166 region used to read numbers without a country code, e.g. `GB`.
    #[schema(pattern = "^[A-Za-z]{2}$")]
    default_region: String,
}

/// Creates a key in a workspace; the plaintext is returned once and never stored.
pub async fn issue_key(
    store: &dyn Store,
    workspace_id: i64,
    label: Option<&str>,
    scopes: &[Scope],
) -> Result<(ApiKeyRecord, String), StoreError> {
    loop {
        let key = NewApiKey::generate(&mut rand::thread_rng());
        match store
            .insert_api_key(workspace_id, label, scopes, &key.prefix, &key.hash)
            .await
        {
            Ok(record) => return Ok((record, key.plaintext)),
            // A prefix collision (1 in 36^10) just draws another key.
            Err(StoreError::Duplicate(_)) => continue,
            Err(other) => return Err(other),
        }
    }
}

fn check_label(label: Option<&str>) -> Result<Option<String>, ApiError> {
    match label.map(str::trim) {
        None | Some("") => Ok(None),
        Some(l) if l.chars().count() > 100 => Err(ApiError::invalid(
            "label",
            "label must be at most 100 characters",
        )),
        Some(l) => Ok(Some(l.to_owned())),
    }
}

#[utoipa::path(post, path = "/v1/keys", tag = "keys",
    request_body(content = Option<CreateKey>, description = "Optional; an empty body makes an unlabelled key"),
    responses(
        (status = 201, description = "The new key; `key` is shown only this once", body = CreatedApiKey),
        (status = 400, description = "Malformed JSON", body = super::ErrorBody),
        (status = 401, description = "Missing or invalid key", body = super::ErrorBody),
        (status = 403, description = "A scope the calling key does not have was asked for", body = super::ErrorBody),
        (status = 422, description = "Invalid field", body = super::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn create(
    State(state): State<AppState>,
    auth: Auth,
    body: Bytes,
) -> Result<(StatusCode, Json<CreatedApiKey>), ApiError> {
    // The body is optional: an empty POST creates an unlabelled key.
    let body: CreateKey = if body.iter().all(u8::is_ascii_whitespace) {
        CreateKey::default()
    } else {
        parse_json(&body)?
    };
    let label = check_label(body.label.as_deref())?;
    // A key cannot make a key more powerful than itself.
    for &scope in &body.scopes {
        auth.require(scope, "scopes")?;
    }
    let (record, key) = issue_key(
        state.store.as_ref(),
        auth.workspace_id,
        label.as_deref(),
        &body.scopes,
    )
    .await?;
    tracing::info!(by = %auth.key_prefix, new = %record.prefix, "API key created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedApiKey {
            view: ApiKeyView::from(&record),
            key,
        }),
    ))
}

#[utoipa::path(get, path = "/v1/keys", tag = "keys",
    responses(
        (status = 200, description = "The workspace's keys (never their secrets)", body = ApiKeyList),
        (status = 401, description = "Missing or invalid key", body = super::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn list(State(state): State<AppState>, auth: Auth) -> Result<Json<ApiKeyList>, ApiError> {
    let keys = state.store.list_api_keys(auth.workspace_id).await?;
    Ok(Json(ApiKeyList {
        keys: keys.iter().map(ApiKeyView::from).collect(),
    }))
}

#[utoipa::path(delete, path = "/v1/keys/{id}", tag = "keys",
    params(("id" = String, Path, description = "Key id or prefix")),
    responses(
        (status = 200, description = "Revoked; refused from the next request on", body = ApiKeyView),
        (status = 401, description = "Missing or invalid key", body = super::ErrorBody),
        (status = 404, description = "No such key in this workspace", body = super::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn revoke(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<ApiKeyView>, ApiError> {
    let record = state
        .store
        .revoke_api_key(auth.workspace_id, &id)
        .await
        .map_err(|e| match e {
            StoreError::NotFound => ApiError::NotFound(format!("API key '{id}'")),
            other => other.into(),
        })?;
    state.keys.forget(&record.prefix);
    tracing::info!(by = %auth.key_prefix, revoked = %record.prefix, "API key revoked");
    Ok(Json(ApiKeyView::from(&record)))
}

#[utoipa::path(get, path = "/v1/workspace", tag = "keys",
    responses(
        (status = 200, description = "The caller's workspace", body = WorkspaceView),
        (status = 401, description = "Missing or invalid key", body = super::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn show_workspace(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<Json<WorkspaceView>, ApiError> {
    let workspace = state.store.workspace(auth.workspace_id).await?;
    Ok(Json(WorkspaceView::from(&workspace)))
}

#[utoipa::path(patch, path = "/v1/workspace", tag = "keys",
    request_body = UpdateWorkspace,
    responses(
        (status = 200, description = "Updated", body = WorkspaceView),
        (status = 400, description = "Malformed JSON", body = super::ErrorBody),
        (status = 401, description = "Missing or invalid key", body = super::ErrorBody),
        (status = 422, description = "Unknown region", body = super::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn update_workspace(
    State(state): State<AppState>,
    auth: Auth,
    ApiJson(body): ApiJson<UpdateWorkspace>,
) -> Result<Json<WorkspaceView>, ApiError> {
    let region =
        Region::parse(&body.default_region).map_err(|e| ApiError::invalid("default_region", e))?;
    let workspace = state
        .store
        .set_workspace_region(auth.workspace_id, region.code())
        .await?;
    Ok(Json(WorkspaceView::from(&workspace)))
}
