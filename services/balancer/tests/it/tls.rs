//! TLS with real clients: curl (HTTP/2 over ALPN) and openssl s_client (versions, ALPN, SNI,
//! certificate reload).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use api::files::balancer_self_signed;
use balancer::CertificateFiles;

use crate::support::*;

fn write_cert(dir: &Path, stem: &str, names: &[&str]) -> (PathBuf, PathBuf, String) {
    let c =
        rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    let (cert, key) = (
        dir.join(format!("{stem}.crt")),
        dir.join(format!("{stem}.key")),
    );
    std::fs::write(&cert, c.cert.pem()).unwrap();
    std::fs::write(&key, c.key_pair.serialize_pem()).unwrap();
    (cert, key, c.cert.pem())
}

/// The leaf certificate the server sent, as PEM.
fn served_pem(out: &str) -> String {
    let start = out
        .find("-----BEGIN CERTIFICATE-----")
        .unwrap_or_else(|| panic!("no certificate in:\n{out}"));
    let end = out[start..].find("-----END CERTIFICATE-----").unwrap()
        + start
        + "-----END CERTIFICATE-----".len();
    out[start..end].to_string()
}

fn same_pem(a: &str, b: &str) -> bool {
    let norm = |s: &str| s.split_whitespace().collect::<String>();
    norm(a) == norm(b)
}

