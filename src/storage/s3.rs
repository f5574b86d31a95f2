//! The bucket tier (`[storage] backend = "s3"`): blobs, manifests and the records the replicas
//! share, in one S3-compatible bucket under an optional key prefix.
//!
//! Key layout under the prefix:
//! - `blobs/<alg>/<hex>`: blob and manifest bytes, named by their digest;
//! - `tags/<upstream>/<repo>/<tag>`: a JSON list of `{digest, media_type, checked}` (unix ms);
//! - `links/<upstream>/<repo>/<alg>/<hex>`: empty; the repository is known to hold the blob;
//! - `access/<alg>/<hex>`: empty; its last-modified time is the blob's last read;
//! - `gc-clock`: empty; rewritten by each eviction pass to read the bucket's own clock.
//!
//! Atomicity comes from the store, not from us: a blob is a multipart upload completed only
//! after its proof matched (or one PUT of a small blob, sent only then), so nothing
//! unverified is ever visible, and an upload that is dropped or fails is aborted. The key is
//! the digest, so two replicas uploading one blob store the same bytes twice, harmlessly;
//! nothing relies on conditional writes, which Garage ignores.
//!
//! [`Bucket`] is the async API the mirror calls. [`S3Store`] puts it behind the blocking
//! [`BlobStore`] seam, so the bucket passes the same conformance suite as the other stores.

use super::integrity::{KEEP_BYTES, KEEP_FOR};
use super::{
    Access, Blob, BlobStore, BlobWriter, CommitError, ObjectRow, ReadAt, TagEntry, Usage,
    check_proof, s3_http::HyperConnector,
};
use crate::config::{ConfigError, StorageConfig};
use crate::metrics::{Metrics, StorageOp, StorageResult};
use crate::oci::{Digest, Verified, Verifier};
use bytes::Bytes;
use futures_util::stream::{self, BoxStream, FuturesUnordered};
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{
    BackoffConfig, GetOptions, MultipartUpload, ObjectMeta, ObjectStore, ObjectStoreExt,
    PutPayload, RetryConfig,
};
use parking_lot::{Mutex, RwLock};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::Instrument;

/// Size of every multipart part but the last. Equal parts, because some S3-compatible stores
/// (R2) require them; 8 MiB, above S3's 5 MiB minimum.
const PART_SIZE: usize = 8 << 20;
/// Parts of one upload being sent at once.
const PARTS_IN_FLIGHT: usize = 4;
/// Bytes written to an [`Upload`] and not yet acknowledged by the bucket, past which the upload
/// gives up: the fill it tees must never wait for the bucket, nor hold unbounded memory.
const MAX_PENDING: u64 = 64 << 20;
/// The same bound over all of a bucket's uploads at once: many slow cold layers must not add up
/// to gigabytes waiting for a slow bucket.
const MAX_PENDING_TOTAL: u64 = 256 << 20;
/// Records read whole (tag lists): a bigger one is not ours.
const RECORD_CAP: usize = 1 << 20;
/// Small PUTs (touches) sent at once.
const TOUCHES_AT_ONCE: usize = 8;

/// The bucket, shared by every replica. Cheap to clone.
#[derive(Clone)]
pub struct Bucket {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn ObjectStore>,
    /// Without leading or trailing `/`; empty for none.
    prefix: String,
    metrics: Arc<Metrics>,
    breaker: Breaker,
    /// Bytes waiting in all uploads, and the bound on them.
    pending_total: Arc<AtomicU64>,
    max_pending_total: u64,
}

/// The longest a HEAD or GET waits for the bucket's answer (its headers), retries included: a
/// bucket slower than this costs a client more than the upstream would.
const BUCKET_READ_DEADLINE: Duration = Duration::from_secs(3);

/// Failures in a row after which the bucket is left alone for [`BUCKET_PAUSE`].
const BUCKET_BREAK_AFTER: u32 = 3;
/// How long a failing bucket is left alone: calls fail at once meanwhile, so a bucket that is
/// down or hangs costs a pull nothing but the few calls that found it out. Then one more try.
const BUCKET_PAUSE: Duration = Duration::from_secs(10);

/// Counts failures in a row and, past the limit, refuses calls until the pause is over.
#[derive(Default)]
struct Breaker {
    failures: std::sync::atomic::AtomicU32,
    open_until: Mutex<Option<Instant>>,
}

impl Breaker {
    fn open(&self) -> bool {
        let mut until = self.open_until.lock();
        match *until {
            Some(t) if Instant::now() < t => true,
            Some(_) => {
                // The pause is over: this call is the one try; the others keep going without
                // the bucket until it answers, so a bucket still hanging costs one call a pause.
                *until = Some(Instant::now() + BUCKET_PAUSE);
                false
            }
            None => false,
        }
    }

    fn record(&self, ok: bool) {
        if ok {
            self.failures.store(0, Ordering::Relaxed);
            *self.open_until.lock() = None;
            return;
        }
        if self.failures.fetch_add(1, Ordering::Relaxed) + 1 >= BUCKET_BREAK_AFTER {
            let mut until = self.open_until.lock();
            if until.is_none() {
                tracing::warn!(pause = ?BUCKET_PAUSE, "the bucket keeps failing; leaving it alone for a while");
            }
            *until = Some(Instant::now() + BUCKET_PAUSE);
        }
    }
}

/// A blob read from the bucket.
pub struct BucketRead {
    /// The blob's whole length, whatever range was asked for.
    pub len: u64,
    pub body: BoxStream<'static, io::Result<Bytes>>,
}

// === impl Bucket ===

impl Bucket {
    /// The bucket of `[storage]` (backend = "s3"). Path-style addressing unless `path_style =
    /// false`, or no endpoint is set (AWS); plain HTTP only when the endpoint says `http://`;
    /// the configured credentials, else the environment's (`AWS_*`, instance metadata). Makes
    /// no request: a bucket that is down is found out by the first call.
    pub fn connect(cfg: &StorageConfig, metrics: Arc<Metrics>) -> Result<Bucket, ConfigError> {
        let store = object_store_of(cfg)?;
        let prefix = cfg.prefix.as_deref().unwrap_or("");
        let trimmed = prefix.trim_matches('/');
        if !trimmed.is_empty() {
            check_name("prefix", trimmed, true)
                .map_err(|e| ConfigError::Invalid(format!("storage.prefix: {e}")))?;
        }
        Ok(Bucket::with_store(store, prefix, metrics))
    }

    /// The bucket over any object store (tests: `object_store::memory::InMemory`). A prefix
    /// that cannot name keys makes every call fail with the reason.
    pub fn with_store(store: Arc<dyn ObjectStore>, prefix: &str, metrics: Arc<Metrics>) -> Bucket {
        Bucket {
            inner: Arc::new(Inner {
                store,
                prefix: prefix.trim_matches('/').to_owned(),
                metrics,
                breaker: Breaker::default(),
                pending_total: Arc::new(AtomicU64::new(0)),
                max_pending_total: MAX_PENDING_TOTAL,
            }),
        }
    }

    /// The length of a stored blob; `None` when it is not there.
    pub async fn head(&self, d: &Digest) -> io::Result<Option<u64>> {
        let path = self.inner.blob_path(d)?;
        Ok(self.inner.head(&path).await?.map(|m| m.size))
    }

