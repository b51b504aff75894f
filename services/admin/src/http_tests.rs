//! The admin port's update endpoints against a fake update service (a Unix socket server
//! speaking [`api::update`]'s protocol): the upload streamed through and its answers, the peer
//! API closed to non-peers, the cluster upgrade's spool refusing bad bundles before writing.
//! A fake settings service (speaking [`api::settings`] with the real validation of
//! `cluster_config::settings`) answers the logins; the tests of the login and the wizard
//! themselves are in `login_tests`.

use std::io::{BufRead as _, Read, Write as _};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::settings::{Request as SettingsRequest, Response as SettingsResponse};
use api::update::{Event, Request as UpdateRequest};
use cluster_config::settings::{Fresh, SeedSettings, Settings};

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

/// Sends a POST of `path` declaring `content_length` but only `body` (with the session's
/// cookie and CSRF header), then waits for the answer without sending more; returns its
/// status line.
fn post_partial(
    addr: SocketAddr,
    auth: &Auth,
    path: &str,
    content_length: u64,
    body: &[u8],
) -> String {
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
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {content_length}\r\n\
         Cookie: {}\r\nX-CSRF-Token: {}\r\n\r\n",
        auth.cookie, auth.csrf
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

/// The admin password of the fake settings service's node.
pub(crate) const PASSWORD: &str = "correct-Horse-7-battery";
/// The wizard's setup code the fake settings service takes.
pub(crate) const SETUP_CODE: &str = "1234-5678-9012";

/// The random bytes the fake settings service uses.
fn fresh() -> Fresh {
    Fresh {
        salt: [7; 16],
        cluster_secret: [0xab; 32],
        metrics_token: [0xcd; 32],
    }
}

/// `/metrics`'s bearer token once the fake service is set up.
pub(crate) fn metrics_token() -> String {
    "cd".repeat(32)
}

fn now_unix() -> i64 {
    (unix_ms() / 1000) as i64
}

/// A configured node's settings: [`PASSWORD`], self-signed, no webhook (hashed once: argon2 is
/// slow in a debug build).
pub(crate) fn configured() -> Settings {
    static SETTINGS: std::sync::OnceLock<Settings> = std::sync::OnceLock::new();
    SETTINGS
        .get_or_init(|| {
            let answers = api::settings::Answers {
                node: Some("server1".into()),
                admin_password: Some(api::settings::Secret::new(PASSWORD)),
                admin_password_confirm: Some(api::settings::Secret::new(PASSWORD)),
                cluster_secret: Some(api::settings::Secret::new("generate")),
                tls: Some(api::settings::TlsChoice::SelfSigned),
                webhook: Some(String::new()),
            };
            let cluster = Cluster::default_cluster();
            let seed = SeedSettings::default();
            cluster_config::settings::setup(&cluster, &seed, &answers, now_unix(), &fresh())
                .unwrap()
                .0
        })
        .clone()
}

/// A settings service in a thread: the real validation over settings in memory, the setup
/// code [`SETUP_CODE`].
pub(crate) struct FakeSettings {
    cluster: Cluster,
    seed: SeedSettings,
    state: Mutex<FakeState>,
}

struct FakeState {
    settings: Option<Settings>,
    revision: u64,
    /// Password checks asked for.
    logins: u32,
}

impl FakeSettings {
    pub(crate) fn revision(&self) -> u64 {
        self.state.lock().unwrap().revision
    }
    pub(crate) fn logins(&self) -> u32 {
        self.state.lock().unwrap().logins
    }
    pub(crate) fn settings(&self) -> Option<Settings> {
        self.state.lock().unwrap().settings.clone()
    }

    fn answer(&self, request: SettingsRequest) -> SettingsResponse {
        let mut state = self.state.lock().unwrap();
        match request {
            SettingsRequest::Status => {
                let s = state.settings.as_ref();
                SettingsResponse::Status(api::settings::Status {
                    configured: s.is_some(),
                    revision: state.revision,
                    cluster: self.cluster.name.clone(),
                    node: s.map(|s| s.node.clone()).or(self.seed.node.clone()),
                    nodes: self.cluster.nodes.iter().map(|n| n.name.clone()).collect(),
                    asked: match s {
                        Some(_) => Vec::new(),
                        None => cluster_config::settings::asked(&self.seed),
                    },
                    certificate: s
                        .and_then(|s| s.uploaded_tls())
                        .and_then(|(c, _)| cluster_config::settings::certificate_info(c)),
                    webhook: s.and_then(|s| s.webhook.clone()),
                    metrics_token: s.map(|s| s.metrics_token.clone()),
                })
            }
            SettingsRequest::Setup {
                setup_code,
                answers,
            } => {
                if state.settings.is_some() {
                    return SettingsResponse::Error {
                        message: "this node is configured already".into(),
                    };
                }
                if setup_code.expose() != SETUP_CODE {
                    return SettingsResponse::Invalid {
                        errors: vec![api::settings::FieldError {
                            field: api::settings::Field::SetupCode,
                            message: "wrong setup code".into(),
                        }],
                    };
                }
                match cluster_config::settings::setup(
                    &self.cluster,
                    &self.seed,
                    &answers,
                    now_unix(),
                    &fresh(),
                ) {
                    Ok((settings, cluster_secret)) => {
                        state.settings = Some(settings);
                        state.revision += 1;
                        SettingsResponse::Applied { cluster_secret }
                    }
                    Err(errors) => SettingsResponse::Invalid { errors },
                }
            }
            SettingsRequest::Change { change } => {
                let Some(current) = &state.settings else {
                    return SettingsResponse::Error {
                        message: "not configured".into(),
                    };
                };
                match cluster_config::settings::change(
                    &self.cluster,
                    current,
                    &change,
                    now_unix(),
                    &fresh(),
                ) {
                    Ok(next) => {
                        state.settings = Some(next);
                        state.revision += 1;
                        SettingsResponse::Applied {
                            cluster_secret: None,
                        }
                    }
                    Err(errors) => SettingsResponse::Invalid { errors },
                }
            }
            SettingsRequest::Login { password } => {
                state.logins += 1;
                let hash = state
                    .settings
                    .as_ref()
                    .map(|s| s.admin_password_hash.clone());
                drop(state);
                match hash {
                    Some(hash)
                        if cluster_config::settings::verify_password(&hash, password.expose()) =>
                    {
                        SettingsResponse::Ok
                    }
                    _ => SettingsResponse::Denied,
                }
            }
        }
    }
}

/// Serves [`FakeSettings`] on `socket`: `settings` stored already (configured), or none (the
/// wizard's node, asking what `seed` lacks).
pub(crate) fn fake_settings(
    socket: &Path,
    seed: SeedSettings,
    settings: Option<Settings>,
) -> Arc<FakeSettings> {
    let listener = UnixListener::bind(socket).unwrap();
    let fake = Arc::new(FakeSettings {
        cluster: Cluster::default_cluster(),
        seed,
        state: Mutex::new(FakeState {
            revision: u64::from(settings.is_some()),
            settings,
            logins: 0,
        }),
    });
    let shared = fake.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let fake = shared.clone();
            let mut conn = conn.unwrap();
            std::thread::spawn(move || {
                let mut line = String::new();
                std::io::BufReader::new(conn.try_clone().unwrap())
                    .read_line(&mut line)
                    .unwrap();
                let request: SettingsRequest = serde_json::from_str(&line).unwrap();
                let mut answer = serde_json::to_string(&fake.answer(request)).unwrap();
                answer.push('\n');
                let _ = conn.write_all(answer.as_bytes());
            });
        }
    });
    fake
}

