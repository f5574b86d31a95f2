//! Blobs for a request: the committed object, a fill to follow (started now or joined), or,
//! when the store cannot take the blob, the upstream relayed. A response gets a [`BlobSource`]:
//! a transport-neutral cursor over the bytes it may send, which the server turns into a body.
//!
//! Blob files are shared by every repository, the right to read them is not: a cached blob, or
//! a fill started for another repository, is served under a repository only once it is linked
//! to it (a manifest of the repository names it, a fill under it stored it, or the upstream
//! confirmed it with a HEAD under it). Until then the request is the upstream's to answer.

use super::fill::{FillBody, FillTask, Opened, Tee};
use super::inflight::{Joined, Progress, Readable};
use super::relay::Relay;
use super::{Mirror, Target};
use crate::error::{Error, UpstreamFault};
use crate::metrics::{Kind, LinkCheck, Lookup, Metrics, Source};
use crate::oci::Digest;
use crate::oci::Verifier;
use crate::storage::integrity::{self, Damage};
use crate::storage::s3::{Bucket, Upload};
use crate::storage::{Access, Blob, BlobStore, ReadAt};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::Method;
use std::sync::Arc;
use tokio::sync::oneshot;
use tracing::{Instrument, info_span, warn};

/// The next piece of a blob a response may send.
pub enum Piece {
    /// `len` stored bytes at `offset` of `reader`. `more`: further bytes are ready right behind
    /// these (a sender may hold back a partial segment for them).
    Stored {
        reader: Arc<dyn ReadAt>,
        offset: u64,
        len: usize,
        more: bool,
    },
    /// Bytes relayed from the upstream.
    Relayed(Bytes),
}

/// The bytes of one blob response, from `pos` to the end of its range: from the store, from a
/// fill as it grows (waiting for it, the last byte only once verified), or from the upstream.
pub struct BlobSource {
    len: Option<u64>,
    origin: Source,
    state: State,
    pos: u64,
    /// End of the range, exclusive; `None`: the end of the blob.
    end: Option<u64>,
    _following: Option<Following>,
}

enum State {
    Stored(Blob),
    /// An adopted object not hashed yet (see [`Checking`]).
    Checking(Box<Checking>),
    Growing {
        reader: Arc<dyn ReadAt>,
        progress: Progress,
        /// Where the rest comes from if the fill's store fails midway.
        t: Target,
        digest: Digest,
    },
    Relay(Box<Relay>),
}

/// A stored object whose bytes were never hashed (adopted when the metadata was lost): a
/// response from its start hashes what it sends and holds the last byte back until the digest
/// matches, as a fill does; a response to a range hashes the whole object before its first
/// byte. A match marks the object verified; a mismatch quarantines it and cuts the response.
struct Checking {
    blob: Blob,
    digest: Digest,
    store: Arc<dyn BlobStore>,
    /// Hashing along with the response; `None` before the first piece, or for a range.
    hasher: Option<Verifier>,
}

