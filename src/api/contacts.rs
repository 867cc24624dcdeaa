//! `/v1/campaigns/{id}/contacts`: JSON bulk add, streamed CSV import, list.
//!
//! Both imports share one pipeline: a blocking producer parses rows (phone
//! parsing is CPU work), merges duplicates within a chunk and hands chunks
//! of contacts over a bounded channel to [`Store::import_contacts`], which
//! upserts them in one transaction. The channel bound is what keeps a
//! 1,000,000-row upload in constant memory: the parser can run at most a
//! few chunks ahead of the database.
//!
//! [`Store::import_contacts`]: crate::store::Store::import_contacts

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{self, Read};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap};
use axum::routing::post;
use axum::{Json, Router};
use futures::TryStreamExt;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::io::{StreamReader, SyncIoBridge};
use utoipa::ToSchema;

use super::extract::{ApiJson, Auth, PageParams, Pagination, QueryParams};
use super::views::{ContactList, ContactView, ImportReport};
use super::{ApiError, AppState};
use crate::domain::contact::{clean_value, MAX_VARIABLES};
use crate::domain::{ContactError, CsvLayout, NewContact, PhoneNumber, Region, Template};
use crate::store::{Campaign, ImportMsg, StoreError};

/// Contacts per chunk handed to the store.
const CHUNK: usize = 1000;
/// Row errors listed in a report; the count stays exact past it.
pub const MAX_LISTED_ERRORS: usize = 1000;
/// Contacts one JSON request may carry; larger lists go through CSV.
pub const MAX_JSON_CONTACTS: usize = 100_000;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/campaigns/{id}/contacts", post(add).get(list))
        .route(
            "/v1/campaigns/{id}/contacts:import",
            // The CSV route enforces its own, larger limit while streaming.
            post(import_csv).layer(axum::extract::DefaultBodyLimit::disable()),
        )
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddContacts {
    contacts: Vec<ContactInput>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContactInput {
    /// Any common format; read with the workspace's default region.
    phone: String,
    name: Option<String>,
    /// String, number or boolean values, used by `{{variables}}`.
    #[schema(value_type = Option<Object>)]
    variables: Option<BTreeMap<String, serde_json::Value>>,
}

/// What every import checks a row against.
struct ImportRules {
    region: Region,
    /// Variables the campaign's template uses.
    required: BTreeSet<String>,
}

/// The producer side of an import: merges duplicates within a chunk,
/// collects row errors, and sends full chunks to the store.
struct ImportSink {
    tx: mpsc::Sender<ImportMsg>,
    chunk: Vec<NewContact>,
    positions: HashMap<PhoneNumber, usize>,
    merged: u64,
    report: ImportReport,
}

/// The store stopped listening (it failed); its own error is the answer.
struct StoreGone;

impl ImportSink {
    fn new(tx: mpsc::Sender<ImportMsg>) -> Self {
        Self {
            tx,
            chunk: Vec::with_capacity(CHUNK),
            positions: HashMap::with_capacity(CHUNK),
            merged: 0,
            report: ImportReport::default(),
        }
    }

    fn accept(&mut self, contact: NewContact) -> Result<(), StoreGone> {
        if let Some(&at) = self.positions.get(&contact.phone) {
            self.chunk[at].merge(contact);
            self.merged += 1;
            return Ok(());
        }
        self.positions
            .insert(contact.phone.clone(), self.chunk.len());
        self.chunk.push(contact);
        if self.chunk.len() >= CHUNK {
            self.flush()?;
        }
        Ok(())
    }

    fn reject(&mut self, error: ContactError) {
        self.report.invalid += 1;
        if self.report.errors.len() < MAX_LISTED_ERRORS {
            self.report.errors.push(error);
        } else {
            self.report.errors_truncated = true;
        }
    }

    fn flush(&mut self) -> Result<(), StoreGone> {
        if self.chunk.is_empty() && self.merged == 0 {
            return Ok(());
        }
        let msg = ImportMsg::Chunk {
            contacts: std::mem::replace(&mut self.chunk, Vec::with_capacity(CHUNK)),
            merged: std::mem::take(&mut self.merged),
        };
        self.positions.clear();
        self.tx.blocking_send(msg).map_err(|_| StoreGone)
    }

    /// Sends the rest and the end marker; returns the row-level report.
    fn finish(mut self) -> Result<ImportReport, StoreGone> {
        self.flush()?;
        self.tx
            .blocking_send(ImportMsg::Done)
            .map_err(|_| StoreGone)?;
        Ok(self.report)
    }

    fn abort(self) {
        let _ = self.tx.blocking_send(ImportMsg::Abort);
    }
}

impl ImportRules {
    /// Checks a parsed contact against the template; `Err` is the column and why.
    fn check(&self, contact: &NewContact) -> Result<(), (String, String)> {
        let required = self.required.iter().map(String::as_str).collect();
        match contact.first_missing(&required) {
            Some(variable) => Err((
                variable.to_owned(),
                format!("missing template variable '{variable}'"),
            )),
            None => Ok(()),
        }
    }
}

/// Runs a blocking producer beside the store's import and combines them.
async fn run_import<P>(
    state: &AppState,
    campaign: &Campaign,
    produce: P,
) -> Result<ImportReport, ApiError>
where
    P: FnOnce(&mut ImportSink) -> Result<(), ApiError> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(4);
    let producer = tokio::task::spawn_blocking(move || {
        let mut sink = ImportSink::new(tx);
        match produce(&mut sink) {
            Ok(()) => sink.finish().map_err(|StoreGone| None),
            Err(err) => {
                sink.abort();
                Err(Some(err))
            }
        }
    });
    let stored = state.store.import_contacts(campaign.id, rx).await;
    let produced = producer
        .await
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("import parser panicked: {e}")))?;
    match (produced, stored) {
        // The store's own failure (a full disk, say) explains a producer
        // that found it gone.
        (_, Err(store_error)) if !matches!(store_error, StoreError::Aborted) => {
            Err(store_error.into())
        }
        (Err(Some(parse_error)), _) => Err(parse_error),
        (_, Err(store_error)) => Err(store_error.into()),
        (Err(None), Ok(_)) => Err(ApiError::Internal(anyhow::anyhow!(
            "import store finished before its producer"
        ))),
        (Ok(mut report), Ok(counts)) => {
            report.imported = counts.imported;
            report.duplicates = counts.duplicates;
            tracing::info!(
                campaign = campaign.id,
                imported = report.imported,
                duplicates = report.duplicates,
                invalid = report.invalid,
                "contacts imported"
            );
            Ok(report)
        }
    }
}

