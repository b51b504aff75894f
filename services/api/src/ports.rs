//! Well-known TCP ports a node uses that are not the cluster's to choose: local endpoints that
//! only the node itself reaches. Ports users configure (web, app, database, admin, the
//! balancer's) are `cluster-config`'s `Ports`, never here.

use std::net::{Ipv4Addr, SocketAddr};

/// The balancer's Prometheus endpoint: served by `appliance balancer`, scraped by the admin
/// server (`/metrics`), which the node plan tells where.
pub const BALANCER_METRICS: u16 = 9100;
/// The log monitor's Prometheus endpoint: served by `appliance logmon`, scraped by the admin
/// server like [`BALANCER_METRICS`].
pub const LOGMON_METRICS: u16 = 9101;

/// The address a node's local endpoints listen on: loopback only, the node's own address when
/// that is a loopback address (several nodes of one cluster on a developer machine cannot share
/// `127.0.0.1:port`), else `127.0.0.1`.
pub fn local_ip(node_address: Ipv4Addr) -> Ipv4Addr {
    if node_address.is_loopback() {
        node_address
    } else {
        Ipv4Addr::LOCALHOST
    }
}

/// Where a node's local endpoint on `port` listens (see [`local_ip`]).
pub fn local_addr(node_address: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((local_ip(node_address), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_endpoints_stay_on_loopback_and_apart_on_one_machine() {
        let check = |node: [u8; 4], port, expected: &str| {
            assert_eq!(local_addr(node.into(), port).to_string(), expected);
        };
        check([10, 88, 0, 11], BALANCER_METRICS, "127.0.0.1:9100");
        check([127, 0, 0, 12], LOGMON_METRICS, "127.0.0.12:9101");
        check([127, 0, 0, 11], 8000, "127.0.0.11:8000");
    }
}
