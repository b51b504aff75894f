//! From TOML text to a validated [`Cluster`], collecting every problem with its file, line and
//! key path (`node[1].address`, `ports.db`, `balancer.health.rise`).
//!
//! Three stages, each reporting in the same [`ConfigError`] form:
//! 1. TOML syntax (the first error only: the parser's recovery cascades),
//! 2. shape: missing sections, wrong types, unknown keys (serde; stops at the first),
//! 3. values and cross-field rules (this module; reports all of them).
//!
//! Lines come from a [`KeyIndex`] that maps key paths to byte spans of the source, so the wire
//! structs stay plain and the validated types carry no spans.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::ops::{Range, RangeBounds};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::model::{
    Alerts, Algorithm, App, Balancer, BalancerMode, Cluster, Db, DbRole, Firewall, HealthCheck,
    Ipv4Net, Node, Ports, Tls, Vrrp, WebhookUrl,
};
use crate::wire;

/// One problem in a cluster description.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}{}: {}{message}", location(.line, .column), key_prefix(.key))]
pub struct ConfigError {
    /// The file (or other source) the text came from.
    pub origin: String,
    /// 1-based; `None` when the problem has no place in the text (unreadable file, a required
    /// key missing from a document with no tables).
    pub line: Option<usize>,
    /// 1-based, in characters; only set for TOML syntax errors, where the key alone does not say
    /// where to look.
    pub column: Option<usize>,
    /// Key path such as `node[1].address` or `ports.db`; empty when there is none (IO errors,
    /// some syntax errors).
    pub key: String,
    /// What is wrong, and what was expected.
    pub message: String,
}

fn location(line: &Option<usize>, column: &Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(":{l}:{c}"),
        (Some(l), None) => format!(":{l}"),
        (None, _) => String::new(),
    }
}

fn key_prefix(key: &str) -> String {
    if key.is_empty() {
        String::new()
    } else {
        format!("{key}: ")
    }
}

/// Every problem found, in line order. Never empty when returned as an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", one_per_line(.0))]
pub struct ConfigErrors(pub Vec<ConfigError>);

fn one_per_line(errors: &[ConfigError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigErrors {
    /// The file could not be read at all.
    pub fn io(path: &Path, error: std::io::Error) -> ConfigErrors {
        ConfigErrors(vec![ConfigError {
            origin: path.display().to_string(),
            line: None,
            column: None,
            key: String::new(),
            message: format!("cannot read the file: {error}"),
        }])
    }
}

pub(crate) fn parse(text: &str, origin: &str) -> Result<Cluster, ConfigErrors> {
    // Only the first syntax error in the file: after one, the parser's recovery cascades into
    // noise (an unclosed array swallows the rest of the file). The parser does not report them
    // in text order, hence the minimum.
    let (doc, errors) = DeTable::parse_recoverable(text);
    if let Some(first) = errors
        .iter()
        .min_by_key(|e| e.span().map_or(usize::MAX, |s| s.start))
    {
        return Err(syntax_error(text, origin, first));
    }
    let index = KeyIndex::new(&doc);
    let report = Report {
        origin,
        text,
        index: &index,
        errors: Vec::new(),
    };
    match wire::File::deserialize(toml::de::Deserializer::from(doc)) {
        Ok(file) => report.check(&file),
        Err(e) => Err(report.shape(&e)),
    }
}

fn syntax_error(text: &str, origin: &str, e: &toml::de::Error) -> ConfigErrors {
    let (line, column, key) = match e.span() {
        Some(span) => {
            let (line, column) = line_column(text, span.start);
            (Some(line), Some(column), syntax_key(text, span.start))
        }
        None => (None, None, String::new()),
    };
    ConfigErrors(vec![ConfigError {
        origin: origin.to_owned(),
        line,
        column,
        key,
        message: format!(
            "TOML syntax: {}{}",
            one_line(e.message()),
            unquoted_hint(text, e)
        ),
    }])
}

/// Key paths of the parsed document and where they are in the text.
struct KeyIndex {
    /// Path -> byte span of the key (of the element, for array elements).
    keys: HashMap<String, Range<usize>>,
    /// (path, span of key and value together), to find the key an error span falls in.
    extents: Vec<(String, Range<usize>)>,
}

impl KeyIndex {
    fn new(doc: &Spanned<DeTable<'_>>) -> KeyIndex {
        let mut index = KeyIndex {
            keys: HashMap::new(),
            extents: Vec::new(),
        };
        index.add_table("", doc.get_ref());
        index
    }

    fn add_table(&mut self, prefix: &str, table: &DeTable<'_>) {
        for (key, value) in table.iter() {
            let path = if prefix.is_empty() {
                key.get_ref().to_string()
            } else {
                format!("{prefix}.{}", key.get_ref())
            };
            let (k, v) = (key.span(), value.span());
            self.add(
                path.clone(),
                k.clone(),
                k.start.min(v.start)..k.end.max(v.end),
            );
            self.add_value(&path, value);
        }
    }

    fn add_value(&mut self, path: &str, value: &Spanned<DeValue<'_>>) {
        match value.get_ref() {
            DeValue::Table(table) => self.add_table(path, table),
            DeValue::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let item_path = format!("{path}[{i}]");
                    self.add(item_path.clone(), item.span(), item.span());
                    self.add_value(&item_path, item);
                }
            }
            _ => {}
        }
    }

    fn add(&mut self, path: String, key: Range<usize>, extent: Range<usize>) {
        self.extents.push((path.clone(), extent));
        // The first occurrence wins: for `[[node]]` that is the first header.
        self.keys.entry(path).or_insert(key);
    }

    /// Byte offset of `path`, or of its nearest ancestor that is written in the file.
    fn offset(&self, path: &str) -> Option<usize> {
        let mut path = path;
        loop {
            if let Some(span) = self.keys.get(path) {
                return Some(span.start);
            }
            path = &path[..path.rfind(['.', '['])?];
        }
    }

    fn is_written(&self, path: &str) -> bool {
        self.keys.contains_key(path)
    }

    /// The innermost key whose key or value contains `offset`.
    fn path_at(&self, offset: usize) -> Option<&str> {
        self.extents
            .iter()
            .filter(|(_, span)| span.start <= offset && offset < span.end)
            // A `[[node]]` header is the extent of both `node` and `node[0]`: take the deeper.
            .min_by_key(|(path, span)| (span.len(), std::cmp::Reverse(path.len())))
            .map(|(path, _)| path.as_str())
    }
}

