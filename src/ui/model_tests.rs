//! The page's model against a real store in a temp directory.

use super::*;
use crate::oci::digest::Algorithm;
use crate::oci::{ImageRef, Verifier};
use crate::storage::put_small;
use std::time::Duration;

const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const IMAGE: &str = "application/vnd.oci.image.manifest.v1+json";

struct Cache {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    store: Store,
}

fn cache() -> Cache {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    let store = Store::open(&root).unwrap();
    Cache {
        _dir: dir,
        root,
        store,
    }
}

impl Cache {
    fn put(&self, bytes: &[u8], repo: &str) -> Digest {
        let mut v = Verifier::new(Algorithm::Sha256);
        v.update(bytes);
        let proof = v.prove();
        let d = proof.digest().clone();
        put_small(&**self.store.blobs(), bytes, proof, repo).unwrap();
        d
    }

    /// A single-platform image (config and one layer of `layer` bytes declared) tagged `tag`,
    /// confirmed at `checked` seconds after the epoch.
    fn image(&self, upstream: &str, repo: &str, tag: &str, layer: u64, checked: u64) -> Digest {
        let key = format!("{upstream}/{repo}");
        let config = self.put(
            format!(r#"{{"os":"linux","architecture":"arm64","variant":"v8","n":"{key}:{tag}"}}"#)
                .as_bytes(),
            &key,
        );
        let config_len = self.store.blobs().stat(&config).unwrap().unwrap();
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"{IMAGE}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":{config_len}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:{}","size":{layer}}}]}}"#,
            "ab".repeat(32)
        );
        let d = self.put(manifest.as_bytes(), &key);
        self.tag(upstream, repo, tag, &d, IMAGE, checked);
        d
    }

    fn tag(&self, upstream: &str, repo: &str, tag: &str, d: &Digest, mt: &str, checked: u64) {
        self.store
            .meta()
            .put_manifest(
                d,
                mt,
                Some((
                    upstream,
                    repo,
                    tag,
                    UNIX_EPOCH + Duration::from_secs(checked),
                )),
            )
            .unwrap();
    }

    fn list(&self, query: &str, may_pull: MayPull<'_>) -> Listing {
        list(
            &self.store,
            &self.root,
            &HashSet::new(),
            &ListQuery::parse(Some(query)),
            may_pull,
        )
        .unwrap()
    }
}

fn everyone(_: &str, _: &str) -> bool {
    true
}

fn names(l: &Listing) -> Vec<String> {
    l.rows
        .iter()
        .map(|r| format!("{}/{}:{}", r.upstream, r.repository, r.tag))
        .collect()
}

#[test]
fn lists_every_tag_by_name_with_what_the_manifest_says() {
    let c = cache();
    c.image("ghcr.io", "org/app", "v1", 1000, 10);
    let nginx = c.image("docker.io", "library/nginx", "1.27", 5000, 20);
    c.image("docker.io", "library/nginx", "latest", 7000, 30);
    let l = c.list("", &everyone);
    assert_eq!(
        names(&l),
        [
            "docker.io/library/nginx:1.27",
            "docker.io/library/nginx:latest",
            "ghcr.io/org/app:v1"
        ]
    );
    assert_eq!(l.total, 3);
    assert_eq!(l.pages, 1);
    let row = &l.rows[0];
    assert_eq!(row.digest, nginx.to_string());
    assert_eq!(row.platforms.len(), 1);
    assert_eq!(row.platforms[0].platform, "linux/arm64/v8");
    let manifest_len = c.store.blobs().stat(&nginx).unwrap().unwrap();
    let config_len = row.size.unwrap() - manifest_len - 5000;
    assert!(config_len > 50 && config_len < 200, "{row:?}");
    assert_eq!(row.revalidated, 20);
    assert!(row.fetched.is_some_and(|t| t > 1_700_000_000), "{row:?}");
    assert!(row.last_pulled.is_some());
    assert!(!row.pinned);
    assert_eq!(
        l.holdings,
        [
            Holding {
                upstream: "docker.io".into(),
                repositories: 1,
                tags: 2
            },
            Holding {
                upstream: "ghcr.io".into(),
                repositories: 1,
                tags: 1
            }
        ]
    );
}

