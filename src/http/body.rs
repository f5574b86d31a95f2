//! Response bodies: small in-memory bytes, and the one body state machine for blobs.
//!
//! [`blob`] turns a mirror's [`BlobSource`] into response bytes, whatever the source (a stored
//! object, a fill as it grows, an upstream relay): stored bytes go out by sendfile on plain
//! HTTP/1 connections (a placeholder chunk the socket replaces, see `sendfile.rs`) and are read
//! on the blocking pool for TLS and HTTP/2; relayed bytes go out as they come. An error from
//! the source ends the body with an error, so hyper closes the connection short of its
//! `Content-Length`: the client sees a failed download, never a wrong 200.

use super::sendfile::{FileQueue, MAX_CHUNK};
use crate::metrics::{Metrics, Source};
use crate::mirror::{BlobSource, Piece};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::Frame;
use std::sync::Arc;

pub type BodyError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = UnsyncBoxBody<Bytes, BodyError>;

/// Stored bytes read into memory at a time, where sendfile cannot be used.
const READ_CHUNK: usize = 256 * 1024;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// The body of a blob response. `sendfile`: the connection's file queue, on plain HTTP/1.
pub fn blob(source: BlobSource, sendfile: Option<Arc<FileQueue>>, metrics: Arc<Metrics>) -> Body {
    let state = BlobBody {
        served: Served {
            metrics,
            source: source.origin(),
            bytes: 0,
        },
        source: Some(source),
        sendfile,
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
}

impl BlobBody {
    async fn next(&mut self) -> Option<Result<Frame<Bytes>, BodyError>> {
        let source = self.source.as_mut()?;
        let max = if self.sendfile.is_some() {
            MAX_CHUNK
        } else {
            READ_CHUNK
        };
        let chunk = match source.next(max).await {
            Ok(Some(Piece::Relayed(bytes))) => Ok(bytes),
            Ok(Some(Piece::Stored {
                reader,
                offset,
                len,
                more,
            })) => match (&self.sendfile, reader.file()) {
                (Some(queue), Some(file)) => Ok(queue.placeholder(file, offset, len, more)),
                _ => tokio::task::spawn_blocking(move || reader.read_bytes(offset, len))
                    .await
                    .map_err(BodyError::from)
                    .and_then(|r| r.map_err(BodyError::from)),
            },
            Ok(None) => {
                self.source = None;
                return None;
            }
            Err(e) => Err(e.into()),
        };
        match chunk {
            Ok(bytes) => {
                self.served.bytes += bytes.len() as u64;
                Some(Ok(Frame::data(bytes)))
            }
            Err(e) => {
                self.source = None;
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
