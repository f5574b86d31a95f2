//! Criterion benchmarks for the pure parts every request goes through: routing a path and
//! resolving its upstream, SHA-256 verification throughput (cachalot's `Verifier` beside the
//! `sha2` crate), and manifest `Accept` negotiation. `cargo bench --bench hot_paths`; under
//! `cargo test` each benchmark runs once, to prove it works.
//!
//! Measurement times are short so that the whole run stays under a minute on a 2-core box;
//! pass criterion's own flags (`--measurement-time`, `--sample-size`) for steadier figures.

use cachalot::config::Config;
use cachalot::http::route::{Route, route};
use cachalot::metrics::Metrics;
use cachalot::mirror::Mirror;
use cachalot::oci::manifest::{
    self, Accept, DOCKER_LIST, DOCKER_MANIFEST, DOCKER_V1, DOCKER_V1_SIGNED, OCI_INDEX,
    OCI_MANIFEST,
};
use cachalot::oci::{Algorithm, Digest, Verifier};
use cachalot::storage::Store;
use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use http::Method;
use sha2::Digest as _;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

/// A digest as clients write it: `sha256:` and 64 lowercase hex digits.
fn digest_of(seed: &str) -> String {
    Digest::sha256_of(seed.as_bytes()).to_string()
}

// === routing ===

fn routing(c: &mut Criterion) {
    let blob = digest_of("layer");
    let manifest = digest_of("manifest");
    let paths = [
        ("base", "/v2/".to_owned()),
        (
            "manifest_by_tag",
            "/v2/library/nginx/manifests/latest".to_owned(),
        ),
        (
            "manifest_by_digest",
            format!("/v2/library/nginx/manifests/{manifest}"),
        ),
        ("blob", format!("/v2/library/nginx/blobs/{blob}")),
        (
            "blob_prefixed_upstream",
            format!("/v2/ghcr.io/org/app/blobs/{blob}"),
        ),
        ("tags_list", "/v2/library/nginx/tags/list".to_owned()),
        (
            "referrers",
            format!("/v2/ghcr.io/org/app/referrers/{manifest}"),
        ),
        ("not_found", "/v2/library/nginx/unknown/thing".to_owned()),
    ];
    // Each input routes as its name says; a bench of the wrong branch would mislead.
    assert_eq!(route(&Method::GET, &paths[0].1), Route::Base);
    assert_eq!(route(&Method::GET, &paths[7].1), Route::NotFound);
    assert_eq!(route(&Method::GET, &paths[4].1).label().as_str(), "blob");

    let mut g = c.benchmark_group("route");
    for (name, path) in &paths {
        g.bench_with_input(BenchmarkId::from_parameter(name), path, |b, path| {
            b.iter(|| route(black_box(&Method::GET), black_box(path)))
        });
    }
    // The handler's next step for a blob or a manifest by digest.
    g.bench_function("parse_digest", |b| {
        b.iter(|| black_box(&blob).parse::<Digest>())
    });
    g.finish();
}

/// The upstream step after routing: `Mirror::route` picks the upstream by `?ns=`, by a first
/// path component naming one, or the default, and adds docker.io's `library/`.
fn resolve(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let toml = format!(
        r#"
[server]
listen = "127.0.0.1:0"

[cache]
dir = {dir:?}
max_size = "1GiB"
memory = "64MiB"

[[upstream]]
name = "docker.io"
url = "https://registry-1.docker.io"
default = true

[[upstream]]
name = "ghcr.io"
url = "https://ghcr.io"

[[upstream]]
name = "quay.io"
url = "https://quay.io"

[[upstream]]
name = "registry.k8s.io"
url = "https://registry.k8s.io"
"#,
        dir = dir.path().to_str().expect("utf-8 temp path"),
    );
    let config = Config::from_toml_str(&toml).expect("bench config");
    let store = Store::open(dir.path()).expect("open store");
    let names: Vec<&str> = config.upstream.iter().map(|u| u.name.as_str()).collect();
    let metrics = Arc::new(Metrics::new(&names));
    let mirror = Mirror::new(&config, Arc::new(store), metrics).expect("mirror");

    let cases: [(&str, &str, Option<&str>); 5] = [
        ("default_library", "nginx", None),
        ("default_two_components", "bitnami/redis", None),
        ("prefixed", "ghcr.io/org/app", None),
        (
            "prefixed_deep",
            "registry.k8s.io/sig-storage/csi-provisioner",
            None,
        ),
        ("ns_query", "org/app", Some("ghcr.io")),
    ];
    for (_, name, ns) in &cases {
        mirror.route(name, *ns).expect("each case resolves");
    }
    assert_eq!(
        mirror.route("nginx", None).expect("resolves").repo.as_str(),
        "library/nginx"
    );

    let mut g = c.benchmark_group("resolve");
    for (id, name, ns) in cases {
        g.bench_function(id, |b| {
            b.iter(|| mirror.route(black_box(name), black_box(ns)))
        });
    }
    g.finish();
}

// === digest verification ===

/// Hashed in chunks of this size, the size of the chunks a fill hands to its `Verifier`.
const CHUNK: usize = 1 << 20;

