//! How cachalot builds its outgoing HTTP clients, one way for all of them: the upstreams
//! (`upstream`), the other replicas (`cluster`) and the bucket (`storage::s3`).

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::ClientConfig;
use std::sync::Arc;
use std::time::Duration;

/// TLS that trusts the public web PKI (webpki roots) and presents no certificate: peers and
/// the bucket.
pub(crate) fn public_roots() -> Result<ClientConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        })
        .with_no_client_auth())
}

/// A pooled HTTP/1 + HTTP/2 client, TLS by `tls` and plain HTTP alike, that gives up connecting
/// after `connect_timeout`: how every outgoing client is built (upstreams, peers, the bucket).
pub(crate) fn pooled_client<B>(
    tls: rustls::ClientConfig,
    connect_timeout: Duration,
) -> Client<HttpsConnector<HttpConnector>, B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        // A blob body arrives in reads of up to this much, so a cold fill's 1 MiB writes take
        // one read each; hyper's default (about 408 KiB) cut them in three, and each cut costs
        // a write, a hand-over to the hash and a wake-up of every follower (issue 16).
        .http1_max_buf_size(1 << 20)
        .build(https)
}
