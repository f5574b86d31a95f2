//! The line each request ends with: the response body is wrapped so that the line is written
//! once the body has ended or the client went away, carrying the bytes actually sent; a blob's
//! time to first byte is observed on the way.

use super::body::{Body, BodyError};
use crate::metrics::{Metrics, Source};
use bytes::Bytes;
use http::Response;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tracing::Span;

/// Wraps the response body so that the request's log line is written when the body ends (or
/// the client goes away), and, for a blob streamed from cache or fill (the handler marks it
/// with a [`Source`] extension), time to first byte is observed.
pub(crate) fn finish_response(
    resp: Response<Body>,
    span: Span,
    started: Instant,
    metrics: Arc<Metrics>,
) -> Response<Body> {
    let first_byte = resp.extensions().get::<Source>().copied();
    let status = resp.status().as_u16();
    let expected = resp
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok());
    resp.map(|inner| {
        LoggedBody {
            inner,
            log: RequestLog {
                span,
                started,
                status,
                bytes: 0,
                expected,
                first_byte,
                metrics,
                complete: false,
            },
        }
        .boxed_unsync()
    })
}

struct LoggedBody {
    inner: Body,
    log: RequestLog,
}

struct RequestLog {
    span: Span,
    started: Instant,
    status: u16,
    bytes: u64,
    /// Content-Length, if sent.
    expected: Option<u64>,
    /// Still waiting for the first byte of a blob from this source.
    first_byte: Option<Source>,
    metrics: Arc<Metrics>,
    complete: bool,
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        let log = &self.log;
        // hyper stops polling once a body says it has ended or its Content-Length is reached,
        // so a final `None` may never come.
        let complete = log.complete
            || http_body::Body::is_end_stream(&self.inner)
            || log.expected == Some(log.bytes);
        let duration_ms = log.started.elapsed().as_secs_f64() * 1000.0;
        line(&log.span, log.status, log.bytes, duration_ms, complete);
    }
}

/// The request line itself, under the target `crate::request_log` knows it by (this module's
/// path, so `RUST_LOG` filters name it as before).
pub(crate) fn line(span: &Span, status: u16, bytes: u64, duration_ms: f64, complete: bool) {
    tracing::info!(
        target: crate::request_log::LINE_TARGET,
        parent: span,
        status,
        bytes,
        duration_ms,
        complete,
        "request"
    );
}

impl http_body::Body for LoggedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.log.bytes += data.len() as u64;
                    if !data.is_empty()
                        && let Some(source) = this.log.first_byte.take()
                    {
                        this.log
                            .metrics
                            .blob_first_byte
                            .with_label_values(&[source.as_str()])
                            .observe(this.log.started.elapsed().as_secs_f64());
                    }
                }
            }
            Poll::Ready(None) => this.log.complete = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    /// `RUST_LOG=cachalot::http::log=warn` silences the request line, as it did when the line
    /// took this module's path as its target: moving the module must move the name too.
    #[test]
    fn the_request_line_keeps_this_modules_target() {
        let here = module_path!().strip_suffix("::tests");
        assert_eq!(Some(crate::request_log::LINE_TARGET), here);
    }
}
