//! The log store: every service's output and the supervisor's events appended to
//! `<state>/logs/<name>.log`, rotated by size, with a per-file cap, a number of rotated files
//! kept per log, and a cap on the whole directory, so the data partition never fills from logs.
//!
//! The supervisor owns the store (writer threads fed by its log and event sinks); the log
//! monitor only reads the files ([`crate::tail`]).
//!
//! A line on disk: `2025-01-02T03:04:05.678Z stdout 1234 text…` (time in UTC, then the stream
//! or `event`, then the pid or `-`, then the text as the service wrote it).

use std::collections::hash_map::Entry as Slot;
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::SystemTime;

use nix::sys::signal::{SigSet, SigmaskHow};

use crate::time;

/// The log directory below the state directory.
pub const LOG_DIR: &str = "logs";
/// Suffix of a log file; rotated files add `.1`, `.2`, … (`.1` is the newest).
pub const LOG_SUFFIX: &str = ".log";
/// The log of supervisor events (service started, exited, …).
pub const SUPERVISOR_LOG: &str = "supervisor";
/// A log file is rotated before it would grow past this.
pub const FILE_BYTES: u64 = 4 << 20;
/// Rotated files kept per log: with the current file, at most 3 × 4 MiB per service.
pub const ROTATED_FILES: u32 = 2;
/// The whole log directory never holds more than this: the oldest rotated files go first.
pub const TOTAL_BYTES: u64 = 64 << 20;

/// Size caps of a [`LogStore`]. [`Limits::default`] holds the named constants above.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub file_bytes: u64,
    pub rotated_files: u32,
    pub total_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            file_bytes: FILE_BYTES,
            rotated_files: ROTATED_FILES,
            total_bytes: TOTAL_BYTES,
        }
    }
}

/// One line to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub ts_ms: i64,
    /// Which log: a service name or [`SUPERVISOR_LOG`].
    pub log: String,
    /// `stdout`, `stderr` or `event`.
    pub tag: String,
    pub pid: Option<i32>,
    pub text: String,
}

/// A line read back from a log file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredLine<'a> {
    pub ts_ms: i64,
    pub tag: &'a str,
    pub pid: Option<i32>,
    pub text: &'a str,
}

/// The on-disk form of `entry`, with its newline. Embedded newlines become spaces.
pub fn format_line(entry: &Entry) -> String {
    let pid = entry.pid.map_or_else(|| "-".to_string(), |p| p.to_string());
    let text = entry.text.replace(['\n', '\r'], " ");
    format!(
        "{} {} {pid} {text}\n",
        time::format_iso_ms(entry.ts_ms),
        entry.tag
    )
}

/// Parses a line written by [`format_line`] (without its newline).
pub fn parse_line(line: &str) -> Option<StoredLine<'_>> {
    let mut parts = line.splitn(4, ' ');
    let ts_ms = time::parse_iso_ms(parts.next()?)?;
    let tag = parts.next()?;
    let pid = match parts.next()? {
        "-" => None,
        p => Some(p.parse().ok()?),
    };
    Some(StoredLine {
        ts_ms,
        tag,
        pid,
        text: parts.next().unwrap_or(""),
    })
}

/// A log name safe as a file name: service names already are (`[A-Za-z0-9_.-]`); anything
/// else is replaced by `_`.
pub fn file_stem(log: &str) -> String {
    let stem: String = log
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    match stem.as_str() {
        "" | "." | ".." => "_".into(),
        _ => stem,
    }
}

/// `nginx.log` for generation 0, `nginx.log.2` for generation 2.
pub fn file_name(stem: &str, generation: u32) -> String {
    match generation {
        0 => format!("{stem}{LOG_SUFFIX}"),
        n => format!("{stem}{LOG_SUFFIX}.{n}"),
    }
}

