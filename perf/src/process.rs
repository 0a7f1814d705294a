//! Child processes the benchmarks and the demo start: this same binary in a server role, found by
//! the line it prints when ready, measured from /proc, and always stopped — killed on drop if it
//! was not stopped on purpose — so no run leaves a process behind.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What a server child prints on stdout once it serves:
/// `READY listen=<addr> admin=<addr|-> driver=<driver[,driver]>`.
pub const READY_PREFIX: &str = "READY ";

/// Prints the ready line a parent waits for: the first listener, the admin address and the
/// drivers the shards run.
pub fn announce_ready(runtime: &shoal_runtime::Runtime, admin: Option<SocketAddr>) {
    let mut drivers: Vec<String> = runtime
        .shards()
        .iter()
        .map(|s| s.driver.to_string())
        .collect();
    drivers.dedup();
    println!(
        "{READY_PREFIX}listen={} admin={} driver={} shards={}",
        runtime.shards()[0].listeners[0],
        admin.map_or("-".to_string(), |a| a.to_string()),
        drivers.join(","),
        runtime.shards().len()
    );
}

/// How long a child may take to start before the run is abandoned.
pub const START_TIMEOUT_MS: u64 = 20_000;

pub struct ServerProcess {
    child: Option<Child>,
    pub listen: SocketAddr,
    pub admin: Option<SocketAddr>,
    /// A second listener a server reported (`outbound=`: a sidecar's, for its app).
    pub outbound: Option<SocketAddr>,
    /// The driver(s) the server's shards run, as it reported them.
    pub driver: String,
}

impl ServerProcess {
    /// Starts this binary with `args` and waits for its ready line.
    pub fn start(args: &[String]) -> std::io::Result<Self> {
        let exe = std::env::current_exe()?;
        Self::start_exe(&exe, args)
    }

    pub fn start_exe(exe: &std::path::Path, args: &[String]) -> std::io::Result<Self> {
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("no stdout"))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix(READY_PREFIX) {
                    let _ = tx.send(rest.to_string());
                }
            }
        });
        let mut process = ServerProcess {
            child: Some(child),
            listen: "0.0.0.0:0".parse().map_err(std::io::Error::other)?,
            admin: None,
            outbound: None,
            driver: String::new(),
        };
        let line = rx
            .recv_timeout(Duration::from_millis(START_TIMEOUT_MS))
            .map_err(|_| {
                std::io::Error::other(format!("{} did not become ready", exe.display()))
            })?;
        for field in line.split_whitespace() {
            match field.split_once('=') {
                Some(("listen", a)) => process.listen = a.parse().map_err(std::io::Error::other)?,
                Some(("driver", d)) => process.driver = d.to_string(),
                Some(("outbound", a)) => {
                    process.outbound = Some(a.parse().map_err(std::io::Error::other)?)
                }
                Some(("admin", a)) if a != "-" => {
                    process.admin = Some(a.parse().map_err(std::io::Error::other)?)
                }
                _ => {}
            }
        }
        Ok(process)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// CPU seconds (user + system) the process has used so far, from /proc/<pid>/stat.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.pid()).unwrap_or(0.0)
    }

    /// Resident set size in bytes, from /proc/<pid>/statm.
    pub fn rss_bytes(&self) -> u64 {
        let page = page_size();
        std::fs::read_to_string(format!("/proc/{}/statm", self.pid()))
            .ok()
            .and_then(|s| {
                s.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .map(|pages| pages * page)
            .unwrap_or(0)
    }

    pub fn signal(&self, signal: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as libc::pid_t, signal) };
        }
    }

    /// Sends SIGTERM and waits up to `timeout` for the child to exit.
    pub fn terminate(mut self, timeout: Duration) -> std::io::Result<ExitStatus> {
        self.signal(libc::SIGTERM);
        let mut child = self
            .child
            .take()
            .ok_or_else(|| std::io::Error::other("already stopped"))?;
        wait_timeout(&mut child, timeout)
    }

    /// Waits for the child to exit on its own.
    pub fn wait(mut self, timeout: Duration) -> std::io::Result<ExitStatus> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| std::io::Error::other("already stopped"))?;
        wait_timeout(&mut child, timeout)
    }
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> std::io::Result<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::other(
                "the process did not exit in time; killed",
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields after its closing parenthesis are fixed.
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}
