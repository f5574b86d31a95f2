//! The accept loop of both listeners: TCP, optional TLS (rustls), our own HTTP/1 path for plain
//! connections (`h1`) and hyper-util's HTTP/1 + HTTP/2 builder for the rest. Sockets live only
//! here; everything behind `handle` is a plain function of the request.

use super::body::Body;
use super::coalesce::Coalesce;
use super::conns::{Activity, Table, TrackedBody};
use super::h1::ReqBody;
use super::handlers::{AppState, handle};
use super::sendfile::{FileQueue, SendfileStream};
use crate::config::{Backend, Config};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::mirror::Mirror;
use crate::storage::s3::Bucket;
use crate::storage::{Disk, RealDisk, Store};
use http::{Request, Response, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

/// A TLS handshake that takes longer than this is dropped, so idle sockets cannot pile up.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `shutdown` waits for verified blobs to be committed (an fsync and a rename each).
const COMMIT_DRAIN: Duration = Duration::from_secs(10);

/// The most a connection buffers while reading a request head; a longer head gets 431 and
/// the connection is closed. Registry clients send heads of a few kilobytes; hyper's own
/// default (about 400 KiB) would let each of `max_connections` slow heads hold that much.
const MAX_HEAD_BUFFER: usize = 64 * 1024;

/// File descriptors kept for everything but client connections: cache files being read and
/// written, upstream connections, the metadata store, the metrics listener.
const FD_RESERVE: u64 = 256;

/// Limits of the metrics listener, which serves one scraper or two.
const METRICS_LISTENER_CONNECTIONS: usize = 64;

/// A running server. Dropping it does not stop it; call `shutdown`.
pub struct Server {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    metrics_task: Option<tokio::task::JoinHandle<()>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    housekeeping: tokio::task::JoinHandle<()>,
    pub mirror: Arc<Mirror>,
}

impl Server {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where `server.metrics_listen` is bound, when configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Stops accepting (the listening socket is closed, so new connections are refused),
    /// lets the responses in flight finish (for `server.drain_timeout` at most, then closes
    /// what is left; a request that still arrives on an open connection meanwhile, HTTP/1
    /// pipelined or an HTTP/2 stream begun before the GOAWAY, finds `/readyz` 503 and its
    /// response closing the connection),
    /// waits for verified blobs to be committed, and returns once no connection or background
    /// task holds the cache.
    pub async fn shutdown(self) {
        self.mirror.start_draining();
        let _ = self.stop.send(true);
        let _ = self.task.await;
        if let Some(t) = self.metrics_task {
            let _ = t.await;
        }
        self.mirror.finish_commits(COMMIT_DRAIN).await;
        let _ = self.housekeeping.await;
    }

    /// Stops at once, as a crash would: connections are dropped mid-response, nothing drains.
    /// For tests of what the rest of a cluster does when a replica dies.
    pub fn abort(self) {
        self.task.abort();
        self.housekeeping.abort();
        if let Some(t) = self.metrics_task {
            t.abort();
        }
    }

    /// Waits until the server stops (it only stops through `shutdown`).
    pub async fn wait(&mut self) {
        let _ = (&mut self.task).await;
    }
}

/// Opens the cache, binds `server.listen` and starts serving; returns once bound.
pub async fn spawn(config: Config) -> Result<Server, Error> {
    spawn_with(config, Arc::new(RealDisk)).await
}

/// `spawn`, with cache writes going through `disk` (tests use it to make writes fail).
pub async fn spawn_with(config: Config, disk: Arc<dyn Disk>) -> Result<Server, Error> {
    spawn_with_options(config, SpawnOptions { disk, bucket: None }).await
}

/// What a test may put in place of the real thing.
pub struct SpawnOptions {
    /// Cache writes go through it.
    pub disk: Arc<dyn Disk>,
    /// With `[storage] backend = "s3"`: this store instead of the configured endpoint.
    pub bucket: Option<Arc<dyn object_store::ObjectStore>>,
}

impl Default for SpawnOptions {
    fn default() -> Self {
        SpawnOptions {
            disk: Arc::new(RealDisk),
            bucket: None,
        }
    }
}

/// `spawn`, with `options` in place of the real disk or bucket.
pub async fn spawn_with_options(config: Config, options: SpawnOptions) -> Result<Server, Error> {
    let SpawnOptions { disk, bucket } = options;
    let dir = config.cache.dir.clone();
    let store = tokio::task::spawn_blocking(move || Store::open_with(&dir, disk))
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
        .map_err(|e| Error::Internal(format!("cache.dir {}: {e}", config.cache.dir.display())))?;
    let names: Vec<&str> = config.upstream.iter().map(|u| u.name.as_str()).collect();
    let metrics = Arc::new(Metrics::new(&names));
    let bucket = match (config.storage.backend, bucket) {
        (Backend::Fs, _) => None,
        (Backend::S3, Some(store)) => {
            let prefix = config.storage.prefix.as_deref().unwrap_or("");
            Some(Bucket::with_store(store, prefix, metrics.clone()))
        }
        (Backend::S3, None) => Some(
            Bucket::connect(&config.storage, metrics.clone())
                .map_err(|e| Error::Internal(e.to_string()))?,
        ),
    };
    let store = store.with_bucket(bucket);
    metrics
        .cache_max_size
        .set(i64::try_from(config.cache.max_size.0).unwrap_or(i64::MAX));
    let tls_pair = match (&config.server.tls_cert, &config.server.tls_key) {
        (Some(cert), Some(key)) => Some(super::tls::Reloadable::load(cert, key, metrics.clone())?),
        _ => None,
    };
    let tls = tls_pair.as_ref().map(|p| p.acceptor()).transpose()?;
    let listener = bind(config.server.listen)
        .map_err(|e| Error::Internal(format!("server.listen {}: {e}", config.server.listen)))?;
    let addr = listener.local_addr()?;
    // The cluster learns this replica's own URL from the address actually bound.
    let cluster = match &config.cluster {
        Some(c) => {
            let cluster = crate::cluster::Cluster::new(c, addr, metrics.clone())
                .map_err(|e| Error::Internal(e.to_string()))?;
            cluster.start();
            info!(me = %cluster.me(), peers = c.peers.len(), "cluster member");
            Some(cluster)
        }
        None => None,
    };
    let mirror =
        Arc::new(Mirror::new(&config, Arc::new(store), metrics.clone())?.with_cluster(cluster));
    info!(%addr, tls = tls.is_some(), upstreams = ?names, "cachalot listening");
    let auth = crate::auth::Auth::from_config(&config, &metrics)?;
    let ui = Arc::new(crate::ui::Ui::new(&config));
    let state = Arc::new(AppState {
        mirror: mirror.clone(),
        metrics: metrics.clone(),
        auth: auth.clone(),
        ui: ui.clone(),
    });
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(ui.run_sampler(metrics, stopped.clone()));
    if let Some(auth) = &auth {
        auth.spawn_reload(stopped.clone());
    }
    let housekeeping = tokio::spawn(mirror.clone().housekeeping(stopped.clone()));
    if let Some(pair) = &tls_pair {
        pair.spawn_reload(stopped.clone());
    }
    let (metrics_addr, metrics_task) = match config.server.metrics_listen {
        Some(a) => {
            let (addr, task) =
                super::metrics_listener::spawn(a, mirror.clone(), stopped.clone()).await?;
            (Some(addr), Some(task))
        }
        None => (None, None),
    };
    crate::airgap::spawn_refresh(&config, &mirror, stopped.clone());
    crate::verify::spawn_integrity(
        &config,
        mirror.store(),
        mirror.cluster().cloned(),
        stopped.clone(),
    );
    let limits = Limits {
        header_timeout: config.server.header_timeout.0,
        max_connections: connection_budget(&config),
        open: Some(state.metrics.connections_open.clone()),
        drain_timeout: config.server.drain_timeout.0,
        reclaimed: Some(state.metrics.connections_reclaimed.clone()),
    };
    state
        .metrics
        .connections_limit
        .set(i64::try_from(limits.max_connections).unwrap_or(i64::MAX));
    let listener = Listener {
        tcp: listener,
        name: "server.listen",
        tls,
        sendfile: true,
        limits,
    };
    let task = tokio::spawn(accept_loop(listener, stopped, state, handle));
    Ok(Server {
        addr,
        metrics_addr,
        metrics_task,
        stop,
        task,
        housekeeping,
        mirror,
    })
}

/// A bound listener and what sets its connections apart.
pub(super) struct Listener {
    pub tcp: TcpListener,
    /// The config key it was bound from, for the log.
    pub name: &'static str,
    pub tls: Option<TlsAcceptor>,
    /// It serves blobs: plain connections send them with sendfile.
    pub sendfile: bool,
    pub limits: Limits,
}

/// What one listener's connections may take.
pub(super) struct Limits {
    /// A request head not complete this long after the connection was accepted (or after
    /// its previous response): the connection is closed.
    pub header_timeout: Duration,
    /// Connections served at once; past it, the loop stops accepting and new connections
    /// wait in the kernel's backlog.
    pub max_connections: usize,
    /// Counts the connections being served, when this listener's are to be shown.
    pub open: Option<prometheus::IntGauge>,
    /// How long responses in flight may run on after the stop.
    pub drain_timeout: Duration,
    /// Counts the idle connections closed to make room for new ones.
    pub reclaimed: Option<prometheus::IntCounter>,
}

impl Limits {
    /// The limits of the `/metrics`-only listener: the same head timeout, few connections.
    pub(super) fn metrics_listener() -> Limits {
        Limits {
            header_timeout: Duration::from_secs(10),
            max_connections: METRICS_LISTENER_CONNECTIONS,
            open: None,
            // A scrape is short; a drain must not wait on one.
            drain_timeout: Duration::from_secs(2),
            reclaimed: None,
        }
    }
}

/// Held by a connection's task for as long as it runs: its place under `max_connections`.
struct Slot {
    _permit: OwnedSemaphorePermit,
    open: Option<prometheus::IntGauge>,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, open: Option<prometheus::IntGauge>) -> Slot {
        if let Some(g) = &open {
            g.inc();
        }
        Slot {
            _permit: permit,
            open,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(g) = &self.open {
            g.dec();
        }
    }
}

/// The listen backlog asked for; the kernel caps it at `net.core.somaxconn` (4,096 by default
/// since Linux 5.4), so this means "as many as the system allows", as nginx's `backlog=65535`
/// and Go's listeners (which read somaxconn) do.
const LISTEN_BACKLOG: u32 = 65_535;

/// A listening socket on `addr` with the deepest backlog the system allows. tokio's `bind`
/// asks for 1,024: a fleet connecting at once overflows it, and the kernel then answers with
/// SYN cookies, whose connections keep a small segment size for their whole life (1,448 bytes
/// on loopback, whose own is 65,483: measured, about one connection in nine at 1,000 clients,
/// each sending 45 times the segments). Past `max_connections` connections wait in this
/// backlog, so its depth is how many can wait there.
pub(super) fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As `TcpListener::bind`: a restarted mirror binds while its old connections linger.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Raises the soft open-file limit to the hard one, as Go programs (distribution) do at start
/// and nginx's `worker_rlimit_nofile` does: 1,024, the soft default of a login shell and of a
/// systemd service without `LimitNOFILE`, is a thousand clients. Returns the limits after, soft
/// and hard (`None`: unlimited).
pub fn raise_open_files_limit() -> (Option<u64>, Option<u64>) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let before = getrlimit(Resource::Nofile);
    if before.current != before.maximum {
        let raised = rustix::process::Rlimit {
            current: before.maximum,
            maximum: before.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            warn!(error = %e, "could not raise the soft open-file limit to the hard one");
        }
    }
    let after = getrlimit(Resource::Nofile);
    info!(
        soft_before = ?before.current,
        soft = ?after.current,
        hard = ?after.maximum,
        "open-file limit (None: unlimited)"
    );
    (after.current, after.maximum)
}

