//! The pull-through state machine: look up the cache, coalesce misses, fetch, verify, commit,
//! serve. `http` calls it; it calls `storage` and `upstream`, and knows nothing of HTTP
//! connections: blobs leave as a [`BlobSource`], a cursor the server turns into a body.
//!
//! `blob.rs` opens blobs (committed, followed, relayed), `fill.rs` runs a fill, `inflight.rs`
//! is its single-flight table and the one reader of its state, `relay.rs` relays the upstream
//! when the store cannot take a blob, `hasher.rs` hashes a fill behind its writes, `tags.rs`
//! resolves tags, `flight.rs` coalesces small fetches, `housekeeping.rs` runs eviction.

mod blob;
mod fill;
mod flight;
mod hasher;
mod housekeeping;
mod inflight;
mod listings;
mod referrers;
mod relay;
mod tags;

use crate::config::Config;
use crate::error::{Error, UpstreamFault};
use crate::metrics::{Kind, Lookup, Metrics};
use crate::oci::manifest::{self, Accept, MAX_MANIFEST_SIZE, ManifestError};
use crate::oci::{Digest, ErrorCode, RepoName};
use crate::storage::meta::LinkSource;
use crate::storage::s3::Bucket;
use crate::storage::{Access, Store, Usage};
use crate::upstream::{Op, Upstream, UpstreamRequest};
use bytes::Bytes;
use flight::SingleFlight;
use futures_util::FutureExt;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use inflight::Inflight;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tracing::warn;

pub use blob::{BlobSource, Piece};
pub use flight::FlightKey;
pub use inflight::FillView;
pub use listings::{HELD_WARNING, Listing, MAX_LIST_BYTES, MAX_TAGS, STALE_WARNING};
pub use referrers::{Referrers, Stale};

/// A manifest as the upstream sent it: bytes untouched, so the digest holds.
#[derive(Debug)]
pub struct Manifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
    /// Its response headers, made once rather than on every hit.
    pub headers: ManifestHeaders,
}

/// The header values of a manifest response.
#[derive(Debug)]
pub struct ManifestHeaders {
    /// `Content-Type`: the media type, unless it cannot be a header value (a sniffed
    /// `mediaType` may hold anything).
    pub content_type: Result<HeaderValue, String>,
    /// `Docker-Content-Digest`: the digest.
    pub digest: HeaderValue,
    /// `ETag`: the digest, quoted.
    pub etag: HeaderValue,
    /// `Content-Length`.
    pub content_length: HeaderValue,
}

impl Manifest {
    pub fn new(digest: Digest, media_type: String, bytes: Bytes) -> Manifest {
        let text = digest.to_string();
        let headers = ManifestHeaders {
            content_type: HeaderValue::from_str(&media_type).map_err(|e| e.to_string()),
            etag: HeaderValue::try_from(format!("\"{text}\"")).expect("a digest is a header value"),
            digest: HeaderValue::try_from(text).expect("a digest is a header value"),
            content_length: HeaderValue::from(bytes.len()),
        };
        Manifest {
            digest,
            media_type,
            bytes,
            headers,
        }
    }
}

/// Which upstream a request is for, and the repository as that upstream names it.
#[derive(Clone)]
pub struct Target {
    pub upstream: Arc<Upstream>,
    /// The name the upstream knows (prefix stripped, `library/` added for docker.io).
    pub repo: RepoName,
    /// The name as the client wrote it, for rewriting `Link` headers.
    pub client_name: String,
    /// The `ns` the client sent, echoed back in `Link`s.
    pub ns: Option<String>,
    /// Asked by a peer replica on behalf of its client: served here, never passed on to
    /// another peer, so peer traffic cannot loop.
    pub forwarded: bool,
}

