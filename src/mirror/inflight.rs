//! The single-flight table for blob fills: one writer per digest, every client a follower that
//! reads the growing temp file as the fill publishes progress on a `watch` channel.

use crate::error::Error;
use crate::oci::Digest;
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// Where a fill is.
#[derive(Clone, Debug)]
pub enum FillState {
    /// Waiting for the upstream's response headers.
    Connecting,
    /// Body arriving; `written` bytes are in the temp file and readable.
    Streaming { len: Option<u64>, written: u64 },
    /// Every byte is in the temp file and matches the digest; the commit (fsync, rename) is
    /// under way. Followers may finish: the bytes are right whether or not the commit works.
    Verified { len: u64 },
    /// Verified and renamed into place.
    Done { len: u64 },
    /// Nothing was stored; followers must abort their responses.
    Failed(Error),
    /// A write to the cache failed after `at` bytes: nothing will be stored, but the upstream
    /// is fine. Followers serve what the file holds, then fetch the rest themselves, carrying
    /// on the hash from `hash` (the state after `at` bytes) so they still verify.
    Diverted {
        at: u64,
        len: Option<u64>,
        hash: HashState,
    },
}

/// A digest computation in progress, shared with followers of a diverted fill.
#[derive(Clone)]
pub struct HashState(pub Box<crate::oci::Verifier>);

impl std::fmt::Debug for HashState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HashState")
    }
}

/// One fill in progress, shared by its followers.
pub struct Fill {
    temp: PathBuf,
    dest: PathBuf,
    state: watch::Receiver<FillState>,
}

impl Fill {
    pub fn subscribe(&self) -> watch::Receiver<FillState> {
        self.state.clone()
    }

    /// Waits until the upstream answered: the blob's length if it declared one, or the error
    /// that ended the fill before any body arrived.
    pub async fn started(&self) -> Result<Option<u64>, Error> {
        let mut rx = self.subscribe();
        loop {
            match &*rx.borrow_and_update() {
                FillState::Connecting => {}
                FillState::Streaming { len, .. } => return Ok(*len),
                FillState::Verified { len } | FillState::Done { len } => return Ok(Some(*len)),
                FillState::Diverted { len, .. } => return Ok(*len),
                FillState::Failed(e) => return Err(e.clone()),
            }
            if rx.changed().await.is_err() {
                return Err(Error::Internal("fill task ended without a result".into()));
            }
        }
    }

    /// Opens the growing file. A fill that finished between lookup and open has renamed it, so
    /// fall back to the committed path; an open handle stays valid across that rename.
    pub fn open(&self) -> Result<File, Error> {
        match File::open(&self.temp) {
            Ok(f) => Ok(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => match &*self.state.borrow() {
                FillState::Failed(err) => Err(err.clone()),
                _ => File::open(&self.dest).map_err(Error::from),
            },
            Err(e) => Err(e.into()),
        }
    }
}

/// What `join_or_start` found: a fill to follow, or a new one the caller must run.
pub enum Joined<T> {
    Follow(Arc<Fill>),
    Started(Arc<Fill>, FillGuard, T),
}

/// Digest -> fill in progress.
#[derive(Default)]
pub struct Inflight {
    fills: Mutex<HashMap<Digest, Arc<Fill>>>,
}

/// Held by the fill task; removes the table entry when dropped, whatever way the task ends,
/// so a panicking or failed fill never blocks later requests for the digest.
pub struct FillGuard {
    table: Arc<Inflight>,
    digest: Digest,
    fill: Arc<Fill>,
    pub tx: watch::Sender<FillState>,
}

impl Drop for FillGuard {
    fn drop(&mut self) {
        self.table.remove(&self.digest, &self.fill);
    }
}

impl FillGuard {
    /// Ends the fill. The entry leaves the table before the state is published, so a request
    /// that sees the end (e.g. a client retrying after a failure) never joins this fill again.
    pub fn finish(self, state: FillState) {
        self.table.remove(&self.digest, &self.fill);
        self.tx.send_replace(state);
    }
}

impl Inflight {
    /// The fill for `digest`: an existing one to follow, or a new one made by `start` (which
    /// returns the temp path, the final path and whatever the caller needs to run the fill). A
    /// `start` that fails leaves the table as it was.
    pub fn join_or_start<T, E>(
        self: &Arc<Self>,
        digest: &Digest,
        start: impl FnOnce() -> Result<(PathBuf, PathBuf, T), E>,
    ) -> Result<Joined<T>, E> {
        let mut fills = self.fills.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = fills.get(digest) {
            return Ok(Joined::Follow(f.clone()));
        }
        let (temp, dest, extra) = start()?;
        let (tx, rx) = watch::channel(FillState::Connecting);
        let fill = Arc::new(Fill {
            temp,
            dest,
            state: rx,
        });
        fills.insert(digest.clone(), fill.clone());
        let guard = FillGuard {
            table: self.clone(),
            digest: digest.clone(),
            fill: fill.clone(),
            tx,
        };
        Ok(Joined::Started(fill, guard, extra))
    }

    /// A fill in progress, if any.
    pub fn get(&self, digest: &Digest) -> Option<Arc<Fill>> {
        self.fills
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
            .cloned()
    }

    /// Whether some fill has verified its blob and is committing it.
    pub fn committing(&self) -> bool {
        self.fills
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .any(|f| matches!(*f.state.borrow(), FillState::Verified { .. }))
    }

    pub fn len(&self) -> usize {
        self.fills.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes `fill`'s entry, and only it: a newer fill for the same digest may stand there.
    fn remove(&self, digest: &Digest, fill: &Arc<Fill>) {
        let mut fills = self.fills.lock().unwrap_or_else(|p| p.into_inner());
        if fills.get(digest).is_some_and(|f| Arc::ptr_eq(f, fill)) {
            fills.remove(digest);
        }
    }
}
