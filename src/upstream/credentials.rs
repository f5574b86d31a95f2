//! Where an upstream's credentials come from: fixed (a password from an environment variable
//! or a file, read at start), or asked of a Docker credential helper or of a command, then
//! kept, asked again in the background once `credential_refresh` has passed, and asked again at
//! once when the upstream or its token realm refuses them (401).
//!
//! A helper or command runs once at a time per upstream (single flight: a burst of 401s runs
//! it once, and everyone waiting shares its answer), under `credential_timeout`, past which it
//! is killed with every process it started. After a failure it is not run again for a pause
//! that doubles with each failure in a row, so a broken helper is never run in a hot loop;
//! answers it gave before keep serving meanwhile. Its stderr is logged (bounded, with the
//! secrets it answered cut out); its stdout, which holds the secret, never is.

use super::auth::{Credentials, Secret};
use crate::config::{ConfigError, UpstreamConfig};
use parking_lot::Mutex;
use std::fmt;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tracing::Instrument;
use url::Url;

/// The most a helper or command may print on stdout (a GCR JSON key is a few KiB).
const MAX_STDOUT: usize = 1 << 20;
/// How much of its stderr is logged.
const MAX_STDERR_LOGGED: usize = 4 << 10;
/// The pause after a failed run; doubled for each failure in a row, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Credentials asked for because others were refused, and refused in turn within this long,
/// are not asked for again: the helper's answer will not change that soon, and every 401
/// would run it.
const REASK_AFTER_REFUSED: Duration = Duration::from_secs(30);
/// What a docker-credential-helpers helper prints on stdout (and exits 1) when it holds
/// nothing for the server asked about.
const NOT_FOUND: &str = "credentials not found in native keychain";
/// The server Docker asks credential helpers about for Docker Hub: the key `docker login`
/// has always stored Docker Hub's credentials under.
pub const DOCKER_HUB_SERVER: &str = "https://index.docker.io/v1/";

/// Credentials as handed out, marked so that a refusal can say which ones were refused.
#[derive(Clone, Debug)]
pub struct Issued {
    pub creds: Credentials,
    generation: u64,
    obtained_at: Instant,
    /// Asked for because the previous ones were refused.
    after_refusal: bool,
}

/// An upstream's source of credentials. Cheap to clone.
#[derive(Clone)]
pub struct CredentialSource(Kind);

#[derive(Clone)]
enum Kind {
    Fixed(Arc<Issued>),
    Asked(Arc<Asked>),
}

/// A helper or command, and what it last answered.
struct Asked {
    upstream: String,
    how: How,
    refresh: Duration,
    timeout: Duration,
    runs: Option<prometheus::IntCounterVec>,
    state: Mutex<State>,
    /// Held while the program runs: the single flight.
    running: Arc<tokio::sync::Mutex<()>>,
}

enum How {
    /// `<program> get` with the server on stdin; JSON `{"Username", "Secret"}` on stdout.
    Helper { program: String, server: String },
    /// `argv`; stdout is the password of `username`.
    Command { argv: Vec<String>, username: String },
}

#[derive(Default)]
struct State {
    /// The last good answer.
    current: Option<Arc<Issued>>,
    /// The outcome of the last run, for callers that waited on it.
    last: Option<Result<Arc<Issued>, String>>,
    /// Runs finished so far: a caller that saw `runs` before waiting knows whether a run
    /// happened meanwhile.
    runs: u64,
    generation: u64,
    failure: Option<Failure>,
}

struct Failure {
    error: String,
    retry_at: Instant,
    in_a_row: u32,
}

impl State {
    fn backing_off(&self) -> bool {
        self.failure
            .as_ref()
            .is_some_and(|f| Instant::now() < f.retry_at)
    }
}

/// The pause after `in_a_row` failures in a row.
fn backoff(in_a_row: u32) -> Duration {
    let doublings = in_a_row.saturating_sub(1).min(16);
    (FIRST_BACKOFF * 2u32.pow(doublings)).min(MAX_BACKOFF)
}

