//! `up` and `down`: a cluster in the foreground for a human, reachable from the host's browser.

use std::path::{Path, PathBuf};
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
}

/// Boot the cluster, forward ports, call `ready` (to print where things are), then wait for a
/// signal and power everything off cleanly.
pub fn up(opts: &UpOptions, signals: &ShutdownSignals, ready: impl FnOnce(&Cluster)) -> Result<()> {
    let run_dir = &opts.spec.work_dir;
    std::fs::create_dir_all(run_dir).map_err(|e| Error::io("creating the run dir", run_dir, e))?;
    let pid_file = run_dir.join(PID_FILE);
    if let Some(pid) = running_pid(&pid_file) {
        return Err(Error::AlreadyUp {
            run_dir: run_dir.clone(),
            pid,
        });
    }
    std::fs::write(&pid_file, format!("{}\n", std::process::id()))
        .map_err(|e| Error::io("writing the pid file", &pid_file, e))?;
    let result = (|| {
        let cluster = Cluster::boot(opts.spec.clone())?;
        let forwarder = Forwarder::start(cluster.netns().clone(), &opts.forwards)?;
        ready(&cluster);
        let signal = signals.wait();
        tracing::info!(?signal, "shutting down");
        drop(forwarder);
        cluster.shutdown(opts.shutdown_timeout);
        Ok(())
    })();
    let _ = std::fs::remove_file(&pid_file);
    result
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
