//! Referrers lists (distribution spec "Listing Referrers"): the fallback tag that names one, the
//! descriptor a referrer is listed with, parsing, filtering and writing the image index.

use super::digest::Digest;
use super::manifest;
use super::name::Tag;
use serde_json::{Map, Value, json};

/// The referrers tag schema's tag for `subject`: `<algorithm>-<hex>`, the algorithm cut to 32
/// characters and the hex to 64 (a sha512 subject's tag holds only the first 64 hex digits).
pub fn fallback_tag(subject: &Digest) -> Tag {
    let alg = subject.algorithm().as_str();
    let hex = subject.hex();
    let tag = format!(
        "{}-{}",
        &alg[..alg.len().min(32)],
        &hex[..hex.len().min(64)]
    );
    Tag::parse(&tag).expect("an algorithm name and hex digits make a valid tag")
}

/// A referrers list: the descriptors of an image index's `manifests`, each kept as the JSON
/// object it was (fields cachalot does not know pass through).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Listing(pub Vec<Map<String, Value>>);

impl Listing {
    /// Reads an image index. Anything else (not JSON, no `manifests` array, an entry that is
    /// not an object with a string `digest`) is an error saying what is wrong.
    pub fn parse(bytes: &[u8]) -> Result<Listing, String> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
        let Some(list) = v.get("manifests").and_then(Value::as_array) else {
            return Err("not an image index: no \"manifests\" array".into());
        };
        let mut out = Vec::with_capacity(list.len());
        for (i, d) in list.iter().enumerate() {
            match d {
                Value::Object(m) if m.get("digest").is_some_and(Value::is_string) => {
                    out.push(m.clone())
                }
                _ => return Err(format!("manifests[{i}] is not a descriptor")),
            }
        }
        Ok(Listing(out))
    }

    /// Only the descriptors whose `artifactType` is `artifact_type`.
    pub fn filtered(&self, artifact_type: &str) -> Listing {
        Listing(
            self.0
                .iter()
                .filter(|d| d.get("artifactType").and_then(Value::as_str) == Some(artifact_type))
                .cloned()
                .collect(),
        )
    }

    /// The image index a referrers answer is.
    pub fn to_index(&self) -> Vec<u8> {
        let v = json!({
            "schemaVersion": 2,
            "mediaType": manifest::OCI_INDEX,
            "manifests": self.0,
        });
        serde_json::to_vec(&v).expect("JSON values serialize")
    }
}

/// When `bytes` (a manifest of `media_type`, `size` bytes, digest `digest`) names a `subject`:
/// that subject and the descriptor the manifest is listed with among its referrers, with the
/// spec's `artifactType` (the manifest's own, else an image manifest's config media type) and
/// the manifest's annotations. `None` for anything else, garbage included.
pub fn as_referrer(digest: &Digest, media_type: &str, bytes: &[u8]) -> Option<(Digest, Value)> {
    // Most manifests have no subject: no JSON parse for them.
    if !bytes.windows(9).any(|w| w == b"\"subject\"") {
        return None;
    }
    let v: Value = serde_json::from_slice(bytes).ok()?;
    let subject: Digest = v.get("subject")?.get("digest")?.as_str()?.parse().ok()?;
    let mut d = Map::new();
    d.insert("mediaType".into(), Value::String(media_type.to_owned()));
    d.insert("digest".into(), Value::String(digest.to_string()));
    d.insert("size".into(), Value::from(bytes.len() as u64));
    let artifact_type = match v.get("artifactType").and_then(Value::as_str) {
        Some(a) if !a.is_empty() => Some(a),
        _ if v.get("manifests").is_some() => None,
        _ => v
            .get("config")
            .and_then(|c| c.get("mediaType"))
            .and_then(Value::as_str),
    };
    if let Some(a) = artifact_type {
        d.insert("artifactType".into(), Value::String(a.to_owned()));
    }
    if let Some(a @ Value::Object(_)) = v.get("annotations") {
        d.insert("annotations".into(), a.clone());
    }
    Some((subject, Value::Object(d)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(c: char) -> Digest {
        format!("sha256:{}", c.to_string().repeat(64))
            .parse()
            .unwrap()
    }

    #[test]
    fn fallback_tags_follow_the_tag_schema() {
        assert_eq!(
            fallback_tag(&digest('a')).to_string(),
            format!("sha256-{}", "a".repeat(64))
        );
        let long: Digest = format!("sha512:{}", "b".repeat(128)).parse().unwrap();
        assert_eq!(
            fallback_tag(&long).to_string(),
            format!("sha512-{}", "b".repeat(64))
        );
    }

    #[test]
    fn listings_parse_filter_and_refuse_garbage() {
        let index = json!({"schemaVersion": 2, "manifests": [
            {"digest": "sha256:1", "artifactType": "a/sig", "x-extra": 1},
            {"digest": "sha256:2", "artifactType": "a/sbom"},
            {"digest": "sha256:3"},
        ]});
        let l = Listing::parse(&serde_json::to_vec(&index).unwrap()).unwrap();
        assert_eq!(l.0.len(), 3);
        let sig = l.filtered("a/sig");
        assert_eq!(sig.0.len(), 1);
        assert_eq!(sig.0[0]["x-extra"], 1, "unknown fields pass through");
        let out: Value = serde_json::from_slice(&sig.to_index()).unwrap();
        assert_eq!(out["mediaType"], manifest::OCI_INDEX);
        assert_eq!(out["manifests"][0]["digest"], "sha256:1");
        assert!(Listing::parse(b"<html>").unwrap_err().contains("not JSON"));
        assert!(
            Listing::parse(b"{\"config\":{}}")
                .unwrap_err()
                .contains("no \"manifests\"")
        );
        assert!(
            Listing::parse(b"{\"manifests\":[1]}")
                .unwrap_err()
                .contains("manifests[0]")
        );
        let empty: Value = serde_json::from_slice(&Listing::default().to_index()).unwrap();
        assert_eq!(empty["manifests"], json!([]));
    }

    #[test]
    fn referrers_are_listed_with_the_specs_artifact_type() {
        let subject = digest('c');
        let own = json!({"config": {"mediaType": "cfg/x"}, "artifactType": "a/sig",
            "subject": {"digest": subject.to_string()}, "annotations": {"k": "v"}});
        let bytes = serde_json::to_vec(&own).unwrap();
        let (s, d) = as_referrer(&digest('d'), manifest::OCI_MANIFEST, &bytes).unwrap();
        assert_eq!(s, subject);
        assert_eq!(d["artifactType"], "a/sig");
        assert_eq!(d["annotations"]["k"], "v");
        assert_eq!(d["size"], bytes.len());
        let by_config = json!({"config": {"mediaType": "cfg/x"},
            "subject": {"digest": subject.to_string()}});
        let bytes = serde_json::to_vec(&by_config).unwrap();
        let (_, d) = as_referrer(&digest('d'), manifest::OCI_MANIFEST, &bytes).unwrap();
        assert_eq!(d["artifactType"], "cfg/x");
        let index = json!({"manifests": [], "subject": {"digest": subject.to_string()}});
        let bytes = serde_json::to_vec(&index).unwrap();
        let (_, d) = as_referrer(&digest('d'), manifest::OCI_INDEX, &bytes).unwrap();
        assert!(d.get("artifactType").is_none());
        assert!(as_referrer(&digest('d'), "x", b"{\"layers\":[]}").is_none());
        assert!(as_referrer(&digest('d'), "x", b"{\"subject\": 1").is_none());
        assert!(as_referrer(&digest('d'), "x", b"{\"subject\":{\"digest\":\"nope\"}}").is_none());
    }
}
