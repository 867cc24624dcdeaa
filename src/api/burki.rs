//! Seed 001 (Burki): `GET /api/v1/campaigns/{campaign_id}/executions`.
//!
//! Field names, nesting and statuses are the seed's. Beyond it: a `status`
//! filter, and a keyset `cursor` (the `next_cursor` of the previous page)
//! that stays fast at any depth, where `page` needs an OFFSET.

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::extract::{Auth, PageParams, Pagination, QueryParams};
use super::views::{write_rfc3339, Millis};
use super::{ApiError, AppState};
use crate::domain::{Channel, ExecutionStatus, Template};
use crate::store::{
    ExecutionPageRead, ExecutionQuery, ExecutionRow, RenderPage, RenderedPage, RunSnapshot,
    StoreResult, Variables,
};

pub fn router() -> Router<AppState> {
    Router::new().route(
        "/api/v1/campaigns/{campaign_id}/executions",
        get(executions),
    )
}

/// Errors on Burki's surface also carry FastAPI's `detail`.
pub struct BurkiError(ApiError);

impl From<ApiError> for BurkiError {
    fn from(err: ApiError) -> Self {
        Self(err)
    }
}

impl IntoResponse for BurkiError {
    fn into_response(self) -> Response {
        self.0.log();
        let mut body = serde_json::to_value(self.0.body()).expect("error body serialises");
        body["detail"] = Value::String(self.0.public_message());
        (self.0.status(), Json(body)).into_response()
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ExecutionParams {
    /// 1-based page (default 1).
    #[param(value_type = Option<i64>, minimum = 1)]
    page: Option<String>,
    /// Results per page (default 50, max 1000; more is a 422).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 1000)]
    per_page: Option<String>,
    /// Only executions in this status.
    #[param(value_type = Option<ExecutionStatus>)]
    status: Option<String>,
    /// Keyset cursor: `next_cursor` from the previous page.
    #[param(value_type = Option<i64>, minimum = 1)]
    cursor: Option<String>,
}

/// One execution as seed 001 shows it, borrowed from the row it was read
/// from: a page writes 100 of them straight out, so the view copies
/// nothing.
#[derive(Debug, Serialize, ToSchema)]
pub struct Execution<'a> {
    pub id: i64,
    pub execution_id: i64,
    pub contact_id: i64,
    pub contact_name: Option<&'a str>,
    pub contact_phone: &'a str,
    pub status: ExecutionStatus,
    pub call_id: Option<&'a str>,
    pub sms_id: Option<&'a str>,
    #[schema(value_type = Option<String>)]
    pub executed_at: Option<Millis>,
    /// from_number, to_number, personalized_welcome_message,
    /// template_variables_used, duration_seconds, error_details, retry_reason.
    #[schema(value_type = Object)]
    pub execution_data: ExecutionData<'a>,
}

/// Seed 001's free-form `execution_data`, typed: a page serialises it for
/// every row, and a struct writes its keys as constants where a JSON map
/// allocated each key and value of each row. Keys appear in this order;
/// the optional ones only when known.
#[derive(Debug, Serialize)]
pub struct ExecutionData<'a> {
    from_number: Option<&'a str>,
    to_number: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    personalized_welcome_message: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "as_object")]
    template_variables_used: Option<VariablesUsed<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    duration_seconds: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_details: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message_status: Option<&'a str>,
    attempts: i64,
}

/// What a row gives a template variable: its phone, its name, or one of
/// its variables ([`crate::domain::contact::variable_value`]).
#[derive(Debug, Clone, Copy)]
struct RowValues<'a> {
    phone: &'a str,
    name: Option<&'a str>,
    variables: &'a Variables<'a>,
}

impl<'a> RowValues<'a> {
    fn get(self, variable: &str) -> Option<&'a str> {
        crate::domain::contact::variable_value(
            self.phone,
            self.name,
            |v| self.variables.get(v),
            variable,
        )
    }
}

