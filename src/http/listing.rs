//! The listings: `/v2/<name>/tags/list` and `/v2/_catalog`, paged as the spec says whatever
//! the upstream does (sorted, at most `n`, after `last`, `Link: <...>; rel="next"` in the
//! client's own name and routing when more follow; `n=0` is an empty list without a `Link`).

use super::body;
use super::handlers::{AppState, query_param, truncate};
use crate::auth::Principal;
use crate::error::Error;
use crate::metrics::Source;
use crate::mirror::Target;
use crate::oci::{ErrorCode, RepoName};
use http::{Response, header};

type Reply = Result<Response<body::Body>, Error>;

/// `n` and `last` of a listing request.
#[derive(Debug, PartialEq, Eq)]
struct PageQuery {
    n: Option<usize>,
    last: Option<String>,
}

impl PageQuery {
    fn parse(query: Option<&str>) -> Result<PageQuery, Error> {
        let n = match query_param(query, "n") {
            None => None,
            Some(n) => Some(n.parse::<u32>().map_err(|_| {
                Error::client(
                    ErrorCode::PaginationNumberInvalid,
                    format!(
                        "n={:?} is not a number of entries (0 to {})",
                        truncate(&n),
                        u32::MAX
                    ),
                )
            })? as usize),
        };
        Ok(PageQuery {
            n,
            last: query_param(query, "last"),
        })
    }

    /// The page of `items` (sorted) this query asks for, and whether more follow it.
    fn cut<'a>(&self, items: &'a [String]) -> (&'a [String], bool) {
        let start = self
            .last
            .as_deref()
            .map_or(0, |l| items.partition_point(|t| t.as_str() <= l));
        let rest = &items[start..];
        match self.n {
            None => (rest, false),
            Some(n) => {
                let page = &rest[..n.min(rest.len())];
                (page, n > 0 && rest.len() > n)
            }
        }
    }
}

/// `<path?n=..&last=..[&ns=..]>; rel="next"`.
fn next_link(path: &str, n: usize, last: &str, ns: Option<&str>) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    q.append_pair("n", &n.to_string()).append_pair("last", last);
    if let Some(ns) = ns {
        q.append_pair("ns", ns);
    }
    format!("<{path}?{}>; rel=\"next\"", q.finish())
}

/// A JSON listing answer: the body (none for HEAD), its `Link` when more follow.
fn answer(
    state: &AppState,
    json: serde_json::Value,
    link: Option<String>,
    warning: Option<&'static str>,
    head: bool,
) -> Reply {
    let bytes = serde_json::to_vec(&json).map_err(|e| Error::Internal(e.to_string()))?;
    let mut b = Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, bytes.len());
    if let Some(link) = link {
        b = b.header(header::LINK, link);
    }
    if let Some(w) = warning {
        b = b.header(header::WARNING, w);
    }
    if !head {
        state.metrics.served(Source::Cache, bytes.len() as u64);
    }
    b.body(if head {
        body::empty()
    } else {
        body::full(bytes)
    })
    .map_err(|e| Error::Internal(e.to_string()))
}

/// `/v2/<name>/tags/list`: a page of the kept (or freshly walked) list, named as the client
/// named the repository.
pub(super) async fn tags(state: &AppState, t: &Target, query: Option<&str>, head: bool) -> Reply {
    let q = PageQuery::parse(query)?;
    let listing = state.mirror.tag_list(t).await?;
    let (page, more) = q.cut(&listing.list.tags);
    let link = match (more, q.n, page.last()) {
        (true, Some(n), Some(last)) => Some(next_link(
            &format!("/v2/{}/tags/list", t.client_name),
            n,
            last,
            t.ns.as_deref(),
        )),
        _ => None,
    };
    let json = serde_json::json!({"name": t.client_name, "tags": page});
    answer(state, json, link, listing.warning, head)
}

