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

/// A GET that must not deliver a complete 200 of anything but `want`: either not a 200, or a
/// body cut short. Returns whether it was served whole (and right).
async fn pull_never_wrong(env: &Env, digest: &str, want: &Bytes) -> bool {
    let (status, _, d) = env.client.get_drained(&blob_url(env, digest)).await;
    if status != 200 {
        return false;
    }
    if d.error.is_none() && d.bytes.len() == want.len() {
        assert!(d.bytes == *want, "a complete 200 of the wrong bytes");
        return true;
    }
    assert!(
        d.error.is_some(),
        "a 200 that ended normally after {} of {} bytes",
        d.bytes.len(),
        want.len()
    );
    assert!(d.bytes.len() < want.len(), "the last byte was held back");
    false
}

/// The metadata lost: every file is counted again at start, adopted unverified; a good one is
/// served whole (hashed as it goes) and becomes verified, a flipped one is never served whole,
/// is quarantined and fetched again.
#[tokio::test]
async fn lost_metadata_adopts_the_files_and_never_serves_a_flipped_one() {
    let mut env = Env::start().await;
    let (good, bad) = (random_blob(1 << 20), random_blob(300_000));
    let dg = env.fake.push_blob(REPO, good.clone());
    let db = env.fake.push_blob(REPO, bad.clone());
    pull_ok(&env, &dg, &good).await;
    pull_ok(&env, &db, &bad).await;
    env.wait_no_fills().await;
    env.proxy.shutdown().await;
    let root = env.dir.path().to_path_buf();
    std::fs::remove_file(root.join("meta.redb")).unwrap();
    flip(&stored(&root, &db), 123_456);
    env.restart_proxy(None).await;
    assert_eq!(env.metric("cachalot_cache_objects", &[]).await, 2.0);
    assert_eq!(
        env.metric("cachalot_cache_size_bytes", &[]).await,
        (good.len() + bad.len()) as f64
    );
    assert_eq!(env.metric("cachalot_cache_adopted_total", &[]).await, 2.0);

    assert!(
        pull_never_wrong(&env, &dg, &good).await,
        "a good adopted file is served"
    );
    assert_eq!(env.fake.blob_gets(REPO, &dg), 1, "served from the cache");
    assert!(!pull_never_wrong(&env, &db, &bad).await);
    assert_eq!(
        env.metric("cachalot_quarantined_total", &[("reason", "digest")])
            .await,
        1.0
    );
    // Fetched again, and verified from then on.
    pull_ok(&env, &db, &bad).await;
    assert_eq!(env.fake.blob_gets(REPO, &db), 2);
    env.wait_no_fills().await;
    env.restart_proxy(None).await;
    pull_ok(&env, &dg, &good).await;
    pull_ok(&env, &db, &bad).await;
    assert_eq!(env.fake.blob_gets(REPO, &dg), 1);
    assert_eq!(env.fake.blob_gets(REPO, &db), 2);
}

/// A range of an unverified file is hashed whole before its first byte: a flipped file answers
/// no range at all.
#[tokio::test]
async fn a_range_of_an_unverified_flipped_file_is_never_served() {
    let mut env = Env::start().await;
    let blob = random_blob(100_000);
    let d = env.fake.push_blob(REPO, blob.clone());
    pull_ok(&env, &d, &blob).await;
    env.wait_no_fills().await;
    env.proxy.shutdown().await;
    std::fs::remove_file(env.dir.path().join("meta.redb")).unwrap();
    flip(&stored(env.dir.path(), &d), 99_000);
    env.restart_proxy(None).await;
    let resp = env
        .client
        .send_raw(
            http::Method::GET,
            &blob_url(&env, &d),
            &[("range", "bytes=98000-99999")],
        )
        .await;
    let status = resp.status();
    let got = common::client::drain(resp.into_body()).await;
    assert!(
        !(status.is_success() && got.error.is_none()),
        "{status}: a range of a damaged file served whole"
    );
    pull_ok(&env, &d, &blob).await;
    assert_eq!(env.fake.blob_gets(REPO, &d), 2);
}

