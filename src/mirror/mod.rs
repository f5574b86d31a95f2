//! The pull-through state machine: look up the cache, coalesce misses, fetch, verify, commit,
//! serve. Handlers call this; it calls `storage` and `upstream`.

pub mod flight;
mod hasher;
pub mod inflight;
mod read;
mod tags;

use crate::config::Config;
use crate::error::{Error, UpstreamFault};
use crate::metrics::{Kind, Lookup, Metrics};
use crate::oci::manifest::{self, Accept, MAX_MANIFEST_SIZE, ManifestError};
use crate::oci::{Digest, ErrorCode, RepoName};
use crate::storage::{CommitError, Store};
use crate::upstream::{Op, Upstream, UpstreamRequest};
use bytes::{Bytes, BytesMut};
use flight::SingleFlight;
use futures_util::FutureExt;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use http_body_util::BodyExt;
use inflight::{FillGuard, FillState, HashState, Inflight, Joined};
use std::sync::Arc;
use std::time::Duration;
use tracing::{Instrument, info_span, warn};

pub use read::BlobHandle;

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
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    upstreams: Vec<Arc<Upstream>>,
    default: Option<Arc<Upstream>>,
    memory: moka::future::Cache<Digest, Arc<Manifest>>,
    referrers: moka::future::Cache<String, Arc<Passthrough>>,
    fills: Arc<Inflight>,
    manifest_flights: SingleFlight<String, (Arc<Manifest>, Lookup)>,
    tag_ttl: Duration,
    offline: bool,
    /// Woken after each commit, so eviction runs as soon as the cache passes its bound.
    pub evict_wakeup: Arc<tokio::sync::Notify>,
    pub eviction: crate::storage::evict::Policy,
}

