//! Crash-safe metadata in redb: which digest each tag pointed at and when that was checked,
//! the media type of each cached manifest, and which repositories are known to hold each
//! digest (links). Every write is one durable transaction.

use crate::oci::Digest;
use parking_lot::Mutex;
use redb::{
    Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle,
};
use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// (upstream, repository, tag, media type) -> (digest, checked at in ms since the epoch).
/// Keyed by media type too, because what an upstream returns for a tag depends on `Accept`.
pub(super) const TAGS: TableDefinition<(&str, &str, &str, &str), (&str, u64)> =
    TableDefinition::new("tag_rows");
/// The tags table of caches written before keys were typed: one string,
/// `"<upstream>\0<repo>\0<tag>\0<media type>"`. Moved into `TAGS` when such a cache is opened.
const TAGS_V1: TableDefinition<&str, (&str, u64)> = TableDefinition::new("tags");
/// digest -> media type of a cached manifest.
pub(super) const MANIFESTS: TableDefinition<&str, &str> = TableDefinition::new("manifests");
/// digest -> (size, last access in ms since the epoch, repository that last used it as
/// `<upstream>/<repo>`): every committed object, blob or manifest. Eviction reads it; a row is
/// written before its file is renamed into place, so no file is ever unaccounted for.
const OBJECTS: TableDefinition<&str, (u64, u64, &str)> = TableDefinition::new("objects");
/// (upstream, repository, digest) -> how the cache learned that the repository holds the
/// digest ([`LinkSource`]). A cached blob is served under a repository only with a row here:
/// the blob files are shared, the right to read them is per repository.
pub(super) const LINKS: TableDefinition<(&str, &str, &str), u8> = TableDefinition::new("links");
/// digest -> (): objects adopted without a record (the metadata was lost or rolled back), not
/// yet hashed. Every other object in `OBJECTS` was verified as it was written.
const UNVERIFIED: TableDefinition<&str, ()> = TableDefinition::new("unverified");
/// Small named values that must survive a restart: the scrub's position (`scrub_position`, the
/// last digest checked, empty between passes) and its last complete pass (`scrub_last_pass`,
/// seconds since the epoch).
const STATE: TableDefinition<&str, &str> = TableDefinition::new("state");

/// How a repository came to be known to hold a digest. Kept for whoever reads the table; the
/// serving rule does not depend on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkSource {
    /// A manifest of the repository references it, or it was fetched under the repository.
    Fetched = 1,
    /// The upstream answered a HEAD of it under the repository.
    Confirmed = 2,
    /// An imported bundle names it under the repository.
    Imported = 3,
    /// Rebuilt from manifests and tags when a cache without links was opened.
    Rebuilt = 4,
}

pub struct Meta {
    /// Shared with `listings.rs`, which keeps its own tables in the same database.
    pub(super) db: Database,
    tag_memo: Mutex<TagMemo>,
    link_memo: Mutex<LinkMemo>,
    /// The store predates links: `rebuild_links` must run before anything is served.
    links_missing: bool,
}

/// Links as last read, so that a cached blob costs a set lookup rather than a read transaction
/// (the cached-blob rate is the figure the mirror is measured by). Only present links are
/// remembered; every removal forgets them all and moves `generation` on, as [`TagMemo`] does.
#[derive(Default)]
struct LinkMemo {
    generation: u64,
    /// Keyed by `link_key`.
    present: std::collections::HashSet<String>,
}

/// Links remembered at most; past it the memo starts over.
const LINK_MEMO_MAX: usize = 65_536;

/// The link memo's key, `"<upstream>\0<repo>\0<digest>"`.
/// Built by hand, the digest written in place: one allocation per cached blob request.
fn link_key(upstream: &str, repo: &str, digest: &Digest) -> String {
    use std::fmt::Write as _;
    // "sha256:" and 64 hex digits, the common case; longer digests just grow the string.
    let mut key = String::with_capacity(upstream.len() + repo.len() + 2 + 71);
    key.push_str(upstream);
    key.push('\0');
    key.push_str(repo);
    key.push('\0');
    let _ = write!(key, "{digest}");
    key
}

