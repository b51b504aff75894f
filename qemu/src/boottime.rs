//! Boot to serving, as a user powering a node on sees it (`tandem-qemu boot-time`).
//!
//! Per boot: QEMU is started, then the serial console and the node's balancer are watched
//! from the host. Each milestone is the host's wall time from QEMU's start to the moment the
//! milestone was first seen (the serial log is read every 50 ms, the page asked every
//! 100 ms), so the breakdown is firmware + boot loader (to the kernel's banner), kernel +
//! initrd (to PID 1's first line), init (to "system up"), then the services as the
//! supervisor reports them ready, and the first `200` of `/node.html` on the node's HTTPS
//! port (balancer → nginx). nginx's own port is open to cluster peers only, so its readiness
//! comes from the supervisor (a TCP connect to it succeeded).
//!
//! The first boot makes the data partition, keys and the database; later boots (a clean ACPI
//! power-off, then QEMU again) show the steady cost. A benchmark, not a test: it reports.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cluster::{Cluster, ClusterSpec, Vm};
use crate::error::{Error, Result};
use crate::serial::Mark;
use crate::session::Cancel;

/// What is watched, in the order it normally happens.
pub const MILESTONES: &[Milestone] = &[
    Milestone::serial("kernel", "Linux version"),
    Milestone::serial("init", "appliance::init"),
    Milestone::serial("system up", "system up; starting services"),
    Milestone::ready("nginx"),
    Milestone::ready("balancer"),
    Milestone::ready("admin"),
    Milestone {
        name: "https 200",
        needle: Needle::Https,
    },
    Milestone::ready("mariadb"),
    Milestone::ready("app"),
];

