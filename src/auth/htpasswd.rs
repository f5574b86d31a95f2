//! The htpasswd file: one `name:hash` per line, bcrypt hashes only (as `htpasswd -B` writes
//! them). Parsing is pure and never panics, whatever the input: it is fuzzed.

use std::collections::HashMap;
use std::fmt;

/// The users of a parsed htpasswd file. The hashes are never printed (`Debug` shows names only).
#[derive(Clone, Default)]
pub struct Htpasswd {
    users: HashMap<String, String>,
}

impl fmt::Debug for Htpasswd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&str> = self.users.keys().map(String::as_str).collect();
        names.sort_unstable();
        f.debug_struct("Htpasswd").field("users", &names).finish()
    }
}

/// Why a line was refused; `Display` names the line and never shows the hash.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct ParseError {
    /// 1-based.
    pub line: usize,
    pub reason: String,
}

/// The name `[[access]]` rules use for callers without credentials; no htpasswd user may take it.
pub const ANONYMOUS: &str = "anonymous";

impl Htpasswd {
    /// The bcrypt hash of `user`, if the file names it.
    pub fn hash(&self, user: &str) -> Option<&str> {
        self.users.get(user).map(String::as_str)
    }

    pub fn contains(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// The names, in no particular order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.users.keys().map(String::as_str)
    }
}

/// Parses an htpasswd file's text. Blank lines and `#` comments are skipped; every other line
/// must be `name:hash` with a bcrypt hash (`$2y$`, `$2a$`, `$2b$`). Other hash kinds (MD5
/// `$apr1$`, SHA-1 `{SHA}`, crypt, plain text) are refused: they are fast to brute-force, and
/// a file that mixes them is better fixed than half-loaded.
pub fn parse(text: &str) -> Result<Htpasswd, ParseError> {
    let mut users = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let err = |reason: String| ParseError { line, reason };
        let l = raw.trim_end_matches('\r');
        if l.trim().is_empty() || l.trim_start().starts_with('#') {
            continue;
        }
        let Some((name, hash)) = l.split_once(':') else {
            return Err(err("expected name:hash".into()));
        };
        if name.is_empty() {
            return Err(err("empty user name".into()));
        }
        if name
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || c == '*')
        {
            return Err(err(format!(
                "user name {:?} contains whitespace, a control character or '*'",
                shorten(name)
            )));
        }
        if name == ANONYMOUS {
            return Err(err(format!(
                "the user name {ANONYMOUS:?} is reserved for callers without credentials"
            )));
        }
        if let Some(reason) = bcrypt_problem(hash) {
            return Err(err(format!("user {:?}: {reason}", shorten(name))));
        }
        if users.insert(name.to_owned(), hash.to_owned()).is_some() {
            return Err(err(format!("user {:?} appears twice", shorten(name))));
        }
    }
    Ok(Htpasswd { users })
}

fn shorten(s: &str) -> String {
    s.chars().take(64).collect()
}

