//! What one VM looks like to QEMU: the command line, the MAC address, the accelerator.
//! Pure functions of plain data, so the argv is unit-tested without starting anything.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use crate::tools::OVMF_CODE;

/// How guest code runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Software emulation: always works, slower.
    Tcg,
    /// Hardware virtualisation: only after a probe guest booted with it.
    Kvm,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        }
    }
}

/// Everything that varies between VMs.
#[derive(Debug, Clone, PartialEq)]
pub struct MachineConfig {
    pub name: String,
    pub accel: Accel,
    pub memory_mib: u32,
    /// The VM's qcow2 overlay.
    pub disk: PathBuf,
    /// The VM's private copy of the UEFI variable store.
    pub vars: PathBuf,
    /// Tap device (already created in the cluster namespace) the NIC is attached to.
    pub tap: String,
    pub mac: [u8; 6],
    /// Everything the guest prints on its serial console, from the first byte, appended across
    /// restarts (QEMU writes it whether or not a client is connected to `serial_socket`).
    pub serial_log: PathBuf,
    /// The serial console's input: a unix socket QEMU listens on (one client at a time).
    pub serial_socket: PathBuf,
    pub qmp_socket: PathBuf,
}

/// A locally administered, deterministic MAC for a node: QEMU's `52:54:00` prefix followed by the
/// last three octets of its address, so `10.88.0.11` gets `52:54:00:58:00:0b` and a packet
/// capture names its sender at a glance.
pub fn mac_for(address: Ipv4Addr) -> [u8; 6] {
    let [_, b, c, d] = address.octets();
    [0x52, 0x54, 0x00, b, c, d]
}

pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// QEMU's disk format name for a node image, from its extension (`.qcow2`, else raw).
pub(crate) fn image_format(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("qcow2") => "qcow2",
        _ => "raw",
    }
}

