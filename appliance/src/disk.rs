//! This boot as the kernel tells it: its command line, its uptime, and the disk the node booted
//! from, whose partitions are found by GPT name through sysfs (no udev on an image). Used by
//! `init` (seed, data) and the update service (ESP, the inactive root slot).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// `name=value` from the kernel command line.
pub fn kernel_param(name: &str) -> Option<String> {
    let cmdline = fs::read_to_string("/proc/cmdline").ok()?;
    param_of(&cmdline, name)
}

/// Time since the machine booted (`/proc/uptime`).
pub fn uptime() -> Option<Duration> {
    let text = fs::read_to_string("/proc/uptime").ok()?;
    let secs: f64 = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_secs_f64(secs))
}

fn param_of(cmdline: &str, name: &str) -> Option<String> {
    cmdline
        .split_whitespace()
        .find_map(|p| p.strip_prefix(name)?.strip_prefix('=').map(str::to_string))
}

/// `/dev/<name>` of the GPT partition labelled `label` on the disk the node booted from (no
/// udev here: read sysfs). Other disks are never looked at: a USB stick with a partition called
/// `data` must not be taken for ours (and formatted).
pub fn find_partition(label: &str) -> anyhow::Result<PathBuf> {
    let disk = boot_disk()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = partitions_labelled(&disk, label)?;
        match found.as_slice() {
            [one] => return Ok(Path::new("/dev").join(one)),
            [] if Instant::now() > deadline => {
                bail!(
                    "no partition labelled `{label}` on the boot disk {}",
                    disk.display()
                )
            }
            [] => std::thread::sleep(Duration::from_millis(100)),
            _ => bail!(
                "{} partitions labelled `{label}` on the boot disk {}",
                found.len(),
                disk.display()
            ),
        }
    }
}

/// The partitions of `disk` (its sysfs directory) named `label`, as device names.
fn partitions_labelled(disk: &Path, label: &str) -> anyhow::Result<Vec<std::ffi::OsString>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(disk)
        .with_context(|| format!("listing {}", disk.display()))?
        .flatten()
    {
        let uevent = fs::read_to_string(entry.path().join("uevent")).unwrap_or_default();
        if partition_name(&uevent) == Some(label) {
            found.push(entry.file_name());
        }
    }
    Ok(found)
}

/// `PARTNAME` of a block device's `uevent`, if it is a partition with a name.
fn partition_name(uevent: &str) -> Option<&str> {
    uevent.lines().find_map(|l| l.strip_prefix("PARTNAME="))
}

/// The sysfs directory of the disk holding the root filesystem we run from: the device of `/`
/// (`st_dev`) is a partition of it.
fn boot_disk() -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::MetadataExt as _;
    let dev = fs::metadata("/").context("stat /")?.dev();
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    let sys = Path::new("/sys/dev/block").join(format!("{major}:{minor}"));
    let part = fs::canonicalize(&sys).with_context(|| format!("resolving {}", sys.display()))?;
    if !part.join("partition").exists() {
        bail!(
            "the root filesystem ({major}:{minor}, {}) is not on a partition of a disk",
            part.display()
        );
    }
    Ok(part
        .parent()
        .context("a partition without a disk in sysfs")?
        .to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_parameters_are_found_by_exact_name() {
        let line = "root=PARTLABEL=root-b ro tandem.slot=b tandem.trial_timeout=120 quiet";
        assert_eq!(param_of(line, "tandem.slot").as_deref(), Some("b"));
        assert_eq!(
            param_of(line, "tandem.trial_timeout").as_deref(),
            Some("120")
        );
        assert_eq!(param_of(line, "tandem.trial"), None);
        assert_eq!(param_of(line, "quiet"), None);
    }

    #[test]
    fn partitions_are_taken_from_the_boot_disk_only() {
        // A fake sysfs: the boot disk vda and a USB stick sda, both with a `data` partition.
        let sys = tempfile::tempdir().unwrap();
        let part = |disk: &str, name: &str, label: &str| {
            let dir = sys.path().join(disk).join(name);
            fs::create_dir_all(&dir).unwrap();
            fs::write(
                dir.join("uevent"),
                format!("MAJOR=254\nMINOR=1\nDEVNAME={name}\nDEVTYPE=partition\nPARTN=1\nPARTNAME={label}\n"),
            )
            .unwrap();
        };
        part("vda", "vda2", "root-a");
        part("vda", "vda5", "data");
        part("sda", "sda1", "data");
        fs::create_dir_all(sys.path().join("vda/queue")).unwrap();
        let vda = sys.path().join("vda");
        assert_eq!(partitions_labelled(&vda, "data").unwrap(), ["vda5"]);
        assert!(partitions_labelled(&vda, "seed").unwrap().is_empty());
        assert_eq!(
            partitions_labelled(&sys.path().join("sda"), "data").unwrap(),
            ["sda1"]
        );
    }

    #[test]
    fn the_boot_disk_is_the_disk_of_the_root_filesystem() {
        // Wherever the tests run, `/` is either on a partition (its disk is found) or not
        // (overlay, tmpfs: a clear error); never a panic, never another disk.
        match boot_disk() {
            Ok(disk) => assert!(disk.starts_with("/sys/devices"), "{}", disk.display()),
            Err(e) => assert!(e.to_string().contains("not on a partition"), "{e:#}"),
        }
    }
}
