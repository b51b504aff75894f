//! The root filesystem image (`root.ext4`), identical for every node: the base, the `rootfs/`
//! overlay, the appliance binary as `/usr/sbin/appliance` and `/sbin/init`, empty mount points,
//! and no setuid or setgid bit anywhere.
//!
//! Reproducible: `mkfs.ext4 -d` with a fixed UUID, hash seed and E2FSPROGS_FAKE_TIME, then every
//! inode's atime/mtime/ctime set to SOURCE_DATE_EPOCH with debugfs (mkfs.ext4 1.47.0 copies the
//! staging tree's ctime, which no tool can set). No mounts, no loop devices.

use std::fmt::Write as _;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
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

/// What goes into the root image besides the base.
pub struct RootInputs<'a> {
    /// The cached base root filesystem.
    pub base_root: &'a Path,
    /// `rootfs/overlay`, copied over the base (if it exists).
    pub overlay: &'a Path,
    /// Installed as [`APPLIANCE_PATH`], with [`INIT_PATH`] linking to it.
    pub appliance: &'a Path,
    /// Copied over everything above, in order (`--extra-tree`; see [`copy_tree`]).
    pub extra_trees: &'a [PathBuf],
    /// Files the builder writes last (absolute path in the image, contents), mode 0644: the
    /// version file and the update keyring.
    pub files: &'a [(&'a str, &'a [u8])],
}

/// Builds the staging tree for the root image at `staging` (replacing it).
pub fn stage(inputs: &RootInputs<'_>, staging: &Path) -> Result<(), Error> {
    let RootInputs {
        base_root,
        overlay,
        appliance,
        extra_trees,
        files,
    } = *inputs;
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
    // Without its debug sections (the line tables of the release profile are most of the
    // binary: 113 MB → 26 MB); function names stay for backtraces, and the build machine
    // keeps the full binary to resolve lines.
    Cmd::new(STEP, "objcopy")
        .arg("--strip-debug")
        .arg(appliance)
        .arg(&dest)
        .run_quiet()?;
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| Error::io(STEP, &dest, e))?;
    let init = staging.join(INIT_PATH);
    let _ = std::fs::remove_file(&init);
    std::os::unix::fs::symlink(INIT_TARGET, &init).map_err(|e| Error::io(STEP, &init, e))?;
    for tree in extra_trees {
        copy_tree(tree, staging)?;
    }
    for (path, data) in files {
        write_image_file(staging, path, data)?;
    }
    clear_setid_bits(staging)?;
    Ok(())
}

/// Longest chain of symbolic links [`resolve_in_root`] follows.
const MAX_LINKS: usize = 40;

/// `rel` (a path in the image) resolved inside `root` as if `root` were `/`: symbolic links in
/// it are followed (absolute ones from `root`, `..` never above it), so that a link in the
/// image such as `/sbin -> usr/sbin` leads to the image's directory, never the build host's.
/// Components past the first missing one are appended as they are.
pub fn resolve_in_root(root: &Path, rel: &Path) -> Result<PathBuf, Error> {
    use std::path::Component;
    let mut todo: Vec<std::ffi::OsString> = rel
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut done = PathBuf::new();
    let mut links = 0;
    while let Some(name) = todo.pop() {
        if name == ".." {
            done.pop();
            continue;
        }
        let candidate = done.join(&name);
        let full = root.join(&candidate);
        match std::fs::symlink_metadata(&full) {
            Ok(md) if md.file_type().is_symlink() => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(Error::Base(format!(
                        "{}: more than {MAX_LINKS} symbolic links",
                        rel.display()
                    )));
                }
                let target = std::fs::read_link(&full).map_err(|e| Error::io(STEP, &full, e))?;
                if target.is_absolute() {
                    done.clear();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(n) => todo.push(n.to_owned()),
                        Component::ParentDir => todo.push("..".into()),
                        _ => {}
                    }
                }
            }
            _ => done = candidate,
        }
    }
    Ok(root.join(done))
}

