//! The node's secrets as files: the cluster secret (created on a developer machine when
//! absent), the node's TLS files read into memory for the node plan, and on a developer machine
//! a development CA that issues them. A leaf: it imports nothing else of this crate but the
//! file helpers.

use std::fmt;
use std::fs;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use api::files::{CA_CERT, DB_CERT, DB_KEY, NODE_CERT, NODE_KEY};
use api::secret::SECRET_LEN;
use cluster_config::{Cluster, Node};

use crate::files::{create_private, make_dir, write_file};

/// How long to wait before reading a secret another node on this machine is creating.
const CREATE_RACE_WAIT: Duration = Duration::from_millis(100);

/// Reads the cluster secret, creating it (32 random bytes as hex, mode 0600) when absent.
pub fn load_or_create_secret(path: &Path) -> anyhow::Result<[u8; SECRET_LEN]> {
    match fs::read_to_string(path) {
        Ok(text) => {
            return api::secret::parse_secret(&text)
                .map_err(|e| anyhow::anyhow!("cluster secret {}: {e}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("reading the cluster secret {}", path.display()))
        }
    }
    let bytes = api::secret::generate().context("reading /dev/urandom")?;
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match create_private(path, api::secret::format_secret(&bytes).as_bytes()) {
        Ok(()) => {
            tracing::info!(path = %path.display(), "created a new cluster secret");
            Ok(bytes)
        }
        // Another node on this machine created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::thread::sleep(CREATE_RACE_WAIT);
            load_or_create_secret(path)
        }
        Err(e) => Err(e).with_context(|| {
            format!(
                "creating the cluster secret {} (or pass --secret-file)",
                path.display()
            )
        }),
    }
}

/// The node's TLS files, read before the node is planned: the plan gives MariaDB and the admin
/// server copies of their own. `Debug` shows no key.
#[derive(Clone, PartialEq, Eq)]
pub struct NodeTls {
    /// The cluster CA's certificate (PEM).
    pub ca: String,
    /// The node's certificate (PEM).
    pub cert: String,
    /// The node's key (PEM).
    pub key: String,
    /// MariaDB's own certificate and key, when the directory has both (an image's seed).
    pub db: Option<(String, String)>,
}

impl NodeTls {
    /// Reads `dir` (the seed's `tls/`, or the one [`issue_dev_tls`] made).
    pub fn read(dir: &Path) -> anyhow::Result<NodeTls> {
        let read = |name: api::files::FileName| {
            let path = dir.join(name);
            fs::read_to_string(&path).with_context(|| {
                format!(
                    "reading {} (the node's TLS files: {CA_CERT}, {NODE_CERT}, {NODE_KEY})",
                    path.display()
                )
            })
        };
        let db = match dir.join(DB_CERT).exists() && dir.join(DB_KEY).exists() {
            true => Some((read(DB_CERT)?, read(DB_KEY)?)),
            false => None,
        };
        Ok(NodeTls {
            ca: read(CA_CERT)?,
            cert: read(NODE_CERT)?,
            key: read(NODE_KEY)?,
            db,
        })
    }

    /// MariaDB's certificate and key: its own pair when there is one, else the node's.
    pub fn for_db(&self) -> (&str, &str) {
        match &self.db {
            Some((cert, key)) => (cert, key),
            None => (&self.cert, &self.key),
        }
    }
}

impl fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeTls")
            .field("ca", &format_args!("{} bytes", self.ca.len()))
            .field("cert", &format_args!("{} bytes", self.cert.len()))
            .field("db", &self.db.is_some())
            .finish_non_exhaustive()
    }
}

