//! HTTPS serving with rustls when server.tls_cert and server.tls_key are set, and the
//! certificate's reload when the files change (in place, or by a swapped symlinked directory as
//! Kubernetes does for a mounted Secret) or on SIGHUP, without dropping connections.

#[path = "e2e_support/certs.rs"]
#[allow(dead_code)]
mod certs;

use certs::{Leaf, TestCa};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::test]
async fn serves_https_with_the_configured_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    let config = cachalot::config::Config::from_toml_str(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ntls_cert = {:?}\ntls_key = {:?}\n[cache]\ndir = {:?}\n\
         [[upstream]]\nname = \"docker.io\"\nurl = \"http://127.0.0.1:9\"\ndefault = true\n",
        cert_path,
        key_path,
        dir.path().join("cache")
    ))
    .unwrap();
    let server = cachalot::server::spawn(config).await.unwrap();

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let client_config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(client_config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = send
        .send_request(
            http::Request::get("/v2/")
                .header("host", "localhost")
                .body(Empty::<bytes::Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["docker-distribution-api-version"],
        "registry/2.0"
    );
    let _ = resp.into_body().collect().await.unwrap();

    // Plain HTTP to the TLS port is not served.
    let mut plain = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    plain
        .write_all(b"GET /v2/ HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        plain.read_to_end(&mut buf),
    )
    .await;
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
    server.shutdown().await;
}

#[tokio::test]
async fn a_missing_certificate_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = cachalot::config::Config::from_toml_str(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ntls_cert = \"/nonexistent/tls.crt\"\ntls_key = \"/nonexistent/tls.key\"\n[cache]\ndir = {:?}\n",
        dir.path().join("cache")
    ))
    .unwrap();
    let err = cachalot::server::spawn(config)
        .await
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("server.tls_cert"), "{err}");
}

/// One HTTP/1.1 connection over TLS, and the certificate the server presented on it.
struct TlsConn {
    send: hyper::client::conn::http1::SendRequest<Empty<bytes::Bytes>>,
    peer: Vec<u8>,
}

impl TlsConn {
    async fn open(addr: std::net::SocketAddr, roots: &[&[u8]]) -> TlsConn {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(certs::client_config(roots)))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .expect("TLS handshake with cachalot");
        let peer = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        TlsConn { send, peer }
    }

    /// GET `path` on this connection: status and body.
    async fn get(&mut self, path: &str) -> (u16, String) {
        let resp = self
            .send
            .send_request(
                http::Request::get(path)
                    .header("host", "localhost")
                    .body(Empty::new())
                    .unwrap(),
            )
            .await
            .expect("request on an open connection");
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

fn config_for(cert: &Path, key: &Path, cache: &Path) -> cachalot::config::Config {
    cachalot::config::Config::from_toml_str(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ntls_cert = {cert:?}\ntls_key = {key:?}\n\
         [cache]\ndir = {cache:?}\n\
         [[upstream]]\nname = \"docker.io\"\nurl = \"http://127.0.0.1:9\"\ndefault = true\n"
    ))
    .unwrap()
}

