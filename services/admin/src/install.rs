//! Bundles that arrive over HTTP: an upload streamed, as it arrives, into the update service's
//! socket ([`api::update`]); an upload spooled for a cluster upgrade, verified as it streams;
//! and a bundle file sent to the local update socket (this node's turn in a cluster upgrade).

use std::cell::RefCell;
use std::io::{Read, Write as _};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use api::update::{Event, Request as UpdateRequest};
use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::StatusCode;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};

/// A client that sends nothing for this long is cut off (the update service then sees the
/// end of the stream and fails the install: nothing is activated).
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest bundle accepted.
pub(crate) const MAX_BUNDLE_BYTES: u64 = 2 << 30;
/// The update service's answer to a second install runs while one is: its message says so.
const BUSY_WORDS: &str = api::update::INSTALL_BUSY;

/// How to install, from the query string `force=0|1&reboot=0|1&trial_timeout=SECS`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct InstallQuery {
    pub(crate) force: bool,
    pub(crate) reboot: bool,
    pub(crate) trial_timeout_secs: Option<u64>,
}

/// Parses the query string (pure); an unknown key or a bad value is an error naming it.
pub(crate) fn parse_query(query: &str) -> Result<InstallQuery, String> {
    let mut q = InstallQuery::default();
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        let (key, value) = kv.split_once('=').unwrap_or((kv, ""));
        let flag = || match value {
            "0" => Ok(false),
            "1" => Ok(true),
            _ => Err(format!("{key}={value}: expected 0 or 1")),
        };
        match key {
            "force" => q.force = flag()?,
            "reboot" => q.reboot = flag()?,
            "trial_timeout" => {
                let secs = value
                    .parse::<u64>()
                    .ok()
                    .filter(|s| (1..=86_400).contains(s))
                    .ok_or_else(|| {
                        format!("trial_timeout={value}: expected seconds between 1 and 86400")
                    })?;
                q.trial_timeout_secs = Some(secs);
            }
            _ => {
                return Err(format!(
                    "unknown parameter {key:?} (expected force, reboot, trial_timeout)"
                ))
            }
        }
    }
    Ok(q)
}

/// How an upload ended: the HTTP status and the JSON answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) json: String,
}

impl Answer {
    pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Answer {
        let message: String = message.into();
        Answer {
            status,
            json: serde_json::json!({ "error": message }).to_string(),
        }
    }
}

/// The HTTP answer to the update service's last event (pure).
pub(crate) fn answer_for(event: &Event) -> Answer {
    match event {
        Event::Done { .. } => Answer {
            status: StatusCode::OK,
            json: serde_json::to_string(event).unwrap_or_default(),
        },
        Event::Failed { message } if message.contains(BUSY_WORDS) => {
            Answer::error(StatusCode::CONFLICT, message.clone())
        }
        Event::Failed { message } => {
            Answer::error(StatusCode::UNPROCESSABLE_ENTITY, message.clone())
        }
        Event::Progress { .. } => Answer::error(
            StatusCode::BAD_GATEWAY,
            "the update service ended without an answer",
        ),
    }
}

/// Limits on an upload; the server's are [`IDLE_TIMEOUT`] and [`MAX_BUNDLE_BYTES`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) idle: Duration,
    pub(crate) max_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            idle: IDLE_TIMEOUT,
            max_bytes: MAX_BUNDLE_BYTES,
        }
    }
}

/// The declared length, refused up front when it is over the limit.
pub(crate) fn declared_size(
    headers: &hyper::HeaderMap,
    limits: Limits,
) -> Result<Option<u64>, Answer> {
    let Some(value) = headers.get(hyper::header::CONTENT_LENGTH) else {
        return Ok(None);
    };
    let size = value
        .to_str()
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| Answer::error(StatusCode::BAD_REQUEST, "unreadable Content-Length"))?;
    if size > limits.max_bytes {
        return Err(too_large(limits));
    }
    Ok(Some(size))
}

fn too_large(limits: Limits) -> Answer {
    Answer::error(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("a bundle is at most {} bytes", limits.max_bytes),
    )
}

/// Why the client's body stopped.
pub(crate) enum BodyEnd {
    Idle,
    TooLarge,
    Broken(String),
}

