//! Child output: every line of stdout and stderr is emitted through `tracing` (target `svc`),
//! kept in a bounded per-service ring buffer for `status`/`logs`, and offered to an optional
//! sink (the future log monitor).

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;

use api::control::{LogLine, Stream};

/// Lines kept per service.
pub const LOG_LINES_KEPT: usize = 500;
/// Longer lines are split into pieces of this many bytes (bounds memory per reader).
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// The ring buffers of all services; shared by reader threads and the control server.
#[derive(Debug, Default)]
pub(crate) struct LogBuffers {
    by_service: Mutex<HashMap<String, VecDeque<LogLine>>>,
}

impl LogBuffers {
    pub(crate) fn push(&self, line: LogLine) {
        let mut map = self
            .by_service
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let ring = map.entry(line.service.clone()).or_default();
        if ring.len() == LOG_LINES_KEPT {
            ring.pop_front();
        }
        ring.push_back(line);
    }

    /// The last `lines` lines of `service`, oldest first.
    pub(crate) fn tail(&self, service: &str, lines: usize) -> Vec<LogLine> {
        let map = self
            .by_service
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.get(service)
            .map(|ring| {
                ring.iter()
                    .skip(ring.len().saturating_sub(lines))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Starts a thread that reads `pipe` until EOF (which comes when the last process holding the
/// write end exits, which may be a grandchild).
pub(crate) fn capture(
    pipe: impl Read + Send + 'static,
    service: String,
    stream: Stream,
    pid: i32,
    buffers: Arc<LogBuffers>,
    sink: Option<logmon::store::QueueSender<LogLine>>,
) -> std::io::Result<()> {
    thread::Builder::new().name(format!("log-{service}-{}", stream.as_str())).spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.by_ref().take(MAX_LINE_BYTES as u64).read_until(b'\n', &mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!(service, stream = stream.as_str(), "reading output: {e}");
                    break;
                }
            }
            while matches!(buf.last(), Some(b'\n' | b'\r')) {
                buf.pop();
            }
            let text = String::from_utf8_lossy(&buf).into_owned();
            tracing::info!(target: "svc", service = %service, stream = stream.as_str(), "{text}");
            let line = LogLine { ts_ms: super::now_ms(), service: service.clone(), stream, pid, line: text };
            if let Some(sink) = &sink {
                let _ = sink.send(line.clone());
            }
            buffers.push(line);
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_last_lines() {
        let buffers = LogBuffers::default();
        for i in 0..LOG_LINES_KEPT + 10 {
            let line = LogLine {
                ts_ms: 0,
                service: "a".into(),
                stream: Stream::Stdout,
                pid: 1,
                line: i.to_string(),
            };
            buffers.push(line);
        }
        let tail: Vec<String> = buffers.tail("a", 3).into_iter().map(|l| l.line).collect();
        assert_eq!(tail, ["507", "508", "509"]);
        assert_eq!(buffers.tail("a", 10_000).len(), LOG_LINES_KEPT);
        assert!(buffers.tail("b", 3).is_empty());
    }
}
