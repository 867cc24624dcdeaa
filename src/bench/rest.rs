//! `bench rest`: the seed REST reads on a finished campaign under load.
//! The campaign is made the way a user makes one (import, run on the
//! simulated provider), then concurrent clients read it over loopback.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;

use super::*;

#[derive(Debug, Clone, clap::Args)]
pub struct RestArgs {
    /// Executions in the campaign whose seed 002 status and analytics the
    /// clients read (made by running it).
    #[arg(long, default_value_t = 1_000_000)]
    pub executions: u64,
    /// Executions in the campaign whose seed 001 pages the clients read, a
    /// campaign of its own (made by running it; 10M takes minutes).
    #[arg(long, default_value_t = 10_000_000)]
    pub page_executions: u64,
    /// How deep the middle page is read, in executions from the newest: by
    /// offset and by the keyset cursor the page before it gives.
    #[arg(long, default_value_t = 1_000_000)]
    pub page_depth: u64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Seconds of load per measured read.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
}

impl RestArgs {
    pub(super) fn for_all(all: &super::AllArgs) -> Self {
        Self {
            executions: if all.quick { 1_000 } else { 1_000_000 },
            page_executions: if all.quick { 3_000 } else { 10_000_000 },
            page_depth: if all.quick { 1_000 } else { 1_000_000 },
            clients: if all.quick { 4 } else { 64 },
            seconds: if all.quick { 1 } else { 10 },
        }
    }
}

/// Requests per second and latency percentiles of one load phase.
struct Load {
    rate: f64,
    /// From a request's write to its answer's arrival at the client's
    /// socket (see [`super::arrival`]).
    p50_ms: f64,
    p99_ms: f64,
    /// From a request's write to the client thread's read of the answer's
    /// last bytes: the above, plus the wait for a core the client shares
    /// with the server.
    p99_read_ms: f64,
    errors: usize,
    /// CPU the server used per answered request, when it is a process of
    /// its own.
    server_cpu_us: Option<f64>,
}

/// A keep-alive HTTP/1.1 connection that sends a GET and reads the whole
/// response before the next, as `wrk` does: the least work a client can do
/// per request. The clients share the two cores with the server, so a
/// heavier client (a general HTTP client's pool, headers and body types)
/// would be measured as much as the server.
struct Connection {
    stream: tokio::net::TcpStream,
    buffer: Vec<u8>,
    chunk: Box<[u8]>,
}

/// An answer's status, and when it came whole.
struct Answered {
    status: u16,
    times: super::arrival::Times,
}

