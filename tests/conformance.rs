//! The pull checks of the OCI distribution-spec conformance suite (v1.1.1, `01_pull_test.go`;
//! PROTOCOL.md 5.1), ported to Rust and run against cachalot in front of a real registry
//! (Debian's `docker-registry` with token auth), seeded with a single-platform image and a
//! multi-arch index. Tests are named after the spec sections they cover.
//!
//! `reference_registry_passes_the_same_checks` runs every check against the upstream registry
//! itself, which proves the checks are right about the spec rather than about cachalot.
//!
//! Needs `docker-registry` and `skopeo` (for seeding): skipped with a message when they are
//! missing and `CI` is unset, a failure under CI.

mod e2e_support;

use std::sync::OnceLock;

use e2e_support::cachalot::Cachalot;
use e2e_support::http::{HttpResponse, request};
use e2e_support::oci::{self, random_bytes, sha256_digest};
use hyper::Method;

/// Error codes of the distribution spec (S1 "Error Codes").
const SPEC_CODES: [&str; 14] = [
    "BLOB_UNKNOWN",
    "BLOB_UPLOAD_INVALID",
    "BLOB_UPLOAD_UNKNOWN",
    "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID",
    "MANIFEST_UNKNOWN",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "SIZE_INVALID",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
    "TOOMANYREQUESTS",
];

/// Everything a manifest GET accepts (as containerd and skopeo send).
const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// Where the checks are pointed: a base URL, and a bearer token when talking to the registry
/// directly.
#[derive(Clone)]
struct Target {
    base: String,
    authorization: Option<String>,
}

