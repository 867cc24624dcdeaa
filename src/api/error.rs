//! One error type for Herald's own API, turned into
//! `{"error":{"code","message","field"}}` with the right status.
//!
//! Seed-compatible surfaces reuse [`ApiError`] and wrap it in their own
//! envelopes, so every surface reports the same failure the same way.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::domain::{CampaignStatus, IllegalTransition};
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON or CSV: the body cannot be read at all.
    #[error("{message}")]
    BadRequest {
        message: String,
        field: Option<String>,
    },
    #[error("missing or invalid API key")]
    Unauthorized,
    #[error("this API key's workspace does not own {0}")]
    Forbidden(String),
    /// The key is the workspace's but was not given the scope this needs.
    #[error("this API key lacks the '{scope}' scope that {field} needs; make one with `herald keys create --workspace NAME --scope {scope}` or POST /v1/keys {{\"scopes\": [\"{scope}\"]}}")]
    MissingScope {
        scope: crate::domain::Scope,
        field: String,
    },
    #[error("{0} not found")]
    NotFound(String),
    /// The action does not fit the resource's current status.
    #[error("{message}")]
    Conflict {
        message: String,
        current_status: Option<CampaignStatus>,
    },
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("unsupported content type: {0}")]
    UnsupportedMediaType(String),
    /// The body was read but a value is not acceptable.
    #[error("{message}")]
    Unprocessable { field: String, message: String },
    #[error("service unavailable: {0}")]
    Unavailable(String),
    /// The key went over its request rate; retry after this many seconds.
    #[error("too many requests for this API key; retry in {0} s")]
    TooManyRequests(u64),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// The error body of Herald's own API.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `invalid_field`.
    pub code: &'static str,
    pub message: String,
    /// The request field at fault, when one is.
    pub field: Option<String>,
    /// With `conflict`: the status the resource is in now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_status: Option<CampaignStatus>,
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Unprocessable {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn bad_request(field: Option<&str>, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            field: field.map(str::to_owned),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) | ApiError::MissingScope { .. } => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest { .. } => "bad_request",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::MissingScope { .. } => "missing_scope",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict { .. } => "conflict",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::Unprocessable { .. } => "invalid_field",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::TooManyRequests(_) => "rate_limited",
            ApiError::Internal(_) => "internal",
        }
    }

    /// The message shown to clients: internals are logged, never shown.
    pub fn public_message(&self) -> String {
        match self {
            ApiError::Internal(_) => "internal server error".into(),
            other => other.to_string(),
        }
    }

    pub fn field(&self) -> Option<&str> {
        match self {
            ApiError::BadRequest { field, .. } => field.as_deref(),
            ApiError::Unprocessable { field, .. } | ApiError::MissingScope { field, .. } => {
                Some(field)
            }
            ApiError::Conflict { .. } => Some("status"),
            _ => None,
        }
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message: self.public_message(),
                field: self.field().map(str::to_owned),
                current_status: match self {
                    ApiError::Conflict { current_status, .. } => *current_status,
                    _ => None,
                },
            },
        }
    }

    /// Logs server-side failures in full; the client sees a bare message.
    pub fn log(&self) {
        match self {
            ApiError::Internal(err) => tracing::error!(error = ?err, "request failed"),
            ApiError::Unavailable(why) => tracing::warn!(%why, "request failed: unavailable"),
            _ => {}
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.log();
        let mut response = (self.status(), Json(self.body())).into_response();
        if let ApiError::TooManyRequests(seconds) = self {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(seconds.max(1)),
            );
        }
        response
    }
}

impl From<IllegalTransition> for ApiError {
    fn from(err: IllegalTransition) -> Self {
        ApiError::Conflict {
            message: err.to_string(),
            current_status: Some(err.current),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotFound => ApiError::NotFound("resource".into()),
            StoreError::StatusConflict { current } => ApiError::Conflict {
                message: format!("campaign is {current}; the request does not apply to it"),
                current_status: Some(current),
            },
            StoreError::Duplicate(what) => ApiError::Conflict {
                message: format!("{what} already exists"),
                current_status: None,
            },
            StoreError::Unavailable(why) => ApiError::Unavailable(why),
            err if err.is_out_of_space() => {
                tracing::error!(error = %err, "the database's disk is full");
                ApiError::Unavailable(
                    "the database's disk is full: nothing was written; retry once space is freed"
                        .into(),
                )
            }
            err if err.is_transient() => {
                tracing::warn!(error = %err, "transient database error");
                ApiError::Unavailable("the database is busy or unreachable; retry shortly".into())
            }
            other => ApiError::Internal(anyhow::Error::new(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_errors_are_not_shown() {
        let err = ApiError::Internal(anyhow::anyhow!("secret connection string"));
        assert_eq!(err.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(err.body().error.message, "internal server error");
    }

    #[test]
    fn conflicts_name_the_current_status() {
        let err: ApiError = StoreError::StatusConflict {
            current: CampaignStatus::Running,
        }
        .into();
        let body = serde_json::to_value(err.body()).unwrap();
        assert_eq!(body["error"]["code"], "conflict");
        assert_eq!(body["error"]["current_status"], "running");
        assert_eq!(body["error"]["field"], "status");
    }
}
