//! The HTTP surface: routing modes, tags/list and referrers, errors with OCI codes, push
//! rejected, health and metrics endpoints, and the API version header everywhere.

mod common;

use common::*;
use hyper::Method;

const ZERO: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

fn assert_api_version(r: &Resp, what: &str) {
    assert_eq!(
        r.header("docker-distribution-api-version").as_deref(),
        Some("registry/2.0"),
        "{what}"
    );
}

#[tokio::test]
async fn base_health_ready_and_metrics() {
    let env = Env::start().await;
    let r = env.client.get(&env.url("/v2/")).await;
    assert_eq!(r.status, 200);
    assert_api_version(&r, "/v2/");
    let r = env.client.get(&env.url("/healthz")).await;
    assert_eq!(r.status, 200);
    assert_api_version(&r, "/healthz");
    let r = env.client.get(&env.url("/readyz")).await;
    assert_eq!(r.status, 200);
    assert_api_version(&r, "/readyz");

    let img = env.fake.push_image("app", Some("v1"), &[1000]);
    env.client.get(&env.v2("app/manifests/v1")).await;
    env.client
        .get(&env.v2(&format!("app/blobs/{}", img.layers[0].0)))
        .await;
    env.client
        .get(&env.v2(&format!("app/blobs/{}", img.layers[0].0)))
        .await;
    let r = env.client.get(&env.url("/metrics")).await;
    assert_eq!(r.status, 200);
    assert_api_version(&r, "/metrics");
    let text = r.text();
    for name in [
        "cachalot_requests_total",
        "cachalot_cache_lookups_total",
        "cachalot_served_bytes_total",
        "cachalot_upstream_requests_total",
    ] {
        assert!(text.contains(name), "/metrics lacks {name}");
    }
    assert!(
        metric_value(
            &text,
            "cachalot_requests_total",
            &[("route", "manifest"), ("code", "200")]
        ) >= 1.0
    );
    assert!(
        metric_value(
            &text,
            "cachalot_requests_total",
            &[("route", "blob"), ("code", "200")]
        ) >= 2.0
    );
    let hit = metric_value(
        &text,
        "cachalot_cache_lookups_total",
        &[("kind", "blob"), ("result", "hit")],
    );
    let coalesced = metric_value(
        &text,
        "cachalot_cache_lookups_total",
        &[("kind", "blob"), ("result", "coalesced")],
    );
    assert!(hit + coalesced >= 1.0, "second blob GET was not a miss");
    let served = metric_value(&text, "cachalot_served_bytes_total", &[("source", "cache")])
        + metric_value(&text, "cachalot_served_bytes_total", &[("source", "fill")]);
    assert!(served >= 2000.0, "two 1000-byte blob GETs served: {served}");
    assert!(
        metric_value(
            &text,
            "cachalot_upstream_requests_total",
            &[("upstream", UP), ("op", "blob")]
        ) >= 1.0
    );
    assert!(metric_value(&text, "cachalot_upstream_bytes_total", &[("upstream", UP)]) >= 1000.0);
}

#[tokio::test]
async fn every_response_carries_the_api_version_header() {
    let env = Env::start().await;
    env.fake.push_image("app", Some("v1"), &[10]);
    let cases = [
        (Method::GET, env.v2("app/manifests/v1")),
        (Method::HEAD, env.v2("app/manifests/v1")),
        (Method::GET, env.v2("app/manifests/missing")),
        (Method::GET, env.v2(&format!("app/blobs/{ZERO}"))),
        (Method::GET, env.v2("app/blobs/sha256:xyz")),
        (Method::PUT, env.v2("app/manifests/v1")),
        (Method::GET, env.v2("BAD/manifests/v1")),
        (Method::GET, env.url("/nothing-here")),
        (Method::GET, env.v2("app/tags/list")),
    ];
    for (m, url) in cases {
        let r = env.client.send(m.clone(), &url, &[]).await;
        assert_api_version(&r, &format!("{m} {url} -> {}", r.status));
        assert_ne!(r.status, 500, "{m} {url}");
    }
}

