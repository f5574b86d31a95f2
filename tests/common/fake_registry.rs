//! An in-process fake OCI registry (and a fake blob CDN) that tests start on 127.0.0.1:0.
//!
//! It serves the pull side of the distribution spec from memory, counts every request it
//! receives, and can lie on demand: wrong bytes for a digest, truncated or slow bodies, a body
//! that pauses mid-way until the test releases it, 429/5xx answers, a stopped listener
//! (connection refused on a known port), token and Basic auth (credentials that can be rotated,
//! and an OAuth2 refresh-token exchange at the realm, as ACR's), private repositories, 307
//! redirects of blob GETs to a second server (the "CDN") that rejects any `Authorization`, and
//! a path prefix everything lives under (`/artifactory/api/docker/<repo>/v2/...`).
//!
//! Dropping a [`FakeRegistry`] or [`FakeCdn`] stops it.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use sha2::{Digest as _, Sha256};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema 2 manifest media type.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list media type.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// OCI image config media type.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI layer media type.
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// Size of the chunks the fake writes bodies in.
const CHUNK: usize = 16 * 1024;

type RespBody = BoxBody<Bytes, std::io::Error>;
type Handler = Arc<
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<RespBody>> + Send>>
        + Send
        + Sync,
>;

// === content helpers ===

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

static SEED: AtomicU64 = AtomicU64::new(0x9e37_79b9_7f4a_7c15);

/// `n` pseudo-random bytes; every call returns different content.
pub fn random_blob(n: usize) -> Bytes {
    let mut x =
        SEED.fetch_add(0x2545_f491_4f6c_dd1d, Ordering::Relaxed) ^ u64::from(std::process::id());
    if x == 0 {
        x = 1;
    }
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    Bytes::from(out)
}

/// A manifest as stored in the fake: its exact bytes, media type and digest.
#[derive(Clone, Debug)]
pub struct Manifest {
    /// Exact bytes.
    pub bytes: Bytes,
    /// Media type (the `Content-Type` served).
    pub media_type: String,
    /// `sha256:<hex>` of `bytes`.
    pub digest: String,
}

impl Manifest {
    /// A manifest with the given bytes and media type.
    pub fn new(media_type: &str, bytes: impl Into<Bytes>) -> Manifest {
        let bytes = bytes.into();
        Manifest {
            digest: sha256_digest(&bytes),
            media_type: media_type.to_string(),
            bytes,
        }
    }
}

/// An image pushed with [`FakeRegistry::push_image`].
#[derive(Clone, Debug)]
pub struct Image {
    /// The image manifest.
    pub manifest: Manifest,
    /// Config blob (digest, bytes).
    pub config: (String, Bytes),
    /// Layer blobs (digest, bytes).
    pub layers: Vec<(String, Bytes)>,
}

fn descriptor(media_type: &str, digest: &str, size: usize) -> serde_json::Value {
    json!({"mediaType": media_type, "digest": digest, "size": size})
}

// === a running hyper server ===

struct ServerHandle {
    task: JoinHandle<()>,
}