impl Connection {
    async fn open(addr: std::net::SocketAddr) -> std::io::Result<Self> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        super::arrival::stamp_arrivals(&stream)?;
        Ok(Self {
            stream,
            buffer: Vec::with_capacity(64 * 1024),
            chunk: vec![0; 64 * 1024].into_boxed_slice(),
        })
    }

    /// Sends `request` (a whole request: line, headers, blank line) and
    /// reads the response to the end of its body.
    async fn request(&mut self, request: &[u8]) -> std::io::Result<Answered> {
        use std::io::{Error, ErrorKind};
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(request).await?;
        self.buffer.clear();
        let mut arrived = None;
        let head_end = loop {
            arrived = self.read_some().await?.or(arrived);
            if let Some(at) = self.buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
        };
        let head = std::str::from_utf8(&self.buffer[..head_end])
            .map_err(|e| Error::new(ErrorKind::InvalidData, e))?;
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse::<u16>().ok())
            .ok_or_else(|| Error::new(ErrorKind::InvalidData, "no status line"))?;
        // Herald and uvicorn both size their JSON answers; a response
        // without a length is not one this client can delimit.
        let length = head
            .lines()
            .filter_map(|line| line.split_once(':'))
            .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, value)| value.trim().parse::<usize>().ok())
            .ok_or_else(|| Error::new(ErrorKind::InvalidData, "no content-length"))?;
        while self.buffer.len() < head_end + length {
            arrived = self.read_some().await?.or(arrived);
        }
        Ok(Answered {
            status,
            times: super::arrival::Times::read_now(arrived),
        })
    }

    /// Appends what the socket has to the buffer (waiting for something);
    /// when it reached the socket.
    async fn read_some(&mut self) -> std::io::Result<Option<f64>> {
        loop {
            self.stream.readable().await?;
            let (stream, chunk) = (&self.stream, &mut self.chunk);
            match stream.try_io(tokio::io::Interest::READABLE, || {
                super::arrival::read_stamped(stream, chunk)
            }) {
                Ok((0, _)) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok((n, stamp)) => {
                    self.buffer.extend_from_slice(&self.chunk[..n]);
                    return Ok(stamp);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// A load phase: `clients` connections requesting `paths` (round-robin)
/// for `seconds`; `server_pid` is the server's process, to measure its CPU.
struct LoadPlan {
    base: String,
    key: String,
    paths: Vec<String>,
    clients: usize,
    seconds: u64,
    server_pid: Option<u32>,
}

/// Runs `plan`. The clients run on one thread of their own, a batch thread
/// (see [`yield_to_the_server_on_wake_up`]): an answer arriving does not
/// preempt the server mid-request, as it would not from another machine.
/// An answer is timed to when it reached the client's socket; when the
/// client thread got a core to read it is kept beside (see
/// [`super::arrival`]).
async fn load(plan: LoadPlan) -> anyhow::Result<Load> {
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("bench-clients".into())
        .spawn(move || {
            yield_to_the_server_on_wake_up();
            let measured = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|runtime| runtime.block_on(load_here(&plan)));
            let _ = done.send(measured);
        })?;
    result.await?
}

/// [`load`], on the calling thread's runtime.
async fn load_here(plan: &LoadPlan) -> anyhow::Result<Load> {
    let LoadPlan {
        base,
        key,
        paths,
        clients,
        seconds,
        server_pid,
    } = plan;
    let (clients, seconds, server_pid) = (*clients, *seconds, *server_pid);
    let host = base.trim_start_matches("http://").to_owned();
    let addr: std::net::SocketAddr = host.parse()?;
    let requests: Vec<Vec<u8>> = paths
        .iter()
        .map(|path| {
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n\r\n")
                .into_bytes()
        })
        .collect();
    let cpu = server_pid.map(CpuClock::start);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let results: Vec<(Vec<f64>, Vec<f64>, usize)> = futures::stream::iter(0..clients)
        .map(|n| {
            let requests = &requests;
            async move {
                let (mut latencies, mut read_latencies, mut errors) =
                    (Vec::new(), Vec::new(), 0usize);
                let mut connection = None;
                let mut i = n;
                while Instant::now() < deadline {
                    let open = match connection.as_mut() {
                        Some(open) => open,
                        None => match Connection::open(addr).await {
                            Ok(open) => connection.insert(open),
                            Err(_) => {
                                errors += 1;
                                tokio::time::sleep(Duration::from_millis(10)).await;
                                continue;
                            }
                        },
                    };
                    let request = &requests[i % requests.len()];
                    i += 1;
                    let sent = super::arrival::now_ms();
                    match open.request(request).await {
                        Ok(answer) if answer.status == 200 => {
                            latencies.push(answer.times.arrived - sent);
                            read_latencies.push(answer.times.read - sent);
                        }
                        Ok(_) => errors += 1,
                        Err(_) => {
                            errors += 1;
                            connection = None;
                        }
                    }
                }
                (latencies, read_latencies, errors)
            }
        })
        .buffer_unordered(clients)
        .collect()
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    let server_cpu = cpu.and_then(|cpu| cpu.used());
    let errors = results.iter().map(|(_, _, e)| e).sum();
    let (mut latencies, mut read_latencies) = (Vec::new(), Vec::new());
    for (arrived, read, _) in results {
        latencies.extend(arrived);
        read_latencies.extend(read);
    }
    latencies.sort_by(f64::total_cmp);
    read_latencies.sort_by(f64::total_cmp);
    Ok(Load {
        rate: latencies.len() as f64 / elapsed,
        p50_ms: percentile(&latencies, 50.0),
        p99_ms: percentile(&latencies, 99.0),
        p99_read_ms: percentile(&read_latencies, 99.0),
        errors,
        server_cpu_us: server_cpu
            .filter(|_| !latencies.is_empty())
            .map(|cpu| cpu * 1e6 / latencies.len() as f64),
    })
}

/// A campaign made the way a user makes one, and run to its end.
struct Made {
    id: i64,
    uuid: String,
}

/// Creates a campaign of `n` imported contacts and runs it on the simulated
/// provider to its end, saying how far it got every ten seconds.
async fn make_campaign(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    name: &str,
    n: u64,
) -> anyhow::Result<Made> {
    let campaign: Value = client
        .post(format!("{base}/v1/campaigns"))
        .bearer_auth(key)
        .json(
            &json!({"name": name, "channel": "sms", "template": "Hi {{name}}, day {{day}}",
                      "provider": {"kind": "simulated", "receipt_delay_ms": 0}}),
        )
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id = campaign["id"]
        .as_i64()
        .ok_or_else(|| anyhow::anyhow!("no campaign id: {campaign}"))?;
    let uuid = campaign["uuid"].as_str().unwrap_or_default().to_owned();
    println!("making campaign {name:?} with {n} executions (import, then run) …");
    client
        .post(format!("{base}/v1/campaigns/{id}/contacts:import"))
        .bearer_auth(key)
        .header("content-type", "text/csv")
        .body(csv_body(n))
        .send()
        .await?
        .error_for_status()?;
    client
        .post(format!("{base}/v1/campaigns/{id}/start"))
        .bearer_auth(key)
        .send()
        .await?
        .error_for_status()?;
    let mut said = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let c: Value = client
            .get(format!("{base}/v1/campaigns/{id}"))
            .bearer_auth(key)
            .send()
            .await?
            .json()
            .await?;
        if c["status"] == "completed" || c["status"] == "failed" {
            return Ok(Made { id, uuid });
        }
        if said.elapsed() >= Duration::from_secs(10) {
            said = Instant::now();
            let progress = &c["progress"];
            println!(
                "  {name}: {} of {} sent",
                progress["sent"].as_i64().unwrap_or(0),
                progress["total"].as_i64().unwrap_or(0)
            );
        }
    }
}

/// The `next_cursor` of a seed-001 page: the cursor of the page after it.
async fn next_cursor(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    campaign: i64,
    page: u64,
    per_page: u64,
) -> anyhow::Result<String> {
    let body: Value = client
        .get(format!(
            "{base}/api/v1/campaigns/{campaign}/executions?page={page}&per_page={per_page}"
        ))
        .bearer_auth(key)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    body["next_cursor"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("page {page} has no next_cursor"))
}

/// The id of a seed-001 page's first execution.
async fn first_id(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    path: &str,
) -> anyhow::Result<i64> {
    let body: Value = client
        .get(format!("{base}{path}"))
        .bearer_auth(key)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    body["executions"][0]["id"]
        .as_i64()
        .ok_or_else(|| anyhow::anyhow!("{path}: no first execution"))
}

pub(super) async fn run(args: &RestArgs) -> anyhow::Result<Report> {
    // The server is a process of its own, so its CPU per request is its own.
    let mut bench = ChildServer::start(&[
        ("HERALD_IN_FLIGHT", "1000".into()),
        ("HERALD_SLICE", "1000".into()),
    ])
    .await?;
    let (base, key) = (bench.base.clone(), bench.key.clone());
    let client = reqwest::Client::new();
    let n = args.executions;
    let status_campaign = make_campaign(&client, &base, &key, "bench status", n).await?;
    let pages_n = args.page_executions.max(1);
    let pages = make_campaign(&client, &base, &key, "bench pages", pages_n).await?;
    let (clients, seconds) = (args.clients, args.seconds);
    let mut report = Report::new("rest");
    let mut raw = serde_json::Map::new();
    let per_page = 100;
    let uuid = &status_campaign.uuid;
    let status_and_analytics = vec![
        format!("/v1/campaign/{uuid}/status"),
        format!("/v1/campaign/{uuid}/analytics"),
    ];
    // Newest first: the page at depth d starts after the d newest.
    let last_page = pages_n.div_ceil(per_page);
    let deep_page = (args.page_depth / per_page + 1).min(last_page);
    let page_path = |query: String| {
        format!(
            "/api/v1/campaigns/{}/executions?{query}&per_page={per_page}",
            pages.id
        )
    };
    let by_cursor = |page: u64| {
        let client = &client;
        let (base, key) = (&base, &key);
        async move {
            if page <= 1 {
                anyhow::bail!("a cursor starts at page 2, not {page}");
            }
            next_cursor(client, base, key, pages.id, page - 1, per_page).await
        }
    };
    let deep_cursor = by_cursor(deep_page).await?;
    let last_cursor = by_cursor(last_page).await?;
    // Each page is read both ways: they must be the same page.
    for (page, cursor) in [(deep_page, &deep_cursor), (last_page, &last_cursor)] {
        let by_offset = first_id(&client, &base, &key, &page_path(format!("page={page}"))).await?;
        let by_cursor =
            first_id(&client, &base, &key, &page_path(format!("cursor={cursor}"))).await?;
        anyhow::ensure!(
            by_offset == by_cursor,
            "page {page} starts at execution {by_offset} by offset, {by_cursor} by cursor"
        );
    }
    let depth = |page: u64| (page - 1) * per_page;
    // (key in the JSON, name in the table, paths read in turn, rate target)
    let phases: [(&str, String, Vec<String>, Option<Target>); 6] = [
        (
            "status_and_analytics",
            "seed 002 status + analytics".into(),
            status_and_analytics.clone(),
            Some(Target::AtLeast(20_000.0)),
        ),
        (
            "first_page",
            format!("seed 001 executions of {pages_n}, first page"),
            vec![page_path("page=1".into())],
            None,
        ),
        (
            "deep_page_by_offset",
            format!(
                "seed 001 executions, page {deep_page} (depth {}) by offset",
                depth(deep_page)
            ),
            vec![page_path(format!("page={deep_page}"))],
            None,
        ),
        (
            "deep_page_by_cursor",
            format!("seed 001 executions, page {deep_page} by cursor"),
            vec![page_path(format!("cursor={deep_cursor}"))],
            None,
        ),
        (
            "last_page_by_offset",
            format!(
                "seed 001 executions, last page {last_page} (depth {}) by offset",
                depth(last_page)
            ),
            vec![page_path(format!("page={last_page}"))],
            None,
        ),
        (
            "last_page_by_cursor",
            format!("seed 001 executions, last page {last_page} by cursor"),
            vec![page_path(format!("cursor={last_cursor}"))],
            None,
        ),
    ];
    for (json_key, name, paths, rate_target) in phases {
        println!("{name}: {clients} clients for {seconds} s …");
        let result = load(LoadPlan {
            base: base.clone(),
            key: key.clone(),
            paths,
            clients,
            seconds,
            server_pid: Some(bench.pid()),
        })
        .await?;
        report.row(format!("{name}: requests"), result.rate, "/s", rate_target);
        if let Some(cpu) = result.server_cpu_us {
            report.row(format!("{name}: server CPU per request"), cpu, "µs", None);
        }
        report.row(
            format!("{name}: p99, at the client's socket"),
            result.p99_ms,
            "ms",
            Some(Target::AtMost(10.0)),
        );
        report.row(
            format!("{name}: p99, read by the client thread"),
            result.p99_read_ms,
            "ms",
            None,
        );
        report.row(
            format!("{name}: errors"),
            result.errors as f64,
            "",
            Some(Target::AtMost(0.0)),
        );
        raw.insert(
            json_key.to_owned(),
            json!({"requests_per_second": result.rate, "p50_ms": result.p50_ms,
                   "p99_ms": result.p99_ms, "p99_read_ms": result.p99_read_ms,
                   "errors": result.errors,
                   "server_cpu_us_per_request": result.server_cpu_us}),
        );
    }
    // The same reads, same clients, same database, through the FastAPI peer.
    let herald_status = raw["status_and_analytics"]["requests_per_second"]
        .as_f64()
        .unwrap_or(f64::NAN);
    let peer = match super::peers::fastapi_missing() {
        Some(why) => {
            println!("FastAPI peer: not measured ({why})");
            json!({"measured": false, "why": why})
        }
        None => {
            let peer = super::peers::start_fastapi(Some(&bench.dir.join("bench.db"))).await?;
            println!(
                "FastAPI peer, seed 002 status + analytics: {clients} clients for {seconds} s …"
            );
            let result = load(LoadPlan {
                base: peer.base.clone(),
                key: key.clone(),
                paths: status_and_analytics,
                clients,
                seconds,
                server_pid: Some(peer.pid),
            })
            .await?;
            peer.stop().await;
            report.row(
                "FastAPI peer, status + analytics: requests",
                result.rate,
                "/s",
                None,
            );
            if let Some(cpu) = result.server_cpu_us {
                report.row(
                    "FastAPI peer, status + analytics: server CPU per request",
                    cpu,
                    "µs",
                    None,
                );
            }
            report.row(
                "FastAPI peer, status + analytics: p99, at the client's socket",
                result.p99_ms,
                "ms",
                None,
            );
            report.row(
                "FastAPI peer, status + analytics: p99, read by the client thread",
                result.p99_read_ms,
                "ms",
                None,
            );
            report.row(
                "status + analytics: Herald ÷ FastAPI peer",
                herald_status / result.rate,
                "×",
                None,
            );
            json!({"measured": true, "name": "fastapi+uvicorn", "requests_per_second": result.rate,
                   "p50_ms": result.p50_ms, "p99_ms": result.p99_ms, "p99_read_ms": result.p99_read_ms,
                   "errors": result.errors,
                   "server_cpu_us_per_request": result.server_cpu_us})
        }
    };
    report.raw(
        json!({"executions": n, "page_executions": pages_n, "page_depth": args.page_depth,
               "clients": clients, "seconds": seconds, "phases": raw,
                      "peer": peer}),
    );
    bench.stop().await;
    Ok(report)
}
