//! `shoalctl`: operate a shoal mesh from the command line.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use shoal_control::{dump, stats, ManifestDir, Options, Snapshot};
use shoal_hbone::ca::{self, CertificateAuthority, LocalCa};
use shoal_hbone::Identity;

#[derive(Parser)]
#[command(name = "shoalctl", version, about = "Operate a shoal mesh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The mesh's certificate authority.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Check the manifests in DIR (or one file): print every problem; exit 1 if any is an error.
    Check {
        dir: PathBuf,
        #[command(flatten)]
        mesh: MeshArgs,
    },
    /// Compile the manifests in DIR and print the snapshot as JSON (the shape of /config_dump).
    Dump {
        dir: PathBuf,
        #[command(flatten)]
        mesh: MeshArgs,
    },
    /// Print what a proxy holds, as `istioctl ztunnel-config` does: from a running proxy's admin
    /// port (default), a saved config dump (--file) or a manifests directory (--manifests).
    ZtunnelConfig {
        #[arg(value_enum)]
        what: What,
        /// The proxy's admin address.
        #[arg(long, default_value = "127.0.0.1:15000", env = "SHOAL_ADMIN")]
        admin: String,
        /// Read a saved /config_dump instead.
        #[arg(long, conflicts_with = "manifests")]
        file: Option<PathBuf>,
        /// Compile a manifests directory instead.
        #[arg(long)]
        manifests: Option<PathBuf>,
        /// Print JSON rather than a table.
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Output,
        #[command(flatten)]
        mesh: MeshArgs,
    },
    /// Requests per second, P99 latency and success rate per service, from a running waypoint's
    /// metrics (two scrapes, --interval-s apart).
    WaypointStats(StatsArgs),
}

#[derive(clap::Args)]
struct StatsArgs {
    /// The waypoint's metrics (or admin) address.
    #[arg(long, default_value = "127.0.0.1:15020", env = "SHOAL_METRICS")]
    metrics: String,
    /// Seconds between the two scrapes the rates are taken over.
    #[arg(long, default_value_t = 5.0)]
    interval_s: f64,
    /// Print JSON rather than a table.
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    output: Output,
}

#[derive(clap::Args)]
struct MeshArgs {
    #[arg(long, default_value = shoal_hbone::DEFAULT_TRUST_DOMAIN, env = "SHOAL_TRUST_DOMAIN")]
    trust_domain: String,
    /// Where mesh-wide policies live.
    #[arg(long, default_value = "istio-system", env = "SHOAL_ROOT_NAMESPACE")]
    root_namespace: String,
}

impl MeshArgs {
    fn options(&self) -> Options {
        Options {
            trust_domain: self.trust_domain.clone(),
            root_namespace: self.root_namespace.clone(),
            ..Options::default()
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum What {
    Workload,
    Service,
    Policy,
    Certificate,
    Problems,
    All,
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a new root CA (ECDSA P-256, ten years) in DIR: root-cert.pem and ca-key.pem (0600).
    Init {
        dir: PathBuf,
        #[arg(long, default_value = shoal_hbone::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Replace a CA already in DIR.
        #[arg(long)]
        force: bool,
    },
    /// Issue a workload certificate from the CA in DIR: writes cert-chain.pem, key.pem and
    /// root-cert.pem into --out.
    Issue {
        dir: PathBuf,
        /// spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>
        #[arg(long)]
        identity: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 24)]
        lifetime_hours: u64,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoalctl: {e}");
            ExitCode::FAILURE
        }
    }
}

fn compile_dir(dir: &Path, mesh: &MeshArgs) -> Result<Snapshot, String> {
    ManifestDir::new(dir)
        .snapshot(&Default::default(), &mesh.options())
        .map_err(|e| format!("{}: {e}", dir.display()))
}

/// GET /config_dump from a proxy's admin server.
fn fetch_dump(admin: &str) -> Result<serde_json::Value, String> {
    let body = fetch(admin, "/config_dump")?;
    serde_json::from_slice(&body).map_err(|e| format!("{admin}: the config dump is not JSON: {e}"))
}

/// GET `path` from a proxy's admin or metrics server: the body of a 200.
fn fetch(admin: &str, path: &str) -> Result<Vec<u8>, String> {
    let fail = |e: std::io::Error| format!("cannot read {path} from {admin}: {e}");
    let addr = admin
        .to_socket_addrs()
        .map_err(fail)?
        .next()
        .ok_or_else(|| format!("{admin} resolves to no address"))?;
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(fail)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(fail)?;
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nhost: {admin}\r\nconnection: close\r\n\r\n"
    )
    .map_err(fail)?;
    let mut response = Vec::new();
    conn.take(256 * 1024 * 1024)
        .read_to_end(&mut response)
        .map_err(fail)?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut head = httparse::Response::new(&mut headers);
    let body_at = match head.parse(&response) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return Err(format!("{admin} did not answer with HTTP")),
    };
    if head.code != Some(200) {
        return Err(format!(
            "{admin} answered {} to {path}",
            head.code.unwrap_or(0)
        ));
    }
    Ok(response[body_at..].to_vec())
}

