//! The page at `/ui` and its JSON over HTTP, against the in-process fake registry: what was
//! pulled is listed with the hit ratio, search and paging work by query parameters,
//! `server.ui = false` turns it off, and with `[auth]` a user sees only what they may pull and
//! nobody sees a credential.

mod common;

use common::auth_env::*;
use common::*;
use hyper::Method;

/// Pulls `repo:tag` whole through the proxy: manifest, config, layers.
async fn pull(env: &Env, repo: &str, tag: &str, img: &Image) {
    let r = env
        .client
        .get(&env.v2(&format!("{repo}/manifests/{tag}")))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    for (d, bytes) in std::iter::once(&img.config).chain(&img.layers) {
        let r = env.client.get(&env.v2(&format!("{repo}/blobs/{d}"))).await;
        assert_eq!(r.status, 200);
        assert!(r.body == *bytes);
    }
}

#[tokio::test]
async fn the_page_lists_what_was_pulled_with_the_hit_ratio() {
    let env = Env::start().await;
    let app = env.fake.push_image("team/app", Some("v1"), &[3000, 5000]);
    let tool = env.fake.push_image("other/tool", Some("2.0"), &[100]);
    pull(&env, "team/app", "v1", &app).await;
    pull(&env, "team/app", "v1", &app).await;
    pull(&env, "other/tool", "2.0", &tool).await;
    env.wait_no_fills().await;

    let r = env.client.get(&env.url("/ui")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("text/html; charset=utf-8")
    );
    assert!(r.header("content-security-policy").is_some());
    let page = r.text();
    assert!(page.contains("team/app"), "{page}");
    assert!(page.contains("other/tool"));
    assert!(page.contains(">v1<") && page.contains(">2.0<"));
    let short = &app.manifest.digest[7..19];
    assert!(page.contains(short), "the digest, shortened");
    // Blobs: 8 lookups, 5 of them misses (the first pull of each), 3 hits.
    assert!(
        page.contains(r#"<td id="hit-blob-start">37.5%</td>"#),
        "{page}"
    );

    let o = env.client.get(&env.url("/ui/api/overview")).await.json();
    assert_eq!(o["hit_ratio"]["blob"]["lookups"], 8);
    assert_eq!(o["hit_ratio"]["blob"]["misses"], 5);
    assert_eq!(o["hit_ratio"]["blob"]["since_start"], 0.375);
    // Younger than five minutes: the recent ratio reaches back to the start.
    assert_eq!(o["hit_ratio"]["blob"]["recent"], 0.375);
    assert_eq!(o["upstreams"][0]["name"], UP);
    assert!(o["upstreams"][0]["last_success"].as_u64().unwrap() > 1_700_000_000);
    assert!(o["upstreams"][0]["last_error"].is_null());
    assert_eq!(o["fills"].as_array().unwrap().len(), 0);
    let served = o["bytes"]["served_from_cache"].as_u64().unwrap()
        + o["bytes"]["served_from_fills"].as_u64().unwrap();
    assert!(served >= 2 * 8000 + 100);
    assert!(o["bytes"]["fetched"].as_u64().unwrap() >= 8100);

    // Search and paging by query parameters: what the page's form and links send.
    let l = env
        .client
        .get(&env.url("/ui/api/images?q=TOOL"))
        .await
        .json();
    assert_eq!(l["total"], 1);
    assert_eq!(l["rows"][0]["repository"], "other/tool");
    assert_eq!(l["rows"][0]["tag"], "2.0");
    let l = env
        .client
        .get(&env.url("/ui/api/images?per_page=1&page=2"))
        .await
        .json();
    assert_eq!(
        (l["total"].as_u64(), l["pages"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(
        l["rows"][0]["repository"], "team/app",
        "name order: other/ then team/"
    );
    let row = &l["rows"][0];
    assert_eq!(row["digest"], app.manifest.digest.as_str());
    assert!(row["size"].as_u64().unwrap() > 8000);
    let page = env.client.get(&env.url("/ui?q=app")).await.text();
    assert!(page.contains("team/app") && !page.contains("other/tool"));
    assert!(
        page.contains(r#"value="app""#),
        "the search box keeps the query"
    );

    // One image, with its pull commands for this mirror.
    let r = env
        .client
        .get(&env.url(&format!(
            "/ui/image?upstream={UP}&repository=team/app&tag=v1"
        )))
        .await;
    assert_eq!(r.status, 200);
    let page = r.text();
    let host = env.proxy.addr().to_string();
    assert!(
        page.contains(&format!("docker pull {host}/team/app:v1")),
        "{page}"
    );
    assert!(page.contains(&format!(
        "podman pull --tls-verify=false {host}/{UP}/team/app:v1"
    )));
    assert!(page.contains(&app.manifest.digest));
    let missing = env
        .client
        .get(&env.url(&format!(
            "/ui/api/image?upstream={UP}&repository=team/app&tag=v9"
        )))
        .await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.error_code().as_deref(), Some("MANIFEST_UNKNOWN"));

    // Viewing the page is not a pull: nothing went upstream for it.
    let before = env.fake.total();
    env.client.get(&env.url("/ui")).await;
    assert_eq!(env.fake.total(), before);
}

#[tokio::test]
async fn the_root_links_to_the_page_and_the_assets_are_served() {
    let env = Env::start().await;
    let r = env.client.get(&env.url("/")).await;
    assert_eq!(r.status, 200);
    assert!(r.text().contains(r#"href="/ui""#));
    let css = env.client.get(&env.url("/ui/style.css")).await;
    assert_eq!(css.status, 200);
    assert_eq!(
        css.header("content-type").as_deref(),
        Some("text/css; charset=utf-8")
    );
    assert!(css.text().contains("prefers-color-scheme: dark"));
    let js = env.client.get(&env.url("/ui/ui.js")).await;
    assert!(js.text().contains("/ui/api/overview"));
    // An empty cache says so rather than showing an empty table.
    let page = env.client.get(&env.url("/ui")).await.text();
    assert!(page.contains("No images yet"), "{page}");
    // Pulled after the page was seen: on the next view at once.
    let img = env.fake.push_image("late/comer", Some("v3"), &[10]);
    pull(&env, "late/comer", "v3", &img).await;
    let page = env.client.get(&env.url("/ui")).await.text();
    assert!(
        page.contains("late/comer") && page.contains(">v3<"),
        "{page}"
    );
    let nope = env.client.get(&env.url("/ui/nope")).await;
    assert_eq!(nope.status, 404);
    assert_eq!(nope.error_code().as_deref(), Some("NAME_UNKNOWN"));
    let post = env.client.send(Method::POST, &env.url("/ui"), &[]).await;
    assert_eq!(post.status, 405);
    let head = env.client.send(Method::HEAD, &env.url("/ui"), &[]).await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
}

#[tokio::test]
async fn server_ui_false_turns_it_off() {
    let fake = FakeRegistry::start().await;
    let dir = tempfile::tempdir().unwrap();
    let toml = config_toml(
        dir.path(),
        &CacheSpec::default(),
        &[UpstreamSpec::new(UP, &fake.url(), true)],
    )
    .replacen("[server]\n", "[server]\nui = false\n", 1);
    let proxy = Proxy::start(&toml).await;
    let client = TestClient::new();
    for path in [
        "/",
        "/ui",
        "/ui/",
        "/ui/api/overview",
        "/ui/api/images",
        "/ui/style.css",
    ] {
        let r = client.get(&format!("{}{path}", proxy.url())).await;
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(r.error_code().as_deref(), Some("NAME_UNKNOWN"), "{path}");
    }
    // Pulls are untouched.
    let r = client.get(&format!("{}/v2/", proxy.url())).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn with_auth_each_user_sees_what_they_may_pull_and_no_credential() {
    let fake = FakeRegistry::start().await;
    fake.set_token_auth(TokenAuth {
        required_credentials: Some(("robot".into(), "ui-upstream-secret".into())),
        ..TokenAuth::default()
    });
    let private = fake.push_image("org/private", Some("v1"), &[2000]);
    let public = fake.push_image("org/public", Some("v1"), &[1000]);
    // SAFETY: a variable no other test names; cachalot reads it only after this returns.
    unsafe { std::env::set_var("CACHALOT_TEST_UI_PW", "ui-upstream-secret") };
    let up = UpstreamSpec::new(UP, &fake.url(), true)
        .with("username = \"robot\"\npassword_env = \"CACHALOT_TEST_UI_PW\"");
    let rules = format!(
        r#"[[access]]
users = ["alice"]
repositories = ["{UP}/org/**"]
allow = true

[[access]]
users = ["bob"]
repositories = ["{UP}/org/public"]
allow = true
"#
    );
    let env = AuthEnv::start(fake, vec![up], &[ALICE, BOB], &rules).await;
    for (repo, img) in [("org/private", &private), ("org/public", &public)] {
        let r = env
            .get(&format!("/v2/{repo}/manifests/v1"), Some(ALICE))
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let d = &img.layers[0].0;
        let r = env.get(&format!("/v2/{repo}/blobs/{d}"), Some(ALICE)).await;
        assert_eq!(r.status, 200);
    }

    // Without credentials: the same challenge as a pull.
    for path in ["/ui", "/ui/api/images", "/"] {
        let r = env.get(path, None).await;
        assert_eq!(r.status, 401, "{path}");
        assert!(r.header("www-authenticate").is_some());
    }

    let mut bodies = String::new();
    let alice = env.get("/ui/api/images", Some(ALICE)).await.json();
    assert_eq!(alice["total"], 2);
    let bob_page = env.get("/ui", Some(BOB)).await;
    assert_eq!(bob_page.status, 200);
    let bob_page = bob_page.text();
    assert!(bob_page.contains("org/public"));
    assert!(!bob_page.contains("org/private"), "{bob_page}");
    assert!(!bob_page.contains(&private.manifest.digest[7..19]));
    let bob = env.get("/ui/api/images?q=private", Some(BOB)).await.json();
    assert_eq!(bob["total"], 0);
    assert_eq!(
        bob["holdings"][0]["repositories"], 1,
        "one repository, not two"
    );
    // By name: as if it were not cached at all.
    let r = env
        .get(
            &format!("/ui/image?upstream={UP}&repository=org/private&tag=v1"),
            Some(BOB),
        )
        .await;
    assert_eq!(r.status, 404);
    let r = env
        .get(
            &format!("/ui/image?upstream={UP}&repository=org/private&tag=v1"),
            Some(ALICE),
        )
        .await;
    assert_eq!(r.status, 200);
    bodies.push_str(&r.text());
    bodies.push_str(&bob_page);
    for path in ["/ui", "/ui/api/overview", "/ui/api/images", "/"] {
        bodies.push_str(&env.get(path, Some(ALICE)).await.text());
    }
    // Hiding repositories from the page is not a refused pull.
    assert_eq!(
        env.metric("cachalot_auth_failures_total", &[("reason", "denied")])
            .await,
        0.0
    );
    for secret in [
        "ui-upstream-secret",
        "alice-pw-1",
        "robot",
        "CACHALOT_TEST_UI_PW",
    ] {
        assert!(!bodies.contains(secret), "{secret} appears on the page");
    }
}

#[tokio::test]
async fn a_fill_in_flight_shows_its_progress_and_the_upstream_its_rate_limit() {
    let env = Env::start().await;
    env.fake.set_extra_headers(&[
        ("ratelimit-limit", "100;w=21600"),
        ("ratelimit-remaining", "76;w=21600"),
    ]);
    let blob = random_blob(500_000);
    let d = env.fake.push_blob("big/app", blob.clone());
    let gate = env.fake.pause_blob(&d, 250_000);
    let url = env.v2(&format!("big/app/blobs/{d}"));
    let pull = tokio::spawn(async move { TestClient::unpooled().get(&url).await });
    gate.reached().await;
    let deadline = tokio::time::Instant::now() + common::client::SAFETY;
    let fill = loop {
        let o = env.client.get(&env.url("/ui/api/overview")).await.json();
        let fill = o["fills"][0].clone();
        if fill["written"] == 250_000 {
            break fill;
        }
        assert!(tokio::time::Instant::now() < deadline, "{o}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(fill["digest"], d.as_str());
    assert_eq!(fill["upstream"], UP);
    assert_eq!(fill["repository"], "big/app");
    assert_eq!(fill["size"], 500_000);
    let page = env.client.get(&env.url("/ui")).await.text();
    assert!(
        page.contains(r#"<progress max="500000" value="250000">"#),
        "{page}"
    );
    assert!(page.contains("76 of 100"), "the rate-limit headroom");
    gate.release();
    let r = pull.await.unwrap();
    assert!(r.body == blob);
    env.wait_no_fills().await;
    let o = env.client.get(&env.url("/ui/api/overview")).await.json();
    assert_eq!(o["fills"].as_array().unwrap().len(), 0);
    assert_eq!(o["upstreams"][0]["ratelimit_remaining"], 76);
    assert_eq!(o["upstreams"][0]["ratelimit_limit"], 100);
}

#[tokio::test]
async fn an_upstream_error_is_dated() {
    let env = Env::start().await;
    env.fake.push_image("team/app", Some("v1"), &[10]);
    let r = env.client.get(&env.v2("team/app/manifests/v1")).await;
    assert_eq!(r.status, 200);
    let o = env.client.get(&env.url("/ui/api/overview")).await.json();
    assert!(o["upstreams"][0]["last_error"].is_null());
    env.fake.set_status_fault(Some(StatusFault::all(503)));
    let r = env.client.get(&env.v2("team/app/manifests/v2")).await;
    assert!(r.status.is_server_error(), "{}", r.status);
    let o = env.client.get(&env.url("/ui/api/overview")).await.json();
    let up = &o["upstreams"][0];
    assert!(up["last_error"].as_u64().unwrap() >= up["last_success"].as_u64().unwrap());
    let page = env.client.get(&env.url("/ui")).await.text();
    assert!(!page.contains(">never<"), "both times are shown: {page}");
}
