//! Bundles: an OCI image layout in a tar (`oci-layout`, `index.json`, `blobs/<alg>/<hex>`),
//! written from the cache and read back into one. Import stages and verifies everything before
//! anything becomes visible.

use super::index::{self, MAX_ROOTS, Root};
use super::prefetch::Prefetched;
use crate::config::Config;
use crate::error::Error;
use crate::oci::descriptor::{self, Descriptor, Refs};
use crate::oci::manifest::{MAX_MANIFEST_SIZE, OCI_INDEX};
use crate::oci::{Digest, ImageRef, Reference, Verifier};
use crate::storage::batch::Batch;
use crate::storage::referrers::{ImportedReferrer, imported_referrer};
use crate::storage::{Access, Blob, FileReader, FsStore, Store};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::sync::Arc;

/// The annotation that names an image in an OCI layout's `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

// === export ===

/// What an export wrote.
#[derive(Debug, Default)]
pub struct Written {
    pub blobs: usize,
    pub bytes: u64,
}

/// Writes `images` (all cached, as prefetch left them) from the cache at `root` to `output`,
/// through a temp file renamed at the end, so a failed export leaves no half bundle.
/// Blocking. An I/O failure names the file it happened on.
pub fn export(root: &Path, images: &[Prefetched], output: &Path) -> Result<Written, Error> {
    let name = output
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{}: not a file name", output.display())))?;
    let temp = output.with_file_name(format!(
        ".{}.partial-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = write_layout(root, images, &temp);
    match result {
        Ok(w) => {
            std::fs::rename(&temp, output).map_err(|e| io_at(output, e))?;
            Ok(w)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&temp);
            Err(e)
        }
    }
}

/// An I/O failure on `path`, naming it.
fn io_at(path: &Path, e: io::Error) -> Error {
    Error::from(e).context(path.display().to_string())
}

fn write_layout(root: &Path, images: &[Prefetched], temp: &Path) -> Result<Written, Error> {
    let out = |e: io::Error| io_at(temp, e);
    let file = File::create(temp).map_err(out)?;
    let mut tar = tar::Builder::new(BufWriter::new(file));
    let mut entries = Vec::new();
    let mut blobs: BTreeMap<Digest, u64> = BTreeMap::new();
    for p in images {
        let mut annotations = BTreeMap::new();
        annotations.insert(REF_NAME.to_owned(), p.image.to_string());
        entries.push(json!({
            "mediaType": p.top.media_type,
            "digest": p.top.digest.to_string(),
            "size": p.top.size,
            "annotations": annotations,
        }));
        for r in &p.referrers {
            entries.push(json!({
                "mediaType": r.media_type,
                "digest": r.digest.to_string(),
                "size": r.size,
            }));
        }
        blobs.extend(p.manifests.iter().map(|(d, (_, size))| (d.clone(), *size)));
        blobs.extend(p.blobs.iter().map(|(d, s)| (d.clone(), *s)));
    }
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries});
    let index = serde_json::to_vec_pretty(&index)
        .map_err(|e| Error::Internal(format!("index.json: {e}")))?;
    append_bytes(&mut tar, "oci-layout", OCI_LAYOUT).map_err(out)?;
    append_bytes(&mut tar, "index.json", &index).map_err(out)?;
    append_dir(&mut tar, "blobs/").map_err(out)?;
    let algorithms: BTreeSet<&str> = blobs.keys().map(|d| d.algorithm().as_str()).collect();
    for a in algorithms {
        append_dir(&mut tar, &format!("blobs/{a}/")).map_err(out)?;
    }
    let mut written = Written::default();
    for (digest, size) in &blobs {
        let path = FsStore::blob_path_in(root, digest);
        let f = File::open(&path).map_err(|e| {
            Error::from(e).context(format!(
                "{digest} is no longer in the cache ({})",
                path.display()
            ))
        })?;
        let len = f.metadata().map_err(|e| io_at(&path, e))?.len();
        if len != *size {
            return Err(Error::from(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{digest}: the cache holds {len} bytes, its descriptor says {size}"),
            )));
        }
        let mut h = header(tar::EntryType::Regular, len);
        tar.append_data(
            &mut h,
            format!("blobs/{}/{}", digest.algorithm().as_str(), digest.hex()),
            f,
        )
        .map_err(out)?;
        written.blobs += 1;
        written.bytes += len;
    }
    let w = tar.into_inner().map_err(out)?;
    let f = w.into_inner().map_err(|e| out(e.into_error()))?;
    f.sync_all().map_err(out)?;
    Ok(written)
}

