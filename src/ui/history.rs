//! Lookup counters sampled over time, so the page can give a hit ratio over the last five
//! minutes as well as since start. The counters stay in `metrics`; this keeps only a few past
//! readings of them, taken by [`super::Ui::run_sampler`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The window of the recent hit ratio.
pub const WINDOW: Duration = Duration::from_secs(300);
/// How often the counters are read.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Readings kept: one window's worth, and one more so a full window is always there.
const KEEP: usize = (WINDOW.as_secs() / SAMPLE_EVERY.as_secs()) as usize + 2;

/// Lookups and misses, by kind (manifest, blob), at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub manifest: (u64, u64),
    pub blob: (u64, u64),
}

#[derive(Debug, Default)]
pub struct History {
    samples: VecDeque<(Instant, Counts)>,
}

/// The ratio of lookups that were not misses over a span, and how long that span is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Recent {
    pub manifest: Option<f64>,
    pub blob: Option<f64>,
    pub span: Duration,
}

/// `1 - misses / lookups`, the dashboard's hit ratio; `None` without lookups.
pub fn ratio((lookups, misses): (u64, u64)) -> Option<f64> {
    (lookups > 0).then(|| 1.0 - misses.min(lookups) as f64 / lookups as f64)
}

impl History {
    pub fn record(&mut self, at: Instant, counts: Counts) {
        if self.samples.len() == KEEP {
            self.samples.pop_front();
        }
        self.samples.push_back((at, counts));
    }

    /// The hit ratio between the newest reading at least `WINDOW` old (or, younger than that,
    /// the oldest there is) and `now`'s counts.
    pub fn recent(&self, now: Instant, counts: Counts) -> Recent {
        let base = self
            .samples
            .iter()
            .rev()
            .find(|(at, _)| now.saturating_duration_since(*at) >= WINDOW)
            .or(self.samples.front());
        let Some((at, old)) = base else {
            return Recent {
                manifest: None,
                blob: None,
                span: Duration::ZERO,
            };
        };
        let delta = |new: (u64, u64), old: (u64, u64)| {
            (new.0.saturating_sub(old.0), new.1.saturating_sub(old.1))
        };
        Recent {
            manifest: ratio(delta(counts.manifest, old.manifest)),
            blob: ratio(delta(counts.blob, old.blob)),
            span: now.saturating_duration_since(*at),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(blob: (u64, u64)) -> Counts {
        Counts {
            manifest: (0, 0),
            blob,
        }
    }

    #[test]
    fn the_recent_ratio_forgets_what_is_older_than_the_window() {
        let t0 = Instant::now();
        let mut h = History::default();
        // A cold start: 10 lookups, all misses.
        h.record(t0, counts((0, 0)));
        let mut now = t0;
        let mut c = (10, 10);
        for _ in 0..60 {
            now += SAMPLE_EVERY;
            h.record(now, counts(c));
            // Then only hits.
            c.0 += 5;
        }
        let r = h.recent(now, counts(c));
        assert_eq!(r.blob, Some(1.0), "{r:?}");
        assert!(r.span >= WINDOW && r.span < WINDOW + SAMPLE_EVERY * 2);
        assert_eq!(r.manifest, None);
        // Since start, the misses still count.
        assert!(ratio(c).unwrap() < 1.0);
    }

    #[test]
    fn a_young_process_uses_what_it_has() {
        let t0 = Instant::now();
        let mut h = History::default();
        assert_eq!(h.recent(t0, counts((4, 1))).blob, None);
        h.record(t0, counts((0, 0)));
        let r = h.recent(t0 + Duration::from_secs(20), counts((4, 1)));
        assert_eq!(r.blob, Some(0.75));
        assert_eq!(r.span, Duration::from_secs(20));
    }

    #[test]
    fn keeps_a_bounded_number_of_readings() {
        let t0 = Instant::now();
        let mut h = History::default();
        for i in 0..1000 {
            h.record(t0 + SAMPLE_EVERY * i, Counts::default());
        }
        assert_eq!(h.samples.len(), KEEP);
    }
}
