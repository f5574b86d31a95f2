//! Upstream TLS against a real registry: Debian's `docker-registry` serving HTTPS with a
//! certificate from a private CA made in the test, once as is and once requiring client
//! certificates (mTLS). cachalot pulls from it with `ca_file`, `client_cert` + `client_key`, or
//! `insecure_skip_verify`, and is refused, with the TLS reason in the error, without them.
//!
//! The registry tests need `docker-registry` and `skopeo` in PATH (skipped without them, unless
//! `CI` is set); the configuration tests need nothing.

mod e2e_support;

use e2e_support::certs::TestCa;
use e2e_support::http::{HttpResponse, request};
use e2e_support::registry::{Distribution, RegistryOptions, RegistryTls};
use e2e_support::{ImageLayout, Platform, block_on_shared, skopeo};
use hyper::Method;
use sha2::{Digest as _, Sha256};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const REPO: &str = "e2e/single";
const TAG: &str = "latest";
const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
                      application/vnd.oci.image.index.v1+json, \
                      application/vnd.docker.distribution.manifest.v2+json";

/// A TLS registry seeded with one image, and the files a client needs to reach it.
struct TlsRegistry {
    registry: Distribution,
    image: ImageLayout,
    /// The private CA that signed the registry's certificate (PEM).
    ca_file: PathBuf,
    /// A client pair the registry accepts (signed by its client CA), for the mTLS registry.
    client: Option<(PathBuf, PathBuf)>,
    /// Holds the certificates, the layout and the registry's data while it runs.
    _dir: tempfile::TempDir,
}

impl TlsRegistry {
    /// Starts the registry (requiring client certificates with `mtls`) and pushes the image
    /// with skopeo, which trusts the CA (and presents the client pair) through a cert dir.
    async fn start(mtls: bool) -> TlsRegistry {
        let dir = e2e_support::tools::tempdir(if mtls { "mtls" } else { "tls" });
        let ca = TestCa::new("cachalot test registry CA");
        let (cert, key) = ca.server("registry").write(dir.path(), "registry");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let skopeo_certs = dir.path().join("skopeo-certs");
        std::fs::create_dir(&skopeo_certs).unwrap();
        std::fs::write(skopeo_certs.join("ca.crt"), ca.pem()).unwrap();
        let (client, client_ca) = if mtls {
            let client_ca = TestCa::new("cachalot test client CA");
            let path = dir.path().join("client-ca.pem");
            std::fs::write(&path, client_ca.pem()).unwrap();
            let leaf = client_ca.client("cachalot");
            let pair = leaf.write(dir.path(), "client");
            // skopeo's cert dir: *.crt are CAs, a *.cert with its *.key is the client pair.
            std::fs::write(skopeo_certs.join("client.cert"), &leaf.cert_pem).unwrap();
            std::fs::write(skopeo_certs.join("client.key"), &leaf.key_pem).unwrap();
            (Some(pair), Some(path))
        } else {
            (None, None)
        };
        let registry = Distribution::start_with(RegistryOptions {
            auth: None,
            tls: Some(RegistryTls {
                cert,
                key,
                client_ca,
            }),
        })
        .await;
        let image = ImageLayout::build(
            &dir.path().join("layout"),
            TAG,
            &[Platform::new("linux", "amd64")],
            2,
        );
        let src = format!("oci:{}:{TAG}", image.dir.display());
        let dst = format!("docker://{}/{REPO}:{TAG}", registry.host());
        let cert_dir = skopeo_certs.display().to_string();
        skopeo::run_ok(&[
            "--insecure-policy",
            "copy",
            "--quiet",
            "--preserve-digests",
            "--dest-cert-dir",
            &cert_dir,
            &src,
            &dst,
        ])
        .await;
        TlsRegistry {
            registry,
            image,
            ca_file,
            client,
            _dir: dir,
        }
    }

    fn layer(&self) -> &str {
        &self.image.images[0].layer_digests[0]
    }
}

/// One registry per mode for the whole test binary (see `e2e_support::shared_upstream`).
fn shared(mtls: bool) -> &'static TlsRegistry {
    static PLAIN: OnceLock<&'static TlsRegistry> = OnceLock::new();
    static MTLS: OnceLock<&'static TlsRegistry> = OnceLock::new();
    let cell = if mtls { &MTLS } else { &PLAIN };
    cell.get_or_init(|| {
        e2e_support::tools::sweep_stale_tempdirs();
        let reg = block_on_shared(TlsRegistry::start(mtls));
        &*Box::leak(Box::new(reg))
    })
}

