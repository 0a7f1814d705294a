//! A workload's current certificate, renewed at half its lifetime. Handshakes read the current one
//! through an atomic pointer swap, so new connections use a renewed certificate at once and open
//! connections, which finished their handshake long ago, are not disturbed. A certificate outside
//! its validity window is never presented.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::sign::CertifiedKey;
use rustls_pki_types::PrivateKeyDer;

use crate::ca::{CaError, CertificateAuthority, WorkloadCertificate};
use crate::identity::Identity;

/// After a failed renewal, try again this often (the old certificate is still valid meanwhile).
pub const RENEW_RETRY_INTERVAL: Duration = Duration::from_secs(5);

struct Slot {
    key: Arc<CertifiedKey>,
    not_before: SystemTime,
    not_after: SystemTime,
    renew_at: SystemTime,
}

/// One workload identity's certificate.
pub struct WorkloadCerts {
    identity: Identity,
    ca: Arc<dyn CertificateAuthority>,
    lifetime: Duration,
    slot: ArcSwap<Slot>,
}

impl std::fmt::Debug for WorkloadCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCerts")
            .field("identity", &self.identity.to_string())
            .finish()
    }
}

impl WorkloadCerts {
    /// Issues the first certificate for `identity`.
    pub fn issue(
        ca: Arc<dyn CertificateAuthority>,
        identity: Identity,
        lifetime: Duration,
    ) -> Result<Arc<Self>, CaError> {
        let slot = Self::mint(ca.as_ref(), &identity, lifetime)?;
        Ok(Arc::new(WorkloadCerts {
            identity,
            ca,
            lifetime,
            slot: ArcSwap::from_pointee(slot),
        }))
    }

    /// Holds `cert` (issued elsewhere) and renews it from `ca` for `lifetime` when due.
    pub fn from_certificate(
        ca: Arc<dyn CertificateAuthority>,
        cert: WorkloadCertificate,
        lifetime: Duration,
    ) -> Result<Arc<Self>, CaError> {
        let identity = cert.identity.clone();
        let slot = Self::slot(cert)?;
        Ok(Arc::new(WorkloadCerts {
            identity,
            ca,
            lifetime,
            slot: ArcSwap::from_pointee(slot),
        }))
    }

    fn mint(
        ca: &dyn CertificateAuthority,
        identity: &Identity,
        lifetime: Duration,
    ) -> Result<Slot, CaError> {
        Self::slot(ca.issue(identity, lifetime)?)
    }

    fn slot(cert: WorkloadCertificate) -> Result<Slot, CaError> {
        let identity = cert.identity.clone();
        let renew_at = cert.renew_at();
        let signing_key = crate::tls::crypto_provider()
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(cert.key))
            .map_err(|e| CaError::Mint {
                identity: identity.to_string(),
                problem: e.to_string(),
            })?;
        Ok(Slot {
            key: Arc::new(CertifiedKey::new(cert.chain, signing_key)),
            not_before: cert.not_before,
            not_after: cert.not_after,
            renew_at,
        })
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The certificate to present now, if one is valid now.
    pub fn current(&self) -> Option<Arc<CertifiedKey>> {
        let slot = self.slot.load();
        let now = SystemTime::now();
        (slot.not_before <= now && now < slot.not_after).then(|| slot.key.clone())
    }

    /// The leaf certificate now held (valid or not), for inspection.
    pub fn leaf(&self) -> Option<rustls_pki_types::CertificateDer<'static>> {
        self.slot.load().key.cert.first().cloned()
    }

    pub fn renew_at(&self) -> SystemTime {
        self.slot.load().renew_at
    }

    pub fn not_after(&self) -> SystemTime {
        self.slot.load().not_after
    }

    /// Issues a new certificate and makes it current.
    pub fn renew(&self) -> Result<(), CaError> {
        let slot = Self::mint(self.ca.as_ref(), &self.identity, self.lifetime)?;
        self.slot.store(Arc::new(slot));
        Ok(())
    }
}

/// Renews certificates at half their lifetime on a background thread; stops when dropped.
pub struct Rotation {
    /// Dropped to stop the thread: its wait for the next renewal ends at once.
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// The rotation thread looks at the clock at least this often, even when no renewal is due
/// sooner: a wall clock stepped forward (a suspended VM resumed) is noticed within this long.
const ROTATION_CHECK_MAX: Duration = Duration::from_secs(60);

impl Rotation {
    pub fn start(certs: Vec<Arc<WorkloadCerts>>) -> std::io::Result<Self> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new().name("shoal-cert-rotation".into()).spawn(move || {
            let mut retry_after: Vec<Option<SystemTime>> = vec![None; certs.len()];
            loop {
                let now = SystemTime::now();
                let mut next = now + ROTATION_CHECK_MAX;
                for (c, retry) in certs.iter().zip(retry_after.iter_mut()) {
                    let due = retry.unwrap_or_else(|| c.renew_at());
                    if now < due {
                        next = next.min(due);
                        continue;
                    }
                    match c.renew() {
                        Ok(()) => {
                            *retry = None;
                            next = next.min(c.renew_at());
                            tracing::info!(identity = %c.identity(), "workload certificate renewed");
                        }
                        Err(e) => {
                            *retry = Some(now + RENEW_RETRY_INTERVAL);
                            next = next.min(now + RENEW_RETRY_INTERVAL);
                            tracing::warn!(identity = %c.identity(), error = %e, "certificate renewal failed; will retry");
                        }
                    }
                }
                // Sleeps until the next renewal is due: an idle proxy is not woken to find none.
                let wait = next.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
                match stopped.recv_timeout(wait) {
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
        })?;
        Ok(Rotation {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Rotation {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
