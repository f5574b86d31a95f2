//! Client authentication and access rules: Basic credentials against an htpasswd file, 401 with
//! a challenge, 403 for a user a rule denies, rules matched after routing, the file reloaded
//! when it changes, and a refused request never reaching the upstream.

mod common;

use common::auth_env::*;
use common::client::SAFETY;
use common::*;
use hyper::Method;

#[tokio::test]
async fn without_credentials_every_pull_route_is_challenged_and_nothing_reaches_upstream() {
    let env = AuthEnv::simple(&[ALICE], "realm = \"team mirror\"\n").await;
    let img = env.fake.push_image("team/app", Some("v1"), &[100]);
    let layer = &img.layers[0].0;
    for path in [
        "/v2/".to_string(),
        "/v2/team/app/manifests/v1".into(),
        format!("/v2/team/app/manifests/{}", img.manifest.digest),
        format!("/v2/team/app/blobs/{layer}"),
        "/v2/team/app/tags/list".into(),
        format!("/v2/team/app/referrers/{}", img.manifest.digest),
        "/v2/nosuch.registry/x/manifests/v1".into(),
        "/metrics".into(),
    ] {
        for method in [Method::GET, Method::HEAD] {
            let r = env.send(method.clone(), &path, None).await;
            if method == Method::GET {
                assert_challenge(&r, "team mirror", &path);
            } else {
                assert_eq!(r.status, 401, "HEAD {path}");
            }
        }
    }
    assert_eq!(env.fake.total(), 0, "no request reached the upstream");
    assert_eq!(
        env.metric("cachalot_auth_failures_total", &[("reason", "missing")])
            .await,
        16.0
    );
    assert_eq!(env.metric("cachalot_fills_in_flight", &[]).await, 0.0);
}

#[tokio::test]
async fn wrong_credentials_get_401_right_ones_pull() {
    let env = AuthEnv::simple(&[ALICE, BOB], "").await;
    let img = env.fake.push_image("team/app", Some("v1"), &[1000]);
    for (creds, what) in [
        (("alice", "wrong"), "wrong password"),
        (("mallory", "alice-pw-1"), "unknown user"),
        (("alice", ""), "empty password"),
    ] {
        let r = env.get("/v2/", Some(creds)).await;
        assert_challenge(&r, "cachalot", what);
        let r = env.get("/v2/team/app/manifests/v1", Some(creds)).await;
        assert_challenge(&r, "cachalot", what);
    }
    // Not Basic at all: a bearer token cachalot never issued.
    let r = env
        .client
        .get_with(&env.url("/v2/"), &[("authorization", "Bearer abc")])
        .await;
    assert_challenge(&r, "cachalot", "bearer");
    assert_eq!(env.fake.total(), 0);

    // `docker login` checks GET /v2/.
    let r = env.get("/v2/", Some(ALICE)).await;
    assert_eq!(r.status, 200);
    let r = env.get("/v2/team/app/manifests/v1", Some(ALICE)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, img.manifest.bytes);
    let (layer, bytes) = &img.layers[0];
    let r = env
        .get(&format!("/v2/team/app/blobs/{layer}"), Some(BOB))
        .await;
    assert_eq!(r.body, *bytes);
    // Remembered credentials still refuse a wrong password for the same user.
    let r = env.get("/v2/", Some(("alice", "alice-pw-2"))).await;
    assert_eq!(r.status, 401);
    assert_eq!(
        env.metric("cachalot_auth_failures_total", &[("reason", "invalid")])
            .await,
        8.0
    );
}

const TEAM_ONLY: &str = r#"
[[access]]
users = ["alice"]
repositories = ["fake.local/team/**"]
allow = true
"#;

