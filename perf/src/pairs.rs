//! Sidecar pairs built from proxies people run as sidecars today — nginx and HAProxy — and any
//! proxy a user names, for `shoal-bench bench compare`.
//!
//! A pair is what a sidecar mesh puts on a request's path: the client pod's proxy takes plain
//! HTTP/1.1 from the app (as iptables capture would hand it over) and sends it over mTLS to the
//! server pod's proxy, which checks the client's certificate and passes plain HTTP to the app.
//! Both proxies keep their upstream connections alive and pool them, as Envoy sidecars do, run
//! one worker each (shoal's proxies run one shard in the comparison) and log nothing per request.
//! Certificates are ECDSA P-256 from one CA, TLS 1.3 only, like the mesh's own; the server's
//! carries a DNS name because neither nginx nor HAProxy can check a SPIFFE URI.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};

use crate::process::ExternalProcess;

/// The host name in the server proxy's certificate, which the client proxy checks.
pub const SERVER_NAME: &str = "server.bench.svc.cluster.local";

/// Where one pair sits: the client proxy's listener (what the load generator connects to), the
/// server proxy's mTLS listener, and the app behind it.
#[derive(Clone, Copy, Debug)]
pub struct PairAddrs {
    pub client_listen: SocketAddr,
    pub server_listen: SocketAddr,
    pub app: SocketAddr,
}

/// The files of the pair's PKI in a directory: `ca.pem`, `server.pem`/`server.key`,
/// `client.pem`/`client.key`, and HAProxy's cert-and-key bundles `server.bundle`, `client.bundle`.
pub fn write_pki(dir: &Path) -> std::io::Result<()> {
    let err =
        |e: rcgen::Error| std::io::Error::other(format!("minting the pair's certificates: {e}"));
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(err)?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "bench sidecar CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).map_err(err)?;
    std::fs::write(dir.join("ca.pem"), ca_cert.pem())?;
    let issuer = Issuer::new(ca, ca_key);
    for (name, dns, usage) in [
        ("server", SERVER_NAME, ExtendedKeyUsagePurpose::ServerAuth),
        (
            "client",
            "client.bench.svc.cluster.local",
            ExtendedKeyUsagePurpose::ClientAuth,
        ),
    ] {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(err)?;
        let mut params = CertificateParams::new(vec![dns.to_string()]).map_err(err)?;
        params.distinguished_name.push(DnType::CommonName, dns);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &issuer).map_err(err)?;
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem())?;
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem())?;
        std::fs::write(
            dir.join(format!("{name}.bundle")),
            format!("{}{}", cert.pem(), key.serialize_pem()),
        )?;
    }
    Ok(())
}

/// The nginx configuration of one side of the pair (`client` or `server`), everything under `dir`.
pub fn nginx_conf(dir: &Path, side: &str, a: &PairAddrs) -> String {
    let d = dir.display();
    let (listen, upstream, location) = if side == "client" {
        (
            format!("listen {};", a.client_listen),
            a.server_listen,
            format!(
                "proxy_pass https://peer;
      proxy_ssl_certificate {d}/client.pem;
      proxy_ssl_certificate_key {d}/client.key;
      proxy_ssl_trusted_certificate {d}/ca.pem;
      proxy_ssl_verify on;
      proxy_ssl_name {SERVER_NAME};
      proxy_ssl_protocols TLSv1.3;
      proxy_ssl_session_reuse on;"
            ),
        )
    } else {
        (
            format!(
                "listen {} ssl;
    ssl_certificate {d}/server.pem;
    ssl_certificate_key {d}/server.key;
    ssl_client_certificate {d}/ca.pem;
    ssl_verify_client on;
    ssl_protocols TLSv1.3;",
                a.server_listen
            ),
            a.app,
            "proxy_pass http://peer;".to_string(),
        )
    };
    format!(
        "daemon off;
worker_processes 1;
pid {d}/nginx-{side}.pid;
error_log {d}/nginx-{side}.err warn;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  client_body_temp_path {d}/body-{side};
  proxy_temp_path {d}/proxy-{side};
  fastcgi_temp_path {d}/fastcgi-{side};
  uwsgi_temp_path {d}/uwsgi-{side};
  scgi_temp_path {d}/scgi-{side};
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  upstream peer {{
    server {upstream};
    keepalive 256;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
  }}
  server {{
    {listen}
    location / {{
      {location}
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_buffering off;
      proxy_request_buffering off;
    }}
  }}
}}
"
    )
}

