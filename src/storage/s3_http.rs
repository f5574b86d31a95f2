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
use object_store::client::{
    HttpClient, HttpError, HttpErrorKind, HttpRequest, HttpRequestBody, HttpResponse,
    HttpResponseBody, HttpService,
};
use object_store::{ClientConfigKey, ClientOptions};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// From the request sent (its body included) to the response headers, for writes, whose
/// bodies are parts of megabytes.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// The same for reads (GET, HEAD, listings, deletes), which carry no body: a bucket slower than
/// this to start answering costs a pull more than going to the upstream would.
const READ_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest silence between two frames of a response body.
const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

const USER_AGENT: &str = concat!("cachalot/", env!("CARGO_PKG_VERSION"));

/// Makes object_store's HTTP clients: one pooled hyper client per `connect`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HyperConnector {
    header_timeout: Duration,
    idle_timeout: Duration,
}

impl Default for HyperConnector {
    fn default() -> HyperConnector {
        HyperConnector {
            header_timeout: HEADER_TIMEOUT,
            idle_timeout: BODY_IDLE_TIMEOUT,
        }
    }
}

impl object_store::client::HttpConnector for HyperConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let allow_http = options
            .get_config_value(&ClientConfigKey::AllowHttp)
            .is_some_and(|v| v == "true");
        let tls = crate::outbound::public_roots().map_err(|e| object_store::Error::Generic {
            store: "S3",
            source: Box::new(e),
        })?;
        let client = crate::outbound::pooled_client(tls, CONNECT_TIMEOUT);
        Ok(HttpClient::new(HyperService {
            client,
            allow_http,
            header_timeout: self.header_timeout,
            idle_timeout: self.idle_timeout,
        }))
    }
}

#[derive(Debug)]
struct HyperService {
    client: Client<HttpsConnector<HttpConnector>, HttpRequestBody>,
    /// Whether plain `http://` may be used: only when the configured endpoint is plain HTTP
    /// (and for the instance metadata service, which object_store asks for itself).
    allow_http: bool,
    header_timeout: Duration,
    idle_timeout: Duration,
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
            let wait = if matches!(*req.method(), http::Method::PUT | http::Method::POST) {
                self.header_timeout
            } else {
                self.header_timeout.min(READ_HEADER_TIMEOUT)
            };
            let res = match tokio::time::timeout(wait, self.client.request(req)).await {
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
                            format!("no response from the bucket within {:?}", wait),
                        ),
                    ));
                }
            };
            let (parts, body) = res.into_parts();
            let body = body.map_err(|e| {
                let kind = body_error_kind(&e);
                HttpError::new(kind, e)
            });
            let body = IdleTimeout::new(body, self.idle_timeout);
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

/// A response body that fails when no frame arrives for `timeout`: a bucket that stops
/// sending mid-object must not hold a client's pull open forever.
struct IdleTimeout<B> {
    inner: B,
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
}

