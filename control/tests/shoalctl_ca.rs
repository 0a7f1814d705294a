//! `shoalctl ca init` makes a CA that loads and issues; it refuses to overwrite one by accident;
//! a CA in Istio's layout with an RSA PKCS#1 root key (as Istio's sample CA ships) issues too.

use std::process::Command;

use shoal_hbone::ca::{CertificateAuthority, LocalCa};
use shoal_hbone::tls::identities;
use shoal_hbone::Identity;

fn shoalctl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_shoalctl"))
        .args(args)
        .output()
        .expect("run shoalctl")
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("shoalctl-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn ca_init_creates_a_ca_that_issues_spiffe_certificates() {
    let dir = temp_dir("init");
    let out = shoalctl(&[
        "ca",
        "init",
        dir.to_str().expect("utf8"),
        "--trust-domain",
        "mesh.example",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.join("ca-key.pem"))
            .expect("key")
            .permissions(),
    );
    assert_eq!(
        mode & 0o777,
        0o600,
        "the CA key is readable by its owner only"
    );

    let ca = LocalCa::load(&dir).expect("load the CA it wrote");
    let who = Identity::new("mesh.example", "default", "reviews").expect("id");
    let cert = ca
        .issue(&who, std::time::Duration::from_secs(3600))
        .expect("issue");
    assert_eq!(identities(&cert.chain[0]), vec![who]);

    let again = shoalctl(&["ca", "init", dir.to_str().expect("utf8")]);
    assert!(
        !again.status.success(),
        "an existing CA is not overwritten without --force"
    );
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));

    let issued = dir.join("issued");
    let out = shoalctl(&[
        "ca",
        "issue",
        dir.to_str().expect("utf8"),
        "--identity",
        "spiffe://mesh.example/ns/shop/sa/cart",
        "--out",
        issued.to_str().expect("utf8"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in ["cert-chain.pem", "key.pem", "root-cert.pem"] {
        assert!(issued.join(f).exists(), "{f}");
    }
    let bad = shoalctl(&[
        "ca",
        "issue",
        dir.to_str().expect("utf8"),
        "--identity",
        "spiffe://x/ns/a",
        "--out",
        "/tmp/x",
    ]);
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("not exactly /ns/"),
        "a bad identity is explained"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_rsa_pkcs1_root_in_istio_layout_issues_workload_certificates() {
    let dir = temp_dir("rsa");
    std::fs::create_dir_all(&dir).expect("dir");
    let key = dir.join("ca-key.pem");
    let cert = dir.join("root-cert.pem");
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl is installed (.ci/run installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl(&[
        "genrsa",
        "-traditional",
        "-out",
        key.to_str().expect("utf8"),
        "2048",
    ]);
    assert!(
        std::fs::read_to_string(&key)
            .expect("key")
            .contains("BEGIN RSA PRIVATE KEY"),
        "PKCS#1, as Istio's sample"
    );
    openssl(&[
        "req",
        "-x509",
        "-new",
        "-key",
        key.to_str().expect("utf8"),
        "-days",
        "30",
        "-subj",
        "/O=cluster.local/CN=Root CA",
        "-addext",
        "basicConstraints=critical,CA:true",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-out",
        cert.to_str().expect("utf8"),
    ]);
    let ca = LocalCa::load(&dir).expect("an RSA PKCS#1 CA loads");
    let who = Identity::new("cluster.local", "default", "productpage").expect("id");
    let issued = ca
        .issue(&who, std::time::Duration::from_secs(3600))
        .expect("the RSA root signs");
    assert_eq!(identities(&issued.chain[0]), vec![who]);
    // openssl agrees the chain verifies.
    let leaf = dir.join("leaf.pem");
    std::fs::write(&leaf, shoal_hbone::ca::pem("CERTIFICATE", &issued.chain[0]))
        .expect("write leaf");
    openssl(&[
        "verify",
        "-CAfile",
        cert.to_str().expect("utf8"),
        leaf.to_str().expect("utf8"),
    ]);
    let _ = std::fs::remove_dir_all(&dir);
}
