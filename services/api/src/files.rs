//! File and directory names that more than one crate uses: the seed the image-builder writes
//! and the node reads, the node's TLS files, names in a node's state and runtime directories,
//! and the image's fixed directories. Each doc line says who writes and who reads.
//!
//! Names that belong to one format live beside it: the control socket
//! ([`crate::control::SOCKET_FILE`]), the state DB ([`crate::events::STATE_DB_FILE`]), the
//! db-agent's status ([`crate::db::STATUS_FILE`]), the cluster secret
//! ([`crate::secret::SECRET_FILE`]) and the floating IP's run directory
//! ([`crate::vip::RUN_SUBDIR`]).

use std::fmt;
use std::path::Path;

/// The name of one file or directory inside a directory both sides know: never a path (no
/// `/`), so `dir.join(name)` stays inside `dir`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileName(&'static str);

impl FileName {
    /// A name of this crate's formats (a single path component).
    pub(crate) const fn new(name: &'static str) -> FileName {
        FileName(name)
    }

    /// The name as text.
    pub const fn as_str(self) -> &'static str {
        self.0
    }
}

impl AsRef<Path> for FileName {
    fn as_ref(&self) -> &Path {
        Path::new(self.0)
    }
}

impl fmt::Display for FileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

// Partitions of the boot disk: named (GPT partition names) by the image-builder
// (`image-builder/src/layout.rs`), found by name by `appliance init` on the disk it booted from.

/// The EFI system partition (systemd-boot, the boot entries `init` blesses).
pub const PARTITION_ESP: &str = "esp";
/// The seed: the node's identity, cluster config, secret and TLS files (read-only).
pub const PARTITION_SEED: &str = "seed";
/// The data partition: the node's persistent state (formatted by `init` on the first boot
/// only, see `storage`).
pub const PARTITION_DATA: &str = "data";

// The seed partition: written by the image-builder (`image-builder/src/lib.rs`), mounted
// read-only by `appliance init`.

/// Where `appliance init` mounts the seed; `appliance` commands (and the admin server's peer
/// client) read the node's identity and TLS files below it.
pub const SEED_MOUNT: &str = "/seed";
/// The cluster's `cluster.toml` in the seed: written by the image-builder, read by every
/// `appliance` command that runs on an image without `--config`.
pub const SEED_CLUSTER_CONFIG: FileName = FileName("cluster.toml");
/// The node's TLS directory in the seed (files: [`CA_CERT`], [`NODE_CERT`], [`NODE_KEY`],
/// [`DB_CERT`], [`DB_KEY`]): written by the image-builder, read by the node plan (MariaDB's
/// and the admin server's copies) and the peer client. A generic image's seed has one such
/// directory per node below it, named after the node.
pub const SEED_TLS_DIR: FileName = FileName("tls");

// A node's TLS directory: the seed's on an image (the image-builder's `pki`), issued at every
// start from a development CA under `appliance run`.

/// The cluster CA's certificate: what every node, MariaDB client and peer trusts.
pub const CA_CERT: FileName = FileName("ca.crt");
/// The node's certificate: its admin port's server certificate and its client identity
/// towards the peers' admin API (read by the admin server and the peer client).
pub const NODE_CERT: FileName = FileName("node.crt");
/// The node certificate's key (0600, root's; the admin server gets a copy of its own).
pub const NODE_KEY: FileName = FileName("node.key");
/// MariaDB's own certificate (server authentication only): written by the image-builder,
/// given to MariaDB by the node plan instead of the node's when it and [`DB_KEY`] exist.
pub const DB_CERT: FileName = FileName("db.crt");
/// [`DB_CERT`]'s key (0600; MariaDB's user gets a copy).
pub const DB_KEY: FileName = FileName("db.key");

// A node's state directory (`/data/tandem` on an image, `--state-dir` under `appliance run`).

/// The boot counter (a decimal number and a newline): written by the node plan at every start
/// (temporary file, synced, renamed), shown on the node's page.
pub const BOOT_COUNT: FileName = FileName("boot-count");
/// The primary after a switchover (a node name): written by the db-agent when it sees the new
/// primary replicated, read by the node plan (and the agent) over the one `cluster.toml` names.
pub const DB_PRIMARY: FileName = FileName("db-primary");
/// The balancer's directory: made (0711, the balancer's) by the node plan, passed to the
/// balancer as `--state-dir`; the log monitor reads the certificate it serves from it.
pub const BALANCER_STATE_DIR: FileName = FileName("balancer");
/// The admin server's directory: made (0700, the admin server's) by the node plan; the admin
/// server keeps its self-signed certificate there on a machine without a seed.
pub const ADMIN_STATE_DIR: FileName = FileName("admin");
/// The running node's name (one line) in its run directory: written by the node plan (on a
/// generic image the name comes from the first-boot wizard), read by `appliance` commands
/// without `--node`.
pub const RUN_NODE_NAME: FileName = FileName("node");
/// The runtime directory inside a developer machine's state directory (`appliance run`):
/// made afresh by the node plan at every start; the db-agent's status, the VIP files and the
/// rendered configs are below it. The log monitor, the db commands and the admin server look
/// for them there when given only a state directory.
pub const DEV_RUN_DIR: FileName = FileName("run");

