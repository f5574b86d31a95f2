//! Garage 2.5 (the Rust distributed object store) as an N-node cluster on loopback: the real
//! S3-compatible store the `[storage] backend = "s3"` tests run against.
//!
//! Each node is a `garage server` with its own directory and ports, under the same kind of `sh`
//! supervisor as [`super::registry::Distribution`], so the nodes die with the test process even
//! when it aborts. The cluster is wired the way an operator would do it, with the `garage` CLI:
//! `node connect`, `layout assign` + `layout apply`, `bucket create`, `key import`, `bucket allow`.
//!
//! The binary is `GARAGE_BIN`, else `$CARGO_HOME/bin/garage` (`~/.cargo/bin/garage`, where
//! `cargo install garage --version 2.5.0 --locked` puts it), else `garage` in `PATH`. Without
//! one, [`Garage::start`] skips (returns `None`) unless `CI` is set, where it fails.
//!
//! The nodes run with Garage's defaults where they matter to cachalot. One to know: after a node
//! is killed, a survivor's first request that waits on that node stalls until the survivor's
//! next ping finds the connection broken (pings go every 15 s; 2 to 9 s measured here), and only
//! then is answered by the quorum of the other two; later requests are immediate. Garage's
//! `rpc_timeout_msec` (default 300 s) would bound it; it is left alone so the tests see what a
//! default deployment does.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use super::registry::free_port;
use super::tools;

/// The `s3_region` every node is configured with.
pub const REGION: &str = "garage";
/// The bucket [`Garage::start`] creates.
pub const BUCKET: &str = "cachalot";
/// The access key id imported into every cluster; read/write on [`BUCKET`].
pub const KEY_ID: &str = "GK0cac4a107e2e0000000000a1";
/// Its secret.
pub const SECRET: &str = "5ec7e7cac4a107e2e0000000000000000000000000000000000000000000a1b2";

/// How long a node may take to answer its CLI, and the cluster to become healthy; Garage needs
/// well under a second for either on an idle machine, so this only bounds a broken start.
const READY_LIMIT: Duration = Duration::from_secs(30);

