//! The bucket's part of a scrub pass or `verify` (`[cache] scrub_bucket`, off by default:
//! reading the bucket back costs egress). Every blob of the shared bucket is read through the
//! store, streamed and hashed, in digest order; one whose bytes no longer hash to its digest is
//! taken out of the bucket (to its `quarantine/`, see `Bucket::quarantine`), so the next pull
//! on any replica fetches it again.
//! The bucket keeps no size apart from the object's own, so a blob cut short is found by its
//! digest; the listed size is only the pass's estimate (an object may be replaced between the
//! listing and its read, and its bytes decide).
//!
//! A read that fails (the bucket down or slow) is not damage: the object is left alone and
//! checked by the next pass, and a bucket that fails several objects in a row ends the pass,
//! its position saved.

use super::Store;
use super::integrity::{Counters, Damage};
use super::scrub::{self, BucketScope, Event, Options, Pace, Saver, Summary};
use crate::oci::{Digest, Verifier};
use futures_util::StreamExt;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Objects in a row the bucket may fail to read before the pass gives up: past that it is the
/// bucket that fails, not an object.
const FAILURES_IN_A_ROW: u32 = 3;
/// The longest a read waits for the next bytes of a body.
const CHUNK_WAIT: Duration = Duration::from_secs(30);

/// What reading one object back found.
enum Read {
    Whole,
    Damaged(Damage),
    /// Not in the bucket (any more).
    Missing,
    /// The pass was asked to stop midway.
    Stopped,
    /// The bucket failed the read; nothing is known of the object.
    Failed(io::Error),
}