/// Copies the tree `src` over the image tree `root` (like mkosi's ExtraTrees=): directories
/// are merged, files and links replace what was there (a link in the way is replaced, never
/// written through; links in the directories above are followed inside `root`). Files keep
/// their permission bits and belong to the builder (root); timestamps are set later like every
/// other file's. Only directories, regular files and symbolic links are copied.
pub fn copy_tree(src: &Path, root: &Path) -> Result<(), Error> {
    const STEP: &str = "extra tree";
    let md = std::fs::metadata(src).map_err(|e| Error::io(STEP, src, e))?;
    if !md.is_dir() {
        return Err(Error::io(
            STEP,
            src,
            std::io::Error::other("not a directory"),
        ));
    }
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = src.join(&rel);
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(STEP, &dir, e))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(|e| Error::io(STEP, &dir, e))?;
        names.sort();
        for name in names {
            let from = dir.join(&name);
            let md = std::fs::symlink_metadata(&from).map_err(|e| Error::io(STEP, &from, e))?;
            let parent = resolve_in_root(root, &rel)?;
            let to = parent.join(&name);
            let existing = std::fs::symlink_metadata(&to).ok();
            let mode = md.permissions().mode() & 0o7777;
            if md.is_dir() {
                // A link to a directory in the image (merged /usr) is followed, inside the image.
                let target = resolve_in_root(root, &rel.join(&name))?;
                match std::fs::symlink_metadata(&target) {
                    Ok(t) if t.is_dir() => {}
                    Ok(_) => {
                        std::fs::remove_file(&target).map_err(|e| Error::io(STEP, &target, e))?;
                        std::fs::create_dir(&target).map_err(|e| Error::io(STEP, &target, e))?;
                    }
                    Err(_) => {
                        std::fs::create_dir_all(&target)
                            .map_err(|e| Error::io(STEP, &target, e))?;
                    }
                }
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))
                    .map_err(|e| Error::io(STEP, &target, e))?;
                stack.push(rel.join(&name));
                continue;
            }
            if let Some(e) = existing {
                if e.is_dir() {
                    std::fs::remove_dir_all(&to).map_err(|e| Error::io(STEP, &to, e))?;
                } else {
                    std::fs::remove_file(&to).map_err(|e| Error::io(STEP, &to, e))?;
                }
            }
            if md.file_type().is_symlink() {
                let target = std::fs::read_link(&from).map_err(|e| Error::io(STEP, &from, e))?;
                std::os::unix::fs::symlink(&target, &to).map_err(|e| Error::io(STEP, &to, e))?;
            } else if md.is_file() {
                std::fs::copy(&from, &to).map_err(|e| Error::io(STEP, &from, e))?;
                std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))
                    .map_err(|e| Error::io(STEP, &to, e))?;
            } else {
                return Err(Error::io(
                    STEP,
                    &from,
                    std::io::Error::other(
                        "neither a directory, a regular file nor a symbolic link",
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Writes `data` as the image's file `path` (absolute in the image), mode 0644, making missing
/// directories (0755) on the way.
pub fn write_image_file(root: &Path, path: &str, data: &[u8]) -> Result<(), Error> {
    let rel = Path::new(path.trim_start_matches('/'));
    let (Some(dir), Some(name)) = (rel.parent(), rel.file_name()) else {
        return Err(Error::io(
            STEP,
            rel,
            std::io::Error::other("not a file's path"),
        ));
    };
    let dir = resolve_in_root(root, dir)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&dir)
        .map_err(|e| Error::io(STEP, &dir, e))?;
    crate::pki::write_file(&dir.join(name), data, 0o644)
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

/// Builds `out` from `staging`; returns the filesystem size and the tree's (what its files,
/// directories and long links take in 4 KiB blocks).
pub fn build(staging: &Path, out: &Path, epoch: u64) -> Result<(u64, u64), Error> {
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
    Ok((size, stats.bytes))
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
    fn extra_trees_merge_over_the_image_and_never_reach_outside_it() {
        let dir = tempfile::tempdir().unwrap();
        let (root, tree, host) = (
            dir.path().join("root"),
            dir.path().join("tree"),
            dir.path().join("host"),
        );
        for d in [&root, &tree, &host] {
            std::fs::create_dir(d).unwrap();
        }
        let write = |p: PathBuf, text: &str, mode: u32| {
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        // The image: merged /usr, a file, and links that point out of the image if followed on
        // the build host.
        write(root.join("usr/sbin/nginx"), "ELF", 0o755);
        write(root.join("etc/keep"), "kept", 0o644);
        std::os::unix::fs::symlink("usr/sbin", root.join("sbin")).unwrap();
        std::os::unix::fs::symlink(host.join("victim"), root.join("etc/motd")).unwrap();
        write(host.join("victim"), "host file", 0o644);
        std::os::unix::fs::symlink("/etc", root.join("etc/abs")).unwrap();
        // The tree: nginx replaced (mode kept), a file through /sbin, one through the absolute
        // link, one over the link to the host, a new directory with its mode.
        write(
            tree.join("usr/sbin/nginx"),
            "#!/bin/sh\nsleep infinity\n",
            0o750,
        );
        write(tree.join("sbin/extra"), "x", 0o700);
        write(tree.join("etc/abs/via-link"), "y", 0o640);
        write(tree.join("etc/motd"), "hello", 0o644);
        write(tree.join("opt/new/file"), "z", 0o600);
        std::fs::set_permissions(tree.join("opt/new"), std::fs::Permissions::from_mode(0o750))
            .unwrap();
        std::os::unix::fs::symlink("file", tree.join("opt/new/link")).unwrap();
        copy_tree(&tree, &root).unwrap();

        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
        let nginx = root.join("usr/sbin/nginx");
        assert_eq!(
            std::fs::read_to_string(&nginx).unwrap(),
            "#!/bin/sh\nsleep infinity\n"
        );
        assert_eq!(mode(&nginx), 0o750);
        assert_eq!(std::fs::symlink_metadata(&nginx).unwrap().uid(), 0);
        assert!(std::fs::symlink_metadata(root.join("sbin"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(mode(&root.join("usr/sbin/extra")), 0o700);
        assert_eq!(
            std::fs::read_to_string(root.join("etc/via-link")).unwrap(),
            "y"
        );
        assert_eq!(
            std::fs::read_to_string(host.join("victim")).unwrap(),
            "host file"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("etc/motd")).unwrap(),
            "hello"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("etc/keep")).unwrap(),
            "kept"
        );
        assert_eq!(mode(&root.join("opt/new")), 0o750);
        assert_eq!(mode(&root.join("opt/new/file")), 0o600);
        assert_eq!(
            std::fs::read_link(root.join("opt/new/link")).unwrap(),
            Path::new("file")
        );
        // `..` and absolute links stay inside the image.
        assert_eq!(
            resolve_in_root(&root, Path::new("../../etc/abs/../sbin/x")).unwrap(),
            root.join("usr/sbin/x")
        );

        // A tree that is not a directory is named.
        let e = copy_tree(&root.join("etc/keep"), &root).unwrap_err();
        assert!(e.to_string().contains("etc/keep: not a directory"), "{e}");
    }

    #[test]
    fn builder_files_are_written_with_their_directories() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("usr")).unwrap();
        std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
        write_image_file(root, api::files::IMAGE_VERSION_FILE, b"0.2.0\n").unwrap();
        write_image_file(root, "/lib/x/y", b"y").unwrap();
        let version = root.join(api::files::IMAGE_VERSION_FILE.trim_start_matches('/'));
        assert_eq!(std::fs::read(&version).unwrap(), b"0.2.0\n");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&version), 0o644);
        assert_eq!(mode(version.parent().unwrap()), 0o755);
        assert_eq!(std::fs::read(root.join("usr/lib/x/y")).unwrap(), b"y");
    }

    #[test]
    fn fs_size_rounds_to_4_mib_with_slack() {
        assert_eq!(fs_size(0), 48 * MIB);
        assert_eq!(fs_size(400 * MIB), 488 * MIB);
        assert_eq!(fs_size(401 * MIB) % (4 * MIB), 0);
    }
}
