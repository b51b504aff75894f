//! The rolling cluster upgrade: every other node first (cluster order), this node last, one at
//! a time, stopping at the first node that fails.
//!
//! Before a node is touched every OTHER node must be healthy (every service ready), so the
//! floating IP, which leaves the node when its keepalived stops for the reboot, always has a
//! healthy node to move to. A peer gets the bundle over the peer API with `reboot=1`; it is
//! then polled (it does not answer while it reboots) until it runs the bundle's version
//! blessed, or it rolled back (the bundle's version in its `bad_versions`), or a deadline
//! passes. This node installs through its own update socket last and dies in the reboot; the
//! state file ([`STATE_FILE`]) says so, and the admin server finishes the record once the node
//! is back ([`reconcile`]).
//!
//! The decisions ([`drive`]) take a [`Fleet`] (the HTTP and socket calls, and the clock), so
//! the order and the stop-at-first-failure rule are tested without a cluster.

use std::path::{Path, PathBuf};
use std::time::Duration;

use api::update::{Boot, Event, UpdateStatus};
use cluster_config::{Cluster, Node};
use serde::{Deserialize, Serialize};

use crate::peer::PeerClient;

/// The upgrade's directory below the admin server's own state directory
/// ([`api::files::ADMIN_STATE_DIR`], which the admin server's user owns), 0700: the spooled
/// bundle and the record.
pub const STATE_SUBDIR: &str = "update";
/// The upgrade's record ([`UpgradeState`]) in [`STATE_SUBDIR`].
pub const STATE_FILE: &str = "cluster-upgrade.json";
/// The bundle an upload to `/api/cluster/upgrade` is spooled into, in [`STATE_SUBDIR`].
pub const SPOOL_FILE: &str = "cluster.bundle";
/// How often a rebooting peer is asked for its update status.
const POLL_EVERY: Duration = Duration::from_secs(2);
/// Added to the trial timeout: the install itself and the reboot.
const REBOOT_GRACE: Duration = Duration::from_secs(600);
/// How long the other nodes may take to be healthy before a node is touched.
const HEALTH_WAIT: Duration = Duration::from_secs(120);

/// Where one node is in the upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Not touched yet (and, after a failure elsewhere, left on the old version).
    Waiting,
    /// The bundle is being sent and installed.
    Installing,
    /// Installed; rebooting into the new slot and proving itself.
    Rebooting,
    /// Runs the new version, blessed.
    Done,
    /// Not upgraded; `reason` says why.
    Failed,
}

/// One node's line of the record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeUpgrade {
    pub node: String,
    pub step: Step,
    /// Why it failed, or what it is waiting for.
    pub reason: Option<String>,
    pub since_unix_ms: u64,
}

/// The whole upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Running,
    Done,
    Failed,
}

/// The upgrade's record, written to [`STATE_FILE`] at every change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeState {
    /// The bundle's version.
    pub version: String,
    pub outcome: Outcome,
    /// The latest thing that happened, in a sentence.
    pub message: String,
    pub started_unix_ms: u64,
    pub finished_unix_ms: Option<u64>,
    /// In upgrade order: the other nodes in cluster order, this node last.
    pub nodes: Vec<NodeUpgrade>,
}

impl UpgradeState {
    /// Reads the record at `path`; `Ok(None)` when there is none.
    pub fn read(path: &Path) -> Result<Option<UpgradeState>, String> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("reading {}: {e}", path.display())),
        }
    }

    /// Writes the record to `path` atomically (0644).
    pub fn write(&self, path: &Path) -> Result<(), String> {
        let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        api::fsio::write_atomic(path, text.as_bytes(), 0o644, None).map_err(|e| e.to_string())
    }

    fn node_mut(&mut self, name: &str) -> Option<&mut NodeUpgrade> {
        self.nodes.iter_mut().find(|n| n.node == name)
    }
}

/// Why a cluster upgrade could not start.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The bundle could not be opened, or its signature or manifest was refused.
    #[error("{}: {source}", path.display())]
    Bundle {
        path: PathBuf,
        #[source]
        source: update::Error,
    },
    /// This node is not a node of the cluster.
    #[error("{0} is not a node of the cluster")]
    NotInCluster(String),
}

