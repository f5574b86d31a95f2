//! Self tests of the fake registry: talk to it directly so the cachalot tests can trust it.

#[path = "common/client.rs"]
#[allow(dead_code)]
mod client;
#[path = "common/fake_registry.rs"]
#[allow(dead_code)]
mod fake_registry;

use std::time::Duration;

use base64::Engine as _;
use client::{TestClient, drain, read_at_least};
use fake_registry::*;
use hyper::Method;

#[tokio::test]
async fn serves_manifests_blobs_and_counts() {
    let fake = FakeRegistry::start().await;
    let img = fake.push_image("library/app", Some("v1"), &[1000, 70_000]);
    let c = TestClient::new();
    let base = fake.url();

    let r = c.get(&format!("{base}/v2/")).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("docker-distribution-api-version").as_deref(),
        Some("registry/2.0")
    );

    let r = c.get(&format!("{base}/v2/library/app/manifests/v1")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, img.manifest.bytes);
    assert_eq!(
        r.header("docker-content-digest").unwrap(),
        img.manifest.digest
    );
    assert_eq!(r.header("content-type").unwrap(), OCI_MANIFEST);
    assert_eq!(sha256_digest(&r.body), img.manifest.digest);

    let r = c
        .head(&format!(
            "{base}/v2/library/app/manifests/{}",
            img.manifest.digest
        ))
        .await;
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    assert_eq!(
        r.header("content-length").unwrap(),
        img.manifest.bytes.len().to_string()
    );

    let (d, bytes) = &img.layers[1];
    let r = c.get(&format!("{base}/v2/library/app/blobs/{d}")).await;
    assert_eq!(r.status, 200);
    assert_eq!(&r.body, bytes);
    let r = c.head(&format!("{base}/v2/library/app/blobs/{d}")).await;
    assert_eq!(r.header("content-length").unwrap(), "70000");

    // Accept that excludes the type.
    let r = c
        .get_with(
            &format!("{base}/v2/library/app/manifests/v1"),
            &[("accept", DOCKER_MANIFEST)],
        )
        .await;
    assert_eq!(r.status, 404);

    let r = c
        .get(&format!(
            "{base}/v2/library/app/blobs/sha256:{}",
            "0".repeat(64)
        ))
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code().as_deref(), Some("BLOB_UNKNOWN"));

    assert_eq!(fake.blob_gets("library/app", d), 1);
    assert_eq!(fake.blob_heads("library/app", d), 1);
    assert_eq!(fake.manifest_gets("library/app", "v1"), 2);
    assert_eq!(fake.total(), 7);
}

