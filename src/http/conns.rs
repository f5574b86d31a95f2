//! What the accept loop knows of the connections it serves: which are idle (between requests,
//! or on HTTP/2 with no stream open) and since when, so that at `max_connections` it can ask
//! the longest idle to close and make room for a new one, as nginx reuses its idle keep-alive
//! connections when it runs out of `worker_connections`; and how to ask every one to close at
//! the stop.
//!
//! The hot path pays an atomic add and subtract per request and a clock read at its end; the
//! table itself is touched only by the accept loop, on accept and when full, so it takes no
//! lock.

use super::body::{Body, BodyError};
use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http_body::{Frame, SizeHint};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// What one listener's connections share with its accept loop.
struct Shared {
    /// Times below are milliseconds since this instant, so that connections compare.
    epoch: Instant,
    /// The accept loop holds a connection for which there is no room and no idle connection
    /// to close: the next connection to fall idle says so on `fell_idle`.
    wanted: AtomicBool,
    fell_idle: Notify,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// One connection's state, as its requests and the accept loop see it.
pub(super) struct Activity {
    /// A request head has been complete.
    pub(super) started: AtomicBool,
    /// It speaks HTTP/2 (set before `started`).
    pub(super) h2: AtomicBool,
    /// Requests (HTTP/2 streams) whose response body has not ended or been dropped.
    open: AtomicUsize,
    /// When the last response ended (or, before any, when the connection was accepted), in
    /// milliseconds since the listener's epoch.
    last_end: AtomicU64,
    /// The accept loop asked it to close; it is not picked twice.
    closing: AtomicBool,
    /// The connection's task, woken to see `closing`. Not a `Notify`: polling one takes its
    /// lock, and the connection's future is polled on every read and write.
    task: AtomicWaker,
    shared: Arc<Shared>,
}

impl Activity {
    /// A request has begun: the connection is busy until the returned guard is dropped (with
    /// the response body).
    pub(super) fn request_started(self: &Arc<Self>, h2: bool) -> InFlight {
        if h2 {
            self.h2.store(true, Ordering::Relaxed);
        }
        self.open.fetch_add(1, Ordering::AcqRel);
        self.started.store(true, Ordering::Release);
        InFlight(self.clone())
    }

    /// How long the connection has had no request open (zero while one is).
    pub(super) fn idle_for(&self) -> Duration {
        if self.open.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        let last = self.last_end.load(Ordering::Acquire);
        Duration::from_millis(self.shared.now_ms().saturating_sub(last))
    }

    /// Idle since when (ms since the epoch), if it is between requests after at least one:
    /// a connection that has not yet sent its first head is about to, and is left alone.
    fn idle_since(&self) -> Option<u64> {
        if !self.started.load(Ordering::Acquire)
            || self.closing.load(Ordering::Acquire)
            // SeqCst with `make_room`'s store of `wanted` and `InFlight`'s drop: of a request
            // ending while room is wanted, one side always sees the other (no lost wakeup).
            || self.open.load(Ordering::SeqCst) > 0
        {
            return None;
        }
        Some(self.last_end.load(Ordering::Acquire))
    }

    /// Whether the accept loop asked the connection to close; if not, `cx` is woken when it
    /// does. `registered`: the waker handed over last time, kept by the caller.
    pub(super) fn poll_close(&self, cx: &Context<'_>, registered: &mut Option<Waker>) -> bool {
        if !registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            self.task.register(cx.waker());
            *registered = Some(cx.waker().clone());
        }
        self.closing.load(Ordering::Acquire)
    }

    /// Whether the accept loop has asked the connection to close.
    pub(super) fn closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    fn ask_to_close(&self) {
        self.closing.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// One request in flight on a connection; dropped with its response body.
pub(super) struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        a.last_end.fetch_max(a.shared.now_ms(), Ordering::AcqRel);
        if a.open.fetch_sub(1, Ordering::SeqCst) == 1 && a.shared.wanted.load(Ordering::SeqCst) {
            a.shared.fell_idle.notify_one();
        }
    }
}

