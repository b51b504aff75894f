//! `appliance update install|status|boot-once`: the console's client of the update service
//! (`appliance updater`, see [`crate::updater`]). The bundle is streamed to the service, which
//! checks it and writes the inactive slot; this side reads the file, stdin or URL and shows
//! progress.

use std::io::{IsTerminal as _, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use api::update::{Event, Origin, Request, SlotState, UpdateStatus};

/// `appliance update …`.
#[derive(Debug, clap::Subcommand)]
pub enum UpdateCommand {
    /// Install a signed bundle (a file, `-` for stdin, or an https:// URL) into the inactive
    /// slot; it boots once at the next boot and stays only if the node proves healthy.
    Install {
        /// The bundle: FILE, `-` or https://…
        bundle: String,
        /// Install a version not newer than the running one, or one that failed here before.
        #[arg(long)]
        force: bool,
        /// Reboot into the new slot once it is installed.
        #[arg(long)]
        reboot: bool,
        /// Seconds the new slot has, after it boots, to bring every service up and keep it up.
        #[arg(long, value_name = "SECS")]
        trial_timeout: Option<u64>,
        #[command(flatten)]
        dir: RunDir,
    },
    /// Both slots, their versions, which one is booted, what is pending, bad versions.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        dir: RunDir,
    },
    /// Boot SLOT once at the next boot (to try the other slot by hand); the default stays.
    BootOnce {
        /// `a` or `b`.
        slot: String,
        /// Reboot now.
        #[arg(long)]
        reboot: bool,
        #[command(flatten)]
        dir: RunDir,
    },
}

/// `appliance cluster …`.
#[derive(Debug, clap::Subcommand)]
pub enum ClusterCommand {
    /// Upgrade every node to a signed bundle, one node at a time: the other nodes first (each
    /// only while the rest are healthy, sent the bundle over the peer API, rebooted, waited for
    /// until blessed), this node last. Stops at the first node that fails.
    Upgrade {
        /// The bundle file.
        bundle: PathBuf,
        /// Seconds each new slot has, after it boots, to bring every service up and keep it up.
        #[arg(long, value_name = "SECS")]
        trial_timeout: Option<u64>,
        #[command(flatten)]
        node: crate::args::NodeArgs,
    },
}

/// Runs an `appliance cluster` subcommand (on an image: the seed names the node and holds
/// its peer certificate).
pub fn cluster_main(command: ClusterCommand) -> anyhow::Result<ExitCode> {
    let ClusterCommand::Upgrade {
        bundle,
        trial_timeout,
        node,
    } = command;
    let (cluster, me) = node.load()?;
    let layout = crate::layout::Layout::image();
    let peers = admin::peer::PeerClient::from_dir(&layout.tls)?
        .context("no node certificate in the seed: the peer API needs one")?;
    let options = admin::upgrade::UpgradeOptions {
        trial_timeout_secs: trial_timeout.unwrap_or(api::update::DEFAULT_TRIAL_TIMEOUT_SECS),
        keyring: api::files::IMAGE_UPDATE_KEYRING.into(),
        state_file: Some(admin::upgrade::state_file(&layout.state)),
    };
    let end = admin::upgrade::cluster_upgrade(
        &bundle,
        &cluster,
        &me,
        &peers,
        &layout.run.join(api::update::SOCKET_FILE),
        &options,
        &mut |state| eprintln!("{}", state.message),
    )?;
    println!("{}", end.message);
    Ok(match end.outcome {
        admin::upgrade::Outcome::Failed => ExitCode::FAILURE,
        admin::upgrade::Outcome::Done | admin::upgrade::Outcome::Running => ExitCode::SUCCESS,
    })
}

/// Where the update service's socket and status are.
#[derive(Debug, clap::Args)]
pub struct RunDir {
    /// The node's run directory [default: the image's].
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
}

impl RunDir {
    fn path(&self) -> PathBuf {
        self.run_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(api::files::IMAGE_RUN_DIR))
    }
}

/// Runs an `appliance update` subcommand.
pub fn main(command: UpdateCommand) -> anyhow::Result<ExitCode> {
    match command {
        UpdateCommand::Install {
            bundle,
            force,
            reboot,
            trial_timeout,
            dir,
        } => install(&dir.path(), &bundle, force, reboot, trial_timeout),
        UpdateCommand::Status { json, dir } => status(&dir.path(), json),
        UpdateCommand::BootOnce { slot, reboot, dir } => {
            let conn = connect(&dir.path(), &Request::BootOnce { slot, reboot })?;
            conn.shutdown(std::net::Shutdown::Write)?;
            finish(conn, &mut Progress::new())
        }
    }
}

