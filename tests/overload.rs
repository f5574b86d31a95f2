//! Many clients and restarts (issue 21): with few descriptors the server holds connections in
//! the backlog instead of failing requests, overload is a 503 to retry (never a 500), and a
//! SIGTERM lets the downloads in flight finish while new connections are refused.

mod common;

use common::child::*;
use common::*;
use sha2::{Digest as _, Sha256};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const REPO: &str = "load/app";

/// A GET of `path` on a connection of its own, read to its end: (status, headers text, body).
async fn get_once(addr: SocketAddr, path: &str) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("send request");
    let mut all = Vec::new();
    s.read_to_end(&mut all).await.expect("read response");
    let end = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete response head");
    let head = String::from_utf8_lossy(&all[..end]).to_string();
    let status = head[9..12].parse().expect("a status code");
    (status, head, all[end + 4..].to_vec())
}

fn sha256_digest(b: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(b))
}

/// A cachalot launched as `launch` says, on a cache of its own, in front of an upstream holding
/// one blob of `size` random bytes: the upstream, the cache's directory, the server, and the
/// blob's digest and bytes.
async fn launched(
    size: usize,
    launch: Launch<'_>,
) -> (
    FakeRegistry,
    tempfile::TempDir,
    Cachalot,
    String,
    bytes::Bytes,
) {
    let fake = FakeRegistry::start().await;
    let blob = random_blob(size);
    let digest = fake.push_blob(REPO, blob.clone());
    let dir = tempfile::tempdir().unwrap();
    let c = Cachalot::launch(dir.path(), &fake.url(), launch).await;
    (fake, dir, c, digest, blob)
}

