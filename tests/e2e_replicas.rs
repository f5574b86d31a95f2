//! End to end, against the real things: cachalot replicas as separate processes over one 3-node
//! Garage (replication factor 3) on loopback, in front of Debian's `docker-registry` with token
//! auth. What a user of a replicated mirror counts on: a blob and a tag are fetched from the
//! upstream once whichever replica is asked, a replica with an empty `cache.dir` serves the
//! shared cache at once, the owner of a blob dying mid-fill costs its peers' clients nothing,
//! and a Garage node dying costs no cached pull.
//!
//! Upstream requests are counted from the registry's own log, one `response completed` line per
//! request it answered, with method, path, status, bytes written and user agent. That is exact
//! where the replicas' `cachalot_upstream_requests_total` is not: it counts by op (a blob HEAD
//! and GET alike) and dies with a killed replica.
//!
//! The cases share one Garage, one registry and one set of replicas, since each start costs
//! seconds; they run in an order where each leaves the next a cluster it can reason about.
//!
//! Needs `docker-registry`, `skopeo` and `garage`: without them the test prints why and skips,
//! unless `CI` is set, in which case it fails.

mod e2e_support;

use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use e2e_support::garage::Garage;
use e2e_support::oci::{self, CONFIG_V1, LAYER_TAR_GZIP, MANIFEST_V1, REF_NAME};
use e2e_support::registry::{Distribution, free_port};
use e2e_support::{IssuerConfig, TokenIssuer, http, skopeo, tools};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use sha2::{Digest as _, Sha256};

const REPO: &str = "e2e/replicas";
/// The image most cases pull: a config, one large layer and two small ones.
const TAG: &str = "v1";
/// An image of one huge layer, left cold until the owner of that layer is killed mid-fill.
const HUGE_TAG: &str = "huge";
/// Large enough for a multipart upload into the bucket (parts are 8 MiB).
const BIG: usize = 24 << 20;
/// Large enough that the owner's fill is still going when the other replicas' clients have
/// their first bytes.
const HUGE: usize = 64 << 20;
const UPSTREAM_NAME: &str = "reg.test";
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

const S3_KEY_ID_ENV: &str = "CACHALOT_E2E_S3_KEY_ID";
const S3_SECRET_ENV: &str = "CACHALOT_E2E_S3_SECRET";
const CLUSTER_SECRET_ENV: &str = "CACHALOT_E2E_CLUSTER_SECRET";
const UPSTREAM_PASSWORD_ENV: &str = "CACHALOT_E2E_UPSTREAM_PASSWORD";
const CLUSTER_SECRET: &str = "the e2e replicas' shared secret";

/// How long a replica may take to answer `/readyz`, and the cluster to see its members live.
const START_LIMIT: Duration = Duration::from_secs(30);
/// How long one download may take, headers to last byte.
const DOWNLOAD_LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_over_garage_fetch_once_start_warm_and_survive_a_dead_owner_and_node() {
    require_e2e_tools!();
    tools::sweep_stale_tempdirs();
    let Some(garage) = Garage::start(3).await else {
        return;
    };
    let mut s = Setup::start(garage).await;

    thirty_cold_gets_over_three_replicas_make_one_upstream_get(&s).await;
    a_tag_pulled_through_one_replica_is_served_by_the_others(&s).await;
    a_fourth_replica_with_an_empty_cache_dir_serves_the_image_without_upstream(&mut s).await;
    // The irreversible failures last, the Garage node after the replica: the node killed is the
    // one the dead replica used as its endpoint, so every live replica keeps its own endpoint
    // and what is tested is the store losing a node, not a replica losing its only way in.
    the_owner_killed_mid_fill_leaves_the_other_replicas_clients_with_correct_blobs(&mut s).await;
    with_a_garage_node_killed_every_replica_still_serves_the_image(&mut s).await;
}

// === the cases ===

async fn thirty_cold_gets_over_three_replicas_make_one_upstream_get(s: &Setup) {
    let big = &s.image.layers[0];
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let url = s.blob_url(i % 3, big);
            tokio::spawn(async move { Download::get(&url, &[]).await })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let got = task
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("client {i} (replica {}): {e}", i % 3));
        got.assert_is(big, &format!("client {i} (replica {})", i % 3));
    }
    let path = format!("/v2/{REPO}/blobs/{}", big.digest);
    assert_eq!(
        s.upstream_fetches(&path, 1).await,
        ["GET 200"],
        "upstream requests for the blob: {:?}",
        s.upstream_requests(&path)
    );
}

