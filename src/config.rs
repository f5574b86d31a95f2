//! The TOML configuration: typed, strict (unknown keys are errors), validated after parsing.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The whole configuration file.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub cache: CacheConfig,
    /// The registries cachalot mirrors. Order does not matter; names must be unique.
    #[serde(default)]
    pub upstream: Vec<UpstreamConfig>,
    /// Images never evicted (same as `cache.pinned`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pin: Vec<PinConfig>,
    #[serde(default)]
    pub log: LogConfig,
    /// Image lists the running server keeps warm (see `airgap::refresh`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefetch: Vec<PrefetchConfig>,
    /// Client authentication; absent: anyone who can connect may pull.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthConfig>,
    /// Who may pull what; the first rule matching the user and the repository decides.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub access: Vec<AccessRule>,
    /// Where blobs and shared metadata live: the cache directory alone, or a bucket behind it.
    #[serde(default)]
    pub storage: StorageConfig,
    /// Replicas that act as one cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
}

/// `[storage]`: `fs` keeps everything under `cache.dir`; `s3` keeps blobs, manifests and the
/// shared records in a bucket, with `cache.dir` as the local tier in front of it.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    #[serde(default)]
    pub backend: Backend,
    /// Any S3-compatible service; AWS S3 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Prepended to every key, so one bucket can hold several caches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`); default true when `endpoint` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_style: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id_env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key_env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key_file: Option<PathBuf>,
    /// Bound on the shared store, enforced by gc passes; unbounded when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_size: Option<ByteSize>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Fs,
    S3,
}

impl StorageConfig {
    /// The access key id and secret, read from their environment variables or files; `None`
    /// when neither is configured (the environment's own credentials, as on AWS).
    pub fn credentials(&self) -> Result<Option<(String, String)>, ConfigError> {
        let id = secret(
            "storage.access_key_id",
            &self.access_key_id_env,
            &self.access_key_id_file,
        )?;
        let key = secret(
            "storage.secret_access_key",
            &self.secret_access_key_env,
            &self.secret_access_key_file,
        )?;
        match (id, key) {
            (Some(id), Some(key)) => Ok(Some((id, key))),
            (None, None) => Ok(None),
            (Some(_), None) => {
                bad("storage.secret_access_key_env: required with an access key id".into())
            }
            (None, Some(_)) => {
                bad("storage.access_key_id_env: required with a secret access key".into())
            }
        }
    }
}

/// A secret named by an environment variable or a file (`<key>_env`, `<key>_file`).
fn secret(
    key: &str,
    env: &Option<String>,
    file: &Option<PathBuf>,
) -> Result<Option<String>, ConfigError> {
    if let Some(var) = env {
        return std::env::var(var).map(Some).map_err(|_| {
            ConfigError::Invalid(format!("{key}_env: environment variable {var} is not set"))
        });
    }
    if let Some(path) = file {
        let s = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::Invalid(format!("{key}_file: cannot read {}: {e}", path.display()))
        })?;
        return Ok(Some(s.trim_end_matches(['\n', '\r']).to_owned()));
    }
    Ok(None)
}

/// `[cluster]`: replicas behind one Service that share one bucket and fetch each blob once.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Every replica's base URL, this one's included.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<String>,
    /// `host:port` re-resolved for the peers' addresses (a Kubernetes headless Service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers_dns: Option<String>,
    /// This replica's own entry; detected from local addresses when absent.
    #[serde(default, rename = "self", skip_serializing_if = "Option::is_none")]
    pub self_url: Option<String>,
    /// The environment variable holding the secret peers prove themselves with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
}

impl ClusterConfig {
    pub fn secret(&self) -> Result<String, ConfigError> {
        match secret("cluster.secret", &self.secret_env, &self.secret_file)? {
            Some(s) if s.len() >= 16 => Ok(s),
            Some(_) => bad("cluster.secret_env: the secret must be at least 16 characters".into()),
            None => bad("cluster.secret_env: required (peers prove themselves with it)".into()),
        }
    }
}

/// `[auth]`: client authentication, Basic, as distribution's htpasswd mode.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// htpasswd file of bcrypt entries (`htpasswd -B`); re-read when it changes or on SIGHUP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub htpasswd: Option<PathBuf>,
    /// Whether callers without credentials may pull (as the user `anonymous`). Default: false
    /// when `htpasswd` is set, true otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anonymous: Option<bool>,
    /// The realm of the `WWW-Authenticate: Basic` challenge.
    #[serde(default = "default_realm")]
    pub realm: String,
}

impl AuthConfig {
    /// The effective `anonymous`.
    pub fn anonymous(&self) -> bool {
        self.anonymous.unwrap_or(self.htpasswd.is_none())
    }
}

fn default_realm() -> String {
    "cachalot".to_owned()
}

/// One `[[access]]` rule.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRule {
    /// htpasswd names (`*` matches any run of characters), `anonymous`, or `*` (everyone).
    pub users: Vec<String>,
    /// `<upstream name>/<repository>` patterns: `*` within one path component, `**` across.
    pub repositories: Vec<String>,
    /// true allows, false denies.
    pub allow: bool,
}

/// `[log]`: how cachalot logs. `RUST_LOG`, when set, overrides `level`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (one human-readable line per event) or `json` (one JSON object per line).
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter: `info`, `debug`, or per module like `info,cachalot::upstream=debug`.
    #[serde(default = "default_log_level")]
    pub level: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

fn default_log_level() -> String {
    "info".to_owned()
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: default_log_level(),
        }
    }
}

/// One `[[prefetch]]` list: images the running server fetches at start and every `interval`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PrefetchConfig {
    /// References as clients write them (`nginx:1.27`, `ghcr.io/org/app@sha256:...`).
    pub images: Vec<String>,
    /// `os/arch[/variant]` entries, or `["all"]`; empty: this machine's platform.
    #[serde(default)]
    pub platforms: Vec<String>,
    /// How often the list is refreshed (tags revalidated, new content fetched).
    #[serde(default = "default_prefetch_interval")]
    pub interval: Dur,
    /// Also fetch each image's referrers (signatures, SBOMs).
    #[serde(default)]
    pub with_referrers: bool,
}

fn default_prefetch_interval() -> Dur {
    Dur(Duration::from_secs(6 * 3600))
}

