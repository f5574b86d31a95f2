//! The in-memory blob store, for tests: the same contract as the filesystem store (visible only
//! once committed, aborted fills leave nothing, readers keep removed objects), no disk.

use super::{
    Access, Blob, BlobStore, BlobWriter, CommitError, ObjectRow, ReadAt, Usage, check_proof,
};
use crate::oci::{Digest, Verified};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::SystemTime;

#[derive(Default)]
pub(crate) struct MemoryStore {
    objects: Arc<Mutex<HashMap<Digest, Entry>>>,
}

struct Entry {
    bytes: Arc<Bytes>,
    last_access: SystemTime,
    repo: String,
}

/// Bytes shared by an object and its readers; a growing fill's buffer is the same type, so a
/// follower's reader reads the committed bytes once the fill is done.
#[derive(Default)]
struct Bytes(RwLock<Vec<u8>>);

impl ReadAt for Bytes {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let data = self.0.read();
        let start = usize::try_from(offset).map_or(data.len(), |o| o.min(data.len()));
        let n = buf.len().min(data.len() - start);
        buf[..n].copy_from_slice(&data[start..start + n]);
        Ok(n)
    }
}

impl MemoryStore {
    pub(crate) fn new() -> MemoryStore {
        MemoryStore::default()
    }
}

impl BlobStore for MemoryStore {
    fn stat(&self, digest: &Digest) -> io::Result<Option<u64>> {
        Ok(self
            .objects
            .lock()
            .get(digest)
            .map(|e| e.bytes.0.read().len() as u64))
    }

    fn open(&self, digest: &Digest, access: Access) -> io::Result<Option<Blob>> {
        let mut objects = self.objects.lock();
        let Some(e) = objects.get_mut(digest) else {
            return Ok(None);
        };
        if access == Access::Read {
            e.last_access = SystemTime::now();
        }
        let len = e.bytes.0.read().len() as u64;
        Ok(Some(Blob {
            reader: e.bytes.clone(),
            len,
            verified: true,
        }))
    }

    fn begin(&self, digest: &Digest) -> io::Result<Box<dyn BlobWriter>> {
        Ok(Box::new(MemoryWriter {
            objects: self.objects.clone(),
            digest: digest.clone(),
            bytes: Arc::default(),
            sealed: false,
        }))
    }

    fn remove(&self, rows: &[ObjectRow]) -> io::Result<Vec<Digest>> {
        let mut objects = self.objects.lock();
        let mut removed = Vec::new();
        for row in rows {
            let read_since = objects
                .get(&row.digest)
                .is_some_and(|e| e.last_access > row.last_access);
            if !read_since && objects.remove(&row.digest).is_some() {
                removed.push(row.digest.clone());
            }
        }
        Ok(removed)
    }

    fn objects(&self) -> io::Result<Vec<ObjectRow>> {
        Ok(self
            .objects
            .lock()
            .iter()
            .map(|(digest, e)| ObjectRow {
                digest: digest.clone(),
                size: e.bytes.0.read().len() as u64,
                last_access: e.last_access,
                repo: e.repo.clone(),
            })
            .collect())
    }

    fn usage(&self) -> Usage {
        let objects = self.objects.lock();
        Usage {
            bytes: objects
                .values()
                .map(|e| e.bytes.0.read().len() as u64)
                .sum(),
            objects: objects.len() as u64,
        }
    }

    fn ready(&self) -> bool {
        true
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}

/// A fill into a buffer of its own, moved into the map at commit; dropped, it is just freed.
struct MemoryWriter {
    objects: Arc<Mutex<HashMap<Digest, Entry>>>,
    digest: Digest,
    bytes: Arc<Bytes>,
    sealed: bool,
}

impl BlobWriter for MemoryWriter {
    fn written(&self) -> u64 {
        self.bytes.0.read().len() as u64
    }

    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        if self.sealed {
            return Err(io::Error::other("writer already sealed"));
        }
        self.bytes.0.write().extend_from_slice(data);
        Ok(())
    }

    fn reader(&self) -> io::Result<Arc<dyn ReadAt>> {
        Ok(self.bytes.clone())
    }

    fn seal(&mut self) -> io::Result<()> {
        self.sealed = true;
        Ok(())
    }

    fn commit(self: Box<Self>, proof: Verified, repo: &str) -> Result<u64, CommitError> {
        let written = self.written();
        check_proof(&self.digest, written, &proof)?;
        self.objects.lock().insert(
            self.digest.clone(),
            Entry {
                bytes: self.bytes.clone(),
                last_access: SystemTime::now(),
                repo: repo.to_owned(),
            },
        );
        Ok(written)
    }
}