impl Target {
    /// A GET or HEAD of one of this repository's blobs, from byte `range` on when given.
    pub fn blob_request(
        &self,
        method: Method,
        digest: &Digest,
        range: Option<http::HeaderValue>,
    ) -> UpstreamRequest<'_> {
        UpstreamRequest {
            method,
            op: Op::Blob,
            repo: &self.repo,
            path_and_query: format!("/v2/{}/blobs/{}", self.repo, digest),
            accept: None,
            range,
        }
    }

    /// A GET or HEAD of a manifest by tag or digest, accepting what the client accepts.
    pub fn manifest_request(
        &self,
        method: Method,
        reference: &str,
        accept: &Accept,
    ) -> UpstreamRequest<'_> {
        UpstreamRequest {
            method,
            op: Op::Manifest,
            repo: &self.repo,
            path_and_query: format!("/v2/{}/manifests/{}", self.repo, reference),
            accept: Some(accept.upstream_value()),
            range: None,
        }
    }
}

/// An upstream answer passed through (tags list, referrers), body read whole.
#[derive(Clone, Debug)]
pub struct Passthrough {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

pub struct Mirror {
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    upstreams: Vec<Arc<Upstream>>,
    default: Option<Arc<Upstream>>,
    memory: moka::future::Cache<Digest, Arc<Manifest>>,
    referrers: moka::future::Cache<String, Arc<Passthrough>>,
    /// Kept tags lists, as read from the metadata or walked upstream.
    tag_lists: moka::future::Cache<listings::ListKey, Arc<crate::storage::listings::KeptTagList>>,
    /// One upstream walk per repository's tags list at a time.
    tag_list_flights: SingleFlight<listings::ListKey, Arc<crate::storage::listings::KeptTagList>>,
    fills: Arc<Inflight>,
    manifest_flights: SingleFlight<FlightKey, (Arc<Manifest>, Lookup)>,
    /// Referrers questions asked upstream, one per (upstream, repository, subject, page).
    referrer_flights: SingleFlight<String, Referrers>,
    /// Upstream HEADs asking whether a repository holds a cached blob, one per question.
    link_checks: SingleFlight<blob::LinkCheckKey, u64>,
    tag_ttl: Duration,
    offline: bool,
    /// `cache.fill_min_rate` in bytes per second: bounds how long a fill may take.
    fill_min_rate: u64,
    cache_dir: PathBuf,
    /// Woken after each commit, so eviction runs as soon as the cache passes its bound.
    evict_wakeup: Arc<tokio::sync::Notify>,
    eviction: crate::storage::evict::Policy,
    /// The replicas this one shares the cache with, when `[cluster]` is configured.
    cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Blobs read from this replica's cache directory since the last housekeeping round, to be
    /// marked read in the bucket, so its eviction sees every replica's reads.
    shared_reads: parking_lot::Mutex<std::collections::HashSet<Digest>>,
    /// `storage.max_size`: the bound gc passes keep the bucket under.
    bucket_max_size: Option<u64>,
    /// Set once shutdown begins: `/readyz` says 503 and HTTP/1 responses close their connections
    /// (for what still arrives on open connections; new ones are refused).
    draining: std::sync::atomic::AtomicBool,
}

/// Cap on passthrough bodies (tags lists, referrer indexes), which are buffered.
const MAX_PASSTHROUGH: usize = 4 * 1024 * 1024;
/// How long a referrers answer is reused.
const REFERRERS_TTL: Duration = Duration::from_secs(30);

impl Mirror {
    pub fn new(config: &Config, store: Arc<Store>, metrics: Arc<Metrics>) -> Result<Mirror, Error> {
        let mut upstreams = Vec::new();
        let mut default = None;
        for u in &config.upstream {
            let up = Arc::new(Upstream::new(u, metrics.clone())?);
            if u.default {
                default = Some(up.clone());
            }
            upstreams.push(up);
        }
        let memory = moka::future::Cache::builder()
            .weigher(|_k: &Digest, m: &Arc<Manifest>| {
                (m.bytes.len() + 256).try_into().unwrap_or(u32::MAX)
            })
            .max_capacity(config.cache.memory.0)
            .build();
        let referrers = moka::future::Cache::builder()
            .weigher(|k: &String, p: &Arc<Passthrough>| {
                (k.len() + p.body.len() + 256)
                    .try_into()
                    .unwrap_or(u32::MAX)
            })
            .max_capacity(config.cache.memory.0 / 8)
            .time_to_live(REFERRERS_TTL)
            .build();
        let tag_lists = moka::future::Cache::builder()
            .weigher(
                |k: &listings::ListKey, l: &Arc<crate::storage::listings::KeptTagList>| {
                    let tags: usize = l.tags.iter().map(|t| t.len() + 24).sum();
                    (k.0.len() + k.1.len() + tags + 64)
                        .try_into()
                        .unwrap_or(u32::MAX)
                },
            )
            .max_capacity(config.cache.memory.0 / 8)
            .build();
        Ok(Mirror {
            store,
            metrics,
            upstreams,
            default,
            memory,
            referrers,
            tag_lists,
            tag_list_flights: SingleFlight::default(),
            fills: Arc::new(Inflight::default()),
            manifest_flights: SingleFlight::default(),
            referrer_flights: SingleFlight::default(),
            link_checks: SingleFlight::default(),
            tag_ttl: config.cache.tag_ttl.0,
            offline: config.cache.offline,
            fill_min_rate: config.cache.fill_min_rate.0,
            cache_dir: config.cache.dir.clone(),
            evict_wakeup: Arc::new(tokio::sync::Notify::new()),
            eviction: config.eviction_policy(),
            cluster: None,
            shared_reads: Default::default(),
            bucket_max_size: config.storage.max_size.map(|m| m.0),
            draining: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Marks the start of shutdown (see [`Mirror::draining`]).
    pub fn start_draining(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether shutdown has begun (new connections are refused; a probe on an open one hears 503)
    /// while the responses in flight finish.
    pub fn draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Makes this mirror one replica of `cluster`: misses it does not own are asked of their
    /// owner before the upstream.
    pub fn with_cluster(mut self, cluster: Option<Arc<crate::cluster::Cluster>>) -> Mirror {
        self.cluster = cluster;
        self
    }

    /// The default upstream's name, if there is one.
    pub fn default_upstream(&self) -> Option<&str> {
        self.default.as_deref().map(Upstream::name)
    }

    /// Whether an upstream of this name is configured.
    pub fn has_upstream(&self, name: &str) -> bool {
        self.upstreams.iter().any(|u| u.name() == name)
    }

    pub fn cluster(&self) -> Option<&Arc<crate::cluster::Cluster>> {
        self.cluster.as_ref()
    }

    /// Notes a read of a blob this replica holds, for the bucket's eviction order.
    fn note_shared_read(&self, digest: &Digest) {
        if self.store.bucket().is_some() {
            self.shared_reads.lock().insert(digest.clone());
        }
    }

    /// Counts a cache lookup, and records its result on the request's span for the log line.
    fn lookup(&self, kind: Kind, result: Lookup) {
        self.metrics.lookup(kind, result);
        crate::telemetry::record_cache(result.as_str());
    }

    /// The `/metrics` text, for every listener that serves it. The cache's size is read at
    /// scrape time rather than kept in step at every commit.
    pub fn metrics_text(&self) -> Vec<u8> {
        let usage = self.usage();
        let m = &self.metrics;
        m.cache_size_bytes
            .set(i64::try_from(usage.bytes).unwrap_or(i64::MAX));
        m.cache_objects
            .set(i64::try_from(usage.objects).unwrap_or(i64::MAX));
        if let Some(c) = self.store.blobs().counters() {
            m.integrity.update(&c);
        }
        m.render()
    }

    /// The cache, for readers of what it holds (the page).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Bytes and objects in the cache.
    pub fn usage(&self) -> Usage {
        self.store.usage()
    }

    /// Whether the cache can serve and take content now.
    pub fn ready(&self) -> bool {
        self.store.blobs().ready()
    }

    /// The cache directory (committed files may be read there by a process that cannot open
    /// the cache because this one holds it).
    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// Picks the upstream: an `ns` naming one, else a first path component naming one, else
    /// the default. docker.io's one-component names get `library/`.
    pub fn route(&self, name: &str, ns: Option<&str>) -> Result<Target, Error> {
        let client = RepoName::parse(name).map_err(|_| {
            Error::client(
                ErrorCode::NameInvalid,
                format!("invalid repository name {name:?}"),
            )
        })?;
        let by_name = |n: &str| self.upstreams.iter().find(|u| u.name() == n).cloned();
        let (upstream, repo) = if let Some(ns) = ns {
            let up = by_name(ns).ok_or_else(|| {
                Error::client(
                    ErrorCode::NameUnknown,
                    format!("no upstream is configured for registry {ns:?}"),
                )
            })?;
            (up, client.clone())
        } else if let (Some(up), Some(rest)) =
            (by_name(client.first_component()), client.strip_first())
        {
            (up, rest)
        } else if let Some(up) = &self.default {
            (up.clone(), client.clone())
        } else {
            return Err(Error::client(
                ErrorCode::NameUnknown,
                format!("{name:?} names no configured upstream, and there is no default upstream"),
            ));
        };
        let repo = if upstream.name() == "docker.io" {
            repo.with_library_prefix().map_err(|_| {
                Error::client(
                    ErrorCode::NameInvalid,
                    format!("{name:?} is too long with its library/ prefix"),
                )
            })?
        } else {
            repo
        };
        crate::telemetry::record_target(upstream.name(), repo.as_str());
        Ok(Target {
            upstream,
            repo,
            client_name: name.to_owned(),
            ns: ns.map(str::to_owned),
            forwarded: false,
        })
    }

    fn offline_error(&self, t: &Target) -> Error {
        Error::upstream(t.upstream.name(), UpstreamFault::Offline)
    }

    // === manifests ===

    /// A manifest by digest: memory, then disk, then one upstream fetch shared by all callers
    /// under the repository. As for blobs, a cached manifest is served under a repository only
    /// once linked to it (fetched or imported under it, named by one of its manifests, or
    /// confirmed by a HEAD under it): a private manifest's digest named under a public
    /// repository gets the upstream's answer there.
    pub async fn manifest_by_digest(
        &self,
        t: &Target,
        digest: &Digest,
    ) -> Result<Arc<Manifest>, Error> {
        if let Some(m) = self.cached_manifest(digest).await? {
            if !self.linked(t, digest)? && !self.bucket_linked(t, digest).await {
                self.confirm_manifest(t, digest).await?;
            }
            self.lookup(Kind::Manifest, Lookup::Hit);
            return Ok(m);
        }
        if self.bucket_linked(t, digest).await
            && let Some(m) = self.bucket_manifest(digest, None).await
        {
            self.lookup(Kind::Manifest, Lookup::Bucket);
            return Ok(m);
        }
        if self.offline {
            self.lookup(Kind::Manifest, Lookup::Miss);
            return Err(self.offline_error(t));
        }
        let key = FlightKey::Digest {
            upstream: t.upstream.name().to_owned(),
            repo: t.repo.clone(),
            digest: digest.clone(),
        };
        // Boxed: the fetch is kilobytes large, and the cache hit above should not carry it.
        let fetch = Box::pin(self.fetch_manifest_task(
            t,
            digest.to_string(),
            Accept::default(),
            Some(digest.clone()),
            None,
        ));
        let (res, leader) = self
            .manifest_flights
            .run(key, || fetch.map(|r| r.map(|m| (m, Lookup::Miss))))
            .await;
        self.lookup(
            Kind::Manifest,
            if leader {
                Lookup::Miss
            } else {
                Lookup::Coalesced
            },
        );
        res.map(|(m, _)| m)
    }

    /// Asks the upstream, with a HEAD by digest under `t`'s repository, whether that repository
    /// holds a cached manifest no link says it does. Yes (200, and any
    /// `Docker-Content-Digest` agrees): linked, so it is asked once. No, or no answer: the
    /// client's error; offline, the manifest is unknown here.
    async fn confirm_manifest(&self, t: &Target, digest: &Digest) -> Result<(), Error> {
        if self.offline {
            // As for a manifest that is not cached, so the answer does not tell what is.
            return Err(self.offline_error(t));
        }
        let up = &t.upstream;
        let resp = up
            .send(t.manifest_request(Method::HEAD, &digest.to_string(), &Accept::default()))
            .await?;
        if !resp.status().is_success() {
            return Err(up.status_error(&resp));
        }
        let claimed = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok());
        if let Some(c) = claimed.filter(|c| *c != digest.to_string()) {
            return Err(Error::upstream(
                up.name(),
                UpstreamFault::Protocol(format!(
                    "manifest HEAD answered Docker-Content-Digest {c}"
                )),
            ));
        }
        remember_confirmed(self.store.clone(), t, digest).await;
        Ok(())
    }

    /// A committed manifest, from memory or disk.
    async fn cached_manifest(&self, digest: &Digest) -> Result<Option<Arc<Manifest>>, Error> {
        if let Some(m) = self.memory.get(digest).await {
            return Ok(Some(m));
        }
        let store = self.store.clone();
        let d = digest.clone();
        let found =
            tokio::task::spawn_blocking(move || -> std::io::Result<Option<(Vec<u8>, String)>> {
                let Some(media_type) = store.meta().manifest_type(&d)? else {
                    return Ok(None);
                };
                let Some(blob) = store.blobs().open(&d, Access::Read)? else {
                    return Ok(None);
                };
                let bytes = blob.read_all(MAX_MANIFEST_SIZE)?;
                // Manifests are small: each is hashed as it is loaded, and a damaged one is a
                // miss, fetched again.
                if let Some(damage) = crate::storage::integrity::check_bytes(&bytes, &d) {
                    store.blobs().quarantine(&d, &damage)?;
                    return Ok(None);
                }
                if !blob.verified {
                    store.blobs().mark_verified(&d, blob.len)?;
                }
                Ok(Some((bytes, media_type)))
            })
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
        let Some((bytes, media_type)) = found else {
            return Ok(None);
        };
        let m = Arc::new(Manifest::new(digest.clone(), media_type, bytes.into()));
        self.memory.insert(digest.clone(), m.clone()).await;
        Ok(Some(m))
    }

    /// A manifest from the bucket, checked against its digest like any other, then kept here
    /// (with `tag` when a tag record named it: upstream, repo, tag, when it was last checked).
    /// `None` when the bucket does not hold it, or fails.
    async fn bucket_manifest(
        &self,
        digest: &Digest,
        tag: Option<(String, String, String, std::time::SystemTime)>,
    ) -> Option<Arc<Manifest>> {
        let b = self.store.bucket()?;
        let bytes = match b.get_small(digest, MAX_MANIFEST_SIZE).await {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return None,
            Err(e) => {
                warn!(error = %e, digest = %digest, "the bucket failed a manifest read");
                return None;
            }
        };
        let checked = match manifest::verify(&bytes, &HeaderMap::new(), Some(digest)) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, digest = %digest, "manifest in the bucket refused");
                return None;
            }
        };
        let m = Arc::new(Manifest::new(digest.clone(), checked.media_type, bytes));
        let (st, m2, proof) = (self.store.clone(), m.clone(), checked.proof);
        let saved = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            crate::storage::put_small(&**st.blobs(), &m2.bytes, proof, "(bucket)")?;
            crate::storage::referrers::note_manifest(&st, &m2.digest, &m2.media_type, &m2.bytes)?;
            let tag = tag
                .as_ref()
                .map(|(u, r, t, at)| (u.as_str(), r.as_str(), t.as_str(), *at));
            st.meta().put_manifest(&m2.digest, &m2.media_type, tag)
        })
        .await;
        if !matches!(saved, Ok(Ok(()))) {
            self.metrics.cache_write_errors.inc();
            warn!(digest = %m.digest, "could not keep a manifest read from the bucket");
        }
        self.memory.insert(m.digest.clone(), m.clone()).await;
        Some(m)
    }

    /// A future (to run as its own task) that GETs a manifest, verifies it, and stores it, with
    /// the tag that named it if any.
    fn fetch_manifest_task(
        &self,
        t: &Target,
        reference: String,
        accept: Accept,
        expect: Option<Digest>,
        tag: Option<String>,
    ) -> impl std::future::Future<Output = Result<Arc<Manifest>, Error>> + Send + 'static {
        self.fetch_manifest_via(t, reference, accept, expect, tag, None)
    }

    /// [`fetch_manifest_task`](Self::fetch_manifest_task), from the replica that owns the
    /// reference when `via` names one: it resolves it once for every replica (and has already
    /// shared what it found through the bucket), and its answer is checked like an upstream's.
    fn fetch_manifest_via(
        &self,
        t: &Target,
        reference: String,
        accept: Accept,
        expect: Option<Digest>,
        tag: Option<String>,
        via: Option<(Arc<crate::cluster::Cluster>, crate::cluster::Peer)>,
    ) -> impl std::future::Future<Output = Result<Arc<Manifest>, Error>> + Send + 'static {
        let t = t.clone();
        let store = self.store.clone();
        let bucket = store.bucket().cloned();
        let memory = self.memory.clone();
        let metrics = self.metrics.clone();
        async move {
            let up = &t.upstream;
            let started = std::time::Instant::now();
            let (parts, bytes) = match &via {
                None => {
                    let resp = up
                        .send(t.manifest_request(Method::GET, &reference, &accept))
                        .await?;
                    if !resp.status().is_success() {
                        return Err(up.status_error(&resp));
                    }
                    let (parts, body) = resp.into_parts();
                    let bytes = up.read_small(body, MAX_MANIFEST_SIZE).await?;
                    metrics.upstream_done(up.name(), Op::Manifest.as_str(), started);
                    metrics
                        .upstream_bytes
                        .with_label_values(&[up.name()])
                        .inc_by(bytes.len() as u64);
                    (parts, bytes)
                }
                Some((cluster, peer)) => {
                    let mut extra = HeaderMap::new();
                    if let Ok(v) = HeaderValue::try_from(accept.upstream_value()) {
                        extra.insert(header::ACCEPT, v);
                    }
                    let path = peer_path(&t, &format!("manifests/{reference}"));
                    let resp = cluster.fetch(peer, Method::GET, &path, extra).await?;
                    if !resp.status().is_success() {
                        return Err(up.status_error(&resp));
                    }
                    let (parts, body) = resp.into_parts();
                    (parts, up.read_small(body, MAX_MANIFEST_SIZE).await?)
                }
            };
            // A body that fails its check is never stored.
            let checked =
                manifest::verify(&bytes, &parts.headers, expect.as_ref()).map_err(|e| {
                    if let ManifestError::DigestMismatch { .. } = e {
                        metrics
                            .digest_mismatches
                            .with_label_values(&[up.name()])
                            .inc();
                    }
                    // The log keeps which check failed; the fault keeps expected and actual.
                    warn!(upstream = up.name(), error = %e, "manifest refused");
                    Error::upstream(up.name(), e.into())
                })?;
            let proof = checked.proof;
            let bucket_proof = proof.clone();
            let tag_name = tag.clone();
            let m = Arc::new(Manifest::new(
                proof.digest().clone(),
                checked.media_type,
                bytes,
            ));
            let (st, m2) = (store.clone(), m.clone());
            let (upname, repo) = (up.name().to_owned(), t.repo.to_string());
            let saved = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<Digest>> {
                let repo_key = format!("{upname}/{repo}");
                crate::storage::put_small(&**st.blobs(), &m2.bytes, proof, &repo_key)?;
                crate::storage::referrers::note_manifest(
                    &st,
                    &m2.digest,
                    &m2.media_type,
                    &m2.bytes,
                )?;
                let tag = tag.as_deref().map(|tag| {
                    (
                        upname.as_str(),
                        repo.as_str(),
                        tag,
                        std::time::SystemTime::now(),
                    )
                });
                // The upstream served it under this repository, so the repository holds what
                // it names: its blobs become readable here, and nowhere else.
                let refs = manifest_links(&st, &m2.bytes);
                st.meta().put_manifest_linked(
                    &m2.digest,
                    &m2.media_type,
                    tag,
                    Some((&upname, &repo, &refs, LinkSource::Fetched)),
                )?;
                Ok(refs)
            })
            .await;
            let refs = match saved {
                Ok(Ok(refs)) => refs,
                // The client still gets its manifest; the cache just does not keep it.
                Ok(Err(e)) => {
                    metrics.cache_write_errors.inc();
                    warn!(error = %e, digest = %m.digest, "could not cache manifest");
                    Vec::new()
                }
                Err(e) => {
                    warn!(error = %e, "manifest write task failed");
                    Vec::new()
                }
            };
            if let Some(b) = bucket.filter(|_| via.is_none()) {
                // In the background: the client's answer does not wait for the bucket. A
                // replica asked meanwhile asks the tag's owner, which has it.
                let (store, t, m) = (store.clone(), t.clone(), m.clone());
                tokio::spawn(async move {
                    share_manifest(&b, &store, &t, &m, bucket_proof, tag_name.as_deref(), &refs)
                        .await
                });
            }
            memory.insert(m.digest.clone(), m.clone()).await;
            Ok(m)
        }
    }

    // === passthrough ===

    /// GETs a tags list or referrers index from upstream, body read whole (capped).
    pub async fn passthrough(
        &self,
        t: &Target,
        op: Op,
        path_and_query: String,
    ) -> Result<Arc<Passthrough>, Error> {
        if self.offline {
            return Err(self.offline_error(t));
        }
        let key = format!("{}\0{}", t.upstream.name(), path_and_query);
        if matches!(op, Op::Referrers)
            && let Some(p) = self.referrers.get(&key).await
        {
            return Ok(p);
        }
        let up = &t.upstream;
        let accept = matches!(op, Op::Referrers).then(|| manifest::OCI_INDEX.to_owned());
        let started = std::time::Instant::now();
        let resp = up
            .send(UpstreamRequest {
                method: Method::GET,
                op,
                repo: &t.repo,
                path_and_query,
                accept,
                range: None,
            })
            .await?;
        if !resp.status().is_success() {
            return Err(up.status_error(&resp));
        }
        let headers = resp.headers().clone();
        let status = resp.status();
        let body = up.read_small(resp.into_body(), MAX_PASSTHROUGH).await?;
        self.metrics.upstream_done(up.name(), op.as_str(), started);
        let p = Arc::new(Passthrough {
            status,
            headers,
            body,
        });
        if matches!(op, Op::Referrers) {
            self.referrers.insert(key, p.clone()).await;
        }
        Ok(p)
    }
}