/// The client connections the open-file limit affords, or `None` when it is unlimited. Each
/// busy connection can hold its socket and a cache file (over HTTP/2, one file per stream:
/// the budget assumes one), and [`FD_RESERVE`] plus the upstreams' connection limits stay
/// for everything else. Past it, accepts would fail with EMFILE, and so would the opens of
/// the cache files that the accepted connections are waiting for.
pub fn connection_budget_for(open_files: Option<u64>, upstream_connections: u64) -> Option<usize> {
    let limit = open_files?;
    let reserve = FD_RESERVE + upstream_connections;
    // Never below an eighth of the limit, so that a reserve close to the limit (upstream
    // limits summing near it) leaves a few connections rather than one, and the budget never
    // falls as the limit rises.
    let budget = (limit.saturating_sub(reserve) / 2).max(limit / 8).max(1);
    Some(usize::try_from(budget).unwrap_or(usize::MAX))
}

/// `server.max_connections`, lowered (with a warning) to [`connection_budget_for`] this
/// process's soft open-file limit.
fn connection_budget(config: &Config) -> usize {
    let configured = config.server.max_connections;
    let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    let Some(budget) = connection_budget_for(soft, upstream_connection_limits(config)) else {
        return configured;
    };
    if budget < configured {
        warn!(
            configured,
            max_connections = budget,
            open_files_limit = soft,
            "server.max_connections lowered to what the open-file limit allows (raise the hard limit, ulimit -Hn or LimitNOFILE, to serve more)"
        );
        budget
    } else {
        configured
    }
}

