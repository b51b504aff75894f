//! Certificate expiry: which certificate chains the balancer serves (the certificates a
//! client sees), and the `notAfter` of a chain's leaf. PEM is read with rustls-pki-types (the
//! parser rustls ships) and the certificate with x509-cert.

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;
use x509_cert::der::Decode as _;

/// The balancer's state directory below the node's (`appliance::node` creates it) and its
/// persisted self-signed certificate inside (`balancer::tls::self_signed_paths`). Repeated
/// here because services never depend on each other; both belong in the shared `api` crate.
pub const BALANCER_STATE_DIR: &str = "balancer";
pub const BALANCER_SELF_SIGNED: &str = "tls/self-signed.crt";

/// The chain files the balancer serves (pure): the cluster's `tls.certificate` when set (the
/// default for every SNI name), else the self-signed one it generates once and keeps in its
/// state directory.
pub fn served_by_balancer(
    tls_certificate: Option<&Path>,
    balancer_state_dir: &Path,
) -> Vec<PathBuf> {
    match tls_certificate {
        Some(path) => vec![path.to_path_buf()],
        None => vec![balancer_state_dir.join(BALANCER_SELF_SIGNED)],
    }
}

/// `notAfter` of the first certificate (the leaf of a chain file) in `input`, PEM or DER, in
/// milliseconds since the Unix epoch.
pub fn not_after_ms(input: &[u8]) -> Result<i64, String> {
    match CertificateDer::pem_slice_iter(input).next() {
        Some(Ok(leaf)) => der_not_after_ms(&leaf),
        Some(Err(e)) => Err(format!("bad PEM: {e}")),
        None if input.windows(11).any(|w| w == b"-----BEGIN ") => {
            Err("no certificate in the PEM file".into())
        }
        None => der_not_after_ms(input),
    }
}

/// `notAfter` of one DER certificate.
fn der_not_after_ms(der: &[u8]) -> Result<i64, String> {
    let cert =
        x509_cert::Certificate::from_der(der).map_err(|e| format!("not a DER certificate: {e}"))?;
    let not_after = cert.tbs_certificate().validity().not_after;
    i64::try_from(not_after.to_unix_duration().as_millis())
        .map_err(|_| format!("notAfter {not_after} is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time;

    /// A self-signed certificate valid until `y-m-d h:mi:s` UTC, PEM and DER.
    fn cert_until((y, m, d): (i32, u8, u8), (h, mi, s): (u8, u8, u8)) -> (String, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["example.test".into()]).unwrap();
        p.not_before = rcgen::date_time_ymd(1990, 1, 1);
        p.not_after = rcgen::date_time_ymd(y, m, d)
            .replace_hour(h)
            .and_then(|t| t.replace_minute(mi))
            .and_then(|t| t.replace_second(s))
            .unwrap();
        let cert = p.self_signed(&key).unwrap();
        (cert.pem(), cert.der().to_vec())
    }

    #[test]
    fn leaf_not_after_from_pem_and_der() {
        // UTCTime before 2050 (two-digit years on both sides of 2000), GeneralizedTime after.
        for (date, clock, iso) in [
            ((1999, 12, 31), (23, 59, 59), "1999-12-31T23:59:59.000Z"),
            ((2025, 1, 2), (3, 4, 5), "2025-01-02T03:04:05.000Z"),
            ((2049, 12, 31), (0, 0, 0), "2049-12-31T00:00:00.000Z"),
            ((2099, 12, 31), (23, 59, 59), "2099-12-31T23:59:59.000Z"),
        ] {
            let expected = time::parse_iso_ms(iso).unwrap();
            let (pem, der) = cert_until(date, clock);
            assert_eq!(not_after_ms(pem.as_bytes()), Ok(expected), "{iso} (PEM)");
            assert_eq!(not_after_ms(&der), Ok(expected), "{iso} (DER)");
        }
        // A chain file: the leaf is the first certificate, whatever comes before or after it.
        let (leaf, _) = cert_until((2030, 6, 1), (12, 0, 0));
        let (issuer, _) = cert_until((2040, 1, 1), (12, 0, 0));
        let key = rcgen::KeyPair::generate().unwrap().serialize_pem();
        let chain = format!("{key}{leaf}{issuer}");
        assert_eq!(
            not_after_ms(chain.as_bytes()),
            Ok(time::parse_iso_ms("2030-06-01T12:00:00.000Z").unwrap())
        );
    }

    #[test]
    fn served_chains() {
        let state = Path::new("/data/tandem/balancer");
        assert_eq!(
            served_by_balancer(None, state),
            [PathBuf::from("/data/tandem/balancer/tls/self-signed.crt")]
        );
        assert_eq!(
            served_by_balancer(Some(Path::new("/data/tls/cert.pem")), state),
            [PathBuf::from("/data/tls/cert.pem")]
        );
    }

    #[test]
    fn not_certificates() {
        for (input, expected) in [
            (&b"junk"[..], "not a DER certificate"),
            (b"", "not a DER certificate"),
            (
                b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
                "no certificate",
            ),
            (
                b"-----BEGIN CERTIFICATE-----\n*\n-----END CERTIFICATE-----\n",
                "bad PEM",
            ),
            // A certificate SEQUENCE whose TBSCertificate is cut short.
            (b"\x30\x03\x30\x01\x00", "not a DER certificate"),
            (
                b"-----BEGIN CERTIFICATE-----\nMAMwAQA=\n-----END CERTIFICATE-----\n",
                "not a DER certificate",
            ),
        ] {
            let got = not_after_ms(input).unwrap_err();
            assert!(got.contains(expected), "{input:?}: {got}");
        }
    }
}
