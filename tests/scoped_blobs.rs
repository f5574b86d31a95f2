//! Repository-scoped blobs (issue 12, invariant 9): a cached blob is served under a repository
//! only when that repository is known to hold it (a manifest of it names the blob, a fill under
//! it stored it, or the upstream confirmed it with a HEAD under it). A private layer's digest
//! named under a public repository gets the upstream's 404, never the cached bytes.

mod common;

use bytes::Bytes;
use common::*;

/// Sets a process env var with a name no other test uses.
fn secret_env(name: &str, value: &str) {
    // SAFETY: each test uses its own variable name, and nothing in the process reads or writes
    // it concurrently except cachalot, which reads it after this returns.
    unsafe { std::env::set_var(name, value) };
}

/// GETs a manifest and every blob of `img` under `repo`, checking each.
async fn pull(env: &Env, repo: &str, tag: &str, img: &Image) {
    let r = env
        .client
        .get(&env.v2(&format!("{repo}/manifests/{tag}")))
        .await;
    assert_eq!(r.status, 200, "manifest {repo}:{tag}: {}", r.text());
    for (d, b) in std::iter::once(&img.config).chain(&img.layers) {
        let r = env.client.get(&env.v2(&format!("{repo}/blobs/{d}"))).await;
        assert_eq!(r.status, 200, "blob {repo}@{d}: {}", r.text());
        assert!(r.body == *b, "bytes of {repo}@{d}");
    }
}

/// Whether `needle` occurs in `hay` (a response body holding part of a private layer).
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.len() <= hay.len() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Asserts a refusal that carries nothing of `secret`: `status`, an OCI error (for GET), and
/// not even a 64-byte slice of the blob.
fn assert_refused(r: &Resp, status: u16, what: &str, secret: &Bytes) {
    assert_eq!(r.status, status, "{what}: {}", r.text());
    assert!(
        !contains(&r.body, &secret[..64]),
        "{what}: the body carries bytes of the private blob"
    );
    assert!(
        r.body.len() < 1024,
        "{what}: {} bytes of body",
        r.body.len()
    );
}

#[tokio::test]
async fn a_private_layer_is_not_served_under_a_public_repository() {
    let fake = FakeRegistry::start().await;
    fake.set_token_auth(TokenAuth {
        required_credentials: Some(("robot".into(), "scoped-secret".into())),
        ..TokenAuth::default()
    });
    fake.set_private("org/private", 401);
    let private = fake.push_image("org/private", Some("v1"), &[40_000, 3_000]);
    let public = fake.push_image("org/public", Some("v1"), &[1_000]);
    secret_env("CACHALOT_TEST_SCOPED_PW_1", "scoped-secret");
    let up = UpstreamSpec::new(UP, &fake.url(), true)
        .with("username = \"robot\"\npassword_env = \"CACHALOT_TEST_SCOPED_PW_1\"");
    let env = Env::start_on(fake, CacheSpec::default(), vec![up]).await;
    pull(&env, "org/private", "v1", &private).await;
    pull(&env, "org/public", "v1", &public).await;

    for (d, bytes) in std::iter::once(&private.config).chain(&private.layers) {
        // However the client names the public repository.
        for name in ["org/public", &format!("{UP}/org/public")] {
            let url = env.v2(&format!("{name}/blobs/{d}"));
            let r = env.client.get(&url).await;
            assert_refused(&r, 404, &format!("GET {name}@{d}"), bytes);
            assert_eq!(
                r.error_code().as_deref(),
                Some("BLOB_UNKNOWN"),
                "{}",
                r.text()
            );
            let r = env.client.head(&url).await;
            assert_refused(&r, 404, &format!("HEAD {name}@{d}"), bytes);
        }
        let r = env
            .client
            .get_with(
                &env.v2(&format!("org/public/blobs/{d}")),
                &[("range", "bytes=0-99")],
            )
            .await;
        assert_refused(&r, 404, &format!("ranged GET org/public@{d}"), bytes);
        // The upstream was asked under the public repository, and said no.
        assert!(
            env.fake.blob_heads("org/public", d) >= 1,
            "no HEAD under org/public for {d}"
        );
        assert_eq!(env.fake.blob_gets("org/public", d), 0);
    }
    assert!(
        env.metric("cachalot_blob_link_checks_total", &[("result", "refused")])
            .await
            >= 6.0,
        "refusals are counted"
    );
    assert_eq!(
        env.metric(
            "cachalot_blob_link_checks_total",
            &[("result", "confirmed")]
        )
        .await,
        0.0
    );
    // The private repository itself still reads its layers from the cache.
    env.fake.reset_counts();
    for (d, bytes) in &private.layers {
        let r = env
            .client
            .get(&env.v2(&format!("org/private/blobs/{d}")))
            .await;
        assert_eq!(r.status, 200);
        assert!(r.body == *bytes);
    }
    assert_eq!(env.fake.total(), 0, "linked blobs need no upstream request");
}

