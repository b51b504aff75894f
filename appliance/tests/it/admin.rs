//! The admin port of a real node (`appliance run`, one node on its own loopback address): the
//! status page rendered by headless Chromium shows a service that was just killed, and the
//! aggregated metrics pass `promtool check metrics`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const APPLIANCE: &str = env!("CARGO_BIN_EXE_appliance");
const ADDR: &str = "127.0.0.61";

const CONFIG: &str = r#"
[cluster]
name = "admintest"
domain = "admin.test"
subnet = "127.0.0.0/8"
floating_ip = "127.0.0.60"

[[node]]
name = "solo"
address = "127.0.0.61"
db_role = "primary"

[ports]
http = 18080
https = 18443
web = 18081
app = 18000
db = 13306
admin = 19443

[firewall]
admin_cidrs = ["127.0.0.0/8"]
"#;

fn require(tool: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "this test needs `{tool}`: apt-get install -y {package} (scripts/setup-host does)"
    );
}

struct Run(std::process::Child, std::path::PathBuf);

/// `appliance run` of node `solo` of `config` in a fresh directory: the directory, the node's
/// state directory and the running supervisor (stopped on drop).
fn start_solo(config: &str) -> (tempfile::TempDir, std::path::PathBuf, Run) {
    let tmp = crate::support::tmp_root();
    let file = tmp.path().join("cluster.toml");
    std::fs::write(&file, config).unwrap();
    let state = tmp.path().join("solo");
    let log = tmp.path().join("run.log");
    let child = Command::new(APPLIANCE)
        .args(["run", "--config"])
        .arg(&file)
        .args(["--node", "solo", "--state-dir"])
        .arg(&state)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    (tmp, state, Run(child, log))
}

impl Drop for Run {
    fn drop(&mut self) {
        crate::support::stop(&mut self.0);
    }
}

impl Run {
    fn log(&self) -> String {
        let text = std::fs::read_to_string(&self.1).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- supervisor log (last 40 lines) ---\n{}",
            lines[lines.len().saturating_sub(40)..].join("\n")
        )
    }
}

