//! Extractors that turn a request into checked values or an [`ApiError`]:
//! who is calling ([`Auth`]), a JSON body ([`ApiJson`]) and paging.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::{header, request::Parts, StatusCode};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::{ApiError, AppState};
use crate::domain::{PresentedKey, Scope};
use crate::store::{Campaign, CampaignRef, StoreResult};

/// The caller, authenticated by API key.
#[derive(Debug, Clone)]
pub struct Auth {
    pub workspace_id: i64,
    pub key_id: i64,
    /// Safe to log: the key's public prefix.
    pub key_prefix: String,
    pub scopes: Vec<Scope>,
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// Finds the key a request presents: `Authorization: Bearer`, `X-API-Key`,
/// or `?token=` (the only way a browser WebSocket can send one).
pub fn presented_key(parts: &Parts) -> Option<String> {
    if let Some(value) = parts.headers.get(header::AUTHORIZATION) {
        let value = value.to_str().ok()?.trim();
        let (scheme, token) = value.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_owned());
    }
    if let Some(value) = parts.headers.get("x-api-key") {
        return value.to_str().ok().map(|v| v.trim().to_owned());
    }
    Query::<TokenQuery>::try_from_uri(&parts.uri)
        .ok()
        .and_then(|q| q.0.token)
}

/// Checks a presented key: it must exist, match its hash and not be revoked.
pub async fn authenticate(state: &AppState, raw: Option<&str>) -> Result<Auth, ApiError> {
    let presented = raw
        .and_then(PresentedKey::parse)
        .ok_or(ApiError::Unauthorized)?;
    let record = match state.keys.get(presented.prefix) {
        Some(record) => record,
        None => {
            let record = state
                .store
                .api_key_by_prefix(presented.prefix)
                .await?
                .ok_or(ApiError::Unauthorized)?;
            state.keys.insert(&record);
            record
        }
    };
    if record.revoked_at.is_some() || !presented.matches(&record.key_hash) {
        return Err(ApiError::Unauthorized);
    }
    Ok(Auth {
        workspace_id: record.workspace_id,
        key_id: record.id,
        key_prefix: record.prefix,
        scopes: record.scopes,
    })
}

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let auth = authenticate(state, presented_key(parts).as_deref()).await?;
        if let Some(limiter) = &state.limiter {
            if let Err(not_until) = limiter.check_key(&auth.key_id) {
                let wait = not_until.wait_time_from(governor::clock::Clock::now(
                    &governor::clock::DefaultClock::default(),
                ));
                return Err(ApiError::TooManyRequests(wait.as_secs_f64().ceil() as u64));
            }
        }
        Ok(auth)
    }
}

impl Auth {
    /// 403 naming `field` unless the key was given `scope`.
    pub fn require(&self, scope: Scope, field: &str) -> Result<(), ApiError> {
        if self.scopes.contains(&scope) {
            Ok(())
        } else {
            Err(ApiError::MissingScope {
                scope,
                field: field.to_owned(),
            })
        }
    }

    /// Loads a campaign named by a path segment (integer id or uuid):
    /// 404 when there is none, 403 when another workspace owns it.
    pub async fn campaign(&self, state: &AppState, segment: &str) -> Result<Campaign, ApiError> {
        let store = &state.store;
        self.campaign_with(segment, |by| async move {
            Ok(store.campaign(&by).await?.map(|campaign| (campaign, ())))
        })
        .await
        .map(|(campaign, ())| campaign)
    }

    /// [`Auth::campaign`] for a read that loads the campaign together with
    /// something else in one statement (`read`, given the parsed segment).
    pub async fn campaign_with<T, Read>(
        &self,
        segment: &str,
        read: impl FnOnce(CampaignRef) -> Read,
    ) -> Result<(Campaign, T), ApiError>
    where
        Read: std::future::Future<Output = StoreResult<Option<(Campaign, T)>>>,
    {
        self.owned(segment, read).await
    }

    /// What `read` finds of the campaign a path segment names (integer id
    /// or uuid): 404 when there is none, 403 when another workspace owns it.
    pub async fn owned<T: OfWorkspace, Read>(
        &self,
        segment: &str,
        read: impl FnOnce(CampaignRef) -> Read,
    ) -> Result<T, ApiError>
    where
        Read: std::future::Future<Output = StoreResult<Option<T>>>,
    {
        let not_found = || ApiError::NotFound(format!("campaign '{segment}'"));
        let by = CampaignRef::parse(segment).ok_or_else(not_found)?;
        let found = read(by).await?.ok_or_else(not_found)?;
        if found.workspace_id() != self.workspace_id {
            return Err(ApiError::Forbidden(format!("campaign '{segment}'")));
        }
        Ok(found)
    }
}

