//! The bytes on a heartbeat channel.
//!
//! Two formats share one stream, told apart by their first byte:
//!
//! * **Lines** (`…\n`, a trailing `\r` is ignored), the format of guest agents and of anything a
//!   shell can produce. Where it overlaps, it follows systemd's notify protocol:
//!
//!   | line | meaning |
//!   |---|---|
//!   | `WATCHDOG=1` | heartbeat |
//!   | `WATCHDOG=trigger` | immediate failure, without waiting for the timeout |
//!   | `WATCHDOG_USEC=N` | set the timeout to N µs (within the configured bounds) |
//!   | `EXTEND_TIMEOUT_USEC=N` | wait at least N µs for the next input, once (up to `timeout_max`) |
//!   | `STOPPING=1` | a planned stop: supervision is suspended until the peer announces itself again (`CONDITION=`, `CHECKPOINT=`, `WATCHDOG_USEC=`, `WATCHDOG=trigger`) |
//!   | `CHECKPOINT=name` | a named checkpoint (alive, deadline and logical supervision) |
//!   | `CONDITION=name=1` / `CONDITION=name=0` | set or clear a linked condition |
//!   | `STATUS=text` | free text, logged (text holding a line break is rejected) |
//!   | anything else | a plain heartbeat, as in the seed: any input refreshes the timer |
//!
//! * **AWD frames**: a 4-byte big-endian length, then the payload, the framing QEMU's
//!   colo-compare uses and the original AWD used for its pulses. A frame starts with a zero byte
//!   (no sane frame is 16 MiB long), which no text line does. The payload is read as one line.
//!   Pulses are `advanced-watchdog pulse` (sent by the server side) and `advanced-watchdog reply
//!   pulse` (the client's answer).
//!
//! [`Message::encode`] writes what the [`Decoder`] reads (a property test holds the two to each
//! other), and [`Message::event`] says what a message means to the engine; nobody else formats
//! or interprets protocol lines.
//!
//! The input is hostile. [`Decoder`] keeps at most [`MAX_LINE`] bytes of any message, drops
//! longer ones in streaming fashion (a 10 MB line costs no memory) and reports every drop as a
//! [`Rejection`], so the caller can count and log it. Rejected input still proves the peer is
//! alive, so callers treat it as a heartbeat for the plain timeout.

use std::fmt;
use std::time::Duration;

use crate::engine::{Event, Setter};
use crate::util::valid_name;

/// The pulse the server side of an AWD pair sends every `pulse_interval`.
pub const PULSE: &str = "advanced-watchdog pulse";
/// The client side's answer to each [`PULSE`].
pub const PULSE_REPLY: &str = "advanced-watchdog reply pulse";
/// The longest line or frame payload that is interpreted. Longer input is rejected.
pub const MAX_LINE: usize = 4096;

/// One message of the heartbeat protocol: what the [`Decoder`] yields, what
/// [`encode`](Message::encode) writes, and what every part of awd passes around (the
/// transports hand it to the watchdog as it is). [`event`](Message::event) is the one mapping
/// from a message to what it means to the supervision engine.
///
/// Only checkpoint, condition and status messages own text; a heartbeat, the message that
/// arrives thousands of times a second, allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `WATCHDOG=1`, or any input that is not one of the other messages: refreshes the timer.
    Heartbeat,
    /// `WATCHDOG=trigger`: the peer reports its own failure.
    Trigger,
    /// `WATCHDOG_USEC=N`: the peer asks for a new timeout.
    SetTimeout(Duration),
    /// `EXTEND_TIMEOUT_USEC=N`: the peer asks for at least N µs until its next message, once
    /// (systemd's meaning: "the service must send a new message within").
    ExtendTimeout(Duration),
    /// `STOPPING=1`: the peer is stopping on purpose; its silence from now on is not a failure.
    Stopping,
    /// `CHECKPOINT=name`.
    Checkpoint(Box<str>),
    /// `CONDITION=name=1|0`.
    Condition(Box<str>, bool),
    /// `STATUS=text`: free text for the log.
    Status(Box<str>),
    /// An AWD pulse from the server side.
    Pulse,
    /// A client's reply to a pulse.
    PulseReply,
    /// Input that was dropped; see [`Rejection`]. Decoded only, never encoded.
    Rejected(Rejection),
}

