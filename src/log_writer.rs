//! The log's way out: lines are copied into one shared buffer and a thread of their own writes
//! them to stderr, many lines a `write(2)`, so a request never waits on the terminal or journald.
//!
//! Each line is formatted by tracing-subscriber into its own reused per-thread buffer; here it
//! costs a copy under a short lock. The writer thread sleeps while nothing is pending; the first
//! line into an empty buffer wakes it, and it then waits [`GATHER`] for more before writing, so
//! that at thousands of requests a second one write carries a hundred lines, while an idle server
//! has no timer at all. When the output is slower than the lines come, the buffer stops at
//! [`MAX_PENDING`] and further lines are dropped and counted (`cachalot_log_lines_dropped_total`),
//! rather than making requests wait. [`flush`] writes out what is pending (at exit).

use parking_lot::{Condvar, Mutex};
use std::io::Write;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tracing_subscriber::fmt::MakeWriter;

/// How long the writer gathers lines after the first one before writing them: the delay a line
/// may see on its way out.
const GATHER: Duration = Duration::from_millis(5);

/// Lines waiting to be written at most, in bytes (tens of thousands of lines): past it, a
/// stalled output costs lines, never requests.
const MAX_PENDING: usize = 8 << 20;

/// A buffer grown by a burst is given back above this size once written.
const KEEP_CAPACITY: usize = 1 << 20;

/// How long [`flush`] waits for a stalled output.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Lines dropped because the output fell behind, over the process's life.
pub fn dropped_counter() -> &'static prometheus::IntCounter {
    static DROPPED: OnceLock<prometheus::IntCounter> = OnceLock::new();
    DROPPED.get_or_init(|| {
        prometheus::IntCounter::new(
            "cachalot_log_lines_dropped_total",
            "Log lines dropped because stderr (a terminal, journald, a pipe) took them slower than they came.",
        )
        .expect("static metric definition")
    })
}

struct Pending {
    bytes: Vec<u8>,
    /// Lines appended so far, and written so far: [`flush`] waits for the one to reach the other.
    appended: u64,
    written: u64,
    /// A flush is waiting: write without gathering.
    urgent: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    /// The writer waits here for a first line.
    wake: Condvar,
    /// [`flush`] waits here for the writer.
    done: Condvar,
}

/// A `MakeWriter` for the fmt layer; every line goes to the process's one writer thread.
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
}

static WRITER: OnceLock<LogWriter> = OnceLock::new();

/// The process's writer to stderr, its thread started on first use.
pub fn stderr() -> Result<LogWriter, String> {
    if let Some(w) = WRITER.get() {
        return Ok(w.clone());
    }
    let w = LogWriter::spawn(std::io::stderr()).map_err(|e| format!("log writer thread: {e}"))?;
    Ok(WRITER.get_or_init(|| w).clone())
}

/// Writes out the lines pending in the process's writer, waiting [`FLUSH_TIMEOUT`] at most;
/// nothing when logging never started.
pub fn flush() {
    if let Some(w) = WRITER.get() {
        w.flush();
    }
}

impl LogWriter {
    /// A writer whose thread writes to `out`.
    pub fn spawn<W: Write + Send + 'static>(out: W) -> std::io::Result<LogWriter> {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending {
                bytes: Vec::new(),
                appended: 0,
                written: 0,
                urgent: false,
            }),
            wake: Condvar::new(),
            done: Condvar::new(),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name("cachalot-log".into())
            .spawn(move || write_loop(&s, out))?;
        Ok(LogWriter { shared })
    }

    /// Writes out what is pending, waiting [`FLUSH_TIMEOUT`] at most.
    pub fn flush(&self) {
        let mut p = self.shared.pending.lock();
        let target = p.appended;
        if p.written >= target {
            return;
        }
        p.urgent = true;
        self.shared.wake.notify_one();
        let deadline = std::time::Instant::now() + FLUSH_TIMEOUT;
        while p.written < target {
            if self.shared.done.wait_until(&mut p, deadline).timed_out() {
                return;
            }
        }
    }

    fn append(&self, line: &[u8]) {
        let mut p = self.shared.pending.lock();
        if p.bytes.len() + line.len() > MAX_PENDING {
            drop(p);
            dropped_counter().inc();
            return;
        }
        let was_empty = p.bytes.is_empty();
        p.bytes.extend_from_slice(line);
        p.appended += 1;
        drop(p);
        if was_empty {
            self.shared.wake.notify_one();
        }
    }
}

fn write_loop<W: Write>(shared: &Shared, mut out: W) {
    let mut batch = Vec::new();
    loop {
        let mut p = shared.pending.lock();
        while p.bytes.is_empty() {
            shared.wake.wait(&mut p);
        }
        if !p.urgent {
            // Let the lines of the next few milliseconds join this write.
            parking_lot::MutexGuard::unlocked(&mut p, || std::thread::sleep(GATHER));
        }
        p.urgent = false;
        std::mem::swap(&mut p.bytes, &mut batch);
        let upto = p.appended;
        drop(p);
        // An output that fails (closed, full disk) loses these lines; nothing else can be done
        // with them, and the server goes on.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        if batch.capacity() > KEEP_CAPACITY {
            batch = Vec::new();
        }
        shared.pending.lock().written = upto;
        shared.done.notify_all();
    }
}

/// One line's writer: the fmt layer writes each line whole, in one `write`.
pub struct Line<'a>(&'a LogWriter);

impl Write for Line<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output the test can read, and hold up.
    #[derive(Clone, Default)]
    struct Out(Arc<Mutex<Vec<u8>>>, Arc<Mutex<()>>);

    impl Write for Out {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _stalled = self.1.lock();
            self.0.lock().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_come_out_whole_in_order_and_flush_writes_them_all() {
        let out = Out::default();
        let w = LogWriter::spawn(out.clone()).unwrap();
        for i in 0..1000 {
            writeln!(w.make_writer(), "line {i}").unwrap();
        }
        w.flush();
        let text = String::from_utf8(out.0.lock().clone()).unwrap();
        let expected: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(text, expected);
    }

    #[test]
    fn a_stalled_output_drops_and_counts_lines_instead_of_blocking() {
        let out = Out::default();
        let stall = out.1.lock();
        let w = LogWriter::spawn(out.clone()).unwrap();
        let before = dropped_counter().get();
        let line = vec![b'x'; 1 << 16];
        // Far more than MAX_PENDING, while the output takes nothing: this returns.
        for _ in 0..(4 * MAX_PENDING / line.len()) {
            w.make_writer().write_all(&line).unwrap();
        }
        assert!(dropped_counter().get() - before >= (2 * MAX_PENDING / line.len()) as u64);
        drop(stall);
        w.flush();
        let written = out.0.lock().len();
        assert!(written > 0 && written <= 2 * MAX_PENDING, "{written}");
    }
}
