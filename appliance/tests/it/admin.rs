//! The admin port of a real node (`appliance run`, one node on its own loopback address): the
//! status page rendered by headless Chromium shows a service that was just killed, and the
//! aggregated metrics pass `promtool check metrics`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const APPLIANCE: &str = env!("CARGO_BIN_EXE_appliance");
const ADDR: &str = "127.0.0.61";

const CONFIG: &str = r#"
[cluster]
name = "admintest"
domain = "admin.test"
subnet = "127.0.0.0/8"
floating_ip = "127.0.0.60"

[[node]]
name = "solo"
address = "127.0.0.61"
db_role = "primary"

[ports]
http = 18080
https = 18443
web = 18081
app = 18000
db = 13306
admin = 19443

[firewall]
admin_cidrs = ["127.0.0.0/8"]
"#;

fn require(tool: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "this test needs `{tool}`: apt-get install -y {package} (scripts/setup-host does)"
    );
}

struct Run(std::process::Child, std::path::PathBuf);

impl Drop for Run {
    fn drop(&mut self) {
        crate::support::stop(&mut self.0);
    }
}

impl Run {
    fn log(&self) -> String {
        let text = std::fs::read_to_string(&self.1).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- supervisor log (last 40 lines) ---\n{}",
            lines[lines.len().saturating_sub(40)..].join("\n")
        )
    }
}

fn status(state: &Path) -> Vec<Value> {
    let out = Command::new(APPLIANCE)
        .args(["status", "--json", "--state-dir"])
        .arg(state)
        .output()
        .unwrap();
    serde_json::from_slice::<Value>(&out.stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

fn service(state: &Path, name: &str) -> Option<Value> {
    status(state).into_iter().find(|s| s["name"] == name)
}

fn chromium(args: &[&str], url: &str, profile: &Path) -> std::process::Output {
    Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--ignore-certificate-errors",
            "--window-size=1200,900",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .expect("run chromium")
}

#[test]
fn status_page_shows_a_killed_service_and_metrics_parse() {
    require("chromium", "chromium");
    require("promtool", "prometheus");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let config = tmp.path().join("cluster.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let state = tmp.path().join("solo");
    let log = tmp.path().join("run.log");
    let child = Command::new(APPLIANCE)
        .args(["run", "--config"])
        .arg(&config)
        .args(["--node", "solo", "--state-dir"])
        .arg(&state)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let run = Run(child, log);

    let deadline = Instant::now() + Duration::from_secs(120);
    while !["nginx", "admin"]
        .iter()
        .all(|s| service(&state, s).is_some_and(|v| v["ready"] == true))
    {
        assert!(
            Instant::now() < deadline,
            "nginx and admin not ready\n{:?}\n{}",
            status(&state),
            run.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let nginx_pid = service(&state, "nginx").unwrap()["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(nginx_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();

    let url = format!("https://{ADDR}:19443/");
    let profile = tmp.path().join("chromium");
    let dom = chromium(&["--dump-dom"], &url, &profile);
    let html = String::from_utf8_lossy(&dom.stdout);
    let row = html
        .lines()
        .find(|l| l.contains("data-service=\"nginx\""))
        .unwrap_or_else(|| {
            panic!(
                "no nginx row in the page:\n{html}\nchromium stderr:\n{}",
                String::from_utf8_lossy(&dom.stderr)
            )
        });
    assert!(
        row.contains("restart"),
        "the page does not show nginx as restarting/restarted: {row}\n{}",
        run.log()
    );
    assert!(
        row.contains("SIGKILL"),
        "the page does not show why nginx stopped: {row}"
    );

    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let png = shots.join("status-page.png");
    let _ = std::fs::remove_file(&png);
    let shot = chromium(
        &[&format!("--screenshot={}", png.display())],
        &url,
        &profile,
    );
    let bytes = std::fs::read(&png).unwrap_or_else(|e| {
        panic!(
            "no screenshot at {}: {e}\n{}",
            png.display(),
            String::from_utf8_lossy(&shot.stderr)
        )
    });
    assert!(
        bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000,
        "screenshot is not a real page: {} bytes",
        bytes.len()
    );
    eprintln!("status page screenshot: {}", png.display());

    // The aggregated metrics are valid Prometheus text and include the log monitor's.
    let metrics = Command::new("curl")
        .args(["-sfk", &format!("https://{ADDR}:19443/metrics")])
        .output()
        .unwrap();
    assert!(
        metrics.status.success(),
        "metrics endpoint failed\n{}",
        run.log()
    );
    let text = String::from_utf8_lossy(&metrics.stdout).into_owned();
    assert!(
        text.contains(
            "tandem_supervisor_service_restarts_total{node=\"solo\",service=\"nginx\"} 1"
        ),
        "{text}"
    );
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(promtool.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
    drop(promtool.stdin.take());
    let checked = promtool.wait_with_output().unwrap();
    let complaints = String::from_utf8_lossy(&checked.stdout).to_string()
        + &String::from_utf8_lossy(&checked.stderr);
    assert!(
        checked.status.success(),
        "promtool rejects the metrics: {complaints}\n{text}"
    );
}
