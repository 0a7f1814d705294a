//! The certificates a proxy holds: one per identity it serves (a ztunnel: its workloads' service
//! accounts; a waypoint: its own), issued from the CA when the identity first appears, renewed at
//! half-life by a background thread, and the TLS configurations built on them. Shards keep their own `Rc` caches of the configurations;
//! this store's lock is taken only when a shard meets an identity for the first time.

use std::collections::HashMap;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use crate::dump::CertificateInfo;
use rustls::{ClientConfig, ServerConfig};
use shoal_hbone::ca::CertificateAuthority;
use shoal_hbone::certs::WorkloadCerts;
use shoal_hbone::tls::{self, Trust};
use shoal_hbone::Identity;

/// How soon the certificate thread tries again after it could not issue or renew one.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// The longest the certificate thread sleeps with nothing due: a wall clock stepped forward (a
/// suspended VM resumed) is noticed within this long.
const LOOK_INTERVAL_MAX: Duration = Duration::from_secs(60);

pub struct CertStore {
    ca: Arc<dyn CertificateAuthority>,
    trust: Trust,
    lifetime: Duration,
    certs: Mutex<HashMap<Identity, Arc<WorkloadCerts>>>,
}

impl CertStore {
    pub fn new(
        ca: Arc<dyn CertificateAuthority>,
        trust_domain: &str,
        lifetime: Duration,
    ) -> Result<Arc<Self>, String> {
        let trust =
            Trust::new(&ca.roots(), trust_domain).map_err(|e| format!("the CA's roots: {e}"))?;
        Ok(Arc::new(CertStore {
            ca,
            trust,
            lifetime,
            certs: Mutex::new(HashMap::new()),
        }))
    }

    /// A store on the local CA in `ca_dir` (`shoalctl ca init`).
    pub fn from_ca_dir(
        ca_dir: &std::path::Path,
        trust_domain: &str,
        lifetime: Duration,
    ) -> Result<Arc<Self>, String> {
        let ca = shoal_hbone::ca::LocalCa::load(ca_dir)
            .map_err(|e| format!("{}: {e}", ca_dir.display()))?;
        Self::new(Arc::new(ca), trust_domain, lifetime)
    }

    /// The calling shard's HBONE pool, connecting with these certificates (the pool key's source
    /// identity presents its own, and expects the key's destination identities). Call on a shard.
    pub fn hbone_pool(self: &Arc<Self>) -> shoal_hbone::pool::Pool {
        let certs = self.clone();
        shoal_hbone::pool::Pool::new(move |key: &shoal_hbone::pool::PoolKey| {
            certs
                .client_config(&key.source, key.destinations.clone())
                .map_err(rustls::Error::General)
        })
    }

    /// The certificate for `identity`, issued now if this is its first use.
    pub fn get(&self, identity: &Identity) -> Result<Arc<WorkloadCerts>, String> {
        let mut certs = self
            .certs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(c) = certs.get(identity) {
            return Ok(c.clone());
        }
        let issued = WorkloadCerts::issue(self.ca.clone(), identity.clone(), self.lifetime)
            .map_err(|e| e.to_string())?;
        certs.insert(identity.clone(), issued.clone());
        Ok(issued)
    }

    pub fn server_config(&self, identity: &Identity) -> Result<Arc<ServerConfig>, String> {
        let certs = self.get(identity)?;
        tls::server_config(certs, &self.trust)
            .map(Arc::new)
            .map_err(|e| e.to_string())
    }

    pub fn client_config(
        &self,
        identity: &Identity,
        expected: Vec<Identity>,
    ) -> Result<Arc<ClientConfig>, String> {
        let certs = self.get(identity)?;
        tls::client_config(certs, &self.trust, expected)
            .map(Arc::new)
            .map_err(|e| e.to_string())
    }

    /// When the first certificate held is due for renewal (`None`: none held).
    pub fn next_renewal_at(&self) -> Option<SystemTime> {
        let certs = self.certs.lock().unwrap_or_else(|p| p.into_inner());
        certs.values().map(|c| c.renew_at()).min()
    }

    /// Renews every certificate past its renewal time; returns how many failed (they are retried).
    pub fn renew_due(&self) -> usize {
        let due: Vec<Arc<WorkloadCerts>> = {
            let certs = self.certs.lock().unwrap_or_else(|p| p.into_inner());
            let now = SystemTime::now();
            certs
                .values()
                .filter(|c| c.renew_at() <= now)
                .cloned()
                .collect()
        };
        let mut failed = 0;
        for c in due {
            if let Err(e) = c.renew() {
                failed += 1;
                tracing::warn!(identity = %c.identity(), error = %e, "certificate renewal failed; retrying");
            } else {
                tracing::info!(identity = %c.identity(), "certificate renewed");
            }
        }
        failed
    }