/// How long one boot may take before the bench gives up on it.
pub const BOOT_LIMIT: Duration = Duration::from_secs(600);
/// After the page answered, how long to wait for the services still starting (the database).
pub const SETTLE_LIMIT: Duration = Duration::from_secs(300);
const SERIAL_EVERY: Duration = Duration::from_millis(50);
const PAGE_EVERY: Duration = Duration::from_millis(100);
const POWER_OFF_LIMIT: Duration = Duration::from_secs(90);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needle {
    /// A serial line containing this text.
    Serial(&'static str),
    /// The supervisor's `ready` line for this service.
    Ready(&'static str),
    /// The first 200 of the node page over HTTPS.
    Https,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Milestone {
    pub name: &'static str,
    pub needle: Needle,
}

impl Milestone {
    const fn serial(name: &'static str, text: &'static str) -> Milestone {
        Milestone {
            name,
            needle: Needle::Serial(text),
        }
    }

    const fn ready(service: &'static str) -> Milestone {
        Milestone {
            name: service,
            needle: Needle::Ready(service),
        }
    }

    /// Whether `line` (one serial line, ANSI stripped) marks this milestone.
    pub fn matches(&self, line: &str) -> bool {
        match self.needle {
            Needle::Serial(text) => line.contains(text),
            Needle::Ready(service) => {
                line.contains("supervisor::runner: ready")
                    && line
                        .split_whitespace()
                        .any(|w| w.strip_prefix("service=") == Some(service))
            }
            Needle::Https => false,
        }
    }
}

/// One boot's milestones: time from QEMU's start, `None` when never seen.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BootRecord {
    pub node: String,
    /// 1 for the first boot.
    pub boot: u32,
    pub seen: Vec<(&'static str, Option<Duration>)>,
}

impl BootRecord {
    pub fn get(&self, name: &str) -> Option<Duration> {
        self.seen
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, t)| *t)
    }
}

/// Mark every milestone whose serial line is in `text` and not yet seen, at `at`.
pub fn scan(text: &str, at: Duration, seen: &mut [(&'static str, Option<Duration>)]) {
    for line in text.lines() {
        for (m, slot) in MILESTONES.iter().zip(seen.iter_mut()) {
            if slot.1.is_none() && m.matches(line) {
                slot.1 = Some(at);
            }
        }
    }
}

fn secs(d: Option<Duration>) -> String {
    d.map_or_else(|| "—".to_string(), |d| format!("{:.1}", d.as_secs_f64()))
}

/// The table: one column per boot, one row per milestone (seconds from QEMU's start), then
/// the stages between them.
pub fn table(records: &[BootRecord]) -> String {
    let mut s = String::new();
    let header: Vec<String> = records
        .iter()
        .map(|r| {
            format!(
                "{} #{}{}",
                r.node,
                r.boot,
                if r.boot == 1 { " (first)" } else { "" }
            )
        })
        .collect();
    let _ = write!(s, "{:<34}", "seconds from QEMU start");
    for h in &header {
        let _ = write!(s, " {h:>18}");
    }
    s.push('\n');
    for m in MILESTONES {
        let label = match m.needle {
            Needle::Serial(_) => format!("{} (serial)", m.name),
            Needle::Ready(_) => format!("{} ready (supervisor)", m.name),
            Needle::Https => "first 200 on HTTPS /node.html".to_string(),
        };
        let _ = write!(s, "{label:<34}");
        for r in records {
            let _ = write!(s, " {:>18}", secs(r.get(m.name)));
        }
        s.push('\n');
    }
    s.push_str("\nstages (seconds)\n");
    let stages: [(&str, Option<&str>, &str); 4] = [
        ("firmware + boot loader", None, "kernel"),
        ("kernel + initrd", Some("kernel"), "init"),
        ("init (disks, network, plan)", Some("init"), "system up"),
        ("services to HTTPS 200", Some("system up"), "https 200"),
    ];
    for (label, from, to) in stages {
        let _ = write!(s, "{label:<34}");
        for r in records {
            let start = match from {
                None => Some(Duration::ZERO),
                Some(f) => r.get(f),
            };
            let d = match (start, r.get(to)) {
                (Some(a), Some(b)) if b >= a => Some(b - a),
                _ => None,
            };
            let _ = write!(s, " {:>18}", secs(d));
        }
        s.push('\n');
    }
    s
}

/// Boot `vm` (QEMU not running) and watch it until the page answered and every service of
/// [`MILESTONES`] was seen ready, or the limits ran out.
pub fn watch_boot(
    cluster: &Cluster,
    vm: &Vm,
    url: &str,
    cancel: &Cancel,
) -> Result<Vec<(&'static str, Option<Duration>)>> {
    let mut seen: Vec<(&'static str, Option<Duration>)> =
        MILESTONES.iter().map(|m| (m.name, None)).collect();
    let mark: Mark = vm.serial_mark();
    let https: Arc<Mutex<Option<Duration>>> = Arc::new(Mutex::new(None));
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    vm.start()?;
    std::thread::scope(|scope| -> Result<()> {
        let https2 = https.clone();
        let stop2 = stop.clone();
        scope.spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                if let Ok(r) = cluster.http_get(url, Duration::from_secs(1)) {
                    if r.status == 200 {
                        *https2.lock().unwrap_or_else(|e| e.into_inner()) = Some(t0.elapsed());
                        return;
                    }
                }
                std::thread::sleep(PAGE_EVERY);
            }
        });
        let mut page_at = None;
        let result = loop {
            let now = t0.elapsed();
            scan(
                &crate::serial::strip_ansi(&vm.serial_since(mark)),
                now,
                &mut seen,
            );
            let page = *https.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(p) = page {
                page_at.get_or_insert(p);
            }
            let services_done = seen
                .iter()
                .zip(MILESTONES)
                .all(|((_, t), m)| t.is_some() || m.needle == Needle::Https);
            if page.is_some() && services_done {
                break Ok(());
            }
            if page.is_none() && now > BOOT_LIMIT {
                break Err(Error::Timeout {
                    what: format!("{url} to answer 200"),
                    after: BOOT_LIMIT,
                    last: None,
                });
            }
            if page_at.is_some_and(|p| now > p + SETTLE_LIMIT) {
                break Ok(());
            }
            if !vm.is_running() {
                break Err(Error::Http(format!(
                    "{}: QEMU exited during the boot",
                    vm.name()
                )));
            }
            if !cancel.sleep(SERIAL_EVERY) {
                break Err(Error::Cancelled);
            }
        };
        stop.store(true, Ordering::Relaxed);
        result
    })?;
    if let Some((_, slot)) = seen.iter_mut().find(|(n, _)| *n == "https 200") {
        *slot = *https.lock().unwrap_or_else(|e| e.into_inner());
    }
    Ok(seen)
}

/// What `tandem-qemu boot-time` boots.
#[derive(Debug, Clone)]
pub struct BootTimeOptions {
    /// Only the nodes to boot (one at a time), each with its image.
    pub spec: ClusterSpec,
    pub https_port: u16,
    /// Boots per node: the first, then `boots - 1` more after a clean power-off.
    pub boots: u32,
    /// The admin port and the metrics token (a file): after each node's last boot its
    /// `/metrics` gives the supervisor's and the services' resident memory.
    pub admin_port: u16,
    pub metrics_token: Option<std::path::PathBuf>,
}

/// How long a node runs after its last boot before its memory is read: settled, idle.
pub const SETTLE_BEFORE_MEMORY: Duration = Duration::from_secs(10);

/// A process's resident memory in bytes: all of it, and its own anonymous pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resident {
    pub total: u64,
    pub anon: u64,
}

