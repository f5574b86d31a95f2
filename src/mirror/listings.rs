//! Tags lists: the whole list is walked upstream once (following the upstream's own `Link`
//! pages on its own host and repository), bounded, kept (memory and metadata) and trusted for
//! `tag_ttl`; clients' pages are cut from what is kept, so a client walking a long list 100 at a
//! time costs the upstream one walk. Past `tag_ttl` the list is walked again; when the upstream
//! errs, rate-limits or hangs the kept list is served, stale, with a `Warning`. Offline, or with
//! no list ever fetched and the upstream refusing, the tags the cache holds are listed.

use super::{Mirror, Target};
use crate::error::{Error, UpstreamFault};
use crate::metrics::{Kind, Lookup};
use crate::oci::{ErrorCode, RepoName, Tag};
use crate::storage::listings::KeptTagList;
use crate::upstream::{Op, Upstream, UpstreamRequest};
use http::Method;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tracing::{debug, info, warn};

/// Most tags kept for one repository; past it the walk stops and the list is what it fetched.
pub const MAX_TAGS: usize = 100_000;
/// Most bytes of tags list pages read in one walk, for the same reason.
pub const MAX_LIST_BYTES: usize = 16 * 1024 * 1024;
/// How long a client waits for a walk when a kept list could answer instead: a hung upstream
/// costs a stale answer, not a failed listing (the walk goes on, and keeps what it finds).
const REWALK_DEADLINE: Duration = Duration::from_secs(5);

/// `Warning` for a kept list served because the upstream could not give a new one.
pub const STALE_WARNING: &str =
    "299 - \"the upstream could not be asked; this tags list is the one it gave before\"";
/// `Warning` for a list made from the tags the cache holds (offline, or no list was ever fetched).
pub const HELD_WARNING: &str =
    "299 - \"the upstream could not be asked; this tags list holds only the tags in the cache\"";

/// A tags list to cut pages from.
pub struct Listing {
    pub list: Arc<KeptTagList>,
    /// The `Warning` to send with it, when it is not the upstream's current answer.
    pub warning: Option<&'static str>,
}

/// The key of a repository's list: (upstream, repository as the upstream names it).
pub(super) type ListKey = (String, String);

fn list_key(t: &Target) -> ListKey {
    (t.upstream.name().to_owned(), t.repo.to_string())
}

impl Mirror {
    /// `t`'s tags list: kept and fresh, else walked upstream, else kept (stale) or held, as
    /// the module says. An upstream's 401, 403 or 404 is its answer and is passed on.
    pub async fn tag_list(self: &Arc<Self>, t: &Target) -> Result<Listing, Error> {
        // Offline, a kept list would name tags the cache may not be able to serve: the tags it
        // holds are the answer then.
        if self.offline {
            return match self.held_tag_list(t).await? {
                Some(list) => {
                    self.lookup(Kind::Tags, Lookup::Hit);
                    Ok(Listing {
                        list,
                        warning: Some(HELD_WARNING),
                    })
                }
                None => {
                    self.lookup(Kind::Tags, Lookup::Miss);
                    Err(Error::client(
                        ErrorCode::NameUnknown,
                        "the mirror is offline and holds no tags of this repository",
                    ))
                }
            };
        }
        let kept = self.kept_tag_list(t).await?;
        let fresh = kept.as_ref().is_some_and(|k| {
            k.fetched
                .elapsed()
                .map(|age| age < self.tag_ttl)
                .unwrap_or(true)
        });
        if let Some(k) = kept.clone().filter(|_| fresh) {
            self.lookup(Kind::Tags, Lookup::Hit);
            return Ok(Listing {
                list: k,
                warning: None,
            });
        }
        let this = self.clone();
        let t2 = t.clone();
        let walk =
            self.tag_list_flights.run(
                list_key(t),
                move || async move { this.walk_and_keep(&t2).await },
            );
        let (res, leader) = if kept.is_some() {
            match tokio::time::timeout(REWALK_DEADLINE, walk).await {
                Ok(r) => r,
                Err(_) => (
                    Err(Error::upstream(
                        t.upstream.name(),
                        UpstreamFault::Timeout("walking the tags list"),
                    )),
                    true,
                ),
            }
        } else {
            walk.await
        };
        let e = match res {
            Ok(list) => {
                self.lookup(
                    Kind::Tags,
                    if leader {
                        Lookup::Miss
                    } else {
                        Lookup::Coalesced
                    },
                );
                return Ok(Listing {
                    list,
                    warning: None,
                });
            }
            Err(e) if is_answer(&e) => {
                self.lookup(Kind::Tags, Lookup::Miss);
                return Err(e);
            }
            Err(e) => e,
        };
        if let Some(list) = kept {
            info!(error = %e, upstream = t.upstream.name(), "tags list walk failed; serving the kept list");
            self.lookup(Kind::Tags, Lookup::Stale);
            return Ok(Listing {
                list,
                warning: Some(STALE_WARNING),
            });
        }
        match self.held_tag_list(t).await? {
            Some(list) => {
                info!(error = %e, upstream = t.upstream.name(), "tags list walk failed; listing the tags the cache holds");
                self.lookup(Kind::Tags, Lookup::Stale);
                Ok(Listing {
                    list,
                    warning: Some(HELD_WARNING),
                })
            }
            None => {
                self.lookup(Kind::Tags, Lookup::Miss);
                Err(e)
            }
        }
    }

