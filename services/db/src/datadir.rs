//! A fresh MariaDB datadir on an image, made whole or not at all (`appliance db-init`).
//!
//! The datadir comes from a template the image build made once with `mariadb-install-db`
//! (`rootfs/hooks/customize.sh`: the system tables, no test database, root by Unix socket
//! only) and packed as a zstd tar: unpacking it takes a fraction of a second where
//! `mariadb-install-db` took 17 s under emulation. (A developer machine, without a template,
//! runs `mariadb-install-db` itself: [`crate::install_argv`].)
//!
//! The datadir is made beside the real one (`.<name>.new`), flushed to disk, and
//! renamed over it in one step: a power cut at any moment leaves no datadir (the next boot
//! starts again) or a complete one, never the half-made one a killed `mariadb-install-db`
//! leaves, which MariaDB refuses to start from. A non-empty datadir without the system tables
//! (such a leftover) is moved aside to `<name>.incomplete`, not deleted.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Where the image keeps the datadir template (made by `rootfs/hooks/customize.sh`).
pub const TEMPLATE: &str = "/usr/lib/tandem/mariadb-datadir.tar.zst";

/// What [`prepare`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The datadir already held the system tables: nothing was touched.
    AlreadyInitialised,
    /// A fresh datadir is in place.
    Made {
        /// Bytes of file data written (holes not counted).
        written: u64,
        /// Where a half-made datadir found in the way was moved.
        moved_aside: Option<PathBuf>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum DatadirError {
    #[error("{what} {}: {source}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("datadir template {}: entry {entry:?}: {why}", .template.display())]
    BadEntry {
        template: PathBuf,
        entry: String,
        why: &'static str,
    },
    #[error("datadir {}: has no parent directory", .0.display())]
    NoParent(PathBuf),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> DatadirError + 'a {
    move |source| DatadirError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The staging directory beside `datadir`, and where a half-made one is moved.
pub fn siblings(datadir: &Path) -> Result<(PathBuf, PathBuf), DatadirError> {
    let parent = datadir
        .parent()
        .ok_or_else(|| DatadirError::NoParent(datadir.to_path_buf()))?;
    let name = datadir
        .file_name()
        .ok_or_else(|| DatadirError::NoParent(datadir.to_path_buf()))?
        .to_string_lossy();
    Ok((
        parent.join(format!(".{name}.new")),
        parent.join(format!("{name}.incomplete")),
    ))
}

/// Make `datadir` an initialised datadir from `template` (a zstd tar of one, its entries
/// relative to the datadir) unless it already is one; files end up owned by `owner` (uid, gid)
/// when given. The supervisor runs this as root with `CAP_CHOWN` (to give the files away) and
/// `CAP_DAC_READ_SEARCH` (to look inside MariaDB's datadir) only. A datadir it cannot look
/// into is an error, never taken for an empty one: that would move a working one aside.
pub fn prepare(
    datadir: &Path,
    template: &Path,
    owner: Option<(u32, u32)>,
) -> Result<Outcome, DatadirError> {
    if initialised(datadir)? {
        return Ok(Outcome::AlreadyInitialised);
    }
    let (staging, aside) = siblings(datadir)?;
    let parent = staging.parent().unwrap_or(Path::new("/")).to_path_buf();
    if staging.symlink_metadata().is_ok() {
        // An earlier attempt cut short, perhaps already given to `owner`.
        remove_tree(&staging)?;
    }
    fs::DirBuilder::new()
        .mode(0o750)
        .create(&staging)
        .map_err(io_err("creating", &staging))?;
    let written = unpack(template, &staging)?;
    // Everything made so far reaches the disk before the rename makes it the datadir.
    sync_fs(&parent)?;
    if let Some((uid, gid)) = owner {
        chown_tree(&staging, uid, gid)?;
    }
    let occupied = match fs::read_dir(datadir) {
        Ok(mut entries) => entries.next().is_some(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(io_err("reading", datadir)(e)),
    };
    let moved_aside = match occupied {
        true => {
            if aside.symlink_metadata().is_ok() {
                remove_tree(&aside)?;
            }
            fs::rename(datadir, &aside).map_err(io_err("moving a half-made datadir", datadir))?;
            tracing::warn!(datadir = %datadir.display(), moved_to = %aside.display(), "a datadir without system tables was in the way; moved aside");
            Some(aside)
        }
        false => None,
    };
    // An empty datadir (the node plan makes the directory) is replaced in the same step.
    fs::rename(&staging, datadir)
        .map_err(io_err("renaming the new datadir into place", datadir))?;
    sync_fs(&parent)?;
    Ok(Outcome::Made {
        written,
        moved_aside,
    })
}

/// [`crate::is_initialised`], with a path that cannot be looked at an error rather than "no".
fn initialised(datadir: &Path) -> Result<bool, DatadirError> {
    for marker in crate::INITIALISED_MARKERS {
        let path = datadir.join(marker);
        if path.try_exists().map_err(io_err("looking at", &path))? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Remove a tree this process made, even once it was given to another user: each directory is
/// taken back (`CAP_CHOWN`) before it is looked into, since root without `CAP_DAC_OVERRIDE`
/// may neither list nor empty a directory of mode 0700 that is not its own.
fn remove_tree(dir: &Path) -> Result<(), DatadirError> {
    let me = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    take_back(dir, me)?;
    fs::remove_dir_all(dir).map_err(io_err("removing", dir))
}

fn take_back(dir: &Path, (uid, gid): (u32, u32)) -> Result<(), DatadirError> {
    chown(dir, uid, gid)?;
    for entry in fs::read_dir(dir).map_err(io_err("reading", dir))? {
        let entry = entry.map_err(io_err("reading", dir))?;
        let path = entry.path();
        if entry
            .file_type()
            .map_err(io_err("reading", &path))?
            .is_dir()
        {
            take_back(&path, (uid, gid))?;
        }
    }
    Ok(())
}

fn sync_fs(dir: &Path) -> Result<(), DatadirError> {
    let f = File::open(dir).map_err(io_err("opening", dir))?;
    nix::unistd::syncfs(&f).map_err(|e| DatadirError::Io {
        what: "flushing the filesystem of",
        path: dir.to_path_buf(),
        source: e.into(),
    })
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), DatadirError> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(io_err("chown", path))
}

/// Children before their directory: once a directory is the owner's (mode 0700), root without
/// `CAP_DAC_OVERRIDE` can no longer look inside it.
fn chown_tree(dir: &Path, uid: u32, gid: u32) -> Result<(), DatadirError> {
    for entry in fs::read_dir(dir).map_err(io_err("reading", dir))? {
        let entry = entry.map_err(io_err("reading", dir))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(io_err("reading", &path))?;
        if kind.is_dir() {
            chown_tree(&path, uid, gid)?;
        } else {
            chown(&path, uid, gid)?;
        }
    }
    chown(dir, uid, gid)
}

/// A relative path of plain components, or why not.
fn clean(entry: &Path) -> Result<PathBuf, &'static str> {
    let mut out = PathBuf::new();
    for c in entry.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            _ => return Err("not a plain relative path"),
        }
    }
    Ok(out)
}

/// Unpack the template's directories and regular files into `dest` (nothing else is
/// accepted). Runs of zeros become holes, as InnoDB's preallocated files are mostly zeros.
fn unpack(template: &Path, dest: &Path) -> Result<u64, DatadirError> {
    let file = File::open(template).map_err(io_err("opening the datadir template", template))?;
    let decoder = zstd::stream::read::Decoder::new(file)
        .map_err(io_err("reading the datadir template", template))?;
    let mut archive = tar::Archive::new(decoder);
    let bad = |entry: &Path, why: &'static str| DatadirError::BadEntry {
        template: template.to_path_buf(),
        entry: entry.display().to_string(),
        why,
    };
    let mut written = 0;
    for entry in archive
        .entries()
        .map_err(io_err("reading the datadir template", template))?
    {
        let mut entry = entry.map_err(io_err("reading the datadir template", template))?;
        let name = entry
            .path()
            .map_err(io_err("reading the datadir template", template))?
            .into_owned();
        let rel = clean(&name).map_err(|why| bad(&name, why))?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        let path = dest.join(&rel);
        let mode = entry
            .header()
            .mode()
            .map_err(io_err("reading the datadir template", template))?
            & 0o777;
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&path)
                    .map_err(io_err("creating", &path))?;
                fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                    .map_err(io_err("chmod", &path))?;
            }
            tar::EntryType::Regular => {
                let mut out = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode)
                    .open(&path)
                    .map_err(io_err("creating", &path))?;
                written += copy_sparse(&mut entry, &mut out).map_err(io_err("writing", &path))?;
                out.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(io_err("chmod", &path))?;
            }
            _ => return Err(bad(&name, "neither a directory nor a regular file")),
        }
    }
    Ok(written)
}

