//! The admin port's update endpoints against a fake update service (a Unix socket server
//! speaking [`api::update`]'s protocol): the upload streamed through and its answers, the peer
//! API closed to non-peers, the cluster upgrade's spool refusing bad bundles before writing.

use std::io::{BufRead as _, Read, Write as _};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::update::{Event, Request as UpdateRequest};

use super::*;

const MIB: usize = 1 << 20;
/// The test server's idle timeout.
const IDLE: Duration = Duration::from_secs(2);

/// Takes any server certificate: the raw client below talks to the self-signed test server.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Sends a POST of `path` declaring `content_length` but only `body`, then waits for the
/// answer without sending more; returns its status line.
fn post_partial(addr: SocketAddr, path: &str, content_length: u64, body: &[u8]) -> String {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap()).unwrap();
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    write!(
        tls,
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {content_length}\r\n\r\n"
    )
    .unwrap();
    tls.write_all(body).unwrap();
    tls.flush().unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tls.read(&mut buf).unwrap();
        assert!(n > 0, "the server closed without an answer");
        answer.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    text.lines().next().unwrap_or_default().to_string()
}

/// What the fake update service does with an install.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Reads the bundle to its end and answers `done`.
    Accept,
    /// Answers `failed` (a bad signature) after the request line, reading nothing more.
    Refuse,
    /// Answers that an install is running.
    Busy,
}

struct Fake {
    mode: Mutex<Mode>,
    /// Every request with the bytes that followed it.
    seen: Mutex<Vec<(UpdateRequest, u64)>>,
    /// Told once the first MiB of a bundle has arrived.
    first_mib: Mutex<Option<mpsc::Sender<()>>>,
}

fn fake_update_service(socket: &Path) -> Arc<Fake> {
    let listener = UnixListener::bind(socket).unwrap();
    let fake = Arc::new(Fake {
        mode: Mutex::new(Mode::Accept),
        seen: Mutex::new(Vec::new()),
        first_mib: Mutex::new(None),
    });
    let shared = fake.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let fake = shared.clone();
            let mut conn = conn.unwrap();
            std::thread::spawn(move || {
                let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let request: UpdateRequest = serde_json::from_str(&line).unwrap();
                let mode = *fake.mode.lock().unwrap();
                let answer = match mode {
                    Mode::Refuse => Event::Failed {
                        message: "bundle signature: no trusted key verifies it".into(),
                    },
                    Mode::Busy => Event::Failed {
                        message: api::update::INSTALL_BUSY.into(),
                    },
                    Mode::Accept => {
                        let mut total = 0u64;
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = reader.read(&mut buf).unwrap();
                            if n == 0 {
                                break;
                            }
                            total += n as u64;
                            if total >= MIB as u64 {
                                if let Some(tx) = fake.first_mib.lock().unwrap().take() {
                                    let _ = tx.send(());
                                }
                            }
                        }
                        let _ = conn.write_all(
                            Event::Progress {
                                phase: "writing".into(),
                                done: total,
                                total,
                            }
                            .to_line()
                            .as_bytes(),
                        );
                        fake.seen.lock().unwrap().push((request.clone(), total));
                        Event::Done {
                            version: "2.0.0".into(),
                            slot: "b".into(),
                            entry: "tandem-b+3.conf".into(),
                            bytes: total,
                            elapsed_ms: 1,
                            rebooting: false,
                        }
                    }
                };
                if mode != Mode::Accept {
                    fake.seen.lock().unwrap().push((request, 0));
                }
                let _ = conn.write_all(answer.to_line().as_bytes());
            });
        }
    });
    fake
}

struct Server {
    addr: SocketAddr,
    root: tempfile::TempDir,
    ctx: Arc<Ctx>,
}

impl Server {
    fn run_dir(&self) -> PathBuf {
        self.root.path().join("run")
    }
    fn state_dir(&self) -> PathBuf {
        self.root.path().join("state")
    }
    fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }
}