/// `<upstream>/<repo>`, as objects record who committed them, split in two; `None` for what
/// names no repository (`(imported)`).
pub fn split_repo_key(key: &str) -> Option<(&str, &str)> {
    key.split_once('/')
        .filter(|(u, r)| !u.is_empty() && !r.is_empty())
}

/// The repository recorded for an object adopted without a record: none.
pub const ADOPTED: &str = "(adopted)";

/// One link to write: (upstream, repository, digest).
pub type Link = (String, String, Digest);

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

pub(super) fn io_err(e: impl std::fmt::Display) -> io::Error {
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

/// Whether a store holds nothing yet (a new cache, which starts with links).
fn is_empty(tx: &redb::WriteTransaction) -> io::Result<bool> {
    Ok(tx
        .open_table(OBJECTS)
        .map_err(io_err)?
        .is_empty()
        .map_err(io_err)?
        && tx
            .open_table(MANIFESTS)
            .map_err(io_err)?
            .is_empty()
            .map_err(io_err)?
        && tx
            .open_table(TAGS)
            .map_err(io_err)?
            .is_empty()
            .map_err(io_err)?)
}

fn insert_link(
    table: &mut redb::Table<'_, (&'static str, &'static str, &'static str), u8>,
    upstream: &str,
    repo: &str,
    digest: &str,
    how: LinkSource,
) -> io::Result<()> {
    // The first way it was learned stays: a later confirmation says nothing new.
    if table
        .get((upstream, repo, digest))
        .map_err(io_err)?
        .is_none()
    {
        table
            .insert((upstream, repo, digest), how as u8)
            .map_err(io_err)?;
    }
    Ok(())
}

/// What an import records ([`Meta::put_import`]).
pub struct ImportRecords<'a> {
    /// Objects placed by the import: (digest, size).
    pub objects: &'a [(&'a Digest, u64)],
    /// Manifests, with their media types.
    pub manifests: &'a std::collections::BTreeMap<Digest, String>,
    /// (upstream, repository, every digest an image named there holds).
    pub links: &'a [(String, String, Vec<Digest>)],
    /// (upstream, repository, tag, media type, digest).
    pub tags: &'a [(String, String, String, String, Digest)],
    /// Referrers among the manifests, for the subject index.
    pub referrers: &'a [super::referrers::ImportedReferrer],
}

