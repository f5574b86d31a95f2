//! Hashes a fill on the blocking pool, behind the writes, so the fill never waits for the hash:
//! the transfer runs at the upstream's pace and the hash at the CPU's, and a cold pull costs
//! about the longer of the two.
//!
//! Each chunk the fill has written is handed over in its own buffer, to be hashed while it is
//! still in the CPU's cache, as long as the hash keeps up: at most [`IN_MEMORY`] chunks wait for
//! it. Past that the fill only says how far the file is written, keeps its buffer, and the hash
//! reads those bytes back from the store when it gets to them. So memory stays bounded however far
//! the hash falls behind, and the fill never blocks on it: a bounded queue that the fill waited on
//! made the two stall each other (on two cores the hash sat idle for a third of a cold pull while
//! the fill was stalled behind it), and reading every byte back cost one more pass over it
//! (issue 16).

use crate::oci::{Algorithm, Verifier};
use crate::storage::ReadAt;
use bytes::BytesMut;
use parking_lot::Mutex;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, TryRecvError};
use tokio::sync::oneshot;

/// Bytes read back and hashed at a time.
const READ: usize = 1 << 20;

/// Chunks handed to the hash in memory and not hashed yet, at most.
const IN_MEMORY: usize = 2;

enum Msg {
    /// The file holds this many bytes of the body.
    Written(u64),
    /// The body's bytes from this offset on, just written to the file: hashed from this buffer,
    /// which then goes back to the fill.
    Chunk(u64, BytesMut),
    /// The hash state after the first `at` bytes.
    Snapshot(u64, oneshot::Sender<Verifier>),
}

pub(super) struct Hasher {
    tx: mpsc::Sender<Msg>,
    /// Chunks sent in memory and not hashed yet.
    queued: Arc<AtomicUsize>,
    /// Buffers of hashed chunks, for the fill to fill again (at most `IN_MEMORY`).
    spare: Arc<Mutex<Vec<BytesMut>>>,
    done: tokio::task::JoinHandle<io::Result<Verifier>>,
}

struct Reader {
    file: Arc<dyn ReadAt>,
    buf: Vec<u8>,
    verifier: Verifier,
    hashed: u64,
}

impl Reader {
    /// Hashes the next stretch of the file, at most `READ` bytes and never past `end`.
    fn step(&mut self, end: u64) -> io::Result<()> {
        if self.buf.is_empty() {
            // Only a hash that fell behind reads back; one that keeps up never needs the buffer.
            self.buf = vec![0; READ];
        }
        let want = (end - self.hashed).min(READ as u64) as usize;
        let n = self.file.read_at(&mut self.buf[..want], self.hashed)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("fill file ends at {} of {end} written bytes", self.hashed),
            ));
        }
        self.verifier.update(&self.buf[..n]);
        self.hashed += n as u64;
        Ok(())
    }

    fn hash_to(&mut self, end: u64) -> io::Result<()> {
        while self.hashed < end {
            self.step(end)?;
        }
        Ok(())
    }

    /// Hashes `chunk`, the body's bytes from `at` on, after reading back what comes before it.
    fn chunk(&mut self, at: u64, chunk: &[u8]) -> io::Result<()> {
        self.hash_to(at)?;
        let skip = (self.hashed - at) as usize;
        if let Some(rest) = chunk.get(skip..) {
            self.verifier.update(rest);
            self.hashed += rest.len() as u64;
        }
        Ok(())
    }
}