#[tokio::test]
async fn a_blob_two_repositories_hold_is_confirmed_once_and_served_from_the_cache() {
    let env = Env::start().await;
    let shared = random_blob(50_000);
    let a = env
        .fake
        .push_image_with("team/a", Some("v1"), std::slice::from_ref(&shared));
    let d = &a.layers[0].0;
    env.fake.push_blob("team/b", shared.clone());
    pull(&env, "team/a", "v1", &a).await;
    env.fake.reset_counts();

    let url = env.v2(&format!("team/b/blobs/{d}"));
    let r = env.client.get(&url).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.body == shared);
    assert_eq!(
        env.fake.blob_heads("team/b", d),
        1,
        "confirmed with one HEAD"
    );
    assert_eq!(
        env.fake.blob_gets("team/b", d),
        0,
        "not downloaded a second time"
    );
    // Remembered: neither a GET nor a HEAD asks again.
    let r = env.client.get(&url).await;
    assert!(r.body == shared);
    let r = env.client.head(&url).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some(shared.len().to_string()));
    assert_eq!(env.fake.total(), 1, "{:?}", env.fake.requests());
    assert_eq!(
        env.metric(
            "cachalot_blob_link_checks_total",
            &[("result", "confirmed")]
        )
        .await,
        1.0
    );
    assert_eq!(
        env.stored_files(d).len(),
        1,
        "one file for both repositories"
    );
}

#[tokio::test]
async fn links_survive_a_restart_and_unlinked_blobs_need_the_upstream() {
    let mut env = Env::start().await;
    let shared = random_blob(30_000);
    let a = env
        .fake
        .push_image_with("team/a", Some("v1"), std::slice::from_ref(&shared));
    let d = a.layers[0].0.clone();
    env.fake.push_blob("team/b", shared.clone());
    pull(&env, "team/a", "v1", &a).await;
    env.restart_proxy(None).await;
    env.fake.stop().await;

    let r = env.client.get(&env.v2(&format!("team/a/blobs/{d}"))).await;
    assert_eq!(r.status, 200, "linked before the restart: {}", r.text());
    assert!(r.body == shared);
    // team/b holds it upstream, but nobody can say so now: an error, not the bytes.
    let r = env.client.get(&env.v2(&format!("team/b/blobs/{d}"))).await;
    assert!(r.status.is_server_error(), "{} {}", r.status, r.text());
    assert_refused(
        &r,
        r.status.as_u16(),
        "GET team/b with the upstream down",
        &shared,
    );
    assert_eq!(
        env.metric("cachalot_blob_link_checks_total", &[("result", "failed")])
            .await,
        1.0
    );
}

