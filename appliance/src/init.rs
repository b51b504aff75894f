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

use api::files::{PARTITION_DATA, PARTITION_SEED, SEED_MOUNT};
use api::storage::Degraded;

use crate::layout::{Layout, DATA_MOUNT};
use crate::node;
use crate::supervisor::StopReason;

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
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "PID 1 started");
    mount_pseudo_filesystems()?;
    limit_transparent_huge_pages();
    // Ctrl-Alt-Del becomes SIGINT to us instead of an immediate reset.
    set_cad_enabled(false).context("disabling Ctrl-Alt-Del")?;
    make_signals_deliverable()?;
    raise_open_files_limit();
    load_device_modules();
    mount_efivars();

    let seed_dev = crate::disk::find_partition(PARTITION_SEED)?;
    mount_fs(&seed_dev, SEED_MOUNT, "ext4", MsFlags::MS_RDONLY)?;
    let seed_dir = Path::new(SEED_MOUNT);
    let cluster = Cluster::load(&seed_dir.join(api::files::SEED_CLUSTER_CONFIG))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let seed = crate::settings::read_seed(seed_dir, &cluster)?;
    tracing::info!(cluster = %cluster.name, node = ?seed.node, "seed read");

    let data_dev = crate::disk::find_partition(PARTITION_DATA)?;
    if let Err(e) = grow_partition(&data_dev) {
        // Not fatal: the node works on the image's initial size.
        tracing::warn!("could not grow the data partition: {e:#}");
    }
    let degraded = match mount_data(&data_dev) {
        Ok(()) => None,
        Err(damage) => {
            tracing::error!(reason = %damage.reason, hint = %damage.hint, "data partition unusable: booting degraded (nothing was formatted)");
            Some(damage)
        }
    };

    // The supervisor blocks its signals in the calling thread and waits for them; a thread
    // started before that must not have them unblocked, or it would swallow them.
    crate::supervisor::handled_signals()
        .thread_block()
        .context("blocking signals")?;
    spawn_power_button_watch();
    let mut layout = Layout::image();
    spawn_trial_watchdog(layout.run.clone());
    if degraded.is_some() {
        // A degraded boot is not a healthy one: the update service (which blesses the boot
        // entry) is not among the services kept.
        tracing::warn!("degraded boot: the boot entry is not blessed");
        layout.state = PathBuf::from(DEGRADED_STATE);
    }

    // Plan, supervise, and plan again after the first-boot wizard stored the settings.
    loop {
        let settings = boot_settings(&layout, &cluster, &seed)?;
        let reason = match settings {
            Some(settings) => {
                let node = cluster.node(&settings.node).with_context(|| {
                    format!(
                        "the settings name node `{}`, absent from the seed's cluster.toml",
                        settings.node
                    )
                })?;
                nix::unistd::sethostname(&node.name).context("setting the hostname")?;
                configure_network(&cluster, node.address)?;
                // Fail closed: no service listens before the default-deny ruleset is in place.
                firewall::apply(&firewall::ruleset(&cluster, node))
                    .context("applying the firewall")?;
                tracing::info!("firewall applied");
                let (specs, faults) = match &degraded {
                    None => (
                        node::services(&cluster, node, &layout, None, &settings, Some(seed_dir))?,
                        Vec::new(),
                    ),
                    Some(damage) => {
                        degraded_services(&cluster, node, &layout, damage.clone(), &settings)
                    }
                };
                tracing::info!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "system up; starting services"
                );
                node::supervise(specs, &layout, faults)?
            }
            None => wizard(&cluster, &seed, &layout, seed_dir)?,
        };
        tracing::info!(?reason, "services stopped");
        match reason {
            StopReason::Reconfigure => continue,
            StopReason::Interrupt => return Ok(Halt::Reboot),
            StopReason::Terminate | StopReason::Hangup | StopReason::Requested => {
                return Ok(Halt::PowerOff)
            }
        }
    }
}

