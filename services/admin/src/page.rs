//! The status page: plain HTML, no JavaScript, refreshed by the browser every few seconds.
//! A pure function of what the admin server gathered.

use std::fmt::Write as _;

use api::control::ServiceStatus;

/// A service that restarted less than this long ago is flagged on the page.
pub(crate) const RECENT_RESTART_S: u64 = 120;
/// The page reloads itself this often.
pub(crate) const REFRESH_S: u32 = 5;

/// One node of the cluster as the page shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodeRow {
    pub(crate) name: String,
    pub(crate) address: String,
    pub(crate) db_role: String,
    pub(crate) this_node: bool,
    /// The node's VRRP state for the floating IP (`MASTER` holds it), or why it is unknown.
    pub(crate) vip: String,
}

/// An alert as the page shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AlertRow {
    pub(crate) rule: String,
    pub(crate) subject: String,
    pub(crate) state: String,
    pub(crate) since: String,
    pub(crate) message: String,
}

/// Everything on the page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StatusView {
    pub(crate) cluster: String,
    pub(crate) node: String,
    pub(crate) nodes: Vec<NodeRow>,
    /// `None` when the supervisor could not be asked; the reason is shown instead.
    pub(crate) services: Result<Vec<ServiceStatus>, String>,
    pub(crate) alerts: Vec<AlertRow>,
    /// Every node's view of the floating IP (`None`: no answer), for `/api/status`.
    pub(crate) vip: Vec<(String, Option<api::vip::VipStatus>)>,
    /// Extra facts (VIP holder, DB lag, …) as label/value pairs.
    pub(crate) facts: Vec<(String, String)>,
    /// Why the node runs degraded (a damaged data partition, a lost state DB); empty if not.
    pub(crate) degraded: Vec<api::storage::Degraded>,
}

/// How a service's state reads to a person: a restart just now is said plainly.
pub(crate) fn describe(s: &ServiceStatus) -> String {
    match s.state.as_str() {
        "backoff" | "starting" if s.restarts > 0 => "restarting".to_string(),
        "running" if s.restarts > 0 && s.uptime_s.is_some_and(|u| u < RECENT_RESTART_S) => {
            format!("running (restarted {}s ago)", s.uptime_s.unwrap_or(0))
        }
        "running" if !s.ready => "starting".to_string(),
        state => state.to_string(),
    }
}

fn css_class(s: &ServiceStatus) -> &'static str {
    match s.state.as_str() {
        "failed" | "exited" => "bad",
        "backoff" | "starting" | "stopping" | "waiting" => "warn",
        "running" if s.restarts > 0 && s.uptime_s.is_some_and(|u| u < RECENT_RESTART_S) => "warn",
        _ => "ok",
    }
}

pub(crate) fn render(v: &StatusView) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_S}\">\
         <title>{} — {} — Tandem</title>\n<style>{STYLE}</style></head>\n<body>\n",
        esc(&v.node),
        esc(&v.cluster)
    );
    let _ = writeln!(
        s,
        "<h1>Tandem · cluster <b>{}</b> · node <b>{}</b></h1>",
        esc(&v.cluster),
        esc(&v.node)
    );

    if !v.degraded.is_empty() {
        s.push_str("<div id=\"degraded\" class=\"bad\"><h2>This node is degraded</h2>\n");
        for d in &v.degraded {
            let _ = writeln!(s, "<p><b>{}</b></p>", esc(&d.reason));
            if !d.stopped.is_empty() {
                let _ = writeln!(s, "<p>stopped: {}</p>", esc(&d.stopped.join(", ")));
            }
            if !d.hint.is_empty() {
                let _ = writeln!(s, "<p>what to do: {}</p>", esc(&d.hint));
            }
        }
        s.push_str("</div>\n");
    }

    s.push_str("<h2>Nodes</h2>\n<table><tr><th>node</th><th>address</th><th>database</th><th>floating IP</th></tr>\n");
    for n in &v.nodes {
        let me = if n.this_node { " (this node)" } else { "" };
        let _ = writeln!(
            s,
            "<tr data-node=\"{}\"><td>{}{me}</td><td>{}</td><td>{}</td><td class=\"vip\">{}</td></tr>",
            esc(&n.name),
            esc(&n.name),
            esc(&n.address),
            esc(&n.db_role),
            esc(&n.vip)
        );
    }
    s.push_str("</table>\n");

    if !v.facts.is_empty() {
        s.push_str("<h2>Cluster</h2>\n<table>\n");
        for (k, val) in &v.facts {
            let _ = writeln!(s, "<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(val));
        }
        s.push_str("</table>\n");
    }

    s.push_str("<h2>Services</h2>\n");
    match &v.services {
        Ok(services) => {
            s.push_str(
                "<table id=\"services\"><tr><th>service</th><th>state</th><th>pid</th>\
                 <th>restarts</th><th>last exit</th><th>uptime</th></tr>\n",
            );
            for svc in services {
                let _ = writeln!(
                    s,
                    "<tr class=\"{}\" data-service=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    css_class(svc),
                    esc(&svc.name),
                    esc(&svc.name),
                    esc(&describe(svc)),
                    svc.pid.map_or("-".to_string(), |p| p.to_string()),
                    svc.restarts,
                    esc(svc.last_exit.as_deref().unwrap_or("-")),
                    svc.uptime_s.map_or("-".to_string(), human_duration),
                );
            }
            s.push_str("</table>\n");
        }
        Err(reason) => {
            let _ = writeln!(
                s,
                "<p class=\"bad\">supervisor unreachable: {}</p>",
                esc(reason)
            );
        }
    }

    s.push_str("<h2>Recent alerts</h2>\n");
    if v.alerts.is_empty() {
        s.push_str("<p>none</p>\n");
    } else {
        s.push_str("<table id=\"alerts\"><tr><th>alert</th><th>subject</th><th>state</th><th>since</th><th>message</th></tr>\n");
        for a in &v.alerts {
            let class = if a.state == "firing" { "bad" } else { "ok" };
            let _ = writeln!(
                s,
                "<tr class=\"{class}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&a.rule),
                esc(&a.subject),
                esc(&a.state),
                esc(&a.since),
                esc(&a.message)
            );
        }
        s.push_str("</table>\n");
    }
    s.push_str("<p class=\"foot\"><a href=\"/metrics\">metrics</a> · <a href=\"/api/status\">status JSON</a></p>\n");
    s.push_str("</body></html>\n");
    s
}

