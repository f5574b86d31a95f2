//! Integrity at rest: what the cache does with a stored object whose bytes no longer match its
//! digest (cut short, a flipped byte, a file nobody recorded), and the counters that say so.
//!
//! A damaged object is never served and never deleted outright: it is moved to `quarantine/`
//! in the cache directory, for a person to look at, and the digest becomes a miss, so the next
//! pull fetches it again. The quarantine keeps within [`KEEP_FOR`] and [`KEEP_BYTES`], oldest
//! first out, so a disk that keeps damaging files cannot fill the cache directory with them.

use crate::oci::Digest;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// Quarantined files older than this are removed.
pub const KEEP_FOR: Duration = Duration::from_secs(7 * 24 * 3600);
/// The quarantine holds at most this many bytes; the oldest files go first.
pub const KEEP_BYTES: u64 = 1 << 30;

/// What is wrong with a stored object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Damage {
    /// Its length differs from the recorded one.
    Size { recorded: u64, found: u64 },
    /// Its bytes hash to another digest.
    Digest { found: Digest },
    /// It could not be read to the end.
    Unreadable(String),
}

impl Damage {
    /// The `reason` label of `cachalot_quarantined_total`.
    pub fn reason(&self) -> Reason {
        match self {
            Damage::Size { .. } => Reason::Size,
            Damage::Digest { .. } => Reason::Digest,
            Damage::Unreadable(_) => Reason::Unreadable,
        }
    }
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Damage::Size { recorded, found } => {
                write!(f, "size {found} bytes, recorded {recorded}")
            }
            Damage::Digest { found } => write!(f, "content hashes to {found}"),
            Damage::Unreadable(e) => write!(f, "unreadable: {e}"),
        }
    }
}

/// A stored object opened for a check.
pub enum Checked {
    Blob(super::Blob),
    /// Not stored (any more).
    Missing,
    /// Its file had the wrong length; it is quarantined already.
    Damaged(Damage),
}

/// Why an object was quarantined (a closed set, for metric labels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Size,
    Digest,
    Unreadable,
}

impl Reason {
    pub const ALL: [Reason; 3] = [Reason::Size, Reason::Digest, Reason::Unreadable];

    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::Size => "size",
            Reason::Digest => "digest",
            Reason::Unreadable => "unreadable",
        }
    }
}

/// Counters of everything integrity-related that happened to this cache since it was opened;
/// `/metrics` reads them at scrape time.
#[derive(Debug, Default)]
pub struct Counters {
    /// Objects quarantined, by [`Reason`] (indexed as `Reason::ALL`).
    pub quarantined: [AtomicU64; 3],
    /// Objects adopted at start without a record (unverified until hashed).
    pub adopted: AtomicU64,
    /// Records dropped at start because their file was gone.
    pub dropped: AtomicU64,
    /// Found damaged by a scrub pass or `verify`.
    pub scrub_corrupt: AtomicU64,
    /// Bytes and objects a scrub pass or `verify` hashed.
    pub scrub_bytes: AtomicU64,
    pub scrub_objects: AtomicU64,
    /// When the last complete pass ended, in seconds since the epoch; 0: none yet.
    pub scrub_last_pass: AtomicU64,
}

impl Counters {
    pub fn quarantined(&self, r: Reason) -> u64 {
        self.quarantined[r as usize].load(Ordering::Relaxed)
    }
}

/// The `quarantine/` directory of a cache.
pub struct Quarantine {
    dir: PathBuf,
}

