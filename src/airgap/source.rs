//! Where prefetch gets content from: the cache opened in this process (through the same
//! `Mirror` the server uses), or, when a running server holds the cache, that server over HTTP,
//! so its single flight still makes one upstream fetch per digest.

use crate::config::{Config, UpstreamConfig};
use crate::error::{Error, UpstreamFault};
use crate::metrics::Metrics;
use crate::mirror::Mirror;
use crate::oci::descriptor::{self, Descriptor, Refs};
use crate::oci::manifest::{self, ALL_MANIFEST_TYPES, Accept, MAX_MANIFEST_SIZE};
use crate::oci::{Digest, ErrorCode, OciError, Reference, RepoName};
use crate::storage::{FsStore, Store};
use crate::upstream::{Op, Upstream, UpstreamRequest};
use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

/// A manifest as fetched, bytes untouched.
#[derive(Clone, Debug)]
pub struct Fetched {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
}

pub enum Source {
    /// This process holds the cache.
    Local(Arc<Mirror>),
    /// A running server holds it; ask that server.
    Server(ServerClient),
}

/// HTTP client for a running cachalot, and the cache directory it serves (whose committed
/// files may be read without its lock).
pub struct ServerClient {
    client: Upstream,
    root: PathBuf,
    pub url: String,
}

