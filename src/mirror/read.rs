//! Reading a blob for a response: from a committed file, following a fill as it grows, or,
//! when the cache cannot be written, straight from the upstream. A reader task per response
//! feeds the body through a small channel, so memory per stream is a few chunks whatever the
//! blob's size, and a slow client slows only itself.

use super::Target;
use super::inflight::{Fill, FillState, HashState};
use crate::error::{Error, UpstreamFault};
use crate::http::body::{self, Body};
use crate::http::sendfile::{FileQueue, MAX_CHUNK};
use crate::metrics::{Metrics, Source};
use crate::oci::{Digest, Verifier};
use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Frame;
use hyper::body::Incoming;
use std::fs::File;
use std::io;
use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;
use tokio::sync::{mpsc, watch};

const READ_CHUNK: usize = 256 * 1024;

type Tx = mpsc::Sender<Result<Bytes, io::Error>>;

/// An open blob, ready to stream.
pub struct BlobHandle {
    file: Option<Arc<File>>,
    /// The blob's length, when known (a fill from an upstream that sent no Content-Length
    /// does not know it until the end).
    pub len: Option<u64>,
    progress: Option<watch::Receiver<FillState>>,
    /// Where the bytes come from when the cache cannot hold them.
    origin: Option<(Target, Digest)>,
    /// An upstream body already requested, for a pass-through from byte 0.
    upstream: Option<Incoming>,
}

impl BlobHandle {
    pub fn committed(file: File, len: u64) -> BlobHandle {
        BlobHandle {
            file: Some(Arc::new(file)),
            len: Some(len),
            progress: None,
            origin: None,
            upstream: None,
        }
    }

    pub fn following(
        fill: &Fill,
        len: Option<u64>,
        t: &Target,
        digest: &Digest,
    ) -> Result<BlobHandle, Error> {
        // Subscribe before opening, so no progress published in between is missed.
        let progress = fill.subscribe();
        let file = fill.open()?;
        Ok(BlobHandle {
            file: Some(Arc::new(file)),
            len,
            progress: Some(progress),
            origin: Some((t.clone(), digest.clone())),
            upstream: None,
        })
    }

    /// A blob the cache cannot store: the upstream's response, passed through and verified.
    pub fn pass_through(
        body: Incoming,
        len: Option<u64>,
        t: &Target,
        digest: &Digest,
    ) -> BlobHandle {
        BlobHandle {
            file: None,
            len,
            progress: None,
            origin: Some((t.clone(), digest.clone())),
            upstream: Some(body),
        }
    }

    /// Waits until the blob is committed to the cache, calling `on_progress` with the bytes
    /// written so far as the fill grows; for prefetch, which wants the blob cached, not its
    /// bytes. Returns its length, or the error that ended the fill (nothing stored then).
    pub async fn wait_cached(self, mut on_progress: impl FnMut(u64)) -> Result<u64, Error> {
        let Some(mut rx) = self.progress else {
            return Ok(self.len.unwrap_or(0));
        };
        loop {
            let state = rx.borrow_and_update().clone();
            match state {
                FillState::Connecting => {}
                FillState::Streaming { written, .. } => on_progress(written),
                FillState::Verified { len } => on_progress(len),
                FillState::Done { len } => {
                    on_progress(len);
                    return Ok(len);
                }
                FillState::Failed(e) => return Err(e),
                // The cache could not be written: nothing was stored.
                FillState::Diverted { .. } => {
                    return Err(Error::Internal(
                        "the cache could not be written; blob not stored".into(),
                    ));
                }
            }
            if rx.changed().await.is_err() {
                return match &*rx.borrow() {
                    FillState::Done { len } => Ok(*len),
                    FillState::Failed(e) => Err(e.clone()),
                    _ => Err(Error::Internal("fill ended without a result".into())),
                };
            }
        }
    }

    pub fn source(&self) -> Source {
        match (&self.progress, &self.upstream) {
            (_, Some(_)) => Source::Upstream,
            (Some(_), _) => Source::Fill,
            _ => Source::Cache,
        }
    }