/// How an HAProxy pair carries a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HaproxyMode {
    /// HTTP/1.1, mTLS between the sides, upstream connections kept and reused: a sidecar pair.
    Http,
    /// Each connection relayed as bytes over a TLS connection of its own between the sides: an
    /// L4 mTLS pair, what ztunnels do without HBONE's pooled, multiplexed tunnels.
    TcpMtls,
    /// Each connection relayed as bytes in plain text: the least any pair of L4 proxies costs
    /// on a machine, with no encryption and no framing.
    TcpPlain,
}

impl HaproxyMode {
    /// The name it goes by in file names and reports.
    pub fn name(self) -> &'static str {
        match self {
            HaproxyMode::Http => "http",
            HaproxyMode::TcpMtls => "tcp-mtls",
            HaproxyMode::TcpPlain => "tcp",
        }
    }
}

/// The HAProxy configuration of one side of the pair (`client` or `server`), everything under
/// `dir`. In HTTP mode the client side reuses its upstream connections; in the TCP modes each
/// client connection gets one upstream connection of its own, as an L4 proxy's does.
pub fn haproxy_conf(dir: &Path, side: &str, a: &PairAddrs, mode: HaproxyMode) -> String {
    let d = dir.display();
    let tls = mode != HaproxyMode::TcpPlain;
    let alpn = if mode == HaproxyMode::Http {
        " alpn http/1.1"
    } else {
        ""
    };
    let (bind, server) = if side == "client" {
        (
            format!("bind {}", a.client_listen),
            if tls {
                format!(
                    "server peer {} ssl crt {d}/client.bundle ca-file {d}/ca.pem verify required verifyhost {SERVER_NAME} ssl-min-ver TLSv1.3{alpn}",
                    a.server_listen
                )
            } else {
                format!("server peer {}", a.server_listen)
            },
        )
    } else {
        (
            if tls {
                format!(
                    "bind {} ssl crt {d}/server.bundle ca-file {d}/ca.pem verify required ssl-min-ver TLSv1.3{alpn}",
                    a.server_listen
                )
            } else {
                format!("bind {}", a.server_listen)
            },
            format!("server app {}", a.app),
        )
    };
    let defaults = if mode == HaproxyMode::Http {
        "  mode http
  timeout connect 5s
  timeout client 300s
  timeout server 300s
  timeout http-keep-alive 300s
  http-reuse always"
    } else {
        "  mode tcp
  timeout connect 5s
  timeout client 300s
  timeout server 300s"
    };
    format!(
        "global
  nbthread 1
  maxconn 4096
defaults
{defaults}
frontend in
  {bind}
  default_backend out
backend out
  {server}
"
    )
}

/// Starts an nginx or HAProxy pair in `dir` (which must hold the PKI): the server side, then
/// the client side. `program` is `nginx` or `haproxy` (in HTTP mode).
pub fn start_pair(
    program: &str,
    dir: &Path,
    a: &PairAddrs,
) -> std::io::Result<(ExternalProcess, ExternalProcess)> {
    if program == "haproxy" {
        return start_haproxy_pair(dir, a, HaproxyMode::Http);
    }
    let start = |side: &str, listen: SocketAddr| -> std::io::Result<ExternalProcess> {
        let conf = dir.join(format!("nginx-{side}.conf"));
        std::fs::write(&conf, nginx_conf(dir, side, a))?;
        let mut command = Command::new(executable("nginx"));
        command
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.join(format!("nginx-{side}.err")));
        ExternalProcess::spawn(
            command,
            &format!("nginx ({side} side)"),
            &dir.join(format!("nginx-{side}.log")),
            &[listen],
        )
    };
    let server = start("server", a.server_listen)?;
    let client = start("client", a.client_listen)?;
    Ok((client, server))
}

/// Starts an HAProxy pair in `dir` (which must hold the PKI unless the mode is plain text): the
/// server side, then the client side. Pairs of different modes can share `dir`.
pub fn start_haproxy_pair(
    dir: &Path,
    a: &PairAddrs,
    mode: HaproxyMode,
) -> std::io::Result<(ExternalProcess, ExternalProcess)> {
    let start = |side: &str, listen: SocketAddr| -> std::io::Result<ExternalProcess> {
        // HTTP mode keeps the names `bench compare` has always written.
        let stem = match mode {
            HaproxyMode::Http => format!("haproxy-{side}"),
            _ => format!("haproxy-{}-{side}", mode.name()),
        };
        let conf = dir.join(format!("{stem}.conf"));
        std::fs::write(&conf, haproxy_conf(dir, side, a, mode))?;
        let mut command = Command::new(executable("haproxy"));
        command.arg("-db").arg("-f").arg(&conf);
        let what = match mode {
            HaproxyMode::Http => format!("haproxy ({side} side)"),
            _ => format!("haproxy {} ({side} side)", mode.name()),
        };
        ExternalProcess::spawn(command, &what, &dir.join(format!("{stem}.log")), &[listen])
    };
    let server = start("server", a.server_listen)?;
    let client = start("client", a.client_listen)?;
    Ok((client, server))
}