#[test]
fn an_index_lists_its_platforms_and_counts_the_cached_ones() {
    let c = cache();
    let arm = c.image("docker.io", "library/redis", "arm-only", 3000, 1);
    let amd = format!("sha256:{}", "cd".repeat(32));
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"{INDEX}","manifests":[
            {{"mediaType":"{IMAGE}","digest":"{arm}","size":400,"platform":{{"os":"linux","architecture":"arm64"}}}},
            {{"mediaType":"{IMAGE}","digest":"{amd}","size":400,"platform":{{"os":"linux","architecture":"amd64"}}}},
            {{"mediaType":"{IMAGE}","digest":"{amd}","size":400,"platform":{{"os":"unknown","architecture":"unknown"}}}}]}}"#
    );
    let d = c.put(index.as_bytes(), "docker.io/library/redis");
    c.tag("docker.io", "library/redis", "7", &d, INDEX, 5);
    let l = c.list("q=redis:7", &everyone);
    assert_eq!(names(&l), ["docker.io/library/redis:7"]);
    let row = &l.rows[0];
    assert_eq!(
        row.platforms,
        [
            PlatformRow {
                platform: "linux/arm64".into(),
                digest: Some(arm.to_string()),
                cached: true
            },
            PlatformRow {
                platform: "linux/amd64".into(),
                digest: Some(amd),
                cached: false
            }
        ]
    );
    // The index, the arm64 manifest as declared, and its config and layer.
    let size = row.size.unwrap();
    assert!(size > index.len() as u64 + 400 + 3000, "{size}");
    assert!(size < index.len() as u64 + 400 + 3000 + 200, "{size}");
}

#[test]
fn search_matches_repository_or_tag_ignoring_case() {
    let c = cache();
    c.image("docker.io", "library/nginx", "1.27-alpine", 1, 1);
    c.image("docker.io", "library/alpine", "3.20", 1, 1);
    c.image("ghcr.io", "org/tool", "v2", 1, 1);
    assert_eq!(
        names(&c.list("q=ALPINE", &everyone)),
        [
            "docker.io/library/alpine:3.20",
            "docker.io/library/nginx:1.27-alpine"
        ]
    );
    assert_eq!(
        names(&c.list("q=ghcr.io/org/tool:v2", &everyone)),
        ["ghcr.io/org/tool:v2"]
    );
    assert_eq!(
        names(&c.list("upstream=ghcr.io", &everyone)),
        ["ghcr.io/org/tool:v2"]
    );
    let none = c.list("q=postgres", &everyone);
    assert_eq!((none.total, none.rows.len(), none.pages), (0, 0, 1));
    // The search narrows the rows, never what the caller is told the cache holds.
    assert_eq!(none.holdings.len(), 2);
}

#[test]
fn sorts_by_last_pull_and_by_revalidation() {
    let c = cache();
    let a = c.image("docker.io", "library/a", "1", 1, 300);
    let b = c.image("docker.io", "library/b", "1", 1, 100);
    c.image("docker.io", "library/c", "1", 1, 200);
    assert_eq!(
        names(&c.list("sort=revalidated", &everyone)),
        [
            "docker.io/library/a:1",
            "docker.io/library/c:1",
            "docker.io/library/b:1"
        ]
    );
    // b pulled last, then a; c's read time stays where its commit put it, before both.
    let now = SystemTime::now();
    c.store
        .meta()
        .touch_objects(&[
            (a, now + Duration::from_secs(60)),
            (b, now + Duration::from_secs(120)),
        ])
        .unwrap();
    assert_eq!(
        names(&c.list("sort=pulled", &everyone)),
        [
            "docker.io/library/b:1",
            "docker.io/library/a:1",
            "docker.io/library/c:1"
        ]
    );
    // An unknown sort is the default one, by name (neither of the others' orders).
    assert_eq!(
        names(&c.list("sort=nonsense", &everyone)),
        [
            "docker.io/library/a:1",
            "docker.io/library/b:1",
            "docker.io/library/c:1"
        ]
    );
}

#[test]
fn pages_through_many_tags() {
    let c = cache();
    for i in 0..7 {
        c.image("docker.io", &format!("library/r{i}"), "t", 1, 1);
    }
    let p2 = c.list("per_page=3&page=2", &everyone);
    assert_eq!((p2.total, p2.pages), (7, 3));
    assert_eq!(
        names(&p2),
        [
            "docker.io/library/r3:t",
            "docker.io/library/r4:t",
            "docker.io/library/r5:t"
        ]
    );
    assert_eq!(names(&c.list("per_page=3&page=3", &everyone)).len(), 1);
    // A page past the end is the last page, so its links lead somewhere.
    let past = c.list("per_page=3&page=99", &everyone);
    assert_eq!(
        (past.query.page, names(&past)),
        (3, vec!["docker.io/library/r6:t".to_owned()])
    );
    // Nonsense falls back to the defaults rather than failing.
    let q = ListQuery::parse(Some("page=-1&per_page=0&q=%ff"));
    assert_eq!((q.page, q.per_page), (1, 1));
    let q = ListQuery::parse(Some("per_page=100000"));
    assert_eq!(q.per_page, MAX_PER_PAGE);
    assert_eq!(
        ListQuery::parse(Some("q=a b&sort=pulled&page=2")).link(3, Sort::Name),
        "q=a+b&page=3"
    );
}

