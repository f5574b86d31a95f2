//! The filesystem blob store: content-addressed files under the cache directory, written
//! two-phase (temp file, fsync, rename, directory fsync), with an object row per file in the
//! metadata store.
//!
//! Layout under `cache.dir`: `VERSION`, `blobs/<alg>/<2 hex>/<hex>` (blobs and manifests
//! alike), `tmp/` (fills in progress and import staging; swept at start), `meta.redb`.
//!
//! Atomicity comes from the rename: a fill writes `tmp/<hex>-<pid>-<seq>` and only a verified
//! one is renamed into `blobs/`. The object row is written (durably) before the rename, so a
//! crash in between leaves a row without a file (a miss, fetched again; the next start drops
//! the row), never a file the size accounting does not know. Files without a row (the metadata
//! lost or restored from a backup) are adopted at start, unverified (`integrity::reconcile`).

use super::integrity::{Checked, Counters, Damage, Quarantine};
use super::{
    Access, Blob, BlobStore, BlobWriter, CommitError, FileReader, Meta, ObjectRow, ReadAt, Usage,
    check_proof,
};
use crate::oci::{Digest, Verified};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

const LAYOUT_VERSION: &str = "1\n";

/// The file operations a fill's writes go through. The real one is `RealDisk`; tests wrap it
/// to make writes fail (a full disk, an I/O error) at chosen points.
pub trait Disk: Send + Sync {
    /// Creates a new file for writing (it must not exist).
    fn create(&self, path: &Path) -> io::Result<Box<dyn DiskFile>>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
}

/// A file being written.
pub trait DiskFile: Write + Send {
    fn sync_all(&mut self) -> io::Result<()>;
}

/// The local filesystem.
pub struct RealDisk;

impl Disk for RealDisk {
    fn create(&self, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        Ok(Box::new(File::create_new(path)?))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
}

impl DiskFile for File {
    fn sync_all(&mut self) -> io::Result<()> {
        File::sync_all(self)
    }
}

/// Blobs as files in the cache directory.
pub struct FsStore {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    tmp: PathBuf,
    meta: Arc<Meta>,
    disk: Arc<dyn Disk>,
    /// Bytes and objects committed, kept in step with the metadata's object rows.
    used: AtomicU64,
    objects: AtomicU64,
    /// Reads not yet written to the metadata: flushed in batches, since a durable write per
    /// cache hit would cost more than the hit.
    touches: Mutex<HashMap<Digest, SystemTime>>,
    /// Held while an object's row and file change together (commit, removal), so the two never
    /// disagree because a commit and an eviction of one digest interleaved.
    objects_lock: Mutex<()>,
    /// What the object rows say of each object, in memory: every open compares the file's
    /// length with the recorded one, and a metadata read per cache hit would cost more than
    /// the hit. Changed only with the rows, under `objects_lock`.
    records: RwLock<HashMap<Digest, Record>>,
    quarantine: Quarantine,
    counters: Arc<Counters>,
}

/// An object row as the hot path needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Record {
    size: u64,
    /// False for an object adopted without a record until it has been hashed whole.
    verified: bool,
}

static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

impl FsStore {
    /// Opens (creating if needed) the cache at `root` and its metadata, and removes temp files
    /// left by fills that a crash or kill interrupted: they were never renamed, so nothing
    /// refers to them.
    pub fn open(root: &Path, disk: Arc<dyn Disk>) -> io::Result<(FsStore, Arc<Meta>)> {
        Self::open_with_cache(root, disk, None)
    }

