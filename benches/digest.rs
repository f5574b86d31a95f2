//! Digest verification throughput: cachalot's `Verifier` (ring) beside the `sha2` crate, on the
//! same bytes in the same run. Hashing bounds how fast a cold blob can complete, since its last
//! byte waits for the digest. `cargo bench --bench digest`; under `cargo test` it runs on 1 MiB
//! just to prove it works.

use cachalot::oci::{Algorithm, Verifier};
use sha2::Digest as _;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let (mib, runs) = if bench { (256, 5) } else { (1, 1) };
    let data: Vec<u8> = (0..mib << 20)
        .map(|i: usize| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut ring_rates = Vec::new();
    let mut sha2_rates = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let mut v = Verifier::new(Algorithm::Sha256);
        for chunk in data.chunks(1 << 20) {
            v.update(chunk);
        }
        let a = v.finish();
        ring_rates.push(mib as f64 / t.elapsed().as_secs_f64());

        let t = Instant::now();
        let mut h = sha2::Sha256::new();
        for chunk in data.chunks(1 << 20) {
            h.update(chunk);
        }
        let b = h.finalize();
        sha2_rates.push(mib as f64 / t.elapsed().as_secs_f64());
        assert_eq!(a.hex(), hex::encode(b), "the two implementations disagree");
    }
    let (r, s) = (median(ring_rates), median(sha2_rates));
    println!(
        "sha256 over {mib} MiB, median of {runs}: Verifier (ring) {r:.0} MiB/s, sha2 crate {s:.0} MiB/s, ratio {:.2}x",
        r / s
    );
}
