//! Pure OCI domain types: digests, names, manifests and the error envelope. No I/O here.

pub mod digest;
pub mod errors;
pub mod manifest;
pub mod name;
pub mod reference;

pub use digest::{Algorithm, Digest, Verifier};
pub use errors::{ErrorCode, OciError};
pub use name::{Reference, RepoName, Tag};
pub use reference::ImageRef;
