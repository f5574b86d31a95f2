//! Replicas over one S3-compatible store (issue 13), measured against their baselines in one run:
//! a 3-node Garage (replication factor 3) on loopback, Debian's `docker-registry` (no auth) seeded
//! with one image of `LAYERS` random layers, and cachalot replicas as in-process servers.
//!
//! `cargo bench --bench replicas` (release; about a minute once built): 4 layers of 32 MiB.
//! Without `--bench` (as `cargo test --all-targets` runs it): a smoke run, 4 layers of 1 MiB,
//! one round.
//! Needs `docker-registry` and `garage` (see `tests/e2e_support/garage.rs`); without them it
//! says so and skips, unless `CI` is set. Exits 1 when a body is wrong, a status is not 200, or
//! a figure did not measure what it says (a "bucket" read that did not come from the bucket).
//!
//! The figures (MB = 10^6 bytes; every figure is a median over rounds whose order rotates, so
//! drifting background load hits each alike):
//! 1. Cached-blob throughput: per round, the `LAYERS` layers fetched at once (one GET each),
//!    bytes / wall time, from (a) a replica over the bucket holding them in its cache dir, (b) a
//!    new replica over the bucket with an empty cache dir, which must read them from the bucket
//!    (a new one every round: after its first read a blob is local), (c) an `fs` cachalot
//!    holding them, (d) the bucket itself (`cachalot::storage::Bucket`, the same S3 client the
//!    replicas use). (a)/(c) is what the bucket costs a hit (about 1.0 expected); (b)/(d) is
//!    what going through a replica costs a read from the bucket (local write, verification).
//!    Clients count bytes without hashing here: (a) and (c) served the same bodies checked
//!    when they were filled, and a replica verifies what it reads from the bucket.
//! 2. Cold-pull time of the whole image, as a client pulls (manifest by tag, config, then the
//!    layers at once; every body hashed and checked): (c) straight from `docker-registry`, (f)
//!    through one `fs` cachalot, (a) through one replica over the bucket, no cluster; (c3) three
//!    clients at once straight from the registry, (e) through three independent `fs` replicas,
//!    one client each, (b) through three replicas in a cluster, one client each, all at once.
//!    Every round starts with new replicas, new cache dirs and a new key prefix in the bucket
//!    (an empty cache). Each row gives its ratios to the rows it is compared with, and the CPU
//!    seconds spent from the start of the pull until the replicas settled (their bucket copies
//!    complete), by this process (replicas and clients), Garage's nodes and the registry.
//! 3. Upstream bytes per pulled byte: the sum of `cachalot_upstream_bytes_total` over the
//!    replicas of a cold pull divided by the image's distinct bytes (manifest, config, layers):
//!    about 1.0 for (b), the point of the cluster, against about 3.0 for (e).
//!
//! Everything runs on this machine: the clients and replicas in this process, Garage's three
//! nodes and the registry beside them. On a small machine they compete for the same cores, so a
//! pull over the bucket also waits for Garage's CPU (see its column), which a real deployment
//! runs elsewhere; absolute figures move with other load, and the ratios are what to read.

#[path = "../tests/e2e_support/mod.rs"]
mod e2e_support;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cachalot::config::{Backend, Config, StorageConfig};
use cachalot::metrics::Metrics;
use cachalot::oci::Digest;
use cachalot::storage::Bucket;
use e2e_support::garage::Garage;
use e2e_support::registry::{Distribution, RegistryOptions, free_port};
use e2e_support::{http as support_http, oci, tools};
use futures_util::StreamExt;
use futures_util::future::try_join_all;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sha2::{Digest as _, Sha256};

const REPO: &str = "bench/replicas";
const TAG: &str = "v1";
const UPSTREAM_NAME: &str = "reg.test";
const LAYERS: usize = 4;
const MANIFEST_V1: &str = "application/vnd.oci.image.manifest.v1+json";
/// Bounds a broken run, not a measurement.
const REQUEST_LIMIT: Duration = Duration::from_secs(120);
const SETTLE_LIMIT: Duration = Duration::from_secs(60);

type Res<T> = Result<T, String>;
type HttpClient = Client<HttpConnector, Full<Bytes>>;

struct Mode {
    full: bool,
    layer_bytes: usize,
    throughput_rounds: usize,
    pull_rounds: usize,
}

