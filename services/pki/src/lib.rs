//! The cluster's certificates, made one way wherever they are made: by the image-builder for
//! the seeds of a cluster's images, and by `appliance run` for a local cluster on a developer
//! machine (a development CA). Owns the certificate profiles (what a CA, node, database and
//! client certificate hold); it must not know where files live or write any (its callers do).
//!
//! rcgen (ring backend) rather than the openssl CLI: keys are made in-process and never pass
//! through argv or temporary config files, the certificate contents are plain Rust data that
//! unit tests check, and the host needs no extra tool. ring is the crypto rustls uses too.

use std::net::IpAddr;

use cluster_config::{Cluster, Node};
use rcgen::{
    date_time_ymd, BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;
use x509_cert::der::{Decode as _, Encode as _};

/// A certificate could not be made or read; `what` names which.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Rcgen {
        what: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("{what}: {message}")]
    Invalid { what: String, message: String },
}

fn rcgen_error(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> Error {
    let what = what.into();
    move |source| Error::Rcgen { what, source }
}

/// A certificate and its fresh private key, both PEM.
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8): to be written 0600 only.
    pub key_pem: String,
}

/// A CA: its key signs every node's, database's and client's certificate.
pub struct Ca {
    cert: Certificate,
    key: KeyPair,
    /// The CA certificate (what nodes trust), as re-made from the key.
    pub cert_pem: String,
}

/// The common name of a cluster's CA (made by the image-builder).
pub fn cluster_ca_name(cluster: &str) -> String {
    format!("Tandem cluster CA {cluster}")
}

/// The common name of a local cluster's development CA (made by `appliance run`).
pub fn dev_ca_name(cluster: &str) -> String {
    format!("Tandem development CA {cluster}")
}

/// A CA's parameters. Deterministic: re-signing them with the stored key yields an issuer
/// whose name and key identifier match the stored certificate, so only the key need be kept.
fn ca_params(common_name: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Tandem");
    dn.push(DnType::CommonName, common_name);
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

/// Parameters every issued certificate shares: a fixed validity from 2024, so that a node whose
/// clock lags (freshly booted, no NTP) still accepts its peers.
fn leaf_params(common_name: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Tandem");
    dn.push(DnType::CommonName, common_name);
    p.distinguished_name = dn;
    p.is_ca = IsCa::ExplicitNoCa;
    p.use_authority_key_identifier_extension = true;
    p.not_before = date_time_ymd(2024, 1, 1);
    p.not_after = date_time_ymd(2049, 12, 31);
    p
}

fn dns_name(name: &str, of: &str) -> Result<SanType, Error> {
    let dns = name
        .to_string()
        .try_into()
        .map_err(rcgen_error(format!("SAN `{name}` of {of}")))?;
    Ok(SanType::DnsName(dns))
}

/// Node certificate parameters: SANs are the node's names (`<node>`, `<node>.<domain>`) and its
/// address, which peers check (the admin port takes a client certificate as a peer only if it
/// names a node; MariaDB replication verifies the primary by its address). Never the cluster's
/// public domain: a node's key must not be able to pose as the site the balancers serve.
pub fn node_params(cluster: &Cluster, node: &Node) -> Result<CertificateParams, Error> {
    let mut p = leaf_params(&node.name);
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let of = format!("node {}", node.name);
    let mut names = vec![
        node.name.clone(),
        format!("{}.{}", node.name, cluster.domain),
    ];
    names.dedup();
    for name in names {
        p.subject_alt_names.push(dns_name(&name, &of)?);
    }
    p.subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(node.address)));
    Ok(p)
}

impl Ca {
    /// A new CA with a fresh key.
    pub fn generate(common_name: &str) -> Result<Ca, Error> {
        let key = KeyPair::generate().map_err(rcgen_error("CA key"))?;
        Ca::from_key(key, common_name)
    }

    /// The CA of a stored key (PEM): its certificate re-made from the deterministic parameters.
    pub fn from_key_pem(key_pem: &str, common_name: &str) -> Result<Ca, Error> {
        let key = KeyPair::from_pem(key_pem).map_err(rcgen_error("CA key"))?;
        Ca::from_key(key, common_name)
    }

    fn from_key(key: KeyPair, common_name: &str) -> Result<Ca, Error> {
        let cert = ca_params(common_name)
            .self_signed(&key)
            .map_err(rcgen_error(format!("CA certificate {common_name}")))?;
        Ok(Ca {
            cert_pem: cert.pem(),
            cert,
            key,
        })
    }

    /// The CA's private key (PEM): to be written 0600 only.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Whether a stored CA certificate (PEM) holds this CA's public key.
    pub fn matches(&self, cert_pem: &str) -> Result<bool, String> {
        Ok(certificate_public_key(cert_pem)? == self.key.public_key_der())
    }

