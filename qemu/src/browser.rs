//! A real browser inside the cluster namespace: headless Chromium driven through chromedriver
//! (Debian's `chromium` and `chromium-driver`) with the W3C WebDriver protocol.
//!
//! chromedriver is started inside the namespace ([`Netns::spawn`]), so Chromium, its child,
//! reaches the VMs' addresses and nothing else; the WebDriver calls (JSON over HTTP on the
//! namespace's loopback) are made with ureq from a thread that joined the namespace
//! ([`Netns::run`]). Chromium trusts no self-signed certificate but those whose public keys the
//! caller pins ([`BrowserOptions::trusted_spki`], from [`crate::tls::spki_sha256`] of a
//! certificate the caller checked first).
//!
//! The protocol is a dozen JSON calls; WebDriver client crates (fantoccini) bring a second
//! `http`, `cookie`, `thiserror` and ICU stack into the lock file, which `deny.toml` refuses.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::netns::Netns;

/// The programs, and their Debian packages.
pub(crate) const CHROMEDRIVER: (&str, &str) = ("chromedriver", "chromium-driver");
pub(crate) const CHROMIUM: (&str, &str) = ("chromium", "chromium");
/// The key of an element reference in WebDriver answers (fixed by the W3C specification).
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";
/// One WebDriver call, a page load included (a node under TCG answers slowly).
const CALL_TIMEOUT: Duration = Duration::from_secs(180);
const PAGE_LOAD_MS: u64 = 150_000;
const DRIVER_START: Duration = Duration::from_secs(30);

/// How to start the browser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrowserOptions {
    /// `chromedriver.log` goes here, screenshots into its `screenshots/`.
    pub work_dir: PathBuf,
    /// Base64 SHA-256 hashes of the public keys whose certificates Chromium accepts without a
    /// CA ([`crate::tls::spki_sha256`]). Any other untrusted certificate is refused.
    pub trusted_spki: Vec<String>,
    pub window: (u32, u32),
}

impl BrowserOptions {
    pub fn new(work_dir: impl Into<PathBuf>) -> BrowserOptions {
        BrowserOptions {
            work_dir: work_dir.into(),
            trusted_spki: Vec::new(),
            window: (1280, 1024),
        }
    }
}

/// An element of the current page (a WebDriver reference: stale once the page changes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element(String);

/// A browser session; dropping it ends the session and chromedriver.
pub struct Browser {
    netns: Arc<Netns>,
    driver: Child,
    agent: ureq::Agent,
    base: String,
    session: String,
    screenshots: PathBuf,
    shots: AtomicUsize,
}