fn waypoint_stats(args: &StatsArgs) -> Result<(), String> {
    if !(args.interval_s > 0.0 && args.interval_s <= 3600.0) {
        return Err("--interval-s must be above 0 and at most 3600".into());
    }
    let scrape = || -> Result<_, String> {
        let body = fetch(&args.metrics, "/metrics")?;
        stats::totals(&String::from_utf8_lossy(&body)).map_err(|e| format!("{}: {e}", args.metrics))
    };
    let before = scrape()?;
    let started = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs_f64(args.interval_s));
    let after = scrape()?;
    let figures = stats::between(&before, &after, started.elapsed().as_secs_f64());
    if args.output == Output::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&figures).map_err(|e| e.to_string())?
        );
    } else if figures.is_empty() {
        println!("no requests recorded by {} yet", args.metrics);
    } else {
        print!("{}", stats::table(&figures));
    }
    Ok(())
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::WaypointStats(args) => waypoint_stats(&args),
        Command::Check { dir, mesh } => {
            let snapshot = compile_dir(&dir, &mesh)?;
            for p in snapshot.problems.iter().filter(|p| p.is_error()) {
                println!("{p}");
            }
            for p in snapshot.problems.iter().filter(|p| !p.is_error()) {
                println!("{p}");
            }
            let s = &snapshot.stats;
            println!(
                "{} objects in {} files: {} errors, {} warnings; {} workloads, {} services, {} waypoints, {} L4 policies",
                s.objects,
                s.files,
                s.errors,
                s.warnings,
                snapshot.workloads.len(),
                snapshot.services.len(),
                snapshot.waypoints.len(),
                snapshot.policies.len()
            );
            if s.errors > 0 {
                return Err(format!("{} has {} error(s)", dir.display(), s.errors));
            }
            Ok(())
        }
        Command::Dump { dir, mesh } => {
            let snapshot = compile_dir(&dir, &mesh)?;
            let dump = dump::config_dump(&snapshot, 1, &[]);
            println!(
                "{}",
                serde_json::to_string_pretty(&dump).map_err(|e| e.to_string())?
            );
            Ok(())
        }
        Command::ZtunnelConfig {
            what,
            admin,
            file,
            manifests,
            output,
            mesh,
        } => {
            let dump = match (file, manifests) {
                (Some(file), _) => {
                    let text =
                        std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
                    serde_json::from_slice(&text)
                        .map_err(|e| format!("{}: not a config dump: {e}", file.display()))?
                }
                (None, Some(dir)) => dump::config_dump(&compile_dir(&dir, &mesh)?, 1, &[]),
                (None, None) => fetch_dump(&admin)?,
            };
            if output == Output::Json {
                let key = match what {
                    What::Workload => "workloads",
                    What::Service => "services",
                    What::Policy => "policies",
                    What::Certificate => "certificates",
                    What::Problems => "problems",
                    What::All => "",
                };
                let value = if key.is_empty() { &dump } else { &dump[key] };
                println!(
                    "{}",
                    serde_json::to_string_pretty(value).map_err(|e| e.to_string())?
                );
                return Ok(());
            }
            let text = match what {
                What::Workload => dump::workload_table(&dump),
                What::Service => dump::service_table(&dump),
                What::Policy => dump::policy_table(&dump),
                What::Certificate => dump::certificate_table(&dump),
                What::Problems => dump::problems_text(&dump),
                What::All => [
                    dump::workload_table(&dump),
                    dump::service_table(&dump),
                    dump::policy_table(&dump),
                    dump::certificate_table(&dump),
                    dump::problems_text(&dump),
                ]
                .join("\n"),
            };
            print!("{text}");
            Ok(())
        }
        Command::Ca {
            command:
                CaCommand::Init {
                    dir,
                    trust_domain,
                    force,
                },
        } => {
            if dir.join(ca::CA_KEY_FILE).exists() && !force {
                return Err(format!(
                    "{} already holds a CA key; use --force to replace it (every workload certificate it signed stops being trusted)",
                    dir.display()
                ));
            }
            Identity::new(&trust_domain, "default", "default")
                .map_err(|e| format!("--trust-domain: {e}"))?;
            let ca = LocalCa::generate(&trust_domain).map_err(|e| e.to_string())?;
            ca.write(&dir).map_err(|e| e.to_string())?;
            println!("created a root CA for {trust_domain} in {}", dir.display());
            Ok(())
        }
        Command::Ca {
            command:
                CaCommand::Issue {
                    dir,
                    identity,
                    out,
                    lifetime_hours,
                },
        } => {
            let identity = Identity::parse(&identity).map_err(|e| e.to_string())?;
            let ca = LocalCa::load(&dir).map_err(|e| e.to_string())?;
            let cert = ca
                .issue(&identity, Duration::from_secs(lifetime_hours * 3600))
                .map_err(|e| e.to_string())?;
            std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
            let chain: String = cert
                .chain
                .iter()
                .map(|c| ca::pem("CERTIFICATE", c))
                .collect();
            let roots: String = ca
                .roots()
                .iter()
                .map(|c| ca::pem("CERTIFICATE", c))
                .collect();
            let write = |name: &str, text: &str| {
                std::fs::write(out.join(name), text)
                    .map_err(|e| format!("{}: {e}", out.join(name).display()))
            };
            write("cert-chain.pem", &chain)?;
            write(
                "key.pem",
                &ca::pem("PRIVATE KEY", cert.key.secret_pkcs8_der()),
            )?;
            write("root-cert.pem", &roots)?;
            println!("issued {identity} into {}", out.display());
            Ok(())
        }
    }
}
