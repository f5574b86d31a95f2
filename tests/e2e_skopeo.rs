//! End-to-end: skopeo pulls through cachalot from a real registry (Debian's `docker-registry`, with
//! token auth from an in-process issuer), in each routing mode; the digests must equal a copy
//! straight from the upstream, and cachalot's own metrics must show that it served the pull.
//!
//! Needs `docker-registry` and `skopeo` in PATH: without them the tests print why and skip, unless
//! `CI` is set, in which case they fail.

mod e2e_support;

use e2e_support::{oci::ImageLayout, skopeo};

/// The support code on its own, without cachalot: the issuer's tokens satisfy docker-registry's
/// token auth (push with credentials, anonymous pull of a public repo, private repo refused to
/// anonymous clients), and a round trip keeps every digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn support_selftest_registry_round_trip_without_cachalot() {
    require_e2e_tools!();
    let up = e2e_support::shared_upstream();
    let out = e2e_support::tools::tempdir("selftest");

    // Anonymous pull of the public multi-arch image.
    let pulled = skopeo::pull(
        &format!(
            "{}/{}:{}",
            up.registry.host(),
            e2e_support::MULTI_REPO,
            e2e_support::MULTI_TAG
        ),
        &out.path().join("multi"),
        e2e_support::MULTI_TAG,
        None,
    )
    .await;
    assert_eq!(pulled.top_digest, up.multi.top_digest);
    assert_eq!(pulled.blobs, up.multi.blobs);
    assert_eq!(up.multi.images.len(), 2);
    assert_eq!(up.multi.blobs.len(), 1 + 2 * (1 + 1 + 2));

    // Single-platform image.
    let pulled = skopeo::pull(
        &format!(
            "{}/{}:{}",
            up.registry.host(),
            e2e_support::SINGLE_REPO,
            e2e_support::SINGLE_TAG
        ),
        &out.path().join("single"),
        e2e_support::SINGLE_TAG,
        None,
    )
    .await;
    assert_eq!(pulled.top_digest, up.single.top_digest);
    assert_eq!(pulled.blobs, up.single.blobs);

    // Private image: refused anonymously, fine with credentials.
    let private_ref = format!(
        "{}/{}:{}",
        up.registry.host(),
        e2e_support::PRIVATE_REPO,
        e2e_support::PRIVATE_TAG
    );
    let anon = skopeo::try_pull(
        &private_ref,
        &out.path().join("private-anon"),
        e2e_support::PRIVATE_TAG,
        None,
    )
    .await;
    assert!(!anon.success, "anonymous pull of a private repo succeeded");
    let creds = format!("{}:{}", e2e_support::USER, e2e_support::PASSWORD);
    let pulled = skopeo::pull(
        &private_ref,
        &out.path().join("private"),
        e2e_support::PRIVATE_TAG,
        Some(&creds),
    )
    .await;
    assert_eq!(pulled.top_digest, up.private.top_digest);
    assert_eq!(pulled.blobs, up.private.blobs);

    // The raw bytes served are the bytes built.
    let raw = skopeo::inspect_raw(
        &format!(
            "{}/{}:{}",
            up.registry.host(),
            e2e_support::MULTI_REPO,
            e2e_support::MULTI_TAG
        ),
        None,
    )
    .await;
    assert_eq!(e2e_support::oci::sha256_digest(&raw), up.multi.top_digest);

    let reqs = up.issuer.requests();
    assert!(reqs.iter().any(|r| r.user.is_none() && r.status == 200));
    assert!(
        reqs.iter()
            .any(|r| r.user.as_deref() == Some(e2e_support::USER))
    );
    let _ = ImageLayout::read(&out.path().join("multi"), e2e_support::MULTI_TAG);
}
