//! The page's HTML, from the model's values (maud, compiled in). Only formatting here: what
//! to show was decided in `model.rs`. Works without JavaScript: search, sorting and paging
//! are links and a GET form; `ui.js` only refreshes the figures and adds copy buttons.

use super::model::{
    ImageDetail, ImageRow, ListQuery, Listing, Overview, PlatformRow, Ratio, Sort, unix,
};
use maud::{DOCTYPE, Markup, PreEscaped, html};
use std::time::SystemTime;

/// `1.5 GiB`: binary units, one decimal past KiB.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// `75.0%`, or an em dash when there is nothing to divide.
pub fn percent(r: Option<f64>) -> String {
    r.map_or_else(|| "—".to_owned(), |r| format!("{:.1}%", r * 100.0))
}

/// `2026-12-02 13:45:07 UTC` from seconds since the epoch.
pub fn timestamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil, for the proleptic Gregorian calendar.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `3h 2m`, `45s`, `2d 4h`: the two largest units.
pub fn duration(secs: u64) -> String {
    let (d, h, m, s) = (
        secs / 86_400,
        secs % 86_400 / 3600,
        secs % 3600 / 60,
        secs % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// A `<time>` with the absolute time as its title and how long ago as its text.
fn ago(at: Option<u64>, now: u64) -> Markup {
    match at {
        None => html! { span.muted { "never" } },
        Some(t) => {
            let text = if t > now {
                "just now".to_owned()
            } else {
                format!("{} ago", duration(now - t))
            };
            html! { time datetime=(rfc3339(t)) title=(timestamp(t)) { (text) } }
        }
    }
}

fn rfc3339(secs: u64) -> String {
    timestamp(secs).replace(' ', "T").replace("TUTC", "Z")
}

fn short_digest(d: &str) -> &str {
    let hex = d.split_once(':').map_or(d, |(_, h)| h);
    &hex[..hex.len().min(12)]
}

fn image_link(r: &ImageRow) -> String {
    let q = form_urlencoded::Serializer::new(String::new())
        .append_pair("upstream", &r.upstream)
        .append_pair("repository", &r.repository)
        .append_pair("tag", &r.tag)
        .finish();
    format!("/ui/image?{q}")
}

/// The frame of every page; `tagline` goes beside the name in the header.
fn layout(title: &str, tagline: Markup, body: Markup) -> Markup {
    let v = env!("CARGO_PKG_VERSION");
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) }
                link rel="stylesheet" href={ "/ui/style.css?v=" (v) };
                script src={ "/ui/ui.js?v=" (v) } defer {}
            }
            body {
                header.top {
                    a.brand href="/ui" { "cachalot" }
                    span.muted { (tagline) }
                }
                main { (body) }
                footer {
                    "Read-only. The same data as JSON: "
                    a href="/ui/api/overview" { "/ui/api/overview" } ", "
                    a href="/ui/api/images" { "/ui/api/images" } ". Metrics: "
                    a href="/metrics" { "/metrics" } "."
                }
            }
        }
    }
}

fn ratio_cells(kind: &str, r: &Ratio) -> Markup {
    html! {
        td id={ "hit-" (kind) "-start" } { (percent(r.since_start)) }
        td id={ "hit-" (kind) "-recent" } { (percent(r.recent)) }
        td id={ "hit-" (kind) "-lookups" } { (r.lookups) }
    }
}

