//! A small QMP client: JSON lines over QEMU's unix socket.
//!
//! The wire format is split from the socket: [`encode`] and [`decode`] are pure and unit-tested;
//! [`Qmp`] does the IO. One connection per command keeps it simple and survives VM restarts
//! (QEMU serves one QMP client at a time; a held connection would block the next one).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// One message from QEMU.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// The first line after connecting: `{"QMP": {...}}`.
    Greeting(Value),
    /// A command succeeded: `{"return": ...}`.
    Return(Value),
    /// A command failed: `{"error": {"class": ..., "desc": ...}}`.
    Error { class: String, desc: String },
    /// Asynchronous event, e.g. `SHUTDOWN`, `RESET`, `STOP`.
    Event { event: String, data: Value },
}

/// The line to send for `command` with optional `arguments` (newline included).
pub fn encode(command: &str, arguments: Option<&Value>) -> String {
    let msg = match arguments {
        Some(args) => json!({ "execute": command, "arguments": args }),
        None => json!({ "execute": command }),
    };
    format!("{msg}\n")
}

/// Parse one line from QEMU.
pub fn decode(line: &str) -> Result<Message, String> {
    let v: Value =
        serde_json::from_str(line.trim()).map_err(|e| format!("bad JSON {line:?}: {e}"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| format!("not a JSON object: {line:?}"))?;
    if let Some(g) = obj.get("QMP") {
        return Ok(Message::Greeting(g.clone()));
    }
    if let Some(r) = obj.get("return") {
        return Ok(Message::Return(r.clone()));
    }
    if let Some(e) = obj.get("error") {
        let field = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
        return Ok(Message::Error {
            class: field("class"),
            desc: field("desc"),
        });
    }
    if let Some(ev) = obj.get("event").and_then(Value::as_str) {
        let data = obj.get("data").cloned().unwrap_or(Value::Null);
        return Ok(Message::Event {
            event: ev.to_string(),
            data,
        });
    }
    Err(format!("unknown QMP message: {line:?}"))
}

/// Arguments of `send-key` for a chord such as `["ctrl", "alt", "delete"]` (QEMU qcodes).
pub fn send_key_args(qcodes: &[&str]) -> Value {
    let keys: Vec<Value> = qcodes
        .iter()
        .map(|k| json!({ "type": "qcode", "data": k }))
        .collect();
    json!({ "keys": keys })
}

/// A negotiated QMP connection.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connect (retrying while QEMU creates the socket, up to `timeout`), read the greeting and
    /// leave capabilities-negotiation mode.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Qmp, String> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(_) if start.elapsed() < timeout => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => return Err(format!("connect {}: {e}", socket.display())),
            }
        };
        // Answers are quick; the connect timeout may be zero ("only if already listening").
        stream
            .set_read_timeout(Some(timeout.max(Duration::from_secs(5))))
            .map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        match qmp.read()? {
            Message::Greeting(_) => {}
            other => return Err(format!("expected QMP greeting, got {other:?}")),
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// Run one command; events that arrive meanwhile are skipped.
    pub fn execute(&mut self, command: &str, arguments: Option<&Value>) -> Result<Value, String> {
        self.writer
            .write_all(encode(command, arguments).as_bytes())
            .map_err(|e| format!("send {command}: {e}"))?;
        loop {
            match self.read()? {
                Message::Return(v) => return Ok(v),
                Message::Error { class, desc } => {
                    return Err(format!("{command}: {class}: {desc}"))
                }
                Message::Event { .. } | Message::Greeting(_) => continue,
            }
        }
    }

    fn read(&mut self) -> Result<Message, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("QEMU closed the QMP socket".to_string()),
            Ok(_) => decode(&line),
            Err(e) => Err(format!("read: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_commands() {
        assert_eq!(
            encode("qmp_capabilities", None),
            "{\"execute\":\"qmp_capabilities\"}\n"
        );
        let args = send_key_args(&["ctrl", "alt", "delete"]);
        let line = encode("send-key", Some(&args));
        let back: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            back,
            json!({"execute": "send-key", "arguments": {"keys": [
                {"type": "qcode", "data": "ctrl"},
                {"type": "qcode", "data": "alt"},
                {"type": "qcode", "data": "delete"},
            ]}})
        );
        assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
    }

    #[test]
    fn decodes_messages() {
        let check = |line: &str, expected: Message| assert_eq!(decode(line).unwrap(), expected);
        check(
            r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": ["oob"]}}"#,
            Message::Greeting(
                json!({"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": ["oob"]}),
            ),
        );
        check(r#"{"return": {}}"#, Message::Return(json!({})));
        check(
            r#"{"return": {"status": "running", "singlestep": false, "running": true}}"#,
            Message::Return(json!({"status": "running", "singlestep": false, "running": true})),
        );
        check(
            r#"{"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
            Message::Error {
                class: "CommandNotFound".into(),
                desc: "The command nope has not been found".into(),
            },
        );
        check(
            r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}"#,
            Message::Event {
                event: "SHUTDOWN".into(),
                data: json!({"guest": true, "reason": "guest-shutdown"}),
            },
        );
        check(
            r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#,
            Message::Event {
                event: "STOP".into(),
                data: Value::Null,
            },
        );
        assert!(decode("not json").is_err());
        assert!(decode("[1]").is_err());
        assert!(decode(r#"{"what": 1}"#).is_err());
    }
}