    /// Sends bytes `start..end` of the blob's file with sendfile, on the plain-HTTP/1 connection
    /// owning `queue`: all of it for a committed blob, and for a fill each part as it is
    /// written, the last byte once the digest has matched. A fill that can no longer write its
    /// file carries on the way [`stream`](Self::stream) does. A pass-through has no file and
    /// is streamed.
    pub fn send_file(
        self,
        start: u64,
        end: u64,
        queue: Arc<FileQueue>,
        metrics: Arc<Metrics>,
    ) -> Body {
        let Some(file) = self.file.clone() else {
            return self.stream(start, Some(end), metrics);
        };
        let source = self.source();
        let state = SendState {
            _following: (source == Source::Fill).then(|| Following::new(&metrics)),
            served: Served {
                metrics,
                source,
                bytes: 0,
            },
            h: Some(self),
            pos: start,
            rest: None,
        };
        let frames = futures_util::stream::unfold(state, move |mut st| {
            let (file, queue) = (file.clone(), queue.clone());
            async move {
                let item = st.next(&file, &queue, end).await?;
                Some((item, st))
            }
        });
        http_body_util::StreamBody::new(frames).boxed_unsync()
    }

    /// Streams bytes `start..end` (end exclusive; `None`: to the end of the blob).
    pub fn stream(self, start: u64, end: Option<u64>, metrics: Arc<Metrics>) -> Body {
        let (tx, rx) = mpsc::channel(2);
        let source = self.source();
        let following = (source == Source::Fill).then(|| Following::new(&metrics));
        tokio::spawn(async move {
            let _following = following;
            let sent = match pump(self, start, end, &tx).await {
                Ok(n) => n,
                Err((n, e)) => {
                    let _ = tx.send(Err(e)).await;
                    n
                }
            };
            metrics.served(source, sent);
        });
        body::from_channel(rx)
    }
}

/// Where a [`BlobHandle::send_file`] body is.
struct SendState {
    /// `None` once the body has ended (with an error or handed over to `rest`).
    h: Option<BlobHandle>,
    pos: u64,
    /// The rest of the body, streamed, after a fill could no longer write the file.
    rest: Option<Body>,
    served: Served,
    _following: Option<Following>,
}

type FrameResult = Result<Frame<Bytes>, body::BodyError>;

impl SendState {
    async fn next(&mut self, file: &Arc<File>, queue: &FileQueue, end: u64) -> Option<FrameResult> {
        if let Some(rest) = &mut self.rest {
            return rest.frame().await;
        }
        loop {
            let h = self.h.as_mut()?;
            if self.pos >= end {
                return None;
            }
            let ended = |st: &mut SendState, e: io::Error| {
                st.h = None;
                Some(Err(body::BodyError::from(e)))
            };
            let (avail, last) = match available(h) {
                Err(e) => return ended(self, e),
                Ok(Avail::Upto(a, last)) => (a, last),
                Ok(Avail::Diverted { .. }) => {
                    let h = self.h.take()?;
                    let metrics = self.served.metrics.clone();
                    // The streamed rest counts itself as a follower and its own bytes.
                    self._following = None;
                    self.rest = Some(h.stream(self.pos, Some(end), metrics));
                    return self.rest.as_mut()?.frame().await;
                }
            };
            let limit = avail.min(end);
            if self.pos < limit {
                let n = ((limit - self.pos) as usize).min(MAX_CHUNK);
                let more = self.pos + (n as u64) < limit;
                let chunk = queue.placeholder(file, self.pos, n, more);
                self.pos += n as u64;
                self.served.bytes += n as u64;
                return Some(Ok(Frame::data(chunk)));
            }
            if last {
                return ended(self, io::Error::other("range beyond the end of the blob"));
            }
            let Some(rx) = &mut h.progress else {
                return ended(self, io::Error::other("range beyond the end of the blob"));
            };
            if rx.changed().await.is_err() {
                return ended(self, io::Error::other("fill ended without a result"));
            }
        }
    }
}

/// Records the bytes a response sent in `cachalot_served_bytes_total` when it ends, however
/// it ends.
struct Served {
    metrics: Arc<Metrics>,
    source: Source,
    bytes: u64,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.metrics.served(self.source, self.bytes);
    }
}

/// Counts a response in `cachalot_followers_waiting` for as long as it streams from a fill;
/// a guard, so a panicking reader task still leaves the gauge right.
struct Following(Arc<Metrics>);

impl Following {
    fn new(metrics: &Arc<Metrics>) -> Following {
        metrics.followers_waiting.inc();
        Following(metrics.clone())
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        self.0.followers_waiting.dec();
    }
}