/// The next piece of the client's body: `Ok(None)` at its end.
pub(crate) async fn next_chunk<B>(
    body: &mut B,
    limits: Limits,
    sent: &mut u64,
) -> Result<Option<Bytes>, BodyEnd>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    loop {
        let frame = match tokio::time::timeout(limits.idle, body.frame()).await {
            Err(_) => return Err(BodyEnd::Idle),
            Ok(None) => return Ok(None),
            Ok(Some(Err(e))) => return Err(BodyEnd::Broken(e.to_string())),
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            *sent += data.len() as u64;
            if *sent > limits.max_bytes {
                return Err(BodyEnd::TooLarge);
            }
            if !data.is_empty() {
                return Ok(Some(data));
            }
        }
    }
}

/// The answer to an upload cut short.
pub(crate) fn body_end_answer(end: BodyEnd, limits: Limits) -> Answer {
    match end {
        BodyEnd::Idle => Answer::error(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "nothing received for {}s: upload cut off",
                limits.idle.as_secs()
            ),
        ),
        BodyEnd::TooLarge => too_large(limits),
        BodyEnd::Broken(e) => {
            Answer::error(StatusCode::BAD_REQUEST, format!("reading the upload: {e}"))
        }
    }
}

/// Streams `body` into the update service at `socket` as an install of `request`, and turns
/// its last event into the HTTP answer. Nothing is buffered beyond one piece of the body.
pub(crate) async fn stream_install<B>(
    socket: &Path,
    request: &UpdateRequest,
    body: &mut B,
    limits: Limits,
) -> Answer
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut sent = 0u64;
    feed(socket, request, body, limits, &mut sent).await
}

/// Reads and drops the rest of `body`, giving up at the limits (the cap counts from here).
pub(crate) async fn drain<B>(body: &mut B, limits: Limits)
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut sent = 0u64;
    while let Ok(Some(_)) = next_chunk(body, limits, &mut sent).await {}
}

async fn feed<B>(
    socket: &Path,
    request: &UpdateRequest,
    body: &mut B,
    limits: Limits,
    sent: &mut u64,
) -> Answer
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let stream = match tokio::net::UnixStream::connect(socket).await {
        Ok(s) => s,
        Err(e) => {
            return Answer::error(
                StatusCode::SERVICE_UNAVAILABLE,
                api::update::unreachable(socket, &e),
            )
        }
    };
    let (read, mut write) = stream.into_split();
    // The events are read as they come: a refusal (a bad signature, a busy service) ends the
    // upload at once.
    let mut events = tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(read).lines();
        loop {
            match lines.next_line().await {
                Ok(Some(line)) => match serde_json::from_str::<Event>(&line) {
                    Ok(Event::Progress { .. }) => continue,
                    Ok(last) => return Ok(last),
                    Err(e) => return Err(format!("unreadable answer {line:?}: {e}")),
                },
                Ok(None) => return Err("the update service closed without an answer".into()),
                Err(e) => return Err(format!("reading the update service's answer: {e}")),
            }
        }
    });
    let finished = |result: Result<Result<Event, String>, tokio::task::JoinError>| match result {
        Ok(Ok(event)) => answer_for(&event),
        Ok(Err(e)) => Answer::error(StatusCode::BAD_GATEWAY, e),
        Err(e) => Answer::error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let mut line = serde_json::to_string(request).unwrap_or_default();
    line.push('\n');
    if let Err(e) = write.write_all(line.as_bytes()).await {
        tracing::debug!("writing the install request: {e}");
        return finished((&mut events).await);
    }
    loop {
        let chunk = tokio::select! {
            result = &mut events => return finished(result),
            chunk = next_chunk(body, limits, sent) => chunk,
        };
        let data = match chunk {
            Ok(Some(data)) => data,
            Ok(None) => break,
            Err(end) => {
                // Dropping the socket without a complete bundle: the service fails the install.
                events.abort();
                drop(write);
                return body_end_answer(end, limits);
            }
        };
        let wrote = tokio::select! {
            result = &mut events => return finished(result),
            wrote = write.write_all(&data) => wrote,
        };
        if let Err(e) = wrote {
            // The service stopped reading: its answer says why.
            tracing::debug!("writing the bundle to the update service: {e}");
            return finished((&mut events).await);
        }
    }
    if let Err(e) = write.shutdown().await {
        tracing::debug!("ending the bundle: {e}");
    }
    finished(events.await)
}