/// A running Garage cluster; every node is killed on drop.
pub struct Garage {
    bin: PathBuf,
    nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

struct Node {
    config: PathBuf,
    s3: SocketAddr,
    rpc: SocketAddr,
    /// Full node id (64 hex digits), known once the node has started.
    id: String,
    supervisor: Child,
    stdin: Option<ChildStdin>,
    pid_file: PathBuf,
    log_file: PathBuf,
}

// Killing with -9 rather than letting Garage shut down cleanly: the data is thrown away anyway,
// and a test's Drop should not wait for a graceful drain.
const SUPERVISOR: &str = r#"
"$GARAGE_SUPERVISED_BIN" -c "$1" server >"$2" 2>&1 &
pid=$!
echo "$pid" >"$3"
cat >/dev/null
kill -9 "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
exit 0
"#;

/// The `garage` binary, as the module documentation says, or why there is none.
pub fn garage_bin() -> Result<PathBuf, String> {
    if let Some(bin) = std::env::var_os("GARAGE_BIN") {
        let bin = PathBuf::from(bin);
        return if tools::is_executable(&bin) {
            Ok(bin)
        } else {
            Err(format!(
                "GARAGE_BIN={} is not an executable file",
                bin.display()
            ))
        };
    }
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")));
    if let Some(candidate) = cargo_home.map(|h| h.join("bin").join("garage"))
        && tools::is_executable(&candidate)
    {
        return Ok(candidate);
    }
    tools::find_in_path("garage")
        .ok_or_else(|| "no garage binary (GARAGE_BIN, ~/.cargo/bin/garage, PATH)".to_owned())
}

impl Garage {
    /// Starts `nodes` Garage nodes on 127.0.0.1 (replication factor 3, or `nodes` when fewer),
    /// joins them into one layout, creates [`BUCKET`] and imports [`KEY_ID`] with read and write
    /// on it, and returns once every node reports a healthy cluster, sees the bucket with the
    /// key's permissions, and answers on its S3 port.
    ///
    /// Without a `garage` binary: `None` after printing why, or a panic when `CI` is set. A
    /// cluster that does not come up panics with the nodes' logs.
    pub async fn start(nodes: usize) -> Option<Garage> {
        assert!(nodes > 0, "a Garage cluster needs at least one node");
        let bin = match garage_bin() {
            Ok(bin) => bin,
            Err(why) => return Garage::skip(&why),
        };
        let mut last_error = String::new();
        // free_port only says a port was free a moment ago: another test may take it before the
        // node binds it, which is worth a fresh set of ports, and nothing else is.
        for _attempt in 0..3 {
            match Garage::try_start(&bin, nodes).await {
                Ok(garage) => return Some(garage),
                Err(e) if e.contains("already in use") => last_error = e,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("{last_error}");
    }

    fn skip(why: &str) -> Option<Garage> {
        let test = std::thread::current()
            .name()
            .unwrap_or("<unnamed test>")
            .to_owned();
        let msg = format!(
            "{test}: {why}. Install Garage with `cargo install garage --version 2.5.0 --locked`."
        );
        if tools::under_ci() {
            panic!("{msg} CI is set, so this is a failure, not a skip.");
        }
        // Straight to the stderr handle: libtest captures `eprintln!` of passing tests.
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {msg} (CI is unset, so the test is skipped.)"
        );
        None
    }

    async fn try_start(bin: &Path, n: usize) -> Result<Garage, String> {
        let dir = tools::tempdir("garage");
        let rpc_secret = random_hex32();
        let mut garage = Garage {
            bin: bin.to_owned(),
            nodes: Vec::with_capacity(n),
            _dir: dir,
        };
        for i in 0..n {
            let node = Node::spawn(bin, garage._dir.path(), i, n.min(3), &rpc_secret)?;
            garage.nodes.push(node);
        }
        garage.setup().await.map_err(|e| garage.failure(&e))?;
        Ok(garage)
    }

    async fn setup(&mut self) -> Result<(), String> {
        for i in 0..self.nodes.len() {
            // `node id` only reads the key file the server writes as it starts; answering the
            // admin API over RPC is what says the node is up.
            self.poll(i, "answer over RPC", |g| async move {
                g.json_api(i, "GetClusterHealth", "").await.map(|_| true)
            })
            .await?;
            let id = self.cli(i, &["node", "id", "-q"]).await?;
            let id = id.trim();
            let (full, _addr) = id
                .split_once('@')
                .ok_or_else(|| format!("node {i}: `garage node id` printed {id:?}"))?;
            self.nodes[i].id = full.to_owned();
        }
        // A full mesh: connecting everyone to node 0 alone leaves the others to find each other
        // by gossip, which takes seconds.
        for i in 0..self.nodes.len() {
            for j in i + 1..self.nodes.len() {
                let peer = format!("{}@{}", self.nodes[j].id, self.nodes[j].rpc);
                self.cli(i, &["node", "connect", &peer]).await?;
            }
        }
        let mut assign = vec!["layout", "assign", "-z", "dc1", "-c", "1G"];
        assign.extend(self.nodes.iter().map(|n| n.id.as_str()));
        self.cli(0, &assign).await?;
        self.cli(0, &["layout", "apply", "--version", "1"]).await?;
        // Creating a bucket needs the new layout on a quorum of nodes, which can lag the apply
        // on a loaded machine ("Layout not ready"); a create that failed late may have landed.
        self.poll(0, "create the bucket", |g| async move {
            if g.cli(0, &["bucket", "info", BUCKET]).await.is_ok() {
                return Ok(true);
            }
            g.cli(0, &["bucket", "create", BUCKET]).await.map(|_| true)
        })
        .await?;
        self.cli(
            0,
            &[
                "key",
                "import",
                "--yes",
                "-n",
                "cachalot-e2e",
                KEY_ID,
                SECRET,
            ],
        )
        .await?;
        self.cli(
            0,
            &[
                "bucket", "allow", "--read", "--write", "--key", KEY_ID, BUCKET,
            ],
        )
        .await?;
        let n = self.nodes.len();
        for i in 0..n {
            self.poll(i, "report a healthy cluster", |g| async move {
                let h = g.json_api(i, "GetClusterHealth", "").await?;
                Ok(h["status"] == "healthy" && h["storageNodesUp"] == n)
            })
            .await?;
            self.poll(
                i,
                "see the bucket and the key's permissions",
                |g| async move { Ok(g.key_permissions(i).await.is_ok_and(|p| p == (true, true))) },
            )
            .await?;
            let s3 = self.nodes[i].s3;
            self.poll(i, "answer on its S3 port", |_| async move {
                Ok(
                    super::http::request(hyper::Method::GET, &format!("http://{s3}/"), &[])
                        .await
                        .is_ok(),
                )
            })
            .await?;
        }
        Ok(())
    }

    /// Polls `check` on node `i` until it returns true; an `Err` is taken as "not yet" too,
    /// since a node refuses commands until it is up. Fails early when the node has exited.
    async fn poll<'a, F, Fut>(&'a self, i: usize, what: &str, check: F) -> Result<(), String>
    where
        F: Fn(&'a Garage) -> Fut,
        Fut: std::future::Future<Output = Result<bool, String>>,
    {
        let start = Instant::now();
        let mut last = String::from("no answer");
        while start.elapsed() < READY_LIMIT {
            match check(self).await {
                Ok(true) => return Ok(()),
                Ok(false) => last = "not yet".into(),
                Err(e) => last = e,
            }
            if !self.nodes[i].garage_alive() && start.elapsed() > Duration::from_millis(500) {
                return Err(format!("node {i} exited before it would {what} ({last})"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(format!(
            "node {i} did not {what} within {READY_LIMIT:?} ({last})"
        ))
    }

    fn failure(&self, error: &str) -> String {
        let mut msg = format!("Garage did not start: {error}");
        for i in 0..self.nodes.len() {
            msg.push_str(&format!("\n--- node {i} log:\n{}", self.log(i)));
        }
        msg
    }

    /// Number of nodes started.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// `http://127.0.0.1:PORT`: node `i`'s S3 API.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://{}", self.nodes[i].s3)
    }

    /// The S3 region (`s3_region`) to sign requests for.
    pub fn region(&self) -> &'static str {
        REGION
    }

    pub fn bucket(&self) -> &'static str {
        BUCKET
    }

    pub fn key_id(&self) -> &'static str {
        KEY_ID
    }

    pub fn secret(&self) -> &'static str {
        SECRET
    }

