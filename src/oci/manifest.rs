//! Manifest media types, the manifest size cap, `Accept` negotiation, and the check of a
//! manifest body as received.

use super::digest::{Algorithm, Digest, Verifier};

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

// === verification ===

/// The upstream's claim of a body's digest.
const DOCKER_CONTENT_DIGEST: &str = "docker-content-digest";

/// Which digest a manifest body failed to match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DigestCheck {
    /// The digest the manifest was asked for by.
    Requested,
    /// The upstream's `Docker-Content-Digest` header.
    Claimed,
}

impl DigestCheck {
    fn describe(self) -> &'static str {
        match self {
            DigestCheck::Requested => "the digest it was asked for",
            DigestCheck::Claimed => "the upstream's Docker-Content-Digest",
        }
    }
}

/// Why a received manifest body may not be stored or served.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest does not match {}: expected {expected}, got {actual}", .check.describe())]
    DigestMismatch {
        check: DigestCheck,
        expected: Digest,
        actual: Digest,
    },
    /// Neither a manifest `Content-Type` nor a body whose type can be told.
    #[error("manifest has no media type")]
    NoMediaType,
}

/// A manifest body that passed [`verify`]: the proof of its digest, which storing it requires,
/// and its media type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checked {
    pub proof: crate::oci::Verified,
    pub media_type: String,
}

impl Checked {
    pub fn digest(&self) -> &Digest {
        self.proof.digest()
    }
}

