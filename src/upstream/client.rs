//! One upstream registry: a pooled hyper-util client over hyper-rustls (webpki roots, http and
//! https, HTTP/1.1 and HTTP/2), per-upstream timeouts, token and Basic auth, and redirects.
//!
//! Timeouts: the connect timeout lives in the connector; the response-header timeout wraps each
//! request sent (each attempt, each redirect hop, each token fetch); the idle-body timeout is the
//! caller's to apply between body frames ([`Upstream::body_timeout`]).
//!
//! Credentials go only where they belong (DESIGN.md invariant 6): the upstream's token or Basic
//! credentials are dropped as soon as a redirect leaves the scheme, host and port they were
//! sent to, and never come back within that request.

use super::auth::{self, BearerChallenge, Token, TokenCache};
use super::breaker::{Breaker, Change};
use super::credentials::{CredentialSource, Issued};
use crate::config::{ConfigError, UpstreamConfig};
use crate::error::{Error, UpstreamFault};
use crate::metrics::Metrics;
use bytes::{Bytes, BytesMut};
use http::header::{
    ACCEPT, AUTHORIZATION, CONTENT_TYPE, LOCATION, RANGE, RETRY_AFTER, USER_AGENT, WWW_AUTHENTICATE,
};
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use parking_lot::RwLock;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;
use url::Url;

/// Redirects followed per request before giving up.
pub const MAX_REDIRECTS: usize = 5;
/// Largest token response read.
const MAX_TOKEN_RESPONSE: usize = 1 << 20;
const USER_AGENT_VALUE: &str = concat!("cachalot/", env!("CARGO_PKG_VERSION"));

/// What a request is for; the `op` label of `cachalot_upstream_requests_total`. Defined with
/// the metrics, which pre-create a series for each.
pub use crate::metrics::Op;

/// One request to an upstream. The caller's own headers are never part of it: only `Accept` and
/// `Range` are forwarded.
#[derive(Clone, Debug)]
pub struct UpstreamRequest<'a> {
    /// GET or HEAD.
    pub method: Method,
    pub op: Op,
    /// The name as the upstream knows it (prefix stripped, `library/` added); the token scope is
    /// `repository:<repo>:pull`. Ignored for [`Op::Ping`].
    pub repo: &'a crate::oci::RepoName,
    /// `/v2/...`; the configured url's path prefix, if any, is prepended.
    pub path_and_query: String,
    pub accept: Option<String>,
    pub range: Option<HeaderValue>,
}

// Full, not Empty: an identity token is exchanged in a POST with a form body.
type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// OAuth2 `client_id` sent with an identity token (Docker sends `registry-client`).
const OAUTH_CLIENT_ID: &str = "cachalot";

/// One configured upstream registry. Cheap to clone (an `Arc` inside).
#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

impl Inner {
    fn breaker_pause_ms(&self) -> u128 {
        self.breaker.pause().as_millis()
    }
}

struct Inner {
    name: String,
    /// The configured url; its path (often `/`) is the prefix of every request path.
    base: Url,
    client: HttpClient,
    /// Fixed, or asked of a helper or command (and asked again when refused).
    creds: Option<CredentialSource>,
    header_timeout: Duration,
    body_timeout: Duration,
    tokens: TokenCache,
    /// The last Bearer challenge seen, so later requests fetch a token before the first attempt
    /// instead of collecting a 401 each time.
    bearer: RwLock<Option<BearerChallenge>>,
    /// The upstream challenged with Basic: send Basic credentials up front.
    basic: AtomicBool,
    metrics: Arc<Metrics>,
    /// `max_connections`: a request takes a permit before it is sent and keeps it until its
    /// response body ends.
    limit: Option<Arc<Semaphore>>,
    breaker: Breaker,
}

/// The body of an upstream response: hyper's, holding the request's place under the
/// upstream's `max_connections` until it ends (or is dropped).
#[derive(Debug)]
pub struct UpstreamBody {
    inner: Incoming,
    permit: Option<OwnedSemaphorePermit>,
}

impl UpstreamBody {
    fn new(inner: Incoming, permit: Option<OwnedSemaphorePermit>) -> UpstreamBody {
        UpstreamBody { inner, permit }
    }
}

impl hyper::body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            // Over: the next request may go, even if the caller keeps this body around.
            self.permit = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Counts a request waiting for its turn, until it has it or gives up.
struct Waiting(prometheus::IntGauge);

impl Waiting {
    fn new(g: prometheus::IntGauge) -> Waiting {
        g.inc();
        Waiting(g)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.inner.name)
            .field("base", &self.inner.base.as_str())
            .field("credentials", &self.inner.creds)
            .finish_non_exhaustive()
    }
}

/// How a request is authorized.
#[derive(Clone)]
enum Auth {
    None,
    Bearer(Token),
    Basic(Arc<Issued>),
}

// === impl Upstream ===