/// How to run a cluster upgrade besides the bundle and the nodes.
#[derive(Debug, Clone)]
pub struct UpgradeOptions {
    /// The new slots' trial timeout (default [`api::update::DEFAULT_TRIAL_TIMEOUT_SECS`]).
    pub trial_timeout_secs: u64,
    /// The trusted keyring the bundle's signature is checked against before any node is
    /// touched ([`api::files::IMAGE_UPDATE_KEYRING`] on an image).
    pub keyring: PathBuf,
    /// Where the record is kept ([`state_file`] of the node's state directory); `None`: not
    /// kept (the progress callback still sees every change).
    pub state_file: Option<PathBuf>,
}

/// The upgrade's directory for a node's state directory: `STATE_DIR/admin/update`.
pub fn upgrade_dir(state_dir: &Path) -> PathBuf {
    state_dir
        .join(api::files::ADMIN_STATE_DIR)
        .join(STATE_SUBDIR)
}

/// The record's path for a node's state directory (in [`upgrade_dir`]).
pub fn state_file(state_dir: &Path) -> PathBuf {
    upgrade_dir(state_dir).join(STATE_FILE)
}

/// Upgrades the cluster with the bundle at `bundle`: every other node over the peer API
/// (`peers`), then this node (`me`) through its update socket `update_socket`, which reboots
/// it (this call then does not return: the process dies in the reboot). Synchronous; calls
/// `progress` with the record at every change. Returns the final record: its `outcome` says
/// whether every node was upgraded (`Running` when this node was left rebooting).
pub fn cluster_upgrade(
    bundle: &Path,
    cluster: &Cluster,
    me: &Node,
    peers: &PeerClient,
    update_socket: &Path,
    options: &UpgradeOptions,
    progress: &mut dyn FnMut(&UpgradeState),
) -> Result<UpgradeState, UpgradeError> {
    if cluster.node(&me.name).is_none() {
        return Err(UpgradeError::NotInCluster(me.name.clone()));
    }
    let version =
        bundle_version(bundle, &options.keyring).map_err(|source| UpgradeError::Bundle {
            path: bundle.to_path_buf(),
            source,
        })?;
    let mut fleet = Live {
        cluster,
        peers: Some(peers),
        bundle,
        update_socket,
        trial_timeout_secs: options.trial_timeout_secs,
    };
    Ok(run_recorded(
        &mut fleet,
        cluster,
        me,
        &version,
        options.trial_timeout_secs,
        options.state_file.as_deref(),
        progress,
    ))
}

/// [`drive`], writing the record to `state_file` at every change before `progress` sees it.
pub(crate) fn run_recorded(
    fleet: &mut dyn Fleet,
    cluster: &Cluster,
    me: &Node,
    version: &str,
    trial_timeout_secs: u64,
    state_file: Option<&Path>,
    progress: &mut dyn FnMut(&UpgradeState),
) -> UpgradeState {
    if let Some(dir) = state_file.and_then(Path::parent) {
        if let Err(e) = crate::private_dir(dir) {
            tracing::warn!("the cluster upgrade's record: {e}");
        }
    }
    drive(
        fleet,
        cluster,
        me,
        version,
        trial_timeout_secs,
        &mut |state| {
            if let Some(path) = state_file {
                if let Err(e) = state.write(path) {
                    tracing::warn!("writing the cluster upgrade's record: {e}");
                }
            }
            progress(state);
        },
    )
}

/// The bundle's version, from its manifest once its signature is verified against `keyring`
/// (the payloads are not read: each node verifies them as it installs).
pub(crate) fn bundle_version(bundle: &Path, keyring: &Path) -> Result<String, update::Error> {
    let keys = update::keys::read_keyring(keyring)?;
    let file = std::fs::File::open(bundle)
        .map_err(|e| update::Error::from_io(&format!("opening {}", bundle.display()), e))?;
    let mut source = update::Source::new(std::io::BufReader::new(file));
    let policy = update::Policy {
        trusted: &keys,
        product: update::PRODUCT,
        compatible: update::COMPATIBLE,
        running: None,
        force: true,
        known_bad: &[],
    };
    let opened = update::Bundle::open(&mut source, &policy)?;
    Ok(opened.manifest().version.clone())
}

