//! `appliance init`: PID 1 on a Tandem image.
//!
//! Brings the machine up (pseudo filesystems, kernel modules, seed and data partitions, hostname,
//! static address), hands the node's services to the supervisor, and on Ctrl-Alt-Del (reboot) or
//! the ACPI power button / SIGTERM (poweroff) stops them in order, syncs, unmounts and calls
//! reboot(2). PID 1 must never exit: any error or panic ends in a logged, delayed reboot, which
//! also lets systemd-boot's boot counting fall back to the other slot.

use std::fs;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use cluster_config::Cluster;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::reboot::{reboot, set_cad_enabled, RebootMode};
use nix::sys::signal::{kill, sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::unistd::{sync, Pid};

use crate::node::{self, Layout};
use crate::supervisor::StopReason;

pub const SEED_MOUNT: &str = "/seed";
pub const DATA_MOUNT: &str = "/data";
/// Grow the data partition only when at least this much of the disk lies unused behind it.
const GROW_THRESHOLD_BYTES: u64 = 16 << 20;
/// After a fatal error, wait this long (the serial log keeps the reason) before rebooting.
const FATAL_REBOOT_DELAY: Duration = Duration::from_secs(10);
/// How long processes left after the supervisor stopped get between SIGTERM and SIGKILL.
const FINAL_KILL_GRACE: Duration = Duration::from_secs(3);

/// Open files allowed to every process (MariaDB asks for ~32k with default settings).
const OPEN_FILES_LIMIT: u64 = 65536;

/// What to do once the services are stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Halt {
    Reboot,
    PowerOff,
}

pub fn main() -> anyhow::Result<ExitCode> {
    if std::process::id() != 1 {
        bail!("`appliance init` is PID 1 on a Tandem image; on a developer machine use `appliance run`");
    }
    let halt = match std::panic::catch_unwind(boot_and_supervise) {
        Ok(Ok(halt)) => halt,
        Ok(Err(e)) => {
            tracing::error!(
                "fatal: {e:#}; rebooting in {}s",
                FATAL_REBOOT_DELAY.as_secs()
            );
            std::thread::sleep(FATAL_REBOOT_DELAY);
            Halt::Reboot
        }
        Err(_) => {
            tracing::error!(
                "fatal: init panicked; rebooting in {}s",
                FATAL_REBOOT_DELAY.as_secs()
            );
            std::thread::sleep(FATAL_REBOOT_DELAY);
            Halt::Reboot
        }
    };
    shut_down(halt)
}

fn boot_and_supervise() -> anyhow::Result<Halt> {
    let started = Instant::now();
    mount_pseudo_filesystems()?;
    // Ctrl-Alt-Del becomes SIGINT to us instead of an immediate reset.
    set_cad_enabled(false).context("disabling Ctrl-Alt-Del")?;
    make_signals_deliverable()?;
    raise_open_files_limit();
    load_device_modules();

    let seed_dev = find_partition("seed")?;
    mount_fs(&seed_dev, SEED_MOUNT, "ext4", MsFlags::MS_RDONLY)?;
    let node_name = fs::read_to_string(Path::new(SEED_MOUNT).join("node"))
        .context("reading the seed's node name")?;
    let node_name = node_name.trim();
    let cluster = Cluster::load(&Path::new(SEED_MOUNT).join("cluster.toml"))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let node = cluster
        .node(node_name)
        .with_context(|| format!("seed names node `{node_name}`, absent from its cluster.toml"))?;
    tracing::info!(node = %node.name, address = %node.address, "seed read");

    let data_dev = find_partition("data")?;
    if let Err(e) = grow_partition(&data_dev) {
        // Not fatal: the node works on the image's initial size.
        tracing::warn!("could not grow the data partition: {e:#}");
    }
    mount_data(&data_dev)?;

    nix::unistd::sethostname(&node.name).context("setting the hostname")?;
    configure_network(&cluster, node)?;
    // Fail closed: no service listens before the default-deny ruleset is in place.
    firewall::apply(&firewall::ruleset(&cluster, node)).context("applying the firewall")?;
    tracing::info!("firewall applied");

    let layout = Layout::image();
    let specs = node::services(&cluster, node, &layout, None)?;
    // The supervisor blocks its signals in the calling thread and waits for them; a thread
    // started before that must not have them unblocked, or it would swallow them.
    crate::supervisor::handled_signals()
        .thread_block()
        .context("blocking signals")?;
    spawn_power_button_watch();
    spawn_boot_blessing(layout.socket.clone());
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "system up; starting services"
    );

    let reason = node::supervise(specs, &layout)?;
    tracing::info!(?reason, "services stopped");
    Ok(match reason {
        StopReason::Interrupt => Halt::Reboot,
        StopReason::Terminate | StopReason::Hangup | StopReason::Requested => Halt::PowerOff,
    })
}

