//! A booted cluster: the namespace, one VM per node, client helpers, and cleanup on drop.

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::machine::{self, Accel, MachineConfig};
use crate::netns::{run_checked, Netns};
use crate::probe::{Probe, ProbeOptions};
use crate::qmp::{self, Qmp};
use crate::serial::{self, Mark, SerialInput};
use crate::session::Cancel;
use crate::{tools, vip};

/// Memory per VM unless the spec says otherwise.
pub const DEFAULT_MEMORY_MIB: u32 = 1024;
/// The client's address on the cluster LAN (the bridge in the namespace).
pub const DEFAULT_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);
pub const DEFAULT_PREFIX: u8 = 24;
/// Set to `1` to keep a cluster's work dir (overlays, firmware variables) after it is dropped.
pub const KEEP_ENV: &str = "TANDEM_KEEP";
/// Each node's own page (`appliance`'s `NODE_PAGE`), served on the web port: `node: NAME`.
pub const NODE_PAGE: &str = "/node.html";
/// How long one readiness check of a node's page may take.
const READY_TRY: Duration = Duration::from_secs(5);
/// How long QEMU gets to create its QMP socket after being started.
const QMP_TIMEOUT: Duration = Duration::from_secs(15);
/// `sun_path` is 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// One node of the cluster to boot.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSpec {
    pub name: String,
    pub address: Ipv4Addr,
    /// The node's built image (`.qcow2`, or raw otherwise). Never written: each VM runs on a
    /// qcow2 overlay in the work dir.
    pub image: PathBuf,
}

/// What to boot, and where its files go.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterSpec {
    /// Unique per run; names the network namespace (`tandem-<id>`).
    pub id: String,
    pub nodes: Vec<NodeSpec>,
    pub memory_mib: u32,
    /// Overlays, firmware variables, QMP sockets, serial logs. Created if missing.
    pub work_dir: PathBuf,
    /// The client's address on the cluster LAN, and the LAN's prefix length.
    pub client: Ipv4Addr,
    pub prefix: u8,
    /// Make each VM's disk this much larger than its image (a real server's disk is larger
    /// than the image written to it; the node grows its data partition into the rest on the
    /// first boot). 0: the image's size.
    pub extra_disk_bytes: u64,
}

impl ClusterSpec {
    /// An empty spec with the defaults and a fresh id; add nodes with [`ClusterSpec::node`].
    pub fn new(work_dir: impl Into<PathBuf>) -> ClusterSpec {
        ClusterSpec {
            id: unique_id(),
            nodes: Vec::new(),
            memory_mib: DEFAULT_MEMORY_MIB,
            work_dir: work_dir.into(),
            client: DEFAULT_CLIENT,
            prefix: DEFAULT_PREFIX,
            extra_disk_bytes: 0,
        }
    }

    pub fn node(mut self, name: &str, address: Ipv4Addr, image: impl Into<PathBuf>) -> ClusterSpec {
        self.nodes.push(NodeSpec {
            name: name.to_string(),
            address,
            image: image.into(),
        });
        self
    }

    /// The namespace's name.
    pub fn netns_name(&self) -> String {
        format!("tandem-{}", self.id)
    }

    /// Problems a human must fix, found without touching the system (images are checked later).
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Spec(m));
        if self.nodes.is_empty() {
            return bad("no nodes".into());
        }
        if self.id.is_empty()
            || !self
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return bad(format!(
                "cluster id {:?} must be non-empty ASCII letters, digits and '-'",
                self.id
            ));
        }
        if self.prefix == 0 || self.prefix > 30 {
            return bad(format!(
                "prefix /{} must be between /1 and /30",
                self.prefix
            ));
        }
        let mask = u32::MAX << (32 - u32::from(self.prefix));
        let mut names = HashSet::new();
        let mut addrs = HashSet::from([self.client]);
        for n in &self.nodes {
            if n.name.is_empty()
                || !n
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return bad(format!(
                    "node name {:?} must be ASCII letters, digits, '-' or '_'",
                    n.name
                ));
            }
            if !names.insert(n.name.as_str()) {
                return bad(format!("node {} listed twice", n.name));
            }
            if !addrs.insert(n.address) {
                return bad(format!(
                    "address {} of node {} is used twice (the client has {})",
                    n.address, n.name, self.client
                ));
            }
            if u32::from(n.address) & mask != u32::from(self.client) & mask {
                return bad(format!(
                    "node {} address {} is outside {}/{}",
                    n.name, n.address, self.client, self.prefix
                ));
            }
        }
        Ok(())
    }
}