/// Checks a manifest body as received, with the response `headers` it came with, before
/// anything stores or serves it. Pure: the caller has read the (capped) body.
///
/// The body is hashed with the algorithm of `requested` (the digest it was asked for by), else
/// of the upstream's `Docker-Content-Digest` (a claim to check, never a fact), else SHA-256. It
/// must equal `requested`, then the claim; a claim in another algorithm than the one hashed is
/// not checked (the body is what was asked for), nor is a claim that is not a valid digest.
///
/// The media type is the `Content-Type` (parameters dropped) when it names a manifest type
/// other than plain `application/json`, else the one [`sniff_media_type`] finds in the body.
pub fn verify(
    body: &[u8],
    headers: &http::HeaderMap,
    requested: Option<&Digest>,
) -> Result<Checked, ManifestError> {
    let claimed = headers
        .get(DOCKER_CONTENT_DIGEST)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<Digest>().ok());
    let algorithm = requested
        .or(claimed.as_ref())
        .map_or(Algorithm::Sha256, Digest::algorithm);
    let mut v = Verifier::new(algorithm);
    v.update(body);
    let proof = v.prove();
    let digest = proof.digest();
    let checks = [
        (DigestCheck::Requested, requested),
        (DigestCheck::Claimed, claimed.as_ref()),
    ];
    for (check, want) in checks {
        if let Some(want) = want
            && want.algorithm() == algorithm
            && want != digest
        {
            return Err(ManifestError::DigestMismatch {
                check,
                expected: want.clone(),
                actual: digest.clone(),
            });
        }
    }
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim());
    let media_type = match content_type {
        Some(ct) if is_manifest_type(ct) && ct != "application/json" => ct.to_owned(),
        _ => sniff_media_type(body).ok_or(ManifestError::NoMediaType)?,
    };
    Ok(Checked { proof, media_type })
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

    // === verify ===

    const MANIFEST: &[u8] = br#"{"schemaVersion":2,"config":{},"layers":[]}"#;

    fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    http::HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    fn sha512_of(data: &[u8]) -> Digest {
        let mut v = Verifier::new(Algorithm::Sha512);
        v.update(data);
        v.finish()
    }

    #[test]
    fn verifies_against_the_requested_digest_and_the_claim() {
        let good = Digest::sha256_of(MANIFEST);
        let other = Digest::sha256_of(b"other");
        let ct = ("content-type", DOCKER_MANIFEST);
        let claim = |d: &Digest| ("docker-content-digest", d.to_string());

        let ok = verify(MANIFEST, &headers(&[ct]), Some(&good)).unwrap();
        assert_eq!(ok.digest(), &good);
        assert_eq!(ok.media_type, DOCKER_MANIFEST);
        let c = claim(&good);
        assert_eq!(
            verify(MANIFEST, &headers(&[ct, (c.0, &c.1)]), None)
                .unwrap()
                .digest()
                .clone(),
            good
        );

        // Asked for another digest: the requested check fails, and says so.
        let e = verify(MANIFEST, &headers(&[ct]), Some(&other)).unwrap_err();
        assert_eq!(
            e,
            ManifestError::DigestMismatch {
                check: DigestCheck::Requested,
                expected: other.clone(),
                actual: good.clone(),
            }
        );
        assert_eq!(
            e.to_string(),
            format!(
                "manifest does not match the digest it was asked for: expected {other}, got {good}"
            )
        );

        // The body is what was asked for, but the upstream claims another digest.
        let c = claim(&other);
        let e = verify(MANIFEST, &headers(&[ct, (c.0, &c.1)]), Some(&good)).unwrap_err();
        assert_eq!(
            e,
            ManifestError::DigestMismatch {
                check: DigestCheck::Claimed,
                expected: other.clone(),
                actual: good.clone(),
            }
        );
        assert!(e.to_string().contains("Docker-Content-Digest"), "{e}");
        // By tag, the claim is all there is to check against.
        let e = verify(MANIFEST, &headers(&[ct, (c.0, &c.1)]), None).unwrap_err();
        assert!(matches!(
            e,
            ManifestError::DigestMismatch {
                check: DigestCheck::Claimed,
                ..
            }
        ));

        // A claim that is not a digest is no claim.
        let h = headers(&[ct, ("docker-content-digest", "sha256:nope")]);
        assert_eq!(verify(MANIFEST, &h, None).unwrap().digest().clone(), good);
    }

    #[test]
    fn hashes_with_the_algorithm_of_what_it_checks() {
        let ct = ("content-type", OCI_MANIFEST);
        let sha512 = sha512_of(MANIFEST);
        // Asked for by a SHA-512 digest: hashed with SHA-512.
        assert_eq!(
            verify(MANIFEST, &headers(&[ct]), Some(&sha512))
                .unwrap()
                .digest()
                .clone(),
            sha512
        );
        // Only a SHA-512 claim: hashed with SHA-512, and checked.
        let h = headers(&[ct, ("docker-content-digest", &sha512.to_string())]);
        assert_eq!(verify(MANIFEST, &h, None).unwrap().digest().clone(), sha512);
        let wrong = sha512_of(b"other");
        let h = headers(&[ct, ("docker-content-digest", &wrong.to_string())]);
        assert!(matches!(
            verify(MANIFEST, &h, None),
            Err(ManifestError::DigestMismatch {
                check: DigestCheck::Claimed,
                ..
            })
        ));
        // Asked for by SHA-256, claimed in SHA-512: the claim is not checked.
        let good = Digest::sha256_of(MANIFEST);
        assert_eq!(
            verify(MANIFEST, &h, Some(&good)).unwrap().digest().clone(),
            good
        );
        // Neither: SHA-256.
        assert_eq!(
            verify(MANIFEST, &headers(&[ct]), None)
                .unwrap()
                .digest()
                .clone(),
            good
        );
    }

    #[test]
    fn picks_the_media_type_or_refuses() {
        let media = |ct: Option<&str>, body: &[u8]| {
            let h = match ct {
                Some(ct) => headers(&[("content-type", ct)]),
                None => headers(&[]),
            };
            verify(body, &h, None).map(|v| v.media_type)
        };
        // A manifest Content-Type wins, parameters dropped.
        assert_eq!(
            media(
                Some("application/vnd.oci.image.index.v1+json; charset=utf-8"),
                MANIFEST
            ),
            Ok(OCI_INDEX.to_owned())
        );
        // Plain JSON, no Content-Type or an HTML one: sniffed from the body.
        assert_eq!(
            media(Some("application/json"), MANIFEST),
            Ok(OCI_MANIFEST.to_owned())
        );
        assert_eq!(
            media(Some("application/json"), br#"{"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[]}"#),
            Ok(DOCKER_LIST.to_owned())
        );
        assert_eq!(
            media(None, br#"{"manifests":[]}"#),
            Ok(OCI_INDEX.to_owned())
        );
        assert_eq!(
            media(Some("text/html"), MANIFEST),
            Ok(OCI_MANIFEST.to_owned())
        );
        // Nothing to go by: an error, not an empty type.
        assert_eq!(
            media(Some("application/json"), br#"{"schemaVersion":2}"#),
            Err(ManifestError::NoMediaType)
        );
        assert_eq!(media(None, b"<html>"), Err(ManifestError::NoMediaType));
        assert_eq!(
            ManifestError::NoMediaType.to_string(),
            "manifest has no media type"
        );
    }
}