/// The bucket's part of a pass, from the saved position with `persist`. Blocking: it waits on
/// `scope.rt`, so it must not run on one of that runtime's tasks.
pub(super) fn run(
    store: &Store,
    scope: &BucketScope,
    counters: &Counters,
    opts: Options,
    stop: &AtomicBool,
    on: &mut impl FnMut(Event<'_>),
) -> io::Result<Summary> {
    let owns = |d: &Digest| scope.owns.as_ref().is_none_or(|owns| owns(d));
    let after = scrub::position(store, scrub::BUCKET_KEY, opts)?;
    let mut rows: Vec<(String, u64, Digest)> = scope
        .rt
        .block_on(scope.bucket.objects())?
        .into_iter()
        .map(|r| (r.digest.to_string(), r.size, r.digest))
        .filter(|(name, _, d)| after.as_ref().is_none_or(|a| name > a) && owns(d))
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
    let mut saver = Saver::new(store, scrub::BUCKET_KEY, opts);
    let mut last_done: Option<&str> = None;
    let mut failures = 0;
    for (name, listed, digest) in &rows {
        if stop.load(Ordering::Relaxed) {
            saver.stopped(last_done)?;
            return Ok(sum);
        }
        // A pass takes hours on a large bucket: ownership is asked again as each object comes
        // up, so a replica that joined or left meanwhile changes who checks the rest.
        if !owns(digest) {
            last_done = Some(name);
            continue;
        }
        let damage = match read(scope, digest, &mut pace, &mut sum.bytes) {
            Read::Missing => {
                failures = 0;
                last_done = Some(name);
                continue;
            }
            Read::Stopped => {
                saver.stopped(last_done)?;
                return Ok(sum);
            }
            Read::Failed(e) => {
                failures += 1;
                tracing::warn!(digest = %digest, error = %e, "scrub: could not read a blob back from the bucket; left for the next pass");
                if failures >= FAILURES_IN_A_ROW {
                    saver.stopped(last_done)?;
                    return Err(e);
                }
                continue;
            }
            Read::Whole => None,
            Read::Damaged(d) => {
                // A refused delete must not end every pass at this object: counted, logged, and
                // tried again by the next pass.
                if let Err(e) = scope.rt.block_on(scope.bucket.quarantine(digest, *listed)) {
                    tracing::warn!(digest = %digest, error = %e, "scrub: could not take a damaged blob out of the bucket; left for the next pass");
                }
                Some(d)
            }
        };
        failures = 0;
        sum.objects += 1;
        counters.scrub_objects.fetch_add(1, Ordering::Relaxed);
        if let Some(d) = &damage {
            sum.damaged += 1;
            counters.scrub_corrupt.fetch_add(1, Ordering::Relaxed);
            counters.quarantined[d.reason() as usize].fetch_add(1, Ordering::Relaxed);
            on(Event::BucketDamaged(digest, d));
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

/// Reads `digest` back from the bucket whole, hashing as it streams, and checks it against its
/// digest. Adds what it hashed to `bytes`.
fn read(scope: &BucketScope, digest: &Digest, pace: &mut Pace<'_>, bytes: &mut u64) -> Read {
    let got = match scope.rt.block_on(scope.bucket.get(digest, None)) {
        Ok(Some(got)) => got,
        Ok(None) => return Read::Missing,
        Err(e) => return Read::Failed(e),
    };
    let mut body = got.body;
    let mut v = Verifier::new(digest.algorithm());
    let mut at = 0u64;
    loop {
        let next = scope
            .rt
            .block_on(async { tokio::time::timeout(CHUNK_WAIT, body.next()).await });
        match next {
            Err(_) => {
                return Read::Failed(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no bytes from the bucket for {CHUNK_WAIT:?}"),
                ));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => return Read::Failed(e),
            Ok(Some(Ok(chunk))) => {
                v.update(&chunk);
                at += chunk.len() as u64;
                *bytes += chunk.len() as u64;
                if !pace.chunk(chunk.len()) {
                    return Read::Stopped;
                }
            }
        }
    }
    if at != got.len {
        // The body ended short of what the response declared: the transfer failed, and says
        // nothing of the object.
        return Read::Failed(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the bucket sent {at} of {} bytes", got.len),
        ));
    }
    // The whole declared length arrived: the digest alone decides. The listed size may be of an
    // earlier object under the same name (replaced while a slow pass went on), and a size
    // mismatch of a good copy must not take it out.
    let found = v.finish();
    if found == *digest {
        Read::Whole
    } else {
        Read::Damaged(Damage::Digest { found })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::storage::Bucket;
    use bytes::Bytes;
    use object_store::memory::InMemory;
    use object_store::{ObjectStore, ObjectStoreExt};
    use std::sync::Arc;
    use std::sync::atomic::AtomicU32;

    type Seen = ((Summary, Vec<(Digest, Damage)>), Vec<u64>);

    struct Setup {
        rt: tokio::runtime::Runtime,
        raw: Arc<dyn ObjectStore>,
        bucket: Bucket,
        store: Store,
        _dir: tempfile::TempDir,
    }

    fn setup() -> Setup {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let raw: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let bucket = Bucket::with_store(raw.clone(), "cache", Arc::new(Metrics::new(&[])));
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        Setup {
            rt,
            raw,
            bucket,
            store,
            _dir: dir,
        }
    }

    impl Setup {
        fn put(&self, data: &[u8]) -> Digest {
            let d = Digest::sha256_of(data);
            let mut v = Verifier::new(d.algorithm());
            v.update(data);
            let proof = v.verify(&d).unwrap();
            self.rt
                .block_on(self.bucket.put_small(Bytes::copy_from_slice(data), &proof))
                .unwrap();
            d
        }

        /// Replaces the object's bytes behind the bucket's back, as a failing store would.
        fn damage(&self, d: &Digest, bytes: Vec<u8>) {
            let key = object_store::path::Path::from(format!("cache/blobs/sha256/{}", d.hex()));
            self.rt.block_on(self.raw.put(&key, bytes.into())).unwrap();
        }

        fn scope(&self, owns: Option<scrub::Owns>) -> BucketScope {
            BucketScope {
                bucket: self.bucket.clone(),
                rt: self.rt.handle().clone(),
                owns,
            }
        }

        fn pass(
            &self,
            scope: &BucketScope,
            persist: bool,
            stop_after: Option<u64>,
        ) -> (Summary, Vec<(Digest, Damage)>) {
            self.pass_seeing(scope, persist, stop_after).0
        }

        /// `pass`, and what each part's `Start` announced (the cache directory's, then the
        /// bucket's).
        fn pass_seeing(&self, scope: &BucketScope, persist: bool, stop_after: Option<u64>) -> Seen {
            let stop = AtomicBool::new(false);
            let opts = Options {
                rate: None,
                persist,
            };
            let mut damaged = Vec::new();
            let mut starts = Vec::new();
            let sum = scrub::run_pass_with(&self.store, Some(scope), opts, &stop, |e| match e {
                Event::BucketDamaged(d, what) => damaged.push((d.clone(), what.clone())),
                Event::Damaged(..) => panic!("nothing in the cache directory is damaged"),
                Event::Start { objects, .. } => starts.push(objects),
                Event::Progress { objects, .. } => {
                    if starts.len() == 2 && Some(objects) == stop_after {
                        stop.store(true, Ordering::Relaxed);
                    }
                }
            })
            .unwrap();
            ((sum, damaged), starts)
        }

        fn present(&self, d: &Digest) -> bool {
            self.rt.block_on(self.bucket.head(d)).unwrap().is_some()
        }
    }

    /// A flipped object and one of another length are found, named, and taken out of the
    /// bucket into its quarantine; the whole ones stay, and the next pass finds nothing.
    #[test]
    fn damaged_objects_are_found_and_taken_out_of_the_bucket() {
        let s = setup();
        let good = s.put(&[1u8; 5000]);
        let flipped = s.put(&[2u8; 7000]);
        let cut = s.put(&[3u8; 3000]);
        let mut bytes = vec![2u8; 7000];
        bytes[6999] ^= 1;
        s.damage(&flipped, bytes.clone());
        s.damage(&cut, vec![3u8; 100]);
        let scope = s.scope(None);
        let (sum, mut damaged) = s.pass(&scope, false, None);
        assert!(sum.complete);
        assert_eq!((sum.objects, sum.damaged), (3, 2));
        assert_eq!(sum.bytes, 5000 + 7000 + 100);
        damaged.sort_by_key(|(d, _)| (d != &flipped, d.clone()));
        assert_eq!(
            damaged,
            [
                (
                    flipped.clone(),
                    Damage::Digest {
                        found: Digest::sha256_of(&bytes)
                    }
                ),
                (
                    cut.clone(),
                    Damage::Digest {
                        found: Digest::sha256_of(&[3u8; 100])
                    }
                ),
            ][..]
        );
        assert!(s.present(&good));
        assert!(!s.present(&flipped) && !s.present(&cut));
        let q = s.rt.block_on(s.bucket.quarantined()).unwrap();
        assert_eq!(q.len(), 2, "{q:?}");
        assert!(
            q.iter()
                .any(|(k, len)| k.contains(&flipped.hex()) && *len == 7000)
        );
        let c = s.store.blobs().counters().unwrap();
        assert_eq!(c.scrub_corrupt.load(Ordering::Relaxed), 2);
        let (sum, damaged) = s.pass(&scope, false, None);
        assert_eq!((sum.objects, damaged.len()), (1, 0));
    }

    /// A server restarted during the bucket's part goes on with the bucket where it was, without
    /// reading the cache directory again; the next pass covers both whole.
    #[test]
    fn a_pass_stopped_in_the_bucket_resumes_there() {
        let s = setup();
        for i in 0..4u8 {
            s.put(&[i; 1000]);
        }
        {
            let data = [9u8; 2000];
            let d = Digest::sha256_of(&data);
            let mut v = Verifier::new(d.algorithm());
            v.update(&data);
            let mut w = s.store.blobs().begin(&d).unwrap();
            w.write(&data).unwrap();
            w.commit(v.verify(&d).unwrap(), "up/team/app").unwrap();
        }
        let scope = s.scope(None);
        let ((sum, _), starts) = s.pass_seeing(&scope, true, Some(2));
        assert_eq!(starts, [1, 4]);
        assert_eq!((sum.objects, sum.complete), (1 + 2, false));
        let ((sum, _), starts) = s.pass_seeing(&scope, true, None);
        assert_eq!(
            starts,
            [0, 2],
            "the cache directory was done; the bucket goes on"
        );
        assert_eq!((sum.objects, sum.complete), (2, true));
        let ((sum, _), starts) = s.pass_seeing(&scope, true, None);
        assert_eq!(starts, [1, 4], "a new pass covers everything");
        assert!(sum.complete);
        // Stopped in the bucket again, then restarted without the bucket: the cache
        // directory's part is not taken for done.
        s.pass_seeing(&scope, true, Some(1));
        let stop = AtomicBool::new(false);
        let opts = Options {
            rate: None,
            persist: true,
        };
        let sum = scrub::run_pass(&s.store, opts, &stop, |_| {}).unwrap();
        assert_eq!((sum.objects, sum.complete), (1, true));
    }

    /// An object replaced by a whole copy between the listing and its read (a long pass, a
    /// fill that took a damaged copy out and uploaded a good one) is judged by its bytes: the
    /// listed length was the old object's, and a good copy is never taken out for it.
    #[test]
    fn a_whole_copy_under_a_stale_listing_is_left_alone() {
        let s = setup();
        let data = vec![4u8; 3000];
        let d = s.put(&data);
        s.damage(&d, vec![4u8; 100]);
        let key = object_store::path::Path::from(format!("cache/blobs/sha256/{}", d.hex()));
        let (raw, rt, asked) = (s.raw.clone(), s.rt.handle().clone(), AtomicU32::new(0));
        let target = d.clone();
        // Ownership is asked once at the listing and again as the object comes up: the good
        // copy lands in between.
        let owns: scrub::Owns = Box::new(move |x: &Digest| {
            if *x == target && asked.fetch_add(1, Ordering::SeqCst) == 1 {
                rt.block_on(raw.put(&key, data.clone().into())).unwrap();
            }
            true
        });
        let (sum, damaged) = s.pass(&s.scope(Some(owns)), false, None);
        assert_eq!(damaged, [], "the good copy was taken for damaged");
        assert_eq!((sum.objects, sum.damaged, sum.complete), (1, 0, true));
        assert!(s.present(&d), "the good copy is still in the bucket");
        assert!(s.rt.block_on(s.bucket.quarantined()).unwrap().is_empty());
    }

    /// A bucket that cannot be read ends the pass with its error, and the next pass checks the
    /// cache directory again instead of taking its part for done for as long as the bucket
    /// is down.
    #[test]
    fn a_failing_bucket_leaves_the_cache_directory_to_be_checked_again() {
        let s = setup();
        let data = [9u8; 2000];
        let d = Digest::sha256_of(&data);
        let mut v = Verifier::new(d.algorithm());
        v.update(&data);
        let mut w = s.store.blobs().begin(&d).unwrap();
        w.write(&data).unwrap();
        w.commit(v.verify(&d).unwrap(), "up/team/app").unwrap();
        s.put(&[1u8; 1000]);
        // Nothing listens on port 1: every call is refused at once.
        let down = object_store::aws::AmazonS3Builder::new()
            .with_endpoint("http://127.0.0.1:1")
            .with_allow_http(true)
            .with_bucket_name("cache")
            .with_region("garage")
            .with_access_key_id("test-key")
            .with_secret_access_key("test-secret")
            .with_retry(object_store::RetryConfig {
                max_retries: 0,
                ..Default::default()
            })
            .with_http_connector(crate::storage::s3_http::HyperConnector::default())
            .build()
            .unwrap();
        let down = BucketScope {
            bucket: Bucket::with_store(Arc::new(down), "cache", Arc::new(Metrics::new(&[]))),
            rt: s.rt.handle().clone(),
            owns: None,
        };
        let stop = AtomicBool::new(false);
        let opts = Options {
            rate: None,
            persist: true,
        };
        let mut starts = Vec::new();
        let failed = scrub::run_pass_with(&s.store, Some(&down), opts, &stop, |e| {
            if let Event::Start { objects, .. } = e {
                starts.push(objects);
            }
        });
        assert!(
            failed.is_err(),
            "a bucket refusing every call fails the pass"
        );
        assert_eq!(starts, [1], "the cache directory was checked first");
        let ((sum, _), starts) = s.pass_seeing(&s.scope(None), true, None);
        assert_eq!(starts, [1, 1], "the cache directory is checked again");
        assert_eq!((sum.objects, sum.complete), (2, true));
    }

    /// With replicas, each checks the blobs it owns: a pass reads only those.
    #[test]
    fn a_replica_reads_only_the_blobs_it_owns() {
        let s = setup();
        let ds: Vec<Digest> = (0..8u8).map(|i| s.put(&[i; 1000])).collect();
        let mine = |d: &Digest| d.hex().as_bytes()[0].is_multiple_of(2);
        let owned = ds.iter().filter(|d| mine(d)).count() as u64;
        assert!(owned > 0 && owned < 8, "a split of the test's blobs");
        let (sum, _) = s.pass(&s.scope(Some(Box::new(mine))), false, None);
        assert_eq!((sum.objects, sum.bytes), (owned, owned * 1000));
    }
}
