//! Runs cachalot in-process (`cachalot::server::spawn`) on 127.0.0.1:0 with a temp cache
//! directory, configured against fake upstreams.

use std::path::{Path, PathBuf};

use super::client::TestClient;
use super::fake_registry::FakeRegistry;

/// Name of the single upstream that [`Env::start`] configures.
pub const UP: &str = "fake.local";

/// One `[[upstream]]` table.
#[derive(Clone, Debug)]
pub struct UpstreamSpec {
    /// `name`.
    pub name: String,
    /// `url`.
    pub url: String,
    /// `default`.
    pub default: bool,
    /// Extra TOML lines for the table (`username = ...`).
    pub extra: String,
}

impl UpstreamSpec {
    /// An upstream named `name` at `url`.
    pub fn new(name: &str, url: &str, default: bool) -> UpstreamSpec {
        UpstreamSpec {
            name: name.into(),
            url: url.into(),
            default,
            extra: String::new(),
        }
    }

    /// Adds TOML lines to the table.
    pub fn with(mut self, extra: &str) -> UpstreamSpec {
        self.extra.push_str(extra);
        self.extra.push('\n');
        self
    }
}

/// Cache settings of the generated config.
#[derive(Clone, Debug)]
pub struct CacheSpec {
    /// `tag_ttl`.
    pub tag_ttl: String,
    /// `offline`.
    pub offline: bool,
}

impl Default for CacheSpec {
    fn default() -> Self {
        CacheSpec {
            tag_ttl: "5m".into(),
            offline: false,
        }
    }
}

/// The TOML text of a config for a proxy with cache dir `dir`.
pub fn config_toml(dir: &Path, cache: &CacheSpec, ups: &[UpstreamSpec]) -> String {
    let mut s = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[cache]\ndir = {dir:?}\nmax_size = \"1GiB\"\nmemory = \"64MiB\"\ntag_ttl = {:?}\noffline = {}\n",
        cache.tag_ttl,
        cache.offline,
        dir = dir.to_str().expect("utf-8 temp path"),
    );
    for u in ups {
        let has = |k: &str| {
            u.extra
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{k} ")))
        };
        s.push_str(&format!(
            "\n[[upstream]]\nname = {:?}\nurl = {:?}\ndefault = {}\n",
            u.name, u.url, u.default
        ));
        if !has("connect_timeout") {
            s.push_str("connect_timeout = \"2s\"\n");
        }
        if !has("timeout") {
            s.push_str("timeout = \"10s\"\n");
        }
        s.push_str(&u.extra);
    }
    s
}

/// A running cachalot.
pub struct Proxy {
    server: Option<cachalot::server::Server>,
    addr: std::net::SocketAddr,
}

impl Proxy {
    /// Spawns cachalot with this config text.
    pub async fn start(toml: &str) -> Proxy {
        let config = cachalot::config::Config::from_toml_str(toml)
            .unwrap_or_else(|e| panic!("config rejected: {e}\n{toml}"));
        let server = cachalot::server::spawn(config)
            .await
            .expect("cachalot::server::spawn");
        let addr = server.local_addr();
        Proxy {
            server: Some(server),
            addr,
        }
    }

    /// The running server (its mirror, for eviction passes).
    pub fn server(&self) -> &cachalot::server::Server {
        self.server.as_ref().expect("proxy running")
    }

    /// Where it listens.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Where `server.metrics_listen` is bound, when configured.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.server.as_ref().and_then(|s| s.metrics_addr())
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the server (waits for it).
    pub async fn shutdown(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // The Server's own drop releases it; nothing to await here.
        self.server.take();
    }
}

/// A fake upstream, a cachalot in front of it (upstream [`UP`], default), and a client.
pub struct Env {
    /// The fake upstream.
    pub fake: FakeRegistry,
    /// The proxy.
    pub proxy: Proxy,
    /// A pooled client.
    pub client: TestClient,
    /// The cache directory (kept alive with the env).
    pub dir: tempfile::TempDir,
    /// The cache settings used.
    pub cache: CacheSpec,
    /// The upstreams configured.
    pub upstreams: Vec<UpstreamSpec>,
}

