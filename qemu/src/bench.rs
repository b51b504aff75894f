//! The floating IP's failover as a client sees it (`tandem-qemu failover` and `soak`).
//!
//! - failover: per trial, probe `https://<floating IP>/node.html` every 20 ms, hard-kill the
//!   holder's VM (SIGKILL to QEMU: a power cut) after 3 s, keep probing 5 s, then restart the
//!   node and watch whether the address moves back. The longest pause between two successful
//!   answers is the failover as a user notices it.
//! - soak: probe for minutes with nothing killed, looking at the holder every 5 s: every change
//!   is a spurious failover.
//!
//! A benchmark, not a test: it reports, and the binary exits non-zero only when a failover left
//! nobody holding the address. Orchestration here; the numbers come from the pure parts
//! ([`crate::probe::summarize`], [`crate::vip::holder_stats`], [`failover_table`]).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::cluster::{Cluster, ClusterSpec};
use crate::error::{Error, Result};
use crate::probe::{ms, ProbeOptions, ProbeReport};
use crate::session::{Cancel, RunDir};
use crate::vip::{describe_holders, holder_stats, HolderStats};

/// How long the nodes get to boot and serve their page (TCG, first boot makes keys and a
/// database).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(900);
/// How long one node gets to take the floating IP (before the first trial, between trials).
pub const HOLD_TIMEOUT: Duration = Duration::from_secs(60);
/// Probing before the kill (the steady state) and after it (the failover).
pub const BEFORE_KILL: Duration = Duration::from_secs(3);
pub const AFTER_KILL: Duration = Duration::from_secs(5);
/// After a restarted node serves again, how long to watch whether the address moves back.
pub const DEFAULT_SETTLE: Duration = Duration::from_secs(20);
/// A trial starts only once a probe this long saw every request answered with no gap longer
/// than [`STEADY_GAP`]: a node that just booted (MariaDB catching up, on a two-core host under
/// TCG) stalls its peer for seconds, which is not the failover being measured.
pub const STEADY_WINDOW: Duration = Duration::from_secs(3);
pub const STEADY_GAP: Duration = Duration::from_millis(250);
/// Give up waiting for a steady cluster after this long (the trial then runs anyway, marked).
pub const STEADY_TIMEOUT: Duration = Duration::from_secs(180);
/// Soak: a progress line this often, a look at the holders this often.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(30);
pub const LOOK_EVERY: Duration = Duration::from_secs(5);
/// Lines of each serial log shown when the cluster does not come up.
const TAIL_LINES: usize = 30;

/// The cluster to boot and where its floating IP is.
#[derive(Debug, Clone)]
pub struct BenchTarget {
    /// As `up` boots it; its work dir is the run dir (pid file, serial logs).
    pub spec: ClusterSpec,
    pub floating_ip: Ipv4Addr,
    pub https_port: u16,
    /// The nodes' own page (`/node.html`) answers on this port once they serve.
    pub page_port: u16,
}

impl BenchTarget {
    /// What the probe asks: the node page through the floating IP, over HTTPS.
    pub fn vip_url(&self) -> String {
        let port = match self.https_port {
            443 => String::new(),
            p => format!(":{p}"),
        };
        format!(
            "https://{}{port}{}",
            self.floating_ip,
            crate::cluster::NODE_PAGE
        )
    }
}

#[derive(Debug, Clone)]
pub struct FailoverOptions {
    pub target: BenchTarget,
    pub trials: u32,
    pub settle: Duration,
    pub kill: Kill,
}

/// What a trial kills on the holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kill {
    /// The whole VM (QEMU killed: a power cut); it is started again after the trial.
    Machine,
    /// Only its balancer (SIGKILL through the peer API, with a client certificate from the
    /// cluster CA); the node's supervisor restarts it.
    Balancer {
        cert: PathBuf,
        key: PathBuf,
        admin_port: u16,
    },
    /// Not killed: rebooted on purpose (Ctrl-Alt-Del), so its supervisor stops every service in
    /// order and hands the address over. Measured with a patient client (each request given
    /// [`PATIENT_TIMEOUT`], as a browser would wait), so what counts is requests lost, not a
    /// SYN sent again.
    Reboot,
}

