//! Referrers lists: the upstream's referrers API where it has one, else the list the spec's
//! fallback tag holds (an image index the pusher maintains, fetched as a manifest by tag so it
//! is cached like one). Answers are kept as tags are: trusted for `tag_ttl`, then asked again;
//! when the upstream fails, the last answer is served stale; when it cannot be reached and
//! nothing was kept, or the mirror is offline, the list is built from the cached manifests whose
//! `subject` is the digest.

use super::{MAX_PASSTHROUGH, Mirror, Target};
use crate::error::{Error, UpstreamFault};
use crate::metrics::{Kind, Lookup};
use crate::oci::Digest;
use crate::oci::manifest::{self, Accept};
use crate::oci::referrers::{Listing, fallback_tag};
use crate::storage::referrers::KeptReferrers;
use crate::upstream::{Op, UpstreamRequest};
use http::{Method, StatusCode};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tracing::{info, warn};

/// A referrers answer before the client's `artifactType` filter.
#[derive(Clone, Debug)]
pub struct Referrers {
    pub listing: Listing,
    /// The upstream's `Link` to the next page, as it sent it.
    pub link: Option<String>,
    /// Why this is not the upstream's answer of the last `tag_ttl`, for a `Warning` header.
    pub stale: Option<Stale>,
    /// Asked of the upstream for this request (not kept, not built from the cache).
    pub fetched: bool,
}

/// Why a referrers answer is served without the upstream's word on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stale {
    /// The last upstream answer, older than `tag_ttl`: the upstream failed, or is not asked.
    Kept,
    /// Built from the cached manifests: the upstream could not be reached, or is not asked,
    /// and had never answered.
    FromCache,
}

impl Stale {
    /// The `Warning` header value (`299`: the code the distribution spec has clients show).
    pub fn warning(self) -> &'static str {
        match self {
            Stale::Kept => {
                "299 - \"stale referrers: the upstream could not be asked; this is its last answer\""
            }
            Stale::FromCache => {
                "299 - \"referrers from the cache only: the upstream could not be asked\""
            }
        }
    }
}

/// Upper bound on asking the upstream again when a kept answer can be served instead: a hung
/// upstream costs a stale answer, not a failed request (as for tags).
const REVALIDATE_DEADLINE: Duration = Duration::from_secs(5);

impl Mirror {
    /// The referrers of `subject` in `t`'s repository; `page` is the upstream's paging query
    /// ("" for the first page).
    pub async fn referrers(
        self: &Arc<Self>,
        t: &Target,
        subject: &Digest,
        page: &str,
    ) -> Result<Referrers, Error> {
        // Offline, a kept answer may name referrers the cache does not hold: the cached
        // manifests are the answer then.
        if self.offline {
            self.lookup(Kind::Referrers, Lookup::Stale);
            return self.referrers_from_cache(t, subject, page).await;
        }
        let (up, repo) = (t.upstream.name().to_owned(), t.repo.to_string());
        // Only first pages are kept (see `fetch_referrers`); rows an older version kept for
        // later pages are not read.
        let kept = if page.is_empty() {
            let (st, s) = (self.store.clone(), subject.clone());
            let (u, r) = (up.clone(), repo.clone());
            tokio::task::spawn_blocking(move || st.meta().kept_referrers(&u, &r, &s, ""))
                .await
                .map_err(|e| Error::Internal(e.to_string()))??
        } else {
            None
        };
        let kept = kept.and_then(|k| match Listing::parse(&k.index) {
            Ok(listing) => Some((k, listing)),
            Err(e) => {
                warn!(error = %e, subject = %subject, "a kept referrers answer does not parse; asking again");
                None
            }
        });
        let from_kept = |(k, listing): (KeptReferrers, Listing), stale| Referrers {
            listing,
            link: k.link,
            stale,
            fetched: false,
        };
        if let Some((k, _)) = &kept {
            let fresh = k
                .checked
                .elapsed()
                .map(|age| age < self.tag_ttl)
                .unwrap_or(true);
            if fresh {
                self.lookup(Kind::Referrers, Lookup::Hit);
                return Ok(from_kept(kept.expect("checked above"), None));
            }
        }
        let key = format!("{up}\0{repo}\0{subject}\0{page}");
        let this = self.clone();
        let (t2, s2, p2, has_kept) = (t.clone(), subject.clone(), page.to_owned(), kept.is_some());
        let (res, leader) = self
            .referrer_flights
            .run(key, move || async move {
                this.fetch_referrers(&t2, &s2, &p2, has_kept).await
            })
            .await;
        match res {
            Ok(r) => {
                let result = match () {
                    _ if !leader => Lookup::Coalesced,
                    _ if has_kept => Lookup::Revalidated,
                    _ => Lookup::Miss,
                };
                self.lookup(Kind::Referrers, result);
                Ok(r)
            }
            Err(e) => {
                if let Some(k) = kept {
                    info!(error = %e, subject = %subject, "upstream failed a referrers request; serving the last answer");
                    self.lookup(Kind::Referrers, Lookup::Stale);
                    return Ok(from_kept(k, Some(Stale::Kept)));
                }
                if unreachable(&e) {
                    info!(error = %e, subject = %subject, "upstream unreachable; referrers from the cached manifests");
                    self.lookup(Kind::Referrers, Lookup::Stale);
                    return self.referrers_from_cache(t, subject, page).await;
                }
                self.lookup(Kind::Referrers, Lookup::Miss);
                Err(e)
            }
        }
    }