fn main() -> ExitCode {
    let full = std::env::args().any(|a| a == "--bench");
    let mode = if full {
        Mode {
            full,
            layer_bytes: 32 << 20,
            throughput_rounds: 9,
            pull_rounds: 5,
        }
    } else {
        Mode {
            full,
            layer_bytes: 1 << 20,
            throughput_rounds: 1,
            pull_rounds: 1,
        }
    };
    if tools::find_in_path("docker-registry").is_none() {
        let msg = "replicas bench: no docker-registry in PATH (apt-get install docker-registry)";
        if tools::under_ci() {
            eprintln!("{msg}; CI is set, so this is a failure");
            return ExitCode::FAILURE;
        }
        println!("{msg}; skipping");
        return ExitCode::SUCCESS;
    }
    tools::sweep_stale_tempdirs();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(&mode)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("replicas bench failed: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(mode: &Mode) -> Res<()> {
    let cpu_before = CpuTimes::read();
    println!(
        "replicas bench: {} mode, {LAYERS} layers x {} MiB",
        if mode.full { "full" } else { "smoke" },
        mode.layer_bytes >> 20
    );
    println!(
        "machine: nproc {}, sha_ni {}, load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if has_sha_ni() { "yes" } else { "no" },
        load_average()
    );
    let started = Instant::now();
    let Some(garage) = Garage::start(3).await else {
        return Ok(()); // Garage::start said why
    };
    let registry = Distribution::start_with(RegistryOptions::default()).await;
    let image = Image::push(&registry.url(), mode.layer_bytes).await?;
    let secrets = Secrets::write()?;
    let env = Env {
        garage,
        registry,
        image,
        secrets,
    };
    println!(
        "setup: Garage x3, docker-registry seeded with {:.1} MB in {:.1}s",
        mb(env.image.total_bytes()),
        started.elapsed().as_secs_f64()
    );

    let throughput = throughput(&env, mode.throughput_rounds).await?;
    let pulls = cold_pulls(&env, mode.pull_rounds).await?;
    let steal = cpu_before
        .zip(CpuTimes::read())
        .map(|(a, b)| b.steal_since(&a));
    print_table(&env, &throughput, &pulls, steal);
    println!("total run time {:.0}s", started.elapsed().as_secs_f64());
    Ok(())
}

// === the environment ===

struct Env {
    garage: Garage,
    registry: Distribution,
    image: Image,
    secrets: Secrets,
}

/// Files holding the bucket's key and the cluster secret, as the replicas' configs name them.
struct Secrets {
    dir: tempfile::TempDir,
}

impl Secrets {
    fn write() -> Res<Secrets> {
        let dir = tools::tempdir("bench-secrets");
        let files = [
            ("s3-key-id", e2e_support::garage::KEY_ID),
            ("s3-secret", e2e_support::garage::SECRET),
            ("cluster-secret", "the replica bench's cluster secret"),
        ];
        for (name, value) in files {
            std::fs::write(dir.path().join(name), value).map_err(|e| format!("{name}: {e}"))?;
        }
        Ok(Secrets { dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Env {
    /// `[storage]` of the bucket under `prefix`, reached through Garage node `node`.
    fn storage(&self, node: usize, prefix: &str) -> StorageConfig {
        StorageConfig {
            backend: Backend::S3,
            endpoint: Some(self.garage.endpoint(node)),
            bucket: Some(self.garage.bucket().to_owned()),
            region: Some(self.garage.region().to_owned()),
            prefix: Some(prefix.to_owned()),
            access_key_id_file: Some(self.secrets.path("s3-key-id")),
            secret_access_key_file: Some(self.secrets.path("s3-secret")),
            ..StorageConfig::default()
        }
    }

    fn bucket(&self, node: usize, prefix: &str) -> Res<Bucket> {
        Bucket::connect(&self.storage(node, prefix), Arc::new(Metrics::new(&[])))
            .map_err(|e| format!("bucket: {e}"))
    }

    /// How many of the image's layers the bucket under `prefix` holds whole.
    async fn layers_in_bucket(&self, prefix: &str) -> Res<usize> {
        let bucket = self.bucket(0, prefix)?;
        let mut n = 0;
        for l in &self.image.layers {
            if bucket.head(&l.parsed()?).await.map_err(|e| e.to_string())? == Some(l.len) {
                n += 1;
            }
        }
        Ok(n)
    }
}

// === the image ===

#[derive(Clone)]
struct Blob {
    digest: String,
    len: u64,
}

impl Blob {
    fn of(bytes: &[u8]) -> Blob {
        Blob {
            digest: oci::sha256_digest(bytes),
            len: bytes.len() as u64,
        }
    }

    fn parsed(&self) -> Res<Digest> {
        self.digest
            .parse()
            .map_err(|e| format!("{}: {e}", self.digest))
    }
}

struct Image {
    manifest: Bytes,
    config: Blob,
    layers: Vec<Blob>,
}

impl Image {
    /// Builds an image of [`LAYERS`] random layers and pushes it to the registry at `base`
    /// through the distribution API (monolithic uploads, then the manifest by tag).
    async fn push(base: &str, layer_bytes: usize) -> Res<Image> {
        let client = client();
        let mut layers = Vec::new();
        for _ in 0..LAYERS {
            // Layers are opaque to the registry and to cachalot: random bytes will do.
            let bytes = Bytes::from(oci::random_bytes(layer_bytes));
            let blob = Blob::of(&bytes);
            push_blob(&client, base, &blob, bytes).await?;
            layers.push(blob);
        }
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []},
            "history": [{"comment": format!("cachalot replica bench {}", oci::random_u64())}],
        }))
        .map_err(|e| e.to_string())?;
        let config_blob = Blob::of(&config);
        push_blob(&client, base, &config_blob, Bytes::from(config)).await?;
        let descriptor = |media_type: &str, b: &Blob| serde_json::json!({"mediaType": media_type, "digest": b.digest, "size": b.len});
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_V1,
            "config": descriptor("application/vnd.oci.image.config.v1+json", &config_blob),
            "layers": layers
                .iter()
                .map(|l| descriptor("application/vnd.oci.image.layer.v1.tar+gzip", l))
                .collect::<Vec<_>>(),
        }))
        .map_err(|e| e.to_string())?;
        let url = format!("{base}/v2/{REPO}/manifests/{TAG}");
        let resp = send(
            &client,
            hyper::Request::put(&url)
                .header("content-type", MANIFEST_V1)
                .body(Full::new(Bytes::from(manifest.clone()))),
        )
        .await?;
        if resp.status() != 201 {
            return Err(format!("PUT {url}: {}", resp.status()));
        }
        Ok(Image {
            manifest: Bytes::from(manifest),
            config: config_blob,
            layers,
        })
    }

    /// Distinct bytes a pull moves: the manifest, the config and every layer.
    fn total_bytes(&self) -> u64 {
        self.manifest.len() as u64
            + self.config.len
            + self.layers.iter().map(|l| l.len).sum::<u64>()
    }

    fn layer_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.len).sum()
    }
}

