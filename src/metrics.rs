//! Every metric, defined once. Label values come from closed sets: never a repository, tag or
//! digest, so the series count stays bounded whatever clients ask for.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::sync::OnceLock;
use std::time::Instant;

/// The `route` label of the request series. `http::route::Route::label` maps every route to
/// one, so a new route cannot go uncounted; the series exist at zero from the start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteLabel {
    Manifest,
    Blob,
    Tags,
    Referrers,
    Base,
    Catalog,
    /// Metrics, health, unsupported and unknown paths.
    Other,
}

impl RouteLabel {
    /// Every label, in declaration order (so `label as usize` indexes it).
    pub const ALL: [RouteLabel; 7] = [
        RouteLabel::Manifest,
        RouteLabel::Blob,
        RouteLabel::Tags,
        RouteLabel::Referrers,
        RouteLabel::Base,
        RouteLabel::Catalog,
        RouteLabel::Other,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            RouteLabel::Manifest => "manifest",
            RouteLabel::Blob => "blob",
            RouteLabel::Tags => "tags",
            RouteLabel::Referrers => "referrers",
            RouteLabel::Base => "base",
            RouteLabel::Catalog => "catalog",
            RouteLabel::Other => "other",
        }
    }
}

/// What an upstream request is for; the `op` label of the upstream series (re-exported as
/// `upstream::Op`, whose requests carry it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Manifest,
    Blob,
    Tags,
    Referrers,
    Ping,
    /// A bearer token fetch from the upstream's token realm.
    Token,
}

impl Op {
    /// Every op, in declaration order.
    pub const ALL: [Op; 6] = [
        Op::Manifest,
        Op::Blob,
        Op::Tags,
        Op::Referrers,
        Op::Ping,
        Op::Token,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Op::Manifest => "manifest",
            Op::Blob => "blob",
            Op::Tags => "tags",
            Op::Referrers => "referrers",
            Op::Ping => "ping",
            Op::Token => "token",
        }
    }
}

/// Cache lookup kinds and results.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Manifest,
    Blob,
    /// A repository's tags list.
    Tags,
    /// A referrers list (kept answers: hit, miss, revalidated, stale).
    Referrers,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    Hit,
    Miss,
    Coalesced,
    Stale,
    Revalidated,
    /// Served by the replica that owns it (`[cluster]`), not filled here.
    Peer,
    /// Not in this replica's cache directory, found in the shared bucket (`[storage]`).
    Bucket,
}

/// Every lookup result, in declaration order.
pub const LOOKUPS: [Lookup; 7] = [
    Lookup::Hit,
    Lookup::Miss,
    Lookup::Coalesced,
    Lookup::Stale,
    Lookup::Revalidated,
    Lookup::Peer,
    Lookup::Bucket,
];

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Manifest => "manifest",
            Kind::Blob => "blob",
            Kind::Tags => "tags",
            Kind::Referrers => "referrers",
        }
    }
}

impl Lookup {
    pub fn as_str(self) -> &'static str {
        match self {
            Lookup::Hit => "hit",
            Lookup::Miss => "miss",
            Lookup::Coalesced => "coalesced",
            Lookup::Stale => "stale",
            Lookup::Revalidated => "revalidated",
            Lookup::Peer => "peer",
            Lookup::Bucket => "bucket",
        }
    }
}

/// Where served bytes came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A committed cache file.
    Cache,
    /// A fill in progress (the file still growing).
    Fill,
    /// Passed straight through from upstream (referrers, tags, HEAD answers).
    Upstream,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Cache => "cache",
            Source::Fill => "fill",
            Source::Upstream => "upstream",
        }
    }
}

/// Why an upstream body was discarded other than for a digest mismatch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFault {
    /// It ended short of its declared length.
    Truncated,
    /// It broke off, or ran past its declared length.
    Protocol,
}

impl BodyFault {
    pub const ALL: [BodyFault; 2] = [BodyFault::Truncated, BodyFault::Protocol];

    pub fn as_str(self) -> &'static str {
        match self {
            BodyFault::Truncated => "truncated",
            BodyFault::Protocol => "protocol",
        }
    }
}

/// The answer to "does this repository hold this cached blob?", asked of the upstream when no
/// manifest of the repository says so.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkCheck {
    /// The upstream has it there: linked, and served from the cache.
    Confirmed,
    /// The upstream has not (or the mirror is offline): refused, not a byte served.
    Refused,
    /// The upstream could not say (down, timing out, answering 5xx): refused with its error.
    Failed,
}

