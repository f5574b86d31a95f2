//! Rendezvous (highest-random-weight) hashing: which member owns a key.
//!
//! Every replica computes the same owner from the same members, with no coordination, and a
//! member leaving moves only the keys it owned (each to the member that scored second for it),
//! a member joining takes only the keys it now scores highest for. The score is a fixed
//! function (SHA-256, not the std `Hasher`, whose output may change between Rust releases), so
//! replicas of different builds agree during a rolling upgrade.

use sha2::{Digest, Sha256};

/// The weight of `member` (its URL, as every replica writes it) for `key`.
pub(super) fn score(member: &str, key: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(member.as_bytes());
    // A URL never holds a NUL (the url crate percent-encodes it), so ("ab", "c") and
    // ("a", "bc") cannot hash alike.
    h.update([0u8]);
    h.update(key.as_bytes());
    let d = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    u64::from_be_bytes(first)
}

/// The index in `members` of the one that owns `key`: the highest score, ties (a 2^-64 chance)
/// to the greater URL so that the answer does not depend on the order of `members`. `None` when
/// `members` is empty.
pub(super) fn owner<'a>(key: &str, members: impl IntoIterator<Item = &'a str>) -> Option<usize> {
    members
        .into_iter()
        .enumerate()
        .map(|(i, m)| (score(m, key), m, i))
        .max_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)))
        .map(|(_, _, i)| i)
}

/// Which of `members` (base URLs, written as in `cluster.peers`) owns `key` while all of them
/// are live: the index every one of them computes, for tools and tests that predict an owner
/// from outside the cluster. Each URL is hashed in its normalized form, as the replicas hash
/// it. `None` when `members` is empty or one of them is not a URL.
pub fn owner_of(members: &[&str], key: &str) -> Option<usize> {
    let urls = members
        .iter()
        .map(|m| url::Url::parse(m).ok().map(String::from))
        .collect::<Option<Vec<String>>>()?;
    owner(key, urls.iter().map(String::as_str))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMBERS: [&str; 3] = [
        "http://10.0.0.11:5000/",
        "http://10.0.0.12:5000/",
        "http://10.0.0.13:5000/",
    ];

    fn key(i: usize) -> String {
        format!("sha256:{:064x}", i * 7919)
    }

    #[test]
    fn the_score_is_pinned_so_mixed_builds_agree() {
        // Changing the score function reassigns every key during a rolling upgrade, where
        // replicas of two builds would disagree on owners: it must be a deliberate decision.
        // The values are the first 8 bytes of SHA-256("<url>\0<key>"), from Python's hashlib.
        assert_eq!(score(MEMBERS[0], "sha256:abc"), 0x00c9_493b_89e1_58a6);
        assert_eq!(
            score(MEMBERS[1], "docker.io/library/nginx:1"),
            0xeccb_9160_4695_4756
        );
    }

    #[test]
    fn order_of_members_does_not_matter() {
        let reversed: Vec<&str> = MEMBERS.iter().rev().copied().collect();
        for i in 0..1000 {
            let a = MEMBERS[owner(&key(i), MEMBERS).unwrap()];
            let b = reversed[owner(&key(i), reversed.iter().copied()).unwrap()];
            assert_eq!(a, b, "{}", key(i));
        }
        assert_eq!(owner("k", []), None);
    }

    #[test]
    fn keys_spread_over_members() {
        let mut counts = [0usize; 3];
        for i in 0..3000 {
            counts[owner(&key(i), MEMBERS).unwrap()] += 1;
        }
        // A fair split is 1000 each; 850 is far outside the binomial spread (sd ≈ 26).
        assert!(counts.iter().all(|&c| c > 850), "{counts:?}");
    }

    #[test]
    fn owner_of_agrees_with_the_replicas_on_peers_as_configured() {
        // Written without the trailing slash, as in a config file; the replicas hash the
        // normalized URL, so an unnormalized hash would name another owner for most keys.
        let configured = [
            "http://10.0.0.11:5000",
            "http://10.0.0.12:5000",
            "http://10.0.0.13:5000",
        ];
        for i in 0..1000 {
            assert_eq!(owner_of(&configured, &key(i)), owner(&key(i), MEMBERS));
        }
        assert_eq!(owner_of(&[], "k"), None);
        assert_eq!(owner_of(&["http://10.0.0.11:5000", "not a url"], "k"), None);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Removing a member moves exactly the keys it owned; adding it back restores them.
        #[test]
        fn removing_a_member_moves_only_its_keys(
            keys in proptest::collection::vec("[a-z0-9:/._-]{1,40}", 1..200),
            removed in 0usize..4,
        ) {
            let members = [MEMBERS[0], MEMBERS[1], MEMBERS[2], "https://cachalot-3.mirror:5000/"];
            let rest: Vec<&str> = members.iter().enumerate()
                .filter(|(i, _)| *i != removed).map(|(_, m)| *m).collect();
            for k in &keys {
                let before = members[owner(k, members).unwrap()];
                let after = rest[owner(k, rest.iter().copied()).unwrap()];
                if before == members[removed] {
                    proptest::prop_assert_ne!(after, members[removed]);
                } else {
                    proptest::prop_assert_eq!(after, before);
                }
            }
        }
    }
}
