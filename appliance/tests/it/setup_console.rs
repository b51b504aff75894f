//! `appliance setup-console` over pipes, against a settings service on a temporary socket that
//! answers with the real validation (`cluster_config::settings::setup`): answers typed line by
//! line, a weak password refused and asked again, an uploaded certificate pasted, then applied.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::settings::{Field, FieldError, Request, Response, Status};
use cluster_config::settings::{self, Fresh, SeedSettings};

const CODE: &str = "1234-5678-9012";

/// Serves the settings protocol on `socket` for a generic image of the default cluster (the
/// seed holds nothing), until the process ends.
fn fake_settings_service(socket: &Path) -> Arc<AtomicBool> {
    let listener = UnixListener::bind(socket).unwrap();
    let configured = Arc::new(AtomicBool::new(false));
    let done = configured.clone();
    std::thread::spawn(move || {
        let cluster = cluster_config::Cluster::default_cluster();
        let seed = SeedSettings::default();
        let mut node = None;
        for stream in listener.incoming() {
            let stream = stream.unwrap();
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line).unwrap();
            let response = match serde_json::from_str::<Request>(&line).unwrap() {
                Request::Status => Response::Status(Status {
                    configured: done.load(Ordering::SeqCst),
                    revision: u64::from(done.load(Ordering::SeqCst)),
                    cluster: cluster.name.clone(),
                    node: node.clone(),
                    nodes: cluster.nodes.iter().map(|n| n.name.clone()).collect(),
                    asked: settings::asked(&seed),
                    certificate: None,
                    webhook: None,
                    metrics_token: None,
                }),
                Request::Setup { setup_code, .. } if setup_code.expose() != CODE => {
                    Response::Invalid {
                        errors: vec![FieldError {
                            field: Field::SetupCode,
                            message: "does not match".into(),
                        }],
                    }
                }
                Request::Setup { answers, .. } => {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_secs() as i64;
                    let fresh = Fresh {
                        salt: [7; 16],
                        cluster_secret: [0xab; 32],
                        metrics_token: [0xcd; 32],
                    };
                    match settings::setup(&cluster, &seed, &answers, now, &fresh) {
                        Ok((stored, generated)) => {
                            node = Some(stored.node);
                            done.store(true, Ordering::SeqCst);
                            Response::Applied {
                                cluster_secret: generated,
                            }
                        }
                        Err(errors) => Response::Invalid { errors },
                    }
                }
                _ => Response::Error {
                    message: "not in this test".into(),
                },
            };
            let mut answer = serde_json::to_string(&response).unwrap();
            answer.push('\n');
            (&stream).write_all(answer.as_bytes()).unwrap();
        }
    });
    configured
}

/// The wizard as a child on pipes, its output collected by a thread.
struct Wizard {
    child: Child,
    /// `None` once closed.
    stdin: Option<ChildStdin>,
    output: Arc<Mutex<String>>,
    /// How far [`Wizard::expect`] has read.
    seen: usize,
}

