//! Integrity at rest in the shared bucket (`[storage] backend = "s3"`, against Garage): with
//! `[cache] scrub_bucket = true`, `cachalot verify` and the background scrub read every blob of
//! the bucket back, and one whose bytes were damaged in the bucket is taken out of it (to its
//! `quarantine/`), so the next pull, on any replica, fetches it from the upstream again. Without
//! the key the bucket is not read back.
//!
//! Needs the `garage` binary (2.5): without it the tests print why and skip, unless `CI` is
//! set, in which case they fail.

mod common;
mod e2e_support;

use bytes::Bytes;
use common::*;
use e2e_support::garage::Garage;
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_cachalot");
const REPO: &str = "team/app";

/// A fake upstream and a Garage bucket; cachalot servers and `verify` runs over them.
struct Setup {
    fake: FakeRegistry,
    garage: Garage,
    /// The bucket's keys, reached past cachalot (to damage an object as a failing store would).
    raw: Arc<dyn ObjectStore>,
    creds: tempfile::TempDir,
}

impl Setup {
    async fn start() -> Option<Setup> {
        let garage = Garage::start(1).await?;
        let creds = tempfile::tempdir().unwrap();
        std::fs::write(creds.path().join("id"), garage.key_id()).unwrap();
        std::fs::write(creds.path().join("secret"), garage.secret()).unwrap();
        let mut s = Setup {
            fake: FakeRegistry::start().await,
            garage,
            raw: Arc::new(object_store::memory::InMemory::new()),
            creds,
        };
        let config =
            cachalot::config::Config::from_toml_str(&s.config(Path::new("/x"), "")).unwrap();
        s.raw = cachalot::storage::s3::object_store_of(&config.storage).unwrap();
        Some(s)
    }

    /// A config over cache directory `dir`, with `cache` lines added to `[cache]`.
    fn config(&self, dir: &Path, cache: &str) -> String {
        let ups = [UpstreamSpec::new(UP, &self.fake.url(), true)];
        let base = config_toml(dir, &CacheSpec::default(), &ups)
            .replace("offline = false\n", &format!("offline = false\n{cache}"));
        format!(
            "{base}\n[storage]\nbackend = \"s3\"\nendpoint = {:?}\nbucket = {:?}\nregion = {:?}\naccess_key_id_file = {:?}\nsecret_access_key_file = {:?}\n",
            self.garage.endpoint(0),
            self.garage.bucket(),
            self.garage.region(),
            self.creds.path().join("id"),
            self.creds.path().join("secret"),
        )
    }

    fn key(digest: &str) -> Key {
        Key::from(format!(
            "blobs/sha256/{}",
            digest.strip_prefix("sha256:").unwrap()
        ))
    }

    /// The blob's bytes in the bucket, if it is there.
    async fn in_bucket(&self, digest: &str) -> Option<Bytes> {
        match self.raw.get(&Setup::key(digest)).await {
            Ok(r) => Some(r.bytes().await.unwrap()),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => panic!("{e}"),
        }
    }

