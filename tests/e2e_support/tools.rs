//! Finding the external programs the e2e tests drive, and the skip-or-fail policy when they are
//! missing.

use std::path::{Path, PathBuf};

/// The programs every e2e test needs.
pub const E2E_TOOLS: [&str; 2] = ["docker-registry", "skopeo"];

/// Looks `name` up in `PATH`.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// True when `CI` is set in the environment (any value): missing tools are then a failure.
pub fn under_ci() -> bool {
    std::env::var_os("CI").is_some()
}

/// Returns true when `docker-registry` and `skopeo` are installed. When one is missing: under CI
/// (`CI` set) this panics; otherwise it prints why the calling test is skipped and returns false.
pub fn e2e_tools_available(_caller: &str) -> bool {
    tools_available(&E2E_TOOLS, "apt-get install -y docker-registry skopeo")
}

/// A directory for test files under cargo's per-target temp dir (`target/tmp`), so that files of
/// tests that never clean up (the shared upstream) stay inside the build tree.
pub fn tempdir(prefix: &str) -> tempfile::TempDir {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cachalot-e2e");
    std::fs::create_dir_all(&base).expect("create target tmp dir");
    tempfile::Builder::new()
        .prefix(&format!("{prefix}-{}-", std::process::id()))
        .tempdir_in(&base)
        .expect("create temp dir")
}

/// Removes leftovers of earlier test processes that are no longer running.
pub fn sweep_stale_tempdirs() {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cachalot-e2e");
    let Ok(entries) = std::fs::read_dir(&base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        // <prefix>-<pid>-<random>
        let mut parts = name.rsplitn(3, '-');
        let (_, pid) = (parts.next(), parts.next());
        let Some(pid) = pid.and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Returns true when every program of `tools` is in `PATH`. When one is missing: under CI this
/// panics; otherwise it prints a SKIPPED line naming them and `install` (how to get them), and
/// returns false.
pub fn tools_available(tools: &[&str], install: &str) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|tool| find_in_path(tool).is_none())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_owned();
    let msg = format!(
        "{test}: required program(s) not found in PATH: {}. Install them with `{install}`.",
        missing.join(", ")
    );
    if under_ci() {
        panic!("{msg} CI is set, so this is a failure, not a skip.");
    }
    // Written to the stderr handle directly: libtest captures `eprintln!` of passing tests, and a
    // skip must be visible.
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {msg} (CI is unset, so the test is skipped.)"
    );
    false
}
