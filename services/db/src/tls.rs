//! MariaDB's TLS files: every TCP connection is TLS with the cluster CA (the accounts `REQUIRE
//! SSL`, replicas and the cross-node commands verify the server's certificate, which names the
//! node's address). [`install`] gives the server its files from the node's TLS directory
//! ([`api::tls`]); on a developer machine [`issue_dev`] makes that directory first, from a CA
//! of its own.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use api::tls::{CA_CERT, DB_CERT, DB_KEY, NODE_CERT, NODE_KEY};
use cluster_config::{Cluster, Node};

use crate::files::{create_dir, write_file, write_private};
use crate::{Error, Paths};

/// Gives MariaDB its TLS files from `tls_dir`: the CA and certificate as world-readable copies
/// (clients of the server read the CA), the key as a new file of mode 0600 from its creation,
/// owned by `owner` (the server's OS user when the supervisor is root). MariaDB's own pair
/// ([`DB_CERT`], [`DB_KEY`]) is used when present, else the node's. The seed's key stays
/// root-only; the copy lives in the runtime directory and is remade at every start.
pub fn install(tls_dir: &Path, paths: &Paths, owner: Option<&str>) -> Result<(), Error> {
    let from = |name: &str| tls_dir.join(name);
    let (cert, key) = match from(DB_CERT).exists() && from(DB_KEY).exists() {
        true => (from(DB_CERT), from(DB_KEY)),
        false => (from(NODE_CERT), from(NODE_KEY)),
    };
    let read = |path: &Path| fs::read(path).map_err(Error::io("reading the node's TLS file", path));
    let text = |path: &Path| {
        String::from_utf8(read(path)?).map_err(|_| Error::Invalid {
            path: path.to_path_buf(),
            detail: "not PEM text".into(),
        })
    };
    write_file(&paths.ssl_ca(), &text(&from(CA_CERT))?, 0o644)?;
    write_file(&paths.ssl_cert(), &text(&cert)?, 0o644)?;
    let owner = match owner {
        Some(user) => {
            let u = nix::unistd::User::from_name(user)
                .map_err(|e| Error::User {
                    user: user.into(),
                    detail: format!("looking it up: {e}"),
                })?
                .ok_or_else(|| Error::User {
                    user: user.into(),
                    detail: "does not exist".into(),
                })?;
            Some((u.uid, u.gid))
        }
        None => None,
    };
    write_private(&paths.ssl_key(), &read(&key)?, owner)
}

/// The development CA's certificate: the same for the same key, so every node of a local
/// cluster derives an equivalent one from the shared key file.
fn dev_ca_params(cluster: &str) -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::OrganizationName, "Tandem");
    dn.push(
        rcgen::DnType::CommonName,
        format!("Tandem development CA {cluster}"),
    );
    p.distinguished_name = dn;
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2050, 1, 1);
    p
}

/// On a developer machine (`appliance run`), where no seed holds certificates: the cluster
/// CA's key in `ca_key_file` (created 0600 when absent; the nodes of one config on one machine
/// share it, like the cluster secret), and a fresh certificate for `node` in `tls_dir`, with
/// the SANs the image-builder gives node certificates (name, name.domain, address).
pub fn issue_dev(
    ca_key_file: &Path,
    cluster: &Cluster,
    node: &Node,
    tls_dir: &Path,
) -> Result<(), Error> {
    let cert_error = |what: &str| {
        let what = what.to_string();
        move |source| Error::Certificate { what, source }
    };
    let ca_key = load_or_create_dev_ca_key(ca_key_file)?;
    let ca = dev_ca_params(&cluster.name)
        .self_signed(&ca_key)
        .map_err(cert_error("making the development CA certificate"))?;
    let mut p = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::OrganizationName, "Tandem");
    dn.push(rcgen::DnType::CommonName, node.name.clone());
    p.distinguished_name = dn;
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2049, 12, 31);
    let mut names = vec![
        node.name.clone(),
        format!("{}.{}", node.name, cluster.domain),
    ];
    names.dedup();
    for name in names {
        let dns = name
            .clone()
            .try_into()
            .map_err(cert_error(&format!("`{name}` as a certificate name")))?;
        p.subject_alt_names.push(rcgen::SanType::DnsName(dns));
    }
    p.subject_alt_names
        .push(rcgen::SanType::IpAddress(std::net::IpAddr::V4(
            node.address,
        )));
    let key = rcgen::KeyPair::generate().map_err(cert_error("generating the node's key"))?;
    let cert = p
        .signed_by(&key, &ca, &ca_key)
        .map_err(cert_error("signing the node's certificate"))?;
    create_dir(tls_dir)?;
    fs::set_permissions(tls_dir, fs::Permissions::from_mode(0o700))
        .map_err(Error::io("chmod", tls_dir))?;
    write_private(
        &tls_dir.join(NODE_KEY),
        key.serialize_pem().as_bytes(),
        None,
    )?;
    write_file(&tls_dir.join(NODE_CERT), &cert.pem(), 0o644)?;
    write_file(&tls_dir.join(CA_CERT), &ca.pem(), 0o644)
}

