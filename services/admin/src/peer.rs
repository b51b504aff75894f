//! Calls to the other nodes' peer API (their admin port, mutual TLS with the cluster CA): the
//! node presents the certificate from its TLS directory (the seed's on an image) and trusts
//! only the cluster CA. Every node's view of the floating IP, and the holder line of
//! `appliance status` and of the status page.

use std::path::Path;
use std::time::Duration;

use api::files::{FileName, CA_CERT, NODE_CERT, NODE_KEY};
use api::update::{Event, UpdateStatus};
use api::vip::VipStatus;
use cluster_config::{Cluster, Node};

use crate::{Error, FetchError};

/// A peer that does not answer this fast is reported as unreachable.
const PEER_TIMEOUT: Duration = Duration::from_millis(800);
/// Largest answer read from a peer.
const MAX_ANSWER_BYTES: u64 = 1 << 20;
/// The peer API's floating-IP view.
pub(crate) const VIP_PATH: &str = "/api/peer/vip";

/// The peer API's view of a node's health (every service ready).
pub(crate) const HEALTH_PATH: &str = "/api/peer/health";
/// The peer API's update status ([`api::update::UpdateStatus`]).
pub(crate) const UPDATE_STATUS_PATH: &str = "/api/peer/update-status";
/// The peer API's install: the bundle as the request body.
pub(crate) const UPDATE_PATH: &str = "/api/peer/update";
/// An install over the peer API takes minutes under emulation (the answer comes once it is
/// done).
const INSTALL_TIMEOUT: Duration = Duration::from_secs(3600);

/// A node's health as the peer API reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct NodeHealth {
    pub(crate) node: String,
    /// Services that are not ready.
    pub(crate) not_ready: Vec<String>,
    /// Why the supervisor could not be asked.
    pub(crate) error: Option<String>,
}

impl NodeHealth {
    /// Healthy: the supervisor answered and every service is ready.
    pub(crate) fn healthy(&self) -> bool {
        self.error.is_none() && self.not_ready.is_empty()
    }

    /// Why it is not healthy, in a few words.
    pub(crate) fn describe(&self) -> String {
        match &self.error {
            Some(e) => format!("supervisor unreachable ({e})"),
            None if self.not_ready.is_empty() => "healthy".into(),
            None => format!("{} not ready", self.not_ready.join(", ")),
        }
    }
}

/// An HTTPS client that authenticates as this node.
pub struct PeerClient {
    agent: ureq::Agent,
}

