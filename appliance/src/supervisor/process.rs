//! Processes: spawning a service, the signal thread that reaps every child, and the final
//! sweep of leftover descendants.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fmt;
use std::os::unix::process::CommandExt;
use std::process::{ChildStderr, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};

use nix::errno::Errno;
use nix::sys::prctl;
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::{self, Gid, Pid, Uid, User};

use super::caps;
use super::spec::ServiceSpec;

/// Held while `Command::spawn` runs and while the reaper reaps. std's `spawn` itself waits for
/// a child whose `exec` failed and asserts that wait succeeds; the reaper must not take that
/// child first.
static SPAWN_LOCK: Mutex<()> = Mutex::new(());

/// The commands [`run_to_end`] started and has not collected, by pid: the reaper files the
/// exit of one of these here instead of reporting it. Changed only under [`SPAWN_LOCK`].
static COMMANDS: Mutex<BTreeMap<i32, Option<ExitKind>>> = Mutex::new(BTreeMap::new());

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    Code(i32),
    Signal(i32),
}

impl ExitKind {
    pub fn success(self) -> bool {
        self == ExitKind::Code(0)
    }
}

impl fmt::Display for ExitKind {
    /// `code 1`, `signal 9 (SIGKILL)`: the `detail` of `exited` events.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ExitKind::Code(code) => write!(f, "code {code}"),
            ExitKind::Signal(sig) => match Signal::try_from(sig) {
                Ok(s) => write!(f, "signal {sig} ({})", s.as_str()),
                Err(_) => write!(f, "signal {sig}"),
            },
        }
    }
}

/// What the signal thread reports to the event loop.
#[derive(Debug)]
pub(crate) enum SignalEvent {
    Exited { pid: Pid, exit: ExitKind },
    Shutdown(Signal),
}

/// A running service process; the pipes are handed to log readers.
pub(crate) struct Spawned {
    pub pid: Pid,
    pub stdout: ChildStdout,
    pub stderr: ChildStderr,
}

/// User to switch to in the child, resolved in the parent (no NSS lookups after fork).
pub(crate) struct Credentials {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    /// Every group of the user, its own included (`getgrouplist`).
    pub(crate) groups: Vec<u32>,
}

pub(crate) fn credentials(name: &str) -> Result<(Credentials, User), String> {
    let user = User::from_name(name)
        .map_err(|e| format!("looking up user `{name}`: {e}"))?
        .ok_or_else(|| format!("no user `{name}`"))?;
    let cname = CString::new(name).map_err(|_| format!("user name `{name}` contains NUL"))?;
    let groups = unistd::getgrouplist(&cname, user.gid)
        .map_err(|e| format!("groups of user `{name}`: {e}"))?
        .into_iter()
        .map(|g| g.as_raw())
        .collect();
    Ok((
        Credentials {
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            groups,
        },
        user,
    ))
}

/// Where the kernel says which capability is its last.
const CAP_LAST_CAP_FILE: &str = "/proc/sys/kernel/cap_last_cap";
/// If that file cannot be read: every number a capability set can hold. Dropping a number the
/// kernel does not know fails with EINVAL, which is ignored.
const CAP_LAST_CAP_FALLBACK: u32 = 63;

/// The kernel's highest capability number.
fn cap_last_cap() -> u32 {
    std::fs::read_to_string(CAP_LAST_CAP_FILE)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(CAP_LAST_CAP_FALLBACK)
}

