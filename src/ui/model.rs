//! What the page shows, read from the metadata, the metrics and the fill table each time it
//! is asked: the page and the JSON are two renderings of these values, and nothing here is
//! kept apart from where the server keeps it (the five-minute hit ratio's past readings
//! excepted, `history.rs`).
//!
//! Every function takes `may_pull`: with `[auth]`, a repository the caller may not pull is
//! neither listed nor counted, and its fills are not shown.

use super::history::{self, Counts};
use crate::metrics::{Kind, Lookup, Metrics, Source};
use crate::mirror::FillView;
use crate::oci::descriptor::{self, Refs};
use crate::oci::{Digest, manifest};
use crate::storage::meta::split_repo_key;
use crate::storage::{Access, FsStore, Store, evict};
use prometheus::core::Collector;
use serde::Serialize;
use std::collections::HashSet;
use std::io;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Asks whether the caller may pull `(upstream, repository)`.
pub type MayPull<'a> = &'a dyn Fn(&str, &str) -> bool;

/// Seconds since the epoch, as the JSON gives times.
pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

// === at a glance ===

#[derive(Clone, Debug, Serialize)]
pub struct Overview {
    pub version: &'static str,
    pub started: u64,
    pub uptime_seconds: u64,
    pub hit_ratio: HitRatios,
    pub bytes: ByteCounts,
    pub fills: Vec<FillRow>,
    pub upstreams: Vec<UpstreamRow>,
    pub cache: CacheUse,
}

#[derive(Clone, Debug, Serialize)]
pub struct HitRatios {
    pub manifest: Ratio,
    pub blob: Ratio,
    /// How far back `recent` reaches: five minutes, or the uptime when shorter.
    pub recent_seconds: u64,
}