/// 1-based line and character column of a byte offset (clamped to the text).
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |i| i + 1);
    let column = match text.get(line_start..offset) {
        Some(s) => s.chars().count() + 1,
        None => offset - line_start + 1,
    };
    (line, column)
}

/// What earlier nodes used, for the uniqueness rules: value -> index of the first node.
#[derive(Default)]
struct Seen<'f> {
    names: HashMap<&'f str, usize>,
    addresses: HashMap<Ipv4Addr, usize>,
    server_ids: HashMap<u32, usize>,
    primary: Option<usize>,
}

struct Report<'a> {
    origin: &'a str,
    text: &'a str,
    index: &'a KeyIndex,
    errors: Vec<ConfigError>,
}

impl Report<'_> {
    fn error(&mut self, key: &str, message: impl Into<String>) {
        let line = self
            .index
            .offset(key)
            .map(|offset| line_column(self.text, offset).0);
        self.errors.push(ConfigError {
            origin: self.origin.to_owned(),
            line,
            column: None,
            key: key.to_owned(),
            message: message.into(),
        });
    }

    fn finish(mut self) -> ConfigErrors {
        // Line order reads like a compiler's output; errors without a line go last.
        self.errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
        ConfigErrors(self.errors)
    }

    /// A serde error: missing key, wrong type or unknown key. Serde stops at the first one.
    fn shape(mut self, e: &toml::de::Error) -> ConfigErrors {
        let message = one_line(e.message());
        let at = e.span().and_then(|span| self.index.path_at(span.start));
        let key = match (backquoted(&message, "missing field `"), at) {
            (Some(field), Some(at)) => format!("{at}.{field}"),
            (Some(field), None) => field.to_owned(),
            // An unknown `[[x]]` header is the extent of both `x` and `x[0]`: name the key.
            (None, Some(at)) if message.starts_with("unknown field") => {
                without_index(at).to_owned()
            }
            (None, at) => at.unwrap_or_default().to_owned(),
        };
        // An error about the whole document (a missing top-level key) has no line of its own.
        let line = e
            .span()
            .filter(|_| at.is_some())
            .map(|span| line_column(self.text, span.start).0);
        let message = message
            .replace("expected i64", "expected an integer")
            .replace("expected f64", "expected a number")
            .replace("expected a sequence", "expected an array")
            .replace("expected a boolean", "expected true or false");
        self.errors.push(ConfigError {
            origin: self.origin.to_owned(),
            line,
            column: None,
            key,
            message,
        });
        self.finish()
    }

    /// Checks every value and cross-field rule, then builds the validated cluster.
    fn check(mut self, file: &wire::File) -> Result<Cluster, ConfigErrors> {
        match self.cluster(file) {
            Some(cluster) if self.errors.is_empty() => Ok(cluster),
            _ => {
                debug_assert!(
                    !self.errors.is_empty(),
                    "every invalid value comes with an error"
                );
                Err(self.finish())
            }
        }
    }

    /// Each part returns `None` exactly when it reported an error. All checks run before the
    /// first `?`, so that every problem is reported.
    fn cluster(&mut self, file: &wire::File) -> Option<Cluster> {
        let c = &file.cluster;
        let name = self.dns_label("cluster.name", &c.name);
        let domain = self.domain("cluster.domain", &c.domain);
        let subnet = self.subnet("cluster.subnet", &c.subnet);
        let floating_ip = self.host("cluster.floating_ip", &c.floating_ip, subnet);
        // Outer `None`: invalid; inner `None`: not set.
        let gateway = match &c.gateway {
            None => Some(None),
            Some(g) => self.host("cluster.gateway", g, subnet).map(Some),
        };
        if let (Some(Some(gw)), Some(fip)) = (gateway, floating_ip) {
            if gw == fip {
                let why = format!("{fip} is also cluster.gateway; {OWN_ADDRESS}");
                self.error("cluster.floating_ip", why);
            }
        }
        let nodes = self.nodes(file, subnet, floating_ip);
        let ports = self.ports(&file.ports);
        let balancer = self.balancer(&file.balancer, &file.node);
        let tls = self.tls(&file.tls);
        let firewall = self.firewall(&file.firewall, subnet);
        let app = self.app(&file.app);
        let max_lag = self.positive("db.max_lag_ms", file.db.max_lag_ms);
        let alerts = self.alerts(&file.alerts);
        let vrrp = self.vrrp(&file.vrrp);
        Some(Cluster {
            name: name?,
            domain: domain?,
            subnet: subnet?,
            floating_ip: floating_ip?,
            gateway: gateway?,
            nodes: nodes?,
            ports: ports?,
            balancer: balancer?,
            tls: tls?,
            firewall: firewall?,
            app: app?,
            db: Db {
                max_lag: Duration::from_millis(max_lag?),
            },
            alerts: alerts?,
            vrrp: vrrp?,
        })
    }

    fn vrrp(&mut self, v: &wire::Vrrp) -> Option<Vrrp> {
        let router_id = self.int(
            "vrrp.router_id",
            v.router_id,
            1..=255,
            "a VRRP virtual router id from 1 to 255",
        );
        // VRRPv3 carries the interval in centiseconds, 12 bits wide.
        let advert = self.int(
            "vrrp.advert_interval_ms",
            v.advert_interval_ms,
            10..=40_950,
            "milliseconds from 10 to 40950 (VRRPv3's range)",
        );
        let advert = match advert {
            Some(ms) if ms % 10 != 0 => {
                self.error(
                    "vrrp.advert_interval_ms",
                    format!("{ms} is not a multiple of 10; VRRPv3 counts in centiseconds"),
                );
                None
            }
            advert => advert,
        };
        let preempt_delay = match v.preempt_delay_s {
            None => Some(None),
            Some(s) => self
                .int(
                    "vrrp.preempt_delay_s",
                    s,
                    0..=1000,
                    "seconds from 0 to 1000 (keepalived's limit), or leave it out to never preempt",
                )
                .map(|s: u64| Some(Duration::from_secs(s))),
        };
        Some(Vrrp {
            router_id: router_id?,
            advert_interval: Duration::from_millis(advert?),
            preempt_delay: preempt_delay?,
        })
    }

    fn nodes(
        &mut self,
        file: &wire::File,
        subnet: Option<Ipv4Net>,
        floating_ip: Option<Ipv4Addr>,
    ) -> Option<Vec<Node>> {
        if file.node.is_empty() {
            self.error("node", "expected at least one [[node]]");
            return None;
        }
        let mut seen = Seen::default();
        let nodes: Vec<Option<Node>> = (0..file.node.len())
            .map(|i| self.node(file, i, &mut seen, subnet, floating_ip))
            .collect();
        // A node whose db_role is misspelled may be the missing primary: that error is enough.
        let roles_valid = file
            .node
            .iter()
            .all(|n| ["primary", "replica"].contains(&n.db_role.as_str()));
        if seen.primary.is_none() && roles_valid {
            self.error(
                "node",
                format!("no node has db_role = \"primary\"; {ONE_PRIMARY}"),
            );
            return None;
        }
        nodes.into_iter().collect()
    }

    fn node<'f>(
        &mut self,
        file: &'f wire::File,
        i: usize,
        seen: &mut Seen<'f>,
        subnet: Option<Ipv4Net>,
        floating_ip: Option<Ipv4Addr>,
    ) -> Option<Node> {
        let n = &file.node[i];
        let key = |field: &str| format!("node[{i}].{field}");
        let label = |i: usize| format!("node[{i}] {:?}", file.node[i].name);

        let name = self.dns_label(&key("name"), &n.name);
        if let Some(&first) = seen.names.get(n.name.as_str()) {
            self.error(
                &key("name"),
                format!("duplicate name {:?} (also node[{first}])", n.name),
            );
        } else {
            seen.names.insert(&n.name, i);
        }

        let address = self.host(&key("address"), &n.address, subnet);
        if let Some(address) = address {
            if let Some(&first) = seen.addresses.get(&address) {
                let why = format!(
                    "duplicate address {address} (also used by {})",
                    label(first)
                );
                self.error(&key("address"), why);
            } else {
                seen.addresses.insert(address, i);
                if Some(address) == floating_ip {
                    let why = format!("{address} is also the address of {}", label(i));
                    self.error("cluster.floating_ip", format!("{why}; {OWN_ADDRESS}"));
                }
            }
        }

        let db_role = match n.db_role.as_str() {
            "primary" => Some(DbRole::Primary),
            "replica" => Some(DbRole::Replica),
            other => {
                let why = format!("expected one of \"primary\", \"replica\", got {other:?}");
                self.error(&key("db_role"), why);
                None
            }
        };
        if db_role == Some(DbRole::Primary) {
            match seen.primary {
                Some(first) => {
                    let why = format!("a second primary ({} is one already)", label(first));
                    self.error(&key("db_role"), format!("{why}; {ONE_PRIMARY}"));
                }
                None => seen.primary = Some(i),
            }
        }

        let server_id = match n.server_id {
            None => u32::try_from(i + 1).ok(),
            Some(id) => self.int(
                &key("server_id"),
                id,
                1..=i64::from(u32::MAX),
                "a MariaDB server_id from 1 to 4294967295",
            ),
        };
        if let Some(id) = server_id {
            if let Some(&first) = seen.server_ids.get(&id) {
                let how = if n.server_id.is_none() {
                    " (its position in the file)"
                } else {
                    ""
                };
                let why = format!("duplicate server_id {id}{how} (also {})", label(first));
                self.error(&key("server_id"), why);
            } else {
                seen.server_ids.insert(id, i);
            }
        }

        let weight = self.int(
            &key("weight"),
            n.weight,
            1..=i64::from(u32::MAX),
            "a weight of at least 1",
        );
        let vrrp_priority = match n.vrrp_priority {
            None => Some(wire::default_vrrp_priority(i)),
            Some(p) => self.int(
                &key("vrrp_priority"),
                p,
                1..=254,
                "a VRRP priority from 1 to 254",
            ),
        };
        Some(Node {
            name: name?,
            address: address?,
            db_role: db_role?,
            server_id: server_id?,
            weight: weight?,
            backup: n.backup,
            vrrp_priority: vrrp_priority?,
        })
    }

    fn ports(&mut self, p: &wire::Ports) -> Option<Ports> {
        let all = [
            ("ports.http", p.http),
            ("ports.https", p.https),
            ("ports.web", p.web),
            ("ports.app", p.app),
            ("ports.db", p.db),
            ("ports.admin", p.admin),
        ];
        let mut ok = [0u16; 6];
        for (i, (key, value)) in all.iter().enumerate() {
            ok[i] = self
                .int(key, *value, 1..=65535, "a port number from 1 to 65535")
                .unwrap_or(0);
        }
        let mut clash = false;
        for b in 0..all.len() {
            for a in 0..b {
                if ok[a] == 0 || ok[a] != ok[b] {
                    continue;
                }
                clash = true;
                // Blame the key the user wrote; if both are written, the later one.
                let (blame, other) =
                    if !self.index.is_written(all[b].0) && self.index.is_written(all[a].0) {
                        (all[a].0, all[b].0)
                    } else {
                        (all[b].0, all[a].0)
                    };
                let default = if self.index.is_written(other) {
                    ""
                } else {
                    " (its default)"
                };
                self.error(
                    blame,
                    format!(
                        "port {} is also {other}{default}; every port must be different",
                        ok[a]
                    ),
                );
                // One report per clashing key, even when three share a port.
                break;
            }
        }
        if clash || ok.contains(&0) {
            return None;
        }
        let [http, https, web, app, db, admin] = ok;
        Some(Ports {
            http,
            https,
            web,
            app,
            db,
            admin,
        })
    }

    fn balancer(&mut self, b: &wire::Balancer, nodes: &[wire::Node]) -> Option<Balancer> {
        let algorithm = self.one_of(
            "balancer.algorithm",
            &b.algorithm,
            &[
                Algorithm::RoundRobin,
                Algorithm::WeightedRoundRobin,
                Algorithm::LeastConnections,
            ],
            |a| a.as_str(),
        );
        let mode = self.one_of(
            "balancer.mode",
            &b.mode,
            &[BalancerMode::ActiveActive, BalancerMode::ActivePassive],
            |m| m.as_str(),
        );
        if mode == Some(BalancerMode::ActivePassive)
            && !nodes.is_empty()
            && nodes.iter().all(|n| n.backup)
        {
            self.error(
                "balancer.mode",
                "active-passive needs at least one node with backup = false, \
                 but every node is a backup",
            );
        }

        let h = &b.health;
        if !h.path.starts_with('/') || h.path.chars().any(char::is_whitespace) {
            self.error(
                "balancer.health.path",
                format!(
                    "expected an absolute URL path such as \"/healthz\", got {:?}",
                    h.path
                ),
            );
        }
        let expect_status = self.int(
            "balancer.health.expect_status",
            h.expect_status,
            100..=599,
            "an HTTP status from 100 to 599",
        );
        let interval = self.positive("balancer.health.interval_ms", h.interval_ms);
        let timeout = self.positive("balancer.health.timeout_ms", h.timeout_ms);
        if let (Some(interval), Some(timeout)) = (interval, timeout) {
            if timeout > interval {
                let why = format!(
                    "timeout {timeout} ms is longer than balancer.health.interval_ms = \
                     {interval} ms; expected at most the interval"
                );
                self.error("balancer.health.timeout_ms", why);
            }
        }
        let rise = self.int(
            "balancer.health.rise",
            h.rise,
            1..=i64::from(u32::MAX),
            "a count of at least 1",
        );
        let fall = self.int(
            "balancer.health.fall",
            h.fall,
            1..=i64::from(u32::MAX),
            "a count of at least 1",
        );
        Some(Balancer {
            algorithm: algorithm?,
            mode: mode?,
            health: HealthCheck {
                path: h.path.clone(),
                expect_status: expect_status?,
                interval: Duration::from_millis(interval?),
                timeout: Duration::from_millis(timeout?),
                rise: rise?,
                fall: fall?,
            },
        })
    }

    fn tls(&mut self, t: &wire::Tls) -> Option<Tls> {
        let certificate = self.path("tls.certificate", t.certificate.as_deref());
        let key = self.path("tls.key", t.key.as_deref());
        match (&t.certificate, &t.key) {
            (Some(_), None) => self.error(
                "tls.certificate",
                "a certificate needs tls.key too; give both or neither",
            ),
            (None, Some(_)) => self.error(
                "tls.key",
                "a key needs tls.certificate too; give both or neither",
            ),
            _ => {}
        }
        let hsts_max_age = self.int(
            "tls.hsts_max_age_s",
            t.hsts_max_age_s,
            0..,
            "a number of seconds, 0 or more",
        );
        Some(Tls {
            certificate: certificate?,
            key: key?,
            hsts_max_age: hsts_max_age?,
        })
    }

    fn firewall(&mut self, f: &wire::Firewall, subnet: Option<Ipv4Net>) -> Option<Firewall> {
        let Some(cidrs) = &f.admin_cidrs else {
            return Some(Firewall {
                admin_cidrs: vec![subnet?],
            });
        };
        if cidrs.is_empty() {
            self.error(
                "firewall.admin_cidrs",
                "expected at least one network; with none, the admin port is unreachable",
            );
            return None;
        }
        let parsed: Vec<_> = cidrs
            .iter()
            .enumerate()
            .map(|(i, c)| self.network(&format!("firewall.admin_cidrs[{i}]"), c))
            .collect();
        Some(Firewall {
            admin_cidrs: parsed.into_iter().collect::<Option<_>>()?,
        })
    }

    fn app(&mut self, a: &wire::App) -> Option<App> {
        let files = self.path("app.files", a.files.as_deref());
        let command = match &a.command {
            Some(argv) if argv.first().is_none_or(|c| c.is_empty()) => {
                self.error(
                    "app.command",
                    "expected a non-empty argv such as [\"/usr/bin/myapp\", \"--port\", \"8000\"]",
                );
                None
            }
            command => Some(command.clone()),
        };
        Some(App {
            files: files?,
            command: command?,
        })
    }

    fn alerts(&mut self, a: &wire::Alerts) -> Option<Alerts> {
        let webhook = match a.webhook.as_deref().map(WebhookUrl::parse) {
            None => Some(None),
            Some(Ok(url)) => Some(Some(url)),
            // The message never repeats the URL: its path often carries a token.
            Some(Err(message)) => {
                self.error("alerts.webhook", message);
                None
            }
        };
        let ratio = a.error_ratio_5xx;
        let ratio = if ratio > 0.0 && ratio <= 1.0 {
            Some(ratio)
        } else {
            self.error(
                "alerts.error_ratio_5xx",
                format!("expected a ratio above 0 and at most 1 (0.05 = 5%), got {ratio}"),
            );
            None
        };
        let window = self
            .positive("alerts.window_s", a.window_s)
            .map(Duration::from_secs);
        let cooldown = self
            .int(
                "alerts.cooldown_s",
                a.cooldown_s,
                0..,
                "a number of seconds, 0 or more",
            )
            .map(Duration::from_secs);
        let disk = self.int(
            "alerts.disk_used_percent",
            a.disk_used_percent,
            1..=100,
            "a percentage from 1 to 100",
        );
        let cert_days = self.int(
            "alerts.cert_expiry_days",
            a.cert_expiry_days,
            0..=i64::from(u32::MAX),
            "a number of days, 0 or more",
        );
        Some(Alerts {
            webhook: webhook?,
            error_ratio_5xx: ratio?,
            window: window?,
            cooldown: cooldown?,
            disk_used_percent: disk?,
            cert_expiry_days: cert_days?,
        })
    }

    // --- single values ------------------------------------------------------------------------

    /// An integer in `range`, converted to `T` (the range must fit `T`).
    fn int<T: TryFrom<i64>>(
        &mut self,
        key: &str,
        value: i64,
        range: impl RangeBounds<i64>,
        expected: &str,
    ) -> Option<T> {
        match T::try_from(value) {
            Ok(v) if range.contains(&value) => Some(v),
            _ => {
                self.error(key, format!("expected {expected}, got {value}"));
                None
            }
        }
    }

    /// A duration in ms or s: more than 0.
    fn positive(&mut self, key: &str, value: i64) -> Option<u64> {
        self.int(key, value, 1.., "a duration greater than 0")
    }

    fn domain(&mut self, key: &str, value: &str) -> Option<String> {
        if value.len() <= 253 && value.split('.').all(is_dns_label) {
            return Some(value.to_owned());
        }
        self.error(
            key,
            format!("expected a DNS domain such as \"tandem.test\", got {value:?}"),
        );
        None
    }

    fn dns_label(&mut self, key: &str, value: &str) -> Option<String> {
        if is_dns_label(value) {
            Some(value.to_owned())
        } else {
            let why = format!(
                "expected a host name (1-63 letters, digits or '-', \
                 not starting or ending with '-'), got {value:?}"
            );
            self.error(key, why);
            None
        }
    }

    fn one_of<T: Copy>(
        &mut self,
        key: &str,
        value: &str,
        all: &[T],
        name: fn(T) -> &'static str,
    ) -> Option<T> {
        let found = all.iter().copied().find(|v| name(*v) == value);
        if found.is_none() {
            let names: Vec<String> = all.iter().map(|v| format!("{:?}", name(*v))).collect();
            self.error(
                key,
                format!("expected one of {}, got {value:?}", names.join(", ")),
            );
        }
        found
    }

    /// An optional path: `Some(None)` when absent, `None` when invalid.
    fn path(&mut self, key: &str, value: Option<&str>) -> Option<Option<PathBuf>> {
        match value {
            Some("") => {
                self.error(key, "expected a file path, got an empty string");
                None
            }
            value => Some(value.map(PathBuf::from)),
        }
    }

    fn network(&mut self, key: &str, value: &str) -> Option<Ipv4Net> {
        let net = match value.parse::<Ipv4Net>() {
            Ok(net) => net,
            Err(why) => {
                self.error(
                    key,
                    format!("expected an IPv4 network such as \"10.88.0.0/24\": {why}"),
                );
                return None;
            }
        };
        if net.addr != net.network() {
            self.error(
                key,
                format!(
                    "{value} has host bits set; expected the network address, {}/{}",
                    net.network(),
                    net.prefix
                ),
            );
            return None;
        }
        Some(net)
    }

    fn subnet(&mut self, key: &str, value: &str) -> Option<Ipv4Net> {
        let net = self.network(key, value)?;
        if net.prefix > 30 {
            let why = format!(
                "a /{} has no room for nodes and a floating IP; expected a prefix of 30 or less",
                net.prefix
            );
            self.error(key, why);
            return None;
        }
        Some(net)
    }

    /// A host address inside `subnet`. With no valid subnet (already an error) any address
    /// passes, so that the checks that follow still run and report.
    fn host(&mut self, key: &str, value: &str, subnet: Option<Ipv4Net>) -> Option<Ipv4Addr> {
        let Ok(ip) = value.parse::<Ipv4Addr>() else {
            self.error(
                key,
                format!("expected an IPv4 address such as \"10.88.0.11\", got {value:?}"),
            );
            return None;
        };
        let Some(subnet) = subnet else {
            return Some(ip);
        };
        let problem = if !subnet.contains(ip) {
            "is outside the cluster subnet"
        } else if ip == subnet.network() {
            "is the network address of the cluster subnet"
        } else if ip == subnet.broadcast() {
            "is the broadcast address of the cluster subnet"
        } else {
            return Some(ip);
        };
        self.error(key, format!("{ip} {problem} {subnet}"));
        None
    }
}

