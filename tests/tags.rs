//! Tags: trusted for tag_ttl, then revalidated with HEAD; stale copies served when upstream
//! rate-limits, fails or is unreachable, and counted.

mod common;

use std::time::Duration;

use common::*;

const TTL: &str = "1s";
const PAST_TTL: Duration = Duration::from_millis(1500);

async fn env_short_ttl() -> Env {
    Env::start_with(
        CacheSpec {
            tag_ttl: TTL.into(),
            offline: false,
        },
        "",
    )
    .await
}

fn manifest_requests(env: &Env, method: &str) -> usize {
    env.fake.count_containing(method, "/v2/app/manifests/")
}

#[tokio::test]
async fn a_tag_is_trusted_for_its_ttl_then_revalidated_with_head() {
    let env = env_short_ttl().await;
    let v1 = env.fake.push_image("app", Some("latest"), &[10]);
    let url = env.v2("app/manifests/latest");

    assert_eq!(env.client.get(&url).await.body, v1.manifest.bytes);
    let gets = manifest_requests(&env, "GET");
    assert!(gets >= 1);
    // Fresh: no upstream request at all.
    assert_eq!(env.client.get(&url).await.body, v1.manifest.bytes);
    assert_eq!(env.fake.total(), gets + manifest_requests(&env, "HEAD"));
    let heads0 = manifest_requests(&env, "HEAD");

    // Stale, digest unchanged: one HEAD, no GET.
    tokio::time::sleep(PAST_TTL).await;
    let r = env.client.get(&url).await;
    assert_eq!(r.body, v1.manifest.bytes);
    assert_eq!(
        manifest_requests(&env, "HEAD"),
        heads0 + 1,
        "revalidated with HEAD"
    );
    assert_eq!(
        manifest_requests(&env, "GET"),
        gets,
        "no GET when the digest did not change"
    );
    // Refreshed: trusted again.
    assert_eq!(env.client.get(&url).await.body, v1.manifest.bytes);
    assert_eq!(manifest_requests(&env, "HEAD"), heads0 + 1);

    // The tag moves upstream: after the TTL, HEAD sees a new digest and the new manifest is fetched.
    let v2 = env.fake.push_image("app", Some("latest"), &[10]);
    tokio::time::sleep(PAST_TTL).await;
    let r = env.client.get(&url).await;
    assert_eq!(r.body, v2.manifest.bytes);
    assert_eq!(
        r.header("docker-content-digest"),
        Some(v2.manifest.digest.clone())
    );
    assert_eq!(manifest_requests(&env, "HEAD"), heads0 + 2);
    assert_eq!(
        manifest_requests(&env, "GET"),
        gets + 1,
        "one GET for the changed digest"
    );
    assert!(
        env.metric(
            "cachalot_cache_lookups_total",
            &[("kind", "manifest"), ("result", "revalidated")]
        )
        .await
            >= 1.0
    );
}

#[tokio::test]
async fn head_of_a_tag_revalidates_without_get() {
    let env = env_short_ttl().await;
    let v1 = env.fake.push_image("app", Some("latest"), &[10]);
    let url = env.v2("app/manifests/latest");
    assert_eq!(env.client.get(&url).await.body, v1.manifest.bytes);
    let gets = manifest_requests(&env, "GET");
    tokio::time::sleep(PAST_TTL).await;
    let h = env.client.head(&url).await;
    assert_eq!(h.status, 200);
    assert_eq!(
        h.header("docker-content-digest"),
        Some(v1.manifest.digest.clone())
    );
    assert_eq!(manifest_requests(&env, "GET"), gets);
}

async fn stale_is_served_when(fail: impl AsyncFnOnce(&Env)) {
    let env = env_short_ttl().await;
    let v1 = env.fake.push_image("app", Some("latest"), &[10]);
    let url = env.v2("app/manifests/latest");
    assert_eq!(env.client.get(&url).await.body, v1.manifest.bytes);
    let stale0 = env
        .metric(
            "cachalot_cache_lookups_total",
            &[("kind", "manifest"), ("result", "stale")],
        )
        .await;

    // The tag even moved upstream; the proxy cannot know, and serves what it has.
    env.fake.push_image("app", Some("latest"), &[10]);
    fail(&env).await;
    tokio::time::sleep(PAST_TTL).await;
    let r = env.client.get(&url).await;
    assert_eq!(r.status, 200, "stale tag served: {}", r.text());
    assert_eq!(r.body, v1.manifest.bytes);
    assert_eq!(
        r.header("docker-content-digest"),
        Some(v1.manifest.digest.clone())
    );
    let h = env.client.head(&url).await;
    assert_eq!(h.status, 200);
    assert_eq!(
        h.header("docker-content-digest"),
        Some(v1.manifest.digest.clone())
    );
    let stale = env
        .metric(
            "cachalot_cache_lookups_total",
            &[("kind", "manifest"), ("result", "stale")],
        )
        .await;
    assert!(stale >= stale0 + 1.0, "stale counted: {stale0} -> {stale}");
}

#[tokio::test]
async fn stale_tag_served_on_429() {
    stale_is_served_when(async |env: &Env| {
        env.fake
            .set_status_fault(Some(StatusFault::too_many_requests(30)))
    })
    .await;
}

#[tokio::test]
async fn stale_tag_served_on_503() {
    stale_is_served_when(async |env: &Env| env.fake.set_status_fault(Some(StatusFault::all(503))))
        .await;
}

#[tokio::test]
async fn stale_tag_served_when_upstream_refuses_connections() {
    stale_is_served_when(async |env: &Env| env.fake.stop().await).await;
}

#[tokio::test]
async fn stale_tag_served_when_upstream_hangs() {
    // A HEAD that does not answer within the revalidation deadline (the upstream's `timeout` is
    // 10s in these tests; the deadline is meant to be a few seconds) gives the stale copy.
    stale_is_served_when(async |env: &Env| {
        env.fake.set_manifest_delay(Some(Duration::from_secs(40)))
    })
    .await;
}

#[tokio::test]
async fn tag_metadata_survives_a_restart() {
    let mut env = env_short_ttl().await;
    let v1 = env.fake.push_image("app", Some("v1"), &[10]);
    assert_eq!(
        env.client.get(&env.v2("app/manifests/v1")).await.body,
        v1.manifest.bytes
    );
    env.fake.stop().await;
    env.restart_proxy(None).await;
    tokio::time::sleep(PAST_TTL).await;
    let r = env.client.get(&env.v2("app/manifests/v1")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, v1.manifest.bytes);
    assert_eq!(
        r.header("docker-content-digest"),
        Some(v1.manifest.digest.clone())
    );
}

#[tokio::test]
async fn an_unknown_tag_is_404_manifest_unknown() {
    let env = env_short_ttl().await;
    env.fake.push_image("app", Some("v1"), &[10]);
    let r = env.client.get(&env.v2("app/manifests/nope")).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code().as_deref(), Some("MANIFEST_UNKNOWN"));
}
