//! End-to-end: the container image. No base image can be pulled here, so this builds the image
//! `deploy/Dockerfile` describes the way it can be built offline: `FROM scratch` with the release
//! binary, exactly the libraries `ldd` lists for it (with the dynamic loader), a passwd entry for
//! the runtime user and the default config, then the runtime stanza of `deploy/Dockerfile` itself
//! (USER, VOLUME, EXPOSE, HEALTHCHECK, ENTRYPOINT, CMD: every line after its last FROM but the
//! COPY lines), so the two cannot drift apart. podman builds and runs it with a read-only root
//! filesystem, a config mounted at /etc/cachalot/cachalot.toml and the cache on a mounted
//! volume; the image's own HEALTHCHECK must pass, the process must run as the Dockerfile's user,
//! and skopeo pulls an image through it from the real `docker-registry`.
//!
//! Needs podman besides the e2e tools; without it the test prints why and skips, unless `CI` is
//! set, in which case it fails. It runs `cargo build --release --locked --bin cachalot` first:
//! a no-op when the release binary is fresh (`.ci/run` builds it before the tests), a full
//! release build otherwise.

mod e2e_support;

use e2e_support::cachalot::{UPSTREAM_NAME, assert_served_image};
use e2e_support::podman::Podman;
use e2e_support::{skopeo, tools};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const DOCKERFILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/Dockerfile");

/// The runtime stage of a Dockerfile: the instructions after its last FROM, continuation lines
/// joined, comments dropped.
fn runtime_stage(dockerfile: &str) -> Vec<String> {
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let t = line.trim();
        if current.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part.trim_end());
                current.push(' ');
            }
            None => {
                current.push_str(t);
                instructions.push(std::mem::take(&mut current));
            }
        }
    }
    let last_from = instructions
        .iter()
        .rposition(|i| keyword(i) == "FROM")
        .expect("a FROM in deploy/Dockerfile");
    instructions.split_off(last_from + 1)
}

fn keyword(instruction: &str) -> String {
    instruction
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_ascii_uppercase()
}

/// The argument of the stage's only `kw` instruction.
fn only<'a>(stage: &'a [String], kw: &str) -> &'a str {
    let found: Vec<&String> = stage.iter().filter(|i| keyword(i) == kw).collect();
    assert_eq!(
        found.len(),
        1,
        "deploy/Dockerfile's runtime stage needs exactly one {kw}: {stage:#?}"
    );
    found[0][kw.len()..].trim()
}

/// An exec-form (JSON array) argument, as ENTRYPOINT and CMD must be without a shell.
fn exec_form(kw: &str, arg: &str) -> Vec<String> {
    serde_json::from_str(arg).unwrap_or_else(|e| {
        panic!("deploy/Dockerfile: {kw} {arg} is not exec form (the image has no shell): {e}")
    })
}

/// What the image must be, read from deploy/Dockerfile.
struct Runtime {
    /// The stage's instructions that the test image repeats verbatim.
    kept: Vec<String>,
    uid: u32,
    gid: u32,
    binary: String,
    config: String,
    volume: String,
    healthcheck: String,
}

