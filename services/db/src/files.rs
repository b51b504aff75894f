//! How the agent and the `db` commands handle files: written whole or not at all, a secret
//! never readable by anyone else, not even for a moment.

use std::fs;
use std::path::Path;

use crate::Error;

/// Atomic replace with the file's final mode from its first byte ([`api::fsio::write_atomic`]).
pub(crate) fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), Error> {
    api::fsio::write_atomic(path, contents.as_bytes(), mode, None)
        .map_err(Error::io("writing", path))
}

/// A file holding a secret: mode 0600 from its creation. A file already there (an earlier
/// start's) is replaced, never reused or written through.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    api::fsio::write_atomic(path, bytes, 0o600, None).map_err(Error::io("writing", path))
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
