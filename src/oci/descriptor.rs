//! What a manifest references: the descriptors of an index's manifests (with their platforms)
//! and of an image manifest's config and layers. Only the fields cachalot walks are parsed.

use super::digest::Digest;
use super::manifest;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A content descriptor, digest checked at parse time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    pub platform: Option<Platform>,
    pub annotations: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// A manifest's outgoing references.
#[derive(Clone, Debug)]
pub enum Refs {
    /// An OCI index or Docker manifest list: its manifests.
    Index(Vec<Descriptor>),
    /// An image manifest (or artifact): its config and layers.
    Image {
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
}

#[derive(Deserialize)]
struct RawDescriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct RawManifest {
    #[serde(default)]
    manifests: Option<Vec<RawDescriptor>>,
    #[serde(default)]
    config: Option<RawDescriptor>,
    #[serde(default)]
    layers: Option<Vec<RawDescriptor>>,
}

impl RawDescriptor {
    fn check(self, what: &str) -> Result<Descriptor, String> {
        let digest = self
            .digest
            .parse()
            .map_err(|e| format!("{what}: invalid digest {:?}: {e}", self.digest))?;
        Ok(Descriptor {
            media_type: self.media_type,
            digest,
            size: self.size,
            platform: self.platform,
            annotations: self.annotations,
        })
    }
}

/// Parses the references out of a manifest of `media_type` (sniffed when empty or generic).
/// Errors say which field is wrong.
pub fn parse_refs(media_type: &str, bytes: &[u8]) -> Result<Refs, String> {
    let media_type = match media_type {
        "" | "application/json" => manifest::sniff_media_type(bytes).unwrap_or_default(),
        m => m.to_owned(),
    };
    if media_type == manifest::DOCKER_V1 || media_type == manifest::DOCKER_V1_SIGNED {
        return Err(format!("{media_type} manifests are not supported"));
    }
    let raw: RawManifest =
        serde_json::from_slice(bytes).map_err(|e| format!("not a manifest: {e}"))?;
    let is_index = media_type == manifest::OCI_INDEX || media_type == manifest::DOCKER_LIST;
    if is_index || (raw.manifests.is_some() && raw.config.is_none()) {
        let list = raw
            .manifests
            .ok_or_else(|| "index has no \"manifests\"".to_owned())?;
        let list = list
            .into_iter()
            .enumerate()
            .map(|(i, d)| d.check(&format!("manifests[{i}]")))
            .collect::<Result<_, _>>()?;
        return Ok(Refs::Index(list));
    }
    let config = raw
        .config
        .ok_or_else(|| "image manifest has no \"config\"".to_owned())?
        .check("config")?;
    let layers = raw
        .layers
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, d)| d.check(&format!("layers[{i}]")))
        .collect::<Result<_, _>>()?;
    Ok(Refs::Image { config, layers })
}

/// Every digest a manifest holds: an index's manifests, an image's config and layers, an
/// artifact's blobs. What a repository holding the manifest holds too, for scoping blobs. Not a
/// referrer's `subject`: a referrer names its subject without holding it (a registry accepts
/// one whose subject lives elsewhere), so linking it would let anyone who can push an artifact
/// to a public repository read a private image through the mirror by its digest. Lenient: a descriptor whose digest does not parse is skipped, and
/// bytes that are not JSON name nothing (the manifest was verified by digest, not by schema).
pub fn referenced_digests(bytes: &[u8]) -> Vec<Digest> {
    #[derive(Deserialize)]
    struct Named {
        digest: String,
    }
    #[derive(Deserialize)]
    struct Any {
        #[serde(default)]
        manifests: Vec<Named>,
        #[serde(default)]
        config: Option<Named>,
        #[serde(default)]
        layers: Vec<Named>,
        #[serde(default)]
        blobs: Vec<Named>,
    }
    let Ok(any) = serde_json::from_slice::<Any>(bytes) else {
        return Vec::new();
    };
    let Any {
        manifests,
        config,
        layers,
        blobs,
    } = any;
    manifests
        .into_iter()
        .chain(config)
        .chain(layers)
        .chain(blobs)
        .filter_map(|n| n.digest.parse().ok())
        .collect()
}

/// Whether a media type names a manifest (index or image) rather than a config or layer.
pub fn is_manifest_media_type(media_type: &str) -> bool {
    matches!(
        media_type,
        manifest::OCI_INDEX
            | manifest::OCI_MANIFEST
            | manifest::DOCKER_LIST
            | manifest::DOCKER_MANIFEST
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_and_image() {
        let d = format!("sha256:{}", "b".repeat(64));
        let idx = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[{{"mediaType":"{}","digest":"{d}","size":7,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}}]}}"#,
            manifest::OCI_INDEX,
            manifest::OCI_MANIFEST
        );
        match parse_refs(manifest::OCI_INDEX, idx.as_bytes()).unwrap() {
            Refs::Index(list) => {
                assert_eq!(list[0].size, 7);
                assert_eq!(
                    list[0].platform.as_ref().unwrap().to_string(),
                    "linux/arm64/v8"
                );
            }
            other => panic!("{other:?}"),
        }
        let img = format!(
            r#"{{"config":{{"digest":"{d}","size":2}},"layers":[{{"digest":"{d}","size":3}}]}}"#
        );
        assert!(matches!(
            parse_refs("", img.as_bytes()).unwrap(),
            Refs::Image { layers, .. } if layers.len() == 1
        ));
        let e = parse_refs(
            manifest::OCI_MANIFEST,
            br#"{"config":{"digest":"md5:x","size":1}}"#,
        )
        .unwrap_err();
        assert!(e.contains("config"), "{e}");
        assert!(parse_refs(manifest::OCI_INDEX, b"[").is_err());
    }

    #[test]
    fn referenced_digests_cover_every_kind_of_reference() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let img = format!(
            r#"{{"config":{{"digest":"{}","size":2}},"layers":[{{"digest":"{}","size":3}}],"subject":{{"digest":"{}","size":4}}}}"#,
            d('a'),
            d('b'),
            d('c')
        );
        let got: Vec<String> = referenced_digests(img.as_bytes())
            .iter()
            .map(Digest::to_string)
            .collect();
        assert_eq!(got, [d('a'), d('b')], "a subject is named, not held");
        let artifact = format!(
            r#"{{"blobs":[{{"digest":"{}"}},{{"digest":"md5:x"}}],"manifests":[{{"digest":"{}"}}]}}"#,
            d('e'),
            d('f')
        );
        assert_eq!(referenced_digests(artifact.as_bytes()).len(), 2);
        assert!(referenced_digests(b"not json").is_empty());
    }
}