fn header(kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
    h.set_mtime(0);
    h
}

fn append_bytes<W: Write>(tar: &mut tar::Builder<W>, path: &str, bytes: &[u8]) -> io::Result<()> {
    let mut h = header(tar::EntryType::Regular, bytes.len() as u64);
    tar.append_data(&mut h, path, bytes)
}

fn append_dir<W: Write>(tar: &mut tar::Builder<W>, path: &str) -> io::Result<()> {
    let mut h = header(tar::EntryType::Directory, 0);
    tar.append_data(&mut h, path, io::empty())
}

// === import ===

/// What an import loaded.
#[derive(Debug, Default)]
pub struct Imported {
    pub blobs: usize,
    /// Blobs that were not in the cache before.
    pub new_blobs: usize,
    pub bytes: u64,
    pub manifests: usize,
    pub tags: Vec<String>,
    /// Names in `index.json` that could not become tags, and why.
    pub warnings: Vec<String>,
}

/// Loads `bundle` into `store`, the filesystem cache at `config.cache.dir`: every blob is
/// written to a staging file while hashed and checked against its name (no sync per file),
/// `index.json` and every manifest reachable from it are checked for references that are
/// neither in the bundle nor already cached, and only then are the new blobs renamed into
/// place, synced once, and recorded with the manifests, links and tags in one metadata
/// transaction ([`Batch::commit`]), its referrers indexed in the same one. Any error, or a
/// crash, before that commit leaves nothing of the bundle visible.
/// Blocking.
///
/// Errors are one line naming the bundle and the part of it at fault: [`Error::Invalid`] when
/// the bundle is, a storage error when the cache could not take it.
pub fn import(store: &Store, config: &Config, bundle: &Path) -> Result<Imported, Error> {
    let i = Import { bundle };
    let mut batch =
        Batch::begin(&config.cache.dir).map_err(|e| io_at(&config.cache.dir.join("tmp"), e))?;
    let (layout, index) = i.unpack(&mut batch)?;
    let roots = i.roots(&layout, index)?;
    // Verify the graph before anything is committed.
    let mut check = Check {
        store,
        staged: &batch,
        manifests: BTreeMap::new(),
        edges: BTreeMap::new(),
        referrers: Vec::new(),
    };
    for (n, root) in roots.iter().enumerate() {
        let name = root
            .name
            .clone()
            .unwrap_or_else(|| format!("manifests[{n}]"));
        check
            .walk(&root.descriptor(), &format!("index.json {name}"), 0)
            .map_err(|e| i.at("invalid bundle", e))?;
    }
    let links = repo_links(config, &roots, &check);
    // What the walk kept beyond the manifests is a digest per edge: gone before the commit,
    // which is when an import holds the most.
    let Check {
        manifests,
        referrers,
        ..
    } = check;
    let mut out = Imported::default();
    let named = i.tags(config, &roots, &mut out)?;
    drop(roots);
    let mut tags = Vec::with_capacity(named.len());
    for (r, tag, root) in named {
        tags.push((
            r.registry.clone(),
            r.repo.to_string(),
            tag,
            manifests[&root].clone(),
            root,
        ));
        out.tags.push(r.to_string());
    }
    (out.blobs, out.bytes) = batch.totals();
    out.manifests = manifests.len();
    // A stored copy that no longer matches its digest is quarantined now, so that the batch
    // places the bundle's verified copy in its stead: importing again repairs the cache.
    for digest in batch.digests() {
        crate::storage::integrity::needs_storing(&**store.blobs(), digest)
            .map_err(|e| i.at(&format!("checking the stored {digest}"), e.into()))?;
    }
    out.new_blobs = batch
        .commit(store.meta(), &manifests, &links, &tags, &referrers)
        .map_err(|e| i.at("storing the bundle", e.into()))?;
    Ok(out)
}

/// (upstream, repository, everything an image named there holds).
type RepoLink = (String, String, Vec<Digest>);

/// The repositories the bundle names its images under, with what each image holds: imported
/// blobs are served under their image's repository (and, until an upstream confirms it, no
/// other). A root without a full reference on a configured registry links nothing.
fn repo_links(config: &Config, roots: &[Root], check: &Check<'_>) -> Vec<RepoLink> {
    let mut out = Vec::new();
    for root in roots {
        let Some(name) = &root.name else {
            continue;
        };
        if !ImageRef::is_fully_qualified(name) {
            continue;
        }
        let Ok(r) = ImageRef::parse(name) else {
            continue;
        };
        if !config.upstream.iter().any(|u| u.name == r.registry) {
            continue;
        }
        out.push((
            r.registry.clone(),
            r.repo.to_string(),
            check.closure(&root.digest),
        ));
    }
    out
}

