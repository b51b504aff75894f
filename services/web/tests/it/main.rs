//! The rendered nginx.conf with the real Debian nginx: idle sockets (connections stalled in the
//! middle of a request head) neither exhaust it nor stay open for long.

// Test code: a failed unwrap is a failed test, with the panic naming the value.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cluster_config::Cluster;

/// More idle connections than one worker of 1024 connections (the old configuration) holds.
const IDLE_CONNECTIONS: usize = 1100;
/// The start of a request head that never ends.
const STALLED_HEAD: &[u8] = b"GET / HTTP/1.1\r\nHost: test\r\n";
/// How long the real request may take while the idle connections are open.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Slack on top of nginx's header timeout before an idle socket must be gone.
const REAP_SLACK: Duration = Duration::from_secs(5);

/// nginx in its own process group; the group is killed on drop (workers included).
struct Nginx {
    child: Child,
    stderr: std::path::PathBuf,
}

impl Nginx {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- nginx stderr ----\n{}---- end ----", self.log());
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

/// Starts nginx with the node's rendered configuration on `127.0.0.1:port`, serving `dir/www`.
fn start_nginx(dir: &Path, port: u16) -> Nginx {
    assert!(
        Path::new(web::NGINX).is_file(),
        "this test needs {} (apt-get install -y nginx-light)",
        web::NGINX
    );
    let cluster = Cluster::default_cluster();
    let node = cluster.node("server1").unwrap();
    let www = dir.join("www");
    let run = dir.join("run");
    for d in [&www, &run] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(www.join("index.html"), "hello from nginx\n").unwrap();
    let root = nix::unistd::geteuid().is_root();
    let mut params = web::Params::for_node(
        &cluster,
        node,
        root.then(|| "www-data".to_string()),
        web::Paths {
            run_dir: run,
            root: www,
        },
    );
    params.listen = Ipv4Addr::LOCALHOST;
    params.port = port;
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, web::render_conf(&params)).unwrap();
    let stderr = dir.join("nginx.stderr");
    let argv = web::argv(&conf);
    let child = {
        use std::os::unix::process::CommandExt as _;
        Command::new(&argv[0])
            .args(&argv[1..])
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap()
    };
    let nginx = Nginx { child, stderr };
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nginx did not listen\n{}",
            nginx.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    nginx
}

/// `GET /` on a new connection; the status line and body, or why there is none.
fn get(addr: SocketAddr) -> Result<String, String> {
    let mut conn = TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT).map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(REQUEST_TIMEOUT)).unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)
        .map_err(|e| format!("no answer within {REQUEST_TIMEOUT:?}: {e}"))?;
    Ok(answer)
}

/// Raises this process's open-file limit to its hard limit (the idle sockets need it; nginx
/// inherits it too, and sets its workers' own with `worker_rlimit_nofile`).
fn raise_open_files() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let needed = IDLE_CONNECTIONS as u64 + 256;
    assert!(
        hard >= needed,
        "this test needs {needed} open files, the hard limit is {hard}"
    );
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
}

#[test]
fn idle_connections_neither_exhaust_nginx_nor_stay_open() {
    raise_open_files();
    let dir = tempfile::tempdir().unwrap();
    // The workers (www-data when root) read the document root below it.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let port = free_port();
    let nginx = start_nginx(dir.path(), port);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    assert!(get(addr).unwrap().contains("hello from nginx"));

    // Sockets that start a request and stall: what a client could do to a backend port. (nginx
    // reuses a connection that has sent nothing yet when it runs out; these it cannot.)
    let opened = Instant::now();
    let idle: Vec<TcpStream> = (0..IDLE_CONNECTIONS)
        .map(|i| {
            let mut conn =
                TcpStream::connect(addr).unwrap_or_else(|e| panic!("idle connection {i}: {e}"));
            conn.write_all(STALLED_HEAD).unwrap();
            conn
        })
        .collect();
    // Give the workers time to accept every one of them.
    std::thread::sleep(Duration::from_millis(500));

    let answer = get(addr).unwrap_or_else(|e| {
        panic!(
            "a real request failed with {IDLE_CONNECTIONS} idle connections open: {e}\n{}",
            nginx.log()
        )
    });
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.contains("hello from nginx"),
        "{answer}"
    );

    // nginx closes every idle socket once the header timeout has passed.
    let reaped_by = opened + Duration::from_secs(web::CLIENT_HEADER_TIMEOUT_S.into()) + REAP_SLACK;
    for (i, mut conn) in idle.into_iter().enumerate() {
        let left = reaped_by.saturating_duration_since(Instant::now());
        conn.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let mut byte = [0u8; 1];
        match conn.read(&mut byte) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Ok(_) => panic!("idle connection {i}: nginx answered a request it never got"),
            Err(e) => panic!(
                "idle connection {i} still open {:?} after it was opened: {e}",
                opened.elapsed()
            ),
        }
    }
}