    /// Node `i`'s full id (64 hex digits), as the layout lists it.
    pub fn node_id(&self, i: usize) -> &str {
        &self.nodes[i].id
    }

    /// Kills node `i` with SIGKILL, as a crash would, and returns once its S3 port refuses
    /// connections. The other nodes are left to notice on their own. Panics when the node does
    /// not die within 5 s.
    pub fn kill(&self, i: usize) {
        let node = &self.nodes[i];
        if let Some(pid) = node.garage_pid() {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect_timeout(&node.s3, Duration::from_millis(200)).is_ok() {
            assert!(
                Instant::now() < deadline,
                "Garage node {i} still accepts connections 5s after SIGKILL"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `garage -c <node i's config> <args>` and returns its stdout, or an error carrying
    /// the command and its stderr when it fails or takes over 20 s.
    pub async fn cli(&self, i: usize, args: &[&str]) -> Result<String, String> {
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.arg("-c")
            .arg(&self.nodes[i].config)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        without_garage_env(cmd.as_std_mut());
        let shown = format!("garage {}", args.join(" "));
        let out = tokio::time::timeout(Duration::from_secs(20), cmd.output())
            .await
            .map_err(|_| format!("node {i}: `{shown}` took over 20s"))?
            .map_err(|e| format!("node {i}: cannot run `{shown}`: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "node {i}: `{shown}` failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim(),
            ))
        }
    }

    /// `garage json-api <endpoint> [<payload>]` on node `i` (the admin API over RPC), parsed.
    /// An empty `payload` is left out, as endpoints without a request body (`GetClusterHealth`,
    /// `GetClusterLayout`) require.
    pub async fn json_api(
        &self,
        i: usize,
        endpoint: &str,
        payload: &str,
    ) -> Result<serde_json::Value, String> {
        let mut args = vec!["json-api", endpoint];
        if !payload.is_empty() {
            args.push(payload);
        }
        let out = self.cli(i, &args).await?;
        serde_json::from_str(&out).map_err(|e| format!("node {i}: {endpoint} printed {out:?}: {e}"))
    }

    /// `(read, write)` of [`KEY_ID`] on [`BUCKET`], as node `i` reports them.
    pub async fn key_permissions(&self, i: usize) -> Result<(bool, bool), String> {
        let info = self
            .json_api(
                i,
                "GetBucketInfo",
                &format!(r#"{{"globalAlias":"{BUCKET}"}}"#),
            )
            .await?;
        let keys = info["keys"].as_array().cloned().unwrap_or_default();
        let key = keys
            .iter()
            .find(|k| k["accessKeyId"] == KEY_ID)
            .ok_or_else(|| format!("node {i}: {KEY_ID} has no permission on {BUCKET}: {info}"))?;
        let perm = &key["permissions"];
        Ok((perm["read"] == true, perm["write"] == true))
    }

    /// Node `i`'s combined stdout/stderr so far.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log_file).unwrap_or_default()
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        // Close every stdin first so that the nodes die together rather than one by one.
        for node in &mut self.nodes {
            node.stdin.take();
        }
        for node in &mut self.nodes {
            node.stop();
        }
    }
}

// === impl Node ===

impl Node {
    fn spawn(
        bin: &Path,
        base: &Path,
        i: usize,
        replication_factor: usize,
        rpc_secret: &str,
    ) -> Result<Node, String> {
        let dir = base.join(format!("node{i}"));
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let s3: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let rpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        // lmdb is Garage's default engine; a 1 GiB map instead of the default 1 TiB keeps it
        // within any test machine's address-space limits. No compression: test blobs are
        // random bytes, and zstd would only spend the CPU the replicas need.
        let config = format!(
            r#"metadata_dir = "{meta}"
data_dir = "{data}"
db_engine = "lmdb"
lmdb_map_size = "1G"
replication_factor = {replication_factor}
compression_level = "none"
rpc_bind_addr = "{rpc}"
rpc_public_addr = "{rpc}"
rpc_secret = "{rpc_secret}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "{s3}"
"#,
            meta = dir.join("meta").display(),
            data = dir.join("data").display(),
        );
        let config_path = dir.join("garage.toml");
        std::fs::write(&config_path, config)
            .map_err(|e| format!("write {}: {e}", config_path.display()))?;
        let log_file = dir.join("garage.log");
        let pid_file = dir.join("garage.pid");
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(SUPERVISOR)
            .arg("sh")
            .arg(&config_path)
            .arg(&log_file)
            .arg(&pid_file);
        without_garage_env(&mut cmd);
        let mut supervisor = cmd
            .env("GARAGE_SUPERVISED_BIN", bin)
            // The log is read in failure messages, not on a terminal.
            .env("NO_COLOR", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn sh supervising garage: {e}"))?;
        let stdin = supervisor.stdin.take();
        Ok(Node {
            config: config_path,
            s3,
            rpc,
            id: String::new(),
            supervisor,
            stdin,
            pid_file,
            log_file,
        })
    }

    fn garage_pid(&self) -> Option<u32> {
        std::fs::read_to_string(&self.pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn garage_alive(&self) -> bool {
        match self.garage_pid() {
            // A killed node stays a zombie until the supervisor reaps it: check its state too.
            Some(pid) => std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                !stat
                    .rsplit_once(')')
                    .is_some_and(|(_, s)| s.starts_with(" Z"))
            }),
            None => true, // not written yet
        }
    }

    fn stop(&mut self) {
        // Closing stdin makes the supervisor kill the node and exit.
        self.stdin.take();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.supervisor.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(pid) = self.garage_pid() {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
        let _ = self.supervisor.kill();
        let _ = self.supervisor.wait();
    }
}

/// Drops every `GARAGE_*` variable of the test's environment (`GARAGE_RPC_HOST`,
/// `GARAGE_CONFIG_FILE`, `GARAGE_RPC_SECRET`, ...), which would override the node's config.
fn without_garage_env(cmd: &mut Command) {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("GARAGE_") {
            cmd.env_remove(name);
        }
    }
}

/// 32 random bytes in hex: the cluster's `rpc_secret`, new for every cluster so that two test
/// clusters on one machine can never join each other.
fn random_hex32() -> String {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("system randomness");
    hex::encode(bytes)
}
