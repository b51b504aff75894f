//! What every scenario needs: the images, a booted cluster, steps that fail with evidence, and
//! a client of the admin port that logs in (or shows the metrics token) as a user would.

use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use qemu::{Cluster, ClusterSpec, HttpResponse};
use serde_json::Value;

/// Under TCG on a loaded two-core machine, two nodes booting at once reach HTTP in 1–2 minutes;
/// the margin is for a busy CI host.
pub(crate) const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// Serial lines printed on each boot, after the page is up, come within this.
pub(crate) const SERIAL_TIMEOUT: Duration = Duration::from_secs(120);
/// Lines of each serial log shown when a step fails.
pub(crate) const TAIL_LINES: usize = 40;

/// Held for the whole of a scenario that measures clients against a cluster under change (the
/// rolling upgrade's zero-timeout probe) or drives a browser: two such scenarios at once put
/// four TCG guests and Chromium on a two-core host, where a single request starved past its
/// timeout would be the host's fault, not the product's. Other scenarios still overlap them.
pub(crate) fn heavy_scenario() -> std::sync::MutexGuard<'static, ()> {
    static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());
    HEAVY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The host's CPU as the scenarios running at once share it. Every [`step`] (and every cluster
/// boot) holds it shared; a [`quiet_step`] holds it alone, so that what it measures against a
/// bound (how long clients wait while the floating IP moves, how soon a split heals) is the
/// product's time, not another scenario's guests booting on the same two cores. The other
/// scenarios' VMs stay up, idle between their steps. Two CI runs beside the rolling-upgrade
/// scenario saw 3.1 s and 3.8 s gaps where `bench/vip-failover.sh` measures 0.41–0.50 s on a
/// quiet host; with two busy loops on the host, one power cut in three reached 3.3 s.
static HOST: std::sync::RwLock<()> = std::sync::RwLock::new(());