impl Upstream {
    /// Builds the client. Reads a fixed password (env or file) now; fails on an invalid url or
    /// an unreadable password. A credential helper or command first runs when credentials are
    /// needed.
    pub fn new(cfg: &UpstreamConfig, metrics: Arc<Metrics>) -> crate::Result<Upstream> {
        let url = Url::parse(&cfg.url).map_err(|_| {
            ConfigError::Invalid(format!(
                "upstream {:?}: url {:?} is not a URL",
                cfg.name, cfg.url
            ))
        })?;
        let base = check_base(url).ok_or_else(|| {
            ConfigError::Invalid(format!(
                "upstream {:?}: url {:?} must be http(s)://host[/path]",
                cfg.name, cfg.url
            ))
        })?;
        let creds =
            CredentialSource::from_config(cfg, &base, Some(metrics.credential_runs.clone()))?;

        let tls = super::tls::client_config(cfg)?;
        if cfg.insecure_skip_verify {
            tracing::warn!(
                upstream = %cfg.name,
                "insecure_skip_verify: this upstream's TLS certificate is not checked; anyone on \
                 the network path can impersonate it"
            );
        }
        let client = crate::outbound::pooled_client(tls, cfg.connect_timeout.0);

        Ok(Upstream {
            inner: Arc::new(Inner {
                name: cfg.name.clone(),
                base,
                client,
                creds,
                header_timeout: cfg.timeout.0,
                body_timeout: cfg.timeout.0,
                tokens: TokenCache::default(),
                bearer: RwLock::new(None),
                basic: AtomicBool::new(false),
                metrics,
                limit: cfg.max_connections.map(|n| Arc::new(Semaphore::new(n))),
                breaker: Breaker::new(cfg.circuit_break_after, cfg.circuit_pause.0),
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The configured URL (with any path prefix): where a `Link` the upstream sends must point
    /// to be followed.
    pub fn base(&self) -> &Url {
        &self.inner.base
    }

    /// Idle-body timeout the caller applies between body frames (`timeout` in the config).
    pub fn body_timeout(&self) -> Duration {
        self.inner.body_timeout
    }

    /// Response-header timeout applied to every request sent.
    pub fn header_timeout(&self) -> Duration {
        self.inner.header_timeout
    }

    /// The bearer token cache (for tests and diagnostics).
    pub fn tokens(&self) -> &TokenCache {
        &self.inner.tokens
    }

    /// Sends `req` with auth, following redirects, and returns the final response whatever its
    /// status; the body streams.
    ///
    /// Auth: a cached bearer token for `repository:<repo>:pull` is sent up front (fetched up
    /// front when this upstream has challenged with Bearer before). On a 401 with a Bearer
    /// challenge, the rejected token is dropped from the cache, a fresh one fetched (concurrent
    /// fetches of one scope coalesce), and the request retried once; on a Basic challenge it is
    /// retried once with the configured credentials. A 401 is returned as is when retrying cannot
    /// help (the token was fetched during this call for the same realm and scope, or there are
    /// no credentials for Basic).
    ///
    /// Credentials from a helper or command that the upstream (Basic) or its token realm
    /// refuses with a 401 are asked for again, and the request or token fetch retried once with
    /// the new answer (see `credentials.rs` for how often the helper may run).
    ///
    /// Failures: connect errors -> [`UpstreamFault::Connect`]; connect or header timeouts ->
    /// [`UpstreamFault::Timeout`]; a credential helper or command that fails ->
    /// [`UpstreamFault::Credentials`]; other transport errors, bad redirects and more than
    /// [`MAX_REDIRECTS`] redirects -> [`UpstreamFault::Protocol`]; a token endpoint that does
    /// not answer 200 -> [`UpstreamFault::Status`] with its status.
    ///
    /// Load: with `max_connections`, the request first waits for its turn, which it keeps
    /// until the returned body ends or is dropped. While the upstream's circuit is open
    /// (see `breaker.rs`) nothing is sent: [`UpstreamFault::CircuitOpen`] at once.
    pub async fn send(&self, req: UpstreamRequest<'_>) -> crate::Result<Response<UpstreamBody>> {
        // Fail before queueing: a request for a down upstream must not wait for a turn first.
        self.inner
            .breaker
            .check()
            .map_err(|wait| self.circuit_open(wait))?;
        let permit = match &self.inner.limit {
            Some(limit) => {
                let _waiting = Waiting::new(
                    self.inner
                        .metrics
                        .upstream_waiting
                        .with_label_values(&[self.inner.name.as_str()]),
                );
                Some(
                    limit
                        .clone()
                        .acquire_owned()
                        .await
                        .map_err(|_| Error::Internal("upstream limit closed".into()))?,
                )
            }
            None => None,
        };
        let _admitted = self
            .inner
            .breaker
            .admit()
            .map_err(|wait| self.circuit_open(wait))?;
        let resp = self.send_admitted(req).await?;
        Ok(resp.map(|b| UpstreamBody::new(b, permit)))
    }

    /// Whether this upstream's circuit is open (it is taken for down).
    pub fn circuit_open_now(&self) -> bool {
        self.inner.breaker.is_open()
    }

    /// Counts a timeout the caller applied itself (a deadline shorter than the header
    /// timeout, as tag revalidation has) towards the circuit breaker, as if `send` had met it.
    pub fn note_timeout(&self) {
        let change = self.inner.breaker.failure();
        self.breaker_changed(change);
    }

    fn circuit_open(&self, wait: Duration) -> Error {
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        self.fault(UpstreamFault::CircuitOpen {
            retry_after: HeaderValue::from(secs),
        })
    }

    fn breaker_changed(&self, change: Option<Change>) {
        let name = self.inner.name.as_str();
        let gauge = self
            .inner
            .metrics
            .upstream_circuit_open
            .with_label_values(&[name]);
        match change {
            Some(Change::Opened) => {
                gauge.set(1);
                tracing::warn!(
                    upstream = name,
                    pause_ms = self.inner.breaker_pause_ms(),
                    "upstream taken for down after repeated connect failures or timeouts: circuit open, serving from cache"
                );
            }
            Some(Change::Closed) => {
                gauge.set(0);
                tracing::info!(upstream = name, "upstream answers again: circuit closed");
            }
            None => {}
        }
    }

    async fn send_admitted(&self, req: UpstreamRequest<'_>) -> crate::Result<Response<Incoming>> {
        let url = join_url(&self.inner.base, &req.path_and_query)
            .map_err(|m| Error::Internal(format!("upstream path {m}")))?;
        let scope = match req.op {
            Op::Ping => None,
            _ => Some(format!("repository:{}:pull", req.repo.as_str())),
        };
        let key = scope.as_deref().unwrap_or("");
        let started = Instant::now();

        let auth = if let Some(t) = self.inner.tokens.get(key).await {
            Auth::Bearer(t)
        } else if let Some(ch) = self.known_bearer() {
            let ch = BearerChallenge {
                scope: scope.clone(),
                ..ch
            };
            Auth::Bearer(self.token(key, &ch).await?)
        } else if self.inner.basic.load(Ordering::Relaxed)
            && let Some(creds) = &self.inner.creds
        {
            self.basic_auth(creds.get().await.map_err(|e| self.credentials_fault(e))?)
        } else {
            Auth::None
        };

        let resp = self.send_following(&req, &url, &auth, 1).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            if req.method == Method::HEAD {
                // A HEAD is over once its headers arrive; GET callers observe after the body.
                self.inner
                    .metrics
                    .upstream_done(&self.inner.name, req.op.as_str(), started);
            }
            return Ok(resp);
        }
        let challenges: Vec<auth::Challenge> = resp
            .headers()
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .flat_map(|v| auth::parse_www_authenticate_bytes(v.as_bytes()))
            .collect();

        if let Some(mut ch) = challenges.iter().find_map(auth::Challenge::bearer) {
            if ch.scope.is_none() {
                ch.scope = scope.clone();
            }
            if let Auth::Bearer(used) = &auth {
                let same = used.realm == ch.realm && used.scope == ch.scope;
                if used.fetched_at >= started && same {
                    // A token fetched just now for exactly this was refused: the account has no
                    // access (or the repository does not exist). Another token will not help.
                    return Ok(resp);
                }
                self.inner.tokens.invalidate_if(key, used).await;
            }
            self.remember_bearer(&ch);
            drop(resp);
            let token = self.token(key, &ch).await?;
            return self
                .send_following(&req, &url, &Auth::Bearer(token), 2)
                .await;
        }
        let basic = challenges.iter().any(|c| c.scheme == auth::Scheme::Basic);
        let Some(creds) = self.inner.creds.as_ref().filter(|_| basic) else {
            return Ok(resp);
        };
        let next = match &auth {
            // Refused: others, if the helper or command has them (asked once for a burst).
            Auth::Basic(used) => creds.refused(used).await,
            _ => creds.get().await.map(Some),
        }
        .map_err(|e| self.credentials_fault(e))?;
        let Some(Auth::Basic(next)) = next.map(|c| self.basic_auth(c)) else {
            return Ok(resp);
        };
        self.inner.basic.store(true, Ordering::Relaxed);
        drop(resp);
        self.send_following(&req, &url, &Auth::Basic(next), 2).await
    }

    /// Basic auth with `creds`, unless they are an identity token (only a token realm takes
    /// those, as Docker does).
    fn basic_auth(&self, creds: Arc<Issued>) -> Auth {
        if creds.creds.identity_token().is_some() {
            return Auth::None;
        }
        Auth::Basic(creds)
    }

    /// The error for credentials that could not be had (already logged where it happened).
    fn credentials_fault(&self, why: String) -> Error {
        self.fault(UpstreamFault::Credentials(why))
    }

    /// Reads a small body (a manifest, a tags list, a token answer) whole, for a caller that
    /// needs all of it before it can act.
    ///
    /// At most `cap` bytes: more is refused as soon as it arrives, so a lying upstream cannot
    /// make it buffer without bound. Each frame must come within the idle-body timeout (a caller
    /// that needs the whole body by a deadline sets one around this). Failures name this upstream: no frame in
    /// time -> [`UpstreamFault::Timeout`]; a broken body or more than `cap` bytes ->
    /// [`UpstreamFault::Protocol`]. On failure the body is dropped, which closes its connection.
    pub async fn read_small<B>(&self, mut body: B, cap: usize) -> crate::Result<Bytes>
    where
        B: hyper::body::Body<Data = Bytes, Error = hyper::Error> + Unpin,
    {
        let mut buf = BytesMut::new();
        loop {
            let frame = tokio::time::timeout(self.inner.body_timeout, body.frame())
                .await
                .map_err(|_| self.fault(UpstreamFault::Timeout("waiting for the response body")))?;
            let Some(frame) = frame else {
                return Ok(buf.freeze());
            };
            let frame =
                frame.map_err(|e| self.fault(UpstreamFault::Protocol(format!("body: {e}"))))?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > cap {
                    return Err(self.fault(UpstreamFault::Protocol(format!(
                        "response larger than {cap} bytes"
                    ))));
                }
                buf.extend_from_slice(&data);
            }
        }
    }

    /// The error for a non-success response: a Status fault keeping `Retry-After`.
    pub fn status_error<B>(&self, resp: &Response<B>) -> Error {
        self.status_error_parts(resp.status(), resp.headers())
    }

    /// [`Upstream::status_error`] from a status and headers (for a response already taken apart).
    pub fn status_error_parts(&self, status: StatusCode, headers: &http::HeaderMap) -> Error {
        Error::upstream(
            &self.inner.name,
            UpstreamFault::Status {
                status,
                retry_after: headers.get(RETRY_AFTER).cloned(),
            },
        )
    }

    fn fault(&self, fault: UpstreamFault) -> Error {
        Error::upstream(&self.inner.name, fault)
    }

    fn known_bearer(&self) -> Option<BearerChallenge> {
        self.inner.bearer.read().clone()
    }

    fn remember_bearer(&self, ch: &BearerChallenge) {
        *self.inner.bearer.write() = Some(BearerChallenge {
            scope: None,
            ..ch.clone()
        });
    }

    /// The cached token for `key`, or one fetched for challenge `ch` (coalesced per key).
    async fn token(&self, key: &str, ch: &BearerChallenge) -> crate::Result<Token> {
        self.inner
            .tokens
            .get_or_fetch(key, self.fetch_token(ch))
            .await
    }

    /// One token request: `GET realm?service=..&scope=..`, with Basic credentials if configured
    /// (unless that would send them in clear text to a realm when the upstream itself is https).
    async fn fetch_token(&self, ch: &BearerChallenge) -> crate::Result<Token> {
        let started = Instant::now();
        let result = self.fetch_token_inner(ch).await;
        self.inner
            .metrics
            .upstream_done(&self.inner.name, Op::Token.as_str(), started);
        let label = if result.is_ok() { "ok" } else { "error" };
        self.inner
            .metrics
            .token_fetches
            .with_label_values(&[self.inner.name.as_str(), label])
            .inc();
        result
    }

    async fn fetch_token_inner(&self, ch: &BearerChallenge) -> crate::Result<Token> {
        let creds = match &self.inner.creds {
            Some(source) => Some(source.get().await.map_err(|e| self.credentials_fault(e))?),
            None => None,
        };
        let mut resp = self.token_request(ch, creds.as_deref()).await?;
        if let (Some(source), Some(used)) = (&self.inner.creds, &creds) {
            // A refresh token is refused as OAuth2 says (400 invalid_grant), or with a 401.
            let refused = resp.status() == StatusCode::UNAUTHORIZED
                || (used.creds.identity_token().is_some()
                    && resp.status() == StatusCode::BAD_REQUEST);
            if refused
                && let Some(next) = source
                    .refused(used)
                    .await
                    .map_err(|e| self.credentials_fault(e))?
            {
                drop(resp);
                resp = self.token_request(ch, Some(&next)).await?;
            }
        }
        if resp.status() != StatusCode::OK {
            tracing::debug!(status = resp.status().as_u16(), "token endpoint refused");
            return Err(self.status_error_parts(resp.status(), resp.headers()));
        }
        // Every request of this scope waits on this one fetch: the whole answer, not only each
        // frame, must come within the body timeout.
        let body = tokio::time::timeout(
            self.inner.body_timeout,
            self.read_small(
                UpstreamBody::new(resp.into_body(), None),
                MAX_TOKEN_RESPONSE,
            ),
        )
        .await
        .map_err(|_| self.fault(UpstreamFault::Timeout("reading the token response")))??;
        let (value, usable_for) = auth::parse_token_response(&body)
            .map_err(|e| self.fault(UpstreamFault::Protocol(e.0.to_owned())))?;
        Ok(Token {
            value,
            fetched_at: Instant::now(),
            usable_for,
            realm: ch.realm.clone(),
            scope: ch.scope.clone(),
        })
    }

    /// One request to the token realm of `ch`. Without credentials, or with a username and
    /// password: `GET realm?service=..&scope=..`, with Basic credentials. With an identity
    /// token: Docker's OAuth2 exchange, a form `POST` to the realm with
    /// `grant_type=refresh_token`. Credentials are not sent to a plain-http realm of an https
    /// upstream.
    async fn token_request(
        &self,
        ch: &BearerChallenge,
        creds: Option<&Issued>,
    ) -> crate::Result<Response<Incoming>> {
        let http_url = |s: &str| {
            s.parse()
                .ok()
                .filter(|u: &Uri| {
                    matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
                })
                .ok_or_else(|| {
                    self.fault(UpstreamFault::Protocol(
                        "token realm is not an http(s) URL".into(),
                    ))
                })
        };
        let url = http_url(&auth::token_url(
            &ch.realm,
            ch.service.as_deref(),
            ch.scope.as_deref(),
        ))?;
        let creds = creds.filter(|_| {
            let safe = url.scheme_str() == Some("https") || self.inner.base.scheme() == "http";
            if !safe {
                tracing::warn!(
                    upstream = %self.inner.name,
                    realm_host = url.host().unwrap_or(""),
                    "token realm is plain http; not sending credentials to it"
                );
            }
            safe
        });
        let request = match creds.map(|c| (&c.creds, c.creds.identity_token())) {
            Some((_, Some(refresh_token))) => {
                let mut form = form_urlencoded::Serializer::new(String::new());
                form.append_pair("grant_type", "refresh_token")
                    .append_pair("refresh_token", refresh_token.expose())
                    .append_pair("client_id", OAUTH_CLIENT_ID);
                if let Some(s) = &ch.service {
                    form.append_pair("service", s);
                }
                if let Some(s) = &ch.scope {
                    form.append_pair("scope", s);
                }
                Request::post(http_url(&ch.realm)?)
                    .header(USER_AGENT, USER_AGENT_VALUE)
                    .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .body(Full::new(Bytes::from(form.finish())))
            }
            Some((c, None)) => Request::get(url)
                .header(USER_AGENT, USER_AGENT_VALUE)
                .header(AUTHORIZATION, c.basic_header())
                .body(Full::default()),
            None => Request::get(url)
                .header(USER_AGENT, USER_AGENT_VALUE)
                .body(Full::default()),
        }
        .map_err(|e| Error::Internal(format!("token request: {e}")))?;
        let span = tracing::debug_span!("upstream", op = Op::Token.as_str(), registry = %self.inner.name, attempt = 1);
        self.request(Op::Token.as_str(), request)
            .instrument(span)
            .await
    }

    /// Sends one attempt, following up to [`MAX_REDIRECTS`] redirects. Authorization is dropped
    /// for good as soon as a hop leaves the origin it was meant for.
    async fn send_following(
        &self,
        req: &UpstreamRequest<'_>,
        url: &Url,
        auth: &Auth,
        attempt: u32,
    ) -> crate::Result<Response<Incoming>> {
        let span = tracing::debug_span!("upstream", op = req.op.as_str(), registry = %self.inner.name, attempt);
        async {
            let mut authorization = match auth {
                Auth::None => None,
                Auth::Bearer(t) => t.header(),
                Auth::Basic(c) => Some(c.creds.basic_header()),
            };
            let mut url = url.clone();
            for hop in 0..=MAX_REDIRECTS {
                let mut b = Request::builder()
                    .method(req.method.clone())
                    .uri(url.as_str())
                    .header(USER_AGENT, USER_AGENT_VALUE);
                if let Some(a) = &req.accept {
                    b = b.header(ACCEPT, a.as_str());
                }
                if let Some(r) = &req.range {
                    b = b.header(RANGE, r.clone());
                }
                if let Some(a) = &authorization {
                    b = b.header(AUTHORIZATION, a.clone());
                }
                let request = b.body(Full::default()).map_err(|e| {
                    self.fault(UpstreamFault::Protocol(format!(
                        "cannot build request: {e}"
                    )))
                })?;
                let resp = self.request(req.op.as_str(), request).await?;
                if !is_redirect(resp.status()) {
                    return Ok(resp);
                }
                if hop == MAX_REDIRECTS {
                    break;
                }
                let Some(location) = resp.headers().get(LOCATION) else {
                    return Ok(resp); // a 3xx without a Location: nothing to follow
                };
                let next = location
                    .to_str()
                    .ok()
                    .and_then(|l| resolve_location(&url, l))
                    .ok_or_else(|| {
                        self.fault(UpstreamFault::Protocol(
                            "redirect with an invalid Location".into(),
                        ))
                    })?;
                let cross = !same_origin(&url, &next);
                if cross {
                    authorization = None;
                }
                // The path only: signed CDN URLs carry credentials in their query.
                tracing::debug!(
                    status = resp.status().as_u16(),
                    host = next.host_str().unwrap_or(""),
                    path = next.path(),
                    cross_origin = cross,
                    "following redirect"
                );
                url = next;
            }
            Err(self.fault(UpstreamFault::Protocol(format!(
                "more than {MAX_REDIRECTS} redirects"
            ))))
        }
        .instrument(span)
        .await
    }

    /// Sends one request under the response-header timeout, and counts it.
    async fn request(
        &self,
        op: &'static str,
        request: Request<Full<Bytes>>,
    ) -> crate::Result<Response<Incoming>> {
        let m = &self.inner.metrics;
        let name = self.inner.name.as_str();
        let started = Instant::now();
        // Only method and path: the query of a redirect target may be a signed credential.
        let (method, path) = (request.method().clone(), request.uri().path().to_owned());
        let outcome = tokio::time::timeout(
            self.inner.header_timeout,
            self.inner.client.request(request),
        )
        .await;
        let elapsed = started.elapsed();
        let duration_ms = elapsed.as_secs_f64() * 1000.0;
        let exhausted = match &outcome {
            Ok(Err(e)) => local_exhaustion(e),
            _ => None,
        };
        let change = match &outcome {
            Ok(Ok(_)) => self.inner.breaker.success(),
            // This process had no descriptor for the socket: the upstream was never tried.
            Ok(Err(_)) if exhausted.is_some() => None,
            Ok(Err(e)) if e.is_connect() => self.inner.breaker.failure(),
            Err(_) => self.inner.breaker.failure(),
            Ok(Err(_)) => None,
        };
        self.breaker_changed(change);
        match outcome {
            Ok(Ok(resp)) => {
                let status = resp.status();
                m.upstream_request(name, op, Some(status.as_u16()));
                m.upstream_first_byte
                    .with_label_values(&[name, op])
                    .observe(elapsed.as_secs_f64());
                m.rate_limit_headers(name, resp.headers());
                if status == StatusCode::TOO_MANY_REQUESTS {
                    m.upstream_rate_limited.with_label_values(&[name]).inc();
                }
                tracing::info!(upstream = name, op, %method, path, status = status.as_u16(), duration_ms, "upstream call");
                Ok(resp)
            }
            Ok(Err(e)) => {
                if let Some(short) = exhausted {
                    tracing::debug!(upstream = name, op, %method, path, error = %short, "no resources to reach the upstream");
                    return Err(Error::Overloaded(std::sync::Arc::new(short)));
                }
                m.upstream_request(name, op, None);
                let fault = classify(&e);
                tracing::warn!(upstream = name, op, %method, path, error = %fault, duration_ms, "upstream call failed");
                Err(self.fault(fault))
            }
            Err(_) => {
                m.upstream_request(name, op, None);
                tracing::warn!(upstream = name, op, %method, path, duration_ms, "upstream call timed out waiting for response headers");
                Err(self.fault(UpstreamFault::Timeout("waiting for response headers")))
            }
        }
    }
}

/// The local resource shortage (EMFILE and the like) behind a client error, if that is what it
/// was: a socket this process could not open says nothing about the upstream.
fn local_exhaustion(e: &hyper_util::client::legacy::Error) -> Option<std::io::Error> {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && crate::error::is_exhaustion(io)
        {
            return io.raw_os_error().map(std::io::Error::from_raw_os_error);
        }
        src = s.source();
    }
    None
}

/// Maps a client error to a fault: connect failures (refused, DNS, TLS) are Connect, a connect
/// timeout is Timeout, anything after connecting is Protocol.
fn classify(e: &hyper_util::client::legacy::Error) -> UpstreamFault {
    let mut msg = String::new();
    let mut timed_out = false;
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            timed_out |= io.kind() == std::io::ErrorKind::TimedOut;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&s.to_string());
        src = s.source();
    }
    if msg.is_empty() {
        msg = e.to_string();
    }
    if e.is_connect() {
        if timed_out {
            UpstreamFault::Timeout("connecting")
        } else {
            UpstreamFault::Connect(msg)
        }
    } else {
        UpstreamFault::Protocol(msg)
    }
}

