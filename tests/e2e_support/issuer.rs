//! A small Docker-style token issuer (distribution's "token" auth, PROTOCOL.md section 2) for the
//! real `docker-registry` upstream.
//!
//! `GET /token?service=..&scope=..[&scope=..]`, optionally with HTTP Basic credentials:
//! - anonymous clients get `pull` on public repositories (those not under
//!   [`IssuerConfig::private_prefix`]) and nothing else;
//! - the configured user gets whatever it asks for, everywhere;
//! - wrong credentials get 401.
//!
//! Tokens are ES256 JWTs whose header carries an `x5c` chain of one self-signed certificate made
//! with rcgen for this issuer instance. docker-registry 2.8 verifies a token's signing key from
//! `x5c` against `auth.token.rootcertbundle` (the same certificate, written to a PEM file here), then
//! checks `iss`, `aud` (= the service), `exp`/`nbf` and the `access` claim.

use parking_lot::Mutex;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;

/// Who may do what, and the names that go into the tokens.
#[derive(Clone, Debug)]
pub struct IssuerConfig {
    pub service: String,
    pub issuer: String,
    pub user: String,
    pub password: String,
    pub private_prefix: String,
    /// `expires_in` of issued tokens, in seconds.
    pub expires_in: u64,
}

impl Default for IssuerConfig {
    fn default() -> Self {
        IssuerConfig {
            service: super::SERVICE.to_owned(),
            issuer: super::ISSUER.to_owned(),
            user: super::USER.to_owned(),
            password: super::PASSWORD.to_owned(),
            private_prefix: super::PRIVATE_PREFIX.to_owned(),
            expires_in: 300,
        }
    }
}

/// One token request as the issuer saw it.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    /// The authenticated user, `None` for anonymous.
    pub user: Option<String>,
    pub service: Option<String>,
    pub scopes: Vec<String>,
    pub status: u16,
    /// `(type, name, actions)` granted.
    pub granted: Vec<(String, String, Vec<String>)>,
}

struct Inner {
    config: IssuerConfig,
    encoding_key: jsonwebtoken::EncodingKey,
    cert_b64: String,
    log: Mutex<Vec<TokenRequest>>,
}