async fn a_tag_pulled_through_one_replica_is_served_by_the_others(s: &Setup) {
    for i in 0..3 {
        let got = Download::get(&s.manifest_url(i), &[("accept", MANIFEST_ACCEPT)])
            .await
            .unwrap_or_else(|e| panic!("replica {i}: {e}"));
        got.assert_is(&s.image.manifest, &format!("manifest by tag, replica {i}"));
        assert_eq!(
            got.header("docker-content-digest"),
            s.image.manifest.digest,
            "replica {i}"
        );
    }
    let path = format!("/v2/{REPO}/manifests/");
    let fetched = s.upstream_fetches(&path, 1).await;
    assert_eq!(
        fetched.len(),
        1,
        "upstream manifest requests: {:?}",
        s.upstream_requests(&path)
    );
}

async fn a_fourth_replica_with_an_empty_cache_dir_serves_the_image_without_upstream(s: &mut Setup) {
    // The rest of the image (config, small layers) through one replica; their owners fill them.
    for blob in s.image.blobs().skip(1) {
        let got = Download::get(&s.blob_url(0, blob), &[]).await.unwrap();
        got.assert_is(blob, "pulled through replica 0");
    }
    // An owner may still be completing the bucket's copy of a blob it served.
    for i in 0..3 {
        s.replicas[i].wait_no_fills().await;
    }
    let before = s.cachalot_requests().len();

    // It knows the three, and they do not know it: it asks them, they never ask it.
    let mut peers = s.peers.clone();
    peers.push(Setup::peer(s.fourth_port));
    let node = s.fourth_node;
    let fourth = s.spawn_replica(s.fourth_port, node, &peers);
    fourth.wait_ready().await;
    fourth.wait_live(4).await;
    s.replicas.push(fourth);

    s.pull_image(3).await;
    let after = s.cachalot_requests();
    assert_eq!(
        after.len(),
        before,
        "the new replica's pull reached the upstream: {:?}",
        &after[before..]
    );
    let upstream = s.replicas[3]
        .metric("cachalot_upstream_requests_total", &[])
        .await;
    assert_eq!(upstream, 0.0, "the fourth replica counts upstream requests");
}

async fn the_owner_killed_mid_fill_leaves_the_other_replicas_clients_with_correct_blobs(
    s: &mut Setup,
) {
    let huge = s.huge.layers[0].clone();
    let owner = s.huge_owner;
    let others: Vec<usize> = (0..3).filter(|i| *i != owner).collect();
    // Two clients on each replica that does not own the blob: each replica asks the owner.
    let urls: Vec<(usize, String)> = others
        .iter()
        .flat_map(|&i| [(i, s.blob_url(i, &huge)), (i, s.blob_url(i, &huge))])
        .collect();
    let started = futures_util::future::join_all(urls.iter().map(|(i, url)| async move {
        let mut d = Download::start(url, &[]).await?;
        d.first_bytes().await?;
        Ok::<_, String>((*i, d))
    }))
    .await;
    let started: Vec<(usize, Download)> = started
        .into_iter()
        .map(|d| d.unwrap_or_else(|e| panic!("{e}")))
        .collect();
    s.replicas[owner].kill();

    let ends = futures_util::future::join_all(
        started
            .into_iter()
            .map(|(i, d)| async move { (i, d.finish().await) }),
    )
    .await;
    for (i, got) in ends {
        let got = got.unwrap_or_else(|e| panic!("a client of replica {i}: {e}"));
        got.assert_is(&huge, &format!("a client of replica {i}"));
    }
    let mut fallbacks = 0.0;
    for &i in &others {
        fallbacks += s.replicas[i]
            .metric("cachalot_fill_source_fallbacks_total", &[("from", "peer")])
            .await;
    }
    let path = format!("/v2/{REPO}/blobs/{}", huge.digest);
    let upstream = s.upstream_requests(&path);
    // Only the owner's connection to the upstream died, so a cut answer is the owner's.
    assert!(
        upstream
            .iter()
            .any(|l| l.method == "GET" && l.status == 200 && l.written < huge.len),
        "the owner had read the whole blob from the upstream before it was killed: {upstream:?}"
    );
    assert!(
        fallbacks >= 1.0,
        "no replica's fill went on from the upstream after the owner died: the owner had \
         sent them the whole blob before (upstream requests: {upstream:?})"
    );
}