impl ServerHandle {
    fn spawn(listener: TcpListener, handler: Handler) -> ServerHandle {
        let task = tokio::spawn(async move {
            // Connection tasks live in this set: aborting the accept task drops the set, which
            // aborts every connection, so a stopped server really is gone.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let handler = handler.clone();
                        conns.spawn(async move {
                            let svc = hyper::service::service_fn(move |req| {
                                let handler = handler.clone();
                                async move { Ok::<_, Infallible>(handler(req).await) }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), svc)
                                .await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        ServerHandle { task }
    }

    async fn stop(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// === recorded requests ===

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// Method.
    pub method: Method,
    /// Path without the query.
    pub path: String,
    /// Raw query string, if any.
    pub query: Option<String>,
    /// Request headers.
    pub headers: HeaderMap,
    /// Status the fake answered (None while the handler is still deciding).
    pub status: Option<u16>,
}

// === faults ===

/// A gate that pauses a blob body after `at` bytes until the test releases it.
#[derive(Clone)]
pub struct Gate {
    at: usize,
    reached: Arc<watch::Sender<bool>>,
    released: Arc<watch::Sender<bool>>,
}

impl Gate {
    fn new(at: usize) -> Gate {
        Gate {
            at,
            reached: Arc::new(watch::channel(false).0),
            released: Arc::new(watch::channel(false).0),
        }
    }

    /// Waits until the fake has sent the first `at` bytes of a body and is paused.
    pub async fn reached(&self) {
        let mut rx = self.reached.subscribe();
        let _ = rx.wait_for(|v| *v).await;
    }

    /// Whether a body has reached the pause point.
    pub fn is_reached(&self) -> bool {
        *self.reached.borrow()
    }

    /// Whether the test released the gate.
    pub fn is_released(&self) -> bool {
        *self.released.borrow()
    }

    /// Lets every paused (and future) body continue.
    pub fn release(&self) {
        self.released.send_replace(true);
    }
}

/// A status the fake answers instead of the real response.
#[derive(Clone, Debug)]
pub struct StatusFault {
    /// HTTP status.
    pub status: u16,
    /// `Retry-After` seconds to send, if any.
    pub retry_after: Option<u32>,
    /// Only for requests whose path contains this.
    pub path_contains: Option<String>,
    /// Only for this method.
    pub method: Option<Method>,
}

impl StatusFault {
    /// Answer every /v2 request with `status`.
    pub fn all(status: u16) -> StatusFault {
        StatusFault {
            status,
            retry_after: None,
            path_contains: None,
            method: None,
        }
    }

    /// 429 with `Retry-After: secs` on every /v2 request.
    pub fn too_many_requests(secs: u32) -> StatusFault {
        StatusFault {
            retry_after: Some(secs),
            ..StatusFault::all(429)
        }
    }

    /// Restrict to paths containing `s`.
    pub fn on_path(mut self, s: &str) -> StatusFault {
        self.path_contains = Some(s.to_string());
        self
    }

    /// Restrict to one method.
    pub fn on_method(mut self, m: Method) -> StatusFault {
        self.method = Some(m);
        self
    }
}

/// How the fake answers the referrers API.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReferrersApi {
    /// The spec's API, filtering on `artifactType`.
    #[default]
    Full,
    /// The API, ignoring `artifactType` (and not saying it filtered).
    Unfiltered,
    /// No such API: a plain-text 404, as distribution 2.8 answers any unknown route.
    Missing,
    /// At most this many referrers per answer, with a `Link` to the next page (`n`, `last`).
    Paged(usize),
    /// A 200 whose body is not JSON.
    Garbage,
}

/// Token (Bearer) auth settings.
#[derive(Clone, Debug)]
pub struct TokenAuth {
    /// How long the fake accepts a token after issuing it.
    pub token_lifetime: Duration,
    /// `expires_in` reported to the client (seconds).
    pub expires_in: u64,
    /// Credentials the token endpoint requires (None: anonymous allowed).
    pub required_credentials: Option<(String, String)>,
}

impl Default for TokenAuth {
    fn default() -> Self {
        TokenAuth {
            token_lifetime: Duration::from_secs(300),
            expires_in: 300,
            required_credentials: None,
        }
    }
}

#[derive(Clone, Debug)]
enum AuthMode {
    None,
    Token(TokenAuth),
    Basic(String, String),
}

struct IssuedToken {
    expires: Instant,
    scopes: Vec<String>,
    authenticated: bool,
}

#[derive(Default)]
struct Repo {
    blobs: HashMap<String, Bytes>,
    manifests: HashMap<String, Manifest>,
    tags: BTreeMap<String, String>,
}

struct State {
    addr: SocketAddr,
    repos: Mutex<HashMap<String, Repo>>,
    log: Mutex<Vec<Recorded>>,
    corrupt: Mutex<HashSet<String>>,
    truncate: Mutex<HashMap<String, usize>>,
    gates: Mutex<HashMap<String, Gate>>,
    chunk_delay: Mutex<Option<Duration>>,
    status_fault: Mutex<Option<StatusFault>>,
    auth: Mutex<AuthMode>,
    tokens: Mutex<HashMap<String, IssuedToken>>,
    private: Mutex<HashMap<String, u16>>,
    redirect: Mutex<Option<String>>,
    token_seq: AtomicU64,
    manifest_delay: Mutex<Option<Duration>>,
    extra_headers: Mutex<Vec<(String, String)>>,
    /// Requests being answered (until their response body is sent or dropped), and the most
    /// there ever were at once.
    in_flight: Arc<AtomicU64>,
    max_in_flight: Arc<AtomicU64>,
    /// While true, requests are recorded and then left unanswered.
    hang: watch::Sender<bool>,
    /// Tags lists answered in pages of this many when the client gives no `n` (as Docker Hub
    /// and GHCR do), with a `Link` to the next.
    tags_page_size: Mutex<Option<usize>>,
    /// Every tags list request answered with this `Link` (when given) and body instead.
    tags_override: Mutex<Option<(Option<String>, Bytes)>>,
    /// Everything (the API and the token realm) lives under this path; other paths are 404.
    prefix: Mutex<Option<String>>,
    /// The refresh token the realm exchanges in an OAuth2 POST (`grant_type=refresh_token`).
    refresh_token: Mutex<Option<String>>,
    referrers_api: Mutex<ReferrersApi>,
}

fn lock<T>(m: &Mutex<T>) -> parking_lot::MutexGuard<'_, T> {
    m.lock()
}

// === FakeRegistry ===

/// The fake registry. Drop stops it.
pub struct FakeRegistry {
    state: Arc<State>,
    server: tokio::sync::Mutex<Option<ServerHandle>>,
}

impl FakeRegistry {
    /// Starts a fake registry on 127.0.0.1:0.
    pub async fn start() -> FakeRegistry {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake registry");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            addr,
            repos: Mutex::default(),
            log: Mutex::default(),
            corrupt: Mutex::default(),
            truncate: Mutex::default(),
            gates: Mutex::default(),
            chunk_delay: Mutex::default(),
            status_fault: Mutex::default(),
            auth: Mutex::new(AuthMode::None),
            tokens: Mutex::default(),
            private: Mutex::default(),
            redirect: Mutex::default(),
            token_seq: AtomicU64::new(1),
            extra_headers: Mutex::new(Vec::new()),
            manifest_delay: Mutex::default(),
            in_flight: Arc::default(),
            max_in_flight: Arc::default(),
            hang: watch::channel(false).0,
            prefix: Mutex::default(),
            refresh_token: Mutex::default(),
            tags_page_size: Mutex::default(),
            tags_override: Mutex::default(),
            referrers_api: Mutex::default(),
        });
        let server = ServerHandle::spawn(listener, registry_handler(state.clone()));
        FakeRegistry {
            state,
            server: tokio::sync::Mutex::new(Some(server)),
        }
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.state.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.state.addr)
    }

    /// Stops listening: new connections are refused, open ones are dropped. The port stays known.
    pub async fn stop(&self) {
        if let Some(s) = self.server.lock().await.take() {
            s.stop().await;
        }
    }