async fn push_blob(client: &HttpClient, base: &str, blob: &Blob, bytes: Bytes) -> Res<()> {
    let url = format!("{base}/v2/{REPO}/blobs/uploads/");
    let resp = send(client, hyper::Request::post(&url).body(Full::default())).await?;
    let location = resp
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .filter(|_| resp.status() == 202)
        .ok_or_else(|| format!("POST {url}: {} without a Location", resp.status()))?;
    let mut put = if location.starts_with('/') {
        format!("{base}{location}")
    } else {
        location.to_owned()
    };
    put.push(if put.contains('?') { '&' } else { '?' });
    put.push_str(&format!("digest={}", blob.digest));
    let resp = send(
        client,
        hyper::Request::put(&put)
            .header("content-type", "application/octet-stream")
            .body(Full::new(bytes)),
    )
    .await?;
    if resp.status() != 201 {
        return Err(format!("PUT {put}: {}", resp.status()));
    }
    Ok(())
}

// === HTTP ===

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn send(
    client: &HttpClient,
    req: Result<hyper::Request<Full<Bytes>>, hyper::http::Error>,
) -> Res<hyper::Response<hyper::body::Incoming>> {
    let req = req.map_err(|e| e.to_string())?;
    let what = format!("{} {}", req.method(), req.uri());
    tokio::time::timeout(REQUEST_LIMIT, client.request(req))
        .await
        .map_err(|_| format!("{what}: no answer within {REQUEST_LIMIT:?}"))?
        .map_err(|e| format!("{what}: {e:?}"))
}

/// GETs `url` and reads the whole body, hashing it when `check` is set; fails unless the status
/// is 200 and the body is `want`'s length (and digest).
async fn get_blob(client: &HttpClient, url: &str, want: &Blob, check: bool) -> Res<()> {
    let resp = send(client, hyper::Request::get(url).body(Full::default())).await?;
    if resp.status() != 200 {
        return Err(format!("GET {url}: {}", resp.status()));
    }
    let mut body = resp.into_body();
    let mut hasher = check.then(Sha256::new);
    let mut len = 0u64;
    let deadline = tokio::time::Instant::now() + REQUEST_LIMIT;
    while let Some(frame) = tokio::time::timeout_at(deadline, body.frame())
        .await
        .map_err(|_| format!("GET {url}: body not read within {REQUEST_LIMIT:?}"))?
    {
        let frame = frame.map_err(|e| format!("GET {url}: body cut after {len} bytes: {e}"))?;
        if let Ok(data) = frame.into_data() {
            len += data.len() as u64;
            if let Some(h) = &mut hasher {
                h.update(&data);
            }
        }
    }
    if len != want.len {
        return Err(format!("GET {url}: {len} bytes, want {}", want.len));
    }
    if let Some(h) = hasher {
        let got = format!("sha256:{}", hex::encode(h.finalize()));
        if got != want.digest {
            return Err(format!("GET {url}: wrong bytes ({got})"));
        }
    }
    Ok(())
}