const BLOCK: usize = 64 * 1024;

/// Copy `from` into `to`, seeking over all-zero blocks; the bytes actually written.
fn copy_sparse(from: &mut impl Read, to: &mut File) -> io::Result<u64> {
    let mut buf = vec![0u8; BLOCK];
    let mut len = 0u64;
    let mut written = 0u64;
    loop {
        let mut filled = 0;
        while filled < BLOCK {
            match from.read(&mut buf[filled..])? {
                0 => break,
                n => filled += n,
            }
        }
        if filled == 0 {
            break;
        }
        let block = &buf[..filled];
        if block.iter().all(|&b| b == 0) {
            to.seek(SeekFrom::Current(filled as i64))?;
        } else {
            to.write_all(block)?;
            written += filled as u64;
        }
        len += filled as u64;
        if filled < BLOCK {
            break;
        }
    }
    to.set_len(len)?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A template holding `mysql/global_priv.MAI` (what `is_initialised` looks for), a
    /// mostly-zero `ibdata1` and a directory.
    fn template(dir: &Path) -> PathBuf {
        let path = dir.join("t.tar.zst");
        let mut b = tar::Builder::new(
            zstd::stream::write::Encoder::new(File::create(&path).unwrap(), 3).unwrap(),
        );
        let mut add = |name: &str, mode: u32, data: &[u8], kind: tar::EntryType| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_size(data.len() as u64);
            h.set_cksum();
            b.append_data(&mut h, name, data).unwrap();
        };
        add("./mysql", 0o700, b"", tar::EntryType::Directory);
        add(
            "./mysql/global_priv.MAI",
            0o660,
            b"aria",
            tar::EntryType::Regular,
        );
        let mut ibdata = vec![0u8; 3 * BLOCK + 10];
        ibdata[BLOCK + 5] = 7;
        add("./ibdata1", 0o660, &ibdata, tar::EntryType::Regular);
        b.into_inner().unwrap().finish().unwrap();
        path
    }

    #[test]
    fn a_template_becomes_the_datadir_in_one_rename_with_holes_for_zeros() {
        let tmp = tempfile::tempdir().unwrap();
        let t = template(tmp.path());
        let datadir = tmp.path().join("mysql");
        fs::create_dir(&datadir).unwrap(); // the node plan makes it, empty
        let out = prepare(&datadir, &t, None).unwrap();
        assert_eq!(
            out,
            Outcome::Made {
                written: (4 + BLOCK) as u64,
                moved_aside: None
            }
        );
        assert!(crate::is_initialised(&datadir));
        let ib = fs::read(datadir.join("ibdata1")).unwrap();
        assert_eq!(ib.len(), 3 * BLOCK + 10);
        assert_eq!(ib[BLOCK + 5], 7);
        assert_eq!(ib.iter().filter(|&&b| b != 0).count(), 1);
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&datadir.join("mysql")), 0o700);
        assert_eq!(mode(&datadir.join("ibdata1")), 0o660);
        assert!(!siblings(&datadir).unwrap().0.exists());
        // Once made, never touched again.
        fs::write(datadir.join("mine"), b"x").unwrap();
        assert_eq!(
            prepare(&datadir, &t, None).unwrap(),
            Outcome::AlreadyInitialised
        );
        assert!(datadir.join("mine").exists());
    }

    #[test]
    fn an_earlier_attempt_and_a_half_made_datadir_are_cleared_not_lost() {
        let tmp = tempfile::tempdir().unwrap();
        let t = template(tmp.path());
        let datadir = tmp.path().join("mysql");
        let (staging, aside) = siblings(&datadir).unwrap();
        // A cut while unpacking (already given to MariaDB's user, mode 0700), and a killed
        // mariadb-install-db's leftovers.
        fs::create_dir_all(staging.join("mysql")).unwrap();
        fs::write(staging.join("ibdata1"), b"half").unwrap();
        for dir in [staging.join("mysql"), staging.clone()] {
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
            if nix::unistd::geteuid().is_root() {
                std::os::unix::fs::lchown(&dir, Some(65534), Some(65534)).unwrap();
            }
        }
        fs::create_dir_all(&datadir).unwrap();
        fs::write(datadir.join("ibdata1"), b"half-made").unwrap();
        let out = prepare(&datadir, &t, None).unwrap();
        assert_eq!(
            out,
            Outcome::Made {
                written: (4 + BLOCK) as u64,
                moved_aside: Some(aside.clone())
            }
        );
        assert!(crate::is_initialised(&datadir));
        assert_eq!(fs::read(aside.join("ibdata1")).unwrap(), b"half-made");
        assert!(!staging.exists());
    }

    #[test]
    fn a_template_with_a_path_outside_or_a_link_is_refused_and_nothing_moves() {
        for (name, kind) in [
            ("../evil", tar::EntryType::Regular),
            ("/etc/evil", tar::EntryType::Regular),
            ("./link", tar::EntryType::Symlink),
        ] {
            let tmp = tempfile::tempdir().unwrap();
            let path = tmp.path().join("bad.tar.zst");
            let mut raw = Vec::new();
            {
                let mut b = tar::Builder::new(&mut raw);
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(kind);
                h.set_size(0);
                h.set_mode(0o644);
                // Written raw: the builder itself refuses `..` and absolute names.
                h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
                if kind == tar::EntryType::Symlink {
                    h.set_link_name("/etc/passwd").unwrap();
                }
                h.set_cksum();
                b.append(&h, io::empty()).unwrap();
                b.finish().unwrap();
            }
            fs::write(&path, zstd::encode_all(&raw[..], 3).unwrap()).unwrap();
            let datadir = tmp.path().join("data").join("mysql");
            fs::create_dir_all(&datadir).unwrap();
            let e = prepare(&datadir, &path, None).unwrap_err();
            assert!(matches!(e, DatadirError::BadEntry { .. }), "{name}: {e}");
            assert!(e.to_string().contains(name.trim_start_matches("./")), "{e}");
            assert!(!crate::is_initialised(&datadir));
            assert!(fs::read_dir(&datadir).unwrap().next().is_none());
            assert!(!tmp.path().join("evil").exists());
        }
    }
}
