//! The fill task: GETs a blob, streams it into the store while a hasher follows it (in the
//! chunks' own buffers, or reading the store back when it falls behind), publishes progress to
//! the followers, and commits only a verified body. It runs detached
//! from any client, so a client that goes away never cancels it (DESIGN.md invariant 3).
//!
//! A fill reads from one of three places ([`FillBody`]): the upstream, the replica that owns
//! the digest, or the shared bucket. Whatever the place, the bytes are hashed and verified the
//! same way, so a peer or a bucket can lose bytes but never pass off wrong ones. When a peer or
//! the bucket fails midway, the fill goes on from the upstream at the byte it reached. Bytes from
//! the upstream may also be copied into the bucket as they pass ([`Tee`]), completed there only
//! once verified.
//!
//! A fill has an age limit: the upstream's `timeout` for the first bytes, plus the blob's size
//! at `cache.fill_min_rate`. A trickling upstream fails the fill like a timeout (504) instead of
//! holding its followers forever; the idle timeout between body frames would never fire on it.

use super::Target;
use super::hasher::Hasher;
use super::inflight::{FillGuard, HashState};
use crate::error::{Error, UpstreamFault};
use crate::metrics::{BodyFault, Metrics};
use crate::oci::Digest;
use crate::oci::Verified;
use crate::storage::{BlobWriter, Bucket, ReadAt};
use crate::upstream::UpstreamBody;
use crate::upstream::{Op, Upstream};
use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{FutureExt, StreamExt};
use http::Method;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tracing::warn;

/// Bytes gathered from upstream before a write to the store.
const FILL_CHUNK: usize = 1 << 20;

/// Where a fill's bytes come from.
pub(super) enum FillBody {
    /// The upstream registry; `skip` bytes are dropped first (a resumed fill whose upstream
    /// ignored the Range).
    Upstream { body: UpstreamBody, skip: u64 },
    /// The replica that owns the digest, which fetches it once for every replica.
    Peer(Incoming),
    /// The shared bucket, whose copy is taken out of it if its bytes turn out not to match.
    Bucket(BoxStream<'static, io::Result<Bytes>>, Bucket),
}

/// A body frame as the fill sees it.
enum Frame {
    Data(Bytes),
    End,
    Upstream(hyper::Error),
    /// A peer or the bucket failed: the fill goes on from the upstream.
    Elsewhere(String),
}

impl FillBody {
    fn is_upstream(&self) -> bool {
        matches!(self, FillBody::Upstream { .. })
    }

    fn place(&self) -> &'static str {
        match self {
            FillBody::Upstream { .. } => "upstream",
            FillBody::Peer(_) => "peer",
            FillBody::Bucket(..) => "bucket",
        }
    }

    async fn next(&mut self) -> Frame {
        loop {
            let frame = match self {
                FillBody::Upstream { body, .. } => match body.frame().await {
                    None => Frame::End,
                    Some(Err(e)) => Frame::Upstream(e),
                    Some(Ok(f)) => match f.into_data() {
                        Ok(d) => Frame::Data(d),
                        Err(_) => continue,
                    },
                },
                FillBody::Peer(body) => match body.frame().await {
                    None => Frame::End,
                    Some(Err(e)) => Frame::Elsewhere(format!("peer body: {e}")),
                    Some(Ok(f)) => match f.into_data() {
                        Ok(d) => Frame::Data(d),
                        Err(_) => continue,
                    },
                },
                FillBody::Bucket(s, _) => match s.next().await {
                    None => Frame::End,
                    Some(Err(e)) => Frame::Elsewhere(format!("bucket read: {e}")),
                    Some(Ok(d)) => Frame::Data(d),
                },
            };
            if let (FillBody::Upstream { skip, .. }, Frame::Data(d)) = (&mut *self, &frame)
                && *skip > 0
            {
                let drop = (*skip).min(d.len() as u64);
                *skip -= drop;
                // Possibly empty: the caller waits afresh for each frame, so skipping a long
                // prefix is never taken for an idle body.
                return Frame::Data(d.slice(drop as usize..));
            }
            return frame;
        }
    }
}