const OWN_ADDRESS: &str = "the floating IP needs an address of its own";
const ONE_PRIMARY: &str = "expected exactly one node with db_role = \"primary\"";

/// Hostname-safe: 1-63 ASCII letters, digits and '-', not starting or ending with '-'.
fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// `subnet = 10.88.0.0/24` fails as a malformed float; say what is really wrong.
fn unquoted_hint(text: &str, e: &toml::de::Error) -> &'static str {
    let line = e.span().and_then(|span| {
        let start = text.get(..span.start)?.rfind('\n').map_or(0, |i| i + 1);
        text.get(start..)?.lines().next()
    });
    let value = line.and_then(|l| l.split_once('=')).map(|(_, v)| v.trim());
    match value {
        Some(v) if v.matches('.').count() >= 2 && v.starts_with(|c: char| c.is_ascii_digit()) => {
            "; addresses and networks are strings: put them in quotes"
        }
        _ => "",
    }
}

/// Best guess, from the text alone, at the key a syntax error belongs to: the table header on
/// its line, or the key on its line inside the last header before it. (The parser keeps no
/// entry for a line it rejects, so the key index cannot say.)
fn syntax_key(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let line_start = text.as_bytes()[..offset]
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |i| i + 1);
    let earlier: Vec<&str> = text.get(..line_start).unwrap_or_default().lines().collect();
    let line = text
        .get(line_start..)
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or_default();
    if let Some(table) = header_path(line, &earlier) {
        return table;
    }
    let table = (0..earlier.len())
        .rev()
        .find_map(|i| header_path(earlier[i], &earlier[..i]))
        .unwrap_or_default();
    let key = line.split_once('=').map(|(k, _)| k.trim()).filter(|k| {
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
    });
    match (table.as_str(), key) {
        ("", Some(key)) => key.to_owned(),
        (table, Some(key)) => format!("{table}.{key}"),
        (table, None) => table.to_owned(),
    }
}