    /// Asks the upstream (its API, else the fallback tag) and keeps the answer. Runs as its own
    /// task (single flight), so the answer is kept even if every client left.
    async fn fetch_referrers(
        self: Arc<Self>,
        t: &Target,
        subject: &Digest,
        page: &str,
        has_kept: bool,
    ) -> Result<Referrers, Error> {
        let up = &t.upstream;
        let mut path = format!("/v2/{}/referrers/{subject}", t.repo);
        if !page.is_empty() {
            path.push('?');
            path.push_str(page);
        }
        let started = std::time::Instant::now();
        let send = up.send(UpstreamRequest {
            method: Method::GET,
            op: Op::Referrers,
            repo: &t.repo,
            path_and_query: path,
            accept: Some(manifest::OCI_INDEX.to_owned()),
            range: None,
        });
        let resp = if has_kept {
            tokio::time::timeout(REVALIDATE_DEADLINE.min(up.body_timeout()), send)
                .await
                .map_err(|_| {
                    up.note_timeout();
                    Error::upstream(up.name(), UpstreamFault::Timeout("asking for referrers"))
                })??
        } else {
            send.await?
        };
        let (listing, link) = if resp.status().is_success() {
            let link = crate::oci::link::link_header(resp.headers());
            let body = up.read_small(resp.into_body(), MAX_PASSTHROUGH).await?;
            self.metrics
                .upstream_done(up.name(), Op::Referrers.as_str(), started);
            let listing = Listing::parse(&body).map_err(|e| {
                Error::upstream(
                    up.name(),
                    UpstreamFault::Protocol(format!("referrers of {subject}: {e}")),
                )
            })?;
            (listing, link)
        } else if resp.status() == StatusCode::NOT_FOUND {
            // No referrers API here (a registry that has one never answers 404).
            drop(resp);
            (self.fallback_listing(t, subject).await?, None)
        } else {
            return Err(up.status_error(&resp));
        };
        // Only first pages are kept: a later page's query is whatever the client sent (the
        // upstream's paging is opaque), and keeping each would let any client grow the
        // metadata store without bound.
        if page.is_empty() {
            let kept = KeptReferrers {
                checked: SystemTime::now(),
                index: listing.to_index(),
                link: link.clone(),
            };
            let (st, s) = (self.store.clone(), subject.clone());
            let (u, r) = (up.name().to_owned(), t.repo.to_string());
            let saved = tokio::task::spawn_blocking(move || {
                st.meta().keep_referrers(&u, &r, &s, "", &kept)
            })
            .await;
            if !matches!(saved, Ok(Ok(()))) {
                // The client still gets its answer; the next one asks the upstream again.
                self.metrics.cache_write_errors.inc();
                warn!(subject = %subject, "could not keep a referrers answer");
            }
        }
        Ok(Referrers {
            listing,
            link,
            stale: None,
            fetched: true,
        })
    }

    /// The list the fallback tag holds. No such tag: no referrers. A tag that holds something
    /// other than an image index: no referrers either, as the spec has clients conclude.
    async fn fallback_listing(
        self: &Arc<Self>,
        t: &Target,
        subject: &Digest,
    ) -> Result<Listing, Error> {
        let tag = fallback_tag(subject);
        match self.manifest_by_tag(t, &tag, &Accept::default()).await {
            Ok(m) if m.media_type == manifest::OCI_INDEX => match Listing::parse(&m.bytes) {
                Ok(l) => Ok(l),
                Err(e) => {
                    warn!(tag = %tag, error = %e, "the referrers fallback tag is not an image index; taken as no referrers");
                    Ok(Listing::default())
                }
            },
            Ok(m) => {
                warn!(tag = %tag, media_type = %m.media_type, "the referrers fallback tag is not an image index; taken as no referrers");
                Ok(Listing::default())
            }
            Err(e) if e.upstream_status() == Some(StatusCode::NOT_FOUND) => Ok(Listing::default()),
            Err(e) => Err(e),
        }
    }

    async fn referrers_from_cache(
        &self,
        t: &Target,
        subject: &Digest,
        page: &str,
    ) -> Result<Referrers, Error> {
        // The whole list is the first page (it has no `Link`): a later page, from a `Link` the
        // upstream gave before, would only repeat it.
        let listing = if page.is_empty() {
            let (st, s) = (self.store.clone(), subject.clone());
            let (u, r) = (t.upstream.name().to_owned(), t.repo.to_string());
            tokio::task::spawn_blocking(move || {
                crate::storage::referrers::cached_referrers(&st, &u, &r, &s)
            })
            .await
            .map_err(|e| Error::Internal(e.to_string()))??
        } else {
            crate::oci::referrers::Listing(Vec::new())
        };
        Ok(Referrers {
            listing,
            link: None,
            stale: Some(Stale::FromCache),
            fetched: false,
        })
    }
}

/// Whether the upstream could not be reached at all (as opposed to answering badly).
fn unreachable(e: &Error) -> bool {
    matches!(
        e.cause(),
        Error::Upstream {
            fault: UpstreamFault::Connect(_)
                | UpstreamFault::CircuitOpen { .. }
                | UpstreamFault::Offline,
            ..
        }
    )
}