impl Quarantine {
    pub fn new(root: &Path) -> Quarantine {
        Quarantine {
            dir: root.join("quarantine"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Moves the file at `path` (the object `digest`) into the quarantine, logs it, and trims
    /// the quarantine to its bounds. A file that cannot be moved is removed: a damaged object
    /// must not stay where it would be served.
    pub fn take(&self, path: &Path, digest: &Digest, damage: &Damage) -> io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let stamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let dest = self.dir.join(format!(
            "{}-{}-{stamp}",
            digest.algorithm().as_str(),
            digest.hex()
        ));
        match std::fs::rename(path, &dest) {
            Ok(()) => {
                tracing::error!(digest = %digest, damage = %damage, file = %dest.display(), "damaged object quarantined; it will be fetched again");
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                tracing::error!(digest = %digest, damage = %damage, error = %e, "damaged object could not be quarantined; removed");
                std::fs::remove_file(path)?;
            }
        }
        if let Err(e) = self.trim(SystemTime::now()) {
            tracing::warn!(error = %e, dir = %self.dir.display(), "could not trim the quarantine");
        }
        Ok(())
    }

    /// Removes what is older than [`KEEP_FOR`], then the oldest until at most [`KEEP_BYTES`]
    /// are left.
    pub fn trim(&self, now: SystemTime) -> io::Result<()> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let m = entry.metadata()?;
            if m.is_file() {
                files.push((m.modified().unwrap_or(now), m.len(), entry.path()));
            }
        }
        files.sort();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        for (at, len, path) in files {
            let old = now.duration_since(at).unwrap_or_default() > KEEP_FOR;
            if old || total > KEEP_BYTES {
                std::fs::remove_file(&path)?;
                total -= len;
            }
        }
        Ok(())
    }
}

/// What hashing a stored object found.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Whole,
    Damaged(Damage),
    /// The caller asked to stop midway.
    Stopped,
}

impl Verdict {
    pub fn damage(self) -> Option<Damage> {
        match self {
            Verdict::Damaged(d) => Some(d),
            Verdict::Whole | Verdict::Stopped => None,
        }
    }
}

/// Hashes `len` bytes of `reader` from the start; `on_chunk` hears each chunk's size (a scrub
/// paces itself there) and answers whether to go on.
pub fn check(
    reader: &dyn super::ReadAt,
    digest: &Digest,
    len: u64,
    mut on_chunk: impl FnMut(usize) -> bool,
) -> Verdict {
    let mut v = crate::oci::Verifier::new(digest.algorithm());
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        match reader.read_at(&mut buf, at) {
            Ok(0) => break,
            Ok(n) => {
                v.update(&buf[..n]);
                at += n as u64;
                if !on_chunk(n) {
                    return Verdict::Stopped;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Verdict::Damaged(Damage::Unreadable(e.to_string())),
        }
    }
    if at != len {
        return Verdict::Damaged(Damage::Size {
            recorded: len,
            found: at,
        });
    }
    let found = v.finish();
    if found == *digest {
        Verdict::Whole
    } else {
        Verdict::Damaged(Damage::Digest { found })
    }
}

/// Opens the metadata store at `path`; one that cannot be read (damaged) is moved aside to
/// `meta.redb.damaged-<seconds>` for a person to look at, and a new one is started, which
/// [`reconcile`] then fills from the files.
pub fn open_meta(path: &Path, cache_bytes: Option<usize>) -> io::Result<super::Meta> {
    match super::Meta::open_with_cache(path, cache_bytes) {
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            let stamp = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let aside = path.with_extension(format!("redb.damaged-{stamp}"));
            std::fs::rename(path, &aside)?;
            tracing::error!(error = %e, moved_to = %aside.display(), "the metadata store is damaged; starting a new one from the files on disk");
            super::Meta::open_with_cache(path, cache_bytes)
        }
        other => other,
    }
}

/// What [`reconcile`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    pub adopted: u64,
    pub adopted_bytes: u64,
    pub dropped: u64,
}

