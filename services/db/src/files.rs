//! How the agent and the node's database setup write files: whole or not at all, and a secret
//! never readable by anyone else, not even for a moment.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

use nix::unistd::{Gid, Uid};

use crate::Error;

/// Atomic replace: a temporary file in the same directory, created anew with its final mode
/// (one a crash left behind is removed, never written through), synced, renamed over `path`,
/// the directory synced. The umask may narrow a public mode; the file gets its bits back
/// before its first byte.
pub(crate) fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), Error> {
    let dir = path.parent().ok_or_else(|| Error::Invalid {
        path: path.to_path_buf(),
        detail: "a file path without a directory".into(),
    })?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp"));
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(Error::io("removing", &tmp)(e))
        }
        _ => {}
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(Error::io("creating", &tmp))?;
    if mode & 0o077 != 0 {
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(Error::io("chmod", &tmp))?;
    }
    f.write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(Error::io("writing", &tmp))?;
    fs::rename(&tmp, path).map_err(Error::io(format!("renaming {} to", tmp.display()), path))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io("syncing", dir))
}

/// A new file holding a secret: mode 0600 from its creation, then handed to `owner`. A file
/// already there (an earlier start's) is replaced, never reused.
pub(crate) fn write_private(
    path: &Path,
    bytes: &[u8],
    owner: Option<(Uid, Gid)>,
) -> Result<(), Error> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(Error::io("removing", path)(e))
        }
        _ => {}
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(Error::io("creating", path))?;
    if let Some((uid, gid)) = owner {
        nix::unistd::fchown(&f, Some(uid), Some(gid))
            .map_err(|e| Error::io("chown", path)(e.into()))?;
    }
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(Error::io("writing", path))
}

/// A directory and its parents.
pub(crate) fn create_dir(path: &Path) -> Result<(), Error> {
    fs::create_dir_all(path).map_err(Error::io("creating", path))
}