/// What the upgrade does to the nodes, and its clock: the peer API and the update socket in
/// the server and the CLI, a script in the tests.
pub(crate) trait Fleet {
    /// `Ok` when every service of `node` is ready.
    fn health(&mut self, node: &Node) -> Result<(), String>;
    /// `node`'s published update status (a peer's over the peer API).
    fn update_status(&mut self, node: &Node) -> Result<UpdateStatus, String>;
    /// Sends the bundle to the peer `node` and installs it there with `reboot=1`.
    fn install_peer(&mut self, node: &Node) -> Result<(), String>;
    /// Installs the bundle on this node with `reboot=1`.
    fn install_local(&mut self) -> Result<(), String>;
    fn now_unix_ms(&mut self) -> u64;
    fn sleep(&mut self, d: Duration);
}

/// Runs the upgrade against `fleet`; `record` sees the record at every change.
pub(crate) fn drive(
    fleet: &mut dyn Fleet,
    cluster: &Cluster,
    me: &Node,
    version: &str,
    trial_timeout_secs: u64,
    record: &mut dyn FnMut(&UpgradeState),
) -> UpgradeState {
    let now = fleet.now_unix_ms();
    let order: Vec<&Node> = cluster
        .nodes
        .iter()
        .filter(|n| n.name != me.name)
        .chain(std::iter::once(me))
        .collect();
    let mut state = UpgradeState {
        version: version.to_string(),
        outcome: Outcome::Running,
        message: format!(
            "upgrading to {version}: {}",
            order
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(", then ")
        ),
        started_unix_ms: now,
        finished_unix_ms: None,
        nodes: order
            .iter()
            .map(|n| NodeUpgrade {
                node: n.name.clone(),
                step: Step::Waiting,
                reason: None,
                since_unix_ms: now,
            })
            .collect(),
    };
    record(&state);
    for node in &order {
        let this = node.name == me.name;
        match upgrade_one(
            fleet,
            cluster,
            node,
            this,
            version,
            trial_timeout_secs,
            &mut state,
            record,
        ) {
            Ok(()) => {}
            Err(reason) => {
                let left: Vec<&str> = state
                    .nodes
                    .iter()
                    .filter(|n| n.step == Step::Waiting)
                    .map(|n| n.node.as_str())
                    .collect();
                let mut message = format!("stopped at {}: {reason}", node.name);
                if !left.is_empty() {
                    message.push_str(&format!("; {} stay on the old version", left.join(", ")));
                }
                set(fleet, &mut state, &node.name, Step::Failed, Some(reason));
                state.outcome = Outcome::Failed;
                state.message = message;
                state.finished_unix_ms = Some(fleet.now_unix_ms());
                tracing::error!("cluster upgrade: {}", state.message);
                record(&state);
                return state;
            }
        }
    }
    if state.nodes.iter().all(|n| n.step == Step::Done) {
        state.outcome = Outcome::Done;
        state.message = format!("every node runs {version}");
        state.finished_unix_ms = Some(fleet.now_unix_ms());
        record(&state);
    }
    state
}

fn set(
    fleet: &mut dyn Fleet,
    state: &mut UpgradeState,
    node: &str,
    step: Step,
    reason: Option<String>,
) {
    let now = fleet.now_unix_ms();
    if let Some(n) = state.node_mut(node) {
        n.step = step;
        n.reason = reason;
        n.since_unix_ms = now;
    }
}

