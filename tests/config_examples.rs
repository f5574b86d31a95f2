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
}
