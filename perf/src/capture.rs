//! Traffic capture for the benchmarks, as istio-cni installs it: a pod's connections to the
//! mesh's service addresses are rewritten by iptables (DNAT) to its proxy's capture listener,
//! which reads where they were going with `SO_ORIGINAL_DST`. The app then dials the service as it
//! would in a cluster, with no SOCKS5 handshake (two round trips per connection). Needs root, `ip`
//! and `iptables`; what is installed is removed on drop.
//!
//! NAT needs connection tracking, and a tracked connection's entry outlives it by two minutes
//! (TIME_WAIT): the new-connection phases of a benchmark would fill the table (262,144 entries here)
//! and drop packets. So every other connection of the benchmark's address block is left untracked
//! (raw table, `CT --notrack`), and only the captured ones pay for it.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;

/// How a benchmark's client reaches shoal's outbound proxies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CaptureChoice {
    /// iptables capture when this process may install it (root, `ip`, `iptables`), else SOCKS5.
    Auto,
    /// iptables capture, or fail.
    Iptables,
    /// SOCKS5 (no root needed).
    Socks5,
}

/// Installed capture rules: a chain of this process's own, jumped to from nat OUTPUT, and the
/// route that sends the service range to loopback.
pub struct Capture {
    chain: String,
    /// Removed on drop when this process added it.
    route: Option<String>,
}

fn run(program: &str, args: &[&str]) -> io::Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("{program}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

impl Capture {
    /// Captures TCP from each `(pod address, capture listener)` pair to `services` (a CIDR such as
    /// `10.42.0.0/16`): the pod's connections there go to its listener instead. Other connections
    /// within `pods` (a CIDR) go untracked.
    pub fn install(
        services: &str,
        pods: &str,
        redirects: &[(IpAddr, SocketAddr)],
    ) -> io::Result<Capture> {
        // Loopback sources may only reach loopback routes: the service range must route there.
        let route = match run("ip", &["route", "add", services, "dev", "lo"]) {
            Ok(()) => Some(services.to_string()),
            Err(e) if e.to_string().contains("File exists") => None,
            Err(e) => return Err(e),
        };
        // From here on, an early return drops `capture`, which undoes what was installed.
        let capture = Capture {
            chain: format!("SHOAL-BENCH-{}", std::process::id()),
            route,
        };
        let chain = capture.chain.clone();
        let iptables = |table: &str, rule: &[&str]| {
            let mut args = vec!["-w", "-t", table];
            args.extend_from_slice(rule);
            run("iptables", &args)
        };
        for table in ["nat", "raw"] {
            iptables(table, &["-N", &chain])?;
            iptables(table, &["-I", "OUTPUT", "-j", &chain])?;
        }
        // On loopback a packet meets OUTPUT, then PREROUTING as it comes back in.
        iptables("raw", &["-I", "PREROUTING", "-j", &chain])?;
        // Tracked: the captured connections, both ways, before and after the rewrite.
        iptables("raw", &["-A", &chain, "-d", services, "-j", "RETURN"])?;
        iptables("raw", &["-A", &chain, "-s", services, "-j", "RETURN"])?;
        for (_, listener) in redirects {
            let (ip, port) = (listener.ip().to_string(), listener.port().to_string());
            let tcp = ["-p", "tcp"];
            iptables(
                "raw",
                &[
                    &["-A", &chain][..],
                    &tcp,
                    &["-s", &ip, "--sport", &port, "-j", "RETURN"],
                ]
                .concat(),
            )?;
            iptables(
                "raw",
                &[
                    &["-A", &chain][..],
                    &tcp,
                    &["-d", &ip, "--dport", &port, "-j", "RETURN"],
                ]
                .concat(),
            )?;
        }
        iptables("raw", &["-A", &chain, "-s", pods, "-j", "CT", "--notrack"])?;
        iptables("raw", &["-A", &chain, "-d", pods, "-j", "CT", "--notrack"])?;
        for (pod, listener) in redirects {
            let (pod, to) = (pod.to_string(), listener.to_string());
            let rule = [
                "-A",
                &chain,
                "-p",
                "tcp",
                "-s",
                &pod,
                "-d",
                services,
                "-j",
                "DNAT",
                "--to-destination",
                &to,
            ];
            iptables("nat", &rule)?;
        }
        Ok(capture)
    }

    /// As `install` when `choice` allows it; `None` means SOCKS5 (with the reason for `Auto`).
    pub fn choose(
        choice: CaptureChoice,
        services: &str,
        pods: &str,
        redirects: &[(IpAddr, SocketAddr)],
    ) -> io::Result<(Option<Capture>, Option<String>)> {
        match choice {
            CaptureChoice::Socks5 => Ok((None, None)),
            CaptureChoice::Iptables => {
                Ok((Some(Capture::install(services, pods, redirects)?), None))
            }
            CaptureChoice::Auto => match Capture::install(services, pods, redirects) {
                Ok(c) => Ok((Some(c), None)),
                Err(e) => Ok((None, Some(e.to_string()))),
            },
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let chain = self.chain.as_str();
        for (table, hook) in [("nat", "OUTPUT"), ("raw", "OUTPUT"), ("raw", "PREROUTING")] {
            let _ = run("iptables", &["-w", "-t", table, "-D", hook, "-j", chain]);
        }
        for table in ["nat", "raw"] {
            let _ = run("iptables", &["-w", "-t", table, "-F", chain]);
            let _ = run("iptables", &["-w", "-t", table, "-X", chain]);
        }
        if let Some(route) = self.route.take() {
            let _ = run("ip", &["route", "del", &route, "dev", "lo"]);
        }
    }
}