impl Kill {
    /// What a trial did to the holder, for its line.
    pub fn verb(&self) -> &'static str {
        match self {
            Kill::Machine => "killed",
            Kill::Balancer { .. } => "killed the balancer of",
            Kill::Reboot => "rebooted",
        }
    }
}

/// A planned reboot's client gives each request this long.
pub const PATIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// A planned reboot's probe goes on this long after Ctrl-Alt-Del: the node's shutdown, under
/// TCG, takes a few seconds.
pub const AFTER_REBOOT: Duration = Duration::from_secs(8);

/// One kill of the holder.
#[derive(Debug, Clone)]
pub struct Trial {
    pub number: u32,
    /// Who held the address before; `None`: nobody did (the trial kills a node anyway, so the
    /// kill/restart mechanics run, and counts as failed).
    pub before: Option<String>,
    pub killed: String,
    /// When the kill happened, from the probe's start.
    pub killed_at: Duration,
    /// Who answered ARP for the address at the end of the probe.
    pub after: Vec<String>,
    pub report: ProbeReport,
    /// Whether the address went back to the restarted node; `None`: not watched.
    pub moved_back: Option<bool>,
}

impl Trial {
    /// The single node that took over, if one did.
    pub fn new_holder(&self) -> Option<&str> {
        match self.after.as_slice() {
            [one] if *one != self.killed && self.before.is_some() => Some(one),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct FailoverRun {
    pub trials: Vec<Trial>,
    /// Stopped by a signal before all trials ran.
    pub interrupted: bool,
}

impl FailoverRun {
    /// Every trial ended with one new holder (and none was skipped).
    pub fn all_failed_over(&self, trials: u32) -> bool {
        self.trials.len() == trials as usize && self.trials.iter().all(|t| t.new_holder().is_some())
    }
}

/// Boot, wait until every node serves and one holds the address, run the trials. The cluster
/// is killed and its namespace deleted on return, also when `cancel` fires (then the trials so
/// far are returned).
pub fn failover(
    opts: &FailoverOptions,
    cancel: &Cancel,
    say: &mut dyn FnMut(&str),
) -> Result<FailoverRun> {
    let (_run_dir, cluster) = boot(&opts.target, cancel, say)?;
    let mut run = FailoverRun::default();
    for number in 1..=opts.trials {
        match trial(&cluster, opts, number, cancel, say) {
            Ok(t) => run.trials.push(t),
            Err(Error::Cancelled) => {
                run.interrupted = true;
                return Ok(run);
            }
            Err(e) => {
                say(&cluster.tails(TAIL_LINES));
                return Err(e);
            }
        }
    }
    Ok(run)
}

fn trial(
    cluster: &Cluster,
    opts: &FailoverOptions,
    number: u32,
    cancel: &Cancel,
    say: &mut dyn FnMut(&str),
) -> Result<Trial> {
    let vip = opts.target.floating_ip;
    let before = match cluster.wait_single_holder_or_cancel(vip, HOLD_TIMEOUT, cancel) {
        Ok(h) => Some(h),
        Err(Error::Cancelled) => return Err(Error::Cancelled),
        Err(e) => {
            say(&format!("trial {number}: {e}"));
            None
        }
    };
    let killed = match &before {
        Some(h) => h.clone(),
        None => {
            let vms = cluster.vms();
            vms[(number as usize - 1) % vms.len()].name().to_string()
        }
    };
    let vm = cluster.vm(&killed)?;
    let steady = wait_steady(cluster, &opts.target.vip_url(), cancel, say)?;
    if !steady {
        say(&format!(
            "trial {number}: the cluster did not become steady within {} s; running it anyway",
            STEADY_TIMEOUT.as_secs()
        ));
    }
    let reboot = opts.kill == Kill::Reboot;
    let after_kill = if reboot { AFTER_REBOOT } else { AFTER_KILL };
    let mut probe_options = ProbeOptions::new(
        opts.target.vip_url(),
        BEFORE_KILL + after_kill + Duration::from_secs(5),
    );
    if reboot {
        probe_options.timeout = PATIENT_TIMEOUT;
    }
    let probe = cluster.start_probe(probe_options)?;
    if !cancel.sleep(BEFORE_KILL) {
        return Err(Error::Cancelled);
    }
    let killed_at = probe.elapsed();
    match &opts.kill {
        Kill::Machine => vm.kill()?,
        Kill::Balancer {
            cert,
            key,
            admin_port,
        } => cluster.peer_signal(vm.address(), *admin_port, (cert, key), "balancer", "KILL")?,
        Kill::Reboot => vm.reboot_ctrl_alt_del()?,
    }
    if !cancel.sleep(after_kill) {
        return Err(Error::Cancelled);
    }
    let report = probe.stop();
    let after = cluster.vip_holders(vip)?;
    let mut t = Trial {
        number,
        before,
        killed,
        killed_at,
        after,
        report,
        moved_back: None,
    };
    say(&trial_line(&t, opts.kill.verb()));

    // Power back on; the address should stay where it is (unless preemption is configured).
    if opts.kill == Kill::Machine {
        vm.start()?;
    }
    cluster.wait_nodes_serving(opts.target.page_port, BOOT_TIMEOUT, cancel)?;
    let t0 = Instant::now();
    let mut moved_back = false;
    while t0.elapsed() < opts.settle {
        let holders = cluster.vip_holders(vip)?;
        moved_back |= holders.contains(&t.killed);
        if cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
    }
    t.moved_back = Some(moved_back);
    say(&format!(
        "trial {number}: {} serves again; address {}",
        t.killed,
        if moved_back {
            "moved back to it"
        } else {
            "stayed"
        }
    ));
    Ok(t)
}

/// Probes [`STEADY_WINDOW`] at a time until one window is clean; `false` after
/// [`STEADY_TIMEOUT`].
pub fn wait_steady(
    cluster: &Cluster,
    url: &str,
    cancel: &Cancel,
    say: &mut dyn FnMut(&str),
) -> Result<bool> {
    let t0 = Instant::now();
    while t0.elapsed() < STEADY_TIMEOUT {
        let probe = cluster.start_probe(ProbeOptions::new(url, STEADY_WINDOW))?;
        if !cancel.sleep(STEADY_WINDOW) {
            return Err(Error::Cancelled);
        }
        let r = probe.stop();
        if r.failed == 0 && r.longest_gap <= STEADY_GAP {
            return Ok(true);
        }
        say(&format!("  not steady yet: {}", r.summary()));
        if !cancel.sleep(Duration::from_secs(5)) {
            return Err(Error::Cancelled);
        }
    }
    Ok(false)
}

fn trial_line(t: &Trial, verb: &str) -> String {
    format!(
        "trial {}: {verb} {} at {:.2} s; now held by {}; {}",
        t.number,
        t.killed,
        t.killed_at.as_secs_f64(),
        describe_holders(&t.after),
        t.report.summary()
    )
}

/// The middle value (the mean of the two middle ones for an even count).
pub fn median(values: &[Duration]) -> Option<Duration> {
    let mut v = values.to_vec();
    v.sort();
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2),
    }
}

/// The trials as a table, then the median and the maximum of the longest gaps.
pub fn failover_table(trials: &[Trial]) -> String {
    let mut rows = vec![[
        "trial".to_string(),
        "before".into(),
        "after".into(),
        "longest gap".into(),
        "failed/sent".into(),
        "moved back".into(),
        "errors".into(),
    ]];
    for t in trials {
        let errors = t
            .report
            .errors
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ");
        rows.push([
            t.number.to_string(),
            t.before.clone().unwrap_or_else(|| "nobody".into()),
            describe_holders(&t.after),
            ms(t.report.longest_gap),
            format!("{}/{}", t.report.failed, t.report.sent),
            match t.moved_back {
                Some(true) => "yes".into(),
                Some(false) => "no".into(),
                None => "-".into(),
            },
            errors,
        ]);
    }
    let mut widths = [0usize; 7];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut s = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        s.push_str(line.join("  ").trim_end());
        s.push('\n');
    }
    let gaps: Vec<Duration> = trials.iter().map(|t| t.report.longest_gap).collect();
    match (median(&gaps), gaps.iter().max()) {
        (Some(med), Some(max)) => s.push_str(&format!(
            "longest gap over {} trial(s): median {}, max {}\n",
            gaps.len(),
            ms(med),
            ms(*max)
        )),
        _ => s.push_str("no trials\n"),
    }
    let failed = trials.iter().filter(|t| t.new_holder().is_none()).count();
    if failed > 0 {
        s.push_str(&format!(
            "{failed} trial(s) without a new holder of the floating IP\n"
        ));
    }
    s
}

