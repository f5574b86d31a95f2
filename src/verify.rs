//! `cachalot verify`: re-hash the whole cache at full speed, quarantine what is damaged, print
//! one line per damaged object and a summary; exit 0 (nothing damaged), 1 (something was), or
//! 2 (could not run), as `fsck` does.
//!
//! The metadata store admits one process. With the server stopped, `verify` opens the cache
//! itself (reconciling the metadata with the files as `serve` does). Beside a running server it
//! asks the server to run the pass, over `control.sock` in the cache directory, and prints the
//! server's report as it comes. A socket in the cache directory rather than an HTTP endpoint:
//! whoever may connect is whoever may write the cache directory, who could run `verify` on a
//! stopped server anyway, and no client of the registry listener (which may be open to the
//! whole network, without `[auth]`) can make the server read its whole disk.
//!
//! The control protocol is lines of text. The client sends `verify`; the server answers
//! `start <objects> <bytes>`, then `progress <objects> <bytes>` and `damaged <digest> <what>`
//! as the pass goes, and ends with `done <objects> <bytes> <damaged>` or `error <message>`.

use crate::config::Config;
use crate::storage::scrub::{self, BucketScope, Event, Summary};
use crate::storage::{Bucket, Store};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// The control socket of the server holding the cache at `dir`.
pub fn control_path(dir: &Path) -> PathBuf {
    dir.join("control.sock")
}

/// Runs `cachalot verify --config FILE`.
pub fn cli(config: &Path) -> ExitCode {
    let config = match Config::load(config) {
        Ok(c) => c,
        Err(e) => return cannot_run(e),
    };
    let dir = config.cache.dir.clone();
    match Store::open(&dir) {
        Ok(store) => local(&config, &store, &dir),
        Err(e) if e.kind() == std::io::ErrorKind::ResourceBusy => through_server(&config, &dir),
        Err(e) => cannot_run(format!("cache.dir {}: {e}", dir.display())),
    }
}

fn cannot_run(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("cachalot: {e}");
    ExitCode::from(2)
}

/// The terminal side of a pass: a progress bar on stderr (when it is a terminal), a line per
/// damaged object on stdout, and the summary.
struct Display {
    bar: ProgressBar,
    /// Whether the pass reads the bucket too (`cache.scrub_bucket`).
    bucket: bool,
}

impl Display {
    fn new(bucket: bool) -> Display {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Display { bar, bucket }
    }

    fn start(&self, objects: u64, bytes: u64) {
        self.bar.set_length(bytes);
        self.bar.set_message(format!("0/{objects} objects"));
    }

    fn progress(&self, objects: u64, bytes: u64) {
        self.bar.set_position(bytes);
        let total = self.bar.message();
        let total = total.split('/').nth(1).unwrap_or("");
        self.bar.set_message(format!("{objects}/{total}"));
    }

    fn damaged(&self, digest: &str, what: &str) {
        self.bar
            .suspend(|| println!("damaged {digest}: {what}; quarantined"));
    }

    fn finish(&self, objects: u64, bytes: u64, damaged: u64, quarantine: &Path) -> ExitCode {
        self.bar.finish_and_clear();
        if damaged == 0 {
            println!("verified {objects} objects, {bytes} bytes: none damaged");
            ExitCode::SUCCESS
        } else {
            let bucket = match self.bucket {
                true => ", or the bucket's quarantine/ for those in the bucket",
                false => "",
            };
            println!(
                "verified {objects} objects, {bytes} bytes: {damaged} damaged, moved to {}{bucket} (each is fetched again on its next pull)",
                quarantine.display()
            );
            ExitCode::FAILURE
        }
    }
}

/// How a damaged object of the bucket is told apart from one of the cache directory, in the
/// lines printed and in those the control socket sends.
fn in_the_bucket(what: &dyn std::fmt::Display) -> String {
    format!("{what}, in the bucket")
}

/// The bucket's part of the pass, when `cache.scrub_bucket` asks for it: every blob, whichever
/// replica owns it (`verify` is asked for by a person, for the whole cache).
fn bucket_scope(
    config: &Config,
    rt: &tokio::runtime::Handle,
) -> Result<Option<BucketScope>, String> {
    if !config.cache.scrub_bucket || config.storage.backend != crate::config::Backend::S3 {
        return Ok(None);
    }
    let names: Vec<&str> = config.upstream.iter().map(|u| u.name.as_str()).collect();
    let metrics = Arc::new(crate::metrics::Metrics::new(&names));
    let _in_rt = rt.enter();
    let bucket = Bucket::connect(&config.storage, metrics).map_err(|e| e.to_string())?;
    Ok(Some(BucketScope {
        bucket,
        rt: rt.clone(),
        owns: None,
    }))
}