impl Runtime {
    fn read() -> Runtime {
        let text = std::fs::read_to_string(DOCKERFILE).unwrap();
        let stage = runtime_stage(&text);
        for i in &stage {
            let kw = keyword(i);
            assert!(
                !["RUN", "ADD"].contains(&kw.as_str()),
                "deploy/Dockerfile: {i:?} in the runtime stage: it has no shell, and the test image cannot repeat it"
            );
        }
        let (uid, gid) = only(&stage, "USER")
            .split_once(':')
            .and_then(|(u, g)| Some((u.parse().ok()?, g.parse().ok()?)))
            .expect("deploy/Dockerfile: USER uid:gid, numeric");
        assert_ne!(uid, 0, "deploy/Dockerfile runs as root");
        let entrypoint = exec_form("ENTRYPOINT", only(&stage, "ENTRYPOINT"));
        let cmd = exec_form("CMD", only(&stage, "CMD"));
        let config = cmd
            .iter()
            .skip_while(|a| *a != "--config")
            .nth(1)
            .expect("deploy/Dockerfile: CMD serve --config FILE")
            .clone();
        assert_eq!(cmd[0], "serve", "deploy/Dockerfile: CMD");
        let volume = exec_form("VOLUME", only(&stage, "VOLUME"));
        assert_eq!(volume.len(), 1, "deploy/Dockerfile: one VOLUME, the cache");
        let healthcheck = only(&stage, "HEALTHCHECK").to_owned();
        only(&stage, "EXPOSE");
        // The test image makes its own COPY lines, so the Dockerfile's are checked here: the
        // binary, the default config, and the volume's directory owned by the user (without
        // it a fresh named volume is root's, and the first fill fails).
        let copies: Vec<(String, String)> = stage
            .iter()
            .filter(|i| keyword(i) == "COPY")
            .map(|i| {
                let words: Vec<&str> = i.split_whitespace().collect();
                let chown = words
                    .iter()
                    .find_map(|w| w.strip_prefix("--chown="))
                    .unwrap_or("")
                    .to_owned();
                (words.last().unwrap().to_string(), chown)
            })
            .collect();
        let copied = |to: &str| copies.iter().find(|(dest, _)| dest == to);
        assert!(
            copied(&entrypoint[0]).is_some(),
            "deploy/Dockerfile: no COPY to the ENTRYPOINT {}",
            entrypoint[0]
        );
        assert!(
            copied(&config).is_some(),
            "deploy/Dockerfile: no COPY of the default config to {config}"
        );
        assert_eq!(
            copied(&volume[0]).map(|(_, chown)| chown.as_str()),
            Some(format!("{uid}:{gid}").as_str()),
            "deploy/Dockerfile: the VOLUME {} must be COPYed with --chown={uid}:{gid}",
            volume[0]
        );
        let dir_line = format!("dir = \"{}\"", volume[0]);
        assert!(
            text.contains(&dir_line),
            "deploy/Dockerfile: the default config's cache.dir is not set to the VOLUME ({dir_line})"
        );
        Runtime {
            kept: stage
                .iter()
                .filter(|i| keyword(i) != "COPY")
                .cloned()
                .collect(),
            uid,
            gid,
            binary: entrypoint[0].clone(),
            config,
            volume: volume[0].clone(),
            healthcheck,
        }
    }
}

#[test]
fn the_runtime_stanza_is_read_from_deploy_dockerfile() {
    let stage = runtime_stage(
        "FROM a AS build\nRUN x \\\n  && y\n# note\nFROM b\nCOPY --from=build /x /y\nHEALTHCHECK --interval=5s \\\n    CMD [\"/bin/p\"]\nUSER 1:2\n",
    );
    assert_eq!(
        stage,
        [
            "COPY --from=build /x /y",
            "HEALTHCHECK --interval=5s CMD [\"/bin/p\"]",
            "USER 1:2"
        ]
    );
    let r = Runtime::read();
    assert_eq!((r.uid, r.gid), (65532, 65532));
    assert!(r.healthcheck.contains(&r.binary), "{}", r.healthcheck);
    assert!(r.healthcheck.contains("healthcheck"), "{}", r.healthcheck);
}

/// `cargo build --release --locked --bin cachalot`; the binary's path, from cargo's own report
/// (so a `CARGO_TARGET_DIR` or `build.target-dir` is followed).
fn release_binary() -> PathBuf {
    let start = Instant::now();
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .args([
            "build",
            "--release",
            "--locked",
            "--bin",
            "cachalot",
            "--message-format=json",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(std::process::Stdio::inherit());
    // What cargo sets for the test process is not build configuration; ring's build script
    // reruns when CARGO_MANIFEST_DIR changes, so inheriting it would make this build differ
    // from a plain `cargo build --release` and recompile ring and everything above it.
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
            ]
            .contains(&k.as_ref())
        {
            cargo.env_remove(&key);
        }
    }
    let out = cargo.output().expect("run cargo");
    assert!(out.status.success(), "cargo build --release failed");
    let exe = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "cachalot")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("cargo reported no cachalot executable");
    eprintln!(
        "release binary {} ready in {:?}",
        exe.display(),
        start.elapsed()
    );
    exe
}