/// The upstream connections the config allows at most (those without a limit count as none:
/// their connections come from the same pool as the clients').
pub fn upstream_connection_limits(config: &Config) -> u64 {
    config
        .upstream
        .iter()
        .filter_map(|u| u.max_connections)
        .map(|n| n as u64)
        .sum()
}

/// Serves `listener` until `stopped`: each connection in its own task (after the TLS
/// handshake, when there is TLS), every request answered by `answer` with `state`. Returns
/// once every connection task has ended, so that nothing they hold (the cache) outlives the
/// loop.
pub(super) async fn accept_loop<S, A, F>(
    listener: Listener,
    mut stopped: watch::Receiver<bool>,
    state: Arc<S>,
    answer: A,
) where
    S: Send + Sync + 'static,
    A: Fn(Arc<S>, Request<ReqBody>) -> F + Copy + Send + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let mut conns = JoinSet::new();
    let mut table = Table::new();
    let slots = Arc::new(Semaphore::new(listener.limits.max_connections));
    let mut accept_warned: Option<Instant> = None;
    'accepting: loop {
        // A place is taken before accepting: at the limit, connections wait in the backlog
        // (the client sees a slow connect, not an error) rather than being accepted and
        // starved, and those already served keep their share of the machine. Only one is
        // accepted past it, to make room for: an idle keep-alive connection is closed for it
        // (nginx does the same at worker_connections), else it waits for one to end or fall
        // idle. Its descriptor comes from the reserve.
        let mut permit = slots.clone().try_acquire_owned().ok();
        let (stream, peer) = tokio::select! {
            _ = stopped.changed() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            accepted = listener.tcp.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off rather than spin, and say
                    // so once a second, not twenty times.
                    if accept_warned.is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(1)) {
                        warn!(listener = listener.name, error = %e, "accept failed (logged once a second)");
                        accept_warned = Some(Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        while permit.is_none() {
            if table.make_room()
                && let Some(c) = &listener.limits.reclaimed
            {
                c.inc();
            }
            tokio::select! {
                _ = stopped.changed() => break 'accepting,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                () = table.fell_idle() => {}
                p = slots.clone().acquire_owned() => permit = Some(p.expect("the semaphore is never closed")),
            };
            // A connection that ended has given its place back: take it before asking another
            // to close.
            permit = permit.or_else(|| slots.clone().try_acquire_owned().ok());
        }
        table.room_made();
        let _ = stream.set_nodelay(true);
        let conn = match (&listener.tls, listener.sendfile) {
            (Some(acceptor), _) => Conn::Tls(acceptor.clone(), stream),
            (None, true) => Conn::Sendfile(SendfileStream::new(stream)),
            (None, false) => Conn::Plain(stream),
        };
        // Entered now, not in the task: a connection accepted just before the stop must still
        // hear of it.
        let activity = table.add(conns.len());
        let slot = Slot::new(
            permit.take().expect("taken above"),
            listener.limits.open.clone(),
        );
        // Spawned as it is: awaited inside another future, it would be stored twice in the
        // task (once captured, once as the future being awaited), doubling every
        // connection's task (massif: 3,712 bytes a connection, against 1,720 for the future).
        conns.spawn(serve_connection(
            conn,
            peer,
            state.clone(),
            answer,
            activity,
            listener.limits.header_timeout,
            slot,
        ));
    }
    // Closing the socket now refuses new connections instead of leaving them in the backlog.
    let name = listener.name;
    let drain_timeout = listener.limits.drain_timeout;
    drop(listener);
    // Idle connections close at once; busy ones finish their responses (HTTP/1) or streams
    // (HTTP/2, after a GOAWAY) and close.
    table.close_all();
    let drained = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(drain_timeout, drained).await.is_err() {
        warn!(
            listener = name,
            connections = conns.len(),
            "responses still in flight at the drain timeout; closing their connections"
        );
    }
    conns.abort_all();
    // Aborted tasks are dropped only when the runtime next polls them; wait for that, so that
    // when `shutdown` returns no connection still holds the cache (its metadata lock included).
    while conns.join_next().await.is_some() {}
}

