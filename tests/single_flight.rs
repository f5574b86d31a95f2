//! Single flight: one upstream fetch per digest whatever the concurrency; followers are served
//! from the growing fill; a fill outlives its client.

mod common;

use std::time::Duration;

use common::client::{drain, read_at_least};
use common::*;
use hyper::Method;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_cold_gets_make_one_upstream_get() {
    let env = Env::start().await;
    let blob = random_blob(1024 * 1024 + 17);
    let d = env.fake.push_blob("team/app", blob.clone());
    // A slow body keeps the fill open while the fifty requests arrive.
    env.fake.set_chunk_delay(Some(Duration::from_millis(2)));
    let url = env.v2(&format!("team/app/blobs/{d}"));

    let mut tasks = vec![];
    for _ in 0..50 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            // One connection per client, like fifty nodes pulling at once.
            TestClient::unpooled().get(&url).await
        }));
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), blob.len());
        assert!(r.body == blob, "a client got wrong bytes");
    }
    assert_eq!(
        env.fake.blob_gets("team/app", &d),
        1,
        "exactly one upstream GET"
    );
}

#[tokio::test]
async fn first_bytes_reach_the_client_while_upstream_is_paused() {
    let env = Env::start().await;
    let blob = random_blob(600_000);
    let d = env.fake.push_blob("app", blob.clone());
    let gate = env.fake.pause_blob(&d, 200_000);

    let resp = env
        .client
        .send_raw(Method::GET, &env.v2(&format!("app/blobs/{d}")), &[])
        .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    // The upstream has sent 200 000 bytes and is paused: the client must already get bytes.
    let first = read_at_least(&mut body, 1).await;
    assert!(!gate.is_released(), "test bug: gate released early");
    assert!(!first.is_empty());
    assert_eq!(
        &first[..],
        &blob[..first.len()],
        "first bytes are the blob's first bytes"
    );
    gate.release();
    let rest = drain(body).await;
    assert!(rest.error.is_none(), "body error: {:?}", rest.error);
    assert_eq!([first.as_slice(), &rest.bytes].concat(), blob.to_vec());
    assert_eq!(env.fake.blob_gets("app", &d), 1);
}

#[tokio::test]
async fn followers_joining_mid_fill_get_the_whole_blob() {
    let env = Env::start().await;
    let blob = random_blob(500_000);
    let d = env.fake.push_blob("app", blob.clone());
    let gate = env.fake.pause_blob(&d, 250_000);
    let url = env.v2(&format!("app/blobs/{d}"));

    let first = {
        let url = url.clone();
        tokio::spawn(async move { TestClient::unpooled().get(&url).await })
    };
    gate.reached().await;
    // Followers join while the fill is half-way and paused.
    let followers: Vec<_> = (0..5)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { TestClient::unpooled().get(&url).await })
        })
        .collect();
    env.wait_coalesced(5).await;
    assert!(!gate.is_released(), "test bug: gate released early");
    gate.release();
    for t in std::iter::once(first).chain(followers) {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200);
        assert!(
            r.body == blob,
            "follower got {} bytes, not the blob",
            r.body.len()
        );
    }
    assert_eq!(env.fake.blob_gets("app", &d), 1);
    // Served from cache afterwards.
    let r = env.client.get(&url).await;
    assert!(r.body == blob);
    assert_eq!(env.fake.blob_gets("app", &d), 1);
}

#[tokio::test]
async fn a_client_that_disconnects_does_not_stop_the_fill() {
    let env = Env::start().await;
    let blob = random_blob(400_000);
    let d = env.fake.push_blob("app", blob.clone());
    let gate = env.fake.pause_blob(&d, 100_000);
    let url = env.v2(&format!("app/blobs/{d}"));

    let client = TestClient::unpooled();
    let resp = client.send_raw(Method::GET, &url, &[]).await;
    let mut body = resp.into_body();
    let _ = read_at_least(&mut body, 1).await;
    assert_eq!(env.metric("cachalot_followers_waiting", &[]).await, 1.0);
    drop(body);
    drop(client);
    // The proxy has dropped the response (it noticed the disconnect); a buggy one would cancel
    // the fill along with it.
    env.wait_metric("cachalot_followers_waiting", &[], 0.0)
        .await;
    assert_eq!(env.metric("cachalot_fills_in_flight", &[]).await, 1.0);
    gate.release();

    let r = env.client.get(&url).await;
    assert_eq!(r.status, 200);
    assert!(r.body == blob);
    assert_eq!(
        env.fake.blob_gets("app", &d),
        1,
        "the fill continued: no second upstream GET"
    );
    // And it is a plain cache hit now.
    let r = env.client.get(&url).await;
    assert!(r.body == blob);
    assert_eq!(env.fake.blob_gets("app", &d), 1);
}

