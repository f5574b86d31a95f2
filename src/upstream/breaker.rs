//! The circuit breaker of one upstream: after `circuit_break_after` consecutive connect
//! failures or timeouts the upstream is taken for down (open) for `circuit_pause`; then one
//! probe request is let through (half-open), whose outcome closes or reopens it.
//!
//! Only the transport counts: any HTTP answer, a 5xx or a 429 included, proves the upstream is
//! there, and closes the circuit. While it is open, nothing is sent: callers fail at once, and
//! the mirror serves what it has cached instead of waiting for a connect or header timeout.

use parking_lot::Mutex;
use std::time::{Duration, Instant};

/// How long callers are told to wait while a probe is out.
const PROBING_RETRY: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
        /// The probe was dropped without an outcome: a failure noted now (a caller's own
        /// timeout, which is what dropped it) starts the pause again.
        probe_lost: bool,
    },
    /// One probe request is out; everything else fails at once until it ends.
    Probing,
}

/// What a recorded outcome changed, for the caller to log and show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Change {
    Opened,
    Closed,
}

pub(crate) struct Breaker {
    after: u32,
    pause: Duration,
    state: Mutex<State>,
}

/// Admission of one request, while the circuit is closed or as its probe. A probe dropped
/// without an outcome (its caller went away) leaves the circuit open but due, so that the next
/// request probes instead of every request failing forever.
pub(crate) struct Admission<'a> {
    breaker: &'a Breaker,
    probe: bool,
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if self.probe {
            let mut s = self.breaker.state.lock();
            if *s == State::Probing {
                *s = State::Open {
                    until: Instant::now(),
                    probe_lost: true,
                };
            }
        }
    }
}

impl Breaker {
    pub(crate) fn new(after: u32, pause: Duration) -> Breaker {
        Breaker {
            after: after.max(1),
            pause,
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }

    /// `Err(wait)` while requests must not be sent; no change of state (a request that then
    /// waits for its turn asks [`Breaker::admit`] once it has it).
    pub(crate) fn check(&self) -> Result<(), Duration> {
        match *self.state.lock() {
            State::Closed { .. } => Ok(()),
            State::Open { until, .. } => {
                let now = Instant::now();
                if now >= until {
                    Ok(())
                } else {
                    Err(until - now)
                }
            }
            State::Probing => Err(PROBING_RETRY),
        }
    }

    /// Lets a request through (as the probe, when the pause is over), or `Err(wait)`.
    pub(crate) fn admit(&self) -> Result<Admission<'_>, Duration> {
        let mut s = self.state.lock();
        match *s {
            State::Closed { .. } => Ok(Admission {
                breaker: self,
                probe: false,
            }),
            State::Open { until, .. } => {
                let now = Instant::now();
                if now < until {
                    return Err(until - now);
                }
                *s = State::Probing;
                Ok(Admission {
                    breaker: self,
                    probe: true,
                })
            }
            State::Probing => Err(PROBING_RETRY),
        }
    }

    /// The upstream answered (any status).
    pub(crate) fn success(&self) -> Option<Change> {
        let mut s = self.state.lock();
        let was = std::mem::replace(&mut *s, State::Closed { failures: 0 });
        match was {
            State::Closed { .. } => None,
            State::Open { .. } | State::Probing => Some(Change::Closed),
        }
    }

    /// A connect failure or a timeout.
    pub(crate) fn failure(&self) -> Option<Change> {
        let mut s = self.state.lock();
        let open = State::Open {
            until: Instant::now() + self.pause,
            probe_lost: false,
        };
        match *s {
            State::Closed { failures } if failures + 1 >= self.after => {
                *s = open;
                Some(Change::Opened)
            }
            State::Closed { failures } => {
                *s = State::Closed {
                    failures: failures + 1,
                };
                None
            }
            State::Probing => {
                *s = open;
                Some(Change::Opened)
            }
            // The probe's caller gave up on it (a revalidation's own deadline): the upstream
            // hung again, so it gets its pause rather than the next request probing at once.
            State::Open {
                probe_lost: true, ..
            } => {
                *s = open;
                None
            }
            // A request let through before the circuit opened: it says nothing new.
            State::Open { .. } => None,
        }
    }

    pub(crate) fn pause(&self) -> Duration {
        self.pause
    }

    pub(crate) fn is_open(&self) -> bool {
        !matches!(*self.state.lock(), State::Closed { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_only() {
        let b = Breaker::new(3, Duration::from_secs(60));
        assert_eq!(b.failure(), None);
        assert_eq!(b.failure(), None);
        // An answer in between resets the count.
        assert_eq!(b.success(), None);
        assert_eq!(b.failure(), None);
        assert_eq!(b.failure(), None);
        assert!(b.check().is_ok());
        assert_eq!(b.failure(), Some(Change::Opened));
        assert!(b.is_open());
        let wait = b.check().unwrap_err();
        assert!(wait > Duration::from_secs(50) && wait <= Duration::from_secs(60));
        assert!(b.admit().is_err());
    }

    #[test]
    fn one_probe_after_the_pause_closes_or_reopens() {
        let b = Breaker::new(1, Duration::ZERO);
        assert_eq!(b.failure(), Some(Change::Opened));
        let probe = b.admit().unwrap();
        // While the probe is out, the others fail at once.
        assert!(b.admit().is_err());
        assert!(b.check().is_err());
        assert_eq!(b.failure(), Some(Change::Opened));
        drop(probe);
        let probe = b.admit().unwrap();
        assert_eq!(b.success(), Some(Change::Closed));
        drop(probe);
        assert!(!b.is_open());
        assert!(b.admit().is_ok());
    }

    #[test]
    fn a_probe_dropped_without_an_outcome_lets_the_next_request_probe() {
        let b = Breaker::new(1, Duration::ZERO);
        b.failure();
        drop(b.admit().unwrap());
        assert!(b.is_open());
        assert!(b.admit().is_ok());
    }

    #[test]
    fn a_probe_its_caller_timed_out_restarts_the_pause() {
        let b = Breaker::new(1, Duration::from_secs(3600));
        b.failure();
        *b.state.lock() = State::Open {
            until: Instant::now(),
            probe_lost: false,
        };
        // The probe goes out, its caller's deadline drops it, and the caller notes the timeout.
        drop(b.admit().unwrap());
        assert_eq!(b.failure(), None);
        assert!(b.check().is_err(), "the pause starts again");
        assert!(b.admit().is_err());
    }
}
