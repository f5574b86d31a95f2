//! Client authentication and access rules: who is pulling (`[auth]`, Basic credentials checked
//! against an htpasswd file) and what they may pull (`[[access]]`). `http::handlers` asks here
//! before anything else happens, so a refused request never reaches the mirror.
//!
//! bcrypt is slow by design (milliseconds per check), so a verified `Authorization` value is
//! remembered, keyed by its SHA-256 (never the password), for a short while; the memory is
//! dropped whenever the htpasswd file changes. Checks that do run go to blocking threads, a few
//! at a time, so a flood of wrong passwords costs those threads and not the ones serving pulls.

pub mod access;
pub mod htpasswd;

pub use access::{Principal, RepoPattern, Rules, unknown_users};
pub use htpasswd::{ANONYMOUS, Htpasswd};

use crate::config::Config;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::oci::ErrorCode;
use base64::Engine;
use http::{HeaderMap, HeaderValue, header};
use parking_lot::{Mutex, RwLock};
use prometheus::IntCounter;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, watch};
use tracing::{info, warn};

/// How long a verified credential is remembered. Short, so that a password changed by another
/// route than the file (there is none today) or a cache that missed a change cannot outlive it
/// by much.
const VERIFIED_TTL: Duration = Duration::from_secs(120);
/// How many verified (or refused) credentials are remembered.
const VERIFIED_CAPACITY: u64 = 10_000;
/// Credential checks waiting for a bcrypt slot beyond this are refused at once (429): a flood
/// of wrong passwords then costs a bounded queue, not unbounded waiting requests.
const MAX_WAITING_CHECKS: usize = 1024;
/// How often the htpasswd file's metadata is looked at.
const RELOAD_POLL: Duration = Duration::from_secs(2);
/// Checked against when the user is unknown and the file has no user to borrow a hash from
/// (`htpasswd -nbB -C 5`).
const DUMMY_HASH: &str = "$2y$05$OfxqV8uSmCCoR8eQqSLpWujMx8dpYFNT4R/x6bsmgx55oK/JfqnPa";
/// Refused credentials remembered, apart from the verified ones so that a flood of distinct
/// wrong passwords can never push a real user's verdict out.
const REFUSED_CAPACITY: usize = 1_024;

/// Why a request was refused, the `reason` label of `cachalot_auth_failures_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No credentials where they are needed.
    Missing,
    /// Credentials that do not verify (or are not Basic).
    Invalid,
    /// Authenticated (or anonymous) but not allowed to pull that repository.
    Denied,
}

impl Failure {
    pub const ALL: [Failure; 3] = [Failure::Missing, Failure::Invalid, Failure::Denied];

    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Missing => "missing",
            Failure::Invalid => "invalid",
            Failure::Denied => "denied",
        }
    }
}

/// The users of the htpasswd file as last loaded, and the file's identity then.
struct Users {
    htpasswd: Htpasswd,
    /// What an unknown user's password is checked against: the file's costliest hash, so that
    /// refusing an unknown name takes as long as refusing a known one's wrong password, and
    /// timing does not tell which names exist.
    dummy: String,
    /// Bumped on every successful load; a remembered verdict from an older one is ignored.
    generation: u64,
}

/// A remembered answer for one `Authorization` value.
#[derive(Clone)]
struct Verdict {
    /// `None`: the credentials did not verify.
    user: Option<Arc<str>>,
    generation: u64,
}

/// Remembered verdicts, by SHA-256 of the `Authorization` value. Sharded maps under read-write
/// locks rather than moka: this lookup is on every authenticated request, and a read lock and
/// a hash lookup cost a fraction of moka's bookkeeping (`benches/auth_ab.sh`). Bounded by
/// clearing a shard that is full of live entries; entries expire after `VERIFIED_TTL`.
struct Verified {
    shards: [RwLock<Shard>; VERIFIED_SHARDS],
    per_shard: usize,
}

/// Verdicts and when they were made.
type Shard = HashMap<[u8; 32], (Verdict, Instant)>;

const VERIFIED_SHARDS: usize = 16;

impl Default for Verified {
    fn default() -> Self {
        Verified::with_capacity(VERIFIED_CAPACITY as usize)
    }
}

impl Verified {
    fn with_capacity(n: usize) -> Verified {
        Verified {
            shards: std::array::from_fn(|_| RwLock::new(HashMap::new())),
            per_shard: n.div_ceil(VERIFIED_SHARDS),
        }
    }

