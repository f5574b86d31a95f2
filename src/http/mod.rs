//! The HTTP side: routing, handlers, bodies and the server loop.

pub mod body;
pub mod handlers;
pub mod route;
pub mod server;