/// What is wrong with `hash` as a bcrypt hash, if anything: `$2y$10$` + 22 characters of salt +
/// 31 of hash, in bcrypt's base64 alphabet.
fn bcrypt_problem(hash: &str) -> Option<String> {
    let kind = if hash.starts_with("$apr1$") {
        Some("an MD5 ($apr1$) hash")
    } else if hash.starts_with("{SHA}") {
        Some("a SHA-1 ({SHA}) hash")
    } else if hash.starts_with("$5$") || hash.starts_with("$6$") {
        Some("a SHA-crypt hash")
    } else if hash.starts_with("$1$") {
        Some("an MD5-crypt hash")
    } else {
        None
    };
    if let Some(kind) = kind {
        return Some(format!(
            "{kind}; only bcrypt is accepted (make entries with `htpasswd -B`)"
        ));
    }
    let b = hash.as_bytes();
    let prefix_ok = b.len() == 60
        && b[0] == b'$'
        && b[1] == b'2'
        && matches!(b[2], b'a' | b'b' | b'y')
        && b[3] == b'$'
        && b[4].is_ascii_digit()
        && b[5].is_ascii_digit()
        && b[6] == b'$';
    if !prefix_ok {
        return Some(
            "not a bcrypt hash ($2y$, $2a$ or $2b$, 60 characters); make entries with `htpasswd -B`"
                .into(),
        );
    }
    let cost = u32::from(b[4] - b'0') * 10 + u32::from(b[5] - b'0');
    if !(4..=31).contains(&cost) {
        return Some(format!("bcrypt cost {cost} is outside 4..=31"));
    }
    if !b[7..]
        .iter()
        .all(|c| c.is_ascii_alphanumeric() || *c == b'.' || *c == b'/')
    {
        return Some("the bcrypt hash has characters outside its alphabet".into());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // Shaped like `htpasswd -nbB` output; the hash itself is arbitrary.
    const ALICE: &str = "alice:$2y$05$xTvp3VNcR2t3NvXPTzyZV.fcvVqHSOTeIYoNT4p0Tz3pAkqlpyuC6";

    #[test]
    fn bcrypt_lines_parse_and_verify() {
        // htpasswd writes $2y$, the bcrypt crate $2b$: the same algorithm.
        let alice = hash("secret").replacen("$2b$", "$2y$", 1);
        let h = parse(&format!("# team\n\nalice:{alice}\r\nbob:{}\n", hash("pw"))).unwrap();
        assert_eq!(h.len(), 2);
        assert!(bcrypt::verify("secret", h.hash("alice").unwrap()).unwrap());
        assert!(!bcrypt::verify("wrong", h.hash("alice").unwrap()).unwrap());
        assert!(bcrypt::verify("pw", h.hash("bob").unwrap()).unwrap());
        assert!(!format!("{h:?}").contains("$2y$"), "Debug shows no hash");
    }

    fn hash(pw: &str) -> String {
        bcrypt::hash(pw, 4).unwrap()
    }

    #[test]
    fn other_hash_kinds_are_refused_naming_the_line() {
        for (line, kind) in [
            ("carol:$apr1$abc$defghijklmnopqrstuvwx", "MD5"),
            ("carol:{SHA}qUqP5cyxm6YcTAhz05Hph5gvu9M=", "SHA-1"),
            ("carol:plain", "not a bcrypt"),
            ("carol:$6$salt$hash", "SHA-crypt"),
        ] {
            let e = parse(&format!("{ALICE}\n{line}\n")).unwrap_err();
            assert_eq!(e.line, 2, "{e}");
            assert!(e.to_string().contains(kind), "{e}");
            assert!(!e.to_string().contains("qUqP5"), "no hash in {e}");
        }
    }

    #[test]
    fn malformed_lines_are_refused() {
        for text in [
            "alice",
            ":$2y$05$xTvp3VNcR2t3NvXPTzyZV.fcvVqHSOTeIYoNT4p0Tz3pAkqlpyuC6",
            "anonymous:$2y$05$xTvp3VNcR2t3NvXPTzyZV.fcvVqHSOTeIYoNT4p0Tz3pAkqlpyuC6",
            "a b:$2y$05$xTvp3VNcR2t3NvXPTzyZV.fcvVqHSOTeIYoNT4p0Tz3pAkqlpyuC6",
            "ci-*:$2y$05$xTvp3VNcR2t3NvXPTzyZV.fcvVqHSOTeIYoNT4p0Tz3pAkqlpyuC6",
            "alice:$2y$99$xTvp3VNcR2t3NvXPTzyZV.fcvVqHSOTeIYoNT4p0Tz3pAkqlpyuC6",
            "alice:$2y$05$xTvp3VNcR2t3NvXPTzyZV.fcvVqHSOTeIYoNT4p0Tz3pAkqlpyu!6",
        ] {
            assert!(parse(text).is_err(), "{text}");
        }
        let twice = format!("{ALICE}\n{ALICE}\n");
        assert!(parse(&twice).unwrap_err().reason.contains("twice"));
    }

    proptest! {
        #[test]
        fn never_panics(text in "\\PC{0,200}") {
            let _ = parse(&text);
        }

        #[test]
        fn never_panics_near_bcrypt(tail in "[$./0-9A-Za-z:\n]{0,80}") {
            let _ = parse(&format!("a:$2y$05${tail}"));
        }
    }
}