/// Why a [`Message`] cannot be encoded: it would not decode as itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A checkpoint or condition name outside the protocol's alphabet or length.
    #[error("'{0}' is not a valid name (1 to 64 of A-Z a-z 0-9 _ . : -)")]
    NameInvalid(Box<str>),
    /// Status text with a line break, which would end the line early.
    #[error("status text holds a line break")]
    Newline,
    /// A line longer than [`MAX_LINE`], which the decoder would reject.
    #[error("the line would be longer than {MAX_LINE} bytes")]
    TooLong,
    /// [`Message::Rejected`] describes dropped input; there is nothing to send.
    #[error("a rejected input is not a message")]
    NotAMessage,
}

impl Message {
    /// The bytes that carry this message: a text line ending in `\n`, or for pulses the AWD
    /// frame awd's pulse pairs exchange. Decoding them gives back this message, except that a
    /// timeout is sent in whole microseconds (at least one).
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let text = match self {
            Message::Pulse => return Ok(frame(PULSE.as_bytes())),
            Message::PulseReply => return Ok(frame(PULSE_REPLY.as_bytes())),
            Message::Rejected(_) => return Err(EncodeError::NotAMessage),
            Message::Heartbeat => "WATCHDOG=1".to_owned(),
            Message::Trigger => "WATCHDOG=trigger".to_owned(),
            Message::SetTimeout(d) => format!("WATCHDOG_USEC={}", d.as_micros().max(1)),
            Message::ExtendTimeout(d) => {
                format!("EXTEND_TIMEOUT_USEC={}", d.as_micros().max(1))
            }
            Message::Stopping => "STOPPING=1".to_owned(),
            Message::Checkpoint(name) => format!("CHECKPOINT={}", checked_name(name)?),
            Message::Condition(name, value) => {
                format!("CONDITION={}={}", checked_name(name)?, u8::from(*value))
            }
            Message::Status(text) if text.contains(['\n', '\r']) => {
                return Err(EncodeError::Newline);
            }
            Message::Status(text) => format!("STATUS={text}"),
        };
        if text.len() > MAX_LINE {
            return Err(EncodeError::TooLong);
        }
        let mut line = text.into_bytes();
        line.push(b'\n');
        Ok(line)
    }

    /// What the message means to the supervision engine, beyond the input itself (every
    /// message is input: the caller refreshes the timer first). `None` for messages that mean
    /// nothing more: status text, pulses (the transport's business) and rejected input. A
    /// guest's `CONDITION=` is set by the guest.
    pub fn event(&self) -> Option<Event<'_>> {
        match self {
            Message::Heartbeat => Some(Event::Heartbeat),
            Message::Trigger => Some(Event::Trigger),
            Message::SetTimeout(d) => Some(Event::SetTimeout(*d)),
            Message::ExtendTimeout(d) => Some(Event::ExtendTimeout(*d)),
            Message::Stopping => Some(Event::Stopping),
            Message::Checkpoint(c) => Some(Event::Checkpoint(c)),
            Message::Condition(name, value) => Some(Event::Condition {
                name,
                value: *value,
                by: Setter::Guest,
            }),
            Message::Status(_) | Message::Pulse | Message::PulseReply | Message::Rejected(_) => {
                None
            }
        }
    }
}

fn checked_name(name: &str) -> Result<&str, EncodeError> {
    if valid_name(name) {
        Ok(name)
    } else {
        Err(EncodeError::NameInvalid(name.into()))
    }
}

/// Why a piece of input was dropped. Each reason has its own counter in the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rejection {
    /// A line longer than [`MAX_LINE`].
    LineTooLong,
    /// A frame whose length header exceeds [`MAX_LINE`].
    FrameTooLong,
    /// A line or frame that is not UTF-8.
    InvalidUtf8,
    /// A known key with a value that does not parse (`WATCHDOG_USEC=abc`, `STOPPING=0`, a bad
    /// name, status text holding a line break).
    BadValue,
}

impl Rejection {
    /// Every reason, for pre-registering counters.
    pub const ALL: [Rejection; 4] = [
        Rejection::LineTooLong,
        Rejection::FrameTooLong,
        Rejection::InvalidUtf8,
        Rejection::BadValue,
    ];

