//! `bench fanout`: many seed-000 subscribers on one running campaign.

use std::time::Instant;

use serde_json::json;

use super::*;

#[derive(Debug, Clone, clap::Args)]
pub struct FanoutArgs {
    /// Subscribers to open (a process may hold 20,000 descriptors here).
    #[arg(long, default_value_t = 10_000)]
    pub subscribers: usize,
    /// Recipients in the campaign they watch.
    #[arg(long, default_value_t = 20_000)]
    pub recipients: u64,
    /// The server's progress coalescing window (`--coalesce-ms`). 0 sends a
    /// frame per committed event, so the figure is the fan-out's own
    /// latency; the product default, 250, holds progress back for up to
    /// that long on purpose (each event is then late by what it waited).
    #[arg(long, default_value_t = 0)]
    pub coalesce_ms: u64,
    /// Also find how many subscribers the FastAPI peer can hold at
    /// Herald's p99 (halving from Herald's count): the issue's "≥ 10× the
    /// connections" figure. Several peer runs; off in `--quick`.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub peer_search: bool,
    /// Also find how many subscribers Herald holds within the 50 ms p99
    /// target on this machine, when `--subscribers` do not: several
    /// Herald runs with fewer of them. Off in `--quick`.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub capacity_search: bool,
}

/// The fan-out's latency target: commit → receipt p99, in ms.
const P99_TARGET_MS: f64 = 50.0;

impl FanoutArgs {
    pub(super) fn for_all(all: &super::AllArgs) -> Self {
        Self {
            subscribers: if all.quick { 50 } else { 10_000 },
            recipients: if all.quick { 500 } else { 20_000 },
            coalesce_ms: 0,
            peer_search: !all.quick,
            capacity_search: !all.quick,
        }
    }
}

/// One Herald run watched by `subscribers` sockets.
struct HeraldFanout {
    open: usize,
    /// Events the run committed that change what seed 000 shows (each
    /// sent and timed), those that do not, and how long the run took.
    events: usize,
    unchanged: usize,
    elapsed: std::time::Duration,
    delivery: Delivery,
    /// Distinct frames the server sent (each subscriber got these, less
    /// any superseded while it was behind).
    distinct_frames: usize,
    finished: usize,
    server_cpu: Option<f64>,
    /// CPU the subscribers (this process) took meanwhile, on the same cores.
    subscribers_cpu: Option<f64>,
    rss_idle_server: u64,
    /// The server's least RSS while the run went on, every subscriber
    /// connected: what the connections hold, and the run's own memory
    /// counted against them (see [`RssSampler`]).
    rss_connected: u64,
    /// Its most while the subscribers connected, all at once.
    rss_connecting_peak: u64,
}

impl HeraldFanout {
    fn cpu_per_frame_us(&self) -> Option<f64> {
        self.per_frame_us(self.server_cpu)
    }

    fn subscribers_cpu_per_frame_us(&self) -> Option<f64> {
        self.per_frame_us(self.subscribers_cpu)
    }

    /// `cpu` seconds, in µs per frame the subscribers read.
    fn per_frame_us(&self, cpu: Option<f64>) -> Option<f64> {
        cpu.map(|cpu| cpu * 1e6 / self.delivery.frames.max(1) as f64)
    }

    /// The frames the run asked of the machine, as a share of what its
    /// cores carry: every event to every subscriber, each frame costing the
    /// server's and the subscribers' CPU a frame. Near or past 1 the sockets
    /// are busy from one event to the next and frames queue behind frames,
    /// whatever the fan-out does in what order.
    fn load(&self) -> Option<Load> {
        let cost_us = self.cpu_per_frame_us()? + self.subscribers_cpu_per_frame_us()?;
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let carried = cores as f64 * 1e6 / cost_us;
        let asked = self.events as f64 * self.open as f64 / self.elapsed.as_secs_f64();
        Some(Load {
            cores,
            cost_us,
            carried,
            asked,
        })
    }

