//! Air-gapped sites: prefetch image lists into the cache, export them as an OCI layout bundle,
//! import a bundle into another cache, and keep configured lists warm from the running server.

pub mod bundle;
pub mod cli;
pub mod index;
pub mod prefetch;
pub mod refresh;
pub mod source;

pub use refresh::spawn_refresh;