/// Sends the bundle file at `bundle` to the update service at `socket` (synchronously) and
/// returns its last event; `Err` when the service could not be reached or gave no answer.
pub(crate) fn install_file(
    socket: &Path,
    bundle: &Path,
    force: bool,
    reboot: bool,
    trial_timeout_secs: Option<u64>,
    origin: String,
) -> Result<Event, String> {
    let mut file =
        std::fs::File::open(bundle).map_err(|e| format!("opening {}: {e}", bundle.display()))?;
    let size = file.metadata().ok().map(|m| m.len());
    let request = UpdateRequest::Install {
        force,
        reboot,
        trial_timeout_secs,
        size,
        origin,
    };
    let mut stream = api::update::send(socket, &request)?;
    let sent = std::io::copy(&mut file, &mut stream)
        .and_then(|_| stream.shutdown(std::net::Shutdown::Write));
    if let Err(e) = sent {
        // A refusal closes the socket early: the answer still says why.
        tracing::debug!("sending the bundle: {e}");
    }
    api::update::read_answer(&stream, &mut |_| {})
}

/// `slot=a|b&reboot=0|1` of a boot-once request.
pub(crate) fn parse_boot_once(query: &str) -> Result<UpdateRequest, String> {
    let mut slot = None;
    let mut reboot = false;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("slot", v @ ("a" | "b"))) => slot = Some(v.to_string()),
            Some(("slot", v)) => return Err(format!("slot={v}: expected a or b")),
            Some(("reboot", "1")) => reboot = true,
            Some(("reboot", "0")) => reboot = false,
            _ => return Err(format!("unexpected query parameter {pair:?}")),
        }
    }
    let slot = slot.ok_or("slot=a|b is required")?;
    Ok(UpdateRequest::BootOnce { slot, reboot })
}

/// Sends one request without a body to the update service at `socket` and returns its last
/// event.
pub(crate) fn request_once(socket: &Path, request: &UpdateRequest) -> Result<Event, String> {
    let stream = api::update::send(socket, request)?;
    stream
        .shutdown(std::net::Shutdown::Write)
        .map_err(|e| format!("asking the update service: {e}"))?;
    api::update::read_answer(&stream, &mut |_| {})
}

/// Writes what a [`Spool`] reader passes through: held in memory until the bundle's signature
/// is verified, then into the temporary file (made only then).
struct SpoolFile {
    tmp: PathBuf,
    held: Vec<u8>,
    file: Option<std::fs::File>,
    verified: bool,
    /// The first failed write (a full disk): the reason the spool failed, whatever the bundle
    /// reader makes of the error it passes on.
    write_error: Option<(std::io::ErrorKind, String)>,
}

impl SpoolFile {
    fn take(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let result = self.write(bytes);
        if let Err(e) = &result {
            self.write_error
                .get_or_insert_with(|| (e.kind(), e.to_string()));
        }
        result
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if !self.verified {
            self.held.extend_from_slice(bytes);
            return Ok(());
        }
        if self.file.is_none() {
            use std::os::unix::fs::OpenOptionsExt as _;
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&self.tmp)?;
            self.file = Some(file);
        }
        let file = self.file.as_mut().ok_or(std::io::ErrorKind::Other)?;
        if !self.held.is_empty() {
            file.write_all(&self.held)?;
            self.held = Vec::new();
        }
        file.write_all(bytes)
    }
}

/// A reader of the upload that copies what it reads into the spool.
struct Tee<R> {
    inner: R,
    spool: Rc<RefCell<SpoolFile>>,
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.spool.borrow_mut().take(&buf[..n])?;
        Ok(n)
    }
}

