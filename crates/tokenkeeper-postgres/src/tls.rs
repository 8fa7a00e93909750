//! TLS for PostgreSQL connections: rustls (aws-lc-rs, as reqwest uses), verifying the server's
//! certificate and host name against the platform's roots or a private CA.

use std::sync::Arc;

use rustls::ClientConfig;
use rustls_platform_verifier::BuilderVerifierExt;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::ConnectError;

/// The TLS connector the pool connects with.
pub(crate) type Connector = MakeRustlsConnect;

/// The connector: `ca` (PEM) as the only root when given, otherwise the platform's roots.
pub(crate) fn connector(ca: Option<&[u8]>) -> Result<Connector, ConnectError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    // The provider is named, never taken from the process default (which panics when more than
    // one provider is compiled in).
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConnectError::Tls(e.to_string()))?;
    let config = match ca {
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            let mut added = 0;
            for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(pem) {
                let cert: rustls::pki_types::CertificateDer<'static> =
                    cert.map_err(|e| ConnectError::Tls(format!("the CA certificate: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| ConnectError::Tls(format!("the CA certificate: {e}")))?;
                added += 1;
            }
            if added == 0 {
                return Err(ConnectError::Tls(
                    "the CA certificate holds no PEM certificate".into(),
                ));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => builder
            .with_platform_verifier()
            .map_err(|e| ConnectError::Tls(e.to_string()))?
            .with_no_client_auth(),
    };
    Ok(MakeRustlsConnect::new(config))
}
