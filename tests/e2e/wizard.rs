//! The first-boot wizard on machines flashed with the generic image (`image-builder build
//! --generic`: the cluster, but no node identity, admin password, cluster secret or
//! certificate). Both VMs boot into the wizard on the setup address. One is set up over its
//! serial console, and its power is cut right after the last answer: it boots either still in
//! the wizard or fully configured, never half. The other is set up in a real browser (headless
//! Chromium in the cluster namespace, trusting the wizard's self-signed certificate only after
//! its fingerprint matched the one on the serial console), wrong answers first, each refused on
//! its field with nothing stored; then it serves the uploaded certificate. After setup the
//! admin port wants a login: the wizard URL shows the login page, wrong passwords are
//! rate-limited per address, a POST needs the CSRF token, pages need the session and
//! `/metrics` the bearer token. Screenshots of each browser step: `screenshots/` in the
//! cluster's work dir.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use cluster_config::settings::Field;
use qemu::{Browser, BrowserOptions, Cluster, Mark, Vm};
use serde_json::Value;

use crate::support::*;

/// The line init prints when the wizard starts (then ` ; certificate SHA-256 … ; setup code …`).
const WIZARD_LINE: &str = "first-boot setup: open ";
/// The serial wizard's banner, its refusals and its end.
const CONSOLE_BANNER: &str = "[setup] Tandem first-boot setup for cluster ";
const CONSOLE_ERROR: &str = "[setup] error on ";
const CONSOLE_APPLIED: &str = "[setup] applied: this machine is ";
/// From the last answer to the node serving again on its own address, under TCG.
const APPLY_TIMEOUT: Duration = Duration::from_secs(300);
/// A form submitted in the browser is answered within this (the settings service validates
/// and, for the right answers, stores in one transaction).
const SUBMIT_TIMEOUT: Duration = Duration::from_secs(120);
/// The login attempts of the rate-limit check, and the latest one that must be refused.
const WRONG_LOGINS: usize = 10;
const LIMITED_BY: usize = 6;
/// How long after the last answer the power is cut: `TANDEM_SETUP_CUT_MS` (default 0: at once,
/// while the settings service checks the answers). A later cut lands in or after the store's
/// transaction; every moment must end in the wizard or fully configured.
fn cut_delay() -> Duration {
    let ms = std::env::var("TANDEM_SETUP_CUT_MS")
        .map(|v| {
            v.trim()
                .parse::<u64>()
                .expect("TANDEM_SETUP_CUT_MS: milliseconds")
        })
        .unwrap_or(0);
    Duration::from_millis(ms)
}

/// A second client address on the LAN: the wrong passwords come from it, so the browser's
/// address (the bridge's) is not the one rate-limited.
const ATTACKER: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 2);

fn err(what: impl Into<String>) -> qemu::Error {
    qemu::Error::Http(what.into())
}

/// What init printed about this boot's wizard.
#[derive(Debug, Clone, PartialEq, Eq)]
struct WizardLine {
    url: String,
    fingerprint: String,
    setup_code: String,
}

impl WizardLine {
    /// `https://addr:port`, the wizard's admin port.
    fn base(&self) -> &str {
        self.url.strip_suffix("/setup").unwrap_or(&self.url)
    }

    fn addr(&self) -> qemu::Result<SocketAddr> {
        let host = self
            .base()
            .strip_prefix("https://")
            .ok_or_else(|| err(format!("wizard URL {}", self.url)))?;
        host.parse()
            .map_err(|e| err(format!("wizard URL {}: {e}", self.url)))
    }
}

fn parse_wizard_line(line: &str) -> Option<WizardLine> {
    let after = |key: &str| -> Option<String> {
        let rest = &line[line.find(key)? + key.len()..];
        let token: String = rest
            .trim_start()
            .chars()
            .take_while(|c| !c.is_whitespace() && !matches!(c, ';' | '"' | ','))
            .collect();
        (!token.is_empty()).then_some(token)
    };
    Some(WizardLine {
        url: after(WIZARD_LINE)?,
        fingerprint: after("certificate SHA-256 ")?,
        setup_code: after("setup code ")?,
    })
}

/// The wizard line `vm` printed after `since`.
fn wait_wizard_line(vm: &Vm, since: Mark, timeout: Duration) -> qemu::Result<WizardLine> {
    let line = vm.wait_serial_line(
        since,
        "the wizard's address, fingerprint and code",
        timeout,
        |l| l.contains(WIZARD_LINE) && parse_wizard_line(l).is_some(),
    )?;
    parse_wizard_line(&line).ok_or_else(|| err(line))
}

/// What the serial wizard asks for next, or that it refused an answer or finished.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Console {
    Prompt(Field),
    Error(String),
    Applied(String),
}