/// A read of one campaign's data, which only its workspace may see.
pub trait OfWorkspace {
    fn workspace_id(&self) -> i64;
}

impl<T> OfWorkspace for (Campaign, T) {
    fn workspace_id(&self) -> i64 {
        self.0.workspace_id
    }
}

impl OfWorkspace for crate::store::RenderedPage {
    fn workspace_id(&self) -> i64 {
        self.workspace_id
    }
}

/// A JSON body: 400 when it is not JSON, 413 over the body limit, 415 for
/// another content type, 422 naming the field when a value is wrong.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        if !content_type.is_empty() && !content_type.starts_with("application/json") {
            return Err(ApiError::UnsupportedMediaType(format!(
                "'{content_type}'; send application/json"
            )));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge {
                    limit: state.config.max_body_bytes,
                }
            } else {
                ApiError::bad_request(Some("body"), rejection.body_text())
            }
        })?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Parses JSON in two steps so syntax errors (400) and wrong values (422,
/// with the path of the field) are told apart.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(Some("body"), format!("malformed JSON: {e}")))?;
    if let Some(field) = holding_a_nul(&value, String::new()) {
        return Err(ApiError::invalid(
            field,
            "must not contain a NUL character (\\u0000)",
        ));
    }
    serde_path_to_error::deserialize(value).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner().to_string();
        // serde reports a missing field at its parent; name the field itself.
        // …while an unknown field's path already ends with its name.
        let missing = inner.strip_prefix("missing field `");
        let field = match missing {
            None if path == "." && inner.starts_with("unknown field `") => inner
                ["unknown field `".len()..]
                .split('`')
                .next()
                .unwrap_or("body")
                .to_owned(),
            Some(rest) => {
                let name = rest.split('`').next().unwrap_or(rest);
                if path == "." {
                    name.to_owned()
                } else {
                    format!("{path}.{name}")
                }
            }
            None if path == "." => "body".to_owned(),
            None => path,
        };
        ApiError::invalid(field, inner)
    })
}

/// The path (as `serde_path_to_error` writes it) of the first string, or
/// object key, in `value` that holds a NUL character. No field of the API
/// takes one, and Postgres cannot store one in text: checked here, every
/// JSON body gets a 422 naming the field instead of a failed write.
fn holding_a_nul(value: &serde_json::Value, path: String) -> Option<String> {
    use serde_json::Value;
    let field = |path: String| {
        if path.is_empty() {
            "body".to_owned()
        } else {
            path
        }
    };
    match value {
        Value::String(text) if text.contains('\0') => Some(field(path)),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(index, item)| holding_a_nul(item, format!("{path}[{index}]"))),
        Value::Object(members) => members.iter().find_map(|(key, member)| {
            if key.contains('\0') {
                return Some(field(path.clone()));
            }
            let path = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            holding_a_nul(member, path)
        }),
        _ => None,
    }
}

/// `?page=&per_page=` as the seeds page: 1-based pages.
#[derive(Debug, Deserialize, Default, utoipa::IntoParams)]
pub struct PageParams {
    /// 1-based page number (default 1).
    #[param(value_type = Option<i64>, minimum = 1)]
    pub page: Option<String>,
    /// Items per page (default 50, at most 1000).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 1000)]
    pub per_page: Option<String>,
}

#[derive(Debug, Clone, Copy)]
pub struct Page {
    pub page: i64,
    pub per_page: i64,
}

pub const MAX_PER_PAGE: i64 = 1000;

impl PageParams {
    pub fn parse(&self) -> Result<Page, ApiError> {
        let page = parse_positive(self.page.as_deref(), "page", 1, i64::MAX / MAX_PER_PAGE)?;
        let per_page = parse_positive(self.per_page.as_deref(), "per_page", 50, MAX_PER_PAGE)?;
        Ok(Page { page, per_page })
    }
}

fn parse_positive(raw: Option<&str>, field: &str, default: i64, max: i64) -> Result<i64, ApiError> {
    let Some(raw) = raw else { return Ok(default) };
    match raw.trim().parse::<i64>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(ApiError::invalid(
            field,
            format!("{field} must be an integer from 1 to {max}, got '{raw}'"),
        )),
    }
}