/// The program's path: on `PATH`, or in /usr/sbin where Debian puts both (not on a user's PATH).
pub fn executable(program: &str) -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(program))
}

/// Whether `program` can run; if not and `install` is set, tries Debian's package (as root).
/// `Err` says why it is unavailable, for the report.
pub fn ensure(program: &str, package: &str, install: bool) -> Result<(), String> {
    let runs = || {
        Command::new(executable(program))
            .arg("-v")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if runs() {
        return Ok(());
    }
    if !install {
        return Err(format!(
            "{program} is not installed (apt install {package})"
        ));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(format!(
            "{program} is not installed and installing {package} needs root"
        ));
    }
    eprintln!("installing {package} from Debian's packages…");
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .map_err(|e| format!("apt-get: {e}"))
            .and_then(|o| {
                if o.status.success() {
                    Ok(())
                } else {
                    Err(String::from_utf8_lossy(&o.stderr).trim().to_string())
                }
            })
    };
    let installed =
        apt(&["install", "-y", "-qq", "--no-install-recommends", package]).or_else(|_| {
            apt(&["update", "-qq"])?;
            apt(&["install", "-y", "-qq", "--no-install-recommends", package])
        });
    match installed {
        Ok(()) if runs() => Ok(()),
        Ok(()) => Err(format!("{package} installed but {program} does not run")),
        Err(e) => Err(format!(
            "{program} is not installed and apt-get failed: {e}"
        )),
    }
}

/// A proxy the user names on the command line: `NAME=COMMAND`, run with `sh -c`, where
/// `{listen}` is the address it must serve plain HTTP/1.1 on (the client's side), `{upstream}`
/// the app's address and `{dir}` a scratch directory of its own. The command stands for the
/// whole path between the client and the app (one proxy, or a script that starts a pair and
/// execs the last); it should `exec` its proxy so that stopping it stops the proxy.
#[derive(Clone, Debug)]
pub struct ExtraProxy {
    pub name: String,
    pub command: String,
}

impl std::str::FromStr for ExtraProxy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, command) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected NAME=COMMAND"))?;
        let name = name.trim();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "{name:?}: a proxy's name is letters, digits, '-' and '_'"
            ));
        }
        if !command.contains("{listen}") {
            return Err(format!(
                "{name}: the command must use {{listen}}, the address the client connects to"
            ));
        }
        Ok(ExtraProxy {
            name: name.to_string(),
            command: command.to_string(),
        })
    }
}

impl ExtraProxy {
    /// The command with its placeholders filled in.
    pub fn command_for(&self, listen: SocketAddr, upstream: SocketAddr, dir: &Path) -> String {
        self.command
            .replace("{listen}", &listen.to_string())
            .replace("{upstream}", &upstream.to_string())
            .replace("{dir}", &dir.display().to_string())
    }

    pub fn start(
        &self,
        listen: SocketAddr,
        upstream: SocketAddr,
        dir: &Path,
    ) -> std::io::Result<ExternalProcess> {
        std::fs::create_dir_all(dir)?;
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(self.command_for(listen, upstream, dir));
        ExternalProcess::spawn(command, &self.name, &dir.join("output.log"), &[listen])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_extra_proxy_is_named_and_serves_the_listen_address() {
        let p: ExtraProxy = "envoy=exec envoy --listen {listen} --to {upstream} -d {dir}"
            .parse()
            .unwrap();
        assert_eq!(p.name, "envoy");
        assert_eq!(
            p.command_for(
                "127.1.0.1:15001".parse().unwrap(),
                "127.1.0.2:80".parse().unwrap(),
                Path::new("/tmp/x")
            ),
            "exec envoy --listen 127.1.0.1:15001 --to 127.1.0.2:80 -d /tmp/x"
        );
        for bad in [
            "no-equals",
            "=exec x {listen}",
            "a b=x {listen}",
            "x=exec x",
        ] {
            assert!(bad.parse::<ExtraProxy>().is_err(), "{bad}");
        }
    }
}
