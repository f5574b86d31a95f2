//! The on-disk cache: content-addressed blob files, written two-phase (temp file, fsync,
//! rename), and the crash-safe metadata store beside them.
//!
//! Layout under `cache.dir`:
//! `VERSION`, `blobs/<alg>/<2 hex>/<hex>` (blobs and manifests alike), `tmp/` (fills in
//! progress; swept at start), `meta.redb` (tags and manifest media types).

pub mod evict;
pub mod meta;

use crate::oci::{Digest, Verifier};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

pub use meta::{Meta, ObjectRow, TagEntry};

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

/// The filesystem cache.
pub struct Store {
    root: PathBuf,
    tmp: PathBuf,
    pub meta: Meta,
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
    /// One eviction pass at a time: a second pass flushing reads between another's plan and
    /// its removal would hide those reads from it.
    pass_lock: Mutex<()>,
}

static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

impl Store {
    /// Opens (creating if needed) the cache at `root`, and removes temp files left by fills that
    /// a crash or kill interrupted: they were never renamed, so nothing refers to them.
    pub fn open(root: &Path) -> io::Result<Store> {
        Self::open_with(root, Arc::new(RealDisk))
    }

    /// `open`, with fill writes going through `disk`.
    pub fn open_with(root: &Path, disk: Arc<dyn Disk>) -> io::Result<Store> {
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
        let meta = Meta::open(&root.join("meta.redb"))?;
        let tmp = root.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        let (used, objects) = meta.totals()?;
        Ok(Store {
            root: root.to_path_buf(),
            tmp,
            meta,
            disk,
            used: AtomicU64::new(used),
            objects: AtomicU64::new(objects),
            touches: Mutex::new(HashMap::new()),
            objects_lock: Mutex::new(()),
            pass_lock: Mutex::new(()),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Bytes of committed objects.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Number of committed objects.
    pub fn object_count(&self) -> u64 {
        self.objects.load(Ordering::Relaxed)
    }

    /// Where a committed object with this digest lives.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        Store::blob_path_in(&self.root, digest)
    }

    /// Where a committed object lives in the cache at `root`, for a process that cannot open
    /// the cache because another one holds it (it may still read committed files).
    pub fn blob_path_in(root: &Path, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        root.join("blobs")
            .join(digest.algorithm().as_str())
            .join(&hex[..2])
            .join(hex)
    }

    /// Opens a committed object: the file and its length, or `None` when it is not cached.
    /// Counts as a read for eviction.
    pub fn open_blob(&self, digest: &Digest) -> io::Result<Option<(File, u64)>> {
        // The read is noted before the open: `remove` checks reads and unlinks under the same
        // lock, so an eviction either sees this read and keeps the file, or unlinks it before
        // the open and the open misses. Noted after, a pass could unlink a file just opened
        // and the most recently read object would be the one evicted.
        let at = self.touch(digest);
        match File::open(self.blob_path(digest)) {
            Ok(f) => {
                let len = f.metadata()?.len();
                Ok(Some((f, len)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Not a read: a fill about to commit this digest must not look read since.
                let mut touches = self.touches.lock().unwrap_or_else(|p| p.into_inner());
                if touches.get(digest) == Some(&at) {
                    touches.remove(digest);
                }
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Notes a read of `digest`, written to the metadata at the next `flush_touches`.
    fn touch(&self, digest: &Digest) -> SystemTime {
        let now = SystemTime::now();
        let mut touches = self.touches.lock().unwrap_or_else(|p| p.into_inner());
        touches.insert(digest.clone(), now);
        now
    }

    /// Held for the whole of an eviction pass (plan and removal). Blocking.
    pub fn pass_guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.pass_lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes pending reads to the metadata. Blocking.
    pub fn flush_touches(&self) -> io::Result<()> {
        let pending: Vec<(Digest, SystemTime)> = {
            let mut touches = self.touches.lock().unwrap_or_else(|p| p.into_inner());
            touches.drain().collect()
        };
        self.meta.touch_objects(&pending)
    }

    /// Reads a small committed object (a manifest) whole.
    pub fn read_small(&self, digest: &Digest, cap: usize) -> io::Result<Option<Vec<u8>>> {
        let Some((f, len)) = self.open_blob(digest)? else {
            return Ok(None);
        };
        if len as usize > cap {
            return Err(io::Error::other(format!(
                "{digest} is larger than {cap} bytes"
            )));
        }
        let mut buf = Vec::with_capacity(len as usize);
        io::Read::read_to_end(&mut io::Read::take(f, cap as u64 + 1), &mut buf)?;
        Ok(Some(buf))
    }

    /// Starts writing an object expected to have `digest`.
    pub fn writer(&self, digest: &Digest) -> io::Result<BlobWriter> {
        let seq = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
        let temp = self
            .tmp
            .join(format!("{}-{}-{seq}", digest.hex(), std::process::id()));
        let file = self.disk.create(&temp)?;
        Ok(BlobWriter {
            file: Some(file),
            temp,
            expected: digest.clone(),
            verifier: Some(Verifier::new(digest.algorithm())),
            hashed: None,
            written: 0,
        })
    }

    /// Verifies, syncs, records and renames into place. The object row is durable before the
    /// rename, so a crash in between leaves a row without a file (a cache miss, fetched again),
    /// never a file the size accounting does not know. On a mismatch nothing is stored and the
    /// error says which digest was expected and which arrived. Blocking.
    pub fn commit(&self, mut w: BlobWriter, repo: &str) -> Result<u64, CommitError> {
        let actual = w.verifier.take().map(Verifier::finish).or(w.hashed.take());
        if actual.as_ref() != Some(&w.expected) {
            return Err(CommitError::Mismatch {
                expected: w.expected.to_string(),
                actual: actual.map(|d| d.to_string()).unwrap_or_default(),
            });
        }
        let mut file = w
            .file
            .take()
            .ok_or_else(|| io::Error::other("writer already closed"))?;
        file.sync_all()?;
        drop(file);
        self.place(&w.expected, &w.temp, w.written, repo)?;
        w.temp = PathBuf::new();
        Ok(w.written)
    }

    /// Moves a synced, verified file into place: its row first (durably), then the rename and
    /// the directory sync, under the lock eviction also takes. A crash in between leaves a row
    /// without a file, which is a miss, never a file the accounting does not know.
    fn place(&self, digest: &Digest, from: &Path, size: u64, repo: &str) -> io::Result<()> {
        let dest = self.blob_path(digest);
        let dir = dest
            .parent()
            .ok_or_else(|| io::Error::other("blob path has no parent"))?;
        std::fs::create_dir_all(dir)?;
        let _guard = self.objects_lock.lock().unwrap_or_else(|p| p.into_inner());
        let replaced = self
            .meta
            .put_object(digest, size, repo, SystemTime::now())?;
        crash_point("after-metadata");
        self.disk.rename(from, &dest)?;
        crash_point("after-rename");
        // The rename is durable only once the directory entry is.
        File::open(dir)?.sync_all()?;
        self.account(size, replaced);
        Ok(())
    }

    /// Writes a small object (a manifest) whose bytes are already in memory. Blocking.
    pub fn put_small(&self, digest: &Digest, bytes: &[u8], repo: &str) -> io::Result<()> {
        if self.blob_path(digest).exists() {
            return Ok(());
        }
        let mut w = self.writer(digest)?;
        w.write(bytes)?;
        self.commit(w, repo).map(|_| ()).map_err(|e| match e {
            CommitError::Io(e) => e,
            other => io::Error::other(other.to_string()),
        })
    }

    /// Keeps `used` the sum of the rows: adds a new row of `size`, less the one it replaced.
    fn account(&self, size: u64, replaced: Option<u64>) {
        self.used.fetch_add(size, Ordering::Relaxed);
        match replaced {
            None => {
                self.objects.fetch_add(1, Ordering::Relaxed);
            }
            Some(old) => {
                self.used.fetch_sub(old.min(self.used()), Ordering::Relaxed);
            }
        }
    }

    /// Removes committed objects: files first (a reader with the file open keeps reading it),
    /// then their rows. An object read since `rows` was taken (its read not yet flushed) is
    /// kept: eviction plans from a snapshot, and a read in between makes it recently used.
    /// Returns the digests removed. Blocking.
    pub fn remove(&self, rows: &[ObjectRow]) -> io::Result<Vec<Digest>> {
        let _guard = self.objects_lock.lock().unwrap_or_else(|p| p.into_inner());
        // Held until the files are gone, so no read can slip between the check and the unlink
        // (see `open_blob`). Opens wait for the unlinks of one pass, which are few and rare.
        let touches = self.touches.lock().unwrap_or_else(|p| p.into_inner());
        let read_since: Vec<bool> = rows
            .iter()
            .map(|r| touches.get(&r.digest).is_some_and(|t| *t > r.last_access))
            .collect();
        let mut digests = Vec::with_capacity(rows.len());
        for (row, _) in rows.iter().zip(read_since).filter(|(_, read)| !read) {
            match std::fs::remove_file(self.blob_path(&row.digest)) {
                Ok(()) => {}
                // A row whose file a crash never renamed into place: only the row goes.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            digests.push(row.digest.clone());
        }
        drop(touches);
        let (count, freed) = self.meta.remove_objects(&digests)?;
        self.used
            .fetch_sub(freed.min(self.used()), Ordering::Relaxed);
        self.objects
            .fetch_sub(count.min(self.object_count()), Ordering::Relaxed);
        Ok(digests)
    }
}

/// Dies on the spot when `CACHALOT_CRASH_POINT` names this point: the crash-safety tests use
/// it to kill the process at instants a `kill -9` cannot hit reliably (between the metadata
/// write and the rename, between the rename and the directory sync).
fn crash_point(name: &str) {
    static POINT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let point = POINT.get_or_init(|| std::env::var("CACHALOT_CRASH_POINT").ok());
    if point.as_deref() == Some(name) {
        std::process::abort();
    }
}

impl Store {
    /// A directory under `tmp/` for staging files, swept with the rest of `tmp/` at the next
    /// start if the process dies before it commits them.
    pub fn staging_dir(&self, name: &str) -> io::Result<PathBuf> {
        let seq = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
        let dir = self
            .tmp
            .join(format!("{name}-{}-{seq}", std::process::id()));
        std::fs::create_dir(&dir)?;
        Ok(dir)
    }

    /// Moves a staged file into place under `digest`, recording it like any commit (row
    /// first, then rename). The caller must have hashed exactly these bytes and found `digest`
    /// (the import path does, while writing the file); an object that is already committed is
    /// kept and the staged file removed. Blocking.
    pub fn commit_verified(&self, digest: &Digest, staged: &Path, repo: &str) -> io::Result<()> {
        let dest = self.blob_path(digest);
        if dest.exists() {
            return std::fs::remove_file(staged);
        }
        File::open(staged)?.sync_all()?;
        let size = std::fs::metadata(staged)?.len();
        self.place(digest, staged, size, repo)
    }
}

/// A blob being written. `Store::commit` verifies and places it; dropping an uncommitted
/// writer removes its temp file, so a failed fill leaves nothing behind.
/// All methods block: call them from a blocking context.
pub struct BlobWriter {
    file: Option<Box<dyn DiskFile>>,
    temp: PathBuf,
    expected: Digest,
    verifier: Option<Verifier>,
    /// The digest computed by someone else, for a writer that does not hash (`hash_elsewhere`).
    hashed: Option<Digest>,
    written: u64,
}

impl BlobWriter {
    /// Stops hashing here: the caller hashes the same bytes itself (in parallel with the
    /// writes) and hands the result to `set_hashed` before commit.
    pub fn hash_elsewhere(&mut self) {
        self.verifier = None;
    }

    /// The digest of every byte written, as computed by the caller.
    pub fn set_hashed(&mut self, digest: Digest) {
        self.hashed = Some(digest);
    }

    /// The temp file that followers read while the fill grows it.
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("writer already closed"))?;
        file.write_all(data)?;
        if let Some(v) = self.verifier.as_mut() {
            v.update(data);
        }
        self.written += data.len() as u64;
        Ok(())
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if !self.temp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("content does not match its digest: expected {expected}, got {actual}")]
    Mismatch { expected: String, actual: String },
    #[error(transparent)]
    Io(#[from] io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_verifies_and_places() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let data = b"hello blob".to_vec();
        let d = Digest::sha256_of(&data);
        let mut w = store.writer(&d).unwrap();
        let temp = w.temp_path().to_path_buf();
        w.write(&data[..3]).unwrap();
        w.write(&data[3..]).unwrap();
        assert_eq!(store.commit(w, "docker.io/x").unwrap(), data.len() as u64);
        assert_eq!((store.used(), store.object_count()), (data.len() as u64, 1));
        assert!(!temp.exists());
        let (_, len) = store.open_blob(&d).unwrap().unwrap();
        assert_eq!(len, data.len() as u64);
        assert!(
            store
                .blob_path(&d)
                .to_string_lossy()
                .contains(&format!("blobs/sha256/{}/", &d.hex()[..2]))
        );
    }

    #[test]
    fn removal_spares_what_was_read_after_the_plan() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (a, b) = (b"first".to_vec(), b"second".to_vec());
        for data in [&a, &b] {
            let mut w = store.writer(&Digest::sha256_of(data)).unwrap();
            w.write(data).unwrap();
            store.commit(w, "docker.io/x").unwrap();
        }
        let planned = store.meta.objects().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        // A read between the plan and the removal makes `a` recently used.
        assert!(store.open_blob(&Digest::sha256_of(&a)).unwrap().is_some());
        let removed = store.remove(&planned).unwrap();
        assert_eq!(removed, vec![Digest::sha256_of(&b)]);
        assert!(store.open_blob(&Digest::sha256_of(&a)).unwrap().is_some());
        assert!(store.open_blob(&Digest::sha256_of(&b)).unwrap().is_none());
        assert_eq!((store.used(), store.object_count()), (a.len() as u64, 1));
    }

    #[test]
    fn mismatch_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = Digest::sha256_of(b"expected");
        let mut w = store.writer(&d).unwrap();
        let temp = w.temp_path().to_path_buf();
        w.write(b"something else").unwrap();
        let e = store.commit(w, "docker.io/x").unwrap_err();
        assert!(e.to_string().contains(&d.to_string()), "{e}");
        assert!(store.open_blob(&d).unwrap().is_none());
        assert!(!temp.exists());
    }

    #[test]
    fn dropped_writer_and_old_temps_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let d = Digest::sha256_of(b"x");
        {
            let store = Store::open(dir.path()).unwrap();
            let mut w = store.writer(&d).unwrap();
            w.write(b"x").unwrap();
            let temp = w.temp_path().to_path_buf();
            drop(w);
            assert!(!temp.exists());
            // A crash leaves a temp file behind; simulate one.
            std::fs::write(dir.path().join("tmp/leftover"), b"partial").unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert!(!dir.path().join("tmp/leftover").exists());
        assert!(store.open_blob(&d).unwrap().is_none());
    }
}
