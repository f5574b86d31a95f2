//! The audit trail: every pull is logged with the user (or `anonymous`), the upstream, the
//! repository and the digest served, and never with a password. Alone in its binary: it
//! captures logs with a thread-local subscriber, which tests on other threads would race.

mod common;

use common::auth_env::*;
use common::proxy::UP;

use common::capture::Capture;

#[tokio::test]
async fn every_pull_is_logged_with_user_upstream_repository_and_digest_and_no_password() {
    let capture = Capture::default();
    // The current-thread runtime of #[tokio::test] polls every cachalot task on this thread, so
    // a thread-local default subscriber sees them all.
    let _guard = tracing::subscriber::set_default(cachalot::telemetry::subscriber(
        cachalot::config::LogFormat::Json,
        tracing_subscriber::EnvFilter::new("trace"),
        false,
        capture.clone(),
    ));
    let auth = r#"anonymous = true
[[access]]
users = ["*"]
repositories = ["fake.local/team/*"]
allow = true
"#;
    let env = AuthEnv::simple(&[ALICE], auth).await;
    let img = env.fake.push_image("team/app", Some("v1"), &[100]);
    let (layer, _) = &img.layers[0];
    assert_eq!(
        env.get("/v2/team/app/manifests/v1", Some(ALICE))
            .await
            .status,
        200
    );
    let blob = format!("/v2/team/app/blobs/{layer}");
    assert_eq!(env.get(&blob, None).await.status, 200);
    assert_eq!(
        env.get("/v2/team/app/manifests/v1", Some(("alice", "wrong-pw-Zq9")))
            .await
            .status,
        401
    );
    // The request line is written when the response body is dropped, which hyper may do
    // after the client has read it: one more exchange on the connection settles that.
    env.get("/healthz", None).await;
    let log = capture.text();
    for secret in [
        ALICE.1.to_string(),
        "wrong-pw-Zq9".into(),
        basic(ALICE.0, ALICE.1),
        basic("alice", "wrong-pw-Zq9"),
    ] {
        let secret = secret.trim_start_matches("Basic ").to_string();
        assert!(!log.contains(&secret), "{secret:?} appears in the log");
    }
    let requests: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "request")
        .collect();
    let find = |route: &str, status: u64| {
        requests
            .iter()
            .find(|v| v["span"]["route"] == route && v["status"] == status)
            .unwrap_or_else(|| panic!("no {route} {status} line in {requests:#?}\n{log}"))
    };
    let m = &find("manifest", 200)["span"];
    assert_eq!(m["user"], "alice");
    assert_eq!(m["upstream"], UP);
    assert_eq!(m["repo"], "team/app");
    assert_eq!(
        m["digest"],
        img.manifest.digest.as_str(),
        "the tag's digest"
    );
    let b = &find("blob", 200)["span"];
    assert_eq!(b["user"], "anonymous");
    assert_eq!(b["repo"], "team/app");
    assert_eq!(b["digest"], layer.as_str());
    assert!(find("manifest", 401)["span"].get("user").is_none());
}
