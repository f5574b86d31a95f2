//! Turns a request line into a typed `Route`. Pure: no I/O, no allocation (names are borrowed
//! from the path).
//! Paths are matched from the right, because repository names contain `/`.

use crate::metrics::RouteLabel;
use http::Method;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route<'a> {
    /// `GET /v2/`
    Base,
    Manifest {
        name: &'a str,
        reference: &'a str,
    },
    Blob {
        name: &'a str,
        digest: &'a str,
    },
    Tags {
        name: &'a str,
    },
    /// `GET /v2/_catalog`: the repositories the cache holds.
    Catalog,
    Referrers {
        name: &'a str,
        digest: &'a str,
    },
    Metrics,
    Healthz,
    Readyz,
    /// `GET /`: links to the page.
    Root,
    /// `GET /ui` and below; `rest` is the path after `/ui` (empty, `/`, `/api/images`, ...).
    Ui {
        rest: &'a str,
    },
    /// A write (push, delete, upload) or another method the mirror does not support.
    Unsupported,
    NotFound,
}

impl Route<'_> {
    /// The `route` label for metrics. No wildcard arm: a new route must choose its label.
    pub fn label(&self) -> RouteLabel {
        match self {
            Route::Base => RouteLabel::Base,
            Route::Manifest { .. } => RouteLabel::Manifest,
            Route::Blob { .. } => RouteLabel::Blob,
            Route::Tags { .. } => RouteLabel::Tags,
            Route::Catalog => RouteLabel::Catalog,
            Route::Referrers { .. } => RouteLabel::Referrers,
            Route::Metrics
            | Route::Root
            | Route::Ui { .. }
            | Route::Healthz
            | Route::Readyz
            | Route::Unsupported
            | Route::NotFound => RouteLabel::Other,
        }
    }
}

/// Routes a request by method and path (without the query).
pub fn route<'a>(method: &Method, path: &'a str) -> Route<'a> {
    let read = method == Method::GET || method == Method::HEAD;
    match path {
        "/metrics" if read => return Route::Metrics,
        "/healthz" if read => return Route::Healthz,
        "/readyz" if read => return Route::Readyz,
        "/" if read => return Route::Root,
        "/v2" | "/v2/" => {
            return if read {
                Route::Base
            } else {
                Route::Unsupported
            };
        }
        _ => {}
    }
    if let Some(rest) = path.strip_prefix("/ui")
        && (rest.is_empty() || rest.starts_with('/'))
    {
        return if read {
            Route::Ui { rest }
        } else {
            Route::Unsupported
        };
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Route::NotFound;
    };
    let route = if let Some((name, reference)) = rsplit_once(rest, "/manifests/") {
        Route::Manifest { name, reference }
    } else if rest.contains("/blobs/uploads") {
        return Route::Unsupported;
    } else if let Some((name, digest)) = rsplit_once(rest, "/blobs/") {
        Route::Blob { name, digest }
    } else if let Some(name) = rest.strip_suffix("/tags/list") {
        Route::Tags { name }
    } else if let Some((name, digest)) = rsplit_once(rest, "/referrers/") {
        Route::Referrers { name, digest }
    } else if rest == "_catalog" {
        Route::Catalog
    } else {
        return Route::NotFound;
    };
    // PUT/POST/PATCH/DELETE on a pull path: the mirror is read-only.
    if read { route } else { Route::Unsupported }
}

/// `s.rsplit_once(sep)` for a `sep` that starts with `/`: tries each `/` from the right, which
/// on a short path costs less than setting up the substring searcher.
fn rsplit_once<'a>(s: &'a str, sep: &str) -> Option<(&'a str, &'a str)> {
    debug_assert!(sep.starts_with('/'));
    let mut end = s.len();
    while let Some(i) = s[..end].rfind('/') {
        if s[i..].starts_with(sep) {
            return Some((&s[..i], &s[i + sep.len()..]));
        }
        end = i;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn routes() {
        let g = Method::GET;
        assert_eq!(route(&g, "/v2/"), Route::Base);
        assert_eq!(route(&g, "/v2"), Route::Base);
        assert_eq!(
            route(&g, "/v2/library/nginx/manifests/latest"),
            Route::Manifest {
                name: "library/nginx",
                reference: "latest"
            }
        );
        assert_eq!(
            route(&Method::HEAD, "/v2/ghcr.io/o/a/blobs/sha256:ab"),
            Route::Blob {
                name: "ghcr.io/o/a",
                digest: "sha256:ab"
            }
        );
        assert_eq!(route(&g, "/v2/a/b/tags/list"), Route::Tags { name: "a/b" });
        assert_eq!(route(&g, "/v2/_catalog"), Route::Catalog);
        assert_eq!(route(&Method::PUT, "/v2/_catalog"), Route::Unsupported);
        assert_eq!(
            route(&g, "/v2/a/referrers/sha256:x"),
            Route::Referrers {
                name: "a",
                digest: "sha256:x"
            }
        );
        // A repository may itself be called "manifests": match from the right.
        assert_eq!(
            route(&g, "/v2/x/manifests/y/manifests/z"),
            Route::Manifest {
                name: "x/manifests/y",
                reference: "z"
            }
        );
        assert_eq!(route(&g, "/metrics"), Route::Metrics);
        assert_eq!(route(&g, "/"), Route::Root);
        assert_eq!(route(&g, "/ui"), Route::Ui { rest: "" });
        assert_eq!(
            route(&g, "/ui/api/images"),
            Route::Ui {
                rest: "/api/images"
            }
        );
        assert_eq!(route(&g, "/uix"), Route::NotFound);
        assert_eq!(route(&Method::POST, "/ui"), Route::Unsupported);
        assert_eq!(route(&g, "/nope"), Route::NotFound);
        assert_eq!(route(&g, "/v2/x/unknown"), Route::NotFound);
    }

    #[test]
    fn writes_are_unsupported() {
        assert_eq!(
            route(&Method::POST, "/v2/a/blobs/uploads/"),
            Route::Unsupported
        );
        assert_eq!(
            route(&Method::PATCH, "/v2/a/blobs/uploads/123"),
            Route::Unsupported
        );
        assert_eq!(
            route(&Method::PUT, "/v2/a/manifests/latest"),
            Route::Unsupported
        );
        assert_eq!(
            route(&Method::DELETE, "/v2/a/blobs/sha256:ab"),
            Route::Unsupported
        );
        assert_eq!(
            route(&Method::GET, "/v2/a/blobs/uploads/123"),
            Route::Unsupported
        );
    }

    proptest! {
        #[test]
        fn splits_like_str_rsplit_once(s in "[a/m]{0,30}", sep in "/[a/m]{0,4}") {
            prop_assert_eq!(rsplit_once(&s, &sep), s.rsplit_once(sep.as_str()));
        }

        #[test]
        fn never_panics(path in "/[a-z0-9/:._-]{0,80}") {
            let _ = route(&Method::GET, &path);
            let _ = route(&Method::DELETE, &path);
        }
    }
}
