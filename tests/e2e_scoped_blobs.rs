//! End-to-end: repository-scoped blobs against a real registry. skopeo pulls a private image
//! through cachalot (which holds the upstream's credentials); then its blobs, named under a
//! public repository of the same registry, get the real registry's 404 and none of their bytes.
//!
//! Needs `docker-registry` and `skopeo` in PATH: without them the test prints why and skips,
//! unless `CI` is set, in which case it fails.

mod e2e_support;

use e2e_support::cachalot::{Cachalot, UPSTREAM_NAME, UpstreamEntry};
use e2e_support::skopeo;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pulled_private_image_is_not_readable_under_a_public_repository() {
    require_e2e_tools!();
    const ENV: &str = "CACHALOT_E2E_SCOPED_PASSWORD";
    // SAFETY: set once, before cachalot reads it; no other test in this binary touches it.
    unsafe { std::env::set_var(ENV, e2e_support::PASSWORD) };
    let up = e2e_support::shared_upstream();
    let out = e2e_support::tools::tempdir("scoped");
    let (repo, tag) = (e2e_support::PRIVATE_REPO, e2e_support::PRIVATE_TAG);
    let c = Cachalot::start(
        &[UpstreamEntry::new(UPSTREAM_NAME, &up.url(), true)
            .with_credentials(e2e_support::USER, ENV)],
        "",
    )
    .await;
    let via = skopeo::pull(
        &format!("{}/{repo}:{tag}", c.host()),
        &out.path().join("via"),
        tag,
        None,
    )
    .await;
    assert_eq!(via.top_digest, up.private.top_digest);

    let public = e2e_support::SINGLE_REPO;
    let mut checked = 0;
    for d in up
        .private
        .blobs
        .iter()
        .filter(|d| !up.single.blobs.contains(*d))
    {
        let url = format!("{}/v2/{public}/blobs/{d}", c.url());
        let r = e2e_support::http::get(&url).await;
        assert_eq!(
            r.status,
            404,
            "GET {public}@{d}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(
            r.json()["errors"][0]["code"],
            "BLOB_UNKNOWN",
            "GET {public}@{d}"
        );
        let r = e2e_support::http::head(&url).await;
        assert_eq!(r.status, 404, "HEAD {public}@{d}");
        // Under its own repository the cached blob is served.
        let r = e2e_support::http::head(&format!("{}/v2/{repo}/blobs/{d}", c.url())).await;
        assert_eq!(r.status, 200, "HEAD {repo}@{d}");
        checked += 1;
    }
    assert!(checked >= 3, "only {checked} private blobs checked");
    let metrics = c.metrics().await;
    let refused = e2e_support::http::metric_sum(
        &metrics,
        "cachalot_blob_link_checks_total",
        &[("result", "refused")],
    );
    assert!(
        refused >= 2.0 * checked as f64,
        "refusals counted: {refused}"
    );
    c.shutdown().await;
}