impl LinkCheck {
    pub const ALL: [LinkCheck; 3] = [LinkCheck::Confirmed, LinkCheck::Refused, LinkCheck::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            LinkCheck::Confirmed => "confirmed",
            LinkCheck::Refused => "refused",
            LinkCheck::Failed => "failed",
        }
    }
}

/// Which way a request between replicas went: the `direction` label of
/// `cachalot_peer_requests_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerDirection {
    /// Sent by this replica to the owner of something.
    Out,
    /// Received from another replica.
    In,
}

/// How a request between replicas ended: the `result` label of `cachalot_peer_requests_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerResult {
    /// Out: the peer answered (any status but 401 and 5xx). In: the signature was valid.
    Ok,
    /// Out: no answer (connect failure, broken connection) or a 5xx.
    Error,
    /// The signature was refused: out, the peer answered 401; in, the request was forged,
    /// stale or signed with another secret. Either way the replicas disagree on the secret.
    Refused,
    /// Out: no response headers in time.
    Timeout,
}

impl PeerDirection {
    pub const ALL: [PeerDirection; 2] = [PeerDirection::Out, PeerDirection::In];

    pub const fn as_str(self) -> &'static str {
        match self {
            PeerDirection::Out => "out",
            PeerDirection::In => "in",
        }
    }
}

impl PeerResult {
    pub const ALL: [PeerResult; 4] = [
        PeerResult::Ok,
        PeerResult::Error,
        PeerResult::Refused,
        PeerResult::Timeout,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            PeerResult::Ok => "ok",
            PeerResult::Error => "error",
            PeerResult::Refused => "refused",
            PeerResult::Timeout => "timeout",
        }
    }
}

/// A request to the bucket (`[storage] backend = "s3"`); the `op` label of the storage series.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageOp {
    Head,
    Get,
    /// A whole small object (manifest, record, marker) in one PUT.
    Put,
    /// Starting a multipart upload, or one of its parts.
    Upload,
    /// Completing a multipart upload: the moment a blob becomes visible.
    Complete,
    Abort,
    Delete,
    /// A whole listing (every page of it).
    List,
    /// A copy inside the bucket (a damaged blob into quarantine/).
    Copy,
}

impl StorageOp {
    pub const ALL: [StorageOp; 9] = [
        StorageOp::Head,
        StorageOp::Get,
        StorageOp::Put,
        StorageOp::Upload,
        StorageOp::Complete,
        StorageOp::Abort,
        StorageOp::Delete,
        StorageOp::List,
        StorageOp::Copy,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            StorageOp::Head => "head",
            StorageOp::Get => "get",
            StorageOp::Put => "put",
            StorageOp::Upload => "upload",
            StorageOp::Complete => "complete",
            StorageOp::Abort => "abort",
            StorageOp::Delete => "delete",
            StorageOp::List => "list",
            StorageOp::Copy => "copy",
        }
    }
}

/// How a bucket request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageResult {
    Ok,
    NotFound,
    Error,
    /// Not sent: the bucket failed too often just before (see `storage::s3`'s breaker).
    Skipped,
}

impl StorageResult {
    pub const ALL: [StorageResult; 4] = [
        StorageResult::Ok,
        StorageResult::NotFound,
        StorageResult::Error,
        StorageResult::Skipped,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            StorageResult::Ok => "ok",
            StorageResult::NotFound => "not_found",
            StorageResult::Error => "error",
            StorageResult::Skipped => "skipped",
        }
    }
}

