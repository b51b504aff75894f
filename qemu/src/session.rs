//! `up` and `down`: a cluster in the foreground for a human, reachable from the host's browser.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::unistd::Pid;

use crate::cluster::{Cluster, ClusterSpec};
use crate::error::{Error, Result};
use crate::forward::{Forward, Forwarder};

/// The pid file of a running `up`, in its run dir.
pub const PID_FILE: &str = "tandem-qemu.pid";

/// What `up` runs.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// The cluster; its work dir is the run dir (logs, overlays, pid file).
    pub spec: ClusterSpec,
    pub forwards: Vec<Forward>,
    /// How long the guests get to power off cleanly before they are killed.
    pub shutdown_timeout: Duration,
    /// Name the floating IP's holder once the nodes serve (printed on stdout).
    pub vip: Option<VipWatch>,
}

/// How `up` finds out who holds the floating IP.
#[derive(Debug, Clone)]
pub struct VipWatch {
    pub ip: Ipv4Addr,
    /// The nodes serve once `https://<node>:<page_port>/node.html` (their balancers) answers 200.
    pub page_port: u16,
    /// How long the nodes get to boot and serve.
    pub boot_timeout: Duration,
    /// How long after that one node must hold the address.
    pub hold_timeout: Duration,
    /// Where the host reaches the floating IP (the forward), for the message.
    pub host_url: String,
}

/// Set once, by a signal or by whoever owns the work; long waits check it and give up.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn new() -> Cancel {
        Cancel::default()
    }

    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Sleep `d`, waking early when cancelled. `false`: cancelled.
    pub fn sleep(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        loop {
            if self.is_cancelled() {
                return false;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            std::thread::sleep(left.min(Duration::from_millis(100)));
        }
    }
}

/// SIGINT and SIGTERM, blocked in every thread so that `up` can `sigwait` for them.
pub struct ShutdownSignals(SigSet);

impl ShutdownSignals {
    /// Block the signals. Call first thing in `main`, before any thread exists: threads inherit
    /// the mask, so the signal is left pending for [`ShutdownSignals::wait`].
    pub fn block() -> Result<ShutdownSignals> {
        let mut set = SigSet::empty();
        set.add(Signal::SIGINT);
        set.add(Signal::SIGTERM);
        nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None).map_err(
            |e| Error::Io {
                what: "blocking SIGINT/SIGTERM".into(),
                path: PathBuf::new(),
                source: e.into(),
            },
        )?;
        Ok(ShutdownSignals(set))
    }

    /// Wait for Ctrl-C or SIGTERM (`down`).
    pub fn wait(&self) -> Signal {
        self.0.wait().unwrap_or(Signal::SIGTERM)
    }

    /// A [`Cancel`] fired by the first signal, from a thread that waits for them. A second
    /// signal exits at once: the VMs die with this process (PDEATHSIG) and the next run removes
    /// the namespace left behind.
    pub fn watch(&self) -> Cancel {
        let cancel = Cancel::new();
        let (set, flag) = (self.0, cancel.clone());
        let spawned = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let first = set.wait().unwrap_or(Signal::SIGTERM);
                eprintln!("tandem-qemu: {first}: cleaning up (again to exit at once)");
                flag.cancel();
                let _ = set.wait();
                eprintln!("tandem-qemu: second signal: exiting now");
                std::process::exit(130);
            });
        if let Err(e) = spawned {
            tracing::warn!("no signal watcher thread ({e}); Ctrl-C is ignored");
        }
        cancel
    }
}

/// A run dir claimed by this process: its pid file names us until dropped, so `down --run-dir`
/// reaches us and a second run on the same dir is refused.
pub struct RunDir {
    pid_file: PathBuf,
}

impl RunDir {
    pub fn claim(run_dir: &Path) -> Result<RunDir> {
        std::fs::create_dir_all(run_dir)
            .map_err(|e| Error::io("creating the run dir", run_dir, e))?;
        let pid_file = run_dir.join(PID_FILE);
        if let Some(pid) = running_pid(&pid_file) {
            return Err(Error::AlreadyUp {
                run_dir: run_dir.to_path_buf(),
                pid,
            });
        }
        std::fs::write(&pid_file, format!("{}\n", std::process::id()))
            .map_err(|e| Error::io("writing the pid file", &pid_file, e))?;
        Ok(RunDir { pid_file })
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.pid_file);
    }
}

