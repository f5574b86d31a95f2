//! The accept loop of both listeners: TCP, optional TLS (rustls), hyper-util's HTTP/1 + HTTP/2
//! builder. Sockets live only here; everything behind `handle` is a plain function of the request.

use super::body::Body;
use super::handlers::{AppState, handle};
use super::sendfile::SendfileStream;
use crate::config::Config;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::mirror::Mirror;
use crate::storage::{Disk, RealDisk, Store};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

/// A TLS handshake that takes longer than this is dropped, so idle sockets cannot pile up.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `shutdown` lets responses in flight finish before closing their connections.
// TODO(drain_timeout): the `server.drain_timeout` key of a later issue replaces this.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `shutdown` waits for verified blobs to be committed (an fsync and a rename each).
const COMMIT_DRAIN: Duration = Duration::from_secs(10);

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

    /// Stops accepting, lets the responses in flight finish (for `DRAIN_TIMEOUT` at most, then
    /// closes what is left), waits for verified blobs to be committed, and returns once no
    /// connection or background task holds the cache.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        if let Some(t) = self.metrics_task {
            let _ = t.await;
        }
        self.mirror.finish_commits(COMMIT_DRAIN).await;
        let _ = self.housekeeping.await;
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
    let dir = config.cache.dir.clone();
    let store = tokio::task::spawn_blocking(move || Store::open_with(&dir, disk))
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
        .map_err(|e| Error::Internal(format!("cache.dir {}: {e}", config.cache.dir.display())))?;
    let names: Vec<&str> = config.upstream.iter().map(|u| u.name.as_str()).collect();
    let metrics = Arc::new(Metrics::new(&names));
    metrics
        .cache_max_size
        .set(i64::try_from(config.cache.max_size.0).unwrap_or(i64::MAX));
    let mirror = Arc::new(Mirror::new(&config, Arc::new(store), metrics.clone())?);
    let tls_pair = match (&config.server.tls_cert, &config.server.tls_key) {
        (Some(cert), Some(key)) => Some(super::tls::Reloadable::load(cert, key, metrics.clone())?),
        _ => None,
    };
    let tls = tls_pair.as_ref().map(|p| p.acceptor()).transpose()?;
    let listener = TcpListener::bind(config.server.listen)
        .await
        .map_err(|e| Error::Internal(format!("server.listen {}: {e}", config.server.listen)))?;
    let addr = listener.local_addr()?;
    info!(%addr, tls = tls.is_some(), upstreams = ?names, "cachalot listening");
    let auth = crate::auth::Auth::from_config(&config, &metrics)?;
    let state = Arc::new(AppState {
        mirror: mirror.clone(),
        metrics,
        auth: auth.clone(),
    });
    let (stop, stopped) = watch::channel(false);
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
    let listener = Listener {
        tcp: listener,
        name: "server.listen",
        tls,
        sendfile: true,
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
    A: Fn(Arc<S>, Request<Incoming>) -> F + Copy + Send + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let mut conns = JoinSet::new();
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stopped.changed() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            accepted = listener.tcp.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    warn!(listener = listener.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let conn = match (&listener.tls, listener.sendfile) {
            (Some(acceptor), _) => Conn::Tls(acceptor.clone(), stream),
            (None, true) => Conn::Sendfile(SendfileStream::new(stream)),
            (None, false) => Conn::Plain(stream),
        };
        // The watcher is taken now, not in the task: a connection accepted just before the
        // stop must still hear of it.
        let watcher = graceful.watcher();
        conns.spawn(serve_connection(
            conn,
            peer,
            listener.sendfile,
            state.clone(),
            answer,
            watcher,
        ));
    }
    // Closing the socket now refuses new connections instead of leaving them in the backlog.
    let name = listener.name;
    drop(listener);
    // Idle connections close at once; busy ones finish their responses (HTTP/1) or streams
    // (HTTP/2, after a GOAWAY) and close.
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
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
    sendfile: bool,
    state: Arc<S>,
    answer: A,
    watcher: Watcher,
) where
    S: Send + Sync + 'static,
    A: Fn(Arc<S>, Request<Incoming>) -> F + Copy + Send + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    // Plain connections that send cached blobs with sendfile: their bodies find the
    // connection's queue of file ranges in the request's extensions.
    let queue = match &conn {
        Conn::Sendfile(s) => Some(s.queue()),
        _ => None,
    };
    let service = service_fn(move |mut req: Request<Incoming>| {
        if let Some(q) = &queue {
            req.extensions_mut().insert(q.clone());
        }
        // The answer's future is made inside the block rather than moved into it: it is
        // kilobytes large, and a cached manifest's request paid for the copy.
        let state = state.clone();
        async move { Ok::<_, std::convert::Infallible>(answer(state, req).await) }
    });
    let mut builder = Builder::new(TokioExecutor::new());
    if sendfile {
        // Body chunks must reach the socket as the slices they were yielded as, never
        // flattened into hyper's own buffer: sendfile placeholders depend on it.
        builder.http1().writev(true);
    }
    let result = match conn {
        Conn::Plain(s) => {
            let conn = builder.serve_connection(TokioIo::new(s), service);
            watcher.watch(conn).await
        }
        Conn::Sendfile(s) => {
            let conn = builder.serve_connection(TokioIo::new(s), service);
            watcher.watch(conn).await
        }
        Conn::Tls(acceptor, stream) => {
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(s)) => {
                    let conn = builder.serve_connection(TokioIo::new(s), service);
                    watcher.watch(conn).await
                }
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            }
        }
    };
    if let Err(e) = result {
        debug!(%peer, error = %e, "connection ended with an error");
    }
}