#[tokio::test]
async fn offline_serves_linked_blobs_and_refuses_the_rest() {
    let mut env = Env::start().await;
    let shared = random_blob(30_000);
    let a = env
        .fake
        .push_image_with("team/a", Some("v1"), std::slice::from_ref(&shared));
    let d = a.layers[0].0.clone();
    env.fake.push_blob("team/b", shared.clone());
    pull(&env, "team/a", "v1", &a).await;
    env.restart_proxy(Some(CacheSpec {
        offline: true,
        ..CacheSpec::default()
    }))
    .await;
    env.fake.reset_counts();

    let r = env.client.get(&env.v2(&format!("team/a/blobs/{d}"))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.body == shared);
    let url = env.v2(&format!("team/b/blobs/{d}"));
    let r = env.client.get(&url).await;
    assert_refused(&r, 404, "GET team/b offline", &shared);
    assert_eq!(r.error_code().as_deref(), Some("BLOB_UNKNOWN"));
    // Word for word what a digest the cache never held gets: the refusal does not tell what
    // the cache holds for other repositories.
    let never = format!("sha256:{}", "0".repeat(64));
    let r2 = env
        .client
        .get(&env.v2(&format!("team/b/blobs/{never}")))
        .await;
    assert_eq!((r2.status, r2.text()), (r.status, r.text()));
    let r = env.client.head(&url).await;
    assert_refused(&r, 404, "HEAD team/b offline", &shared);
    assert_eq!(env.fake.total(), 0, "offline: the upstream is never asked");
}

#[tokio::test]
async fn a_repository_loses_its_links_with_its_last_manifest() {
    let fake = FakeRegistry::start().await;
    let shared = random_blob(30_000);
    let a = fake.push_image_with("team/a", Some("v1"), std::slice::from_ref(&shared));
    let b = fake.push_image_with("team/b", Some("v1"), std::slice::from_ref(&shared));
    let d = a.layers[0].0.clone();
    let dir = tempfile::tempdir().unwrap();
    // team/b is pinned, so the shared layer stays while team/a's manifest and config go.
    let ups = [UpstreamSpec::new(UP, &fake.url(), true)];
    let toml = config_toml(dir.path(), &CacheSpec::default(), &ups).replace(
        "max_size = \"1GiB\"\n",
        &format!("max_size = \"1GiB\"\npinned = [\"{UP}/team/b:v1\"]\n"),
    );
    let env = Env {
        proxy: Proxy::start(&toml).await,
        fake,
        client: TestClient::new(),
        dir,
        cache: CacheSpec::default(),
        upstreams: ups.to_vec(),
    };
    pull(&env, "team/a", "v1", &a).await;
    pull(&env, "team/b", "v1", &b).await;
    env.fake.reset_counts();
    let url = env.v2(&format!("team/a/blobs/{d}"));
    assert!(env.client.get(&url).await.body == shared);
    assert_eq!(env.fake.total(), 0, "linked through team/a's manifest");

    let report = env.proxy.server().mirror.evict_now(Some(1)).unwrap();
    let gone: Vec<String> = report
        .evicted
        .iter()
        .map(|e| e.row.digest.to_string())
        .collect();
    assert!(gone.contains(&a.manifest.digest), "{gone:?}");
    assert!(!gone.contains(&d), "the pinned layer stays: {gone:?}");

    // team/b still holds it by its pinned manifest; team/a must ask again.
    let r = env.client.get(&env.v2(&format!("team/b/blobs/{d}"))).await;
    assert!(r.body == shared);
    assert_eq!(env.fake.total(), 0);
    let r = env.client.get(&url).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.body == shared);
    assert_eq!(env.fake.blob_heads("team/a", &d), 1, "asked upstream again");
    assert_eq!(
        env.fake.blob_gets("team/a", &d),
        0,
        "the cached bytes served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_for_one_repository_is_followed_only_by_repositories_holding_the_blob() {
    let env = Env::start().await;
    let layer = random_blob(200_000);
    let r1 = env
        .fake
        .push_image_with("team/r1", Some("v1"), std::slice::from_ref(&layer));
    let d = r1.layers[0].0.clone();
    // team/r3 holds the layer too; team/r2 does not.
    env.fake.push_blob("team/r3", layer.clone());
    env.fake.push_image("team/r2", Some("v1"), &[10]);
    let gate = env.fake.pause_blob(&d, 64 * 1024);

    let first = {
        let (c, url) = (env.client.clone(), env.v2(&format!("team/r1/blobs/{d}")));
        tokio::spawn(async move { c.get(&url).await })
    };
    gate.reached().await;
    let r = env.client.get(&env.v2(&format!("team/r2/blobs/{d}"))).await;
    assert_refused(&r, 404, "GET team/r2 during the fill", &layer);
    let r = env
        .client
        .head(&env.v2(&format!("team/r2/blobs/{d}")))
        .await;
    assert_refused(&r, 404, "HEAD team/r2 during the fill", &layer);
    let third = {
        let (c, url) = (env.client.clone(), env.v2(&format!("team/r3/blobs/{d}")));
        tokio::spawn(async move { c.get(&url).await })
    };
    env.wait_coalesced(1).await;
    gate.release();

    for (name, h) in [("team/r1", first), ("team/r3", third)] {
        let r = h.await.unwrap();
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        assert!(r.body == layer, "{name}");
    }
    assert_eq!(
        env.fake.count_containing("GET", &format!("/blobs/{d}")),
        1,
        "one upstream GET for the digest"
    );
    assert_eq!(env.fake.blob_heads("team/r3", &d), 1);
    assert_eq!(env.fake.blob_gets("team/r2", &d), 0);
}

