//! What Herald's own API sends back: plain structs with OpenAPI schemas.

use serde::Serialize;
use utoipa::ToSchema;

use crate::domain::{CampaignStatus, Channel, ContactError, ProviderSettings};
use crate::store::{ApiKeyRecord, Campaign, ContactRecord, RunRecord, Workspace};

/// Formats store milliseconds as RFC 3339 UTC with milliseconds.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

pub fn rfc3339_opt(ms: Option<i64>) -> Option<String> {
    ms.map(rfc3339)
}

/// Store milliseconds that serialise as [`rfc3339`] writes them, kept as a
/// number until then: a page of executions writes a hundred of them
/// straight into its body ([`write_rfc3339`]), with no `String` each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Millis(pub i64);

impl Serialize for Millis {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&rfc3339(self.0))
    }
}

/// Writes `ms` as [`rfc3339`] formats it (`2025-12-01T14:38:11.110Z`):
/// 43 ns where chrono's `String` took 108. The years 1970 to 9999 are
/// written here, by arithmetic; any other goes through chrono (they have
/// a sign or more digits).
pub fn write_rfc3339(out: &mut Vec<u8>, ms: i64) {
    /// 10000-01-01T00:00:00Z.
    const FIVE_DIGIT_YEARS: i64 = 253_402_300_800_000;
    if !(0..FIVE_DIGIT_YEARS).contains(&ms) {
        out.extend_from_slice(rfc3339(ms).as_bytes());
        return;
    }
    const DAY: i64 = 86_400_000;
    let (year, month, day) = civil_from_days(ms / DAY);
    let in_day = ms % DAY;
    let mut text = *b"0000-00-00T00:00:00.000Z";
    // Each field's digits, right-aligned in its place of the template.
    let fields = [
        (year, 0..4),
        (month, 5..7),
        (day, 8..10),
        (in_day / 3_600_000, 11..13),
        (in_day / 60_000 % 60, 14..16),
        (in_day / 1000 % 60, 17..19),
        (in_day % 1000, 20..23),
    ];
    for (mut value, place) in fields {
        for digit in text[place].iter_mut().rev() {
            *digit = b'0' + (value % 10) as u8;
            value /= 10;
        }
    }
    out.extend_from_slice(&text);
}

/// The proleptic Gregorian (year, month, day) of a day counted from
/// 1970-01-01 (Howard Hinnant's `civil_from_days`), for days ≥ 0.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    // Counted from 0000-03-01, in 400-year eras, with the leap day last.
    let shifted = days + 719_468;
    let era = shifted / 146_097;
    let day_of_era = shifted % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CampaignView {
    /// Integer id, used by the Burki-shaped surfaces.
    pub id: i64,
    /// String id, used by the Briq-shaped surfaces.
    pub uuid: String,
    pub name: String,
    pub channel: Channel,
    pub status: CampaignStatus,
    pub template: Option<String>,
    pub sender: Option<String>,
    /// Provider settings with secrets redacted.
    pub provider: ProviderSettings,
    pub max_attempts: u8,
    pub start_at: Option<String>,
    pub contact_count: i64,
    pub created_at: String,
    pub updated_at: String,
    pub started_at: Option<String>,
    pub completed_at: Option<String>,
    /// Live counters of the latest run (zeros before the first).
    pub progress: Progress,
}

/// Counters of a campaign's latest run.
#[derive(Debug, Serialize, ToSchema, Default)]
pub struct Progress {
    pub run_id: Option<String>,
    /// The run's status; `claimed` shows as `running`.
    pub run_status: Option<String>,
    pub total: i64,
    pub pending: i64,
    pub processing: i64,
    pub sent: i64,
    pub failed: i64,
    pub skipped: i64,
    pub delivered: i64,
    pub failed_delivery: i64,
    pub completed_batches: i64,
    pub total_batches: i64,
    /// Share of recipients with a final outcome, 0–100.
    pub progress_percentage: f64,
}

impl From<&RunRecord> for Progress {
    fn from(run: &RunRecord) -> Self {
        let c = run.counters;
        let done = c.sent + c.failed + c.skipped;
        Self {
            run_id: Some(run.uuid.clone()),
            run_status: Some(run.status.public().to_owned()),
            total: c.total,
            pending: c.pending,
            processing: c.processing,
            sent: c.sent,
            failed: c.failed,
            skipped: c.skipped,
            delivered: c.delivered,
            failed_delivery: c.failed_delivery,
            completed_batches: run.completed_batches,
            total_batches: run.total_batches,
            progress_percentage: if c.total > 0 {
                (done as f64 * 1000.0 / c.total as f64).round() / 10.0
            } else {
                0.0
            },
        }
    }
}

