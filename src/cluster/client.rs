//! The HTTP client replicas talk to each other with: pooled hyper-util over hyper-rustls
//! (plain HTTP, the usual case inside a cluster, or HTTPS checked against the webpki roots), a
//! short connect timeout and a deadline on the response headers.
//!
//! The body is not covered by any deadline here: it streams as the owner produces it, and the
//! caller applies its idle-body timeout between frames, as for an upstream body.

use crate::config::ConfigError;
use crate::error::UpstreamFault;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use std::time::Duration;

/// A peer on the same network answers a TCP handshake in well under this; one that does not is
/// down or partitioned, and the caller is better off filling the blob itself.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub(super) struct PeerClient {
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
}

/// Why no response came.
#[derive(Debug)]
pub(super) enum Failure {
    Timeout(&'static str),
    Fault(UpstreamFault),
}

impl PeerClient {
    pub(super) fn new() -> Result<PeerClient, ConfigError> {
        let tls = crate::outbound::public_roots()
            .map_err(|e| ConfigError::Invalid(format!("cluster.peers: TLS setup: {e}")))?;
        let client = crate::outbound::pooled_client(tls, CONNECT_TIMEOUT);
        Ok(PeerClient { client })
    }

    /// Sends `req` and waits at most `timeout` for the response headers (the connect timeout
    /// included). Dropping the returned future abandons the request and its connection.
    pub(super) async fn send(
        &self,
        req: Request<Empty<Bytes>>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, Failure> {
        match tokio::time::timeout(timeout, self.client.request(req)).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(classify(&e)),
            Err(_) => Err(Failure::Timeout("waiting for the peer's response headers")),
        }
    }
}

/// Connect failures (refused, DNS, TLS) are Connect, a connect timeout is a Timeout, anything
/// after connecting is Protocol.
fn classify(e: &hyper_util::client::legacy::Error) -> Failure {
    let mut msg = e.to_string();
    let mut timed_out = false;
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            timed_out |= io.kind() == std::io::ErrorKind::TimedOut;
        }
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    match (e.is_connect(), timed_out) {
        (true, true) => Failure::Timeout("connecting to the peer"),
        (true, false) => Failure::Fault(UpstreamFault::Connect(msg)),
        (false, _) => Failure::Fault(UpstreamFault::Protocol(msg)),
    }
}