/// Upgrades one node; `Err` says why it failed.
#[allow(clippy::too_many_arguments)]
fn upgrade_one(
    fleet: &mut dyn Fleet,
    cluster: &Cluster,
    node: &Node,
    this: bool,
    version: &str,
    trial_timeout_secs: u64,
    state: &mut UpgradeState,
    record: &mut dyn FnMut(&UpgradeState),
) -> Result<(), String> {
    if let Ok(status) = fleet.update_status(node) {
        if runs_blessed(&status, version) {
            set(
                fleet,
                state,
                &node.name,
                Step::Done,
                Some(format!("already runs {version}")),
            );
            state.message = format!("{} already runs {version}", node.name);
            record(state);
            return Ok(());
        }
    }
    others_healthy(fleet, cluster, node)?;
    set(fleet, state, &node.name, Step::Installing, None);
    state.message = format!("installing {version} on {}", node.name);
    record(state);
    if this {
        // The record says "rebooting" before the install that ends with this process.
        set(
            fleet,
            state,
            &node.name,
            Step::Rebooting,
            Some("this node installs and reboots".into()),
        );
        state.message = format!("{} (this node) installs {version} and reboots", node.name);
        record(state);
        fleet.install_local()?;
        return Ok(());
    }
    fleet.install_peer(node)?;
    set(fleet, state, &node.name, Step::Rebooting, None);
    state.message = format!("{} installed {version} and reboots", node.name);
    record(state);
    let deadline = fleet.now_unix_ms()
        + (Duration::from_secs(trial_timeout_secs) + REBOOT_GRACE).as_millis() as u64;
    loop {
        fleet.sleep(POLL_EVERY);
        // No answer while it reboots: expected.
        if let Ok(status) = fleet.update_status(node) {
            if runs_blessed(&status, version) {
                set(fleet, state, &node.name, Step::Done, None);
                state.message = format!("{} runs {version}, blessed", node.name);
                record(state);
                return Ok(());
            }
            if rolled_back(&status, version) {
                return Err(format!(
                    "{version} failed its trial and {} rolled back to {}",
                    node.name, status.version
                ));
            }
        }
        if fleet.now_unix_ms() > deadline {
            return Err(format!(
                "{} did not run {version} blessed within {}s",
                node.name,
                trial_timeout_secs + REBOOT_GRACE.as_secs()
            ));
        }
    }
}

/// Every node but `node` is healthy, waiting up to [`HEALTH_WAIT`] for them.
fn others_healthy(fleet: &mut dyn Fleet, cluster: &Cluster, node: &Node) -> Result<(), String> {
    let deadline = fleet.now_unix_ms() + HEALTH_WAIT.as_millis() as u64;
    loop {
        let sick: Vec<String> = cluster
            .nodes
            .iter()
            .filter(|n| n.name != node.name)
            .filter_map(|n| fleet.health(n).err().map(|e| format!("{}: {e}", n.name)))
            .collect();
        if sick.is_empty() {
            return Ok(());
        }
        if fleet.now_unix_ms() > deadline {
            return Err(format!(
                "not touched: the other nodes must be healthy first ({})",
                sick.join("; ")
            ));
        }
        fleet.sleep(POLL_EVERY);
    }
}

