//! Hashes a fill on the blocking pool by reading its bytes back from the store, behind the
//! writes. The fill is told nothing but how far the file is written, so it never waits for the
//! hash: the transfer runs at the upstream's pace and the hash at the CPU's, and a cold pull
//! costs about the longer of the two. Handing the hash the bytes themselves through a bounded
//! queue made the two wait on each other: on two cores the hash sat idle for a third of a cold
//! pull while the fill was stalled behind it. Reading back costs one copy from the page cache and
//! a 1 MiB buffer per fill; no blob bytes queue up in memory however far the hash falls behind.

use crate::oci::{Algorithm, Verifier};
use crate::storage::ReadAt;
use std::io;
use std::sync::Arc;
use std::sync::mpsc::{self, TryRecvError};
use tokio::sync::oneshot;

/// Bytes read back and hashed at a time.
const READ: usize = 1 << 20;

enum Msg {
    /// The file holds this many bytes of the body.
    Written(u64),
    /// The hash state after the first `at` bytes.
    Snapshot(u64, oneshot::Sender<Verifier>),
}

pub(super) struct Hasher {
    tx: mpsc::Sender<Msg>,
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
}

impl Hasher {
    /// Starts hashing `file`, the fill's object as it grows, as `written` reports it.
    pub(super) fn start(algorithm: Algorithm, file: Arc<dyn ReadAt>) -> Hasher {
        let (tx, rx) = mpsc::channel();
        let done = tokio::task::spawn_blocking(move || {
            let mut r = Reader {
                file,
                buf: vec![0; READ],
                verifier: Verifier::new(algorithm),
                hashed: 0,
            };
            let mut end = 0;
            loop {
                // Hash while there is something to hash, looking at the messages in between;
                // sleep on them only when caught up.
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
        });
        Hasher { tx, done }
    }

    /// The file now holds the first `n` bytes of the body.
    pub(super) fn written(&self, n: u64) {
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