/// Resident memory from a node's `/metrics` text: the supervisor's
/// (`tandem_supervisor_{resident,anon}_bytes`) first, then each service's main process.
pub fn memory_from_metrics(text: &str) -> Vec<(String, Resident)> {
    let mut out: Vec<(String, Resident)> = Vec::new();
    let mut set = |who: String, anon: bool, bytes: u64| {
        let i = match out.iter().position(|(n, _)| *n == who) {
            Some(i) => i,
            None if who == "supervisor" => {
                out.insert(0, (who, Resident::default()));
                0
            }
            None => {
                out.push((who, Resident::default()));
                out.len() - 1
            }
        };
        match anon {
            true => out[i].1.anon = bytes,
            false => out[i].1.total = bytes,
        }
    };
    let service = |labels: &str| {
        labels
            .split(',')
            .find_map(|kv| kv.strip_prefix("service=\""))
            .map(|v| v.trim_end_matches('}').trim_end_matches('"').to_string())
    };
    for line in text.lines() {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(bytes) = value.parse::<f64>() else {
            continue;
        };
        let bytes = bytes as u64;
        if name.starts_with("tandem_supervisor_resident_bytes{") {
            set("supervisor".into(), false, bytes);
        } else if name.starts_with("tandem_supervisor_anon_bytes{") {
            set("supervisor".into(), true, bytes);
        } else if let Some(rest) = name.strip_prefix("tandem_supervisor_service_resident_bytes{") {
            if let Some(s) = service(rest) {
                set(s, false, bytes);
            }
        } else if let Some(rest) = name.strip_prefix("tandem_supervisor_service_anon_bytes{") {
            if let Some(s) = service(rest) {
                set(s, true, bytes);
            }
        }
    }
    out
}

/// One row per process: MiB per node, resident and anonymous.
pub fn memory_table(rows: &[(String, Vec<(String, Resident)>)]) -> String {
    let mut s = String::from(
        "resident memory after the last boot, idle (MiB; a service's main process)\n  \
         node       process         resident  anonymous\n",
    );
    let mib = |b: u64| b as f64 / 1048576.0;
    for (node, memory) in rows {
        for (process, r) in memory {
            let _ = writeln!(
                s,
                "  {node:<10} {process:<14} {:>9.1} {:>10.1}",
                mib(r.total),
                mib(r.anon)
            );
        }
    }
    s
}