    fn shard(&self, key: &[u8; 32]) -> &RwLock<Shard> {
        &self.shards[usize::from(key[0]) % VERIFIED_SHARDS]
    }

    fn get(&self, key: &[u8; 32]) -> Option<Verdict> {
        let shard = self.shard(key).read();
        let (v, at) = shard.get(key)?;
        (at.elapsed() < VERIFIED_TTL).then(|| v.clone())
    }

    fn insert(&self, key: [u8; 32], v: Verdict) {
        let mut shard = self.shard(&key).write();
        let per_shard = self.per_shard;
        if shard.len() >= per_shard && !shard.contains_key(&key) {
            shard.retain(|_, (_, at)| at.elapsed() < VERIFIED_TTL);
            if shard.len() >= per_shard {
                // Full of live entries (a flood of distinct credentials): start over rather than
                // track recency on the hot path; real clients re-verify once.
                shard.clear();
            }
        }
        shard.insert(key, (v, Instant::now()));
    }

    fn clear(&self) {
        for s in &self.shards {
            s.write().clear();
        }
    }
}

/// Warnings about the `[auth]` and `[[access]]` settings that are allowed but likely
/// mistakes: rules naming users the htpasswd file lacks, Basic credentials over plain HTTP.
/// `htpasswd` is the parsed file, when there is one. Here rather than in `config`, which
/// knows nothing of htpasswd files.
pub fn warnings(config: &Config, htpasswd: Option<&Htpasswd>) -> Vec<String> {
    let Some(a) = &config.auth else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if a.htpasswd.is_some() && config.server.tls_cert.is_none() {
        out.push(
            "auth: server.tls_cert is not set, so Basic credentials travel in clear text; \
             serve HTTPS or keep the mirror on a trusted network"
                .to_owned(),
        );
    }
    out.extend(unknown_users(&config.access, |u| {
        htpasswd.is_some_and(|h| h.contains(u))
    }));
    for (i, r) in config.access.iter().enumerate() {
        for (j, p) in r.repositories.iter().enumerate() {
            let up = RepoPattern::parse(p)
                .ok()
                .and_then(|p| p.literal_upstream().map(str::to_owned));
            if let Some(up) = up
                && !config.upstream.iter().any(|u| u.name == up)
            {
                out.push(format!(
                    "access[{i}].repositories[{j}]: {p:?} names upstream {up:?}, which no [[upstream]] has"
                ));
            }
        }
    }
    out
}

impl Users {
    fn new(htpasswd: Htpasswd, generation: u64) -> Users {
        let dummy = htpasswd
            .names()
            .filter_map(|n| htpasswd.hash(n))
            .max_by_key(|h| bcrypt_cost(h))
            .unwrap_or(DUMMY_HASH)
            .to_owned();
        Users {
            htpasswd,
            dummy,
            generation,
        }
    }
}

