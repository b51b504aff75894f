//! The floating IP as keepalived reports it and as Tandem shows it.
//!
//! keepalived writes every VRRP state change, in order, to a FIFO (`notify_fifo`); the balancer
//! reads it ([`parse_notify`]), keeps the node's [`VipStatus`] in [`STATUS_FILE`] for the
//! status command and the admin page, and exports it as metrics. keepalived gives the address
//! away while either track file holds a non-zero value ([`track_value`]).

use serde::{Deserialize, Serialize};

/// The VRRP instance keepalived runs for the floating IP.
pub const INSTANCE: &str = "tandem";
/// Written by the supervisor: 0 while the balancer process runs and is ready, else 1.
pub const TRACK_BALANCER: &str = "balancer-down";
/// Written by the balancer: 0 while it has at least one healthy backend, else 1.
pub const TRACK_BACKENDS: &str = "backends-down";
/// Written by the balancer: 1 from its start until it has served for [`SETTLE`], then 0.
/// While it is 1 keepalived lowers the node's priority to 1, so that a node that just booted
/// (its adverts or its peer's delayed by the load of booting) never wins an election against
/// a settled holder: the address does not bounce back to a returning node.
pub const TRACK_SETTLING: &str = "settling";
/// How long a node's balancer serves before the node stops settling.
pub const SETTLE: std::time::Duration = std::time::Duration::from_secs(30);
/// keepalived's notify FIFO, in the VIP run directory.
pub const NOTIFY_FIFO: &str = "notify.fifo";
/// The node's [`VipStatus`] as JSON, in the VIP run directory.
pub const STATUS_FILE: &str = "status.json";
/// The VIP run directory below the node's runtime directory.
pub const RUN_SUBDIR: &str = "vip";

/// keepalived's `track_file` convention with weight 0: `0` = fine, anything else = fault.
pub fn track_value(ok: bool) -> &'static str {
    if ok {
        "0\n"
    } else {
        "1\n"
    }
}

/// Writes a track file: a temporary file renamed into place, so keepalived (which re-reads it
/// on a rename) never sees half a value. The supervisor and the balancer both write them.
pub fn write_track(path: &std::path::Path, ok: bool) -> std::io::Result<()> {
    crate::fsio::write_atomic(path, track_value(ok).as_bytes(), 0o644, None)
}

/// A VRRP instance's state as keepalived names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum VrrpState {
    Master,
    Backup,
    Fault,
    Stop,
}

impl VrrpState {
    pub fn as_str(self) -> &'static str {
        match self {
            VrrpState::Master => "MASTER",
            VrrpState::Backup => "BACKUP",
            VrrpState::Fault => "FAULT",
            VrrpState::Stop => "STOP",
        }
    }

    /// Metric value: 0 backup, 1 master, 2 fault, 3 stop.
    pub fn code(self) -> u8 {
        match self {
            VrrpState::Backup => 0,
            VrrpState::Master => 1,
            VrrpState::Fault => 2,
            VrrpState::Stop => 3,
        }
    }

    pub const ALL: [VrrpState; 4] = [
        VrrpState::Master,
        VrrpState::Backup,
        VrrpState::Fault,
        VrrpState::Stop,
    ];

    fn parse(s: &str) -> Option<VrrpState> {
        VrrpState::ALL.into_iter().find(|state| state.as_str() == s)
    }
}

impl std::fmt::Display for VrrpState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One VRRP instance's state change from keepalived's notify FIFO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub instance: String,
    pub state: VrrpState,
    /// The instance's effective priority (unchanged by FAULT from a track file).
    pub priority: u8,
}

/// Parses one notify FIFO line, `INSTANCE "tandem" MASTER 150` (keepalived writes
/// `INSTANCE "<name>" <STATE> <priority>\n`). Anything else is `None`: sync group lines
/// (`GROUP ...`), the events that are not states (`MASTER_RX_LOWER_PRI`, `MASTER_PRIORITY`,
/// `BACKUP_PRIORITY`, `DELETED`) and garbage. Lines of other instances are returned with their
/// name. Never panics.
pub fn parse_notify(line: &str) -> Option<Transition> {
    let line = line.strip_suffix('\n').unwrap_or(line);
    let line = line.strip_suffix('\r').unwrap_or(line);
    // The name is written between quotes without escaping: it ends at the last quote.
    let (instance, rest) = line.strip_prefix("INSTANCE \"")?.rsplit_once('"')?;
    let (state, priority) = rest.strip_prefix(' ')?.split_once(' ')?;
    // `u8::from_str` would also take a sign.
    if instance.is_empty() || !priority.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(Transition {
        instance: instance.to_string(),
        state: VrrpState::parse(state)?,
        priority: priority.parse().ok()?,
    })
}