/// Boot the cluster, forward ports, call `ready` (to print where things are), name the floating
/// IP's holder once the nodes serve, then wait for a signal and power everything off cleanly.
pub fn up(opts: &UpOptions, signals: &ShutdownSignals, ready: impl FnOnce(&Cluster)) -> Result<()> {
    let _run_dir = RunDir::claim(&opts.spec.work_dir)?;
    let cluster = Cluster::boot(opts.spec.clone())?;
    let forwarder = Forwarder::start(cluster.netns().clone(), &opts.forwards)?;
    ready(&cluster);
    let stop = Cancel::new();
    let signal = std::thread::scope(|s| {
        if let Some(watch) = &opts.vip {
            s.spawn(|| {
                if let Some(line) = vip_line(&cluster, watch, &stop) {
                    println!("{line}");
                }
            });
        }
        let signal = signals.wait();
        stop.cancel();
        signal
    });
    tracing::info!(?signal, "shutting down");
    drop(forwarder);
    cluster.shutdown(opts.shutdown_timeout);
    Ok(())
}

/// `floating IP … is held by …`, once the nodes serve; `None` when stopped before.
fn vip_line(cluster: &Cluster, watch: &VipWatch, stop: &Cancel) -> Option<String> {
    let ip = watch.ip;
    if let Err(e) = cluster.wait_nodes_serving(watch.page_port, watch.boot_timeout, stop) {
        return (!stop.is_cancelled())
            .then(|| format!("floating IP {ip}: no node holds it yet (nodes not serving: {e})"));
    }
    match cluster.wait_single_holder_or_cancel(ip, watch.hold_timeout, stop) {
        Ok(node) => Some(format!(
            "floating IP {ip} is held by {node} ({})",
            watch.host_url
        )),
        Err(Error::Cancelled) => None,
        Err(Error::Timeout {
            last: Some(last), ..
        }) if last.starts_with("nobody") => Some(format!("floating IP {ip}: no node holds it yet")),
        Err(e) => Some(format!("floating IP {ip}: {e}")),
    }
}

/// Human-readable summary of a running cluster and its forwards.
pub fn describe(cluster: &Cluster, forwards: &[Forward]) -> String {
    let mut s = format!(
        "Tandem cluster up ({} VMs, {}, namespace {}, client {})\n",
        cluster.vms().len(),
        cluster.accel().as_str(),
        cluster.netns().name(),
        cluster.spec().client
    );
    for f in forwards {
        s.push_str(&format!("  {:<28} {} -> {}\n", f.label, f.listen, f.target));
    }
    for vm in cluster.vms() {
        s.push_str(&format!(
            "  {:<8} {:<12} serial log {}\n",
            vm.name(),
            vm.address(),
            vm.serial_path().display()
        ));
    }
    s.push_str(&format!(
        "Stop with Ctrl-C or `tandem-qemu down --run-dir {}`.\n",
        cluster.work_dir().display()
    ));
    s
}

/// Signal the `up` running from `run_dir` and wait until it has exited. `Ok(false)`: none was.
pub fn down(run_dir: &Path, timeout: Duration) -> Result<bool> {
    let pid_file = run_dir.join(PID_FILE);
    let Some(pid) = running_pid(&pid_file) else {
        return Ok(false);
    };
    nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGTERM).map_err(|e| Error::Io {
        what: format!("signalling pid {pid}"),
        path: pid_file.clone(),
        source: e.into(),
    })?;
    let t0 = Instant::now();
    while alive(pid) {
        if t0.elapsed() > timeout {
            return Err(Error::Timeout {
                what: format!("pid {pid} to exit"),
                after: timeout,
                last: None,
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(true)
}

fn running_pid(pid_file: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (pid > 0 && alive(pid)).then_some(pid)
}

fn alive(pid: i32) -> bool {
    // A zombie still has /proc/PID, but its state is Z.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}
