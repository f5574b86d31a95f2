//! The command line: check-config's output and its one-line errors naming the key or file.

use std::process::Command;

fn cachalot() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cachalot"))
}

fn write(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
    let p = dir.path().join("c.toml");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn check_config_prints_the_effective_config() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "[[upstream]]\nname = \"docker.io\"\nurl = \"https://registry-1.docker.io\"\ndefault = true\n",
    );
    let out = cachalot()
        .args(["check-config", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("tag_ttl = \"5m\""), "{text}");
    assert!(text.contains("listen = \"0.0.0.0:5000\""), "{text}");
}

#[test]
fn bad_configs_fail_with_one_line_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    for (text, needle) in [
        ("[cache]\nmax_sise = \"1GiB\"\n", "max_sise"),
        ("[cache]\nmemory = \"lots\"\n", "lots"),
        (
            "[[upstream]]\nname = \"a\"\nurl = \"not a url\"\n",
            "upstream[0].url",
        ),
        (
            "[[upstream]]\nname = \"a\"\nurl = \"https://a\"\nusername = \"u\"\npassword_env = \"CACHALOT_TEST_SURELY_UNSET\"\n",
            "CACHALOT_TEST_SURELY_UNSET",
        ),
        (
            "[storage]\nbackend = \"s3\"\nbucket = \"b\"\naccess_key_id_env = \"CACHALOT_TEST_KEY_UNSET\"\nsecret_access_key_env = \"CACHALOT_TEST_KEY_UNSET\"\n",
            "storage.access_key_id_env",
        ),
        (
            "[storage]\nbackend = \"s3\"\nbucket = \"b\"\n[cluster]\npeers = [\"http://127.0.0.1:5000\"]\nsecret_file = \"/nonexistent/secret\"\n",
            "cluster.secret_file",
        ),
    ] {
        let p = write(&dir, text);
        let out = cachalot()
            .args(["check-config", "--config"])
            .arg(&p)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains(needle), "{err:?} should name {needle}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err:?}");
    }
    let out = cachalot()
        .args(["check-config", "--config", "/nonexistent/c.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("/nonexistent/c.toml")
    );
}

#[test]
fn serve_refuses_a_bad_config_without_starting() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "[server]\nlisten = \"nowhere\"\n");
    let out = cachalot()
        .args(["serve", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8(out.stderr).unwrap().contains("listen"));
}

// === [auth] and [[access]] ===

fn htpasswd_line(user: &str, password: &str) -> String {
    format!("{user}:{}\n", bcrypt::hash(password, 4).unwrap())
}

fn check_config(dir: &tempfile::TempDir, text: &str) -> std::process::Output {
    let p = write(dir, text);
    cachalot()
        .args(["check-config", "--config"])
        .arg(&p)
        .output()
        .unwrap()
}

#[test]
fn check_config_refuses_bad_auth_and_access_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("htpasswd");
    std::fs::write(&good, htpasswd_line("alice", "pw")).unwrap();
    let md5 = dir.path().join("htpasswd.md5");
    std::fs::write(
        &md5,
        format!(
            "{}carol:$apr1$Zx7Yq0aB$kWm1s9d8TQ2tWqJ3dS6mV/\n",
            htpasswd_line("alice", "pw")
        ),
    )
    .unwrap();
    let auth = |p: &std::path::Path| format!("[auth]\nhtpasswd = {:?}\n", p.to_str().unwrap());
    let rule = |users: &str, repos: &str| {
        format!("[[access]]\nusers = {users}\nrepositories = {repos}\nallow = true\n")
    };
    for (text, needles) in [
        (
            rule("[\"alice\"]", "[\"docker.io/library/*\"]"),
            vec!["access", "[auth]"],
        ),
        (
            auth(&good) + &rule("[\"alice\"]", "[\"docker.io/x\", \"docker.io/***\"]"),
            vec!["access[0].repositories[1]", "docker.io/***"],
        ),
        (
            auth(&good) + &rule("[]", "[\"docker.io/x\"]"),
            vec!["access[0].users"],
        ),
        (
            auth(&good) + &rule("[\"alice\"]", "[\"docker.io//x\"]"),
            vec!["access[0].repositories[0]", "empty path component"],
        ),
        (
            auth(&md5),
            vec!["auth.htpasswd", "htpasswd.md5", "line 2", "bcrypt"],
        ),
        (
            auth(&dir.path().join("missing")),
            vec!["auth.htpasswd", "missing"],
        ),
        (
            "[auth]\nhtpasswd = \"/h\"\nanonymus = true\n".to_string(),
            vec!["anonymus"],
        ),
    ] {
        let out = check_config(&dir, &text);
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(!out.status.success(), "{text} was accepted");
        for n in needles {
            assert!(err.contains(n), "{err:?} should name {n}");
        }
        assert_eq!(err.trim_end().lines().count(), 1, "{err:?}");
        assert!(!err.contains("Zx7Yq0aB"), "a hash in {err:?}");
    }
}