async fn with_a_garage_node_killed_every_replica_still_serves_the_image(s: &mut Setup) {
    let dead = s.huge_owner;
    s.garage.kill(dead);
    let live: Vec<usize> = (0..s.replicas.len()).filter(|i| *i != dead).collect();
    // Garage's first request that touches the dead node stalls until a ping finds it gone
    // (2-9 s). A bucket read that waits longer than the replicas' read deadline (3 s) goes to
    // the upstream instead, by design: so the first pass asks only for correct bytes, and the
    // second, once Garage has noticed, that nothing comes from the upstream.
    let deadline = Instant::now() + Duration::from_secs(60);
    for &i in &live {
        s.pull_image_until(i, deadline).await;
    }
    let before = s.cachalot_requests().len();
    for &i in &live {
        s.pull_image_until(i, deadline).await;
    }
    // Every live replica may have served from its own disk: a replica with an empty cache.dir
    // (the fourth, on a new volume) has only the degraded bucket to serve from.
    let fourth = &mut s.replicas[3];
    fourth.kill();
    fourth.wipe_cache();
    fourth.spawn();
    fourth.wait_ready().await;
    fourth.wait_live(3).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    s.pull_image_until(3, deadline).await;
    let upstream_after = s.cachalot_requests().len();
    let from_bucket = s.replicas[3]
        .metric("cachalot_cache_lookups_total", &[("result", "bucket")])
        .await;
    assert!(
        from_bucket >= 1.0,
        "the restarted replica served nothing from the bucket"
    );
    // Cached content: served from the replicas' disks, their peers and (for the fourth, on its
    // new volume) the degraded bucket, not passed through from the upstream, once Garage has
    // noticed its dead node.
    let after = s.cachalot_requests();
    assert_eq!(
        upstream_after,
        before,
        "with a Garage node dead, cached content came from the upstream: {:?}",
        &after[before..]
    );
}

// === the cluster under test ===

struct Setup {
    garage: Garage,
    _issuer: TokenIssuer,
    registry: Distribution,
    image: Image,
    huge: Image,
    /// The three replicas' URLs, as every config lists them.
    peers: Vec<String>,
    replicas: Vec<Replica>,
    /// Which of the three owns the huge layer.
    huge_owner: usize,
    fourth_port: u16,
    /// The Garage node the fourth replica talks to: not the one killed.
    fourth_node: usize,
    _layout: tempfile::TempDir,
}

impl Setup {
    async fn start(garage: Garage) -> Setup {
        let issuer = TokenIssuer::start(IssuerConfig::default()).await;
        let registry = Distribution::start(&issuer).await;
        let layout = tools::tempdir("replicas-layout");
        let mut images = write_layout(
            layout.path(),
            &[(TAG, &[BIG, 30_000, 150_000]), (HUGE_TAG, &[HUGE])],
        )
        .into_iter();
        let (image, huge) = (images.next().unwrap(), images.next().unwrap());
        for tag in [TAG, HUGE_TAG] {
            push(layout.path(), tag, &registry).await;
        }

        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let peers: Vec<String> = ports.iter().map(|p| Setup::peer(*p)).collect();
        let members: Vec<&str> = peers.iter().map(String::as_str).collect();
        let huge_owner = cachalot::cluster::owner_of(&members, &huge.layers[0].digest)
            .expect("the peers are URLs");
        let mut s = Setup {
            garage,
            _issuer: issuer,
            registry,
            image,
            huge,
            peers,
            replicas: Vec::new(),
            huge_owner,
            fourth_port: free_port(),
            fourth_node: (huge_owner + 1) % 3,
            _layout: layout,
        };
        // Spread over the Garage nodes: replica i talks to node i.
        for (i, port) in ports.into_iter().enumerate() {
            let r = s.spawn_replica(port, i, &s.peers.clone());
            s.replicas.push(r);
        }
        for r in &s.replicas {
            r.wait_ready().await;
        }
        for r in &s.replicas {
            r.wait_live(3).await;
        }
        s
    }

