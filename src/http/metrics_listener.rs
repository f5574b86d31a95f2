//! The optional `server.metrics_listen` listener: plain HTTP, `/metrics` only, so a scraper
//! can reach the metrics on an admin network without reaching the registry API.

use crate::error::Error;
use crate::http::body::{self, Body};
use crate::mirror::Mirror;
use http::{Method, Request, Response, StatusCode, header};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// Binds `addr` and serves until `stopped` turns true; returns the bound address and the
/// serving task, which ends once no connection is left (each holds the mirror, so the cache).
pub async fn spawn(
    addr: SocketAddr,
    mirror: Arc<Mirror>,
    mut stopped: watch::Receiver<bool>,
) -> Result<(SocketAddr, JoinHandle<()>), Error> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Internal(format!("server.metrics_listen {addr}: {e}")))?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "metrics listening");
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            let stream = tokio::select! {
                _ = stopped.changed() => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => continue,
                accepted = listener.accept() => match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let mirror = mirror.clone();
            conns.spawn(async move {
                let service = service_fn(move |req| {
                    let mirror = mirror.clone();
                    async move { Ok::<_, std::convert::Infallible>(answer(&mirror, &req)) }
                });
                let _ = Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
        conns.abort_all();
        while conns.join_next().await.is_some() {}
    });
    Ok((bound, task))
}

fn answer<B>(mirror: &Mirror, req: &Request<B>) -> Response<Body> {
    let get = matches!(*req.method(), Method::GET | Method::HEAD);
    if get && req.uri().path() == "/metrics" {
        super::handlers::metrics(mirror)
    } else {
        Response::builder()
            .status(StatusCode::NOT_FOUND)
            .header(header::CONTENT_TYPE, "text/plain")
            .body(body::full("only /metrics is served here\n"))
            .expect("static response")
    }
}