fn read_memory(
    cluster: &Cluster,
    vm: &Vm,
    port: u16,
    token: &std::path::Path,
) -> Result<Vec<(String, Resident)>> {
    let token = std::fs::read_to_string(token)
        .map_err(|e| Error::io("reading the metrics token", token, e))?;
    // The header from a file: the token never shows in a process list.
    let header = cluster.work_dir().join("metrics-header");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&header)
            .map_err(|e| Error::io("writing", &header, e))?;
        std::io::Write::write_all(
            &mut f,
            format!("Authorization: Bearer {}\n", token.trim()).as_bytes(),
        )
        .map_err(|e| Error::io("writing", &header, e))?;
    }
    let url = format!("https://{}:{port}/metrics", vm.address());
    let header_arg = format!("@{}", header.display());
    let out = cluster.run(&["curl", "-sSfk", "--max-time", "10", "-H", &header_arg, &url])?;
    let _ = std::fs::remove_file(&header);
    if !out.status.success() {
        return Err(Error::Http(format!(
            "GET {url}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(memory_from_metrics(&String::from_utf8_lossy(&out.stdout)))
}

/// What a boot-time run found.
#[derive(Debug, Default)]
pub struct BootTimeReport {
    pub records: Vec<BootRecord>,
    /// Per node (after its last boot): resident memory per process.
    pub memory: Vec<(String, Vec<(String, Resident)>)>,
}

/// Boot each node of `opts.spec` alone, `opts.boots` times; one record per boot.
pub fn boot_time(
    opts: &BootTimeOptions,
    cancel: &Cancel,
    progress: &mut dyn FnMut(&str),
) -> Result<BootTimeReport> {
    let cluster = Cluster::create(opts.spec.clone())?;
    progress(&format!(
        "booting {} ({}), {} boot(s) each; work dir {}",
        cluster
            .vms()
            .iter()
            .map(|v| v.name())
            .collect::<Vec<_>>()
            .join(", "),
        cluster.accel().as_str(),
        opts.boots,
        cluster.work_dir().display()
    ));
    let mut report = BootTimeReport::default();
    for vm in cluster.vms() {
        let url = Cluster::node_page_url(vm, opts.https_port);
        for boot in 1..=opts.boots {
            let seen = watch_boot(&cluster, vm, &url, cancel).inspect_err(|_| {
                progress(&cluster.tails(30));
            })?;
            let record = BootRecord {
                node: vm.name().to_string(),
                boot,
                seen,
            };
            progress(&format!(
                "{} boot {boot}: HTTPS 200 after {} s, system up after {} s",
                vm.name(),
                secs(record.get("https 200")),
                secs(record.get("system up"))
            ));
            report.records.push(record);
            if boot == opts.boots {
                if let Some(token) = &opts.metrics_token {
                    if !cancel.sleep(SETTLE_BEFORE_MEMORY) {
                        return Err(Error::Cancelled);
                    }
                    match read_memory(&cluster, vm, opts.admin_port, token) {
                        Ok(m) => report.memory.push((vm.name().to_string(), m)),
                        Err(e) => progress(&format!("{}: no memory figures: {e}", vm.name())),
                    }
                }
            }
            vm.power_off()?;
            if vm.wait_exit(POWER_OFF_LIMIT).is_err() {
                progress(&format!(
                    "{}: no clean power-off in {POWER_OFF_LIMIT:?}; killed",
                    vm.name()
                ));
                vm.kill()?;
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh() -> Vec<(&'static str, Option<Duration>)> {
        MILESTONES.iter().map(|m| (m.name, None)).collect()
    }

    #[test]
    fn milestones_are_found_in_serial_lines_once() {
        let mut seen = fresh();
        let text = "[    0.000000] Linux version 6.1.0-40-cloud-amd64\n\
            2026-11-29T23:07:58.492120Z  INFO appliance::init: device modules loaded devices=43\n\
            2026-11-29T23:08:19.259928Z  INFO appliance::init: system up; starting services elapsed_ms=8287\n\
            2026-11-29T23:08:30.502556Z  INFO appliance::supervisor::runner: ready  service=nginx pid=450\n\
            2026-11-29T23:08:30.502556Z  INFO appliance::supervisor::runner: started /usr/sbin/appliance service=balancer pid=463\n";
        scan(text, Duration::from_secs(3), &mut seen);
        scan(
            "INFO appliance::supervisor::runner: ready  service=balancer pid=463\n\
             INFO appliance::init: again",
            Duration::from_secs(5),
            &mut seen,
        );
        let r = BootRecord {
            node: "server1".into(),
            boot: 1,
            seen,
        };
        assert_eq!(r.get("kernel"), Some(Duration::from_secs(3)));
        assert_eq!(r.get("init"), Some(Duration::from_secs(3)));
        assert_eq!(r.get("system up"), Some(Duration::from_secs(3)));
        assert_eq!(r.get("nginx"), Some(Duration::from_secs(3)));
        // "started … service=balancer" is not its readiness.
        assert_eq!(r.get("balancer"), Some(Duration::from_secs(5)));
        assert_eq!(r.get("mariadb"), None);
        // A service whose name another's starts with is not mistaken for it.
        assert!(!Milestone::ready("app").matches("supervisor::runner: ready  service=apparmor"));
    }

    #[test]
    fn memory_is_read_from_the_metrics() {
        let text = "# HELP x\n\
            tandem_supervisor_up{node=\"server1\"} 1\n\
            tandem_supervisor_service_resident_bytes{node=\"server1\",service=\"balancer\"} 3145728\n\
            tandem_supervisor_service_resident_bytes{node=\"server1\",service=\"mariadb\"} 1.048576e8\n\
            tandem_supervisor_resident_bytes{node=\"server1\"} 9437184\n\
            tandem_supervisor_anon_bytes{node=\"server1\"} 4194304\n\
            tandem_supervisor_service_anon_bytes{node=\"server1\",service=\"balancer\"} 1048576\n";
        let m = memory_from_metrics(text);
        let r = |total, anon| Resident { total, anon };
        assert_eq!(
            m,
            [
                ("supervisor".to_string(), r(9437184, 4194304)),
                ("balancer".to_string(), r(3145728, 1048576)),
                ("mariadb".to_string(), r(104857600, 0))
            ]
        );
        let t = memory_table(&[("server1".into(), m)]);
        assert!(t.contains("supervisor"), "{t}");
        assert!(t.contains("      9.0        4.0"), "{t}");
    }

    #[test]
    fn the_table_has_a_column_per_boot_and_the_stages() {
        let mut a = fresh();
        for (i, slot) in a.iter_mut().enumerate() {
            slot.1 = Some(Duration::from_millis(1000 * (i as u64 + 1)));
        }
        let mut b = fresh();
        b[0].1 = Some(Duration::from_millis(2500));
        let records = [
            BootRecord {
                node: "server1".into(),
                boot: 1,
                seen: a,
            },
            BootRecord {
                node: "server1".into(),
                boot: 2,
                seen: b,
            },
        ];
        let t = table(&records);
        assert!(t.contains("server1 #1 (first)"), "{t}");
        assert!(t.contains("server1 #2"), "{t}");
        let row = |label: &str| {
            t.lines()
                .find(|l| l.starts_with(label))
                .unwrap_or_else(|| panic!("no {label} in {t}"))
                .split_whitespace()
                .rev()
                .take(2)
                .collect::<Vec<_>>()
        };
        // Second boot: only the kernel was seen.
        assert_eq!(row("firmware + boot loader"), vec!["2.5", "1.0"]);
        assert_eq!(row("kernel + initrd"), vec!["—", "1.0"]);
        // system up at 3 s, HTTPS at 7 s.
        assert_eq!(row("services to HTTPS 200"), vec!["—", "4.0"]);
    }
}
