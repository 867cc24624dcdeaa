//! How each wire protocol renders a campaign event. Pure functions: an
//! event (with the campaign snapshot it carries) in, a JSON message out.
//!
//! - [`Format::Burki`] (seed 000): `progress_update` with the seed's
//!   `progress` object for every event (live, a campaign's progress
//!   sockets are sent one only when what it shows changes: see the hub).
//! - [`Format::Jobs`] (seed 003): `job_progress` / `job_complete`, and the
//!   producer's own `job_*`, `file_uploaded`, `error` events.
//! - [`Format::Iterations`] (seed 004): batches as iterations, the run's end
//!   as `campaign_complete`, and the producer's own iteration events.
//! - [`Format::Sse`]: the event's own data.

use serde_json::{json, Map, Value};

use super::Format;
use crate::store::StoredEvent;

/// Event kinds a producer may post for a campaign it runs itself.
pub const EXTERNAL_KINDS: [&str; 8] = [
    "iteration_start",
    "evaluation_complete",
    "iteration_complete",
    "campaign_complete",
    "error",
    "job_progress",
    "job_complete",
    "file_uploaded",
];

fn iso(ms: Option<i64>) -> Value {
    ms.and_then(chrono::DateTime::from_timestamp_millis)
        .map(|t| Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)))
        .unwrap_or(Value::Null)
}

fn counter(snapshot: &Value, name: &str) -> i64 {
    snapshot["run"]["counters"][name].as_i64().unwrap_or(0)
}

fn round(x: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (x * f).round() / f
}

/// Seed 000's `data` object from a campaign snapshot.
pub fn burki_data(campaign_id: i64, snapshot: &Value) -> Value {
    let has_run = !snapshot["run"].is_null();
    let contacts = snapshot["contact_count"].as_i64().unwrap_or(0);
    let total = if has_run {
        counter(snapshot, "total")
    } else {
        contacts
    };
    let (sent, failed, skipped) = (
        counter(snapshot, "sent"),
        counter(snapshot, "failed"),
        counter(snapshot, "skipped"),
    );
    let pending = if has_run {
        counter(snapshot, "pending")
    } else {
        contacts
    };
    let done = sent + failed + skipped;
    json!({
        "campaign_id": campaign_id,
        "status": snapshot["status"],
        "progress": {
            "total_contacts": total,
            "completed": sent,
            "failed": failed,
            "processing": counter(snapshot, "processing"),
            "pending": pending,
            "progress_percentage": if total > 0 { round(done as f64 * 100.0 / total as f64, 1) } else { 0.0 },
            "success_rate": if sent + failed > 0 { round(sent as f64 * 100.0 / (sent + failed) as f64, 2) } else { 0.0 },
        },
        "started_at": iso(snapshot["started_at"].as_i64()),
        "completed_at": iso(snapshot["completed_at"].as_i64()),
    })
}

/// What a seed-000 subscriber is shown of an event: the `data` of its
/// `progress_update` (the campaign's status and counters), without the
/// `seq` and `ts` every message carries.
pub fn seed000_data(event: &StoredEvent) -> Value {
    burki_data(event.campaign_id, &event.data["campaign"])
}

/// What a campaign's seed-000 progress sockets were last shown: seed 000
/// sends a `progress_update` "whenever progress changes", so an event that
/// shows nothing new (a delivery receipt's: it has no delivery counts) is
/// not sent to them. The hub decides with it, and `bench fanout` times
/// the events it would send.
#[derive(Debug, Default)]
pub struct Seed000Shown(Option<Value>);

impl Seed000Shown {
    /// Whether `event` shows anything the last event did not; if so, it is
    /// what was last shown from now on.
    pub fn changed_by(&mut self, event: &StoredEvent) -> bool {
        let shown = seed000_data(event);
        if self.0.as_ref() == Some(&shown) {
            return false;
        }
        self.0 = Some(shown);
        true
    }
}

/// A campaign snapshot, shaped as the one `append_event` stores with each
/// event, built from the stored campaign and its latest run.
pub fn snapshot_of(
    campaign: &crate::store::Campaign,
    run: Option<&crate::store::RunRecord>,
) -> Value {
    json!({
        "status": campaign.status.as_str(),
        "started_at": campaign.started_at,
        "completed_at": campaign.completed_at,
        "contact_count": campaign.contact_count,
        "run": run.map(|r| json!({"id": r.uuid, "status": r.status.public(), "counters": r.counters,
                                  "total_batches": r.total_batches, "completed_batches": r.completed_batches,
                                  "error": r.error})),
    })
}

