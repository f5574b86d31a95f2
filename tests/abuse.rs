//! Holding under abuse (DESIGN.md invariant 11): slow and endless request heads, connection
//! floods, huge heads, request bodies on pull routes, a flood of cold pulls against one
//! upstream, and an upstream that is down or hangs. Each test asserts what a client of the
//! mirror would notice: it is still answered, and never with a 5xx it did not deserve.

mod common;

use common::client::SAFETY;
use common::*;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The config of [`Env`]-like setups with extra `[server]` lines.
fn with_server_lines(toml: String, lines: &str) -> String {
    toml.replacen(
        "listen = \"127.0.0.1:0\"\n",
        &format!("listen = \"127.0.0.1:0\"\n{lines}\n"),
        1,
    )
}

/// A proxy in front of `fake` (upstream [`UP`], default) with extra `[server]` lines and extra
/// upstream lines.
async fn proxy_with(
    fake: &FakeRegistry,
    dir: &tempfile::TempDir,
    cache: CacheSpec,
    server: &str,
    upstream: &str,
) -> Proxy {
    let ups = vec![UpstreamSpec::new(UP, &fake.url(), true).with(upstream)];
    Proxy::start(&with_server_lines(
        config_toml(dir.path(), &cache, &ups),
        server,
    ))
    .await
}

/// Reads one HTTP/1.1 response (head and a `Content-Length` body) from `s`; `None` when the
/// connection closes (or is reset) before a whole head arrives.
async fn read_response(s: &mut TcpStream) -> Option<(u16, String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
    let status: u16 = head.split_whitespace().nth(1)?.parse().ok()?;
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap_or(0));
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    Some((status, head, body))
}

/// Sends `GET path` on `s` (kept alive) and reads the answer.
async fn get_on(s: &mut TcpStream, path: &str) -> Option<(u16, String, Vec<u8>)> {
    let req = format!("GET {path} HTTP/1.1\r\nhost: cachalot\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    read_response(s).await
}

/// Waits (with the safety net) until the server closes `s`: reads return EOF or an error.
/// Whatever it sent before closing is returned.
async fn wait_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    tokio::time::timeout(SAFETY, async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .expect("safety timeout: the server never closed the connection");
    got
}

async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.expect("connect to cachalot")
}

// === slow heads ===

#[tokio::test]
async fn slow_heads_do_not_delay_others_and_are_closed_at_the_header_timeout() {
    let fake = FakeRegistry::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_with(
        &fake,
        &dir,
        CacheSpec::default(),
        "header_timeout = \"1s\"",
        "",
    )
    .await;
    let addr = proxy.addr();

    // Four kinds of slowloris: half an HTTP/1 head, half the HTTP/2 preface (before hyper
    // knows the protocol), the whole preface and settings but no request, and nothing at all.
    let partial: [&[u8]; 4] = [
        b"GET /v2/ HTTP/1.1\r\nhost: x\r\nx-slow: ",
        b"PRI * HTTP/2",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0",
        b"",
    ];
    let mut stalled = Vec::new();
    for i in 0..300 {
        let mut s = connect(addr).await;
        s.write_all(partial[i % partial.len()]).await.unwrap();
        stalled.push(s);
    }

    // While they are all open, a normal client is answered.
    let client = TestClient::new();
    let r = client.get(&format!("{}/v2/", proxy.url())).await;
    assert_eq!(r.status, 200, "{}", r.text());

    // And each of them is closed by the server, never answered with a 5xx.
    for (i, s) in stalled.iter_mut().enumerate() {
        let got = String::from_utf8_lossy(&wait_closed(s).await).into_owned();
        assert!(
            !got.starts_with("HTTP/1.1 5"),
            "stalled connection {i} got {got:?}"
        );
    }

    // A kept-alive connection that has been answered gets the same deadline for its next head.
    let mut s = connect(addr).await;
    let (status, _, _) = get_on(&mut s, "/v2/").await.expect("answered");
    assert_eq!(status, 200);
    wait_closed(&mut s).await;

    // So does one that starts HTTP/2's preface after an HTTP/1 request (no protocol switch
    // mid-connection, and no wait without a deadline for the rest of a preface).
    let mut s = connect(addr).await;
    let (status, _, _) = get_on(&mut s, "/v2/").await.expect("answered");
    assert_eq!(status, 200);
    s.write_all(b"PRI * HTTP/2").await.unwrap();
    let got = String::from_utf8_lossy(&wait_closed(&mut s).await).into_owned();
    assert!(!got.starts_with("HTTP/1.1 5"), "got {got:?}");
}

