//! Upstream authentication: `WWW-Authenticate` parsing, Basic credentials, and the bearer token
//! cache (moka) per (upstream, scope).
//!
//! The parser is a pure function over a string so it can be property-tested and fuzzed; it never
//! panics and never fails, it returns what it could make sense of. Secrets (passwords, tokens)
//! have a redacted `Debug` and are never logged.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

// === WWW-Authenticate ===

/// One challenge from a `WWW-Authenticate` header (RFC 9110 §11.6.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    pub scheme: Scheme,
    /// Parameters in order, names lowercased, quoted values unescaped.
    pub params: Vec<(String, String)>,
}

/// The authentication scheme of a challenge. Matching is case-insensitive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scheme {
    Bearer,
    Basic,
    /// Any other scheme, lowercased.
    Other(String),
}

impl Challenge {
    /// The value of parameter `name` (lowercase), if present.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn realm(&self) -> Option<&str> {
        self.param("realm")
    }

    /// The Bearer parameters, if this is a Bearer challenge with a realm.
    pub fn bearer(&self) -> Option<BearerChallenge> {
        if self.scheme != Scheme::Bearer {
            return None;
        }
        Some(BearerChallenge {
            realm: self.realm().filter(|r| !r.is_empty())?.to_owned(),
            service: self.param("service").map(str::to_owned),
            scope: self.param("scope").map(str::to_owned),
        })
    }
}

/// A Bearer challenge: where to get a token, for which service and scope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BearerChallenge {
    pub realm: String,
    pub service: Option<String>,
    pub scope: Option<String>,
}

/// `tchar` from RFC 9110 §5.6.2.
fn is_tchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

/// `token68` adds these to alphanumerics, and ends with any number of `=`.
fn is_token68_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~+/".contains(c)
}

/// A cursor over the header value. Works on chars, so no slicing can split a UTF-8 sequence.
struct Cursor<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
}

impl Cursor<'_> {
    fn skip_ws(&mut self) {
        while self.chars.next_if(|c| *c == ' ' || *c == '\t').is_some() {}
    }

    fn skip_ws_and_commas(&mut self) {
        while self
            .chars
            .next_if(|c| matches!(c, ' ' | '\t' | ','))
            .is_some()
        {}
    }

    fn token(&mut self) -> String {
        let mut s = String::new();
        while let Some(c) = self.chars.next_if(|c| is_tchar(*c)) {
            s.push(c);
        }
        s
    }

    /// After the opening quote: up to the closing quote, with `\x` escapes. An unterminated
    /// string ends at the end of input.
    fn quoted(&mut self) -> String {
        let mut s = String::new();
        while let Some(c) = self.chars.next() {
            match c {
                '"' => break,
                '\\' => {
                    if let Some(e) = self.chars.next() {
                        s.push(e);
                    }
                }
                c => s.push(c),
            }
        }
        s
    }

    /// A `token68` followed by the end or a comma, consumed; else nothing is consumed.
    fn token68(&mut self) -> Option<String> {
        let mut probe = self.chars.clone();
        let mut t = String::new();
        while let Some(c) = probe.next_if(|c| is_token68_char(*c)) {
            t.push(c);
        }
        if t.is_empty() {
            return None;
        }
        while let Some(c) = probe.next_if_eq(&'=') {
            t.push(c);
        }
        while probe.next_if(|c| *c == ' ' || *c == '\t').is_some() {}
        if matches!(probe.peek(), None | Some(',')) {
            self.chars = probe;
            Some(t)
        } else {
            None
        }
    }

    /// Skips anything up to the next comma: recovery from garbage.
    fn skip_to_comma(&mut self) {
        while self.chars.next_if(|c| *c != ',').is_some() {}
    }
}