    /// Listens again on the same port after [`stop`](Self::stop).
    pub async fn restart(&self) {
        let mut guard = self.server.lock().await;
        if guard.is_some() {
            return;
        }
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(self.state.addr).await {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("rebind fake registry on {}: {e}", self.state.addr),
            }
        };
        *guard = Some(ServerHandle::spawn(
            listener,
            registry_handler(self.state.clone()),
        ));
    }

    // --- content ---

    /// Stores a blob in `repo`; returns its digest.
    pub fn push_blob(&self, repo: &str, bytes: impl Into<Bytes>) -> String {
        let bytes = bytes.into();
        let digest = sha256_digest(&bytes);
        lock(&self.state.repos)
            .entry(repo.to_string())
            .or_default()
            .blobs
            .insert(digest.clone(), bytes);
        digest
    }

    /// Stores a manifest in `repo` (by digest only).
    pub fn push_manifest(&self, repo: &str, m: &Manifest) {
        lock(&self.state.repos)
            .entry(repo.to_string())
            .or_default()
            .manifests
            .insert(m.digest.clone(), m.clone());
    }

    /// Points `repo:tag` at `digest`.
    pub fn set_tag(&self, repo: &str, tag: &str, digest: &str) {
        lock(&self.state.repos)
            .entry(repo.to_string())
            .or_default()
            .tags
            .insert(tag.to_string(), digest.to_string());
    }

    /// Removes a tag.
    pub fn delete_tag(&self, repo: &str, tag: &str) {
        if let Some(r) = lock(&self.state.repos).get_mut(repo) {
            r.tags.remove(tag);
        }
    }

    /// Pushes an OCI image with a random config and random layers of the given sizes; tags it
    /// if `tag` is given.
    pub fn push_image(&self, repo: &str, tag: Option<&str>, layer_sizes: &[usize]) -> Image {
        self.push_image_as(repo, tag, layer_sizes, false)
    }

    /// Like [`push_image`](Self::push_image) but a Docker schema 2 manifest.
    pub fn push_docker_image(&self, repo: &str, tag: Option<&str>, layer_sizes: &[usize]) -> Image {
        self.push_image_as(repo, tag, layer_sizes, true)
    }

    /// Pushes an OCI image with a random config and these layers (so that images in several
    /// repositories can share a layer); tags it if `tag` is given.
    pub fn push_image_with(&self, repo: &str, tag: Option<&str>, layers: &[Bytes]) -> Image {
        self.push_image_bytes(repo, tag, layers.to_vec(), false)
    }

    fn push_image_as(
        &self,
        repo: &str,
        tag: Option<&str>,
        layer_sizes: &[usize],
        docker: bool,
    ) -> Image {
        let layers = layer_sizes.iter().map(|&n| random_blob(n)).collect();
        self.push_image_bytes(repo, tag, layers, docker)
    }

    fn push_image_bytes(
        &self,
        repo: &str,
        tag: Option<&str>,
        layers: Vec<Bytes>,
        docker: bool,
    ) -> Image {
        let nonce = hex::encode(random_blob(8));
        let config = Bytes::from(
            serde_json::to_vec(&json!({
                "architecture": "amd64", "os": "linux", "nonce": nonce,
                "rootfs": {"type": "layers", "diff_ids": []}
            }))
            .unwrap(),
        );
        let config_digest = self.push_blob(repo, config.clone());
        let layers: Vec<(String, Bytes)> = layers
            .into_iter()
            .map(|b| (self.push_blob(repo, b.clone()), b))
            .collect();
        let (mt, config_mt, layer_mt) = if docker {
            (
                DOCKER_MANIFEST,
                "application/vnd.docker.container.image.v1+json",
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
            )
        } else {
            (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER)
        };
        let body = json!({
            "schemaVersion": 2,
            "mediaType": mt,
            "config": descriptor(config_mt, &config_digest, config.len()),
            "layers": layers.iter().map(|(d, b)| descriptor(layer_mt, d, b.len())).collect::<Vec<_>>(),
        });
        let manifest = Manifest::new(mt, serde_json::to_vec_pretty(&body).unwrap());
        self.push_manifest(repo, &manifest);
        if let Some(t) = tag {
            self.set_tag(repo, t, &manifest.digest);
        }
        Image {
            manifest,
            config: (config_digest, config),
            layers,
        }
    }

    /// Pushes a multi-arch index (OCI index, or Docker manifest list if `docker`) over `images`
    /// (which must already be in `repo`); tags it if `tag` is given.
    pub fn push_index(
        &self,
        repo: &str,
        tag: Option<&str>,
        images: &[&Image],
        docker: bool,
    ) -> Manifest {
        let archs = ["amd64", "arm64", "s390x", "ppc64le", "riscv64"];
        let mt = if docker { DOCKER_LIST } else { OCI_INDEX };
        let entries: Vec<_> = images
            .iter()
            .enumerate()
            .map(|(i, img)| {
                let mut d = descriptor(
                    &img.manifest.media_type,
                    &img.manifest.digest,
                    img.manifest.bytes.len(),
                );
                d["platform"] = json!({"architecture": archs[i % archs.len()], "os": "linux"});
                d
            })
            .collect();
        let body = json!({"schemaVersion": 2, "mediaType": mt, "manifests": entries});
        let m = Manifest::new(mt, serde_json::to_vec_pretty(&body).unwrap());
        self.push_manifest(repo, &m);
        if let Some(t) = tag {
            self.set_tag(repo, t, &m.digest);
        }
        m
    }

    /// Pushes an artifact manifest whose `subject` is `subject` (for the referrers API).
    pub fn push_referrer(&self, repo: &str, subject: &Manifest, artifact_type: &str) -> Manifest {
        let cfg = Bytes::from_static(b"{}");
        let cfg_digest = self.push_blob(repo, cfg.clone());
        let layer = random_blob(64);
        let layer_digest = self.push_blob(repo, layer.clone());
        let body = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": descriptor("application/vnd.oci.empty.v1+json", &cfg_digest, cfg.len()),
            "layers": [descriptor("application/octet-stream", &layer_digest, layer.len())],
            "subject": descriptor(&subject.media_type, &subject.digest, subject.bytes.len()),
            "annotations": {"org.example.kind": artifact_type},
        });
        let m = Manifest::new(OCI_MANIFEST, serde_json::to_vec_pretty(&body).unwrap());
        self.push_manifest(repo, &m);
        m
    }

    /// Headers added to every response from now on (e.g. Docker Hub's `ratelimit-remaining`).
    pub fn set_extra_headers(&self, headers: &[(&str, &str)]) {
        *lock(&self.state.extra_headers) = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    /// Pages tags lists by `size` when the client gives no `n` (None: the whole list at once,
    /// as distribution does).
    pub fn set_tags_page_size(&self, size: Option<usize>) {
        *lock(&self.state.tags_page_size) = size;
    }

    /// Answers every tags list with this `Link` header (if any) and body (None: behave).
    pub fn set_tags_override(&self, answer: Option<(Option<&str>, &[u8])>) {
        *lock(&self.state.tags_override) =
            answer.map(|(l, b)| (l.map(str::to_owned), Bytes::copy_from_slice(b)));
    }

    // --- counters ---

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.state.log).clone()
    }

    /// Total number of requests received.
    pub fn total(&self) -> usize {
        lock(&self.state.log).len()
    }

    /// Requests with this method and exact path (no query).
    pub fn count(&self, method: &str, path: &str) -> usize {
        lock(&self.state.log)
            .iter()
            .filter(|r| r.method.as_str() == method && r.path == path)
            .count()
    }

    /// Requests with this method whose path contains `needle`.
    pub fn count_containing(&self, method: &str, needle: &str) -> usize {
        lock(&self.state.log)
            .iter()
            .filter(|r| r.method.as_str() == method && r.path.contains(needle))
            .count()
    }

    /// GETs of `/v2/<repo>/blobs/<digest>`.
    pub fn blob_gets(&self, repo: &str, digest: &str) -> usize {
        self.count("GET", &format!("/v2/{repo}/blobs/{digest}"))
    }

    /// HEADs of `/v2/<repo>/blobs/<digest>`.
    pub fn blob_heads(&self, repo: &str, digest: &str) -> usize {
        self.count("HEAD", &format!("/v2/{repo}/blobs/{digest}"))
    }

    /// GETs of `/v2/<repo>/manifests/<reference>`.
    pub fn manifest_gets(&self, repo: &str, reference: &str) -> usize {
        self.count("GET", &format!("/v2/{repo}/manifests/{reference}"))
    }

    /// HEADs of `/v2/<repo>/manifests/<reference>`.
    pub fn manifest_heads(&self, repo: &str, reference: &str) -> usize {
        self.count("HEAD", &format!("/v2/{repo}/manifests/{reference}"))
    }

    /// Requests with this method whose path contains `needle` and that the fake answered with `status`.
    pub fn count_status(&self, method: &str, needle: &str, status: u16) -> usize {
        lock(&self.state.log)
            .iter()
            .filter(|r| {
                r.method.as_str() == method && r.path.contains(needle) && r.status == Some(status)
            })
            .count()
    }

    /// Requests for anything under `/v2/<repo>/`.
    pub fn repo_requests(&self, repo: &str) -> usize {
        let p = format!("/v2/{repo}/");
        lock(&self.state.log)
            .iter()
            .filter(|r| r.path.starts_with(&p))
            .count()
    }

    /// The most requests the fake was answering at once (a response counts until its body has
    /// been sent or dropped).
    pub fn max_in_flight(&self) -> u64 {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// Requests being answered now.
    pub fn in_flight(&self) -> u64 {
        self.state.in_flight.load(Ordering::SeqCst)
    }

    /// Forgets the request log.
    pub fn reset_counts(&self) {
        lock(&self.state.log).clear();
    }

    // --- faults ---

    /// Serve wrong bytes for `digest` (blob: same length, bytes flipped; manifest: a byte added).
    pub fn corrupt(&self, digest: &str, on: bool) {
        let mut c = lock(&self.state.corrupt);
        if on {
            c.insert(digest.to_string());
        } else {
            c.remove(digest);
        }
    }

    /// Blob GETs of `digest` send `after` bytes (of a declared full Content-Length), then abort.
    pub fn truncate(&self, digest: &str, after: Option<usize>) {
        let mut t = lock(&self.state.truncate);
        match after {
            Some(n) => t.insert(digest.to_string(), n),
            None => t.remove(digest),
        };
    }

    /// Blob GETs of `digest` pause after `at` bytes until the returned gate is released.
    pub fn pause_blob(&self, digest: &str, at: usize) -> Gate {
        let g = Gate::new(at);
        lock(&self.state.gates).insert(digest.to_string(), g.clone());
        g
    }

    /// Removes a pause gate (releasing it first).
    pub fn unpause_blob(&self, digest: &str) {
        if let Some(g) = lock(&self.state.gates).remove(digest) {
            g.release();
        }
    }

    /// Sleep this long between 16 KiB chunks of every blob body.
    pub fn set_chunk_delay(&self, d: Option<Duration>) {
        *lock(&self.state.chunk_delay) = d;
    }

    /// While `on`, every request is recorded and then left unanswered on its open connection
    /// (an upstream that accepts and hangs). Turning it off answers the ones still waiting.
    pub fn set_hang(&self, on: bool) {
        self.state.hang.send_replace(on);
    }

    /// Sleep this long before answering any manifest request.
    pub fn set_manifest_delay(&self, d: Option<Duration>) {
        *lock(&self.state.manifest_delay) = d;
    }

    /// Answer matching /v2 requests with a status instead (None: behave).
    pub fn set_status_fault(&self, f: Option<StatusFault>) {
        *lock(&self.state.status_fault) = f;
    }

    /// Require Docker-style token auth.
    pub fn set_token_auth(&self, t: TokenAuth) {
        *lock(&self.state.auth) = AuthMode::Token(t);
    }

    /// Require HTTP Basic auth on every /v2 request.
    pub fn set_basic_auth(&self, user: &str, pass: &str) {
        *lock(&self.state.auth) = AuthMode::Basic(user.to_string(), pass.to_string());
    }

    /// No auth (the default).
    pub fn clear_auth(&self) {
        *lock(&self.state.auth) = AuthMode::None;
    }

    /// Makes `repo` private: requests answer `status` (401 or 403) unless made with a token
    /// that was issued against valid credentials.
    pub fn set_private(&self, repo: &str, status: u16) {
        lock(&self.state.private).insert(repo.to_string(), status);
    }

    /// Redirect blob GETs (307) to this CDN (None: serve them directly).
    pub fn redirect_blobs_to(&self, cdn: Option<&FakeCdn>) {
        *lock(&self.state.redirect) = cdn.map(|c| c.url());
    }

    /// Number of requests to the token realm so far (each issues a token or is refused).
    pub fn tokens_issued(&self) -> usize {
        self.token_requests().len()
    }

    /// The requests made to the token realm, in order.
    pub fn token_requests(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == "/token" || r.path.ends_with("/v2/token"))
            .collect()
    }

    /// Serves everything under `prefix` (`/artifactory/api/docker/docker-remote`), as a
    /// repository manager does: `/v2/` is `<prefix>/v2/`, the token realm `<prefix>/v2/token`,
    /// and any path outside the prefix is 404.
    pub fn set_path_prefix(&self, prefix: Option<&str>) {
        *lock(&self.state.prefix) = prefix.map(|p| p.trim_end_matches('/').to_string());
    }

    /// How the referrers API answers from now on.
    pub fn set_referrers_api(&self, api: ReferrersApi) {
        *lock(&self.state.referrers_api) = api;
    }

    /// With token auth, the realm also exchanges this refresh token (an identity token) for an
    /// authenticated token in an OAuth2 form POST, as ACR's `/oauth2/token` does; any other
    /// refresh token is refused with 401.
    pub fn set_refresh_token(&self, token: Option<&str>) {
        *lock(&self.state.refresh_token) = token.map(str::to_string);
    }
}

