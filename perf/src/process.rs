//! Child processes the benchmarks and the demo start: this same binary in a server role, found by
//! the line it prints when ready, measured from /proc, and always stopped — killed on drop if it
//! was not stopped on purpose — so no run leaves a process behind.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
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

/// How a benchmark's shoal proxies log: the filter they run with (as `SHOAL_LOG`) and the folder
/// their standard error goes to, a file each. Set, not inherited: a benchmark run with
/// `SHOAL_LOG=warn` to quiet its own output would silently turn the proxies' access logs off with
/// it, and one run without would have every proxy's access log on the terminal.
#[derive(Clone, Debug)]
pub struct ProxyLog {
    pub filter: String,
    pub dir: PathBuf,
}

impl ProxyLog {
    /// Whether the proxies write their access logs: lines at `info` with target `access`, so
    /// `info` and `warn,access=info` turn them on and `info,access=off` does not. An invalid
    /// filter is the proxies' default, `info`, as they read it.
    pub fn access_log_on(&self) -> bool {
        use tracing_subscriber::layer::SubscriberExt as _;
        let filter = tracing_subscriber::EnvFilter::try_new(&self.filter)
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let subscriber = tracing_subscriber::registry().with(filter);
        tracing::subscriber::with_default(
            subscriber,
            || tracing::enabled!(target: "access", tracing::Level::INFO),
        )
    }

    /// Access-log lines the proxies have written to their files so far (a proxy's lines reach
    /// its file within its log's flush interval).
    pub fn access_lines(&self) -> u64 {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        dir.filter_map(Result::ok)
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .map(|text| text.lines().filter(|l| l.contains(" access: ")).count() as u64)
            .sum()
    }
}

/// The `--proxy-log` flag's help, shared by the benchmarks that start shoal's proxies.
pub const PROXY_LOG_HELP: &str = "The log filter shoal's proxies run with (their SHOAL_LOG). The \
    default, warn, leaves their access logs off, as nginx's and HAProxy's are in `bench compare`; \
    info turns them on (a line per connection or request, written to a file)";

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

    /// `shoal-bench backend` on `listen`, one shard, not pinned: the app every benchmark loads.
    pub fn backend(listen: &str) -> std::io::Result<Self> {
        Self::start(&["backend", "--listen", listen, "--shards", "1", "--no-pin"].map(String::from))
    }

    /// Starts `exe` with `args`, its environment and standard error this process's own.
    pub fn start_exe(exe: &std::path::Path, args: &[String]) -> std::io::Result<Self> {
        let mut command = Command::new(exe);
        command.args(args);
        Self::start_command(command, exe)
    }

    /// Starts one of shoal's proxies, logging as `log` says into `log.dir/<name>.log`.
    pub fn start_proxy(
        exe: &std::path::Path,
        args: &[String],
        log: &ProxyLog,
        name: &str,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(&log.dir)?;
        let file = std::fs::File::create(log.dir.join(format!("{name}.log")))?;
        let mut command = Command::new(exe);
        command
            .args(args)
            .env("SHOAL_LOG", &log.filter)
            .stderr(file);
        Self::start_command(command, exe)
    }

    fn start_command(mut command: Command, exe: &std::path::Path) -> std::io::Result<Self> {
        command.stdin(Stdio::null()).stdout(Stdio::piped());
        die_with_parent(&mut command);
        let mut child = command.spawn()?;
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

    /// CPU seconds (user + system) the process and its children have used so far, from /proc.
    pub fn cpu_seconds(&self) -> f64 {
        tree_cpu_seconds(self.pid())
    }

    /// Resident set size in bytes of the process and its children, from /proc.
    pub fn rss_bytes(&self) -> u64 {
        tree_rss_bytes(self.pid())
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

/// Asks the kernel to send SIGTERM to the child when this process dies, however it dies (even
/// SIGKILL), so that a benchmark killed halfway leaves no server behind: ours drain and exit on
/// SIGTERM, and so do nginx's master (taking its workers along) and HAProxy.
pub fn die_with_parent(command: &mut Command) {
    // SAFETY: getpid before the fork; prctl and getppid are async-signal-safe, as pre_exec requires.
    let parent = unsafe { libc::getpid() };
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl.
            if libc::getppid() != parent {
                return Err(std::io::Error::other("the parent exited while starting"));
            }
            Ok(())
        });
    }
}

