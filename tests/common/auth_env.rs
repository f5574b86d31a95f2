//! A cachalot with `[auth]` in front of a fake upstream, and what tests of it share: htpasswd
//! files made with the bcrypt crate (nothing to install), Basic headers, the 401 checks.

use super::client::{Resp, SAFETY, TestClient};
use super::fake_registry::FakeRegistry;
use super::proxy::{CacheSpec, Proxy, UP, UpstreamSpec, config_toml, metric_value};
use base64::Engine;
use hyper::Method;
use std::path::PathBuf;

/// A cachalot with `[auth]` in front of a fake upstream.
pub struct AuthEnv {
    pub fake: FakeRegistry,
    pub proxy: Proxy,
    pub client: TestClient,
    pub htpasswd: PathBuf,
    pub dir: tempfile::TempDir,
}

/// htpasswd text for `users` (name, password); cost 4 keeps the tests quick.
pub fn htpasswd_text(users: &[(&str, &str)]) -> String {
    users
        .iter()
        .map(|(u, p)| format!("{u}:{}\n", bcrypt::hash(p, 4).unwrap()))
        .collect()
}

/// `Basic base64(user:password)`.
pub fn basic(user: &str, password: &str) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {b64}")
}

impl AuthEnv {
    /// `upstreams` over `fake`; `auth` is the TOML after the `[auth]` header's `htpasswd` line
    /// (more `[auth]` keys, then `[[access]]` tables).
    pub async fn start(
        fake: FakeRegistry,
        upstreams: Vec<UpstreamSpec>,
        users: &[(&str, &str)],
        auth: &str,
    ) -> AuthEnv {
        let dir = tempfile::tempdir().unwrap();
        let htpasswd = dir.path().join("htpasswd");
        std::fs::write(&htpasswd, htpasswd_text(users)).unwrap();
        let cache = dir.path().join("cache");
        let toml = format!(
            "{}\n[auth]\nhtpasswd = {:?}\n{auth}",
            config_toml(&cache, &CacheSpec::default(), &upstreams),
            htpasswd.to_str().unwrap()
        );
        let proxy = Proxy::start(&toml).await;
        AuthEnv {
            fake,
            proxy,
            client: TestClient::new(),
            htpasswd,
            dir,
        }
    }

    /// One default upstream [`UP`] over a new fake.
    pub async fn simple(users: &[(&str, &str)], auth: &str) -> AuthEnv {
        let fake = FakeRegistry::start().await;
        let up = UpstreamSpec::new(UP, &fake.url(), true);
        AuthEnv::start(fake, vec![up], users, auth).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.proxy.url())
    }

    pub async fn get(&self, path: &str, creds: Option<(&str, &str)>) -> Resp {
        self.send(Method::GET, path, creds).await
    }

    pub async fn send(&self, method: Method, path: &str, creds: Option<(&str, &str)>) -> Resp {
        let header = creds.map(|(u, p)| basic(u, p));
        let headers: Vec<(&str, &str)> = header
            .as_deref()
            .map(|h| ("authorization", h))
            .into_iter()
            .collect();
        self.client.send(method, &self.url(path), &headers).await
    }

    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let r = self.get("/metrics", Some(ALICE)).await;
        assert_eq!(r.status, 200, "/metrics as alice");
        metric_value(&r.text(), name, labels)
    }

    /// `cachalot_auth_reloads_total{result="error"}`, read with `creds`.
    pub async fn reload_errors(&self, creds: (&str, &str)) -> f64 {
        let r = self.get("/metrics", Some(creds)).await;
        assert_eq!(r.status, 200);
        metric_value(
            &r.text(),
            "cachalot_auth_reloads_total",
            &[("result", "error")],
        )
    }

    /// Waits (with a safety net) until `name{labels}` reads `want`.
    pub async fn wait_metric(&self, name: &str, labels: &[(&str, &str)], want: f64) {
        let deadline = tokio::time::Instant::now() + SAFETY;
        while self.metric(name, labels).await != want {
            assert!(
                tokio::time::Instant::now() < deadline,
                "safety timeout waiting for {name}{labels:?} = {want}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

pub const ALICE: (&str, &str) = ("alice", "alice-pw-1");
pub const BOB: (&str, &str) = ("bob", "bob-pw-2");

pub fn assert_challenge(r: &Resp, realm: &str, what: &str) {
    assert_eq!(r.status, 401, "{what}: {}", r.text());
    assert_eq!(r.error_code().as_deref(), Some("UNAUTHORIZED"), "{what}");
    assert_eq!(
        r.header("www-authenticate"),
        Some(format!("Basic realm=\"{realm}\"")),
        "{what}"
    );
    assert_eq!(
        r.header("docker-distribution-api-version").as_deref(),
        Some("registry/2.0"),
        "{what}"
    );
}