/// A logged-in session: the `Cookie` header and its CSRF token.
pub(crate) struct Auth {
    pub(crate) cookie: String,
    pub(crate) csrf: String,
}

pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    root: tempfile::TempDir,
    ctx: Arc<Ctx>,
    pub(crate) settings: Option<Arc<FakeSettings>>,
}

impl Server {
    fn run_dir(&self) -> PathBuf {
        self.root.path().join("run")
    }
    fn state_dir(&self) -> PathBuf {
        self.root.path().join("state")
    }
    pub(crate) fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }

    /// Logs in with [`PASSWORD`] as a browser does.
    pub(crate) fn login(&self) -> Auth {
        let mut browser = Browser::new(self);
        let answer = browser.login(PASSWORD);
        assert_eq!(answer.status, 303, "{}", answer.body);
        let session = browser.get("/api/session");
        assert_eq!(session.status, 200, "{}", session.body);
        let json: serde_json::Value = serde_json::from_str(&session.body).unwrap();
        Auth {
            cookie: browser.cookie_header(),
            csrf: json["csrf"].as_str().unwrap().to_string(),
        }
    }

    /// A POST with a session: `(status, body)`.
    fn post(&self, auth: &Auth, url: &str, body: &[u8]) -> (u16, String) {
        let mut resp = client()
            .post(url)
            .header("Cookie", &auth.cookie)
            .header("X-CSRF-Token", &auth.csrf)
            .send(body)
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.body_mut().read_to_string().unwrap())
    }
}