/// An admin server on 127.0.0.1 with a self-signed certificate (no peer can call in), its
/// update keyring holding `trusted`, uploads capped at `max_bytes`.
fn server(trusted: &Key, max_bytes: u64) -> Server {
    let root = tempfile::tempdir().unwrap();
    let (run_dir, state_dir) = (root.path().join("run"), root.path().join("state"));
    std::fs::create_dir_all(&run_dir).unwrap();
    std::fs::create_dir_all(&state_dir).unwrap();
    let keyring = root.path().join("update-keys.pub");
    std::fs::write(&keyring, format!("# test\n{}\n", trusted.public)).unwrap();
    let cluster = Cluster::default_cluster();
    let node = cluster.nodes[0].clone();
    let config = Config {
        cluster,
        node,
        listen: "127.0.0.1:0".parse().unwrap(),
        state_dir,
        socket: root.path().join("no-control.sock"),
        run_dir,
        tls_dir: None,
        scrape: Vec::new(),
        alerts: Box::new(|_| Ok(Vec::new())),
        update_keyring: keyring,
    };
    let tls = server_config(&config).unwrap();
    let ctx = context(config, None);
    // Only the tests' own limits differ from the server's.
    let ctx = Arc::new(Ctx {
        limits: install::Limits {
            idle: IDLE,
            max_bytes,
        },
        ..Arc::into_inner(ctx).unwrap()
    });
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let served = ctx.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let _ = serve(listener, tls, served).await;
        });
    });
    Server { addr, root, ctx }
}

/// A client that takes the server's self-signed certificate.
fn client() -> ureq::Agent {
    let tls = ureq::tls::TlsConfig::builder()
        .disable_verification(true)
        .build();
    ureq::Agent::config_builder()
        .tls_config(tls)
        .timeout_global(Some(Duration::from_secs(60)))
        .http_status_as_error(false)
        .proxy(None)
        .build()
        .new_agent()
}

fn post(url: &str, body: &[u8]) -> (u16, String) {
    let mut resp = client().post(url).send(body).unwrap();
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_to_string().unwrap())
}