/// A program that is not ours (nginx, HAProxy, a proxy the user names), started with its output
/// in a log file and considered ready once every address it should serve accepts connections.
/// Dropping it kills it and every process it started.
pub struct ExternalProcess {
    child: Option<Child>,
    pub what: String,
    pub log: PathBuf,
}

impl ExternalProcess {
    pub fn spawn(
        mut command: Command,
        what: &str,
        log: &Path,
        listens: &[SocketAddr],
    ) -> std::io::Result<Self> {
        let out = std::fs::File::create(log)?;
        command
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        die_with_parent(&mut command);
        let child = command
            .spawn()
            .map_err(|e| std::io::Error::other(format!("{what}: {e}")))?;
        let mut process = ExternalProcess {
            child: Some(child),
            what: what.to_string(),
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_millis(START_TIMEOUT_MS);
        for addr in listens {
            while std::net::TcpStream::connect_timeout(addr, Duration::from_millis(100)).is_err() {
                if let Some(Ok(Some(status))) = process.child.as_mut().map(|c| c.try_wait()) {
                    return Err(std::io::Error::other(format!(
                        "{what} exited ({status}) before listening on {addr}: {}",
                        process.log_tail()
                    )));
                }
                if Instant::now() > deadline {
                    return Err(std::io::Error::other(format!(
                        "{what} is not listening on {addr} after {} s: {}",
                        START_TIMEOUT_MS / 1000,
                        process.log_tail()
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(process)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// The last lines the program wrote, for an error message.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(5).collect();
        let tail: Vec<&str> = lines.into_iter().rev().collect();
        if tail.is_empty() {
            "(it wrote nothing)".to_string()
        } else {
            tail.join(" / ")
        }
    }
}

impl Drop for ExternalProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Asked first, so that a master process stops its workers and reaps them; killed,
            // with everything it started, if it has not gone in time.
            let family = descendants(c.id());
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            if wait_timeout(&mut c, Duration::from_millis(STOP_TIMEOUT_MS)).is_err() {
                for pid in family {
                    // SAFETY: kill(2) on a process our child started.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                }
            }
        }
    }
}

/// How long a program that is not ours gets to stop after SIGTERM before it is killed.
const STOP_TIMEOUT_MS: u64 = 3_000;

/// Every process `pid` started, and what they started, from the parent links in /proc.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.filter_map(Result::ok) {
            let Some(p) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(ppid) = stat_fields(p).and_then(|f| f.get(1)?.parse::<u32>().ok()) {
                parents.push((p, ppid));
            }
        }
    }
    let mut found = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for &(p, pp) in &parents {
            if pp == parent && !found.contains(&p) {
                found.push(p);
                frontier.push(p);
            }
        }
    }
    found
}

/// CPU seconds of `pid` and every process under it.
pub fn tree_cpu_seconds(pid: u32) -> f64 {
    tree_cpu_times(pid).total_s()
}

/// CPU seconds of `pid` and every process under it, in user space and in the kernel.
pub fn tree_cpu_times(pid: u32) -> CpuTimes {
    std::iter::once(pid)
        .chain(descendants(pid))
        .filter_map(cpu_times)
        .fold(CpuTimes::default(), |sum, t| sum + t)
}

/// Resident bytes of `pid` and every process under it.
pub fn tree_rss_bytes(pid: u32) -> u64 {
    std::iter::once(pid)
        .chain(descendants(pid))
        .filter_map(rss_bytes)
        .sum()
}

/// Context switches so far (voluntary and not) of every thread of `pid` and of every process under
/// it: how often they were woken or preempted.
pub fn tree_context_switches(pid: u32) -> u64 {
    std::iter::once(pid)
        .chain(descendants(pid))
        .map(context_switches)
        .sum()
}

fn context_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0; // gone
    };
    let mut total = 0;
    for task in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue; // a thread that ended meanwhile
        };
        total += status
            .lines()
            .filter_map(|l| {
                l.strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
            })
            .filter_map(|n| n.trim().parse::<u64>().ok())
            .sum::<u64>();
    }
    total
}

/// The highest resident bytes `pid` and every process under it have had (VmHWM).
pub fn tree_peak_rss_bytes(pid: u32) -> u64 {
    std::iter::once(pid)
        .chain(descendants(pid))
        .filter_map(|p| {
            let status = std::fs::read_to_string(format!("/proc/{p}/status")).ok()?;
            let kib = shoal_runtime::memory::status_field_kib(&status, "VmHWM")?;
            Some(kib * 1024)
        })
        .sum()
}

