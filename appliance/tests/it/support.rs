//! What several integration tests share.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// How long a stopped `appliance run` may take to exit before it is killed.
pub(crate) const STOP_GRACE: Duration = Duration::from_secs(15);

/// SIGTERM, then wait up to [`STOP_GRACE`] for the exit, then SIGKILL: the teardown of a test's
/// supervisor, so a failing test leaves no processes behind.
pub(crate) fn stop(child: &mut Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A temporary root for a node's state: 0755, so that the services' users (mysql, www-data,
/// Tandem's own) reach their directories below it.
pub(crate) fn tmp_root() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    tmp
}

/// Logs in to the admin port at `base` (`https://addr:port`) with the admin password of the
/// `appliance run` whose state directory is `state` (kept in its `admin-password`), the way a
/// browser does: the login page's CSRF cookie and field, then the form. Returns the session
/// cookie (`tandem_session=…`) and the session's CSRF token.
pub(crate) fn admin_login(base: &str, state: &Path) -> (String, String) {
    let password = std::fs::read_to_string(state.join("admin-password")).unwrap();
    let jar = tempfile::NamedTempFile::new().unwrap();
    let curl = |args: &[&str]| {
        let out = Command::new("curl")
            .args(["-sk", "--max-time", "20", "-c"])
            .arg(jar.path())
            .arg("-b")
            .arg(jar.path())
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let page = curl(&[&format!("{base}/login")]);
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no csrf field on the login page:\n{page}"))
        .to_string();
    curl(&[
        "--data-urlencode",
        &format!("csrf={csrf}"),
        "--data-urlencode",
        &format!("password={}", password.trim()),
        &format!("{base}/login"),
    ]);
    let cookies = std::fs::read_to_string(jar.path()).unwrap();
    let session = cookies
        .lines()
        .find_map(|l| {
            l.split('\t')
                .collect::<Vec<_>>()
                .windows(2)
                .find(|w| w[0] == "tandem_session")
                .map(|w| w[1].to_string())
        })
        .unwrap_or_else(|| panic!("no session cookie after logging in:\n{cookies}"));
    let cookie = format!("tandem_session={session}");
    let json = Command::new("curl")
        .args([
            "-sk",
            "--max-time",
            "20",
            "-H",
            &format!("Cookie: {cookie}"),
        ])
        .arg(format!("{base}/api/session"))
        .output()
        .unwrap();
    let value: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    (cookie, value["csrf"].as_str().unwrap().to_string())
}

/// The metrics token of the `appliance run` whose state directory is `state`.
pub(crate) fn metrics_token(state: &Path) -> String {
    std::fs::read_to_string(state.join("metrics-token"))
        .unwrap()
        .trim()
        .to_string()
}
