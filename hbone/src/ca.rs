//! The certificate authority a node agent uses: a root certificate and key loaded from PEM (RSA or
//! ECDSA roots; Istio's own test root is RSA-2048 in PKCS#1), or created for a new mesh. It mints
//! ECDSA P-256 workload certificates carrying only the workload's SPIFFE URI SAN, for server and
//! client auth. `CertificateAuthority` is the seam where a remote CA (a CSR to a CA service) fits.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::identity::Identity;

/// Workload certificate lifetime when none is asked for (Istio's default).
pub const DEFAULT_WORKLOAD_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Lifetime of a root made by `LocalCa::generate`.
pub const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start this long before they are minted, so a peer whose clock is a little behind
/// still accepts them.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(60);

/// File names in a CA directory, as Istio's plug-in CA secret names them.
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const CA_CERT_FILE: &str = "ca-cert.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// A workload's certificate chain and private key.
#[derive(Debug)]
pub struct WorkloadCertificate {
    pub identity: Identity,
    /// Leaf first, then any intermediates up to (not including) the root.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivatePkcs8KeyDer<'static>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl WorkloadCertificate {
    /// When it should be renewed: half-way through its life.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life / 2
    }
}

/// What can issue workload certificates: the local CA here, a remote one later.
pub trait CertificateAuthority: Send + Sync {
    fn issue(
        &self,
        identity: &Identity,
        lifetime: Duration,
    ) -> Result<WorkloadCertificate, CaError>;
    /// The roots peers' certificates must chain to.
    fn roots(&self) -> Vec<CertificateDer<'static>>;
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("cannot write {path}: {cause}")]
    Write {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{what}: no PEM certificate found")]
    NoCertificate { what: String },
    #[error("{what}: {problem}")]
    BadKey { what: String, problem: String },
    #[error("{what}: the CA certificate cannot sign: {problem}")]
    BadCertificate { what: String, problem: String },
    #[error("cannot mint a certificate for {identity}: {problem}")]
    Mint { identity: String, problem: String },
}

/// A CA whose key is on this node.
pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    /// The certificate that signs (the root, or an intermediate below it).
    signing_cert: CertificateDer<'static>,
    /// Chain from the signing certificate up to, not including, the root (empty when the root signs).
    intermediates: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa")
            .field("roots", &self.roots.len())
            .finish()
    }
}

impl LocalCa {
    /// Creates a new root (ECDSA P-256, ten years) for `trust_domain`.
    pub fn generate(trust_domain: &str) -> Result<Self, CaError> {
        let bad = |problem: rcgen::Error| CaError::Mint {
            identity: trust_domain.into(),
            problem: problem.to_string(),
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(bad)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, "shoal root CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - CLOCK_SKEW_ALLOWANCE).into();
        params.not_after = (now + ROOT_LIFETIME).into();
        let cert = params.self_signed(&key).map_err(bad)?;
        let der = cert.der().clone();
        Ok(LocalCa {
            issuer: Issuer::new(params, key),
            signing_cert: der.clone(),
            intermediates: Vec::new(),
            roots: vec![der],
        })
    }

    /// Loads a CA from PEM text: the signing certificate, its key, and the roots (which may be the
    /// signing certificate itself). `what` names the source in errors.
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        root_pem: Option<&str>,
        what: &str,
    ) -> Result<Self, CaError> {
        let certs = parse_certs(cert_pem, what)?;
        let signing_cert = certs[0].clone();
        let key = parse_key(key_pem, what)?;
        let issuer =
            Issuer::from_ca_cert_der(&signing_cert, key).map_err(|e| CaError::BadCertificate {
                what: what.into(),
                problem: e.to_string(),
            })?;
        let roots = match root_pem {
            Some(pem) => parse_certs(pem, what)?,
            None => vec![certs
                .last()
                .cloned()
                .unwrap_or_else(|| signing_cert.clone())],
        };
        // Intermediates: what the cert file carries besides the signing cert, minus any root.
        let intermediates: Vec<_> = certs
            .iter()
            .skip(1)
            .filter(|c| !roots.contains(c))
            .cloned()
            .collect();
        let intermediates = if roots.contains(&signing_cert) {
            Vec::new()
        } else {
            std::iter::once(signing_cert.clone())
                .chain(intermediates)
                .collect()
        };
        Ok(LocalCa {
            issuer,
            signing_cert,
            intermediates,
            roots,
        })
    }