    /// `open`, with the metadata's cache sized as [`Meta::open_with_cache`] says.
    pub fn open_with_cache(
        root: &Path,
        disk: Arc<dyn Disk>,
        meta_cache: Option<usize>,
    ) -> io::Result<(FsStore, Arc<Meta>)> {
        std::fs::create_dir_all(root.join("blobs"))?;
        let version = root.join("VERSION");
        match std::fs::read_to_string(&version) {
            Ok(v) if v == LAYOUT_VERSION => {}
            Ok(v) => {
                return Err(io::Error::other(format!(
                    "{}: cache layout version {:?} is not supported by this cachalot",
                    version.display(),
                    v.trim()
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::write(&version, LAYOUT_VERSION)?
            }
            Err(e) => return Err(e),
        }
        // Take the metadata lock first: a second process opening a cache in use must fail
        // before it sweeps the temp files of the running server's fills.
        let meta = Arc::new(super::integrity::open_meta(
            &root.join("meta.redb"),
            meta_cache,
        )?);
        if meta.links_missing() {
            // A cache from before links: without them every cached blob would be a miss.
            let n = meta.rebuild_links(|d| {
                let bytes = std::fs::read(FsStore::blob_path_in(root, d)).ok()?;
                (bytes.len() <= crate::oci::manifest::MAX_MANIFEST_SIZE).then_some(bytes)
            })?;
            tracing::info!(
                links = n,
                "rebuilt repository links of a cache written before them"
            );
        }
        let tmp = root.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        let reconciled = super::integrity::reconcile(root, &meta)?;
        let counters = Arc::new(Counters::default());
        counters
            .adopted
            .store(reconciled.adopted, Ordering::Relaxed);
        counters
            .dropped
            .store(reconciled.dropped, Ordering::Relaxed);
        let rows = meta.objects()?;
        let unverified: std::collections::HashSet<Digest> =
            meta.unverified()?.into_iter().collect();
        let used = rows.iter().map(|r| r.size).sum();
        let objects = rows.len() as u64;
        let records = rows
            .into_iter()
            .map(|r| {
                let verified = !unverified.contains(&r.digest);
                (
                    r.digest,
                    Record {
                        size: r.size,
                        verified,
                    },
                )
            })
            .collect();
        let store = FsStore {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                tmp,
                meta: meta.clone(),
                disk,
                used: AtomicU64::new(used),
                objects: AtomicU64::new(objects),
                touches: Mutex::new(HashMap::new()),
                objects_lock: Mutex::new(()),
                records: RwLock::new(records),
                quarantine: Quarantine::new(root),
                counters,
            }),
        };
        Ok((store, meta))
    }

    /// Where a committed object lives in the cache at `root`, for a process that cannot open
    /// the cache because another one holds it (it may still read committed files).
    pub fn blob_path_in(root: &Path, digest: &Digest) -> PathBuf {
        let mut buf = [0; crate::oci::digest::MAX_HEX_LEN];
        let hex = digest.hex_in(&mut buf);
        let alg = digest.algorithm().as_str();
        // One buffer, sized once: every blob request builds this path, and joining its parts
        // one by one cost four allocations (about 4,000 instructions of a cached blob GET).
        let mut path = PathBuf::with_capacity(root.as_os_str().len() + 16 + alg.len() + hex.len());
        path.push(root);
        path.push("blobs");
        path.push(alg);
        path.push(&hex[..2]);
        path.push(hex);
        path
    }
}

impl Inner {
    fn blob_path(&self, digest: &Digest) -> PathBuf {
        FsStore::blob_path_in(&self.root, digest)
    }

    /// Notes a read of `digest`, written to the metadata at the next flush.
    fn touch(&self, digest: &Digest) -> SystemTime {
        let now = SystemTime::now();
        self.touches.lock().insert(digest.clone(), now);
        now
    }

    /// Writes pending reads to the metadata.
    fn flush_touches(&self) -> io::Result<()> {
        let pending: Vec<(Digest, SystemTime)> = self.touches.lock().drain().collect();
        self.meta.touch_objects(&pending)
    }

    /// Moves a synced, verified file into place: its row first (durably), then the rename and
    /// the directory sync, under the lock eviction also takes.
    fn place(&self, digest: &Digest, from: &Path, size: u64, repo: &str) -> io::Result<()> {
        let dest = self.blob_path(digest);
        let dir = dest
            .parent()
            .ok_or_else(|| io::Error::other("blob path has no parent"))?;
        std::fs::create_dir_all(dir)?;
        let _guard = self.objects_lock.lock();
        let replaced = self
            .meta
            .put_object(digest, size, repo, SystemTime::now())?;
        // Known verified before the file is visible: a read that opened it between the rename and
        // a later insert found no record, took it for an adopted file and hashed it all again.
        self.records.write().insert(
            digest.clone(),
            Record {
                size,
                verified: true,
            },
        );
        crash_point("after-metadata");
        self.disk.rename(from, &dest)?;
        crash_point("after-rename");
        self.account(size, replaced);
        // The rename is durable only once the directory entry is.
        File::open(dir)?.sync_all()?;
        Ok(())
    }