#[test]
fn check_config_warns_of_unknown_users_and_clear_text_and_prints_no_hash() {
    let dir = tempfile::tempdir().unwrap();
    let h = dir.path().join("htpasswd");
    let line = htpasswd_line("alice", "pw");
    std::fs::write(&h, &line).unwrap();
    let text = format!(
        "[[upstream]]\nname = \"docker.io\"\nurl = \"https://registry-1.docker.io\"\ndefault = true\n\n\
         [auth]\nhtpasswd = {:?}\n\n[[access]]\nusers = [\"alice\", \"bbo\", \"ci-*\", \"anonymous\"]\n\
         repositories = [\"docker.io/library/*\"]\nallow = true\n",
        h.to_str().unwrap()
    );
    let out = check_config(&dir, &text);
    let err = String::from_utf8(out.stderr).unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{err}");
    let warnings: Vec<&str> = err.lines().collect();
    assert_eq!(warnings.len(), 2, "{err}");
    assert!(warnings[0].contains("clear text"), "{err}");
    assert!(
        warnings[1].contains("warning: access[0].users[1]: \"bbo\""),
        "{err}"
    );
    assert!(
        stdout.contains("[auth]") && stdout.contains("htpasswd = "),
        "{stdout}"
    );
    assert!(stdout.contains("[[access]]"), "{stdout}");
    let hash = line.trim_end().split_once(':').unwrap().1;
    assert!(!stdout.contains(hash) && !err.contains(hash));
}

/// `GET path` over a fresh connection with optional Basic credentials; the status code.
fn status_of(addr: std::net::SocketAddr, path: &str, creds: Option<(&str, &str)>) -> u16 {
    use base64::Engine;
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let auth = creds
        .map(|(u, p)| {
            let b = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
            format!("Authorization: Basic {b}\r\n")
        })
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {out:?}"))
}

/// Kills the child on drop, so that a failing assertion leaves no server behind.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `cachalot serve` as a child process on a free port, its output in `serve.log` of `dir`.
struct Serving {
    child: Child,
    addr: std::net::SocketAddr,
    log: std::path::PathBuf,
}

