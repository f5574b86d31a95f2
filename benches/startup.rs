//! Startup time with a large cache (issue 3: "ready to serve a cache of 100,000 blobs within 1
//! second of start, with the upstream down"). A benchmark, not a timed test.
//!
//! Builds a cache of N tiny blobs (files under `blobs/sha256/<2 hex>/<hex>` with their real
//! SHA-256, and their object rows written with `Store::open` + `meta.put_objects` in batches),
//! then measures, from spawning `cachalot serve --config FILE` with the upstream on a closed
//! port, the time to the first 200 from `GET /readyz` and then to the first 200 from a `GET` of
//! one cached blob (both measured from the spawn). Two series:
//! - clean: every run ends with SIGTERM (a graceful stop), so the next start opens a cleanly
//!   closed metadata store;
//! - after kill -9: every run ends with SIGKILL, so the next start is a crash restart.
//!
//! `cargo bench --bench startup`: 100,000 blobs, median of 5 runs per series, release binary.
//! Without `--bench` (as `cargo test --all-targets` runs it): a smoke run, 1,000 blobs, 1 run.
//! The binary: `$CACHALOT_BIN`, else the one cargo built beside this bench (the release binary
//! under `cargo bench`), else `cachalot` next to the bench executable's directory; if none
//! exists, the bench says so and skips.

use cachalot::oci::Digest;
use cachalot::storage::{FsStore, Store};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

const FULL_BLOBS: usize = 100_000;
const FULL_RUNS: usize = 5;
const SMOKE_BLOBS: usize = 1_000;
const SMOKE_RUNS: usize = 1;
const BATCH: usize = 10_000;
const REPO: &str = "bench/startup";
/// Safety net per start (not a performance bound).
const SAFETY: Duration = Duration::from_secs(120);

/// Kills and reaps the server whatever happens.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (blobs, runs) = if full {
        (FULL_BLOBS, FULL_RUNS)
    } else {
        (SMOKE_BLOBS, SMOKE_RUNS)
    };
    let Some(bin) = find_binary() else {
        println!(
            "startup bench: no cachalot binary found (set CACHALOT_BIN, or build it: \
             cargo build --release); skipping"
        );
        return;
    };
    println!(
        "startup bench: {} mode, {blobs} blobs, {runs} run(s) per series, binary {}",
        if full { "full" } else { "smoke" },
        bin.display()
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().join("cache");
    let t = Instant::now();
    let probe = build_cache(&cache, blobs);
    println!(
        "  built the cache in {:.1}s ({} files, {} rows)",
        t.elapsed().as_secs_f64(),
        blobs,
        blobs
    );
    let upstream = closed_port();
    let blob_path = format!("/v2/{REPO}/blobs/{probe}");

    for (series, term) in [("clean restart", true), ("after kill -9", false)] {
        if !term {
            // Unmeasured: so that the first measured start, too, follows a kill -9.
            one_start(&bin, dir.path(), &cache, upstream, &blob_path, false, runs);
        }
        let mut ready = Vec::new();
        let mut blob = Vec::new();
        for run in 0..runs {
            let (r, b) = one_start(&bin, dir.path(), &cache, upstream, &blob_path, term, run);
            ready.push(r);
            blob.push(b);
        }
        println!(
            "  {series:<14} /readyz 200 after {}, cached blob 200 after {} (median of {runs}; \
             runs: readyz {:?}, blob {:?})",
            ms(median(&mut ready)),
            ms(median(&mut blob)),
            ready.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
            blob.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
        );
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1}ms", d.as_secs_f64() * 1e3)
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn find_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CACHALOT_BIN") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = option_env!("CARGO_BIN_EXE_cachalot").map(PathBuf::from)
        && p.is_file()
    {
        return Some(p);
    }
    // target/<profile>/deps/startup-<hash> -> target/<profile>/cachalot
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.parent()?.join("cachalot");
    p.is_file().then_some(p)
}

