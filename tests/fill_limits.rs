//! Fills that cannot finish: an upstream that trickles below `cache.fill_min_rate`, and one
//! that never answers. Followers get the upstream's error (a cut body, a 504), never a 500 and
//! never a wait without end.

mod common;

use common::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

fn proxy_config(dir: &std::path::Path, url: &str, cache_extra: &str) -> String {
    let ups = [UpstreamSpec::new(UP, url, true).with("timeout = \"1s\"")];
    config_toml(dir, &CacheSpec::default(), &ups).replace(
        "max_size = \"1GiB\"\n",
        &format!("max_size = \"1GiB\"\n{cache_extra}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_upstream_fails_the_fill_at_its_age_limit() {
    let fake = FakeRegistry::start().await;
    let blob = random_blob(256 * 1024);
    let d = fake.push_blob("app", blob.clone());
    // 16 KiB every 200 ms: about 80 KiB/s, never idle as long as the 1 s body timeout, and a
    // correct body after 3.2 s. Only the age limit (1 s + 256 KiB at 1 MiB/s) can end it early.
    fake.set_chunk_delay(Some(Duration::from_millis(200)));
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&proxy_config(
        dir.path(),
        &fake.url(),
        "fill_min_rate = \"1MiB/s\"\n",
    ))
    .await;
    let url = format!("{}/v2/app/blobs/{d}", proxy.url());
    let client = TestClient::unpooled();

    let (status, _, drained) = client.get_drained(&url).await;
    assert_eq!(
        status, 200,
        "headers go out as soon as the upstream answered"
    );
    assert!(
        drained.error.is_some() && drained.bytes.len() < blob.len(),
        "a fill slower than fill_min_rate must be cut short, not completed ({} bytes, error {:?})",
        drained.bytes.len(),
        drained.error
    );
    let metrics = client.get(&format!("{}/metrics", proxy.url())).await.text();
    assert_eq!(metric_value(&metrics, "cachalot_fills_in_flight", &[]), 0.0);

    // The fill left the table: with the upstream at full speed, the next request fetches anew.
    fake.set_chunk_delay(None);
    let r = client.get(&url).await;
    assert_eq!(r.status, 200);
    assert!(r.body == blob);
    assert_eq!(fake.blob_gets("app", &d), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_of_a_fill_that_never_got_an_answer_get_a_504() {
    // An upstream that accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let hang = tokio::spawn({
        let accepted = accepted.clone();
        async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                held.push(s);
            }
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&proxy_config(dir.path(), &format!("http://{addr}"), "")).await;
    let d = sha256_digest(b"never sent");
    let url = format!("{}/v2/app/blobs/{d}", proxy.url());

    let clients: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { TestClient::unpooled().get(&url).await })
        })
        .collect();
    for c in clients {
        let r = c.await.unwrap();
        assert_eq!(r.status, 504, "{}", r.text());
        assert!(r.text().contains("UNAVAILABLE"), "{}", r.text());
    }
    let metrics = TestClient::new()
        .get(&format!("{}/metrics", proxy.url()))
        .await
        .text();
    let lookups = |result| {
        metric_value(
            &metrics,
            "cachalot_cache_lookups_total",
            &[("kind", "blob"), ("result", result)],
        )
    };
    // One fill, and the seven others followed it rather than each asking the upstream.
    assert_eq!((lookups("miss"), lookups("coalesced")), (1.0, 7.0));
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    hang.abort();
}
