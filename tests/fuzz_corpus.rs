//! Replays every fuzz target's corpus and regression inputs (`fuzz/corpus/<target>/`,
//! `fuzz/regressions/<target>/`) through the same entry points the fuzzers drive, on stable
//! Rust in every test run: what a fuzzer once found stays fixed.

use cachalot::fuzzing::TARGETS;
use std::path::Path;

fn inputs(dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_target_has_a_seed_corpus_and_every_input_passes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    for (name, target) in TARGETS {
        let corpus = inputs(&root.join("corpus").join(name));
        assert!(
            !corpus.is_empty(),
            "fuzz/corpus/{name} holds no seed inputs"
        );
        let regressions = inputs(&root.join("regressions").join(name));
        for path in corpus.iter().chain(&regressions) {
            let data = std::fs::read(path).expect("read corpus file");
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(
                outcome.is_ok(),
                "fuzz target {name} panicked on {}",
                path.display()
            );
        }
    }
}

#[test]
fn every_fuzz_target_file_is_replayed() {
    // A target added under fuzz/fuzz_targets but not to TARGETS would go unreplayed in CI.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/fuzz_targets");
    for path in inputs(&dir) {
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        assert!(
            TARGETS.iter().any(|(n, _)| *n == stem),
            "fuzz/fuzz_targets/{stem}.rs is not in cachalot::fuzzing::TARGETS"
        );
    }
}