/// `[server]`: where cachalot listens.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address and port to listen on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// PEM certificate chain; with `tls_key`, cachalot serves HTTPS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// A second address serving only `/metrics` (plain HTTP), e.g. for a scraper on an admin
    /// network. `/metrics` stays on `listen` too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// A connection that has not sent a complete request head this long after it was
    /// accepted (or after its previous response, when kept alive) is closed: slow or
    /// endless heads (slowloris) cannot hold connections.
    #[serde(default = "default_header_timeout")]
    pub header_timeout: Dur,
    /// Connections served at once, on `listen`. Past it, the connection idle longest
    /// between requests (HTTP/2: with no stream open) is closed to make room, as nginx does;
    /// with none idle, new connections wait in the listen backlog until one closes or falls
    /// idle, so the ones held stay responsive. A request in flight is never cut for room.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// The read-only page at `/ui` and its JSON under `/ui/api/`; false: they answer 404.
    #[serde(default = "default_ui")]
    pub ui: bool,
    /// On SIGTERM, how long responses in flight (fills and their followers included) may run
    /// to their end before their connections are closed. Under Kubernetes' 30 s grace period.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: Dur,
}

/// `[cache]`: where and how much to cache.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Directory for blobs, manifests and metadata.
    #[serde(default = "default_dir")]
    pub dir: PathBuf,
    /// Disk bound for the cache.
    #[serde(default = "default_max_size")]
    pub max_size: ByteSize,
    /// In-memory tier for manifests and tokens.
    #[serde(default = "default_memory")]
    pub memory: ByteSize,
    /// How long a tag's digest is trusted before it is revalidated with a HEAD.
    #[serde(default = "default_tag_ttl")]
    pub tag_ttl: Dur,
    /// Never contact an upstream; serve only what is cached.
    #[serde(default)]
    pub offline: bool,
    /// Content not read for this long is evicted even when the cache is under `max_size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unused: Option<Dur>,
    /// Images never evicted, as clients write them (`docker.io/library/nginx:1.27`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pinned: Vec<String>,
    /// The slowest a blob fill may be: one that has not finished within the upstream's
    /// `timeout` plus its size at this rate fails like a timeout, so a trickling upstream
    /// cannot hold the clients following it forever.
    #[serde(default = "default_fill_min_rate")]
    pub fill_min_rate: Rate,
    /// How often the running server re-hashes every cached blob and manifest in the
    /// background (`7d`), quarantining what no longer matches its digest; off when absent.
    /// A pass resumes where a restart left it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scrub_interval: Option<Dur>,
    /// How fast a scrub pass reads the cache, so it never competes with pulls.
    #[serde(default = "default_scrub_rate")]
    pub scrub_rate: Rate,
    /// With `[storage] backend = "s3"`: scrub passes and `cachalot verify` also read every blob
    /// of the bucket back through the store and take out of it what no longer matches its
    /// digest. Off by default: a pass reads the whole bucket, which a cloud bills as egress.
    /// With `[cluster]`, each replica checks the blobs it owns.
    #[serde(default)]
    pub scrub_bucket: bool,
}

/// One `[[pin]]`: an image whose manifests and blobs are never evicted.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PinConfig {
    pub image: String,
}

/// One `[[upstream]]` registry.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The registry host clients know (`docker.io`); used by `?ns=` and path-prefix routing.
    pub name: String,
    /// Where requests go (`https://registry-1.docker.io`).
    pub url: String,
    /// Unprefixed requests go to the default upstream.
    #[serde(default)]
    pub default: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Name of the environment variable holding the password or token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// File holding the password or token (trailing newline ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// A Docker credential helper that answers the username and password: `ecr-login` runs
    /// `docker-credential-ecr-login get` (found on PATH) with the registry on stdin, as Docker
    /// does; a value containing `/` is the helper's own path. Not with `username`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_helper: Option<String>,
    /// A command (program and arguments, no shell) whose standard output, trailing newline
    /// removed, is the password for `username`: `["aws", "ecr", "get-login-password"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_command: Option<Vec<String>>,
    /// How long an answer of `credential_helper` or `credential_command` is used before it is
    /// asked again (in the background; the old answer serves meanwhile). Helpers do not say
    /// when what they answer expires, so this stays well inside the shortest lifetime among
    /// them (GCR access tokens: 1 hour; ECR passwords: 12 hours). Default 15m. Whatever it is,
    /// an upstream or token realm refusing the answer with 401 has it asked again at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_refresh: Option<Dur>,
    /// How long `credential_helper` or `credential_command` may run before it is killed (with
    /// any process it started). Default 30s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_timeout: Option<Dur>,
    /// PEM bundle of CA certificates trusted for this upstream in addition to the webpki
    /// roots (a registry behind a private CA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain presented to the upstream (mTLS); needs `client_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<PathBuf>,
    /// Accept any certificate from this upstream, for any name. Anyone on the path can then
    /// impersonate it; warned at start and by `check-config`. Not with `ca_file`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_verify: bool,
    /// Connect timeout for this upstream.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Dur,
    /// Response-header and idle-body timeout for this upstream.
    #[serde(default = "default_timeout")]
    pub timeout: Dur,
    /// At most this many requests to this upstream at once (each held until its response
    /// body ends); excess waits its turn. Unset: unbounded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Consecutive connect failures or timeouts after which the upstream is taken for down
    /// (its circuit opens): requests fail at once, cached content is served without asking it.
    #[serde(default = "default_circuit_break_after")]
    pub circuit_break_after: u32,
    /// How long an open circuit stays open before one probe request is let through.
    #[serde(default = "default_circuit_pause")]
    pub circuit_pause: Dur,
}

impl fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamConfig")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("default", &self.default)
            .field("username", &self.username)
            .field("password_env", &self.password_env)
            .field("password_file", &self.password_file)
            .field("credential_helper", &self.credential_helper)
            .field("credential_command", &self.credential_command)
            .field("credential_refresh", &self.credential_refresh)
            .field("ca_file", &self.ca_file)
            .field("client_cert", &self.client_cert)
            .field("client_key", &self.client_key)
            .field("insecure_skip_verify", &self.insecure_skip_verify)
            .finish_non_exhaustive()
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 5000))
}
fn default_dir() -> PathBuf {
    PathBuf::from("./cachalot-cache")
}
fn default_max_size() -> ByteSize {
    ByteSize(50 << 30)
}
fn default_memory() -> ByteSize {
    ByteSize(256 << 20)
}
fn default_scrub_rate() -> Rate {
    Rate(64 << 20)
}
fn default_fill_min_rate() -> Rate {
    Rate(100 << 10)
}
fn default_tag_ttl() -> Dur {
    Dur(Duration::from_secs(300))
}
fn default_connect_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}
fn default_timeout() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_drain_timeout() -> Dur {
    Dur(Duration::from_secs(25))
}