// === the registry handler ===

fn full(
    status: StatusCode,
    headers: &[(&str, String)],
    body: impl Into<Bytes>,
) -> Response<RespBody> {
    let body = body.into();
    let mut resp = Response::builder().status(status);
    for (k, v) in headers {
        resp = resp.header(*k, v.as_str());
    }
    resp = resp.header(header::CONTENT_LENGTH, body.len());
    resp.body(Full::new(body).map_err(|e: Infallible| match e {}).boxed())
        .unwrap()
}

fn oci_error(
    status: StatusCode,
    code: &str,
    msg: &str,
    extra: &[(&str, String)],
) -> Response<RespBody> {
    let body =
        serde_json::to_vec(&json!({"errors": [{"code": code, "message": msg, "detail": null}]}))
            .unwrap();
    let mut h = vec![("content-type", "application/json".to_string())];
    h.extend(extra.iter().cloned());
    full(status, &h, body)
}

fn with_api_version(mut r: Response<RespBody>) -> Response<RespBody> {
    r.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    r
}

/// Body fed from a channel; an `Err` item aborts the response mid-way.
struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }
}

struct StreamPlan {
    bytes: Bytes,
    truncate_after: Option<usize>,
    gate: Option<Gate>,
    delay: Option<Duration>,
}