/// A running token issuer; the server task stops when this is dropped.
pub struct TokenIssuer {
    addr: SocketAddr,
    inner: Arc<Inner>,
    root_pem: PathBuf,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl TokenIssuer {
    /// Generates a key and self-signed certificate, and serves `/token` on `127.0.0.1:0`.
    /// Must be called within a tokio runtime.
    pub async fn start(config: IssuerConfig) -> TokenIssuer {
        let key = rcgen::KeyPair::generate().expect("generate ES256 key");
        let mut params =
            rcgen::CertificateParams::new(vec!["cachalot-e2e-issuer".to_owned()]).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "cachalot e2e token issuer");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("self-signed certificate");

        let dir = super::tools::tempdir("issuer");
        let root_pem = dir.path().join("root.pem");
        std::fs::write(&root_pem, cert.pem()).expect("write root cert bundle");

        let encoding_key = jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes())
            .expect("load ES256 key into jsonwebtoken");
        let cert_b64 = base64::engine::general_purpose::STANDARD.encode(cert.der());
        let inner = Arc::new(Inner {
            config,
            encoding_key,
            cert_b64,
            log: Mutex::new(Vec::new()),
        });

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind token issuer");
        let addr = listener.local_addr().expect("issuer addr");
        let served = inner.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let inner = served.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let inner = inner.clone();
                        async move { Ok::<_, Infallible>(handle(&inner, req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        TokenIssuer {
            addr,
            inner,
            root_pem,
            _dir: dir,
            task,
        }
    }

    /// The token endpoint, `http://127.0.0.1:PORT/token` (the registry's `realm`).
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// PEM file holding the issuer's certificate (the registry's `rootcertbundle`).
    pub fn root_cert_bundle(&self) -> &std::path::Path {
        &self.root_pem
    }

    pub fn config(&self) -> &IssuerConfig {
        &self.inner.config
    }

    /// Every token request received so far.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.inner.log.lock().clone()
    }

    /// Issues a token directly (for tests that talk to the registry themselves).
    pub fn token_for(&self, user: Option<&str>, scopes: &[&str]) -> String {
        let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
        let granted = grant(&self.inner.config, user, &scopes);
        sign(&self.inner, user, &granted).0
    }
}

impl Drop for TokenIssuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn handle(inner: &Inner, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() != "/token" {
        return reply(StatusCode::NOT_FOUND, json!({"error": "not found"}));
    }
    let mut service = None;
    let mut scopes = Vec::new();
    for (k, v) in form_pairs(req.uri().query().unwrap_or("")) {
        match k.as_str() {
            "service" => service = Some(v),
            // One scope parameter may itself hold several space-separated scopes.
            "scope" => scopes.extend(v.split(' ').filter(|s| !s.is_empty()).map(str::to_owned)),
            _ => {}
        }
    }

    let cfg = &inner.config;
    let user = match basic_credentials(&req) {
        None => None,
        Some((u, p)) if u == cfg.user && p == cfg.password => Some(u),
        Some((u, _)) => {
            inner.log.lock().push(TokenRequest {
                user: Some(u),
                service,
                scopes,
                status: 401,
                granted: Vec::new(),
            });
            return reply(
                StatusCode::UNAUTHORIZED,
                json!({"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]}),
            );
        }
    };
    if service.as_deref().is_some_and(|s| s != cfg.service) {
        inner.log.lock().push(TokenRequest {
            user,
            service,
            scopes,
            status: 400,
            granted: Vec::new(),
        });
        return reply(
            StatusCode::BAD_REQUEST,
            json!({"errors": [{"code": "DENIED", "message": "unknown service"}]}),
        );
    }

    let granted = grant(cfg, user.as_deref(), &scopes);
    let (token, issued_at) = sign(inner, user.as_deref(), &granted);
    inner.log.lock().push(TokenRequest {
        user,
        service,
        scopes,
        status: 200,
        granted,
    });
    reply(
        StatusCode::OK,
        json!({
            "token": token,
            "access_token": token,
            "expires_in": cfg.expires_in,
            "issued_at": issued_at,
        }),
    )
}

/// The intersection of what was asked and what `user` may do.
fn grant(
    cfg: &IssuerConfig,
    user: Option<&str>,
    scopes: &[String],
) -> Vec<(String, String, Vec<String>)> {
    let mut out = Vec::new();
    for scope in scopes {
        // type:name:actions, where name may itself contain ':' (host:port/repo).
        let Some((kind, rest)) = scope.split_once(':') else {
            continue;
        };
        let Some((name, actions)) = rest.rsplit_once(':') else {
            continue;
        };
        let asked = actions.split(',').filter(|a| !a.is_empty());
        let allowed: Vec<String> = if user.is_some() {
            asked.map(str::to_owned).collect()
        } else if kind == "repository" && !name.starts_with(&cfg.private_prefix) {
            asked.filter(|a| *a == "pull").map(str::to_owned).collect()
        } else {
            Vec::new()
        };
        if !allowed.is_empty() {
            out.push((kind.to_owned(), name.to_owned(), allowed));
        }
    }
    out
}

fn sign(
    inner: &Inner,
    user: Option<&str>,
    granted: &[(String, String, Vec<String>)],
) -> (String, String) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    let secs = now.as_secs();
    let access: Vec<_> = granted
        .iter()
        .map(|(kind, name, actions)| json!({"type": kind, "name": name, "actions": actions}))
        .collect();
    let claims = json!({
        "iss": inner.config.issuer,
        "sub": user.unwrap_or(""),
        "aud": inner.config.service,
        "exp": secs + inner.config.expires_in,
        "nbf": secs.saturating_sub(10),
        "iat": secs,
        "jti": format!("{}-{}", secs, now.subsec_nanos()),
        "access": access,
    });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.x5c = Some(vec![inner.cert_b64.clone()]);
    let token =
        jsonwebtoken::encode(&header, &claims, &inner.encoding_key).expect("sign token (ES256)");
    (token, rfc3339(secs))
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("response")
}

fn basic_credentials<B>(req: &Request<B>) -> Option<(String, String)> {
    let value = req
        .headers()
        .get(hyper::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, b64) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_owned(), p.to_owned()))
}

/// `application/x-www-form-urlencoded` pairs of a query string.
pub fn form_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
                continue;
            }
            (b'+', _) => out.push(b' '),
            (b, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Seconds since the epoch as RFC 3339 UTC (`issued_at`), from the page's own calendar.
fn rfc3339(secs: u64) -> String {
    cachalot::ui::html::timestamp(secs)
        .replacen(' ', "T", 1)
        .replace(" UTC", "Z")
}