/// A path inside a QEMU `-opt key=value,...` list: commas are escaped by doubling.
fn opt_path(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

/// The arguments of `qemu-system-x86_64` (without the program name).
pub fn qemu_args(m: &MachineConfig) -> Vec<String> {
    let cpu = match m.accel {
        Accel::Tcg => "max",
        Accel::Kvm => "host",
    };
    let accel = match m.accel {
        // A 256 MiB translation cache instead of the 1 GiB default keeps two VMs light on RAM.
        Accel::Tcg => "tcg,tb-size=256".to_string(),
        Accel::Kvm => "kvm".to_string(),
    };
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&["-name", &m.name]);
    push(&["-no-user-config", "-nodefaults", "-display", "none"]);
    push(&["-machine", "q35", "-accel", &accel, "-cpu", cpu]);
    push(&["-smp", "1", "-m", &m.memory_mib.to_string()]);
    push(&[
        "-drive",
        &format!(
            "if=pflash,format=raw,unit=0,readonly=on,file={}",
            opt_path(Path::new(OVMF_CODE))
        ),
    ]);
    push(&[
        "-drive",
        &format!("if=pflash,format=raw,unit=1,file={}", opt_path(&m.vars)),
    ]);
    // `-drive if=virtio` plus an explicit bootindex, so OVMF boots the disk first.
    push(&[
        "-drive",
        &format!(
            "if=none,id=disk0,format=qcow2,discard=unmap,file={}",
            opt_path(&m.disk)
        ),
    ]);
    push(&["-device", "virtio-blk-pci,drive=disk0,bootindex=0"]);
    push(&[
        "-netdev",
        &format!("tap,id=net0,ifname={},script=no,downscript=no", m.tap),
    ]);
    // No option ROM: the firmware never tries to boot from the network.
    push(&[
        "-device",
        &format!(
            "virtio-net-pci,netdev=net0,mac={},romfile=",
            format_mac(m.mac)
        ),
    ]);
    // Entropy for a guest that makes keys on first boot, which TCG otherwise starves.
    push(&["-device", "virtio-rng-pci"]);
    // The console is a socket (a test types into it) whose output QEMU also logs to a file;
    // `wait=off`: the guest runs with no client, and the log still gets every byte. Appending
    // keeps every boot of this VM in one log.
    push(&[
        "-chardev",
        &format!(
            "socket,id=serial0,path={},server=on,wait=off,logfile={},logappend=on",
            opt_path(&m.serial_socket),
            opt_path(&m.serial_log)
        ),
    ]);
    push(&["-serial", "chardev:serial0"]);
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", opt_path(&m.qmp_socket)),
    ]);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(accel: Accel) -> MachineConfig {
        MachineConfig {
            name: "server1".into(),
            accel,
            memory_mib: 1024,
            disk: "/w/server1.qcow2".into(),
            vars: "/w/server1.vars.fd".into(),
            tap: "tap0".into(),
            mac: mac_for(Ipv4Addr::new(10, 88, 0, 11)),
            serial_log: "/w/a,b/server1.serial.log".into(),
            serial_socket: "/w/server1.serial".into(),
            qmp_socket: "/w/server1.qmp".into(),
        }
    }

    /// The value following `flag` for every occurrence of it.
    fn values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn mac_derives_from_address() {
        assert_eq!(
            format_mac(mac_for(Ipv4Addr::new(10, 88, 0, 11))),
            "52:54:00:58:00:0b"
        );
        assert_eq!(
            format_mac(mac_for(Ipv4Addr::new(10, 88, 0, 12))),
            "52:54:00:58:00:0c"
        );
        // Locally administered unicast (bit 1 of the first octet set, bit 0 clear).
        assert_eq!(mac_for(Ipv4Addr::new(1, 2, 3, 4))[0] & 0b11, 0b10);
    }

    #[test]
    fn image_format_from_extension() {
        assert_eq!(image_format(Path::new("/i/server1.qcow2")), "qcow2");
        assert_eq!(image_format(Path::new("/i/server1.img")), "raw");
        assert_eq!(image_format(Path::new("/i/server1")), "raw");
    }

    #[test]
    fn tcg_argv() {
        let a = qemu_args(&machine(Accel::Tcg));
        assert_eq!(values(&a, "-accel"), ["tcg,tb-size=256"]);
        assert_eq!(values(&a, "-cpu"), ["max"]);
        assert_eq!(values(&a, "-smp"), ["1"]);
        assert_eq!(values(&a, "-m"), ["1024"]);
        assert_eq!(values(&a, "-display"), ["none"]);
        assert!(
            a.contains(&"-nodefaults".to_string()) && a.contains(&"-no-user-config".to_string())
        );
        assert_eq!(
            values(&a, "-drive"),
            [
                "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
                "if=pflash,format=raw,unit=1,file=/w/server1.vars.fd",
                "if=none,id=disk0,format=qcow2,discard=unmap,file=/w/server1.qcow2",
            ]
        );
        assert_eq!(
            values(&a, "-netdev"),
            ["tap,id=net0,ifname=tap0,script=no,downscript=no"]
        );
        assert_eq!(
            values(&a, "-device"),
            [
                "virtio-blk-pci,drive=disk0,bootindex=0",
                "virtio-net-pci,netdev=net0,mac=52:54:00:58:00:0b,romfile=",
                "virtio-rng-pci",
            ]
        );
        // The comma in the directory name is doubled, as QEMU's option syntax requires.
        assert_eq!(
            values(&a, "-chardev"),
            ["socket,id=serial0,path=/w/server1.serial,server=on,wait=off,logfile=/w/a,,b/server1.serial.log,logappend=on"]
        );
        assert_eq!(values(&a, "-serial"), ["chardev:serial0"]);
        assert_eq!(
            values(&a, "-qmp"),
            ["unix:/w/server1.qmp,server=on,wait=off"]
        );
    }

    #[test]
    fn kvm_argv() {
        let a = qemu_args(&machine(Accel::Kvm));
        assert_eq!(values(&a, "-accel"), ["kvm"]);
        assert_eq!(values(&a, "-cpu"), ["host"]);
    }
}
