//! Calls to the other nodes' peer API (their admin port, mutual TLS with the cluster CA): the
//! node presents the certificate from its seed and trusts only the cluster CA.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use api::vip::VipStatus;
use cluster_config::{Cluster, Node};

/// A peer that does not answer this fast is reported as unreachable.
pub const PEER_TIMEOUT: Duration = Duration::from_millis(800);
/// Largest answer read from a peer.
const MAX_ANSWER_BYTES: u64 = 1 << 20;
/// The peer API's floating-IP view.
pub const VIP_PATH: &str = "/api/peer/vip";

/// The files of a node's TLS directory: its certificate (client and server), its key, and the
/// cluster CA's certificate.
pub const NODE_CERT: &str = "node.crt";
pub const NODE_KEY: &str = "node.key";
pub const CA_CERT: &str = "ca.crt";

/// The seed's TLS directory on an image (`node.crt`, `node.key`, `ca.crt`).
pub fn seed_tls_dir() -> PathBuf {
    Path::new(api::files::SEED_MOUNT).join(api::files::SEED_TLS_DIR)
}

/// An HTTPS client that authenticates as this node, or `None` without the seed's certificates
/// (a developer machine: no peer API there).
pub struct PeerClient {
    agent: ureq::Agent,
}

impl PeerClient {
    pub fn from_dir(dir: &Path) -> anyhow::Result<Option<PeerClient>> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
        };
        if !dir.join(NODE_CERT).exists() {
            return Ok(None);
        }
        let ca = ureq::tls::Certificate::from_pem(&read(CA_CERT)?).context("the cluster CA")?;
        let chain = ureq::tls::parse_pem(&read(NODE_CERT)?)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect::<Vec<_>>();
        anyhow::ensure!(!chain.is_empty(), "no certificate in node.crt");
        let key = ureq::tls::PrivateKey::from_pem(&read(NODE_KEY)?).context(NODE_KEY)?;
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::new_with_certs(&[ca]))
            .client_cert(Some(ureq::tls::ClientCert::new_with_certs(&chain, key)))
            .build();
        let agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .timeout_global(Some(PEER_TIMEOUT))
            .http_status_as_error(false)
            .build()
            .new_agent();
        Ok(Some(PeerClient { agent }))
    }

    fn url(cluster: &Cluster, peer: &Node, path: &str) -> String {
        format!("https://{}:{}{path}", peer.address, cluster.ports.admin)
    }

    /// GET `path` on `peer`; the body of a 200.
    pub fn get(&self, cluster: &Cluster, peer: &Node, path: &str) -> anyhow::Result<String> {
        let url = Self::url(cluster, peer, path);
        let mut resp = self
            .agent
            .get(&url)
            .call()
            .with_context(|| format!("GET {url}"))?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER_BYTES)
            .read_to_string()
            .with_context(|| format!("reading the answer of {url}"))?;
        anyhow::ensure!(status == 200, "GET {url}: {status} {}", body.trim());
        Ok(body)
    }

    /// The peer's own view of the floating IP.
    pub fn vip(&self, cluster: &Cluster, peer: &Node) -> anyhow::Result<VipStatus> {
        let body = self.get(cluster, peer, VIP_PATH)?;
        VipStatus::from_json(&body).map_err(|e| anyhow::anyhow!("{}: {e}", peer.name))
    }
}

/// Every node's view of the floating IP: this node's from its file, the others' over the peer
/// API (in parallel, each bounded by [`PEER_TIMEOUT`]). `Err` says why a node has none.
pub fn vip_views(
    cluster: &Cluster,
    me: &Node,
    own: Result<VipStatus, String>,
    client: Option<&PeerClient>,
) -> Vec<(String, Result<VipStatus, String>)> {
    std::thread::scope(|s| {
        let handles: Vec<_> = cluster
            .nodes
            .iter()
            .map(|n| {
                let own = own.clone();
                (
                    n.name.clone(),
                    s.spawn(move || {
                        if n.name == me.name {
                            own
                        } else {
                            match client {
                                Some(c) => c.vip(cluster, n).map_err(|e| format!("{e:#}")),
                                None => Err("no peer API on this machine".into()),
                            }
                        }
                    }),
                )
            })
            .collect();
        handles
            .into_iter()
            .map(|(name, h)| {
                let view = h
                    .join()
                    .unwrap_or_else(|_| Err("peer query panicked".into()));
                (name, view)
            })
            .collect()
    })
}

