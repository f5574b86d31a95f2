//! Repository names, tags and references, validated against the distribution-spec grammar.

use super::digest::Digest;
use std::fmt;

/// Longest repository name accepted; distribution's `RepositoryNameTotalLengthMax`.
pub const MAX_NAME_LEN: usize = 255;

/// A repository name such as `library/nginx`, checked against the spec grammar.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

/// A tag such as `1.27-alpine`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

/// What a manifest request names: a tag or a digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("invalid repository name")]
    Name,
    #[error("invalid tag")]
    Tag,
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: exactly ".", "_" or "__", or any number of "-".
        let start = i;
        while i < b.len() && !is_alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = matches!(sep, "." | "_" | "__") || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

impl RepoName {
    pub fn parse(s: &str) -> Result<RepoName, NameError> {
        if s.is_empty() || s.len() > MAX_NAME_LEN || !s.split('/').all(valid_component) {
            return Err(NameError::Name);
        }
        Ok(RepoName(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first path component, used for prefix routing.
    pub fn first_component(&self) -> &str {
        self.0.split('/').next().unwrap_or(&self.0)
    }

    /// The name without its first component, if it has more than one.
    pub fn strip_first(&self) -> Option<RepoName> {
        self.0
            .split_once('/')
            .map(|(_, rest)| RepoName(rest.to_owned()))
    }

    /// Docker Hub's official images live under `library/`: `nginx` means `library/nginx`.
    /// Fails when the prefix would take the name past [`MAX_NAME_LEN`] (found by fuzzing: a
    /// name that was valid alone became one no parser accepts back).
    pub fn with_library_prefix(&self) -> Result<RepoName, NameError> {
        if self.0.contains('/') {
            Ok(self.clone())
        } else {
            RepoName::parse(&format!("library/{}", self.0))
        }
    }
}

impl Tag {
    /// `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`
    pub fn parse(s: &str) -> Result<Tag, NameError> {
        let b = s.as_bytes();
        let first_ok = b
            .first()
            .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_');
        let rest_ok = b
            .iter()
            .skip(1)
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
        if !first_ok || !rest_ok || b.len() > 128 {
            return Err(NameError::Tag);
        }
        Ok(Tag(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names() {
        for ok in [
            "nginx",
            "library/nginx",
            "a/b/c",
            "my-app",
            "my--app",
            "a.b",
            "a_b",
            "a__b",
            "ghcr.io/x",
        ] {
            assert!(RepoName::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "Nginx", "-a", "a-", "a//b", "a/", "/a", "a___b", "a..b", "a b", "../etc",
        ] {
            assert!(RepoName::parse(bad).is_err(), "{bad}");
        }
        assert!(RepoName::parse(&"a".repeat(256)).is_err());
    }

    #[test]
    fn library_prefix() {
        let n = RepoName::parse("nginx").unwrap();
        assert_eq!(n.with_library_prefix().unwrap().as_str(), "library/nginx");
        let n = RepoName::parse("bitnami/nginx").unwrap();
        assert_eq!(n.with_library_prefix().unwrap().as_str(), "bitnami/nginx");
        // Valid alone, too long once prefixed: refused rather than a name past the limit.
        let n = RepoName::parse(&"a".repeat(MAX_NAME_LEN)).unwrap();
        assert_eq!(n.with_library_prefix(), Err(NameError::Name));
    }

    #[test]
    fn tags() {
        for ok in ["latest", "1.27", "_x", "A-b.c_d"] {
            assert!(Tag::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".x", "-x", "a:b", "a/b"] {
            assert!(Tag::parse(bad).is_err(), "{bad}");
        }
        assert!(Tag::parse(&"a".repeat(128)).is_ok());
        assert!(Tag::parse(&"a".repeat(129)).is_err());
    }

    proptest! {
        #[test]
        fn valid_names_have_no_traversal(s in "[a-z0-9./_-]{0,40}") {
            if let Ok(n) = RepoName::parse(&s) {
                prop_assert!(!n.as_str().split('/').any(|c| c == ".." || c == "." || c.is_empty()));
            }
        }
    }
}
