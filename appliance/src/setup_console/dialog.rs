//! The serial-console wizard's dialog: pure. Fed the settings service's [`Status`], the lines
//! typed and the service's answer to the setup, it returns the text to print and what to do
//! next (read a line, send the answers, start over, exit).
//!
//! The text is a contract (the end-to-end tests drive it over a serial line): a banner
//! `[setup] Tandem first-boot setup for cluster <name>`; per field a line
//! `[setup] <label> (<help>)` and the prompt `<key>> `; PEM pasted line by line, ended by an
//! empty line; errors as `[setup] error on <key>: <message>`, then that field is asked again;
//! `[setup] applied: this machine is <node>` (and `[setup] cluster secret: <hex>` when one
//! was generated) at the end. The validation is the settings service's (one schema for every
//! front end); the dialog checks only what it needs to go on (the TLS mode, a PEM's size).

use std::collections::VecDeque;
use std::time::Duration;

use api::settings::{Answers, Field, FieldError, Response, Secret, Status, TlsChoice};

use super::line::MAX_LINE_BYTES;

/// How long to wait before starting over after the service failed or the input ended.
pub(crate) const RETRY_AFTER: Duration = Duration::from_secs(3);
/// The two answers of the TLS question.
const SELF_SIGNED: &str = "self-signed";
const UPLOAD: &str = "upload";
/// A longer paste is refused here, before it travels to the service (which refuses it too).
const MAX_PEM_LEN: usize = cluster_config::settings::MAX_PEM_LEN;

/// What the driver does after printing an [`Output`]'s text.
#[derive(Debug, PartialEq)]
pub(crate) enum Next {
    /// Read a line (or a key that ends the dialog); echo what is typed only when `echo`.
    Read { echo: bool },
    /// Send these answers, with the setup code, as a setup; then call [`Dialog::answer`].
    Submit(Answers),
    /// Start over (a new status, a new dialog) after waiting this long.
    Restart { after: Duration },
    /// Stop the wizard.
    Exit { success: bool },
}

/// Text to print (prompts end without a newline), then what to do.
#[derive(Debug, PartialEq)]
pub(crate) struct Output {
    pub(crate) text: String,
    pub(crate) next: Next,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Asking(Field),
    Submitted,
    Over,
}

/// One run of the wizard, from the banner to the service's verdict. No `Debug`: it holds a
/// key being pasted.
pub(crate) struct Dialog {
    /// The input is a terminal: pasted certificate lines get their line ends echoed.
    terminal: bool,
    configured: bool,
    cluster: String,
    /// The node the seed names, if it does.
    node: Option<String>,
    nodes: Vec<String>,
    /// What the service asks, without what the console never asks (the setup code is read
    /// from its file: being at the console is the proof).
    asked: Vec<Field>,
    answers: Answers,
    /// The TLS answer: upload (else self-signed), and the pasted chain and key.
    upload: bool,
    certificate: String,
    key: Secret,
    /// The fields still to ask in this round, in form order.
    todo: VecDeque<Field>,
    /// The PEM being pasted for the current field, and whether it grew too long.
    paste: Option<String>,
    paste_too_long: bool,
    state: State,
}

impl Dialog {
    pub(crate) fn new(status: &Status, terminal: bool) -> Dialog {
        Dialog {
            terminal,
            configured: status.configured,
            cluster: status.cluster.clone(),
            node: status.node.clone(),
            nodes: status.nodes.clone(),
            asked: status
                .asked
                .iter()
                .copied()
                .filter(|f| !matches!(f, Field::SetupCode | Field::CurrentPassword))
                .collect(),
            answers: Answers::default(),
            upload: false,
            certificate: String::new(),
            key: Secret::default(),
            todo: VecDeque::new(),
            paste: None,
            paste_too_long: false,
            state: State::Over,
        }
    }

    /// The first output: the banner and the first question, or one line when the node is
    /// already set up.
    pub(crate) fn start(&mut self) -> Output {
        if self.configured {
            let text = match &self.node {
                Some(node) => format!(
                    "[setup] this node is set up: it is {node} of cluster {}\n",
                    self.cluster
                ),
                None => format!("[setup] this node of cluster {} is set up\n", self.cluster),
            };
            return Output {
                text,
                next: Next::Exit { success: true },
            };
        }
        self.todo = self.round(|_| true);
        let mut out = self.proceed();
        out.text.insert_str(
            0,
            &format!(
                "[setup] Tandem first-boot setup for cluster {}\n",
                self.cluster
            ),
        );
        out
    }