fn stream_body(plan: StreamPlan) -> RespBody {
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(async move {
        let end = plan
            .truncate_after
            .map_or(plan.bytes.len(), |n| n.min(plan.bytes.len()));
        let mut pos = 0;
        let mut gate_done = plan.gate.is_none();
        loop {
            if !gate_done {
                let g = plan.gate.as_ref().unwrap();
                if pos >= g.at.min(end) {
                    g.reached.send_replace(true);
                    let mut rel = g.released.subscribe();
                    let _ = rel.wait_for(|v| *v).await;
                    gate_done = true;
                }
            }
            if pos >= end {
                break;
            }
            let mut next = (pos + CHUNK).min(end);
            if !gate_done {
                let at = plan.gate.as_ref().unwrap().at;
                if pos < at {
                    next = next.min(at);
                }
            }
            if tx.send(Ok(plan.bytes.slice(pos..next))).await.is_err() {
                return;
            }
            pos = next;
            if let Some(d) = plan.delay {
                tokio::time::sleep(d).await;
            }
        }
        if plan.truncate_after.is_some() {
            // Let the bytes already queued go out, then abort: the client sees a short body.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = tx
                .send(Err(std::io::Error::other("fake registry: truncated body")))
                .await;
        }
    });
    ChannelBody { rx }.boxed()
}

fn registry_handler(state: Arc<State>) -> Handler {
    Arc::new(move |req: Request<Incoming>| {
        let state = state.clone();
        Box::pin(async move { with_api_version(handle(&state, req).await) })
    })
}

fn parse_query(q: Option<&str>) -> Vec<(String, String)> {
    q.map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

enum Route {
    Base,
    Manifest(String, String),
    Blob(String, String),
    Tags(String),
    Referrers(String, String),
    Token,
    Unknown,
}

fn route(path: &str) -> Route {
    if path == "/v2/" || path == "/v2" {
        return Route::Base;
    }
    if path == "/token" || path == "/v2/token" {
        return Route::Token;
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Route::Unknown;
    };
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Route::Tags(name.to_string());
    }
    for (kw, f) in [
        (
            "/manifests/",
            Route::Manifest as fn(String, String) -> Route,
        ),
        ("/blobs/", Route::Blob),
        ("/referrers/", Route::Referrers),
    ] {
        if let Some(i) = rest.rfind(kw) {
            let name = &rest[..i];
            let r = &rest[i + kw.len()..];
            if !name.is_empty() && !r.is_empty() && !r.contains('/') {
                return f(name.to_string(), r.to_string());
            }
        }
    }
    Route::Unknown
}

fn repo_of(r: &Route) -> Option<&str> {
    match r {
        Route::Manifest(n, _) | Route::Blob(n, _) | Route::Tags(n) | Route::Referrers(n, _) => {
            Some(n)
        }
        _ => None,
    }
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let b64 = v
        .strip_prefix("Basic ")
        .or_else(|| v.strip_prefix("basic "))?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let s = String::from_utf8(raw).ok()?;
    let (u, p) = s.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    v.strip_prefix("Bearer ").map(|s| s.trim().to_string())
}

/// Counts a request as in flight until dropped (with its response body).
struct InFlight(Arc<AtomicU64>);

