//! Test harness: real nginx backends on loopback addresses, the balancer in-process, a small
//! HTTP client, and the external tools (curl, openssl) found or failed on clearly.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use balancer::{Balancer, Handle, Limits, Listen, Options};
use bytes::Bytes;
use cluster_config::{Algorithm, BalancerMode, Cluster};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

/// The path of a required tool, or a panic that says how to install it.
pub(crate) fn tool(name: &str, package: &str) -> PathBuf {
    for dir in [
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
        "/usr/local/bin",
        "/usr/local/sbin",
    ] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("`{name}` is required by this test and was not found: install it with `apt-get install {package}`");
}

/// Each test gets its own 127.0.N.0/24 so tests running in parallel never share an address.
pub(crate) fn subnet() -> u8 {
    static NEXT: AtomicU8 = AtomicU8::new(100);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

pub(crate) fn ip(net: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, net, host)
}

/// A port free on every given address.
pub(crate) fn free_port(ips: &[Ipv4Addr]) -> u16 {
    for _ in 0..100 {
        let l = TcpListener::bind((ips[0], 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        if ips[1..]
            .iter()
            .all(|&i| TcpListener::bind((i, port)).is_ok())
        {
            return port;
        }
    }
    panic!("no common free port on {ips:?}");
}

/// A real nginx serving `backend <name>` on `addr`, `/healthz`, and `/headers` (echoes what
/// the balancer added). `master_process off` makes it one process: killing it kills it all.
pub(crate) struct Nginx {
    pub name: String,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Nginx {
    pub(crate) fn start(name: &str, addr: SocketAddr) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let mut n = Nginx {
            name: name.into(),
            addr,
            dir,
            child: None,
        };
        n.restart();
        n
    }

    pub(crate) fn restart(&mut self) {
        let bin = tool("nginx", "nginx-light");
        let d = self.dir.path().display().to_string();
        let (name, addr) = (&self.name, self.addr);
        let conf = format!(
            r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log {d}/access.log;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  keepalive_requests 100000;
  server {{
    listen {addr} reuseport;
    location = /healthz {{ return 200 "ok\n"; }}
    location = /headers {{
      return 200 "host=$http_host xff=$http_x_forwarded_for proto=$http_x_forwarded_proto fwd=$http_forwarded conn=$http_connection\n";
    }}
    location / {{ return 200 "backend {name}\n"; }}
  }}
}}
"#
        );
        let conf_path = self.dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start nginx");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(self.addr).is_err() {
            if let Some(Some(status)) = self.child.as_mut().map(|c| c.try_wait().unwrap()) {
                let log =
                    std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default();
                panic!("nginx {} exited with {status}: {log}", self.name);
            }
            assert!(
                Instant::now() < deadline,
                "nginx {} did not listen on {}",
                self.name,
                self.addr
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: the backend dies mid-flight, as in a crash.
    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub(crate) fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Two nodes on 127.0.N.11/12 with nginx on a common port, and a cluster describing them.
pub(crate) struct Setup {
    pub net: u8,
    pub cluster: Cluster,
    pub backends: Vec<Nginx>,
    pub state: tempfile::TempDir,
}

impl Setup {
    pub(crate) fn new() -> Setup {
        Setup::with(|_| {})
    }

    pub(crate) fn with(f: impl FnOnce(&mut Cluster)) -> Setup {
        let net = subnet();
        let ips = [ip(net, 11), ip(net, 12)];
        let port = free_port(&ips);
        let mut c = Cluster::default_cluster();
        c.floating_ip = ip(net, 10);
        c.nodes[0].address = ips[0];
        c.nodes[1].address = ips[1];
        c.ports.web = port;
        c.balancer.algorithm = Algorithm::RoundRobin;
        c.balancer.mode = BalancerMode::ActiveActive;
        c.balancer.health.interval = Duration::from_millis(200);
        c.balancer.health.timeout = Duration::from_millis(500);
        f(&mut c);
        let backends = c
            .nodes
            .iter()
            .map(|n| Nginx::start(&n.name, SocketAddr::from((n.address, port))))
            .collect();
        Setup {
            net,
            cluster: c,
            backends,
            state: tempfile::tempdir().unwrap(),
        }
    }

    pub(crate) fn options(&self) -> Options {
        let a = |h| SocketAddr::from((ip(self.net, h), 0));
        let mut o = Options::new(self.state.path());
        o.listen = Some(Listen {
            http: vec![a(10)],
            https: vec![a(10)],
            http_proxy: vec![a(10)],
        });
        o.metrics = Some(a(10));
        o.limits = Limits {
            header_timeout: Duration::from_secs(1),
            ..Limits::default()
        };
        o
    }

    pub(crate) async fn start(&self) -> Handle {
        self.start_with(self.options()).await
    }

    pub(crate) async fn start_with(&self, o: Options) -> Handle {
        Balancer::start(self.cluster.clone(), "server1", o)
            .await
            .expect("balancer starts")
    }
}

pub(crate) fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,health=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Wait until every backend has the wanted state (as the balancer sees it).
pub(crate) async fn wait_for(
    h: &Handle,
    what: &str,
    f: impl Fn(&[balancer::BackendStatus]) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let b = h.backends();
        if f(&b) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {b:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) type HttpClient = Client<HttpConnector, Empty<Bytes>>;

pub(crate) fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// GET `path` from `addr`: (status, body).
pub(crate) async fn get(
    c: &HttpClient,
    addr: SocketAddr,
    path: &str,
) -> Result<(u16, String), String> {
    let uri: http::Uri = format!("http://{addr}{path}").parse().unwrap();
    let resp = c.get(uri).await.map_err(|e| format!("{e:?}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Send raw bytes, return everything the server sends until it closes (or `wait` passes).
pub(crate) fn raw(addr: SocketAddr, request: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Run a command, returning (success, stdout + stderr).
pub(crate) fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.stdin(Stdio::null()).output().expect("run command");
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), s)
}