/// The hash thread: works through the messages in order, reading back what was only reported.
fn hash(
    algorithm: Algorithm,
    file: Arc<dyn ReadAt>,
    rx: mpsc::Receiver<Msg>,
    queued: &AtomicUsize,
    spare: &Mutex<Vec<BytesMut>>,
) -> io::Result<Verifier> {
    let mut r = Reader {
        file,
        buf: Vec::new(),
        verifier: Verifier::new(algorithm),
        hashed: 0,
    };
    let mut end = 0;
    loop {
        // Hash while there is something to hash, looking at the messages in between; sleep on
        // them only when caught up.
        let msg = if r.hashed < end {
            match rx.try_recv() {
                Ok(m) => m,
                Err(TryRecvError::Empty) => {
                    r.step(end)?;
                    continue;
                }
                Err(TryRecvError::Disconnected) => break,
            }
        } else {
            match rx.recv() {
                Ok(m) => m,
                Err(_) => break,
            }
        };
        match msg {
            Msg::Written(n) => end = end.max(n),
            Msg::Chunk(at, mut chunk) => {
                let hashed = r.chunk(at, &chunk);
                end = end.max(at + chunk.len() as u64);
                chunk.clear();
                spare.lock().push(chunk);
                queued.fetch_sub(1, Ordering::AcqRel);
                hashed?;
            }
            // Past what was reported the file may hold anything: no state for that.
            Msg::Snapshot(at, _) if at > end => {}
            Msg::Snapshot(at, reply) => {
                r.hash_to(at)?;
                let _ = reply.send(r.verifier.clone());
            }
        }
    }
    r.hash_to(end)?;
    Ok(r.verifier)
}

impl Hasher {
    /// Starts hashing the fill's body; `file` is its object as it grows, read back for the
    /// stretches that were only reported written.
    pub(super) fn start(algorithm: Algorithm, file: Arc<dyn ReadAt>) -> Hasher {
        let (tx, rx) = mpsc::channel();
        let spare = Arc::new(Mutex::new(Vec::new()));
        let queued = Arc::new(AtomicUsize::new(0));
        let (q, s) = (queued.clone(), spare.clone());
        let done = tokio::task::spawn_blocking(move || hash(algorithm, file, rx, &q, &s));
        Hasher {
            tx,
            queued,
            spare,
            done,
        }
    }

    /// `chunk`, the body's bytes from `at` on, is now in the file. Never waits: the chunk goes to
    /// the hash if few enough are waiting for it, else the hash will read it back. Returns an empty
    /// buffer for the next chunk.
    pub(super) fn wrote(&self, at: u64, mut chunk: BytesMut) -> BytesMut {
        if self.queued.load(Ordering::Acquire) >= IN_MEMORY {
            self.written(at + chunk.len() as u64);
            chunk.clear();
            return chunk;
        }
        let capacity = chunk.capacity();
        self.queued.fetch_add(1, Ordering::AcqRel);
        if let Err(mpsc::SendError(msg)) = self.tx.send(Msg::Chunk(at, chunk)) {
            // The hash has stopped (its error comes out of `finish`): keep the buffer.
            self.queued.fetch_sub(1, Ordering::AcqRel);
            if let Msg::Chunk(_, mut chunk) = msg {
                chunk.clear();
                return chunk;
            }
        }
        let spare = self.spare.lock().pop();
        spare.unwrap_or_else(|| BytesMut::with_capacity(capacity))
    }

    /// The file now holds the first `n` bytes of the body.
    fn written(&self, n: u64) {
        let _ = self.tx.send(Msg::Written(n));
    }