#[tokio::test]
async fn a_cached_manifest_by_digest_is_scoped_like_its_blobs() {
    let mut env = Env::start().await;
    let a = env.fake.push_image("team/a", Some("v1"), &[1_000]);
    let m = &a.manifest;
    // team/b holds the same manifest upstream; team/c does not.
    env.fake.push_manifest("team/b", m);
    env.fake.push_image("team/c", Some("v1"), &[10]);
    pull(&env, "team/a", "v1", &a).await;
    env.fake.reset_counts();

    let r = env
        .client
        .get(&env.v2(&format!("team/c/manifests/{}", m.digest)))
        .await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.error_code().as_deref(), Some("MANIFEST_UNKNOWN"));
    assert!(!contains(&r.body, &m.bytes), "the manifest leaked");
    assert_eq!(env.fake.manifest_heads("team/c", &m.digest), 1);

    let url = env.v2(&format!("team/b/manifests/{}", m.digest));
    for _ in 0..2 {
        let r = env.client.get(&url).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.body, m.bytes);
    }
    assert_eq!(
        env.fake.manifest_heads("team/b", &m.digest),
        1,
        "confirmed once"
    );
    assert_eq!(
        env.fake.manifest_gets("team/b", &m.digest),
        0,
        "from the cache"
    );

    env.restart_proxy(Some(CacheSpec {
        offline: true,
        ..CacheSpec::default()
    }))
    .await;
    for (repo, status) in [("team/a", 200), ("team/b", 200), ("team/c", 404)] {
        let r = env
            .client
            .get(&env.v2(&format!("{repo}/manifests/{}", m.digest)))
            .await;
        assert_eq!(r.status, status, "offline {repo}: {}", r.text());
    }
}

/// A referrer names its subject without holding it: an artifact pushed to a public repository
/// with a private image as its subject must not make that image readable there once the
/// artifact is pulled through the mirror (review finding on the first cut, which linked it).
#[tokio::test]
async fn a_referrer_naming_a_private_image_does_not_open_it_to_its_repository() {
    let env = Env::start().await;
    let private = env.fake.push_image("team/private", Some("v1"), &[2_000]);
    pull(&env, "team/private", "v1", &private).await;
    let attack = env
        .fake
        .push_referrer("team/public", &private.manifest, "application/x.example");
    let r = env
        .client
        .get(&env.v2(&format!("team/public/manifests/{}", attack.digest)))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());

    let m = &private.manifest;
    let r = env
        .client
        .get(&env.v2(&format!("team/public/manifests/{}", m.digest)))
        .await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(!contains(&r.body, &m.bytes), "the private manifest leaked");
    for (d, bytes) in std::iter::once(&private.config).chain(&private.layers) {
        let r = env
            .client
            .get(&env.v2(&format!("team/public/blobs/{d}")))
            .await;
        assert_refused(&r, 404, &format!("GET team/public@{d}"), bytes);
    }
}
