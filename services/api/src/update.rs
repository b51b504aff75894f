//! The update service (`appliance updater`, root, one per image): its socket protocol and the
//! status it publishes.
//!
//! **Socket** ([`SOCKET_FILE`] in the run directory, 0660, group of the admin server): a client
//! sends one JSON line, a [`Request`]. For [`Request::Install`] the raw bundle bytes follow until
//! the client shuts down its writing side; the service answers with JSON lines, [`Event`]s:
//! progress while it installs, then exactly one `done` or `failed`. One install runs at a time;
//! a second is refused at once. Clients: `appliance update install` (the console), the admin
//! server (an upload from the admin page, a peer's bundle during a cluster upgrade).
//!
//! **Status** ([`STATUS_FILE`] in the run directory, 0644): an [`UpdateStatus`], rewritten
//! whole (atomically) whenever something changes. Readers: `appliance update status`, the admin
//! server (`/api/status`, the status page, `/metrics`, the peer API).

use serde::{Deserialize, Serialize};

/// The update service's socket, in the node's run directory.
pub const SOCKET_FILE: &str = "update.sock";
/// The update service's published [`UpdateStatus`], in the node's run directory.
pub const STATUS_FILE: &str = "update-status.json";
/// How long a new slot may take, after its first boot, to have every service ready and keep
/// them ready for [`SETTLE_SECS`]; past it the node reboots into the old slot.
pub const DEFAULT_TRIAL_TIMEOUT_SECS: u64 = 300;
/// How long every service must stay ready before a new slot is blessed.
pub const SETTLE_SECS: u64 = 20;
/// Kernel command-line parameter of a slot's entry: the trial timeout in seconds.
pub const TRIAL_TIMEOUT_PARAM: &str = "tandem.trial_timeout";
/// Kernel command-line parameter naming the booted slot (`a` or `b`).
pub const SLOT_PARAM: &str = "tandem.slot";

/// What the service's `failed` event says when another install holds the node (clients answer
/// "busy" on it, not "refused").
pub const INSTALL_BUSY: &str = "an install is running on this node";

/// The first line a client sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Install the bundle that follows into the inactive slot.
    Install {
        /// Accept a version not newer than the running one, or one that failed here before.
        #[serde(default)]
        force: bool,
        /// Reboot into the new slot once it is installed.
        #[serde(default)]
        reboot: bool,
        /// Trial timeout for the new slot (default [`DEFAULT_TRIAL_TIMEOUT_SECS`]).
        #[serde(default)]
        trial_timeout_secs: Option<u64>,
        /// Bytes that follow, when the client knows (for progress).
        #[serde(default)]
        size: Option<u64>,
        /// Where the bundle comes from, for the log (a file name, `upload`, a peer's name).
        #[serde(default)]
        origin: String,
    },
    /// Boot `slot` once at the next boot (its entry must exist), and reboot if asked: how an
    /// operator tries the other slot by hand. The default is unchanged.
    BootOnce {
        slot: String,
        #[serde(default)]
        reboot: bool,
    },
}

/// A line the service sends back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case", deny_unknown_fields)]
pub enum Event {
    /// Verified payload bytes so far out of `total`.
    Progress {
        phase: String,
        done: u64,
        total: u64,
    },
    /// The bundle is in the inactive slot; `entry` boots it once at the next boot.
    Done {
        version: String,
        slot: String,
        entry: String,
        bytes: u64,
        elapsed_ms: u64,
        rebooting: bool,
    },
    /// Nothing was activated; `message` says why.
    Failed { message: String },
}

impl Event {
    /// The event as one line of JSON with its newline.
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self)
            .unwrap_or_else(|_| r#"{"event":"failed","message":"unencodable event"}"#.to_string());
        s.push('\n');
        s
    }
}

/// Why the update service's socket at `socket` gave no answer.
pub fn unreachable(socket: &std::path::Path, e: &std::io::Error) -> String {
    format!(
        "the update service is not running (no answer on {}: {e})",
        socket.display()
    )
}

