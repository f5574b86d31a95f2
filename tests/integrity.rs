//! Integrity at rest (issue 20): the cache damaged the way disks, operators and backups damage
//! it (a file cut short, a flipped byte, the metadata lost or rolled back) with the server
//! running and across a restart. No client may get a complete 200 of the wrong bytes, a damaged
//! object is quarantined and fetched again, and the accounting covers every file on disk.

mod common;

use bytes::Bytes;
use common::*;
use std::path::{Path, PathBuf};

const REPO: &str = "team/app";

fn stored(root: &Path, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    root.join("blobs/sha256").join(&hex[..2]).join(hex)
}

fn quarantined(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root.join("quarantine"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn cut(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

fn flip(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
}

fn blob_url(env: &Env, digest: &str) -> String {
    env.v2(&format!("{REPO}/blobs/{digest}"))
}

/// GETs a blob: a 200 with exactly the right bytes.
async fn pull_ok(env: &Env, digest: &str, want: &Bytes) {
    let r = env.client.get(&blob_url(env, digest)).await;
    assert_eq!(r.status, 200, "GET {digest}: {}", r.text());
    assert_eq!(r.body.len(), want.len(), "length of {digest}");
    assert!(r.body == *want, "bytes of {digest}");
}

#[tokio::test]
async fn a_blob_cut_short_is_quarantined_and_fetched_again() {
    let mut env = Env::start().await;
    let blob = random_blob(1 << 20);
    let d = env.fake.push_blob(REPO, blob.clone());
    pull_ok(&env, &d, &blob).await;
    env.wait_no_fills().await;
    let root = env.dir.path().to_path_buf();
    cut(&stored(&root, &d), 50);

    // A HEAD never answers with the file's own length.
    let r = env.client.head(&blob_url(&env, &d)).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-length").as_deref(),
        Some("1048576"),
        "HEAD of a cut blob"
    );
    pull_ok(&env, &d, &blob).await;
    env.wait_no_fills().await;
    assert_eq!(env.fake.blob_gets(REPO, &d), 2, "fetched again once");
    assert_eq!(quarantined(&root).len(), 1, "{:?}", quarantined(&root));
    assert_eq!(
        env.metric("cachalot_quarantined_total", &[("reason", "size")])
            .await,
        1.0
    );
    assert_eq!(std::fs::metadata(stored(&root, &d)).unwrap().len(), 1 << 20);

    // Cut again, then a restart: the record still knows the length.
    cut(&stored(&root, &d), 50);
    env.restart_proxy(None).await;
    pull_ok(&env, &d, &blob).await;
    assert_eq!(env.fake.blob_gets(REPO, &d), 3);
    env.wait_no_fills().await;
    assert_eq!(
        env.metric("cachalot_cache_size_bytes", &[]).await,
        1048576.0
    );
}

/// Offline, a damaged blob is what it is: not cached. Never a 200.
#[tokio::test]
async fn offline_a_cut_blob_is_not_cached() {
    let mut env = Env::start().await;
    let blob = random_blob(200_000);
    let d = env.fake.push_blob(REPO, blob.clone());
    pull_ok(&env, &d, &blob).await;
    env.wait_no_fills().await;
    cut(&stored(env.dir.path(), &d), 1000);
    env.restart_proxy(Some(CacheSpec {
        offline: true,
        ..CacheSpec::default()
    }))
    .await;
    let r = env.client.head(&blob_url(&env, &d)).await;
    assert_ne!(r.status, 200, "HEAD of a cut blob offline");
    let r = env.client.get(&blob_url(&env, &d)).await;
    assert_ne!(r.status, 200, "GET of a cut blob offline");
    assert_eq!(
        r.error_code().as_deref(),
        Some("BLOB_UNKNOWN"),
        "{}",
        r.text()
    );
    assert_eq!(quarantined(env.dir.path()).len(), 1);
}

/// A manifest read from disk is hashed as it is loaded: a flipped byte is a miss, fetched again.
#[tokio::test]
async fn a_flipped_manifest_is_fetched_again_after_a_restart() {
    let mut env = Env::start().await;
    let img = env.fake.push_image(REPO, Some("v1"), &[1000]);
    let m = &img.manifest;
    let path = format!("{REPO}/manifests/{}", m.digest);
    let r = env.client.get(&env.v2(&path)).await;
    assert_eq!(r.status, 200);
    flip(&stored(env.dir.path(), &m.digest), 10);
    // The memory tier holds the good copy until the restart.
    env.restart_proxy(None).await;
    let r = env.client.get(&env.v2(&path)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.body == m.bytes, "the manifest's own bytes");
    assert_eq!(env.fake.manifest_gets(REPO, &m.digest), 2);
    assert_eq!(
        env.metric("cachalot_quarantined_total", &[("reason", "digest")])
            .await,
        1.0
    );
    assert_eq!(
        std::fs::read(stored(env.dir.path(), &m.digest)).unwrap(),
        m.bytes
    );
}