fn status(state: &Path) -> Vec<Value> {
    let out = Command::new(APPLIANCE)
        .args(["status", "--json", "--state-dir"])
        .arg(state)
        .output()
        .unwrap();
    serde_json::from_slice::<Value>(&out.stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

fn service(state: &Path, name: &str) -> Option<Value> {
    status(state).into_iter().find(|s| s["name"] == name)
}

fn chromium(args: &[&str], url: &str, profile: &Path) -> std::process::Output {
    Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--ignore-certificate-errors",
            "--window-size=1200,900",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .expect("run chromium")
}

#[test]
fn status_page_shows_a_killed_service_and_metrics_parse() {
    require("chromium", "chromium");
    require("promtool", "prometheus");
    let (tmp, state, run) = start_solo(CONFIG);

    let deadline = Instant::now() + Duration::from_secs(120);
    while !["nginx", "admin"]
        .iter()
        .all(|s| service(&state, s).is_some_and(|v| v["ready"] == true))
    {
        assert!(
            Instant::now() < deadline,
            "nginx and admin not ready\n{:?}\n{}",
            status(&state),
            run.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let nginx_pid = service(&state, "nginx").unwrap()["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(nginx_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();

    // The page needs a login: a session made the way a browser makes one, then the page
    // fetched with it is what Chromium renders (a driven browser logs in itself in the QEMU
    // wizard test).
    let base = format!("https://{ADDR}:19443");
    let (cookie, _) = crate::support::admin_login(&base, &state);
    let anonymous = Command::new("curl")
        .args([
            "-sk",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
        ])
        .arg(format!("{base}/"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&anonymous.stdout),
        format!("303 {base}/login"),
        "the status page without a session"
    );
    let page = Command::new("curl")
        .args(["-sfk", "-H", &format!("Cookie: {cookie}")])
        .arg(format!("{base}/"))
        .output()
        .unwrap();
    assert!(
        page.status.success(),
        "the status page with a session
{}",
        run.log()
    );
    let saved = tmp.path().join("status.html");
    std::fs::write(&saved, &page.stdout).unwrap();
    let url = format!("file://{}", saved.display());
    let profile = tmp.path().join("chromium");
    let dom = chromium(&["--dump-dom"], &url, &profile);
    let html = String::from_utf8_lossy(&dom.stdout);
    let row = html
        .lines()
        .find(|l| l.contains("data-service=\"nginx\""))
        .unwrap_or_else(|| {
            panic!(
                "no nginx row in the page:\n{html}\nchromium stderr:\n{}",
                String::from_utf8_lossy(&dom.stderr)
            )
        });
    assert!(
        row.contains("restart"),
        "the page does not show nginx as restarting/restarted: {row}\n{}",
        run.log()
    );
    assert!(
        row.contains("SIGKILL"),
        "the page does not show why nginx stopped: {row}"
    );

    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let png = shots.join("status-page.png");
    let _ = std::fs::remove_file(&png);
    let shot = chromium(
        &[&format!("--screenshot={}", png.display())],
        &url,
        &profile,
    );
    let bytes = std::fs::read(&png).unwrap_or_else(|e| {
        panic!(
            "no screenshot at {}: {e}\n{}",
            png.display(),
            String::from_utf8_lossy(&shot.stderr)
        )
    });
    assert!(
        bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000,
        "screenshot is not a real page: {} bytes",
        bytes.len()
    );
    eprintln!("status page screenshot: {}", png.display());

    // The aggregated metrics are valid Prometheus text and include the balancer's and the log
    // monitor's, each scraped from its local endpoint.
    let scraped =
        [9100, 9101].map(|port| format!("tandem_scrape_up{{endpoint=\"{ADDR}:{port}\"}} 1\n"));
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let metrics = Command::new("curl")
            .args(["-sfk", &format!("https://{ADDR}:19443/metrics")])
            .args([
                "-H",
                &format!(
                    "Authorization: Bearer {}",
                    crate::support::metrics_token(&state)
                ),
            ])
            .output()
            .unwrap();
        assert!(
            metrics.status.success(),
            "metrics endpoint failed\n{}",
            run.log()
        );
        let text = String::from_utf8_lossy(&metrics.stdout).into_owned();
        if scraped.iter().all(|up| text.contains(up.as_str())) {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "the balancer's or the log monitor's metrics were not scraped\n{text}\n{}",
            run.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        text.contains("\ntandem_balancer_") && text.contains("\ntandem_alerts_firing"),
        "{text}"
    );
    assert!(
        text.contains(
            "tandem_supervisor_service_restarts_total{node=\"solo\",service=\"nginx\"} 1"
        ),
        "{text}"
    );
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(promtool.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
    drop(promtool.stdin.take());
    let checked = promtool.wait_with_output().unwrap();
    let complaints = String::from_utf8_lossy(&checked.stdout).to_string()
        + &String::from_utf8_lossy(&checked.stderr);
    assert!(
        checked.status.success(),
        "promtool rejects the metrics: {complaints}\n{text}"
    );
}

/// A client of the admin port that trusts the cluster CA in `ca_pem` and presents `client`
/// (certificate and key PEM) if given: the status of `GET url` and the body, or the error.
fn get_with_cert(
    url: &str,
    ca_pem: &str,
    client: Option<(&str, &str)>,
) -> Result<(u16, String), String> {
    let ca = ureq::tls::Certificate::from_pem(ca_pem.as_bytes()).map_err(|e| e.to_string())?;
    let mut tls =
        ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::new_with_certs(&[ca]));
    if let Some((cert, key)) = client {
        let chain: Vec<_> = ureq::tls::parse_pem(cert.as_bytes())
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        let key = ureq::tls::PrivateKey::from_pem(key.as_bytes()).map_err(|e| e.to_string())?;
        tls = tls.client_cert(Some(ureq::tls::ClientCert::new_with_certs(&chain, key)));
    }
    let agent = ureq::Agent::config_builder()
        .tls_config(tls.build())
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .new_agent();
    let mut resp = agent.get(url).call().map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| e.to_string())?;
    Ok((status, body))
}

#[test]
fn the_peer_api_takes_only_certificates_that_name_a_node() {
    use image_builder::pki;
    const N1: &str = "127.0.0.81";
    const ADMIN_PORT: u16 = 26943;
    let config = format!(
        r#"
[cluster]
name = "peertest"
domain = "peer.test"
subnet = "127.0.0.0/8"
floating_ip = "127.0.0.80"

[[node]]
name = "n1"
address = "{N1}"
db_role = "primary"

[[node]]
name = "n2"
address = "127.0.0.82"
db_role = "replica"

[ports]
admin = {ADMIN_PORT}
"#
    );
    let tmp = tempfile::tempdir().unwrap();
    let config_path = tmp.path().join("cluster.toml");
    std::fs::write(&config_path, &config).unwrap();
    let cluster = cluster_config::Cluster::from_toml(&config, "cluster.toml").unwrap();
    let (ca, _) = pki::load_or_create_ca(&tmp.path().join("ca"), &cluster.name).unwrap();
    // n1's TLS directory, as the image-builder puts it in the seed.
    let tls = tmp.path().join("n1-tls");
    std::fs::create_dir(&tls).unwrap();
    let n1 = pki::node_cert(&ca, &cluster, cluster.node("n1").unwrap()).unwrap();
    pki::write_file(&tls.join("node.crt"), n1.cert_pem.as_bytes(), 0o644).unwrap();
    pki::write_file(&tls.join("node.key"), n1.key_pem.as_bytes(), 0o600).unwrap();
    pki::write_file(&tls.join("ca.crt"), ca.cert_pem.as_bytes(), 0o644).unwrap();

    let log = tmp.path().join("admin.log");
    let child = Command::new(APPLIANCE)
        .args(["admin", "--config"])
        .arg(&config_path)
        .args(["--node", "n1", "--state-dir"])
        .arg(tmp.path().join("state"))
        .arg("--tls-dir")
        .arg(&tls)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let run = Run(child, log);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect((N1, ADMIN_PORT)).is_err() {
        assert!(
            Instant::now() < deadline,
            "admin not listening\n{}",
            run.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let url = format!("https://{N1}:{ADMIN_PORT}/api/peer/ping");
    let get = |client: Option<&pki::Issued>| {
        get_with_cert(
            &url,
            &ca.cert_pem,
            client.map(|c| (c.cert_pem.as_str(), c.key_pem.as_str())),
        )
    };
    // The other node's certificate, as the image-builder made it: a peer.
    let n2 = pki::node_cert(&ca, &cluster, cluster.node("n2").unwrap()).unwrap();
    assert_eq!(
        get(Some(&n2)),
        Ok((200, "pong from n1\n".to_string())),
        "{}",
        run.log()
    );
    // A client certificate naming a node (what a tool acting for a node uses): a peer.
    let named = pki::client_cert(&ca, "n2").unwrap();
    assert_eq!(get(Some(&named)).map(|r| r.0), Ok(200));
    // Signed by the cluster CA, but naming no node: not a peer.
    let evil = pki::client_cert(&ca, "evil.example").unwrap();
    let refused = get(Some(&evil)).unwrap();
    assert_eq!(refused.0, 403, "{refused:?}");
    assert!(
        refused.1.contains("naming a node of the cluster"),
        "{refused:?}"
    );
    // The certificate MariaDB serves (its key is readable by `mysql`): no client identity,
    // so no TLS session as a peer at all.
    let db = pki::db_cert(&ca, &cluster, cluster.node("n2").unwrap()).unwrap();
    assert!(
        get(Some(&db)).is_err(),
        "the database's certificate was taken as a client's"
    );
    // No certificate: the public pages only.
    assert_eq!(get(None).map(|r| r.0), Ok(403));
    let health = get_with_cert(
        &format!("https://{N1}:{ADMIN_PORT}/healthz"),
        &ca.cert_pem,
        None,
    );
    assert_eq!(health.map(|r| r.0), Ok(200));
    // Another CA's node certificate: no TLS session at all.
    let (rogue_ca, _) =
        pki::load_or_create_ca(&tmp.path().join("rogue-ca"), &cluster.name).unwrap();
    let rogue = pki::node_cert(&rogue_ca, &cluster, cluster.node("n2").unwrap()).unwrap();
    assert!(
        get(Some(&rogue)).is_err(),
        "a certificate of another CA was accepted"
    );
}

const CERT_ADDR: &str = "127.0.0.66";

const CERT_CONFIG: &str = r#"
[cluster]
name = "certtest"
domain = "cert.test"
subnet = "127.0.0.0/8"
floating_ip = "127.0.0.65"

[[node]]
name = "solo"
address = "127.0.0.66"
db_role = "primary"

[ports]
http = 18080
https = 18443
web = 18081
app = 18000
db = 13306
admin = 19443

[firewall]
admin_cidrs = ["127.0.0.0/8"]
"#;

/// The SHA-256 fingerprint of the certificate a new TLS connection to `addr` is given.
fn served_fingerprint(addr: &str) -> String {
    let out = Command::new("sh")
        .args([
            "-c",
            &format!(
                "openssl s_client -connect {addr} -servername www.cert.test </dev/null 2>/dev/null \
                 | openssl x509 -noout -fingerprint -sha256"
            ),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A certificate uploaded on the settings page (logged in, with the form's CSRF token) goes
/// through the settings service to the balancer, which serves it to new connections at once,
/// while a keep-alive connection opened before goes on answering.
#[test]
fn a_certificate_uploaded_on_the_settings_page_is_served_without_dropping_a_connection() {
    use std::io::{BufRead as _, BufReader, Write as _};
    let (_tmp, state, run) = start_solo(CERT_CONFIG);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !["balancer", "admin", "nginx"]
        .iter()
        .all(|s| service(&state, s).is_some_and(|v| v["ready"] == true))
    {
        assert!(Instant::now() < deadline, "not ready\n{}", run.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let https = format!("{CERT_ADDR}:18443");
    let before = served_fingerprint(&https);
    assert!(before.contains("Fingerprint"), "{before}\n{}", run.log());

    // A keep-alive connection, opened (and used) before the change.
    let mut conn = Command::new("openssl")
        .args(["s_client", "-quiet", "-ign_eof", "-connect", &https])
        .args(["-servername", "www.cert.test"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut to = conn.stdin.take().unwrap();
    let mut from = BufReader::new(conn.stdout.take().unwrap());
    let mut ask = |what: &str| {
        to.write_all(b"GET /node.html HTTP/1.1\r\nHost: www.cert.test\r\n\r\n")
            .unwrap();
        let mut line = String::new();
        loop {
            line.clear();
            let n = from.read_line(&mut line).unwrap();
            assert!(n > 0, "{what}: the connection closed\n{}", run.log());
            if line.contains("node: solo") {
                break;
            }
        }
    };
    ask("before the change");

    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["www.cert.test".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let base = format!("https://{CERT_ADDR}:19443");
    let (cookie, csrf) = crate::support::admin_login(&base, &state);
    let posted = Command::new("curl")
        .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}"])
        .args(["-H", &format!("Cookie: {cookie}")])
        .args(["--data-urlencode", &format!("csrf={csrf}")])
        .args(["--data-urlencode", "tls=upload"])
        .args([
            "--data-urlencode",
            &format!("tls_certificate={}", cert.pem()),
        ])
        .args([
            "--data-urlencode",
            &format!("tls_key={}", key.serialize_pem()),
        ])
        .arg(format!("{base}/settings"))
        .output()
        .unwrap();
    let code = String::from_utf8_lossy(&posted.stdout).to_string();
    assert!(
        code == "200" || code == "303",
        "POST /settings: {code}\n{}",
        run.log()
    );

    let expected = cluster_config::settings::certificate_info(&cert.pem())
        .unwrap()
        .sha256;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = served_fingerprint(&https);
        if now.ends_with(&expected) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the balancer still serves {now}, not {expected}\n{}",
            run.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The connection from before the change still answers.
    ask("after the change");
    let _ = conn.kill();
    let _ = conn.wait();
    let restarts = service(&state, "balancer").unwrap()["restarts"].as_u64();
    assert_eq!(
        restarts,
        Some(0),
        "the balancer was restarted, not reloaded"
    );
}
