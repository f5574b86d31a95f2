//! End-to-end: referrers through cachalot in front of Debian's `docker-registry` (distribution
//! 2.8), which has no referrers API. An artifact with a `subject` and the fallback-tag index a
//! pusher maintains are pushed over plain HTTP; cachalot answers the referrers API from that
//! tag, filters it, and answers an empty index for a subject nothing refers to.
//!
//! Needs `docker-registry` in PATH: without it the test prints why and skips, unless `CI` is
//! set, in which case it fails.

mod e2e_support;

use bytes::Bytes;
use e2e_support::cachalot::Cachalot;
use e2e_support::registry::{Distribution, RegistryOptions};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const SIG: &str = "application/vnd.example.sig";

fn digest(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

async fn send(
    method: Method,
    url: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> (StatusCode, http::HeaderMap) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = Request::builder().method(method).uri(url);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let req = req.body(Full::new(Bytes::copy_from_slice(body))).unwrap();
    let resp = client
        .request(req)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    let (parts, body) = resp.into_parts();
    let text = body.collect().await.unwrap().to_bytes();
    assert!(
        parts.status.is_success(),
        "{url}: {} {}",
        parts.status,
        String::from_utf8_lossy(&text)
    );
    (parts.status, parts.headers)
}

/// Pushes a blob the monolithic way (POST, then PUT with the digest).
async fn push_blob(base: &str, repo: &str, bytes: &[u8]) -> String {
    let d = digest(bytes);
    let (_, h) = send(
        Method::POST,
        &format!("{base}/v2/{repo}/blobs/uploads/"),
        None,
        b"",
    )
    .await;
    let location = h["location"].to_str().unwrap();
    let location = if location.starts_with('/') {
        format!("{base}{location}")
    } else {
        location.to_owned()
    };
    let sep = if location.contains('?') { '&' } else { '?' };
    send(
        Method::PUT,
        &format!("{location}{sep}digest={d}"),
        Some("application/octet-stream"),
        bytes,
    )
    .await;
    d
}

/// Pushes a manifest under `tag`, or by its digest.
async fn push_manifest(
    base: &str,
    repo: &str,
    tag: Option<&str>,
    media_type: &str,
    v: &Value,
) -> (String, usize) {
    let bytes = serde_json::to_vec(v).unwrap();
    let d = digest(&bytes);
    send(
        Method::PUT,
        &format!("{base}/v2/{repo}/manifests/{}", tag.unwrap_or(&d)),
        Some(media_type),
        &bytes,
    )
    .await;
    (d, bytes.len())
}

async fn get_json(url: &str) -> (StatusCode, http::HeaderMap, Value) {
    let r = e2e_support::http::get(url).await;
    let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    (r.status, r.headers, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referrers_come_from_the_fallback_tag_of_a_registry_without_the_api() {
    if !e2e_support::tools::tools_available(
        &["docker-registry"],
        "apt-get install -y docker-registry",
    ) {
        return;
    }
    let reg = Distribution::start_with(RegistryOptions::default()).await;
    let base = reg.url();
    let repo = "team/signed";
    let config = b"{\"architecture\":\"amd64\",\"os\":\"linux\"}";
    let config_d = push_blob(&base, repo, config).await;
    let layer = b"not really a tar, but a blob all the same";
    let layer_d = push_blob(&base, repo, layer).await;
    let image = json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_d, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_d, "size": layer.len()}]});
    let (image_d, image_len) = push_manifest(&base, repo, Some("v1"), OCI_MANIFEST, &image).await;

    let empty_d = push_blob(&base, repo, b"{}").await;
    let sig_blob = b"signature bytes";
    let sig_blob_d = push_blob(&base, repo, sig_blob).await;
    let sig = json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": SIG,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty_d, "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": sig_blob_d, "size": sig_blob.len()}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": image_d, "size": image_len},
        "annotations": {"org.example.signer": "e2e"}});
    let (sig_d, sig_len) = push_manifest(&base, repo, None, OCI_MANIFEST, &sig).await;
    // What a client does where the referrers API is missing: the index under the fallback tag.
    let fallback = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": sig_d, "size": sig_len, "artifactType": SIG,
         "annotations": {"org.example.signer": "e2e"}}]});
    push_manifest(
        &base,
        repo,
        Some(&image_d.replace(':', "-")),
        OCI_INDEX,
        &fallback,
    )
    .await;
    // The registry itself has no referrers API.
    let r = e2e_support::http::get(&format!("{base}/v2/{repo}/referrers/{image_d}")).await;
    assert_eq!(r.status, 404);

    let c = Cachalot::in_front_of(&base).await;
    let url = format!("{}/v2/{repo}/referrers/{image_d}", c.url());
    let (status, h, v) = get_json(&url).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(h["content-type"], OCI_INDEX);
    assert_eq!(v["manifests"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["manifests"][0]["digest"], sig_d.as_str());
    assert_eq!(v["manifests"][0]["artifactType"], SIG);
    let (_, h, v) = get_json(&format!("{url}?artifactType={SIG}")).await;
    assert_eq!(h["oci-filters-applied"], "artifactType");
    assert_eq!(v["manifests"].as_array().map(Vec::len), Some(1), "{v}");
    let (_, _, v) = get_json(&format!("{url}?artifactType=application/x-none")).await;
    assert_eq!(v["manifests"], json!([]));
    // The signature itself pulls through, and nothing refers to it: an empty index, not a 404.
    let r = e2e_support::http::get(&format!("{}/v2/{repo}/manifests/{sig_d}", c.url())).await;
    assert_eq!(r.status, 200);
    let (status, _, v) = get_json(&format!("{}/v2/{repo}/referrers/{sig_d}", c.url())).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["manifests"], json!([]));
    c.shutdown().await;
}