/// What Docker asks a credential helper about for this upstream: Docker Hub's legacy index
/// URL for an upstream at Docker Hub's hosts, else the host of `url`, with its port unless it
/// is the scheme's default (`localhost:5000`). Keyed on the host the credentials will go to,
/// never on the upstream's name: an upstream named `docker.io` whose `url` is another mirror
/// must not be handed the user's Docker Hub token.
pub fn helper_server(url: &Url) -> String {
    let host = url.host_str().unwrap_or_default();
    if matches!(
        host,
        "docker.io" | "index.docker.io" | "registry-1.docker.io"
    ) {
        return DOCKER_HUB_SERVER.to_owned();
    }
    match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    }
}

// === impl CredentialSource ===

impl CredentialSource {
    /// The upstream's credentials as configured; `None` when it has none. A fixed password is
    /// read now (an unset variable or unreadable file is an error naming the key); helpers and
    /// commands run when credentials are first needed.
    /// `runs` counts each run of a helper or command by upstream and result.
    pub fn from_config(
        cfg: &UpstreamConfig,
        url: &Url,
        runs: Option<prometheus::IntCounterVec>,
    ) -> Result<Option<CredentialSource>, ConfigError> {
        let how = if let Some(h) = &cfg.credential_helper {
            let program = if h.contains('/') {
                h.clone()
            } else {
                format!("docker-credential-{h}")
            };
            How::Helper {
                program,
                server: helper_server(url),
            }
        } else if let Some(argv) = &cfg.credential_command {
            How::Command {
                argv: argv.clone(),
                username: cfg.username.clone().unwrap_or_default(),
            }
        } else {
            let Some(username) = &cfg.username else {
                return Ok(None);
            };
            let creds = Credentials {
                username: username.clone(),
                password: Secret::new(cfg.password()?.unwrap_or_default()),
            };
            return Ok(Some(CredentialSource(Kind::Fixed(Arc::new(Issued {
                creds,
                generation: 0,
                obtained_at: Instant::now(),
                after_refusal: false,
            })))));
        };
        // Both series exist from the start: Prometheus' increase() sees no rise in a series
        // that first appears at 1, and the first failure would not alert.
        if let Some(runs) = &runs {
            for result in ["ok", "error"] {
                runs.with_label_values(&[cfg.name.as_str(), result]);
            }
        }
        Ok(Some(CredentialSource(Kind::Asked(Arc::new(Asked {
            upstream: cfg.name.clone(),
            how,
            refresh: cfg.credential_refresh(),
            timeout: cfg.credential_timeout(),
            runs,
            state: Mutex::default(),
            running: Arc::default(),
        })))))
    }

    /// Credentials to use now. A helper or command is run when nothing it answered is at
    /// hand; an answer older than `credential_refresh` is still returned while a new one is
    /// asked for in the background. Fails with the helper's failure (also logged) when it has
    /// never answered, or failed moments ago and is pausing.
    pub async fn get(&self) -> Result<Arc<Issued>, String> {
        match &self.0 {
            Kind::Fixed(i) => Ok(i.clone()),
            Kind::Asked(a) => a.get().await,
        }
    }

    /// `used` were refused (401): the credentials to retry with, if there are others. Fixed
    /// credentials have none. A helper or command is asked again unless someone already did
    /// since `used` were handed out (then their answer is returned without a run), or `used`
    /// were themselves a fresh answer to a refusal (see [`REASK_AFTER_REFUSED`]).
    pub async fn refused(&self, used: &Issued) -> Result<Option<Arc<Issued>>, String> {
        match &self.0 {
            Kind::Fixed(_) => Ok(None),
            Kind::Asked(a) => a.refused(used).await,
        }
    }
}

impl fmt::Debug for CredentialSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Kind::Fixed(i) => f
                .debug_struct("Fixed")
                .field("username", &i.creds.username)
                .finish_non_exhaustive(),
            Kind::Asked(a) => match &a.how {
                How::Helper { program, server } => f
                    .debug_struct("Helper")
                    .field("program", program)
                    .field("server", server)
                    .finish_non_exhaustive(),
                How::Command { argv, username } => f
                    .debug_struct("Command")
                    .field("program", &argv[0])
                    .field("username", username)
                    .finish_non_exhaustive(),
            },
        }
    }
}