    /// Bytes `range` (or all) of a blob as a stream, with the blob's whole length; `None`
    /// when it is not there. A range running past the end is cut at the end; one starting past
    /// it is an error.
    pub async fn get(
        &self,
        d: &Digest,
        range: Option<Range<u64>>,
    ) -> io::Result<Option<BucketRead>> {
        let path = self.inner.blob_path(d)?;
        if let Some(r) = range.as_ref().filter(|r| r.start >= r.end) {
            // The store refuses empty ranges; the answer needs only the length.
            let Some(len) = self.head(d).await? else {
                return Ok(None);
            };
            if r.start > len {
                return Err(past_the_end(d, r.start, len));
            }
            return Ok(Some(BucketRead {
                len,
                body: stream::empty().boxed(),
            }));
        }
        let opts = GetOptions::new().with_range(range.clone());
        match self
            .inner
            .call(StorageOp::Get, self.inner.store.get_opts(&path, opts))
            .await
        {
            Ok(r) => {
                let len = r.meta.size;
                let body = r
                    .into_stream()
                    .map_err(|e| store_error(StorageOp::Get, e))
                    .boxed();
                Ok(Some(BucketRead { len, body }))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => match range {
                // Told apart only now: a ranged GET past the end fails without saying why.
                Some(r) => match self.head(d).await? {
                    Some(len) if r.start >= len => Err(past_the_end(d, r.start, len)),
                    Some(_) => Err(store_error(StorageOp::Get, e)),
                    None => Ok(None),
                },
                None => Err(store_error(StorageOp::Get, e)),
            },
        }
    }

    /// A whole small object (a manifest) in memory; `None` when it is not there, an error when
    /// it is larger than `cap`.
    pub async fn get_small(&self, d: &Digest, cap: usize) -> io::Result<Option<Bytes>> {
        let path = self.inner.blob_path(d)?;
        self.inner.get_small(&path, cap).await
    }

    /// Starts a multipart upload of `d` that streams while the fill runs; see [`Upload`].
    /// Called outside a tokio runtime, it returns an upload that has already failed.
    pub fn upload(&self, d: &Digest) -> Upload {
        Upload::start(self.inner.clone(), d.clone())
    }

    /// Stores a small object (a manifest) whose bytes are in memory, in one PUT. The bytes are
    /// hashed again: a proof about other bytes stores nothing.
    pub async fn put_small(&self, bytes: Bytes, proof: &Verified) -> io::Result<()> {
        let mut v = Verifier::new(proof.digest().algorithm());
        v.update(&bytes);
        if v.verify(proof.digest()).ok().as_ref() != Some(proof) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "the proof is for {} ({} bytes), not these {} bytes",
                    proof.digest(),
                    proof.len(),
                    bytes.len()
                ),
            ));
        }
        let path = self.inner.blob_path(proof.digest())?;
        self.inner.put(&path, bytes).await
    }

    /// Removes a blob and its access marker. Removing what is not there is not an error.
    pub async fn delete(&self, d: &Digest) -> io::Result<()> {
        self.inner.delete(&self.inner.blob_path(d)?).await?;
        self.inner.delete(&self.inner.access_path(d)?).await
    }

    /// Takes a damaged blob out of service, so the next pull fetches it again: a copy goes to
    /// `quarantine/<alg>-<hex>-<unix seconds>` for a person to look at, then the blob and its
    /// access marker are removed. The copy is made inside the bucket (no bytes travel), and
    /// skipped for a blob larger than the quarantine's bound, which would only push the rest
    /// out; a copy that fails never keeps the blob in service. The quarantine keeps within
    /// [`KEEP_FOR`] and [`KEEP_BYTES`], oldest first out, as the cache directory's does, and is
    /// not counted in `max_size`.
    pub async fn quarantine(&self, d: &Digest, size: u64) -> io::Result<()> {
        let from = self.inner.blob_path(d)?;
        if size <= KEEP_BYTES {
            let stamp = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|t| t.as_secs())
                .unwrap_or(0);
            let to = self.inner.path(&format!(
                "quarantine/{}-{}-{stamp}",
                d.algorithm().as_str(),
                d.hex()
            ))?;
            let copied = self
                .inner
                .call(StorageOp::Copy, self.inner.store.copy(&from, &to))
                .await;
            match copied {
                Ok(()) => {}
                // Removed meanwhile (gc, another replica's scrub): nothing left to take.
                Err(object_store::Error::NotFound { .. }) => return Ok(()),
                Err(e) => {
                    tracing::warn!(digest = %d, error = %e, "could not copy a damaged blob into the bucket's quarantine; removing it anyway")
                }
            }
        }
        self.delete(d).await?;
        if let Err(e) = self
            .trim_quarantine(SystemTime::now(), KEEP_FOR, KEEP_BYTES)
            .await
        {
            tracing::warn!(error = %e, "could not trim the bucket's quarantine");
        }
        Ok(())
    }

    /// What the bucket's quarantine holds: (key after the prefix, size).
    pub async fn quarantined(&self) -> io::Result<Vec<(String, u64)>> {
        let listed = self.inner.list("quarantine").await?;
        Ok(listed
            .iter()
            .filter_map(|m| Some((self.inner.rel(&m.location)?.to_owned(), m.size)))
            .collect())
    }

    async fn trim_quarantine(
        &self,
        now: SystemTime,
        keep_for: Duration,
        keep_bytes: u64,
    ) -> io::Result<()> {
        let mut listed = self.inner.list("quarantine").await?;
        listed.sort_by_key(|m| m.last_modified);
        let mut total: u64 = listed.iter().map(|m| m.size).sum();
        for m in listed {
            let old = now.duration_since(system_time(&m)).unwrap_or_default() > keep_for;
            if old || total > keep_bytes {
                self.inner.delete(&m.location).await?;
                total -= m.size;
            }
        }
        Ok(())
    }

    /// Replaces what is known of `upstream`'s `repo:tag`, one entry per media type.
    pub async fn put_tag(
        &self,
        upstream: &str,
        repo: &str,
        tag: &str,
        entries: &[TagEntry],
    ) -> io::Result<()> {
        let path = self.inner.tag_path(upstream, repo, tag)?;
        let records: Vec<TagRecord> = entries
            .iter()
            .map(|e| TagRecord {
                digest: e.digest.to_string(),
                media_type: e.media_type.clone(),
                checked: super::meta::millis(e.checked),
            })
            .collect();
        let json = serde_json::to_vec(&records).map_err(io::Error::other)?;
        self.inner.put(&path, json.into()).await
    }

    /// What is known of `upstream`'s `repo:tag`; empty when nothing is.
    pub async fn tags(&self, upstream: &str, repo: &str, tag: &str) -> io::Result<Vec<TagEntry>> {
        let path = self.inner.tag_path(upstream, repo, tag)?;
        let Some(json) = self.inner.get_small(&path, RECORD_CAP).await? else {
            return Ok(Vec::new());
        };
        let bad = |why: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("tag record {path}: {why}"),
            )
        };
        let records: Vec<TagRecord> =
            serde_json::from_slice(&json).map_err(|e| bad(e.to_string()))?;
        records
            .into_iter()
            .map(|r| {
                Ok(TagEntry {
                    digest: r.digest.parse().map_err(|e| bad(format!("{e}")))?,
                    media_type: r.media_type,
                    checked: UNIX_EPOCH + Duration::from_millis(r.checked),
                })
            })
            .collect()
    }

    /// Records that `upstream`'s `repo` holds `d`.
    pub async fn put_link(&self, upstream: &str, repo: &str, d: &Digest) -> io::Result<()> {
        let path = self.inner.link_path(upstream, repo, d)?;
        self.inner.put(&path, Bytes::new()).await
    }

    /// Whether `upstream`'s `repo` is recorded as holding `d`.
    pub async fn linked(&self, upstream: &str, repo: &str, d: &Digest) -> io::Result<bool> {
        let path = self.inner.link_path(upstream, repo, d)?;
        Ok(self.inner.head(&path).await?.is_some())
    }

    /// Every link, as `(upstream, repo, digest)`: for a replica whose cache directory is empty.
    /// Keys that are not links (written by something else) are skipped with a warning.
    pub async fn links(&self) -> io::Result<Vec<(String, String, Digest)>> {
        let listed = self.inner.list("links").await?;
        let mut links = Vec::with_capacity(listed.len());
        for meta in listed {
            let parsed = self.inner.rel(&meta.location).and_then(|rel| {
                let rest = rel.strip_prefix("links/")?;
                let (upstream, rest) = rest.split_once('/')?;
                let (rest, hex) = rest.rsplit_once('/')?;
                let (repo, alg) = rest.rsplit_once('/')?;
                let d = format!("{alg}:{hex}").parse().ok()?;
                Some((upstream.to_owned(), repo.to_owned(), d))
            });
            match parsed {
                Some(link) => links.push(link),
                None => tracing::warn!(key = %meta.location, "not a link record; skipped"),
            }
        }
        Ok(links)
    }

    /// Marks blobs as read now (one small PUT each), so every replica's reads keep them in
    /// the shared LRU.
    pub async fn touch(&self, digests: &[Digest]) -> io::Result<()> {
        let paths = digests
            .iter()
            .map(|d| self.inner.access_path(d))
            .collect::<io::Result<Vec<_>>>()?;
        stream::iter(paths)
            .map(|p| async move { self.inner.put(&p, Bytes::new()).await })
            .buffer_unordered(TOUCHES_AT_ONCE)
            .try_collect::<()>()
            .await
    }

    /// Every blob with its size and last access: the later of its own last-modified time and
    /// its access marker's. `repo` is empty: the bucket does not record who read a blob.
    pub async fn objects(&self) -> io::Result<Vec<ObjectRow>> {
        Ok(self.listing().await?.0)
    }

    /// One eviction pass: while the total exceeds `max_size`, removes the least recently
    /// accessed blobs (and their access markers), never one accessed or written within
    /// `grace` of the bucket's clock (a replica reading or filling a blob keeps touching it).
    ///
    /// Safe on several replicas at once, without a lock: each plans from its own listing and
    /// re-reads a victim's times just before deleting it; deletes are idempotent, and a victim
    /// another pass removed first still counts toward the total, so passes racing remove the
    /// same victims and nothing more. Access markers older than `grace` whose blob is gone
    /// are removed too. Returns the count and bytes of blobs this pass deleted (a victim two
    /// passes delete at the same moment is counted by both).
    pub async fn gc(&self, max_size: u64, grace: Duration) -> io::Result<(u64, u64)> {
        self.gc_sparing(max_size, grace, &HashSet::new()).await
    }

    /// [`gc`](Self::gc), never removing a blob in `keep` (pinned images).
    pub async fn gc_sparing(
        &self,
        max_size: u64,
        grace: Duration,
        keep: &HashSet<Digest>,
    ) -> io::Result<(u64, u64)> {
        let now = self.bucket_now().await?;
        let cutoff = now.checked_sub(grace).unwrap_or(UNIX_EPOCH);
        let (mut rows, orphans) = self.listing().await?;
        let mut total: u64 = rows.iter().map(|r| r.size).sum();
        rows.sort_by_key(|r| r.last_access);
        let (mut count, mut bytes) = (0, 0);
        for row in rows {
            if total <= max_size || may_be_after(row.last_access, cutoff) {
                break;
            }
            if keep.contains(&row.digest) {
                continue;
            }
            match self.last_access(&row.digest).await? {
                // Gone already (another pass, or a delete): it no longer counts.
                None => total = total.saturating_sub(row.size),
                // Read or rewritten since the listing.
                Some(t) if may_be_after(t, cutoff) => {}
                Some(_) => {
                    self.delete(&row.digest).await?;
                    total = total.saturating_sub(row.size);
                    count += 1;
                    bytes += row.size;
                }
            }
        }
        for (path, t) in orphans {
            if !may_be_after(t, cutoff) {
                self.inner.delete(&path).await?;
            }
        }
        Ok((count, bytes))
    }

    /// Blobs as rows, and access markers without a blob (with their times).
    async fn listing(&self) -> io::Result<(Vec<ObjectRow>, Vec<(Path, SystemTime)>)> {
        let (blobs, markers) =
            tokio::try_join!(self.inner.list("blobs"), self.inner.list("access"))?;
        let mut access: HashMap<Digest, (Path, SystemTime)> = markers
            .into_iter()
            .filter_map(|m| {
                let d = self.inner.digest_of(&m.location, "access/")?;
                Some((d, (m.location.clone(), system_time(&m))))
            })
            .collect();
        let mut rows = Vec::with_capacity(blobs.len());
        for m in blobs {
            let Some(digest) = self.inner.digest_of(&m.location, "blobs/") else {
                tracing::warn!(key = %m.location, "not a blob key; skipped");
                continue;
            };
            let written = system_time(&m);
            let read = access.remove(&digest).map(|(_, t)| t);
            rows.push(ObjectRow {
                digest,
                size: m.size,
                last_access: read.map_or(written, |r| r.max(written)),
                repo: String::new(),
            });
        }
        Ok((rows, access.into_values().collect()))
    }

    /// A blob's last access as the bucket says now; `None` when the blob is gone.
    async fn last_access(&self, d: &Digest) -> io::Result<Option<SystemTime>> {
        let Some(blob) = self.inner.head(&self.inner.blob_path(d)?).await? else {
            return Ok(None);
        };
        let marker = self.inner.head(&self.inner.access_path(d)?).await?;
        let written = system_time(&blob);
        Ok(Some(
            marker.map_or(written, |m| system_time(&m).max(written)),
        ))
    }

    /// The bucket's clock: replicas' clocks differ from it and from each other, and `grace`
    /// must be measured on the clock the access times come from.
    async fn bucket_now(&self) -> io::Result<SystemTime> {
        let path = self.inner.path("gc-clock")?;
        self.inner.put(&path, Bytes::new()).await?;
        match self.inner.head(&path).await? {
            Some(m) => Ok(system_time(&m)),
            None => Err(io::Error::other(
                "the bucket lost gc-clock right after it was written",
            )),
        }
    }
}

