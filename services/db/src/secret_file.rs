//! The cluster secret's file ([`api::secret`] is its format): read, or made once.

use std::fs;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::time::Duration;

use api::secret::{format_secret, parse_secret, SECRET_LEN};

use crate::Error;

/// Reads the cluster secret, creating it (32 random bytes as hex, mode 0600) when absent. On
/// an image the image-builder put it in the seed; on a developer machine the nodes of one
/// config share the file, and the first to start makes it.
pub fn load_or_create(path: &Path) -> Result<[u8; SECRET_LEN], Error> {
    match fs::read_to_string(path) {
        Ok(text) => {
            return parse_secret(&text).map_err(|detail| Error::Invalid {
                path: path.to_path_buf(),
                detail: format!("cluster secret: {detail}"),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("reading the cluster secret", path)(e)),
    }
    let mut bytes = [0u8; SECRET_LEN];
    let urandom = Path::new("/dev/urandom");
    fs::File::open(urandom)
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(Error::io("reading", urandom))?;
    if let Some(dir) = path.parent() {
        crate::files::create_dir(dir)?;
    }
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(mut f) => {
            f.write_all(format_secret(&bytes).as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(Error::io("writing", path))?;
            tracing::info!(path = %path.display(), "created a new cluster secret");
            Ok(bytes)
        }
        // Another node on this machine created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::thread::sleep(Duration::from_millis(100));
            load_or_create(path)
        }
        Err(e) => Err(Error::io(
            "creating the cluster secret (or pass --secret-file)",
            path,
        )(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn the_secret_is_made_once_private_and_then_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("cluster.secret");
        let made = load_or_create(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(load_or_create(&path).unwrap(), made);
        fs::write(&path, "not hex\n").unwrap();
        let e = load_or_create(&path).unwrap_err().to_string();
        assert!(
            e.contains("cluster.secret") && e.contains("cluster secret"),
            "{e}"
        );
    }
}