// === connection budget ===

#[tokio::test]
async fn past_max_connections_new_connections_wait_while_every_held_one_is_busy() {
    let fake = FakeRegistry::start().await;
    let blob = random_blob(32 << 20);
    let digest = fake.push_blob("lib/app", blob.clone());
    let path = format!("/v2/lib/app/blobs/{digest}");
    let dir = tempfile::tempdir().unwrap();
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let proxy = proxy_with(
        &fake,
        &dir,
        CacheSpec::default(),
        &format!(
            "max_connections = 2\nheader_timeout = \"60s\"\nmetrics_listen = \"127.0.0.1:{metrics_port}\""
        ),
        "",
    )
    .await;
    let addr = proxy.addr();
    let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let client = TestClient::new();
    {
        let mut s = connect(addr).await;
        let (status, _, body) = get_on(&mut s, &path).await.expect("answered");
        assert_eq!((status, body.len()), (200, blob.len()));
    }
    // Until the server has ended that connection, it holds a place, and a new one would take
    // it over as idle (a reclaim this test does not count on).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = client.get(&metrics_url).await.text();
        if metric_value(&m, "cachalot_connections_open", &[]) == 0.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the first connection never ended"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Both places hold a download whose client is not reading: busy, not idle.
    let mut a = connect(addr).await;
    let mut b = connect(addr).await;
    let request = format!("GET {path} HTTP/1.1\r\nhost: cachalot\r\n\r\n");
    a.write_all(request.as_bytes()).await.unwrap();
    b.write_all(request.as_bytes()).await.unwrap();
    let m = client.get(&metrics_url).await.text();
    assert_eq!(metric_value(&m, "cachalot_connections_limit", &[]), 2.0);

    // A third connection is let into the backlog, and its request waits: nothing is idle.
    let mut c = connect(addr).await;
    c.write_all(b"GET /v2/ HTTP/1.1\r\nhost: cachalot\r\n\r\n")
        .await
        .unwrap();
    let early = tokio::time::timeout(Duration::from_millis(500), read_response(&mut c)).await;
    assert!(early.is_err(), "answered past max_connections: {early:?}");

    // The downloads held go on; once one ends, its connection is idle and makes room.
    let (status, _, body) = read_response(&mut b).await.expect("b's download");
    assert_eq!((status, body.len()), (200, blob.len()));
    let (status, _, _) = tokio::time::timeout(SAFETY, read_response(&mut c))
        .await
        .expect("safety timeout: the waiting connection was never served")
        .expect("answered");
    assert_eq!(status, 200);
    wait_closed(&mut b).await;
    let (status, _, body) = read_response(&mut a).await.expect("a's download");
    assert_eq!((status, body.len()), (200, blob.len()));
    assert_eq!(body, blob);
    let m = client.get(&metrics_url).await.text();
    assert_eq!(
        metric_value(&m, "cachalot_connections_reclaimed_total", &[]),
        1.0
    );
}

// === huge heads ===

#[tokio::test]
async fn huge_heads_get_a_4xx_or_a_closed_connection_never_a_5xx() {
    let env = Env::start().await;
    let addr = env.proxy.addr();
    let big_header = format!(
        "GET /v2/ HTTP/1.1\r\nhost: cachalot\r\nx-big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let big_uri = format!(
        "GET /v2/{}/manifests/latest HTTP/1.1\r\nhost: cachalot\r\n\r\n",
        "a/".repeat(60 * 1024)
    );
    let many_headers = format!(
        "GET /v2/ HTTP/1.1\r\nhost: cachalot\r\n{}\r\n",
        (0..500)
            .map(|i| format!("x-h{i}: v\r\n"))
            .collect::<String>()
    );
    for (what, req) in [
        ("a 100 KiB header", big_header),
        ("a 120 KiB URI", big_uri),
        ("500 headers", many_headers),
    ] {
        let mut s = connect(addr).await;
        // The server may answer and close before reading all of it.
        let _ = s.write_all(req.as_bytes()).await;
        // Closed without an answer is allowed too (the client may see a reset first).
        if let Some((status, _, _)) = read_response(&mut s).await {
            assert!(
                status == 431 || status == 414,
                "{what}: answered {status}, want 431 (or 414)"
            );
        }
    }
    // And the server is none the worse for it.
    let r = env.client.get(&env.v2("")).await;
    assert_eq!(r.status, 200);
}

// === request bodies ===

