//! `[[prefetch]]` lists refreshed by the running server: at start, then every `interval`,
//! through the server's own mirror (so they share its single flight with clients).

use super::prefetch::{self, Options, Platforms, Progress};
use super::source::Source;
use crate::config::Config;
use crate::mirror::Mirror;
use crate::oci::ImageRef;
use std::sync::Arc;
use tokio::sync::watch;
use tracing::{Instrument, info, info_span, warn};

/// Blob fetches at once per list: background work should leave room for clients.
const REFRESH_JOBS: usize = 2;

/// Starts one task per `[[prefetch]]` entry; each ends when `stop` turns true. An offline
/// mirror has nothing to refresh from, so it starts none.
pub fn spawn_refresh(config: &Config, mirror: &Arc<Mirror>, stop: watch::Receiver<bool>) {
    if config.prefetch.is_empty() {
        return;
    }
    if config.cache.offline {
        info!("offline: [[prefetch]] lists are not refreshed");
        return;
    }
    for (i, entry) in config.prefetch.iter().enumerate() {
        // validate() checked every reference and platform already.
        let images: Vec<ImageRef> = entry
            .images
            .iter()
            .filter_map(|s| ImageRef::parse(s).ok())
            .collect();
        let Ok(platforms) = Platforms::parse(&entry.platforms) else {
            continue;
        };
        let opts = Options {
            platforms,
            jobs: REFRESH_JOBS,
            with_referrers: entry.with_referrers,
        };
        let source = Arc::new(Source::Local(mirror.clone()));
        let interval = entry.interval.0;
        let mut stop = stop.clone();
        let task = async move {
            loop {
                let results = prefetch::run(
                    source.clone(),
                    images.clone(),
                    opts.clone(),
                    Arc::new(Progress::default()),
                )
                .await;
                let failed = results.iter().filter(|(_, r)| r.is_err()).count();
                for (image, r) in &results {
                    if let Err(e) = r {
                        warn!(image = %image, error = %e, "prefetch refresh failed");
                    }
                }
                info!(
                    images = results.len(),
                    failed,
                    next_in_s = interval.as_secs(),
                    "prefetch list refreshed"
                );
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = stop.changed() => break,
                }
                if *stop.borrow() {
                    break;
                }
            }
        };
        tokio::spawn(task.instrument(info_span!("prefetch", list = i)));
    }
}
