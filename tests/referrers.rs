//! `GET /v2/<name>/referrers/<digest>` whatever the upstream supports: an empty index rather
//! than a 404, the fallback tag where the upstream has no referrers API, the `artifactType`
//! filter applied here, the upstream's `Link` rewritten to the client's name and routing,
//! answers kept and served stale (with a `Warning`) when the upstream fails, and answers built
//! from the cached or imported manifests when it cannot be reached or the mirror is offline.

mod common;

use common::*;
use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant};

const SIG: &str = "application/vnd.example.sig";
const SBOM: &str = "application/vnd.example.sbom";

/// The digests an index lists, sorted.
fn digests(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v["manifests"]
        .as_array()
        .unwrap_or_else(|| panic!("not an index: {v}"))
        .iter()
        .map(|m| m["digest"].as_str().unwrap().to_owned())
        .collect();
    out.sort();
    out
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// What a pusher without the referrers API maintains: an index of `referrers` tagged
/// `sha256-<hex of subject>`.
fn push_fallback_tag(fake: &FakeRegistry, repo: &str, subject: &Manifest, referrers: &[&Manifest]) {
    let entries: Vec<Value> = referrers
        .iter()
        .map(|m| {
            let v: Value = serde_json::from_slice(&m.bytes).unwrap();
            json!({"mediaType": m.media_type, "digest": m.digest, "size": m.bytes.len(),
                "artifactType": v["artifactType"], "annotations": v["annotations"]})
        })
        .collect();
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries});
    let m = Manifest::new(OCI_INDEX, serde_json::to_vec(&index).unwrap());
    fake.push_manifest(repo, &m);
    fake.set_tag(repo, &fallback_tag(subject), &m.digest);
}

fn fallback_tag(subject: &Manifest) -> String {
    subject.digest.replace(':', "-")
}

fn refs_path(repo: &str, subject: &Manifest) -> String {
    format!("{repo}/referrers/{}", subject.digest)
}

#[tokio::test]
async fn a_subject_without_referrers_is_an_empty_index_with_or_without_the_api() {
    let env = Env::start().await;
    let img = env.fake.push_image("org/app", Some("v1"), &[10]);
    for api in [ReferrersApi::Full, ReferrersApi::Missing] {
        env.fake.set_referrers_api(api);
        let other = env.fake.push_image("org/app", None, &[10]);
        let r = env
            .client
            .get(&env.v2(&refs_path("org/app", &other.manifest)))
            .await;
        assert_eq!(r.status, 200, "{api:?}: {}", r.text());
        assert_eq!(r.header("content-type").as_deref(), Some(OCI_INDEX));
        assert_eq!(r.json()["manifests"], json!([]), "{api:?}");
        assert_eq!(r.json()["mediaType"], OCI_INDEX);
    }
    // A repository the upstream does not know has no referrers either.
    env.fake.set_referrers_api(ReferrersApi::Missing);
    let r = env
        .client
        .get(&env.v2(&refs_path("nope/app", &img.manifest)))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["manifests"], json!([]));
}

#[tokio::test]
async fn without_the_api_the_fallback_tag_answers_filtered_here_and_is_kept() {
    let env = Env::start().await;
    env.fake.set_referrers_api(ReferrersApi::Missing);
    let img = env.fake.push_image("org/app", Some("v1"), &[10]);
    let sig = env.fake.push_referrer("org/app", &img.manifest, SIG);
    let sbom = env.fake.push_referrer("org/app", &img.manifest, SBOM);
    push_fallback_tag(&env.fake, "org/app", &img.manifest, &[&sig, &sbom]);
    let url = env.v2(&refs_path("org/app", &img.manifest));
    let r = env.client.get(&url).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type").as_deref(), Some(OCI_INDEX));
    assert_eq!(
        digests(&r.json()),
        sorted(vec![sig.digest.clone(), sbom.digest.clone()])
    );
    assert!(r.header("oci-filters-applied").is_none());
    assert!(r.header("warning").is_none());
    let tag_path = format!("/v2/org/app/manifests/{}", fallback_tag(&img.manifest));
    assert_eq!(env.fake.count("GET", &tag_path), 1);

    let r = env.client.get(&format!("{url}?artifactType={SBOM}")).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("oci-filters-applied").as_deref(),
        Some("artifactType")
    );
    let m = r.json()["manifests"].clone();
    assert_eq!(digests(&r.json()), vec![sbom.digest.clone()]);
    assert_eq!(m[0]["artifactType"], SBOM);
    assert_eq!(m[0]["annotations"]["org.example.kind"], SBOM);
    // Within tag_ttl the kept answer serves both: one referrers call and one tag fetch in all.
    assert_eq!(env.fake.count_containing("GET", "/referrers/"), 1);
    assert_eq!(env.fake.count("GET", &tag_path), 1);
    let hits = env
        .metric(
            "cachalot_cache_lookups_total",
            &[("kind", "referrers"), ("result", "hit")],
        )
        .await;
    assert_eq!(hits, 1.0);
}