fn default_header_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}
fn default_max_connections() -> usize {
    4096
}
fn default_ui() -> bool {
    true
}
fn default_circuit_break_after() -> u32 {
    3
}
fn default_circuit_pause() -> Dur {
    Dur(Duration::from_secs(10))
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            tls_cert: None,
            tls_key: None,
            metrics_listen: None,
            header_timeout: default_header_timeout(),
            drain_timeout: default_drain_timeout(),
            max_connections: default_max_connections(),
            ui: default_ui(),
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            dir: default_dir(),
            max_size: default_max_size(),
            memory: default_memory(),
            tag_ttl: default_tag_ttl(),
            offline: false,
            max_unused: None,
            pinned: Vec::new(),
            fill_min_rate: default_fill_min_rate(),
            scrub_interval: None,
            scrub_rate: default_scrub_rate(),
            scrub_bucket: false,
        }
    }
}

impl UpstreamConfig {
    pub fn new(name: &str, url: &str) -> Self {
        UpstreamConfig {
            name: name.to_owned(),
            url: url.to_owned(),
            default: false,
            username: None,
            password_env: None,
            password_file: None,
            credential_helper: None,
            credential_command: None,
            credential_refresh: None,
            credential_timeout: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            insecure_skip_verify: false,
            connect_timeout: default_connect_timeout(),
            timeout: default_timeout(),
            max_connections: None,
            circuit_break_after: default_circuit_break_after(),
            circuit_pause: default_circuit_pause(),
        }
    }

    /// The configured password, read from its environment variable or file.
    pub fn password(&self) -> Result<Option<String>, ConfigError> {
        if let Some(var) = &self.password_env {
            return std::env::var(var).map(Some).map_err(|_| {
                ConfigError::Invalid(format!(
                    "upstream {:?}: password_env: environment variable {var} is not set",
                    self.name
                ))
            });
        }
        if let Some(path) = &self.password_file {
            let s = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::Invalid(format!(
                    "upstream {:?}: password_file: cannot read {}: {e}",
                    self.name,
                    path.display()
                ))
            })?;
            return Ok(Some(s.trim_end_matches(['\n', '\r']).to_owned()));
        }
        Ok(None)
    }
}

/// How long a credential helper's or command's answer is used by default.
pub const DEFAULT_CREDENTIAL_REFRESH: Duration = Duration::from_secs(15 * 60);
/// How long a credential helper or command may run by default.
pub const DEFAULT_CREDENTIAL_TIMEOUT: Duration = Duration::from_secs(30);

impl UpstreamConfig {
    /// The program `credential_helper` or `credential_command` runs, as configured (a name
    /// looked up on PATH, or a path), with the key that names it.
    pub fn credential_program(&self) -> Option<(&'static str, String)> {
        if let Some(h) = &self.credential_helper {
            let program = if h.contains('/') {
                h.clone()
            } else {
                format!("docker-credential-{h}")
            };
            return Some(("credential_helper", program));
        }
        let program = self.credential_command.as_ref()?.first()?;
        Some(("credential_command", program.clone()))
    }

    /// Fails, naming the key, when the credential helper or command is not an executable file
    /// (on PATH, or at its path): what `check-config` and `serve` check at start. The program
    /// is not run: it may be slow, or reach a cloud's API.
    pub fn check_credential_program(&self) -> Result<(), ConfigError> {
        let Some((key, program)) = self.credential_program() else {
            return Ok(());
        };
        if find_program(&program).is_some() {
            return Ok(());
        }
        let where_ = if program.contains('/') {
            "is not an executable file"
        } else {
            "is not on PATH"
        };
        bad(format!(
            "upstream {:?}: {key}: {program} {where_}",
            self.name
        ))
    }

    /// `credential_refresh`, or its default.
    pub fn credential_refresh(&self) -> Duration {
        self.credential_refresh
            .map_or(DEFAULT_CREDENTIAL_REFRESH, |d| d.0)
    }

    /// `credential_timeout`, or its default.
    pub fn credential_timeout(&self) -> Duration {
        self.credential_timeout
            .map_or(DEFAULT_CREDENTIAL_TIMEOUT, |d| d.0)
    }
}

/// Where `program` would be run from: itself when it contains a `/`, else the first
/// executable file of that name in a PATH directory (as `execvp` searches).
pub fn find_program(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        return executable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .filter(|d| !d.as_os_str().is_empty())
        .map(|d| d.join(program))
        .find(|p| executable(p))
}

