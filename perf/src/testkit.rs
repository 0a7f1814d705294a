//! What the integration tests of every crate share: curl through a SOCKS5 port from a pod's
//! address, reading admin and metrics endpoints, waiting for a condition, runtime flags. (Test
//! support; panics on failure, as tests want.)

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
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).expect("connect to the admin server");
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
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
