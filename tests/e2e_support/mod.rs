//! End-to-end test support: a real upstream registry (Debian's `docker-registry`, the reference
//! distribution registry) behind an in-process token issuer, OCI layouts built from Rust and pushed
//! with `skopeo`, a Garage cluster as the shared S3 store, and small HTTP helpers.
//!
//! Each test binary that uses this module declares `mod e2e_support;`. Not every binary uses every
//! helper or re-export, hence the `dead_code` and `unused_imports` allowances.
#![allow(dead_code, unused_imports)]

pub mod cachalot;
pub mod certs;
pub mod garage;
pub mod http;
pub mod issuer;
pub mod oci;
pub mod podman;
pub mod registry;
pub mod shim;
pub mod skopeo;
pub mod tools;

use std::sync::OnceLock;

pub use issuer::{IssuerConfig, TokenIssuer};
pub use oci::{ImageLayout, Platform};
pub use registry::Distribution;
pub use tools::e2e_tools_available;

/// The user the token issuer knows; it may pull and push everywhere.
pub const USER: &str = "e2e-user";
/// That user's password.
pub const PASSWORD: &str = "e2e-password-7f3a";
/// The token `service` (the registry's audience).
pub const SERVICE: &str = "e2e-registry";
/// The token `iss` claim.
pub const ISSUER: &str = "cachalot-e2e-issuer";
/// Repositories under this prefix are private: anonymous clients get no access to them.
pub const PRIVATE_PREFIX: &str = "private/";

/// Public multi-arch image seeded into every upstream.
pub const MULTI_REPO: &str = "e2e/multi";
/// Tag of [`MULTI_REPO`].
pub const MULTI_TAG: &str = "v1";
/// Public single-platform image.
pub const SINGLE_REPO: &str = "e2e/single";
/// Tag of [`SINGLE_REPO`].
pub const SINGLE_TAG: &str = "latest";
/// Private multi-arch image (needs credentials to pull).
pub const PRIVATE_REPO: &str = "private/app";
/// Tag of [`PRIVATE_REPO`].
pub const PRIVATE_TAG: &str = "1.0";

/// A running upstream: token issuer + `docker-registry`, seeded with the three images above.
pub struct Upstream {
    pub issuer: TokenIssuer,
    pub registry: Distribution,
    /// The seeded images, as built (their digests are the expected ones).
    pub multi: ImageLayout,
    pub single: ImageLayout,
    pub private: ImageLayout,
    _layouts: tempfile::TempDir,
}

impl Upstream {
    /// Starts an issuer and a registry, then builds and pushes the seed images.
    pub async fn start() -> Upstream {
        let issuer = TokenIssuer::start(IssuerConfig::default()).await;
        let registry = Distribution::start(&issuer).await;
        let layouts = tempfile::tempdir().expect("tempdir for OCI layouts");
        let two = [
            Platform::new("linux", "amd64"),
            Platform::new("linux", "arm64"),
        ];
        let multi = ImageLayout::build(&layouts.path().join("multi"), MULTI_TAG, &two, 2);
        let single = ImageLayout::build(
            &layouts.path().join("single"),
            SINGLE_TAG,
            &[Platform::new("linux", "amd64")],
            2,
        );
        let private = ImageLayout::build(&layouts.path().join("private"), PRIVATE_TAG, &two, 2);
        for (layout, repo) in [
            (&multi, MULTI_REPO),
            (&single, SINGLE_REPO),
            (&private, PRIVATE_REPO),
        ] {
            skopeo::push(layout, &registry.host(), repo, USER, PASSWORD).await;
        }
        Upstream {
            issuer,
            registry,
            multi,
            single,
            private,
            _layouts: layouts,
        }
    }

    /// `http://127.0.0.1:PORT` of the registry.
    pub fn url(&self) -> String {
        self.registry.url()
    }
}

/// A runtime that lives as long as the test process, for servers shared by several tests (each
/// `#[tokio::test]` has its own runtime, which stops that test's tasks when the test ends).
pub fn shared_runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("e2e-shared")
            .enable_all()
            .build()
            .expect("shared runtime")
    })
}

/// Runs `fut` to completion on [`shared_runtime`] from any thread, async context included (it
/// blocks the caller on a helper thread). Tasks `fut` spawns keep running afterwards.
pub fn block_on_shared<T: Send + 'static>(
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    match std::thread::spawn(move || shared_runtime().block_on(fut)).join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// One seeded upstream per test binary, started on [`shared_runtime`] the first time it is asked
/// for. The registry child process dies with the test binary (see [`Distribution`]); its files
/// live under `CARGO_TARGET_TMPDIR` and are swept by the next run.
pub fn shared_upstream() -> &'static Upstream {
    static SHARED: OnceLock<&'static Upstream> = OnceLock::new();
    SHARED.get_or_init(|| {
        tools::sweep_stale_tempdirs();
        let upstream = block_on_shared(Upstream::start());
        &*Box::leak(Box::new(upstream))
    })
}

/// Skips the calling test (returns early) when the e2e tools are missing and `CI` is unset;
/// panics when they are missing under CI.
#[macro_export]
macro_rules! require_e2e_tools {
    () => {
        if !$crate::e2e_support::e2e_tools_available(module_path!()) {
            return;
        }
    };
}