/// Pulls the image from `base` as a client does: the manifest by tag (checked), the config,
/// then every layer at once, each body hashed and checked.
async fn pull(base: &str, image: &Image) -> Res<()> {
    let client = client();
    let url = format!("{base}/v2/{REPO}/manifests/{TAG}");
    let resp = send(
        &client,
        hyper::Request::get(&url)
            .header("accept", MANIFEST_V1)
            .body(Full::default()),
    )
    .await?;
    if resp.status() != 200 {
        return Err(format!("GET {url}: {}", resp.status()));
    }
    let manifest = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?
        .to_bytes();
    if manifest != image.manifest {
        return Err(format!("GET {url}: not the pushed manifest"));
    }
    let blob_url = |b: &Blob| format!("{base}/v2/{REPO}/blobs/{}", b.digest);
    get_blob(&client, &blob_url(&image.config), &image.config, true).await?;
    try_join_all(
        image
            .layers
            .iter()
            .map(|l| async { get_blob(&client, &blob_url(l), l, true).await }),
    )
    .await?;
    Ok(())
}

// === replicas ===

/// One in-process cachalot with its own cache dir.
struct Replica {
    server: cachalot::server::Server,
    url: String,
    _dir: tempfile::TempDir,
}

/// What a replica is: where it listens, and its `[storage]` and `[cluster]`.
struct Spec<'a> {
    /// 0: any.
    port: u16,
    /// Garage node and key prefix; `None`: `backend = "fs"`.
    bucket: Option<(usize, &'a str)>,
    /// Every member's URL; this replica is `http://127.0.0.1:<port>`.
    cluster: Option<&'a [String]>,
}

impl Replica {
    async fn start(env: &Env, spec: Spec<'_>) -> Res<Replica> {
        let dir = tools::tempdir("bench-replica");
        let mut toml = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n\n[cache]\ndir = {cache:?}\n\n\
             [[upstream]]\nname = \"{UPSTREAM_NAME}\"\nurl = \"{registry}\"\ndefault = true\n",
            port = spec.port,
            cache = dir.path().join("cache"),
            registry = env.registry.url(),
        );
        if let Some((node, prefix)) = spec.bucket {
            let s = env.storage(node, prefix);
            toml.push_str(&format!(
                "\n[storage]\nbackend = \"s3\"\nendpoint = {:?}\nbucket = {:?}\nregion = {:?}\n\
                 prefix = {:?}\naccess_key_id_file = {:?}\nsecret_access_key_file = {:?}\n",
                s.endpoint.unwrap_or_default(),
                s.bucket.unwrap_or_default(),
                s.region.unwrap_or_default(),
                prefix,
                env.secrets.path("s3-key-id"),
                env.secrets.path("s3-secret"),
            ));
        }
        if let Some(peers) = spec.cluster {
            toml.push_str(&format!(
                "\n[cluster]\npeers = {peers:?}\nself = \"http://127.0.0.1:{}\"\nsecret_file = {:?}\n",
                spec.port,
                env.secrets.path("cluster-secret"),
            ));
        }
        let config = Config::from_toml_str(&toml).map_err(|e| format!("{e}\n{toml}"))?;
        let server = cachalot::server::spawn(config)
            .await
            .map_err(|e| format!("cachalot::server::spawn: {e}\n{toml}"))?;
        Ok(Replica {
            url: format!("http://{}", server.local_addr()),
            server,
            _dir: dir,
        })
    }

    /// `count` replicas in one cluster over the bucket under `prefix`, replica i talking to
    /// Garage node i % 3; returns once each sees all of them live.
    async fn cluster(env: &Env, count: usize, prefix: &str) -> Res<Vec<Replica>> {
        let ports: Vec<u16> = (0..count).map(|_| free_port()).collect();
        let peers: Vec<String> = ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect();
        let mut replicas = Vec::new();
        for (i, port) in ports.into_iter().enumerate() {
            let spec = Spec {
                port,
                bucket: Some((i % 3, prefix)),
                cluster: Some(&peers),
            };
            replicas.push(Replica::start(env, spec).await?);
        }
        for r in &replicas {
            r.wait_for("cachalot_cluster_peers_live", |v| v == count as f64)
                .await?;
        }
        Ok(replicas)
    }

    async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Res<f64> {
        let url = format!("{}/metrics", self.url);
        let r = support_http::request(hyper::Method::GET, &url, &[]).await?;
        if r.status != 200 {
            return Err(format!("GET {url}: {}", r.status));
        }
        Ok(support_http::metric_sum(
            &String::from_utf8_lossy(&r.body),
            name,
            labels,
        ))
    }

    async fn wait_for(&self, name: &str, done: impl Fn(f64) -> bool) -> Res<()> {
        let deadline = Instant::now() + SETTLE_LIMIT;
        loop {
            let v = self.metric(name, &[]).await?;
            if done(v) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("{}: {name} stays at {v}", self.url));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until no fill, nor the bucket copy a fill completes before it ends, is running:
    /// background work of one measurement must not spill into the next.
    async fn settle(&self) -> Res<()> {
        self.wait_for("cachalot_fills_in_flight", |v| v == 0.0)
            .await
    }

    async fn upstream_bytes(&self) -> Res<f64> {
        self.metric("cachalot_upstream_bytes_total", &[]).await
    }

    async fn stop(self) {
        self.server.shutdown().await;
    }
}