#[test]
fn a_caller_sees_only_what_it_may_pull() {
    let c = cache();
    c.image("docker.io", "library/nginx", "1", 1, 1);
    c.image("ghcr.io", "secret/app", "v1", 1, 1);
    c.image("ghcr.io", "secret/app", "v2", 1, 1);
    c.image("ghcr.io", "public/app", "v1", 1, 1);
    let public = |_: &str, r: &str| !r.starts_with("secret/");
    let l = c.list("", &public);
    assert_eq!(
        names(&l),
        ["docker.io/library/nginx:1", "ghcr.io/public/app:v1"]
    );
    assert_eq!(l.total, 2);
    assert_eq!(l.holdings[1].repositories, 1);
    assert_eq!(l.holdings[1].tags, 1);
    // Searching for it finds nothing, and says nothing of it.
    let found = c.list("q=secret", &public);
    assert_eq!(found.total, 0);
    let json = serde_json::to_string(&found).unwrap();
    assert!(!json.contains("secret/app"), "{json}");
    // Asked for by name, it does not exist.
    assert!(
        image(
            &c.store,
            &c.root,
            &HashSet::new(),
            ("ghcr.io", "secret/app", "v1"),
            &public
        )
        .unwrap()
        .is_none()
    );
    // Nobody: nothing at all.
    let nobody = c.list("", &|_: &str, _: &str| false);
    assert_eq!((nobody.total, nobody.holdings.len()), (0, 0));
}

#[test]
fn pinned_tags_are_marked() {
    let c = cache();
    c.image("docker.io", "library/nginx", "1", 1, 1);
    c.image("docker.io", "library/redis", "7", 1, 1);
    let pins = [ImageRef::parse("docker.io/library/redis:7").unwrap()];
    let pinned = evict::pinned_digests(&c.store, &pins).unwrap();
    let l = list(&c.store, &c.root, &pinned, &ListQuery::default(), &everyone).unwrap();
    let marks: Vec<bool> = l.rows.iter().map(|r| r.pinned).collect();
    assert_eq!(marks, [false, true]);
}

#[test]
fn one_image_by_name() {
    let c = cache();
    let d = c.image("ghcr.io", "org/app", "v1", 1, 1);
    let row = image(
        &c.store,
        &c.root,
        &HashSet::new(),
        ("ghcr.io", "org/app", "v1"),
        &everyone,
    )
    .unwrap()
    .unwrap();
    assert_eq!(row.digest, d.to_string());
    assert!(
        image(
            &c.store,
            &c.root,
            &HashSet::new(),
            ("ghcr.io", "org/app", "v9"),
            &everyone
        )
        .unwrap()
        .is_none()
    );
}

#[test]
fn pull_commands_per_routing_mode() {
    let reach = Reach {
        authority: "mirror:5000",
        tls: false,
        default_upstream: Some("docker.io"),
    };
    let hub = pull_commands(&reach, "docker.io", "library/nginx", "1.27");
    let cmds: Vec<&str> = hub.iter().map(|p| p.command.as_str()).collect();
    assert_eq!(
        cmds,
        [
            "docker pull nginx:1.27",
            "docker pull mirror:5000/nginx:1.27",
            "docker pull mirror:5000/docker.io/library/nginx:1.27",
            "ctr images pull --hosts-dir /etc/containerd/certs.d docker.io/library/nginx:1.27",
            "crictl pull docker.io/library/nginx:1.27",
            "podman pull --tls-verify=false mirror:5000/docker.io/library/nginx:1.27",
        ]
    );
    assert!(
        hub[0]
            .setup
            .as_deref()
            .unwrap()
            .contains("http://mirror:5000")
    );
    // Not the default upstream: no registry-mirrors, no unprefixed name.
    let tls = Reach { tls: true, ..reach };
    let ghcr = pull_commands(&tls, "ghcr.io", "org/app", "v1");
    let cmds: Vec<&str> = ghcr.iter().map(|p| p.command.as_str()).collect();
    assert_eq!(
        cmds,
        [
            "docker pull mirror:5000/ghcr.io/org/app:v1",
            "ctr images pull --hosts-dir /etc/containerd/certs.d ghcr.io/org/app:v1",
            "crictl pull ghcr.io/org/app:v1",
            "podman pull mirror:5000/ghcr.io/org/app:v1",
        ]
    );
    assert_eq!(ghcr[0].setup, None);
}

