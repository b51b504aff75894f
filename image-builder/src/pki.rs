//! The cluster CA and the node certificates for mutual TLS between nodes.
//!
//! rcgen (ring backend) rather than the openssl CLI: keys are made in-process and never pass
//! through argv or temporary config files, the certificate contents are plain Rust data that
//! unit tests can check, and the host needs no extra tool. ring is the crypto rustls uses too.

use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use api::secret::{format_secret, parse_secret, SECRET_FILE, SECRET_LEN};
use rcgen::{
    date_time_ymd, BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;
use x509_cert::der::{Decode as _, Encode as _};

use crate::Error;

const STEP: &str = "certificates";

/// The cluster CA: its key signs every node's and client's certificate.
pub struct Ca {
    cert: Certificate,
    key: KeyPair,
    /// The certificate as stored in `ca.crt` (what nodes trust).
    pub cert_pem: String,
    /// Where `ca.crt`, `ca.key` and the cluster secret are kept.
    pub dir: PathBuf,
}

/// A certificate signed by the CA and its fresh key, both PEM.
pub struct NodeCert {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8): written 0600 only.
    pub key_pem: String,
}

fn pki_error(what: impl Into<String>, e: rcgen::Error) -> Error {
    Error::Pki(format!("{}: {e}", what.into()))
}

/// The CA's parameters. Deterministic: re-signing them with the stored key yields an issuer
/// whose name and key identifier match the stored `ca.crt`.
fn ca_params(cluster: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Tandem");
    dn.push(DnType::CommonName, format!("Tandem cluster CA {cluster}"));
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = date_time_ymd(2024, 1, 1);
    p.not_after = date_time_ymd(2050, 1, 1);
    p
}

/// Node certificate parameters: SANs are the node's names (`<node>`, `<node>.<domain>`) and its
/// address, which peers check (the admin port takes a client certificate as a peer only if it
/// names a node; MariaDB replication verifies the primary by its address). Never the cluster's
/// public domain: a node's key must not be able to pose as the site the balancers serve.
pub fn node_params(
    cluster: &cluster_config::Cluster,
    node: &cluster_config::Node,
) -> Result<CertificateParams, Error> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Tandem");
    dn.push(DnType::CommonName, node.name.clone());
    p.distinguished_name = dn;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    p.not_before = date_time_ymd(2024, 1, 1);
    p.not_after = date_time_ymd(2049, 12, 31);
    for n in [
        node.name.clone(),
        format!("{}.{}", node.name, cluster.domain),
    ] {
        let dns = n
            .clone()
            .try_into()
            .map_err(|e| pki_error(format!("SAN `{n}` of node {}", node.name), e))?;
        p.subject_alt_names.push(SanType::DnsName(dns));
    }
    p.subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(node.address)));
    Ok(p)
}