// === URLs ===

fn is_redirect(s: StatusCode) -> bool {
    matches!(s.as_u16(), 301 | 302 | 303 | 307 | 308)
}

/// The configured url, if it can be a base: http(s), a host, no query. The fragment is dropped.
fn check_base(mut url: Url) -> Option<Url> {
    if !matches!(url.scheme(), "http" | "https") || !url.has_host() || url.query().is_some() {
        return None;
    }
    url.set_fragment(None);
    Some(url)
}

/// `path_and_query` (starting with `/`) under the path of `base`.
///
/// Not `Url::join`: an absolute path would replace the base's path instead of extending it, and
/// one starting with `//` would name another host. A path or query that is not a valid request
/// target is refused rather than percent-encoded.
pub fn join_url(base: &Url, path_and_query: &str) -> Result<Url, String> {
    if !path_and_query.starts_with('/') {
        return Err(format!("{path_and_query:?} does not start with '/'"));
    }
    let pq: http::uri::PathAndQuery = path_and_query
        .parse()
        .map_err(|_| format!("{path_and_query:?} is not a valid path"))?;
    let mut url = base.clone();
    url.set_path(&format!(
        "{}{}",
        base.path().trim_end_matches('/'),
        pq.path()
    ));
    url.set_query(pq.query());
    Ok(url)
}

