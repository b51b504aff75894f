//! The cluster CA kept on the build machine (`ca.crt`, `ca.key`, the cluster secret and the
//! cluster's [`Credentials`] in one private directory) and the files the seeds get from it. The
//! certificates themselves are made by the `pki` crate, the same way `appliance run` makes a
//! development cluster's.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use api::files::CA_CERT;
use api::secret::{format_secret, parse_secret, SECRET_FILE};
use api::settings::Secret;
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
    private_dir(dir)?;
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

/// The admin password's file in the CA directory: one line, 0600.
pub const ADMIN_PASSWORD_FILE: &str = "admin-password";
/// The metrics bearer token's file in the CA directory: 64 hex digits, 0600.
pub const METRICS_TOKEN_FILE: &str = "metrics-token";
/// Bytes of a metrics token.
const TOKEN_LEN: usize = 32;

/// The cluster's admin password and metrics token, kept on the build machine beside its CA
/// (made once, like the CA and the secret) and put in every node image's seed (the password as
/// its argon2id hash). The e2e tests read them with [`Credentials::load`] to log in and scrape.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// What the admin page's login takes.
    pub admin_password: Secret,
    /// What `/metrics` takes as `Authorization: Bearer`: 64 hex digits.
    pub metrics_token: Secret,
}

impl Credentials {
    /// Reads the credentials kept in the CA directory `ca_dir` (a build's `manifest.json` names
    /// it as `ca_dir`). Makes nothing.
    pub fn load(ca_dir: &Path) -> Result<Credentials, Error> {
        let read = |name: &str| {
            let path = ca_dir.join(name);
            std::fs::read_to_string(&path)
                .map(|text| (text, path.clone()))
                .map_err(|e| Error::io(STEP, &path, e))
        };
        let (password, password_path) = read(ADMIN_PASSWORD_FILE)?;
        let (token, token_path) = read(METRICS_TOKEN_FILE)?;
        Ok(Credentials {
            admin_password: parse_password(&password_path, &password)?,
            metrics_token: parse_token(&token_path, &token)?,
        })
    }

    /// Loads the credentials from `ca_dir`, making each file that is missing (0600, in a 0700
    /// directory). A password is refused when `cluster_config::settings::check_password_strength`
    /// refuses it (an operator may have written their own). Returns them and whether the
    /// admin password was made by this call.
    pub fn load_or_create(
        ca_dir: &Path,
        cluster: &cluster_config::Cluster,
    ) -> Result<(Credentials, bool), Error> {
        private_dir(ca_dir)?;
        let password_path = ca_dir.join(ADMIN_PASSWORD_FILE);
        let (text, created) = read_or_create_private(&password_path, || {
            Ok(format!(
                "{}\n",
                cluster_config::settings::generate_password(cluster, |buf| {
                    std::io::Read::read_exact(&mut std::fs::File::open(RANDOM)?, buf)
                })?
            ))
        })?;
        let admin_password = parse_password(&password_path, &text)?;
        cluster_config::settings::check_password_strength(cluster, admin_password.expose())
            .map_err(|m| {
                Error::Pki(format!(
                    "{}: {m} (delete it to have a new one made; every node must then be rebuilt)",
                    password_path.display()
                ))
            })?;
        let token_path = ca_dir.join(METRICS_TOKEN_FILE);
        let (text, _) = read_or_create_private(&token_path, || {
            Ok(format!("{}\n", hex::encode(random_bytes::<TOKEN_LEN>()?)))
        })?;
        Ok((
            Credentials {
                admin_password,
                metrics_token: parse_token(&token_path, &text)?,
            },
            created,
        ))
    }

    /// Where the admin password is kept in `ca_dir` (shown after a build, never the password).
    pub fn admin_password_path(ca_dir: &Path) -> PathBuf {
        ca_dir.join(ADMIN_PASSWORD_FILE)
    }
}

/// `path`'s text, or, if there is no such file, `make`'s, written there (0600). Of two builds
/// making it at once, both use the one that was written first. Returns whether this call made it.
fn read_or_create_private(
    path: &Path,
    make: impl FnOnce() -> std::io::Result<String>,
) -> Result<(String, bool), Error> {
    match std::fs::read_to_string(path) {
        Ok(text) => return Ok((text, false)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(STEP, path, e)),
    }
    let text = make().map_err(|e| Error::io(STEP, Path::new(RANDOM), e))?;
    match api::fsio::create_private(path, text.as_bytes()) {
        Ok(()) => Ok((text, true)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => std::fs::read_to_string(path)
            .map(|text| (text, false))
            .map_err(|e| Error::io(STEP, path, e)),
        Err(e) => Err(Error::io(STEP, path, e)),
    }
}

/// The password file's one line (an editor's final newline is not part of it).
fn parse_password(path: &Path, text: &str) -> Result<Secret, Error> {
    let password = text.strip_suffix('\n').unwrap_or(text);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() || password.contains(['\n', '\r']) {
        return Err(Error::Pki(format!(
            "{}: expected the admin password on one line",
            path.display()
        )));
    }
    Ok(Secret::new(password))
}

fn parse_token(path: &Path, text: &str) -> Result<Secret, Error> {
    let token = text.trim();
    if token.len() != TOKEN_LEN * 2 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::Pki(format!(
            "{}: expected {} hex digits (delete it to have a new one made)",
            path.display(),
            TOKEN_LEN * 2
        )));
    }
    Ok(Secret::new(token.to_ascii_lowercase()))
}

