//! End-to-end: skopeo, with and without credentials, against cachalot with `[auth]` in front of
//! the real token-auth `docker-registry` holding a private repository. cachalot holds the
//! upstream's credentials; its own users and rules decide who may use them.
//!
//! Needs `docker-registry` and `skopeo` in PATH: without them the test prints why and skips,
//! unless `CI` is set, in which case it fails.

mod e2e_support;

use e2e_support::cachalot::{Cachalot, UPSTREAM_NAME, UpstreamEntry};
use e2e_support::skopeo;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_with_and_without_credentials_through_auth_and_rules() {
    require_e2e_tools!();
    const ENV: &str = "CACHALOT_E2E_AUTH_UPSTREAM_PASSWORD";
    // SAFETY: set once, before cachalot reads it; no other test in this binary touches it.
    unsafe { std::env::set_var(ENV, e2e_support::PASSWORD) };
    let up = e2e_support::shared_upstream();
    let out = e2e_support::tools::tempdir("auth");
    let htpasswd = out.path().join("htpasswd");
    let line = |u: &str, p: &str| format!("{u}:{}\n", bcrypt::hash(p, 4).unwrap());
    std::fs::write(
        &htpasswd,
        line("alice", "alice-pw") + &line("bob", "bob-pw"),
    )
    .unwrap();
    // Cachalot::start puts these lines in [cache]; TOML lets the tables that follow open here.
    let auth = format!(
        "\n[auth]\nhtpasswd = {:?}\n\n\
         [[access]]\nusers = [\"bob\"]\nrepositories = [\"{UPSTREAM_NAME}/private/**\"]\nallow = false\n\n\
         [[access]]\nusers = [\"*\"]\nrepositories = [\"{UPSTREAM_NAME}/**\"]\nallow = true\n",
        htpasswd.to_str().unwrap()
    );
    let c = Cachalot::start(
        &[UpstreamEntry::new(UPSTREAM_NAME, &up.url(), true)
            .with_credentials(e2e_support::USER, ENV)],
        &auth,
    )
    .await;
    let private = format!(
        "{}/{}:{}",
        c.host(),
        e2e_support::PRIVATE_REPO,
        e2e_support::PRIVATE_TAG
    );
    let public = format!(
        "{}/{}:{}",
        c.host(),
        e2e_support::SINGLE_REPO,
        e2e_support::SINGLE_TAG
    );

    // Without credentials: nothing, public or private.
    for (reference, tag) in [
        (&public, e2e_support::SINGLE_TAG),
        (&private, e2e_support::PRIVATE_TAG),
    ] {
        let r = skopeo::try_pull(reference, &out.path().join("anon"), tag, None).await;
        assert!(!r.success, "{reference} pulled without credentials");
        assert!(
            r.stderr.contains("401")
                || r.stderr.to_lowercase().contains("unauthorized")
                || r.stderr.contains("authentication required"),
            "{reference}: {}",
            r.stderr
        );
    }
    // Wrong password: refused.
    let r = skopeo::try_pull(
        &public,
        &out.path().join("wrong"),
        e2e_support::SINGLE_TAG,
        Some("alice:nope"),
    )
    .await;
    assert!(!r.success, "pulled with a wrong password");

    // bob: the public repository, not the private one.
    let via = skopeo::pull(
        &public,
        &out.path().join("bob-public"),
        e2e_support::SINGLE_TAG,
        Some("bob:bob-pw"),
    )
    .await;
    assert_eq!(via.top_digest, up.single.top_digest);
    let r = skopeo::try_pull(
        &private,
        &out.path().join("bob-private"),
        e2e_support::PRIVATE_TAG,
        Some("bob:bob-pw"),
    )
    .await;
    assert!(!r.success, "bob pulled the private repository");
    let err = r.stderr.to_lowercase();
    assert!(
        err.contains("denied") || err.contains("403"),
        "{}",
        r.stderr
    );

    // alice: the private repository, through cachalot's upstream credentials.
    let via = skopeo::pull(
        &private,
        &out.path().join("alice-private"),
        e2e_support::PRIVATE_TAG,
        Some("alice:alice-pw"),
    )
    .await;
    assert_eq!(via.top_digest, up.private.top_digest);
    assert_eq!(via.blobs, up.private.blobs);
    c.shutdown().await;
}
