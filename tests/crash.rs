//! Crash safety, end to end (DESIGN invariant 8, issue 3): the real binary is killed (`kill -9`)
//! mid-fill or aborts at a crash point inside `Store::commit` (`CACHALOT_CRASH_POINT`), then is
//! restarted on the same cache with the upstream down and again with it back. No partial blob
//! may ever be served, `tmp/` must be swept, and what the metadata recorded must stay usable
//! (a record whose file never arrived is dropped at the next start).
//!
//! The upstream is the in-process fake registry; cachalot runs as a child process, killed on
//! drop of its guard whatever the test's outcome.

mod common;

use bytes::Bytes;
use common::child::*;
use common::*;
use sha2::{Digest as _, Sha256};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const REPO: &str = "crash/big";
/// Large enough that a fill is many chunks long.
const BIG: usize = 8 << 20;
/// Where the fake pauses the body for the kill.
const PAUSE_AT: usize = 3 << 20;

// === looking at the cache on disk ===

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Files in the cache's `tmp/`.
fn temp_files(dir: &Path) -> Vec<PathBuf> {
    files_under(&cache_dir(dir).join("tmp"))
}

/// Files under the cache's `blobs/` named after `digest`.
fn blob_files(dir: &Path, digest: &str) -> Vec<PathBuf> {
    let hex = digest.trim_start_matches("sha256:");
    files_under(&cache_dir(dir).join("blobs"))
        .into_iter()
        .filter(|p| p.file_name().and_then(|n| n.to_str()) == Some(hex))
        .collect()
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// A file stored under a digest must hold exactly the bytes of that digest.
fn assert_stored_files_verified(dir: &Path, digest: &str) {
    for p in blob_files(dir, digest) {
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(
            format!("sha256:{}", sha256_hex(&bytes)),
            digest,
            "{} holds {} bytes that do not match its digest",
            p.display(),
            bytes.len()
        );
    }
}

/// A response to a blob GET must never be a complete 200 with other bytes than the blob's.
fn assert_not_partial(what: &str, status: u16, d: &client::Drained, blob: &Bytes) {
    if status == 200 && d.error.is_none() {
        assert!(
            d.bytes.len() == blob.len() && d.bytes == *blob,
            "{what}: a complete 200 with {} bytes (sha256 {}) for a {}-byte blob",
            d.bytes.len(),
            sha256_hex(&d.bytes),
            blob.len()
        );
    }
}

/// GETs the blob through `c` and requires the whole, correct blob.
async fn assert_serves_blob(c: &Cachalot, digest: &str, blob: &Bytes) {
    let (status, _, d) = TestClient::new()
        .get_drained(&c.blob_url(REPO, digest))
        .await;
    assert_eq!(
        status,
        200,
        "GET blob: {:?}",
        String::from_utf8_lossy(&d.bytes)
    );
    assert!(
        d.error.is_none(),
        "GET blob ended with an error: {:?}",
        d.error
    );
    assert_eq!(d.bytes.len(), blob.len(), "GET blob: length");
    assert_eq!(
        format!("sha256:{}", sha256_hex(&d.bytes)),
        digest,
        "GET blob: content"
    );
}

// === gc on the stopped cache ===

/// The figures of `cachalot gc`'s first line.
#[derive(Debug, PartialEq, Eq)]
struct GcLine {
    objects: u64,
    bytes: u64,
    before: u64,
    after: u64,
}

fn parse_gc(stdout: &str) -> GcLine {
    let line = stdout.lines().next().unwrap_or_default();
    let nums: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect();
    // "would evict N objects, B bytes (size: S bytes, unused: U bytes); cache A -> C bytes, bound ..."
    assert!(
        line.starts_with("would evict ") && nums.len() >= 6,
        "unexpected gc output: {stdout:?}"
    );
    assert_eq!(nums[1], nums[2] + nums[3], "size + unused = total: {line}");
    GcLine {
        objects: nums[0],
        bytes: nums[1],
        before: nums[4],
        after: nums[5],
    }
}

fn run_gc_dry(config: &Path) -> GcLine {
    let out = Command::new(BIN)
        .args(["gc", "--dry-run", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .output()
        .expect("run cachalot gc");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "gc --dry-run failed ({}): {}{}",
        out.status,
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    parse_gc(&stdout)
}

/// Runs `gc --dry-run` on the stopped cache twice: under a bound it is within (nothing to
/// evict), and under a tiny bound (everything would go, including a row whose file a crash
/// never renamed into place). Both must run and agree with `expected_bytes` of object rows.
/// Dry runs change nothing, so the cache is left as it was.
fn check_gc(dir: &Path, upstream_url: &str, expected_bytes: u64, expected_objects: u64) {
    let roomy = write_config(dir, "gc-roomy.toml", upstream_url, 0, "1GiB");
    let g = run_gc_dry(&roomy);
    assert_eq!(
        g,
        GcLine {
            objects: 0,
            bytes: 0,
            before: expected_bytes,
            after: expected_bytes
        },
        "gc --dry-run within the bound"
    );
    let tight = write_config(dir, "gc-tight.toml", upstream_url, 0, "1KiB");
    let g = run_gc_dry(&tight);
    assert_eq!(
        g.before, expected_bytes,
        "gc --dry-run over the bound: {g:?}"
    );
    assert_eq!(g.before - g.bytes, g.after, "gc --dry-run figures: {g:?}");
    if expected_bytes > 1024 {
        assert_eq!(g.objects, expected_objects, "gc --dry-run: {g:?}");
        assert_eq!(g.after, 0, "gc --dry-run: {g:?}");
    }
}

// === the scenarios ===

/// A test's world: a temp dir holding the cache and configs, and the fake upstream holding one
/// big blob.
struct World {
    dir: tempfile::TempDir,
    fake: FakeRegistry,
    blob: Bytes,
    digest: String,
}

impl World {
    async fn new() -> World {
        let fake = FakeRegistry::start().await;
        let blob = random_blob(BIG);
        let digest = fake.push_blob(REPO, blob.clone());
        World {
            dir: tempfile::tempdir().expect("tempdir"),
            fake,
            blob,
            digest,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Restarts cachalot with the upstream down: the cache is swept and serves no partial
    /// blob. Returns whether it served the blob (whole) from the cache.
    async fn restart_upstream_down(&self) -> (Cachalot, bool) {
        self.fake.stop().await;
        let c = Cachalot::start(self.path(), &self.fake.url(), None).await;
        assert_eq!(
            temp_files(self.path()),
            Vec::<PathBuf>::new(),
            "tmp/ not swept at start"
        );
        assert_stored_files_verified(self.path(), &self.digest);
        let (status, _, d) = TestClient::new()
            .get_drained(&c.blob_url(REPO, &self.digest))
            .await;
        let status = status.as_u16();
        assert_not_partial("upstream down", status, &d, &self.blob);
        let served = status == 200 && d.error.is_none();
        if !served {
            assert!(
                status >= 400,
                "upstream down, blob not cached: expected an error status, got {status} with {} bytes (error {:?})",
                d.bytes.len(),
                d.error
            );
        }
        assert_eq!(
            temp_files(self.path()),
            Vec::<PathBuf>::new(),
            "a failed fill left a temp file"
        );
        assert_stored_files_verified(self.path(), &self.digest);
        (c, served)
    }

    /// With the upstream back, a fresh cachalot serves the whole blob; with `accounting`, it
    /// also reports exactly one object of the blob's size.
    async fn upstream_back(&self, accounting: bool) {
        self.fake.unpause_blob(&self.digest);
        self.fake.restart().await;
        let c = Cachalot::start(self.path(), &self.fake.url(), None).await;
        assert_serves_blob(&c, &self.digest, &self.blob).await;
        // The response ends once the blob is verified, the commit follows: wait for it, or the
        // second read may follow the committing fill and find no file yet.
        let deadline = tokio::time::Instant::now() + SAFETY;
        while c.metric("cachalot_fills_in_flight").await > 0.0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "safety timeout: fill in flight"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A second read comes from the cache, whole.
        assert_serves_blob(&c, &self.digest, &self.blob).await;
        assert_eq!(blob_files(self.path(), &self.digest).len(), 1);
        assert_stored_files_verified(self.path(), &self.digest);
        if !accounting {
            return;
        }
        assert_eq!(
            (
                c.metric("cachalot_cache_objects").await,
                c.metric("cachalot_cache_size_bytes").await
            ),
            (1.0, self.blob.len() as f64),
            "cache accounting after the refetch (objects, bytes)"
        );
        drop(c);
    }
}

/// A GET of `url` in its own task, drained to its end or error; the receiver hears when the
/// response head has arrived. A kill must land after it, so that the client sees a 200 whose
/// body breaks off, not a connection closed before any answer.
fn pull_reporting_head(
    url: String,
) -> (
    tokio::task::JoinHandle<(hyper::StatusCode, hyper::HeaderMap, common::client::Drained)>,
    tokio::sync::oneshot::Receiver<()>,
) {
    let (head_tx, head_rx) = tokio::sync::oneshot::channel();
    let pull = tokio::spawn(async move {
        let resp = TestClient::new()
            .send_raw(hyper::Method::GET, &url, &[])
            .await;
        let (parts, body) = resp.into_parts();
        let _ = head_tx.send(());
        (
            parts.status,
            parts.headers,
            common::client::drain(body).await,
        )
    });
    (pull, head_rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_fill_leaves_no_partial_blob() {
    let w = World::new().await;
    let gate = w.fake.pause_blob(&w.digest, PAUSE_AT);
    let c = Cachalot::start(w.path(), &w.fake.url(), None).await;

    // A client starts the pull; the upstream stops mid-body, the fill is in progress.
    // The kill must land once the client holds the response head, so that what it sees is a
    // 200 whose body breaks off, not a connection that closed before any answer.
    let url = c.blob_url(REPO, &w.digest);
    let (pull, head_rx) = pull_reporting_head(url);
    tokio::time::timeout(SAFETY, gate.reached())
        .await
        .expect("safety timeout: the pull never reached the pause point");
    tokio::time::timeout(SAFETY, head_rx)
        .await
        .expect("safety timeout: no response head while the fill is paused")
        .expect("pull task");
    let deadline = tokio::time::Instant::now() + SAFETY;
    loop {
        let grown = temp_files(w.path())
            .iter()
            .any(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0));
        if grown {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "safety timeout: no temp file with bytes while the fill is paused; log:\n{}",
            c.log_text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let status = c.kill9();
    assert_eq!(status.signal(), Some(9), "{status}");
    let (st, _, d) = tokio::time::timeout(SAFETY, pull)
        .await
        .expect("safety timeout: the client did not notice the kill")
        .expect("pull task");
    assert!(
        st != 200 || d.error.is_some(),
        "the client of a killed fill got a complete 200 ({} bytes)",
        d.bytes.len()
    );
    assert!(d.bytes.len() < w.blob.len());
    assert_eq!(
        blob_files(w.path(), &w.digest),
        Vec::<PathBuf>::new(),
        "a file for the digest exists after a kill mid-fill"
    );

    let (c, served) = w.restart_upstream_down().await;
    assert!(!served, "a blob never completed was served");
    assert_eq!(blob_files(w.path(), &w.digest), Vec::<PathBuf>::new());
    drop(c);
    check_gc(w.path(), &w.fake.url(), 0, 0);

    w.upstream_back(true).await;
}

/// Aborts cachalot inside the first commit at `point`, then restarts it; with `accounting`,
/// checks the cache's size figures after the refetch too.
async fn crash_at(point: &str, accounting: bool) {
    let w = World::new().await;
    let mut c = Cachalot::start(w.path(), &w.fake.url(), Some(point)).await;
    let url = c.blob_url(REPO, &w.digest);
    let pull = tokio::spawn(async move { TestClient::new().get_drained(&url).await });
    let status = c.exited().await;
    assert!(
        !status.success() && status.signal() == Some(6),
        "cachalot should abort (SIGABRT) at crash point {point}, exited {status}; log:\n{}",
        c.log_text()
    );
    let (st, _, d) = tokio::time::timeout(SAFETY, pull)
        .await
        .expect("safety timeout: the client did not notice the crash")
        .expect("pull task");
    assert_not_partial(point, st.as_u16(), &d, &w.blob);
    drop(c);
    assert_stored_files_verified(w.path(), &w.digest);

    let (c, served) = w.restart_upstream_down().await;
    eprintln!("crash point {point}: served from the cache after restart: {served}");
    drop(c);
    // The object row is written before the rename: both points leave it behind, and the start
    // after the crash drops it where the file never arrived (issue 20: records without a file).
    if point == "after-metadata" {
        check_gc(w.path(), &w.fake.url(), 0, 0);
    } else {
        check_gc(w.path(), &w.fake.url(), w.blob.len() as u64, 1);
    }

    w.upstream_back(accounting).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_metadata_write_leaves_no_partial_blob() {
    crash_at("after-metadata", false).await;
}

/// After a crash between the object row and the rename, the refetch must not be counted a
/// second time: `Store::open` already counted the surviving row (this once reported 2 objects
/// and twice the bytes for one blob, when `Store::commit` counted by whether the file was new).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_metadata_write_keeps_size_accounting_exact() {
    crash_at("after-metadata", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_rename_leaves_no_partial_blob() {
    crash_at("after-rename", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetched_tag_survives_kill_9() {
    let w = World::new().await;
    let img = w.fake.push_image(REPO, Some("v1"), &[1000, 2000]);
    let c = Cachalot::start(w.path(), &w.fake.url(), None).await;
    let url = c.url(&format!("/v2/{REPO}/manifests/v1"));
    let accept = [("accept", OCI_MANIFEST)];
    let r = TestClient::new().get_with(&url, &accept).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, img.manifest.bytes);
    c.kill9();

    w.fake.stop().await;
    let c = Cachalot::start(w.path(), &w.fake.url(), None).await;
    let before = w.fake.total();
    let r = TestClient::new()
        .get_with(&c.url(&format!("/v2/{REPO}/manifests/v1")), &accept)
        .await;
    assert_eq!(
        r.status,
        200,
        "tag after kill -9, upstream down: {}",
        r.text()
    );
    assert_eq!(r.body, img.manifest.bytes);
    assert_eq!(
        r.header("docker-content-digest").as_deref(),
        Some(img.manifest.digest.as_str())
    );
    let r = TestClient::new()
        .get_with(
            &c.url(&format!("/v2/{REPO}/manifests/{}", img.manifest.digest)),
            &accept,
        )
        .await;
    assert_eq!(r.status, 200, "manifest by digest: {}", r.text());
    assert_eq!(r.body, img.manifest.bytes);
    assert_eq!(w.fake.total(), before, "the stopped fake was reached");
    assert_eq!(temp_files(w.path()), Vec::<PathBuf>::new());
}

/// `cachalot gc` against the cache of a running server must not sweep the server's fills: it
/// cannot open the metadata the server holds, and it must not have touched `tmp/` by then.
/// (When `Store::open` removed `tmp/` before locking `meta.redb`, the gc failed on the lock
/// only after deleting the fill's temp file, and the fill ended "served, not cached".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_against_a_running_server_leaves_its_fill_alone() {
    let w = World::new().await;
    let gate = w.fake.pause_blob(&w.digest, PAUSE_AT);
    let c = Cachalot::start(w.path(), &w.fake.url(), None).await;
    let url = c.blob_url(REPO, &w.digest);
    let (pull, head_rx) = pull_reporting_head(url);
    tokio::time::timeout(SAFETY, gate.reached())
        .await
        .expect("safety timeout: the pull never reached the pause point");
    tokio::time::timeout(SAFETY, head_rx)
        .await
        .expect("safety timeout: no response head while the fill is paused")
        .expect("pull task");
    let deadline = tokio::time::Instant::now() + SAFETY;
    while temp_files(w.path()).is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "safety timeout: no temp file while the fill is paused"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let out = Command::new(BIN)
        .args(["gc", "--dry-run", "--config"])
        .arg(&c.config)
        .stdin(Stdio::null())
        .output()
        .expect("run cachalot gc");
    eprintln!(
        "gc against a running server: {} {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(
        temp_files(w.path()),
        Vec::<PathBuf>::new(),
        "gc swept the running server's fill from tmp/"
    );
    w.fake.unpause_blob(&w.digest);
    let (st, _, d) = tokio::time::timeout(SAFETY, pull)
        .await
        .expect("safety timeout: pull")
        .expect("pull task");
    assert_eq!(st, 200);
    assert!(d.error.is_none(), "the pull failed: {:?}", d.error);
    assert_eq!(d.bytes, w.blob);
    assert_serves_blob(&c, &w.digest, &w.blob).await;
}
