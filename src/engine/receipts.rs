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

pub struct ReceiptQueue {
    store: Arc<dyn Store>,
    hub: Hub,
    incoming: mpsc::UnboundedReceiver<(Instant, Receipt)>,
}

struct Due(Instant, u64, Receipt);

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
                        heap.push(Reverse(Due(due, order, receipt)));
                    }
                    None => break,
                },
                _ = tick.tick() => self.flush(&mut heap).await,
            }
        }
        // Receipts already due are written; later ones die with the node,
        // as a real carrier's would be redelivered.
        self.flush(&mut heap).await;
    }

    async fn flush(&self, heap: &mut BinaryHeap<Reverse<Due>>) {
        let now = Instant::now();
        loop {
            let mut batch = Vec::new();
            while batch.len() < MAX_PER_WRITE {
                match heap.peek() {
                    Some(Reverse(Due(due, _, _))) if *due <= now => {
                        let Reverse(Due(_, _, receipt)) = heap.pop().expect("peeked");
                        batch.push(receipt);
                    }
                    _ => break,
                }
            }
            if batch.is_empty() {
                return;
            }
            match self.store.record_receipts(&batch, now_ms()).await {
                Ok(report) => {
                    metrics::counter!("herald_receipts_total", "result" => "applied")
                        .increment(report.applied);
                    metrics::counter!("herald_receipts_total", "result" => "unknown")
                        .increment(report.unknown);
                    metrics::counter!("herald_receipts_total", "result" => "duplicate")
                        .increment(report.duplicate);
                    if report.unknown > 0 {
                        tracing::warn!(
                            unknown = report.unknown,
                            "receipts for unknown messages acknowledged"
                        );
                    }
                    for (campaign, workspace) in report.campaigns {
                        self.hub.notify(campaign, workspace);
                    }
                }
                Err(err) => {
                    tracing::error!(error = %err, lost = batch.len(), "writing receipts failed")
                }
            }
        }
    }
}