/// Brings the object rows in step with the files under `root/blobs/<alg>/<2 hex>/<hex>`: a
/// file without a row (the metadata was lost, or restored from an older backup) is adopted as
/// unverified, its digest from its name, its size from its length, its last use from its
/// times; a row without a file is dropped. Files whose names are not digests are left alone.
/// Blocking; reads every directory of `blobs/` once.
pub fn reconcile(root: &Path, meta: &super::Meta) -> io::Result<Reconciled> {
    let mut files: std::collections::HashMap<Digest, (u64, SystemTime)> = Default::default();
    let blobs = root.join("blobs");
    for alg in read_dir_or_empty(&blobs)? {
        let alg = alg?;
        let Some(alg_name) = alg.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        for fan in read_dir_or_empty(&alg.path())? {
            for file in read_dir_or_empty(&fan?.path())? {
                let file = file?;
                let Some(name) = file.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                let Ok(digest) = format!("{alg_name}:{name}").parse::<Digest>() else {
                    continue;
                };
                let m = file.metadata()?;
                if !m.is_file() {
                    continue;
                }
                let times = [m.modified(), m.accessed()];
                let last = times
                    .into_iter()
                    .flatten()
                    .max()
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                files.insert(digest, (m.len(), last));
            }
        }
    }
    let rows = meta.objects()?;
    let recorded: std::collections::HashSet<&Digest> = rows.iter().map(|r| &r.digest).collect();
    let gone: Vec<Digest> = rows
        .iter()
        .filter(|r| !files.contains_key(&r.digest))
        .map(|r| r.digest.clone())
        .collect();
    let adopt: Vec<(Digest, u64, SystemTime)> = files
        .iter()
        .filter(|(d, _)| !recorded.contains(d))
        .map(|(d, (len, last))| (d.clone(), *len, *last))
        .collect();
    if !gone.is_empty() {
        meta.remove_objects(&gone)?;
    }
    if !adopt.is_empty() {
        meta.adopt(&adopt)?;
    }
    let done = Reconciled {
        adopted: adopt.len() as u64,
        adopted_bytes: adopt.iter().map(|a| a.1).sum(),
        dropped: gone.len() as u64,
    };
    if done != Reconciled::default() {
        tracing::warn!(
            adopted = done.adopted,
            adopted_bytes = done.adopted_bytes,
            dropped = done.dropped,
            "metadata out of step with blobs/: files without a record adopted (unverified, hashed when first served), records without a file dropped"
        );
    }
    Ok(done)
}

fn read_dir_or_empty(
    dir: &Path,
) -> io::Result<Box<dyn Iterator<Item = io::Result<std::fs::DirEntry>>>> {
    match std::fs::read_dir(dir) {
        Ok(rd) => Ok(Box::new(rd)),
        Err(e)
            if e.kind() == io::ErrorKind::NotFound || e.kind() == io::ErrorKind::NotADirectory =>
        {
            Ok(Box::new(std::iter::empty()))
        }
        Err(e) => Err(e),
    }
}

/// Whether a verified copy of `digest` must be written (an import): it is not stored, or what
/// is stored is damaged (quarantined now, so the copy takes its place and re-importing a
/// bundle repairs the cache). A stored object is hashed whole. Blocking.
pub fn needs_storing(store: &dyn super::BlobStore, digest: &Digest) -> io::Result<bool> {
    match store.open_for_check(digest)? {
        Checked::Missing | Checked::Damaged(_) => Ok(true),
        Checked::Blob(b) => match check(&*b.reader, digest, b.len, |_| true) {
            Verdict::Damaged(d) => {
                store.quarantine(digest, &d)?;
                Ok(true)
            }
            Verdict::Whole | Verdict::Stopped => {
                if !b.verified {
                    store.mark_verified(digest, b.len)?;
                }
                Ok(false)
            }
        },
    }
}

