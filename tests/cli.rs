//! The command line: check-config's output and its one-line errors naming the key or file.

use std::process::Command;

fn cachalot() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cachalot"))
}

fn write(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
    let p = dir.path().join("c.toml");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn check_config_prints_the_effective_config() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "[[upstream]]\nname = \"docker.io\"\nurl = \"https://registry-1.docker.io\"\ndefault = true\n",
    );
    let out = cachalot()
        .args(["check-config", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("tag_ttl = \"5m\""), "{text}");
    assert!(text.contains("listen = \"0.0.0.0:5000\""), "{text}");
}

#[test]
fn bad_configs_fail_with_one_line_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    for (text, needle) in [
        ("[cache]\nmax_sise = \"1GiB\"\n", "max_sise"),
        ("[cache]\nmemory = \"lots\"\n", "lots"),
        (
            "[[upstream]]\nname = \"a\"\nurl = \"not a url\"\n",
            "upstream[0].url",
        ),
        (
            "[[upstream]]\nname = \"a\"\nurl = \"https://a\"\nusername = \"u\"\npassword_env = \"CACHALOT_TEST_SURELY_UNSET\"\n",
            "CACHALOT_TEST_SURELY_UNSET",
        ),
    ] {
        let p = write(&dir, text);
        let out = cachalot()
            .args(["check-config", "--config"])
            .arg(&p)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains(needle), "{err:?} should name {needle}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err:?}");
    }
    let out = cachalot()
        .args(["check-config", "--config", "/nonexistent/c.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("/nonexistent/c.toml")
    );
}

#[test]
fn serve_refuses_a_bad_config_without_starting() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "[server]\nlisten = \"nowhere\"\n");
    let out = cachalot()
        .args(["serve", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8(out.stderr).unwrap().contains("listen"));
}
