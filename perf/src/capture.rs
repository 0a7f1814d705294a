//! Traffic capture for the benchmarks, as istio-cni installs it: a pod's connections to the
//! mesh's service addresses are rewritten by iptables (DNAT) to its proxy's capture listener,
//! which reads where they were going with `SO_ORIGINAL_DST`. The app then dials the service as it
//! would in a cluster, with no SOCKS5 handshake (two round trips per connection). Needs root, `ip`
//! and `iptables`.
//!
//! The rules are host state that must not outlive the benchmark, even one killed with SIGKILL: a
//! guard process (`shoal-bench capture-guard`) installs them and removes them once its standard
//! input closes, which happens when the benchmark drops its `Capture` or dies.
//!
//! NAT needs connection tracking, and a tracked connection's entry outlives it by two minutes
//! (TIME_WAIT): the new-connection phases of a benchmark would fill the table (262,144 entries here)
//! and drop packets. So every other connection of the benchmark's address block is left untracked
//! (raw table, `CT --notrack`), and only the captured ones pay for it.

use std::io::{self, BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, ChildStdin, Command, Stdio};

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

/// Capture in force for as long as this is held: the guard process and the pipe it watches.
pub struct Capture {
    guard: Child,
    /// Closed on drop: the guard's signal to remove the rules.
    watched: Option<ChildStdin>,
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
        let mut command = Command::new(std::env::current_exe()?);
        command
            .args(["capture-guard", "--services", services, "--pods", pods])
            .args(["--owner", &std::process::id().to_string()]);
        for (pod, listener) in redirects {
            command.arg("--redirect").arg(format!("{pod}={listener}"));
        }
        let mut guard = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let watched = guard.stdin.take();
        let mut capture = Capture { guard, watched };
        let mut first = String::new();
        if let Some(out) = capture.guard.stdout.take() {
            BufReader::new(out).read_line(&mut first)?;
        }
        match first.trim_end() {
            "READY" => Ok(capture),
            other => Err(io::Error::other(
                other
                    .strip_prefix("ERROR ")
                    .unwrap_or("the capture guard ended without a word")
                    .to_string(),
            )),
        }
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
        drop(self.watched.take());
        let _ = self.guard.wait();
    }
}

/// How long the rules stay after the benchmark lets go of them.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// `shoal-bench capture-guard`: what a `Capture` runs.
#[derive(Clone, Debug, clap::Args)]
pub struct GuardArgs {
    /// The service range to capture (CIDR).
    #[arg(long)]
    pub services: String,
    /// The benchmark's pod range, whose other connections go untracked (CIDR).
    #[arg(long)]
    pub pods: String,
    /// POD_IP=LISTENER: that pod's connections to the services go to LISTENER.
    #[arg(long = "redirect")]
    pub redirects: Vec<String>,
    /// The benchmark's process id, which names the chains.
    #[arg(long)]
    pub owner: u32,
}

/// Installs the rules, says `READY` (or `ERROR why`) on standard output, and removes them when
/// standard input closes.
pub fn guard(args: &GuardArgs) -> io::Result<()> {
    // A Ctrl-C reaches the whole process group: outlive the benchmark to clean up after it.
    // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
    let rules = match Rules::install(args) {
        Ok(rules) => rules,
        Err(e) => {
            println!("ERROR {e}");
            return Ok(());
        }
    };
    println!("READY");
    let _ = io::copy(&mut io::stdin().lock(), &mut io::sink());
    // A benchmark that died closed this pipe among its first descriptors, before its sockets:
    // their last packets to the services still need the route.
    std::thread::sleep(CLOSE_GRACE);
    drop(rules);
    Ok(())
}