/// Stops whatever is left, syncs, unmounts and halts. Never returns.
fn shut_down(halt: Halt) -> ! {
    tracing::info!(?halt, "shutting down");
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    let deadline = Instant::now() + FINAL_KILL_GRACE;
    while Instant::now() < deadline && other_processes_exist() {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    sync();
    for target in [DATA_MOUNT, SEED_MOUNT] {
        if let Err(e) = umount2(target, MntFlags::empty()) {
            tracing::warn!("unmounting {target}: {e}; detaching");
            let _ = umount2(target, MntFlags::MNT_DETACH);
        }
    }
    let _ = mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    );
    sync();
    let mode = match halt {
        Halt::Reboot => RebootMode::RB_AUTOBOOT,
        Halt::PowerOff => RebootMode::RB_POWER_OFF,
    };
    let err = reboot(mode).unwrap_err();
    // reboot(2) only returns on error; PID 1 must not exit, so keep trying.
    loop {
        tracing::error!("reboot(2) failed: {err}");
        std::thread::sleep(Duration::from_secs(5));
        let _ = reboot(RebootMode::RB_AUTOBOOT);
    }
}

fn other_processes_exist() -> bool {
    let Ok(entries) = fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|e| {
        e.file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|pid| {
                // Kernel threads have an empty cmdline; they are not ours to wait for.
                pid != 1 && fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
            })
    })
}

/// PID 1 starts with 1024 open files; MariaDB and nginx want far more, and inherit ours.
fn raise_open_files_limit() {
    use nix::sys::resource::{setrlimit, Resource};
    if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, OPEN_FILES_LIMIT, OPEN_FILES_LIMIT) {
        tracing::warn!("raising the open files limit to {OPEN_FILES_LIMIT}: {e}");
    }
}

/// The signals PID 1 acts on must have a handler: the kernel drops signals to init whose
/// disposition is the default. The supervisor blocks and waits for them; the handler never runs.
fn make_signals_deliverable() -> anyhow::Result<()> {
    extern "C" fn ignore(_: libc::c_int) {}
    let action = SigAction::new(
        SigHandler::Handler(ignore),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGCHLD,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ] {
        // SAFETY: the handler does nothing, so it is async-signal-safe.
        unsafe { sigaction(sig, &action) }
            .with_context(|| format!("installing a handler for {sig}"))?;
    }
    Ok(())
}

fn mounted_targets() -> Vec<String> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .collect()
}

/// /proc, /sys, /dev and /run: the initramfs usually moved them over already.
fn mount_pseudo_filesystems() -> anyhow::Result<()> {
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let table: [(&str, &str, &str, MsFlags, Option<&str>); 7] = [
        ("proc", "/proc", "proc", nosuid_nodev_noexec, None),
        ("sysfs", "/sys", "sysfs", nosuid_nodev_noexec, None),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("mode=0620,ptmxmode=0666"),
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
    ];
    for (source, target, fstype, flags, data) in table {
        // /proc first: the check below reads it.
        if target != "/proc" && mounted_targets().iter().any(|t| t == target) {
            continue;
        }
        let _ = fs::create_dir_all(target);
        match mount(Some(source), target, Some(fstype), flags, data) {
            Ok(()) => {}
            Err(nix::errno::Errno::EBUSY) => {}
            Err(e) => bail!("mounting {fstype} on {target}: {e}"),
        }
    }
    for (link, to) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(to, link);
    }
    Ok(())
}