fn toml_path(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// A cachalot whose default upstream is `url`, with `extra` lines in its `[[upstream]]`.
async fn cachalot(url: &str, extra: &str) -> (cachalot::server::Server, tempfile::TempDir) {
    let dir = e2e_support::tools::tempdir("cachalot-tls");
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[cache]\ndir = {}\n\
         [[upstream]]\nname = \"tls.test\"\nurl = \"{url}\"\ndefault = true\n{extra}",
        toml_path(&dir.path().join("cache"))
    );
    let config = cachalot::config::Config::from_toml_str(&toml)
        .unwrap_or_else(|e| panic!("config rejected: {e}\n{toml}"));
    let server = cachalot::server::spawn(config)
        .await
        .unwrap_or_else(|e| panic!("spawn failed: {e}\n{toml}"));
    (server, dir)
}

async fn get(server: &cachalot::server::Server, path: &str) -> HttpResponse {
    let url = format!("http://{}{path}", server.local_addr());
    request(Method::GET, &url, &[("accept", ACCEPT)])
        .await
        .unwrap()
}

/// The image's manifest and a layer come through cachalot, byte for byte.
async fn assert_pulls(server: &cachalot::server::Server, reg: &TlsRegistry) {
    let m = get(server, &format!("/v2/{REPO}/manifests/{TAG}")).await;
    assert_eq!(
        m.status,
        200,
        "manifest: {}",
        String::from_utf8_lossy(&m.body)
    );
    assert_eq!(m.header("docker-content-digest"), reg.image.top_digest);
    let b = get(server, &format!("/v2/{REPO}/blobs/{}", reg.layer())).await;
    assert_eq!(b.status, 200);
    assert_eq!(
        format!("sha256:{}", hex::encode(Sha256::digest(&b.body))),
        reg.layer()
    );
}

