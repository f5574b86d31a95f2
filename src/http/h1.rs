//! cachalot's own HTTP/1.1 path, for plain connections that send blobs with sendfile: the
//! path a fleet's pulls take when the mirror sits behind a TLS-terminating balancer or is
//! listed as an insecure registry.
//!
//! hyper keeps about 33 KB on each connection (massif, README "Many clients at once"): an
//! 8 KiB read buffer that a request in flight doubles, an 8 KiB write buffer allocated with
//! the connection, and a task sized for HTTP/2's state as well as HTTP/1's. At 5,000 clients
//! that put cachalot at 3.7 times nginx's memory. Here a connection between requests holds no
//! buffer at all: the head is read into a buffer allocated when bytes arrive, parsed with
//! httparse (hyper's own parser), and freed once the request is built; the response head
//! goes out in the same `writev` as the body's first chunk, which the socket sends with
//! sendfile (see `sendfile.rs`).
//!
//! Only the plainest requests are answered here: HTTP/1.1, an origin-form target, no body, no
//! `Expect`, no upgrade, a head under [`LEAN_HEAD_MAX`]. That is every pull a registry client
//! makes. Anything else, from that request on, is handed to hyper with the bytes read so far,
//! and hyper serves the rest of the connection as it did before (its answers to malformed or
//! oversized heads included). HTTP/2's prior-knowledge preface is handed over the same way.

use super::body::Body;
use super::conns::Activity;
use super::sendfile::SendfileStream;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::cell::RefCell;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

/// A head longer than this goes to hyper, which buffers up to `MAX_HEAD_BUFFER` and answers
/// 431 past it. Registry clients send heads of a few hundred bytes to a few kilobytes.
const LEAN_HEAD_MAX: usize = 8 * 1024;

/// The buffer a head is read into, at first; it doubles up to [`LEAN_HEAD_MAX`].
const FIRST_READ: usize = 1024;

/// More header lines than this go to hyper (whose limit is 100).
const MAX_HEADERS: usize = 64;