/// The metrics registry and its series.
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub lookups: IntCounterVec,
    pub served_bytes: IntCounterVec,
    pub upstream_requests: IntCounterVec,
    pub upstream_bytes: IntCounterVec,
    pub digest_mismatches: IntCounterVec,
    pub upstream_body_errors: IntCounterVec,
    pub token_fetches: IntCounterVec,
    /// Server certificate reloads (file change or SIGHUP), by result (ok, failed).
    pub tls_reloads: IntCounterVec,
    pub fills_in_flight: IntGauge,
    /// Fills whose peer or bucket failed midway and went on from the upstream, by source.
    pub fill_source_fallbacks: IntCounterVec,
    pub cache_write_errors: IntCounter,
    /// Requests answered 503 because the process ran out of descriptors or memory.
    pub overloaded: IntCounter,
    /// When an overload was last logged, in seconds since the epoch: it is logged once a
    /// second, not once a request.
    pub overload_logged: std::sync::atomic::AtomicU64,
    /// Log lines dropped because stderr fell behind (one counter for the process).
    pub log_lines_dropped: IntCounter,
    pub cache_size_bytes: IntGauge,
    pub cache_objects: IntGauge,
    pub evictions: IntCounterVec,
    pub evicted_bytes: IntCounterVec,
    /// Time from a blob request's arrival to its first body byte, by source.
    pub blob_first_byte: HistogramVec,
    /// Time to an upstream's response headers, per HTTP exchange.
    pub upstream_first_byte: HistogramVec,
    /// Time for a whole upstream operation (auth, redirects and body included).
    pub upstream_duration: HistogramVec,
    pub upstream_rate_limited: IntCounterVec,
    /// Runs of an upstream's `credential_helper` / `credential_command`, by result.
    pub credential_runs: IntCounterVec,
    pub ratelimit_limit: IntGaugeVec,
    pub ratelimit_remaining: IntGaugeVec,
    pub followers_waiting: IntGauge,
    pub cache_max_size: IntGauge,
    /// Requests refused by `[auth]`/`[[access]]`, by reason (missing, invalid, denied).
    pub auth_failures: IntCounterVec,
    /// Loads of a changed htpasswd file, by result (ok, error: the users before are kept).
    pub auth_reloads: IntCounterVec,
    /// Cached blobs asked for under a repository not known to hold them, by answer.
    pub blob_link_checks: IntCounterVec,
    /// Connections being served on `server.listen`, and the most it serves at once.
    pub connections_open: IntGauge,
    pub connections_limit: IntGauge,
    /// Idle keep-alive connections closed at the limit to make room for new ones.
    pub connections_reclaimed: IntCounter,
    /// Requests waiting for a turn under an upstream's `max_connections`.
    pub upstream_waiting: IntGaugeVec,
    /// 1 while an upstream's circuit breaker is open (taken for down).
    pub upstream_circuit_open: IntGaugeVec,
    /// When each upstream last answered well, and last failed (no answer, 429 or 5xx), in
    /// seconds since the epoch; absent until it happens (a zero would read as 1970).
    pub upstream_last_success: IntGaugeVec,
    pub upstream_last_error: IntGaugeVec,
    /// Requests between replicas (`[cluster]`), by direction and result.
    pub peer_requests: IntCounterVec,
    /// Replicas taken for live, this one included.
    pub cluster_peers_live: IntGauge,
    /// Requests to the bucket, by op and result; and their durations, by op.
    pub storage_requests: IntCounterVec,
    pub storage_request_seconds: HistogramVec,
    /// The children of the closed-set series that every request touches, looked up once:
    /// `with_label_values` hashes its labels and takes a lock on each call.
    lookup_series: [[IntCounter; LOOKUPS.len()]; 4],
    served_series: [IntCounter; 3],
    peer_series: [[IntCounter; PeerResult::ALL.len()]; PeerDirection::ALL.len()],
    duration_series: [Histogram; RouteLabel::ALL.len()],
    /// `requests_total{route, code}` for the codes most answers carry, made on first use (so
    /// that, as for every other code, a series appears with its first request).
    request_series: [[OnceLock<IntCounter>; COMMON_CODES.len()]; RouteLabel::ALL.len()],
    /// Integrity at rest (quarantine, scrub), read from the store at scrape time.
    pub integrity: IntegrityMetrics,
}

/// Defines metrics in one registry. The definitions are static, so a failure is a bug that every
/// start would hit at once.
struct Defs<'a>(&'a Registry);

impl Defs<'_> {
    fn register<M: prometheus::core::Collector + Clone + 'static>(&self, m: M) -> M {
        self.0
            .register(Box::new(m.clone()))
            .expect("metric registered once");
        m
    }

    fn counter(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.register(
            IntCounterVec::new(Opts::new(name, help), labels).expect("static metric definition"),
        )
    }

    fn histogram(&self, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
        let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
        self.register(HistogramVec::new(opts, labels).expect("static metric definition"))
    }

    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.register(IntGauge::new(name, help).expect("static metric definition"))
    }

    fn gauge_vec(&self, name: &str, help: &str) -> IntGaugeVec {
        self.register(
            IntGaugeVec::new(Opts::new(name, help), &["upstream"])
                .expect("static metric definition"),
        )
    }
}

/// Status codes whose `requests_total` children are kept at hand.
const COMMON_CODES: [u16; 4] = [200, 206, 304, 404];

/// Buckets for latencies from sub-millisecond cache hits to multi-second upstream fetches.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Upstream status codes pre-created at zero ("error": no answer).
const PRECREATED_CODES: [&str; 9] = [
    "200", "401", "404", "429", "500", "502", "503", "504", "error",
];