/// A response body holding its request in flight until it ends.
pub(super) struct TrackedBody {
    pub(super) body: Body,
    pub(super) _in_flight: InFlight,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The connections of one listener, owned by its accept loop.
pub(super) struct Table {
    shared: Arc<Shared>,
    /// Every connection accepted, and some that have ended (pruned as it grows).
    conns: Vec<Weak<Activity>>,
    /// The connection last asked to close to make room, until it has gone.
    asked: Option<Weak<Activity>>,
}

impl Table {
    pub(super) fn new() -> Table {
        Table {
            shared: Arc::new(Shared {
                epoch: Instant::now(),
                wanted: AtomicBool::new(false),
                fell_idle: Notify::new(),
            }),
            conns: Vec::new(),
            asked: None,
        }
    }

    /// A newly accepted connection's state, entered in the table. `live`: the connections
    /// being served, to bound what ended ones cost.
    pub(super) fn add(&mut self, live: usize) -> Arc<Activity> {
        let shared = self.shared.clone();
        let a = Arc::new(Activity {
            started: AtomicBool::new(false),
            h2: AtomicBool::new(false),
            open: AtomicUsize::new(0),
            last_end: AtomicU64::new(shared.now_ms()),
            closing: AtomicBool::new(false),
            task: AtomicWaker::new(),
            shared,
        });
        if self.conns.len() >= 2 * live + 64 {
            self.conns.retain(|w| w.strong_count() > 0);
        }
        self.conns.push(Arc::downgrade(&a));
        a
    }

    /// There is no room for a connection waiting to be served: asks the connection idle the
    /// longest to close, unless one asked before is still on its way out. Returns whether one
    /// was asked now. When none is idle, the next to fall idle wakes [`Table::fell_idle`].
    ///
    /// An idle HTTP/1 connection closes at once; an HTTP/2 one gets a GOAWAY. Should a request
    /// arrive meanwhile, it is still answered (a graceful shutdown finishes what is in flight),
    /// and the connection closes after it.
    pub(super) fn make_room(&mut self) -> bool {
        self.shared.wanted.store(true, Ordering::SeqCst);
        if let Some(a) = self.asked.as_ref().and_then(Weak::upgrade)
            && a.open.load(Ordering::Acquire) == 0
        {
            return false;
        }
        self.asked = None;
        self.conns.retain(|w| w.strong_count() > 0);
        let oldest = self
            .conns
            .iter()
            .filter_map(|w| {
                let a = w.upgrade()?;
                let since = a.idle_since()?;
                Some((since, a))
            })
            .min_by_key(|(since, _)| *since);
        match oldest {
            Some((_, a)) => {
                a.ask_to_close();
                self.asked = Some(Arc::downgrade(&a));
                true
            }
            None => false,
        }
    }

    /// Room was made (or the wait ended): connections falling idle need not say so.
    pub(super) fn room_made(&mut self) {
        self.shared.wanted.store(false, Ordering::Relaxed);
    }

    /// Resolves when a connection has fallen idle since [`Table::make_room`] found none.
    pub(super) async fn fell_idle(&self) {
        self.shared.fell_idle.notified().await
    }

    /// Asks every connection to close: idle ones close at once, busy ones after what is in
    /// flight.
    pub(super) fn close_all(&mut self) {
        for a in self.conns.drain(..).filter_map(|w| w.upgrade()) {
            a.ask_to_close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_idle_is_asked_first_and_busy_ones_never() {
        let mut t = Table::new();
        let fresh = t.add(0);
        let (a, b, busy) = (t.add(1), t.add(2), t.add(3));
        // a ends its request after b, so b has been idle longer.
        let rb = b.request_started(false);
        let ra = a.request_started(false);
        let _in_flight = busy.request_started(false);
        drop(rb);
        std::thread::sleep(Duration::from_millis(5));
        drop(ra);
        assert!(t.make_room());
        assert!(b.closing.load(Ordering::Relaxed));
        assert!(!a.closing.load(Ordering::Relaxed));
        // b has not gone yet: nobody else is asked.
        assert!(!t.make_room());
        drop(b);
        assert!(t.make_room());
        assert!(a.closing.load(Ordering::Relaxed));
        drop(a);
        // What is left: one that never sent a head, and one busy.
        assert!(!t.make_room());
        assert!(!fresh.closing.load(Ordering::Relaxed));
        assert!(!busy.closing.load(Ordering::Relaxed));
    }
}
