//! Re-hashing what the cache holds: one pass over every stored object, in digest order,
//! quarantining what no longer matches its digest (the next pull fetches it again). The
//! background scrub (`[cache] scrub_interval`) paces itself to `scrub_rate` and keeps its
//! position in the metadata, so a server restarted more often than a pass takes still
//! completes passes; `cachalot verify` runs a pass at full speed. With `[cache] scrub_bucket`
//! a pass goes on, once the cache directory is done, with every blob of the shared bucket
//! (`bucket_scrub.rs`), each part keeping its own position.

use super::Store;
use super::integrity::{self, Checked, Damage, Verdict};
use crate::oci::Digest;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;

/// `state` keys: the last digest checked by an unfinished pass (of the cache directory, then of
/// the bucket), and when the last pass ended.
const POSITION: &str = "scrub_position";
const BUCKET_POSITION: &str = "scrub_bucket_position";
const LAST_PASS: &str = "scrub_last_pass";
/// The cache directory's position once its part of a pass is done and the bucket's is under
/// way: after every digest's name (`~` sorts after the letters), so a restart goes straight
/// on with the bucket.
const LOCAL_DONE: &str = "~";
/// How often an unfinished pass writes down where it is.
const SAVE_EVERY: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Bytes per second at most; `None`: as fast as the disk goes.
    pub rate: Option<u64>,
    /// Resume from, and keep, the persisted position (the background scrub).
    pub persist: bool,
}

/// What a pass tells as it goes.
pub enum Event<'a> {
    /// Before the first object of a part (the cache directory's, then the bucket's): what it
    /// sets out to check.
    Start { objects: u64, bytes: u64 },
    /// An object of the cache directory found damaged (and quarantined).
    Damaged(&'a Digest, &'a Damage),
    /// An object of the bucket found damaged (and taken out of it, see `Bucket::quarantine`).
    BucketDamaged(&'a Digest, &'a Damage),
    /// After each object: done so far in this part, of what its `Start` announced.
    Progress { objects: u64, bytes: u64 },
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// What the pass set out to check.
    pub total_objects: u64,
    pub total_bytes: u64,
    /// What it checked.
    pub objects: u64,
    pub bytes: u64,
    pub damaged: u64,
    /// False when stopped before the end.
    pub complete: bool,
}

/// The bucket's part of a pass (`[cache] scrub_bucket`): every blob of the shared bucket,
/// read through the store, or those this replica owns.
pub struct BucketScope {
    pub bucket: super::Bucket,
    /// The runtime the bucket's calls run on; the pass blocks on it from its own thread.
    pub rt: tokio::runtime::Handle,
    /// Whether this replica checks a digest: with `[cluster]`, the one that owns it (the
    /// rendezvous owner among the live replicas), so replicas sharing a bucket split each pass
    /// between them; `None`: every digest (`verify`).
    pub owns: Option<Owns>,
}

/// Whether this replica checks a digest.
pub type Owns = Box<dyn Fn(&Digest) -> bool + Send + Sync>;

/// Keeps a pass to its rate and counts what it hashed.
pub(super) struct Pace<'a> {
    started: Instant,
    paced: u64,
    rate: Option<u64>,
    counters: &'a integrity::Counters,
    stop: &'a AtomicBool,
}

