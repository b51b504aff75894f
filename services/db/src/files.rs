//! How the agent and the `db` commands handle files: written whole or not at all, a secret
//! never readable by anyone else, not even for a moment.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

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

/// A new file holding a secret: mode 0600 from its creation. A file already there (an earlier
/// start's) is replaced, never reused.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), Error> {
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
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(Error::io("writing", path))
}

/// A directory and its parents.
pub(crate) fn create_dir(path: &Path) -> Result<(), Error> {
    fs::create_dir_all(path).map_err(Error::io("creating", path))
}

/// The cluster secret ([`api::secret`]): the node plan made it (or the image-builder put it in
/// the seed) before the agent starts.
pub(crate) fn read_secret(path: &Path) -> Result<[u8; api::secret::SECRET_LEN], Error> {
    let text = fs::read_to_string(path).map_err(Error::io("reading the cluster secret", path))?;
    api::secret::parse_secret(&text).map_err(|detail| Error::Invalid {
        path: path.to_path_buf(),
        detail: format!("cluster secret: {detail}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn files_are_replaced_whole_and_secrets_stay_private() {
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o777;
        let file = dir.path().join("db-primary");
        write_file(&file, "server1\n", 0o644).unwrap();
        write_file(&file, "server2\n", 0o644).unwrap();
        assert_eq!(fs::read_to_string(&file).unwrap(), "server2\n");
        assert_eq!(mode(&file), 0o644);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file left"
        );

        let private = dir.path().join("admin.cnf");
        fs::write(&private, "stale").unwrap();
        write_private(&private, b"[client]\n").unwrap();
        assert_eq!(
            (mode(&private), fs::read(&private).unwrap()),
            (0o600, b"[client]\n".to_vec())
        );

        let secret = dir.path().join("cluster.secret");
        let e = read_secret(&secret).unwrap_err().to_string();
        assert!(
            e.contains("reading the cluster secret") && e.contains("cluster.secret"),
            "{e}"
        );
        fs::write(
            &secret,
            api::secret::format_secret(&[7; api::secret::SECRET_LEN]),
        )
        .unwrap();
        assert_eq!(read_secret(&secret).unwrap(), [7; api::secret::SECRET_LEN]);
        fs::write(&secret, "short\n").unwrap();
        let e = read_secret(&secret).unwrap_err().to_string();
        assert!(e.contains("cluster.secret: cluster secret"), "{e}");
    }
}
