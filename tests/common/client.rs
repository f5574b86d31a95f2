//! A tiny HTTP client for tests: hyper-util's legacy client over plain HTTP, with a safety-net
//! timeout on every call.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::header::HeaderMap;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Safety net for any single HTTP exchange in a test (not a performance assertion).
pub const SAFETY: Duration = Duration::from_secs(60);

/// A response read to the end.
#[derive(Debug)]
pub struct Resp {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl Resp {
    /// A header as a string.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("header is ascii").to_string())
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The first OCI error code of the body, if it is an OCI error envelope.
    pub fn error_code(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        v["errors"][0]["code"].as_str().map(str::to_string)
    }

    /// The first OCI error message, if any.
    pub fn error_message(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        v["errors"][0]["message"].as_str().map(str::to_string)
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// What reading a body to the end gave: the bytes received and whether it ended with an error.
#[derive(Debug)]
pub struct Drained {
    /// Bytes received before the end or the error.
    pub bytes: Bytes,
    /// The body error, if the body did not end normally.
    pub error: Option<String>,
}

/// The test client.
#[derive(Clone)]
pub struct TestClient {
    inner: Client<HttpConnector, Empty<Bytes>>,
}

impl Default for TestClient {
    fn default() -> Self {
        Self::new()
    }
}

impl TestClient {
    /// A pooled client.
    pub fn new() -> TestClient {
        TestClient {
            inner: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// A client that opens a fresh connection per request.
    pub fn unpooled() -> TestClient {
        TestClient {
            inner: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(0)
                .build_http(),
        }
    }

    /// Sends a request and returns the response with its body unread.
    pub async fn send_raw(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
    ) -> Response<Incoming> {
        let mut req = Request::builder().method(method.clone()).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Empty::new()).expect("request");
        tokio::time::timeout(SAFETY, self.inner.request(req))
            .await
            .unwrap_or_else(|_| panic!("safety timeout: {method} {url}"))
            .unwrap_or_else(|e| panic!("{method} {url}: {e:?}"))
    }

    /// Sends a request and reads the whole body; panics if the body does not end normally.
    pub async fn send(&self, method: Method, url: &str, headers: &[(&str, &str)]) -> Resp {
        let resp = self.send_raw(method.clone(), url, headers).await;
        let (parts, body) = resp.into_parts();
        let d = drain(body).await;
        if let Some(e) = d.error {
            panic!(
                "{method} {url}: body ended with an error after {} bytes: {e}",
                d.bytes.len()
            );
        }
        Resp {
            status: parts.status,
            headers: parts.headers,
            body: d.bytes,
        }
    }

    /// GET with no extra headers.
    pub async fn get(&self, url: &str) -> Resp {
        self.send(Method::GET, url, &[]).await
    }

    /// GET with headers.
    pub async fn get_with(&self, url: &str, headers: &[(&str, &str)]) -> Resp {
        self.send(Method::GET, url, headers).await
    }

    /// HEAD with no extra headers.
    pub async fn head(&self, url: &str) -> Resp {
        self.send(Method::HEAD, url, &[]).await
    }

    /// GET, then read the body to the end or to its error, reporting both.
    pub async fn get_drained(&self, url: &str) -> (StatusCode, HeaderMap, Drained) {
        let resp = self.send_raw(Method::GET, url, &[]).await;
        let (parts, body) = resp.into_parts();
        (parts.status, parts.headers, drain(body).await)
    }
}

/// Reads a body to its end or its first error (with the safety-net timeout).
pub async fn drain(mut body: Incoming) -> Drained {
    let mut buf = Vec::new();
    let fut = async {
        loop {
            match body.frame().await {
                None => return None,
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        buf.extend_from_slice(&d);
                    }
                }
                Some(Err(e)) => return Some(format!("{e:?}")),
            }
        }
    };
    let error = match tokio::time::timeout(SAFETY, fut).await {
        Ok(e) => e,
        Err(_) => Some("safety timeout while reading the body".to_string()),
    };
    Drained {
        bytes: Bytes::from(buf),
        error,
    }
}

/// Reads frames until at least `n` bytes arrived (or the body ends); returns them.
pub async fn read_at_least(body: &mut Incoming, n: usize) -> Vec<u8> {
    let mut buf = Vec::new();
    let fut = async {
        while buf.len() < n {
            match body.frame().await {
                None => break,
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        buf.extend_from_slice(&d);
                    }
                }
                Some(Err(e)) => panic!("body error after {} bytes: {e:?}", buf.len()),
            }
        }
    };
    tokio::time::timeout(SAFETY, fut)
        .await
        .expect("safety timeout waiting for first bytes");
    buf
}