    /// Server RSS each open subscriber added, in bytes.
    fn per_connection(&self) -> f64 {
        self.per_connection_at(self.rss_connected)
    }

    /// The same at the peak while they all connected at once.
    fn per_connection_connecting(&self) -> f64 {
        self.per_connection_at(self.rss_connecting_peak)
    }

    /// Server RSS above idle at `rss`, shared among the open subscribers.
    fn per_connection_at(&self, rss: u64) -> f64 {
        rss.saturating_sub(self.rss_idle_server) as f64 / self.open.max(1) as f64
    }
}

/// Frames a second: asked by a run, and carried by the machine's cores.
struct Load {
    cores: usize,
    /// Server and subscribers' CPU a frame, µs.
    cost_us: f64,
    carried: f64,
    asked: f64,
}

impl Load {
    /// The frames asked, as a percentage of those carried.
    fn percent(&self) -> f64 {
        self.asked / self.carried * 100.0
    }

    /// How long one event's frames to `subscribers` take with every core
    /// on them, in ms. Whatever the order of the sends, the last hundredth
    /// of the subscribers get the event near the end of it, so the p99
    /// cannot be much below this: it is what the machine, not the fan-out's
    /// design, allows.
    fn sweep_ms(&self, subscribers: usize) -> f64 {
        subscribers as f64 * self.cost_us / self.cores as f64 / 1000.0
    }
}