impl Wizard {
    fn start(socket: &Path, code_file: &Path) -> Wizard {
        let mut child = Command::new(env!("CARGO_BIN_EXE_appliance"))
            .arg("setup-console")
            .arg("--settings-socket")
            .arg(socket)
            .arg("--setup-code-file")
            .arg(code_file)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let mut stdout = child.stdout.take().unwrap();
        let output = Arc::new(Mutex::new(String::new()));
        let sink = output.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stdout.read(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Wizard {
            child,
            stdin,
            output,
            seen: 0,
        }
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Waits for `text` after what was already expected; returns what came before it.
    fn expect(&mut self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let output = self.output();
            if let Some(at) = output[self.seen..].find(text) {
                let before = output[self.seen..self.seen + at].to_string();
                self.seen += at + text.len();
                return before;
            }
            assert!(
                Instant::now() < deadline,
                "no {text:?} from the wizard; its output:\n{output}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn answer(&mut self, prompt: &str, line: &str) {
        self.expect(prompt);
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    fn exit_code(&mut self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the wizard did not exit; its output:\n{}", self.output());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Wizard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_console_wizard_asks_rejects_a_weak_password_and_applies() {
    let dir = tempfile::tempdir().unwrap();
    let socket: PathBuf = dir.path().join(api::settings::SOCKET_FILE);
    let code_file = dir.path().join(api::settings::SETUP_CODE_FILE);
    std::fs::write(&code_file, format!("{CODE}\n")).unwrap();
    let uploaded = rcgen::generate_simple_self_signed(vec!["www.tandem.test".to_string()]).unwrap();
    let (cert_pem, key_pem) = (uploaded.cert.pem(), uploaded.key_pair.serialize_pem());

    // The wizard comes up before the service does, and waits for it.
    let mut wizard = Wizard::start(&socket, &code_file);
    wizard.expect("[setup] waiting for the settings service\n");
    let configured = fake_settings_service(&socket);

    wizard.expect("[setup] Tandem first-boot setup for cluster tandem\n");
    let node_help = wizard.expect("node> ");
    assert!(
        node_help.contains("[setup] This machine is node (")
            && node_help.contains("one of server1, server2)"),
        "{node_help}"
    );
    wizard.answer("", "server1\n");
    wizard.answer("admin_password> ", "Tiny9\r\n");
    wizard.answer("admin_password_confirm> ", "Tiny9\r");
    wizard.answer("cluster_secret> ", "generate\n");
    wizard.answer("tls> ", "upload\n");
    // The certificate with CR line ends (a terminal's), the key with LF; each ended by an
    // empty line.
    wizard.answer(
        "tls_certificate> ",
        &format!("{}\r", cert_pem.replace('\n', "\r")),
    );
    wizard.answer("tls_key> ", &format!("{}\n\n", key_pem.trim_end()));
    wizard.answer("webhook> ", "\n");

    wizard.expect("[setup] checking the answers\n");
    wizard.expect("[setup] error on admin_password: too short: 5 characters, at least 12\n");
    let asked_again = wizard.expect("admin_password> ");
    assert!(
        !asked_again.contains("node>") && !asked_again.contains("error on"),
        "only the password is asked again: {asked_again}"
    );
    wizard.answer("", "Sturdy-Enough-Pass 9\n");
    wizard.answer("admin_password_confirm> ", "Sturdy-Enough-Pass 9\n");
    let between = wizard.expect("[setup] applied: this machine is server1\n");
    assert!(
        !between.contains("> "),
        "nothing else asked again (the certificate kept): {between}"
    );
    wizard.expect(&format!("[setup] cluster secret: {}\n", "ab".repeat(32)));
    assert_eq!(wizard.exit_code(), Some(0), "{}", wizard.output());
    assert!(configured.load(Ordering::SeqCst));

    let output = wizard.output();
    let key_body = key_pem.lines().nth(1).unwrap();
    for secret in ["Tiny9", "Sturdy-Enough-Pass", key_body, CODE] {
        assert!(!output.contains(secret), "{secret:?} printed:\n{output}");
    }

    // Started again on a configured node: one line, done.
    let mut again = Wizard::start(&socket, &code_file);
    again.expect("[setup] this node is set up: it is server1 of cluster tandem\n");
    assert_eq!(again.exit_code(), Some(0), "{}", again.output());
}

#[test]
fn a_closed_input_stops_the_wizard() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join(api::settings::SOCKET_FILE);
    let code_file = dir.path().join(api::settings::SETUP_CODE_FILE);
    fake_settings_service(&socket);
    let mut wizard = Wizard::start(&socket, &code_file);
    wizard.answer("node> ", "server9\n");
    drop(wizard.stdin.take());
    wizard.expect("[setup] end of input: the wizard stops\n");
    assert_eq!(wizard.exit_code(), Some(1), "{}", wizard.output());
}
