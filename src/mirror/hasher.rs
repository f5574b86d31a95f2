//! Hashes a fill's chunks on the blocking pool while the fill goes on receiving and writing, so
//! a cold pull costs about the longer of the hash and the transfer, not their sum. The queue is
//! bounded: a hash that falls behind slows the fill rather than growing memory.

use crate::oci::{Algorithm, Digest, Verifier};
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

/// Chunks waiting to be hashed, at most (each up to the fill's chunk size).
const QUEUE: usize = 2;

enum Msg {
    Chunk(Bytes),
    Snapshot(oneshot::Sender<Verifier>),
}

pub struct Hasher {
    tx: mpsc::Sender<Msg>,
    done: tokio::task::JoinHandle<Verifier>,
}

impl Hasher {
    pub fn start(algorithm: Algorithm) -> Hasher {
        let (tx, mut rx) = mpsc::channel(QUEUE);
        let done = tokio::task::spawn_blocking(move || {
            let mut v = Verifier::new(algorithm);
            while let Some(m) = rx.blocking_recv() {
                match m {
                    Msg::Chunk(b) => v.update(&b),
                    Msg::Snapshot(reply) => {
                        let _ = reply.send(v.clone());
                    }
                }
            }
            v
        });
        Hasher { tx, done }
    }

    /// Queues the next chunk of the body.
    pub async fn update(&self, chunk: Bytes) {
        let _ = self.tx.send(Msg::Chunk(chunk)).await;
    }

    /// The hash state after every chunk queued so far.
    pub async fn snapshot(&self) -> Option<Verifier> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Msg::Snapshot(reply)).await.ok()?;
        rx.await.ok()
    }

    /// The digest of everything queued.
    pub async fn finish(self) -> Option<Digest> {
        drop(self.tx);
        self.done.await.ok().map(Verifier::finish)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_in_order_and_snapshots_midway() {
        let h = Hasher::start(Algorithm::Sha256);
        let parts: Vec<Bytes> = (0..10u8).map(|i| Bytes::from(vec![i; 100_000])).collect();
        for p in &parts[..5] {
            h.update(p.clone()).await;
        }
        let mid = h.snapshot().await.unwrap().finish();
        for p in &parts[5..] {
            h.update(p.clone()).await;
        }
        let all: Vec<u8> = parts.concat();
        assert_eq!(h.finish().await.unwrap(), Digest::sha256_of(&all));
        assert_eq!(mid, Digest::sha256_of(&parts[..5].concat()));
    }
}