/// The one client side of the socket: connects to `socket` and sends `request`. For an
/// install, the bundle's bytes follow on the returned stream; shut its writing side down at
/// the end, then [`read_answer`].
pub fn send(
    socket: &std::path::Path,
    request: &Request,
) -> Result<std::os::unix::net::UnixStream, String> {
    use std::io::Write as _;
    let mut stream =
        std::os::unix::net::UnixStream::connect(socket).map_err(|e| unreachable(socket, &e))?;
    let mut line = serde_json::to_string(request).map_err(|e| e.to_string())?;
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(|e| format!("asking the update service: {e}"))?;
    Ok(stream)
}

/// Reads the service's events to the last one (`done` or `failed`), handing each progress
/// event to `progress`.
pub fn read_answer(
    answer: impl std::io::Read,
    progress: &mut dyn FnMut(&Event),
) -> Result<Event, String> {
    use std::io::BufRead as _;
    for line in std::io::BufReader::new(answer).lines() {
        let line = line.map_err(|e| format!("reading the update service's answer: {e}"))?;
        match serde_json::from_str::<Event>(&line) {
            Ok(event @ Event::Progress { .. }) => progress(&event),
            Ok(last) => return Ok(last),
            Err(e) => return Err(format!("unreadable answer {line:?}: {e}")),
        }
    }
    Err("the update service closed without an answer".into())
}

/// What a slot holds, as the update service sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotState {
    /// The slot the node runs now.
    Booted,
    /// Installed; boots once at the next boot, then must prove itself.
    Pending,
    /// A blessed slot that is not booted: what the node falls back to.
    Previous,
    /// Tried and not blessed (its version is in `bad_versions`).
    Failed,
    /// No boot entry: empty, or half-written by an install that did not finish.
    Empty,
}

/// One slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotStatus {
    /// `a` or `b`.
    pub slot: String,
    pub state: SlotState,
    /// The version its boot entry names.
    pub version: Option<String>,
    /// Its boot entry's file name (with the boot counter while it has one).
    pub entry: Option<String>,
}

/// The booted slot's standing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Boot {
    /// The booted slot is the default.
    Blessed,
    /// A trial boot of a new slot: blessed once every service is ready and stays ready, or the
    /// node reboots into the previous slot at `deadline_unix_ms`.
    Trial { deadline_unix_ms: u64 },
    /// The trial failed: the node is rebooting into the previous slot.
    RollingBack { reason: String },
    /// The boot entries could not be read (no ESP, no efivars): nothing is blessed.
    Unknown { reason: String },
}

/// An install in progress, or the last one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallStatus {
    /// `verifying`, `writing`, `finishing`, `done` or `failed`.
    pub phase: String,
    pub done: u64,
    pub total: u64,
    pub started_unix_ms: u64,
    /// The bundle's version, once its manifest is verified.
    pub version: Option<String>,
    pub origin: String,
    /// Why it failed.
    pub error: Option<String>,
}

/// What [`STATUS_FILE`] holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateStatus {
    /// The running image's version.
    pub version: String,
    /// The slot the node booted from.
    pub booted_slot: String,
    pub boot: Boot,
    pub slots: Vec<SlotStatus>,
    /// Versions that failed their trial on this node: refused without `--force`.
    pub bad_versions: Vec<String>,
    pub install: Option<InstallStatus>,
}

impl UpdateStatus {
    /// Reads the status file at `path`.
    pub fn read(path: &std::path::Path) -> Result<UpdateStatus, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The slot in `state`, if any.
    pub fn slot_in(&self, state: SlotState) -> Option<&SlotStatus> {
        self.slots.iter().find(|s| s.state == state)
    }
}

/// A bundle source the CLI may be given on the command line: a file, `-` (stdin) or an
/// `https://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Stdin,
    Url(String),
    File(std::path::PathBuf),
}