async fn import_rules(
    state: &AppState,
    auth: &Auth,
    campaign: &Campaign,
) -> Result<ImportRules, ApiError> {
    if !matches!(
        campaign.status,
        crate::domain::CampaignStatus::Draft | crate::domain::CampaignStatus::Scheduled
    ) {
        return Err(ApiError::Conflict {
            message: format!(
                "campaign is {}; contacts can be added while it is draft or scheduled",
                campaign.status
            ),
            current_status: Some(campaign.status),
        });
    }
    let workspace = state.store.workspace(auth.workspace_id).await?;
    let region = Region::parse(&workspace.default_region).unwrap_or_default();
    let required = campaign
        .template
        .as_deref()
        .and_then(|t| Template::parse(t).ok())
        .map(|t| t.variables().into_iter().map(str::to_owned).collect())
        .unwrap_or_default();
    Ok(ImportRules { region, required })
}

#[utoipa::path(post, path = "/v1/campaigns/{id}/contacts", tag = "contacts",
    params(("id" = String, Path, description = "Campaign id (integer) or uuid")),
    request_body = AddContacts,
    responses(
        (status = 200, description = "Counts; bad contacts listed one by one, good ones kept", body = ImportReport),
        (status = 400, description = "Malformed JSON", body = super::ErrorBody),
        (status = 401, description = "Missing or invalid key", body = super::ErrorBody),
        (status = 403, description = "Another workspace's campaign", body = super::ErrorBody),
        (status = 404, description = "No such campaign", body = super::ErrorBody),
        (status = 409, description = "Campaign is past scheduling", body = super::ErrorBody),
        (status = 413, description = "Body too large", body = super::ErrorBody),
        (status = 422, description = "Invalid field", body = super::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn add(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<AddContacts>,
) -> Result<Json<ImportReport>, ApiError> {
    let campaign = auth.campaign(&state, &id).await?;
    if body.contacts.len() > MAX_JSON_CONTACTS {
        return Err(ApiError::invalid(
            "contacts",
            format!("at most {MAX_JSON_CONTACTS} contacts per request; import larger lists as CSV"),
        ));
    }
    let rules = import_rules(&state, &auth, &campaign).await?;
    let report = run_import(&state, &campaign, move |sink| {
        for (index, input) in body.contacts.into_iter().enumerate() {
            let checked =
                contact_from_json(input, rules.region).and_then(|c| rules.check(&c).map(|()| c));
            match checked {
                Ok(contact) => sink.accept(contact).map_err(|StoreGone| store_gone())?,
                Err((column, reason)) => sink.reject(ContactError {
                    line: None,
                    index: Some(index),
                    column,
                    reason,
                }),
            }
        }
        Ok(())
    })
    .await?;
    Ok(Json(report))
}

fn store_gone() -> ApiError {
    ApiError::Internal(anyhow::anyhow!("the store stopped reading the import"))
}

fn contact_from_json(input: ContactInput, region: Region) -> Result<NewContact, (String, String)> {
    let phone = PhoneNumber::parse(&input.phone, region)
        .map_err(|e| ("phone".to_owned(), e.to_string()))?;
    let name = input
        .name
        .as_deref()
        .map(clean_value)
        .transpose()
        .map_err(|e| ("name".to_owned(), e))?
        .flatten();
    let raw_variables = input.variables.unwrap_or_default();
    if raw_variables.len() > MAX_VARIABLES {
        return Err((
            "variables".into(),
            format!("at most {MAX_VARIABLES} variables per contact"),
        ));
    }
    let mut variables = BTreeMap::new();
    for (key, value) in raw_variables {
        let column = format!("variables.{key}");
        if key.trim().is_empty() || key.len() > 64 {
            return Err((column, "variable names must be 1 to 64 characters".into()));
        }
        let text = match value {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            serde_json::Value::Null => continue,
            _ => {
                return Err((
                    column,
                    "a variable must be a string, number or boolean".into(),
                ))
            }
        };
        if let Some(clean) = clean_value(&text).map_err(|e| (column, e))? {
            variables.insert(key, clean);
        }
    }
    Ok(NewContact {
        phone,
        name,
        variables,
    })
}

/// Marks the stream error raised when an upload passes the import limit.
#[derive(Debug)]
struct BodyTooLarge;

impl std::fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("body exceeds the import limit")
    }
}

