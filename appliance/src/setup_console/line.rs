//! The wizard's line editor: pure. Fed the bytes a terminal (in raw mode) or a pipe delivers,
//! it returns the finished lines and what to echo. Raw mode is ours so that Ctrl-C and Ctrl-D
//! reach the wizard as keys (it starts over instead of dying) and so that CR, LF and CRLF all
//! end exactly one line (a CRLF seen as two lines would end a PEM paste early).

/// The longest line kept (a PEM line is 64 characters, a password at most 1024): more is a
/// typing accident or a paste of the wrong thing.
pub(crate) const MAX_LINE_BYTES: usize = 64 * 1024;

/// What a byte finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// A line, without its end.
    Line(String),
    /// A line longer than [`MAX_LINE_BYTES`] (dropped).
    TooLong,
    /// Ctrl-C (on a terminal).
    Interrupt,
    /// Ctrl-D on an empty line (on a terminal), or the end of the input.
    Eof,
}

/// Where an escape sequence (an arrow key) is being skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Escape {
    #[default]
    None,
    /// After ESC.
    Start,
    /// After `ESC [` or `ESC O`: until a final byte.
    Sequence,
}

/// One line being typed.
#[derive(Debug, Default)]
pub(crate) struct LineEditor {
    line: Vec<u8>,
    too_long: bool,
    /// The previous byte was a CR: an LF right after it ends nothing.
    after_cr: bool,
    escape: Escape,
}

const CTRL_C: u8 = 0x03;
const CTRL_D: u8 = 0x04;
const BACKSPACE: u8 = 0x08;
const CTRL_U: u8 = 0x15;
const ESC: u8 = 0x1b;
const DEL: u8 = 0x7f;

impl LineEditor {
    /// Feeds one byte. On a `terminal`, control keys edit the line (backspace, Ctrl-U), end it
    /// (Ctrl-C, Ctrl-D) or are ignored, and typed characters are echoed into `echo` when
    /// `echo_on`; from a pipe every byte but CR and LF is text.
    pub(crate) fn feed(
        &mut self,
        byte: u8,
        terminal: bool,
        echo_on: bool,
        echo: &mut Vec<u8>,
    ) -> Option<Event> {
        let after_cr = std::mem::replace(&mut self.after_cr, byte == b'\r');
        if matches!(byte, b'\r' | b'\n') {
            self.escape = Escape::None;
            return match byte == b'\n' && after_cr {
                true => None,
                false => Some(self.finish()),
            };
        }
        if terminal && self.escape != Escape::None {
            self.escape = match (self.escape, byte) {
                (Escape::Start, b'[' | b'O') => Escape::Sequence,
                (Escape::Sequence, 0x40..=0x7e) | (Escape::Start, _) => Escape::None,
                (state, _) => state,
            };
            return None;
        }
        match byte {
            _ if !terminal => {
                self.push(byte, false, echo);
                None
            }
            CTRL_C => {
                self.clear();
                Some(Event::Interrupt)
            }
            CTRL_D if self.line.is_empty() && !self.too_long => Some(Event::Eof),
            BACKSPACE | DEL => {
                if self.pop() && echo_on {
                    echo.extend_from_slice(b"\x08 \x08");
                }
                None
            }
            CTRL_U => {
                while self.pop() {
                    if echo_on {
                        echo.extend_from_slice(b"\x08 \x08");
                    }
                }
                self.too_long = false;
                None
            }
            ESC => {
                self.escape = Escape::Start;
                None
            }
            b'\t' | 0x20.. => {
                self.push(byte, echo_on, echo);
                None
            }
            _ => None,
        }
    }

    /// The input ended: the unfinished line, if any, is a line.
    pub(crate) fn end(&mut self) -> Event {
        match self.line.is_empty() && !self.too_long {
            true => Event::Eof,
            false => self.finish(),
        }
    }