/// The event's data without the snapshot Herald attaches.
fn own_data(event: &StoredEvent) -> Map<String, Value> {
    let mut data = event.data.as_object().cloned().unwrap_or_default();
    data.remove("campaign");
    data
}

/// Every message carries its log position and when the event was
/// committed (`ts`, Unix milliseconds), so a client can resume and measure.
fn with_seq(mut message: Value, event: &StoredEvent) -> Value {
    message["seq"] = json!(event.seq);
    message["ts"] = json!(event.created_at);
    message
}

fn job_id(event: &StoredEvent) -> Value {
    event.data["campaign"]["run"]["id"].clone()
}

pub fn render(event: &StoredEvent, format: Format) -> Option<Value> {
    let snapshot = &event.data["campaign"];
    let message = match format {
        Format::Sse => return Some(Value::Object(own_data(event))),
        Format::Burki => json!({
            "type": "progress_update",
            "data": seed000_data(event),
        }),
        Format::Jobs => jobs(event, snapshot)?,
        Format::Iterations => iterations(event, snapshot)?,
    };
    Some(with_seq(message, event))
}

fn jobs(event: &StoredEvent, snapshot: &Value) -> Option<Value> {
    let total = counter(snapshot, "total");
    let processed =
        counter(snapshot, "sent") + counter(snapshot, "failed") + counter(snapshot, "skipped");
    match event.kind.as_str() {
        "job_progress" | "job_complete" | "file_uploaded" | "error" => {
            let mut message = own_data(event);
            message.insert("type".into(), json!(event.kind));
            if event.kind != "file_uploaded" && !message.contains_key("jobId") {
                message.insert(
                    "jobId".into(),
                    json!(format!("campaign-{}", event.campaign_id)),
                );
            }
            Some(Value::Object(message))
        }
        "run_started" | "progress" | "batch_started" | "batch_completed" => Some(json!({
            "type": "job_progress",
            "jobId": job_id(event),
            "progress": if total > 0 { processed * 100 / total } else { 0 },
            "processedCount": processed,
            "totalCount": total,
            "currentFile": event.data["batch_sequence"].as_i64().map(|b| format!(
                "batch {b} of {}", snapshot["run"]["total_batches"].as_i64().unwrap_or(0))),
        })),
        "run_completed" | "run_failed" | "run_cancelled" => Some(json!({
            "type": "job_complete",
            "jobId": job_id(event),
            "status": event.kind.trim_start_matches("run_"),
            "organized": counter(snapshot, "sent"),
            "failed": counter(snapshot, "failed"),
        })),
        _ => None,
    }
}