// === 1. cached-blob throughput ===

#[derive(Clone, Copy, PartialEq)]
enum Source {
    S3Local,
    S3Bucket,
    Fs,
    Direct,
}

impl Source {
    const ALL: [Source; 4] = [
        Source::S3Local,
        Source::S3Bucket,
        Source::Fs,
        Source::Direct,
    ];
}

/// Median MB/s per [`Source`], in [`Source::ALL`] order, with each round's figures.
struct Throughput {
    rounds: Vec<Vec<f64>>,
}

impl Throughput {
    fn median(&self, s: Source) -> f64 {
        let i = Source::ALL.iter().position(|x| *x == s).unwrap_or(0);
        median(&self.rounds[i])
    }
}

const TP_PREFIX: &str = "bench-throughput";

async fn throughput(env: &Env, rounds: usize) -> Res<Throughput> {
    // (a): it fills the bucket (and itself) from the upstream; (c): it fills itself.
    let s3_local = Replica::start(
        env,
        Spec {
            port: 0,
            bucket: Some((0, TP_PREFIX)),
            cluster: None,
        },
    )
    .await?;
    let fs = Replica::start(
        env,
        Spec {
            port: 0,
            bucket: None,
            cluster: None,
        },
    )
    .await?;
    for r in [&s3_local, &fs] {
        pull(&r.url, &env.image).await?;
        r.settle().await?;
    }
    let in_bucket = env.layers_in_bucket(TP_PREFIX).await?;
    if in_bucket != LAYERS {
        return Err(format!(
            "after a pull through a replica the bucket holds {in_bucket} of {LAYERS} layers"
        ));
    }
    let direct = env.bucket(0, TP_PREFIX)?;
    let mut figures = vec![Vec::new(); Source::ALL.len()];
    for round in 0..rounds {
        for k in 0..Source::ALL.len() {
            let i = (k + round) % Source::ALL.len();
            let secs = match Source::ALL[i] {
                Source::S3Local => get_layers(&s3_local.url, &env.image).await?,
                Source::Fs => get_layers(&fs.url, &env.image).await?,
                Source::S3Bucket => from_a_new_replica(env).await?,
                Source::Direct => read_bucket(&direct, &env.image).await?,
            };
            figures[i].push(mb(env.image.layer_bytes()) / secs);
        }
    }
    s3_local.stop().await;
    fs.stop().await;
    Ok(Throughput { rounds: figures })
}

/// Seconds to GET every layer from `base`, all at once.
async fn get_layers(base: &str, image: &Image) -> Res<f64> {
    let client = client();
    let started = Instant::now();
    try_join_all(image.layers.iter().map(|l| {
        let url = format!("{base}/v2/{REPO}/blobs/{}", l.digest);
        let client = &client;
        async move { get_blob(client, &url, l, false).await }
    }))
    .await?;
    Ok(started.elapsed().as_secs_f64())
}

/// [`get_layers`] from a replica started with an empty cache dir, which must read them from the
/// bucket; checked by its lookups.
async fn from_a_new_replica(env: &Env) -> Res<f64> {
    let r = Replica::start(
        env,
        Spec {
            port: 0,
            bucket: Some((0, TP_PREFIX)),
            cluster: None,
        },
    )
    .await?;
    let secs = get_layers(&r.url, &env.image).await?;
    let from_bucket = r
        .metric(
            "cachalot_cache_lookups_total",
            &[("kind", "blob"), ("result", "bucket")],
        )
        .await?;
    r.settle().await?;
    r.stop().await;
    if from_bucket != LAYERS as f64 {
        return Err(format!(
            "a replica with an empty cache dir read {from_bucket} of {LAYERS} layers from the bucket"
        ));
    }
    Ok(secs)
}

