//! Air-gapped sites against the in-process fake registry: platform selection counted at the
//! upstream, repeat runs that fetch nothing, failures listed, prefetch through a running server
//! (one upstream fetch shared with a client), export/import round trip, corrupt bundles
//! rejected with the cache unchanged, and `[[prefetch]]` lists refreshed by the server.

mod common;

use common::child::run_cli as cachalot;
use common::*;
use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A config file for a cache under `dir` in front of `fake` (upstream [`UP`]).
fn write_config(dir: &Path, url: &str, offline: bool, listen: &str, extra: &str) -> PathBuf {
    let cache = CacheSpec {
        tag_ttl: "1h".into(),
        offline,
    };
    let toml = config_toml(
        &dir.join("cache"),
        &cache,
        &[UpstreamSpec::new(UP, url, true)],
    )
    .replace("listen = \"127.0.0.1:0\"", &format!("listen = {listen:?}"))
        + extra;
    let path = dir.join("cachalot.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every committed object in a cache, by file name.
fn cached(dir: &Path) -> BTreeSet<String> {
    fn walk(p: &Path, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                walk(&e.path(), out);
            } else {
                out.insert(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(&dir.join("cache/blobs"), &mut out);
    out
}

fn hex(d: &str) -> String {
    d.trim_start_matches("sha256:").to_owned()
}

/// amd64 and arm64 images under one index tagged `multi`, and a single image tagged `single`.
struct Seeded {
    amd: Image,
    arm: Image,
    index: Manifest,
    single: Image,
}

fn seed(fake: &FakeRegistry) -> Seeded {
    let amd = fake.push_image("team/app", None, &[30_000, 5_000]);
    let arm = fake.push_image("team/app", None, &[40_000, 7_000]);
    let index = fake.push_index("team/app", Some("multi"), &[&amd, &arm], false);
    let single = fake.push_image("team/app", Some("single"), &[20_000]);
    Seeded {
        amd,
        arm,
        index,
        single,
    }
}

fn blobs_of(i: &Image) -> Vec<String> {
    std::iter::once(i.config.0.clone())
        .chain(i.layers.iter().map(|(d, _)| d.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_selection_fetches_only_that_platform_and_a_second_run_nothing() {
    let fake = FakeRegistry::start().await;
    let img = seed(&fake);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &fake.url(), false, "127.0.0.1:0", "");
    let reference = format!("{UP}/team/app:multi");

    let r = cachalot(&[
        "prefetch",
        "--config",
        s(&cfg),
        "--platform",
        "linux/arm64",
        &reference,
    ])
    .await;
    assert!(r.ok, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("1 platform, 3 blobs"), "{}", r.stdout);
    assert!(r.stdout.contains("3 blobs fetched"), "{}", r.stdout);
    for d in blobs_of(&img.arm) {
        assert_eq!(fake.blob_gets("team/app", &d), 1, "arm64 blob {d}");
    }
    for d in blobs_of(&img.amd) {
        assert_eq!(
            fake.blob_gets("team/app", &d),
            0,
            "amd64 blob {d} was fetched"
        );
    }
    assert_eq!(fake.manifest_gets("team/app", &img.amd.manifest.digest), 0);
    assert_eq!(fake.manifest_gets("team/app", &img.arm.manifest.digest), 1);
    let have = cached(dir.path());
    for d in blobs_of(&img.arm)
        .into_iter()
        .chain([img.arm.manifest.digest.clone(), img.index.digest.clone()])
    {
        assert!(have.contains(&hex(&d)), "{d} not cached");
    }

    fake.reset_counts();
    let r = cachalot(&[
        "prefetch",
        "--config",
        s(&cfg),
        "--platform",
        "linux/arm64",
        &reference,
    ])
    .await;
    assert!(r.ok, "{}\n{}", r.stdout, r.stderr);
    assert_eq!(fake.total(), 0, "second run: {:?}", fake.requests());
    assert!(r.stdout.contains("0 blobs fetched"), "{}", r.stdout);
    assert!(r.stdout.contains("3 already cached"), "{}", r.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_listed_and_successes_stay_cached() {
    let fake = FakeRegistry::start().await;
    let img = seed(&fake);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &fake.url(), false, "127.0.0.1:0", "");
    let good = format!("{UP}/team/app:single");
    let missing = format!("{UP}/team/nothing:1");

    // A reference naming an unconfigured registry stops the run before any request.
    let r = cachalot(&["prefetch", "--config", s(&cfg), &good, "quay.io/org/x:1"]).await;
    assert!(!r.ok);
    assert!(
        r.stderr.contains("\"quay.io\"") && r.stderr.contains("not configured"),
        "{}",
        r.stderr
    );
    assert_eq!(fake.total(), 0);
    let list = dir.path().join("list.txt");
    std::fs::write(&list, format!("# base images\n{good}\n\nNot/A:Ref\n")).unwrap();
    let r = cachalot(&["prefetch", "--config", s(&cfg), "--file", s(&list)]).await;
    assert!(!r.ok);
    assert!(r.stderr.contains("list.txt:4"), "{}", r.stderr);
    assert_eq!(fake.total(), 0);

    // A layer the upstream serves corrupted fails its image; the other image is cached.
    fake.corrupt(&img.arm.layers[0].0, true);
    let r = cachalot(&[
        "prefetch",
        "--config",
        s(&cfg),
        "--all-platforms",
        &good,
        &missing,
        &format!("{UP}/team/app:multi"),
    ])
    .await;
    assert!(!r.ok, "{}", r.stdout);
    assert!(r.stderr.contains("2 image(s) failed"), "{}", r.stderr);
    assert!(r.stderr.contains(&missing), "{}", r.stderr);
    assert!(r.stderr.contains(&img.arm.layers[0].0), "{}", r.stderr);
    assert!(r.stdout.contains(&format!("ok    {good}")), "{}", r.stdout);
    assert!(!cached(dir.path()).contains(&hex(&img.arm.layers[0].0)));

    fake.reset_counts();
    let r = cachalot(&["prefetch", "--config", s(&cfg), &good]).await;
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(fake.total(), 0, "{:?}", fake.requests());
    let _ = img.single;
}

/// Waits until something listens at `addr`.
async fn wait_up(addr: &str) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{addr} did not come up");
}

/// `http://127.0.0.1:<port>` where nothing listens.
fn refused_url() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("http://127.0.0.1:{port}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_drives_a_running_server_and_shares_its_fill() {
    let fake = FakeRegistry::start().await;
    let img = seed(&fake);
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let cfg = write_config(dir.path(), &fake.url(), false, &listen, "");
    let mut serve = tokio::process::Command::new(env!("CARGO_BIN_EXE_cachalot"))
        .args(["serve", "--config", s(&cfg)])
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base = format!("http://{listen}");
    wait_up(&listen).await;

    // A client starts the big layer; it pauses upstream until the prefetch has joined.
    let (layer, bytes) = img.single.layers[0].clone();
    let gate = fake.pause_blob(&layer, 4096);
    let client = TestClient::new();
    let url = format!("{base}/v2/team/app/blobs/{layer}");
    let pull = tokio::spawn({
        let client = client.clone();
        async move { client.get(&url).await }
    });
    gate.reached().await;
    let prefetch = tokio::spawn({
        let cfg = cfg.clone();
        async move {
            cachalot(&[
                "prefetch",
                "--config",
                s(&cfg),
                &format!("{UP}/team/app:single"),
            ])
            .await
        }
    });
    let metrics = format!("{base}/metrics");
    let coalesced = |text: &str| {
        metric_value(
            text,
            "cachalot_cache_lookups_total",
            &[("kind", "blob"), ("result", "coalesced")],
        )
    };
    let mut joined = false;
    for _ in 0..400 {
        if coalesced(&client.get(&metrics).await.text()) >= 1.0 {
            joined = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    gate.release();
    assert!(joined, "the prefetch never joined the server's fill");
    let r = prefetch.await.unwrap();
    assert!(r.ok, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("in use by a running cachalot"),
        "{}",
        r.stdout
    );
    let pulled = pull.await.unwrap();
    assert_eq!(pulled.status, 200);
    assert!(pulled.body == bytes);
    assert_eq!(
        fake.blob_gets("team/app", &layer),
        1,
        "one upstream fetch for both"
    );
    assert!(cached(dir.path()).contains(&hex(&layer)));

    // Import cannot share the cache with a running server, and says so.
    let r = cachalot(&[
        "import",
        "--config",
        s(&cfg),
        s(&dir.path().join("none.tar")),
    ])
    .await;
    assert!(!r.ok);
    assert!(
        r.stderr.contains("in use by a running cachalot"),
        "{}",
        r.stderr
    );
    let _ = serve.kill().await;
}

/// Rewrites a tar, letting `f` change or drop each entry (path, bytes).
fn rewrite(src: &Path, dst: &Path, mut f: impl FnMut(&str, Vec<u8>) -> Option<Vec<u8>>) {
    let mut ar = tar::Archive::new(std::fs::File::open(src).unwrap());
    let mut b = tar::Builder::new(std::fs::File::create(dst).unwrap());
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        let mut h = e.header().clone();
        if let Some(data) = f(&path, data) {
            h.set_size(data.len() as u64);
            h.set_cksum();
            b.append(&h, data.as_slice()).unwrap();
        }
    }
    b.finish().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_import_round_trip_and_corrupt_bundles_change_nothing() {
    let fake = FakeRegistry::start().await;
    let img = seed(&fake);
    let online = tempfile::tempdir().unwrap();
    let cfg = write_config(online.path(), &fake.url(), false, "127.0.0.1:0", "");
    let bundle = online.path().join("bundle.tar");
    let multi = format!("{UP}/team/app:multi");
    let single = format!("{UP}/team/app:single");
    let r = cachalot(&[
        "export",
        "--config",
        s(&cfg),
        "--output",
        s(&bundle),
        "--all-platforms",
        &multi,
        &single,
    ])
    .await;
    assert!(r.ok, "{}\n{}", r.stdout, r.stderr);
    // 1 index + 2 manifests + 2x(config + 2 layers) + single (manifest + config + layer).
    assert!(
        r.stdout.contains("wrote") && r.stdout.contains("12 blobs"),
        "{}",
        r.stdout
    );

    let site = tempfile::tempdir().unwrap();
    let site_cfg = write_config(site.path(), &refused_url(), true, "127.0.0.1:0", "");
    let variants = site.path();
    let arm_layer = img.arm.layers[1].0.clone();
    let flipped = variants.join("flipped.tar");
    rewrite(&bundle, &flipped, |p, mut d| {
        if p.ends_with(&hex(&arm_layer)) {
            d[100] ^= 1;
        }
        Some(d)
    });
    let missing = variants.join("missing.tar");
    rewrite(&bundle, &missing, |p, d| {
        (!p.ends_with(&hex(&arm_layer))).then_some(d)
    });
    let bad_index = variants.join("bad-index.tar");
    rewrite(&bundle, &bad_index, |p, d| {
        Some(if p == "index.json" {
            br#"{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.index.v1+json","digest":"sha256:zz","size":1}]}"#.to_vec()
        } else {
            d
        })
    });
    let truncated = variants.join("truncated.tar");
    let all = std::fs::read(&bundle).unwrap();
    std::fs::write(&truncated, &all[..all.len() - 30_000]).unwrap();

    for (file, needle) in [
        (
            &flipped,
            format!("{}: content does not match its digest", hex(&arm_layer)),
        ),
        (
            &missing,
            format!("layer {arm_layer} is missing from the bundle"),
        ),
        (&bad_index, "index.json".to_owned()),
        (&truncated, "truncated".to_owned()),
    ] {
        let r = cachalot(&["import", "--config", s(&site_cfg), s(file)]).await;
        assert!(!r.ok, "{} was accepted: {}", file.display(), r.stdout);
        assert!(
            r.stderr.contains(&needle),
            "{}: {}",
            file.display(),
            r.stderr
        );
        assert!(r.stderr.contains("nothing was loaded"), "{}", r.stderr);
        assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
        assert!(
            cached(site.path()).is_empty(),
            "{} left {:?}",
            file.display(),
            cached(site.path())
        );
        let meta = cachalot::storage::Meta::open(&site.path().join("cache/meta.redb")).unwrap();
        assert!(meta.tags(UP, "team/app", "multi").unwrap().is_empty());
        assert!(
            meta.manifest_type(&img.index.digest.parse().unwrap())
                .unwrap()
                .is_none()
        );
    }

    let r = cachalot(&["import", "--config", s(&site_cfg), s(&bundle)]).await;
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stdout.contains("12 blobs (12 new"), "{}", r.stdout);
    assert!(
        r.stdout.contains(&format!("tagged {multi}")),
        "{}",
        r.stdout
    );
    let r = cachalot(&["import", "--config", s(&site_cfg), s(&bundle)]).await;
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stdout.contains("12 blobs (0 new"), "{}", r.stdout);

    // The site serves it offline, by tag, with no upstream at all.
    fake.stop().await;
    fake.reset_counts();
    let toml = std::fs::read_to_string(&site_cfg).unwrap();
    let mut proxy = Proxy::start(&toml).await;
    let client = TestClient::new();
    let v2 = |p: &str| format!("{}/v2/{p}", proxy.url());
    let all_types = format!("{OCI_INDEX}, {OCI_MANIFEST}");
    let r = client
        .get_with(&v2("team/app/manifests/multi"), &[("accept", &all_types)])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, img.index.bytes);
    let r = client.get(&v2("team/app/manifests/single")).await;
    assert_eq!(r.body, img.single.manifest.bytes);
    for i in [&img.amd, &img.arm, &img.single] {
        for (d, bytes) in &i.layers {
            let r = client.get(&v2(&format!("team/app/blobs/{d}"))).await;
            assert_eq!(r.status, 200);
            assert!(r.body == *bytes);
        }
    }
    let r = client.get(&v2("team/app/manifests/absent")).await;
    assert_eq!(r.status, 404);
    assert!(
        r.error_message().unwrap_or_default().contains("offline"),
        "{}",
        r.text()
    );
    // The import linked the blobs to team/app, the repository the bundle names, and to no
    // other: named under another repository they are unknown.
    for (d, _) in &img.single.layers {
        let r = client.get(&v2(&format!("team/other/blobs/{d}"))).await;
        assert_eq!(r.status, 404, "{}", r.text());
        assert_eq!(r.error_code().as_deref(), Some("BLOB_UNKNOWN"));
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_refreshes_prefetch_lists_in_the_background() {
    let fake = FakeRegistry::start().await;
    let img = seed(&fake);
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "\n[[prefetch]]\nimages = [\"{UP}/team/app:multi\"]\nplatforms = [\"linux/amd64\"]\ninterval = \"1h\"\n"
    );
    let cfg = write_config(dir.path(), &fake.url(), false, "127.0.0.1:0", &extra);
    let mut proxy = Proxy::start(&std::fs::read_to_string(&cfg).unwrap()).await;
    let want: Vec<String> = blobs_of(&img.amd);
    let mut done = false;
    for _ in 0..200 {
        let have = cached(dir.path());
        if want.iter().all(|d| have.contains(&hex(d))) {
            done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        done,
        "the [[prefetch]] list was not fetched: {:?}",
        cached(dir.path())
    );
    for d in blobs_of(&img.arm) {
        assert_eq!(fake.blob_gets("team/app", &d), 0);
    }
    proxy.shutdown().await;

    // A bad [[prefetch]] entry is a config error naming it.
    let bad = write_config(
        dir.path(),
        &fake.url(),
        false,
        "127.0.0.1:0",
        "\n[[prefetch]]\nimages = [\"quay.io/x:1\"]\n",
    );
    let r = cachalot(&["check-config", "--config", s(&bad)]).await;
    assert!(!r.ok);
    assert!(
        r.stderr.contains("prefetch[0].images") && r.stderr.contains("quay.io"),
        "{}",
        r.stderr
    );
}

/// `export` without a platform option writes what the cache holds: an image prefetched with
/// every platform is exported whole (a plain export once kept only this machine's platform and
/// left an index whose other entries were missing, unreadable by `skopeo copy --all`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_export_writes_the_platforms_the_cache_holds() {
    let fake = FakeRegistry::start().await;
    let img = seed(&fake);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &fake.url(), false, "127.0.0.1:0", "");
    let multi = format!("{UP}/team/app:multi");
    let export = |name: &'static str| {
        let (cfg, bundle, multi) = (cfg.clone(), dir.path().join(name), multi.clone());
        async move {
            let r = cachalot(&[
                "export",
                "--config",
                s(&cfg),
                "--output",
                s(&bundle),
                &multi,
            ])
            .await;
            assert!(r.ok, "{}\n{}", r.stdout, r.stderr);
            r.stdout
        }
    };

    // Only arm64 is held: arm64 is what a plain export writes, and nothing of amd64 is fetched.
    let r = cachalot(&[
        "prefetch",
        "--config",
        s(&cfg),
        "--platform",
        "linux/arm64",
        &multi,
    ])
    .await;
    assert!(r.ok, "{}\n{}", r.stdout, r.stderr);
    fake.reset_counts();
    let out = export("arm.tar").await;
    // index + arm64 manifest + its config and 2 layers.
    assert!(
        out.contains("1 platform, 3 blobs") && out.contains("5 blobs"),
        "{out}"
    );
    assert!(out.contains("0 blobs fetched"), "{out}");
    for d in blobs_of(&img.amd) {
        assert_eq!(
            fake.blob_gets("team/app", &d),
            0,
            "amd64 blob {d} was fetched"
        );
    }

    // Every platform held: a plain export writes them all, fetching nothing.
    let r = cachalot(&["prefetch", "--config", s(&cfg), "--all-platforms", &multi]).await;
    assert!(r.ok, "{}\n{}", r.stdout, r.stderr);
    fake.reset_counts();
    let out = export("all.tar").await;
    // index + 2 manifests + 2 x (config + 2 layers).
    assert!(
        out.contains("2 platforms, 6 blobs") && out.contains("9 blobs"),
        "{out}"
    );
    assert!(out.contains("0 blobs fetched"), "{out}");
    for d in blobs_of(&img.amd).into_iter().chain(blobs_of(&img.arm)) {
        assert_eq!(
            fake.blob_gets("team/app", &d),
            0,
            "blob {d} was fetched again"
        );
    }

    // A cache that holds nothing of the image: this machine's platform, fetched.
    let fresh = tempfile::tempdir().unwrap();
    let fresh_cfg = write_config(fresh.path(), &fake.url(), false, "127.0.0.1:0", "");
    let bundle = fresh.path().join("host.tar");
    let r = cachalot(&[
        "export",
        "--config",
        s(&fresh_cfg),
        "--output",
        s(&bundle),
        &multi,
    ])
    .await;
    assert!(r.ok, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("1 platform, 3 blobs") && r.stdout.contains("3 blobs fetched"),
        "{}",
        r.stdout
    );
    let _ = img.index;
}

/// Writes `distinct` images straight into a cache at `root`, as prefetch would have left them:
/// each a manifest and a config of its own, with `layers` layers of its own plus one every
/// image shares. Returns `n` tags over them (`v<i>` names image `i % distinct`) as prefetch
/// does, for `export`.
fn synthetic(
    root: &Path,
    n: usize,
    distinct: usize,
    layers: usize,
) -> Vec<cachalot::airgap::prefetch::Prefetched> {
    use cachalot::oci::Digest;
    use cachalot::oci::descriptor::Descriptor;
    use std::collections::BTreeMap;
    let put = |bytes: &[u8]| {
        let d = Digest::sha256_of(bytes);
        let path = cachalot::storage::FsStore::blob_path_in(root, &d);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
        (d, bytes.len() as u64)
    };
    let desc = |media_type: &str, (digest, size): &(Digest, u64)| {
        format!(r#"{{"mediaType":"{media_type}","digest":"{digest}","size":{size}}}"#)
    };
    let shared = put(b"the layer every image shares");
    let images: Vec<_> = (0..distinct)
        .map(|i| {
            let config =
                put(format!(r#"{{"architecture":"amd64","os":"linux","i":{i}}}"#).as_bytes());
            let mut own: Vec<(Digest, u64)> = (0..layers)
                .map(|l| put(format!("image {i} layer {l}: {}", "x".repeat(200)).as_bytes()))
                .collect();
            own.push(shared.clone());
            let layer_json: Vec<String> = own
                .iter()
                .map(|l| desc("application/vnd.oci.image.layer.v1.tar", l))
                .collect();
            let manifest = format!(
                r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{},"layers":[{}]}}"#,
                desc("application/vnd.oci.image.config.v1+json", &config),
                layer_json.join(",")
            );
            let top = put(manifest.as_bytes());
            let mut blobs: BTreeMap<Digest, u64> = own.into_iter().collect();
            blobs.insert(config.0, config.1);
            cachalot::airgap::prefetch::Prefetched {
                image: cachalot::oci::ImageRef::parse(&format!("{UP}/team/app:v{i}")).unwrap(),
                top: Descriptor {
                    media_type: OCI_MANIFEST.to_owned(),
                    digest: top.0.clone(),
                    size: top.1,
                    platform: None,
                    annotations: BTreeMap::new(),
                },
                manifests: [(top.0, (OCI_MANIFEST.to_owned(), top.1))].into(),
                blobs,
                referrers: Vec::new(),
                platforms: 1,
            }
        })
        .collect();
    (0..n)
        .map(|i| {
            let mut p = images[i % distinct].clone();
            p.image = cachalot::oci::ImageRef::parse(&format!("{UP}/team/app:v{i}")).unwrap();
            p
        })
        .collect()
}

/// The tar entries of a bundle, in order.
fn entries(bundle: &Path) -> Vec<String> {
    let mut ar = tar::Archive::new(std::fs::File::open(bundle).unwrap());
    ar.entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect()
}

/// Files in a cache's `tmp/`, however deep.
fn temp_files(dir: &Path) -> usize {
    walkdir_count(&dir.join("cache/tmp"))
}

fn walkdir_count(p: &Path) -> usize {
    std::fs::read_dir(p)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            if e.path().is_dir() {
                walkdir_count(&e.path())
            } else {
                1
            }
        })
        .sum()
}

/// What `export` writes, `import` reads: 20,000 images make an `index.json` of about 6 MB,
/// which an import once refused (after staging every blob). And a bundle with one corrupt blob,
/// the last one in it, loads nothing: no tag, no manifest, no file. The 20,000 tags name 4,000
/// distinct images (8,001 objects), to keep the test's files few on a shared disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_images_export_and_import_and_one_bad_blob_loads_nothing() {
    const N: usize = 20_000;
    const DISTINCT: usize = 4_000;
    let src = tempfile::tempdir().unwrap();
    let images = synthetic(src.path(), N, DISTINCT, 0);
    let bundle = src.path().join("big.tar");
    let written = cachalot::airgap::bundle::export(src.path(), &images, &bundle).unwrap();
    assert_eq!(written.blobs, 2 * DISTINCT + 1);
    let index_len = {
        let mut ar = tar::Archive::new(std::fs::File::open(&bundle).unwrap());
        let e = ar
            .entries()
            .unwrap()
            .map(|e| e.unwrap())
            .find(|e| e.path().unwrap().to_str() == Some("index.json"));
        e.unwrap().header().size().unwrap()
    };
    assert!(index_len > 4 << 20, "index.json is only {index_len} bytes");

    let site = tempfile::tempdir().unwrap();
    let cfg = write_config(site.path(), &refused_url(), true, "127.0.0.1:0", "");
    let last_blob = entries(&bundle)
        .into_iter()
        .rfind(|p| p.starts_with("blobs/sha256/"))
        .unwrap();
    let bad = site.path().join("bad.tar");
    rewrite(&bundle, &bad, |p, mut d| {
        if p == last_blob {
            d[0] ^= 1;
        }
        Some(d)
    });
    let r = cachalot(&["import", "--config", s(&cfg), s(&bad)]).await;
    assert!(!r.ok, "{}", r.stdout);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains(&last_blob)
            && r.stderr.contains("content does not match its digest")
            && r.stderr.contains("nothing was loaded"),
        "{}",
        r.stderr
    );
    assert!(
        cached(site.path()).is_empty(),
        "{:?}",
        cached(site.path()).len()
    );
    assert_eq!(temp_files(site.path()), 0);
    {
        let meta = cachalot::storage::Meta::open(&site.path().join("cache/meta.redb")).unwrap();
        assert!(meta.tags(UP, "team/app", "v0").unwrap().is_empty());
        assert!(meta.manifest_type(&images[0].top.digest).unwrap().is_none());
        assert!(meta.objects().unwrap().is_empty());
    }

    let started = std::time::Instant::now();
    let r = cachalot(&["import", "--config", s(&cfg), s(&bundle)]).await;
    assert!(r.ok, "{}", r.stderr);
    let took = started.elapsed();
    assert!(
        r.stdout
            .contains(&format!("{0} blobs ({0} new", 2 * DISTINCT + 1))
            && r.stdout
                .contains(&format!("{DISTINCT} manifests, {N} tags")),
        "{}",
        r.stdout.lines().last().unwrap_or_default()
    );
    eprintln!("imported {N} images in {took:?}");
    assert_eq!(temp_files(site.path()), 0);
    let meta = cachalot::storage::Meta::open(&site.path().join("cache/meta.redb")).unwrap();
    for i in [0, N / 2, N - 1] {
        let tags = meta.tags(UP, "team/app", &format!("v{i}")).unwrap();
        assert_eq!(tags.len(), 1, "v{i}");
        assert_eq!(tags[0].digest, images[i].top.digest);
        for d in images[i].blobs.keys() {
            assert!(meta.linked(UP, "team/app", d).unwrap(), "v{i} {d}");
        }
    }
    assert_eq!(meta.objects().unwrap().len(), 2 * DISTINCT + 1);
}

/// A crash after the files were placed but before the metadata commit leaves no tag and no
/// manifest recorded; importing again places and records it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_before_the_commit_leaves_no_half_import() {
    let src = tempfile::tempdir().unwrap();
    let images = synthetic(src.path(), 50, 50, 2);
    let bundle = src.path().join("b.tar");
    cachalot::airgap::bundle::export(src.path(), &images, &bundle).unwrap();
    let site = tempfile::tempdir().unwrap();
    let cfg = write_config(site.path(), &refused_url(), true, "127.0.0.1:0", "");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_cachalot"))
        .args(["import", "--config", s(&cfg), s(&bundle)])
        .env("CACHALOT_CRASH_POINT", "import-before-commit")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    // 50 x (manifest, config, 2 layers) and the shared layer, placed but not recorded.
    assert_eq!(cached(site.path()).len(), 201);
    {
        let meta = cachalot::storage::Meta::open(&site.path().join("cache/meta.redb")).unwrap();
        for i in [0, 49] {
            assert!(
                meta.tags(UP, "team/app", &format!("v{i}"))
                    .unwrap()
                    .is_empty()
            );
            assert!(meta.manifest_type(&images[i].top.digest).unwrap().is_none());
        }
        assert!(meta.objects().unwrap().is_empty());
        assert!(meta.links().unwrap().is_empty());
    }
    let r = cachalot(&["import", "--config", s(&cfg), s(&bundle)]).await;
    assert!(r.ok, "{}", r.stderr);
    // Opening the cache adopted the placed files (unverified; the import hashed them whole),
    // so the bundle's blobs were all held already and only its records were missing.
    assert!(r.stdout.contains("201 blobs (0 new"), "{}", r.stdout);
    let meta = cachalot::storage::Meta::open(&site.path().join("cache/meta.redb")).unwrap();
    assert_eq!(meta.objects().unwrap().len(), 201);
    assert_eq!(
        meta.tags(UP, "team/app", "v49").unwrap()[0].digest,
        images[49].top.digest
    );
}
