//! Debian's podman, run as root with everything of its own in a temp dir: vfs storage (plain
//! directories, no overlay mounts to leak), its own root, runroot and tmpdir, and its own
//! containers.conf, storage.conf, signature policy, credentials and registries.conf, so nothing
//! of the host's container setup changes what a test sees or leaves anything behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// What `apt-get` needs to provide the programs these tests drive.
pub const INSTALL: &str = "apt-get install -y podman";

/// A podman whose state lives in a temp dir, removed on drop.
pub struct Podman {
    dir: tempfile::TempDir,
    /// runroot and tmpdir: podman refuses a runroot path of 50 characters or more (conmon's
    /// attach socket lives under it and a socket path is short), so these live in /tmp.
    run: tempfile::TempDir,
    registries_conf: PathBuf,
}

impl Podman {
    /// A fresh podman state; its registries.conf is empty (only fully qualified references,
    /// each pulled from its own registry).
    pub fn new() -> Podman {
        let dir = super::tools::tempdir("podman");
        let run = tempfile::Builder::new()
            .prefix("cachalot-podman-")
            .tempdir_in("/tmp")
            .expect("temp dir in /tmp");
        let d = dir.path();
        let r = run.path();
        let write = |rel: &str, text: &str| {
            let path = d.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, text).unwrap();
            path
        };
        // default_ulimits: podman 4.3 raises the container's RLIMIT_NOFILE and RLIMIT_NPROC
        // (types 7 and 6) to its own defaults, which fails here with "error setting rlimit type
        // 7: operation not permitted"; the container inherits podman's limits instead.
        // cgroupfs and no events log: there is no systemd to ask for a scope or a journal.
        write(
            "containers.conf",
            "[containers]\ndefault_ulimits = []\n\n[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"none\"\n",
        );
        write(
            "storage.conf",
            &format!(
                "[storage]\ndriver = \"vfs\"\ngraphroot = {:?}\nrunroot = {:?}\n",
                d.join("root"),
                r.join("run")
            ),
        );
        // Read from $HOME before /etc: the host's policy and user config stay out.
        write(
            "home/.config/containers/policy.json",
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        );
        write("auth.json", r#"{"auths":{}}"#);
        let registries_conf = write("registries.conf", "");
        std::fs::create_dir_all(d.join("tmp")).unwrap();
        Podman {
            dir,
            run,
            registries_conf,
        }
    }

    /// Resolves registries through `path` (`CONTAINERS_REGISTRIES_CONF`) from now on.
    pub fn with_registries_conf(mut self, path: &Path) -> Podman {
        self.registries_conf = path.to_owned();
        self
    }

    /// `podman` with this state's flags and environment, ready for arguments.
    pub fn command(&self) -> Command {
        let d = self.dir.path();
        let r = self.run.path();
        let mut cmd = Command::new("podman");
        cmd.arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(r.join("run"))
            .args(["--storage-driver", "vfs"])
            .arg("--tmpdir")
            .arg(r.join("libpod"))
            .env("CONTAINERS_CONF", d.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", d.join("storage.conf"))
            .env("CONTAINERS_REGISTRIES_CONF", &self.registries_conf)
            .env("REGISTRY_AUTH_FILE", d.join("auth.json"))
            .env("HOME", d.join("home"))
            .env("TMPDIR", d.join("tmp"))
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("DOCKER_CONFIG");
        cmd
    }

    /// Runs `podman ARGS` to the end (blocking), whatever its exit status.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command()
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run podman {args:?}: {e}"))
    }

    /// Like [`run`](Self::run), panicking with podman's output on failure; returns stdout.
    pub fn run_ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "podman {} failed ({}):\nstdout: {}\nstderr: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The directory this podman keeps its state and config in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