    fn issue(&self, params: CertificateParams, what: &str) -> Result<Issued, Error> {
        let key = KeyPair::generate().map_err(rcgen_error(format!("key of {what}")))?;
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(rcgen_error(format!("certificate of {what}")))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A fresh key and certificate for `node` (server and client authentication: its identity
    /// towards its peers).
    pub fn node_cert(&self, cluster: &Cluster, node: &Node) -> Result<Issued, Error> {
        self.issue(node_params(cluster, node)?, &format!("node {}", node.name))
    }

    /// The certificate MariaDB serves: the node's names and address like [`Ca::node_cert`], but
    /// for server authentication only. MariaDB holds its key (a copy readable by `mysql`), so
    /// that key must not double as the node's identity towards its peers' admin API, which
    /// takes only client certificates.
    pub fn db_cert(&self, cluster: &Cluster, node: &Node) -> Result<Issued, Error> {
        let mut p = node_params(cluster, node)?;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(p, &format!("the database of node {}", node.name))
    }

    /// A client certificate (an operator's tool, or a test acting as a peer): client
    /// authentication only, `common_name` as its common name and its one DNS name, so it acts
    /// as a peer on the admin port only if `common_name` is a node's.
    pub fn client_cert(&self, common_name: &str) -> Result<Issued, Error> {
        let mut p = leaf_params(common_name);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let of = format!("client {common_name}");
        p.subject_alt_names.push(dns_name(common_name, &of)?);
        self.issue(p, &of)
    }
}

/// The first-boot wizard's certificate: self-signed, server authentication for `address`
/// (the wizard's only name), made at every boot the wizard runs (its SHA-256 fingerprint is
/// printed on the serial console, which is how a user can trust it), and its SHA-256
/// fingerprint as browsers show it (colon-separated upper-case hex).
pub fn wizard_cert(address: std::net::Ipv4Addr) -> Result<(Issued, String), Error> {
    let what = "the first-boot wizard";
    let mut p = leaf_params("Tandem first-boot setup");
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.subject_alt_names
        .push(SanType::IpAddress(std::net::IpAddr::V4(address)));
    let key = KeyPair::generate().map_err(rcgen_error(format!("key of {what}")))?;
    let cert = p
        .self_signed(&key)
        .map_err(rcgen_error(format!("certificate of {what}")))?;
    let digest = <sha2::Sha256 as sha2::Digest>::digest(cert.der().as_ref());
    let fingerprint = cluster_config::settings::fingerprint(&digest);
    Ok((
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        },
        fingerprint,
    ))
}

/// The public key (SubjectPublicKeyInfo, DER) held by the first certificate of a PEM text.
pub fn certificate_public_key(pem: &str) -> Result<Vec<u8>, String> {
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
        let ca = Ca::generate("tandem").unwrap();
        assert!(ca.matches(&ca.cert_pem).unwrap());
        let other = Ca::generate("tandem").unwrap();
        assert!(!ca.matches(&other.cert_pem).unwrap());
        for (input, expected) in [
            ("", "no PEM certificate"),
            (&*other.key_pem(), "no PEM certificate"),
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
    fn a_ca_remade_from_its_key_is_the_same_issuer() {
        let ca = Ca::generate(&cluster_ca_name("tandem")).unwrap();
        let again = Ca::from_key_pem(&ca.key_pem(), &cluster_ca_name("tandem")).unwrap();
        // ECDSA signatures differ run to run; the key (and so the key identifier) and the
        // name are what a certificate's issuer must match.
        assert!(again.matches(&ca.cert_pem).unwrap());
        let subject = |pem: &str| {
            let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
            let cert = x509_cert::Certificate::from_der(&der).unwrap();
            cert.tbs_certificate().subject().to_string()
        };
        assert_eq!(subject(&again.cert_pem), subject(&ca.cert_pem));
        assert!(Ca::from_key_pem("not a key", "x").is_err());
    }

    #[test]
    fn node_sans_are_its_names_and_address_never_the_public_domain() {
        let c = Cluster::default_cluster();
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
        assert!(!sans.contains(&format!("dns:{}", c.domain)));
    }

    #[test]
    fn the_profiles_differ_only_where_they_must() {
        let c = Cluster::default_cluster();
        let n = c.node("server2").unwrap();
        let ca = Ca::generate("tandem").unwrap();
        for issued in [
            ca.node_cert(&c, n).unwrap(),
            ca.db_cert(&c, n).unwrap(),
            ca.client_cert("server2").unwrap(),
        ] {
            assert!(issued.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
            assert!(issued.key_pem.contains("PRIVATE KEY"));
        }
        let db = node_params(&c, n).map(|mut p| {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            p
        });
        assert_eq!(
            db.unwrap().extended_key_usages,
            [ExtendedKeyUsagePurpose::ServerAuth]
        );
    }
}
