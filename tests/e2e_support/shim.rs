//! A test-only HTTP shim that emulates containerd's mirror requests: it forwards every request to
//! a target (cachalot) with `ns=<registry>` appended to the query, the way containerd does when the
//! host it contacts is not the image's registry (PROTOCOL.md 3.2). skopeo never sends `ns`, so
//! skopeo pulls through this shim to exercise cachalot's `?ns=` routing.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

type Body = BoxBody<Bytes, hyper::Error>;

/// A running shim; stops when dropped.
pub struct NsShim {
    addr: SocketAddr,
    forwarded: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl NsShim {
    /// Serves on `127.0.0.1:0`, forwarding to `target` (`host:port`) with `ns=<ns>` added to
    /// every `/v2/...` request except the `/v2/` ping (containerd sends none there either).
    pub async fn start(target: SocketAddr, ns: &str) -> NsShim {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind shim");
        let addr = listener.local_addr().unwrap();
        let forwarded = Arc::new(AtomicUsize::new(0));
        let client: Client<HttpConnector, Incoming> =
            Client::builder(TokioExecutor::new()).build_http();
        let ns = ns.to_owned();
        let count = forwarded.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let client = client.clone();
                let ns = ns.clone();
                let count = count.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let client = client.clone();
                        let ns = ns.clone();
                        let count = count.clone();
                        async move {
                            Ok::<_, Infallible>(forward(&client, target, &ns, &count, req).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        NsShim {
            addr,
            forwarded,
            task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many requests carried an added `ns`.
    pub fn forwarded_with_ns(&self) -> usize {
        self.forwarded.load(Ordering::SeqCst)
    }
}

impl Drop for NsShim {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(
    client: &Client<HttpConnector, Incoming>,
    target: SocketAddr,
    ns: &str,
    count: &AtomicUsize,
    req: Request<Incoming>,
) -> Response<Body> {
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let mut query = parts.uri.query().unwrap_or("").to_owned();
    if path.starts_with("/v2/") && path != "/v2/" {
        if !query.is_empty() {
            query.push('&');
        }
        query.push_str("ns=");
        query.push_str(ns);
        count.fetch_add(1, Ordering::SeqCst);
    }
    let uri = if query.is_empty() {
        format!("http://{target}{path}")
    } else {
        format!("http://{target}{path}?{query}")
    };
    parts.uri = uri.parse().expect("forward uri");
    parts.headers.remove(hyper::header::HOST);
    match client.request(Request::from_parts(parts, body)).await {
        Ok(resp) => resp.map(|b| b.boxed()),
        Err(e) => Response::builder()
            .status(StatusCode::BAD_GATEWAY)
            .body(
                Full::new(Bytes::from(format!("shim: {e:?}")))
                    .map_err(|never| match never {})
                    .boxed(),
            )
            .unwrap(),
    }
}