fn digests(c: &mut Criterion) {
    let mut g = c.benchmark_group("sha256");
    // One pass over 16 MiB takes 0.1-0.3 s here: flat sampling, ten samples, and time enough
    // for ten passes of the slower implementation on a loaded machine.
    g.sampling_mode(SamplingMode::Flat).sample_size(10);
    for mib in [1usize, 16] {
        g.measurement_time(Duration::from_millis(if mib == 16 { 3000 } else { 700 }));
        let data: Vec<u8> = (0..mib << 20)
            .map(|i: usize| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let ring = || {
            let mut v = Verifier::new(Algorithm::Sha256);
            for chunk in data.chunks(CHUNK) {
                v.update(chunk);
            }
            v.finish()
        };
        let sha2 = || {
            let mut h = sha2::Sha256::new();
            for chunk in data.chunks(CHUNK) {
                h.update(chunk);
            }
            h.finalize()
        };
        assert_eq!(
            ring().hex(),
            hex::encode(sha2()),
            "the two implementations disagree"
        );
        let size = format!("{mib}MiB");
        g.throughput(Throughput::Bytes(data.len() as u64));
        g.bench_function(BenchmarkId::new("verifier_ring", &size), |b| {
            b.iter(|| black_box(ring()))
        });
        g.bench_function(BenchmarkId::new("sha2_crate", &size), |b| {
            b.iter(|| black_box(sha2()))
        });
    }
    g.finish();
}

// === manifest Accept negotiation ===

/// `Accept` header lines as clients send them (PROTOCOL.md 1.9). One entry per header line.
fn client_accepts() -> Vec<(&'static str, Vec<String>)> {
    vec![
        // Docker's distribution client: one line per type.
        (
            "docker",
            [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST]
                .map(str::to_owned)
                .to_vec(),
        ),
        // containerd resolving a tag.
        (
            "containerd_resolve",
            vec![format!(
                "{DOCKER_MANIFEST}, {DOCKER_LIST}, {OCI_MANIFEST}, {OCI_INDEX}, */*"
            )],
        ),
        // containerd fetching by digest: the descriptor's type, then anything.
        ("containerd_fetch", vec![format!("{OCI_INDEX}, */*")]),
        // podman/skopeo (containers/image DefaultRequestedManifestMIMETypes), one line each.
        (
            "podman_skopeo",
            [
                OCI_MANIFEST,
                DOCKER_MANIFEST,
                DOCKER_V1_SIGNED,
                DOCKER_V1,
                DOCKER_LIST,
                OCI_INDEX,
            ]
            .map(str::to_owned)
            .to_vec(),
        ),
        ("wildcard", vec!["*/*".to_owned()]),
        ("empty", Vec::new()),
    ]
}

fn accept(c: &mut Criterion) {
    let clients = client_accepts();

    let mut g = c.benchmark_group("accept_parse");
    for (id, lines) in &clients {
        g.bench_with_input(BenchmarkId::from_parameter(id), lines, |b, lines| {
            b.iter(|| Accept::parse(black_box(lines).iter().map(String::as_str)))
        });
    }
    g.finish();

    // A cached tag entry is served when its stored media type is acceptable. An OCI index is
    // the common case (multi-arch images); schema 1 is the miss that scans the whole list.
    // (No `Accept` at all short-circuits like `*/*`: only the wildcard case is kept.)
    let mut g = c.benchmark_group("accept_allows");
    for (id, lines) in clients.iter().filter(|(id, _)| *id != "empty") {
        let a = Accept::parse(lines.iter().map(String::as_str));
        for (stored, media_type) in [("oci_index", OCI_INDEX), ("schema1", DOCKER_V1_SIGNED)] {
            g.bench_function(BenchmarkId::new(*id, stored), |b| {
                b.iter(|| black_box(&a).allows(black_box(media_type)))
            });
        }
    }
    g.finish();

    let index = oci_index();
    let image = image_manifest();
    let list = docker_list();
    assert_eq!(
        manifest::sniff_media_type(&index).as_deref(),
        Some(OCI_INDEX)
    );
    assert_eq!(
        manifest::sniff_media_type(&image).as_deref(),
        Some(OCI_MANIFEST)
    );
    assert_eq!(
        manifest::sniff_media_type(&list).as_deref(),
        Some(DOCKER_LIST)
    );
    let mut g = c.benchmark_group("sniff_media_type");
    for (id, body) in [
        ("oci_index_16_entries", &index),
        ("oci_manifest_no_media_type", &image),
        ("docker_list_8_entries", &list),
    ] {
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(id), body, |b, body| {
            b.iter(|| manifest::sniff_media_type(black_box(body)))
        });
    }
    g.finish();
}

const PLATFORMS: [(&str, &str, Option<&str>); 8] = [
    ("linux", "amd64", None),
    ("linux", "arm", Some("v5")),
    ("linux", "arm", Some("v7")),
    ("linux", "arm64", Some("v8")),
    ("linux", "386", None),
    ("linux", "mips64le", None),
    ("linux", "ppc64le", None),
    ("linux", "s390x", None),
];

