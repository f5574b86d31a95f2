//! Tag -> manifest resolution: trusted for `tag_ttl`, then revalidated with a HEAD (which
//! Docker Hub does not count against rate limits); on any upstream failure the last known
//! manifest is served and counted as stale.

use super::{Manifest, Mirror, Target};
use crate::error::Error;
use crate::metrics::{Kind, Lookup};
use crate::oci::manifest::Accept;
use crate::oci::{Digest, Tag};
use crate::storage::TagEntry;
use http::Method;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tracing::{debug, info};

/// One of a tag's entries, as the metadata shares them (not copied on a cache hit).
struct Found(Arc<[TagEntry]>, usize);

impl Found {
    fn entry(&self) -> &TagEntry {
        &self.0[self.1]
    }
}

/// Upper bound on a revalidation HEAD: well under any client's own timeout, so a hung upstream
/// costs a stale answer, not a failed pull.
const REVALIDATE_DEADLINE: Duration = Duration::from_secs(5);

impl Mirror {
    /// The manifest a tag points at, for a client that accepts `accept`.
    pub async fn manifest_by_tag(
        self: &Arc<Self>,
        t: &Target,
        tag: &Tag,
        accept: &Accept,
    ) -> Result<Arc<Manifest>, Error> {
        let found = self.cached_tag(t, tag, accept)?;
        if let Some(entry) = found.as_ref().map(Found::entry) {
            let fresh = entry
                .checked
                .elapsed()
                .map(|age| age < self.tag_ttl)
                .unwrap_or(true);
            if (fresh || self.offline)
                && let Some(m) = self.cached_manifest(&entry.digest).await?
            {
                self.lookup(Kind::Manifest, Lookup::Hit);
                return Ok(m);
            }
        }
        if self.offline {
            let local = found.as_ref().map(Found::entry);
            if let Some(m) = self.shared_tag(t, tag, accept, local).await {
                self.lookup(Kind::Manifest, Lookup::Bucket);
                return Ok(m);
            }
            self.lookup(Kind::Manifest, Lookup::Miss);
            return Err(self.offline_error(t));
        }
        let key = super::FlightKey::Tag {
            upstream: t.upstream.name().to_owned(),
            repo: t.repo.clone(),
            tag: tag.clone(),
            accept: accept.upstream_value(),
        };
        let entry = found.map(|f| f.entry().clone());
        let this = self.clone();
        let (t2, tag2, accept2) = (t.clone(), tag.clone(), accept.clone());
        let (res, leader) = self
            .manifest_flights
            .run(key, move || async move {
                this.resolve_tag(&t2, &tag2, &accept2, entry).await
            })
            .await;
        let result = match &res {
            _ if !leader => Lookup::Coalesced,
            Ok((_, result)) => *result,
            Err(_) => Lookup::Miss,
        };
        self.lookup(Kind::Manifest, result);
        res.map(|(m, _)| m)
    }

    /// The cached entry for this tag whose media type the client accepts.
    fn cached_tag(&self, t: &Target, tag: &Tag, accept: &Accept) -> Result<Option<Found>, Error> {
        let entries =
            self.store
                .meta()
                .tags_shared(t.upstream.name(), t.repo.as_str(), tag.as_str())?;
        Ok(entries
            .iter()
            .position(|e| accept.allows(&e.media_type))
            .map(|i| Found(entries, i)))
    }

    /// Runs in its own task (single flight): revalidate a stale entry, or fetch a new one.
    async fn resolve_tag(
        self: Arc<Self>,
        t: &Target,
        tag: &Tag,
        accept: &Accept,
        entry: Option<TagEntry>,
    ) -> Result<(Arc<Manifest>, Lookup), Error> {
        if let Some(m) = self.shared_tag(t, tag, accept, entry.as_ref()).await {
            return Ok((m, Lookup::Bucket));
        }
        if let Some(owner) = self.tag_owner(t, tag) {
            let peer = owner.1.clone();
            let via = self.fetch_manifest_via(
                t,
                tag.to_string(),
                accept.clone(),
                None,
                Some(tag.to_string()),
                Some(owner),
            );
            match via.await {
                Ok(m) => return Ok((m, Lookup::Peer)),
                Err(e) => {
                    info!(peer = %peer, error = %e, tag = %tag, "the tag's owner could not resolve it; resolving it here")
                }
            }
        }
        let Some(entry) = entry else {
            let m = self.fetch_by_tag(t, tag, accept).await?;
            return Ok((m, Lookup::Miss));
        };
        let Some(cached) = self.cached_manifest(&entry.digest).await? else {
            // The tag is known but its manifest is gone from disk: fetch afresh.
            let m = self.fetch_by_tag(t, tag, accept).await?;
            return Ok((m, Lookup::Miss));
        };
        match self.head_tag(t, tag, accept).await {
            Ok(Some(digest)) if digest == entry.digest => {
                let (store, key) = (
                    self.store.clone(),
                    (
                        t.upstream.name().to_owned(),
                        t.repo.to_string(),
                        tag.to_string(),
                    ),
                );
                let e = entry.clone();
                let st = store.clone();
                let touched = tokio::task::spawn_blocking(move || {
                    st.meta()
                        .touch_tag(&key.0, &key.1, &key.2, &e, SystemTime::now())
                })
                .await;
                if let (Ok(Ok(())), Some(b)) = (touched, store.bucket().cloned()) {
                    let (up, repo) = (t.upstream.name().to_owned(), t.repo.to_string());
                    let tag = tag.to_string();
                    tokio::spawn(async move {
                        if let Err(e) = super::share_tag(&b, &store, &up, &repo, &tag).await {
                            info!(error = %e, tag = %tag, "could not share a revalidated tag through the bucket");
                        }
                    });
                }
                debug!(tag = %tag, "tag revalidated");
                Ok((cached, Lookup::Revalidated))
            }
            Ok(Some(digest)) => {
                info!(tag = %tag, old = %entry.digest, new = %digest, "tag moved upstream");
                let fetch = self.fetch_manifest_task(
                    t,
                    digest.to_string(),
                    accept.clone(),
                    Some(digest),
                    Some(tag.to_string()),
                );
                match fetch.await {
                    Ok(m) => Ok((m, Lookup::Miss)),
                    Err(e) => {
                        info!(error = %e, tag = %tag, "fetching the moved tag failed; serving the cached manifest");
                        Ok((cached, Lookup::Stale))
                    }
                }
            }
            // HEAD answered without a digest: GET by tag instead.
            Ok(None) => match self.fetch_by_tag(t, tag, accept).await {
                Ok(m) => Ok((m, Lookup::Miss)),
                Err(_) => Ok((cached, Lookup::Stale)),
            },
            Err(e) => {
                info!(error = %e, tag = %tag, upstream = t.upstream.name(), "upstream failed revalidation; serving stale manifest");
                Ok((cached, Lookup::Stale))
            }
        }
    }