impl Env {
    /// Default settings: one default upstream named [`UP`].
    pub async fn start() -> Env {
        Env::start_with(CacheSpec::default(), "").await
    }

    /// With cache settings and extra TOML lines for the upstream table.
    pub async fn start_with(cache: CacheSpec, upstream_extra: &str) -> Env {
        let fake = FakeRegistry::start().await;
        let ups = vec![UpstreamSpec::new(UP, &fake.url(), true).with(upstream_extra)];
        Env::start_on(fake, cache, ups).await
    }

    /// With a given fake and upstream list.
    pub async fn start_on(
        fake: FakeRegistry,
        cache: CacheSpec,
        upstreams: Vec<UpstreamSpec>,
    ) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let proxy = Proxy::start(&config_toml(dir.path(), &cache, &upstreams)).await;
        Env {
            fake,
            proxy,
            client: TestClient::new(),
            dir,
            cache,
            upstreams,
        }
    }

    /// Stops the proxy and starts a new one on the same cache dir (optionally with other cache
    /// settings).
    pub async fn restart_proxy(&mut self, cache: Option<CacheSpec>) {
        self.proxy.shutdown().await;
        if let Some(c) = cache {
            self.cache = c;
        }
        self.proxy =
            Proxy::start(&config_toml(self.dir.path(), &self.cache, &self.upstreams)).await;
        self.client = TestClient::new();
    }

    /// `<proxy>/v2/<path>`.
    pub fn v2(&self, path: &str) -> String {
        format!("{}/v2/{path}", self.proxy.url())
    }

    /// `<proxy><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.proxy.url())
    }

    /// The /metrics text.
    pub async fn metrics(&self) -> String {
        let r = self.client.get(&self.url("/metrics")).await;
        assert_eq!(r.status, 200, "/metrics");
        r.text()
    }

    /// Sum of the samples of `name` whose labels include all of `labels`.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.metrics().await, name, labels)
    }

    /// Waits (with a safety net) until the sample of `name` with `labels` reads `want`: for
    /// what a test must know has happened (followers joined a fill), rather than a sleep.
    pub async fn wait_metric(&self, name: &str, labels: &[(&str, &str)], want: f64) {
        let deadline = tokio::time::Instant::now() + super::client::SAFETY;
        loop {
            let v = self.metric(name, labels).await;
            if v == want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "safety timeout: {name}{labels:?} is {v}, want {want}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Waits until `n` requests have joined a blob fill someone else started
    /// (`cachalot_cache_lookups_total{kind="blob",result="coalesced"}`).
    pub async fn wait_coalesced(&self, n: usize) {
        let labels = [("kind", "blob"), ("result", "coalesced")];
        self.wait_metric("cachalot_cache_lookups_total", &labels, n as f64)
            .await;
    }

    /// Waits (with a safety net) until no blob fill is in flight (`cachalot_fills_in_flight` 0).
    pub async fn wait_no_fills(&self) {
        let deadline = tokio::time::Instant::now() + super::client::SAFETY;
        while self.metric("cachalot_fills_in_flight", &[]).await > 0.0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "safety timeout: fills still in flight"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Files under the cache dir whose name is the hex part of `digest` (a stored blob or manifest).
    pub fn stored_files(&self, digest: &str) -> Vec<PathBuf> {
        files_named(self.dir.path(), digest.trim_start_matches("sha256:"))
    }
}

/// Sum of the samples of `name` in Prometheus text `text` whose labels include `labels`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (label_part, value) = if let Some(r) = rest.strip_prefix('{') {
            let Some(end) = r.find('}') else { continue };
            (&r[..end], r[end + 1..].trim())
        } else if rest.starts_with(' ') {
            ("", rest.trim())
        } else {
            continue;
        };
        let ok = labels.iter().all(|(k, v)| {
            label_part
                .split(',')
                .any(|kv| kv.trim() == format!("{k}=\"{v}\""))
        });
        if ok {
            sum += value
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
        }
    }
    sum
}

fn files_named(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut out = vec![];
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_named(&p, name));
        } else if p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.contains(name))
        {
            out.push(p);
        }
    }
    out
}