/// An accepted connection, before hyper gets it.
enum Conn {
    Plain(TcpStream),
    Sendfile(SendfileStream),
    /// Not yet shaken hands.
    Tls(TlsAcceptor, TcpStream),
}

/// Serves one connection until it closes, or, once `watcher` hears of the stop, until what it
/// is answering is done.
async fn serve_connection<S, A, F>(
    conn: Conn,
    peer: SocketAddr,
    state: Arc<S>,
    answer: A,
    activity: Arc<Activity>,
    header_timeout: Duration,
    // Held until the connection ends: its place among `max_connections`.
    _slot: Slot,
) where
    S: Send + Sync + 'static,
    A: Fn(Arc<S>, Request<ReqBody>) -> F + Copy + Send + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let result = match conn {
        Conn::Sendfile(mut s) => {
            // Ours first (see `h1`); hyper from the first request it does not take.
            let queue = s.queue();
            let (st, act, q) = (&state, &activity, &queue);
            let served = super::h1::serve(&mut s, &activity, header_timeout, move |req| {
                respond(st, answer, act, Some(q), req)
            })
            .await;
            let prefix = match served {
                Ok(super::h1::Ended::HandOff(prefix)) => prefix,
                Ok(super::h1::Ended::Closed) => return,
                Err(e) => {
                    debug!(%peer, error = %e, "connection ended with an error");
                    return;
                }
            };
            let io = super::h1::Prefixed::new(prefix, s);
            // Past the first request the connection speaks HTTP/1: hyper is not to sniff it
            // again for HTTP/2's preface, without a deadline.
            let h1_only = activity.started.load(Ordering::Acquire);
            Box::pin(serve_hyper(
                io,
                h1_only,
                Some(queue),
                state,
                answer,
                &activity,
                header_timeout,
            ))
            .await
        }
        Conn::Plain(s) => {
            Box::pin(serve_hyper(
                s,
                false,
                None,
                state,
                answer,
                &activity,
                header_timeout,
            ))
            .await
        }
        Conn::Tls(acceptor, stream) => {
            // Boxed: a TLS connection's state (the handshake, then rustls' own) is several times
            // a plain one's, and inline it would set the size of every connection's task.
            let tls = Box::pin(async move {
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => {
                        // HTTP/2 flushes after every frame: its writes are gathered (see
                        // `coalesce`). HTTP/1 writes whole body chunks already.
                        let h2 = s.get_ref().1.alpn_protocol() == Some(b"h2");
                        let s = Coalesce::new(s, h2);
                        Some(
                            serve_hyper(s, false, None, state, answer, &activity, header_timeout)
                                .await,
                        )
                    }
                    Ok(Err(e)) => {
                        debug!(%peer, error = %e, "TLS handshake failed");
                        None
                    }
                    Err(_) => None,
                }
            });
            match tls.await {
                Some(r) => r,
                None => return,
            }
        }
    };
    if let Err(e) = result {
        debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// Serves a connection with hyper (HTTP/1 or HTTP/2, as the client speaks; `h1_only`: HTTP/1).
/// `queue`: the socket sends blob placeholders from it (plain HTTP/1 only).
#[allow(clippy::too_many_arguments)]
async fn serve_hyper<I, S, A, F>(
    io: I,
    h1_only: bool,
    queue: Option<Arc<FileQueue>>,
    state: Arc<S>,
    answer: A,
    activity: &Arc<Activity>,
    header_timeout: Duration,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Send + Sync + 'static,
    A: Fn(Arc<S>, Request<ReqBody>) -> F + Copy + Send + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let sendfile = queue.is_some();
    let seen = activity.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        let resp = respond(
            &state,
            answer,
            &seen,
            queue.as_ref(),
            req.map(ReqBody::Hyper),
        );
        async move { Ok::<_, std::convert::Infallible>(resp.await) }
    });
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_HEAD_BUFFER);
    builder.http2().timer(TokioTimer::new());
    if sendfile {
        // Body chunks must reach the socket as the slices they were yielded as, never
        // flattened into hyper's own buffer: sendfile placeholders depend on it.
        builder.http1().writev(true);
    }
    if h1_only {
        builder = builder.http1_only();
    }
    let conn = builder.serve_connection(TokioIo::new(io), service);
    first_head(conn, |c| c.graceful_shutdown(), activity, header_timeout).await
}

