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

    // The ns shim forwards faithfully (the registry ignores `ns`).
    let shim = e2e_support::shim::NsShim::start(up.registry.addr(), "reg.test").await;
    let pulled = skopeo::pull(
        &format!(
            "{}/{}:{}",
            shim.addr(),
            e2e_support::MULTI_REPO,
            e2e_support::MULTI_TAG
        ),
        &out.path().join("shim"),
        e2e_support::MULTI_TAG,
        None,
    )
    .await;
    assert_eq!(pulled.blobs, up.multi.blobs);
    assert!(
        shim.forwarded_with_ns() >= 7,
        "shim forwarded {}",
        shim.forwarded_with_ns()
    );

    // The issuer itself: wrong credentials are refused; a token names only what was granted.
    use base64::Engine as _;
    let realm = up.issuer.realm();
    let scope = format!("repository:{}:pull,push", e2e_support::PRIVATE_REPO);
    let url = format!("{realm}?service={}&scope={scope}", e2e_support::SERVICE);
    let bad = base64::engine::general_purpose::STANDARD.encode("e2e-user:wrong");
    let resp = e2e_support::http::request(
        hyper::Method::GET,
        &url,
        &[("authorization", &format!("Basic {bad}"))],
    )
    .await
    .unwrap();
    assert_eq!(resp.status, 401, "wrong password");
    let claims = |token: &str| -> serde_json::Value {
        let payload = token.split('.').nth(1).expect("JWT payload");
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap()
    };
    let anon = e2e_support::http::get(&url).await.json();
    assert_eq!(anon["token"], anon["access_token"]);
    assert!(anon["expires_in"].as_u64().unwrap() >= 60);
    assert!(anon["issued_at"].as_str().unwrap().ends_with('Z'));
    let c = claims(anon["token"].as_str().unwrap());
    assert_eq!(
        c["access"],
        serde_json::json!([]),
        "anonymous access to a private repo"
    );
    assert_eq!(c["aud"], e2e_support::SERVICE);
    let good = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        e2e_support::USER,
        e2e_support::PASSWORD
    ));
    let user = e2e_support::http::request(
        hyper::Method::GET,
        &url,
        &[("authorization", &format!("Basic {good}"))],
    )
    .await
    .unwrap()
    .json();
    let c = claims(user["token"].as_str().unwrap());
    assert_eq!(
        c["access"][0]["actions"],
        serde_json::json!(["pull", "push"])
    );

    let reqs = up.issuer.requests();
    assert!(reqs.iter().any(|r| r.user.is_none() && r.status == 200));
    assert!(
        reqs.iter()
            .any(|r| r.user.as_deref() == Some(e2e_support::USER))
    );
    let _ = ImageLayout::read(&out.path().join("multi"), e2e_support::MULTI_TAG);
}

// ---- through cachalot -------------------------------------------------------------------------

use e2e_support::cachalot::{Cachalot, DECOY_NAME, UPSTREAM_NAME, UpstreamEntry, refused_url};
use e2e_support::http::metric_sum;
use e2e_support::shim::NsShim;
use e2e_support::{MULTI_REPO, MULTI_TAG, SINGLE_REPO, SINGLE_TAG, Upstream};

/// A copy straight from the upstream registry (anonymous unless `creds`).
async fn direct_copy(
    up: &Upstream,
    repo: &str,
    tag: &str,
    out: &std::path::Path,
    creds: Option<&str>,
) -> ImageLayout {
    let reference = format!("{}/{repo}:{tag}", up.registry.host());
    skopeo::pull(&reference, out, tag, creds).await
}

/// The pull through cachalot has the index/manifest digest and exactly the blobs of the direct copy
/// and of the layout that was pushed.
fn assert_same_image(via: &ImageLayout, direct: &ImageLayout, built: &ImageLayout, what: &str) {
    assert_eq!(
        via.top_digest, direct.top_digest,
        "{what}: top-level digest vs direct copy"
    );
    assert_eq!(
        via.top_digest, built.top_digest,
        "{what}: top-level digest vs pushed"
    );
    assert_eq!(via.top_bytes, built.top_bytes, "{what}: top-level bytes");
    assert_eq!(
        via.blobs, direct.blobs,
        "{what}: blob digests vs direct copy"
    );
    assert_eq!(via.blobs, built.blobs, "{what}: blob digests vs pushed");
}

