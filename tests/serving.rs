//! Serving cached blobs: plain HTTP/1 sends them with sendfile, HTTP/2 reads the file. Whatever
//! the path, a client gets every byte of the blob, in order, on a keep-alive connection shared
//! with other responses, however slowly it reads.

mod common;

use bytes::Bytes;
use common::client::{SAFETY, drain, read_at_least};
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Larger than one sendfile placeholder chunk (1 MiB), and not a multiple of it.
const BIG: usize = 3 * 1024 * 1024 + 12_345;

/// Fetches `path` once through the proxy so that it is cached, and waits for the fill.
async fn warm(env: &Env, path: &str) {
    let r = env.client.get(&env.v2(path)).await;
    assert_eq!(r.status, 200, "warming {path}: {}", r.text());
    env.wait_no_fills().await;
}

#[tokio::test]
async fn one_keep_alive_connection_carries_blobs_ranges_and_manifests_in_order() {
    let env = Env::start().await;
    let img = env.fake.push_image("team/app", Some("v1"), &[BIG, 700]);
    let (big, small) = (&img.layers[0], &img.layers[1]);
    let big_path = format!("team/app/blobs/{}", big.0);
    let small_path = format!("team/app/blobs/{}", small.0);
    warm(&env, &big_path).await;
    warm(&env, &small_path).await;
    warm(&env, "team/app/manifests/v1").await;

    let stream = TcpStream::connect(env.proxy.addr()).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let upstream_before = env.fake.total();
    // A range across a chunk boundary, a whole blob after a HEAD, a manifest between blobs.
    let tail = format!("bytes={}-", BIG - 10);
    let steps: Vec<(&str, String, Option<&str>, Bytes)> = vec![
        ("GET", big_path.clone(), None, big.1.clone()),
        ("GET", small_path.clone(), None, small.1.clone()),
        (
            "GET",
            "team/app/manifests/v1".into(),
            None,
            img.manifest.bytes.clone(),
        ),
        (
            "GET",
            big_path.clone(),
            Some("bytes=1048000-2097999"),
            big.1.slice(1_048_000..2_098_000),
        ),
        ("HEAD", big_path.clone(), None, Bytes::new()),
        (
            "GET",
            big_path.clone(),
            Some(&tail),
            big.1.slice(BIG - 10..),
        ),
        ("GET", big_path.clone(), None, big.1.clone()),
    ];
    for (method, path, range, want) in steps {
        send.ready().await.expect("the connection stays open");
        let mut req = Request::builder()
            .method(method)
            .uri(format!("/v2/{path}"))
            .header("host", env.proxy.addr().to_string());
        if let Some(r) = range {
            req = req.header("range", r);
        }
        let resp = send
            .send_request(req.body(Empty::<Bytes>::new()).unwrap())
            .await
            .unwrap_or_else(|e| panic!("{method} {path} {range:?}: {e}"));
        let status = resp.status().as_u16();
        assert_eq!(
            status,
            if range.is_some() { 206 } else { 200 },
            "{method} {path}"
        );
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(
            body == want,
            "{method} {path} {range:?}: got {} bytes, want {} (bytes differ: {})",
            body.len(),
            want.len(),
            body.len() == want.len()
        );
    }
    assert_eq!(
        env.fake.total(),
        upstream_before,
        "every response came from the cache"
    );
}