#[derive(Debug, Clone)]
pub struct SoakOptions {
    pub target: BenchTarget,
    pub duration: Duration,
}

#[derive(Debug, Clone)]
pub struct SoakReport {
    pub report: ProbeReport,
    pub holders: HolderStats,
    pub first_holder: Vec<String>,
    pub last_holder: Vec<String>,
    pub interrupted: bool,
}

impl SoakReport {
    pub fn summary(&self) -> String {
        let h = &self.holders;
        format!(
            "{}soak over {:.0} s: {} requests, {} failed, longest gap {}; holder {} -> {}, \
             {} holder change(s) in {} looks ({} with nobody, {} with several)\n  {}\n",
            if self.interrupted { "INTERRUPTED " } else { "" },
            self.report.elapsed.as_secs_f64(),
            self.report.sent,
            self.report.failed,
            ms(self.report.longest_gap),
            describe_holders(&self.first_holder),
            describe_holders(&self.last_holder),
            h.changes,
            h.samples,
            h.nobody,
            h.several,
            self.report.summary()
        )
    }
}

/// Boot, wait, then probe the floating IP for `duration` while looking at its holders.
pub fn soak(opts: &SoakOptions, cancel: &Cancel, say: &mut dyn FnMut(&str)) -> Result<SoakReport> {
    let (_run_dir, cluster) = boot(&opts.target, cancel, say)?;
    let vip = opts.target.floating_ip;
    let probe = cluster.start_probe(ProbeOptions::new(opts.target.vip_url(), opts.duration))?;
    let mut samples: Vec<Vec<String>> = Vec::new();
    let mut next_look = Duration::ZERO;
    let mut next_progress = PROGRESS_EVERY;
    while probe.elapsed() < opts.duration && !cancel.is_cancelled() {
        let holders = cluster.vip_holders(vip)?;
        let at = probe.elapsed();
        if samples.last().is_some_and(|last| *last != holders) {
            say(&format!(
                "{:>6.1} s: holder {} -> {}",
                at.as_secs_f64(),
                describe_holders(samples.last().map(Vec::as_slice).unwrap_or_default()),
                describe_holders(&holders)
            ));
        }
        samples.push(holders);
        if at >= next_progress {
            say(&format!(
                "{:>6.1} s: {}",
                at.as_secs_f64(),
                probe.snapshot().summary()
            ));
            next_progress += PROGRESS_EVERY;
        }
        next_look += LOOK_EVERY;
        let wait = next_look.saturating_sub(probe.elapsed());
        let wait = wait.min(opts.duration.saturating_sub(probe.elapsed()));
        cancel.sleep(wait);
    }
    let report = probe.stop();
    Ok(SoakReport {
        report,
        holders: holder_stats(&samples),
        first_holder: samples.first().cloned().unwrap_or_default(),
        last_holder: samples.last().cloned().unwrap_or_default(),
        interrupted: cancel.is_cancelled(),
    })
}