/// The first thing in `text` (the console after the last answered prompt) the driver acts on.
fn next_console_event(text: &str) -> Option<Console> {
    let clean = qemu::strip_ansi(text);
    let line_at = |i: usize| clean[i..].lines().next().unwrap_or("").trim().to_string();
    let mut found: Vec<(usize, Console)> = Vec::new();
    if let Some(i) = clean.find(CONSOLE_ERROR) {
        found.push((i, Console::Error(line_at(i))));
    }
    if let Some(i) = clean.find(CONSOLE_APPLIED) {
        found.push((i, Console::Applied(line_at(i))));
    }
    for field in Field::ALL {
        let prompt = format!("{}> ", field.key());
        // A key is a whole word: `tls> ` is not the end of some `x_tls> `.
        let start = clean.match_indices(&prompt).map(|(i, _)| i).find(|&i| {
            !clean[..i]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        });
        if let Some(i) = start {
            found.push((i, Console::Prompt(field)));
        }
    }
    found.into_iter().min_by_key(|(i, _)| *i).map(|(_, e)| e)
}

/// Answer the serial wizard's prompts printed after `since` from `answers`, until it says it
/// applied the setup or, with `stop_after`, right after that field's answer was typed. Returns
/// the mark past the last prompt answered. Secret answers are never shown.
fn drive_console(
    vm: &Vm,
    mut since: Mark,
    answers: &BTreeMap<Field, String>,
    stop_after: Option<Field>,
    timeout: Duration,
) -> qemu::Result<Mark> {
    let t0 = Instant::now();
    loop {
        match next_console_event(&vm.serial_since(since)) {
            Some(Console::Error(line)) => {
                return Err(err(format!("the console refused an answer: {line}")))
            }
            Some(Console::Applied(line)) => {
                eprintln!("    {line}");
                return Ok(since);
            }
            Some(Console::Prompt(field)) => {
                let answer = answers.get(&field).ok_or_else(|| {
                    err(format!(
                        "the console asks {}> , which this test has no answer for",
                        field.key()
                    ))
                })?;
                since = vm.answer_prompt(since, field.key(), answer, Duration::from_secs(5))?;
                let shown = if field.is_secret() {
                    "(secret)"
                } else {
                    answer.as_str()
                };
                eprintln!("    {}> {shown}", field.key());
                if stop_after == Some(field) {
                    return Ok(since);
                }
            }
            None if t0.elapsed() > timeout => {
                return Err(qemu::Error::Timeout {
                    what: format!("{}'s serial wizard to ask or finish", vm.name()),
                    after: timeout,
                    last: None,
                })
            }
            None => {
                if !vm.is_running() {
                    return Err(err(format!(
                        "{}: QEMU exited during the serial wizard",
                        vm.name()
                    )));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// `GET /api/setup/status` of a wizard (no login in setup mode).
fn setup_status(cluster: &Cluster, base: &str) -> qemu::Result<Value> {
    let url = format!("{base}/api/setup/status");
    let r = curl(cluster, &[], &url, None)?;
    if r.status != 200 {
        return Err(err(format!("GET {url}: {} {}", r.status, r.body)));
    }
    serde_json::from_str(&r.body).map_err(|e| err(format!("GET {url}: {e}: {}", r.body)))
}

/// The fields the wizard asks, as `/api/setup/status` lists them.
fn asked(status: &Value) -> qemu::Result<Vec<Field>> {
    status["asked"]
        .as_array()
        .ok_or_else(|| err(format!("no `asked` in {status}")))?
        .iter()
        .map(|k| {
            k.as_str()
                .and_then(Field::from_key)
                .ok_or_else(|| err(format!("unknown field {k} in {status}")))
        })
        .collect()
}

fn revision(status: &Value) -> Option<u64> {
    status["revision"].as_u64()
}

/// The wizard at `base` answers with nothing stored.
fn still_unconfigured(cluster: &Cluster, base: &str) -> qemu::Result<()> {
    let status = setup_status(cluster, base)?;
    if status["configured"] != false || revision(&status) != Some(0) {
        return Err(err(format!(
            "the wizard's status: {status}, expected revision 0"
        )));
    }
    Ok(())
}

/// The last field the console asks for when the certificate is self-signed (a certificate
/// and key are asked only for an upload).
fn last_console_field(asked: &[Field]) -> Option<Field> {
    asked
        .iter()
        .copied()
        .rfind(|f| !matches!(f, Field::SetupCode | Field::TlsCertificate | Field::TlsKey))
}

/// A setup code that is not `code` (each digit moved on by one).
fn wrong_code(code: &str) -> String {
    code.chars()
        .map(|c| match c.to_digit(10) {
            Some(d) => char::from_digit((d + 1) % 10, 10).unwrap_or('0'),
            None => c,
        })
        .collect()
}

/// What the browser types into the wizard's form.
struct Form<'a> {
    setup_code: &'a str,
    node: &'a str,
    password: &'a str,
    cluster_secret: &'a str,
    /// `None`: self-signed; else the certificate chain and key (PEM).
    upload: Option<(&'a str, &'a str)>,
    webhook: &'a str,
}

fn by_name(field: Field) -> String {
    format!("[name=\"{}\"]", field.key())
}

/// Pick `node` in the form's node list, as a user does; a name the list lacks is added to it
/// first (what a hand-made request could send: the server must refuse it).
fn choose_node(b: &Browser, node: &str) -> qemu::Result<()> {
    let option = format!("select[name=\"node\"] option[value=\"{node}\"]");
    if b.find_all(&option)?.is_empty() {
        let chosen = b.execute(
            "const s = document.querySelector('[name=\"node\"]');
             if (s.tagName === 'SELECT' && ![...s.options].some(o => o.value === arguments[0])) {
                 s.add(new Option(arguments[0], arguments[0]));
             }
             s.value = arguments[0];
             return s.value;",
            vec![Value::from(node)],
        )?;
        if chosen != node {
            return Err(err(format!(
                "could not set the node field to {node}: {chosen}"
            )));
        }
        return Ok(());
    }
    b.click_on(&option)
}

/// Fill the wizard's form (the setup code, then every asked field) and submit it.
fn submit_form(b: &Browser, asked: &[Field], form: &Form<'_>) -> qemu::Result<()> {
    b.wait_for("#setup-form", Duration::from_secs(30))?;
    b.fill(&by_name(Field::SetupCode), form.setup_code)?;
    for &field in asked {
        match field {
            Field::SetupCode | Field::CurrentPassword => {}
            Field::Node => choose_node(b, form.node)?,
            Field::AdminPassword | Field::AdminPasswordConfirm => {
                b.fill(&by_name(field), form.password)?
            }
            Field::ClusterSecret => b.fill(&by_name(field), form.cluster_secret)?,
            Field::Tls => {
                let mode = if form.upload.is_some() {
                    "upload"
                } else {
                    "self-signed"
                };
                b.click_on(&format!("input[name=\"tls\"][value=\"{mode}\"]"))?
            }
            Field::TlsCertificate => {
                if let Some((certificate, _)) = form.upload {
                    b.fill(&by_name(field), certificate)?
                }
            }
            Field::TlsKey => {
                if let Some((_, key)) = form.upload {
                    b.fill(&by_name(field), key)?
                }
            }
            Field::Webhook => b.fill(&by_name(field), form.webhook)?,
        }
    }
    b.click_and_load("#submit", SUBMIT_TIMEOUT)
}

/// The errors the page shows, by field key (`<p class="error" id="error-KEY">`).
fn field_errors(b: &Browser) -> qemu::Result<BTreeMap<String, String>> {
    let v = b.execute(
        "return [...document.querySelectorAll('.error[id^=\"error-\"]')]
             .map(e => [e.id.slice('error-'.length), e.textContent.trim()]);",
        vec![],
    )?;
    Ok(v.as_array()
        .map(|pairs| {
            pairs
                .iter()
                .filter_map(|p| Some((p[0].as_str()?.to_string(), p[1].as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default())
}

/// Wait for the answer to a submitted form with errors; they must name at least `expected`.
fn expect_errors(b: &Browser, expected: &[Field]) -> qemu::Result<BTreeMap<String, String>> {
    let first = format!("#error-{}", expected[0].key());
    b.wait_for(&first, SUBMIT_TIMEOUT)?;
    let errors = field_errors(b)?;
    for (k, m) in &errors {
        eprintln!("    error on {k}: {m}");
    }
    let missing: Vec<&str> = expected
        .iter()
        .map(|f| f.key())
        .filter(|k| errors.get(*k).is_none_or(String::is_empty))
        .collect();
    if !missing.is_empty() {
        return Err(err(format!(
            "no error shown on {missing:?}; errors: {errors:?}"
        )));
    }
    Ok(errors)
}

/// Wait for the wizard's done page; a form answered with errors fails at once, naming them.
fn wait_done(b: &Browser) -> qemu::Result<String> {
    let e = b.wait_for("#setup-done, .error[id^=\"error-\"]", SUBMIT_TIMEOUT)?;
    match b.find_all("#setup-done")?.first() {
        Some(done) => b.text(done),
        None => Err(err(format!(
            "the right answers were refused: {:?} (first: {})",
            field_errors(b)?,
            b.text(&e)?
        ))),
    }
}

fn value_of(b: &Browser, field: Field) -> qemu::Result<String> {
    let e = b.find(&by_name(field))?;
    Ok(b.property(&e, "value")?
        .as_str()
        .unwrap_or_default()
        .to_string())
}

fn shot(b: &Browser, step: &str) -> qemu::Result<()> {
    let path = b.screenshot(step)?;
    eprintln!("    screenshot {}", path.display());
    Ok(())
}

/// A certificate and key for the cluster's public name, and a key of another certificate.
struct Upload {
    certificate: String,
    key: String,
    der: Vec<u8>,
    other_key: String,
}

fn upload_for(domain: &str) -> Upload {
    let mine = rcgen::generate_simple_self_signed(vec![domain.to_string()]).unwrap();
    let other = rcgen::generate_simple_self_signed(vec![domain.to_string()]).unwrap();
    Upload {
        certificate: mine.cert.pem(),
        key: mine.key_pair.serialize_pem(),
        der: mine.cert.der().to_vec(),
        other_key: other.key_pair.serialize_pem(),
    }
}

/// A POST to the login form from `interface` (another client address), with a cookie jar of
/// its own: the form's answer.
fn login_from(
    cluster: &Cluster,
    base: &str,
    jar: &Path,
    interface: Ipv4Addr,
    password: &str,
) -> qemu::Result<Reply> {
    let jar = jar.display().to_string();
    let common: Vec<String> = [
        "--interface",
        &interface.to_string(),
        "-b",
        &jar,
        "-c",
        &jar,
    ]
    .map(String::from)
    .to_vec();
    let url = format!("{base}/login");
    let form = curl(cluster, &common, &url, None)?;
    let Some(csrf) = input_value(&form.body, "csrf") else {
        // Refused before the form (rate-limited): that is the answer.
        return Ok(form);
    };
    let mut args = common;
    args.extend([
        "--data-urlencode".into(),
        format!("csrf={csrf}"),
        "--data-urlencode".into(),
        "password@-".into(),
    ]);
    curl(cluster, &args, &url, Some(password.as_bytes()))
}

/// Which of the attempts' answers mean what: every attempt before the first 429 is a 401, every
/// one from it on a 429, and it comes by attempt `by` (1-based).
fn rate_limited(codes: &[u16], by: usize) -> Result<usize, String> {
    let first = codes
        .iter()
        .position(|&c| c == 429)
        .ok_or_else(|| format!("never rate-limited: {codes:?}"))?;
    if first >= by {
        return Err(format!(
            "rate-limited only at attempt {}: {codes:?}",
            first + 1
        ));
    }
    if codes[..first].iter().any(|&c| c != 401) || codes[first..].iter().any(|&c| c != 429) {
        return Err(format!("expected 401s then 429s: {codes:?}"));
    }
    Ok(first + 1)
}

#[test]
fn a_generic_image_is_set_up_over_serial_and_in_a_browser_then_wants_a_login() {
    let _heavy = crate::support::heavy_scenario();
    let config = cluster_config();
    let cluster = boot_generic_cluster();
    let admin_port = config.ports.admin;
    let ca_dir = ca_dir(&config).unwrap();
    // The file's one line, without its end (typed as an answer, a line end is Enter).
    let cluster_secret = image_builder::pki::load_or_create_secret(&ca_dir)
        .unwrap()
        .trim()
        .to_string();
    let ca_pem = std::fs::read_to_string(ca_dir.join("ca.crt")).unwrap();
    let serial_password = "Heron-73-quiet-field".to_string();
    let browser_password = "Kestrel-42-orbit-lane".to_string();
    let weak_password = "short1";
    for strong in [&serial_password, &browser_password] {
        cluster_config::settings::check_password_strength(&config, strong).unwrap();
    }
    assert!(cluster_config::settings::check_password_strength(&config, weak_password).is_err());
    let vm1 = cluster.vm("server1").unwrap();
    let vm2 = cluster.vm("server2").unwrap();

    // Both machines hold the setup address until they are set up: the one set up in the browser
    // stays off the LAN until the other has left it.
    step(
        &cluster,
        "server1-to-be is unplugged while server2 is set up",
        || vm1.cut_network(),
    );
    let (wizard1, wizard2) = step(
        &cluster,
        "both generic machines boot into the wizard",
        || {
            let w2 = wait_wizard_line(vm2, Mark::default(), BOOT_TIMEOUT)?;
            let w1 = wait_wizard_line(vm1, Mark::default(), BOOT_TIMEOUT)?;
            eprintln!(
                "    server2-to-be: {} (certificate {})",
                w2.url, w2.fingerprint
            );
            eprintln!(
                "    server1-to-be: {} (certificate {})",
                w1.url, w1.fingerprint
            );
            Ok((w1, w2))
        },
    );

    // --- The serial console, and a power cut right after the last answer.
    let asked2 = step(
        &cluster,
        "server2-to-be's wizard asks, nothing is stored yet",
        || {
            let status = qemu::wait_for(BOOT_TIMEOUT, "the wizard's status", || {
                setup_status(&cluster, wizard2.base())
            })?;
            still_unconfigured(&cluster, wizard2.base())?;
            eprintln!("    /api/setup/status: {status}");
            asked(&status)
        },
    );
    let answers: BTreeMap<Field, String> = [
        (Field::SetupCode, wizard2.setup_code.clone()),
        (Field::Node, "server2".to_string()),
        (Field::AdminPassword, serial_password.clone()),
        (Field::AdminPasswordConfirm, serial_password.clone()),
        (Field::ClusterSecret, cluster_secret.clone()),
        (Field::Tls, "self-signed".to_string()),
        (Field::Webhook, String::new()),
    ]
    .into_iter()
    .collect();
    let last = last_console_field(&asked2).expect("the generic image's wizard asks something");
    step(
        &cluster,
        &format!(
            "server2 over serial: every prompt answered, power cut right after `{}`",
            last.key()
        ),
        || {
            vm2.wait_serial_text(Mark::default(), CONSOLE_BANNER, BOOT_TIMEOUT)?;
            let after = drive_console(vm2, Mark::default(), &answers, Some(last), BOOT_TIMEOUT)?;
            // The answer's line end echoed (then `[setup] checking the answers`): the guest has
            // it and sends the setup now.
            let t0 = Instant::now();
            while vm2.serial_mark() <= after && t0.elapsed() < Duration::from_secs(2) {
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(cut_delay());
            vm2.kill()?;
            eprintln!(
                "    power cut {} ms after the answer; the console had printed {:?}",
                t0.elapsed().as_millis(),
                qemu::strip_ansi(&vm2.serial_since(after)).trim()
            );
            Ok(())
        },
    );
    let mark = step(&cluster, "server2 boots again after the power cut", || {
        let mark = vm2.serial_mark();
        vm2.start()?;
        Ok(mark)
    });
    let node_url = page_url(&config, "server2");
    let in_wizard = step(
        &cluster,
        "server2 is either still in the wizard or fully configured",
        || {
            qemu::wait_for(BOOT_TIMEOUT, "the wizard's line or server2's page", || {
                if vm2.serial_since(mark).contains(WIZARD_LINE) {
                    return Ok(true);
                }
                match cluster.http_get(&node_url, Duration::from_secs(5)) {
                    Ok(r) if r.status == 200 && r.body.contains("node: server2") => Ok(false),
                    Ok(r) => Err(err(format!("{node_url}: {}", r.status))),
                    Err(e) => Err(e),
                }
            })
        },
    );
    if in_wizard {
        eprintln!("==> after the power cut server2 was STILL IN THE WIZARD (nothing applied)");
        step(
            &cluster,
            "server2's wizard again: revision 0, set up over serial",
            || {
                let wizard = wait_wizard_line(vm2, mark, BOOT_TIMEOUT)?;
                qemu::wait_for(BOOT_TIMEOUT, "the wizard's status", || {
                    setup_status(&cluster, wizard.base())
                })?;
                still_unconfigured(&cluster, wizard.base())?;
                let mut answers = answers.clone();
                answers.insert(Field::SetupCode, wizard.setup_code.clone());
                drive_console(vm2, mark, &answers, None, BOOT_TIMEOUT).map(drop)
            },
        );
    } else {
        eprintln!(
            "==> after the power cut server2 was FULLY CONFIGURED (the setup had been stored)"
        );
    }
    step(
        &cluster,
        "server2 serves on 10.88.0.12; its wizard URL gives the login page",
        || {
            wait_page(&cluster, &config, "server2", None, APPLY_TIMEOUT)?;
            let base = format!("https://{}:{admin_port}", Ipv4Addr::new(10, 88, 0, 12));
            qemu::wait_for(
                APPLY_TIMEOUT,
                "server2's /setup to redirect to /login",
                || {
                    let r = curl(&cluster, &[], &format!("{base}/setup"), None)?;
                    if r.redirects_to("/login") {
                        Ok(())
                    } else {
                        Err(err(format!(
                            "/setup: {} {:?}",
                            r.status,
                            r.header("location")
                        )))
                    }
                },
            )?;
            let login = curl(&cluster, &[], &format!("{base}/login"), None)?;
            if login.status != 200 || !login.body.contains("id=\"login-form\"") {
                return Err(err(format!("/login: {} {}", login.status, login.body)));
            }
            Ok(())
        },
    );

    // --- The browser, on the other machine.
    step(
        &cluster,
        "server1-to-be is plugged in; the client forgets who held the setup address",
        || {
            vm1.restore_network()?;
            cluster.netns().ip_cmd(&["neigh", "flush", "all"])
        },
    );
    let netns = cluster.netns().clone();
    let wizard_addr = wizard1.addr().unwrap();
    let spki = step(
        &cluster,
        "the setup address serves the certificate whose fingerprint server1-to-be printed",
        || {
            let chain = qemu::wait_for(Duration::from_secs(60), "the wizard's TLS", || {
                qemu::tls::served_chain(&netns, wizard_addr, None, Duration::from_secs(5))
            })?;
            let served = qemu::tls::fingerprint(&chain[0]);
            if !qemu::tls::same_fingerprint(&served, &wizard1.fingerprint) {
                return Err(err(format!(
                    "{wizard_addr} serves {served}, but server1-to-be printed {} \
                     (does another machine still hold the setup address?)",
                    wizard1.fingerprint
                )));
            }
            qemu::tls::spki_sha256(&chain[0])
        },
    );
    let browser = step(&cluster, "headless Chromium opens the wizard", || {
        let mut opts = BrowserOptions::new(cluster.work_dir());
        opts.trusted_spki = vec![spki.clone()];
        let b = Browser::start(&netns, opts)?;
        // Like a user, reload when the first try shows an error page (on a loaded host a
        // navigation started while the bridge settles can fail); what it showed is kept.
        let mut shown = Vec::new();
        for attempt in 1..=4 {
            b.goto(&wizard1.url)?;
            match b.wait_for("#setup-form", Duration::from_secs(20)) {
                Ok(_) => {
                    if !shown.is_empty() {
                        eprintln!("    loaded on attempt {attempt}; before: {shown:?}");
                    }
                    shot(&b, "wizard form")?;
                    return Ok(b);
                }
                Err(_) => {
                    let text = b
                        .text_of("body")
                        .ok()
                        .flatten()
                        .unwrap_or_default()
                        .chars()
                        .take(200)
                        .collect::<String>();
                    shown.push(format!("{:?}: {text:?}", b.title().unwrap_or_default()));
                }
            }
        }
        Err(err(format!("the wizard form never showed: {shown:?}")))
    });
    let asked1 = step(
        &cluster,
        "the form has the setup code and every asked field",
        || {
            let asked = asked(&setup_status(&cluster, wizard1.base())?)?;
            for field in std::iter::once(Field::SetupCode).chain(asked.iter().copied()) {
                if browser.find_all(&by_name(field))?.is_empty() {
                    return Err(err(format!("the form has no field {}", field.key())));
                }
            }
            Ok(asked)
        },
    );
    let upload = upload_for(&config.domain);
    let code = wizard1.setup_code.clone();
    // A wrong code is refused on its field; the settings service then judges nothing else (a
    // caller without the code learns nothing about its answers), so the weak password and the
    // mismatched key are sent again with the right code.
    let weak = |setup_code: &str| -> qemu::Result<()> {
        submit_form(
            &browser,
            &asked1,
            &Form {
                setup_code,
                node: "server1",
                password: weak_password,
                cluster_secret: &cluster_secret,
                upload: Some((&upload.certificate, &upload.other_key)),
                webhook: "",
            },
        )
    };
    step(
        &cluster,
        "a wrong setup code (with a weak password and a key not the certificate's): refused on its field",
        || {
            weak(&wrong_code(&code))?;
            expect_errors(&browser, &[Field::SetupCode])?;
            shot(&browser, "wrong setup code")?;
            // Secrets are never sent back; the other answers are kept.
            for secret in [Field::SetupCode, Field::AdminPassword, Field::ClusterSecret, Field::TlsKey] {
                if !value_of(&browser, secret)?.is_empty() {
                    return Err(err(format!(
                        "the form came back with {} filled in",
                        secret.key()
                    )));
                }
            }
            if value_of(&browser, Field::Node)? != "server1" {
                return Err(err("the form forgot the node chosen"));
            }
            still_unconfigured(&cluster, wizard1.base())
        },
    );
    step(
        &cluster,
        "the right code, a weak password and a key not the certificate's: an error on each",
        || {
            weak(&code)?;
            let errors = expect_errors(&browser, &[Field::AdminPassword, Field::TlsKey])?;
            if errors.contains_key(Field::SetupCode.key()) {
                return Err(err(format!("the right setup code was refused: {errors:?}")));
            }
            shot(&browser, "weak password mismatched key")?;
            still_unconfigured(&cluster, wizard1.base())
        },
    );
    step(
        &cluster,
        "malformed PEM and an unknown node name: an error on each, nothing stored",
        || {
            let malformed = "-----BEGIN CERTIFICATE-----\nthis is not base64 at all\n-----END CERTIFICATE-----\n";
            submit_form(
                &browser,
                &asked1,
                &Form {
                    setup_code: &code,
                    node: "server9",
                    password: &browser_password,
                    cluster_secret: &cluster_secret,
                    upload: Some((malformed, &upload.key)),
                    webhook: "",
                },
            )?;
            expect_errors(&browser, &[Field::Node, Field::TlsCertificate])?;
            shot(&browser, "malformed pem unknown node")?;
            still_unconfigured(&cluster, wizard1.base())
        },
    );
    step(&cluster, "the right answers: the wizard is done", || {
        submit_form(
            &browser,
            &asked1,
            &Form {
                setup_code: &code,
                node: "server1",
                password: &browser_password,
                cluster_secret: &cluster_secret,
                upload: Some((&upload.certificate, &upload.key)),
                webhook: "",
            },
        )?;
        let done = wait_done(&browser)?;
        eprintln!("    {}", done.lines().next().unwrap_or_default());
        shot(&browser, "setup done")
    });
    drop(browser);
    let balancer = SocketAddr::from((Ipv4Addr::new(10, 88, 0, 11), config.ports.https));
    step(
        &cluster,
        "server1's balancer serves exactly the uploaded certificate; the floating IP answers",
        || {
            let uploaded = qemu::tls::fingerprint(&upload.der);
            qemu::wait_for(
                APPLY_TIMEOUT,
                "the uploaded certificate on 10.88.0.11",
                || {
                    let chain = qemu::tls::served_chain(
                        &netns,
                        balancer,
                        Some(&config.domain),
                        Duration::from_secs(5),
                    )?;
                    let served = qemu::tls::fingerprint(&chain[0]);
                    if served == uploaded {
                        Ok(())
                    } else {
                        Err(err(format!("serves {served}, uploaded {uploaded}")))
                    }
                },
            )?;
            eprintln!("    10.88.0.11:{} serves {uploaded}", config.ports.https);
            wait_page(&cluster, &config, "server1", None, APPLY_TIMEOUT)?;
            cluster.wait_http(
                &format!(
                    "https://{}:{}/node.html",
                    config.floating_ip, config.ports.https
                ),
                APPLY_TIMEOUT,
                |r| r.status == 200 && r.body.contains("node: "),
            )?;
            Ok(())
        },
    );

    // --- After setup: a logged-in console.
    let address1 = Ipv4Addr::new(10, 88, 0, 11);
    let base1 = format!("https://{address1}:{admin_port}");
    let browser = step(
        &cluster,
        "server1's admin port: its certificate from the cluster CA; the wizard URL shows the login page",
        || {
            let chain = qemu::wait_for(APPLY_TIMEOUT, "server1's admin port", || {
                qemu::tls::served_chain(
                    &netns,
                    SocketAddr::from((address1, admin_port)),
                    None,
                    Duration::from_secs(5),
                )
            })?;
            qemu::tls::verify_chain(&chain, &ca_pem, address1.into())?;
            let r = curl(&cluster, &[], &format!("{base1}/setup"), None)?;
            if !r.redirects_to("/login") {
                return Err(err(format!("/setup: {} {:?}", r.status, r.header("location"))));
            }
            let mut opts = BrowserOptions::new(cluster.work_dir());
            opts.trusted_spki = vec![qemu::tls::spki_sha256(&chain[0])?];
            let b = Browser::start(&netns, opts)?;
            b.goto(&format!("{base1}/setup"))?;
            b.wait_for("#login-form", Duration::from_secs(30))?;
            shot(&b, "wizard url after setup shows the login page")?;
            Ok(b)
        },
    );
    step(
        &cluster,
        &format!(
            "{WRONG_LOGINS} wrong passwords from {ATTACKER}: refused (429) by the {LIMITED_BY}th"
        ),
        || {
            cluster.netns().ip_cmd(&[
                "addr",
                "add",
                &format!("{ATTACKER}/24"),
                "dev",
                qemu::BRIDGE,
            ])?;
            let jar = cluster.work_dir().join("attacker.cookies");
            let mut codes = Vec::new();
            let mut retry_after = None;
            for i in 0..WRONG_LOGINS {
                let r = login_from(
                    &cluster,
                    &base1,
                    &jar,
                    ATTACKER,
                    &format!("Wrong-{i}-guess-pw"),
                )?;
                if r.status == 429 {
                    retry_after = retry_after.or(r.header("retry-after").map(str::to_string));
                }
                codes.push(r.status);
            }
            let at = rate_limited(&codes, LIMITED_BY).map_err(err)?;
            if retry_after.is_none() {
                return Err(err("429 without Retry-After"));
            }
            eprintln!(
                "    answers {codes:?}: limited from attempt {at}, Retry-After {retry_after:?}"
            );
            Ok(())
        },
    );
    let admin1 = Admin::new(&cluster, address1, admin_port, &browser_password);
    step(
        &cluster,
        "the browser's address still logs in; a POST without the CSRF token is refused (403)",
        || {
            admin1.login()?;
            let jar = admin1.jar().display().to_string();
            let r = curl(
                &cluster,
                &[
                    "-b".into(),
                    jar.clone(),
                    "-X".into(),
                    "POST".into(),
                    "--data".into(),
                    String::new(),
                ],
                &format!("{base1}/logout"),
                None,
            )?;
            if r.status != 403 {
                return Err(err(format!("POST /logout without the token: {}", r.status)));
            }
            let still = curl(
                &cluster,
                &["-b".into(), jar],
                &format!("{base1}/api/status"),
                None,
            )?;
            if still.status != 200 {
                return Err(err(format!(
                    "the session after the refused POST: {}",
                    still.status
                )));
            }
            Ok(())
        },
    );
    step(
        &cluster,
        "without a session: / redirects to /login, /api/status is 401; /metrics without the token is 401",
        || {
            let page = curl(&cluster, &[], &format!("{base1}/"), None)?;
            if page.status != 303 || !page.redirects_to("/login") {
                return Err(err(format!("/: {} {:?}", page.status, page.header("location"))));
            }
            let api = curl(&cluster, &[], &format!("{base1}/api/status"), None)?;
            if api.status != 401 {
                return Err(err(format!("/api/status: {}", api.status)));
            }
            let m = metrics(&cluster, address1, admin_port, None)?;
            if m.status != 401 || !m.header("www-authenticate").is_some_and(|h| h.starts_with("Bearer")) {
                return Err(err(format!("/metrics: {} {:?}", m.status, m.header("www-authenticate"))));
            }
            Ok(())
        },
    );
    step(&cluster, "log in in the browser: the status page", || {
        browser.fill("[name=\"password\"]", &browser_password)?;
        let buttons = browser.find_all("#login-form button, #login-form [type=\"submit\"]")?;
        match buttons.first() {
            Some(button) => browser.click(button)?,
            None => browser.send_keys(&browser.find("[name=\"password\"]")?, "\n")?,
        }
        browser.wait_for("[data-service]", Duration::from_secs(60))?;
        let page = browser.source()?;
        if !page.contains("server1") {
            return Err(err("the status page does not name server1"));
        }
        shot(&browser, "status page after login")
    });
    step(
        &cluster,
        "server1 reboots (Ctrl-Alt-Del) and comes back configured: no wizard, the uploaded certificate, the same password",
        || {
            let before = wait_page(&cluster, &config, "server1", None, APPLY_TIMEOUT)?;
            cluster.vm("server1")?.reboot_ctrl_alt_del()?;
            wait_page(&cluster, &config, "server1", Some(before + 1), APPLY_TIMEOUT)?;
            let uploaded = qemu::tls::fingerprint(&upload.der);
            qemu::wait_for(APPLY_TIMEOUT, "the uploaded certificate after the reboot", || {
                let chain = qemu::tls::served_chain(
                    &netns,
                    balancer,
                    Some(&config.domain),
                    Duration::from_secs(5),
                )?;
                match qemu::tls::fingerprint(&chain[0]) == uploaded {
                    true => Ok(()),
                    false => Err(err("another certificate is served")),
                }
            })?;
            let setup = curl(&cluster, &[], &format!("{base1}/setup"), None)?;
            if setup.status != 303 || !setup.redirects_to("/login") {
                return Err(err(format!("/setup after the reboot: {}", setup.status)));
            }
            admin1.login()?;
            Ok(())
        },
    );
}

#[test]
fn the_wizard_line_is_read() {
    let line =
        "[   12.3] INFO appliance::init: first-boot setup: open https://10.88.0.254:9443/setup ; \
                certificate SHA-256 AB:CD:EF ; setup code 1234-5678-9012";
    assert_eq!(
        parse_wizard_line(line),
        Some(WizardLine {
            url: "https://10.88.0.254:9443/setup".into(),
            fingerprint: "AB:CD:EF".into(),
            setup_code: "1234-5678-9012".into(),
        })
    );
    let w = parse_wizard_line(line).unwrap();
    assert_eq!(w.base(), "https://10.88.0.254:9443");
    assert_eq!(w.addr().unwrap(), "10.88.0.254:9443".parse().unwrap());
    assert_eq!(
        parse_wizard_line("first-boot setup: open https://x/setup"),
        None
    );
    assert_eq!(wrong_code("1234-5678-9019"), "2345-6789-0120");
}

#[test]
fn console_events_are_read_in_order() {
    use Console::*;
    let check = |text: &str, expected: Option<Console>| {
        assert_eq!(next_console_event(text), expected, "{text:?}")
    };
    check(
        "[setup] Tandem first-boot setup for cluster tandem\r\n[setup] This machine is node (the name)\r\nnode> ",
        Some(Prompt(Field::Node)),
    );
    check(
        "server2\r\n[setup] Admin password (…)\r\nadmin_password> ",
        Some(Prompt(Field::AdminPassword)),
    );
    check(
        "\r\nadmin_password_confirm> ",
        Some(Prompt(Field::AdminPasswordConfirm)),
    );
    check("\r\ntls_key> ", Some(Prompt(Field::TlsKey)));
    check("\u{1b}[0mtls> ", Some(Prompt(Field::Tls)));
    check(
        "x\r\n[setup] error on cluster_secret: expected 64 hex digits\r\ncluster_secret> ",
        Some(Error(
            "[setup] error on cluster_secret: expected 64 hex digits".into(),
        )),
    );
    check(
        "\r\n[setup] applied: this machine is server2\r\n",
        Some(Applied("[setup] applied: this machine is server2".into())),
    );
    check("[setup] Webhook (…)\r\n", None);
    check("my_node> ", None);
}

#[test]
fn rate_limits_are_read_from_the_answers() {
    let check = |codes: &[u16], expected: Result<usize, ()>| {
        assert_eq!(rate_limited(codes, 6).map_err(drop), expected, "{codes:?}")
    };
    check(&[401, 401, 401, 401, 401, 429, 429, 429, 429, 429], Ok(6));
    check(&[401, 401, 429, 429], Ok(3));
    check(&[401, 401, 401, 401, 401, 401, 429], Err(()));
    check(&[401; 10], Err(()));
    check(&[401, 429, 401, 429], Err(()));
    check(&[200, 429], Err(()));
}

#[test]
fn the_last_console_question_is_found() {
    use Field::*;
    assert_eq!(
        last_console_field(&[
            Node,
            AdminPassword,
            AdminPasswordConfirm,
            ClusterSecret,
            Tls,
            TlsCertificate,
            TlsKey,
            Webhook
        ]),
        Some(Webhook)
    );
    assert_eq!(
        last_console_field(&[Node, Tls, TlsCertificate, TlsKey]),
        Some(Tls)
    );
    assert_eq!(last_console_field(&[]), None);
}
