//! The machine and the code a result was measured on, kept with every result.

use std::process::Command;

#[derive(Clone, Debug, serde::Serialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub io_uring_disabled: Option<String>,
    pub rustc: String,
    pub commit: String,
    pub dirty: bool,
    /// The crypto library under shoal's TLS in this build: ring, or aws-lc-rs (feature `aws-lc`).
    pub tls_crypto: String,
}

impl Machine {
    pub fn describe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .and_then(|r| r.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let memory_gib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| {
                        v.split_whitespace()
                            .next()
                            .and_then(|kb| kb.parse::<f64>().ok())
                    })
            })
            .map(|kb| kb / 1024.0 / 1024.0)
            .unwrap_or(0.0);
        Machine {
            cpu_model,
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            memory_gib: (memory_gib * 10.0).round() / 10.0,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            io_uring_disabled: std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
                .ok()
                .map(|s| s.trim().to_string()),
            rustc: run("rustc", &["--version"]).unwrap_or_else(|| "unknown".into()),
            commit: run("git", &["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into()),
            dirty: code_changed_in(std::path::Path::new(".")),
            tls_crypto: shoal_hbone::tls::CRYPTO_LIBRARY.to_string(),
        }
    }

    pub fn short_commit(&self) -> String {
        self.commit.chars().take(8).collect()
    }

    pub fn markdown(&self) -> String {
        format!(
            "- CPU: {} × {} cores, {} GiB memory\n- kernel: {} (io_uring_disabled = {})\n- {}\n- commit: {}{}\n- shoal's TLS crypto: {}\n",
            self.cpu_model,
            self.cores,
            self.memory_gib,
            self.kernel,
            self.io_uring_disabled.as_deref().unwrap_or("n/a"),
            self.rustc,
            self.commit,
            if self.dirty { " (with uncommitted changes)" } else { "" },
            self.tls_crypto,
        )
    }
}

/// Whether the checkout holding `dir` has uncommitted changes to tracked files outside
/// `bench-results/`: results written earlier in the same sitting rewrite that folder's index, which
/// is no change to the code being measured.
fn code_changed_in(dir: &std::path::Path) -> bool {
    let dir = dir.to_string_lossy();
    run(
        "git",
        &[
            "-C",
            &dir,
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            ":(top)",
            ":(top,exclude)bench-results",
        ],
    )
    .is_some_and(|s| !s.is_empty())
}

fn run(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The machine's CPU time since boot, in clock ticks, from /proc/stat: what the host took from
/// this VM (steal), what no thread used (idle), and all of it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CpuTicks {
    pub steal: u64,
    /// Idle and iowait: a thread asleep in `io_uring_enter` with I/O in flight is counted as
    /// iowait, though its core runs nothing.
    pub idle: u64,
    pub total: u64,
}

impl CpuTicks {
    pub fn now() -> Self {
        Self::parse(&std::fs::read_to_string("/proc/stat").unwrap_or_default())
    }

    /// From the text of /proc/stat: its first line, every core's together.
    fn parse(stat: &str) -> Self {
        let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) else {
            return Self::default();
        };
        let fields: Vec<u64> = cpu
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal guest guest_nice; guests are already in
        // user.
        let field = |i: usize| fields.get(i).copied().unwrap_or(0);
        Self {
            steal: field(7),
            idle: field(3) + field(4),
            total: fields.iter().take(8).sum(),
        }
    }

    /// Steal between this reading and a `later` one, in percent of all CPU time between them.
    pub fn steal_percent_until(self, later: Self) -> f64 {
        self.share_percent_until(later, |t| t.steal)
    }

    /// Idle time between this reading and a `later` one, in percent of all CPU time between them.
    pub fn idle_percent_until(self, later: Self) -> f64 {
        self.share_percent_until(later, |t| t.idle)
    }

    fn share_percent_until(self, later: Self, part: fn(&Self) -> u64) -> f64 {
        let spent = later.total.saturating_sub(self.total).max(1);
        100.0 * part(&later).saturating_sub(part(&self)) as f64 / spent as f64
    }
}

/// The host's share of all CPU time (steal) over a window: read at its start, asked at its end.
pub struct StealWindow {
    start: CpuTicks,
}

impl StealWindow {
    pub fn start() -> Self {
        Self {
            start: CpuTicks::now(),
        }
    }

    /// Steal since `start`, in percent of all CPU time.
    pub fn percent(&self) -> f64 {
        self.start.steal_percent_until(CpuTicks::now())
    }
}

#[cfg(test)]
mod tests {
    use super::code_changed_in;

    #[test]
    fn proc_stat_gives_steal_idle_with_iowait_and_all_time() {
        let stat = "cpu  100 2 30 400 50 6 7 8 9 1\ncpu0 50 1 15 200 25 3 3 4 4 0\nintr 1\n";
        let ticks = super::CpuTicks::parse(stat);
        // The guests' ticks (9 and 1) are already counted in user.
        assert_eq!(
            ticks,
            super::CpuTicks {
                steal: 8,
                idle: 450,
                total: 603
            }
        );
        assert_eq!(
            super::CpuTicks::parse("intr 1\n"),
            super::CpuTicks::default()
        );
    }

    #[test]
    fn steal_and_idle_are_shares_of_the_window_only() {
        use super::CpuTicks;
        let at = |steal, idle, total| CpuTicks { steal, idle, total };
        // (before, after, steal %, idle %)
        let table = [
            (at(10, 100, 1_000), at(20, 600, 2_000), 1.0, 50.0),
            (at(0, 0, 0), at(50, 25, 100), 50.0, 25.0),
            // No time passed: no division by zero.
            (at(5, 5, 100), at(5, 5, 100), 0.0, 0.0),
        ];
        for (before, after, steal, idle) in table {
            assert_eq!(
                before.steal_percent_until(after),
                steal,
                "{before:?} → {after:?}"
            );
            assert_eq!(
                before.idle_percent_until(after),
                idle,
                "{before:?} → {after:?}"
            );
        }
    }

    use std::path::Path;
    use std::process::Command;

    fn git(dir: &Path, args: &[&str]) {
        let out = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "-c",
                "commit.gpgsign=false",
            ])
            .args(args)
            .output()
            .expect("git runs");
        assert!(out.status.success(), "git {args:?}: {out:?}");
    }

    #[test]
    fn a_rewritten_results_index_is_not_a_code_change_but_an_edited_source_is() {
        let dir = std::env::temp_dir().join(format!("shoal-machine-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("bench-results")).expect("temp dir");
        std::fs::create_dir_all(dir.join("src")).expect("temp dir");
        std::fs::write(dir.join("bench-results/README.md"), "old index\n").expect("write");
        std::fs::write(dir.join("src/lib.rs"), "// code\n").expect("write");
        git(&dir, &["init", "-q"]);
        git(&dir, &["add", "."]);
        git(&dir, &["commit", "-q", "-m", "first"]);
        assert!(!code_changed_in(&dir));

        std::fs::write(dir.join("bench-results/README.md"), "new index\n").expect("write");
        std::fs::write(dir.join("bench-results/new.md"), "a result\n").expect("write");
        assert!(!code_changed_in(&dir), "the results folder is not code");
        // From a subfolder too: the paths are the checkout's, not the working directory's.
        assert!(!code_changed_in(&dir.join("src")));

        std::fs::write(dir.join("src/lib.rs"), "// changed\n").expect("write");
        assert!(code_changed_in(&dir));
        assert!(code_changed_in(&dir.join("bench-results")));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
