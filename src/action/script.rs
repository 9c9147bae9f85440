//! The seed's opt-script: the lines a watchdog sends to its notification node on expiry.
//!
//! A script is a list of lines, one command each, as an operator would type them at an HMP
//! prompt (`quit`, `x_colo_lost_heartbeat`, `nbd_server_stop`). Blank lines and `#` comments are
//! skipped. Lines awd knows are mapped to typed QMP commands from the `qapi` crate, so a QMP
//! monitor receives exactly the command QEMU's schema defines; other lines go through
//! `human-monitor-command` on QMP, and are written as they are to HMP and raw sockets.

use std::fmt;
use std::path::Path;

use serde::Serialize;

/// The script lines awd sends as typed QMP commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TypedCommand {
    /// `quit`: QEMU exits.
    Quit,
    /// `x-colo-lost-heartbeat`: COLO failover.
    XColoLostHeartbeat,
    /// `nbd-server-stop`: stop the NBD server (the COLO secondary's disk replication).
    NbdServerStop,
    /// `stop`: pause the VM.
    Stop,
    /// `cont`: resume the VM.
    Cont,
    /// `system_reset`: reset the VM.
    SystemReset,
    /// `system_powerdown`: ACPI power button.
    SystemPowerdown,
}

impl TypedCommand {
    /// Every typed command, for tests and help texts.
    pub const ALL: [TypedCommand; 7] = [
        TypedCommand::Quit,
        TypedCommand::XColoLostHeartbeat,
        TypedCommand::NbdServerStop,
        TypedCommand::Stop,
        TypedCommand::Cont,
        TypedCommand::SystemReset,
        TypedCommand::SystemPowerdown,
    ];

    /// Maps a script line to a typed command. The HMP spelling (`x_colo_lost_heartbeat`) and the
    /// QMP spelling (`x-colo-lost-heartbeat`) are both accepted; a line with arguments is not a
    /// typed command.
    pub fn from_line(line: &str) -> Option<TypedCommand> {
        let normalized = line.trim().replace('_', "-");
        Some(match normalized.as_str() {
            "quit" | "q" => TypedCommand::Quit,
            "x-colo-lost-heartbeat" => TypedCommand::XColoLostHeartbeat,
            "nbd-server-stop" => TypedCommand::NbdServerStop,
            "stop" => TypedCommand::Stop,
            "cont" | "c" => TypedCommand::Cont,
            "system-reset" => TypedCommand::SystemReset,
            "system-powerdown" => TypedCommand::SystemPowerdown,
            _ => return None,
        })
    }

    /// The QMP command name, as QEMU's schema spells it.
    pub fn qmp_name(self) -> &'static str {
        use qapi::Command;
        use qapi::qmp;
        match self {
            TypedCommand::Quit => qmp::quit::NAME,
            TypedCommand::XColoLostHeartbeat => qmp::x_colo_lost_heartbeat::NAME,
            TypedCommand::NbdServerStop => qmp::nbd_server_stop::NAME,
            TypedCommand::Stop => qmp::stop::NAME,
            TypedCommand::Cont => qmp::cont::NAME,
            TypedCommand::SystemReset => qmp::system_reset::NAME,
            TypedCommand::SystemPowerdown => qmp::system_powerdown::NAME,
        }
    }
}

/// One script line, with its typed mapping if it has one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ScriptLine {
    /// The line as written (trimmed).
    pub text: String,
    /// The typed QMP command it maps to; `None` goes through `human-monitor-command`.
    pub typed: Option<TypedCommand>,
}

/// A parsed opt-script.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Script {
    /// The lines, in the order they run.
    pub lines: Vec<ScriptLine>,
}

/// Why a script could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    /// The script file could not be read.
    #[error("cannot read opt_script {path}")]
    Read {
        /// The file.
        path: String,
        /// The read error (missing file, no permission).
        #[source]
        source: std::io::Error,
    },
    /// A line holds a control character (only printable text can be sent to a monitor).
    #[error("opt_script {origin}, line {line}: control character in a command")]
    ControlCharacter {
        /// The file or "inline".
        origin: String,
        /// 1-based line number.
        line: usize,
    },
}

impl Script {
    /// Parses script text. `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Script, ScriptError> {
        let mut lines = Vec::new();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line.chars().any(char::is_control) {
                return Err(ScriptError::ControlCharacter {
                    origin: origin.into(),
                    line: n + 1,
                });
            }
            lines.push(ScriptLine {
                text: line.to_owned(),
                typed: TypedCommand::from_line(line),
            });
        }
        Ok(Script { lines })
    }

    /// Reads and parses a script file.
    pub fn load(path: &Path) -> Result<Script, ScriptError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScriptError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Script::parse(&text, &path.display().to_string())
    }

    /// Whether the script has no lines.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }
}

impl fmt::Display for Script {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, line) in self.lines.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            match line.typed {
                Some(t) => write!(f, "{} (QMP {})", line.text, t.qmp_name())?,
                None => write!(f, "{} (HMP)", line.text)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seeds_scripts_map_to_typed_commands() {
        let s = Script::parse(
            "# COLO secondary\nnbd_server_stop\n\nx_colo_lost_heartbeat\n",
            "t",
        )
        .unwrap();
        let typed: Vec<_> = s.lines.iter().map(|l| l.typed).collect();
        assert_eq!(
            typed,
            vec![
                Some(TypedCommand::NbdServerStop),
                Some(TypedCommand::XColoLostHeartbeat)
            ]
        );
    }

    #[test]
    fn every_typed_command_exists_in_the_qapi_schema_types() {
        // The names come from qapi-qmp's generated types: if a command were missing there, this
        // would not compile, and the script line would have to fall back to a raw `execute`.
        let names: Vec<_> = TypedCommand::ALL.iter().map(|c| c.qmp_name()).collect();
        assert_eq!(
            names,
            [
                "quit",
                "x-colo-lost-heartbeat",
                "nbd-server-stop",
                "stop",
                "cont",
                "system_reset",
                "system_powerdown"
            ]
        );
    }

    #[test]
    fn lines_with_arguments_go_through_hmp() {
        let s = Script::parse("info status\nsystem_reset\n", "t").unwrap();
        assert_eq!(s.lines[0].typed, None);
        assert_eq!(s.lines[1].typed, Some(TypedCommand::SystemReset));
        assert_eq!(
            s.to_string(),
            "info status (HMP); system_reset (QMP system_reset)"
        );
    }

    #[test]
    fn control_characters_are_refused() {
        let err = Script::parse("quit\nfoo\u{1b}bar\n", "x.script").unwrap_err();
        assert_eq!(
            err.to_string(),
            "opt_script x.script, line 2: control character in a command"
        );
    }
}