/// Most digests one manifest links (an index of indexes as deep as they are cached).
const MAX_LINKED: usize = 10_000;

/// What a manifest links to its repository: every digest it names, and what the cached
/// manifests among those name in turn (an index fetched under a second repository after its
/// platforms' manifests were cached under a first links their layers too). Blocking.
fn manifest_links(store: &Store, bytes: &[u8]) -> Vec<Digest> {
    let mut out = crate::oci::descriptor::referenced_digests(bytes);
    let mut seen: std::collections::HashSet<Digest> = out.iter().cloned().collect();
    let mut i = 0;
    while i < out.len() && out.len() < MAX_LINKED {
        let d = out[i].clone();
        i += 1;
        if !matches!(store.meta().manifest_type(&d), Ok(Some(_))) {
            continue;
        }
        let Ok(Some(blob)) = store.blobs().open(&d, Access::Quiet) else {
            continue;
        };
        let Ok(child) = blob.read_all(MAX_MANIFEST_SIZE) else {
            continue;
        };
        for c in crate::oci::descriptor::referenced_digests(&child) {
            if seen.insert(c.clone()) {
                out.push(c);
            }
        }
    }
    out
}

/// Puts a manifest fetched from the upstream into the bucket, with what it links to `t`'s
/// repository and the tag that named it, so every replica serves it without asking upstream.
/// A failing bucket is logged and costs only the sharing.
async fn share_manifest(
    bucket: &Bucket,
    store: &Arc<Store>,
    t: &Target,
    m: &Manifest,
    proof: crate::oci::Verified,
    tag: Option<&str>,
    refs: &[Digest],
) {
    let (up, repo) = (t.upstream.name(), t.repo.as_str());
    let shared = async {
        bucket.put_small(m.bytes.clone(), &proof).await?;
        // A few at a time: an image of many layers is that many small PUTs.
        let digests: Vec<&Digest> = std::iter::once(&m.digest).chain(refs).collect();
        for batch in digests.chunks(8) {
            let mut puts = Vec::with_capacity(batch.len());
            for d in batch {
                puts.push(bucket.put_link(up, repo, d));
            }
            for put in futures_util::future::join_all(puts).await {
                put?;
            }
        }
        // The tag last: a replica that finds it finds what it names.
        if let Some(tag) = tag {
            share_tag(bucket, store, up, repo, tag).await?;
        }
        Ok::<(), std::io::Error>(())
    };
    if let Err(e) = shared.await {
        warn!(error = %e, digest = %m.digest, "could not share a manifest through the bucket");
    }
}

