//! The control plane's benchmark: how long 1k / 10k / 100k pods (with proportional services,
//! waypoints, policies, routes and ServiceEntries) take to parse and compile, the process's peak
//! memory and the snapshot's heap size, and how long a file change takes to reach every shard.
//!
//! Each size is compiled in a child process (`shoal-bench control-compile`), so its peak RSS is
//! its own. Reload latency is measured in this process: an agent watching the directory, two
//! shards following its snapshots, and a thread that notes the moment of publication and the
//! moment the last shard has switched.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shoal_control::{Agent, ManifestDir, Options};
use shoal_runtime::{ListenerSpec, Runtime, RuntimeConfig};

use crate::machine::Machine;
use crate::report::fmt_spread;

#[derive(Clone, Debug, clap::Args)]
pub struct ControlBenchArgs {
    /// Pod counts to compile.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
    pub pods: Vec<usize>,
    /// Compiles per size (each in its own process); medians are reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// File changes timed per reload size.
    #[arg(long, default_value_t = 10)]
    pub reloads: usize,
    /// Pod counts to time reloads at.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub reload_pods: Vec<usize>,
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
}

/// Pods per namespace; every namespace gets the same mix of other objects.
pub const PODS_PER_NAMESPACE: usize = 100;
/// Per namespace: a service per ten pods, one waypoint (with its pod), one ServiceEntry, (in
/// every fourth namespace, whose services use the waypoint) one HTTPRoute splitting two services, one namespace-wide ALLOW, one selector DENY, and a STRICT
/// PeerAuthentication in every other namespace; plus one mesh-wide PeerAuthentication.
pub const SERVICES_PER_NAMESPACE: usize = 10;