impl Metrics {
    /// Defines every series and pre-creates the closed-set ones at zero. Long by nature, not by
    /// logic: one short definition per metric, kept in one place so the names, help texts and
    /// labels can be read together.
    pub fn new(upstreams: &[&str]) -> Metrics {
        let registry = Registry::new();
        let d = Defs(&registry);
        let lookups = d.counter(
            "cachalot_cache_lookups_total",
            "Cache lookups by kind (manifest, blob) and result (hit, miss, coalesced, stale, revalidated, peer).",
            &["kind", "result"],
        );
        let served_bytes = d.counter(
            "cachalot_served_bytes_total",
            "Body bytes sent to clients, by source.",
            &["source"],
        );
        let peer_requests = d.counter(
            "cachalot_peer_requests_total",
            "Requests between replicas, by direction (out, in) and result (ok, error, refused, timeout).",
            &["direction", "result"],
        );
        let request_duration = d.histogram(
            "cachalot_request_duration_seconds",
            "Time to answer a request (headers sent), by route.",
            &["route"],
        );
        let m = Metrics {
            requests: d.counter(
                "cachalot_requests_total",
                "HTTP requests served, by route and status code.",
                &["route", "code"],
            ),
            upstream_requests: d.counter(
                "cachalot_upstream_requests_total",
                "Requests sent to upstream registries, by upstream, operation and status code.",
                &["upstream", "op", "code"],
            ),
            upstream_bytes: d.counter(
                "cachalot_upstream_bytes_total",
                "Body bytes fetched from each upstream.",
                &["upstream"],
            ),
            digest_mismatches: d.counter(
                "cachalot_digest_mismatches_total",
                "Upstream bodies discarded because they did not match their digest.",
                &["upstream"],
            ),
            upstream_body_errors: d.counter(
                "cachalot_upstream_body_errors_total",
                "Upstream blob bodies discarded because they were truncated or broken (reason: truncated, protocol).",
                &["upstream", "reason"],
            ),
            token_fetches: d.counter(
                "cachalot_token_fetches_total",
                "Bearer token fetches by upstream and result.",
                &["upstream", "result"],
            ),
            tls_reloads: d.counter(
                "cachalot_tls_reloads_total",
                "Server certificate reloads (file change or SIGHUP), by result (ok, failed: the previous pair stays in use).",
                &["result"],
            ),
            fills_in_flight: d.gauge(
                "cachalot_fills_in_flight",
                "Blob fills from upstream in progress.",
            ),
            fill_source_fallbacks: d.counter(
                "cachalot_fill_source_fallbacks_total",
                "Fills whose source (peer, bucket) failed midway and went on from the upstream at the byte reached.",
                &["from"],
            ),
            cache_write_errors: d.register(
                IntCounter::new(
                    "cachalot_cache_write_errors_total",
                    "Failed writes to the cache.",
                )
                .expect("static metric definition"),
            ),
            overloaded: d.register(
                IntCounter::new(
                    "cachalot_overloaded_total",
                    "Requests answered 503 because the process ran out of open files or memory (load, not a bug).",
                )
                .expect("static metric definition"),
            ),
            overload_logged: std::sync::atomic::AtomicU64::new(0),
            log_lines_dropped: d.register(crate::log_writer::dropped_counter().clone()),
            blob_first_byte: d.histogram(
                "cachalot_blob_first_byte_seconds",
                "Time from a blob GET's arrival to its first body byte, by source (cache, fill).",
                &["source"],
            ),
            upstream_first_byte: d.histogram(
                "cachalot_upstream_first_byte_seconds",
                "Time to an upstream's response headers, per HTTP exchange, by upstream and operation.",
                &["upstream", "op"],
            ),
            upstream_duration: d.histogram(
                "cachalot_upstream_duration_seconds",
                "Time for a whole upstream operation (auth, redirects and body), by upstream and operation.",
                &["upstream", "op"],
            ),
            upstream_rate_limited: d.counter(
                "cachalot_upstream_rate_limited_total",
                "Upstream answers with status 429 (Too Many Requests).",
                &["upstream"],
            ),
            credential_runs: d.counter(
                "cachalot_upstream_credential_runs_total",
                "Runs of an upstream's credential_helper or credential_command, by result (ok, error).",
                &["upstream", "result"],
            ),
            // Not pre-created: a zero `remaining` for an upstream that never sent the header
            // would read as an exhausted rate limit.
            ratelimit_limit: d.gauge_vec(
                "cachalot_upstream_ratelimit_limit",
                "Requests allowed per window, from the upstream's last `ratelimit-limit` header.",
            ),
            ratelimit_remaining: d.gauge_vec(
                "cachalot_upstream_ratelimit_remaining",
                "Requests left in the window, from the upstream's last `ratelimit-remaining` header.",
            ),
            followers_waiting: d.gauge(
                "cachalot_followers_waiting",
                "Responses streaming a blob from a fill in progress (the fill's first client included).",
            ),
            cache_max_size: d.gauge(
                "cachalot_cache_max_size_bytes",
                "The configured disk bound of the cache (cache.max_size).",
            ),
            blob_link_checks: d.counter(
                "cachalot_blob_link_checks_total",
                "Blobs asked for under a repository not known to hold them, checked with the upstream, by result (confirmed, refused, failed).",
                &["result"],
            ),
            connections_open: d.gauge(
                "cachalot_connections_open",
                "Client connections being served on server.listen.",
            ),
            connections_limit: d.gauge(
                "cachalot_connections_limit",
                "The most client connections served at once (server.max_connections).",
            ),
            connections_reclaimed: d.register(
                IntCounter::new(
                    "cachalot_connections_reclaimed_total",
                    "Idle keep-alive connections closed at server.max_connections to make room for a new one.",
                )
                .expect("static metric definition"),
            ),
            upstream_waiting: d.gauge_vec(
                "cachalot_upstream_requests_waiting",
                "Requests waiting for a turn under the upstream's max_connections.",
            ),
            upstream_circuit_open: d.gauge_vec(
                "cachalot_upstream_circuit_open",
                "1 while the upstream's circuit breaker is open: requests fail at once, cached content is served.",
            ),
            // Not pre-created, like the rate-limit gauges: absent means "never".
            upstream_last_success: d.gauge_vec(
                "cachalot_upstream_last_success_timestamp_seconds",
                "When the upstream last answered other than 429 or 5xx (seconds since the epoch).",
            ),
            upstream_last_error: d.gauge_vec(
                "cachalot_upstream_last_error_timestamp_seconds",
                "When a request to the upstream last got no answer, a 429 or a 5xx (seconds since the epoch).",
            ),
            cluster_peers_live: d.gauge(
                "cachalot_cluster_peers_live",
                "Replicas of the cluster taken for live (answering /healthz), this one included.",
            ),
            cache_size_bytes: d.gauge(
                "cachalot_cache_size_bytes",
                "Bytes of content in the cache.",
            ),
            cache_objects: d.gauge(
                "cachalot_cache_objects",
                "Objects (blobs and manifests) in the cache.",
            ),
            evictions: d.counter(
                "cachalot_evictions_total",
                "Objects evicted from the cache, by reason (size, unused).",
                &["reason"],
            ),
            evicted_bytes: d.counter(
                "cachalot_evicted_bytes_total",
                "Bytes evicted from the cache, by reason (size, unused).",
                &["reason"],
            ),
            auth_failures: d.counter(
                "cachalot_auth_failures_total",
                "Requests refused by client authentication or access rules, by reason (missing, invalid, denied).",
                &["reason"],
            ),
            auth_reloads: d.counter(
                "cachalot_auth_reloads_total",
                "Loads of a changed htpasswd file, by result (ok; error: the users loaded before are kept).",
                &["result"],
            ),
            storage_requests: d.counter(
                "cachalot_storage_requests_total",
                "Requests to the storage bucket, by operation and result (ok, not_found, error).",
                &["op", "result"],
            ),
            storage_request_seconds: d.histogram(
                "cachalot_storage_request_seconds",
                "Time for a request to the storage bucket (to its response headers; a listing whole), by operation.",
                &["op"],
            ),
            // Indexed by `Kind as usize` and `Lookup as usize`.
            lookup_series: [Kind::Manifest, Kind::Blob, Kind::Tags, Kind::Referrers].map(|kind| {
                LOOKUPS.map(|r| lookups.with_label_values(&[kind.as_str(), r.as_str()]))
            }),
            // Indexed by `Source as usize`.
            served_series: [Source::Cache, Source::Fill, Source::Upstream]
                .map(|s| served_bytes.with_label_values(&[s.as_str()])),
            // Indexed by `RouteLabel as usize`.
            duration_series: RouteLabel::ALL
                .map(|route| request_duration.with_label_values(&[route.as_str()])),
            // Indexed by `PeerDirection as usize` and `PeerResult as usize`; every one exists at
            // zero, so an alert on refused peer requests sees the first one.
            peer_series: PeerDirection::ALL.map(|d| {
                PeerResult::ALL.map(|r| peer_requests.with_label_values(&[d.as_str(), r.as_str()]))
            }),
            request_series: Default::default(),
            integrity: IntegrityMetrics::new(&d),
            peer_requests,
            lookups,
            served_bytes,
            request_duration,
            registry,
        };
        m.precreate(upstreams);
        m
    }

