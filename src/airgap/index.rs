//! A bundle's `index.json`, read as a stream: a layout's index grows by a few hundred bytes
//! per image, so it is bounded by how many images it names (and how large any one entry is),
//! not by its size. Only what an import uses of each entry is kept.

use super::bundle::REF_NAME;
use crate::oci::Digest;
use crate::oci::descriptor::Descriptor;
use crate::oci::manifest::MAX_MANIFEST_SIZE;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, BufReader, Read};
use std::rc::Rc;

/// Images an `index.json` may name. An import holds about 200 bytes per entry (its digest,
/// size, media type and name) until it commits, so this bounds that at about 200 MB.
pub const MAX_ROOTS: usize = 1_000_000;

/// Bytes any one entry of `manifests` (or anything between two of them) may take: the cap on
/// one manifest, far above the ~300 bytes an entry takes.
pub const MAX_ENTRY_BYTES: u64 = MAX_MANIFEST_SIZE as u64;

/// One image `index.json` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Root {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    /// Its `org.opencontainers.image.ref.name` annotation; the others are not kept.
    pub name: Option<String>,
}

impl Root {
    /// As a descriptor, for the walk over what it references.
    pub fn descriptor(&self) -> Descriptor {
        Descriptor {
            media_type: self.media_type.clone(),
            digest: self.digest.clone(),
            size: self.size,
            platform: None,
            annotations: BTreeMap::new(),
        }
    }
}

/// Parses `index.json` from `r` into the images it names, in order, holding at most one entry
/// at a time besides what is kept. Errors say which entry is wrong, or that there are more than
/// `max_roots` of them.
pub fn parse(r: impl Read, max_roots: usize) -> Result<Vec<Root>, String> {
    let read = Rc::new(Cell::new(0));
    let mark = Rc::new(Cell::new(0));
    let counted = Counted {
        inner: r,
        read: read.clone(),
        mark: mark.clone(),
    };
    let mut de = serde_json::Deserializer::from_reader(BufReader::new(counted));
    let seed = IndexSeed {
        max_roots,
        read,
        mark,
    };
    let roots = seed.deserialize(&mut de).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    roots.ok_or_else(|| "index has no \"manifests\"".to_owned())
}

/// Counts what is read, and fails once more than [`MAX_ENTRY_BYTES`] were read since the last
/// entry ended: the parser buffers a string or number whole, so one endless entry could
/// otherwise take any amount of memory.
struct Counted<R> {
    inner: R,
    read: Rc<Cell<u64>>,
    mark: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let since = self.read.get() - self.mark.get();
        if since > MAX_ENTRY_BYTES {
            return Err(io::Error::other(format!(
                "an entry larger than {MAX_ENTRY_BYTES} bytes"
            )));
        }
        let room = (MAX_ENTRY_BYTES + 1 - since).min(buf.len() as u64) as usize;
        let n = self.inner.read(&mut buf[..room])?;
        self.read.set(self.read.get() + n as u64);
        Ok(n)
    }
}

struct IndexSeed {
    max_roots: usize,
    read: Rc<Cell<u64>>,
    mark: Rc<Cell<u64>>,
}

impl<'de> DeserializeSeed<'de> for IndexSeed {
    type Value = Option<Vec<Root>>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for IndexSeed {
    type Value = Option<Vec<Root>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an image index (a JSON object)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut roots = None;
        while let Some(key) = map.next_key::<String>()? {
            if key == "manifests" {
                if roots.is_some() {
                    return Err(de::Error::custom("\"manifests\" given twice"));
                }
                roots = Some(map.next_value_seed(ManifestsSeed {
                    max_roots: self.max_roots,
                    read: &self.read,
                    mark: &self.mark,
                })?);
            } else {
                map.next_value::<IgnoredAny>()?;
                self.mark.set(self.read.get());
            }
        }
        Ok(roots)
    }
}

struct ManifestsSeed<'a> {
    max_roots: usize,
    read: &'a Cell<u64>,
    mark: &'a Cell<u64>,
}

impl<'de> DeserializeSeed<'de> for ManifestsSeed<'_> {
    type Value = Vec<Root>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ManifestsSeed<'_> {
    type Value = Vec<Root>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"manifests\" as an array of descriptors")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(root) = seq.next_element_seed(EntrySeed(out.len()))? {
            if out.len() == self.max_roots {
                return Err(de::Error::custom(format!(
                    "names more than {} images (manifests)",
                    self.max_roots
                )));
            }
            out.push(root);
            self.mark.set(self.read.get());
        }
        Ok(out)
    }
}

/// One entry of `manifests`, by its position.
struct EntrySeed(usize);

