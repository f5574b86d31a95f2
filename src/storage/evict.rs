//! Eviction: keeps the cache under `cache.max_size` by removing the least recently read
//! objects down to a low watermark, and removes objects unread for `cache.max_unused`.
//! Pinned images are never removed. Removal unlinks files, so a response streaming a file at
//! that moment keeps its open handle and finishes.

use super::{Access, ObjectRow, Store};
use crate::oci::descriptor::{self, Refs};
use crate::oci::{Digest, ImageRef, Reference, manifest};
use std::collections::{BTreeMap, HashSet};
use std::io;
use std::time::{Duration, SystemTime};

/// Eviction brings the cache down to this share of `max_size`, so that one pass makes room for
/// many fills instead of running again at every commit.
pub const LOW_WATERMARK: f64 = 0.9;

#[derive(Clone, Debug)]
pub struct Policy {
    pub max_size: u64,
    pub max_unused: Option<Duration>,
    pub pins: Vec<ImageRef>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    /// The cache was over `max_size`.
    Size,
    /// Not read for longer than `max_unused`.
    Unused,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Size => "size",
            Reason::Unused => "unused",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Evicted {
    pub row: ObjectRow,
    pub reason: Reason,
}

/// What one pass did (or, dry, would do).
#[derive(Debug, Default)]
pub struct Report {
    pub evicted: Vec<Evicted>,
    pub before: u64,
    pub after: u64,
    pub dry_run: bool,
}

impl Report {
    pub fn bytes(&self, reason: Option<Reason>) -> u64 {
        self.evicted
            .iter()
            .filter(|e| reason.is_none_or(|r| e.reason == r))
            .map(|e| e.row.size)
            .sum()
    }

    /// Repositories that lost the most bytes, largest first.
    pub fn top_repositories(&self, n: usize) -> Vec<(String, u64, usize)> {
        let mut by_repo: BTreeMap<&str, (u64, usize)> = BTreeMap::new();
        for e in &self.evicted {
            let slot = by_repo.entry(e.row.repo.as_str()).or_default();
            slot.0 += e.row.size;
            slot.1 += 1;
        }
        let mut v: Vec<_> = by_repo
            .into_iter()
            .map(|(r, (b, c))| (r.to_owned(), b, c))
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.truncate(n);
        v
    }
}

/// Chooses what to evict. Pure, so the rule can be tested on its own: first everything unread
/// for longer than `max_unused`, then, while the rest is over `max_size`, the least recently
/// read until it is under the low watermark.
pub fn plan(
    mut rows: Vec<ObjectRow>,
    policy: &Policy,
    pinned: &HashSet<Digest>,
    now: SystemTime,
) -> Vec<Evicted> {
    let mut total: u64 = rows.iter().map(|r| r.size).sum();
    rows.sort_by(|a, b| {
        a.last_access
            .cmp(&b.last_access)
            .then_with(|| a.digest.cmp(&b.digest))
    });
    let mut out = Vec::new();
    let mut keep = Vec::with_capacity(rows.len());
    for row in rows {
        let unused = policy
            .max_unused
            .is_some_and(|limit| now.duration_since(row.last_access).unwrap_or_default() > limit);
        if unused && !pinned.contains(&row.digest) {
            total -= row.size;
            out.push(Evicted {
                row,
                reason: Reason::Unused,
            });
        } else {
            keep.push(row);
        }
    }
    if total > policy.max_size {
        let target = (policy.max_size as f64 * LOW_WATERMARK) as u64;
        for row in keep {
            if total <= target {
                break;
            }
            if pinned.contains(&row.digest) {
                continue;
            }
            total -= row.size;
            out.push(Evicted {
                row,
                reason: Reason::Size,
            });
        }
    }
    out
}

/// Every digest a pinned image needs: its manifests (the index and each platform's), configs
/// and layers, as far as they are cached. Blocking.
pub fn pinned_digests(store: &Store, pins: &[ImageRef]) -> io::Result<HashSet<Digest>> {
    let mut pinned = HashSet::new();
    let mut todo: Vec<Digest> = Vec::new();
    for pin in pins {
        match &pin.reference {
            Reference::Digest(d) => todo.push(d.clone()),
            Reference::Tag(t) => {
                for entry in store
                    .meta()
                    .tags(&pin.registry, pin.repo.as_str(), t.as_str())?
                {
                    todo.push(entry.digest);
                }
            }
        }
    }
    while let Some(d) = todo.pop() {
        if !pinned.insert(d.clone()) {
            continue;
        }
        if let Some(media_type) = store.meta().manifest_type(&d)?
            && let Some(bytes) = read_quietly(store, &d)
        {
            match descriptor::parse_refs(&media_type, &bytes) {
                Ok(Refs::Index(children)) => todo.extend(children.into_iter().map(|c| c.digest)),
                Ok(Refs::Image { config, layers }) => {
                    todo.push(config.digest);
                    todo.extend(layers.into_iter().map(|l| l.digest));
                }
                // A manifest we cannot read pins only itself.
                Err(_) => {}
            }
        }
    }
    Ok(pinned)
}

/// A manifest's bytes without counting it as a read (pin resolution must not keep things warm).
fn read_quietly(store: &Store, d: &Digest) -> Option<Vec<u8>> {
    let blob = store.blobs().open(d, Access::Quiet).ok()??;
    blob.read_all(manifest::MAX_MANIFEST_SIZE).ok()
}

/// One eviction pass. Blocking.
pub fn run_pass(store: &Store, policy: &Policy, dry_run: bool) -> io::Result<Report> {
    let _pass = store.pass_guard();
    let rows = store.blobs().objects()?;
    let before: u64 = rows.iter().map(|r| r.size).sum();
    let pinned = pinned_digests(store, &policy.pins)?;
    let mut evicted = plan(rows, policy, &pinned, SystemTime::now());
    if !dry_run && !evicted.is_empty() {
        let victims: Vec<ObjectRow> = evicted.iter().map(|e| e.row.clone()).collect();
        let removed: HashSet<Digest> = store.blobs().remove(&victims)?.into_iter().collect();
        evicted.retain(|e| removed.contains(&e.row.digest));
    }
    let freed: u64 = evicted.iter().map(|e| e.row.size).sum();
    Ok(Report {
        evicted,
        before,
        after: before - freed,
        dry_run,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::UNIX_EPOCH;

    fn row(n: u8, size: u64, age_s: u64, now: SystemTime) -> ObjectRow {
        ObjectRow {
            digest: Digest::sha256_of(&[n]),
            size,
            last_access: now - Duration::from_secs(age_s),
            repo: format!("docker.io/r{}", n % 3),
        }
    }

    #[test]
    fn evicts_least_recently_read_to_the_watermark() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let rows = vec![
            row(1, 40, 10, now),
            row(2, 40, 30, now),
            row(3, 40, 20, now),
        ];
        let policy = Policy {
            max_size: 100,
            max_unused: None,
            pins: vec![],
        };
        let out = plan(rows, &policy, &HashSet::new(), now);
        // 120 > 100: remove the oldest (30 s) -> 80 <= 90.
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].row.digest, Digest::sha256_of(&[2]));
        assert_eq!(out[0].reason, Reason::Size);
    }