/// Splits a file name of the store into its stem and generation.
pub fn parse_file_name(name: &str) -> Option<(&str, u32)> {
    if let Some(stem) = name.strip_suffix(LOG_SUFFIX) {
        return (!stem.is_empty()).then_some((stem, 0));
    }
    let (base, digits) = name.rsplit_once('.')?;
    let stem = base.strip_suffix(LOG_SUFFIX)?;
    let n: u32 = digits.parse().ok().filter(|&n| n > 0)?;
    // Only the canonical spelling (`.2`, not `.02` or `.+2`) is ours.
    (!stem.is_empty() && n.to_string() == digits).then_some((stem, n))
}

/// Whether appending `incoming` bytes to a file of `current` bytes must rotate it first. An
/// empty file takes any line (a line longer than the cap is cut by the store).
pub fn must_rotate(current: u64, incoming: u64, file_bytes: u64) -> bool {
    current > 0 && current.saturating_add(incoming) > file_bytes
}

/// The renames of one rotation, in order, after the oldest generation
/// (`rotated_files`) has been deleted: `.1 → .2`, …, then the current file → `.1`.
pub fn rotation_renames(stem: &str, rotated_files: u32) -> Vec<(String, String)> {
    (0..rotated_files)
        .rev()
        .map(|g| (file_name(stem, g), file_name(stem, g + 1)))
        .collect()
}

/// The most one log can occupy.
pub fn max_log_bytes(limits: &Limits) -> u64 {
    limits
        .file_bytes
        .saturating_mul(u64::from(limits.rotated_files) + 1)
}

struct Active {
    out: BufWriter<File>,
}

/// The files of the log directory, their sizes, and the open current files.
pub struct LogStore {
    dir: PathBuf,
    limits: Limits,
    /// Every file of the store (current and rotated) with its size.
    sizes: BTreeMap<String, u64>,
    total: u64,
    active: HashMap<String, Active>,
}

