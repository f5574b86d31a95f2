//! Content digests: canonical parsing, display, and a streaming verifier.

use std::fmt;
use std::str::FromStr;

/// The hash algorithms cachalot can verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// Hex characters of the longest digest (SHA-512).
pub(crate) const MAX_HEX_LEN: usize = 128;

/// A validated digest: algorithm plus the raw hash bytes. Always printed as lowercase hex, so
/// two spellings of one digest can never become two cache keys.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    bytes: Box<[u8]>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("digest has no algorithm prefix")]
    NoAlgorithm,
    #[error("unsupported digest algorithm {0:?}")]
    Unsupported(String),
    #[error("digest encoding must be {0} lowercase hex characters")]
    BadEncoding(usize),
}

impl Digest {
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    pub fn hex(&self) -> String {
        self.hex_in(&mut [0; MAX_HEX_LEN]).to_owned()
    }

    /// The lowercase hex encoding, written into `buf`: no allocation, because `Display` runs on
    /// every request (blob paths, `Docker-Content-Digest`, log fields).
    pub(crate) fn hex_in<'b>(&self, buf: &'b mut [u8; MAX_HEX_LEN]) -> &'b str {
        let out = &mut buf[..self.bytes.len() * 2];
        hex::encode_to_slice(&self.bytes, out).expect("sized to twice the bytes");
        std::str::from_utf8(out).expect("hex digits are ASCII")
    }

    /// The digest of `data`, computed in one go (for small objects such as manifests).
    pub fn sha256_of(data: &[u8]) -> Digest {
        let mut v = Verifier::new(Algorithm::Sha256);
        v.update(data);
        v.finish()
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (alg, enc) = s.split_once(':').ok_or(DigestError::NoAlgorithm)?;
        let algorithm = match alg {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            other => return Err(DigestError::Unsupported(other.chars().take(32).collect())),
        };
        // Uppercase hex is rejected rather than folded: the spec's canonical form is lowercase,
        // and accepting both would let a client address one blob under two names.
        let bad = || DigestError::BadEncoding(algorithm.hex_len());
        if enc.len() != algorithm.hex_len() {
            return Err(bad());
        }
        // Checked and decoded in one pass: every blob request parses one (the `hex` crate's
        // decode after a separate check cost about 3,700 instructions of a cached blob GET).
        let mut bytes = Vec::with_capacity(enc.len() / 2);
        for pair in enc.as_bytes().chunks_exact(2) {
            match (nibble(pair[0]), nibble(pair[1])) {
                (Some(hi), Some(lo)) => bytes.push(hi << 4 | lo),
                _ => return Err(bad()),
            }
        }
        Ok(Digest {
            algorithm,
            bytes: bytes.into_boxed_slice(),
        })
    }
}

/// The value of a lowercase hex digit.
fn nibble(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.algorithm.as_str())?;
        f.write_str(":")?;
        f.write_str(self.hex_in(&mut [0; MAX_HEX_LEN]))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Hashes bytes as they stream past; the caller decides at end of stream whether they match.
/// Uses ring's SHA-2, which is about 1.8x the `sha2` crate's portable code on CPUs without
/// SHA extensions (measured by benches/compare.sh's cold fill); hashing bounds a cold pull.
#[derive(Clone)]
pub struct Verifier {
    algorithm: Algorithm,
    context: ring::digest::Context,
    len: u64,
}

/// Proof that a body of `len()` bytes hashed to `digest()`. Only [`Verifier::verify`] makes
/// one, and committing a blob to storage requires it, so nothing can be stored under a digest
/// its bytes were not checked against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    digest: Digest,
    len: u64,
}

impl Verified {
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A body that did not hash to the digest it was checked against.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("content does not match its digest: expected {expected}, got {actual}")]
pub struct Mismatch {
    pub expected: Digest,
    pub actual: Digest,
}

