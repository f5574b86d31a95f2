//! The server's certificate: loaded from `server.tls_cert`/`tls_key`, and reloaded when the files
//! change or on SIGHUP without dropping a connection.
//!
//! New handshakes ask [`Reloadable`] (a rustls `ResolvesServerCert`) for the current pair, which
//! a reload swaps; connections already established keep the keys they negotiated. A new pair
//! that does not load (unparsable, or a key that is not the certificate's) is refused with a
//! warning and the previous pair stays in service, so a botched rotation never takes HTTPS down.

use crate::error::Error;
use crate::metrics::Metrics;
use parking_lot::{Mutex, RwLock};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

/// How often the files are checked for a change. cert-manager renews days before expiry, so
/// seconds of delay cost nothing, and a `stat` of two files every few seconds is free.
const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// The server's certificate and key, swappable while connections use them.
pub(crate) struct Reloadable {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    /// What the files looked like when last read (successfully or not), so that a pair that
    /// failed is retried only once either file changes again.
    seen: Mutex<Option<Stamp>>,
    /// Registered by `load`, before the server says it is listening, so that a HUP sent as
    /// soon as it does is already ours (the default action would end the process); taken by
    /// the reload task.
    hup: Mutex<Option<Signal>>,
    metrics: Arc<Metrics>,
}

impl fmt::Debug for Reloadable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reloadable")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// Identity of both files' contents as `stat` sees them (through symlinks). An in-place rewrite
/// changes the length or mtime; a rename over the file or a swapped symlinked directory (how
/// Kubernetes updates a mounted Secret) changes the inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp([(u64, u64, u64, Option<SystemTime>); 2]);

fn stamp(cert: &Path, key: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let one = |p: &Path| {
        let m = std::fs::metadata(p).ok()?;
        Some((m.dev(), m.ino(), m.len(), m.modified().ok()))
    };
    Some(Stamp([one(cert)?, one(key)?]))
}

/// What started a reload, for the log.
#[derive(Clone, Copy, Debug)]
enum Trigger {
    FileChange,
    Sighup,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::FileChange => "file change",
            Trigger::Sighup => "SIGHUP",
        }
    }
}

// === impl Reloadable ===

impl Reloadable {
    /// Loads the pair; an error names the key and path at fault.
    pub(crate) fn load(
        cert: &Path,
        key: &Path,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Reloadable>, Error> {
        let seen = stamp(cert, key);
        let pair = load_pair(cert, key).map_err(Error::Internal)?;
        let hup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGHUP; TLS certificates reload on file change only");
                None
            }
        };
        Ok(Arc::new(Reloadable {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: RwLock::new(Arc::new(pair)),
            seen: Mutex::new(seen),
            hup: Mutex::new(hup),
            metrics,
        }))
    }

    /// An acceptor whose handshakes take whatever pair is current; HTTP/2 and HTTP/1.1 by ALPN.
    pub(crate) fn acceptor(self: &Arc<Self>) -> Result<TlsAcceptor, Error> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Internal(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(self.clone());
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(cfg)))
    }

    /// Watches for a new pair until `stopped`: the files are polled every few seconds, and
    /// SIGHUP reloads at once whether or not they look changed. Ends with the server.
    pub(crate) fn spawn_reload(self: &Arc<Self>, mut stopped: watch::Receiver<bool>) {
        let this = self.clone();
        let mut hup = self.hup.lock().take();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(POLL_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                let hup_recv = async {
                    match hup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = stopped.changed() => return,
                    _ = tick.tick() => this.reload_if_changed().await,
                    Some(()) = hup_recv => this.reload(Trigger::Sighup).await,
                }
            }
        });
    }

    async fn reload_if_changed(self: &Arc<Self>) {
        let now = {
            let (cert, key) = (self.cert.clone(), self.key.clone());
            tokio::task::spawn_blocking(move || stamp(&cert, &key))
                .await
                .ok()
                .flatten()
        };
        // A file that is briefly missing (mid-rename) is not a change: wait until both exist.
        if now.is_some() && now != *self.seen.lock() {
            self.reload(Trigger::FileChange).await;
        }
    }

    async fn reload(self: &Arc<Self>, trigger: Trigger) {
        let this = self.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            let seen = stamp(&this.cert, &this.key);
            (seen, load_pair(&this.cert, &this.key))
        })
        .await;
        let Ok((seen, loaded)) = loaded else { return };
        *self.seen.lock() = seen;
        match loaded {
            Ok(pair) => {
                *self.current.write() = Arc::new(pair);
                self.metrics.tls_reloads.with_label_values(&["ok"]).inc();
                info!(
                    cert = %self.cert.display(),
                    trigger = trigger.as_str(),
                    "reloaded TLS certificate"
                );
            }
            Err(e) => {
                self.metrics
                    .tls_reloads
                    .with_label_values(&["failed"])
                    .inc();
                warn!(
                    error = %e,
                    trigger = trigger.as_str(),
                    "TLS certificate not reloaded; the previous one stays in use"
                );
            }
        }
    }
}

impl ResolvesServerCert for Reloadable {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().clone())
    }
}

/// Whether `cert` and `key` would load as the server's pair (for `check-config`); the error is
/// one line naming the key and path at fault.
pub fn check_pair(cert: &Path, key: &Path) -> Result<(), String> {
    load_pair(cert, key).map(drop)
}

/// Reads and checks a pair: at least one certificate, a key rustls can sign with, and that key
/// the certificate's own. Errors are one line naming the key and path.
fn load_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| format!("server.tls_cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "server.tls_cert {}: no certificate found",
            cert.display()
        ));
    }
    let der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("server.tls_key {}: {e}", key.display()))?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| format!("server.tls_key {}: {e}", key.display()))?;
    let pair = CertifiedKey::new(certs, signing);
    // `Unknown` (a key type whose public half rustls cannot derive) is not treated as a
    // mismatch, as rustls' own `CertifiedKey::from_der` does not.
    match pair.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(pair)
        }
        Err(e) => Err(format!(
            "server.tls_key {} does not belong to server.tls_cert {}: {e}",
            key.display(),
            cert.display()
        )),
    }
}