impl LogStore {
    /// Opens (creating) the directory, accounts for the files already there, and applies the
    /// total cap to them at once.
    pub fn open(dir: &Path, limits: Limits) -> io::Result<LogStore> {
        if limits.file_bytes == 0 || limits.file_bytes > limits.total_bytes {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "log limits: file cap {} must be above 0 and at most the total cap {}",
                    limits.file_bytes, limits.total_bytes
                ),
            ));
        }
        fs::create_dir_all(dir)?;
        let mut store = LogStore {
            dir: dir.to_path_buf(),
            limits,
            sizes: BTreeMap::new(),
            total: 0,
            active: HashMap::new(),
        };
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if parse_file_name(&name).is_none() || !entry.file_type()?.is_file() {
                continue;
            }
            let len = entry.metadata()?.len();
            store.sizes.insert(name, len);
            store.total += len;
        }
        store.enforce_total()?;
        Ok(store)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes in the store's files (written, possibly not yet flushed).
    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    /// Appends one line, rotating first when the current file would pass its cap, then
    /// deleting the oldest rotated files while the directory is over the total cap.
    pub fn append(&mut self, entry: &Entry) -> io::Result<()> {
        let stem = file_stem(&entry.log);
        let mut line = format_line(entry);
        let cap = usize::try_from(self.limits.file_bytes).unwrap_or(usize::MAX);
        if line.len() > cap {
            let mut cut = cap.saturating_sub(1);
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
            line.push('\n');
        }
        let len = line.len() as u64;
        let current = file_name(&stem, 0);
        let size = self.sizes.get(&current).copied().unwrap_or(0);
        if must_rotate(size, len, self.limits.file_bytes) {
            self.rotate(&stem)?;
        }
        let active = self.active(&stem)?;
        active.out.write_all(line.as_bytes())?;
        *self.sizes.entry(current).or_insert(0) += len;
        self.total += len;
        if self.total > self.limits.total_bytes {
            self.enforce_total()?;
        }
        Ok(())
    }

    /// Writes buffered lines to the files.
    pub fn flush(&mut self) -> io::Result<()> {
        for active in self.active.values_mut() {
            active.out.flush()?;
        }
        Ok(())
    }

    fn active(&mut self, stem: &str) -> io::Result<&mut Active> {
        match self.active.entry(stem.to_string()) {
            Slot::Occupied(open) => Ok(open.into_mut()),
            Slot::Vacant(slot) => {
                let name = file_name(stem, 0);
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o640)
                    .open(self.dir.join(&name))?;
                let len = file.metadata()?.len();
                let known = self.sizes.insert(name, len).unwrap_or(0);
                self.total = self.total - known + len;
                Ok(slot.insert(Active {
                    out: BufWriter::new(file),
                }))
            }
        }
    }

    fn rotate(&mut self, stem: &str) -> io::Result<()> {
        if let Some(mut active) = self.active.remove(stem) {
            active.out.flush()?;
        }
        self.remove(&file_name(stem, self.limits.rotated_files))?;
        for (from, to) in rotation_renames(stem, self.limits.rotated_files) {
            if let Some(size) = self.sizes.remove(&from) {
                fs::rename(self.dir.join(&from), self.dir.join(&to))?;
                self.sizes.insert(to, size);
            }
        }
        Ok(())
    }

    fn remove(&mut self, name: &str) -> io::Result<()> {
        if let Some(size) = self.sizes.remove(name) {
            self.total -= size;
            match fs::remove_file(self.dir.join(name)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// Deletes the oldest rotated files, then empties the largest current files, until the
    /// directory is within the total cap.
    fn enforce_total(&mut self) -> io::Result<()> {
        while self.total > self.limits.total_bytes {
            let oldest_rotated = self
                .sizes
                .keys()
                .filter(|n| parse_file_name(n).is_some_and(|(_, g)| g > 0))
                .map(|n| {
                    let mtime = fs::metadata(self.dir.join(n))
                        .and_then(|m| m.modified())
                        .unwrap_or(SystemTime::UNIX_EPOCH);
                    (mtime, n.clone())
                })
                .min();
            if let Some((_, name)) = oldest_rotated {
                self.remove(&name)?;
                continue;
            }
            let Some((name, size)) = self
                .sizes
                .iter()
                .max_by_key(|(_, &size)| size)
                .map(|(n, &s)| (n.clone(), s))
            else {
                break;
            };
            if size == 0 {
                break;
            }
            let active = parse_file_name(&name).and_then(|(stem, _)| self.active.get_mut(stem));
            if let Some(active) = active {
                active.out.flush()?;
                active.out.get_ref().set_len(0)?;
            } else {
                OpenOptions::new()
                    .write(true)
                    .open(self.dir.join(&name))?
                    .set_len(0)?;
            }
            self.sizes.insert(name, 0);
            self.total -= size;
        }
        Ok(())
    }
}

/// Items a writer's queue holds before [`QueueSender::send`] drops: a few seconds of a busy
/// node's output, so a slow disk never holds the services' pipes (or PID 1) back.
pub const QUEUE_CAPACITY: usize = 16_384;
/// The log of the store's own events (`log-store failed|ready`), which the monitor alerts on.
pub const STORE_SUBJECT: &str = "log-store";
/// After dropping, the store reports itself `ready` again once this long passed without a drop.
pub const DROP_QUIET_MS: i64 = 60_000;

/// The sending side of a writer's bounded queue. It never blocks: when the queue is full the
/// item is dropped and counted, and the writer reports the count in the store (an event the log
/// monitor alerts on). The bound is a count over a list channel, so memory follows what is
/// queued: a `sync_channel` of [`QUEUE_CAPACITY`] slots made every slot resident up front
/// (1.3 MiB per queue in the supervisor, for a queue that is nearly always empty).
pub struct QueueSender<T> {
    tx: mpsc::Sender<T>,
    queued: Arc<AtomicUsize>,
    capacity: usize,
    dropped: Arc<std::sync::atomic::AtomicU64>,
}

/// The writer's side of the queue.
pub struct QueueReceiver<T> {
    rx: mpsc::Receiver<T>,
    queued: Arc<AtomicUsize>,
}

impl<T> QueueReceiver<T> {
    pub fn recv_timeout(&self, timeout: std::time::Duration) -> Result<T, mpsc::RecvTimeoutError> {
        let item = self.rx.recv_timeout(timeout)?;
        self.queued.fetch_sub(1, Ordering::AcqRel);
        Ok(item)
    }

    pub fn try_recv(&self) -> Result<T, mpsc::TryRecvError> {
        let item = self.rx.try_recv()?;
        self.queued.fetch_sub(1, Ordering::AcqRel);
        Ok(item)
    }

    /// Everything queued now, without waiting.
    pub fn try_iter(&self) -> impl Iterator<Item = T> + '_ {
        std::iter::from_fn(|| self.try_recv().ok())
    }
}

impl<T> Clone for QueueSender<T> {
    fn clone(&self) -> Self {
        QueueSender {
            tx: self.tx.clone(),
            queued: self.queued.clone(),
            capacity: self.capacity,
            dropped: self.dropped.clone(),
        }
    }
}

impl<T> std::fmt::Debug for QueueSender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueSender")
            .field("dropped", &self.dropped())
            .finish()
    }
}