/// The upload as a [`Read`]: pieces sent by the async side; the end of the channel is the end
/// of the upload.
pub(crate) struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl ChannelReader {
    pub(crate) fn new(rx: tokio::sync::mpsc::Receiver<Bytes>) -> ChannelReader {
        ChannelReader {
            rx,
            current: Bytes::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.current = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        let _ = self.current.split_to(n);
        Ok(n)
    }
}

/// Verifies the bundle read from `reader` (signature before anything else, then every chunk
/// of every payload) while writing it to `dest` (a temporary name beside it, then renamed);
/// nothing is written before the signature is verified, and nothing is left when the bundle
/// is refused. Returns the bundle's version.
pub(crate) fn spool_verified(
    reader: impl Read,
    dest: &Path,
    policy: &update::Policy<'_>,
) -> Result<String, update::Error> {
    let tmp = dest.with_extension("bundle.tmp");
    let spool = Rc::new(RefCell::new(SpoolFile {
        tmp: tmp.clone(),
        held: Vec::new(),
        file: None,
        verified: false,
        write_error: None,
    }));
    let result = verify_into(reader, &spool, policy);
    // A failed write is the cause, not the "corrupt data" the bundle reader saw in its wake.
    let result = match (result, spool.borrow_mut().write_error.take()) {
        (Err(_), Some((kind, message))) => Err(update::Error::from_io(
            &format!("writing the spool file {}", tmp.display()),
            std::io::Error::new(kind, message),
        )),
        (result, _) => result,
    };
    let result = result.and_then(|version| {
        let mut s = spool.borrow_mut();
        s.take(&[])
            .and_then(|()| match &s.file {
                Some(f) => f.sync_all(),
                None => Ok(()),
            })
            .map_err(|e| update::Error::from_io(&format!("writing {}", tmp.display()), e))?;
        s.file = None;
        std::fs::rename(&tmp, dest)
            .map_err(|e| update::Error::from_io(&format!("renaming to {}", dest.display()), e))?;
        Ok(version)
    });
    if result.is_err() {
        spool.borrow_mut().file = None;
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn verify_into(
    reader: impl Read,
    spool: &Rc<RefCell<SpoolFile>>,
    policy: &update::Policy<'_>,
) -> Result<String, update::Error> {
    let mut tee = Tee {
        inner: reader,
        spool: spool.clone(),
    };
    let version = {
        let mut source = update::Source::new(&mut tee);
        let mut bundle = update::Bundle::open(&mut source, policy)?;
        spool.borrow_mut().verified = true;
        while let Some(mut payload) = bundle.next_payload()? {
            let name = payload.info().name;
            std::io::copy(&mut payload, &mut std::io::sink())
                .map_err(|e| update::Error::from_io(&format!("payload {name}"), e))?;
        }
        bundle.finish()?.version
    };
    // The archive's end: zero blocks up to its record size, kept so the spool is the upload.
    let mut buf = [0u8; 8192];
    let mut tail = 0u64;
    loop {
        let n = tee
            .read(&mut buf)
            .map_err(|e| update::Error::from_io("reading the end of the bundle", e))?;
        if n == 0 {
            break;
        }
        tail += n as u64;
        if tail > MAX_TAIL_BYTES || buf[..n].iter().any(|b| *b != 0) {
            return Err(update::Error::from_io(
                "reading the end of the bundle",
                std::io::Error::other("data after the end of the archive"),
            ));
        }
    }
    Ok(version)
}

/// Zero padding accepted after a bundle's last member (tar pads to 10 KiB records).
const MAX_TAIL_BYTES: u64 = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_once_queries_name_a_slot() {
        assert_eq!(
            parse_boot_once("slot=a&reboot=1").unwrap(),
            UpdateRequest::BootOnce {
                slot: "a".into(),
                reboot: true
            }
        );
        assert!(parse_boot_once("reboot=1").unwrap_err().contains("slot"));
        assert!(parse_boot_once("slot=c").unwrap_err().contains("a or b"));
        assert!(parse_boot_once("slot=a&x=1").is_err());
    }

    #[test]
    fn query_values_are_checked() {
        let check = |q: &str, want: Result<InstallQuery, &str>| {
            assert_eq!(parse_query(q), want.map_err(str::to_string), "{q}");
        };
        check("", Ok(InstallQuery::default()));
        check(
            "force=1&reboot=0&trial_timeout=120",
            Ok(InstallQuery {
                force: true,
                reboot: false,
                trial_timeout_secs: Some(120),
            }),
        );
        check("force=yes", Err("force=yes: expected 0 or 1"));
        check(
            "trial_timeout=0",
            Err("trial_timeout=0: expected seconds between 1 and 86400"),
        );
        check(
            "reboot=1&forse=1",
            Err("unknown parameter \"forse\" (expected force, reboot, trial_timeout)"),
        );
    }

    #[test]
    fn the_last_event_decides_the_status() {
        let done = Event::Done {
            version: "2.0.0".into(),
            slot: "b".into(),
            entry: "tandem-b+3.conf".into(),
            bytes: 5,
            elapsed_ms: 1,
            rebooting: false,
        };
        assert_eq!(answer_for(&done).status, StatusCode::OK);
        let failed = |m: &str| answer_for(&Event::Failed { message: m.into() });
        assert_eq!(
            failed("bad signature").status,
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            failed(api::update::INSTALL_BUSY).status,
            StatusCode::CONFLICT
        );
        assert_eq!(failed("x").json, r#"{"error":"x"}"#);
    }
}
