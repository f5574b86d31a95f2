//! The crate's error type, classified by whose fault it is, and its one mapping to an OCI error.

use crate::config::ConfigError;
use crate::oci::manifest::ManifestError;
use crate::oci::{ErrorCode, OciError};
use http::{HeaderValue, StatusCode};
use std::sync::Arc;

/// Every failure cachalot can meet while serving. Cloneable, because one upstream failure is
/// handed to every request that followed the same fill.
#[derive(Clone, Debug, thiserror::Error)]
pub enum Error {
    /// The client asked for something invalid or unknown; sent back as is.
    #[error("{}", .0.message)]
    Client(OciError),
    /// An upstream registry failed us.
    #[error("upstream {upstream}: {fault}")]
    Upstream {
        upstream: String,
        fault: UpstreamFault,
    },
    /// The local cache could not be read or written.
    #[error("storage: {0}")]
    Storage(Arc<std::io::Error>),
    /// The process ran out of a resource (open files, kernel memory) while serving: load, not a
    /// bug, and not the upstream's fault. The client is asked to retry shortly.
    #[error("out of resources: {0}")]
    Overloaded(Arc<std::io::Error>),
    #[error("{0}")]
    Config(Arc<ConfigError>),
    /// Input that cannot be used: an image reference or platform that does not parse, a bundle
    /// or image list that is not what it should be. One line naming the file, key or reference
    /// at fault.
    #[error("{0}")]
    Invalid(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// What was being done when `inner` happened (which manifest or blob of an image, which
    /// file), for the command line's one-line messages. Classified as `inner` is.
    #[error("{context}: {inner}")]
    Context { context: String, inner: Box<Error> },
}

/// How an upstream failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum UpstreamFault {
    /// It answered, but not with success.
    #[error("answered {status}")]
    Status {
        status: StatusCode,
        retry_after: Option<HeaderValue>,
    },
    #[error("could not connect: {0}")]
    Connect(String),
    #[error("timed out {0}")]
    Timeout(&'static str),
    /// It sent something that is not a valid answer (bad headers, oversized manifest, ...).
    #[error("sent an invalid response: {0}")]
    Protocol(String),
    #[error("sent content that does not match its digest: expected {expected}, got {actual}")]
    DigestMismatch { expected: String, actual: String },
    #[error("body ended after {got} of {expected} bytes")]
    Truncated { expected: u64, got: u64 },
    /// The upstream was taken for down after repeated connect failures or timeouts (its
    /// circuit is open), so it was not contacted; `retry_after` is when it will be tried again.
    #[error(
        "is unreachable (repeated connect failures or timeouts); not contacted until it is probed again"
    )]
    CircuitOpen { retry_after: HeaderValue },
    /// Its credentials could not be had: the credential helper or command failed (the log
    /// says how, with its stderr).
    #[error("could not get credentials: {0}")]
    Credentials(String),
    /// The mirror runs offline and the content is not cached.
    #[error("not contacted: the mirror is offline and this is not cached")]
    Offline,
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        if is_exhaustion(&e) {
            Error::Overloaded(Arc::new(e))
        } else {
            Error::Storage(Arc::new(e))
        }
    }
}

/// Whether `e` says the process or the system ran out of something that frees up as load
/// falls: descriptors (EMFILE, ENFILE) or kernel memory for sockets and buffers.
pub fn is_exhaustion(e: &std::io::Error) -> bool {
    use rustix::io::Errno;
    e.raw_os_error().is_some_and(|code| {
        [Errno::MFILE, Errno::NFILE, Errno::NOBUFS, Errno::NOMEM]
            .iter()
            .any(|x| x.raw_os_error() == code)
    })
}

/// `Retry-After` for an overloaded mirror: soon, since descriptors free up as responses end
/// (the 60 s sent for an upstream's 429 would idle a fleet for nothing).
static OVERLOAD_RETRY_AFTER: HeaderValue = HeaderValue::from_static("2");

impl From<ConfigError> for Error {
    fn from(e: ConfigError) -> Self {
        Error::Config(Arc::new(e))
    }
}

/// A manifest that failed its check: a digest mismatch stays one (it is counted and means the
/// upstream sent other bytes); a manifest without a media type is an invalid answer.
impl From<crate::oci::image_ref::InvalidRef> for Error {
    fn from(e: crate::oci::image_ref::InvalidRef) -> Self {
        Error::Invalid(e.0)
    }
}

