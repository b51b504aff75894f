//! Linux capabilities by name: what a [`super::ServiceSpec`] may keep. Pure.
//!
//! Names are the kernel's without the `CAP_` prefix (`NET_BIND_SERVICE`); in JSON a spec may
//! write either form. Numbers are those of `linux/capability.h`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The kernel's capabilities in number order (`CHOWN` is 0). A kernel may know fewer
/// (`/proc/sys/kernel/cap_last_cap`) or more; more are dropped from bounding sets too.
const NAMES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// One capability, by its kernel number.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Capability(u8);

impl Capability {
    pub const CHOWN: Capability = Capability(0);
    pub const DAC_OVERRIDE: Capability = Capability(1);
    pub const DAC_READ_SEARCH: Capability = Capability(2);
    pub const SETGID: Capability = Capability(6);
    pub const SETUID: Capability = Capability(7);
    pub const LINUX_IMMUTABLE: Capability = Capability(9);
    pub const NET_BIND_SERVICE: Capability = Capability(10);
    pub const NET_ADMIN: Capability = Capability(12);
    pub const NET_RAW: Capability = Capability(13);
    pub const SYS_ADMIN: Capability = Capability(21);
    pub const SYS_NICE: Capability = Capability(23);

    /// The kernel's number (`CAP_NET_BIND_SERVICE` is 10).
    pub fn number(self) -> u32 {
        u32::from(self.0)
    }

    pub fn name(self) -> &'static str {
        NAMES[usize::from(self.0)]
    }

    /// `NET_BIND_SERVICE` or `CAP_NET_BIND_SERVICE`.
    pub fn from_name(name: &str) -> Option<Capability> {
        let bare = name.strip_prefix("CAP_").unwrap_or(name);
        NAMES
            .iter()
            .position(|n| *n == bare)
            .and_then(|i| u8::try_from(i).ok())
            .map(Capability)
    }
}

/// The capabilities as a bit set, bit N for capability N (the layout of `capget(2)`'s two
/// 32-bit words, and of /proc/PID/status's `CapBnd`).
pub fn mask(caps: &[Capability]) -> u64 {
    caps.iter().fold(0, |m, c| m | (1u64 << c.number()))
}

impl fmt::Debug for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for Capability {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Capability {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Capability::from_name(&name).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "`{name}` is not a capability name like \"NET_BIND_SERVICE\""
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers() {
        let check = |name: &str, expected: Option<(u32, &str)>| {
            let got = Capability::from_name(name).map(|c| (c.number(), c.name()));
            assert_eq!(got, expected, "{name}");
        };
        check("CHOWN", Some((0, "CHOWN")));
        check("CAP_NET_BIND_SERVICE", Some((10, "NET_BIND_SERVICE")));
        check("NET_ADMIN", Some((12, "NET_ADMIN")));
        check("NET_RAW", Some((13, "NET_RAW")));
        check("SYS_ADMIN", Some((21, "SYS_ADMIN")));
        check("CHECKPOINT_RESTORE", Some((40, "CHECKPOINT_RESTORE")));
        check("net_raw", None);
        check("CAP_", None);
        check("ALL", None);
        for (c, n) in [
            (Capability::CHOWN, 0),
            (Capability::DAC_OVERRIDE, 1),
            (Capability::SETGID, 6),
            (Capability::SETUID, 7),
            (Capability::NET_BIND_SERVICE, 10),
            (Capability::NET_ADMIN, 12),
            (Capability::NET_RAW, 13),
            (Capability::SYS_NICE, 23),
        ] {
            assert_eq!(Capability::from_name(c.name()), Some(c));
            assert_eq!(c.number(), n, "{c}");
        }
    }

    #[test]
    fn masks_are_proc_status_bits() {
        assert_eq!(mask(&[]), 0);
        assert_eq!(mask(&[Capability::NET_BIND_SERVICE]), 0x400);
        assert_eq!(
            mask(&[Capability::CHOWN, Capability::SETGID, Capability::SETUID]),
            0xc1
        );
        assert_eq!(
            mask(&[Capability::from_name("CHECKPOINT_RESTORE").unwrap()]),
            1 << 40
        );
    }

    #[test]
    fn json() {
        let caps: Vec<Capability> =
            serde_json::from_str(r#"["NET_ADMIN", "CAP_NET_RAW"]"#).unwrap();
        assert_eq!(caps, [Capability::NET_ADMIN, Capability::NET_RAW]);
        assert_eq!(
            serde_json::to_string(&caps).unwrap(),
            r#"["NET_ADMIN","NET_RAW"]"#
        );
        let err = serde_json::from_str::<Vec<Capability>>(r#"["ROOT"]"#).unwrap_err();
        assert!(err.to_string().contains("not a capability name"), "{err}");
    }
}
