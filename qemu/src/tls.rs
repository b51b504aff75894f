//! What certificate a server serves, as a client inside the cluster namespace sees it: the chain
//! from a TLS handshake that checks nothing (rustls, ring), its SHA-256 fingerprint in the form
//! a node prints on its console, and the key's hash Chromium takes to trust exactly that key.
//!
//! A test compares the fingerprint with the one the node printed before it lets a browser
//! accept the certificate; [`verify_chain`] checks a chain against the cluster CA instead.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme};
use sha2::Digest as _;
use x509_cert::der::{Decode as _, Encode as _};

use crate::error::{Error, Result};
use crate::netns::Netns;

/// A certificate chain as served: DER, leaf first.
pub type Chain = Vec<Vec<u8>>;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts any certificate: this client only looks at what is served. Signatures are still
/// checked, so the chain is the one whose key made the handshake.
#[derive(Debug)]
struct Anything(Arc<CryptoProvider>);

impl ServerCertVerifier for Anything {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The chain `addr` serves, from a TLS handshake made inside `netns`. `server_name` is sent as
/// SNI (none when absent: the address is the name).
pub fn served_chain(
    netns: &Netns,
    addr: SocketAddr,
    server_name: Option<&str>,
    timeout: Duration,
) -> Result<Chain> {
    let err = |what: String| Error::Tls(format!("{addr}: {what}"));
    let mut tcp = netns
        .connect(addr, timeout)
        .map_err(|e| err(format!("connect: {e}")))?;
    tcp.set_read_timeout(Some(timeout))
        .and_then(|()| tcp.set_write_timeout(Some(timeout)))
        .map_err(|e| err(e.to_string()))?;
    let provider = provider();
    let config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| err(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Anything(provider)))
        .with_no_client_auth();
    let name = match server_name {
        Some(n) => ServerName::try_from(n.to_string()).map_err(|e| err(format!("{n}: {e}")))?,
        None => ServerName::IpAddress(addr.ip().into()),
    };
    let mut conn = ClientConnection::new(Arc::new(config), name).map_err(|e| err(e.to_string()))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)
            .map_err(|e| err(format!("handshake: {e}")))?;
    }
    let chain: Chain = conn
        .peer_certificates()
        .unwrap_or_default()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect();
    if chain.is_empty() {
        return Err(err("no certificate served".into()));
    }
    Ok(chain)
}

/// SHA-256 of a DER certificate as colon-separated upper-case hex pairs (`AB:01:…`), the form
/// a node prints on its console (the config crate's one formatter).
pub fn fingerprint(der: &[u8]) -> String {
    cluster_config::settings::fingerprint(&sha2::Sha256::digest(der))
}

/// Whether two fingerprints name the same digest, however they are written (case, colons).
pub fn same_fingerprint(a: &str, b: &str) -> bool {
    let norm = |s: &str| -> String {
        s.chars()
            .filter(char::is_ascii_hexdigit)
            .map(|c| c.to_ascii_uppercase())
            .collect()
    };
    let (a, b) = (norm(a), norm(b));
    a.len() == 64 && a == b
}

/// Base64 of the SHA-256 of a certificate's SubjectPublicKeyInfo: what Chromium's
/// `--ignore-certificate-errors-spki-list` takes to accept that key's certificates, and no
/// other's.
pub fn spki_sha256(der: &[u8]) -> Result<String> {
    let cert = x509_cert::Certificate::from_der(der)
        .map_err(|e| Error::Tls(format!("not a certificate: {e}")))?;
    let spki = cert
        .tbs_certificate()
        .subject_public_key_info()
        .to_der()
        .map_err(|e| Error::Tls(format!("encoding its public key: {e}")))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(&spki)))
}

/// The DER certificates of a PEM text, in order.
pub fn pem_certificates(pem: &str) -> Result<Chain> {
    let chain = CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.map(|c| c.as_ref().to_vec()))
        .collect::<std::result::Result<Chain, _>>()
        .map_err(|e| Error::Tls(format!("PEM: {e}")))?;
    if chain.is_empty() {
        return Err(Error::Tls("no certificate in the PEM text".into()));
    }
    Ok(chain)
}

/// Checks that `chain` (leaf first) is valid now for `ip`, issued by a CA of `ca_pem`.
pub fn verify_chain(chain: &[Vec<u8>], ca_pem: &str, ip: IpAddr) -> Result<()> {
    let mut roots = rustls::RootCertStore::empty();
    for der in pem_certificates(ca_pem)? {
        roots
            .add(CertificateDer::from(der))
            .map_err(|e| Error::Tls(format!("CA certificate: {e}")))?;
    }
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| Error::Tls(e.to_string()))?;
    let (leaf, rest) = chain
        .split_first()
        .ok_or_else(|| Error::Tls("empty chain".into()))?;
    let intermediates: Vec<CertificateDer<'_>> = rest
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    verifier
        .verify_server_cert(
            &CertificateDer::from(leaf.as_slice()),
            &intermediates,
            &ServerName::IpAddress(ip.into()),
            &[],
            UnixTime::now(),
        )
        .map(drop)
        .map_err(|e| Error::Tls(format!("certificate of {ip}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_compare_however_written() {
        let der = b"not really a certificate";
        let f = fingerprint(der);
        assert_eq!(f.len(), 32 * 3 - 1);
        assert!(f
            .chars()
            .all(|c| c == ':' || c.is_ascii_hexdigit() && !c.is_ascii_lowercase()));
        let check =
            |a: &str, b: &str, same: bool| assert_eq!(same_fingerprint(a, b), same, "{a} {b}");
        check(&f, &f.to_lowercase().replace(':', ""), true);
        check(&f, &fingerprint(b"another"), false);
        check("AB:CD", "abcd", false); // too short to be a SHA-256
    }
}
