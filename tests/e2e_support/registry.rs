//! Debian's `docker-registry` (distribution 2.8) as a child process: filesystem storage in a temp
//! dir, token auth pointing at a [`TokenIssuer`] (or no auth), plain HTTP or TLS (optionally
//! requiring client certificates), listening on a free 127.0.0.1 port.
//!
//! The registry runs under a tiny `sh` supervisor that kills it when its stdin closes, so the
//! registry dies with the test process even when the test binary aborts or never drops this value
//! (the shared upstream lives in a static).

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use super::issuer::TokenIssuer;

/// How a registry is started: [`Distribution::start`] is token auth over plain HTTP.
#[derive(Default)]
pub struct RegistryOptions<'a> {
    /// Token auth trusting this issuer; `None`: anyone may pull and push.
    pub auth: Option<&'a TokenIssuer>,
    /// Serve HTTPS (`http.tls`).
    pub tls: Option<RegistryTls>,
}

/// `http.tls`: the registry's certificate, and the CAs whose client certificates it requires.
#[derive(Clone, Debug)]
pub struct RegistryTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// With it, a client without a certificate signed by this CA is refused in the handshake.
    pub client_ca: Option<PathBuf>,
}

/// A running `docker-registry`; killed on drop.
pub struct Distribution {
    addr: SocketAddr,
    tls: bool,
    supervisor: Child,
    stdin: Option<ChildStdin>,
    pid_file: PathBuf,
    log_file: PathBuf,
    dir: tempfile::TempDir,
}

const SUPERVISOR: &str = r#"
"$REGISTRY_BIN" serve "$1" >"$2" 2>&1 &
pid=$!
echo "$pid" >"$3"
cat >/dev/null
kill "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
exit 0
"#;

impl Distribution {
    /// Starts a registry that trusts `issuer`, and waits until `/v2/` answers.
    pub async fn start(issuer: &TokenIssuer) -> Distribution {
        Distribution::start_with(RegistryOptions {
            auth: Some(issuer),
            tls: None,
        })
        .await
    }

    /// Starts a registry as `options` say, and waits until it answers (over TLS: accepts
    /// connections).
    pub async fn start_with(options: RegistryOptions<'_>) -> Distribution {
        let bin = super::tools::find_in_path("docker-registry").expect("docker-registry in PATH");
        let mut last_log = String::new();
        for _attempt in 0..3 {
            let dir = super::tools::tempdir("registry");
            let port = free_port();
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let config = dir.path().join("config.yml");
            std::fs::write(&config, config_yml(&dir, addr, &options)).expect("write config.yml");
            let log_file = dir.path().join("registry.log");
            let pid_file = dir.path().join("registry.pid");
            let mut supervisor = Command::new("sh")
                .arg("-c")
                .arg(SUPERVISOR)
                .arg("sh")
                .arg(&config)
                .arg(&log_file)
                .arg(&pid_file)
                .env("REGISTRY_BIN", &bin)
                .env_remove("REGISTRY_HTTP_ADDR")
                .env_remove("REGISTRY_STORAGE")
                .env_remove("REGISTRY_AUTH")
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn sh supervising docker-registry");
            let stdin = supervisor.stdin.take();
            let mut reg = Distribution {
                addr,
                tls: options.tls.is_some(),
                supervisor,
                stdin,
                pid_file,
                log_file,
                dir,
            };
            if reg.wait_ready(Duration::from_secs(20)).await {
                return reg;
            }
            last_log = reg.log();
            drop(reg);
            if !last_log.contains("address already in use") {
                break;
            }
        }
        panic!("docker-registry did not start; its log:\n{last_log}");
    }

    async fn wait_ready(&mut self, limit: Duration) -> bool {
        let start = Instant::now();
        let url = format!("{}/v2/", self.url());
        while start.elapsed() < limit {
            if self.tls {
                // The plain test client cannot speak TLS: a registry that accepts is up, since
                // it listens only once configured.
                if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                    return true;
                }
            } else if let Ok(resp) = super::http::request(hyper::Method::GET, &url, &[]).await {
                // With token auth an anonymous ping is challenged.
                if resp.status == 401 || resp.status == 200 {
                    return true;
                }
            }
            if !self.registry_alive() && start.elapsed() > Duration::from_millis(500) {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    fn registry_pid(&self) -> Option<u32> {
        std::fs::read_to_string(&self.pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn registry_alive(&self) -> bool {
        match self.registry_pid() {
            Some(pid) => std::path::Path::new(&format!("/proc/{pid}")).exists(),
            None => true, // not written yet
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, or `https://` when it serves TLS.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The registry's combined stdout/stderr so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log_file) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// The registry's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Stops the registry now (the port then refuses connections).
    pub fn stop(&mut self) {
        // Closing stdin makes the supervisor kill the registry and exit.
        self.stdin.take();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.supervisor.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(pid) = self.registry_pid() {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
        let _ = self.supervisor.kill();
        let _ = self.supervisor.wait();
    }
}

impl Drop for Distribution {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("find a free port")
        .port()
}

fn config_yml(dir: &tempfile::TempDir, addr: SocketAddr, options: &RegistryOptions<'_>) -> String {
    let mut yml = format!(
        r#"version: 0.1
log:
  level: info
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {data}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: {addr}
  secret: cachalot-e2e-http-secret
"#,
        data = dir.path().join("data").display(),
    );
    if let Some(tls) = &options.tls {
        let quoted = |p: &Path| format!("{:?}", p.display().to_string());
        yml.push_str(&format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            quoted(&tls.cert),
            quoted(&tls.key)
        ));
        if let Some(ca) = &tls.client_ca {
            yml.push_str(&format!("    clientcas:\n      - {}\n", quoted(ca)));
        }
    }
    if let Some(issuer) = options.auth {
        let cfg = issuer.config();
        yml.push_str(&format!(
            r#"auth:
  token:
    realm: {realm}
    service: {service}
    issuer: {iss}
    rootcertbundle: {bundle}
"#,
            realm = issuer.realm(),
            service = cfg.service,
            iss = cfg.issuer,
            bundle = issuer.root_cert_bundle().display(),
        ));
    }
    yml
}