    /// For `/config_dump` and `shoalctl ztunnel-config certificate`.
    pub fn infos(&self) -> Vec<CertificateInfo> {
        let certs = self.certs.lock().unwrap_or_else(|p| p.into_inner());
        let mut infos: Vec<CertificateInfo> = certs
            .values()
            .map(|c| {
                let (serial, not_before) = c
                    .leaf()
                    .and_then(|der| {
                        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
                        Some((
                            cert.raw_serial_as_string().replace(':', ""),
                            rfc3339(cert.validity().not_before.to_datetime()),
                        ))
                    })
                    .unwrap_or_default();
                let not_after = rfc3339(time::OffsetDateTime::from(c.not_after()));
                CertificateInfo {
                    identity: c.identity().to_string(),
                    serial,
                    not_before,
                    not_after,
                    state: if c.current().is_some() {
                        "Available".into()
                    } else {
                        "Expired".into()
                    },
                }
            })
            .collect();
        infos.sort_by(|a, b| a.identity.cmp(&b.identity));
        infos
    }

    /// Whether a certificate for `identity` (a SPIFFE id) is held.
    pub fn has(&self, identity: &str) -> bool {
        let certs = self.certs.lock().unwrap_or_else(|p| p.into_inner());
        certs.keys().any(|id| id.to_string() == identity)
    }

    pub fn len(&self) -> usize {
        self.certs.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `2026-11-22T01:36:36Z`, as certificates' validity is usually shown.
fn rfc3339(t: time::OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// The certificate thread: issues certificates for identities that appear (`wanted`, read from
/// the snapshot in force) and renews those due, off the shards (minting a key and signing take
/// milliseconds that no reactor should spend); stops when dropped. Between looks it sleeps until
/// the next renewal is due, or until woken (`Renewal::waker`, rung when a new snapshot is
/// published, which may bring new identities).
pub struct Renewal {
    signals: mpsc::Sender<Look>,
    thread: Option<JoinHandle<()>>,
}

enum Look {
    Now,
    Stop,
}

/// Wakes the certificate thread to look for new identities at once.
#[derive(Clone)]
pub struct RenewalWaker(mpsc::Sender<Look>);

impl RenewalWaker {
    pub fn wake(&self) {
        let _ = self.0.send(Look::Now);
    }
}

impl Renewal {
    pub fn start(
        store: Arc<CertStore>,
        wanted: impl Fn() -> Vec<Identity> + Send + 'static,
    ) -> std::io::Result<Self> {
        let (signals, looks) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("shoal-cert-rotation".into())
            .spawn(move || loop {
                let mut failed = 0;
                for identity in wanted() {
                    if let Err(e) = store.get(&identity) {
                        failed += 1;
                        tracing::warn!(%identity, error = %e, "cannot issue a certificate; retrying");
                    }
                }
                failed += store.renew_due();
                let wait = match store.next_renewal_at() {
                    _ if failed > 0 => RETRY_INTERVAL,
                    None => LOOK_INTERVAL_MAX,
                    // Due already (renewed meanwhile elsewhere, or a clock that moved): soon.
                    Some(due) => due
                        .duration_since(SystemTime::now())
                        .unwrap_or(RETRY_INTERVAL)
                        .min(LOOK_INTERVAL_MAX),
                };
                match looks.recv_timeout(wait) {
                    Ok(Look::Now) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Ok(Look::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            })?;
        Ok(Renewal {
            signals,
            thread: Some(thread),
        })
    }

    pub fn waker(&self) -> RenewalWaker {
        RenewalWaker(self.signals.clone())
    }
}

impl Drop for Renewal {
    fn drop(&mut self) {
        let _ = self.signals.send(Look::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn wait_until(what: &str, cond: impl Fn() -> bool) -> Duration {
        let started = Instant::now();
        while !cond() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{what} within 10 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        started.elapsed()
    }

    #[test]
    fn the_certificate_thread_sleeps_until_woken_or_due() {
        let ca = shoal_hbone::ca::LocalCa::generate("cluster.local").expect("a CA");
        // Valid from a minute before issue (clock skew) to 63 s after: renewal is due half-way,
        // 1.5 s after issue, and the thread must wake for it by itself.
        let store =
            CertStore::new(Arc::new(ca), "cluster.local", Duration::from_secs(63)).expect("store");
        let first: Identity = "spiffe://cluster.local/ns/app/sa/first".parse().unwrap();
        let second: Identity = "spiffe://cluster.local/ns/app/sa/second".parse().unwrap();
        let wanted = Arc::new(Mutex::new(vec![first.clone()]));
        let renewal = Renewal::start(store.clone(), {
            let wanted = wanted.clone();
            move || wanted.lock().unwrap().clone()
        })
        .expect("thread");
        let has = |id: &Identity| store.has(&id.to_string());
        wait_until("the first identity's certificate", || has(&first));
        let renew_at = store.next_renewal_at().expect("one held");

        // A new identity is not looked for until the thread is woken (it sleeps until the
        // renewal, over a second away)…
        wanted.lock().unwrap().push(second.clone());
        std::thread::sleep(Duration::from_millis(200));
        assert!(!has(&second), "looked for without being woken");
        // …and is issued at once when it is.
        renewal.waker().wake();
        let took = wait_until("the second identity's certificate", || has(&second));
        assert!(
            took < Duration::from_millis(500),
            "issued {took:?} after the wake: on the renewal's timer, not the wake"
        );
        assert!(
            renew_at > SystemTime::now(),
            "woken before the renewal was due"
        );

        // The renewal comes when due, without a wake.
        wait_until("the first renewal", || {
            store.next_renewal_at().is_some_and(|at| at > renew_at)
        });
        drop(renewal);
    }
}