/// One import under way: the bundle, for errors that name the part at fault.
struct Import<'a> {
    bundle: &'a Path,
}

/// What a bundle holds besides its blobs (staged): `oci-layout`, the images `index.json` names.
type Unpacked = (Vec<u8>, Vec<Root>);

/// An image the bundle names by tag: the reference, its tag, and its root manifest.
type NamedTag = (ImageRef, String, Digest);

impl Import<'_> {
    /// The bundle is at fault: `what` part of it, and why.
    fn bad(&self, what: &str, e: &dyn std::fmt::Display) -> Error {
        Error::Invalid(format!("{}: {what}: {e}", self.bundle.display()))
    }

    /// Whatever `e` is, it happened on `what` part of this bundle.
    fn at(&self, what: &str, e: Error) -> Error {
        e.context(format!("{}: {what}", self.bundle.display()))
    }

    /// Reads the tar: `oci-layout`, `index.json`, and every blob into `batch`, verified.
    fn unpack(&self, batch: &mut Batch) -> Result<Unpacked, Error> {
        let file = File::open(self.bundle)
            .map_err(|e| Error::Invalid(format!("{}: {e}", self.bundle.display())))?;
        let mut layout = None;
        let mut index = None;
        let mut buf = vec![0u8; 256 << 10];
        let mut archive = tar::Archive::new(BufReader::new(file));
        let entries = archive
            .entries()
            .map_err(|e| self.bad("not a tar archive", &e))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| self.bad("corrupt or truncated archive", &e))?;
            let path = entry
                .path()
                .map_err(|e| self.bad("entry with a bad name", &e))?
                .to_string_lossy()
                .trim_start_matches("./")
                .to_owned();
            let kind = entry.header().entry_type();
            if kind.is_dir() || path.is_empty() {
                continue;
            }
            let declared = entry.header().size().unwrap_or(0);
            let at = |e| self.at(&path, e);
            match path.as_str() {
                "oci-layout" => layout = Some(read_capped(&mut entry, 4096, declared).map_err(at)?),
                // Parsed as it is read, so a bad one is refused before any blob is staged
                // when it comes first (as `export` writes it).
                "index.json" => {
                    let roots = index::parse(&mut entry, MAX_ROOTS)
                        .map_err(|e| self.bad("index.json", &e))?;
                    index = Some(roots)
                }
                p if p.starts_with("blobs/") => {
                    if !kind.is_file() {
                        return Err(self.bad(&path, &"not a regular file"));
                    }
                    let digest = blob_name(p).ok_or_else(|| {
                        self.bad(&path, &"not named blobs/<algorithm>/<hex digest>")
                    })?;
                    if !batch.contains(&digest) {
                        let size =
                            stage(&mut entry, batch, &digest, declared, &mut buf).map_err(at)?;
                        batch.staged(digest, size);
                    }
                }
                _ => {}
            }
        }
        let layout =
            layout.ok_or_else(|| self.bad("oci-layout", &"missing: not an OCI image layout"))?;
        let index = index.ok_or_else(|| self.bad("index.json", &"missing"))?;
        Ok((layout, index))
    }

    /// The images `index.json` names, once `oci-layout` says this is a layout.
    fn roots(&self, layout: &[u8], roots: Vec<Root>) -> Result<Vec<Root>, Error> {
        let v: serde_json::Value =
            serde_json::from_slice(layout).map_err(|e| self.bad("oci-layout", &e))?;
        if v["imageLayoutVersion"].as_str().is_none() {
            return Err(self.bad("oci-layout", &"no imageLayoutVersion"));
        }
        if roots.is_empty() {
            return Err(self.bad("index.json", &"names no image"));
        }
        Ok(roots)
    }

    /// The tags the bundle's images are named by; a name that is not a full reference is a
    /// warning, one on a registry the config does not know an error.
    fn tags(
        &self,
        config: &Config,
        roots: &[Root],
        out: &mut Imported,
    ) -> Result<Vec<NamedTag>, Error> {
        let mut tags = Vec::new();
        for root in roots {
            let Some(name) = &root.name else {
                continue;
            };
            if !ImageRef::is_fully_qualified(name) {
                out.warnings.push(format!(
                    "{name:?} is not a full reference (registry/repository:tag); imported by digest only"
                ));
                continue;
            }
            let r = ImageRef::parse(name).map_err(|e| self.at("index.json", e.into()))?;
            if !config.upstream.iter().any(|u| u.name == r.registry) {
                return Err(self.bad(
                    "index.json",
                    &format!(
                        "{name:?} is on registry {:?}, which no [[upstream]] in the config names",
                        r.registry
                    ),
                ));
            }
            match &r.reference {
                Reference::Tag(t) => tags.push((r.clone(), t.to_string(), root.digest.clone())),
                Reference::Digest(d) if *d == root.digest => {}
                Reference::Digest(d) => {
                    return Err(self.bad(
                        "index.json",
                        &format!("{name:?} names {d}, but its descriptor is {}", root.digest),
                    ));
                }
            }
        }
        Ok(tags)
    }
}