    /// The list kept for `t`, from memory, else from the metadata.
    async fn kept_tag_list(&self, t: &Target) -> Result<Option<Arc<KeptTagList>>, Error> {
        let key = list_key(t);
        if let Some(l) = self.tag_lists.get(&key).await {
            return Ok(Some(l));
        }
        let store = self.store.clone();
        let (u, r) = key.clone();
        let found = tokio::task::spawn_blocking(move || store.meta().tag_list(&u, &r))
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
        let Some(list) = found else { return Ok(None) };
        let list = Arc::new(list);
        self.tag_lists.insert(key, list.clone()).await;
        Ok(Some(list))
    }

    /// The tags the cache holds for `t`'s repository, as a list; `None` when it holds none.
    async fn held_tag_list(&self, t: &Target) -> Result<Option<Arc<KeptTagList>>, Error> {
        let store = self.store.clone();
        let (u, r) = list_key(t);
        let tags = tokio::task::spawn_blocking(move || store.meta().held_tags(&u, &r))
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
        Ok((!tags.is_empty()).then(|| {
            Arc::new(KeptTagList {
                tags,
                fetched: SystemTime::now(),
            })
        }))
    }

    /// Runs in its own task (single flight): walks the list upstream and keeps it. A list that
    /// cannot be written is still answered, and walked again next time.
    async fn walk_and_keep(self: Arc<Self>, t: &Target) -> Result<Arc<KeptTagList>, Error> {
        let started = std::time::Instant::now();
        let list = Arc::new(walk(&t.upstream, &t.repo).await?);
        self.metrics
            .upstream_done(t.upstream.name(), Op::Tags.as_str(), started);
        let (store, (u, r), l) = (self.store.clone(), list_key(t), list.clone());
        let saved =
            tokio::task::spawn_blocking(move || store.meta().put_tag_list(&u, &r, &l)).await;
        if !matches!(saved, Ok(Ok(()))) {
            self.metrics.cache_write_errors.inc();
            warn!(upstream = t.upstream.name(), repo = %t.repo, "could not keep a tags list");
        }
        self.tag_lists.insert(list_key(t), list.clone()).await;
        Ok(list)
    }
}

/// Whether an upstream failure is its answer about the repository (absent, or not ours to
/// read), which a kept list must not hide, rather than a failure to answer.
fn is_answer(e: &Error) -> bool {
    match e.cause() {
        Error::Client(_) => true,
        _ => e
            .upstream_status()
            .is_some_and(|s| matches!(s.as_u16(), 401 | 403 | 404)),
    }
}

