//! One function per route. Handlers parse at the edge into OCI types, ask the mirror, and set
//! the headers clients rely on (Content-Length, Docker-Content-Digest, ETag, Content-Range).

use super::body::{self, Body};
use super::route::{Route, route};
use super::sendfile::FileQueue;
use crate::auth::{Auth, Principal};
use crate::cluster::PeerCheck;
use crate::error::Error;
use crate::metrics::{Metrics, Source};
use crate::mirror::{BlobSource, Mirror, Target};
use crate::oci::manifest::Accept;
use crate::oci::{Digest, ErrorCode, OciError, Tag};
use futures_util::FutureExt;
use http::{HeaderValue, Method, Request, Response, StatusCode, Version, header};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;
use tracing::{Instrument, Span, error, warn};

/// What every request handler shares.
pub(crate) struct AppState {
    pub mirror: Arc<Mirror>,
    pub metrics: Arc<Metrics>,
    /// `[auth]` and `[[access]]`; `None`: everyone may pull everything.
    pub auth: Option<Arc<Auth>>,
    /// The page at `/ui`.
    pub ui: Arc<crate::ui::Ui>,
}

const API_VERSION_HEADER: header::HeaderName =
    header::HeaderName::from_static("docker-distribution-api-version");
const API_VERSION: HeaderValue = HeaderValue::from_static("registry/2.0");
const DOCKER_CONTENT_DIGEST: header::HeaderName =
    header::HeaderName::from_static("docker-content-digest");
/// Sent with a 429 when the upstream gave no `Retry-After` of its own.
const DEFAULT_RETRY_AFTER: HeaderValue = HeaderValue::from_static("60");

type Reply = Result<Response<Body>, Error>;