fn local(config: &Config, store: &Store, dir: &Path) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return cannot_run(format!("no runtime for the bucket: {e}")),
    };
    let scope = match bucket_scope(config, rt.handle()) {
        Ok(s) => s,
        Err(e) => return cannot_run(e),
    };
    let display = Display::new(scope.is_some());
    let stop = AtomicBool::new(false);
    let opts = scrub::Options {
        rate: None,
        persist: false,
    };
    let ran = scrub::run_pass_with(store, scope.as_ref(), opts, &stop, |e| match e {
        Event::Start { objects, bytes } => display.start(objects, bytes),
        Event::Progress { objects, bytes } => display.progress(objects, bytes),
        Event::Damaged(d, what) => display.damaged(&d.to_string(), &what.to_string()),
        Event::BucketDamaged(d, what) => display.damaged(&d.to_string(), &in_the_bucket(what)),
    });
    if let Err(e) = store.blobs().sync() {
        tracing::warn!(error = %e, "could not sync the metadata");
    }
    match ran {
        Ok(Summary {
            objects,
            bytes,
            damaged,
            ..
        }) => display.finish(objects, bytes, damaged, &dir.join("quarantine")),
        Err(e) => cannot_run(format!("cache.dir {}: {e}", dir.display())),
    }
}

fn through_server(config: &Config, dir: &Path) -> ExitCode {
    let path = control_path(dir);
    let mut sock = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) => {
            return cannot_run(format!(
                "cache.dir {}: in use by another process, and no cachalot answers on {}: {e}",
                dir.display(),
                path.display()
            ));
        }
    };
    eprintln!(
        "cache.dir {} is in use by a running cachalot; it runs the pass",
        dir.display()
    );
    if let Err(e) = sock.write_all(b"verify\n") {
        return cannot_run(format!("{}: {e}", path.display()));
    }
    let display = Display::new(config.cache.scrub_bucket);
    for line in BufReader::new(sock).lines() {
        let line = match line {
            Ok(l) => l,
            Err(e) => return cannot_run(format!("{}: {e}", path.display())),
        };
        let (word, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        let nums: Vec<u64> = rest.split(' ').filter_map(|n| n.parse().ok()).collect();
        match (word, nums.as_slice()) {
            ("start", [o, b]) => display.start(*o, *b),
            ("progress", [o, b]) => display.progress(*o, *b),
            ("damaged", _) => {
                let (digest, what) = rest.split_once(' ').unwrap_or((rest, ""));
                display.damaged(digest, what);
            }
            ("done", [o, b, d]) => {
                return display.finish(*o, *b, *d, &dir.join("quarantine"));
            }
            ("error", _) => return cannot_run(format!("the running cachalot: {rest}")),
            _ => {}
        }
    }
    cannot_run("the running cachalot closed the control socket before the pass ended")
}

/// Serves `control.sock` for as long as the server runs. A socket left by a server that was
/// killed is replaced (this process holds the cache's lock, so no other server uses it).
/// Without a socket (a path too long for one, a read-only directory), `verify` cannot reach
/// this server; that is logged, and serving goes on.
pub fn serve_control(
    store: Arc<Store>,
    scrub_bucket: bool,
    dir: &Path,
    mut stopped: watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    let path = control_path(dir);
    let _ = std::fs::remove_file(&path);
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, path = %path.display(), "no control socket: `cachalot verify` cannot reach this server");
            return None;
        }
    };
    let busy = Arc::new(AtomicBool::new(false));
    Some(tokio::spawn(async move {
        loop {
            let conn = tokio::select! {
                c = listener.accept() => c,
                _ = scrub::until_stopped(&mut stopped) => break,
            };
            let Ok((conn, _)) = conn else { continue };
            let scope = store
                .bucket()
                .filter(|_| scrub_bucket)
                .map(|b| BucketScope {
                    bucket: b.clone(),
                    rt: tokio::runtime::Handle::current(),
                    owns: None,
                });
            tokio::spawn(control_conn(
                conn,
                store.clone(),
                scope,
                busy.clone(),
                stopped.clone(),
            ));
        }
        // The socket file stays: the next server replaces it, and removing it here could
        // remove that server's, were it already started on the same directory.
    }))
}