/// The kernel's random source (as `api::secret::generate` reads it).
const RANDOM: &str = "/dev/urandom";

/// `N` bytes from [`RANDOM`].
pub(crate) fn random_bytes<const N: usize>() -> std::io::Result<[u8; N]> {
    let mut bytes = [0u8; N];
    std::io::Read::read_exact(&mut std::fs::File::open(RANDOM)?, &mut bytes)?;
    Ok(bytes)
}

/// Makes the CA's directory (and its parents) if missing, private.
fn private_dir(dir: &Path) -> Result<(), Error> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(CA_DIR_MODE)
        .create(dir)
        .map_err(|e| Error::io(STEP, dir, e))
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
    fn credentials_are_made_once_private_and_read_back_by_load() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("tandem-ca");
        let cluster = cluster_config::Cluster::default_cluster();
        assert!(Credentials::load(&ca_dir).is_err(), "load makes nothing");
        let (made, created) = Credentials::load_or_create(&ca_dir, &cluster).unwrap();
        assert!(created);
        let password = made.admin_password.expose();
        assert_eq!(
            password.len(),
            cluster_config::settings::GENERATED_PASSWORD_LEN
        );
        assert!(
            password
                .bytes()
                .all(|b| cluster_config::settings::GENERATED_PASSWORD_ALPHABET.contains(&b)),
            "{password}"
        );
        cluster_config::settings::check_password_strength(&cluster, password).unwrap();
        let token = made.metrics_token.expose();
        assert_eq!(token.len(), 64);
        assert!(token.bytes().all(|b| b.is_ascii_hexdigit()), "{token}");
        use std::os::unix::fs::MetadataExt;
        for file in [ADMIN_PASSWORD_FILE, METRICS_TOKEN_FILE] {
            let md = std::fs::metadata(ca_dir.join(file)).unwrap();
            assert_eq!(md.mode() & 0o777, 0o600, "{file}");
        }
        assert_eq!(std::fs::metadata(&ca_dir).unwrap().mode() & 0o777, 0o700);
        assert_eq!(
            std::fs::read_to_string(Credentials::admin_password_path(&ca_dir)).unwrap(),
            format!("{password}\n")
        );
        // Made once: the next build and the tests read the same.
        let (again, created) = Credentials::load_or_create(&ca_dir, &cluster).unwrap();
        assert!(!created);
        let loaded = Credentials::load(&ca_dir).unwrap();
        for c in [&again, &loaded] {
            assert_eq!(c.admin_password, made.admin_password);
            assert_eq!(c.metrics_token, made.metrics_token);
        }
        // Never in Debug output.
        let debug = format!("{loaded:?}");
        assert!(
            !debug.contains(password) && !debug.contains(token),
            "{debug}"
        );
        // Two passwords are not the same.
        let other = dir.path().join("other-ca");
        let (second, _) = Credentials::load_or_create(&other, &cluster).unwrap();
        assert_ne!(second.admin_password, made.admin_password);
        assert_ne!(second.metrics_token, made.metrics_token);
    }

    #[test]
    fn credentials_of_the_wrong_shape_are_refused_with_their_file() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = cluster_config::Cluster::default_cluster();
        Credentials::load_or_create(dir.path(), &cluster).unwrap();
        let check = |file: &str, text: &str, expected: &str| {
            let path = dir.path().join(file);
            let saved = std::fs::read_to_string(&path).unwrap();
            std::fs::write(&path, text).unwrap();
            let e = Credentials::load_or_create(dir.path(), &cluster)
                .unwrap_err()
                .to_string();
            assert!(e.contains(&path.display().to_string()), "{e}");
            assert!(e.contains(expected), "{text:?}: {e}");
            assert!(!e.contains(text.trim()) || text.trim().is_empty(), "{e}");
            std::fs::write(&path, saved).unwrap();
        };
        check(METRICS_TOKEN_FILE, "not-hex\n", "expected 64 hex digits");
        check(ADMIN_PASSWORD_FILE, "", "on one line");
        check(ADMIN_PASSWORD_FILE, "two\nlines\n", "on one line");
        check(ADMIN_PASSWORD_FILE, "short1\n", "too short");
        check(ADMIN_PASSWORD_FILE, "tandem-Cluster1\n", "too weak");
        // An operator's own strong password is taken as it is (an editor's newline is not
        // part of it).
        let path = dir.path().join(ADMIN_PASSWORD_FILE);
        std::fs::write(&path, "correct horse battery staple\r\n").unwrap();
        let (c, created) = Credentials::load_or_create(dir.path(), &cluster).unwrap();
        assert!(!created);
        assert_eq!(c.admin_password.expose(), "correct horse battery staple");
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
