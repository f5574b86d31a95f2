//! Driving `skopeo` (containers/image) as the real client: pushing seed layouts to the upstream and
//! pulling through cachalot into OCI layouts.
//!
//! Every invocation is hermetic: `--insecure-policy` (no policy.json needed), and an empty auth file
//! and registries.conf in a temp dir, so nothing on the machine changes where requests go or which
//! credentials are sent.

use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::oci::ImageLayout;

fn hermetic_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = super::tools::tempdir("skopeo-env");
        std::fs::write(dir.path().join("auth.json"), br#"{"auths":{}}"#).unwrap();
        std::fs::write(dir.path().join("registries.conf"), b"").unwrap();
        std::fs::create_dir_all(dir.path().join("docker")).unwrap();
        std::fs::write(dir.path().join("docker/config.json"), br#"{"auths":{}}"#).unwrap();
        dir
    })
    .path()
}

/// Output of one skopeo run.
#[derive(Debug)]
pub struct Run {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// Runs `skopeo <args>` hermetically; does not panic on failure. Gives up after 5 minutes.
pub async fn run(args: &[&str]) -> Run {
    let env = hermetic_dir();
    let start = Instant::now();
    let mut cmd = tokio::process::Command::new("skopeo");
    cmd.args(args)
        .env("REGISTRY_AUTH_FILE", env.join("auth.json"))
        .env("CONTAINERS_REGISTRIES_CONF", env.join("registries.conf"))
        .env("DOCKER_CONFIG", env.join("docker"))
        .env("TMPDIR", env)
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(300), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("skopeo {args:?} did not finish within 5 minutes"))
        .expect("run skopeo");
    Run {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: start.elapsed(),
    }
}

/// Like [`run`], panicking with skopeo's output on failure.
pub async fn run_ok(args: &[&str]) -> Run {
    let r = run(args).await;
    assert!(
        r.success,
        "skopeo {} failed:\nstdout: {}\nstderr: {}",
        args.join(" "),
        r.stdout,
        r.stderr
    );
    r
}

/// `skopeo copy --all --preserve-digests oci:LAYOUT:TAG docker://HOST/REPO:TAG` with credentials.
pub async fn push(layout: &ImageLayout, host: &str, repo: &str, user: &str, password: &str) {
    let src = format!("oci:{}:{}", layout.dir.display(), layout.tag);
    let dst = format!("docker://{host}/{repo}:{}", layout.tag);
    let creds = format!("{user}:{password}");
    run_ok(&[
        "--insecure-policy",
        "copy",
        "--quiet",
        "--all",
        "--preserve-digests",
        "--dest-tls-verify=false",
        "--dest-creds",
        &creds,
        &src,
        &dst,
    ])
    .await;
}

/// `skopeo copy --all --preserve-digests docker://REFERENCE oci:OUT:TAG` over plain HTTP, optionally
/// with credentials; returns what landed in `out`.
pub async fn pull(reference: &str, out: &Path, tag: &str, creds: Option<&str>) -> ImageLayout {
    let r = try_pull(reference, out, tag, creds).await;
    assert!(
        r.success,
        "skopeo copy docker://{reference} failed:\nstdout: {}\nstderr: {}",
        r.stdout, r.stderr
    );
    ImageLayout::read(out, tag)
}

/// [`pull`] without the assertion.
pub async fn try_pull(reference: &str, out: &Path, tag: &str, creds: Option<&str>) -> Run {
    let src = format!("docker://{reference}");
    let dst = format!("oci:{}:{tag}", out.display());
    let mut args = vec![
        "--insecure-policy",
        "copy",
        "--quiet",
        "--all",
        "--preserve-digests",
        "--src-tls-verify=false",
    ];
    if let Some(c) = creds {
        args.push("--src-creds");
        args.push(c);
    }
    args.push(&src);
    args.push(&dst);
    run(&args).await
}

/// `skopeo inspect --raw docker://REFERENCE`: the manifest bytes exactly as served.
pub async fn inspect_raw(reference: &str, creds: Option<&str>) -> Vec<u8> {
    let src = format!("docker://{reference}");
    let mut args = vec![
        "--insecure-policy",
        "inspect",
        "--raw",
        "--tls-verify=false",
    ];
    if let Some(c) = creds {
        args.push("--creds");
        args.push(c);
    }
    args.push(&src);
    run_ok(&args).await.stdout.into_bytes()
}