impl<'de> DeserializeSeed<'de> for EntrySeed {
    type Value = Root;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EntrySeed {
    type Value = Root;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "manifests[{}] as a descriptor (a JSON object)", self.0)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let at = self.0;
        let (mut media_type, mut digest, mut size, mut name) = (None, None, None, None);
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "mediaType" => media_type = Some(map.next_value::<String>()?),
                "digest" => {
                    let s = map.next_value::<String>()?;
                    let d: Digest = s.parse().map_err(|e| {
                        de::Error::custom(format!("manifests[{at}]: invalid digest {s:?}: {e}"))
                    })?;
                    digest = Some(d);
                }
                "size" => size = Some(map.next_value::<u64>()?),
                "annotations" => name = map.next_value_seed(RefName)?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let missing = |field| de::Error::custom(format!("manifests[{at}]: no \"{field}\""));
        Ok(Root {
            media_type: media_type.unwrap_or_default(),
            digest: digest.ok_or_else(|| missing("digest"))?,
            size: size.ok_or_else(|| missing("size"))?,
            name,
        })
    }
}

/// An entry's annotations, keeping only the image's name.
struct RefName;

impl<'de> DeserializeSeed<'de> for RefName {
    type Value = Option<String>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for RefName {
    type Value = Option<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("annotations as an object of strings")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut name = None;
        while let Some(key) = map.next_key::<String>()? {
            if key == REF_NAME {
                name = Some(map.next_value::<String>()?);
            } else {
                map.next_value::<String>()?;
            }
        }
        Ok(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: usize) -> String {
        format!(
            r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":{i},"annotations":{{"a":"b","{REF_NAME}":"up/team/app:v{i}"}},"platform":{{"os":"linux","architecture":"amd64"}}}}"#,
            Digest::sha256_of(&i.to_le_bytes())
        )
    }

    fn index(n: usize) -> String {
        let entries: Vec<String> = (0..n).map(entry).collect();
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{}],"annotations":{{"x":"y"}}}}"#,
            entries.join(",")
        )
    }

    #[test]
    fn entries_keep_digest_size_type_and_name() {
        let roots = parse(index(3).as_bytes(), 10).unwrap();
        assert_eq!(roots.len(), 3);
        assert_eq!(roots[2].digest, Digest::sha256_of(&2usize.to_le_bytes()));
        assert_eq!(roots[2].size, 2);
        assert_eq!(roots[2].name.as_deref(), Some("up/team/app:v2"));
        assert_eq!(
            roots[0].media_type,
            "application/vnd.oci.image.manifest.v1+json"
        );
    }

    #[test]
    fn the_bound_is_on_entries_not_bytes() {
        // Far more bytes than the old whole-file cap, and fine.
        let big = index(20_000);
        assert!(big.len() > 4 << 20, "{}", big.len());
        assert_eq!(parse(big.as_bytes(), 20_000).unwrap().len(), 20_000);
        let e = parse(big.as_bytes(), 19_999).unwrap_err();
        assert!(e.contains("more than 19999 images"), "{e}");
    }

    #[test]
    fn garbage_is_refused_with_what_is_wrong() {
        let d = Digest::sha256_of(b"x");
        for (json, needle) in [
            ("not json", "expected"),
            ("[]", "an image index"),
            (r#"{"schemaVersion":2}"#, "no \"manifests\""),
            (r#"{"manifests":{}}"#, "array of descriptors"),
            (r#"{"manifests":[1]}"#, "manifests[0] as a descriptor"),
            (
                r#"{"manifests":[{"size":1}]}"#,
                "manifests[0]: no \"digest\"",
            ),
            (
                r#"{"manifests":[{"digest":"sha256:zz","size":1}]}"#,
                "manifests[0]: invalid digest",
            ),
            (
                &format!(r#"{{"manifests":[{{"digest":"{d}","size":-1}}]}}"#),
                "invalid value",
            ),
            (
                &format!(r#"{{"manifests":[{{"digest":"{d}","size":1}}]}} trailing"#),
                "trailing characters",
            ),
            (
                &format!(r#"{{"manifests":[{{"digest":"{d}","size":1}}]"#),
                "EOF",
            ),
        ] {
            let e = parse(json.as_bytes(), 10).unwrap_err();
            assert!(e.contains(needle), "{json}: {e}");
        }
    }

    /// One endless string must not be read into memory whole.
    #[test]
    fn an_oversized_entry_is_refused_before_it_is_read_whole() {
        let head = br#"{"manifests":[{"annotations":{"k":""#;
        let endless = io::repeat(b'a').take(64 << 20);
        let mut r = Counted {
            inner: head.chain(endless),
            read: Rc::new(Cell::new(0)),
            mark: Rc::new(Cell::new(0)),
        };
        let mut sink = Vec::new();
        let e = io::copy(&mut r, &mut sink).unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
        assert!(sink.len() < (MAX_ENTRY_BYTES as usize) + (1 << 20));
        let e = parse(head.chain(io::repeat(b'a').take(64 << 20)), 10).unwrap_err();
        assert!(e.contains("larger than"), "{e}");
    }
}