/// Seconds to read every layer straight from the bucket, all at once.
async fn read_bucket(bucket: &Bucket, image: &Image) -> Res<f64> {
    let started = Instant::now();
    try_join_all(image.layers.iter().map(|l| async move {
        let read = bucket
            .get(&l.parsed()?, None)
            .await
            .map_err(|e| format!("bucket GET {}: {e}", l.digest))?
            .ok_or_else(|| format!("bucket GET {}: not there", l.digest))?;
        let mut body = read.body;
        let mut len = 0u64;
        while let Some(chunk) = body.next().await {
            len += chunk
                .map_err(|e| format!("bucket GET {}: {e}", l.digest))?
                .len() as u64;
        }
        if len != l.len {
            return Err(format!(
                "bucket GET {}: {len} bytes, want {}",
                l.digest, l.len
            ));
        }
        Ok(())
    }))
    .await?;
    Ok(started.elapsed().as_secs_f64())
}

// === 2 and 3. cold pulls ===

#[derive(Clone, Copy, PartialEq)]
enum Pull {
    Direct,
    Direct3,
    OneS3,
    ThreeCluster,
    ThreeFs,
    OneFs,
}

impl Pull {
    const ALL: [Pull; 6] = [
        Pull::Direct,
        Pull::Direct3,
        Pull::OneS3,
        Pull::ThreeCluster,
        Pull::ThreeFs,
        Pull::OneFs,
    ];

    fn tag(self) -> &'static str {
        match self {
            Pull::Direct => "direct",
            Pull::Direct3 => "direct3",
            Pull::OneS3 => "one",
            Pull::ThreeCluster => "three",
            Pull::ThreeFs => "threefs",
            Pull::OneFs => "onefs",
        }
    }
}

/// One cold pull's figures.
#[derive(Clone, Default)]
struct PullRun {
    secs: f64,
    /// Upstream bytes over every replica / the image's distinct bytes.
    upstream_ratio: Option<f64>,
    /// Layers the bucket held whole once the replicas settled.
    in_bucket: Option<usize>,
    /// CPU seconds from the start of the pull until the replicas settled.
    cpu: CpuUse,
}

struct Pulls {
    runs: Vec<Vec<PullRun>>,
}

impl Pulls {
    fn of(&self, p: Pull) -> &[PullRun] {
        let i = Pull::ALL.iter().position(|x| *x == p).unwrap_or(0);
        &self.runs[i]
    }

    fn secs(&self, p: Pull) -> f64 {
        median(&self.of(p).iter().map(|r| r.secs).collect::<Vec<_>>())
    }

    fn upstream_ratio(&self, p: Pull) -> Vec<f64> {
        self.of(p).iter().filter_map(|r| r.upstream_ratio).collect()
    }
}

async fn cold_pulls(env: &Env, rounds: usize) -> Res<Pulls> {
    let procs = Procs::find();
    let mut runs = vec![Vec::new(); Pull::ALL.len()];
    for round in 0..rounds {
        for k in 0..Pull::ALL.len() {
            let i = (k + round) % Pull::ALL.len();
            let p = Pull::ALL[i];
            let prefix = format!("bench-pull-{round}-{}", p.tag());
            runs[i].push(cold_pull(env, &procs, p, &prefix).await?);
        }
    }
    Ok(Pulls { runs })
}

async fn cold_pull(env: &Env, procs: &Procs, p: Pull, prefix: &str) -> Res<PullRun> {
    let registry = env.registry.url();
    let replicas = match p {
        Pull::Direct | Pull::Direct3 => Vec::new(),
        Pull::OneS3 => vec![
            Replica::start(
                env,
                Spec {
                    port: 0,
                    bucket: Some((0, prefix)),
                    cluster: None,
                },
            )
            .await?,
        ],
        Pull::ThreeCluster => Replica::cluster(env, 3, prefix).await?,
        Pull::ThreeFs | Pull::OneFs => {
            let mut v = Vec::new();
            for _ in 0..if p == Pull::OneFs { 1 } else { 3 } {
                let spec = Spec {
                    port: 0,
                    bucket: None,
                    cluster: None,
                };
                v.push(Replica::start(env, spec).await?);
            }
            v
        }
    };
    let bases: Vec<&str> = match p {
        Pull::Direct => vec![registry.as_str()],
        Pull::Direct3 => vec![registry.as_str(); 3],
        _ => replicas.iter().map(|r| r.url.as_str()).collect(),
    };
    let cpu_before = procs.cpu();
    let started = Instant::now();
    try_join_all(bases.iter().map(|b| pull(b, &env.image))).await?;
    let secs = started.elapsed().as_secs_f64();
    let mut run = PullRun {
        secs,
        ..PullRun::default()
    };
    if replicas.is_empty() {
        run.cpu = procs.cpu().since(&cpu_before);
    } else {
        let mut upstream = 0.0;
        for r in &replicas {
            r.settle().await?;
            upstream += r.upstream_bytes().await?;
        }
        run.cpu = procs.cpu().since(&cpu_before);
        run.upstream_ratio = Some(upstream / env.image.total_bytes() as f64);
        if matches!(p, Pull::OneS3 | Pull::ThreeCluster) {
            run.in_bucket = Some(env.layers_in_bucket(prefix).await?);
        }
    }
    for r in replicas {
        r.stop().await;
    }
    Ok(run)
}

