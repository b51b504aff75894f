//! Running host tools (mmdebstrap, mkfs.*, sfdisk, mtools, qemu-img) with enough context in
//! errors to act on: the build step, the command line, the exit status and its last output.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;

use crate::Error;

/// Lines of a failed command's output kept for the error message.
const TAIL_LINES: usize = 40;

pub struct Cmd {
    step: &'static str,
    program: OsString,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    stdin: Option<Vec<u8>>,
}

impl Cmd {
    pub fn new(step: &'static str, program: impl AsRef<OsStr>) -> Cmd {
        Cmd {
            step,
            program: program.as_ref().into(),
            args: Vec::new(),
            envs: Vec::new(),
            stdin: None,
        }
    }

    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Cmd {
        self.args.push(a.as_ref().into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Cmd {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().into()));
        self
    }

    pub fn env(mut self, k: impl AsRef<OsStr>, v: impl AsRef<OsStr>) -> Cmd {
        self.envs.push((k.as_ref().into(), v.as_ref().into()));
        self
    }

    pub fn stdin(mut self, input: impl Into<Vec<u8>>) -> Cmd {
        self.stdin = Some(input.into());
        self
    }

    /// The command line as a user would type it (for errors and debug logs).
    pub fn display(&self) -> String {
        let mut s = self.program.to_string_lossy().into_owned();
        for a in &self.args {
            let a = a.to_string_lossy();
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
                s.push_str(&format!(" '{}'", a.replace('\'', "'\\''")));
            } else {
                s.push(' ');
                s.push_str(&a);
            }
        }
        s
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.args(&self.args);
        for (k, v) in &self.envs {
            c.env(k, v);
        }
        c
    }

    /// Runs to completion, capturing output; returns stdout. Fails with the output's tail.
    pub fn output(self) -> Result<String, Error> {
        self.capture().map(|(out, _)| out)
    }

    /// Runs to completion, capturing output; returns stdout and stderr (for tools like debugfs
    /// that report failed commands on stderr but still exit 0).
    pub fn capture(self) -> Result<(String, String), Error> {
        tracing::debug!(step = self.step, cmd = %self.display(), "run");
        let mut c = self.command();
        c.stdin(if self.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = c.spawn().map_err(|e| self.spawn_error(e))?;
        if let Some(input) = &self.stdin {
            let mut w = child.stdin.take().ok_or_else(|| {
                self.spawn_error(std::io::Error::other("no pipe to its standard input"))
            })?;
            w.write_all(input).map_err(|e| self.spawn_error(e))?;
        }
        let out = child.wait_with_output().map_err(|e| self.spawn_error(e))?;
        if !out.status.success() {
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            let tail: Vec<&str> = text.lines().collect();
            let tail = tail[tail.len().saturating_sub(TAIL_LINES)..].join("\n");
            return Err(Error::Command {
                step: self.step,
                cmd: self.short_display(),
                status: out.status.to_string(),
                tail,
            });
        }
        Ok((
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    pub fn run_quiet(self) -> Result<(), Error> {
        self.output().map(drop)
    }

    /// Runs to completion, handing every output line (stdout and stderr, interleaved as they
    /// come) to `on_line`. Fails with the output's tail.
    pub fn run_streaming(self, mut on_line: impl FnMut(&str)) -> Result<(), Error> {
        tracing::debug!(step = self.step, cmd = %self.display(), "run");
        let mut c = self.command();
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().map_err(|e| self.spawn_error(e))?;
        let (tx, rx) = mpsc::channel::<String>();
        let readers: Vec<_> = [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        .map(|r| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(r).split(b'\n').map_while(Result::ok) {
                    let _ = tx.send(String::from_utf8_lossy(&line).trim_end().to_string());
                }
            })
        })
        .collect();
        drop(tx);
        let mut tail = VecDeque::with_capacity(TAIL_LINES);
        for line in rx {
            on_line(&line);
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
        for r in readers {
            let _ = r.join();
        }
        let status = child.wait().map_err(|e| self.spawn_error(e))?;
        if !status.success() {
            let tail = Vec::from(tail).join("\n");
            return Err(Error::Command {
                step: self.step,
                cmd: self.short_display(),
                status: status.to_string(),
                tail,
            });
        }
        Ok(())
    }

    /// `display()` cut short for error messages (mmdebstrap's line runs to kilobytes).
    fn short_display(&self) -> String {
        const MAX: usize = 300;
        let full = self.display();
        if full.len() <= MAX {
            return full;
        }
        let mut cut = MAX;
        while !full.is_char_boundary(cut) {
            cut -= 1;
        }
        format!(
            "{} … ({} more bytes; RUST_LOG=debug shows all)",
            &full[..cut],
            full.len() - cut
        )
    }

    fn spawn_error(&self, e: std::io::Error) -> Error {
        Error::Spawn {
            step: self.step,
            cmd: self.short_display(),
            source: e,
        }
    }
}

/// Where `program` is on PATH (plus the sbin directories, which a non-root PATH may lack).
pub fn find_program(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(Into::into))
        .map(|d: std::path::PathBuf| d.join(program))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
