//! `[cluster]`: replicas behind one Service act as one cache. Owns who the members are (a
//! static list or a DNS name re-resolved), which are live (each probes the others' `/healthz`),
//! which member owns a key (rendezvous hashing over the live ones), and how replicas sign,
//! check and send requests to each other.
//!
//! Membership is each replica's own view: two replicas may briefly disagree (one saw a peer
//! die a probe earlier). The cost is a blob fetched twice, never a wrong one, because the
//! content is verified wherever it is filled, and a request a peer forwarded is served where
//! it lands (the `X-Cachalot-Peer` header says so), so a disagreement cannot make a loop.

mod client;
mod discover;
mod rendezvous;
mod sign;

pub use rendezvous::owner_of;
pub use sign::{PEER_HEADER, PeerCheck};

use crate::config::{ClusterConfig, ConfigError};
use crate::error::{Error, UpstreamFault};
use crate::metrics::{Metrics, PeerDirection, PeerResult};
use bytes::Bytes;
use client::{Failure, PeerClient};
use discover::Source;
use http::header::USER_AGENT;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use parking_lot::RwLock;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};
use tracing::Instrument;

/// How often each other member's `/healthz` is asked.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// A probe that takes longer failed: a replica too busy to answer its health check within this
/// is too busy to serve a blob to another replica.
const PROBE_TIMEOUT: Duration = Duration::from_millis(800);
/// Failed probes in a row before a live member is taken for dead. One failure is a dropped
/// packet or a pause; two, a second apart, is a replica that is gone.
const DEAD_AFTER: u32 = 2;
/// `peers_dns` is resolved every this many probe rounds.
const RESOLVE_EVERY: u64 = 5;
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long [`Cluster::fetch`] waits for a peer's response headers. The owner answers a blob it
/// is filling as soon as the upstream answers it, so this bounds a slow upstream too; past it,
/// the asking replica fills the blob itself.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
const USER_AGENT_VALUE: &str = concat!("cachalot/", env!("CARGO_PKG_VERSION"), " (peer)");

/// One replica, by the base URL every replica knows it by.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Peer {
    /// `http(s)://host:port/`; its text (`as_str`, trailing slash included) is what keys are
    /// hashed with.
    pub url: url::Url,
}

/// The URL without its trailing slash, ready for a path to be appended.
impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.url.as_str().trim_end_matches('/'))
    }
}

impl fmt::Debug for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Peer({})", self.url.as_str())
    }
}

/// This replica's view of the cluster. Shared (`Arc`) by the request path and the membership
/// loop; dropping the last `Arc` stops the loop at its next round.
pub struct Cluster {
    me: Peer,
    source: Source,
    key: ring::hmac::Key,
    client: PeerClient,
    metrics: Arc<Metrics>,
    members: RwLock<Members>,
    started: AtomicBool,
}

/// The other members and what the probes say of them.
struct Members {
    others: Vec<Member>,
    /// The live members, this one included, as `owner` hashes over them; replaced whole on a
    /// change, so a lookup clones an `Arc` and hashes with no lock held.
    live: Arc<[Peer]>,
    /// The last `peers_dns` resolution failed (logged once, until one succeeds).
    dns_failing: bool,
}

struct Member {
    peer: Peer,
    live: bool,
    /// Failed probes in a row.
    failures: u32,
}

impl Members {
    fn rebuild(&mut self, me: &Peer) {
        let live: Vec<Peer> = std::iter::once(me.clone())
            .chain(
                self.others
                    .iter()
                    .filter(|m| m.live)
                    .map(|m| m.peer.clone()),
            )
            .collect();
        self.live = live.into();
    }
}

// === impl Cluster ===

