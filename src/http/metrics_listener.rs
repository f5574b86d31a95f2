//! The optional `server.metrics_listen` listener: plain HTTP, `/metrics` only, so a scraper
//! can reach the metrics on an admin network without reaching the registry API.

use crate::error::Error;
use crate::http::body::{self, Body};
use crate::mirror::Mirror;
use http::{Method, Request, Response, StatusCode, header};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Binds `addr` and serves until `stopped` turns true; returns the bound address and the
/// serving task, which ends once no connection is left (each holds the mirror, so the cache).
pub(crate) async fn spawn(
    addr: SocketAddr,
    mirror: Arc<Mirror>,
    stopped: watch::Receiver<bool>,
) -> Result<(SocketAddr, JoinHandle<()>), Error> {
    let listener = super::server::bind(addr)
        .map_err(|e| Error::Internal(format!("server.metrics_listen {addr}: {e}")))?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "metrics listening");
    let listener = super::server::Listener {
        tcp: listener,
        name: "server.metrics_listen",
        tls: None,
        sendfile: false,
        limits: super::server::Limits::metrics_listener(),
    };
    let task = tokio::spawn(super::server::accept_loop(
        listener, stopped, mirror, answer,
    ));
    Ok((bound, task))
}

async fn answer<B>(mirror: Arc<Mirror>, req: Request<B>) -> Response<Body> {
    let get = matches!(*req.method(), Method::GET | Method::HEAD);
    if get && req.uri().path() == "/metrics" {
        super::handlers::metrics(&mirror)
    } else {
        Response::builder()
            .status(StatusCode::NOT_FOUND)
            .header(header::CONTENT_TYPE, "text/plain")
            .body(body::full("only /metrics is served here\n"))
            .expect("static response")
    }
}
