//! What the integration tests of every crate share: curl through a SOCKS5 port from a pod's
//! address, reading admin and metrics endpoints, waiting for a condition, runtime flags, a pod in
//! its own network namespace for capture tests. (Test support; panics on failure, as tests want.)

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use shoal_runtime::RuntimeArgs;

/// Polls `done` every 20 ms for up to 10 s; panics naming `what` if it never holds.
pub fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runtime flags as the command line would give them.
pub fn runtime_args(args: &[&str]) -> RuntimeArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        runtime: RuntimeArgs,
    }
    let mut all = vec!["x"];
    all.extend_from_slice(args);
    Cli::parse_from(all).runtime
}

/// curl from the address `from` through the SOCKS5 listener `socks` (names resolved by the
/// proxy): (exit code, head and body).
pub fn curl_via(from: &str, socks: SocketAddr, url: &str, extra: &[&str]) -> (i32, String) {
    let out = Command::new("curl")
        .args([
            "-s",
            "-i",
            "--max-time",
            "10",
            "--interface",
            from,
            "--socks5-hostname",
            &socks.to_string(),
        ])
        .args(extra)
        .arg(url)
        .output()
        .expect("curl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The final status of a response curl printed with `-i` (after any `100 Continue`).
pub fn status_of(response: &str) -> Option<u16> {
    response
        .lines()
        .filter(|l| l.starts_with("HTTP/"))
        .filter_map(|l| l.split(' ').nth(1)?.parse::<u16>().ok())
        .find(|code| *code >= 200)
}

/// A header's value in a response curl printed with `-i` (name compared case-insensitively).
pub fn header_of(response: &str, name: &str) -> Option<String> {
    let prefix = format!("{}: ", name.to_ascii_lowercase());
    response.lines().find_map(|l| {
        let lower = l.to_ascii_lowercase();
        lower
            .starts_with(&prefix)
            .then(|| l[prefix.len()..].trim().to_string())
    })
}

/// GET `path` from an admin or metrics server: the whole response, head included.
pub fn admin_get(addr: SocketAddr, path: &str) -> String {
    admin_request(addr, "GET", path)
}

/// `method path` to an admin server, without a body: the whole answer.
pub fn admin_request(addr: SocketAddr, method: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).expect("connect to the admin server");
    write!(
        conn,
        "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )
    .expect("send the request");
    let mut body = String::new();
    conn.read_to_string(&mut body).expect("read the answer");
    body
}

/// The sum of a metric's series whose labels include every one of `labels`.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with(&format!("{name}{{")) && labels.iter().all(|want| l.contains(want))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A mesh in `dir`: a new CA for cluster.local in `dir/ca` and `yaml` as `dir/manifests/mesh.yaml`.
/// Returns (manifests, ca).
pub fn write_mesh(dir: &std::path::Path, yaml: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let ca = dir.join("ca");
    shoal_hbone::ca::LocalCa::generate("cluster.local")
        .and_then(|c| c.write(&ca))
        .expect("a CA");
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests).expect("the manifests directory");
    std::fs::write(manifests.join("mesh.yaml"), yaml).expect("the mesh");
    (manifests, ca)
}

/// A process started for a test or benchmark, killed when dropped.
pub struct Started(pub std::process::Child);

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn openssl(dir: &std::path::Path, args: &[&str]) -> std::io::Result<()> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

/// With openssl, in `dir`: a CA (`NAME-ca.pem`, `NAME-ca.key`) and, when `server` is given, a
/// certificate for that host name signed by it (`server.pem`, `server.key`). ECDSA P-256.
pub fn make_ca(dir: &std::path::Path, name: &str, server: Option<&str>) -> std::io::Result<()> {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let (ca_key, ca_pem) = (format!("{name}-ca.key"), format!("{name}-ca.pem"));
    let mut args = vec!["req", "-x509"];
    args.extend(ec);
    args.extend([
        "-keyout",
        &ca_key,
        "-out",
        &ca_pem,
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
    ]);
    openssl(dir, &args)?;
    let Some(host) = server else {
        return Ok(());
    };
    let subject = format!("/CN={host}");
    let mut args = vec!["req"];
    args.extend(ec);
    args.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        &subject,
    ]);
    openssl(dir, &args)?;
    std::fs::write(dir.join("san.ext"), format!("subjectAltName=DNS:{host}"))?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    )
}