/// The installed rules: chains named after the benchmark, jumped to from nat OUTPUT and raw
/// OUTPUT/PREROUTING, and the route that sends the service range to loopback.
struct Rules {
    chain: String,
    /// The service range and the metric its route was added with, when this guard added it (it
    /// removes it on drop).
    route: Option<(String, String)>,
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

fn iptables(table: &str, rule: &[&str]) -> io::Result<()> {
    let mut args = vec!["-w", "-t", table];
    args.extend_from_slice(rule);
    run("iptables", &args)
}

impl Rules {
    fn install(args: &GuardArgs) -> io::Result<Rules> {
        let mut redirects = Vec::new();
        for r in &args.redirects {
            let parsed = r.split_once('=').and_then(|(pod, listener)| {
                Some((
                    pod.parse::<IpAddr>().ok()?,
                    listener.parse::<SocketAddr>().ok()?,
                ))
            });
            redirects.push(parsed.ok_or_else(|| {
                io::Error::other(format!("--redirect {r}: expected POD_IP=IP:PORT"))
            })?);
        }
        let services = args.services.as_str();
        // Loopback sources may only reach loopback routes: the service range must route there.
        // Each guard adds its own route, told apart by a metric named after its owner, and removes
        // only that one: a benchmark run again while the last one's guard is still cleaning up
        // keeps its route (the same range's).
        let metric = args.owner.to_string();
        let route = match run("ip", &route_args("add", services, &metric)) {
            Ok(()) => Some((services.to_string(), metric)),
            Err(e) if e.to_string().contains("File exists") => None,
            Err(e) => return Err(e),
        };
        // From here on, an early return drops `rules`, which undoes what was installed.
        let rules = Rules {
            chain: format!("SHOAL-BENCH-{}", args.owner),
            route,
        };
        let chain = rules.chain.as_str();
        for table in ["nat", "raw"] {
            iptables(table, &["-N", chain])?;
            iptables(table, &["-I", "OUTPUT", "-j", chain])?;
        }
        // On loopback a packet meets OUTPUT, then PREROUTING as it comes back in.
        iptables("raw", &["-I", "PREROUTING", "-j", chain])?;
        // Tracked: the captured connections, both ways, before and after the rewrite.
        iptables("raw", &["-A", chain, "-d", services, "-j", "RETURN"])?;
        iptables("raw", &["-A", chain, "-s", services, "-j", "RETURN"])?;
        let listeners: std::collections::BTreeSet<SocketAddr> =
            redirects.iter().map(|(_, listener)| *listener).collect();
        for listener in listeners {
            let (ip, port) = (listener.ip().to_string(), listener.port().to_string());
            for (address, port_match) in [("-s", "--sport"), ("-d", "--dport")] {
                let rule = [
                    "-A", chain, "-p", "tcp", address, &ip, port_match, &port, "-j", "RETURN",
                ];
                iptables("raw", &rule)?;
            }
        }
        for address in ["-s", "-d"] {
            iptables(
                "raw",
                &["-A", chain, address, &args.pods, "-j", "CT", "--notrack"],
            )?;
        }
        for (pod, listener) in &redirects {
            let (pod, to) = (pod.to_string(), listener.to_string());
            let rule = [
                "-A",
                chain,
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
        Ok(rules)
    }
}

/// `ip route ADD_OR_DEL SERVICES dev lo metric METRIC`.
fn route_args<'a>(verb: &'a str, services: &'a str, metric: &'a str) -> [&'a str; 7] {
    ["route", verb, services, "dev", "lo", "metric", metric]
}

impl Drop for Rules {
    fn drop(&mut self) {
        let chain = self.chain.as_str();
        for (table, hook) in [("nat", "OUTPUT"), ("raw", "OUTPUT"), ("raw", "PREROUTING")] {
            let _ = iptables(table, &["-D", hook, "-j", chain]);
        }
        for table in ["nat", "raw"] {
            let _ = iptables(table, &["-F", chain]);
            let _ = iptables(table, &["-X", chain]);
        }
        if let Some((services, metric)) = self.route.take() {
            let _ = run("ip", &route_args("del", &services, &metric));
        }
    }
}