/// On a developer machine (`appliance run`), where no seed holds certificates: the cluster
/// CA's key in `ca_key_file` (created 0600 when absent; the nodes of one config on one machine
/// share it, like the cluster secret), and in `tls_dir` what an image's seed holds, made by the
/// same `pki` profiles as the image-builder's: the CA certificate, a fresh node certificate
/// (name, name.domain, address) and MariaDB's own server-only certificate.
pub fn issue_dev_tls(
    ca_key_file: &Path,
    cluster: &Cluster,
    node: &Node,
    tls_dir: &Path,
) -> anyhow::Result<()> {
    let ca = load_or_create_dev_ca(ca_key_file, &pki::dev_ca_name(&cluster.name))?;
    let cert = ca.node_cert(cluster, node)?;
    let db = ca.db_cert(cluster, node)?;
    make_dir(tls_dir, 0o700)?;
    write_file(&tls_dir.join(NODE_KEY), &cert.key_pem, 0o600)?;
    write_file(&tls_dir.join(NODE_CERT), &cert.cert_pem, 0o644)?;
    write_file(&tls_dir.join(DB_KEY), &db.key_pem, 0o600)?;
    write_file(&tls_dir.join(DB_CERT), &db.cert_pem, 0o644)?;
    write_file(&tls_dir.join(CA_CERT), &ca.cert_pem, 0o644)
}

fn load_or_create_dev_ca(path: &Path, name: &str) -> anyhow::Result<pki::Ca> {
    let load = |pem: &str| {
        pki::Ca::from_key_pem(pem, name)
            .with_context(|| format!("{}: not a CA key", path.display()))
    };
    match fs::read_to_string(path) {
        Ok(pem) => return load(&pem),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let ca = pki::Ca::generate(name).context("making the development CA")?;
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Written completely under a private name, then published by a hard link, which fails if
    // another node on this machine published one first: then theirs is used.
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", tmp.display()))
        }
        _ => {}
    }
    create_private(&tmp, ca.key_pem().as_bytes())
        .with_context(|| format!("creating {}", tmp.display()))?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            tracing::info!(path = %path.display(), "created a development cluster CA");
            Ok(ca)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            load(&fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?)
        }
        Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn a_dev_cluster_shares_one_ca_and_each_node_reads_its_own_files() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Cluster::default_cluster();
        let node = cluster.node("server1").unwrap();
        let ca_key = dir.path().join("local-ca.secret");
        let tls = dir.path().join("tls");
        issue_dev_tls(&ca_key, &cluster, node, &tls).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&ca_key), 0o600);
        assert_eq!(mode(&tls), 0o700);
        assert_eq!(mode(&tls.join(NODE_KEY)), 0o600);
        let first = NodeTls::read(&tls).unwrap();
        assert!(first.ca.starts_with("-----BEGIN CERTIFICATE-----"));
        // MariaDB gets its own server-only pair, as on an image.
        let (db_cert, db_key) = first.for_db();
        assert_ne!(db_key, first.key.as_str());
        assert!(db_cert.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(mode(&tls.join(DB_KEY)), 0o600);
        assert!(!format!("{first:?}").contains("PRIVATE"), "{first:?}");
        // A second node of the same config uses the same CA key.
        let other = dir.path().join("tls2");
        issue_dev_tls(&ca_key, &cluster, cluster.node("server2").unwrap(), &other).unwrap();
        // (Its CA certificate is signed anew, with the same key and subject.)
        let ca = load_or_create_dev_ca(&ca_key, &pki::dev_ca_name(&cluster.name)).unwrap();
        assert!(ca.matches(&first.ca).unwrap());
        assert!(ca.matches(&NodeTls::read(&other).unwrap().ca).unwrap());
        // Without a MariaDB pair (an older seed), MariaDB falls back to the node's own.
        fs::remove_file(tls.join(DB_CERT)).unwrap();
        let old = NodeTls::read(&tls).unwrap();
        assert_eq!(old.for_db(), (old.cert.as_str(), old.key.as_str()));
        let e = NodeTls::read(&dir.path().join("none")).unwrap_err();
        assert!(format!("{e:#}").contains("the node's TLS files"), "{e:#}");
    }

    #[test]
    fn the_cluster_secret_is_created_once_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/cluster.secret");
        let secret = load_or_create_secret(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(load_or_create_secret(&path).unwrap(), secret);
        fs::write(&path, "short").unwrap();
        let e = load_or_create_secret(&path).unwrap_err();
        assert!(format!("{e:#}").contains("cluster secret"), "{e:#}");
    }
}