#[tokio::test]
async fn routing_by_ns_prefix_and_default_upstream() {
    let env = Env::start().await;
    let img = env.fake.push_image("org/app", Some("v1"), &[10]);
    for url in [
        env.v2("org/app/manifests/v1"),
        env.v2(&format!("org/app/manifests/v1?ns={UP}")),
        env.v2(&format!("{UP}/org/app/manifests/v1")),
    ] {
        let r = env.client.get(&url).await;
        assert_eq!(r.status, 200, "{url}: {}", r.text());
        assert_eq!(r.body, img.manifest.bytes, "{url}");
    }
    let (d, b) = &img.layers[0];
    for url in [
        env.v2(&format!("org/app/blobs/{d}")),
        env.v2(&format!("org/app/blobs/{d}?ns={UP}")),
        env.v2(&format!("{UP}/org/app/blobs/{d}")),
    ] {
        let r = env.client.get(&url).await;
        assert_eq!(r.status, 200, "{url}");
        assert!(r.body == *b);
    }
    // The prefix is stripped before calling upstream; nothing asked for the prefixed name.
    assert!(
        env.fake.requests().iter().all(|r| !r.path.contains(UP)),
        "{:?}",
        env.fake.requests()
    );
    // All three modes share one cache entry: one upstream GET for the blob.
    assert_eq!(env.fake.blob_gets("org/app", d), 1);
}

#[tokio::test]
async fn docker_io_library_normalisation_in_every_mode() {
    let fake = FakeRegistry::start().await;
    let img = fake.push_image("library/nginx", Some("latest"), &[10]);
    let ups = vec![UpstreamSpec::new("docker.io", &fake.url(), true)];
    let env = Env::start_on(fake, CacheSpec::default(), ups).await;
    for url in [
        env.v2("nginx/manifests/latest"),
        env.v2("library/nginx/manifests/latest"),
        env.v2("nginx/manifests/latest?ns=docker.io"),
        env.v2("docker.io/nginx/manifests/latest"),
        env.v2("docker.io/library/nginx/manifests/latest"),
    ] {
        let r = env.client.get(&url).await;
        assert_eq!(r.status, 200, "{url}: {}", r.text());
        assert_eq!(r.body, img.manifest.bytes, "{url}");
    }
    assert!(
        env.fake
            .requests()
            .iter()
            .all(|r| !r.path.starts_with("/v2/nginx/"))
    );
    let (d, _) = &img.layers[0];
    assert_eq!(
        env.client
            .get(&env.v2(&format!("nginx/blobs/{d}")))
            .await
            .status,
        200
    );
    assert_eq!(env.fake.blob_gets("library/nginx", d), 1);
}

/// Found by fuzzing: a one-component name of the longest valid length became, with docker.io's
/// `library/` prefix, a name past the limit that cachalot would have asked the upstream for.
#[tokio::test]
async fn docker_io_name_too_long_with_its_library_prefix_is_400() {
    let fake = FakeRegistry::start().await;
    let ups = vec![UpstreamSpec::new("docker.io", &fake.url(), true)];
    let env = Env::start_on(fake, CacheSpec::default(), ups).await;
    let name = "a".repeat(255);
    let r = env
        .client
        .get(&env.v2(&format!("{name}/manifests/latest")))
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.error_code().as_deref(), Some("NAME_INVALID"));
    assert_eq!(env.fake.total(), 0, "the bad name never reaches upstream");
}

#[tokio::test]
async fn two_upstreams_do_not_collide() {
    let a = FakeRegistry::start().await;
    let b = FakeRegistry::start().await;
    let ia = a.push_image("org/app", Some("v1"), &[10]);
    let ib = b.push_image("org/app", Some("v1"), &[10]);
    let ups = vec![
        UpstreamSpec::new("a.example", &a.url(), true),
        UpstreamSpec::new("b.example", &b.url(), false),
    ];
    let env = Env::start_on(a, CacheSpec::default(), ups).await;
    let ra = env
        .client
        .get(&env.v2("a.example/org/app/manifests/v1"))
        .await;
    let rb = env
        .client
        .get(&env.v2("b.example/org/app/manifests/v1"))
        .await;
    assert_eq!(ra.body, ia.manifest.bytes);
    assert_eq!(rb.body, ib.manifest.bytes);
    let rb2 = env
        .client
        .get(&env.v2("org/app/manifests/v1?ns=b.example"))
        .await;
    assert_eq!(rb2.body, ib.manifest.bytes);
    let rdef = env.client.get(&env.v2("org/app/manifests/v1")).await;
    assert_eq!(
        rdef.body, ia.manifest.bytes,
        "default upstream is a.example"
    );
    // b's blob comes from b.
    let (db, _) = &ib.layers[0];
    assert_eq!(
        env.client
            .get(&env.v2(&format!("b.example/org/app/blobs/{db}")))
            .await
            .status,
        200
    );
    assert_eq!(b.blob_gets("org/app", db), 1);
}

