//! A real MariaDB server (its own datadir, TLS from a test CA, the application's account
//! REQUIRE SSL), the application served in-process against it, and a raw HTTP/1.1 client that
//! controls its connections.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub(crate) const INSTALL_DB: &str = "/usr/bin/mariadb-install-db";
pub(crate) const MARIADBD: &str = "/usr/sbin/mariadbd";
pub(crate) const CLIENT: &str = "/usr/bin/mariadb";
pub(crate) const APP_USER: &str = "tandem_app";
pub(crate) const APP_PASSWORD: &str = "app-password";

/// A certificate authority and a server certificate for 127.0.0.1 signed by it (PEM).
pub(crate) struct Pki {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

impl Pki {
    pub(crate) fn new() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "test cluster CA");
        let ca = ca.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut server = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        server
            .distinguished_name
            .push(DnType::CommonName, "127.0.0.1");
        let cert = server.signed_by(&key, &ca, &ca_key).unwrap();
        Pki {
            ca: ca.pem(),
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One mariadbd on 127.0.0.1, killed when dropped.
pub(crate) struct MariaDb {
    pub dir: PathBuf,
    pub port: u16,
    child: Child,
}

impl MariaDb {
    /// Installs a datadir under `dir` and starts the server with `pki`'s certificate; the
    /// application's account and database exist once this returns.
    pub(crate) fn start(dir: &Path, pki: &Pki) -> MariaDb {
        for program in [INSTALL_DB, MARIADBD, CLIENT] {
            assert!(
                Path::new(program).exists(),
                "{program} is missing: install mariadb-server (scripts/setup-host)"
            );
        }
        // Its own temporary directory: servers installed at once collide in a shared /tmp.
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let port = free_port();
        let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_string();
        for (name, text) in [
            ("ca.pem", &pki.ca),
            ("cert.pem", &pki.cert),
            ("key.pem", &pki.key),
        ] {
            std::fs::write(dir.join(name), text).unwrap();
        }
        let conf = dir.join("my.cnf");
        std::fs::write(
            &conf,
            format!(
                "[mariadbd]\nuser = {user}\ndatadir = {d}/data\nsocket = {d}/mysqld.sock\npid-file = {d}/mysqld.pid\n\
                 tmpdir = {d}/tmp\nbind-address = 127.0.0.1\nport = {port}\nskip-name-resolve\nskip-log-bin\n\
                 innodb_buffer_pool_size = 64M\nperformance_schema = OFF\n\
                 ssl_ca = {d}/ca.pem\nssl_cert = {d}/cert.pem\nssl_key = {d}/key.pem\ntls_version = TLSv1.2,TLSv1.3\n",
                d = dir.display()
            ),
        )
        .unwrap();
        let install = Command::new(INSTALL_DB)
            .arg(format!("--defaults-file={}", conf.display()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"])
            .arg(format!("--datadir={}/data", dir.display()))
            .output()
            .unwrap();
        assert!(
            install.status.success(),
            "mariadb-install-db: {}",
            String::from_utf8_lossy(&install.stderr)
        );
        let log = std::fs::File::create(dir.join("mariadbd.log")).unwrap();
        let child = Command::new(MARIADBD)
            .arg(format!("--defaults-file={}", conf.display()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let db = MariaDb {
            dir: dir.to_path_buf(),
            port,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while db.try_root("SELECT 1").is_err() {
            assert!(
                Instant::now() < deadline,
                "mariadbd did not start:\n{}",
                db.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        db.root(&format!(
            "CREATE DATABASE app; CREATE USER '{APP_USER}'@'%' IDENTIFIED BY '{APP_PASSWORD}' REQUIRE SSL; \
             GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, ALTER, INDEX, DROP ON app.* TO '{APP_USER}'@'%';"
        ));
        db
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mariadbd.log")).unwrap_or_default()
    }

    fn try_root(&self, sql: &str) -> Result<String, String> {
        let out = Command::new(CLIENT)
            .arg(format!("--socket={}/mysqld.sock", self.dir.display()))
            .args(["-uroot", "--batch", "--raw", "--skip-column-names"])
            .args(["--default-character-set=utf8mb4", "-e", sql])
            .output()
            .map_err(|e| e.to_string())?;
        match out.status.success() {
            true => Ok(String::from_utf8_lossy(&out.stdout).trim().to_string()),
            false => Err(String::from_utf8_lossy(&out.stderr).to_string()),
        }
    }

    /// Runs `sql` as root over the socket; its output (no column names).
    pub(crate) fn root(&self, sql: &str) -> String {
        self.try_root(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}\n{}", self.log()))
    }

    /// The application account's connections to this server.
    pub(crate) fn app_connections(&self) -> usize {
        self.root(&format!(
            "SELECT COUNT(*) FROM information_schema.processlist WHERE user = '{APP_USER}'"
        ))
        .parse()
        .unwrap()
    }

    /// The notes' bodies stored here (none when the table does not exist).
    pub(crate) fn bodies(&self) -> Vec<String> {
        match self.try_root("SELECT body FROM app.notes ORDER BY id") {
            Ok(out) => out.lines().map(str::to_string).collect(),
            Err(e) if e.contains("1146") => Vec::new(),
            Err(e) => panic!("{e}"),
        }
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The agent's status naming `port` on 127.0.0.1 as the primary.
pub(crate) fn agent_status(role: &str, port: u16) -> String {
    serde_json::json!({
        "node": "server1",
        "role": role,
        "primary": {"name": format!("db-{port}"), "address": "127.0.0.1", "port": port},
        "healthy": true,
        "error": null,
        "lag_s": 0,
        "read_only": role == "replica",
        "io_running": null,
        "sql_running": null,
        "gtid_current_pos": null,
        "gtid_slave_pos": null,
        "gtid_binlog_pos": null,
        "updated_ms": 1
    })
    .to_string()
}

/// The application, served in-process on 127.0.0.1 until dropped.
pub(crate) struct App {
    pub addr: SocketAddr,
    _runtime: tokio::runtime::Runtime,
}

impl App {
    /// The application reading from `local_host:local_port`, the primary from `status_file`.
    pub(crate) fn start(
        dir: &Path,
        local_host: &str,
        local_port: u16,
        ca: &str,
        status_file: &Path,
    ) -> App {
        std::fs::create_dir_all(dir).unwrap();
        let ca_file = dir.join("cluster-ca.pem");
        std::fs::write(&ca_file, ca).unwrap();
        let env = |name: &str| -> Option<String> {
            Some(match name {
                "TANDEM_NODE" => "server1".into(),
                "TANDEM_DB_HOST" => local_host.into(),
                "TANDEM_DB_PORT" => local_port.to_string(),
                "TANDEM_DB_STATUS_FILE" => status_file.display().to_string(),
                "TANDEM_DB_SSL_CA" => ca_file.display().to_string(),
                "TANDEM_DB_USER" => APP_USER.into(),
                "TANDEM_DB_PASSWORD" => APP_PASSWORD.into(),
                _ => return None,
            })
        };
        let config = app::Config::from_lookup(env).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        runtime.spawn(async move {
            if let Err(e) = app::serve(config, listener).await {
                panic!("the application stopped: {e}");
            }
        });
        App {
            addr,
            _runtime: runtime,
        }
    }
}

/// An answer: status, lower-case headers, body.
#[derive(Debug)]
pub(crate) struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// One client connection, kept open across requests.
pub(crate) struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub(crate) fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    /// Sends one request (with `Content-Length` when there is a body) and reads its answer
    /// (without a body for HEAD).
    pub(crate) fn request(
        &mut self,
        method: &str,
        target: &str,
        headers: &[&str],
        body: &str,
    ) -> Answer {
        let mut raw = format!("{method} {target} HTTP/1.1\r\nHost: app\r\n");
        for h in headers {
            raw.push_str(h);
            raw.push_str("\r\n");
        }
        if !body.is_empty() {
            raw.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        raw.push_str("\r\n");
        raw.push_str(body);
        self.stream.write_all(raw.as_bytes()).unwrap();
        self.answer(method != "HEAD")
    }

    fn answer(&mut self, with_body: bool) -> Answer {
        let end = loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            self.fill();
        };
        let head = String::from_utf8(self.buf[..end].to_vec()).unwrap();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let length: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .map_or(0, |(_, v)| v.parse().unwrap());
        let want = end + 4 + if with_body { length } else { 0 };
        while self.buf.len() < want {
            self.fill();
        }
        let body = String::from_utf8(self.buf[end + 4..want].to_vec()).unwrap();
        self.buf.drain(..want);
        Answer {
            status,
            headers,
            body,
        }
    }

    fn fill(&mut self) {
        let mut chunk = [0u8; 16 * 1024];
        // A signal delivered to this test process may interrupt the read (seen once in CI):
        // read again, as std's `read_exact` does.
        let n = loop {
            match self.stream.read(&mut chunk) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                other => break other.unwrap(),
            }
        };
        assert!(n > 0, "the application closed the connection");
        self.buf.extend_from_slice(&chunk[..n]);
    }
}

/// One request on a connection of its own.
pub(crate) fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[&str],
    body: &str,
) -> Answer {
    Client::connect(addr).request(method, target, headers, body)
}

/// A JSON note posted on a connection of its own, from a client address of its own (so that
/// no rate limit applies).
pub(crate) fn post_json(addr: SocketAddr, body: &str) -> Answer {
    static CLIENTS: AtomicU32 = AtomicU32::new(1);
    let client = std::net::Ipv4Addr::from(0x0a00_0000 + CLIENTS.fetch_add(1, Ordering::SeqCst));
    let payload = serde_json::json!({ "body": body }).to_string();
    request(
        addr,
        "POST",
        "/notes",
        &[
            "Content-Type: application/json",
            &format!("X-Forwarded-For: {client}"),
        ],
        &payload,
    )
}

/// Waits up to `timeout` for `ok`.
pub(crate) fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
