//! The Garage support on its own, without cachalot: the cluster the S3 tests run against is what
//! they assume (one layout over every node, the bucket and the key's permissions seen from every
//! node, S3 answering on every node), still serves the bucket with one node of three killed, and
//! leaves nothing running when dropped.
//!
//! Needs the `garage` binary (2.5): without it the tests print why and skip, unless `CI` is set,
//! in which case they fail.

mod e2e_support;

use std::time::{Duration, Instant};

use e2e_support::garage::Garage;
use e2e_support::http;

/// The S3 port of every node answers as S3 does: an unsigned request is refused by Garage's own
/// S3 layer (not a connection error, not some other server on the port).
async fn assert_s3_answers(garage: &Garage, i: usize) {
    let url = format!("{}/{}", garage.endpoint(i), garage.bucket());
    let resp = http::request(hyper::Method::GET, &url, &[])
        .await
        .unwrap_or_else(|e| panic!("node {i}: {url}: {e}"));
    let body = String::from_utf8_lossy(&resp.body);
    assert_eq!(resp.status, 403, "node {i}: {body}");
    assert!(
        body.contains("<Code>AccessDenied</Code>") && body.contains("<Region>garage</Region>"),
        "node {i}: {body}"
    );
}

fn assert_refused(endpoint: &str) {
    let addr = endpoint.trim_start_matches("http://").parse().unwrap();
    assert!(
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err(),
        "{endpoint} still accepts connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_one_layout_one_bucket_and_one_node_may_die() {
    let Some(garage) = Garage::start(3).await else {
        return;
    };

    let layout = garage.json_api(0, "GetClusterLayout", "").await.unwrap();
    assert_eq!(layout["version"], 1, "{layout}");
    let roles = layout["roles"].as_array().expect("roles");
    let mut in_layout: Vec<&str> = roles.iter().map(|r| r["id"].as_str().unwrap()).collect();
    let mut started: Vec<&str> = (0..3).map(|i| garage.node_id(i)).collect();
    in_layout.sort_unstable();
    started.sort_unstable();
    assert_eq!(in_layout, started, "{layout}");
    for role in roles {
        // Replication factor 3 over three nodes: each node holds a copy of every partition.
        assert_eq!(role["storedPartitions"], 256, "{layout}");
    }
    for i in 0..3 {
        assert_eq!(
            garage.key_permissions(i).await,
            Ok((true, true)),
            "node {i}"
        );
        assert_s3_answers(&garage, i).await;
    }

    garage.kill(2);
    assert_refused(&garage.endpoint(2));
    assert!(
        garage.cli(2, &["status"]).await.is_err(),
        "a killed node still answers its CLI"
    );
    for i in 0..2 {
        // The survivors still read the bucket and the key, from a quorum of two (the first read
        // may wait several seconds, until the survivor's next ping finds node 2 gone) ...
        assert_eq!(
            garage.key_permissions(i).await,
            Ok((true, true)),
            "node {i}"
        );
        assert_s3_answers(&garage, i).await;
        // ... while they see the loss (so node 2 was not simply unneeded).
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let health = garage.json_api(i, "GetClusterHealth", "").await.unwrap();
            if health["status"] == "degraded" && health["storageNodesUp"] == 2 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {i} does not see node 2 gone: {health}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let endpoints: Vec<String> = (0..3).map(|i| garage.endpoint(i)).collect();
    drop(garage);
    for endpoint in &endpoints {
        assert_refused(endpoint);
    }
}

/// One node is a cluster of its own (replication factor 1), for tests that need a bucket and
/// not its replication.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_is_a_cluster_of_its_own() {
    let Some(garage) = Garage::start(1).await else {
        return;
    };
    let layout = garage.json_api(0, "GetClusterLayout", "").await.unwrap();
    assert_eq!(
        layout["roles"].as_array().map(Vec::len),
        Some(1),
        "{layout}"
    );
    assert_eq!(garage.key_permissions(0).await, Ok((true, true)));
    assert_s3_answers(&garage, 0).await;
}