impl Serving {
    /// Starts serve with `config` (its `listen` filled in from `{addr}`) and waits until it
    /// accepts connections.
    fn start(dir: &tempfile::TempDir, config: &str) -> Serving {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
        let cfg = write(dir, &config.replace("{addr}", &addr.to_string()));
        let log = dir.path().join("serve.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Child(
            cachalot()
                .args(["serve", "--config"])
                .arg(&cfg)
                .env("RUST_LOG", "info")
                .stdin(std::process::Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .unwrap(),
        );
        let s = Serving { child, addr, log };
        s.wait("serve did not start", || {
            std::net::TcpStream::connect(addr).is_ok()
        });
        s
    }

    /// Polls `done` until it holds; fails with the log after a safety timeout.
    fn wait(&self, what: &str, done: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !done() {
            assert!(
                std::time::Instant::now() < deadline,
                "safety timeout: {what}\n{}",
                self.log_text()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn hup(&self) {
        let hup = Command::new("kill")
            .args(["-HUP", &self.child.0.id().to_string()])
            .status()
            .unwrap();
        assert!(hup.success());
    }
}

#[test]
fn sighup_rereads_the_htpasswd_file_and_the_server_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let h = dir.path().join("htpasswd");
    std::fs::write(&h, htpasswd_line("alice", "pw-a")).unwrap();
    let s = Serving::start(
        &dir,
        &format!(
            "[server]\nlisten = \"{{addr}}\"\n[cache]\ndir = {:?}\n\
             [[upstream]]\nname = \"r.local\"\nurl = \"http://127.0.0.1:9\"\ndefault = true\n\
             [auth]\nhtpasswd = {:?}\n",
            dir.path().join("cache").to_str().unwrap(),
            h.to_str().unwrap()
        ),
    );
    let addr = s.addr;
    assert_eq!(status_of(addr, "/v2/", Some(("alice", "pw-a"))), 200);
    assert_eq!(status_of(addr, "/v2/", Some(("bob", "pw-b"))), 401);

    std::fs::write(&h, htpasswd_line("bob", "pw-b")).unwrap();
    s.hup();
    s.wait("no reload on SIGHUP", || {
        s.log_text().contains("trigger=\"SIGHUP\"")
    });
    // SIGHUP's default action is to end the process; this one is still serving.
    assert_eq!(status_of(addr, "/v2/", Some(("bob", "pw-b"))), 200);
    assert_eq!(status_of(addr, "/v2/", Some(("alice", "pw-a"))), 401);
    assert_eq!(status_of(addr, "/healthz", None), 200);
}

/// A service manager's `reload` (SIGHUP) must not stop a mirror that has nothing to reload.
#[test]
fn sighup_without_auth_or_tls_keeps_the_server_running() {
    let dir = tempfile::tempdir().unwrap();
    let s = Serving::start(
        &dir,
        &format!(
            "[server]\nlisten = \"{{addr}}\"\n[cache]\ndir = {:?}\n\
             [[upstream]]\nname = \"r.local\"\nurl = \"http://127.0.0.1:9\"\ndefault = true\n",
            dir.path().join("cache").to_str().unwrap(),
        ),
    );
    s.hup();
    s.wait("SIGHUP not logged", || {
        s.log_text().contains("SIGHUP received")
    });
    assert_eq!(status_of(s.addr, "/healthz", None), 200);
    assert_eq!(status_of(s.addr, "/v2/", None), 200);
}

/// `cachalot healthcheck`, the image's HEALTHCHECK: 0 on a 200, else 1 with one line naming the
/// URL, and a server that accepts but never answers fails it within `--timeout`.
#[test]
fn healthcheck_passes_on_a_200_only_and_gives_up_in_time() {
    let check_with = |args: &[&str]| {
        let start = std::time::Instant::now();
        let out = cachalot().arg("healthcheck").args(args).output().unwrap();
        let err = String::from_utf8(out.stderr).unwrap();
        (out.status.success(), err, start.elapsed())
    };
    let check = |url: &str, extra: &[&str]| check_with(&[&["--url", url], extra].concat());
    let dir = tempfile::tempdir().unwrap();
    let s = Serving::start(
        &dir,
        &format!(
            "[server]\nlisten = \"{{addr}}\"\n[cache]\ndir = {:?}\n\
             [[upstream]]\nname = \"r.local\"\nurl = \"http://127.0.0.1:9\"\ndefault = true\n",
            dir.path().join("cache").to_str().unwrap(),
        ),
    );
    let healthz = format!("http://{}/healthz", s.addr);
    let (ok, err, _) = check(&healthz, &[]);
    assert!(ok, "{err}");
    assert!(err.is_empty(), "{err:?}");
    // The image's HEALTHCHECK: the port comes from the config the server runs with.
    let config = dir.path().join("c.toml");
    let (ok, err, _) = check_with(&["--config", config.to_str().unwrap()]);
    assert!(ok, "{err}");

    let missing = format!("http://{}/nope", s.addr);
    let (ok, err, _) = check(&missing, &[]);
    assert!(!ok);
    assert!(err.contains(&missing) && err.contains("404"), "{err:?}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err:?}");

    let addr = s.addr;
    drop(s);
    let (ok, err, _) = check(&healthz, &[]);
    assert!(!ok, "a stopped server passed");
    assert!(err.contains(&addr.to_string()), "{err:?}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err:?}");

    // Accepted by the kernel's backlog, never answered: a hung server.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/healthz", silent.local_addr().unwrap());
    let (ok, err, took) = check(&url, &["--timeout", "1s"]);
    assert!(!ok);
    assert!(err.contains("no answer within 1s"), "{err:?}");
    assert!(took < std::time::Duration::from_secs(10), "took {took:?}");

    let (ok, err, _) = check_with(&["--config", config.to_str().unwrap()]);
    assert!(!ok, "a stopped server passed");
    assert!(err.contains(&addr.to_string()), "{err:?}");

    let (ok, err, _) = check("https://127.0.0.1:1/healthz", &[]);
    assert!(!ok);
    assert!(err.contains("--url"), "{err:?}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err:?}");
}

/// Every option of every command says what it is for in `--help`.
#[test]
fn every_option_has_help_text() {
    for sub in [
        "serve",
        "check-config",
        "gc",
        "prefetch",
        "export",
        "import",
        "client-config",
        "completions",
        "healthcheck",
    ] {
        let out = cachalot().args([sub, "--help"]).output().unwrap();
        assert!(out.status.success(), "{sub} --help");
        let text = String::from_utf8(out.stdout).unwrap();
        for line in text.lines() {
            let t = line.trim();
            if t.starts_with("--") && !t.starts_with("--help") && !t.starts_with("--version") {
                // clap puts the help after the option on the same line (or the next, when long).
                let undocumented = !t.contains("  ") && {
                    let next = text.lines().skip_while(|l| *l != line).nth(1).unwrap_or("");
                    next.trim().is_empty() || next.trim_start().starts_with('-')
                };
                assert!(!undocumented, "{sub}: {t:?} has no help text");
            }
        }
    }
}

#[test]
fn completions_are_printed_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let out = cachalot().args(["completions", shell]).output().unwrap();
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(
            text.contains("client-config"),
            "{shell}: {}",
            &text[..text.len().min(200)]
        );
    }
}

#[test]
fn client_config_writes_files_and_refuses_bad_input_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = cachalot()
        .args([
            "client-config",
            "containerd",
            "--mirror",
            "http://mirror:5000",
        ])
        .args(["--registries", "docker.io,ghcr.io", "--output-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hub = std::fs::read_to_string(dir.path().join("certs.d/docker.io/hosts.toml")).unwrap();
    assert!(hub.contains("[host.\"http://mirror:5000\"]"), "{hub}");
    assert!(dir.path().join("certs.d/ghcr.io/hosts.toml").exists());
    assert!(dir.path().join("certs.d/_default/hosts.toml").exists());
    assert!(!dir.path().join("certs.d/quay.io").exists());
    for (args, needle) in [
        (
            vec!["client-config", "docker", "--mirror", "mirror:5000"],
            "--mirror",
        ),
        (
            vec![
                "client-config",
                "podman",
                "--mirror",
                "http://m:5000",
                "--registries",
                "nope.test",
            ],
            "nope.test",
        ),
        (
            vec![
                "client-config",
                "docker",
                "--mirror",
                "http://m:5000",
                "--registries",
                "ghcr.io",
            ],
            "Docker Hub",
        ),
    ] {
        let out = cachalot().args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains(needle), "{err:?} should name {needle}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err:?}");
    }
}

// === credential helpers and commands ===

/// check-config finds a credential helper on PATH without running it (it may reach a cloud),
/// refuses one that is missing in one line naming the key, and prints no secret.
#[test]
fn check_config_finds_credential_helpers_on_path_without_running_them() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let ran = dir.path().join("ran");
    let helper = bin.join("docker-credential-fake");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\ntouch {ran:?}\necho '{{\"Username\":\"u\",\"Secret\":\"helper-secret-9Zq\"}}'\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = |extra: &str| {
        write(
            &dir,
            &format!(
                "[[upstream]]\nname = \"123456789012.dkr.ecr.eu-west-1.amazonaws.com\"\nurl = \"https://123456789012.dkr.ecr.eu-west-1.amazonaws.com\"\n{extra}"
            ),
        )
    };
    let run = |p: &std::path::Path| {
        cachalot()
            .args(["check-config", "--config"])
            .arg(p)
            .env("PATH", &bin)
            .output()
            .unwrap()
    };

    let out = run(&config("credential_helper = \"fake\"\n"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("credential_helper = \"fake\""), "{text}");
    assert!(!text.contains("helper-secret-9Zq") && !stderr.contains("helper-secret-9Zq"));
    assert!(!ran.exists(), "check-config ran the helper");

    for (extra, needle) in [
        (
            "credential_helper = \"ecr-login\"\n",
            "credential_helper: docker-credential-ecr-login is not on PATH",
        ),
        (
            "username = \"AWS\"\ncredential_command = [\"aws\", \"ecr\", \"get-login-password\"]\n",
            "credential_command: aws is not on PATH",
        ),
        (
            "credential_helper = \"/nonexistent/docker-credential-x\"\n",
            "credential_helper: /nonexistent/docker-credential-x is not an executable file",
        ),
        (
            "credential_helper = \"fake\"\nusername = \"AWS\"\n",
            "upstream[0].username",
        ),
    ] {
        let out = run(&config(extra));
        assert!(!out.status.success(), "{extra}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains(needle), "{err:?} should name {needle}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err:?}");
    }
}
