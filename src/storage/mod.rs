//! Where the cache keeps its bytes and what it knows about them.
//!
//! Blob bytes sit behind one seam, [`BlobStore`]: look up, open for reading (whole or any
//! range, through [`ReadAt`]), begin a fill that yields a [`BlobWriter`], commit a verified
//! fill, remove, list for eviction, and usage. [`FsStore`] keeps them in the cache directory;
//! [`MemoryStore`] keeps them in memory, for tests. One conformance suite
//! (`storage/conformance.rs`) runs against every implementation.
//!
//! What is stored under a digest is always what hashed to it: [`BlobWriter::commit`] takes a
//! [`Verified`], which only the hasher (`oci::Verifier`) can make.
//!
//! [`Store`] is the cache as the mirror holds it: a blob store plus the metadata (`meta.rs`:
//! tags, manifest media types; `listings.rs`: kept tags lists, repositories), and the lock that keeps eviction passes (`evict.rs`) one at a
//! time.

pub mod batch;
mod bucket_scrub;
#[cfg(test)]
mod conformance;
pub mod evict;
mod fs;
pub mod integrity;
pub mod listings;
#[cfg(test)]
mod memory;
pub mod meta;
pub mod referrers;
pub mod s3;
mod s3_http;
pub mod scrub;

use crate::oci::{Digest, Verified};
use parking_lot::Mutex;
use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Arc;

pub use fs::{Disk, DiskFile, FsStore, RealDisk};
#[cfg(test)]
pub(crate) use memory::MemoryStore;
pub use meta::{ImportRecords, Meta, ObjectRow, TagEntry};
pub use s3::{Bucket, BucketRead, S3Store, Upload};

/// Bytes and objects committed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub objects: u64,
}

/// Random-access reads of stored bytes, committed or still being written. Reads never move a
/// shared cursor, so one reader serves any number of responses at once.
pub trait ReadAt: Send + Sync {
    /// Reads up to `buf.len()` bytes at `offset`; 0 at the end of what is there now.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;

    /// The file the bytes are in, when they are in one: plain HTTP/1 sends it with sendfile.
    fn file(&self) -> Option<&Arc<File>> {
        None
    }

    /// Reads exactly `len` bytes at `offset` into a new buffer.
    fn read_bytes(&self, offset: u64, len: usize) -> io::Result<bytes::Bytes> {
        let mut buf = vec![0; len];
        self.read_exact_at(&mut buf, offset)?;
        Ok(buf.into())
    }

    /// Reads exactly `buf.len()` bytes at `offset`; fewer bytes there is an error, never a
    /// short answer passed off as whole.
    fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, offset)? {
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "stored blob shorter than its length",
                    ));
                }
                n => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
            }
        }
        Ok(())
    }
}

/// A file read with `pread`.
pub struct FileReader(Arc<File>);

impl FileReader {
    pub fn new(file: File) -> FileReader {
        FileReader(Arc::new(file))
    }
}

impl ReadAt for FileReader {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(&*self.0, buf, offset)
    }

    fn file(&self) -> Option<&Arc<File>> {
        Some(&self.0)
    }

    /// Reads into the buffer's spare capacity: zeroing every chunk first cost a fifth of the
    /// CPU of serving a cached blob over TLS.
    fn read_bytes(&self, offset: u64, len: usize) -> io::Result<bytes::Bytes> {
        let mut buf = Vec::with_capacity(len);
        while buf.len() < len {
            let at = offset + buf.len() as u64;
            let n = rustix::io::pread(&*self.0, rustix::buffer::spare_capacity(&mut buf), at)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "stored blob shorter than its length",
                ));
            }
        }
        // The allocator may have given more capacity than asked, and pread filled it.
        buf.truncate(len);
        Ok(buf.into())
    }
}

/// A committed object opened for reading. Its bytes stay readable for as long as this lives,
/// even if the object is evicted meanwhile.
#[derive(Clone)]
pub struct Blob {
    pub reader: Arc<dyn ReadAt>,
    pub len: u64,
    /// Whether the bytes are known to hash to the digest. An object adopted without a record
    /// (a lost or rolled-back metadata store) is not until it has been hashed: it is then
    /// served with its last byte held back until the digest matches.
    pub verified: bool,
}