/// A copy of an upstream fill on its way into the bucket.
pub(super) trait Tee: Send {
    /// Never waits: a copy that cannot keep up gives up (and says so), the fill goes on.
    fn write(&mut self, data: Bytes) -> io::Result<()>;
    /// Completes the copy, which `proof` must be for; otherwise it is abandoned unseen.
    fn finish(self: Box<Self>, proof: Verified) -> BoxFuture<'static, io::Result<()>>;
}

/// Where a fill starts reading, chosen by the mirror (cache tiers, owner, upstream).
pub(super) struct Opened {
    pub body: FillBody,
    /// The blob's length when the source declared it.
    pub len: Option<u64>,
    pub tee: Option<Box<dyn Tee>>,
}

/// Everything one fill needs; `run` consumes it.
pub(super) struct FillTask {
    pub t: Target,
    pub digest: Digest,
    /// Opens the source; `None`: a GET from the upstream.
    pub open: Option<BoxFuture<'static, Result<Opened, Error>>>,
    pub writer: Box<dyn BlobWriter>,
    /// The growing object, for the hasher to read back.
    pub reader: Arc<dyn ReadAt>,
    pub guard: FillGuard,
    pub metrics: Arc<Metrics>,
    pub evict_wakeup: Arc<tokio::sync::Notify>,
    /// `cache.fill_min_rate`, bytes per second.
    pub min_rate: u64,
    /// `cache.offline`.
    pub offline: bool,
}

/// How a fill ended.
enum Outcome {
    Committed(u64),
    /// Verified, but the store failed to commit it: followers hold every byte and finish.
    Uncommitted(u64),
    /// The store failed midway; followers take the rest from upstream.
    Diverted {
        at: u64,
        len: Option<u64>,
        hash: HashState,
    },
    Failed(Error),
}

/// Why copying the body stopped early.
enum Stop {
    Upstream(Error),
    /// A peer or the bucket failed; the upstream may still have the rest.
    Elsewhere(String),
    /// A write to the store failed; the upstream is fine.
    Store(std::io::Error),
}

impl FillTask {
    pub(super) async fn run(self) {
        let FillTask {
            t,
            digest,
            open,
            writer,
            reader,
            guard,
            metrics,
            evict_wakeup,
            min_rate,
            offline,
        } = self;
        metrics.fills_in_flight.inc();
        let outcome = fetch(
            &t, &digest, open, writer, reader, &guard, &metrics, min_rate, offline,
        )
        .await;
        metrics.fills_in_flight.dec();
        match outcome {
            Outcome::Committed(len) => {
                guard.done(len, true);
                evict_wakeup.notify_one();
            }
            Outcome::Uncommitted(len) => guard.done(len, false),
            Outcome::Diverted { at, len, hash } => guard.diverted(at, len, hash),
            Outcome::Failed(e) => {
                warn!(error = %e, upstream = t.upstream.name(), "blob fill failed; nothing stored");
                guard.failed(e);
            }
        }
    }
}

/// GETs the blob from the upstream, from byte `from` on.
pub(super) async fn from_upstream(t: &Target, digest: &Digest, from: u64) -> Result<Opened, Error> {
    let up = &t.upstream;
    let range = (from > 0).then(|| {
        http::HeaderValue::try_from(format!("bytes={from}-")).expect("a range is a header value")
    });
    let resp = up.send(t.blob_request(Method::GET, digest, range)).await?;
    if !resp.status().is_success() {
        return Err(up.status_error(&resp));
    }
    let partial = resp.status() == http::StatusCode::PARTIAL_CONTENT;
    let len = super::content_length(resp.headers()).map(|l| if partial { l + from } else { l });
    let skip = if partial { 0 } else { from };
    Ok(Opened {
        body: FillBody::Upstream {
            body: resp.into_body(),
            skip,
        },
        len,
        tee: None,
    })
}

