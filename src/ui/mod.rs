//! The read-only page at `/ui`: the mirror at a glance, what it holds, how to pull it; and the
//! same data as JSON under `/ui/api/`. `model.rs` reads the values, `html.rs` renders them,
//! `serve.rs` answers the requests; there is no logic in the templates.

pub mod history;
pub mod html;
pub mod model;
pub(crate) mod serve;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::mirror::Mirror;
use crate::oci::ImageRef;
use crate::storage::evict;
use model::{ImageDetail, ListQuery, Listing, MayPull, Overview};
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::{Instant, SystemTime};
use tokio::sync::watch;

/// What the page needs besides the mirror and the metrics: taken from the config once, and
/// the past readings of the lookup counters.
/// How long a read of the tags table serves pages after the table was written, when reading
/// it is not cheap.
pub const INDEX_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(5);
/// A read of the tags table this quick is simply made again after every write: a small cache
/// shows a pull on the next view.
const CHEAP_READ: std::time::Duration = std::time::Duration::from_millis(2);

/// One read of the tags table: the table's generation before it, when it began, what it cost.
struct Kept {
    generation: u64,
    at: Instant,
    took: std::time::Duration,
    index: Arc<model::TagIndex>,
}

pub struct Ui {
    enabled: bool,
    started: SystemTime,
    /// `(name, default)` of every upstream, in config order.
    upstreams: Vec<(String, bool)>,
    pins: Vec<ImageRef>,
    max_size: u64,
    tls: bool,
    history: Mutex<history::History>,
    /// The tags table as last read.
    index: Mutex<Option<Kept>>,
    /// One reader of the tags table at a time: pages that find the index stale together wait
    /// for one read instead of each making its own.
    reading: Mutex<()>,
    /// [`INDEX_MAX_AGE`], but for tests.
    index_max_age: std::time::Duration,
}

impl Ui {
    pub fn new(config: &Config) -> Ui {
        let policy = config.eviction_policy();
        Ui {
            enabled: config.server.ui,
            started: SystemTime::now(),
            upstreams: config
                .upstream
                .iter()
                .map(|u| (u.name.clone(), u.default))
                .collect(),
            pins: policy.pins,
            max_size: policy.max_size,
            tls: config.server.tls_cert.is_some(),
            history: Mutex::new(history::History::default()),
            index: Mutex::new(None),
            reading: Mutex::new(()),
            index_max_age: INDEX_MAX_AGE,
        }
    }

    /// `server.ui`: off, `/ui` and `/` answer 404.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Reads the lookup counters every `SAMPLE_EVERY` until `stopped` turns true.
    pub async fn run_sampler(
        self: Arc<Self>,
        metrics: Arc<Metrics>,
        mut stopped: watch::Receiver<bool>,
    ) {
        if !self.enabled {
            return;
        }
        loop {
            self.history
                .lock()
                .record(Instant::now(), model::lookup_counts(&metrics));
            tokio::select! {
                _ = stopped.changed() => break,
                _ = tokio::time::sleep(history::SAMPLE_EVERY) => {}
            }
        }
    }

    /// The hit ratios over the last five minutes (or the uptime, when shorter).
    pub fn recent(&self, metrics: &Metrics) -> history::Recent {
        self.history
            .lock()
            .recent(Instant::now(), model::lookup_counts(metrics))
    }

    /// At a glance, for `may_pull`'s caller.
    pub fn overview(&self, mirror: &Mirror, metrics: &Metrics, may_pull: MayPull<'_>) -> Overview {
        model::overview(
            metrics,
            model::OverviewInputs {
                started: self.started,
                now: SystemTime::now(),
                recent: self.recent(metrics),
                upstreams: &self.upstreams,
                fills: mirror.fills_in_progress(),
                usage: mirror.usage(),
                max_size: self.max_size,
            },
            may_pull,
        )
    }

    /// What the cache holds, as `query` asks. Blocking.
    pub fn listing(
        &self,
        mirror: &Mirror,
        query: &ListQuery,
        may_pull: MayPull<'_>,
    ) -> std::io::Result<Listing> {
        let pinned = evict::pinned_digests(mirror.store(), &self.pins)?;
        let index = self.index(mirror.store())?;
        model::list_in(
            &index,
            mirror.store(),
            mirror.cache_dir(),
            &pinned,
            query,
            may_pull,
        )
    }