// === impl Asked ===

impl Asked {
    async fn get(self: &Arc<Self>) -> Result<Arc<Issued>, String> {
        let (current, runs, backing_off) = {
            let st = self.state.lock();
            (st.current.clone(), st.runs, st.backing_off())
        };
        match current {
            Some(c) if c.obtained_at.elapsed() < self.refresh => Ok(c),
            Some(c) => {
                if !backing_off {
                    self.refresh_in_background();
                }
                Ok(c)
            }
            None => self.ask(runs, false).await,
        }
    }

    async fn refused(self: &Arc<Self>, used: &Issued) -> Result<Option<Arc<Issued>>, String> {
        let runs = {
            let st = self.state.lock();
            if let Some(c) = &st.current
                && c.generation != used.generation
            {
                return Ok(Some(c.clone()));
            }
            st.runs
        };
        if used.after_refusal && used.obtained_at.elapsed() < REASK_AFTER_REFUSED {
            tracing::debug!(
                upstream = %self.upstream,
                "credentials just asked for were refused too; not asking again yet"
            );
            return Ok(None);
        }
        let next = self.ask(runs, true).await?;
        Ok((next.generation != used.generation).then_some(next))
    }

    /// Runs the program unless a run finished since the caller saw `seen_runs` (then its
    /// outcome is shared) or the last run failed moments ago (then its failure is).
    async fn ask(
        self: &Arc<Self>,
        seen_runs: u64,
        after_refusal: bool,
    ) -> Result<Arc<Issued>, String> {
        let running = self.running.clone().lock_owned().await;
        {
            let st = self.state.lock();
            if st.runs != seen_runs
                && let Some(last) = &st.last
            {
                return last.clone();
            }
            if let Some(f) = st.failure.as_ref().filter(|_| st.backing_off()) {
                return Err(f.error.clone());
            }
        }
        // The run is a task of its own: a caller that goes away (a client that disconnects
        // mid-request) must not kill the helper half-way, leaving no outcome, no backoff and
        // no log for the next caller, who would start it again.
        let me = self.clone();
        let span = tracing::info_span!("credentials", upstream = %self.upstream);
        let run = tokio::spawn(
            async move {
                let _running = running;
                me.run_and_record(after_refusal).await
            }
            .instrument(span),
        );
        run.await
            .unwrap_or_else(|e| Err(format!("credential run ended abnormally: {e}")))
    }

    fn refresh_in_background(self: &Arc<Self>) {
        // Already running (a refresh, or a caller's ask): that run's answer will do.
        let Ok(running) = self.running.clone().try_lock_owned() else {
            return;
        };
        let me = self.clone();
        let span = tracing::info_span!("credentials", upstream = %self.upstream);
        tokio::spawn(
            async move {
                let _running = running;
                let _ = me.run_and_record(false).await;
            }
            .instrument(span),
        );
    }

