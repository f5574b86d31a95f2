//! Tags lists and `/v2/_catalog` as the spec pages them, whatever the upstream does: one
//! upstream walk per `tag_ttl` however the client pages, `Link`s in the client's own name and
//! routing, a bound on what is kept, stale lists with a `Warning` when the upstream fails,
//! listings offline, and garbage from the upstream or the client.

mod common;

use std::time::Duration;

use common::auth_env::AuthEnv;
use common::*;

const TTL: &str = "1s";
const PAST_TTL: Duration = Duration::from_millis(1500);

fn tag_list_requests(env: &Env, repo: &str) -> usize {
    env.fake.count("GET", &format!("/v2/{repo}/tags/list"))
}

fn tags_of(r: &Resp) -> Vec<String> {
    let j = r.json();
    j["tags"]
        .as_array()
        .unwrap_or_else(|| panic!("no tags array: {j}"))
        .iter()
        .map(|t| t.as_str().unwrap().to_owned())
        .collect()
}

fn set_tags(env: &Env, repo: &str, tags: impl IntoIterator<Item = String>) {
    let image = env.fake.push_image(repo, None, &[4]);
    for t in tags {
        env.fake.set_tag(repo, &t, &image.manifest.digest);
    }
}

/// `</v2/...>; rel="next"` -> `/v2/...`.
fn link_target(r: &Resp) -> Option<String> {
    let l = r.header("link")?;
    assert!(l.ends_with("; rel=\"next\""), "{l}");
    Some(l[l.find('<').unwrap() + 1..l.find('>').unwrap()].to_owned())
}

async fn env_short_ttl() -> Env {
    Env::start_with(
        CacheSpec {
            tag_ttl: TTL.into(),
            offline: false,
        },
        "",
    )
    .await
}

#[tokio::test]
async fn a_client_paging_10000_tags_by_100_costs_the_upstream_one_walk() {
    let env = Env::start().await;
    // Unpadded numbers, so that lexical order is not insertion order.
    let mut want: Vec<String> = (0..10_000).map(|i| format!("v{i}")).collect();
    set_tags(&env, "big/app", want.clone());
    want.sort();
    // The upstream pages by itself (as Docker Hub does): the walk follows its Links.
    env.fake.set_tags_page_size(Some(1000));
    let mut got = Vec::new();
    let mut next = Some("/v2/big/app/tags/list?n=100".to_owned());
    let mut pages = 0;
    while let Some(path) = next {
        let r = env.client.get(&env.url(&path)).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(r.json()["name"], "big/app");
        let page = tags_of(&r);
        assert!(page.len() <= 100, "{path}: {} tags", page.len());
        got.extend(page);
        next = link_target(&r);
        if let Some(n) = &next {
            assert!(n.starts_with("/v2/big/app/tags/list?n=100&last="), "{n}");
        }
        pages += 1;
    }
    assert_eq!(pages, 100);
    assert_eq!(got, want, "every tag once, in lexical order");
    assert_eq!(
        tag_list_requests(&env, "big/app"),
        10,
        "one walk of the upstream's 10 pages"
    );
    // Without n: the whole list, no Link, still no new walk.
    let r = env.client.get(&env.v2("big/app/tags/list")).await;
    assert_eq!(tags_of(&r), want);
    assert_eq!(r.header("link"), None);
    assert_eq!(tag_list_requests(&env, "big/app"), 10);
}

#[tokio::test]
async fn n_zero_last_past_the_end_and_bad_n() {
    let env = Env::start().await;
    set_tags(&env, "app", ["a", "b", "c"].map(String::from));
    for bad in ["n=-1", "n=abc", "n=", "n=1e3"] {
        let r = env
            .client
            .get(&env.v2(&format!("app/tags/list?{bad}")))
            .await;
        assert_eq!(r.status, 400, "{bad}");
        assert_eq!(
            r.error_code().as_deref(),
            Some("PAGINATION_NUMBER_INVALID"),
            "{bad}"
        );
        assert!(r.error_message().unwrap().contains("n="), "{bad}");
    }
    assert_eq!(env.fake.total(), 0, "a bad n never reaches upstream");
    let r = env.client.get(&env.v2("app/tags/list?n=0")).await;
    assert_eq!(r.status, 200);
    assert!(tags_of(&r).is_empty());
    assert_eq!(r.header("link"), None, "n=0: no Link");
    let r = env.client.get(&env.v2("app/tags/list?last=zzz")).await;
    assert!(tags_of(&r).is_empty());
    assert_eq!(r.header("link"), None);
    let r = env.client.get(&env.v2("app/tags/list?n=2&last=a")).await;
    assert_eq!(tags_of(&r), ["b", "c"]);
    assert_eq!(r.header("link"), None, "nothing follows c");
    let r = env.client.get(&env.v2("app/tags/list?n=3")).await;
    assert_eq!(tags_of(&r), ["a", "b", "c"]);
    assert_eq!(r.header("link"), None, "exactly n left: no Link");
    let h = env.client.head(&env.v2("app/tags/list?n=1")).await;
    assert_eq!(h.status, 200);
    assert!(h.body.is_empty());
    assert_eq!(
        h.header("link").as_deref(),
        Some("</v2/app/tags/list?n=1&last=a>; rel=\"next\"")
    );
}

