//! `bench rest`: the seed REST reads on a finished campaign under load.
//! The campaign is made the way a user makes one (import, run on the
//! simulated provider), then concurrent clients read it over loopback.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;

use super::*;

#[derive(Debug, Clone, clap::Args)]
pub struct RestArgs {
    /// Executions in the campaign the clients read (made by running it).
    #[arg(long, default_value_t = 1_000_000)]
    pub executions: u64,
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

pub(super) async fn run(args: &RestArgs) -> anyhow::Result<Report> {
    // The server is a process of its own, so its CPU per request is its own.
    let mut bench = ChildServer::start(&[
        ("HERALD_IN_FLIGHT", "1000".into()),
        ("HERALD_SLICE", "1000".into()),
    ])
    .await?;
    let (base, key) = (bench.base.clone(), bench.key.clone());
    let client = reqwest::Client::new();
    let campaign: Value = client
        .post(format!("{base}/v1/campaigns"))
        .bearer_auth(&key)
        .json(
            &json!({"name": "bench", "channel": "sms", "template": "Hi {{name}}, day {{day}}",
                      "provider": {"kind": "simulated", "receipt_delay_ms": 0}}),
        )
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let (id, uuid) = (campaign["id"].clone(), campaign["uuid"].clone());
    let uuid = uuid.as_str().unwrap_or_default().to_owned();
    let n = args.executions;
    println!("making a campaign with {n} executions (import, then run) …");
    client
        .post(format!("{base}/v1/campaigns/{id}/contacts:import"))
        .bearer_auth(&key)
        .header("content-type", "text/csv")
        .body(csv_body(n))
        .send()
        .await?
        .error_for_status()?;
    client
        .post(format!("{base}/v1/campaigns/{id}/start"))
        .bearer_auth(&key)
        .send()
        .await?
        .error_for_status()?;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let c: Value = client
            .get(format!("{base}/v1/campaigns/{id}"))
            .bearer_auth(&key)
            .send()
            .await?
            .json()
            .await?;
        if c["status"] == "completed" || c["status"] == "failed" {
            break;
        }
    }
    let (clients, seconds) = (args.clients, args.seconds);
    let mut report = Report::new("rest");
    let mut raw = serde_json::Map::new();
    let per_page = 100;
    let last_page = n.div_ceil(per_page).max(1);
    // The reads Herald and the FastAPI peer are compared on.
    let status_and_analytics = vec![
        format!("/v1/campaign/{uuid}/status"),
        format!("/v1/campaign/{uuid}/analytics"),
    ];
    let phases: [(&str, Vec<String>, Option<Target>); 4] = [
        (
            "seed 002 status + analytics",
            status_and_analytics.clone(),
            Some(Target::AtLeast(20_000.0)),
        ),
        (
            "seed 001 executions, first page",
            vec![format!(
                "/api/v1/campaigns/{id}/executions?page=1&per_page={per_page}"
            )],
            None,
        ),
        (
            "seed 001 executions, last page by offset",
            vec![format!(
                "/api/v1/campaigns/{id}/executions?page={last_page}&per_page={per_page}"
            )],
            None,
        ),
        (
            "seed 001 executions, last page by cursor",
            vec![format!(
                "/api/v1/campaigns/{id}/executions?cursor={}&per_page={per_page}",
                per_page + 1
            )],
            None,
        ),
    ];
    for (name, paths, rate_target) in phases {
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
            name.to_owned(),
            json!({"requests_per_second": result.rate, "p50_ms": result.p50_ms,
                   "p99_ms": result.p99_ms, "p99_read_ms": result.p99_read_ms,
                   "errors": result.errors,
                   "server_cpu_us_per_request": result.server_cpu_us}),
        );
    }
    // The same reads, same clients, same database, through the FastAPI peer.
    let herald_status = raw["seed 002 status + analytics"]["requests_per_second"]
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
        json!({"executions": n, "clients": clients, "seconds": seconds, "phases": raw,
                      "peer": peer}),
    );
    bench.stop().await;
    Ok(report)
}