    /// Loads `dir`: `ca-cert.pem` + `ca-key.pem` (+ `root-cert.pem` when the CA is an intermediate),
    /// or `root-cert.pem` + `ca-key.pem` for a self-signed root.
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let read = |name: &str| -> Result<Option<String>, CaError> {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(s) => Ok(Some(s)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(cause) => Err(CaError::Read { path, cause }),
            }
        };
        let key = read(CA_KEY_FILE)?.ok_or_else(|| CaError::Read {
            path: dir.join(CA_KEY_FILE),
            cause: std::io::ErrorKind::NotFound.into(),
        })?;
        let root = read(ROOT_CERT_FILE)?;
        let what = dir.display().to_string();
        match (read(CA_CERT_FILE)?, root) {
            (Some(cert), root) => Self::from_pem(&cert, &key, root.as_deref(), &what),
            (None, Some(root)) => Self::from_pem(&root, &key, None, &what),
            (None, None) => Err(CaError::Read {
                path: dir.join(ROOT_CERT_FILE),
                cause: std::io::ErrorKind::NotFound.into(),
            }),
        }
    }

    /// Writes `root-cert.pem` and `ca-key.pem` (mode 0600) into `dir`, creating it.
    pub fn write(&self, dir: &Path) -> Result<(), CaError> {
        use std::os::unix::fs::OpenOptionsExt;
        let write_err = |path: PathBuf| {
            move |cause| CaError::Write {
                path: path.clone(),
                cause,
            }
        };
        std::fs::create_dir_all(dir).map_err(write_err(dir.to_path_buf()))?;
        let root_path = dir.join(ROOT_CERT_FILE);
        let root = self.roots.first().unwrap_or(&self.signing_cert);
        std::fs::write(&root_path, pem("CERTIFICATE", root))
            .map_err(write_err(root_path.clone()))?;
        if &self.signing_cert != root {
            let chain: String = std::iter::once(&self.signing_cert)
                .chain(self.intermediates.iter().skip(1))
                .map(|c| pem("CERTIFICATE", c))
                .collect();
            let cert_path = dir.join(CA_CERT_FILE);
            std::fs::write(&cert_path, chain).map_err(write_err(cert_path))?;
        }
        let key_path = dir.join(CA_KEY_FILE);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&key_path)
            .map_err(write_err(key_path.clone()))?;
        std::io::Write::write_all(&mut file, self.issuer.key().serialize_pem().as_bytes())
            .map_err(write_err(key_path))
    }
}

impl LocalCa {
    /// Mints a certificate valid from `not_before` for `lifetime` (tests make expired and
    /// not-yet-valid ones with it; `issue` is the usual way in).
    pub fn issue_window(
        &self,
        identity: &Identity,
        not_before: SystemTime,
        lifetime: Duration,
    ) -> Result<WorkloadCertificate, CaError> {
        let bad = |problem: String| CaError::Mint {
            identity: identity.to_string(),
            problem,
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| bad(e.to_string()))?;
        let mut params = CertificateParams::default();
        // Istio's workload certificates have an empty subject; the SAN is then marked critical.
        params.distinguished_name = DistinguishedName::new();
        let uri = identity
            .to_string()
            .try_into()
            .map_err(|e: rcgen::Error| bad(e.to_string()))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let not_after = not_before + lifetime;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| bad(e.to_string()))?;
        let chain = std::iter::once(cert.der().clone())
            .chain(self.intermediates.iter().cloned())
            .collect();
        Ok(WorkloadCertificate {
            identity: identity.clone(),
            chain,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            not_before,
            not_after,
        })
    }
}

impl CertificateAuthority for LocalCa {
    /// Valid from a little before now (`CLOCK_SKEW_ALLOWANCE`) until `lifetime` from now.
    fn issue(
        &self,
        identity: &Identity,
        lifetime: Duration,
    ) -> Result<WorkloadCertificate, CaError> {
        self.issue_window(
            identity,
            SystemTime::now() - CLOCK_SKEW_ALLOWANCE,
            lifetime + CLOCK_SKEW_ALLOWANCE,
        )
    }

    fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.roots.clone()
    }
}

fn parse_certs(pem_text: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem_text.as_bytes())
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(CaError::NoCertificate { what: what.into() });
    }
    Ok(certs)
}

/// Reads a PKCS#8 key, or a PKCS#1 RSA key (as Istio's sample CA ships), which is rewrapped as
/// PKCS#8 for the signer.
fn parse_key(pem_text: &str, what: &str) -> Result<KeyPair, CaError> {
    let bad = |problem: String| CaError::BadKey {
        what: what.into(),
        problem,
    };
    let key = PrivateKeyDer::from_pem_slice(pem_text.as_bytes())
        .map_err(|e| bad(format!("no PEM private key found ({e})")))?;
    let pkcs8 = match &key {
        PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
        PrivateKeyDer::Pkcs1(k) => rsa_pkcs1_to_pkcs8(k.secret_pkcs1_der()),
        PrivateKeyDer::Sec1(_) => {
            return Err(bad(
                "EC keys in SEC1 form (\"EC PRIVATE KEY\") are not read; convert with \
                 `openssl pkcs8 -topk8 -nocrypt -in ca-key.pem -out ca-key.pk8.pem`"
                    .into(),
            ))
        }
        _ => return Err(bad("unsupported private key format".into())),
    };
    KeyPair::try_from(pkcs8.as_slice()).map_err(|e| {
        bad(format!(
            "not an RSA, ECDSA P-256/P-384 or Ed25519 key ({e})"
        ))
    })
}

/// Wraps a PKCS#1 RSAPrivateKey in a PKCS#8 PrivateKeyInfo (RFC 5208 §5):
/// SEQUENCE { INTEGER 0, AlgorithmIdentifier { rsaEncryption, NULL }, OCTET STRING pkcs1 }.
fn rsa_pkcs1_to_pkcs8(pkcs1: &[u8]) -> Vec<u8> {
    const VERSION_0: [u8; 3] = [0x02, 0x01, 0x00];
    const RSA_ENCRYPTION_ALG_ID: [u8; 15] = [
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut octets = vec![0x04];
    der_len(&mut octets, pkcs1.len());
    octets.extend_from_slice(pkcs1);
    let body_len = VERSION_0.len() + RSA_ENCRYPTION_ALG_ID.len() + octets.len();
    let mut out = vec![0x30];
    der_len(&mut out, body_len);
    out.extend_from_slice(&VERSION_0);
    out.extend_from_slice(&RSA_ENCRYPTION_ALG_ID);
    out.extend_from_slice(&octets);
    out
}

fn der_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

/// PEM text for one DER object.
pub fn pem(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der.to_vec()))
}
