//! Validated domain types. Once a `Cluster` exists, its invariants hold (unique node names and
//! addresses, exactly one primary, floating IP inside the subnet, no port clashes).

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A whole validated cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    pub name: String,
    pub domain: String,
    /// The LAN the nodes sit on; the floating IP is inside it.
    pub subnet: Ipv4Net,
    pub floating_ip: Ipv4Addr,
    /// Optional default gateway for the nodes (absent on isolated test networks).
    pub gateway: Option<Ipv4Addr>,
    /// In file order. Exactly one has `DbRole::Primary`.
    pub nodes: Vec<Node>,
    pub ports: Ports,
    pub balancer: Balancer,
    pub tls: Tls,
    pub firewall: Firewall,
    pub app: App,
    pub db: Db,
    pub alerts: Alerts,
    pub vrrp: Vrrp,
}

impl Cluster {
    /// Parse and validate TOML text. `origin` names the file in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Cluster, ConfigErrors> {
        crate::validate::parse(text, origin)
    }

    /// Read, parse and validate a file.
    pub fn load(path: &Path) -> Result<Cluster, ConfigErrors> {
        match std::fs::read_to_string(path) {
            Ok(text) => Cluster::from_toml(&text, &path.display().to_string()),
            Err(e) => Err(ConfigErrors::io(path, e)),
        }
    }

    /// The embedded default cluster (always valid; a unit test holds that).
    #[allow(
        clippy::expect_used,
        reason = "the embedded file is a constant; `default_cluster_holds_the_documented_values` validates it"
    )]
    pub fn default_cluster() -> Cluster {
        Cluster::from_toml(crate::DEFAULT_CLUSTER_TOML, crate::DEFAULT_CLUSTER_NAME)
            .expect("the embedded default cluster.toml is valid")
    }

    /// The node called `name`, if the cluster has one.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The node whose database is the primary.
    #[allow(
        clippy::expect_used,
        reason = "`nodes` holds exactly one primary: the field's documented invariant, which `validate` enforces"
    )]
    pub fn primary(&self) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.db_role == DbRole::Primary)
            .expect("validated cluster has exactly one primary")
    }

    /// All nodes except `name`.
    pub fn peers<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.nodes.iter().filter(move |n| n.name != name)
    }
}

use crate::validate::ConfigErrors;

/// An IPv4 network in CIDR form, e.g. `10.88.0.0/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Net {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        // A hand-built prefix over 32 behaves as /32 instead of overflowing the shift.
        let host_bits = 32 - u32::from(self.prefix.min(32));
        let mask = u32::MAX.checked_shl(host_bits).unwrap_or(0);
        (u32::from(ip) & mask) == (u32::from(self.addr) & mask)
    }
}

impl Ipv4Net {
    /// The address with the host bits cleared, e.g. `10.88.0.0` for `10.88.0.7/24`.
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    /// The address with all host bits set, e.g. `10.88.0.255` for `10.88.0.0/24`.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask())
    }

    fn mask(&self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix.min(32)))
            .unwrap_or(0)
    }
}

impl std::fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl std::str::FromStr for Ipv4Net {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not in CIDR form a.b.c.d/len"))?;
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("`{a}` is not an IPv4 address"))?;
        let prefix: u8 = p
            .parse()
            .map_err(|_| format!("`{p}` is not a prefix length"))?;
        if prefix > 32 {
            return Err(format!("prefix length {prefix} is larger than 32"));
        }
        Ok(Ipv4Net { addr, prefix })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub name: String,
    pub address: Ipv4Addr,
    pub db_role: DbRole,
    /// MariaDB server_id: 1-based position in the file unless set.
    pub server_id: u32,
    /// Balancer weight (weighted round robin), default 1.
    pub weight: u32,
    /// Active-passive: a backup node gets traffic only when every active one is down.
    pub backup: bool,
    /// VRRP priority for the floating IP (higher wins).
    pub vrrp_priority: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbRole {
    Primary,
    Replica,
}

impl DbRole {
    pub fn as_str(self) -> &'static str {
        match self {
            DbRole::Primary => "primary",
            DbRole::Replica => "replica",
        }
    }
}

/// Every TCP port a node listens on. Validation guarantees they are pairwise distinct.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    /// Balancer, plain HTTP (redirects to HTTPS).
    pub http: u16,
    /// Balancer, HTTPS.
    pub https: u16,
    /// nginx on each node (the balancer's backends).
    pub web: u16,
    /// The application server behind nginx.
    pub app: u16,
    /// MariaDB.
    pub db: u16,
    /// Admin API + web UI (HTTPS, mutual TLS between nodes).
    pub admin: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    RoundRobin,
    WeightedRoundRobin,
    LeastConnections,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BalancerMode {
    ActiveActive,
    ActivePassive,
}