/// `/v2/_catalog`: the repositories the cache holds, named as this client routes to them (with
/// `ns`, that upstream's repositories as it names them; without, the default upstream's as
/// they are and the others' behind their upstream's name), less what the client may not pull.
pub(super) async fn catalog(
    state: &AppState,
    who: Option<&Principal>,
    ns: Option<&str>,
    query: Option<&str>,
    head: bool,
) -> Reply {
    let q = PageQuery::parse(query)?;
    let mirror = &state.mirror;
    if let Some(ns) = ns.filter(|ns| !mirror.has_upstream(ns)) {
        return Err(Error::client(
            ErrorCode::NameUnknown,
            format!("no upstream is configured for registry {:?}", truncate(ns)),
        ));
    }
    let store = mirror.store().clone();
    let repos = tokio::task::spawn_blocking(move || store.meta().repositories())
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
    let default = mirror.default_upstream();
    let mut names: Vec<String> = repos
        .into_iter()
        .filter(|(u, r)| match (&state.auth, who) {
            (Some(auth), Some(who)) => auth.may_pull(who, u, r),
            _ => true,
        })
        .filter_map(|(u, r)| match ns {
            Some(ns) => (u == ns).then_some(r),
            None if Some(u.as_str()) == default => Some(r),
            // Only names the client can route back: an upstream's name that is not a valid
            // first component (`registry.corp:5000`) is reachable through `ns` alone.
            None if mirror.has_upstream(&u) => {
                let name = format!("{u}/{r}");
                RepoName::parse(&name).is_ok().then_some(name)
            }
            None => None,
        })
        .collect();
    names.sort_unstable();
    names.dedup();
    let (page, more) = q.cut(&names);
    let link = match (more, q.n, page.last()) {
        (true, Some(n), Some(last)) => Some(next_link("/v2/_catalog", n, last, ns)),
        _ => None,
    };
    answer(
        state,
        serde_json::json!({ "repositories": page }),
        link,
        None,
        head,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn q(n: Option<usize>, last: Option<&str>) -> PageQuery {
        PageQuery {
            n,
            last: last.map(str::to_owned),
        }
    }

    #[test]
    fn pages() {
        let all = items(&["a", "b", "c", "d"]);
        assert_eq!(q(None, None).cut(&all), (&all[..], false));
        assert_eq!(q(Some(2), None).cut(&all), (&all[..2], true));
        assert_eq!(q(Some(2), Some("b")).cut(&all), (&all[2..], false));
        assert_eq!(q(Some(1), Some("bb")).cut(&all), (&all[2..3], true));
        assert_eq!(q(Some(0), None).cut(&all), (&all[..0], false));
        assert_eq!(q(Some(9), Some("z")).cut(&all), (&all[4..], false));
        assert_eq!(q(None, Some("0")).cut(&all), (&all[..], false));
    }

    #[test]
    fn queries() {
        assert_eq!(
            PageQuery::parse(Some("n=3&last=v1.0")).unwrap(),
            q(Some(3), Some("v1.0"))
        );
        assert_eq!(PageQuery::parse(None).unwrap(), q(None, None));
        for bad in ["n=-1", "n=x", "n=", "n=1.5", "n=99999999999"] {
            let e = PageQuery::parse(Some(bad)).unwrap_err();
            assert_eq!(
                e.to_oci(ErrorCode::NameUnknown).code,
                ErrorCode::PaginationNumberInvalid,
                "{bad}"
            );
        }
    }

    #[test]
    fn links() {
        assert_eq!(
            next_link("/v2/ghcr.io/o/a/tags/list", 2, "b", Some("ghcr.io")),
            "</v2/ghcr.io/o/a/tags/list?n=2&last=b&ns=ghcr.io>; rel=\"next\""
        );
        assert_eq!(
            next_link("/v2/_catalog", 5, "x/y", None),
            "</v2/_catalog?n=5&last=x%2Fy>; rel=\"next\""
        );
    }
}