fn load_or_create_dev_ca_key(path: &Path) -> Result<rcgen::KeyPair, Error> {
    let load = |pem: &str| {
        rcgen::KeyPair::from_pem(pem).map_err(|e| Error::Invalid {
            path: path.to_path_buf(),
            detail: format!("not a CA key: {e}"),
        })
    };
    match fs::read_to_string(path) {
        Ok(pem) => return load(&pem),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("reading", path)(e)),
    }
    let key = rcgen::KeyPair::generate().map_err(|source| Error::Certificate {
        what: "generating the development CA's key".into(),
        source,
    })?;
    if let Some(dir) = path.parent() {
        create_dir(dir)?;
    }
    // Written completely under a private name, then published by a hard link, which fails if
    // another node on this machine published one first: then theirs is used.
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    write_private(&tmp, key.serialize_pem().as_bytes(), None)?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            tracing::info!(path = %path.display(), "created a development cluster CA");
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            load(&fs::read_to_string(path).map_err(Error::io("reading", path))?)
        }
        Err(e) => Err(Error::io("creating", path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    fn paths(dir: &Path) -> Paths {
        Paths {
            datadir: dir.join("data"),
            run_dir: dir.join("mysqld"),
            config_file: dir.join("my.cnf"),
        }
    }

    #[test]
    fn mariadb_gets_the_node_certificate_and_a_private_copy_of_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Cluster::default_cluster();
        let node = cluster.node("server1").unwrap();
        let ca_key = dir.path().join("local-ca.secret");
        let tls = dir.path().join("tls");
        issue_dev(&ca_key, &cluster, node, &tls).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&ca_key), 0o600);
        assert_eq!(mode(&tls.join(NODE_KEY)), 0o600);
        let first_ca = fs::read_to_string(tls.join(CA_CERT)).unwrap();
        // A second node of the same config uses the same CA key.
        let other = dir.path().join("tls2");
        issue_dev(&ca_key, &cluster, cluster.node("server2").unwrap(), &other).unwrap();
        assert_eq!(
            rcgen::KeyPair::from_pem(&fs::read_to_string(&ca_key).unwrap())
                .unwrap()
                .public_key_der(),
            load_or_create_dev_ca_key(&ca_key).unwrap().public_key_der()
        );
        assert!(first_ca.starts_with("-----BEGIN CERTIFICATE-----"));

        let p = paths(dir.path());
        fs::create_dir_all(&p.run_dir).unwrap();
        // A stale key file from an earlier start is replaced, not reused.
        fs::write(p.ssl_key(), "stale").unwrap();
        install(&tls, &p, None).unwrap();
        assert_eq!(mode(&p.ssl_key()), 0o600);
        assert_eq!(mode(&p.ssl_ca()), 0o644);
        assert_eq!(
            fs::read(p.ssl_key()).unwrap(),
            fs::read(tls.join(NODE_KEY)).unwrap()
        );
        assert_eq!(fs::read_to_string(p.ssl_ca()).unwrap(), first_ca);
        // A MariaDB-only pair wins over the node's own.
        fs::write(tls.join(DB_CERT), "db cert").unwrap();
        fs::write(tls.join(DB_KEY), "db key").unwrap();
        install(&tls, &p, None).unwrap();
        assert_eq!(fs::read_to_string(p.ssl_cert()).unwrap(), "db cert");
        assert_eq!(fs::read_to_string(p.ssl_key()).unwrap(), "db key");
        let e = install(&dir.path().join("none"), &p, None).unwrap_err();
        assert!(e.to_string().contains("the node's TLS file"), "{e}");
        let e = install(&tls, &p, Some("no-such-user-here")).unwrap_err();
        assert!(e.to_string().contains("no-such-user-here"), "{e}");
    }
}
