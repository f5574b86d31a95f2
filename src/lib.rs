//! cachalot: a pull-through caching proxy and mirror for OCI container registries.
//!
//! A request flows `http::route` -> `http::handlers` -> `mirror`, which answers from `storage`
//! or fills it once from `upstream`. See DESIGN.md for the invariants every module keeps.

pub mod config;
pub mod error;
pub mod metrics;
pub mod oci;

pub use error::{Error, Result};
pub mod storage;