impl std::error::Error for BodyTooLarge {}

#[utoipa::path(post, path = "/v1/campaigns/{id}/contacts:import", tag = "contacts",
    params(("id" = String, Path, description = "Campaign id (integer) or uuid")),
    request_body(content = String, content_type = "text/csv",
        description = "Header row with `phone` (required), `name` and any variable columns"),
    responses(
        (status = 200, description = "Counts; bad rows listed with line, column and reason", body = ImportReport),
        (status = 400, description = "Malformed CSV: empty, no header, no phone column", body = super::ErrorBody),
        (status = 401, description = "Missing or invalid key", body = super::ErrorBody),
        (status = 403, description = "Another workspace's campaign", body = super::ErrorBody),
        (status = 404, description = "No such campaign", body = super::ErrorBody),
        (status = 409, description = "Campaign is past scheduling", body = super::ErrorBody),
        (status = 413, description = "Upload larger than the import limit", body = super::ErrorBody),
        (status = 415, description = "Not text/csv", body = super::ErrorBody),
        (status = 422, description = "The template needs a column the CSV lacks", body = super::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn import_csv(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<ImportReport>, ApiError> {
    let campaign = auth.campaign(&state, &id).await?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !(content_type.starts_with("text/csv") || content_type.starts_with("application/csv")) {
        return Err(ApiError::UnsupportedMediaType(format!(
            "'{content_type}'; send text/csv"
        )));
    }
    let limit = state.config.max_import_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let rules = import_rules(&state, &auth, &campaign).await?;

    let mut seen = 0usize;
    let stream = body
        .into_data_stream()
        .map_err(io::Error::other)
        .and_then(move |chunk| {
            seen += chunk.len();
            let result = if seen > limit {
                Err(io::Error::other(BodyTooLarge))
            } else {
                Ok(chunk)
            };
            std::future::ready(result)
        });
    let reader = SyncIoBridge::new(StreamReader::new(stream));
    let report = run_import(&state, &campaign, move |sink| {
        parse_csv(reader, &rules, sink, limit)
    })
    .await?;
    Ok(Json(report))
}

fn csv_error(err: csv::Error, limit: usize) -> ApiError {
    if let csv::ErrorKind::Io(io_err) = err.kind() {
        if io_err
            .get_ref()
            .is_some_and(|inner| inner.is::<BodyTooLarge>())
        {
            return ApiError::PayloadTooLarge { limit };
        }
        return ApiError::bad_request(Some("body"), format!("could not read the upload: {io_err}"));
    }
    ApiError::bad_request(Some("body"), format!("malformed CSV: {err}"))
}

fn parse_csv(
    input: impl Read,
    rules: &ImportRules,
    sink: &mut ImportSink,
    limit: usize,
) -> Result<(), ApiError> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .trim(csv::Trim::None)
        .from_reader(input);
    let headers = reader.headers().map_err(|e| csv_error(e, limit))?.clone();
    if headers
        .iter()
        .all(|h| h.trim_start_matches('\u{feff}').trim().is_empty())
    {
        return Err(ApiError::bad_request(
            Some("body"),
            "the CSV is empty: the first line must be a header row with a 'phone' column",
        ));
    }
    let layout = CsvLayout::from_headers(headers.iter())
        .map_err(|e| ApiError::bad_request(Some("phone"), e))?;
    let columns: BTreeSet<&str> = layout.variable_names().collect();
    let has_name = headers.iter().any(|h| {
        h.trim_start_matches('\u{feff}')
            .trim()
            .eq_ignore_ascii_case("name")
    });
    for variable in &rules.required {
        let provided = match variable.as_str() {
            "phone" => true,
            "name" => has_name || columns.contains("name"),
            other => columns.contains(other),
        };
        if !provided {
            return Err(ApiError::invalid(
                variable.clone(),
                format!(
                    "the template uses {{{{{variable}}}}} but the CSV has no '{variable}' column"
                ),
            ));
        }
    }

    let mut record = csv::StringRecord::new();
    loop {
        match reader.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {
                let line = record.position().map_or(0, |p| p.line());
                if record.iter().all(|field| field.trim().is_empty()) {
                    continue;
                }
                let checked = layout
                    .contact(|i| record.get(i), rules.region)
                    .and_then(|c| rules.check(&c).map(|()| c));
                match checked {
                    Ok(contact) => sink.accept(contact).map_err(|StoreGone| store_gone())?,
                    Err((column, reason)) => sink.reject(ContactError {
                        line: Some(line),
                        index: None,
                        column,
                        reason,
                    }),
                }
            }
            Err(err) if matches!(err.kind(), csv::ErrorKind::Utf8 { .. }) => {
                let line = err.position().map_or(0, |p| p.line());
                sink.reject(ContactError {
                    line: Some(line),
                    index: None,
                    column: "row".into(),
                    reason: "the row is not valid UTF-8".into(),
                });
            }
            Err(err) => return Err(csv_error(err, limit)),
        }
    }
    Ok(())
}

#[utoipa::path(get, path = "/v1/campaigns/{id}/contacts", tag = "contacts",
    params(("id" = String, Path, description = "Campaign id (integer) or uuid"), PageParams),
    responses(
        (status = 200, description = "A page of contacts in import order", body = ContactList),
        (status = 401, description = "Missing or invalid key", body = super::ErrorBody),
        (status = 403, description = "Another workspace's campaign", body = super::ErrorBody),
        (status = 404, description = "No such campaign", body = super::ErrorBody),
        (status = 422, description = "Bad paging", body = super::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn list(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    QueryParams(params): QueryParams<PageParams>,
) -> Result<Json<ContactList>, ApiError> {
    let campaign = auth.campaign(&state, &id).await?;
    let page = params.parse()?;
    let (contacts, total) = state
        .store
        .list_contacts(campaign.id, page.offset(), page.per_page)
        .await?;
    Ok(Json(ContactList {
        contacts: contacts.into_iter().map(ContactView::from).collect(),
        pagination: Pagination::new(page, total),
    }))
}
