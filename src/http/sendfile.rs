//! Zero-copy serving of blob files on plain-HTTP/1 connections, with sendfile(2): committed
//! blobs, and the growing file of a fill as its bytes arrive.
//!
//! hyper writes response bodies itself, from the `Bytes` a body yields, and has no way to be
//! told "send this file range". So a blob's body yields *placeholders* instead: slices of one
//! static buffer whose contents are never read, each paired, in order, with the file range it
//! stands for in the connection's [`FileQueue`]. Our own HTTP/1 path (`h1.rs`) hands body chunks
//! to the socket as they were given; so does hyper, on a connection handed over to it, which
//! queues them without copying (its vectored write strategy, which the server forces for these
//! connections). The socket wrapper, [`SendfileStream`], recognises a
//! placeholder by its address and sends the file range in its place; everything else (the
//! response head, manifests, error bodies) it writes as usual.
//!
//! Only HTTP/1 over plain TCP takes this path: HTTP/2 and TLS copy body bytes into frames or
//! records, where a placeholder would go out as zeros, so those responses read the file.
//!
//! While a body has more file bytes ready behind the chunk being sent, the socket is corked
//! (`TCP_CORK`, what nginx's `tcp_nopush` does), and the response head is held back with its
//! first chunk: the kernel then sends full segments only, rather than a short one at the end of
//! every sendfile call. The socket is uncorked once a chunk with nothing ready behind it has gone,
//! so the end of a body, or of what a fill has written so far, is never held back.
//!
//! The kernel copies from the page cache to the socket, so a cached blob costs no user-space
//! copy, no read buffer and no blocking-pool hop: the cost nginx pays to serve a static file.
//! (Like nginx without aio, a sendfile of pages not in memory waits for the disk on the worker
//! thread; a blob just filled or often pulled is in the page cache.)

use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// The largest file range one placeholder stands for. The buffer is zero-initialised static
/// memory that nothing reads, so it stays in untouched pages and costs no resident memory.
const PLACEHOLDER_LEN: usize = 1 << 20;
static PLACEHOLDER: [u8; PLACEHOLDER_LEN] = [0; PLACEHOLDER_LEN];

/// The most file bytes one placeholder chunk stands for.
pub(crate) const MAX_CHUNK: usize = PLACEHOLDER_LEN;

/// Where in `PLACEHOLDER` a slice starts, if it is a (non-empty) placeholder.
fn placeholder_offset(buf: &[u8]) -> Option<usize> {
    let base = PLACEHOLDER.as_ptr() as usize;
    let at = buf.as_ptr() as usize;
    (!buf.is_empty() && at >= base && at < base + PLACEHOLDER_LEN).then(|| at - base)
}

/// A file range a placeholder chunk stands for.
struct Job {
    file: Arc<File>,
    offset: u64,
    len: usize,
    /// More of the body's file bytes are ready to follow this range at once.
    more: bool,
}

/// The file ranges behind the placeholders a connection's bodies have yielded and its socket
/// has not yet sent, in the order they are written (HTTP/1 sends one response at a time).
#[derive(Default)]
pub(crate) struct FileQueue(Mutex<VecDeque<Job>>);

impl FileQueue {
    fn lock(&self) -> parking_lot::MutexGuard<'_, VecDeque<Job>> {
        self.0.lock()
    }

    /// A body chunk standing for file bytes `offset..offset + len` (`len` at most
    /// [`MAX_CHUNK`]), to be yielded by a response body on this queue's connection. `more`:
    /// the body has further file bytes ready to send right after these, so the socket may hold
    /// back a partial segment for them.
    pub(crate) fn placeholder(
        &self,
        file: &Arc<File>,
        offset: u64,
        len: usize,
        more: bool,
    ) -> Bytes {
        let len = len.min(MAX_CHUNK);
        self.lock().push_back(Job {
            file: file.clone(),
            offset,
            len,
            more,
        });
        Bytes::from_static(&PLACEHOLDER[..len])
    }
}

/// A plain TCP connection that sends placeholder chunks from their files.
pub(crate) struct SendfileStream {
    tcp: TcpStream,
    queue: Arc<FileQueue>,
    corked: bool,
}

impl SendfileStream {
    pub(crate) fn new(tcp: TcpStream) -> SendfileStream {
        SendfileStream {
            tcp,
            queue: Arc::default(),
            corked: false,
        }
    }

    /// Corks or uncorks the socket. Corking only saves segments, so a failure changes nothing
    /// else and is not an error; uncorking pushes out whatever was held back.
    fn cork(&mut self, on: bool) {
        if self.corked != on {
            let _ = socket2::SockRef::from(&self.tcp).set_tcp_cork(on);
            self.corked = on;
        }
    }

    /// Waits until the socket has bytes to read (or has closed), without a buffer to read
    /// them into.
    pub(crate) async fn readable(&self) -> io::Result<()> {
        self.tcp.readable().await
    }