fn s_client(addr: std::net::SocketAddr, args: &[&str]) -> (bool, String) {
    let openssl = tool("openssl", "openssl");
    run(Command::new(openssl)
        .arg("s_client")
        .arg("-connect")
        .arg(addr.to_string())
        .args(args))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_negotiates_http2_and_gets_hsts() {
    init_tracing();
    let s = Setup::new();
    let h = s.start().await;
    let a = h.https_addrs()[0];
    let curl = tool("curl", "curl");
    let resolve = format!("tandem.test:{}:{}", a.port(), a.ip());
    let url = format!("https://tandem.test:{}/", a.port());
    for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let (ok, out) = tokio::task::spawn_blocking({
            let (curl, resolve, url) = (curl.clone(), resolve.clone(), url.clone());
            move || {
                run(Command::new(curl).args([
                    "-sS",
                    "-k",
                    flag,
                    "--resolve",
                    &resolve,
                    "-D",
                    "-",
                    "-w",
                    "\nversion=%{http_version}\n",
                    &url,
                ]))
            }
        })
        .await
        .unwrap();
        assert!(ok, "{out}");
        assert!(
            out.contains(&format!("version={version}\n")),
            "{flag}: {out}"
        );
        assert!(out.contains("backend server"), "{out}");
        assert!(
            out.to_ascii_lowercase()
                .contains("strict-transport-security: max-age=31536000"),
            "{out}"
        );
    }
    // Many requests over one HTTP/2 connection, split over both backends.
    let urls: Vec<String> = (0..10).map(|_| url.clone()).collect();
    let (ok, out) = tokio::task::spawn_blocking(move || {
        run(Command::new(curl)
            .args(["-sS", "-k", "--http2", "--resolve", &resolve])
            .args(&urls))
    })
    .await
    .unwrap();
    assert!(ok, "{out}");
    assert_eq!(out.matches("backend server1").count(), 5, "{out}");
    assert_eq!(out.matches("backend server2").count(), 5, "{out}");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_sees_tls13_alpn_h2_and_old_versions_refused() {
    init_tracing();
    let s = Setup::new();
    let h = s.start().await;
    let a = h.https_addrs()[0];
    let (ok, out) = tokio::task::spawn_blocking(move || {
        s_client(a, &["-servername", "tandem.test", "-alpn", "h2,http/1.1"])
    })
    .await
    .unwrap();
    assert!(ok, "{out}");
    assert!(out.contains("New, TLSv1.3"), "{out}");
    assert!(out.contains("ALPN protocol: h2"), "{out}");
    // The self-signed certificate generated into the state directory is the one served.
    let generated = std::fs::read_to_string(balancer_self_signed(s.state.path()).0).unwrap();
    assert!(same_pem(&served_pem(&out), &generated));

    let (ok, out) =
        tokio::task::spawn_blocking(move || s_client(a, &["-tls1_2", "-alpn", "http/1.1"]))
            .await
            .unwrap();
    assert!(ok, "{out}");
    assert!(out.contains("New, TLSv1.2"), "{out}");
    assert!(out.contains("ALPN protocol: http/1.1"), "{out}");

    // The client is told to allow old versions (SECLEVEL=0), so the refusal is the server's.
    for old in ["-tls1_1", "-tls1"] {
        let (ok, out) = tokio::task::spawn_blocking(move || {
            s_client(a, &[old, "-cipher", "DEFAULT:@SECLEVEL=0"])
        })
        .await
        .unwrap();
        assert!(
            !ok && out.contains("no peer certificate available"),
            "{old} accepted:\n{out}"
        );
        assert!(
            out.contains("alert protocol version") || out.contains("alert handshake failure"),
            "{old}: {out}"
        );
    }
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_configured_certificate_and_reload_keeps_connections() {
    init_tracing();
    let certs = tempfile::tempdir().unwrap();
    let (cert, key, main_pem) = write_cert(certs.path(), "main", &["tandem.test"]);
    let (ocert, okey, other_pem) =
        write_cert(certs.path(), "other", &["other.example", "*.wild.example"]);
    let s = Setup::with(|c| {
        c.tls.certificate = Some(cert.clone());
        c.tls.key = Some(key.clone());
    });
    let mut o = s.options();
    o.certificates = vec![CertificateFiles {
        names: vec!["other.example".into(), "*.wild.example".into()],
        certificate: ocert,
        key: okey,
    }];
    let h = s.start_with(o).await;
    let a = h.https_addrs()[0];
    for (sni, pem) in [
        (Some("tandem.test"), &main_pem),
        (Some("other.example"), &other_pem),
        (Some("a.wild.example"), &other_pem),
        (Some("unknown.example"), &main_pem),
        (None, &main_pem),
    ] {
        let args: Vec<&str> = match sni {
            Some(n) => vec!["-servername", n],
            None => vec!["-noservername"],
        };
        let (ok, out) = tokio::task::spawn_blocking(move || s_client(a, &args))
            .await
            .unwrap();
        assert!(ok, "{out}");
        assert!(
            same_pem(&served_pem(&out), pem),
            "SNI {sni:?} got the wrong certificate"
        );
    }
    assert!(
        !balancer_self_signed(s.state.path()).0.exists(),
        "self-signed made although configured"
    );

    // An open TLS connection survives a certificate reload; new handshakes get the new one.
    let openssl = tool("openssl", "openssl");
    let mut old = Command::new(&openssl)
        .args([
            "s_client",
            "-quiet",
            "-connect",
            &a.to_string(),
            "-servername",
            "tandem.test",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, _, new_pem) = write_cert(certs.path(), "main", &["tandem.test"]);
    h.reload_certificates().unwrap();
    let (ok, out) =
        tokio::task::spawn_blocking(move || s_client(a, &["-servername", "tandem.test"]))
            .await
            .unwrap();
    assert!(ok, "{out}");
    assert!(
        same_pem(&served_pem(&out), &new_pem),
        "reload did not take effect"
    );
    let mut stdin = old.stdin.take().unwrap();
    stdin
        .write_all(b"GET / HTTP/1.1\r\nHost: tandem.test\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    let mut stdout = old.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let _ = stdout.read_to_string(&mut resp);
        resp
    });
    let resp = tokio::task::spawn_blocking(move || reader.join().unwrap())
        .await
        .unwrap();
    drop(stdin);
    let _ = old.kill();
    let _ = old.wait();
    assert!(
        resp.starts_with("HTTP/1.1 200") && resp.contains("backend server"),
        "{resp}"
    );
    // A broken certificate file is refused and the old certificate stays.
    std::fs::write(&cert, "garbage").unwrap();
    assert!(h.reload_certificates().is_err());
    let (ok, out) =
        tokio::task::spawn_blocking(move || s_client(a, &["-servername", "tandem.test"]))
            .await
            .unwrap();
    assert!(ok && same_pem(&served_pem(&out), &new_pem), "{out}");
    h.shutdown().await;
}
