//! End-to-end: what `cachalot client-config containerd` writes is what containerd needs. A real
//! containerd (Debian's, run here with its own root, state and socket, the CRI plugin off) pulls
//! with `ctr image pull --hosts-dir` and the generated `certs.d`, against cachalot in front of the
//! real `docker-registry`, while the registry's origin address in those files refuses
//! connections: containerd falls back to the origin silently when a mirror fails, so the pull
//! can only succeed through the mirror, and cachalot's metrics must show it served the image.
//!
//! Needs `containerd` and `ctr` besides the e2e tools; without them the test prints why and skips,
//! unless `CI` is set, in which case it fails.

mod e2e_support;

use e2e_support::cachalot::{Cachalot, UPSTREAM_NAME, refused_url};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_through_the_mirror_with_the_generated_hosts_dir() {
    require_e2e_tools!();
    let have = |t: &str| tools::find_in_path(t).is_some();
    if !(have("containerd") && have("ctr")) {
        assert!(
            !tools::under_ci(),
            "containerd and ctr are needed under CI (apt-get install containerd)"
        );
        eprintln!("SKIPPED: containerd or ctr not installed");
        return;
    }
    let up = e2e_support::shared_upstream();
    let mirror = Cachalot::in_front_of(&up.url()).await;

    // The config the client snippets are made from names the registry as cachalot does, with an
    // origin that refuses connections: a pull that does not go through the mirror fails.
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
        .args(["client-config", "containerd", "--mirror", &mirror.url()])
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
    let hosts_dir = dir.path().join("certs.d");
    assert!(hosts_dir.join(UPSTREAM_NAME).join("hosts.toml").exists());

    let reference = format!(
        "{UPSTREAM_NAME}/{}:{}",
        e2e_support::SINGLE_REPO,
        e2e_support::SINGLE_TAG
    );
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

    // Served by the mirror: the manifest and every blob of the image went out through it.
    let metrics = mirror.metrics().await;
    let served = |kind: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("cachalot_cache_lookups_total{")
                    && l.contains(&format!("kind=\"{kind}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(served("manifest") >= 1.0, "no manifest served:\n{metrics}");
    let blobs = up.single.blobs.len() as f64;
    assert!(
        served("blob") >= blobs - 1.0,
        "fewer blobs served than the image has ({blobs} with its manifest):\n{metrics}"
    );
}
