//! The balancer's side of the floating IP.
//!
//! - It tells keepalived whether it could serve: [`TrackFile`] holds `0` while at least one
//!   backend is up and `1` when none is (keepalived then gives the address away). The
//!   supervisor keeps a second track file for the balancer process itself, since a dead
//!   balancer cannot write.
//! - It follows keepalived's state changes from the notify FIFO ([`watch`]): the node's
//!   [`VipStatus`] goes to a file (status command, admin page) and to the metrics, each change is
//!   logged as a `vip:` line with `holder=` (the log monitor alerts on every move), and on
//!   taking the address it re-checks every backend at once, so a peer that died holding the
//!   address stops getting requests before the first client finds out.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use std::sync::{Arc, Mutex};

use api::vip::{self as fmt, VipStatus, VrrpState};
use tokio::io::AsyncBufReadExt as _;
use tokio::sync::watch;

use crate::proxy::Shared;

/// How this node's floating IP is managed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VipMode {
    /// keepalived moves it; states come from its notify FIFO in `dir`.
    Vrrp,
    /// A local cluster on one machine: no keepalived; only the node of highest priority binds
    /// the address (`holder`), and nothing fails over.
    Fixed { holder: bool },
}

/// The floating IP as this node's balancer sees it (part of the plan).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipPlan {
    pub address: Ipv4Addr,
    pub mode: VipMode,
}

/// The node's [`VipStatus`], shared by the watcher, the metrics and the status file.
#[derive(Debug)]
pub struct VipState {
    status: Mutex<VipStatus>,
    file: PathBuf,
}

impl VipState {
    /// `dir` is the VIP run directory (notify FIFO, status file, track file).
    pub fn new(plan: &VipPlan, node: &str, dir: &Path, now_ms: i64) -> VipState {
        let (state, mode) = match plan.mode {
            VipMode::Vrrp => (None, "vrrp"),
            VipMode::Fixed { holder } => (
                Some(if holder {
                    VrrpState::Master
                } else {
                    VrrpState::Backup
                }),
                "fixed",
            ),
        };
        VipState {
            status: Mutex::new(VipStatus {
                address: plan.address.to_string(),
                node: node.to_string(),
                state,
                since_ms: now_ms,
                transitions: 0,
                became_master: 0,
                mode: mode.into(),
            }),
            file: dir.join(fmt::STATUS_FILE),
        }
    }

    pub fn status(&self) -> VipStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Applies a state change (pure apart from the lock); `false` when nothing changed.
    pub fn apply(&self, state: VrrpState, now_ms: i64) -> bool {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if s.state == Some(state) {
            return false;
        }
        s.state = Some(state);
        s.since_ms = now_ms;
        s.transitions += 1;
        if state == VrrpState::Master {
            s.became_master += 1;
        }
        true
    }

    /// Writes the status file (temporary file + rename: readers never see half of it).
    pub fn save(&self) {
        let json = self.status().to_json();
        if let Err(e) = api::fsio::write_atomic(&self.file, json.as_bytes(), 0o644, None) {
            tracing::warn!(file = %self.file.display(), "writing the floating IP status: {e}");
        }
    }

    /// Prometheus lines for the floating IP.
    pub fn metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let s = self.status();
        let labels = format!("node=\"{}\",address=\"{}\"", s.node, s.address);
        let state = s.state.map_or(-1, |st| i64::from(st.code()));
        let _ = write!(
            out,
            "# HELP tandem_vip_holder Whether this node holds the floating IP (VRRP MASTER).\n\
             # TYPE tandem_vip_holder gauge\n\
             tandem_vip_holder{{{labels}}} {}\n\
             # HELP tandem_vip_state VRRP state: -1 unknown, 0 backup, 1 master, 2 fault, 3 stop.\n\
             # TYPE tandem_vip_state gauge\n\
             tandem_vip_state{{{labels}}} {state}\n\
             # HELP tandem_vip_transitions_total VRRP state changes seen since the balancer started.\n\
             # TYPE tandem_vip_transitions_total counter\n\
             tandem_vip_transitions_total{{{labels}}} {}\n\
             # HELP tandem_vip_became_master_total Times this node took the floating IP since the balancer started.\n\
             # TYPE tandem_vip_became_master_total counter\n\
             tandem_vip_became_master_total{{{labels}}} {}\n",
            u8::from(s.is_holder()),
            s.transitions,
            s.became_master,
        );
    }
}

/// Logs a state as the `vip:` status line the log monitor reads (`holder=` names this node
/// while it holds the address).
fn log_state(status: &VipStatus) {
    let state = status.state.map_or("UNKNOWN", VrrpState::as_str);
    let holder = if status.is_holder() {
        status.node.as_str()
    } else {
        "another-node"
    };
    tracing::info!(
        target: "vip",
        holder,
        state,
        address = %status.address,
        "floating IP {}: {state} on {}",
        status.address,
        status.node
    );
}

/// keepalived's track file for "this balancer has a healthy backend".
#[derive(Debug)]
pub struct TrackFile {
    path: PathBuf,
    last: Mutex<Option<bool>>,
}