#[tokio::test]
async fn links_keep_the_clients_name_prefix_and_ns() {
    let env = Env::start().await;
    set_tags(&env, "org/app", ["a", "b", "c"].map(String::from));
    let r = env
        .client
        .get(&env.v2(&format!("{UP}/org/app/tags/list?n=1")))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["name"], format!("{UP}/org/app"));
    assert_eq!(
        link_target(&r).unwrap(),
        format!("/v2/{UP}/org/app/tags/list?n=1&last=a")
    );
    let r = env
        .client
        .get(&env.v2(&format!("org/app/tags/list?n=1&last=a&ns={UP}")))
        .await;
    assert_eq!(tags_of(&r), ["b"]);
    assert_eq!(r.json()["name"], "org/app");
    assert_eq!(
        link_target(&r).unwrap(),
        format!("/v2/org/app/tags/list?n=1&last=b&ns={UP}")
    );
    assert_eq!(tag_list_requests(&env, "org/app"), 1);
}

#[tokio::test]
async fn a_list_past_the_bound_is_answered_from_its_first_part() {
    let env = Env::start().await;
    let all: Vec<String> = (0..100_005).map(|i| format!("t{i:06}")).collect();
    set_tags(&env, "huge", all.clone());
    env.fake.set_tags_page_size(Some(25_000));
    let r = env
        .client
        .get(&env.v2("huge/tags/list?n=2&last=t099997"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(tags_of(&r), ["t099998", "t099999"]);
    assert_eq!(r.header("link"), None, "the kept list ends at 100,000 tags");
    assert_eq!(
        tag_list_requests(&env, "huge"),
        4,
        "the walk stopped at the bound"
    );
}

/// The other bound, 16 MiB of pages: here names too long to be tags (dropped, but read) sit
/// between the tags, about 1 MB a page of 2,000, and the walk stops at the page that would pass
/// the bound. The list is what came before it, in order.
#[tokio::test]
async fn a_list_past_its_byte_bound_is_answered_from_its_first_part() {
    let env = Env::start().await;
    let filler = "x".repeat(1000);
    let mut all = Vec::new();
    for i in 0..20_000 {
        all.push(format!("b{i:05}"));
        all.push(format!("b{i:05}{filler}"));
    }
    set_tags(&env, "wide", all);
    env.fake.set_tags_page_size(Some(2_000));
    let r = env.client.get(&env.v2("wide/tags/list")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let got = tags_of(&r);
    assert!(
        (15_000..20_000).contains(&got.len()),
        "about 16 pages of 1,000 tags: {}",
        got.len()
    );
    let want: Vec<String> = (0..got.len()).map(|i| format!("b{i:05}")).collect();
    assert!(got == want, "the first part of the list, in order");
    assert_eq!(r.header("link"), None);
    let pages = tag_list_requests(&env, "wide");
    assert!(pages < 20, "the walk stopped at the bound: {pages} pages");
}

#[tokio::test]
async fn garbage_and_links_elsewhere_from_the_upstream() {
    let env = Env::start().await;
    set_tags(&env, "app", ["a"].map(String::from));
    env.fake
        .set_tags_override(Some((None, b"<html>not a tags list</html>")));
    let r = env.client.get(&env.v2("app/tags/list")).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.error_code().is_some(), "an OCI error: {}", r.text());

    // A Link to another host, or another repository, is not followed.
    for link in [
        "<http://127.0.0.1:1/v2/app/tags/list?last=b>; rel=\"next\"",
        "</v2/other/tags/list?last=b>; rel=\"next\"",
    ] {
        let env = Env::start().await;
        env.fake.set_tags_override(Some((
            Some(link),
            br#"{"name":"app","tags":["b","a","not a tag","a"]}"#,
        )));
        let r = env.client.get(&env.v2("app/tags/list")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(tags_of(&r), ["a", "b"], "sorted, deduplicated, tags only");
        assert_eq!(r.header("link"), None);
        assert_eq!(env.fake.total(), 1, "{link}: not followed");
    }
}

async fn stale_list_is_served_when(fail: impl AsyncFnOnce(&Env)) {
    let env = env_short_ttl().await;
    set_tags(&env, "app", ["a", "b"].map(String::from));
    let r = env.client.get(&env.v2("app/tags/list")).await;
    assert_eq!(tags_of(&r), ["a", "b"]);
    assert_eq!(r.header("warning"), None);
    env.fake.set_tag(
        "app",
        "c",
        &env.fake.push_image("app", None, &[4]).manifest.digest,
    );
    fail(&env).await;
    tokio::time::sleep(PAST_TTL).await;
    let r = env.client.get(&env.v2("app/tags/list?n=1")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(tags_of(&r), ["a"]);
    assert!(
        r.header("warning")
            .is_some_and(|w| w.starts_with("299 - \"")),
        "{:?}",
        r.header("warning")
    );
    assert_eq!(
        link_target(&r).as_deref(),
        Some("/v2/app/tags/list?n=1&last=a")
    );
    let stale = env
        .metric(
            "cachalot_cache_lookups_total",
            &[("kind", "tags"), ("result", "stale")],
        )
        .await;
    assert!(stale >= 1.0, "stale counted: {stale}");
}

#[tokio::test]
async fn stale_list_served_on_503() {
    stale_list_is_served_when(async |env: &Env| {
        env.fake.set_status_fault(Some(StatusFault::all(503)))
    })
    .await;
}

#[tokio::test]
async fn stale_list_served_on_429() {
    stale_list_is_served_when(async |env: &Env| {
        env.fake
            .set_status_fault(Some(StatusFault::too_many_requests(30)))
    })
    .await;
}

#[tokio::test]
async fn stale_list_served_when_upstream_refuses_connections() {
    stale_list_is_served_when(async |env: &Env| env.fake.stop().await).await;
}

#[tokio::test]
async fn stale_list_served_when_upstream_hangs() {
    stale_list_is_served_when(async |env: &Env| env.fake.set_hang(true)).await;
}

#[tokio::test]
async fn a_fresh_list_is_walked_again_after_the_ttl() {
    let env = env_short_ttl().await;
    set_tags(&env, "app", ["a"].map(String::from));
    assert_eq!(
        tags_of(&env.client.get(&env.v2("app/tags/list")).await),
        ["a"]
    );
    env.fake.set_tag(
        "app",
        "b",
        &env.fake.push_image("app", None, &[4]).manifest.digest,
    );
    assert_eq!(
        tags_of(&env.client.get(&env.v2("app/tags/list")).await),
        ["a"]
    );
    tokio::time::sleep(PAST_TTL).await;
    assert_eq!(
        tags_of(&env.client.get(&env.v2("app/tags/list")).await),
        ["a", "b"]
    );
    assert_eq!(tag_list_requests(&env, "app"), 2);
}

#[tokio::test]
async fn offline_and_refused_listings_come_from_the_cache() {
    let mut env = Env::start().await;
    let img = env.fake.push_image("app", Some("v1"), &[4]);
    env.fake.set_tag("app", "v2", &img.manifest.digest);
    env.fake.push_image("listed", Some("x"), &[4]);
    env.fake.set_tag(
        "listed",
        "y",
        &env.fake.push_image("listed", None, &[4]).manifest.digest,
    );
    // `app`: only a tag pulled; `listed`: its list fetched, and one of its two tags pulled.
    for pulled in ["app/manifests/v1", "listed/manifests/x"] {
        assert_eq!(env.client.get(&env.v2(pulled)).await.status, 200);
    }
    assert_eq!(
        tags_of(&env.client.get(&env.v2("listed/tags/list")).await),
        ["x", "y"]
    );

    // Refusing connections, no list ever fetched: the tags the cache holds, with a Warning.
    env.fake.stop().await;
    let r = env.client.get(&env.v2("app/tags/list")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(tags_of(&r), ["v1"]);
    assert!(r.header("warning").is_some());

    env.restart_proxy(Some(CacheSpec {
        tag_ttl: "5m".into(),
        offline: true,
    }))
    .await;
    let r = env.client.get(&env.v2("app/tags/list")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(tags_of(&r), ["v1"]);
    assert!(r.header("warning").is_some(), "only what the cache holds");
    // Offline, a kept list is not the answer: `y` is not in the cache, so it is not listed.
    let r = env.client.get(&env.v2("listed/tags/list")).await;
    assert_eq!(tags_of(&r), ["x"]);
    assert!(r.header("warning").is_some(), "only what the cache holds");
    let r = env.client.get(&env.v2("never/tags/list")).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code().as_deref(), Some("NAME_UNKNOWN"));

    // Back online, the upstream still away: the kept list survived both restarts, whole, and is
    // fresh for tag_ttl.
    env.restart_proxy(Some(CacheSpec {
        tag_ttl: "5m".into(),
        offline: false,
    }))
    .await;
    let r = env.client.get(&env.v2("listed/tags/list?n=1")).await;
    assert_eq!(tags_of(&r), ["x"]);
    assert_eq!(r.header("warning"), None);
    assert_eq!(
        link_target(&r).as_deref(),
        Some("/v2/listed/tags/list?n=1&last=x")
    );
}

#[tokio::test]
async fn an_upstream_404_is_not_hidden_by_the_cache() {
    let env = Env::start().await;
    let r = env.client.get(&env.v2("nothing/here/tags/list")).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code().as_deref(), Some("NAME_UNKNOWN"));
}

#[tokio::test]
async fn the_catalog_lists_what_the_cache_holds_paged() {
    let fake = FakeRegistry::start().await;
    let other = FakeRegistry::start().await;
    let ups = vec![
        UpstreamSpec::new(UP, &fake.url(), true),
        UpstreamSpec::new("other.local", &other.url(), false),
    ];
    let env = Env::start_on(fake, CacheSpec::default(), ups).await;
    for repo in ["b/app", "a/app", "c"] {
        env.fake.push_image(repo, Some("v1"), &[4]);
        let r = env
            .client
            .get(&env.v2(&format!("{repo}/manifests/v1")))
            .await;
        assert_eq!(r.status, 200);
    }
    other.push_image("lib/x", Some("v1"), &[4]);
    let r = env
        .client
        .get(&env.v2("other.local/lib/x/manifests/v1"))
        .await;
    assert_eq!(r.status, 200);

    let r = env.client.get(&env.v2("_catalog")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["repositories"],
        serde_json::json!(["a/app", "b/app", "c", "other.local/lib/x"])
    );
    let r = env.client.get(&env.v2("_catalog?n=2")).await;
    assert_eq!(
        r.json()["repositories"],
        serde_json::json!(["a/app", "b/app"])
    );
    assert_eq!(
        link_target(&r).as_deref(),
        Some("/v2/_catalog?n=2&last=b%2Fapp")
    );
    let r = env.client.get(&env.v2("_catalog?n=2&last=b%2Fapp")).await;
    assert_eq!(
        r.json()["repositories"],
        serde_json::json!(["c", "other.local/lib/x"])
    );
    assert_eq!(r.header("link"), None);
    let r = env.client.get(&env.v2("_catalog?ns=other.local")).await;
    assert_eq!(r.json()["repositories"], serde_json::json!(["lib/x"]));
    let r = env.client.get(&env.v2("_catalog?n=-1")).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.error_code().as_deref(), Some("PAGINATION_NUMBER_INVALID"));
    let r = env.client.get(&env.v2("_catalog?ns=nowhere")).await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn the_catalog_lists_only_what_the_client_may_pull() {
    let rules = r#"anonymous = true
[[access]]
users = ["anonymous"]
repositories = ["fake.local/public/*"]
allow = true
[[access]]
users = ["alice"]
repositories = ["fake.local/**"]
allow = true
"#;
    let env = AuthEnv::simple(&[("alice", "pw")], rules).await;
    for repo in ["public/app", "team/secret", "a-team/secret"] {
        env.fake.push_image(repo, Some("v1"), &[4]);
        let r = env
            .get(&format!("/v2/{repo}/manifests/v1"), Some(("alice", "pw")))
            .await;
        assert_eq!(r.status, 200);
    }
    let r = env.get("/v2/_catalog", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["repositories"], serde_json::json!(["public/app"]));
    let r = env.get("/v2/_catalog", Some(("alice", "pw"))).await;
    assert_eq!(
        r.json()["repositories"],
        serde_json::json!(["a-team/secret", "public/app", "team/secret"])
    );
    // Pages are cut from what the client may see: a hidden name neither fills a page nor
    // shows in a Link.
    let r = env.get("/v2/_catalog?n=1", None).await;
    assert_eq!(r.json()["repositories"], serde_json::json!(["public/app"]));
    assert_eq!(r.header("link"), None);
    let r = env.get("/v2/_catalog?n=1", Some(("alice", "pw"))).await;
    assert_eq!(
        r.json()["repositories"],
        serde_json::json!(["a-team/secret"])
    );
    assert_eq!(
        link_target(&r).as_deref(),
        Some("/v2/_catalog?n=1&last=a-team%2Fsecret")
    );
}