/// The service entry point: routes, runs the handler with panics caught, and records the
/// request in metrics and the log.
pub(crate) async fn handle<B>(state: Arc<AppState>, req: Request<B>) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path();
    let r = route(&method, path);
    let label = r.label();
    let not_found = match &r {
        Route::Blob { .. } => ErrorCode::BlobUnknown,
        Route::Manifest { .. } => ErrorCode::ManifestUnknown,
        _ => ErrorCode::NameUnknown,
    };
    let span = crate::telemetry::request_span(&method, label.as_str());
    let outcome = AssertUnwindSafe(dispatch(&state, r, &req, &span))
        .catch_unwind()
        .instrument(span.clone())
        .await;
    let own_refusal = matches!(&outcome, Ok(Err(e)) if matches!(e.cause(), Error::Client(_)));
    let mut resp = match outcome {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => {
            match e.cause() {
                Error::Storage(_) | Error::Internal(_) | Error::Config(_) => {
                    error!(parent: &span, error = %e, %method, path, "request failed");
                }
                Error::Overloaded(_) => {
                    state.metrics.overloaded.inc();
                    if state.metrics.first_overload_this_second() {
                        warn!(parent: &span, error = %e, %method, path, "overloaded: answering 503 with Retry-After (logged once a second; see cachalot_overloaded_total)");
                    }
                }
                _ => {}
            }
            error_response(&e, not_found)
        }
        Err(_) => {
            error!(parent: &span, %method, path, "handler panicked");
            oci_response(&OciError::new(
                ErrorCode::Unknown,
                "internal error in the mirror; see its log",
            ))
        }
    };
    // Only cachalot's own refusals invite credentials: an upstream's 401 (its credentials in
    // cachalot's config are wrong) is not something the client can fix by logging in.
    if resp.status() == StatusCode::UNAUTHORIZED
        && own_refusal
        && let Some(auth) = &state.auth
    {
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, auth.challenge().clone());
    }
    resp.headers_mut().insert(API_VERSION_HEADER, API_VERSION);
    // Shutting down: the client's next request goes to a replica that stays (HTTP/2 hears a
    // GOAWAY from the graceful shutdown instead).
    if state.mirror.draining() && req.version() < Version::HTTP_2 {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    // The status first: it is cheaper than the headers, and only a refusal carries a body.
    if matches!(
        resp.status(),
        StatusCode::BAD_REQUEST
            | StatusCode::METHOD_NOT_ALLOWED
            | StatusCode::UNAUTHORIZED
            | StatusCode::FORBIDDEN
    ) && carries_body(&req)
        && req.version() < Version::HTTP_2
    {
        // The body was never read: closing is the only way not to read it, since the next
        // request on this connection would start after it.
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    state.metrics.request(label, resp.status(), started);
    super::log::finish_response(resp, span, started, state.metrics.clone())
}

/// The handlers that may go upstream run boxed: their futures are kilobytes large, and inline
/// they would make every request's future as large, to be copied on every request. The
/// manifest handler is boxed too since repository scoping grew its future: one allocation
/// costs less than the copies (about 700 instructions per cached manifest request less,
/// `benches/callgrind.sh`).
async fn dispatch<B>(state: &AppState, r: Route<'_>, req: &Request<B>, span: &Span) -> Reply {
    let head = req.method() == Method::HEAD;
    let ns = query_param(req.uri().query(), "ns");
    let mirror = &state.mirror;
    // A peer replica asks on behalf of a client it has authenticated and authorized itself; a
    // signature that does not check out is refused before anything else.
    let forwarded = match mirror.cluster() {
        Some(c) => {
            let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
            match c.check(req.method(), path, req.headers()) {
                PeerCheck::NotPeer => false,
                PeerCheck::Peer => true,
                PeerCheck::Forged => {
                    return Err(Error::client(
                        ErrorCode::Unauthorized,
                        "peer request with a signature that does not check out",
                    ));
                }
            }
        }
        None => false,
    };
    // Authentication comes first, before routing can tell a caller which upstreams exist;
    // access rules are checked once a route names the upstream and repository.
    let who = match &state.auth {
        Some(auth) if !forwarded && !matches!(r, Route::Healthz | Route::Readyz) => {
            Some(auth.authenticate(req.headers()).await?)
        }
        _ => None,
    };
    crate::telemetry::record_user(
        span,
        who.as_ref().map_or(crate::auth::ANONYMOUS, Principal::name),
    );
    // Nothing cachalot serves takes a body, so none is read, whatever its size (writes keep
    // their 405 below, which says more to a `docker push`).
    if carries_body(req) && r != Route::Unsupported {
        return Err(Error::Client(
            OciError::new(
                ErrorCode::Unsupported,
                "a request body is not accepted: this mirror only serves pulls",
            )
            .with_status(StatusCode::BAD_REQUEST),
        ));
    }
    match r {
        Route::Base => Ok(json_ok(b"{}".to_vec(), head)),
        Route::Manifest { name, reference } => {
            let mut t = mirror.route(name, ns.as_deref())?;
            t.forwarded = forwarded;
            authorize(state, who.as_ref(), &t)?;
            let accept = Accept::parse(
                req.headers()
                    .get_all(header::ACCEPT)
                    .iter()
                    .filter_map(|v| v.to_str().ok()),
            );
            Box::pin(manifest(state, &t, reference, &accept, req, head, span)).await
        }
        Route::Blob { name, digest } => {
            let mut t = mirror.route(name, ns.as_deref())?;
            t.forwarded = forwarded;
            authorize(state, who.as_ref(), &t)?;
            let digest = parse_digest(digest)?;
            Box::pin(blob(state, &t, &digest, req, head)).await
        }
        Route::Tags { name } => {
            let t = mirror.route(name, ns.as_deref())?;
            authorize(state, who.as_ref(), &t)?;
            Box::pin(super::listing::tags(state, &t, req.uri().query(), head)).await
        }
        Route::Catalog => {
            let query = req.uri().query();
            Box::pin(super::listing::catalog(
                state,
                who.as_ref(),
                ns.as_deref(),
                query,
                head,
            ))
            .await
        }
        Route::Referrers { name, digest } => {
            let t = mirror.route(name, ns.as_deref())?;
            authorize(state, who.as_ref(), &t)?;
            let digest = parse_digest(digest)?;
            Box::pin(super::referrers::referrers(
                state,
                &t,
                &digest,
                req.uri().query(),
                head,
            ))
            .await
        }
        Route::Metrics => Ok(metrics(mirror)),
        Route::Root | Route::Ui { .. } => {
            let path = match r {
                Route::Ui { rest } => Some(rest),
                _ => None,
            };
            let caller = crate::ui::serve::Caller {
                auth: state.auth.clone(),
                who,
            };
            let asked = crate::ui::serve::Asked {
                path,
                query: req.uri().query(),
                // HTTP/2 (what browsers speak over TLS) carries the host as :authority, in
                // the URI, and sends no Host header.
                host: req
                    .headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .or_else(|| req.uri().authority().map(|a| a.as_str())),
                head,
            };
            Box::pin(crate::ui::serve::serve(
                &state.ui,
                mirror,
                &state.metrics,
                caller,
                asked,
            ))
            .await
        }
        Route::Healthz => Ok(text(StatusCode::OK, "ok\n")),
        Route::Readyz => {
            // Ready when the cache directory is usable: the upstreams are optional by design.
            if mirror.draining() {
                Ok(text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"))
            } else if mirror.ready() {
                Ok(text(StatusCode::OK, "ready\n"))
            } else {
                Ok(text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "cache directory unavailable\n",
                ))
            }
        }
        Route::Unsupported => Err(Error::client(
            ErrorCode::Unsupported,
            "this registry is a read-only pull-through mirror",
        )),
        Route::NotFound => Err(Error::client(ErrorCode::NameUnknown, "no such endpoint")),
    }
}

/// Whether the request announces a body (HTTP/1 `Content-Length` other than 0, or any
/// `Transfer-Encoding`), which hyper would otherwise read, or drain, before the next request.
fn carries_body<B>(req: &Request<B>) -> bool {
    let h = req.headers();
    h.contains_key(header::TRANSFER_ENCODING)
        || h.get_all(header::CONTENT_LENGTH)
            .iter()
            .any(|v| v.as_bytes().iter().any(|&b| b != b'0'))
}

/// The `/metrics` answer, on the main listener and on `server.metrics_listen` alike.
pub(super) fn metrics(mirror: &Mirror) -> Response<Body> {
    Response::builder()
        .header(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )
        .body(body::full(mirror.metrics_text()))
        .expect("static response")
}

/// Whether the authenticated caller may pull from `t`'s repository (always, without `[auth]`).
fn authorize(state: &AppState, who: Option<&Principal>, t: &Target) -> Result<(), Error> {
    match (&state.auth, who) {
        (Some(auth), Some(who)) => auth.authorize(who, t.upstream.name(), t.repo.as_str()),
        _ => Ok(()),
    }
}

fn parse_digest(s: &str) -> Result<Digest, Error> {
    s.parse().map_err(|e| {
        Error::client(
            ErrorCode::DigestInvalid,
            format!("invalid digest {:?}: {e}", truncate(s)),
        )
    })
}

pub(super) fn truncate(s: &str) -> String {
    s.chars().take(100).collect()
}

async fn manifest<B>(
    state: &AppState,
    t: &Target,
    reference: &str,
    accept: &Accept,
    req: &Request<B>,
    head: bool,
    span: &Span,
) -> Reply {
    let mirror = &state.mirror;
    let m = if reference.contains(':') {
        let d = parse_digest(reference)?;
        mirror.manifest_by_digest(t, &d).await?
    } else {
        // Neither a digest nor a tag: no manifest can have this name, which the spec (and its
        // conformance suite) answers as unknown rather than as a malformed request. The
        // upstream is not asked, since it could not hold it either.
        let tag = Tag::parse(reference).map_err(|_| {
            Error::client(
                ErrorCode::ManifestUnknown,
                format!(
                    "{:?} is neither a tag nor a digest, so no manifest has it",
                    truncate(reference)
                ),
            )
        })?;
        mirror.manifest_by_tag(t, &tag, accept).await?
    };
    let h = &m.headers;
    if let Ok(d) = h.digest.to_str() {
        crate::telemetry::record_digest(span, &d);
    }
    let content_type = h
        .content_type
        .clone()
        .map_err(|e| Error::Internal(format!("manifest response: {e}")))?;
    let not_modified = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|e| e.trim().as_bytes() == h.etag.as_bytes())
        });
    let body = if head || not_modified {
        body::empty()
    } else {
        state.metrics.served(Source::Cache, m.bytes.len() as u64);
        body::full(m.bytes.clone())
    };
    let mut resp = Response::new(body);
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, content_type);
    headers.insert(DOCKER_CONTENT_DIGEST, h.digest.clone());
    headers.insert(header::ETAG, h.etag.clone());
    if not_modified {
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
    } else {
        headers.insert(header::CONTENT_LENGTH, h.content_length.clone());
    }
    Ok(resp)
}

