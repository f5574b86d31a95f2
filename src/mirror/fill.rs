//! The fill task: GETs a blob, streams it into the store while a hasher reads it back,
//! publishes progress to the followers, and commits only a verified body. It runs detached
//! from any client, so a client that goes away never cancels it (DESIGN.md invariant 3).
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
use crate::storage::{BlobWriter, ReadAt};
use crate::upstream::UpstreamBody;
use crate::upstream::{Op, Upstream};
use bytes::BytesMut;
use futures_util::FutureExt;
use http::Method;
use http_body_util::BodyExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tracing::warn;

/// Bytes gathered from upstream before a write to the store.
const FILL_CHUNK: usize = 1 << 20;

/// Everything one fill needs; `run` consumes it.
pub(super) struct FillTask {
    pub t: Target,
    pub digest: Digest,
    pub writer: Box<dyn BlobWriter>,
    /// The growing object, for the hasher to read back.
    pub reader: Arc<dyn ReadAt>,
    pub guard: FillGuard,
    pub metrics: Arc<Metrics>,
    pub evict_wakeup: Arc<tokio::sync::Notify>,
    /// `cache.fill_min_rate`, bytes per second.
    pub min_rate: u64,
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
    /// A write to the store failed; the upstream is fine.
    Store(std::io::Error),
}

impl FillTask {
    pub(super) async fn run(self) {
        let FillTask {
            t,
            digest,
            writer,
            reader,
            guard,
            metrics,
            evict_wakeup,
            min_rate,
        } = self;
        metrics.fills_in_flight.inc();
        let started = std::time::Instant::now();
        let outcome = fetch(&t, &digest, writer, reader, &guard, &metrics, min_rate).await;
        metrics.upstream_done(t.upstream.name(), Op::Blob.as_str(), started);
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

async fn fetch(
    t: &Target,
    digest: &Digest,
    writer: Box<dyn BlobWriter>,
    reader: Arc<dyn ReadAt>,
    guard: &FillGuard,
    metrics: &Metrics,
    min_rate: u64,
) -> Outcome {
    let up = &t.upstream;
    let started = Instant::now();
    let resp = match up.send(t.blob_request(Method::GET, digest, None)).await {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => return Outcome::Failed(up.status_error(&r)),
        Err(e) => return Outcome::Failed(e),
    };
    let len = super::content_length(resp.headers());
    guard.streaming(len, 0);
    let limit = AgeLimit {
        started,
        grace: up.header_timeout(),
        min_rate,
    };
    let hasher = Hasher::start(digest.algorithm(), reader);
    let body = resp.into_body();
    let copied = copy_body(up, body, writer, &hasher, guard, len, &limit, metrics).await;
    let writer = match copied {
        Ok(w) => w,
        Err((Stop::Upstream(e), _)) => return Outcome::Failed(e),
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
    finish(t, digest, writer, hasher, guard, len, metrics).await
}

/// The body is all there: checks its length and digest, releases the followers' last byte,
/// and commits.
async fn finish(
    t: &Target,
    digest: &Digest,
    writer: Box<dyn BlobWriter>,
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

/// Streams the body into the store, a large write at a time, telling the hasher and the
/// followers how far it got. Hands the writer back, or says why it stopped and how many bytes
/// were stored by then.
#[allow(clippy::too_many_arguments)]
async fn copy_body(
    up: &Upstream,
    mut body: UpstreamBody,
    mut writer: Box<dyn BlobWriter>,
    hasher: &Hasher,
    guard: &FillGuard,
    len: Option<u64>,
    limit: &AgeLimit,
    metrics: &Metrics,
) -> Result<Box<dyn BlobWriter>, (Stop, u64)> {
    let mut buf = BytesMut::with_capacity(FILL_CHUNK);
    let mut eof = false;
    while !eof {
        let written = writer.written();
        let have = written + buf.len() as u64;
        let deadline = limit.deadline(len.unwrap_or(0).max(have));
        eof = next_frames(up, &mut body, &mut buf, deadline, len, have, metrics)
            .await
            .map_err(|s| (s, written))?;
        if buf.is_empty() {
            continue;
        }
        if let Some(expected) = len
            && written + buf.len() as u64 > expected
        {
            metrics.upstream_body_error(up.name(), BodyFault::Protocol);
            let e =
                UpstreamFault::Protocol(format!("body longer than its Content-Length {expected}"));
            return Err((Stop::Upstream(Error::upstream(up.name(), e)), written));
        }
        let chunk = std::mem::take(&mut buf);
        let (w, wrote, mut chunk) = tokio::task::spawn_blocking(move || {
            let wrote = writer.write(&chunk);
            (writer, wrote, chunk)
        })
        .await
        .map_err(|e| (Stop::Upstream(Error::Internal(e.to_string())), written))?;
        writer = w;
        // The hash reads the stored bytes back, so the buffer is free again.
        chunk.clear();
        buf = chunk;
        wrote.map_err(|e| (Stop::Store(e), written))?;
        let now = writer.written();
        hasher.written(now);
        metrics
            .upstream_bytes
            .with_label_values(&[up.name()])
            .inc_by(now - written);
        guard.streaming(len, now);
    }
    Ok(writer)
}

/// Waits for the next body frame (at most until the idle timeout or the fill's deadline), then
/// takes whatever else has already arrived, so writes are large but a paused upstream never
/// holds back bytes that followers could already have. Returns whether the body ended.
async fn next_frames(
    up: &Upstream,
    body: &mut UpstreamBody,
    buf: &mut BytesMut,
    deadline: Instant,
    len: Option<u64>,
    have: u64,
    metrics: &Metrics,
) -> Result<bool, Stop> {
    let idle = Instant::now() + up.body_timeout();
    let first = tokio::time::timeout_at(idle.min(deadline), body.frame())
        .await
        .map_err(|_| {
            let what = if Instant::now() >= deadline {
                "the fill fell below cache.fill_min_rate"
            } else {
                "waiting for the blob body"
            };
            Stop::Upstream(Error::upstream(up.name(), UpstreamFault::Timeout(what)))
        })?;
    let mut frame = Some(first);
    while let Some(f) = frame {
        match f {
            None => return Ok(true),
            Some(Err(e)) => {
                let got = have + buf.len() as u64;
                return Err(Stop::Upstream(body_error(up, e, len, got, metrics)));
            }
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    buf.extend_from_slice(&d);
                }
            }
        }
        frame = if buf.len() < FILL_CHUNK {
            body.frame().now_or_never()
        } else {
            None
        };
    }
    Ok(false)
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
