//! The manifest: plain data, parsed and checked without any I/O.

use std::cmp::Ordering;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Error, CHUNK_SIZE, FORMAT_VERSION};

/// What a bundle holds and what it is for; signed as the exact bytes of `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT_VERSION`] when written.
    pub format: u32,
    /// [`crate::PRODUCT`].
    pub product: String,
    /// [`crate::COMPATIBLE`] for the images built here.
    pub compatible: String,
    /// Dotted numbers (`1.4.0`), compared numerically.
    pub version: String,
    /// Seconds since the Unix epoch.
    pub build_time: u64,
    /// In the order the payloads follow in the tar stream.
    pub payloads: Vec<PayloadInfo>,
}

/// One payload, as the manifest describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadInfo {
    /// Also the tar member's name.
    pub name: PayloadName,
    /// Uncompressed bytes.
    pub size: u64,
    /// sha256 of the uncompressed payload, lowercase hex.
    pub sha256: String,
    pub compression: Compression,
    /// Uncompressed bytes per chunk ([`CHUNK_SIZE`] when written); the last chunk may be short.
    pub chunk_size: u64,
    /// sha256 of every uncompressed chunk, in order, lowercase hex.
    pub chunks: Vec<String>,
}

/// The payloads a bundle can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadName {
    /// The root filesystem image (ext4), written whole into the inactive root slot.
    Rootfs,
    /// The kernel the root filesystem was built with.
    Kernel,
    /// Its initrd.
    Initrd,
}

impl PayloadName {
    /// The name in the manifest and of the tar member.
    pub fn as_str(self) -> &'static str {
        match self {
            PayloadName::Rootfs => "rootfs",
            PayloadName::Kernel => "kernel",
            PayloadName::Initrd => "initrd",
        }
    }
}

impl fmt::Display for PayloadName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a payload is stored in the bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// One zstd stream.
    Zstd,
    /// Stored as is.
    None,
}

/// A release version: dotted decimal numbers, compared numerically (`1.10.0` > `1.9.3`; a
/// missing component counts as 0, so `1.2` == `1.2.0`).
#[derive(Debug, Clone)]
pub struct Version {
    parts: Vec<u64>,
    text: String,
}

impl Version {
    /// Parses `1`, `1.4`, `1.4.0`, … (at most 8 components, each a decimal number).
    pub fn parse(text: &str) -> Result<Version, Error> {
        let bad = |why: &str| Error::Manifest(format!("version {text:?}: {why}"));
        if text.is_empty() {
            return Err(bad("empty"));
        }
        let parts = text
            .split('.')
            .map(|p| {
                if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad("expected dotted decimal numbers such as 1.4.0"));
                }
                p.parse::<u64>()
                    .map_err(|_| bad("a component is too large"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if parts.len() > 8 {
            return Err(bad("more than 8 components"));
        }
        Ok(Version {
            parts,
            text: text.to_string(),
        })
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Version) -> Ordering {
        let n = self.parts.len().max(other.parts.len());
        (0..n)
            .map(|i| {
                let a = self.parts.get(i).copied().unwrap_or(0);
                let b = other.parts.get(i).copied().unwrap_or(0);
                a.cmp(&b)
            })
            .find(|o| o.is_ne())
            .unwrap_or(Ordering::Equal)
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Version) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Version {
    fn eq(&self, other: &Version) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Version {}

impl Manifest {
    /// Parses signed manifest bytes: the format version first (so a newer format is named as
    /// such, not as an unknown field), then the whole structure, then its consistency.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, Error> {
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| Error::Manifest(format!("not JSON: {e}")))?;
        let format = value
            .get("format")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| Error::Manifest("no numeric `format` field".into()))?;
        if format != u64::from(FORMAT_VERSION) {
            return Err(Error::UnsupportedFormat {
                found: format,
                supported: FORMAT_VERSION,
            });
        }
        let manifest: Manifest =
            serde_json::from_value(value).map_err(|e| Error::Manifest(e.to_string()))?;
        manifest.check_consistent()?;
        Ok(manifest)
    }

    /// Internal consistency: a valid version, no payload twice, chunk lists that cover each
    /// payload exactly, hashes that are sha256 hex.
    fn check_consistent(&self) -> Result<(), Error> {
        Version::parse(&self.version)?;
        let mut seen = Vec::new();
        for p in &self.payloads {
            let bad = |why: String| Error::Manifest(format!("payload {}: {why}", p.name));
            if seen.contains(&p.name) {
                return Err(bad("listed twice".into()));
            }
            seen.push(p.name);
            if p.chunk_size == 0 || p.chunk_size > 16 * CHUNK_SIZE {
                return Err(bad(format!(
                    "chunk_size {} (expected 1 to {})",
                    p.chunk_size,
                    16 * CHUNK_SIZE
                )));
            }
            let expected_chunks = p.size.div_ceil(p.chunk_size);
            if p.chunks.len() as u64 != expected_chunks {
                return Err(bad(format!(
                    "{} chunk hashes for {} bytes in chunks of {} (expected {expected_chunks})",
                    p.chunks.len(),
                    p.size,
                    p.chunk_size
                )));
            }
            for (i, h) in std::iter::once(&p.sha256).chain(&p.chunks).enumerate() {
                if !is_sha256_hex(h) {
                    let what = if i == 0 {
                        "sha256".to_string()
                    } else {
                        format!("chunk {} hash", i - 1)
                    };
                    return Err(bad(format!("{what} {h:?} is not 64 lowercase hex digits")));
                }
            }
        }
        Ok(())
    }

    /// The payload described as `name`, if the bundle carries one.
    pub fn payload(&self, name: PayloadName) -> Option<&PayloadInfo> {
        self.payloads.iter().find(|p| p.name == name)
    }
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        let check = |a: &str, b: &str, expected: Ordering| {
            let (va, vb) = (Version::parse(a).unwrap(), Version::parse(b).unwrap());
            assert_eq!(va.cmp(&vb), expected, "{a} vs {b}");
        };
        check("1.10.0", "1.9.3", Ordering::Greater);
        check("1.2", "1.2.0", Ordering::Equal);
        check("2", "10", Ordering::Less);
        check("0.1.0", "0.1.1", Ordering::Less);
        for bad in ["", "1..2", "v1.0", "1.0-rc1", " 1", "1.2.3.4.5.6.7.8.9"] {
            assert!(Version::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