    fn peer(port: u16) -> String {
        format!("http://127.0.0.1:{port}")
    }

    fn spawn_replica(&self, port: u16, node: usize, peers: &[String]) -> Replica {
        let dir = tools::tempdir("replica");
        let config = format!(
            r#"[server]
listen = "127.0.0.1:{port}"

[cache]
dir = {cache:?}

[[upstream]]
name = "{UPSTREAM_NAME}"
url = "{registry}"
default = true
username = "{user}"
password_env = "{UPSTREAM_PASSWORD_ENV}"

[storage]
backend = "s3"
endpoint = "{endpoint}"
bucket = "{bucket}"
region = "{region}"
access_key_id_env = "{S3_KEY_ID_ENV}"
secret_access_key_env = "{S3_SECRET_ENV}"

[cluster]
peers = {peers:?}
self = "{me}"
secret_env = "{CLUSTER_SECRET_ENV}"
"#,
            cache = dir.path().join("cache"),
            registry = self.registry.url(),
            user = e2e_support::USER,
            endpoint = self.garage.endpoint(node),
            bucket = self.garage.bucket(),
            region = self.garage.region(),
            me = Setup::peer(port),
        );
        std::fs::write(dir.path().join("config.toml"), config).unwrap();
        let mut r = Replica {
            port,
            dir,
            supervisor: None,
            stdin: None,
        };
        r.spawn();
        r
    }

    fn blob_url(&self, replica: usize, blob: &Blob) -> String {
        format!(
            "{}/v2/{REPO}/blobs/{}",
            self.replicas[replica].url(),
            blob.digest
        )
    }

    fn manifest_url(&self, replica: usize) -> String {
        format!("{}/v2/{REPO}/manifests/{TAG}", self.replicas[replica].url())
    }

    /// The manifest by tag and every blob of the image through `replica`, each checked.
    async fn pull_image(&self, replica: usize) {
        let got = Download::get(&self.manifest_url(replica), &[("accept", MANIFEST_ACCEPT)])
            .await
            .unwrap_or_else(|e| panic!("replica {replica}: {e}"));
        got.assert_is(
            &self.image.manifest,
            &format!("manifest, replica {replica}"),
        );
        for blob in self.image.blobs() {
            let got = Download::get(&self.blob_url(replica, blob), &[])
                .await
                .unwrap_or_else(|e| panic!("replica {replica}: {e}"));
            got.assert_is(blob, &format!("replica {replica}"));
        }
    }

