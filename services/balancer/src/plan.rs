//! From a validated `Cluster` and a node name to what the balancer of that node does (pure).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use cluster_config::{Algorithm, BalancerMode, Cluster, HealthCheck};

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
    /// The node's own address and the floating IP, on `ports.http`.
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
        let ips: Vec<IpAddr> = if me.address == cluster.floating_ip {
            vec![IpAddr::V4(me.address)]
        } else {
            vec![IpAddr::V4(me.address), IpAddr::V4(cluster.floating_ip)]
        };
        Ok(Plan {
            node: node.to_string(),
            backends,
            algorithm: cluster.balancer.algorithm,
            mode: cluster.balancer.mode,
            health: cluster.balancer.health.clone(),
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
        assert!(matches!(
            Plan::new(&c, "server9"),
            Err(BalancerError::UnknownNode(n)) if n == "server9"
        ));
    }
}