/// Writes this replica's entries for a tag to the bucket.
async fn share_tag(
    bucket: &Bucket,
    store: &Arc<Store>,
    up: &str,
    repo: &str,
    tag: &str,
) -> std::io::Result<()> {
    let (st, u, r, tg) = (
        store.clone(),
        up.to_owned(),
        repo.to_owned(),
        tag.to_owned(),
    );
    let entries = tokio::task::spawn_blocking(move || st.meta().tags(&u, &r, &tg))
        .await
        .map_err(std::io::Error::other)??;
    bucket.put_tag(up, repo, tag, &entries).await
}

/// The path a peer is asked for `what` (`blobs/<digest>`, `manifests/<ref>`) of `t`'s
/// repository: routed by `ns`, which names any configured upstream, where a path prefix would
/// need the upstream's name to be a valid repository component (`registry.corp:5000` is not).
fn peer_path(t: &Target, what: &str) -> String {
    let ns: String = form_urlencoded::byte_serialize(t.upstream.name().as_bytes()).collect();
    format!("/v2/{}/{what}?ns={ns}", t.repo)
}

/// Records that the upstream confirmed `t`'s repository holds `digest`. A failure is logged
/// and costs another HEAD next time, not this answer.
async fn remember_confirmed(store: Arc<Store>, t: &Target, digest: &Digest) {
    if let Some(b) = store.bucket().cloned() {
        let (u, r, d) = (
            t.upstream.name().to_owned(),
            t.repo.to_string(),
            digest.clone(),
        );
        tokio::spawn(async move {
            if let Err(e) = b.put_link(&u, &r, &d).await {
                warn!(error = %e, digest = %d, "could not share a confirmed link through the bucket");
            }
        });
    }
    remember_link(store, t, digest).await
}

/// Records here that `t`'s repository holds `digest`.
async fn remember_link(store: Arc<Store>, t: &Target, digest: &Digest) {
    let (u, r, d) = (
        t.upstream.name().to_owned(),
        t.repo.to_string(),
        digest.clone(),
    );
    let saved = tokio::task::spawn_blocking(move || {
        store.meta().put_link(&u, &r, &d, LinkSource::Confirmed)
    })
    .await;
    match saved {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, digest = %digest, "could not record a confirmed link"),
        Err(e) => warn!(error = %e, "link write task failed"),
    }
}

pub(crate) fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}
