//! `Link` headers (RFC 8288), as registries page tags lists and referrers with them.

/// Every `Link` header line of `headers` as one value: RFC 8288 lets a server split its links
/// over several lines, and the next page may be on any of them.
pub fn link_header(headers: &http::HeaderMap) -> Option<String> {
    let lines: Vec<&str> = headers
        .get_all(http::header::LINK)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    (!lines.is_empty()).then(|| lines.join(", "))
}

/// The target of the `rel="next"` link in a `Link` header value (RFC 8288), which may hold
/// several links separated by commas.
pub fn next_target(link: &str) -> Option<&str> {
    let mut rest = link;
    loop {
        let start = rest.find('<')? + 1;
        let end = start + rest[start..].find('>')?;
        let target = &rest[start..end];
        let after = &rest[end + 1..];
        let params_end = after.find(',').unwrap_or(after.len());
        let is_next = after[..params_end].split(';').any(|p| {
            let p = p.trim();
            p.split_once('=').is_some_and(|(k, v)| {
                k.trim().eq_ignore_ascii_case("rel")
                    && v.trim()
                        .trim_matches('"')
                        .split_ascii_whitespace()
                        .any(|r| r.eq_ignore_ascii_case("next"))
            })
        });
        if is_next {
            return Some(target);
        }
        rest = &after[params_end..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    /// The next page may be named on any `Link` line, beside links that are not it.
    #[test]
    fn the_next_link_is_found_on_any_line() {
        let mut h = http::HeaderMap::new();
        assert_eq!(link_header(&h), None);
        h.append(
            http::header::LINK,
            HeaderValue::from_static("</v2/a/referrers/x?page=1>; rel=\"prev\""),
        );
        h.append(
            http::header::LINK,
            HeaderValue::from_static(
                "</v2/a/referrers/x?page=3>; rel=next, <https://e/>; rel=help",
            ),
        );
        let joined = link_header(&h).unwrap();
        assert_eq!(next_target(&joined), Some("/v2/a/referrers/x?page=3"));
        assert_eq!(next_target("<https://e/>; rel=\"help\""), None);
        assert_eq!(next_target("<unclosed; rel=next"), None);
    }
}