/// [`check`] for bytes in memory (a manifest).
pub fn check_bytes(bytes: &[u8], digest: &Digest) -> Option<Damage> {
    let mut v = crate::oci::Verifier::new(digest.algorithm());
    v.update(bytes);
    let found = v.finish();
    (found != *digest).then_some(Damage::Digest { found })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quarantine_keeps_within_its_bounds_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let q = Quarantine::new(dir.path());
        std::fs::create_dir_all(q.dir()).unwrap();
        let now = SystemTime::now();
        let put = |name: &str, len: u64, age: Duration| {
            let p = q.dir().join(name);
            let f = std::fs::File::create(&p).unwrap();
            f.set_len(len).unwrap();
            f.set_modified(now - age).unwrap();
        };
        put("week-old", 10, KEEP_FOR + Duration::from_secs(60));
        put("older", KEEP_BYTES / 2 + 1, Duration::from_secs(300));
        put("newer", KEEP_BYTES / 2, Duration::from_secs(200));
        put("newest", 10, Duration::from_secs(100));
        q.trim(now).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(q.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["newer", "newest"]);
    }

    fn commit(store: &dyn super::super::BlobStore, data: &[u8]) -> Digest {
        let d = Digest::sha256_of(data);
        let mut v = crate::oci::Verifier::new(crate::oci::Algorithm::Sha256);
        v.update(data);
        let mut w = store.begin(&d).unwrap();
        w.write(data).unwrap();
        w.commit(v.verify(&d).unwrap(), "up/team/app").unwrap();
        d
    }

    fn open(root: &Path) -> super::super::Store {
        super::super::Store::open(root).unwrap()
    }

    /// The metadata lost, rolled back or damaged: every file on disk is accounted for again,
    /// the ones without a record unverified, and records of files gone are dropped.
    #[test]
    fn lost_rolled_back_or_damaged_metadata_is_rebuilt_from_the_files() {
        use super::super::Access;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let backup = root.join("backup.redb");
        let (a, b) = {
            let store = open(root);
            let a = commit(&**store.blobs(), &[1u8; 1000]);
            std::fs::copy(root.join("meta.redb"), &backup).unwrap();
            let b = commit(&**store.blobs(), &[2u8; 3000]);
            (a, b)
        };
        // Rolled back to before `b`, and `a`'s file removed meanwhile.
        std::fs::remove_file(crate::storage::FsStore::blob_path_in(root, &a)).unwrap();
        std::fs::copy(&backup, root.join("meta.redb")).unwrap();
        {
            let store = open(root);
            let u = store.usage();
            assert_eq!((u.objects, u.bytes), (1, 3000));
            let blob = store.blobs().open(&b, Access::Read).unwrap().unwrap();
            assert!(!blob.verified, "adopted unverified");
            assert_eq!(store.meta().unverified().unwrap(), vec![b.clone()]);
            let c = store.blobs().counters().unwrap();
            assert_eq!(c.adopted.load(Ordering::Relaxed), 1);
            assert_eq!(c.dropped.load(Ordering::Relaxed), 1);
            store.blobs().mark_verified(&b, 3000).unwrap();
        }
        // Verified stays verified across a start.
        assert!(
            open(root)
                .blobs()
                .open(&b, Access::Read)
                .unwrap()
                .unwrap()
                .verified
        );
        // Lost altogether.
        std::fs::remove_file(root.join("meta.redb")).unwrap();
        let store = open(root);
        assert_eq!(store.usage().bytes, 3000);
        drop(store);
        // Damaged: set aside, rebuilt.
        std::fs::write(root.join("meta.redb"), vec![0x5a; 8192]).unwrap();
        let store = open(root);
        assert_eq!(store.usage().bytes, 3000);
        let aside = std::fs::read_dir(root)
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("meta.redb.damaged-")
            })
            .count();
        assert_eq!(aside, 1);
        drop(store);
        // Cut short (a copy interrupted): opens, whether redb repairs it or it is set aside.
        let len = std::fs::metadata(root.join("meta.redb")).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(root.join("meta.redb"))
            .unwrap()
            .set_len(len / 3)
            .unwrap();
        assert_eq!(open(root).usage().bytes, 3000);
    }

    #[test]
    fn check_names_what_is_wrong() {
        let data = b"some stored bytes".to_vec();
        let d = Digest::sha256_of(&data);
        let r = |b: &[u8]| {
            let mut f = tempfile::tempfile().unwrap();
            std::io::Write::write_all(&mut f, b).unwrap();
            super::super::FileReader::new(f)
        };
        let go = |_| true;
        assert_eq!(check(&r(&data), &d, data.len() as u64, go), Verdict::Whole);
        assert_eq!(
            check(&r(&data[..5]), &d, data.len() as u64, go),
            Verdict::Damaged(Damage::Size {
                recorded: data.len() as u64,
                found: 5
            })
        );
        let mut flipped = data.clone();
        flipped[3] ^= 1;
        assert_eq!(
            check(&r(&flipped), &d, data.len() as u64, go),
            Verdict::Damaged(Damage::Digest {
                found: Digest::sha256_of(&flipped)
            })
        );
        assert_eq!(
            check(&r(&data), &d, data.len() as u64, |_| false),
            Verdict::Stopped
        );
    }
}