/// Writes `n` tiny blobs and their rows; returns the digest of one of them to probe.
fn build_cache(cache: &Path, n: usize) -> Digest {
    let store = Store::open(cache).expect("open the cache");
    let now = SystemTime::now();
    let mut batch = Vec::with_capacity(BATCH);
    let mut probe = None;
    for i in 0..n {
        let content = format!("cachalot startup bench blob {i}\n");
        let digest = Digest::sha256_of(content.as_bytes());
        let path = FsStore::blob_path_in(cache, &digest);
        std::fs::create_dir_all(path.parent().unwrap()).expect("create blob dir");
        std::fs::write(&path, &content).expect("write blob");
        if i == n / 2 {
            probe = Some(digest.clone());
        }
        batch.push((digest, content.len() as u64, format!("bench.local/{REPO}")));
        if batch.len() == BATCH {
            store.meta().put_objects(&batch, now).expect("put_objects");
            batch.clear();
        }
    }
    if !batch.is_empty() {
        store.meta().put_objects(&batch, now).expect("put_objects");
    }
    probe.expect("at least one blob")
}

/// A port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .unwrap()
        .port()
}

fn write_config(dir: &Path, cache: &Path, port: u16, upstream: u16) -> PathBuf {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n\n[cache]\ndir = {:?}\nmax_size = \"10GiB\"\n\
         memory = \"64MiB\"\ntag_ttl = \"5m\"\n\n[[upstream]]\nname = \"bench.local\"\n\
         url = \"http://127.0.0.1:{upstream}\"\ndefault = true\nconnect_timeout = \"2s\"\n",
        cache.to_str().expect("utf-8 temp path"),
    );
    let path = dir.join("cachalot.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// One start: spawn, time to /readyz 200, time to the probe blob's 200, then stop the server
/// (SIGTERM and wait if `term`, else SIGKILL).
fn one_start(
    bin: &Path,
    dir: &Path,
    cache: &Path,
    upstream: u16,
    blob_path: &str,
    term: bool,
    run: usize,
) -> (Duration, Duration) {
    for attempt in 0.. {
        let port = closed_port();
        let config = write_config(dir, cache, port, upstream);
        let log_path = dir.join(format!("cachalot-{}-{run}-{attempt}.log", term as u8));
        let log = std::fs::File::create(&log_path).expect("log file");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let start = Instant::now();
        let child = Command::new(bin)
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn cachalot");
        let mut guard = Guard(child);
        let ready = match poll_200(&mut guard, addr, "/readyz", start) {
            Ok(d) => d,
            Err(exited) => {
                let text = std::fs::read_to_string(&log_path).unwrap_or_default();
                if text.contains("server.listen") && attempt < 5 {
                    continue; // the port was taken meanwhile
                }
                panic!("cachalot exited at start ({exited}):\n{text}");
            }
        };
        let blob = poll_200(&mut guard, addr, blob_path, start).unwrap_or_else(|e| {
            panic!(
                "cachalot exited ({e}):\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            )
        });
        if term {
            let _ = Command::new("kill")
                .args(["-TERM", &guard.0.id().to_string()])
                .status();
            let deadline = Instant::now() + SAFETY;
            while guard.0.try_wait().expect("try_wait").is_none() {
                assert!(Instant::now() < deadline, "safety: no exit after SIGTERM");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        drop(guard);
        return (ready, blob);
    }
    unreachable!()
}

/// Polls `GET path` until it answers 200; the time since `start`. `Err` if the server exited.
fn poll_200(
    guard: &mut Guard,
    addr: SocketAddr,
    path: &str,
    start: Instant,
) -> Result<Duration, String> {
    loop {
        if get_status(addr, path) == Some(200) {
            return Ok(start.elapsed());
        }
        if let Some(s) = guard.0.try_wait().expect("try_wait") {
            return Err(s.to_string());
        }
        assert!(start.elapsed() < SAFETY, "safety: no 200 from {path}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The status of `GET path` on a fresh HTTP/1.1 connection, or None if it could not be had.
fn get_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.windows(2).any(|w| w == b"\r\n") {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    line.split_whitespace().nth(1)?.parse().ok()
}
