//! The client side of the agent's local socket: how `awd-agent checkpoint …` and guest
//! programs send a line through the running agent, which holds the one channel to the host.
//!
//! ```no_run
//! use std::path::Path;
//! use awd::agent::{DEFAULT_SOCKET, relay};
//!
//! relay::send_line(Path::new(DEFAULT_SOCKET), "CHECKPOINT=ready")?;
//! // or, with the protocol's encoder doing the formatting:
//! use awd::protocol::Message;
//! relay::send(Path::new(DEFAULT_SOCKET), &[Message::Checkpoint("ready".into())])?;
//! # Ok::<(), awd::agent::AgentError>(())
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use super::limits::{MAX_REPLY, REPLY_TIMEOUT};
use super::{AgentError, Refusal, relayable, shorten};
use crate::protocol::{EncodeError, Message};

/// Sends messages in order through the running agent, encoded by the protocol (see
/// [`send_lines`]). A message the protocol cannot carry (a bad name, status text with a line
/// break) sends nothing and is refused with the reason the agent would give.
pub fn send(socket: &Path, messages: &[Message]) -> Result<(), AgentError> {
    let lines = messages
        .iter()
        .map(line_of)
        .collect::<Result<Vec<String>, AgentError>>()?;
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    send_lines(socket, &lines)
}

/// The line that carries `m`, without its newline; or the refusal the agent would answer.
pub fn line_of(m: &Message) -> Result<String, AgentError> {
    let refused = |reason| AgentError::LineInvalid {
        line: shorten(&format!("{m:?}")),
        reason,
    };
    if matches!(m, Message::Pulse | Message::PulseReply) {
        // Pulses are framed, and only the pair's two ends exchange them.
        return Err(refused(Refusal::NotRelayed));
    }
    match m.encode() {
        Ok(mut bytes) => {
            bytes.pop();
            String::from_utf8(bytes).map_err(|_| refused(Refusal::NotRelayed))
        }
        Err(EncodeError::NameInvalid(_)) if matches!(m, Message::Condition(..)) => {
            Err(refused(Refusal::ConditionInvalid))
        }
        Err(EncodeError::NameInvalid(_)) => Err(refused(Refusal::NameInvalid)),
        Err(EncodeError::Newline) => Err(refused(Refusal::Newline)),
        Err(EncodeError::TooLong) => Err(refused(Refusal::LineTooLong)),
        Err(EncodeError::NotAMessage) => Err(refused(Refusal::NotRelayed)),
    }
}

/// Sends one protocol line (without newline) through the running agent at `socket`, and
/// returns once the agent has written it to the host.
pub fn send_line(socket: &Path, line: &str) -> Result<(), AgentError> {
    send_lines(socket, &[line])
}

/// Sends lines in order over one connection, each after the agent accepted the one
/// before; stops at the first refusal. Every line is checked before anything is sent, so
/// an invalid line sends nothing.
pub fn send_lines(socket: &Path, lines: &[&str]) -> Result<(), AgentError> {
    for line in lines {
        // `relayable` drops one trailing `\r`, which the agent would drop too.
        if let Err(reason) = relayable(line.as_bytes()) {
            return Err(AgentError::LineInvalid {
                line: shorten(line),
                reason,
            });
        }
    }
    let stream = UnixStream::connect(socket).map_err(|source| AgentError::SocketConnect {
        path: socket.to_owned(),
        source,
    })?;
    let io_err = |source| AgentError::SocketIo {
        path: socket.to_owned(),
        source,
    };
    stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .map_err(io_err)?;
    stream
        .set_write_timeout(Some(REPLY_TIMEOUT))
        .map_err(io_err)?;
    let mut reader = BufReader::new(&stream);
    let mut reply = Vec::new();
    for line in lines {
        let mut msg = Vec::with_capacity(line.len() + 1);
        msg.extend_from_slice(line.as_bytes());
        msg.push(b'\n');
        // On a failed write the agent may still have said why (too many clients).
        let sent = (&stream).write_all(&msg);
        reply.clear();
        let read = (&mut reader).take(MAX_REPLY).read_until(b'\n', &mut reply);
        let Some(text) = reply.strip_suffix(b"\n") else {
            return Err(match (sent, read) {
                (Err(e), _) => io_err(e),
                (Ok(()), Err(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    AgentError::ReplyTimeout {
                        path: socket.to_owned(),
                    }
                }
                (Ok(()), Err(e)) => io_err(e),
                // Closed without a full answer, or an answer too long to be the agent's.
                (Ok(()), Ok(_)) => AgentError::ReplyInvalid {
                    path: socket.to_owned(),
                    reply: shorten(&String::from_utf8_lossy(&reply)),
                },
            });
        };
        let text = String::from_utf8_lossy(text);
        if text == "OK" {
            continue;
        }
        return Err(match text.strip_prefix("ERR ") {
            Some(reason) => AgentError::LineRefused {
                line: shorten(line),
                reason: reason.to_owned(),
            },
            None => AgentError::ReplyInvalid {
                path: socket.to_owned(),
                reply: shorten(&text),
            },
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_becomes_the_line_the_agent_relays_or_its_refusal() {
        for m in [
            Message::Checkpoint("boot".into()),
            Message::Condition("ready".into(), true),
            Message::Status("disk full".into()),
            Message::Trigger,
            Message::Heartbeat,
            Message::SetTimeout(std::time::Duration::from_secs(2)),
        ] {
            let line = line_of(&m).unwrap();
            assert!(relayable(line.as_bytes()).is_ok(), "{line}");
        }
        let refusal = |m: Message| match line_of(&m) {
            Err(AgentError::LineInvalid { reason, .. }) => reason,
            other => panic!("{m:?}: {other:?}"),
        };
        assert_eq!(
            refusal(Message::Checkpoint("a b".into())),
            Refusal::NameInvalid
        );
        assert_eq!(
            refusal(Message::Condition("".into(), true)),
            Refusal::ConditionInvalid
        );
        assert_eq!(refusal(Message::Status("a\nb".into())), Refusal::Newline);
        assert_eq!(
            refusal(Message::Status("x".repeat(5000).into())),
            Refusal::LineTooLong
        );
        assert_eq!(refusal(Message::Pulse), Refusal::NotRelayed);
    }
}
