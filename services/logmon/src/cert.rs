//! Certificate expiry: which certificate chains the balancer serves (the certificates a
//! client sees), and the `notAfter` of a chain's leaf. PEM is read with ureq's parser (the
//! rustls one, already in the binary); the leaf's DER is walked just far enough:
//! Certificate → TBSCertificate → [version] serial signature issuer validity → notAfter.

use std::path::{Path, PathBuf};

use ureq::tls::PemItem;

use crate::time;

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
    let leaf = ureq::tls::parse_pem(input).find_map(|item| match item {
        Ok(PemItem::Certificate(c)) => Some(Ok(c)),
        Ok(_) => None,
        Err(e) => Some(Err(format!("bad PEM: {e}"))),
    });
    match leaf {
        Some(cert) => der_not_after_ms(cert?.der()),
        None if input.windows(11).any(|w| w == b"-----BEGIN ") => {
            Err("no certificate in the PEM file".into())
        }
        None => der_not_after_ms(input),
    }
}

/// `notAfter` of one DER certificate.
fn der_not_after_ms(der: &[u8]) -> Result<i64, String> {
    let (tag, cert, _) = tlv(der).ok_or("not a DER certificate")?;
    let (tag2, tbs, _) = tlv(cert)
        .filter(|_| tag == 0x30)
        .ok_or("not a DER certificate")?;
    if tag2 != 0x30 {
        return Err("no TBSCertificate".into());
    }
    let mut rest = tbs;
    let mut next = || -> Result<(u8, &[u8]), String> {
        let (t, content, after) = tlv(rest).ok_or("truncated TBSCertificate")?;
        rest = after;
        Ok((t, content))
    };
    let (mut t, _) = next()?;
    if t == 0xA0 {
        // Explicit version tag; the serial follows.
        t = next()?.0;
    }
    if t != 0x02 {
        return Err("no serial number".into());
    }
    let _signature = next()?;
    let _issuer = next()?;
    let (t, validity) = next()?;
    if t != 0x30 {
        return Err("no validity".into());
    }
    let (_, _, after_not_before) = tlv(validity).ok_or("no notBefore")?;
    let (t, not_after, _) = tlv(after_not_before).ok_or("no notAfter")?;
    let text = std::str::from_utf8(not_after).map_err(|_| "notAfter is not text")?;
    asn1_time_ms(t, text).ok_or_else(|| format!("notAfter {text:?} is not a UTC time"))
}

/// UTCTime (tag 0x17, `YYMMDDHHMMSSZ`) or GeneralizedTime (0x18, `YYYYMMDDHHMMSSZ`).
pub fn asn1_time_ms(tag: u8, text: &str) -> Option<i64> {
    let digits = text.strip_suffix('Z')?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (year, rest) = match (tag, digits.len()) {
        (0x17, 12) => {
            let yy: i64 = digits[..2].parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &digits[2..])
        }
        (0x18, 14) => (digits[..4].parse().ok()?, &digits[4..]),
        _ => return None,
    };
    let n = |i: usize| rest[i..i + 2].parse::<i64>().ok();
    time::civil_ms(year, n(0)?, n(2)?, n(4)?, n(6)?, n(8)?)
}

/// One DER TLV: tag, content, the rest after it.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        rest = &rest[n..];
        len
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asn1_times() {
        assert_eq!(
            asn1_time_ms(0x17, "250102030405Z"),
            time::parse_iso_ms("2025-01-02T03:04:05.000Z")
        );
        assert_eq!(
            asn1_time_ms(0x17, "991231235959Z"),
            time::parse_iso_ms("1999-12-31T23:59:59.000Z")
        );
        assert_eq!(
            asn1_time_ms(0x18, "20991231235959Z"),
            time::parse_iso_ms("2099-12-31T23:59:59.000Z")
        );
        for (tag, bad) in [
            (0x17, "2501020304Z"),
            (0x18, "250102030405Z"),
            (0x17, "250102030405"),
            (0x17, "25010203040xZ"),
        ] {
            assert_eq!(asn1_time_ms(tag, bad), None, "{bad}");
        }
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
            (b"\x30\x03\x30\x01\x00", "truncated TBSCertificate"),
        ] {
            let got = not_after_ms(input).unwrap_err();
            assert!(got.contains(expected), "{input:?}: {got}");
        }
    }
}
