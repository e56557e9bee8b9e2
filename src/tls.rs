//! TLS for every listener (the API, the agents' endpoints; the peer transport gets its
//! configs from here too) and every client of them, on rustls with the ring provider, and
//! the identity a verified client certificate carries.
//!
//! Owns turning PEM files into rustls configs. Invariants:
//! - a client certificate is only ever read after rustls verified it against the
//!   configured CA: [`identity`] is called on `peer_certificates()` of a finished handshake;
//! - a listener that requires client certificates refuses a handshake without one (the
//!   peer transport, the agents' endpoints); the API accepts one without, so bearer tokens
//!   can authenticate instead;
//! - listeners offer HTTP/2 and HTTP/1.1 by ALPN (the agents' endpoint HTTP/1.1 only);
//!   clients' configs carry no ALPN of their own (the HTTP client adds what it speaks).

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The crypto provider every config uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM file (a chain: leaf first).
pub fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading certificates from {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificates in {}", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no PEM certificate", path.display());
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .with_context(|| format!("reading a private key from {}", path.display()))
}

/// A root store holding the certificates of `ca`.
pub fn roots(ca: &Path) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca)? {
        roots
            .add(c)
            .with_context(|| format!("{} is not a usable CA certificate", ca.display()))?;
    }
    Ok(roots)
}

/// How a listener treats client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCerts {
    /// None asked for.
    Ignored,
    /// Verified against the CA when offered; a client may offer none.
    Optional,
    /// Required, and verified against the CA.
    Required,
}

/// A listener's config: its certificate chain and key, and client certificates verified
/// against `client_ca` per `mode` (`Ignored` needs no CA).
pub fn server_config(
    cert: &Path,
    key_file: &Path,
    client_ca: Option<&Path>,
    mode: ClientCerts,
) -> Result<Arc<rustls::ServerConfig>> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS versions")?;
    let builder = match (mode, client_ca) {
        (ClientCerts::Ignored, _) => builder.with_no_client_auth(),
        (_, None) => bail!("client certificates need a CA to verify them against"),
        (mode, Some(ca)) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca)?),
                provider(),
            );
            let verifier = if mode == ClientCerts::Optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .context("the client certificate verifier")?,
            )
        }
    };
    let mut config = builder
        .with_single_cert(certs(cert)?, key(key_file)?)
        .with_context(|| {
            format!(
                "{} and {} are not a certificate and its key",
                cert.display(),
                key_file.display()
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A client's config: servers verified against `ca` only, and this client's certificate
/// and key when given.
pub fn client_config(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots(ca)?);
    // No ALPN here: the HTTP client sets its own (h2, http/1.1), a raw upgrade http/1.1.
    with_identity(builder, identity)
}

/// Finishes a client config with this client's certificate and key, or none.
fn with_identity(
    builder: rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>,
    identity: Option<(&Path, &Path)>,
) -> Result<rustls::ClientConfig> {
    Ok(match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key_file)) => builder
            .with_client_auth_cert(certs(cert)?, key(key_file)?)
            .with_context(|| {
                format!(
                    "{} and {} are not a certificate and its key",
                    cert.display(),
                    key_file.display()
                )
            })?,
    })
}

/// A server verifier that accepts what the CA's WebPKI verifier accepts and whose
/// certificate is also in `group`: a replica dialing a peer, an agent dialing the API and
/// the API dialing an agent each expect one kind of certificate, not any of the CA's.
#[derive(Debug)]
struct GroupVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    group: String,
}

impl rustls::client::danger::ServerCertVerifier for GroupVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let ok = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        if identity(end_entity).is_some_and(|i| i.groups.contains(&self.group)) {
            Ok(ok)
        } else {
            Err(rustls::Error::General(format!(
                "the server's certificate is not in {}",
                self.group
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// [`client_config`], also requiring the server's certificate to be in `group` (replicas'
/// `system:flotilla:replicas`, agents' `system:nodes`).
pub fn client_config_requiring(
    ca: &Path,
    identity_files: Option<(&Path, &Path)>,
    group: &str,
) -> Result<rustls::ClientConfig> {
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots(ca)?),
        provider(),
    )
    .build()
    .context("the server certificate verifier")?;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(GroupVerifier {
            inner,
            group: group.to_string(),
        }));
    with_identity(builder, identity_files)
}

/// Whether the certificate `der` is in `group`.
pub fn in_group(der: &[u8], group: &str) -> bool {
    identity(&CertificateDer::from(der.to_vec()))
        .is_some_and(|i| i.groups.iter().any(|g| g == group))
}

/// Who a certificate names, as Kubernetes reads client certificates: the subject's common
/// name is the user, its organizations the groups.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CertIdentity {
    /// The subject's CN.
    pub user: String,
    /// The subject's O values.
    pub groups: Vec<String>,
}

/// The identity of a (verified) certificate; `None` if it names no user.
pub fn identity(cert: &CertificateDer<'_>) -> Option<CertIdentity> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let subject = parsed.subject();
    let user = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .filter(|cn| !cn.is_empty())?
        .to_string();
    let groups = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok())
        .map(str::to_string)
        .collect();
    Some(CertIdentity { user, groups })
}

/// What the connection a request came on says about its client.
#[derive(Debug, Clone, Default)]
pub struct Conn {
    /// Over TLS.
    pub tls: bool,
    /// The identity of the client's verified certificate, if it offered one.
    pub cert: Option<CertIdentity>,
    /// The client's address.
    pub remote: Option<std::net::SocketAddr>,
}

/// The TLS server name of `host` (an IP address or a DNS name).
pub fn server_name(host: &str) -> Result<rustls::pki_types::ServerName<'static>> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    rustls::pki_types::ServerName::try_from(host.to_string())
        .with_context(|| format!("{host:?} is not a TLS server name"))
}

/// The host part of `host:port` (IPv6 in brackets).
pub fn host_of(addr: &str) -> &str {
    match addr.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => addr,
    }
}