/// The path of a table header line: `[x]` -> "x", and "x[k]" for `[[x]]` after k earlier ones.
fn header_path(line: &str, earlier: &[&str]) -> Option<String> {
    // `[ a . b ]` -> "a.b"
    let name = |rest: &str| {
        let inside = rest.split(']').next().unwrap_or_default();
        inside
            .split('.')
            .map(str::trim)
            .collect::<Vec<_>>()
            .join(".")
    };
    let array_name = |l: &str| l.trim_start().strip_prefix("[[").map(name);
    if let Some(array) = array_name(line) {
        let k = earlier
            .iter()
            .filter(|l| array_name(l).as_ref() == Some(&array))
            .count();
        return Some(format!("{array}[{k}]"));
    }
    line.trim_start().strip_prefix('[').map(name)
}

/// `node[0]` -> `node`; other paths unchanged.
fn without_index(path: &str) -> &str {
    match path.strip_suffix(']').and_then(|p| p.rsplit_once('[')) {
        Some((base, index)) if index.bytes().all(|b| b.is_ascii_digit()) => base,
        _ => path,
    }
}

/// The text between `prefix` and the next backquote, e.g. the field of "missing field `x`".
fn backquoted<'m>(message: &'m str, prefix: &str) -> Option<&'m str> {
    let rest = &message[message.find(prefix)? + prefix.len()..];
    Some(&rest[..rest.find('`')?])
}