    #[test]
    fn pinned_and_under_bound_stay() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let rows = vec![row(1, 60, 50, now), row(2, 60, 10, now)];
        let pinned: HashSet<Digest> = [Digest::sha256_of(&[1])].into();
        let policy = Policy {
            max_size: 100,
            max_unused: None,
            pins: vec![],
        };
        let out = plan(rows.clone(), &policy, &pinned, now);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].row.digest, Digest::sha256_of(&[2]));
        let roomy = Policy {
            max_size: 1000,
            ..policy
        };
        assert!(plan(rows, &roomy, &HashSet::new(), now).is_empty());
    }

    #[test]
    fn unused_content_goes_even_under_the_bound() {
        let now = UNIX_EPOCH + Duration::from_secs(100 * 86_400);
        let rows = vec![row(1, 1, 31 * 86_400, now), row(2, 1, 86_400, now)];
        let policy = Policy {
            max_size: 1000,
            max_unused: Some(Duration::from_secs(30 * 86_400)),
            pins: vec![],
        };
        let out = plan(rows, &policy, &HashSet::new(), now);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].reason, Reason::Unused);
    }

    proptest! {
        #[test]
        fn a_plan_never_leaves_the_cache_over_its_bound_unless_pinned(
            sizes in proptest::collection::vec((1u64..500, 0u64..10_000, any::<bool>()), 0..60),
            max_size in 1u64..5_000,
        ) {
            let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
            let rows: Vec<ObjectRow> = sizes.iter().enumerate().map(|(i, (s, age, _))| ObjectRow {
                digest: Digest::sha256_of(&(i as u32).to_le_bytes()),
                size: *s,
                last_access: now - Duration::from_secs(*age),
                repo: "r".into(),
            }).collect();
            let pinned: HashSet<Digest> = rows.iter().zip(&sizes).filter(|(_, (_, _, p))| *p).map(|(r, _)| r.digest.clone()).collect();
            let policy = Policy { max_size, max_unused: None, pins: vec![] };
            let out = plan(rows.clone(), &policy, &pinned, now);
            let freed: u64 = out.iter().map(|e| e.row.size).sum();
            let total: u64 = rows.iter().map(|r| r.size).sum();
            let pinned_bytes: u64 = rows.iter().filter(|r| pinned.contains(&r.digest)).map(|r| r.size).sum();
            prop_assert!(out.iter().all(|e| !pinned.contains(&e.row.digest)));
            if total > max_size {
                prop_assert!(total - freed <= max_size || total - freed == pinned_bytes);
            } else {
                prop_assert!(out.is_empty());
            }
            // Whatever is evicted for size is never more recently read than what stays.
            let newest_evicted = out.iter().map(|e| e.row.last_access).max();
            if let Some(newest) = newest_evicted {
                let evicted: HashSet<_> = out.iter().map(|e| e.row.digest.clone()).collect();
                for r in rows.iter().filter(|r| !evicted.contains(&r.digest) && !pinned.contains(&r.digest)) {
                    prop_assert!(r.last_access >= newest);
                }
            }
        }
    }
}
