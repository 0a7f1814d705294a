//! `shoalctl`: operate a shoal mesh from the command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
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

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
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