    /// Opens a committed object, comparing its file's length with the record: one that differs
    /// is quarantined, never opened.
    fn open_checked(&self, digest: &Digest, access: Access) -> io::Result<Checked> {
        // The read is noted before the open: `remove` checks reads and unlinks under the same
        // lock, so an eviction either sees this read and keeps the file, or unlinks it before
        // the open and the open misses. Noted after, a pass could unlink a file just opened
        // and the most recently read object would be the one evicted.
        let at = (access == Access::Read).then(|| self.touch(digest));
        let missed = || {
            // Not a read: a fill about to commit this digest must not look read since.
            if let Some(at) = at {
                let mut touches = self.touches.lock();
                if touches.get(digest) == Some(&at) {
                    touches.remove(digest);
                }
            }
        };
        match File::open(self.blob_path(digest)) {
            Ok(f) => {
                // The record is read after the open: `place` records an object before its
                // rename, so a file that is open here has its record. Read before the open, a
                // commit could land in between and its file be taken for an unrecorded one.
                let record = self.records.read().get(digest).copied();
                let len = f.metadata()?.len();
                match record {
                    Some(r) if r.size != len => {
                        // Cut short or grown: never served, and no HEAD answers with it.
                        drop(f);
                        let damage = Damage::Size {
                            recorded: r.size,
                            found: len,
                        };
                        self.take_damaged(digest, &damage)?;
                        missed();
                        Ok(Checked::Damaged(damage))
                    }
                    _ => Ok(Checked::Blob(Blob {
                        reader: Arc::new(FileReader::new(f)),
                        len,
                        // A file nobody recorded is as good as an adopted one: hashed first.
                        verified: record.is_some_and(|r| r.verified),
                    })),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                missed();
                Ok(Checked::Missing)
            }
            Err(e) => Err(e),
        }
    }

    /// Moves a damaged object to the quarantine and forgets its row, unless the file there now
    /// is no longer the damaged one (a fill of the digest replaced it since it was looked at).
    fn take_damaged(&self, digest: &Digest, damage: &Damage) -> io::Result<()> {
        let path = self.blob_path(digest);
        let _guard = self.objects_lock.lock();
        if let Damage::Size { found, .. } = damage {
            match std::fs::metadata(&path) {
                Ok(m) if m.len() == *found => {}
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        self.quarantine.take(&path, digest, damage)?;
        self.counters.quarantined[damage.reason() as usize].fetch_add(1, Ordering::Relaxed);
        self.forget(std::slice::from_ref(digest))
    }

    /// Drops the rows of objects whose files are gone, keeping the totals and records in step.
    /// Called under `objects_lock`.
    fn forget(&self, digests: &[Digest]) -> io::Result<()> {
        let (count, freed) = self.meta.remove_objects(digests)?;
        {
            let mut records = self.records.write();
            for d in digests {
                records.remove(d);
            }
        }
        let used = self.used.load(Ordering::Relaxed);
        self.used.fetch_sub(freed.min(used), Ordering::Relaxed);
        let objects = self.objects.load(Ordering::Relaxed);
        self.objects
            .fetch_sub(count.min(objects), Ordering::Relaxed);
        Ok(())
    }

    /// Keeps `used` the sum of the rows: adds a new row of `size`, less the one it replaced.
    fn account(&self, size: u64, replaced: Option<u64>) {
        self.used.fetch_add(size, Ordering::Relaxed);
        match replaced {
            None => {
                self.objects.fetch_add(1, Ordering::Relaxed);
            }
            Some(old) => {
                let used = self.used.load(Ordering::Relaxed);
                self.used.fetch_sub(old.min(used), Ordering::Relaxed);
            }
        }
    }
}

impl BlobStore for FsStore {
    fn stat(&self, digest: &Digest) -> io::Result<Option<u64>> {
        match std::fs::metadata(self.inner.blob_path(digest)) {
            // After the stat, as `open_checked` reads it.
            Ok(m) => match self.inner.records.read().get(digest).copied() {
                Some(r) if r.size != m.len() => {
                    self.inner.take_damaged(
                        digest,
                        &Damage::Size {
                            recorded: r.size,
                            found: m.len(),
                        },
                    )?;
                    Ok(None)
                }
                _ => Ok(Some(m.len())),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn open(&self, digest: &Digest, access: Access) -> io::Result<Option<Blob>> {
        match self.inner.open_checked(digest, access)? {
            Checked::Blob(b) => Ok(Some(b)),
            Checked::Missing | Checked::Damaged(_) => Ok(None),
        }
    }

    fn open_for_check(&self, digest: &Digest) -> io::Result<Checked> {
        self.inner.open_checked(digest, Access::Quiet)
    }

    fn begin(&self, digest: &Digest) -> io::Result<Box<dyn BlobWriter>> {
        let seq = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
        let temp = self
            .inner
            .tmp
            .join(format!("{}-{}-{seq}", digest.hex(), std::process::id()));
        let file = self.inner.disk.create(&temp)?;
        Ok(Box::new(FsWriter {
            store: self.inner.clone(),
            file: Some(file),
            temp,
            digest: digest.clone(),
            written: 0,
        }))
    }

    fn remove(&self, rows: &[ObjectRow]) -> io::Result<Vec<Digest>> {
        let inner = &self.inner;
        let _guard = inner.objects_lock.lock();
        // Held until the files are gone, so no read can slip between the check and the unlink
        // (see `open`). Opens wait for the unlinks of one pass, which are few and rare.
        let touches = inner.touches.lock();
        let mut digests = Vec::with_capacity(rows.len());
        for row in rows {
            if touches
                .get(&row.digest)
                .is_some_and(|t| *t > row.last_access)
            {
                continue;
            }
            match std::fs::remove_file(inner.blob_path(&row.digest)) {
                Ok(()) => {}
                // A row whose file a crash never renamed into place: only the row goes.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            digests.push(row.digest.clone());
        }
        drop(touches);
        inner.forget(&digests)?;
        Ok(digests)
    }

    fn objects(&self) -> io::Result<Vec<ObjectRow>> {
        self.inner.flush_touches()?;
        self.inner.meta.objects()
    }

    fn usage(&self) -> Usage {
        Usage {
            bytes: self.inner.used.load(Ordering::Relaxed),
            objects: self.inner.objects.load(Ordering::Relaxed),
        }
    }

    fn ready(&self) -> bool {
        self.inner.tmp.is_dir()
    }

    fn sync(&self) -> io::Result<()> {
        self.inner.flush_touches()?;
        self.inner.meta.sync()
    }

    fn quarantine(&self, digest: &Digest, damage: &Damage) -> io::Result<()> {
        self.inner.take_damaged(digest, damage)
    }

    fn mark_verified(&self, digest: &Digest, len: u64) -> io::Result<()> {
        let inner = &self.inner;
        let _guard = inner.objects_lock.lock();
        match inner.records.read().get(digest).copied() {
            Some(Record { verified: true, .. }) => return Ok(()),
            Some(_) => inner.meta.set_verified(digest)?,
            None => {
                // A file that appeared without a row: now it is accounted for too.
                let replaced =
                    inner
                        .meta
                        .put_object(digest, len, super::meta::ADOPTED, SystemTime::now())?;
                inner.account(len, replaced);
            }
        }
        inner.records.write().insert(
            digest.clone(),
            Record {
                size: len,
                verified: true,
            },
        );
        Ok(())
    }

    fn counters(&self) -> Option<Arc<Counters>> {
        Some(self.inner.counters.clone())
    }
}

/// A fill's temp file. Dropped uncommitted, it removes the file.
struct FsWriter {
    store: Arc<Inner>,
    /// `None` once sealed.
    file: Option<Box<dyn DiskFile>>,
    /// Emptied once committed, so drop leaves the placed file alone.
    temp: PathBuf,
    digest: Digest,
    written: u64,
}

impl BlobWriter for FsWriter {
    fn written(&self) -> u64 {
        self.written
    }

    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("writer already sealed"))?;
        file.write_all(data)?;
        self.written += data.len() as u64;
        Ok(())
    }

    fn reader(&self) -> io::Result<Arc<dyn ReadAt>> {
        // Opened by path while the temp file exists; the descriptor stays valid across the
        // rename, so readers opened during the fill read the committed file after it.
        Ok(Arc::new(FileReader::new(File::open(&self.temp)?)))
    }

    fn seal(&mut self) -> io::Result<()> {
        if let Some(mut file) = self.file.take() {
            file.sync_all()?;
        }
        Ok(())
    }

    fn commit(mut self: Box<Self>, proof: Verified, repo: &str) -> Result<u64, CommitError> {
        check_proof(&self.digest, self.written, &proof)?;
        self.seal()?;
        self.store
            .place(&self.digest, &self.temp, self.written, repo)?;
        self.temp = PathBuf::new();
        Ok(self.written)
    }
}

impl Drop for FsWriter {
    fn drop(&mut self) {
        if !self.temp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// Dies on the spot when `CACHALOT_CRASH_POINT` names this point: the crash-safety tests use
/// it to kill the process at instants a `kill -9` cannot hit reliably (between the metadata
/// write and the rename, between the rename and the directory sync).
pub(crate) fn crash_point(name: &str) {
    static POINT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let point = POINT.get_or_init(|| std::env::var("CACHALOT_CRASH_POINT").ok());
    if point.as_deref() == Some(name) {
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::{Algorithm, Verifier};

    fn proof(data: &[u8]) -> Verified {
        let mut v = Verifier::new(Algorithm::Sha256);
        v.update(data);
        v.verify(&Digest::sha256_of(data)).unwrap()
    }

    #[test]
    fn commit_places_the_file_under_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _meta) = FsStore::open(dir.path(), Arc::new(RealDisk)).unwrap();
        let data = b"hello blob".to_vec();
        let d = Digest::sha256_of(&data);
        let mut w = store.begin(&d).unwrap();
        w.write(&data).unwrap();
        w.commit(proof(&data), "docker.io/x").unwrap();
        let path = dir
            .path()
            .join(format!("blobs/sha256/{}/{}", &d.hex()[..2], d.hex()));
        assert_eq!(std::fs::read(path).unwrap(), data);
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }

    /// A file whose length is not the recorded one is never opened: it goes to the
    /// quarantine, its row goes, and the accounting follows.
    #[test]
    fn a_file_of_the_wrong_length_is_quarantined_not_opened() {
        let dir = tempfile::tempdir().unwrap();
        let (store, meta) = FsStore::open(dir.path(), Arc::new(RealDisk)).unwrap();
        let data = vec![7u8; 4096];
        let d = Digest::sha256_of(&data);
        let mut w = store.begin(&d).unwrap();
        w.write(&data).unwrap();
        w.commit(proof(&data), "up/x").unwrap();
        let path = FsStore::blob_path_in(dir.path(), &d);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(100)
            .unwrap();
        assert!(store.open(&d, Access::Read).unwrap().is_none());
        assert!(!path.exists());
        assert_eq!(store.usage(), Usage::default());
        assert!(meta.objects().unwrap().is_empty());
        assert_eq!(
            store
                .counters()
                .unwrap()
                .quarantined(super::super::integrity::Reason::Size),
            1
        );
        let q: Vec<_> = std::fs::read_dir(dir.path().join("quarantine"))
            .unwrap()
            .collect();
        assert_eq!(q.len(), 1);
    }

    /// A read that opens the file between a commit's rename and the end of the commit finds
    /// it verified: taken for an adopted file, it would be hashed again in full on its way out.
    #[test]
    fn a_read_racing_a_commit_finds_the_object_verified() {
        use parking_lot::Mutex;
        use std::sync::mpsc;
        struct PauseAfterRename {
            renamed: Mutex<mpsc::Sender<()>>,
            resume: Mutex<mpsc::Receiver<()>>,
        }
        impl Disk for PauseAfterRename {
            fn create(&self, path: &Path) -> io::Result<Box<dyn DiskFile>> {
                RealDisk.create(path)
            }
            fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
                std::fs::rename(from, to)?;
                self.renamed.lock().send(()).unwrap();
                self.resume.lock().recv().unwrap();
                Ok(())
            }
        }
        let (renamed, on_rename) = mpsc::channel();
        let (resume, on_resume) = mpsc::channel();
        let disk = PauseAfterRename {
            renamed: Mutex::new(renamed),
            resume: Mutex::new(on_resume),
        };
        let dir = tempfile::tempdir().unwrap();
        let (store, _meta) = FsStore::open(dir.path(), Arc::new(disk)).unwrap();
        let data = vec![3u8; 4096];
        let d = Digest::sha256_of(&data);
        let mut w = store.begin(&d).unwrap();
        w.write(&data).unwrap();
        std::thread::scope(|s| {
            let commit = s.spawn(|| w.commit(proof(&data), "up/x"));
            on_rename.recv().unwrap();
            let blob = store
                .open(&d, Access::Read)
                .unwrap()
                .expect("renamed into place");
            resume.send(()).unwrap();
            commit.join().unwrap().unwrap();
            assert!(blob.verified, "a committed object read as unverified");
        });
    }

    #[test]
    fn temp_files_left_by_a_crash_are_swept_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let _ = FsStore::open(dir.path(), Arc::new(RealDisk)).unwrap();
            std::fs::write(dir.path().join("tmp/leftover"), b"partial").unwrap();
        }
        let _ = FsStore::open(dir.path(), Arc::new(RealDisk)).unwrap();
        assert!(!dir.path().join("tmp/leftover").exists());
    }

    #[test]
    fn an_unknown_layout_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("VERSION"), "9\n").unwrap();
        let e = FsStore::open(dir.path(), Arc::new(RealDisk)).err().unwrap();
        assert!(e.to_string().contains("layout version"), "{e}");
    }

    /// Upgrading: a cache written before links opens with its blobs still readable under the
    /// repositories whose manifests name them.
    #[test]
    fn a_cache_from_before_links_has_them_rebuilt_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let layer = b"layer bytes".to_vec();
        let ld = Digest::sha256_of(&layer);
        let manifest = format!(
            r#"{{"config":{{"digest":"{ld}","size":11}},"layers":[{{"digest":"{ld}","size":11}}]}}"#
        )
        .into_bytes();
        let md = Digest::sha256_of(&manifest);
        {
            let (store, meta) = FsStore::open(dir.path(), Arc::new(RealDisk)).unwrap();
            for (data, d) in [(&layer, &ld), (&manifest, &md)] {
                let mut w = store.begin(d).unwrap();
                w.write(data).unwrap();
                w.commit(proof(data), "(imported)").unwrap();
            }
            meta.put_manifest(&md, "application/vnd.oci.image.manifest.v1+json", None)
                .unwrap();
            let t = SystemTime::now();
            meta.put_manifest(&md, "application/x", Some(("up", "team/app", "v1", t)))
                .unwrap();
        }
        {
            // As the previous version left it: no links table.
            let db = redb::Database::create(dir.path().join("meta.redb")).unwrap();
            let tx = db.begin_write().unwrap();
            let links: redb::TableDefinition<(&str, &str, &str), u8> =
                redb::TableDefinition::new("links");
            assert!(tx.delete_table(links).unwrap());
            tx.commit().unwrap();
        }
        let (_store, meta) = FsStore::open(dir.path(), Arc::new(RealDisk)).unwrap();
        assert!(meta.linked("up", "team/app", &ld).unwrap());
        assert!(meta.linked("up", "team/app", &md).unwrap());
        assert!(!meta.linked("up", "team/other", &ld).unwrap());
    }
}