impl Source {
    /// Opens the cache at `cache.dir`; when another process holds it, finds the server at
    /// `server.listen` instead. `note` hears which one was chosen. Errors name `cache.dir`.
    pub async fn open(config: &Config, note: impl Fn(&str)) -> Result<Source, Error> {
        let dir = config.cache.dir.clone();
        let opened = tokio::task::spawn_blocking(move || Store::open(&dir))
            .await
            .map_err(|e| Error::Internal(format!("opening the cache: {e}")))?;
        let names: Vec<&str> = config.upstream.iter().map(|u| u.name.as_str()).collect();
        let metrics = Arc::new(Metrics::new(&names));
        match opened {
            Ok(store) => {
                let mirror = Mirror::new(config, Arc::new(store), metrics)?;
                Ok(Source::Local(Arc::new(mirror)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::ResourceBusy => {
                let url = server_url(config);
                let server = ServerClient::new(&url, config.cache.dir.clone(), metrics)?;
                server.ping().await.map_err(|e| {
                    e.context(format!(
                        "cache.dir {}: in use by another process, and no cachalot answers at server.listen ({url})",
                        config.cache.dir.display()
                    ))
                })?;
                note(&format!(
                    "cache.dir {} is in use by a running cachalot; fetching through it at {url}",
                    config.cache.dir.display()
                ));
                Ok(Source::Server(server))
            }
            Err(e) => {
                Err(Error::from(e).context(format!("cache.dir {}", config.cache.dir.display())))
            }
        }
    }

    /// The cache directory.
    pub fn root(&self) -> PathBuf {
        match self {
            Source::Local(m) => m.cache_dir().to_path_buf(),
            Source::Server(s) => s.root.clone(),
        }
    }

    /// Whether a blob or manifest is committed in the cache.
    pub fn is_cached(&self, digest: &Digest) -> bool {
        FsStore::blob_path_in(&self.root(), digest).exists()
    }

    pub async fn manifest(
        &self,
        upstream: &str,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Fetched, Error> {
        match self {
            Source::Local(mirror) => {
                let t = mirror.route(repo.as_str(), Some(upstream))?;
                let m = match reference {
                    Reference::Tag(tag) => {
                        mirror.manifest_by_tag(&t, tag, &Accept::default()).await?
                    }
                    Reference::Digest(d) => mirror.manifest_by_digest(&t, d).await?,
                };
                Ok(Fetched {
                    digest: m.digest.clone(),
                    media_type: m.media_type.clone(),
                    bytes: m.bytes.clone(),
                })
            }
            Source::Server(s) => s.manifest(upstream, repo, reference).await,
        }
    }

    /// Makes sure a blob is cached, fetching it if needed; `on_progress` hears the bytes
    /// fetched so far. Returns its length.
    pub async fn blob(
        &self,
        upstream: &str,
        repo: &RepoName,
        digest: &Digest,
        on_progress: impl FnMut(u64),
    ) -> Result<u64, Error> {
        match self {
            Source::Local(mirror) => {
                let t = mirror.route(repo.as_str(), Some(upstream))?;
                mirror.cache_blob(&t, digest, on_progress).await
            }
            Source::Server(s) => s.blob(upstream, repo, digest, on_progress).await,
        }
    }

    /// The manifests that name `digest` as their subject. A registry without the referrers API
    /// (404) and an offline mirror have none to offer.
    pub async fn referrers(
        &self,
        upstream: &str,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Vec<Descriptor>, Error> {
        let body = match self {
            Source::Local(mirror) => {
                let t = mirror.route(repo.as_str(), Some(upstream))?;
                let path = format!("/v2/{}/referrers/{digest}", t.repo);
                match mirror.passthrough(&t, Op::Referrers, path).await {
                    Ok(p) => p.body.clone(),
                    Err(e) if absent(&e) => return Ok(Vec::new()),
                    Err(e) => return Err(e),
                }
            }
            Source::Server(s) => {
                let path = format!("/v2/{repo}/referrers/{digest}{}", ns(upstream));
                match s.get_small(repo, &path, manifest::OCI_INDEX).await {
                    Ok((_, body)) => body,
                    Err(e) if absent(&e) => return Ok(Vec::new()),
                    Err(e) => return Err(e),
                }
            }
        };
        match descriptor::parse_refs(manifest::OCI_INDEX, &body) {
            Ok(Refs::Index(list)) => Ok(list),
            Ok(_) => Ok(Vec::new()),
            Err(e) => Err(Error::upstream(
                upstream,
                UpstreamFault::Protocol(format!("referrers of {digest}: {e}")),
            )),
        }
    }
}

fn absent(e: &Error) -> bool {
    e.upstream_status() == Some(StatusCode::NOT_FOUND)
        || matches!(e.cause(), Error::Client(o) if o.status == StatusCode::NOT_FOUND)
        || matches!(
            e.cause(),
            Error::Upstream {
                fault: UpstreamFault::Offline,
                ..
            }
        )
}

fn ns(upstream: &str) -> String {
    let q: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("ns", upstream)
        .finish();
    format!("?{q}")
}

/// Where this config's server answers: `server.listen`, with an unspecified address replaced
/// by loopback.
pub fn server_url(config: &Config) -> String {
    let mut addr: SocketAddr = config.server.listen;
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => addr.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        IpAddr::V6(ip) if ip.is_unspecified() => addr.set_ip(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        _ => {}
    }
    let scheme = if config.server.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://{addr}")
}

// === impl ServerClient ===

/// The name errors from the running server carry.
const SERVER: &str = "running cachalot";

impl ServerClient {
    fn new(url: &str, root: PathBuf, metrics: Arc<Metrics>) -> Result<ServerClient, Error> {
        let mut cfg = UpstreamConfig::new(SERVER, url);
        // A fill behind the server may wait on a slow upstream before its first byte.
        cfg.timeout = crate::config::Dur(std::time::Duration::from_secs(120));
        Ok(ServerClient {
            client: Upstream::new(&cfg, metrics)?,
            root,
            url: url.to_owned(),
        })
    }

    async fn ping(&self) -> Result<(), Error> {
        let repo = RepoName::parse("ping").expect("valid name");
        let resp = self
            .client
            .send(UpstreamRequest {
                method: Method::GET,
                op: Op::Ping,
                repo: &repo,
                path_and_query: "/v2/".into(),
                accept: None,
                range: None,
            })
            .await?;
        if !resp.status().is_success() {
            return Err(self.client.status_error(&resp));
        }
        Ok(())
    }

    /// A small body, whole (capped like a manifest), and the response headers.
    async fn get_small(
        &self,
        repo: &RepoName,
        path: &str,
        accept: &str,
    ) -> Result<(http::HeaderMap, Bytes), Error> {
        let resp = self
            .client
            .send(UpstreamRequest {
                method: Method::GET,
                op: Op::Manifest,
                repo,
                path_and_query: path.to_owned(),
                accept: Some(accept.to_owned()),
                range: None,
            })
            .await?;
        if !resp.status().is_success() {
            return Err(server_error(resp).await);
        }
        let (parts, body) = resp.into_parts();
        let body = self.client.read_small(body, MAX_MANIFEST_SIZE).await?;
        Ok((parts.headers, body))
    }

    async fn manifest(
        &self,
        upstream: &str,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Fetched, Error> {
        let path = format!("/v2/{repo}/manifests/{reference}{}", ns(upstream));
        let (headers, bytes) = self.get_small(repo, &path, ALL_MANIFEST_TYPES).await?;
        let requested = match reference {
            Reference::Digest(d) => Some(d),
            Reference::Tag(_) => None,
        };
        let checked = manifest::verify(&bytes, &headers, requested)
            .map_err(|e| Error::upstream(SERVER, e.into()))?;
        Ok(Fetched {
            digest: checked.digest().clone(),
            media_type: checked.media_type,
            bytes,
        })
    }

    async fn blob(
        &self,
        upstream: &str,
        repo: &RepoName,
        digest: &Digest,
        mut on_progress: impl FnMut(u64),
    ) -> Result<u64, Error> {
        let resp = self
            .client
            .send(UpstreamRequest {
                method: Method::GET,
                op: Op::Blob,
                repo,
                path_and_query: format!("/v2/{repo}/blobs/{digest}{}", ns(upstream)),
                accept: None,
                range: None,
            })
            .await?;
        if !resp.status().is_success() {
            return Err(server_error(resp).await);
        }
        // The server holds back the last byte until the digest matched, so a complete body is
        // a verified one; the commit (fsync, rename) finishes just after, and is awaited below.
        let mut body = resp.into_body();
        let mut n = 0u64;
        loop {
            let frame = tokio::time::timeout(self.client.body_timeout(), body.frame())
                .await
                .map_err(|_| {
                    Error::upstream(SERVER, UpstreamFault::Timeout("waiting for a blob body"))
                })?;
            match frame {
                None => break,
                Some(Err(e)) => return Err(protocol(format!("blob {digest}: body: {e}"))),
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        n += d.len() as u64;
                        on_progress(n);
                    }
                }
            }
        }
        let path = FsStore::blob_path_in(&self.root, digest);
        let deadline = tokio::time::Instant::now() + self.client.body_timeout();
        while !path.exists() {
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Internal(format!(
                    "blob {digest}: the running cachalot served it but did not store it (see its log)"
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        Ok(n)
    }
}

fn protocol(m: String) -> Error {
    Error::upstream(SERVER, UpstreamFault::Protocol(m))
}

/// The server's OCI error message, which already names the upstream and what went wrong.
async fn server_error(resp: http::Response<crate::upstream::UpstreamBody>) -> Error {
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let message = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["errors"][0]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "no error message".into());
    Error::Client(
        OciError::new(
            ErrorCode::Unknown,
            format!("{SERVER} answered {status}: {message}"),
        )
        .with_status(status),
    )
}