/// The object store of `[storage]` (backend = "s3"), as [`Bucket::connect`] configures it,
/// without the prefix: what tests and tools reach the bucket's keys through directly.
pub fn object_store_of(cfg: &StorageConfig) -> Result<Arc<dyn ObjectStore>, ConfigError> {
    let invalid = |key: &str, why: String| ConfigError::Invalid(format!("storage.{key}: {why}"));
    let bucket = cfg
        .bucket
        .as_deref()
        .ok_or_else(|| invalid("bucket", "required with backend = \"s3\"".into()))?;
    let credentials = cfg.credentials()?;
    // The environment is read only when no credentials are configured: a stray
    // AWS_SESSION_TOKEN would otherwise be signed in with the configured key.
    let mut b = match credentials {
        Some(_) => AmazonS3Builder::new(),
        None => AmazonS3Builder::from_env(),
    };
    b = b
        .with_bucket_name(bucket)
        .with_http_connector(HyperConnector::default())
        .with_retry(retry_config());
    if let Some(region) = &cfg.region {
        b = b.with_region(region);
    }
    let virtual_hosted = match cfg.path_style {
        Some(path_style) => !path_style,
        None => cfg.endpoint.is_none(),
    };
    b = b.with_virtual_hosted_style_request(virtual_hosted);
    if let Some(endpoint) = &cfg.endpoint {
        let mut url = url::Url::parse(endpoint)
            .map_err(|e| invalid("endpoint", format!("{endpoint:?}: {e}")))?;
        b = b.with_allow_http(url.scheme() == "http");
        // object_store takes a virtual-hosted endpoint with the bucket already in it.
        if virtual_hosted {
            let host = match url.host() {
                Some(url::Host::Domain(d)) => d.to_owned(),
                _ => {
                    return Err(invalid(
                        "path_style",
                        format!(
                            "false needs an endpoint with a DNS name, not {endpoint:?} \
                             (virtual-hosted addressing puts the bucket in the host name)"
                        ),
                    ));
                }
            };
            url.set_host(Some(&format!("{bucket}.{host}")))
                .map_err(|e| invalid("bucket", format!("{bucket:?} in a host name: {e}")))?;
        }
        b = b.with_endpoint(url.as_str().trim_end_matches('/'));
    }
    if let Some((id, secret)) = credentials {
        b = b.with_access_key_id(id).with_secret_access_key(secret);
    }
    let store = b
        .build()
        .map_err(|e| ConfigError::Invalid(format!("storage: {e}")))?;
    Ok(Arc::new(store))
}

fn retry_config() -> RetryConfig {
    // A few quick retries, not object_store's ten over three minutes: a bucket that fails
    // costs caching, and the pull goes on without it.
    RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries: 3,
        retry_timeout: Duration::from_secs(10),
    }
}

fn past_the_end(d: &Digest, start: u64, len: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("range starts at {start}, past the end of {d} ({len} bytes)"),
    )
}

/// Whether `t` may be later than `than`. Times from a HEAD are whole seconds (HTTP dates), so
/// a whole-second time stands for anything up to a second later: the doubt spares the blob.
fn may_be_after(t: SystemTime, than: SystemTime) -> bool {
    let whole_second = t
        .duration_since(UNIX_EPOCH)
        .is_ok_and(|d| d.subsec_nanos() == 0);
    let latest = if whole_second {
        t + Duration::from_secs(1)
    } else {
        t
    };
    latest > than
}

fn system_time(m: &ObjectMeta) -> SystemTime {
    u64::try_from(m.last_modified.timestamp_micros())
        .map_or(UNIX_EPOCH, |us| UNIX_EPOCH + Duration::from_micros(us))
}

#[derive(serde::Serialize, serde::Deserialize)]
struct TagRecord {
    digest: String,
    media_type: String,
    /// Unix milliseconds.
    checked: u64,
}

/// Checks a name that becomes part of a key: not empty, and (if `slashes`) `/`-separated
/// segments, none empty, `.` or `..`; no control characters. Names are validated before they
/// reach here; this keeps a bug elsewhere from reaching outside its key space.
fn check_name(what: &str, name: &str, slashes: bool) -> io::Result<()> {
    let segment_ok =
        |s: &str| !s.is_empty() && s != "." && s != ".." && !s.chars().any(|c| c.is_control());
    let ok = if slashes {
        name.split('/').all(segment_ok)
    } else {
        !name.contains('/') && segment_ok(name)
    };
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} {name:?} cannot be part of a bucket key"),
        ))
    }
}

fn store_error(op: StorageOp, e: object_store::Error) -> io::Error {
    let kind = match e {
        object_store::Error::NotFound { .. } => io::ErrorKind::NotFound,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, format!("bucket {}: {e}", op.as_str()))
}

// === impl Inner ===