#[tokio::test]
async fn an_upstream_that_ignores_the_filter_is_filtered_here() {
    let env = Env::start().await;
    env.fake.set_referrers_api(ReferrersApi::Unfiltered);
    let img = env.fake.push_image("org/app", Some("v1"), &[10]);
    let sig = env.fake.push_referrer("org/app", &img.manifest, SIG);
    env.fake.push_referrer("org/app", &img.manifest, SBOM);
    let url = env.v2(&refs_path("org/app", &img.manifest));
    let r = env.client.get(&format!("{url}?artifactType={SIG}")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(digests(&r.json()), vec![sig.digest.clone()]);
    assert_eq!(
        r.header("oci-filters-applied").as_deref(),
        Some("artifactType")
    );
    // No match is an empty list, still filtered.
    let r = env.client.get(&format!("{url}?artifactType=x/none")).await;
    assert_eq!(r.json()["manifests"], json!([]));
    assert_eq!(
        r.header("oci-filters-applied").as_deref(),
        Some("artifactType")
    );
    let r = env.client.head(&url).await;
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
}

#[tokio::test]
async fn upstream_pages_link_to_the_clients_own_name_and_routing() {
    let env = Env::start().await;
    env.fake.set_referrers_api(ReferrersApi::Paged(1));
    let img = env.fake.push_image("org/app", Some("v1"), &[10]);
    let a = env.fake.push_referrer("org/app", &img.manifest, SIG);
    let b = env.fake.push_referrer("org/app", &img.manifest, SIG);
    let want = sorted(vec![a.digest.clone(), b.digest.clone()]);
    for (first, prefix, suffix) in [
        (
            env.v2(&format!("{UP}/{}", refs_path("org/app", &img.manifest))),
            format!("/v2/{UP}/org/app/referrers/{}?", img.manifest.digest),
            String::new(),
        ),
        (
            env.v2(&format!("{}?ns={UP}", refs_path("org/app", &img.manifest))),
            format!("/v2/org/app/referrers/{}?", img.manifest.digest),
            format!("&ns={UP}"),
        ),
        (
            env.v2(&format!(
                "{}?ns={UP}&artifactType={SIG}",
                refs_path("org/app", &img.manifest)
            )),
            format!("/v2/org/app/referrers/{}?", img.manifest.digest),
            format!("&artifactType={}&ns={UP}", SIG.replace('/', "%2F")),
        ),
    ] {
        let r = env.client.get(&first).await;
        assert_eq!(r.status, 200, "{first}: {}", r.text());
        let page1 = digests(&r.json());
        assert_eq!(page1, vec![want[0].clone()]);
        let link = r
            .header("link")
            .unwrap_or_else(|| panic!("{first}: no Link"));
        let target = link
            .strip_prefix('<')
            .and_then(|l| l.split_once('>'))
            .map(|(t, rest)| {
                assert_eq!(rest, "; rel=\"next\"");
                t.to_owned()
            })
            .unwrap_or_else(|| panic!("{link}"));
        assert!(target.starts_with(&prefix), "{target} for {first}");
        assert!(target.ends_with(&suffix), "{target} for {first}");
        assert!(target.contains("n=1&last=sha256%3A"), "{target}");
        let r = env.client.get(&env.url(&target)).await;
        assert_eq!(r.status, 200, "{target}: {}", r.text());
        assert_eq!(digests(&r.json()), vec![want[1].clone()], "{target}");
        assert!(
            r.header("link").is_none(),
            "{target}: the last page links nowhere"
        );
    }
}

/// A later page's query is the client's to choose, so only first pages are kept: queries made
/// up by a client reach the upstream but never grow the metadata store, and once the upstream
/// is gone such a page is answered from the cache (empty: the cache's list is all on its first
/// page), not from a kept answer.
#[tokio::test]
async fn only_first_pages_are_kept() {
    let env = Env::start().await;
    let img = env.fake.push_image("org/app", Some("v1"), &[10]);
    let sig = env.fake.push_referrer("org/app", &img.manifest, SIG);
    let r = env
        .client
        .get(&env.v2(&format!("org/app/manifests/{}", sig.digest)))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let url = env.v2(&refs_path("org/app", &img.manifest));
    for q in ["", "?junk=1"] {
        let r = env.client.get(&format!("{url}{q}")).await;
        assert_eq!(r.status, 200, "{q}: {}", r.text());
        assert_eq!(digests(&r.json()).len(), 1, "{q}");
    }
    env.fake.stop().await;
    let kept = env.client.get(&url).await;
    assert_eq!(digests(&kept.json()).len(), 1, "the first page was kept");
    assert_eq!(kept.header("warning"), None, "and is fresh");
    let r = env.client.get(&format!("{url}?junk=1")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let w = r.header("warning").unwrap_or_default();
    assert!(w.contains("from the cache"), "not kept: {w}");
    // From the cache the whole list is the first page; a later one does not repeat it.
    assert!(digests(&r.json()).is_empty(), "{}", r.text());
}

#[tokio::test]
async fn past_tag_ttl_a_failing_upstream_gets_the_kept_answer_with_a_warning() {
    let cache = CacheSpec {
        tag_ttl: "1ms".into(),
        ..CacheSpec::default()
    };
    let env = Env::start_with(cache, "").await;
    let img = env.fake.push_image("org/app", Some("v1"), &[10]);
    let sig = env.fake.push_referrer("org/app", &img.manifest, SIG);
    let url = env.v2(&refs_path("org/app", &img.manifest));
    let r = env.client.get(&url).await;
    assert_eq!(digests(&r.json()), vec![sig.digest.clone()]);
    assert!(r.header("warning").is_none());
    // Pushed after the answer was kept: a stale answer does not list it.
    env.fake.push_referrer("org/app", &img.manifest, SBOM);

    let stale = |r: &Resp, what: &str| {
        assert_eq!(r.status, 200, "{what}: {}", r.text());
        assert_eq!(digests(&r.json()), vec![sig.digest.clone()], "{what}");
        let w = r
            .header("warning")
            .unwrap_or_else(|| panic!("{what}: no Warning"));
        assert!(w.starts_with("299 - \"stale referrers"), "{what}: {w}");
    };
    env.fake
        .set_status_fault(Some(StatusFault::all(503).on_path("/referrers/")));
    stale(&env.client.get(&url).await, "503");
    env.fake.set_status_fault(Some(
        StatusFault::too_many_requests(30).on_path("/referrers/"),
    ));
    stale(&env.client.get(&url).await, "429");
    env.fake.set_status_fault(None);
    env.fake.set_hang(true);
    let started = Instant::now();
    stale(&env.client.get(&url).await, "hang");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "a hung upstream held the answer {:?}",
        started.elapsed()
    );
    env.fake.set_hang(false);
    let n = env
        .metric(
            "cachalot_cache_lookups_total",
            &[("kind", "referrers"), ("result", "stale")],
        )
        .await;
    assert_eq!(n, 3.0);
    // Back up: revalidated, the new referrer listed, no Warning.
    let r = env.client.get(&url).await;
    assert_eq!(digests(&r.json()).len(), 2);
    assert!(r.header("warning").is_none());

    // Nothing kept and an upstream that answers an error: the error, not an empty list.
    env.fake
        .set_status_fault(Some(StatusFault::all(503).on_path("/referrers/")));
    let other = env.fake.push_image("org/app", None, &[10]);
    let r = env
        .client
        .get(&env.v2(&refs_path("org/app", &other.manifest)))
        .await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.error_code().is_some());
}

