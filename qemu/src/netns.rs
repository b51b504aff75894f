//! The cluster's private network namespace: a bridge (the client's address) and one tap per VM.
//!
//! Processes and sockets that must live inside the namespace are created from threads that
//! joined it with `setns(2)`: processes inherit the namespace of the thread that forked them and
//! sockets keep the namespace they were created in, so the rest of the program stays on the host.
//!
//! All VMs and client commands are forked by one long-lived "spawner" thread with
//! `PR_SET_PDEATHSIG`: if the harness dies (even by SIGKILL) the kernel kills its QEMUs too.

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sched::{setns, CloneFlags};
use nix::sys::prctl::set_pdeathsig;
use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow, Signal};
use nix::unistd::{setpgid, Pid};

use crate::error::{Error, Result};
use crate::tools;

/// Name of the bridge inside the namespace (names are private to it).
pub const BRIDGE: &str = "br0";

struct SpawnRequest {
    command: Command,
    reply: mpsc::Sender<io::Result<Child>>,
}

/// A network namespace this process created; deleted on drop.
pub struct Netns {
    name: String,
    ip: PathBuf,
    spawner: Mutex<Option<mpsc::Sender<SpawnRequest>>>,
    spawner_thread: Mutex<Option<JoinHandle<()>>>,
    deleted: AtomicBool,
}

impl Netns {
    /// Create namespace `name` with loopback up, a bridge holding `client/prefix`, and the given
    /// taps attached to it. Fails if the namespace already exists.
    pub fn create(name: &str, client: Ipv4Addr, prefix: u8, taps: &[String]) -> Result<Netns> {
        let ip = tools::find(tools::IP)?;
        run_checked(Command::new(&ip).args(["netns", "add", name]))?;
        // From here on, dropping `ns` deletes the namespace, also on the error paths below.
        let mut ns = Netns {
            name: name.to_string(),
            ip,
            spawner: Mutex::new(None),
            spawner_thread: Mutex::new(None),
            deleted: AtomicBool::new(false),
        };
        ns.ip_cmd(&["link", "set", "lo", "up"])?;
        // STP off and no forwarding delay: a port forwards as soon as it is up (after a VM
        // restart or a restored cable). Multicast snooping off: VRRP adverts always flood.
        ns.ip_cmd(&[
            "link",
            "add",
            BRIDGE,
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
            "mcast_snooping",
            "0",
        ])?;
        ns.ip_cmd(&["addr", "add", &format!("{client}/{prefix}"), "dev", BRIDGE])?;
        ns.ip_cmd(&["link", "set", BRIDGE, "up"])?;
        for tap in taps {
            ns.ip_cmd(&["tuntap", "add", "dev", tap, "mode", "tap"])?;
            ns.ip_cmd(&["link", "set", tap, "master", BRIDGE])?;
            ns.ip_cmd(&["link", "set", tap, "up"])?;
        }
        ns.start_spawner()?;
        Ok(ns)
    }