#[tokio::test]
async fn bodies_on_pull_routes_are_refused_without_being_read() {
    let env = Env::start().await;
    env.fake.push_image("lib/app", Some("v1"), &[100]);
    let addr = env.proxy.addr();

    // A GiB announced, a few bytes sent: the answer comes without the rest, and the
    // connection is closed (the rest would otherwise have to be read as the next request).
    for head in [
        "GET /v2/lib/app/manifests/v1 HTTP/1.1\r\nhost: cachalot\r\ncontent-length: 1073741824\r\n\r\nabc",
        "HEAD /v2/ HTTP/1.1\r\nhost: cachalot\r\ncontent-length: 1073741824\r\n\r\nabc",
        "GET /v2/lib/app/tags/list HTTP/1.1\r\nhost: cachalot\r\ntransfer-encoding: chunked\r\n\r\n40000000\r\nabc",
    ] {
        let mut s = connect(addr).await;
        s.write_all(head.as_bytes()).await.unwrap();
        let (status, resp_head, body) = tokio::time::timeout(SAFETY, read_response(&mut s))
            .await
            .expect("safety timeout: no answer without the body")
            .expect("answered");
        assert_eq!(status, 400, "{head:?}: {resp_head}");
        assert!(resp_head.contains("connection: close"), "{resp_head}");
        if !head.starts_with("HEAD") {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["errors"][0]["code"], "UNSUPPORTED", "{v}");
        }
        wait_closed(&mut s).await;
    }
    // Nothing was asked of the upstream on their behalf.
    assert_eq!(env.fake.total(), 0);

    // A push keeps its 405, and its body is not read either.
    let mut s = connect(addr).await;
    s.write_all(
        b"PUT /v2/lib/app/blobs/uploads/x HTTP/1.1\r\nhost: cachalot\r\ncontent-length: 1073741824\r\n\r\nabc",
    )
    .await
    .unwrap();
    let (status, resp_head, _) = tokio::time::timeout(SAFETY, read_response(&mut s))
        .await
        .expect("safety timeout")
        .expect("answered");
    assert_eq!(status, 405, "{resp_head}");
    wait_closed(&mut s).await;

    // Content-Length: 0 is no body.
    let mut s = connect(addr).await;
    s.write_all(b"GET /v2/ HTTP/1.1\r\nhost: cachalot\r\ncontent-length: 0\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut s).await.unwrap().0, 200);
}

// === upstream concurrency ===

#[tokio::test]
async fn upstream_max_connections_bounds_concurrent_upstream_requests() {
    let fake = FakeRegistry::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_with(&fake, &dir, CacheSpec::default(), "", "max_connections = 2").await;
    let blobs: Vec<(String, bytes::Bytes)> = (0..8)
        .map(|_| {
            let b = random_blob(64 * 1024);
            (fake.push_blob("lib/app", b.clone()), b)
        })
        .collect();
    // Slow bodies, so that requests overlap if they are let.
    fake.set_chunk_delay(Some(Duration::from_millis(20)));

    let client = TestClient::new();
    let mut pulls = tokio::task::JoinSet::new();
    // The first blob twice: a queued fill still has its followers.
    for (i, (digest, bytes)) in blobs.iter().chain(blobs.iter().take(1)).enumerate() {
        let url = format!("{}/v2/lib/app/blobs/{digest}", proxy.url());
        let (client, bytes) = (client.clone(), bytes.clone());
        pulls.spawn(async move {
            let r = client.get(&url).await;
            assert_eq!(r.status, 200, "blob {i}: {}", r.text());
            assert_eq!(r.body, bytes, "blob {i}");
        });
    }
    while let Some(r) = pulls.join_next().await {
        r.unwrap();
    }
    assert!(
        fake.max_in_flight() <= 2,
        "the upstream saw {} requests at once",
        fake.max_in_flight()
    );
    for (digest, _) in &blobs {
        assert_eq!(fake.blob_gets("lib/app", digest), 1, "{digest}");
    }
    let m = TestClient::new()
        .get(&format!("{}/metrics", proxy.url()))
        .await
        .text();
    assert_eq!(
        metric_value(
            &m,
            "cachalot_upstream_requests_waiting",
            &[("upstream", UP)]
        ),
        0.0
    );
}

// === circuit breaker ===

/// A proxy whose upstream answers headers within 300 ms, is taken for down after two
/// failures in a row, and probed again 3 s later.
async fn breaker_env() -> Env {
    let cache = CacheSpec {
        // Every pull of a cached tag asks the upstream first.
        tag_ttl: "1ms".into(),
        offline: false,
    };
    Env::start_with(
        cache,
        "timeout = \"300ms\"\nconnect_timeout = \"300ms\"\ncircuit_break_after = 2\ncircuit_pause = \"3s\"",
    )
    .await
}

