//! Peer authentication: a request between replicas carries `X-Cachalot-Peer: <unix-secs>.<hex
//! HMAC-SHA256(secret, "<secs> <METHOD> <path-and-query>")>`.
//!
//! The MAC binds the method and the exact path and query, so a captured header is good only
//! for the same request, and only for [`MAX_SKEW`] either side of its time: a replay within
//! that window fetches the same content-addressed object again, which is harmless. Peers
//! answer over plain HTTP inside a cluster, so the secret itself never crosses the wire.

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use ring::hmac;

/// The header a replica signs its requests to peers with.
pub const PEER_HEADER: HeaderName = HeaderName::from_static("x-cachalot-peer");

/// How far a signature's time may be from the checker's clock, either way. Replicas' clocks
/// are NTP-synchronized in any cluster worth the name; a minute covers a stepping clock.
pub(super) const MAX_SKEW: u64 = 60;

/// What [`super::Cluster::check`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerCheck {
    /// No peer header: a client's request.
    NotPeer,
    /// Signed with the cluster's secret, for this method and path, within the allowed skew.
    Peer,
    /// A peer header that does not hold: answer 401.
    Forged,
}

pub(super) fn key(secret: &str) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes())
}

fn message(secs: u64, method: &Method, path_and_query: &str) -> String {
    format!("{secs} {method} {path_and_query}")
}

/// The header value for a request signed at `secs`.
pub(super) fn header(
    key: &hmac::Key,
    secs: u64,
    method: &Method,
    path_and_query: &str,
) -> HeaderValue {
    let tag = hmac::sign(key, message(secs, method, path_and_query).as_bytes());
    let value = format!("{secs}.{}", hex::encode(tag.as_ref()));
    HeaderValue::try_from(value).expect("digits, a dot and hex are valid header characters")
}

/// Checks the peer header of a request at time `now`.
pub(super) fn check(
    key: &hmac::Key,
    now: u64,
    method: &Method,
    path_and_query: &str,
    headers: &HeaderMap,
) -> PeerCheck {
    let mut values = headers.get_all(&PEER_HEADER).iter();
    let Some(value) = values.next() else {
        return PeerCheck::NotPeer;
    };
    // Two signatures are not a thing a replica sends; refuse rather than pick one.
    if values.next().is_some() {
        return PeerCheck::Forged;
    }
    let holds = (|| {
        let (secs, mac) = value.to_str().ok()?.split_once('.')?;
        // Only the canonical decimal form, so one MAC has one header spelling.
        if secs.is_empty() || secs.starts_with('0') || !secs.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let secs: u64 = secs.parse().ok()?;
        if now.abs_diff(secs) > MAX_SKEW {
            return None;
        }
        let mac = hex::decode(mac).ok()?;
        // Constant time: ring compares the whole tag whatever the first differing byte.
        hmac::verify(key, message(secs, method, path_and_query).as_bytes(), &mac).ok()
    })();
    match holds {
        Some(()) => PeerCheck::Peer,
        None => PeerCheck::Forged,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_750_000_000;
    const PATH: &str = "/v2/library/nginx/blobs/sha256:abc?ns=docker.io";

    fn signed(secret: &str, secs: u64, method: &Method, path: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(PEER_HEADER, header(&key(secret), secs, method, path));
        h
    }

    fn checked(headers: &HeaderMap, method: &Method, path: &str) -> PeerCheck {
        check(&key("0123456789abcdef"), NOW, method, path, headers)
    }

    #[test]
    fn a_signed_request_is_a_peer_and_any_change_is_forged() {
        let get = Method::GET;
        let h = signed("0123456789abcdef", NOW, &get, PATH);
        assert_eq!(checked(&h, &get, PATH), PeerCheck::Peer);
        assert_eq!(checked(&h, &Method::HEAD, PATH), PeerCheck::Forged);
        assert_eq!(
            checked(&h, &get, "/v2/library/nginx/blobs/sha256:abd?ns=docker.io"),
            PeerCheck::Forged
        );
        assert_eq!(
            checked(&h, &get, "/v2/library/nginx/blobs/sha256:abc"),
            PeerCheck::Forged
        );
        let other = signed("another secret, 16+", NOW, &get, PATH);
        assert_eq!(checked(&other, &get, PATH), PeerCheck::Forged);
        assert_eq!(checked(&HeaderMap::new(), &get, PATH), PeerCheck::NotPeer);
    }

    #[test]
    fn the_time_must_be_within_a_minute_either_way() {
        let get = Method::GET;
        for (secs, want) in [
            (NOW - MAX_SKEW, PeerCheck::Peer),
            (NOW + MAX_SKEW, PeerCheck::Peer),
            (NOW - MAX_SKEW - 1, PeerCheck::Forged),
            (NOW + MAX_SKEW + 1, PeerCheck::Forged),
            (0, PeerCheck::Forged),
        ] {
            let h = signed("0123456789abcdef", secs, &get, PATH);
            assert_eq!(checked(&h, &get, PATH), want, "signed at {secs}");
        }
    }

    #[test]
    fn malformed_or_repeated_headers_are_forged() {
        let get = Method::GET;
        let good = signed("0123456789abcdef", NOW, &get, PATH);
        let good = good.get(PEER_HEADER).unwrap().to_str().unwrap().to_owned();
        let (secs, mac) = good.split_once('.').unwrap();
        let bad = [
            String::new(),
            "garbage".into(),
            secs.to_owned(),
            format!("{secs}."),
            format!("{secs}.{}", &mac[..62]),
            format!("{secs}.{mac}00"),
            format!("0{secs}.{mac}"),
            format!("+{secs}.{mac}"),
            format!("{secs}.{}", "zz".repeat(32)),
            format!("99999999999999999999999.{mac}"),
        ];
        for v in bad {
            let mut h = HeaderMap::new();
            h.insert(PEER_HEADER, HeaderValue::try_from(v.as_str()).unwrap());
            assert_eq!(checked(&h, &get, PATH), PeerCheck::Forged, "{v:?}");
        }
        let mut twice = signed("0123456789abcdef", NOW, &get, PATH);
        twice.append(PEER_HEADER, HeaderValue::try_from(good.as_str()).unwrap());
        assert_eq!(checked(&twice, &get, PATH), PeerCheck::Forged);
    }
}
