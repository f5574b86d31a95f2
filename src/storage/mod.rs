//! The on-disk cache: content-addressed blob files, written two-phase (temp file, fsync,
//! rename), and the crash-safe metadata store beside them.
//!
//! Layout under `cache.dir`:
//! `VERSION`, `blobs/<alg>/<2 hex>/<hex>` (blobs and manifests alike), `tmp/` (fills in
//! progress; swept at start), `meta.redb` (tags and manifest media types).

pub mod meta;

use crate::oci::{Digest, Verifier};
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub use meta::{Meta, TagEntry};

const LAYOUT_VERSION: &str = "1\n";

/// The filesystem cache.
pub struct Store {
    root: PathBuf,
    tmp: PathBuf,
    pub meta: Meta,
}

static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

impl Store {
    /// Opens (creating if needed) the cache at `root`, and removes temp files left by fills that
    /// a crash or kill interrupted: they were never renamed, so nothing refers to them.
    pub fn open(root: &Path) -> io::Result<Store> {
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
        let tmp = root.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        let meta = Meta::open(&root.join("meta.redb"))?;
        Ok(Store {
            root: root.to_path_buf(),
            tmp,
            meta,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a committed object with this digest lives.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root
            .join("blobs")
            .join(digest.algorithm().as_str())
            .join(&hex[..2])
            .join(hex)
    }

    /// Opens a committed object: the file and its length, or `None` when it is not cached.
    pub fn open_blob(&self, digest: &Digest) -> io::Result<Option<(File, u64)>> {
        match File::open(self.blob_path(digest)) {
            Ok(f) => {
                let len = f.metadata()?.len();
                Ok(Some((f, len)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
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
        let file = File::create_new(&temp)?;
        Ok(BlobWriter {
            file: Some(file),
            temp,
            dest: self.blob_path(digest),
            expected: digest.clone(),
            verifier: Some(Verifier::new(digest.algorithm())),
            written: 0,
        })
    }

    /// Writes a small object (a manifest) whose bytes are already in memory and verified by the
    /// caller against `digest`. Blocking: call from a blocking context.
    pub fn put_small(&self, digest: &Digest, bytes: &[u8]) -> io::Result<()> {
        if self.blob_path(digest).exists() {
            return Ok(());
        }
        let mut w = self.writer(digest)?;
        w.write(bytes)?;
        w.commit().map(|_| ()).map_err(|e| match e {
            CommitError::Io(e) => e,
            other => io::Error::other(other.to_string()),
        })
    }
}

/// A blob being written. `commit` verifies the digest, fsyncs and renames into place; dropping
/// an uncommitted writer removes its temp file, so a failed fill leaves nothing behind.
/// All methods block: call them from a blocking context.
pub struct BlobWriter {
    file: Option<File>,
    temp: PathBuf,
    dest: PathBuf,
    expected: Digest,
    verifier: Option<Verifier>,
    written: u64,
}

impl BlobWriter {
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

    /// Verifies, syncs and renames into place. On a mismatch nothing is stored and the error
    /// says which digest was expected and which arrived.
    pub fn commit(mut self) -> Result<u64, CommitError> {
        let actual = self.verifier.take().map(Verifier::finish);
        if actual.as_ref() != Some(&self.expected) {
            return Err(CommitError::Mismatch {
                expected: self.expected.to_string(),
                actual: actual.map(|d| d.to_string()).unwrap_or_default(),
            });
        }
        let file = self
            .file
            .take()
            .ok_or_else(|| io::Error::other("writer already closed"))?;
        file.sync_all()?;
        drop(file);
        let dir = self
            .dest
            .parent()
            .ok_or_else(|| io::Error::other("blob path has no parent"))?;
        std::fs::create_dir_all(dir)?;
        std::fs::rename(&self.temp, &self.dest)?;
        // The rename is durable only once the directory entry is.
        File::open(dir)?.sync_all()?;
        self.temp = PathBuf::new();
        Ok(self.written)
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
        assert_eq!(w.commit().unwrap(), data.len() as u64);
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
    fn mismatch_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = Digest::sha256_of(b"expected");
        let mut w = store.writer(&d).unwrap();
        let temp = w.temp_path().to_path_buf();
        w.write(b"something else").unwrap();
        let e = w.commit().unwrap_err();
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