    /// Creates the closed-set series at zero, so dashboards see them before traffic.
    fn precreate(&self, upstreams: &[&str]) {
        for c in LinkCheck::ALL {
            self.blob_link_checks.with_label_values(&[c.as_str()]);
        }
        for r in ["size", "unused"] {
            self.evictions.with_label_values(&[r]);
            self.evicted_bytes.with_label_values(&[r]);
        }
        for r in ["missing", "invalid", "denied"] {
            self.auth_failures.with_label_values(&[r]);
        }
        for r in ["ok", "error"] {
            self.auth_reloads.with_label_values(&[r]);
        }
        for s in [Source::Cache, Source::Fill] {
            self.blob_first_byte.with_label_values(&[s.as_str()]);
        }
        for r in ["ok", "failed"] {
            self.tls_reloads.with_label_values(&[r]);
        }
        for op in StorageOp::ALL.map(StorageOp::as_str) {
            for r in StorageResult::ALL.map(StorageResult::as_str) {
                self.storage_requests.with_label_values(&[op, r]);
            }
            self.storage_request_seconds.with_label_values(&[op]);
        }
        for u in upstreams {
            self.upstream_bytes.with_label_values(&[u]);
            self.digest_mismatches.with_label_values(&[u]);
            for f in BodyFault::ALL {
                self.upstream_body_errors
                    .with_label_values(&[u, f.as_str()]);
            }
            self.upstream_rate_limited.with_label_values(&[u]);
            self.upstream_waiting.with_label_values(&[u]);
            self.upstream_circuit_open.with_label_values(&[u]);
            for result in ["ok", "error"] {
                self.token_fetches.with_label_values(&[u, result]);
            }
            for op in Op::ALL.map(Op::as_str) {
                // rate() cannot see the first increment of a series that appears already at 1,
                // so the codes the alerts and dashboard watch exist from the start.
                for code in PRECREATED_CODES {
                    self.upstream_requests.with_label_values(&[u, op, code]);
                }
                self.upstream_first_byte.with_label_values(&[u, op]);
                self.upstream_duration.with_label_values(&[u, op]);
            }
        }
    }

