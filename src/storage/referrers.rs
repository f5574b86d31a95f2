//! Referrers as the cache keeps them, in the metadata database beside tags: the last answer to
//! each referrers question (so it is fresh for `tag_ttl` and served stale after, as tags are),
//! and an index subject -> referrer over the cached manifests, for answering with no upstream.
//!
//! The index is written before the manifest rows it describes (a crash leaves a row for a
//! manifest the cache does not hold, which reads skip), and is complete only once rebuilt: a
//! cache written before it gets it from its manifests at the first read that needs it.

use super::meta::{LINKS, MANIFESTS, Meta, millis};
use super::{Access, Store};
use crate::oci::manifest::MAX_MANIFEST_SIZE;
use crate::oci::referrers::{Listing, as_referrer};
use crate::oci::{Digest, descriptor};
use redb::{ReadableTable, TableDefinition};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// (upstream, repository, subject, page query) -> (checked at in ms since the epoch, the
/// answer's image index, unfiltered, the upstream's `Link` or "").
const ANSWERS: TableDefinition<AnswerKey, (u64, &[u8], &str)> =
    TableDefinition::new("referrers_answers");
/// (upstream, repository, subject, page query).
type AnswerKey = (&'static str, &'static str, &'static str, &'static str);
/// (subject, referrer) -> the referrer's descriptor as a referrers list gives it (JSON).
const SUBJECTS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("referrers_subjects");
/// "complete" -> when `SUBJECTS` was rebuilt from every cached manifest. Absent: rebuild first.
const SUBJECTS_STATE: TableDefinition<&str, u64> = TableDefinition::new("referrers_state");

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("metadata store (referrers): {e}"))
}

/// The last upstream answer to one referrers question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeptReferrers {
    /// When the upstream gave it.
    pub checked: SystemTime,
    /// The image index, before any `artifactType` filter.
    pub index: Vec<u8>,
    /// The upstream's `Link` to the next page, as it sent it.
    pub link: Option<String>,
}

/// A row of the subject index: (subject, referrer, the referrer's descriptor).
type SubjectRow = (Digest, Digest, Vec<u8>);

impl Meta {
    /// The kept answer for `subject` in `upstream`'s `repo`, page `page` ("" for the first).
    pub fn kept_referrers(
        &self,
        upstream: &str,
        repo: &str,
        subject: &Digest,
        page: &str,
    ) -> io::Result<Option<KeptReferrers>> {
        let tx = self.db.begin_read().map_err(io_err)?;
        let table = match tx.open_table(ANSWERS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(io_err(e)),
        };
        let s = subject.to_string();
        let Some(v) = table
            .get((upstream, repo, s.as_str(), page))
            .map_err(io_err)?
        else {
            return Ok(None);
        };
        let (checked, index, link) = v.value();
        Ok(Some(KeptReferrers {
            checked: UNIX_EPOCH + Duration::from_millis(checked),
            index: index.to_vec(),
            link: (!link.is_empty()).then(|| link.to_owned()),
        }))
    }

    /// Keeps an upstream answer, replacing the one before.
    pub fn keep_referrers(
        &self,
        upstream: &str,
        repo: &str,
        subject: &Digest,
        page: &str,
        kept: &KeptReferrers,
    ) -> io::Result<()> {
        let tx = self.db.begin_write().map_err(io_err)?;
        {
            let mut table = tx.open_table(ANSWERS).map_err(io_err)?;
            let s = subject.to_string();
            table
                .insert(
                    (upstream, repo, s.as_str(), page),
                    (
                        millis(kept.checked),
                        kept.index.as_slice(),
                        kept.link.as_deref().unwrap_or(""),
                    ),
                )
                .map_err(io_err)?;
        }
        tx.commit().map_err(io_err)
    }

    /// Adds rows to the subject index, in one transaction.
    fn put_subject_rows(&self, rows: &[SubjectRow]) -> io::Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let tx = self.db.begin_write().map_err(io_err)?;
        {
            let mut table = tx.open_table(SUBJECTS).map_err(io_err)?;
            for (s, r, d) in rows {
                let (s, r) = (s.to_string(), r.to_string());
                table
                    .insert((s.as_str(), r.as_str()), d.as_slice())
                    .map_err(io_err)?;
            }
        }
        tx.commit().map_err(io_err)
    }

    fn subjects_complete(&self) -> io::Result<bool> {
        let tx = self.db.begin_read().map_err(io_err)?;
        match tx.open_table(SUBJECTS_STATE) {
            Ok(t) => Ok(t.get("complete").map_err(io_err)?.is_some()),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(false),
            Err(e) => Err(io_err(e)),
        }
    }

    /// The referrers the index knows for `subject`: (referrer, descriptor JSON).
    fn subject_rows(&self, subject: &Digest) -> io::Result<Vec<(Digest, Vec<u8>)>> {
        let tx = self.db.begin_read().map_err(io_err)?;
        let table = match tx.open_table(SUBJECTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(io_err(e)),
        };
        let s = subject.to_string();
        let mut out = Vec::new();
        for row in table.range((s.as_str(), "")..).map_err(io_err)? {
            let (k, v) = row.map_err(io_err)?;
            let (ks, r) = k.value();
            if ks != s {
                break;
            }
            if let Ok(r) = r.parse() {
                out.push((r, v.value().to_vec()));
            }
        }
        Ok(out)
    }
}

