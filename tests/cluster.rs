//! The cluster over real sockets: replicas see each other live through `/healthz` and stop
//! giving keys to one that stopped; the peer client signs, streams a body as it comes, and
//! gives up on a peer that does not answer.

use bytes::Bytes;
use cachalot::cluster::{Cluster, Peer, PeerCheck};
use cachalot::config::ClusterConfig;
use cachalot::metrics::Metrics;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

type Body = UnsyncBoxBody<Bytes, Infallible>;

const SECRET: &str = "a cluster secret of some length";

/// A tiny HTTP/1 server; dropping it stops it and closes every connection it has open.
struct Server {
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn serve<F, Fut>(listener: TcpListener, handler: F) -> Server
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let task = tokio::spawn(async move {
        // Connections live in the set, so aborting this task ends them too: a stopped server
        // must look dead to a pooled client, not keep answering on an old connection.
        let mut conns = JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            conns.spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Server { task }
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())).boxed_unsync());
    *r.status_mut() = status;
    r
}

/// Answers `/healthz`, and 404 to anything else.
async fn health(req: Request<Incoming>) -> Response<Body> {
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok"),
        _ => text(StatusCode::NOT_FOUND, "not here"),
    }
}

struct Node {
    cluster: Arc<Cluster>,
    metrics: Arc<Metrics>,
}

fn secret_file(secret: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    writeln!(f, "{secret}").unwrap();
    f
}

fn url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

/// A replica listening on `listen`, among `peers`, finding itself by its listen address.
fn node(peers: &[SocketAddr], listen: SocketAddr, secret: &tempfile::NamedTempFile) -> Node {
    let cfg = ClusterConfig {
        peers: peers.iter().map(|a| url(*a)).collect(),
        secret_file: Some(secret.path().to_owned()),
        ..Default::default()
    };
    let metrics = Arc::new(Metrics::new(&[]));
    let cluster = Cluster::new(&cfg, listen, metrics.clone()).unwrap();
    Node { cluster, metrics }
}

fn peer(addr: SocketAddr) -> Peer {
    Peer {
        url: url(addr).parse().unwrap(),
    }
}

fn rendered(m: &Metrics) -> String {
    String::from_utf8(m.render()).unwrap()
}

async fn bind() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

/// Polls `cond` every 50 ms until it holds, for at most `limit`; returns how long it took.
async fn within(limit: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

#[tokio::test]
async fn a_stopped_replica_stops_owning_keys_within_seconds_and_takes_them_back() {
    let secret = secret_file(SECRET);
    let ((la, a), (lb, b)) = (bind().await, bind().await);
    let _sa = serve(la, health);
    let sb = serve(lb, health);
    let (na, nb) = (node(&[a, b], a, &secret), node(&[a, b], b, &secret));
    assert_eq!((na.cluster.me(), nb.cluster.me()), (&peer(a), &peer(b)));
    na.cluster.start();
    nb.cluster.start();
    let both = |n: &Node| n.cluster.live().len() == 2;
    within(Duration::from_secs(3), || both(&na) && both(&nb))
        .await
        .expect("the replicas see each other live");
    assert!(rendered(&na.metrics).contains("cachalot_cluster_peers_live 2"));

    // A key B owns, by both replicas' reckoning.
    let key = (0..)
        .map(|i| format!("sha256:{i:064x}"))
        .find(|k| na.cluster.owner(k) == Some(peer(b)))
        .unwrap();
    assert_eq!(nb.cluster.owner(&key), None);

    drop(sb);
    let took = within(Duration::from_secs(5), || na.cluster.owner(&key).is_none())
        .await
        .expect("A takes the key over once B is down");
    // Two failed probes a second apart, and a probe round's slack.
    assert!(
        took >= Duration::from_millis(900),
        "taken for dead after {took:?}"
    );
    assert_eq!(na.cluster.live(), [peer(a)]);
    assert!(rendered(&na.metrics).contains("cachalot_cluster_peers_live 1"));

    // B back on its address: one successful probe makes it live again.
    let lb = TcpListener::bind(b).await.unwrap();
    let _sb = serve(lb, health);
    within(Duration::from_secs(3), || {
        na.cluster.owner(&key) == Some(peer(b))
    })
    .await
    .expect("B owns the key again once it answers");
}

/// A blob route on `checker`'s replica: refuses requests that are not signed by a peer, echoes
/// `Range`, sends a first chunk at once and the rest when `rest` says so.
fn streaming(
    checker: Arc<Cluster>,
    rest: Arc<tokio::sync::Mutex<mpsc::Receiver<Bytes>>>,
) -> impl Fn(Request<Incoming>) -> std::pin::Pin<Box<dyn Future<Output = Response<Body>> + Send>>
+ Clone
+ Send
+ Sync
+ 'static {
    move |req: Request<Incoming>| {
        let (checker, rest) = (checker.clone(), rest.clone());
        Box::pin(async move {
            let pq = req.uri().path_and_query().unwrap().as_str().to_owned();
            if checker.check(req.method(), &pq, req.headers()) != PeerCheck::Peer {
                return text(StatusCode::UNAUTHORIZED, "peers only");
            }
            let (tx, rx) = mpsc::channel::<Bytes>(4);
            tokio::spawn(async move {
                tx.send(Bytes::from_static(b"first chunk;")).await.unwrap();
                let next = rest.lock().await.recv().await;
                if let Some(b) = next {
                    let _ = tx.send(b).await;
                }
            });
            let frames = futures_util::stream::unfold(rx, |mut rx| async move {
                let b = rx.recv().await?;
                Some((Ok::<_, Infallible>(Frame::data(b)), rx))
            });
            let mut r = Response::new(StreamBody::new(frames).boxed_unsync());
            if let Some(range) = req.headers().get("range") {
                r.headers_mut().insert("x-range-seen", range.clone());
            }
            r
        })
    }
}