    /// Forgets the line being typed.
    pub(crate) fn clear(&mut self) {
        *self = LineEditor::default();
    }

    fn push(&mut self, byte: u8, echo_on: bool, echo: &mut Vec<u8>) {
        if self.line.len() >= MAX_LINE_BYTES {
            self.too_long = true;
            return;
        }
        self.line.push(byte);
        if echo_on {
            echo.push(byte);
        }
    }

    /// Removes the last character (all of its UTF-8 bytes); false when there was none.
    fn pop(&mut self) -> bool {
        while let Some(byte) = self.line.pop() {
            if byte & 0b1100_0000 != 0b1000_0000 {
                return true;
            }
        }
        false
    }

    fn finish(&mut self) -> Event {
        let line = std::mem::take(&mut self.line);
        match std::mem::take(&mut self.too_long) {
            true => Event::TooLong,
            false => Event::Line(String::from_utf8_lossy(&line).into_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input`; returns the events and the echo, the echo shown with `⌫` for an erase.
    fn check(input: &[u8], terminal: bool, expected: &[Event], expected_echo: &str) {
        let mut editor = LineEditor::default();
        let mut events = Vec::new();
        let mut echo = Vec::new();
        for &b in input {
            events.extend(editor.feed(b, terminal, true, &mut echo));
        }
        assert_eq!(events, expected, "events of {input:?}");
        let echo = String::from_utf8(echo).unwrap().replace("\x08 \x08", "⌫");
        assert_eq!(echo, expected_echo, "echo of {input:?}");
    }

    fn line(s: &str) -> Event {
        Event::Line(s.into())
    }

    #[test]
    fn lines_end_at_cr_lf_or_crlf_and_keys_edit_them() {
        use Event::*;
        let cases: &[(&[u8], bool, &[Event], &str)] = &[
            (
                b"a\rb\nc\r\nd\n\n",
                true,
                &[line("a"), line("b"), line("c"), line("d"), line("")],
                "abcd",
            ),
            // A pipe: the same line ends, no key is special.
            (b"a\r\nb\x7fc\n", false, &[line("a"), line("b\x7fc")], ""),
            // Backspace erases a whole UTF-8 character; nothing to erase echoes nothing.
            ("\x7fé\x7fx\r".as_bytes(), true, &[line("x")], "é⌫x"),
            (b"ab\x08\x08\x08c\r", true, &[line("c")], "ab⌫⌫c"),
            (b"abc\x15d\r", true, &[line("d")], "abc⌫⌫⌫d"),
            // Ctrl-C drops the line; Ctrl-D only on an empty line.
            (
                b"ab\x03c\x04\r\x04",
                true,
                &[Interrupt, line("c"), Eof],
                "abc",
            ),
            // Arrow keys and other control characters type nothing.
            (b"a\x1b[A\x1bOB\x01b\tc\r", true, &[line("ab\tc")], "ab\tc"),
        ];
        for (input, terminal, expected, echo) in cases {
            check(input, *terminal, expected, echo);
        }
    }

    #[test]
    fn an_overlong_line_is_reported_not_cut() {
        let mut input = vec![b'x'; MAX_LINE_BYTES + 10];
        input.extend_from_slice(b"\rok\r");
        let mut editor = LineEditor::default();
        let mut echo = Vec::new();
        let events: Vec<_> = input
            .iter()
            .filter_map(|&b| editor.feed(b, true, false, &mut echo))
            .collect();
        assert_eq!(events, [Event::TooLong, line("ok")]);
        assert!(echo.is_empty(), "nothing is echoed with echo off");
    }

    #[test]
    fn the_end_of_input_finishes_a_partial_line() {
        let mut editor = LineEditor::default();
        let mut echo = Vec::new();
        for &b in b"abc" {
            assert_eq!(editor.feed(b, false, false, &mut echo), None);
        }
        assert_eq!(editor.end(), line("abc"));
        assert_eq!(editor.end(), Event::Eof);
    }
}