/// Cap on passthrough bodies (tags lists, referrer indexes), which are buffered.
const MAX_PASSTHROUGH: usize = 4 * 1024 * 1024;
/// Bytes gathered from upstream before a write to the temp file.
const FILL_CHUNK: usize = 1 << 20;
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
        Ok(Mirror {
            store,
            metrics,
            upstreams,
            default,
            memory,
            referrers,
            fills: Arc::new(Inflight::default()),
            manifest_flights: SingleFlight::default(),
            tag_ttl: config.cache.tag_ttl.0,
            offline: config.cache.offline,
            evict_wakeup: Arc::new(tokio::sync::Notify::new()),
            eviction: config.eviction_policy(),
        })
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
            repo.with_library_prefix()
        } else {
            repo
        };
        crate::telemetry::record_target(upstream.name(), repo.as_str());
        Ok(Target {
            upstream,
            repo,
            client_name: name.to_owned(),
            ns: ns.map(str::to_owned),
        })
    }

    fn offline_error(&self, t: &Target) -> Error {
        Error::upstream(t.upstream.name(), UpstreamFault::Offline)
    }

    // === manifests ===

    /// A manifest by digest: memory, then disk, then one upstream fetch shared by all callers.
    pub async fn manifest_by_digest(
        &self,
        t: &Target,
        digest: &Digest,
    ) -> Result<Arc<Manifest>, Error> {
        if let Some(m) = self.cached_manifest(digest).await? {
            self.metrics.lookup(Kind::Manifest, Lookup::Hit);
            return Ok(m);
        }
        if self.offline {
            self.metrics.lookup(Kind::Manifest, Lookup::Miss);
            return Err(self.offline_error(t));
        }
        let key = format!("d\0{}", digest);
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
        self.metrics.lookup(
            Kind::Manifest,
            if leader {
                Lookup::Miss
            } else {
                Lookup::Coalesced
            },
        );
        res.map(|(m, _)| m)
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
                let Some(media_type) = store.meta.manifest_type(&d)? else {
                    return Ok(None);
                };
                Ok(store
                    .read_small(&d, MAX_MANIFEST_SIZE)?
                    .map(|b| (b, media_type)))
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
        let t = t.clone();
        let store = self.store.clone();
        let memory = self.memory.clone();
        let metrics = self.metrics.clone();
        async move {
            let up = &t.upstream;
            let started = std::time::Instant::now();
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
            let m = Arc::new(Manifest::new(checked.digest, checked.media_type, bytes));
            let (st, m2) = (store.clone(), m.clone());
            let (upname, repo) = (up.name().to_owned(), t.repo.to_string());
            let saved = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                st.put_small(&m2.digest, &m2.bytes, &format!("{upname}/{repo}"))?;
                let tag = tag.as_deref().map(|tag| {
                    (
                        upname.as_str(),
                        repo.as_str(),
                        tag,
                        std::time::SystemTime::now(),
                    )
                });
                st.meta.put_manifest(&m2.digest, &m2.media_type, tag)
            })
            .await;
            match saved {
                Ok(Ok(())) => {}
                // The client still gets its manifest; the cache just does not keep it.
                Ok(Err(e)) => {
                    metrics.cache_write_errors.inc();
                    warn!(error = %e, digest = %m.digest, "could not cache manifest");
                }
                Err(e) => warn!(error = %e, "manifest write task failed"),
            }
            memory.insert(m.digest.clone(), m.clone()).await;
            Ok(m)
        }
    }

    // === blobs ===

    /// Waits, at most `limit`, for fills that have verified their blob to commit it: their
    /// clients are already served, and stopping now would throw the blob away and keep the
    /// cache busy for the next process.
    pub async fn finish_commits(&self, limit: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.fills.committing() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Opens a blob for reading: the committed file, or a fill (started now, or joined).
    pub async fn blob(&self, t: &Target, digest: &Digest) -> Result<BlobHandle, Error> {
        if let Some(h) = self.committed_blob(digest)? {
            self.metrics.lookup(Kind::Blob, Lookup::Hit);
            return Ok(h);
        }
        if self.offline {
            self.metrics.lookup(Kind::Blob, Lookup::Miss);
            return Err(self.offline_error(t));
        }
        /// Why no fill was started.
        enum NoFill {
            /// A fill committed and left the table since the lookup above: starting another
            /// would fetch the blob twice.
            Committed(Box<BlobHandle>),
            /// The cache cannot take a new file (full disk, I/O error).
            CannotWrite(std::io::Error),
            Failed(Error),
        }
        let store = &self.store;
        let joined = self.fills.join_or_start(digest, || {
            match store.open_blob(digest) {
                Ok(Some((file, len))) => {
                    return Err(NoFill::Committed(Box::new(BlobHandle::committed(
                        file, len,
                    ))));
                }
                Ok(None) => {}
                Err(e) => return Err(NoFill::Failed(e.into())),
            }
            let w = store.writer(digest).map_err(NoFill::CannotWrite)?;
            Ok((w.temp_path().to_path_buf(), store.blob_path(digest), w))
        });
        let fill = match joined {
            Ok(Joined::Follow(fill)) => {
                self.metrics.lookup(Kind::Blob, Lookup::Coalesced);
                fill
            }
            Ok(Joined::Started(fill, guard, writer)) => {
                self.metrics.lookup(Kind::Blob, Lookup::Miss);
                let task = run_fill(
                    t.clone(),
                    digest.clone(),
                    writer,
                    guard,
                    self.store.clone(),
                    self.metrics.clone(),
                    self.evict_wakeup.clone(),
                );
                tokio::spawn(task.instrument(info_span!("fill", digest = %digest)));
                fill
            }
            Err(NoFill::Committed(h)) => {
                self.metrics.lookup(Kind::Blob, Lookup::Hit);
                return Ok(*h);
            }
            Err(NoFill::CannotWrite(e)) => {
                // A full or failing disk costs caching, not the pull.
                self.metrics.lookup(Kind::Blob, Lookup::Miss);
                self.metrics.cache_write_errors.inc();
                warn!(error = %e, digest = %digest, "cannot write to the cache; passing the blob through");
                return self.pass_through(t, digest).await;
            }
            Err(NoFill::Failed(e)) => return Err(e),
        };
        let len = fill.started().await?;
        BlobHandle::following(&fill, len, t, digest)
    }

    /// GETs a blob from upstream for a client without caching it (the cache cannot be written).
    async fn pass_through(&self, t: &Target, digest: &Digest) -> Result<BlobHandle, Error> {
        let up = &t.upstream;
        let resp = up.send(t.blob_request(Method::GET, digest, None)).await?;
        if !resp.status().is_success() {
            return Err(up.status_error(&resp));
        }
        let len = content_length(resp.headers());
        Ok(BlobHandle::pass_through(resp.into_body(), len, t, digest))
    }

    fn committed_blob(&self, digest: &Digest) -> Result<Option<BlobHandle>, Error> {
        Ok(self
            .store
            .open_blob(digest)?
            .map(|(file, len)| BlobHandle::committed(file, len)))
    }

    /// The length of a blob for HEAD: from the cache or a fill when possible, else an upstream
    /// HEAD (which fetches nothing).
    pub async fn blob_len(&self, t: &Target, digest: &Digest) -> Result<u64, Error> {
        if let Some((_, len)) = self.store.open_blob(digest)? {
            self.metrics.lookup(Kind::Blob, Lookup::Hit);
            return Ok(len);
        }
        if let Some(fill) = self.fills.get(digest)
            && let Ok(Some(len)) = fill.started().await
        {
            self.metrics.lookup(Kind::Blob, Lookup::Coalesced);
            return Ok(len);
        }
        self.metrics.lookup(Kind::Blob, Lookup::Miss);
        if self.offline {
            return Err(self.offline_error(t));
        }
        let up = &t.upstream;
        let resp = up.send(t.blob_request(Method::HEAD, digest, None)).await?;
        if !resp.status().is_success() {
            return Err(up.status_error(&resp));
        }
        content_length(resp.headers()).ok_or_else(|| {
            Error::upstream(
                up.name(),
                UpstreamFault::Protocol("blob HEAD without Content-Length".into()),
            )
        })
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

    pub fn fills_in_flight(&self) -> usize {
        self.fills.len()
    }
}

pub(crate) fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// The fill task: GET the blob, stream it into the temp file while hashing, publish progress,
/// and commit only a verified body. Runs detached from any client.
#[allow(clippy::too_many_arguments)]
async fn run_fill(
    t: Target,
    digest: Digest,
    writer: crate::storage::BlobWriter,
    guard: FillGuard,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    evict_wakeup: Arc<tokio::sync::Notify>,
) {
    metrics.fills_in_flight.inc();
    let started = std::time::Instant::now();
    let result = fill_body(&t, &digest, writer, &guard, &store, &metrics).await;
    // Let go of the cache before followers hear the end: a server shut down after its last
    // pull must not find its metadata still held by a finishing fill.
    drop(store);
    metrics.upstream_done(t.upstream.name(), Op::Blob.as_str(), started);
    metrics.fills_in_flight.dec();
    match result {
        Ok(len) => {
            guard.finish(FillState::Done { len });
            evict_wakeup.notify_one();
        }
        Err(FillState::Failed(e)) => {
            warn!(error = %e, upstream = t.upstream.name(), "blob fill failed; nothing stored");
            guard.finish(FillState::Failed(e));
        }
        Err(other) => guard.finish(other),
    }
}

async fn fill_body(
    t: &Target,
    digest: &Digest,
    writer: crate::storage::BlobWriter,
    guard: &FillGuard,
    store: &Arc<Store>,
    metrics: &Metrics,
) -> Result<u64, FillState> {
    let up = &t.upstream;
    let failed = FillState::Failed;
    let resp = up
        .send(t.blob_request(Method::GET, digest, None))
        .await
        .map_err(failed)?;
    if !resp.status().is_success() {
        return Err(failed(up.status_error(&resp)));
    }
    let len = content_length(resp.headers());
    guard
        .tx
        .send_replace(FillState::Streaming { len, written: 0 });
    let mut body = resp.into_body();
    let mut writer = writer;
    writer.hash_elsewhere();
    let readback = std::fs::File::open(writer.temp_path())
        .map_err(|e| failed(Error::Internal(format!("reopening the fill file: {e}"))))?;
    let hasher = hasher::Hasher::start(digest.algorithm(), readback);
    let mut writer = Some(writer);
    let mut buf = BytesMut::with_capacity(FILL_CHUNK);
    let mut eof = false;
    let upstream_err = |e: hyper::Error, got: u64| match len {
        Some(expected)
            if e.is_incomplete_message() || e.is_body_write_aborted() || got < expected =>
        {
            Error::upstream(up.name(), UpstreamFault::Truncated { expected, got })
        }
        _ => Error::upstream(up.name(), UpstreamFault::Protocol(format!("body: {e}"))),
    };
    while !eof {
        let written = writer.as_ref().map_or(0, |w| w.written());
        let first = tokio::time::timeout(up.body_timeout(), body.frame())
            .await
            .map_err(|_| {
                failed(Error::upstream(
                    up.name(),
                    UpstreamFault::Timeout("waiting for the blob body"),
                ))
            })?;
        match first {
            None => eof = true,
            Some(Err(e)) => {
                return Err(failed(count_bad(
                    metrics,
                    up,
                    upstream_err(e, written + buf.len() as u64),
                )));
            }
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    buf.extend_from_slice(&d);
                }
            }
        }
        // Take whatever else has already arrived, so disk writes are large but a paused
        // upstream never holds back bytes that followers could already have.
        while !eof && buf.len() < FILL_CHUNK {
            match body.frame().now_or_never() {
                None => break,
                Some(None) => eof = true,
                Some(Some(Err(e))) => {
                    return Err(failed(count_bad(
                        metrics,
                        up,
                        upstream_err(e, written + buf.len() as u64),
                    )));
                }
                Some(Some(Ok(f))) => {
                    if let Ok(d) = f.into_data() {
                        buf.extend_from_slice(&d);
                    }
                }
            }
        }
        if buf.is_empty() {
            continue;
        }
        if let Some(expected) = len
            && written + buf.len() as u64 > expected
        {
            return Err(failed(count_bad(
                metrics,
                up,
                Error::upstream(
                    up.name(),
                    UpstreamFault::Protocol(format!(
                        "body longer than its Content-Length {expected}"
                    )),
                ),
            )));
        }
        let mut w = writer
            .take()
            .ok_or_else(|| failed(Error::Internal("writer lost".into())))?;
        let chunk = std::mem::take(&mut buf);
        let n = chunk.len() as u64;
        let (w, wrote, mut chunk) = tokio::task::spawn_blocking(move || {
            let wrote = w.write(&chunk);
            (w, wrote, chunk)
        })
        .await
        .map_err(|e| failed(Error::Internal(e.to_string())))?;
        // The hash reads the file, so the buffer is free again.
        chunk.clear();
        buf = chunk;
        if let Err(e) = wrote {
            // The upstream is fine; only the cache is not. Followers take it from here.
            metrics.cache_write_errors.inc();
            warn!(error = %e, digest = %digest, "cache write failed; followers continue from upstream");
            let hash = hasher
                .snapshot(w.written())
                .await
                .map(|v| HashState(Box::new(v)))
                .ok_or_else(|| failed(Error::Internal("no hash state".into())))?;
            return Err(FillState::Diverted {
                at: w.written(),
                len,
                hash,
            });
        }
        hasher.written(w.written());
        metrics
            .upstream_bytes
            .with_label_values(&[up.name()])
            .inc_by(n);
        let now = w.written();
        writer = Some(w);
        guard
            .tx
            .send_replace(FillState::Streaming { len, written: now });
    }
    let w = writer.ok_or_else(|| failed(Error::Internal("writer lost".into())))?;
    let got = w.written();
    if let Some(expected) = len
        && got != expected
    {
        return Err(failed(count_bad(
            metrics,
            up,
            Error::upstream(up.name(), UpstreamFault::Truncated { expected, got }),
        )));
    }
    let mut w = w;
    let actual = hasher
        .finish()
        .await
        .map_err(|e| failed(Error::Internal(format!("hashing the fill file: {e}"))))?;
    if actual == *digest {
        // Release the followers' last byte now: the commit's fsyncs take a while for a large
        // blob and add nothing to the client's bytes, which are already verified.
        guard.tx.send_replace(FillState::Verified { len: got });
    }
    w.set_hashed(actual);
    let repo = format!("{}/{}", up.name(), t.repo);
    let st = store.clone();
    let committed = tokio::task::spawn_blocking(move || st.commit(w, &repo))
        .await
        .map_err(|e| failed(Error::Internal(e.to_string())))?;
    match committed {
        Ok(len) => Ok(len),
        Err(CommitError::Mismatch { expected, actual }) => Err(failed(count_bad(
            metrics,
            up,
            Error::upstream(
                up.name(),
                UpstreamFault::DigestMismatch { expected, actual },
            ),
        ))),
        Err(CommitError::Io(e)) => {
            // Verified, but not stored: followers hold the whole file open and can finish.
            metrics.cache_write_errors.inc();
            warn!(error = %e, digest = %digest, "could not commit a verified blob; served, not cached");
            Err(FillState::Done { len: got })
        }
    }
}

fn count_bad(metrics: &Metrics, up: &Upstream, e: Error) -> Error {
    metrics
        .digest_mismatches
        .with_label_values(&[up.name()])
        .inc();
    e
}