fn one_line(message: &str) -> String {
    message.trim().replace('\n', "; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_column_counts_from_one_and_in_characters() {
        let text = "a = 1\nb = \"é\" x\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 6), (2, 1));
        assert_eq!(line_column(text, text.find('x').unwrap()), (2, 9));
        assert_eq!(line_column(text, 10_000), (3, 1));
    }

    #[test]
    fn dns_labels() {
        for ok in ["a", "server1", "web-01", &"x".repeat(63)] {
            assert!(is_dns_label(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "a.b", "a_b", "ä", &"x".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
    }

    #[test]
    fn key_index_finds_nested_paths() {
        let text = "[cluster]\nname = 'x'\n\n[[node]]\nname = 'a'\n[[node]]\nname = 'b'\n\
                    [balancer.health]\nrise = 2\n";
        let doc = DeTable::parse(text).unwrap();
        let index = KeyIndex::new(&doc);
        let line = |path: &str| index.offset(path).map(|o| line_column(text, o).0);
        assert_eq!(line("cluster.name"), Some(2));
        assert_eq!(line("node[1].name"), Some(7));
        assert_eq!(line("node[1].address"), line("node[1]"));
        assert_eq!(line("balancer.health.rise"), Some(9));
        assert_eq!(line("ports.db"), None);
        assert_eq!(
            index.path_at(text.find("'b'").unwrap()),
            Some("node[1].name")
        );
    }

    #[test]
    fn without_index_strips_only_an_array_index() {
        assert_eq!(without_index("node[0]"), "node");
        assert_eq!(without_index("node[0].x[12]"), "node[0].x");
        assert_eq!(without_index("cluster.foo1"), "cluster.foo1");
        assert_eq!(without_index("a[b]"), "a[b]");
    }

    #[test]
    fn error_display() {
        let e = ConfigError {
            origin: "cluster.toml".into(),
            line: Some(12),
            column: None,
            key: "node[1].address".into(),
            message: "duplicate address".into(),
        };
        assert_eq!(
            e.to_string(),
            "cluster.toml:12: node[1].address: duplicate address"
        );
        let io = ConfigErrors::io(Path::new("/nope.toml"), std::io::ErrorKind::NotFound.into());
        assert!(
            io.to_string()
                .starts_with("/nope.toml: cannot read the file: "),
            "{io}"
        );
    }
}
#[cfg(test)]
mod debug_spans {
    #[test]
    fn dump() {
        let text = std::fs::read_to_string("tests/bad/missing-node-address.toml").unwrap();
        let (doc, _) = super::DeTable::parse_recoverable(&text);
        let index = super::KeyIndex::new(&doc);
        for (p, s) in &index.extents {
            eprintln!("{p} {s:?} {:?}", &text[s.clone()]);
        }
        eprintln!(
            "{:?}",
            toml::from_str::<crate::wire::File>(&text)
                .unwrap_err()
                .span()
        );
        let text = std::fs::read_to_string("tests/bad/syntax-unclosed-string.toml").unwrap();
        let (doc, e) = super::DeTable::parse_recoverable(&text);
        let index = super::KeyIndex::new(&doc);
        for (p, s) in &index.extents {
            eprintln!("{p} {s:?} {:?}", &text[s.clone()]);
        }
        eprintln!("{e:?}");
    }
}