/// `blobs/sha256/<hex>` -> the digest.
fn blob_name(path: &str) -> Option<Digest> {
    let mut parts = path.split('/');
    let (_, alg, hex) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    format!("{alg}:{hex}").parse().ok()
}

/// A small entry, whole. Reading fails only for the bundle's sake (truncated, corrupt).
fn read_capped(r: &mut impl Read, cap: usize, declared: u64) -> Result<Vec<u8>, Error> {
    if declared > cap as u64 {
        return Err(Error::Invalid(format!("larger than {cap} bytes")));
    }
    let mut buf = Vec::new();
    r.take(cap as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Error::Invalid(e.to_string()))?;
    if (buf.len() as u64) < declared {
        return Err(Error::Invalid(format!(
            "truncated: {} of {declared} bytes",
            buf.len()
        )));
    }
    Ok(buf)
}

/// Copies one entry into its staging file, hashing as it goes; the digest must match its name.
/// Returns its size. A read that fails or ends short, or a mismatch, is the bundle's fault; a
/// failed write, the cache's. The file is closed unsynced: the batch syncs once, at the end.
fn stage(
    r: &mut impl Read,
    batch: &Batch,
    digest: &Digest,
    declared: u64,
    buf: &mut [u8],
) -> Result<u64, Error> {
    let mut f = batch.create(digest)?;
    let mut v = Verifier::new(digest.algorithm());
    let mut size = 0u64;
    loop {
        let k = r.read(buf).map_err(|e| Error::Invalid(e.to_string()))?;
        if k == 0 {
            break;
        }
        v.update(&buf[..k]);
        f.write_all(&buf[..k])?;
        size += k as u64;
    }
    if size < declared {
        return Err(Error::Invalid(format!(
            "truncated: {size} of {declared} bytes"
        )));
    }
    v.verify(digest).map_err(|m| {
        Error::Invalid(format!(
            "content does not match its digest (it hashes to {})",
            m.actual
        ))
    })?;
    Ok(size)
}

/// The reference check over the staged bundle (and what the cache already holds).
struct Check<'a> {
    store: &'a Store,
    staged: &'a Batch,
    /// Manifests reached, with their media types.
    manifests: BTreeMap<Digest, String>,
    /// What each manifest reached names that the bundle or the cache has.
    edges: BTreeMap<Digest, Vec<Digest>>,
    /// The manifests reached that name a subject.
    referrers: Vec<ImportedReferrer>,
}

impl Check<'_> {
    /// `root` and everything reachable from it, for linking to the repository that names it.
    fn closure(&self, root: &Digest) -> Vec<Digest> {
        let mut seen = std::collections::BTreeSet::new();
        let mut todo = vec![root.clone()];
        while let Some(d) = todo.pop() {
            if let Some(children) = self.edges.get(&d) {
                todo.extend(children.iter().filter(|c| !seen.contains(*c)).cloned());
            }
            seen.insert(d);
        }
        seen.into_iter().collect()
    }
}

/// Deeper nesting than this is no image anyone builds; it bounds the walk.
const MAX_DEPTH: usize = 8;