impl Origin {
    /// Classifies `arg`; a plain `http://` URL is refused (bundles are signed, but the
    /// transport still must not be trivially tampered with or observed).
    pub fn parse(arg: &str) -> Result<Origin, String> {
        if arg == "-" {
            Ok(Origin::Stdin)
        } else if arg.starts_with("https://") {
            Ok(Origin::Url(arg.to_string()))
        } else if arg.starts_with("http://") {
            Err(format!("{arg}: only https:// URLs are accepted"))
        } else if arg.is_empty() {
            Err("no bundle given".to_string())
        } else {
            Ok(Origin::File(arg.into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_events_are_one_json_line() {
        let r = Request::Install {
            force: false,
            reboot: true,
            trial_timeout_secs: Some(120),
            size: Some(10),
            origin: "upload".into(),
        };
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(
            line,
            r#"{"request":"install","force":false,"reboot":true,"trial_timeout_secs":120,"size":10,"origin":"upload"}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), r);
        // Defaults: a minimal request is an install without force or reboot.
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"request":"install"}"#).unwrap(),
            Request::Install {
                force: false,
                reboot: false,
                trial_timeout_secs: None,
                size: None,
                origin: String::new()
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"request":"install","forse":true}"#).is_err());
        let e = Event::Progress {
            phase: "writing".into(),
            done: 1,
            total: 2,
        };
        assert_eq!(
            e.to_line(),
            "{\"event\":\"progress\",\"phase\":\"writing\",\"done\":1,\"total\":2}\n"
        );
    }

    #[test]
    fn an_answer_is_its_last_event_and_progress_is_passed_on() {
        let lines = "{\"event\":\"progress\",\"phase\":\"rootfs\",\"done\":1,\"total\":2}\n\
                     {\"event\":\"failed\",\"message\":\"no\"}\n";
        let mut seen = 0;
        let last = read_answer(lines.as_bytes(), &mut |_| seen += 1).unwrap();
        assert_eq!(
            last,
            Event::Failed {
                message: "no".into()
            }
        );
        assert_eq!(seen, 1);
        assert!(read_answer("".as_bytes(), &mut |_| {})
            .unwrap_err()
            .contains("closed"));
        assert!(read_answer("x\n".as_bytes(), &mut |_| {})
            .unwrap_err()
            .contains("unreadable"));
        let missing = std::path::Path::new("/nonexistent/update.sock");
        let err = send(
            missing,
            &Request::BootOnce {
                slot: "a".into(),
                reboot: false,
            },
        )
        .unwrap_err();
        assert!(
            err.starts_with("the update service is not running"),
            "{err}"
        );
    }

    #[test]
    fn status_round_trips() {
        let s = UpdateStatus {
            version: "0.2.0".into(),
            booted_slot: "b".into(),
            boot: Boot::Trial {
                deadline_unix_ms: 5,
            },
            slots: vec![SlotStatus {
                slot: "a".into(),
                state: SlotState::Previous,
                version: Some("0.1.0".into()),
                entry: Some("appliance-a.conf".into()),
            }],
            bad_versions: vec!["0.3.0".into()],
            install: None,
        };
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<UpdateStatus>(&text).unwrap(), s);
        assert_eq!(s.slot_in(SlotState::Previous).unwrap().slot, "a");
        assert!(s.slot_in(SlotState::Pending).is_none());
    }

    #[test]
    fn origins() {
        assert_eq!(Origin::parse("-").unwrap(), Origin::Stdin);
        assert_eq!(
            Origin::parse("https://x/b.bundle").unwrap(),
            Origin::Url("https://x/b.bundle".into())
        );
        assert!(Origin::parse("http://x/b.bundle").is_err());
        assert_eq!(
            Origin::parse("v2.bundle").unwrap(),
            Origin::File("v2.bundle".into())
        );
    }
}