/// This node's view of the floating IP, kept in [`STATUS_FILE`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipStatus {
    pub address: String,
    pub node: String,
    /// `None` until keepalived reported a state.
    pub state: Option<VrrpState>,
    /// Unix time in ms of the last state change.
    pub since_ms: i64,
    /// State changes seen since the balancer started.
    pub transitions: u64,
    /// Entries into MASTER since the balancer started.
    pub became_master: u64,
    /// How the address is managed: `vrrp` (keepalived) or `fixed` (a local cluster on one
    /// machine, where only the highest-priority node binds it and nothing fails over).
    pub mode: String,
}

impl VipStatus {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    pub fn from_json(text: &str) -> Result<VipStatus, String> {
        serde_json::from_str(text).map_err(|e| e.to_string())
    }

    pub fn is_holder(&self) -> bool {
        self.state == Some(VrrpState::Master)
    }
}

/// Who holds the floating IP, from every node's own view (pure): the nodes in MASTER. More
/// than one is a split brain; none means nobody can serve it.
pub fn holders(views: &[(String, Option<VipStatus>)]) -> Vec<String> {
    views
        .iter()
        .filter(|(_, v)| v.as_ref().is_some_and(VipStatus::is_holder))
        .map(|(n, _)| n.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_lines() {
        fn check(line: &str, expected: Option<(&str, VrrpState, u8)>) {
            let got = parse_notify(line);
            let got = got
                .as_ref()
                .map(|t| (t.instance.as_str(), t.state, t.priority));
            assert_eq!(got, expected, "{line:?}");
        }
        use VrrpState::*;
        // What keepalived 2.2.7 writes (seen in the integration test).
        check(
            "INSTANCE \"tandem\" MASTER 150\n",
            Some(("tandem", Master, 150)),
        );
        check(
            "INSTANCE \"tandem\" BACKUP 100",
            Some(("tandem", Backup, 100)),
        );
        check(
            "INSTANCE \"tandem\" FAULT 150\n",
            Some(("tandem", Fault, 150)),
        );
        check("INSTANCE \"tandem\" STOP 0\r\n", Some(("tandem", Stop, 0)));
        check(
            "INSTANCE \"tandem\" MASTER 255",
            Some(("tandem", Master, 255)),
        );
        check("INSTANCE \"VI_1\" BACKUP 1", Some(("VI_1", Backup, 1)));
        check("INSTANCE \"a \"b\" MASTER 9", Some(("a \"b", Master, 9)));
        // Not a state of an instance.
        check("GROUP \"tandem\" MASTER 0", None);
        check("INSTANCE \"tandem\" MASTER_RX_LOWER_PRI 150", None);
        check("INSTANCE \"tandem\" MASTER_PRIORITY 140", None);
        check("INSTANCE \"tandem\" DELETED 150", None);
        check("VS [10.88.0.10]:tcp:80 UP", None);
        // Garbage.
        for bad in [
            "",
            "\n",
            "INSTANCE",
            "INSTANCE \"",
            "INSTANCE \"\"",
            "INSTANCE \"\" MASTER 1",
            "INSTANCE tandem MASTER 150",
            "INSTANCE \"tandem MASTER 150",
            "INSTANCE \"tandem\" master 150",
            "INSTANCE \"tandem\" MASTER",
            "INSTANCE \"tandem\" MASTER ",
            "INSTANCE \"tandem\" MASTER 256",
            "INSTANCE \"tandem\" MASTER -1",
            "INSTANCE \"tandem\" MASTER +1",
            "INSTANCE \"tandem\" MASTER 150 extra",
            "INSTANCE \"tandem\"  MASTER 150",
            "INSTANCE \"tandem\"MASTER 150",
            " INSTANCE \"tandem\" MASTER 150",
            "INSTANCE \"tandem\" MASTER 150\n\n",
            "INSTANCE \"t\u{e9}\" \u{1F600} 1",
            "\u{0}\u{ff}",
        ] {
            check(bad, None);
        }
    }

    #[test]
    fn track_files_are_replaced_whole() {
        let dir = std::env::temp_dir().join(format!("api-track-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(TRACK_BALANCER);
        write_track(&path, false).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1\n");
        write_track(&path, true).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "0\n");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no temporary file left"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn state_names_round_trip() {
        for state in VrrpState::ALL {
            assert_eq!(VrrpState::parse(state.as_str()), Some(state));
        }
    }

    #[test]
    fn status_round_trips_and_names_holders() {
        let s = VipStatus {
            address: "10.88.0.10".into(),
            node: "server1".into(),
            state: Some(VrrpState::Master),
            since_ms: 5,
            transitions: 2,
            became_master: 1,
            mode: "vrrp".into(),
        };
        assert_eq!(VipStatus::from_json(&s.to_json()), Ok(s.clone()));
        let backup = VipStatus {
            state: Some(VrrpState::Backup),
            ..s.clone()
        };
        let views = vec![
            ("server1".to_string(), Some(s.clone())),
            ("server2".to_string(), Some(backup)),
            ("server3".to_string(), None),
        ];
        assert_eq!(holders(&views), ["server1"]);
        assert!(VipStatus::from_json("{").is_err());
    }
}