#[tokio::test]
async fn a_denied_user_gets_403_on_every_route_and_the_upstream_sees_nothing() {
    let env = AuthEnv::simple(&[ALICE, BOB], TEAM_ONLY).await;
    let img = env.fake.push_image("team/app", Some("v1"), &[100]);
    let layer = &img.layers[0].0;
    let paths = [
        "/v2/team/app/manifests/v1".to_string(),
        format!("/v2/team/app/manifests/{}", img.manifest.digest),
        format!("/v2/team/app/blobs/{layer}"),
        "/v2/team/app/tags/list".into(),
        format!("/v2/team/app/referrers/{}", img.manifest.digest),
    ];
    for path in &paths {
        let r = env.get(path, Some(BOB)).await;
        assert_eq!(r.status, 403, "{path}: {}", r.text());
        assert_eq!(r.error_code().as_deref(), Some("DENIED"), "{path}");
        assert_eq!(r.header("www-authenticate"), None, "{path}");
        let r = env.send(Method::HEAD, path, Some(BOB)).await;
        assert_eq!(r.status, 403, "HEAD {path}");
    }
    // Authenticated but allowed nothing: /v2/ still says the credentials are good.
    assert_eq!(env.get("/v2/", Some(BOB)).await.status, 200);
    assert_eq!(
        env.fake.total(),
        0,
        "a denied request never reaches upstream"
    );
    assert_eq!(env.metric("cachalot_fills_in_flight", &[]).await, 0.0);
    assert_eq!(
        env.metric("cachalot_auth_failures_total", &[("reason", "denied")])
            .await,
        10.0
    );
    // Alice may, on every route.
    for path in &paths[..3] {
        let r = env.get(path, Some(ALICE)).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
    // Outside the rule's repositories, alice is denied too: with rules, no match denies.
    env.fake.push_image("other/app", Some("v1"), &[10]);
    let before = env.fake.total();
    let r = env.get("/v2/other/app/manifests/v1", Some(ALICE)).await;
    assert_eq!(r.status, 403);
    assert_eq!(env.fake.total(), before);
}

#[tokio::test]
async fn anonymous_callers_pull_what_rules_allow_and_are_challenged_elsewhere() {
    let auth = r#"anonymous = true
[[access]]
users = ["anonymous"]
repositories = ["fake.local/public/*"]
allow = true
[[access]]
users = ["alice"]
repositories = ["fake.local/**"]
allow = true
"#;
    let env = AuthEnv::simple(&[ALICE], auth).await;
    let public = env.fake.push_image("public/app", Some("v1"), &[10]);
    env.fake.push_image("team/app", Some("v1"), &[10]);
    assert_eq!(env.get("/v2/", None).await.status, 200);
    let r = env.get("/v2/public/app/manifests/v1", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, public.manifest.bytes);
    // Denied anonymously: 401, so that the client retries with credentials.
    let before = env.fake.total();
    let r = env.get("/v2/team/app/manifests/v1", None).await;
    assert_challenge(&r, "cachalot", "anonymous, denied");
    assert_eq!(env.fake.total(), before);
    let r = env.get("/v2/team/app/manifests/v1", Some(ALICE)).await;
    assert_eq!(r.status, 200);
    // Credentials sent are checked even where anonymous pulls would do.
    let r = env
        .get("/v2/public/app/manifests/v1", Some(("alice", "nope")))
        .await;
    assert_challenge(&r, "cachalot", "wrong password, anonymous allowed");
    assert_eq!(env.get("/v2/", Some(("alice", "nope"))).await.status, 401);
}

#[tokio::test]
async fn rules_match_the_routed_repository_whatever_the_spelling() {
    let fake = FakeRegistry::start().await;
    let ups = vec![
        UpstreamSpec::new("docker.io", &fake.url(), true),
        UpstreamSpec::new("ghcr.io", &fake.url(), false),
    ];
    let rules = r#"
[[access]]
users = ["bob"]
repositories = ["docker.io/library/nginx"]
allow = false
[[access]]
users = ["*"]
repositories = ["docker.io/**", "ghcr.io/org/*"]
allow = true
"#;
    let env = AuthEnv::start(fake, ups, &[ALICE, BOB], rules).await;
    env.fake.push_image("library/nginx", Some("v1"), &[10]);
    env.fake.push_image("org/app", Some("v1"), &[10]);
    for path in [
        "/v2/nginx/manifests/v1",
        "/v2/library/nginx/manifests/v1",
        "/v2/docker.io/library/nginx/manifests/v1",
        "/v2/library/nginx/manifests/v1?ns=docker.io",
        "/v2/nginx/manifests/v1?ns=docker.io",
    ] {
        let r = env.get(path, Some(BOB)).await;
        assert_eq!(r.status, 403, "bob {path}: {}", r.text());
        let r = env.get(path, Some(ALICE)).await;
        assert_eq!(r.status, 200, "alice {path}: {}", r.text());
    }
    for path in [
        "/v2/ghcr.io/org/app/manifests/v1",
        "/v2/org/app/manifests/v1?ns=ghcr.io",
    ] {
        assert_eq!(env.get(path, Some(BOB)).await.status, 200, "{path}");
    }
    // The same repository under the default upstream is docker.io's, not ghcr.io's.
    let r = env.get("/v2/org/app/manifests/v1", Some(BOB)).await;
    assert_eq!(r.status, 200, "docker.io/org/app is under docker.io/**");
}

#[tokio::test]
async fn one_star_stays_in_a_component_two_cross_them() {
    let rules = r#"
[[access]]
users = ["alice"]
repositories = ["fake.local/team/*"]
allow = true
[[access]]
users = ["b*"]
repositories = ["fake.local/team/**"]
allow = true
"#;
    let env = AuthEnv::simple(&[ALICE, BOB], rules).await;
    env.fake.push_image("team/app", Some("v1"), &[10]);
    env.fake.push_image("team/sub/app", Some("v1"), &[10]);
    let flat = "/v2/team/app/manifests/v1";
    let deep = "/v2/team/sub/app/manifests/v1";
    assert_eq!(env.get(flat, Some(ALICE)).await.status, 200);
    assert_eq!(env.get(deep, Some(ALICE)).await.status, 403);
    assert_eq!(env.get(flat, Some(BOB)).await.status, 200);
    assert_eq!(env.get(deep, Some(BOB)).await.status, 200);
}

#[tokio::test]
async fn the_htpasswd_file_is_reloaded_when_it_changes_and_a_bad_one_is_refused() {
    let env = AuthEnv::simple(&[ALICE], "").await;
    assert_eq!(env.get("/v2/", Some(ALICE)).await.status, 200);
    let carol = ("carol", "carol-pw");
    assert_eq!(env.get("/v2/", Some(carol)).await.status, 401);
    // Replace the file as editors and cert-manager-like tools do: write aside, rename.
    let aside = env.htpasswd.with_extension("new");
    std::fs::write(&aside, htpasswd_text(&[BOB, carol])).unwrap();
    std::fs::rename(&aside, &env.htpasswd).unwrap();
    let deadline = tokio::time::Instant::now() + SAFETY;
    while env.get("/v2/", Some(carol)).await.status != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "safety timeout: the new htpasswd file was not picked up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Alice was verified (and remembered) before the change; she is gone now.
    let r = env.get("/v2/", Some(ALICE)).await;
    assert_challenge(&r, "cachalot", "removed user");
    assert_eq!(env.get("/v2/", Some(BOB)).await.status, 200);

    // A bad file (an MD5 line) is refused whole: dave, on a good line of it, never gets in,
    // and the users loaded before keep working. Written in place this time.
    let bad = format!(
        "{}carol:$apr1$abcdefgh$0123456789abcdefghijkl\n",
        htpasswd_text(&[("dave", "dave-pw")])
    );
    assert_eq!(env.reload_errors(BOB).await, 0.0);
    std::fs::write(&env.htpasswd, bad).unwrap();
    let deadline = tokio::time::Instant::now() + SAFETY;
    while env.reload_errors(BOB).await != 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "safety timeout");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(env.get("/v2/", Some(("dave", "dave-pw"))).await.status, 401);
    assert_eq!(env.get("/v2/", Some(carol)).await.status, 200);
    assert_eq!(env.get("/v2/", Some(BOB)).await.status, 200);
}