fn mount_fs(dev: &Path, target: &str, fstype: &str, flags: MsFlags) -> anyhow::Result<()> {
    mount(
        Some(dev),
        target,
        Some(fstype),
        flags | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .with_context(|| format!("mounting {} ({fstype}) on {target}", dev.display()))
}

/// The data partition: a fresh filesystem if it has none (never over an existing one).
fn mount_data(dev: &Path) -> anyhow::Result<()> {
    if !has_ext4_magic(dev)? {
        tracing::warn!(dev = %dev.display(), "data partition has no filesystem; creating one");
        run(Command::new("mkfs.ext4")
            .args(["-q", "-L", "data"])
            .arg(dev))?;
    }
    run(Command::new("e2fsck").args(["-p"]).arg(dev)).or_else(|e| {
        // 1 = errors corrected; anything worse is logged, and mounting decides.
        tracing::warn!("e2fsck on the data partition: {e:#}");
        Ok::<(), anyhow::Error>(())
    })?;
    mount_fs(dev, DATA_MOUNT, "ext4", MsFlags::empty())
}

fn has_ext4_magic(dev: &Path) -> anyhow::Result<bool> {
    let mut buf = [0u8; 1082];
    fs::File::open(dev)
        .and_then(|mut f| f.read_exact(&mut buf))
        .with_context(|| format!("reading the superblock of {}", dev.display()))?;
    Ok(buf[1080..1082] == [0x53, 0xEF])
}

/// After switch_root nothing loads modules for devices any more: load the driver of every
/// device the kernel has found (coldplug), plus evdev for the ACPI power button.
fn load_device_modules() {
    let mut aliases = Vec::new();
    collect_modaliases(Path::new("/sys/devices"), &mut aliases, 0);
    aliases.sort();
    aliases.dedup();
    // The power button's input device, and FAT for blessing the boot entry on the ESP.
    aliases.extend(["evdev", "vfat", "nls_cp437", "nls_ascii", "nls_utf8"].map(String::from));
    for chunk in aliases.chunks(200) {
        if let Err(e) = run(Command::new("modprobe")
            .args(["-a", "-q", "-b"])
            .args(chunk))
        {
            tracing::debug!("modprobe: {e:#}");
        }
    }
    tracing::info!(devices = aliases.len(), "device modules loaded");
}

fn collect_modaliases(dir: &Path, out: &mut Vec<String>, depth: usize) {
    if depth > 12 {
        return;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(ft) = entry.file_type() else { continue };
        if ft.is_symlink() {
            continue;
        }
        let path = entry.path();
        if ft.is_dir() {
            collect_modaliases(&path, out, depth + 1);
        } else if entry.file_name() == "modalias" {
            if let Ok(alias) = fs::read_to_string(&path) {
                let alias = alias.trim();
                if !alias.is_empty() {
                    out.push(alias.to_string());
                }
            }
        }
    }
}

/// `/dev/<name>` of the GPT partition labelled `label` (no udev here: read sysfs).
pub fn find_partition(label: &str) -> anyhow::Result<PathBuf> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for entry in fs::read_dir("/sys/class/block")
            .context("listing /sys/class/block")?
            .flatten()
        {
            let uevent = fs::read_to_string(entry.path().join("uevent")).unwrap_or_default();
            if uevent.lines().any(|l| l == format!("PARTNAME={label}")) {
                return Ok(Path::new("/dev").join(entry.file_name()));
            }
        }
        if Instant::now() > deadline {
            bail!("no partition labelled `{label}` found");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn sysfs_u64(path: &Path) -> anyhow::Result<u64> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.trim()
        .parse()
        .with_context(|| format!("{}: not a number", path.display()))
}

/// Grows the data partition (the last one) to the end of the disk and its filesystem with it.
/// Each step is safe to repeat if power fails in between: sfdisk rewrites the table atomically
/// enough for GPT (primary + backup), and resize2fs resumes on an unmounted filesystem.
fn grow_partition(dev: &Path) -> anyhow::Result<()> {
    let name = dev
        .file_name()
        .and_then(|n| n.to_str())
        .context("partition device name")?;
    let sys = fs::canonicalize(Path::new("/sys/class/block").join(name))?;
    let disk_sys = sys.parent().context("partition without a disk")?;
    let disk = Path::new("/dev").join(disk_sys.file_name().context("disk name")?);
    let disk_sectors = sysfs_u64(&disk_sys.join("size"))?;
    let end = sysfs_u64(&sys.join("start"))? + sysfs_u64(&sys.join("size"))?;
    // 33 sectors at the end hold the backup GPT.
    let free_bytes = disk_sectors.saturating_sub(end + 33) * 512;
    if free_bytes < GROW_THRESHOLD_BYTES {
        return Ok(());
    }
    let number = sysfs_u64(&sys.join("partition"))?;
    tracing::info!(
        free_mib = free_bytes >> 20,
        "growing the data partition to fill the disk"
    );
    run(Command::new("sfdisk")
        .args(["--quiet", "--relocate", "gpt-bak-std"])
        .arg(&disk))?;
    run_with_input(
        Command::new("sfdisk")
            .args([
                "--quiet",
                "--no-reread",
                "--no-tell-kernel",
                "-N",
                &number.to_string(),
            ])
            .arg(&disk),
        ", +\n",
    )?;
    run(Command::new("partx")
        .args(["-u", "--nr", &number.to_string()])
        .arg(&disk))?;
    if has_ext4_magic(dev)? {
        run(Command::new("e2fsck").args(["-f", "-p"]).arg(dev))?;
        run(Command::new("resize2fs").arg(dev))?;
    }
    Ok(())
}

/// Loopback up, the node's static address on the first ethernet interface, default route.
fn configure_network(cluster: &Cluster, node: &cluster_config::Node) -> anyhow::Result<()> {
    run(Command::new("ip").args(["link", "set", "lo", "up"]))?;
    let iface = wait_for_ethernet()?;
    let cidr = format!("{}/{}", node.address, cluster.subnet.prefix);
    run(Command::new("ip").args(["addr", "replace", &cidr, "dev", &iface]))?;
    run(Command::new("ip").args(["link", "set", &iface, "up"]))?;
    if let Some(gw) = cluster.gateway {
        run(Command::new("ip").args(["route", "replace", "default", "via", &gw.to_string()]))?;
    }
    tracing::info!(%iface, address = %cidr, "network configured");
    Ok(())
}

fn wait_for_ethernet() -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut names: Vec<String> = fs::read_dir("/sys/class/net")
            .context("listing /sys/class/net")?
            .flatten()
            .filter(|e| e.path().join("device").exists())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        if let Some(first) = names.into_iter().next() {
            return Ok(first);
        }
        if Instant::now() > deadline {
            bail!("no network interface appeared (is the virtio_net module in the image?)");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The ACPI power button (QEMU `system_powerdown`) arrives as KEY_POWER on an input device;
/// it becomes SIGTERM to ourselves, which the supervisor turns into an orderly poweroff.
fn spawn_power_button_watch() {
    const EV_KEY: u16 = 1;
    const KEY_POWER: u16 = 116;
    let Ok(entries) = fs::read_dir("/sys/class/input") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("event") {
            continue;
        }
        let device = fs::read_to_string(entry.path().join("device/name")).unwrap_or_default();
        if !device.contains("Power Button") {
            continue;
        }
        let path = Path::new("/dev/input").join(&name);
        let _ = std::thread::Builder::new()
            .name("power-button".into())
            .spawn(move || {
                let Ok(mut f) = fs::File::open(&path) else {
                    return;
                };
                // struct input_event on 64-bit: timeval (16), type (2), code (2), value (4).
                let mut ev = [0u8; 24];
                while f.read_exact(&mut ev).is_ok() {
                    let kind = u16::from_ne_bytes([ev[16], ev[17]]);
                    let code = u16::from_ne_bytes([ev[18], ev[19]]);
                    let value = i32::from_ne_bytes([ev[20], ev[21], ev[22], ev[23]]);
                    if kind == EV_KEY && code == KEY_POWER && value == 1 {
                        tracing::info!("power button pressed");
                        let _ = kill(Pid::this(), Signal::SIGTERM);
                    }
                }
            });
        tracing::info!(device = %name, "watching the power button");
    }
}

/// How long a boot may take to bring every service up before it stays unblessed (and
/// systemd-boot counts it as a failed try).
const BLESS_DEADLINE: Duration = Duration::from_secs(600);
pub const ESP_MOUNT: &str = "/run/tandem/esp";

/// systemd-boot's boot counting: the entry `appliance-a+N-M.conf` loses a try at every boot
/// until it is renamed to `appliance-a.conf` ("blessed"). We bless only once every service is
/// ready, so a slot that cannot bring the node up runs out of tries and the boot menu falls back.
fn spawn_boot_blessing(socket: PathBuf) {
    let slot = kernel_param("tandem.slot").unwrap_or_else(|| "a".into());
    let _ = std::thread::Builder::new().name("bless-boot".into()).spawn(move || {
        let target = crate::control::Target { socket: Some(socket), state_dir: None };
        let deadline = Instant::now() + BLESS_DEADLINE;
        loop {
            if let Ok(crate::control::Response::Status { services }) =
                crate::control::request(&target, &crate::control::Request::Status)
            {
                if !services.is_empty() && services.iter().all(|s| s.ready) {
                    break;
                }
            }
            if Instant::now() > deadline {
                tracing::warn!(%slot, "services not all ready after {}s: boot entry left unblessed", BLESS_DEADLINE.as_secs());
                return;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        match bless(&slot) {
            Ok(Some(entry)) => tracing::info!(%slot, %entry, "boot entry blessed"),
            Ok(None) => tracing::info!(%slot, "boot entry already blessed"),
            Err(e) => tracing::warn!(%slot, "blessing the boot entry: {e:#}"),
        }
    });
}

/// Renames `loader/entries/appliance-<slot>+…conf` to `appliance-<slot>.conf` on the ESP.
fn bless(slot: &str) -> anyhow::Result<Option<String>> {
    let esp = find_partition("esp")?;
    fs::create_dir_all(ESP_MOUNT)?;
    mount(
        Some(&esp),
        ESP_MOUNT,
        Some("vfat"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .with_context(|| format!("mounting the ESP {}", esp.display()))?;
    let result = (|| {
        let entries = Path::new(ESP_MOUNT).join("loader/entries");
        let prefix = format!("appliance-{slot}+");
        for entry in fs::read_dir(&entries)
            .with_context(|| format!("listing {}", entries.display()))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) && name.ends_with(".conf") {
                fs::rename(entry.path(), entries.join(format!("appliance-{slot}.conf")))
                    .with_context(|| format!("renaming {name}"))?;
                return Ok(Some(name));
            }
        }
        Ok(None)
    })();
    sync();
    if let Err(e) = umount2(ESP_MOUNT, MntFlags::empty()) {
        tracing::warn!("unmounting the ESP: {e}");
    }
    result
}

/// `name=value` from the kernel command line.
fn kernel_param(name: &str) -> Option<String> {
    let cmdline = fs::read_to_string("/proc/cmdline").ok()?;
    cmdline
        .split_whitespace()
        .find_map(|p| p.strip_prefix(name)?.strip_prefix('=').map(str::to_string))
}

/// Runs a helper program to completion. Only used before the supervisor starts (and after it
/// stopped): while it runs, the supervisor's reaper owns every child exit.
fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("running {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

fn run_with_input(cmd: &mut Command, input: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {shown}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let status = child.wait()?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}