impl Cluster {
    /// From `[cluster]`: the peers (or `peers_dns`, resolved by the membership loop), this
    /// replica's own entry (`self`, or detected: the peer on `listen`'s port whose host is an
    /// address of this machine), and the secret. Errors name the key at fault. Until
    /// [`Cluster::start`] runs, no other member is live, so this replica owns every key.
    pub fn new(
        cfg: &ClusterConfig,
        listen: SocketAddr,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Cluster>, ConfigError> {
        let (me, source) = discover::configure(cfg, listen)?;
        let key = sign::key(&cfg.secret()?);
        let client = PeerClient::new()?;
        let others = match &source {
            Source::Static(peers) => peers
                .iter()
                .map(|p| Member {
                    peer: p.clone(),
                    live: false,
                    failures: 0,
                })
                .collect(),
            Source::Dns { .. } => Vec::new(),
        };
        let mut members = Members {
            others,
            live: Arc::new([]),
            dns_failing: false,
        };
        members.rebuild(&me);
        metrics.cluster_peers_live.set(1);
        tracing::info!(me = %me, ?source, "cluster configured");
        Ok(Arc::new(Cluster {
            me,
            source,
            key,
            client,
            metrics,
            members: RwLock::new(members),
            started: AtomicBool::new(false),
        }))
    }

    /// Spawns the membership loop (once; later calls do nothing): every [`PROBE_INTERVAL`] it
    /// probes each other member's `GET /healthz` (800 ms to answer 2xx), all at once; a member
    /// is live after one success and dead after two failures in a row. With `peers_dns`, the
    /// name is resolved every 5 rounds; a failed resolution keeps the members as they were
    /// (their probes still tell the dead). The first round runs at once. Must be called within
    /// a Tokio runtime.
    pub fn start(self: &Arc<Self>) {
        if self.started.swap(true, Ordering::SeqCst) {
            return;
        }
        let weak: Weak<Cluster> = Arc::downgrade(self);
        let span = tracing::info_span!("cluster", me = %self.me);
        tokio::spawn(
            async move {
                let mut tick = tokio::time::interval(PROBE_INTERVAL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                for round in 0u64.. {
                    tick.tick().await;
                    let Some(cluster) = weak.upgrade() else { break };
                    if let Source::Dns { name, scheme } = &cluster.source
                        && round % RESOLVE_EVERY == 0
                    {
                        cluster.resolve(name, scheme).await;
                    }
                    cluster.probe_all().await;
                }
            }
            .instrument(span),
        );
    }

    /// The live member that owns `key` (a digest's text, `"<upstream>/<repo>:<tag>"`, ...), or
    /// `None` when this replica owns it, which it does of every key while no other member is
    /// live. Every replica with the same view of the live members gives the same answer.
    pub fn owner(&self, key: &str) -> Option<Peer> {
        let live = self.members.read().live.clone();
        let i = rendezvous::owner(key, live.iter().map(|p| p.url.as_str()))?;
        (live[i] != self.me).then(|| live[i].clone())
    }

    /// The live members, this replica first.
    pub fn live(&self) -> Vec<Peer> {
        self.members.read().live.to_vec()
    }

    /// This replica, as the others know it.
    pub fn me(&self) -> &Peer {
        &self.me
    }

    /// Signs a request to a peer: sets `X-Cachalot-Peer: <unix-secs>.<hex HMAC-SHA256(secret,
    /// "<secs> <METHOD> <path_and_query>")>`, replacing any such header already there.
    pub fn sign(&self, method: &Method, path_and_query: &str, headers: &mut HeaderMap) {
        let value = sign::header(&self.key, now_secs(), method, path_and_query);
        headers.insert(PEER_HEADER, value);
    }

    /// Whether a request came from a peer, given its method and its path and query exactly as
    /// received: [`PeerCheck::NotPeer`] without the header,
    /// [`PeerCheck::Peer`] with a valid signature made within a minute of now (either way),
    /// [`PeerCheck::Forged`] otherwise, which the caller answers with 401. Peer and forged
    /// requests are counted here (`cachalot_peer_requests_total{direction="in"}`, `ok` or
    /// `refused`); the caller only answers and logs.
    pub fn check(&self, method: &Method, path_and_query: &str, headers: &HeaderMap) -> PeerCheck {
        let result = sign::check(&self.key, now_secs(), method, path_and_query, headers);
        match result {
            PeerCheck::NotPeer => {}
            PeerCheck::Peer => self.metrics.peer_request(PeerDirection::In, PeerResult::Ok),
            PeerCheck::Forged => self
                .metrics
                .peer_request(PeerDirection::In, PeerResult::Refused),
        }
        result
    }

    /// [`Cluster::fetch_within`] with [`FETCH_TIMEOUT`] for the response headers.
    pub async fn fetch(
        &self,
        peer: &Peer,
        method: Method,
        path_and_query: &str,
        extra: HeaderMap,
    ) -> Result<Response<Incoming>, Error> {
        self.fetch_within(peer, method, path_and_query, extra, FETCH_TIMEOUT)
            .await
    }

    /// Sends `method` (GET or HEAD) for `path_and_query` (starting with `/`) to `peer`, with
    /// `extra` headers (`Accept`, `Range`, ...) and this replica's signature, over a pooled
    /// connection. Waits at most 1 s to connect and `timeout` for the response headers, then
    /// returns the response whatever its status, its body streaming as the peer sends it (the
    /// caller applies its own idle timeout between frames, and checks what it gets).
    ///
    /// Counts `cachalot_peer_requests_total{direction="out"}`: `ok` for an answer, `refused` for
    /// a 401 (the peer does not accept this replica's secret), `error` for a 5xx or no answer,
    /// `timeout` past a deadline. Failures are [`Error::Upstream`] named `peer <url>`:
    /// a connect failure, a timeout, or a broken answer.
    pub async fn fetch_within(
        &self,
        peer: &Peer,
        method: Method,
        path_and_query: &str,
        mut extra: HeaderMap,
        timeout: Duration,
    ) -> Result<Response<Incoming>, Error> {
        let name = format!("peer {peer}");
        let uri = path_and_query
            .starts_with('/')
            .then(|| Uri::try_from(format!("{peer}{path_and_query}")).ok())
            .flatten()
            .ok_or_else(|| {
                Error::Internal(format!(
                    "peer request for {path_and_query:?}: not a path and query"
                ))
            })?;
        self.sign(&method, path_and_query, &mut extra);
        if !extra.contains_key(USER_AGENT) {
            extra.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
        }
        let mut req = Request::new(Empty::<Bytes>::new());
        *req.method_mut() = method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = extra;
        let span = tracing::debug_span!("peer", peer = %peer, %method, path = path_and_query);
        async {
            let started = Instant::now();
            let outcome = self.client.send(req, timeout).await;
            let duration_ms = started.elapsed().as_millis() as u64;
            let (result, outcome) = match outcome {
                Ok(resp) => {
                    let status = resp.status();
                    let result = if status == StatusCode::UNAUTHORIZED {
                        tracing::warn!(
                            status = status.as_u16(),
                            duration_ms,
                            "peer refused this replica's signature: do the replicas share cluster.secret?"
                        );
                        PeerResult::Refused
                    } else if status.is_server_error() {
                        tracing::warn!(status = status.as_u16(), duration_ms, "peer call failed");
                        PeerResult::Error
                    } else {
                        tracing::debug!(status = status.as_u16(), duration_ms, "peer call");
                        PeerResult::Ok
                    };
                    (result, Ok(resp))
                }
                Err(Failure::Timeout(what)) => {
                    tracing::warn!(duration_ms, "peer call timed out {what}");
                    (
                        PeerResult::Timeout,
                        Err(Error::upstream(&name, UpstreamFault::Timeout(what))),
                    )
                }
                Err(Failure::Fault(fault)) => {
                    tracing::warn!(duration_ms, error = %fault, "peer call failed");
                    (PeerResult::Error, Err(Error::upstream(&name, fault)))
                }
            };
            self.metrics.peer_request(PeerDirection::Out, result);
            outcome
        }
        .instrument(span)
        .await
    }

    // --- membership ---

    /// Probes every other member at once and updates who is live.
    async fn probe_all(&self) {
        let targets: Vec<Peer> = self
            .members
            .read()
            .others
            .iter()
            .map(|m| m.peer.clone())
            .collect();
        let results = futures_util::future::join_all(targets.iter().map(|p| self.probe(p))).await;
        let mut members = self.members.write();
        let mut changed = false;
        for (peer, ok) in targets.iter().zip(results) {
            // Gone if a resolution dropped it meanwhile.
            let Some(m) = members.others.iter_mut().find(|m| m.peer == *peer) else {
                continue;
            };
            if ok {
                m.failures = 0;
                if !m.live {
                    tracing::info!(peer = %peer, "peer is live");
                    m.live = true;
                    changed = true;
                }
            } else {
                m.failures = m.failures.saturating_add(1);
                if m.live && m.failures >= DEAD_AFTER {
                    tracing::warn!(peer = %peer, failures = m.failures, "peer is down: no answer from its /healthz");
                    m.live = false;
                    changed = true;
                }
            }
        }
        if changed {
            members.rebuild(&self.me);
            self.metrics
                .cluster_peers_live
                .set(members.live.len() as i64);
        }
    }

    /// Whether `peer` answers `GET /healthz` with a 2xx, body included, within the probe
    /// timeout. The body is read so that the connection goes back to the pool.
    async fn probe(&self, peer: &Peer) -> bool {
        let Ok(uri) = Uri::try_from(format!("{peer}/healthz")) else {
            return false;
        };
        let mut req = Request::new(Empty::<Bytes>::new());
        *req.uri_mut() = uri;
        req.headers_mut()
            .insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
        let probe = async {
            let resp = self.client.send(req, PROBE_TIMEOUT).await.ok()?;
            let ok = resp.status().is_success();
            resp.into_body().collect().await.ok()?;
            Some(ok)
        };
        matches!(
            tokio::time::timeout(PROBE_TIMEOUT, probe).await,
            Ok(Some(true))
        )
    }

    /// Resolves `peers_dns` and makes its addresses the other members, keeping what the probes
    /// know of those already there; on failure the members stay as they were.
    async fn resolve(&self, name: &str, scheme: &str) {
        let found = match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(name)).await
        {
            Ok(Ok(addrs)) => discover::resolved_peers(addrs, scheme),
            Ok(Err(e)) => return self.resolve_failed(name, &e.to_string()),
            Err(_) => return self.resolve_failed(name, "timed out"),
        };
        let mut members = self.members.write();
        if members.dns_failing {
            tracing::info!(name, "peers_dns resolves again");
            members.dns_failing = false;
        }
        let mut old = std::mem::take(&mut members.others);
        let mut changed = false;
        for peer in found.into_iter().filter(|p| *p != self.me) {
            match old.iter().position(|m| m.peer == peer) {
                Some(i) => members.others.push(old.swap_remove(i)),
                None => {
                    tracing::info!(peer = %peer, "peer joined (peers_dns)");
                    members.others.push(Member {
                        peer,
                        live: false,
                        failures: 0,
                    });
                }
            }
        }
        for m in old {
            tracing::info!(peer = %m.peer, "peer left (peers_dns)");
            changed |= m.live;
        }
        if changed {
            members.rebuild(&self.me);
            self.metrics
                .cluster_peers_live
                .set(members.live.len() as i64);
        }
    }

    fn resolve_failed(&self, name: &str, error: &str) {
        let mut members = self.members.write();
        if !members.dns_failing {
            tracing::warn!(
                name,
                error,
                "peers_dns does not resolve; keeping the members known"
            );
            members.dns_failing = true;
        }
    }

    /// Sets whether `peer` is live, as probes would.
    #[cfg(test)]
    fn set_live(&self, peer: &Peer, live: bool) {
        let mut members = self.members.write();
        if let Some(m) = members.others.iter_mut().find(|m| m.peer == *peer) {
            m.live = live;
        }
        members.rebuild(&self.me);
    }
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("me", &self.me.url.as_str())
            .field("source", &self.source)
            .field("live", &self.members.read().live)
            .finish_non_exhaustive()
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const PEERS: [&str; 3] = [
        "http://127.0.0.1:5000",
        "http://127.0.0.1:5001",
        "http://127.0.0.1:5002",
    ];

    fn secret_file(secret: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "{secret}").unwrap();
        f
    }

