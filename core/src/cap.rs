//! What poco_sync reads from a learner is capped: a learner is the parent's server, and a
//! hostile or broken one could send a 1 GB DataRow or ParameterStatus, or rows without end,
//! which the client library would buffer whole. `Scanner` follows the backend's message
//! framing (postgres-protocol parses each header) as bytes arrive, before the client library
//! sees them, and stops the stream at the first message past `Caps::message_max`, or once one
//! answer (everything up to a ReadyForQuery) passes `Caps::answer_max`. What follows is then
//! one ErrorResponse (SQLSTATE 54000, program limit exceeded) of its own, and the end of the
//! stream, so the statement that was waiting fails with a clear error and the connection
//! closes; nothing past the cap is ever buffered.
//!
//! An incomplete header is held back until it is whole, so the ErrorResponse always begins at
//! a message boundary.

use postgres_protocol::message::backend::Header;

/// The limits, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub message_max: u64,
    pub answer_max: u64,
}

/// The defaults: far above anything poco_sync asks a learner for (positions, keys of updated
/// rows, verify's per-table hashes, errors), far below what would hurt the platform.
pub const CAPS: Caps = Caps {
    message_max: 16 << 20,
    answer_max: 32 << 20,
};

pub struct Scanner {
    caps: Caps,
    /// The next byte is the server's one-byte answer to an SSLRequest (not framed).
    ssl_answer: bool,
    /// TLS took over ('S'): this layer sees TLS records and passes them on; the layer above
    /// TLS caps the messages.
    off: bool,
    head: [u8; 5],
    have: usize,
    body_left: u64,
    answer: u64,
    stopped: bool,
}

impl Scanner {
    /// `ssl_answer`: the client starts with an SSLRequest (sslmode other than disable) and
    /// this stream is the socket under it.
    pub fn new(caps: Caps, ssl_answer: bool) -> Scanner {
        Scanner {
            caps,
            ssl_answer,
            off: false,
            head: [0; 5],
            have: 0,
            body_left: 0,
            answer: 0,
            stopped: false,
        }
    }

    /// Whether bytes now pass through unread (TLS took over below the messages).
    pub fn is_off(&self) -> bool {
        self.off
    }

    /// Whether the cap was hit: nothing more is to be read.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Take `input` (bytes as read from the server): append what may go on to the client to
    /// `out`. Past a cap, append the ErrorResponse instead and return its message.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Option<String> {
        if self.stopped {
            return None;
        }
        let mut i = 0;
        while i < input.len() {
            if self.off {
                out.extend_from_slice(&input[i..]);
                return None;
            }
            if self.ssl_answer {
                self.ssl_answer = false;
                match input[i] {
                    b'S' => {
                        self.off = true;
                        out.push(b'S');
                        i += 1;
                    }
                    b'N' => {
                        out.push(b'N');
                        i += 1;
                    }
                    _ => {} // an ErrorResponse instead: framed from here
                }
                continue;
            }
            if self.body_left > 0 {
                let take = (self.body_left.min((input.len() - i) as u64)) as usize;
                out.extend_from_slice(&input[i..i + take]);
                self.body_left -= take as u64;
                i += take;
                continue;
            }
            let take = (5 - self.have).min(input.len() - i);
            self.head[self.have..self.have + take].copy_from_slice(&input[i..i + take]);
            self.have += take;
            i += take;
            if self.have < 5 {
                break; // held back until whole
            }
            self.have = 0;
            let header = match Header::parse(&self.head) {
                Ok(Some(h)) => h,
                _ => return self.stop(out, "the learner sent a malformed message header".into()),
            };
            let len = header.len() as u64 + 1; // with the type byte
            if len > self.caps.message_max {
                return self.stop(
                    out,
                    format!(
                        "the learner sent a message of {len} bytes (type '{}'); poco_sync reads at most {} per message from a learner",
                        printable(header.tag()),
                        mib(self.caps.message_max)
                    ),
                );
            }
            self.answer += len;
            if self.answer > self.caps.answer_max {
                return self.stop(
                    out,
                    format!(
                        "the learner's answer passed {}, the most poco_sync reads from a learner for one statement",
                        mib(self.caps.answer_max)
                    ),
                );
            }
            if header.tag() == b'Z' {
                self.answer = 0; // ReadyForQuery: the next answer starts
            }
            out.extend_from_slice(&self.head);
            self.body_left = len - 5;
        }
        None
    }

    fn stop(&mut self, out: &mut Vec<u8>, message: String) -> Option<String> {
        self.stopped = true;
        out.extend_from_slice(&error_response(
            "54000",
            &message,
            "A PostgreSQL server does not answer like this: check that the target URL points at the learner's PostgreSQL database.",
        ));
        Some(message)
    }
}

fn printable(tag: u8) -> char {
    if tag.is_ascii_graphic() {
        tag as char
    } else {
        '?'
    }
}

fn mib(n: u64) -> String {
    format!("{} MB", n >> 20)
}

