//! `appliance settings`, the real process: the first-boot setup over its socket (refusals leave
//! the store untouched; a good setup is stored once and asks the supervisor to re-plan),
//! logins, a later change applied to the running services, and a kill at any moment of a
//! setup leaving the store empty or complete.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::settings::{Answers, Change, Field, Request, Response, Secret, TlsChoice};

const APPLIANCE: &str = env!("CARGO_BIN_EXE_appliance");
const PASSWORD: &str = "correct-Horse-7-battery";
const CODE: &str = "1234-5678-9012";
const SECRET: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

/// A supervisor's control socket that answers `ok` to everything and records the requests.
struct FakeSupervisor {
    socket: PathBuf,
    seen: Arc<Mutex<Vec<api::control::Request>>>,
}

impl FakeSupervisor {
    fn start(dir: &Path) -> FakeSupervisor {
        let socket = dir.join("control.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let mut line = String::new();
                BufReader::new(&conn).read_line(&mut line).unwrap();
                log.lock()
                    .unwrap()
                    .push(serde_json::from_str(&line).unwrap());
                (&conn).write_all(b"{\"response\":\"ok\"}\n").unwrap();
            }
        });
        FakeSupervisor { socket, seen }
    }

    fn wait_for(&self, request: &api::control::Request) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.seen.lock().unwrap().contains(request) {
            assert!(Instant::now() < deadline, "no {request:?}: {:?}", self.seen);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

struct Service {
    child: Child,
    state: PathBuf,
    run: PathBuf,
}

impl Service {
    /// The service on `dir` with an empty seed (everything asked), the built-in cluster.
    fn start(dir: &Path, control: &Path) -> Service {
        let (state, run, seed) = (dir.join("state"), dir.join("run"), dir.join("seed"));
        for d in [&state, &run, &seed] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(
            run.join(api::settings::SETUP_CODE_FILE),
            format!("{CODE}\n"),
        )
        .unwrap();
        let _ = std::fs::remove_file(run.join(api::settings::SOCKET_FILE));
        let child = Command::new(APPLIANCE)
            .arg("settings")
            .args(["--state-dir".as_ref(), state.as_os_str()])
            .args(["--run-dir".as_ref(), run.as_os_str()])
            .args(["--seed-dir".as_ref(), seed.as_os_str()])
            .args(["--control-socket".as_ref(), control.as_os_str()])
            .spawn()
            .unwrap();
        let service = Service { child, state, run };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !service.socket().exists() {
            assert!(
                Instant::now() < deadline,
                "the settings service did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        service
    }

    fn socket(&self) -> PathBuf {
        self.run.join(api::settings::SOCKET_FILE)
    }

    fn ask(&self, request: &Request) -> Response {
        api::settings::request(&self.socket(), request, Duration::from_secs(30)).unwrap()
    }

    fn revision(&self) -> u64 {
        match self.ask(&Request::Status) {
            Response::Status(s) => s.revision,
            other => panic!("{other:?}"),
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

fn good_answers() -> Answers {
    Answers {
        node: Some("server1".into()),
        admin_password: Some(Secret::new(PASSWORD)),
        admin_password_confirm: Some(Secret::new(PASSWORD)),
        cluster_secret: Some(Secret::new(SECRET)),
        tls: Some(TlsChoice::SelfSigned),
        webhook: Some(String::new()),
    }
}

fn setup(code: &str, answers: Answers) -> Request {
    Request::Setup {
        setup_code: Secret::new(code),
        answers,
    }
}

fn invalid_fields(response: Response) -> Vec<Field> {
    match response {
        Response::Invalid { errors } => errors.iter().map(|e| e.field).collect(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn setup_refusals_store_nothing_and_a_good_setup_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let supervisor = FakeSupervisor::start(dir.path());
    let service = Service::start(dir.path(), &supervisor.socket);

    let Response::Status(status) = service.ask(&Request::Status) else {
        panic!()
    };
    assert!(!status.configured);
    assert_eq!(status.revision, 0);
    assert_eq!(status.nodes, ["server1", "server2"]);
    assert_eq!(status.asked.first(), Some(&Field::Node));
    assert_eq!(status.metrics_token, None);

    // A wrong code is refused before any answer is looked at.
    assert_eq!(
        invalid_fields(service.ask(&setup("1111-1111-1111", good_answers()))),
        [Field::SetupCode]
    );
    // Wrong answers: each on its field.
    let mut bad = good_answers();
    bad.node = Some("server9".into());
    bad.admin_password = Some(Secret::new("weak"));
    bad.tls = Some(TlsChoice::Upload {
        certificate: "-----BEGIN CERTIFICATE-----\nxx\n-----END CERTIFICATE-----\n".into(),
        key: Secret::new("nope"),
    });
    assert_eq!(
        invalid_fields(service.ask(&setup(CODE, bad))),
        [
            Field::Node,
            Field::AdminPassword,
            Field::TlsCertificate,
            Field::TlsKey
        ]
    );
    assert_eq!(service.revision(), 0, "a refusal stored something");
    assert_eq!(
        service.ask(&Request::Login {
            password: Secret::new(PASSWORD)
        }),
        Response::Denied,
        "a login before setup"
    );
    assert!(supervisor.seen.lock().unwrap().is_empty());

    // The code is compared by its digits: dashes and spaces do not matter.
    assert_eq!(
        service.ask(&setup("1234 5678 9012", good_answers())),
        Response::Applied {
            cluster_secret: None
        }
    );
    supervisor.wait_for(&api::control::Request::Reconfigure);
    let Response::Status(status) = service.ask(&Request::Status) else {
        panic!()
    };
    assert!(status.configured);
    assert_eq!(status.revision, 1);
    assert_eq!(status.node.as_deref(), Some("server1"));
    assert!(status.asked.is_empty());
    assert_eq!(status.metrics_token.unwrap().expose().len(), 64);
    // Setup happens once.
    assert!(matches!(
        service.ask(&setup(CODE, good_answers())),
        Response::Error { .. }
    ));
    // Logins check the stored hash.
    let login = |p: &str| {
        service.ask(&Request::Login {
            password: Secret::new(p),
        })
    };
    assert_eq!(login(PASSWORD), Response::Ok);
    assert_eq!(login("correct-Horse-7-batterx"), Response::Denied);

    // The store is root's alone, in a private directory.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(service.state.join("settings")), 0o700);
}

#[test]
fn a_change_is_applied_to_the_running_services() {
    let dir = tempfile::tempdir().unwrap();
    let supervisor = FakeSupervisor::start(dir.path());
    let service = Service::start(dir.path(), &supervisor.socket);
    let mut answers = good_answers();
    answers.cluster_secret = Some(Secret::new("generate"));
    let generated = match service.ask(&setup(CODE, answers)) {
        Response::Applied {
            cluster_secret: Some(secret),
        } => secret,
        other => panic!("{other:?}"),
    };
    assert_eq!(generated.expose().len(), 64);

    // A certificate: written where the balancer reads it, the balancer reloaded.
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["www.example.test".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let change = Change {
        tls: Some(TlsChoice::Upload {
            certificate: cert.pem(),
            key: Secret::new(key.serialize_pem()),
        }),
        webhook: Some("https://hooks.example.test/x".into()),
        ..Change::default()
    };
    std::fs::create_dir_all(service.run.join("served-tls")).unwrap();
    assert_eq!(
        service.ask(&Request::Change { change }),
        Response::Applied {
            cluster_secret: None
        }
    );
    assert_eq!(
        std::fs::read_to_string(service.run.join("served-tls/certificate.pem")).unwrap(),
        cert.pem()
    );
    assert_eq!(
        std::fs::read_to_string(service.run.join("webhook")).unwrap(),
        "https://hooks.example.test/x\n"
    );
    supervisor.wait_for(&api::control::Request::Signal {
        service: "balancer".into(),
        signal: "HUP".into(),
    });
    supervisor.wait_for(&api::control::Request::Restart {
        service: "logmon".into(),
    });
    let Response::Status(status) = service.ask(&Request::Status) else {
        panic!()
    };
    assert_eq!(status.revision, 2);
    assert_eq!(status.certificate.unwrap().names, ["www.example.test"]);

    // A password change needs the current password; a refused one changes nothing.
    let new = "another-Strong-9-phrase";
    let change = |current: &str| Request::Change {
        change: Change {
            current_password: Some(Secret::new(current)),
            admin_password: Some(Secret::new(new)),
            admin_password_confirm: Some(Secret::new(new)),
            ..Change::default()
        },
    };
    assert_eq!(
        invalid_fields(service.ask(&change("guess-Wrong-1"))),
        [Field::CurrentPassword]
    );
    assert_eq!(service.revision(), 2);
    assert!(matches!(
        service.ask(&change(PASSWORD)),
        Response::Applied { .. }
    ));
    let login = |p: &str| {
        service.ask(&Request::Login {
            password: Secret::new(p),
        })
    };
    assert_eq!(login(new), Response::Ok);
    assert_eq!(login(PASSWORD), Response::Denied);
    // Back to the balancer's own certificate: the uploaded files go.
    let change = Request::Change {
        change: Change {
            tls: Some(TlsChoice::SelfSigned),
            ..Change::default()
        },
    };
    assert!(matches!(service.ask(&change), Response::Applied { .. }));
    assert!(!service.run.join("served-tls/key.pem").exists());
}

/// The service killed (SIGKILL) at a spread of moments after a setup was sent: each time the
/// store, opened again, holds nothing or the complete settings.
#[test]
fn a_kill_during_a_setup_leaves_nothing_or_everything() {
    let dir = tempfile::tempdir().unwrap();
    let supervisor = FakeSupervisor::start(dir.path());
    // How long one setup takes here (argon2 dominates), to spread the kills across it.
    let timing = dir.path().join("timing");
    std::fs::create_dir_all(&timing).unwrap();
    let service = Service::start(&timing, &supervisor.socket);
    let started = Instant::now();
    assert!(matches!(
        service.ask(&setup(CODE, good_answers())),
        Response::Applied { .. }
    ));
    let took = started.elapsed().as_millis() as u64;
    drop(service);
    let mut outcomes = Vec::new();
    for tenth in [0u64, 2, 4, 6, 8, 9, 10, 11, 12, 15, 20] {
        let delay_ms = took * tenth / 10;
        let case = dir.path().join(format!("case-{delay_ms}"));
        std::fs::create_dir_all(&case).unwrap();
        let mut service = Service::start(&case, &supervisor.socket);
        let socket = service.socket();
        let sender = std::thread::spawn(move || {
            api::settings::request(
                &socket,
                &setup(CODE, good_answers()),
                Duration::from_secs(30),
            )
        });
        std::thread::sleep(Duration::from_millis(delay_ms));
        service.kill();
        let _ = sender.join();
        let store = case.join("state");
        // Opened again by a new service: empty (wizard) or complete (configured).
        let again = Service::start(&case, &supervisor.socket);
        let Response::Status(status) = again.ask(&Request::Status) else {
            panic!()
        };
        match status.revision {
            0 => assert!(!status.configured && !status.asked.is_empty()),
            1 => {
                assert!(status.configured && status.node.as_deref() == Some("server1"));
                assert_eq!(
                    again.ask(&Request::Login {
                        password: Secret::new(PASSWORD)
                    }),
                    Response::Ok
                );
            }
            other => panic!("revision {other} after one setup"),
        }
        outcomes.push((delay_ms, status.configured));
        drop(again);
        assert!(store.join("settings/settings.db").exists());
    }
    eprintln!("a setup takes {took} ms; kill delay (ms) → configured: {outcomes:?}");
    // The spread reached both sides: killed before the commit and after it.
    assert!(
        outcomes.iter().any(|o| !o.1) && outcomes.iter().any(|o| o.1),
        "{outcomes:?}"
    );
}

/// A full disk during a setup: the service answers with the error, and once space is back the
/// store still holds nothing (the wizard asks again); the next setup succeeds.
#[test]
fn a_full_disk_during_a_setup_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let supervisor = FakeSupervisor::start(dir.path());
    let disk = dir.path().join("disk");
    std::fs::create_dir_all(&disk).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tandem-test"])
        .arg(&disk)
        .status()
        .unwrap();
    assert!(
        mounted.success(),
        "mounting a small tmpfs (the test needs root)"
    );
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(disk.clone());
    let service = Service::start(&disk, &supervisor.socket);
    // Fill what is left.
    let filler = disk.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=4k"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();
    match service.ask(&setup(CODE, good_answers())) {
        Response::Error { message } => {
            assert!(message.contains("full"), "{message}")
        }
        other => panic!("a setup on a full disk: {other:?}"),
    }
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(
        service.revision(),
        0,
        "a failed setup left something stored"
    );
    assert!(
        supervisor.seen.lock().unwrap().is_empty(),
        "re-planned after a failed setup"
    );
    assert!(matches!(
        service.ask(&setup(CODE, good_answers())),
        Response::Applied { .. }
    ));
    assert_eq!(service.revision(), 1);
}