#[tokio::test]
async fn a_client_that_reads_slowly_still_gets_every_byte() {
    let env = Env::start().await;
    let blob = random_blob(8 * 1024 * 1024 + 3);
    let digest = env.fake.push_blob("slow/reader", blob.clone());
    let path = format!("slow/reader/blobs/{digest}");
    warm(&env, &path).await;

    // Far more than the socket buffers hold, read in small sips, so the server's writes
    // stop short and wait for room again and again.
    let mut sock = TcpStream::connect(env.proxy.addr()).await.unwrap();
    sock.write_all(format!("GET /v2/{path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let head_end = loop {
        let n = sock.read(&mut buf).await.unwrap();
        assert!(n > 0, "connection closed before the head");
        got.extend_from_slice(&buf[..n]);
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&got[..head_end]).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        head.contains(&format!("content-length: {}", blob.len())),
        "{head}"
    );
    let mut body = got.split_off(head_end);
    let mut sips = 0;
    while body.len() < blob.len() {
        let n = tokio::time::timeout(SAFETY, sock.read(&mut buf))
            .await
            .expect("safety timeout: body stalled")
            .unwrap();
        assert!(n > 0, "connection closed after {} bytes", body.len());
        body.extend_from_slice(&buf[..n]);
        sips += 1;
        if sips % 8 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    assert_eq!(body.len(), blob.len(), "no bytes beyond Content-Length");
    assert!(body == blob[..], "the bytes are the blob's");
}

#[tokio::test]
async fn http2_reads_the_file_and_gets_the_real_bytes() {
    let env = Env::start().await;
    let blob = random_blob(BIG);
    let digest = env.fake.push_blob("h2/app", blob.clone());
    let path = format!("h2/app/blobs/{digest}");
    warm(&env, &path).await;

    // HTTP/2 with prior knowledge over plain TCP: the connection offers sendfile, the
    // protocol cannot use it.
    let stream = TcpStream::connect(env.proxy.addr()).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    for range in [None, Some("bytes=1048570-1048580")] {
        let mut req = Request::builder()
            .uri(format!("http://{}/v2/{path}", env.proxy.addr()))
            .version(hyper::Version::HTTP_2);
        if let Some(r) = range {
            req = req.header("range", r);
        }
        let resp = send
            .send_request(req.body(Empty::<Bytes>::new()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.version(), hyper::Version::HTTP_2);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let want = match range {
            None => blob.clone(),
            Some(_) => blob.slice(1_048_570..1_048_581),
        };
        assert!(body == want, "HTTP/2 {range:?}: wrong bytes");
    }
}

/// HTTP/2 over TLS (ALPN `h2`, how Docker and containerd talk to an HTTPS mirror): a large blob
/// on several streams at once, with small answers between them, on one connection, each whole
/// and right. The server gathers the frames' writes into larger ones; that must never hold an
/// answer back or reorder a byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_over_tls_carries_concurrent_blobs_and_small_answers_whole() {
    let fake = FakeRegistry::start().await;
    let blob = random_blob(BIG);
    let d = fake.push_blob("app", blob.clone());
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    let toml = config_toml(
        &dir.path().join("cache"),
        &CacheSpec::default(),
        &[UpstreamSpec::new(UP, &fake.url(), true)],
    )
    .replace(
        "listen = \"127.0.0.1:0\"\n",
        &format!("listen = \"127.0.0.1:0\"\ntls_cert = {cert_path:?}\ntls_key = {key_path:?}\n"),
    );
    let server = cachalot::server::spawn(cachalot::config::Config::from_toml_str(&toml).unwrap())
        .await
        .unwrap();

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let mut client = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    client.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(server.local_addr()).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client))
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let base = format!("https://localhost:{}/v2", server.local_addr().port());
    let get = |path: String| {
        let mut send = send.clone();
        async move {
            let req = Request::get(path)
                .version(hyper::Version::HTTP_2)
                .body(Empty::<Bytes>::new())
                .unwrap();
            let resp = tokio::time::timeout(SAFETY, send.send_request(req))
                .await
                .expect("an answer in time")
                .unwrap();
            let status = resp.status();
            let body = tokio::time::timeout(SAFETY, resp.into_body().collect())
                .await
                .expect("the whole body in time")
                .unwrap()
                .to_bytes();
            (status, body)
        }
    };
    let blob_url = format!("{base}/app/blobs/{d}");
    let (status, body) = get(blob_url.clone()).await;
    assert!(status == 200 && body == blob, "the filling GET: {status}");
    let deadline = tokio::time::Instant::now() + SAFETY;
    while server.mirror.fills_in_flight() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "fill stuck");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut asked = Vec::new();
    for i in 0..12 {
        asked.push(if i % 3 == 0 {
            blob_url.clone()
        } else {
            format!("{base}/")
        });
    }
    let answers = futures_util::future::join_all(asked.iter().cloned().map(get)).await;
    for (url, (status, body)) in asked.iter().zip(answers) {
        assert_eq!(status, 200, "{url}");
        if url == &blob_url {
            assert!(body == blob, "wrong bytes for the blob over HTTP/2 and TLS");
        }
    }
    server.shutdown().await;
}