impl CampaignView {
    /// The campaign with its latest run's live counters.
    pub async fn with_progress(
        state: &super::AppState,
        c: &Campaign,
    ) -> Result<Self, super::ApiError> {
        let latest = state.store.latest_run(c.id).await?;
        Ok(Self::new(c, latest.as_ref()))
    }

    pub fn new(c: &Campaign, latest: Option<&RunRecord>) -> Self {
        Self {
            id: c.id,
            uuid: c.uuid.clone(),
            name: c.name.clone(),
            channel: c.channel,
            status: c.status,
            template: c.template.clone(),
            sender: c.sender.clone(),
            provider: c.provider.redacted(),
            max_attempts: c.max_attempts,
            start_at: rfc3339_opt(c.start_at),
            contact_count: c.contact_count,
            created_at: rfc3339(c.created_at),
            updated_at: rfc3339(c.updated_at),
            started_at: rfc3339_opt(c.started_at),
            completed_at: rfc3339_opt(c.completed_at),
            progress: latest.map(Progress::from).unwrap_or_default(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CampaignList {
    pub campaigns: Vec<CampaignView>,
    pub pagination: super::extract::Pagination,
}

/// The answer to every contact import, JSON or CSV.
#[derive(Debug, Serialize, ToSchema, Default)]
pub struct ImportReport {
    /// Numbers new to the campaign.
    pub imported: u64,
    /// Rows merged into a contact the campaign (or an earlier row) had.
    pub duplicates: u64,
    /// Rows refused; each is listed in `errors` (up to a cap).
    pub invalid: u64,
    pub errors: Vec<ContactError>,
    /// True when more rows were invalid than `errors` lists.
    pub errors_truncated: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ContactView {
    pub id: i64,
    pub phone: String,
    pub name: Option<String>,
    pub variables: std::collections::BTreeMap<String, String>,
    pub created_at: String,
}

impl From<ContactRecord> for ContactView {
    fn from(c: ContactRecord) -> Self {
        Self {
            id: c.id,
            phone: c.phone,
            name: c.name,
            variables: c.variables,
            created_at: rfc3339(c.created_at),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ContactList {
    pub contacts: Vec<ContactView>,
    pub pagination: super::extract::Pagination,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyView {
    pub id: i64,
    /// Public part of the key, safe to show and log.
    pub prefix: String,
    pub label: Option<String>,
    /// Extra powers: `pii` reads recipients in run snapshots.
    pub scopes: Vec<crate::domain::Scope>,
    pub created_at: String,
    pub revoked_at: Option<String>,
}

impl From<&ApiKeyRecord> for ApiKeyView {
    fn from(k: &ApiKeyRecord) -> Self {
        Self {
            id: k.id,
            prefix: k.prefix.clone(),
            label: k.label.clone(),
            scopes: k.scopes.clone(),
            created_at: rfc3339(k.created_at),
            revoked_at: rfc3339_opt(k.revoked_at),
        }
    }
}

/// A key just created: the only time its secret is shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedApiKey {
    #[serde(flatten)]
    pub view: ApiKeyView,
    pub key: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyList {
    pub keys: Vec<ApiKeyView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WorkspaceView {
    pub id: i64,
    pub name: String,
    pub default_region: String,
    /// Null means unlimited.
    pub credit_balance: Option<i64>,
    pub created_at: String,
}

impl From<&Workspace> for WorkspaceView {
    fn from(w: &Workspace) -> Self {
        Self {
            id: w.id,
            name: w.name.clone(),
            default_region: w.default_region.clone(),
            credit_balance: w.credit_balance,
            created_at: rfc3339(w.created_at),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_written_as_chrono_formats_them() {
        let written = |ms: i64| {
            let mut out = Vec::new();
            write_rfc3339(&mut out, ms);
            String::from_utf8(out).unwrap()
        };
        // Edges: the epoch, leap days, century years, the last four-digit
        // year, and what falls back to chrono on either side.
        let mut samples = vec![
            0,
            1,
            999,
            86_399_999,
            951_782_400_000,     // 2000-02-29
            4_107_542_399_999,   // 2100-02-28T23:59:59.999
            4_107_542_400_000,   // 2100-03-01
            1_764_599_891_110,   // 2025-12-01T14:38:11.110
            253_402_300_799_999, // 9999-12-31T23:59:59.999
            253_402_300_800_000,
            -1,
            i64::MIN,
            i64::MAX,
        ];
        // And a spread over the whole four-digit range.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            samples.push((x % 253_402_300_800_000) as i64);
        }
        for ms in samples {
            assert_eq!(written(ms), rfc3339(ms), "{ms}");
        }
        assert_eq!(written(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(
            serde_json::to_string(&Millis(1_764_599_891_110)).unwrap(),
            r#""2025-12-01T14:38:11.110Z""#
        );
    }
}