#[allow(clippy::too_many_arguments)]
async fn fetch(
    t: &Target,
    digest: &Digest,
    open: Option<BoxFuture<'static, Result<Opened, Error>>>,
    writer: Box<dyn BlobWriter>,
    reader: Arc<dyn ReadAt>,
    guard: &FillGuard,
    metrics: &Metrics,
    min_rate: u64,
    offline: bool,
) -> Outcome {
    let up = &t.upstream;
    let started = Instant::now();
    let opened = match open {
        Some(open) => open.await,
        None => from_upstream(t, digest, 0).await,
    };
    let Opened { body, len, tee } = match opened {
        Ok(o) => o,
        Err(e) => return Outcome::Failed(e),
    };
    let upstream_started = body.is_upstream().then(std::time::Instant::now);
    let from_bucket = match &body {
        FillBody::Bucket(_, b) => Some(b.clone()),
        _ => None,
    };
    guard.streaming(len, 0);
    let limit = AgeLimit {
        started,
        grace: up.header_timeout(),
        min_rate,
    };
    let hasher = Hasher::start(digest.algorithm(), reader);
    let copy = Copy {
        t,
        digest,
        hasher: &hasher,
        guard,
        len,
        limit: &limit,
        metrics,
        offline,
    };
    let copied = copy.run(body, writer, tee).await;
    if let Some(at) = upstream_started {
        metrics.upstream_done(up.name(), Op::Blob.as_str(), at);
    }
    let (writer, tee) = match copied {
        Ok(w) => w,
        Err((Stop::Upstream(e), _)) => return Outcome::Failed(e),
        Err((Stop::Elsewhere(e), _)) => return Outcome::Failed(Error::Internal(e)),
        Err((Stop::Store(e), at)) => {
            // The upstream is fine; only the cache is not. Followers take it from here.
            metrics.cache_write_errors.inc();
            warn!(error = %e, digest = %digest, "cache write failed; followers continue from upstream");
            return match hasher.snapshot(at).await {
                Some(v) => Outcome::Diverted {
                    at,
                    len,
                    hash: HashState(Box::new(v)),
                },
                None => Outcome::Failed(Error::Internal("no hash state".into())),
            };
        }
    };
    let outcome = finish(t, digest, writer, tee, hasher, guard, len, metrics).await;
    let mismatch = matches!(
        &outcome,
        Outcome::Failed(Error::Upstream {
            fault: UpstreamFault::DigestMismatch { .. },
            ..
        })
    );
    if let (true, Some(b)) = (mismatch, from_bucket) {
        // The fill started from the bucket and its bytes did not verify. Were the bucket's
        // copy left there, every pull of it on every replica would fail the same way: it is
        // taken out (to the bucket's quarantine/), so the client's retry fetches it again.
        // A fill that went on from the upstream midway cannot tell whose bytes were wrong;
        // the bucket's copy goes all the same, costing at worst one more upstream fetch.
        match b.quarantine(digest, len.unwrap_or(0)).await {
            Ok(()) => {
                warn!(digest = %digest, "the bucket's copy did not match its digest; taken out of the bucket, the next pull fetches it again")
            }
            Err(e) => {
                warn!(digest = %digest, error = %e, "the bucket's copy did not match its digest and could not be taken out")
            }
        }
    }
    outcome
}