/// The metadata restored from an older backup: a blob committed since is adopted, a record of
/// one evicted since is dropped; the accounting is that of the files.
#[tokio::test]
async fn rolled_back_metadata_is_reconciled_with_the_files() {
    let mut env = Env::start().await;
    let (a, b) = (random_blob(10_000), random_blob(20_000));
    let da = env.fake.push_blob(REPO, a.clone());
    let db = env.fake.push_blob(REPO, b.clone());
    pull_ok(&env, &da, &a).await;
    env.wait_no_fills().await;
    env.proxy.shutdown().await;
    let root = env.dir.path().to_path_buf();
    std::fs::copy(root.join("meta.redb"), root.join("backup")).unwrap();
    env.restart_proxy(None).await;
    pull_ok(&env, &db, &b).await;
    env.wait_no_fills().await;
    env.proxy.shutdown().await;
    std::fs::remove_file(stored(&root, &da)).unwrap();
    std::fs::copy(root.join("backup"), root.join("meta.redb")).unwrap();
    env.restart_proxy(None).await;
    assert_eq!(env.metric("cachalot_cache_objects", &[]).await, 1.0);
    assert_eq!(env.metric("cachalot_cache_size_bytes", &[]).await, 20_000.0);
    pull_ok(&env, &db, &b).await;
    pull_ok(&env, &da, &a).await;
    assert_eq!(env.fake.blob_gets(REPO, &db), 1);
    assert_eq!(env.fake.blob_gets(REPO, &da), 2);
}

// === verify and scrub ===

const BIN: &str = env!("CARGO_BIN_EXE_cachalot");

/// Runs `cachalot verify` on `env`'s cache: (exit code, stdout).
fn verify(env: &Env) -> (i32, String) {
    let config = env.dir.path().join("verify.toml");
    std::fs::write(
        &config,
        config_toml(env.dir.path(), &env.cache, &env.upstreams),
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["verify", "--config"])
        .arg(&config)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run cachalot verify");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), format!("{stdout}{stderr}"))
}

/// Caches two blobs and damages them: one flipped (same size), one cut.
async fn two_damaged(env: &Env) -> [(String, Bytes); 2] {
    let (a, b) = (random_blob(400_000), random_blob(300_000));
    let da = env.fake.push_blob(REPO, a.clone());
    let db = env.fake.push_blob(REPO, b.clone());
    pull_ok(env, &da, &a).await;
    pull_ok(env, &db, &b).await;
    env.wait_no_fills().await;
    [(da, a), (db, b)]
}

fn damage(env: &Env, blobs: &[(String, Bytes); 2]) {
    flip(&stored(env.dir.path(), &blobs[0].0), 399_999);
    cut(&stored(env.dir.path(), &blobs[1].0), 1000);
}

#[tokio::test]
async fn verify_with_the_server_stopped_finds_flips_and_cuts() {
    let mut env = Env::start().await;
    let blobs = two_damaged(&env).await;
    env.proxy.shutdown().await;
    damage(&env, &blobs);
    let (code, out) = verify(&env);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("damaged {}: content hashes to", blobs[0].0)),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "damaged {}: size 1000 bytes, recorded 300000",
            blobs[1].0
        )),
        "{out}"
    );
    assert!(out.contains("verified 2 objects"), "{out}");
    assert_eq!(quarantined(env.dir.path()).len(), 2);
    let (code, out) = verify(&env);
    assert_eq!(code, 0, "nothing left damaged: {out}");
    assert!(
        out.contains("verified 0 objects, 0 bytes: none damaged"),
        "{out}"
    );
    env.restart_proxy(None).await;
    for (d, bytes) in &blobs {
        pull_ok(&env, d, bytes).await;
        assert_eq!(env.fake.blob_gets(REPO, d), 2);
    }
}