    /// Runs the program once (the caller holds `running`), records and logs the outcome.
    async fn run_and_record(&self, after_refusal: bool) -> Result<Arc<Issued>, String> {
        let started = Instant::now();
        let (key, program) = self.program();
        let (outcome, stderr) = self.run().await;
        let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
        if let Some(runs) = &self.runs {
            let result = if outcome.is_ok() { "ok" } else { "error" };
            runs.with_label_values(&[self.upstream.as_str(), result])
                .inc();
        }
        let mut st = self.state.lock();
        st.runs += 1;
        // Whatever secret the helper answered, now or before, is cut out of its stderr.
        let known: Vec<&str> = outcome
            .as_ref()
            .ok()
            .into_iter()
            .chain(st.current.as_ref().map(|c| &c.creds))
            .map(|c| c.password.expose())
            .collect();
        let stderr = redact(&stderr, &known);
        match outcome {
            Ok(creds) => {
                st.generation += 1;
                let issued = Arc::new(Issued {
                    creds,
                    generation: st.generation,
                    obtained_at: Instant::now(),
                    after_refusal,
                });
                st.current = Some(issued.clone());
                st.failure = None;
                st.last = Some(Ok(issued.clone()));
                drop(st);
                tracing::info!(
                    upstream = %self.upstream,
                    key,
                    program,
                    username = %issued.creds.username,
                    after_refusal,
                    duration_ms,
                    stderr = stderr.as_deref().unwrap_or(""),
                    "credentials obtained"
                );
                Ok(issued)
            }
            Err(error) => {
                let in_a_row = st.failure.as_ref().map_or(1, |f| f.in_a_row + 1);
                let pause = backoff(in_a_row);
                st.failure = Some(Failure {
                    error: error.clone(),
                    retry_at: Instant::now() + pause,
                    in_a_row,
                });
                st.last = Some(Err(error.clone()));
                let serving_older = st.current.is_some();
                drop(st);
                tracing::warn!(
                    upstream = %self.upstream,
                    key,
                    program,
                    error = %error,
                    stderr = stderr.as_deref().unwrap_or(""),
                    failures_in_a_row = in_a_row,
                    retry_in_s = pause.as_secs(),
                    serving_older,
                    duration_ms,
                    "credential helper or command failed"
                );
                Err(error)
            }
        }
    }

    fn program(&self) -> (&'static str, &str) {
        match &self.how {
            How::Helper { program, .. } => ("credential_helper", program),
            How::Command { argv, .. } => ("credential_command", &argv[0]),
        }
    }

    /// One run: the credentials, or why not (one line, nothing secret, fit for a client), and
    /// what it wrote on stderr.
    async fn run(&self) -> (Result<Credentials, String>, Vec<u8>) {
        let (key, program) = self.program();
        let what = format!("{key} {program}");
        let (args, input): (&[String], Option<&str>) = match &self.how {
            How::Helper { server, .. } => (&[], Some(server)),
            How::Command { argv, .. } => (&argv[1..], None),
        };
        let mut cmd = tokio::process::Command::new(program);
        if matches!(self.how, How::Helper { .. }) {
            cmd.arg("get");
        }
        cmd.args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Its own process group, so a timeout kills whatever it started too (a helper is
            // often a script around another program).
            .process_group(0);
        let mut child = match spawn(&mut cmd).await {
            Ok(c) => c,
            Err(e) => return (Err(format!("cannot run {what}: {e}")), Vec::new()),
        };
        let pid = child.id();
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let stderr = tokio::spawn(read_bounded(child.stderr.take(), MAX_STDERR_LOGGED));
        let work = async {
            if let (Some(mut w), Some(s)) = (stdin, input) {
                // A helper that exits without reading its stdin is judged by its exit status.
                let _ = w.write_all(s.as_bytes()).await;
            }
            let out = read_bounded(stdout, MAX_STDOUT).await;
            (out, child.wait().await)
        };
        let finished = tokio::time::timeout(self.timeout, work).await;
        if finished.is_err() {
            kill_group(pid);
        }
        // The pipe closes when the program (and the group, if killed) is gone.
        let stderr = match tokio::time::timeout(Duration::from_secs(2), stderr).await {
            Ok(Ok(Ok((bytes, _)))) => bytes,
            _ => Vec::new(),
        };
        let result = match finished {
            Err(_) => Err(format!(
                "{what} did not finish within {} and was killed",
                crate::config::Dur(self.timeout)
            )),
            Ok((_, Err(e))) => Err(format!("{what}: waiting for it: {e}")),
            Ok((Err(e), _)) => Err(format!("{what}: reading its output: {e}")),
            Ok((Ok((_, true)), _)) => Err(format!(
                "{what} printed more than {MAX_STDOUT} bytes on stdout"
            )),
            Ok((Ok((out, false)), status)) if !status.as_ref().is_ok_and(|s| s.success()) => {
                let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                Err(match &self.how {
                    // The one stdout a helper prints on failure that is worth repeating, and
                    // that holds no secret.
                    How::Helper { server, .. } if out.trim_ascii() == NOT_FOUND.as_bytes() => {
                        format!("{what} has no credentials for {server}")
                    }
                    _ => format!("{what} failed ({status}); its stderr is in the mirror's log"),
                })
            }
            Ok((Ok((out, false)), _)) => match &self.how {
                How::Helper { .. } => parse_helper_answer(&out),
                How::Command { username, .. } => parse_command_output(&out, username),
            }
            .map_err(|e| format!("{what}: {e}")),
        };
        (result, stderr)
    }
}

/// Spawns `cmd`, again a few times while the file is busy being written (ETXTBSY: a helper
/// installed or upgraded at this instant, or written by another thread that forked).
async fn spawn(cmd: &mut tokio::process::Command) -> std::io::Result<tokio::process::Child> {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 5 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(20 * tries)).await;
            }
            r => return r,
        }
    }
}

