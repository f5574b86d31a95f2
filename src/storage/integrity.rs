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

/// Hashes `len` bytes of `reader` from the start, `on_chunk` hearing each chunk's size (a
/// scrub paces itself there). Which damage, if any, the bytes show against `digest`.
pub fn check(
    reader: &dyn super::ReadAt,
    digest: &Digest,
    len: u64,
    mut on_chunk: impl FnMut(usize),
) -> Option<Damage> {
    let mut v = crate::oci::Verifier::new(digest.algorithm());
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        match reader.read_at(&mut buf, at) {
            Ok(0) => break,
            Ok(n) => {
                v.update(&buf[..n]);
                at += n as u64;
                on_chunk(n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Some(Damage::Unreadable(e.to_string())),
        }
    }
    if at != len {
        return Some(Damage::Size {
            recorded: len,
            found: at,
        });
    }
    let found = v.finish();
    (found != *digest).then_some(Damage::Digest { found })
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

    #[test]
    fn check_names_what_is_wrong() {
        let data = b"some stored bytes".to_vec();
        let d = Digest::sha256_of(&data);
        let r = |b: &[u8]| {
            let mut f = tempfile::tempfile().unwrap();
            std::io::Write::write_all(&mut f, b).unwrap();
            super::super::FileReader::new(f)
        };
        assert_eq!(check(&r(&data), &d, data.len() as u64, |_| {}), None);
        assert_eq!(
            check(&r(&data[..5]), &d, data.len() as u64, |_| {}),
            Some(Damage::Size {
                recorded: data.len() as u64,
                found: 5
            })
        );
        let mut flipped = data.clone();
        flipped[3] ^= 1;
        assert_eq!(
            check(&r(&flipped), &d, data.len() as u64, |_| {}),
            Some(Damage::Digest {
                found: Digest::sha256_of(&flipped)
            })
        );
    }
}
