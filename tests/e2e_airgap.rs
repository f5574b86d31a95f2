//! End to end for air-gapped sites, with Debian's `docker-registry` (token auth) as the real
//! upstream and `skopeo` as the real client: prefetch a multi-arch and a single-platform image,
//! export them, read the bundle with skopeo directly, stop the upstream, import the bundle into
//! an empty offline cache, and pull each image from it with digests identical to the upstream's.
//!
//! Needs `docker-registry` and `skopeo` in PATH: without them the test prints why and skips,
//! unless `CI` is set, in which case it fails.

mod e2e_support;

use e2e_support::{MULTI_REPO, MULTI_TAG, SINGLE_REPO, SINGLE_TAG, oci::ImageLayout, skopeo};
use std::path::Path;
use std::time::Duration;

const NAME: &str = "reg.test";

async fn cachalot(args: &[&str]) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_cachalot"))
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("cachalot finished within 2 minutes")
    .expect("run cachalot");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "cachalot {args:?} failed:\n{stdout}\n{stderr}"
    );
    stdout.into_owned()
}

fn config(dir: &Path, url: &str, offline: bool) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[cache]\ndir = {:?}\noffline = {offline}\n\n[[upstream]]\nname = \"{NAME}\"\nurl = {url:?}\n",
        dir.join("cache").to_str().unwrap()
    )
}

fn assert_same(got: &ImageLayout, want: &ImageLayout, what: &str) {
    assert_eq!(got.top_digest, want.top_digest, "{what}: top-level digest");
    assert_eq!(got.blobs, want.blobs, "{what}: blobs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_export_import_and_serve_offline_with_identical_digests() {
    require_e2e_tools!();
    let mut up = e2e_support::Upstream::start().await;
    let work = e2e_support::tools::tempdir("airgap");
    let w = work.path();

    // The connected side.
    std::fs::create_dir_all(w.join("online")).unwrap();
    let online = w.join("online/cachalot.toml");
    std::fs::write(&online, config(&w.join("online"), &up.url(), false)).unwrap();
    let online = online.to_str().unwrap();
    let multi = format!("{NAME}/{MULTI_REPO}:{MULTI_TAG}");
    let single = format!("{NAME}/{SINGLE_REPO}:{SINGLE_TAG}");
    let out = cachalot(&["prefetch", "--config", online, "--all-platforms", &multi]).await;
    assert!(out.contains("2 platforms"), "{out}");
    let out = cachalot(&[
        "prefetch",
        "--config",
        online,
        "--platform",
        "linux/amd64",
        &single,
    ])
    .await;
    assert!(out.contains("1 platform"), "{out}");
    let bundle = w.join("bundle.tar");
    // A plain export writes every platform the cache holds: both, so `skopeo copy --all`
    // below reads the multi-platform image whole.
    let out = cachalot(&[
        "export",
        "--config",
        online,
        "--output",
        bundle.to_str().unwrap(),
        &multi,
        &single,
    ])
    .await;
    // Everything was prefetched: the export fetches nothing.
    assert!(out.contains("0 blobs fetched"), "{out}");

    // skopeo reads the archive itself.
    for (reference, tag, want) in [
        (&multi, MULTI_TAG, &up.multi),
        (&single, SINGLE_TAG, &up.single),
    ] {
        let dest = w.join(format!("from-archive-{tag}"));
        skopeo::run_ok(&[
            "--insecure-policy",
            "copy",
            "--quiet",
            "--all",
            "--preserve-digests",
            &format!("oci-archive:{}:{reference}", bundle.display()),
            &format!("oci:{}:{tag}", dest.display()),
        ])
        .await;
        assert_same(
            &ImageLayout::read(&dest, tag),
            want,
            &format!("oci-archive {reference}"),
        );
    }

    // Across the gap: no upstream at all.
    up.registry.stop();
    std::fs::create_dir_all(w.join("site")).unwrap();
    let site_toml = config(&w.join("site"), "http://127.0.0.1:9", true);
    let site = w.join("site/cachalot.toml");
    std::fs::write(&site, &site_toml).unwrap();
    let out = cachalot(&[
        "import",
        "--config",
        site.to_str().unwrap(),
        bundle.to_str().unwrap(),
    ])
    .await;
    assert!(out.contains(&format!("tagged {multi}")), "{out}");
    let config = cachalot::config::Config::from_toml_str(&site_toml).unwrap();
    let server = cachalot::server::spawn(config).await.unwrap();
    let host = server.local_addr().to_string();
    for (repo, tag, want) in [
        (MULTI_REPO, MULTI_TAG, &up.multi),
        (SINGLE_REPO, SINGLE_TAG, &up.single),
    ] {
        let pulled = skopeo::pull(
            &format!("{host}/{NAME}/{repo}:{tag}"),
            &w.join(format!("from-site-{tag}")),
            tag,
            None,
        )
        .await;
        assert_same(&pulled, want, &format!("offline pull of {repo}:{tag}"));
    }
    server.shutdown().await;
}