impl Inner {
    /// Every request to the bucket goes through here, to be counted and timed.
    async fn call<T>(
        &self,
        op: StorageOp,
        request: impl Future<Output = object_store::Result<T>>,
    ) -> object_store::Result<T> {
        let started = Instant::now();
        if self.breaker.open() {
            self.metrics
                .storage_request(op, StorageResult::Skipped, started);
            return Err(object_store::Error::Generic {
                store: "bucket",
                source: "skipped: the bucket failed repeatedly just before".into(),
            });
        }
        // A read is on a client's way; the retries inside it must not outlast the deadline.
        let r = match op {
            StorageOp::Head | StorageOp::Get => {
                match tokio::time::timeout(BUCKET_READ_DEADLINE, request).await {
                    Ok(r) => r,
                    Err(_) => Err(object_store::Error::Generic {
                        store: "bucket",
                        source: format!("no answer within {BUCKET_READ_DEADLINE:?}").into(),
                    }),
                }
            }
            _ => request.await,
        };
        let result = match &r {
            Ok(_) => StorageResult::Ok,
            Err(object_store::Error::NotFound { .. }) => StorageResult::NotFound,
            Err(_) => StorageResult::Error,
        };
        self.breaker.record(result != StorageResult::Error);
        self.metrics.storage_request(op, result, started);
        r
    }

    fn path(&self, rel: &str) -> io::Result<Path> {
        let full = if self.prefix.is_empty() {
            rel.to_owned()
        } else {
            format!("{}/{rel}", self.prefix)
        };
        check_name("key", &full, true)?;
        Path::parse(&full).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    }

    /// A key's part after the prefix.
    fn rel<'a>(&self, p: &'a Path) -> Option<&'a str> {
        let s = p.as_ref();
        if self.prefix.is_empty() {
            Some(s)
        } else {
            s.strip_prefix(self.prefix.as_str())?.strip_prefix('/')
        }
    }

    /// The digest named by `<dir><alg>/<hex>`.
    fn digest_of(&self, p: &Path, dir: &str) -> Option<Digest> {
        let (alg, hex) = self.rel(p)?.strip_prefix(dir)?.split_once('/')?;
        format!("{alg}:{hex}").parse().ok()
    }

    fn blob_path(&self, d: &Digest) -> io::Result<Path> {
        self.path(&format!("blobs/{}/{}", d.algorithm().as_str(), d.hex()))
    }

    fn access_path(&self, d: &Digest) -> io::Result<Path> {
        self.path(&format!("access/{}/{}", d.algorithm().as_str(), d.hex()))
    }

    fn tag_path(&self, upstream: &str, repo: &str, tag: &str) -> io::Result<Path> {
        check_name("upstream", upstream, false)?;
        check_name("repository", repo, true)?;
        check_name("tag", tag, false)?;
        self.path(&format!("tags/{upstream}/{repo}/{tag}"))
    }

    fn link_path(&self, upstream: &str, repo: &str, d: &Digest) -> io::Result<Path> {
        check_name("upstream", upstream, false)?;
        check_name("repository", repo, true)?;
        self.path(&format!(
            "links/{upstream}/{repo}/{}/{}",
            d.algorithm().as_str(),
            d.hex()
        ))
    }

    async fn head(&self, path: &Path) -> io::Result<Option<ObjectMeta>> {
        match self.call(StorageOp::Head, self.store.head(path)).await {
            Ok(m) => Ok(Some(m)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_error(StorageOp::Head, e)),
        }
    }

    async fn put(&self, path: &Path, bytes: Bytes) -> io::Result<()> {
        self.call(StorageOp::Put, self.store.put(path, bytes.into()))
            .await
            .map(drop)
            .map_err(|e| store_error(StorageOp::Put, e))
    }

    async fn delete(&self, path: &Path) -> io::Result<()> {
        match self.call(StorageOp::Delete, self.store.delete(path)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_error(StorageOp::Delete, e)),
        }
    }

    async fn list(&self, dir: &str) -> io::Result<Vec<ObjectMeta>> {
        let prefix = self.path(dir)?;
        self.call(
            StorageOp::List,
            self.store.list(Some(&prefix)).try_collect::<Vec<_>>(),
        )
        .await
        .map_err(|e| store_error(StorageOp::List, e))
    }

    async fn get_small(&self, path: &Path, cap: usize) -> io::Result<Option<Bytes>> {
        let r = match self.call(StorageOp::Get, self.store.get(path)).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(store_error(StorageOp::Get, e)),
        };
        if r.meta.size > cap as u64 {
            return Err(io::Error::other(format!(
                "{path} is {} bytes, more than the {cap} expected",
                r.meta.size
            )));
        }
        // Within the cap, checked above.
        let mut buf = Vec::with_capacity(r.meta.size as usize);
        let mut body = r.into_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| store_error(StorageOp::Get, e))?;
            if buf.len() + chunk.len() > cap {
                return Err(io::Error::other(format!(
                    "{path} grew past {cap} bytes while read"
                )));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(Some(buf.into()))
    }
}

// === impl Upload ===

/// A blob being uploaded while its fill runs. [`write`](Self::write) never waits: parts
/// (8 MiB, 4 at once) are sent by a spawned task. When the bucket falls 64 MiB behind, or a
/// request fails, the upload is aborted and every later `write` is an error: the fill carries
/// on without the bucket. A blob smaller than one part is sent in a single PUT by
/// [`finish`](Self::finish) instead.
///
/// Nothing is visible in the bucket before `finish` has checked the proof. Dropping an
/// unfinished upload aborts it in the background.
pub struct Upload {
    digest: Digest,
    written: u64,
    tx: Option<mpsc::UnboundedSender<Msg>>,
    shared: Arc<Shared>,
    task: Option<JoinHandle<io::Result<()>>>,
    /// `Inner::max_pending_total`.
    max_total: u64,
}

enum Msg {
    Data(Bytes),
    /// The proof matched: complete the upload.
    Finish,
}

struct Shared {
    /// Bytes written and not yet acknowledged by the bucket.
    pending: AtomicU64,
    /// The bucket's count of bytes waiting in all uploads, which this one's are part of.
    total: Arc<AtomicU64>,
    failed: AtomicBool,
    /// Why, once `failed`.
    why: Mutex<String>,
    /// Wakes the task when the upload is given up, even while it waits for parts in flight.
    given_up: tokio::sync::Notify,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Whatever never reached the bucket no longer waits for it.
        self.total
            .fetch_sub(*self.pending.get_mut(), Ordering::AcqRel);
    }
}

impl Shared {
    fn new(total: Arc<AtomicU64>) -> Shared {
        Shared {
            pending: AtomicU64::new(0),
            total,
            failed: AtomicBool::new(false),
            why: Mutex::new(String::new()),
            given_up: tokio::sync::Notify::new(),
        }
    }

    /// `len` bytes reached the bucket.
    fn sent(&self, len: u64) {
        self.pending.fetch_sub(len, Ordering::AcqRel);
        self.total.fetch_sub(len, Ordering::AcqRel);
    }

    fn fail(&self, why: String) {
        let mut w = self.why.lock();
        if !self.failed.swap(true, Ordering::AcqRel) {
            *w = why;
            self.given_up.notify_one();
        }
    }

    fn error(&self, digest: &Digest) -> io::Error {
        io::Error::other(format!(
            "upload of {digest} to the bucket failed: {}",
            self.why.lock()
        ))
    }
}