impl Check<'_> {
    /// The size of a blob in the bundle or the cache, if it is in either.
    fn size(&self, d: &Digest) -> Option<u64> {
        if let Some(s) = self.staged.size(d) {
            return Some(s);
        }
        self.store.blobs().stat(d).ok().flatten()
    }

    fn present(&self, d: &Descriptor, ctx: &str, what: &str) -> Result<(), Error> {
        match self.size(&d.digest) {
            None => Err(Error::Invalid(format!(
                "{ctx}: {what} {} is missing from the bundle",
                d.digest
            ))),
            Some(len) if len != d.size => Err(Error::Invalid(format!(
                "{ctx}: {what} {} has {len} bytes, its descriptor says {}",
                d.digest, d.size
            ))),
            Some(_) => Ok(()),
        }
    }

    fn read(&self, d: &Digest) -> Result<Vec<u8>, Error> {
        let blob = match self.staged.size(d) {
            // Opened here, for manifests only: a descriptor per staged blob would run out of
            // them before a large bundle checked out.
            Some(len) => Blob {
                reader: Arc::new(FileReader::new(File::open(self.staged.path(d))?)),
                len,
                verified: true,
            },
            None => match self.store.blobs().open(d, Access::Quiet)? {
                Some(b) => b,
                None => return Ok(Vec::new()),
            },
        };
        Ok(blob.read_all(MAX_MANIFEST_SIZE)?)
    }

    fn walk(&mut self, d: &Descriptor, ctx: &str, depth: usize) -> Result<(), Error> {
        self.present(d, ctx, "manifest")?;
        if self.manifests.contains_key(&d.digest) {
            return Ok(());
        }
        if depth > MAX_DEPTH {
            return Err(Error::Invalid(format!(
                "{ctx}: indexes nested deeper than {MAX_DEPTH}"
            )));
        }
        if d.size > MAX_MANIFEST_SIZE as u64 {
            return Err(Error::Invalid(format!(
                "{ctx}: manifest {} is larger than {MAX_MANIFEST_SIZE} bytes",
                d.digest
            )));
        }
        let bytes = self.read(&d.digest)?;
        let media_type = match d.media_type.as_str() {
            "" | "application/json" => {
                crate::oci::manifest::sniff_media_type(&bytes).ok_or_else(|| {
                    Error::Invalid(format!("{ctx}: manifest {} has no media type", d.digest))
                })?
            }
            m => m.to_owned(),
        };
        let refs = descriptor::parse_refs(&media_type, &bytes)
            .map_err(|e| Error::Invalid(format!("{ctx}: manifest {}: {e}", d.digest)))?;
        if let Some(r) = imported_referrer(&d.digest, &media_type, &bytes)
            .map_err(|e| Error::Invalid(format!("{ctx}: manifest {}: {e}", d.digest)))?
        {
            self.referrers.push(r);
        }
        self.manifests.insert(d.digest.clone(), media_type);
        let named = match &refs {
            Refs::Index(children) => children.iter().map(|c| c.digest.clone()).collect(),
            Refs::Image { config, layers } => std::iter::once(config.digest.clone())
                .chain(layers.iter().map(|l| l.digest.clone()))
                .filter(|c| self.size(c).is_some())
                .collect(),
        };
        self.edges.insert(d.digest.clone(), named);
        match refs {
            Refs::Index(children) => {
                // An export of some platforms carries the index whole, and only those
                // platforms' manifests; the others are simply not in the bundle.
                let present: Vec<&Descriptor> = children
                    .iter()
                    .filter(|c| self.size(&c.digest).is_some())
                    .collect();
                if present.is_empty() && !children.is_empty() {
                    return Err(Error::Invalid(format!(
                        "{ctx}: none of the {} manifests of index {} is in the bundle",
                        children.len(),
                        d.digest
                    )));
                }
                for c in present {
                    self.walk(c, ctx, depth + 1)?;
                }
            }
            Refs::Image { config, layers } => {
                self.present(&config, ctx, "config")?;
                for l in &layers {
                    self.present(l, ctx, "layer")?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_descriptors() -> usize {
        std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
    }

    /// A bundle's blobs wait, staged, for the whole bundle to check out: however many there
    /// are, they must not hold a descriptor each, or a large bundle runs out of them.
    #[test]
    fn staged_blobs_hold_no_descriptors() {
        let dir = tempfile::tempdir().unwrap();
        let _store = Store::open(dir.path()).unwrap();
        let mut batch = Batch::begin(dir.path()).unwrap();
        let before = open_descriptors();
        let mut buf = vec![0; 1024];
        for i in 0..400u32 {
            let bytes = i.to_le_bytes();
            let d = Digest::sha256_of(&bytes);
            let size = stage(&mut &bytes[..], &batch, &d, 4, &mut buf).unwrap();
            batch.staged(d, size);
        }
        // Other tests in this process open files meanwhile; 400 would be one per blob.
        assert!(
            open_descriptors() < before + 100,
            "{} descriptors open for {} staged blobs (from {before})",
            open_descriptors(),
            batch.totals().0
        );
        // Dropped uncommitted, the batch leaves nothing behind.
        drop(batch);
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }
}