/// Sets the calling thread's permitted, effective and inheritable capabilities to `mask` (bit
/// N: capability N). Async-signal-safe (one raw syscall).
fn set_capabilities(mask: u64) -> std::io::Result<()> {
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    #[repr(C)]
    struct Header {
        version: u32,
        pid: std::ffi::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let word = |w: u64| Data {
        effective: w as u32,
        permitted: w as u32,
        inheritable: w as u32,
    };
    let data = [word(mask), word(mask >> 32)];
    // nix has no capset.
    // SAFETY: capset reads the two structs above, laid out as the kernel's v3 ABI.
    let set = unsafe { libc::syscall(libc::SYS_capset, &header as *const Header, data.as_ptr()) };
    Errno::result(set)?;
    Ok(())
}

/// `prctl(option, arg, 0, 0, 0)`, for the capability options nix does not wrap
/// (`PR_CAPBSET_DROP`, `PR_CAP_AMBIENT`). Async-signal-safe.
fn prctl_raw(
    option: std::ffi::c_int,
    arg: std::ffi::c_ulong,
    arg3: std::ffi::c_ulong,
) -> nix::Result<()> {
    // SAFETY: prctl with integer arguments only.
    Errno::result(unsafe { libc::prctl(option, arg, arg3, 0, 0) }).map(drop)
}

/// The user to switch to, as the child needs it: allocated before the fork.
struct SwitchTo {
    uid: Uid,
    gid: Gid,
    groups: Vec<Gid>,
}

/// What the child does about privileges before `exec`, decided in the parent.
struct Privileges {
    /// Switch to this user (only when the supervisor is root).
    user: Option<SwitchTo>,
    /// The capabilities the service keeps (bit N: capability N).
    keep: u64,
    /// Whether this process may shrink bounding sets (it is root); without that privilege
    /// there is nothing to drop.
    bound: bool,
    last_cap: u32,
}

impl Privileges {
    /// Runs in the forked child: only raw system calls on memory allocated before the fork.
    ///
    /// `no_new_privs` first (nothing exec'd can gain privileges: setuid bits and file
    /// capabilities are ignored), then every capability not kept leaves the bounding set, then
    /// the user switch (keeping capabilities across it only if some are kept), then the kept
    /// set becomes the permitted, effective and inheritable set, and for a user also ambient,
    /// so that it survives `exec`. A root service's capabilities after `exec` are its
    /// bounding set: exactly the kept ones.
    fn apply(&self) -> std::io::Result<()> {
        prctl::set_no_new_privs()?;
        if !self.bound {
            return Ok(());
        }
        for cap in 0..=self.last_cap {
            if self.keep & (1u64 << cap) != 0 {
                continue;
            }
            match prctl_raw(libc::PR_CAPBSET_DROP, cap.into(), 0) {
                // A number the kernel does not know.
                Ok(()) | Err(Errno::EINVAL) => {}
                Err(e) => return Err(e.into()),
            }
        }
        prctl_raw(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as std::ffi::c_ulong,
            0,
        )?;
        if let Some(user) = &self.user {
            if self.keep != 0 {
                prctl::set_keepcaps(true)?;
            }
            unistd::setgroups(&user.groups)?;
            unistd::setgid(user.gid)?;
            unistd::setuid(user.uid)?;
        }
        set_capabilities(self.keep)?;
        if self.user.is_some() {
            for cap in 0..=self.last_cap.min(63) {
                if self.keep & (1u64 << cap) == 0 {
                    continue;
                }
                prctl_raw(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_RAISE as std::ffi::c_ulong,
                    cap.into(),
                )?;
            }
        }
        Ok(())
    }
}

/// Starts `spec`'s program in its own session and process group, stdin from /dev/null,
/// stdout and stderr piped, signal mask and dispositions reset, with `no_new_privs`, as
/// `spec.user` when root and with no capability but `spec.capabilities`.
pub(crate) fn spawn(spec: &ServiceSpec) -> Result<Spawned, String> {
    let mut cmd = Command::new(&spec.argv[0]);
    cmd.args(&spec.argv[1..])
        .envs(&spec.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(cwd) = &spec.cwd {
        cmd.current_dir(cwd);
    }
    let root = Uid::effective().is_root();
    let user = match &spec.user {
        Some(name) if root => {
            let (creds, user) = credentials(name)?;
            for (key, value) in [
                ("HOME", user.dir.as_os_str()),
                ("USER", name.as_ref()),
                ("LOGNAME", name.as_ref()),
            ] {
                if !spec.env.contains_key(key) {
                    cmd.env(key, value);
                }
            }
            Some(SwitchTo {
                uid: Uid::from_raw(creds.uid),
                gid: Gid::from_raw(creds.gid),
                groups: creds.groups.into_iter().map(Gid::from_raw).collect(),
            })
        }
        Some(name) => {
            tracing::debug!(service = %spec.name, user = %name, "not root: running as the current user");
            None
        }
        None => None,
    };
    let privileges = Privileges {
        user,
        keep: caps::mask(&spec.capabilities),
        bound: root,
        last_cap: cap_last_cap(),
    };
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls on memory allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let _ = signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
            for sig in Signal::iterator() {
                if sig != Signal::SIGKILL && sig != Signal::SIGSTOP {
                    let _ = signal::signal(sig, SigHandler::SigDfl);
                }
            }
            unistd::setsid()?;
            privileges.apply()
        });
    }
    let child = {
        let _guard = SPAWN_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
        cmd.spawn()
            .map_err(|e| format!("starting `{}`: {e}", spec.argv[0]))?
    };
    let pid = Pid::from_raw(child.id() as i32);
    // Dropping `Child` neither waits nor kills; the reaper owns the exit status.
    let (Some(stdout), Some(stderr)) = (child.stdout, child.stderr) else {
        unreachable!("stdout and stderr were piped")
    };
    Ok(Spawned {
        pid,
        stdout,
        stderr,
    })
}