fn same_version(a: &str, b: &str) -> bool {
    match (update::Version::parse(a), update::Version::parse(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// `status` is `version` booted and blessed.
fn runs_blessed(status: &UpdateStatus, version: &str) -> bool {
    same_version(&status.version, version) && status.boot == Boot::Blessed
}

/// `status` runs another version and remembers `version` as bad.
fn rolled_back(status: &UpdateStatus, version: &str) -> bool {
    !same_version(&status.version, version)
        && status.bad_versions.iter().any(|v| same_version(v, version))
}

/// Finishes a record this node left when it rebooted into the new version: `Some` with the
/// updated record once `own` (this node's update status now) shows the version blessed or
/// rolled back; `None` when there is nothing to change.
pub(crate) fn reconcile(
    state: &UpgradeState,
    me: &str,
    own: &UpdateStatus,
    now_unix_ms: u64,
) -> Option<UpgradeState> {
    if state.outcome != Outcome::Running {
        return None;
    }
    let mine = state.nodes.iter().find(|n| n.node == me)?;
    if mine.step != Step::Rebooting && mine.step != Step::Installing {
        return None;
    }
    let (step, outcome, reason, message) = if runs_blessed(own, &state.version) {
        (
            Step::Done,
            Outcome::Done,
            None,
            format!("every node runs {}", state.version),
        )
    } else if rolled_back(own, &state.version) {
        let reason = format!(
            "{} failed its trial and {me} rolled back to {}",
            state.version, own.version
        );
        (
            Step::Failed,
            Outcome::Failed,
            Some(reason.clone()),
            format!("stopped at {me}: {reason}"),
        )
    } else {
        return None;
    };
    let mut next = state.clone();
    if let Some(n) = next.node_mut(me) {
        n.step = step;
        n.reason = reason;
        n.since_unix_ms = now_unix_ms;
    }
    next.outcome = outcome;
    next.message = message;
    next.finished_unix_ms = Some(now_unix_ms);
    Some(next)
}

/// The real fleet: the peer API and this node's update socket.
pub(crate) struct Live<'a> {
    pub(crate) cluster: &'a Cluster,
    /// `None` on a machine without the node's certificates: no peer can be reached.
    pub(crate) peers: Option<&'a PeerClient>,
    pub(crate) bundle: &'a Path,
    pub(crate) update_socket: &'a Path,
    pub(crate) trial_timeout_secs: u64,
}

impl Live<'_> {
    fn peers(&self) -> Result<&PeerClient, String> {
        self.peers
            .ok_or_else(|| "no peer API on this machine (no node certificate)".to_string())
    }
}

impl Fleet for Live<'_> {
    fn health(&mut self, node: &Node) -> Result<(), String> {
        let health = self
            .peers()?
            .health(self.cluster, node)
            .map_err(|e| e.to_string())?;
        match health.healthy() {
            true => Ok(()),
            false => Err(health.describe()),
        }
    }

    fn update_status(&mut self, node: &Node) -> Result<UpdateStatus, String> {
        self.peers()?
            .update_status(self.cluster, node)
            .map_err(|e| e.to_string())
    }

    fn install_peer(&mut self, node: &Node) -> Result<(), String> {
        match self.peers()?.post_bundle(
            self.cluster,
            node,
            self.bundle,
            false,
            true,
            Some(self.trial_timeout_secs),
        ) {
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    fn install_local(&mut self) -> Result<(), String> {
        let origin = "cluster upgrade".to_string();
        match crate::install::install_file(
            self.update_socket,
            self.bundle,
            false,
            true,
            Some(self.trial_timeout_secs),
            origin,
        ) {
            Ok(Event::Done { .. }) => Ok(()),
            Ok(Event::Failed { message }) => Err(message),
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(e) => Err(e),
        }
    }

    fn now_unix_ms(&mut self) -> u64 {
        crate::unix_ms()
    }

    fn sleep(&mut self, d: Duration) {
        std::thread::sleep(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::update::{SlotState, SlotStatus};
    use std::collections::HashMap;

    fn status(version: &str, boot: Boot, bad: &[&str]) -> UpdateStatus {
        UpdateStatus {
            version: version.into(),
            booted_slot: "a".into(),
            boot,
            slots: vec![SlotStatus {
                slot: "a".into(),
                state: SlotState::Booted,
                version: Some(version.into()),
                entry: None,
            }],
            bad_versions: bad.iter().map(|s| s.to_string()).collect(),
            install: None,
        }
    }

    /// What a peer does once it gets the bundle.
    #[derive(Clone, Copy)]
    enum Peer {
        /// Reboots (no answer for a few polls), then runs the new version blessed.
        Upgrades,
        /// Refuses the bundle.
        Refuses,
        /// Boots it, fails its trial and rolls back.
        RollsBack,
        /// Never comes back.
        Silent,
    }

    struct Fake {
        now: u64,
        behaviour: HashMap<String, Peer>,
        /// Versions each node runs now.
        running: HashMap<String, UpdateStatus>,
        /// Polls left before a rebooting node answers again.
        rebooting: HashMap<String, u32>,
        unhealthy: Vec<String>,
        /// Everything that was done, in order.
        log: Vec<String>,
        target: String,
    }

    impl Fake {
        fn new(target: &str, nodes: &[(&str, Peer)]) -> Fake {
            Fake {
                now: 1_000,
                behaviour: nodes.iter().map(|(n, b)| (n.to_string(), *b)).collect(),
                running: nodes
                    .iter()
                    .map(|(n, _)| (n.to_string(), status("1.0.0", Boot::Blessed, &[])))
                    .collect(),
                rebooting: HashMap::new(),
                unhealthy: Vec::new(),
                log: Vec::new(),
                target: target.into(),
            }
        }
    }

    impl Fleet for Fake {
        fn health(&mut self, node: &Node) -> Result<(), String> {
            if self.unhealthy.contains(&node.name) || self.rebooting.contains_key(&node.name) {
                return Err("nginx not ready".into());
            }
            Ok(())
        }
        fn update_status(&mut self, node: &Node) -> Result<UpdateStatus, String> {
            if matches!(self.behaviour[&node.name], Peer::Silent)
                && self.log.contains(&format!("install {}", node.name))
            {
                return Err("timed out".into());
            }
            if let Some(left) = self.rebooting.get_mut(&node.name) {
                if *left > 0 {
                    *left -= 1;
                    return Err("connection refused".into());
                }
                self.rebooting.remove(&node.name);
                let after = match self.behaviour[&node.name] {
                    Peer::Upgrades => status(&self.target, Boot::Blessed, &[]),
                    Peer::RollsBack => status("1.0.0", Boot::Blessed, &[&self.target]),
                    Peer::Silent | Peer::Refuses => unreachable!(),
                };
                self.running.insert(node.name.clone(), after);
            }
            Ok(self.running[&node.name].clone())
        }
        fn install_peer(&mut self, node: &Node) -> Result<(), String> {
            self.log.push(format!("install {}", node.name));
            match self.behaviour[&node.name] {
                Peer::Refuses => Err("422: not newer".into()),
                _ => {
                    self.rebooting.insert(node.name.clone(), 3);
                    Ok(())
                }
            }
        }
        fn install_local(&mut self) -> Result<(), String> {
            self.log.push("install local".into());
            Ok(())
        }
        fn now_unix_ms(&mut self) -> u64 {
            self.now
        }
        fn sleep(&mut self, d: Duration) {
            self.now += d.as_millis() as u64;
        }
    }

    fn cluster3() -> Cluster {
        let cluster = Cluster::default_cluster();
        assert!(cluster.nodes.len() >= 2, "the default cluster has nodes");
        cluster
    }

    /// Runs the upgrade from `me` with each other node behaving as `peer(name)`; returns the
    /// final record, every record written, and the fleet's log.
    fn check(
        me_index: usize,
        peer: impl Fn(&str) -> Peer,
    ) -> (UpgradeState, Vec<UpgradeState>, Fake) {
        let cluster = cluster3();
        let me = cluster.nodes[me_index].clone();
        let nodes: Vec<(&str, Peer)> = cluster
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), peer(&n.name)))
            .collect();
        let mut fake = Fake::new("2.0.0", &nodes);
        let mut records = Vec::new();
        let end = drive(&mut fake, &cluster, &me, "2.0.0", 300, &mut |s| {
            records.push(s.clone())
        });
        (end, records, fake)
    }

    #[test]
    fn every_other_node_first_in_cluster_order_this_node_last() {
        let cluster = cluster3();
        let names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
        let (end, records, fake) = check(0, |_| Peer::Upgrades);
        let mut want: Vec<String> = names[1..].iter().map(|n| format!("install {n}")).collect();
        want.push("install local".into());
        assert_eq!(fake.log, want);
        let order: Vec<&str> = end.nodes.iter().map(|n| n.node.as_str()).collect();
        assert_eq!(order.last(), Some(&names[0].as_str()));
        // The peers are done; this node is left rebooting (the process dies there).
        assert_eq!(end.outcome, Outcome::Running);
        for n in &end.nodes[..end.nodes.len() - 1] {
            assert_eq!(n.step, Step::Done, "{n:?}");
        }
        assert_eq!(end.nodes.last().map(|n| n.step), Some(Step::Rebooting));
        // "Rebooting" was recorded before the local install started.
        assert!(records
            .iter()
            .any(|r| r.nodes.last().map(|n| n.step) == Some(Step::Rebooting)));
        // Back up, blessed: the record is finished.
        let done = reconcile(&end, &names[0], &status("2.0.0", Boot::Blessed, &[]), 9).unwrap();
        assert_eq!(done.outcome, Outcome::Done);
        assert_eq!(done.finished_unix_ms, Some(9));
        assert!(done.nodes.iter().all(|n| n.step == Step::Done));
        // Still on trial: nothing to change yet.
        let trial = status(
            "2.0.0",
            Boot::Trial {
                deadline_unix_ms: 5,
            },
            &[],
        );
        assert_eq!(reconcile(&end, &names[0], &trial, 9), None);
        // Rolled back.
        let back = reconcile(
            &end,
            &names[0],
            &status("1.0.0", Boot::Blessed, &["2.0.0"]),
            9,
        )
        .unwrap();
        assert_eq!(back.outcome, Outcome::Failed);
        assert!(
            back.message.contains("rolled back to 1.0.0"),
            "{}",
            back.message
        );
    }

    #[test]
    fn the_first_failing_node_stops_the_upgrade_and_the_rest_stay() {
        let cluster = cluster3();
        let names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
        let second = names[1].clone();
        for (behaviour, why) in [
            (Peer::Refuses, "422: not newer"),
            (Peer::RollsBack, "rolled back to 1.0.0"),
            (Peer::Silent, "did not run 2.0.0 blessed within 900s"),
        ] {
            let (end, _, fake) = check(0, |n| {
                if n == second {
                    behaviour
                } else {
                    Peer::Upgrades
                }
            });
            assert_eq!(end.outcome, Outcome::Failed);
            assert_eq!(
                fake.log,
                vec![format!("install {second}")],
                "nothing after {second}"
            );
            let failed = end.nodes.iter().find(|n| n.node == second).unwrap();
            assert_eq!(failed.step, Step::Failed);
            assert!(
                failed.reason.as_deref().unwrap_or("").contains(why),
                "{failed:?}"
            );
            assert!(
                end.message.starts_with(&format!("stopped at {second}")),
                "{}",
                end.message
            );
            // This node and every later one were never touched.
            assert!(end.message.contains(&names[0]), "{}", end.message);
            assert!(
                end.message.contains("stay on the old version"),
                "{}",
                end.message
            );
            assert!(end
                .nodes
                .iter()
                .filter(|n| n.node != second)
                .all(|n| n.step == Step::Waiting));
            assert!(end.finished_unix_ms.is_some());
        }
    }

    #[test]
    fn a_node_is_not_touched_while_another_is_unhealthy() {
        let cluster = cluster3();
        let me = cluster.nodes[0].clone();
        let nodes: Vec<(&str, Peer)> = cluster
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), Peer::Upgrades))
            .collect();
        let mut fake = Fake::new("2.0.0", &nodes);
        // This node is not serving: no peer may be taken down.
        fake.unhealthy.push(me.name.clone());
        let end = drive(&mut fake, &cluster, &me, "2.0.0", 300, &mut |_| {});
        assert!(fake.log.is_empty(), "{:?}", fake.log);
        assert_eq!(end.outcome, Outcome::Failed);
        assert!(
            end.message
                .contains("the other nodes must be healthy first"),
            "{}",
            end.message
        );
        assert!(
            end.message
                .contains(&format!("{}: nginx not ready", me.name)),
            "{}",
            end.message
        );
    }

    #[test]
    fn a_node_already_on_the_version_is_skipped() {
        let cluster = cluster3();
        let me = cluster.nodes[0].clone();
        let nodes: Vec<(&str, Peer)> = cluster
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), Peer::Upgrades))
            .collect();
        let mut fake = Fake::new("2.0.0", &nodes);
        let second = cluster.nodes[1].name.clone();
        fake.running
            .insert(second.clone(), status("2.0", Boot::Blessed, &[]));
        let end = drive(&mut fake, &cluster, &me, "2.0.0", 300, &mut |_| {});
        assert!(
            !fake.log.contains(&format!("install {second}")),
            "{:?}",
            fake.log
        );
        let skipped = end.nodes.iter().find(|n| n.node == second).unwrap();
        assert_eq!(skipped.step, Step::Done);
        assert_eq!(skipped.reason.as_deref(), Some("already runs 2.0.0"));
    }

    #[test]
    fn the_record_round_trips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        assert_eq!(UpgradeState::read(&path).unwrap(), None);
        let (end, _, _) = check(0, |_| Peer::Upgrades);
        end.write(&path).unwrap();
        assert_eq!(UpgradeState::read(&path).unwrap(), Some(end));
    }
}