#[tokio::test]
async fn verify_beside_a_running_server_has_it_run_the_pass() {
    let env = Env::start().await;
    let blobs = two_damaged(&env).await;
    damage(&env, &blobs);
    let (code, out) = tokio::task::spawn_blocking({
        let config = env.dir.path().join("verify.toml");
        std::fs::write(
            &config,
            config_toml(env.dir.path(), &env.cache, &env.upstreams),
        )
        .unwrap();
        move || {
            let out = std::process::Command::new(BIN)
                .args(["verify", "--config"])
                .arg(&config)
                .output()
                .unwrap();
            (
                out.status.code().unwrap_or(-1),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            )
        }
    })
    .await
    .unwrap();
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("in use by a running cachalot"), "{out}");
    assert!(
        out.contains(&blobs[0].0) && out.contains(&blobs[1].0),
        "{out}"
    );
    assert_eq!(env.metric("cachalot_scrub_corrupt_total", &[]).await, 2.0);
    // The flipped one is never served again: fetched anew.
    for (d, bytes) in &blobs {
        pull_ok(&env, d, bytes).await;
        assert_eq!(env.fake.blob_gets(REPO, d), 2);
    }
}

#[tokio::test]
async fn a_scrub_pass_quarantines_a_flipped_blob() {
    let mut env = Env::start().await;
    let blobs = two_damaged(&env).await;
    env.proxy.shutdown().await;
    flip(&stored(env.dir.path(), &blobs[0].0), 0);
    let text = config_toml(env.dir.path(), &env.cache, &env.upstreams).replace(
        "offline = false\n",
        "offline = false\nscrub_interval = \"1h\"\nscrub_rate = \"100MiB/s\"\n",
    );
    env.proxy = Proxy::start(&text).await;
    env.wait_metric("cachalot_scrub_corrupt_total", &[], 1.0)
        .await;
    env.wait_metric("cachalot_scrub_objects_total", &[], 2.0)
        .await;
    assert!(
        env.metric("cachalot_scrub_last_pass_timestamp_seconds", &[])
            .await
            > 0.0
    );
    assert_eq!(
        env.metric("cachalot_scrub_bytes_total", &[]).await,
        700_000.0
    );
    pull_ok(&env, &blobs[0].0, &blobs[0].1).await;
    assert_eq!(env.fake.blob_gets(REPO, &blobs[0].0), 2);
    pull_ok(&env, &blobs[1].0, &blobs[1].1).await;
    assert_eq!(env.fake.blob_gets(REPO, &blobs[1].0), 1);
}

/// Re-importing a bundle repairs what it holds: a stored copy that no longer matches its digest
/// is replaced by the bundle's.
#[tokio::test]
async fn re_importing_a_bundle_replaces_a_damaged_file() {
    let mut env = Env::start().await;
    let img = env.fake.push_image(REPO, Some("v1"), &[50_000]);
    let (layer, bytes) = img.layers[0].clone();
    pull_ok(&env, &layer, &bytes).await;
    env.wait_no_fills().await;
    env.proxy.shutdown().await;
    let config = env.dir.path().join("airgap.toml");
    std::fs::write(
        &config,
        config_toml(env.dir.path(), &env.cache, &env.upstreams),
    )
    .unwrap();
    let bundle = env.dir.path().join("bundle.tar");
    // Async: the fake upstream answers the export from this test's runtime.
    let run = async |args: &[&str]| {
        let out = tokio::process::Command::new(BIN)
            .args(args)
            .output()
            .await
            .expect("run cachalot");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{args:?}: {text}");
    };
    let image = format!("{UP}/{REPO}:v1");
    let (cfg, out) = (config.to_str().unwrap(), bundle.to_str().unwrap());
    run(&["export", "--config", cfg, "--output", out, &image]).await;
    flip(&stored(env.dir.path(), &layer), 10);
    run(&["import", "--config", cfg, out]).await;
    assert_eq!(
        std::fs::read(stored(env.dir.path(), &layer)).unwrap(),
        bytes
    );
    assert_eq!(quarantined(env.dir.path()).len(), 1);
    let (code, out) = verify(&env);
    assert_eq!(code, 0, "{out}");
}
