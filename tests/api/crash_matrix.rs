//! The crash matrix: one run, twenty SIGKILLs at chosen kinds of moment —
//! just after a claim, mid-batch, between a send and its record, while
//! delivery receipts stream in, during a pause — each followed by a
//! restart. Afterwards the run completes, the provider saw each recipient
//! at most once, counters equal rows, every receipt is counted once, the
//! credits charged equal the messages sent, and the event log has no gap.
//!
//! On SQLite one node is killed and restarted; on Postgres two nodes share
//! the run and the kills alternate between them. The run has 40,000
//! recipients in CI (`HERALD_CRASH_RECIPIENTS=100000` runs the size the
//! issue names; the rest of the run after the last kill only costs time).
//! The fake provider
//! gives each kill a budget of sends and holds sends past it (a slow
//! provider) until the next kill, so a fast machine cannot finish the run
//! before the twentieth kill.
//!
//! To chase a failure: `HERALD_CRASH_KEEP=1` keeps the database and the
//! node logs (the path is printed), `HERALD_CRASH_POINTS=receipts,pause`
//! cycles through chosen kill points only, and `HERALD_CRASH_RESUME_CHECK=0`
//! kills again without waiting for the run to resume.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use rand::Rng;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{backend_is_postgres, count_by_status, fresh_database_url, HERALD};
use crate::process::{create_campaign, create_key, CountingProvider, Node, NodeOptions};

const OPTIONS: NodeOptions = NodeOptions {
    engine: true,
    in_flight: 8,
    drain_seconds: 30,
    json_logs: false,
};

/// A fake Twilio Messages API. It counts sends per recipient and answers
/// each after a delay (both kept by a [`CountingProvider`]) with a new sid, and then posts that message's `delivered`
/// status callback, signed as Twilio signs it, to the URL the send named,
/// retrying until Herald takes it (the node may be dead for a while).
#[derive(Clone, Default)]
struct FakeTwilio {
    sends: CountingProvider,
    /// Sends received and not yet answered.
    unanswered: Arc<AtomicI64>,
    /// Status callbacks Herald has accepted.
    callbacks_taken: Arc<AtomicI64>,
    next_sid: Arc<AtomicI64>,
    /// Sends received (the counts' sum, kept apart to be read per send).
    received: Arc<AtomicI64>,
    /// Sends past this many are held for up to [`LONGEST_HOLD`].
    budget: Arc<AtomicI64>,
    /// One client for every status callback, so they reuse connections.
    callbacks: reqwest::Client,
}

/// Well under Herald's 10 s provider timeout: a held send is slow, never
/// timed out (Herald would retry a timed-out send).
const LONGEST_HOLD: Duration = Duration::from_secs(4);

const AUTH_TOKEN: &str = "crash-matrix-token";

impl FakeTwilio {
    async fn serve() -> (Self, Value) {
        let fake = Self::default();
        fake.sends.set_delay(NORMAL_DELAY);
        fake.budget.store(i64::MAX, Ordering::SeqCst);
        let app = axum::Router::new()
            .route(
                "/2010-04-01/Accounts/AC1/Messages.json",
                axum::routing::post(send),
            )
            .with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let settings = json!({"kind": "twilio", "base_url": base, "account_sid": "AC1",
                              "auth_token": AUTH_TOKEN, "from": "+15550009999"});
        (fake, settings)
    }
}

/// The delay of an ordinary send; `BetweenSendAndRecord` slows it down.
const NORMAL_DELAY: Duration = Duration::from_millis(3);