/// The settings this boot runs with (see `settings::resolve`); `None`: the wizard must ask.
/// A store that cannot be read is no reason to ask again: the seed's settings (when complete)
/// run the node for this boot and the error is shown; else the boot fails with it.
fn boot_settings(
    layout: &Layout,
    cluster: &Cluster,
    seed: &cluster_config::settings::SeedSettings,
) -> anyhow::Result<Option<cluster_config::settings::Settings>> {
    crate::files::make_dir(&layout.state, 0o755)?;
    let opened = crate::settings::Store::open(&layout.state);
    let resolved = opened
        .map_err(anyhow::Error::from)
        .and_then(|mut store| crate::settings::resolve(&mut store, cluster, seed));
    match resolved {
        Ok(settings) => Ok(settings.map(|(_, s)| s)),
        Err(e) if cluster_config::settings::seed_is_complete(seed) => {
            tracing::error!("the settings store: {e:#}; running on the seed's settings");
            let fresh = crate::settings::fresh()?;
            let (settings, _) = cluster_config::settings::setup(
                cluster,
                seed,
                &api::settings::Answers::default(),
                crate::settings::now_unix(),
                &fresh,
            )
            .map_err(|errors| anyhow::anyhow!("the seed's settings: {errors:?}"))?;
            Ok(Some(settings))
        }
        Err(e) => Err(e.context("the settings store (a node in its first-boot setup needs it)")),
    }
}

/// The first-boot wizard: the node's address (or a generic image's setup address), a firewall
/// with only the admin port open, a fresh self-signed certificate and setup code printed on
/// the serial console, and the wizard's services until the settings are stored.
fn wizard(
    cluster: &Cluster,
    seed: &cluster_config::settings::SeedSettings,
    layout: &Layout,
    seed_dir: &Path,
) -> anyhow::Result<StopReason> {
    let address = seed
        .node
        .as_deref()
        .and_then(|n| cluster.node(n))
        .map(|n| n.address)
        .or(seed.setup_address)
        .context("the seed names neither this node nor a setup address: the first-boot wizard has no address to listen on")?;
    configure_network(cluster, address)?;
    firewall::apply(&firewall::setup_ruleset(cluster)).context("applying the firewall")?;
    let (cert, fingerprint) =
        pki::wizard_cert(address).context("making the wizard's certificate")?;
    let code = setup_code()?;
    let listen = std::net::SocketAddr::from((address, cluster.ports.admin));
    let inputs = node::WizardInputs {
        root: true,
        exe: std::env::current_exe().context("locating the appliance binary")?,
        config: None,
        seed_dir: Some(seed_dir.to_path_buf()),
        listen,
        certificate: (cert.cert_pem, cert.key_pem),
        setup_code: code.clone(),
        console: Some(PathBuf::from(WIZARD_CONSOLE)),
    };
    let specs = node::apply(&node::plan_wizard(cluster, layout, &inputs)?)?;
    tracing::warn!(
        "first-boot setup: open https://{listen}/setup ; certificate SHA-256 {fingerprint} ; setup code {code}"
    );
    node::supervise(specs, layout, Vec::new())
}

/// The serial console the text wizard runs on (the image's kernel console).
const WIZARD_CONSOLE: &str = "/dev/ttyS0";

/// A one-time setup code: twelve random digits as `dddd-dddd-dddd`.
fn setup_code() -> anyhow::Result<String> {
    let mut bytes = [0u8; 12];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("random: {e}"))?;
    let digits: Vec<char> = bytes.iter().map(|b| char::from(b'0' + b % 10)).collect();
    Ok(digits
        .chunks(4)
        .map(|c| c.iter().collect::<String>())
        .collect::<Vec<_>>()
        .join("-"))
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
    // The last lines (why we halt) must reach the console before the machine goes.
    crate::logging::flush_console();
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
    extern "C" fn ignore(_: std::ffi::c_int) {}
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

/// The subject of the data partition's [`Degraded`] record and alert.
const DATA_SUBJECT: &str = "data-partition";
/// The state directory of a degraded node: on tmpfs, so that nothing touches the damaged disk.
const DEGRADED_STATE: &str = "/run/tandem-degraded";
/// What a degraded node still runs: the admin server (its page says why) and the log monitor
/// (alerts). Everything else needs the data partition.
const DEGRADED_KEEP: [&str; 3] = [
    "admin",
    logmon::monitor::SERVICE_NAME,
    node::SETTINGS_SERVICE,
];
/// Space on the data partition only root (PID 1: state DB, boot counter, log store) may use,
/// so that MariaDB filling the disk leaves the node able to boot and say so.
const DATA_RESERVED_PERCENT: &str = "5";
/// The first bytes of the data partition read to decide what it holds (ext4's magic is at
/// 1080).
const DATA_HEAD_BYTES: usize = 4096;

