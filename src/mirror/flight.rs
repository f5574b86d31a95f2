//! Single flight for small fetches (manifests, tag resolutions): concurrent callers with the
//! same key share one run. The run is a spawned task, so it completes even if every caller
//! goes away, and its result lands in the cache for the next one.

use crate::error::Error;
use crate::oci::{Digest, RepoName, Tag};
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;

/// What a manifest fetch is for: a digest or a tag of one upstream's repository, a tag as one
/// `Accept` asks for it (what a tag names depends on `Accept`). Digests are keyed by repository
/// too: a fetch under one repository is that repository's answer, and must not serve another.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum FlightKey {
    Digest {
        upstream: String,
        repo: RepoName,
        digest: Digest,
    },
    Tag {
        upstream: String,
        repo: RepoName,
        tag: Tag,
        accept: String,
    },
}

type SharedResult<V> = Shared<BoxFuture<'static, Result<V, Error>>>;

pub(super) struct SingleFlight<K, V: Clone> {
    runs: Arc<Mutex<HashMap<K, SharedResult<V>>>>,
}

impl<K, V: Clone> Default for SingleFlight<K, V> {
    fn default() -> Self {
        SingleFlight {
            runs: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

impl<K, V> SingleFlight<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Runs `make()` unless a run for `key` is already under way, and returns its result and
    /// whether this caller was the one that started it.
    pub(super) async fn run<F, Fut>(&self, key: K, make: F) -> (Result<V, Error>, bool)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, Error>> + Send + 'static,
    {
        let (shared, leader) = {
            let mut runs = self.runs.lock();
            match runs.get(&key) {
                Some(s) => (s.clone(), false),
                None => {
                    let fut = make();
                    let table = self.runs.clone();
                    let k = key.clone();
                    let handle = tokio::spawn(async move {
                        let out = fut.await;
                        table.lock().remove(&k);
                        out
                    });
                    let shared = async move {
                        handle.await.unwrap_or_else(|e| {
                            Err(Error::Internal(format!("fetch task failed: {e}")))
                        })
                    }
                    .boxed()
                    .shared();
                    runs.insert(key, shared.clone());
                    (shared, true)
                }
            }
        };
        (shared.await, leader)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_callers_share_one_run() {
        let flight: Arc<SingleFlight<&'static str, usize>> = Arc::new(SingleFlight::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let flight = flight.clone();
            let runs = runs.clone();
            tasks.push(tokio::spawn(async move {
                flight
                    .run("k", || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok(7)
                    })
                    .await
            }));
        }
        let mut leaders = 0;
        for t in tasks {
            let (v, leader) = t.await.unwrap();
            assert_eq!(v.unwrap(), 7);
            leaders += leader as usize;
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(leaders, 1);
        // Finished runs leave the table: the next call runs again.
        let (v, leader) = flight.run("k", || async { Ok(8) }).await;
        assert_eq!((v.unwrap(), leader), (8, true));
    }
}