/// The template's variables with the values a row gives them, looked up
/// as the row is written: collected into a `Vec` they were an allocation a
/// row, 2.5% of a page's CPU.
#[derive(Debug, Clone, Copy)]
struct VariablesUsed<'a> {
    /// In the template's order.
    names: &'a [String],
    values: RowValues<'a>,
}

impl<'a> VariablesUsed<'a> {
    /// Each variable the row has a value for, with that value.
    fn pairs(self) -> impl Iterator<Item = (&'a str, &'a str)> {
        self.names.iter().filter_map(move |variable| {
            self.values
                .get(variable)
                .map(|value| (variable.as_str(), value))
        })
    }
}

/// Name/value pairs as a JSON object, in the template's order.
fn as_object<S: serde::Serializer>(
    used: &Option<VariablesUsed<'_>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_map(used.iter().flat_map(|used| used.pairs()))
}

/// A page's schema; [`render_page`] writes it.
#[derive(Debug, ToSchema)]
pub struct ExecutionPage<'a> {
    pub executions: Vec<Execution<'a>>,
    pub pagination: Pagination,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// A run's frozen settings with its template parsed once per page.
struct FrozenRun {
    snapshot: RunSnapshot,
    template: Option<Template>,
    /// The template's variables, in order (each row reports their values).
    variables: Vec<String>,
}

/// `message` is the buffer the personalised message is rendered into,
/// reused from row to row.
fn execution_view<'a>(
    e: &ExecutionRow<'a>,
    variables: &'a Variables<'a>,
    frozen: Option<&'a FrozenRun>,
    message: &'a mut String,
) -> Execution<'a> {
    let snapshot = frozen.map(|f| &f.snapshot);
    let channel = snapshot.map_or(Channel::Sms, |s| s.channel);
    let template = frozen.and_then(|f| f.template.as_ref());
    let values = RowValues {
        phone: e.phone,
        name: e.name,
        variables,
    };
    message.clear();
    let personalized_welcome_message = template
        .and_then(|t| t.render_into(message, |v| values.get(v)).ok())
        .map(|()| message.as_str());
    let template_variables_used = frozen
        .filter(|f| f.template.is_some())
        .map(|f| VariablesUsed {
            names: &f.variables,
            values,
        });
    let provider_message_id = e.provider_message_id;
    let (call_id, sms_id) = match channel {
        Channel::Voice => (provider_message_id, None),
        _ => (None, provider_message_id),
    };
    let execution_data = ExecutionData {
        from_number: snapshot.and_then(|s| s.sender.as_deref()),
        to_number: e.phone,
        personalized_welcome_message,
        template_variables_used,
        duration_seconds: e.duration_seconds,
        error_details: e.error_details,
        retry_reason: e.retry_reason,
        message_status: e.message_status,
        attempts: e.attempts,
    };
    Execution {
        id: e.id,
        execution_id: e.id,
        contact_id: e.contact_id,
        contact_name: e.name,
        contact_phone: e.phone,
        status: e.status,
        call_id,
        sms_id,
        executed_at: e.executed_at.map(Millis),
        execution_data,
    }
}

/// The page and filters a request for executions asks for.
fn execution_query(
    params: ExecutionParams,
) -> Result<(super::extract::Page, ExecutionQuery), ApiError> {
    let page = PageParams {
        page: params.page,
        per_page: params.per_page,
    }
    .parse()?;
    let status = params
        .status
        .as_deref()
        .map(|s| {
            ExecutionStatus::parse(s).ok_or_else(|| {
                ApiError::invalid("status", format!("'{s}' is not an execution status"))
            })
        })
        .transpose()?;
    let before_id = params
        .cursor
        .as_deref()
        .map(|c| {
            c.parse::<i64>()
                .ok()
                .filter(|id| *id > 0)
                .ok_or_else(|| ApiError::invalid("cursor", "cursor must be a next_cursor value"))
        })
        .transpose()?;
    let query = ExecutionQuery {
        status,
        run_id: None,
        before_id,
        offset: if before_id.is_some() {
            0
        } else {
            page.offset()
        },
        limit: page.per_page,
    };
    Ok((page, query))
}