/// Claim the run dir, boot, wait until every node serves and (for a while) one holds the
/// address. A cluster that does not come up is reported with its serial tails.
fn boot(
    target: &BenchTarget,
    cancel: &Cancel,
    say: &mut dyn FnMut(&str),
) -> Result<(RunDir, Cluster)> {
    let run_dir = RunDir::claim(&target.spec.work_dir)?;
    let cluster = Cluster::boot(target.spec.clone())?;
    say(&format!(
        "booted {} VMs ({}, namespace {}, serial logs in {}); waiting for {}",
        cluster.vms().len(),
        cluster.accel().as_str(),
        cluster.netns().name(),
        cluster.work_dir().display(),
        cluster
            .vms()
            .iter()
            .map(|vm| Cluster::node_page_url(vm, target.page_port))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let t0 = Instant::now();
    if let Err(e) = cluster.wait_nodes_serving(target.page_port, BOOT_TIMEOUT, cancel) {
        if !matches!(e, Error::Cancelled) {
            say(&cluster.tails(TAIL_LINES));
        }
        return Err(e);
    }
    say(&format!(
        "every node serves after {:.0} s",
        t0.elapsed().as_secs_f64()
    ));
    match cluster.wait_single_holder_or_cancel(target.floating_ip, HOLD_TIMEOUT, cancel) {
        Ok(h) => say(&format!(
            "floating IP {} is held by {h}",
            target.floating_ip
        )),
        Err(Error::Cancelled) => return Err(Error::Cancelled),
        Err(e) => say(&format!("no single holder yet: {e}")),
    }
    Ok((run_dir, cluster))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn d(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[d(5)]), Some(d(5)));
        assert_eq!(median(&[d(9), d(1), d(5)]), Some(d(5)));
        assert_eq!(median(&[d(4), d(1), d(2), d(100)]), Some(d(3)));
    }

    fn trial(number: u32, before: Option<&str>, after: &[&str], gap: u64) -> Trial {
        Trial {
            number,
            before: before.map(str::to_string),
            killed: before.unwrap_or("server1").to_string(),
            killed_at: d(3000),
            after: after.iter().map(|s| s.to_string()).collect(),
            report: ProbeReport {
                sent: 400,
                ok: 380,
                failed: 20,
                longest_gap: d(gap),
                errors: BTreeMap::from([("timeout".to_string(), 20)]),
                ..ProbeReport::default()
            },
            moved_back: Some(false),
        }
    }

    #[test]
    fn new_holder_is_one_other_node() {
        assert_eq!(
            trial(1, Some("server1"), &["server2"], 0).new_holder(),
            Some("server2")
        );
        assert_eq!(trial(1, Some("server1"), &[], 0).new_holder(), None);
        assert_eq!(
            trial(1, Some("server1"), &["server2", "x"], 0).new_holder(),
            None
        );
        // Nobody held it before: whatever happened after is no failover.
        assert_eq!(trial(1, None, &["server2"], 0).new_holder(), None);
    }

    #[test]
    fn table() {
        let trials = [
            trial(1, Some("server1"), &["server2"], 412),
            trial(2, Some("server2"), &["server1"], 380),
            trial(3, None, &[], 8000),
        ];
        assert_eq!(
            failover_table(&trials),
            "\
trial  before   after    longest gap  failed/sent  moved back  errors
1      server1  server2  412 ms       20/400       no          timeout 20
2      server2  server1  380 ms       20/400       no          timeout 20
3      nobody   nobody   8000 ms      20/400       no          timeout 20
longest gap over 3 trial(s): median 412 ms, max 8000 ms
1 trial(s) without a new holder of the floating IP
"
        );
        assert_eq!(
            failover_table(&[]),
            "trial  before  after  longest gap  failed/sent  moved back  errors\nno trials\n"
        );
    }

    #[test]
    fn vip_url_omits_the_default_port() {
        let t = |https_port| BenchTarget {
            spec: ClusterSpec::new("/w"),
            floating_ip: Ipv4Addr::new(10, 88, 0, 10),
            https_port,
            page_port: 443,
        };
        assert_eq!(t(443).vip_url(), "https://10.88.0.10/node.html");
        assert_eq!(t(8443).vip_url(), "https://10.88.0.10:8443/node.html");
    }
}