/// Sends `request` to the update service of the node whose run directory is `run_dir`.
fn connect(run_dir: &Path, request: &Request) -> anyhow::Result<UnixStream> {
    api::update::send(&run_dir.join(api::update::SOCKET_FILE), request)
        .map_err(|e| anyhow::anyhow!("{e} (updates install on a Tandem image, by root)"))
}

/// Opens what the user named; the size when known.
fn open(origin: &Origin) -> anyhow::Result<(Box<dyn Read + Send>, Option<u64>, String)> {
    Ok(match origin {
        Origin::Stdin => (Box::new(std::io::stdin()), None, "stdin".into()),
        Origin::File(path) => {
            let file =
                std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
            let size = file.metadata().ok().map(|m| m.len());
            (Box::new(file), size, path.display().to_string())
        }
        Origin::Url(url) => {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .timeout_connect(Some(Duration::from_secs(15)))
                .build()
                .into();
            let response = agent
                .get(url)
                .call()
                .with_context(|| format!("GET {url}"))?;
            let size = response
                .headers()
                .get("content-length")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            let reader = response.into_body().into_reader();
            (Box::new(reader), size, url.clone())
        }
    })
}

fn install(
    run_dir: &Path,
    bundle: &str,
    force: bool,
    reboot: bool,
    trial_timeout: Option<u64>,
) -> anyhow::Result<ExitCode> {
    let origin = Origin::parse(bundle).map_err(anyhow::Error::msg)?;
    let (mut source, size, shown) = open(&origin)?;
    let conn = connect(
        run_dir,
        &Request::Install {
            force,
            reboot,
            trial_timeout_secs: trial_timeout,
            size,
            origin: shown.clone(),
        },
    )?;
    eprintln!("installing {shown}");
    // The bundle goes out on one thread while progress comes back on this one: the service
    // answers as it verifies, and stops reading the moment it refuses.
    let mut writer = conn.try_clone()?;
    let sender = std::thread::spawn(move || -> std::io::Result<u64> {
        let copied = std::io::copy(&mut source, &mut writer);
        let _ = writer.shutdown(std::net::Shutdown::Write);
        copied
    });
    let code = finish(conn, &mut Progress::new());
    match sender.join() {
        // A refusal closes the socket under the sender: its error says nothing new.
        Ok(Err(e)) if matches!(code, Ok(ExitCode::SUCCESS)) => {
            bail!("sending the bundle: {e}")
        }
        Err(_) => bail!("the sending thread panicked"),
        _ => {}
    }
    code
}

/// Reads the service's events to the end: progress drawn, the result printed.
fn finish(answer: impl Read, progress: &mut Progress) -> anyhow::Result<ExitCode> {
    let last = api::update::read_answer(answer, &mut |event| {
        if let Event::Progress { phase, done, total } = event {
            progress.show(phase, *done, *total);
        }
    });
    progress.end();
    match last.map_err(anyhow::Error::msg)? {
        Event::Done {
            version,
            slot,
            entry,
            bytes,
            elapsed_ms,
            rebooting,
        } => {
            if bytes > 0 {
                println!(
                    "installed {version} into slot {slot} ({} in {:.1}s); it boots once at the next boot ({entry}) and stays only if the node is healthy",
                    human(bytes),
                    elapsed_ms as f64 / 1000.0
                );
            } else {
                println!("slot {slot} ({version}, {entry}) boots once at the next boot");
            }
            if rebooting {
                println!("rebooting");
            }
            Ok(ExitCode::SUCCESS)
        }
        Event::Failed { message } => {
            eprintln!("error: {message}");
            Ok(ExitCode::FAILURE)
        }
        Event::Progress { .. } => bail!("the update service ended on a progress event"),
    }
}

/// Progress on stderr: a redrawn line on a terminal, a line per tenth otherwise.
struct Progress {
    started: Instant,
    tty: bool,
    drawn: bool,
    last_tenth: u64,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            started: Instant::now(),
            tty: std::io::stderr().is_terminal(),
            drawn: false,
            last_tenth: u64::MAX,
        }
    }

    fn show(&mut self, phase: &str, done: u64, total: u64) {
        let line = progress_line(phase, done, total, self.started.elapsed());
        if self.tty {
            eprint!("\r\x1b[2K{line}");
            self.drawn = true;
        } else {
            let tenth = (done * 10).checked_div(total).unwrap_or(0);
            if tenth != self.last_tenth {
                eprintln!("{line}");
                self.last_tenth = tenth;
            }
        }
    }

    fn end(&mut self) {
        if self.drawn {
            eprintln!();
            self.drawn = false;
        }
    }
}

