//! Logging: the tracing subscriber (`[log]` format and level, `RUST_LOG` over both), the request
//! span and its field names, and the response-body wrapper that writes one line per request
//! once the body has ended (so the line carries the bytes actually sent).
//!
//! Nothing secret is ever a field: upstream calls log method, path (never the query, which may
//! carry a signed CDN credential), status and timing; tokens and passwords are never formatted.

use crate::config::{LogConfig, LogFormat};
use crate::http::body::{Body, BodyError};
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
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// The request span's name; its fields are below.
pub const REQUEST_SPAN: &str = "request";
/// Upstream name, recorded once routing picked one.
pub const UPSTREAM_FIELD: &str = "upstream";
/// Repository as the upstream names it.
pub const REPO_FIELD: &str = "repo";
/// Cache lookup result (`hit`, `miss`, `coalesced`, `stale`, `revalidated`).
pub const CACHE_FIELD: &str = "cache";

/// Installs the global subscriber for the `[log]` section. `RUST_LOG`, when set, replaces
/// `level`. Fails if a subscriber is already installed or `RUST_LOG` does not parse.
pub fn init(cfg: &LogConfig) -> Result<(), String> {
    let filter = filter(cfg)?;
    // Colour only on a terminal: escape codes would litter journald and log files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing::subscriber::set_global_default(subscriber(cfg.format, filter, ansi, std::io::stderr))
        .map_err(|e| e.to_string())
}

/// The effective filter: `RUST_LOG` if set, else `log.level`.
pub fn filter(cfg: &LogConfig) -> Result<EnvFilter, String> {
    match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => {
            EnvFilter::try_new(&v).map_err(|e| format!("RUST_LOG {v:?}: {e}"))
        }
        _ => EnvFilter::try_new(&cfg.level).map_err(|e| format!("log.level: {e}")),
    }
}

/// A subscriber writing `format` lines to `writer` (tests pass a buffer here).
pub fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    ansi: bool,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi)
        .with_writer(writer);
    match format {
        LogFormat::Text => Box::new(builder.finish()),
        LogFormat::Json => Box::new(builder.json().flatten_event(true).finish()),
    }
}

/// The span every request runs in; the fields left empty are recorded where they become known.
pub fn request_span(method: &http::Method, route: &'static str) -> Span {
    tracing::info_span!(
        REQUEST_SPAN,
        %method,
        route,
        upstream = tracing::field::Empty,
        repo = tracing::field::Empty,
        cache = tracing::field::Empty,
    )
}

/// Records the routing decision on the current request span.
pub fn record_target(upstream: &str, repo: &str) {
    let span = Span::current();
    span.record(UPSTREAM_FIELD, upstream);
    span.record(REPO_FIELD, repo);
}

/// Wraps the response body so that the request's log line is written when the body ends (or
/// the client goes away), and, for a blob streamed from cache or fill (the handler marks it
/// with a [`Source`] extension), time to first byte is observed.
pub fn finish_response(
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
        tracing::info!(
            parent: &log.span,
            status = log.status,
            bytes = log.bytes,
            duration_ms,
            complete,
            "request"
        );
    }
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
