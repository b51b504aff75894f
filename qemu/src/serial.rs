//! Serial consoles: their logs (reading, tailing and searching them; the text helpers are pure)
//! and their input (a unix socket QEMU serves, see [`SerialInput`]).

use std::fmt::Display;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A position in a serial log (a byte offset): "only what was printed after this".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Mark(pub u64);

/// The log's text from `since` on (lossy UTF-8; a missing file reads as empty).
pub(crate) fn read_since(path: &Path, since: Mark) -> String {
    let mut bytes = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        if f.seek(SeekFrom::Start(since.0)).is_ok() {
            let _ = f.read_to_end(&mut bytes);
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The log's bytes from `since` on (a missing file reads as empty).
pub(crate) fn read_bytes_since(path: &Path, since: Mark) -> Vec<u8> {
    let mut bytes = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        if f.seek(SeekFrom::Start(since.0)).is_ok() {
            let _ = f.read_to_end(&mut bytes);
        }
    }
    bytes
}

/// Where the first `needle` in `bytes` ends: a prompt has no newline, so it is searched as
/// bytes, not as a line.
pub(crate) fn find_end(bytes: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|i| i + needle.len())
}

/// The current end of the log.
pub(crate) fn mark(path: &Path) -> Mark {
    Mark(std::fs::metadata(path).map(|m| m.len()).unwrap_or(0))
}

/// Terminal escape sequences (firmware menus paint with them) and carriage returns removed.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                // CSI: ESC [ params final-byte (0x40..=0x7e); otherwise ESC + one char.
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if ('\u{40}'..='\u{7e}').contains(&c) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

/// The last `n` non-empty lines of `text`, cleaned of escape sequences.
pub fn tail(text: &str, n: usize) -> Vec<String> {
    let lines: Vec<String> = strip_ansi(text)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

/// The first line of `text` for which `matches` holds.
pub(crate) fn find_line(text: &str, matches: impl Fn(&str) -> bool) -> Option<String> {
    strip_ansi(text)
        .lines()
        .find(|l| matches(l))
        .map(str::to_string)
}

/// Format tails of several logs under one header each, for failure messages.
pub(crate) fn format_tails<'a>(
    logs: impl IntoIterator<Item = (&'a str, &'a Path)>,
    n: usize,
) -> String {
    let mut out = String::new();
    for (name, path) in logs {
        let text = read_since(path, Mark(0));
        let lines = tail(&text, n);
        out.push_str(&format!(
            "----- {name}: last {} lines of {} -----\n",
            lines.len(),
            path.display()
        ));
        for l in lines {
            out.push_str(&l);
            out.push('\n');
        }
    }
    out
}

/// Poll `probe` until it returns `Ok`, at most `timeout`; the last error goes in the timeout
/// message ("timed out after 120s waiting for server1 page (last: connection refused)").
pub fn wait_for<T, E: Display>(
    timeout: Duration,
    what: &str,
    mut probe: impl FnMut() -> Result<T, E>,
) -> crate::Result<T> {
    let start = Instant::now();
    let interval = Duration::from_millis(500);
    loop {
        let last = match probe() {
            Ok(v) => return Ok(v),
            Err(e) => e.to_string(),
        };
        if start.elapsed() >= timeout {
            return Err(crate::Error::Timeout {
                what: what.to_string(),
                after: timeout,
                last: Some(last),
            });
        }
        std::thread::sleep(interval.min(timeout.saturating_sub(start.elapsed())));
    }
}

/// A client of one VM's serial socket: what a test types goes in; what the guest prints comes
/// back and is drained and dropped (QEMU logs it to the serial log either way, and an unread
/// socket would stall the guest's console once its buffer is full). Kept open while QEMU runs:
/// a client that wrote and closed at once could hang up before QEMU read its input.
pub(crate) struct SerialInput {
    socket: PathBuf,
    conn: Option<(UnixStream, JoinHandle<()>)>,
}

impl SerialInput {
    pub(crate) fn new(socket: PathBuf) -> SerialInput {
        SerialInput { socket, conn: None }
    }