#[tokio::test]
async fn without_a_default_an_unknown_name_is_name_unknown() {
    let fake = FakeRegistry::start().await;
    fake.push_image("org/app", Some("v1"), &[10]);
    let ups = vec![UpstreamSpec::new("only.example", &fake.url(), false)];
    let env = Env::start_on(fake, CacheSpec::default(), ups).await;
    let r = env.client.get(&env.v2("org/app/manifests/v1")).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code().as_deref(), Some("NAME_UNKNOWN"));
    assert_eq!(
        env.client
            .get(&env.v2("only.example/org/app/manifests/v1"))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn tags_list_with_n_last_and_a_rewritten_link() {
    let env = Env::start().await;
    let img = env.fake.push_image("org/app", None, &[10]);
    for t in ["a", "b", "c", "d", "e"] {
        env.fake.set_tag("org/app", t, &img.manifest.digest);
    }
    let r = env.client.get(&env.v2("org/app/tags/list")).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["tags"],
        serde_json::json!(["a", "b", "c", "d", "e"])
    );

    let r = env
        .client
        .get(&env.v2(&format!("{UP}/org/app/tags/list?n=2")))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["tags"], serde_json::json!(["a", "b"]));
    let link = r.header("link").expect("Link header");
    assert!(
        link.contains(&format!("/v2/{UP}/org/app/tags/list?")),
        "Link not rewritten for the prefix: {link}"
    );
    assert!(
        link.contains("last=b") && link.contains("rel=\"next\""),
        "{link}"
    );
    // Following the Link through the proxy gives the next page.
    let target = link.trim_start_matches('<').split('>').next().unwrap();
    let next = if target.starts_with("http") {
        target.to_string()
    } else {
        env.url(target)
    };
    let r = env.client.get(&next).await;
    assert_eq!(r.json()["tags"], serde_json::json!(["c", "d"]));

    let r = env
        .client
        .get(&env.v2("org/app/tags/list?n=10&last=c"))
        .await;
    assert_eq!(r.json()["tags"], serde_json::json!(["d", "e"]));
    assert!(r.header("link").is_none());
    let r = env.client.get(&env.v2("nope/tags/list")).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code().as_deref(), Some("NAME_UNKNOWN"));
}