    /// A stable snake_case name, used as a metric label and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::LineTooLong => "line_too_long",
            Rejection::FrameTooLong => "frame_too_long",
            Rejection::InvalidUtf8 => "invalid_utf8",
            Rejection::BadValue => "bad_value",
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the decoder is inside the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At a message boundary.
    Start,
    /// Inside a text line; its bytes so far are in `buf`.
    Line,
    /// Inside an over-long line: drop everything up to the next newline.
    Discard,
    /// Reading the 4-byte frame length; `have` bytes of it are in `header`.
    FrameHeader { have: usize },
    /// Reading a frame payload of `len` bytes; what has arrived is in `buf`.
    FramePayload { len: usize },
}

/// A streaming decoder for one channel: feed it whatever a read returned, get messages back.
///
/// Memory is bounded by [`MAX_LINE`] whatever the input.
#[derive(Debug)]
pub struct Decoder {
    state: State,
    buf: Vec<u8>,
    header: [u8; 4],
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    /// A decoder at a message boundary.
    pub fn new() -> Self {
        Decoder {
            state: State::Start,
            buf: Vec::with_capacity(128),
            header: [0; 4],
        }
    }

    /// Whether a message is partly received (the stream ended mid-message if so).
    pub fn is_mid_message(&self) -> bool {
        self.state != State::Start
    }

    /// Drops whatever message is partly received and everything up to the next newline: the
    /// caller skipped input (a rate limit), so the stream must be resynchronised.
    pub fn resync(&mut self) {
        self.buf.clear();
        self.state = State::Discard;
    }

    /// Decodes `input`, calling `emit` for each complete message in order.
    pub fn feed(&mut self, mut input: &[u8], mut emit: impl FnMut(Message)) {
        while !input.is_empty() {
            match self.state {
                State::Start => {
                    if input[0] == 0 {
                        self.state = State::FrameHeader { have: 0 };
                    } else {
                        self.buf.clear();
                        self.state = State::Line;
                    }
                }
                State::Line => match input.iter().position(|&b| b == b'\n') {
                    Some(pos) => {
                        if self.buf.len() + pos > MAX_LINE {
                            emit(Message::Rejected(Rejection::LineTooLong));
                        } else {
                            self.buf.extend_from_slice(&input[..pos]);
                            emit(parse_line(&self.buf));
                        }
                        self.buf.clear();
                        self.state = State::Start;
                        input = &input[pos + 1..];
                    }
                    None => {
                        if self.buf.len() + input.len() > MAX_LINE {
                            emit(Message::Rejected(Rejection::LineTooLong));
                            self.buf.clear();
                            self.state = State::Discard;
                        } else {
                            self.buf.extend_from_slice(input);
                        }
                        input = &[];
                    }
                },
                State::Discard => match input.iter().position(|&b| b == b'\n') {
                    Some(pos) => {
                        self.state = State::Start;
                        input = &input[pos + 1..];
                    }
                    None => input = &[],
                },
                State::FrameHeader { have } => {
                    let take = (4 - have).min(input.len());
                    self.header[have..have + take].copy_from_slice(&input[..take]);
                    input = &input[take..];
                    if have + take < 4 {
                        self.state = State::FrameHeader { have: have + take };
                        continue;
                    }
                    let len = u32::from_be_bytes(self.header) as usize;
                    if len > MAX_LINE {
                        // No way to find the frame's end without trusting its length: resync
                        // at the next newline, as for an over-long line.
                        emit(Message::Rejected(Rejection::FrameTooLong));
                        self.state = State::Discard;
                    } else if len == 0 {
                        emit(Message::Heartbeat);
                        self.state = State::Start;
                    } else {
                        self.buf.clear();
                        self.state = State::FramePayload { len };
                    }
                }
                State::FramePayload { len } => {
                    let take = (len - self.buf.len()).min(input.len());
                    self.buf.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    if self.buf.len() == len {
                        emit(parse_line(&self.buf));
                        self.buf.clear();
                        self.state = State::Start;
                    }
                }
            }
        }
    }
}

