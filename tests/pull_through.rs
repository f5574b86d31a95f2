//! Pull-through basics: manifests and blobs served exactly as upstream with the right headers,
//! cached once, ranges on cached blobs, HEAD without GET, Accept forwarding, offline mode and
//! restarts.

mod common;

use common::*;
use hyper::Method;

#[tokio::test]
async fn manifest_by_tag_and_digest_with_headers_and_exact_bytes() {
    let env = Env::start().await;
    let img = env.fake.push_image("team/app", Some("v1"), &[100, 200]);
    let m = &img.manifest;

    for reference in ["v1", m.digest.as_str()] {
        let url = env.v2(&format!("team/app/manifests/{reference}"));
        let r = env.client.get(&url).await;
        assert_eq!(r.status, 200, "GET {reference}: {}", r.text());
        assert_eq!(r.body, m.bytes, "bytes exactly as upstream");
        assert_eq!(r.header("content-type").as_deref(), Some(OCI_MANIFEST));
        assert_eq!(r.header("content-length"), Some(m.bytes.len().to_string()));
        assert_eq!(
            r.header("docker-content-digest").as_deref(),
            Some(m.digest.as_str())
        );
        assert_eq!(r.header("etag"), Some(format!("\"{}\"", m.digest)));

        let h = env.client.head(&url).await;
        assert_eq!(h.status, 200);
        assert!(h.body.is_empty());
        assert_eq!(h.header("content-type").as_deref(), Some(OCI_MANIFEST));
        assert_eq!(h.header("content-length"), Some(m.bytes.len().to_string()));
        assert_eq!(
            h.header("docker-content-digest").as_deref(),
            Some(m.digest.as_str())
        );
    }
    // Everything after the first fetches came from the cache.
    let before = env.fake.total();
    for reference in ["v1", m.digest.as_str()] {
        let r = env
            .client
            .get(&env.v2(&format!("team/app/manifests/{reference}")))
            .await;
        assert_eq!(r.body, m.bytes);
    }
    assert_eq!(
        env.fake.total(),
        before,
        "cached manifests need no upstream request"
    );
}

#[tokio::test]
async fn docker_manifest_multi_arch_index_and_manifest_list() {
    let env = Env::start().await;
    let a = env.fake.push_image("app", None, &[10]);
    let b = env.fake.push_docker_image("app", Some("docker"), &[10]);
    let idx = env
        .fake
        .push_index("app", Some("oci-multi"), &[&a, &b], false);
    let list = env
        .fake
        .push_index("app", Some("docker-multi"), &[&b], true);
    let all_types = format!("{OCI_MANIFEST}, {OCI_INDEX}, {DOCKER_MANIFEST}, {DOCKER_LIST}");

    for (tag, m) in [
        ("oci-multi", &idx),
        ("docker-multi", &list),
        ("docker", &b.manifest),
    ] {
        let r = env
            .client
            .get_with(
                &env.v2(&format!("app/manifests/{tag}")),
                &[("accept", &all_types)],
            )
            .await;
        assert_eq!(r.status, 200, "{tag}: {}", r.text());
        assert_eq!(r.body, m.bytes, "{tag}");
        assert_eq!(
            r.header("content-type"),
            Some(m.media_type.clone()),
            "{tag}"
        );
        assert_eq!(
            r.header("docker-content-digest"),
            Some(m.digest.clone()),
            "{tag}"
        );
    }
    // Children of the index by digest.
    for child in [&a.manifest, &b.manifest] {
        let r = env
            .client
            .get_with(
                &env.v2(&format!("app/manifests/{}", child.digest)),
                &[("accept", &all_types)],
            )
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, child.bytes);
        assert_eq!(r.header("content-type"), Some(child.media_type.clone()));
    }
}

