//! Logs: one line per request carrying its routing, cache result, status and bytes; one per
//! upstream call; and no password or token anywhere, at any level, in either format.

mod common;

use cachalot::config::LogFormat;
use common::*;
use tracing_subscriber::EnvFilter;

const PASSWORD: &str = "pw-never-logged-7Qx";

use common::capture::Capture;

/// Pulls an image through token auth with credentials, logging at `trace` into a buffer; returns
/// the log and the bearer tokens the fake issued.
async fn authenticated_pull(format: LogFormat, var: &str) -> (String, Vec<String>) {
    let capture = Capture::default();
    // The current-thread runtime of #[tokio::test] polls every cachalot task on this thread, so
    // a thread-local default subscriber sees them all.
    let _guard = tracing::subscriber::set_default(cachalot::telemetry::subscriber(
        format,
        EnvFilter::new("trace"),
        false,
        capture.clone(),
    ));
    let fake = FakeRegistry::start().await;
    fake.set_token_auth(TokenAuth {
        required_credentials: Some(("robot".into(), PASSWORD.into())),
        ..TokenAuth::default()
    });
    fake.set_private("org/private", 401);
    let img = fake.push_image("org/private", Some("v1"), &[1000]);
    // SAFETY: each test uses its own variable name; only cachalot reads it, after this returns.
    unsafe { std::env::set_var(var, PASSWORD) };
    let up = UpstreamSpec::new(UP, &fake.url(), true)
        .with(&format!("username = \"robot\"\npassword_env = \"{var}\""));
    let env = Env::start_on(fake, CacheSpec::default(), vec![up]).await;
    let r = env.client.get(&env.v2("org/private/manifests/v1")).await;
    assert_eq!(r.status, 200);
    let (layer, bytes) = &img.layers[0];
    let r = env
        .client
        .get(&env.v2(&format!("org/private/blobs/{layer}")))
        .await;
    assert_eq!(r.body, *bytes);
    env.wait_no_fills().await;
    let tokens: Vec<String> = env
        .fake
        .requests()
        .iter()
        .filter_map(|r| {
            r.headers
                .get("authorization")?
                .to_str()
                .ok()?
                .strip_prefix("Bearer ")
                .map(str::to_owned)
        })
        .collect();
    assert!(!tokens.is_empty(), "test bug: the pull used no token");
    (capture.text(), tokens)
}

fn assert_no_secrets(log: &str, tokens: &[String]) {
    assert!(!log.is_empty(), "nothing was logged");
    assert!(
        !log.contains(PASSWORD),
        "the password appears in the log:\n{log}"
    );
    for t in tokens {
        assert!(
            !log.contains(t.as_str()),
            "a token appears in the log:\n{log}"
        );
    }
    // Basic credentials, as sent to the token endpoint.
    let basic = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("robot:{PASSWORD}"),
    );
    assert!(!log.contains(&basic), "Basic credentials appear in the log");
}

#[tokio::test]
async fn text_logs_have_request_and_upstream_lines_and_no_secrets() {
    let (log, tokens) = authenticated_pull(LogFormat::Text, "CACHALOT_TEST_LOGS_PW_TEXT").await;
    assert_no_secrets(&log, &tokens);
    let line = log
        .lines()
        .find(|l| l.contains("route=\"manifest\"") && l.contains(" request "))
        .unwrap_or_else(|| panic!("no manifest request line:\n{log}"));
    for field in [
        "method=GET",
        "upstream=\"fake.local\"",
        "repo=\"org/private\"",
        "cache=\"miss\"",
        "status=200",
        "bytes=",
        "duration_ms=",
    ] {
        assert!(line.contains(field), "{field} missing from {line}");
    }
    let blob_line = log
        .lines()
        .find(|l| l.contains("route=\"blob\"") && l.contains(" request "))
        .unwrap_or_else(|| panic!("no blob request line:\n{log}"));
    assert!(blob_line.contains("bytes=1000"), "{blob_line}");
    assert!(blob_line.contains("complete=true"), "{blob_line}");
    assert!(
        log.lines().any(|l| l.contains("upstream call")
            && l.contains("op=\"token\"")
            && l.contains("status=200")),
        "no upstream call line for the token fetch:\n{log}"
    );
}

#[tokio::test]
async fn json_logs_are_objects_with_fields_and_no_secrets() {
    let (log, tokens) = authenticated_pull(LogFormat::Json, "CACHALOT_TEST_LOGS_PW_JSON").await;
    assert_no_secrets(&log, &tokens);
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let req = lines
        .iter()
        .find(|v| v["message"] == "request" && v["span"]["route"] == "blob")
        .unwrap_or_else(|| panic!("no blob request object:\n{log}"));
    assert_eq!(req["status"], 200);
    assert_eq!(req["bytes"], 1000);
    assert_eq!(req["span"]["cache"], "miss");
    assert_eq!(req["span"]["upstream"], "fake.local");
    assert_eq!(req["span"]["repo"], "org/private");
    assert!(
        lines
            .iter()
            .any(|v| v["message"] == "upstream call" && v["op"] == "blob" && v["status"] == 200),
        "no upstream call object for the blob"
    );
}