/// A configuration error, as one line that names the key or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {message}")]
    Read { file: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// The built-in default: Docker Hub as the default upstream, well-known registries by name.
    pub fn builtin_default() -> Config {
        let mut upstream = vec![UpstreamConfig::new(
            "docker.io",
            "https://registry-1.docker.io",
        )];
        upstream[0].default = true;
        for (name, url) in [
            ("ghcr.io", "https://ghcr.io"),
            ("quay.io", "https://quay.io"),
            ("registry.k8s.io", "https://registry.k8s.io"),
            ("gcr.io", "https://gcr.io"),
            ("mcr.microsoft.com", "https://mcr.microsoft.com"),
            ("public.ecr.aws", "https://public.ecr.aws"),
        ] {
            upstream.push(UpstreamConfig::new(name, url));
        }
        Config {
            server: ServerConfig::default(),
            cache: CacheConfig::default(),
            upstream,
            pin: Vec::new(),
            log: LogConfig::default(),
            prefetch: Vec::new(),
            auth: None,
            access: Vec::new(),
            storage: StorageConfig::default(),
            cluster: None,
        }
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            file: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        Self::parse(text, "config")
    }

    fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            // toml's own message spans several lines with a snippet; keep it to one line
            // that says where.
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            let mut message = e.message().replace('\n', " ");
            if let Some(key) = line.and_then(|l| key_at_line(text, l))
                && !message.contains(&key)
            {
                message = format!("{key}: {message}");
            }
            ConfigError::Read {
                file: match line {
                    Some(l) => format!("{file}:{l}"),
                    None => file.to_owned(),
                },
                message,
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: cross-key rules, URLs, names. The first problem found is the
    /// error, naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_server_and_cache()?;
        for (i, u) in self.upstream.iter().enumerate() {
            self.validate_upstream(i, u)?;
        }
        if self.upstream.iter().filter(|u| u.default).count() > 1 {
            return bad("upstream: more than one upstream has default = true".into());
        }
        for (i, p) in self.prefetch.iter().enumerate() {
            self.validate_prefetch(i, p)?;
        }
        self.validate_auth()?;
        self.validate_storage()?;
        self.validate_cluster()?;
        Ok(())
    }

    fn validate_storage(&self) -> Result<(), ConfigError> {
        let s = &self.storage;
        if s.backend == Backend::Fs && self.cache.scrub_bucket {
            return bad("cache.scrub_bucket: only used with [storage] backend = \"s3\"".into());
        }
        if s.backend == Backend::Fs {
            let set = [
                ("endpoint", s.endpoint.is_some()),
                ("bucket", s.bucket.is_some()),
                ("max_size", s.max_size.is_some()),
                ("access_key_id_env", s.access_key_id_env.is_some()),
                ("secret_access_key_env", s.secret_access_key_env.is_some()),
            ];
            if let Some((k, _)) = set.iter().find(|(_, on)| *on) {
                return bad(format!("storage.{k}: only used with backend = \"s3\""));
            }
            return Ok(());
        }
        match &s.bucket {
            None => return bad("storage.bucket: required with backend = \"s3\"".into()),
            Some(b) if b.is_empty() || b.contains('/') => {
                return bad(format!("storage.bucket: {b:?} is not a bucket name"));
            }
            _ => {}
        }
        if let Some(e) = &s.endpoint {
            match url::Url::parse(e) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => return bad(format!("storage.endpoint: {e:?} is not an http(s) URL")),
            }
        }
        if s.access_key_id_env.is_some() && s.access_key_id_file.is_some() {
            return bad("storage.access_key_id_file: set either _env or _file, not both".into());
        }
        if s.secret_access_key_env.is_some() && s.secret_access_key_file.is_some() {
            return bad(
                "storage.secret_access_key_file: set either _env or _file, not both".into(),
            );
        }
        if s.max_size.is_some_and(|m| m.0 == 0) {
            return bad("storage.max_size: must be greater than zero".into());
        }
        Ok(())
    }

    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let Some(c) = &self.cluster else {
            return Ok(());
        };
        if c.peers.is_empty() == c.peers_dns.is_none() {
            return bad("cluster.peers: set either peers or peers_dns".into());
        }
        for (i, p) in c.peers.iter().chain(c.self_url.iter()).enumerate() {
            let key = if i < c.peers.len() {
                format!("cluster.peers[{i}]")
            } else {
                "cluster.self".to_owned()
            };
            match url::Url::parse(p) {
                Ok(u)
                    if matches!(u.scheme(), "http" | "https")
                        && u.host().is_some()
                        && u.path() == "/" => {}
                _ => {
                    return bad(format!(
                        "{key}: {p:?} is not a base URL such as http://10.0.0.11:5000"
                    ));
                }
            }
        }
        if let Some(d) = &c.peers_dns
            && d.rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            return bad(format!("cluster.peers_dns: {d:?} is not host:port"));
        }
        // Replicas found by DNS are named by their addresses, so this one must be too, or it
        // would not know itself among them and would ask itself as a peer.
        if c.peers_dns.is_some()
            && let Some(me) = &c.self_url
            && url::Url::parse(me).is_ok_and(|u| matches!(u.host(), Some(url::Host::Domain(_))))
        {
            return bad(format!(
                "cluster.self: {me:?} must be this replica's IP address with peers_dns, as the name resolves to addresses"
            ));
        }
        if c.secret_env.is_some() && c.secret_file.is_some() {
            return bad(
                "cluster.secret_file: set either secret_env or secret_file, not both".into(),
            );
        }
        if c.secret_env.is_none() && c.secret_file.is_none() {
            return bad("cluster.secret_env: required (peers prove themselves with it)".into());
        }
        if self.storage.backend != Backend::S3 {
            return bad(
                "cluster: replicas share one cache through [storage] backend = \"s3\"".into(),
            );
        }
        Ok(())
    }

    fn validate_auth(&self) -> Result<(), ConfigError> {
        if let Some(a) = &self.auth {
            if a.htpasswd.is_none() && !a.anonymous() {
                return bad(
                    "auth.anonymous: false without auth.htpasswd would let nobody pull".into(),
                );
            }
            if a.htpasswd
                .as_ref()
                .is_some_and(|p| p.as_os_str().is_empty())
            {
                return bad("auth.htpasswd: must not be empty".into());
            }
            if a.realm.is_empty()
                || a.realm
                    .chars()
                    .any(|c| c == '"' || c == '\\' || !(c == ' ' || c.is_ascii_graphic()))
            {
                return bad(format!(
                    "auth.realm: {:?} must be printable ASCII without quotes or backslashes",
                    a.realm
                ));
            }
        } else if !self.access.is_empty() {
            return bad(
                "access: [[access]] rules need an [auth] section (who is pulling must be known)"
                    .into(),
            );
        }
        // The pattern grammar is auth's (pure, no I/O); a bad rule must stop check-config too.
        crate::auth::Rules::compile(&self.access).map_err(ConfigError::Invalid)?;
        Ok(())
    }

    fn validate_server_and_cache(&self) -> Result<(), ConfigError> {
        match (&self.server.tls_cert, &self.server.tls_key) {
            (Some(_), None) => {
                return bad("server.tls_key: required when server.tls_cert is set".into());
            }
            (None, Some(_)) => {
                return bad("server.tls_cert: required when server.tls_key is set".into());
            }
            _ => {}
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return bad(format!(
                "log.level: {:?} is not a filter: {e}",
                self.log.level
            ));
        }
        if self.server.header_timeout.0.is_zero() {
            return bad("server.header_timeout: must be greater than zero".into());
        }
        if self.server.max_connections == 0 {
            return bad("server.max_connections: must be at least 1".into());
        }
        if self.cache.memory.0 < 1 << 20 {
            return bad("cache.memory: must be at least 1MiB".into());
        }
        if self.cache.max_size.0 == 0 {
            return bad("cache.max_size: must be greater than zero".into());
        }
        if self.cache.dir.as_os_str().is_empty() {
            return bad("cache.dir: must not be empty".into());
        }
        for (i, p) in self.cache.pinned.iter().enumerate() {
            crate::oci::ImageRef::parse(p)
                .map_err(|e| ConfigError::Invalid(format!("cache.pinned[{i}]: {e}")))?;
        }
        for (i, p) in self.pin.iter().enumerate() {
            crate::oci::ImageRef::parse(&p.image)
                .map_err(|e| ConfigError::Invalid(format!("pin[{i}].image: {e}")))?;
        }
        if self.cache.max_unused.is_some_and(|d| d.0.is_zero()) {
            return bad("cache.max_unused: must be greater than zero".into());
        }
        Ok(())
    }

    fn validate_upstream(&self, i: usize, u: &UpstreamConfig) -> Result<(), ConfigError> {
        let key = |k: &str| format!("upstream[{i}].{k}");
        if u.name.is_empty()
            || u.name.contains('/')
            || u.name.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return bad(format!(
                "{}: {:?} is not a registry host name",
                key("name"),
                u.name
            ));
        }
        if self.upstream[..i].iter().any(|o| o.name == u.name) {
            return bad(format!("{}: {:?} is configured twice", key("name"), u.name));
        }
        let uri: http::Uri = match u.url.parse() {
            Ok(uri) => uri,
            Err(_) => return bad(format!("{}: {:?} is not a URL", key("url"), u.url)),
        };
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return bad(format!(
                "{}: {:?} must be an http:// or https:// URL with a host",
                key("url"),
                u.url
            ));
        }
        if uri.query().is_some() {
            return bad(format!("{}: {:?} must not have a query", key("url"), u.url));
        }
        self.validate_upstream_credentials(i, u)?;
        self.validate_upstream_tls(i, u)?;
        if u.connect_timeout.0.is_zero() {
            return bad(format!(
                "{}: must be greater than zero",
                key("connect_timeout")
            ));
        }
        if u.timeout.0.is_zero() {
            return bad(format!("{}: must be greater than zero", key("timeout")));
        }
        if u.max_connections == Some(0) {
            return bad(format!("{}: must be at least 1", key("max_connections")));
        }
        if u.circuit_break_after == 0 {
            return bad(format!(
                "{}: must be at least 1",
                key("circuit_break_after")
            ));
        }
        if u.circuit_pause.0.is_zero() {
            return bad(format!(
                "{}: must be greater than zero",
                key("circuit_pause")
            ));
        }
        Ok(())
    }

    /// One source of a password at most, and the username where it is needed. The sources
    /// themselves (variable, file, program) are checked at start and by `check-config`.
    fn validate_upstream_credentials(
        &self,
        i: usize,
        u: &UpstreamConfig,
    ) -> Result<(), ConfigError> {
        let key = |k: &str| format!("upstream[{i}].{k}");
        let sources = [
            ("password_env", u.password_env.is_some()),
            ("password_file", u.password_file.is_some()),
            ("credential_helper", u.credential_helper.is_some()),
            ("credential_command", u.credential_command.is_some()),
        ];
        let set: Vec<&str> = sources
            .iter()
            .filter(|(_, on)| *on)
            .map(|(k, _)| *k)
            .collect();
        if let [first, second, ..] = set[..] {
            return bad(format!(
                "{}: set one of password_env, password_file, credential_helper, \
                 credential_command, not both {first} and {second} (upstream {:?})",
                key(second),
                u.name
            ));
        }
        if let Some(h) = &u.credential_helper {
            if h.is_empty() || h.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return bad(format!(
                    "{}: {h:?} is not a helper name (ecr-login) or path",
                    key("credential_helper")
                ));
            }
            if u.username.is_some() {
                return bad(format!(
                    "{}: the credential helper answers the username; remove it (upstream {:?})",
                    key("username"),
                    u.name
                ));
            }
        }
        if let Some(argv) = &u.credential_command
            && argv.first().is_none_or(|p| p.is_empty())
        {
            return bad(format!(
                "{}: must name a program, as [\"aws\", \"ecr\", \"get-login-password\"]",
                key("credential_command")
            ));
        }
        let password =
            u.password_env.is_some() || u.password_file.is_some() || u.credential_command.is_some();
        if password && u.username.is_none() {
            return bad(format!("{}: a password needs a username", key("username")));
        }
        for (k, d) in [
            ("credential_refresh", u.credential_refresh),
            ("credential_timeout", u.credential_timeout),
        ] {
            match d {
                Some(_) if u.credential_helper.is_none() && u.credential_command.is_none() => {
                    return bad(format!(
                        "{}: only used with credential_helper or credential_command",
                        key(k)
                    ));
                }
                Some(d) if d.0.is_zero() => {
                    return bad(format!("{}: must be greater than zero", key(k)));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The upstream TLS keys fit together. The files themselves are read when the upstream is
    /// built (`upstream::tls::client_config`), at start and by `check-config`.
    fn validate_upstream_tls(&self, i: usize, u: &UpstreamConfig) -> Result<(), ConfigError> {
        let key = |k: &str| format!("upstream[{i}].{k}");
        match (&u.client_cert, &u.client_key) {
            (Some(_), None) => {
                return bad(format!(
                    "{}: required when client_cert is set (upstream {:?})",
                    key("client_key"),
                    u.name
                ));
            }
            (None, Some(_)) => {
                return bad(format!(
                    "{}: required when client_key is set (upstream {:?})",
                    key("client_cert"),
                    u.name
                ));
            }
            _ => {}
        }
        if u.insecure_skip_verify && u.ca_file.is_some() {
            return bad(format!(
                "{}: set ca_file or insecure_skip_verify, not both (upstream {:?})",
                key("insecure_skip_verify"),
                u.name
            ));
        }
        for (k, p) in [
            ("ca_file", &u.ca_file),
            ("client_cert", &u.client_cert),
            ("client_key", &u.client_key),
        ] {
            if p.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return bad(format!("{}: must not be empty", key(k)));
            }
        }
        Ok(())
    }

    /// Warnings about upstream TLS settings that are allowed but unsafe, one line each naming
    /// the key; `serve` logs them at start and `check-config` prints them on stderr.
    pub fn tls_warnings(&self) -> Vec<String> {
        self.upstream
            .iter()
            .enumerate()
            .filter(|(_, u)| u.insecure_skip_verify)
            .map(|(i, u)| {
                format!(
                    "upstream[{i}].insecure_skip_verify: the certificate of upstream {:?} is not \
                     checked; anyone on the network path can impersonate it",
                    u.name
                )
            })
            .collect()
    }

    fn validate_prefetch(&self, i: usize, p: &PrefetchConfig) -> Result<(), ConfigError> {
        let key = |k: &str| format!("prefetch[{i}].{k}");
        for image in &p.images {
            let r = crate::oci::ImageRef::parse(image)
                .map_err(|e| ConfigError::Invalid(format!("{}: {e}", key("images"))))?;
            if !self.upstream.iter().any(|u| u.name == r.registry) {
                return bad(format!(
                    "{}: {image:?} is on registry {:?}, which no [[upstream]] names",
                    key("images"),
                    r.registry
                ));
            }
        }
        for platform in p.platforms.iter().filter(|p| p.as_str() != "all") {
            crate::oci::PlatformSpec::parse(platform)
                .map_err(|e| ConfigError::Invalid(format!("{}: {e}", key("platforms"))))?;
        }
        if p.interval.0.is_zero() {
            return bad(format!("{}: must be greater than zero", key("interval")));
        }
        Ok(())
    }

    /// What eviction keeps and removes. Pins were checked by `validate`.
    pub fn eviction_policy(&self) -> crate::storage::evict::Policy {
        let pins = self
            .cache
            .pinned
            .iter()
            .chain(self.pin.iter().map(|p| &p.image))
            .filter_map(|p| crate::oci::ImageRef::parse(p).ok())
            .collect();
        crate::storage::evict::Policy {
            max_size: self.cache.max_size.0,
            max_unused: self.cache.max_unused.map(|d| d.0),
            pins,
        }
    }

    /// The effective configuration as TOML, for `check-config`. Passwords are never literal in
    /// the file (only `password_env`/`password_file`), so nothing secret is printed.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

/// The dotted key assigned on line `line` (1-based), with its table: `server.listen`.
fn key_at_line(text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let here = lines.get(line.checked_sub(1)?)?;
    let (key, _) = here.split_once('=')?;
    let key = key.trim();
    if key.is_empty() || key.starts_with('[') {
        return None;
    }
    let table = lines[..line - 1]
        .iter()
        .rev()
        .map(|l| l.trim())
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_owned());
    Some(match table {
        Some(t) => format!("{t}.{key}"),
        None => key.to_owned(),
    })
}

fn bad<T>(message: String) -> Result<T, ConfigError> {
    Err(ConfigError::Invalid(message))
}

// === sizes and durations ===

/// A byte count written as `512MiB`, `50GiB`, `1GB` or a plain number of bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

/// A duration written as `500ms`, `30s`, `5m`, `1h` or `7d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

fn split_unit(s: &str) -> (&str, &str) {
    let s = s.trim();
    let idx = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    (&s[..idx], s[idx..].trim())
}

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (num, unit) = split_unit(s);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a size like \"512MiB\""))?;
        let mul: u64 = match unit {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            _ => {
                return Err(format!(
                    "{s:?}: unknown size unit {unit:?} (use B, KiB, MiB, GiB, TiB)"
                ));
            }
        };
        n.checked_mul(mul)
            .map(ByteSize)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, m) in [
            ("TiB", 1u64 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ] {
            if self.0 >= m && self.0.is_multiple_of(m) {
                return write!(f, "{}{unit}", self.0 / m);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl std::str::FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (num, unit) = split_unit(s);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a duration like \"30s\" or \"5m\""))?;
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86400)),
            _ => {
                return Err(format!(
                    "{s:?}: unknown duration unit {unit:?} (use ms, s, m, h, d)"
                ));
            }
        };
        Ok(Dur(d))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        for (unit, m) in [
            ("d", 86_400_000u128),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1000),
        ] {
            if ms >= m && ms.is_multiple_of(m) {
                return write!(f, "{}{unit}", ms / m);
            }
        }
        write!(f, "{ms}ms")
    }
}