    /// Waits until the bucket holds `want` under `digest` (an upload completes after the pull).
    async fn wait_in_bucket(&self, digest: &str, want: &Bytes) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.in_bucket(digest).await.as_ref() != Some(want) {
            assert!(
                Instant::now() < deadline,
                "{digest} never reached the bucket"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Overwrites the blob in the bucket with its bytes, one flipped: same length, other digest.
    async fn flip(&self, digest: &str, good: &Bytes) {
        let mut bad = good.to_vec();
        bad[good.len() / 2] ^= 0x01;
        self.raw
            .put(&Setup::key(digest), Bytes::from(bad).into())
            .await
            .unwrap();
    }

    async fn quarantined(&self) -> Vec<String> {
        let listed: Vec<_> =
            futures_util::TryStreamExt::try_collect(self.raw.list(Some(&Key::from("quarantine"))))
                .await
                .unwrap();
        listed.iter().map(|m| m.location.to_string()).collect()
    }

    /// Pulls the blob through `proxy`: it must be served whole and right.
    async fn pull(&self, proxy: &Proxy, digest: &str, want: &Bytes) {
        let url = format!("{}/v2/{REPO}/blobs/{digest}", proxy.url());
        let r = TestClient::unpooled().get(&url).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert!(r.body == *want, "wrong bytes served for {digest}");
    }

    /// Runs `cachalot verify` over cache directory `dir`: (exit code, output).
    fn verify(&self, dir: &Path, cache: &str) -> (i32, String) {
        let config = dir.join("verify.toml");
        std::fs::write(&config, self.config(dir, cache)).unwrap();
        let out = std::process::Command::new(BIN)
            .args(["verify", "--config"])
            .arg(&config)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run cachalot verify");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    }
}

async fn metric(proxy: &Proxy, name: &str, labels: &[(&str, &str)]) -> f64 {
    let r = TestClient::unpooled()
        .get(&format!("{}/metrics", proxy.url()))
        .await;
    metric_value(&r.text(), name, labels)
}

/// Server stopped: `verify` without the key leaves the bucket alone (exit 0, the damaged object
/// still there); with it, it finds the flipped blob, names it, exits 1 and takes it out of the
/// bucket, and a fresh replica's pull fetches it from the upstream again, right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reads_the_bucket_back_only_when_asked() {
    let Some(s) = Setup::start().await else {
        return;
    };
    let blob = random_blob(300_000);
    let d = s.fake.push_blob(REPO, blob.clone());
    let dir = tempfile::tempdir().unwrap();
    let mut proxy = Proxy::start(&s.config(dir.path(), "")).await;
    s.pull(&proxy, &d, &blob).await;
    s.wait_in_bucket(&d, &blob).await;
    proxy.shutdown().await;
    s.flip(&d, &blob).await;
    let damaged = s.in_bucket(&d).await.unwrap();

    let (code, out) = s.verify(dir.path(), "");
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("verified 1 objects"),
        "the local copy only: {out}"
    );
    assert_eq!(
        s.in_bucket(&d).await,
        Some(damaged),
        "the bucket was left alone"
    );

    let (code, out) = s.verify(dir.path(), "scrub_bucket = true\n");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("damaged {d}: content hashes to"))
            && out.contains("in the bucket; quarantined"),
        "{out}"
    );
    assert!(out.contains("verified 2 objects"), "{out}");
    assert_eq!(s.in_bucket(&d).await, None, "taken out of the bucket");
    let q = s.quarantined().await;
    assert!(
        q.len() == 1 && q[0].contains(d.strip_prefix("sha256:").unwrap()),
        "{q:?}"
    );
    let (code, out) = s.verify(dir.path(), "scrub_bucket = true\n");
    assert_eq!(code, 0, "nothing left damaged: {out}");

    // A replica with an empty cache directory: the bucket no longer has it, the upstream does.
    let fresh = tempfile::tempdir().unwrap();
    let on = "scrub_bucket = true\n";
    let proxy = Proxy::start(&s.config(fresh.path(), on)).await;
    s.pull(&proxy, &d, &blob).await;
    assert_eq!(
        s.fake.blob_gets(REPO, &d),
        2,
        "fetched from the upstream again"
    );
    s.wait_in_bucket(&d, &blob).await;

    // Beside a running server, `verify` has the server run the pass, the bucket's part too.
    let other = random_blob(200_000);
    let e = s.fake.push_blob(REPO, other.clone());
    s.pull(&proxy, &e, &other).await;
    s.wait_in_bucket(&e, &other).await;
    s.flip(&e, &other).await;
    let (code, out) = tokio::task::spawn_blocking({
        let dir = fresh.path().to_owned();
        let text = s.config(&dir, on);
        move || {
            let config = dir.join("verify.toml");
            std::fs::write(&config, text).unwrap();
            let out = std::process::Command::new(BIN)
                .args(["verify", "--config"])
                .arg(&config)
                .output()
                .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            (out.status.code().unwrap_or(-1), text)
        }
    })
    .await
    .unwrap();
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("in use by a running cachalot"), "{out}");
    assert!(
        out.contains(&format!("damaged {e}: content hashes to")) && !out.contains(&d),
        "{out}"
    );
    assert_eq!(s.in_bucket(&e).await, None, "taken out of the bucket");
}