fn kill_group(pid: Option<u32>) {
    use rustix::process::{Pid, Signal, kill_process_group};
    if let Some(pid) = pid
        .and_then(|p| i32::try_from(p).ok())
        .and_then(Pid::from_raw)
    {
        let _ = kill_process_group(pid, Signal::KILL);
    }
}

/// Up to `cap` bytes of `r`, and whether there was more (which is read and dropped, so the
/// writer never blocks on a full pipe).
async fn read_bounded<R: AsyncRead + Unpin>(
    r: Option<R>,
    cap: usize,
) -> std::io::Result<(Vec<u8>, bool)> {
    let Some(mut r) = r else {
        return Ok((Vec::new(), false));
    };
    let mut buf = Vec::new();
    (&mut r).take(cap as u64).read_to_end(&mut buf).await?;
    let more = tokio::io::copy(&mut r, &mut tokio::io::sink()).await? > 0;
    Ok((buf, more))
}

/// `stderr` as text for the log, with every non-empty `secret` replaced; `None` when empty.
fn redact(stderr: &[u8], secrets: &[&str]) -> Option<String> {
    let mut s = String::from_utf8_lossy(stderr).trim().to_owned();
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        s = s.replace(secret, "<redacted>");
    }
    (!s.is_empty()).then_some(s)
}

/// What a helper's `get` prints: docker-credential-helpers' `Credentials`.
#[derive(serde::Deserialize)]
struct HelperAnswer {
    #[serde(rename = "Username", default)]
    username: String,
    #[serde(rename = "Secret", default)]
    secret: String,
}

/// A helper's answer. The errors never quote the output: it may hold the secret.
fn parse_helper_answer(stdout: &[u8]) -> Result<Credentials, String> {
    let a: HelperAnswer = serde_json::from_slice(stdout).map_err(|e| match e.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => format!(
            "its output is not JSON (line {}, column {})",
            e.line(),
            e.column()
        ),
        _ => "its output is not the credential JSON {\"Username\": \"...\", \"Secret\": \"...\"}"
            .to_owned(),
    })?;
    if a.username.is_empty() {
        return Err("it answered no Username".into());
    }
    if a.secret.is_empty() {
        return Err("it answered no Secret".into());
    }
    Ok(Credentials {
        username: a.username,
        password: Secret::new(a.secret),
    })
}