#[utoipa::path(get, path = "/api/v1/campaigns/{campaign_id}/executions", tag = "seed-001",
    params(("campaign_id" = i64, Path, description = "Campaign id"), ExecutionParams),
    responses(
        (status = 200, description = "A page of executions, newest first", body = ExecutionPage),
        (status = 401, description = "Unauthorized", body = super::ErrorBody),
        (status = 403, description = "Another workspace's campaign", body = super::ErrorBody),
        (status = 404, description = "Campaign not found", body = super::ErrorBody),
        (status = 422, description = "Bad page, per_page, status or cursor", body = super::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn executions(
    State(state): State<AppState>,
    auth: Result<Auth, ApiError>,
    Path(campaign_id): Path<String>,
    params: Result<QueryParams<ExecutionParams>, ApiError>,
) -> Result<Response, BurkiError> {
    let auth = auth?;
    let QueryParams(params) = params?;
    let (page, query) = match execution_query(params) {
        Ok(parsed) => parsed,
        // An unknown campaign is a 404 whatever else is wrong.
        Err(invalid) => {
            auth.campaign(&state, &campaign_id).await?;
            return Err(invalid.into());
        }
    };
    let workspace_id = auth.workspace_id;
    let render: RenderPage = Box::new(move |read: ExecutionPageRead| {
        let owner = read.workspace_id;
        // Another workspace's campaign is refused below, unread.
        let body = if owner == workspace_id {
            render_page(read, page)?
        } else {
            Vec::new()
        };
        Ok(RenderedPage {
            workspace_id: owner,
            body,
        })
    });
    let store = &state.store;
    let rendered = auth
        .owned(&campaign_id, |by| async move {
            store.execution_page(&by, &query, render).await
        })
        .await?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        )],
        rendered.body,
    )
        .into_response())
}

/// Seed 001's JSON of a page of executions.
fn render_page(read: ExecutionPageRead, page: super::extract::Page) -> StoreResult<Vec<u8>> {
    let rows = read.executions;
    // A page's rows come from a run or two: a list to search beats a hash
    // map, whose SipHash was as dear as the search.
    let snapshots: Vec<(i64, Option<FrozenRun>)> = read
        .snapshots
        .into_iter()
        .map(|(run_id, snapshot)| {
            let frozen = snapshot.map(|snapshot| {
                let template = Template::parse(&snapshot.template).ok();
                let variables = template.as_ref().map_or_else(Vec::new, |t| {
                    t.variables().into_iter().map(str::to_owned).collect()
                });
                FrozenRun {
                    snapshot,
                    template,
                    variables,
                }
            });
            (run_id, frozen)
        })
        .collect();
    let next_cursor = (rows.len() as i64 == page.per_page)
        .then(|| rows.last().map(|r| r.id.to_string()))
        .flatten();
    // About 400 bytes a row.
    let mut body = Vec::with_capacity(256 + 512 * rows.len());
    body.extend_from_slice(b"{\"executions\":[");
    let mut message = String::new();
    for (i, row) in rows.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        let snapshot = snapshots
            .iter()
            .find(|(run_id, _)| *run_id == row.run_id)
            .and_then(|(_, frozen)| frozen.as_ref());
        let variables = row.parse_variables()?;
        let view = execution_view(&row, &variables, snapshot, &mut message);
        write_execution(&mut body, &view);
    }
    body.extend_from_slice(b"],\"pagination\":");
    serde_json::to_writer(&mut body, &Pagination::new(page, read.total))
        .expect("pagination serialises");
    body.extend_from_slice(b",\"next_cursor\":");
    serde_json::to_writer(&mut body, &next_cursor).expect("a cursor serialises");
    body.push(b'}');
    Ok(body)
}