/// Opens new connections until one is served `want` (the reload is polled, so it lands within
/// seconds, not at once); panics after a generous minute.
async fn wait_for_certificate(addr: std::net::SocketAddr, roots: &[&[u8]], want: &Leaf) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if TlsConn::open(addr, roots).await.peer == want.cert_der {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "new connections never got the new certificate"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `cachalot_tls_reloads_total{result}` as served on a new connection.
async fn reloads(addr: std::net::SocketAddr, roots: &[&[u8]], result: &str) -> u64 {
    let (status, text) = TlsConn::open(addr, roots).await.get("/metrics").await;
    assert_eq!(status, 200);
    let series = format!("cachalot_tls_reloads_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .unwrap_or_else(|| panic!("no {series} in /metrics"))
        .trim()
        .parse()
        .unwrap()
}

async fn wait_for_failed_reloads(addr: std::net::SocketAddr, roots: &[&[u8]], at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while reloads(addr, roots, "failed").await < at_least {
        assert!(Instant::now() < deadline, "the broken pair was never tried");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_rewritten_certificate_reaches_new_connections_and_old_ones_carry_on() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_a, ca_b, ca_c) = (
        TestCa::new("ca A"),
        TestCa::new("ca B"),
        TestCa::new("ca C"),
    );
    let (a, b, c) = (
        ca_a.server("pair A"),
        ca_b.server("pair B"),
        ca_c.server("pair C"),
    );
    let (cert, key) = a.write(dir.path(), "tls");
    let server = cachalot::server::spawn(config_for(&cert, &key, &dir.path().join("cache")))
        .await
        .unwrap();
    let addr = server.local_addr();
    let (da, db, dc) = (ca_a.der(), ca_b.der(), ca_c.der());
    let roots: [&[u8]; 3] = [&da, &db, &dc];

    let mut old = TlsConn::open(addr, &roots).await;
    assert_eq!(old.peer, a.cert_der, "served pair A at start");
    assert_eq!(old.get("/v2/").await.0, 200);

    // Rewritten in place, as a deploy script or `cp` would.
    b.write(dir.path(), "tls");
    wait_for_certificate(addr, &roots, &b).await;
    assert_eq!(
        old.get("/v2/").await.0,
        200,
        "the connection opened with pair A still answers"
    );
    // (A poll may have caught cert B beside key A, which counts as one failed reload.)
    let failed = reloads(addr, &roots, "failed").await;

    // A certificate with another pair's key: refused, pair B stays.
    std::fs::write(&cert, &c.cert_pem).unwrap();
    wait_for_failed_reloads(addr, &roots, failed + 1).await;
    assert_eq!(TlsConn::open(addr, &roots).await.peer, b.cert_der);
    // Not PEM at all: refused too.
    std::fs::write(&cert, "not a certificate\n").unwrap();
    std::fs::write(&key, &c.key_pem).unwrap();
    wait_for_failed_reloads(addr, &roots, failed + 2).await;
    assert_eq!(TlsConn::open(addr, &roots).await.peer, b.cert_der);
    assert_eq!(old.get("/v2/").await.0, 200);

    // Fixed: the next change is picked up.
    c.write(dir.path(), "tls");
    wait_for_certificate(addr, &roots, &c).await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_swapped_secret_volume_is_picked_up() {
    // The layout kubelet gives a mounted Secret: tls.crt -> ..data/tls.crt, ..data -> a
    // timestamped directory; an update writes a new directory and renames a new ..data link
    // over the old one, so the files the config names are never rewritten.
    let dir = tempfile::tempdir().unwrap();
    let (ca_a, ca_b) = (TestCa::new("ca A"), TestCa::new("ca B"));
    let (a, b) = (ca_a.server("pair A"), ca_b.server("pair B"));
    let v1 = dir.path().join("..2026_01_01");
    std::fs::create_dir(&v1).unwrap();
    a.write(&v1, "tls");
    std::os::unix::fs::symlink("..2026_01_01", dir.path().join("..data")).unwrap();
    for f in ["tls.crt", "tls.key"] {
        std::os::unix::fs::symlink(format!("..data/{f}"), dir.path().join(f)).unwrap();
    }
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let server = cachalot::server::spawn(config_for(&cert, &key, &dir.path().join("cache")))
        .await
        .unwrap();
    let addr = server.local_addr();
    let (da, db) = (ca_a.der(), ca_b.der());
    let roots: [&[u8]; 2] = [&da, &db];
    let mut old = TlsConn::open(addr, &roots).await;
    assert_eq!(old.peer, a.cert_der);

    let v2 = dir.path().join("..2026_02_01");
    std::fs::create_dir(&v2).unwrap();
    b.write(&v2, "tls");
    std::os::unix::fs::symlink("..2026_02_01", dir.path().join("..data_tmp")).unwrap();
    std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
    std::fs::remove_dir_all(&v1).unwrap();

    wait_for_certificate(addr, &roots, &b).await;
    assert_eq!(old.get("/v2/").await.0, 200);
    server.shutdown().await;
}

#[tokio::test]
async fn a_key_that_is_not_the_certificates_fails_at_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("ca");
    let (cert, _) = ca.server("one").write(dir.path(), "one");
    let (_, key) = ca.server("two").write(dir.path(), "two");
    let err = cachalot::server::spawn(config_for(&cert, &key, &dir.path().join("cache")))
        .await
        .err()
        .expect("a mismatched pair must not start");
    let msg = err.to_string();
    assert!(msg.contains("server.tls_key"), "{msg}");
    assert!(msg.contains("does not belong"), "{msg}");
}

/// The binary, as an operator runs it: after `kill -HUP` the certificate is reloaded at once
/// (the log says so, naming SIGHUP) and new connections get the new pair.
#[tokio::test]
async fn sighup_reloads_the_certificate() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let (ca_a, ca_b) = (TestCa::new("ca A"), TestCa::new("ca B"));
    let (a, b) = (ca_a.server("pair A"), ca_b.server("pair B"));
    let (cert, key) = a.write(dir.path(), "tls");
    let config = dir.path().join("cachalot.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ntls_cert = {cert:?}\ntls_key = {key:?}\n\
             [cache]\ndir = {:?}\n\
             [[upstream]]\nname = \"docker.io\"\nurl = \"http://127.0.0.1:9\"\ndefault = true\n",
            dir.path().join("cache")
        ),
    )
    .unwrap();
    /// Kills the server if the test fails half way, so no process outlives it.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cachalot"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map(Killed)
        .unwrap();
    let pid = child.0.id().to_string();
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    let stderr = child.0.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let wait_line = |what: &dyn Fn(&str) -> bool| -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(l) if what(&l) => return l,
                Ok(_) => {}
                Err(e) => panic!("cachalot never logged the expected line: {e}"),
            }
        }
    };
    let listening = wait_line(&|l| l.contains("cachalot listening"));
    let addr: std::net::SocketAddr = listening
        .split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .expect("the listening line names its address")
        .parse()
        .unwrap();
    let (da, db) = (ca_a.der(), ca_b.der());
    let roots: [&[u8]; 2] = [&da, &db];
    assert_eq!(TlsConn::open(addr, &roots).await.peer, a.cert_der);

    b.write(dir.path(), "tls");
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(hup.success());
    let reloaded = wait_line(&|l| l.contains("reloaded TLS certificate") && l.contains("SIGHUP"));
    assert!(!reloaded.contains("BEGIN"), "no PEM in the log: {reloaded}");
    assert_eq!(
        TlsConn::open(addr, &roots).await.peer,
        b.cert_der,
        "after the SIGHUP reload"
    );
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "SIGHUP must not end the server"
    );
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    let status = child.0.wait().unwrap();
    assert!(
        status.success(),
        "SIGTERM ends the server cleanly: {status}"
    );
}

#[test]
fn check_config_reads_the_server_pair() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("ca");
    let (cert, key) = ca.server("one").write(dir.path(), "one");
    let (_, other_key) = ca.server("two").write(dir.path(), "two");
    let check = |cert: &Path, key: &Path| {
        let file = dir.path().join("check.toml");
        std::fs::write(
            &file,
            format!("[server]\ntls_cert = {cert:?}\ntls_key = {key:?}\n"),
        )
        .unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_cachalot"))
            .args(["check-config", "--config"])
            .arg(&file)
            .output()
            .unwrap()
    };
    let out = check(&cert, &key);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = check(&dir.path().join("missing.crt"), &key);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("server.tls_cert"), "{stderr}");
    assert!(stderr.contains("missing.crt"), "{stderr}");
    let out = check(&cert, &other_key);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("does not belong"), "{stderr}");
}