/// The shared libraries `ldd` lists for `binary`, the dynamic loader included (none for a static
/// binary).
fn linked_libraries(binary: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(binary).output().expect("run ldd");
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        assert!(
            text.contains("not a dynamic executable")
                || String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable"),
            "ldd {}: {text}",
            binary.display()
        );
        return Vec::new();
    }
    text.lines()
        .filter_map(|l| {
            // "libc.so.6 => /lib/.../libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)";
            // the vDSO has no file.
            let path = l.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// `rel` (absolute inside the image) under `root`.
fn inside(root: &Path, rel: &str) -> PathBuf {
    root.join(rel.trim_start_matches('/'))
}

/// The build context: `rootfs/` (binary, libraries, passwd, default config), `cache/` (the
/// volume's directory, owned by the runtime user) and the Containerfile.
fn build_context(dir: &Path, rt: &Runtime, binary: &Path) -> PathBuf {
    let rootfs = dir.join("rootfs");
    let put = |dest: &Path, from: &Path| {
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        // Follows symlinks: the loader and libraries land as plain files at the paths the
        // binary asks for.
        std::fs::copy(from, dest)
            .unwrap_or_else(|e| panic!("copy {} into the image: {e}", from.display()));
    };
    put(&inside(&rootfs, &rt.binary), binary);
    let libs = linked_libraries(binary);
    for lib in &libs {
        put(&inside(&rootfs, lib.to_str().unwrap()), lib);
    }
    let etc = rootfs.join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(
        etc.join("passwd"),
        format!(
            "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:{}:{}:nonroot:/home/nonroot:/sbin/nologin\n",
            rt.uid, rt.gid
        ),
    )
    .unwrap();
    std::fs::write(
        etc.join("group"),
        format!("root:x:0:\nnonroot:x:{}:\n", rt.gid),
    )
    .unwrap();
    // The default config as deploy/Dockerfile makes it: the example with the cache on the volume.
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/cachalot.toml"))
            .unwrap();
    let default_config = example.replace(
        "\ndir = \"/var/lib/cachalot\"\n",
        &format!("\ndir = {:?}\n", rt.volume),
    );
    assert_ne!(
        default_config, example,
        "config/cachalot.toml has no cache dir line to move"
    );
    let config = inside(&rootfs, &rt.config);
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    std::fs::write(&config, default_config).unwrap();

    let cache = dir.join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let containerfile = format!(
        "FROM scratch\nCOPY rootfs/ /\nCOPY --chown={uid}:{gid} cache {volume}\n{kept}\n",
        uid = rt.uid,
        gid = rt.gid,
        volume = rt.volume,
        kept = rt.kept.join("\n"),
    );
    let path = dir.join("Containerfile");
    std::fs::write(&path, containerfile).unwrap();
    eprintln!(
        "image: {} with {} libraries: {libs:?}",
        binary.display(),
        libs.len()
    );
    path
}

/// A container, removed (stopped first if needed) on drop, whatever the test's outcome.
struct Container {
    podman: Podman,
    name: String,
}

impl Container {
    fn inspect(&self, format: &str) -> String {
        self.podman
            .run_ok(&["inspect", "--format", format, &self.name])
            .trim()
            .to_owned()
    }

    fn logs(&self) -> String {
        let out = self.podman.run(&["logs", &self.name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self
            .podman
            .run(&["rm", "--force", "--time", "0", &self.name]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_read_only_as_its_user_passes_its_healthcheck_and_serves_pulls() {
    require_e2e_tools!();
    if !tools::tools_available(&["podman", "ldd"], e2e_support::podman::INSTALL) {
        return;
    }
    let rt = Runtime::read();
    let up = e2e_support::shared_upstream();
    let binary = tokio::task::spawn_blocking(release_binary).await.unwrap();

    let dir = tools::tempdir("image");
    let containerfile = build_context(dir.path(), &rt, &binary);
    let podman = Podman::new();
    let image = "localhost/cachalot-e2e:test";
    let start = Instant::now();
    let podman = {
        let context = dir.path().to_str().unwrap().to_owned();
        let containerfile = containerfile.to_str().unwrap().to_owned();
        tokio::task::spawn_blocking(move || {
            // docker format: the OCI image config has no HEALTHCHECK, podman would drop it.
            podman.run_ok(&[
                "build",
                "--quiet",
                "--format",
                "docker",
                "--pull=never",
                "--tag",
                image,
                "--file",
                &containerfile,
                &context,
            ]);
            podman
        })
        .await
        .unwrap()
    };
    eprintln!("podman build: {:?}", start.elapsed());
    let healthcheck = podman.run_ok(&[
        "image",
        "inspect",
        "--format",
        "{{json .HealthCheck.Test}}",
        image,
    ]);
    assert!(
        healthcheck.contains("healthcheck"),
        "the image lost its HEALTHCHECK: {healthcheck}"
    );

    // The default config baked into the image parses, and the binary runs on the libraries
    // copied in.
    podman.run_ok(&[
        "run",
        "--rm",
        "--network",
        "none",
        image,
        "check-config",
        "--config",
        &rt.config,
    ]);

    let port = e2e_support::registry::free_port();
    let config = dir.path().join("cachalot.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n\n[cache]\ndir = {:?}\n\n[[upstream]]\nname = {UPSTREAM_NAME:?}\nurl = {:?}\ndefault = true\n",
            rt.volume,
            up.url()
        ),
    )
    .unwrap();
    let c = Container {
        podman,
        name: format!("cachalot-e2e-{}", std::process::id()),
    };
    // No tmpfs on /tmp, /var/tmp or /run either: the volume is the only writable place, as
    // under Kubernetes' readOnlyRootFilesystem.
    c.podman.run_ok(&[
        "run",
        "--detach",
        "--name",
        &c.name,
        "--network",
        "host",
        "--read-only",
        "--read-only-tmpfs=false",
        // Should this process die without dropping the guard, the container still ends.
        "--timeout",
        "300",
        "--volume",
        &format!("{}:{}:ro", config.display(), rt.config),
        // A fresh named volume, as `docker run -v cachalot-cache:...` makes: podman gives it the
        // owner of the image's directory, which the Dockerfile's COPY --chown sets.
        "--volume",
        &format!("cachalot-e2e-cache:{}", rt.volume),
        image,
    ]);
    let cache = PathBuf::from(
        c.podman
            .run_ok(&[
                "volume",
                "inspect",
                "--format",
                "{{.Mountpoint}}",
                "cachalot-e2e-cache",
            ])
            .trim(),
    );

    // The image's own HEALTHCHECK (podman has no systemd here to run it on a timer).
    let start = Instant::now();
    loop {
        let out = c.podman.run(&["healthcheck", "run", &c.name]);
        if out.status.success() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the HEALTHCHECK did not pass within 30s: {}{}\nlogs:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("healthy after {:?}", start.elapsed());
    assert_eq!(c.inspect("{{.State.Health.Status}}"), "healthy");

    let pid = c.inspect("{{.State.Pid}}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uids = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert_eq!(
        uids.split_whitespace().skip(1).collect::<Vec<_>>(),
        vec![rt.uid.to_string().as_str(); 4],
        "the server's real, effective, saved and fs uids"
    );
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let root = mountinfo
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .unwrap();
    assert!(
        root.split_whitespace()
            .nth(5)
            .is_some_and(|o| o.split(',').any(|o| o == "ro")),
        "the root filesystem is not read-only: {root}"
    );

    let mirror = format!("127.0.0.1:{port}");
    let out = tools::tempdir("image-pull");
    let pulled = skopeo::pull(
        &format!(
            "{mirror}/{}:{}",
            e2e_support::SINGLE_REPO,
            e2e_support::SINGLE_TAG
        ),
        &out.path().join("layout"),
        e2e_support::SINGLE_TAG,
        None,
    )
    .await;
    assert_eq!(pulled.top_digest, up.single.top_digest, "manifest digest");
    assert_eq!(pulled.blobs, up.single.blobs, "blob digests");

    let metrics = e2e_support::http::get(&format!("http://{mirror}/metrics")).await;
    assert_eq!(metrics.status, 200);
    assert_served_image(
        &String::from_utf8_lossy(&metrics.body),
        &cache,
        &up.single,
        "pull through the container",
    );
    let blob = cachalot::storage::FsStore::blob_path_in(
        &cache,
        &up.single.images[0].layer_digests[0].parse().unwrap(),
    );
    use std::os::unix::fs::MetadataExt as _;
    assert_eq!(
        std::fs::metadata(&blob).unwrap().uid(),
        rt.uid,
        "cache files written as"
    );

    // SIGTERM to PID 1 drains and exits 0, within podman's stop timeout.
    c.podman.run_ok(&["stop", "--time", "20", &c.name]);
    assert_eq!(
        c.inspect("{{.State.ExitCode}}"),
        "0",
        "exit code after podman stop; logs:\n{}",
        c.logs()
    );
}