impl From<ManifestError> for UpstreamFault {
    fn from(e: ManifestError) -> Self {
        match e {
            ManifestError::DigestMismatch {
                expected, actual, ..
            } => UpstreamFault::DigestMismatch {
                expected: expected.to_string(),
                actual: actual.to_string(),
            },
            e @ ManifestError::NoMediaType => UpstreamFault::Protocol(e.to_string()),
        }
    }
}

impl From<OciError> for Error {
    fn from(e: OciError) -> Self {
        Error::Client(e)
    }
}

impl Error {
    pub fn client(code: ErrorCode, message: impl Into<String>) -> Self {
        Error::Client(OciError::new(code, message))
    }

    pub fn upstream(upstream: &str, fault: UpstreamFault) -> Self {
        Error::Upstream {
            upstream: upstream.to_owned(),
            fault,
        }
    }

    /// This error, saying what was being done when it happened.
    pub fn context(self, context: impl Into<String>) -> Self {
        Error::Context {
            context: context.into(),
            inner: Box::new(self),
        }
    }

    /// The error under any [`Error::Context`].
    pub fn cause(&self) -> &Error {
        match self {
            Error::Context { inner, .. } => inner.cause(),
            e => e,
        }
    }

    /// The upstream status, if this error is an upstream's non-success answer.
    pub fn upstream_status(&self) -> Option<StatusCode> {
        match self.cause() {
            Error::Upstream {
                fault: UpstreamFault::Status { status, .. },
                ..
            } => Some(*status),
            _ => None,
        }
    }

    /// `Retry-After` to pass on to the client, from an upstream 429 or 503.
    pub fn retry_after(&self) -> Option<&HeaderValue> {
        match self.cause() {
            Error::Upstream {
                fault: UpstreamFault::Status { retry_after, .. },
                ..
            } => retry_after.as_ref(),
            Error::Upstream {
                fault: UpstreamFault::CircuitOpen { retry_after },
                ..
            } => Some(retry_after),
            Error::Overloaded(_) => Some(&OVERLOAD_RETRY_AFTER),
            _ => None,
        }
    }

