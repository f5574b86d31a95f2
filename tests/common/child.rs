//! `cachalot serve` as a child process in front of the fake upstream, for tests of what only a
//! real process shows: crashes (`kill -9`, crash points), signals, resource limits.

use super::*;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_cachalot");
/// Safety net for waits on processes and files (never a performance assertion).
pub const SAFETY: Duration = Duration::from_secs(60);

/// Kills (SIGKILL) and reaps the child when dropped.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One running `cachalot serve`.
pub struct Cachalot {
    pub child: ChildGuard,
    pub addr: SocketAddr,
    pub log: PathBuf,
    pub config: PathBuf,
}

pub static RUN: AtomicU32 = AtomicU32::new(0);

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .unwrap()
        .port()
}

/// The cache directory of a test's temp dir.
pub fn cache_dir(dir: &Path) -> PathBuf {
    dir.join("cache")
}

/// Writes the config for a cachalot on `port` (0: any) in front of `upstream_url`, with
/// `max_size`; returns its path.
pub fn write_config(
    dir: &Path,
    name: &str,
    upstream_url: &str,
    port: u16,
    max_size: &str,
) -> PathBuf {
    let text = config_toml(
        &cache_dir(dir),
        &CacheSpec::default(),
        &[UpstreamSpec::new(UP, upstream_url, true)],
    );
    let listen = "listen = \"127.0.0.1:0\"";
    let size = "max_size = \"1GiB\"";
    assert!(
        text.contains(listen) && text.contains(size),
        "config_toml changed shape:\n{text}"
    );
    let text = text
        .replace(listen, &format!("listen = \"127.0.0.1:{port}\""))
        .replace(size, &format!("max_size = {max_size:?}"));
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

/// How [`Cachalot::launch`] starts the process.
#[derive(Default)]
pub struct Launch<'a> {
    /// `CACHALOT_CRASH_POINT`.
    pub crash_point: Option<&'a str>,
    /// Soft and hard open-file limit (through `prlimit`).
    pub open_files: Option<u64>,
    /// Lines added to `[server]`.
    pub server: &'a str,
}

impl Cachalot {
    /// Starts `cachalot serve` on the cache in `dir`, on a free port (retried if another
    /// process took it meanwhile), and waits until it accepts connections and /readyz is 200.
    pub async fn start(dir: &Path, upstream_url: &str, crash_point: Option<&str>) -> Cachalot {
        Cachalot::launch(
            dir,
            upstream_url,
            Launch {
                crash_point,
                ..Launch::default()
            },
        )
        .await
    }

    /// [`Cachalot::start`], as `how` says.
    pub async fn launch(dir: &Path, upstream_url: &str, how: Launch<'_>) -> Cachalot {
        for attempt in 0.. {
            let port = free_port();
            let config = write_config(dir, "cachalot.toml", upstream_url, port, "1GiB");
            if !how.server.is_empty() {
                let text = std::fs::read_to_string(&config).expect("read config");
                let text = text.replacen("[server]\n", &format!("[server]\n{}\n", how.server), 1);
                std::fs::write(&config, text).expect("write config");
            }
            let n = RUN.fetch_add(1, Ordering::Relaxed);
            let log = dir.join(format!("cachalot-{n}.log"));
            let out = std::fs::File::create(&log).expect("create log");
            // util-linux's prlimit sets both limits before cachalot starts, so it cannot
            // raise its soft limit past them.
            let mut cmd = match how.open_files {
                Some(n) => {
                    let mut c = Command::new("prlimit");
                    c.arg(format!("--nofile={n}:{n}")).arg("--").arg(BIN);
                    c
                }
                None => Command::new(BIN),
            };
            cmd.args(["serve", "--config"])
                .arg(&config)
                .env_remove("CACHALOT_CRASH_POINT")
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out);
            if let Some(p) = how.crash_point {
                cmd.env("CACHALOT_CRASH_POINT", p);
            }
            let mut child = ChildGuard(cmd.spawn().expect("spawn cachalot"));
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let deadline = tokio::time::Instant::now() + SAFETY;
            loop {
                if tokio::net::TcpStream::connect(addr).await.is_ok() {
                    let c = Cachalot {
                        child,
                        addr,
                        log,
                        config,
                    };
                    let r = TestClient::new().get(&c.url("/readyz")).await;
                    assert_eq!(r.status, 200, "/readyz after start: {}", r.text());
                    return c;
                }
                if let Some(status) = child.0.try_wait().expect("try_wait") {
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    if text.contains("server.listen") && attempt < 5 {
                        break; // the port was taken meanwhile: pick another
                    }
                    panic!("cachalot exited at start ({status}):\n{text}");
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "safety timeout: cachalot did not start listening"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        unreachable!()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn blob_url(&self, repo: &str, digest: &str) -> String {
        self.url(&format!("/v2/{repo}/blobs/{digest}"))
    }

    /// `kill -9`, and reap.
    pub fn kill9(mut self) -> ExitStatus {
        self.child.0.kill().expect("kill -9 cachalot");
        self.child.0.wait().expect("wait for cachalot")
    }

    /// Waits for the process to exit by itself.
    pub async fn exited(&mut self) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + SAFETY;
        loop {
            if let Some(s) = self.child.0.try_wait().expect("try_wait") {
                return s;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "safety timeout: cachalot did not exit; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn metric(&self, name: &str) -> f64 {
        let r = TestClient::new().get(&self.url("/metrics")).await;
        assert_eq!(r.status, 200, "/metrics");
        metric_value(&r.text(), name, &[])
    }
}

/// What a `cachalot` command printed, and whether it succeeded.
pub struct CliOut {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cachalot ARGS` to its end (two minutes at most).
pub async fn run_cli(args: &[&str]) -> CliOut {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(BIN)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("cachalot finished within 2 minutes")
    .expect("run cachalot");
    CliOut {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