/// `writing  312.0 MiB / 620.0 MiB  50%  41.2 MiB/s  ETA 7s`.
fn progress_line(phase: &str, done: u64, total: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(0.001);
    let rate = done as f64 / secs;
    let percent = (done * 100).checked_div(total).unwrap_or(0);
    let eta = if rate > 0.0 && total > done {
        format!("ETA {:.0}s", (total - done) as f64 / rate)
    } else {
        "ETA -".to_string()
    };
    format!(
        "{phase:<10} {} / {}  {percent:>3}%  {}/s  {eta}",
        human(done),
        human(total),
        human(rate as u64)
    )
}

fn human(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

fn status(run_dir: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let path = run_dir.join(api::update::STATUS_FILE);
    let status = UpdateStatus::read(&path).map_err(|e| {
        anyhow::anyhow!("{e} (is the update service running? it runs on a Tandem image)")
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", render_status(&status));
    Ok(ExitCode::SUCCESS)
}

/// The human form of `appliance update status`.
pub fn render_status(s: &UpdateStatus) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let boot = match &s.boot {
        api::update::Boot::Blessed => "blessed".to_string(),
        api::update::Boot::Trial { deadline_unix_ms } => {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            format!(
                "on trial, {}s left: blessed once every service stays ready, else back to the previous slot",
                deadline_unix_ms.saturating_sub(now_ms) / 1000
            )
        }
        api::update::Boot::RollingBack { reason } => format!("rolling back: {reason}"),
        api::update::Boot::Unknown { reason } => format!("unknown: {reason}"),
    };
    let _ = writeln!(
        out,
        "running {} from slot {} ({boot})",
        s.version, s.booted_slot
    );
    for slot in &s.slots {
        let state = match slot.state {
            SlotState::Booted => "booted",
            SlotState::Pending => "pending: boots once at the next boot",
            SlotState::Previous => "previous: the fallback",
            SlotState::Failed => "failed its trial",
            SlotState::Empty => "empty",
        };
        let _ = writeln!(
            out,
            "  slot {}: {:<8} {}{}",
            slot.slot,
            slot.version.as_deref().unwrap_or("-"),
            state,
            slot.entry
                .as_deref()
                .map(|e| format!(" [{e}]"))
                .unwrap_or_default()
        );
    }
    if !s.bad_versions.is_empty() {
        let _ = writeln!(
            out,
            "  refused without --force (failed here): {}",
            s.bad_versions.join(", ")
        );
    }
    if let Some(i) = &s.install {
        let _ = writeln!(
            out,
            "  last install: {} {} ({} of {}){}",
            i.version.as_deref().unwrap_or("?"),
            i.phase,
            human(i.done),
            human(i.total),
            i.error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::update::{Boot, SlotStatus};

    #[test]
    fn progress_shows_bytes_rate_and_eta() {
        let line = progress_line("writing", 50 << 20, 100 << 20, Duration::from_secs(5));
        assert_eq!(
            line,
            "writing    50.0 MiB / 100.0 MiB   50%  10.0 MiB/s  ETA 5s"
        );
        assert!(progress_line("verifying", 0, 0, Duration::ZERO).contains("ETA -"));
    }

    #[test]
    fn status_names_both_slots_and_what_is_pending() {
        let s = UpdateStatus {
            version: "0.1.0".into(),
            booted_slot: "a".into(),
            boot: Boot::Blessed,
            slots: vec![
                SlotStatus {
                    slot: "a".into(),
                    state: SlotState::Booted,
                    version: Some("0.1.0".into()),
                    entry: Some("appliance-a.conf".into()),
                },
                SlotStatus {
                    slot: "b".into(),
                    state: SlotState::Pending,
                    version: Some("0.2.0".into()),
                    entry: Some("appliance-b+3.conf".into()),
                },
            ],
            bad_versions: vec!["0.3.0".into()],
            install: None,
        };
        assert_eq!(
            render_status(&s),
            "running 0.1.0 from slot a (blessed)\n\
             \x20 slot a: 0.1.0    booted [appliance-a.conf]\n\
             \x20 slot b: 0.2.0    pending: boots once at the next boot [appliance-b+3.conf]\n\
             \x20 refused without --force (failed here): 0.3.0\n"
        );
    }
}