pub(crate) fn human_duration(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m{}s", secs / 60, secs % 60),
        3600..=86399 => format!("{}h{}m", secs / 3600, (secs % 3600) / 60),
        _ => format!("{}d{}h", secs / 86400, (secs % 86400) / 3600),
    }
}

fn esc(s: &str) -> String {
    api::text::html_escape(s)
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em;color:#222}\
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.5em}\
table{border-collapse:collapse;min-width:40em}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}\
th{background:#f3f3f3}#services tr.ok td:nth-child(2){color:#176b1d}#services tr.warn td:nth-child(2){color:#9a6700;font-weight:bold}\
tr.bad td{color:#b00020;font-weight:bold}p.bad{color:#b00020}.foot{margin-top:2em;font-size:.9em}";

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, state: &str, restarts: u32, uptime: Option<u64>) -> ServiceStatus {
        ServiceStatus {
            name: name.into(),
            state: state.into(),
            pid: Some(42),
            restarts,
            last_exit: (restarts > 0).then(|| "signal 9 (SIGKILL)".into()),
            uptime_s: uptime,
            ready: state == "running",
        }
    }

    #[test]
    fn states_read_plainly() {
        let cases = [
            (svc("a", "running", 0, Some(500)), "running"),
            (
                svc("a", "running", 1, Some(3)),
                "running (restarted 3s ago)",
            ),
            (svc("a", "running", 1, Some(5000)), "running"),
            (svc("a", "backoff", 2, None), "restarting"),
            (svc("a", "failed", 5, None), "failed"),
        ];
        for (s, expected) in cases {
            assert_eq!(describe(&s), expected, "{s:?}");
        }
    }

    #[test]
    fn page_escapes_and_lists_everything() {
        let view = StatusView {
            cluster: "c<1>".into(),
            node: "server1".into(),
            nodes: vec![NodeRow {
                name: "server1".into(),
                address: "10.88.0.11".into(),
                db_role: "replica".into(),
                this_node: true,
                vip: "MASTER".into(),
            }],
            vip: Vec::new(),
            services: Ok(vec![svc("nginx", "running", 1, Some(2))]),
            alerts: vec![AlertRow {
                rule: "crash-loop".into(),
                subject: "nginx".into(),
                state: "firing".into(),
                since: "12:00:00".into(),
                message: "3 restarts in 60s".into(),
            }],
            facts: vec![("floating IP".into(), "10.88.0.10".into())],
            degraded: Vec::new(),
        };
        let html = render(&view);
        assert!(!html.contains("degraded"));
        assert!(html.contains("c&lt;1&gt;"));
        assert!(html.contains("server1 (this node)"));
        assert!(html.contains("<td class=\"vip\">MASTER</td>"));
        assert!(html.contains("running (restarted 2s ago)"));
        assert!(html.contains("crash-loop"));
        assert!(!html.contains("<script"));
        let down = render(&StatusView {
            services: Err("no socket".into()),
            ..view.clone()
        });
        assert!(down.contains("supervisor unreachable: no socket"));
        let degraded = render(&StatusView {
            degraded: vec![api::storage::Degraded {
                subject: "data-partition".into(),
                reason: "data partition /dev/vda5: no <readable> filesystem".into(),
                hint: "e2fsck -b 32768".into(),
                stopped: vec!["mariadb".into(), "nginx".into()],
                since_ms: 0,
            }],
            ..view
        });
        assert!(degraded.contains("This node is degraded"), "{degraded}");
        assert!(degraded.contains("no &lt;readable&gt; filesystem"));
        assert!(degraded.contains("stopped: mariadb, nginx"));
        assert!(degraded.contains("what to do: e2fsck -b 32768"));
    }

    #[test]
    fn durations() {
        assert_eq!(human_duration(59), "59s");
        assert_eq!(human_duration(61), "1m1s");
        assert_eq!(human_duration(7200), "2h0m");
        assert_eq!(human_duration(90000), "1d1h");
    }
}