impl Algorithm {
    /// The spelling in `cluster.toml`.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::RoundRobin => "roundrobin",
            Algorithm::WeightedRoundRobin => "weighted-roundrobin",
            Algorithm::LeastConnections => "leastconn",
        }
    }
}

impl BalancerMode {
    /// The spelling in `cluster.toml`.
    pub fn as_str(self) -> &'static str {
        match self {
            BalancerMode::ActiveActive => "active-active",
            BalancerMode::ActivePassive => "active-passive",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Balancer {
    pub algorithm: Algorithm,
    pub mode: BalancerMode,
    pub health: HealthCheck,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheck {
    pub path: String,
    pub expect_status: u16,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tls {
    /// PEM certificate chain and key on the data partition; `None` = self-signed, generated once.
    pub certificate: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// HSTS max-age in seconds.
    pub hsts_max_age: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Firewall {
    /// Networks allowed to reach the admin port.
    pub admin_cidrs: Vec<Ipv4Net>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct App {
    /// Static application files served by nginx. `None` = the demo application's files.
    pub files: Option<PathBuf>,
    /// Command of the application server (argv). `None` = the built-in demo application.
    pub command: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Db {
    /// A replica lagging more than this is unhealthy.
    pub max_lag: Duration,
}

/// How the floating IP moves between nodes (VRRPv3, run by keepalived).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vrrp {
    /// VRRP virtual router id, 1..=255; unique among VRRP routers on the LAN.
    pub router_id: u8,
    /// Advertisement interval (VRRPv3: a multiple of 10 ms). A backup takes over after
    /// three missed advertisements.
    pub advert_interval: Duration,
    /// `None`: a node that comes back never takes the address back from a healthy holder.
    /// `Some(d)`: a node of higher priority takes it back `d` after it could serve again.
    pub preempt_delay: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Alerts {
    /// Optional webhook receiving alerts as JSON POSTs.
    pub webhook: Option<WebhookUrl>,
    pub error_ratio_5xx: f64,
    pub window: Duration,
    pub cooldown: Duration,
    pub disk_used_percent: u8,
    pub cert_expiry_days: u32,
}

/// `alerts.webhook`: an `http://` or `https://` URL the log monitor can POST to. Its path and
/// query often carry a token, so only [`WebhookUrl::origin`] is ever shown: `Debug` prints
/// the origin alone, and parse errors never repeat the path.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookUrl {
    url: String,
    tls: bool,
    /// Without the brackets of an IPv6 literal.
    host: String,
    port: u16,
}

/// Schemes longer than this are not repeated in an error (the text may not be a URL at all).
const MAX_SHOWN_SCHEME: usize = 16;
/// Far beyond any real webhook, far below what HTTP clients refuse (64 KiB).
pub const MAX_WEBHOOK_URL_LEN: usize = 2048;
/// Printable ASCII that RFC 3986 allows nowhere in a URL (HTTP clients refuse some of them).
const NOT_IN_URLS: &[u8] = b"\"<>\\^`{|}";

impl WebhookUrl {
    /// `http[s]://host[:port][/path][?query]` with a DNS name, IPv4 or `[IPv6]` host. Rejects
    /// what the monitor could not send: other schemes, `user@` credentials, a `#fragment`
    /// (never sent), and characters that must be percent-encoded (spaces, controls,
    /// non-ASCII, `"<>\^`{|}`). The error says what is wrong without repeating the path or the query.
    pub fn parse(url: &str) -> Result<WebhookUrl, String> {
        const EXPECTED: &str = "expected an http:// or https:// URL";
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(EXPECTED.to_string());
        };
        let tls = if scheme.eq_ignore_ascii_case("https") {
            true
        } else if scheme.eq_ignore_ascii_case("http") {
            false
        } else if scheme.len() <= MAX_SHOWN_SCHEME
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        {
            return Err(format!("{EXPECTED}, not {scheme}://"));
        } else {
            return Err(EXPECTED.to_string());
        };
        if url.len() > MAX_WEBHOOK_URL_LEN {
            return Err(format!("longer than {MAX_WEBHOOK_URL_LEN} characters"));
        }
        if !url
            .bytes()
            .all(|b| b.is_ascii_graphic() && !NOT_IN_URLS.contains(&b))
        {
            return Err(
                "spaces, control and non-ASCII characters and any of \"<>\\^`{|} must be percent-encoded"
                    .to_string(),
            );
        }
        if url.contains('#') {
            return Err("a #fragment is never sent to the server: remove it".to_string());
        }
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        if authority.contains('@') {
            return Err(
                "credentials (user@host) are not supported: put a token in the path or query"
                    .to_string(),
            );
        }
        let (host, port) = match authority.strip_prefix('[') {
            Some(bracketed) => {
                let (v6, after) = bracketed
                    .split_once(']')
                    .ok_or("an IPv6 address needs a closing `]`")?;
                v6.parse::<Ipv6Addr>()
                    .map_err(|_| format!("[{v6}] is not an IPv6 address"))?;
                (v6, after)
            }
            None => {
                let end = authority.find(':').unwrap_or(authority.len());
                let host = &authority[..end];
                if !host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
                {
                    return Err(format!(
                        "host {host:?}: expected a DNS name, an IPv4 address or an [IPv6] address"
                    ));
                }
                (host, &authority[end..])
            }
        };
        if host.is_empty() {
            return Err("no host after the scheme".to_string());
        }
        let port = match port.strip_prefix(':') {
            None if port.is_empty() => {
                if tls {
                    443
                } else {
                    80
                }
            }
            // Digits only: `parse` would take `+80`, which HTTP clients refuse.
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => return Err(format!("port {p:?}: expected 1 to 65535")),
            },
            None => return Err(format!("unexpected {port:?} after the host")),
        };
        Ok(WebhookUrl {
            url: url.to_string(),
            tls,
            host: host.to_string(),
            port,
        })
    }

    /// The whole URL, token included: for the HTTP client only, never for a log.
    pub fn as_str(&self) -> &str {
        &self.url
    }

    /// `https://` rather than `http://`.
    pub fn is_https(&self) -> bool {
        self.tls
    }

    /// The host, without the brackets of an IPv6 address.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port, explicit or the scheme's default.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `scheme://host:port`: what may be logged or shown.
    pub fn origin(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        if self.host.contains(':') {
            format!("{scheme}://[{}]:{}", self.host, self.port)
        } else {
            format!("{scheme}://{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Debug for WebhookUrl {
    /// The origin only: a `Cluster` printed with `{:?}` must not leak the token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WebhookUrl({}/…)", self.origin())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_urls() {
        // url -> Ok(origin) or Err(message)
        let table: &[(&str, Result<&str, &str>)] = &[
            ("http://10.0.0.1:8080/hook", Ok("http://10.0.0.1:8080")),
            (
                "https://alerts.example/t/SECRET?k=SECRET",
                Ok("https://alerts.example:443"),
            ),
            ("HTTPS://h", Ok("https://h:443")),
            ("http://alerts.example", Ok("http://alerts.example:80")),
            ("http://h?x=1", Ok("http://h:80")),
            ("http://[::1]:9000/a/b", Ok("http://[::1]:9000")),
            ("https://[fd00::1]", Ok("https://[fd00::1]:443")),
            (
                "ftp://h/SECRET",
                Err("expected an http:// or https:// URL, not ftp://"),
            ),
            (
                "alerts.example/SECRET",
                Err("expected an http:// or https:// URL"),
            ),
            ("http://", Err("no host after the scheme")),
            ("http:///SECRET", Err("no host after the scheme")),
            (
                "http://h:99999/SECRET",
                Err("port \"99999\": expected 1 to 65535"),
            ),
            ("http://h:0/", Err("port \"0\": expected 1 to 65535")),
            ("http://h:/", Err("port \"\": expected 1 to 65535")),
            ("http://h:+80/", Err("port \"+80\": expected 1 to 65535")),
            (
                "http://u:SECRET@h/",
                Err("credentials (user@host) are not supported"),
            ),
            ("http://h/SECRET path", Err("must be percent-encoded")),
            ("http://h/SECRÉT", Err("must be percent-encoded")),
            ("http://h/SECRET#x", Err("a #fragment is never sent")),
            ("http://h/SECRET>", Err("must be percent-encoded")),
            ("http://h/?q=\"SECRET\"", Err("must be percent-encoded")),
            (
                &format!("http://h/{}", "SECRET".repeat(400)),
                Err("longer than 2048"),
            ),
            ("http://[::1/SECRET", Err("needs a closing `]`")),
            ("http://[::g]/SECRET", Err("[::g] is not an IPv6 address")),
            (
                "http://[::1]x/SECRET",
                Err("unexpected \"x\" after the host"),
            ),
            (
                "http://h%41/SECRET",
                Err("host \"h%41\": expected a DNS name"),
            ),
        ];
        for (url, expected) in table {
            let got = WebhookUrl::parse(url).map(|u| u.origin());
            match (expected, &got) {
                (Ok(origin), Ok(got)) => assert_eq!(got, origin, "{url}"),
                (Err(message), Err(got)) => {
                    assert!(got.contains(message), "{url}: {got:?}");
                    assert!(!got.contains("SECRET"), "{url}: {got:?} shows the path");
                }
                _ => panic!("{url}: got {got:?}, expected {expected:?}"),
            }
        }
        let url = WebhookUrl::parse("https://h:8443/t/SECRET?k=SECRET").unwrap();
        assert_eq!(format!("{url:?}"), "WebhookUrl(https://h:8443/…)");
        assert_eq!((url.host(), url.port(), url.is_https()), ("h", 8443, true));
        assert_eq!(url.as_str(), "https://h:8443/t/SECRET?k=SECRET");
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn ipv4net_parses_cidr_and_rejects_the_rest() {
        assert_eq!(
            net("10.88.0.0/24"),
            Ipv4Net {
                addr: Ipv4Addr::new(10, 88, 0, 0),
                prefix: 24
            }
        );
        assert_eq!(net("0.0.0.0/0").to_string(), "0.0.0.0/0");
        for bad in [
            "10.88.0.0",
            "10.88.0/24",
            "10.88.0.0/33",
            "10.88.0.0/x",
            "/24",
            "",
            "10.88.0.0/24/1",
        ] {
            assert!(bad.parse::<Ipv4Net>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn ipv4net_contains_network_and_broadcast() {
        let lan = net("10.88.0.0/24");
        assert!(lan.contains(Ipv4Addr::new(10, 88, 0, 11)));
        assert!(!lan.contains(Ipv4Addr::new(10, 88, 1, 11)));
        assert_eq!(lan.network(), Ipv4Addr::new(10, 88, 0, 0));
        assert_eq!(lan.broadcast(), Ipv4Addr::new(10, 88, 0, 255));
        let all = net("0.0.0.0/0");
        assert!(all.contains(Ipv4Addr::new(192, 0, 2, 1)));
        assert_eq!(all.broadcast(), Ipv4Addr::BROADCAST);
        let host = net("10.1.2.3/32");
        assert!(
            host.contains(Ipv4Addr::new(10, 1, 2, 3)) && !host.contains(Ipv4Addr::new(10, 1, 2, 4))
        );
        assert_eq!(host.network(), host.broadcast());
        assert_eq!(net("10.88.0.77/24").network(), Ipv4Addr::new(10, 88, 0, 0));
    }

    #[test]
    fn default_cluster_holds_the_documented_values() {
        let c = Cluster::default_cluster();
        assert_eq!(
            (c.name.as_str(), c.domain.as_str()),
            ("tandem", "tandem.test")
        );
        assert_eq!(c.subnet, net("10.88.0.0/24"));
        assert_eq!(c.floating_ip, Ipv4Addr::new(10, 88, 0, 10));
        assert_eq!(c.gateway, None);
        assert_eq!(c.primary().name, "server2");
        let ids: Vec<_> = c
            .nodes
            .iter()
            .map(|n| {
                (
                    n.name.as_str(),
                    n.server_id,
                    n.vrrp_priority,
                    n.weight,
                    n.backup,
                )
            })
            .collect();
        assert_eq!(
            ids,
            [("server1", 1, 150, 1, false), ("server2", 2, 100, 1, false)]
        );
        assert_eq!(
            c.ports,
            Ports {
                http: 80,
                https: 443,
                web: 8080,
                app: 8000,
                db: 3306,
                admin: 9443
            }
        );
        assert_eq!(c.balancer.algorithm, Algorithm::RoundRobin);
        assert_eq!(c.balancer.mode, BalancerMode::ActiveActive);
        let h = &c.balancer.health;
        assert_eq!(
            (h.path.as_str(), h.expect_status, h.rise, h.fall),
            ("/healthz", 200, 2, 3)
        );
        assert_eq!(
            (h.interval, h.timeout),
            (Duration::from_millis(2000), Duration::from_millis(1000))
        );
        assert_eq!(
            c.tls,
            Tls {
                certificate: None,
                key: None,
                hsts_max_age: 31_536_000
            }
        );
        assert_eq!(c.firewall.admin_cidrs, [c.subnet]);
        assert_eq!(
            c.app,
            App {
                files: None,
                command: None
            }
        );
        assert_eq!(c.db.max_lag, Duration::from_millis(5000));
        let a = &c.alerts;
        assert_eq!((&a.webhook, a.error_ratio_5xx), (&None, 0.05));
        assert_eq!(
            (a.window, a.cooldown),
            (Duration::from_secs(60), Duration::from_secs(300))
        );
        assert_eq!((a.disk_used_percent, a.cert_expiry_days), (85, 14));
        assert_eq!(
            c.vrrp,
            Vrrp {
                router_id: 51,
                advert_interval: Duration::from_millis(100),
                preempt_delay: None
            }
        );
    }
}