/// [`breaker_env`] with `lib/app:v1` pulled (so cached) and `lib/other:v1` only upstream.
async fn breaker_env_with_a_cached_image() -> (Env, Image, Image) {
    let env = breaker_env().await;
    let cached = env.fake.push_image("lib/app", Some("v1"), &[1000]);
    let other = env.fake.push_image("lib/other", Some("v1"), &[1000]);
    let r = env.client.get(&env.v2("lib/app/manifests/v1")).await;
    assert_eq!(r.status, 200);
    let r = env
        .client
        .get(&env.v2(&format!("lib/app/blobs/{}", cached.layers[0].0)))
        .await;
    assert_eq!(r.status, 200);
    (env, cached, other)
}

async fn circuit_open(env: &Env) -> f64 {
    env.metric("cachalot_upstream_circuit_open", &[("upstream", UP)])
        .await
}

/// Open: a cached tag is served (stale) and misses fail at once with 503 naming the
/// upstream, without the upstream seeing a request; after the pause and its recovery,
/// requests go through again.
async fn assert_open_then_recovers(
    env: &Env,
    cached: &Image,
    other: &Image,
    recover: impl AsyncFnOnce(),
) {
    assert_eq!(circuit_open(env).await, 1.0);
    let before = env.fake.total();

    let r = env.client.get(&env.v2("lib/app/manifests/v1")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, cached.manifest.bytes);
    let r = env
        .client
        .get(&env.v2(&format!("lib/app/blobs/{}", cached.layers[0].0)))
        .await;
    assert_eq!(r.status, 200, "cached blob: {}", r.text());

    for path in [
        "lib/other/manifests/v1".to_string(),
        format!("lib/other/blobs/{}", other.layers[0].0),
    ] {
        let r = env.client.get(&env.v2(&path)).await;
        assert_eq!(r.status, 503, "{path}: {}", r.text());
        assert_eq!(r.error_code().as_deref(), Some("UNAVAILABLE"));
        assert!(r.error_message().unwrap().contains(UP), "{}", r.text());
        let retry: u64 = r
            .header("retry-after")
            .expect("Retry-After")
            .parse()
            .unwrap();
        assert!((1..=3).contains(&retry), "Retry-After {retry}");
    }
    assert_eq!(
        env.fake.total(),
        before,
        "the upstream was contacted while down"
    );

    recover().await;
    let deadline = tokio::time::Instant::now() + SAFETY;
    loop {
        let r = env.client.get(&env.v2("lib/other/manifests/v1")).await;
        if r.status == 200 {
            assert_eq!(r.body, other.manifest.bytes);
            break;
        }
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(
            tokio::time::Instant::now() < deadline,
            "safety timeout: never recovered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(circuit_open(env).await, 0.0);
}

#[tokio::test]
async fn a_hanging_upstream_opens_the_circuit_and_cached_content_is_served_at_once() {
    let (env, cached, other) = breaker_env_with_a_cached_image().await;
    assert_eq!(circuit_open(&env).await, 0.0);

    env.fake.set_hang(true);
    // Two timeouts in a row: each client waits for the header timeout, and gets a 504.
    for _ in 0..2 {
        let r = env.client.get(&env.v2("lib/other/manifests/v1")).await;
        assert_eq!(r.status, 504, "{}", r.text());
    }
    assert_open_then_recovers(&env, &cached, &other, async || env.fake.set_hang(false)).await;
}

#[tokio::test]
async fn a_refusing_upstream_opens_the_circuit_too() {
    let (env, cached, other) = breaker_env_with_a_cached_image().await;

    env.fake.stop().await;
    for _ in 0..2 {
        let r = env.client.get(&env.v2("lib/other/manifests/v1")).await;
        assert_eq!(r.status, 502, "{}", r.text());
    }
    assert_open_then_recovers(&env, &cached, &other, async || env.fake.restart().await).await;
}

#[tokio::test]
async fn error_answers_do_not_open_the_circuit() {
    let env = breaker_env().await;
    let other = env.fake.push_image("lib/other", Some("v1"), &[1000]);
    for status in [503, 429, 500] {
        env.fake.set_status_fault(Some(StatusFault::all(status)));
        for _ in 0..3 {
            let before = env.fake.total();
            let r = env.client.get(&env.v2("lib/other/manifests/v1")).await;
            assert_ne!(r.status, 200);
            assert!(env.fake.total() > before, "the upstream was not asked");
        }
        assert_eq!(circuit_open(&env).await, 0.0, "after {status}s");
    }
    env.fake.set_status_fault(None);
    let r = env.client.get(&env.v2("lib/other/manifests/v1")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, other.manifest.bytes);
}

/// An HTTP/2 connection that went quiet after its requests is closed at the header timeout, as
/// an idle HTTP/1 keep-alive one is, so idle HTTP/2 clients cannot hold the connection budget
/// for ever; one whose response is still being read stays open past it.
#[tokio::test]
async fn an_idle_http2_connection_is_closed_and_a_streaming_one_is_not() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let fake = FakeRegistry::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Larger than the client's flow-control windows: the server cannot finish sending it
    // before the client reads.
    let blob = random_blob(16 << 20);
    let digest = fake.push_blob("h2/app", blob.clone());
    let proxy = proxy_with(
        &fake,
        &dir,
        CacheSpec::default(),
        "header_timeout = \"1s\"",
        "",
    )
    .await;
    let path = format!("/v2/h2/app/blobs/{digest}");
    let warm = TestClient::new()
        .get(&format!("{}{path}", proxy.url()))
        .await;
    assert_eq!(warm.status, 200);

    let stream = TcpStream::connect(proxy.addr()).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let req = hyper::Request::builder()
        .uri(format!("http://{}{path}", proxy.addr()))
        .version(hyper::Version::HTTP_2)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = Vec::with_capacity(blob.len());
    let first = body.frame().await.expect("a first frame").unwrap();
    got.extend_from_slice(first.data_ref().expect("data"));
    // Reading stalls for longer than the timeout; the stream is open, so the connection stays.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    got.extend_from_slice(
        &body
            .collect()
            .await
            .expect("the rest of the body")
            .to_bytes(),
    );
    assert!(
        got == blob[..],
        "the blob arrived whole over the stalled stream"
    );

    // Now nothing is open and nothing is asked: the server closes the connection.
    // Closed is what counts, whether the client saw a clean end or a reset.
    let _closed = tokio::time::timeout(SAFETY, conn)
        .await
        .expect("safety timeout: the idle HTTP/2 connection was never closed")
        .expect("connection task");
}