/// The body is all there: checks its length and digest, releases the followers' last byte,
/// and commits (the bucket's copy first, so a blob is in the bucket before any replica could
/// learn of it from this one).
#[allow(clippy::too_many_arguments)]
async fn finish(
    t: &Target,
    digest: &Digest,
    writer: Box<dyn BlobWriter>,
    tee: Option<Box<dyn Tee>>,
    hasher: Hasher,
    guard: &FillGuard,
    len: Option<u64>,
    metrics: &Metrics,
) -> Outcome {
    let up = &t.upstream;
    let got = writer.written();
    if let Some(expected) = len
        && got != expected
    {
        metrics.upstream_body_error(up.name(), BodyFault::Truncated);
        return Outcome::Failed(Error::upstream(
            up.name(),
            UpstreamFault::Truncated { expected, got },
        ));
    }
    let proof = match hasher.finish().await {
        Ok(v) => v.verify(digest),
        Err(e) => {
            return Outcome::Failed(Error::Internal(format!("hashing the fill: {e}")));
        }
    };
    let proof = match proof {
        Ok(p) => p,
        Err(m) => {
            metrics
                .digest_mismatches
                .with_label_values(&[up.name()])
                .inc();
            return Outcome::Failed(Error::upstream(
                up.name(),
                UpstreamFault::DigestMismatch {
                    expected: m.expected.to_string(),
                    actual: m.actual.to_string(),
                },
            ));
        }
    };
    // Release the followers' last byte now: the commit's fsyncs take a while for a large blob
    // and add nothing to the client's bytes, which are already verified.
    guard.verified(got);
    if let Some(tee) = tee
        && let Err(e) = tee.finish(proof.clone()).await
    {
        warn!(error = %e, digest = %digest, "could not complete the bucket's copy; cached here only");
    }
    let repo = format!("{}/{}", up.name(), t.repo);
    let committed = tokio::task::spawn_blocking(move || writer.commit(proof, &repo)).await;
    match committed {
        Ok(Ok(len)) => Outcome::Committed(len),
        Ok(Err(e)) => {
            metrics.cache_write_errors.inc();
            warn!(error = %e, digest = %digest, "could not commit a verified blob; served, not cached");
            Outcome::Uncommitted(got)
        }
        Err(e) => Outcome::Failed(Error::Internal(e.to_string())),
    }
}

/// When a fill must be over: `grace` for the upstream to get going, plus its bytes at
/// `min_rate`.
struct AgeLimit {
    started: Instant,
    grace: Duration,
    min_rate: u64,
}

impl AgeLimit {
    /// The deadline for a blob of `bytes` (its declared length, or what has arrived so far).
    fn deadline(&self, bytes: u64) -> Instant {
        self.started + self.grace + Duration::from_secs_f64(bytes as f64 / self.min_rate as f64)
    }
}

/// What copying a body needs besides the body and the writer.
struct Copy<'a> {
    t: &'a Target,
    digest: &'a Digest,
    hasher: &'a Hasher,
    guard: &'a FillGuard,
    len: Option<u64>,
    limit: &'a AgeLimit,
    metrics: &'a Metrics,
    /// `cache.offline`: a failed peer or bucket is not replaced by the upstream.
    offline: bool,
}