impl Blob {
    /// The whole object in memory: for manifests and other small objects only.
    pub fn read_all(&self, cap: usize) -> io::Result<Vec<u8>> {
        if self.len > cap as u64 {
            return Err(io::Error::other(format!(
                "stored object of {} bytes is larger than {cap}",
                self.len
            )));
        }
        let mut buf = vec![0; self.len as usize];
        self.reader.read_exact_at(&mut buf, 0)?;
        Ok(buf)
    }
}

/// Whether opening an object counts as a read for eviction order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// A client's read: the object becomes the most recently used.
    Read,
    /// Bookkeeping (pins, bundle checks): leaves the eviction order alone.
    Quiet,
}

/// What the mirror needs of blob storage. Every method may block: call them from a blocking
/// context.
pub trait BlobStore: Send + Sync {
    /// The length of a committed object, or `None`. Not a read.
    fn stat(&self, digest: &Digest) -> io::Result<Option<u64>>;

    /// Opens a committed object, or `None` when it is not stored. An object being written is
    /// never visible here before its commit completes.
    fn open(&self, digest: &Digest, access: Access) -> io::Result<Option<Blob>>;

    /// Starts writing an object expected to hash to `digest`. Several writers of one digest
    /// may exist at once; each commit then stores the same bytes.
    fn begin(&self, digest: &Digest) -> io::Result<Box<dyn BlobWriter>>;

    /// Removes committed objects, sparing any read since `rows` were listed (eviction plans
    /// from a listing, and a read in between makes an object recently used). A reader that
    /// holds an object keeps reading it. Returns the digests removed.
    fn remove(&self, rows: &[ObjectRow]) -> io::Result<Vec<Digest>>;

    /// Every committed object, with the reads noted so far.
    fn objects(&self) -> io::Result<Vec<ObjectRow>>;

    /// Bytes and objects committed.
    fn usage(&self) -> Usage;

    /// Whether the store can serve and take objects now.
    fn ready(&self) -> bool;

    /// Makes noted reads durable, so the next start keeps the eviction order.
    fn sync(&self) -> io::Result<()>;

    /// Takes a damaged object out of service (the quarantine, see `integrity.rs`): it is a miss
    /// from now on. A store that cannot tell does nothing.
    fn quarantine(&self, _digest: &Digest, _damage: &integrity::Damage) -> io::Result<()> {
        Ok(())
    }

    /// Records that an unverified object (`Blob::verified` false) of `len` bytes was hashed
    /// whole and matched its digest.
    fn mark_verified(&self, _digest: &Digest, _len: u64) -> io::Result<()> {
        Ok(())
    }

    /// Opens a committed object for a scrub or `verify` (not a read): like `open`, but a file
    /// of the wrong length, quarantined on the way, is reported as such rather than as absent.
    fn open_for_check(&self, digest: &Digest) -> io::Result<integrity::Checked> {
        Ok(match self.open(digest, Access::Quiet)? {
            Some(b) => integrity::Checked::Blob(b),
            None => integrity::Checked::Missing,
        })
    }

    /// What happened to the integrity of the stored objects, for metrics.
    fn counters(&self) -> Option<Arc<integrity::Counters>> {
        None
    }
}

/// An object being written. Dropping it uncommitted aborts: nothing is left behind.
pub trait BlobWriter: Send {
    /// Bytes written so far.
    fn written(&self) -> u64;

    /// Appends bytes. A failed write leaves `written` where it was.
    fn write(&mut self, data: &[u8]) -> io::Result<()>;

    /// Reads the bytes written so far, and keeps reading them after the commit: for the
    /// followers of a fill and for its hasher.
    fn reader(&self) -> io::Result<Arc<dyn ReadAt>>;

    /// Makes what was written durable and lets go of the write handle; nothing more may be
    /// written. Lets an import hold many finished writers without holding a descriptor each.
    fn seal(&mut self) -> io::Result<()>;