    fn cluster(me: usize, secret: &tempfile::NamedTempFile) -> Arc<Cluster> {
        let cfg = ClusterConfig {
            peers: PEERS.map(str::to_owned).to_vec(),
            self_url: Some(PEERS[me].to_owned()),
            secret_file: Some(secret.path().to_owned()),
            ..Default::default()
        };
        let listen = "0.0.0.0:9".parse().unwrap();
        Cluster::new(&cfg, listen, Arc::new(Metrics::new(&[]))).unwrap()
    }

    fn all_live(c: &Cluster) {
        for p in PEERS {
            c.set_live(
                &Peer {
                    url: p.parse().unwrap(),
                },
                true,
            );
        }
    }

    /// Who each cluster says owns `key`, as a URL (`None` is the cluster itself).
    fn owners(cs: &[Arc<Cluster>], key: &str) -> Vec<String> {
        cs.iter()
            .map(|c| c.owner(key).unwrap_or_else(|| c.me().clone()).to_string())
            .collect()
    }

    #[test]
    fn every_member_names_the_same_owner_and_a_removal_moves_only_its_keys() {
        let secret = secret_file("0123456789abcdef");
        let cs: Vec<_> = (0..3).map(|i| cluster(i, &secret)).collect();
        cs.iter().for_each(|c| all_live(c));
        let keys: Vec<String> = (0..1000)
            .map(|i| format!("sha256:{:064x}", i * 104729))
            .collect();
        let mut before = Vec::new();
        let mut counts = [0; 3];
        for k in &keys {
            let o = owners(&cs, k);
            assert!(o.iter().all(|x| *x == o[0]), "{k}: {o:?}");
            counts[PEERS.iter().position(|p| *p == o[0]).unwrap()] += 1;
            before.push(o[0].clone());
        }
        assert!(counts.iter().all(|&c| c > 250), "{counts:?}");
        // The third member dies, as the first two see it.
        let gone = Peer {
            url: PEERS[2].parse().unwrap(),
        };
        for c in &cs[..2] {
            c.set_live(&gone, false);
            assert_eq!(c.live().len(), 2);
        }
        for (k, was) in keys.iter().zip(&before) {
            let o = owners(&cs[..2], k);
            assert_eq!(o[0], o[1], "{k}");
            if *was == PEERS[2] {
                assert_ne!(o[0], PEERS[2], "{k}");
            } else {
                assert_eq!(o[0], *was, "{k} moved though its owner is live");
            }
        }
    }