/// Config and layer blobs of a layout (the blobs a client GETs from `/blobs/`).
fn content_blobs(layout: &ImageLayout) -> Vec<String> {
    layout
        .images
        .iter()
        .flat_map(|i| std::iter::once(i.config_digest.clone()).chain(i.layer_digests.clone()))
        .collect()
}

fn content_bytes(layout: &ImageLayout) -> f64 {
    content_blobs(layout)
        .iter()
        .map(|d| layout.blob(d).len() as f64)
        .sum()
}

/// What cachalot's /metrics says it did for upstream `name`.
struct Seen {
    upstream_blob: f64,
    upstream_manifest: f64,
    served_blob_requests: f64,
    served_manifest_requests: f64,
    served_bytes: f64,
    blob_hits: f64,
}

async fn seen(c: &Cachalot, name: &str) -> Seen {
    let m = c.metrics().await;
    let up = |op| {
        metric_sum(
            &m,
            "cachalot_upstream_requests_total",
            &[("upstream", name), ("op", op)],
        )
    };
    Seen {
        upstream_blob: up("blob"),
        upstream_manifest: up("manifest"),
        served_blob_requests: metric_sum(&m, "cachalot_requests_total", &[("route", "blob")]),
        served_manifest_requests: metric_sum(
            &m,
            "cachalot_requests_total",
            &[("route", "manifest")],
        ),
        served_bytes: metric_sum(&m, "cachalot_served_bytes_total", &[]),
        blob_hits: metric_sum(
            &m,
            "cachalot_cache_lookups_total",
            &[("kind", "blob"), ("result", "hit")],
        ),
    }
}

/// cachalot's metrics show it served `layout` cold from upstream `name`.
async fn assert_served_cold(c: &Cachalot, name: &str, layout: &ImageLayout, what: &str) -> Seen {
    let s = seen(c, name).await;
    let blobs = content_blobs(layout).len() as f64;
    assert!(
        s.upstream_blob >= blobs,
        "{what}: cachalot made {} upstream blob requests to {name}, want >= {blobs}",
        s.upstream_blob
    );
    assert!(
        s.upstream_manifest >= 1.0,
        "{what}: no upstream manifest request to {name}"
    );
    assert!(
        s.served_blob_requests >= blobs,
        "{what}: cachalot counted {} blob requests, want >= {blobs}",
        s.served_blob_requests
    );
    // The index (if any) and every platform manifest.
    let manifests = match layout.images.len() {
        1 => 1.0,
        n => n as f64 + 1.0,
    };
    assert!(
        s.served_manifest_requests >= manifests,
        "{what}: cachalot counted {} manifest requests, want >= {manifests}",
        s.served_manifest_requests
    );
    assert!(
        s.served_bytes >= content_bytes(layout),
        "{what}: cachalot served {} bytes, the image has {}",
        s.served_bytes,
        content_bytes(layout)
    );
    s
}

/// No manifest or blob request went to the decoy upstream.
async fn assert_decoy_untouched(c: &Cachalot, what: &str) {
    let s = seen(c, DECOY_NAME).await;
    assert_eq!(
        s.upstream_blob + s.upstream_manifest,
        0.0,
        "{what}: requests went to the decoy default upstream"
    );
}