/// Parses a `WWW-Authenticate` value into its challenges. Handles several challenges in one
/// value (`Basic realm="a", Bearer realm="b"`), quoted strings with commas and escapes inside,
/// `token68` forms and stray whitespace. Never panics; unparsable pieces are skipped.
pub fn parse_www_authenticate(value: &str) -> Vec<Challenge> {
    let mut cur = Cursor {
        chars: value.chars().peekable(),
    };
    let mut out: Vec<Challenge> = Vec::new();
    loop {
        cur.skip_ws_and_commas();
        if cur.chars.peek().is_none() {
            break;
        }
        let scheme = cur.token();
        if scheme.is_empty() {
            // Not a token where a scheme should be: skip this piece.
            cur.chars.next();
            cur.skip_to_comma();
            continue;
        }
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "bearer" => Scheme::Bearer,
            "basic" => Scheme::Basic,
            other => Scheme::Other(other.to_owned()),
        };
        let mut params = Vec::new();
        // token68 (`Negotiate abc==`) directly after the scheme, with no comma between.
        cur.skip_ws();
        if let Some(t) = cur.token68() {
            params.push((String::new(), t));
        }
        // Parameters: `name = value`, separated by commas. A token not followed by `=` starts
        // the next challenge.
        while params.first().is_none_or(|(k, _)| !k.is_empty()) {
            cur.skip_ws_and_commas();
            let Some(&c) = cur.chars.peek() else { break };
            if !is_tchar(c) {
                cur.chars.next();
                cur.skip_to_comma();
                continue;
            }
            // Look ahead without consuming (cloning a Chars iterator is cheap).
            let mut probe = Cursor {
                chars: cur.chars.clone(),
            };
            let name = probe.token();
            probe.skip_ws();
            if probe.chars.next_if_eq(&'=').is_none() {
                break; // the next challenge's scheme
            }
            cur = probe;
            cur.skip_ws();
            let v = if cur.chars.next_if_eq(&'"').is_some() {
                cur.quoted()
            } else {
                let mut v = String::new();
                while let Some(c) = cur.chars.next_if(|c| !matches!(c, ',' | ' ' | '\t')) {
                    v.push(c);
                }
                v
            };
            params.push((name.to_ascii_lowercase(), v));
        }
        out.push(Challenge { scheme, params });
    }
    out
}

/// [`parse_www_authenticate`] over raw header bytes (invalid UTF-8 replaced): the entry point
/// for a fuzz target (`fuzz_target!(|data: &[u8]| { parse_www_authenticate_bytes(data); })`).
pub fn parse_www_authenticate_bytes(value: &[u8]) -> Vec<Challenge> {
    parse_www_authenticate(&String::from_utf8_lossy(value))
}

// === credentials ===

/// A password or token: never shown by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(s: impl Into<Arc<str>>) -> Secret {
        Secret(s.into())
    }

    /// The secret itself, for building a header. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Username and password for an upstream (Basic auth, or Basic auth to the token realm).
#[derive(Clone, Debug)]
pub struct Credentials {
    pub username: String,
    pub password: Secret,
}

/// The username that marks the secret as an identity token (an OAuth2 refresh token), as
/// Docker reads a credential helper's answer: ACR's `acr-env` helper answers so, and
/// `username = "<token>"` says the same of a configured password.
pub const IDENTITY_TOKEN_USERNAME: &str = "<token>";

impl Credentials {
    /// The identity token, when these credentials are one: it is not sent as Basic
    /// credentials but exchanged at the token realm (OAuth2 `grant_type=refresh_token`).
    pub fn identity_token(&self) -> Option<&Secret> {
        (self.username == IDENTITY_TOKEN_USERNAME).then_some(&self.password)
    }

    /// The `Authorization: Basic ...` header value (RFC 7617), marked sensitive.
    pub fn basic_header(&self) -> http::HeaderValue {
        use base64::Engine as _;
        let raw = format!("{}:{}", self.username, self.password.expose());
        let encoded = base64::engine::general_purpose::STANDARD.encode(raw);
        let mut v = http::HeaderValue::from_str(&format!("Basic {encoded}"))
            .expect("base64 is a valid header value");
        v.set_sensitive(true);
        v
    }
}

// === tokens ===

/// Lifetime assumed when the token response has no `expires_in` (distribution token spec).
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

/// A bearer token and how long it may be used.
#[derive(Clone)]
pub struct Token {
    pub value: Secret,
    /// When it was fetched.
    pub fetched_at: Instant,
    /// How long the cache keeps it: the lifetime the issuer gave, minus a safety margin.
    pub usable_for: Duration,
    /// The realm and scope it was issued for.
    pub realm: String,
    pub scope: Option<String>,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("value", &self.value)
            .field("usable_for", &self.usable_for)
            .field("realm", &self.realm)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl Token {
    /// The `Authorization: Bearer ...` header value, marked sensitive.
    pub fn header(&self) -> Option<http::HeaderValue> {
        let mut v = http::HeaderValue::from_str(&format!("Bearer {}", self.value.expose())).ok()?;
        v.set_sensitive(true);
        Some(v)
    }
}

/// How long a token with lifetime `expires_in` is reused: the lifetime minus a margin of a fifth,
/// at most 30 s, so a token is never presented just as it expires. Short lifetimes are honoured
/// as given (never raised), which is the safe side.
pub fn usable_lifetime(expires_in: Duration) -> Duration {
    let margin = (expires_in / 5).min(Duration::from_secs(30));
    expires_in.saturating_sub(margin)
}

/// Why a token response could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenResponseError(pub &'static str);

/// Parses a token endpoint's JSON answer: `token` or `access_token`, `expires_in` (seconds,
/// default 60). Returns the token and its usable lifetime.
pub fn parse_token_response(body: &[u8]) -> Result<(Secret, Duration), TokenResponseError> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|_| TokenResponseError("token response is not JSON"))?;
    let token = ["token", "access_token"]
        .iter()
        .filter_map(|k| v.get(k).and_then(|t| t.as_str()))
        .find(|t| !t.is_empty())
        .ok_or(TokenResponseError("token response has no token"))?;
    if http::HeaderValue::from_str(&format!("Bearer {token}")).is_err() {
        return Err(TokenResponseError("token is not a valid header value"));
    }
    let expires_in = match v.get("expires_in") {
        Some(e) => match (e.as_u64(), e.as_f64()) {
            (Some(s), _) if s > 0 => Duration::from_secs(s),
            (None, Some(f)) if f.is_finite() && f >= 1.0 => Duration::from_secs(f as u64),
            _ => DEFAULT_TOKEN_LIFETIME,
        },
        None => DEFAULT_TOKEN_LIFETIME,
    };
    Ok((Secret::new(token), usable_lifetime(expires_in)))
}