#[tokio::test]
async fn at_the_limit_an_idle_http2_connection_makes_room_and_a_streaming_one_is_kept() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let fake = FakeRegistry::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Larger than the client's flow-control windows: its stream stays open while unread.
    let blob = random_blob(16 << 20);
    let digest = fake.push_blob("h2/app", blob.clone());
    let proxy = proxy_with(
        &fake,
        &dir,
        CacheSpec::default(),
        "max_connections = 2\nheader_timeout = \"60s\"",
        "",
    )
    .await;
    let path = format!("/v2/h2/app/blobs/{digest}");
    {
        let mut s = connect(proxy.addr()).await;
        let (status, _, body) = get_on(&mut s, &path).await.expect("answered");
        assert_eq!((status, body.len()), (200, blob.len()));
    }
    let h2 = async || {
        let stream = TcpStream::connect(proxy.addr()).await.unwrap();
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        (send, tokio::spawn(conn))
    };
    let get = |path: &str| {
        hyper::Request::builder()
            .uri(format!("http://{}{path}", proxy.addr()))
            .version(hyper::Version::HTTP_2)
            .body(Empty::<Bytes>::new())
            .unwrap()
    };

    // One connection streams a blob its client is not reading; the other has had its answer.
    let (mut streaming, _streaming_conn) = h2().await;
    let resp = streaming.send_request(get(&path)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = Vec::with_capacity(blob.len());
    let first = body.frame().await.expect("a first frame").unwrap();
    got.extend_from_slice(first.data_ref().expect("data"));
    let (mut idle, idle_conn) = h2().await;
    let resp = idle.send_request(get("/v2/")).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();

    // A third client gets its answer at once: the idle connection was closed for it.
    let mut c = connect(proxy.addr()).await;
    let (status, _, _) = tokio::time::timeout(Duration::from_secs(5), get_on(&mut c, "/v2/"))
        .await
        .expect("the new client waited for a place")
        .expect("answered");
    assert_eq!(status, 200);
    let _closed = tokio::time::timeout(SAFETY, idle_conn)
        .await
        .expect("safety timeout: the idle HTTP/2 connection was never closed")
        .expect("connection task");
    // The stream in flight was not cut.
    got.extend_from_slice(&body.collect().await.expect("the rest").to_bytes());
    assert!(got == blob[..], "the blob arrived whole");
}
