//! `appliance setup-console`: the first-boot wizard on the serial console (root, started by
//! PID 1 while the node's settings are incomplete, next to the web wizard).
//!
//! It asks the settings service what is still needed, asks the user field by field
//! ([`dialog`], pure) and sends the answers with the setup code from its file: being at the
//! console is the proof the web wizard asks for. The terminal is put in raw mode for the whole
//! run ([`line`] edits the lines): nothing typed for a secret is echoed, Ctrl-C and Ctrl-D start
//! over instead of killing the wizard, and the terminal's settings are restored on every way
//! out (return, error, SIGTERM/SIGINT/SIGHUP).

mod dialog;
mod line;

use std::collections::VecDeque;
use std::fs::File;
use std::io::{IsTerminal as _, Read as _, Write as _};
use std::os::fd::{AsFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use api::settings::{Answers, Request, Response, Secret, Status};
use nix::sys::termios::{self, LocalFlags, SetArg, SpecialCharacterIndices, Termios};

use crate::layout::Layout;
use dialog::{Dialog, Next};
use line::{Event, LineEditor};

/// How long the wizard waits for the settings service to come up before it gives up (its
/// supervisor starts it again).
const STATUS_WAIT: Duration = Duration::from_secs(60);
/// Between two tries of a service that is not up yet.
const STATUS_RETRY: Duration = Duration::from_secs(1);
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// A setup hashes the password (argon2: seconds under emulation) and writes the store.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);

/// `appliance setup-console`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The settings service's socket.
    #[arg(long, default_value_os_t = Layout::image().run.join(api::settings::SOCKET_FILE))]
    pub settings_socket: PathBuf,
    /// The one-time setup code the settings service requires (made by init).
    #[arg(long, default_value_os_t = Layout::image().run.join(api::settings::SETUP_CODE_FILE))]
    pub setup_code_file: PathBuf,
    /// Talk on this terminal (e.g. /dev/ttyS0) instead of stdin and stdout.
    #[arg(long, value_name = "PATH")]
    pub tty: Option<PathBuf>,
}

/// Runs the wizard until the node is set up (exit 0), the input is a pipe that ended, or the
/// settings service stays away (exit 1).
pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    stop::install()?;
    let mut console = Console::open(args.tty.as_deref())?;
    loop {
        match session(&args, &mut console) {
            Ok(Ending::Exit(code)) => return Ok(code),
            Ok(Ending::Restart(after)) => {
                console.forget_input();
                sleep(after);
            }
            Err(Stopped::Io(e)) => return Err(e),
            Err(Stopped::Signal) => {}
        }
        if let Some(signal) = stop::requested() {
            let _ = console.write("\n[setup] stopped\n");
            return Ok(ExitCode::from(128u8.saturating_add(signal as u8)));
        }
    }
}

enum Ending {
    Exit(ExitCode),
    Restart(Duration),
}

/// Why a session ended early.
enum Stopped {
    Signal,
    Io(anyhow::Error),
}

impl From<std::io::Error> for Stopped {
    fn from(e: std::io::Error) -> Stopped {
        Stopped::Io(anyhow::Error::new(e).context("the console"))
    }
}

/// One run of the dialog, from the service's status to its verdict.
fn session(args: &Args, console: &mut Console) -> Result<Ending, Stopped> {
    let status = match wait_for_status(&args.settings_socket, console)? {
        Ok(status) => status,
        Err(message) => {
            console.write(&format!("[setup] {message}\n"))?;
            return Ok(Ending::Exit(ExitCode::FAILURE));
        }
    };
    let mut dialog = Dialog::new(&status, console.terminal);
    let mut out = dialog.start();
    loop {
        console.write(&out.text)?;
        out = match out.next {
            Next::Read { echo } => match console.read_event(echo)? {
                Event::Line(line) => dialog.line(&line),
                Event::TooLong => dialog.too_long(),
                Event::Interrupt => dialog.interrupt(),
                Event::Eof => dialog.eof(),
            },
            Next::Submit(answers) => {
                let answer = submit(args, answers);
                stop::check()?;
                if matches!(answer, Ok(Response::Applied { .. })) {
                    tracing::info!("first-boot settings applied from the serial console");
                }
                dialog.answer(answer)
            }
            Next::Restart { after } => return Ok(Ending::Restart(after)),
            Next::Exit { success: true } => return Ok(Ending::Exit(ExitCode::SUCCESS)),
            Next::Exit { success: false } => return Ok(Ending::Exit(ExitCode::FAILURE)),
        };
    }
}

/// The service's status, retried while it is not up yet (PID 1 starts it beside the wizard);
/// `Err` with the last failure after [`STATUS_WAIT`].
fn wait_for_status(
    socket: &Path,
    console: &mut Console,
) -> Result<Result<Status, String>, Stopped> {
    let start = Instant::now();
    let mut said = false;
    loop {
        let failure = match api::settings::request(socket, &Request::Status, STATUS_TIMEOUT) {
            Ok(Response::Status(status)) => return Ok(Ok(status)),
            Ok(other) => format!("unexpected answer from the settings service: {other:?}"),
            Err(message) => message,
        };
        stop::check()?;
        if start.elapsed() >= STATUS_WAIT {
            return Ok(Err(failure));
        }
        if !said {
            console.write("[setup] waiting for the settings service\n")?;
            said = true;
        }
        sleep(STATUS_RETRY);
        stop::check()?;
    }
}

