//! Metrics move exactly as the pulls imply: each lookup counts once in the right series, bytes
//! are attributed to their source, upstream calls, 429s and rate-limit headroom are counted,
//! and gauges return to zero. Also the separate `server.metrics_listen` listener.

mod common;

use std::time::Duration;

use common::client::{drain, read_at_least};
use common::*;
use hyper::Method;

/// Every `cachalot_cache_lookups_total` series, as (kind, result) -> value.
async fn lookups(env: &Env) -> Vec<(String, String, f64)> {
    let text = env.metrics().await;
    let mut out = vec![];
    for kind in ["manifest", "blob"] {
        for result in ["hit", "miss", "coalesced", "stale", "revalidated"] {
            let v = metric_value(
                &text,
                "cachalot_cache_lookups_total",
                &[("kind", kind), ("result", result)],
            );
            out.push((kind.to_owned(), result.to_owned(), v));
        }
    }
    out
}

/// Asserts the lookup counters equal `expected` (unlisted series must be zero).
async fn assert_lookups(env: &Env, expected: &[(&str, &str, f64)]) {
    for (kind, result, v) in lookups(env).await {
        let want = expected
            .iter()
            .find(|(k, r, _)| *k == kind && *r == result)
            .map_or(0.0, |e| e.2);
        assert_eq!(
            v, want,
            "cachalot_cache_lookups_total{{kind={kind},result={result}}}"
        );
    }
}

#[tokio::test]
async fn miss_then_hit_count_once_with_bytes_by_source() {
    let env = Env::start().await;
    let img = env.fake.push_image("team/app", Some("v1"), &[3000]);
    let (layer, bytes) = img.layers[0].clone();
    let mlen = img.manifest.bytes.len() as f64;
    let blen = bytes.len() as f64;

    for _ in 0..2 {
        let r = env.client.get(&env.v2("team/app/manifests/v1")).await;
        assert_eq!(r.status, 200);
    }
    assert_lookups(&env, &[("manifest", "miss", 1.0), ("manifest", "hit", 1.0)]).await;

    let url = env.v2(&format!("team/app/blobs/{layer}"));
    let r = env.client.get(&url).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), bytes.len());
    env.wait_no_fills().await;
    let r = env.client.get(&url).await;
    assert_eq!(r.body, bytes);
    assert_lookups(
        &env,
        &[
            ("manifest", "miss", 1.0),
            ("manifest", "hit", 1.0),
            ("blob", "miss", 1.0),
            ("blob", "hit", 1.0),
        ],
    )
    .await;

    let text = env.metrics().await;
    let m = |name: &str, labels: &[(&str, &str)]| metric_value(&text, name, labels);
    // Manifests are answered from memory, whether just fetched or cached.
    assert_eq!(
        m("cachalot_served_bytes_total", &[("source", "cache")]),
        2.0 * mlen + blen
    );
    assert_eq!(
        m("cachalot_served_bytes_total", &[("source", "fill")]),
        blen
    );
    assert_eq!(
        m("cachalot_upstream_bytes_total", &[("upstream", UP)]),
        mlen + blen
    );
    assert_eq!(
        m(
            "cachalot_upstream_requests_total",
            &[("upstream", UP), ("op", "manifest"), ("code", "200")]
        ),
        1.0
    );
    assert_eq!(
        m(
            "cachalot_upstream_requests_total",
            &[("upstream", UP), ("op", "blob"), ("code", "200")]
        ),
        1.0
    );
    for op in ["manifest", "blob"] {
        let labels = [("upstream", UP), ("op", op)];
        assert_eq!(
            m("cachalot_upstream_first_byte_seconds_count", &labels),
            1.0,
            "{op}"
        );
        assert_eq!(
            m("cachalot_upstream_duration_seconds_count", &labels),
            1.0,
            "{op}"
        );
    }
    assert_eq!(
        m(
            "cachalot_blob_first_byte_seconds_count",
            &[("source", "fill")]
        ),
        1.0
    );
    assert_eq!(
        m(
            "cachalot_blob_first_byte_seconds_count",
            &[("source", "cache")]
        ),
        1.0
    );
    assert_eq!(
        m(
            "cachalot_requests_total",
            &[("route", "manifest"), ("code", "200")]
        ),
        2.0
    );
    assert_eq!(
        m(
            "cachalot_requests_total",
            &[("route", "blob"), ("code", "200")]
        ),
        2.0
    );
    assert_eq!(
        m(
            "cachalot_request_duration_seconds_count",
            &[("route", "blob")]
        ),
        2.0
    );
    assert_eq!(m("cachalot_fills_in_flight", &[]), 0.0);
    assert_eq!(m("cachalot_followers_waiting", &[]), 0.0);
    assert_eq!(m("cachalot_cache_max_size_bytes", &[]), (1u64 << 30) as f64);
    assert_eq!(m("cachalot_digest_mismatches_total", &[]), 0.0);
    // No repository, tag or digest ever becomes a label value.
    for leak in ["team/app", "v1", layer.as_str()] {
        assert!(!text.contains(leak), "{leak} appears in /metrics");
    }
}