fn platform_json(os: &str, arch: &str, variant: Option<&str>) -> String {
    match variant {
        Some(v) => format!(r#"{{"architecture":"{arch}","os":"{os}","variant":"{v}"}}"#),
        None => format!(r#"{{"architecture":"{arch}","os":"{os}"}}"#),
    }
}

/// A multi-arch index shaped like Docker Hub's official images: one image per platform and
/// one attestation manifest per image.
fn oci_index() -> Vec<u8> {
    let mut entries = Vec::new();
    for (os, arch, variant) in PLATFORMS {
        let image = digest_of(&format!("{arch}{variant:?}"));
        entries.push(format!(
            r#"{{"annotations":{{"com.docker.official-images.bashbrew.arch":"{arch}","org.opencontainers.image.base.name":"debian:bookworm-slim","org.opencontainers.image.created":"2025-10-07T18:47:43Z","org.opencontainers.image.version":"1.29.2"}},"digest":"{image}","mediaType":"{OCI_MANIFEST}","platform":{},"size":2290}}"#,
            platform_json(os, arch, variant)
        ));
        entries.push(format!(
            r#"{{"annotations":{{"vnd.docker.reference.digest":"{image}","vnd.docker.reference.type":"attestation-manifest"}},"digest":"{}","mediaType":"{OCI_MANIFEST}","platform":{{"architecture":"unknown","os":"unknown"}},"size":841}}"#,
            digest_of(&format!("att{arch}{variant:?}"))
        ));
    }
    format!(
        r#"{{"manifests":[{}],"mediaType":"{OCI_INDEX}","schemaVersion":2}}"#,
        entries.join(",")
    )
    .into_bytes()
}

/// An OCI image manifest without `mediaType` (it is optional), so sniffing goes by shape.
fn image_manifest() -> Vec<u8> {
    let layers: Vec<String> = [29_128_463u64, 41_871_200, 628, 955, 405, 1_208, 1_400]
        .iter()
        .enumerate()
        .map(|(i, size)| {
            format!(
                r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":{size}}}"#,
                digest_of(&format!("layer{i}"))
            )
        })
        .collect();
    format!(
        r#"{{
  "schemaVersion": 2,
  "config": {{
    "mediaType": "application/vnd.oci.image.config.v1+json",
    "digest": "{}",
    "size": 8589
  }},
  "layers": [
    {}
  ],
  "annotations": {{"org.opencontainers.image.created": "2025-10-07T18:47:43Z"}}
}}"#,
        digest_of("config"),
        layers.join(",\n    ")
    )
    .into_bytes()
}

/// A Docker manifest list (schema 2), as older multi-arch images still are.
fn docker_list() -> Vec<u8> {
    let entries: Vec<String> = PLATFORMS
        .iter()
        .map(|(os, arch, variant)| {
            format!(
                r#"{{"mediaType":"{DOCKER_MANIFEST}","size":1573,"digest":"{}","platform":{}}}"#,
                digest_of(&format!("list{arch}{variant:?}")),
                platform_json(os, arch, *variant)
            )
        })
        .collect();
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{DOCKER_LIST}","manifests":[{}]}}"#,
        entries.join(",")
    )
    .into_bytes()
}

// === repository links ===

/// The lookup every cached blob request now makes before it is served (is this repository
/// known to hold the blob?): a link read before, answered from memory; and one not there, which
/// is a redb read transaction each time (that path then asks the upstream anyway).
fn links(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let meta = cachalot::storage::Meta::open(&dir.path().join("meta.redb")).expect("meta");
    let linked = Digest::sha256_of(b"layer");
    let other = Digest::sha256_of(b"other layer");
    // A table of realistic size: many repositories, many blobs each.
    for r in 0..200 {
        for l in 0..20 {
            let d = Digest::sha256_of(format!("{r}/{l}").as_bytes());
            let repo = format!("team/app{r}");
            meta.put_link(
                "docker.io",
                &repo,
                &d,
                cachalot::storage::meta::LinkSource::Fetched,
            )
            .expect("link");
        }
    }
    meta.put_link(
        "docker.io",
        "library/nginx",
        &linked,
        cachalot::storage::meta::LinkSource::Fetched,
    )
    .expect("link");
    assert!(meta.linked("docker.io", "library/nginx", &linked).unwrap());
    assert!(!meta.linked("docker.io", "library/nginx", &other).unwrap());
    let mut g = c.benchmark_group("links");
    g.bench_function("linked_remembered", |b| {
        b.iter(|| meta.linked("docker.io", black_box("library/nginx"), black_box(&linked)))
    });
    g.bench_function("unlinked_redb_read", |b| {
        b.iter(|| meta.linked("docker.io", black_box("library/nginx"), black_box(&other)))
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(700))
        .sample_size(30)
        // Fewer resamples than the default 100,000: the analysis would otherwise cost about as
        // much as the measurement on this small machine.
        .nresamples(20_000)
}

criterion_group! {
    name = hot_paths;
    config = config();
    targets = routing, resolve, digests, accept, links
}
criterion_main!(hot_paths);