impl Upload {
    fn start(inner: Arc<Inner>, digest: Digest) -> Upload {
        let shared = Arc::new(Shared::new(inner.pending_total.clone()));
        let max_total = inner.max_pending_total;
        let mut upload = Upload {
            digest: digest.clone(),
            written: 0,
            tx: None,
            shared: shared.clone(),
            task: None,
            max_total,
        };
        let Ok(rt) = Handle::try_current() else {
            shared.fail("no tokio runtime to upload from".into());
            return upload;
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let span = tracing::debug_span!("upload", digest = %digest);
        upload.tx = Some(tx);
        upload.task = Some(rt.spawn(run_upload(inner, digest, rx, shared).instrument(span)));
        upload
    }

    /// Bytes accepted so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Queues `data` for the bucket; never waits. An error means the upload has been given up
    /// (the bucket is too slow or failed), and it stays given up.
    pub fn write(&mut self, data: Bytes) -> io::Result<()> {
        if self.shared.failed.load(Ordering::Acquire) {
            return Err(self.shared.error(&self.digest));
        }
        let Some(tx) = &self.tx else {
            return Err(self.shared.error(&self.digest));
        };
        let len = data.len() as u64;
        let pending = self.shared.pending.fetch_add(len, Ordering::AcqRel) + len;
        let total = self.shared.total.fetch_add(len, Ordering::AcqRel) + len;
        if pending > MAX_PENDING || total > self.max_total {
            self.shared.fail(format!(
                "the bucket is too slow: {pending} bytes waiting here, {total} in all uploads (bounds {MAX_PENDING} and {})",
                self.max_total
            ));
            self.tx = None;
            return Err(self.shared.error(&self.digest));
        }
        if tx.send(Msg::Data(data)).is_err() {
            // The task ended early, and said why.
            self.tx = None;
            return Err(self.shared.error(&self.digest));
        }
        self.written += len;
        Ok(())
    }

    /// Makes the blob visible, if `proof` is for exactly the digest and the bytes written;
    /// otherwise aborts the upload and returns the mismatch. Waits for the parts still being
    /// sent. If this future is dropped after the proof was checked, the upload still completes.
    pub async fn finish(mut self, proof: &Verified) -> io::Result<()> {
        // On any early return, `self` drops unfinished, which aborts the upload.
        check_proof(&self.digest, self.written, proof)?;
        if self.shared.failed.load(Ordering::Acquire) {
            return Err(self.shared.error(&self.digest));
        }
        let (Some(tx), Some(task)) = (self.tx.take(), self.task.take()) else {
            return Err(self.shared.error(&self.digest));
        };
        if tx.send(Msg::Finish).is_err() {
            return Err(self.shared.error(&self.digest));
        }
        match task.await {
            Ok(r) => r,
            Err(e) => Err(io::Error::other(format!(
                "upload of {} to the bucket: {e}",
                self.digest
            ))),
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if self.tx.take().is_some() {
            // Tells the task not to send what is still queued before it sees the channel close.
            self.shared.fail("dropped unfinished".into());
        }
    }
}

/// The upload's task: sends parts as they fill, then completes, or aborts.
async fn run_upload(
    inner: Arc<Inner>,
    digest: Digest,
    mut rx: mpsc::UnboundedReceiver<Msg>,
    shared: Arc<Shared>,
) -> io::Result<()> {
    let mut multipart = None;
    let outcome = pump(&inner, &digest, &mut rx, &shared, &mut multipart).await;
    let error = match outcome {
        Ok(true) => return Ok(()),
        Ok(false) => {
            shared.fail("dropped unfinished".into());
            shared.error(&digest)
        }
        Err(e) => {
            shared.fail(e.to_string());
            e
        }
    };
    drop(rx);
    if let Some(mut upload) = multipart {
        let aborted: object_store::Result<()> = inner.call(StorageOp::Abort, upload.abort()).await;
        if let Err(e) = aborted {
            // The parts stay until the bucket's lifecycle rule (if any) removes them; they
            // are never visible as an object.
            tracing::warn!(digest = %digest, error = %e, "could not abort an upload");
        }
    }
    Err(error)
}

/// Streams the queued bytes out as parts. Returns whether the upload was completed (false:
/// it was dropped or given up unfinished). `multipart` is left holding the upload, if one was
/// started, for the caller to abort.
async fn pump(
    inner: &Inner,
    digest: &Digest,
    rx: &mut mpsc::UnboundedReceiver<Msg>,
    shared: &Shared,
    multipart: &mut Option<Box<dyn MultipartUpload>>,
) -> io::Result<bool> {
    let path = inner.blob_path(digest)?;
    let mut part: Vec<Bytes> = Vec::new();
    let mut part_len = 0;
    let mut in_flight = FuturesUnordered::new();
    loop {
        if shared.failed.load(Ordering::Acquire) {
            return Ok(false);
        }
        tokio::select! {
            () = shared.given_up.notified() => return Ok(false),
            Some((len, sent)) = in_flight.next(), if !in_flight.is_empty() => {
                let sent: object_store::Result<()> = sent;
                sent.map_err(|e| store_error(StorageOp::Upload, e))?;
                shared.sent(len);
            }
            msg = rx.recv(), if in_flight.len() < PARTS_IN_FLIGHT => match msg {
                Some(Msg::Data(mut data)) => {
                    while !data.is_empty() {
                        let take = (PART_SIZE - part_len).min(data.len());
                        part.push(data.split_to(take));
                        part_len += take;
                        if part_len == PART_SIZE {
                            let upload = match multipart {
                                Some(u) => u,
                                None => multipart.insert(start_multipart(inner, &path).await?),
                            };
                            in_flight.push(send_part(inner, upload, part.drain(..).collect()));
                            part_len = 0;
                        }
                    }
                }
                Some(Msg::Finish) => break,
                None => return Ok(false),
            },
        }
    }
    let payload: PutPayload = part.drain(..).collect();
    let Some(upload) = multipart else {
        inner
            .call(StorageOp::Put, inner.store.put(&path, payload))
            .await
            .map_err(|e| store_error(StorageOp::Put, e))?;
        return Ok(true);
    };
    if part_len > 0 {
        in_flight.push(send_part(inner, upload, payload));
    }
    while let Some((len, sent)) = in_flight.next().await {
        sent.map_err(|e| store_error(StorageOp::Upload, e))?;
        shared.sent(len);
    }
    inner
        .call(StorageOp::Complete, upload.complete())
        .await
        .map_err(|e| store_error(StorageOp::Complete, e))?;
    // Some stores date a multipart object from the start of its upload; the access marker
    // dates it from now, so a long fill is not the oldest blob in the bucket as it appears.
    if let Err(e) = inner.put(&inner.access_path(digest)?, Bytes::new()).await {
        tracing::warn!(digest = %digest, error = %e, "could not mark a new blob as read");
    }
    Ok(true)
}

/// Sends one part; resolves to its length and outcome.
fn send_part<'a>(
    inner: &'a Inner,
    upload: &mut Box<dyn MultipartUpload>,
    payload: PutPayload,
) -> impl Future<Output = (u64, object_store::Result<()>)> + 'a {
    let len = payload.content_length() as u64;
    let sent = inner.call(StorageOp::Upload, upload.put_part(payload));
    async move { (len, sent.await) }
}

async fn start_multipart(inner: &Inner, path: &Path) -> io::Result<Box<dyn MultipartUpload>> {
    inner
        .call(StorageOp::Upload, inner.store.put_multipart(path))
        .await
        .map_err(|e| store_error(StorageOp::Upload, e))
}

// === impl S3Store ===

/// The bucket behind the blocking [`BlobStore`] seam: every method waits on `rt`, so call
/// them from blocking contexts only, never from a task of `rt`.
///
/// Unlike the filesystem, the bucket cannot keep a removed blob readable for a reader that
/// holds it: such a reader gets an error, never wrong bytes. A fill's [`BlobWriter::reader`]
/// keeps what is written in memory until the commit, so the bucket suits followers only
/// through the local tier, which is how the mirror uses it.
pub struct S3Store {
    bucket: Bucket,
    rt: Handle,
    known: Arc<Mutex<Known>>,
}

/// The blobs this store knows of, for `usage`: those listed at start, plus commits, minus
/// removals.
#[derive(Default)]
struct Known {
    sizes: HashMap<Digest, u64>,
    bytes: u64,
}

impl Known {
    fn add(&mut self, d: &Digest, size: u64) {
        if self.sizes.insert(d.clone(), size).is_none() {
            self.bytes += size;
        }
    }

    fn remove(&mut self, d: &Digest) {
        if let Some(size) = self.sizes.remove(d) {
            self.bytes -= size;
        }
    }
}

impl S3Store {
    /// Lists the bucket for the usage figures. Blocking.
    pub fn new(bucket: Bucket, rt: Handle) -> io::Result<S3Store> {
        let mut known = Known::default();
        for row in rt.block_on(bucket.objects())? {
            known.add(&row.digest, row.size);
        }
        Ok(S3Store {
            bucket,
            rt,
            known: Arc::new(Mutex::new(known)),
        })
    }
}

impl BlobStore for S3Store {
    fn stat(&self, digest: &Digest) -> io::Result<Option<u64>> {
        self.rt.block_on(self.bucket.head(digest))
    }

    fn open(&self, digest: &Digest, access: Access) -> io::Result<Option<Blob>> {
        let Some(len) = self.rt.block_on(self.bucket.head(digest))? else {
            return Ok(None);
        };
        if access == Access::Read {
            self.rt
                .block_on(self.bucket.touch(std::slice::from_ref(digest)))?;
        }
        Ok(Some(Blob {
            reader: Arc::new(S3Reader {
                bucket: self.bucket.clone(),
                rt: self.rt.clone(),
                digest: digest.clone(),
                len,
            }),
            len,
            // The bucket is only written through verified uploads; a fill from it is hashed.
            verified: true,
        }))
    }

    fn begin(&self, digest: &Digest) -> io::Result<Box<dyn BlobWriter>> {
        let upload = {
            let _in_rt = self.rt.enter();
            self.bucket.upload(digest)
        };
        Ok(Box::new(S3Writer {
            store: S3Store {
                bucket: self.bucket.clone(),
                rt: self.rt.clone(),
                known: self.known.clone(),
            },
            digest: digest.clone(),
            upload: Some(upload),
            written: 0,
            sealed: false,
            fill: Mutex::new(None),
        }))
    }

    /// Re-reads the access times from one fresh listing, not a HEAD per row: a listing dates
    /// objects to the millisecond on Garage, a HEAD only to the second.
    fn remove(&self, rows: &[ObjectRow]) -> io::Result<Vec<Digest>> {
        let now: HashMap<Digest, SystemTime> = self
            .rt
            .block_on(self.bucket.objects())?
            .into_iter()
            .map(|r| (r.digest, r.last_access))
            .collect();
        let mut removed = Vec::new();
        for row in rows {
            match now.get(&row.digest).copied() {
                None => self.known.lock().remove(&row.digest),
                Some(t) if may_be_after(t, row.last_access) => {}
                Some(_) => {
                    self.rt.block_on(self.bucket.delete(&row.digest))?;
                    self.known.lock().remove(&row.digest);
                    removed.push(row.digest.clone());
                }
            }
        }
        Ok(removed)
    }