impl Target {
    async fn send(&self, method: Method, path: &str, accept: Option<&str>) -> HttpResponse {
        let mut headers = Vec::new();
        if let Some(a) = &self.authorization {
            headers.push(("authorization", a.as_str()));
        }
        if let Some(a) = accept {
            headers.push(("accept", a));
        }
        let url = format!("{}{path}", self.base);
        request(method, &url, &headers)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

/// cachalot, started once per test binary on the shared runtime, in front of the shared upstream.
fn cachalot() -> Target {
    static CACHALOT: OnceLock<String> = OnceLock::new();
    let base = CACHALOT.get_or_init(|| {
        let url = e2e_support::shared_upstream().url();
        e2e_support::block_on_shared(async move {
            let c = Cachalot::in_front_of(&url).await;
            let base = c.url();
            // Keep it serving for the rest of the process.
            Box::leak(Box::new(c));
            base
        })
    });
    Target {
        base: base.clone(),
        authorization: None,
    }
}

/// The upstream registry itself, with a token granting pull on the seeded public repositories.
fn reference_registry() -> Target {
    let up = e2e_support::shared_upstream();
    let scopes = [
        format!("repository:{}:pull", e2e_support::MULTI_REPO),
        format!("repository:{}:pull", e2e_support::SINGLE_REPO),
        "repository:conformance/absent:pull".to_owned(),
    ];
    let scopes: Vec<&str> = scopes.iter().map(String::as_str).collect();
    let token = up.issuer.token_for(None, &scopes);
    Target {
        base: up.url(),
        authorization: Some(format!("Bearer {token}")),
    }
}

fn missing_digest() -> String {
    sha256_digest(&random_bytes(64))
}

fn assert_api_version(resp: &HttpResponse, what: &str) {
    assert_eq!(
        resp.header("docker-distribution-api-version"),
        "registry/2.0",
        "{what}: Docker-Distribution-API-Version"
    );
}

/// The spec's error envelope: `{"errors":[{"code","message"?,"detail"?}]}` with a spec code
/// (or one of distribution's documented extras).
fn assert_error_envelope(resp: &HttpResponse, what: &str) -> String {
    if resp.body.is_empty() {
        // HEAD responses have no body.
        return String::new();
    }
    let v = resp.json();
    let errors = v["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: no errors array in {v}"));
    assert!(!errors.is_empty(), "{what}: empty errors array");
    for e in errors {
        let code = e["code"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: error without a code: {e}"));
        assert!(
            SPEC_CODES.contains(&code),
            "{what}: code {code} is not a distribution-spec error code"
        );
        if let Some(m) = e.get("message") {
            assert!(m.is_string(), "{what}: message must be a string: {e}");
        }
    }
    errors[0]["code"].as_str().unwrap().to_owned()
}

// ---- the checks -------------------------------------------------------------------------------

/// end-1: `GET /v2/` answers 200 (cachalot does not challenge its clients).
async fn check_api_version(t: &Target) {
    let resp = t.send(Method::GET, "/v2/", None).await;
    assert_eq!(resp.status, 200, "GET /v2/");
    assert_api_version(&resp, "GET /v2/");
}

/// Pulling blobs: HEAD and GET of a blob that does not exist are 404 (BLOB_UNKNOWN body on GET).
async fn check_pull_blob_missing(t: &Target) {
    let path = format!(
        "/v2/{}/blobs/{}",
        e2e_support::SINGLE_REPO,
        missing_digest()
    );
    let head = t.send(Method::HEAD, &path, None).await;
    assert_eq!(head.status, 404, "HEAD missing blob");
    assert_api_version(&head, "HEAD missing blob");
    let get = t.send(Method::GET, &path, None).await;
    assert_eq!(get.status, 404, "GET missing blob");
    let code = assert_error_envelope(&get, "GET missing blob");
    assert_eq!(code, "BLOB_UNKNOWN", "GET missing blob: code");
}

/// Pulling blobs: HEAD and GET of existing blobs (config and layers) are 200; the
/// Docker-Content-Digest header, when present, matches; GET's body hashes to the digest and
/// HEAD's Content-Length is the blob size.
async fn check_pull_blob_existing(t: &Target) {
    let up = e2e_support::shared_upstream();
    let img = &up.single.images[0];
    let mut digests = vec![img.config_digest.clone()];
    digests.extend(img.layer_digests.iter().cloned());
    for digest in &digests {
        let path = format!("/v2/{}/blobs/{digest}", e2e_support::SINGLE_REPO);
        let want = up.single.blob(digest);
        let head = t.send(Method::HEAD, &path, None).await;
        assert_eq!(head.status, 200, "HEAD {path}");
        assert_api_version(&head, "HEAD blob");
        let dcd = head.header("docker-content-digest");
        assert!(
            dcd.is_empty() || dcd == digest,
            "HEAD {path}: digest header {dcd}"
        );
        assert_eq!(
            head.header("content-length"),
            want.len().to_string(),
            "HEAD {path}: Content-Length"
        );
        assert!(head.body.is_empty(), "HEAD {path} has a body");

        let get = t.send(Method::GET, &path, None).await;
        assert_eq!(get.status, 200, "GET {path}");
        let dcd = get.header("docker-content-digest");
        assert!(
            dcd.is_empty() || dcd == digest,
            "GET {path}: digest header {dcd}"
        );
        assert_eq!(sha256_digest(&get.body), *digest, "GET {path}: body digest");
        assert_eq!(get.body.len(), want.len());
    }
}

/// Pulling manifests: HEAD and GET of a manifest that does not exist (by tag, by digest, and by
/// the suite's own `.INVALID_MANIFEST_NAME`, which is neither) are 404, MANIFEST_UNKNOWN on GET.
async fn check_pull_manifest_missing(t: &Target) {
    check_missing_references(t, &["no-such-tag".to_owned(), missing_digest()]).await;
}

/// The suite's reference that cannot exist: not a tag (a tag cannot start with `.`) and not a
/// digest.
const INVALID_MANIFEST_NAME: &str = ".INVALID_MANIFEST_NAME";

async fn check_missing_references(t: &Target, references: &[String]) {
    for reference in references {
        let path = format!("/v2/{}/manifests/{reference}", e2e_support::SINGLE_REPO);
        let head = t.send(Method::HEAD, &path, Some(ACCEPT_ALL)).await;
        assert_eq!(head.status, 404, "HEAD {path}");
        let get = t.send(Method::GET, &path, Some(ACCEPT_ALL)).await;
        assert_eq!(get.status, 404, "GET {path}");
        let code = assert_error_envelope(&get, "GET missing manifest");
        assert_eq!(code, "MANIFEST_UNKNOWN", "GET {path}: code");
    }
}

/// Checks a manifest response against the expected bytes.
fn assert_manifest(resp: &HttpResponse, method: &Method, path: &str, bytes: &[u8], mt: &str) {
    assert_eq!(
        resp.status,
        200,
        "{method} {path}: {}",
        String::from_utf8_lossy(&resp.body)
    );
    assert_api_version(resp, path);
    let digest = sha256_digest(bytes);
    let dcd = resp.header("docker-content-digest");
    assert!(
        dcd.is_empty() || dcd == digest,
        "{method} {path}: Docker-Content-Digest {dcd}, want {digest}"
    );
    assert_eq!(
        resp.header("content-type"),
        mt,
        "{method} {path}: Content-Type"
    );
    if *method == Method::GET {
        assert_eq!(&resp.body[..], bytes, "{method} {path}: bytes");
    } else {
        assert!(resp.body.is_empty(), "{method} {path}: HEAD has a body");
        assert_eq!(
            resp.header("content-length"),
            bytes.len().to_string(),
            "{method} {path}: Content-Length"
        );
    }
}

/// Pulling manifests by tag: HEAD and GET are 200 with the digest of the bytes pushed, for an image
/// manifest (the conformance suite's `Accept: application/vnd.oci.image.manifest.v1+json`) and for
/// a multi-arch index.
async fn check_pull_manifest_by_tag(t: &Target) {
    let up = e2e_support::shared_upstream();
    let cases = [
        (e2e_support::SINGLE_REPO, &up.single, oci::MANIFEST_V1),
        (e2e_support::MULTI_REPO, &up.multi, ACCEPT_ALL),
    ];
    for (repo, layout, accept) in cases {
        let path = format!("/v2/{repo}/manifests/{}", layout.tag);
        for method in [Method::HEAD, Method::GET] {
            let resp = t.send(method.clone(), &path, Some(accept)).await;
            assert_manifest(
                &resp,
                &method,
                &path,
                &layout.top_bytes,
                &layout.top_media_type,
            );
        }
    }
}

/// Pulling manifests by digest: HEAD and GET of the index and of every platform manifest.
async fn check_pull_manifest_by_digest(t: &Target) {
    let up = e2e_support::shared_upstream();
    let mut cases = vec![(
        e2e_support::MULTI_REPO,
        up.multi.top_digest.clone(),
        up.multi.top_media_type.clone(),
    )];
    for img in up.multi.images.iter().chain(&up.single.images) {
        let repo = if up.multi.blobs.contains(&img.manifest_digest) {
            e2e_support::MULTI_REPO
        } else {
            e2e_support::SINGLE_REPO
        };
        cases.push((
            repo,
            img.manifest_digest.clone(),
            oci::MANIFEST_V1.to_owned(),
        ));
    }
    for (repo, digest, mt) in cases {
        let layout = if repo == e2e_support::MULTI_REPO {
            &up.multi
        } else {
            &up.single
        };
        let bytes = layout.blob(&digest);
        let path = format!("/v2/{repo}/manifests/{digest}");
        for method in [Method::HEAD, Method::GET] {
            let resp = t.send(method.clone(), &path, Some(ACCEPT_ALL)).await;
            assert_manifest(&resp, &method, &path, &bytes, &mt);
        }
    }
}

/// Error codes: `GET .../manifests/sha256:totallywrong` is 400 or 404, and a 400's first error
/// code is a spec code.
async fn check_manifest_invalid_digest(t: &Target) {
    let path = format!(
        "/v2/{}/manifests/sha256:totallywrong",
        e2e_support::SINGLE_REPO
    );
    let resp = t.send(Method::GET, &path, Some(ACCEPT_ALL)).await;
    assert!(
        resp.status == 400 || resp.status == 404,
        "GET {path}: {} (want 400 or 404)",
        resp.status
    );
    if resp.status == 400 {
        assert_error_envelope(&resp, "GET sha256:totallywrong");
    }
}

/// Error codes: a repository that does not exist is 404 with a spec code, in the JSON envelope.
async fn check_unknown_repository(t: &Target) {
    let path = "/v2/conformance/absent/manifests/latest";
    let resp = t.send(Method::GET, path, Some(ACCEPT_ALL)).await;
    assert_eq!(resp.status, 404, "GET {path}");
    let code = assert_error_envelope(&resp, path);
    assert!(
        code == "NAME_UNKNOWN" || code == "MANIFEST_UNKNOWN",
        "GET {path}: code {code}"
    );
    assert!(
        resp.header("content-type").starts_with("application/json"),
        "GET {path}: error Content-Type {:?}",
        resp.header("content-type")
    );
}

// ---- tests against cachalot ---------------------------------------------------------------------

#[tokio::test]
async fn api_version_check_end_1_get_v2_is_200() {
    require_e2e_tools!();
    check_api_version(&cachalot()).await;
}

#[tokio::test]
async fn pulling_blobs_head_and_get_nonexistent_blob_is_404() {
    require_e2e_tools!();
    check_pull_blob_missing(&cachalot()).await;
}

#[tokio::test]
async fn pulling_blobs_head_and_get_existing_blob_is_200_with_matching_digest() {
    require_e2e_tools!();
    check_pull_blob_existing(&cachalot()).await;
}

#[tokio::test]
async fn pulling_manifests_head_and_get_nonexistent_manifest_is_404() {
    require_e2e_tools!();
    check_pull_manifest_missing(&cachalot()).await;
}

#[tokio::test]
async fn pulling_manifests_head_and_get_invalid_manifest_name_is_404_manifest_unknown() {
    require_e2e_tools!();
    check_missing_references(&cachalot(), &[INVALID_MANIFEST_NAME.to_owned()]).await;
}

#[tokio::test]
async fn pulling_manifests_head_and_get_by_tag_is_200_with_matching_digest() {
    require_e2e_tools!();
    check_pull_manifest_by_tag(&cachalot()).await;
}

#[tokio::test]
async fn pulling_manifests_head_and_get_by_digest_is_200_with_matching_digest() {
    require_e2e_tools!();
    check_pull_manifest_by_digest(&cachalot()).await;
}

#[tokio::test]
async fn error_codes_get_manifest_totallywrong_is_400_or_404_with_spec_code() {
    require_e2e_tools!();
    check_manifest_invalid_digest(&cachalot()).await;
}

#[tokio::test]
async fn error_codes_unknown_repository_is_404_in_the_error_envelope() {
    require_e2e_tools!();
    check_unknown_repository(&cachalot()).await;
}

/// Every check again, warm: the second round is answered from cachalot's cache.
#[tokio::test]
async fn pulling_twice_gives_the_same_answers_from_the_cache() {
    require_e2e_tools!();
    let t = cachalot();
    for _ in 0..2 {
        check_pull_blob_existing(&t).await;
        check_pull_manifest_by_tag(&t).await;
        check_pull_manifest_by_digest(&t).await;
    }
}

/// Content discovery, listing tags (spec "Listing Tags"; the suite's `03_discovery_test.go`):
/// sorted lexically, at most `n`, after `last`, a `Link` to the next page under the client's own
/// name while more follow, `n=0` empty. distribution 2.8 ignores `n` and `last` itself, so these
/// answers are cachalot's own, cut from the whole list it walked.
#[tokio::test]
async fn content_discovery_tags_lists_are_paged_by_n_and_last() {
    require_e2e_tools!();
    let up = e2e_support::shared_upstream();
    let repo = e2e_support::SINGLE_REPO;
    // More tags on the seeded image, pushed to the registry itself (not through cachalot).
    let token = up.issuer.token_for(
        Some(e2e_support::USER),
        &[&format!("repository:{repo}:pull,push")],
    );
    let auth = format!("Bearer {token}");
    for tag in ["conf-c", "conf-a", "conf-d", "conf-b"] {
        let url = format!("{}/v2/{repo}/manifests/{tag}", up.url());
        let resp = e2e_support::http::request_with_body(
            Method::PUT,
            &url,
            &[
                ("authorization", &auth),
                ("content-type", &up.single.top_media_type),
            ],
            up.single.top_bytes.clone().into(),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(resp.status, 201, "PUT {url}: {:?}", resp.body);
    }
    // The tags are pushed before this binary's cachalot first lists `e2e/single`: a test that
    // listed them earlier would leave a kept list without them for `tag_ttl`.
    let t = cachalot();
    let list = |q: &str| {
        let t = t.clone();
        let path = format!("/v2/{repo}/tags/list{q}");
        async move {
            let resp = t.send(Method::GET, &path, None).await;
            assert_eq!(resp.status, 200, "GET {path}: {:?}", resp.body);
            let v = resp.json();
            assert_eq!(v["name"], repo, "GET {path}");
            let tags: Vec<String> = v["tags"]
                .as_array()
                .unwrap_or_else(|| panic!("GET {path}: no tags array: {v}"))
                .iter()
                .map(|t| t.as_str().unwrap().to_owned())
                .collect();
            let link = resp.header("link").to_owned();
            (tags, link)
        }
    };
    let (all, link) = list("").await;
    assert_eq!(
        all,
        [
            "conf-a",
            "conf-b",
            "conf-c",
            "conf-d",
            e2e_support::SINGLE_TAG
        ]
    );
    assert_eq!(link, "", "the whole list has no next page");

    // A client walking two at a time, following each Link as given.
    let mut walked = Vec::new();
    let mut q = "?n=2".to_owned();
    for _ in 0..4 {
        let (page, link) = list(&q).await;
        assert!(page.len() <= 2, "{q}: {page:?}");
        walked.extend(page);
        if link.is_empty() {
            break;
        }
        let target = link
            .strip_prefix('<')
            .and_then(|l| l.strip_suffix(">; rel=\"next\""))
            .unwrap_or_else(|| panic!("{q}: Link {link:?}"));
        let query = target
            .strip_prefix(&format!("/v2/{repo}/tags/list"))
            .unwrap_or_else(|| panic!("{q}: Link {link:?} is not this repository's list"));
        q = query.to_owned();
    }
    assert_eq!(walked, all, "the pages, in order, are the whole list");

    assert_eq!(list("?n=2&last=conf-b").await.0, ["conf-c", "conf-d"]);
    assert_eq!(list("?n=0").await, (Vec::new(), String::new()));
    assert_eq!(list("?last=zzz").await, (Vec::new(), String::new()));
    let path = format!("/v2/{repo}/tags/list?n=-1");
    let resp = t.send(Method::GET, &path, None).await;
    // The spec names no code for a bad `n`; distribution's is PAGINATION_NUMBER_INVALID.
    assert_eq!(resp.status, 400, "GET {path}");
    assert_eq!(
        resp.json()["errors"][0]["code"],
        "PAGINATION_NUMBER_INVALID",
        "GET {path}"
    );
}

/// Content discovery, listing referrers (spec "Listing Referrers"): the registry has no
/// referrers API and nothing refers to the seeded image, so the answer is a 200 with an empty
/// image index, filtered or not, never a 404.
#[tokio::test]
async fn content_discovery_a_subject_without_referrers_is_an_empty_index() {
    require_e2e_tools!();
    let up = e2e_support::shared_upstream();
    let t = cachalot();
    for q in ["", "?artifactType=application/vnd.example.sig"] {
        let path = format!(
            "/v2/{}/referrers/{}{q}",
            e2e_support::MULTI_REPO,
            up.multi.top_digest
        );
        let resp = t.send(Method::GET, &path, None).await;
        assert_eq!(resp.status, 200, "GET {path}: {:?}", resp.body);
        assert_eq!(
            resp.header("content-type"),
            "application/vnd.oci.image.index.v1+json",
            "GET {path}"
        );
        let v = resp.json();
        assert_eq!(v["schemaVersion"], 2, "GET {path}: {v}");
        assert_eq!(v["mediaType"], "application/vnd.oci.image.index.v1+json");
        assert_eq!(v["manifests"], serde_json::json!([]), "GET {path}");
        let filtered = if q.is_empty() { "" } else { "artifactType" };
        assert_eq!(resp.header("oci-filters-applied"), filtered, "GET {path}");
    }
}

// ---- the same checks against the reference registry ------------------------------------------

#[tokio::test]
async fn reference_registry_passes_the_same_checks() {
    require_e2e_tools!();
    let t = reference_registry();
    // The registry challenges anonymous `/v2/` (token auth), so end-1 is checked with the token.
    check_api_version(&t).await;
    check_pull_blob_missing(&t).await;
    check_pull_blob_existing(&t).await;
    check_pull_manifest_missing(&t).await;
    check_pull_manifest_by_tag(&t).await;
    check_pull_manifest_by_digest(&t).await;
    // Not checked here: docker-registry 2.8.2 answers `GET .../manifests/sha256:totallywrong` with
    // 500 UNKNOWN (distribution fails that conformance check itself); cachalot must not copy it.
    let path = format!(
        "/v2/{}/manifests/sha256:totallywrong",
        e2e_support::SINGLE_REPO
    );
    let resp = t.send(Method::GET, &path, Some(ACCEPT_ALL)).await;
    eprintln!(
        "reference registry: GET {path} -> {} {}",
        resp.status,
        String::from_utf8_lossy(&resp.body).trim()
    );
    check_unknown_repository(&t).await;
}

// ---- the public suite itself (tests/conformance.sh) ------------------------------------------

/// Runs `tests/conformance.sh`: the OCI suite v1.1.1 (from `../shared/conformance/` next to the
/// checkout) against cachalot in front of a seeded docker-registry, straight and through a
/// front that sends writes upstream. Skipped when the suite is absent (even under CI: it is not
/// part of the repository); with the suite present, missing tools fail under `CI`.
#[test]
fn the_oci_conformance_suite_finds_no_failure_of_cachalots() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let suite = root.join("../shared/conformance/conformance-1.1.1.test");
    if !suite.exists() {
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED the OCI conformance run: no suite at {}",
            suite.display()
        );
        return;
    }
    if !e2e_support::tools::tools_available(
        &["docker-registry", "nginx", "curl"],
        "apt-get install -y docker-registry nginx curl",
    ) {
        return;
    }
    let out = std::process::Command::new("bash")
        .arg(root.join("tests/conformance.sh"))
        .env("CACHALOT_BIN", env!("CARGO_BIN_EXE_cachalot"))
        .env("CONFORMANCE_SUITE", &suite)
        .output()
        .expect("run tests/conformance.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "tests/conformance.sh failed ({}): {stdout}",
        out.status
    );
    assert!(
        stdout.contains("mirror: ") && stdout.contains("front: "),
        "both runs print a summary"
    );
}