/// What a request got back.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: String,
}

impl Answer {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn from_response(mut resp: ureq::http::Response<ureq::Body>) -> Answer {
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        Answer {
            status: resp.status().as_u16(),
            headers,
            body: resp.body_mut().read_to_string().unwrap(),
        }
    }
}

/// A browser's part that matters here: cookies kept between requests, forms posted.
pub(crate) struct Browser {
    base: String,
    cookies: Vec<(String, String)>,
}

impl Browser {
    pub(crate) fn new(srv: &Server) -> Browser {
        Browser::at(srv.addr)
    }

    pub(crate) fn at(addr: SocketAddr) -> Browser {
        Browser {
            base: format!("https://{addr}"),
            cookies: Vec::new(),
        }
    }

    pub(crate) fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    pub(crate) fn cookie(&self, name: &str) -> Option<&str> {
        self.cookies
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn keep(&mut self, answer: &Answer) {
        for (k, v) in &answer.headers {
            if !k.eq_ignore_ascii_case("set-cookie") {
                continue;
            }
            let (pair, attributes) = v.split_once(';').unwrap_or((v, ""));
            let (name, value) = pair.split_once('=').unwrap();
            self.cookies.retain(|(k, _)| k != name);
            if !attributes.contains("Max-Age=0") {
                self.cookies.push((name.to_string(), value.to_string()));
            }
        }
    }

    pub(crate) fn get(&mut self, path: &str) -> Answer {
        let mut req = client().get(&format!("{}{path}", self.base));
        if !self.cookies.is_empty() {
            req = req.header("Cookie", &self.cookie_header());
        }
        let answer = Answer::from_response(req.call().unwrap());
        self.keep(&answer);
        answer
    }

    pub(crate) fn post_form(&mut self, path: &str, fields: &[(&str, &str)]) -> Answer {
        let mut req = client().post(&format!("{}{path}", self.base));
        if !self.cookies.is_empty() {
            req = req.header("Cookie", &self.cookie_header());
        }
        let answer = Answer::from_response(req.send_form(fields.iter().copied()).unwrap());
        self.keep(&answer);
        answer
    }

    /// The login page's form, then the password.
    pub(crate) fn login(&mut self, password: &str) -> Answer {
        let page = self.get("/login");
        assert_eq!(page.status, 200, "{}", page.body);
        let token = hidden_csrf(&page.body);
        self.post_form("/login", &[("csrf", &token), ("password", password)])
    }
}

/// The value of the form's hidden `csrf` field.
pub(crate) fn hidden_csrf(html: &str) -> String {
    let (_, rest) = html.split_once("name=\"csrf\" value=\"").unwrap();
    rest.split_once('"').unwrap().0.to_string()
}

/// An admin server on 127.0.0.1 with a self-signed certificate (no peer can call in), its
/// update keyring holding `trusted`, uploads capped at `max_bytes`, its node configured with
/// [`PASSWORD`] (a fake settings service).
fn server(trusted: &Key, max_bytes: u64) -> Server {
    full_server(trusted, max_bytes, Some(configured()))
}

/// An admin server as [`server`]; with `settings`, a fake settings service holding them,
/// without, no settings service at all.
pub(crate) fn full_server(trusted: &Key, max_bytes: u64, settings: Option<Settings>) -> Server {
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
        settings_socket: root.path().join("run").join(api::settings::SOCKET_FILE),
    };
    let fake = settings.map(|settings| {
        fake_settings(
            &config.settings_socket,
            SeedSettings::default(),
            Some(settings),
        )
    });
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
            let _ = serve_full(listener, tls, served).await;
        });
    });
    Server {
        addr,
        root,
        ctx,
        settings: fake,
    }
}