impl Page {
    pub fn offset(&self) -> i64 {
        (self.page - 1) * self.per_page
    }
}

/// The pagination object of seed 001, used by every paged list.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Pagination {
    pub page: i64,
    pub per_page: i64,
    pub total_items: i64,
    pub total_pages: i64,
    pub has_next: bool,
    pub has_prev: bool,
}

impl Pagination {
    pub fn new(page: Page, total_items: i64) -> Self {
        let total_pages = (total_items + page.per_page - 1) / page.per_page;
        Self {
            page: page.page,
            per_page: page.per_page,
            total_items,
            total_pages,
            has_next: page.page < total_pages,
            has_prev: page.page > 1,
        }
    }
}

/// Query parameters, whose rejection is Herald's JSON error (422 naming the
/// parameter) instead of axum's plain-text 400: `?page=x`, a repeated
/// `?status=`, a number out of range.
pub struct QueryParams<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        Query::<T>::try_from_uri(&parts.uri)
            .map(|Query(params)| QueryParams(params))
            .map_err(|rejection| {
                let text = rejection.body_text();
                let reason = text
                    .strip_prefix("Failed to deserialize query string: ")
                    .unwrap_or(&text);
                ApiError::invalid(query_field(reason), format!("bad query string: {reason}"))
            })
    }
}

/// The parameter a deserialisation error names (serde writes it as
/// `field \`name\`` or as a `name: …` prefix), or `query`.
fn query_field(reason: &str) -> String {
    if let Some(rest) = reason.split("field `").nth(1) {
        if let Some((name, _)) = rest.split_once('`') {
            return name.to_owned();
        }
    }
    match reason.split_once(": ") {
        Some((name, _))
            if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
        {
            name.to_owned()
        }
        _ => "query".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_error_names_its_parameter() {
        assert_eq!(query_field("duplicate field `status`"), "status");
        assert_eq!(query_field("page: invalid digit found in string"), "page");
        assert_eq!(query_field("invalid type: map, expected a string"), "query");
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        name: String,
        inner: Option<Inner>,
    }
    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Inner {
        count: u32,
    }

    fn field_of(json: &str) -> (StatusCode, Option<String>) {
        let err = parse_json::<Body>(json.as_bytes()).unwrap_err();
        (err.status(), err.field().map(str::to_owned))
    }

    #[test]
    fn json_errors_name_the_field() {
        assert_eq!(
            field_of("{"),
            (StatusCode::BAD_REQUEST, Some("body".into()))
        );
        assert_eq!(
            field_of("{}"),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("name".into()))
        );
        assert_eq!(
            field_of(r#"{"name":"x","inner":{"count":-1}}"#),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("inner.count".into()))
        );
        assert_eq!(
            field_of(r#"{"name":"x","inner":{}}"#),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("inner.count".into()))
        );
        assert_eq!(field_of("[]").0, StatusCode::UNPROCESSABLE_ENTITY);
        // A NUL character anywhere: 422 naming where.
        assert_eq!(
            field_of(r#"{"name":"a\u0000b"}"#),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("name".into()))
        );
        assert_eq!(
            field_of(r#"{"name":"x","inner":{"tags":["ok","\u0000"]}}"#),
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                Some("inner.tags[1]".into())
            )
        );
        assert_eq!(
            field_of(r#"{"name":"x","inner":{"k\u0000":1}}"#),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("inner".into()))
        );
        assert_eq!(
            field_of(r#""\u0000""#),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("body".into()))
        );
    }

    #[test]
    fn pages_are_bounded() {
        let ok = PageParams {
            page: Some("2".into()),
            per_page: Some("10".into()),
        }
        .parse()
        .unwrap();
        assert_eq!(ok.offset(), 10);
        for (page, per_page) in [("0", "10"), ("x", "10"), ("1", "1001"), ("1", "-5")] {
            let err = PageParams {
                page: Some(page.into()),
                per_page: Some(per_page.into()),
            }
            .parse()
            .unwrap_err();
            assert_eq!(err.status(), StatusCode::UNPROCESSABLE_ENTITY);
        }
    }

    #[test]
    fn pagination_counts_pages() {
        let p = Pagination::new(
            Page {
                page: 1,
                per_page: 50,
            },
            350,
        );
        assert_eq!((p.total_pages, p.has_next, p.has_prev), (7, true, false));
        let empty = Pagination::new(
            Page {
                page: 1,
                per_page: 50,
            },
            0,
        );
        assert_eq!((empty.total_pages, empty.has_next), (0, false));
    }
}
