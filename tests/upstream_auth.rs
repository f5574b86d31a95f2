//! Upstream credentials: token auth (anonymous and with credentials, expiry and one retry on
//! 401), Basic auth, private repositories, redirects to a CDN with Authorization dropped, and a
//! client's own Authorization never forwarded.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::*;

fn basic(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

/// Sets a process env var with a name no other test uses.
fn secret_env(name: &str, value: &str) {
    // SAFETY: each test uses its own variable name, and nothing in the process reads or writes
    // it concurrently except cachalot, which reads it after this returns.
    unsafe { std::env::set_var(name, value) };
}

async fn pull_image(env: &Env, repo: &str, tag: &str, img: &Image) {
    let r = env
        .client
        .get(&env.v2(&format!("{repo}/manifests/{tag}")))
        .await;
    assert_eq!(r.status, 200, "manifest: {}", r.text());
    assert_eq!(r.body, img.manifest.bytes);
    for (d, b) in std::iter::once(&img.config).chain(&img.layers) {
        let r = env.client.get(&env.v2(&format!("{repo}/blobs/{d}"))).await;
        assert_eq!(r.status, 200, "blob {d}: {}", r.text());
        assert!(r.body == *b);
    }
}

#[tokio::test]
async fn anonymous_token_auth() {
    let env = Env::start().await;
    env.fake.set_token_auth(TokenAuth::default());
    let img = env.fake.push_image("org/app", Some("v1"), &[1000, 2000]);
    pull_image(&env, "org/app", "v1", &img).await;
    assert!(env.fake.tokens_issued() >= 1);
    // The token is cached: not one token per request.
    assert!(
        env.fake.tokens_issued() <= 2,
        "tokens issued: {}",
        env.fake.tokens_issued()
    );
    for r in env
        .fake
        .requests()
        .iter()
        .filter(|r| r.path.starts_with("/v2/org/app/"))
    {
        if let Some(a) = r.headers.get("authorization") {
            assert!(a.to_str().unwrap().starts_with("Bearer "), "{a:?}");
        }
    }
}

#[tokio::test]
async fn token_auth_with_username_and_password_env() {
    let fake = FakeRegistry::start().await;
    fake.set_token_auth(TokenAuth {
        required_credentials: Some(("robot".into(), "s3cret-token".into())),
        ..TokenAuth::default()
    });
    fake.set_private("org/private", 401);
    let img = fake.push_image("org/private", Some("v1"), &[1000]);
    secret_env("CACHALOT_TEST_TOKEN_AUTH_PW_1", "s3cret-token");
    let up = UpstreamSpec::new(UP, &fake.url(), true)
        .with("username = \"robot\"\npassword_env = \"CACHALOT_TEST_TOKEN_AUTH_PW_1\"");
    let env = Env::start_on(fake, CacheSpec::default(), vec![up]).await;
    pull_image(&env, "org/private", "v1", &img).await;
    let token_reqs: Vec<_> = env
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.path == "/token")
        .collect();
    assert!(!token_reqs.is_empty());
    for t in &token_reqs {
        assert_eq!(
            t.headers.get("authorization").and_then(|v| v.to_str().ok()),
            Some(basic("robot", "s3cret-token").as_str()),
            "token request carries the configured credentials"
        );
    }
}

#[tokio::test]
async fn wrong_credentials_give_401() {
    let fake = FakeRegistry::start().await;
    fake.set_token_auth(TokenAuth {
        required_credentials: Some(("robot".into(), "right".into())),
        ..TokenAuth::default()
    });
    fake.push_image("org/app", Some("v1"), &[10]);
    secret_env("CACHALOT_TEST_TOKEN_AUTH_PW_2", "wrong");
    let up = UpstreamSpec::new(UP, &fake.url(), true)
        .with("username = \"robot\"\npassword_env = \"CACHALOT_TEST_TOKEN_AUTH_PW_2\"");
    let env = Env::start_on(fake, CacheSpec::default(), vec![up]).await;
    let r = env.client.get(&env.v2("org/app/manifests/v1")).await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.error_code().as_deref(), Some("UNAUTHORIZED"));
}