/// This node's view of the floating IP, from the balancer's status file in `vip_dir`.
pub fn own_vip(vip_dir: &Path) -> Result<VipStatus, String> {
    let path = vip_dir.join(api::vip::STATUS_FILE);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("no floating IP status yet ({}: {e})", path.display()))?;
    VipStatus::from_json(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// One line on who holds the floating IP, from every node's view (pure).
pub fn holder_line(address: &str, views: &[(String, Result<VipStatus, String>)]) -> String {
    let ok: Vec<(String, Option<VipStatus>)> = views
        .iter()
        .map(|(n, v)| (n.clone(), v.as_ref().ok().cloned()))
        .collect();
    let holders = api::vip::holders(&ok);
    let unknown: Vec<&str> = views
        .iter()
        .filter(|(_, v)| v.is_err())
        .map(|(n, _)| n.as_str())
        .collect();
    let mut line = match holders.as_slice() {
        [] => format!("floating IP {address}: no node holds it"),
        [one] => format!("floating IP {address}: held by {one}"),
        many => format!(
            "floating IP {address}: SPLIT BRAIN, held by {}",
            many.join(" and ")
        ),
    };
    if !unknown.is_empty() {
        line.push_str(&format!(" (no answer from {})", unknown.join(", ")));
    }
    line
}

/// The floating-IP line of `appliance status`: every node's view when this machine has the
/// seed's certificates (an image), else this node's own; `None` when no balancer ever wrote
/// a status (a supervisor without the node's stack).
pub fn status_line(state_dir: Option<&Path>) -> Option<String> {
    let layout = match state_dir {
        Some(dir) => crate::layout::Layout::dev(dir),
        None => crate::layout::Layout::image(),
    };
    let own = own_vip(&layout.vip_dir()).ok()?;
    let on_image = state_dir.is_none();
    let node_args = crate::args::NodeArgs {
        config: None,
        node: None,
    };
    let identity = on_image.then(|| node_args.load().ok()).flatten();
    let client = PeerClient::from_dir(&seed_tls_dir()).ok().flatten();
    match (identity, client) {
        (Some((cluster, me)), Some(client)) => {
            let views = vip_views(&cluster, &me, Ok(own.clone()), Some(&client));
            Some(format!(
                "{}; this node: {}",
                holder_line(&own.address, &views),
                own.state.map_or("unknown", |s| s.as_str())
            ))
        }
        _ => Some(own_line(&own)),
    }
}

/// This node's view alone (pure).
fn own_line(own: &VipStatus) -> String {
    let state = own.state.map_or("unknown", |s| s.as_str());
    match (own.mode.as_str(), own.is_holder()) {
        ("fixed", true) => format!(
            "floating IP {}: held by this node ({}; a local cluster's top-priority node holds it for good)",
            own.address, own.node
        ),
        ("fixed", false) => format!(
            "floating IP {}: held by another node (a local cluster's top-priority node holds it for good)",
            own.address
        ),
        (_, true) => format!("floating IP {}: held by this node ({})", own.address, own.node),
        _ => format!(
            "floating IP {}: this node ({}) is {state}; another node holds it or none does",
            own.address, own.node
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::vip::VrrpState;

    fn view(node: &str, state: Option<VrrpState>) -> (String, Result<VipStatus, String>) {
        (
            node.to_string(),
            Ok(VipStatus {
                address: "10.88.0.10".into(),
                node: node.into(),
                state,
                since_ms: 0,
                transitions: 1,
                became_master: 0,
                mode: "vrrp".into(),
            }),
        )
    }

    #[test]
    fn a_node_alone_says_what_it_knows() {
        use VrrpState::*;
        let status = |state, mode: &str| {
            let mut v = view("server1", Some(state)).1.unwrap();
            v.mode = mode.into();
            own_line(&v)
        };
        assert_eq!(
            status(Master, "fixed"),
            "floating IP 10.88.0.10: held by this node (server1; a local cluster's top-priority node holds it for good)"
        );
        assert!(status(Backup, "fixed").starts_with("floating IP 10.88.0.10: held by another node"));
        assert_eq!(
            status(Master, "vrrp"),
            "floating IP 10.88.0.10: held by this node (server1)"
        );
        assert_eq!(
            status(Fault, "vrrp"),
            "floating IP 10.88.0.10: this node (server1) is FAULT; another node holds it or none does"
        );
    }

    #[test]
    fn the_holder_line_names_holders_and_silent_nodes() {
        use VrrpState::*;
        let check = |views: Vec<(String, Result<VipStatus, String>)>, want: &str| {
            assert_eq!(holder_line("10.88.0.10", &views), want);
        };
        check(
            vec![view("server1", Some(Backup)), view("server2", Some(Master))],
            "floating IP 10.88.0.10: held by server2",
        );
        check(
            vec![view("server1", Some(Master)), view("server2", Some(Master))],
            "floating IP 10.88.0.10: SPLIT BRAIN, held by server1 and server2",
        );
        check(
            vec![
                view("server1", Some(Fault)),
                ("server2".into(), Err("timeout".into())),
            ],
            "floating IP 10.88.0.10: no node holds it (no answer from server2)",
        );
        check(
            vec![view("server1", None), view("server2", Some(Backup))],
            "floating IP 10.88.0.10: no node holds it",
        );
    }
}
