//! The status page: plain HTML refreshed every few seconds, with one tiny inline script for the
//! bundle upload (the file goes as the raw request body; the refresh pauses while it runs).
//! Without JavaScript the page still refreshes and shows everything. A pure function of what
//! the admin server gathered.

use std::fmt::Write as _;

use api::control::ServiceStatus;
use api::update::{Boot, UpdateStatus};

use crate::upgrade::{Step, UpgradeState};

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
    /// The update service's status, or why there is none.
    pub(crate) update: Result<UpdateStatus, String>,
    /// The last cluster upgrade's record.
    pub(crate) cluster_upgrade: Option<UpgradeState>,
    /// When the view was gathered (for deadlines and rates).
    pub(crate) now_unix_ms: u64,
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

/// The page for a logged-in browser whose session carries `csrf` (the upload script sends it).
pub(crate) fn render(v: &StatusView, csrf: &str) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <noscript><meta http-equiv=\"refresh\" content=\"{REFRESH_S}\"></noscript>\
         <meta name=\"csrf-token\" content=\"{}\">\
         <title>{} — {} — Tandem</title>\n<style>{STYLE}{NAV_STYLE}</style></head>\n<body>\n",
        esc(csrf),
        esc(&v.node),
        esc(&v.cluster)
    );
    s.push_str(&crate::forms::nav(csrf));
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

    render_update(&mut s, v);

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
    s.push_str(
        "<p class=\"foot\"><a href=\"/api/status\">status JSON</a> · <code>/metrics</code> \
         takes the metrics token (<code>Authorization: Bearer …</code>)</p>\n",
    );
    let _ = writeln!(
        s,
        "<script>{}</script>",
        SCRIPT.replace("REFRESH_MS", &(u64::from(REFRESH_S) * 1000).to_string())
    );
    s.push_str("</body></html>\n");
    s
}

/// The update section: version and slots, the install in progress, the upload form, the last
/// cluster upgrade.
fn render_update(s: &mut String, v: &StatusView) {
    s.push_str("<h2>Update</h2>\n");
    match &v.update {
        Err(e) => {
            let _ = writeln!(
                s,
                "<p class=\"bad\" id=\"update\">no update status: {}</p>",
                esc(e)
            );
        }
        Ok(u) => {
            let boot = match &u.boot {
                Boot::Blessed => "blessed".to_string(),
                Boot::Trial { deadline_unix_ms } => format!(
                    "TRIAL: blessed once every service stays ready, else rolled back at {} (in {})",
                    crate::utc_time(*deadline_unix_ms as i64),
                    human_duration(deadline_unix_ms.saturating_sub(v.now_unix_ms) / 1000)
                ),
                Boot::RollingBack { reason } => format!("ROLLING BACK: {reason}"),
                Boot::Unknown { reason } => format!("unknown ({reason})"),
            };
            let _ = writeln!(
                s,
                "<table id=\"update\"><tr><th>version</th><td class=\"version\">{}</td></tr>\n\
                 <tr><th>booted slot</th><td>{}</td></tr>\n<tr><th>boot</th><td class=\"boot\">{}</td></tr>",
                esc(&u.version),
                esc(&u.booted_slot),
                esc(&boot)
            );
            if !u.bad_versions.is_empty() {
                let _ = writeln!(
                    s,
                    "<tr><th>bad versions</th><td class=\"bad-versions\">{}</td></tr>",
                    esc(&u.bad_versions.join(", "))
                );
            }
            if let Some(i) = &u.install {
                let _ = writeln!(
                    s,
                    "<tr><th>install</th><td class=\"install\">{}</td></tr>",
                    esc(&install_line(i, v.now_unix_ms))
                );
            }
            s.push_str("</table>\n<table id=\"slots\"><tr><th>slot</th><th>state</th><th>version</th><th>entry</th></tr>\n");
            for slot in &u.slots {
                let state = serde_json::to_value(slot.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                let _ = writeln!(
                    s,
                    "<tr data-slot=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(&slot.slot),
                    esc(&slot.slot),
                    esc(&state),
                    esc(slot.version.as_deref().unwrap_or("-")),
                    esc(slot.entry.as_deref().unwrap_or("-"))
                );
            }
            s.push_str("</table>\n");
        }
    }
    s.push_str(
        "<form id=\"upload\" action=\"/api/update/install\" method=\"post\">\
         <input type=\"file\" name=\"bundle\" id=\"bundle\" required> \
         <label><input type=\"checkbox\" id=\"force\"> force (older, equal or bad version)</label> \
         <label><input type=\"checkbox\" id=\"reboot\" checked> reboot when done</label> \
         <label><input type=\"checkbox\" id=\"cluster\"> whole cluster, one node at a time</label> \
         <button type=\"submit\">install</button></form>\n<p id=\"result\"></p>\n",
    );
    if let Some(up) = &v.cluster_upgrade {
        let outcome = serde_json::to_value(up.outcome)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "<h2>Cluster upgrade to {}: {}</h2>\n<p class=\"{}\" id=\"upgrade-message\">{}</p>",
            esc(&up.version),
            esc(&outcome),
            if outcome == "failed" { "bad" } else { "ok" },
            esc(&up.message)
        );
        s.push_str("<table id=\"cluster-upgrade\"><tr><th>node</th><th>step</th><th>since</th><th>reason</th></tr>\n");
        for n in &up.nodes {
            let step = serde_json::to_value(n.step)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            let class = match n.step {
                Step::Failed => "bad",
                Step::Installing | Step::Rebooting => "warn",
                Step::Waiting | Step::Done => "ok",
            };
            let _ = writeln!(
                s,
                "<tr class=\"{class}\" data-node=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&n.node),
                esc(&n.node),
                esc(&step),
                esc(&crate::utc_time(n.since_unix_ms as i64)),
                esc(n.reason.as_deref().unwrap_or(""))
            );
        }
        s.push_str("</table>\n");
    }
}