/// Writes one execution exactly as its `Serialize` derive would (a test
/// holds them to the same bytes), without serde: a page is a hundred rows
/// of a dozen keys, and serde_json scans every key and every value for
/// characters to escape a byte at a time. Here the keys are constants and
/// a value is copied as it is once a check finds nothing to escape.
fn write_execution(out: &mut Vec<u8>, e: &Execution) {
    out.extend_from_slice(b"{\"id\":");
    write_int(out, e.id);
    out.extend_from_slice(b",\"execution_id\":");
    write_int(out, e.execution_id);
    out.extend_from_slice(b",\"contact_id\":");
    write_int(out, e.contact_id);
    out.extend_from_slice(b",\"contact_name\":");
    write_opt_str(out, e.contact_name);
    out.extend_from_slice(b",\"contact_phone\":");
    write_str(out, e.contact_phone);
    out.extend_from_slice(b",\"status\":");
    write_str(out, e.status.as_str());
    out.extend_from_slice(b",\"call_id\":");
    write_opt_str(out, e.call_id);
    out.extend_from_slice(b",\"sms_id\":");
    write_opt_str(out, e.sms_id);
    out.extend_from_slice(b",\"executed_at\":");
    match e.executed_at {
        Some(Millis(ms)) => {
            out.push(b'"');
            write_rfc3339(out, ms);
            out.push(b'"');
        }
        None => out.extend_from_slice(b"null"),
    }
    let data = &e.execution_data;
    out.extend_from_slice(b",\"execution_data\":{\"from_number\":");
    write_opt_str(out, data.from_number);
    out.extend_from_slice(b",\"to_number\":");
    write_str(out, data.to_number);
    if let Some(message) = &data.personalized_welcome_message {
        out.extend_from_slice(b",\"personalized_welcome_message\":");
        write_str(out, message);
    }
    if let Some(used) = data.template_variables_used {
        out.extend_from_slice(b",\"template_variables_used\":{");
        for (i, (name, value)) in used.pairs().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_str(out, name);
            out.push(b':');
            write_str(out, value);
        }
        out.push(b'}');
    }
    if let Some(seconds) = data.duration_seconds {
        out.extend_from_slice(b",\"duration_seconds\":");
        write_int(out, seconds);
    }
    for (key, value) in [
        (&b",\"error_details\":"[..], data.error_details),
        (b",\"retry_reason\":", data.retry_reason),
        (b",\"message_status\":", data.message_status),
    ] {
        if let Some(value) = value {
            out.extend_from_slice(key);
            write_str(out, value);
        }
    }
    out.extend_from_slice(b",\"attempts\":");
    write_int(out, data.attempts);
    out.extend_from_slice(b"}}");
}

