//! Image references as clients write them (`nginx:1.27`, `ghcr.io/org/app@sha256:...`,
//! `127.0.0.1:5000/x/y:tag`), and platform selectors (`linux/arm64/v8`).

use super::digest::Digest;
use super::name::{Reference, RepoName, Tag};

/// A reference or platform that does not parse; the message names it and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidRef(pub String);
use std::fmt;

/// The registry a reference that names none is on.
pub const DOCKER_HUB: &str = "docker.io";

/// A fully resolved image reference: registry host, repository as that registry names it, and
/// a tag or digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// The registry host as written (`docker.io` for Docker Hub under any of its names).
    pub registry: String,
    pub repo: RepoName,
    pub reference: Reference,
}

impl ImageRef {
    /// Parses a reference the way Docker does: the first component is a registry when it has a
    /// `.` or `:` or is `localhost`; otherwise the image is on docker.io, where one-component
    /// names get `library/`. No tag means `latest`; a digest wins over a tag.
    ///
    /// Fails with an [`InvalidRef`] naming the reference and what is wrong with it.
    pub fn parse(s: &str) -> Result<ImageRef, InvalidRef> {
        let bad = |why: &str| Err(InvalidRef(format!("image reference {s:?}: {why}")));
        let s_trim = s.trim();
        if s_trim.is_empty() {
            return bad("empty");
        }
        let (name_tag, digest) = match s_trim.split_once('@') {
            Some((n, d)) => match d.parse::<Digest>() {
                Ok(d) => (n, Some(d)),
                Err(e) => return bad(&format!("invalid digest: {e}")),
            },
            None => (s_trim, None),
        };
        let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_tag[last_slash..].rfind(':') {
            Some(i) => (
                &name_tag[..last_slash + i],
                Some(&name_tag[last_slash + i + 1..]),
            ),
            None => (name_tag, None),
        };
        let (registry, path) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first, rest)
            }
            _ => (DOCKER_HUB, name),
        };
        let registry = match registry {
            "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB,
            r => r,
        };
        let mut repo = match RepoName::parse(path) {
            Ok(r) => r,
            Err(_) => return bad("invalid repository name"),
        };
        if registry == DOCKER_HUB {
            repo = match repo.with_library_prefix() {
                Ok(r) => r,
                Err(_) => return bad("repository name too long with its library/ prefix"),
            };
        }
        let reference = match (digest, tag) {
            (Some(d), _) => Reference::Digest(d),
            (None, Some(t)) => match Tag::parse(t) {
                Ok(t) => Reference::Tag(t),
                Err(_) => return bad("invalid tag"),
            },
            (None, None) => Reference::Tag(Tag::parse("latest").expect("valid tag")),
        };
        Ok(ImageRef {
            registry: registry.to_owned(),
            repo,
            reference,
        })
    }

    /// Whether `s` names its registry explicitly (`host/repo...`), as an OCI layout's
    /// `org.opencontainers.image.ref.name` must for cachalot to know where it belongs.
    pub fn is_fully_qualified(s: &str) -> bool {
        s.split_once('/').is_some_and(|(first, _)| {
            first.contains('.') || first.contains(':') || first == "localhost"
        })
    }
}

/// `registry/repo:tag` or `registry/repo@digest`.
impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reference {
            Reference::Tag(t) => write!(f, "{}/{}:{t}", self.registry, self.repo),
            Reference::Digest(d) => write!(f, "{}/{}@{d}", self.registry, self.repo),
        }
    }
}

/// An `os/architecture[/variant]` selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlatformSpec {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl PlatformSpec {
    /// `os/architecture[/variant]`; anything else is an [`InvalidRef`] naming it.
    pub fn parse(s: &str) -> Result<PlatformSpec, InvalidRef> {
        let parts: Vec<&str> = s.trim().split('/').collect();
        let ok = |p: &str| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        };
        match parts.as_slice() {
            [os, arch] if ok(os) && ok(arch) => Ok(PlatformSpec {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            }),
            [os, arch, variant] if ok(os) && ok(arch) && ok(variant) => Ok(PlatformSpec {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: Some(variant.to_string()),
            }),
            _ => Err(InvalidRef(format!(
                "platform {s:?}: expected os/architecture[/variant], like linux/arm64"
            ))),
        }
    }

    /// The platform of this machine, Go-style (`linux/amd64`), the usual client default.
    pub fn host() -> PlatformSpec {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        PlatformSpec {
            os: "linux".into(),
            architecture: architecture.into(),
            variant: None,
        }
    }

    /// Whether a descriptor's platform fields satisfy this selector (a selector without a
    /// variant takes any variant).
    pub fn matches(&self, os: &str, architecture: &str, variant: Option<&str>) -> bool {
        self.os == os
            && self.architecture == architecture
            && self.variant.as_deref().is_none_or(|v| Some(v) == variant)
    }
}

impl fmt::Display for PlatformSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> String {
        ImageRef::parse(s).unwrap().to_string()
    }

    #[test]
    fn references_as_clients_write_them() {
        assert_eq!(p("nginx"), "docker.io/library/nginx:latest");
        assert_eq!(p("nginx:1.27"), "docker.io/library/nginx:1.27");
        assert_eq!(p("bitnami/redis:7"), "docker.io/bitnami/redis:7");
        assert_eq!(
            p("index.docker.io/library/nginx:1"),
            "docker.io/library/nginx:1"
        );
        assert_eq!(p("docker.io/nginx"), "docker.io/library/nginx:latest");
        assert_eq!(
            p("registry.k8s.io/pause:3.10"),
            "registry.k8s.io/pause:3.10"
        );
        assert_eq!(p("127.0.0.1:5000/x/y:tag"), "127.0.0.1:5000/x/y:tag");
        assert_eq!(p("localhost/app"), "localhost/app:latest");
        let d = format!("sha256:{}", "a".repeat(64));
        let r = ImageRef::parse(&format!("ghcr.io/org/app:1@{d}")).unwrap();
        assert_eq!(r.registry, "ghcr.io");
        assert_eq!(r.reference, Reference::Digest(d.parse().unwrap()));
        assert_eq!(r.to_string(), format!("ghcr.io/org/app@{d}"));
        let r = ImageRef::parse("127.0.0.1:5000/x").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repo.as_str()),
            ("127.0.0.1:5000", "x")
        );
    }

    #[test]
    fn bad_references_name_themselves() {
        for bad in ["", "Nginx", "nginx:", "nginx:-x", "x@sha256:zz", "a//b"] {
            let e = ImageRef::parse(bad).unwrap_err();
            assert!(!e.0.is_empty(), "{e:?}");
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn platforms() {
        let s = PlatformSpec::parse("linux/arm64").unwrap();
        assert!(s.matches("linux", "arm64", Some("v8")));
        assert!(!s.matches("linux", "amd64", None));
        let v = PlatformSpec::parse("linux/arm/v7").unwrap();
        assert!(v.matches("linux", "arm", Some("v7")));
        assert!(!v.matches("linux", "arm", Some("v6")));
        for bad in ["linux", "linux/", "a/b/c/d", "linux/arm 64"] {
            let e = PlatformSpec::parse(bad).unwrap_err();
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
        assert!(ImageRef::is_fully_qualified("reg.test/a:b"));
        assert!(!ImageRef::is_fully_qualified("v1"));
        assert!(!ImageRef::is_fully_qualified("library/nginx:1"));
    }

    #[test]
    fn parses_like_docker_references_in_pins() {
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
