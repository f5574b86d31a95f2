//! What the cache can list: the tags list each upstream last gave for a repository (kept, so
//! pages are cut from it rather than fetched), the tags the cache holds for a repository, and
//! the repositories it holds anything of. Tables in the same redb database as `meta.rs`, so
//! the S3 backend, whose metadata is that database too, keeps them in the same place.

use super::meta::{LINKS, Meta, TAGS, io_err, millis};
use redb::TableDefinition;
use std::collections::BTreeSet;
use std::io;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// (upstream, repository) -> (fetched at in ms since the epoch, the tags, sorted, each
/// followed by `\n`). A tag cannot hold `\n` (the walk keeps only valid tags), so the list
/// needs no other encoding, and reading it back is one split.
const TAG_LISTS: TableDefinition<(&str, &str), (u64, &[u8])> = TableDefinition::new("tag_lists");

/// A tags list as the upstream gave it, and when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeptTagList {
    /// Sorted lexically (byte order), without duplicates.
    pub tags: Vec<String>,
    pub fetched: SystemTime,
}

impl Meta {
    /// The tags list kept for `upstream`'s `repo`, if one was ever fetched.
    pub fn tag_list(&self, upstream: &str, repo: &str) -> io::Result<Option<KeptTagList>> {
        let tx = self.db.begin_read().map_err(io_err)?;
        let table = match tx.open_table(TAG_LISTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(io_err(e)),
        };
        let Some(row) = table.get((upstream, repo)).map_err(io_err)? else {
            return Ok(None);
        };
        let (at, bytes) = row.value();
        let text = std::str::from_utf8(bytes).map_err(io_err)?;
        Ok(Some(KeptTagList {
            tags: text.lines().map(str::to_owned).collect(),
            fetched: UNIX_EPOCH + Duration::from_millis(at),
        }))
    }

    /// Keeps `list` as `upstream`'s tags list for `repo`, replacing the one kept before.
    pub fn put_tag_list(&self, upstream: &str, repo: &str, list: &KeptTagList) -> io::Result<()> {
        let mut bytes = Vec::with_capacity(list.tags.iter().map(|t| t.len() + 1).sum());
        for t in &list.tags {
            bytes.extend_from_slice(t.as_bytes());
            bytes.push(b'\n');
        }
        let tx = self.db.begin_write().map_err(io_err)?;
        {
            let mut table = tx.open_table(TAG_LISTS).map_err(io_err)?;
            table
                .insert((upstream, repo), (millis(list.fetched), bytes.as_slice()))
                .map_err(io_err)?;
        }
        tx.commit().map_err(io_err)
    }

    /// The tags the cache holds a manifest row for in `upstream`'s `repo`, sorted: what can be
    /// listed when no tags list was ever fetched and the upstream cannot be asked.
    pub fn held_tags(&self, upstream: &str, repo: &str) -> io::Result<Vec<String>> {
        let tx = self.db.begin_read().map_err(io_err)?;
        let table = tx.open_table(TAGS).map_err(io_err)?;
        let mut out: Vec<String> = Vec::new();
        for row in table.range((upstream, repo, "", "")..).map_err(io_err)? {
            let (k, _) = row.map_err(io_err)?;
            let (u, r, tag, _) = k.value();
            if (u, r) != (upstream, repo) {
                break;
            }
            // Rows are in key order, one per media type: a repeated tag is the previous one.
            if out.last().map(String::as_str) != Some(tag) {
                out.push(tag.to_owned());
            }
        }
        Ok(out)
    }

    /// Every (upstream, repository) the cache holds a tag or a linked digest of, sorted. One
    /// seek per repository rather than a read of every row: a repository of many blobs costs
    /// no more than one of a few.
    pub fn repositories(&self) -> io::Result<Vec<(String, String)>> {
        let tx = self.db.begin_read().map_err(io_err)?;
        let mut out = BTreeSet::new();
        let tags = tx.open_table(TAGS).map_err(io_err)?;
        let mut from = (String::new(), String::new());
        loop {
            let next = tags
                .range((from.0.as_str(), from.1.as_str(), "", "")..)
                .map_err(io_err)?
                .next();
            let Some(row) = next else { break };
            let (k, _) = row.map_err(io_err)?;
            let (u, r, _, _) = k.value();
            out.insert((u.to_owned(), r.to_owned()));
            // The least repository name after `r`: `r` followed by the least character.
            from = (u.to_owned(), format!("{r}\0"));
        }
        match tx.open_table(LINKS) {
            Ok(links) => {
                let mut from = (String::new(), String::new());
                loop {
                    let next = links
                        .range((from.0.as_str(), from.1.as_str(), "")..)
                        .map_err(io_err)?
                        .next();
                    let Some(row) = next else { break };
                    let (k, _) = row.map_err(io_err)?;
                    let (u, r, _) = k.value();
                    out.insert((u.to_owned(), r.to_owned()));
                    from = (u.to_owned(), format!("{r}\0"));
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(io_err(e)),
        }
        Ok(out.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::meta::LinkSource;

    fn digest(n: u8) -> crate::oci::Digest {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
            .parse()
            .unwrap()
    }

    #[test]
    fn a_kept_list_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let list = KeptTagList {
            tags: vec!["a".into(), "b.1".into(), "latest".into()],
            fetched: at,
        };
        {
            let m = Meta::open(&path).unwrap();
            assert_eq!(m.tag_list("up", "r").unwrap(), None);
            m.put_tag_list("up", "r", &list).unwrap();
        }
        let m = Meta::open(&path).unwrap();
        assert_eq!(m.tag_list("up", "r").unwrap(), Some(list));
        assert_eq!(m.tag_list("up", "other").unwrap(), None);
        let empty = KeptTagList {
            tags: vec![],
            fetched: at,
        };
        m.put_tag_list("up", "r", &empty).unwrap();
        assert_eq!(m.tag_list("up", "r").unwrap(), Some(empty));
    }

    #[test]
    fn held_tags_and_repositories() {
        let dir = tempfile::tempdir().unwrap();
        let m = Meta::open(&dir.path().join("meta.redb")).unwrap();
        let now = SystemTime::now();
        for (repo, tag, mt) in [
            ("org/app", "v2", "a"),
            ("org/app", "v1", "a"),
            ("org/app", "v1", "b"),
            ("org/app-x", "v9", "a"),
            ("org/ap", "z", "a"),
        ] {
            m.put_manifest(&digest(1), mt, Some(("up", repo, tag, now)))
                .unwrap();
        }
        m.put_link("other", "lib/x", &digest(2), LinkSource::Fetched)
            .unwrap();
        m.put_link("other", "lib/x", &digest(3), LinkSource::Fetched)
            .unwrap();
        assert_eq!(m.held_tags("up", "org/app").unwrap(), ["v1", "v2"]);
        assert!(m.held_tags("up", "org").unwrap().is_empty());
        let repos: Vec<(String, String)> = [
            ("other", "lib/x"),
            ("up", "org/ap"),
            ("up", "org/app"),
            ("up", "org/app-x"),
        ]
        .iter()
        .map(|(u, r)| (u.to_string(), r.to_string()))
        .collect();
        assert_eq!(m.repositories().unwrap(), repos);
    }
}