#[tokio::test]
async fn a_follower_counts_as_coalesced_and_waits_in_the_gauges() {
    let env = Env::start().await;
    let blob = random_blob(400_000);
    let d = env.fake.push_blob("app", blob.clone());
    let gate = env.fake.pause_blob(&d, 100_000);
    let url = env.v2(&format!("app/blobs/{d}"));

    let first = env.client.send_raw(Method::GET, &url, &[]).await;
    let mut first = first.into_body();
    let head = read_at_least(&mut first, 1).await;
    let second = TestClient::unpooled()
        .send_raw(Method::GET, &url, &[])
        .await;
    let mut second = second.into_body();
    let head2 = read_at_least(&mut second, 1).await;
    assert!(!gate.is_released());
    assert_eq!(env.metric("cachalot_fills_in_flight", &[]).await, 1.0);
    assert_eq!(env.metric("cachalot_followers_waiting", &[]).await, 2.0);
    assert_lookups(&env, &[("blob", "miss", 1.0), ("blob", "coalesced", 1.0)]).await;

    gate.release();
    let rest = drain(first).await;
    let rest2 = drain(second).await;
    assert_eq!(head.len() + rest.bytes.len(), blob.len());
    assert_eq!(head2.len() + rest2.bytes.len(), blob.len());
    env.wait_no_fills().await;
    // The reader tasks end just after the last byte is handed over.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while env.metric("cachalot_followers_waiting", &[]).await != 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "followers gauge stuck"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        env.metric("cachalot_served_bytes_total", &[("source", "fill")])
            .await,
        2.0 * blob.len() as f64
    );
    assert_eq!(
        env.metric("cachalot_upstream_bytes_total", &[("upstream", UP)])
            .await,
        blob.len() as f64
    );
    assert_eq!(env.fake.blob_gets("app", &d), 1);
    assert_lookups(&env, &[("blob", "miss", 1.0), ("blob", "coalesced", 1.0)]).await;
}

#[tokio::test]
async fn stale_and_revalidated_tags_count_once_with_429s_and_headroom() {
    let env = Env::start_with(
        CacheSpec {
            tag_ttl: "200ms".into(),
            offline: false,
        },
        "",
    )
    .await;
    env.fake.push_image("app", Some("v1"), &[100]);
    env.fake.set_extra_headers(&[
        ("ratelimit-limit", "100;w=21600"),
        ("ratelimit-remaining", "76;w=21600"),
    ]);
    let url = env.v2("app/manifests/v1");
    assert_eq!(env.client.get(&url).await.status, 200);
    assert_eq!(
        env.metric("cachalot_upstream_ratelimit_limit", &[("upstream", UP)])
            .await,
        100.0
    );
    assert_eq!(
        env.metric("cachalot_upstream_ratelimit_remaining", &[("upstream", UP)])
            .await,
        76.0
    );

    // The tag's TTL runs out and the upstream rate-limits the revalidation: stale.
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.fake.set_status_fault(Some(
        StatusFault::too_many_requests(30).on_path("/manifests/"),
    ));
    env.fake.set_extra_headers(&[
        ("ratelimit-limit", "100;w=21600"),
        ("ratelimit-remaining", "0;w=21600"),
    ]);
    assert_eq!(env.client.get(&url).await.status, 200);
    assert_lookups(
        &env,
        &[("manifest", "miss", 1.0), ("manifest", "stale", 1.0)],
    )
    .await;
    assert_eq!(
        env.metric("cachalot_upstream_rate_limited_total", &[("upstream", UP)])
            .await,
        1.0
    );
    assert_eq!(
        env.metric(
            "cachalot_upstream_requests_total",
            &[("upstream", UP), ("op", "manifest"), ("code", "429")]
        )
        .await,
        1.0
    );
    assert_eq!(
        env.metric("cachalot_upstream_ratelimit_remaining", &[("upstream", UP)])
            .await,
        0.0
    );

    // The upstream recovers: the HEAD confirms the digest.
    env.fake.set_status_fault(None);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(env.client.get(&url).await.status, 200);
    assert_lookups(
        &env,
        &[
            ("manifest", "miss", 1.0),
            ("manifest", "stale", 1.0),
            ("manifest", "revalidated", 1.0),
        ],
    )
    .await;
    assert_eq!(env.fake.manifest_gets("app", "v1"), 1);
}