fn rss_bytes(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages = statm.split_whitespace().nth(1)?.parse::<u64>().ok()?;
    Some(pages * page_size())
}

/// The fields of /proc/<pid>/stat after the command name: state, ppid, ...
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    stat_fields_at(&format!("/proc/{pid}/stat"))
}

/// The same from any file of that format (a thread's `/proc/<pid>/task/<tid>/stat` among them).
fn stat_fields_at(path: &str) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name may hold spaces; fields after its closing parenthesis are fixed.
    let after = stat.get(stat.rfind(')')? + 2..)?;
    Some(after.split_whitespace().map(str::to_string).collect())
}

pub fn cpu_seconds(pid: u32) -> Option<f64> {
    cpu_times(pid).map(CpuTimes::total_s)
}

/// CPU seconds a process spent in user space and in the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CpuTimes {
    pub user_s: f64,
    /// System time: system calls, and the softirq work (loopback delivery to the receiving socket
    /// among it) that runs in the process's context. Sampled at the scheduler's tick, as `utime` is.
    pub kernel_s: f64,
}

impl CpuTimes {
    pub fn total_s(self) -> f64 {
        self.user_s + self.kernel_s
    }
}

impl std::ops::Add for CpuTimes {
    type Output = CpuTimes;
    fn add(self, other: CpuTimes) -> CpuTimes {
        CpuTimes {
            user_s: self.user_s + other.user_s,
            kernel_s: self.kernel_s + other.kernel_s,
        }
    }
}

/// What was spent between two readings: the later minus the earlier.
impl std::ops::Sub for CpuTimes {
    type Output = CpuTimes;
    fn sub(self, earlier: CpuTimes) -> CpuTimes {
        CpuTimes {
            user_s: self.user_s - earlier.user_s,
            kernel_s: self.kernel_s - earlier.kernel_s,
        }
    }
}

pub fn cpu_times(pid: u32) -> Option<CpuTimes> {
    cpu_times_at(&format!("/proc/{pid}/stat"))
}

fn cpu_times_at(stat_path: &str) -> Option<CpuTimes> {
    let fields = stat_fields_at(stat_path)?;
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some(CpuTimes {
        user_s: utime / clock_ticks(),
        kernel_s: stime / clock_ticks(),
    })
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

#[cfg(test)]
mod tests {
    use super::{cpu_times_at, CpuTimes, ProxyLog};

    /// Runs `work` until this thread has spent 200 ms of CPU on it, and returns how the
    /// thread's user and system time grew meanwhile (its own `stat`: the tests that run beside it
    /// in this process do not count).
    fn grown_by(mut work: impl FnMut()) -> CpuTimes {
        let before = cpu_times_at("/proc/thread-self/stat").expect("own stat");
        let start = crate::hbone_node::thread_cpu_seconds();
        while crate::hbone_node::thread_cpu_seconds() - start < 0.2 {
            work();
        }
        cpu_times_at("/proc/thread-self/stat").expect("own stat") - before
    }

    #[test]
    fn user_and_kernel_time_are_told_apart() {
        // Arithmetic alone: user time.
        let mut x = 1u64;
        let compute = grown_by(|| {
            for i in 0..10_000u64 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
            }
        });
        assert!(compute.user_s >= 0.1, "{compute:?}");
        // Path lookups: the kernel's time.
        let syscalls = grown_by(|| {
            let _ = std::hint::black_box(std::fs::metadata("/proc/self/stat"));
        });
        assert!(syscalls.kernel_s >= 0.05, "{syscalls:?}");
        assert!(
            syscalls.kernel_s > compute.kernel_s,
            "{syscalls:?} {compute:?}"
        );
    }

    #[test]
    fn which_filters_turn_the_access_log_on() {
        for (filter, on) in [
            ("info", true),
            ("debug", true),
            ("warn", false),
            ("error", false),
            ("off", false),
            ("warn,access=info", true),
            ("info,access=off", false),
            ("shoal_ztunnel=debug", false),
            // An invalid filter is the proxies' default, info.
            ("=[", true),
        ] {
            let log = ProxyLog {
                filter: filter.into(),
                dir: "/nonexistent".into(),
            };
            assert_eq!(log.access_log_on(), on, "{filter}");
        }
    }
}
