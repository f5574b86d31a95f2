//! Many small writes made into a few large ones, for HTTP/2 over TLS.
//!
//! h2 flushes its connection after every DATA frame it writes (a frame's payload is written
//! straight from the body's buffer, and the codec takes no second frame until it is out), and the
//! peer sets the frame size: 16 KiB for curl, Go's client (Docker, containerd) and browsers.
//! Through tokio-rustls each of those flushes is a `writev(2)` of one frame's TLS records: four
//! times the system calls, and the segments, that HTTP/1.1 over TLS spends on the same bytes,
//! and measured as about a quarter more server CPU per byte at 16 streams.
//!
//! So a flush that comes right after new bytes were written is put off: the bytes stay in a
//! buffer, the task wakes itself and is polled again at once, and whatever h2 found to send
//! meanwhile joins them. h2 flushes whenever it has nothing left to write, so a flush with
//! nothing new since the one before writes everything out: bytes wait for the task's next poll,
//! never for a timer or for more data. A full buffer goes out at once.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most a flush waits to gather: about four 16 KiB frames, each write of it a few full TLS
/// records. Kept under glibc's mmap threshold, as the buffer is given back after every flush
/// (an idle HTTP/2 connection holds none).
const CAPACITY: usize = 64 * 1024;
/// Flushes put off in a row before one is done whatever comes: a bound on how long bytes wait
/// when the task finds a little more to write on every poll.
const MAX_PUT_OFF: u8 = 16;

pub(crate) struct Coalesce<T> {
    inner: T,
    on: bool,
    buf: Vec<u8>,
    /// How much of `buf` the inner stream took.
    sent: usize,
    /// Bytes were written since the last flush.
    fresh: bool,
    put_off: u8,
    /// A read that ended the peer's side (end of stream or an error) while gathered bytes were
    /// still here: returned once they are out.
    ended: Option<io::Result<()>>,
}

impl<T> Coalesce<T> {
    /// Gathers writes when `on` (a connection that speaks HTTP/2); otherwise passes every call
    /// through as it comes.
    pub(crate) fn new(inner: T, on: bool) -> Coalesce<T> {
        Coalesce {
            inner,
            on,
            buf: Vec::new(),
            sent: 0,
            fresh: false,
            put_off: 0,
            ended: None,
        }
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    /// Writes out everything gathered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.buf.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Writes out everything gathered and flushes it, the buffer given back.
    fn poll_send_all(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        self.fresh = false;
        self.put_off = 0;
        self.buf = Vec::new();
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    /// Makes room for more: drains a full buffer.
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.len() >= CAPACITY {
            ready!(self.poll_drain(cx))?;
        }
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(CAPACITY);
        }
        Poll::Ready(Ok(CAPACITY - self.buf.len()))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Coalesce<T> {
    /// When the peer's side ends, h2 closes the connection without another flush if its own
    /// buffers are empty, so what was gathered is sent before the end is passed on.
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.ended.is_none() {
            let before = buf.filled().len();
            let read = ready!(Pin::new(&mut this.inner).poll_read(cx, buf));
            let end = read.is_err() || (buf.filled().len() == before && buf.remaining() > 0);
            if !(end && this.sent < this.buf.len()) {
                return Poll::Ready(read);
            }
            this.ended = Some(read);
        }
        // Whether or not the bytes could go out, the read's own answer is the one to give.
        ready!(this.poll_send_all(cx)).ok();
        Poll::Ready(this.ended.take().unwrap_or(Ok(())))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if !this.on {
            return Pin::new(&mut this.inner).poll_write(cx, data);
        }
        let room = ready!(this.poll_room(cx))?;
        let n = data.len().min(room);
        this.buf.extend_from_slice(&data[..n]);
        this.fresh |= n > 0;
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if !this.on {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        let mut room = ready!(this.poll_room(cx))?;
        let mut n = 0;
        for b in bufs {
            let take = b.len().min(room);
            this.buf.extend_from_slice(&b[..take]);
            n += take;
            room -= take;
            if room == 0 {
                break;
            }
        }
        this.fresh |= n > 0;
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        // Gathering takes slices as cheaply as one buffer.
        self.on || self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.on {
            if this.fresh && this.put_off < MAX_PUT_OFF && this.buf.len() < CAPACITY {
                this.fresh = false;
                this.put_off += 1;
                cx.waker().wake_by_ref();
                return Poll::Ready(Ok(()));
            }
            return this.poll_send_all(cx);
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.on {
            ready!(this.poll_drain(cx))?;
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Records each write the inner stream is asked for.
    #[derive(Default)]
    struct Writes(Vec<usize>, Vec<u8>);

    impl AsyncWrite for Writes {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.0.push(data.len());
            self.1.extend_from_slice(data);
            Poll::Ready(Ok(data.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Frames flushed one by one go out together, and a second flush with nothing new sends
    /// what was gathered: no byte is left behind, none is reordered.
    #[tokio::test]
    async fn flushes_right_after_writes_are_gathered_and_the_next_sends() {
        let mut c = Coalesce::new(Writes::default(), true);
        let mut want = Vec::new();
        for i in 0..3u8 {
            let frame = vec![i; 16 * 1024 + 9];
            c.write_all(&frame).await.unwrap();
            want.extend_from_slice(&frame);
            c.flush().await.unwrap();
        }
        assert!(c.inner.0.is_empty(), "nothing written yet: {:?}", c.inner.0);
        c.flush().await.unwrap();
        assert_eq!(c.inner.0, [want.len()], "one write for three frames");
        assert_eq!(c.inner.1, want);
    }

    /// A full buffer goes out without waiting for a flush, and shutdown sends the rest.
    #[tokio::test]
    async fn a_full_buffer_is_written_at_once_and_shutdown_sends_the_rest() {
        let mut c = Coalesce::new(Writes::default(), true);
        let data: Vec<u8> = (0..CAPACITY * 2 + 100).map(|i| i as u8).collect();
        c.write_all(&data).await.unwrap();
        assert_eq!(c.inner.0, [CAPACITY, CAPACITY]);
        c.shutdown().await.unwrap();
        assert_eq!(c.inner.1, data);
    }

    /// A run of flushes each after new bytes is cut at `MAX_PUT_OFF`.
    #[tokio::test]
    async fn bytes_never_wait_past_the_bound() {
        let mut c = Coalesce::new(Writes::default(), true);
        for _ in 0..=MAX_PUT_OFF {
            c.write_all(b"x").await.unwrap();
            c.flush().await.unwrap();
        }
        assert_eq!(c.inner.1.len(), usize::from(MAX_PUT_OFF) + 1);
    }

    impl AsyncRead for Writes {
        /// The peer's side has ended.
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A deferred flush followed by the end of the peer's side (h2 then closes without flushing)
    /// still sends what was gathered, before the end is passed on.
    #[tokio::test]
    async fn the_end_of_the_peers_side_sends_what_was_gathered() {
        use tokio::io::AsyncReadExt;
        let mut c = Coalesce::new(Writes::default(), true);
        c.write_all(b"last frame").await.unwrap();
        c.flush().await.unwrap();
        assert!(c.inner.0.is_empty());
        assert_eq!(c.read(&mut [0; 16]).await.unwrap(), 0);
        assert_eq!(c.inner.1, b"last frame");
    }

    #[tokio::test]
    async fn off_it_passes_every_write_through() {
        let mut c = Coalesce::new(Writes::default(), false);
        c.write_all(b"abc").await.unwrap();
        c.write_all(b"de").await.unwrap();
        assert_eq!(c.inner.0, [3, 2]);
    }
}
