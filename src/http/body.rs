//! Response bodies: small in-memory bytes, and the one body state machine for blobs.
//!
//! [`blob`] turns a mirror's [`BlobSource`] into response bytes, whatever the source (a stored
//! object, a fill as it grows, an upstream relay): stored bytes go out by sendfile on plain
//! HTTP/1 connections (a placeholder chunk the socket replaces, see `sendfile.rs`) and are read
//! on the blocking pool for TLS and HTTP/2; relayed bytes go out as they come. An error from
//! the source ends the body with an error, so hyper closes the connection short of its
//! `Content-Length`: the client sees a failed download, never a wrong 200.

use super::sendfile::{FileQueue, MAX_CHUNK};
use crate::error::Error;
use crate::metrics::{Metrics, Source};
use crate::mirror::{BlobSource, Piece};
use crate::storage::ReadAt;
use bytes::Bytes;
use futures_util::FutureExt;
use http_body_util::{BodyExt, Empty, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::Frame;
use std::io;
use std::sync::Arc;
use tokio::task::JoinHandle;

pub(crate) type BodyError = Box<dyn std::error::Error + Send + Sync>;
pub(crate) type Body = UnsyncBoxBody<Bytes, BodyError>;

/// Stored bytes read into memory at a time, where sendfile cannot be used.
const READ_CHUNK: usize = 256 * 1024;

pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub(crate) fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// The body of a blob response. `sendfile`: the connection's file queue, on plain HTTP/1.
pub(crate) fn blob(
    source: BlobSource,
    sendfile: Option<Arc<FileQueue>>,
    metrics: Arc<Metrics>,
) -> Body {
    let state = BlobBody {
        served: Served {
            metrics,
            source: source.origin(),
            bytes: 0,
        },
        source: Some(source),
        sendfile,
        ahead: None,
    };
    let frames = futures_util::stream::unfold(state, |mut st| async move {
        let frame = st.next().await?;
        Some((frame, st))
    });
    StreamBody::new(frames).boxed_unsync()
}

struct BlobBody {
    /// `None` once the body has ended.
    source: Option<BlobSource>,
    sendfile: Option<Arc<FileQueue>>,
    served: Served,
    /// The next piece, asked for early so that its read overlaps the send of this one.
    ahead: Option<Ahead>,
}

/// What the source answered when asked ahead of time.
enum Ahead {
    /// A stored piece being read on the blocking pool; `true`: another is ready behind it.
    Reading(JoinHandle<io::Result<Bytes>>, bool),
    /// Anything else (the end, an error), handed out in its turn.
    Answered(Result<Option<Piece>, Error>),
}

fn read(reader: Arc<dyn ReadAt>, offset: u64, len: usize) -> JoinHandle<io::Result<Bytes>> {
    tokio::task::spawn_blocking(move || reader.read_bytes(offset, len))
}

impl BlobBody {
    fn max_piece(&self) -> usize {
        if self.sendfile.is_some() {
            MAX_CHUNK
        } else {
            READ_CHUNK
        }
    }

    async fn next(&mut self) -> Option<Result<Frame<Bytes>, BodyError>> {
        let max = self.max_piece();
        let source = self.source.as_mut()?;
        let (reading, more) = match self.ahead.take() {
            Some(Ahead::Reading(h, more)) => (h, more),
            early => {
                let piece = match early {
                    Some(Ahead::Answered(p)) => p,
                    // Boxed: the source's future (a fill's follower waiting, an upstream relay)
                    // is kilobytes large, and inline it would size every blob response's body
                    // for as long as it is sent, though a stored blob's piece is ready at once
                    // (massif, 5,000 connections: 4.5 KB a body before).
                    _ => Box::pin(source.next(max)).await,
                };
                match piece {
                    Ok(None) => {
                        self.source = None;
                        return None;
                    }
                    Err(e) => return self.sent(Err(e.into())),
                    Ok(Some(Piece::Relayed(bytes))) => return self.sent(Ok(bytes)),
                    Ok(Some(Piece::Stored {
                        reader,
                        offset,
                        len,
                        more,
                    })) => {
                        if let (Some(queue), Some(file)) = (&self.sendfile, reader.file()) {
                            let chunk = queue.placeholder(file, offset, len, more);
                            return self.sent(Ok(chunk));
                        }
                        (read(reader, offset, len), more)
                    }
                }
            }
        };
        if more {
            // The next piece is ready now: start reading it while this one goes out.
            let source = self.source.as_mut()?;
            self.ahead = source.next(max).now_or_never().map(|p| match p {
                Ok(Some(Piece::Stored {
                    reader,
                    offset,
                    len,
                    more,
                })) => Ahead::Reading(read(reader, offset, len), more),
                other => Ahead::Answered(other),
            });
        }
        let chunk = match reading.await {
            Ok(r) => r.map_err(BodyError::from),
            Err(e) => Err(BodyError::from(e)),
        };
        self.sent(chunk)
    }

    /// Counts a chunk on its way out, or ends the body with an error.
    fn sent(&mut self, chunk: Result<Bytes, BodyError>) -> Option<Result<Frame<Bytes>, BodyError>> {
        match chunk {
            Ok(bytes) => {
                self.served.bytes += bytes.len() as u64;
                Some(Ok(Frame::data(bytes)))
            }
            Err(e) => {
                self.source = None;
                self.ahead = None;
                Some(Err(e))
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
