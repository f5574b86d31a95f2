//! The page with a large cache (issue 15: "renders a page in a few milliseconds with 100,000
//! cached objects"). Builds a cache of 5,000 repositories with 4 tags each: 20,000 image
//! manifests and configs as files, and 100,000 object rows (each image's manifest, config and
//! 3 layers), then times, with criterion:
//! - `list/read_index`: one pass over the tags table, which the page keeps until the table is
//!   written again;
//! - `list/*`: the model's listing over that index (filtered, sorted, then the 50 rows of the
//!   page read further: manifest and config files, object rows), default order, a search,
//!   sorted by last pull (an object row read per matching tag), and the last page;
//! - `overview`: the figures at a glance from the metrics;
//! - `render`: the HTML of a page from the model, and the JSON;
//! - `page`: listing, overview and HTML together, what one `GET /ui` costs past the socket
//!   while the tags table is unchanged (add `list/read_index` for the first after a change).
//!
//! `cargo bench --bench ui` (building the cache takes a few seconds). Without `--bench` (as
//! `cargo test --all-targets` runs it): a smoke run on 100 repositories, each benchmark once.

use cachalot::metrics::Metrics;
use cachalot::oci::Digest;
use cachalot::storage::{FsStore, Store, Usage};
use cachalot::ui::history::Recent;
use cachalot::ui::html;
use cachalot::ui::model::{self, ListQuery, OverviewInputs, TagIndex};
use criterion::Criterion;
use std::collections::HashSet;
use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, SystemTime};

const TAGS_PER_REPO: usize = 4;
const LAYERS: usize = 3;
const IMAGE: &str = "application/vnd.oci.image.manifest.v1+json";

fn write(root: &Path, bytes: &[u8]) -> Digest {
    let d = Digest::sha256_of(bytes);
    let path = FsStore::blob_path_in(root, &d);
    std::fs::create_dir_all(path.parent().expect("fan-out dir")).expect("create blob dir");
    std::fs::write(&path, bytes).expect("write blob");
    d
}

/// `repos` repositories of `TAGS_PER_REPO` tags, each tag its own image.
fn build(root: &Path, repos: usize) -> Store {
    let store = Store::open(root).expect("open the cache");
    let now = SystemTime::now();
    let mut objects = Vec::new();
    let mut tags: Vec<(String, String, Digest, SystemTime)> = Vec::new();
    for r in 0..repos {
        let repo = format!("team{}/app{r}", r % 50);
        for t in 0..TAGS_PER_REPO {
            let tag = format!("1.{t}");
            let key = format!("docker.io/{repo}");
            let config = format!(
                r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers"}},"n":"{repo}:{tag}"}}"#
            );
            let config_d = write(root, config.as_bytes());
            let layers: Vec<(Digest, u64)> = (0..LAYERS)
                .map(|l| {
                    let d = Digest::sha256_of(format!("{repo}:{tag}/{l}").as_bytes());
                    (d, 1_000_000 * (l as u64 + 1))
                })
                .collect();
            let layer_json: Vec<String> = layers
                .iter()
                .map(|(d, size)| {
                    format!(
                        r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{d}","size":{size}}}"#
                    )
                })
                .collect();
            let manifest = format!(
                r#"{{"schemaVersion":2,"mediaType":"{IMAGE}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_d}","size":{}}},"layers":[{}]}}"#,
                config.len(),
                layer_json.join(",")
            );
            let manifest_d = write(root, manifest.as_bytes());
            objects.push((manifest_d.clone(), manifest.len() as u64, key.clone()));
            objects.push((config_d, config.len() as u64, key.clone()));
            for (d, size) in layers {
                objects.push((d, size, key.clone()));
            }
            let checked = now - Duration::from_secs((r * TAGS_PER_REPO + t) as u64 % 86_400);
            tags.push((repo.clone(), tag, manifest_d, checked));
        }
    }
    for batch in objects.chunks(10_000) {
        store.meta().put_objects(batch, now).expect("put_objects");
    }
    let rows: Vec<(&str, &str, &str, &str, &Digest, SystemTime)> = tags
        .iter()
        .map(|(r, t, d, c)| ("docker.io", r.as_str(), t.as_str(), IMAGE, d, *c))
        .collect();
    store.meta().put_tags(&rows).expect("put_tags");
    store
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let repos = if full { 5_000 } else { 100 };
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("cache");
    let t = std::time::Instant::now();
    let store = build(&root, repos);
    let (bytes, count) = store.meta().totals().expect("totals");
    println!(
        "ui bench: {} mode, {repos} repositories, {} tags, {count} objects ({bytes} bytes declared), built in {:.1}s",
        if full { "full" } else { "smoke" },
        repos * TAGS_PER_REPO,
        t.elapsed().as_secs_f64()
    );
    let pinned = HashSet::new();
    let everyone = |_: &str, _: &str| true;
    // What `/ui` does while the tags table is unchanged: the index read once, kept.
    let index = TagIndex::read(&store).expect("index");
    let list = |q: &str| {
        model::list_in(
            &index,
            &store,
            &root,
            &pinned,
            &ListQuery::parse(Some(q)),
            &everyone,
        )
        .expect("list")
    };
    // Each query lists what it says; a bench of an empty answer would mislead.
    assert_eq!(list("").rows.len(), 50);
    assert_eq!(list("").total, repos * TAGS_PER_REPO);
    assert_eq!(list("q=app42/").total, 0);
    assert_eq!(list("q=app42:1.3").total, 1);
    assert!(list("q=app4").total >= 4);
    let last = list("").pages.to_string();
    assert!(!list(&format!("page={last}")).rows.is_empty());

    let metrics = Metrics::new(&["docker.io"]);
    let overview = || {
        model::overview(
            &metrics,
            OverviewInputs {
                started: SystemTime::now() - Duration::from_secs(3600),
                now: SystemTime::now(),
                recent: Recent {
                    manifest: Some(0.9),
                    blob: Some(0.95),
                    span: Duration::from_secs(300),
                },
                upstreams: &[("docker.io".to_owned(), true)],
                fills: Vec::new(),
                usage: Usage {
                    bytes,
                    objects: count,
                },
                max_size: 50 << 30,
            },
            &everyone,
        )
    };

    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20)
        .nresamples(20_000)
        .configure_from_args();
    {
        let mut g = c.benchmark_group("list");
        // Paid by the first page after each write to the tags table.
        g.bench_function("read_index", |b| {
            b.iter(|| TagIndex::read(black_box(&store)).expect("index"))
        });
        g.bench_function("name_page1", |b| b.iter(|| list(black_box(""))));
        g.bench_function("search", |b| b.iter(|| list(black_box("q=app4"))));
        g.bench_function("sort_pulled", |b| b.iter(|| list(black_box("sort=pulled"))));
        let q = format!("page={last}");
        g.bench_function("last_page", |b| b.iter(|| list(black_box(&q))));
        g.finish();
    }
    c.bench_function("overview", |b| b.iter(overview));
    {
        let (o, l) = (overview(), list(""));
        let mut g = c.benchmark_group("render");
        g.bench_function("html", |b| {
            b.iter(|| html::page(black_box(&o), black_box(&l)))
        });
        g.bench_function("json", |b| {
            b.iter(|| serde_json::to_vec(black_box(&l)).expect("json"))
        });
        g.finish();
    }
    c.bench_function("page", |b| {
        b.iter(|| html::page(&overview(), &list(black_box(""))))
    });
    c.final_summary();
}
