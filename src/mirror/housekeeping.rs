//! Background cache housekeeping: eviction passes at start, after every commit that leaves the
//! cache over its bound, and every `EVICT_INTERVAL`, on the blocking pool; and the reads noted
//! since the last pass made durable at shutdown, for the next start's eviction order.

use super::Mirror;
use crate::metrics::Metrics;
use crate::storage::evict;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{info, warn};

/// How often reads are written to the metadata and an eviction pass runs when nothing
/// else triggered one.
const EVICT_INTERVAL: Duration = Duration::from_secs(30);

impl Mirror {
    /// Runs until `stopped` turns true. Never stops the server: a failed pass is logged.
    pub async fn housekeeping(self: Arc<Self>, mut stopped: watch::Receiver<bool>) {
        let mut first = true;
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
        }
        let m = self.clone();
        let _ = tokio::task::spawn_blocking(move || m.store.blobs().sync()).await;
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