/// Starts a server with the `coalesce_ms` window, opens the subscribers on
/// a campaign of `recipients`, runs it, and times every frame and event.
async fn herald_fanout(
    subscribers: usize,
    recipients: u64,
    coalesce_ms: u64,
) -> anyhow::Result<HeraldFanout> {
    let mut server = ChildServer::start(&[
        ("HERALD_IN_FLIGHT", "64".into()),
        ("HERALD_COALESCE_MS", coalesce_ms.to_string()),
    ])
    .await?;
    let (base, key, port) = (server.base.clone(), server.key.clone(), server.port);
    let database_url = server.database_url.clone();
    let client = reqwest::Client::new();
    let campaign: serde_json::Value = client
        .post(format!("{base}/v1/campaigns"))
        .bearer_auth(&key)
        .json(&json!({"name": "fanout", "channel": "sms", "template": "Hi {{name}}, day {{day}}",
                      "provider": {"kind": "simulated", "latency_ms": 20, "receipt_delay_ms": 500}}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id = campaign["id"].clone();
    let mut csv = String::from("phone,name,day\n");
    csv.push_str(&csv_rows(0, recipients));
    client
        .post(format!("{base}/v1/campaigns/{id}/contacts:import"))
        .bearer_auth(&key)
        .header("content-type", "text/csv")
        .body(csv)
        .send()
        .await?
        .error_for_status()?;

    let server_pid = server.pid();
    let rss_idle_server = rss_of(server_pid).unwrap_or(0);
    println!("opening {subscribers} subscribers …");
    let url = format!("ws://127.0.0.1:{port}/ws/campaigns/{id}/progress?token={key}");
    let connecting = RssSampler::start(server_pid);
    let mut subscribed = super::subscribers::open(&url, subscribers).await?;
    let open = subscribed.open;
    let (_, rss_connecting_peak) = connecting.stop().await.unwrap_or_default();
    println!("{open} connected; running the campaign ({coalesce_ms} ms coalescing) …");
    let running = RssSampler::start(server_pid);
    let cpu = CpuClock::start(server_pid);
    let subscribers_cpu = CpuClock::start(std::process::id());
    let started = Instant::now();
    let started_ms = chrono::Utc::now().timestamp_millis();
    client
        .post(format!("{base}/v1/campaigns/{id}/start"))
        .bearer_auth(&key)
        .send()
        .await?
        .error_for_status()?;
    let finished = subscribed
        .wait_for_final(std::time::Duration::from_secs(600))
        .await;
    let elapsed = started.elapsed();
    let (server_cpu, subscribers_cpu) = (cpu.used(), subscribers_cpu.used());
    let (rss_connected, _) = running.stop().await.unwrap_or_default();
    let received = subscribed.stop();
    server.stop().await;
    // Every event of the run, as committed: what each subscriber should
    // have been told, and when it happened. An event that shows seed 000
    // nothing the one before it did not (a delivery receipt's: seed 000
    // has no delivery counts) is not sent, and there is nothing to time:
    // the subscribers had what it shows before it was committed.
    let store =
        crate::store::connect(&database_url, &crate::store::StoreOptions::default()).await?;
    let campaign_id = id.as_i64().unwrap_or_default();
    // Events after the run's end (late delivery receipts) are not part
    // of it: subscribers stop reading at the final status.
    let (mut events, mut after, mut ended) = (Vec::new(), 0, false);
    let (mut shown, mut unchanged) = (crate::streams::protocol::Seed000Shown::default(), 0);
    while !ended {
        let page = store.events_since(campaign_id, after, 1000).await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for event in &page {
            let changed = shown.changed_by(event);
            if event.created_at < started_ms {
                continue;
            }
            if changed {
                events.push((event.seq, event.created_at as f64));
            } else {
                unchanged += 1;
            }
            ended = event.kind == "run_completed";
            if ended {
                break;
            }
        }
    }
    drop(store);
    let distinct_frames = received
        .iter()
        .flatten()
        .map(|frame| frame.seq)
        .collect::<std::collections::HashSet<_>>()
        .len();
    let delivery = delivery(&events, &received);
    Ok(HeraldFanout {
        open,
        events: events.len(),
        unchanged,
        elapsed,
        delivery,
        distinct_frames,
        finished,
        server_cpu,
        subscribers_cpu,
        rss_idle_server,
        rss_connected,
        rss_connecting_peak,
    })
}

pub(super) async fn run(args: &FanoutArgs) -> anyhow::Result<Report> {
    let subscribers = args.subscribers;
    let run = herald_fanout(subscribers, args.recipients, args.coalesce_ms).await?;
    let open = run.open;
    let frames = run.delivery.frames;
    // The target is on events: each one timed from its commit until the
    // subscriber had it (its own frame or a newer one that superseded it)
    // in its socket; when the subscriber's thread got a core to read it is
    // shown beside (see `arrival`).
    let (p50, p99, max) = run.delivery.event_percentiles();
    let (read_p50, read_p99, read_max) = run.delivery.event_read_percentiles();
    let (frame_p50, frame_p99, _) = run.delivery.frame_percentiles();
    println!("subscribers:          {open} of {subscribers}");
    println!(
        "events of the run:    {} over {:.1} s, and {} that changed nothing seed 000 shows \
         (not sent, not timed); {} distinct frames sent, {frames} received \
         ({:.1} per subscriber; the rest superseded while a subscriber was behind)",
        run.events,
        run.elapsed.as_secs_f64(),
        run.unchanged,
        run.distinct_frames,
        frames as f64 / open.max(1) as f64,
    );
    if run.delivery.missed > 0 {
        println!(
            "never received:       {} (subscriber, event) pairs",
            run.delivery.missed
        );
    }
    // The fan-out's own cost, whatever the latency: with the run's events
    // at the engine's pace, the sockets are busy from first to last event.
    let cpu_per_frame_us = run.cpu_per_frame_us();
    if let (Some(cpu), Some(per_frame)) = (run.server_cpu, cpu_per_frame_us) {
        println!(
            "server CPU:           {cpu:.1} s during the run ({:.2} cores): {per_frame:.1} µs per frame delivered (engine included)",
            cpu / run.elapsed.as_secs_f64()
        );
    }
    if let (Some(cpu), Some(per_frame)) = (run.subscribers_cpu, run.subscribers_cpu_per_frame_us())
    {
        println!(
            "subscribers' CPU:     {cpu:.1} s on the same cores ({:.2} cores): {per_frame:.1} µs per frame read",
            cpu / run.elapsed.as_secs_f64()
        );
    }
    let load = run.load();
    if let Some(load) = &load {
        println!(
            "load:                 {:.1} events a second to {open} subscribers asks {:.0} frames/s; \
             {} cores at {:.1} µs a frame carry {:.0}: {:.0}%",
            run.events as f64 / run.elapsed.as_secs_f64(),
            load.asked,
            load.cores,
            load.cost_us,
            load.carried,
            load.percent()
        );
    }
    println!("saw the final status: {}", run.finished);
    println!("events, commit → receipt: p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms");
    println!("events, commit → read:    p50 {read_p50:.1} ms, p99 {read_p99:.1} ms, max {read_max:.1} ms (when the subscribers' threads read them)");
    println!("frames, commit → receipt: p50 {frame_p50:.1} ms, p99 {frame_p99:.1} ms (each frame from the commit it carries)");
    println!(
        "server RSS:           {:.1} MiB idle, {:.1} MiB with subscribers (the least during the run): \
         {:.1} KiB per connection; {:.1} MiB at the peak while they connected ({:.1} KiB each)",
        run.rss_idle_server as f64 / 1048576.0,
        run.rss_connected as f64 / 1048576.0,
        run.per_connection() / 1024.0,
        run.rss_connecting_peak as f64 / 1048576.0,
        run.per_connection_connecting() / 1024.0
    );
    let window = match args.coalesce_ms {
        0 => "no coalescing".to_owned(),
        ms => format!("{ms} ms coalescing"),
    };
    let mut report = Report::new("fanout");
    report.row(
        format!("{open} subscribers, {window}: commit → receipt p50"),
        p50,
        "ms",
        None,
    );
    report.row(
        format!("{open} subscribers, {window}: commit → receipt p99"),
        p99,
        "ms",
        Some(Target::AtMost(P99_TARGET_MS)),
    );
    report.row(
        "the same, to the subscribers' threads' read: p99",
        read_p99,
        "ms",
        None,
    );
    report.row(
        "each frame, from the commit it carries: p99",
        frame_p99,
        "ms",
        None,
    );
    if let Some(per_frame) = cpu_per_frame_us {
        report.row(
            "server CPU per frame delivered (engine included)",
            per_frame,
            "µs",
            None,
        );
    }
    if let Some(per_frame) = run.subscribers_cpu_per_frame_us() {
        report.row(
            "subscribers' CPU per frame read (same cores)",
            per_frame,
            "µs",
            None,
        );
    }
    if let Some(load) = &load {
        report.row(
            "frames asked ÷ frames the cores carry (server + subscribers)",
            load.percent(),
            "%",
            None,
        );
        report.row(
            format!(
                "one event to all {open} at that CPU a frame on {} cores (about the least p99 can be)",
                load.cores
            ),
            load.sweep_ms(open),
            "ms",
            None,
        );
    }
    let held_at_target = if args.capacity_search {
        let at_open = Tried::measured(subscribers, p99, run.finished, P99_TARGET_MS);
        let held = herald_capacity(at_open, args.recipients, args.coalesce_ms).await?;
        report.row(
            format!("subscribers Herald holds at p99 ≤ {P99_TARGET_MS} ms (all seeing the final status)"),
            held as f64,
            "",
            None,
        );
        Some(held)
    } else {
        None
    };
    report.row(
        "server RSS per connection (the least during the run, its memory included)",
        run.per_connection() / 1024.0,
        "KiB",
        Some(Target::AtMost(20_000.0 / 1024.0)),
    );
    report.row(
        format!("server RSS per connection at the peak while all {open} connected at once"),
        run.per_connection_connecting() / 1024.0,
        "KiB",
        None,
    );
    report.row(
        "subscribers that saw the final status",
        run.finished as f64,
        "",
        Some(Target::AtLeast(subscribers as f64)),
    );
    report.row(
        "(subscriber, event) pairs never received",
        run.delivery.missed as f64,
        "",
        Some(Target::AtMost(0.0)),
    );
    let mut raw = json!({"subscribers": open, "events": run.events, "unchanged_events": run.unchanged, "frames": frames,
           "distinct_frames": run.distinct_frames, "missed": run.delivery.missed,
           "p50_ms": p50, "p99_ms": p99, "max_ms": max, "read_p50_ms": read_p50, "read_p99_ms": read_p99,
           "frame_p50_ms": frame_p50, "frame_p99_ms": frame_p99, "final_seen": run.finished,
           "coalesce_ms": args.coalesce_ms, "server_cpu_per_frame_us": cpu_per_frame_us,
           "subscribers_cpu_per_frame_us": run.subscribers_cpu_per_frame_us(),
           "sweep_ms": load.as_ref().map(|l| l.sweep_ms(open)),
           "held_at_target_p99": held_at_target,
           "rss_per_connection_bytes": run.per_connection(),
           "rss_per_connection_connecting_peak_bytes": run.per_connection_connecting(),
           "load": load.as_ref().map(|l| json!({"cores": l.cores, "cpu_per_frame_us": l.cost_us,
                                                "frames_per_second_asked": l.asked,
                                                "frames_per_second_carried": l.carried}))});
    // The same subscribers and as many frames, at the same pace, through
    // the FastAPI peer.
    let frames_each = run.distinct_frames.max(1);
    let elapsed = run.elapsed;
    match super::peers::fastapi_missing() {
        Some(why) => {
            println!("FastAPI peer: not measured ({why})");
            raw["peer"] = json!({"measured": false, "why": why});
        }
        None => {
            let peer = peer_fanout(open, frames_each, elapsed).await?;
            report.row("FastAPI peer: commit → receipt p99", peer.p99, "ms", None);
            report.row(
                "FastAPI peer: RSS per connection",
                peer.per_connection / 1024.0,
                "KiB",
                None,
            );
            report.row(
                "FastAPI peer: subscribers that saw the final frame",
                peer.finished as f64,
                "",
                None,
            );
            report.row("p99: FastAPI peer ÷ Herald", peer.p99 / p99, "×", None);
            report.row(
                "RSS per connection: FastAPI peer ÷ Herald",
                peer.per_connection / run.per_connection().max(1.0),
                "×",
                None,
            );
            raw["peer"] = json!({"measured": true, "name": "fastapi+uvicorn", "p50_ms": peer.p50,
                                 "p99_ms": peer.p99, "rss_per_connection_bytes": peer.per_connection,
                                 "final_seen": peer.finished});
            if args.peer_search {
                let held = peer_capacity(open, frames_each, elapsed, p99, &peer).await?;
                report.row(
                    format!("FastAPI peer: subscribers held at Herald's p99 ({p99:.1} ms)"),
                    held as f64,
                    "",
                    None,
                );
                report.row(
                    "connections at the same p99: Herald ÷ FastAPI peer",
                    open as f64 / held.max(1) as f64,
                    "×",
                    Some(Target::AtLeast(10.0)),
                );
                raw["peer"]["held_at_herald_p99"] = json!(held);
            }
        }
    }
    report.raw(raw);
    Ok(report)
}

/// A count of subscribers tried, its p99, and whether it held: a p99 no
/// worse than the bound, and every subscriber saw the final status.
#[derive(Debug, Clone, Copy)]
struct Tried {
    n: usize,
    p99: f64,
    held: bool,
}

impl Tried {
    /// A run of `n` subscribers with a p99 of `p99`, of which `finished`
    /// saw the final status, against the p99 `bound`.
    fn measured(n: usize, p99: f64, finished: usize, bound: f64) -> Self {
        Self {
            n,
            p99,
            held: p99 <= bound && finished >= n,
        }
    }
}

/// The most subscribers that hold, searched downwards from `at_open` (a
/// count already measured). `smaller` picks the next count to try below one
/// that did not hold, until one does (none under 10: then 0); then
/// `bisections` steps narrow the gap between that count and the smallest
/// that did not hold. Each `probe` is a whole run, so the search is short.
async fn most_held<Probe, Run>(
    at_open: Tried,
    smaller: impl Fn(Tried) -> usize,
    bisections: usize,
    mut probe: Probe,
) -> anyhow::Result<usize>
where
    Probe: FnMut(usize) -> Run,
    Run: std::future::Future<Output = anyhow::Result<Tried>>,
{
    if at_open.held {
        return Ok(at_open.n);
    }
    let (mut held, mut failed, mut last) = (0, at_open.n, at_open);
    while held == 0 {
        let n = smaller(last).min(failed.saturating_sub(1));
        if n < 10 {
            return Ok(0);
        }
        last = probe(n).await?;
        if last.held {
            held = n;
        } else {
            failed = n;
        }
    }
    for _ in 0..bisections {
        let middle = (held + failed) / 2;
        if middle == held {
            break;
        }
        if probe(middle).await?.held {
            held = middle;
        } else {
            failed = middle;
        }
    }
    Ok(held)
}

/// The most subscribers the FastAPI peer serves with a p99 no worse than
/// Herald's `herald_p99` with `open` of them, all of them seeing the final
/// frame; 0 when even 10 are too many. Halving from `open` finds a count
/// it holds, then two bisection steps narrow the gap to twice that (halving
/// alone would credit Herald with up to twice its real ratio). `at_open`
/// is the peer's run at `open`, already measured.
async fn peer_capacity(
    open: usize,
    frames: usize,
    spread: std::time::Duration,
    herald_p99: f64,
    at_open: &PeerFanout,
) -> anyhow::Result<usize> {
    let at_open = Tried::measured(open, at_open.p99, at_open.finished, herald_p99);
    most_held(
        at_open,
        |failed| failed.n / 2,
        2,
        |n| async move {
            let run = peer_fanout(n, frames, spread).await?;
            println!(
                "FastAPI peer with {n} subscribers: p99 {:.1} ms, {} saw the final frame",
                run.p99, run.finished
            );
            Ok(Tried::measured(n, run.p99, run.finished, herald_p99))
        },
    )
    .await
}

/// The most subscribers Herald serves within [`P99_TARGET_MS`], each Herald
/// run like the measured one with fewer subscribers. A sweep's time grows
/// with the subscribers, so the first count tried is the one that failed
/// scaled down to the target, less a tenth; three bisection steps then
/// narrow the gap to an eighth of it.
async fn herald_capacity(
    at_open: Tried,
    recipients: u64,
    coalesce_ms: u64,
) -> anyhow::Result<usize> {
    let scaled_to_target = |failed: Tried| {
        if failed.p99 > P99_TARGET_MS {
            (failed.n as f64 * 0.9 * P99_TARGET_MS / failed.p99) as usize
        } else {
            // Within the target, but some never saw the final status.
            failed.n / 2
        }
    };
    most_held(at_open, scaled_to_target, 3, |n| async move {
        let run = herald_fanout(n, recipients, coalesce_ms).await?;
        let (_, p99, _) = run.delivery.event_percentiles();
        println!(
            "Herald with {n} subscribers: p99 {p99:.1} ms, {} saw the final status",
            run.finished
        );
        Ok(Tried::measured(n, p99, run.finished, P99_TARGET_MS))
    })
    .await
}

struct PeerFanout {
    p50: f64,
    p99: f64,
    per_connection: f64,
    finished: usize,
}

/// `subscribers` sockets on the FastAPI peer; `frames` progress frames
/// published evenly over `spread`, the last one final.
async fn peer_fanout(
    subscribers: usize,
    frames: usize,
    spread: std::time::Duration,
) -> anyhow::Result<PeerFanout> {
    let peer = super::peers::start_fastapi(None).await?;
    let rss_idle = rss_of(peer.pid).unwrap_or(0);
    let url = format!("{}/ws", peer.base.replacen("http", "ws", 1));
    println!("FastAPI peer: opening {subscribers} subscribers …");
    let mut subscribed = super::subscribers::open(&url, subscribers).await?;
    let open = subscribed.open;
    // Measured as Herald's is: the least while the frames go out.
    let publishing = RssSampler::start(peer.pid);
    println!(
        "FastAPI peer: {open} connected; publishing {frames} frames over {:.1} s …",
        spread.as_secs_f64()
    );
    let publisher = {
        let base = peer.base.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let gap = spread / frames as u32;
            let mut published = Vec::with_capacity(frames);
            for i in 1..=frames {
                let done = i == frames;
                let ts = chrono::Utc::now().timestamp_micros() as f64 / 1000.0;
                published.push((i as i64, ts));
                let frame = json!({"type": "progress_update", "seq": i, "ts": ts,
                    "data": {"campaign_id": 1, "status": if done { "completed" } else { "running" },
                             "progress": {"total_contacts": 20000, "completed": i * 100, "failed": 3,
                                          "processing": 0, "pending": 20000 - i * 100,
                                          "progress_percentage": 50.0, "success_rate": 99.0},
                             "recent_activity": [], "started_at": "2026-11-23T00:00:00Z",
                             "completed_at": null}});
                let _ = client
                    .post(format!("{base}/publish"))
                    .body(frame.to_string())
                    .send()
                    .await;
                tokio::time::sleep(gap).await;
            }
            published
        })
    };
    let finished = subscribed
        .wait_for_final(spread + std::time::Duration::from_secs(120))
        .await;
    let published = publisher.await.unwrap_or_default();
    let (rss_connected, _) = publishing.stop().await.unwrap_or_default();
    // A subscriber still waiting at the deadline never got the rest.
    let received = subscribed.stop();
    peer.stop().await;
    let (p50, p99, _) = delivery(&published, &received).frame_percentiles();
    Ok(PeerFanout {
        p50,
        p99,
        per_connection: rss_connected.saturating_sub(rss_idle) as f64 / open.max(1) as f64,
        finished,
    })
}