#[tokio::test]
async fn referrers_are_passed_through() {
    let env = Env::start().await;
    let img = env.fake.push_image("org/app", Some("v1"), &[10]);
    let sig = env
        .fake
        .push_referrer("org/app", &img.manifest, "application/vnd.example.sig");
    let sbom = env
        .fake
        .push_referrer("org/app", &img.manifest, "application/vnd.example.sbom");
    let r = env
        .client
        .get(&env.v2(&format!("org/app/referrers/{}", img.manifest.digest)))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type").as_deref(), Some(OCI_INDEX));
    let ds: Vec<String> = r.json()["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["digest"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ds.len(), 2);
    assert!(ds.contains(&sig.digest) && ds.contains(&sbom.digest));
    let r = env
        .client
        .get(&env.v2(&format!(
            "org/app/referrers/{}?artifactType=application/vnd.example.sbom",
            img.manifest.digest
        )))
        .await;
    assert_eq!(r.status, 200);
    let m = r.json()["manifests"].clone();
    assert_eq!(m.as_array().unwrap().len(), 1, "{m}");
    assert_eq!(m[0]["digest"], sbom.digest.as_str());
    let r = env
        .client
        .get(&env.v2("org/app/referrers/sha256:nothex"))
        .await;
    assert_eq!(r.status, 400);
}

#[tokio::test]
async fn push_and_delete_are_unsupported() {
    let env = Env::start().await;
    let img = env.fake.push_image("org/app", Some("v1"), &[10]);
    let cases = [
        (Method::PUT, env.v2("org/app/manifests/v1")),
        (Method::DELETE, env.v2("org/app/manifests/v1")),
        (
            Method::DELETE,
            env.v2(&format!("org/app/blobs/{}", img.layers[0].0)),
        ),
        (Method::POST, env.v2("org/app/blobs/uploads/")),
        (Method::PATCH, env.v2("org/app/blobs/uploads/some-uuid")),
        (
            Method::PUT,
            env.v2(&format!("org/app/blobs/uploads/some-uuid?digest={ZERO}")),
        ),
    ];
    for (m, url) in cases {
        let r = env.client.send(m.clone(), &url, &[]).await;
        assert_eq!(r.status, 405, "{m} {url}");
        assert_eq!(r.error_code().as_deref(), Some("UNSUPPORTED"), "{m} {url}");
    }
    assert_eq!(env.fake.total(), 0, "writes never reach upstream");
}

#[tokio::test]
async fn bad_names_and_digests_are_400() {
    let env = Env::start().await;
    let cases: Vec<(String, &[&str])> = vec![
        (env.v2("Org/App/manifests/v1"), &["NAME_INVALID"]),
        (env.v2("org/-app/manifests/v1"), &["NAME_INVALID"]),
        (
            env.v2("org//app/blobs/sha256:00"),
            &["NAME_INVALID", "DIGEST_INVALID"],
        ),
        (
            env.v2("org/app/manifests/sha256:1234"),
            &["DIGEST_INVALID", "MANIFEST_INVALID"],
        ),
        (env.v2("org/app/blobs/sha256:xyz"), &["DIGEST_INVALID"]),
        (env.v2("org/app/blobs/notadigest"), &["DIGEST_INVALID"]),
        (
            env.v2(&format!("org/app/blobs/sha256:{}", "A".repeat(64))),
            &["DIGEST_INVALID"],
        ),
    ];
    for (url, codes) in cases {
        let r = env.client.get(&url).await;
        assert_eq!(r.status, 400, "{url}: {}", r.text());
        let code = r.error_code().unwrap_or_default();
        assert!(
            codes.contains(&code.as_str()),
            "{url}: code {code}, want one of {codes:?}"
        );
    }
    assert_eq!(env.fake.total(), 0, "bad input never reaches upstream");
}

/// A reference that is neither a tag nor a digest names no manifest: 404 MANIFEST_UNKNOWN, as
/// the conformance suite expects for `.INVALID_MANIFEST_NAME`, and the upstream is not asked.
#[tokio::test]
async fn references_that_cannot_exist_are_404_manifest_unknown() {
    let env = Env::start().await;
    env.fake.push_image("org/app", Some("v1"), &[10]);
    let long_tag = "t".repeat(129);
    for reference in [".INVALID_MANIFEST_NAME", "-v1", long_tag.as_str(), "a%20b"] {
        let url = env.v2(&format!("org/app/manifests/{reference}"));
        let get = env.client.get(&url).await;
        assert_eq!(get.status, 404, "GET {url}: {}", get.text());
        assert_eq!(
            get.error_code().as_deref(),
            Some("MANIFEST_UNKNOWN"),
            "{url}"
        );
        let head = env.client.head(&url).await;
        assert_eq!(head.status, 404, "HEAD {url}");
    }
    assert_eq!(
        env.fake.total(),
        0,
        "an impossible reference never reaches upstream"
    );
}

#[tokio::test]
async fn unknown_content_is_404_with_codes() {
    let env = Env::start().await;
    env.fake.push_image("org/app", Some("v1"), &[10]);
    let r = env.client.get(&env.v2("org/app/manifests/nope")).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code().as_deref(), Some("MANIFEST_UNKNOWN"));
    let r = env
        .client
        .get(&env.v2(&format!("org/app/manifests/{ZERO}")))
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code().as_deref(), Some("MANIFEST_UNKNOWN"));
    let r = env
        .client
        .get(&env.v2(&format!("org/app/blobs/{ZERO}")))
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code().as_deref(), Some("BLOB_UNKNOWN"));
    let r = env.client.head(&env.v2("org/app/manifests/nope")).await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn upstream_429_with_nothing_cached_is_429_with_retry_after() {
    let env = Env::start().await;
    let img = env.fake.push_image("org/app", Some("v1"), &[10]);
    env.fake
        .set_status_fault(Some(StatusFault::too_many_requests(42)));
    for url in [
        env.v2("org/app/manifests/v1"),
        env.v2(&format!("org/app/blobs/{}", img.layers[0].0)),
    ] {
        let r = env.client.get(&url).await;
        assert_eq!(r.status, 429, "{url}");
        assert_eq!(r.error_code().as_deref(), Some("TOOMANYREQUESTS"));
        assert_eq!(r.header("retry-after").as_deref(), Some("42"), "{url}");
    }
}