async fn blob<B>(
    state: &AppState,
    t: &Target,
    digest: &Digest,
    req: &Request<B>,
    head: bool,
) -> Reply {
    crate::telemetry::record_digest(&Span::current(), digest);
    let builder = Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header("docker-content-digest", digest.to_string())
        .header(header::ETAG, format!("\"{digest}\""))
        .header(header::ACCEPT_RANGES, "bytes");
    if head {
        let len = state.mirror.blob_len(t, digest).await?;
        return Ok(builder
            .header(header::CONTENT_LENGTH, len)
            .body(body::empty())
            .expect("valid headers"));
    }
    let source = state.mirror.blob(t, digest).await?;
    let builder = builder.extension(source.origin());
    // Plain HTTP/1 connections carry a sendfile queue; HTTP/2 frames its own body bytes.
    let sendfile = req
        .extensions()
        .get::<Arc<FileQueue>>()
        .filter(|_| req.version() <= Version::HTTP_11)
        .cloned();
    let body = |source: BlobSource, start: u64, end: Option<u64>| {
        body::blob(source.range(start, end), sendfile, state.metrics.clone())
    };
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok());
    let Some(len) = source.blob_len() else {
        // Length unknown until the fill ends (upstream sent no Content-Length): a plain 200,
        // which every client accepts in answer to a Range.
        return Ok(builder.body(body(source, 0, None)).expect("valid headers"));
    };
    match range.map(|r| parse_range(r, len)) {
        Some(RangeAnswer::Unsatisfiable) => {
            let e = OciError::new(
                ErrorCode::RangeInvalid,
                format!(
                    "range {:?} is outside the blob's {len} bytes",
                    truncate(range.unwrap_or(""))
                ),
            );
            let mut resp = oci_response(&e);
            resp.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{len}")).expect("ascii"),
            );
            Ok(resp)
        }
        Some(RangeAnswer::Partial(start, end)) => Ok(builder
            .status(StatusCode::PARTIAL_CONTENT)
            .header(
                header::CONTENT_RANGE,
                format!("bytes {start}-{}/{len}", end - 1),
            )
            .header(header::CONTENT_LENGTH, end - start)
            .body(body(source, start, Some(end)))
            .expect("valid headers")),
        Some(RangeAnswer::Full) | None => Ok(builder
            .header(header::CONTENT_LENGTH, len)
            .body(body(source, 0, Some(len)))
            .expect("valid headers")),
    }
}

