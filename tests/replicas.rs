//! Replicas as one cache, in-process: three (or four) cachalot servers sharing one bucket (an
//! in-memory object store) and a `[cluster]`, in front of the fake registry. What a user of a
//! replicated mirror counts on: each blob and tag is fetched from the upstream once whichever
//! replica is asked, a new replica starts warm, and a replica that dies mid-fill costs its peers'
//! clients nothing.

mod common;

use common::*;
use object_store::memory::InMemory;
use object_store::{ObjectStore, ObjectStoreExt};
use std::sync::Arc;
use std::time::Duration;

/// Replicas over one bucket, each with its own cache directory.
struct Replicas {
    fake: FakeRegistry,
    bucket: Arc<dyn ObjectStore>,
    servers: Vec<Option<cachalot::server::Server>>,
    urls: Vec<String>,
    peers: Vec<String>,
    secret: tempfile::NamedTempFile,
    dirs: Vec<tempfile::TempDir>,
    client: TestClient,
    /// TOML appended to every replica's config.
    extra: String,
    /// Lines added to every replica's `[cache]`.
    cache: String,
    /// An `Authorization` value for the replicas' own endpoints, when `[auth]` is on.
    authorization: Option<String>,
}

/// A port nothing listens on now, for a replica whose URL its peers must know before it starts.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Replicas {
    async fn start(n: usize) -> Replicas {
        Replicas::start_with(n, "", None).await
    }

    async fn start_with(n: usize, extra: &str, authorization: Option<String>) -> Replicas {
        Replicas::start_full(n, "", extra, authorization).await
    }

    async fn start_full(
        n: usize,
        cache: &str,
        extra: &str,
        authorization: Option<String>,
    ) -> Replicas {
        let fake = FakeRegistry::start().await;
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let peers = ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect();
        let secret = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(secret.path(), "a shared secret of the test cluster\n").unwrap();
        let mut r = Replicas {
            fake,
            bucket: Arc::new(InMemory::new()),
            servers: Vec::new(),
            urls: Vec::new(),
            peers,
            secret,
            dirs: Vec::new(),
            client: TestClient::unpooled(),
            extra: extra.to_owned(),
            cache: cache.to_owned(),
            authorization,
        };
        for port in ports {
            r.spawn(port).await;
        }
        r.wait_live(n).await;
        r
    }

    fn config(&self, port: u16, dir: &std::path::Path) -> String {
        let ups = [UpstreamSpec::new(UP, &self.fake.url(), true)];
        let base = config_toml(dir, &CacheSpec::default(), &ups)
            .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"))
            .replace(
                "offline = false\n",
                &format!("offline = false\n{}", self.cache),
            );
        format!(
            "{base}\n[storage]\nbackend = \"s3\"\nbucket = \"cachalot\"\n\n[cluster]\npeers = {:?}\nself = \"http://127.0.0.1:{port}\"\nsecret_file = {:?}\n{}",
            self.peers,
            self.secret.path(),
            self.extra,
        )
    }

    /// Starts a replica on `port` with a new, empty cache directory.
    async fn spawn(&mut self, port: u16) -> usize {
        let dir = tempfile::tempdir().unwrap();
        let config = cachalot::config::Config::from_toml_str(&self.config(port, dir.path()))
            .unwrap_or_else(|e| panic!("{e}"));
        let options = cachalot::server::SpawnOptions {
            bucket: Some(self.bucket.clone()),
            ..Default::default()
        };
        let server = cachalot::server::spawn_with_options(config, options)
            .await
            .unwrap();
        self.urls.push(format!("http://{}", server.local_addr()));
        self.servers.push(Some(server));
        self.dirs.push(dir);
        self.servers.len() - 1
    }

    /// Waits until every running replica sees `n` live members.
    async fn wait_live(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        for (i, s) in self.servers.iter().enumerate() {
            if s.is_none() {
                continue;
            }
            loop {
                let live = self.metric(i, "cachalot_cluster_peers_live", &[]).await;
                if live == n as f64 {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "replica {i} sees {live} live peers, want {n}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    fn v2(&self, i: usize, path: &str) -> String {
        format!("{}/v2/{path}", self.urls[i])
    }

    async fn metric(&self, i: usize, name: &str, labels: &[(&str, &str)]) -> f64 {
        let auth: Vec<(&str, &str)> = self
            .authorization
            .iter()
            .map(|a| ("authorization", a.as_str()))
            .collect();
        let url = format!("{}/metrics", self.urls[i]);
        let r = self.client.send(http::Method::GET, &url, &auth).await;
        assert_eq!(r.status, 200);
        metric_value(&r.text(), name, labels)
    }

    /// Kills replica `i` as a crash would: its connections drop mid-response.
    fn kill(&mut self, i: usize) {
        if let Some(s) = self.servers[i].take() {
            s.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_cold_gets_over_three_replicas_make_one_upstream_get() {
    let r = Replicas::start(3).await;
    let blob = random_blob(3 * 1024 * 1024 + 5);
    let d = r.fake.push_blob("team/app", blob.clone());
    // A slow body keeps the owner's fill open while the thirty requests arrive.
    r.fake.set_chunk_delay(Some(Duration::from_millis(2)));
    let mut tasks = vec![];
    for i in 0..30 {
        let url = r.v2(i % 3, &format!("team/app/blobs/{d}"));
        tasks.push(tokio::spawn(async move {
            TestClient::unpooled().get(&url).await
        }));
    }
    for t in tasks {
        let resp = t.await.unwrap();
        assert_eq!(resp.status, 200);
        assert!(resp.body == blob, "a client got wrong bytes");
    }
    assert_eq!(r.fake.blob_gets("team/app", &d), 1, "one upstream GET");
    let mut by_peer = 0.0;
    for i in 0..3 {
        by_peer += r
            .metric(
                i,
                "cachalot_cache_lookups_total",
                &[("kind", "blob"), ("result", "peer")],
            )
            .await;
    }
    assert_eq!(
        by_peer, 2.0,
        "the two other replicas each asked the owner once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tag_pulled_through_one_replica_is_served_by_the_others_without_upstream() {
    let r = Replicas::start(3).await;
    let img = r.fake.push_image("team/app", Some("v1"), &[1000]);
    let first = r.client.get(&r.v2(0, "team/app/manifests/v1")).await;
    assert_eq!(first.status, 200);
    for i in 1..3 {
        let resp = r.client.get(&r.v2(i, "team/app/manifests/v1")).await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.body, first.body);
        assert_eq!(
            resp.headers.get("docker-content-digest").unwrap(),
            img.manifest.digest.as_str()
        );
    }
    assert_eq!(r.fake.manifest_gets("team/app", "v1"), 1);
    assert_eq!(r.fake.manifest_heads("team/app", "v1"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_replica_with_an_empty_cache_dir_serves_the_shared_cache_without_upstream() {
    let mut r = Replicas::start(3).await;
    let img = r.fake.push_image("team/app", Some("v1"), &[200_000, 3000]);
    let pull = |i: usize, r: &Replicas| {
        let urls: Vec<String> = std::iter::once(r.v2(i, "team/app/manifests/v1"))
            .chain(std::iter::once(
                r.v2(i, &format!("team/app/blobs/{}", img.config.0)),
            ))
            .chain(
                img.layers
                    .iter()
                    .map(|(d, _)| r.v2(i, &format!("team/app/blobs/{d}"))),
            )
            .collect();
        let client = TestClient::unpooled();
        async move {
            let mut bodies = vec![];
            for u in urls {
                let resp = client.get(&u).await;
                assert_eq!(resp.status, 200, "{u}");
                bodies.push(resp.body);
            }
            bodies
        }
    };
    let want = pull(1, &r).await;
    // The owner may still be completing the bucket's copy of a blob it served.
    for i in 0..3 {
        wait_no_fills(&r, i).await;
    }
    let before = r.fake.total();
    let port = free_port();
    r.peers.push(format!("http://127.0.0.1:{port}"));
    let fourth = r.spawn(port).await;
    let got = pull(fourth, &r).await;
    assert_eq!(got, want);
    assert_eq!(
        r.fake.total(),
        before,
        "the new replica asked the upstream: {:?}",
        &r.fake.requests()[before..]
    );
}

async fn wait_no_fills(r: &Replicas, i: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while r.metric(i, "cachalot_fills_in_flight", &[]).await > 0.0 {
        assert!(tokio::time::Instant::now() < deadline, "fills never ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_owner_dying_mid_fill_leaves_the_other_replicas_clients_with_correct_blobs() {
    let mut r = Replicas::start(3).await;
    let blob = random_blob(2 * 1024 * 1024);
    let d = r.fake.push_blob("team/app", blob.clone());
    // Find the owner: the replica whose own request makes no peer lookup.
    let owner = owner_of(&r, &d).await;
    let gate = r.fake.pause_blob(&d, 700_000);
    let others: Vec<usize> = (0..3).filter(|i| *i != owner).collect();
    let mut tasks = vec![];
    for &i in &others {
        for _ in 0..3 {
            let url = r.v2(i, &format!("team/app/blobs/{d}"));
            tasks.push(tokio::spawn(async move {
                TestClient::unpooled().get(&url).await
            }));
        }
    }
    gate.reached().await;
    // Let the owner's bytes reach the others before it dies.
    tokio::time::sleep(Duration::from_millis(200)).await;
    r.kill(owner);
    gate.release();
    for t in tasks {
        let resp = t.await.unwrap();
        assert_eq!(resp.status, 200);
        assert!(resp.body == blob, "a client got wrong bytes");
    }
    let mut fallbacks = 0.0;
    for &i in &others {
        fallbacks += r
            .metric(
                i,
                "cachalot_fill_source_fallbacks_total",
                &[("from", "peer")],
            )
            .await;
    }
    assert!(fallbacks >= 1.0, "no fill went on from the upstream");
}

/// Which replica owns `digest`: every replica computes the same owner, so ask the first.
async fn owner_of(r: &Replicas, digest: &str) -> usize {
    let cluster = r.servers[0]
        .as_ref()
        .unwrap()
        .mirror
        .cluster()
        .expect("a cluster is configured")
        .clone();
    match cluster.owner(digest) {
        None => 0,
        Some(peer) => r
            .peers
            .iter()
            .position(|p| p.trim_end_matches('/') == peer.url.as_str().trim_end_matches('/'))
            .unwrap_or_else(|| panic!("owner {peer:?} is not a replica")),
    }
}

/// A bucket that refuses every connection costs caching, not pulls: the image comes through
/// from the upstream, whole and right, and the failures are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_bucket_costs_caching_not_pulls() {
    let fake = FakeRegistry::start().await;
    let img = fake.push_image("team/app", Some("v1"), &[300_000, 1000]);
    let dir = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    std::fs::write(keys.path().join("id"), "GK0000\n").unwrap();
    std::fs::write(keys.path().join("secret"), "0000\n").unwrap();
    let ups = [UpstreamSpec::new(UP, &fake.url(), true)];
    let toml = format!(
        "{}\n[storage]\nbackend = \"s3\"\nendpoint = \"http://127.0.0.1:{}\"\nbucket = \"cachalot\"\nregion = \"garage\"\naccess_key_id_file = {:?}\nsecret_access_key_file = {:?}\n",
        config_toml(dir.path(), &CacheSpec::default(), &ups),
        free_port(),
        keys.path().join("id"),
        keys.path().join("secret"),
    );
    let proxy = Proxy::start(&toml).await;
    let client = TestClient::new();
    let v2 = |p: &str| format!("{}/v2/team/app/{p}", proxy.url());
    let started = std::time::Instant::now();
    let m = client.get(&v2("manifests/v1")).await;
    assert_eq!(m.status, 200);
    assert_eq!(m.body, img.manifest.bytes);
    for (d, bytes) in std::iter::once(&img.config).chain(&img.layers) {
        let resp = client.get(&v2(&format!("blobs/{d}"))).await;
        assert_eq!(resp.status, 200);
        assert!(resp.body == *bytes, "wrong bytes for {d}");
    }
    eprintln!("pull with a dead bucket took {:?}", started.elapsed());
    let text = client.get(&format!("{}/metrics", proxy.url())).await.text();
    assert!(
        metric_value(
            &text,
            "cachalot_storage_requests_total",
            &[("result", "error")]
        ) > 0.0,
        "bucket failures are not counted"
    );
    // After a few failures the bucket is left alone instead of being asked on every miss.
    assert!(
        metric_value(
            &text,
            "cachalot_storage_requests_total",
            &[("result", "skipped")]
        ) > 0.0,
        "a dead bucket is asked on every miss"
    );
    // Cached here all the same: a second pull is served from the cache directory.
    let before = fake.total();
    for (d, _) in std::iter::once(&img.config).chain(&img.layers) {
        assert_eq!(client.get(&v2(&format!("blobs/{d}"))).await.status, 200);
    }
    assert_eq!(fake.total(), before);
}

/// A tag asked of every replica at once is resolved by its owner, once for all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tag_asked_of_every_replica_at_once_is_fetched_once() {
    let r = Replicas::start(3).await;
    let img = r.fake.push_image("team/app", Some("v2"), &[1000]);
    // A slow answer keeps the owner's fetch open while the others ask.
    r.fake.set_manifest_delay(Some(Duration::from_millis(300)));
    let mut tasks = vec![];
    for i in 0..6 {
        let url = r.v2(i % 3, "team/app/manifests/v2");
        tasks.push(tokio::spawn(async move {
            TestClient::unpooled().get(&url).await
        }));
    }
    for t in tasks {
        let resp = t.await.unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.body, img.manifest.bytes);
    }
    assert_eq!(r.fake.manifest_gets("team/app", "v2"), 1);
}

/// With `[auth]`, a replica forwards an authenticated client's miss to the owner, which serves
/// the peer without credentials of its own; a client without them, or a forged peer header,
/// gets 401 on every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_auth_peers_serve_each_other_and_clients_still_need_credentials() {
    let htpasswd = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(htpasswd.path(), auth_env::htpasswd_text(&[("alice", "pw")])).unwrap();
    let extra = format!("\n[auth]\nhtpasswd = {:?}\n", htpasswd.path());
    let alice = auth_env::basic("alice", "pw");
    let r = Replicas::start_with(3, &extra, Some(alice.clone())).await;
    let blob = random_blob(300_000);
    let d = r.fake.push_blob("team/app", blob.clone());
    let other = (owner_of(&r, &d).await + 1) % 3;
    let url = r.v2(other, &format!("team/app/blobs/{d}"));
    assert_eq!(r.client.get(&url).await.status, 401);
    let forged = [("x-cachalot-peer", "1700000000.00")];
    assert_eq!(
        r.client.send(http::Method::GET, &url, &forged).await.status,
        401
    );
    let resp = r
        .client
        .send(http::Method::GET, &url, &[("authorization", &alice)])
        .await;
    assert_eq!(resp.status, 200);
    assert!(resp.body == blob);
    let by_peer = r
        .metric(
            other,
            "cachalot_cache_lookups_total",
            &[("kind", "blob"), ("result", "peer")],
        )
        .await;
    assert_eq!(by_peer, 1.0, "not served through the owner");
    assert_eq!(r.fake.blob_gets("team/app", &d), 1);
}

/// Replicas sharing a bucket split each scrub pass of it: each reads back the blobs it owns,
/// so a blob damaged in the bucket is found by its owner, and the bucket is read once a round
/// rather than once per replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_split_the_bucket_scrub_by_ownership() {
    let cache = "scrub_interval = \"1s\"\nscrub_bucket = true\n";
    let r = Replicas::start_full(3, cache, "", None).await;
    let mut blobs = Vec::new();
    for i in 0..12 {
        let blob = random_blob(20_000 + i);
        let d = r.fake.push_blob("team/app", blob.clone());
        let resp = r.client.get(&r.v2(0, &format!("team/app/blobs/{d}"))).await;
        assert_eq!(resp.status, 200);
        blobs.push((d, blob));
    }
    for (d, blob) in &blobs {
        let key = object_store::path::Path::from(format!(
            "blobs/sha256/{}",
            d.strip_prefix("sha256:").unwrap()
        ));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while r.bucket.head(&key).await.map(|m| m.size).ok() != Some(blob.len() as u64) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{d} never reached the bucket"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut bad = blob.to_vec();
        bad[0] ^= 1;
        r.bucket
            .put(&key, bytes::Bytes::from(bad).into())
            .await
            .unwrap();
    }
    let mut owned = [0.0; 3];
    for (d, _) in &blobs {
        owned[owner_of(&r, d).await] += 1.0;
    }
    assert!(owned.iter().filter(|n| **n > 0.0).count() >= 2, "{owned:?}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let mut found = [0.0; 3];
        for (i, f) in found.iter_mut().enumerate() {
            *f = r.metric(i, "cachalot_scrub_corrupt_total", &[]).await;
        }
        if found.iter().sum::<f64>() >= 12.0 {
            assert_eq!(found, owned, "each replica found the blobs it owns");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "found {found:?} of {owned:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