/// The pull is refused as an upstream failure whose message carries the TLS reason.
async fn assert_refused(server: &cachalot::server::Server, reason: &str) -> String {
    let m = get(server, &format!("/v2/{REPO}/manifests/{TAG}")).await;
    assert!(
        m.status == 502 || m.status == 503,
        "expected an upstream failure, got {}: {}",
        m.status,
        String::from_utf8_lossy(&m.body)
    );
    let message = m.json()["errors"][0]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(message.contains("tls.test"), "{message}");
    assert!(
        message.to_lowercase().contains(reason),
        "the reason ({reason}) is missing: {message}"
    );
    message
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_registry_is_refused_without_ca_file_and_pulled_with_it() {
    require_e2e_tools!();
    let reg = shared(false);
    let (without, _d1) = cachalot(&reg.registry.url(), "").await;
    assert_refused(&without, "certificate").await;
    without.shutdown().await;

    let (with, _d2) = cachalot(
        &reg.registry.url(),
        &format!("ca_file = {}\n", toml_path(&reg.ca_file)),
    )
    .await;
    assert_pulls(&with, reg).await;
    with.shutdown().await;
}

#[path = "common/capture.rs"]
mod capture;
use capture::Capture;

#[tokio::test]
async fn an_mtls_registry_is_refused_without_client_cert_and_the_log_says_why() {
    require_e2e_tools!();
    let reg = shared(true);
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(cachalot::telemetry::subscriber(
        cachalot::config::LogFormat::Text,
        tracing_subscriber::EnvFilter::new("info"),
        false,
        capture.clone(),
    ));
    let ca = format!("ca_file = {}\n", toml_path(&reg.ca_file));
    let (without, _d) = cachalot(&reg.registry.url(), &ca).await;
    // Under TLS 1.3 the registry refuses the missing certificate after the handshake, so the
    // client's message has no TLS reason in it; the log has.
    assert_refused(&without, "tls.test").await;
    without.shutdown().await;
    let log = capture.text();
    assert!(
        log.contains("asked for a TLS client certificate and none is configured"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mtls_registry_is_pulled_with_client_cert() {
    require_e2e_tools!();
    let reg = shared(true);
    let ca = format!("ca_file = {}\n", toml_path(&reg.ca_file));
    let (cert, key) = reg.client.as_ref().unwrap();
    let (with, _d2) = cachalot(
        &reg.registry.url(),
        &format!(
            "{ca}client_cert = {}\nclient_key = {}\n",
            toml_path(cert),
            toml_path(key)
        ),
    )
    .await;
    assert_pulls(&with, reg).await;
    with.shutdown().await;
}

#[tokio::test]
async fn insecure_skip_verify_pulls_from_a_private_ca_registry_without_ca_file_and_is_warned() {
    require_e2e_tools!();
    let reg = shared(false);
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(cachalot::telemetry::subscriber(
        cachalot::config::LogFormat::Text,
        tracing_subscriber::EnvFilter::new("info"),
        false,
        capture.clone(),
    ));
    let (server, _d) = cachalot(&reg.registry.url(), "insecure_skip_verify = true\n").await;
    let log = capture.text();
    assert!(
        log.contains("WARN") && log.contains("insecure_skip_verify") && log.contains("tls.test"),
        "no warning at start: {log}"
    );
    assert_pulls(&server, reg).await;
    server.shutdown().await;
}

// === configuration: no registry needed ===

#[tokio::test]
async fn missing_or_bad_tls_files_fail_at_start_naming_the_key_and_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere/ca.pem");
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello\n").unwrap();
    let ca = TestCa::new("ca");
    let (one_cert, _) = ca.client("one").write(dir.path(), "one");
    let (_, two_key) = ca.client("two").write(dir.path(), "two");
    for (extra, key, path) in [
        (
            format!("ca_file = {}\n", toml_path(&missing)),
            "ca_file",
            &missing,
        ),
        (
            format!("ca_file = {}\n", toml_path(&not_pem)),
            "ca_file",
            &not_pem,
        ),
        (
            format!(
                "client_cert = {}\nclient_key = {}\n",
                toml_path(&missing),
                toml_path(&two_key)
            ),
            "client_cert",
            &missing,
        ),
        (
            format!(
                "client_cert = {}\nclient_key = {}\n",
                toml_path(&one_cert),
                toml_path(&two_key)
            ),
            "client_key",
            &two_key,
        ),
    ] {
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[cache]\ndir = {}\n\
             [[upstream]]\nname = \"tls.test\"\nurl = \"https://127.0.0.1:9\"\ndefault = true\n{extra}",
            toml_path(&dir.path().join("cache"))
        );
        let config = cachalot::config::Config::from_toml_str(&toml).unwrap();
        let err = cachalot::server::spawn(config)
            .await
            .err()
            .unwrap_or_else(|| panic!("started with {extra}"))
            .to_string();
        assert!(err.contains("tls.test"), "{err}");
        assert!(err.contains(key), "{key} not named: {err}");
        assert!(
            err.contains(&path.display().to_string()),
            "path not named: {err}"
        );
        assert!(!err.contains('\n'), "{err}");
    }
}

fn check_config(dir: &Path, extra: &str) -> std::process::Output {
    let file = dir.join("check.toml");
    std::fs::write(
        &file,
        format!(
            "[cache]\ndir = {}\n[[upstream]]\nname = \"tls.test\"\nurl = \"https://r.test\"\n{extra}",
            toml_path(&dir.join("cache"))
        ),
    )
    .unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_cachalot"))
        .args(["check-config", "--config"])
        .arg(&file)
        .output()
        .unwrap()
}

#[test]
fn check_config_warns_of_insecure_skip_verify_and_reads_the_tls_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = check_config(dir.path(), "insecure_skip_verify = true\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: upstream[0].insecure_skip_verify"),
        "{stderr}"
    );
    assert!(stderr.contains("tls.test"), "{stderr}");

    let out = check_config(dir.path(), "");
    assert!(out.status.success());
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("warning"),
        "no warning without insecure_skip_verify"
    );

    let out = check_config(dir.path(), "ca_file = \"/nonexistent/ca.pem\"\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("ca_file"), "{stderr}");
    assert!(stderr.contains("/nonexistent/ca.pem"), "{stderr}");

    for (extra, key) in [
        ("client_cert = \"/c.pem\"\n", "upstream[0].client_key"),
        ("client_key = \"/k.pem\"\n", "upstream[0].client_cert"),
        (
            "ca_file = \"/ca.pem\"\ninsecure_skip_verify = true\n",
            "upstream[0].insecure_skip_verify",
        ),
    ] {
        let out = check_config(dir.path(), extra);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted {extra}");
        assert!(stderr.contains(key), "{key} not named: {stderr}");
    }
}