/// Routing mode 3 (default upstream, Docker `registry-mirrors` style): `C/e2e/multi:v1`.
/// Also: the warm second pull makes no upstream blob request and is counted as cache hits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_upstream_mode_skopeo_pull_matches_direct_copy() {
    require_e2e_tools!();
    let up = e2e_support::shared_upstream();
    let out = e2e_support::tools::tempdir("default-mode");
    let c = Cachalot::in_front_of(&up.url()).await;

    let direct = direct_copy(up, MULTI_REPO, MULTI_TAG, &out.path().join("direct"), None).await;
    let via = skopeo::pull(
        &format!("{}/{MULTI_REPO}:{MULTI_TAG}", c.host()),
        &out.path().join("via"),
        MULTI_TAG,
        None,
    )
    .await;
    assert_same_image(&via, &direct, &up.multi, "default mode, cold");
    let cold = assert_served_cold(&c, UPSTREAM_NAME, &up.multi, "default mode, cold").await;

    let warm = skopeo::pull(
        &format!("{}/{MULTI_REPO}:{MULTI_TAG}", c.host()),
        &out.path().join("warm"),
        MULTI_TAG,
        None,
    )
    .await;
    assert_same_image(&warm, &direct, &up.multi, "default mode, warm");
    let after = seen(&c, UPSTREAM_NAME).await;
    assert_eq!(
        after.upstream_blob, cold.upstream_blob,
        "the warm pull fetched blobs from upstream again"
    );
    let blobs = content_blobs(&up.multi).len() as f64;
    assert!(
        after.blob_hits - cold.blob_hits >= blobs,
        "warm pull: {} blob cache hits, want >= {blobs}",
        after.blob_hits - cold.blob_hits
    );

    // A single-platform image, too.
    let direct = direct_copy(
        up,
        SINGLE_REPO,
        SINGLE_TAG,
        &out.path().join("s-direct"),
        None,
    )
    .await;
    let via = skopeo::pull(
        &format!("{}/{SINGLE_REPO}:{SINGLE_TAG}", c.host()),
        &out.path().join("s-via"),
        SINGLE_TAG,
        None,
    )
    .await;
    assert_same_image(&via, &direct, &up.single, "default mode, single platform");
    c.shutdown().await;
}

/// cachalot with a refused default upstream and the registry as a named, non-default upstream:
/// only a request routed to `reg.test` can succeed.
async fn cachalot_with_decoy_default(up: &Upstream) -> Cachalot {
    Cachalot::start(
        &[
            UpstreamEntry::new(DECOY_NAME, &refused_url(), true),
            UpstreamEntry::new(UPSTREAM_NAME, &up.url(), false),
        ],
        "",
    )
    .await
}

/// Routing mode 2 (repository prefix): `C/reg.test/e2e/multi:v1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_mode_skopeo_pull_matches_direct_copy() {
    require_e2e_tools!();
    let up = e2e_support::shared_upstream();
    let out = e2e_support::tools::tempdir("prefix-mode");
    let c = cachalot_with_decoy_default(up).await;

    let direct = direct_copy(up, MULTI_REPO, MULTI_TAG, &out.path().join("direct"), None).await;
    let via = skopeo::pull(
        &format!("{}/{UPSTREAM_NAME}/{MULTI_REPO}:{MULTI_TAG}", c.host()),
        &out.path().join("via"),
        MULTI_TAG,
        None,
    )
    .await;
    assert_same_image(&via, &direct, &up.multi, "prefix mode");
    assert_served_cold(&c, UPSTREAM_NAME, &up.multi, "prefix mode").await;
    assert_decoy_untouched(&c, "prefix mode").await;
    c.shutdown().await;
}

/// Routing mode 1 (`?ns=`, containerd style): skopeo pulls `SHIM/e2e/multi:v1` through a shim that
/// appends `ns=reg.test` to every request, as containerd does for a mirror.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ns_mode_pull_through_containerd_style_shim_matches_direct_copy() {
    require_e2e_tools!();
    let up = e2e_support::shared_upstream();
    let out = e2e_support::tools::tempdir("ns-mode");
    let c = cachalot_with_decoy_default(up).await;
    let shim = NsShim::start(c.addr(), UPSTREAM_NAME).await;

    let direct = direct_copy(up, MULTI_REPO, MULTI_TAG, &out.path().join("direct"), None).await;
    let via = skopeo::pull(
        &format!("{}/{MULTI_REPO}:{MULTI_TAG}", shim.addr()),
        &out.path().join("via"),
        MULTI_TAG,
        None,
    )
    .await;
    assert_same_image(&via, &direct, &up.multi, "ns mode");
    assert!(
        shim.forwarded_with_ns() >= content_blobs(&up.multi).len(),
        "the shim forwarded only {} requests with ns",
        shim.forwarded_with_ns()
    );
    assert_served_cold(&c, UPSTREAM_NAME, &up.multi, "ns mode").await;
    assert_decoy_untouched(&c, "ns mode").await;
    c.shutdown().await;
}

