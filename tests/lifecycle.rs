//! Cache lifecycle (issue 3): a bounded disk, eviction that never breaks a pull, pins, unused
//! content, and writes that fail without costing the client its blob.

mod common;

use bytes::Bytes;
use cachalot::storage::evict::{self, Reason};
use cachalot::storage::{Disk, DiskFile, RealDisk};
use common::*;
use http::Method;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// A fake upstream and a cachalot in front of it, with the whole `Server` at hand.
struct Rig {
    fake: FakeRegistry,
    server: Option<cachalot::server::Server>,
    dir: tempfile::TempDir,
    client: TestClient,
    cache_extra: String,
}

fn config_text(dir: &Path, fake: &FakeRegistry, cache_extra: &str) -> String {
    config_toml(
        dir,
        &CacheSpec::default(),
        &[UpstreamSpec::new(UP, &fake.url(), true)],
    )
    .replace("max_size = \"1GiB\"\n", cache_extra)
}

impl Rig {
    async fn start(cache_extra: &str, disk: Arc<dyn Disk>) -> Rig {
        let fake = FakeRegistry::start().await;
        let dir = tempfile::tempdir().unwrap();
        let config =
            cachalot::config::Config::from_toml_str(&config_text(dir.path(), &fake, cache_extra))
                .unwrap();
        let server = cachalot::server::spawn_with(config, disk).await.unwrap();
        Rig {
            fake,
            server: Some(server),
            dir,
            client: TestClient::new(),
            cache_extra: cache_extra.to_owned(),
        }
    }

    fn server(&self) -> &cachalot::server::Server {
        self.server.as_ref().unwrap()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.server().local_addr())
    }

    fn blob_url(&self, repo: &str, digest: &str) -> String {
        self.url(&format!("/v2/{repo}/blobs/{digest}"))
    }

    async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let r = self.client.get(&self.url("/metrics")).await;
        metric_value(&r.text(), name, labels)
    }

    /// GETs a blob through the proxy and checks it is whole and correct.
    async fn pull(&self, repo: &str, digest: &str, bytes: &Bytes) {
        let r = self.client.get(&self.blob_url(repo, digest)).await;
        assert_eq!(r.status, 200, "GET {digest}");
        assert_eq!(&r.body, bytes, "body of {digest}");
    }

    async fn wait_no_fills(&self) {
        for _ in 0..3000 {
            if self.server().mirror.fills_in_flight() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("safety timeout: fills still in flight");
    }

    fn pass(&self, max_size: u64) -> evict::Report {
        self.server().mirror.evict_now(Some(max_size)).unwrap()
    }

    async fn restart(&mut self) {
        self.server.take().unwrap().shutdown().await;
        let config = cachalot::config::Config::from_toml_str(&config_text(
            self.dir.path(),
            &self.fake,
            &self.cache_extra,
        ))
        .unwrap();
        self.server = Some(cachalot::server::spawn(config).await.unwrap());
    }
}

