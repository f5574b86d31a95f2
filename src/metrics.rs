//! Every metric, defined once. Label values come from closed sets: never a repository, tag or
//! digest, so the series count stays bounded whatever clients ask for.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// Routes, as counted in `cachalot_requests_total`.
pub const ROUTES: [&str; 6] = ["manifest", "blob", "tags", "referrers", "base", "other"];

/// Cache lookup kinds and results.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Manifest,
    Blob,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    Hit,
    Miss,
    Coalesced,
    Stale,
    Revalidated,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Manifest => "manifest",
            Kind::Blob => "blob",
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
    pub token_fetches: IntCounterVec,
    pub fills_in_flight: IntGauge,
    pub cache_write_errors: prometheus::IntCounter,
    pub cache_size_bytes: IntGauge,
    pub cache_objects: IntGauge,
    pub evictions: IntCounterVec,
    pub evicted_bytes: IntCounterVec,
}

impl Metrics {
    pub fn new(upstreams: &[&str]) -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)
                .expect("static metric definition");
            registry
                .register(Box::new(c.clone()))
                .expect("metric registered once");
            c
        };
        let requests = counter(
            "cachalot_requests_total",
            "HTTP requests served, by route and status code.",
            &["route", "code"],
        );
        let lookups = counter(
            "cachalot_cache_lookups_total",
            "Cache lookups by kind (manifest, blob) and result (hit, miss, coalesced, stale, revalidated).",
            &["kind", "result"],
        );
        let served_bytes = counter(
            "cachalot_served_bytes_total",
            "Body bytes sent to clients, by source.",
            &["source"],
        );
        let upstream_requests = counter(
            "cachalot_upstream_requests_total",
            "Requests sent to upstream registries, by upstream, operation and status code.",
            &["upstream", "op", "code"],
        );
        let upstream_bytes = counter(
            "cachalot_upstream_bytes_total",
            "Body bytes fetched from each upstream.",
            &["upstream"],
        );
        let digest_mismatches = counter(
            "cachalot_digest_mismatches_total",
            "Upstream bodies discarded because they did not match their digest or were truncated.",
            &["upstream"],
        );
        let token_fetches = counter(
            "cachalot_token_fetches_total",
            "Bearer token fetches by upstream and result.",
            &["upstream", "result"],
        );
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "cachalot_request_duration_seconds",
                "Time to answer a request (headers sent), by route.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &["route"],
        )
        .expect("static metric definition");
        registry
            .register(Box::new(request_duration.clone()))
            .expect("metric registered once");
        let fills_in_flight = IntGauge::new(
            "cachalot_fills_in_flight",
            "Blob fills from upstream in progress.",
        )
        .expect("static metric definition");
        registry
            .register(Box::new(fills_in_flight.clone()))
            .expect("metric registered once");
        let cache_write_errors = prometheus::IntCounter::new(
            "cachalot_cache_write_errors_total",
            "Failed writes to the cache.",
        )
        .expect("static metric definition");
        registry
            .register(Box::new(cache_write_errors.clone()))
            .expect("metric registered once");

        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("static metric definition");
            registry
                .register(Box::new(g.clone()))
                .expect("metric registered once");
            g
        };
        let cache_size_bytes = gauge(
            "cachalot_cache_size_bytes",
            "Bytes of content in the cache.",
        );
        let cache_objects = gauge(
            "cachalot_cache_objects",
            "Objects (blobs and manifests) in the cache.",
        );
        let evictions = counter(
            "cachalot_evictions_total",
            "Objects evicted from the cache, by reason (size, unused).",
            &["reason"],
        );
        let evicted_bytes = counter(
            "cachalot_evicted_bytes_total",
            "Bytes evicted from the cache, by reason (size, unused).",
            &["reason"],
        );
        for r in ["size", "unused"] {
            evictions.with_label_values(&[r]);
            evicted_bytes.with_label_values(&[r]);
        }

        // Pre-create the closed-set series at zero so dashboards see them before traffic.
        for kind in [Kind::Manifest, Kind::Blob] {
            for r in [
                Lookup::Hit,
                Lookup::Miss,
                Lookup::Coalesced,
                Lookup::Stale,
                Lookup::Revalidated,
            ] {
                lookups.with_label_values(&[kind.as_str(), r.as_str()]);
            }
        }
        for s in [Source::Cache, Source::Fill, Source::Upstream] {
            served_bytes.with_label_values(&[s.as_str()]);
        }
        for u in upstreams {
            upstream_bytes.with_label_values(&[u]);
            digest_mismatches.with_label_values(&[u]);
        }
        Metrics {
            registry,
            requests,
            request_duration,
            lookups,
            served_bytes,
            upstream_requests,
            upstream_bytes,
            digest_mismatches,
            token_fetches,
            fills_in_flight,
            cache_write_errors,
            cache_size_bytes,
            cache_objects,
            evictions,
            evicted_bytes,
        }
    }

    pub fn lookup(&self, kind: Kind, result: Lookup) {
        self.lookups
            .with_label_values(&[kind.as_str(), result.as_str()])
            .inc();
    }

    pub fn served(&self, source: Source, bytes: u64) {
        self.served_bytes
            .with_label_values(&[source.as_str()])
            .inc_by(bytes);
    }

    /// Counts one upstream request; `code` is the HTTP status, or `None` when no answer came.
    pub fn upstream_request(&self, upstream: &str, op: &'static str, code: Option<u16>) {
        let code = code.map(|c| c.to_string());
        self.upstream_requests
            .with_label_values(&[upstream, op, code.as_deref().unwrap_or("error")])
            .inc();
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
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
    }
}
