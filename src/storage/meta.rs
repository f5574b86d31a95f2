//! Crash-safe metadata in redb: which digest each tag pointed at and when that was checked,
//! and the media type of each cached manifest. Every write is one durable transaction.

use crate::oci::Digest;
use parking_lot::Mutex;
use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// (upstream, repository, tag, media type) -> (digest, checked at in ms since the epoch).
/// Keyed by media type too, because what an upstream returns for a tag depends on `Accept`.
const TAGS: TableDefinition<(&str, &str, &str, &str), (&str, u64)> =
    TableDefinition::new("tag_rows");
/// The tags table of caches written before keys were typed: one string,
/// `"<upstream>\0<repo>\0<tag>\0<media type>"`. Moved into `TAGS` when such a cache is opened.
const TAGS_V1: TableDefinition<&str, (&str, u64)> = TableDefinition::new("tags");
/// digest -> media type of a cached manifest.
const MANIFESTS: TableDefinition<&str, &str> = TableDefinition::new("manifests");
/// digest -> (size, last access in ms since the epoch, repository that last used it as
/// `<upstream>/<repo>`): every committed object, blob or manifest. Eviction reads it; a row is
/// written before its file is renamed into place, so no file is ever unaccounted for.
const OBJECTS: TableDefinition<&str, (u64, u64, &str)> = TableDefinition::new("objects");

pub struct Meta {
    db: Database,
    tag_memo: Mutex<TagMemo>,
}

/// Tag rows as last read, so that a cached tag costs a map lookup rather than a read
/// transaction. Sound because every write to the tags table goes through this `Meta` (redb lets
/// one process hold the database), and each write, once committed, forgets the rows it changed
/// and moves `generation` on: a read that began before the commit is then not remembered.
#[derive(Default)]
struct TagMemo {
    generation: u64,
    /// Keyed by `tag_prefix`.
    rows: HashMap<String, Arc<[TagEntry]>>,
}

/// Tags remembered at most; past it the memo starts over (a read transaction per tag again).
const TAG_MEMO_MAX: usize = 4096;

/// What the cache knows about one tag, for one media type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagEntry {
    pub digest: Digest,
    pub media_type: String,
    /// When upstream last confirmed this digest for the tag.
    pub checked: SystemTime,
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("metadata store: {e}"))
}

/// The memo's key, `"<upstream>\0<repo>\0<tag>\0"`, built by hand: `format!` costs more than
/// the lookup it keys.
fn tag_prefix(upstream: &str, repo: &str, tag: &str) -> String {
    let mut key = String::with_capacity(upstream.len() + repo.len() + tag.len() + 3);
    for part in [upstream, repo, tag] {
        key.push_str(part);
        key.push('\0');
    }
    key
}

/// Moves the rows of a cache written with string tag keys (`TAGS_V1`) into `TAGS`, in the
/// transaction that opens the store, and drops the old table.
fn migrate_tags(tx: &redb::WriteTransaction) -> io::Result<()> {
    let old = match tx.open_table(TAGS_V1) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
        Err(e) => return Err(io_err(e)),
    };
    let mut tags = tx.open_table(TAGS).map_err(io_err)?;
    for row in old.iter().map_err(io_err)? {
        let (k, v) = row.map_err(io_err)?;
        let key = k.value();
        let mut parts = key.splitn(4, '\0');
        if let (Some(u), Some(r), Some(t), Some(media_type)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        {
            tags.insert((u, r, t, media_type), v.value())
                .map_err(io_err)?;
        }
    }
    drop(old);
    tx.delete_table(TAGS_V1).map_err(io_err)?;
    Ok(())
}

/// One committed object as the metadata knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectRow {
    pub digest: Digest,
    pub size: u64,
    pub last_access: SystemTime,
    /// `<upstream>/<repo>` that last fetched or read it.
    pub repo: String,
}