// === the table ===

fn print_table(env: &Env, tp: &Throughput, pulls: &Pulls, steal: Option<f64>) {
    let layers = LAYERS;
    let layer_mib = env.image.layers[0].len >> 20;
    let tp_rounds = tp.rounds[0].len();
    println!();
    println!(
        "1. Cached-blob throughput: {layers} x {layer_mib} MiB layers, {layers} GETs at once, \
         MB/s, median of {tp_rounds} rounds"
    );
    let (a, b, c, d) = (
        tp.median(Source::S3Local),
        tp.median(Source::S3Bucket),
        tp.median(Source::Fs),
        tp.median(Source::Direct),
    );
    let rounds = |s: Source| {
        let i = Source::ALL.iter().position(|x| *x == s).unwrap_or(0);
        tp.rounds[i]
            .iter()
            .map(|v| format!("{v:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let rows = [
        (
            "(a) s3 replica, in its cache dir",
            a,
            String::new(),
            Source::S3Local,
        ),
        (
            "(b) s3 replica, empty cache dir",
            b,
            format!("(b)/(d) {:.2}x", b / d),
            Source::S3Bucket,
        ),
        (
            "(c) fs cachalot, in its cache dir",
            c,
            format!("(a)/(c) {:.2}x", a / c),
            Source::Fs,
        ),
        (
            "(d) bucket GET, no replica",
            d,
            String::new(),
            Source::Direct,
        ),
    ];
    for (what, v, ratio, s) in rows {
        println!(
            "   {what:<38} {v:>7.0} MB/s  {ratio:<15} rounds: {}",
            rounds(s)
        );
    }

    let pull_rounds = pulls.of(Pull::Direct).len();
    println!();
    println!(
        "2. Cold pull of the image ({:.1} MB), seconds, median of {pull_rounds} rounds",
        mb(env.image.total_bytes())
    );
    /// A row: what, which pull, and the baselines it is a ratio to.
    type Row<'a> = (&'a str, Pull, &'a [(&'a str, Pull)]);
    let rows: [Row; 6] = [
        ("(c)  docker-registry, 1 client", Pull::Direct, &[]),
        (
            "(f)  1 fs replica, 1 client",
            Pull::OneFs,
            &[("c", Pull::Direct)],
        ),
        (
            "(a)  1 s3 replica, 1 client",
            Pull::OneS3,
            &[("c", Pull::Direct), ("f", Pull::OneFs)],
        ),
        (
            "(c3) docker-registry, 3 clients",
            Pull::Direct3,
            &[("c", Pull::Direct)],
        ),
        (
            "(e)  3 fs replicas, no cluster, 3 clients",
            Pull::ThreeFs,
            &[("c", Pull::Direct), ("c3", Pull::Direct3)],
        ),
        (
            "(b)  3 s3 replicas in a cluster, 3 clients",
            Pull::ThreeCluster,
            &[
                ("c", Pull::Direct),
                ("c3", Pull::Direct3),
                ("e", Pull::ThreeFs),
            ],
        ),
    ];
    println!(
        "   {:<43} {:>7}  {:<34} {:<17} rounds (s)",
        "", "median", "ratios", "CPU s: this/G/R"
    );
    for (what, p, baselines) in rows {
        let secs = pulls.secs(p);
        let ratios: Vec<String> = baselines
            .iter()
            .map(|(name, b)| format!("{:.2}x ({name})", secs / pulls.secs(*b)))
            .collect();
        let runs = pulls.of(p);
        let cpu =
            |f: fn(&CpuUse) -> f64| median(&runs.iter().map(|r| f(&r.cpu)).collect::<Vec<_>>());
        let cpu = format!(
            "{:.1}/{:.1}/{:.1}",
            cpu(|c| c.this),
            cpu(|c| c.garage),
            cpu(|c| c.registry)
        );
        let each: Vec<String> = runs.iter().map(|r| format!("{:.2}", r.secs)).collect();
        println!(
            "   {what:<43} {secs:>5.2} s  {:<34} {cpu:<17} {}",
            ratios.join(", "),
            each.join(" ")
        );
    }
    for (what, p) in [("(a)", Pull::OneS3), ("(b)", Pull::ThreeCluster)] {
        let whole: Vec<String> = pulls
            .of(p)
            .iter()
            .filter_map(|r| r.in_bucket)
            .map(|n| format!("{n}/{LAYERS}"))
            .collect();
        println!(
            "   {what}: layers whole in the bucket once settled, per round: {}",
            whole.join(" ")
        );
    }

    println!();
    println!("3. Upstream bytes per pulled byte (sum over the replicas / distinct image bytes)");
    for (what, p) in [
        ("(a) 1 s3 replica", Pull::OneS3),
        ("(b) 3 s3 replicas in a cluster", Pull::ThreeCluster),
        ("(e) 3 fs replicas, no cluster", Pull::ThreeFs),
        ("(f) 1 fs replica", Pull::OneFs),
    ] {
        let each = pulls.upstream_ratio(p);
        let shown: Vec<String> = each.iter().map(|v| format!("{v:.3}")).collect();
        println!(
            "   {what:<38} {:>6.3}   rounds: {}",
            median(&each),
            shown.join(" ")
        );
    }
    println!();
    println!(
        "machine: nproc {}, sha_ni {}, load average now {}, CPU steal during the run {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if has_sha_ni() { "yes" } else { "no" },
        load_average(),
        steal.map_or("unknown".to_owned(), |s| format!("{:.0}%", s * 100.0)),
    );
}

