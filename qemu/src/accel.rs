//! Choosing the accelerator: TCG unless a KVM guest demonstrably boots.
//!
//! `/dev/kvm` existing proves little (nested KVM here opens fine, then hangs the guest), so the
//! probe boots OVMF under KVM and waits for the firmware's boot manager to print on serial.
//! The answer is cached for the process, and for later processes until the host reboots (in
//! `/run/tandem-accel`, keyed by the boot id). `TANDEM_ACCEL=tcg|kvm|auto` overrides (default
//! auto).

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::machine::Accel;
use crate::tools;

/// A working KVM reaches the boot manager in about a second; a broken one never does.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// What OVMF prints on serial once it reaches the boot device selection.
const PROBE_BOOTED: &str = "BdsDxe";

/// The accelerator for this process's VMs.
pub(crate) fn choose() -> Accel {
    static CHOSEN: OnceLock<Accel> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let accel = match std::env::var("TANDEM_ACCEL").as_deref() {
            Ok("tcg") => Accel::Tcg,
            Ok("kvm") => Accel::Kvm,
            _ => probe_cached(),
        };
        tracing::info!(accel = accel.as_str(), "accelerator chosen");
        accel
    })
}

const CACHE: &str = "/run/tandem-accel";

fn probe_cached() -> Accel {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let boot_id = boot_id.trim();
    if let Ok(cached) = std::fs::read_to_string(CACHE) {
        match cached.split_once(' ') {
            Some((id, "kvm")) if id == boot_id => return Accel::Kvm,
            Some((id, "tcg")) if id == boot_id => return Accel::Tcg,
            _ => {}
        }
    }
    let accel = if kvm_boots() { Accel::Kvm } else { Accel::Tcg };
    if !boot_id.is_empty() {
        // Best effort: without the cache the next process probes again.
        let _ = std::fs::write(CACHE, format!("{boot_id} {}", accel.as_str()));
    }
    accel
}

fn kvm_boots() -> bool {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return false;
    }
    let Ok(qemu) = tools::find(tools::QEMU) else {
        return false;
    };
    let Ok(dir) = tempfile::Builder::new()
        .prefix("tandem-kvm-probe")
        .tempdir()
    else {
        return false;
    };
    let vars = dir.path().join("vars.fd");
    let serial = dir.path().join("serial.log");
    if std::fs::copy(tools::OVMF_VARS, &vars).is_err() {
        return false;
    }
    let child = Command::new(qemu)
        .args([
            "-no-user-config",
            "-nodefaults",
            "-display",
            "none",
            "-machine",
            "q35",
        ])
        .args(["-accel", "kvm", "-m", "256", "-smp", "1"])
        .arg("-drive")
        .arg(format!(
            "if=pflash,format=raw,unit=0,readonly=on,file={}",
            tools::OVMF_CODE
        ))
        .arg("-drive")
        .arg(format!(
            "if=pflash,format=raw,unit=1,file={}",
            vars.display()
        ))
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else { return false };
    let start = Instant::now();
    let booted = loop {
        if contains(&serial, PROBE_BOOTED) {
            break true;
        }
        if start.elapsed() > PROBE_TIMEOUT || matches!(child.try_wait(), Ok(Some(_))) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = child.kill();
    let _ = child.wait();
    tracing::info!(booted, "KVM probe");
    booted
}

fn contains(path: &Path, needle: &str) -> bool {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).contains(needle))
        .unwrap_or(false)
}
