//! The EFI system partition: systemd-boot, slot A's kernel and initrd, and the loader entry
//! with boot counting, slot A the default. Built as a FAT32 file with `mkfs.vfat` + mtools,
//! never mounted. The texts and names are `update::boot`'s, which updates use on the node.

use std::path::{Path, PathBuf};

use update::boot::{self, Slot};

use crate::cmd::Cmd;
use crate::layout::{self, ESP_SIZE};
use crate::Error;

/// systemd-boot as shipped by Debian's `systemd-boot-efi` package.
pub const SYSTEMD_BOOT_EFI: &str = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi";
/// The slot a new image boots.
const FIRST_SLOT: Slot = Slot::A;

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
    let loader_conf = write("loader.conf", boot::loader_conf(FIRST_SLOT))?;
    let entry = write("entry.conf", boot::loader_entry(FIRST_SLOT, version, ""))?;

    let img = format!("{}", out.display());
    let mtools = |args: &[&str]| -> Result<(), Error> {
        Cmd::new(STEP, args[0])
            .args(["-i", &img])
            .args(&args[1..])
            .env("MTOOLS_SKIP_CHECK", "1")
            .run_quiet()
    };
    let dir_a = format!("::/{}", boot::slot_dir(FIRST_SLOT));
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
        (&loader_conf, format!("::/{}", boot::LOADER_CONF)),
        (
            &entry,
            format!(
                "::/{}/{}",
                boot::ENTRIES_DIR,
                boot::entry_file_name(FIRST_SLOT, Some(boot::BOOT_TRIES))
            ),
        ),
        (kernel, format!("{dir_a}/{}", boot::KERNEL_FILE)),
        (initrd, format!("{dir_a}/{}", boot::INITRD_FILE)),
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