/// How to answer a `Range` header for a blob of `len` bytes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RangeAnswer {
    /// Ignore it: serve the whole blob (syntax we do not serve, or several ranges).
    Full,
    /// Bytes `start..end`, end exclusive.
    Partial(u64, u64),
    Unsatisfiable,
}

/// Parses a single `bytes=` range (RFC 9110 14.1.2). Several ranges get the whole blob, which
/// clients accept; a malformed header is ignored, as the RFC allows.
pub(crate) fn parse_range(header: &str, len: u64) -> RangeAnswer {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return RangeAnswer::Full;
    };
    if spec.contains(',') {
        return RangeAnswer::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeAnswer::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            None
        } else {
            s.parse().ok()
        }
    };
    match (a.is_empty(), num(a), num(b)) {
        // bytes=-N: the last N bytes.
        (true, _, Some(n)) => {
            if n == 0 || len == 0 {
                RangeAnswer::Unsatisfiable
            } else {
                RangeAnswer::Partial(len - n.min(len), len)
            }
        }
        (false, Some(start), end) if b.is_empty() || end.is_some() => {
            if start >= len {
                return RangeAnswer::Unsatisfiable;
            }
            match end {
                None => RangeAnswer::Partial(start, len),
                Some(e) if e < start => RangeAnswer::Full,
                Some(e) => RangeAnswer::Partial(start, e.min(len - 1) + 1),
            }
        }
        _ => RangeAnswer::Full,
    }
}