#[tokio::test]
async fn index_tags_and_referrers() {
    let fake = FakeRegistry::start().await;
    let a = fake.push_image("r", None, &[10]);
    let b = fake.push_docker_image("r", None, &[10]);
    let idx = fake.push_index("r", Some("multi"), &[&a, &b], false);
    let list = fake.push_index("r", Some("dmulti"), &[&b], true);
    for t in ["a", "b", "c", "d", "e"] {
        fake.set_tag("r", t, &a.manifest.digest);
    }
    let sig = fake.push_referrer("r", &a.manifest, "application/vnd.example.sig");
    let c = TestClient::new();
    let base = fake.url();

    let r = c.get(&format!("{base}/v2/r/manifests/multi")).await;
    assert_eq!(r.header("content-type").unwrap(), OCI_INDEX);
    assert_eq!(r.json()["manifests"].as_array().unwrap().len(), 2);
    assert_eq!(r.body, idx.bytes);
    let r = c.get(&format!("{base}/v2/r/manifests/dmulti")).await;
    assert_eq!(r.header("content-type").unwrap(), DOCKER_LIST);
    assert_eq!(r.body, list.bytes);

    let r = c.get(&format!("{base}/v2/r/tags/list?n=2")).await;
    assert_eq!(r.json()["tags"], serde_json::json!(["a", "b"]));
    assert_eq!(
        r.header("link").unwrap(),
        "</v2/r/tags/list?last=b&n=2>; rel=\"next\""
    );
    let r = c.get(&format!("{base}/v2/r/tags/list?n=2&last=e")).await;
    assert_eq!(r.json()["tags"], serde_json::json!(["multi"]));
    assert!(r.header("link").is_none());

    let r = c
        .get(&format!("{base}/v2/r/referrers/{}", a.manifest.digest))
        .await;
    assert_eq!(r.status, 200);
    let m = r.json()["manifests"].clone();
    assert_eq!(m.as_array().unwrap().len(), 1);
    assert_eq!(m[0]["digest"], sig.digest.as_str());
    assert_eq!(m[0]["artifactType"], "application/vnd.example.sig");
    let r = c
        .get(&format!("{base}/v2/r/referrers/{}", b.manifest.digest))
        .await;
    assert_eq!(r.json()["manifests"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn lies_corrupt_truncate_and_gate() {
    let fake = FakeRegistry::start().await;
    let blob = random_blob(200_000);
    let d = fake.push_blob("r", blob.clone());
    let c = TestClient::unpooled();
    let url = format!("{}/v2/r/blobs/{d}", fake.url());

    fake.corrupt(&d, true);
    let r = c.get(&url).await;
    assert_eq!(r.body.len(), blob.len());
    assert_ne!(r.body, blob);
    assert_eq!(r.header("docker-content-digest").unwrap(), d);
    fake.corrupt(&d, false);

    fake.truncate(&d, Some(50_000));
    let (st, h, drained) = c.get_drained(&url).await;
    assert_eq!(st, 200);
    assert_eq!(h.get("content-length").unwrap(), "200000");
    assert!(
        drained.error.is_some(),
        "truncated body must end with an error"
    );
    assert!(drained.bytes.len() <= 50_000);
    fake.truncate(&d, None);

    let gate = fake.pause_blob(&d, 100_000);
    let resp = c.send_raw(Method::GET, &url, &[]).await;
    let mut body = resp.into_body();
    let first = read_at_least(&mut body, 100_000).await;
    assert_eq!(first.len(), 100_000);
    gate.reached().await;
    assert!(gate.is_reached());
    gate.release();
    let rest = drain(body).await;
    assert!(rest.error.is_none());
    assert_eq!([first.as_slice(), &rest.bytes].concat(), blob.to_vec());
    fake.unpause_blob(&d);

    fake.set_chunk_delay(Some(Duration::from_millis(1)));
    assert_eq!(c.get(&url).await.body, blob);
    fake.set_chunk_delay(None);
}

#[tokio::test]
async fn status_faults_and_stop_restart() {
    let fake = FakeRegistry::start().await;
    let d = fake.push_blob("r", random_blob(10));
    let c = TestClient::unpooled();
    let url = format!("{}/v2/r/blobs/{d}", fake.url());

    fake.set_status_fault(Some(StatusFault::too_many_requests(7)));
    let r = c.get(&url).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after").as_deref(), Some("7"));
    assert_eq!(r.error_code().as_deref(), Some("TOOMANYREQUESTS"));
    fake.set_status_fault(Some(StatusFault::all(503).on_method(Method::HEAD)));
    assert_eq!(c.get(&url).await.status, 200);
    assert_eq!(c.head(&url).await.status, 503);
    fake.set_status_fault(None);

    fake.stop().await;
    let req = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>()
        .get(url.parse().unwrap())
        .await;
    assert!(req.is_err(), "a stopped fake refuses connections");
    fake.restart().await;
    assert_eq!(c.get(&url).await.status, 200);
}

#[tokio::test]
async fn token_auth_expiry_private_and_basic() {
    let fake = FakeRegistry::start().await;
    let img = fake.push_image("org/app", Some("v1"), &[10]);
    fake.push_image("org/secret", Some("v1"), &[10]);
    fake.set_private("org/secret", 403);
    fake.set_token_auth(TokenAuth {
        token_lifetime: Duration::from_millis(300),
        expires_in: 60,
        required_credentials: None,
    });
    let c = TestClient::unpooled();
    let base = fake.url();
    let url = format!("{base}/v2/org/app/manifests/v1");

    let r = c.get(&url).await;
    assert_eq!(r.status, 401);
    let ch = r.header("www-authenticate").unwrap();
    assert!(
        ch.starts_with(&format!("Bearer realm=\"{base}/token\"")),
        "{ch}"
    );
    assert!(ch.contains("scope=\"repository:org/app:pull\""), "{ch}");

    let t = c
        .get(&format!(
            "{base}/token?service=fake-registry&scope=repository:org/app:pull"
        ))
        .await;
    assert_eq!(t.status, 200);
    let token = t.json()["token"].as_str().unwrap().to_string();
    assert_eq!(t.json()["expires_in"], 60);
    let auth = format!("Bearer {token}");
    let r = c.get_with(&url, &[("authorization", &auth)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, img.manifest.bytes);
    // Wrong scope.
    let r = c
        .get_with(
            &format!("{base}/v2/org/secret/manifests/v1"),
            &[("authorization", &auth)],
        )
        .await;
    assert_eq!(r.status, 401);
    // Anonymous token for the private repo: 403.
    let t2 = c
        .get(&format!(
            "{base}/token?service=fake-registry&scope=repository:org/secret:pull"
        ))
        .await;
    let auth2 = format!("Bearer {}", t2.json()["token"].as_str().unwrap());
    let r = c
        .get_with(
            &format!("{base}/v2/org/secret/manifests/v1"),
            &[("authorization", &auth2)],
        )
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(r.error_code().as_deref(), Some("DENIED"));
    // With credentials: allowed.
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("u:p")
    );
    let t3 = c
        .get_with(
            &format!("{base}/token?service=fake-registry&scope=repository:org/secret:pull"),
            &[("authorization", &basic)],
        )
        .await;
    let auth3 = format!("Bearer {}", t3.json()["token"].as_str().unwrap());
    let r = c
        .get_with(
            &format!("{base}/v2/org/secret/manifests/v1"),
            &[("authorization", &auth3)],
        )
        .await;
    assert_eq!(r.status, 200);

    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = c.get_with(&url, &[("authorization", &auth)]).await;
    assert_eq!(r.status, 401, "expired token");
    assert!(
        r.header("www-authenticate")
            .unwrap()
            .contains("invalid_token")
    );

    // Required credentials.
    fake.set_token_auth(TokenAuth {
        required_credentials: Some(("u".into(), "p".into())),
        ..TokenAuth::default()
    });
    let t = c
        .get(&format!(
            "{base}/token?service=fake-registry&scope=repository:org/app:pull"
        ))
        .await;
    assert_eq!(t.status, 401);
    assert_eq!(fake.tokens_issued(), 4);

    fake.set_basic_auth("u", "p");
    let r = c.get(&url).await;
    assert_eq!(r.status, 401);
    assert!(r.header("www-authenticate").unwrap().starts_with("Basic "));
    assert_eq!(
        c.get_with(&url, &[("authorization", &basic)]).await.status,
        200
    );
}

#[tokio::test]
async fn redirect_to_cdn_rejects_authorization() {
    let fake = FakeRegistry::start().await;
    let cdn = FakeCdn::start(&fake).await;
    let blob = random_blob(5000);
    let d = fake.push_blob("r", blob.clone());
    fake.redirect_blobs_to(Some(&cdn));
    let c = TestClient::unpooled();
    let r = c.get(&format!("{}/v2/r/blobs/{d}", fake.url())).await;
    assert_eq!(r.status, 307);
    let loc = r.header("location").unwrap();
    assert!(loc.starts_with(&cdn.url()));
    let r = c.get(&loc).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, blob);
    let r = c.get_with(&loc, &[("authorization", "Bearer x")]).await;
    assert_eq!(r.status, 403);
    assert_eq!(cdn.gets(), 2);
    assert_eq!(cdn.requests_with_authorization(), 1);
}
