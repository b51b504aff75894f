//! From a validated `Cluster` and a node name to what the balancer of that node does (pure).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use cluster_config::{Algorithm, BalancerMode, Cluster, HealthCheck};

use crate::vip::{VipMode, VipPlan};
use crate::BalancerError;

/// One backend: the nginx of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    /// The node's name (metrics and events use `name` and `addr`).
    pub name: String,
    pub addr: SocketAddr,
    pub weight: u32,
    pub backup: bool,
}

/// What one node's balancer does, derived from the cluster description.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub node: String,
    pub backends: Vec<BackendSpec>,
    pub algorithm: Algorithm,
    pub mode: BalancerMode,
    pub health: HealthCheck,
    /// The floating IP and how it is managed.
    pub vip: VipPlan,
    /// The node's own address and the floating IP (unless another node of a local cluster
    /// holds it), on `ports.http`.
    pub http_listen: Vec<SocketAddr>,
    /// The same addresses on `ports.https`.
    pub https_listen: Vec<SocketAddr>,
    pub domain: String,
    /// Names and addresses the self-signed certificate covers.
    pub self_signed_names: Vec<String>,
    pub certificate: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub hsts_max_age: u64,
}

impl Plan {
    pub fn new(cluster: &Cluster, node: &str) -> Result<Plan, BalancerError> {
        let me = cluster
            .node(node)
            .ok_or_else(|| BalancerError::UnknownNode(node.to_string()))?;
        if cluster.tls.certificate.is_some() != cluster.tls.key.is_some() {
            return Err(BalancerError::Config(
                "tls.certificate and tls.key must be given together".into(),
            ));
        }
        let backends = cluster
            .nodes
            .iter()
            .map(|n| BackendSpec {
                name: n.name.clone(),
                addr: SocketAddr::new(IpAddr::V4(n.address), cluster.ports.web),
                weight: n.weight,
                backup: n.backup,
            })
            .collect();
        // Nodes on loopback addresses share one machine, where every 127/8 address is local
        // and a second bind of the floating IP fails: there the node of highest VRRP priority
        // (the first in the file on a tie) holds it for good and no keepalived runs.
        let mode = if me.address.is_loopback() {
            let top = cluster
                .nodes
                .iter()
                .rev()
                .max_by_key(|n| n.vrrp_priority)
                .map(|n| n.name.as_str());
            VipMode::Fixed {
                holder: top == Some(node),
            }
        } else {
            VipMode::Vrrp
        };
        let binds_vip = mode != VipMode::Fixed { holder: false };
        let mut ips = vec![IpAddr::V4(me.address)];
        if binds_vip && me.address != cluster.floating_ip {
            ips.push(IpAddr::V4(cluster.floating_ip));
        }
        Ok(Plan {
            node: node.to_string(),
            backends,
            algorithm: cluster.balancer.algorithm,
            mode: cluster.balancer.mode,
            health: cluster.balancer.health.clone(),
            vip: VipPlan {
                address: cluster.floating_ip,
                mode,
            },
            http_listen: ips
                .iter()
                .map(|&ip| SocketAddr::new(ip, cluster.ports.http))
                .collect(),
            https_listen: ips
                .iter()
                .map(|&ip| SocketAddr::new(ip, cluster.ports.https))
                .collect(),
            domain: cluster.domain.clone(),
            self_signed_names: vec![
                cluster.domain.clone(),
                format!("*.{}", cluster.domain),
                cluster.floating_ip.to_string(),
                me.address.to_string(),
            ],
            certificate: cluster.tls.certificate.clone(),
            key: cluster.tls.key.clone(),
            hsts_max_age: cluster.tls.hsts_max_age,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_cluster_plan_for_server1() {
        let c = Cluster::default_cluster();
        let p = Plan::new(&c, "server1").unwrap();
        let backends: Vec<String> = p
            .backends
            .iter()
            .map(|b| format!("{} {} w{} backup={}", b.name, b.addr, b.weight, b.backup))
            .collect();
        assert_eq!(
            backends,
            [
                "server1 10.88.0.11:8080 w1 backup=false",
                "server2 10.88.0.12:8080 w1 backup=false"
            ]
        );
        let l = |v: &[SocketAddr]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(l(&p.http_listen), ["10.88.0.11:80", "10.88.0.10:80"]);
        assert_eq!(l(&p.https_listen), ["10.88.0.11:443", "10.88.0.10:443"]);
        assert_eq!(
            p.self_signed_names,
            ["tandem.test", "*.tandem.test", "10.88.0.10", "10.88.0.11"]
        );
        assert_eq!(p.vip.mode, VipMode::Vrrp);
        assert!(matches!(
            Plan::new(&c, "server9"),
            Err(BalancerError::UnknownNode(n)) if n == "server9"
        ));
    }

    #[test]
    fn on_one_machine_only_the_top_priority_node_binds_the_floating_ip() {
        let text = include_str!("../../../examples/local-cluster.toml");
        let c = Cluster::from_toml(text, "local-cluster.toml").unwrap();
        let l = |v: &[SocketAddr]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        let holder = Plan::new(&c, "server1").unwrap();
        assert_eq!(holder.vip.mode, VipMode::Fixed { holder: true });
        assert_eq!(
            l(&holder.https_listen),
            ["127.0.0.11:8443", "127.0.0.10:8443"]
        );
        let other = Plan::new(&c, "server2").unwrap();
        assert_eq!(other.vip.mode, VipMode::Fixed { holder: false });
        assert_eq!(l(&other.https_listen), ["127.0.0.12:8443"]);
        assert_eq!(l(&other.http_listen), ["127.0.0.12:8080"]);
    }
}