/// Bytes per second, written as a size per second: `100KiB/s`, `64MiB/s`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rate(pub u64);

impl std::str::FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let size = s
            .trim()
            .strip_suffix("/s")
            .ok_or_else(|| format!("{s:?} is not a rate like \"100KiB/s\""))?;
        match size.parse::<ByteSize>()? {
            ByteSize(0) => Err(format!("{s:?}: a rate must be greater than zero")),
            ByteSize(n) => Ok(Rate(n)),
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/s", ByteSize(self.0))
    }
}

macro_rules! string_serde {
    ($t:ty) => {
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_string())
            }
        }
    };
}
string_serde!(ByteSize);
string_serde!(Dur);
string_serde!(Rate);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!("100KiB/s".parse::<Rate>().unwrap().0, 100 << 10);
        assert_eq!(Rate(64 << 20).to_string(), "64MiB/s");
        assert!("100KiB".parse::<Rate>().is_err());
        assert!("0B/s".parse::<Rate>().is_err());
        let e = Config::from_toml_str("[cache]\nfill_min_rate = \"fast\"\n").unwrap_err();
        assert!(e.to_string().contains("cache.fill_min_rate"), "{e}");
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!("512MiB".parse::<ByteSize>().unwrap().0, 512 << 20);
        assert_eq!("50GiB".parse::<ByteSize>().unwrap().0, 50 << 30);
        assert_eq!("1024".parse::<ByteSize>().unwrap().0, 1024);
        assert!("12 parsecs".parse::<ByteSize>().is_err());
        assert!("99999999999TiB".parse::<ByteSize>().is_err());
        assert_eq!("5m".parse::<Dur>().unwrap().0, Duration::from_secs(300));
        assert_eq!(
            "500ms".parse::<Dur>().unwrap().0,
            Duration::from_millis(500)
        );
        assert!("soon".parse::<Dur>().is_err());
        assert_eq!(ByteSize(256 << 20).to_string(), "256MiB");
        assert_eq!(Dur(Duration::from_secs(300)).to_string(), "5m");
    }

    #[test]
    fn builtin_default_is_valid() {
        let c = Config::builtin_default();
        c.validate().unwrap();
        assert_eq!(c.server.listen.port(), 5000);
        assert!(
            c.upstream
                .iter()
                .any(|u| u.name == "docker.io" && u.default)
        );
        // The printed form parses back to the same thing.
        let again = Config::from_toml_str(&c.to_toml()).unwrap();
        assert_eq!(again.upstream.len(), c.upstream.len());
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::from_toml_str("[cache]\ndir = \"/x\"\nmax_sise = \"1GiB\"\n").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("max_sise"), "{msg}");
        assert!(msg.contains(":3"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn auth_and_access_are_validated() {
        let ok = "[auth]\nhtpasswd = \"/etc/h\"\n[[access]]\nusers = [\"a\"]\nrepositories = [\"docker.io/library/*\"]\nallow = true\n";
        let c = Config::from_toml_str(ok).unwrap();
        assert!(
            !c.auth.as_ref().unwrap().anonymous(),
            "off by default with htpasswd"
        );
        assert_eq!(c.auth.as_ref().unwrap().realm, "cachalot");
        let again = Config::from_toml_str(&c.to_toml()).unwrap();
        assert_eq!(again.access.len(), 1);
        let e = Config::from_toml_str(
            "[[access]]\nusers = [\"a\"]\nrepositories = [\"x/y\"]\nallow = true\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("[auth]"), "{e}");
        let e =
            Config::from_toml_str(&ok.replace("docker.io/library/*", "docker.io//x")).unwrap_err();
        assert!(
            e.to_string()
                .contains("access[0].repositories[0]: \"docker.io//x\""),
            "{e}"
        );
        let e = Config::from_toml_str(&ok.replace("[\"a\"]", "[]")).unwrap_err();
        assert!(e.to_string().contains("access[0].users"), "{e}");
        let e = Config::from_toml_str("[auth]\nanonymous = false\n").unwrap_err();
        assert!(e.to_string().contains("auth.anonymous"), "{e}");
        let e =
            Config::from_toml_str("[auth]\nhtpasswd = \"/h\"\nrealm = \"a\\\"b\"\n").unwrap_err();
        assert!(e.to_string().contains("auth.realm"), "{e}");
        let e = Config::from_toml_str("[auth]\nhtpasswd = \"/h\"\npassword = \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("password"), "{e}");
        // Without htpasswd, anonymous callers are the only ones, and may pull.
        let c = Config::from_toml_str("[auth]\n").unwrap();
        assert!(c.auth.unwrap().anonymous());
    }

    #[test]
    fn bad_values_are_named() {
        let e = Config::from_toml_str("[cache]\ntag_ttl = \"forever\"\n").unwrap_err();
        assert!(e.to_string().contains("forever"), "{e}");
        assert!(e.to_string().contains("cache.tag_ttl"), "{e}");
        let e = Config::from_toml_str("[server]\nlisten = \"nowhere\"\n").unwrap_err();
        assert!(e.to_string().contains("server.listen"), "{e}");
        let e =
            Config::from_toml_str("[[upstream]]\nname = \"a\"\nurl = \"ftp://x\"\n").unwrap_err();
        assert!(e.to_string().contains("upstream[0].url"), "{e}");
        let two = "[[upstream]]\nname=\"a\"\nurl=\"http://a\"\ndefault=true\n[[upstream]]\nname=\"b\"\nurl=\"http://b\"\ndefault=true\n";
        assert!(
            Config::from_toml_str(two)
                .unwrap_err()
                .to_string()
                .contains("default")
        );
        let e = Config::from_toml_str("[server]\ntls_cert = \"/c.pem\"\n").unwrap_err();
        assert!(e.to_string().contains("server.tls_key"), "{e}");
    }

    #[test]
    fn storage_and_cluster_keys() {
        let s3 = "[storage]\nbackend = \"s3\"\nendpoint = \"http://127.0.0.1:3900\"\nbucket = \"cachalot\"\nregion = \"garage\"\nmax_size = \"2TiB\"\n";
        let c = Config::from_toml_str(s3).unwrap();
        assert_eq!(c.storage.backend, Backend::S3);
        assert_eq!(c.storage.max_size, Some(ByteSize(2 << 40)));
        assert!(Config::from_toml_str(&c.to_toml()).is_ok());
        let e = Config::from_toml_str("[storage]\nbackend = \"s3\"\n").unwrap_err();
        assert!(e.to_string().contains("storage.bucket"), "{e}");
        let e = Config::from_toml_str("[storage]\nbucket = \"b\"\n").unwrap_err();
        assert!(e.to_string().contains("only used with backend"), "{e}");
        let e = Config::from_toml_str("[storage]\nbackend = \"ftp\"\n").unwrap_err();
        assert!(e.to_string().contains("storage.backend"), "{e}");
        let e = Config::from_toml_str(&format!("{s3}endpoint2 = 1\n")).unwrap_err();
        assert!(e.to_string().contains("endpoint2"), "{e}");
        // Reading the bucket back is asked for, never implied; and only where there is one.
        assert!(!c.cache.scrub_bucket);
        let on = Config::from_toml_str(&format!("[cache]\nscrub_bucket = true\n{s3}")).unwrap();
        assert!(on.cache.scrub_bucket);
        let e = Config::from_toml_str("[cache]\nscrub_bucket = true\n").unwrap_err();
        assert!(e.to_string().contains("cache.scrub_bucket"), "{e}");

        let cluster = "[cluster]\npeers = [\"http://10.0.0.11:5000\", \"http://10.0.0.12:5000\"]\nself = \"http://10.0.0.11:5000\"\nsecret_env = \"S\"\n";
        let c = Config::from_toml_str(&format!("{s3}{cluster}")).unwrap();
        let cc = c.cluster.as_ref().unwrap();
        assert_eq!(cc.self_url.as_deref(), Some("http://10.0.0.11:5000"));
        assert!(Config::from_toml_str(&c.to_toml()).is_ok());
        let e = Config::from_toml_str(cluster).unwrap_err();
        assert!(e.to_string().contains("backend = \"s3\""), "{e}");
        let e = Config::from_toml_str(&format!("{s3}[cluster]\nsecret_env = \"S\"\n")).unwrap_err();
        assert!(e.to_string().contains("cluster.peers"), "{e}");
        let bad_peer = format!("{s3}[cluster]\npeers = [\"10.0.0.1:5000\"]\nsecret_env = \"S\"\n");
        let e = Config::from_toml_str(&bad_peer).unwrap_err();
        assert!(e.to_string().contains("cluster.peers[0]"), "{e}");
        let by_name = format!(
            "{s3}[cluster]\npeers_dns = \"svc:5000\"\nself = \"http://me.svc:5000\"\nsecret_env = \"S\"\n"
        );
        let e = Config::from_toml_str(&by_name).unwrap_err();
        assert!(e.to_string().contains("cluster.self"), "{e}");
        let no_secret = format!("{s3}[cluster]\npeers_dns = \"svc:5000\"\n");
        let e = Config::from_toml_str(&no_secret).unwrap_err();
        assert!(e.to_string().contains("cluster.secret_env"), "{e}");
    }

    #[test]
    fn upstream_tls_keys() {
        let up = "[[upstream]]\nname = \"r.test\"\nurl = \"https://r.test\"\n";
        let e = Config::from_toml_str(&format!("{up}client_cert = \"/c.pem\"\n")).unwrap_err();
        assert!(e.to_string().contains("upstream[0].client_key"), "{e}");
        assert!(e.to_string().contains("r.test"), "{e}");
        let both = format!("{up}ca_file = \"/ca.pem\"\ninsecure_skip_verify = true\n");
        let e = Config::from_toml_str(&both).unwrap_err();
        assert!(
            e.to_string().contains("upstream[0].insecure_skip_verify"),
            "{e}"
        );
        let e = Config::from_toml_str(&format!("{up}ca_file = \"\"\n")).unwrap_err();
        assert!(e.to_string().contains("upstream[0].ca_file"), "{e}");

        let c = Config::from_toml_str(up).unwrap();
        assert!(c.tls_warnings().is_empty());
        assert!(!c.to_toml().contains("insecure_skip_verify"));
        let c = Config::from_toml_str(&format!("{up}insecure_skip_verify = true\n")).unwrap();
        assert_eq!(c.tls_warnings().len(), 1);
        assert!(c.tls_warnings()[0].contains("r.test"));
        let again = Config::from_toml_str(&c.to_toml()).unwrap();
        assert!(again.upstream[0].insecure_skip_verify);
    }

    #[test]
    fn one_source_of_a_password_per_upstream() {
        let up = "[[upstream]]\nname = \"r.test\"\nurl = \"https://r.test\"\n";
        let c = Config::from_toml_str(&format!("{up}credential_helper = \"ecr-login\"\n")).unwrap();
        assert_eq!(
            c.upstream[0].credential_program(),
            Some(("credential_helper", "docker-credential-ecr-login".into()))
        );
        assert_eq!(
            c.upstream[0].credential_refresh(),
            DEFAULT_CREDENTIAL_REFRESH
        );
        let again = Config::from_toml_str(&c.to_toml()).unwrap();
        assert_eq!(
            again.upstream[0].credential_helper.as_deref(),
            Some("ecr-login")
        );
        let c = Config::from_toml_str(&format!(
            "{up}username = \"AWS\"\ncredential_command = [\"aws\", \"ecr\", \"get-login-password\"]\ncredential_refresh = \"1h\"\ncredential_timeout = \"10s\"\n"
        ))
        .unwrap();
        assert_eq!(
            c.upstream[0].credential_refresh(),
            Duration::from_secs(3600)
        );
        assert_eq!(c.upstream[0].credential_timeout(), Duration::from_secs(10));
        assert!(Config::from_toml_str(&c.to_toml()).is_ok());
        for (extra, key) in [
            (
                "username = \"u\"\npassword_env = \"P\"\ncredential_command = [\"x\"]\n",
                "upstream[0].credential_command: set one of",
            ),
            (
                "password_file = \"/p\"\ncredential_helper = \"gcr\"\n",
                "upstream[0].credential_helper: set one of",
            ),
            (
                "username = \"u\"\npassword_env = \"P\"\npassword_file = \"/p\"\n",
                "upstream[0].password_file",
            ),
            (
                "credential_helper = \"ecr-login\"\nusername = \"AWS\"\n",
                "upstream[0].username: the credential helper answers",
            ),
            (
                "credential_helper = \"\"\n",
                "upstream[0].credential_helper",
            ),
            (
                "credential_helper = \"ecr login\"\n",
                "upstream[0].credential_helper",
            ),
            (
                "credential_command = [\"gcloud\"]\n",
                "upstream[0].username: a password needs a username",
            ),
            (
                "username = \"u\"\ncredential_command = []\n",
                "upstream[0].credential_command: must name a program",
            ),
            (
                "credential_refresh = \"1h\"\n",
                "upstream[0].credential_refresh: only used with",
            ),
            (
                "credential_helper = \"gcr\"\ncredential_timeout = \"0s\"\n",
                "upstream[0].credential_timeout: must be greater than zero",
            ),
            (
                "credential_helper = \"gcr\"\ncredential_refresh = \"soon\"\n",
                "upstream.credential_refresh",
            ),
        ] {
            let e = Config::from_toml_str(&format!("{up}{extra}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{extra:?}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn a_credential_program_must_be_found() {
        let mut u = UpstreamConfig::new("r.test", "https://r.test");
        u.credential_helper = Some("surely-not-a-helper-xyz".into());
        let e = u.check_credential_program().unwrap_err().to_string();
        assert_eq!(
            e,
            "upstream \"r.test\": credential_helper: docker-credential-surely-not-a-helper-xyz is not on PATH"
        );
        u.credential_helper = Some("/nonexistent/docker-credential-x".into());
        let e = u.check_credential_program().unwrap_err().to_string();
        assert!(e.ends_with("is not an executable file"), "{e}");
        u.credential_helper = None;
        u.credential_command = Some(vec!["/bin/sh".into(), "-c".into(), "echo pw".into()]);
        u.check_credential_program().unwrap();
        // Found on PATH (every Unix has sh on it), and a plain file is not a program.
        assert!(find_program("sh").is_some());
        let f = tempfile::NamedTempFile::new().unwrap();
        assert!(find_program(f.path().to_str().unwrap()).is_none());
    }

    #[test]
    fn abuse_limits_have_defaults_and_are_checked() {
        let c = Config::from_toml_str("[[upstream]]\nname = \"a\"\nurl = \"http://a\"\n").unwrap();
        assert_eq!(c.server.header_timeout.0, Duration::from_secs(10));
        assert_eq!(c.server.max_connections, 4096);
        assert_eq!(c.upstream[0].max_connections, None);
        assert_eq!(c.upstream[0].circuit_break_after, 3);
        assert_eq!(c.upstream[0].circuit_pause.0, Duration::from_secs(10));
        for (text, key) in [
            ("[server]\nmax_connections = 0\n", "server.max_connections"),
            (
                "[server]\nheader_timeout = \"0s\"\n",
                "server.header_timeout",
            ),
            (
                "[[upstream]]\nname = \"a\"\nurl = \"http://a\"\nmax_connections = 0\n",
                "upstream[0].max_connections",
            ),
            (
                "[[upstream]]\nname = \"a\"\nurl = \"http://a\"\ncircuit_break_after = 0\n",
                "upstream[0].circuit_break_after",
            ),
            (
                "[[upstream]]\nname = \"a\"\nurl = \"http://a\"\ncircuit_pause = \"0s\"\n",
                "upstream[0].circuit_pause",
            ),
        ] {
            let e = Config::from_toml_str(text).unwrap_err().to_string();
            assert!(e.contains(key), "{text:?}: {e}");
        }
    }
}