/// `<pid>-<n>`: unique among the clusters of all processes running at the same time.
pub fn unique_id() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// An HTTP answer as seen by the client in the namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub body: String,
}

/// A running (or stopped) cluster. Dropping it kills every VM and deletes the namespace.
pub struct Cluster {
    // Field order matters: VMs go before the namespace they live in.
    vms: Vec<Vm>,
    netns: Arc<Netns>,
    spec: ClusterSpec,
    accel: Accel,
}

impl Cluster {
    /// Create the namespace, bridge and taps, an overlay and a firmware variable store per node,
    /// and start every VM. Returns as soon as the QEMUs run; wait for the guests with
    /// [`Vm::wait_serial`] or [`Cluster::wait_http`].
    pub fn boot(spec: ClusterSpec) -> Result<Cluster> {
        let cluster = Cluster::create(spec)?;
        for vm in &cluster.vms {
            vm.start()?;
        }
        Ok(cluster)
    }

    /// Everything [`Cluster::boot`] does except starting the VMs.
    pub fn create(spec: ClusterSpec) -> Result<Cluster> {
        spec.check()?;
        tools::check_host()?;
        for n in &spec.nodes {
            if !n.image.is_file() {
                return Err(Error::MissingImage {
                    node: n.name.clone(),
                    path: n.image.clone(),
                });
            }
        }
        std::fs::create_dir_all(&spec.work_dir)
            .map_err(|e| Error::io("creating the work dir", &spec.work_dir, e))?;
        let work_dir = std::fs::canonicalize(&spec.work_dir)
            .map_err(|e| Error::io("resolving the work dir", &spec.work_dir, e))?;
        let accel = crate::accel::choose();
        crate::netns::remove_stale();
        let taps: Vec<String> = (0..spec.nodes.len()).map(|i| format!("tap{i}")).collect();
        let netns = Arc::new(Netns::create(
            &spec.netns_name(),
            spec.client,
            spec.prefix,
            &taps,
        )?);
        let qemu = tools::find(tools::QEMU)?;
        let mut vms = Vec::new();
        for (node, tap) in spec.nodes.iter().zip(taps) {
            let file = |suffix: &str| work_dir.join(format!("{}.{suffix}", node.name));
            let machine = MachineConfig {
                name: node.name.clone(),
                accel,
                memory_mib: spec.memory_mib,
                disk: file("qcow2"),
                vars: file("vars.fd"),
                tap,
                mac: machine::mac_for(node.address),
                serial_log: file("serial.log"),
                serial_socket: file("serial"),
                qmp_socket: file("qmp"),
            };
            for socket in [&machine.qmp_socket, &machine.serial_socket] {
                if socket.as_os_str().len() > MAX_SOCKET_PATH {
                    return Err(Error::Spec(format!(
                        "socket path {} is longer than {MAX_SOCKET_PATH} bytes; use a shorter work dir",
                        socket.display()
                    )));
                }
            }
            make_overlay(&node.image, &machine.disk, spec.extra_disk_bytes)?;
            std::fs::copy(tools::OVMF_VARS, &machine.vars)
                .map_err(|e| Error::io("copying the UEFI variable store", &machine.vars, e))?;
            // A fresh log per cluster; restarts of a VM append to it.
            std::fs::write(&machine.serial_log, b"")
                .map_err(|e| Error::io("creating the serial log", &machine.serial_log, e))?;
            vms.push(Vm {
                name: node.name.clone(),
                address: node.address,
                qemu: qemu.clone(),
                qemu_log: file("qemu.log"),
                serial_input: Mutex::new(SerialInput::new(machine.serial_socket.clone())),
                machine,
                netns: netns.clone(),
                child: Mutex::new(None),
            });
        }
        tracing::info!(netns = netns.name(), accel = accel.as_str(), work_dir = %work_dir.display(), "cluster created");
        let spec = ClusterSpec { work_dir, ..spec };
        Ok(Cluster {
            vms,
            netns,
            spec,
            accel,
        })
    }

