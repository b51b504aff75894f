//! Host prerequisites: the Debian packages whose tools the build runs. As root, missing ones are
//! installed with apt-get; otherwise the error gives the exact command to run.

use std::path::Path;

use crate::cmd::{find_program, Cmd};
use crate::Error;

/// (what must exist, Debian package providing it). Paths are files; other names are programs.
pub const REQUIREMENTS: &[(&str, &str)] = &[
    ("mmdebstrap", "mmdebstrap"),
    ("mkfs.ext4", "e2fsprogs"),
    ("debugfs", "e2fsprogs"),
    ("sfdisk", "fdisk"),
    ("mkfs.vfat", "dosfstools"),
    ("mcopy", "mtools"),
    ("mmd", "mtools"),
    ("qemu-img", "qemu-utils"),
    ("objcopy", "binutils"),
    (crate::esp::SYSTEMD_BOOT_EFI, "systemd-boot-efi"),
];

/// Whether this process runs as root (effective user id 0).
pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Debian packages (sorted, deduplicated) providing what is missing on this host.
pub fn missing_packages() -> Vec<&'static str> {
    let mut missing: Vec<&str> = REQUIREMENTS
        .iter()
        .filter(|(what, _)| {
            if what.starts_with('/') {
                !Path::new(what).is_file()
            } else {
                find_program(what).is_none()
            }
        })
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.sort_unstable();
    missing.dedup();
    missing
}

fn install_command(pkgs: &[&str]) -> String {
    format!(
        "apt-get install -y --no-install-recommends {}",
        pkgs.join(" ")
    )
}

/// Makes sure every host tool is there, installing missing packages when running as root.
/// Returns the packages installed.
pub fn ensure_tools(mut on_line: impl FnMut(&str)) -> Result<Vec<&'static str>, Error> {
    let missing = missing_packages();
    if missing.is_empty() {
        return Ok(missing);
    }
    if !is_root() {
        return Err(Error::MissingTools {
            packages: missing.join(" "),
            command: format!("sudo {}", install_command(&missing)),
        });
    }
    let install = || {
        Cmd::new("host tools", "apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .run_quiet()
    };
    on_line(&format!("installing {}", missing.join(" ")));
    if install().is_err() {
        // Stale package lists are the usual cause; refresh once and retry.
        Cmd::new("host tools", "apt-get")
            .arg("update")
            .run_quiet()?;
        install()?;
    }
    let still = missing_packages();
    if !still.is_empty() {
        return Err(Error::MissingTools {
            packages: still.join(" "),
            command: install_command(&still),
        });
    }
    Ok(missing)
}
