//! Answers `/`, `/ui`, `/ui/...` and `/ui/api/...`. The caller (http/handlers.rs) has
//! authenticated the request as it does for pulls; here every read is narrowed to what that
//! caller may pull.

use super::Ui;
use super::html;
use super::model::{ListQuery, MayPull};
use crate::auth::{Auth, Principal};
use crate::error::Error;
use crate::http::body::{self, Body};
use crate::metrics::Metrics;
use crate::mirror::Mirror;
use crate::oci::ErrorCode;
use http::{HeaderValue, Response, header};
use std::sync::Arc;

const STYLE: &str = include_str!("style.css");
const SCRIPT: &str = include_str!("ui.js");

/// Who is asking, and what the server knows of them.
pub(crate) struct Caller {
    pub auth: Option<Arc<Auth>>,
    pub who: Option<Principal>,
}

impl Caller {
    fn may_pull(&self, upstream: &str, repo: &str) -> bool {
        match (&self.auth, &self.who) {
            (Some(auth), Some(who)) => auth.may_pull(who, upstream, repo),
            // With [auth], every request has a principal by now; without it, everyone may.
            (Some(_), None) => false,
            (None, _) => true,
        }
    }
}

/// The parts of the request the page reads.
pub(crate) struct Asked<'a> {
    /// The path after `/ui` (`""`, `/`, `/image`, `/api/images`, ...), or `None` for `/`.
    pub path: Option<&'a str>,
    pub query: Option<&'a str>,
    /// `Host`, for the pull commands.
    pub host: Option<&'a str>,
    pub head: bool,
}

fn not_found() -> Error {
    Error::client(ErrorCode::NameUnknown, "no such endpoint")
}

fn respond(
    content_type: &'static str,
    cache: &'static str,
    text: String,
    head: bool,
) -> Response<Body> {
    let len = text.len();
    let mut resp = Response::new(if head {
        body::empty()
    } else {
        body::full(text)
    });
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    // Only the server's own stylesheet and script: nothing inline, nothing from elsewhere.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'self'; script-src 'self'; connect-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

fn json(value: &impl serde::Serialize, head: bool) -> Result<Response<Body>, Error> {
    let text = serde_json::to_string(value).map_err(|e| Error::Internal(e.to_string()))?;
    Ok(respond("application/json", "no-store", text, head))
}

fn page(text: String, head: bool) -> Response<Body> {
    respond("text/html; charset=utf-8", "no-store", text, head)
}

fn param(query: Option<&str>, key: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// Runs a blocking read of the cache on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("page task: {e}")))?
        .map_err(Error::from)
}

pub(crate) async fn serve(
    ui: &Arc<Ui>,
    mirror: &Arc<Mirror>,
    metrics: &Arc<Metrics>,
    caller: Caller,
    asked: Asked<'_>,
) -> Result<Response<Body>, Error> {
    if !ui.enabled() {
        return Err(not_found());
    }
    let head = asked.head;
    let Some(path) = asked.path else {
        return Ok(page(html::root(), head));
    };
    match path {
        "/style.css" => Ok(respond(
            "text/css; charset=utf-8",
            "max-age=3600",
            STYLE.to_owned(),
            head,
        )),
        "/ui.js" => Ok(respond(
            "text/javascript; charset=utf-8",
            "max-age=3600",
            SCRIPT.to_owned(),
            head,
        )),
        "" | "/" | "/api/overview" | "/api/images" => {
            let may: MayPull<'_> = &|u, r| caller.may_pull(u, r);
            let overview = ui.overview(mirror, metrics, may);
            if path == "/api/overview" {
                return json(&overview, head);
            }
            let query = ListQuery::parse(asked.query);
            let (ui, mirror) = (ui.clone(), mirror.clone());
            let listing =
                blocking(move || ui.listing(&mirror, &query, &|u, r| caller.may_pull(u, r)))
                    .await?;
            if path == "/api/images" {
                return json(&listing, head);
            }
            Ok(page(html::page(&overview, &listing), head))
        }
        "/image" | "/api/image" => {
            let (Some(u), Some(r), Some(t)) = (
                param(asked.query, "upstream"),
                param(asked.query, "repository"),
                param(asked.query, "tag"),
            ) else {
                return Err(Error::client(
                    ErrorCode::NameInvalid,
                    "give the image as ?upstream=&repository=&tag=",
                ));
            };
            let host = asked
                .host
                .filter(|h| {
                    h.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
                })
                .unwrap_or("mirror:5000")
                .to_owned();
            let (ui, mirror) = (ui.clone(), mirror.clone());
            let detail = blocking(move || {
                ui.image(&mirror, (&u, &r, &t), &host, &|u, r| caller.may_pull(u, r))
            })
            .await?
            // Not held, or not the caller's to see: the same answer, so a name cannot be probed.
            .ok_or_else(|| {
                Error::client(ErrorCode::ManifestUnknown, "no such image in the cache")
            })?;
            if path == "/api/image" {
                json(&detail, head)
            } else {
                Ok(page(html::image(&detail), head))
            }
        }
        _ => Err(not_found()),
    }
}