/// How far the file is readable now: `Ok((bytes, final))`, or the point where a diverted fill
/// left off.
enum Avail {
    Upto(u64, bool),
    Diverted { at: u64, hash: HashState },
}

fn available(h: &mut BlobHandle) -> Result<Avail, io::Error> {
    match &mut h.progress {
        None => Ok(Avail::Upto(h.len.unwrap_or(0), true)),
        Some(rx) => match &*rx.borrow_and_update() {
            FillState::Connecting => Ok(Avail::Upto(0, false)),
            // The last byte waits for verification: a response that reached its
            // Content-Length would count as a good download even if the digest then failed.
            FillState::Streaming { written, len } => Ok(Avail::Upto(
                len.map_or(*written, |l| (*written).min(l.saturating_sub(1))),
                false,
            )),
            FillState::Verified { len } | FillState::Done { len } => Ok(Avail::Upto(*len, true)),
            FillState::Diverted { at, hash, .. } => Ok(Avail::Diverted {
                at: *at,
                hash: hash.clone(),
            }),
            FillState::Failed(e) => Err(io::Error::other(format!("upstream fill failed: {e}"))),
        },
    }
}

/// Copies the range into the channel; returns bytes sent, or bytes sent and the error that
/// must abort the response.
async fn pump(
    mut h: BlobHandle,
    mut pos: u64,
    end: Option<u64>,
    tx: &Tx,
) -> Result<u64, (u64, io::Error)> {
    let start = pos;
    if let Some(body) = h.upstream.take() {
        let (t, digest) = h
            .origin
            .take()
            .ok_or((0, io::Error::other("pass-through without origin")))?;
        let hash = HashState(Box::new(Verifier::new(digest.algorithm())));
        return relay(&t, &digest, body, 0, 0, hash, pos, end, h.len, tx)
            .await
            .map(|p| p - start)
            .map_err(|(p, e)| (p - start, e));
    }
    loop {
        let (avail, last) = match available(&mut h).map_err(|e| (pos - start, e))? {
            Avail::Upto(a, last) => (a, last),
            Avail::Diverted { at, hash } => {
                // Serve what the file holds, then the rest from upstream.
                pos = copy_file(&h, pos, end.map_or(at, |e| e.min(at)), tx)
                    .await
                    .map_err(|(p, e)| (p - start, e))?;
                if end.is_some_and(|e| pos >= e) {
                    return Ok(pos - start);
                }
                let (t, digest) = h
                    .origin
                    .take()
                    .ok_or((pos - start, io::Error::other("fill without origin")))?;
                let body = ranged_get(&t, &digest, at)
                    .await
                    .map_err(|e| (pos - start, e))?;
                let (body, body_start) = body;
                return relay(&t, &digest, body, body_start, at, hash, pos, end, h.len, tx)
                    .await
                    .map(|p| p - start)
                    .map_err(|(p, e)| (p - start, e));
            }
        };
        let limit = end.map_or(avail, |e| e.min(avail));
        pos = copy_file(&h, pos, limit, tx)
            .await
            .map_err(|(p, e)| (p - start, e))?;
        if tx.is_closed() {
            // The client went away; the fill, if any, carries on without it.
            return Ok(pos - start);
        }
        if end.is_some_and(|e| pos >= e) || (last && pos >= avail) {
            return Ok(pos - start);
        }
        match &mut h.progress {
            Some(rx) => {
                if rx.changed().await.is_err() {
                    return Err((pos - start, io::Error::other("fill ended without a result")));
                }
            }
            None => {
                return Err((
                    pos - start,
                    io::Error::other("range beyond the end of the blob"),
                ));
            }
        }
    }
}

