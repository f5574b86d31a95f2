//! `[[access]]` rules: (user, upstream, repository) -> allow or deny. Pure; patterns are
//! checked once, when the config is validated, and matched without backtracking blow-ups
//! (repository names come from clients).

use super::htpasswd::ANONYMOUS;

/// Who is asking: a user of the htpasswd file, or a caller without credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    Anonymous,
    User(std::sync::Arc<str>),
}

impl Principal {
    /// The name in logs and rules: the user's, or `anonymous`.
    pub fn name(&self) -> &str {
        match self {
            Principal::Anonymous => ANONYMOUS,
            Principal::User(u) => u,
        }
    }
}

/// A `users` entry: `"*"` (everyone, anonymous callers included), `"anonymous"` (callers
/// without credentials), or an htpasswd name where `*` matches any run of characters (such a
/// glob never matches anonymous callers).
#[derive(Clone, Debug)]
enum UserPattern {
    Everyone,
    Anonymous,
    Name(String),
}

impl UserPattern {
    fn parse(s: &str) -> Result<UserPattern, String> {
        if s.is_empty() {
            return Err("empty user name".into());
        }
        if s.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(format!("{s:?} contains whitespace or a control character"));
        }
        Ok(match s {
            "*" => UserPattern::Everyone,
            ANONYMOUS => UserPattern::Anonymous,
            _ => UserPattern::Name(s.to_owned()),
        })
    }

    fn matches(&self, p: &Principal) -> bool {
        match (self, p) {
            (UserPattern::Everyone, _) => true,
            (UserPattern::Anonymous, Principal::Anonymous) => true,
            (UserPattern::Name(pat), Principal::User(u)) => glob(pat.as_bytes(), u.as_bytes()),
            _ => false,
        }
    }
}

/// One path component of a repository pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Component {
    /// `**`: any number of components, none included.
    Any,
    /// A literal where `*` matches any run of characters within the component.
    Glob(String),
}

/// `<upstream name>/<repository>`, e.g. `docker.io/library/*` or `ghcr.io/myorg/**`.
#[derive(Clone, Debug)]
pub struct RepoPattern {
    components: Vec<Component>,
}

impl RepoPattern {
    /// Checks and compiles a pattern; the error says what is wrong, without the rule's index.
    pub fn parse(s: &str) -> Result<RepoPattern, String> {
        if s.is_empty() {
            return Err("empty pattern".into());
        }
        let mut components = Vec::new();
        for (i, c) in s.split('/').enumerate() {
            if c.is_empty() {
                return Err(format!(
                    "{s:?} has an empty path component (a leading, trailing or doubled '/')"
                ));
            }
            if c == "**" {
                if components.last() == Some(&Component::Any) {
                    return Err(format!("{s:?}: '**/**' is the same as '**'"));
                }
                components.push(Component::Any);
                continue;
            }
            if c.contains("**") {
                return Err(format!(
                    "{s:?}: '**' must be a whole path component ('a/**/b'); '*' matches within one"
                ));
            }
            // The first component is an upstream name (a host, maybe with a port); the rest
            // follow the distribution spec's repository grammar.
            let ok = if i == 0 {
                c.chars()
                    .all(|ch| !ch.is_whitespace() && !ch.is_control() && ch != '?' && ch != '#')
            } else {
                c.chars()
                    .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || "._-*".contains(ch))
            };
            if !ok {
                return Err(format!(
                    "{s:?}: component {c:?} has characters a repository name cannot have \
                     (lowercase letters, digits, '.', '_', '-', and '*' as a wildcard)"
                ));
            }
            components.push(Component::Glob(c.to_owned()));
        }
        if components.len() < 2 {
            return Err(format!(
                "{s:?} must be <upstream name>/<repository> (e.g. docker.io/library/*)"
            ));
        }
        Ok(RepoPattern { components })
    }

    /// The upstream name the pattern names, when its first component has no wildcard.
    pub fn literal_upstream(&self) -> Option<&str> {
        match &self.components[0] {
            Component::Glob(g) if !g.contains('*') => Some(g),
            _ => None,
        }
    }

    /// Whether `upstream/repo` matches. Runs in O(pattern components x name components): the
    /// set of name positions reachable after each pattern component, as in wildcard matching.
    pub fn matches(&self, upstream: &str, repo: &str) -> bool {
        let name: Vec<&str> = std::iter::once(upstream).chain(repo.split('/')).collect();
        let n = name.len();
        let mut reach = vec![false; n + 1];
        reach[0] = true;
        let mut next = vec![false; n + 1];
        for c in &self.components {
            next.iter_mut().for_each(|b| *b = false);
            match c {
                Component::Any => {
                    let mut any = false;
                    for j in 0..=n {
                        any |= reach[j];
                        next[j] = any;
                    }
                }
                Component::Glob(g) => {
                    for j in 0..n {
                        if reach[j] && glob(g.as_bytes(), name[j].as_bytes()) {
                            next[j + 1] = true;
                        }
                    }
                }
            }
            std::mem::swap(&mut reach, &mut next);
        }
        reach[n]
    }
}