/// An install's progress in a line: phase, bytes, percent, rate.
fn install_line(i: &api::update::InstallStatus, now_unix_ms: u64) -> String {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let mut line = format!(
        "{} {}",
        i.version.as_deref().unwrap_or("(version not verified yet)"),
        i.phase
    );
    if i.total > 0 {
        let _ = write!(
            line,
            ": {:.1} of {:.1} MiB ({}%)",
            mib(i.done),
            mib(i.total),
            i.done.saturating_mul(100) / i.total
        );
    } else if i.done > 0 {
        let _ = write!(line, ": {:.1} MiB", mib(i.done));
    }
    let elapsed_ms = now_unix_ms.saturating_sub(i.started_unix_ms);
    if elapsed_ms > 0 && i.done > 0 && !matches!(i.phase.as_str(), "done" | "failed") {
        let _ = write!(
            line,
            ", {:.1} MiB/s",
            mib(i.done) / (elapsed_ms as f64 / 1000.0)
        );
    }
    if !i.origin.is_empty() {
        let _ = write!(line, " — from {}", i.origin);
    }
    if let Some(e) = &i.error {
        let _ = write!(line, " — {e}");
    }
    line
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

/// Sends the chosen file as the raw request body (no multipart) with the session's CSRF token
/// in the `X-CSRF-Token` header, shows the answer, and shows
/// the install's progress from `/api/status` meanwhile; reloads the page every few seconds
/// unless an upload runs.
const SCRIPT: &str = r#"
var busy=false,f=document.getElementById('upload'),out=document.getElementById('result');
setInterval(function(){if(!busy&&!document.getElementById('bundle').value)location.reload();},REFRESH_MS);
f.onsubmit=function(e){e.preventDefault();var file=document.getElementById('bundle').files[0];if(!file)return;
var c=document.getElementById('cluster').checked,q=c?'':('force='+(document.getElementById('force').checked?1:0)+'&reboot='+(document.getElementById('reboot').checked?1:0));
busy=true;out.textContent='uploading '+file.name+'…';
var t=setInterval(function(){fetch('/api/status').then(function(r){return r.json();}).then(function(s){var i=s.update&&s.update.install;
if(i&&i.total)out.textContent=i.phase+': '+Math.floor(i.done*100/i.total)+'% of '+(i.total/1048576).toFixed(1)+' MiB';}).catch(function(){});},2000);
fetch((c?'/api/cluster/upgrade?':'/api/update/install?')+q,{method:'POST',body:file,headers:{'Content-Type':'application/octet-stream','X-CSRF-Token':document.querySelector('meta[name=csrf-token]').content}})
.then(function(r){return r.text().then(function(b){out.textContent=r.status+' '+b;});})
.catch(function(err){out.textContent='upload failed: '+err;})
.finally(function(){clearInterval(t);busy=false;});};
"#;

pub(crate) const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em;color:#222}\
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.5em}\
table{border-collapse:collapse;min-width:40em}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}\
th{background:#f3f3f3}#services tr.ok td:nth-child(2){color:#176b1d}#services tr.warn td:nth-child(2){color:#9a6700;font-weight:bold}\
tr.bad td{color:#b00020;font-weight:bold}tr.warn td{color:#9a6700}p.bad{color:#b00020}.foot{margin-top:2em;font-size:.9em}";
const NAV_STYLE: &str = "nav{margin-bottom:1em}form.inline{display:inline}";

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
            update: Err("reading /run/tandem/update-status.json: not found".into()),
            cluster_upgrade: None,
            now_unix_ms: 0,
        };
        let html = render(&view, "tok");
        assert!(!html.contains("degraded"));
        assert!(html.contains("c&lt;1&gt;"));
        assert!(html.contains("server1 (this node)"));
        assert!(html.contains("<td class=\"vip\">MASTER</td>"));
        assert!(html.contains("running (restarted 2s ago)"));
        assert!(html.contains("crash-loop"));
        // One inline script (the upload); the refresh works without it.
        assert_eq!(html.matches("<script>").count(), 1);
        assert!(html.contains("<noscript><meta http-equiv=\"refresh\""));
        assert!(html.contains("no update status: reading /run/tandem/update-status.json"));
        assert!(html.contains("<input type=\"file\""));
        assert!(!html.contains("Cluster upgrade"));
        // The navigation, and the token the upload script sends.
        assert!(html.contains("<meta name=\"csrf-token\" content=\"tok\">"));
        assert!(
            html.contains("'X-CSRF-Token':document.querySelector('meta[name=csrf-token]').content")
        );
        assert!(html.contains("<nav id=\"nav\">") && html.contains("action=\"/logout\""));
        let down = render(
            &StatusView {
                services: Err("no socket".into()),
                ..view.clone()
            },
            "tok",
        );
        assert!(down.contains("supervisor unreachable: no socket"));
        let degraded = render(
            &StatusView {
                degraded: vec![api::storage::Degraded {
                    subject: "data-partition".into(),
                    reason: "data partition /dev/vda5: no <readable> filesystem".into(),
                    hint: "e2fsck -b 32768".into(),
                    stopped: vec!["mariadb".into(), "nginx".into()],
                    since_ms: 0,
                }],
                ..view
            },
            "tok",
        );
        assert!(degraded.contains("This node is degraded"), "{degraded}");
        assert!(degraded.contains("no &lt;readable&gt; filesystem"));
        assert!(degraded.contains("stopped: mariadb, nginx"));
        assert!(degraded.contains("what to do: e2fsck -b 32768"));
    }

    #[test]
    fn the_update_section_shows_slots_trial_install_and_the_cluster_upgrade() {
        use crate::upgrade::{NodeUpgrade, Outcome};
        use api::update::{InstallStatus, SlotState, SlotStatus};
        let status = UpdateStatus {
            version: "2.0.0".into(),
            booted_slot: "b".into(),
            boot: Boot::Trial {
                deadline_unix_ms: 3_600_000 + 90_000,
            },
            slots: vec![
                SlotStatus {
                    slot: "a".into(),
                    state: SlotState::Previous,
                    version: Some("1.0.0".into()),
                    entry: Some("tandem-a.conf".into()),
                },
                SlotStatus {
                    slot: "b".into(),
                    state: SlotState::Booted,
                    version: Some("2.0.0".into()),
                    entry: Some("tandem-b+2-1.conf".into()),
                },
            ],
            bad_versions: vec!["1.5.0".into(), "<1.6>".into()],
            install: Some(InstallStatus {
                phase: "writing".into(),
                done: 50 << 20,
                total: 200 << 20,
                started_unix_ms: 3_600_000 - 10_000,
                version: Some("2.1.0".into()),
                origin: "upload from 10.0.0.5:4000".into(),
                error: None,
            }),
        };
        let view = StatusView {
            cluster: "c".into(),
            node: "server1".into(),
            nodes: Vec::new(),
            vip: Vec::new(),
            services: Ok(Vec::new()),
            alerts: Vec::new(),
            facts: Vec::new(),
            degraded: Vec::new(),
            update: Ok(status),
            cluster_upgrade: Some(UpgradeState {
                version: "2.1.0".into(),
                outcome: Outcome::Failed,
                message: "stopped at server2: 2.1.0 failed its trial".into(),
                started_unix_ms: 0,
                finished_unix_ms: Some(1),
                nodes: vec![
                    NodeUpgrade {
                        node: "server2".into(),
                        step: Step::Failed,
                        reason: Some("rolled back to 2.0.0".into()),
                        since_unix_ms: 0,
                    },
                    NodeUpgrade {
                        node: "server1".into(),
                        step: Step::Waiting,
                        reason: None,
                        since_unix_ms: 0,
                    },
                ],
            }),
            now_unix_ms: 3_600_000,
        };
        let html = render(&view, "tok");
        assert!(html.contains("<td class=\"version\">2.0.0</td>"), "{html}");
        assert!(html.contains("<tr><th>booted slot</th><td>b</td></tr>"));
        assert!(
            html.contains("TRIAL: blessed once every service stays ready, else rolled back at 01:01:30 UTC (in 1m30s)"),
            "{html}"
        );
        assert!(html.contains(
            "<tr data-slot=\"a\"><td>a</td><td>previous</td><td>1.0.0</td><td>tandem-a.conf</td></tr>"
        ));
        assert!(html.contains("<td>booted</td><td>2.0.0</td><td>tandem-b+2-1.conf</td>"));
        assert!(html.contains("1.5.0, &lt;1.6&gt;"));
        assert!(
            html.contains("2.1.0 writing: 50.0 of 200.0 MiB (25%), 5.0 MiB/s — from upload from 10.0.0.5:4000"),
            "{html}"
        );
        assert!(html.contains("Cluster upgrade to 2.1.0: failed"));
        assert!(html.contains("stopped at server2: 2.1.0 failed its trial"));
        assert!(html.contains(
            "<td>server2</td><td>failed</td><td>00:00:00 UTC</td><td>rolled back to 2.0.0</td>"
        ));
        assert!(html.contains("<td>server1</td><td>waiting</td>"));
        // Rolling back and blessed read plainly.
        let mut rolling = view.clone();
        if let Ok(u) = &mut rolling.update {
            u.boot = Boot::RollingBack {
                reason: "nginx never ready".into(),
            };
        }
        assert!(render(&rolling, "tok").contains("ROLLING BACK: nginx never ready"));
        let mut blessed = view;
        if let Ok(u) = &mut blessed.update {
            u.boot = Boot::Blessed;
        }
        assert!(render(&blessed, "tok").contains("<td class=\"boot\">blessed</td>"));
    }

    #[test]
    fn durations() {
        assert_eq!(human_duration(59), "59s");
        assert_eq!(human_duration(61), "1m1s");
        assert_eq!(human_duration(7200), "2h0m");
        assert_eq!(human_duration(90000), "1d1h");
    }
}
