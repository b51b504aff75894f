//! Host prerequisites: the programs and firmware files the harness runs, each with the Debian
//! package that provides it, so a missing one is a one-line fix for whoever reads the error.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// UEFI firmware code (read-only pflash), from the `ovmf` package.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// Template of the UEFI variable store; each VM gets its own writable copy.
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// Programs the harness runs, and their Debian packages.
pub(crate) const QEMU: (&str, &str) = ("qemu-system-x86_64", "qemu-system-x86");
pub(crate) const QEMU_IMG: (&str, &str) = ("qemu-img", "qemu-utils");
/// Reads a running VM's disk (`Vm::read_disk`).
pub(crate) const QEMU_IO: (&str, &str) = ("qemu-io", "qemu-utils");
pub(crate) const IP: (&str, &str) = ("ip", "iproute2");
pub(crate) const CURL: (&str, &str) = ("curl", "curl");
/// Who answers ARP for the floating IP.
pub(crate) const ARPING: (&str, &str) = ("arping", "iputils-arping");

/// Full path of `tool` on `$PATH` (plus the sbin directories, which a non-login root shell may
/// lack), or an error naming its package.
pub(crate) fn find((tool, package): (&'static str, &'static str)) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = [PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")];
    std::env::split_paths(&path)
        .chain(extra)
        .map(|dir| dir.join(tool))
        .find(|p| is_executable(p))
        .ok_or(Error::MissingTool { tool, package })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Everything needed to boot a cluster, checked up front so a missing package is reported before
/// any namespace or VM exists.
pub fn check_host() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Error::NotRoot);
    }
    for tool in [QEMU, QEMU_IMG, QEMU_IO, IP, CURL, ARPING] {
        find(tool)?;
    }
    for file in [OVMF_CODE, OVMF_VARS] {
        if !Path::new(file).is_file() {
            return Err(Error::MissingFile {
                path: file.into(),
                package: "ovmf",
            });
        }
    }
    Ok(())
}
