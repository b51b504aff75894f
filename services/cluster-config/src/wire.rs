//! `cluster.toml` exactly as users write it. Every struct denies unknown keys so that a typo is
//! an error instead of a silently ignored setting.
//!
//! Values whose range or form is checked (ports, addresses, enum-like strings, durations) stay
//! loosely typed here (`i64`, `String`): `validate` checks them all in one pass and reports every
//! problem, whereas serde stops at the first one and words it in Rust types ("expected u16").

use serde::Deserialize;

// Defaults: the values of `default-cluster.toml`.
pub(crate) const DEFAULT_HTTP_PORT: i64 = 80;
pub(crate) const DEFAULT_HTTPS_PORT: i64 = 443;
pub(crate) const DEFAULT_WEB_PORT: i64 = 8080;
pub(crate) const DEFAULT_APP_PORT: i64 = 8000;
pub(crate) const DEFAULT_DB_PORT: i64 = 3306;
pub(crate) const DEFAULT_ADMIN_PORT: i64 = 9443;
pub(crate) const DEFAULT_ALGORITHM: &str = "roundrobin";
pub(crate) const DEFAULT_MODE: &str = "active-active";
pub(crate) const DEFAULT_HEALTH_PATH: &str = "/healthz";
pub(crate) const DEFAULT_HEALTH_EXPECT_STATUS: i64 = 200;
pub(crate) const DEFAULT_HEALTH_INTERVAL_MS: i64 = 2000;
pub(crate) const DEFAULT_HEALTH_TIMEOUT_MS: i64 = 1000;
pub(crate) const DEFAULT_HEALTH_RISE: i64 = 2;
pub(crate) const DEFAULT_HEALTH_FALL: i64 = 3;
pub(crate) const DEFAULT_HSTS_MAX_AGE_S: i64 = 31_536_000;
pub(crate) const DEFAULT_DB_MAX_LAG_MS: i64 = 5000;
pub(crate) const DEFAULT_ERROR_RATIO_5XX: f64 = 0.05;
pub(crate) const DEFAULT_ALERT_WINDOW_S: i64 = 60;
pub(crate) const DEFAULT_ALERT_COOLDOWN_S: i64 = 300;
pub(crate) const DEFAULT_DISK_USED_PERCENT: i64 = 85;
pub(crate) const DEFAULT_CERT_EXPIRY_DAYS: i64 = 14;
pub(crate) const DEFAULT_NODE_WEIGHT: i64 = 1;
/// VRRP virtual router id of the floating IP; unique per LAN segment.
pub(crate) const DEFAULT_VRRP_ROUTER_ID: i64 = 51;
/// VRRPv3 advertisement interval: a backup takes over after about three missed adverts
/// (0.3 s here, against keepalived's 1 s default and its 3.5 s takeover).
pub(crate) const DEFAULT_VRRP_ADVERT_INTERVAL_MS: i64 = 100;
/// VRRP priority of the first node: it holds the floating IP while it is up.
pub(crate) const DEFAULT_FIRST_VRRP_PRIORITY: u8 = 150;
/// VRRP priority of the second node; each later node gets one less, so the takeover order is
/// the file order.
pub(crate) const DEFAULT_NEXT_VRRP_PRIORITY: u8 = 100;
// `firewall.admin_cidrs` defaults to `[cluster.subnet]`, which is not a constant.

/// Default VRRP priority of the node at 0-based position `index`: 150, 100, 99, 98, ... and
/// never below 1 (VRRP's lowest priority for a backup router).
pub(crate) fn default_vrrp_priority(index: usize) -> u8 {
    match index {
        0 => DEFAULT_FIRST_VRRP_PRIORITY,
        i => {
            let below = u8::try_from(i - 1).unwrap_or(u8::MAX);
            DEFAULT_NEXT_VRRP_PRIORITY.saturating_sub(below).max(1)
        }
    }
}