/// Bytes of the files under `blobs/`.
fn bytes_on_disk(root: &Path) -> u64 {
    fn walk(p: &Path, sum: &mut u64) {
        for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
            let path = e.path();
            if path.is_dir() {
                walk(&path, sum);
            } else {
                *sum += e.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    let mut sum = 0;
    walk(&root.join("blobs"), &mut sum);
    sum
}

fn stored(root: &Path, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    root.join("blobs/sha256").join(&hex[..2]).join(hex)
}

#[tokio::test]
async fn eviction_keeps_the_cache_under_its_bound_and_keeps_the_recent() {
    let rig = Rig::start("max_size = \"1MiB\"\n", Arc::new(RealDisk)).await;
    let mut blobs = Vec::new();
    for _ in 0..8 {
        let bytes = random_blob(200 * 1024);
        let d = rig.fake.push_blob("team/app", bytes.clone());
        blobs.push((d, bytes));
    }
    for (d, bytes) in &blobs {
        rig.pull("team/app", d, bytes).await;
        rig.wait_no_fills().await;
    }
    // Commits wake the background pass; give it a moment, with a safety net.
    let mirror = &rig.server().mirror;
    for _ in 0..500 {
        if mirror.usage().bytes <= 1 << 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        mirror.usage().bytes <= 1 << 20,
        "cache holds {} bytes, bound 1MiB",
        mirror.usage().bytes
    );
    assert!(
        bytes_on_disk(rig.dir.path()) <= 1 << 20,
        "files hold {} bytes",
        bytes_on_disk(rig.dir.path())
    );
    assert!(
        rig.metric("cachalot_evictions_total", &[("reason", "size")])
            .await
            >= 1.0
    );
    assert!(rig.metric("cachalot_cache_size_bytes", &[]).await <= (1 << 20) as f64);
    // The oldest went first; the newest is still a hit.
    let (last, last_bytes) = blobs.last().unwrap();
    assert!(stored(rig.dir.path(), last).exists());
    assert!(!stored(rig.dir.path(), &blobs[0].0).exists());
    rig.pull("team/app", last, last_bytes).await;
    assert_eq!(rig.fake.blob_gets("team/app", last), 1);
    // An evicted blob comes back whole from upstream.
    rig.pull("team/app", &blobs[0].0, &blobs[0].1).await;
    assert_eq!(rig.fake.blob_gets("team/app", &blobs[0].0), 2);
}

#[tokio::test]
async fn a_reader_keeps_streaming_a_blob_evicted_under_it() {
    let rig = Rig::start("", Arc::new(RealDisk)).await;
    let bytes = random_blob(4 << 20);
    let d = rig.fake.push_blob("team/app", bytes.clone());
    rig.pull("team/app", &d, &bytes).await;
    rig.wait_no_fills().await;

    let resp = rig
        .client
        .send_raw(Method::GET, &rig.blob_url("team/app", &d), &[])
        .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let head = client::read_at_least(&mut body, 64 * 1024).await;
    let report = rig.pass(1);
    assert!(
        report.evicted.iter().any(|e| e.row.digest.to_string() == d),
        "{report:?}"
    );
    assert!(
        !stored(rig.dir.path(), &d).exists(),
        "the file is gone from the cache"
    );
    let rest = client::drain(body).await;
    assert!(rest.error.is_none(), "{:?}", rest.error);
    let mut all = head;
    all.extend_from_slice(&rest.bytes);
    assert_eq!(all.len(), bytes.len());
    assert_eq!(sha256_digest(&all), d);
}

#[tokio::test]
async fn pinned_images_survive_eviction_pressure() {
    let rig = Rig::start(
        &format!("max_size = \"1MiB\"\npinned = [\"{UP}/team/base:v1\"]\n"),
        Arc::new(RealDisk),
    )
    .await;
    let image = rig
        .fake
        .push_image("team/base", Some("v1"), &[300 * 1024, 300 * 1024]);
    let m = rig.client.get(&rig.url("/v2/team/base/manifests/v1")).await;
    assert_eq!(m.status, 200);
    rig.pull("team/base", &image.config.0, &image.config.1)
        .await;
    for (d, b) in &image.layers {
        rig.pull("team/base", d, b).await;
    }
    rig.wait_no_fills().await;
    for _ in 0..6 {
        let b = random_blob(300 * 1024);
        let d = rig.fake.push_blob("team/other", b.clone());
        rig.pull("team/other", &d, &b).await;
        rig.wait_no_fills().await;
    }
    let report = rig.pass(1 << 20);
    assert!(rig.server().mirror.usage().bytes <= 1 << 20 || report.after > 0);
    for (d, _) in image.layers.iter().chain(std::iter::once(&image.config)) {
        assert!(stored(rig.dir.path(), d).exists(), "pinned {d} was evicted");
    }
    // With the upstream gone, the pinned image still pulls whole.
    rig.fake.stop().await;
    let m2 = rig.client.get(&rig.url("/v2/team/base/manifests/v1")).await;
    assert_eq!(m2.status, 200);
    assert_eq!(m2.body, m.body);
    for (d, b) in &image.layers {
        rig.pull("team/base", d, b).await;
    }
}

#[tokio::test]
async fn content_unread_for_max_unused_is_evicted_even_under_the_bound() {
    let rig = Rig::start(
        "max_size = \"1GiB\"\nmax_unused = \"1s\"\n",
        Arc::new(RealDisk),
    )
    .await;
    let b = random_blob(10_000);
    let d = rig.fake.push_blob("team/app", b.clone());
    rig.pull("team/app", &d, &b).await;
    rig.wait_no_fills().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let report = rig.pass(1 << 30);
    let e = report
        .evicted
        .iter()
        .find(|e| e.row.digest.to_string() == d)
        .expect("evicted as unused");
    assert_eq!(e.reason, Reason::Unused);
    assert_eq!(e.row.repo, format!("{UP}/team/app"));
    rig.pull("team/app", &d, &b).await;
    assert_eq!(rig.fake.blob_gets("team/app", &d), 2);
}

#[tokio::test]
async fn reads_order_eviction_across_a_restart() {
    let mut rig = Rig::start("", Arc::new(RealDisk)).await;
    let (a, b) = (random_blob(50_000), random_blob(50_000));
    let da = rig.fake.push_blob("team/app", a.clone());
    let db = rig.fake.push_blob("team/app", b.clone());
    rig.pull("team/app", &da, &a).await;
    rig.wait_no_fills().await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    rig.pull("team/app", &db, &b).await;
    rig.wait_no_fills().await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    // Reading `a` again makes `b` the least recently used; the read must survive a restart.
    rig.pull("team/app", &da, &a).await;
    rig.restart().await;
    assert_eq!(
        rig.server().mirror.usage().bytes,
        100_000,
        "size accounting recomputed at start"
    );
    let report = rig.pass(90_000);
    let gone: Vec<String> = report
        .evicted
        .iter()
        .map(|e| e.row.digest.to_string())
        .collect();
    assert_eq!(gone, vec![db.clone()]);
    rig.pull("team/app", &da, &a).await;
    assert_eq!(rig.fake.blob_gets("team/app", &da), 1);
}

// === write failures ===

/// Makes cache writes fail on demand: file creation, writes after a byte budget, or renames.
#[derive(Default)]
struct FailingDisk {
    fail_create: AtomicBool,
    /// Writes fail once this many bytes were written in total (u64::MAX: never).
    write_budget: AtomicU64,
    fail_rename: AtomicBool,
}

impl FailingDisk {
    fn new() -> Arc<FailingDisk> {
        let d = FailingDisk::default();
        d.write_budget.store(u64::MAX, Ordering::SeqCst);
        Arc::new(d)
    }

    fn heal(&self) {
        self.fail_create.store(false, Ordering::SeqCst);
        self.write_budget.store(u64::MAX, Ordering::SeqCst);
        self.fail_rename.store(false, Ordering::SeqCst);
    }
}

struct FailingFile {
    inner: Box<dyn DiskFile>,
    disk: Arc<FailingDisk>,
}

impl io::Write for FailingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let budget = self.disk.write_budget.load(Ordering::SeqCst);
        if budget < buf.len() as u64 {
            return Err(io::Error::from_raw_os_error(28)); // ENOSPC
        }
        if budget != u64::MAX {
            self.disk
                .write_budget
                .fetch_sub(buf.len() as u64, Ordering::SeqCst);
        }
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl DiskFile for FailingFile {
    fn sync_all(&mut self) -> io::Result<()> {
        self.inner.sync_all()
    }
}

struct Shared(Arc<FailingDisk>);

impl Disk for Shared {
    fn create(&self, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        if self.0.fail_create.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(28));
        }
        Ok(Box::new(FailingFile {
            inner: RealDisk.create(path)?,
            disk: self.0.clone(),
        }))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        if self.0.fail_rename.load(Ordering::SeqCst) {
            return Err(io::Error::other("injected rename failure"));
        }
        RealDisk.rename(from, to)
    }
}

