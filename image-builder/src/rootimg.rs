//! The root filesystem image (`root.ext4`), identical for every node: the base, the `rootfs/`
//! overlay, the appliance binary as `/usr/sbin/appliance` and `/sbin/init`, empty mount points,
//! and no setuid or setgid bit anywhere.
//!
//! Reproducible: `mkfs.ext4 -d` with a fixed UUID, hash seed and E2FSPROGS_FAKE_TIME, then every
//! inode's atime/mtime/ctime set to SOURCE_DATE_EPOCH with debugfs (mkfs.ext4 1.47.0 copies the
//! staging tree's ctime, which no tool can set). No mounts, no loop devices.

use std::fmt::Write as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::cmd::Cmd;
use crate::layout::{derived_uuid, round_up, MIB};
use crate::Error;

const STEP: &str = "root filesystem";
pub const APPLIANCE_PATH: &str = "usr/sbin/appliance";
/// Where PID 1 is looked for; `/sbin` is a symlink to `usr/sbin` (merged /usr).
pub const INIT_PATH: &str = "usr/sbin/init";
pub const INIT_TARGET: &str = "/usr/sbin/appliance";
/// Mount points that must exist and be empty in the read-only root (among them the first
/// component of `api::files::SEED_MOUNT`, `IMAGE_STATE_DIR` and `IMAGE_RUN_DIR`).
pub const MOUNT_POINTS: &[(&str, u32)] = &[
    ("data", 0o755),
    ("seed", 0o755),
    ("run", 0o755),
    ("tmp", 0o1777),
    ("proc", 0o555),
    ("sys", 0o555),
    ("dev", 0o755),
];

/// Builds the staging tree for the root image at `staging` (replacing it).
pub fn stage(
    base_root: &Path,
    overlay: &Path,
    appliance: &Path,
    staging: &Path,
) -> Result<(), Error> {
    if staging.exists() {
        std::fs::remove_dir_all(staging).map_err(|e| Error::io(STEP, staging, e))?;
    }
    Cmd::new(STEP, "cp")
        .args(["-a", "--reflink=auto"])
        .arg(base_root)
        .arg(staging)
        .run_quiet()?;
    for (dir, mode) in MOUNT_POINTS {
        let p = staging.join(dir);
        if p.exists() {
            std::fs::remove_dir_all(&p).map_err(|e| Error::io(STEP, &p, e))?;
        }
        std::fs::create_dir(&p).map_err(|e| Error::io(STEP, &p, e))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode))
            .map_err(|e| Error::io(STEP, &p, e))?;
    }
    // mmdebstrap leaves the build host's resolver config; the node writes its own into /run.
    let resolv = staging.join("etc/resolv.conf");
    let _ = std::fs::remove_file(&resolv);
    std::os::unix::fs::symlink("../run/resolv.conf", &resolv)
        .map_err(|e| Error::io(STEP, &resolv, e))?;
    if overlay.is_dir() {
        // Ownership is the builder's (root), not the checkout's.
        let mut src = overlay.as_os_str().to_owned();
        src.push("/.");
        Cmd::new(STEP, "cp")
            .args(["-R", "--preserve=mode,links"])
            .arg(src)
            .arg(staging)
            .run_quiet()?;
    }
    let dest = staging.join(APPLIANCE_PATH);
    std::fs::copy(appliance, &dest).map_err(|e| Error::io(STEP, appliance, e))?;
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| Error::io(STEP, &dest, e))?;
    let init = staging.join(INIT_PATH);
    let _ = std::fs::remove_file(&init);
    std::os::unix::fs::symlink(INIT_TARGET, &init).map_err(|e| Error::io(STEP, &init, e))?;
    clear_setid_bits(staging)?;
    Ok(())
}

/// The setuid and setgid bits.
const SETID_BITS: u32 = 0o6000;