/// What a running server does for integrity at rest beside serving: the control socket for
/// `verify`, and the background scrub when `[cache] scrub_interval` is set. Both end when
/// `stopped` turns true. With `cache.scrub_bucket` the scrub reads the bucket too, and with a
/// `cluster` only the blobs this replica owns, so replicas sharing the bucket split each pass
/// instead of each reading it whole.
pub fn spawn_integrity(
    config: &Config,
    store: &Arc<Store>,
    cluster: Option<Arc<crate::cluster::Cluster>>,
    stopped: watch::Receiver<bool>,
) {
    let scrub_bucket = config.cache.scrub_bucket && store.bucket().is_some();
    serve_control(
        store.clone(),
        scrub_bucket,
        &config.cache.dir,
        stopped.clone(),
    );
    if let Some(interval) = config.cache.scrub_interval {
        if store.bucket().is_some() && !scrub_bucket {
            tracing::info!(
                "scrub covers the local cache; the bucket's objects are hashed whenever a fill reads them (cache.scrub_bucket = true reads the bucket back too)"
            );
        }
        let scope = store.bucket().filter(|_| scrub_bucket).map(|b| {
            let owns = cluster.map(|c| {
                Box::new(move |d: &crate::oci::Digest| c.owner(&d.to_string()).is_none())
                    as scrub::Owns
            });
            BucketScope {
                bucket: b.clone(),
                rt: tokio::runtime::Handle::current(),
                owns,
            }
        });
        scrub::spawn(
            store.clone(),
            scope,
            interval.0,
            config.cache.scrub_rate.0,
            stopped,
        );
    }
}

async fn control_conn(
    conn: tokio::net::UnixStream,
    store: Arc<Store>,
    bucket: Option<BucketScope>,
    busy: Arc<AtomicBool>,
    mut stopped: watch::Receiver<bool>,
) {
    let (read, mut write) = conn.into_split();
    let mut line = String::new();
    let mut read = tokio::io::BufReader::new(read);
    if read.read_line(&mut line).await.is_err() {
        return;
    }
    if line.trim() != "verify" {
        let _ = write.write_all(b"error unknown command\n").await;
        return;
    }
    if busy.swap(true, Ordering::SeqCst) {
        let _ = write
            .write_all(b"error a verify pass is already running\n")
            .await;
        return;
    }
    tracing::info!("verify pass asked for over the control socket");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let stop = Arc::new(AtomicBool::new(false));
    let pass = {
        let stop = stop.clone();
        tokio::task::spawn_blocking(move || {
            let opts = scrub::Options {
                rate: None,
                persist: false,
            };
            let mut last = std::time::Instant::now();
            let ran = scrub::run_pass_with(&store, bucket.as_ref(), opts, &stop, |e| {
                let line = match e {
                    Event::Start { objects, bytes } => format!("start {objects} {bytes}"),
                    Event::Progress { objects, bytes } => {
                        // A line per object would swamp the socket on a cache of small files.
                        if last.elapsed() < std::time::Duration::from_millis(200) {
                            return;
                        }
                        last = std::time::Instant::now();
                        format!("progress {objects} {bytes}")
                    }
                    Event::Damaged(d, what) => {
                        tracing::error!(digest = %d, damage = %what, "verify: damaged object quarantined");
                        format!("damaged {d} {what}")
                    }
                    Event::BucketDamaged(d, what) => {
                        tracing::error!(digest = %d, damage = %what, "verify: damaged object taken out of the bucket (to its quarantine/)");
                        format!("damaged {d} {}", in_the_bucket(what))
                    }
                };
                let _ = tx.send(line);
            });
            let end = match &ran {
                Ok(s) if s.complete => format!("done {} {} {}", s.objects, s.bytes, s.damaged),
                Ok(_) => "error the server is stopping".to_owned(),
                Err(e) => format!("error {e}"),
            };
            let _ = tx.send(end);
        })
    };
    loop {
        tokio::select! {
            l = rx.recv() => match l {
                Some(l) => {
                    // A client gone does not stop the pass: what it quarantines is done anyway.
                    let _ = write.write_all(format!("{l}\n").as_bytes()).await;
                }
                None => break,
            },
            _ = scrub::until_stopped(&mut stopped) => {
                stop.store(true, Ordering::Relaxed);
                break;
            }
        }
    }
    let _ = pass.await;
    busy.store(false, Ordering::SeqCst);
}