    /// Whether this is the first overload of the current second (the one to log).
    pub fn first_overload_this_second(&self) -> bool {
        use std::sync::atomic::Ordering;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.overload_logged.swap(now, Ordering::Relaxed) != now
    }

    /// Counts one answered request of `route` and observes its duration since `started`.
    pub fn request(&self, route: RouteLabel, status: http::StatusCode, started: Instant) {
        let r = route as usize;
        let count = || {
            self.requests
                .with_label_values(&[route.as_str(), status.as_str()])
        };
        match COMMON_CODES.iter().position(|c| *c == status.as_u16()) {
            Some(c) => self.request_series[r][c].get_or_init(count).inc(),
            None => count().inc(),
        }
        self.duration_series[r].observe(started.elapsed().as_secs_f64());
    }

    /// Counts a lookup.
    pub fn lookup(&self, kind: Kind, result: Lookup) {
        self.lookup_series[kind as usize][result as usize].inc();
    }

    /// Counts an upstream body discarded for `fault`.
    pub fn upstream_body_error(&self, upstream: &str, fault: BodyFault) {
        self.upstream_body_errors
            .with_label_values(&[upstream, fault.as_str()])
            .inc();
    }

    /// Counts a fill that left a failed `from` (peer, bucket) for the upstream.
    pub fn fill_source_fallback(&self, from: &str) {
        self.fill_source_fallbacks.with_label_values(&[from]).inc();
    }

    /// Observes a whole upstream operation that started at `started`.
    pub fn upstream_done(&self, upstream: &str, op: &str, started: std::time::Instant) {
        self.upstream_duration
            .with_label_values(&[upstream, op])
            .observe(started.elapsed().as_secs_f64());
    }