#[tokio::test]
async fn health_stays_open_and_metrics_follow_auth_except_on_the_metrics_listener() {
    let fake = FakeRegistry::start().await;
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, htpasswd_text(&[ALICE])).unwrap();
    let toml = config_toml(
        &dir.path().join("cache"),
        &CacheSpec::default(),
        &[UpstreamSpec::new(UP, &fake.url(), true)],
    )
    .replacen(
        "[server]\n",
        "[server]\nmetrics_listen = \"127.0.0.1:0\"\n",
        1,
    ) + &format!("\n[auth]\nhtpasswd = {:?}\n", htpasswd.to_str().unwrap());
    let proxy = Proxy::start(&toml).await;
    let client = TestClient::new();
    for path in ["/healthz", "/readyz"] {
        let r = client.get(&format!("{}{path}", proxy.url())).await;
        assert_eq!(r.status, 200, "{path}");
    }
    let r = client.get(&format!("{}/metrics", proxy.url())).await;
    assert_challenge(&r, "cachalot", "/metrics");
    let alice = basic(ALICE.0, ALICE.1);
    let r = client
        .get_with(
            &format!("{}/metrics", proxy.url()),
            &[("authorization", &alice)],
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(r.text().contains("cachalot_auth_failures_total"));
    // The admin listener stays open: it serves only /metrics, on a network of its own.
    let admin = proxy.metrics_addr().unwrap();
    let r = client.get(&format!("http://{admin}/metrics")).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn an_upstream_401_is_passed_on_without_inviting_a_login() {
    let env = AuthEnv::simple(&[ALICE], "").await;
    env.fake.set_private("org/private", 401);
    env.fake.push_image("org/private", Some("v1"), &[10]);
    let r = env.get("/v2/org/private/manifests/v1", Some(ALICE)).await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(
        r.error_message().unwrap_or_default().contains("upstream"),
        "{}",
        r.text()
    );
    // Logging in again would not help: cachalot's own upstream credentials are at fault.
    assert_eq!(r.header("www-authenticate"), None);
}

/// The issue's scenario end to end in one mirror: a private repository upstream (the mirror
/// holds its credentials), pulled by a user allowed to; then its config and layer digests named
/// under a public repository by another user and anonymously: 404, and not one byte of them.
/// And the other user asking under the private repository itself is denied before the upstream.
#[tokio::test]
async fn a_private_layer_pulled_by_one_user_is_not_served_to_another_under_a_public_path() {
    let fake = FakeRegistry::start().await;
    fake.set_token_auth(TokenAuth {
        required_credentials: Some(("robot".into(), "auth-scoped-secret".into())),
        ..TokenAuth::default()
    });
    fake.set_private("org/private", 401);
    let private = fake.push_image("org/private", Some("v1"), &[30_000, 2_000]);
    let public = fake.push_image("org/public", Some("v1"), &[1_000]);
    // SAFETY: a variable no other test names; cachalot reads it only after this returns.
    unsafe { std::env::set_var("CACHALOT_TEST_AUTH_SCOPED_PW", "auth-scoped-secret") };
    let up = UpstreamSpec::new(UP, &fake.url(), true)
        .with("username = \"robot\"\npassword_env = \"CACHALOT_TEST_AUTH_SCOPED_PW\"");
    let rules = format!(
        r#"anonymous = true

[[access]]
users = ["alice"]
repositories = ["{UP}/org/**"]
allow = true

[[access]]
users = ["*"]
repositories = ["{UP}/org/public"]
allow = true
"#
    );
    let env = AuthEnv::start(fake, vec![up], &[ALICE, BOB], &rules).await;

    // Alice pulls the private image: manifest, config, layers.
    let r = env.get("/v2/org/private/manifests/v1", Some(ALICE)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let blobs: Vec<_> = std::iter::once(&private.config)
        .chain(&private.layers)
        .collect();
    for (d, bytes) in &blobs {
        let r = env
            .get(&format!("/v2/org/private/blobs/{d}"), Some(ALICE))
            .await;
        assert_eq!(r.status, 200, "alice {d}");
        assert!(r.body == *bytes);
    }
    // Bob and anonymous callers may pull the public image.
    for who in [Some(BOB), None] {
        let r = env.get("/v2/org/public/manifests/v1", who).await;
        assert_eq!(r.status, 200, "{who:?}: {}", r.text());
        let d = &public.layers[0].0;
        let r = env.get(&format!("/v2/org/public/blobs/{d}"), who).await;
        assert_eq!(r.status, 200, "{who:?} public layer");
    }

    // The private digests under the public path: the upstream's 404, none of the bytes.
    for who in [Some(BOB), None] {
        for (d, bytes) in &blobs {
            for method in [Method::GET, Method::HEAD] {
                let path = format!("/v2/org/public/blobs/{d}");
                let r = env.send(method.clone(), &path, who).await;
                assert_eq!(r.status, 404, "{who:?} {method} {path}: {}", r.text());
                assert!(
                    !r.body.windows(64).any(|w| w == &bytes[..64]),
                    "{who:?} {method} {path}: the body carries the private blob"
                );
                assert!(r.body.len() < 1024, "{who:?} {method} {path}");
            }
        }
    }
    // Under the private repository itself: denied, and the upstream is not asked.
    let before = env.fake.total();
    let (d, _) = blobs[1];
    let r = env
        .get(&format!("/v2/org/private/blobs/{d}"), Some(BOB))
        .await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.error_code().as_deref(), Some("DENIED"));
    let r = env.get(&format!("/v2/org/private/blobs/{d}"), None).await;
    assert_challenge(&r, "cachalot", "anonymous under the private repository");
    assert_eq!(
        env.fake.total(),
        before,
        "refused requests reached the upstream"
    );
}