fn tmp_is_empty(root: &Path) -> bool {
    std::fs::read_dir(root.join("tmp"))
        .map(|mut d| d.next().is_none())
        .unwrap_or(true)
}

#[tokio::test]
async fn a_cache_that_cannot_create_files_passes_blobs_through() {
    let disk = FailingDisk::new();
    let rig = Rig::start("", Arc::new(Shared(disk.clone()))).await;
    let b = random_blob(1 << 20);
    let d = rig.fake.push_blob("team/app", b.clone());
    disk.fail_create.store(true, Ordering::SeqCst);
    rig.pull("team/app", &d, &b).await;
    assert!(!stored(rig.dir.path(), &d).exists());
    assert!(rig.metric("cachalot_cache_write_errors_total", &[]).await >= 1.0);
    // The disk recovers: the next request caches normally.
    disk.heal();
    rig.pull("team/app", &d, &b).await;
    rig.wait_no_fills().await;
    assert!(stored(rig.dir.path(), &d).exists());
    rig.pull("team/app", &d, &b).await;
    assert_eq!(rig.fake.blob_gets("team/app", &d), 2);
}

#[tokio::test]
async fn a_write_failing_mid_fill_still_serves_every_follower_a_correct_blob() {
    let disk = FailingDisk::new();
    let rig = Rig::start("", Arc::new(Shared(disk.clone()))).await;
    let b = random_blob(3 << 20);
    let d = rig.fake.push_blob("team/app", b.clone());
    // The disk fills up one MiB into the blob, while three clients follow the fill.
    disk.write_budget.store(1 << 20, Ordering::SeqCst);
    let gate = rig.fake.pause_blob(&d, 2 << 20);
    let mut clients = Vec::new();
    for _ in 0..3 {
        let (client, url) = (rig.client.clone(), rig.blob_url("team/app", &d));
        clients.push(tokio::spawn(async move { client.get_drained(&url).await }));
    }
    gate.reached().await;
    gate.release();
    for c in clients {
        let (status, _, drained) = c.await.unwrap();
        assert_eq!(status, 200);
        assert!(drained.error.is_none(), "{:?}", drained.error);
        assert_eq!(drained.bytes.len(), b.len());
        assert_eq!(sha256_digest(&drained.bytes), d);
    }
    rig.wait_no_fills().await;
    assert!(
        !stored(rig.dir.path(), &d).exists(),
        "nothing stored from a failed write"
    );
    assert!(tmp_is_empty(rig.dir.path()));
    assert!(rig.metric("cachalot_cache_write_errors_total", &[]).await >= 1.0);
    disk.heal();
    rig.pull("team/app", &d, &b).await;
    rig.wait_no_fills().await;
    assert!(stored(rig.dir.path(), &d).exists());
}