/// Builds the token request URL: `realm?service=..&scope=..` (appending to a realm that
/// already has a query).
pub fn token_url(realm: &str, service: Option<&str>, scope: Option<&str>) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    if let Some(s) = service {
        q.append_pair("service", s);
    }
    if let Some(s) = scope {
        q.append_pair("scope", s);
    }
    let q = q.finish();
    if q.is_empty() {
        realm.to_owned()
    } else if realm.contains('?') {
        format!("{realm}&{q}")
    } else {
        format!("{realm}?{q}")
    }
}

struct TokenExpiry;

impl moka::Expiry<String, Token> for TokenExpiry {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &Token,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.usable_for)
    }
}

/// Bearer tokens of one upstream, keyed by scope (`repository:library/nginx:pull`; empty for a
/// token without scope). Entries expire at the token's usable lifetime.
#[derive(Clone)]
pub struct TokenCache {
    cache: moka::future::Cache<String, Token>,
}

impl Default for TokenCache {
    fn default() -> Self {
        TokenCache::new(10_000)
    }
}

impl fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenCache")
            .field("entries", &self.cache.entry_count())
            .finish()
    }
}

impl TokenCache {
    pub fn new(max_entries: u64) -> TokenCache {
        TokenCache {
            cache: moka::future::Cache::builder()
                .max_capacity(max_entries)
                .expire_after(TokenExpiry)
                .build(),
        }
    }

    /// A cached, still usable token for `scope`.
    pub async fn get(&self, scope: &str) -> Option<Token> {
        self.cache.get(scope).await
    }

    /// The cached token for `scope`, or the one `fetch` returns. Concurrent calls for one scope
    /// share a single fetch; a failed fetch is not cached.
    pub async fn get_or_fetch<F>(&self, scope: &str, fetch: F) -> Result<Token, crate::Error>
    where
        F: Future<Output = Result<Token, crate::Error>>,
    {
        self.cache
            .try_get_with(scope.to_owned(), fetch)
            .await
            .map_err(|e: Arc<crate::Error>| (*e).clone())
    }

