//! Credentials for cloud registries, one test per flow that differs, against the fake registry:
//! Docker Hub and GHCR personal access tokens (Basic to the token realm, from a helper and a
//! command), GCR's `_json_key` and `oauth2accesstoken`, ECR through a credential helper with a
//! Basic challenge, the answer asked again when the upstream or its realm refuses it (once for
//! a burst) and after `credential_refresh`, a failing helper, ACR's null-GUID username and its
//! `acr-env` identity token (OAuth2 refresh-token exchange), Quay robot accounts, and
//! Artifactory's repository path in `url`.
//!
//! The helpers are shell scripts the tests write, named by absolute path in the config, so no
//! test touches the process's PATH or environment.

mod common;

use base64::Engine as _;
use cachalot::config::LogFormat;
use common::capture::Capture;
use common::*;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tracing_subscriber::EnvFilter;

/// What cachalot logs during a test, at debug. Every test here captures it, to check that no
/// secret of its flow reached the log, and so that tests running in parallel all have a
/// subscriber: tracing caches per call site whether anyone listens, and a test without one
/// would hide events from the others.
struct Logged {
    capture: Capture,
    _guard: tracing::subscriber::DefaultGuard,
}

impl Logged {
    fn start() -> Logged {
        let capture = Capture::default();
        // #[tokio::test] polls every cachalot task on this thread: a thread-local subscriber
        // sees them all.
        let _guard = tracing::subscriber::set_default(cachalot::telemetry::subscriber(
            LogFormat::Text,
            EnvFilter::new("debug"),
            false,
            capture.clone(),
        ));
        Logged { capture, _guard }
    }

    fn text(&self) -> String {
        self.capture.text()
    }

    /// None of `secrets`, nor `user:secret` as Basic credentials, nor any bearer token `fake`
    /// was sent, is in the log.
    fn assert_without(&self, fake: &FakeRegistry, user: &str, secrets: &[&str]) {
        let log = self.text();
        assert!(log.contains("upstream call"), "nothing logged:\n{log}");
        let tokens: Vec<String> = fake
            .requests()
            .iter()
            .filter_map(|r| Some(authorization(r)?.strip_prefix("Bearer ")?.to_owned()))
            .collect();
        let basics: Vec<String> = secrets.iter().map(|s| basic(user, s)).collect();
        let all = secrets
            .iter()
            .copied()
            .chain(basics.iter().map(|b| b.trim_start_matches("Basic ")))
            .chain(tokens.iter().map(String::as_str));
        for s in all {
            assert!(!log.contains(s), "{s:?} is in the log:\n{log}");
        }
    }
}

/// A `docker-credential-*` helper (or a credential command) written by the test: a script
/// that counts its runs, keeps what it was asked on stdin, and runs `body` (where `$n` is the
/// run number).
struct Helper {
    dir: tempfile::TempDir,
    path: PathBuf,
}

impl Helper {
    /// A credential helper: called as `<path> get`.
    fn new(body: &str) -> Helper {
        Helper::script(&format!(
            "[ \"$1\" = get ] || {{ echo \"called with $*\" >&2; exit 9; }}\n{body}"
        ))
    }

    fn script(body: &str) -> Helper {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docker-credential-fake");
        let d = dir.path().to_str().unwrap();
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\nn=$(( $(cat '{d}/runs' 2>/dev/null || echo 0) + 1 )); echo $n > '{d}/runs'\ncat >> '{d}/asked'; echo >> '{d}/asked'\n{body}\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        Helper { dir, path }
    }

    /// `credential_helper = "<path>"`.
    fn config(&self) -> String {
        format!("credential_helper = {:?}", self.path.to_str().unwrap())
    }