/// Runs `argv` to its end, or SIGKILLs it after `timeout`, from the executor's thread. The
/// signal thread reaps every child; this one it files in [`COMMANDS`] instead of reporting it.
/// A pidfd, opened before the reaper can take the child, says when it ended. `Err` says what
/// went wrong, with the command's stderr.
pub(crate) fn run_to_end(argv: &[String], timeout: std::time::Duration) -> Result<(), String> {
    use std::io::Read as _;
    use std::os::fd::{AsFd as _, FromRawFd as _, OwnedFd};

    let program = argv.first().ok_or("no program")?;
    let mut cmd = Command::new(program);
    cmd.args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: only async-signal-safe calls between fork and exec: the child unblocks the
    // signals the supervisor blocks in every thread.
    unsafe {
        cmd.pre_exec(|| {
            let _ = signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
            Ok(())
        });
    }
    let (mut child, pid, pidfd) = {
        // The reaper takes this lock for its whole pass: the child is filed, and its pidfd
        // open, before the reaper can see it.
        let _guard = SPAWN_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
        let child = cmd
            .spawn()
            .map_err(|e| format!("starting `{program}`: {e}"))?;
        let pid = child.id() as i32;
        commands().insert(pid, None);
        // SAFETY: a plain system call; the result is checked before use.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            // Not reachable on the kernels the image ships (pidfd_open is Linux 5.3). The
            // reaper reports the killed child as an orphan.
            let e = std::io::Error::last_os_error();
            commands().remove(&pid);
            let _ = signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            return Err(format!("pidfd_open for `{program}`: {e}"));
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        (child, pid, unsafe { OwnedFd::from_raw_fd(fd as i32) })
    };
    let ended = |limit: std::time::Duration| -> bool {
        let ms = u16::try_from(limit.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [nix::poll::PollFd::new(
            pidfd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        loop {
            match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)) {
                Ok(n) => return n > 0,
                Err(Errno::EINTR) => continue,
                Err(_) => return false,
            }
        }
    };
    let in_time = ended(timeout);
    if !in_time {
        let _ = signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        ended(std::time::Duration::from_secs(1));
    }
    let exit = {
        // Filed or not, it leaves the table here: a pid left in it could later be another
        // child's, whose exit the reaper would then swallow.
        let _guard = SPAWN_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
        match commands().remove(&pid).flatten() {
            Some(exit) => Some(exit),
            // Not reaped yet: reap it here (the reaper waits on this lock, then no longer
            // sees it). Still running (a SIGKILL that did not land within the second): the
            // reaper reports it as an orphan when it ends.
            None => match waitid(
                Id::PIDFd(pidfd.as_fd()),
                WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG,
            ) {
                Ok(WaitStatus::Exited(_, code)) => Some(ExitKind::Code(code)),
                Ok(WaitStatus::Signaled(_, sig, _)) => Some(ExitKind::Signal(sig as i32)),
                _ => None,
            },
        }
    };
    if !in_time {
        return Err(format!(
            "`{program}` killed after {} ms",
            timeout.as_millis()
        ));
    }
    // What it wrote, without waiting: a descendant it left behind may hold the pipe open.
    let mut stderr = String::new();
    if let Some(pipe) = child.stderr.as_mut() {
        let nonblocking = nix::fcntl::fcntl(
            pipe.as_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        );
        if nonblocking.is_ok() {
            let mut bytes = Vec::new();
            let _ = pipe.take(4096).read_to_end(&mut bytes);
            stderr = String::from_utf8_lossy(&bytes).into_owned();
        }
    }
    match exit {
        Some(exit) if exit.success() => Ok(()),
        Some(exit) => Err(format!("`{program}` exited, {exit}: {}", stderr.trim())),
        None => Err(format!("`{program}`: its end was not seen")),
    }
}

fn commands() -> std::sync::MutexGuard<'static, BTreeMap<i32, Option<ExitKind>>> {
    COMMANDS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Sends `sig` to the process group led by `pid`. A group that is already gone is fine.
pub(crate) fn signal_group(pid: Pid, sig: Signal) {
    match signal::killpg(pid, sig) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => tracing::warn!(
            pid = pid.as_raw(),
            "sending {} to process group: {e}",
            sig.as_str()
        ),
    }
}

