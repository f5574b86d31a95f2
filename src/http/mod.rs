//! The HTTP side: routing, handlers, bodies and the server loop.

pub(crate) mod body;
mod coalesce;
mod conns;
mod h1;
pub(crate) mod handlers;
pub(crate) mod listing;
pub(crate) mod log;
pub(crate) mod metrics_listener;
mod referrers;
pub mod route;
pub(crate) mod sendfile;
pub mod server;
pub(crate) mod tls;