/// `1 - misses / lookups`, as the dashboard computes it; `null` without lookups.
#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    pub lookups: u64,
    pub misses: u64,
    pub since_start: Option<f64>,
    pub recent: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ByteCounts {
    /// Sent to clients from committed cache files.
    pub served_from_cache: u64,
    /// Sent to clients from fills in progress.
    pub served_from_fills: u64,
    /// Fetched from every upstream.
    pub fetched: u64,
    /// Served from cache and fills beyond what was fetched (0 while fetching outruns serving).
    pub saved: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct FillRow {
    pub digest: String,
    pub upstream: String,
    pub repository: String,
    pub written: u64,
    /// `null` when the upstream declared no length.
    pub size: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct UpstreamRow {
    pub name: String,
    pub default: bool,
    pub last_success: Option<u64>,
    pub last_error: Option<u64>,
    pub circuit_open: bool,
    /// From the upstream's `ratelimit-*` headers (Docker Hub), when it sent them.
    pub ratelimit_remaining: Option<i64>,
    pub ratelimit_limit: Option<i64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CacheUse {
    pub bytes: u64,
    pub objects: u64,
    pub max_size: u64,
    /// Where an eviction pass brings the cache down to once it passes `max_size`.
    pub low_watermark: u64,
}

/// Reads the lookup counters the recent ratio is computed from.
pub fn lookup_counts(m: &Metrics) -> Counts {
    let count = |kind: Kind| {
        let mut total = 0;
        let mut misses = 0;
        for r in crate::metrics::LOOKUPS {
            let n = m
                .lookups
                .with_label_values(&[kind.as_str(), r.as_str()])
                .get();
            total += n;
            if r == Lookup::Miss {
                misses += n;
            }
        }
        (total, misses)
    };
    Counts {
        manifest: count(Kind::Manifest),
        blob: count(Kind::Blob),
    }
}

/// The value of each existing child of a per-upstream gauge, without creating the absent
/// ones (an absent rate-limit gauge means "never sent", not zero).
fn gauge_values(g: &prometheus::IntGaugeVec) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for family in g.collect() {
        for m in family.get_metric() {
            let name = m.get_label().iter().find(|l| l.name() == "upstream");
            if let Some(l) = name {
                out.push((l.value().to_owned(), m.get_gauge().get_value() as i64));
            }
        }
    }
    out
}

/// The inputs of [`overview`] that do not come from `metrics`.
pub struct OverviewInputs<'a> {
    pub started: SystemTime,
    pub now: SystemTime,
    pub recent: history::Recent,
    pub upstreams: &'a [(String, bool)],
    pub fills: Vec<FillView>,
    pub usage: crate::storage::Usage,
    pub max_size: u64,
}

pub fn overview(m: &Metrics, i: OverviewInputs<'_>, may_pull: MayPull<'_>) -> Overview {
    let counts = lookup_counts(m);
    let ratio = |c: (u64, u64), recent: Option<f64>| Ratio {
        lookups: c.0,
        misses: c.1,
        since_start: history::ratio(c),
        recent,
    };
    let served = |s: Source| m.served_bytes.with_label_values(&[s.as_str()]).get();
    let (cache, fills) = (served(Source::Cache), served(Source::Fill));
    let fetched: u64 = i
        .upstreams
        .iter()
        .map(|(u, _)| m.upstream_bytes.with_label_values(&[u.as_str()]).get())
        .sum();
    let remaining = gauge_values(&m.ratelimit_remaining);
    let limit = gauge_values(&m.ratelimit_limit);
    let ok = gauge_values(&m.upstream_last_success);
    let err = gauge_values(&m.upstream_last_error);
    let find = |v: &[(String, i64)], u: &str| v.iter().find(|(n, _)| n == u).map(|(_, x)| *x);
    let upstreams = i
        .upstreams
        .iter()
        .map(|(name, default)| UpstreamRow {
            name: name.clone(),
            default: *default,
            last_success: find(&ok, name).map(|t| t.max(0) as u64),
            last_error: find(&err, name).map(|t| t.max(0) as u64),
            circuit_open: m
                .upstream_circuit_open
                .with_label_values(&[name.as_str()])
                .get()
                > 0,
            ratelimit_remaining: find(&remaining, name),
            ratelimit_limit: find(&limit, name),
        })
        .collect();
    let mut fill_rows: Vec<FillRow> = i
        .fills
        .into_iter()
        .filter_map(|f| {
            let (u, r) = split_repo_key(&f.owner)?;
            may_pull(u, r).then(|| FillRow {
                digest: f.digest.to_string(),
                upstream: u.to_owned(),
                repository: r.to_owned(),
                written: f.written,
                size: f.len,
            })
        })
        .collect();
    fill_rows.sort_by(|a, b| a.digest.cmp(&b.digest));
    Overview {
        version: env!("CARGO_PKG_VERSION"),
        started: unix(i.started),
        uptime_seconds: i.now.duration_since(i.started).map_or(0, |d| d.as_secs()),
        hit_ratio: HitRatios {
            manifest: ratio(counts.manifest, i.recent.manifest),
            blob: ratio(counts.blob, i.recent.blob),
            recent_seconds: i.recent.span.as_secs(),
        },
        bytes: ByteCounts {
            served_from_cache: cache,
            served_from_fills: fills,
            fetched,
            saved: (cache + fills).saturating_sub(fetched),
        },
        fills: fill_rows,
        upstreams,
        cache: CacheUse {
            bytes: i.usage.bytes,
            objects: i.usage.objects,
            max_size: i.max_size,
            low_watermark: (i.max_size as f64 * evict::LOW_WATERMARK) as u64,
        },
    }
}

// === what it holds ===

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Sort {
    /// Upstream, repository, tag.
    #[default]
    Name,
    /// Most recently pulled first.
    Pulled,
    /// Most recently revalidated with the upstream first.
    Revalidated,
}

impl Sort {
    pub const ALL: [Sort; 3] = [Sort::Name, Sort::Pulled, Sort::Revalidated];

    pub fn as_str(self) -> &'static str {
        match self {
            Sort::Name => "name",
            Sort::Pulled => "pulled",
            Sort::Revalidated => "revalidated",
        }
    }
}

pub const PER_PAGE: usize = 50;
pub const MAX_PER_PAGE: usize = 100;
const MAX_QUERY: usize = 200;

/// What to list: from `?q=&upstream=&sort=&page=&per_page=`. Values that do not parse fall
/// back to the defaults: a mistyped link still shows a page.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ListQuery {
    pub q: String,
    pub upstream: Option<String>,
    pub sort: Sort,
    /// From 1.
    pub page: usize,
    pub per_page: usize,
}

impl Default for ListQuery {
    fn default() -> Self {
        ListQuery {
            q: String::new(),
            upstream: None,
            sort: Sort::Name,
            page: 1,
            per_page: PER_PAGE,
        }
    }
}