/// Signals the supervisor handles; blocked in every thread and taken by the signal thread.
pub(crate) fn handled() -> SigSet {
    let mut set = SigSet::empty();
    for sig in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        set.add(sig);
    }
    set
}

extern "C" fn ignore_signal(_: std::ffi::c_int) {}

/// Owns the process-wide signal setup for the duration of `run`.
pub(crate) struct SignalThread {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    old_mask: SigSet,
    old_actions: Vec<(Signal, SigAction)>,
}

impl SignalThread {
    /// Blocks the handled signals in the calling thread (threads started later inherit the
    /// mask) and starts the thread that takes them with `sigwait`.
    ///
    /// Handlers are installed too (doing nothing): PID 1 never receives a signal whose
    /// disposition is the default, and the handlers keep that from depending on the mask.
    pub(crate) fn start(
        on_event: impl Fn(SignalEvent) + Send + 'static,
    ) -> nix::Result<SignalThread> {
        let set = handled();
        let mut old_mask = SigSet::empty();
        signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), Some(&mut old_mask))?;
        let mut old_actions = Vec::new();
        let action = SigAction::new(
            SigHandler::Handler(ignore_signal),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        for sig in set.iter() {
            // SAFETY: the handler does nothing, so it is async-signal-safe.
            let old = unsafe { signal::sigaction(sig, &action) }?;
            old_actions.push((sig, old));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = thread::Builder::new()
            .name("signals".into())
            .spawn(move || signal_loop(set, &on_event, &stop2))
            .map_err(|e| e.raw_os_error().map_or(Errno::EAGAIN, Errno::from_raw))?;
        Ok(SignalThread {
            stop,
            handle: Some(handle),
            old_mask,
            old_actions,
        })
    }
}

impl Drop for SignalThread {
    /// Stops the thread (waking it with a SIGCHLD to ourselves) and restores the caller's
    /// signal mask and handlers.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = signal::kill(unistd::getpid(), Signal::SIGCHLD);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
        for (sig, action) in &self.old_actions {
            // SAFETY: restores what was installed before `start`.
            let _ = unsafe { signal::sigaction(*sig, action) };
        }
        let _ = signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&self.old_mask), None);
    }
}