impl<'a> Pace<'a> {
    pub(super) fn new(
        rate: Option<u64>,
        counters: &'a integrity::Counters,
        stop: &'a AtomicBool,
    ) -> Pace<'a> {
        Pace {
            started: Instant::now(),
            paced: 0,
            rate,
            counters,
            stop,
        }
    }

    /// `n` bytes were hashed: sleeps as long as the rate asks; answers whether to go on.
    pub(super) fn chunk(&mut self, n: usize) -> bool {
        self.paced += n as u64;
        self.counters
            .scrub_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
        if let Some(rate) = self.rate {
            let due = self.started + Duration::from_secs_f64(self.paced as f64 / rate as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        !self.stop.load(Ordering::Relaxed)
    }
}

/// One pass over the objects of `store`'s cache directory (from the saved position with
/// `persist`). Stops, with the position saved, soon after `stop` is set. Blocking.
pub fn run_pass(
    store: &Store,
    opts: Options,
    stop: &AtomicBool,
    on: impl FnMut(Event<'_>),
) -> io::Result<Summary> {
    run_pass_with(store, None, opts, stop, on)
}

/// [`run_pass`], then, with `bucket`, the bucket's part; the pass is complete (and recorded so
/// with `persist`) when both are. Blocking: never call it from a task of `bucket.rt`.
pub fn run_pass_with(
    store: &Store,
    bucket: Option<&BucketScope>,
    opts: Options,
    stop: &AtomicBool,
    mut on: impl FnMut(Event<'_>),
) -> io::Result<Summary> {
    let counters = store.blobs().counters().unwrap_or_default();
    let mut sum = local_part(store, &counters, bucket.is_some(), opts, stop, &mut on)?;
    if !sum.complete {
        return Ok(sum);
    }
    if let Some(scope) = bucket {
        if opts.persist {
            store.meta().set_state(&[(POSITION, LOCAL_DONE)])?;
        }
        let b = match super::bucket_scrub::run(store, scope, &counters, opts, stop, &mut on) {
            Ok(b) => b,
            Err(e) => {
                // The bucket failing (down, unreadable) must not leave the cache directory
                // skipped by every later pass for as long as it lasts: its part starts over.
                if opts.persist {
                    store.meta().set_state(&[(POSITION, "")])?;
                }
                return Err(e);
            }
        };
        sum.total_objects += b.total_objects;
        sum.total_bytes += b.total_bytes;
        sum.objects += b.objects;
        sum.bytes += b.bytes;
        sum.damaged += b.damaged;
        sum.complete = b.complete;
        if !sum.complete {
            return Ok(sum);
        }
    }
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if opts.persist {
        store.meta().set_state(&[
            (POSITION, ""),
            (BUCKET_POSITION, ""),
            (LAST_PASS, &now.to_string()),
        ])?;
    }
    counters.scrub_last_pass.store(now, Ordering::Relaxed);
    Ok(sum)
}

/// The position saved under `key` with `persist`, if a pass is under way.
pub(super) fn position(store: &Store, key: &str, opts: Options) -> io::Result<Option<String>> {
    Ok(match opts.persist {
        true => store.meta().state(key)?.filter(|p| !p.is_empty()),
        false => None,
    })
}

/// How often, and under which key, a part saves where it is.
pub(super) struct Saver<'a> {
    store: &'a Store,
    key: &'static str,
    persist: bool,
    saved: Instant,
}

impl<'a> Saver<'a> {
    pub(super) fn new(store: &'a Store, key: &'static str, opts: Options) -> Saver<'a> {
        Saver {
            store,
            key,
            persist: opts.persist,
            saved: Instant::now(),
        }
    }

    /// After `name` was checked: saved every [`SAVE_EVERY`].
    pub(super) fn done(&mut self, name: &str) -> io::Result<()> {
        if self.persist && self.saved.elapsed() >= SAVE_EVERY {
            self.store.meta().set_state(&[(self.key, name)])?;
            self.saved = Instant::now();
        }
        Ok(())
    }

    /// The part stops after `last` (if any): a restart goes on after it.
    pub(super) fn stopped(&self, last: Option<&str>) -> io::Result<()> {
        match last {
            Some(name) if self.persist => self.store.meta().set_state(&[(self.key, name)]),
            _ => Ok(()),
        }
    }
}

pub(super) const BUCKET_KEY: &str = BUCKET_POSITION;

fn local_part(
    store: &Store,
    counters: &integrity::Counters,
    bucket_follows: bool,
    opts: Options,
    stop: &AtomicBool,
    on: &mut impl FnMut(Event<'_>),
) -> io::Result<Summary> {
    let blobs = store.blobs();
    // Stopped in the bucket's part, and the bucket no longer scrubbed (`scrub_bucket` turned
    // off meanwhile): the cache directory's part starts over rather than count as done.
    let after = position(store, POSITION, opts)?.filter(|p| bucket_follows || p != LOCAL_DONE);
    let mut rows: Vec<(String, u64, Digest)> = blobs
        .objects()?
        .into_iter()
        .map(|r| (r.digest.to_string(), r.size, r.digest))
        .filter(|(name, _, _)| after.as_ref().is_none_or(|a| name > a))
        .collect();
    rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let mut sum = Summary {
        total_objects: rows.len() as u64,
        total_bytes: rows.iter().map(|r| r.1).sum(),
        ..Summary::default()
    };
    on(Event::Start {
        objects: sum.total_objects,
        bytes: sum.total_bytes,
    });
    let mut pace = Pace::new(opts.rate, counters, stop);
    let mut saver = Saver::new(store, POSITION, opts);
    // The last object checked, saved when the pass stops: a restart goes on after it.
    let mut last_done: Option<&str> = None;
    for (name, _, digest) in &rows {
        if stop.load(Ordering::Relaxed) {
            saver.stopped(last_done)?;
            return Ok(sum);
        }
        let damage = match blobs.open_for_check(digest)? {
            Checked::Missing => {
                last_done = Some(name);
                continue;
            }
            Checked::Damaged(d) => Some(d),
            Checked::Blob(b) => {
                sum.bytes += b.len;
                match integrity::check(&*b.reader, digest, b.len, |n| pace.chunk(n)) {
                    Verdict::Stopped => {
                        saver.stopped(last_done)?;
                        return Ok(sum);
                    }
                    Verdict::Whole => {
                        if !b.verified {
                            blobs.mark_verified(digest, b.len)?;
                        }
                        None
                    }
                    Verdict::Damaged(d) => {
                        blobs.quarantine(digest, &d)?;
                        Some(d)
                    }
                }
            }
        };
        sum.objects += 1;
        counters.scrub_objects.fetch_add(1, Ordering::Relaxed);
        if let Some(d) = &damage {
            sum.damaged += 1;
            counters.scrub_corrupt.fetch_add(1, Ordering::Relaxed);
            on(Event::Damaged(digest, d));
        }
        on(Event::Progress {
            objects: sum.objects,
            bytes: sum.bytes,
        });
        last_done = Some(name);
        saver.done(name)?;
    }
    sum.complete = true;
    Ok(sum)
}

/// Waits for `stopped` to turn true (or its sender to go). The guard `wait_for` returns is
/// dropped here, before any await of the caller's: it must not live in a spawned future.
pub async fn until_stopped(stopped: &mut watch::Receiver<bool>) {
    let _ = stopped.wait_for(|s| *s).await;
}

/// When the last complete pass ended and whether one is under way, from the metadata.
fn schedule(store: &Store) -> io::Result<(Option<SystemTime>, bool)> {
    let last = store
        .meta()
        .state(LAST_PASS)?
        .and_then(|s| s.parse::<u64>().ok())
        .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s));
    let under_way = store.meta().state(POSITION)?.is_some_and(|p| !p.is_empty());
    Ok((last, under_way))
}