/// A command's output: the password, its trailing newline removed.
fn parse_command_output(stdout: &[u8], username: &str) -> Result<Credentials, String> {
    let s = std::str::from_utf8(stdout).map_err(|_| "its output is not UTF-8 text".to_owned())?;
    let s = s.trim_end_matches(['\n', '\r']);
    if s.is_empty() {
        return Err("it printed nothing".into());
    }
    Ok(Credentials {
        username: username.to_owned(),
        password: Secret::new(s),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_asks_helpers_about_the_host_or_docker_hub() {
        let u = |s: &str| Url::parse(s).unwrap();
        assert_eq!(
            helper_server(&u("https://registry-1.docker.io")),
            DOCKER_HUB_SERVER
        );
        assert_eq!(
            helper_server(&u("https://registry-1.docker.io/")),
            DOCKER_HUB_SERVER
        );
        assert_eq!(
            helper_server(&u("https://123456789012.dkr.ecr.eu-west-1.amazonaws.com")),
            "123456789012.dkr.ecr.eu-west-1.amazonaws.com"
        );
        assert_eq!(
            helper_server(&u("https://acme.jfrog.io:443/artifactory/api/docker/x")),
            "acme.jfrog.io"
        );
        assert_eq!(
            helper_server(&u("http://127.0.0.1:5000/")),
            "127.0.0.1:5000"
        );
        // An upstream named docker.io that is another mirror gets that mirror's credentials,
        // never the user's Docker Hub token.
        assert_eq!(helper_server(&u("https://mirror.gcr.io")), "mirror.gcr.io");
    }

    #[test]
    fn helper_answers() {
        let c = parse_helper_answer(
            br#"{"ServerURL":"x","Username":"AWS","Secret":"pw\"with\nquotes"}"#,
        )
        .unwrap();
        assert_eq!(c.username, "AWS");
        assert_eq!(c.password.expose(), "pw\"with\nquotes");
        let c = parse_helper_answer(br#"{"Username":"<token>","Secret":"rt"}"#).unwrap();
        assert_eq!(c.identity_token().map(Secret::expose), Some("rt"));
        // Errors never quote the output, which may hold the secret.
        for bad in [
            &br#"{"Username":"u","Secret":"TOPSECRET""#[..],
            br#"{"Username":"u","Secret":["TOPSECRET"]}"#,
            br#"["TOPSECRET"]"#,
            b"TOPSECRET",
            b"",
        ] {
            let e = parse_helper_answer(bad).unwrap_err();
            assert!(!e.contains("TOPSECRET"), "{e}");
        }
        assert_eq!(
            parse_helper_answer(br#"{"Username":"u"}"#).unwrap_err(),
            "it answered no Secret"
        );
        assert_eq!(
            parse_helper_answer(br#"{"Secret":"s"}"#).unwrap_err(),
            "it answered no Username"
        );
    }

    #[test]
    fn command_output_loses_only_its_trailing_newline() {
        let c = parse_command_output(b"ya29.token\n", "oauth2accesstoken").unwrap();
        assert_eq!(c.password.expose(), "ya29.token");
        let c = parse_command_output(b"{\n  \"k\": \"v\"\n}\r\n", "_json_key").unwrap();
        assert_eq!(c.password.expose(), "{\n  \"k\": \"v\"\n}");
        assert!(parse_command_output(b"\n", "u").is_err());
        assert!(parse_command_output(b"\xff\xfe", "u").is_err());
    }

    #[test]
    fn backoff_doubles_up_to_five_minutes() {
        assert_eq!(backoff(1), Duration::from_secs(5));
        assert_eq!(backoff(2), Duration::from_secs(10));
        assert_eq!(backoff(4), Duration::from_secs(40));
        assert_eq!(backoff(7), Duration::from_secs(300));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn stderr_is_logged_without_secrets() {
        assert_eq!(
            redact(b"  got token abc123 for AWS\n", &["abc123", ""]).as_deref(),
            Some("got token <redacted> for AWS")
        );
        assert_eq!(redact(b"\n", &["x"]), None);
    }

    fn source(cfg: &UpstreamConfig) -> CredentialSource {
        let url = Url::parse(&cfg.url).unwrap();
        CredentialSource::from_config(cfg, &url, None)
            .unwrap()
            .unwrap()
    }

    /// A script in `dir` that counts its runs in `dir/runs` and answers the password
    /// `pw-<run>`.
    fn counting_command(dir: &std::path::Path, extra: &str) -> Vec<String> {
        let script = dir.join("answer.sh");
        let runs = dir.join("runs");
        std::fs::write(
            &script,
            format!(
                "n=$(cat {runs:?} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {runs:?}\n{extra}\necho pw-$n\n"
            ),
        )
        .unwrap();
        vec!["/bin/sh".into(), script.to_str().unwrap().into()]
    }

    fn runs(dir: &std::path::Path) -> u32 {
        std::fs::read_to_string(dir.join("runs")).map_or(0, |s| s.trim().parse().unwrap())
    }

    fn command_config(argv: Vec<String>) -> UpstreamConfig {
        let mut cfg = UpstreamConfig::new("r", "https://r.example");
        cfg.username = Some("u".into());
        cfg.credential_command = Some(argv);
        cfg
    }

    #[tokio::test]
    async fn a_refusal_asks_once_for_many_and_not_again_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let src = source(&command_config(counting_command(dir.path(), "")));
        let first = src.get().await.unwrap();
        assert_eq!(first.creds.password.expose(), "pw-1");
        // Kept: not run again.
        assert_eq!(src.get().await.unwrap().generation, first.generation);
        // Eight requests refused with the same credentials: one run, all get its answer.
        let all = futures_util::future::join_all((0..8).map(|_| src.refused(&first))).await;
        for r in all {
            assert_eq!(r.unwrap().unwrap().creds.password.expose(), "pw-2");
        }
        assert_eq!(runs(dir.path()), 2);
        // The fresh answer refused as well: not asked again for now.
        let second = src.get().await.unwrap();
        assert!(src.refused(&second).await.unwrap().is_none());
        assert_eq!(runs(dir.path()), 2);
    }

    /// A caller dropped while the command runs (a client that disconnected) leaves the run
    /// to finish and be kept: the next caller gets its answer instead of starting another.
    #[tokio::test]
    async fn a_caller_that_goes_away_mid_run_does_not_waste_the_run() {
        let dir = tempfile::tempdir().unwrap();
        let src = source(&command_config(counting_command(dir.path(), "sleep 0.3")));
        let gone = tokio::time::timeout(Duration::from_millis(100), src.get()).await;
        assert!(gone.is_err(), "the command should still be running");
        let next = src.get().await.unwrap();
        assert_eq!(next.creds.password.expose(), "pw-1");
        assert_eq!(runs(dir.path()), 1);
    }

    #[tokio::test]
    async fn a_failing_command_is_not_rerun_in_a_hot_loop() {
        let dir = tempfile::tempdir().unwrap();
        let src = source(&command_config(counting_command(
            dir.path(),
            "echo 'no session' >&2; exit 3",
        )));
        let all = futures_util::future::join_all((0..5).map(|_| src.get())).await;
        for r in all {
            let e = r.unwrap_err();
            assert!(e.contains("failed (exit status: 3)"), "{e}");
        }
        assert!(src.get().await.is_err());
        assert_eq!(runs(dir.path()), 1, "paused after the failure");
    }

    #[tokio::test]
    async fn a_stale_answer_serves_while_a_new_one_is_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = command_config(counting_command(dir.path(), ""));
        cfg.credential_refresh = Some(crate::config::Dur(Duration::from_millis(50)));
        let src = source(&cfg);
        assert_eq!(src.get().await.unwrap().creds.password.expose(), "pw-1");
        tokio::time::sleep(Duration::from_millis(80)).await;
        // Stale: returned at once, while the refresh runs in the background.
        assert_eq!(src.get().await.unwrap().creds.password.expose(), "pw-1");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let c = src.get().await.unwrap();
            if c.creds.password.expose() == "pw-2" {
                break;
            }
            assert!(Instant::now() < deadline, "never refreshed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_hung_command_is_killed_with_what_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("sleeper");
        let mut cfg = command_config(counting_command(
            dir.path(),
            &format!("sleep 30 & echo $! > {pid_file:?}; wait"),
        ));
        cfg.credential_timeout = Some(crate::config::Dur(Duration::from_millis(300)));
        let started = Instant::now();
        let e = source(&cfg).get().await.unwrap_err();
        assert!(
            e.contains("did not finish within 300ms and was killed"),
            "{e}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        let stat = format!("/proc/{}/stat", pid.trim());
        // Gone, or a zombie waiting for a reaper that is not us.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(&stat)
            .is_ok_and(|s| s.split(' ').nth(2).is_none_or(|st| st != "Z"))
        {
            assert!(Instant::now() < deadline, "the helper's child still runs");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