    /// Write all of `bytes`, connecting first if needed. A connection to a QEMU that has since
    /// been restarted fails on write; then one new connection is tried.
    pub(crate) fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.conn.is_some() {
            match self.stream()?.write_all(bytes) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::debug!(socket = %self.socket.display(), "serial write, reconnecting: {e}")
                }
            }
            self.disconnect();
        }
        self.stream()?.write_all(bytes)
    }

    fn stream(&mut self) -> io::Result<&mut UnixStream> {
        if self.conn.is_none() {
            let stream = UnixStream::connect(&self.socket)?;
            let mut reader = stream.try_clone()?;
            let drain = std::thread::Builder::new()
                .name("serial-drain".into())
                .spawn(move || {
                    let mut buf = [0u8; 4096];
                    while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
                })?;
            self.conn = Some((stream, drain));
        }
        match self.conn.as_mut() {
            Some((stream, _)) => Ok(stream),
            None => Err(io::Error::other("no serial connection")),
        }
    }

    /// Close the connection (QEMU was stopped or is about to be restarted).
    pub(crate) fn disconnect(&mut self) {
        if let Some((stream, drain)) = self.conn.take() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
            let _ = drain.join();
        }
    }
}

impl Drop for SerialInput {
    fn drop(&mut self) {
        self.disconnect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_escapes() {
        let check = |raw: &str, clean: &str| assert_eq!(strip_ansi(raw), clean);
        check("\u{1b}[01;01HBdsDxe: loading\r\n", "BdsDxe: loading\n");
        check("\u{1b}[33m\u{1b}[40mmap\u{1b}[37m", "map");
        check("\u{1b}[=3hplain", "plain");
        check("no escapes", "no escapes");
        check("trailing \u{1b}", "trailing ");
    }

    #[test]
    fn tails_and_finds() {
        let text = "one\r\n\n\u{1b}[1mtwo\nthree service=mariadb ready\nfour\n";
        assert_eq!(tail(text, 2), ["three service=mariadb ready", "four"]);
        assert_eq!(
            tail(text, 10),
            ["one", "two", "three service=mariadb ready", "four"]
        );
        assert_eq!(tail("", 3), Vec::<String>::new());
        assert_eq!(
            find_line(text, |l| l.contains("service=mariadb")
                && l.contains("ready"))
            .as_deref(),
            Some("three service=mariadb ready")
        );
        assert_eq!(find_line(text, |l| l.contains("nope")), None);
    }

    #[test]
    fn reads_from_marks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.log");
        assert_eq!(mark(&p), Mark(0));
        assert_eq!(read_since(&p, Mark(0)), "");
        std::fs::write(&p, "boot 1\n").unwrap();
        let m = mark(&p);
        std::fs::write(&p, "boot 1\nboot 2\n").unwrap();
        assert_eq!(read_since(&p, m), "boot 2\n");
        let tails = format_tails([("server1", p.as_path())], 1);
        assert!(
            tails.contains("----- server1: last 1 lines of") && tails.ends_with("boot 2\n"),
            "{tails}"
        );
    }

    #[test]
    fn finds_where_a_prompt_ends() {
        let check = |text: &str, needle: &str, expected: Option<usize>| {
            assert_eq!(
                find_end(text.as_bytes(), needle.as_bytes()),
                expected,
                "{text:?} {needle:?}"
            )
        };
        check(
            "[setup] Admin password\r\nadmin_password> ",
            "admin_password> ",
            Some(40),
        );
        check("node> server2\r\nnode> ", "node> ", Some(6));
        check("node>", "node> ", None);
        check("", "x", None);
        check("abc", "", Some(0));
    }

    /// Bytes written through the socket reach the peer (QEMU's side, here a listener), and the
    /// peer's output is drained; a peer that went away (QEMU restarted) is reconnected to.
    #[test]
    fn serial_input_writes_and_reconnects() {
        use std::os::unix::net::UnixListener;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let mut input = SerialInput::new(path.clone());
        assert!(input.write(b"x").is_err(), "nobody listens yet");
        for round in 0..2 {
            let _ = std::fs::remove_file(&path);
            let listener = UnixListener::bind(&path).unwrap();
            let peer = std::thread::spawn(move || {
                let (mut conn, _) = listener.accept().unwrap();
                // Much more than a socket buffer: the client's drain must keep up.
                conn.write_all(&vec![b'.'; 1 << 20]).unwrap();
                let mut got = [0u8; 6];
                conn.read_exact(&mut got).unwrap();
                got
            });
            // In the second round the first peer has hung up: the write fails and reconnects.
            let line = format!("line{round}\r");
            input.write(line.as_bytes()).unwrap();
            let got = peer.join().unwrap();
            assert_eq!(&got, line.as_bytes());
        }
        input.disconnect();
    }

    #[test]
    fn wait_for_reports_last_error() {
        let mut n = 0;
        let v = wait_for(Duration::from_secs(5), "third try", || {
            n += 1;
            if n == 3 {
                Ok(n)
            } else {
                Err("not yet")
            }
        });
        assert_eq!(v.unwrap(), 3);
        let e =
            wait_for::<(), _>(Duration::from_millis(10), "never", || Err("refused")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "timed out after 0s waiting for never (last: refused)"
        );
    }
}