/// The cost of a `$2y$NN$...` hash (0 when unreadable: the file parser only admits bcrypt).
fn bcrypt_cost(hash: &str) -> u32 {
    hash.get(4..6).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// One credential check waiting for a bcrypt slot, counted while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    /// Counts one more waiting check, or `None` when `MAX_WAITING_CHECKS` already wait.
    fn enter(count: &'a AtomicUsize) -> Option<Waiting<'a>> {
        let w = Waiting(count);
        (count.fetch_add(1, Ordering::AcqRel) < MAX_WAITING_CHECKS).then_some(w)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The running `[auth]` and `[[access]]` state, shared by every request.
pub struct Auth {
    challenge: HeaderValue,
    anonymous: bool,
    htpasswd_path: Option<PathBuf>,
    users: RwLock<Arc<Users>>,
    generation: AtomicU64,
    /// The htpasswd file's (inode, length, mtime, ctime) at the last look.
    file_stamp: Mutex<Option<FileStamp>>,
    verified: Verified,
    refused: Verified,
    bcrypt_slots: Arc<Semaphore>,
    waiting_checks: AtomicUsize,
    rules: Rules,
    failures: [IntCounter; 3],
    /// `auth_reloads_total{result="ok"}` and `{result="error"}`.
    reloads: [IntCounter; 2],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

fn stamp(path: &Path) -> std::io::Result<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok(FileStamp {
        ino: m.ino(),
        len: m.len(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

/// Reads and parses an htpasswd file; the error names the file (and line), never a hash.
pub fn load_htpasswd(path: &Path) -> Result<Htpasswd, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("auth.htpasswd {}: {e}", path.display()))?;
    htpasswd::parse(&text).map_err(|e| format!("auth.htpasswd {}:{e}", path.display()))
}

impl Auth {
    /// The `[auth]` state for `config`, or `None` without `[auth]`. Loads the htpasswd file
    /// (an error names it) and logs the config's warnings.
    pub fn from_config(config: &Config, metrics: &Metrics) -> Result<Option<Arc<Auth>>, Error> {
        let Some(a) = &config.auth else {
            return Ok(None);
        };
        let rules = Rules::compile(&config.access).map_err(Error::Invalid)?;
        let (htpasswd, file_stamp) = match &a.htpasswd {
            Some(p) => {
                let s = stamp(p).ok();
                (load_htpasswd(p).map_err(Error::Invalid)?, s)
            }
            None => (Htpasswd::default(), None),
        };
        for w in warnings(config, Some(&htpasswd)) {
            warn!("{w}");
        }
        let challenge = HeaderValue::from_str(&format!("Basic realm=\"{}\"", a.realm))
            .map_err(|_| Error::Invalid(format!("auth.realm: {:?} is not valid", a.realm)))?;
        let slots = std::thread::available_parallelism()
            .map_or(1, |n| n.get() / 2)
            .max(1);
        info!(
            users = htpasswd.len(),
            anonymous = a.anonymous(),
            rules = config.access.len(),
            "client authentication on"
        );
        Ok(Some(Arc::new(Auth {
            challenge,
            anonymous: a.anonymous(),
            htpasswd_path: a.htpasswd.clone(),
            users: RwLock::new(Arc::new(Users::new(htpasswd, 0))),
            generation: AtomicU64::new(0),
            file_stamp: Mutex::new(file_stamp),
            verified: Verified::default(),
            refused: Verified::with_capacity(REFUSED_CAPACITY),
            bcrypt_slots: Arc::new(Semaphore::new(slots)),
            waiting_checks: AtomicUsize::new(0),
            rules,
            failures: Failure::ALL.map(|f| metrics.auth_failures.with_label_values(&[f.as_str()])),
            reloads: ["ok", "error"].map(|r| metrics.auth_reloads.with_label_values(&[r])),
        })))
    }

    /// `Basic realm="..."`, for the `WWW-Authenticate` of a 401.
    pub fn challenge(&self) -> &HeaderValue {
        &self.challenge
    }

    /// Who sent these headers. No `Authorization`: anonymous when allowed, else 401. A
    /// present `Authorization` is always checked, anonymous allowed or not, so that
    /// `docker login` with a wrong password fails.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, Error> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            if self.anonymous {
                return Ok(Principal::Anonymous);
            }
            return Err(self.fail(Failure::Missing, "authentication required"));
        };
        let key: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, value.as_bytes())
            .as_ref()
            .try_into()
            .expect("SHA-256 is 32 bytes");
        let generation = self.generation.load(Ordering::Acquire);
        let remembered = self
            .verified
            .get(&key)
            .or_else(|| self.refused.get(&key))
            .filter(|v| v.generation == generation);
        let verdict = match remembered {
            Some(v) => v,
            None => Box::pin(self.check(key, value)).await?,
        };
        match verdict.user {
            Some(u) => Ok(Principal::User(u)),
            None => Err(self.fail(Failure::Invalid, "invalid username or password")),
        }
    }

    /// The slow path: decode, look up, bcrypt on a blocking thread; remembers the verdict.
    async fn check(&self, key: [u8; 32], value: &HeaderValue) -> Result<Verdict, Error> {
        let users = self.users.read().clone();
        let Some((user, password)) = basic_credentials(value) else {
            // Not Basic, or not decodable: no bcrypt needed to know it fails.
            return Ok(Verdict {
                user: None,
                generation: users.generation,
            });
        };
        let (hash, known) = match users.htpasswd.hash(&user) {
            Some(h) => (h.to_owned(), true),
            None => (users.dummy.clone(), false),
        };
        // Counted down by a guard: a request dropped while it waits (a client that resets its
        // stream) must not leave its count behind, or enough of them lock everyone out.
        let waiting = Waiting::enter(&self.waiting_checks).ok_or_else(|| {
            Error::client(
                ErrorCode::TooManyRequests,
                "too many credential checks in progress; retry shortly",
            )
        })?;
        let permit = self
            .bcrypt_slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Internal("credential checks closed".into()))?;
        drop(waiting);
        // The slot goes with the hash: a check whose request is dropped keeps its slot until
        // bcrypt is done, so dropped requests cannot run more checks at once than the slots.
        let ok = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            bcrypt::verify(password.as_bytes(), &hash).unwrap_or(false)
        })
        .await
        .map_err(|e| Error::Internal(format!("credential check: {e}")))?;
        let verdict = Verdict {
            user: (ok && known).then(|| Arc::from(user.as_str())),
            generation: users.generation,
        };
        // Remembered only if the file did not change meanwhile; either way this answer stands
        // for this request, which arrived before the change.
        if users.generation == self.generation.load(Ordering::Acquire) {
            let remembered = if verdict.user.is_some() {
                &self.verified
            } else {
                &self.refused
            };
            remembered.insert(key, verdict.clone());
        }
        Ok(verdict)
    }

    /// Whether `who` may pull `upstream/repo`, without counting a refusal: the page asks it
    /// of every repository it might list, and hiding one is not a refused request.
    pub fn may_pull(&self, who: &Principal, upstream: &str, repo: &str) -> bool {
        self.rules.allows(who, upstream, repo)
    }

    /// Whether `who` may pull `upstream/repo`: `Ok`, or the error to answer with (401 for an
    /// anonymous caller, so that the client retries with credentials; 403 for a user).
    pub fn authorize(&self, who: &Principal, upstream: &str, repo: &str) -> Result<(), Error> {
        if self.rules.allows(who, upstream, repo) {
            return Ok(());
        }
        Err(match who {
            Principal::Anonymous => self.fail(
                Failure::Denied,
                "authentication required to pull this repository",
            ),
            Principal::User(u) => {
                self.failures[Failure::Denied as usize].inc();
                Error::client(
                    ErrorCode::Denied,
                    format!("user {u:?} may not pull {upstream}/{repo}"),
                )
            }
        })
    }

    fn fail(&self, f: Failure, message: &'static str) -> Error {
        self.failures[f as usize].inc();
        Error::client(ErrorCode::Unauthorized, message)
    }

    /// Re-reads the htpasswd file if its inode, length or times changed (always when `force`).
    /// A file that fails to load keeps the users loaded before, and says why.
    pub fn reload(&self, force: bool) -> Result<bool, String> {
        let Some(path) = &self.htpasswd_path else {
            return Ok(false);
        };
        let now = stamp(path).ok();
        {
            let mut last = self.file_stamp.lock();
            // A file that vanished is reported once, not every poll, until it comes back.
            if !force && *last == now {
                return Ok(false);
            }
            *last = now;
        }
        let htpasswd = load_htpasswd(path).inspect_err(|_| self.reloads[1].inc())?;
        self.reloads[0].inc();
        let count = htpasswd.len();
        let mut users = self.users.write();
        let generation = users.generation + 1;
        *users = Arc::new(Users::new(htpasswd, generation));
        self.generation.store(generation, Ordering::Release);
        drop(users);
        self.verified.clear();
        self.refused.clear();
        let trigger = if force { "SIGHUP" } else { "file changed" };
        info!(users = count, file = %path.display(), trigger, "htpasswd reloaded");
        Ok(true)
    }

    /// Watches the htpasswd file (its metadata every couple of seconds) and SIGHUP until
    /// `stopped`; reloads on either.
    pub fn spawn_reload(self: &Arc<Self>, mut stopped: watch::Receiver<bool>) {
        if self.htpasswd_path.is_none() {
            return;
        }
        let this = self.clone();
        // Installed before the first request can be served: from then on, SIGHUP reloads
        // instead of ending the process.
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGHUP; the htpasswd file is still watched");
                None
            }
        };
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RELOAD_POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let force = tokio::select! {
                    _ = stopped.changed() => break,
                    _ = tick.tick() => false,
                    Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
                };
                let t = this.clone();
                let result = tokio::task::spawn_blocking(move || t.reload(force)).await;
                if let Ok(Err(e)) = result {
                    warn!("{e}; keeping the users loaded before");
                }
            }
        });
    }
}