    /// [`Setup::pull_image`], retrying what fails (an error status, a cut body) until
    /// `deadline`; a whole body with wrong bytes fails at once.
    async fn pull_image_until(&self, replica: usize, deadline: Instant) {
        let mut wanted = vec![(self.manifest_url(replica), &self.image.manifest, true)];
        wanted.extend(
            self.image
                .blobs()
                .map(|b| (self.blob_url(replica, b), b, false)),
        );
        for (url, want, manifest) in wanted {
            let headers: &[(&str, &str)] = if manifest {
                &[("accept", MANIFEST_ACCEPT)]
            } else {
                &[]
            };
            loop {
                let why = match Download::get(&url, headers).await {
                    Ok(got) if got.status == 200 && got.len == want.len => {
                        got.assert_is(want, &format!("replica {replica}"));
                        break;
                    }
                    Ok(got) => format!("status {}, {} bytes", got.status, got.len),
                    Err(e) => e,
                };
                assert!(
                    Instant::now() < deadline,
                    "replica {replica} did not serve {url} in time: {why}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    /// The registry's log of requests from cachalot (its user agent), in order.
    fn cachalot_requests(&self) -> Vec<Logged> {
        parse_registry_log(&self.registry.log())
            .into_iter()
            .filter(|l| l.agent.starts_with("cachalot/"))
            .collect()
    }

    /// cachalot's requests for paths starting with `path`.
    fn upstream_requests(&self, path: &str) -> Vec<Logged> {
        self.cachalot_requests()
            .into_iter()
            .filter(|l| l.path.starts_with(path))
            .collect()
    }

    /// cachalot's requests for paths starting with `path` that were answered, as `"METHOD
    /// status"`: the 401s of the token challenge, answered before a token is fetched, are left
    /// out. The registry logs a request once its response is written, which may follow the
    /// client's last byte by a moment, so this waits (5 s at most) for `at_least` of them.
    async fn upstream_fetches(&self, path: &str, at_least: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let fetches: Vec<String> = self
                .upstream_requests(path)
                .into_iter()
                .filter(|l| l.status != 401)
                .map(|l| format!("{} {}", l.method, l.status))
                .collect();
            if fetches.len() >= at_least || Instant::now() > deadline {
                return fetches;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

// === images ===

#[derive(Clone, Debug)]
struct Blob {
    digest: String,
    len: u64,
}

struct Image {
    manifest: Blob,
    config: Blob,
    layers: Vec<Blob>,
}

impl Image {
    /// Layers first, the config last: the large layer is the first one.
    fn blobs(&self) -> impl Iterator<Item = &Blob> {
        self.layers.iter().chain(std::iter::once(&self.config))
    }
}

/// Writes an OCI image layout holding one single-platform image per `(tag, layer sizes)`: layers
/// of random bytes (real tar+gzip, so skopeo copies them unchanged) and a config.
fn write_layout(dir: &Path, images: &[(&str, &[usize])]) -> Vec<Image> {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let put = |bytes: &[u8]| -> Blob {
        let digest = oci::sha256_digest(bytes);
        std::fs::write(blobs.join(&digest["sha256:".len()..]), bytes).unwrap();
        Blob {
            digest,
            len: bytes.len() as u64,
        }
    };
    let descriptor = |media_type: &str, b: &Blob| json!({"mediaType": media_type, "digest": b.digest, "size": b.len});
    let mut out = Vec::new();
    let mut index = Vec::new();
    for (tag, sizes) in images {
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        for (i, size) in sizes.iter().enumerate() {
            let tar = oci::tar_one_file(&format!("{tag}-{i}.bin"), &random_bytes(*size));
            diff_ids.push(oci::sha256_digest(&tar));
            layers.push(put(&oci::gzip_stored(&tar)));
        }
        let config = put(&serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"comment": format!("cachalot e2e replicas {}", oci::random_u64())}],
        }))
        .unwrap());
        let manifest = put(&serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_V1,
            "config": descriptor(CONFIG_V1, &config),
            "layers": layers.iter().map(|l| descriptor(LAYER_TAR_GZIP, l)).collect::<Vec<_>>(),
        }))
        .unwrap());
        let mut entry = descriptor(MANIFEST_V1, &manifest);
        entry["annotations"] = json!({REF_NAME: tag});
        index.push(entry);
        out.push(Image {
            manifest,
            config,
            layers,
        });
    }
    let index = json!({"schemaVersion": 2, "manifests": index});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    out
}

/// `len` random bytes from the system's generator (`oci::random_bytes` hashes 32 bytes at a
/// time in unoptimized test code: seconds for the 88 MiB written here).
fn random_bytes(len: usize) -> Vec<u8> {
    use ring::rand::SecureRandom as _;
    let mut bytes = vec![0u8; len];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("system randomness");
    bytes
}

/// `skopeo copy` of `tag` from the layout to [`REPO`] on the registry, digests kept.
async fn push(layout: &Path, tag: &str, registry: &Distribution) {
    let src = format!("oci:{}:{tag}", layout.display());
    let dst = format!("docker://{}/{REPO}:{tag}", registry.host());
    let creds = format!("{}:{}", e2e_support::USER, e2e_support::PASSWORD);
    skopeo::run_ok(&[
        "--insecure-policy",
        "copy",
        "--quiet",
        "--preserve-digests",
        "--dest-tls-verify=false",
        "--dest-creds",
        &creds,
        &src,
        &dst,
    ])
    .await;
}

// === a replica process ===

/// One `cachalot serve --config` process under a `sh` supervisor that SIGKILLs it when its stdin
/// closes, so that it dies with the test process even when that aborts; killed on drop.
struct Replica {
    port: u16,
    /// `config.toml`, `cachalot.log`, `cachalot.pid` and the cache directory `cache/`.
    dir: tempfile::TempDir,
    supervisor: Option<Child>,
    stdin: Option<ChildStdin>,
}

const SUPERVISOR: &str = r#"
"$CACHALOT_SUPERVISED_BIN" serve --config "$1" >>"$2" 2>&1 &
pid=$!
echo "$pid" >"$3"
cat >/dev/null
kill -9 "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
exit 0
"#;