#[test]
fn the_overview_reads_the_metrics_and_hides_others_fills() {
    let m = Metrics::new(&["docker.io", "ghcr.io"]);
    for _ in 0..3 {
        m.lookup(Kind::Blob, Lookup::Hit);
    }
    m.lookup(Kind::Blob, Lookup::Miss);
    m.served(Source::Cache, 3000);
    m.served(Source::Fill, 1000);
    m.upstream_bytes
        .with_label_values(&["docker.io"])
        .inc_by(1000);
    m.upstream_request("docker.io", "blob", Some(200));
    m.upstream_request("ghcr.io", "blob", Some(503));
    let mut h = http::HeaderMap::new();
    h.insert("ratelimit-remaining", "76;w=21600".parse().unwrap());
    h.insert("ratelimit-limit", "100;w=21600".parse().unwrap());
    m.rate_limit_headers("docker.io", &h);
    let fill = |owner: &str| FillView {
        digest: Digest::sha256_of(owner.as_bytes()),
        owner: owner.into(),
        written: 10,
        len: Some(100),
    };
    let now = SystemTime::now();
    let o = overview(
        &m,
        OverviewInputs {
            started: now - Duration::from_secs(90),
            now,
            recent: history::Recent {
                manifest: None,
                blob: Some(0.5),
                span: Duration::from_secs(90),
            },
            upstreams: &[("docker.io".into(), true), ("ghcr.io".into(), false)],
            fills: vec![fill("docker.io/library/nginx"), fill("ghcr.io/secret/app")],
            usage: crate::storage::Usage {
                bytes: 500,
                objects: 4,
            },
            max_size: 1000,
        },
        &|_: &str, r: &str| !r.starts_with("secret/"),
    );
    assert_eq!(o.uptime_seconds, 90);
    assert_eq!(o.hit_ratio.blob.since_start, Some(0.75));
    assert_eq!(o.hit_ratio.blob.recent, Some(0.5));
    assert_eq!(o.hit_ratio.manifest.since_start, None);
    assert_eq!(o.bytes.saved, 3000);
    assert_eq!(o.fills.len(), 1);
    assert_eq!(o.fills[0].repository, "library/nginx");
    let hub = &o.upstreams[0];
    assert!(hub.default && hub.last_success.is_some() && hub.last_error.is_none());
    assert_eq!(
        (hub.ratelimit_remaining, hub.ratelimit_limit),
        (Some(76), Some(100))
    );
    let ghcr = &o.upstreams[1];
    assert!(ghcr.last_success.is_none() && ghcr.last_error.is_some());
    // Asking did not create the gauges it found absent: they still read as "never".
    assert_eq!(ghcr.ratelimit_remaining, None);
    let text = String::from_utf8(m.render()).unwrap();
    assert!(!text.contains("cachalot_upstream_ratelimit_remaining{upstream=\"ghcr.io\"}"));
    assert_eq!(o.cache.low_watermark, 900);
}

proptest::proptest! {
    /// Whatever the query string, a listing query comes out within bounds, and the links the
    /// page writes for other pages and orders read back as the same search.
    #[test]
    fn queries_parse_within_bounds_and_links_read_back(
        raw in "[a-z_=&%0-9+./:-]{0,80}",
        page in 1usize..1000,
        sort in 0usize..3,
    ) {
        let q = ListQuery::parse(Some(&raw));
        proptest::prop_assert!(q.page >= 1);
        proptest::prop_assert!((1..=MAX_PER_PAGE).contains(&q.per_page));
        proptest::prop_assert!(q.q.chars().count() <= MAX_QUERY);
        let sort = Sort::ALL[sort];
        let back = ListQuery::parse(Some(&q.link(page, sort)));
        proptest::prop_assert_eq!(back, ListQuery { page, sort, ..q });
    }
}

/// A tag asked for with different Accept headers keeps a row per answer in the tags table (an
/// index, and the amd64 manifest an older client got): the page lists the tag once, with what
/// upstream confirmed last.
#[test]
fn a_tag_with_two_media_types_is_one_row() {
    let c = cache();
    let old = c.image("docker.io", "library/a", "1", 1, 100);
    let newer = c.image("docker.io", "library/x", "1", 2, 100);
    c.tag("docker.io", "library/a", "1", &newer, INDEX, 200);
    let l = c.list("", &everyone);
    assert_eq!(
        names(&l),
        ["docker.io/library/a:1", "docker.io/library/x:1"]
    );
    assert_eq!(l.total, 2);
    assert_eq!(l.rows[0].digest, newer.to_string());
    assert_ne!(l.rows[0].digest, old.to_string());
}