/// An upstream's `Link: <...>; rel="next"` onto the client's own `path` (its repository name),
/// with its `ns` when it routed with one, and `param` (a filter the client asked for) replacing
/// any the upstream's `Link` carries. Only the `next` link is kept: any other the upstream lists
/// names its own host or paths, which are not the client's.
pub(crate) fn rewrite_link_to(
    link: &str,
    path: &str,
    ns: Option<&str>,
    param: Option<(&str, &str)>,
) -> Option<String> {
    let target = crate::oci::link::next_target(link)?;
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
    let mut pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .filter(|(k, _)| k != "ns" && param.is_none_or(|(p, _)| k != p))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if let Some((k, v)) = param {
        pairs.push((k.into(), v.into()));
    }
    if let Some(ns) = ns {
        pairs.push(("ns".into(), ns.into()));
    }
    let q = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    Some(format!("<{path}?{q}>; rel=\"next\""))
}

pub(super) fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

fn json_ok(bytes: Vec<u8>, head: bool) -> Response<Body> {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, bytes.len())
        .body(if head {
            body::empty()
        } else {
            body::full(bytes)
        })
        .expect("static response")
}

fn text(status: StatusCode, s: &'static str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(body::full(s))
        .expect("static response")
}

fn oci_response(e: &OciError) -> Response<Body> {
    let body = e.body();
    Response::builder()
        .status(e.status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, body.len())
        .body(body::full(body))
        .expect("static response")
}

fn error_response(e: &Error, not_found: ErrorCode) -> Response<Body> {
    let oci = e.to_oci(not_found);
    let mut resp = oci_response(&oci);
    if oci.status == StatusCode::TOO_MANY_REQUESTS || oci.status == StatusCode::SERVICE_UNAVAILABLE
    {
        let retry = e.retry_after().cloned().unwrap_or(DEFAULT_RETRY_AFTER);
        resp.headers_mut().insert(header::RETRY_AFTER, retry);
    }
    resp
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_link_is_rewritten_to_the_clients_path_keeping_only_next() {
        let path = "/v2/hub/app/referrers/sha256:ab";
        assert_eq!(
            rewrite_link_to(
                "</v2/app/referrers/sha256:ab?n=1&last=x&ns=evil>; rel=\"next\"",
                path,
                Some("docker.io"),
                None
            )
            .as_deref(),
            Some("</v2/hub/app/referrers/sha256:ab?n=1&last=x&ns=docker.io>; rel=\"next\"")
        );
        // Other links, and anything after the next one, stay with the upstream.
        assert_eq!(
            rewrite_link_to(
                "<https://up.example/v2/app/referrers/sha256:ab?page=1>; rel=\"prev\", \
                 <https://up.example/v2/app/referrers/sha256:ab?page=3>; rel=next; title=\"x\", \
                 <https://elsewhere.example/>; rel=\"help\"",
                path,
                None,
                Some(("artifactType", "a/b"))
            )
            .as_deref(),
            Some("</v2/hub/app/referrers/sha256:ab?page=3&artifactType=a%2Fb>; rel=\"next\"")
        );
        assert_eq!(
            rewrite_link_to("<https://up.example/?x=1>; rel=\"prev\"", path, None, None),
            None
        );
        assert_eq!(rewrite_link_to("garbage", path, None, None), None);
        assert_eq!(
            rewrite_link_to("<unclosed; rel=next", path, None, None),
            None
        );
    }
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), RangeAnswer::Partial(0, 10));
        assert_eq!(parse_range("bytes=90-", 100), RangeAnswer::Partial(90, 100));
        assert_eq!(
            parse_range("bytes=90-500", 100),
            RangeAnswer::Partial(90, 100)
        );
        assert_eq!(parse_range("bytes=-10", 100), RangeAnswer::Partial(90, 100));
        assert_eq!(parse_range("bytes=-500", 100), RangeAnswer::Partial(0, 100));
        assert_eq!(parse_range("bytes=100-", 100), RangeAnswer::Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), RangeAnswer::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), RangeAnswer::Full);
        assert_eq!(parse_range("items=0-1", 100), RangeAnswer::Full);
        assert_eq!(parse_range("bytes=5-1", 100), RangeAnswer::Full);
        assert_eq!(parse_range("bytes=x-1", 100), RangeAnswer::Full);
    }

    proptest! {
        #[test]
        fn range_answers_stay_inside_the_blob(h in "bytes=[0-9]{0,5}-[0-9]{0,5}", len in 0u64..100_000) {
            if let RangeAnswer::Partial(s, e) = parse_range(&h, len) {
                prop_assert!(s < e && e <= len);
            }
        }
    }
}