#[tokio::test]
async fn fetch_is_signed_and_streams_the_body_as_it_comes() {
    let secret = secret_file(SECRET);
    let ((la, a), (lb, b)) = (bind().await, bind().await);
    drop(la);
    let (na, nb) = (node(&[a, b], a, &secret), node(&[a, b], b, &secret));
    let (release, rx) = mpsc::channel(1);
    let _sb = serve(
        lb,
        streaming(nb.cluster.clone(), Arc::new(tokio::sync::Mutex::new(rx))),
    );

    let path = "/v2/library/alpine/blobs/sha256:00?ns=docker.io";
    let mut extra = HeaderMap::new();
    extra.insert("range", HeaderValue::from_static("bytes=0-"));
    let resp = tokio::time::timeout(
        Duration::from_secs(3),
        na.cluster.fetch(&peer(b), Method::GET, path, extra),
    )
    .await
    .expect("headers come before the body ends")
    .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-range-seen"], "bytes=0-");
    let mut body = resp.into_body();
    let first = tokio::time::timeout(Duration::from_secs(3), body.frame())
        .await
        .expect("the first chunk arrives while the peer holds the rest")
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "first chunk;");
    release.send(Bytes::from_static(b"the rest")).await.unwrap();
    drop(release);
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "the rest");

    let out = rendered(&na.metrics);
    assert!(
        out.contains("cachalot_peer_requests_total{direction=\"out\",result=\"ok\"} 1"),
        "{out}"
    );
    let inb = rendered(&nb.metrics);
    assert!(
        inb.contains("cachalot_peer_requests_total{direction=\"in\",result=\"ok\"} 1"),
        "{inb}"
    );

    // A replica with another secret is refused, and says so in its metrics.
    let other = secret_file("not the cluster secret");
    let stranger = node(&[a, b], a, &other);
    let resp = stranger
        .cluster
        .fetch(&peer(b), Method::GET, path, HeaderMap::new())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let out = rendered(&stranger.metrics);
    assert!(
        out.contains("cachalot_peer_requests_total{direction=\"out\",result=\"refused\"} 1"),
        "{out}"
    );
    let inb = rendered(&nb.metrics);
    assert!(
        inb.contains("cachalot_peer_requests_total{direction=\"in\",result=\"refused\"} 1"),
        "{inb}"
    );
}

#[tokio::test]
async fn fetch_gives_up_on_a_silent_peer_and_fails_fast_on_a_dead_one() {
    let secret = secret_file(SECRET);
    let ((la, a), (lb, b)) = (bind().await, bind().await);
    drop(la);
    // B accepts connections and never answers on them.
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = lb.accept().await {
            held.push(s);
        }
    });
    let na = node(&[a, b], a, &secret);
    let started = Instant::now();
    let e = na
        .cluster
        .fetch_within(
            &peer(b),
            Method::GET,
            "/v2/x/blobs/sha256:00",
            HeaderMap::new(),
            Duration::from_millis(300),
        )
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "{took:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("peer http://{b}")) && msg.contains("timed out"),
        "{msg}"
    );
    let out = rendered(&na.metrics);
    assert!(
        out.contains("cachalot_peer_requests_total{direction=\"out\",result=\"timeout\"} 1"),
        "{out}"
    );
    silent.abort();

    // Nothing listens on A's address any more: refused at once.
    let started = Instant::now();
    let e = na
        .cluster
        .fetch(
            &peer(a),
            Method::HEAD,
            "/v2/x/blobs/sha256:00",
            HeaderMap::new(),
        )
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(e.to_string().contains("could not connect"), "{e}");
    let out = rendered(&na.metrics);
    assert!(
        out.contains("cachalot_peer_requests_total{direction=\"out\",result=\"error\"} 1"),
        "{out}"
    );
}