/// A manifest's bytes from the cache, `None` when it cannot be read.
fn read_manifest(store: &Store, digest: &Digest) -> Option<Vec<u8>> {
    let blob = store.blobs().open(digest, Access::Quiet).ok()??;
    blob.read_all(MAX_MANIFEST_SIZE).ok()
}

/// Indexes a manifest about to be recorded in the cache, when it names a subject. Called before
/// the manifest's own row is written. Blocking.
pub fn note_manifest(
    store: &Store,
    digest: &Digest,
    media_type: &str,
    bytes: &[u8],
) -> io::Result<()> {
    let Some((subject, d)) = as_referrer(digest, media_type, bytes) else {
        return Ok(());
    };
    let d = serde_json::to_vec(&d).map_err(io_err)?;
    store
        .meta()
        .put_subject_rows(&[(subject, digest.clone(), d)])
}

/// A referrer a bundle brings: its row of the subject index, and what it holds (itself and
/// what it names), to be linked to every repository holding its subject.
#[derive(Debug)]
pub struct ImportedReferrer {
    subject: Digest,
    referrer: Digest,
    descriptor: Vec<u8>,
    holds: Vec<Digest>,
}

/// `digest` as a referrer, when the manifest (`media_type`, `bytes`) names a subject.
pub fn imported_referrer(
    digest: &Digest,
    media_type: &str,
    bytes: &[u8],
) -> io::Result<Option<ImportedReferrer>> {
    let Some((subject, d)) = as_referrer(digest, media_type, bytes) else {
        return Ok(None);
    };
    let mut holds = descriptor::referenced_digests(bytes);
    holds.push(digest.clone());
    Ok(Some(ImportedReferrer {
        subject,
        referrer: digest.clone(),
        descriptor: serde_json::to_vec(&d).map_err(io_err)?,
        holds,
    }))
}

/// Indexes an import's referrers, and links each, with what it holds, to every repository
/// holding its subject (the import's own links included): a bundle names only its images'
/// repositories, and a signature is read under its image's. Written in the import's own
/// transaction ([`Meta::put_import`]), so a crash leaves all of it or none. The links table is
/// read only when there are referrers.
pub(super) fn put_imported(
    tx: &redb::WriteTransaction,
    referrers: &[ImportedReferrer],
) -> io::Result<()> {
    if referrers.is_empty() {
        return Ok(());
    }
    let mut subjects = tx.open_table(SUBJECTS).map_err(io_err)?;
    let mut holds: BTreeMap<String, Vec<&Digest>> = BTreeMap::new();
    for r in referrers {
        let (s, d) = (r.subject.to_string(), r.referrer.to_string());
        subjects
            .insert((s.as_str(), d.as_str()), r.descriptor.as_slice())
            .map_err(io_err)?;
        holds.entry(s).or_default().extend(&r.holds);
    }
    let mut links = tx.open_table(LINKS).map_err(io_err)?;
    let mut add = Vec::new();
    for row in links.iter().map_err(io_err)? {
        let (k, _) = row.map_err(io_err)?;
        let (u, r, d) = k.value();
        if let Some(held) = holds.get(d) {
            for h in held {
                add.push((u.to_owned(), r.to_owned(), h.to_string()));
            }
        }
    }
    for (u, r, d) in &add {
        if links
            .get((u.as_str(), r.as_str(), d.as_str()))
            .map_err(io_err)?
            .is_none()
        {
            links
                .insert(
                    (u.as_str(), r.as_str(), d.as_str()),
                    super::meta::LinkSource::Imported as u8,
                )
                .map_err(io_err)?;
        }
    }
    Ok(())
}