    /// Drops the token for `scope`, but only if it is still `rejected` (another request may have
    /// already replaced it with a fresh one).
    pub async fn invalidate_if(&self, scope: &str, rejected: &Token) {
        if let Some(t) = self.cache.get(scope).await
            && t.value == rejected.value
        {
            self.cache.invalidate(scope).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(name: &str, v: &str) -> (String, String) {
        (name.to_owned(), v.to_owned())
    }

    #[test]
    fn parses_docker_bearer_challenge() {
        let c = parse_www_authenticate(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:samalba/my-app:pull,push""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, Scheme::Bearer);
        assert_eq!(
            c[0].bearer().unwrap(),
            BearerChallenge {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:samalba/my-app:pull,push".into()),
            }
        );
    }

    #[test]
    fn parses_case_spaces_escapes_and_tokens() {
        let c = parse_www_authenticate(
            r#"  bEaReR   Realm = "a\"b,c" ,  service=reg , error="insufficient_scope",,"#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, Scheme::Bearer);
        assert_eq!(
            c[0].params,
            vec![
                p("realm", "a\"b,c"),
                p("service", "reg"),
                p("error", "insufficient_scope")
            ]
        );
    }

    #[test]
    fn parses_several_challenges() {
        let c = parse_www_authenticate(
            r#"Basic realm="Registry Realm", Bearer realm="https://x/token",service="x""#,
        );
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].scheme, Scheme::Basic);
        assert_eq!(c[0].realm(), Some("Registry Realm"));
        assert_eq!(c[1].bearer().unwrap().realm, "https://x/token");
        assert_eq!(c[1].bearer().unwrap().scope, None);

        let c = parse_www_authenticate("Basic");
        assert_eq!(
            c,
            vec![Challenge {
                scheme: Scheme::Basic,
                params: vec![]
            }]
        );

        let c = parse_www_authenticate("Negotiate abc==, Basic realm=x");
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].scheme, Scheme::Other("negotiate".into()));
        assert_eq!(c[0].params, vec![p("", "abc==")]);
        assert_eq!(c[1].realm(), Some("x"));
    }

    #[test]
    fn bearer_without_realm_is_not_usable() {
        let c = parse_www_authenticate(r#"Bearer service="x""#);
        assert!(c[0].bearer().is_none());
        assert!(
            parse_www_authenticate(r#"Basic realm="x""#)[0]
                .bearer()
                .is_none()
        );
    }

    #[test]
    fn garbage_does_not_panic_and_yields_little() {
        for s in [
            "",
            ",,,",
            "=",
            "\"",
            "Bearer realm=\"unterminated",
            "é Bearer realm=ü",
            "Bearer ==, =x",
        ] {
            let _ = parse_www_authenticate(s);
        }
        let c = parse_www_authenticate("Bearer realm=\"unterminated");
        assert_eq!(c[0].realm(), Some("unterminated"));
    }

    proptest! {
        #[test]
        fn parser_never_panics(s in "\\PC*") {
            let _ = parse_www_authenticate(&s);
        }

        #[test]
        fn parser_never_panics_on_bytes(b in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = parse_www_authenticate_bytes(&b);
        }

        #[test]
        fn parser_never_panics_on_header_like_input(s in "[A-Za-z ,=\"\\\\/+._~-]{0,64}") {
            let _ = parse_www_authenticate(&s);
        }

        #[test]
        fn quoted_values_round_trip(v in "[ -~]{0,40}") {
            let quoted = v.replace('\\', "\\\\").replace('"', "\\\"");
            let c = parse_www_authenticate(&format!("Bearer realm=\"{quoted}\",service=\"s\""));
            prop_assert_eq!(c.len(), 1);
            prop_assert_eq!(c[0].realm(), Some(v.as_str()));
            prop_assert_eq!(c[0].param("service"), Some("s"));
        }
    }

    #[test]
    fn basic_header_is_rfc_7617() {
        let basic = |u: &str, p: &str| {
            Credentials {
                username: u.into(),
                password: Secret::new(p),
            }
            .basic_header()
        };
        // RFC 7617 §2's example, and padding of one and two `=`.
        assert_eq!(
            basic("Aladdin", "open sesame"),
            "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
        assert_eq!(basic("a", "bc"), "Basic YTpiYw==");
        assert_eq!(basic("a", "b"), "Basic YTpi");
        assert_eq!(basic("user", "pässword"), "Basic dXNlcjpww6Rzc3dvcmQ=");
        assert_eq!(basic("", ""), "Basic Og==");
    }

    #[test]
    fn credentials_debug_is_redacted() {
        let c = Credentials {
            username: "u".into(),
            password: Secret::new("hunter2"),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(c.basic_header().is_sensitive());
        let t = Token {
            value: Secret::new("tok-secret"),
            fetched_at: Instant::now(),
            usable_for: Duration::from_secs(1),
            realm: "r".into(),
            scope: None,
        };
        assert!(!format!("{t:?}").contains("tok-secret"));
    }

    #[test]
    fn token_response_fields() {
        let (t, d) = parse_token_response(br#"{"token":"a","expires_in":300}"#).unwrap();
        assert_eq!(t.expose(), "a");
        assert_eq!(d, Duration::from_secs(270));
        let (t, d) = parse_token_response(br#"{"access_token":"b"}"#).unwrap();
        assert_eq!(t.expose(), "b");
        assert_eq!(d, Duration::from_secs(48));
        let (t, _) = parse_token_response(br#"{"token":"","access_token":"c"}"#).unwrap();
        assert_eq!(t.expose(), "c");
        assert!(parse_token_response(b"{}").is_err());
        assert!(parse_token_response(b"nope").is_err());
        assert!(parse_token_response(br#"{"token":"a\nb"}"#).is_err());
    }

    #[test]
    fn token_urls() {
        assert_eq!(
            token_url(
                "https://auth.docker.io/token",
                Some("registry.docker.io"),
                Some("repository:library/nginx:pull")
            ),
            "https://auth.docker.io/token?service=registry.docker.io&scope=repository%3Alibrary%2Fnginx%3Apull"
        );
        assert_eq!(
            token_url("https://a/t?x=1", None, Some("s")),
            "https://a/t?x=1&scope=s"
        );
        assert_eq!(token_url("https://a/t", None, None), "https://a/t");
    }
}