/// A running server's scrub (every second here) reads the bucket back: a blob flipped in the
/// bucket is counted, taken out, and fetched again by the next replica that pulls it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scrub_takes_a_damaged_blob_out_of_the_bucket() {
    let Some(s) = Setup::start().await else {
        return;
    };
    let blob = random_blob(500_000);
    let d = s.fake.push_blob(REPO, blob.clone());
    let dir = tempfile::tempdir().unwrap();
    let cache = "scrub_interval = \"1s\"\nscrub_rate = \"100MiB/s\"\nscrub_bucket = true\n";
    let proxy = Proxy::start(&s.config(dir.path(), cache)).await;
    s.pull(&proxy, &d, &blob).await;
    s.wait_in_bucket(&d, &blob).await;
    s.flip(&d, &blob).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&proxy, "cachalot_scrub_corrupt_total", &[]).await < 1.0 {
        assert!(Instant::now() < deadline, "the scrub never found the flip");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        metric(
            &proxy,
            "cachalot_quarantined_total",
            &[("reason", "digest")]
        )
        .await,
        1.0
    );
    assert_eq!(s.in_bucket(&d).await, None, "taken out of the bucket");
    assert_eq!(s.quarantined().await.len(), 1);
    // The local copy was whole all along, and is still served from here.
    s.pull(&proxy, &d, &blob).await;
    assert_eq!(s.fake.blob_gets(REPO, &d), 1);
    let fresh = tempfile::tempdir().unwrap();
    let other = Proxy::start(&s.config(fresh.path(), "")).await;
    s.pull(&other, &d, &blob).await;
    assert_eq!(
        s.fake.blob_gets(REPO, &d),
        2,
        "fetched from the upstream again"
    );
    s.wait_in_bucket(&d, &blob).await;
}

/// Without any scrub: a replica whose fill reads a flipped copy from the bucket never serves it
/// as a complete 200, and takes the copy out of the bucket, so the client's retry fetches the
/// blob from the upstream (rather than failing the same way on every pull, on every replica).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_that_reads_a_damaged_copy_takes_it_out_of_the_bucket() {
    let Some(s) = Setup::start().await else {
        return;
    };
    let blob = random_blob(400_000);
    let d = s.fake.push_blob(REPO, blob.clone());
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&s.config(dir.path(), "")).await;
    s.pull(&proxy, &d, &blob).await;
    s.wait_in_bucket(&d, &blob).await;
    s.flip(&d, &blob).await;

    let fresh = tempfile::tempdir().unwrap();
    let other = Proxy::start(&s.config(fresh.path(), "")).await;
    let url = format!("{}/v2/{REPO}/blobs/{d}", other.url());
    let (status, headers, drained) = TestClient::unpooled().get_drained(&url).await;
    let declared = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    let complete = status == 200
        && drained.error.is_none()
        && declared.is_none_or(|n| n == drained.bytes.len());
    assert!(
        !complete,
        "the bucket's flipped copy was served as a complete {status}"
    );
    assert_eq!(
        s.fake.blob_gets(REPO, &d),
        1,
        "the first pull read the bucket"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.in_bucket(&d).await.is_some_and(|b| b != blob) {
        assert!(
            Instant::now() < deadline,
            "the flipped copy stayed in the bucket"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.pull(&other, &d, &blob).await;
    assert_eq!(
        s.fake.blob_gets(REPO, &d),
        2,
        "the retry fetched it from the upstream"
    );
    assert_eq!(s.quarantined().await.len(), 1);
}