/// Sends the answers with the setup code read now (the file is this boot's).
fn submit(args: &Args, answers: Answers) -> Result<Response, String> {
    let code = std::fs::read_to_string(&args.setup_code_file).map_err(|e| {
        format!(
            "cannot read the setup code from {}: {e}",
            args.setup_code_file.display()
        )
    })?;
    let request = Request::Setup {
        setup_code: Secret::new(code.trim()),
        answers,
    };
    api::settings::request(&args.settings_socket, &request, SETUP_TIMEOUT)
}

/// Sleeps unless a stop was requested (`thread::sleep` resumes after a signal by itself).
fn sleep(duration: Duration) {
    let end = Instant::now() + duration;
    while stop::requested().is_none() {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(200)));
    }
}

/// The terminal (or stdin and stdout), its raw mode and the bytes read but not used yet.
struct Console {
    input: File,
    output: File,
    terminal: bool,
    /// Restores the terminal when dropped.
    _raw: Option<RawMode>,
    editor: LineEditor,
    pending: VecDeque<u8>,
}

impl Console {
    fn open(tty: Option<&Path>) -> anyhow::Result<Console> {
        let (input, output) = match tty {
            Some(path) => {
                use std::os::unix::fs::OpenOptionsExt as _;
                // Not our controlling terminal: no job-control signals, no hang-up kill.
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_NOCTTY)
                    .open(path)
                    .with_context(|| format!("opening {}", path.display()))?;
                let output = file.try_clone().context("duplicating the terminal")?;
                (file, output)
            }
            None => {
                let input: OwnedFd = std::io::stdin().as_fd().try_clone_to_owned()?;
                let output: OwnedFd = std::io::stdout().as_fd().try_clone_to_owned()?;
                (File::from(input), File::from(output))
            }
        };
        let terminal = input.is_terminal();
        let raw = match terminal {
            true => Some(RawMode::enter(&input)?),
            false => None,
        };
        Ok(Console {
            input,
            output,
            terminal,
            _raw: raw,
            editor: LineEditor::default(),
            pending: VecDeque::new(),
        })
    }

    fn write(&mut self, text: &str) -> std::io::Result<()> {
        self.output.write_all(text.as_bytes())
    }

    /// The next line or key event, echoing as the dialog asks.
    fn read_event(&mut self, echo_on: bool) -> Result<Event, Stopped> {
        let mut echo = Vec::new();
        loop {
            while let Some(byte) = self.pending.pop_front() {
                let event = self.editor.feed(byte, self.terminal, echo_on, &mut echo);
                if !echo.is_empty() {
                    self.output.write_all(&echo)?;
                    echo.clear();
                }
                if let Some(event) = event {
                    return Ok(event);
                }
            }
            stop::check()?;
            let mut buf = [0u8; 4096];
            match self.input.read(&mut buf) {
                Ok(0) => return Ok(self.editor.end()),
                Ok(n) => self.pending.extend(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Drops typed-ahead input (after Ctrl-C or a failure the user starts afresh).
    fn forget_input(&mut self) {
        self.pending.clear();
        self.editor.clear();
    }
}

/// The terminal in raw mode: no echo, no line discipline, no signals from keys, CR and LF
/// seen as typed; output still turns LF into CRLF. Dropping it restores the settings found.
struct RawMode {
    fd: OwnedFd,
    saved: Termios,
}

impl RawMode {
    fn enter(terminal: &File) -> anyhow::Result<RawMode> {
        let fd = terminal.as_fd().try_clone_to_owned()?;
        let saved = termios::tcgetattr(&fd).context("reading the terminal's settings")?;
        let mut raw = saved.clone();
        raw.local_flags.remove(
            LocalFlags::ICANON
                | LocalFlags::ECHO
                | LocalFlags::ECHONL
                | LocalFlags::ISIG
                | LocalFlags::IEXTEN,
        );
        raw.input_flags.remove(
            termios::InputFlags::ICRNL | termios::InputFlags::INLCR | termios::InputFlags::IGNCR,
        );
        raw.output_flags
            .insert(termios::OutputFlags::OPOST | termios::OutputFlags::ONLCR);
        raw.control_chars[SpecialCharacterIndices::VMIN as usize] = 1;
        raw.control_chars[SpecialCharacterIndices::VTIME as usize] = 0;
        termios::tcsetattr(&fd, SetArg::TCSANOW, &raw)
            .context("setting the terminal to raw mode")?;
        Ok(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(&self.fd, SetArg::TCSADRAIN, &self.saved);
    }
}

/// SIGTERM, SIGINT and SIGHUP end the wizard through its normal way out (so the terminal is
/// restored): the handler only records the signal, and without `SA_RESTART` a blocked read
/// returns `EINTR` and the loop sees it.
mod stop {
    use super::{AtomicI32, Ordering, Stopped};
    use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal};

    static SIGNAL: AtomicI32 = AtomicI32::new(0);

    extern "C" fn record(signal: libc::c_int) {
        SIGNAL.store(signal, Ordering::SeqCst);
    }

    pub(super) fn install() -> anyhow::Result<()> {
        let action = SigAction::new(
            SigHandler::Handler(record),
            SaFlags::empty(),
            SigSet::empty(),
        );
        let mut set = SigSet::empty();
        for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
            // SAFETY: the handler only stores into an atomic, which is async-signal-safe.
            unsafe { signal::sigaction(sig, &action) }?;
            set.add(sig);
        }
        // A parent's blocked mask would keep them pending forever.
        signal::pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&set), None)?;
        Ok(())
    }

    /// The signal that asked the wizard to stop, if one did.
    pub(super) fn requested() -> Option<i32> {
        Some(SIGNAL.load(Ordering::SeqCst)).filter(|&s| s != 0)
    }

    pub(super) fn check() -> Result<(), Stopped> {
        match requested() {
            Some(_) => Err(Stopped::Signal),
            None => Ok(()),
        }
    }
}