    fn objects(&self) -> io::Result<Vec<ObjectRow>> {
        self.rt.block_on(self.bucket.objects())
    }

    fn usage(&self) -> Usage {
        let known = self.known.lock();
        Usage {
            bytes: known.bytes,
            objects: known.sizes.len() as u64,
        }
    }

    /// The bucket is asked nothing: a failing bucket shows in the errors of the calls.
    fn ready(&self) -> bool {
        true
    }

    /// Reads are marked in the bucket as they happen; nothing is held back.
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}

/// A committed blob, read with ranged GETs.
struct S3Reader {
    bucket: Bucket,
    rt: Handle,
    digest: Digest,
    len: u64,
}

impl ReadAt for S3Reader {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.len || buf.is_empty() {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.len - offset) as usize;
        self.rt.block_on(async {
            let Some(read) = self
                .bucket
                .get(&self.digest, Some(offset..offset + n as u64))
                .await?
            else {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{} was removed from the bucket", self.digest),
                ));
            };
            let mut got = 0;
            let mut body = read.body;
            while let Some(chunk) = body.try_next().await? {
                let take = chunk.len().min(n - got);
                buf[got..got + take].copy_from_slice(&chunk[..take]);
                got += take;
            }
            Ok(got)
        })
    }
}

/// A fill's own reader: the bytes written so far until the commit, the bucket after it.
struct FillReader {
    state: RwLock<FillState>,
}

enum FillState {
    Growing(Vec<u8>),
    Committed(S3Reader),
}

impl ReadAt for FillReader {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        match &*self.state.read() {
            FillState::Growing(data) => {
                let start = usize::try_from(offset).map_or(data.len(), |o| o.min(data.len()));
                let n = buf.len().min(data.len() - start);
                buf[..n].copy_from_slice(&data[start..start + n]);
                Ok(n)
            }
            FillState::Committed(r) => r.read_at(buf, offset),
        }
    }
}

struct S3Writer {
    store: S3Store,
    digest: Digest,
    upload: Option<Upload>,
    written: u64,
    sealed: bool,
    /// Made by `reader` if asked before the first write; then every write is kept in it.
    fill: Mutex<Option<Arc<FillReader>>>,
}