    /// A line typed at the prompt (or one line of a PEM paste).
    pub(crate) fn line(&mut self, line: &str) -> Output {
        let State::Asking(field) = self.state else {
            return self.restart("unexpected input");
        };
        if let Some(paste) = self.paste.as_mut() {
            if !line.trim().is_empty() {
                if paste.len() + line.len() + 1 > MAX_PEM_LEN {
                    self.paste_too_long = true;
                } else {
                    paste.push_str(line);
                    paste.push('\n');
                }
                let echo = !field.is_secret();
                return Output {
                    // On a terminal each echoed line ends where the user's Enter would.
                    text: if self.terminal && echo { "\n" } else { "" }.into(),
                    next: Next::Read { echo },
                };
            }
            let pem = self.paste.take().unwrap_or_default();
            if std::mem::take(&mut self.paste_too_long) {
                return self.retry(field, &format!("too long: at most {MAX_PEM_LEN} bytes"));
            }
            match field {
                Field::TlsCertificate => self.certificate = pem,
                Field::TlsKey => self.key = Secret::new(pem),
                _ => {}
            }
            return self.answered();
        }
        let a = &mut self.answers;
        match field {
            Field::Node => a.node = Some(line.trim().to_string()),
            // A password is taken as typed: spaces may be part of it.
            Field::AdminPassword => a.admin_password = Some(Secret::new(line)),
            Field::AdminPasswordConfirm => a.admin_password_confirm = Some(Secret::new(line)),
            Field::ClusterSecret => a.cluster_secret = Some(Secret::new(line.trim())),
            Field::Webhook => a.webhook = Some(line.trim().to_string()),
            Field::Tls => match line.trim().to_ascii_lowercase().as_str() {
                SELF_SIGNED => self.upload = false,
                UPLOAD => {
                    self.upload = true;
                    self.todo.push_front(Field::TlsKey);
                    self.todo.push_front(Field::TlsCertificate);
                }
                _ => {
                    return self.retry(field, &format!("answer `{SELF_SIGNED}` or `{UPLOAD}`"));
                }
            },
            Field::SetupCode | Field::CurrentPassword | Field::TlsCertificate | Field::TlsKey => {}
        }
        self.answered()
    }

    /// A line longer than the line editor keeps.
    pub(crate) fn too_long(&mut self) -> Output {
        let State::Asking(field) = self.state else {
            return self.restart("unexpected input");
        };
        if self.paste.is_some() {
            // The rest of the paste is read; its end reports the error.
            self.paste_too_long = true;
            return Output {
                text: String::new(),
                next: Next::Read {
                    echo: !field.is_secret(),
                },
            };
        }
        self.retry(
            field,
            &format!("too long: at most {MAX_LINE_BYTES} bytes on a line"),
        )
    }

    /// Ctrl-C: the answers so far are dropped and the wizard starts over.
    pub(crate) fn interrupt(&mut self) -> Output {
        self.state = State::Over;
        Output {
            text: "\n[setup] interrupted: starting over\n".into(),
            next: Next::Restart {
                after: Duration::ZERO,
            },
        }
    }

    /// Ctrl-D, or the input ended. A terminal may be typed on again (after a hang-up too);
    /// a pipe never will, so the wizard stops (its supervisor starts it again).
    pub(crate) fn eof(&mut self) -> Output {
        self.state = State::Over;
        match self.terminal {
            true => Output {
                text: "\n[setup] end of input: starting over\n".into(),
                next: Next::Restart { after: RETRY_AFTER },
            },
            false => Output {
                text: "\n[setup] end of input: the wizard stops\n".into(),
                next: Next::Exit { success: false },
            },
        }
    }

    /// The service's answer to [`Next::Submit`] (`Err`: it could not be asked).
    pub(crate) fn answer(&mut self, answer: Result<Response, String>) -> Output {
        if self.state != State::Submitted {
            return self.restart("unexpected answer from the settings service");
        }
        match answer {
            Ok(Response::Applied { cluster_secret }) => {
                self.state = State::Over;
                let node = self.answers.node.as_ref().or(self.node.as_ref());
                let mut text = format!(
                    "[setup] applied: this machine is {}\n",
                    node.map_or("?", String::as_str)
                );
                // The one secret ever shown: the other nodes' wizards need it.
                if let Some(secret) = cluster_secret {
                    text.push_str(&format!("[setup] cluster secret: {}\n", secret.expose()));
                    text.push_str(
                        "[setup] type this secret into the other nodes' setup: it is not shown again\n",
                    );
                }
                text.push_str("[setup] the node now starts its services\n");
                Output {
                    text,
                    next: Next::Exit { success: true },
                }
            }
            Ok(Response::Invalid { errors }) => self.invalid(&errors),
            Ok(Response::Error { message }) => {
                self.restart(&format!("the settings service failed: {message}"))
            }
            Ok(Response::Denied) => self.restart("the settings service refused the setup code"),
            Ok(Response::Ok | Response::Status(_)) => {
                self.restart("unexpected answer from the settings service")
            }
            Err(message) => self.restart(&message),
        }
    }

