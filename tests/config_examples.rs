//! Every example in config/ parses and validates, so the documented keys stay real.

use cachalot::config::Config;
use std::path::Path;

#[test]
fn every_example_config_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
            assert!(!c.upstream.is_empty(), "{} has no upstream", path.display());
            seen += 1;
        }
    }
    assert!(
        seen >= 2,
        "expected the example configs in {}",
        dir.display()
    );
}

#[test]
fn the_full_example_sets_every_documented_key() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/cachalot.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    for key in [
        "listen",
        "tls_cert",
        "tls_key",
        "metrics_listen",
        "ui",
        "format",
        "level",
        "dir",
        "max_size",
        "memory",
        "tag_ttl",
        "offline",
        "name",
        "url",
        "default",
        "username",
        "password_env",
        "password_file",
        "connect_timeout",
        "timeout",
        "max_unused",
        "pinned",
        "scrub_interval",
        "scrub_rate",
        "image",
        "htpasswd",
        "anonymous",
        "realm",
        "users",
        "repositories",
        "allow",
    ] {
        assert!(
            text.contains(&format!("{key} =")),
            "config/cachalot.toml does not document {key}"
        );
    }
    let c = Config::load(&path).unwrap();
    assert_eq!(c.cache.tag_ttl.0, std::time::Duration::from_secs(300));
    assert_eq!(c.cache.max_size.0, 50 << 30);
    assert!(c.upstream.iter().filter(|u| u.default).count() == 1);
    // Both ways of pinning reach the eviction policy.
    let pins: Vec<String> = c
        .eviction_policy()
        .pins
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert!(
        pins.contains(&"docker.io/library/alpine:3.20".to_owned()),
        "{pins:?}"
    );
    assert!(
        pins.contains(&"registry.k8s.io/pause:3.10".to_owned()),
        "{pins:?}"
    );
}

/// The commented-out `[auth]` and `[[access]]` of the full example, uncommented, are valid as
/// written (the example's rules name no user, so no htpasswd file is read here).
#[test]
fn the_auth_example_is_valid_when_uncommented() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/cachalot.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let start = text.find("# [auth]").expect("an [auth] example");
    let end = start + text[start..].find("\n\n# An image").expect("its end");
    let uncommented: String = text[start..end]
        .lines()
        .filter_map(|l| l.strip_prefix("# "))
        .filter(|l| {
            l.starts_with('[') || l.split_once(" = ").is_some_and(|(k, _)| !k.contains(' '))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(uncommented.contains("[[access]]"), "{uncommented}");
    let full = format!("{}\n{uncommented}", &text[..start]);
    let c = Config::from_toml_str(&full).unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
    let auth = c.auth.expect("[auth]");
    assert!(auth.htpasswd.is_some() && !auth.anonymous());
    assert_eq!(c.access.len(), 1);
    assert_eq!(c.access[0].repositories[1], "ghcr.io/myorg/**");
}

/// config/cloud.toml parses as shipped, and with every commented-out upstream uncommented
/// (the `#   ` alternatives left out), one per cloud registry, each valid with its credentials.
#[test]
fn the_cloud_example_is_valid_with_every_registry_uncommented() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/cloud.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let start = 1 + text.find("\n[[upstream]]").expect("an [[upstream]]");
    let uncommented: String = text[start..]
        .lines()
        .map(|l| l.strip_prefix("# ").unwrap_or(l))
        .filter(|l| {
            l.starts_with('[') || l.split_once(" = ").is_some_and(|(k, _)| !k.contains(' '))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let full = format!("{}{uncommented}", &text[..start]);
    let c = Config::from_toml_str(&full).unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
    let names: Vec<&str> = c.upstream.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "docker.io",
            "ghcr.io",
            "europe-docker.pkg.dev",
            "123456789012.dkr.ecr.eu-west-1.amazonaws.com",
            "myregistry.azurecr.io",
            "quay.io",
            "harbor.example.com",
            "registry.gitlab.com",
            "acme.jfrog.io",
        ]
    );
    let by_name = |n: &str| c.upstream.iter().find(|u| u.name == n).unwrap();
    assert_eq!(
        by_name("123456789012.dkr.ecr.eu-west-1.amazonaws.com")
            .credential_program()
            .map(|(_, p)| p),
        Some("docker-credential-ecr-login".to_owned())
    );
    assert_eq!(
        by_name("myregistry.azurecr.io").username.as_deref(),
        Some("00000000-0000-0000-0000-000000000000")
    );
    assert!(
        by_name("myregistry.azurecr.io")
            .credential_command
            .is_some()
    );
    assert_eq!(by_name("quay.io").username.as_deref(), Some("myorg+puller"));
    assert!(
        by_name("acme.jfrog.io")
            .url
            .ends_with("/api/docker/docker-remote")
    );
    // Each upstream has one source of a password, and a username unless a helper answers it.
    for u in &c.upstream[1..] {
        assert!(
            u.username.is_some() != u.credential_helper.is_some(),
            "{}",
            u.name
        );
    }
}