impl Replica {
    fn url(&self) -> String {
        Setup::peer(self.port)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts the process (again) from its config file, with the secrets in its environment.
    fn spawn(&mut self) {
        let _ = std::fs::remove_file(self.path("cachalot.pid"));
        let mut supervisor = Command::new("sh")
            .arg("-c")
            .arg(SUPERVISOR)
            .arg("sh")
            .arg(self.path("config.toml"))
            .arg(self.path("cachalot.log"))
            .arg(self.path("cachalot.pid"))
            .env("CACHALOT_SUPERVISED_BIN", env!("CARGO_BIN_EXE_cachalot"))
            .env(S3_KEY_ID_ENV, e2e_support::garage::KEY_ID)
            .env(S3_SECRET_ENV, e2e_support::garage::SECRET)
            .env(CLUSTER_SECRET_ENV, CLUSTER_SECRET)
            .env(UPSTREAM_PASSWORD_ENV, e2e_support::PASSWORD)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sh supervising cachalot");
        self.stdin = supervisor.stdin.take();
        self.supervisor = Some(supervisor);
    }

    fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.path("cachalot.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn exited(&self) -> bool {
        // A killed process stays a zombie until the supervisor reaps it: its state says so.
        self.pid().is_some_and(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
                stat.rsplit_once(')')
                    .is_some_and(|(_, s)| s.starts_with(" Z"))
            })
        })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("cachalot.log")).unwrap_or_default()
    }

    /// Polls `/readyz` until it answers 200; panics with the log when the process exits or
    /// [`START_LIMIT`] passes.
    async fn wait_ready(&self) {
        let started = Instant::now();
        let url = format!("{}/readyz", self.url());
        loop {
            if let Ok(r) = http::request(hyper::Method::GET, &url, &[]).await
                && r.status == 200
            {
                return;
            }
            assert!(
                !self.exited(),
                "replica on port {} exited; its log:\n{}",
                self.port,
                self.log()
            );
            assert!(
                started.elapsed() < START_LIMIT,
                "replica on port {} not ready within {START_LIMIT:?}; its log:\n{}",
                self.port,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls `/metrics` until the replica takes `n` members (itself included) for live.
    async fn wait_live(&self, n: usize) {
        let started = Instant::now();
        loop {
            let live = self.metric("cachalot_cluster_peers_live", &[]).await;
            if live == n as f64 {
                return;
            }
            assert!(
                started.elapsed() < START_LIMIT,
                "replica on port {} sees {live} live members, want {n}; its log:\n{}",
                self.port,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls until no fill (nor the bucket copy a fill completes before it ends) is running.
    async fn wait_no_fills(&self) {
        let started = Instant::now();
        while self.metric("cachalot_fills_in_flight", &[]).await > 0.0 {
            assert!(
                started.elapsed() < START_LIMIT,
                "replica on port {}: fills never ended",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sum of the samples of `name` carrying `labels`.
    async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let url = format!("{}/metrics", self.url());
        let r = http::request(hyper::Method::GET, &url, &[])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status, 200, "GET {url}");
        http::metric_sum(&String::from_utf8_lossy(&r.body), name, labels)
    }

    /// SIGKILL, as a crash would: connections drop mid-response. Returns once the port refuses
    /// connections.
    fn kill(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
        self.stop();
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            assert!(
                Instant::now() < deadline,
                "replica on port {} still accepts connections 5s after SIGKILL",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Closes the supervisor's stdin (it SIGKILLs the process) and reaps it.
    fn stop(&mut self) {
        self.stdin.take();
        if let Some(mut supervisor) = self.supervisor.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = supervisor.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Some(pid) = self.pid() {
                let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            }
            let _ = supervisor.kill();
            let _ = supervisor.wait();
        }
    }

    /// Empties the cache directory, as a new volume would be.
    fn wipe_cache(&self) {
        let cache = self.path("cache");
        std::fs::remove_dir_all(&cache).unwrap();
        std::fs::create_dir_all(&cache).unwrap();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.stop();
    }
}

// === downloads ===

/// A response being read: its body hashed as it arrives, never held whole.
struct Download {
    url: String,
    status: u16,
    headers: hyper::HeaderMap,
    body: Incoming,
    hasher: Sha256,
    len: u64,
    deadline: tokio::time::Instant,
    // The connection's pool lives as long as the body is read.
    _client: Client<HttpConnector, Empty<Bytes>>,
}

/// A whole response, by the SHA-256 of its body.
#[derive(Debug)]
struct Got {
    status: u16,
    len: u64,
    digest: String,
    headers: hyper::HeaderMap,
}

impl Got {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// A 200 whose body is exactly `want`'s bytes.
    fn assert_is(&self, want: &Blob, what: &str) {
        assert_eq!(self.status, 200, "{what}: {}", want.digest);
        assert_eq!(self.len, want.len, "{what}: length of {}", want.digest);
        assert_eq!(self.digest, want.digest, "{what}: wrong bytes");
    }
}

impl Download {
    /// Sends a GET and waits for the response headers.
    async fn start(url: &str, headers: &[(&str, &str)]) -> Result<Download, String> {
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let mut req = hyper::Request::get(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Empty::new()).map_err(|e| e.to_string())?;
        let deadline = tokio::time::Instant::now() + DOWNLOAD_LIMIT;
        let resp = tokio::time::timeout_at(deadline, client.request(req))
            .await
            .map_err(|_| format!("GET {url}: no response within {DOWNLOAD_LIMIT:?}"))?
            .map_err(|e| format!("GET {url}: {e:?}"))?;
        let (parts, body) = resp.into_parts();
        Ok(Download {
            url: url.to_owned(),
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
            hasher: Sha256::new(),
            len: 0,
            deadline,
            _client: client,
        })
    }

    /// Reads one more frame; `false` at the end of the body.
    async fn next(&mut self) -> Result<bool, String> {
        let frame = tokio::time::timeout_at(self.deadline, self.body.frame())
            .await
            .map_err(|_| format!("GET {}: body not read within {DOWNLOAD_LIMIT:?}", self.url))?;
        match frame {
            None => Ok(false),
            Some(Err(e)) => Err(format!(
                "GET {}: body cut after {} bytes: {e}",
                self.url, self.len
            )),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    self.hasher.update(&data);
                    self.len += data.len() as u64;
                }
                Ok(true)
            }
        }
    }

    /// Reads until some of the body has arrived.
    async fn first_bytes(&mut self) -> Result<(), String> {
        while self.len == 0 {
            if !self.next().await? {
                return Err(format!("GET {}: empty body ({})", self.url, self.status));
            }
        }
        Ok(())
    }

    /// Reads the rest of the body.
    async fn finish(mut self) -> Result<Got, String> {
        while self.next().await? {}
        Ok(Got {
            status: self.status,
            len: self.len,
            digest: format!("sha256:{}", hex::encode(self.hasher.finalize())),
            headers: self.headers,
        })
    }

    async fn get(url: &str, headers: &[(&str, &str)]) -> Result<Got, String> {
        Download::start(url, headers).await?.finish().await
    }
}

// === the registry's log ===

/// One request the registry answered.
#[derive(Clone, Debug)]
struct Logged {
    method: String,
    path: String,
    status: u16,
    /// Body bytes sent.
    written: u64,
    agent: String,
}

/// The `response completed` lines (logrus text format: `key=value`, the value quoted when it
/// holds anything but plain characters) of distribution's log, in order.
fn parse_registry_log(log: &str) -> Vec<Logged> {
    log.lines()
        .filter(|l| l.contains("msg=\"response completed"))
        .filter_map(|line| {
            let field = |key: &str| logrus_field(line, key);
            Some(Logged {
                method: field("http.request.method")?,
                path: field("http.request.uri")?,
                status: field("http.response.status")?.parse().ok()?,
                written: field("http.response.written")
                    .and_then(|w| w.parse().ok())
                    .unwrap_or(0),
                agent: field("http.request.useragent").unwrap_or_default(),
            })
        })
        .collect()
}

fn logrus_field(line: &str, key: &str) -> Option<String> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[at..];
    if let Some(quoted) = rest.strip_prefix('"') {
        let mut value = String::new();
        let mut chars = quoted.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => value.push(chars.next()?),
                '"' => return Some(value),
                c => value.push(c),
            }
        }
        None
    } else {
        Some(rest.split(' ').next().unwrap_or("").to_owned())
    }
}
