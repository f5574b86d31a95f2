//! How cachalot checks an upstream's certificate and proves its own: the webpki roots plus an
//! upstream's `ca_file`, an optional client pair for mTLS (`client_cert`, `client_key`), or no
//! check at all with `insecure_skip_verify`.
//!
//! Files are read when the upstream is built (at start, and by `check-config`), so a missing or
//! unparsable one fails then with its key and path named, never at the first pull.

use crate::config::{ConfigError, UpstreamConfig};
use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The rustls client config for `cfg`'s connections, ALPN left empty for hyper-rustls to fill.
pub fn client_config(cfg: &UpstreamConfig) -> Result<ClientConfig, ConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(cfg, "url", format!("TLS setup: {e}")))?;
    let builder = if cfg.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider.clone())))
    } else {
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some(path) = &cfg.ca_file {
            for cert in read_certs(cfg, "ca_file", path)? {
                roots
                    .add(cert)
                    .map_err(|e| file_error(cfg, "ca_file", path, e))?;
            }
        }
        builder.with_root_certificates(roots)
    };
    match (&cfg.client_cert, &cfg.client_key) {
        (Some(cert), Some(key)) => {
            let certs = read_certs(cfg, "client_cert", cert)?;
            let der = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| file_error(cfg, "client_key", key, e))?;
            let signing = provider
                .key_provider
                .load_private_key(der.clone_key())
                .map_err(|e| file_error(cfg, "client_key", key, e))?;
            // Checked here rather than at the first handshake, where a mismatch would look like
            // the upstream refusing the certificate.
            if let Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) =
                CertifiedKey::new(certs.clone(), signing).keys_match()
            {
                return Err(invalid(
                    cfg,
                    "client_key",
                    format!(
                        "{} does not belong to client_cert {}",
                        key.display(),
                        cert.display()
                    ),
                ));
            }
            builder
                .with_client_auth_cert(certs, der)
                .map_err(|e| file_error(cfg, "client_key", key, e))
        }
        // `validate` refuses one without the other.
        _ => Ok(builder.with_client_cert_resolver(Arc::new(NoClientCert {
            upstream: cfg.name.clone(),
            warned: AtomicBool::new(false),
        }))),
    }
}

/// Reads a PEM bundle holding at least one certificate.
fn read_certs(
    cfg: &UpstreamConfig,
    key: &str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| file_error(cfg, key, path, e))?;
    if certs.is_empty() {
        return Err(file_error(cfg, key, path, "no PEM certificate found"));
    }
    Ok(certs)
}

fn invalid(cfg: &UpstreamConfig, key: &str, message: String) -> ConfigError {
    ConfigError::Invalid(format!("upstream {:?}: {key}: {message}", cfg.name))
}

fn file_error(
    cfg: &UpstreamConfig,
    key: &str,
    path: &Path,
    e: impl std::fmt::Display,
) -> ConfigError {
    invalid(cfg, key, format!("{}: {e}", path.display()))
}

/// No client certificate, as `with_no_client_auth`, but saying so when the upstream asks for
/// one. Under TLS 1.3 a server that requires a certificate refuses it only after the client
/// thinks the handshake is done, and what reaches the request is a connection closed before it
/// was ready: without this line nothing would say why.
#[derive(Debug)]
struct NoClientCert {
    upstream: String,
    warned: AtomicBool,
}

impl ResolvesClientCert for NoClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        // Once per upstream at warn: a server that only offers client auth asks on every
        // connection, and pulls from it work.
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                upstream = %self.upstream,
                "the upstream asked for a TLS client certificate and none is configured \
                 (client_cert, client_key); if it requires one, its connections fail"
            );
        } else {
            tracing::debug!(upstream = %self.upstream, "TLS client certificate asked for, none sent");
        }
        None
    }

    fn has_certs(&self) -> bool {
        false
    }
}

/// `insecure_skip_verify`: any certificate, any name. The handshake's signatures are still
/// checked, which costs nothing and keeps rustls' own invariants; it does not make the
/// connection any more trustworthy.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