impl InFlight {
    fn new(state: &State) -> InFlight {
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(state.in_flight.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its request counted as in flight until it is done.
struct CountedBody {
    inner: RespBody,
    _in_flight: InFlight,
}

impl Body for CountedBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

async fn handle(state: &State, req: Request<Incoming>) -> Response<RespBody> {
    let in_flight = InFlight::new(state);
    let index = {
        let mut log = lock(&state.log);
        log.push(Recorded {
            method: req.method().clone(),
            path: req.uri().path().to_string(),
            query: req.uri().query().map(str::to_string),
            headers: req.headers().clone(),
            status: None,
        });
        log.len() - 1
    };
    let mut hang = state.hang.subscribe();
    let _ = hang.wait_for(|h| !*h).await;
    let mut resp = handle_inner(state, req).await;
    for (k, v) in lock(&state.extra_headers).iter() {
        if let (Ok(k), Ok(v)) = (
            header::HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            resp.headers_mut().insert(k, v);
        }
    }
    if let Some(r) = lock(&state.log).get_mut(index) {
        r.status = Some(resp.status().as_u16());
    }
    resp.map(|inner| {
        CountedBody {
            inner,
            _in_flight: in_flight,
        }
        .boxed()
    })
}

async fn handle_inner(state: &State, req: Request<Incoming>) -> Response<RespBody> {
    let method = req.method().clone();
    let full_path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let headers = req.headers().clone();
    let prefix = lock(&state.prefix).clone();
    let path = match &prefix {
        None => full_path,
        Some(p) => match full_path.strip_prefix(p.as_str()) {
            Some(rest) if rest.starts_with('/') => rest.to_string(),
            _ => {
                return oci_error(
                    StatusCode::NOT_FOUND,
                    "NAME_UNKNOWN",
                    "fake: not under the path prefix",
                    &[],
                );
            }
        },
    };
    let route = route(&path);

    if matches!(route, Route::Token) {
        if method == Method::POST {
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return oauth2_token_endpoint(state, &body);
        }
        return token_endpoint(state, &headers, query.as_deref());
    }
    if matches!(route, Route::Unknown) {
        return oci_error(
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            "fake: no such route",
            &[],
        );
    }
    if method != Method::GET && method != Method::HEAD {
        return oci_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            "fake: read only",
            &[],
        );
    }

    // Status faults come first: a rate-limited or broken registry says so before auth.
    let fault = lock(&state.status_fault).clone();
    if let Some(f) = fault {
        let path_ok = f.path_contains.as_deref().is_none_or(|s| path.contains(s));
        let method_ok = f.method.as_ref().is_none_or(|m| *m == method);
        if path_ok && method_ok {
            let mut extra = vec![];
            if let Some(s) = f.retry_after {
                extra.push(("retry-after", s.to_string()));
            }
            let status = StatusCode::from_u16(f.status).unwrap();
            let code = if f.status == 429 {
                "TOOMANYREQUESTS"
            } else {
                "UNAVAILABLE"
            };
            return oci_error(status, code, "fake: injected failure", &extra);
        }
    }

    // Auth.
    let repo = repo_of(&route).map(str::to_string);
    let auth = lock(&state.auth).clone();
    let private = repo
        .as_ref()
        .and_then(|r| lock(&state.private).get(r).copied());
    let mut authenticated = false;
    let mut deny_challenge = "Basic realm=\"fake-registry\"".to_string();
    match &auth {
        AuthMode::None => {}
        AuthMode::Basic(u, p) => {
            if basic_credentials(&headers) != Some((u.clone(), p.clone())) {
                return oci_error(
                    StatusCode::UNAUTHORIZED,
                    "UNAUTHORIZED",
                    "fake: basic auth required",
                    &[(
                        "www-authenticate",
                        "Basic realm=\"fake-registry\"".to_string(),
                    )],
                );
            }
            authenticated = true;
        }
        AuthMode::Token(_) => {
            let scope = repo.as_ref().map(|r| format!("repository:{r}:pull"));
            let challenge = |err: Option<&str>| {
                let realm = match &prefix {
                    Some(p) => format!("http://{}{p}/v2/token", state.addr),
                    None => format!("http://{}/token", state.addr),
                };
                let mut c = format!("Bearer realm=\"{realm}\",service=\"fake-registry\"");
                if let Some(s) = &scope {
                    c.push_str(&format!(",scope=\"{s}\""));
                }
                if let Some(e) = err {
                    c.push_str(&format!(",error=\"{e}\""));
                }
                c
            };
            let tok = bearer(&headers);
            let valid = tok.as_ref().and_then(|t| {
                let tokens = lock(&state.tokens);
                let it = tokens.get(t)?;
                if Instant::now() > it.expires {
                    return None;
                }
                if let Some(s) = &scope
                    && !it.scopes.iter().any(|x| x == s)
                {
                    return None;
                }
                Some(it.authenticated)
            });
            match valid {
                None => {
                    let err = tok.as_ref().map(|_| "invalid_token");
                    return oci_error(
                        StatusCode::UNAUTHORIZED,
                        "UNAUTHORIZED",
                        "fake: authentication required",
                        &[("www-authenticate", challenge(err))],
                    );
                }
                Some(a) => authenticated = a,
            }
            if private.is_some() && !authenticated {
                deny_challenge = challenge(Some("insufficient_scope"));
            }
        }
    }
    if let Some(st) = private.filter(|_| !authenticated) {
        if st == 403 {
            return oci_error(
                StatusCode::FORBIDDEN,
                "DENIED",
                "fake: private repository",
                &[],
            );
        }
        return oci_error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "fake: private repository",
            &[("www-authenticate", deny_challenge)],
        );
    }

    let head = method == Method::HEAD;
    match route {
        Route::Base => full(
            StatusCode::OK,
            &[("content-type", "application/json".into())],
            "{}",
        ),
        Route::Manifest(name, reference) => {
            let delay = *lock(&state.manifest_delay);
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            serve_manifest(state, &name, &reference, &headers, head)
        }
        Route::Blob(name, digest) => serve_blob(state, &name, &digest, head),
        Route::Tags(name) => serve_tags(state, &name, query.as_deref()),
        Route::Referrers(name, digest) => serve_referrers(state, &name, &digest, query.as_deref()),
        Route::Token | Route::Unknown => unreachable!(),
    }
}

fn token_endpoint(state: &State, headers: &HeaderMap, query: Option<&str>) -> Response<RespBody> {
    let AuthMode::Token(cfg) = lock(&state.auth).clone() else {
        return oci_error(
            StatusCode::NOT_FOUND,
            "UNSUPPORTED",
            "fake: no token auth",
            &[],
        );
    };
    let creds = basic_credentials(headers);
    let authenticated = match (&cfg.required_credentials, &creds) {
        (Some(req), Some(got)) if req == got => true,
        (Some(_), _) => {
            return oci_error(
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                "fake: bad credentials",
                &[],
            );
        }
        (None, Some(_)) => true,
        (None, None) => false,
    };
    let scopes: Vec<String> = parse_query(query)
        .into_iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' ').map(str::to_string).collect::<Vec<_>>())
        .collect();
    let n = state.token_seq.fetch_add(1, Ordering::Relaxed);
    let token = format!("faketoken-{n}-{}", hex::encode(random_blob(8)));
    lock(&state.tokens).insert(
        token.clone(),
        IssuedToken {
            expires: Instant::now() + cfg.token_lifetime,
            scopes,
            authenticated,
        },
    );
    let body = json!({"token": token, "access_token": token, "expires_in": cfg.expires_in});
    full(
        StatusCode::OK,
        &[("content-type", "application/json".into())],
        serde_json::to_vec(&body).unwrap(),
    )
}

