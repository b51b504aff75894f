//! The expiry (`notAfter`) of an X.509 certificate, from PEM or DER, with a minimal DER walk:
//! Certificate → TBSCertificate → [version] serial signature issuer validity → notAfter.

use crate::time;

/// `notAfter` of the first certificate in `input` (PEM, or DER when no PEM block is found),
/// in milliseconds since the Unix epoch.
pub fn not_after_ms(input: &[u8]) -> Result<i64, String> {
    let der = match pem_block(input, "CERTIFICATE") {
        Some(b64) => base64_decode(&b64).ok_or("the PEM block is not valid base64")?,
        None => input.to_vec(),
    };
    let (tag, cert, _) = tlv(&der).ok_or("not a DER certificate")?;
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

fn pem_block(input: &[u8], label: &str) -> Option<String> {
    let text = std::str::from_utf8(input).ok()?;
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)? + begin.len();
    let stop = start + text[start..].find(&end)?;
    Some(
        text[start..stop]
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect(),
    )
}

fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let bytes = text.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for &c in bytes {
        acc = (acc << 6) | u32::from(value(c)?);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
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
    fn base64() {
        assert_eq!(base64_decode("aGVsbG8gd29ybGQ=").unwrap(), b"hello world");
        assert_eq!(base64_decode("YQ==").unwrap(), b"a");
        assert!(base64_decode("a*b").is_none());
        assert!(not_after_ms(b"junk").is_err());
    }
}