/// Clears the setuid and setgid bits of every file and directory below `root` (what
/// `find -perm /6000` lists; links have none): no program on the image gains privileges by
/// being run, whoever runs it. Returns the paths it changed, relative to `root`, sorted.
pub fn clear_setid_bits(root: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut changed = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let md = std::fs::symlink_metadata(&path).map_err(|e| Error::io(STEP, &path, e))?;
        if md.file_type().is_symlink() {
            continue;
        }
        let mode = md.permissions().mode();
        if mode & SETID_BITS != 0 {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & !SETID_BITS))
                .map_err(|e| Error::io(STEP, &path, e))?;
            changed.push(path.strip_prefix(root).unwrap_or(&path).to_path_buf());
        }
        if md.is_dir() {
            for entry in std::fs::read_dir(&path).map_err(|e| Error::io(STEP, &path, e))? {
                stack.push(entry.map_err(|e| Error::io(STEP, &path, e))?.path());
            }
        }
    }
    changed.sort();
    Ok(changed)
}

/// What `mkfs.ext4 -d` will copy: every path (relative, sorted) and the blocks it needs.
#[derive(Debug, Default)]
pub struct TreeStats {
    pub paths: Vec<String>,
    pub bytes: u64,
}

pub fn scan(staging: &Path) -> Result<TreeStats, Error> {
    let mut stats = TreeStats::default();
    let mut seen_inodes = std::collections::HashSet::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = staging.join(&rel);
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(STEP, &dir, e))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(|e| Error::io(STEP, &dir, e))?;
        entries.sort();
        // Reverse so that the stack pops them in order.
        for name in entries.into_iter().rev() {
            let r = rel.join(&name);
            let p = staging.join(&r);
            let md = std::fs::symlink_metadata(&p).map_err(|e| Error::io(STEP, &p, e))?;
            let text = r
                .to_str()
                .ok_or_else(|| Error::Base(format!("{} is not UTF-8", p.display())))?;
            if text.contains(['"', '\n', '\\']) {
                return Err(Error::Base(format!(
                    "{} has a character debugfs cannot quote",
                    p.display()
                )));
            }
            stats.paths.push(text.to_string());
            if md.is_dir() {
                stats.bytes += 4096;
                stack.push(r);
            } else if md.is_file() && seen_inodes.insert(md.ino()) {
                stats.bytes += round_up(md.len(), 4096);
            } else if md.file_type().is_symlink() && md.len() >= 60 {
                stats.bytes += 4096;
            }
        }
    }
    // The walk pops depth-first; present it sorted for a stable debugfs script.
    stats.paths.sort();
    Ok(stats)
}

/// Filesystem size for a tree: 10 % + 48 MiB for metadata and slack, whole 4 MiB.
pub fn fs_size(tree_bytes: u64) -> u64 {
    round_up(tree_bytes + tree_bytes / 10 + 48 * MIB, 4 * MIB)
}

/// The debugfs script that sets every path's timestamps to `epoch`.
pub fn timestamp_script(paths: &[String], epoch: u64) -> String {
    let mut s = String::with_capacity(paths.len() * 120);
    for p in std::iter::once("").chain(paths.iter().map(String::as_str)) {
        for field in ["atime", "mtime", "ctime", "crtime"] {
            let _ = writeln!(s, "sif \"/{p}\" {field} @{epoch}");
        }
    }
    s
}

/// An ext4 filesystem made reproducibly by `mkfs.ext4 [-d DIR]`.
pub struct Ext4<'a> {
    pub step: &'static str,
    pub label: &'a str,
    /// Picks the derived (fixed) UUID and directory hash seed.
    pub uuid_name: &'a str,
    pub size: u64,
    /// The read-only filesystems (root, seed) need none.
    pub journal: bool,
    pub epoch: u64,
}

impl Ext4<'_> {
    /// Writes the filesystem to `out`, with the contents of `staging` if given.
    pub fn make(&self, staging: Option<&Path>, out: &Path) -> Result<(), Error> {
        let _ = std::fs::remove_file(out);
        let mut features = "metadata_csum".to_string();
        if !self.journal {
            features.push_str(",^has_journal");
        }
        let mut cmd = Cmd::new(self.step, "mkfs.ext4")
            .args([
                "-F", "-q", "-t", "ext4", "-b", "4096", "-I", "256", "-m", "0", "-O", &features,
            ])
            .args([
                "-L",
                self.label,
                "-U",
                &derived_uuid(&["fs", self.uuid_name]),
            ])
            .arg(format!(
                "-Ehash_seed={},root_owner=0:0,lazy_itable_init=0,nodiscard",
                derived_uuid(&["hash-seed", self.uuid_name])
            ))
            .env("E2FSPROGS_FAKE_TIME", self.epoch.to_string());
        if let Some(dir) = staging {
            cmd = cmd.arg("-d").arg(dir);
        }
        cmd.arg(out)
            .arg(format!("{}k", self.size / 1024))
            .run_quiet()
    }
}