    /// The OCI error a client sees. `not_found` is the code for an upstream 404, which depends
    /// on what was asked for (manifest, blob, repository).
    pub fn to_oci(&self, not_found: ErrorCode) -> OciError {
        match self {
            Error::Client(e) => e.clone(),
            Error::Upstream { upstream, fault } => match fault {
                UpstreamFault::Status { status, .. } => match status.as_u16() {
                    404 => OciError::new(not_found, format!("not found upstream at {upstream}")),
                    401 => OciError::new(
                        ErrorCode::Unauthorized,
                        format!("upstream {upstream} requires authentication for this repository"),
                    ),
                    403 => OciError::new(
                        ErrorCode::Denied,
                        format!("upstream {upstream} denied access to this repository"),
                    ),
                    429 => OciError::new(
                        ErrorCode::TooManyRequests,
                        format!("upstream {upstream} is rate limiting and this is not cached"),
                    ),
                    _ => OciError::new(
                        ErrorCode::Unavailable,
                        format!("upstream {upstream} {fault}"),
                    )
                    .with_status(StatusCode::BAD_GATEWAY),
                },
                UpstreamFault::Timeout(_) => OciError::new(
                    ErrorCode::Unavailable,
                    format!("upstream {upstream} {fault}"),
                )
                .with_status(StatusCode::GATEWAY_TIMEOUT),
                UpstreamFault::CircuitOpen { .. } => OciError::new(
                    ErrorCode::Unavailable,
                    format!("upstream {upstream} {fault}, and this is not cached"),
                ),
                UpstreamFault::Offline => OciError::new(
                    not_found,
                    format!("not cached, and the mirror is offline ({upstream} not contacted)"),
                ),
                _ => OciError::new(
                    ErrorCode::Unavailable,
                    format!("upstream {upstream} {fault}"),
                )
                .with_status(StatusCode::BAD_GATEWAY),
            },
            // Only a reference can come from a client, and the message names it. Bundles and
            // image lists are read by the command line, which prints the message itself.
            Error::Invalid(message) => OciError::new(ErrorCode::NameInvalid, message.clone()),
            Error::Overloaded(_) => OciError::new(
                ErrorCode::Unavailable,
                "the mirror is overloaded (out of open files or memory); retry shortly",
            ),
            // Details go to the log, not to the client.
            Error::Storage(_) | Error::Config(_) | Error::Internal(_) => OciError::new(
                ErrorCode::Unknown,
                "internal error in the mirror; see its log",
            ),
            // The context may name local files; the client gets the cause's own error.
            Error::Context { inner, .. } => inner.to_oci(not_found),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_statuses_map_to_oci_codes() {
        let st = |s: u16| {
            Error::upstream(
                "docker.io",
                UpstreamFault::Status {
                    status: StatusCode::from_u16(s).unwrap(),
                    retry_after: None,
                },
            )
        };
        assert_eq!(
            st(404).to_oci(ErrorCode::BlobUnknown).code,
            ErrorCode::BlobUnknown
        );
        assert_eq!(
            st(401).to_oci(ErrorCode::BlobUnknown).status,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            st(403).to_oci(ErrorCode::BlobUnknown).code,
            ErrorCode::Denied
        );
        assert_eq!(
            st(429).to_oci(ErrorCode::BlobUnknown).status,
            StatusCode::TOO_MANY_REQUESTS
        );
        let e = st(503).to_oci(ErrorCode::BlobUnknown);
        assert_eq!(e.status, StatusCode::BAD_GATEWAY);
        assert!(e.message.contains("docker.io"));
        let t = Error::upstream("quay.io", UpstreamFault::Timeout("waiting for headers"))
            .to_oci(ErrorCode::BlobUnknown);
        assert_eq!(t.status, StatusCode::GATEWAY_TIMEOUT);
        assert!(t.message.contains("quay.io"));
    }

    #[test]
    fn running_out_of_descriptors_is_a_503_to_retry_soon() {
        for code in [rustix::io::Errno::MFILE, rustix::io::Errno::NFILE] {
            let e: Error = std::io::Error::from_raw_os_error(code.raw_os_error()).into();
            let oci = e.to_oci(ErrorCode::BlobUnknown);
            assert_eq!(oci.status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(oci.code, ErrorCode::Unavailable);
            assert_eq!(e.retry_after().unwrap(), "2");
        }
        // Any other I/O failure stays what it is: a fault of the mirror's storage.
        let e: Error =
            std::io::Error::from_raw_os_error(rustix::io::Errno::IO.raw_os_error()).into();
        assert_eq!(
            e.to_oci(ErrorCode::BlobUnknown).status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert!(e.retry_after().is_none());
    }

    #[test]
    fn storage_details_stay_private() {
        let e: Error = std::io::Error::other("/var/lib/secret/path").into();
        assert!(!e.to_oci(ErrorCode::BlobUnknown).message.contains("secret"));
        let e = e.context("/var/lib/secret/bundle.tar");
        assert!(!e.to_oci(ErrorCode::BlobUnknown).message.contains("secret"));
        assert_eq!(
            e.to_oci(ErrorCode::BlobUnknown).status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }

    #[test]
    fn invalid_input_is_a_bad_request_and_context_keeps_the_class() {
        let e = Error::Invalid("image reference \"Not/A:Ref\": invalid repository name".into());
        let oci = e.to_oci(ErrorCode::ManifestUnknown);
        assert_eq!(oci.status, StatusCode::BAD_REQUEST);
        assert_eq!(oci.code, ErrorCode::NameInvalid);
        assert_eq!(oci.message, e.to_string());

        let e = Error::upstream(
            "docker.io",
            UpstreamFault::Status {
                status: StatusCode::TOO_MANY_REQUESTS,
                retry_after: Some(HeaderValue::from_static("7")),
            },
        )
        .context("blob sha256:ab")
        .context("image docker.io/library/x:1");
        assert_eq!(
            e.to_string(),
            "image docker.io/library/x:1: blob sha256:ab: upstream docker.io: answered 429 Too Many Requests"
        );
        assert_eq!(e.upstream_status(), Some(StatusCode::TOO_MANY_REQUESTS));
        assert_eq!(e.retry_after().unwrap(), "7");
        assert_eq!(
            e.to_oci(ErrorCode::BlobUnknown).status,
            StatusCode::TOO_MANY_REQUESTS
        );
    }
}