    /// Waits for the client to go (end of stream or an error: true) or to send more (false),
    /// reading nothing.
    pub(crate) async fn client_gone(&self) -> bool {
        let mut byte = [0u8; 1];
        !matches!(self.tcp.peek(&mut byte).await, Ok(n) if n > 0)
    }

    /// Reads what the socket has into `buf`'s spare capacity; `WouldBlock` if nothing.
    pub(crate) fn try_read_buf(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        self.tcp.try_read_buf(buf)
    }

    /// The queue bodies on this connection push their file ranges to.
    pub(crate) fn queue(&self) -> Arc<FileQueue> {
        self.queue.clone()
    }

    /// Sends the file range behind `buf`, a placeholder starting `at` bytes into the buffer.
    fn poll_sendfile(
        &mut self,
        cx: &mut Context<'_>,
        buf: &[u8],
        at: usize,
    ) -> Poll<io::Result<usize>> {
        let (file, offset, more) = {
            let queue = self.queue.lock();
            // The writer (h1, or hyper after a hand-over) advances through a chunk as it is
            // written, so a placeholder slice always ends where its job does; anything else
            // means the pairing is lost, and sending would put the wrong bytes on the wire.
            match queue.front() {
                Some(job) if at + buf.len() == job.len => {
                    (job.file.clone(), job.offset + at as u64, job.more)
                }
                _ => {
                    return Poll::Ready(Err(io::Error::other(
                        "sendfile: body chunk without its file range",
                    )));
                }
            }
        };
        if more {
            self.cork(true);
        }
        loop {
            ready!(self.tcp.poll_write_ready(cx))?;
            match self.tcp.try_io(Interest::WRITABLE, || {
                sendfile(&self.tcp, &file, offset, buf.len())
            }) {
                Ok(0) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "blob file shorter than its length",
                    )));
                }
                Ok(n) => {
                    if n == buf.len() {
                        self.queue.lock().pop_front();
                        if !more {
                            self.cork(false);
                        }
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

fn sendfile(sock: &TcpStream, file: &File, offset: u64, count: usize) -> io::Result<usize> {
    let mut off = offset;
    Ok(rustix::fs::sendfile(sock, file, Some(&mut off), count)?)
}

impl AsyncRead for SendfileStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for SendfileStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // Write ordinary bytes up to the first placeholder, or the placeholder itself; a
        // short write is fine, hyper calls again with the rest.
        match bufs.iter().position(|b| placeholder_offset(b).is_some()) {
            None => Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs),
            Some(0) => {
                let at = placeholder_offset(&bufs[0]).expect("checked");
                self.poll_sendfile(cx, &bufs[0], at)
            }
            // A response head with its first file chunk behind it: hold the head back to go
            // out in the chunk's first segment.
            Some(i) => {
                self.cork(true);
                Pin::new(&mut self.tcp).poll_write_vectored(cx, &bufs[..i])
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_slices_of_the_placeholder_are_placeholders() {
        assert_eq!(placeholder_offset(&PLACEHOLDER[..10]), Some(0));
        assert_eq!(placeholder_offset(&PLACEHOLDER[5..]), Some(5));
        assert_eq!(placeholder_offset(&PLACEHOLDER[3..3]), None);
        let other = vec![0u8; 16];
        assert_eq!(placeholder_offset(&other), None);
    }

    fn corked(tcp: &TcpStream) -> bool {
        socket2::SockRef::from(tcp).tcp_cork().unwrap()
    }

    /// A body's head and chunks go out corked while more is ready behind them, and the socket
    /// is uncorked once the last chunk has gone: a response's tail is never held back.
    #[tokio::test]
    async fn corks_while_more_is_ready_and_uncorks_after_the_last_chunk() {
        use std::io::Write;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        server.set_nodelay(true).unwrap();
        let mut stream = SendfileStream::new(server);
        let queue = stream.queue();

        let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let mut tmp = tempfile::tempfile().unwrap();
        tmp.write_all(&data).unwrap();
        let file = Arc::new(tmp);
        let first = queue.placeholder(&file, 0, 1000, true);
        let last = queue.placeholder(&file, 1000, 2000, false);

        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 3000\r\n\r\n";
        assert!(!corked(&stream.tcp));
        let n = stream
            .write_vectored(&[IoSlice::new(head), IoSlice::new(&first)])
            .await
            .unwrap();
        assert_eq!(n, head.len(), "the head is written up to the placeholder");
        assert!(corked(&stream.tcp), "the head waits for the first chunk");
        stream.write_all(&first).await.unwrap();
        assert!(corked(&stream.tcp), "more is ready behind the first chunk");
        stream.write_all(&last).await.unwrap();
        assert!(!corked(&stream.tcp), "the last chunk is not held back");

        let mut got = vec![0u8; head.len() + data.len()];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..head.len()], head);
        assert_eq!(&got[head.len()..], &data[..]);
    }
}
