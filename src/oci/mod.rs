//! Pure OCI domain types: digests, names, manifests and the error envelope. No I/O here.

pub mod descriptor;
pub mod digest;
pub mod errors;
pub mod image_ref;
pub mod link;
pub mod manifest;
pub mod name;
pub mod referrers;

pub use digest::{Algorithm, Digest, Mismatch, Verified, Verifier};
pub use errors::{ErrorCode, OciError};
pub use image_ref::{ImageRef, PlatformSpec};
pub use name::{Reference, RepoName, Tag};