    /// A tag's manifest as another replica left it in the bucket: used when its entry there is
    /// younger than `tag_ttl` and than what this replica knows (`local`), so a tag is fetched
    /// or revalidated once for all replicas. `None` when the bucket has nothing better or fails.
    async fn shared_tag(
        &self,
        t: &Target,
        tag: &Tag,
        accept: &Accept,
        local: Option<&TagEntry>,
    ) -> Option<Arc<Manifest>> {
        let b = self.store.bucket()?;
        let (up, repo) = (t.upstream.name(), t.repo.as_str());
        let entries = match b.tags(up, repo, tag.as_str()).await {
            Ok(e) => e,
            Err(e) => {
                info!(error = %e, tag = %tag, "the bucket failed a tag lookup");
                return None;
            }
        };
        let mut entry = entries.into_iter().find(|e| accept.allows(&e.media_type))?;
        // A replica whose clock runs ahead must not make a tag look fresh here for longer.
        entry.checked = entry.checked.min(SystemTime::now());
        let fresh = entry
            .checked
            .elapsed()
            .map(|age| age < self.tag_ttl)
            .unwrap_or(true);
        let newer = local.is_none_or(|l| entry.checked > l.checked);
        if !(fresh || self.offline) || !newer {
            return None;
        }
        let at = (
            up.to_owned(),
            repo.to_owned(),
            tag.to_string(),
            entry.checked,
        );
        let m = match self.cached_manifest(&entry.digest).await.ok().flatten() {
            Some(m) => {
                let (st, e) = (self.store.clone(), entry.clone());
                let _ = tokio::task::spawn_blocking(move || {
                    st.meta().touch_tag(&at.0, &at.1, &at.2, &e, at.3)
                })
                .await;
                m
            }
            None => self.bucket_manifest(&entry.digest, Some(at)).await?,
        };
        debug!(tag = %tag, digest = %m.digest, "tag from the bucket");
        Some(m)
    }

    /// The replica that resolves this tag for every replica, when it is another one and this
    /// request is not itself a peer's.
    fn tag_owner(
        &self,
        t: &Target,
        tag: &Tag,
    ) -> Option<(Arc<crate::cluster::Cluster>, crate::cluster::Peer)> {
        let c = self
            .cluster
            .as_ref()
            .filter(|_| !t.forwarded && !self.offline)?;
        let key = format!("{}/{}:{}", t.upstream.name(), t.repo, tag);
        c.owner(&key).map(|p| (c.clone(), p))
    }

    async fn fetch_by_tag(
        &self,
        t: &Target,
        tag: &Tag,
        accept: &Accept,
    ) -> Result<Arc<Manifest>, Error> {
        self.fetch_manifest_task(
            t,
            tag.to_string(),
            accept.clone(),
            None,
            Some(tag.to_string()),
        )
        .await
    }

    /// HEADs the tag upstream: `Some(digest)` from `Docker-Content-Digest`, `None` if absent.
    async fn head_tag(
        &self,
        t: &Target,
        tag: &Tag,
        accept: &Accept,
    ) -> Result<Option<Digest>, Error> {
        let up = &t.upstream;
        let head = up.send(t.manifest_request(Method::HEAD, tag.as_str(), accept));
        let resp = tokio::time::timeout(REVALIDATE_DEADLINE.min(up.body_timeout()), head)
            .await
            .map_err(|_| {
                up.note_timeout();
                Error::upstream(
                    up.name(),
                    crate::error::UpstreamFault::Timeout("revalidating a tag"),
                )
            })??;
        if !resp.status().is_success() {
            return Err(up.status_error(&resp));
        }
        Ok(resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok()))
    }
}