/// `*` matches any run of bytes (in a repository component, `/` never reaches here). Greedy
/// with one backtrack point: linear in practice, O(len(pat) x len(s)) at worst.
pub(crate) fn glob(pat: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        if p < pat.len() && pat[p] == b'*' {
            star = Some((p, i));
            p += 1;
        } else if p < pat.len() && pat[p] == s[i] {
            p += 1;
            i += 1;
        } else if let Some((sp, si)) = star {
            p = sp + 1;
            i = si + 1;
            star = Some((sp, si + 1));
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

/// One compiled `[[access]]` rule.
#[derive(Clone, Debug)]
pub struct Rule {
    users: Vec<UserPattern>,
    repositories: Vec<RepoPattern>,
    allow: bool,
}

/// The compiled `[[access]]` list. Empty: everyone who got in may pull everything.
#[derive(Clone, Debug, Default)]
pub struct Rules {
    rules: Vec<Rule>,
}

impl Rules {
    /// Compiles the rules; an error names the rule (`access[1].repositories[0]`) and pattern.
    pub fn compile(rules: &[crate::config::AccessRule]) -> Result<Rules, String> {
        let mut out = Vec::with_capacity(rules.len());
        for (i, r) in rules.iter().enumerate() {
            if r.users.is_empty() {
                return Err(format!("access[{i}].users: must name at least one user"));
            }
            if r.repositories.is_empty() {
                return Err(format!(
                    "access[{i}].repositories: must name at least one pattern"
                ));
            }
            let users = r
                .users
                .iter()
                .enumerate()
                .map(|(j, u)| {
                    UserPattern::parse(u).map_err(|e| format!("access[{i}].users[{j}]: {e}"))
                })
                .collect::<Result<_, _>>()?;
            let repositories = r
                .repositories
                .iter()
                .enumerate()
                .map(|(j, p)| {
                    RepoPattern::parse(p).map_err(|e| format!("access[{i}].repositories[{j}]: {e}"))
                })
                .collect::<Result<_, _>>()?;
            out.push(Rule {
                users,
                repositories,
                allow: r.allow,
            });
        }
        Ok(Rules { rules: out })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The first rule matching the caller and `upstream/repo` decides; with rules, no match
    /// denies.
    pub fn allows(&self, who: &Principal, upstream: &str, repo: &str) -> bool {
        if self.rules.is_empty() {
            return true;
        }
        self.rules
            .iter()
            .find(|r| {
                r.users.iter().any(|u| u.matches(who))
                    && r.repositories.iter().any(|p| p.matches(upstream, repo))
            })
            .is_some_and(|r| r.allow)
    }
}

/// Names in `users` lists that are neither globs, `*`, `anonymous`, nor in `known`: each as
/// `access[i].users[j]: "bob" is not in the htpasswd file`, a warning (the file may gain the user
/// later; a typo should still be seen).
pub fn unknown_users(
    rules: &[crate::config::AccessRule],
    known: impl Fn(&str) -> bool,
) -> Vec<String> {
    let mut out = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        for (j, u) in r.users.iter().enumerate() {
            if u == "*" || u == ANONYMOUS || u.contains('*') || known(u) {
                continue;
            }
            out.push(format!(
                "access[{i}].users[{j}]: {u:?} is not a user of the htpasswd file"
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AccessRule;
    use proptest::prelude::*;

    fn pat(s: &str) -> RepoPattern {
        RepoPattern::parse(s).unwrap()
    }

    #[test]
    fn one_star_stays_in_a_component_two_cross_them() {
        let p = pat("docker.io/library/*");
        assert!(p.matches("docker.io", "library/nginx"));
        assert!(!p.matches("docker.io", "library/nginx/extra"));
        assert!(!p.matches("docker.io", "other/nginx"));
        assert!(!p.matches("ghcr.io", "library/nginx"));
        let p = pat("ghcr.io/myorg/**");
        assert!(p.matches("ghcr.io", "myorg/app"));
        assert!(p.matches("ghcr.io", "myorg/team/app"));
        assert!(!p.matches("ghcr.io", "otherorg/app"));
        assert!(!p.matches("ghcr.io", "myorgx/app"));
        let p = pat("*/**/base-*");
        assert!(p.matches("quay.io", "a/b/base-x"));
        assert!(p.matches("quay.io", "base-"));
        assert!(!p.matches("quay.io", "a/b/c/other"));
        let p = pat("docker.io/ci-*-cache");
        assert!(p.matches("docker.io", "ci-main-cache"));
        assert!(!p.matches("docker.io", "ci-main-cach"));
    }

    #[test]
    fn bad_patterns_say_why() {
        for (p, why) in [
            ("", "empty"),
            ("docker.io", "<upstream name>/<repository>"),
            ("docker.io//x", "empty path component"),
            ("docker.io/x/", "empty path component"),
            ("docker.io/***", "whole path component"),
            ("docker.io/a**", "whole path component"),
            ("docker.io/**/**", "same as"),
            ("docker.io/Library/x", "characters"),
            ("docker.io/a b", "characters"),
        ] {
            let e = RepoPattern::parse(p).unwrap_err();
            assert!(e.contains(why), "{p:?}: {e}");
        }
    }

    fn rule(users: &[&str], repos: &[&str], allow: bool) -> AccessRule {
        AccessRule {
            users: users.iter().map(|s| s.to_string()).collect(),
            repositories: repos.iter().map(|s| s.to_string()).collect(),
            allow,
        }
    }

    #[test]
    fn first_match_decides_and_no_match_denies() {
        let rules = Rules::compile(&[
            rule(&["ci-*"], &["docker.io/library/secret"], false),
            rule(&["ci-*", "alice"], &["docker.io/**"], true),
            rule(&["anonymous"], &["docker.io/library/*"], true),
        ])
        .unwrap();
        let ci = Principal::User("ci-7".into());
        let alice = Principal::User("alice".into());
        let bob = Principal::User("bob".into());
        assert!(!rules.allows(&ci, "docker.io", "library/secret"));
        assert!(rules.allows(&alice, "docker.io", "library/secret"));
        assert!(rules.allows(&ci, "docker.io", "library/nginx"));
        assert!(!rules.allows(&bob, "docker.io", "library/nginx"));
        assert!(rules.allows(&Principal::Anonymous, "docker.io", "library/nginx"));
        assert!(!rules.allows(&Principal::Anonymous, "docker.io", "org/app"));
        assert!(Rules::default().allows(&bob, "x", "y"));
        // A name glob never stands for anonymous callers; "*" does.
        let star = Rules::compile(&[rule(&["*"], &["a/**"], true)]).unwrap();
        assert!(star.allows(&Principal::Anonymous, "a", "b"));
        let glob = Rules::compile(&[rule(&["*o*"], &["a/**"], true)]).unwrap();
        assert!(!glob.allows(&Principal::Anonymous, "a", "b"));
    }

    #[test]
    fn compile_errors_name_the_rule() {
        let e = Rules::compile(&[rule(&["a"], &["x/y"], true), rule(&["a"], &["x//y"], true)])
            .unwrap_err();
        assert!(e.starts_with("access[1].repositories[0]: \"x//y\""), "{e}");
        let e = Rules::compile(&[rule(&[], &["x/y"], true)]).unwrap_err();
        assert!(e.contains("access[0].users"), "{e}");
        let e = Rules::compile(&[rule(&["a"], &[], true)]).unwrap_err();
        assert!(e.contains("access[0].repositories"), "{e}");
    }

    #[test]
    fn unknown_users_are_listed() {
        let rules = [rule(
            &["alice", "bob", "ci-*", "*", "anonymous"],
            &["x/y"],
            true,
        )];
        let w = unknown_users(&rules, |u| u == "alice");
        assert_eq!(
            w,
            ["access[0].users[1]: \"bob\" is not a user of the htpasswd file"]
        );
    }

    /// A reference matcher: regex-like recursion over components, exponential but obviously right.
    fn reference(p: &[Component], name: &[&str]) -> bool {
        match p.split_first() {
            None => name.is_empty(),
            Some((Component::Any, rest)) => (0..=name.len()).any(|k| reference(rest, &name[k..])),
            Some((Component::Glob(g), rest)) => {
                !name.is_empty()
                    && glob(g.as_bytes(), name[0].as_bytes())
                    && reference(rest, &name[1..])
            }
        }
    }

    proptest! {
        #[test]
        fn matches_like_the_reference(p in "[ab*]{1,3}(/([ab*]{1,3}|\\*\\*)){1,4}", n in "[ab]{1,3}(/[ab]{1,3}){0,5}") {
            if let Ok(rp) = RepoPattern::parse(&p) {
                let (up, repo) = n.split_once('/').unwrap_or((&n, ""));
                if !repo.is_empty() {
                    let name: Vec<&str> = n.split('/').collect();
                    prop_assert_eq!(rp.matches(up, repo), reference(&rp.components, &name));
                }
            }
        }

        #[test]
        fn glob_agrees_with_a_regex_like_reference(p in "[ab*]{0,6}", s in "[ab]{0,8}") {
            fn r(p: &[u8], s: &[u8]) -> bool {
                match p.split_first() {
                    None => s.is_empty(),
                    Some((b'*', rest)) => (0..=s.len()).any(|k| r(rest, &s[k..])),
                    Some((c, rest)) => s.first() == Some(c) && r(rest, &s[1..]),
                }
            }
            prop_assert_eq!(glob(p.as_bytes(), s.as_bytes()), r(p.as_bytes(), s.as_bytes()));
        }

        #[test]
        fn parse_never_panics(p in "\\PC{0,60}") {
            let _ = RepoPattern::parse(&p);
        }
    }
}