impl ListQuery {
    pub fn parse(query: Option<&str>) -> ListQuery {
        let mut out = ListQuery::default();
        for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match &*k {
                "q" => out.q = v.trim().chars().take(MAX_QUERY).collect(),
                "upstream" if !v.is_empty() => out.upstream = Some(v.chars().take(255).collect()),
                "sort" => {
                    out.sort = Sort::ALL
                        .into_iter()
                        .find(|s| s.as_str() == v)
                        .unwrap_or_default()
                }
                "page" => out.page = v.parse().unwrap_or(1).max(1),
                "per_page" => out.per_page = v.parse().unwrap_or(PER_PAGE).clamp(1, MAX_PER_PAGE),
                _ => {}
            }
        }
        out
    }

    /// The query string of this listing at another page (and optionally another sort).
    pub fn link(&self, page: usize, sort: Sort) -> String {
        let mut s = form_urlencoded::Serializer::new(String::new());
        if !self.q.is_empty() {
            s.append_pair("q", &self.q);
        }
        if let Some(u) = &self.upstream {
            s.append_pair("upstream", u);
        }
        if sort != Sort::Name {
            s.append_pair("sort", sort.as_str());
        }
        if page != 1 {
            s.append_pair("page", &page.to_string());
        }
        if self.per_page != PER_PAGE {
            s.append_pair("per_page", &self.per_page.to_string());
        }
        s.finish()
    }

    /// Whether a row matches the search: the text is found, ignoring case, in the repository
    /// or the tag (or in `upstream/repository:tag`, so a pasted image name matches).
    fn matches(&self, needle: &str, upstream: &str, repo: &str, tag: &str) -> bool {
        if needle.is_empty() {
            return true;
        }
        let has = |hay: &str| {
            hay.len() >= needle.len()
                && hay
                    .as_bytes()
                    .windows(needle.len())
                    .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
        };
        has(repo)
            || has(tag)
            || ((needle.contains('/') || needle.contains(':'))
                && has(&format!("{upstream}/{repo}:{tag}")))
    }
}

/// How much of one upstream the caller can see.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Holding {
    pub upstream: String,
    pub repositories: usize,
    pub tags: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Listing {
    pub query: ListQuery,
    /// Rows matching the query, over all pages.
    pub total: usize,
    pub pages: usize,
    pub rows: Vec<ImageRow>,
    /// Per upstream, what the caller may see (the search aside).
    pub holdings: Vec<Holding>,
}

/// One tag as the cache holds it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ImageRow {
    pub upstream: String,
    /// As the upstream names it (`library/nginx` on docker.io).
    pub repository: String,
    pub tag: String,
    pub digest: String,
    pub media_type: String,
    /// The platforms the manifest names (its own, for a single-platform image), each with
    /// whether its manifest is cached.
    pub platforms: Vec<PlatformRow>,
    /// Declared bytes of the cached platforms: manifests, configs and layers.
    pub size: Option<u64>,
    /// When the manifest was stored.
    pub fetched: Option<u64>,
    /// When a client last read the manifest.
    pub last_pulled: Option<u64>,
    /// When the upstream last confirmed the tag's digest.
    pub revalidated: u64,
    pub pinned: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PlatformRow {
    pub platform: String,
    pub digest: Option<String>,
    pub cached: bool,
}

/// One tag and digest as the tags table holds them: the index the listing filters.
#[derive(Clone, Debug)]
struct Found {
    upstream: String,
    repo: String,
    tag: String,
    digest: String,
    media_type: String,
    checked: SystemTime,
}

/// Every tag of the cache, one row each (the latest confirmed of its media types), in key order: upstream, repository, tag. Built by one pass over the tags
/// table; [`super::Ui`] keeps the last one until the table is written again, since that pass
/// is most of a page's cost with thousands of repositories.
#[derive(Debug, Default)]
pub struct TagIndex {
    rows: Vec<Found>,
}