/// Interprets one line or frame payload (without its newline).
pub fn parse_line(raw: &[u8]) -> Message {
    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
    let Ok(line) = std::str::from_utf8(raw) else {
        return Message::Rejected(Rejection::InvalidUtf8);
    };
    match line {
        PULSE => return Message::Pulse,
        PULSE_REPLY => return Message::PulseReply,
        "WATCHDOG=1" => return Message::Heartbeat,
        "WATCHDOG=trigger" => return Message::Trigger,
        _ => {}
    }
    let Some((key, value)) = line.split_once('=') else {
        return Message::Heartbeat;
    };
    match key {
        "WATCHDOG_USEC" => match positive_usec(value) {
            Some(d) => Message::SetTimeout(d),
            None => Message::Rejected(Rejection::BadValue),
        },
        "EXTEND_TIMEOUT_USEC" => match positive_usec(value) {
            Some(d) => Message::ExtendTimeout(d),
            None => Message::Rejected(Rejection::BadValue),
        },
        // systemd knows only STOPPING=1; anything else is a mistake, not a plain heartbeat,
        // since a sender that meant to stop must hear that it did not.
        "STOPPING" if value == "1" => Message::Stopping,
        "STOPPING" => Message::Rejected(Rejection::BadValue),
        "CHECKPOINT" if valid_name(value) => Message::Checkpoint(value.into()),
        "CONDITION" => match value.rsplit_once('=') {
            Some((name, "1")) if valid_name(name) => Message::Condition(name.into(), true),
            Some((name, "0")) if valid_name(name) => Message::Condition(name.into(), false),
            _ => Message::Rejected(Rejection::BadValue),
        },
        "CHECKPOINT" => Message::Rejected(Rejection::BadValue),
        // A line break inside the text (a carriage return in a line, a newline in a frame)
        // could not be sent on, as the encoder refuses it, and would forge log lines.
        "STATUS" if value.contains(['\r', '\n']) => Message::Rejected(Rejection::BadValue),
        "STATUS" => Message::Status(value.into()),
        _ => Message::Heartbeat,
    }
}

/// A positive number of microseconds, as `WATCHDOG_USEC=` and `EXTEND_TIMEOUT_USEC=` carry.
fn positive_usec(value: &str) -> Option<Duration> {
    match value.parse::<u64>() {
        Ok(usec) if usec > 0 => Some(Duration::from_micros(usec)),
        _ => None,
    }
}

