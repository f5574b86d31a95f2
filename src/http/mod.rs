//! The HTTP side: routing, handlers, bodies and the server loop.

pub mod body;
pub mod handlers;
pub mod log;
pub mod metrics_listener;
pub mod route;
pub mod sendfile;
pub mod server;