/// Docker's OAuth2 exchange of an identity token (distribution's `fetchTokenWithOAuth`): a form
/// with `grant_type=refresh_token`, `refresh_token`, `client_id`, `service` and `scope`
/// (space-separated); the answer has `access_token`, as OAuth2's does.
fn oauth2_token_endpoint(state: &State, body: &[u8]) -> Response<RespBody> {
    let (AuthMode::Token(cfg), Some(expected)) = (
        lock(&state.auth).clone(),
        lock(&state.refresh_token).clone(),
    ) else {
        return oci_error(
            StatusCode::NOT_FOUND,
            "UNSUPPORTED",
            "fake: no OAuth2 exchange here",
            &[],
        );
    };
    let form: Vec<(String, String)> = form_urlencoded::parse(body).into_owned().collect();
    let get = |k: &str| form.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.as_str());
    let oauth_error = |status: StatusCode, error: &str| {
        full(
            status,
            &[("content-type", "application/json".into())],
            serde_json::to_vec(&json!({ "error": error })).unwrap(),
        )
    };
    if get("grant_type") != Some("refresh_token") || get("client_id").is_none() {
        return oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type");
    }
    if get("refresh_token") != Some(expected.as_str()) {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_grant");
    }
    let scopes: Vec<String> = get("scope")
        .unwrap_or("")
        .split(' ')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let n = state.token_seq.fetch_add(1, Ordering::Relaxed);
    let token = format!("fakeoauth-{n}-{}", hex::encode(random_blob(8)));
    lock(&state.tokens).insert(
        token.clone(),
        IssuedToken {
            expires: Instant::now() + cfg.token_lifetime,
            scopes,
            authenticated: true,
        },
    );
    let body = json!({"access_token": token, "expires_in": cfg.expires_in, "scope": get("scope")});
    full(
        StatusCode::OK,
        &[("content-type", "application/json".into())],
        serde_json::to_vec(&body).unwrap(),
    )
}

fn accepts(headers: &HeaderMap, media_type: &str) -> bool {
    let mut any = false;
    for v in headers.get_all(header::ACCEPT) {
        let Ok(s) = v.to_str() else { continue };
        for part in s.split(',') {
            let t = part.split(';').next().unwrap_or("").trim();
            if t.is_empty() {
                continue;
            }
            any = true;
            if t == media_type || t == "*/*" || t == "application/*" {
                return true;
            }
        }
    }
    !any
}

fn serve_manifest(
    state: &State,
    name: &str,
    reference: &str,
    headers: &HeaderMap,
    head: bool,
) -> Response<RespBody> {
    let m = {
        let repos = lock(&state.repos);
        let Some(repo) = repos.get(name) else {
            return oci_error(
                StatusCode::NOT_FOUND,
                "NAME_UNKNOWN",
                "fake: no such repository",
                &[],
            );
        };
        let digest = if reference.contains(':') {
            reference.to_string()
        } else {
            match repo.tags.get(reference) {
                Some(d) => d.clone(),
                None => {
                    return oci_error(
                        StatusCode::NOT_FOUND,
                        "MANIFEST_UNKNOWN",
                        "fake: no such tag",
                        &[],
                    );
                }
            }
        };
        match repo.manifests.get(&digest) {
            Some(m) => m.clone(),
            None => {
                return oci_error(
                    StatusCode::NOT_FOUND,
                    "MANIFEST_UNKNOWN",
                    "fake: no such manifest",
                    &[],
                );
            }
        }
    };
    if !accepts(headers, &m.media_type) {
        return oci_error(
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            "fake: manifest type not in Accept",
            &[],
        );
    }
    let mut bytes = m.bytes.clone();
    if lock(&state.corrupt).contains(&m.digest) {
        let mut v = bytes.to_vec();
        v.push(b'\n');
        bytes = Bytes::from(v);
    }
    let hdrs = [
        ("content-type", m.media_type.clone()),
        ("docker-content-digest", m.digest.clone()),
        ("etag", format!("\"{}\"", m.digest)),
    ];
    if head {
        let mut r = full(StatusCode::OK, &hdrs, Bytes::new());
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        return r;
    }
    full(StatusCode::OK, &hdrs, bytes)
}

fn find_blob(state: &State, name: Option<&str>, digest: &str) -> Option<Bytes> {
    let repos = lock(&state.repos);
    match name {
        Some(n) => repos.get(n)?.blobs.get(digest).cloned(),
        None => repos.values().find_map(|r| r.blobs.get(digest).cloned()),
    }
}

fn serve_blob(state: &State, name: &str, digest: &str, head: bool) -> Response<RespBody> {
    let Some(bytes) = find_blob(state, Some(name), digest) else {
        return oci_error(
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
            "fake: no such blob",
            &[],
        );
    };
    let hdrs = [
        ("content-type", "application/octet-stream".to_string()),
        ("docker-content-digest", digest.to_string()),
        ("accept-ranges", "bytes".to_string()),
    ];
    if head {
        let mut r = full(StatusCode::OK, &hdrs, Bytes::new());
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        return r;
    }
    if let Some(cdn) = lock(&state.redirect).clone() {
        return full(
            StatusCode::TEMPORARY_REDIRECT,
            &[
                ("location", format!("{cdn}/cdn/{digest}?sig=fake")),
                ("docker-content-digest", digest.to_string()),
            ],
            Bytes::new(),
        );
    }
    blob_response(state, digest, bytes, &hdrs)
}

fn blob_response(
    state: &State,
    digest: &str,
    bytes: Bytes,
    hdrs: &[(&str, String)],
) -> Response<RespBody> {
    let mut bytes = bytes;
    if lock(&state.corrupt).contains(digest) {
        bytes = Bytes::from(bytes.iter().map(|b| b ^ 0xff).collect::<Vec<u8>>());
    }
    let plan = StreamPlan {
        truncate_after: lock(&state.truncate).get(digest).copied(),
        gate: lock(&state.gates).get(digest).cloned(),
        delay: *lock(&state.chunk_delay),
        bytes: bytes.clone(),
    };
    let mut resp = Response::builder().status(StatusCode::OK);
    for (k, v) in hdrs {
        resp = resp.header(*k, v.as_str());
    }
    resp.header(header::CONTENT_LENGTH, bytes.len())
        .body(stream_body(plan))
        .unwrap()
}