impl Verifier {
    pub fn new(algorithm: Algorithm) -> Self {
        let alg = match algorithm {
            Algorithm::Sha256 => &ring::digest::SHA256,
            Algorithm::Sha512 => &ring::digest::SHA512,
        };
        Verifier {
            algorithm,
            context: ring::digest::Context::new(alg),
            len: 0,
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        self.context.update(data);
        self.len += data.len() as u64;
    }

    /// The proof that the bytes hashed have the digest they hashed to, for content named by
    /// its own hash (a manifest fetched by tag). With [`verify`](Self::verify), the only ways
    /// to make a [`Verified`].
    pub fn prove(self) -> Verified {
        let len = self.len;
        Verified {
            digest: self.finish(),
            len,
        }
    }

    /// The proof that the bytes hashed are `expected`, or the mismatch.
    pub fn verify(self, expected: &Digest) -> Result<Verified, Mismatch> {
        let proof = self.prove();
        if proof.digest == *expected {
            Ok(proof)
        } else {
            Err(Mismatch {
                expected: expected.clone(),
                actual: proof.digest,
            })
        }
    }

    pub fn finish(self) -> Digest {
        Digest {
            algorithm: self.algorithm,
            bytes: self.context.finish().as_ref().to_vec().into_boxed_slice(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_and_prints_canonically() {
        let d: Digest = EMPTY.parse().unwrap();
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(Digest::sha256_of(b""), d);
    }

    #[test]
    fn only_matching_bytes_are_verified() {
        let want = Digest::sha256_of(b"hello");
        let mut v = Verifier::new(Algorithm::Sha256);
        v.update(b"hel");
        v.update(b"lo");
        let proof = v.clone().verify(&want).unwrap();
        assert_eq!((proof.digest(), proof.len()), (&want, 5));
        v.update(b"!");
        let e = v.verify(&want).unwrap_err();
        assert_eq!(e.expected, want);
        assert_eq!(e.actual, Digest::sha256_of(b"hello!"));
    }

    #[test]
    fn rejects_bad_digests() {
        assert_eq!("sha256".parse::<Digest>(), Err(DigestError::NoAlgorithm));
        assert!(matches!(
            "md5:abcd".parse::<Digest>(),
            Err(DigestError::Unsupported(_))
        ));
        assert!("sha256:totallywrong".parse::<Digest>().is_err());
        assert!(
            EMPTY
                .to_uppercase()
                .replace("SHA256", "sha256")
                .parse::<Digest>()
                .is_err()
        );
        assert!(format!("{EMPTY}0").parse::<Digest>().is_err());
    }

    proptest! {
        #[test]
        fn streaming_equals_one_shot(data in proptest::collection::vec(any::<u8>(), 0..4096), cut in 0usize..4096) {
            let cut = cut.min(data.len());
            let mut v = Verifier::new(Algorithm::Sha256);
            v.update(&data[..cut]);
            v.update(&data[cut..]);
            prop_assert_eq!(v.finish(), Digest::sha256_of(&data));
        }

        #[test]
        fn agrees_with_the_sha2_crate(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            use sha2::Digest as _;
            let mut v = Verifier::new(Algorithm::Sha256);
            v.update(&data);
            prop_assert_eq!(v.finish().hex(), hex::encode(sha2::Sha256::digest(&data)));
            let mut v = Verifier::new(Algorithm::Sha512);
            v.update(&data);
            prop_assert_eq!(v.finish().hex(), hex::encode(sha2::Sha512::digest(&data)));
        }

        #[test]
        fn prints_what_it_parses(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            for alg in [Algorithm::Sha256, Algorithm::Sha512] {
                let mut v = Verifier::new(alg);
                v.update(&data);
                let d = v.finish();
                let text = d.to_string();
                prop_assert_eq!(&text, &format!("{}:{}", alg.as_str(), hex::encode(&d.bytes)));
                prop_assert_eq!(text.parse::<Digest>(), Ok(d));
            }
        }

        #[test]
        fn parse_never_panics(s in ".{0,200}") {
            let _ = s.parse::<Digest>();
        }
    }
}