/// Mounts the data partition (`nodev,nosuid,noexec`), creating its filesystem only on the
/// first boot of an image (the image-builder's marker). Anything else that cannot be checked
/// and mounted is returned as the reason to boot degraded: a damaged filesystem is never
/// formatted.
fn mount_data(dev: &Path) -> Result<(), Degraded> {
    check_data(dev)?;
    mount_fs(dev, DATA_MOUNT, "ext4", MsFlags::MS_NOEXEC).map_err(|e| {
        data_damage(
            dev,
            format!("{e:#}"),
            "nothing was formatted; check the disk",
        )
    })
}

/// The [`Degraded`] record of the data partition `dev`, noticed now.
fn data_damage(dev: &Path, reason: String, hint: &str) -> Degraded {
    Degraded {
        subject: DATA_SUBJECT.into(),
        reason: format!("data partition {}: {reason}", dev.display()),
        hint: hint.to_string(),
        stopped: Vec::new(),
        since_ms: u64::try_from(crate::supervisor::now_ms()).unwrap_or(0),
    }
}

/// Makes `dev` (a partition or, in tests, an image file) hold a checked ext4 filesystem, or
/// says why it cannot: formats only a partition carrying the first-boot marker.
fn check_data(dev: &Path) -> Result<(), Degraded> {
    let damaged = |reason: String, hint: &str| data_damage(dev, reason, hint);
    let head = read_head(dev).map_err(|e| {
        damaged(
            format!("cannot be read: {e}"),
            "replace the disk, or check the hypervisor's storage",
        )
    })?;
    match data_plan(&head) {
        DataPlan::Format => {
            tracing::info!(dev = %dev.display(), "first boot: creating the data filesystem");
            run(Command::new("mkfs.ext4")
                // 4 KiB blocks whatever the size (mke2fs picks 1 KiB below 512 MiB): the backup
                // superblock is then where the damaged-partition hint says, at block 32768.
                .args([
                    "-q",
                    "-F",
                    "-b",
                    "4096",
                    "-L",
                    "data",
                    "-m",
                    DATA_RESERVED_PERCENT,
                ])
                .arg(dev))
            .map_err(|e| {
                damaged(
                    format!("creating the filesystem: {e:#}"),
                    "replace the disk",
                )
            })?;
            erase_marker(dev).map_err(|e| {
                damaged(
                    format!("erasing the first-boot marker: {e}"),
                    "replace the disk",
                )
            })?;
        }
        DataPlan::Check => {
            let code = e2fsck(dev, "-p");
            match fsck_verdict(code) {
                Fsck::Clean => {}
                Fsck::Repaired => tracing::warn!(code, "e2fsck repaired the data partition"),
                Fsck::Failed => {
                    return Err(damaged(
                        format!("e2fsck found errors it could not repair (exit {code})"),
                        &format!(
                            "nothing was formatted; repair it offline with `e2fsck -f {}`",
                            dev.display()
                        ),
                    ))
                }
            }
            if api::storage::is_uninitialised(&head) {
                // mkfs finished on an earlier boot, which then lost power before erasing the
                // marker. It must go, or a later superblock fault would look like a first boot.
                if let Err(e) = erase_marker(dev) {
                    tracing::warn!("erasing the first-boot marker: {e}");
                }
            }
        }
        DataPlan::Damaged => {
            // No filesystem where the image made one: the primary superblock is gone. Look for
            // a backup superblock (read-only; `-n` changes nothing) to say what is recoverable.
            let probe = e2fsck(dev, "-n");
            let hint = if probe < 8 {
                format!(
                    "nothing was formatted and a backup superblock is intact: `e2fsck -b 32768 -B 4096 {}` restores the filesystem",
                    dev.display()
                )
            } else {
                "nothing was formatted; no backup superblock could be read either".to_string()
            };
            return Err(damaged(
                "no readable filesystem (ext4 superblock missing) and no first-boot marker".into(),
                &hint,
            ));
        }
    }
    Ok(())
}

