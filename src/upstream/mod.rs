//! Talking to upstream registries: one pooled HTTP client per configured upstream, with token
//! auth, redirects and timeouts. The mirror calls [`Upstream::send`] and interprets the answer.

pub mod auth;
mod breaker;
pub mod client;
pub mod credentials;
pub mod tls;

pub use client::{Op, Upstream, UpstreamBody, UpstreamRequest};