fn iterations(event: &StoredEvent, snapshot: &Value) -> Option<Value> {
    let timestamp = iso(Some(event.created_at));
    let processed =
        counter(snapshot, "sent") + counter(snapshot, "failed") + counter(snapshot, "skipped");
    let (kind, data) = match event.kind.as_str() {
        "iteration_start"
        | "evaluation_complete"
        | "iteration_complete"
        | "campaign_complete"
        | "error" => (event.kind.as_str(), Value::Object(own_data(event))),
        "batch_started" => (
            "iteration_start",
            json!({
                "iteration": event.data["batch_sequence"],
                "total_iterations": event.data["total_batches"],
                "phase": "sending",
                "batch_size": event.data["recipient_count"],
            }),
        ),
        "batch_completed" => (
            "iteration_complete",
            json!({
                "iteration": event.data["batch_sequence"],
                "evaluations_completed": processed,
                "status": event.data["status"],
                "sent": event.data["sent"],
                "failed": event.data["failed"],
                "skipped": event.data["skipped"],
            }),
        ),
        "run_completed" | "run_failed" | "run_cancelled" => (
            "campaign_complete",
            json!({
                "status": event.kind.trim_start_matches("run_"),
                "total_iterations": snapshot["run"]["total_batches"],
                "total_evaluations": processed,
                "sent": counter(snapshot, "sent"),
                "failed": counter(snapshot, "failed"),
                "error": snapshot["run"]["error"],
            }),
        ),
        _ => return None,
    };
    Some(json!({"type": kind, "timestamp": timestamp, "data": data}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str, data: Value) -> StoredEvent {
        StoredEvent {
            campaign_id: 42,
            seq: 7,
            kind: kind.into(),
            data,
            created_at: 1_707_984_000_000,
        }
    }

    fn snapshot() -> Value {
        json!({"status": "running", "started_at": 1_707_984_000_000i64, "completed_at": null, "contact_count": 500,
               "run": {"id": "r1", "status": "running", "total_batches": 1,
                       "counters": {"total": 500, "pending": 145, "processing": 5, "sent": 325, "failed": 25, "skipped": 0}}})
    }

    #[test]
    fn only_an_event_that_changes_what_seed_000_shows_counts_as_changed() {
        let mut shown = Seed000Shown::default();
        assert!(shown.changed_by(&event("progress", json!({"campaign": snapshot()}))));
        // A receipt's progress: other data, the same counters.
        let receipts = event("progress", json!({"receipts": 3, "campaign": snapshot()}));
        assert!(!shown.changed_by(&receipts));
        let mut moved = snapshot();
        moved["run"]["counters"]["sent"] = json!(326);
        assert!(shown.changed_by(&event("progress", json!({"campaign": moved}))));
        // Back to what was shown before the last: a change again.
        assert!(shown.changed_by(&receipts));
    }

    #[test]
    fn burki_progress_matches_the_seed_example() {
        let e = event("progress", json!({"campaign": snapshot()}));
        let m = render(&e, Format::Burki).unwrap();
        assert_eq!(m["type"], "progress_update");
        assert_eq!(m["seq"], 7);
        assert_eq!(
            m["data"]["progress"],
            json!({"total_contacts": 500, "completed": 325, "failed": 25, "processing": 5,
                   "pending": 145, "progress_percentage": 70.0, "success_rate": 92.86})
        );
        assert_eq!(m["data"]["started_at"], "2024-02-15T08:00:00Z");
        assert!(m["data"]["completed_at"].is_null());
    }

    #[test]
    fn engine_runs_read_as_jobs_and_iterations() {
        let mut s = snapshot();
        s["run"]["counters"] = json!({"total": 500, "pending": 0, "processing": 0, "sent": 480, "failed": 20, "skipped": 0});
        let done = event("run_completed", json!({"campaign": s}));
        let job = render(&done, Format::Jobs).unwrap();
        assert_eq!(
            job,
            json!({"type": "job_complete", "jobId": "r1", "status": "completed", "organized": 480, "failed": 20, "seq": 7, "ts": 1_707_984_000_000i64})
        );
        let it = render(&done, Format::Iterations).unwrap();
        assert_eq!(it["type"], "campaign_complete");
        assert_eq!(it["data"]["total_evaluations"], 500);
        let batch = event(
            "batch_started",
            json!({"batch_sequence": 1, "total_batches": 1, "recipient_count": 500, "campaign": snapshot()}),
        );
        let start = render(&batch, Format::Iterations).unwrap();
        assert_eq!(
            start["data"],
            json!({"iteration": 1, "total_iterations": 1, "phase": "sending", "batch_size": 500})
        );
        assert!(render(
            &event("progress", json!({"campaign": snapshot()})),
            Format::Iterations
        )
        .is_none());
    }

    #[test]
    fn producer_events_pass_through_without_the_snapshot() {
        let e = event(
            "iteration_complete",
            json!({"iteration": 5, "hypervolume": 0.682, "campaign": snapshot()}),
        );
        let m = render(&e, Format::Iterations).unwrap();
        assert_eq!(m["data"], json!({"iteration": 5, "hypervolume": 0.682}));
        assert_eq!(m["timestamp"], "2024-02-15T08:00:00Z");
        let j = event(
            "job_progress",
            json!({"jobId": "job_123", "progress": 65, "processedCount": 65, "totalCount": 100, "currentFile": "document.pdf", "campaign": snapshot()}),
        );
        let m = render(&j, Format::Jobs).unwrap();
        assert_eq!(
            m,
            json!({"type": "job_progress", "jobId": "job_123", "progress": 65, "processedCount": 65, "totalCount": 100, "currentFile": "document.pdf", "seq": 7, "ts": 1_707_984_000_000i64})
        );
        assert_eq!(render(&j, Format::Sse).unwrap()["jobId"], "job_123");
    }
}