pub(crate) fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Meta {
    pub fn open(path: &Path) -> io::Result<Meta> {
        let db = Database::create(path).map_err(|e| match e {
            // Its own kind, so a second process can tell "in use" from "broken".
            redb::DatabaseError::DatabaseAlreadyOpen => io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!("{}: in use by another cachalot process", path.display()),
            ),
            e => io_err(format!("{}: {e}", path.display())),
        })?;
        // Create the tables up front so read transactions never meet a missing table.
        let tx = db.begin_write().map_err(io_err)?;
        tx.open_table(TAGS).map_err(io_err)?;
        tx.open_table(MANIFESTS).map_err(io_err)?;
        tx.open_table(OBJECTS).map_err(io_err)?;
        migrate_tags(&tx)?;
        tx.commit().map_err(io_err)?;
        Ok(Meta {
            db,
            tag_memo: Mutex::new(TagMemo::default()),
        })
    }

    /// Every cached entry of one tag (one per media type seen).
    pub fn tags(&self, upstream: &str, repo: &str, tag: &str) -> io::Result<Vec<TagEntry>> {
        Ok(self.tags_shared(upstream, repo, tag)?.to_vec())
    }

    /// `tags`, shared with the memo: no copy, and no read transaction when the tag was read
    /// before and not written since.
    pub fn tags_shared(
        &self,
        upstream: &str,
        repo: &str,
        tag: &str,
    ) -> io::Result<Arc<[TagEntry]>> {
        let prefix = tag_prefix(upstream, repo, tag);
        let generation = {
            let memo = self.memo();
            if let Some(rows) = memo.rows.get(&prefix) {
                return Ok(rows.clone());
            }
            memo.generation
        };
        let rows: Arc<[TagEntry]> = self.read_tags(upstream, repo, tag)?.into();
        let mut memo = self.memo();
        if memo.generation == generation {
            if memo.rows.len() >= TAG_MEMO_MAX {
                memo.rows.clear();
            }
            memo.rows.insert(prefix, rows.clone());
        }
        Ok(rows)
    }

    fn memo(&self) -> parking_lot::MutexGuard<'_, TagMemo> {
        self.tag_memo.lock()
    }

    /// After a write to the tags table: forgets the rows of `prefix`, or all rows.
    fn forget_tags(&self, prefix: Option<&str>) {
        let mut memo = self.memo();
        memo.generation += 1;
        match prefix {
            Some(p) => {
                memo.rows.remove(p);
            }
            None => memo.rows.clear(),
        }
    }

    fn read_tags(&self, upstream: &str, repo: &str, tag: &str) -> io::Result<Vec<TagEntry>> {
        let tx = self.db.begin_read().map_err(io_err)?;
        let table = tx.open_table(TAGS).map_err(io_err)?;
        let mut out = Vec::new();
        for row in table.range((upstream, repo, tag, "")..).map_err(io_err)? {
            let (k, v) = row.map_err(io_err)?;
            let (u, r, t, media_type) = k.value();
            if (u, r, t) != (upstream, repo, tag) {
                break;
            }
            let (digest, checked) = v.value();
            if let Ok(digest) = digest.parse() {
                out.push(TagEntry {
                    digest,
                    media_type: media_type.to_owned(),
                    checked: UNIX_EPOCH + Duration::from_millis(checked),
                });
            }
        }
        Ok(out)
    }

    /// Records a manifest's media type and, when it came by tag, the tag, in one transaction.
    pub fn put_manifest(
        &self,
        digest: &Digest,
        media_type: &str,
        tag: Option<(&str, &str, &str, SystemTime)>,
    ) -> io::Result<()> {
        let tx = self.db.begin_write().map_err(io_err)?;
        {
            let mut manifests = tx.open_table(MANIFESTS).map_err(io_err)?;
            manifests
                .insert(digest.to_string().as_str(), media_type)
                .map_err(io_err)?;
            if let Some((upstream, repo, tag, checked)) = tag {
                let mut tags = tx.open_table(TAGS).map_err(io_err)?;
                tags.insert(
                    (upstream, repo, tag, media_type),
                    (digest.to_string().as_str(), millis(checked)),
                )
                .map_err(io_err)?;
            }
        }
        let committed = tx.commit().map_err(io_err);
        if let Some((upstream, repo, tag, _)) = tag {
            self.forget_tags(Some(&tag_prefix(upstream, repo, tag)));
        }
        committed
    }

    /// Marks a tag entry as confirmed by upstream now.
    pub fn touch_tag(
        &self,
        upstream: &str,
        repo: &str,
        tag: &str,
        entry: &TagEntry,
        now: SystemTime,
    ) -> io::Result<()> {
        let tx = self.db.begin_write().map_err(io_err)?;
        {
            let mut tags = tx.open_table(TAGS).map_err(io_err)?;
            tags.insert(
                (upstream, repo, tag, entry.media_type.as_str()),
                (entry.digest.to_string().as_str(), millis(now)),
            )
            .map_err(io_err)?;
        }
        let committed = tx.commit().map_err(io_err);
        self.forget_tags(Some(&tag_prefix(upstream, repo, tag)));
        committed
    }

    /// Records a committed object. Durable before the caller renames the file into place.
    /// Returns the size of the row it replaced, if there was one.
    pub fn put_object(
        &self,
        digest: &Digest,
        size: u64,
        repo: &str,
        now: SystemTime,
    ) -> io::Result<Option<u64>> {
        let tx = self.db.begin_write().map_err(io_err)?;
        let old;
        {
            let mut objects = tx.open_table(OBJECTS).map_err(io_err)?;
            old = objects
                .insert(digest.to_string().as_str(), (size, millis(now), repo))
                .map_err(io_err)?
                .map(|v| v.value().0);
        }
        tx.commit().map_err(io_err)?;
        Ok(old)
    }

    /// Records many committed objects in one transaction (imports, benchmarks).
    pub fn put_objects(&self, rows: &[(Digest, u64, String)], now: SystemTime) -> io::Result<()> {
        let tx = self.db.begin_write().map_err(io_err)?;
        {
            let mut objects = tx.open_table(OBJECTS).map_err(io_err)?;
            for (digest, size, repo) in rows {
                objects
                    .insert(
                        digest.to_string().as_str(),
                        (*size, millis(now), repo.as_str()),
                    )
                    .map_err(io_err)?;
            }
        }
        tx.commit().map_err(io_err)
    }

    /// Records reads. Access times steer eviction only, so they are written without an fsync:
    /// a crash loses at most the last few, never consistency.
    pub fn touch_objects(&self, touches: &[(Digest, SystemTime)]) -> io::Result<()> {
        if touches.is_empty() {
            return Ok(());
        }
        let mut tx = self.db.begin_write().map_err(io_err)?;
        tx.set_durability(Durability::Eventual);
        {
            let mut objects = tx.open_table(OBJECTS).map_err(io_err)?;
            for (digest, at) in touches {
                let key = digest.to_string();
                let row = objects.get(key.as_str()).map_err(io_err)?.map(|v| {
                    let (size, last, repo) = v.value();
                    (size, last, repo.to_owned())
                });
                if let Some((size, last, repo)) = row {
                    let at = millis(*at).max(last);
                    objects
                        .insert(key.as_str(), (size, at, repo.as_str()))
                        .map_err(io_err)?;
                }
            }
        }
        tx.commit().map_err(io_err)
    }

    /// Makes earlier non-durable writes (access times) durable, so the next open finds a cleanly
    /// closed store instead of repairing one.
    pub fn sync(&self) -> io::Result<()> {
        let tx = self.db.begin_write().map_err(io_err)?;
        tx.commit().map_err(io_err)
    }

    /// Every committed object.
    pub fn objects(&self) -> io::Result<Vec<ObjectRow>> {
        let tx = self.db.begin_read().map_err(io_err)?;
        let table = tx.open_table(OBJECTS).map_err(io_err)?;
        let mut out = Vec::with_capacity(table.len().map_err(io_err)? as usize);
        for row in table.iter().map_err(io_err)? {
            let (k, v) = row.map_err(io_err)?;
            let (size, last, repo) = v.value();
            if let Ok(digest) = k.value().parse() {
                out.push(ObjectRow {
                    digest,
                    size,
                    last_access: UNIX_EPOCH + Duration::from_millis(last),
                    repo: repo.to_owned(),
                });
            }
        }
        Ok(out)
    }

    /// Total size and count of committed objects.
    pub fn totals(&self) -> io::Result<(u64, u64)> {
        let tx = self.db.begin_read().map_err(io_err)?;
        let table = tx.open_table(OBJECTS).map_err(io_err)?;
        let mut bytes = 0;
        let mut count = 0;
        for row in table.iter().map_err(io_err)? {
            let (_, v) = row.map_err(io_err)?;
            bytes += v.value().0;
            count += 1;
        }
        Ok((bytes, count))
    }

    /// Forgets objects, and the tags that pointed at any of them (a tag whose manifest is gone
    /// would only send every request upstream anyway).
    /// Returns the count and total size of the rows that were there.
    pub fn remove_objects(&self, digests: &[Digest]) -> io::Result<(u64, u64)> {
        let names: std::collections::HashSet<String> =
            digests.iter().map(Digest::to_string).collect();
        let tx = self.db.begin_write().map_err(io_err)?;
        let (mut count, mut bytes) = (0, 0);
        {
            let mut objects = tx.open_table(OBJECTS).map_err(io_err)?;
            let mut manifests = tx.open_table(MANIFESTS).map_err(io_err)?;
            for d in &names {
                if let Some(v) = objects.remove(d.as_str()).map_err(io_err)? {
                    count += 1;
                    bytes += v.value().0;
                }
                manifests.remove(d.as_str()).map_err(io_err)?;
            }
            let mut tags = tx.open_table(TAGS).map_err(io_err)?;
            tags.retain(|_, (digest, _)| !names.contains(digest))
                .map_err(io_err)?;
        }
        let committed = tx.commit().map_err(io_err);
        self.forget_tags(None);
        committed?;
        Ok((count, bytes))
    }

    pub fn manifest_type(&self, digest: &Digest) -> io::Result<Option<String>> {
        let tx = self.db.begin_read().map_err(io_err)?;
        let table = tx.open_table(MANIFESTS).map_err(io_err)?;
        Ok(table
            .get(digest.to_string().as_str())
            .map_err(io_err)?
            .map(|v| v.value().to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_survive_reopen_and_do_not_collide() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let d1 = Digest::sha256_of(b"one");
        let d2 = Digest::sha256_of(b"two");
        let t = UNIX_EPOCH + Duration::from_secs(1_000_000);
        {
            let m = Meta::open(&path).unwrap();
            m.put_manifest(
                &d1,
                "application/a",
                Some(("docker.io", "library/x", "1", t)),
            )
            .unwrap();
            m.put_manifest(
                &d2,
                "application/b",
                Some(("docker.io", "library/x", "1", t)),
            )
            .unwrap();
            m.put_manifest(&d2, "application/b", Some(("ghcr.io", "library/x", "1", t)))
                .unwrap();
            m.put_manifest(
                &d2,
                "application/b",
                Some(("docker.io", "library/x", "10", t)),
            )
            .unwrap();
        }
        let m = Meta::open(&path).unwrap();
        let tags = m.tags("docker.io", "library/x", "1").unwrap();
        assert_eq!(tags.len(), 2);
        assert_eq!(tags[0].digest, d1);
        assert_eq!(tags[0].checked, t);
        assert_eq!(
            m.manifest_type(&d2).unwrap().as_deref(),
            Some("application/b")
        );
        let later = t + Duration::from_secs(5);
        m.touch_tag("docker.io", "library/x", "1", &tags[1], later)
            .unwrap();
        assert_eq!(
            m.tags("docker.io", "library/x", "1").unwrap()[1].checked,
            later
        );
        assert!(m.tags("quay.io", "library/x", "1").unwrap().is_empty());
    }

    #[test]
    fn tags_written_with_string_keys_are_moved_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let d = Digest::sha256_of(b"one");
        {
            let db = Database::create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            tx.open_table(TAGS_V1)
                .unwrap()
                .insert(
                    concat!("docker.io\0library/x\0", "1", "\0application/a"),
                    (d.to_string().as_str(), 5_000),
                )
                .unwrap();
            tx.commit().unwrap();
        }
        let m = Meta::open(&path).unwrap();
        let tags = m.tags("docker.io", "library/x", "1").unwrap();
        assert_eq!(tags.len(), 1);
        assert_eq!(tags[0].digest, d);
        assert_eq!(tags[0].media_type, "application/a");
        assert_eq!(tags[0].checked, UNIX_EPOCH + Duration::from_millis(5_000));
        drop(m);
        // Moved, not copied: a second open finds nothing to move.
        let m = Meta::open(&path).unwrap();
        assert_eq!(m.tags("docker.io", "library/x", "1").unwrap().len(), 1);
    }

    /// Reads are remembered, so every write must show in the next read.
    #[test]
    fn remembered_tags_follow_every_write() {
        let dir = tempfile::tempdir().unwrap();
        let m = Meta::open(&dir.path().join("meta.redb")).unwrap();
        let (d1, d2) = (Digest::sha256_of(b"one"), Digest::sha256_of(b"two"));
        let t = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let tags = || m.tags_shared("docker.io", "library/x", "1").unwrap();
        assert!(tags().is_empty());
        m.put_manifest(
            &d1,
            "application/a",
            Some(("docker.io", "library/x", "1", t)),
        )
        .unwrap();
        assert_eq!(tags().len(), 1);
        // A manifest recorded without its tag leaves the tag's rows alone.
        m.put_manifest(&d2, "application/b", None).unwrap();
        assert_eq!(tags().len(), 1);
        m.put_manifest(
            &d2,
            "application/b",
            Some(("docker.io", "library/x", "1", t)),
        )
        .unwrap();
        assert_eq!(tags().len(), 2);
        let later = t + Duration::from_secs(5);
        m.touch_tag("docker.io", "library/x", "1", &tags()[0], later)
            .unwrap();
        assert_eq!(tags()[0].checked, later);
        m.remove_objects(std::slice::from_ref(&d1)).unwrap();
        let left = tags();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].digest, d2);
        assert_eq!(*left, *m.read_tags("docker.io", "library/x", "1").unwrap());
    }
}
