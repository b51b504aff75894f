//! What to run: the service description, as loaded from JSON or built by the node roles.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use super::backoff::RestartPolicy;
use super::caps::Capability;

/// After SIGTERM (or `stop_signal`), the process group gets SIGKILL after this long.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Each of a service's `before_shutdown` commands is killed after this long.
pub const BEFORE_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
/// A service not ready this long after its start is killed and restarted per its policy.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest accepted service name; names appear in logs, the state DB and the control API.
pub const MAX_NAME_LEN: usize = 64;

/// One supervised service.
///
/// The environment is passed to the child on top of the supervisor's own and is never logged
/// (`Debug` shows only the variable names).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// `[A-Za-z0-9_.-]`, at most [`MAX_NAME_LEN`] bytes.
    pub name: String,
    /// Program and arguments; the program is looked up in `PATH` when it has no `/`.
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// Run as this user (with its primary and supplementary groups) when the supervisor is
    /// root; ignored otherwise.
    #[serde(default)]
    pub user: Option<String>,
    /// Services that must be ready before this one starts.
    #[serde(default)]
    pub deps: Vec<String>,
    #[serde(default)]
    pub kind: Kind,
    #[serde(default)]
    pub readiness: Readiness,
    #[serde(
        default = "default_ready_timeout",
        rename = "ready_timeout_ms",
        with = "millis"
    )]
    pub ready_timeout: Duration,
    #[serde(default)]
    pub restart: RestartPolicy,
    #[serde(
        default = "default_stop_timeout",
        rename = "stop_timeout_ms",
        with = "millis"
    )]
    pub stop_timeout: Duration,
    #[serde(default)]
    pub stop_signal: StopSignal,
    /// The only capabilities the service may ever hold. Every other one is dropped from its
    /// bounding set before `exec` (it runs with `no_new_privs` too, so nothing gives them
    /// back); when it switches to `user` these become ambient, so they survive the switch and
    /// the `exec`. Empty: none at all, even when it runs as root.
    #[serde(default)]
    pub capabilities: Vec<Capability>,
    /// A keepalived `track_file` for this service: the supervisor writes `0` into it when the
    /// service becomes ready and `1` as soon as it is not (stop signal sent, exited, restarting),
    /// so keepalived gives the floating IP away the moment the service cannot serve.
    #[serde(default)]
    pub track_file: Option<PathBuf>,
    /// Files removed before every start: pid files of a program that refuses to start while a
    /// pid in them exists (keepalived), which a killed process leaves behind.
    #[serde(default)]
    pub stale_files: Vec<PathBuf>,
    /// Commands run, in order and as the supervisor's user, just before the stop signal when
    /// the supervisor shuts down (not when the service restarts or is stopped alone), each
    /// given [`BEFORE_SHUTDOWN_TIMEOUT`]; a failure is logged and the stop goes on. keepalived's
    /// hand over the floating IP (`vip::handover_argvs`).
    #[serde(default)]
    pub before_shutdown: Vec<Vec<String>>,
}

impl ServiceSpec {
    /// A daemon with every default: ready at once, restarted always.
    pub fn daemon(
        name: impl Into<String>,
        argv: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        ServiceSpec {
            name: name.into(),
            argv: argv.into_iter().map(Into::into).collect(),
            env: BTreeMap::new(),
            cwd: None,
            user: None,
            deps: Vec::new(),
            kind: Kind::Daemon,
            readiness: Readiness::Immediate,
            ready_timeout: READY_TIMEOUT,
            restart: RestartPolicy::default(),
            stop_timeout: STOP_TIMEOUT,
            stop_signal: StopSignal::default(),
            capabilities: Vec::new(),
            track_file: None,
            stale_files: Vec::new(),
            before_shutdown: Vec::new(),
        }
    }

    /// A oneshot: ready when it exits 0.
    pub fn oneshot(
        name: impl Into<String>,
        argv: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        ServiceSpec {
            kind: Kind::Oneshot,
            readiness: Readiness::Exit,
            ..ServiceSpec::daemon(name, argv)
        }
    }

    /// Checks the fields of one service on their own (dependencies are checked by
    /// [`super::order`]). The error says what is wrong.
    pub fn check(&self) -> Result<(), String> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= MAX_NAME_LEN
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !name_ok {
            return Err(format!(
                "name must be 1 to {MAX_NAME_LEN} characters of A-Z, a-z, 0-9, `_`, `.`, `-`"
            ));
        }
        if self.argv.is_empty() || self.argv[0].is_empty() {
            return Err("argv must name a program".into());
        }
        if self.argv.iter().any(|a| a.contains('\0')) {
            return Err("argv must not contain NUL bytes".into());
        }
        for argv in &self.before_shutdown {
            if argv.first().is_none_or(String::is_empty) {
                return Err("every before_shutdown command must name a program".into());
            }
            if argv.iter().any(|a| a.contains('\0')) {
                return Err("before_shutdown commands must not contain NUL bytes".into());
            }
        }
        for (key, value) in &self.env {
            if key.is_empty() || key.contains('=') || key.contains('\0') || value.contains('\0') {
                // The value is deliberately not shown: it may be a secret.
                return Err(format!(
                    "env variable `{}` has an invalid name or value",
                    key.escape_debug()
                ));
            }
        }
        match (self.kind, &self.readiness) {
            (Kind::Daemon, Readiness::Exit) => {
                return Err("readiness `exit` is only for oneshot services".into());
            }
            (Kind::Oneshot, Readiness::Tcp { .. } | Readiness::UnixSocket { .. }) => {
                return Err(
                    "a oneshot service is ready when it exits 0; use readiness `exit`".into(),
                );
            }
            _ => {}
        }
        if self.restart.factor == 0 {
            return Err("restart.factor must be at least 1".into());
        }
        if self.deps.contains(&self.name) {
            return Err("a service cannot depend on itself".into());
        }
        Ok(())
    }
}