impl<B> IdleTimeout<B> {
    fn new(inner: B, timeout: Duration) -> IdleTimeout<B> {
        IdleTimeout {
            inner,
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
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
            this.sleep.as_mut().reset(Instant::now() + this.timeout);
            return Poll::Ready(frame);
        }
        ready!(this.sleep.as_mut().poll(cx));
        Poll::Ready(Some(Err(HttpError::new(
            HttpErrorKind::Timeout,
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the bucket sent nothing for {:?} mid-body", this.timeout),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Backend, StorageConfig};
    use crate::metrics::Metrics;
    use crate::oci::{Digest, Verifier};
    use crate::storage::Bucket;
    use futures_util::{StreamExt, TryStreamExt, stream};
    use http_body_util::{Full, StreamBody};
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use object_store::aws::AmazonS3Builder;
    use parking_lot::Mutex;
    use std::collections::HashMap;
    use std::sync::Arc;

    /// What the fake saw of one request.
    #[derive(Clone, Debug)]
    struct Seen {
        method: String,
        path: String,
        user_agent: String,
        signed_by_test_key: bool,
    }

    /// A bucket that stores PUTs and answers HEAD and GET, except for two keys: one whose
    /// GET never gets an answer, one whose body stops after 10 of its 100 bytes.
    struct FakeS3 {
        port: u16,
        seen: Arc<Mutex<Vec<Seen>>>,
        task: tokio::task::JoinHandle<()>,
    }

    type FakeBody = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

    impl FakeS3 {
        async fn start(stall_headers: String, stall_body: String) -> FakeS3 {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let seen = Arc::new(Mutex::new(Vec::new()));
            let objects = Arc::new(Mutex::new(HashMap::<String, Bytes>::new()));
            let log = seen.clone();
            let task = tokio::spawn(async move {
                loop {
                    let (conn, _) = listener.accept().await.unwrap();
                    let (log, objects) = (log.clone(), objects.clone());
                    let (stall_headers, stall_body) = (stall_headers.clone(), stall_body.clone());
                    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (log, objects) = (log.clone(), objects.clone());
                        let (stall_headers, stall_body) =
                            (stall_headers.clone(), stall_body.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let path = parts.uri.path().to_owned();
                            let header = |name| {
                                parts
                                    .headers
                                    .get(name)
                                    .and_then(|v: &http::HeaderValue| v.to_str().ok())
                                    .unwrap_or("")
                                    .to_owned()
                            };
                            log.lock().push(Seen {
                                method: parts.method.to_string(),
                                path: path.clone(),
                                user_agent: header("user-agent"),
                                signed_by_test_key: header("authorization")
                                    .contains("Credential=test-key/"),
                            });
                            let ok = || {
                                http::Response::builder()
                                    .header("etag", "\"e\"")
                                    .header("last-modified", "Wed, 01 Jan 2025 00:00:00 GMT")
                            };
                            let full = |b: Bytes| -> FakeBody { Full::new(b).boxed() };
                            let res = if path.ends_with(&stall_headers) {
                                tokio::time::sleep(Duration::from_secs(3600)).await;
                                unreachable!()
                            } else if path.ends_with(&stall_body) {
                                let frames =
                                    stream::iter([Ok(Frame::data(Bytes::from(vec![7; 10])))])
                                        .chain(stream::pending());
                                ok().header("content-length", "100")
                                    .body(BodyExt::boxed(StreamBody::new(frames)))
                            } else if parts.method == http::Method::PUT {
                                let bytes = body.collect().await.unwrap().to_bytes();
                                objects.lock().insert(path, bytes);
                                ok().body(full(Bytes::new()))
                            } else {
                                match objects.lock().get(&path).cloned() {
                                    Some(b) => {
                                        let ok = ok().header("content-length", b.len());
                                        if parts.method == http::Method::HEAD {
                                            ok.body(full(Bytes::new()))
                                        } else {
                                            ok.body(full(b))
                                        }
                                    }
                                    None => http::Response::builder()
                                        .status(404)
                                        .body(full(Bytes::new())),
                                }
                            };
                            Ok::<_, std::convert::Infallible>(res.unwrap())
                        }
                    });
                    tokio::spawn(
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(conn), service),
                    );
                }
            });
            FakeS3 { port, seen, task }
        }

        fn url(&self) -> String {
            format!("http://127.0.0.1:{}", self.port)
        }
    }

    impl Drop for FakeS3 {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    fn proof(data: &[u8]) -> crate::oci::Verified {
        let mut v = Verifier::new(crate::oci::Algorithm::Sha256);
        v.update(data);
        v.prove()
    }

    #[tokio::test]
    async fn a_configured_bucket_is_reached_path_style_and_signed() {
        let fake = FakeS3::start("-".into(), "-".into()).await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("id"), "test-key\n").unwrap();
        std::fs::write(dir.path().join("secret"), "test-secret\n").unwrap();
        let cfg = StorageConfig {
            backend: Backend::S3,
            endpoint: Some(fake.url()),
            bucket: Some("cache".into()),
            region: Some("garage".into()),
            prefix: Some("mirror/".into()),
            access_key_id_file: Some(dir.path().join("id")),
            secret_access_key_file: Some(dir.path().join("secret")),
            ..StorageConfig::default()
        };
        let bucket = Bucket::connect(&cfg, Arc::new(Metrics::new(&[]))).unwrap();
        let manifest = Bytes::from_static(br#"{"schemaVersion":2}"#);
        let d = Digest::sha256_of(&manifest);
        assert_eq!(bucket.head(&d).await.unwrap(), None);
        bucket
            .put_small(manifest.clone(), &proof(&manifest))
            .await
            .unwrap();
        assert_eq!(bucket.head(&d).await.unwrap(), Some(manifest.len() as u64));
        assert_eq!(bucket.get_small(&d, 1024).await.unwrap(), Some(manifest));
        let seen = fake.seen.lock().clone();
        let key = format!("/cache/mirror/blobs/sha256/{}", d.hex());
        let methods: Vec<&str> = seen.iter().map(|s| s.method.as_str()).collect();
        assert_eq!(methods, ["HEAD", "PUT", "HEAD", "GET"]);
        for s in &seen {
            assert_eq!(s.path, key);
            assert!(s.signed_by_test_key, "{s:?}");
            assert!(s.user_agent.starts_with("cachalot/"), "{s:?}");
        }
    }

    #[test]
    fn virtual_hosted_addressing_needs_a_host_name() {
        let cfg = |endpoint: &str, path_style, key_env: Option<&str>| StorageConfig {
            backend: Backend::S3,
            endpoint: Some(endpoint.into()),
            bucket: Some("cache".into()),
            path_style,
            access_key_id_env: key_env.map(Into::into),
            ..StorageConfig::default()
        };
        let metrics = Arc::new(Metrics::new(&[]));
        let e = Bucket::connect(
            &cfg("http://127.0.0.1:3900", Some(false), None),
            metrics.clone(),
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("storage.path_style"), "{e}");
        assert!(
            Bucket::connect(
                &cfg("http://s3.local:3900", Some(false), None),
                metrics.clone()
            )
            .is_ok()
        );
        // Credentials named but not there are the configuration's error, not AWS's.
        let unset = Some("CACHALOT_TEST_UNSET_KEY_ID");
        let e = Bucket::connect(&cfg("https://s3.example.com", None, unset), metrics)
            .err()
            .unwrap();
        assert!(e.to_string().contains("CACHALOT_TEST_UNSET_KEY_ID"), "{e}");
    }

    #[tokio::test]
    async fn a_stalled_bucket_fails_the_request_instead_of_hanging() {
        let (no_headers, no_body) = (Digest::sha256_of(b"a"), Digest::sha256_of(b"b"));
        let fake = FakeS3::start(no_headers.hex(), no_body.hex()).await;
        let store = AmazonS3Builder::new()
            .with_endpoint(fake.url())
            .with_allow_http(true)
            .with_bucket_name("cache")
            .with_access_key_id("test-key")
            .with_secret_access_key("test-secret")
            .with_retry(object_store::RetryConfig {
                max_retries: 0,
                ..Default::default()
            })
            .with_http_connector(HyperConnector {
                header_timeout: Duration::from_millis(200),
                idle_timeout: Duration::from_millis(200),
            })
            .build()
            .unwrap();
        let bucket = Bucket::with_store(Arc::new(store), "", Arc::new(Metrics::new(&[])));
        let started = std::time::Instant::now();
        let e = bucket.get(&no_headers, None).await.err().unwrap();
        assert!(e.to_string().contains("no response from the bucket"), "{e}");
        let read = bucket.get(&no_body, None).await.unwrap().unwrap();
        assert_eq!(read.len, 100);
        let e = read.body.try_collect::<Vec<_>>().await.unwrap_err();
        assert!(e.to_string().contains("sent nothing"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