/// Sends file bytes `pos..limit`; returns the new position.
async fn copy_file(
    h: &BlobHandle,
    mut pos: u64,
    limit: u64,
    tx: &Tx,
) -> Result<u64, (u64, io::Error)> {
    let Some(file) = &h.file else {
        return Ok(pos);
    };
    while pos < limit {
        let n = ((limit - pos) as usize).min(READ_CHUNK);
        let file = file.clone();
        let at = pos;
        let chunk = tokio::task::spawn_blocking(move || -> io::Result<Bytes> {
            // read_to_end fills spare capacity without zeroing it first: zeroing every chunk
            // cost a fifth of the CPU of serving a cached blob.
            let mut buf = Vec::with_capacity(n);
            let mut f: &File = &file;
            f.seek(SeekFrom::Start(at))?;
            f.take(n as u64).read_to_end(&mut buf)?;
            if buf.len() != n {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "blob file shorter than expected",
                ));
            }
            Ok(Bytes::from(buf))
        })
        .await
        .map_err(|e| (pos, io::Error::other(e)))?
        .map_err(|e| (pos, e))?;
        if tx.send(Ok(chunk)).await.is_err() {
            return Ok(pos);
        }
        pos += n as u64;
    }
    Ok(pos)
}

/// GETs the blob from `at` on. Returns the body and the offset of its first byte (0 when the
/// upstream ignored the range).
async fn ranged_get(t: &Target, digest: &Digest, at: u64) -> Result<(Incoming, u64), io::Error> {
    let up = &t.upstream;
    let range = (at > 0).then(|| HeaderValue::from_str(&format!("bytes={at}-")).expect("ascii"));
    let resp = up
        .send(t.blob_request(Method::GET, digest, range))
        .await
        .map_err(io::Error::other)?;
    match resp.status() {
        StatusCode::PARTIAL_CONTENT => Ok((resp.into_body(), at)),
        s if s.is_success() => Ok((resp.into_body(), 0)),
        _ => Err(io::Error::other(up.status_error(&resp))),
    }
}

/// Relays an upstream body whose first byte is blob offset `body_start`, hashing from offset
/// `hashed` on (the bytes before it are already in `hash`) and sending what falls in
/// `pos..end`. The blob's last byte is held back until the digest matches.
#[allow(clippy::too_many_arguments)]
async fn relay(
    t: &Target,
    digest: &Digest,
    mut body: Incoming,
    body_start: u64,
    hashed: u64,
    hash: HashState,
    mut pos: u64,
    end: Option<u64>,
    len: Option<u64>,
    tx: &Tx,
) -> Result<u64, (u64, io::Error)> {
    let up = &t.upstream;
    let mut hash = *hash.0;
    let mut offset = body_start;
    let mut held: Option<Bytes> = None;
    loop {
        let frame = tokio::time::timeout(up.body_timeout(), body.frame())
            .await
            .map_err(|_| {
                (
                    pos,
                    io::Error::other(Error::upstream(
                        up.name(),
                        UpstreamFault::Timeout("waiting for the blob body"),
                    )),
                )
            })?;
        let data = match frame {
            None => break,
            Some(Err(e)) => {
                return Err((
                    pos,
                    io::Error::other(format!("upstream {}: body: {e}", up.name())),
                ));
            }
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => d,
                Err(_) => continue,
            },
        };
        let chunk_start = offset;
        offset += data.len() as u64;
        // Hash only what the shared state has not seen yet.
        if offset > hashed {
            let from = hashed.saturating_sub(chunk_start) as usize;
            hash.update(&data[from..]);
        }
        // Send the part inside pos..end.
        let lo = pos.max(chunk_start);
        let hi = end.map_or(offset, |e| e.min(offset));
        if lo < hi {
            let mut part = data.slice((lo - chunk_start) as usize..(hi - chunk_start) as usize);
            if let Some(prev) = held.take()
                && tx.send(Ok(prev)).await.is_err()
            {
                return Ok(pos);
            }
            let reaches_end = end.is_none() || len.is_some_and(|l| hi >= l);
            if reaches_end && !part.is_empty() {
                // Keep the last byte back until the digest is known.
                held = Some(part.split_off(part.len() - 1));
            }
            if !part.is_empty() && tx.send(Ok(part)).await.is_err() {
                return Ok(pos);
            }
            pos = hi;
        }
        if end.is_some_and(|e| pos >= e) && held.is_none() {
            return Ok(pos);
        }
    }
    if len.is_some_and(|l| offset != l) || hash.finish() != *digest {
        return Err((
            pos.saturating_sub(held.is_some() as u64),
            io::Error::other(format!(
                "upstream {} sent a blob that does not match {digest}",
                up.name()
            )),
        ));
    }
    if let Some(last) = held {
        let _ = tx.send(Ok(last)).await;
    }
    Ok(pos)
}