/// A request's body, as the answering function sees it. Nothing that answers reads one (a
/// mirror takes no uploads); hyper's is kept so that hyper drains or refuses it as before.
pub(crate) enum ReqBody {
    Hyper(#[allow(dead_code)] Incoming),
    /// Requests taken here, which are only those without a body.
    Empty,
}

/// How a connection served here ended.
pub(super) enum Ended {
    /// Closed: by the client, after a response that closes, at the header timeout, or when
    /// asked to (the stop, or room for a new connection).
    Closed,
    /// A request this path does not take has begun: these bytes, read from the socket, start
    /// it, and hyper serves the connection from here.
    HandOff(Bytes),
}

/// Serves requests on `stream` until it closes or a request needs hyper. `respond` answers a
/// request (and marks the connection busy until the response body is dropped).
pub(super) async fn serve<R, F>(
    stream: &mut SendfileStream,
    activity: &Activity,
    header_timeout: Duration,
    mut respond: R,
) -> io::Result<Ended>
where
    R: FnMut(Request<ReqBody>) -> F,
    F: Future<Output = Response<Body>> + Send,
{
    let mut buf: Vec<u8> = Vec::new();
    let mut registered: Option<Waker> = None;
    let timeout = tokio::time::sleep(header_timeout);
    tokio::pin!(timeout);
    loop {
        // From the accept, or from the end of the previous response.
        timeout
            .as_mut()
            .reset(tokio::time::Instant::now() + header_timeout);
        let (req, wants_close) = loop {
            if !buf.is_empty() {
                match parse(&buf) {
                    Parsed::Request(req, used, close) => {
                        buf.drain(..used);
                        break (req, close);
                    }
                    Parsed::Partial if buf.len() < LEAN_HEAD_MAX => {}
                    Parsed::Partial | Parsed::NotHere => {
                        return Ok(Ended::HandOff(Bytes::from(buf)));
                    }
                }
            }
            // Waits for bytes without a buffer: an idle keep-alive connection holds none.
            tokio::select! {
                biased;
                r = stream.readable() => r?,
                () = &mut timeout => return Ok(Ended::Closed),
                // Even with part of a head read: hyper closes such a connection at once too.
                () = closing(activity, &mut registered) => return Ok(Ended::Closed),
            }
            if buf.len() == buf.capacity() {
                buf.reserve(buf.capacity().clamp(FIRST_READ, LEAN_HEAD_MAX));
            }
            match stream.try_read_buf(&mut buf) {
                Ok(0) => return Ok(Ended::Closed),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        };
        if buf.is_empty() {
            buf = Vec::new();
        }
        let head_only = req.method() == Method::HEAD;
        // Boxed: the answer's future is kilobytes large, and inline it would size every
        // connection's task, idle or not, for the time it runs.
        let answer = Box::pin(respond(req));
        // A client gone before its answer is ready cancels it, as hyper does.
        let resp = tokio::select! {
            biased;
            resp = answer => resp,
            // Not with requests already read behind this one: a client that pipelines them and
            // then shuts its side (as `nc` does) is still owed their answers.
            () = gone(stream), if buf.is_empty() => return Ok(Ended::Closed),
        };
        let close = wants_close || activity.closing();
        if !write_response(stream, resp, head_only, close, buf.is_empty()).await? {
            let _ = stream.shutdown().await;
            return Ok(Ended::Closed);
        }
    }
}

/// Ready once the client has closed its side or reset the connection; never, once it has
/// sent bytes (the next request, read after this answer).
async fn gone(stream: &SendfileStream) {
    if !stream.client_gone().await {
        std::future::pending::<()>().await;
    }
}

/// Ready once the accept loop has asked the connection to close.
fn closing<'a>(
    activity: &'a Activity,
    registered: &'a mut Option<Waker>,
) -> impl Future<Output = ()> + 'a {
    std::future::poll_fn(move |cx| {
        if activity.poll_close(cx, registered) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
}

// Only ever a return value, moved once: boxing the request would cost an allocation a request.
#[allow(clippy::large_enum_variant)]
enum Parsed {
    /// A request this path answers, the bytes its head took, and whether the client asked to
    /// close after it.
    Request(Request<ReqBody>, usize, bool),
    /// The head is not complete yet.
    Partial,
    /// hyper's to answer: see the module's comment.
    NotHere,
}

fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Request::new(&mut headers);
    let used = match head.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::NotHere,
    };
    let (Some(method), Some(path), Some(1)) = (head.method, head.path, head.version) else {
        return Parsed::NotHere;
    };
    if !path.starts_with('/') {
        return Parsed::NotHere;
    }
    let (Ok(method), Ok(uri)) = (Method::from_bytes(method.as_bytes()), Uri::try_from(path)) else {
        return Parsed::NotHere;
    };
    let mut map = HeaderMap::with_capacity(head.headers.len());
    let mut close = false;
    for h in head.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            return Parsed::NotHere;
        };
        match name {
            header::TRANSFER_ENCODING | header::EXPECT | header::UPGRADE => return Parsed::NotHere,
            // Zero, however written, is no body; anything else (an empty value included, which
            // hyper refuses) is hyper's to answer.
            header::CONTENT_LENGTH if h.value.is_empty() || h.value.iter().any(|&b| b != b'0') => {
                return Parsed::NotHere;
            }
            header::CONNECTION => {
                if has_token(&value, "upgrade") {
                    return Parsed::NotHere;
                }
                close |= has_token(&value, "close");
            }
            _ => {}
        }
        map.append(name, value);
    }
    let mut req = Request::new(ReqBody::Empty);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = map;
    Parsed::Request(req, used, close)
}

