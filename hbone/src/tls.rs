//! mTLS as HBONE speaks it (rustls on ring, or on aws-lc-rs with the `aws-lc` feature): TLS 1.3,
//! AES-GCM suites, ALPN `h2`, no SNI and no resumption. The client always presents its workload
//! certificate and accepts a server only if it chains to the mesh roots and carries one of the
//! expected SPIFFE ids; the server requires a client certificate from its own trust domain and
//! exposes the peer's identity. Every refusal is specific (`Refusal`), so logs and response flags
//! can say why.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
#[cfg(feature = "aws-lc")]
use rustls::crypto::aws_lc_rs as provider;
#[cfg(not(feature = "aws-lc"))]
use rustls::crypto::ring as provider;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::certs::WorkloadCerts;
use crate::identity::Identity;

/// ALPN protocol HBONE negotiates.
pub const ALPN_H2: &[u8] = b"h2";

/// Why a handshake was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the peer's certificate does not chain to the mesh roots")]
    UntrustedRoot,
    #[error("wrong peer identity: expected {}, presented {}", list(.expected), list(.presented))]
    WrongIdentity {
        expected: Vec<String>,
        presented: Vec<String>,
    },
    #[error("the peer's certificate has expired")]
    Expired,
    #[error("the peer's certificate is not valid yet")]
    NotYetValid,
    #[error("the peer presented no client certificate")]
    NoClientCertificate,
    #[error("wrong trust domain: expected {expected}, presented {presented}")]
    WrongTrustDomain { expected: String, presented: String },
    #[error("the peer's certificate carries no SPIFFE identity")]
    NoIdentity,
    #[error("TLS handshake failed: {0}")]
    Other(String),
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(" or ")
    }
}

impl Refusal {
    /// Reads the refusal out of a rustls error (ours when a verifier here refused; the nearest
    /// match when rustls or the peer did).
    pub fn from_rustls(err: &Error) -> Refusal {
        match err {
            Error::InvalidCertificate(CertificateError::Other(other)) => {
                match other.0.downcast_ref::<Refusal>() {
                    Some(r) => r.clone(),
                    None => Refusal::Other(err.to_string()),
                }
            }
            Error::InvalidCertificate(CertificateError::UnknownIssuer) => Refusal::UntrustedRoot,
            Error::InvalidCertificate(CertificateError::BadSignature) => Refusal::UntrustedRoot,
            Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            ) => Refusal::Expired,
            Error::InvalidCertificate(
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
            ) => Refusal::NotYetValid,
            Error::NoCertificatesPresented => Refusal::NoClientCertificate,
            other => Refusal::Other(other.to_string()),
        }
    }

    fn into_rustls(self) -> Error {
        Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(self))))
    }
}

/// The crypto library under every TLS connection: ring by default, aws-lc-rs with the `aws-lc`
/// feature (Istio's ztunnel builds with aws-lc-rs by default). aws-lc-rs has AVX-512 AES-GCM, which
/// on CPUs that have it seals about 1.5× as fast as ring, and ML-KEM for the post-quantum key
/// exchange Istio offers. Everything else (rcgen's certificate minting, verification) is the same.
pub const CRYPTO_LIBRARY: &str = if cfg!(feature = "aws-lc") {
    "aws-lc-rs"
} else {
    "ring"
};

/// The selected library's provider with all of its defaults: for TLS that is not HBONE (a
/// waypoint's TLS origination to servers outside the mesh).
pub fn default_provider() -> CryptoProvider {
    provider::default_provider()
}

/// The crypto HBONE uses: TLS 1.3 AES-256-GCM and AES-128-GCM; X25519, P-256, P-384 and, with
/// aws-lc-rs, X25519MLKEM768 (ring has no ML-KEM), in Istio's order of preference.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    let base = provider::default_provider();
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            provider::cipher_suite::TLS13_AES_256_GCM_SHA384,
            provider::cipher_suite::TLS13_AES_128_GCM_SHA256,
        ],
        kx_groups: vec![
            provider::kx_group::X25519,
            provider::kx_group::SECP256R1,
            provider::kx_group::SECP384R1,
            #[cfg(feature = "aws-lc")]
            provider::kx_group::X25519MLKEM768,
        ],
        ..base
    })
}

