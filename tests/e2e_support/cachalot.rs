//! Running cachalot in-process (the public `cachalot::server::spawn` API) in front of an upstream.

use std::net::SocketAddr;

/// One `[[upstream]]` entry.
#[derive(Clone, Debug)]
pub struct UpstreamEntry {
    pub name: String,
    pub url: String,
    pub default: bool,
    pub username: Option<String>,
    pub password_env: Option<String>,
}

impl UpstreamEntry {
    pub fn new(name: &str, url: &str, default: bool) -> UpstreamEntry {
        UpstreamEntry {
            name: name.to_owned(),
            url: url.to_owned(),
            default,
            username: None,
            password_env: None,
        }
    }

    pub fn with_credentials(mut self, username: &str, password_env: &str) -> UpstreamEntry {
        self.username = Some(username.to_owned());
        self.password_env = Some(password_env.to_owned());
        self
    }
}

/// The upstream name the e2e tests give the seeded registry.
pub const UPSTREAM_NAME: &str = "reg.test";
/// A second upstream whose URL refuses connections; made the default in the ns and prefix tests,
/// so that a request that is not routed to [`UPSTREAM_NAME`] fails instead of passing by luck.
pub const DECOY_NAME: &str = "decoy.test";

/// A running cachalot with its own cache directory.
pub struct Cachalot {
    server: Option<cachalot::server::Server>,
    addr: SocketAddr,
    pub config_toml: String,
    dir: tempfile::TempDir,
}

fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// `http://127.0.0.1:<port>` where nothing listens (connections are refused).
pub fn refused_url() -> String {
    format!("http://127.0.0.1:{}", super::registry::free_port())
}

impl Cachalot {
    /// Starts cachalot on `127.0.0.1:0` with a fresh cache dir, the given upstreams, and extra
    /// `[cache]` lines (e.g. `tag_ttl = "1h"`).
    pub async fn start(upstreams: &[UpstreamEntry], extra_cache: &str) -> Cachalot {
        let dir = super::tools::tempdir("cachalot");
        let mut toml = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[cache]\ndir = {}\n{extra_cache}\n",
            toml_str(&dir.path().join("cache").display().to_string())
        );
        for u in upstreams {
            toml.push_str(&format!(
                "\n[[upstream]]\nname = {}\nurl = {}\ndefault = {}\n",
                toml_str(&u.name),
                toml_str(&u.url),
                u.default
            ));
            if let Some(user) = &u.username {
                toml.push_str(&format!("username = {}\n", toml_str(user)));
            }
            if let Some(env) = &u.password_env {
                toml.push_str(&format!("password_env = {}\n", toml_str(env)));
            }
        }
        let config = cachalot::config::Config::from_toml_str(&toml)
            .unwrap_or_else(|e| panic!("cachalot rejected the test config: {e}\n{toml}"));
        let server = cachalot::server::spawn(config)
            .await
            .unwrap_or_else(|e| panic!("cachalot::server::spawn failed: {e}\n{toml}"));
        let addr = server.local_addr();
        Cachalot {
            server: Some(server),
            addr,
            config_toml: toml,
            dir,
        }
    }

    /// The usual setup: the seeded registry as the default upstream [`UPSTREAM_NAME`].
    pub async fn in_front_of(registry_url: &str) -> Cachalot {
        Cachalot::start(&[UpstreamEntry::new(UPSTREAM_NAME, registry_url, true)], "").await
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT`, for image references.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The cache directory.
    pub fn cache_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("cache")
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        let resp = super::http::get(&format!("{}/metrics", self.url())).await;
        assert_eq!(resp.status, 200, "GET /metrics");
        String::from_utf8_lossy(&resp.body).into_owned()
    }

    /// Stops the server.
    pub async fn shutdown(mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
    }
}

/// Asserts that a cachalot whose `/metrics` text is `metrics` and whose cache is `cache_dir`
/// served the single-platform image `layout` to a client: a manifest and at least as many blob
/// answers and bytes as the image's config and layers, and the manifest, config and every layer
/// committed in the cache under its digest (so each was fetched through cachalot and verified).
pub fn assert_served_image(
    metrics: &str,
    cache_dir: &std::path::Path,
    layout: &super::ImageLayout,
    what: &str,
) {
    use super::http::metric_sum;
    let image = &layout.images[0];
    let content: Vec<&String> = std::iter::once(&image.config_digest)
        .chain(&image.layer_digests)
        .collect();
    let content_bytes: usize = content.iter().map(|d| layout.blob(d).len()).sum();
    let requests = |route| metric_sum(metrics, "cachalot_requests_total", &[("route", route)]);
    assert!(
        requests("manifest") >= 1.0,
        "{what}: no manifest request counted:\n{metrics}"
    );
    assert!(
        requests("blob") >= content.len() as f64,
        "{what}: fewer blob requests counted than the image's {} config and layer blobs:\n{metrics}",
        content.len()
    );
    let served = metric_sum(metrics, "cachalot_served_bytes_total", &[]);
    assert!(
        served >= content_bytes as f64,
        "{what}: cachalot served {served} bytes, the image's blobs are {content_bytes}"
    );
    for digest in std::iter::once(&layout.top_digest).chain(content) {
        let d: cachalot::oci::digest::Digest = digest.parse().unwrap();
        let path = cachalot::storage::FsStore::blob_path_in(cache_dir, &d);
        assert!(
            path.is_file(),
            "{what}: {digest} is not in the cache ({} missing)",
            path.display()
        );
    }
}
