//! Why a configuration was refused.

use crate::action::script::ScriptError;

/// Why a configuration was refused. Each message is one line and names the offending key or file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A `--chardev` or `--object` string does not parse.
    #[error("{arg}: {msg}")]
    Syntax {
        /// The argument as given (or the file and table), so the user finds it.
        arg: String,
        /// What is wrong with it, on one line.
        msg: String,
    },
    /// A record is inconsistent (both `path` and `port`, a zero timeout, …).
    #[error("{origin}: {msg}")]
    Invalid {
        /// Where the record came from (argument, or file and table).
        origin: String,
        /// What is inconsistent, naming the key.
        msg: String,
    },
    /// Two chardevs or two watchdogs share an id.
    #[error("duplicate {what} id '{id}'")]
    DuplicateId {
        /// "chardev" or "watchdog".
        what: &'static str,
        /// The id given twice.
        id: String,
    },
    /// A watchdog names a chardev that does not exist.
    #[error("watchdog '{watchdog}': {key}={id}: no chardev with id '{id}'")]
    ChardevMissing {
        /// The watchdog that names it.
        watchdog: String,
        /// `awd_node` or `notification_node`.
        key: &'static str,
        /// The chardev id it names.
        id: String,
    },
    /// Two watchdogs use the same awd_node (a chardev has one front end, as in QEMU).
    #[error("watchdog '{watchdog}': awd_node={id} is already used by watchdog '{other}'")]
    ChardevInUse {
        /// The watchdog that came second.
        watchdog: String,
        /// The chardev both name.
        id: String,
        /// The watchdog that has it already.
        other: String,
    },
    /// The opt_script could not be read or parsed.
    #[error("watchdog '{watchdog}'")]
    Script {
        /// The watchdog whose script it is.
        watchdog: String,
        /// What was wrong with the file or a line of it.
        #[source]
        source: ScriptError,
    },
    /// The TOML file could not be read.
    #[error("cannot read config file {path}")]
    FileRead {
        /// The file, as given.
        path: String,
        /// The read error.
        #[source]
        source: std::io::Error,
    },
    /// The TOML file does not parse.
    #[error("config file {path}: {msg}")]
    FileParse {
        /// The file, as given.
        path: String,
        /// The parser's message, on one line.
        msg: String,
    },
    /// Nothing to watch.
    #[error("no watchdogs configured (give --object advanced-watchdog,… or --config FILE)")]
    Empty,
}

impl ConfigError {
    /// A [`ConfigError::Syntax`] about argument `arg`.
    pub(crate) fn syntax(arg: &str, msg: impl Into<String>) -> ConfigError {
        ConfigError::Syntax {
            arg: arg.to_owned(),
            msg: msg.into(),
        }
    }

    /// A [`ConfigError::Invalid`] about the record from `origin`.
    pub(crate) fn invalid(origin: &str, msg: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            origin: origin.to_owned(),
            msg: msg.into(),
        }
    }
}