/// Writes a generated mesh of `pods` pods into `dir`, one file per namespace.
pub fn generate(dir: &Path, pods: usize) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("mesh.yaml"),
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: PERMISSIVE}}\n",
    )?;
    let namespaces = pods.div_ceil(PODS_PER_NAMESPACE);
    for n in 0..namespaces {
        let ns = format!("ns-{n}");
        let mut y = String::with_capacity(PODS_PER_NAMESPACE * 400);
        let waypoint_label = if n % 4 == 0 {
            "\n    istio.io/use-waypoint: waypoint"
        } else {
            ""
        };
        let _ = write!(
            y,
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels:\n    istio.io/dataplane-mode: ambient{waypoint_label}\n"
        );
        let _ = write!(
            y,
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: waypoint, namespace: {ns}}}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]\n"
        );
        let _ = write!(
            y,
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: waypoint-0\n  namespace: {ns}\n  labels: {{gateway.networking.k8s.io/gateway-name: waypoint}}\nspec: {{nodeName: node-{}, serviceAccountName: waypoint}}\nstatus: {{podIP: 10.{}.{}.250}}\n",
            n % 10,
            100 + n / 256,
            n % 256
        );
        let in_ns = PODS_PER_NAMESPACE.min(pods - n * PODS_PER_NAMESPACE);
        for p in 0..in_ns {
            let global = n * PODS_PER_NAMESPACE + p;
            let app = p % SERVICES_PER_NAMESPACE;
            let _ = write!(
                y,
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: app-{app}-{p}\n  namespace: {ns}\n  labels: {{app: app-{app}, version: v{}}}\nspec:\n  nodeName: node-{}\n  serviceAccountName: app-{app}\n  containers: [{{name: app, ports: [{{name: http, containerPort: 8080}}]}}]\nstatus: {{podIP: 10.{}.{}.{}}}\n",
                p % 2,
                global % 10,
                global / 65536,
                (global / 256) % 256,
                global % 256
            );
        }
        for s in 0..SERVICES_PER_NAMESPACE {
            let vip = n * SERVICES_PER_NAMESPACE + s;
            let _ = write!(
                y,
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: app-{s}, namespace: {ns}}}\nspec:\n  clusterIP: 172.{}.{}.{}\n  selector: {{app: app-{s}}}\n  ports: [{{name: http, port: 80, targetPort: http}}]\n",
                16 + vip / 65536,
                (vip / 256) % 256,
                vip % 256
            );
        }
        let _ = write!(
            y,
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: external, namespace: {ns}}}\nspec:\n  hosts: [api-{n}.example.com]\n  ports: [{{number: 443, name: tls, protocol: TLS}}]\n  resolution: DNS\n"
        );
        if n % 4 == 0 {
            let _ = write!(
            y,
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: split, namespace: {ns}}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: app-0, port: 80}}]\n  rules:\n  - matches: [{{path: {{type: PathPrefix, value: /api}}}}]\n    backendRefs: [{{name: app-0, port: 80, weight: 90}}, {{name: app-1, port: 80, weight: 10}}]\n"
            );
        }
        let _ = write!(
            y,
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: allow-mesh, namespace: {ns}}}\nspec:\n  rules: [{{from: [{{source: {{namespaces: [{ns}, ns-0]}}}}]}}]\n"
        );
        let _ = write!(
            y,
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: deny-admin, namespace: {ns}}}\nspec:\n  selector: {{matchLabels: {{app: app-1}}}}\n  action: DENY\n  rules: [{{to: [{{operation: {{ports: [\"9000\"]}}}}]}}]\n"
        );
        if n % 2 == 0 {
            let _ = write!(
                y,
                "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: strict, namespace: {ns}}}\nspec: {{mtls: {{mode: STRICT}}}}\n"
            );
        }
        std::fs::write(dir.join(format!("{ns}.yaml")), y)?;
    }
    Ok(())
}

/// What one child process measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CompileRun {
    pub pods: usize,
    pub files: usize,
    pub objects: usize,
    pub workloads: usize,
    pub services: usize,
    pub errors: usize,
    pub parse_ms: f64,
    pub compile_ms: f64,
    /// Peak resident memory of the process (VmHWM), including its start-up baseline.
    pub peak_rss_bytes: u64,
    pub baseline_rss_bytes: u64,
    /// Heap in use once the snapshot is built and everything else dropped, less the baseline.
    pub snapshot_heap_bytes: u64,
}

fn proc_status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| shoal_runtime::memory::status_field_kib(&s, field))
        .unwrap_or(0)
}

fn heap_in_use_bytes() -> u64 {
    // SAFETY: mallinfo2 reads glibc's allocator statistics and has no preconditions.
    let info = unsafe { libc::mallinfo2() };
    (info.uordblks + info.hblkhd) as u64
}

/// The child's side: compile `dir` once and print the figures as JSON.
pub fn compile_once(dir: &Path, pods: usize) -> std::io::Result<()> {
    let baseline_rss_bytes = proc_status_kib("VmRSS") * 1024;
    let heap_before = heap_in_use_bytes();
    let snapshot = {
        let mut source = ManifestDir::new(dir);
        source.snapshot(&Default::default(), &Options::default())?
    };
    let run = CompileRun {
        pods,
        files: snapshot.stats.files,
        objects: snapshot.stats.objects,
        workloads: snapshot.workloads.len(),
        services: snapshot.services.len(),
        errors: snapshot.stats.errors,
        parse_ms: snapshot.stats.parse_time.as_secs_f64() * 1e3,
        compile_ms: snapshot.stats.compile_time.as_secs_f64() * 1e3,
        peak_rss_bytes: proc_status_kib("VmHWM") * 1024,
        baseline_rss_bytes,
        snapshot_heap_bytes: heap_in_use_bytes().saturating_sub(heap_before),
    };
    println!(
        "{}",
        serde_json::to_string(&run).map_err(std::io::Error::other)?
    );
    drop(snapshot);
    Ok(())
}

#[derive(Clone, Debug, Serialize)]
pub struct ReloadRun {
    pub pods: usize,
    /// From the file write to the agent's publication (debounce + load + compile).
    pub change_to_publish_ms: f64,
    /// From publication seen to the last shard holding the new version.
    pub publish_to_all_shards_us: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub compiles: Vec<CompileRun>,
    pub reloads: Vec<ReloadRun>,
}

fn run_child(dir: &Path, pods: usize) -> std::io::Result<CompileRun> {
    let exe = std::env::current_exe()?;
    let out = std::process::Command::new(exe)
        .args(["control-compile", "--dir"])
        .arg(dir)
        .args(["--pods", &pods.to_string()])
        .output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "control-compile failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    serde_json::from_slice(&out.stdout).map_err(std::io::Error::other)
}

fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn time_reloads(dir: &Path, pods: usize, count: usize) -> std::io::Result<Vec<ReloadRun>> {
    const SHARDS: usize = 2;
    let agent = Agent::start(dir, Options::default())?;
    let stats = agent.stats();
    let subscriber = agent.subscriber();
    // Each shard notes when it derived its state from a new snapshot: that is the switch.
    let switched: Arc<[AtomicU64; SHARDS]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let marks = switched.clone();
    let config = RuntimeConfig {
        shards: SHARDS,
        ..RuntimeConfig::default()
    };
    let rt = Runtime::builder(config)
        .listener(ListenerSpec::new(
            "idle",
            "127.0.0.1:0".parse().map_err(std::io::Error::other)?,
        ))
        .start(move |shard| {
            let marks = marks.clone();
            let index = shard.index;
            let view = shard.view(subscriber.clone(), move |s: &shoal_control::Snapshot| {
                marks[index].store(unix_ns(), Ordering::Release);
                s.services.len()
            });
            shard.follow(view);
            async move {
                // Idle shards: nothing but following the snapshot.
                let _ = shard.take_listeners();
                shard.drain().wait().await;
            }
        })
        .map_err(std::io::Error::other)?;
    let mut runs = Vec::new();
    let extra = dir.join("reload.yaml");
    for i in 0..count {
        let before = agent.current().version;
        let text = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: reload-{i}, namespace: reload}}\nspec: {{clusterIP: 192.168.0.{}, ports: [{{port: 80}}]}}\n",
            1 + i % 250
        );
        let written = unix_ns();
        std::fs::write(&extra, text)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        // Sleep-poll: a spinning observer would take the CPU the shards need to switch.
        loop {
            let version = stats.version.load(Ordering::Acquire);
            let published = stats.published_at_unix_ns.load(Ordering::Acquire);
            if version > before
                && switched
                    .iter()
                    .all(|m| m.load(Ordering::Acquire) >= published)
            {
                let last_switch = switched
                    .iter()
                    .map(|m| m.load(Ordering::Acquire))
                    .max()
                    .unwrap_or(published);
                runs.push(ReloadRun {
                    pods,
                    change_to_publish_ms: published.saturating_sub(written) as f64 / 1e6,
                    publish_to_all_shards_us: last_switch.saturating_sub(published) as f64 / 1e3,
                });
                break;
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other(
                    "no reload reached the shards within 60 s",
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // Let the watcher settle before the next change.
        std::thread::sleep(Duration::from_millis(300));
    }
    let _ = std::fs::remove_file(&extra);
    rt.begin_drain();
    rt.join();
    drop(agent);
    Ok(runs)
}

pub fn run(args: &ControlBenchArgs) -> std::io::Result<PathBuf> {
    let machine = Machine::describe();
    let work = tempfile_dir()?;
    let mut compiles = Vec::new();
    let mut reloads = Vec::new();
    for &pods in &args.pods {
        let dir = work.join(format!("mesh-{pods}"));
        generate(&dir, pods)?;
        for _ in 0..args.repeats {
            let run = run_child(&dir, pods)?;
            eprintln!(
                "{pods} pods: parse {:.0} ms, compile {:.0} ms, peak RSS {} MiB",
                run.parse_ms,
                run.compile_ms,
                run.peak_rss_bytes >> 20
            );
            compiles.push(run);
        }
        if args.reload_pods.contains(&pods) {
            let runs = time_reloads(&dir, pods, args.reloads)?;
            reloads.extend(runs);
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    let report = Report {
        machine,
        compiles,
        reloads,
    };
    let summary = summarize(&report);
    crate::report::write(&args.out, &report.machine, "control", &report, &summary)
}

fn tempfile_dir() -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("shoal-control-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn summarize(r: &Report) -> String {
    let mut md = String::from("# Control plane: compile and reload\n\n");
    md.push_str(&r.machine.markdown());
    md.push_str(
        "\nGenerated meshes: per 100 pods one namespace with 10 services, a waypoint and its pod, a \
         ServiceEntry (VIP allocated), two AuthorizationPolicies, (every other namespace) a STRICT \
         PeerAuthentication and (every fourth, whose services use the waypoint) an HTTPRoute. Each \
         compile runs in its own process. Medians (min–max).\n\n",
    );
    md.push_str(
        "| pods | objects | parse ms | compile ms | peak RSS MiB | snapshot heap MiB | errors |\n",
    );
    md.push_str("|---:|---:|---:|---:|---:|---:|---:|\n");
    let mut sizes: Vec<usize> = r.compiles.iter().map(|c| c.pods).collect();
    sizes.dedup();
    for pods in sizes {
        let runs: Vec<&CompileRun> = r.compiles.iter().filter(|c| c.pods == pods).collect();
        let col = |f: &dyn Fn(&CompileRun) -> f64| runs.iter().map(|c| f(c)).collect::<Vec<f64>>();
        let _ = writeln!(
            md,
            "| {pods} | {} | {} | {} | {} | {} | {} |",
            runs[0].objects,
            fmt_spread(col(&|c| c.parse_ms), 1),
            fmt_spread(col(&|c| c.compile_ms), 1),
            fmt_spread(col(&|c| c.peak_rss_bytes as f64 / 1048576.0), 0),
            fmt_spread(col(&|c| c.snapshot_heap_bytes as f64 / 1048576.0), 1),
            runs[0].errors
        );
    }
    md.push_str(
        "\nReload: a file written in a watched directory, two shards following the snapshot.\n\n",
    );
    md.push_str("| pods | changes | file change → published ms | published → every shard µs |\n|---:|---:|---:|---:|\n");
    let mut sizes: Vec<usize> = r.reloads.iter().map(|c| c.pods).collect();
    sizes.dedup();
    for pods in sizes {
        let runs: Vec<&ReloadRun> = r.reloads.iter().filter(|c| c.pods == pods).collect();
        let _ = writeln!(
            md,
            "| {pods} | {} | {} | {} (max {:.0}) |",
            runs.len(),
            fmt_spread(runs.iter().map(|c| c.change_to_publish_ms).collect(), 1),
            fmt_spread(runs.iter().map(|c| c.publish_to_all_shards_us).collect(), 0),
            runs.iter()
                .map(|c| c.publish_to_all_shards_us)
                .fold(0.0, f64::max)
        );
    }
    md
}