fn glance(o: &Overview, now: u64) -> Markup {
    let used = o.cache.bytes as f64 / o.cache.max_size.max(1) as f64;
    html! {
        section aria-labelledby="glance" {
            h2 #glance { "At a glance" }
            div.cards {
                article.card aria-labelledby="hit-title" {
                    h3 #hit-title { "Hit ratio" }
                    table {
                        thead { tr { th scope="col" { span.sr { "kind" } } th scope="col" { "since start" }
                            th scope="col" { "last " span #recent-span { (duration(o.hit_ratio.recent_seconds.max(1))) } }
                            th scope="col" { "lookups" } } }
                        tbody {
                            tr { th scope="row" { "Manifests" } (ratio_cells("manifest", &o.hit_ratio.manifest)) }
                            tr { th scope="row" { "Blobs" } (ratio_cells("blob", &o.hit_ratio.blob)) }
                        }
                    }
                }
                article.card aria-labelledby="bytes-title" {
                    h3 #bytes-title { "Bytes" }
                    dl {
                        dt { "Served from cache" } dd #bytes-cache { (bytes(o.bytes.served_from_cache)) }
                        dt { "Served from fills" } dd #bytes-fills { (bytes(o.bytes.served_from_fills)) }
                        dt { "Fetched from upstreams" } dd #bytes-fetched { (bytes(o.bytes.fetched)) }
                        dt { "Saved" } dd #bytes-saved { strong { (bytes(o.bytes.saved)) } }
                    }
                }
                article.card aria-labelledby="cache-title" {
                    h3 #cache-title { "Cache" }
                    label for="cache-meter" { "Disk used" }
                    meter #cache-meter min="0" max=(o.cache.max_size) low=(o.cache.low_watermark)
                        high=(o.cache.low_watermark) optimum="0" value=(o.cache.bytes) {
                        (percent(Some(used)))
                    }
                    p {
                        span #cache-used { (bytes(o.cache.bytes)) } " of " (bytes(o.cache.max_size))
                        " (" span #cache-percent { (percent(Some(used))) } "), "
                        span #cache-objects { (o.cache.objects) } " objects."
                    }
                    p.muted {
                        "Past " (bytes(o.cache.max_size)) ", eviction removes the least recently pulled down to "
                        (bytes(o.cache.low_watermark)) "; pinned images stay."
                    }
                }
            }
            div.pair { div {
            h3 { "Upstreams" }
            div.scroll {
                table #upstreams {
                    thead { tr {
                        th scope="col" { "Upstream" } th scope="col" { "Last success" }
                        th scope="col" { "Last error" } th scope="col" { "Circuit" }
                        th scope="col" { "Rate limit left" }
                    } }
                    tbody {
                        @for u in &o.upstreams {
                            tr {
                                th scope="row" { (u.name) @if u.default { " " span.badge { "default" } } }
                                td { (ago(u.last_success, now)) }
                                td { (ago(u.last_error, now)) }
                                td { @if u.circuit_open { strong.bad { "open: taken for down" } } @else { "closed" } }
                                td {
                                    @match (u.ratelimit_remaining, u.ratelimit_limit) {
                                        (Some(r), Some(l)) => { (r) " of " (l) }
                                        (Some(r), None) => { (r) }
                                        _ => { span.muted { "not reported" } }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            } div {
            h3 { "Fills in flight (" span #fills-count { (o.fills.len()) } ")" }
            @if o.fills.is_empty() {
                p.muted { "None: nothing is being fetched now." }
            } @else {
                div.scroll { table #fills {
                    thead { tr { th scope="col" { "Repository" } th scope="col" { "Blob" } th scope="col" { "Progress" } } }
                    tbody { @for f in &o.fills {
                        tr {
                            td { (f.upstream) "/" (f.repository) }
                            td { code title=(f.digest) { (short_digest(&f.digest)) } }
                            td {
                                @if let Some(size) = f.size {
                                    progress max=(size) value=(f.written) { (percent(Some(f.written as f64 / size.max(1) as f64))) }
                                    " " (bytes(f.written)) " of " (bytes(size))
                                } @else {
                                    (bytes(f.written)) " (length not declared)"
                                }
                            }
                        }
                    } }
                } }
            }
            } }
        }
    }
}

fn platforms(ps: &[PlatformRow]) -> Markup {
    let cached: Vec<&PlatformRow> = ps.iter().filter(|p| p.cached).collect();
    let others = ps.len() - cached.len();
    html! {
        @for (i, p) in cached.iter().enumerate() {
            @if i > 0 { ", " }
            (p.platform)
        }
        @if others > 0 {
            " " span.muted title="platforms the image has that the cache does not hold" { "+" (others) " not cached" }
        }
    }
}

fn sort_link(q: &ListQuery, sort: Sort, label: &str) -> Markup {
    let current = q.sort == sort;
    html! {
        a href={ "/ui?" (q.link(1, sort)) } aria-current=[current.then_some("true")] { (label) @if current { " ▾" } }
    }
}

fn holdings(l: &Listing, upstreams: &[String]) -> Markup {
    let q = &l.query;
    html! {
        section aria-labelledby="holds" {
            h2 #holds { "What it holds" }
            @if l.holdings.is_empty() {
                p { "No images yet: pull one through the mirror and it appears here." }
            } @else {
                ul.holdings {
                    @for h in &l.holdings {
                        li { strong { (h.upstream) } ": " (h.repositories) " repositories, " (h.tags) " tags" }
                    }
                }
            }
            form.search method="get" action="/ui" role="search" {
                div {
                    label for="q" { "Repository or tag" }
                    input #q type="search" name="q" value=(q.q) placeholder="nginx, 1.27, ghcr.io/org/app";
                }
                div {
                    label for="upstream" { "Upstream" }
                    select #upstream name="upstream" {
                        option value="" { "all" }
                        @for u in upstreams {
                            option value=(u) selected[q.upstream.as_deref() == Some(u.as_str())] { (u) }
                        }
                    }
                }
                div {
                    label for="sort" { "Sort by" }
                    select #sort name="sort" {
                        @for s in Sort::ALL {
                            option value=(s.as_str()) selected[q.sort == s] { (match s {
                                Sort::Name => "name",
                                Sort::Pulled => "last pulled",
                                Sort::Revalidated => "last revalidated",
                            }) }
                        }
                    }
                }
                button type="submit" { "Search" }
            }
            p #match-count {
                (l.total) " tags" @if !q.q.is_empty() { " matching “" (q.q) "”" }
                @if l.pages > 1 { ", page " (q.page) " of " (l.pages) } "."
            }
            @if !l.rows.is_empty() {
                div.scroll { table.images #images {
                    thead { tr {
                        th scope="col" { (sort_link(q, Sort::Name, "Image")) }
                        th scope="col" { "Digest" }
                        th scope="col" { "Platforms" }
                        th.num scope="col" { "Size" }
                        th scope="col" { "Fetched" }
                        th scope="col" { (sort_link(q, Sort::Pulled, "Last pulled")) }
                        th scope="col" { (sort_link(q, Sort::Revalidated, "Revalidated")) }
                        th scope="col" { "Pinned" }
                    } }
                    (rows(l))
                } }
            }
            @if l.pages > 1 {
                nav.pages aria-label="Pages" {
                    @if q.page > 1 { a rel="prev" href={ "/ui?" (q.link(q.page - 1, q.sort)) } { "← previous" } }
                    " page " (q.page) " of " (l.pages) " "
                    @if q.page < l.pages { a rel="next" href={ "/ui?" (q.link(q.page + 1, q.sort)) } { "next →" } }
                }
            }
        }
    }
}

/// The rows, one `<tbody>` per repository when sorted by name (upstream → repository → tags).
fn rows(l: &Listing) -> Markup {
    let now = unix(SystemTime::now());
    let grouped = l.query.sort == Sort::Name;
    let mut groups: Vec<&[ImageRow]> = Vec::new();
    let mut rest = l.rows.as_slice();
    while !rest.is_empty() {
        let n = if grouped {
            rest.iter()
                .take_while(|r| {
                    r.upstream == rest[0].upstream && r.repository == rest[0].repository
                })
                .count()
        } else {
            rest.len()
        };
        groups.push(&rest[..n]);
        rest = &rest[n..];
    }
    html! {
        @for g in groups {
            tbody {
                @if grouped {
                    tr.repo { th colspan="8" scope="rowgroup" { (g[0].upstream) "/" (g[0].repository) } }
                }
                @for r in g {
                    tr {
                        th scope="row" {
                            a href=(image_link(r)) {
                                @if grouped { span.tag { (r.tag) } }
                                @else { (r.upstream) "/" (r.repository) ":" span.tag { (r.tag) } }
                            }
                        }
                        td { code title=(r.digest) { (short_digest(&r.digest)) } }
                        td { (platforms(&r.platforms)) }
                        td.num { @if let Some(s) = r.size { (bytes(s)) } @else { span.muted { "—" } } }
                        td { (ago(r.fetched, now)) }
                        td { (ago(r.last_pulled, now)) }
                        td { (ago(Some(r.revalidated), now)) }
                        td { @if r.pinned { span.badge { "pinned" } } @else { span.muted { "no" } } }
                    }
                }
            }
        }
    }
}

/// `/ui`: at a glance, then what the cache holds.
pub fn page(o: &Overview, l: &Listing) -> String {
    let now = unix(SystemTime::now());
    let upstreams: Vec<String> = o.upstreams.iter().map(|u| u.name.clone()).collect();
    let tagline = html! {
        "registry mirror · version " (o.version) " · up " span #uptime { (duration(o.uptime_seconds)) }
        " (since " (timestamp(o.started)) ")"
    };
    layout(
        "cachalot",
        tagline,
        html! {
            h1.sr { "cachalot: the mirror at a glance, and what it holds" }
            (glance(o, now))
            (holdings(l, &upstreams))
        },
    )
    .into_string()
}

/// `/ui/image`: one tag, and how to pull it.
pub fn image(d: &ImageDetail) -> String {
    let now = unix(SystemTime::now());
    let r = &d.image;
    let name = format!("{}/{}:{}", r.upstream, r.repository, r.tag);
    layout(
        &format!("{name} · cachalot"),
        html! { "registry mirror" },
        html! {
            p { a href="/ui" { "← all images" } }
            h1 { (name) }
            dl.facts {
                dt { "Digest" } dd { code #digest { (r.digest) } }
                dt { "Media type" } dd { (r.media_type) }
                dt { "Size" } dd { @if let Some(s) = r.size { (bytes(s)) } @else { "—" } }
                dt { "Fetched" } dd { (ago(r.fetched, now)) }
                dt { "Last pulled" } dd { (ago(r.last_pulled, now)) }
                dt { "Last revalidated" } dd { (ago(Some(r.revalidated), now)) }
                dt { "Pinned" } dd { @if r.pinned { "yes: never evicted" } @else { "no" } }
            }
            @if !r.platforms.is_empty() {
                h2 { "Platforms" }
                div.scroll { table {
                    thead { tr { th scope="col" { "Platform" } th scope="col" { "Manifest" } th scope="col" { "Cached" } } }
                    tbody { @for p in &r.platforms {
                        tr {
                            td { (p.platform) }
                            td { @if let Some(d) = &p.digest { code title=(d) { (short_digest(d)) } } @else { "—" } }
                            td { @if p.cached { "yes" } @else { span.muted { "no" } } }
                        }
                    } }
                } }
            }
            h2 { "Pull it through the mirror" }
            @for p in &d.pull {
                section.pull aria-label={ (p.client) ", " (p.mode) } {
                    h3 { (p.client) " " span.muted { "· " (p.mode) } }
                    pre { code.cmd { (p.command) } }
                    @if let Some(s) = &p.setup { p.muted { "Once: " (s) } }
                }
            }
        },
    )
    .into_string()
}

/// `/`: what this server is, and where the page is.
pub fn root() -> String {
    layout(
        "cachalot",
        html! { "registry mirror" },
        html! {
            h1 { "cachalot" }
            p { "A pull-through caching mirror for OCI registries. " a href="/ui" { "Open the page" } ": what it holds, hit ratio, upstream health." }
            p.muted { (PreEscaped("Clients pull through <code>/v2/</code>.")) }
        },
    )
    .into_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(50 * 1024 * 1024 * 1024), "50.0 GiB");
        assert_eq!(percent(Some(0.75)), "75.0%");
        assert_eq!(percent(None), "—");
        assert_eq!(timestamp(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(timestamp(1_798_810_496), "2027-01-01 13:34:56 UTC");
        assert_eq!(timestamp(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(duration(45), "45s");
        assert_eq!(duration(3 * 3600 + 120), "3h 2m");
        assert_eq!(duration(2 * 86_400 + 4 * 3600), "2d 4h");
    }
}