fn write_int(out: &mut Vec<u8>, n: i64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// A JSON string: copied whole when nothing in it needs escaping (what
/// serde_json escapes: `"`, `\\` and control characters), else by serde_json.
/// The check looks at every byte without stopping early, which lets the
/// compiler test many at once (nearly every string needs no escape): a
/// page's phone numbers, statuses and messages took 8.7 ns each where a
/// check that stops at the first escape took 15.3.
fn write_str(out: &mut Vec<u8>, s: &str) {
    let plain = s.bytes().fold(true, |plain, b| {
        plain & (b >= 0x20) & (b != b'"') & (b != b'\\')
    });
    if plain {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(&mut *out, s).expect("a string serialises");
    }
}

fn write_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => write_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ProviderSettings;

    fn frozen(channel: Channel, template: &str, sender: Option<&str>) -> FrozenRun {
        let parsed = Template::parse(template).ok();
        FrozenRun {
            variables: parsed.as_ref().map_or_else(Vec::new, |t| {
                t.variables().into_iter().map(str::to_owned).collect()
            }),
            template: parsed,
            snapshot: RunSnapshot {
                channel,
                provider: serde_json::from_value::<ProviderSettings>(
                    serde_json::json!({"kind": "simulated"}),
                )
                .unwrap(),
                sender: sender.map(str::to_owned),
                template: template.to_owned(),
                max_attempts: 3,
            },
        }
    }

    fn row<'a>(
        id: i64,
        phone: &'a str,
        name: Option<&'a str>,
        variables: &'a str,
    ) -> ExecutionRow<'a> {
        ExecutionRow {
            id,
            run_id: 1,
            batch_sequence: 1,
            contact_id: id / 7,
            phone,
            name,
            variables,
            status: ExecutionStatus::Pending,
            message_status: None,
            attempts: 0,
            provider_message_id: None,
            duration_seconds: None,
            error_details: None,
            retry_reason: None,
            executed_at: None,
            delivered_at: None,
        }
    }

    #[test]
    fn each_row_s_message_is_its_own_though_the_buffer_is_shared() {
        let run = frozen(Channel::Sms, "Hi {{name}}, day {{day}}", None);
        let rows = [
            row(1, "+15550000001", Some("Ann"), r#"{"day":"Monday"}"#),
            // No day: no message, and nothing left over from Ann's.
            row(2, "+15550000002", Some("Bob"), "{}"),
            row(
                3,
                "+15550000003",
                None,
                r#"{"name":"Cy","day":"Tue\tsday"}"#,
            ),
        ];
        let mut message = String::new();
        let messages: Vec<Option<String>> = rows
            .iter()
            .map(|row| {
                let variables = row.parse_variables().unwrap();
                let view = execution_view(row, &variables, Some(&run), &mut message);
                view.execution_data
                    .personalized_welcome_message
                    .map(str::to_owned)
            })
            .collect();
        assert_eq!(
            messages,
            [
                Some("Hi Ann, day Monday".to_owned()),
                None,
                Some("Hi Cy, day Tue\tsday".to_owned())
            ]
        );
    }

    #[test]
    fn an_execution_is_written_byte_for_byte_as_serde_writes_it() {
        let finished = ExecutionRow {
            status: ExecutionStatus::Completed,
            message_status: Some("delivered"),
            attempts: 2,
            provider_message_id: Some("SM0123456789abcdef"),
            duration_seconds: Some(-1),
            error_details: Some("a \u{1} control, a / slash, an é"),
            retry_reason: Some(r"C:\back\slash"),
            executed_at: Some(1_764_599_891_110),
            ..row(
                2,
                "+15550000002",
                Some("Zoë \"Z\" O'Neil"),
                r#"{"day":"Mon\nday\t\\"}"#,
            )
        };
        let rows = [
            row(1, "+15550000001", None, "{}"),
            row(i64::MAX, "+1555", Some(""), r#"{"name":"from variables"}"#),
            finished,
        ];
        let runs = [
            None,
            Some(frozen(
                Channel::Sms,
                "Hi {{name}}, day {{day}}",
                Some("+15550000000"),
            )),
            Some(frozen(Channel::Voice, "Hello {{ name }}", None)),
            Some(frozen(Channel::Sms, "No variables", None)),
            Some(frozen(Channel::Sms, "Missing {{nothing}}", None)),
        ];
        // One buffer for every message, as a page renders them.
        let mut message = String::new();
        for run in &runs {
            for row in &rows {
                for status in [ExecutionStatus::Pending, ExecutionStatus::NoAnswer] {
                    let row = ExecutionRow { status, ..*row };
                    let variables = row.parse_variables().unwrap();
                    let view = execution_view(&row, &variables, run.as_ref(), &mut message);
                    let mut written = Vec::new();
                    write_execution(&mut written, &view);
                    let expected = serde_json::to_vec(&view).unwrap();
                    assert_eq!(
                        String::from_utf8(written).unwrap(),
                        String::from_utf8(expected).unwrap()
                    );
                }
            }
        }
    }
}
