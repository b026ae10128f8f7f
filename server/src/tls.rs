//! TLS for both listeners (rustls, with the aws-lc-rs provider pgwire already uses):
//! `SLUICE_TLS_CERT` / `SLUICE_TLS_KEY` (`--tls-cert` / `--tls-key`), PEM files.
//!
//! The Postgres listener answers `SSLRequest` (and direct TLS, ALPN `postgresql`) through
//! pgwire; a client that does not ask for TLS is still served in the clear, as Postgres does
//! without `hostssl` rules (clients that need it say `sslmode=require` or `verify-full`). The
//! HTTP listener serves HTTPS only.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;

use crate::error::{Result, ServerError};

/// Where the certificate chain and its key are.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The certificate chain, PEM (the server's first).
    pub cert: PathBuf,
    /// Its private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// The TLS acceptors of both listeners.
#[derive(Clone)]
pub struct Tls {
    /// For the Postgres listener (ALPN `postgresql`).
    pub pg: TlsAcceptor,
    /// For the HTTP listener (ALPN `http/1.1`).
    pub http: TlsAcceptor,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls")
    }
}

fn unreadable(path: &Path, what: &str, e: impl std::fmt::Display) -> ServerError {
    ServerError::External(format!(
        "cannot read the TLS {what} {}: {e}",
        path.display()
    ))
}

impl Tls {
    /// Loads `files`; an error says which file is wrong and why.
    pub fn load(files: &TlsFiles) -> Result<Self> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
            .map_err(|e| unreadable(&files.cert, "certificate", e))?
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| unreadable(&files.cert, "certificate", e))?;
        if certs.is_empty() {
            return Err(unreadable(
                &files.cert,
                "certificate",
                "no PEM certificate in it",
            ));
        }
        let key = PrivateKeyDer::from_pem_file(&files.key)
            .map_err(|e| unreadable(&files.key, "key", e))?;
        let config = |alpn: &[u8]| -> Result<TlsAcceptor> {
            let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
            let mut config = ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| ServerError::Internal(e.to_string()))?
                .with_no_client_auth()
                .with_single_cert(certs.clone(), key.clone_key())
                .map_err(|e| {
                    ServerError::External(format!(
                        "the TLS key {} does not fit the certificate {}: {e}",
                        files.key.display(),
                        files.cert.display()
                    ))
                })?;
            config.alpn_protocols = vec![alpn.to_vec()];
            Ok(TlsAcceptor::from(Arc::new(config)))
        };
        Ok(Self {
            pg: config(b"postgresql")?,
            http: config(b"http/1.1")?,
        })
    }
}
