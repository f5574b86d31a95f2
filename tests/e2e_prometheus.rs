//! End to end with a real Prometheus (Debian's `prometheus` package): it scrapes an in-process
//! cachalot with the scrape config from deploy/prometheus/, and after a scripted series of pulls
//! every PromQL expression of the Grafana dashboard and the alert rules evaluates, through the
//! HTTP API, to the value the pulls imply. `promtool` checks the rules and the config.
//!
//! Needs `prometheus` and `promtool` in PATH: without them the tests print why and skip, unless
//! `CI` is set, in which case they fail.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const TOOLS: [&str; 2] = ["prometheus", "promtool"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn find(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Same policy as the other e2e tests: skip with a visible message, but fail under CI.
fn tools_available() -> bool {
    let missing: Vec<&str> = TOOLS
        .iter()
        .copied()
        .filter(|t| find(t).is_none())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let test = std::thread::current().name().unwrap_or("?").to_owned();
    let msg = format!(
        "{test}: required program(s) not found in PATH: {}. Install them with `apt-get install -y prometheus`.",
        missing.join(", ")
    );
    if std::env::var_os("CI").is_some() {
        panic!("{msg} CI is set, so this is a failure, not a skip.");
    }
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {msg} (CI is unset, so the test is skipped.)"
    );
    false
}

/// deploy/prometheus/ copied into `dir`, with the target and intervals rewritten for a test.
fn write_config(dir: &Path, target: &str) -> PathBuf {
    let src = root().join("deploy/prometheus");
    let yml = std::fs::read_to_string(src.join("prometheus.yml")).unwrap();
    assert!(
        yml.contains("\"cachalot:5000\""),
        "scrape target placeholder moved"
    );
    let yml = yml
        .replace("\"cachalot:5000\"", &format!("{target:?}"))
        .replace("scrape_interval: 15s", "scrape_interval: 1s")
        .replace("evaluation_interval: 15s", "evaluation_interval: 1s");
    let path = dir.join("prometheus.yml");
    std::fs::write(&path, yml).unwrap();
    std::fs::copy(
        src.join("cachalot-alerts.yml"),
        dir.join("cachalot-alerts.yml"),
    )
    .unwrap();
    path
}

fn promtool(args: &[&str]) -> std::process::Output {
    Command::new("promtool")
        .args(args)
        .output()
        .expect("run promtool")
}