/// A `progress_update` frame as a subscriber read it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Frame {
    /// The log position of the event it carries.
    pub seq: i64,
    /// When that event was committed, when the frame reached the
    /// subscriber's socket, and when the subscriber's thread read it (Unix
    /// ms; see [`super::arrival`]).
    pub committed: f64,
    pub arrived: f64,
    pub read: f64,
}

/// Commit → receipt at every subscriber, of every frame and every event.
struct Delivery {
    /// Each frame read, from the commit of the event it carries to its
    /// arrival; in ms, sorted.
    frame_latencies: Vec<f64>,
    /// Each event of the run, from its commit to the first frame that
    /// told the subscriber of it; in ms, sorted.
    event_latencies: Vec<f64>,
    /// The same, to when the subscriber's thread read that frame.
    event_read_latencies: Vec<f64>,
    /// Frames the subscribers read in all.
    frames: usize,
    /// (subscriber, event) pairs with no frame at or after the event.
    missed: usize,
}

impl Delivery {
    /// p50, p99 and max of [`Delivery::frame_latencies`].
    fn frame_percentiles(&self) -> (f64, f64, f64) {
        spread(&self.frame_latencies)
    }

    /// p50, p99 and max of [`Delivery::event_latencies`].
    fn event_percentiles(&self) -> (f64, f64, f64) {
        spread(&self.event_latencies)
    }