async fn send(
    State(fake): State<FakeTwilio>,
    axum::Form(form): axum::Form<HashMap<String, String>>,
) -> (axum::http::StatusCode, axum::Json<Value>) {
    let held_since = tokio::time::Instant::now();
    while fake.received.load(Ordering::SeqCst) >= fake.budget.load(Ordering::SeqCst)
        && held_since.elapsed() < LONGEST_HOLD
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fake.received.fetch_add(1, Ordering::SeqCst);
    fake.sends.count(&form["To"]);
    fake.unanswered.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(fake.sends.delay()).await;
    fake.unanswered.fetch_sub(1, Ordering::SeqCst);
    let sid = format!("SM{:032}", fake.next_sid.fetch_add(1, Ordering::SeqCst));
    let callback = form["StatusCallback"].clone();
    let taken = fake.callbacks_taken.clone();
    let client = fake.callbacks.clone();
    let params = vec![
        ("MessageSid".to_owned(), sid.clone()),
        ("MessageStatus".to_owned(), "delivered".to_owned()),
    ];
    tokio::spawn(async move {
        // Like Twilio's `delivered`, seconds after the send's answer (by
        // then Herald has recorded the send: a callback for a message it
        // does not know is acknowledged and dropped); unlike Twilio, tried
        // until taken.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let signature = herald::providers::twilio::signature(AUTH_TOKEN, &callback, &params);
        loop {
            let posted = client
                .post(&callback)
                .header("X-Twilio-Signature", &signature)
                .form(&params)
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            match posted {
                Ok(r) if r.status() == StatusCode::NO_CONTENT => break,
                Ok(r) => assert!(
                    r.status().is_server_error(),
                    "a status callback was refused: {}",
                    r.status()
                ),
                Err(_) => {} // The node is down: try again.
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        taken.fetch_add(1, Ordering::SeqCst);
    });
    (
        axum::http::StatusCode::CREATED,
        axum::Json(json!({"sid": sid, "status": "queued"})),
    )
}

/// Sends the fake has received so far.
fn sent_so_far(twilio: &FakeTwilio) -> i64 {
    twilio.received.load(Ordering::SeqCst)
}

/// Where in the run a kill lands.
#[derive(Debug, Clone, Copy)]
enum KillPoint {
    /// As soon as a (re)started node has sent again after taking the run.
    AfterClaim,
    /// After a random number of further sends.
    MidBatch,
    /// While sends are on the wire, answered by no one yet.
    BetweenSendAndRecord,
    /// While status callbacks are being taken.
    DuringReceipts,
    /// Just after a pause was asked for; the run is resumed after restart.
    DuringPause,
}

const KILL_POINTS: [(&str, KillPoint); 5] = [
    ("claim", KillPoint::AfterClaim),
    ("mid-batch", KillPoint::MidBatch),
    ("send-record", KillPoint::BetweenSendAndRecord),
    ("receipts", KillPoint::DuringReceipts),
    ("pause", KillPoint::DuringPause),
];

/// The kill points to cycle through: all, or `HERALD_CRASH_POINTS`'s.
fn kill_points() -> Vec<KillPoint> {
    let Ok(chosen) = std::env::var("HERALD_CRASH_POINTS") else {
        return KILL_POINTS.iter().map(|(_, point)| *point).collect();
    };
    chosen
        .split(',')
        .map(|name| {
            KILL_POINTS
                .iter()
                .find(|(n, _)| *n == name.trim())
                .unwrap_or_else(|| panic!("HERALD_CRASH_POINTS: no kill point {name:?}"))
                .1
        })
        .collect()
}

const KILLS: i64 = 20;

struct Cluster {
    nodes: Vec<Node>,
    database_url: String,
    logs: Vec<std::path::PathBuf>,
    key: String,
    id: i64,
}

impl Cluster {
    async fn campaign(&self) -> Value {
        self.nodes[0].campaign(&self.key, self.id).await
    }

    async fn post(&self, action: &str) -> StatusCode {
        reqwest::Client::new()
            .post(format!(
                "{}/v1/campaigns/{}/{action}",
                self.nodes[0].base, self.id
            ))
            .bearer_auth(&self.key)
            .send()
            .await
            .unwrap()
            .status()
    }

    async fn restart(&mut self, victim: usize) {
        let port = self.nodes[victim].port;
        self.nodes[victim] =
            Node::start_on(&self.database_url, port, OPTIONS, &self.logs[victim]).await;
    }
}

/// Polls `condition` every 10 ms for at most 60 s.
async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "waited for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_kills_at_chosen_moments_send_no_one_twice_and_lose_nothing() {
    let recipients: usize = std::env::var("HERALD_CRASH_RECIPIENTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(40_000);
    let points = kill_points();
    let resume_check = std::env::var("HERALD_CRASH_RESUME_CHECK").as_deref() != Ok("0");
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().to_owned();
    let _removed_at_the_end = if std::env::var_os("HERALD_CRASH_KEEP").is_some() {
        eprintln!(
            "crash matrix: database and node logs kept in {}",
            dir.display()
        );
        let _ = temp.keep();
        None
    } else {
        Some(temp)
    };
    let database_url = fresh_database_url(&dir).await;
    let key = create_key(&database_url, "crash-matrix");
    let topped_up = recipients as i64 + 1000;
    let credits = std::process::Command::new(HERALD)
        .args([
            "credits",
            "add",
            "--workspace",
            "crash-matrix",
            &topped_up.to_string(),
        ])
        .env("HERALD_DATABASE_URL", &database_url)
        .output()
        .unwrap();
    assert!(credits.status.success(), "{credits:?}");
    let (twilio, settings) = FakeTwilio::serve().await;
    let node_count = if backend_is_postgres() { 2 } else { 1 };
    let logs: Vec<_> = (0..node_count)
        .map(|n| dir.join(format!("node{n}.log")))
        .collect();
    let mut nodes = Vec::new();
    for log in &logs {
        nodes.push(Node::start(&database_url, OPTIONS, log).await);
    }
    let id = create_campaign(&nodes[0], &key, settings, recipients).await;
    let mut cluster = Cluster {
        nodes,
        database_url: database_url.clone(),
        logs,
        key: key.clone(),
        id,
    };
    // Each kill's sends: the twenty take at most four fifths of the run.
    let per_kill = recipients as i64 / (KILLS + 5);
    twilio.budget.store(per_kill, Ordering::SeqCst);
    cluster.nodes[0].start_campaign(&key, id).await;

    let mut rng = rand::thread_rng();
    let mut survived = 0;
    let started = std::time::Instant::now();
    for kill in 0..KILLS {
        let point = points[kill as usize % points.len()];
        let victim = kill as usize % node_count;
        let sent_before = sent_so_far(&twilio);
        let mut paused = false;
        match point {
            KillPoint::AfterClaim => {
                until("a send after the claim", || {
                    sent_so_far(&twilio) > sent_before
                })
                .await;
                tokio::time::sleep(Duration::from_millis(rng.gen_range(0..50))).await;
            }
            KillPoint::MidBatch => {
                let more = rng.gen_range(50..400);
                until("sends mid-batch", || {
                    sent_so_far(&twilio) >= sent_before + more
                })
                .await;
            }
            KillPoint::BetweenSendAndRecord => {
                twilio.sends.set_delay(Duration::from_millis(400));
                until("sends on the wire", || {
                    twilio.unanswered.load(Ordering::SeqCst) > 0
                })
                .await;
                tokio::time::sleep(Duration::from_millis(rng.gen_range(0..200))).await;
            }
            KillPoint::DuringReceipts => {
                let taken = twilio.callbacks_taken.load(Ordering::SeqCst);
                let more = rng.gen_range(20..200);
                until("receipts taken", || {
                    twilio.callbacks_taken.load(Ordering::SeqCst) >= taken + more
                })
                .await;
            }
            KillPoint::DuringPause => {
                assert_eq!(cluster.post("pause").await, StatusCode::OK);
                paused = true;
                tokio::time::sleep(Duration::from_millis(rng.gen_range(0..300))).await;
            }
        }
        cluster.nodes[victim].kill();
        twilio.sends.set_delay(NORMAL_DELAY);
        let budget = if kill + 1 == KILLS {
            i64::MAX
        } else {
            per_kill * (kill + 2)
        };
        twilio.budget.store(budget, Ordering::SeqCst);
        assert!(
            twilio.sends.most_to_one_recipient() <= 1,
            "kill {kill} ({point:?}): a recipient was sent twice"
        );
        cluster.restart(victim).await;
        if paused {
            let view = cluster.campaign().await;
            assert_eq!(view["status"], "paused", "kill {kill}: {view}");
            assert_eq!(cluster.post("resume").await, StatusCode::OK);
        }
        // The restarted node (or the other one) takes the run up again.
        if resume_check {
            let at_restart = cluster.campaign().await;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
            loop {
                let now = cluster.campaign().await;
                if now["progress"]["sent"] != at_restart["progress"]["sent"]
                    || now["status"] == "completed"
                {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "kill {kill} ({point:?}): the run did not resume: {now}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let view = cluster.campaign().await;
        assert_ne!(
            view["status"], "completed",
            "kill {kill} ({point:?}) came after the end"
        );
        survived += 1;
        eprintln!(
            "kill {kill} ({point:?}) at {:?}: provider saw {}, progress {}",
            started.elapsed(),
            sent_so_far(&twilio),
            view["progress"]
        );
    }
    assert_eq!(survived, KILLS);

    // The run completes and every receipt is in. A loaded machine may take
    // minutes for the rest of the run: what must not happen is a stall.
    let mut last_change = (tokio::time::Instant::now(), Value::Null);
    let done = loop {
        let view = cluster.campaign().await;
        let p = &view["progress"];
        if view["status"] == "completed"
            && p["delivered"].as_i64().unwrap() + p["failed_delivery"].as_i64().unwrap()
                == p["sent"].as_i64().unwrap()
        {
            break view;
        }
        if *p != last_change.1 {
            last_change = (tokio::time::Instant::now(), p.clone());
        }
        assert!(
            last_change.0.elapsed() < Duration::from_secs(60),
            "no progress for 60 s after the last kill: {view}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let p = &done["progress"];
    let (sent, failed) = (p["sent"].as_i64().unwrap(), p["failed"].as_i64().unwrap());
    assert_eq!(twilio.sends.most_to_one_recipient(), 1, "no one sent twice");
    assert_eq!(sent + failed, recipients as i64);
    assert_eq!(p["delivered"].as_i64().unwrap(), sent, "one receipt each");

    // Counters equal rows.
    let executions = cluster.nodes[0].executions(&key, id).await;
    assert_eq!(executions.len(), recipients);
    let by_status = count_by_status(&executions);
    assert_eq!(by_status["completed"], sent);
    assert_eq!(by_status.get("failed").copied().unwrap_or(0), failed);
    // Only what a dead node had on the wire is written off, never resent:
    // the provider saw those, and no one else was left out.
    let written_off = executions
        .iter()
        .filter(|e| {
            e["execution_data"]["error_details"]
                .as_str()
                .is_some_and(|s| s.starts_with("outcome unknown"))
        })
        .count() as i64;
    assert_eq!(written_off, failed);
    assert!(
        written_off <= KILLS * OPTIONS.sends_in_hand(&database_url),
        "at most two slices a task lost per kill: {written_off}"
    );
    let seen = twilio.sends.counts();
    let written_off_but_sent = executions
        .iter()
        .filter(|e| {
            e["status"] == "failed" && seen.contains_key(e["contact_phone"].as_str().unwrap())
        })
        .count() as i64;
    assert_eq!(sent_so_far(&twilio), sent + written_off_but_sent);

    // Credits: charged once per message sent, the rest refunded.
    let credits: Value = reqwest::Client::new()
        .get(format!("{}/v1/credits", cluster.nodes[0].base))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(credits["balance"], topped_up - sent, "{credits}");
    let ledger_sum: i64 = credits["ledger"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["amount"].as_i64().unwrap())
        .sum();
    assert_eq!(ledger_sum, credits["balance"].as_i64().unwrap());

    // The event log: 1, 2, … with no gap.
    let store = herald::store::connect(
        &database_url,
        &herald::store::StoreOptions {
            migrate: false,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let last = store.last_seq(id).await.unwrap();
    let events = store.events_since(id, 0, last + 1).await.unwrap();
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=last).collect::<Vec<_>>(), "the log has a gap");
    assert_eq!(
        events.iter().filter(|e| e.kind == "run_started").count(),
        1,
        "one run, started once"
    );
}