/// The whole file. Only `[cluster]` and `[[node]]` are required.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct File {
    pub cluster: Cluster,
    pub node: Vec<Node>,
    #[serde(default)]
    pub ports: Ports,
    #[serde(default)]
    pub balancer: Balancer,
    #[serde(default)]
    pub tls: Tls,
    #[serde(default)]
    pub firewall: Firewall,
    #[serde(default)]
    pub app: App,
    #[serde(default)]
    pub db: Db,
    #[serde(default)]
    pub alerts: Alerts,
    #[serde(default)]
    pub vrrp: Vrrp,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Cluster {
    pub name: String,
    pub domain: String,
    pub subnet: String,
    pub floating_ip: String,
    pub gateway: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Node {
    pub name: String,
    pub address: String,
    pub db_role: String,
    /// Default: the node's 1-based position in the file.
    pub server_id: Option<i64>,
    #[serde(default = "default_weight")]
    pub weight: i64,
    #[serde(default)]
    pub backup: bool,
    /// Default: [`default_vrrp_priority`] of the node's position.
    pub vrrp_priority: Option<i64>,
}

fn default_weight() -> i64 {
    DEFAULT_NODE_WEIGHT
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Ports {
    pub http: i64,
    pub https: i64,
    pub web: i64,
    pub app: i64,
    pub db: i64,
    pub admin: i64,
}

impl Default for Ports {
    fn default() -> Self {
        Ports {
            http: DEFAULT_HTTP_PORT,
            https: DEFAULT_HTTPS_PORT,
            web: DEFAULT_WEB_PORT,
            app: DEFAULT_APP_PORT,
            db: DEFAULT_DB_PORT,
            admin: DEFAULT_ADMIN_PORT,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Balancer {
    pub algorithm: String,
    pub mode: String,
    pub health: Health,
}

impl Default for Balancer {
    fn default() -> Self {
        Balancer {
            algorithm: DEFAULT_ALGORITHM.to_owned(),
            mode: DEFAULT_MODE.to_owned(),
            health: Health::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Health {
    pub path: String,
    pub expect_status: i64,
    pub interval_ms: i64,
    pub timeout_ms: i64,
    pub rise: i64,
    pub fall: i64,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            path: DEFAULT_HEALTH_PATH.to_owned(),
            expect_status: DEFAULT_HEALTH_EXPECT_STATUS,
            interval_ms: DEFAULT_HEALTH_INTERVAL_MS,
            timeout_ms: DEFAULT_HEALTH_TIMEOUT_MS,
            rise: DEFAULT_HEALTH_RISE,
            fall: DEFAULT_HEALTH_FALL,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Tls {
    pub certificate: Option<String>,
    pub key: Option<String>,
    pub hsts_max_age_s: i64,
}

impl Default for Tls {
    fn default() -> Self {
        Tls {
            certificate: None,
            key: None,
            hsts_max_age_s: DEFAULT_HSTS_MAX_AGE_S,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Firewall {
    /// `None` = only the cluster subnet.
    pub admin_cidrs: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct App {
    pub files: Option<String>,
    pub command: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Db {
    pub max_lag_ms: i64,
}

impl Default for Db {
    fn default() -> Self {
        Db {
            max_lag_ms: DEFAULT_DB_MAX_LAG_MS,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Vrrp {
    pub router_id: i64,
    pub advert_interval_ms: i64,
    /// Absent: a node that comes back never takes the floating IP back (keepalived's
    /// `nopreempt`). Set: it does, this many seconds after it could serve again.
    pub preempt_delay_s: Option<i64>,
}

impl Default for Vrrp {
    fn default() -> Self {
        Vrrp {
            router_id: DEFAULT_VRRP_ROUTER_ID,
            advert_interval_ms: DEFAULT_VRRP_ADVERT_INTERVAL_MS,
            preempt_delay_s: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Alerts {
    pub webhook: Option<String>,
    pub error_ratio_5xx: f64,
    pub window_s: i64,
    pub cooldown_s: i64,
    pub disk_used_percent: i64,
    pub cert_expiry_days: i64,
}

impl Default for Alerts {
    fn default() -> Self {
        Alerts {
            webhook: None,
            error_ratio_5xx: DEFAULT_ERROR_RATIO_5XX,
            window_s: DEFAULT_ALERT_WINDOW_S,
            cooldown_s: DEFAULT_ALERT_COOLDOWN_S,
            disk_used_percent: DEFAULT_DISK_USED_PERCENT,
            cert_expiry_days: DEFAULT_CERT_EXPIRY_DAYS,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vrrp_priorities_descend_in_file_order_and_stay_valid() {
        let got: Vec<u8> = (0..4).map(default_vrrp_priority).collect();
        assert_eq!(got, [150, 100, 99, 98]);
        assert_eq!(default_vrrp_priority(100), 1);
        assert_eq!(default_vrrp_priority(usize::MAX), 1);
    }

    #[test]
    fn omitted_sections_take_the_defaults_of_default_cluster_toml() {
        let minimal = r#"
            [cluster]
            name = "t"
            domain = "t.test"
            subnet = "10.88.0.0/24"
            floating_ip = "10.88.0.10"
            [[node]]
            name = "a"
            address = "10.88.0.11"
            db_role = "primary"
        "#;
        let min: File = toml::from_str(minimal).unwrap();
        let full: File = toml::from_str(crate::DEFAULT_CLUSTER_TOML).unwrap();
        assert_eq!(format!("{:?}", min.ports), format!("{:?}", full.ports));
        assert_eq!(
            format!("{:?}", min.balancer),
            format!("{:?}", full.balancer)
        );
        assert_eq!(format!("{:?}", min.tls), format!("{:?}", full.tls));
        assert_eq!(format!("{:?}", min.app), format!("{:?}", full.app));
        assert_eq!(format!("{:?}", min.db), format!("{:?}", full.db));
        assert_eq!(format!("{:?}", min.alerts), format!("{:?}", full.alerts));
        assert_eq!(min.node[0].weight, DEFAULT_NODE_WEIGHT);
        assert!(!min.node[0].backup);
    }
}