    pub fn spec(&self) -> &ClusterSpec {
        &self.spec
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    pub fn netns(&self) -> &Arc<Netns> {
        &self.netns
    }

    pub fn work_dir(&self) -> &Path {
        &self.spec.work_dir
    }

    pub fn vms(&self) -> &[Vm] {
        &self.vms
    }

    /// The VM of node `name`.
    pub fn vm(&self, name: &str) -> Result<&Vm> {
        self.vms
            .iter()
            .find(|v| v.name == name)
            .ok_or_else(|| Error::NoSuchNode(name.to_string()))
    }

    /// Run a command inside the namespace (as the client) and collect its output.
    pub fn run(&self, argv: &[&str]) -> Result<std::process::Output> {
        self.netns.output(argv)
    }

    /// `POST /api/peer/signal?service=S&signal=SIG` on a node's admin port, from the client,
    /// with a client certificate from the cluster CA (`cert`: certificate and key files): the
    /// node's supervisor signals one of its services (fault drills: kill the balancer).
    pub fn peer_signal(
        &self,
        address: Ipv4Addr,
        admin_port: u16,
        cert: (&Path, &Path),
        service: &str,
        signal: &str,
    ) -> Result<()> {
        let url = format!(
            "https://{address}:{admin_port}/api/peer/signal?service={service}&signal={signal}"
        );
        let curl = tools::find(tools::CURL)?;
        let (curl, crt, key) = (
            curl.to_string_lossy(),
            cert.0.display().to_string(),
            cert.1.display().to_string(),
        );
        let out = self.netns.output(&[
            &*curl,
            "-sk",
            "--max-time",
            "5",
            "-X",
            "POST",
            "--cert",
            &crt,
            "--key",
            &key,
            "-w",
            " %{http_code}",
            &url,
        ])?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if text.ends_with(" 200") {
            Ok(())
        } else {
            Err(Error::Http(format!("POST {url}: {text:?}")))
        }
    }

    /// GET `url` from the client with curl (TLS not verified), any status. Fails only when no
    /// HTTP answer came (refused, unreachable, timed out).
    pub fn http_get(&self, url: &str, timeout: Duration) -> Result<HttpResponse> {
        let curl = tools::find(tools::CURL)?;
        let max_time = format!("{:.1}", timeout.as_secs_f64().max(0.1));
        let curl = curl.to_string_lossy();
        let argv = [
            &*curl,
            "-sS",
            "-k",
            "--max-time",
            &max_time,
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            url,
        ];
        let out = self.netns.output(&argv)?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(Error::Http(format!("GET {url}: {err}")));
        }
        parse_curl_output(&out.stdout)
            .ok_or_else(|| Error::Http(format!("GET {url}: unreadable curl output")))
    }

    /// Poll `url` until the answer satisfies `accept`, at most `timeout`.
    pub fn wait_http(
        &self,
        url: &str,
        timeout: Duration,
        accept: impl Fn(&HttpResponse) -> bool,
    ) -> Result<HttpResponse> {
        let per_try = Duration::from_secs(10).min(timeout);
        serial::wait_for(timeout, &format!("GET {url}"), || {
            let resp = self.http_get(url, per_try)?;
            if accept(&resp) {
                Ok(resp)
            } else {
                Err(Error::Http(format!(
                    "status {}, body {:?}",
                    resp.status,
                    truncate(&resp.body, 200)
                )))
            }
        })
    }

    /// `https://<address>:<port>/node.html` of `vm` (its balancer): answers 200 once the node
    /// serves clients. nginx's own port is open to cluster peers only.
    pub fn node_page_url(vm: &Vm, port: u16) -> String {
        format!("https://{}:{port}{NODE_PAGE}", vm.address())
    }

