//! What several integration tests share.

use std::process::Child;
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