/// `user` and `password` of a `Basic` value; `None` if it is not one.
fn basic_credentials(value: &HeaderValue) -> Option<(String, String)> {
    let s = value.to_str().ok()?;
    let (scheme, rest) = s.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_verdicts_stay_bounded_and_can_be_cleared() {
        let v = Verified::default();
        let verdict = |g| Verdict {
            user: Some(Arc::from("alice")),
            generation: g,
        };
        for i in 0..(VERIFIED_CAPACITY as u32 * 3) {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&i.to_le_bytes());
            v.insert(key, verdict(1));
        }
        let total: usize = v.shards.iter().map(|s| s.read().len()).sum();
        assert!(total <= VERIFIED_CAPACITY as usize, "{total}");
        let key = [7u8; 32];
        v.insert(key, verdict(2));
        assert_eq!(v.get(&key).map(|v| v.generation), Some(2));
        v.clear();
        assert!(v.get(&key).is_none());
    }

    #[test]
    fn refused_verdicts_never_push_out_verified_ones() {
        let (verified, refused) = (
            Verified::default(),
            Verified::with_capacity(REFUSED_CAPACITY),
        );
        let key = |i: u32| {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&i.to_le_bytes());
            k
        };
        verified.insert(
            key(u32::MAX),
            Verdict {
                user: Some(Arc::from("alice")),
                generation: 1,
            },
        );
        for i in 0..(REFUSED_CAPACITY as u32 * 4) {
            refused.insert(
                key(i),
                Verdict {
                    user: None,
                    generation: 1,
                },
            );
        }
        let total: usize = refused.shards.iter().map(|s| s.read().len()).sum();
        assert!(total <= REFUSED_CAPACITY, "{total}");
        assert!(verified.get(&key(u32::MAX)).is_some());
    }

    #[test]
    fn a_dropped_wait_gives_its_place_back() {
        let count = AtomicUsize::new(0);
        let held: Vec<_> = (0..MAX_WAITING_CHECKS)
            .map(|_| Waiting::enter(&count).expect("room"))
            .collect();
        assert!(Waiting::enter(&count).is_none(), "past the bound");
        assert_eq!(count.load(Ordering::Acquire), MAX_WAITING_CHECKS);
        drop(held);
        assert_eq!(count.load(Ordering::Acquire), 0);
        assert!(Waiting::enter(&count).is_some());
    }

    #[test]
    fn unknown_users_are_checked_against_the_costliest_hash() {
        let cheap = "$2y$05$OfxqV8uSmCCoR8eQqSLpWujMx8dpYFNT4R/x6bsmgx55oK/JfqnPa";
        let dear = "$2y$11$OfxqV8uSmCCoR8eQqSLpWujMx8dpYFNT4R/x6bsmgx55oK/JfqnPa";
        let h = htpasswd::parse(&format!("a:{cheap}\nb:{dear}\n")).unwrap();
        assert_eq!(Users::new(h, 0).dummy, dear);
        let empty = htpasswd::parse("").unwrap();
        assert_eq!(Users::new(empty, 0).dummy, DUMMY_HASH);
    }

    #[test]
    fn auth_warnings_name_users_and_upstreams() {
        let c = crate::config::Config::from_toml_str(
            "[[upstream]]\nname = \"docker.io\"\nurl = \"https://r\"\n[auth]\nhtpasswd = \"/h\"\n[[access]]\nusers = [\"alice\", \"bob\", \"ci-*\"]\nrepositories = [\"docker.io/**\", \"dockr.io/x\"]\nallow = true\n",
        )
        .unwrap();
        let h = htpasswd::parse(&format!(
            "alice:{}\n",
            "$2y$05$OfxqV8uSmCCoR8eQqSLpWujMx8dpYFNT4R/x6bsmgx55oK/JfqnPa"
        ))
        .unwrap();
        let w = warnings(&c, Some(&h));
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(w[0].contains("clear text"), "{w:?}");
        assert!(w[1].contains("access[0].users[1]: \"bob\""), "{w:?}");
        assert!(w[2].contains("access[0].repositories[1]"), "{w:?}");
    }

    #[test]
    fn basic_values_decode() {
        let v = |s: &str| HeaderValue::from_str(s).unwrap();
        assert_eq!(
            basic_credentials(&v("Basic YWxpY2U6cDpx")),
            Some(("alice".into(), "p:q".into()))
        );
        assert_eq!(
            basic_credentials(&v("basic  YWxpY2U6cDpx")),
            Some(("alice".into(), "p:q".into()))
        );
        assert_eq!(basic_credentials(&v("Bearer abc")), None);
        assert_eq!(basic_credentials(&v("Basic !!!")), None);
        assert_eq!(basic_credentials(&v("Basic YWxpY2U=")), None);
    }
}