impl TagIndex {
    /// Reads the tags table. Blocking.
    pub fn read(store: &Store) -> io::Result<TagIndex> {
        let mut rows: Vec<Found> = Vec::new();
        store.meta().for_each_tag(|row| {
            // Rows of one tag are adjacent (the media type is the key's last part). A tag asked
            // for with different Accept headers may have a row per answer (an index, and the
            // amd64 manifest an older client was given): one tag is one row, the one upstream
            // confirmed last, as the image page shows.
            if let Some(prev) = rows.last_mut()
                && prev.upstream == row.upstream
                && prev.repo == row.repo
                && prev.tag == row.tag
            {
                if row.checked > prev.checked {
                    prev.checked = row.checked;
                    row.digest.clone_into(&mut prev.digest);
                    row.media_type.clone_into(&mut prev.media_type);
                }
                return;
            }
            rows.push(Found {
                upstream: row.upstream.to_owned(),
                repo: row.repo.to_owned(),
                tag: row.tag.to_owned(),
                digest: row.digest.to_owned(),
                media_type: row.media_type.to_owned(),
                checked: row.checked,
            });
        })?;
        Ok(TagIndex { rows })
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// Lists the tags the cache holds that the caller may pull, filtered, sorted and paged by
/// `query`, reading the tags table first. Blocking.
pub fn list(
    store: &Store,
    cache_dir: &Path,
    pinned: &HashSet<Digest>,
    query: &ListQuery,
    may_pull: MayPull<'_>,
) -> io::Result<Listing> {
    list_in(
        &TagIndex::read(store)?,
        store,
        cache_dir,
        pinned,
        query,
        may_pull,
    )
}

/// [`list`] over an index already read: only the page's rows are read further (manifest and
/// config files for platforms and sizes, object rows for the last pull), and, sorted by last
/// pull, every matching row's object row. Blocking.
pub fn list_in(
    index: &TagIndex,
    store: &Store,
    cache_dir: &Path,
    pinned: &HashSet<Digest>,
    query: &ListQuery,
    may_pull: MayPull<'_>,
) -> io::Result<Listing> {
    let mut found: Vec<&Found> = Vec::new();
    let mut holdings: Vec<Holding> = Vec::new();
    // Rows come in key order, so one repository's rows are together: ask once per repository,
    // and count a repository or tag when it first appears.
    let mut last_repo: Option<(&str, &str, bool)> = None;
    let mut last_tag: Option<&str> = None;
    let needle = query.q.as_str();
    for row in &index.rows {
        let same_repo = last_repo.is_some_and(|(u, r, _)| u == row.upstream && r == row.repo);
        if !same_repo {
            let allowed = may_pull(&row.upstream, &row.repo);
            last_repo = Some((&row.upstream, &row.repo, allowed));
            last_tag = None;
            if allowed {
                if holdings.last().is_none_or(|h| h.upstream != row.upstream) {
                    holdings.push(Holding {
                        upstream: row.upstream.clone(),
                        ..Holding::default()
                    });
                }
                if let Some(h) = holdings.last_mut() {
                    h.repositories += 1;
                }
            }
        }
        if !last_repo.is_some_and(|(_, _, a)| a) {
            continue;
        }
        if last_tag != Some(row.tag.as_str()) {
            last_tag = Some(&row.tag);
            if let Some(h) = holdings.last_mut() {
                h.tags += 1;
            }
        }
        if query.upstream.as_deref().is_some_and(|u| u != row.upstream)
            || !query.matches(needle, &row.upstream, &row.repo, &row.tag)
        {
            continue;
        }
        found.push(row);
    }
    match query.sort {
        Sort::Name => {}
        Sort::Revalidated => found.sort_by_key(|f| std::cmp::Reverse(f.checked)),
        Sort::Pulled => {
            let digests: Vec<&str> = found.iter().map(|f| f.digest.as_str()).collect();
            let rows = store.meta().object_rows(&digests)?;
            let mut keyed: Vec<(Option<SystemTime>, &Found)> = rows
                .into_iter()
                .map(|r| r.map(|(_, at)| at))
                .zip(found)
                .collect();
            // Stable: equal times keep name order; never pulled goes last.
            keyed.sort_by_key(|k| std::cmp::Reverse(k.0));
            found = keyed.into_iter().map(|(_, f)| f).collect();
        }
    }
    let total = found.len();
    let pages = total.div_ceil(query.per_page).max(1);
    // A page past the end (an old link, a hand-made one) shows the last.
    let mut query = query.clone();
    query.page = query.page.clamp(1, pages);
    let start = (query.page - 1).saturating_mul(query.per_page);
    let page: Vec<Found> = found
        .into_iter()
        .skip(start)
        .take(query.per_page)
        .cloned()
        .collect();
    let rows = describe_rows(store, cache_dir, pinned, page)?;
    Ok(Listing {
        query,
        total,
        pages,
        rows,
        holdings,
    })
}

fn describe_rows(
    store: &Store,
    cache_dir: &Path,
    pinned: &HashSet<Digest>,
    page: Vec<Found>,
) -> io::Result<Vec<ImageRow>> {
    let digests: Vec<&str> = page.iter().map(|f| f.digest.as_str()).collect();
    let objects = store.meta().object_rows(&digests)?;
    Ok(page
        .into_iter()
        .zip(objects)
        .map(|(f, object)| {
            let digest: Option<Digest> = f.digest.parse().ok();
            let (platforms, size) = match &digest {
                Some(d) => describe(store, d, &f.media_type),
                None => (Vec::new(), None),
            };
            let fetched = digest.as_ref().and_then(|d| {
                std::fs::metadata(FsStore::blob_path_in(cache_dir, d))
                    .and_then(|m| m.modified())
                    .ok()
                    .map(unix)
            });
            ImageRow {
                pinned: digest.as_ref().is_some_and(|d| pinned.contains(d)),
                upstream: f.upstream,
                repository: f.repo,
                tag: f.tag,
                digest: f.digest,
                media_type: f.media_type,
                platforms,
                size,
                fetched,
                last_pulled: object.map(|(_, at)| unix(at)),
                revalidated: unix(f.checked),
            }
        })
        .collect())
}

/// A cached object's bytes without counting it as a read: looking at the page must not keep
/// an image from eviction.
fn read_quietly(store: &Store, d: &Digest, cap: usize) -> Option<Vec<u8>> {
    store
        .blobs()
        .open(d, Access::Quiet)
        .ok()??
        .read_all(cap)
        .ok()
}

/// The size of a config blob read for its platform at most; larger configs are not read.
const MAX_CONFIG: usize = 1024 * 1024;

/// Platforms and declared size of a cached manifest, from its bytes (and its children's).
fn describe(store: &Store, digest: &Digest, media_type: &str) -> (Vec<PlatformRow>, Option<u64>) {
    let Some(bytes) = read_quietly(store, digest, manifest::MAX_MANIFEST_SIZE) else {
        return (Vec::new(), None);
    };
    match descriptor::parse_refs(media_type, &bytes) {
        Ok(Refs::Index(children)) => {
            let mut size = None;
            let mut platforms = Vec::new();
            for child in children {
                let image = read_quietly(store, &child.digest, manifest::MAX_MANIFEST_SIZE)
                    .and_then(|b| image_size(&child.media_type, &b));
                if let Some(s) = image {
                    size = Some(size.unwrap_or(bytes.len() as u64) + child.size + s);
                }
                // Attestations and signatures are listed as "unknown/unknown": not platforms.
                let Some(p) = child.platform.filter(|p| p.os != "unknown") else {
                    continue;
                };
                platforms.push(PlatformRow {
                    platform: p.to_string(),
                    digest: Some(child.digest.to_string()),
                    cached: image.is_some(),
                });
            }
            (platforms, size)
        }
        Ok(Refs::Image { config, layers }) => {
            let size =
                bytes.len() as u64 + config.size + layers.iter().map(|l| l.size).sum::<u64>();
            let platform = read_quietly(store, &config.digest, MAX_CONFIG)
                .and_then(|b| serde_json::from_slice::<descriptor::Platform>(&b).ok());
            let platforms = platform
                .map(|p| PlatformRow {
                    platform: p.to_string(),
                    digest: None,
                    cached: true,
                })
                .into_iter()
                .collect();
            (platforms, Some(size))
        }
        Err(_) => (Vec::new(), None),
    }
}

/// The declared size of an image manifest's config and layers.
fn image_size(media_type: &str, bytes: &[u8]) -> Option<u64> {
    match descriptor::parse_refs(media_type, bytes) {
        Ok(Refs::Image { config, layers }) => {
            Some(config.size + layers.iter().map(|l| l.size).sum::<u64>())
        }
        _ => None,
    }
}

// === one image, and how to pull it ===

#[derive(Clone, Debug, Serialize)]
pub struct ImageDetail {
    /// The tag, with the digest it was most recently confirmed at.
    pub image: ImageRow,
    /// How to pull it through this mirror: one command per client and routing mode.
    pub pull: Vec<PullCommand>,
}

/// One way to pull the image through the mirror.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PullCommand {
    pub client: &'static str,
    /// How that client reaches the mirror (the routing mode).
    pub mode: &'static str,
    pub command: String,
    /// What must be configured first, if anything.
    pub setup: Option<String>,
}

/// The tag `upstream/repository:tag`, if the caller may pull it and the cache holds it.
pub fn image(
    store: &Store,
    cache_dir: &Path,
    pinned: &HashSet<Digest>,
    key: (&str, &str, &str),
    may_pull: MayPull<'_>,
) -> io::Result<Option<ImageRow>> {
    let (upstream, repo, tag) = key;
    if !may_pull(upstream, repo) {
        return Ok(None);
    }
    let mut entries = store.meta().tags(upstream, repo, tag)?;
    // The most recently confirmed digest is the one a pull gets now.
    entries.sort_by_key(|e| std::cmp::Reverse(e.checked));
    let Some(e) = entries.into_iter().next() else {
        return Ok(None);
    };
    let found = Found {
        upstream: upstream.to_owned(),
        repo: repo.to_owned(),
        tag: tag.to_owned(),
        digest: e.digest.to_string(),
        media_type: e.media_type,
        checked: e.checked,
    };
    Ok(describe_rows(store, cache_dir, pinned, vec![found])?.pop())
}

/// How the mirror is reached, for the pull commands.
pub struct Reach<'a> {
    /// `host:port` as the client wrote it in `Host`.
    pub authority: &'a str,
    pub tls: bool,
    /// The `default = true` upstream.
    pub default_upstream: Option<&'a str>,
}