impl BlobWriter for S3Writer {
    fn written(&self) -> u64 {
        self.written
    }

    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        if self.sealed {
            return Err(io::Error::other("writer already sealed"));
        }
        let upload = self
            .upload
            .as_mut()
            .ok_or_else(|| io::Error::other("writer already committed"))?;
        upload.write(Bytes::copy_from_slice(data))?;
        if let Some(fill) = &*self.fill.lock()
            && let FillState::Growing(buf) = &mut *fill.state.write()
        {
            buf.extend_from_slice(data);
        }
        self.written += data.len() as u64;
        Ok(())
    }

    /// Only before the first write: from then on, what is written is also kept in memory
    /// for the readers, until the commit.
    fn reader(&self) -> io::Result<Arc<dyn ReadAt>> {
        let mut fill = self.fill.lock();
        if let Some(fill) = &*fill {
            return Ok(fill.clone());
        }
        if self.written > 0 {
            return Err(io::Error::other(
                "a bucket fill is readable only through a reader taken before its first write",
            ));
        }
        let reader = fill.insert(Arc::new(FillReader {
            state: RwLock::new(FillState::Growing(Vec::new())),
        }));
        Ok(reader.clone())
    }

    fn seal(&mut self) -> io::Result<()> {
        self.sealed = true;
        Ok(())
    }

    fn commit(mut self: Box<Self>, proof: Verified, _repo: &str) -> Result<u64, CommitError> {
        check_proof(&self.digest, self.written, &proof)?;
        let upload = self
            .upload
            .take()
            .ok_or_else(|| io::Error::other("writer already committed"))?;
        self.store.rt.block_on(upload.finish(&proof))?;
        self.store.known.lock().add(&self.digest, self.written);
        if let Some(fill) = &*self.fill.lock() {
            *fill.state.write() = FillState::Committed(S3Reader {
                bucket: self.store.bucket.clone(),
                rt: self.store.rt.clone(),
                digest: self.digest.clone(),
                len: self.written,
            });
        }
        Ok(self.written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_failing_in_a_row_is_left_alone_then_tried_again() {
        let b = Breaker::default();
        for _ in 0..BUCKET_BREAK_AFTER - 1 {
            b.record(false);
            assert!(!b.open());
        }
        b.record(true);
        b.record(false);
        assert!(!b.open(), "a success in between starts the count again");
        for _ in 0..BUCKET_BREAK_AFTER {
            b.record(false);
        }
        assert!(b.open());
        *b.open_until.lock() = Some(Instant::now());
        assert!(!b.open(), "the pause is over: one call tries");
        assert!(b.open(), "the others wait for that one's answer");
        b.record(false);
        assert!(b.open(), "a failed try re-opens it");
        *b.open_until.lock() = Some(Instant::now());
        assert!(!b.open());
        b.record(true);
        assert!(!b.open(), "a successful try closes it");
        assert!(!b.open());
    }
    use crate::oci::Algorithm;
    use object_store::memory::InMemory;
    use object_store::throttle::{ThrottleConfig, ThrottledStore};

    fn bucket_over(store: Arc<dyn ObjectStore>) -> (Bucket, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new(&[]));
        (
            Bucket::with_store(store, "mirror/", metrics.clone()),
            metrics,
        )
    }

    fn bucket() -> (Bucket, Arc<Metrics>) {
        bucket_over(Arc::new(InMemory::new()))
    }

    fn proof(data: &[u8]) -> Verified {
        let mut v = Verifier::new(Algorithm::Sha256);
        v.update(data);
        v.prove()
    }

    /// Bytes that differ at every offset, so a read at the wrong place shows.
    fn blob(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
            .collect()
    }

    fn count(m: &Metrics, op: StorageOp, result: StorageResult) -> u64 {
        m.storage_requests
            .with_label_values(&[op.as_str(), result.as_str()])
            .get()
    }

    /// Waits (up to 5 s) until `op` has succeeded `n` times.
    async fn until_counted(m: &Metrics, op: StorageOp, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while count(m, op, StorageResult::Ok) < n {
            assert!(
                Instant::now() < deadline,
                "{} never reached {n}",
                op.as_str()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn upload_all(b: &Bucket, data: &[u8]) -> Upload {
        let mut up = b.upload(&Digest::sha256_of(data));
        for chunk in data.chunks(64 << 10) {
            up.write(Bytes::copy_from_slice(chunk)).unwrap();
        }
        up
    }

    async fn put(b: &Bucket, data: &[u8]) -> Digest {
        upload_all(b, data).finish(&proof(data)).await.unwrap();
        Digest::sha256_of(data)
    }

    async fn read_all(b: &Bucket, d: &Digest, range: Option<Range<u64>>) -> (u64, Vec<u8>) {
        let r = b.get(d, range).await.unwrap().unwrap();
        let chunks: Vec<Bytes> = r.body.try_collect().await.unwrap();
        (r.len, chunks.concat())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_blob_goes_up_in_parts_and_appears_only_when_finished() {
        let (b, m) = bucket();
        let data = blob(2 * PART_SIZE + 12_345, 1);
        let d = Digest::sha256_of(&data);
        let up = upload_all(&b, &data);
        // The multipart upload and both whole parts are sent while the fill still runs.
        until_counted(&m, StorageOp::Upload, 3).await;
        assert_eq!(b.head(&d).await.unwrap(), None);
        up.finish(&proof(&data)).await.unwrap();
        assert_eq!(count(&m, StorageOp::Complete, StorageResult::Ok), 1);
        assert_eq!(b.head(&d).await.unwrap(), Some(data.len() as u64));
        assert_eq!(read_all(&b, &d, None).await, (data.len() as u64, data));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_upload_whose_proof_does_not_match_leaves_nothing() {
        let (b, m) = bucket();
        // A multipart upload, one byte short of what was hashed.
        let data = blob(PART_SIZE + 1000, 2);
        let d = Digest::sha256_of(&data);
        let up = upload_all(&b, &data[..data.len() - 1]);
        until_counted(&m, StorageOp::Upload, 2).await;
        let e = up.finish(&proof(&data)).await.unwrap_err();
        assert!(e.to_string().contains(&d.to_string()), "{e}");
        until_counted(&m, StorageOp::Abort, 1).await;
        assert_eq!(b.head(&d).await.unwrap(), None);
        // A small one (a single PUT), with a proof of other bytes.
        let small = blob(1000, 3);
        let e = upload_all(&b, &small)
            .finish(&proof(b"other"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not the 1000 bytes written"), "{e}");
        assert_eq!(b.head(&Digest::sha256_of(&small)).await.unwrap(), None);
        assert_eq!(count(&m, StorageOp::Put, StorageResult::Ok), 0);
        assert!(b.objects().await.unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_upload_leaves_nothing_and_the_blob_can_still_be_uploaded() {
        let (b, m) = bucket();
        let data = blob(2 * PART_SIZE + 10, 4);
        let d = Digest::sha256_of(&data);
        let up = upload_all(&b, &data[..PART_SIZE + 10]);
        until_counted(&m, StorageOp::Upload, 2).await;
        drop(up);
        until_counted(&m, StorageOp::Abort, 1).await;
        assert_eq!(b.head(&d).await.unwrap(), None);
        assert!(b.objects().await.unwrap().is_empty());
        assert_eq!(put(&b, &data).await, d);
        assert_eq!(read_all(&b, &d, None).await.1, data);
    }

    /// Writes 1 MiB every 2 ms (500 MB/s) for 100 MiB; returns how many writes were accepted
    /// and the longest a write took.
    async fn paced_writes(up: &mut Upload) -> (usize, Duration) {
        let chunk = Bytes::from(blob(1 << 20, 5));
        let mut slowest = Duration::ZERO;
        for i in 0..100 {
            let started = Instant::now();
            let r = up.write(chunk.clone());
            slowest = slowest.max(started.elapsed());
            if let Err(e) = r {
                assert!(e.to_string().contains("too slow"), "{e}");
                return (i, slowest);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        (100, slowest)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_bucket_fails_the_upload_instead_of_blocking_writes() {
        let d = Digest::sha256_of(b"not what is written");
        // A bucket that keeps up takes all of it.
        let (fast, _) = bucket();
        let mut up = fast.upload(&d);
        assert_eq!(paced_writes(&mut up).await.0, 100);
        // One that takes a minute per part: the writes fail once 64 MiB wait, at once.
        let slow = ThrottledStore::new(
            InMemory::new(),
            ThrottleConfig {
                wait_put_per_call: Duration::from_secs(60),
                ..ThrottleConfig::default()
            },
        );
        let (b, m) = bucket_over(Arc::new(slow));
        let mut up = b.upload(&d);
        let (accepted, slowest) = paced_writes(&mut up).await;
        assert_eq!(accepted, (MAX_PENDING >> 20) as usize);
        assert!(slowest < Duration::from_millis(100), "{slowest:?}");
        // Given up for good, and aborted.
        assert!(up.write(Bytes::from_static(b"more")).is_err());
        drop(up);
        until_counted(&m, StorageOp::Abort, 1).await;
        assert_eq!(count(&m, StorageOp::Complete, StorageResult::Ok), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uploads_together_are_bounded_and_give_their_share_back() {
        let slow = ThrottledStore::new(
            InMemory::new(),
            ThrottleConfig {
                wait_put_per_call: Duration::from_secs(60),
                ..ThrottleConfig::default()
            },
        );
        let (mut b, _) = bucket_over(Arc::new(slow));
        Arc::get_mut(&mut b.inner).unwrap().max_pending_total = 3 << 20;
        let mib = Bytes::from(vec![7u8; 1 << 20]);
        let (d1, d2) = (Digest::sha256_of(b"one"), Digest::sha256_of(b"two"));
        let mut one = b.upload(&d1);
        let mut two = b.upload(&d2);
        one.write(mib.clone()).unwrap();
        one.write(mib.clone()).unwrap();
        two.write(mib.clone()).unwrap();
        assert!(
            two.write(mib.clone()).is_err(),
            "past the bound for all uploads"
        );
        drop(two);
        drop(one);
        // Given up and dropped, their bytes no longer count: a new upload has the room.
        let deadline = Instant::now() + Duration::from_secs(10);
        while b.inner.pending_total.load(Ordering::Acquire) > 0 {
            assert!(Instant::now() < deadline, "the share was never given back");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut three = b.upload(&Digest::sha256_of(b"three"));
        three.write(mib.clone()).unwrap();
        three.write(mib).unwrap();
    }

    #[tokio::test]
    async fn tags_round_trip_with_several_media_types() {
        let (b, _) = bucket();
        let at = |ms| UNIX_EPOCH + Duration::from_millis(ms);
        let entries = vec![
            TagEntry {
                digest: Digest::sha256_of(b"index"),
                media_type: "application/vnd.oci.image.index.v1+json".into(),
                checked: at(1_700_000_000_123),
            },
            TagEntry {
                digest: Digest::sha256_of(b"list"),
                media_type: "application/vnd.docker.distribution.manifest.list.v2+json".into(),
                checked: at(1_700_000_000_456),
            },
            TagEntry {
                digest: Digest::sha256_of(b"v2"),
                media_type: "application/vnd.docker.distribution.manifest.v2+json".into(),
                checked: at(1_700_000_000_789),
            },
        ];
        b.put_tag("docker.io", "library/nginx", "1.27", &entries)
            .await
            .unwrap();
        assert_eq!(
            b.tags("docker.io", "library/nginx", "1.27").await.unwrap(),
            entries
        );
        // Other tags, repositories and upstreams know nothing of it.
        assert!(
            b.tags("docker.io", "library/nginx", "1.26")
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            b.tags("docker.io", "nginx", "1.27")
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            b.tags("ghcr.io", "library/nginx", "1.27")
                .await
                .unwrap()
                .is_empty()
        );
        // A new record replaces the old one whole.
        b.put_tag("docker.io", "library/nginx", "1.27", &entries[2..])
            .await
            .unwrap();
        assert_eq!(
            b.tags("docker.io", "library/nginx", "1.27").await.unwrap(),
            entries[2..]
        );
    }

    #[tokio::test]
    async fn names_that_could_leave_their_key_space_are_refused() {
        let (b, _) = bucket();
        let d = Digest::sha256_of(b"x");
        let refused = |e: io::Error| e.kind() == io::ErrorKind::InvalidInput;
        for (upstream, repo) in [
            ("docker.io", "../blobs"),
            ("docker.io", "library/.."),
            ("docker.io", "library//nginx"),
            ("docker.io", "/library"),
            ("docker.io", "library/"),
            ("docker.io", ""),
            ("docker.io", "lib\nrary"),
            ("", "library"),
            ("a/b", "library"),
            ("..", "library"),
        ] {
            let what = format!("{upstream:?} {repo:?}");
            assert!(
                refused(b.put_tag(upstream, repo, "x", &[]).await.unwrap_err()),
                "{what}"
            );
            assert!(
                refused(b.tags(upstream, repo, "x").await.unwrap_err()),
                "{what}"
            );
            assert!(
                refused(b.put_link(upstream, repo, &d).await.unwrap_err()),
                "{what}"
            );
            assert!(
                refused(b.linked(upstream, repo, &d).await.unwrap_err()),
                "{what}"
            );
        }
        for tag in ["..", ".", "a/b", ""] {
            let e = b
                .put_tag("docker.io", "library", tag, &[])
                .await
                .unwrap_err();
            assert!(refused(e), "{tag:?}");
        }
        assert!(b.inner.list("").await.is_err());
        let everything: Vec<_> = b.inner.store.list(None).try_collect().await.unwrap();
        assert!(everything.is_empty(), "{everything:?}");
    }

    #[tokio::test]
    async fn links_are_recorded_and_listed() {
        let (b, _) = bucket();
        let (x, y) = (Digest::sha256_of(b"x"), Digest::sha256_of(b"y"));
        b.put_link("docker.io", "library/nginx", &x).await.unwrap();
        b.put_link("docker.io", "library/nginx", &y).await.unwrap();
        b.put_link("ghcr.io", "org/team/app", &x).await.unwrap();
        assert!(b.linked("docker.io", "library/nginx", &x).await.unwrap());
        assert!(b.linked("ghcr.io", "org/team/app", &x).await.unwrap());
        assert!(!b.linked("ghcr.io", "org/team/app", &y).await.unwrap());
        assert!(!b.linked("docker.io", "library/redis", &x).await.unwrap());
        let mut links = b.links().await.unwrap();
        links.sort();
        let link = |u: &str, r: &str, d: &Digest| (u.to_owned(), r.to_owned(), d.clone());
        let mut expected = vec![
            link("docker.io", "library/nginx", &x),
            link("docker.io", "library/nginx", &y),
            link("ghcr.io", "org/team/app", &x),
        ];
        expected.sort();
        assert_eq!(links, expected);
    }

    #[tokio::test]
    async fn reads_ranges_and_small_objects() {
        let (b, m) = bucket();
        let data = blob(1 << 20, 6);
        let d = put(&b, &data).await;
        assert_eq!(
            read_all(&b, &d, Some(1000..5000)).await,
            (1 << 20, data[1000..5000].to_vec())
        );
        // A range past the end is cut; one starting past it is refused; an empty one is empty.
        assert_eq!(
            read_all(&b, &d, Some(1_000_000..2_000_000)).await.1,
            data[1_000_000..]
        );
        let e = b
            .get(&d, Some((1 << 20) + 1..(1 << 20) + 9))
            .await
            .err()
            .unwrap();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        assert_eq!(
            read_all(&b, &d, Some(1 << 20..1 << 20)).await,
            (1 << 20, vec![])
        );
        // Manifests: whole, under a cap.
        let manifest = Bytes::from_static(br#"{"schemaVersion":2}"#);
        b.put_small(manifest.clone(), &proof(&manifest))
            .await
            .unwrap();
        let md = Digest::sha256_of(&manifest);
        assert_eq!(b.get_small(&md, 1024).await.unwrap(), Some(manifest));
        assert!(b.get_small(&md, 10).await.is_err());
        assert!(b.get_small(&d, 1024).await.is_err());
        // What is not there.
        let missing = Digest::sha256_of(b"missing");
        assert_eq!(b.head(&missing).await.unwrap(), None);
        assert!(b.get(&missing, None).await.unwrap().is_none());
        assert!(b.get(&missing, Some(0..0)).await.unwrap().is_none());
        assert_eq!(b.get_small(&missing, 10).await.unwrap(), None);
        assert!(count(&m, StorageOp::Head, StorageResult::NotFound) >= 2);
        assert!(count(&m, StorageOp::Get, StorageResult::NotFound) >= 2);
    }

    /// A damaged blob leaves the bucket for its quarantine, which keeps within its bounds,
    /// oldest first out, and is no blob to gc or to a listing.
    #[tokio::test]
    async fn the_bucket_quarantine_keeps_within_its_bounds() {
        let (b, _) = bucket();
        let ds = aged_blobs(&b, 3).await;
        for d in &ds {
            b.quarantine(d, 1000).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(present(&b, &ds).await, [false; 3]);
        assert!(b.objects().await.unwrap().is_empty());
        assert_eq!(b.quarantined().await.unwrap().len(), 3);
        // Room for two: the first quarantined goes.
        b.trim_quarantine(SystemTime::now(), KEEP_FOR, 2500)
            .await
            .unwrap();
        let left = b.quarantined().await.unwrap();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(
            !left.iter().any(|(k, _)| k.contains(&ds[0].hex())),
            "{left:?}"
        );
        // A week on, none.
        let later = SystemTime::now() + KEEP_FOR + Duration::from_secs(1);
        b.trim_quarantine(later, KEEP_FOR, KEEP_BYTES)
            .await
            .unwrap();
        assert!(b.quarantined().await.unwrap().is_empty());
        // What is gone already is not an error.
        b.quarantine(&ds[0], 1000).await.unwrap();
    }

    #[tokio::test]
    async fn put_small_refuses_a_proof_of_other_bytes() {
        let (b, _) = bucket();
        let bytes = Bytes::from_static(b"manifest");
        let e = b
            .put_small(bytes.clone(), &proof(b"other"))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        // Same length, other bytes.
        let e = b
            .put_small(bytes.clone(), &proof(b"MANIFEST"))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(b.objects().await.unwrap().is_empty());
    }

    /// Stores `n` blobs of 1000 bytes, 5 ms apart, oldest first.
    async fn aged_blobs(b: &Bucket, n: u8) -> Vec<Digest> {
        let mut ds = Vec::new();
        for i in 0..n {
            let data = Bytes::from(blob(1000, i));
            b.put_small(data.clone(), &proof(&data)).await.unwrap();
            ds.push(Digest::sha256_of(&data));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        ds
    }

    async fn present(b: &Bucket, ds: &[Digest]) -> Vec<bool> {
        let mut out = Vec::new();
        for d in ds {
            out.push(b.head(d).await.unwrap().is_some());
        }
        out
    }

    #[tokio::test]
    async fn touch_moves_a_blob_up_the_lru() {
        let (b, _) = bucket();
        let ds = aged_blobs(&b, 3).await;
        b.touch(&ds[..1]).await.unwrap();
        let rows = b.objects().await.unwrap();
        let at = |d: &Digest| rows.iter().find(|r| &r.digest == d).unwrap().last_access;
        assert!(at(&ds[0]) > at(&ds[2]));
        // Room for two: the one read least recently goes, not the one written first.
        assert_eq!(b.gc(2000, Duration::ZERO).await.unwrap(), (1, 1000));
        assert_eq!(present(&b, &ds).await, [true, false, true]);
    }

    #[tokio::test]
    async fn gc_spares_pinned_blobs_and_takes_the_next_instead() {
        let (b, _) = bucket();
        let ds = aged_blobs(&b, 3).await;
        let keep: HashSet<Digest> = [ds[0].clone()].into();
        assert_eq!(
            b.gc_sparing(2000, Duration::ZERO, &keep).await.unwrap(),
            (1, 1000)
        );
        assert_eq!(present(&b, &ds).await, [true, false, true]);
    }

    #[tokio::test]
    async fn gc_removes_the_least_recently_accessed_first_and_respects_grace() {
        let (b, _) = bucket();
        let old = aged_blobs(&b, 3).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let new = Bytes::from(blob(1000, 9));
        b.put_small(new.clone(), &proof(&new)).await.unwrap();
        let all = [old.clone(), vec![Digest::sha256_of(&new)]].concat();
        // Everything is within an hour: over the bound, and nothing goes.
        assert_eq!(b.gc(1500, Duration::from_secs(3600)).await.unwrap(), (0, 0));
        assert_eq!(present(&b, &all).await, [true; 4]);
        // With 200 ms of grace the three old blobs go, the new one stays though still over.
        assert_eq!(
            b.gc(500, Duration::from_millis(200)).await.unwrap(),
            (3, 3000)
        );
        assert_eq!(present(&b, &all).await, [false, false, false, true]);
        // Under the bound: nothing to do.
        assert_eq!(b.gc(1000, Duration::ZERO).await.unwrap(), (0, 0));
        // A marker whose blob is gone is cleaned up once it is past the grace.
        b.touch(&[old[0].clone(), Digest::sha256_of(&new)])
            .await
            .unwrap();
        assert_eq!(b.inner.list("access").await.unwrap().len(), 2);
        b.gc(1000, Duration::ZERO).await.unwrap();
        let markers = b.inner.list("access").await.unwrap();
        assert_eq!(markers.len(), 1);
        assert_eq!(
            b.inner.digest_of(&markers[0].location, "access/"),
            Some(Digest::sha256_of(&new))
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_gc_passes_remove_each_victim_once_and_nothing_else() {
        // The second pass starts a little later each round, so that it finds victims the
        // first removed after its listing, as well as racing it to the same ones.
        for delay in (0..16).step_by(2) {
            // Every listing, HEAD and DELETE takes a moment, so the passes interleave.
            let store = ThrottledStore::new(
                InMemory::new(),
                ThrottleConfig {
                    wait_get_per_call: Duration::from_millis(2),
                    wait_delete_per_call: Duration::from_millis(2),
                    wait_list_per_call: Duration::from_millis(2),
                    ..ThrottleConfig::default()
                },
            );
            let (b, _) = bucket_over(Arc::new(store));
            let ds = aged_blobs(&b, 12).await;
            let (one, two) = (b.clone(), b.clone());
            let passes = [
                tokio::spawn(async move { one.gc(6000, Duration::ZERO).await }),
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    two.gc(6000, Duration::ZERO).await
                }),
            ];
            let mut removed = 0;
            for p in passes {
                let (n, bytes) = p.await.unwrap().unwrap();
                assert!(n <= 6 && bytes == n * 1000, "delay {delay}: {n} {bytes}");
                removed += n;
            }
            assert!(removed >= 6, "delay {delay}");
            let expected: Vec<bool> = (0..12).map(|i| i >= 6).collect();
            assert_eq!(present(&b, &ds).await, expected, "delay {delay}");
        }
    }

    #[tokio::test]
    async fn prefixes_keep_caches_apart() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let m = Arc::new(Metrics::new(&[]));
        let (a, b) = (
            Bucket::with_store(store.clone(), "a", m.clone()),
            Bucket::with_store(store.clone(), "/b/", m),
        );
        let d = put(&a, b"in a").await;
        a.put_tag("docker.io", "x", "latest", &[]).await.unwrap();
        assert_eq!(b.head(&d).await.unwrap(), None);
        assert!(b.objects().await.unwrap().is_empty());
        assert_eq!(a.objects().await.unwrap().len(), 1);
        let keys: Vec<String> = store
            .list(None)
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap();
        assert!(keys.iter().all(|k| k.starts_with("a/")), "{keys:?}");
        // A gc pass over `b` does not see `a`'s blobs.
        assert_eq!(b.gc(0, Duration::ZERO).await.unwrap(), (0, 0));
        assert!(a.head(&d).await.unwrap().is_some());
    }
}