    /// Makes the object visible under its digest. `proof` must be for exactly the bytes
    /// written; otherwise nothing is stored and the mismatch is the error.
    fn commit(self: Box<Self>, proof: Verified, repo: &str) -> Result<u64, CommitError>;
}

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error(
        "the proof is for {proof} ({proof_len} bytes), not the {written} bytes written for {expected}"
    )]
    WrongProof {
        expected: Digest,
        written: u64,
        proof: Digest,
        proof_len: u64,
    },
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl From<CommitError> for io::Error {
    fn from(e: CommitError) -> io::Error {
        match e {
            CommitError::Io(e) => e,
            other => io::Error::other(other.to_string()),
        }
    }
}

/// The check every `commit` makes before anything becomes visible.
fn check_proof(expected: &Digest, written: u64, proof: &Verified) -> Result<(), CommitError> {
    if proof.digest() == expected && proof.len() == written {
        Ok(())
    } else {
        Err(CommitError::WrongProof {
            expected: expected.clone(),
            written,
            proof: proof.digest().clone(),
            proof_len: proof.len(),
        })
    }
}

/// Writes a small object whose bytes are in memory (a manifest), proven by `proof`, unless it
/// is stored already. Blocking.
pub fn put_small(
    store: &dyn BlobStore,
    bytes: &[u8],
    proof: Verified,
    repo: &str,
) -> io::Result<()> {
    let digest = proof.digest();
    if store.stat(digest)?.is_some() {
        return Ok(());
    }
    let mut w = store.begin(digest)?;
    w.write(bytes)?;
    w.commit(proof, repo)?;
    Ok(())
}

/// The metadata cache of an import ([`Store::open_for_import`]).
pub const IMPORT_META_CACHE: usize = 32 << 20;

/// The cache: blob bytes behind the seam, and the metadata beside them.
pub struct Store {
    blobs: Arc<dyn BlobStore>,
    meta: Arc<Meta>,
    /// With `[storage] backend = "s3"`: the bucket every replica shares, behind this store.
    bucket: Option<s3::Bucket>,
    /// One eviction pass at a time: a second pass flushing reads between another's listing
    /// and its removal would hide those reads from it.
    pass_lock: Mutex<()>,
}

impl Store {
    /// Opens (creating if needed) the filesystem cache at `root`.
    pub fn open(root: &Path) -> io::Result<Store> {
        Self::open_with(root, Arc::new(RealDisk))
    }

    /// `open`, for a bundle import: a metadata cache of [`IMPORT_META_CACHE`] bytes rather than
    /// redb's default, so the import's one large transaction spills its pages to the file
    /// instead of holding 100 MB of them in memory.
    pub fn open_for_import(root: &Path) -> io::Result<Store> {
        let (fs, meta) =
            FsStore::open_with_cache(root, Arc::new(RealDisk), Some(IMPORT_META_CACHE))?;
        Ok(Store::new(Arc::new(fs), meta))
    }

    /// `open`, with fill writes going through `disk` (tests make them fail).
    pub fn open_with(root: &Path, disk: Arc<dyn Disk>) -> io::Result<Store> {
        let (fs, meta) = FsStore::open(root, disk)?;
        Ok(Store::new(Arc::new(fs), meta))
    }

    pub fn new(blobs: Arc<dyn BlobStore>, meta: Arc<Meta>) -> Store {
        Store {
            blobs,
            meta,
            bucket: None,
            pass_lock: Mutex::new(()),
        }
    }

    /// Puts the shared bucket behind this (local) store.
    pub fn with_bucket(mut self, bucket: Option<s3::Bucket>) -> Store {
        self.bucket = bucket;
        self
    }

    pub fn bucket(&self) -> Option<&s3::Bucket> {
        self.bucket.as_ref()
    }

    pub fn blobs(&self) -> &Arc<dyn BlobStore> {
        &self.blobs
    }

    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    pub fn usage(&self) -> Usage {
        self.blobs.usage()
    }

    /// Held for the whole of an eviction pass (listing and removal). Blocking.
    pub(crate) fn pass_guard(&self) -> parking_lot::MutexGuard<'_, ()> {
        self.pass_lock.lock()
    }
}