/// Whether a comma-separated header value names `token` (ASCII case-insensitively).
fn has_token(value: &HeaderValue, token: &str) -> bool {
    value
        .as_bytes()
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// How a response's body is framed on the wire.
#[derive(Debug, PartialEq)]
enum Framing {
    /// No body follows the head (HEAD, 204, 304), whatever its `content-length` says.
    None,
    Length(u64),
    Chunked,
}

/// Writes `resp`: its head, as hyper writes one (a `date`, the length, `connection: close` when
/// the connection ends after it), then its body. Returns whether the connection may carry
/// another request: not after `close`, a `connection: close` from the handler, or a body that
/// failed or did not match its length.
async fn write_response(
    stream: &mut SendfileStream,
    resp: Response<Body>,
    head_only: bool,
    mut close: bool,
    mut watch: bool,
) -> io::Result<bool> {
    let (parts, mut body) = resp.into_parts();
    close |= parts
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| has_token(v, "close"));
    let (head, framing) = encode_head(
        parts.status,
        &parts.headers,
        head_only,
        close,
        body_length(&body),
    );
    let mut pending: Option<&[u8]> = Some(&head);
    let mut sent: u64 = 0;
    let expected = match framing {
        Framing::None => {
            write_all(stream, &mut [IoSlice::new(&head)]).await?;
            return Ok(!close);
        }
        Framing::Length(n) => Some(n),
        Framing::Chunked => None,
    };
    // `watch`: whether the client is watched for leaving while the body waits for bytes (a
    // fill's follower can wait long); not once it has sent its next request, which stays
    // unread, nor when requests it sent earlier are waiting.
    loop {
        let frame = tokio::select! {
            biased;
            frame = body.frame() => frame,
            left = stream.client_gone(), if watch => {
                if left {
                    return Err(io::ErrorKind::ConnectionReset.into());
                }
                watch = false;
                continue;
            }
        };
        let Some(frame) = frame else {
            break;
        };
        let Ok(frame) = frame else {
            return cut_short(stream, pending).await;
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        sent += data.len() as u64;
        if expected.is_some_and(|n| sent > n) {
            // More than the length declared: not one byte of this chunk goes out.
            return cut_short(stream, pending).await;
        }
        let head_part = pending.take().unwrap_or_default();
        if expected.is_some() {
            write_all(stream, &mut [IoSlice::new(head_part), IoSlice::new(&data)]).await?;
        } else {
            let size = format!("{:x}\r\n", data.len());
            write_all(
                stream,
                &mut [
                    IoSlice::new(head_part),
                    IoSlice::new(size.as_bytes()),
                    IoSlice::new(&data),
                    IoSlice::new(b"\r\n"),
                ],
            )
            .await?;
        }
    }
    let head_part = pending.take().unwrap_or_default();
    match expected {
        Some(n) => {
            if !head_part.is_empty() {
                write_all(stream, &mut [IoSlice::new(head_part)]).await?;
            }
            if sent != n {
                return Ok(false);
            }
        }
        None => {
            write_all(
                stream,
                &mut [IoSlice::new(head_part), IoSlice::new(b"0\r\n\r\n")],
            )
            .await?
        }
    }
    Ok(!close)
}

/// Ends an answer whose body cannot be sent whole (it failed, or ran past its length): the
/// client sees the head and a short body, never a wrong one taken as whole, and knows the answer
/// failed rather than seeing the connection close unanswered. The connection then closes.
async fn cut_short(stream: &mut SendfileStream, pending: Option<&[u8]>) -> io::Result<bool> {
    if let Some(head) = pending {
        write_all(stream, &mut [IoSlice::new(head)]).await?;
    }
    Ok(false)
}

/// What a body says of its length: `Some(n)` when known (a body already at its end is 0).
fn body_length(body: &Body) -> Option<u64> {
    if body.is_end_stream() {
        Some(0)
    } else {
        body.size_hint().exact()
    }
}

/// A response head as hyper's server writes it, and how the body that follows is framed.
/// `known`: the body's own length, if it knows it.
fn encode_head(
    status: StatusCode,
    headers: &HeaderMap,
    head_only: bool,
    close: bool,
    known: Option<u64>,
) -> (Vec<u8>, Framing) {
    let mut head = Vec::with_capacity(96 + headers.len() * 48);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        if name == header::CONNECTION || name == header::TRANSFER_ENCODING {
            continue;
        }
        line(&mut head, name.as_str(), value.as_bytes());
    }
    let says_close = headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| has_token(v, "close"));
    if close && !says_close {
        // The client must hear that this connection ends here, whatever else the handler said
        // of it (hyper appends `close` to a `keep-alive`; a plain `close` says the same).
        line(&mut head, "connection", b"close");
    } else {
        for value in headers.get_all(header::CONNECTION) {
            line(&mut head, "connection", value.as_bytes());
        }
    }
    // 1xx, 204 and 304 have neither body nor length; a HEAD answer has the length its GET
    // would, and no body.
    let no_length = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let framing = if no_length || head_only {
        if !no_length && !headers.contains_key(header::CONTENT_LENGTH) {
            match known {
                Some(0) | None => {}
                Some(n) => line(
                    &mut head,
                    "content-length",
                    itoa::Buffer::new().format(n).as_bytes(),
                ),
            }
        }
        Framing::None
    } else if headers.contains_key(header::CONTENT_LENGTH) {
        // A length that does not parse frames nothing: no body can match it, so the
        // connection ends after this response (`write_response`).
        Framing::Length(declared.unwrap_or(u64::MAX))
    } else if let Some(n) = known {
        line(
            &mut head,
            "content-length",
            itoa::Buffer::new().format(n).as_bytes(),
        );
        Framing::Length(n)
    } else {
        line(&mut head, "transfer-encoding", b"chunked");
        Framing::Chunked
    };
    if !headers.contains_key(header::DATE) {
        DATE.with_borrow_mut(|d| line(&mut head, "date", d.now()));
    }
    head.extend_from_slice(b"\r\n");
    (head, framing)
}