/// Walks `repo`'s tags list at `up`, page after page as its `Link`s lead, within
/// [`MAX_TAGS`] and [`MAX_LIST_BYTES`]. Invalid tags are dropped (so none can hold a newline
/// or break a header); a page that is not a tags list fails the walk.
async fn walk(up: &Upstream, repo: &RepoName) -> Result<KeptTagList, Error> {
    let fetched = SystemTime::now();
    let protocol = |m: String| Error::upstream(up.name(), UpstreamFault::Protocol(m));
    let first = format!("/v2/{repo}/tags/list");
    let list_path = crate::upstream::client::join_url(up.base(), &first)
        .map_err(protocol)?
        .path()
        .to_owned();
    let mut tags = BTreeSet::new();
    let mut budget = MAX_LIST_BYTES;
    let mut dropped = 0usize;
    let mut next = Some(first);
    let mut truncated = false;
    while let Some(pq) = next.take() {
        let resp = up
            .send(UpstreamRequest {
                method: Method::GET,
                op: Op::Tags,
                repo,
                path_and_query: pq.clone(),
                accept: None,
                range: None,
            })
            .await?;
        if !resp.status().is_success() {
            return Err(up.status_error(&resp));
        }
        let link = crate::oci::link::link_header(resp.headers());
        if !tags.is_empty()
            && super::content_length(resp.headers()).is_some_and(|l| l > budget as u64)
        {
            truncated = true;
            break;
        }
        let body = match up.read_small(resp.into_body(), budget).await {
            Ok(b) => b,
            Err(e) if !tags.is_empty() && is_overflow(&e) => {
                truncated = true;
                break;
            }
            Err(e) => return Err(e),
        };
        budget -= body.len();
        let page: Page = serde_json::from_slice(&body)
            .map_err(|e| protocol(format!("tags list of {repo} is not a JSON tags list: {e}")))?;
        let before = tags.len();
        for tag in page.tags.unwrap_or_default() {
            if Tag::parse(&tag).is_ok() {
                tags.insert(tag);
            } else {
                dropped += 1;
            }
        }
        if tags.len() >= MAX_TAGS {
            truncated = tags.len() > MAX_TAGS || link.is_some();
            break;
        }
        // A page that adds nothing ends the walk: a `Link` that loops cannot keep it going.
        if tags.len() == before {
            break;
        }
        let Some(link) = link else { break };
        let here = crate::upstream::client::join_url(up.base(), &pq).map_err(protocol)?;
        match next_page(up.base(), &here, &list_path, &link) {
            Some(Ok(query)) => next = Some(format!("/v2/{repo}/tags/list?{query}")),
            Some(Err(elsewhere)) => {
                warn!(upstream = up.name(), %repo, link = %elsewhere, "tags list Link points outside the upstream's repository; not followed, the list ends here");
            }
            None => debug!(upstream = up.name(), %repo, "tags list Link without rel=next"),
        }
    }
    if dropped > 0 {
        info!(upstream = up.name(), %repo, dropped, "tags list held names that are not tags; left out");
    }
    if truncated {
        warn!(
            upstream = up.name(),
            %repo,
            kept = tags.len().min(MAX_TAGS),
            "tags list longer than {MAX_TAGS} tags or {MAX_LIST_BYTES} bytes; answering from its first part"
        );
    }
    Ok(KeptTagList {
        tags: tags.into_iter().take(MAX_TAGS).collect(),
        fetched,
    })
}

/// A tags list page; `name` is not read (the answer carries the client's own name), and
/// distribution sends `"tags": null` for a repository without tags.
#[derive(serde::Deserialize)]
struct Page {
    tags: Option<Vec<String>>,
}

/// Whether `e` is `read_small` refusing a body over its cap.
fn is_overflow(e: &Error) -> bool {
    matches!(e.cause(), Error::Upstream { fault: UpstreamFault::Protocol(m), .. } if m.starts_with("response larger than"))
}

/// The query of the next page a `Link` header names, when it has `rel="next"` and points at
/// the same repository's list on the upstream's own origin (`list_path`, the list's path under
/// `base`); `Err` with the target when it points elsewhere; `None` without a next link.
fn next_page(
    base: &url::Url,
    here: &url::Url,
    list_path: &str,
    link: &str,
) -> Option<Result<String, String>> {
    let target = crate::oci::link::next_target(link)?;
    let Some(url) = crate::upstream::client::resolve_location(here, target) else {
        return Some(Err(target.chars().take(200).collect()));
    };
    if !crate::upstream::client::same_origin(base, &url) || url.path() != list_path {
        return Some(Err(url.to_string().chars().take(200).collect()));
    }
    Some(Ok(url.query().unwrap_or("").to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_links() {
        let base: url::Url = "https://r.example/prefix".parse().unwrap();
        let here: url::Url = "https://r.example/prefix/v2/o/a/tags/list".parse().unwrap();
        let path = "/prefix/v2/o/a/tags/list";
        let next = |l: &str| next_page(&base, &here, path, l);
        assert_eq!(
            next("</prefix/v2/o/a/tags/list?last=b&n=2>; rel=\"next\""),
            Some(Ok("last=b&n=2".into()))
        );
        assert_eq!(
            next("<https://r.example/prefix/v2/o/a/tags/list?last=b>; rel=next"),
            Some(Ok("last=b".into()))
        );
        assert_eq!(
            next("<x>; rel=\"prev\", <?last=c>; rel=\"next\""),
            Some(Ok("last=c".into()))
        );
        assert!(matches!(
            next("<https://evil.example/prefix/v2/o/a/tags/list?last=b>; rel=\"next\""),
            Some(Err(_))
        ));
        assert!(matches!(
            next("</prefix/v2/o/other/tags/list?last=b>; rel=\"next\""),
            Some(Err(_))
        ));
        assert!(matches!(
            next("<http://r.example/prefix/v2/o/a/tags/list?last=b>; rel=\"next\""),
            Some(Err(_))
        ));
        assert_eq!(
            next("</prefix/v2/o/a/tags/list?last=b>; rel=\"prev\""),
            None
        );
        assert_eq!(next("garbage"), None);
        assert_eq!(next("<unterminated; rel=next"), None);
    }
}
