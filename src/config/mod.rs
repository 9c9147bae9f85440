//! One validated configuration model, whichever syntax it came from.
//!
//! The seed's `-chardev`/`-object` syntax ([`seed`]) and the TOML file ([`file`](mod@file))
//! both produce raw, unchecked records ([`RawChardev`], [`RawWatchdog`]). [`Config::build`]
//! checks them together and resolves them into [`Config`], which is all the daemon ever sees.
//! `awd check` and `awd run` go through the same function, so a config that checks is a config
//! that runs.
//!
//! | file | holds |
//! |---|---|
//! | `raw.rs` | the unchecked records ([`RawConfig`], [`RawChardev`], [`RawWatchdog`], [`RawStep`], [`RawObject`]) |
//! | [`seed`], [`file`](mod@file) | the two parsers that fill them |
//! | [`supervision`] | the TOML supervision tables and the [`EngineSpec`](crate::engine::EngineSpec) built from them |
//! | `build.rs` | [`Config::build`] and its checks |
//! | `model.rs` | the checked model ([`Config`], [`Chardev`], [`WatchdogConfig`], [`Role`], [`EscalationStep`]) and what `awd check` prints of it |
//! | `error.rs` | [`ConfigError`], one line per refusal |
//!
//! The socket and vsock endpoint types ([`SocketChardev`](crate::transport::SocketChardev),
//! [`VsockChardev`](crate::transport::VsockChardev)) and their limits belong to the transport;
//! this module only builds them.

mod build;
mod error;
pub mod file;
mod model;
mod raw;
pub mod seed;
pub mod supervision;

pub use error::ConfigError;
pub use model::{Chardev, Config, EscalationStep, Role, WatchdogConfig};
pub use raw::{RawChardev, RawConfig, RawObject, RawStep, RawWatchdog};