#[tokio::test]
async fn unreachable_or_offline_answers_come_from_the_cached_manifests() {
    let mut env = Env::start().await;
    let img = env.fake.push_image("org/app", Some("v1"), &[10]);
    let sig = env.fake.push_referrer("org/app", &img.manifest, SIG);
    let sbom = env.fake.push_referrer("org/app", &img.manifest, SBOM);
    // The same subject named from another repository: not this repository's referrer.
    let elsewhere = env.fake.push_referrer("other/app", &img.manifest, SIG);
    for (repo, m) in [
        ("org/app", &sig),
        ("org/app", &sbom),
        ("other/app", &elsewhere),
    ] {
        let r = env
            .client
            .get(&env.v2(&format!("{repo}/manifests/{}", m.digest)))
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let want = sorted(vec![sig.digest.clone(), sbom.digest.clone()]);
    let url = env.v2(&refs_path("org/app", &img.manifest));
    let from_cache = |r: &Resp, what: &str| {
        assert_eq!(r.status, 200, "{what}: {}", r.text());
        assert_eq!(digests(&r.json()), want, "{what}");
        let w = r
            .header("warning")
            .unwrap_or_else(|| panic!("{what}: no Warning"));
        assert!(w.contains("from the cache"), "{what}: {w}");
        let m = &r.json()["manifests"];
        let listed_sig = m
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["digest"] == sig.digest.as_str());
        assert_eq!(listed_sig.unwrap()["artifactType"], SIG, "{what}");
    };
    env.fake.stop().await;
    from_cache(&env.client.get(&url).await, "connection refused");
    let r = env.client.get(&format!("{url}?artifactType={SBOM}")).await;
    assert_eq!(digests(&r.json()), vec![sbom.digest.clone()]);
    assert_eq!(
        r.header("oci-filters-applied").as_deref(),
        Some("artifactType")
    );

    // Online again, the upstream lists a referrer the cache never held; the answer is kept.
    env.fake.restart().await;
    env.restart_proxy(None).await;
    let unpulled = env.fake.push_referrer("org/app", &img.manifest, SBOM);
    let url = env.v2(&refs_path("org/app", &img.manifest));
    let r = env.client.get(&url).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(digests(&r.json()).contains(&unpulled.digest.to_string()));

    // Offline, after a restart: the index was persisted, and the answer is what the cache can
    // serve, not the kept one naming a manifest it does not hold.
    env.fake.reset_counts();
    env.restart_proxy(Some(CacheSpec {
        offline: true,
        ..CacheSpec::default()
    }))
    .await;
    let url = env.v2(&refs_path("org/app", &img.manifest));
    from_cache(&env.client.get(&url).await, "offline");
    assert_eq!(env.fake.total(), 0, "offline: {:?}", env.fake.requests());
}