/// A client that takes the server's self-signed certificate and follows no redirect.
pub(crate) fn client() -> ureq::Agent {
    let tls = ureq::tls::TlsConfig::builder()
        .disable_verification(true)
        .build();
    ureq::Agent::config_builder()
        .tls_config(tls)
        .timeout_global(Some(Duration::from_secs(60)))
        .http_status_as_error(false)
        .max_redirects(0)
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
pub(crate) struct Key {
    private: String,
    public: String,
}

pub(crate) fn generate() -> Key {
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
    let auth = srv.login();
    let install = srv.url("/api/update/install?force=1&reboot=0&trial_timeout=120");
    let post = |url: &str, body: &[u8]| srv.post(&auth, url, body);

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
        .header("Cookie", &auth.cookie)
        .header("X-CSRF-Token", &auth.csrf)
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
    let line = post_partial(srv.addr, &auth, path, 8 * MIB as u64 + 1, b"");
    assert!(line.starts_with("HTTP/1.1 413"), "{line}");
    // …or cut off when it has none.
    let big = bytes(8 * MIB + 1, 2);
    let mut resp = client()
        .post(&install)
        .header("Cookie", &auth.cookie)
        .header("X-CSRF-Token", &auth.csrf)
        .send(ureq::SendBody::from_owned_reader(std::io::Cursor::new(big)))
        .unwrap();
    assert_eq!(resp.status().as_u16(), 413);
    let body = resp.body_mut().read_to_string().unwrap();
    assert!(body.contains("at most 8388608 bytes"), "{body}");

    // A client that stops sending is cut off; the service sees the bundle end early.
    let started = std::time::Instant::now();
    let line = post_partial(srv.addr, &auth, path, 1000, &[7u8; 10]);
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
    let resp = client()
        .get(&install)
        .header("Cookie", &auth.cookie)
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 405);
}

#[test]
fn the_peer_update_api_refuses_clients_that_are_not_peers() {
    let key = generate();
    let srv = server(&key, 8 * MIB as u64);
    let fake = fake_update_service(&srv.run_dir().join(api::update::SOCKET_FILE));
    let (status, body) = post(&srv.url("/api/peer/update?reboot=1"), b"bundle");
    assert_eq!(status, 403, "{body}");
    // A logged-in admin is no peer either.
    let auth = srv.login();
    let (status, body) = srv.post(&auth, &srv.url("/api/peer/update?reboot=1"), b"bundle");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("client certificate"), "{body}");
    assert!(fake.seen.lock().unwrap().is_empty());
    for path in ["/api/peer/update-status", "/api/peer/health"] {
        let resp = client()
            .get(&srv.url(path))
            .header("Cookie", &auth.cookie)
            .call()
            .unwrap();
        assert_eq!(resp.status().as_u16(), 403, "{path}");
    }
}

#[test]
fn the_status_json_and_metrics_carry_the_update_state() {
    let key = generate();
    let srv = server(&key, 8 * MIB as u64);
    let auth = srv.login();
    let get = |path: &str| {
        client()
            .get(&srv.url(path))
            .header("Cookie", &auth.cookie)
            .header("Authorization", &format!("Bearer {}", metrics_token()))
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
    let auth = srv.login();
    let post = |url: &str, body: &[u8]| srv.post(&auth, url, body);
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
