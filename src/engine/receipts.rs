//! Delayed delivery receipts of the simulated provider: held in a heap by
//! due time and written in batches, so a million receipts cost a few
//! hundred transactions rather than a million.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::providers::ReceiptSender;
use crate::store::{now_ms, Receipt, Store};
use crate::streams::Hub;

const FLUSH_EVERY: Duration = Duration::from_millis(100);
const MAX_PER_WRITE: usize = 5000;
/// A receipt can overtake the write that records its send (the engine
/// records a slice once all of it is sent): one naming no known message
/// is tried again this often, this many times, before it is dropped.
const UNKNOWN_RETRY: Duration = Duration::from_millis(250);
const UNKNOWN_TRIES: u8 = 120;

pub struct ReceiptQueue {
    store: Arc<dyn Store>,
    hub: Hub,
    incoming: mpsc::UnboundedReceiver<(Instant, Receipt)>,
}

/// A receipt due at a time; the `u64` keeps arrival order among equal
/// times, the `u8` counts tries.
struct Due(Instant, u64, Receipt, u8);

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.0, self.1) == (other.0, other.1)
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.0, self.1).cmp(&(other.0, other.1))
    }
}

impl ReceiptQueue {
    pub fn new(store: Arc<dyn Store>, hub: Hub) -> (Self, ReceiptSender) {
        let (tx, incoming) = mpsc::unbounded_channel();
        (
            Self {
                store,
                hub,
                incoming,
            },
            tx,
        )
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut heap: BinaryHeap<Reverse<Due>> = BinaryHeap::new();
        let mut order = 0u64;
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                received = self.incoming.recv() => match received {
                    Some((due, receipt)) => {
                        order += 1;
                        heap.push(Reverse(Due(due, order, receipt, 0)));
                    }
                    None => break,
                },
                _ = tick.tick() => self.flush(&mut heap, &mut order).await,
            }
        }
        // Receipts already due are written; later ones die with the node,
        // as a real carrier's would be redelivered.
        self.flush(&mut heap, &mut order).await;
    }

    async fn flush(&self, heap: &mut BinaryHeap<Reverse<Due>>, order: &mut u64) {
        let now = Instant::now();
        loop {
            let mut batch = Vec::new();
            while batch.len() < MAX_PER_WRITE {
                match heap.peek() {
                    Some(Reverse(Due(due, ..))) if *due <= now => {
                        let Reverse(Due(_, _, receipt, tries)) = heap.pop().expect("peeked");
                        batch.push((receipt, tries));
                    }
                    _ => break,
                }
            }
            if batch.is_empty() {
                return;
            }
            let receipts: Vec<Receipt> = batch.iter().map(|(r, _)| r.clone()).collect();
            match self.store.record_receipts(&receipts, now_ms()).await {
                Ok(report) => {
                    let unknown: std::collections::HashSet<&str> =
                        report.unknown_ids.iter().map(String::as_str).collect();
                    let mut given_up = 0u64;
                    for (receipt, tries) in &batch {
                        if !unknown.contains(receipt.provider_id.as_str()) {
                            continue;
                        }
                        if *tries + 1 >= UNKNOWN_TRIES {
                            given_up += 1;
                            continue;
                        }
                        *order += 1;
                        heap.push(Reverse(Due(
                            now + UNKNOWN_RETRY,
                            *order,
                            receipt.clone(),
                            tries + 1,
                        )));
                    }
                    if given_up > 0 {
                        tracing::warn!(
                            unknown = given_up,
                            "receipts for unknown messages acknowledged"
                        );
                    }
                    publish(&self.hub, report, given_up);
                }
                Err(err) => {
                    tracing::error!(error = %err, lost = batch.len(), "writing receipts failed")
                }
            }
        }
    }
}

/// Counts a written batch of receipts (`unknown`: those given up on) and
/// tells the hub of every campaign whose counters moved.
fn publish(hub: &Hub, report: crate::store::ReceiptReport, unknown: u64) {
    metrics::counter!("herald_receipts_total", "result" => "applied").increment(report.applied);
    metrics::counter!("herald_receipts_total", "result" => "duplicate").increment(report.duplicate);
    metrics::counter!("herald_receipts_total", "result" => "unknown").increment(unknown);
    for (campaign, workspace, progress) in report.campaigns {
        hub.publish(campaign, workspace, vec![progress]);
    }
}

/// Receipts a provider calls back with (Twilio's status callbacks), written
/// by group commit: each callback waits for the transaction that records
/// it — so a provider is only told "taken" once it is — but the callbacks
/// that arrive while one transaction is being written share the next one.
/// One transaction per callback serialised them all on their run's row
/// (on Postgres a 20,000-message run took minutes to settle).
#[derive(Clone)]
pub struct ReceiptBatcher {
    incoming: mpsc::Sender<(
        Receipt,
        tokio::sync::oneshot::Sender<crate::store::StoreResult<()>>,
    )>,
}

impl ReceiptBatcher {
    /// Starts the writer task; it ends when every handle is dropped.
    pub fn start(store: Arc<dyn Store>, hub: Hub) -> Self {
        let (incoming, mut receiver) = mpsc::channel::<(
            Receipt,
            tokio::sync::oneshot::Sender<crate::store::StoreResult<()>>,
        )>(MAX_PER_WRITE * 2);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(MAX_PER_WRITE);
            while receiver.recv_many(&mut batch, MAX_PER_WRITE).await > 0 {
                let receipts: Vec<Receipt> = batch.iter().map(|(r, _)| r.clone()).collect();
                let written = store.record_receipts(&receipts, now_ms()).await;
                match written {
                    Ok(report) => {
                        let unknown = report.unknown;
                        publish(&hub, report, unknown);
                        for (_, reply) in batch.drain(..) {
                            let _ = reply.send(Ok(()));
                        }
                    }
                    Err(err) => {
                        // Every callback of the batch is answered 503, so
                        // the provider tries again; nothing was written.
                        tracing::warn!(error = %err, receipts = batch.len(), "writing receipts failed");
                        for (_, reply) in batch.drain(..) {
                            let _ = reply.send(Err(crate::store::StoreError::Unavailable(
                                format!("receipts could not be written: {err}"),
                            )));
                        }
                    }
                }
            }
        });
        Self { incoming }
    }

    /// Records one receipt; returns once the transaction holding it commits.
    pub async fn record(&self, receipt: Receipt) -> crate::store::StoreResult<()> {
        let (reply, written) = tokio::sync::oneshot::channel();
        let closed = || crate::store::StoreError::Unavailable("the node is shutting down".into());
        self.incoming
            .send((receipt, reply))
            .await
            .map_err(|_| closed())?;
        written.await.map_err(|_| closed())?
    }
}