#[tokio::test]
async fn accept_is_forwarded_upstream() {
    let env = Env::start().await;
    env.fake.push_image("app", Some("v1"), &[10]);
    let accept = format!("{OCI_MANIFEST}, {OCI_INDEX}");
    let r = env
        .client
        .get_with(&env.v2("app/manifests/v1"), &[("accept", &accept)])
        .await;
    assert_eq!(r.status, 200);
    let reqs = env.fake.requests();
    let m = reqs
        .iter()
        .find(|r| r.path.contains("/manifests/"))
        .expect("an upstream manifest request");
    let got: Vec<String> = m
        .headers
        .get_all("accept")
        .iter()
        .flat_map(|v| {
            v.to_str()
                .unwrap()
                .split(',')
                .map(|s| s.trim().to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        got.contains(&OCI_MANIFEST.to_string()) && got.contains(&OCI_INDEX.to_string()),
        "upstream Accept: {got:?}"
    );
}

#[tokio::test]
async fn blob_is_fetched_once_then_served_from_cache() {
    let env = Env::start().await;
    let blob = random_blob(150_000);
    let d = env.fake.push_blob("app", blob.clone());
    let url = env.v2(&format!("app/blobs/{d}"));
    for _ in 0..3 {
        let r = env.client.get(&url).await;
        assert_eq!(r.status, 200);
        assert!(r.body == blob);
        assert_eq!(r.header("content-length"), Some(blob.len().to_string()));
        assert_eq!(r.header("docker-content-digest"), Some(d.clone()));
    }
    assert_eq!(env.fake.blob_gets("app", &d), 1);
    // The 2nd and 3rd GETs are hits (or, if the fill was still committing, followers of it).
    let hit = env
        .metric(
            "cachalot_cache_lookups_total",
            &[("kind", "blob"), ("result", "hit")],
        )
        .await;
    let coalesced = env
        .metric(
            "cachalot_cache_lookups_total",
            &[("kind", "blob"), ("result", "coalesced")],
        )
        .await;
    assert!(hit + coalesced >= 2.0, "hit {hit}, coalesced {coalesced}");
    // Once the fill is over, a GET is a plain hit.
    env.wait_no_fills().await;
    assert!(env.client.get(&url).await.body == blob);
    let hit2 = env
        .metric(
            "cachalot_cache_lookups_total",
            &[("kind", "blob"), ("result", "hit")],
        )
        .await;
    assert_eq!(hit2, hit + 1.0, "a GET after the fill is a cache hit");
    assert!(
        env.metric(
            "cachalot_cache_lookups_total",
            &[("kind", "blob"), ("result", "miss")]
        )
        .await
            >= 1.0
    );
    // HEAD of a cached blob needs no upstream either.
    let h = env.client.head(&url).await;
    assert_eq!(h.status, 200);
    assert_eq!(h.header("content-length"), Some(blob.len().to_string()));
    assert_eq!(env.fake.total(), 1, "{:?}", env.fake.requests());
}

#[tokio::test]
async fn head_of_an_uncached_blob_asks_upstream_with_head_and_fetches_nothing() {
    let env = Env::start().await;
    let blob = random_blob(70_000);
    let d = env.fake.push_blob("app", blob.clone());
    let h = env.client.head(&env.v2(&format!("app/blobs/{d}"))).await;
    assert_eq!(h.status, 200);
    assert_eq!(h.header("content-length"), Some("70000".into()));
    assert_eq!(h.header("docker-content-digest"), Some(d.clone()));
    assert!(h.body.is_empty());
    assert_eq!(env.fake.blob_heads("app", &d), 1);
    assert_eq!(env.fake.blob_gets("app", &d), 0);

    let missing = format!("sha256:{}", "ab".repeat(32));
    let h = env
        .client
        .head(&env.v2(&format!("app/blobs/{missing}")))
        .await;
    assert_eq!(h.status, 404);
    assert_eq!(env.fake.blob_gets("app", &missing), 0);
}

#[tokio::test]
async fn range_requests_on_a_cached_blob() {
    let env = Env::start().await;
    let blob = random_blob(100_000);
    let d = env.fake.push_blob("app", blob.clone());
    let url = env.v2(&format!("app/blobs/{d}"));
    assert!(env.client.get(&url).await.body == blob);

    let r = env.client.get_with(&url, &[("range", "bytes=0-99")]).await;
    assert_eq!(r.status, 206);
    assert_eq!(
        r.header("content-range").as_deref(),
        Some("bytes 0-99/100000")
    );
    assert_eq!(r.header("content-length").as_deref(), Some("100"));
    assert_eq!(&r.body[..], &blob[..100]);

    let r = env
        .client
        .get_with(&url, &[("range", "bytes=99000-")])
        .await;
    assert_eq!(r.status, 206);
    assert_eq!(
        r.header("content-range").as_deref(),
        Some("bytes 99000-99999/100000")
    );
    assert_eq!(&r.body[..], &blob[99_000..]);

    // An end past the size is clamped.
    let r = env
        .client
        .get_with(&url, &[("range", "bytes=99990-200000")])
        .await;
    assert_eq!(r.status, 206);
    assert_eq!(
        r.header("content-range").as_deref(),
        Some("bytes 99990-99999/100000")
    );
    assert_eq!(&r.body[..], &blob[99_990..]);

    let r = env
        .client
        .get_with(&url, &[("range", "bytes=100000-")])
        .await;
    assert_eq!(r.status, 416);
    let r = env
        .client
        .get_with(&url, &[("range", "bytes=200000-200010")])
        .await;
    assert_eq!(r.status, 416);
    assert_eq!(env.fake.blob_gets("app", &d), 1);
}

#[tokio::test]
async fn range_on_a_cold_blob_is_served_from_one_fill() {
    let env = Env::start().await;
    let blob = random_blob(100_000);
    let d = env.fake.push_blob("app", blob.clone());
    let url = env.v2(&format!("app/blobs/{d}"));
    let r = env
        .client
        .get_with(&url, &[("range", "bytes=50000-50009")])
        .await;
    assert_eq!(r.status, 206);
    assert_eq!(&r.body[..], &blob[50_000..50_010]);
    let r = env.client.get(&url).await;
    assert!(r.body == blob);
    assert!(
        env.fake.blob_gets("app", &d) <= 1,
        "one upstream GET at most"
    );
}

#[tokio::test]
async fn offline_mode_never_contacts_upstream() {
    let mut env = Env::start().await;
    let img = env.fake.push_image("app", Some("v1"), &[1000]);
    let other = env.fake.push_image("app", Some("v2"), &[1000]);
    let (ld, lb) = img.layers[0].clone();
    assert_eq!(
        env.client.get(&env.v2("app/manifests/v1")).await.status,
        200
    );
    assert!(
        env.client
            .get(&env.v2(&format!("app/blobs/{ld}")))
            .await
            .body
            == lb
    );

    env.restart_proxy(Some(CacheSpec {
        tag_ttl: "1s".into(),
        offline: true,
    }))
    .await;
    env.fake.reset_counts();
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await; // past tag_ttl

    let r = env.client.get(&env.v2("app/manifests/v1")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, img.manifest.bytes);
    let r = env
        .client
        .get(&env.v2(&format!("app/manifests/{}", img.manifest.digest)))
        .await;
    assert_eq!(r.status, 200);
    let r = env.client.get(&env.v2(&format!("app/blobs/{ld}"))).await;
    assert!(r.body == lb);
    // Uncached content is an error, not an upstream request.
    let r = env.client.get(&env.v2("app/manifests/v2")).await;
    assert_ne!(r.status, 200);
    assert!(r.error_code().is_some(), "OCI error: {}", r.text());
    let r = env
        .client
        .get(&env.v2(&format!("app/blobs/{}", other.layers[0].0)))
        .await;
    assert_ne!(r.status, 200);
    let r = env
        .client
        .head(&env.v2(&format!("app/blobs/{}", other.layers[0].0)))
        .await;
    assert_ne!(r.status, 200);
    let _ = env.client.get(&env.v2("app/tags/list")).await;
    let _ = env
        .client
        .send(
            Method::GET,
            &env.v2(&format!("app/referrers/{}", img.manifest.digest)),
            &[],
        )
        .await;
    assert_eq!(env.fake.total(), 0, "offline: {:?}", env.fake.requests());
}

#[tokio::test]
async fn cached_content_survives_a_restart_with_upstream_down() {
    let mut env = Env::start().await;
    let img = env.fake.push_image("app", Some("v1"), &[5000]);
    let (ld, lb) = img.layers[0].clone();
    assert_eq!(
        env.client.get(&env.v2("app/manifests/v1")).await.body,
        img.manifest.bytes
    );
    assert!(
        env.client
            .get(&env.v2(&format!("app/blobs/{ld}")))
            .await
            .body
            == lb
    );

    env.fake.stop().await;
    env.restart_proxy(None).await;
    let r = env.client.get(&env.v2("app/manifests/v1")).await;
    assert_eq!(r.status, 200, "tag resolves after restart: {}", r.text());
    assert_eq!(r.body, img.manifest.bytes);
    assert_eq!(
        r.header("docker-content-digest"),
        Some(img.manifest.digest.clone())
    );
    let r = env.client.get(&env.v2(&format!("app/blobs/{ld}"))).await;
    assert!(r.body == lb);
}