// The balancer's state directory.

/// The balancer's TLS directory, inside [`BALANCER_STATE_DIR`].
pub const BALANCER_TLS_DIR: FileName = FileName("tls");
/// The balancer's persisted self-signed certificate in [`BALANCER_TLS_DIR`], served when the
/// cluster names no certificate: written by the balancer, its expiry watched by the log
/// monitor.
pub const BALANCER_SELF_SIGNED_CERT: FileName = FileName("self-signed.crt");
/// Its key (0600, the balancer's own).
pub const BALANCER_SELF_SIGNED_KEY: FileName = FileName("self-signed.key");

// The web root.

/// The node's own page (name, address, database role, boot count): written into nginx's web
/// root by the node plan, fetched as `/node.html` by the end-to-end tests and the failover
/// probe (`qemu`).
pub const NODE_PAGE: FileName = FileName("node.html");

// An image's fixed directories.

/// A node's persistent state on an image (the data partition's `tandem` directory): the node
/// plan makes it; the log monitor, the db commands and the admin server default to it.
pub const IMAGE_STATE_DIR: &str = "/data/tandem";
/// A node's runtime directory on an image (tmpfs, made afresh at every start by the node
/// plan); the db commands and the admin server default to it.
pub const IMAGE_RUN_DIR: &str = "/run/tandem";

/// The image's release (one line: a version such as `0.2.0`, then a newline): written into
/// the root filesystem by the image-builder (`build --version`), read by `appliance --version`,
/// the status JSON, `/metrics` and the update installer (the running version a bundle must be
/// newer than).
pub const IMAGE_VERSION_FILE: &str = "/usr/lib/tandem/version";
/// The trusted update-signing keys (a keyring: one public key per line, 64 hex digits, `#`
/// comments): written into the root filesystem by the image-builder, read by the update
/// installer. More than one key, so a key can be rotated.
pub const IMAGE_UPDATE_KEYRING: &str = "/usr/lib/tandem/update-keys.pub";
/// The balancer's self-signed certificate and key below its state directory (what the balancer
/// writes and the log monitor watches).
pub fn balancer_self_signed(balancer_state_dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let tls = balancer_state_dir.join(BALANCER_TLS_DIR);
    (
        tls.join(BALANCER_SELF_SIGNED_CERT),
        tls.join(BALANCER_SELF_SIGNED_KEY),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_single_path_components() {
        let names = [
            SEED_CLUSTER_CONFIG,
            RUN_NODE_NAME,
            SEED_TLS_DIR,
            CA_CERT,
            NODE_CERT,
            NODE_KEY,
            DB_CERT,
            DB_KEY,
            BOOT_COUNT,
            DB_PRIMARY,
            BALANCER_STATE_DIR,
            ADMIN_STATE_DIR,
            DEV_RUN_DIR,
            BALANCER_TLS_DIR,
            BALANCER_SELF_SIGNED_CERT,
            BALANCER_SELF_SIGNED_KEY,
            NODE_PAGE,
        ];
        for name in names {
            let joined = Path::new("/d").join(name);
            let parts: Vec<_> = joined.components().skip(2).collect();
            assert_eq!(parts.len(), 1, "{name}");
            assert_eq!(parts[0].as_os_str(), name.as_str(), "{name}");
            assert!(!name.as_str().starts_with('.'), "{name}");
        }
        for label in [PARTITION_ESP, PARTITION_SEED, PARTITION_DATA] {
            assert!(label.bytes().all(|b| b.is_ascii_lowercase()), "{label}");
        }
        for dir in [
            SEED_MOUNT,
            IMAGE_STATE_DIR,
            IMAGE_RUN_DIR,
            IMAGE_VERSION_FILE,
            IMAGE_UPDATE_KEYRING,
        ] {
            assert!(Path::new(dir).is_absolute(), "{dir}");
        }
        assert_eq!(
            balancer_self_signed(Path::new("/s/balancer")).0,
            Path::new("/s/balancer/tls/self-signed.crt")
        );
    }
}