    /// The tags table as an index: the one read last, unless the table was written since and
    /// either that read was cheap or it is older than [`INDEX_MAX_AGE`]. A busy mirror with
    /// thousands of tags writes the table all the time (every revalidation moves it), so
    /// without the age bound nearly every page would read it whole; a page a few seconds behind
    /// the table is still the truth. The generation is read before the table, so a write during
    /// the read moves it on. Blocking.
    pub fn index(&self, store: &crate::storage::Store) -> std::io::Result<Arc<model::TagIndex>> {
        let fresh = |kept: &Option<Kept>| match kept {
            Some(k)
                if k.generation == store.meta().tags_generation()
                    || (k.took >= CHEAP_READ && k.at.elapsed() < self.index_max_age) =>
            {
                Some(k.index.clone())
            }
            _ => None,
        };
        if let Some(index) = fresh(&self.index.lock()) {
            return Ok(index);
        }
        let _reading = self.reading.lock();
        if let Some(index) = fresh(&self.index.lock()) {
            return Ok(index);
        }
        let generation = store.meta().tags_generation();
        let at = Instant::now();
        let index = Arc::new(model::TagIndex::read(store)?);
        *self.index.lock() = Some(Kept {
            generation,
            at,
            took: at.elapsed(),
            index: index.clone(),
        });
        Ok(index)
    }

    /// One tag and how to pull it through the mirror reached at `authority`. Blocking.
    pub fn image(
        &self,
        mirror: &Mirror,
        key: (&str, &str, &str),
        authority: &str,
        may_pull: MayPull<'_>,
    ) -> std::io::Result<Option<ImageDetail>> {
        let pinned = evict::pinned_digests(mirror.store(), &self.pins)?;
        let Some(image) = model::image(mirror.store(), mirror.cache_dir(), &pinned, key, may_pull)?
        else {
            return Ok(None);
        };
        let reach = model::Reach {
            authority,
            tls: self.tls,
            default_upstream: self
                .upstreams
                .iter()
                .find(|(_, d)| *d)
                .map(|(n, _)| n.as_str()),
        };
        let pull = model::pull_commands(&reach, &image.upstream, &image.repository, &image.tag);
        Ok(Some(ImageDetail { image, pull }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Digest;
    use std::time::UNIX_EPOCH;

    #[test]
    fn the_index_is_read_again_after_every_tag_write_and_only_then() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::storage::Store::open(dir.path()).unwrap();
        let config = Config::from_toml_str(
            "[[upstream]]\nname = \"docker.io\"\nurl = \"https://registry-1.docker.io\"\ndefault = true\n",
        )
        .unwrap();
        let mut ui = Ui::new(&config);
        ui.index_max_age = std::time::Duration::ZERO;
        let tag = |t: &str| {
            let d = Digest::sha256_of(t.as_bytes());
            store
                .meta()
                .put_manifest(&d, "x", Some(("docker.io", "library/a", t, UNIX_EPOCH)))
                .unwrap();
        };
        tag("1");
        let first = ui.index(&store).unwrap();
        assert_eq!(first.len(), 1);
        assert!(
            Arc::ptr_eq(&first, &ui.index(&store).unwrap()),
            "unchanged: kept"
        );
        tag("2");
        let second = ui.index(&store).unwrap();
        assert_eq!(second.len(), 2, "a new tag is listed at once");
        // A revalidation writes the table too (its time is shown).
        let e = store
            .meta()
            .tags("docker.io", "library/a", "1")
            .unwrap()
            .remove(0);
        store
            .meta()
            .touch_tag(
                "docker.io",
                "library/a",
                "1",
                &e,
                UNIX_EPOCH + std::time::Duration::from_secs(5),
            )
            .unwrap();
        assert!(!Arc::ptr_eq(&second, &ui.index(&store).unwrap()));

        // As served: a small table is read again after every write, so a pull shows at once.
        ui.index_max_age = INDEX_MAX_AGE;
        tag("3");
        let small = ui.index(&store).unwrap();
        assert_eq!(small.len(), 3);
        // A table that was costly to read is not read again for every write (a busy mirror
        // revalidates all the time); a page is at most INDEX_MAX_AGE behind it.
        if let Some(k) = &mut *ui.index.lock() {
            k.took = CHEAP_READ * 10;
        }
        tag("4");
        assert!(
            Arc::ptr_eq(&small, &ui.index(&store).unwrap()),
            "read again at once"
        );
    }
}