/// Rebuilds the subject index from every cached manifest, once per cache. Blocking.
fn ensure_subject_index(store: &Store) -> io::Result<()> {
    let meta = store.meta();
    if meta.subjects_complete()? {
        return Ok(());
    }
    let manifests: Vec<(Digest, String)> = {
        let tx = meta.db.begin_read().map_err(io_err)?;
        let table = tx.open_table(MANIFESTS).map_err(io_err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(io_err)? {
            let (k, v) = row.map_err(io_err)?;
            if let Ok(d) = k.value().parse() {
                out.push((d, v.value().to_owned()));
            }
        }
        out
    };
    let mut rows = Vec::new();
    for (digest, media_type) in &manifests {
        if let Some(bytes) = read_manifest(store, digest)
            && let Some((subject, d)) = as_referrer(digest, media_type, &bytes)
        {
            rows.push((
                subject,
                digest.clone(),
                serde_json::to_vec(&d).map_err(io_err)?,
            ));
        }
    }
    // Manifests recorded since the read above indexed themselves (`note_manifest`).
    meta.put_subject_rows(&rows)?;
    let tx = meta.db.begin_write().map_err(io_err)?;
    {
        let mut t = tx.open_table(SUBJECTS_STATE).map_err(io_err)?;
        t.insert("complete", millis(SystemTime::now()))
            .map_err(io_err)?;
    }
    tx.commit().map_err(io_err)?;
    tracing::info!(
        manifests = manifests.len(),
        referrers = rows.len(),
        "indexed the cached manifests by subject"
    );
    Ok(())
}

/// The referrers of `subject` the cache holds for `upstream`'s `repo`: manifests still cached,
/// linked to that repository, whose `subject` is `subject`. Blocking.
pub fn cached_referrers(
    store: &Store,
    upstream: &str,
    repo: &str,
    subject: &Digest,
) -> io::Result<Listing> {
    ensure_subject_index(store)?;
    let meta = store.meta();
    let mut out = Vec::new();
    for (referrer, d) in meta.subject_rows(subject)? {
        if meta.manifest_type(&referrer)?.is_none() || !meta.linked(upstream, repo, &referrer)? {
            continue;
        }
        if let Ok(Value::Object(m)) = serde_json::from_slice(&d) {
            out.push(m);
        }
    }
    Ok(Listing(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::digest::Algorithm;
    use crate::oci::manifest::OCI_MANIFEST;
    use crate::oci::{Verifier, manifest};

    fn put(store: &Store, bytes: &[u8], repo: &str) -> Digest {
        let mut v = Verifier::new(Algorithm::Sha256);
        v.update(bytes);
        let proof = v.prove();
        let d = proof.digest().clone();
        super::super::put_small(&**store.blobs(), bytes, proof, repo).unwrap();
        store.meta().put_manifest(&d, OCI_MANIFEST, None).unwrap();
        d
    }

    fn artifact(subject: &Digest, n: u8) -> Vec<u8> {
        format!(
            r#"{{"mediaType":"{OCI_MANIFEST}","artifactType":"a/{n}","config":{{"mediaType":"x","digest":"sha256:{}","size":2}},"subject":{{"digest":"{subject}"}}}}"#,
            "0".repeat(64)
        )
        .into_bytes()
    }

    #[test]
    fn a_cache_written_before_the_index_gets_it_rebuilt_per_repository() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let subject = put(&store, b"{\"layers\":[]}", "up/app");
        // Recorded without `note_manifest`, as a cache from before the index was.
        let mine = put(&store, &artifact(&subject, 1), "up/app");
        let theirs = put(&store, &artifact(&subject, 2), "up/other");
        let l = cached_referrers(&store, "up", "app", &subject).unwrap();
        assert_eq!(l.0.len(), 1, "{l:?}");
        assert_eq!(l.0[0]["digest"], mine.to_string());
        assert_eq!(l.0[0]["artifactType"], "a/1");
        assert_eq!(l.0[0]["mediaType"], manifest::OCI_MANIFEST);
        let l = cached_referrers(&store, "up", "other", &subject).unwrap();
        assert_eq!(l.0[0]["digest"], theirs.to_string());
        // Rebuilt once: what is recorded later must index itself.
        let later = artifact(&subject, 3);
        let d = put(&store, &later, "up/app");
        assert_eq!(
            cached_referrers(&store, "up", "app", &subject)
                .unwrap()
                .0
                .len(),
            1
        );
        note_manifest(&store, &d, OCI_MANIFEST, &later).unwrap();
        assert_eq!(
            cached_referrers(&store, "up", "app", &subject)
                .unwrap()
                .0
                .len(),
            2
        );
        // A referrer evicted from the cache is no longer listed.
        store.meta().remove_objects(&[mine]).unwrap();
        let l = cached_referrers(&store, "up", "app", &subject).unwrap();
        assert_eq!(l.0.len(), 1);
        assert_eq!(l.0[0]["digest"], d.to_string());
    }

    #[test]
    fn kept_answers_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let d: Digest = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
        let kept = KeptReferrers {
            checked: UNIX_EPOCH + Duration::from_secs(5),
            index: b"{\"manifests\":[]}".to_vec(),
            link: Some("</v2/x/referrers/y?n=1>; rel=\"next\"".into()),
        };
        {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(
                store.meta().kept_referrers("up", "app", &d, "").unwrap(),
                None
            );
            store
                .meta()
                .keep_referrers("up", "app", &d, "", &kept)
                .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let m = store.meta();
        assert_eq!(m.kept_referrers("up", "app", &d, "").unwrap(), Some(kept));
        assert_eq!(m.kept_referrers("up", "app", &d, "n=1").unwrap(), None);
        assert_eq!(m.kept_referrers("up", "other", &d, "").unwrap(), None);
    }
}