    /// Wait until every node's page answers 200 (see [`Cluster::node_page_url`]), at most
    /// `timeout`, giving up when `cancel` fires. The error names the nodes still silent.
    pub fn wait_nodes_serving(&self, port: u16, timeout: Duration, cancel: &Cancel) -> Result<()> {
        let t0 = Instant::now();
        let mut waiting: Vec<&Vm> = self.vms.iter().collect();
        loop {
            let mut last = None;
            waiting.retain(|vm| {
                match self.http_get(&Cluster::node_page_url(vm, port), READY_TRY) {
                    Ok(r) if r.status == 200 => return false,
                    Ok(r) => last = Some(format!("{}: status {}", vm.name(), r.status)),
                    Err(e) => last = Some(format!("{}: {e}", vm.name())),
                }
                true
            });
            if waiting.is_empty() {
                return Ok(());
            }
            if let Some(vm) = waiting.iter().find(|vm| !vm.is_running()) {
                return Err(vm.err("QEMU is not running while waiting for its page"));
            }
            if t0.elapsed() >= timeout {
                let names: Vec<&str> = waiting.iter().map(|v| v.name()).collect();
                return Err(Error::Timeout {
                    what: format!("{NODE_PAGE} of {} on port {port}", names.join(", ")),
                    after: timeout,
                    last,
                });
            }
            if !cancel.sleep(Duration::from_secs(1)) {
                return Err(Error::Cancelled);
            }
        }
    }

    /// The nodes that answer ARP for `vip` on the client's LAN, by name (a MAC that is no node's
    /// stays as text), sorted. Empty: nobody holds it; two or more: a split brain. Takes
    /// [`vip::ARPING_SECONDS`].
    pub fn vip_holders(&self, vip: Ipv4Addr) -> Result<Vec<String>> {
        let macs = vip::arp_macs(&self.netns, vip)?;
        Ok(vip::name_holders(
            &macs,
            self.vms.iter().map(|v| (v.name(), v.address())),
        ))
    }

    /// Poll [`Cluster::vip_holders`] until exactly one node answers; its name. The error says
    /// what the last look saw (`nobody`, `server1 and server2`).
    pub fn wait_single_holder(&self, vip: Ipv4Addr, timeout: Duration) -> Result<String> {
        self.wait_single_holder_or_cancel(vip, timeout, &Cancel::new())
    }

    /// [`Cluster::wait_single_holder`], giving up with [`Error::Cancelled`] when `cancel` fires.
    pub fn wait_single_holder_or_cancel(
        &self,
        vip: Ipv4Addr,
        timeout: Duration,
        cancel: &Cancel,
    ) -> Result<String> {
        vip::wait_single(vip, timeout, cancel, || self.vip_holders(vip))
    }

    /// Start a client probe loop inside the namespace (see [`Probe`]).
    pub fn start_probe(&self, opts: ProbeOptions) -> Result<Probe> {
        Probe::start(&self.netns, opts)
    }

    /// The last `n` lines of every VM's serial log (and QEMU's own stderr, when it said anything),
    /// each under a header. Put it in every failure message.
    pub fn tails(&self, n: usize) -> String {
        let mut out = serial::format_tails(self.vms.iter().map(|v| (v.name(), v.serial_path())), n);
        for vm in &self.vms {
            let qemu_log = serial::read_since(&vm.qemu_log, Mark(0));
            if !qemu_log.trim().is_empty() {
                out.push_str(&serial::format_tails(
                    [(vm.name(), vm.qemu_log.as_path())],
                    n,
                ));
            }
        }
        out
    }

