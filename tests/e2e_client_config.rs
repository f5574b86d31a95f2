//! End-to-end: what `cachalot client-config` writes is what real clients need, against cachalot
//! in front of the real `docker-registry`, while the registry's origin in those files is
//! unreachable: clients fall back to the origin silently when a mirror fails, so a pull can only
//! succeed through the mirror, and cachalot's metrics and cache must show it served the image.
//!
//! - containerd (Debian's, run here with its own root, state and socket, the CRI plugin off)
//!   pulls with `ctr image pull --hosts-dir` and the generated `certs.d`; the origin there is an
//!   address that refuses connections.
//! - podman (Debian's 4.3, as root, vfs storage in a temp dir) pulls with the generated
//!   registries.conf as `CONTAINERS_REGISTRIES_CONF`; the origin there is the registry's name,
//!   which does not resolve (`.test` is reserved).
//!
//! Each needs its client besides the e2e tools; without it the test prints why and skips,
//! unless `CI` is set, in which case it fails.

mod e2e_support;

use e2e_support::cachalot::{
    Cachalot, DECOY_NAME, UPSTREAM_NAME, UpstreamEntry, assert_served_image, refused_url,
};
use e2e_support::podman::Podman;
use e2e_support::tools;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// containerd, stopped (and its mounts left alone: the native snapshotter makes none) on drop.
struct Containerd {
    child: Child,
    socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Containerd {
    fn start() -> Containerd {
        let dir = tools::tempdir("containerd");
        let socket = dir.path().join("containerd.sock");
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = {:?}\nstate = {:?}\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = {:?}\n",
                dir.path().join("root"),
                dir.path().join("state"),
                socket,
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let c = Containerd {
            child,
            socket,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !c.ctr(&["version"]).status.success() {
            assert!(Instant::now() < deadline, "containerd did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    fn ctr(&self, args: &[&str]) -> std::process::Output {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run ctr")
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// cachalot in front of the shared seeded registry, and what `cachalot client-config CLIENT
/// --output-dir` wrote for it, from a config naming the registry as cachalot does
/// ([`UPSTREAM_NAME`]) but with an origin URL that refuses connections. cachalot's default
/// upstream is a decoy that refuses connections too, so only a request that names the registry
/// the way the client's routing mode does (`?ns=` or the path prefix) is served.
async fn mirror_and_client_config(client: &str) -> (Cachalot, tempfile::TempDir) {
    let up = e2e_support::shared_upstream();
    let mirror = Cachalot::start(
        &[
            UpstreamEntry::new(UPSTREAM_NAME, &up.url(), false),
            UpstreamEntry::new(DECOY_NAME, &refused_url(), true),
        ],
        "",
    )
    .await;
    let dir = tools::tempdir("client-config");
    let config = dir.path().join("clients.toml");
    std::fs::write(
        &config,
        format!(
            "[[upstream]]\nname = {UPSTREAM_NAME:?}\nurl = {:?}\ndefault = true\n",
            refused_url()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cachalot"))
        .args(["client-config", client, "--mirror", &mirror.url()])
        .arg("--config")
        .arg(&config)
        .arg("--output-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (mirror, dir)
}

/// `reg.test/e2e/single:latest`: the seeded single-platform image as a client names it.
fn single_reference() -> String {
    format!(
        "{UPSTREAM_NAME}/{}:{}",
        e2e_support::SINGLE_REPO,
        e2e_support::SINGLE_TAG
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_through_the_mirror_with_the_generated_hosts_dir() {
    require_e2e_tools!();
    if !tools::tools_available(&["containerd", "ctr"], "apt-get install -y containerd") {
        return;
    }
    let (mirror, dir) = mirror_and_client_config("containerd").await;
    let hosts_dir = dir.path().join("certs.d");
    assert!(hosts_dir.join(UPSTREAM_NAME).join("hosts.toml").exists());

    let reference = single_reference();
    let containerd = tokio::task::spawn_blocking(Containerd::start)
        .await
        .unwrap();
    let hosts = hosts_dir.to_str().unwrap().to_owned();
    let pull = {
        let reference = reference.clone();
        tokio::task::spawn_blocking(move || {
            let out = containerd.ctr(&[
                "image",
                "pull",
                "--snapshotter",
                "native",
                "--platform",
                "linux/amd64",
                "--hosts-dir",
                &hosts,
                &reference,
            ]);
            (containerd, out)
        })
        .await
        .unwrap()
    };
    let (containerd, out) = pull;
    assert!(
        out.status.success(),
        "ctr image pull failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = containerd.ctr(&["image", "ls", "-q"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.contains(&reference), "{listed}");

    let up = e2e_support::shared_upstream();
    assert_served_image(
        &mirror.metrics().await,
        &mirror.cache_dir(),
        &up.single,
        "containerd pull",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_pulls_through_the_mirror_with_the_generated_registries_conf() {
    require_e2e_tools!();
    if !tools::tools_available(&["podman"], e2e_support::podman::INSTALL) {
        return;
    }
    let (mirror, dir) = mirror_and_client_config("podman").await;
    let conf = dir.path().join("registries.conf.d/50-cachalot.conf");
    let podman = Podman::new().with_registries_conf(&conf);
    let reference = single_reference();
    let pulled = {
        let reference = reference.clone();
        tokio::task::spawn_blocking(move || {
            let out = podman.run(&["pull", "--quiet", &reference]);
            (podman, out)
        })
        .await
        .unwrap()
    };
    let (podman, out) = pulled;
    assert!(
        out.status.success(),
        "podman pull {reference} failed:\n{}\n{}\nregistries.conf:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(&conf).unwrap_or_default()
    );
    let up = e2e_support::shared_upstream();
    let digest = podman.run_ok(&["image", "inspect", "--format", "{{.Digest}}", &reference]);
    assert_eq!(
        digest.trim(),
        up.single.top_digest,
        "the manifest podman stored"
    );
    assert_served_image(
        &mirror.metrics().await,
        &mirror.cache_dir(),
        &up.single,
        "podman pull",
    );
}
