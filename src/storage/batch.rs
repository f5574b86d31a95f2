//! Many objects made visible at once, for bundle imports: every file is written and verified
//! in a staging directory first, with no sync per file; once the whole batch checks out, one
//! `syncfs` makes their bytes durable, the new ones are renamed into `blobs/`, a second
//! `syncfs` makes the renames durable, and only then is all of it recorded, with everything
//! else the batch brings, in one metadata transaction. Two syncs of the filesystem instead of
//! an fsync per file and per directory and a transaction per object: what made an import of
//! 24,000 small objects take 20 s.
//!
//! After a crash: before the renames, only staging files exist, and the next open sweeps
//! `tmp/`. Between the renames and the commit, `blobs/` holds verified, durable files that no
//! row names (their bytes were synced before any was renamed, so none is a torn write under
//! its digest): nothing is visible (a blob is served only under a linked repository, and a
//! manifest only with its row), a later import of the same bundle places its own verified
//! copy over each of them and records it, and a start-up reconcile may adopt them. After the
//! commit, all of it is there.

use super::FsStore;
use super::fs::crash_point;
use super::meta::{ImportRecords, Meta};
use crate::oci::Digest;
use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Objects staged for one import. Dropped uncommitted, it removes what it staged.
pub struct Batch {
    root: PathBuf,
    dir: PathBuf,
    /// Staged and verified: digest -> size.
    staged: BTreeMap<Digest, u64>,
}

/// Object rows looked up per read transaction when deciding what to place.
const LOOKUP_CHUNK: usize = 4096;

impl Batch {
    /// Starts a batch for the filesystem cache at `root` (opened, so `tmp/` exists and belongs
    /// to this process).
    pub fn begin(root: &Path) -> io::Result<Batch> {
        let dir = root
            .join("tmp")
            .join(format!("import-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Batch {
            root: root.to_path_buf(),
            dir,
            staged: BTreeMap::new(),
        })
    }

    /// Where `digest`'s bytes are staged.
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.dir
            .join(format!("{}-{}", digest.algorithm().as_str(), digest.hex()))
    }

    /// Creates `digest`'s staging file, to be written and then verified by the caller.
    pub fn create(&self, digest: &Digest) -> io::Result<File> {
        File::create(self.path(digest))
    }

    /// Notes that `digest`'s staging file holds `size` bytes that hash to it. Only staged
    /// objects are ever placed.
    pub fn staged(&mut self, digest: Digest, size: u64) {
        self.staged.insert(digest, size);
    }

    /// The size of a staged object.
    pub fn size(&self, digest: &Digest) -> Option<u64> {
        self.staged.get(digest).copied()
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.staged.contains_key(digest)
    }

    /// The digests staged so far.
    pub fn digests(&self) -> impl Iterator<Item = &Digest> {
        self.staged.keys()
    }

    /// Staged objects and their total size.
    pub fn totals(&self) -> (usize, u64) {
        (self.staged.len(), self.staged.values().sum())
    }

    /// Makes the batch visible: syncs the staged files, places every staged object the cache
    /// does not hold (no row, or a row without its file), syncs the renames, then records the placed objects with
    /// the manifests, links and tags (as [`ImportRecords`] has them) in one transaction.
    /// Returns how many objects were placed. Blocking.
    ///
    /// On failure nothing is recorded, and the files this call placed are removed (a crash
    /// leaves them, verified and unrecorded: see the module comment).
    pub fn commit(
        self,
        meta: &Meta,
        manifests: &BTreeMap<Digest, String>,
        links: &[(String, String, Vec<Digest>)],
        tags: &[(String, String, String, String, Digest)],
        referrers: &[super::referrers::ImportedReferrer],
    ) -> io::Result<usize> {
        // The bytes first: nothing is renamed under its digest before it is on disk.
        rustix::fs::syncfs(File::open(&self.dir)?)?;
        let mut placed: Vec<(&Digest, u64)> = Vec::new();
        let result = self.place(meta, &mut placed).and_then(|()| {
            // Then the renames, and only then the records that make it all visible.
            rustix::fs::syncfs(File::open(self.root.join("blobs"))?)?;
            crash_point("import-before-commit");
            let records = ImportRecords {
                objects: &placed,
                manifests,
                links,
                tags,
                referrers,
            };
            meta.put_import(&records, SystemTime::now())
        });
        if let Err(e) = result {
            for (digest, _) in &placed {
                let _ = std::fs::remove_file(FsStore::blob_path_in(&self.root, digest));
            }
            return Err(e);
        }
        Ok(placed.len())
    }

    /// Renames every staged object the cache does not hold into `blobs/`, noting each in
    /// `placed` as it goes.
    fn place<'a>(&'a self, meta: &Meta, placed: &mut Vec<(&'a Digest, u64)>) -> io::Result<()> {
        let staged: Vec<(&Digest, &u64)> = self.staged.iter().collect();
        let mut dirs: HashSet<PathBuf> = HashSet::new();
        for chunk in staged.chunks(LOOKUP_CHUNK) {
            let names: Vec<String> = chunk.iter().map(|(d, _)| d.to_string()).collect();
            let keys: Vec<&str> = names.iter().map(String::as_str).collect();
            let rows = meta.object_rows(&keys)?;
            for ((digest, size), row) in chunk.iter().zip(rows) {
                let dest = FsStore::blob_path_in(&self.root, digest);
                if row.is_some() && dest.exists() {
                    continue;
                }
                let dir = dest
                    .parent()
                    .ok_or_else(|| io::Error::other("blob path has no parent"))?;
                if !dirs.contains(dir) {
                    std::fs::create_dir_all(dir)?;
                    dirs.insert(dir.to_path_buf());
                }
                std::fs::rename(self.path(digest), &dest)?;
                placed.push((digest, **size));
            }
        }
        Ok(())
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