    /// p50, p99 and max of [`Delivery::event_read_latencies`].
    fn event_read_percentiles(&self) -> (f64, f64, f64) {
        spread(&self.event_read_latencies)
    }
}

fn spread(sorted: &[f64]) -> (f64, f64, f64) {
    (
        percentile(sorted, 50.0),
        percentile(sorted, 99.0),
        sorted.last().copied().unwrap_or(f64::NAN),
    )
}

/// Times every frame from the commit it carries, and every event
/// (`(seq, committed at)`) to the first frame at or after it: with a
/// coalescing window, or a progress frame superseded while a subscriber
/// was behind, a newer frame carries an event's counters. So the frames
/// measure the fan-out, and the events add what the window holds back.
fn delivery(events: &[(i64, f64)], received: &[Vec<Frame>]) -> Delivery {
    let mut event_latencies = Vec::with_capacity(events.len() * received.len());
    let mut event_read_latencies = Vec::with_capacity(events.len() * received.len());
    let mut frame_latencies = Vec::new();
    let (mut frames, mut missed) = (0, 0);
    for read in received {
        frames += read.len();
        frame_latencies.extend(read.iter().map(|f| f.arrived - f.committed));
        let mut next = read.iter().peekable();
        for &(seq, committed) in events {
            while next.next_if(|frame| frame.seq < seq).is_some() {}
            match next.peek() {
                Some(frame) => {
                    event_latencies.push(frame.arrived - committed);
                    event_read_latencies.push(frame.read - committed);
                }
                None => missed += 1,
            }
        }
    }
    for latencies in [
        &mut frame_latencies,
        &mut event_latencies,
        &mut event_read_latencies,
    ] {
        latencies.sort_by(f64::total_cmp);
    }
    Delivery {
        frame_latencies,
        event_latencies,
        event_read_latencies,
        frames,
        missed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A machine on which p99 grows linearly with the subscribers, as a
    /// sweep's time does: `ms_per_thousand` for each thousand.
    fn linear(ms_per_thousand: f64, bound: f64) -> impl FnMut(usize) -> Tried {
        move |n| Tried::measured(n, n as f64 * ms_per_thousand / 1000.0, n, bound)
    }

    #[tokio::test]
    async fn the_search_finds_the_most_held_within_its_last_step_and_never_more() {
        // 8.1 ms a thousand: 10,000 take 81 ms, and 6,172 is the most
        // within 50 ms.
        let mut machine = linear(8.1, 50.0);
        let mut tried = Vec::new();
        let held = most_held(
            machine(10_000),
            |failed| (failed.n as f64 * 0.9 * 50.0 / failed.p99) as usize,
            3,
            |n| {
                tried.push(n);
                std::future::ready(Ok(machine(n)))
            },
        )
        .await
        .unwrap();
        assert!(
            held <= 6_172,
            "credited {held}, more than the machine holds"
        );
        // The first guess (5,555) holds; three halvings of 5,555..10,000
        // leave a gap under 556.
        assert!(held > 6_172 - 556, "found only {held} of 6,172");
        assert_eq!(tried.len(), 4, "tried {tried:?}");
        assert!(machine(held).held);
    }

    #[tokio::test]
    async fn halving_goes_on_until_a_count_holds_and_stops_below_ten() {
        // The peer's search: 10,000 → 5,000 → 2,500 → 1,250 holds (at
        // 40 ms a thousand the bound of 60 ms holds 1,500).
        let mut machine = linear(40.0, 60.0);
        let held = most_held(
            machine(10_000),
            |f| f.n / 2,
            2,
            |n| std::future::ready(Ok(machine(n))),
        )
        .await
        .unwrap();
        assert!((1_250..=1_500).contains(&held), "found {held}");
        // Nothing holds: the search gives up under ten.
        let nothing = |n| Tried::measured(n, 1e9, n, 60.0);
        let held = most_held(
            nothing(10_000),
            |f| f.n / 2,
            2,
            |n| std::future::ready(Ok(nothing(n))),
        )
        .await
        .unwrap();
        assert_eq!(held, 0);
    }

    #[tokio::test]
    async fn a_count_that_holds_at_once_is_taken_without_a_probe() {
        let held = most_held(
            Tried {
                n: 50,
                p99: 3.0,
                held: true,
            },
            |f| f.n / 2,
            2,
            |_| async { anyhow::bail!("no probe was needed") },
        )
        .await
        .unwrap();
        assert_eq!(held, 50);
    }

    #[test]
    fn the_sweep_is_every_subscriber_at_the_cost_of_a_frame_shared_by_the_cores() {
        let load = Load {
            cores: 2,
            cost_us: 14.7,
            carried: 0.0,
            asked: 0.0,
        };
        assert!((load.sweep_ms(10_000) - 73.5).abs() < 1e-9);
    }
}