fn line(head: &mut Vec<u8>, name: &str, value: &[u8]) {
    head.extend_from_slice(name.as_bytes());
    head.extend_from_slice(b": ");
    head.extend_from_slice(value);
    head.extend_from_slice(b"\r\n");
}

async fn write_all(stream: &mut SendfileStream, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let n = stream.write_vectored(bufs).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

/// The `date` header's value, formatted once a second per thread, as hyper does.
struct CachedDate {
    second: u64,
    text: Vec<u8>,
}

impl CachedDate {
    fn now(&mut self) -> &[u8] {
        let now = SystemTime::now();
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if second != self.second || self.text.is_empty() {
            self.second = second;
            self.text = httpdate::fmt_http_date(now).into_bytes();
        }
        &self.text
    }
}

thread_local! {
    static DATE: RefCell<CachedDate> = const {
        RefCell::new(CachedDate { second: 0, text: Vec::new() })
    };
}

/// A connection handed to hyper: the bytes already read come first.
pub(super) struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub(super) fn new(prefix: Bytes, inner: S) -> Prefixed<S> {
        Prefixed { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let taken = self.prefix.split_to(n);
            buf.put_slice(&taken);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::body;
    use crate::http::conns::Table;
    use http_body::Frame;
    use http_body_util::StreamBody;
    use std::sync::Arc;
    use tokio::io::AsyncReadExt;

    fn request(raw: &[u8]) -> (Request<ReqBody>, usize, bool) {
        match parse(raw) {
            Parsed::Request(r, used, close) => (r, used, close),
            Parsed::Partial => panic!("partial: {raw:?}"),
            Parsed::NotHere => panic!("not here: {raw:?}"),
        }
    }

    #[test]
    fn a_pull_is_taken_and_everything_else_is_left_to_hyper() {
        let raw = b"GET /v2/library/nginx/manifests/latest HTTP/1.1\r\nHost: m\r\nAccept: a, b\r\nContent-Length: 0\r\n\r\nGET /v2/ HTTP/1.1\r\n";
        let (req, used, close) = request(raw);
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri().path(), "/v2/library/nginx/manifests/latest");
        assert_eq!(req.headers()["accept"], "a, b");
        assert_eq!(req.headers()["host"], "m");
        assert_eq!(&raw[used..], b"GET /v2/ HTTP/1.1\r\n");
        assert!(!close);
        let (_, _, close) =
            request(b"HEAD /v2/?n=1 HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n");
        assert!(close);
        assert!(matches!(
            parse(b"GET /v2/ HTTP/1.1\r\nHost: m\r\n"),
            Parsed::Partial
        ));
        for raw in [
            &b"PUT /v2/a/blobs/uploads/x HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"[..],
            b"POST /v2/a/blobs/uploads/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"PUT /v2/a/manifests/t HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            b"GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
            b"GET /v2/ HTTP/1.0\r\n\r\n",
            b"GET http://m/v2/ HTTP/1.1\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET /v2/ HTTP/1.1\r\nbad header\r\n\r\n",
            b"GET /v2/ HTTP/1.1\r\nContent-Length: \r\n\r\n",
        ] {
            assert!(matches!(parse(raw), Parsed::NotHere), "{raw:?}");
        }
    }

    fn head_text(
        status: StatusCode,
        headers: &[(&str, &str)],
        head_only: bool,
        close: bool,
        known: Option<u64>,
    ) -> (String, Framing) {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let (head, framing) = encode_head(status, &map, head_only, close, known);
        let text = String::from_utf8(head).unwrap();
        // The date changes; its presence is what matters.
        let (before, after) = text.split_once("date: ").expect("a date header");
        let (_, rest) = after.split_once("\r\n").unwrap();
        (format!("{before}{rest}"), framing)
    }

    #[test]
    fn heads_are_framed_as_hyper_frames_them() {
        let (t, f) = head_text(
            StatusCode::OK,
            &[("content-type", "x")],
            false,
            false,
            Some(5),
        );
        assert_eq!(
            t,
            "HTTP/1.1 200 OK\r\ncontent-type: x\r\ncontent-length: 5\r\n\r\n"
        );
        assert_eq!(f, Framing::Length(5));
        // The handler's own length is kept; HEAD sends the length and no body.
        let (t, f) = head_text(
            StatusCode::OK,
            &[("content-length", "9")],
            true,
            false,
            Some(0),
        );
        assert_eq!(t, "HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n");
        assert_eq!(f, Framing::None);
        let (t, _) = head_text(StatusCode::OK, &[], true, false, Some(0));
        assert_eq!(t, "HTTP/1.1 200 OK\r\n\r\n");
        let (t, f) = head_text(StatusCode::NOT_FOUND, &[], false, true, Some(0));
        assert_eq!(
            t,
            "HTTP/1.1 404 Not Found\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
        );
        assert_eq!(f, Framing::Length(0));
        let (t, f) = head_text(StatusCode::NOT_MODIFIED, &[], false, false, Some(0));
        assert_eq!(t, "HTTP/1.1 304 Not Modified\r\n\r\n");
        assert_eq!(f, Framing::None);
        let (t, f) = head_text(
            StatusCode::OK,
            &[("connection", "close")],
            false,
            true,
            None,
        );
        assert_eq!(
            t,
            "HTTP/1.1 200 OK\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        assert_eq!(f, Framing::Chunked);
        // A handler's `keep-alive` on an answer after which the connection closes.
        let (t, _) = head_text(
            StatusCode::OK,
            &[("connection", "keep-alive")],
            false,
            true,
            Some(0),
        );
        assert_eq!(
            t,
            "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
        );
    }

    /// Reads one response off `c`: its head, and its body by `content-length` or chunks.
    async fn response(c: &mut tokio::net::TcpStream, pending: &mut Vec<u8>) -> (String, Vec<u8>) {
        loop {
            if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8(pending[..end + 4].to_vec()).unwrap();
                pending.drain(..end + 4);
                let lower = head.to_ascii_lowercase();
                let mut body = Vec::new();
                if let Some(len) = lower
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .filter(|_| !head.contains("x-path: /head"))
                {
                    let len: usize = len.trim().parse().unwrap();
                    while pending.len() < len {
                        read_more(c, pending).await;
                    }
                    body = pending.drain(..len).collect();
                } else if lower.contains("transfer-encoding: chunked") {
                    loop {
                        while !pending.windows(2).any(|w| w == b"\r\n") {
                            read_more(c, pending).await;
                        }
                        let eol = pending.windows(2).position(|w| w == b"\r\n").unwrap();
                        let size = usize::from_str_radix(
                            std::str::from_utf8(&pending[..eol]).unwrap(),
                            16,
                        )
                        .unwrap();
                        while pending.len() < eol + 2 + size + 2 {
                            read_more(c, pending).await;
                        }
                        body.extend_from_slice(&pending[eol + 2..eol + 2 + size]);
                        pending.drain(..eol + 2 + size + 2);
                        if size == 0 {
                            break;
                        }
                    }
                }
                return (head, body);
            }
            read_more(c, pending).await;
        }
    }

    async fn read_more(c: &mut tokio::net::TcpStream, pending: &mut Vec<u8>) {
        let mut chunk = [0u8; 4096];
        let n = c.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "closed early; have {:?}",
            String::from_utf8_lossy(pending)
        );
        pending.extend_from_slice(&chunk[..n]);
    }

    /// Serves one connection, on a port of its own, with `respond`; the task ends with what
    /// `serve` returned.
    async fn serve_one<R, F>(
        header_timeout: Duration,
        respond: R,
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<Ended>)
    where
        R: FnMut(Request<ReqBody>) -> F + Send + 'static,
        F: Future<Output = Response<Body>> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut stream = SendfileStream::new(tcp);
            let activity = Table::new().add(0);
            serve(&mut stream, &activity, header_timeout, respond)
                .await
                .unwrap()
        });
        (addr, server)
    }

    /// Sends `request` on a new connection and reads what comes back until the server closes it.
    async fn until_closed(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(request).await.unwrap();
        let mut all = Vec::new();
        c.read_to_end(&mut all).await.unwrap();
        String::from_utf8(all).unwrap()
    }

    /// Pipelined requests are answered in order on one connection, each framed so that the
    /// next can be read, and the first request with a body is handed over with its bytes.
    #[tokio::test]
    async fn pipelined_pulls_are_answered_in_order_and_an_upload_goes_to_hyper() {
        let answered = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let seen = answered.clone();
        let (addr, server) = serve_one(Duration::from_secs(5), move |req| {
            let path = req.uri().path().to_string();
            seen.lock().push(format!("{} {path}", req.method()));
            async move {
                match path.as_str() {
                    "/chunked" => {
                        let frames = futures_util::stream::iter(
                            ["ab", "", "cde"].map(|s| Ok(Frame::data(Bytes::from(s)))),
                        );
                        StreamBody::new(frames).boxed_unsync()
                    }
                    "/head" => body::full("not sent"),
                    p => body::full(format!("answer to {p}")),
                }
                .pipe(|b| Response::builder().header("x-path", path).body(b).unwrap())
            }
        })
        .await;
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(
            b"GET /a HTTP/1.1\r\n\r\nGET /chunked HTTP/1.1\r\n\r\nHEAD /head HTTP/1.1\r\nx-head-only: 1\r\n\r\nGET /b HTTP/1.1\r\n\r\nPUT /up HTTP/1.1\r\ncontent-length: 2\r\n\r\nhi",
        )
        .await
        .unwrap();
        let mut pending = Vec::new();
        let (head, body) = response(&mut c, &mut pending).await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(
            head.contains("content-length: 12\r\n") && head.contains("date: "),
            "{head}"
        );
        assert_eq!(body, b"answer to /a");
        let (head, body) = response(&mut c, &mut pending).await;
        assert!(head.contains("transfer-encoding: chunked"), "{head}");
        assert_eq!(body, b"abcde");
        let (head, body) = response(&mut c, &mut pending).await;
        assert!(head.contains("content-length: 8\r\n"), "{head}");
        assert!(body.is_empty());
        let (head, body) = response(&mut c, &mut pending).await;
        assert!(head.contains("x-path: /b"), "{head}");
        assert_eq!(body, b"answer to /b");
        let prefix = match server.await.unwrap() {
            Ended::HandOff(prefix) => prefix,
            Ended::Closed => panic!("closed instead of handing over"),
        };
        let answered = answered.lock().clone();
        assert_eq!(
            &prefix[..],
            b"PUT /up HTTP/1.1\r\ncontent-length: 2\r\n\r\nhi"
        );
        assert_eq!(answered, ["GET /a", "GET /chunked", "HEAD /head", "GET /b"]);
    }

    /// A client that asks to close is answered and closed; one that sends nothing is closed at
    /// the header timeout.
    #[tokio::test]
    async fn close_and_silence_end_the_connection() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            for _ in 0..2 {
                let (tcp, _) = listener.accept().await.unwrap();
                let mut stream = SendfileStream::new(tcp);
                let activity = Table::new().add(0);
                let ended = serve(
                    &mut stream,
                    &activity,
                    Duration::from_millis(300),
                    |_req| async { Response::new(body::full("x")) },
                )
                .await
                .unwrap();
                assert!(matches!(ended, Ended::Closed));
            }
        });
        let text = until_closed(addr, b"GET /x HTTP/1.1\r\nconnection: close\r\n\r\n").await;
        assert!(
            text.contains("connection: close\r\n") && text.ends_with("\r\n\r\nx"),
            "{text}"
        );
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut all = Vec::new();
        let started = std::time::Instant::now();
        c.read_to_end(&mut all).await.unwrap();
        assert!(all.is_empty() && started.elapsed() < Duration::from_secs(5));
        server.await.unwrap();
    }

    /// A client that pipelines requests and then shuts its side (as `nc` does) gets the answers
    /// to every request that had another waiting behind it: its end of stream is not taken for
    /// leaving while requests it sent wait. (The last is cancelled by the end of stream, as
    /// hyper's server, without half-close support, cancels it.)
    #[tokio::test]
    async fn pipelined_requests_before_a_half_close_are_all_answered() {
        let (addr, server) = serve_one(Duration::from_secs(5), |req| {
            let path = req.uri().path().to_string();
            async move {
                // Answered a moment later, so the end of stream is there before it.
                tokio::time::sleep(Duration::from_millis(20)).await;
                Response::new(body::full(path))
            }
        })
        .await;
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\nGET /c HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        c.shutdown().await.unwrap();
        let mut pending = Vec::new();
        for want in ["/a", "/b"] {
            let (head, body) = response(&mut c, &mut pending).await;
            assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
            assert_eq!(body, want.as_bytes());
        }
        assert!(matches!(server.await.unwrap(), Ended::Closed));
    }

    /// A body that cannot be sent whole (one failing before its first byte, one longer than the
    /// length its head declares) still sends the head, and nothing of the body, then closes: the
    /// client sees a short answer, not a connection closed without one, nor bytes past the length.
    #[tokio::test]
    async fn a_body_that_cannot_be_sent_whole_sends_its_head_and_closes() {
        for (declared, failing) in [("10", true), ("2", false)] {
            let (addr, server) = serve_one(Duration::from_secs(5), move |_req| async move {
                let body = if failing {
                    let frames =
                        futures_util::stream::iter([Err::<Frame<Bytes>, body::BodyError>(
                            "damaged".into(),
                        )]);
                    http_body_util::StreamBody::new(frames).boxed_unsync()
                } else {
                    body::full("hello")
                };
                Response::builder()
                    .header("content-length", declared)
                    .body(body)
                    .unwrap()
            })
            .await;
            let text = until_closed(addr, b"GET /x HTTP/1.1\r\n\r\nGET /y HTTP/1.1\r\n\r\n").await;
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {declared}\r\n");
            assert!(text.starts_with(&head), "{text}");
            assert!(text.ends_with("\r\n\r\n"), "{text}");
            assert!(matches!(server.await.unwrap(), Ended::Closed));
        }
    }

    trait Pipe: Sized {
        fn pipe<T>(self, f: impl FnOnce(Self) -> T) -> T {
            f(self)
        }
    }
    impl<T> Pipe for T {}
}