#[test]
fn promtool_accepts_the_rules_and_the_config() {
    if !tools_available() {
        return;
    }
    let rules = root().join("deploy/prometheus/cachalot-alerts.yml");
    let out = promtool(&["check", "rules", rules.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "127.0.0.1:5000");
    let out = promtool(&["check", "config", cfg.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A Prometheus process, killed on drop.
struct Prometheus {
    child: Child,
    url: String,
    /// Evaluation time for every query once set: rates extrapolate to the evaluation instant,
    /// so comparing queries needs one instant.
    at: parking_lot::Mutex<Option<f64>>,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let cfg = write_config(dir.path(), target);
        // Bind-and-release for a free port; Prometheus binds it a moment later.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            at: parking_lot::Mutex::new(None),
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Evaluates `expr` now: each series' labels (without `__name__`) and value.
    async fn query(&self, client: &TestClient, expr: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        let mut q = form_urlencoded::Serializer::new(String::new());
        q.append_pair("query", expr);
        if let Some(at) = *self.at.lock() {
            q.append_pair("time", &format!("{at:.3}"));
        }
        let q = q.finish();
        let r = client.get(&format!("{}/api/v1/query?{q}", self.url)).await;
        let v = r.json();
        assert_eq!(v["status"], "success", "{expr}: {v}");
        assert_eq!(v["data"]["resultType"], "vector", "{expr}");
        v["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let labels = s["metric"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .filter(|(k, _)| *k != "__name__")
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                    .collect();
                let value = s["value"][1].as_str().unwrap().parse::<f64>().unwrap();
                (labels, value)
            })
            .collect()
    }

    /// Waits until `expr` evaluates to a single series equal to `want`.
    async fn wait_for(&self, client: &TestClient, expr: &str, want: f64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            // The test client panics on a refused connection: probe the port first.
            let listening = tokio::net::TcpStream::connect(self.url.trim_start_matches("http://"))
                .await
                .is_ok();
            if listening
                && client
                    .send_raw(hyper::Method::GET, &format!("{}/-/ready", self.url), &[])
                    .await
                    .status()
                    == 200
            {
                let got = self.query(client, expr).await;
                if got.len() == 1 && got[0].1 == want {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{expr} never reached {want}; prometheus log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// What a query must return.
enum Expect {
    /// Exactly these series (matched by the listed labels), each with this check.
    Series(Vec<(Vec<(&'static str, &'static str)>, Check)>),
    /// Nothing (the alert does not fire, or the metric does not exist).
    Empty,
    /// Every series (if any: the metric comes from the cache lifecycle code) is zero.
    AllZero,
}

#[derive(Clone, Copy)]
enum Check {
    Exact(f64),
    /// A per-second rate of `n` events: `n` times the rate of one event, which the test
    /// measures on the lookup counter (every series shares Prometheus's extrapolation).
    Rate(f64),
    /// `increase()` over the alert window of `n` events.
    Increase(f64),
    /// A latency quantile: finite and within the histogram's range.
    Latency,
    /// Either the metric is absent (it comes from another module) or its value is sane.
    IfPresent,
    /// A ratio over series that exist at zero and saw no traffic: 0/0, NaN.
    NoTraffic,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_and_alert_expression_matches_the_pulls() {
    if !tools_available() {
        return;
    }
    let env = Env::start().await;
    let img = env.fake.push_image("app", Some("v1"), &[3000]);
    let (layer, layer_bytes) = img.layers[0].clone();
    let (m, l) = (img.manifest.bytes.len() as f64, layer_bytes.len() as f64);
    env.fake.set_extra_headers(&[
        ("ratelimit-limit", "100;w=21600"),
        ("ratelimit-remaining", "5;w=21600"),
    ]);

    let target = env.proxy.url().trim_start_matches("http://").to_owned();
    let prom = Prometheus::start(&target);
    let client = TestClient::new();
    // Prometheus has scraped the pre-created zeros before any pull.
    prom.wait_for(&client, "up{job=\"cachalot\"}", 1.0).await;
    prom.wait_for(
        &client,
        "count_over_time(cachalot_fills_in_flight[1m])",
        2.0,
    )
    .await;

    // The script: manifests 1 hit + 3 misses (two of them upstream failures: a 503 and a 429),
    // blobs 3 hits + 1 miss.
    let get = |path: String| {
        let url = env.v2(&path);
        let client = env.client.clone();
        async move { client.get(&url).await }
    };
    assert_eq!(get("app/manifests/v1".into()).await.status, 200);
    assert_eq!(get("app/manifests/v1".into()).await.status, 200);
    for i in 0..4 {
        let r = get(format!("app/blobs/{layer}")).await;
        assert_eq!(r.body, layer_bytes);
        if i == 0 {
            env.wait_no_fills().await;
        }
    }
    env.fake
        .set_status_fault(Some(StatusFault::all(503).on_path("/broken/")));
    assert_eq!(get("broken/manifests/v1".into()).await.status, 502);
    env.fake.set_status_fault(Some(
        StatusFault::too_many_requests(30).on_path("/limited/"),
    ));
    assert_eq!(get("limited/manifests/v1".into()).await.status, 429);
    env.fake.set_status_fault(None);

    // The counts as cachalot itself reports them must be the script's, before checking what
    // Prometheus computes from them.
    let text = env.metrics().await;
    for (code, n) in [("200", 2.0), ("503", 1.0), ("429", 1.0)] {
        assert_eq!(
            metric_value(&text, "cachalot_upstream_requests_total", &[("code", code)]),
            n,
            "upstream requests with code {code}"
        );
    }
    assert_eq!(
        metric_value(&text, "cachalot_upstream_requests_total", &[]),
        4.0
    );
    prom.wait_for(&client, "sum(cachalot_cache_lookups_total)", 8.0)
        .await;
    prom.wait_for(
        &client,
        "sum(cachalot_served_bytes_total)",
        2.0 * m + 4.0 * l,
    )
    .await;
    prom.wait_for(&client, "sum(cachalot_upstream_requests_total)", 4.0)
        .await;

    *prom.at.lock() = Some(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64(),
    );
    // The rate of one event, as Prometheus extrapolates it over the window at that instant.
    let one = prom
        .query(&client, "sum(rate(cachalot_cache_lookups_total[5m]))")
        .await[0]
        .1
        / 8.0;
    let one_increase = prom
        .query(&client, "sum(increase(cachalot_cache_lookups_total[10m]))")
        .await[0]
        .1
        / 8.0;
    assert!(one > 0.0 && one_increase >= 1.0, "{one} {one_increase}");

    let up = [("upstream", UP)];
    let kind = |k: &'static str| vec![("kind", k)];
    let expectations: Vec<(&str, Expect)> = vec![
        (
            "1 - sum by (kind) (rate(cachalot_cache_lookups_total{result=\"miss\"}[5m])) / sum by (kind) (rate(cachalot_cache_lookups_total[5m]))",
            Expect::Series(vec![
                (kind("blob"), Check::Exact(0.75)),
                (kind("manifest"), Check::Exact(0.25)),
                // No tags list was asked for: 0/0.
                (kind("tags"), Check::NoTraffic),
                (kind("referrers"), Check::NoTraffic),
            ]),
        ),
        (
            "sum by (kind, result) (rate(cachalot_cache_lookups_total[5m]))",
            Expect::Series(
                [
                    ("blob", "hit", 3.0),
                    ("blob", "miss", 1.0),
                    ("manifest", "hit", 1.0),
                    ("manifest", "miss", 3.0),
                    ("blob", "coalesced", 0.0),
                    ("blob", "stale", 0.0),
                    ("blob", "revalidated", 0.0),
                    ("blob", "peer", 0.0),
                    ("blob", "bucket", 0.0),
                    ("manifest", "coalesced", 0.0),
                    ("manifest", "stale", 0.0),
                    ("manifest", "revalidated", 0.0),
                    ("manifest", "peer", 0.0),
                    ("manifest", "bucket", 0.0),
                    ("tags", "hit", 0.0),
                    ("tags", "miss", 0.0),
                    ("tags", "coalesced", 0.0),
                    ("tags", "stale", 0.0),
                    ("tags", "revalidated", 0.0),
                    ("tags", "peer", 0.0),
                    ("tags", "bucket", 0.0),
                ]
                .into_iter()
                .chain(lookup_results().map(|r| ("referrers", r, 0.0)))
                .map(|(k, r, n)| (vec![("kind", k), ("result", r)], Check::Rate(n)))
                .collect(),
            ),
        ),
        (
            "sum(rate(cachalot_served_bytes_total{source=~\"cache|fill\"}[5m])) - sum(rate(cachalot_upstream_bytes_total[5m]))",
            Expect::Series(vec![(vec![], Check::Rate(m + 3.0 * l))]),
        ),
        (
            "1 - sum(rate(cachalot_upstream_bytes_total[5m])) / sum(rate(cachalot_served_bytes_total{source=~\"cache|fill\"}[5m]))",
            Expect::Series(vec![(
                vec![],
                Check::Exact(1.0 - (m + l) / (2.0 * m + 4.0 * l)),
            )]),
        ),
        (
            "sum by (upstream) (rate(cachalot_upstream_bytes_total[5m]))",
            Expect::Series(vec![(up.to_vec(), Check::Rate(m + l))]),
        ),
        (
            "sum by (upstream, code) (rate(cachalot_upstream_requests_total[5m]))",
            Expect::Series(
                [
                    ("200", 2.0),
                    ("503", 1.0),
                    ("429", 1.0),
                    ("401", 0.0),
                    ("404", 0.0),
                    ("500", 0.0),
                    ("502", 0.0),
                    ("504", 0.0),
                    ("error", 0.0),
                ]
                .into_iter()
                .map(|(c, n)| (vec![("upstream", UP), ("code", c)], Check::Rate(n)))
                .collect(),
            ),
        ),
        (
            "sum by (upstream) (rate(cachalot_upstream_requests_total{code=~\"5..|error\"}[5m])) / sum by (upstream) (rate(cachalot_upstream_requests_total[5m]))",
            Expect::Series(vec![(up.to_vec(), Check::Exact(0.25))]),
        ),
        (
            "sum by (upstream) (rate(cachalot_upstream_rate_limited_total[5m]))",
            Expect::Series(vec![(up.to_vec(), Check::Rate(1.0))]),
        ),
        (
            "cachalot_upstream_ratelimit_remaining / cachalot_upstream_ratelimit_limit",
            Expect::Series(vec![(up.to_vec(), Check::Exact(0.05))]),
        ),
        (
            "histogram_quantile(0.5, sum by (le, route) (rate(cachalot_request_duration_seconds_bucket[5m])))",
            latency_by("route"),
        ),
        (
            "histogram_quantile(0.99, sum by (le, route) (rate(cachalot_request_duration_seconds_bucket[5m])))",
            latency_by("route"),
        ),
        (
            "histogram_quantile(0.5, sum by (le, source) (rate(cachalot_blob_first_byte_seconds_bucket[5m])))",
            Expect::Series(vec![
                (vec![("source", "cache")], Check::Latency),
                (vec![("source", "fill")], Check::Latency),
            ]),
        ),
        (
            "histogram_quantile(0.99, sum by (le, source) (rate(cachalot_blob_first_byte_seconds_bucket[5m])))",
            Expect::Series(vec![
                (vec![("source", "cache")], Check::Latency),
                (vec![("source", "fill")], Check::Latency),
            ]),
        ),
        (
            "histogram_quantile(0.99, sum by (le, upstream) (rate(cachalot_upstream_first_byte_seconds_bucket[5m])))",
            Expect::Series(vec![(up.to_vec(), Check::Latency)]),
        ),
        (
            "cachalot_fills_in_flight",
            Expect::Series(vec![(vec![], Check::Exact(0.0))]),
        ),
        (
            "cachalot_followers_waiting",
            Expect::Series(vec![(vec![], Check::Exact(0.0))]),
        ),
        (
            "sum by (upstream) (increase(cachalot_digest_mismatches_total[5m]))",
            Expect::Series(vec![(up.to_vec(), Check::Exact(0.0))]),
        ),
        (
            "sum by (upstream) (increase(cachalot_token_fetches_total{result=\"error\"}[5m]))",
            Expect::Series(vec![(up.to_vec(), Check::Exact(0.0))]),
        ),
        // Pre-created at zero for each reason; the pulls here are all whole.
        (
            "sum by (upstream, reason) (increase(cachalot_upstream_body_errors_total[5m]))",
            Expect::Series(vec![
                (
                    vec![("upstream", UP), ("reason", "truncated")],
                    Check::Exact(0.0),
                ),
                (
                    vec![("upstream", UP), ("reason", "protocol")],
                    Check::Exact(0.0),
                ),
            ]),
        ),
        (
            "cachalot_cache_size_bytes",
            Expect::Series(vec![(vec![], Check::IfPresent)]),
        ),
        (
            "cachalot_cache_max_size_bytes",
            Expect::Series(vec![(vec![], Check::Exact((1u64 << 30) as f64))]),
        ),
        (
            "cachalot_cache_objects",
            Expect::Series(vec![(vec![], Check::IfPresent)]),
        ),
        // No evictions: a 1GiB cache holding a few KiB.
        (
            "sum by (reason) (rate(cachalot_evictions_total[5m]))",
            Expect::AllZero,
        ),
        // Alerts.
        (
            "sum by (upstream) (rate(cachalot_upstream_requests_total{code=~\"5..|error\"}[5m])) / sum by (upstream) (rate(cachalot_upstream_requests_total[5m])) > 0.1",
            Expect::Series(vec![(up.to_vec(), Check::Exact(0.25))]),
        ),
        (
            "sum by (kind) (rate(cachalot_cache_lookups_total{result=\"miss\"}[15m])) / sum by (kind) (rate(cachalot_cache_lookups_total[15m])) > 0.5 and on (kind) sum by (kind) (increase(cachalot_cache_lookups_total[15m])) > 3",
            Expect::Series(vec![(kind("manifest"), Check::Exact(0.75))]),
        ),
        (
            "cachalot_upstream_ratelimit_remaining / cachalot_upstream_ratelimit_limit < 0.1",
            Expect::Series(vec![(up.to_vec(), Check::Exact(0.05))]),
        ),
        (
            "sum by (upstream) (increase(cachalot_upstream_rate_limited_total[10m])) > 0",
            Expect::Series(vec![(up.to_vec(), Check::Increase(1.0))]),
        ),
        // No upstream of this test has a credential helper: nothing failed.
        (
            "sum by (upstream) (increase(cachalot_upstream_credential_runs_total{result=\"error\"}[15m])) > 0",
            Expect::Empty,
        ),
        // Not firing whether or not the lifecycle code exports the cache size.
        (
            "cachalot_cache_size_bytes / cachalot_cache_max_size_bytes > 0.9",
            Expect::Empty,
        ),
        // Nothing in this cache was damaged (tests/integrity.rs damages caches).
        (
            "sum (increase(cachalot_quarantined_total[1h])) + sum (increase(cachalot_scrub_corrupt_total[1h])) > 0",
            Expect::Empty,
        ),
    ];

    // Every expression shipped in deploy/ has an expectation here, and nothing else is checked.
    let shipped = shipped_expressions();
    let checked: Vec<String> = expectations.iter().map(|(e, _)| e.to_string()).collect();
    for e in &shipped {
        assert!(
            checked.contains(e),
            "no expectation for shipped expression: {e}"
        );
    }
    for e in &checked {
        assert!(
            shipped.contains(e),
            "expectation for an expression not shipped: {e}"
        );
    }

    let size_exported = text.contains("cachalot_cache_size_bytes");
    let mut failures = vec![];
    for (expr, expect) in &expectations {
        let got = prom.query(&client, expr).await;
        if let Err(e) = check(&got, expect, one, one_increase, size_exported) {
            failures.push(format!("{expr}\n  {e}\n  got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn latency_by(label: &'static str) -> Expect {
    Expect::Series(
        ["manifest", "blob"]
            .into_iter()
            .map(|r| (vec![(label, r)], Check::Latency))
            .collect(),
    )
}

fn check(
    got: &[(BTreeMap<String, String>, f64)],
    expect: &Expect,
    one: f64,
    one_increase: f64,
    size_exported: bool,
) -> Result<(), String> {
    let want = match expect {
        Expect::Empty => {
            return if got.is_empty() {
                Ok(())
            } else {
                Err("expected no series".into())
            };
        }
        Expect::AllZero => {
            return if got.iter().all(|(_, v)| *v == 0.0) {
                Ok(())
            } else {
                Err("expected only zeros".into())
            };
        }
        Expect::Series(w) => w,
    };
    let optional = want.iter().all(|(_, c)| matches!(c, Check::IfPresent));
    if optional && !size_exported {
        return if got.is_empty() {
            Ok(())
        } else {
            Err("expected no series yet".into())
        };
    }
    let latency = want.iter().any(|(_, c)| matches!(c, Check::Latency));
    for (labels, c) in want {
        let found: Vec<f64> = got
            .iter()
            .filter(|(l, _)| {
                labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(v))
            })
            .map(|(_, v)| *v)
            .collect();
        let [v] = found[..] else {
            return Err(format!("{} series match {labels:?}", found.len()));
        };
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1.0);
        let ok = match *c {
            Check::Exact(x) => close(v, x),
            Check::Rate(n) => close(v, n * one),
            Check::Increase(n) => close(v, n * one_increase),
            Check::Latency => v.is_finite() && v > 0.0 && v <= 10.0,
            Check::IfPresent => v.is_finite() && v >= 0.0,
            Check::NoTraffic => v.is_nan(),
        };
        if !ok {
            return Err(format!(
                "{labels:?}: {v} fails {}",
                describe(*c, one, one_increase)
            ));
        }
    }
    // Latency quantiles of routes without traffic are NaN; other queries list every series.
    if !latency && got.len() != want.len() {
        return Err(format!("{} series, expected {}", got.len(), want.len()));
    }
    Ok(())
}

/// Every lookup result, as the referrers kind (no request asks for one here) has them at zero.
fn lookup_results() -> impl Iterator<Item = &'static str> {
    [
        "hit",
        "miss",
        "coalesced",
        "stale",
        "revalidated",
        "peer",
        "bucket",
    ]
    .into_iter()
}

fn describe(c: Check, one: f64, one_increase: f64) -> String {
    match c {
        Check::Exact(x) => format!("== {x}"),
        Check::Rate(n) => format!("== {n} events/s-equivalent ({})", n * one),
        Check::Increase(n) => format!("== increase of {n} ({})", n * one_increase),
        Check::Latency => "finite, in (0, 10]".into(),
        Check::IfPresent => "finite >= 0".into(),
        Check::NoTraffic => "NaN (no traffic)".into(),
    }
}

/// Every PromQL expression in the dashboard (with Grafana's `$__rate_interval` as 5m) and in the
/// alert rules.
fn shipped_expressions() -> Vec<String> {
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/grafana/cachalot.json")).unwrap(),
    )
    .unwrap();
    let mut out = vec![];
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            out.push(
                t["expr"]
                    .as_str()
                    .unwrap()
                    .replace("$__rate_interval", "5m"),
            );
        }
    }
    let rules =
        std::fs::read_to_string(root().join("deploy/prometheus/cachalot-alerts.yml")).unwrap();
    for line in rules.lines() {
        if let Some(e) = line.trim().strip_prefix("expr:") {
            out.push(e.trim().to_owned());
        }
    }
    assert!(out.len() >= 20, "too few expressions found: {out:?}");
    out.sort();
    out.dedup();
    out
}