#[tokio::test]
async fn digest_mismatch_is_counted_once() {
    let env = Env::start().await;
    let blob = random_blob(5000);
    let d = env.fake.push_blob("app", blob);
    env.fake.corrupt(&d, true);
    let (status, _, drained) = env
        .client
        .get_drained(&env.v2(&format!("app/blobs/{d}")))
        .await;
    // Either the fill failed before headers went out (502), or the 200 is cut short.
    assert!(
        status == 502 || drained.error.is_some(),
        "a corrupt blob must not complete: {status}, {} bytes",
        drained.bytes.len()
    );
    env.wait_no_fills().await;
    assert_eq!(
        env.metric("cachalot_digest_mismatches_total", &[("upstream", UP)])
            .await,
        1.0
    );
}

/// A cachalot in front of `fake` with `server.metrics_listen` on, and its cache directory.
async fn spawn_with_metrics_listen(
    fake: &FakeRegistry,
) -> (cachalot::server::Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let toml = config_toml(
        dir.path(),
        &CacheSpec::default(),
        &[UpstreamSpec::new(UP, &fake.url(), true)],
    )
    .replace(
        "listen = \"127.0.0.1:0\"",
        "listen = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"",
    );
    let config = cachalot::config::Config::from_toml_str(&toml).unwrap();
    (cachalot::server::spawn(config).await.unwrap(), dir)
}

#[tokio::test]
async fn metrics_listen_serves_metrics_only() {
    let fake = FakeRegistry::start().await;
    let (server, _dir) = spawn_with_metrics_listen(&fake).await;
    let admin = server.metrics_addr().expect("metrics_listen bound");
    assert_ne!(admin, server.local_addr());
    let client = TestClient::new();
    let r = client.get(&format!("http://{admin}/metrics")).await;
    assert_eq!(r.status, 200);
    assert!(r.text().contains("cachalot_cache_lookups_total"));
    let r = client.get(&format!("http://{admin}/v2/")).await;
    assert_eq!(
        r.status, 404,
        "the registry API is not on the metrics listener"
    );
    let r = client
        .get(&format!("http://{}/metrics", server.local_addr()))
        .await;
    assert_eq!(r.status, 200, "/metrics stays on the main listener");
    server.shutdown().await;
}

#[tokio::test]
async fn metrics_listen_reports_the_cache_size() {
    let fake = FakeRegistry::start().await;
    let blob = random_blob(5000);
    let d = fake.push_blob("app", blob.clone());
    let (server, _dir) = spawn_with_metrics_listen(&fake).await;
    let admin = format!("http://{}/metrics", server.metrics_addr().unwrap());
    let client = TestClient::new();
    let r = client
        .get(&format!("http://{}/v2/app/blobs/{d}", server.local_addr()))
        .await;
    assert_eq!(r.body, blob);
    // Only the admin listener is scraped here: a scrape of the main one would set the
    // gauges for both, hiding a listener that does not.
    let deadline = tokio::time::Instant::now() + common::client::SAFETY;
    let text = loop {
        let text = client.get(&admin).await.text();
        if metric_value(&text, "cachalot_fills_in_flight", &[]) == 0.0 {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "safety timeout: fill still in flight"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        metric_value(&text, "cachalot_cache_size_bytes", &[]),
        blob.len() as f64
    );
    assert_eq!(metric_value(&text, "cachalot_cache_objects", &[]), 1.0);
    server.shutdown().await;
}
