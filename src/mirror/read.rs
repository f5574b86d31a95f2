//! Reading a blob for a response: from a committed file, or following a fill as it grows.
//! A reader task per response feeds the body through a small channel, so memory per stream is
//! a few chunks whatever the blob's size, and a slow client slows only itself.

use super::inflight::{Fill, FillState};
use crate::error::Error;
use crate::http::body::{self, Body};
use crate::metrics::{Metrics, Source};
use bytes::BytesMut;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};

const READ_CHUNK: usize = 256 * 1024;

/// An open blob, ready to stream.
pub struct BlobHandle {
    file: Arc<File>,
    /// The blob's length, when known (a fill from an upstream that sent no Content-Length
    /// does not know it until the end).
    pub len: Option<u64>,
    progress: Option<watch::Receiver<FillState>>,
}

impl BlobHandle {
    pub fn committed(file: File, len: u64) -> BlobHandle {
        BlobHandle {
            file: Arc::new(file),
            len: Some(len),
            progress: None,
        }
    }

    pub fn following(fill: &Fill, len: Option<u64>) -> Result<BlobHandle, Error> {
        // Subscribe before opening, so no progress published in between is missed.
        let progress = fill.subscribe();
        let file = fill.open()?;
        Ok(BlobHandle {
            file: Arc::new(file),
            len,
            progress: Some(progress),
        })
    }

    pub fn source(&self) -> Source {
        if self.progress.is_some() {
            Source::Fill
        } else {
            Source::Cache
        }
    }

    /// Streams bytes `start..end` (end exclusive; `None`: to the end of the blob).
    pub fn stream(self, start: u64, end: Option<u64>, metrics: Arc<Metrics>) -> Body {
        let (tx, rx) = mpsc::channel(2);
        let source = self.source();
        tokio::spawn(async move {
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

/// How far the blob is readable now, and whether that is final.
fn available(h: &mut BlobHandle) -> Result<(u64, bool), io::Error> {
    match &mut h.progress {
        None => Ok((h.len.unwrap_or(0), true)),
        Some(rx) => match &*rx.borrow_and_update() {
            FillState::Connecting => Ok((0, false)),
            // The last byte waits for verification: a response that reached its
            // Content-Length would count as a good download even if the digest then failed.
            FillState::Streaming { written, len } => Ok((
                len.map_or(*written, |l| (*written).min(l.saturating_sub(1))),
                false,
            )),
            FillState::Done { len } => Ok((*len, true)),
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
    tx: &mpsc::Sender<Result<bytes::Bytes, io::Error>>,
) -> Result<u64, (u64, io::Error)> {
    let start = pos;
    loop {
        let (avail, last) = available(&mut h).map_err(|e| (pos - start, e))?;
        let limit = end.map_or(avail, |e| e.min(avail));
        while pos < limit {
            let n = ((limit - pos) as usize).min(READ_CHUNK);
            let file = h.file.clone();
            let at = pos;
            let chunk = tokio::task::spawn_blocking(move || -> io::Result<bytes::Bytes> {
                let mut buf = BytesMut::zeroed(n);
                file.read_exact_at(&mut buf, at)?;
                Ok(buf.freeze())
            })
            .await
            .map_err(|e| (pos - start, io::Error::other(e)))?
            .map_err(|e| (pos - start, e))?;
            if tx.send(Ok(chunk)).await.is_err() {
                // The client went away; the fill, if any, carries on without it.
                return Ok(pos - start);
            }
            pos += n as u64;
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
