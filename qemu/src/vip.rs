//! Who holds the floating IP, as a client on the LAN sees it: whoever answers ARP for it.
//!
//! `arping` (iputils) from the client's bridge, broadcasting every request (`-b`: after the first
//! reply iputils would otherwise switch to unicast and hear only that holder), so two holders in
//! a split brain both show. Its output, one line per reply:
//!
//! ```text
//! ARPING 10.88.0.10 from 10.88.0.1 br0
//! Unicast reply from 10.88.0.10 [52:54:00:58:00:0B]  0.549ms
//! Unicast reply from 10.88.0.10 [52:54:00:58:00:0C]  0.588ms
//! Sent 3 probes (3 broadcast(s))
//! Received 2 response(s)
//! ```

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::machine::{format_mac, mac_for};
use crate::netns::{Netns, BRIDGE};
use crate::session::Cancel;
use crate::tools;

/// How long one look lasts: `arping -w` (seconds); it sends a request every second meanwhile.
pub const ARPING_SECONDS: u32 = 2;

/// The distinct MACs that answered for `ip` in `arping` output, in order of first reply.
pub fn parse_arping(output: &str, ip: Ipv4Addr) -> Vec<[u8; 6]> {
    let mut macs = Vec::new();
    for line in output.lines() {
        let Some(rest) = line
            .strip_prefix("Unicast reply from ")
            .or_else(|| line.strip_prefix("Broadcast reply from "))
        else {
            continue;
        };
        let Some((from, rest)) = rest.split_once(' ') else {
            continue;
        };
        if from.parse::<Ipv4Addr>() != Ok(ip) {
            continue;
        }
        let Some(mac) = rest
            .strip_prefix('[')
            .and_then(|r| r.split_once(']'))
            .and_then(|(m, _)| parse_mac(m))
        else {
            continue;
        };
        if !macs.contains(&mac) {
            macs.push(mac);
        }
    }
    macs
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Name each MAC by the node whose [`mac_for`] address gives it; an unknown MAC stays as text.
/// Sorted, so that the same holders always read the same.
pub fn name_holders<'a>(
    macs: &[[u8; 6]],
    nodes: impl IntoIterator<Item = (&'a str, Ipv4Addr)> + Clone,
) -> Vec<String> {
    let mut names: Vec<String> = macs
        .iter()
        .map(|mac| {
            nodes
                .clone()
                .into_iter()
                .find(|(_, addr)| mac_for(*addr) == *mac)
                .map(|(name, _)| name.to_string())
                .unwrap_or_else(|| format_mac(*mac))
        })
        .collect();
    names.sort();
    names
}

/// The MACs that answer ARP for `ip` on the namespace's bridge, during [`ARPING_SECONDS`].
pub fn arp_macs(netns: &Netns, ip: Ipv4Addr) -> Result<Vec<[u8; 6]>> {
    let arping = tools::find(tools::ARPING)?;
    let arping = arping.to_string_lossy();
    let (wait, ip_text) = (ARPING_SECONDS.to_string(), ip.to_string());
    let argv = [&*arping, "-b", "-w", &wait, "-I", BRIDGE, &ip_text];
    let out = netns.output(&argv)?;
    // 0: replies; 1: none (or fewer than asked). Anything else is arping failing.
    if !matches!(out.status.code(), Some(0 | 1)) {
        return Err(Error::Command {
            command: argv.join(" "),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(parse_arping(&String::from_utf8_lossy(&out.stdout), ip))
}

/// `server1`, `server1 and server2`, `nobody`: holders for messages.
pub fn describe_holders(holders: &[String]) -> String {
    match holders {
        [] => "nobody".into(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

/// Poll `look` until exactly one holder answers; at most `timeout`, stopping if `cancel` fires.
pub(crate) fn wait_single(
    vip: Ipv4Addr,
    timeout: Duration,
    cancel: &Cancel,
    mut look: impl FnMut() -> Result<Vec<String>>,
) -> Result<String> {
    let t0 = Instant::now();
    loop {
        let holders = look()?;
        if let [one] = holders.as_slice() {
            return Ok(one.clone());
        }
        if cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        if t0.elapsed() >= timeout {
            return Err(Error::Timeout {
                what: format!("exactly one node to hold the floating IP {vip}"),
                after: timeout,
                last: Some(format!("{} answered ARP", describe_holders(&holders))),
            });
        }
        if !cancel.sleep(Duration::from_millis(500)) {
            return Err(Error::Cancelled);
        }
    }
}

/// What a series of looks at the holders (one every few seconds) says about stability.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HolderStats {
    pub samples: usize,
    /// Times the set of holders differed from the previous look (a failover counts one when the
    /// new holder answers at once, two when a look in between saw nobody).
    pub changes: usize,
    pub nobody: usize,
    /// Looks where two or more nodes answered: a split brain.
    pub several: usize,
}

pub fn holder_stats(samples: &[Vec<String>]) -> HolderStats {
    HolderStats {
        samples: samples.len(),
        changes: samples.windows(2).filter(|w| w[0] != w[1]).count(),
        nobody: samples.iter().filter(|s| s.is_empty()).count(),
        several: samples.iter().filter(|s| s.len() > 1).count(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VIP: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 10);

    fn mac(s: &str) -> [u8; 6] {
        parse_mac(s).unwrap()
    }

    #[test]
    fn parses_arping_replies() {
        let check = |out: &str, expected: &[&str]| {
            let got: Vec<String> = parse_arping(out, VIP).into_iter().map(format_mac).collect();
            assert_eq!(got, expected, "{out}");
        };
        // One holder (iputils-arping 20221126, `-b -w 2 -I br0 10.88.0.10`).
        check(
            "ARPING 10.88.0.10 from 10.88.0.1 br0\n\
             Unicast reply from 10.88.0.10 [52:54:00:58:00:0B]  0.540ms\n\
             Unicast reply from 10.88.0.10 [52:54:00:58:00:0B]  0.558ms\n\
             Sent 3 probes (3 broadcast(s))\n\
             Received 2 response(s)\n",
            &["52:54:00:58:00:0b"],
        );
        // Split brain: both answer every broadcast request.
        check(
            "ARPING 10.88.0.10 from 10.88.0.1 br0\n\
             Unicast reply from 10.88.0.10 [52:54:00:58:00:0C]  0.549ms\n\
             Unicast reply from 10.88.0.10 [52:54:00:58:00:0B]  0.588ms\n\
             Unicast reply from 10.88.0.10 [52:54:00:58:00:0C]  0.556ms\n\
             Unicast reply from 10.88.0.10 [52:54:00:58:00:0B]  0.589ms\n\
             Sent 3 probes (3 broadcast(s))\n\
             Received 4 response(s)\n",
            &["52:54:00:58:00:0c", "52:54:00:58:00:0b"],
        );
        // Nobody.
        check(
            "ARPING 10.88.0.10 from 10.88.0.1 br0\nSent 3 probes (3 broadcast(s))\nReceived 0 response(s)\n",
            &[],
        );
        // A reply sent as a link-level broadcast counts too.
        check(
            "Broadcast reply from 10.88.0.10 [52:54:00:58:00:0C]  1.2ms\n",
            &["52:54:00:58:00:0c"],
        );
        // Replies for another address, broken MACs and other lines are ignored.
        check(
            "Unicast reply from 10.88.0.11 [52:54:00:58:00:0B]  0.5ms\n\
             Unicast reply from 10.88.0.10 [52:54:00:58:00]  0.5ms\n\
             Unicast reply from 10.88.0.10 [52:54:00:58:00:0B:01]  0.5ms\n\
             Unicast reply from 10.88.0.10 [zz:54:00:58:00:0B]  0.5ms\n\
             Unicast reply from 10.88.0.10\n\
             arping: Device br0 not available.\n",
            &[],
        );
        check("", &[]);
    }

    #[test]
    fn names_holders_by_mac() {
        let nodes = [
            ("server1", Ipv4Addr::new(10, 88, 0, 11)),
            ("server2", Ipv4Addr::new(10, 88, 0, 12)),
        ];
        let check = |macs: &[&str], expected: &[&str]| {
            let macs: Vec<_> = macs.iter().map(|m| mac(m)).collect();
            assert_eq!(name_holders(&macs, nodes), expected);
        };
        check(&["52:54:00:58:00:0b"], &["server1"]);
        check(
            &["52:54:00:58:00:0c", "52:54:00:58:00:0b"],
            &["server1", "server2"],
        );
        check(&["02:00:00:00:00:01"], &["02:00:00:00:00:01"]);
        check(&[], &[]);
    }

    #[test]
    fn holder_descriptions() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(describe_holders(&[]), "nobody");
        assert_eq!(describe_holders(&s(&["server1"])), "server1");
        assert_eq!(describe_holders(&s(&["a", "b"])), "a and b");
        assert_eq!(describe_holders(&s(&["a", "b", "c"])), "a, b and c");
    }

    #[test]
    fn holder_stats_count_changes() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let check = |samples: &[&[&str]], changes, nobody, several| {
            let samples: Vec<_> = samples.iter().map(|x| s(x)).collect();
            assert_eq!(
                holder_stats(&samples),
                HolderStats {
                    samples: samples.len(),
                    changes,
                    nobody,
                    several
                },
                "{samples:?}"
            );
        };
        check(&[], 0, 0, 0);
        check(&[&["a"], &["a"], &["a"]], 0, 0, 0);
        check(&[&["a"], &["b"], &["b"]], 1, 0, 0);
        check(&[&["a"], &[], &["b"]], 2, 1, 0);
        check(&[&["a"], &["a", "b"], &["a"]], 2, 0, 1);
    }

    #[test]
    fn waits_for_a_single_holder() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut looks = vec![s(&[]), s(&["a", "b"]), s(&["b"])].into_iter();
        let got = wait_single(VIP, Duration::from_secs(60), &Cancel::new(), || {
            Ok(looks.next().unwrap())
        });
        assert_eq!(got.unwrap(), "b");

        let err = wait_single(VIP, Duration::ZERO, &Cancel::new(), || Ok(s(&["a", "b"])))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("10.88.0.10") && err.contains("a and b answered ARP"),
            "{err}"
        );

        let cancel = Cancel::new();
        cancel.cancel();
        let err = wait_single(VIP, Duration::from_secs(60), &cancel, || Ok(Vec::new()));
        assert!(matches!(err, Err(Error::Cancelled)), "{err:?}");
    }
}