#[tokio::test]
async fn bytes_sent_by_sendfile_are_counted_as_served_from_cache() {
    let env = Env::start().await;
    let blob = random_blob(BIG);
    let digest = env.fake.push_blob("count/app", blob.clone());
    let path = format!("count/app/blobs/{digest}");
    warm(&env, &path).await;
    let before = env
        .metric("cachalot_served_bytes_total", &[("source", "cache")])
        .await;
    let r = env.client.get(&env.v2(&path)).await;
    assert!(r.body == blob);
    // The count lands when the body is dropped, just after the last byte is handed over.
    let deadline = tokio::time::Instant::now() + SAFETY;
    loop {
        let after = env
            .metric("cachalot_served_bytes_total", &[("source", "cache")])
            .await;
        if after - before == BIG as f64 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "served from cache went from {before} to {after}, want +{BIG}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// === shutdown ===

/// A cachalot in front of `fake`, with the whole `Server` at hand, and its cache directory.
async fn spawn_server(fake: &FakeRegistry) -> (cachalot::server::Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let toml = config_toml(
        dir.path(),
        &CacheSpec::default(),
        &[UpstreamSpec::new(UP, &fake.url(), true)],
    );
    let config = cachalot::config::Config::from_toml_str(&toml).unwrap();
    (cachalot::server::spawn(config).await.unwrap(), dir)
}

/// Caches a blob of `len` bytes through `server`; returns its URL and bytes.
async fn cached_blob(
    fake: &FakeRegistry,
    server: &cachalot::server::Server,
    len: usize,
) -> (String, Bytes) {
    let blob = random_blob(len);
    let d = fake.push_blob("app", blob.clone());
    let url = format!("http://{}/v2/app/blobs/{d}", server.local_addr());
    let r = TestClient::new().get(&url).await;
    assert!(r.body == blob, "warming {d}");
    let deadline = tokio::time::Instant::now() + SAFETY;
    while server.mirror.fills_in_flight() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "fill stuck");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (url, blob)
}

/// Waits until `addr` refuses connections: the listener is gone, shutdown has begun.
async fn wait_refused(addr: std::net::SocketAddr) {
    let deadline = tokio::time::Instant::now() + SAFETY;
    while TcpStream::connect(addr).await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "still accepting");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Far more than the socket buffers on both sides hold, so a response is still being sent
/// while its client does not read.
const HUGE: usize = 32 * 1024 * 1024;

#[tokio::test]
async fn shutdown_lets_a_blob_response_in_flight_finish() {
    let fake = FakeRegistry::start().await;
    let (server, dir) = spawn_server(&fake).await;
    let addr = server.local_addr();
    let (url, blob) = cached_blob(&fake, &server, HUGE).await;

    let resp = TestClient::unpooled()
        .send_raw(hyper::Method::GET, &url, &[])
        .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let head = read_at_least(&mut body, 1).await;
    let shutdown = tokio::spawn(server.shutdown());
    wait_refused(addr).await;
    assert!(
        !shutdown.is_finished(),
        "shutdown returned with a response in flight"
    );
    let rest = drain(body).await;
    assert_eq!(rest.error, None, "the response was cut short");
    assert_eq!(head.len() + rest.bytes.len(), blob.len());
    assert!(
        [&head[..], &rest.bytes[..]].concat() == blob[..],
        "wrong bytes"
    );
    tokio::time::timeout(SAFETY, shutdown)
        .await
        .expect("shutdown returns once the response is done")
        .unwrap();
    // Nothing holds the cache any more: it opens again.
    cachalot::storage::Store::open(dir.path()).expect("cache reopens after shutdown");
}

#[tokio::test]
async fn shutdown_closes_a_response_that_outlasts_the_drain() {
    let fake = FakeRegistry::start().await;
    let (server, dir) = spawn_server(&fake).await;
    let (url, blob) = cached_blob(&fake, &server, HUGE).await;

    // A client that stops reading after the first bytes holds its response open for good.
    let resp = TestClient::unpooled()
        .send_raw(hyper::Method::GET, &url, &[])
        .await;
    let mut body = resp.into_body();
    let head = read_at_least(&mut body, 1).await;
    let started = tokio::time::Instant::now();
    tokio::time::timeout(SAFETY, server.shutdown())
        .await
        .expect("shutdown is bounded");
    let waited = started.elapsed();
    // The drain is 10 s; the slack is for a loaded machine.
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(30),
        "shutdown took {waited:?}"
    );
    let rest = drain(body).await;
    assert!(
        rest.error.is_some(),
        "the response must end short, not whole"
    );
    assert!(head.len() + rest.bytes.len() < blob.len());
    cachalot::storage::Store::open(dir.path()).expect("cache reopens after shutdown");
}