impl<T> QueueSender<T> {
    /// A queue of `capacity` items; the receiving side is for the writer.
    pub fn bounded(capacity: usize) -> (QueueSender<T>, QueueReceiver<T>) {
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(std::sync::atomic::AtomicU64::new(0));
        (
            QueueSender {
                tx,
                queued: queued.clone(),
                capacity,
                dropped,
            },
            QueueReceiver { rx, queued },
        )
    }

    /// Queues `item`; `false` if it was dropped (queue full, or the writer is gone).
    pub fn send(&self, item: T) -> bool {
        // A place is taken before the item goes in, so senders racing at the bound never
        // queue more than `capacity` between them.
        let taken = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.capacity).then_some(n + 1)
            })
            .is_ok();
        let sent = taken
            && match self.tx.send(item) {
                Ok(()) => true,
                Err(_) => {
                    self.queued.fetch_sub(1, Ordering::AcqRel);
                    false
                }
            };
        if !sent {
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        sent
    }

    /// Items dropped since the queue was made.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// What the writer says about drops, from the count it last reported: pure, the time passed in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DropReport {
    reported: u64,
    last_drop_ms: Option<i64>,
}

impl DropReport {
    /// The event text to store (`log-store failed …` or `log-store ready …`), if any.
    pub fn after_batch(&mut self, dropped: u64, now_ms: i64) -> Option<String> {
        if dropped > self.reported {
            let new = dropped - self.reported;
            self.reported = dropped;
            self.last_drop_ms = Some(now_ms);
            return Some(format!(
                "{STORE_SUBJECT} failed {new} lines dropped: the log store's queue was full ({dropped} since start)"
            ));
        }
        match self.last_drop_ms {
            Some(t) if now_ms - t >= DROP_QUIET_MS => {
                self.last_drop_ms = None;
                Some(format!(
                    "{STORE_SUBJECT} ready no lines dropped for {}s",
                    DROP_QUIET_MS / 1000
                ))
            }
            _ => None,
        }
    }
}