    /// Ask every running VM to power off (ACPI), wait up to `timeout`, then kill the rest.
    pub fn shutdown(&self, timeout: Duration) {
        for vm in self.vms.iter().filter(|v| v.is_running()) {
            if let Err(e) = vm.power_off() {
                tracing::warn!("{e}");
            }
        }
        let deadline = Instant::now() + timeout;
        for vm in &self.vms {
            let left = deadline.saturating_duration_since(Instant::now());
            if vm.wait_exit(left).is_err() {
                tracing::warn!(node = vm.name(), "no clean power-off in time; killing");
                let _ = vm.kill();
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for vm in &self.vms {
            let _ = vm.kill();
        }
        self.netns.delete();
        let keep = std::thread::panicking() || std::env::var(KEEP_ENV).is_ok_and(|v| v == "1");
        if keep {
            eprintln!(
                "tandem-qemu: kept work dir {} (serial logs, overlays)",
                self.spec.work_dir.display()
            );
            return;
        }
        // Runtime bits go; the logs stay for whoever looks afterwards.
        for vm in &self.vms {
            let m = &vm.machine;
            for p in [&m.disk, &m.vars, &m.qmp_socket, &m.serial_socket] {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// One VM. Every operation takes `&self`, so a shared cluster can be driven from any thread.
pub struct Vm {
    name: String,
    address: Ipv4Addr,
    qemu: PathBuf,
    qemu_log: PathBuf,
    machine: MachineConfig,
    netns: Arc<Netns>,
    child: Mutex<Option<Child>>,
    serial_input: Mutex<SerialInput>,
}

impl Vm {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    pub fn tap(&self) -> &str {
        &self.machine.tap
    }

    pub fn serial_path(&self) -> &Path {
        &self.machine.serial_log
    }

    /// The serial console's input socket (see [`Vm::serial_write`]).
    pub fn serial_socket(&self) -> &Path {
        &self.machine.serial_socket
    }

    pub fn qmp_path(&self) -> &Path {
        &self.machine.qmp_socket
    }

    /// The VM's qcow2 overlay (its disk). Only to be touched while QEMU is not running.
    pub fn disk(&self) -> &Path {
        &self.machine.disk
    }

    /// `len` bytes at `offset` of the VM's disk (its overlay over the node image), read from
    /// the host, also while QEMU runs: what the guest wrote and flushed (see [`read_image`]).
    /// Offsets are the raw image's: a partition's come from
    /// `image_builder::disk::partition_extent` on the node's `.img`.
    ///
    /// [`read_image`]: crate::read_image
    pub fn read_disk(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        crate::disk::read_image(&self.machine.disk, offset, len).map_err(|e| Error::Vm {
            node: self.name.clone(),
            what: format!("reading {len} bytes of its disk at offset {offset}: {e}"),
        })
    }

    /// The full QEMU command line (for logs and humans).
    pub fn command_line(&self) -> String {
        let mut s = self.qemu.display().to_string();
        for a in machine::qemu_args(&self.machine) {
            s.push(' ');
            s.push_str(&a);
        }
        s
    }

    /// Start QEMU on the VM's overlay (first boot, or again after a power-off or kill).
    pub fn start(&self) -> Result<()> {
        let mut child = self.lock();
        if let Some(c) = child.as_mut() {
            if matches!(c.try_wait(), Ok(None)) {
                return Err(self.err("start: QEMU is already running"));
            }
        }
        let _ = std::fs::remove_file(&self.machine.qmp_socket);
        let _ = std::fs::remove_file(&self.machine.serial_socket);
        self.input().disconnect();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.qemu_log)
            .map_err(|e| Error::io("opening the QEMU log", &self.qemu_log, e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| Error::io("opening the QEMU log", &self.qemu_log, e))?;
        let mut cmd = Command::new(&self.qemu);
        cmd.args(machine::qemu_args(&self.machine))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        tracing::info!(node = %self.name, "starting: {}", self.command_line());
        let mut started = self.netns.spawn(cmd)?;
        // Ready once the QMP socket answers; an early exit (bad argument, tap busy) is an error.
        let t0 = Instant::now();
        loop {
            if let Ok(Some(status)) = started.try_wait() {
                let tail = serial::tail(&serial::read_since(&self.qemu_log, Mark(0)), 5).join("\n");
                return Err(Error::VmExited {
                    node: self.name.clone(),
                    status: status.to_string(),
                    what: format!("QMP to come up: {tail}"),
                });
            }
            if Qmp::connect(&self.machine.qmp_socket, Duration::ZERO).is_ok() {
                break;
            }
            if t0.elapsed() > QMP_TIMEOUT {
                let _ = started.kill();
                let _ = started.wait();
                return Err(self.err("QEMU started but its QMP socket never answered"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        *child = Some(started);
        Ok(())
    }

    /// Whether QEMU is running (paused counts as running).
    pub fn is_running(&self) -> bool {
        matches!(self.lock().as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Run a QMP command and return its result.
    pub fn qmp(&self, command: &str, arguments: Option<&Value>) -> Result<Value> {
        let mut q =
            Qmp::connect(&self.machine.qmp_socket, Duration::from_secs(5)).map_err(|what| {
                Error::Qmp {
                    node: self.name.clone(),
                    what,
                }
            })?;
        q.execute(command, arguments).map_err(|what| Error::Qmp {
            node: self.name.clone(),
            what,
        })
    }

    /// ACPI power button (the guest shuts down cleanly; QEMU then exits). Does not wait.
    pub fn power_off(&self) -> Result<()> {
        self.qmp("system_powerdown", None).map(|_| ())
    }

    /// Ctrl-Alt-Del on the VM's keyboard: the guest's PID 1 reboots cleanly; QEMU keeps running.
    pub fn reboot_ctrl_alt_del(&self) -> Result<()> {
        self.qmp(
            "send-key",
            Some(&qmp::send_key_args(&["ctrl", "alt", "delete"])),
        )
        .map(|_| ())
    }

    /// Power cut: SIGKILL to QEMU. Nothing the guest had not written to disk survives.
    /// A VM that is not running is left alone.
    pub fn kill(&self) -> Result<()> {
        let mut child = self.lock();
        if let Some(c) = child.as_mut() {
            if matches!(c.try_wait(), Ok(None)) {
                c.kill().map_err(|e| self.err(format!("kill: {e}")))?;
            }
            let _ = c.wait();
        }
        drop(child);
        self.input().disconnect();
        Ok(())
    }

    /// Freeze the guest (QMP `stop`): its clock and network stop answering.
    pub fn pause(&self) -> Result<()> {
        self.qmp("stop", None).map(|_| ())
    }

    pub fn resume(&self) -> Result<()> {
        self.qmp("cont", None).map(|_| ())
    }

    /// QEMU's run state, e.g. `running`, `paused`, `shutdown`.
    pub fn status(&self) -> Result<String> {
        let v = self.qmp("query-status", None)?;
        Ok(v.get("status")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string())
    }

    /// Unplug the VM's cable: its tap goes down, so nothing passes either way.
    pub fn cut_network(&self) -> Result<()> {
        self.netns
            .ip_cmd(&["link", "set", &self.machine.tap, "down"])
    }

    pub fn restore_network(&self) -> Result<()> {
        self.netns.ip_cmd(&["link", "set", &self.machine.tap, "up"])
    }

    /// Wait until QEMU exits, at most `timeout`.
    pub fn wait_exit(&self, timeout: Duration) -> Result<ExitStatus> {
        let t0 = Instant::now();
        loop {
            {
                let mut child = self.lock();
                match child.as_mut() {
                    None => return Err(self.err("wait_exit: QEMU was never started")),
                    Some(c) => match c.try_wait() {
                        Ok(Some(status)) => return Ok(status),
                        Ok(None) => {}
                        Err(e) => return Err(self.err(format!("wait: {e}"))),
                    },
                }
            }
            if t0.elapsed() >= timeout {
                return Err(Error::Timeout {
                    what: format!("{} to exit", self.name),
                    after: timeout,
                    last: None,
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Everything the serial console printed since this cluster was created.
    pub fn serial_text(&self) -> String {
        serial::read_since(&self.machine.serial_log, Mark(0))
    }

    /// What the serial console printed after `since`.
    pub fn serial_since(&self, since: Mark) -> String {
        serial::read_since(&self.machine.serial_log, since)
    }

    /// The current end of the serial log: pass it to [`Vm::wait_serial_since`] to look only at
    /// what comes next (e.g. after a reboot).
    pub fn serial_mark(&self) -> Mark {
        serial::mark(&self.machine.serial_log)
    }

    /// Wait for a serial line containing `needle`, anywhere in the log.
    pub fn wait_serial(&self, needle: &str, timeout: Duration) -> Result<String> {
        self.wait_serial_since(Mark(0), needle, timeout)
    }

    /// Wait for a serial line containing `needle`, printed after `since`.
    pub fn wait_serial_since(
        &self,
        since: Mark,
        needle: &str,
        timeout: Duration,
    ) -> Result<String> {
        self.wait_serial_line(
            since,
            &format!("{needle:?} on {}'s serial console", self.name),
            timeout,
            |l| l.contains(needle),
        )
    }

    /// Wait for a serial line after `since` for which `matches` holds. Fails early if QEMU exits.
    pub fn wait_serial_line(
        &self,
        since: Mark,
        what: &str,
        timeout: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let t0 = Instant::now();
        loop {
            if let Some(line) = serial::find_line(
                &serial::read_since(&self.machine.serial_log, since),
                &matches,
            ) {
                return Ok(line);
            }
            if let Some(Ok(Some(status))) = self.lock().as_mut().map(|c| c.try_wait()) {
                return Err(Error::VmExited {
                    node: self.name.clone(),
                    status: status.to_string(),
                    what: what.to_string(),
                });
            }
            if t0.elapsed() >= timeout {
                return Err(Error::Timeout {
                    what: what.to_string(),
                    after: timeout,
                    last: None,
                });
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Type `bytes` on the VM's serial console (its UART's input), as a terminal would send
    /// them: a line ends with `\r`. Returns once QEMU's socket took them; the guest reads them
    /// at its own pace (QEMU passes on what the UART can take).
    pub fn serial_write(&self, bytes: &[u8]) -> Result<()> {
        if !self.is_running() {
            return Err(self.err("serial write: QEMU is not running"));
        }
        self.input().write(bytes).map_err(|e| {
            Error::io(
                "writing to the serial console",
                &self.machine.serial_socket,
                e,
            )
        })
    }

    /// Wait until the serial console prints `text` after `since` (anywhere, also without a
    /// newline after it, as a prompt); returns the mark just past it. Fails early if QEMU
    /// exits.
    pub fn wait_serial_text(&self, since: Mark, text: &str, timeout: Duration) -> Result<Mark> {
        let what = format!("{text:?} on {}'s serial console", self.name);
        let t0 = Instant::now();
        loop {
            let bytes = serial::read_bytes_since(&self.machine.serial_log, since);
            if let Some(end) = serial::find_end(&bytes, text.as_bytes()) {
                return Ok(Mark(since.0 + end as u64));
            }
            if let Some(Ok(Some(status))) = self.lock().as_mut().map(|c| c.try_wait()) {
                return Err(Error::VmExited {
                    node: self.name.clone(),
                    status: status.to_string(),
                    what,
                });
            }
            if t0.elapsed() >= timeout {
                return Err(Error::Timeout {
                    what,
                    after: timeout,
                    last: None,
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Answer a console prompt: wait for `<key>> ` after `since`, then type `answer` and Enter
    /// (`\r`). Returns the mark just past the prompt (what the guest prints next comes after
    /// it: pass it to the next call). `answer` is one line (a line end in it would be a second
    /// answer: an error) and is never logged (it may be a password).
    pub fn answer_prompt(
        &self,
        since: Mark,
        key: &str,
        answer: &str,
        timeout: Duration,
    ) -> Result<Mark> {
        if answer.contains(['\r', '\n']) {
            return Err(self.err(format!(
                "the answer to {key}> has a line end in it (trim it; type several lines with serial_write)"
            )));
        }
        let after = self.wait_serial_text(since, &format!("{key}> "), timeout)?;
        let mut line = answer.as_bytes().to_vec();
        line.push(b'\r');
        self.serial_write(&line)?;
        Ok(after)
    }

    fn input(&self) -> std::sync::MutexGuard<'_, SerialInput> {
        self.serial_input.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn err(&self, what: impl Into<String>) -> Error {
        Error::Vm {
            node: self.name.clone(),
            what: what.into(),
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// `qemu-img create` an overlay at `overlay` backed by `image` (absolute path, format by
/// extension), `extra` bytes larger than the image.
fn make_overlay(image: &Path, overlay: &Path, extra: u64) -> Result<()> {
    let image = std::fs::canonicalize(image)
        .map_err(|e| Error::io("resolving the node image", image, e))?;
    let _ = std::fs::remove_file(overlay);
    let qemu_img = tools::find(tools::QEMU_IMG)?;
    run_checked(
        Command::new(qemu_img)
            .args([
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                machine::image_format(&image),
                "-b",
            ])
            .arg(&image)
            .arg(overlay)
            .args(match extra {
                0 => None,
                extra => Some((virtual_size(&image)? + extra).to_string()),
            }),
    )
    .map(|_| ())
}

/// The virtual size of a disk image in bytes (`qemu-img info`).
fn virtual_size(image: &Path) -> Result<u64> {
    let qemu_img = tools::find(tools::QEMU_IMG)?;
    let out = run_checked(
        Command::new(qemu_img)
            .args(["info", "-U", "--output=json"])
            .arg(image),
    )?;
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| Error::Spec(format!("qemu-img info {}: {e}", image.display())))?;
    info["virtual-size"].as_u64().ok_or_else(|| {
        Error::Spec(format!(
            "qemu-img info {}: no virtual-size",
            image.display()
        ))
    })
}

/// curl's stdout with `-w '\n%{http_code}'`: the body, a newline, the status.
pub(crate) fn parse_curl_output(stdout: &[u8]) -> Option<HttpResponse> {
    let text = String::from_utf8_lossy(stdout);
    let (body, code) = text.rsplit_once('\n')?;
    let status = code.trim().parse().ok()?;
    Some(HttpResponse {
        status,
        body: body.to_string(),
    })
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ClusterSpec {
        ClusterSpec::new("/tmp/w")
            .node("server1", Ipv4Addr::new(10, 88, 0, 11), "/i/server1.qcow2")
            .node("server2", Ipv4Addr::new(10, 88, 0, 12), "/i/server2.qcow2")
    }

    #[test]
    fn an_overlay_can_be_larger_than_its_image() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("node.qcow2");
        let status = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&image)
            .arg("64M")
            .status()
            .unwrap();
        assert!(status.success());
        let same = dir.path().join("same.qcow2");
        make_overlay(&image, &same, 0).unwrap();
        assert_eq!(virtual_size(&same).unwrap(), 64 << 20);
        let larger = dir.path().join("larger.qcow2");
        make_overlay(&image, &larger, 1 << 30).unwrap();
        assert_eq!(virtual_size(&larger).unwrap(), (64 << 20) + (1 << 30));
    }

    #[test]
    fn spec_checks() {
        assert!(spec().check().is_ok());
        let check_err = |s: ClusterSpec, needle: &str| {
            let e = s.check().unwrap_err().to_string();
            assert!(e.contains(needle), "{e:?} should mention {needle:?}");
        };
        check_err(ClusterSpec::new("/w"), "no nodes");
        check_err(
            spec().node("server1", Ipv4Addr::new(10, 88, 0, 13), "/x"),
            "listed twice",
        );
        check_err(
            spec().node("server3", Ipv4Addr::new(10, 88, 0, 12), "/x"),
            "used twice",
        );
        check_err(
            spec().node("server3", Ipv4Addr::new(10, 88, 0, 1), "/x"),
            "used twice",
        );
        check_err(
            spec().node("server3", Ipv4Addr::new(10, 89, 0, 13), "/x"),
            "outside 10.88.0.1/24",
        );
        check_err(
            spec().node("a b", Ipv4Addr::new(10, 88, 0, 13), "/x"),
            "node name",
        );
        check_err(
            ClusterSpec {
                id: "x/y".into(),
                ..spec()
            },
            "cluster id",
        );
    }

    #[test]
    fn ids_are_unique_and_name_the_namespace() {
        let (a, b) = (ClusterSpec::new("/w"), ClusterSpec::new("/w"));
        assert_ne!(a.id, b.id);
        assert!(a
            .netns_name()
            .starts_with(&format!("tandem-{}-", std::process::id())));
    }

    #[test]
    fn parses_curl_output() {
        let check = |raw: &str, expected: Option<(u16, &str)>| {
            let got = parse_curl_output(raw.as_bytes());
            assert_eq!(
                got,
                expected.map(|(status, body)| HttpResponse {
                    status,
                    body: body.into()
                })
            );
        };
        check(
            "<p>node: server1</p>\n\n200",
            Some((200, "<p>node: server1</p>\n")),
        );
        check("\n404", Some((404, "")));
        check("line1\nline2\n503", Some((503, "line1\nline2")));
        check("no status", None);
    }
}