impl Checking {
    /// Records the verdict on the whole object. `Ok` when it matched.
    async fn settle(&self, damage: Option<Damage>) -> Result<(), Error> {
        let (store, digest, len) = (self.store.clone(), self.digest.clone(), self.blob.len);
        let why = damage.as_ref().map(ToString::to_string);
        tokio::task::spawn_blocking(move || match damage {
            None => store.mark_verified(&digest, len),
            Some(d) => store.quarantine(&digest, &d),
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
        match why {
            None => Ok(()),
            Some(why) => Err(Error::Internal(format!(
                "stored blob {} is damaged ({why}); quarantined",
                self.digest
            ))),
        }
    }
}

impl BlobSource {
    fn stored(store: &Arc<dyn BlobStore>, digest: &Digest, blob: Blob) -> BlobSource {
        let len = blob.len;
        let state = if blob.verified {
            State::Stored(blob)
        } else {
            State::Checking(Box::new(Checking {
                blob,
                digest: digest.clone(),
                store: store.clone(),
                hasher: None,
            }))
        };
        BlobSource {
            len: Some(len),
            origin: Source::Cache,
            state,
            pos: 0,
            end: None,
            _following: None,
        }
    }

    /// The blob's length, when known (a fill from an upstream that sent no Content-Length does
    /// not know it until the end).
    pub fn blob_len(&self) -> Option<u64> {
        self.len
    }

    /// Where the bytes come from, for metrics.
    pub fn origin(&self) -> Source {
        self.origin
    }

    /// Limits the response to bytes `start..end` (end exclusive; `None`: to the end).
    pub fn range(mut self, start: u64, end: Option<u64>) -> BlobSource {
        self.pos = start;
        self.end = end;
        if let State::Relay(r) = &mut self.state {
            r.set_range(start, end);
        }
        self
    }

    /// The next piece, at most `max` stored bytes; `None` when the range is complete, or the
    /// error that must cut the response short (a failed fill, a mismatch, a short file).
    pub async fn next(&mut self, max: usize) -> Result<Option<Piece>, Error> {
        loop {
            if self.end.is_some_and(|e| self.pos >= e) {
                return Ok(None);
            }
            let (reader, avail, last) = match &mut self.state {
                State::Stored(b) => (b.reader.clone(), b.len, true),
                State::Checking(_) => {
                    if let Some(piece) = self.check_next(max).await? {
                        return Ok(Some(piece));
                    }
                    continue;
                }
                State::Relay(r) => {
                    let chunk = r.next().await?;
                    if let Some(c) = &chunk {
                        self.pos += c.len() as u64;
                    }
                    return Ok(chunk.map(Piece::Relayed));
                }
                State::Growing {
                    reader,
                    progress,
                    t,
                    digest,
                } => match progress.readable() {
                    Readable::Upto { end, last } => (reader.clone(), end, last),
                    Readable::Failed(e) => return Err(e),
                    Readable::Diverted { at, .. } if self.pos < at => (reader.clone(), at, false),
                    Readable::Diverted { at, hash } => {
                        let relay = Relay::resume(
                            t.clone(),
                            digest.clone(),
                            at,
                            hash,
                            self.len,
                            self.pos,
                            self.end,
                        );
                        self.state = State::Relay(Box::new(relay));
                        continue;
                    }
                },
            };
            let limit = self.end.map_or(avail, |e| e.min(avail));
            if self.pos < limit {
                let n = ((limit - self.pos) as usize).min(max);
                let offset = self.pos;
                self.pos += n as u64;
                return Ok(Some(Piece::Stored {
                    reader,
                    offset,
                    len: n,
                    more: self.pos < limit,
                }));
            }
            if last && self.end.is_none() {
                return Ok(None);
            }
            match &mut self.state {
                State::Growing { progress, .. } if !last => progress.changed().await?,
                _ => return Err(Error::Internal("range beyond the end of the blob".into())),
            }
        }
    }
}

impl BlobSource {
    /// The next piece of an unverified object ([`Checking`]), or `None` once the object turned
    /// out whole and the response goes on as from any stored object.
    async fn check_next(&mut self, max: usize) -> Result<Option<Piece>, Error> {
        let State::Checking(c) = &mut self.state else {
            return Ok(None);
        };
        let len = c.blob.len;
        if c.hasher.is_none() {
            if self.pos == 0 && self.end.is_none() {
                c.hasher = Some(Verifier::new(c.digest.algorithm()));
            } else {
                let (reader, digest) = (c.blob.reader.clone(), c.digest.clone());
                let damage = tokio::task::spawn_blocking(move || {
                    integrity::check(&*reader, &digest, len, |_| true).damage()
                })
                .await
                .map_err(|e| Error::Internal(e.to_string()))?;
                c.settle(damage).await?;
                self.become_stored();
                return Ok(None);
            }
        }
        // Everything but the last byte goes out as it is hashed; the last waits for the verdict.
        let held = if self.pos + 1 >= len { len } else { len - 1 };
        let n = ((held.saturating_sub(self.pos)) as usize).min(max);
        let bytes = if n == 0 {
            Bytes::new()
        } else {
            let (reader, offset) = (c.blob.reader.clone(), self.pos);
            tokio::task::spawn_blocking(move || reader.read_bytes(offset, n))
                .await
                .map_err(|e| Error::Internal(e.to_string()))?
                .map_err(Error::from)?
        };
        let hasher = c.hasher.as_mut().expect("set above");
        hasher.update(&bytes);
        self.pos += n as u64;
        if self.pos >= len {
            let hasher = c.hasher.take().expect("set above");
            let found = hasher.finish();
            let damage = (found != c.digest).then_some(Damage::Digest { found });
            c.settle(damage).await?;
            self.become_stored();
        }
        Ok((!bytes.is_empty()).then_some(Piece::Relayed(bytes)))
    }

    fn become_stored(&mut self) {
        if let State::Checking(c) = &self.state {
            let blob = Blob {
                verified: true,
                ..c.blob.clone()
            };
            self.state = State::Stored(blob);
        }
    }
}

/// Counts a response in `cachalot_followers_waiting` for as long as it streams from a fill; a
/// guard, so a response dropped anywhere leaves the gauge right.
struct Following(Arc<Metrics>);

impl Following {
    fn new(metrics: &Arc<Metrics>) -> Following {
        metrics.followers_waiting.inc();
        Following(metrics.clone())
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        self.0.followers_waiting.dec();
    }
}

/// `<upstream>/<repo>`: who a fill fetches for, as objects record who committed them.
fn owner(t: &Target) -> String {
    format!("{}/{}", t.upstream.name(), t.repo)
}

/// A cache file that cannot be created: a full or failing disk costs caching, not the pull
/// (the blob is passed through); running out of descriptors is load, answered 503.
fn cannot_write(e: std::io::Error) -> NoFill {
    if crate::error::is_exhaustion(&e) {
        NoFill::Failed(e.into())
    } else {
        NoFill::CannotWrite(e)
    }
}

/// Why no fill was started.
enum NoFill {
    /// A fill committed and left the table since the first lookup: starting another would
    /// fetch the blob twice.
    Committed(Blob),
    /// The store cannot take a new object (full disk, I/O error).
    CannotWrite(std::io::Error),
    Failed(Error),
}

impl Mirror {
    /// Opens a blob for a response: the committed object, or a fill (started now, or joined).
    pub async fn blob(&self, t: &Target, digest: &Digest) -> Result<BlobSource, Error> {
        let allowed = match self.stored_blob(t, digest)? {
            Ok(source) => return Ok(source),
            Err(linked) => linked,
        };
        // Boxed: the paths that wait for a fill, a bucket, a peer or the upstream make a future
        // of kilobytes, which every request, a stored blob's too, would otherwise carry and
        // copy into the handler's box (callgrind: 15 KB of memcpy per cached blob request).
        let mut source = Box::pin(self.open_blob(t, digest, allowed)).await?;
        if matches!(source.state, State::Growing { .. }) {
            source._following = Some(Following::new(&self.metrics));
        }
        Ok(source)
    }

    /// The blob, if it is stored and linked to `t`'s repository: the common case, found
    /// without waiting for anything. Else whether it is linked.
    fn stored_blob(&self, t: &Target, digest: &Digest) -> Result<Result<BlobSource, bool>, Error> {
        let blobs = self.store.blobs();
        let linked = self.linked(t, digest)?;
        if linked && let Some(b) = blobs.open(digest, Access::Read)? {
            self.lookup(Kind::Blob, Lookup::Hit);
            self.note_shared_read(digest);
            return Ok(Ok(BlobSource::stored(blobs, digest, b)));
        }
        Ok(Err(linked))
    }

    /// A blob not found stored and linked (`allowed`: linked) a moment ago.
    async fn open_blob(
        &self,
        t: &Target,
        digest: &Digest,
        mut allowed: bool,
    ) -> Result<BlobSource, Error> {
        let blobs = self.store.blobs();
        if !allowed {
            allowed = self.bucket_linked(t, digest).await;
        }
        let owner = owner(t);
        if !allowed {
            let stored = blobs.stat(digest)?;
            // A fill under this repository commits its link before its file appears, so a file
            // first seen after the look above may be that fill's: look again before asking.
            allowed = stored.is_some() && self.linked(t, digest)?;
            if allowed && let Some(b) = blobs.open(digest, Access::Read)? {
                self.lookup(Kind::Blob, Lookup::Hit);
                return Ok(BlobSource::stored(blobs, digest, b));
            }
            let foreign_fill = || {
                self.fills
                    .get(digest)
                    .is_some_and(|f| !f.fetches_for(&owner))
            };
            if !allowed && (stored.is_some() || foreign_fill()) {
                self.confirm(t, digest, stored).await?;
                allowed = true;
                if let Some(b) = blobs.open(digest, Access::Read)? {
                    self.lookup(Kind::Blob, Lookup::Hit);
                    return Ok(BlobSource::stored(blobs, digest, b));
                }
            }
        }
        // Offline, the bucket is the one place left to fill from.
        if self.offline && !(allowed && self.bucket_len(t, digest).await.is_some()) {
            self.lookup(Kind::Blob, Lookup::Miss);
            return Err(self.offline_error(t));
        }
        let joined = self.fills.join_or_start(digest, &owner, || {
            match blobs.open(digest, Access::Read) {
                Ok(Some(b)) => return Err(NoFill::Committed(b)),
                Ok(None) => {}
                Err(e) => return Err(NoFill::Failed(e.into())),
            }
            let writer = blobs.begin(digest).map_err(cannot_write)?;
            let reader = writer.reader().map_err(cannot_write)?;
            Ok((reader.clone(), (writer, reader)))
        });
        let fill = match joined {
            Ok(Joined::Follow(fill)) => {
                // A fill another repository started since the look above: not followed
                // before the upstream says this repository holds the blob too.
                if !allowed && !fill.fetches_for(&owner) {
                    self.confirm(t, digest, None).await?;
                }
                self.lookup(Kind::Blob, Lookup::Coalesced);
                fill
            }
            Ok(Joined::Started(fill, guard, (writer, reader))) => {
                let (open, from) = self.fill_source(t, digest, allowed);
                let task = FillTask {
                    t: t.clone(),
                    digest: digest.clone(),
                    open,
                    writer,
                    reader,
                    guard,
                    metrics: self.metrics.clone(),
                    evict_wakeup: self.evict_wakeup.clone(),
                    min_rate: self.fill_min_rate,
                    offline: self.offline,
                };
                tokio::spawn(task.run().instrument(info_span!("fill", digest = %digest)));
                self.lookup(Kind::Blob, from.await.unwrap_or(Lookup::Miss));
                fill
            }
            Err(NoFill::Committed(b)) => {
                // A fill under this repository links it as it commits.
                if !allowed && !self.linked(t, digest)? {
                    self.confirm(t, digest, Some(b.len)).await?;
                }
                self.lookup(Kind::Blob, Lookup::Hit);
                return Ok(BlobSource::stored(blobs, digest, b));
            }
            Err(NoFill::CannotWrite(e)) => {
                // A full or failing disk costs caching, not the pull.
                self.lookup(Kind::Blob, Lookup::Miss);
                self.metrics.cache_write_errors.inc();
                warn!(error = %e, digest = %digest, "cannot write to the cache; passing the blob through");
                return self.pass_through(t, digest).await;
            }
            Err(NoFill::Failed(e)) => return Err(e),
        };
        let (reader, mut progress) = fill.follow();
        let len = progress.started().await?;
        Ok(BlobSource {
            len,
            origin: Source::Fill,
            state: State::Growing {
                reader,
                progress,
                t: t.clone(),
                digest: digest.clone(),
            },
            pos: 0,
            end: None,
            _following: None,
        })
    }

    /// Where a fill starts reading: the bucket when it holds the blob and `t`'s repository is
    /// known to (`linked`), else the replica that owns the digest when that is another one (and
    /// this request is not itself a peer's), else the upstream, copied into the bucket as it
    /// passes. The leader's lookup is counted by where the fill started, once it knows.
    fn fill_source(
        &self,
        t: &Target,
        digest: &Digest,
        linked: bool,
    ) -> (
        Option<BoxFuture<'static, Result<Opened, Error>>>,
        oneshot::Receiver<Lookup>,
    ) {
        let (told, heard) = oneshot::channel();
        let bucket = self.store.bucket().cloned();
        let offline = self.offline;
        let owner = match &self.cluster {
            Some(c) if !t.forwarded && !offline => {
                c.owner(&digest.to_string()).map(|p| (c.clone(), p))
            }
            _ => None,
        };
        if bucket.is_none() && owner.is_none() {
            let _ = told.send(Lookup::Miss);
            return (None, heard);
        }
        let (t, digest) = (t.clone(), digest.clone());
        let open = async move {
            if let Some(b) = bucket.as_ref().filter(|_| linked) {
                match b.get(&digest, None).await {
                    Ok(Some(read)) => {
                        // Marked read now, so no replica's gc takes it while it streams; the
                        // bytes need not wait for the mark.
                        let (marker, d) = (b.clone(), digest.clone());
                        tokio::spawn(async move {
                            if let Err(e) = marker.touch(std::slice::from_ref(&d)).await {
                                warn!(error = %e, digest = %d, "could not mark a bucket read");
                            }
                        });
                        let _ = told.send(Lookup::Bucket);
                        return Ok(Opened {
                            body: FillBody::Bucket(read.body, b.clone()),
                            len: Some(read.len),
                            tee: None,
                        });
                    }
                    Ok(None) => {}
                    Err(e) => {
                        warn!(error = %e, digest = %digest, "the bucket failed; fetching the blob elsewhere")
                    }
                }
            }
            if let Some((cluster, peer)) = owner {
                let path = super::peer_path(&t, &format!("blobs/{digest}"));
                match cluster
                    .fetch(&peer, Method::GET, &path, http::HeaderMap::new())
                    .await
                {
                    Ok(resp) if resp.status().is_success() => {
                        let _ = told.send(Lookup::Peer);
                        let len = super::content_length(resp.headers());
                        return Ok(Opened {
                            body: FillBody::Peer(resp.into_body()),
                            len,
                            tee: None,
                        });
                    }
                    Ok(resp) => {
                        warn!(peer = %peer, status = %resp.status(), digest = %digest, "the owner could not serve the blob; fetching it here");
                    }
                    Err(e) => {
                        warn!(peer = %peer, error = %e, digest = %digest, "the owner is unreachable; fetching the blob here");
                    }
                }
            }
            let _ = told.send(Lookup::Miss);
            if offline {
                return Err(Error::upstream(t.upstream.name(), UpstreamFault::Offline));
            }
            let mut opened = super::fill::from_upstream(&t, &digest, 0).await?;
            opened.tee = bucket.map(|b| {
                Box::new(BucketCopy {
                    upload: b.upload(&digest),
                    bucket: b,
                    upstream: t.upstream.name().to_owned(),
                    repo: t.repo.to_string(),
                }) as Box<dyn Tee>
            });
            Ok(opened)
        };
        (Some(Box::pin(open)), heard)
    }

    /// The length of a blob the bucket holds for `t`'s repository. A failing bucket has none.
    async fn bucket_len(&self, t: &Target, digest: &Digest) -> Option<u64> {
        let b = self.store.bucket()?;
        if !(self.linked(t, digest).unwrap_or(false) || self.bucket_linked(t, digest).await) {
            return None;
        }
        match b.head(digest).await {
            Ok(len) => len,
            Err(e) => {
                warn!(error = %e, "the bucket failed a HEAD");
                None
            }
        }
    }

    /// Whether the bucket says `t`'s repository holds `digest` (another replica fetched or
    /// confirmed it there); remembered here when it does. A failing bucket says no.
    pub(super) async fn bucket_linked(&self, t: &Target, digest: &Digest) -> bool {
        let Some(b) = self.store.bucket() else {
            return false;
        };
        match b.linked(t.upstream.name(), t.repo.as_str(), digest).await {
            Ok(true) => {
                super::remember_link(self.store.clone(), t, digest).await;
                true
            }
            Ok(false) => false,
            Err(e) => {
                warn!(error = %e, "the bucket failed a link lookup");
                false
            }
        }
    }

    /// Makes sure a blob is committed to the cache, fetching it if needed; `on_progress` hears
    /// the bytes stored so far. Returns its length, or why it was not stored.
    pub async fn cache_blob(
        &self,
        t: &Target,
        digest: &Digest,
        on_progress: impl FnMut(u64),
    ) -> Result<u64, Error> {
        let source = match self.stored_blob(t, digest)? {
            Ok(source) => source,
            Err(linked) => Box::pin(self.open_blob(t, digest, linked)).await?,
        };
        match source.state {
            State::Stored(b) => Ok(b.len),
            State::Checking(c) => Ok(c.blob.len),
            State::Growing { mut progress, .. } => progress.committed(on_progress).await,
            State::Relay(_) => Err(Error::Internal(
                "the cache could not be written; blob not stored".into(),
            )),
        }
    }

    /// GETs a blob from upstream for a client without caching it (the cache cannot be written).
    async fn pass_through(&self, t: &Target, digest: &Digest) -> Result<BlobSource, Error> {
        let up = &t.upstream;
        let resp = up.send(t.blob_request(Method::GET, digest, None)).await?;
        if !resp.status().is_success() {
            return Err(up.status_error(&resp));
        }
        let len = super::content_length(resp.headers());
        let relay = Relay::pass_through(t.clone(), digest.clone(), resp.into_body(), len);
        Ok(BlobSource {
            len,
            origin: Source::Upstream,
            state: State::Relay(Box::new(relay)),
            pos: 0,
            end: None,
            _following: None,
        })
    }

    /// The length of a blob for HEAD: from the cache or a fill when possible, else an upstream
    /// HEAD (which fetches nothing).
    pub async fn blob_len(&self, t: &Target, digest: &Digest) -> Result<u64, Error> {
        let linked = self.linked(t, digest)?;
        if linked && let Some(b) = self.store.blobs().open(digest, Access::Read)? {
            self.lookup(Kind::Blob, Lookup::Hit);
            return Ok(b.len);
        }
        // Boxed, as in `blob`.
        Box::pin(self.unstored_blob_len(t, digest, linked)).await
    }

    /// `blob_len` of a blob not found stored and linked (`linked`: linked) a moment ago.
    async fn unstored_blob_len(
        &self,
        t: &Target,
        digest: &Digest,
        linked: bool,
    ) -> Result<u64, Error> {
        if linked {
            if let Some(fill) = self.fills.get(digest)
                && let Ok(Some(len)) = fill.progress().started().await
            {
                self.lookup(Kind::Blob, Lookup::Coalesced);
                return Ok(len);
            }
        } else {
            let stored = self.store.blobs().stat(digest)?;
            // As in `open_blob`: the file may be that of a fill under this repository that
            // committed since the look above, and is linked already.
            if let Some(len) = stored
                && self.linked(t, digest)?
            {
                self.lookup(Kind::Blob, Lookup::Hit);
                return Ok(len);
            }
            let fill = self.fills.get(digest);
            if stored.is_none()
                && let Some(fill) = &fill
                && fill.fetches_for(&owner(t))
                && let Ok(Some(len)) = fill.progress().started().await
            {
                self.lookup(Kind::Blob, Lookup::Coalesced);
                return Ok(len);
            }
            if stored.is_some() || fill.is_some() {
                let len = self.confirm(t, digest, stored).await?;
                let how = if stored.is_some() {
                    Lookup::Hit
                } else {
                    Lookup::Coalesced
                };
                self.lookup(Kind::Blob, how);
                return Ok(len);
            }
        }
        if let Some(len) = self.bucket_len(t, digest).await {
            self.lookup(Kind::Blob, Lookup::Bucket);
            return Ok(len);
        }
        self.lookup(Kind::Blob, Lookup::Miss);
        if self.offline {
            return Err(self.offline_error(t));
        }
        let up = &t.upstream;
        let resp = up.send(t.blob_request(Method::HEAD, digest, None)).await?;
        if !resp.status().is_success() {
            return Err(up.status_error(&resp));
        }
        super::content_length(resp.headers()).ok_or_else(|| {
            Error::upstream(
                up.name(),
                crate::error::UpstreamFault::Protocol("blob HEAD without Content-Length".into()),
            )
        })
    }

    /// Whether `t`'s repository is known to hold `digest`. A set lookup once read.
    pub(super) fn linked(&self, t: &Target, digest: &Digest) -> Result<bool, Error> {
        Ok(self
            .store
            .meta()
            .linked(t.upstream.name(), t.repo.as_str(), digest)?)
    }

    /// Asks the upstream, with a HEAD under `t`'s repository, whether that repository holds
    /// `digest`, which the cache has (`stored`: its length) or is fetching for another
    /// repository. Yes (200, and the digest and length agree): linked, so it is asked once, and
    /// the length returned. No, or no answer: the error the client gets instead of the bytes;
    /// offline, no answer is possible and the blob is unknown here. Concurrent requests for the
    /// same check share one HEAD.
    async fn confirm(
        &self,
        t: &Target,
        digest: &Digest,
        stored: Option<u64>,
    ) -> Result<u64, Error> {
        if self.offline {
            count_check(&self.metrics, LinkCheck::Refused);
            // The very answer a blob that is not cached gets: a different one would tell any
            // caller which digests the cache holds for other repositories.
            return Err(Error::upstream(t.upstream.name(), UpstreamFault::Offline));
        }
        let key = LinkCheckKey {
            upstream: t.upstream.name().to_owned(),
            repo: t.repo.clone(),
            digest: digest.clone(),
            stored,
        };
        let check = confirm_task(
            t.clone(),
            digest.clone(),
            stored,
            self.store.clone(),
            self.metrics.clone(),
        );
        self.link_checks.run(key, || check).await.0
    }

    /// Waits, at most `limit`, for fills that have verified their blob to commit it: their
    /// clients are already served, and stopping now would throw the blob away and keep the
    /// cache busy for the next process.
    pub async fn finish_commits(&self, limit: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.fills.committing() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    pub fn fills_in_flight(&self) -> usize {
        self.fills.len()
    }
}

/// One question put to an upstream: does this repository hold this digest (of this length)?
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct LinkCheckKey {
    upstream: String,
    repo: crate::oci::RepoName,
    digest: Digest,
    stored: Option<u64>,
}

fn count_check(metrics: &Metrics, c: LinkCheck) {
    metrics
        .blob_link_checks
        .with_label_values(&[c.as_str()])
        .inc()
}

/// [`Mirror::confirm`]'s HEAD and link, as a task of its own (shared by concurrent askers).
async fn confirm_task(
    t: Target,
    digest: Digest,
    stored: Option<u64>,
    store: Arc<crate::storage::Store>,
    metrics: Arc<Metrics>,
) -> Result<u64, Error> {
    let up = &t.upstream;
    let resp = match up.send(t.blob_request(Method::HEAD, &digest, None)).await {
        Ok(r) => r,
        Err(e) => {
            count_check(&metrics, LinkCheck::Failed);
            return Err(e);
        }
    };
    let status = resp.status();
    if !status.is_success() {
        let c = if status.is_client_error() {
            LinkCheck::Refused
        } else {
            LinkCheck::Failed
        };
        count_check(&metrics, c);
        return Err(up.status_error(&resp));
    }
    let len = super::content_length(resp.headers());
    let claimed = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok());
    let disagrees = match (len, stored) {
        (None, _) => Some("no Content-Length".to_owned()),
        (Some(l), Some(s)) if l != s => Some(format!("length {l}, the blob has {s}")),
        _ => claimed
            .filter(|c| *c != digest.to_string())
            .map(|c| format!("Docker-Content-Digest {c}")),
    };
    if let Some(why) = disagrees {
        count_check(&metrics, LinkCheck::Failed);
        return Err(Error::upstream(
            up.name(),
            UpstreamFault::Protocol(format!("blob HEAD answered {why}")),
        ));
    }
    count_check(&metrics, LinkCheck::Confirmed);
    super::remember_confirmed(store, &t, &digest).await;
    Ok(len.unwrap_or_default())
}

/// An upstream fill's copy on its way into the bucket, linked to the repository it was fetched
/// under once complete, so every replica may serve it there.
struct BucketCopy {
    upload: Upload,
    bucket: Bucket,
    upstream: String,
    repo: String,
}

impl Tee for BucketCopy {
    fn write(&mut self, data: Bytes) -> std::io::Result<()> {
        self.upload.write(data)
    }

    fn finish(
        self: Box<Self>,
        proof: crate::oci::Verified,
    ) -> BoxFuture<'static, std::io::Result<()>> {
        Box::pin(async move {
            let BucketCopy {
                upload,
                bucket,
                upstream,
                repo,
            } = *self;
            upload.finish(&proof).await?;
            bucket.put_link(&upstream, &repo, proof.digest()).await
        })
    }
}