#[tokio::test]
async fn range_requests_during_a_fill() {
    let env = Env::start().await;
    let blob = random_blob(300_000);
    let d = env.fake.push_blob("app", blob.clone());
    let gate = env.fake.pause_blob(&d, 100_000);
    let url = env.v2(&format!("app/blobs/{d}"));

    let first = {
        let url = url.clone();
        tokio::spawn(async move { TestClient::unpooled().get(&url).await })
    };
    gate.reached().await;
    let ranged = |range: &'static str| {
        let url = url.clone();
        tokio::spawn(async move {
            TestClient::unpooled()
                .get_with(&url, &[("range", range)])
                .await
        })
    };
    let within = ranged("bytes=10-19");
    let beyond = ranged("bytes=250000-250099");
    let open = ranged("bytes=299990-");
    // All three joined the paused fill; a range within what is already written may complete
    // before the fill does.
    env.wait_coalesced(3).await;
    gate.release();

    let r = within.await.unwrap();
    assert_eq!(r.status, 206);
    assert_eq!(
        r.header("content-range").as_deref(),
        Some("bytes 10-19/300000")
    );
    assert_eq!(&r.body[..], &blob[10..20]);
    let r = beyond.await.unwrap();
    assert_eq!(r.status, 206);
    assert_eq!(
        r.header("content-range").as_deref(),
        Some("bytes 250000-250099/300000")
    );
    assert_eq!(&r.body[..], &blob[250_000..250_100]);
    let r = open.await.unwrap();
    assert_eq!(r.status, 206);
    assert_eq!(
        r.header("content-range").as_deref(),
        Some("bytes 299990-299999/300000")
    );
    assert_eq!(&r.body[..], &blob[299_990..]);
    assert!(first.await.unwrap().body == blob);
    assert_eq!(env.fake.blob_gets("app", &d), 1);
}

#[tokio::test]
async fn unsatisfiable_range_during_a_fill_is_416() {
    let env = Env::start().await;
    let blob = random_blob(300_000);
    let d = env.fake.push_blob("app", blob.clone());
    let gate = env.fake.pause_blob(&d, 100_000);
    let url = env.v2(&format!("app/blobs/{d}"));
    let first = {
        let url = url.clone();
        tokio::spawn(async move { TestClient::unpooled().get(&url).await })
    };
    gate.reached().await;
    let r = {
        let url = url.clone();
        let t = tokio::spawn(async move {
            TestClient::unpooled()
                .get_with(&url, &[("range", "bytes=300000-")])
                .await
        });
        env.wait_coalesced(1).await;
        gate.release();
        t.await.unwrap()
    };
    assert_eq!(r.status, 416);
    assert!(first.await.unwrap().body == blob);
    assert_eq!(env.fake.blob_gets("app", &d), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_misses_of_one_tag_make_one_upstream_request() {
    let env = Env::start().await;
    let img = env.fake.push_image("app", Some("v1"), &[10]);
    env.fake
        .set_manifest_delay(Some(Duration::from_millis(300)));
    let url = env.v2("app/manifests/v1");
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { TestClient::unpooled().get(&url).await })
        })
        .collect();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, img.manifest.bytes);
    }
    assert_eq!(
        env.fake.count_containing("GET", "/v2/app/manifests/")
            + env.fake.count_containing("HEAD", "/v2/app/manifests/"),
        1,
        "one upstream manifest request for 20 concurrent misses of one tag: {:?}",
        env.fake
            .requests()
            .iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_misses_of_one_manifest_digest_make_one_upstream_request() {
    let env = Env::start().await;
    let img = env.fake.push_image("app", None, &[10]);
    env.fake
        .set_manifest_delay(Some(Duration::from_millis(300)));
    let url = env.v2(&format!("app/manifests/{}", img.manifest.digest));
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { TestClient::unpooled().get(&url).await })
        })
        .collect();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, img.manifest.bytes);
    }
    assert_eq!(env.fake.manifest_gets("app", &img.manifest.digest), 1);
}