/// The Chromium flags of a session (pure, so the flag list is tested without a browser).
pub fn chromium_args(opts: &BrowserOptions) -> Vec<String> {
    let mut args: Vec<String> = [
        "--headless=new",
        // The harness runs as root; Chromium's sandbox refuses root.
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--password-store=basic",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(format!("--window-size={},{}", opts.window.0, opts.window.1));
    if !opts.trusted_spki.is_empty() {
        args.push(format!(
            "--ignore-certificate-errors-spki-list={}",
            opts.trusted_spki.join(",")
        ));
    }
    args
}

/// `NN-step.png`: the step's words, lower-case, joined by `-`.
pub fn screenshot_name(n: usize, step: &str) -> String {
    let slug: String = step
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let slug = slug
        .split('-')
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join("-");
    format!("{n:02}-{slug}.png")
}

/// The message of a WebDriver error answer (`{"value": {"error": …, "message": …}}`).
fn webdriver_error(v: &Value) -> Option<String> {
    let e = v.get("value")?;
    let kind = e.get("error")?.as_str()?;
    let message = e.get("message").and_then(Value::as_str).unwrap_or("");
    let first = message.lines().next().unwrap_or("");
    Some(format!("{kind}: {first}"))
}

fn err(what: impl Into<String>) -> Error {
    Error::Browser(what.into())
}

impl Browser {
    /// Start chromedriver inside `netns` and open a session of headless Chromium.
    pub fn start(netns: &Arc<Netns>, opts: BrowserOptions) -> Result<Browser> {
        let driver_bin = crate::tools::find(CHROMEDRIVER)?;
        let chromium = crate::tools::find(CHROMIUM)?;
        std::fs::create_dir_all(&opts.work_dir)
            .map_err(|e| Error::io("creating the browser's work dir", &opts.work_dir, e))?;
        let screenshots = opts.work_dir.join("screenshots");
        std::fs::create_dir_all(&screenshots)
            .map_err(|e| Error::io("creating the screenshot dir", &screenshots, e))?;
        // A port free on the namespace's loopback (only this harness uses it).
        let port = netns
            .run(|| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).and_then(|l| l.local_addr()))
            .and_then(|r| r)
            .map_err(|e| err(format!("finding a free port in the namespace: {e}")))?
            .port();
        let log = opts.work_dir.join("chromedriver.log");
        let mut cmd = Command::new(&driver_bin);
        cmd.arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let driver = netns.spawn(cmd)?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(CALL_TIMEOUT))
            .max_redirects(0)
            .proxy(None)
            .build()
            .new_agent();
        let mut browser = Browser {
            netns: netns.clone(),
            driver,
            agent,
            base: format!("http://{}", SocketAddr::from((Ipv4Addr::LOCALHOST, port))),
            session: String::new(),
            shots: AtomicUsize::new(count_pngs(&screenshots)),
            screenshots,
        };
        browser.wait_ready(&log)?;
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "acceptInsecureCerts": false,
            "timeouts": {"pageLoad": PAGE_LOAD_MS, "script": 30_000, "implicit": 0},
            "goog:chromeOptions": {
                "binary": chromium.display().to_string(),
                "args": chromium_args(&opts),
            },
        }}});
        let v = browser.call("POST", "/session", Some(caps))?;
        browser.session = v["sessionId"]
            .as_str()
            .ok_or_else(|| err(format!("no sessionId in {v}")))?
            .to_string();
        tracing::info!(port, "browser session started");
        Ok(browser)
    }

    fn wait_ready(&mut self, log: &Path) -> Result<()> {
        let t0 = Instant::now();
        loop {
            if let Ok(Some(status)) = self.driver.try_wait() {
                return Err(err(format!(
                    "chromedriver exited ({status}); see {}",
                    log.display()
                )));
            }
            match self.call("GET", "/status", None) {
                Ok(v) if v["ready"] == true => return Ok(()),
                Ok(_) | Err(_) if t0.elapsed() < DRIVER_START => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Ok(v) => return Err(err(format!("chromedriver not ready: {v}"))),
                Err(e) => return Err(err(format!("chromedriver never answered: {e}"))),
            }
        }
    }

    /// One WebDriver call; its `value`, or the WebDriver error as [`Error::Browser`].
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let agent = self.agent.clone();
        let answer = self
            .netns
            .run(move || -> std::result::Result<(u16, String), ureq::Error> {
                let mut resp = match (method, body) {
                    ("GET", _) => agent.get(&url).call()?,
                    ("DELETE", _) => agent.delete(&url).call()?,
                    (_, body) => agent
                        .post(&url)
                        .header("Content-Type", "application/json")
                        .send(body.unwrap_or_else(|| json!({})).to_string())?,
                };
                let status = resp.status().as_u16();
                let text = resp
                    .body_mut()
                    .with_config()
                    .limit(64 << 20)
                    .read_to_string()?;
                Ok((status, text))
            })
            .map_err(|e| err(format!("{method} {path}: {e}")))?;
        let (status, text) = answer.map_err(|e| err(format!("{method} {path}: {e}")))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| {
            err(format!(
                "{method} {path}: {status}: not JSON ({e}): {text:.200}"
            ))
        })?;
        if let Some(e) = webdriver_error(&v) {
            return Err(err(format!("{method} {path}: {e}")));
        }
        Ok(v.get("value").cloned().unwrap_or(Value::Null))
    }

    fn session_call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    /// Open `url` and wait until it loaded.
    pub fn goto(&self, url: &str) -> Result<()> {
        self.session_call("POST", "/url", Some(json!({ "url": url })))
            .map(drop)
    }

    /// The current page's address.
    pub fn url(&self) -> Result<String> {
        let v = self.session_call("GET", "/url", None)?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    pub fn title(&self) -> Result<String> {
        let v = self.session_call("GET", "/title", None)?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    /// The current page's HTML as the browser holds it now.
    pub fn source(&self) -> Result<String> {
        let v = self.session_call("GET", "/source", None)?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    /// The first element matching the CSS selector.
    pub fn find(&self, css: &str) -> Result<Element> {
        let v = self.session_call(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        )?;
        element(&v).ok_or_else(|| err(format!("{css}: no element reference in {v}")))
    }

    /// Every element matching the CSS selector (none is no error).
    pub fn find_all(&self, css: &str) -> Result<Vec<Element>> {
        let v = self.session_call(
            "POST",
            "/elements",
            Some(json!({"using": "css selector", "value": css})),
        )?;
        Ok(v.as_array()
            .map(|a| a.iter().filter_map(element).collect())
            .unwrap_or_default())
    }

    /// Wait until an element matches the CSS selector (a page still loading, a redirect).
    pub fn wait_for(&self, css: &str, timeout: Duration) -> Result<Element> {
        let t0 = Instant::now();
        loop {
            match self.find_all(css)?.into_iter().next() {
                Some(e) => return Ok(e),
                None if t0.elapsed() < timeout => std::thread::sleep(Duration::from_millis(250)),
                None => {
                    return Err(Error::Timeout {
                        what: format!("{css} on {}", self.url().unwrap_or_default()),
                        after: timeout,
                        last: None,
                    })
                }
            }
        }
    }

    /// An element's rendered text.
    pub fn text(&self, e: &Element) -> Result<String> {
        let v = self.session_call("GET", &format!("/element/{}/text", e.0), None)?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    /// The text of the first element matching `css`, if any.
    pub fn text_of(&self, css: &str) -> Result<Option<String>> {
        match self.find_all(css)?.first() {
            Some(e) => self.text(e).map(Some),
            None => Ok(None),
        }
    }

    /// An element's DOM property (`value`, `checked`, …) as JSON.
    pub fn property(&self, e: &Element, name: &str) -> Result<Value> {
        self.session_call("GET", &format!("/element/{}/property/{name}", e.0), None)
    }

    pub fn click(&self, e: &Element) -> Result<()> {
        self.session_call("POST", &format!("/element/{}/click", e.0), Some(json!({})))
            .map(drop)
    }

    /// Empty a text field.
    pub fn clear(&self, e: &Element) -> Result<()> {
        self.session_call("POST", &format!("/element/{}/clear", e.0), Some(json!({})))
            .map(drop)
    }

    /// Type `text` into an element as keystrokes (`\n` is Enter: a new line in a textarea).
    pub fn send_keys(&self, e: &Element, text: &str) -> Result<()> {
        self.session_call(
            "POST",
            &format!("/element/{}/value", e.0),
            Some(json!({ "text": text })),
        )
        .map(drop)
    }

    /// Empty the field matching `css`, then type `text` into it.
    pub fn fill(&self, css: &str, text: &str) -> Result<()> {
        let e = self.find(css)?;
        self.clear(&e)?;
        if !text.is_empty() {
            self.send_keys(&e, text)?;
        }
        Ok(())
    }

    /// Click the element matching `css` (a button, a radio, an `<option>`).
    pub fn click_on(&self, css: &str) -> Result<()> {
        let e = self.find(css)?;
        self.click(&e)
    }

    /// Click the element matching `css` and wait until the page it leads to has loaded: a new
    /// document, not the one clicked on. Without this, waiting for an element right after a
    /// form's submit can find it on the old page (the previous answer's errors), which then
    /// goes stale under the reader.
    pub fn click_and_load(&self, css: &str, timeout: Duration) -> Result<()> {
        let e = self.find(css)?;
        self.execute("window.__tandemLeft = true; return null;", vec![])?;
        self.click(&e)?;
        let t0 = Instant::now();
        loop {
            // While the next page loads a script may fail; that is "not yet".
            let loaded = self
                .execute(
                    "return window.__tandemLeft !== true && document.readyState === 'complete';",
                    vec![],
                )
                .map(|v| v.as_bool() == Some(true))
                .unwrap_or(false);
            if loaded {
                return Ok(());
            }
            if t0.elapsed() >= timeout {
                return Err(Error::Timeout {
                    what: format!(
                        "the page after clicking {css} (still {})",
                        self.url().unwrap_or_default()
                    ),
                    after: timeout,
                    last: None,
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Run JavaScript in the page (`arguments[i]` are `args`); its return value.
    pub fn execute(&self, script: &str, args: Vec<Value>) -> Result<Value> {
        self.session_call(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
    }

    /// Save a PNG of the viewport as `screenshots/NN-<step>.png` (numbered on from the PNGs
    /// already there, so several sessions of one scenario form one sequence); its path.
    pub fn screenshot(&self, step: &str) -> Result<PathBuf> {
        let v = self.session_call("GET", "/screenshot", None)?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .map_err(|e| err(format!("screenshot: not base64: {e}")))?;
        let n = self.shots.fetch_add(1, Ordering::Relaxed) + 1;
        let path = self.screenshots.join(screenshot_name(n, step));
        std::fs::write(&path, png).map_err(|e| Error::io("writing a screenshot", &path, e))?;
        Ok(path)
    }

    /// End the session (Chromium quits) and chromedriver.
    pub fn quit(self) {}
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.session_call("DELETE", "", None);
        }
        // chromedriver leads its own process group (Netns::spawn); Chromium is in it.
        if let Ok(pid) = i32::try_from(self.driver.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn element(v: &Value) -> Option<Element> {
    v.get(ELEMENT_KEY)
        .and_then(Value::as_str)
        .map(|s| Element(s.to_string()))
}

fn count_pngs(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "png"))
                .count()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_screenshots() {
        assert_eq!(screenshot_name(1, "setup form"), "01-setup-form.png");
        assert_eq!(
            screenshot_name(12, "Errors: on their fields!"),
            "12-errors-on-their-fields.png"
        );
    }

    #[test]
    fn pins_only_the_given_keys() {
        let mut opts = BrowserOptions::new("/w");
        let args = chromium_args(&opts);
        assert!(args.contains(&"--headless=new".to_string()));
        assert!(args.contains(&"--no-sandbox".to_string()));
        assert!(args.contains(&"--window-size=1280,1024".to_string()));
        assert!(!args.iter().any(|a| a.contains("ignore-certificate")));
        opts.trusted_spki = vec!["AAA=".into(), "BBB=".into()];
        assert!(chromium_args(&opts)
            .contains(&"--ignore-certificate-errors-spki-list=AAA=,BBB=".to_string()));
    }

    #[test]
    fn reads_webdriver_answers() {
        let e = json!({"value": {"error": "no such element", "message": "no such element: x\n(Session info)"}});
        assert_eq!(
            webdriver_error(&e).as_deref(),
            Some("no such element: no such element: x")
        );
        assert_eq!(webdriver_error(&json!({"value": null})), None);
        assert_eq!(
            element(&json!({ELEMENT_KEY: "f.1"})),
            Some(Element("f.1".into()))
        );
    }
}
