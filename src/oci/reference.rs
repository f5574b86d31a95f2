//! Image references as clients write them: `nginx:1.27`, `ghcr.io/org/app@sha256:…`,
//! `127.0.0.1:5000/team/app:v1`.

use super::digest::Digest;
use super::name::{Reference, RepoName, Tag};
use std::fmt;

/// A parsed image reference: which registry, which repository, which tag or digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// The registry host as clients know it (`docker.io` when the reference names none).
    pub registry: String,
    /// The repository as that registry names it (`library/nginx` for docker.io's `nginx`).
    pub repo: RepoName,
    pub reference: Reference,
}

impl ImageRef {
    /// Parses a reference the way Docker does: the first component is a registry host when it
    /// has a `.` or a `:` or is `localhost`; a reference without a tag or digest means `latest`.
    pub fn parse(s: &str) -> Result<ImageRef, String> {
        let bad = |why: &str| format!("invalid image reference {s:?}: {why}");
        let (registry, rest) = match s.split_once('/') {
            Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => {
                (first.to_owned(), rest)
            }
            _ => ("docker.io".to_owned(), s),
        };
        let registry = if registry == "index.docker.io" {
            "docker.io".to_owned()
        } else {
            registry
        };
        let (name, reference) = if let Some((name, digest)) = rest.split_once('@') {
            let d: Digest = digest.parse().map_err(|e| bad(&format!("{e}")))?;
            // `name:tag@digest` pins by digest; the tag is informational.
            let name = name.rsplit_once(':').map_or(name, |(n, _)| n);
            (name, Reference::Digest(d))
        } else {
            match rest.rsplit_once(':') {
                Some((name, tag)) => (
                    name,
                    Reference::Tag(Tag::parse(tag).map_err(|_| bad("bad tag"))?),
                ),
                None => (
                    rest,
                    Reference::Tag(Tag::parse("latest").expect("valid tag")),
                ),
            }
        };
        let repo = RepoName::parse(name).map_err(|_| bad("bad repository name"))?;
        let repo = if registry == "docker.io" {
            repo.with_library_prefix()
        } else {
            repo
        };
        Ok(ImageRef {
            registry,
            repo,
            reference,
        })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reference {
            Reference::Tag(t) => write!(f, "{}/{}:{}", self.registry, self.repo, t),
            Reference::Digest(d) => write!(f, "{}/{}@{}", self.registry, self.repo, d),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_like_docker() {
        let r = ImageRef::parse("nginx:1.27").unwrap();
        assert_eq!(r.to_string(), "docker.io/library/nginx:1.27");
        assert_eq!(
            ImageRef::parse("nginx").unwrap().to_string(),
            "docker.io/library/nginx:latest"
        );
        assert_eq!(
            ImageRef::parse("bitnami/redis:7").unwrap().to_string(),
            "docker.io/bitnami/redis:7"
        );
        let r = ImageRef::parse("127.0.0.1:5000/team/app:v1").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repo.as_str()),
            ("127.0.0.1:5000", "team/app")
        );
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let r = ImageRef::parse(&format!("ghcr.io/org/app@{d}")).unwrap();
        assert_eq!(r.reference, Reference::Digest(d.parse().unwrap()));
        assert_eq!(
            ImageRef::parse("registry.k8s.io/pause:3.10")
                .unwrap()
                .registry,
            "registry.k8s.io"
        );
        assert_eq!(
            ImageRef::parse("localhost/x").unwrap().registry,
            "localhost"
        );
        assert!(ImageRef::parse("Nginx:1").is_err());
        assert!(ImageRef::parse("nginx@sha256:nope").is_err());
        assert!(ImageRef::parse("nginx:").is_err());
    }
}