fn serve_tags(state: &State, name: &str, query: Option<&str>) -> Response<RespBody> {
    if let Some((link, body)) = lock(&state.tags_override).clone() {
        let mut hdrs = vec![("content-type", "application/json".to_string())];
        if let Some(l) = link {
            hdrs.push(("link", l));
        }
        return full(StatusCode::OK, &hdrs, body);
    }
    let q = parse_query(query);
    let get = |k: &str| q.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.clone());
    let all: Vec<String> = {
        let repos = lock(&state.repos);
        let Some(repo) = repos.get(name) else {
            return oci_error(
                StatusCode::NOT_FOUND,
                "NAME_UNKNOWN",
                "fake: no such repository",
                &[],
            );
        };
        repo.tags.keys().cloned().collect()
    };
    let after: Vec<String> = match get("last") {
        Some(l) => all.into_iter().filter(|t| *t > l).collect(),
        None => all,
    };
    let n = match get("n") {
        Some(s) => match s.parse::<usize>() {
            Ok(n) => Some(n),
            Err(_) => {
                return oci_error(
                    StatusCode::BAD_REQUEST,
                    "PAGINATION_NUMBER_INVALID",
                    "fake: bad n",
                    &[],
                );
            }
        },
        None => *lock(&state.tags_page_size),
    };
    let mut hdrs = vec![("content-type", "application/json".to_string())];
    let page: Vec<String> = match n {
        Some(n) => {
            let page: Vec<String> = after.iter().take(n).cloned().collect();
            if n > 0 && after.len() > n {
                hdrs.push((
                    "link",
                    format!(
                        "</v2/{name}/tags/list?last={}&n={n}>; rel=\"next\"",
                        page.last().unwrap()
                    ),
                ));
            }
            page
        }
        None => after,
    };
    full(
        StatusCode::OK,
        &hdrs,
        serde_json::to_vec(&json!({"name": name, "tags": page})).unwrap(),
    )
}

fn serve_referrers(
    state: &State,
    name: &str,
    digest: &str,
    query: Option<&str>,
) -> Response<RespBody> {
    let api = *lock(&state.referrers_api);
    match api {
        ReferrersApi::Missing => {
            return full(
                StatusCode::NOT_FOUND,
                &[("content-type", "text/plain; charset=utf-8".to_string())],
                "404 page not found\n",
            );
        }
        ReferrersApi::Garbage => {
            return full(
                StatusCode::OK,
                &[("content-type", OCI_INDEX.to_string())],
                "<html>not an index</html>",
            );
        }
        _ => {}
    }
    let q = parse_query(query);
    let param = |k: &str| q.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.clone());
    let filter = param("artifactType").filter(|_| api != ReferrersApi::Unfiltered);
    let mut descs = vec![];
    {
        let repos = lock(&state.repos);
        if let Some(repo) = repos.get(name) {
            let mut ms: Vec<&Manifest> = repo.manifests.values().collect();
            ms.sort_by(|a, b| a.digest.cmp(&b.digest));
            for m in ms {
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(&m.bytes) else {
                    continue;
                };
                if v["subject"]["digest"].as_str() != Some(digest) {
                    continue;
                }
                let at = v["artifactType"].as_str().unwrap_or("").to_string();
                if filter.as_ref().is_some_and(|f| *f != at) {
                    continue;
                }
                let mut d = descriptor(&m.media_type, &m.digest, m.bytes.len());
                d["artifactType"] = json!(at);
                if !v["annotations"].is_null() {
                    d["annotations"] = v["annotations"].clone();
                }
                descs.push(d);
            }
        }
    }
    let mut hdrs = vec![("content-type", OCI_INDEX.to_string())];
    if let ReferrersApi::Paged(n) = api {
        if let Some(last) = param("last") {
            descs.retain(|d| d["digest"].as_str().is_some_and(|x| x > last.as_str()));
        }
        if descs.len() > n {
            descs.truncate(n);
            let last = descs[n - 1]["digest"].as_str().unwrap().to_string();
            hdrs.push((
                "link",
                format!("</v2/{name}/referrers/{digest}?n={n}&last={last}>; rel=\"next\""),
            ));
        }
    }
    let body = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descs});
    if filter.is_some() {
        hdrs.push(("oci-filters-applied", "artifactType".to_string()));
    }
    full(StatusCode::OK, &hdrs, serde_json::to_vec(&body).unwrap())
}

// === FakeCdn ===

/// A second server on another port that serves blobs redirected to by a [`FakeRegistry`], and
/// rejects (403) any request carrying an `Authorization` header. Drop stops it.
pub struct FakeCdn {
    addr: SocketAddr,
    log: Arc<Mutex<Vec<Recorded>>>,
    _server: ServerHandle,
}

impl FakeCdn {
    /// Starts a CDN serving the blobs of `registry`.
    pub async fn start(registry: &FakeRegistry) -> FakeCdn {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake cdn");
        let addr = listener.local_addr().unwrap();
        let log: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let state = registry.state.clone();
        let log2 = log.clone();
        let handler: Handler = Arc::new(move |req: Request<Incoming>| {
            let state = state.clone();
            let log = log2.clone();
            Box::pin(async move {
                let path = req.uri().path().to_string();
                lock(&log).push(Recorded {
                    method: req.method().clone(),
                    path: path.clone(),
                    query: req.uri().query().map(str::to_string),
                    headers: req.headers().clone(),
                    status: None,
                });
                if req.headers().contains_key(header::AUTHORIZATION) {
                    return full(
                        StatusCode::FORBIDDEN,
                        &[],
                        "fake cdn: Authorization header not allowed",
                    );
                }
                let Some(digest) = path.strip_prefix("/cdn/") else {
                    return full(StatusCode::NOT_FOUND, &[], "fake cdn: not found");
                };
                let Some(bytes) = find_blob(&state, None, digest) else {
                    return full(StatusCode::NOT_FOUND, &[], "fake cdn: no such blob");
                };
                blob_response(
                    &state,
                    digest,
                    bytes,
                    &[("content-type", "application/octet-stream".to_string())],
                )
            })
        });
        FakeCdn {
            addr,
            log,
            _server: ServerHandle::spawn(listener, handler),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests received.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.log).clone()
    }

    /// GETs received.
    pub fn gets(&self) -> usize {
        lock(&self.log)
            .iter()
            .filter(|r| r.method == Method::GET)
            .count()
    }

    /// Requests that carried an `Authorization` header (each was rejected with 403).
    pub fn requests_with_authorization(&self) -> usize {
        lock(&self.log)
            .iter()
            .filter(|r| r.headers.contains_key(header::AUTHORIZATION))
            .count()
    }
}