#[tokio::test]
async fn an_expired_token_is_replaced_after_one_401() {
    let env = Env::start().await;
    // The registry stops accepting a token after 500ms but tells the client it lasts 300s,
    // so the proxy's cached token goes bad while it still trusts it.
    env.fake.set_token_auth(TokenAuth {
        token_lifetime: Duration::from_millis(500),
        expires_in: 300,
        required_credentials: None,
    });
    let a = env.fake.push_image("org/app", Some("a"), &[10]);
    let b = env.fake.push_image("org/app", Some("b"), &[10]);
    let r = env.client.get(&env.v2("org/app/manifests/a")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, a.manifest.bytes);
    let issued = env.fake.tokens_issued();

    tokio::time::sleep(Duration::from_millis(800)).await;
    let seen_before = env.fake.requests().len();
    let r = env.client.get(&env.v2("org/app/manifests/b")).await;
    assert_eq!(r.status, 200, "retried with a fresh token: {}", r.text());
    assert_eq!(r.body, b.manifest.bytes);
    assert!(
        env.fake.tokens_issued() > issued,
        "a fresh token was fetched"
    );
    let after: Vec<_> = env.fake.requests().into_iter().skip(seen_before).collect();
    let first = after
        .iter()
        .find(|r| r.path.starts_with("/v2/org/app/"))
        .expect("an upstream request");
    assert_eq!(
        first.status,
        Some(401),
        "the cached token was used first and rejected (test premise)"
    );
    assert!(
        first
            .headers
            .get("authorization")
            .is_some_and(|v| v.to_str().unwrap().starts_with("Bearer ")),
        "the expired token was sent"
    );
    assert!(
        after
            .iter()
            .filter(|r| r.path.starts_with("/v2/org/app/") && r.status == Some(401))
            .count()
            == 1,
        "one 401, then one retry with the fresh token"
    );
    let (d, bytes) = &b.layers[0];
    let r = env.client.get(&env.v2(&format!("org/app/blobs/{d}"))).await;
    assert_eq!(r.status, 200);
    assert!(r.body == *bytes);
}

#[tokio::test]
async fn private_repo_401_and_403_are_passed_on_with_oci_codes() {
    let env = Env::start().await;
    env.fake.set_token_auth(TokenAuth::default());
    env.fake.push_image("org/locked", Some("v1"), &[10]);
    env.fake.push_image("org/forbidden", Some("v1"), &[10]);
    env.fake.set_private("org/locked", 401);
    env.fake.set_private("org/forbidden", 403);

    let r = env.client.get(&env.v2("org/locked/manifests/v1")).await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.error_code().as_deref(), Some("UNAUTHORIZED"));
    let r = env.client.get(&env.v2("org/forbidden/manifests/v1")).await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.error_code().as_deref(), Some("DENIED"));
    // Bounded retries: a 401 is retried at most once with a fresh token.
    assert!(env.fake.count("GET", "/v2/org/locked/manifests/v1") <= 3);
}

#[tokio::test]
async fn basic_auth_upstream() {
    let fake = FakeRegistry::start().await;
    fake.set_basic_auth("alice", "pa55");
    let img = fake.push_image("org/app", Some("v1"), &[1000]);
    secret_env("CACHALOT_TEST_BASIC_AUTH_PW", "pa55");
    let up = UpstreamSpec::new(UP, &fake.url(), true)
        .with("username = \"alice\"\npassword_env = \"CACHALOT_TEST_BASIC_AUTH_PW\"");
    let env = Env::start_on(fake, CacheSpec::default(), vec![up]).await;
    pull_image(&env, "org/app", "v1", &img).await;
    assert!(env.fake.requests().iter().any(|r| {
        r.headers.get("authorization").and_then(|v| v.to_str().ok())
            == Some(basic("alice", "pa55").as_str())
    }));
}

#[tokio::test]
async fn redirects_to_a_cdn_drop_authorization() {
    let env = Env::start().await;
    let cdn = FakeCdn::start(&env.fake).await;
    env.fake.set_token_auth(TokenAuth::default());
    env.fake.redirect_blobs_to(Some(&cdn));
    let img = env.fake.push_image("org/app", Some("v1"), &[100_000]);
    pull_image(&env, "org/app", "v1", &img).await;
    assert_eq!(
        cdn.requests_with_authorization(),
        0,
        "Authorization sent to another host"
    );
    assert_eq!(
        cdn.gets(),
        2,
        "config and layer fetched from the CDN once each"
    );
    // The registry itself did get the Bearer token.
    assert!(
        env.fake
            .requests()
            .iter()
            .any(|r| r.path.contains("/blobs/") && r.headers.contains_key("authorization"))
    );
}

#[tokio::test]
async fn a_clients_authorization_is_never_forwarded() {
    let env = Env::start().await;
    let img = env.fake.push_image("org/app", Some("v1"), &[1000]);
    let (d, _) = &img.layers[0];
    let secret = "Bearer client-secret-do-not-forward";
    for url in [
        env.v2("org/app/manifests/v1"),
        env.v2(&format!("org/app/manifests/{}", img.manifest.digest)),
        env.v2(&format!("org/app/blobs/{d}")),
        env.v2("org/app/tags/list"),
        env.v2(&format!("org/app/referrers/{}", img.manifest.digest)),
    ] {
        let r = env
            .client
            .get_with(
                &url,
                &[("authorization", secret), ("cookie", "session=client")],
            )
            .await;
        assert_eq!(r.status, 200, "{url}: {}", r.text());
    }
    let h = env
        .client
        .send(
            hyper::Method::HEAD,
            &env.v2(&format!("org/app/blobs/{}", img.config.0)),
            &[("authorization", secret)],
        )
        .await;
    assert_eq!(h.status, 200);
    assert!(env.fake.total() >= 5);
    for r in env.fake.requests() {
        assert!(
            !r.headers.contains_key("authorization"),
            "{} {} carried {:?}",
            r.method,
            r.path,
            r.headers.get("authorization")
        );
        assert!(
            !r.headers.contains_key("cookie"),
            "{} {} carried a cookie",
            r.method,
            r.path
        );
    }
}