    /// The hash state after the first `at` bytes (at most what `written` reported).
    pub(super) async fn snapshot(&self, at: u64) -> Option<Verifier> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Msg::Snapshot(at, reply)).ok()?;
        rx.await.ok()
    }

    /// The hash of every byte reported written, or why the file could not be read back.
    pub(super) async fn finish(self) -> io::Result<Verifier> {
        drop(self.tx);
        match self.done.await {
            Ok(v) => v,
            Err(e) => Err(io::Error::other(format!("hash task failed: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Digest;
    use crate::storage::FileReader;
    use std::io::Write;

    fn reader(tmp: &tempfile::NamedTempFile) -> Arc<dyn ReadAt> {
        Arc::new(FileReader::new(tmp.reopen().unwrap()))
    }

    #[tokio::test]
    async fn hashes_what_is_written_and_snapshots_midway() {
        let mut tmp = tempfile::NamedTempFile::new().unwrap();
        let h = Hasher::start(Algorithm::Sha256, reader(&tmp));
        // Parts larger than one read, and one that is not a multiple of it.
        let parts: Vec<Vec<u8>> = (0..6u8)
            .map(|i| vec![i; READ + 1000 * i as usize])
            .collect();
        let mut written = 0;
        for p in &parts[..3] {
            tmp.write_all(p).unwrap();
            written += p.len() as u64;
            h.written(written);
        }
        let mid = h.snapshot(written).await.unwrap().finish();
        for p in &parts[3..] {
            tmp.write_all(p).unwrap();
            written += p.len() as u64;
            h.written(written);
        }
        // Bytes past the last report are not the body's.
        tmp.write_all(b"not reported").unwrap();
        assert_eq!(
            h.finish().await.unwrap().finish(),
            Digest::sha256_of(&parts.concat())
        );
        assert_eq!(mid, Digest::sha256_of(&parts[..3].concat()));
    }

    /// Waits until the hash has taken every chunk handed to it.
    async fn drained(h: &Hasher) {
        while h.queued.load(Ordering::Acquire) > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    #[tokio::test]
    async fn chunks_are_hashed_from_their_buffers_while_the_hash_keeps_up() {
        // The file holds other bytes of the same length: a digest of the chunks proves they were
        // not read back.
        let parts: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; READ + 77 * i as usize]).collect();
        let mut tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.write_all(&vec![0xee; parts.concat().len()]).unwrap();
        let h = Hasher::start(Algorithm::Sha256, reader(&tmp));
        let mut at = 0;
        for p in &parts {
            drained(&h).await;
            let mut buf = BytesMut::from(&p[..]);
            buf = h.wrote(at, buf);
            assert!(buf.is_empty());
            at += p.len() as u64;
        }
        let mid = h.snapshot(at).await.unwrap().finish();
        assert_eq!(mid, Digest::sha256_of(&parts.concat()));
        assert_eq!(
            h.finish().await.unwrap().finish(),
            Digest::sha256_of(&parts.concat())
        );
    }

    #[tokio::test]
    async fn a_hash_that_falls_behind_reads_the_rest_back_and_keeps_no_more_chunks() {
        let parts: Vec<Vec<u8>> = (0..6u8).map(|i| vec![i; READ / 2 + i as usize]).collect();
        let body = parts.concat();
        let mut tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.write_all(&body).unwrap();
        let h = Hasher::start(Algorithm::Sha256, reader(&tmp));
        let mut at = 0;
        for (i, p) in parts.iter().enumerate() {
            // The first two go in memory; then the hash counts as behind, and the fill keeps
            // its buffer (garbage here: only the file's bytes may be hashed).
            if i == 2 {
                drained(&h).await;
                h.queued.store(IN_MEMORY, Ordering::Release);
            }
            let buf = if i < 2 {
                BytesMut::from(&p[..])
            } else {
                BytesMut::from(&vec![0xee; p.len()][..])
            };
            let ptr = buf.as_ptr();
            let back = h.wrote(at, buf);
            assert!(back.is_empty());
            if i >= 2 {
                assert_eq!(
                    back.as_ptr(),
                    ptr,
                    "a chunk the hash has no room for stays with the fill"
                );
            }
            at += p.len() as u64;
        }
        assert_eq!(h.finish().await.unwrap().finish(), Digest::sha256_of(&body));
    }

    #[tokio::test]
    async fn a_chunk_after_bytes_only_reported_is_hashed_after_them() {
        let (a, b, c) = (vec![1u8; 3 * READ / 2], vec![2u8; READ], vec![3u8; 5000]);
        let mut tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.write_all(&a).unwrap();
        tmp.write_all(&vec![0xee; b.len()]).unwrap();
        tmp.write_all(&c).unwrap();
        let h = Hasher::start(Algorithm::Sha256, reader(&tmp));
        h.written(a.len() as u64);
        drop(h.wrote(a.len() as u64, BytesMut::from(&b[..])));
        h.written((a.len() + b.len() + c.len()) as u64);
        assert_eq!(
            h.finish().await.unwrap().finish(),
            Digest::sha256_of(&[a, b, c].concat())
        );
    }

    #[tokio::test]
    async fn a_file_shorter_than_reported_is_an_error_not_a_digest() {
        let mut tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.write_all(&[7; 100]).unwrap();
        let h = Hasher::start(Algorithm::Sha256, reader(&tmp));
        h.written(200);
        assert_eq!(
            h.finish().await.err().map(|e| e.kind()),
            Some(io::ErrorKind::UnexpectedEof)
        );
    }
}