impl fmt::Debug for ServiceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceSpec")
            .field("name", &self.name)
            .field("argv", &self.argv)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("cwd", &self.cwd)
            .field("user", &self.user)
            .field("deps", &self.deps)
            .field("kind", &self.kind)
            .field("readiness", &self.readiness)
            .field("ready_timeout", &self.ready_timeout)
            .field("restart", &self.restart)
            .field("stop_timeout", &self.stop_timeout)
            .field("stop_signal", &self.stop_signal)
            .field("capabilities", &self.capabilities)
            .field("track_file", &self.track_file)
            .field("stale_files", &self.stale_files)
            .field("before_shutdown", &self.before_shutdown)
            .finish()
    }
}

fn default_ready_timeout() -> Duration {
    READY_TIMEOUT
}

fn default_stop_timeout() -> Duration {
    STOP_TIMEOUT
}

/// Long-running daemon or run-to-completion task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    #[default]
    Daemon,
    /// Ready when it exits 0; a failure is retried per the restart policy.
    Oneshot,
}

/// When a started service counts as ready (its dependents may start).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Readiness {
    /// As soon as it is started. For a oneshot, same as `Exit`.
    #[default]
    Immediate,
    /// When a TCP connection to `addr` succeeds.
    Tcp { addr: SocketAddr },
    /// When a connection to the Unix socket at `path` succeeds.
    UnixSocket { path: PathBuf },
    /// When it exits 0 (oneshots only).
    Exit,
}

/// The signal that asks a service to stop; `"SIGTERM"` in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopSignal(pub Signal);

impl Default for StopSignal {
    fn default() -> Self {
        StopSignal(Signal::SIGTERM)
    }
}

impl Serialize for StopSignal {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.as_str())
    }
}

impl<'de> Deserialize<'de> for StopSignal {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Signal::from_str(&name).map(StopSignal).map_err(|_| {
            serde::de::Error::custom(format!("`{name}` is not a signal name like \"SIGTERM\""))
        })
    }
}

/// `Duration` as integer milliseconds in JSON.
pub(crate) mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_and_defaults() {
        let json = r#"[
            {"name": "db", "argv": ["sleep", "100"], "readiness": {"type": "tcp", "addr": "127.0.0.1:3306"},
             "env": {"PASSWORD": "hunter2"}, "stop_signal": "SIGQUIT", "restart": {"max_quick_failures": 3},
             "user": "nobody", "capabilities": ["NET_BIND_SERVICE", "CAP_NET_RAW"]},
            {"name": "init", "argv": ["true"], "kind": "oneshot", "readiness": {"type": "exit"}}
        ]"#;
        let specs: Vec<ServiceSpec> = serde_json::from_str(json).unwrap();
        assert_eq!(specs[0].stop_signal, StopSignal(Signal::SIGQUIT));
        assert_eq!(specs[0].restart.max_quick_failures, 3);
        assert_eq!(
            specs[0].capabilities,
            [Capability::NET_BIND_SERVICE, Capability::NET_RAW]
        );
        assert!(specs[1].capabilities.is_empty(), "none unless listed");
        assert_eq!(
            specs[0].restart.initial_backoff,
            super::super::backoff::INITIAL_BACKOFF
        );
        assert_eq!(specs[0].stop_timeout, STOP_TIMEOUT);
        assert_eq!(specs[1], ServiceSpec::oneshot("init", ["true"]));
        for spec in &specs {
            spec.check().unwrap();
        }
        let again: Vec<ServiceSpec> =
            serde_json::from_str(&serde_json::to_string(&specs).unwrap()).unwrap();
        assert_eq!(again, specs);
        assert!(!format!("{:?}", specs[0]).contains("hunter2"));
    }

    #[test]
    fn rejects() {
        let err =
            serde_json::from_str::<ServiceSpec>(r#"{"name": "a", "argv": ["x"], "bogus": 1}"#);
        assert!(err
            .unwrap_err()
            .to_string()
            .contains("unknown field `bogus`"));
        let err = serde_json::from_str::<ServiceSpec>(
            r#"{"name": "a", "argv": ["x"], "stop_signal": "TERM"}"#,
        );
        assert!(err.unwrap_err().to_string().contains("not a signal name"));
        let check = |spec: ServiceSpec| spec.check().unwrap_err();
        assert!(check(ServiceSpec::daemon("a b", ["x"])).contains("name must be"));
        assert!(check(ServiceSpec::daemon("a", Vec::<String>::new())).contains("argv"));
        assert!(check(ServiceSpec {
            readiness: Readiness::Exit,
            ..ServiceSpec::daemon("a", ["x"])
        })
        .contains("oneshot"));
        let mut secret = ServiceSpec::daemon("a", ["x"]);
        secret.env.insert("K=V".into(), "hunter2".into());
        assert!(!check(secret).contains("hunter2"));
        let before = |commands: Vec<Vec<String>>| ServiceSpec {
            before_shutdown: commands,
            ..ServiceSpec::daemon("a", ["x"])
        };
        assert_eq!(
            check(before(vec![vec![]])),
            "every before_shutdown command must name a program"
        );
        assert_eq!(
            check(before(vec![vec![String::new(), "x".into()]])),
            "every before_shutdown command must name a program"
        );
        assert_eq!(
            check(before(vec![vec!["ip".into(), "a\0b".into()]])),
            "before_shutdown commands must not contain NUL bytes"
        );
        before(vec![vec!["ip".into(), "addr".into()]])
            .check()
            .unwrap();
    }
}