    /// Every error, then the fields that have one asked again (a password with its
    /// confirmation, a certificate from its mode on); the other answers are kept.
    fn invalid(&mut self, errors: &[FieldError]) -> Output {
        let mut text = String::new();
        let mut again = Vec::new();
        let mut start_over = false;
        for e in errors {
            let message = e.message.replace(['\r', '\n'], " ");
            text.push_str(&format!("[setup] error on {}: {message}\n", e.field.key()));
            match e.field {
                Field::AdminPassword | Field::AdminPasswordConfirm => {
                    again.extend([Field::AdminPassword, Field::AdminPasswordConfirm])
                }
                Field::Tls | Field::TlsCertificate | Field::TlsKey => again.push(Field::Tls),
                // The code in its file no longer holds (a new boot's wizard): read it anew.
                Field::SetupCode => start_over = true,
                field => again.push(field),
            }
        }
        self.todo = self.round(|f| again.contains(f));
        if start_over || self.todo.is_empty() {
            let mut out = self.restart("the answers were refused");
            out.text.insert_str(0, &text);
            return out;
        }
        if self.todo.contains(&Field::Tls) {
            self.upload = false;
            self.certificate.clear();
            self.key = Secret::default();
        }
        let mut out = self.proceed();
        out.text.insert_str(0, &text);
        out
    }

    /// The asked fields `select` keeps, in order; a certificate and key only follow an
    /// `upload` answer.
    fn round(&self, select: impl Fn(&Field) -> bool) -> VecDeque<Field> {
        self.asked
            .iter()
            .copied()
            .filter(|f| !matches!(f, Field::TlsCertificate | Field::TlsKey))
            .filter(select)
            .collect()
    }

    /// An answer is complete: its line ends, the next question follows.
    fn answered(&mut self) -> Output {
        let mut out = self.proceed();
        out.text.insert(0, '\n');
        out
    }

    /// The next question, or the answers to send.
    fn proceed(&mut self) -> Output {
        match self.todo.pop_front() {
            Some(field) => self.ask(field),
            None => {
                self.state = State::Submitted;
                let mut answers = self.answers.clone();
                if self.asked.contains(&Field::Tls) {
                    answers.tls = Some(match self.upload {
                        true => TlsChoice::Upload {
                            certificate: self.certificate.clone(),
                            key: self.key.clone(),
                        },
                        false => TlsChoice::SelfSigned,
                    });
                }
                Output {
                    text: "[setup] checking the answers\n".into(),
                    next: Next::Submit(answers),
                }
            }
        }
    }

    fn ask(&mut self, field: Field) -> Output {
        self.state = State::Asking(field);
        let pem = matches!(field, Field::TlsCertificate | Field::TlsKey);
        self.paste = pem.then(String::new);
        self.paste_too_long = false;
        let help = match field {
            Field::Node => format!("{}; one of {}", field.help(), self.nodes.join(", ")),
            Field::Tls => format!("{}: type `{SELF_SIGNED}` or `{UPLOAD}`", field.help()),
            _ if pem => format!("{}; paste it, then an empty line", field.help()),
            _ => field.help().to_string(),
        };
        let mut text = format!("[setup] {}", field.label());
        if !help.is_empty() {
            text.push_str(&format!(" ({help})"));
        }
        text.push_str(&format!("\n{}> ", field.key()));
        Output {
            text,
            next: Next::Read {
                echo: !field.is_secret(),
            },
        }
    }

    fn retry(&mut self, field: Field, message: &str) -> Output {
        let mut out = self.ask(field);
        out.text.insert_str(
            0,
            &format!("\n[setup] error on {}: {message}\n", field.key()),
        );
        out
    }

    fn restart(&mut self, why: &str) -> Output {
        self.state = State::Over;
        Output {
            text: format!("[setup] {why}: starting over\n"),
            next: Next::Restart { after: RETRY_AFTER },
        }
    }
}

#[cfg(test)]
mod tests;