/// Resolves a `Location` value against the URL that answered, with `Url::join` (absolute,
/// `//host/p`, `/p?q` and relative references). The fragment is dropped. `None` when the result
/// is not an http(s) URL with a host.
///
/// A value with whitespace, control or non-ASCII characters, or a backslash, is refused rather
/// than repaired the way `Url::join` would (percent-encoded, stripped, read as `/`): a
/// registry sends none of them, and guessing what a broken one meant can change the host.
pub fn resolve_location(base: &Url, location: &str) -> Option<Url> {
    let loc = location.trim();
    let loc = loc.split_once('#').map_or(loc, |(l, _)| l);
    if !loc.bytes().all(|b| b.is_ascii_graphic() && b != b'\\') {
        return None;
    }
    let url = base.join(loc).ok()?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        return None;
    }
    // `url` accepts some hosts that `http::Uri` refuses (a backtick): no request can carry them.
    url.as_str().parse::<Uri>().ok()?;
    Some(url)
}

/// Same scheme, host and port (default ports filled in, hosts compared as parsed, so
/// case-insensitively): the test for keeping `Authorization` across a redirect. A URL that is
/// not http(s) has an opaque origin, equal to no other.
pub fn same_origin(a: &Url, b: &Url) -> bool {
    a.origin() == b.origin()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;

    use crate::oci::RepoName;
    use http::header::HOST;
    use http_body_util::Full;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use parking_lot::Mutex;
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicUsize;

    // === URL helpers ===

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    /// The Basic header value a registry expects for `user:password`.
    fn basic(user_password: &str) -> String {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(user_password);
        format!("Basic {b64}")
    }

    #[test]
    fn joins_urls_with_and_without_prefix() {
        let base = check_base(url("https://registry-1.docker.io")).unwrap();
        assert_eq!(
            join_url(&base, "/v2/library/nginx/manifests/latest").unwrap(),
            url("https://registry-1.docker.io/v2/library/nginx/manifests/latest")
        );
        let base = check_base(url("http://127.0.0.1:5000/mirror/hub/")).unwrap();
        assert_eq!(
            join_url(&base, "/v2/a/tags/list?n=10&last=x").unwrap(),
            url("http://127.0.0.1:5000/mirror/hub/v2/a/tags/list?n=10&last=x")
        );
        let base = check_base(url("http://127.0.0.1:5000/mirror")).unwrap();
        assert_eq!(
            join_url(&base, "/v2/").unwrap(),
            url("http://127.0.0.1:5000/mirror/v2/")
        );
        // A path starting with `//` stays a path; it does not name a host.
        assert_eq!(
            join_url(&base, "//evil.io/v2/").unwrap().host_str(),
            Some("127.0.0.1")
        );
        assert!(join_url(&base, "v2/x").is_err());
        assert!(join_url(&base, "/v2/a b").is_err());
        assert!(check_base(url("ftp://x/")).is_none());
        assert!(check_base(url("http://x/?q=1")).is_none());
        assert!(check_base(url("unix:/run/x.sock")).is_none());
    }

    #[test]
    fn compares_origins_for_redirects() {
        assert!(same_origin(
            &url("https://r.io/v2/"),
            &url("https://R.IO:443/other")
        ));
        assert!(same_origin(&url("http://r.io/a"), &url("http://r.io:80/b")));
        assert!(!same_origin(&url("https://r.io/a"), &url("http://r.io/a")));
        assert!(!same_origin(
            &url("https://r.io/a"),
            &url("https://r.io:8443/a")
        ));
        assert!(!same_origin(
            &url("https://r.io/a"),
            &url("https://cdn.r.io/a")
        ));
        assert!(!same_origin(
            &url("http://127.0.0.1:1/"),
            &url("http://127.0.0.1:2/")
        ));
        // Not http(s): no origin to share.
        assert!(!same_origin(
            &url("file:///relative"),
            &url("file:///relative")
        ));
    }

    #[test]
    fn resolves_locations() {
        let base = url("https://r.io:8443/v2/foo/blobs/sha256:ab?x=1");
        assert_eq!(
            resolve_location(&base, "https://cdn.io/b?sig=1").unwrap(),
            url("https://cdn.io/b?sig=1")
        );
        assert_eq!(
            resolve_location(&base, "//cdn.io/b").unwrap(),
            url("https://cdn.io/b")
        );
        assert_eq!(
            resolve_location(&base, "/v2/other?y=2#frag").unwrap(),
            url("https://r.io:8443/v2/other?y=2")
        );
        assert_eq!(
            resolve_location(&base, "sibling").unwrap(),
            url("https://r.io:8443/v2/foo/blobs/sibling")
        );
        assert_eq!(
            resolve_location(&base, " /trimmed#a b ").unwrap(),
            url("https://r.io:8443/trimmed")
        );
        assert!(resolve_location(&base, "ftp://x/y").is_none());
        assert!(resolve_location(&base, "javascript:alert(1)").is_none());
        assert!(resolve_location(&base, "https://").is_none());
        assert!(resolve_location(&base, "/a b").is_none());
        assert!(resolve_location(&base, "/a\tb").is_none());
        assert!(resolve_location(&base, "/é").is_none());
        assert!(resolve_location(&base, "//`").is_none());
        // `Url::join` would read these backslashes as `//evil.io`.
        assert!(resolve_location(&base, "\\\\evil.io/x").is_none());
        // Whatever it resolves to, a result is a request target the client can send.
        for loc in ["../../x?a=\"b\"", "/%zz/<>", "./a/../b;c", "?only=query"] {
            let u = resolve_location(&base, loc).unwrap();
            assert!(u.as_str().parse::<Uri>().is_ok(), "{loc} -> {u}");
        }
    }

    proptest::proptest! {
        /// Whatever the Location, a followed redirect is an http(s) URL with a host that the
        /// client can send, without a fragment; an absolute path stays on the same origin.
        #[test]
        fn resolved_locations_are_sendable(loc in "[ -~]{0,40}") {
            let base = url("https://r.io:8443/v2/foo/blobs/sha256:ab?x=1");
            if let Some(u) = resolve_location(&base, &loc) {
                proptest::prop_assert!(matches!(u.scheme(), "http" | "https"));
                proptest::prop_assert!(u.host_str().is_some_and(|h| !h.is_empty()));
                proptest::prop_assert!(u.fragment().is_none());
                proptest::prop_assert!(u.as_str().parse::<Uri>().is_ok(), "{}", u);
            }
            let trimmed = loc.trim();
            if trimmed.starts_with('/')
                && !trimmed.starts_with("//")
                && let Some(u) = resolve_location(&base, &loc)
            {
                proptest::prop_assert!(same_origin(&base, &u), "{}", u);
            }
        }
    }

    #[test]
    fn op_labels() {
        let all = [Op::Manifest, Op::Blob, Op::Tags, Op::Referrers, Op::Ping].map(Op::as_str);
        assert_eq!(all, ["manifest", "blob", "tags", "referrers", "ping"]);
    }

    // === an in-test server ===

    /// What the server saw: path and query, and the Authorization header.
    #[derive(Clone, Debug)]
    struct Seen {
        path: String,
        auth: Option<String>,
    }

    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<Seen>>>);

    impl Log {
        fn record(&self, req: &Request<Incoming>) -> Seen {
            let seen = Seen {
                path: req
                    .uri()
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .to_owned(),
                auth: req
                    .headers()
                    .get(AUTHORIZATION)
                    .map(|v| v.to_str().unwrap().to_owned()),
            };
            self.0.lock().push(seen.clone());
            seen
        }
        fn all(&self) -> Vec<Seen> {
            self.0.lock().clone()
        }
        fn count(&self, prefix: &str) -> usize {
            self.all()
                .iter()
                .filter(|s| s.path.starts_with(prefix))
                .count()
        }
    }

    type Handler = Arc<dyn Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync>;

    async fn serve(h: Handler) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let h = h.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let r = h(&req);
                        async move { Ok::<_, std::convert::Infallible>(r) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        addr
    }

    fn resp(status: u16, body: &str) -> Response<Full<Bytes>> {
        let mut r = Response::new(Full::new(Bytes::from(body.to_owned())));
        *r.status_mut() = StatusCode::from_u16(status).unwrap();
        r
    }

    fn with_header(
        mut r: Response<Full<Bytes>>,
        name: http::HeaderName,
        value: &str,
    ) -> Response<Full<Bytes>> {
        r.headers_mut()
            .insert(name, HeaderValue::from_str(value).unwrap());
        r
    }

    /// The repository named by `/v2/<repo>/(manifests|blobs|tags)/...`.
    fn repo_of(path: &str) -> String {
        let rest = path.trim_start_matches("/v2/");
        let end = ["/manifests/", "/blobs/", "/tags/"]
            .iter()
            .filter_map(|m| rest.find(m))
            .min()
            .unwrap_or(rest.len());
        rest[..end].to_owned()
    }

    /// A registry that wants Bearer tokens `tok-N` issued by its own `/token` endpoint.
    /// `check_token_auth` validates the token request's Authorization; `expires_in` is sent as is.
    fn token_registry(
        log: Log,
        expires_in: u64,
        check_token_auth: impl Fn(Option<&str>) -> bool + Send + Sync + 'static,
    ) -> Handler {
        let issued = Arc::new(AtomicUsize::new(0));
        Arc::new(move |req| {
            let seen = log.record(req);
            let host = req.headers()[HOST].to_str().unwrap().to_owned();
            if seen.path.starts_with("/token") {
                if !check_token_auth(seen.auth.as_deref()) {
                    return resp(401, r#"{"details":"bad credentials"}"#);
                }
                let n = issued.fetch_add(1, Ordering::SeqCst) + 1;
                return resp(
                    200,
                    &format!(r#"{{"token":"tok-{n}","expires_in":{expires_in}}}"#),
                );
            }
            if seen
                .auth
                .as_deref()
                .is_some_and(|a| a.starts_with("Bearer tok-"))
            {
                return resp(200, "ok");
            }
            let challenge = format!(
                r#"Bearer realm="http://{host}/token",service="fake",scope="repository:{}:pull""#,
                repo_of(&seen.path)
            );
            with_header(
                resp(401, r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#),
                WWW_AUTHENTICATE,
                &challenge,
            )
        })
    }

    fn metrics() -> Arc<Metrics> {
        Arc::new(Metrics::new(&["fake"]))
    }

    fn upstream(url: &str, m: &Arc<Metrics>) -> Upstream {
        Upstream::new(&UpstreamConfig::new("fake", url), m.clone()).unwrap()
    }

    fn get<'a>(repo: &'a RepoName, path: &str, op: Op) -> UpstreamRequest<'a> {
        UpstreamRequest {
            method: Method::GET,
            op,
            repo,
            path_and_query: path.to_owned(),
            accept: Some("application/vnd.oci.image.index.v1+json".into()),
            range: None,
        }
    }

    async fn body(r: Response<UpstreamBody>) -> String {
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    fn count(m: &Metrics, op: &str, code: &str) -> u64 {
        m.upstream_requests
            .with_label_values(&["fake", op, code])
            .get()
    }

    fn token_fetches(m: &Metrics, result: &str) -> u64 {
        m.token_fetches.with_label_values(&["fake", result]).get()
    }

    // === auth ===

    #[tokio::test]
    async fn anonymous_token_flow_and_reuse() {
        let log = Log::default();
        let addr = serve(token_registry(log.clone(), 300, |auth| auth.is_none())).await;
        let m = metrics();
        let up = upstream(&format!("http://{addr}"), &m);
        let bar = RepoName::parse("foo/bar").unwrap();
        let baz = RepoName::parse("foo/baz").unwrap();

        let r = up
            .send(get(&bar, "/v2/foo/bar/manifests/latest", Op::Manifest))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(body(r).await, "ok");
        let seen = log.all();
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert_eq!(seen[0].auth, None);
        assert_eq!(
            seen[1].path,
            "/token?service=fake&scope=repository%3Afoo%2Fbar%3Apull"
        );
        assert_eq!(seen[1].auth, None);
        assert_eq!(seen[2].auth.as_deref(), Some("Bearer tok-1"));

        // The cached token is sent up front.
        let r = up
            .send(get(&bar, "/v2/foo/bar/blobs/sha256:00", Op::Blob))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(log.all().len(), 4);
        assert_eq!(log.all()[3].auth.as_deref(), Some("Bearer tok-1"));

        // Another repository: the realm is known, so the token is fetched before the request.
        let r = up
            .send(get(&baz, "/v2/foo/baz/manifests/1", Op::Manifest))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let seen = log.all();
        assert_eq!(seen.len(), 6, "{seen:?}");
        assert_eq!(
            seen[4].path,
            "/token?service=fake&scope=repository%3Afoo%2Fbaz%3Apull"
        );
        assert_eq!(seen[5].auth.as_deref(), Some("Bearer tok-2"));

        // Metrics: every request sent, token fetches under op "token".
        assert_eq!(count(&m, "manifest", "401"), 1);
        assert_eq!(count(&m, "manifest", "200"), 2);
        assert_eq!(count(&m, "blob", "200"), 1);
        assert_eq!(count(&m, "token", "200"), 2);
        assert_eq!(token_fetches(&m, "ok"), 2);
        assert_eq!(token_fetches(&m, "error"), 0);
    }

    #[tokio::test]
    async fn concurrent_token_fetches_coalesce() {
        let log = Log::default();
        let addr = serve(token_registry(log.clone(), 300, |auth| auth.is_none())).await;
        let m = metrics();
        let up = upstream(&format!("http://{addr}"), &m);
        let bar = RepoName::parse("foo/bar").unwrap();
        // Learn the realm first.
        up.send(get(&bar, "/v2/foo/bar/manifests/a", Op::Manifest))
            .await
            .unwrap();
        let qux = RepoName::parse("foo/qux").unwrap();
        let sends = (0..8).map(|_| up.send(get(&qux, "/v2/foo/qux/manifests/a", Op::Manifest)));
        for r in futures_util::future::join_all(sends).await {
            assert_eq!(r.unwrap().status(), 200);
        }
        assert_eq!(
            log.count("/token?service=fake&scope=repository%3Afoo%2Fqux"),
            1
        );
    }

    #[tokio::test]
    async fn basic_credentials_go_to_the_token_endpoint_only() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cret\n").unwrap();
        let expected = basic("user:s3cret");
        let log = Log::default();
        let want = expected.clone();
        let addr = serve(token_registry(log.clone(), 300, move |a| {
            a == Some(want.as_str())
        }))
        .await;
        let m = metrics();
        let mut cfg = UpstreamConfig::new("fake", &format!("http://{addr}"));
        cfg.username = Some("user".into());
        cfg.password_file = Some(pw.clone());
        let up = Upstream::new(&cfg, m.clone()).unwrap();
        assert!(!format!("{up:?}").contains("s3cret"));
        let bar = RepoName::parse("foo/bar").unwrap();

        let r = up
            .send(get(&bar, "/v2/foo/bar/manifests/latest", Op::Manifest))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let seen = log.all();
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[1].auth.as_deref(), Some(expected.as_str()));
        assert!(
            seen.iter()
                .filter(|s| s.path.starts_with("/v2/"))
                .all(|s| s.auth.as_deref() != Some(expected.as_str()))
        );

        // Wrong password: the token endpoint's 401 comes back as a Status fault.
        std::fs::write(&pw, "wrong").unwrap();
        let bad = Upstream::new(&cfg, m.clone()).unwrap();
        let err = bad
            .send(get(&bar, "/v2/foo/bar/manifests/latest", Op::Manifest))
            .await
            .unwrap_err();
        assert_eq!(
            err.upstream_status(),
            Some(StatusCode::UNAUTHORIZED),
            "{err}"
        );
        assert!(!err.to_string().contains("wrong"));
        assert_eq!(token_fetches(&m, "error"), 1);
        assert_eq!(token_fetches(&m, "ok"), 1);
    }

    #[tokio::test]
    async fn expired_token_is_fetched_again() {
        let log = Log::default();
        let addr = serve(token_registry(log.clone(), 1, |_| true)).await;
        let m = metrics();
        let up = upstream(&format!("http://{addr}"), &m);
        let bar = RepoName::parse("foo/bar").unwrap();
        for _ in 0..2 {
            assert_eq!(
                up.send(get(&bar, "/v2/foo/bar/manifests/a", Op::Manifest))
                    .await
                    .unwrap()
                    .status(),
                200
            );
        }
        assert_eq!(log.count("/token"), 1);
        // expires_in 1 s -> reused for 0.8 s.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let r = up
            .send(get(&bar, "/v2/foo/bar/manifests/a", Op::Manifest))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(log.count("/token"), 2);
        let last = log.all().pop().unwrap();
        assert_eq!(last.auth.as_deref(), Some("Bearer tok-2"));
        // Fetched up front (the realm was known), so no 401 this time.
        assert_eq!(count(&m, "manifest", "401"), 1);
    }

    #[tokio::test]
    async fn unauthorized_is_retried_once_only() {
        let log = Log::default();
        let l2 = log.clone();
        let addr = serve(Arc::new(move |req| {
            let seen = l2.record(req);
            if seen.path.starts_with("/token") {
                return resp(200, r#"{"token":"tok"}"#);
            }
            let host = req.headers()[HOST].to_str().unwrap().to_owned();
            let ch = format!(
                r#"Bearer realm="http://{host}/token",service="fake",error="insufficient_scope""#
            );
            with_header(resp(401, "{}"), WWW_AUTHENTICATE, &ch)
        }))
        .await;
        let m = metrics();
        let up = upstream(&format!("http://{addr}"), &m);
        let bar = RepoName::parse("foo/bar").unwrap();

        let r = up
            .send(get(&bar, "/v2/foo/bar/manifests/a", Op::Manifest))
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        assert!(matches!(
            up.status_error(&r),
            Error::Upstream {
                fault: UpstreamFault::Status {
                    status: StatusCode::UNAUTHORIZED,
                    ..
                },
                ..
            }
        ));
        assert_eq!(log.count("/v2/"), 2);
        assert_eq!(log.count("/token"), 1);

        // Now with a cached token that gets refused: dropped, fetched fresh, one retry.
        let r = up
            .send(get(&bar, "/v2/foo/bar/manifests/a", Op::Manifest))
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        assert_eq!(log.count("/v2/"), 4);
        assert_eq!(log.count("/token"), 2);
        assert_eq!(count(&m, "manifest", "401"), 4);

        // A token fetched up front during this call and refused is not fetched again.
        let other = RepoName::parse("foo/other").unwrap();
        let r = up
            .send(get(&other, "/v2/foo/other/manifests/a", Op::Manifest))
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        assert_eq!(log.count("/v2/"), 5);
        assert_eq!(log.count("/token"), 3);
    }

    #[tokio::test]
    async fn basic_challenge_uses_configured_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "pw").unwrap();
        let expected = basic("u:pw");
        let log = Log::default();
        let (l2, want) = (log.clone(), expected.clone());
        let addr = serve(Arc::new(move |req| {
            let seen = l2.record(req);
            if seen.auth.as_deref() == Some(want.as_str()) {
                resp(200, "ok")
            } else {
                with_header(
                    resp(401, "{}"),
                    WWW_AUTHENTICATE,
                    r#"Basic realm="fake registry""#,
                )
            }
        }))
        .await;
        let m = metrics();
        let bar = RepoName::parse("foo/bar").unwrap();

        // No credentials: the 401 is returned after one request.
        let anon = upstream(&format!("http://{addr}"), &m);
        let r = anon
            .send(get(&bar, "/v2/foo/bar/tags/list", Op::Tags))
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        assert_eq!(log.count("/v2/"), 1);

        let mut cfg = UpstreamConfig::new("fake", &format!("http://{addr}"));
        cfg.username = Some("u".into());
        cfg.password_file = Some(pw);
        let up = Upstream::new(&cfg, m.clone()).unwrap();
        let r = up
            .send(get(&bar, "/v2/foo/bar/tags/list", Op::Tags))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(log.count("/v2/"), 3);
        // Then Basic goes up front.
        let r = up
            .send(get(&bar, "/v2/foo/bar/tags/list", Op::Tags))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(log.count("/v2/"), 4);
        assert_eq!(log.all()[3].auth.as_deref(), Some(expected.as_str()));
        assert_eq!(count(&m, "tags", "401"), 2);
        assert_eq!(count(&m, "tags", "200"), 2);
    }

    // === redirects ===

    #[tokio::test]
    async fn redirect_to_another_port_drops_authorization() {
        let cdn_log = Log::default();
        let cl = cdn_log.clone();
        let cdn = serve(Arc::new(move |req| {
            cl.record(req);
            resp(200, "blob-bytes")
        }))
        .await;

        let log = Log::default();
        let inner = token_registry(log.clone(), 300, |_| true);
        let addr = serve(Arc::new(move |req| {
            let path = req.uri().path().to_owned();
            let authed = req.headers().get(AUTHORIZATION).is_some();
            if authed && path.ends_with("/blobs/sha256:cdn") {
                log.record(req);
                return with_header(
                    resp(307, ""),
                    LOCATION,
                    &format!("http://127.0.0.1:{}/cdn/blob?sig=abc", cdn.port()),
                );
            }
            if authed && path.ends_with("/blobs/sha256:here") {
                log.record(req);
                return with_header(resp(302, ""), LOCATION, "/v2/foo/bar/blobs/final");
            }
            inner(req)
        }))
        .await;
        let m = metrics();
        let up = upstream(&format!("http://{addr}"), &m);
        let bar = RepoName::parse("foo/bar").unwrap();

        let r = up
            .send(get(&bar, "/v2/foo/bar/blobs/sha256:cdn", Op::Blob))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(body(r).await, "blob-bytes");
        let cdn_seen = cdn_log.all();
        assert_eq!(cdn_seen.len(), 1);
        assert_eq!(cdn_seen[0].path, "/cdn/blob?sig=abc");
        assert_eq!(
            cdn_seen[0].auth, None,
            "credentials leaked to another origin"
        );

        // A same-origin redirect (relative Location) keeps the token.
        let r = up
            .send(get(&bar, "/v2/foo/bar/blobs/sha256:here", Op::Blob))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        // (the token registry logged the final request; it answered 200 only because it had a token)
        assert_eq!(count(&m, "blob", "307"), 1);
        assert_eq!(count(&m, "blob", "302"), 1);
        assert_eq!(count(&m, "blob", "200"), 2);
    }

    #[tokio::test]
    async fn redirect_loops_stop_after_the_limit() {
        let log = Log::default();
        let l2 = log.clone();
        let addr = serve(Arc::new(move |req| {
            l2.record(req);
            with_header(resp(302, ""), LOCATION, "/v2/foo/bar/manifests/loop")
        }))
        .await;
        let m = metrics();
        let up = upstream(&format!("http://{addr}"), &m);
        let bar = RepoName::parse("foo/bar").unwrap();
        let err = up
            .send(get(&bar, "/v2/foo/bar/manifests/a", Op::Manifest))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::Upstream { fault: UpstreamFault::Protocol(msg), .. } if msg.contains("redirects")),
            "{err}"
        );
        assert_eq!(log.all().len(), MAX_REDIRECTS + 1);
        assert_eq!(count(&m, "manifest", "302"), (MAX_REDIRECTS + 1) as u64);
    }

    #[tokio::test]
    async fn path_prefix_is_prepended() {
        let log = Log::default();
        let l2 = log.clone();
        let addr = serve(Arc::new(move |req| {
            l2.record(req);
            resp(200, "{}")
        }))
        .await;
        let m = metrics();
        let up = upstream(&format!("http://{addr}/mirror/hub/"), &m);
        let bar = RepoName::parse("foo/bar").unwrap();
        let mut req = get(&bar, "/v2/", Op::Ping);
        req.method = Method::HEAD;
        assert_eq!(up.send(req).await.unwrap().status(), 200);
        assert_eq!(log.all()[0].path, "/mirror/hub/v2/");
        assert_eq!(count(&m, "ping", "200"), 1);
    }

    // === transport failures ===

    #[tokio::test]
    async fn connection_refused_is_a_connect_fault() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let m = metrics();
        let up = upstream(&format!("http://127.0.0.1:{port}"), &m);
        let bar = RepoName::parse("foo/bar").unwrap();
        let err = up
            .send(get(&bar, "/v2/foo/bar/manifests/a", Op::Manifest))
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                Error::Upstream {
                    fault: UpstreamFault::Connect(_),
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(count(&m, "manifest", "error"), 1);
    }

    #[tokio::test]
    async fn silent_upstream_times_out_waiting_for_headers() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s); // accept, read nothing, answer nothing
            }
        });
        let m = metrics();
        let mut cfg = UpstreamConfig::new("fake", &format!("http://{addr}"));
        cfg.timeout = Dur(Duration::from_millis(200));
        let up = Upstream::new(&cfg, m.clone()).unwrap();
        assert_eq!(up.body_timeout(), Duration::from_millis(200));
        let bar = RepoName::parse("foo/bar").unwrap();
        let t0 = Instant::now();
        let err = up
            .send(get(&bar, "/v2/foo/bar/blobs/sha256:00", Op::Blob))
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                Error::Upstream {
                    fault: UpstreamFault::Timeout(_),
                    ..
                }
            ),
            "{err}"
        );
        assert!(t0.elapsed() < Duration::from_secs(3));
        assert_eq!(count(&m, "blob", "error"), 1);
    }

    // === small bodies ===

    #[tokio::test]
    async fn small_bodies_are_read_whole_up_to_the_cap() {
        let addr = serve(Arc::new(|_| resp(200, "0123456789"))).await;
        let m = metrics();
        let up = upstream(&format!("http://{addr}"), &m);
        let bar = RepoName::parse("foo/bar").unwrap();
        let send = || up.send(get(&bar, "/v2/foo/bar/tags/list", Op::Tags));

        let r = send().await.unwrap();
        assert_eq!(
            up.read_small(r.into_body(), 10).await.unwrap(),
            "0123456789"
        );
        let r = send().await.unwrap();
        let err = up.read_small(r.into_body(), 9).await.unwrap_err();
        assert!(
            matches!(
                &err,
                Error::Upstream { upstream, fault: UpstreamFault::Protocol(msg) }
                    if upstream == "fake" && msg.contains("larger than 9 bytes")
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_stalled_small_body_times_out_between_frames() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                // Headers and half the body, then silence.
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n01234")
                    .await;
                held.push(s);
            }
        });
        let mut cfg = UpstreamConfig::new("fake", &format!("http://{addr}"));
        cfg.timeout = Dur(Duration::from_millis(200));
        let up = Upstream::new(&cfg, metrics()).unwrap();
        let bar = RepoName::parse("foo/bar").unwrap();
        let r = up
            .send(get(&bar, "/v2/foo/bar/manifests/a", Op::Manifest))
            .await
            .unwrap();
        let t0 = Instant::now();
        let err = up.read_small(r.into_body(), 100).await.unwrap_err();
        assert!(
            matches!(
                &err,
                Error::Upstream { upstream, fault: UpstreamFault::Timeout(_) } if upstream == "fake"
            ),
            "{err}"
        );
        assert!(t0.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn bad_password_source_fails_construction() {
        let mut cfg = UpstreamConfig::new("fake", "https://r.io");
        cfg.username = Some("u".into());
        cfg.password_file = Some("/nonexistent/cachalot-test-pw".into());
        assert!(matches!(
            Upstream::new(&cfg, metrics()),
            Err(Error::Config(_))
        ));
    }
}
