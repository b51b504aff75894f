//! Where a node keeps things: the directories and files of `appliance run` (everything below
//! one state directory) and of an image (the data partition, `/run`, the seed). A leaf: it
//! imports nothing else of this crate.

use std::path::{Path, PathBuf};

use api::files;

/// Where `appliance init` mounts the data partition; the image's state directory is below it.
pub const DATA_MOUNT: &str = "/data";
/// File name of a developer machine's cluster CA key in a state directory (see
/// [`Layout::dev_ca`]).
pub const DEV_CA_FILE: &str = "cluster-ca.secret";
/// The control socket in a developer machine's state directory.
const DEV_SOCKET: &str = api::control::SOCKET_FILE;
/// The node's TLS files in a developer machine's state directory (issued at every start).
const DEV_TLS_DIR: &str = "tls";

/// The directory of the uploaded certificate the balancer serves (derived from the settings,
/// in the run directory: the settings store keeps the only persistent copy).
pub fn served_tls_dir(run: &Path) -> PathBuf {
    run.join("served-tls")
}

/// The uploaded chain's file name in [`served_tls_dir`].
pub const SERVED_CERT: &str = "certificate.pem";
/// The uploaded key's file name in [`served_tls_dir`].
pub const SERVED_KEY: &str = "key.pem";

/// The uploaded chain and key in [`served_tls_dir`].
pub fn served_tls_files(run: &Path) -> (PathBuf, PathBuf) {
    let dir = served_tls_dir(run);
    (dir.join(SERVED_CERT), dir.join(SERVED_KEY))
}

/// The alert webhook from the settings (one line; absent: none), for the log monitor.
pub fn webhook_file(run: &Path) -> PathBuf {
    run.join("webhook")
}

/// Where a node keeps things.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// Persistent: MariaDB datadir, state DB, boot counter. The data partition on an image.
    pub state: PathBuf,
    /// Runtime, recreated at every start: rendered configs, sockets, pid files.
    pub run: PathBuf,
    /// The supervisor's control socket.
    pub socket: PathBuf,
    /// The cluster secret every node shares (database passwords derive from it; see
    /// `api::secret`). Created when absent, which suits one node; a cluster provisions it.
    pub secret: PathBuf,
    /// The node's TLS files (`ca.crt`, `node.crt`, `node.key`, see `api::files`): the seed's
    /// on an image.
    pub tls: PathBuf,
    /// A developer machine's own cluster CA key: the node's TLS files are issued from it at
    /// every start. `None` on an image, whose seed holds them.
    pub dev_ca: Option<PathBuf>,
}

impl Layout {
    /// `appliance run --state-dir DIR`: everything below DIR.
    pub fn dev(state_dir: &Path) -> Layout {
        Layout {
            state: state_dir.to_path_buf(),
            run: state_dir.join(files::DEV_RUN_DIR),
            socket: state_dir.join(DEV_SOCKET),
            secret: state_dir.join(api::secret::SECRET_FILE),
            tls: state_dir.join(DEV_TLS_DIR),
            dev_ca: Some(state_dir.join(DEV_CA_FILE)),
        }
    }

    /// On the image: persistent state on the data partition, runtime files on /run.
    pub fn image() -> Layout {
        let seed = Path::new(files::SEED_MOUNT);
        Layout {
            state: PathBuf::from(files::IMAGE_STATE_DIR),
            run: PathBuf::from(files::IMAGE_RUN_DIR),
            socket: PathBuf::from(api::control::DEFAULT_SOCKET),
            // The secret lives in the settings store; the node plan puts this copy (root's,
            // 0600, tmpfs) where the db-agent reads it.
            secret: PathBuf::from(files::IMAGE_RUN_DIR).join(api::secret::SECRET_FILE),
            tls: seed.join(files::SEED_TLS_DIR),
            dev_ca: None,
        }
    }

    /// The seed's TLS directory for `node`: a generic image's seed has one per node.
    pub fn seed_tls_for(&self, node: &str) -> PathBuf {
        let per_node = self.tls.join(node);
        match per_node.join(files::NODE_CERT).exists() {
            true => per_node,
            false => self.tls.clone(),
        }
    }

    /// keepalived's notify FIFO and track files, the balancer's view of the floating IP.
    pub fn vip_dir(&self) -> PathBuf {
        self.run.join(api::vip::RUN_SUBDIR)
    }

    /// MariaDB's directories and configuration file.
    pub fn db_paths(&self) -> db::Paths {
        db::Paths {
            datadir: self.state.join("mysql"),
            run_dir: self.run.join("mysqld"),
            config_file: self.run.join("etc/my.cnf"),
        }
    }

    /// The same layout with every path absolute (resolved against the current directory):
    /// the node's services get these paths as arguments and may run elsewhere.
    pub fn absolute(&self) -> std::io::Result<Layout> {
        Ok(Layout {
            state: std::path::absolute(&self.state)?,
            run: std::path::absolute(&self.run)?,
            socket: std::path::absolute(&self.socket)?,
            secret: std::path::absolute(&self.secret)?,
            tls: std::path::absolute(&self.tls)?,
            dev_ca: self
                .dev_ca
                .as_deref()
                .map(std::path::absolute)
                .transpose()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_keeps_state_on_the_data_partition_and_reads_the_seed() {
        let image = Layout::image();
        assert!(image.state.starts_with(DATA_MOUNT), "{image:?}");
        assert_eq!(image.tls, Path::new("/seed/tls"));
        assert_eq!(image.secret, Path::new("/run/tandem/cluster.secret"));
        assert_eq!(image.vip_dir(), Path::new("/run/tandem/vip"));
        assert_eq!(image.absolute().unwrap(), image);

        let dev = Layout::dev(Path::new("/s"));
        assert_eq!(
            (dev.run.as_path(), dev.socket.as_path(), dev.tls.as_path()),
            (
                Path::new("/s/run"),
                Path::new("/s/control.sock"),
                Path::new("/s/tls")
            )
        );
        let relative = Layout::dev(Path::new("s")).absolute().unwrap();
        assert!(relative.dev_ca.unwrap().is_absolute());
        assert!(relative.run.ends_with("s/run"));
    }
}