/// Encodes `payload` as an AWD frame: a 4-byte big-endian length, then the payload.
///
/// # Panics
/// Never for awd's own payloads; a payload over 4 GiB cannot be framed and is truncated in the
/// length field, which is why callers only frame the short constants above.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(4 + payload.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Messages own their text, so tests compare them as they come.
    use Message as Owned;

    fn owned(m: Message) -> Message {
        m
    }

    fn decode_chunks(chunks: &[&[u8]]) -> Vec<Owned> {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        for c in chunks {
            d.feed(c, |m| out.push(owned(m)));
        }
        out
    }

    #[test]
    fn lines_of_the_notify_protocol() {
        let input = b"WATCHDOG=1\nWATCHDOG=trigger\nWATCHDOG_USEC=2500000\nCHECKPOINT=init\n\
            CONDITION=ready=1\nCONDITION=ready=0\nSTATUS=all good\nhello\n\nX=Y\r\n\
            STOPPING=1\nEXTEND_TIMEOUT_USEC=90000000\n";
        assert_eq!(
            decode_chunks(&[input]),
            vec![
                Owned::Heartbeat,
                Owned::Trigger,
                Owned::SetTimeout(Duration::from_millis(2500)),
                Owned::Checkpoint("init".into()),
                Owned::Condition("ready".into(), true),
                Owned::Condition("ready".into(), false),
                Owned::Status("all good".into()),
                Owned::Heartbeat,
                Owned::Heartbeat,
                Owned::Heartbeat,
                Owned::Stopping,
                Owned::ExtendTimeout(Duration::from_secs(90)),
            ]
        );
    }

    #[test]
    fn bad_values_are_rejected() {
        let input =
            b"WATCHDOG_USEC=abc\nWATCHDOG_USEC=0\nCHECKPOINT=\nCHECKPOINT=a b\nCONDITION=x\n\
            STOPPING=0\nSTOPPING=yes\nEXTEND_TIMEOUT_USEC=0\nEXTEND_TIMEOUT_USEC=-5\n\
            EXTEND_TIMEOUT_USEC=99999999999999999999\n";
        assert_eq!(
            decode_chunks(&[input]),
            vec![Owned::Rejected(Rejection::BadValue); 10]
        );
    }

    /// Found by the `decoder` fuzz target (fuzz/corpus/decoder/crash-status-carriage-return
    /// and crash-status-newline-in-frame): status text with a carriage return inside a line,
    /// or a newline inside a frame, was accepted, but the encoder refuses line breaks, so awd
    /// could not pass on what it had accepted. Only a line's own trailing `\r` is dropped.
    #[test]
    fn status_text_with_a_line_break_is_rejected() {
        let mut input = b"STATUS=\0\0\rDOG_USEC=\nSTATUS=a\r\r\nSTATUS=ok\r\n".to_vec();
        input.extend(frame(b"STATUS=a\nSTATUS=b"));
        input.extend(frame(b"STATUS=framed\r"));
        assert_eq!(
            decode_chunks(&[&input]),
            vec![
                Owned::Rejected(Rejection::BadValue),
                Owned::Rejected(Rejection::BadValue),
                Owned::Status("ok".into()),
                Owned::Rejected(Rejection::BadValue),
                Owned::Status("framed".into()),
            ]
        );
    }

    #[test]
    fn frames_and_pulses() {
        let mut input = frame(PULSE.as_bytes());
        input.extend(frame(PULSE_REPLY.as_bytes()));
        input.extend(frame(b""));
        input.extend(frame(b"CHECKPOINT=a"));
        assert_eq!(
            decode_chunks(&[&input]),
            vec![
                Owned::Pulse,
                Owned::PulseReply,
                Owned::Heartbeat,
                Owned::Checkpoint("a".into())
            ]
        );
    }

    #[test]
    fn byte_at_a_time_gives_the_same_messages() {
        let mut input = frame(PULSE.as_bytes());
        input.extend_from_slice(b"WATCHDOG=1\r\nCHECKPOINT=b\n");
        let chunks: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(
            decode_chunks(&chunks),
            vec![
                Owned::Pulse,
                Owned::Heartbeat,
                Owned::Checkpoint("b".into())
            ]
        );
    }

    #[test]
    fn a_ten_megabyte_line_is_one_rejection_and_bounded_memory() {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        let chunk = vec![b'a'; 64 * 1024];
        for _ in 0..160 {
            d.feed(&chunk, |m| out.push(owned(m)));
            assert!(d.buf.capacity() <= 2 * MAX_LINE);
        }
        d.feed(b"\nWATCHDOG=1\n", |m| out.push(owned(m)));
        assert_eq!(
            out,
            vec![Owned::Rejected(Rejection::LineTooLong), Owned::Heartbeat]
        );
    }

    #[test]
    fn a_line_of_exactly_max_is_accepted_one_more_is_not() {
        let mut line = vec![b'a'; MAX_LINE];
        line.push(b'\n');
        assert_eq!(decode_chunks(&[&line]), vec![Owned::Heartbeat]);
        let mut line = vec![b'a'; MAX_LINE + 1];
        line.push(b'\n');
        assert_eq!(
            decode_chunks(&[&line]),
            vec![Owned::Rejected(Rejection::LineTooLong)]
        );
    }

    #[test]
    fn invalid_utf8_and_lying_frame_lengths() {
        assert_eq!(
            decode_chunks(&[b"\xff\xfe\n"]),
            vec![Owned::Rejected(Rejection::InvalidUtf8)]
        );
        // A frame header claiming 16 MiB: rejected, then resync at the newline.
        assert_eq!(
            decode_chunks(&[b"\x00\xff\xff\xffjunk\nWATCHDOG=1\n"]),
            vec![Owned::Rejected(Rejection::FrameTooLong), Owned::Heartbeat]
        );
    }

    /// Any message the encoder accepts.
    fn message() -> impl Strategy<Value = Message> {
        let name = "[A-Za-z0-9_.:-]{1,64}";
        prop_oneof![
            Just(Message::Heartbeat),
            Just(Message::Trigger),
            Just(Message::Pulse),
            Just(Message::PulseReply),
            (1u64..).prop_map(|us| Message::SetTimeout(Duration::from_micros(us))),
            (1u64..).prop_map(|us| Message::ExtendTimeout(Duration::from_micros(us))),
            Just(Message::Stopping),
            name.prop_map(|n| Message::Checkpoint(n.into())),
            (name, any::<bool>()).prop_map(|(n, v)| Message::Condition(n.into(), v)),
            "[^\r\n]{0,300}".prop_map(|t| Message::Status(t.into())),
        ]
    }

    #[test]
    fn the_encoder_refuses_what_would_not_decode_as_itself() {
        assert_eq!(
            Message::Checkpoint("a b".into()).encode(),
            Err(EncodeError::NameInvalid("a b".into()))
        );
        assert_eq!(
            Message::Condition("".into(), true).encode(),
            Err(EncodeError::NameInvalid("".into()))
        );
        assert_eq!(
            Message::Status("two\nlines".into()).encode(),
            Err(EncodeError::Newline)
        );
        assert_eq!(
            Message::Status("x".repeat(MAX_LINE).into()).encode(),
            Err(EncodeError::TooLong)
        );
        assert_eq!(
            Message::SetTimeout(Duration::from_nanos(10)).encode(),
            Ok(b"WATCHDOG_USEC=1\n".to_vec()),
            "a timeout goes in whole microseconds, at least one"
        );
        assert_eq!(
            Message::Condition("ready".into(), false).encode(),
            Ok(b"CONDITION=ready=0\n".to_vec())
        );
    }

    #[test]
    fn each_message_means_one_engine_event() {
        assert_eq!(Message::Heartbeat.event(), Some(Event::Heartbeat));
        assert_eq!(
            Message::Condition("c".into(), true).event(),
            Some(Event::Condition {
                name: "c",
                value: true,
                by: Setter::Guest
            })
        );
        assert_eq!(Message::Stopping.event(), Some(Event::Stopping));
        assert_eq!(
            Message::ExtendTimeout(Duration::from_secs(3)).event(),
            Some(Event::ExtendTimeout(Duration::from_secs(3)))
        );
        assert_eq!(Message::Status("x".into()).event(), None);
        assert_eq!(Message::Pulse.event(), None);
        assert_eq!(Message::Rejected(Rejection::BadValue).event(), None);
    }

    /// Cases per property: `PROPTEST_CASES` when set (CI's bounded fuzzing run), else 2000.
    fn cases() -> u32 {
        std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2000)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases()))]

        /// Any sequence of messages, encoded and cut anywhere, decodes as itself.
        #[test]
        fn fuzz_encoded_messages_decode_as_themselves(
            msgs in proptest::collection::vec(message(), 0..16),
            cut in any::<usize>(),
        ) {
            let mut bytes = Vec::new();
            for m in &msgs {
                bytes.extend(m.encode().expect("generated messages encode"));
            }
            let cut = cut % (bytes.len() + 1);
            prop_assert_eq!(decode_chunks(&[&bytes[..cut], &bytes[cut..]]), msgs);
        }

        /// Whatever a peer sends, each message decoded from it encodes to bytes that decode
        /// as the same message: awd can pass on anything it accepted.
        #[test]
        fn fuzz_decoded_messages_encode_as_themselves(
            data in proptest::collection::vec(any::<u8>(), 0..2 * MAX_LINE),
        ) {
            for m in decode_chunks(&[&data]) {
                if matches!(m, Message::Rejected(_)) {
                    prop_assert_eq!(m.encode(), Err(EncodeError::NotAMessage));
                    continue;
                }
                let bytes = m.encode().expect("an accepted message encodes");
                prop_assert_eq!(decode_chunks(&[&bytes]), vec![m]);
            }
        }

        /// Arbitrary bytes in arbitrary chunks: no panic, bounded memory, and the same
        /// messages however the stream is split.
        #[test]
        fn fuzz_decoder_arbitrary_input_split_anywhere(
            data in proptest::collection::vec(any::<u8>(), 0..3 * MAX_LINE),
            cut in 0usize..3 * MAX_LINE,
        ) {
            let whole = decode_chunks(&[&data]);
            let cut = cut.min(data.len());
            let split = decode_chunks(&[&data[..cut], &data[cut..]]);
            prop_assert_eq!(whole, split);
        }
    }
}