/// What [`mount_data`] does with a data partition, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataPlan {
    /// An ext4 filesystem: check (`e2fsck -p`) and mount.
    Check,
    /// No filesystem, and the image-builder's never-initialised marker: create one.
    Format,
    /// No filesystem and no marker: damaged. Touch nothing.
    Damaged,
}

fn data_plan(head: &[u8]) -> DataPlan {
    let magic = head.get(1080..1082) == Some(&[0x53, 0xEF][..]);
    if magic {
        DataPlan::Check
    } else if api::storage::is_uninitialised(head) {
        DataPlan::Format
    } else {
        DataPlan::Damaged
    }
}

/// e2fsck's exit status, as systemd-fsck reads it: below 4 the filesystem may be mounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fsck {
    Clean,
    Repaired,
    Failed,
}

fn fsck_verdict(code: i32) -> Fsck {
    match code {
        0 => Fsck::Clean,
        1..=3 => Fsck::Repaired,
        _ => Fsck::Failed,
    }
}

/// Runs e2fsck with `mode` (`-p` or `-n`) and returns its exit code (128 if it did not run).
/// The read-only probe (`-n`) lists every inconsistency it would fix (hundreds of lines on a
/// lost superblock): not for the console.
fn e2fsck(dev: &Path, mode: &str) -> i32 {
    let mut cmd = Command::new("e2fsck");
    cmd.arg(mode).arg(dev);
    if mode == "-n" {
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
    }
    match cmd.status() {
        Ok(status) => status.code().unwrap_or(128),
        Err(e) => {
            tracing::warn!("running e2fsck: {e}");
            128
        }
    }
}

fn read_head(dev: &Path) -> std::io::Result<Vec<u8>> {
    let mut head = vec![0u8; DATA_HEAD_BYTES];
    fs::File::open(dev)?.read_exact(&mut head)?;
    Ok(head)
}

fn erase_marker(dev: &Path) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut f = fs::OpenOptions::new().write(true).open(dev)?;
    f.write_all(&[0u8; api::storage::UNINITIALISED_MARKER.len()])?;
    f.sync_all()
}

fn has_ext4_magic(dev: &Path) -> anyhow::Result<bool> {
    let head =
        read_head(dev).with_context(|| format!("reading the superblock of {}", dev.display()))?;
    Ok(data_plan(&head) == DataPlan::Check)
}

/// The services of a node whose data partition is unusable: state on tmpfs, only
/// [`DEGRADED_KEEP`] started; `damage` (now naming what stays stopped) is returned for the
/// supervisor to show and alert on. Errors here leave the node with no services rather than in
/// a reboot loop.
fn degraded_services(
    cluster: &Cluster,
    node: &cluster_config::Node,
    layout: &Layout,
    mut damage: Degraded,
    settings: &cluster_config::settings::Settings,
) -> (Vec<crate::supervisor::ServiceSpec>, Vec<Degraded>) {
    let seed = Some(Path::new(SEED_MOUNT));
    let all = match node::services(cluster, node, layout, None, settings, seed) {
        Ok(all) => all,
        Err(e) => {
            tracing::error!("planning the degraded node's services: {e:#}");
            Vec::new()
        }
    };
    let (kept, stopped): (Vec<_>, Vec<_>) = all
        .into_iter()
        .partition(|s| DEGRADED_KEEP.contains(&s.name.as_str()));
    damage.stopped = stopped.into_iter().map(|s| s.name).collect();
    let mut kept = kept;
    for spec in &mut kept {
        // Nothing it waited for will start.
        spec.deps.retain(|d| DEGRADED_KEEP.contains(&d.as_str()));
    }
    (kept, vec![damage])
}

