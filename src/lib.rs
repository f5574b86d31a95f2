//! cachalot: a pull-through caching proxy and mirror for OCI container registries.
//!
//! A request flows `http::route` -> `http::handlers` -> `mirror`, which answers from `storage`
//! or fills it once from `upstream`. See DESIGN.md for the invariants every module keeps.

#![forbid(unsafe_code)]
// Everything is pub(crate) unless the binary, tests or benches need it.
#![warn(unreachable_pub)]

pub mod airgap;
pub mod auth;
pub mod client_config;
pub mod cluster;
pub mod config;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod log_writer;
pub mod metrics;
pub mod mirror;
pub mod oci;
mod outbound;
mod request_log;
pub mod storage;
pub mod telemetry;
pub mod ui;
pub mod upstream;
pub mod verify;

pub use error::{Error, Result};

/// Starting and stopping the server, for the binary and for tests.
pub mod server {
    pub use crate::http::server::{
        Server, SpawnOptions, connection_budget_for, raise_open_files_limit, spawn, spawn_with,
        spawn_with_options, upstream_connection_limits,
    };
    pub use crate::http::tls::check_pair as check_tls_pair;
}