/// One row of the tags table, borrowed from the read transaction ([`Meta::for_each_tag`]).
#[derive(Clone, Copy, Debug)]
pub struct TagRowRef<'a> {
    pub upstream: &'a str,
    pub repo: &'a str,
    pub tag: &'a str,
    pub media_type: &'a str,
    /// As stored; parsed only for the rows that are kept.
    pub digest: &'a str,
    /// When upstream last confirmed the digest for the tag.
    pub checked: SystemTime,
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
        Self::open_with_cache(path, None)
    }

    /// `open`, with redb's cache of `cache_bytes` instead of its default (1 GiB, a tenth of it
    /// for pages a write transaction changed): an import writes one large transaction, whose
    /// changed pages beyond the smaller cache go to the file before the commit rather than
    /// stay in memory.
    pub fn open_with_cache(path: &Path, cache_bytes: Option<usize>) -> io::Result<Meta> {
        let mut builder = redb::Builder::new();
        if let Some(bytes) = cache_bytes {
            builder.set_cache_size(bytes);
        }
        // redb asserts, rather than returns an error, on some damage (a file cut shorter than
        // its header says): a damaged store must be set aside, not end the process.
        let created =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || builder.create(path)))
                .map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "metadata store {}: damaged (shorter than its header says)",
                            path.display()
                        ),
                    )
                })?;
        let db = created.map_err(|e| match e {
            // Its own kind, so a second process can tell "in use" from "broken".
            redb::DatabaseError::DatabaseAlreadyOpen => io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!("{}: in use by another cachalot process", path.display()),
            ),
            // Its own kind too, so the cache can set a damaged store aside and rebuild it
            // from the files (see `integrity::reconcile`).
            redb::DatabaseError::Storage(redb::StorageError::Corrupted(e)) => io::Error::new(
                io::ErrorKind::InvalidData,
                format!("metadata store {}: {e}", path.display()),
            ),
            redb::DatabaseError::Storage(redb::StorageError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidData
                ) =>
            {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("metadata store {}: {e}", path.display()),
                )
            }
            e => io_err(format!("{}: {e}", path.display())),
        })?;
        // Create the tables up front so read transactions never meet a missing table.
        let tx = db.begin_write().map_err(io_err)?;
        tx.open_table(TAGS).map_err(io_err)?;
        tx.open_table(MANIFESTS).map_err(io_err)?;
        tx.open_table(OBJECTS).map_err(io_err)?;
        tx.open_table(UNVERIFIED).map_err(io_err)?;
        tx.open_table(STATE).map_err(io_err)?;
        migrate_tags(&tx)?;
        let has_links = tx
            .list_tables()
            .map_err(io_err)?
            .any(|t| t.name() == LINKS.name());
        // A new store starts with links; one written before them gets its table only from
        // `rebuild_links`, in the transaction that fills it, so a crash midway rebuilds again.
        let links_missing = !has_links && !is_empty(&tx)?;
        if !has_links && !links_missing {
            tx.open_table(LINKS).map_err(io_err)?;
        }
        tx.commit().map_err(io_err)?;
        Ok(Meta {
            db,
            tag_memo: Mutex::new(TagMemo::default()),
            link_memo: Mutex::new(LinkMemo::default()),
            links_missing,
        })
    }

    // === links ===

    /// Whether the store was written before links existed and must have them rebuilt.
    pub fn links_missing(&self) -> bool {
        self.links_missing
    }

    /// Whether `upstream`'s repository `repo` is known to hold `digest`.
    pub fn linked(&self, upstream: &str, repo: &str, digest: &Digest) -> io::Result<bool> {
        let key = link_key(upstream, repo, digest);
        let generation = {
            let memo = self.link_memo.lock();
            if memo.present.contains(&key) {
                return Ok(true);
            }
            memo.generation
        };
        let tx = self.db.begin_read().map_err(io_err)?;
        let table = match tx.open_table(LINKS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(false),
            Err(e) => return Err(io_err(e)),
        };
        let d = &key[upstream.len() + repo.len() + 2..];
        let found = table.get((upstream, repo, d)).map_err(io_err)?.is_some();
        if found {
            let mut memo = self.link_memo.lock();
            if memo.generation == generation {
                if memo.present.len() >= LINK_MEMO_MAX {
                    memo.present.clear();
                }
                memo.present.insert(key);
            }
        }
        Ok(found)
    }

    /// Records that `upstream`'s `repo` holds `digest`.
    pub fn put_link(
        &self,
        upstream: &str,
        repo: &str,
        digest: &Digest,
        how: LinkSource,
    ) -> io::Result<()> {
        let tx = self.db.begin_write().map_err(io_err)?;
        {
            let mut links = tx.open_table(LINKS).map_err(io_err)?;
            insert_link(&mut links, upstream, repo, &digest.to_string(), how)?;
        }
        tx.commit().map_err(io_err)
    }

    /// Every link (for tests and inspection).
    pub fn links(&self) -> io::Result<Vec<Link>> {
        let tx = self.db.begin_read().map_err(io_err)?;
        let table = match tx.open_table(LINKS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(io_err(e)),
        };
        let mut out = Vec::new();
        for row in table.iter().map_err(io_err)? {
            let (k, _) = row.map_err(io_err)?;
            let (u, r, d) = k.value();
            if let Ok(d) = d.parse() {
                out.push((u.to_owned(), r.to_owned(), d));
            }
        }
        Ok(out)
    }

    /// Gives a store written before links its links, from what it knows: every object's
    /// committing repository, every tag, and every digest a cached manifest linked to a
    /// repository references (through indexes, as deep as they are cached). `read` reads a
    /// cached manifest's bytes. One transaction, which also creates the table. Blocking.
    pub fn rebuild_links(&self, read: impl Fn(&Digest) -> Option<Vec<u8>>) -> io::Result<usize> {
        let mut seeds: Vec<Link> = Vec::new();
        let manifests: std::collections::HashSet<String> = {
            let tx = self.db.begin_read().map_err(io_err)?;
            let objects = tx.open_table(OBJECTS).map_err(io_err)?;
            for row in objects.iter().map_err(io_err)? {
                let (k, v) = row.map_err(io_err)?;
                if let (Some((u, r)), Ok(d)) = (split_repo_key(v.value().2), k.value().parse()) {
                    seeds.push((u.to_owned(), r.to_owned(), d));
                }
            }
            let tags = tx.open_table(TAGS).map_err(io_err)?;
            for row in tags.iter().map_err(io_err)? {
                let (k, v) = row.map_err(io_err)?;
                let (u, r, _, _) = k.value();
                if let Ok(d) = v.value().0.parse() {
                    seeds.push((u.to_owned(), r.to_owned(), d));
                }
            }
            let table = tx.open_table(MANIFESTS).map_err(io_err)?;
            let mut names = std::collections::HashSet::new();
            for row in table.iter().map_err(io_err)? {
                names.insert(row.map_err(io_err)?.0.value().to_owned());
            }
            names
        };
        let mut refs: HashMap<Digest, Vec<Digest>> = HashMap::new();
        let mut links: std::collections::HashSet<Link> = std::collections::HashSet::new();
        let mut todo = seeds;
        while let Some(link) = todo.pop() {
            if links.contains(&link) {
                continue;
            }
            let (u, r, d) = &link;
            if manifests.contains(&d.to_string()) {
                let children = refs.entry(d.clone()).or_insert_with(|| {
                    read(d)
                        .map(|b| crate::oci::descriptor::referenced_digests(&b))
                        .unwrap_or_default()
                });
                todo.extend(children.iter().map(|c| (u.clone(), r.clone(), c.clone())));
            }
            links.insert(link);
        }
        let tx = self.db.begin_write().map_err(io_err)?;
        {
            let mut table = tx.open_table(LINKS).map_err(io_err)?;
            for (u, r, d) in &links {
                insert_link(&mut table, u, r, &d.to_string(), LinkSource::Rebuilt)?;
            }
        }
        tx.commit().map_err(io_err)?;
        Ok(links.len())
    }

    /// After links were removed: forgets every remembered one.
    fn forget_links(&self) {
        let mut memo = self.link_memo.lock();
        memo.generation += 1;
        memo.present.clear();
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

    /// Moves on after every write to the tags table: whoever keeps something derived from the
    /// table reads this before reading the table, and reads the table again once it moved.
    pub fn tags_generation(&self) -> u64 {
        self.memo().generation
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
        self.put_manifest_linked(digest, media_type, tag, None)
    }

    /// `put_manifest`, and in the same transaction the links of `links.0`'s repository
    /// `links.1` to the manifest itself and to `links.2` (what it references).
    pub fn put_manifest_linked(
        &self,
        digest: &Digest,
        media_type: &str,
        tag: Option<(&str, &str, &str, SystemTime)>,
        links: Option<(&str, &str, &[Digest], LinkSource)>,
    ) -> io::Result<()> {
        let tx = self.db.begin_write().map_err(io_err)?;
        if let Some((upstream, repo, refs, how)) = links {
            let mut table = tx.open_table(LINKS).map_err(io_err)?;
            for d in std::iter::once(digest).chain(refs) {
                insert_link(&mut table, upstream, repo, &d.to_string(), how)?;
            }
        }
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
    /// Returns the size of the row it replaced, if there was one. The repository that
    /// committed it (`<upstream>/<repo>`: the upstream served it there) is linked to it.
    pub fn put_object(
        &self,
        digest: &Digest,
        size: u64,
        repo: &str,
        now: SystemTime,
    ) -> io::Result<Option<u64>> {
        let tx = self.db.begin_write().map_err(io_err)?;
        let old;
        if let Some((u, r)) = split_repo_key(repo) {
            let mut links = tx.open_table(LINKS).map_err(io_err)?;
            insert_link(&mut links, u, r, &digest.to_string(), LinkSource::Fetched)?;
        }
        {
            let mut objects = tx.open_table(OBJECTS).map_err(io_err)?;
            old = objects
                .insert(digest.to_string().as_str(), (size, millis(now), repo))
                .map_err(io_err)?
                .map(|v| v.value().0);
            // Written through a verified commit: whatever was adopted under it is replaced.
            tx.open_table(UNVERIFIED)
                .map_err(io_err)?
                .remove(digest.to_string().as_str())
                .map_err(io_err)?;
        }
        tx.commit().map_err(io_err)?;
        Ok(old)
    }

    /// Records many committed objects in one transaction (imports, benchmarks).
    pub fn put_objects(&self, rows: &[(Digest, u64, String)], now: SystemTime) -> io::Result<()> {
        let tx = self.db.begin_write().map_err(io_err)?;
        {
            let mut links = tx.open_table(LINKS).map_err(io_err)?;
            let mut objects = tx.open_table(OBJECTS).map_err(io_err)?;
            let mut unverified = tx.open_table(UNVERIFIED).map_err(io_err)?;
            for (digest, size, repo) in rows {
                if let Some((u, r)) = split_repo_key(repo) {
                    insert_link(&mut links, u, r, &digest.to_string(), LinkSource::Fetched)?;
                }
                unverified
                    .remove(digest.to_string().as_str())
                    .map_err(io_err)?;
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

    /// Records many tags (upstream, repository, tag, media type, digest, checked) in one
    /// transaction (benchmarks: one transaction per tag would take minutes for thousands).
    pub fn put_tags(
        &self,
        rows: &[(&str, &str, &str, &str, &Digest, SystemTime)],
    ) -> io::Result<()> {
        let tx = self.db.begin_write().map_err(io_err)?;
        {
            let mut tags = tx.open_table(TAGS).map_err(io_err)?;
            for (u, r, t, media_type, digest, checked) in rows {
                tags.insert(
                    (*u, *r, *t, *media_type),
                    (digest.to_string().as_str(), millis(*checked)),
                )
                .map_err(io_err)?;
            }
        }
        let committed = tx.commit().map_err(io_err);
        self.forget_tags(None);
        committed
    }

    /// Records an import in one durable transaction: its new objects (committed by
    /// `(imported)`, so linked to no repository by themselves), its manifests' media types, the
    /// links of the repositories it names, and its tags, as never checked (`UNIX_EPOCH`), so an
    /// online mirror revalidates them. A tag row that already names the same digest is left as
    /// it is, keeping when it was last checked. Either all of it is recorded or none.
    pub fn put_import(&self, import: &ImportRecords<'_>, now: SystemTime) -> io::Result<()> {
        let tx = self.db.begin_write().map_err(io_err)?;
        {
            let mut objects = tx.open_table(OBJECTS).map_err(io_err)?;
            for (digest, size) in import.objects {
                objects
                    .insert(
                        digest.to_string().as_str(),
                        (*size, millis(now), "(imported)"),
                    )
                    .map_err(io_err)?;
            }
            let mut manifests = tx.open_table(MANIFESTS).map_err(io_err)?;
            for (digest, media_type) in import.manifests {
                manifests
                    .insert(digest.to_string().as_str(), media_type.as_str())
                    .map_err(io_err)?;
            }
            let mut links = tx.open_table(LINKS).map_err(io_err)?;
            for (upstream, repo, held) in import.links {
                for d in held {
                    insert_link(
                        &mut links,
                        upstream,
                        repo,
                        &d.to_string(),
                        LinkSource::Imported,
                    )?;
                }
            }
            let mut tags = tx.open_table(TAGS).map_err(io_err)?;
            for (upstream, repo, tag, media_type, digest) in import.tags {
                let digest = digest.to_string();
                let key = (
                    upstream.as_str(),
                    repo.as_str(),
                    tag.as_str(),
                    media_type.as_str(),
                );
                let agrees = tags
                    .get(key)
                    .map_err(io_err)?
                    .is_some_and(|v| v.value().0 == digest);
                if !agrees {
                    tags.insert(key, (digest.as_str(), 0)).map_err(io_err)?;
                }
            }
        }
        super::referrers::put_imported(&tx, import.referrers)?;
        let committed = tx.commit().map_err(io_err);
        self.forget_tags(None);
        committed
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
    /// would only send every request upstream anyway), and their links; a repository whose
    /// last linked manifest goes loses all its links (nothing it holds is known any more).
    /// Returns the count and total size of the rows that were there.
    pub fn remove_objects(&self, digests: &[Digest]) -> io::Result<(u64, u64)> {
        let names: std::collections::HashSet<String> =
            digests.iter().map(Digest::to_string).collect();
        let tx = self.db.begin_write().map_err(io_err)?;
        let (mut count, mut bytes) = (0, 0);
        {
            let mut objects = tx.open_table(OBJECTS).map_err(io_err)?;
            let mut manifests = tx.open_table(MANIFESTS).map_err(io_err)?;
            let mut unverified = tx.open_table(UNVERIFIED).map_err(io_err)?;
            let mut gone_manifests = std::collections::HashSet::new();
            for d in &names {
                if let Some(v) = objects.remove(d.as_str()).map_err(io_err)? {
                    count += 1;
                    bytes += v.value().0;
                }
                unverified.remove(d.as_str()).map_err(io_err)?;
                if manifests.remove(d.as_str()).map_err(io_err)?.is_some() {
                    gone_manifests.insert(d.as_str());
                }
            }
            let mut tags = tx.open_table(TAGS).map_err(io_err)?;
            tags.retain(|_, (digest, _)| !names.contains(digest))
                .map_err(io_err)?;
            let mut links = tx.open_table(LINKS).map_err(io_err)?;
            let mut touched: std::collections::BTreeSet<(String, String)> = Default::default();
            links
                .retain(|(u, r, d), _| {
                    if gone_manifests.contains(d) {
                        touched.insert((u.to_owned(), r.to_owned()));
                    }
                    !names.contains(d)
                })
                .map_err(io_err)?;
            for (u, r) in touched {
                let mut holds_a_manifest = false;
                for row in links
                    .range((u.as_str(), r.as_str(), "")..)
                    .map_err(io_err)?
                {
                    let (k, _) = row.map_err(io_err)?;
                    let (ku, kr, d) = k.value();
                    if (ku, kr) != (u.as_str(), r.as_str()) {
                        break;
                    }
                    if manifests.get(d).map_err(io_err)?.is_some() {
                        holds_a_manifest = true;
                        break;
                    }
                }
                if !holds_a_manifest {
                    links
                        .retain_in((u.as_str(), r.as_str(), "").., |(ku, kr, _), _| {
                            (ku, kr) != (u.as_str(), r.as_str())
                        })
                        .map_err(io_err)?;
                }
            }
        }
        let committed = tx.commit().map_err(io_err);
        self.forget_tags(None);
        self.forget_links();
        committed?;
        Ok((count, bytes))
    }

    /// Calls `visit` with every tag row, in key order (upstream, repository, tag, media type),
    /// in one read transaction: the page lists what the cache holds from it. Borrowed
    /// strings, so rows the caller skips cost no allocation.
    pub fn for_each_tag(&self, mut visit: impl FnMut(TagRowRef<'_>)) -> io::Result<()> {
        let tx = self.db.begin_read().map_err(io_err)?;
        let table = tx.open_table(TAGS).map_err(io_err)?;
        for row in table.iter().map_err(io_err)? {
            let (k, v) = row.map_err(io_err)?;
            let (upstream, repo, tag, media_type) = k.value();
            let (digest, checked) = v.value();
            visit(TagRowRef {
                upstream,
                repo,
                tag,
                media_type,
                digest,
                checked: UNIX_EPOCH + Duration::from_millis(checked),
            });
        }
        Ok(())
    }

    /// Size and last access of each of `digests` (`None` for what is not stored), in one
    /// read transaction.
    pub fn object_rows(&self, digests: &[&str]) -> io::Result<Vec<Option<(u64, SystemTime)>>> {
        let tx = self.db.begin_read().map_err(io_err)?;
        let table = tx.open_table(OBJECTS).map_err(io_err)?;
        digests
            .iter()
            .map(|d| {
                Ok(table.get(*d).map_err(io_err)?.map(|v| {
                    let (size, last, _) = v.value();
                    (size, UNIX_EPOCH + Duration::from_millis(last))
                }))
            })
            .collect()
    }

    // === integrity ===

    /// The objects adopted without a record and not hashed since.
    pub fn unverified(&self) -> io::Result<Vec<Digest>> {
        let tx = self.db.begin_read().map_err(io_err)?;
        let table = tx.open_table(UNVERIFIED).map_err(io_err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(io_err)? {
            if let Ok(d) = row.map_err(io_err)?.0.value().parse() {
                out.push(d);
            }
        }
        Ok(out)
    }

    /// Records files found without a record as unverified objects (digest, size, last use),
    /// in one transaction. They name no repository: what may read them is learned again.
    pub fn adopt(&self, rows: &[(Digest, u64, SystemTime)]) -> io::Result<()> {
        let tx = self.db.begin_write().map_err(io_err)?;
        {
            let mut objects = tx.open_table(OBJECTS).map_err(io_err)?;
            let mut unverified = tx.open_table(UNVERIFIED).map_err(io_err)?;
            for (digest, size, last) in rows {
                let key = digest.to_string();
                objects
                    .insert(key.as_str(), (*size, millis(*last), ADOPTED))
                    .map_err(io_err)?;
                unverified.insert(key.as_str(), ()).map_err(io_err)?;
            }
        }
        tx.commit().map_err(io_err)
    }

    /// An adopted object was hashed whole and matched.
    pub fn set_verified(&self, digest: &Digest) -> io::Result<()> {
        let tx = self.db.begin_write().map_err(io_err)?;
        tx.open_table(UNVERIFIED)
            .map_err(io_err)?
            .remove(digest.to_string().as_str())
            .map_err(io_err)?;
        tx.commit().map_err(io_err)
    }

    /// A named value of the `state` table.
    pub fn state(&self, key: &str) -> io::Result<Option<String>> {
        let tx = self.db.begin_read().map_err(io_err)?;
        let table = tx.open_table(STATE).map_err(io_err)?;
        Ok(table
            .get(key)
            .map_err(io_err)?
            .map(|v| v.value().to_owned()))
    }

    /// Sets named values of the `state` table, in one transaction.
    pub fn set_state(&self, values: &[(&str, &str)]) -> io::Result<()> {
        let tx = self.db.begin_write().map_err(io_err)?;
        {
            let mut table = tx.open_table(STATE).map_err(io_err)?;
            for (k, v) in values {
                table.insert(*k, *v).map_err(io_err)?;
            }
        }
        tx.commit().map_err(io_err)
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

    #[test]
    fn links_follow_commits_manifests_and_evictions() {
        let dir = tempfile::tempdir().unwrap();
        let m = Meta::open(&dir.path().join("meta.redb")).unwrap();
        assert!(!m.links_missing(), "a new store starts with links");
        let (layer, manifest, other) = (
            Digest::sha256_of(b"layer"),
            Digest::sha256_of(b"manifest"),
            Digest::sha256_of(b"other"),
        );
        let now = SystemTime::now();
        m.put_object(&layer, 5, "up/team/app", now).unwrap();
        m.put_object(&other, 5, "(imported)", now).unwrap();
        assert!(m.linked("up", "team/app", &layer).unwrap());
        assert!(!m.linked("up", "team/other", &layer).unwrap());
        assert!(!m.linked("up", "(imported)", &other).unwrap());
        m.put_manifest_linked(
            &manifest,
            "application/a",
            None,
            Some((
                "up",
                "team/b",
                std::slice::from_ref(&layer),
                LinkSource::Fetched,
            )),
        )
        .unwrap();
        assert!(m.linked("up", "team/b", &layer).unwrap());
        assert!(m.linked("up", "team/b", &manifest).unwrap());
        m.put_link("up", "team/c", &layer, LinkSource::Confirmed)
            .unwrap();
        assert!(m.linked("up", "team/c", &layer).unwrap());
        // team/b's last manifest goes: so does everything it was known to hold.
        m.remove_objects(std::slice::from_ref(&manifest)).unwrap();
        assert!(!m.linked("up", "team/b", &layer).unwrap());
        assert!(m.linked("up", "team/app", &layer).unwrap());
        // The blob goes: every link to it goes.
        m.remove_objects(std::slice::from_ref(&layer)).unwrap();
        assert!(m.links().unwrap().is_empty(), "{:?}", m.links().unwrap());
    }

    /// A cache written before links must not turn every cached blob into a miss.
    #[test]
    fn a_store_without_links_gets_them_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let (config, layer, image) = (
            Digest::sha256_of(b"config"),
            Digest::sha256_of(b"layer"),
            format!(
                r#"{{"config":{{"digest":"{}","size":6}},"layers":[{{"digest":"{}","size":5}}]}}"#,
                Digest::sha256_of(b"config"),
                Digest::sha256_of(b"layer")
            ),
        );
        let image_digest = Digest::sha256_of(image.as_bytes());
        let index = format!(r#"{{"manifests":[{{"digest":"{image_digest}","size":1}}]}}"#);
        let index_digest = Digest::sha256_of(index.as_bytes());
        let t = UNIX_EPOCH + Duration::from_secs(1_000_000);
        {
            let m = Meta::open(&path).unwrap();
            m.put_manifest(
                &index_digest,
                "application/i",
                Some(("up", "team/app", "1", t)),
            )
            .unwrap();
            m.put_manifest(&image_digest, "application/m", None)
                .unwrap();
            m.put_object(&layer, 5, "up/team/first", t).unwrap();
            // As the previous version left it: no links table.
            let tx = m.db.begin_write().unwrap();
            tx.delete_table(LINKS).unwrap();
            tx.commit().unwrap();
        }
        let m = Meta::open(&path).unwrap();
        assert!(m.links_missing());
        assert!(!m.linked("up", "team/app", &layer).unwrap());
        let read = |d: &Digest| {
            [(&index_digest, &index), (&image_digest, &image)]
                .into_iter()
                .find(|(k, _)| *k == d)
                .map(|(_, v)| v.as_bytes().to_vec())
        };
        m.rebuild_links(read).unwrap();
        for d in [&index_digest, &image_digest, &config, &layer] {
            assert!(m.linked("up", "team/app", d).unwrap(), "{d}");
        }
        assert!(m.linked("up", "team/first", &layer).unwrap());
        assert!(!m.linked("up", "team/first", &config).unwrap());
        drop(m);
        assert!(!Meta::open(&path).unwrap().links_missing(), "rebuilt once");
    }
}