    /// Updates the rate-limit gauges from Docker Hub style headers (`ratelimit-limit:
    /// 100;w=21600`, `ratelimit-remaining: 76;w=21600`); absent or malformed headers change
    /// nothing.
    pub fn rate_limit_headers(&self, upstream: &str, headers: &http::HeaderMap) {
        let value = |name: &str| -> Option<i64> {
            let v = headers.get(name)?.to_str().ok()?;
            v.split(';').next()?.trim().parse().ok()
        };
        if let Some(limit) = value("ratelimit-limit") {
            self.ratelimit_limit
                .with_label_values(&[upstream])
                .set(limit);
        }
        if let Some(remaining) = value("ratelimit-remaining") {
            self.ratelimit_remaining
                .with_label_values(&[upstream])
                .set(remaining);
        }
    }

    /// Counts one request between replicas.
    pub fn peer_request(&self, direction: PeerDirection, result: PeerResult) {
        self.peer_series[direction as usize][result as usize].inc();
    }

    pub fn served(&self, source: Source, bytes: u64) {
        self.served_series[source as usize].inc_by(bytes);
    }

    /// Counts one upstream request; `code` is the HTTP status, or `None` when no answer came.
    pub fn upstream_request(&self, upstream: &str, op: &'static str, code: Option<u16>) {
        let failed = code.is_none_or(|c| c == 429 || c >= 500);
        let when = if failed {
            &self.upstream_last_error
        } else {
            &self.upstream_last_success
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        when.with_label_values(&[upstream])
            .set(i64::try_from(now).unwrap_or(i64::MAX));
        let code = code.map(|c| c.to_string());
        self.upstream_requests
            .with_label_values(&[upstream, op, code.as_deref().unwrap_or("error")])
            .inc();
    }

    /// Counts one bucket request and observes its duration since `started`.
    pub fn storage_request(&self, op: StorageOp, result: StorageResult, started: Instant) {
        self.storage_requests
            .with_label_values(&[op.as_str(), result.as_str()])
            .inc();
        self.storage_request_seconds
            .with_label_values(&[op.as_str()])
            .observe(started.elapsed().as_secs_f64());
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

/// The integrity series. The store counts in atomics (it has no registry); these follow them
/// at each scrape ([`IntegrityMetrics::update`]).
pub struct IntegrityMetrics {
    quarantined: IntCounterVec,
    adopted: IntCounter,
    scrub_corrupt: IntCounter,
    scrub_bytes: IntCounter,
    scrub_objects: IntCounter,
    scrub_last_pass: IntGauge,
}

impl IntegrityMetrics {
    fn new(d: &Defs<'_>) -> IntegrityMetrics {
        let counter = |name: &str, help: &str| {
            d.register(IntCounter::new(name, help).expect("static metric definition"))
        };
        let quarantined = d.counter(
            "cachalot_quarantined_total",
            "Stored objects found damaged and moved to quarantine/ (the cache directory's, or the bucket's when a scrub reads it back; reason: size, digest, unreadable); each is fetched again on its next pull.",
            &["reason"],
        );
        for r in crate::storage::integrity::Reason::ALL {
            quarantined.with_label_values(&[r.as_str()]);
        }
        IntegrityMetrics {
            quarantined,
            adopted: counter(
                "cachalot_cache_adopted_total",
                "Files found in the cache without a metadata record at start, adopted unverified (hashed when first served).",
            ),
            scrub_corrupt: counter(
                "cachalot_scrub_corrupt_total",
                "Stored objects a scrub pass or `cachalot verify` found damaged (and quarantined).",
            ),
            scrub_bytes: counter(
                "cachalot_scrub_bytes_total",
                "Bytes of stored objects re-hashed by scrub passes and `cachalot verify`.",
            ),
            scrub_objects: counter(
                "cachalot_scrub_objects_total",
                "Stored objects re-hashed by scrub passes and `cachalot verify`.",
            ),
            scrub_last_pass: d.gauge(
                "cachalot_scrub_last_pass_timestamp_seconds",
                "When the last complete scrub pass over the cache ended, in seconds since the epoch (0: none yet).",
            ),
        }
    }

    /// Brings the series up to the store's counters.
    pub fn update(&self, c: &crate::storage::integrity::Counters) {
        use std::sync::atomic::Ordering::Relaxed;
        let follow = |m: &IntCounter, v: u64| m.inc_by(v.saturating_sub(m.get()));
        for r in crate::storage::integrity::Reason::ALL {
            follow(
                &self.quarantined.with_label_values(&[r.as_str()]),
                c.quarantined(r),
            );
        }
        follow(&self.adopted, c.adopted.load(Relaxed));
        follow(&self.scrub_corrupt, c.scrub_corrupt.load(Relaxed));
        follow(&self.scrub_bytes, c.scrub_bytes.load(Relaxed));
        follow(&self.scrub_objects, c.scrub_objects.load(Relaxed));
        self.scrub_last_pass
            .set(i64::try_from(c.scrub_last_pass.load(Relaxed)).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_precreated_series() {
        let m = Metrics::new(&["docker.io"]);
        m.lookup(Kind::Blob, Lookup::Hit);
        m.upstream_request("docker.io", "blob", Some(200));
        let text = String::from_utf8(m.render()).unwrap();
        assert!(
            text.contains("cachalot_cache_lookups_total{kind=\"blob\",result=\"hit\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("cachalot_cache_lookups_total{kind=\"manifest\",result=\"stale\"} 0")
        );
        assert!(text.contains(
            "cachalot_upstream_requests_total{code=\"200\",op=\"blob\",upstream=\"docker.io\"} 1"
        ));
        assert!(text.contains(
            "cachalot_upstream_first_byte_seconds_count{op=\"token\",upstream=\"docker.io\"} 0"
        ));
        assert!(!text.contains("cachalot_upstream_ratelimit_remaining"));
        assert!(
            text.contains("cachalot_storage_requests_total{op=\"complete\",result=\"error\"} 0")
        );
        assert!(text.contains("cachalot_storage_request_seconds_count{op=\"list\"} 0"));
    }

    #[test]
    fn peer_series_exist_at_zero_and_count() {
        let m = Metrics::new(&[]);
        m.lookup(Kind::Blob, Lookup::Peer);
        m.peer_request(PeerDirection::In, PeerResult::Refused);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains("cachalot_cache_lookups_total{kind=\"blob\",result=\"peer\"} 1"));
        assert!(text.contains("cachalot_cache_lookups_total{kind=\"manifest\",result=\"peer\"} 0"));
        assert!(
            text.contains("cachalot_peer_requests_total{direction=\"in\",result=\"refused\"} 1")
        );
        for d in ["out", "in"] {
            for r in ["ok", "error", "timeout"] {
                let line =
                    format!("cachalot_peer_requests_total{{direction=\"{d}\",result=\"{r}\"}} 0");
                assert!(text.contains(&line), "{line}");
            }
        }
        assert!(text.contains("cachalot_cluster_peers_live 0"));
    }

    #[test]
    fn label_values_stay_as_dashboards_know_them() {
        assert_eq!(
            RouteLabel::ALL.map(RouteLabel::as_str),
            [
                "manifest",
                "blob",
                "tags",
                "referrers",
                "base",
                "catalog",
                "other"
            ]
        );
        assert_eq!(
            Op::ALL.map(Op::as_str),
            ["manifest", "blob", "tags", "referrers", "ping", "token"]
        );
        // The per-route series are indexed by `RouteLabel as usize`.
        for (i, r) in RouteLabel::ALL.into_iter().enumerate() {
            assert_eq!(r as usize, i, "{r:?}");
        }
    }

    #[test]
    fn every_route_label_is_counted_and_timed() {
        let m = Metrics::new(&[]);
        for r in RouteLabel::ALL {
            m.request(r, http::StatusCode::OK, Instant::now());
            m.request(r, http::StatusCode::IM_A_TEAPOT, Instant::now());
        }
        let text = String::from_utf8(m.render()).unwrap();
        for r in RouteLabel::ALL.map(RouteLabel::as_str) {
            for code in ["200", "418"] {
                let line = format!("cachalot_requests_total{{code=\"{code}\",route=\"{r}\"}} 1");
                assert!(text.contains(&line), "{line}");
            }
            let line = format!("cachalot_request_duration_seconds_count{{route=\"{r}\"}} 2");
            assert!(text.contains(&line), "{line}");
        }
    }

    #[test]
    fn parses_rate_limit_headers() {
        let m = Metrics::new(&["docker.io"]);
        let mut h = http::HeaderMap::new();
        h.insert("ratelimit-limit", "100;w=21600".parse().unwrap());
        h.insert("ratelimit-remaining", " 76;w=21600".parse().unwrap());
        m.rate_limit_headers("docker.io", &h);
        let g = |v: &IntGaugeVec| v.with_label_values(&["docker.io"]).get();
        assert_eq!(
            (g(&m.ratelimit_limit), g(&m.ratelimit_remaining)),
            (100, 76)
        );
        // A malformed value leaves the last good one.
        h.insert("ratelimit-remaining", "lots".parse().unwrap());
        m.rate_limit_headers("docker.io", &h);
        assert_eq!(g(&m.ratelimit_remaining), 76);
    }
}
