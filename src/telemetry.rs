//! Logging: the tracing subscriber (`[log]` format and level, `RUST_LOG` over both), and the
//! request span and its field names. The line each request ends with is `http::log`'s.
//!
//! Nothing secret is ever a field: upstream calls log method, path (never the query, which may
//! carry a signed CDN credential), status and timing; tokens and passwords are never formatted.

use crate::config::{LogConfig, LogFormat};
use tracing::Span;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;

/// The target of the request span.
pub(crate) const TARGET: &str = module_path!();
/// The request span's name; its fields are below.
pub const REQUEST_SPAN: &str = "request";
/// Upstream name, recorded once routing picked one.
pub const UPSTREAM_FIELD: &str = "upstream";
/// Repository as the upstream names it.
pub const REPO_FIELD: &str = "repo";
/// Who pulled: the authenticated user, or `anonymous` (the audit trail).
pub const USER_FIELD: &str = "user";
/// The digest served: a blob's, a manifest's (a tag's resolved), a referrers subject's.
pub const DIGEST_FIELD: &str = "digest";
/// Cache lookup result (`hit`, `miss`, `coalesced`, `stale`, `revalidated`).
pub const CACHE_FIELD: &str = "cache";

/// Writes out the log lines still pending: [`init`]'s lines leave a few milliseconds late,
/// through [`crate::log_writer`], so the process calls this before it exits.
pub fn flush() {
    crate::log_writer::flush();
}

/// Installs the global subscriber for the `[log]` section. `RUST_LOG`, when set, replaces
/// `level`. Fails if a subscriber is already installed or `RUST_LOG` does not parse.
pub fn init(cfg: &LogConfig) -> Result<(), String> {
    let filter = filter(cfg)?;
    // Colour only on a terminal: escape codes would litter journald and log files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // Lines reach stderr through a thread of their own, many a write: a request never waits on
    // the terminal or journald, and pays no write(2) of its own.
    let writer = crate::log_writer::stderr()?;
    tracing::subscriber::set_global_default(subscriber(cfg.format, filter, ansi, writer))
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

/// A subscriber writing `format` lines to `writer` (tests pass a buffer here): tracing-subscriber's
/// fmt layer, with the request line written by [`crate::request_log`] in the same format.
pub fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    ansi: bool,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Clone + Send + Sync + 'static,
{
    use crate::request_log::RequestLines;
    let registry = tracing_subscriber::registry().with(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_ansi(ansi)
        .with_writer(writer.clone());
    match format {
        LogFormat::Text => Box::new(registry.with(RequestLines::new(fmt, writer, false, ansi))),
        LogFormat::Json => Box::new(registry.with(RequestLines::new(
            fmt.json().flatten_event(true),
            writer,
            true,
            ansi,
        ))),
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
        user = tracing::field::Empty,
        digest = tracing::field::Empty,
    )
}

/// Records the routing decision on the current request span.
pub fn record_target(upstream: &str, repo: &str) {
    record_current(UPSTREAM_FIELD, &upstream);
    record_current(REPO_FIELD, &repo);
}

/// Records who is pulling on the current request span. Never the credentials.
/// The span is passed in: `Span::current` costs a registry lookup, on every request.
pub fn record_user(span: &Span, user: &str) {
    span.record(USER_FIELD, user);
}

/// Records the digest served on the current request span.
pub fn record_digest(span: &Span, digest: &dyn std::fmt::Display) {
    span.record(DIGEST_FIELD, tracing::field::display(digest));
}

/// Records the cache lookup result on the current request span.
pub fn record_cache(result: &str) {
    record_current(CACHE_FIELD, &result);
}

/// What `Span::current().record(field, value)` does, without the handle on the span that
/// `Span::current` takes and drops: a clone and a close in the registry, on every request.
fn record_current(field: &str, value: &dyn tracing::Value) {
    tracing::dispatcher::get_default(|dispatch| {
        let Some((id, meta)) = dispatch.current_span().into_inner() else {
            return;
        };
        if let Some(f) = meta.fields().field(field) {
            let values = [(&f, Some(value))];
            dispatch.record(
                &id,
                &tracing::span::Record::new(&meta.fields().value_set(&values)),
            );
        }
    });
}
