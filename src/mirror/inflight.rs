//! The single-flight table for blob fills: one writer per digest, every client a follower that
//! reads the growing object as the fill publishes its progress on a `watch` channel.
//!
//! [`FillState`] is published by the fill task through a [`FillGuard`] and read only through a
//! [`Progress`]: this file is the one place that knows what each state means.

use crate::error::Error;
use crate::oci::{Digest, Verifier};
use crate::storage::ReadAt;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::watch;

/// Where a fill is.
#[derive(Clone, Debug)]
enum FillState {
    /// Waiting for the upstream's response headers.
    Connecting,
    /// Body arriving; `written` bytes are stored and readable.
    Streaming { len: Option<u64>, written: u64 },
    /// Every byte is stored and matches the digest; the commit (fsync, rename) is under way.
    /// Followers may finish: the bytes are right whether or not the commit works.
    Verified { len: u64 },
    /// Verified and committed (or verified and not committed, when the store failed at the
    /// last step: the bytes were right all the same).
    Done { len: u64, committed: bool },
    /// Nothing was stored; followers must abort their responses.
    Failed(Error),
    /// A write to the store failed after `at` bytes: nothing will be stored, but the upstream
    /// is fine. Followers serve what was stored, then fetch the rest themselves, carrying on
    /// the hash from `hash` (the state after `at` bytes) so they still verify.
    Diverted {
        at: u64,
        len: Option<u64>,
        hash: HashState,
    },
}

/// A digest computation in progress, shared with followers of a diverted fill.
#[derive(Clone)]
pub(super) struct HashState(pub Box<Verifier>);

impl std::fmt::Debug for HashState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HashState")
    }
}

/// How much of a fill a follower may read now.
pub(super) enum Readable {
    /// Bytes `0..end` are stored and may be sent; `last`: no more will come. The last byte of
    /// the blob is held back until the digest matched.
    Upto { end: u64, last: bool },
    /// The store failed after `at` bytes: read those, then take the rest from the upstream.
    Diverted { at: u64, hash: HashState },
    /// The fill failed: the response must be cut short.
    Failed(Error),
}

/// One fill in progress, shared by its followers.
pub(super) struct Fill {
    /// Reads the growing object, and the committed one after it.
    reader: Arc<dyn ReadAt>,
    state: watch::Receiver<FillState>,
    /// `<upstream>/<repo>` the fill fetches under: requests under it may follow it unasked,
    /// since the upstream's answer to the fill is its answer to them.
    owner: Box<str>,
}

impl Fill {
    /// Whether the fill fetches under `owner` (`<upstream>/<repo>`).
    pub(super) fn fetches_for(&self, owner: &str) -> bool {
        *self.owner == *owner
    }

    /// What a follower needs: the bytes, and the fill's progress.
    pub(super) fn follow(&self) -> (Arc<dyn ReadAt>, Progress) {
        (self.reader.clone(), Progress(self.state.clone()))
    }

    pub(super) fn progress(&self) -> Progress {
        Progress(self.state.clone())
    }
}

/// A follower's view of a fill.
#[derive(Clone)]
pub(super) struct Progress(watch::Receiver<FillState>);

impl Progress {
    /// Waits until the upstream answered: the blob's length if it declared one, or the error
    /// that ended the fill before any body arrived (the upstream's own: a 502 or 504 to the
    /// client, never a 500).
    pub(super) async fn started(&mut self) -> Result<Option<u64>, Error> {
        loop {
            match &*self.0.borrow_and_update() {
                FillState::Connecting => {}
                FillState::Streaming { len, .. } | FillState::Diverted { len, .. } => {
                    return Ok(*len);
                }
                FillState::Verified { len } | FillState::Done { len, .. } => {
                    return Ok(Some(*len));
                }
                FillState::Failed(e) => return Err(e.clone()),
            }
            self.changed().await?;
        }
    }

    /// How much may be read now.
    pub(super) fn readable(&mut self) -> Readable {
        match &*self.0.borrow_and_update() {
            FillState::Connecting => Readable::Upto {
                end: 0,
                last: false,
            },
            // The last byte waits for verification: a response that reached its
            // Content-Length would count as a good download even if the digest then failed.
            FillState::Streaming { written, len } => Readable::Upto {
                end: len.map_or(*written, |l| (*written).min(l.saturating_sub(1))),
                last: false,
            },
            FillState::Verified { len } | FillState::Done { len, .. } => Readable::Upto {
                end: *len,
                last: true,
            },
            FillState::Diverted { at, hash, .. } => Readable::Diverted {
                at: *at,
                hash: hash.clone(),
            },
            FillState::Failed(e) => Readable::Failed(e.clone()),
        }
    }

    /// Waits for the next change. A fill task that ended without a word (it panicked) is an
    /// error.
    pub(super) async fn changed(&mut self) -> Result<(), Error> {
        self.0
            .changed()
            .await
            .map_err(|_| Error::Internal("fill task ended without a result".into()))
    }

    /// Waits until the blob is committed, calling `on_progress` with the bytes stored so far
    /// as the fill grows (prefetch, which wants the blob cached, not its bytes). Returns its
    /// length, or why nothing was stored.
    pub(super) async fn committed(
        &mut self,
        mut on_progress: impl FnMut(u64),
    ) -> Result<u64, Error> {
        loop {
            match &*self.0.borrow_and_update() {
                FillState::Connecting => {}
                FillState::Streaming { written, .. } => on_progress(*written),
                FillState::Verified { len } => on_progress(*len),
                FillState::Done {
                    len,
                    committed: true,
                } => {
                    on_progress(*len);
                    return Ok(*len);
                }
                FillState::Done { .. } | FillState::Diverted { .. } => {
                    return Err(Error::Internal(
                        "the cache could not be written; blob not stored".into(),
                    ));
                }
                FillState::Failed(e) => return Err(e.clone()),
            }
            self.changed().await?;
        }
    }

