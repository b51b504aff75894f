//! Which network interface carries an address: keepalived needs the interface name for the
//! floating IP, and a node knows only its own address.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::Context as _;

/// The interface that has `address` (from `ip -o -4 addr show`).
pub fn interface_with(address: Ipv4Addr) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .context("running `ip -o -4 addr show` (is iproute2 installed?)")?;
    anyhow::ensure!(
        out.status.success(),
        "`ip -o -4 addr show` failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    parse(&String::from_utf8_lossy(&out.stdout), address)
        .with_context(|| format!("no network interface has the node's address {address}"))
}

/// Finds `address` in `ip -o -4 addr show` output (pure): `2: eth0    inet 10.88.0.11/24 ...`.
fn parse(text: &str, address: Ipv4Addr) -> Option<String> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        let _index = words.next()?;
        let name = words.next()?;
        let (_, rest) = line.split_once(" inet ")?;
        let cidr = rest.split_whitespace().next()?;
        let ip: Ipv4Addr = cidr.split('/').next()?.parse().ok()?;
        // `eth0@if12` is how `ip` names a veth's peer link; the interface is `eth0`.
        (ip == address).then(|| name.split('@').next().unwrap_or(name).to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_interface_of_an_address() {
        let text = "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever\n\
                    2: eth0    inet 10.88.0.11/24 scope global eth0\\       valid_lft forever preferred_lft forever\n\
                    2: eth0    inet 10.88.0.10/24 scope global secondary eth0\\       valid_lft forever\n\
                    7: veth1@if6    inet 10.88.0.12/24 scope global veth1\\       valid_lft forever\n";
        let check = |ip: [u8; 4], want: Option<&str>| {
            assert_eq!(parse(text, Ipv4Addr::from(ip)).as_deref(), want, "{ip:?}");
        };
        check([10, 88, 0, 11], Some("eth0"));
        check([10, 88, 0, 12], Some("veth1"));
        check([127, 0, 0, 1], Some("lo"));
        check([10, 88, 0, 13], None);
        assert_eq!(parse("garbage\n\n1:\n", Ipv4Addr::LOCALHOST), None);
    }
}