/// The SPIFFE identities in a certificate's URI SANs.
pub fn identities(cert: &CertificateDer<'_>) -> Vec<Identity> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, parsed)) = X509Certificate::from_der(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(uri) => Identity::parse(uri).ok(),
            _ => None,
        })
        .collect()
}

/// The mesh's trust: its root certificates and its trust domain.
#[derive(Clone, Debug)]
pub struct Trust {
    pub roots: Arc<RootCertStore>,
    pub trust_domain: String,
}

impl Trust {
    pub fn new(roots: &[CertificateDer<'static>], trust_domain: &str) -> Result<Self, Error> {
        let mut store = RootCertStore::empty();
        for r in roots {
            store.add(r.clone())?;
        }
        Ok(Trust {
            roots: Arc::new(store),
            trust_domain: trust_domain.to_string(),
        })
    }
}

/// A client config for connections from `certs`' identity to a peer that must present one of
/// `expected`.
pub fn client_config(
    certs: Arc<WorkloadCerts>,
    trust: &Trust,
    expected: Vec<Identity>,
) -> Result<ClientConfig, Error> {
    let provider = crypto_provider();
    let verifier = ServerIdentityVerifier {
        roots: trust.roots.clone(),
        expected,
        algorithms: provider.signature_verification_algorithms,
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(Presenter(certs)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = rustls::client::Resumption::disabled();
    // The stream seals and opens records itself once the handshake is done (`record`).
    config.enable_secret_extraction = true;
    Ok(config)
}

/// A server config presenting `certs`, requiring clients from `trust`'s trust domain.
pub fn server_config(certs: Arc<WorkloadCerts>, trust: &Trust) -> Result<ServerConfig, Error> {
    let provider = crypto_provider();
    let webpki = WebPkiClientVerifier::builder_with_provider(trust.roots.clone(), provider.clone())
        .build()
        .map_err(|e| Error::General(e.to_string()))?;
    let verifier = TrustDomainVerifier {
        inner: webpki,
        trust_domain: trust.trust_domain.clone(),
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(Presenter(certs)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.enable_secret_extraction = true;
    Ok(config)
}

/// What a client passes as the server name: HBONE has none (no SNI, no DNS-name check), so the
/// peer's IP stands in; rustls never sends an IP address as SNI.
pub fn server_name(peer: std::net::IpAddr) -> ServerName<'static> {
    ServerName::IpAddress(peer.into())
}

/// Presents a workload's current certificate, and only while it is valid.
#[derive(Debug)]
struct Presenter(Arc<WorkloadCerts>);

impl ResolvesClientCert for Presenter {
    fn resolve(
        &self,
        _root_hints: &[&[u8]],
        _schemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for Presenter {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.current()
    }
}

#[derive(Debug)]
struct ServerIdentityVerifier {
    roots: Arc<RootCertStore>,
    expected: Vec<Identity>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ServerIdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let presented = identities(end_entity);
        if presented.iter().any(|p| self.expected.contains(p)) {
            return Ok(ServerCertVerified::assertion());
        }
        Err(Refusal::WrongIdentity {
            expected: self.expected.iter().map(ToString::to_string).collect(),
            presented: presented.iter().map(ToString::to_string).collect(),
        }
        .into_rustls())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// WebPKI client verification, then: the client's SPIFFE trust domain must be ours.
#[derive(Debug)]
struct TrustDomainVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for TrustDomainVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let presented = identities(end_entity);
        let Some(id) = presented.first() else {
            return Err(Refusal::NoIdentity.into_rustls());
        };
        if id.trust_domain() != self.trust_domain {
            return Err(Refusal::WrongTrustDomain {
                expected: self.trust_domain.clone(),
                presented: id.trust_domain().to_string(),
            }
            .into_rustls());
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