/// Loads the CA from `dir` (`ca.crt`, `ca.key`), or creates it there. Returns it and whether it
/// was created by this call.
pub fn load_or_create_ca(dir: &Path, cluster: &str) -> Result<(Ca, bool), Error> {
    let crt = dir.join("ca.crt");
    let key_path = dir.join("ca.key");
    if key_path.exists() || crt.exists() {
        let key_pem =
            std::fs::read_to_string(&key_path).map_err(|e| Error::io(STEP, &key_path, e))?;
        let cert_pem = std::fs::read_to_string(&crt).map_err(|e| Error::io(STEP, &crt, e))?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| pki_error(key_path.display().to_string(), e))?;
        let held = certificate_public_key(&cert_pem)
            .map_err(|e| Error::Pki(format!("{}: {e}", crt.display())))?;
        if held != key.public_key_der() {
            return Err(Error::Pki(format!(
                "{} does not belong to {} (delete both to make a new CA)",
                crt.display(),
                key_path.display()
            )));
        }
        let cert = ca_params(cluster)
            .self_signed(&key)
            .map_err(|e| pki_error("CA", e))?;
        return Ok((
            Ca {
                cert,
                key,
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
    let key = KeyPair::generate().map_err(|e| pki_error("CA key", e))?;
    let cert = ca_params(cluster)
        .self_signed(&key)
        .map_err(|e| pki_error("CA", e))?;
    let cert_pem = cert.pem();
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&crt, cert_pem.as_bytes(), 0o644)?;
    Ok((
        Ca {
            cert,
            key,
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
            let mut secret = [0u8; SECRET_LEN];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut secret))
                .map_err(|e| Error::io(STEP, Path::new("/dev/urandom"), e))?;
            let text = format_secret(&secret);
            write_file(&path, text.as_bytes(), 0o600)?;
            Ok(text)
        }
        Err(e) => Err(Error::io(STEP, &path, e)),
    }
}

/// A fresh key and certificate for `node`, signed by the CA.
pub fn node_cert(
    ca: &Ca,
    cluster: &cluster_config::Cluster,
    node: &cluster_config::Node,
) -> Result<NodeCert, Error> {
    let key =
        KeyPair::generate().map_err(|e| pki_error(format!("key of node {}", node.name), e))?;
    let cert = node_params(cluster, node)?
        .signed_by(&key, &ca.cert, &ca.key)
        .map_err(|e| pki_error(format!("certificate of node {}", node.name), e))?;
    Ok(NodeCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// The certificate MariaDB serves: the node's names and address like [`node_cert`], but for
/// server authentication only. MariaDB holds its key (a copy readable by `mysql`), so that key
/// must not double as the node's identity towards its peers' admin API, which takes only
/// client certificates.
pub fn db_cert(
    ca: &Ca,
    cluster: &cluster_config::Cluster,
    node: &cluster_config::Node,
) -> Result<NodeCert, Error> {
    let key = KeyPair::generate()
        .map_err(|e| pki_error(format!("database key of node {}", node.name), e))?;
    let mut p = node_params(cluster, node)?;
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = p
        .signed_by(&key, &ca.cert, &ca.key)
        .map_err(|e| pki_error(format!("database certificate of node {}", node.name), e))?;
    Ok(NodeCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A client certificate signed by the CA (an operator's tool, or a test acting as a peer):
/// client authentication only, `name` as its common name and its one DNS name (so it acts as
/// a peer on the admin port only if `name` is a node's), valid from the same fixed date as
/// node certificates so that a node whose clock lags (freshly booted, no NTP) still accepts it.
pub fn client_cert(ca: &Ca, common_name: &str) -> Result<NodeCert, Error> {
    let key =
        KeyPair::generate().map_err(|e| pki_error(format!("key of client {common_name}"), e))?;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Tandem");
    dn.push(DnType::CommonName, common_name);
    p.distinguished_name = dn;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let dns = common_name
        .to_string()
        .try_into()
        .map_err(|e| pki_error(format!("SAN `{common_name}` of client"), e))?;
    p.subject_alt_names.push(SanType::DnsName(dns));
    p.use_authority_key_identifier_extension = true;
    p.not_before = date_time_ymd(2024, 1, 1);
    p.not_after = date_time_ymd(2049, 12, 31);
    let cert = p
        .signed_by(&key, &ca.cert, &ca.key)
        .map_err(|e| pki_error(format!("certificate of client {common_name}"), e))?;
    Ok(NodeCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Writes a new file, created with its final mode (`create_new`: whatever was at `path`, a
/// file or a link, is replaced, never written through): a key is never readable by anyone
/// else, not even for a moment, and is never chmodded.
///
/// The umask may narrow a public mode (a certificate must stay readable in the seed): such a
/// file gets its bits back on the open descriptor, before its first byte.
pub fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), Error> {
    let io = |e| Error::io(STEP, path, e);
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    if mode & PUBLIC_BITS != 0 {
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io)?;
    }
    f.write_all(data).map_err(io)
}

/// Mode bits that let others than the owner read or write a file.
const PUBLIC_BITS: u32 = 0o077;
/// The CA's directory: its key is the cluster's.
const CA_DIR_MODE: u32 = 0o700;

/// The public key (SubjectPublicKeyInfo, DER) held by the first certificate of a PEM text.
fn certificate_public_key(pem: &str) -> Result<Vec<u8>, String> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| format!("no PEM certificate: {e}"))?;
    let cert = x509_cert::Certificate::from_der(&der)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    cert.tbs_certificate()
        .subject_public_key_info()
        .to_der()
        .map_err(|e| format!("its public key does not encode: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_give_their_public_key_and_bad_ones_are_named() {
        let key = KeyPair::generate().unwrap();
        let pem = ca_params("tandem").self_signed(&key).unwrap().pem();
        assert_eq!(certificate_public_key(&pem).unwrap(), key.public_key_der());
        let other = KeyPair::generate().unwrap();
        assert_ne!(
            certificate_public_key(&pem).unwrap(),
            other.public_key_der()
        );
        for (input, expected) in [
            ("", "no PEM certificate"),
            (&*other.serialize_pem(), "no PEM certificate"),
            (
                "-----BEGIN CERTIFICATE-----\n*\n-----END CERTIFICATE-----\n",
                "no PEM certificate: base64",
            ),
            (
                "-----BEGIN CERTIFICATE-----\nMAMwAQA=\n-----END CERTIFICATE-----\n",
                "not an X.509 certificate",
            ),
        ] {
            let e = certificate_public_key(input).unwrap_err();
            assert!(e.starts_with(expected), "{input:?}: {e}");
        }
    }

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
    fn files_replace_what_was_there_and_keys_get_their_mode_at_creation() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        // A link where the key goes: replaced, not written through.
        let outside = dir.path().join("outside");
        std::fs::write(&outside, "").unwrap();
        let key = dir.path().join("node.key");
        std::os::unix::fs::symlink(&outside, &key).unwrap();
        write_file(&key, b"secret", 0o600).unwrap();
        assert_eq!(std::fs::read(&outside).unwrap(), b"");
        let md = std::fs::symlink_metadata(&key).unwrap();
        assert!(md.is_file());
        assert_eq!(md.mode() & 0o7777, 0o600);
        // A reader holding the previous file open never sees the new content.
        let cert = dir.path().join("node.crt");
        std::fs::write(&cert, "old").unwrap();
        let mut held = std::fs::File::open(&cert).unwrap();
        write_file(&cert, b"new", 0o644).unwrap();
        let mut seen = String::new();
        std::io::Read::read_to_string(&mut held, &mut seen).unwrap();
        assert_eq!(seen, "old");
        assert_eq!(std::fs::metadata(&cert).unwrap().mode() & 0o7777, 0o644);
        assert_eq!(std::fs::read(&cert).unwrap(), b"new");
    }

    #[test]
    fn node_sans() {
        let c = cluster_config::Cluster::default_cluster();
        let n = c.node("server1").unwrap();
        let p = node_params(&c, n).unwrap();
        let sans: Vec<String> = p
            .subject_alt_names
            .iter()
            .map(|s| match s {
                SanType::DnsName(d) => format!("dns:{}", d.as_str()),
                SanType::IpAddress(ip) => format!("ip:{ip}"),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            sans,
            ["dns:server1", "dns:server1.tandem.test", "ip:10.88.0.11"]
        );
        assert!(
            !sans.contains(&format!("dns:{}", c.domain)),
            "a node certificate names the public domain"
        );
    }

    #[test]
    fn ca_is_created_once_then_reused_and_signs_node_certs() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("tandem-ca");
        let (ca, created) = load_or_create_ca(&ca_dir, "tandem").unwrap();
        assert!(created);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::metadata(ca_dir.join("ca.key")).unwrap().mode() & 0o777,
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
        std::fs::copy(other.join("ca.crt"), ca_dir.join("ca.crt")).unwrap();
        let e = load_or_create_ca(&ca_dir, "tandem")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("does not belong"), "{e}");

        // Nor is one that is no certificate at all; the error names the file.
        std::fs::write(ca_dir.join("ca.crt"), "not a certificate\n").unwrap();
        let e = load_or_create_ca(&ca_dir, "tandem")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("ca.crt: no PEM certificate"), "{e}");
    }
}