    #[test]
    fn alone_a_replica_owns_everything() {
        let secret = secret_file("0123456789abcdef");
        let c = cluster(1, &secret);
        assert_eq!(c.live(), [c.me().clone()]);
        assert!((0..100).all(|i| c.owner(&format!("k{i}")).is_none()));
    }

    #[test]
    fn signatures_check_between_replicas_and_are_counted() {
        let secret = secret_file("0123456789abcdef");
        let (a, b) = (cluster(0, &secret), cluster(1, &secret));
        let other = secret_file("fedcba9876543210");
        let stranger = cluster(2, &other);
        let path = "/v2/library/alpine/blobs/sha256:00?ns=docker.io";
        let mut h = HeaderMap::new();
        a.sign(&Method::GET, path, &mut h);
        assert_eq!(b.check(&Method::GET, path, &h), PeerCheck::Peer);
        assert_eq!(b.check(&Method::HEAD, path, &h), PeerCheck::Forged);
        assert_eq!(
            b.check(&Method::GET, "/v2/library/alpine/blobs/sha256:01", &h),
            PeerCheck::Forged
        );
        assert_eq!(stranger.check(&Method::GET, path, &h), PeerCheck::Forged);
        assert_eq!(
            b.check(&Method::GET, path, &HeaderMap::new()),
            PeerCheck::NotPeer
        );
        let text = String::from_utf8(b.metrics.render()).unwrap();
        assert!(
            text.contains("cachalot_peer_requests_total{direction=\"in\",result=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("cachalot_peer_requests_total{direction=\"in\",result=\"refused\"} 2"),
            "{text}"
        );
    }

    #[test]
    fn a_missing_or_short_secret_names_the_key() {
        let cfg = ClusterConfig {
            peers: vec![PEERS[0].to_owned()],
            self_url: Some(PEERS[0].to_owned()),
            ..Default::default()
        };
        let m = Arc::new(Metrics::new(&[]));
        let listen = "0.0.0.0:5000".parse().unwrap();
        let e = Cluster::new(&cfg, listen, m.clone())
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("cluster.secret_env: required"), "{e}");
        let short = secret_file("short");
        let cfg = ClusterConfig {
            secret_file: Some(short.path().to_owned()),
            ..cfg
        };
        let e = Cluster::new(&cfg, listen, m).unwrap_err().to_string();
        assert!(e.contains("at least 16 characters"), "{e}");
    }
}