/// nginx (one process, in the foreground, everything under `dir`) serving HTTPS on `listen` with
/// `dir/server.pem`, the `locations` given (nginx `location` blocks); returns once it accepts.
pub fn start_nginx_https(
    dir: &std::path::Path,
    listen: &str,
    locations: &str,
) -> std::io::Result<Started> {
    let d = dir.display();
    let conf = format!(
        "daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  keepalive_requests 1000000;
  server {{
    listen {listen} ssl;
    ssl_certificate {d}/server.pem;
    ssl_certificate_key {d}/server.key;
    {locations}
  }}
}}
"
    );
    std::fs::write(dir.join("nginx.conf"), conf)?;
    let child = Command::new("nginx")
        .args(["-p", &d.to_string(), "-c"])
        .arg(dir.join("nginx.conf"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| std::io::Error::other(format!("nginx (apt install nginx-light): {e}")))?;
    let started = Started(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(listen).is_err() {
        if Instant::now() > deadline {
            return Err(std::io::Error::other(format!(
                "nginx is not listening on {listen}"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(started)
}

/// One curl process making `n` requests to `url` from the address `from` through the SOCKS5
/// listener `socks` — one after another on a kept-alive connection, or `parallel` at once —
/// printing `write_out` (curl's `-w`) after each; bodies are dropped. Returns what it printed.
pub fn curl_repeat(
    from: &str,
    socks: SocketAddr,
    url: &str,
    n: usize,
    parallel: Option<usize>,
    write_out: &str,
    extra: &[&str],
) -> String {
    let mut args: Vec<String> = vec![
        "-s".into(),
        "--max-time".into(),
        "20".into(),
        "--interface".into(),
        from.into(),
        "--socks5-hostname".into(),
        socks.to_string(),
        "-w".into(),
        write_out.into(),
    ];
    if let Some(p) = parallel {
        args.extend([
            "-Z".into(),
            "--parallel-immediate".into(),
            "--parallel-max".into(),
            p.to_string(),
        ]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    for _ in 0..n {
        args.extend(["-o".into(), "/dev/null".into(), url.to_string()]);
    }
    let out = Command::new("curl").args(&args).output().expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a setup command; panics with its error output if it fails.
fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e} (needs ip and iptables)"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Panics unless running as root (the capture tests need it; CI runs as root).
pub fn assert_root() {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false);
    assert!(root, "the capture tests need root (CI runs as root)");
}

/// A pod's network namespace joined to the node by a veth pair, with PREROUTING rules on the node's end;
/// all removed on drop.
pub struct PodNamespace {
    name: String,
    host_veth: String,
    rules: Vec<Vec<String>>,
}

impl PodNamespace {
    /// 10.`subnet`.0.1 on the node's side, 10.`subnet`.0.2 in the namespace; each rule is the
    /// iptables arguments after `-t nat -A PREROUTING -i VETH`.
    pub fn create(tag: u32, subnet: u8, rules: &[&[&str]]) -> PodNamespace {
        let id = (std::process::id() % 10_000) * 10 + tag;
        let name = format!("shoal-cap-{id}");
        let host_veth = format!("shc{id}h");
        let pod_veth = format!("shc{id}p");
        let ns = PodNamespace {
            name: name.clone(),
            host_veth: host_veth.clone(),
            rules: rules
                .iter()
                .map(|r| {
                    ["-t", "nat", "-A", "PREROUTING", "-i", host_veth.as_str()]
                        .iter()
                        .chain(r.iter())
                        .map(|s| s.to_string())
                        .collect()
                })
                .collect(),
        };
        let (host_ip, pod_ip, gateway) = (
            format!("10.{subnet}.0.1/24"),
            format!("10.{subnet}.0.2/24"),
            format!("10.{subnet}.0.1"),
        );
        sh(&["ip", "netns", "add", &name]);
        sh(&[
            "ip", "link", "add", &host_veth, "type", "veth", "peer", "name", &pod_veth,
        ]);
        sh(&["ip", "link", "set", &pod_veth, "netns", &name]);
        sh(&["ip", "addr", "add", &host_ip, "dev", &host_veth]);
        sh(&["ip", "link", "set", &host_veth, "up"]);
        sh(&[
            "ip", "netns", "exec", &name, "ip", "addr", "add", &pod_ip, "dev", &pod_veth,
        ]);
        sh(&[
            "ip", "netns", "exec", &name, "ip", "link", "set", &pod_veth, "up",
        ]);
        sh(&[
            "ip", "netns", "exec", &name, "ip", "link", "set", "lo", "up",
        ]);
        sh(&[
            "ip", "netns", "exec", &name, "ip", "route", "add", "default", "via", &gateway,
        ]);
        for rule in &ns.rules {
            let rule: Vec<&str> = std::iter::once("iptables")
                .chain(rule.iter().map(String::as_str))
                .collect();
            sh(&rule);
        }
        ns
    }

    /// curl from inside the namespace: (succeeded, response).
    pub fn curl(&self, url: &str) -> (bool, String) {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.name,
                "curl",
                "-s",
                "-i",
                "--max-time",
                "10",
                url,
            ])
            .output()
            .expect("curl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }
}

impl Drop for PodNamespace {
    fn drop(&mut self) {
        for rule in &self.rules {
            let mut delete = rule.clone();
            delete[2] = "-D".into();
            let _ = Command::new("iptables").args(&delete).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_veth])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// The value of field `name` in a log line of `key=value` pairs, without the quotes a string
/// value is written in.
pub fn log_field(line: &str, name: &str) -> String {
    let start = line
        .find(&format!(" {name}="))
        .unwrap_or_else(|| panic!("no {name} in {line}"))
        + name.len()
        + 2;
    line[start..]
        .split(' ')
        .next()
        .unwrap_or("")
        .trim_matches('"')
        .to_string()
}