#[tokio::test]
async fn garbage_is_taken_as_no_referrers_or_refused_and_bad_digests_never_go_upstream() {
    let env = Env::start().await;
    env.fake.set_referrers_api(ReferrersApi::Missing);
    let img = env.fake.push_image("org/app", Some("v1"), &[10]);
    let not_an_index = env.fake.push_image("org/app", None, &[10]);
    env.fake.set_tag(
        "org/app",
        &fallback_tag(&img.manifest),
        &not_an_index.manifest.digest,
    );
    let r = env
        .client
        .get(&env.v2(&refs_path("org/app", &img.manifest)))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["manifests"],
        json!([]),
        "the spec's client reading: no referrers"
    );

    env.fake.set_referrers_api(ReferrersApi::Garbage);
    let other = env.fake.push_image("org/app", None, &[10]);
    let r = env
        .client
        .get(&env.v2(&refs_path("org/app", &other.manifest)))
        .await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    let msg = r.error_message().unwrap_or_default();
    assert!(msg.contains("not JSON"), "{msg}");

    env.fake.reset_counts();
    for bad in [
        "sha256:nothex",
        "sha256:ABC",
        "nodigest",
        "md5:d41d8cd98f00b204e9800998ecf8427e",
    ] {
        let r = env
            .client
            .get(&env.v2(&format!("org/app/referrers/{bad}")))
            .await;
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        assert_eq!(r.error_code().as_deref(), Some("DIGEST_INVALID"), "{bad}");
    }
    assert_eq!(env.fake.total(), 0, "{:?}", env.fake.requests());
}

async fn cachalot(args: &[&str]) {
    let out = common::child::run_cli(args).await;
    assert!(out.ok, "cachalot {args:?}: {}{}", out.stdout, out.stderr);
}

fn config_file(dir: &Path, url: &str, offline: bool) -> String {
    let cache = CacheSpec {
        offline,
        ..CacheSpec::default()
    };
    let toml = config_toml(
        &dir.join("cache"),
        &cache,
        &[UpstreamSpec::new(UP, url, true)],
    );
    let path = dir.join("cachalot.toml");
    std::fs::write(&path, &toml).unwrap();
    path.to_str().unwrap().to_owned()
}

#[tokio::test]
async fn an_imported_bundle_answers_referrers_offline() {
    let fake = FakeRegistry::start().await;
    let img = fake.push_image("team/app", Some("v1"), &[10]);
    let sig = fake.push_referrer("team/app", &img.manifest, SIG);
    let online = tempfile::tempdir().unwrap();
    let bundle = online.path().join("bundle.tar");
    let cfg = config_file(online.path(), &fake.url(), false);
    let image = format!("{UP}/team/app:v1");
    let b = bundle.to_str().unwrap();
    cachalot(&[
        "export",
        "--config",
        &cfg,
        "--output",
        b,
        "--with-referrers",
        &image,
    ])
    .await;
    fake.stop().await;

    let site = tempfile::tempdir().unwrap();
    let site_cfg = config_file(site.path(), &fake.url(), true);
    cachalot(&["import", "--config", &site_cfg, b]).await;
    let toml = std::fs::read_to_string(&site_cfg).unwrap();
    let proxy = Proxy::start(&toml).await;
    let client = TestClient::new();
    let base = format!("{}/v2/team/app", proxy.url());
    let r = client
        .get(&format!("{base}/referrers/{}", img.manifest.digest))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(digests(&r.json()), vec![sig.digest.clone()]);
    // Listed, and readable there: the import linked it to its subject's repository.
    let r = client
        .get(&format!("{base}/manifests/{}", sig.digest))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, sig.bytes);
}