/// The UEFI variables (systemd-boot's `LoaderEntryOneShot`, `LoaderEntryDefault`, …) for the
/// update service. Not fatal: a machine booted without UEFI has none, and updates then say so.
fn mount_efivars() {
    const EFIVARS: &str = "/sys/firmware/efi/efivars";
    if !Path::new("/sys/firmware/efi").exists() {
        tracing::warn!("not booted through UEFI: no boot loader variables");
        return;
    }
    if let Err(e) = mount(
        Some("efivarfs"),
        EFIVARS,
        Some("efivarfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    ) {
        tracing::warn!("mounting {EFIVARS}: {e}");
    }
}

/// Transparent huge pages only where a program asks for them (`madvise`), not for every
/// anonymous mapping as Debian's kernel does (`always`): with `always` each thread's stack and
/// each allocator arena a service touched took whole 2 MiB pages (the supervisor, with its
/// two log threads per service, idled at 30 MiB), and MariaDB asks that they be off.
const THP_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/enabled";

fn limit_transparent_huge_pages() {
    if let Err(e) = fs::write(THP_ENABLED, "madvise") {
        tracing::warn!("{THP_ENABLED}: {e}");
    }
}

/// After switch_root nothing loads modules for devices any more: load the driver of every
/// device the kernel has found (coldplug), plus evdev for the ACPI power button.
fn load_device_modules() {
    let t0 = Instant::now();
    let mut aliases = Vec::new();
    collect_modaliases(Path::new("/sys/devices"), &mut aliases, 0);
    aliases.retain(|a| wanted_modalias(a));
    aliases.sort();
    aliases.dedup();
    // The power button's input device, and FAT for blessing the boot entry on the ESP.
    // efivarfs for the boot loader's variables (the update service's one-shot and default).
    aliases.extend(
        [
            "evdev",
            "vfat",
            "nls_cp437",
            "nls_ascii",
            "nls_utf8",
            "efivarfs",
        ]
        .map(String::from),
    );
    for chunk in aliases.chunks(200) {
        if let Err(e) = run(Command::new("modprobe")
            .args(["-a", "-q", "-b"])
            .args(chunk))
        {
            tracing::debug!("modprobe: {e:#}");
        }
    }
    tracing::info!(
        devices = aliases.len(),
        elapsed_ms = t0.elapsed().as_millis() as u64,
        "device modules loaded"
    );
}

/// Whether a device's modalias is worth a driver. The processor's (`cpu:…`) is not: it
/// matches the kernel's own crypto and checksum accelerators, KVM, and temperature and power
/// drivers, none of which the appliance uses (nothing of it runs VMs or kernel crypto; ext4's
/// checksums have a generic implementation built in); skipping them cut module loading from
/// 3.2 s to 0.7 s of a boot under emulation. Buses, disks, network cards and the rest are
/// loaded.
fn wanted_modalias(alias: &str) -> bool {
    !alias.starts_with("cpu:")
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

/// Loopback up, `address` (the node's, or the wizard's) as the only address on the first
/// ethernet interface, default route; ARP answered and announced for the LAN interface's own
/// addresses only ([`vip::ARP_SYSCTLS`]: a node handing the floating IP over keeps it on `lo`).
fn configure_network(cluster: &Cluster, address: std::net::Ipv4Addr) -> anyhow::Result<()> {
    for (key, value) in vip::ARP_SYSCTLS {
        let path = Path::new("/proc/sys").join(key);
        fs::write(&path, value).with_context(|| format!("writing {}", path.display()))?;
    }
    run(Command::new("ip").args(["link", "set", "lo", "up"]))?;
    let iface = wait_for_ethernet()?;
    let cidr = format!("{address}/{}", cluster.subnet.prefix);
    // After the wizard the setup address goes: the node keeps only its own.
    run(Command::new("ip").args(["-4", "addr", "flush", "dev", &iface, "scope", "global"]))?;
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

/// Beyond a trial's own deadline, how long PID 1 waits for the update service to bless (or give
/// up on) a new slot before it reboots into the old one itself.
const TRIAL_WATCHDOG_GRACE: Duration = Duration::from_secs(120);

/// PID 1's guard over a trial boot (a counted entry written by the installer, with
/// `tandem.trial_timeout=`): the update service blesses the slot or reboots into the old one,
/// but a new slot whose update service cannot run at all must not stay up unblessed. Past the
/// trial timeout plus [`TRIAL_WATCHDOG_GRACE`] since boot, without a blessed status, PID 1
/// reboots (the one-shot is spent: the old slot boots).
fn spawn_trial_watchdog(run_dir: PathBuf) {
    let Some(timeout) = crate::disk::kernel_param(api::update::TRIAL_TIMEOUT_PARAM)
        .and_then(|t| t.parse::<u64>().ok())
    else {
        return;
    };
    let counted = update::EfiVars::new(update::boot::EFIVARS_DIR)
        .selected()
        .ok()
        .flatten()
        .and_then(|id| update::boot::parse_entry_name(&id))
        .is_some_and(|(_, counter)| counter.is_some());
    if !counted {
        return;
    }
    let deadline = Duration::from_secs(timeout) + TRIAL_WATCHDOG_GRACE;
    let _ = std::thread::Builder::new()
        .name("trial-watchdog".into())
        .spawn(move || {
            let status = run_dir.join(api::update::STATUS_FILE);
            loop {
                std::thread::sleep(Duration::from_secs(5));
                match api::update::UpdateStatus::read(&status) {
                    Ok(s) if s.boot == api::update::Boot::Blessed => return,
                    // The update service is rolling back itself.
                    Ok(s) if matches!(s.boot, api::update::Boot::RollingBack { .. }) => return,
                    _ => {}
                }
                if crate::disk::uptime().is_some_and(|up| up > deadline) {
                    tracing::error!(
                        "trial boot not blessed {}s after boot (the update service did not decide): rebooting into the previous slot",
                        deadline.as_secs()
                    );
                    let _ = kill(Pid::this(), Signal::SIGINT);
                    return;
                }
            }
        });
    tracing::info!(
        timeout_s = timeout,
        "trial boot: PID 1 reboots if it is not blessed in time"
    );
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek as _, SeekFrom, Write as _};

    const MIB: u64 = 1 << 20;

    #[test]
    fn drivers_load_for_devices_but_not_for_the_processor() {
        assert!(wanted_modalias(
            "pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00"
        ));
        assert!(wanted_modalias("virtio:d00000001v00001AF4"));
        assert!(wanted_modalias("acpi:PNP0C0C:"));
        assert!(!wanted_modalias(
            "cpu:type:x86,ven0002fam0017mod0031:feature:,0000,0001,0002"
        ));
    }

    #[test]
    fn the_first_bytes_decide_check_format_or_hands_off() {
        let check = |head: &[u8], expected: DataPlan| assert_eq!(data_plan(head), expected);
        let mut ext4 = vec![0u8; DATA_HEAD_BYTES];
        ext4[1080..1082].copy_from_slice(&[0x53, 0xEF]);
        let mut marked = vec![0u8; DATA_HEAD_BYTES];
        marked[..32].copy_from_slice(api::storage::UNINITIALISED_MARKER);
        let mut both = marked.clone();
        both[1080..1082].copy_from_slice(&[0x53, 0xEF]);
        check(&ext4, DataPlan::Check);
        check(&marked, DataPlan::Format);
        // A filesystem made on a boot that lost power before erasing the marker: never format.
        check(&both, DataPlan::Check);
        // Zeros (a zeroed superblock), garbage, a short read: damaged, touched by nothing.
        check(&vec![0u8; DATA_HEAD_BYTES], DataPlan::Damaged);
        check(&vec![0xA5u8; DATA_HEAD_BYTES], DataPlan::Damaged);
        check(&[], DataPlan::Damaged);
    }

    #[test]
    fn e2fsck_exit_codes_below_4_may_mount() {
        for (code, expected) in [
            (0, Fsck::Clean),
            (1, Fsck::Repaired),
            (2, Fsck::Repaired),
            (4, Fsck::Failed),
            (8, Fsck::Failed),
            (12, Fsck::Failed),
            (128, Fsck::Failed),
            (-1, Fsck::Failed),
        ] {
            assert_eq!(fsck_verdict(code), expected, "exit {code}");
        }
    }

    fn run_ok(cmd: &mut Command) -> String {
        let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        assert!(out.status.success(), "{cmd:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// An ext4 image holding `mysql/ibdata1`, as a node's data partition after use.
    fn used_data_partition(path: &Path) {
        fs::File::create(path).unwrap().set_len(256 * MIB).unwrap();
        run_ok(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-b", "4096", "-L", "data"])
                .arg(path),
        );
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(b"InnoDB pages").unwrap();
        run_ok(
            Command::new("debugfs")
                .arg("-w")
                .arg(path)
                .args(["-R", "mkdir mysql"]),
        );
        run_ok(Command::new("debugfs").arg("-w").arg(path).args([
            "-R",
            &format!("write {} mysql/ibdata1", file.path().display()),
        ]));
    }

    fn contents(path: &Path) -> Vec<u8> {
        fs::read(path).unwrap()
    }

    #[test]
    fn a_zeroed_superblock_is_reported_with_its_backup_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("data.img");
        used_data_partition(&img);
        let mut f = fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.seek(SeekFrom::Start(1024)).unwrap();
        f.write_all(&[0u8; 1024]).unwrap();
        drop(f);
        let before = contents(&img);

        let damage = check_data(&img).unwrap_err();
        assert!(
            damage.reason.contains("no readable filesystem"),
            "{damage:?}"
        );
        assert!(
            damage.hint.contains("e2fsck -b 32768 -B 4096"),
            "{damage:?}"
        );
        assert!(
            contents(&img) == before,
            "the damaged partition was written to"
        );
        // The data is still there, behind the backup superblock.
        let ls = run_ok(
            Command::new("debugfs")
                .args(["-c", "-s", "32768", "-b", "4096", "-R", "ls -l mysql"])
                .arg(&img),
        );
        assert!(ls.contains("ibdata1"), "{ls}");
    }

    #[test]
    fn a_disk_of_garbage_without_the_marker_is_never_formatted() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("stick.img");
        fs::write(&img, vec![0xA5u8; 8 * MIB as usize]).unwrap();
        let before = contents(&img);
        let damage = check_data(&img).unwrap_err();
        assert!(damage.hint.contains("nothing was formatted"), "{damage:?}");
        assert!(contents(&img) == before);
    }

    #[test]
    fn the_marker_makes_a_filesystem_once_and_is_erased() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("data.img");
        let f = fs::File::create(&img).unwrap();
        f.set_len(256 * MIB).unwrap();
        (&f).write_all(api::storage::UNINITIALISED_MARKER).unwrap();
        drop(f);

        check_data(&img).unwrap();
        let head = read_head(&img).unwrap();
        assert_eq!(data_plan(&head), DataPlan::Check);
        assert!(!api::storage::is_uninitialised(&head), "marker left behind");
        let sb = run_ok(Command::new("dumpe2fs").arg("-h").arg(&img));
        assert!(sb.contains("Filesystem volume name:   data"), "{sb}");
        assert!(sb.contains("Block size:               4096"), "{sb}");
        // Root keeps 5 % for the state DB and the boot counter when MariaDB fills the rest.
        let blocks = |key: &str| -> u64 {
            sb.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse().ok())
                .unwrap()
        };
        let reserved = blocks("Reserved block count:") * 100 / blocks("Block count:");
        assert!((4..=5).contains(&reserved), "{reserved}% reserved");

        // The next boot checks and keeps what is there.
        run_ok(
            Command::new("debugfs")
                .arg("-w")
                .arg(&img)
                .args(["-R", "mkdir kept"]),
        );
        check_data(&img).unwrap();
        let ls = run_ok(Command::new("debugfs").arg(&img).args(["-R", "ls"]));
        assert!(ls.contains("kept"), "{ls}");
    }

    #[test]
    fn a_filesystem_with_errors_e2fsck_cannot_preen_boots_degraded() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("data.img");
        used_data_partition(&img);
        // Clear the root directory's inode (preen mode refuses to fix that alone) and mark the
        // filesystem as having errors, as the kernel does when it meets one.
        run_ok(
            Command::new("debugfs")
                .arg("-w")
                .arg(&img)
                .args(["-R", "clri <2>"]),
        );
        run_ok(
            Command::new("debugfs")
                .arg("-w")
                .arg(&img)
                .args(["-R", "ssv state 2"]),
        );
        let uuid = || {
            run_ok(Command::new("dumpe2fs").arg("-h").arg(&img))
                .lines()
                .find(|l| l.starts_with("Filesystem UUID:"))
                .map(str::to_string)
        };
        let before = uuid();
        let damage = check_data(&img).unwrap_err();
        assert!(damage.reason.contains("could not repair"), "{damage:?}");
        assert!(damage.hint.contains("e2fsck -f"), "{damage:?}");
        // Preening may have fixed what is safe to fix; the filesystem is the same one.
        assert_eq!(uuid(), before, "the data partition was formatted");
    }
}