/// Starts answering `req` on a connection: marks it busy until the response body ends (the
/// accept loop closes only idle connections to make room, and an HTTP/2 connection with no
/// stream open is closed after `header_timeout`), and gives plain HTTP/1 requests the
/// connection's sendfile queue.
fn respond<S, A, F>(
    state: &Arc<S>,
    answer: A,
    activity: &Arc<Activity>,
    queue: Option<&Arc<FileQueue>>,
    mut req: Request<ReqBody>,
) -> impl Future<Output = Response<Body>> + Send + 'static + use<S, A, F>
where
    S: Send + Sync + 'static,
    A: Fn(Arc<S>, Request<ReqBody>) -> F + Copy + Send + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let in_flight = activity.request_started(req.version() == Version::HTTP_2);
    if let Some(q) = queue {
        req.extensions_mut().insert(q.clone());
    }
    // The answer's future is made inside the block rather than moved into it: it is
    // kilobytes large, and a cached manifest's request paid for the copy.
    let state = state.clone();
    async move {
        let resp = answer(state, req).await;
        resp.map(|body| {
            TrackedBody {
                body,
                _in_flight: in_flight,
            }
            .boxed_unsync()
        })
    }
}

/// Serves `conn` but gives up on it when no request head was complete within `timeout`, and,
/// for HTTP/2, when no stream has been open for `timeout`.
///
/// hyper's HTTP/1 header timeout starts only once the protocol is known, and the auto builder
/// waits for the first bytes to know it without a deadline; HTTP/2 has none at all. A client
/// that connects and sends nothing, or a partial preface, is closed here; so is an HTTP/2
/// connection that went quiet after its requests (or sends half a HEADERS frame), which would
/// otherwise hold one of `server.max_connections` for ever.
async fn first_head<F, E>(
    conn: F,
    shutdown: impl Fn(Pin<&mut F>),
    activity: &Activity,
    timeout: Duration,
) -> Result<(), E>
where
    F: Future<Output = Result<(), E>>,
    E: From<&'static str>,
{
    let mut conn = std::pin::pin!(conn);
    let mut shut = false;
    // The waker last handed to `activity`: a task's waker rarely changes, so a poll (a blob
    // sent by sendfile polls the connection many times) compares it instead of handing it over
    // again through atomic swaps.
    let mut registered: Option<std::task::Waker> = None;
    // Dropped once an HTTP/1 head has come, so that later wake-ups of the connection (every
    // request's) neither poll nor keep a timer; HTTP/2 keeps it as the idle deadline.
    let mut deadline = Some(Box::pin(tokio::time::sleep(timeout)));
    std::future::poll_fn(|cx| {
        // Asked to close (the stop, or room for a new connection): what is in flight finishes
        // first, and the future then ends by itself.
        if !shut && activity.poll_close(cx, &mut registered) {
            shutdown(conn.as_mut());
            shut = true;
        }
        if let Poll::Ready(r) = conn.as_mut().poll(cx) {
            return Poll::Ready(r);
        }
        let Some(sleep) = deadline.as_mut() else {
            return Poll::Pending;
        };
        let started = activity.started.load(Ordering::Acquire);
        if started && !activity.h2.load(Ordering::Relaxed) {
            deadline = None;
            return Poll::Pending;
        }
        while sleep.as_mut().poll(cx).is_ready() {
            if !started {
                return Poll::Ready(Err(E::from(
                    "no complete request head within server.header_timeout",
                )));
            }
            let idle = activity.idle_for();
            if idle >= timeout {
                return Poll::Ready(Err(E::from(
                    "HTTP/2 connection idle for server.header_timeout",
                )));
            }
            // Busy, or idle for less than the timeout: look again when it would be due.
            let wait = if idle.is_zero() {
                timeout
            } else {
                timeout - idle
            };
            sleep.as_mut().reset(tokio::time::Instant::now() + wait);
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fleet connecting at once to a mirror that is not accepting (at its cap, or busy)
    /// completes its handshakes and waits in the backlog. With tokio's backlog of 1,024 the
    /// 1,026th SYN is dropped, and its client waits a second or more to retry.
    #[tokio::test]
    async fn a_fleet_connecting_at_once_waits_in_the_backlog_rather_than_being_dropped() {
        const FLEET: usize = 1_100;
        let (soft, _) = raise_open_files_limit();
        assert!(
            soft.is_none_or(|s| s >= FLEET as u64 + 100),
            "the test needs {} open files, has {soft:?}",
            FLEET + 100
        );
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(FLEET);
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let connects = (0..FLEET)
            .map(|_| tokio::time::timeout(Duration::from_millis(1500), TcpStream::connect(addr)));
        let done = futures_util::future::join_all(connects).await;
        let connected: Vec<TcpStream> = done.into_iter().flatten().flatten().collect();
        // The kernel holds one past the backlog; somaxconn caps what `bind` asks for.
        assert_eq!(
            connected.len(),
            FLEET.min(somaxconn + 1),
            "somaxconn {somaxconn}"
        );
    }

    #[test]
    fn the_budget_leaves_the_reserve_and_a_cache_file_per_connection() {
        // The soft limit of a login shell, with 64 upstream connections allowed.
        assert_eq!(
            connection_budget_for(Some(1024), 64),
            Some((1024 - 256 - 64) / 2)
        );
        assert_eq!(connection_budget_for(Some(1_048_576), 0), Some(524_160));
        assert_eq!(connection_budget_for(None, 0), None);
        // Below the reserve, an eighth, and never nothing.
        assert_eq!(connection_budget_for(Some(200), 0), Some(25));
        assert_eq!(connection_budget_for(Some(1), 0), Some(1));
        // It never falls as the limit rises, whatever the reserve.
        for reserve in [0, 765, 5_000] {
            let mut last = 0;
            for limit in 1..20_000 {
                let b = connection_budget_for(Some(limit), reserve).unwrap();
                assert!(b >= last, "limit {limit}, reserve {reserve}: {b} < {last}");
                last = b;
            }
        }
    }

    #[test]
    fn the_connection_budget_never_exceeds_the_configuration() {
        let mut config = Config::builtin_default();
        config.server.max_connections = 2;
        assert!(connection_budget(&config) <= 2);
        config.server.max_connections = 1;
        assert!(connection_budget(&config) == 1);
    }
}