    fn runs(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("runs"))
            .map_or(0, |s| s.trim().parse().unwrap())
    }

    /// What each run read on stdin.
    fn asked(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("asked"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

fn basic(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

fn authorization(r: &Recorded) -> Option<String> {
    r.headers
        .get("authorization")
        .map(|v| v.to_str().unwrap().to_owned())
}

/// A fake whose token realm wants `user:password`, with `repo` private behind it.
async fn token_registry(user: &str, password: &str, repo: &str) -> (FakeRegistry, Image) {
    let fake = FakeRegistry::start().await;
    fake.set_token_auth(TokenAuth {
        required_credentials: Some((user.into(), password.into())),
        ..TokenAuth::default()
    });
    fake.set_private(repo, 401);
    let img = fake.push_image(repo, Some("v1"), &[1000, 2000]);
    (fake, img)
}

async fn start(fake: FakeRegistry, name: &str, extra: &str) -> Env {
    let up = UpstreamSpec::new(name, &fake.url(), true).with(extra);
    Env::start_on(fake, CacheSpec::default(), vec![up]).await
}

/// Pulls `repo:tag` (manifest, config, layers) and checks the bytes.
async fn pull(env: &Env, repo: &str, reference: &str, img: &Image) {
    let r = env
        .client
        .get(&env.v2(&format!("{repo}/manifests/{reference}")))
        .await;
    assert_eq!(r.status, 200, "manifest {repo}:{reference}: {}", r.text());
    assert_eq!(r.body, img.manifest.bytes);
    for (d, b) in std::iter::once(&img.config).chain(&img.layers) {
        let r = env.client.get(&env.v2(&format!("{repo}/blobs/{d}"))).await;
        assert_eq!(r.status, 200, "blob {d}: {}", r.text());
        assert!(r.body == *b);
    }
}

/// Every request to the token realm carried exactly these Basic credentials.
fn assert_realm_saw(fake: &FakeRegistry, user: &str, password: &str) {
    let tokens = fake.token_requests();
    assert!(!tokens.is_empty(), "no token request");
    for t in &tokens {
        assert_eq!(authorization(t), Some(basic(user, password)), "{}", t.path);
    }
}

fn file_with(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    format!("{:?}", p.to_str().unwrap())
}

// === Docker Hub, GHCR, GCR ===

/// Docker Hub's flow with a personal access token kept by a credential helper (`desktop`,
/// `pass`, `secretservice`): the token goes to the token realm as Basic credentials.
#[tokio::test]
async fn docker_hub_pat_from_a_helper_asked_about_the_host_it_goes_to() {
    let log = Logged::start();
    let pat = "dckr_pat_2sGqW0aFakeFakeFake";
    let (fake, img) = token_registry("me", pat, "me/app").await;
    let helper = Helper::new(&format!(
        r#"echo '{{"ServerURL":"https://index.docker.io/v1/","Username":"me","Secret":"{pat}"}}'"#
    ));
    let env = start(fake, "docker.io", &helper.config()).await;
    pull(&env, "me/app", "v1", &img).await;
    // The helper is asked about the host the answer goes to: this upstream is named docker.io
    // but lives elsewhere (the fake), so Docker Hub's key (`https://index.docker.io/v1/`, asked
    // for at Docker Hub's own hosts; see the unit test of `helper_server`) must not be used.
    let host = env
        .fake
        .url()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    assert_eq!(helper.asked(), [host]);
    assert_realm_saw(&env.fake, "me", pat);
    log.assert_without(&env.fake, "me", &[pat]);
}

/// GHCR with a PAT from a command (`gh auth token`): the command's arguments are passed as
/// written, its output (trailing newline removed) is the password of `username`.
#[tokio::test]
async fn ghcr_pat_from_a_command() {
    let log = Logged::start();
    let pat = "ghp_R2d2C3poFakeFakeFakeFake";
    let (fake, img) = token_registry("octocat", pat, "octocat/app").await;
    let gh = Helper::script(&format!("[ \"$*\" = 'auth token' ] || exit 9\necho {pat}"));
    let extra = format!(
        "username = \"octocat\"\ncredential_command = [{:?}, \"auth\", \"token\"]",
        gh.path.to_str().unwrap()
    );
    let env = start(fake, "ghcr.io", &extra).await;
    pull(&env, "octocat/app", "v1", &img).await;
    assert_eq!(gh.runs(), 1);
    assert_realm_saw(&env.fake, "octocat", pat);
    log.assert_without(&env.fake, "octocat", &[pat]);
}

/// GCR / Artifact Registry with a service account key: username `_json_key`, the key's whole
/// JSON (several lines, quotes, escaped newlines) as the password, from password_file.
#[tokio::test]
async fn gcr_json_key_from_a_password_file() {
    let log = Logged::start();
    let key = r#"{
  "type": "service_account",
  "project_id": "acme-prod",
  "private_key_id": "0123456789abcdef",
  "private_key": "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----\n",
  "client_email": "puller@acme-prod.iam.gserviceaccount.com"
}"#;
    let (fake, img) = token_registry("_json_key", key, "acme-prod/app").await;
    let dir = tempfile::tempdir().unwrap();
    let file = file_with(&dir, "key.json", &format!("{key}\n"));
    let extra = format!("username = \"_json_key\"\npassword_file = {file}");
    let env = start(fake, "gcr.io", &extra).await;
    pull(&env, "acme-prod/app", "v1", &img).await;
    assert_realm_saw(&env.fake, "_json_key", key);
    log.assert_without(
        &env.fake,
        "_json_key",
        &[key, "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC"],
    );
}

/// GCR / Artifact Registry with a short-lived access token: username `oauth2accesstoken`, the
/// password printed by `gcloud auth print-access-token`.
#[tokio::test]
async fn gcr_oauth2accesstoken_from_a_command() {
    let log = Logged::start();
    let token = "ya29.a0AfB_byFakeAccessToken";
    let (fake, img) = token_registry("oauth2accesstoken", token, "acme-prod/app").await;
    let gcloud = Helper::script(&format!("echo {token}"));
    let extra = format!(
        "username = \"oauth2accesstoken\"\ncredential_command = [{:?}, \"auth\", \"print-access-token\"]",
        gcloud.path.to_str().unwrap()
    );
    let env = start(fake, "gcr.io", &extra).await;
    pull(&env, "acme-prod/app", "v1", &img).await;
    assert_realm_saw(&env.fake, "oauth2accesstoken", token);
    log.assert_without(&env.fake, "oauth2accesstoken", &[token]);
}

// === ECR: a helper, a Basic challenge, refreshes ===

/// A fake ECR: Basic auth as `AWS`, the helper answering `ecr-pw-<run>`.
async fn ecr(extra: &str) -> (Env, Helper) {
    let fake = FakeRegistry::start().await;
    fake.set_basic_auth("AWS", "ecr-pw-1");
    let helper = Helper::new(r#"echo "{\"Username\":\"AWS\",\"Secret\":\"ecr-pw-$n\"}""#);
    let env = start(fake, UP, &format!("{}\n{extra}", helper.config())).await;
    (env, helper)
}

/// ECR through `docker-credential-ecr-login`: asked about the registry's host and port, its
/// answer sent as Basic credentials when the registry challenges with Basic, and kept for the
/// whole pull (by tag, then by digest).
#[tokio::test]
async fn ecr_through_a_helper_with_a_basic_challenge() {
    let log = Logged::start();
    let (env, helper) = ecr("").await;
    let img = env.fake.push_image("team/app", Some("v1"), &[1000, 2000]);
    pull(&env, "team/app", "v1", &img).await;
    pull(&env, "team/app", &img.manifest.digest.clone(), &img).await;
    assert_eq!(helper.asked(), [env.fake.addr().to_string()]);
    assert_eq!(helper.runs(), 1);
    let with_basic = env
        .fake
        .requests()
        .iter()
        .filter(|r| authorization(r) == Some(basic("AWS", "ecr-pw-1")))
        .count();
    assert!(
        with_basic >= 4,
        "{with_basic} requests carried the password"
    );
    log.assert_without(&env.fake, "AWS", &["ecr-pw-1"]);
}

/// ECR's password rotates: the registry refuses the old one, and a burst of requests refused
/// at once runs the helper once; its new answer serves them all.
#[tokio::test]
async fn a_refused_password_is_asked_again_once_for_a_burst() {
    let log = Logged::start();
    let (env, helper) = ecr("").await;
    let img = env.fake.push_image("team/app", Some("v1"), &[100; 8]);
    let r = env.client.get(&env.v2("team/app/manifests/v1")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(helper.runs(), 1);

    env.fake.set_basic_auth("AWS", "ecr-pw-2");
    let urls: Vec<String> = img
        .layers
        .iter()
        .map(|(d, _)| env.v2(&format!("team/app/blobs/{d}")))
        .collect();
    let gets = urls.iter().map(|u| env.client.get(u));
    for (r, (_, bytes)) in futures_util::future::join_all(gets)
        .await
        .iter()
        .zip(&img.layers)
    {
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.body == *bytes);
    }
    assert_eq!(helper.runs(), 2, "one run for the whole burst");
    let refused = env
        .fake
        .requests()
        .iter()
        .filter(|r| r.status == Some(401))
        .count();
    assert!(refused >= 2, "the rotated password was never refused");
    log.assert_without(&env.fake, "AWS", &["ecr-pw-1", "ecr-pw-2"]);
}

/// A token realm that refuses the helper's answer (401) has the helper asked again, and the
/// token fetched with its new answer.
#[tokio::test]
async fn a_realm_refusing_the_answer_has_it_asked_again() {
    let log = Logged::start();
    let (fake, a) = token_registry("robot", "pw-1", "org/a").await;
    let b = fake.push_image("org/b", Some("v1"), &[10]);
    fake.set_private("org/b", 401);
    let helper = Helper::new(r#"echo "{\"Username\":\"robot\",\"Secret\":\"pw-$n\"}""#);
    let env = start(fake, UP, &helper.config()).await;
    pull(&env, "org/a", "v1", &a).await;

    env.fake.set_token_auth(TokenAuth {
        required_credentials: Some(("robot".into(), "pw-2".into())),
        ..TokenAuth::default()
    });
    pull(&env, "org/b", "v1", &b).await;
    assert_eq!(helper.runs(), 2);
    let realm: Vec<_> = env.fake.token_requests();
    let last_two: Vec<_> = realm[realm.len() - 2..]
        .iter()
        .map(|r| (r.status, authorization(r)))
        .collect();
    assert_eq!(
        last_two,
        [
            (Some(401), Some(basic("robot", "pw-1"))),
            (Some(200), Some(basic("robot", "pw-2")))
        ]
    );
    log.assert_without(&env.fake, "robot", &["pw-1", "pw-2"]);
}

/// Once `credential_refresh` has passed, the helper is asked again in the background while
/// its previous answer still serves; once its new answer is in, it is used without a 401.
#[tokio::test]
async fn the_answer_is_refreshed_after_the_interval() {
    let log = Logged::start();
    let (env, helper) = ecr("credential_refresh = \"1s\"").await;
    for tag in ["a", "b", "c"] {
        env.fake.push_image("team/app", Some(tag), &[10]);
    }
    let r = env.client.get(&env.v2("team/app/manifests/a")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(helper.runs(), 1);

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = env.client.get(&env.v2("team/app/manifests/b")).await;
    assert_eq!(r.status, 200, "the stale answer still serves: {}", r.text());
    // Not the helper's run count: it counts at its start, and its answer is in only once
    // cachalot has read it.
    let deadline = Instant::now() + Duration::from_secs(20);
    while log.text().matches("credentials obtained").count() < 2 {
        assert!(
            Instant::now() < deadline,
            "never refreshed:\n{}",
            log.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The old password stops working only now: the new one is already in use.
    env.fake.set_basic_auth("AWS", "ecr-pw-2");
    let r = env.client.get(&env.v2("team/app/manifests/c")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(helper.runs(), 2);
    let refused = env
        .fake
        .requests()
        .iter()
        .filter(|r| r.status == Some(401))
        .count();
    assert_eq!(
        refused, 1,
        "only the first, unauthenticated request is challenged"
    );
    log.assert_without(&env.fake, "AWS", &["ecr-pw-1", "ecr-pw-2"]);
}

/// A helper that fails: its stderr is in the log (with the secret it answered before cut out),
/// its stdout never is, clients get a 502 naming the upstream, and a burst of requests, or
/// requests right after, do not run it again.
#[tokio::test]
async fn a_failing_helper_is_logged_without_secrets_and_not_rerun_at_once() {
    let log = Logged::start();
    let first = "ecr-first-secret-8Jd";
    let leaked = "stdout-secret-3Kp";
    let fake = FakeRegistry::start().await;
    fake.set_basic_auth("AWS", first);
    let img = fake.push_image("team/app", Some("v1"), &[10, 20]);
    let helper = Helper::new(&format!(
        r#"if [ $n = 1 ]; then echo '{{"Username":"AWS","Secret":"{first}"}}'; exit 0; fi
echo '{{"Username":"AWS","Secret":"{leaked}"}}'
echo "ecr-login: token {first} was revoked; no EC2 instance role (AccessDenied)" >&2
exit 1"#
    ));
    let env = start(fake, UP, &helper.config()).await;
    // The failure series exists before any run, so that the alert's increase() sees the first.
    let runs = "cachalot_upstream_credential_runs_total";
    let zero = format!("{runs}{{result=\"error\",upstream=\"{UP}\"}} 0");
    let text = env.metrics().await;
    assert!(text.contains(&zero), "no {zero:?} in\n{text}");
    let r = env.client.get(&env.v2("team/app/manifests/v1")).await;
    assert_eq!(r.status, 200, "{}", r.text());

    env.fake.set_basic_auth("AWS", "rotated-elsewhere");
    let urls: Vec<String> = std::iter::once(&img.config)
        .chain(&img.layers)
        .map(|(d, _)| env.v2(&format!("team/app/blobs/{d}")))
        .collect();
    let gets = urls.iter().map(|u| env.client.get(u));
    for r in futures_util::future::join_all(gets).await {
        assert_eq!(r.status, 502, "{}", r.text());
        assert_eq!(r.error_code().as_deref(), Some("UNAVAILABLE"));
        let m = r.error_message().unwrap();
        assert!(
            m.contains(UP) && m.contains("could not get credentials") && m.contains("failed"),
            "{m}"
        );
        assert!(!m.contains("AccessDenied"), "stderr is for the log: {m}");
    }
    assert_eq!(helper.runs(), 2, "one run for the burst");
    let r = env.client.get(&env.v2("team/app/manifests/v1")).await;
    assert_eq!(r.status, 200, "cached: {}", r.text());
    let (d, _) = &img.layers[0];
    let r = env
        .client
        .get(&env.v2(&format!("team/app/blobs/{d}")))
        .await;
    assert_eq!(r.status, 502);
    assert_eq!(helper.runs(), 2, "not run again right after failing");
    // An operator alerts on the failures without reading the log.
    for (result, want) in [("ok", 1.0), ("error", 1.0)] {
        let got = env
            .metric(runs, &[("upstream", UP), ("result", result)])
            .await;
        assert_eq!(got, want, "{runs}{{result={result}}}");
    }

    let text = log.text();
    assert!(
        text.contains("token <redacted> was revoked; no EC2 instance role (AccessDenied)"),
        "stderr not logged:\n{text}"
    );
    assert!(
        text.contains("credential helper or command failed"),
        "{text}"
    );
    log.assert_without(&env.fake, "AWS", &[first, leaked]);
}

/// A helper with nothing stored for the registry says so the docker-credential-helpers way;
/// the client is told which registry the helper had nothing for.
#[tokio::test]
async fn a_helper_without_credentials_for_the_registry_says_so() {
    let log = Logged::start();
    let fake = FakeRegistry::start().await;
    fake.set_basic_auth("AWS", "x");
    fake.push_image("team/app", Some("v1"), &[10]);
    let helper = Helper::new("echo 'credentials not found in native keychain'; exit 1");
    let env = start(fake, UP, &helper.config()).await;
    let r = env.client.get(&env.v2("team/app/manifests/v1")).await;
    assert_eq!(r.status, 502, "{}", r.text());
    let m = r.error_message().unwrap();
    assert!(
        m.contains(&format!("has no credentials for {}", env.fake.addr())),
        "{m}"
    );
    assert!(
        log.text().contains("has no credentials for"),
        "{}",
        log.text()
    );
}

// === ACR, Quay, Artifactory ===

/// ACR with a refresh token from `az acr login --expose-token`: the null-GUID username and the
/// token as the password, sent to the realm as Basic credentials.
#[tokio::test]
async fn acr_null_guid_username_and_refresh_token() {
    let log = Logged::start();
    let guid = "00000000-0000-0000-0000-000000000000";
    let refresh = "eyJhbGciOiJSUzI1NiJ9.acr-refresh.sig";
    let (fake, img) = token_registry(guid, refresh, "team/app").await;
    let dir = tempfile::tempdir().unwrap();
    let file = file_with(&dir, "acr-token", refresh);
    let env = start(
        fake,
        "acme.azurecr.io",
        &format!("username = \"{guid}\"\npassword_file = {file}"),
    )
    .await;
    pull(&env, "team/app", "v1", &img).await;
    assert_realm_saw(&env.fake, guid, refresh);
    log.assert_without(&env.fake, guid, &[refresh]);
}

/// ACR through `docker-credential-acr-env`, which answers `<token>` and a refresh token (an
/// identity token): as Docker does, it is exchanged at the realm in an OAuth2 form POST
/// (`grant_type=refresh_token`), never sent as Basic credentials; a refused refresh token has
/// the helper asked again.
#[tokio::test]
async fn acr_env_identity_token_is_exchanged_with_an_oauth2_post() {
    let log = Logged::start();
    let (fake, img) = token_registry("not", "basic", "team/app").await;
    fake.set_refresh_token(Some("acr-refresh-1"));
    let other = fake.push_image("team/other", Some("v1"), &[10]);
    fake.set_private("team/other", 401);
    let helper = Helper::new(r#"echo "{\"Username\":\"<token>\",\"Secret\":\"acr-refresh-$n\"}""#);
    let env = start(fake, "acme.azurecr.io", &helper.config()).await;
    pull(&env, "team/app", "v1", &img).await;
    let realm = env.fake.token_requests();
    assert!(!realm.is_empty());
    for t in &realm {
        assert_eq!(t.method, "POST", "{}", t.path);
        assert_eq!(authorization(t), None, "an identity token is not Basic");
        assert_eq!(
            t.headers.get("content-type").unwrap(),
            "application/x-www-form-urlencoded"
        );
    }
    assert!(
        env.fake
            .requests()
            .iter()
            .all(|r| authorization(r).is_none_or(|a| !a.starts_with("Basic "))),
        "Basic credentials were sent"
    );

    env.fake.set_refresh_token(Some("acr-refresh-2"));
    pull(&env, "team/other", "v1", &other).await;
    assert_eq!(helper.runs(), 2);
    log.assert_without(&env.fake, "<token>", &["acr-refresh-1", "acr-refresh-2"]);
}

/// Quay robot accounts: the username is `org+robot`, and the `+` reaches the realm intact.
#[tokio::test]
async fn quay_robot_account() {
    let log = Logged::start();
    let (fake, img) = token_registry("acme+puller", "QUAYROBOTTOKEN0123456789", "acme/app").await;
    let dir = tempfile::tempdir().unwrap();
    let file = file_with(&dir, "robot", "QUAYROBOTTOKEN0123456789\n");
    let env = start(
        fake,
        "quay.io",
        &format!("username = \"acme+puller\"\npassword_file = {file}"),
    )
    .await;
    pull(&env, "acme/app", "v1", &img).await;
    assert_realm_saw(&env.fake, "acme+puller", "QUAYROBOTTOKEN0123456789");
    log.assert_without(&env.fake, "acme+puller", &["QUAYROBOTTOKEN0123456789"]);
}

/// Artifactory's repository path method: `/v2/` lives under
/// `/artifactory/api/docker/<repository>`, and so does its token realm. Pulled by tag and by
/// digest, every request stays under the prefix.
#[tokio::test]
async fn artifactory_repository_path_in_url() {
    let log = Logged::start();
    let prefix = "/artifactory/api/docker/docker-remote";
    let (fake, img) = token_registry("ci", "AKCp8jFakeApiKey", "team/app").await;
    fake.set_path_prefix(Some(prefix));
    let dir = tempfile::tempdir().unwrap();
    let file = file_with(&dir, "apikey", "AKCp8jFakeApiKey");
    let up = UpstreamSpec::new("acme.jfrog.io", &format!("{}{prefix}", fake.url()), true)
        .with(&format!("username = \"ci\"\npassword_file = {file}"));
    let env = Env::start_on(fake, CacheSpec::default(), vec![up]).await;
    pull(&env, "team/app", "v1", &img).await;
    pull(&env, "team/app", &img.manifest.digest.clone(), &img).await;
    let all = env.fake.requests();
    assert!(all.len() >= 5);
    for r in &all {
        assert!(
            r.path.starts_with(prefix),
            "{} is outside the prefix",
            r.path
        );
        assert_ne!(r.status, Some(404), "{}", r.path);
    }
    assert!(
        env.fake
            .token_requests()
            .iter()
            .all(|r| r.path == format!("{prefix}/v2/token"))
    );
    assert_realm_saw(&env.fake, "ci", "AKCp8jFakeApiKey");
    log.assert_without(&env.fake, "ci", &["AKCp8jFakeApiKey"]);
}