#[tokio::test]
async fn unreachable_upstream_with_nothing_cached_is_502_or_504_naming_it() {
    let env = Env::start().await;
    let img = env.fake.push_image("org/app", Some("v1"), &[10]);
    env.fake.stop().await;
    for url in [
        env.v2("org/app/manifests/v1"),
        env.v2(&format!("org/app/blobs/{}", img.layers[0].0)),
    ] {
        let r = env.client.get(&url).await;
        assert!(r.status == 502 || r.status == 504, "{url}: {}", r.status);
        assert!(r.error_code().is_some(), "OCI error body: {}", r.text());
        let text = r.text();
        assert!(
            text.contains(UP) || text.contains(&env.fake.addr().to_string()),
            "the message names the upstream: {text}"
        );
    }
}

#[tokio::test]
async fn upstream_5xx_with_nothing_cached_is_a_gateway_error() {
    let env = Env::start().await;
    env.fake.push_image("org/app", Some("v1"), &[10]);
    env.fake.set_status_fault(Some(StatusFault::all(500)));
    let r = env.client.get(&env.v2("org/app/manifests/v1")).await;
    assert!(
        r.status == 502 || r.status == 503 || r.status == 504,
        "{}",
        r.status
    );
    assert!(r.error_code().is_some());
}

#[tokio::test]
async fn odd_inputs_never_give_500() {
    let env = Env::start().await;
    let paths = [
        "/v2",
        "/v2/",
        "/v2//",
        "/v2/app",
        "/v2/app/",
        "/v2/app/manifests/",
        "/v2/app/blobs/",
        "/v2/app/tags",
        "/v2/app/tags/list?n=abc",
        "/v2/app/tags/list?n=-1",
        "/v2/app/referrers/",
        "/v2/../../etc/passwd/manifests/x",
        "/v2/app/manifests/..%2f..%2fx",
        "/v2/%00/manifests/x",
        "/v2/app/blobs/sha256:..%2F..%2F",
        "/v2/_catalog",
        "/favicon.ico",
        "/metrics/x",
    ];
    for p in paths {
        for m in [Method::GET, Method::HEAD] {
            let r = env.client.send(m.clone(), &env.url(p), &[]).await;
            assert!(
                r.status.as_u16() < 500 || r.status == 502 || r.status == 504,
                "{m} {p}: {}",
                r.status
            );
            assert_api_version(&r, p);
        }
    }
    let r = env
        .client
        .get_with(
            &env.v2(&format!("app/blobs/{ZERO}")),
            &[("range", "bytes=garbage")],
        )
        .await;
    assert_ne!(r.status, 500);
}

#[tokio::test]
async fn a_hung_upstream_with_nothing_cached_is_a_gateway_error() {
    let env = Env::start_with(CacheSpec::default(), "timeout = \"1s\"").await;
    env.fake.push_image("org/app", Some("v1"), &[10]);
    env.fake
        .set_manifest_delay(Some(std::time::Duration::from_secs(50)));
    let r = env.client.get(&env.v2("org/app/manifests/v1")).await;
    assert!(r.status == 504 || r.status == 502, "{}", r.status);
    assert!(r.error_code().is_some(), "{}", r.text());
    assert!(r.text().contains(UP), "names the upstream: {}", r.text());
}