#[tokio::test]
async fn a_diverted_fill_still_refuses_a_lying_upstream() {
    let disk = FailingDisk::new();
    let rig = Rig::start("", Arc::new(Shared(disk.clone()))).await;
    let b = random_blob(2 << 20);
    let d = rig.fake.push_blob("team/app", b.clone());
    disk.write_budget.store(512 * 1024, Ordering::SeqCst);
    rig.fake.corrupt(&d, true);
    let (status, _, drained) = rig.client.get_drained(&rig.blob_url("team/app", &d)).await;
    assert_eq!(status, 200);
    assert!(
        drained.error.is_some() || drained.bytes.len() < b.len(),
        "a wrong blob must not arrive as a complete download"
    );
    rig.wait_no_fills().await;
    assert!(!stored(rig.dir.path(), &d).exists());
}

#[tokio::test]
async fn a_failed_rename_serves_the_verified_blob_and_stores_nothing() {
    let disk = FailingDisk::new();
    let rig = Rig::start("", Arc::new(Shared(disk.clone()))).await;
    let b = random_blob(1 << 20);
    let d = rig.fake.push_blob("team/app", b.clone());
    disk.fail_rename.store(true, Ordering::SeqCst);
    rig.pull("team/app", &d, &b).await;
    rig.wait_no_fills().await;
    assert!(!stored(rig.dir.path(), &d).exists());
    assert!(tmp_is_empty(rig.dir.path()));
    assert!(rig.metric("cachalot_cache_write_errors_total", &[]).await >= 1.0);
    disk.heal();
    rig.pull("team/app", &d, &b).await;
    rig.wait_no_fills().await;
    assert!(stored(rig.dir.path(), &d).exists());
}

// === the gc command ===

#[tokio::test]
async fn gc_reports_then_evicts() {
    let mut rig = Rig::start("", Arc::new(RealDisk)).await;
    let mut blobs = Vec::new();
    for _ in 0..4 {
        let b = random_blob(100_000);
        blobs.push(rig.fake.push_blob("team/app", b.clone()));
        rig.pull("team/app", blobs.last().unwrap(), &b).await;
        rig.wait_no_fills().await;
    }
    rig.server.take().unwrap().shutdown().await;
    rig.cache_extra = "max_size = \"250KB\"\n".into();
    let cfg = rig.dir.path().join("gc.toml");
    std::fs::write(
        &cfg,
        config_text(rig.dir.path(), &rig.fake, &rig.cache_extra),
    )
    .unwrap();
    let run = |dry: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_cachalot"));
        cmd.args(["gc", "--config"]).arg(&cfg);
        if dry {
            cmd.arg("--dry-run");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let dry = run(true);
    assert!(dry.contains("would evict 2 objects, 200000 bytes"), "{dry}");
    assert!(dry.contains(&format!("{UP}/team/app: 2 objects")), "{dry}");
    assert!(
        blobs.iter().all(|d| stored(rig.dir.path(), d).exists()),
        "a dry run removes nothing"
    );
    let real = run(false);
    assert!(real.contains("evicted 2 objects, 200000 bytes"), "{real}");
    assert!(!stored(rig.dir.path(), &blobs[0]).exists());
    assert!(stored(rig.dir.path(), &blobs[3]).exists());
    assert!(run(false).contains("evicted 0 objects"));
}