/// A private repository: cachalot holds the credentials (`username` + `password_env`) and the
/// client pulls anonymously; without credentials cachalot passes the upstream's refusal on as an
/// OCI 401/403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_repo_with_upstream_credentials_from_password_env() {
    require_e2e_tools!();
    const ENV: &str = "CACHALOT_E2E_UPSTREAM_PASSWORD";
    // SAFETY: set once, before cachalot reads it; no other test in this binary touches this
    // variable, and Rust's own env and process-spawn accesses are serialized by std's env lock.
    unsafe { std::env::set_var(ENV, e2e_support::PASSWORD) };
    let up = e2e_support::shared_upstream();
    let out = e2e_support::tools::tempdir("private");
    let creds = format!("{}:{}", e2e_support::USER, e2e_support::PASSWORD);
    let repo = e2e_support::PRIVATE_REPO;
    let tag = e2e_support::PRIVATE_TAG;

    let before = up.issuer.requests().len();
    let c = Cachalot::start(
        &[UpstreamEntry::new(UPSTREAM_NAME, &up.url(), true)
            .with_credentials(e2e_support::USER, ENV)],
        "",
    )
    .await;
    let direct = direct_copy(up, repo, tag, &out.path().join("direct"), Some(&creds)).await;
    let via = skopeo::pull(
        &format!("{}/{repo}:{tag}", c.host()),
        &out.path().join("via"),
        tag,
        None,
    )
    .await;
    assert_same_image(&via, &direct, &up.private, "private repo");
    assert_served_cold(&c, UPSTREAM_NAME, &up.private, "private repo").await;
    let authed = up.issuer.requests()[before..]
        .iter()
        .filter(|r| {
            r.user.as_deref() == Some(e2e_support::USER)
                && r.scopes.iter().any(|s| s.contains(repo))
        })
        .count();
    assert!(
        authed >= 1,
        "cachalot never asked the issuer for a token as the configured user"
    );
    c.shutdown().await;

    // Without credentials: the upstream refuses, and so does cachalot, with an OCI error.
    let anon = Cachalot::in_front_of(&up.url()).await;
    let resp = e2e_support::http::request(
        hyper::Method::GET,
        &format!("{}/v2/{repo}/manifests/{tag}", anon.url()),
        &[("accept", e2e_support::oci::INDEX_V1)],
    )
    .await
    .unwrap();
    assert!(
        resp.status == 401 || resp.status == 403,
        "private manifest without upstream credentials: {} {}",
        resp.status,
        String::from_utf8_lossy(&resp.body)
    );
    let code = resp.json()["errors"][0]["code"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(
        code == "UNAUTHORIZED" || code == "DENIED",
        "private manifest without credentials: code {code:?}"
    );
    let failed = skopeo::try_pull(
        &format!("{}/{repo}:{tag}", anon.host()),
        &out.path().join("anon"),
        tag,
        None,
    )
    .await;
    assert!(
        !failed.success,
        "pulled a private image through cachalot without credentials"
    );
    anon.shutdown().await;
}

/// Once pulled, an image keeps being served with the upstream registry gone (its port refuses
/// connections): tags are fresh for `tag_ttl` and content by digest never needs upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_image_is_served_after_the_upstream_registry_stops() {
    require_e2e_tools!();
    // Its own upstream: this test stops it.
    let mut up = Upstream::start().await;
    let out = e2e_support::tools::tempdir("upstream-down");
    let c = Cachalot::start(
        &[UpstreamEntry::new(UPSTREAM_NAME, &up.url(), true)],
        "tag_ttl = \"1h\"",
    )
    .await;
    let reference = format!("{}/{MULTI_REPO}:{MULTI_TAG}", c.host());
    let first = skopeo::pull(&reference, &out.path().join("first"), MULTI_TAG, None).await;
    assert_same_image(&first, &first, &up.multi, "before the upstream stops");

    up.registry.stop();
    let gone =
        e2e_support::http::request(hyper::Method::GET, &format!("{}/v2/", up.url()), &[]).await;
    assert!(gone.is_err(), "the upstream registry still answers");

    let second = skopeo::pull(&reference, &out.path().join("second"), MULTI_TAG, None).await;
    assert_same_image(&second, &first, &up.multi, "with the upstream gone");
    c.shutdown().await;
}
