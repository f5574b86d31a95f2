//! Background cache housekeeping: eviction passes at start, after every commit that leaves the
//! cache over its bound, and every `EVICT_INTERVAL`, on the blocking pool; and the reads noted
//! since the last pass made durable at shutdown, for the next start's eviction order.

use super::Mirror;
use crate::metrics::Metrics;
use crate::storage::evict;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{info, warn};

/// How often reads are written to the metadata and an eviction pass runs when nothing
/// else triggered one.
const EVICT_INTERVAL: Duration = Duration::from_secs(30);

/// How often the bucket is listed for a gc pass: a listing of a large bucket is many requests.
const BUCKET_GC_INTERVAL: Duration = Duration::from_secs(300);

/// A blob read or written in the bucket this recently is never removed by gc: a replica marks it
/// read when it starts reading it, and an upload is dated when it completes. A read that outlasts
/// the grace and loses its blob goes on from the upstream at the byte it reached.
const BUCKET_GC_GRACE: Duration = Duration::from_secs(15 * 60);

impl Mirror {
    /// Runs until `stopped` turns true. Never stops the server: a failed pass is logged.
    pub async fn housekeeping(self: Arc<Self>, mut stopped: watch::Receiver<bool>) {
        let mut first = true;
        // Not at start: the replica does not know its peers yet, and would think it owns the gc.
        let mut last_gc = Instant::now();
        loop {
            if !first {
                tokio::select! {
                    _ = stopped.changed() => break,
                    _ = tokio::time::sleep(EVICT_INTERVAL) => {}
                    _ = self.evict_wakeup.notified() => {
                        if self.usage().bytes <= self.eviction.max_size {
                            continue;
                        }
                    }
                }
            }
            first = false;
            let m = self.clone();
            let report =
                tokio::task::spawn_blocking(move || evict::run_pass(&m.store, &m.eviction, false))
                    .await;
            match report {
                Ok(Ok(report)) => record_evictions(&self.metrics, &report),
                Ok(Err(e)) => warn!(error = %e, "eviction pass failed"),
                Err(e) => warn!(error = %e, "eviction task failed"),
            }
            self.bucket_round(Some(&mut last_gc)).await;
        }
        // Reads noted since the last round still count; a gc pass would only delay the stop.
        self.bucket_round(None).await;
        let m = self.clone();
        let _ = tokio::task::spawn_blocking(move || m.store.blobs().sync()).await;
    }

    /// The bucket's share of housekeeping: marks the blobs read here since the last round as
    /// read in the bucket, and, every `BUCKET_GC_INTERVAL`, runs a gc pass when this replica
    /// owns the gc (one replica at a time, by the same ownership as everything else; a pass on
    /// two at once is still safe). A failing bucket is logged and tried again next round.
    async fn bucket_round(&self, last_gc: Option<&mut Instant>) {
        let Some(b) = self.store.bucket() else {
            return;
        };
        let reads: Vec<_> = self.shared_reads.lock().drain().collect();
        if !reads.is_empty()
            && let Err(e) = b.touch(&reads).await
        {
            warn!(error = %e, blobs = reads.len(), "could not mark reads in the bucket");
        }
        let (Some(max_size), Some(last_gc)) = (self.bucket_max_size, last_gc) else {
            return;
        };
        if last_gc.elapsed() < BUCKET_GC_INTERVAL {
            return;
        }
        *last_gc = Instant::now();
        if self
            .cluster
            .as_ref()
            .is_some_and(|c| c.owner("gc").is_some())
        {
            return;
        }
        // The pins this replica can resolve (images it holds); see the README on pins.
        let (store, pins) = (self.store.clone(), self.eviction.pins.clone());
        let keep =
            match tokio::task::spawn_blocking(move || evict::pinned_digests(&store, &pins)).await {
                Ok(Ok(keep)) => keep,
                _ => {
                    warn!("could not resolve pins; bucket gc skipped this round");
                    return;
                }
            };
        match b.gc_sparing(max_size, BUCKET_GC_GRACE, &keep).await {
            Ok((0, _)) => {}
            Ok((count, bytes)) => info!(count, bytes, "bucket gc pass removed blobs"),
            Err(e) => warn!(error = %e, "bucket gc pass failed"),
        }
    }

    /// Runs one eviction pass now, with the configured policy or a bound of `max_size`.
    /// Blocking.
    pub fn evict_now(&self, max_size: Option<u64>) -> std::io::Result<evict::Report> {
        let mut policy = self.eviction.clone();
        if let Some(m) = max_size {
            policy.max_size = m;
        }
        let report = evict::run_pass(&self.store, &policy, false)?;
        record_evictions(&self.metrics, &report);
        Ok(report)
    }
}

fn record_evictions(metrics: &Metrics, report: &evict::Report) {
    for reason in [evict::Reason::Size, evict::Reason::Unused] {
        let (count, bytes) = report
            .evicted
            .iter()
            .filter(|e| e.reason == reason)
            .fold((0, 0), |(c, b), e| (c + 1, b + e.row.size));
        metrics
            .evictions
            .with_label_values(&[reason.as_str()])
            .inc_by(count);
        metrics
            .evicted_bytes
            .with_label_values(&[reason.as_str()])
            .inc_by(bytes);
    }
    if !report.evicted.is_empty() {
        info!(
            objects = report.evicted.len(),
            bytes = report.bytes(None),
            before = report.before,
            after = report.after,
            "evicted"
        );
    }
}