/// Starts a thread that appends every item sent on the returned queue to `store` (converted
/// by `to_entry`), flushing whenever the queue is drained. It ends when every sender is gone
/// (join the handle to know everything is written). Write errors are logged (once per distinct
/// error), never fatal. Items dropped on a full queue are reported in [`SUPERVISOR_LOG`] as
/// `log-store failed` events.
///
/// All signals are blocked in the new thread: the supervisor takes SIGCHLD and SIGTERM with
/// `sigwait` in a thread of its own, and this thread may start before it blocks them.
pub fn spawn_writer<T, F>(
    store: Arc<Mutex<LogStore>>,
    name: &str,
    to_entry: F,
) -> io::Result<(QueueSender<T>, thread::JoinHandle<()>)>
where
    T: Send + 'static,
    F: Fn(T) -> Entry + Send + 'static,
{
    let (tx, rx) = QueueSender::bounded(QUEUE_CAPACITY);
    let dropped = tx.dropped.clone();
    let builder = thread::Builder::new().name(name.to_string());
    let handle = spawn_with_signals_blocked(builder, move || {
        let mut last_error = String::new();
        let mut report = |result: io::Result<()>| {
            if let Err(e) = result {
                let text = e.to_string();
                if text != last_error {
                    tracing::warn!("log store: {text}");
                    last_error = text;
                }
            }
        };
        let mut drops = DropReport::default();
        let tick = std::time::Duration::from_millis(DROP_QUIET_MS as u64 / 4);
        loop {
            let first = match rx.recv_timeout(tick) {
                Ok(first) => Some(first),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let mut store = store.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(first) = first {
                report(store.append(&to_entry(first)));
                while let Ok(item) = rx.try_recv() {
                    report(store.append(&to_entry(item)));
                }
            }
            let now_ms = crate::time::now_ms();
            let count = dropped.load(std::sync::atomic::Ordering::Relaxed);
            if let Some(text) = drops.after_batch(count, now_ms) {
                tracing::warn!("{text}");
                report(store.append(&Entry {
                    ts_ms: now_ms,
                    log: SUPERVISOR_LOG.to_string(),
                    tag: "event".to_string(),
                    pid: None,
                    text,
                }));
            }
            report(store.flush());
        }
        let mut store = store.lock().unwrap_or_else(PoisonError::into_inner);
        report(store.flush());
    })?;
    Ok((tx, handle))
}

fn spawn_with_signals_blocked(
    builder: thread::Builder,
    f: impl FnOnce() + Send + 'static,
) -> io::Result<thread::JoinHandle<()>> {
    // A new thread inherits its creator's mask: block everything here, spawn, restore.
    let old = SigSet::all().thread_swap_mask(SigmaskHow::SIG_BLOCK)?;
    let spawned = builder.spawn(f);
    if let Err(e) = old.thread_set_mask() {
        tracing::error!("restoring this thread's signal mask after spawning a log writer: {e}");
    }
    spawned
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let (tx, rx) = QueueSender::bounded(3);
        let accepted = (0..10).filter(|&i| tx.send(i)).count();
        assert_eq!((accepted, tx.dropped()), (3, 7));
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), [0, 1, 2]);
        assert!(tx.send(10));
        // Room again as the writer takes items, never more than the bound at once.
        assert_eq!(rx.try_recv().ok(), Some(10));
        assert_eq!((0..5).filter(|&i| tx.send(i)).count(), 3);
        assert_eq!(tx.dropped(), 9);
        drop(rx);
        assert!(!tx.send(11), "no writer: dropped, not blocked");
        assert_eq!(tx.clone().dropped(), 10);
    }

    #[test]
    fn senders_racing_at_the_bound_never_queue_more_than_it() {
        let (tx, rx) = QueueSender::bounded(100);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let tx = tx.clone();
                std::thread::spawn(move || (0..1000).filter(|&i| tx.send(i)).count())
            })
            .collect();
        let accepted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(accepted, 100);
        assert_eq!(rx.try_iter().count(), 100);
        assert_eq!(tx.dropped(), 3900);
    }

    #[test]
    fn drops_are_reported_once_then_resolved_after_a_quiet_minute() {
        let mut r = DropReport::default();
        assert_eq!(r.after_batch(0, 0), None);
        let first = r.after_batch(5, 1_000).unwrap();
        assert!(
            first.starts_with("log-store failed 5 lines dropped"),
            "{first}"
        );
        assert_eq!(r.after_batch(5, 2_000), None, "reported once");
        let more = r.after_batch(8, 30_000).unwrap();
        assert!(
            more.starts_with("log-store failed 3 lines dropped"),
            "{more}"
        );
        assert!(more.contains("(8 since start)"), "{more}");
        assert_eq!(r.after_batch(8, 30_000 + DROP_QUIET_MS - 1), None);
        let ready = r.after_batch(8, 30_000 + DROP_QUIET_MS).unwrap();
        assert!(ready.starts_with("log-store ready"), "{ready}");
        assert_eq!(r.after_batch(8, 10 * DROP_QUIET_MS), None, "resolved once");
    }

    #[test]
    fn rotation_arithmetic() {
        // (current size, incoming, cap) -> rotate?
        for (current, incoming, cap, expected) in [
            (0, 10, 100, false),
            (0, 1000, 100, false),
            (90, 10, 100, false),
            (91, 10, 100, true),
            (100, 1, 100, true),
            (u64::MAX, 1, 100, true),
        ] {
            assert_eq!(
                must_rotate(current, incoming, cap),
                expected,
                "{current}+{incoming} vs {cap}"
            );
        }
        let renames = rotation_renames("nginx", 3);
        let renames: Vec<String> = renames.iter().map(|(a, b)| format!("{a}>{b}")).collect();
        assert_eq!(
            renames,
            [
                "nginx.log.2>nginx.log.3",
                "nginx.log.1>nginx.log.2",
                "nginx.log>nginx.log.1"
            ]
        );
        assert!(rotation_renames("x", 0).is_empty());
        assert_eq!(max_log_bytes(&Limits::default()), 12 << 20);
        for (name, parsed) in [
            ("nginx.log", Some(("nginx", 0))),
            ("nginx.log.2", Some(("nginx", 2))),
            ("a.b.log.10", Some(("a.b", 10))),
            ("nginx.log.0", None),
            (".log", None),
            ("nginx.txt", None),
            ("nginx.log.x", None),
        ] {
            assert_eq!(parse_file_name(name), parsed, "{name}");
        }
        assert_eq!(file_stem("../etc"), ".._etc");
        assert_eq!(file_stem(".."), "_");
    }

    #[test]
    fn lines_round_trip() {
        let entry = Entry {
            ts_ms: 1_735_787_045_678,
            log: "nginx".into(),
            tag: "stdout".into(),
            pid: Some(42),
            text: "a b\nc".into(),
        };
        let line = format_line(&entry);
        assert_eq!(line, "2025-01-02T03:04:05.678Z stdout 42 a b c\n");
        let parsed = parse_line(line.trim_end()).unwrap();
        assert_eq!(
            (parsed.ts_ms, parsed.tag, parsed.pid, parsed.text),
            (entry.ts_ms, "stdout", Some(42), "a b c")
        );
        let event = parse_line("2025-01-02T03:04:05.678Z event - nginx exited").unwrap();
        assert_eq!((event.pid, event.text), (None, "nginx exited"));
        assert!(parse_line("garbage").is_none());
    }

    #[test]
    fn rotates_and_keeps_generations() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            file_bytes: 100,
            rotated_files: 2,
            total_bytes: 1000,
        };
        let mut store = LogStore::open(dir.path(), limits).unwrap();
        for i in 0..20 {
            // 38 bytes per line: two lines per file.
            let entry = Entry {
                ts_ms: 0,
                log: "web".into(),
                tag: "stdout".into(),
                pid: None,
                text: format!("line {i:02}"),
            };
            store.append(&entry).unwrap();
        }
        store.flush().unwrap();
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into())
            .collect();
        names.sort();
        assert_eq!(names, ["web.log", "web.log.1", "web.log.2"]);
        let read = |n: &str| fs::read_to_string(dir.path().join(n)).unwrap();
        assert!(read("web.log").contains("line 19") && read("web.log").contains("line 18"));
        assert!(read("web.log.1").contains("line 17"));
        assert!(read("web.log.2").contains("line 14"));
        for n in ["web.log", "web.log.1", "web.log.2"] {
            assert!(read(n).len() <= 100);
        }
    }
}
