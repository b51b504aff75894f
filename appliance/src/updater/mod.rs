//! `appliance updater`: the update service, root, on an image only (a supervised service).
//!
//! - At start it reads the boot entries on the ESP and its records in the state DB
//!   ([`assess`]): a slot whose trial failed is recorded as bad and its entry removed; a trial
//!   boot of a new slot is blessed (made the default, counting ended) once every service is
//!   ready and has stayed ready for [`api::update::SETTLE_SECS`], or — past the trial deadline —
//!   the version is recorded as bad and the node reboots into the default, the old slot.
//! - It serves [`api::update::SOCKET_FILE`]: installs (`update::install`, one at a time) and
//!   one-shot boots of the other slot.
//! - It publishes [`api::update::UpdateStatus`] in [`api::update::STATUS_FILE`].
//!
//! Everything it writes to the ESP goes through the `update` crate (`update::boot`); the ESP is
//! mounted only while it is used, and synced before it is unmounted.

pub mod assess;

use std::io::{BufRead as _, BufReader, Read, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use api::update::{
    Boot, Event, InstallStatus, Request, UpdateStatus, DEFAULT_TRIAL_TIMEOUT_SECS, SETTLE_SECS,
    SLOT_PARAM, STATUS_FILE, TRIAL_TIMEOUT_PARAM,
};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use rusqlite::{params, Connection};
use update::boot::{EfiVars, Esp, Slot};

use assess::{assess, bad_versions, BootKind, Record};

/// Where the ESP is mounted while the service uses it.
const ESP_MOUNT: &str = "/run/tandem/esp";
/// The first line of a request is at most this long.
const MAX_REQUEST_LINE: u64 = 4096;
/// Progress events are sent at most this often (and at every phase change).
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// A first boot (nothing to fall back to) gives up waiting for its services after this.
const FIRST_BOOT_BLESS_DEADLINE: Duration = Duration::from_secs(900);

/// `appliance updater`'s arguments (the node plan gives them).
#[derive(Debug, clap::Args)]
pub struct UpdaterArgs {
    /// The node's run directory: the socket and the status file go there.
    #[arg(long)]
    pub run_dir: PathBuf,
    /// The node's state directory (the state DB).
    #[arg(long)]
    pub state_dir: PathBuf,
    /// The supervisor's control socket (service readiness for the trial).
    #[arg(long)]
    pub control_socket: PathBuf,
    /// Group that may use the socket (the admin server's).
    #[arg(long)]
    pub socket_group: Option<String>,
}

struct Updater {
    run_dir: PathBuf,
    state_db: PathBuf,
    control_socket: PathBuf,
    version: String,
    booted: Slot,
    efivars: Option<EfiVars>,
    status: Mutex<UpdateStatus>,
    /// Held while the ESP is mounted (install, bless, assessment).
    esp_lock: Mutex<()>,
    /// Held by the one install that may run.
    install_lock: Mutex<()>,
}

/// The running image's version ([`api::files::IMAGE_VERSION_FILE`]).
pub fn image_version() -> Option<String> {
    std::fs::read_to_string(api::files::IMAGE_VERSION_FILE)
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Runs the update service until it is killed.
pub fn main(args: UpdaterArgs) -> anyhow::Result<std::process::ExitCode> {
    let booted: Slot = crate::disk::kernel_param(SLOT_PARAM)
        .context("no tandem.slot= on the kernel command line: not booted from a Tandem slot")?
        .parse()
        .map_err(|e| anyhow::anyhow!("tandem.slot: {e}"))?;
    let version = image_version().context("the image has no version file")?;
    let efivars = Path::new(update::boot::EFIVARS_DIR)
        .is_dir()
        .then(|| EfiVars::new(update::boot::EFIVARS_DIR));
    if efivars.is_none() {
        tracing::warn!("no UEFI variables: installs cannot ask for a one-shot boot");
    }
    let updater = Arc::new(Updater {
        run_dir: args.run_dir.clone(),
        state_db: args.state_dir.join(api::events::STATE_DB_FILE),
        control_socket: args.control_socket,
        version: version.clone(),
        booted,
        efivars,
        status: Mutex::new(UpdateStatus {
            version,
            booted_slot: booted.to_string(),
            boot: Boot::Unknown {
                reason: "not assessed yet".into(),
            },
            slots: Vec::new(),
            bad_versions: Vec::new(),
            install: None,
        }),
        esp_lock: Mutex::new(()),
        install_lock: Mutex::new(()),
    });
    let kind = match updater.assess() {
        Ok(kind) => kind,
        Err(e) => {
            tracing::error!("reading the boot entries: {e:#}");
            updater.set_boot(Boot::Unknown {
                reason: format!("{e:#}"),
            });
            BootKind::NoEntry
        }
    };
    match kind {
        BootKind::Trial => {
            let timeout = crate::disk::kernel_param(TRIAL_TIMEOUT_PARAM)
                .and_then(|t| t.parse().ok())
                .unwrap_or(DEFAULT_TRIAL_TIMEOUT_SECS);
            // Counted from the boot, not from this start: a service that crashes and restarts
            // must not postpone the rollback.
            let since_boot = crate::disk::uptime().unwrap_or_default();
            let deadline = Duration::from_secs(timeout).saturating_sub(since_boot);
            updater.set_boot(Boot::Trial {
                deadline_unix_ms: now_ms() + deadline.as_millis() as u64,
            });
            tracing::info!(slot = %booted, version = %updater.version, timeout_s = timeout, "trial boot: blessed once every service is ready for {SETTLE_SECS}s");
            let u = updater.clone();
            std::thread::Builder::new()
                .name("trial".into())
                .spawn(move || u.watch_trial(deadline, true))?;
        }
        BootKind::FirstBoot => {
            let u = updater.clone();
            std::thread::Builder::new()
                .name("bless".into())
                .spawn(move || u.watch_trial(FIRST_BOOT_BLESS_DEADLINE, false))?;
        }
        BootKind::Blessed => updater.set_boot(Boot::Blessed),
        BootKind::NoEntry => {}
    }
    serve(&updater, &args.run_dir, args.socket_group.as_deref())
}

fn serve(
    updater: &Arc<Updater>,
    run_dir: &Path,
    group: Option<&str>,
) -> anyhow::Result<std::process::ExitCode> {
    let updater = updater.clone();
    crate::files::serve_unix_socket(
        &run_dir.join(api::update::SOCKET_FILE),
        group,
        "update service",
        move |conn| {
            if let Err(e) = updater.handle(conn) {
                tracing::warn!("update client: {e:#}");
            }
        },
    )?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// The ESP, mounted for as long as this lives (synced and unmounted on drop).
struct MountedEsp {
    esp: Esp,
}

impl MountedEsp {
    fn mount() -> anyhow::Result<MountedEsp> {
        let dev = crate::disk::find_partition(api::files::PARTITION_ESP)?;
        std::fs::create_dir_all(ESP_MOUNT)?;
        // A previous holder that died may have left it mounted.
        let _ = umount2(ESP_MOUNT, MntFlags::MNT_DETACH);
        mount(
            Some(&dev),
            ESP_MOUNT,
            Some("vfat"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .with_context(|| format!("mounting the ESP {}", dev.display()))?;
        Ok(MountedEsp {
            esp: Esp::new(ESP_MOUNT),
        })
    }
}

impl Drop for MountedEsp {
    fn drop(&mut self) {
        nix::unistd::sync();
        if let Err(e) = umount2(ESP_MOUNT, MntFlags::empty()) {
            tracing::warn!("unmounting the ESP: {e}");
            let _ = umount2(ESP_MOUNT, MntFlags::MNT_DETACH);
        }
    }
}

impl Updater {
    fn lock_esp(&self) -> std::sync::MutexGuard<'_, ()> {
        self.esp_lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn status(&self) -> std::sync::MutexGuard<'_, UpdateStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, status: &UpdateStatus) {
        let path = self.run_dir.join(STATUS_FILE);
        let text = match serde_json::to_string_pretty(status) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("encoding the update status: {e}");
                return;
            }
        };
        if let Err(e) = api::fsio::write_atomic(&path, text.as_bytes(), 0o644, None) {
            tracing::warn!("writing {}: {e}", path.display());
        }
    }

    fn set_boot(&self, boot: Boot) {
        let mut s = self.status();
        s.boot = boot;
        self.publish(&s);
    }

    fn db(&self) -> anyhow::Result<Connection> {
        let mut conn = Connection::open(&self.state_db)
            .with_context(|| format!("opening {}", self.state_db.display()))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        api::sqlite::migrate(&mut conn, api::events::MIGRATIONS)
            .map_err(|e| anyhow::anyhow!("{}: {e}", self.state_db.display()))?;
        Ok(conn)
    }

    fn records(&self) -> anyhow::Result<Vec<Record>> {
        let conn = self.db()?;
        let mut stmt = conn
            .prepare("SELECT version, state, slot FROM update_versions ORDER BY ts_ms, version")?;
        let rows = stmt
            .query_map([], |r| {
                Ok(Record {
                    version: r.get(0)?,
                    state: r.get(1)?,
                    slot: r.get(2)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    fn record(&self, version: &str, state: &str, slot: Slot, detail: &str) {
        let result = self.db().and_then(|conn| {
            conn.execute(
                "INSERT INTO update_versions (version, state, slot, ts_ms, detail)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (version) DO UPDATE SET
                   state = excluded.state, slot = excluded.slot,
                   ts_ms = excluded.ts_ms, detail = excluded.detail",
                params![version, state, slot.to_string(), now_ms() as i64, detail],
            )?;
            Ok(())
        });
        match result {
            Ok(()) => tracing::info!(%version, %state, %slot, "{detail}"),
            Err(e) => tracing::error!(%version, %state, "recording the version: {e:#}"),
        }
    }

    /// Reads the entries and records, acts on a failed trial, publishes the slots.
    fn assess(&self) -> anyhow::Result<BootKind> {
        let _esp_guard = self.lock_esp();
        let esp = MountedEsp::mount()?;
        let entries = esp.esp.entries()?;
        let records = self.records().unwrap_or_else(|e| {
            tracing::error!("reading the update records: {e:#}");
            Vec::new()
        });
        let a = assess(self.booted, &entries, &records);
        if let Some((slot, version)) = &a.failed_trial {
            tracing::error!(%slot, %version, "the new slot was tried and never blessed: back on the previous slot; version {version} is marked bad");
            self.record(
                version,
                "bad",
                *slot,
                "trial failed: booted the previous slot again",
            );
            if let Err(e) = esp.esp.remove_entry(*slot) {
                tracing::warn!(%slot, "removing the failed entry: {e}");
            }
        }
        let records = self.records().unwrap_or_default();
        let mut s = self.status();
        s.slots = a.slots.clone();
        s.bad_versions = bad_versions(&records);
        self.publish(&s);
        Ok(a.boot)
    }

    /// Blesses the booted slot once every service is ready and stays ready for the settle
    /// time. Past `deadline`: on a trial, record the version as bad and reboot into the
    /// previous slot; on a first boot, give up (the entry stays unblessed).
    fn watch_trial(&self, deadline: Duration, trial: bool) {
        let started = Instant::now();
        let settle = Duration::from_secs(SETTLE_SECS);
        let target = crate::control::Target {
            socket: Some(self.control_socket.clone()),
            state_dir: None,
        };
        let mut ready_since: Option<Instant> = None;
        let mut not_ready = String::new();
        loop {
            let all_ready = match crate::control::request(&target, &api::control::Request::Status) {
                Ok(api::control::Response::Status { services }) => {
                    let waiting: Vec<&str> = services
                        .iter()
                        .filter(|s| !s.ready)
                        .map(|s| s.name.as_str())
                        .collect();
                    not_ready = waiting.join(", ");
                    !services.is_empty() && waiting.is_empty()
                }
                _ => false,
            };
            if all_ready {
                let since = *ready_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= settle {
                    break;
                }
            } else {
                ready_since = None;
            }
            if started.elapsed() > deadline {
                if trial {
                    self.fail_trial(&format!(
                        "not every service stayed ready within {}s (not ready: {not_ready})",
                        deadline.as_secs()
                    ));
                } else {
                    tracing::warn!(slot = %self.booted, "services not all ready after {}s (not ready: {not_ready}): boot entry left unblessed", deadline.as_secs());
                }
                return;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        match self.bless() {
            Ok(entry) => {
                tracing::info!(slot = %self.booted, version = %self.version, %entry, "boot entry blessed");
                if trial {
                    self.record(
                        &self.version,
                        "good",
                        self.booted,
                        "blessed after its trial",
                    );
                }
            }
            Err(e) => tracing::error!(slot = %self.booted, "blessing the boot entry: {e:#}"),
        }
    }

    fn bless(&self) -> anyhow::Result<String> {
        let _esp_guard = self.lock_esp();
        let esp = MountedEsp::mount()?;
        let renamed = esp.esp.bless(self.booted)?;
        if let Some(vars) = &self.efivars {
            // The variable would override loader.conf (someone pressed `d` in the boot menu):
            // loader.conf, just rewritten, is the one default.
            if let Err(e) = vars.remove(update::boot::LOADER_ENTRY_DEFAULT) {
                tracing::warn!("removing LoaderEntryDefault: {e}");
            }
        }
        let entries = esp.esp.entries()?;
        drop(esp);
        let records = self.records().unwrap_or_default();
        let a = assess(self.booted, &entries, &records);
        let mut s = self.status();
        s.boot = Boot::Blessed;
        s.slots = a.slots;
        self.publish(&s);
        Ok(renamed.unwrap_or_else(|| "already blessed".into()))
    }

    fn fail_trial(&self, reason: &str) {
        tracing::error!(slot = %self.booted, version = %self.version, "trial failed: {reason}; rebooting into the previous slot");
        self.record(&self.version, "bad", self.booted, reason);
        self.set_boot(Boot::RollingBack {
            reason: reason.to_string(),
        });
        reboot_node();
    }

    fn handle(&self, conn: UnixStream) -> anyhow::Result<()> {
        let mut reader = BufReader::new(conn.try_clone()?);
        let mut writer = conn;
        let mut line = String::new();
        (&mut reader)
            .take(MAX_REQUEST_LINE)
            .read_line(&mut line)
            .context("reading the request")?;
        let request: Request = match serde_json::from_str(line.trim_end()) {
            Ok(r) => r,
            Err(e) => {
                let _ = writer.write_all(
                    Event::Failed {
                        message: format!("bad request: {e}"),
                    }
                    .to_line()
                    .as_bytes(),
                );
                return Ok(());
            }
        };
        let mut send = |e: &Event| writer.write_all(e.to_line().as_bytes());
        let result = match request {
            Request::Install {
                force,
                reboot,
                trial_timeout_secs,
                size: _,
                origin,
            } => {
                // This thread is the install's: it yields the CPU to the node's services.
                update::lower_thread_priority();
                let Ok(_one) = self.install_lock.try_lock() else {
                    let _ = send(&Event::Failed {
                        message: api::update::INSTALL_BUSY.into(),
                    });
                    return Ok(());
                };
                self.install(
                    &mut reader,
                    force,
                    reboot,
                    trial_timeout_secs,
                    &origin,
                    &mut send,
                )
            }
            Request::BootOnce { slot, reboot } => self.boot_once(&slot, reboot),
        };
        match result {
            Ok(done) => {
                let rebooting = matches!(
                    done,
                    Event::Done {
                        rebooting: true,
                        ..
                    }
                );
                let _ = send(&done);
                if rebooting {
                    // Let the answer reach the client first.
                    std::thread::sleep(Duration::from_millis(500));
                    reboot_node();
                }
            }
            Err(e) => {
                let message = format!("{e:#}");
                tracing::warn!("{message}");
                let _ = send(&Event::Failed { message });
            }
        }
        Ok(())
    }

    fn install(
        &self,
        source: &mut impl Read,
        force: bool,
        reboot: bool,
        trial_timeout: Option<u64>,
        origin: &str,
        send: &mut dyn FnMut(&Event) -> std::io::Result<()>,
    ) -> anyhow::Result<Event> {
        let started = Instant::now();
        let started_ms = now_ms();
        let slot = self.booted.other();
        let keyring = update::keys::read_keyring(Path::new(api::files::IMAGE_UPDATE_KEYRING))?;
        let running = update::Version::parse(&self.version)?;
        let known_bad = bad_versions(&self.records().unwrap_or_default());
        let device = crate::disk::find_partition(slot.label())?;
        let timeout = trial_timeout.unwrap_or(DEFAULT_TRIAL_TIMEOUT_SECS);
        if !(30..=86_400).contains(&timeout) {
            bail!("trial timeout {timeout}s: expected 30 to 86400 seconds");
        }
        tracing::info!(%origin, %slot, device = %device.display(), force, "installing a bundle");
        {
            let mut s = self.status();
            s.install = Some(InstallStatus {
                phase: "verifying".into(),
                done: 0,
                total: 0,
                started_unix_ms: started_ms,
                version: None,
                origin: origin.to_string(),
                error: None,
            });
            self.publish(&s);
        }
        let _esp_guard = self.lock_esp();
        let esp = MountedEsp::mount()?;
        let policy = update::Policy {
            trusted: &keyring,
            product: update::PRODUCT,
            compatible: update::COMPATIBLE,
            running: Some(&running),
            force,
            known_bad: &known_bad,
        };
        let target = update::Target {
            slot,
            device,
            esp: &esp.esp,
            efivars: self.efivars.as_ref(),
            extra_options: format!("{TRIAL_TIMEOUT_PARAM}={timeout}"),
        };
        let mut last_sent: Option<(Instant, String)> = None;
        let mut last_published = Instant::now();
        let mut progress = |p: &update::Progress| {
            let phase = p.phase.to_string();
            let phase_changed = last_sent.as_ref().is_none_or(|(_, ph)| *ph != phase);
            if phase_changed
                || last_sent
                    .as_ref()
                    .is_some_and(|(t, _)| t.elapsed() >= PROGRESS_EVERY)
            {
                let _ = send(&Event::Progress {
                    phase: phase.clone(),
                    done: p.done,
                    total: p.total,
                });
                last_sent = Some((Instant::now(), phase.clone()));
            }
            if phase_changed || last_published.elapsed() >= Duration::from_secs(1) {
                let mut s = self.status();
                if let Some(i) = s.install.as_mut() {
                    i.phase = phase;
                    i.done = p.done;
                    i.total = p.total;
                }
                self.publish(&s);
                last_published = Instant::now();
            }
        };
        let result = update::install(source, &policy, &target, &mut progress);
        drop(esp);
        drop(_esp_guard);
        match result {
            Ok(installed) => {
                let version = installed.manifest.version.clone();
                self.record(
                    &version,
                    "installed",
                    slot,
                    &format!("installed from {origin}"),
                );
                let elapsed_ms = started.elapsed().as_millis() as u64;
                {
                    let mut s = self.status();
                    if let Some(i) = s.install.as_mut() {
                        i.phase = "done".into();
                        i.version = Some(version.clone());
                    }
                }
                if let Err(e) = self.assess() {
                    tracing::warn!("reading the boot entries after the install: {e:#}");
                }
                tracing::info!(%version, %slot, entry = %installed.entry, bytes = installed.bytes, elapsed_ms, "bundle installed: boots once at the next boot");
                Ok(Event::Done {
                    version,
                    slot: slot.to_string(),
                    entry: installed.entry,
                    bytes: installed.bytes,
                    elapsed_ms,
                    rebooting: reboot,
                })
            }
            Err(e) => {
                let mut s = self.status();
                if let Some(i) = s.install.as_mut() {
                    i.phase = "failed".into();
                    i.error = Some(e.to_string());
                }
                self.publish(&s);
                drop(s);
                // The target slot's entry may have been removed: show that.
                if let Err(e) = self.assess() {
                    tracing::warn!("reading the boot entries after the failed install: {e:#}");
                }
                Err(anyhow::anyhow!("bundle refused, nothing activated: {e}"))
            }
        }
    }

    fn boot_once(&self, slot: &str, reboot: bool) -> anyhow::Result<Event> {
        let slot: Slot = slot
            .parse()
            .map_err(|e| anyhow::anyhow!("slot {slot:?}: {e}"))?;
        let Some(vars) = &self.efivars else {
            bail!(
                "no UEFI variables on this machine: cannot ask the boot loader for a one-shot boot"
            );
        };
        let _esp_guard = self.lock_esp();
        let esp = MountedEsp::mount()?;
        let entry = esp
            .esp
            .entry(slot)?
            .with_context(|| format!("slot {slot} has no boot entry"))?;
        vars.set_oneshot(&update::boot::entry_pattern(slot))?;
        tracing::info!(%slot, entry = %entry.file_name, reboot, "slot {slot} boots once at the next boot");
        Ok(Event::Done {
            version: entry.version.clone().unwrap_or_default(),
            slot: slot.to_string(),
            entry: entry.file_name,
            bytes: 0,
            elapsed_ms: 0,
            rebooting: reboot,
        })
    }
}

/// An orderly reboot: SIGINT to PID 1 is what Ctrl-Alt-Del sends (services stopped in order,
/// keepalived first, so the floating IP moves before the balancer goes).
fn reboot_node() {
    tracing::info!("rebooting the node");
    if let Err(e) = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(1),
        nix::sys::signal::Signal::SIGINT,
    ) {
        tracing::error!("asking PID 1 to reboot: {e}");
    }
}