/// The background scrub: a pass every `interval` (the first at once when none is recorded),
/// an unfinished one resumed at start, each at `rate`. Ends when `stopped` turns true.
pub fn spawn(
    store: Arc<Store>,
    bucket: Option<BucketScope>,
    interval: Duration,
    rate: u64,
    mut stopped: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let bucket = bucket.map(Arc::new);
    let stop = Arc::new(AtomicBool::new(false));
    {
        let (stop, mut stopped) = (stop.clone(), stopped.clone());
        tokio::spawn(async move {
            until_stopped(&mut stopped).await;
            stop.store(true, Ordering::Relaxed);
        });
    }
    tokio::spawn(async move {
        loop {
            let s = store.clone();
            let (last, under_way) = match tokio::task::spawn_blocking(move || schedule(&s)).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "scrub: cannot read its schedule; scrubbing off");
                    return;
                }
                Err(_) => return,
            };
            if let Some(c) = store.blobs().counters()
                && let Some(t) = last
            {
                let secs = t
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                c.scrub_last_pass.fetch_max(secs, Ordering::Relaxed);
            }
            let wait = match (under_way, last) {
                (false, Some(t)) => (t + interval)
                    .duration_since(SystemTime::now())
                    .unwrap_or_default(),
                _ => Duration::ZERO,
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = until_stopped(&mut stopped) => return,
            }
            let (s, stop, bucket) = (store.clone(), stop.clone(), bucket.clone());
            let pass = tokio::task::spawn_blocking(move || {
                let opts = Options {
                    rate: Some(rate),
                    persist: true,
                };
                run_pass_with(&s, bucket.as_deref(), opts, &stop, |e| match e {
                    Event::Damaged(d, damage) => {
                        tracing::error!(digest = %d, damage = %damage, "scrub: damaged object quarantined");
                    }
                    Event::BucketDamaged(d, damage) => {
                        tracing::error!(digest = %d, damage = %damage, "scrub: damaged object taken out of the bucket (to its quarantine/); the next pull fetches it again");
                    }
                    _ => {}
                })
            })
            .await;
            match pass {
                Ok(Ok(sum)) if sum.complete => {
                    tracing::info!(
                        objects = sum.objects,
                        bytes = sum.bytes,
                        damaged = sum.damaged,
                        "scrub pass complete"
                    )
                }
                Ok(Ok(_)) => return,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "scrub pass failed; trying again after the interval");
                    tokio::select! {
                        _ = tokio::time::sleep(interval) => {}
                        _ = until_stopped(&mut stopped) => return,
                    }
                }
                Err(_) => return,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(store: &Store, data: &[u8]) -> Digest {
        let d = Digest::sha256_of(data);
        let mut v = crate::oci::Verifier::new(crate::oci::Algorithm::Sha256);
        v.update(data);
        let mut w = store.blobs().begin(&d).unwrap();
        w.write(data).unwrap();
        w.commit(v.verify(&d).unwrap(), "up/team/app").unwrap();
        d
    }

    /// A pass stopped midway (a restart) goes on where it was, so restarts more frequent than
    /// a pass takes still complete passes; the next pass starts over.
    #[test]
    fn a_stopped_pass_resumes_where_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let opts = Options {
            rate: None,
            persist: true,
        };
        {
            let store = Store::open(dir.path()).unwrap();
            for i in 0..4u8 {
                commit(&store, &[i; 100]);
            }
            let stop = AtomicBool::new(false);
            let sum = run_pass(&store, opts, &stop, |e| {
                if let Event::Progress { objects: 2, .. } = e {
                    stop.store(true, Ordering::Relaxed);
                }
            })
            .unwrap();
            assert_eq!((sum.objects, sum.complete), (2, false));
        }
        let store = Store::open(dir.path()).unwrap();
        let stop = AtomicBool::new(false);
        let sum = run_pass(&store, opts, &stop, |_| {}).unwrap();
        assert_eq!((sum.total_objects, sum.objects, sum.complete), (2, 2, true));
        let sum = run_pass(&store, opts, &stop, |_| {}).unwrap();
        assert_eq!(sum.objects, 4, "a new pass covers everything");
        assert!(store.meta().state(LAST_PASS).unwrap().is_some());
    }

    #[test]
    fn a_pass_keeps_to_its_rate() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        commit(&store, &vec![1u8; 300_000]);
        let opts = Options {
            rate: Some(1_000_000),
            persist: false,
        };
        let t = Instant::now();
        run_pass(&store, opts, &AtomicBool::new(false), |_| {}).unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(290),
            "{:?}",
            t.elapsed()
        );
    }
}
