//! The cluster secret and what is derived from it.
//!
//! Every node of a cluster holds the same 32-byte cluster secret (a file of 64 hex digits,
//! written by the image-builder into the seed or by `appliance run` on a developer machine).
//! Each database password is `hex(HMAC-SHA256(secret, purpose))` with the purposes
//! `replication`, `app` and `admin`, so replicas know the replication password without asking
//! anyone, and nothing but the secret file needs provisioning.

use hmac::{Hmac, Mac as _};
use sha2::Sha256;

/// Length of the cluster secret in bytes.
pub const SECRET_LEN: usize = 32;
/// The secret's file name (in the seed's root, or a developer state directory).
pub const SECRET_FILE: &str = "cluster.secret";

/// The purposes passwords are derived for.
pub const PURPOSES: [&str; 3] = ["replication", "app", "admin"];

/// Parses the secret file's text: 64 hex digits (surrounding whitespace ignored).
pub fn parse_secret(text: &str) -> Result<[u8; SECRET_LEN], String> {
    let text = text.trim();
    let mut out = [0u8; SECRET_LEN];
    hex::decode_to_slice(text, &mut out).map_err(|_| {
        format!(
            "expected {} hex digits, found {} characters",
            SECRET_LEN * 2,
            text.len()
        )
    })?;
    Ok(out)
}

/// A new secret from the kernel's random source (`/dev/urandom`).
pub fn generate() -> std::io::Result<[u8; SECRET_LEN]> {
    let mut secret = [0u8; SECRET_LEN];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut secret)?;
    Ok(secret)
}

/// The secret file's text for `secret`.
pub fn format_secret(secret: &[u8; SECRET_LEN]) -> String {
    format!("{}\n", hex::encode(secret))
}

/// The password for one purpose: 64 lowercase hex digits.
pub fn derive_password(secret: &[u8; SECRET_LEN], purpose: &str) -> String {
    // HMAC takes a key of any length; this cannot fail.
    let mut mac = <Hmac<Sha256> as hmac::digest::KeyInit>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(purpose.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc4231_case_2_and_passwords_differ_by_purpose() {
        // RFC 4231 test case 2 ("Jefe"), through the same construction.
        let mut mac = <Hmac<Sha256> as hmac::digest::KeyInit>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let secret = [7u8; SECRET_LEN];
        let a = derive_password(&secret, "app");
        assert_eq!(a.len(), 64);
        assert_ne!(a, derive_password(&secret, "replication"));
        assert_eq!(a, derive_password(&secret, "app"));
    }

    #[test]
    fn secrets_parse_and_bad_ones_are_named() {
        let secret = [0xabu8; SECRET_LEN];
        assert_eq!(parse_secret(&format_secret(&secret)).unwrap(), secret);
        // Two fresh secrets differ.
        assert_ne!(generate().unwrap(), generate().unwrap());
        assert_eq!(
            parse_secret("abc").unwrap_err(),
            "expected 64 hex digits, found 3 characters"
        );
        let bad = "zz".repeat(SECRET_LEN);
        assert!(parse_secret(&bad).is_err());
    }
}
