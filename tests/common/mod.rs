//! Shared helpers for cachalot's integration tests: the fake upstream registry, a tiny HTTP
//! client, and a way to run cachalot in-process against the fake.
#![allow(dead_code, unused_imports)]

pub mod auth_env;
pub mod capture;
pub mod child;
pub mod client;
pub mod fake_registry;
pub mod proxy;

pub use client::{Resp, TestClient};
pub use fake_registry::*;
pub use proxy::*;
