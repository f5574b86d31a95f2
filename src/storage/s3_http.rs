//! The HTTP client the bucket is reached through: object_store's S3 client over the same
//! hyper-util + hyper-rustls stack the upstreams use (ring, webpki roots, HTTP/1 and HTTP/2,
//! pooled connections), instead of the reqwest one object_store would otherwise bring.
//!
//! reqwest's timeouts do not apply here, so this client keeps its own: a connect timeout, a
//! wait for the response headers, and a bound on the silence between body frames. A bucket
//! that stalls then fails its request, and the caller carries on without the cache.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use object_store::client::{
    HttpClient, HttpError, HttpErrorKind, HttpRequest, HttpRequestBody, HttpResponse,
    HttpResponseBody, HttpService,
};
use object_store::{ClientConfigKey, ClientOptions};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// From the request sent (its body included) to the response headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest silence between two frames of a response body.
const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

const USER_AGENT: &str = concat!("cachalot/", env!("CARGO_PKG_VERSION"));

/// Makes object_store's HTTP clients: one pooled hyper client per `connect`.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct HyperConnector;

impl object_store::client::HttpConnector for HyperConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let allow_http = options
            .get_config_value(&ClientConfigKey::AllowHttp)
            .is_some_and(|v| v == "true");
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| object_store::Error::Generic {
            store: "S3",
            source: Box::new(e),
        })?
        .with_root_certificates(rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        })
        .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(https);
        Ok(HttpClient::new(HyperService { client, allow_http }))
    }
}

#[derive(Debug)]
struct HyperService {
    client: Client<HttpsConnector<HttpConnector>, HttpRequestBody>,
    /// Whether plain `http://` may be used: only when the configured endpoint is plain HTTP
    /// (and for the instance metadata service, which object_store asks for itself).
    allow_http: bool,
}

type CallFuture<'a> = Pin<Box<dyn Future<Output = Result<HttpResponse, HttpError>> + Send + 'a>>;

// Written out rather than with `#[async_trait]`: the signature is what that macro expands to.
impl HttpService for HyperService {
    fn call<'life0, 'async_trait>(&'life0 self, mut req: HttpRequest) -> CallFuture<'async_trait>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            if !self.allow_http && req.uri().scheme() == Some(&http::uri::Scheme::HTTP) {
                return Err(HttpError::new(
                    HttpErrorKind::Request,
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "plain http to the bucket is not allowed for this endpoint",
                    ),
                ));
            }
            if !req.headers().contains_key(http::header::USER_AGENT) {
                req.headers_mut().insert(
                    http::header::USER_AGENT,
                    http::HeaderValue::from_static(USER_AGENT),
                );
            }
            let res = match tokio::time::timeout(HEADER_TIMEOUT, self.client.request(req)).await {
                Ok(Ok(res)) => res,
                Ok(Err(e)) => {
                    let kind = request_error_kind(&e);
                    return Err(HttpError::new(kind, e));
                }
                Err(_) => {
                    return Err(HttpError::new(
                        HttpErrorKind::Timeout,
                        io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("no response from the bucket within {HEADER_TIMEOUT:?}"),
                        ),
                    ));
                }
            };
            let (parts, body) = res.into_parts();
            let body = IdleTimeout::new(body.map_err(|e| {
                let kind = body_error_kind(&e);
                HttpError::new(kind, e)
            }));
            Ok(HttpResponse::from_parts(parts, HttpResponseBody::new(body)))
        })
    }
}

/// Classified as object_store's own reqwest client does, so its retry policy (connect and
/// unsent-request errors always retried, timeouts and interruptions for idempotent requests
/// only) means the same here.
fn request_error_kind(e: &hyper_util::client::legacy::Error) -> HttpErrorKind {
    if e.is_connect() {
        return HttpErrorKind::Connect;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            return body_error_kind(h);
        }
        if let Some(io) = s.downcast_ref::<io::Error>() {
            return io_error_kind(io);
        }
        source = s.source();
    }
    HttpErrorKind::Unknown
}

fn body_error_kind(e: &hyper::Error) -> HttpErrorKind {
    if e.is_closed() || e.is_incomplete_message() || e.is_body_write_aborted() {
        return HttpErrorKind::Request;
    }
    if e.is_timeout() {
        return HttpErrorKind::Timeout;
    }
    match std::error::Error::source(e).and_then(|s| s.downcast_ref::<io::Error>()) {
        Some(io) => io_error_kind(io),
        None => HttpErrorKind::Unknown,
    }
}

fn io_error_kind(e: &io::Error) -> HttpErrorKind {
    match e.kind() {
        io::ErrorKind::TimedOut => HttpErrorKind::Timeout,
        io::ErrorKind::ConnectionAborted
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::UnexpectedEof => HttpErrorKind::Interrupted,
        _ => HttpErrorKind::Unknown,
    }
}

/// A response body that fails when no frame arrives for [`BODY_IDLE_TIMEOUT`]: a bucket that
/// stops sending mid-object must not hold a client's pull open forever.
struct IdleTimeout<B> {
    inner: B,
    sleep: Pin<Box<Sleep>>,
}

impl<B> IdleTimeout<B> {
    fn new(inner: B) -> IdleTimeout<B> {
        IdleTimeout {
            inner,
            sleep: Box::pin(tokio::time::sleep(BODY_IDLE_TIMEOUT)),
        }
    }
}

impl<B> Body for IdleTimeout<B>
where
    B: Body<Data = Bytes, Error = HttpError> + Unpin,
{
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.sleep
                .as_mut()
                .reset(Instant::now() + BODY_IDLE_TIMEOUT);
            return Poll::Ready(frame);
        }
        ready!(this.sleep.as_mut().poll(cx));
        Poll::Ready(Some(Err(HttpError::new(
            HttpErrorKind::Timeout,
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the bucket sent nothing for {BODY_IDLE_TIMEOUT:?} mid-body"),
            ),
        ))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
