//! Manifest media types, the manifest size cap, and `Accept` negotiation.

/// Manifests larger than this are refused: they live in memory, and clients cap them too.
pub const MAX_MANIFEST_SIZE: usize = 4 * 1024 * 1024;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_V1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
pub const DOCKER_V1: &str = "application/vnd.docker.distribution.manifest.v1+json";

/// Every manifest type, sent upstream when a client states no preference, so the upstream
/// answers with what it actually holds (an index stays an index).
pub const ALL_MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// What a client said it accepts, merged over repeated `Accept` lines, parameters stripped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Accept {
    types: Vec<String>,
}

impl Accept {
    pub fn parse<'a>(lines: impl IntoIterator<Item = &'a str>) -> Accept {
        let mut types = Vec::new();
        for line in lines {
            for part in line.split(',') {
                let t = part
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase();
                if !t.is_empty() && !types.contains(&t) {
                    types.push(t);
                }
            }
        }
        Accept { types }
    }

    /// True when the client named no type, or a wildcard: it takes whatever the upstream has.
    pub fn is_any(&self) -> bool {
        self.types.is_empty()
            || self
                .types
                .iter()
                .any(|t| t == "*/*" || t == "application/*")
    }

    /// Whether a manifest of `media_type` may be served to this client.
    pub fn allows(&self, media_type: &str) -> bool {
        self.is_any()
            || self
                .types
                .iter()
                .any(|t| t.eq_ignore_ascii_case(media_type))
    }

    /// The header value forwarded upstream: the client's own list, or every manifest type when
    /// it named none but wildcards (an upstream given `*/*` may fall back to schema 1, or
    /// refuse an OCI manifest, as distribution does).
    pub fn upstream_value(&self) -> String {
        if self
            .types
            .iter()
            .all(|t| t == "*/*" || t == "application/*")
        {
            ALL_MANIFEST_TYPES.to_owned()
        } else {
            self.types.join(", ")
        }
    }
}

/// The media type of a manifest body that came without a usable `Content-Type`: the
/// `mediaType` field when present, else guessed from the shape.
pub fn sniff_media_type(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    if let Some(mt) = v.get("mediaType").and_then(|m| m.as_str()) {
        return Some(mt.to_owned());
    }
    if v.get("manifests").is_some() {
        Some(OCI_INDEX.to_owned())
    } else if v.get("config").is_some() {
        Some(OCI_MANIFEST.to_owned())
    } else if v.get("signatures").is_some() {
        Some(DOCKER_V1_SIGNED.to_owned())
    } else {
        None
    }
}

/// Whether a `Content-Type` value names a manifest (rather than, say, an HTML error page).
pub fn is_manifest_type(media_type: &str) -> bool {
    let t = media_type.split(';').next().unwrap_or("").trim();
    t.starts_with("application/vnd.") || t == "application/json"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_lines_and_strips_params() {
        let a = Accept::parse([
            "application/vnd.oci.image.index.v1+json; q=0.5",
            "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.index.v1+json",
        ]);
        assert!(a.allows(OCI_INDEX));
        assert!(a.allows(DOCKER_MANIFEST));
        assert!(!a.allows(DOCKER_LIST));
        assert!(!a.is_any());
        assert_eq!(
            a.upstream_value(),
            format!("{OCI_INDEX}, {DOCKER_MANIFEST}")
        );
    }

    #[test]
    fn wildcard_and_empty_take_anything() {
        assert!(Accept::parse(["*/*"]).allows(DOCKER_LIST));
        assert!(Accept::parse([]).allows(OCI_MANIFEST));
        assert_eq!(Accept::parse([]).upstream_value(), ALL_MANIFEST_TYPES);
        assert_eq!(Accept::parse(["*/*"]).upstream_value(), ALL_MANIFEST_TYPES);
    }

    #[test]
    fn sniffs() {
        assert_eq!(
            sniff_media_type(br#"{"manifests":[]}"#).as_deref(),
            Some(OCI_INDEX)
        );
        assert_eq!(
            sniff_media_type(
                br#"{"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json"}"#
            )
            .as_deref(),
            Some(DOCKER_LIST)
        );
        assert_eq!(sniff_media_type(b"not json"), None);
    }
}