// === numbers and the machine ===

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn has_sha_ni() -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
        c.lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "sha_ni"))
    })
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// The processes a cold pull's CPU time is counted in: this one (the replicas and the clients),
/// Garage's nodes and the registry; the last two found by their command lines (the binary's
/// name, and a path under this process's temp dirs).
#[derive(Default)]
struct Procs {
    garage: Vec<u32>,
    registry: Vec<u32>,
}

/// CPU seconds (user + system).
#[derive(Clone, Copy, Default)]
struct CpuUse {
    this: f64,
    garage: f64,
    registry: f64,
}

impl Procs {
    fn find() -> Procs {
        let me = std::process::id();
        let ours = |args: &[String], dir: &str| {
            let mark = format!("/{dir}-{me}-");
            args.iter().any(|a| a.contains(&mark))
        };
        let mut procs = Procs::default();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return procs;
        };
        for entry in entries.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let bin = args
                .first()
                .and_then(|a| Path::new(a).file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            // The `sh` supervisors name the same files; only the binaries themselves count.
            if bin == "garage" && args.iter().any(|a| a == "server") && ours(&args, "garage") {
                procs.garage.push(pid);
            } else if bin == "docker-registry" && ours(&args, "registry") {
                procs.registry.push(pid);
            }
        }
        procs
    }

    fn cpu(&self) -> CpuUse {
        let sum = |pids: &[u32]| pids.iter().map(|p| cpu_seconds(&p.to_string())).sum();
        CpuUse {
            this: cpu_seconds("self"),
            garage: sum(&self.garage),
            registry: sum(&self.registry),
        }
    }
}

impl CpuUse {
    fn since(&self, earlier: &CpuUse) -> CpuUse {
        CpuUse {
            this: self.this - earlier.this,
            garage: self.garage - earlier.garage,
            registry: self.registry - earlier.registry,
        }
    }
}

/// utime + stime of `/proc/<pid>/stat`, all threads, in seconds; 0 when it cannot be read.
fn cpu_seconds(pid: &str) -> f64 {
    // Clock ticks: USER_HZ is 100 on every Linux architecture this runs on.
    const TICKS: f64 = 100.0;
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // After the command name in parentheses: state is field 3, utime 14, stime 15.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) as f64 / TICKS
}

/// The machine's CPU time (`/proc/stat`, first line), to report how much the host stole.
struct CpuTimes {
    total: u64,
    steal: u64,
}

impl CpuTimes {
    fn read() -> Option<CpuTimes> {
        let stat = std::fs::read_to_string(Path::new("/proc/stat")).ok()?;
        let line = stat.lines().next()?.strip_prefix("cpu ")?;
        // user nice system idle iowait irq softirq steal (guest time is inside user)
        let fields: Vec<u64> = line
            .split_whitespace()
            .take(8)
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        Some(CpuTimes {
            total: fields.iter().sum(),
            steal: *fields.get(7)?,
        })
    }

    fn steal_since(&self, earlier: &CpuTimes) -> f64 {
        let total = self.total.saturating_sub(earlier.total);
        if total == 0 {
            return 0.0;
        }
        self.steal.saturating_sub(earlier.steal) as f64 / total as f64
    }
}