/// A backend ErrorResponse message.
pub fn error_response(code: &str, message: &str, hint: &str) -> Vec<u8> {
    let mut body: Vec<u8> = Vec::new();
    for (field, value) in [
        (b'S', "ERROR"),
        (b'V', "ERROR"),
        (b'C', code),
        (b'M', message),
        (b'H', hint),
    ] {
        body.push(field);
        body.extend(value.bytes().filter(|b| *b != 0));
        body.push(0);
    }
    body.push(0);
    let mut msg = vec![b'E'];
    msg.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    msg.extend(body);
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(tag: u8, body_len: usize) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&((body_len + 4) as i32).to_be_bytes());
        m.extend(std::iter::repeat_n(b'x', body_len));
        m
    }

    const SMALL: Caps = Caps {
        message_max: 1000,
        answer_max: 3000,
    };

    /// Feeds `bytes` in pieces of `piece` bytes; what came out, and the first stop.
    fn run(s: &mut Scanner, bytes: &[u8], piece: usize) -> (Vec<u8>, Option<String>) {
        let mut out = Vec::new();
        let mut why = None;
        for c in bytes.chunks(piece) {
            if let Some(w) = s.feed(c, &mut out) {
                why.get_or_insert(w);
            }
        }
        (out, why)
    }

    #[test]
    fn messages_within_the_caps_pass_unchanged_in_any_pieces() {
        let mut all = Vec::new();
        for _ in 0..5 {
            all.extend(message(b'D', 500));
            all.extend(message(b'C', 10));
            all.extend(message(b'Z', 1));
        }
        for piece in [1, 2, 3, 5, 7, 64, 100_000] {
            let mut s = Scanner::new(SMALL, false);
            let (out, why) = run(&mut s, &all, piece);
            assert_eq!(why, None, "piece {piece}");
            assert_eq!(out, all, "piece {piece}");
        }
    }

    #[test]
    fn a_message_past_the_cap_stops_at_its_header_with_an_error_response() {
        let mut all = message(b'S', 20); // a ParameterStatus
        let good = all.len();
        all.extend(message(b'S', 5000));
        for piece in [1, 3, 4096] {
            let mut s = Scanner::new(SMALL, false);
            let (out, why) = run(&mut s, &all, piece);
            let why = why.expect("stopped");
            assert!(why.contains("5005 bytes") && why.contains("type 'S'"), "{why}");
            assert_eq!(&out[..good], &all[..good]);
            assert_eq!(out[good], b'E', "an ErrorResponse at the boundary");
            assert!(s.stopped());
            // Nothing more comes out.
            let mut more = Vec::new();
            assert_eq!(s.feed(&message(b'Z', 1), &mut more), None);
            assert!(more.is_empty());
        }
    }

    #[test]
    fn endless_rows_stop_once_the_answer_passes_its_cap() {
        let mut all = Vec::new();
        for _ in 0..100 {
            all.extend(message(b'D', 100));
        }
        let mut s = Scanner::new(SMALL, false);
        let (out, why) = run(&mut s, &all, 333);
        assert!(why.expect("stopped").contains("answer passed"));
        assert!(out.len() <= 3000 + 200, "{}", out.len());
        // ReadyForQuery starts a new answer: 100 answers of 2 rows each pass.
        let mut all = Vec::new();
        for _ in 0..100 {
            all.extend(message(b'D', 100));
            all.extend(message(b'D', 100));
            all.extend(message(b'Z', 1));
        }
        let mut s = Scanner::new(SMALL, false);
        assert_eq!(run(&mut s, &all, 50).1, None);
    }

    #[test]
    fn the_ssl_answer_is_not_framed_and_tls_turns_the_layer_off() {
        let mut s = Scanner::new(SMALL, true);
        let mut out = Vec::new();
        assert_eq!(s.feed(b"S\x16\x03\x01\xff\xff", &mut out), None);
        assert!(s.is_off());
        assert_eq!(out, b"S\x16\x03\x01\xff\xff");
        // Refused TLS ('N', sslmode=prefer): the plain messages after it are capped.
        let mut s = Scanner::new(SMALL, true);
        let mut bytes = vec![b'N'];
        bytes.extend(message(b'R', 4));
        bytes.extend(message(b'D', 5000));
        let (out, why) = run(&mut s, &bytes, 2);
        assert!(why.is_some());
        assert_eq!(out[0], b'N');
        assert!(!s.is_off());
    }

    #[test]
    fn a_malformed_header_stops() {
        let mut s = Scanner::new(SMALL, false);
        let mut out = Vec::new();
        let why = s.feed(&[b'D', 0, 0, 0, 1], &mut out).expect("stopped");
        assert!(why.contains("malformed"), "{why}");
        assert_eq!(out[0], b'E');
    }

    #[test]
    fn the_error_response_is_well_formed() {
        let m = error_response("54000", "too big", "a hint");
        assert_eq!(m[0], b'E');
        let len = i32::from_be_bytes([m[1], m[2], m[3], m[4]]) as usize;
        assert_eq!(len + 1, m.len());
        let h = Header::parse(&m).unwrap().unwrap();
        assert_eq!(h.tag(), b'E');
        assert!(m.windows(6).any(|w| w == b"C54000"));
        assert_eq!(*m.last().unwrap(), 0);
    }
}