impl PeerClient {
    /// The client of the node whose TLS directory is `dir`, or `None` when it holds no node
    /// certificate (a developer machine: no peer API there).
    pub fn from_dir(dir: &Path) -> Result<Option<PeerClient>, Error> {
        if !dir.join(NODE_CERT).exists() {
            return Ok(None);
        }
        let read = |name: FileName| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(Error::io("reading", &path))
        };
        let invalid = |name: FileName, detail: String| Error::Invalid {
            path: dir.join(name),
            detail,
        };
        let ca = ureq::tls::Certificate::from_pem(&read(CA_CERT)?)
            .map_err(|e| invalid(CA_CERT, format!("the cluster CA: {e}")))?;
        let chain = ureq::tls::parse_pem(&read(NODE_CERT)?)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect::<Vec<_>>();
        if chain.is_empty() {
            return Err(invalid(NODE_CERT, "no certificate in it".into()));
        }
        let key = ureq::tls::PrivateKey::from_pem(&read(NODE_KEY)?)
            .map_err(|e| invalid(NODE_KEY, format!("no private key: {e}")))?;
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::new_with_certs(&[ca]))
            .client_cert(Some(ureq::tls::ClientCert::new_with_certs(&chain, key)))
            .build();
        let agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .timeout_global(Some(PEER_TIMEOUT))
            .http_status_as_error(false)
            // The peers are on the cluster's own network.
            .proxy(None)
            .build()
            .new_agent();
        Ok(Some(PeerClient { agent }))
    }

    fn url(cluster: &Cluster, peer: &Node, path: &str) -> String {
        format!("https://{}:{}{path}", peer.address, cluster.ports.admin)
    }

    /// GET `path` on `peer`; the body of a 200.
    fn get(&self, cluster: &Cluster, peer: &Node, path: &str) -> Result<String, FetchError> {
        crate::get_text(
            &self.agent,
            Self::url(cluster, peer, path),
            MAX_ANSWER_BYTES,
        )
    }

    /// The peer's own view of the floating IP.
    fn vip(&self, cluster: &Cluster, peer: &Node) -> Result<VipStatus, FetchError> {
        let body = self.get(cluster, peer, VIP_PATH)?;
        VipStatus::from_json(&body).map_err(|detail| FetchError::Format {
            from: peer.name.clone(),
            detail,
        })
    }

    /// The peer's health: whether every service there is ready.
    pub(crate) fn health(&self, cluster: &Cluster, peer: &Node) -> Result<NodeHealth, FetchError> {
        let body = self.get(cluster, peer, HEALTH_PATH)?;
        serde_json::from_str(&body).map_err(|e| FetchError::Format {
            from: peer.name.clone(),
            detail: e.to_string(),
        })
    }

    /// The peer's update status (its running version, boot state, slots, bad versions).
    pub fn update_status(
        &self,
        cluster: &Cluster,
        peer: &Node,
    ) -> Result<UpdateStatus, FetchError> {
        let body = self.get(cluster, peer, UPDATE_STATUS_PATH)?;
        serde_json::from_str(&body).map_err(|e| FetchError::Format {
            from: peer.name.clone(),
            detail: e.to_string(),
        })
    }

    /// Sends the bundle at `bundle` to `peer` (streamed from the file) and has it installed
    /// there; returns the peer's `done` event. A refusal is [`FetchError::Refused`] with the
    /// peer's message. Waits as long as the install takes (up to an hour).
    pub fn post_bundle(
        &self,
        cluster: &Cluster,
        peer: &Node,
        bundle: &Path,
        force: bool,
        reboot: bool,
        trial_timeout_secs: Option<u64>,
    ) -> Result<Event, FetchError> {
        let mut url = format!(
            "{}?force={}&reboot={}",
            Self::url(cluster, peer, UPDATE_PATH),
            u8::from(force),
            u8::from(reboot)
        );
        if let Some(secs) = trial_timeout_secs {
            url.push_str(&format!("&trial_timeout={secs}"));
        }
        let file = std::fs::File::open(bundle).map_err(|e| FetchError::Format {
            from: bundle.display().to_string(),
            detail: format!("opening: {e}"),
        })?;
        let request = |source| FetchError::Post {
            url: url.clone(),
            source,
        };
        let mut resp = self
            .agent
            .post(&url)
            .header("content-type", "application/octet-stream")
            .config()
            .timeout_global(Some(INSTALL_TIMEOUT))
            .build()
            .send(file)
            .map_err(request)?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER_BYTES)
            .read_to_string()
            .map_err(request)?;
        if status != 200 {
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or_else(|| body.trim().chars().take(200).collect());
            return Err(FetchError::Refused {
                url,
                status,
                message,
            });
        }
        match serde_json::from_str::<Event>(&body) {
            Ok(done @ Event::Done { .. }) => Ok(done),
            Ok(other) => Err(FetchError::Format {
                from: peer.name.clone(),
                detail: format!("unexpected answer {other:?}"),
            }),
            Err(e) => Err(FetchError::Format {
                from: peer.name.clone(),
                detail: e.to_string(),
            }),
        }
    }
}

/// Every node's view of the floating IP: this node's from its file, the others' over the peer
/// API (in parallel, each bounded by [`PEER_TIMEOUT`]). `Err` says why a node has none.
pub(crate) fn vip_views(
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
                                Some(c) => c.vip(cluster, n).map_err(|e| e.to_string()),
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
pub(crate) fn own_vip(vip_dir: &Path) -> Result<VipStatus, String> {
    let path = vip_dir.join(api::vip::STATUS_FILE);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("no floating IP status yet ({}: {e})", path.display()))?;
    VipStatus::from_json(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// One line on who holds the floating IP, from every node's view (pure).
pub(crate) fn holder_line(address: &str, views: &[(String, Result<VipStatus, String>)]) -> String {
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

/// The floating-IP line of `appliance status`, from this node's view in `vip_dir`: every
/// node's view when `identity` (this cluster and node) is known and `tls_dir` holds the node's
/// certificates (an image), else this node's own; `None` when no balancer ever wrote a status
/// (a supervisor without the node's stack).
pub fn status_line(
    vip_dir: &Path,
    identity: Option<(Cluster, Node)>,
    tls_dir: &Path,
) -> Option<String> {
    let own = own_vip(vip_dir).ok()?;
    let client = identity
        .is_some()
        .then(|| PeerClient::from_dir(tls_dir).ok().flatten())
        .flatten();
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

    #[test]
    fn the_status_line_reads_this_node_s_view_from_its_run_directory() {
        let dir = tempfile::tempdir().unwrap();
        let vip_dir = dir.path().join(api::vip::RUN_SUBDIR);
        let no_tls = dir.path().join("no-tls");
        // No balancer ever wrote a status: no line at all.
        assert_eq!(status_line(&vip_dir, None, &no_tls), None);
        std::fs::create_dir_all(&vip_dir).unwrap();
        let own = view("server1", Some(VrrpState::Master)).1.unwrap();
        std::fs::write(vip_dir.join(api::vip::STATUS_FILE), own.to_json()).unwrap();
        let want = Some("floating IP 10.88.0.10: held by this node (server1)".to_string());
        assert_eq!(status_line(&vip_dir, None, &no_tls), want);
        // A known node without its certificates (no peer API here) says only its own view.
        let cluster = Cluster::default_cluster();
        let me = cluster.node("server1").unwrap().clone();
        assert_eq!(status_line(&vip_dir, Some((cluster, me)), &no_tls), want);
    }
}