thread_local! {
    /// What this thread holds of [`HOST`]: `Some(true)` alone, `Some(false)` shared.
    static HELD: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// A hold on [`HOST`]; steps nested in a step of the same thread share their outer step's
/// (`Nested`, which releases nothing). A step must not wait on another thread that itself
/// starts a step: with a quiet step waiting, that second shared hold would wait behind it, and
/// it behind the first.
pub(crate) enum Hold {
    Nested,
    Shared(#[allow(dead_code)] std::sync::RwLockReadGuard<'static, ()>),
    Alone(#[allow(dead_code)] std::sync::RwLockWriteGuard<'static, ()>),
}

impl Drop for Hold {
    fn drop(&mut self) {
        if !matches!(self, Hold::Nested) {
            HELD.with(|h| h.set(None));
        }
    }
}

/// Hold the host shared (`alone` false) or alone. Waiting for it is reported, as it is time a
/// step did not spend on its own work.
pub(crate) fn hold_host(alone: bool) -> Hold {
    hold(&HOST, alone)
}

fn hold(host: &'static std::sync::RwLock<()>, alone: bool) -> Hold {
    use std::sync::{PoisonError, TryLockError};
    match HELD.with(std::cell::Cell::get) {
        // Inside a quiet step, or a shared step inside a shared one.
        Some(held_alone) if held_alone || !alone => return Hold::Nested,
        Some(_) => panic!("a quiet step inside a step: the host cannot be had alone there"),
        None => {}
    }
    let t0 = Instant::now();
    let guard = if alone {
        match host.try_write() {
            Ok(g) => Hold::Alone(g),
            Err(TryLockError::Poisoned(p)) => Hold::Alone(p.into_inner()),
            Err(TryLockError::WouldBlock) => {
                eprintln!("    (waiting for the other scenarios' steps to end: a quiet host)");
                Hold::Alone(host.write().unwrap_or_else(PoisonError::into_inner))
            }
        }
    } else {
        Hold::Shared(host.read().unwrap_or_else(PoisonError::into_inner))
    };
    let waited = t0.elapsed();
    if waited > Duration::from_secs(1) {
        eprintln!(
            "    (waited {:.1}s for {})",
            waited.as_secs_f64(),
            if alone {
                "the other scenarios' steps"
            } else {
                "another scenario's quiet step"
            }
        );
    }
    HELD.with(|h| h.set(Some(alone)));
    guard
}

/// The built-in cluster the images are built for (server1 10.88.0.11, server2 10.88.0.12).
pub(crate) fn cluster_config() -> cluster_config::Cluster {
    cluster_config::Cluster::default_cluster()
}

fn workspace() -> PathBuf {
    let tests = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    tests
        .parent()
        .expect("the tests crate sits in the workspace")
        .to_path_buf()
}

/// The image directory, with a node image for every node of `config`, or a panic that says how
/// to build them.
pub(crate) fn images(config: &cluster_config::Cluster) -> PathBuf {
    let dir = std::env::var_os("TANDEM_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/images"));
    let missing: Vec<String> = config
        .nodes
        .iter()
        .map(|n| dir.join(format!("{}.qcow2", n.name)))
        .filter(|p| !p.is_file())
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "the end-to-end tests need the node images, and these are missing: {}\n\
         Build them with `scripts/build-images` (writes target/images), \
         or set TANDEM_IMAGES to a directory holding {}.",
        missing.join(", "),
        config
            .nodes
            .iter()
            .map(|n| format!("{}.qcow2", n.name))
            .collect::<Vec<_>>()
            .join(", "),
    );
    dir
}

/// Boot every node of the default cluster from the images, each VM on a fresh overlay.
pub(crate) fn boot_cluster() -> Cluster {
    boot_cluster_with(0)
}

/// [`boot_cluster`] with each VM's disk `extra_disk_bytes` larger than its image (the data
/// partition grows into it on the first boot).
pub(crate) fn boot_cluster_with(extra_disk_bytes: u64) -> Cluster {
    let config = cluster_config();
    let images = images(&config);
    boot(&config, extra_disk_bytes, |n| {
        images.join(format!("{}.qcow2", n.name))
    })
}

/// The generic image (`image-builder build --generic`: no node identity, the first-boot wizard
/// asks), next to the node images, or a panic that says how to build it.
pub(crate) fn generic_image(config: &cluster_config::Cluster) -> PathBuf {
    let image = images(config).join(GENERIC_IMAGE);
    assert!(
        image.is_file(),
        "the wizard test needs {}: build it next to the node images with \
         `scripts/build-images --generic`",
        image.display()
    );
    image
}

/// The generic image's file in the image directory.
pub(crate) const GENERIC_IMAGE: &str = "generic.qcow2";

/// Every node of the default cluster booted from the generic image. Each VM is named after the
/// node it will be told it is (its MAC derives from that node's address), but until its setup
/// it knows no name nor address of its own.
pub(crate) fn boot_generic_cluster() -> Cluster {
    let config = cluster_config();
    let image = generic_image(&config);
    boot(&config, 0, |_| image.clone())
}

fn boot(
    config: &cluster_config::Cluster,
    extra_disk_bytes: u64,
    image: impl Fn(&cluster_config::Node) -> PathBuf,
) -> Cluster {
    let id = qemu::unique_id();
    let mut spec = ClusterSpec::new(workspace().join("target/e2e").join(&id));
    spec.id = id;
    spec.client = Ipv4Addr::from(u32::from(config.subnet.addr) + 1);
    spec.prefix = config.subnet.prefix;
    spec.extra_disk_bytes = extra_disk_bytes;
    for n in &config.nodes {
        spec = spec.node(&n.name, n.address, image(n));
    }
    // Booting guests is the heaviest load there is: never under another scenario's quiet step.
    let _host = hold_host(false);
    match Cluster::boot(spec) {
        Ok(c) => {
            eprintln!(
                "booted {} VMs ({}) in namespace {}; logs in {}",
                c.vms().len(),
                c.accel().as_str(),
                c.netns().name(),
                c.work_dir().display()
            );
            c
        }
        Err(e) => panic!("booting the cluster: {e}"),
    }
}

/// Run one named step; on error, fail the test with the error and every serial log's tail.
/// It shares the host with the other scenarios' steps (see [`HOST`]).
pub(crate) fn step<T>(cluster: &Cluster, name: &str, body: impl FnOnce() -> qemu::Result<T>) -> T {
    run_step(cluster, name, false, body)
}

/// A [`step`] that measures against a time bound: it waits until no other scenario is in a
/// step, and none starts one until it ends (see [`HOST`]).
pub(crate) fn quiet_step<T>(
    cluster: &Cluster,
    name: &str,
    body: impl FnOnce() -> qemu::Result<T>,
) -> T {
    run_step(cluster, name, true, body)
}

fn run_step<T>(
    cluster: &Cluster,
    name: &str,
    alone: bool,
    body: impl FnOnce() -> qemu::Result<T>,
) -> T {
    eprintln!("==> {name}");
    let _host = hold_host(alone);
    let t0 = Instant::now();
    match body() {
        Ok(v) => {
            eprintln!("    ok ({:.1}s)", t0.elapsed().as_secs_f64());
            v
        }
        Err(e) => panic!(
            "step failed: {name} (after {:.1}s)\n{e}\n\n{}",
            t0.elapsed().as_secs_f64(),
            cluster.tails(TAIL_LINES)
        ),
    }
}

/// The node's page through its own balancer (HTTPS on its address), from the client. nginx's
/// web port is open to cluster peers only, so a client sees a node's page when that balancer's
/// round robin picks the node: [`wait_page`] asks until it does.
pub(crate) fn page_url(config: &cluster_config::Cluster, node: &str) -> String {
    let n = config.node(node).expect("node of the default cluster");
    format!("https://{}:{}/node.html", n.address, config.ports.https)
}

/// `boot: N` on a node's page.
pub(crate) fn boot_count(body: &str) -> Option<u64> {
    let rest = &body[body.find("boot: ")? + "boot: ".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Wait until `node`'s page answers 200 with its name (and, if given, this boot count).
/// Returns the boot count shown.
pub(crate) fn wait_page(
    cluster: &Cluster,
    config: &cluster_config::Cluster,
    node: &str,
    boot: Option<u64>,
    timeout: Duration,
) -> qemu::Result<u64> {
    let needle = format!("node: {node}");
    let accept = |r: &HttpResponse| {
        r.status == 200
            && r.body.contains(&needle)
            && boot.is_none_or(|b| boot_count(&r.body) == Some(b))
    };
    let resp = cluster.wait_http(&page_url(config, node), timeout, accept)?;
    boot_count(&resp.body)
        .ok_or_else(|| qemu::Error::Http(format!("no `boot: N` on {node}'s page: {}", resp.body)))
}

/// The cluster CA's directory on the build machine, as the image manifest names it. The
/// cluster secret, the admin password and the metrics token are kept there.
pub(crate) fn ca_dir(config: &cluster_config::Cluster) -> qemu::Result<PathBuf> {
    let manifest = images(config).join("manifest.json");
    let manifest: Value = std::fs::read_to_string(&manifest)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .ok_or_else(|| qemu::Error::Http(format!("cannot read {}", manifest.display())))?;
    Ok(PathBuf::from(manifest["ca_dir"].as_str().ok_or_else(
        || qemu::Error::Http("manifest has no ca_dir".into()),
    )?))
}

/// The cluster's admin password and metrics token, as the build machine keeps them next to
/// its CA (the node images' seeds hold the password's hash and the token).
fn credentials(config: &cluster_config::Cluster) -> qemu::Result<image_builder::pki::Credentials> {
    let dir = ca_dir(config)?;
    image_builder::pki::Credentials::load(&dir).map_err(|e| {
        qemu::Error::Http(format!(
            "the admin password and metrics token in {}: {e} (an image build makes them)",
            dir.display()
        ))
    })
}

/// The cluster's admin password, as the build machine keeps it.
pub(crate) fn admin_password(config: &cluster_config::Cluster) -> qemu::Result<String> {
    Ok(credentials(config)?.admin_password.expose().to_string())
}

/// The bearer token `/metrics` takes, as the build machine keeps it.
pub(crate) fn metrics_token(config: &cluster_config::Cluster) -> qemu::Result<String> {
    Ok(credentials(config)?.metrics_token.expose().to_string())
}

/// An HTTP answer with its headers, as the client in the namespace got it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    /// Names in lower case, in the order received.
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: String,
}

impl Reply {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// A redirect (303) to a path ending in `path`.
    pub(crate) fn redirects_to(&self, path: &str) -> bool {
        (300..400).contains(&self.status)
            && self
                .header("location")
                .is_some_and(|l| l.split(['?', '#']).next().unwrap_or(l).ends_with(path))
    }

    fn describe(&self) -> String {
        let body: String = self.body.chars().take(300).collect();
        format!("{} {body:?}", self.status)
    }
}

/// curl's stdout with `-D - -o - -w '\n%{http_code}'`: the head, a blank line, the body, a
/// newline and the status.
fn parse_reply(stdout: &[u8]) -> Option<Reply> {
    let text = String::from_utf8_lossy(stdout);
    let (rest, code) = text.rsplit_once('\n')?;
    let status: u16 = code.trim().parse().ok()?;
    if status == 0 {
        return None;
    }
    let (head, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some(Reply {
        status,
        headers,
        body: body.to_string(),
    })
}

/// One request with curl from the client in the namespace (TLS not verified, redirects not
/// followed): `args` before the URL, `stdin` fed to curl (secrets go there, never on a command
/// line). Fails only when no HTTP answer came.
pub(crate) fn curl(
    cluster: &Cluster,
    args: &[String],
    url: &str,
    stdin: Option<&[u8]>,
) -> qemu::Result<Reply> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-k", "--max-time", "30", "-D", "-", "-o", "-"])
        .args(["-w", "\n%{http_code}"])
        .args(args)
        .arg(url)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cluster.netns().spawn(cmd)?;
    if let (Some(bytes), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let _ = pipe.write_all(bytes);
    }
    let out = child
        .wait_with_output()
        .map_err(|e| qemu::Error::Http(format!("curl {url}: {e}")))?;
    parse_reply(&out.stdout).ok_or_else(|| {
        qemu::Error::Http(format!(
            "{url}: no answer: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    })
}

/// The `value` of the `<input>` named `name` in an HTML page (the login form's hidden `csrf`).
pub(crate) fn input_value(html: &str, name: &str) -> Option<String> {
    let want = format!("name=\"{name}\"");
    html.split("<input")
        .skip(1)
        .map(|rest| rest.split('>').next().unwrap_or(rest))
        .find(|tag| tag.contains(&want))
        .and_then(|tag| {
            let v = &tag[tag.find("value=\"")? + "value=\"".len()..];
            Some(v[..v.find('"')?].replace("&amp;", "&"))
        })
}

/// The admin server's session cookie.
pub(crate) const SESSION_COOKIE: &str = "tandem_session=";

/// A logged-in user of one node's admin port: a session cookie (in a cookie jar in the
/// cluster's work dir) got by `GET /login` (its CSRF cookie and field) and `POST /login`, the
/// CSRF header on every POST. A session lives in the admin server's memory: after the node
/// rebooted, a request that is sent to the login page logs in again and is sent once more.
pub(crate) struct Admin<'a> {
    cluster: &'a Cluster,
    base: String,
    jar: PathBuf,
    password: String,
}

impl<'a> Admin<'a> {
    pub(crate) fn new(
        cluster: &'a Cluster,
        address: Ipv4Addr,
        port: u16,
        password: &str,
    ) -> Admin<'a> {
        let dir = cluster.work_dir().join("admin-sessions");
        let _ = std::fs::create_dir_all(&dir);
        Admin {
            cluster,
            base: format!("https://{address}:{port}"),
            jar: dir.join(format!("{address}-{port}.cookies")),
            password: password.to_string(),
        }
    }

    /// `node`'s admin port, with the build machine's admin password (the node images' seeds).
    pub(crate) fn of(
        cluster: &'a Cluster,
        config: &cluster_config::Cluster,
        node: &str,
    ) -> qemu::Result<Admin<'a>> {
        let n = config
            .node(node)
            .ok_or_else(|| qemu::Error::NoSuchNode(node.to_string()))?;
        Ok(Admin::new(
            cluster,
            n.address,
            config.ports.admin,
            &admin_password(config)?,
        ))
    }

    /// The cookie jar holding the session (for a request made by hand).
    pub(crate) fn jar(&self) -> &std::path::Path {
        &self.jar
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn jar_args(&self) -> Vec<String> {
        let jar = self.jar.display().to_string();
        vec!["-b".into(), jar.clone(), "-c".into(), jar]
    }

    /// Log in (a new session).
    pub(crate) fn login(&self) -> qemu::Result<()> {
        let form = curl(self.cluster, &self.jar_args(), &self.url("/login"), None)?;
        let csrf = input_value(&form.body, "csrf").ok_or_else(|| {
            qemu::Error::Http(format!("GET /login: no csrf field: {}", form.describe()))
        })?;
        let mut args = self.jar_args();
        args.extend([
            "--data-urlencode".into(),
            format!("csrf={csrf}"),
            "--data-urlencode".into(),
            "password@-".into(),
        ]);
        let r = curl(
            self.cluster,
            &args,
            &self.url("/login"),
            Some(self.password.as_bytes()),
        )?;
        let session = r
            .headers
            .iter()
            .any(|(n, v)| n == "set-cookie" && v.starts_with(SESSION_COOKIE));
        if r.status != 303 || !session {
            return Err(qemu::Error::Http(format!(
                "POST {}: {} (Retry-After {:?}), expected 303 with a session cookie",
                self.url("/login"),
                r.describe(),
                r.header("retry-after")
            )));
        }
        Ok(())
    }

    fn send(&self, args: &[String], path: &str) -> qemu::Result<Reply> {
        let mut a = self.jar_args();
        a.extend_from_slice(args);
        curl(self.cluster, &a, &self.url(path), None)
    }

    /// `GET path` with the session; logs in once again when the answer says there is none
    /// (401 from the API, a redirect to the login page from a page).
    fn get_with_session(&self, path: &str) -> qemu::Result<Reply> {
        let r = self.send(&[], path)?;
        if r.status == 401 || r.redirects_to("/login") {
            self.login()?;
            return self.send(&[], path);
        }
        Ok(r)
    }

    /// `GET path` with the session.
    pub(crate) fn get(&self, path: &str) -> qemu::Result<Reply> {
        self.get_with_session(path)
    }

    /// `GET path` with the session: 200 and JSON, else an error naming the answer.
    pub(crate) fn get_json(&self, path: &str) -> qemu::Result<Value> {
        let r = self.get(path)?;
        if r.status != 200 {
            return Err(qemu::Error::Http(format!(
                "GET {}: {}",
                self.url(path),
                r.describe()
            )));
        }
        serde_json::from_str(&r.body).map_err(|e| {
            qemu::Error::Http(format!("GET {}: {e}: {}", self.url(path), r.describe()))
        })
    }

    /// The session's CSRF token (`GET /api/session`).
    pub(crate) fn csrf(&self) -> qemu::Result<String> {
        let v = self.get_json("/api/session")?;
        v["csrf"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| qemu::Error::Http(format!("/api/session: no csrf in {v}")))
    }

    /// The arguments that make a curl request of the caller's (an upload) carry the session
    /// and its CSRF token; logs in first if needed. The cookie jar is only read.
    pub(crate) fn curl_auth(&self) -> qemu::Result<Vec<String>> {
        let csrf = self.csrf()?;
        Ok(vec![
            "-b".into(),
            self.jar.display().to_string(),
            "-H".into(),
            format!("X-CSRF-Token: {csrf}"),
        ])
    }

    /// `POST path` with the session and its CSRF token (`form`: urlencoded fields; none sends
    /// an empty body).
    pub(crate) fn post(&self, path: &str, form: &[(&str, &str)]) -> qemu::Result<Reply> {
        let args = |csrf: &str| {
            let mut a = vec![
                "-X".to_string(),
                "POST".into(),
                "-H".into(),
                format!("X-CSRF-Token: {csrf}"),
            ];
            if form.is_empty() {
                a.extend(["--data".into(), String::new()]);
            }
            for (k, v) in form {
                a.extend(["--data-urlencode".into(), format!("{k}={v}")]);
            }
            a
        };
        let r = self.send(&args(&self.csrf()?), path)?;
        // A POST without a (valid) session is refused (403): the node rebooted since the
        // login. Log in again, once.
        if r.status == 403 {
            self.login()?;
            return self.send(&args(&self.csrf()?), path);
        }
        Ok(r)
    }

    /// [`Admin::get`] until `accept` holds, at most `timeout`.
    pub(crate) fn wait_get(
        &self,
        path: &str,
        timeout: Duration,
        accept: impl Fn(&Reply) -> bool,
    ) -> qemu::Result<Reply> {
        qemu::wait_for(timeout, &format!("GET {}", self.url(path)), || {
            let r = self.get(path)?;
            if accept(&r) {
                Ok(r)
            } else {
                Err(qemu::Error::Http(r.describe()))
            }
        })
    }
}

/// `GET /metrics` on a node's admin port, with `Authorization: Bearer <token>` when given (the
/// header goes through curl's stdin).
pub(crate) fn metrics(
    cluster: &Cluster,
    address: Ipv4Addr,
    port: u16,
    token: Option<&str>,
) -> qemu::Result<Reply> {
    let url = format!("https://{address}:{port}/metrics");
    match token {
        Some(t) => {
            let header = format!("Authorization: Bearer {t}\n");
            curl(
                cluster,
                &["-H".into(), "@-".into()],
                &url,
                Some(header.as_bytes()),
            )
        }
        None => curl(cluster, &[], &url, None),
    }
}

/// [`metrics`] of `node` with the build machine's token until `accept` holds.
pub(crate) fn wait_metrics(
    cluster: &Cluster,
    config: &cluster_config::Cluster,
    node: &str,
    timeout: Duration,
    accept: impl Fn(&str) -> bool,
) -> qemu::Result<String> {
    let n = config
        .node(node)
        .ok_or_else(|| qemu::Error::NoSuchNode(node.to_string()))?;
    let token = metrics_token(config)?;
    qemu::wait_for(timeout, &format!("{node}'s /metrics"), || {
        let r = metrics(cluster, n.address, config.ports.admin, Some(&token))?;
        if r.status == 200 && accept(&r.body) {
            Ok(r.body)
        } else {
            Err(qemu::Error::Http(r.describe()))
        }
    })
}

#[test]
fn replies_are_read_from_curl() {
    type Expected<'a> = Option<(u16, &'a [(&'a str, &'a str)], &'a str)>;
    let check = |raw: &str, expected: Expected<'_>| {
        let got = parse_reply(raw.as_bytes());
        let expected = expected.map(|(status, headers, body)| Reply {
            status,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            body: body.to_string(),
        });
        assert_eq!(got, expected, "{raw:?}");
    };
    check(
        "HTTP/1.1 303 See Other\r\nLocation: /login\r\nSet-Cookie: a=b; Path=/\r\n\r\n\n303",
        Some((
            303,
            &[("location", "/login"), ("set-cookie", "a=b; Path=/")],
            "",
        )),
    );
    check(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{\"csrf\":\"x\"}\n200",
        Some((
            200,
            &[("content-type", "application/json")],
            "{\"csrf\":\"x\"}",
        )),
    );
    check("\n000", None);
    check("garbage", None);
    let r =
        parse_reply(b"HTTP/1.1 303 See Other\r\nLocation: https://a/login?next=%2F\r\n\r\n\n303")
            .unwrap();
    assert!(r.redirects_to("/login") && !r.redirects_to("/setup"));
}

#[test]
fn hidden_fields_are_read_from_forms() {
    let check = |html: &str, name: &str, expected: Option<&str>| {
        assert_eq!(input_value(html, name).as_deref(), expected, "{html}")
    };
    let form = r#"<form id="login-form" method="post" action="/login">
        <input type="password" name="password" id="password">
        <input type="hidden" name="csrf" value="3f2a&amp;b"><button>Log in</button></form>"#;
    check(form, "csrf", Some("3f2a&b"));
    check(form, "password", None);
    check(
        r#"<input value="v1" name="csrf" type="hidden">"#,
        "csrf",
        Some("v1"),
    );
    check("<p>no form</p>", "csrf", None);
}

#[test]
fn boot_count_is_read_from_the_page() {
    let check =
        |body: &str, expected: Option<u64>| assert_eq!(boot_count(body), expected, "{body}");
    check("<p>node: server1</p><p>boot: 3</p>", Some(3));
    check("node: server1\nboot: 12\n", Some(12));
    check("boot: x", None);
    check("no count", None);
}

#[test]
fn a_quiet_hold_waits_for_other_threads_steps_and_nested_holds_share_the_outer_one() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;
    // Its own lock: the scenarios of this binary hold HOST.
    static LOCK: std::sync::RwLock<()> = std::sync::RwLock::new(());
    static QUIET: AtomicBool = AtomicBool::new(false);

    let (tell, heard) = mpsc::channel();
    let (go, wait_go) = mpsc::channel::<()>();
    let other = std::thread::spawn(move || {
        let _outer = hold(&LOCK, false);
        tell.send("outer").unwrap();
        wait_go.recv().unwrap();
        // A step within the step while a quiet hold waits: it shares the outer hold (a second
        // shared hold would queue behind the waiting quiet one, which waits for the first).
        let _inner = hold(&LOCK, false);
        tell.send("inner").unwrap();
        wait_go.recv().unwrap();
        assert!(
            !QUIET.load(Ordering::SeqCst),
            "quiet ran inside another's step"
        );
    });
    let second = Duration::from_secs(5);
    assert_eq!(heard.recv_timeout(second), Ok("outer"));
    let quiet = std::thread::spawn(|| {
        let _alone = hold(&LOCK, true);
        QUIET.store(true, Ordering::SeqCst);
        // A step inside a quiet step shares it.
        let _nested = hold(&LOCK, false);
        QUIET.store(false, Ordering::SeqCst);
    });
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !quiet.is_finished(),
        "quiet ran while another step held the host"
    );
    go.send(()).unwrap();
    assert_eq!(
        heard.recv_timeout(second),
        Ok("inner"),
        "a nested hold waited behind the quiet one"
    );
    assert!(
        !quiet.is_finished(),
        "quiet ran while another step held the host"
    );
    go.send(()).unwrap();
    other.join().unwrap();
    quiet.join().unwrap();
    // Released on drop: a new holder gets it at once.
    drop(hold(&LOCK, true));
}
