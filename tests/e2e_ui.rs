//! The page in a real browser: Debian's `chromium`, headless, loads `/ui` from a cachalot that
//! holds images skopeo pulled through it from the real `docker-registry`, and the rendered DOM
//! (`--dump-dom`) shows those images, their tags and platforms, and the hit ratio the JSON
//! gives. It also takes the screenshot the README shows: written under `target/tmp`, and copied
//! to `docs/ui.png` when `CACHALOT_UPDATE_SCREENSHOT=1`.
//!
//! Needs `chromium` besides the e2e tools (`.ci/run` installs it): without it the test prints
//! SKIPPED, and fails under `CI`.

mod e2e_support;

use e2e_support::cachalot::{Cachalot, UPSTREAM_NAME, UpstreamEntry};
use e2e_support::{MULTI_REPO, MULTI_TAG, SINGLE_REPO, SINGLE_TAG, skopeo, tools};
use std::path::Path;
use std::time::Duration;

/// Runs headless chromium with the flags this environment needs (root: no sandbox; no
/// background networking, whose connections are refused here many at a time) on a fresh
/// profile, and returns its stdout.
async fn chromium(profile: &Path, args: &[&str]) -> String {
    let mut cmd = tokio::process::Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("chromium {args:?} did not finish within 2 minutes"))
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn wait_no_fills(c: &Cachalot) {
    for _ in 0..500 {
        let m = c.metrics().await;
        if e2e_support::http::metric_sum(&m, "cachalot_fills_in_flight", &[]) == 0.0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("fills still in flight after 10s");
}

#[tokio::test]
async fn chromium_shows_the_pulled_images_and_the_hit_ratio() {
    require_e2e_tools!();
    if !tools::tools_available(&["chromium"], "apt-get install -y chromium") {
        return;
    }
    let up = e2e_support::shared_upstream();
    // A small bound and a pin, so the page has something to show for both.
    let mirror = Cachalot::start(
        &[UpstreamEntry::new(UPSTREAM_NAME, &up.url(), true)],
        &format!("max_size = \"4MiB\"\npinned = [\"{UPSTREAM_NAME}/{MULTI_REPO}:{MULTI_TAG}\"]"),
    )
    .await;
    let out = tools::tempdir("e2e-ui");
    // The multi-arch image once, the single-platform one twice: the second pull is all hits.
    for (i, (repo, tag)) in [
        (MULTI_REPO, MULTI_TAG),
        (SINGLE_REPO, SINGLE_TAG),
        (SINGLE_REPO, SINGLE_TAG),
    ]
    .into_iter()
    .enumerate()
    {
        skopeo::pull(
            &format!("{}/{repo}:{tag}", mirror.host()),
            &out.path().join(format!("pull-{i}")),
            tag,
            None,
        )
        .await;
    }
    wait_no_fills(&mirror).await;
    let overview = e2e_support::http::get(&format!("{}/ui/api/overview", mirror.url()))
        .await
        .json();
    let blob = &overview["hit_ratio"]["blob"];
    let ratio = blob["since_start"].as_f64().expect("blob lookups happened");
    assert!(ratio > 0.0 && ratio < 1.0, "{blob}");

    let profile = out.path().join("profile");
    let dom = chromium(&profile, &["--dump-dom", &format!("{}/ui", mirror.url())]).await;
    for repo in [MULTI_REPO, SINGLE_REPO] {
        assert!(
            dom.contains(&format!("{UPSTREAM_NAME}/{repo}")),
            "{repo} not in the DOM:\n{dom}"
        );
    }
    for tag in [MULTI_TAG, SINGLE_TAG] {
        assert!(
            dom.contains(&format!(r#"<span class="tag">{tag}</span>"#)),
            "{tag}"
        );
    }
    assert!(
        dom.contains("linux/amd64, linux/arm64"),
        "both platforms of the index"
    );
    assert_eq!(
        dom.matches(r#"<span class="badge">pinned</span>"#).count(),
        1,
        "the pinned image, and only it"
    );
    assert!(dom.contains(r#"<meter id="cache-meter""#));
    let shown = format!(r#"<td id="hit-blob-start">{:.1}%</td>"#, ratio * 100.0);
    assert!(dom.contains(&shown), "{shown} not in the DOM:\n{dom}");

    // With time let run (chromium's virtual time), the script refreshes the figures from the
    // JSON and marks the page; the refreshed figures are the same, nothing was pulled since.
    let dom = chromium(
        &profile,
        &[
            "--virtual-time-budget=15000",
            "--dump-dom",
            &format!("{}/ui", mirror.url()),
        ],
    )
    .await;
    assert!(
        dom.contains("data-refreshed="),
        "the script never refreshed:\n{dom}"
    );
    assert!(
        dom.contains(&shown),
        "{shown} not in the refreshed DOM:\n{dom}"
    );

    // The image page, where the script (allowed by the page's CSP) adds a copy button to each
    // pull command.
    let page = format!(
        "{}/ui/image?upstream={UPSTREAM_NAME}&repository={SINGLE_REPO}&tag={SINGLE_TAG}",
        mirror.url()
    );
    let dom = chromium(&profile, &["--dump-dom", &page]).await;
    let pull = format!("docker pull {}/{SINGLE_REPO}:{SINGLE_TAG}", mirror.host());
    assert!(dom.contains(&pull), "{pull} not in:\n{dom}");
    assert!(
        dom.contains(r#"<button type="button" class="copy""#),
        "no copy button: the script did not run\n{dom}"
    );

    let shot = out.path().join("ui.png");
    chromium(
        &profile,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,900",
            &format!("{}/ui", mirror.url()),
        ],
    )
    .await;
    let png = std::fs::read(&shot).expect("chromium wrote the screenshot");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000);
    if std::env::var_os("CACHALOT_UPDATE_SCREENSHOT").is_some_and(|v| v == "1") {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
        std::fs::create_dir_all(&docs).unwrap();
        std::fs::write(docs.join("ui.png"), &png).unwrap();
    }
    mirror.shutdown().await;
}