/// The pull command of `image` in each routing mode that reaches it (README, "Using it").
pub fn pull_commands(reach: &Reach<'_>, upstream: &str, repo: &str, tag: &str) -> Vec<PullCommand> {
    let short = if upstream == "docker.io" {
        repo.strip_prefix("library/").unwrap_or(repo)
    } else {
        repo
    };
    let host = reach.authority;
    let insecure = !reach.tls;
    let mut out = Vec::new();
    if reach.default_upstream == Some(upstream) {
        if upstream == "docker.io" {
            out.push(PullCommand {
                client: "docker",
                mode: "registry-mirrors (default upstream)",
                command: format!("docker pull {short}:{tag}"),
                setup: Some(format!(
                    "/etc/docker/daemon.json: {{\"registry-mirrors\": [\"{}://{host}\"]}}",
                    if reach.tls { "https" } else { "http" }
                )),
            });
        }
        out.push(PullCommand {
            client: "docker",
            mode: "mirror host (default upstream)",
            command: format!("docker pull {host}/{short}:{tag}"),
            setup: insecure.then(|| {
                format!("/etc/docker/daemon.json: {{\"insecure-registries\": [\"{host}\"]}}")
            }),
        });
    }
    out.push(PullCommand {
        client: "docker",
        mode: "path prefix",
        command: format!("docker pull {host}/{upstream}/{repo}:{tag}"),
        setup: insecure
            .then(|| format!("/etc/docker/daemon.json: {{\"insecure-registries\": [\"{host}\"]}}")),
    });
    let setup = format!(
        "the hosts.toml files that cachalot client-config containerd --mirror {}://{host} writes",
        if reach.tls { "https" } else { "http" }
    );
    out.push(PullCommand {
        client: "ctr",
        mode: "hosts.toml (?ns=)",
        command: format!(
            "ctr images pull --hosts-dir /etc/containerd/certs.d {upstream}/{repo}:{tag}"
        ),
        setup: Some(setup.clone()),
    });
    out.push(PullCommand {
        client: "crictl",
        mode: "hosts.toml (?ns=)",
        command: format!("crictl pull {upstream}/{repo}:{tag}"),
        setup: Some(format!(
            "{setup}, and containerd's config_path = \"/etc/containerd/certs.d\""
        )),
    });
    out.push(PullCommand {
        client: "podman",
        mode: "path prefix",
        command: format!(
            "podman pull {}{host}/{upstream}/{repo}:{tag}",
            if insecure { "--tls-verify=false " } else { "" }
        ),
        setup: None,
    });
    out
}

#[cfg(test)]
#[path = "model_tests.rs"]
mod tests;