/// Builds `out` from `staging`; returns the filesystem size.
pub fn build(staging: &Path, out: &Path, epoch: u64) -> Result<u64, Error> {
    let stats = scan(staging)?;
    let size = fs_size(stats.bytes);
    let fs = Ext4 {
        step: STEP,
        label: "root",
        uuid_name: "root",
        size,
        journal: false,
        epoch,
    };
    fs.make(Some(staging), out)?;
    let script_path = out.with_extension("debugfs");
    std::fs::write(&script_path, timestamp_script(&stats.paths, epoch))
        .map_err(|e| Error::io(STEP, &script_path, e))?;
    let (_, stderr) = Cmd::new(STEP, "debugfs")
        .args(["-w", "-f"])
        .arg(&script_path)
        .arg(out)
        .env("E2FSPROGS_FAKE_TIME", epoch.to_string())
        .capture()?;
    let _ = std::fs::remove_file(&script_path);
    // debugfs exits 0 even when a command fails; its banner is the only expected stderr line.
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.starts_with("debugfs "))
        .take(10)
        .collect();
    if !errors.is_empty() {
        return Err(Error::Base(format!(
            "debugfs on {} failed:\n{}",
            out.display(),
            errors.join("\n")
        )));
    }
    Cmd::new(STEP, "e2fsck")
        .args(["-f", "-n"])
        .arg(out)
        .run_quiet()?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nodes_fixed_directories_have_mount_points() {
        for dir in [
            api::files::SEED_MOUNT,
            api::files::IMAGE_STATE_DIR,
            api::files::IMAGE_RUN_DIR,
        ] {
            let top = Path::new(dir).components().nth(1).unwrap();
            assert!(
                MOUNT_POINTS.iter().any(|(m, _)| top.as_os_str() == *m),
                "{dir}"
            );
        }
    }

    #[test]
    fn timestamp_script_covers_root_and_every_path() {
        let s = timestamp_script(&["etc".into(), "etc/hostname".into()], 42);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.len(), 12);
        assert_eq!(lines[0], "sif \"/\" atime @42");
        assert_eq!(lines[4], "sif \"/etc\" atime @42");
        assert_eq!(lines[11], "sif \"/etc/hostname\" crtime @42");
    }

    #[test]
    fn no_setuid_or_setgid_bit_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let make = |rel: &str, mode: u32| {
            let p = root.join(rel);
            if rel.ends_with('/') {
                std::fs::create_dir_all(&p).unwrap();
            } else {
                std::fs::write(&p, "x").unwrap();
            }
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        make("usr/", 0o755);
        make("usr/su", 0o4755);
        make("usr/chage", 0o2755);
        make("usr/both", 0o6711);
        make("usr/plain", 0o644);
        make("mail/", 0o2775);
        make("tmp/", 0o1777);
        std::os::unix::fs::symlink("su", root.join("usr/link")).unwrap();
        let changed = clear_setid_bits(root).unwrap();
        let names: Vec<&str> = changed.iter().map(|p| p.to_str().unwrap()).collect();
        assert_eq!(names, ["mail", "usr/both", "usr/chage", "usr/su"]);
        let mode = |rel: &str| {
            std::fs::symlink_metadata(root.join(rel))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        for (rel, expected) in [
            ("usr/su", 0o755),
            ("usr/chage", 0o755),
            ("usr/both", 0o711),
            ("usr/plain", 0o644),
            ("mail", 0o775),
            // The sticky bit is not a privilege: /tmp keeps it.
            ("tmp", 0o1777),
        ] {
            assert_eq!(mode(rel), expected, "{rel}");
        }
        assert!(
            clear_setid_bits(root).unwrap().is_empty(),
            "a second pass finds nothing"
        );
    }

    #[test]
    fn fs_size_rounds_to_4_mib_with_slack() {
        assert_eq!(fs_size(0), 48 * MIB);
        assert_eq!(fs_size(400 * MIB), 488 * MIB);
        assert_eq!(fs_size(401 * MIB) % (4 * MIB), 0);
    }
}