/// Starts `c`'s blob `digest` into the cache and waits for the fill to be committed.
async fn cache_blob(c: &Cachalot, digest: &str) {
    let (status, _, body) = get_once(c.addr, &format!("/v2/{REPO}/blobs/{digest}")).await;
    assert_eq!(status, 200);
    assert_eq!(sha256_digest(&body), digest);
    let deadline = tokio::time::Instant::now() + SAFETY;
    while c.metric("cachalot_fills_in_flight").await > 0.0 {
        assert!(tokio::time::Instant::now() < deadline, "fill never ended");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn signal(c: &Cachalot, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(c.child.0.id() as i32).expect("a pid");
    rustix::process::kill_process(pid, sig).expect("send the signal");
}

/// Waits until connecting to `addr` is refused (the listener is closed).
async fn wait_refused(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + SAFETY;
    while TcpStream::connect(addr).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "new connections still accepted after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_few_descriptors_and_many_clients_get_200s_or_503s_and_then_normal_service() {
    // 200 descriptors, soft and hard, so the server cannot raise its way out: its budget is an
    // eighth of them (the 256 kept for cache files and upstreams do not fit).
    let (_fake, _dir, c, digest, blob) = launched(
        256 << 10,
        Launch {
            open_files: Some(200),
            ..Launch::default()
        },
    )
    .await;
    assert_eq!(c.metric("cachalot_connections_limit").await, 25.0);
    assert!(
        c.log_text()
            .contains("server.max_connections lowered to what the open-file limit allows"),
        "{}",
        c.log_text()
    );
    cache_blob(&c, &digest).await;

    // Sixteen times the budget at once, each on a connection of its own.
    let path = format!("/v2/{REPO}/blobs/{digest}");
    let clients: Vec<_> = (0..400)
        .map(|_| {
            let path = path.clone();
            let addr = c.addr;
            tokio::spawn(async move { get_once(addr, &path).await })
        })
        .collect();
    let (mut ok, mut retry) = (0, 0);
    for client in clients {
        let (status, head, body) = tokio::time::timeout(SAFETY, client)
            .await
            .expect("a client was never answered")
            .expect("client task");
        match status {
            200 => {
                assert_eq!(body.len(), blob.len(), "a 200 with a short body");
                ok += 1;
            }
            503 => {
                assert!(
                    head.to_ascii_lowercase().contains("retry-after: 2"),
                    "{head}"
                );
                retry += 1;
            }
            other => panic!("answer {other} under load:\n{head}"),
        }
    }
    assert_eq!(ok + retry, 400);
    assert!(ok > 0, "no client was served");
    // The overloads, if any, were counted; and the server serves as before.
    assert_eq!(c.metric("cachalot_overloaded_total").await, retry as f64);
    let (status, _, body) = get_once(c.addr, &path).await;
    assert_eq!((status, sha256_digest(&body)), (200, digest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_download_in_flight_finish_and_refuses_new_connections() {
    let (_fake, _dir, mut c, digest, blob) = launched(32 << 20, Launch::default()).await;
    cache_blob(&c, &digest).await;

    // A slow client: its download is far from done when the signal comes.
    let mut s = TcpStream::connect(c.addr).await.unwrap();
    s.write_all(format!("GET /v2/{REPO}/blobs/{digest} HTTP/1.1\r\nHost: m\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    while got.len() < (1 << 20) {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "the response ended early");
        got.extend_from_slice(&buf[..n]);
    }
    signal(&c, rustix::process::Signal::TERM);
    wait_refused(c.addr).await;

    // The download runs on to its end, slowly, after the listener closed.
    let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&got[..head_end]).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut body = got.split_off(head_end);
    while body.len() < blob.len() {
        let n = tokio::time::timeout(SAFETY, s.read(&mut buf))
            .await
            .expect("the download stalled")
            .expect("the download was cut");
        assert!(
            n > 0,
            "the download was cut after {} of {} bytes",
            body.len(),
            blob.len()
        );
        body.extend_from_slice(&buf[..n]);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(sha256_digest(&body), digest);
    // Then the process exits by itself, cleanly.
    let status = c.exited().await;
    assert!(status.success(), "exit after the drain: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_exits_at_once() {
    // A drain far longer than the test's patience: only the second signal can end it.
    let (_fake, _dir, mut c, digest, _blob) = launched(
        32 << 20,
        Launch {
            server: "drain_timeout = \"1h\"",
            ..Launch::default()
        },
    )
    .await;
    cache_blob(&c, &digest).await;
    // A client that stops reading holds its response in flight.
    let mut s = TcpStream::connect(c.addr).await.unwrap();
    s.write_all(format!("GET /v2/{REPO}/blobs/{digest} HTTP/1.1\r\nHost: m\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    signal(&c, rustix::process::Signal::TERM);
    wait_refused(c.addr).await;
    assert!(
        c.child.0.try_wait().unwrap().is_none(),
        "exited while a response was in flight"
    );
    signal(&c, rustix::process::Signal::TERM);
    let status = c.exited().await;
    assert_eq!(status.code(), Some(1), "{status}");
    drop(s);
}

#[tokio::test]
async fn while_draining_readyz_is_503_and_responses_close_their_connection() {
    let env = Env::start().await;
    let r = env.client.get(&env.url("/readyz")).await;
    assert_eq!(r.status, 200);
    env.proxy.server().mirror.start_draining();
    let r = env.client.get(&env.url("/readyz")).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("connection"), Some("close".into()));
}

/// Sends a GET of `path` on `s`, kept alive, and reads its whole response: (status, body).
async fn get_kept_alive(s: &mut TcpStream, path: &str) -> (u16, Vec<u8>) {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: m\r\n\r\n").as_bytes())
        .await
        .expect("send request");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let n = s.read(&mut buf).await.expect("read response head");
        assert!(n > 0, "connection closed before a response (asked {path})");
        got.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
    let status = head[9..12].parse().expect("a status code");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .expect("a content-length")
        .trim()
        .parse()
        .expect("a number");
    let mut body = got.split_off(end);
    while body.len() < len {
        let n = s.read(&mut buf).await.expect("read response body");
        assert!(n > 0, "connection closed in the body");
        body.extend_from_slice(&buf[..n]);
    }
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_limit_the_longest_idle_connection_makes_room_and_no_download_is_cut() {
    // Four connections, and a keep-alive timeout far beyond the test's patience.
    let (_fake, _dir, c, digest, blob) = launched(
        32 << 20,
        Launch {
            server: "max_connections = 4\nheader_timeout = \"60s\"",
            ..Launch::default()
        },
    )
    .await;
    cache_blob(&c, &digest).await;
    // Only the metrics request itself is left.
    let deadline = tokio::time::Instant::now() + SAFETY;
    while c.metric("cachalot_connections_open").await > 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "connections linger");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // One place holds a download in the middle: its client has stopped reading.
    let mut slow = TcpStream::connect(c.addr).await.unwrap();
    slow.write_all(format!("GET /v2/{REPO}/blobs/{digest} HTTP/1.1\r\nHost: m\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = vec![0u8; 1 << 20];
    slow.read_exact(&mut got).await.unwrap();
    // The three others are idle between requests, the first the longest.
    let mut idle = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(c.addr).await.unwrap();
        assert_eq!(get_kept_alive(&mut s, "/v2/").await.0, 200);
        idle.push(s);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }

    // A new client is answered at once, not after a keep-alive timeout.
    let (status, _, _) = tokio::time::timeout(Duration::from_secs(5), get_once(c.addr, "/v2/"))
        .await
        .expect("the new client waited for a place");
    assert_eq!(status, 200);
    // The place was the longest idle connection's: it was closed (and said nothing more).
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(SAFETY, idle[0].read(&mut buf))
        .await
        .expect("the longest idle connection stayed open")
        .unwrap_or(0);
    assert_eq!(n, 0, "the closed connection sent something");
    // The other idle connections still serve.
    for s in &mut idle[1..] {
        assert_eq!(get_kept_alive(s, "/v2/").await.0, 200);
    }
    drop(idle);
    assert_eq!(c.metric("cachalot_connections_reclaimed_total").await, 1.0);

    // The download, held in the middle all along, runs to its end.
    let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(got.starts_with(b"HTTP/1.1 200"));
    let mut body = got.split_off(head_end);
    let mut buf = vec![0u8; 1 << 20];
    while body.len() < blob.len() {
        let n = tokio::time::timeout(SAFETY, slow.read(&mut buf))
            .await
            .expect("the download stalled")
            .expect("the download was cut");
        assert!(n > 0, "the download was cut after {} bytes", body.len());
        body.extend_from_slice(&buf[..n]);
    }
    assert_eq!(sha256_digest(&body), digest);
}

/// The server's resident memory, in KiB.
fn rss_kib(c: &Cachalot) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", c.child.0.id())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// A fleet pulling at once costs the mirror a few kilobytes a client (issue 21): 800 clients,
/// each with a 1 MiB download in flight that it reads slowly, add less than 16 KiB each to the
/// server's resident memory. hyper's HTTP/1 path held about 35 KB on each (a read buffer doubled
/// while a request was in flight, a write buffer, a task sized for HTTP/2), and nginx about 10.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_downloads_in_flight_cost_a_few_kilobytes_each() {
    const CLIENTS: usize = 800;
    // Each client is a descriptor here as well.
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    if let Some(hard) = limit.maximum {
        let _ = rustix::process::setrlimit(
            rustix::process::Resource::Nofile,
            rustix::process::Rlimit {
                current: Some(hard),
                maximum: Some(hard),
            },
        );
    }
    let (_fake, _dir, c, digest, _blob) = launched(
        1 << 20,
        Launch {
            server: "max_connections = 2000",
            ..Launch::default()
        },
    )
    .await;
    cache_blob(&c, &digest).await;
    let before = rss_kib(&c);
    let request = format!("GET /v2/{REPO}/blobs/{digest} HTTP/1.1\r\nHost: m\r\n\r\n");
    let mut clients = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        // A small receive window keeps each download in flight: the server cannot hand the
        // whole blob to the kernel and be done with it.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut s = socket.connect(c.addr).await.expect("connect");
        s.write_all(request.as_bytes()).await.unwrap();
        clients.push(s);
    }
    // Every download has begun once its head has come.
    let mut body_read = Vec::with_capacity(CLIENTS);
    for s in &mut clients {
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tokio::time::timeout(SAFETY, s.read(&mut buf))
                .await
                .expect("safety timeout: no response head")
                .unwrap();
            assert!(n > 0, "closed before its head");
            got.extend_from_slice(&buf[..n]);
        }
        assert!(
            got.starts_with(b"HTTP/1.1 200 "),
            "{}",
            String::from_utf8_lossy(&got)
        );
        let head = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        body_read.push(got.len() - head);
    }
    // Ours, and the scrape's own.
    assert!(c.metric("cachalot_connections_open").await >= CLIENTS as f64);
    let after = rss_kib(&c);
    let each = after.saturating_sub(before) * 1024 / CLIENTS as u64;
    assert!(
        each < 16 * 1024,
        "{each} bytes a client ({before} KiB before, {after} KiB with {CLIENTS} downloads)"
    );
    // And every one of them gets the whole blob.
    let mut readers = Vec::new();
    for (mut s, mut read) in clients.drain(..100).zip(body_read) {
        readers.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 1 << 16];
            while read < (1 << 20) {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "download cut short");
                read += n;
            }
            assert_eq!(read, 1 << 20, "more than the blob");
        }));
    }
    for r in readers {
        tokio::time::timeout(SAFETY, r)
            .await
            .expect("safety timeout: a slow download never ended")
            .unwrap();
    }
}
