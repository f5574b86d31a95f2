//! Entry points for the fuzz targets in `fuzz/` and for `tests/fuzz_corpus.rs`, which replays
//! their corpora on stable Rust in every test run. Each takes arbitrary bytes, feeds them to a
//! parser that faces the network or the user, and panics only when the parser breaks a promise
//! (a panic inside the parser itself is the other kind of finding). Not a stable API.

use crate::auth::{RepoPattern, htpasswd::parse as parse_htpasswd};
use crate::config::Config;
use crate::http::handlers::{RangeAnswer, parse_range};
use crate::http::route::{Route, route as route_request};
use crate::oci::Digest;
use crate::oci::descriptor::parse_refs;
use crate::oci::image_ref::{ImageRef, PlatformSpec};
use crate::oci::manifest::{self as m, Accept, sniff_media_type, verify};
use crate::oci::name::{RepoName, Tag};
use crate::upstream::auth::{parse_token_response, parse_www_authenticate_bytes, token_url};
use http::Method;

/// A fuzz target: arbitrary bytes in, a panic when a promise is broken.
pub type Target = fn(&[u8]);

/// Every target by name, for the corpus replay.
pub const TARGETS: &[(&str, Target)] = &[
    ("route", route),
    ("digest", digest),
    ("image_ref", image_ref),
    ("www_authenticate", www_authenticate),
    ("range", range),
    ("manifest", manifest),
    ("config", config),
    ("htpasswd", htpasswd),
    ("access", access),
];

/// A request line: the first byte picks the method, the rest is the path. Names the router
/// hands out are borrowed from the path, and the name and tag parsers accept or refuse them
/// without panicking.
pub fn route(data: &[u8]) {
    let Some((&m, path)) = data.split_first() else {
        return;
    };
    let Ok(path) = std::str::from_utf8(path) else {
        return;
    };
    let method = match m % 5 {
        0 => Method::GET,
        1 => Method::HEAD,
        2 => Method::PUT,
        3 => Method::DELETE,
        _ => Method::POST,
    };
    let r = route_request(&method, path);
    let _ = r.label();
    let read = method == Method::GET || method == Method::HEAD;
    match r {
        Route::Manifest { name, reference } => {
            assert!(read, "a write routed to a manifest read: {path:?}");
            assert!(path.contains(name) && path.ends_with(reference));
            let _ = RepoName::parse(name);
            let _ = Tag::parse(reference);
            let _ = reference.parse::<Digest>();
        }
        Route::Blob { name, digest } | Route::Referrers { name, digest } => {
            assert!(read, "a write routed to a read: {path:?}");
            assert!(path.contains(name) && path.ends_with(digest));
            let _ = RepoName::parse(name).map(|n| n.with_library_prefix());
            let _ = digest.parse::<Digest>();
        }
        Route::Tags { name } => {
            assert!(read, "a write routed to a read: {path:?}");
            let _ = RepoName::parse(name).map(|n| n.strip_first());
        }
        _ => {}
    }
}

/// A digest that parses prints as it was written, so cache keys and headers agree with the
/// client's spelling.
pub fn digest(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(d) = s.parse::<Digest>() {
        assert_eq!(d.to_string(), s, "digest does not round-trip");
    }
}

/// An image reference as `prefetch`/`export` take it: one that parses prints as something that
/// parses to the same reference.
pub fn image_ref(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(r) = ImageRef::parse(s) {
        let printed = r.to_string();
        let again = ImageRef::parse(&printed)
            .unwrap_or_else(|e| panic!("{s:?} printed as {printed:?}, which fails: {e}"));
        assert_eq!(again.to_string(), printed, "reference does not round-trip");
    }
    let _ = PlatformSpec::parse(s);
}

/// An upstream's `WWW-Authenticate` header and the token answer that follows it.
pub fn www_authenticate(data: &[u8]) {
    for c in parse_www_authenticate_bytes(data) {
        let _ = c.realm();
        if let Some(b) = c.bearer() {
            let _ = token_url(&b.realm, b.service.as_deref(), b.scope.as_deref());
        }
    }
    let _ = parse_token_response(data);
}

/// A `Range` header against a blob length taken from the first eight bytes: an answer always
/// lies inside the blob.
pub fn range(data: &[u8]) {
    if data.len() < 8 {
        return;
    }
    let (len, header) = data.split_at(8);
    let len = u64::from_le_bytes(len.try_into().expect("eight bytes")) % (1 << 40);
    let Ok(header) = std::str::from_utf8(header) else {
        return;
    };
    if let RangeAnswer::Partial(start, end) = parse_range(header, len) {
        assert!(
            start < end && end <= len,
            "{header:?} on {len} bytes gave {start}..{end}"
        );
    }
}

/// A manifest or index body as an upstream or a bundle sends it, and an `Accept` header.
pub fn manifest(data: &[u8]) {
    let headers = http::HeaderMap::new();
    if let Ok(checked) = verify(data, &headers, None) {
        let _ = parse_refs(&checked.media_type, data);
    }
    let _ = sniff_media_type(data);
    for media_type in ["", m::OCI_INDEX, m::OCI_MANIFEST, m::DOCKER_LIST] {
        let _ = parse_refs(media_type, data);
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let accept = Accept::parse(s.lines());
        let _ = accept.upstream_value();
        let _ = accept.allows(s);
    }
}

/// A config file: one that loads prints (as `check-config` does) as a file that loads again.
pub fn config(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = Config::from_toml_str(s) {
        let printed = c.to_toml();
        if let Err(e) = Config::from_toml_str(&printed) {
            panic!("check-config printed a config that does not load: {e}\n{printed}");
        }
    }
}

/// An htpasswd file as `[auth] htpasswd` names it: every user it loads has a name a client can
/// send (no `:`, not empty) and a bcrypt hash.
pub fn htpasswd(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(h) = parse_htpasswd(s) {
        for name in h.names() {
            assert!(!name.is_empty() && !name.contains(':'), "user {name:?}");
            let hash = h.hash(name).expect("a listed user has a hash");
            assert!(
                hash.starts_with("$2"),
                "{name:?} loaded with a non-bcrypt hash"
            );
        }
    }
}

/// An `[[access]]` repository pattern (first line) against a name (second line): matching never
/// panics, and a pattern without wildcards matches the name it spells.
pub fn access(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let (pattern, name) = s.split_once('\n').unwrap_or((s, ""));
    let Ok(p) = RepoPattern::parse(pattern) else {
        return;
    };
    if let Some((upstream, repo)) = name.split_once('/') {
        let _ = p.matches(upstream, repo);
    }
    if !pattern.contains('*')
        && let Some((upstream, repo)) = pattern.split_once('/')
    {
        assert!(
            p.matches(upstream, repo),
            "{pattern:?} does not match itself"
        );
    }
}