impl TrackFile {
    pub fn new(path: PathBuf) -> TrackFile {
        TrackFile {
            path,
            last: Mutex::new(None),
        }
    }

    /// Writes the value when it changed.
    pub fn set(&self, ok: bool) {
        let name = self
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("track file");
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if *last == Some(ok) {
            return;
        }
        match fmt::write_track(&self.path, ok) {
            Ok(()) => {
                *last = Some(ok);
                match (name, ok) {
                    (fmt::TRACK_BACKENDS, true) => {
                        tracing::info!(file = %self.path.display(), "a backend is up: this node may hold the floating IP")
                    }
                    (fmt::TRACK_BACKENDS, false) => {
                        tracing::warn!(file = %self.path.display(), "no backend is up: this node gives the floating IP away")
                    }
                    (fmt::TRACK_SETTLING, true) => {
                        tracing::info!(file = %self.path.display(), "settled: this node takes part in elections at its full priority")
                    }
                    (fmt::TRACK_SETTLING, false) => {
                        tracing::info!(file = %self.path.display(), "settling: this node loses elections until it has served {} s", api::vip::SETTLE.as_secs())
                    }
                    _ => tracing::info!(file = %self.path.display(), ok, "track file written"),
                }
            }
            Err(e) => tracing::error!(file = %self.path.display(), "writing the track file: {e}"),
        }
    }
}

/// Follows keepalived's notify FIFO until shutdown.
pub async fn watch(
    shared: Arc<Shared>,
    state: Arc<VipState>,
    fifo: PathBuf,
    mut shutdown: watch::Receiver<bool>,
) {
    // Opened read-write: the FIFO then never reports end-of-file when keepalived restarts, and
    // what keepalived wrote while we were not reading is still in the pipe, in order.
    let receiver = match tokio::net::unix::pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(&fifo)
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(fifo = %fifo.display(), "cannot follow keepalived's state changes: {e}");
            return;
        }
    };
    let mut lines = tokio::io::BufReader::new(receiver).lines();
    loop {
        let line = tokio::select! {
            line = lines.next_line() => line,
            _ = shutdown.changed() => return,
        };
        let line = match line {
            Ok(Some(line)) => line,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(fifo = %fifo.display(), "reading keepalived's notify FIFO: {e}");
                return;
            }
        };
        let Some(t) = fmt::parse_notify(&line) else {
            continue;
        };
        if t.instance != fmt::INSTANCE {
            continue;
        }
        if state.apply(t.state, now_ms()) {
            if t.state == VrrpState::Master {
                // A peer may have died holding the address: find out before clients do.
                shared.recheck.notify_waiters();
            }
            state.save();
            log_state(&state.status());
        }
    }
}

/// The node is settling (priority 1 in elections) for [`api::vip::SETTLE`] after the balancer
/// starts, then at full priority.
pub async fn settle(track: TrackFile, mut shutdown: watch::Receiver<bool>) {
    track.set(false);
    tokio::select! {
        _ = tokio::time::sleep(api::vip::SETTLE) => track.set(true),
        _ = shutdown.changed() => {}
    }
}

/// Writes the initial status (fixed mode, or unknown until keepalived speaks).
pub fn publish_initial(state: &VipState) {
    state.save();
    log_state(&state.status());
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_changes_are_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        let plan = VipPlan {
            address: Ipv4Addr::new(10, 88, 0, 10),
            mode: VipMode::Vrrp,
        };
        let s = VipState::new(&plan, "server1", dir.path(), 1);
        assert_eq!(s.status().state, None);
        assert!(s.apply(VrrpState::Backup, 2));
        assert!(!s.apply(VrrpState::Backup, 3));
        assert!(s.apply(VrrpState::Master, 4));
        assert!(s.apply(VrrpState::Fault, 5));
        assert!(s.apply(VrrpState::Master, 6));
        let st = s.status();
        assert_eq!((st.transitions, st.became_master, st.since_ms), (4, 2, 6));
        s.save();
        let saved = std::fs::read_to_string(dir.path().join(fmt::STATUS_FILE)).unwrap();
        assert_eq!(VipStatus::from_json(&saved).unwrap(), st);
        let mut m = String::new();
        s.metrics(&mut m);
        assert!(m.contains("tandem_vip_holder{node=\"server1\",address=\"10.88.0.10\"} 1\n"));
        assert!(
            m.contains("tandem_vip_transitions_total{node=\"server1\",address=\"10.88.0.10\"} 4\n")
        );
        let fixed = VipState::new(
            &VipPlan {
                mode: VipMode::Fixed { holder: false },
                ..plan
            },
            "server2",
            dir.path(),
            1,
        );
        assert_eq!(fixed.status().state, Some(VrrpState::Backup));
        assert_eq!(fixed.status().mode, "fixed");
    }

    #[test]
    fn track_file_is_written_on_change_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(fmt::TRACK_BACKENDS);
        let t = TrackFile::new(path.clone());
        t.set(true);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "0\n");
        std::fs::write(&path, "x").unwrap();
        t.set(true);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "x");
        t.set(false);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1\n");
    }
}