impl Copy<'_> {
    /// Streams the body into the store, a large write at a time, handing each to the hasher and
    /// telling the followers how far it got, and copying upstream bytes to `tee`. A peer or bucket that
    /// fails is replaced by the upstream from the byte reached. Hands the writer back, or says
    /// why it stopped and how many bytes were stored by then.
    async fn run(
        &self,
        mut body: FillBody,
        mut writer: Box<dyn BlobWriter>,
        mut tee: Option<Box<dyn Tee>>,
    ) -> Result<(Box<dyn BlobWriter>, Option<Box<dyn Tee>>), (Stop, u64)> {
        let up = &*self.t.upstream;
        let mut buf = BytesMut::with_capacity(FILL_CHUNK);
        let mut eof = false;
        while !eof {
            let written = writer.written();
            let have = written + buf.len() as u64;
            let deadline = self.limit.deadline(self.len.unwrap_or(0).max(have));
            eof = match self.next_frames(&mut body, &mut buf, deadline, have).await {
                Ok(eof) => eof,
                Err(Stop::Elsewhere(why)) if self.offline => {
                    warn!(digest = %self.digest, error = %why, "fill source failed, and offline there is nowhere else to go");
                    let offline = Error::upstream(up.name(), UpstreamFault::Offline);
                    return Err((Stop::Upstream(offline), written));
                }
                Err(Stop::Elsewhere(why)) => {
                    // Bytes already here were read whole; the upstream supplies the rest.
                    let at = written + buf.len() as u64;
                    warn!(digest = %self.digest, from = body.place(), at, error = %why, "fill source failed; going on from upstream");
                    self.metrics.fill_source_fallback(body.place());
                    body = from_upstream(self.t, self.digest, at)
                        .await
                        .map_err(|e| (Stop::Upstream(e), written))?
                        .body;
                    false
                }
                Err(s) => return Err((s, written)),
            };
            if buf.is_empty() {
                continue;
            }
            if let Some(expected) = self.len
                && written + buf.len() as u64 > expected
            {
                self.metrics
                    .upstream_body_error(up.name(), BodyFault::Protocol);
                let e = UpstreamFault::Protocol(format!(
                    "body longer than its Content-Length {expected}"
                ));
                return Err((Stop::Upstream(Error::upstream(up.name(), e)), written));
            }
            let chunk = std::mem::take(&mut buf);
            let (w, wrote, chunk) = tokio::task::spawn_blocking(move || {
                let wrote = writer.write(&chunk);
                (writer, wrote, chunk)
            })
            .await
            .map_err(|e| (Stop::Upstream(Error::Internal(e.to_string())), written))?;
            writer = w;
            wrote.map_err(|e| (Stop::Store(e), written))?;
            if let Some(t) = tee.as_mut().filter(|_| body.is_upstream()) {
                // A copy of exactly these bytes: handing over the buffer itself would keep its
                // whole capacity alive for each small frame the bucket has not taken yet.
                if let Err(e) = t.write(Bytes::copy_from_slice(&chunk)) {
                    warn!(error = %e, digest = %self.digest, "the bucket's copy fell behind or failed; cached here only");
                    tee = None;
                }
            }
            buf = self.hasher.wrote(written, chunk);
            let now = writer.written();
            if body.is_upstream() {
                self.metrics
                    .upstream_bytes
                    .with_label_values(&[up.name()])
                    .inc_by(now - written);
            }
            self.guard.streaming(self.len, now);
        }
        Ok((writer, tee))
    }

    /// Waits for the next body frame (at most until the idle timeout or the fill's deadline),
    /// then takes whatever else has already arrived, so writes are large but a paused source
    /// never holds back bytes that followers could already have. Returns whether the body ended.
    async fn next_frames(
        &self,
        body: &mut FillBody,
        buf: &mut BytesMut,
        deadline: Instant,
        have: u64,
    ) -> Result<bool, Stop> {
        let up = &*self.t.upstream;
        let idle = Instant::now() + up.body_timeout();
        let first = match tokio::time::timeout_at(idle.min(deadline), body.next()).await {
            Ok(f) => f,
            Err(_) if !body.is_upstream() && Instant::now() < deadline => {
                return Err(Stop::Elsewhere(format!("{} went quiet", body.place())));
            }
            Err(_) => {
                let what = if Instant::now() >= deadline {
                    "the fill fell below cache.fill_min_rate"
                } else {
                    "waiting for the blob body"
                };
                return Err(Stop::Upstream(Error::upstream(
                    up.name(),
                    UpstreamFault::Timeout(what),
                )));
            }
        };
        let mut frame = Some(first);
        while let Some(f) = frame {
            match f {
                Frame::End => return Ok(true),
                Frame::Elsewhere(why) => return Err(Stop::Elsewhere(why)),
                Frame::Upstream(e) => {
                    let got = have + buf.len() as u64;
                    return Err(Stop::Upstream(body_error(
                        up,
                        e,
                        self.len,
                        got,
                        self.metrics,
                    )));
                }
                Frame::Data(d) => buf.extend_from_slice(&d),
            }
            frame = if buf.len() < FILL_CHUNK {
                body.next().now_or_never()
            } else {
                None
            };
        }
        Ok(false)
    }
}

/// A transport error in the body: a truncation when it came short of a declared length.
fn body_error(
    up: &Upstream,
    e: hyper::Error,
    len: Option<u64>,
    got: u64,
    metrics: &Metrics,
) -> Error {
    match len {
        Some(expected)
            if e.is_incomplete_message() || e.is_body_write_aborted() || got < expected =>
        {
            metrics.upstream_body_error(up.name(), BodyFault::Truncated);
            Error::upstream(up.name(), UpstreamFault::Truncated { expected, got })
        }
        _ => {
            metrics.upstream_body_error(up.name(), BodyFault::Protocol);
            Error::upstream(up.name(), UpstreamFault::Protocol(format!("body: {e}")))
        }
    }
}