fn signal_loop(set: SigSet, on_event: &dyn Fn(SignalEvent), stop: &AtomicBool) {
    loop {
        let sig = match set.wait() {
            Ok(sig) => sig,
            Err(e) => {
                tracing::error!("sigwait: {e}");
                thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        if sig == Signal::SIGCHLD {
            reap(on_event);
        } else {
            on_event(SignalEvent::Shutdown(sig));
        }
        if stop.load(Ordering::SeqCst) {
            reap(on_event);
            return;
        }
    }
}

/// The only place that waits for children: reaps every exited child, first killing the rest
/// of its process group (so a service's workers never outlive its main process). Waiting with
/// `WNOWAIT` first keeps the zombie, and so its process-group id, from being reused until the
/// group is signalled.
fn reap(on_event: &dyn Fn(SignalEvent)) {
    let _guard = SPAWN_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        let pid = match waitid(
            Id::All,
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
        ) {
            Ok(status) => match status.pid() {
                Some(pid) => pid,
                None => return,
            },
            Err(Errno::EINTR) => continue,
            Err(Errno::ECHILD) => return,
            Err(e) => {
                tracing::error!("waitid: {e}");
                return;
            }
        };
        // Only a group leader has a group with its own pid; for others this is ESRCH.
        match signal::killpg(pid, Signal::SIGKILL) {
            Ok(()) | Err(Errno::ESRCH) | Err(Errno::EPERM) => {}
            Err(e) => tracing::debug!(pid = pid.as_raw(), "killing process group: {e}"),
        }
        let exit = match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => ExitKind::Code(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => ExitKind::Signal(sig as i32),
            Ok(other) => {
                tracing::debug!(pid = pid.as_raw(), "unexpected wait status {other:?}");
                continue;
            }
            Err(Errno::EINTR) => continue,
            Err(e) => {
                tracing::error!(pid = pid.as_raw(), "waitpid: {e}");
                return;
            }
        };
        // A command of `run_to_end`'s: it collects the exit.
        if let Some(slot) = commands().get_mut(&pid.as_raw()) {
            *slot = Some(exit);
            continue;
        }
        on_event(SignalEvent::Exited { pid, exit });
    }
}

/// Pids whose parent is this process, from /proc (zombies included).
pub(crate) fn children_from_proc() -> Vec<Pid> {
    let me = unistd::getpid().as_raw();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| {
        let entry = entry.ok()?;
        let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
        // `pid (comm) state ppid ...`; comm may contain spaces and parentheses.
        let rest = &stat[stat.rfind(')')? + 1..];
        let ppid: i32 = rest.split_whitespace().nth(1)?.parse().ok()?;
        (ppid == me).then_some(Pid::from_raw(pid))
    })
    .collect()
}

/// SIGKILLs a process (and the group it leads, if any).
pub(crate) fn kill_hard(pid: Pid) {
    let _ = signal::killpg(pid, Signal::SIGKILL);
    let _ = signal::kill(pid, Signal::SIGKILL);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_details() {
        assert_eq!(ExitKind::Code(1).to_string(), "code 1");
        assert_eq!(ExitKind::Signal(9).to_string(), "signal 9 (SIGKILL)");
        assert_eq!(ExitKind::Signal(15).to_string(), "signal 15 (SIGTERM)");
        assert!(ExitKind::Code(0).success());
        assert!(!ExitKind::Signal(15).success());
    }

    #[test]
    fn commands_run_to_their_end_or_are_killed_at_the_timeout() {
        let argv = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let second = std::time::Duration::from_secs(1);
        assert_eq!(run_to_end(&argv(&["true"]), second), Ok(()));
        let e =
            run_to_end(&argv(&["sh", "-c", "echo no such set >&2; exit 3"]), second).unwrap_err();
        assert_eq!(e, "`sh` exited, code 3: no such set");
        let e = run_to_end(&argv(&["/nonexistent/ip"]), second).unwrap_err();
        assert!(e.starts_with("starting `/nonexistent/ip`: "), "{e}");
        let t0 = std::time::Instant::now();
        let e = run_to_end(
            &argv(&["sleep", "10"]),
            std::time::Duration::from_millis(100),
        )
        .unwrap_err();
        assert_eq!(e, "`sleep` killed after 100 ms");
        assert!(t0.elapsed() < second, "took {:?}", t0.elapsed());
        // A descendant holding stderr open does not hold the supervisor up.
        let t0 = std::time::Instant::now();
        let e = run_to_end(
            &argv(&["sh", "-c", "sleep 5 & echo left >&2; exit 1"]),
            second,
        )
        .unwrap_err();
        assert_eq!(e, "`sh` exited, code 1: left");
        assert!(t0.elapsed() < second, "took {:?}", t0.elapsed());
        assert!(
            commands().is_empty(),
            "left in the table: {:?}",
            *commands()
        );
        // Never waited on here: on an image the signal thread reaps them.
    }
}
