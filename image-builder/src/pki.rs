//! The cluster CA kept on the build machine (`ca.crt`, `ca.key` and the cluster secret in one
//! private directory) and the files the seeds get from it. The certificates themselves are
//! made by the `pki` crate, the same way `appliance run` makes a development cluster's.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use api::files::CA_CERT;
use api::secret::{format_secret, parse_secret, SECRET_FILE};
pub use pki::Issued;

use crate::Error;

const STEP: &str = "certificates";
/// The CA key's file name in the CA directory (only the build machine has it).
const CA_KEY: &str = "ca.key";

fn pki_error(e: pki::Error) -> Error {
    Error::Pki(e.to_string())
}

/// The cluster CA as stored on the build machine.
pub struct Ca {
    /// Signs the node, database and client certificates.
    pub issuer: pki::Ca,
    /// `ca.crt` as stored (what every seed gets, byte for byte, so images stay reproducible).
    pub cert_pem: String,
    /// Where `ca.crt`, `ca.key` and the cluster secret are kept.
    pub dir: PathBuf,
}

/// A fresh key and certificate for `node` (see [`pki::Ca::node_cert`]).
pub fn node_cert(
    ca: &Ca,
    cluster: &cluster_config::Cluster,
    node: &cluster_config::Node,
) -> Result<Issued, Error> {
    ca.issuer.node_cert(cluster, node).map_err(pki_error)
}

/// MariaDB's certificate for `node` (see [`pki::Ca::db_cert`]).
pub fn db_cert(
    ca: &Ca,
    cluster: &cluster_config::Cluster,
    node: &cluster_config::Node,
) -> Result<Issued, Error> {
    ca.issuer.db_cert(cluster, node).map_err(pki_error)
}

/// A client certificate (see [`pki::Ca::client_cert`]).
pub fn client_cert(ca: &Ca, common_name: &str) -> Result<Issued, Error> {
    ca.issuer.client_cert(common_name).map_err(pki_error)
}

/// Loads the CA from `dir` ([`CA_CERT`], the name it has in a node's seed too, and `ca.key`), or
/// creates it there. Returns it and whether it
/// was created by this call.
pub fn load_or_create_ca(dir: &Path, cluster: &str) -> Result<(Ca, bool), Error> {
    let crt = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    let name = pki::cluster_ca_name(cluster);
    if key_path.exists() || crt.exists() {
        let key_pem =
            std::fs::read_to_string(&key_path).map_err(|e| Error::io(STEP, &key_path, e))?;
        let cert_pem = std::fs::read_to_string(&crt).map_err(|e| Error::io(STEP, &crt, e))?;
        let issuer = pki::Ca::from_key_pem(&key_pem, &name)
            .map_err(|e| Error::Pki(format!("{}: {e}", key_path.display())))?;
        let matches = issuer
            .matches(&cert_pem)
            .map_err(|e| Error::Pki(format!("{}: {e}", crt.display())))?;
        if !matches {
            return Err(Error::Pki(format!(
                "{} does not belong to {} (delete both to make a new CA)",
                crt.display(),
                key_path.display()
            )));
        }
        return Ok((
            Ca {
                issuer,
                cert_pem,
                dir: dir.to_owned(),
            },
            false,
        ));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(CA_DIR_MODE)
        .create(dir)
        .map_err(|e| Error::io(STEP, dir, e))?;
    let issuer = pki::Ca::generate(&name).map_err(pki_error)?;
    let cert_pem = issuer.cert_pem.clone();
    write_file(&key_path, issuer.key_pem().as_bytes(), 0o600)?;
    write_file(&crt, cert_pem.as_bytes(), 0o644)?;
    Ok((
        Ca {
            issuer,
            cert_pem,
            dir: dir.to_owned(),
        },
        true,
    ))
}

/// Loads the cluster secret kept beside the CA (`api::secret`'s file and format), or creates
/// it from the kernel's random source. Returns the file's text, ready to copy into each seed.
pub fn load_or_create_secret(dir: &Path) -> Result<String, Error> {
    let path = dir.join(SECRET_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let secret = parse_secret(&text).map_err(|e| {
                Error::Pki(format!(
                    "{}: {e} (delete it to make a new one; every node must then be rebuilt)",
                    path.display()
                ))
            })?;
            Ok(format_secret(&secret))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret = api::secret::generate()
                .map_err(|e| Error::io(STEP, Path::new("/dev/urandom"), e))?;
            let text = format_secret(&secret);
            write_file(&path, text.as_bytes(), 0o600)?;
            Ok(text)
        }
        Err(e) => Err(Error::io(STEP, &path, e)),
    }
}

/// Writes a file whole, created with its final mode ([`api::fsio::write_atomic`]: whatever was
/// at `path`, a file or a link, is replaced, never written through; a key is never readable by
/// anyone else, not even for a moment; a certificate keeps its public mode whatever the umask).
pub fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), Error> {
    api::fsio::write_atomic(path, data, mode, None).map_err(|e| Error::io(STEP, path, e))
}

/// The CA's directory: its key is the cluster's.
const CA_DIR_MODE: u32 = 0o700;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_is_created_once_in_the_shared_format_and_a_bad_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let text = load_or_create_secret(dir.path()).unwrap();
        let secret = parse_secret(&text).unwrap();
        assert_eq!(text, format_secret(&secret));
        use std::os::unix::fs::MetadataExt;
        let path = dir.path().join(SECRET_FILE);
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(load_or_create_secret(dir.path()).unwrap(), text);
        std::fs::write(&path, "abc\n").unwrap();
        let e = load_or_create_secret(dir.path()).unwrap_err().to_string();
        assert!(e.contains("cluster.secret: expected 64 hex digits"), "{e}");
        assert!(e.contains("delete it"), "{e}");
    }

    #[test]
    fn ca_is_created_once_then_reused_and_signs_node_certs() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("tandem-ca");
        let (ca, created) = load_or_create_ca(&ca_dir, "tandem").unwrap();
        assert!(created);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::metadata(ca_dir.join(CA_KEY)).unwrap().mode() & 0o777,
            0o600
        );
        assert_eq!(std::fs::metadata(&ca_dir).unwrap().mode() & 0o777, 0o700);
        let (again, created) = load_or_create_ca(&ca_dir, "tandem").unwrap();
        assert!(!created);
        assert_eq!(again.cert_pem, ca.cert_pem);
        let c = cluster_config::Cluster::default_cluster();
        let nc = node_cert(&again, &c, c.node("server2").unwrap()).unwrap();
        assert!(nc.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(nc.key_pem.contains("PRIVATE KEY"));

        // A certificate that does not match the key is refused.
        let other = dir.path().join("other-ca");
        load_or_create_ca(&other, "tandem").unwrap();
        std::fs::copy(other.join(CA_CERT), ca_dir.join(CA_CERT)).unwrap();
        let e = load_or_create_ca(&ca_dir, "tandem")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("does not belong"), "{e}");

        // Nor is one that is no certificate at all; the error names the file.
        std::fs::write(ca_dir.join(CA_CERT), "not a certificate\n").unwrap();
        let e = load_or_create_ca(&ca_dir, "tandem")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(&format!("{CA_CERT}: no PEM certificate")), "{e}");
    }
}