    /// The namespace's name (what `ip netns` lists).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file that pins the namespace (what `ip netns` mounts).
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n NAME <args>`, failing with its stderr.
    pub fn ip_cmd(&self, args: &[&str]) -> Result<()> {
        run_checked(Command::new(&self.ip).arg("-n").arg(&self.name).args(args)).map(|_| ())
    }

    /// Move the calling thread into the namespace, for good. Only for threads made for that.
    pub fn enter_current_thread(&self) -> Result<()> {
        enter(&self.path()).map_err(|source| Error::Netns {
            netns: self.name.clone(),
            what: "setns".into(),
            source,
        })
    }

    /// Open a TCP connection from inside the namespace (on a short-lived thread that joined it).
    pub fn connect(&self, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        self.run(|| TcpStream::connect_timeout(&addr, timeout))?
    }

    /// Run `f` on a short-lived thread inside the namespace and return what it returns: the
    /// sockets it opens (an HTTP client's connections) are the namespace's, and stay usable from
    /// any thread afterwards.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        let path = self.path();
        std::thread::scope(|s| {
            s.spawn(|| {
                enter(&path)?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")))
        })
    }

    /// Start `command` inside the namespace. It dies with the harness (PDEATHSIG), runs in its
    /// own process group (a Ctrl-C on the terminal reaches the harness, which then shuts VMs down
    /// cleanly) and with no signals blocked (the harness may block some for `sigwait`).
    pub fn spawn(&self, mut command: Command) -> Result<Child> {
        let what = format!("{command:?}");
        // SAFETY: between fork and exec the closure only makes the async-signal-safe system
        // calls prctl(PR_SET_PDEATHSIG), setpgid and sigprocmask (nix's wrappers around them
        // neither allocate nor lock), and it touches no state shared with other threads.
        unsafe {
            command.pre_exec(|| {
                set_pdeathsig(Signal::SIGKILL)?;
                setpgid(Pid::from_raw(0), Pid::from_raw(0))?;
                sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
                Ok(())
            });
        }
        let (reply, answer) = mpsc::channel();
        let sent = {
            let spawner = self.spawner.lock().unwrap_or_else(|e| e.into_inner());
            spawner
                .as_ref()
                .map(|s| s.send(SpawnRequest { command, reply }).is_ok())
        };
        let source = match (sent, answer.recv()) {
            (Some(true), Ok(result)) => match result {
                Ok(child) => return Ok(child),
                Err(e) => e,
            },
            _ => io::Error::other("the namespace's spawner thread is gone"),
        };
        Err(Error::Spawn {
            command: what,
            source,
        })
    }

    /// Run `argv` inside the namespace to completion, collecting its output (any exit status).
    pub fn output(&self, argv: &[&str]) -> Result<Output> {
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| Error::Spec("empty command".into()))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = self.spawn(cmd)?;
        child.wait_with_output().map_err(|source| Error::Spawn {
            command: argv.join(" "),
            source,
        })
    }

    fn start_spawner(&mut self) -> Result<()> {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let path = self.path();
        let handle = std::thread::Builder::new()
            .name(format!("{}-spawner", self.name))
            .spawn(move || {
                let entered = enter(&path);
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if !ok {
                    return;
                }
                // Lives until the namespace is dropped: it is the parent of every VM.
                for mut req in rx {
                    let _ = req.reply.send(req.command.spawn());
                }
            })
            .map_err(|source| Error::Netns {
                netns: self.name.clone(),
                what: "spawn thread".into(),
                source,
            })?;
        *self
            .spawner_thread
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(handle);
        let entered = ready_rx
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("spawner thread died")));
        entered.map_err(|source| Error::Netns {
            netns: self.name.clone(),
            what: "setns".into(),
            source,
        })?;
        *self.spawner.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        Ok(())
    }
}

impl Netns {
    /// Delete the namespace now (idempotent), even if threads (a forwarded connection) still hold
    /// a reference: its owner decides when it ends. Processes started in it get SIGKILL.
    pub fn delete(&self) {
        if self.deleted.swap(true, Ordering::SeqCst) {
            return;
        }
        // Stopping the spawner kills what it started (PDEATHSIG) and lets go of the namespace.
        self.spawner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let thread = self
            .spawner_thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(t) = thread {
            let _ = t.join();
        }
        if let Err(e) = run_checked(Command::new(&self.ip).args(["netns", "del", &self.name])) {
            tracing::warn!("deleting network namespace {}: {e}", self.name);
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.delete();
    }
}

/// Delete the namespaces of harness processes that died without cleaning up (SIGKILL, OOM):
/// `tandem-<pid>-<n>` whose pid no longer exists. Their VMs died with them (PDEATHSIG).
pub(crate) fn remove_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    let Ok(ip) = tools::find(tools::IP) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = stale_owner(&name) {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                tracing::info!("removing stale network namespace {name}");
                let _ = run_checked(Command::new(&ip).args(["netns", "del", &name]));
            }
        }
    }
}

/// The pid in a namespace name made by [`crate::unique_id`] (`tandem-<pid>-<n>`).
fn stale_owner(name: &str) -> Option<u32> {
    let (pid, n) = name.strip_prefix("tandem-")?.split_once('-')?;
    n.parse::<u32>().ok()?;
    pid.parse().ok()
}

/// Move the calling thread into the network namespace pinned at `path`.
fn enter(path: &std::path::Path) -> io::Result<()> {
    let f = File::open(path)?;
    setns(&f, CloneFlags::CLONE_NEWNET)?;
    Ok(())
}

/// Run a host command to completion; a non-zero exit is an error carrying its stderr.
pub(crate) fn run_checked(cmd: &mut Command) -> Result<Output> {
    let command = format!("{cmd:?}").replace('"', "");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(Error::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_owner_from_name() {
        assert_eq!(stale_owner("tandem-1234-0"), Some(1234));
        assert_eq!(stale_owner("tandem-1234-17"), Some(1234));
        assert_eq!(stale_owner("tandem-demo"), None);
        assert_eq!(stale_owner("tandem-1234-x"), None);
        assert_eq!(stale_owner("other-1234-0"), None);
    }
}
