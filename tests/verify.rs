//! Nothing unverified is stored: wrong or truncated upstream bodies never complete a client's
//! response normally, are not stored, and the next request fetches again.

mod common;

use common::*;

/// Whether a drained response completed as a normal, full 200.
fn completed_normally(
    status: hyper::StatusCode,
    headers: &hyper::HeaderMap,
    d: &common::client::Drained,
) -> bool {
    let declared = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    status == 200 && d.error.is_none() && declared.is_none_or(|n| n == d.bytes.len())
}

#[tokio::test]
async fn blob_with_wrong_bytes_is_not_served_complete_nor_stored() {
    let env = Env::start().await;
    let blob = random_blob(300_000);
    let d = env.fake.push_blob("app", blob.clone());
    env.fake.corrupt(&d, true);
    let url = env.v2(&format!("app/blobs/{d}"));

    let (status, headers, drained) = TestClient::unpooled().get_drained(&url).await;
    assert!(
        !completed_normally(status, &headers, &drained),
        "a blob whose bytes do not match its digest was served as a complete {status} ({} bytes)",
        drained.bytes.len()
    );
    assert_eq!(env.fake.blob_gets("app", &d), 1);
    assert!(
        env.stored_files(&d).is_empty(),
        "stored: {:?}",
        env.stored_files(&d)
    );
    assert!(
        env.metric("cachalot_digest_mismatches_total", &[("upstream", UP)])
            .await
            >= 1.0,
        "mismatch counted"
    );

    // The upstream heals: the next request fetches again and succeeds.
    env.fake.corrupt(&d, false);
    let r = env.client.get(&url).await;
    assert_eq!(r.status, 200);
    assert!(r.body == blob);
    assert_eq!(env.fake.blob_gets("app", &d), 2);
    assert!(!env.stored_files(&d).is_empty(), "now stored");
}

#[tokio::test]
async fn truncated_blob_is_not_served_complete_nor_stored() {
    let env = Env::start().await;
    let blob = random_blob(300_000);
    let d = env.fake.push_blob("app", blob.clone());
    env.fake.truncate(&d, Some(120_000));
    let url = env.v2(&format!("app/blobs/{d}"));

    let (status, headers, drained) = TestClient::unpooled().get_drained(&url).await;
    assert!(
        !completed_normally(status, &headers, &drained),
        "a truncated upstream body was served as a complete {status} ({} bytes)",
        drained.bytes.len()
    );
    assert!(drained.bytes.len() < blob.len());
    assert!(
        env.stored_files(&d).is_empty(),
        "stored: {:?}",
        env.stored_files(&d)
    );
    // A short body is not a digest mismatch: it has a counter of its own.
    env.wait_no_fills().await;
    let truncated = [("upstream", UP), ("reason", "truncated")];
    assert_eq!(
        env.metric("cachalot_upstream_body_errors_total", &truncated)
            .await,
        1.0
    );
    assert_eq!(
        env.metric("cachalot_digest_mismatches_total", &[("upstream", UP)])
            .await,
        0.0
    );

    env.fake.truncate(&d, None);
    let r = env.client.get(&url).await;
    assert_eq!(r.status, 200);
    assert!(r.body == blob);
    assert_eq!(
        env.fake.blob_gets("app", &d),
        2,
        "fetched again after the failure"
    );
}

#[tokio::test]
async fn wrong_bytes_abort_every_follower() {
    let env = Env::start().await;
    let blob = random_blob(300_000);
    let d = env.fake.push_blob("app", blob.clone());
    env.fake.corrupt(&d, true);
    let gate = env.fake.pause_blob(&d, 100_000);
    let url = env.v2(&format!("app/blobs/{d}"));
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { TestClient::unpooled().get_drained(&url).await })
        })
        .collect();
    gate.reached().await;
    // One started the fill, the two others follow it.
    env.wait_coalesced(2).await;
    gate.release();
    for t in tasks {
        let (status, headers, drained) = t.await.unwrap();
        assert!(
            !completed_normally(status, &headers, &drained),
            "a follower got a complete {status}"
        );
    }
    assert!(env.stored_files(&d).is_empty());
}

#[tokio::test]
async fn manifest_by_digest_with_wrong_bytes_is_an_error_and_not_stored() {
    let env = Env::start().await;
    let img = env.fake.push_image("app", None, &[10]);
    env.fake.corrupt(&img.manifest.digest, true);
    let url = env.v2(&format!("app/manifests/{}", img.manifest.digest));

    let (status, _, drained) = TestClient::unpooled().get_drained(&url).await;
    assert_ne!(status, 200, "wrong manifest bytes served as 200");
    assert!(status.is_server_error(), "status {status}");
    let body: serde_json::Value = serde_json::from_slice(&drained.bytes).expect("OCI error JSON");
    assert!(body["errors"][0]["code"].is_string(), "{body}");
    assert!(env.stored_files(&img.manifest.digest).is_empty());

    env.fake.corrupt(&img.manifest.digest, false);
    let r = env.client.get(&url).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, img.manifest.bytes);
    assert_eq!(env.fake.manifest_gets("app", &img.manifest.digest), 2);
}

#[tokio::test]
async fn an_upstream_that_hangs_mid_body_fails_the_response_and_stores_nothing() {
    let env = Env::start_with(CacheSpec::default(), "timeout = \"1s\"").await;
    let blob = random_blob(300_000);
    let d = env.fake.push_blob("app", blob.clone());
    // Paused forever (until the test unpauses): the idle-body timeout must end the fill.
    let gate = env.fake.pause_blob(&d, 100_000);
    let url = env.v2(&format!("app/blobs/{d}"));

    let (status, headers, drained) = TestClient::unpooled().get_drained(&url).await;
    assert!(gate.is_reached());
    assert!(!gate.is_released());
    assert!(
        !completed_normally(status, &headers, &drained),
        "a hung upstream body gave a complete {status}"
    );
    assert!(
        drained.error.as_deref() != Some("safety timeout while reading the body"),
        "the client was held until the test's safety net: no idle-body timeout"
    );
    assert!(env.stored_files(&d).is_empty());

    env.fake.unpause_blob(&d);
    let r = env.client.get(&url).await;
    assert_eq!(r.status, 200);
    assert!(r.body == blob);
    assert_eq!(env.fake.blob_gets("app", &d), 2);
}
