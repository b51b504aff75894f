//! The EFI system partition: systemd-boot, slot A's kernel and initrd, and the loader entry
//! with boot counting. Built as a FAT32 file with `mkfs.vfat` + mtools, never mounted.

use std::path::{Path, PathBuf};

use crate::cmd::Cmd;
use crate::layout::{self, ESP_SIZE};
use crate::Error;

/// systemd-boot as shipped by Debian's `systemd-boot-efi` package.
pub const SYSTEMD_BOOT_EFI: &str = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi";
/// Boot attempts for a new entry before systemd-boot falls back (automatic boot assessment).
pub const BOOT_TRIES: u32 = 3;
pub const SERIAL_CONSOLE: &str = "console=ttyS0,115200";

/// `loader/loader.conf`: no menu, newest `appliance-*` entry, no editing of the command line.
pub fn loader_conf() -> String {
    "timeout 0\ndefault appliance-*\neditor no\n".to_string()
}

/// File name of a slot's loader entry, with its boot counter: `appliance-a+3.conf`.
pub fn entry_file_name(slot: char) -> String {
    format!("appliance-{slot}+{BOOT_TRIES}.conf")
}

/// ESP directory holding a slot's kernel and initrd.
pub fn slot_dir(slot: char) -> String {
    format!("tandem/{slot}")
}

/// The kernel command line for a slot.
pub fn kernel_options(slot: char) -> String {
    format!("root=PARTLABEL=root-{slot} ro rootwait {SERIAL_CONSOLE} panic=10 tandem.slot={slot}")
}

/// Text of a slot's loader entry (Boot Loader Specification type #1).
pub fn loader_entry(slot: char, version: &str) -> String {
    let dir = slot_dir(slot);
    format!(
        "title Tandem appliance (slot {slot})\nversion {version}\nlinux /{dir}/vmlinuz\ninitrd /{dir}/initrd.img\noptions {}\n",
        kernel_options(slot)
    )
}

/// Builds the ESP image at `out` for slot A with `kernel` and `initrd`.
pub fn build(
    out: &Path,
    kernel: &Path,
    initrd: &Path,
    volume_id: &str,
    version: &str,
) -> Result<(), Error> {
    const STEP: &str = "ESP";
    let _ = std::fs::remove_file(out);
    // 1 KiB clusters: well above FAT32's minimum cluster count for 256 MiB.
    Cmd::new(STEP, "mkfs.vfat")
        .args([
            "-F",
            "32",
            "-S",
            "512",
            "-s",
            "2",
            "-n",
            "ESP",
            "--invariant",
            "-i",
            volume_id,
            "-C",
        ])
        .arg(out)
        .arg((ESP_SIZE / 1024).to_string())
        .run_quiet()?;

    let staging = out.with_extension("staging");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| Error::io(STEP, &staging, e))?;
    let write = |name: &str, text: String| -> Result<PathBuf, Error> {
        let p = staging.join(name);
        std::fs::write(&p, text).map_err(|e| Error::io(STEP, &p, e))?;
        Ok(p)
    };
    let loader_conf = write("loader.conf", loader_conf())?;
    let entry = write("entry.conf", loader_entry('a', version))?;

    let img = format!("{}", out.display());
    let mtools = |args: &[&str]| -> Result<(), Error> {
        Cmd::new(STEP, args[0])
            .args(["-i", &img])
            .args(&args[1..])
            .env("MTOOLS_SKIP_CHECK", "1")
            .run_quiet()
    };
    let dir_a = format!("::/{}", slot_dir('a'));
    mtools(&[
        "mmd",
        "::/EFI",
        "::/EFI/BOOT",
        "::/EFI/systemd",
        "::/loader",
        "::/loader/entries",
        "::/tandem",
        &dir_a,
    ])?;
    let copies: [(&Path, String); 6] = [
        (
            Path::new(SYSTEMD_BOOT_EFI),
            "::/EFI/BOOT/BOOTX64.EFI".into(),
        ),
        (
            Path::new(SYSTEMD_BOOT_EFI),
            "::/EFI/systemd/systemd-bootx64.efi".into(),
        ),
        (&loader_conf, "::/loader/loader.conf".into()),
        (
            &entry,
            format!("::/loader/entries/{}", entry_file_name('a')),
        ),
        (kernel, format!("{dir_a}/vmlinuz")),
        (initrd, format!("{dir_a}/initrd.img")),
    ];
    for (src, dst) in &copies {
        let src = src
            .to_str()
            .ok_or_else(|| Error::io(STEP, src, std::io::ErrorKind::InvalidInput.into()))?;
        mtools(&["mcopy", "-m", "-o", src, dst])?;
    }
    let _ = std::fs::remove_dir_all(&staging);
    Ok(())
}

/// Volume id of a node's ESP.
pub fn volume_id(cluster: &str, node: &str) -> String {
    layout::derived_fat_volume_id(&[cluster, node, "esp"])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loader_texts() {
        assert_eq!(loader_conf(), "timeout 0\ndefault appliance-*\neditor no\n");
        assert_eq!(entry_file_name('a'), "appliance-a+3.conf");
        assert_eq!(
            loader_entry('a', "0.1.0"),
            "title Tandem appliance (slot a)\n\
             version 0.1.0\n\
             linux /tandem/a/vmlinuz\n\
             initrd /tandem/a/initrd.img\n\
             options root=PARTLABEL=root-a ro rootwait console=ttyS0,115200 panic=10 tandem.slot=a\n"
        );
        assert!(
            loader_entry('b', "2").contains("root=PARTLABEL=root-b ro")
                && loader_entry('b', "2").contains("/tandem/b/vmlinuz")
        );
    }
}