fn bytes(n: usize, seed: u32) -> Vec<u8> {
    // Not compressible, so a bundle's payload is as large as the data.
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// A signing key by its texts (the key type is the update crate's own).
struct Key {
    private: String,
    public: String,
}

fn generate() -> Key {
    let key = update::keys::generate().unwrap();
    Key {
        private: update::keys::private_key_text(&key),
        public: update::keys::public_key_text(&key.verifying_key()),
    }
}

fn bundle(key: &Key, version: &str, payload: &[u8]) -> Vec<u8> {
    let key = update::keys::parse_private(&key.private).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut out = Vec::new();
    let mut reader = payload;
    update::pack(
        &mut out,
        &key,
        &update::PackMeta {
            version: version.into(),
            build_time: 1,
        },
        vec![update::PayloadInput {
            name: update::PayloadName::Rootfs,
            compression: update::Compression::Zstd,
            reader: &mut reader,
        }],
        tmp.path(),
        &mut |_| {},
    )
    .unwrap();
    out
}

/// The first MiB, then nothing until `wait` says the update service got it: a server that
/// buffered the body whole would never answer.
struct Gated {
    data: Vec<u8>,
    pos: usize,
    wait: Option<mpsc::Receiver<()>>,
}

impl Read for Gated {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= MIB {
            if let Some(rx) = self.wait.take() {
                rx.recv_timeout(Duration::from_secs(20)).map_err(|_| {
                    std::io::Error::other("the first MiB never reached the update service")
                })?;
            }
        }
        let end = if self.pos < MIB { MIB } else { self.data.len() };
        let n = buf.len().min(end - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[test]
fn an_upload_streams_into_the_update_service_and_its_answer_decides_the_status() {
    let key = generate();
    let srv = server(&key, 8 * MIB as u64);
    let install = srv.url("/api/update/install?force=1&reboot=0&trial_timeout=120");

    // No update service: said so.
    let (status, body) = post(&install, b"bundle");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("the update service is not running"), "{body}");

    let fake = fake_update_service(&srv.run_dir().join(api::update::SOCKET_FILE));

    // Streamed: the service has the first MiB before the client sends the rest.
    let data = bytes(3 * MIB, 1);
    let (tx, rx) = mpsc::channel();
    *fake.first_mib.lock().unwrap() = Some(tx);
    let gated = Gated {
        data: data.clone(),
        pos: 0,
        wait: Some(rx),
    };
    let mut resp = client()
        .post(&install)
        .send(ureq::SendBody::from_owned_reader(gated))
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.body_mut().read_to_string().unwrap();
    assert_eq!(status, 200, "{body}");
    let done: Event = serde_json::from_str(&body).unwrap();
    assert!(
        matches!(done, Event::Done { bytes, .. } if bytes == data.len() as u64),
        "{body}"
    );

    // With a Content-Length the service is told the size; the origin names the client.
    let (status, body) = post(&install, &data[..MIB]);
    assert_eq!(status, 200, "{body}");
    {
        let seen = fake.seen.lock().unwrap();
        let (request, got) = seen.last().unwrap();
        assert_eq!(*got, MIB as u64);
        match request {
            UpdateRequest::Install {
                force,
                reboot,
                trial_timeout_secs,
                size,
                origin,
            } => {
                assert!(*force && !*reboot);
                assert_eq!(*trial_timeout_secs, Some(120));
                assert_eq!(*size, Some(MIB as u64));
                assert!(origin.starts_with("upload from 127.0.0.1:"), "{origin}");
            }
            other => panic!("{other:?}"),
        }
    }

    // Refused: 422 with the service's message, even while the client still sends.
    *fake.mode.lock().unwrap() = Mode::Refuse;
    let (status, body) = post(&install, &data);
    assert_eq!(status, 422, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        json["error"],
        "bundle signature: no trusted key verifies it"
    );

    // Another install runs: 409.
    *fake.mode.lock().unwrap() = Mode::Busy;
    let (status, body) = post(&install, b"x");
    assert_eq!(status, 409, "{body}");
    *fake.mode.lock().unwrap() = Mode::Accept;

    // Bad query values: 400, and the service never hears of it.
    let before = fake.seen.lock().unwrap().len();
    for query in ["force=2", "reboot=yes", "trial_timeout=soon", "what=1"] {
        let (status, body) = post(&srv.url(&format!("/api/update/install?{query}")), b"x");
        assert_eq!(status, 400, "{query}: {body}");
    }
    assert_eq!(fake.seen.lock().unwrap().len(), before);

    // Too large: refused up front by its Content-Length, before it is sent…
    let path = "/api/update/install?reboot=1";
    let line = post_partial(srv.addr, path, 8 * MIB as u64 + 1, b"");
    assert!(line.starts_with("HTTP/1.1 413"), "{line}");
    // …or cut off when it has none.
    let big = bytes(8 * MIB + 1, 2);
    let mut resp = client()
        .post(&install)
        .send(ureq::SendBody::from_owned_reader(std::io::Cursor::new(big)))
        .unwrap();
    assert_eq!(resp.status().as_u16(), 413);
    let body = resp.body_mut().read_to_string().unwrap();
    assert!(body.contains("at most 8388608 bytes"), "{body}");

    // A client that stops sending is cut off; the service sees the bundle end early.
    let started = std::time::Instant::now();
    let line = post_partial(srv.addr, path, 1000, &[7u8; 10]);
    assert!(line.starts_with("HTTP/1.1 408"), "{line}");
    assert!(started.elapsed() >= IDLE, "{:?}", started.elapsed());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let last = fake.seen.lock().unwrap().last().map(|(_, n)| *n);
        if last == Some(10) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the service never saw the end: {last:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Only POST.
    let resp = client().get(&install).call().unwrap();
    assert_eq!(resp.status().as_u16(), 405);
}

#[test]
fn the_peer_update_api_refuses_clients_that_are_not_peers() {
    let key = generate();
    let srv = server(&key, 8 * MIB as u64);
    let fake = fake_update_service(&srv.run_dir().join(api::update::SOCKET_FILE));
    let (status, body) = post(&srv.url("/api/peer/update?reboot=1"), b"bundle");
    assert_eq!(status, 403, "{body}");
    assert!(fake.seen.lock().unwrap().is_empty());
    for path in ["/api/peer/update-status", "/api/peer/health"] {
        let resp = client().get(&srv.url(path)).call().unwrap();
        assert_eq!(resp.status().as_u16(), 403, "{path}");
    }
}

#[test]
fn the_status_json_and_metrics_carry_the_update_state() {
    let key = generate();
    let srv = server(&key, 8 * MIB as u64);
    let get = |path: &str| {
        client()
            .get(&srv.url(path))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap()
    };
    let json: serde_json::Value = serde_json::from_str(&get("/api/status")).unwrap();
    assert!(
        json["update"]
            .as_str()
            .unwrap()
            .contains("update-status.json"),
        "{json}"
    );
    assert!(json["cluster_upgrade"].is_null());
    assert!(!get("/metrics").contains("tandem_version_info"));

    let status = api::update::UpdateStatus {
        version: "1.2.0".into(),
        booted_slot: "a".into(),
        boot: api::update::Boot::Blessed,
        slots: Vec::new(),
        bad_versions: vec!["1.3.0".into()],
        install: Some(api::update::InstallStatus {
            phase: "writing".into(),
            done: 10,
            total: 40,
            started_unix_ms: 0,
            version: None,
            origin: String::new(),
            error: None,
        }),
    };
    std::fs::write(
        srv.run_dir().join(api::update::STATUS_FILE),
        serde_json::to_string(&status).unwrap(),
    )
    .unwrap();
    let json: serde_json::Value = serde_json::from_str(&get("/api/status")).unwrap();
    assert_eq!(json["update"]["version"], "1.2.0");
    assert_eq!(json["update"]["boot"]["state"], "blessed");
    let metrics = get("/metrics");
    for line in [
        "tandem_version_info{version=\"1.2.0\",slot=\"a\"} 1\n",
        "tandem_update_boot_blessed 1\n",
        "tandem_update_install_bytes{kind=\"done\"} 10\n",
        "tandem_update_install_bytes{kind=\"total\"} 40\n",
        "tandem_update_bad_versions 1\n",
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
    let page = get("/");
    assert!(page.contains("<td class=\"version\">1.2.0</td>"), "{page}");
}

fn files_in(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn the_cluster_upgrade_spools_only_a_verified_bundle() {
    let trusted = generate();
    let stranger = generate();
    let srv = server(&trusted, 64 * MIB as u64);
    let upgrade = srv.url("/api/cluster/upgrade?trial_timeout=60");
    let spool_dir = upgrade::upgrade_dir(&srv.state_dir());
    let payload = bytes(3 * MIB, 3);

    // Signed by a key the image does not trust: refused before anything is written.
    let (status, body) = post(&upgrade, &bundle(&stranger, "2.0.0", &payload));
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("signature"), "{body}");
    assert!(
        files_in(&spool_dir).is_empty(),
        "{:?}",
        files_in(&spool_dir)
    );

    // A flipped byte in the payload: refused at its chunk; the partial spool is removed.
    let mut flipped = bundle(&trusted, "2.0.0", &payload);
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x40;
    let (status, body) = post(&upgrade, &flipped);
    assert_eq!(status, 422, "{body}");
    assert!(
        files_in(&spool_dir).is_empty(),
        "{:?}",
        files_in(&spool_dir)
    );

    // Truncated: refused too.
    let good = bundle(&trusted, "2.0.0", &payload);
    let (status, body) = post(&upgrade, &good[..good.len() / 3]);
    assert_eq!(status, 422, "{body}");
    assert!(
        files_in(&spool_dir).is_empty(),
        "{:?}",
        files_in(&spool_dir)
    );

    // Only trial_timeout: a cluster upgrade always reboots and never forces.
    let (status, body) = post(&srv.url("/api/cluster/upgrade?force=1"), &good);
    assert_eq!(status, 400, "{body}");

    // A good bundle: spooled whole (0700 directory), and the upgrade starts.
    let (status, body) = post(&upgrade, &good);
    assert_eq!(status, 202, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["version"], "2.0.0");
    let files = files_in(&spool_dir);
    assert!(
        files.contains(&upgrade::SPOOL_FILE.to_string()),
        "{files:?}"
    );
    // No spool leftover (the record, written meanwhile, has a temporary file of its own).
    assert!(
        !files.iter().any(|f| f.starts_with("cluster.bundle.")),
        "{files:?}"
    );
    assert!(
        std::fs::read(spool_dir.join(upgrade::SPOOL_FILE)).unwrap() == good,
        "the spooled bundle differs from the upload"
    );
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&spool_dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    // One at a time.
    assert!(srv.ctx.upgrading.load(Ordering::SeqCst));
    let (status, body) = post(&upgrade, &good);
    assert_eq!(status, 409, "{body}");
    // The record is written at once (the peers cannot be reached here: no certificates).
    let record = upgrade::state_file(&srv.state_dir());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !record.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let state = upgrade::UpgradeState::read(&record).unwrap().unwrap();
    assert_eq!(state.version, "2.0.0");
    assert_eq!(
        state.nodes.last().map(|n| n.node.as_str()),
        Some(srv.ctx.node.name.as_str()),
        "this node last"
    );
}