    /// Whether the fill has verified its blob and is committing it.
    fn committing(&self) -> bool {
        matches!(*self.0.borrow(), FillState::Verified { .. })
    }
}

/// A fill in progress as the page shows it: read from the table, never kept apart from it.
#[derive(Clone, Debug)]
pub struct FillView {
    pub digest: Digest,
    /// `<upstream>/<repo>` it fetches under.
    pub owner: String,
    /// Bytes stored so far.
    pub written: u64,
    /// The blob's length, when the upstream declared it.
    pub len: Option<u64>,
}

impl super::Mirror {
    /// The fills in progress now.
    pub fn fills_in_progress(&self) -> Vec<FillView> {
        self.fills.snapshot()
    }
}

/// What `join_or_start` found: a fill to follow, or a new one the caller must run.
pub(super) enum Joined<T> {
    Follow(Arc<Fill>),
    Started(Arc<Fill>, FillGuard, T),
}

/// Digest -> fill in progress.
#[derive(Default)]
pub(super) struct Inflight {
    fills: Mutex<HashMap<Digest, Arc<Fill>>>,
}

/// Held by the fill task, the one publisher of its state. Removes the table entry when
/// dropped, whatever way the task ends, so a panicking or failed fill never blocks later
/// requests for the digest.
pub(super) struct FillGuard {
    table: Arc<Inflight>,
    digest: Digest,
    fill: Arc<Fill>,
    tx: watch::Sender<FillState>,
}

impl Drop for FillGuard {
    fn drop(&mut self) {
        self.table.remove(&self.digest, &self.fill);
    }
}

impl FillGuard {
    /// `written` bytes of a blob of `len` (when declared) are stored.
    pub(super) fn streaming(&self, len: Option<u64>, written: u64) {
        self.tx.send_replace(FillState::Streaming { len, written });
    }

    /// Every byte is stored and verified; the commit follows.
    pub(super) fn verified(&self, len: u64) {
        self.tx.send_replace(FillState::Verified { len });
    }

    /// Ends the fill: done (committed or not), failed, or diverted. The entry leaves the table
    /// before the state is published, so a request that sees the end (e.g. a client retrying
    /// after a failure) never joins this fill again.
    pub(super) fn done(self, len: u64, committed: bool) {
        self.finish(FillState::Done { len, committed });
    }

    pub(super) fn failed(self, e: Error) {
        self.finish(FillState::Failed(e));
    }

    pub(super) fn diverted(self, at: u64, len: Option<u64>, hash: HashState) {
        self.finish(FillState::Diverted { at, len, hash });
    }

    fn finish(self, state: FillState) {
        self.table.remove(&self.digest, &self.fill);
        self.tx.send_replace(state);
    }
}

impl Inflight {
    /// The fill for `digest`: an existing one to follow, or a new one made by `start` (which
    /// returns the reader of the object it will write and whatever the caller needs to run
    /// the fill). A `start` that fails leaves the table as it was.
    pub(super) fn join_or_start<T, E>(
        self: &Arc<Self>,
        digest: &Digest,
        owner: &str,
        start: impl FnOnce() -> Result<(Arc<dyn ReadAt>, T), E>,
    ) -> Result<Joined<T>, E> {
        let mut fills = self.fills.lock();
        if let Some(f) = fills.get(digest) {
            return Ok(Joined::Follow(f.clone()));
        }
        let (reader, extra) = start()?;
        let (tx, rx) = watch::channel(FillState::Connecting);
        let fill = Arc::new(Fill {
            reader,
            state: rx,
            owner: owner.into(),
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
    pub(super) fn get(&self, digest: &Digest) -> Option<Arc<Fill>> {
        self.fills.lock().get(digest).cloned()
    }

    /// Whether some fill has verified its blob and is committing it.
    pub(super) fn committing(&self) -> bool {
        self.fills
            .lock()
            .values()
            .any(|f| f.progress().committing())
    }

    /// Every fill in progress, as the page shows it.
    pub(super) fn snapshot(&self) -> Vec<FillView> {
        self.fills
            .lock()
            .iter()
            .map(|(digest, fill)| {
                let (written, len) = match &*fill.state.borrow() {
                    FillState::Connecting => (0, None),
                    FillState::Streaming { len, written } => (*written, *len),
                    FillState::Diverted { at, len, .. } => (*at, *len),
                    FillState::Verified { len } | FillState::Done { len, .. } => (*len, Some(*len)),
                    FillState::Failed(_) => (0, None),
                };
                FillView {
                    digest: digest.clone(),
                    owner: fill.owner.to_string(),
                    written,
                    len,
                }
            })
            .collect()
    }

    pub(super) fn len(&self) -> usize {
        self.fills.lock().len()
    }

    /// Removes `fill`'s entry, and only it: a newer fill for the same digest may stand there.
    fn remove(&self, digest: &Digest, fill: &Arc<Fill>) {
        let mut fills = self.fills.lock();
        if fills.get(digest).is_some_and(|f| Arc::ptr_eq(f, fill)) {
            fills.remove(digest);
        }
    }
}
