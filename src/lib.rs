//! # awd: an out-of-process Advanced Watch Dog for QEMU/KVM hosts
//!
//! awd watches heartbeat channels (a guest service, a peer VMM, a remote service) and, when a
//! channel falls silent for longer than its timeout, runs a pre-set script against a QEMU monitor
//! (typed QMP, HMP or a raw notification socket). It is QEMU's proposed `-object
//! advanced-watchdog` taken out of QEMU into its own process.
//!
//! ## Map of the crate
//!
//! The modules in dependency order: each uses only those above it, never one below, so the graph
//! has no cycles (`tests/architecture.rs` holds the tree to this table; every module may use
//! `util`). Each subsystem owns its input type (the engine its `EngineSpec`, the
//! transports their `SocketChardev`/`VsockChardev`, the actions their `Script`); `config` builds
//! them from either syntax. The guest-side pieces build without the `daemon` feature, so the
//! static guest agent stays small.
//!
//! | module | job | uses |
//! |---|---|---|
//! | [`util`] | small helpers shared by modules that must not import each other: names, error chains, log rate limits, Unix socket files | none |
//! | [`auth`] | the authenticated framing of channels with a pre-shared key: handshake, tagged frames (sans-IO) | none |
//! | [`engine`] | pure supervision: events and the current time in, status changes and the next deadline out | none |
//! | [`protocol`] | the bytes on a heartbeat channel: one message type with its decoder, encoder and mapping to engine events | engine |
//! | [`client`] | the health-monitoring API for guest programs | engine, protocol, auth |
//! | [`agent`] | the guest agent behind the `awd-agent` binary | protocol, auth |
//! | `metrics` | the Prometheus registry and per-watchdog counters; subsystems add their own collectors | engine, protocol, auth |
//! | `transport` | heartbeat channels: TCP/Unix sockets (server or client with reconnect, optionally authenticated), and awd's own vhost-user vsock device | metrics, protocol, auth |
//! | `action` | what runs on expiry: typed QMP through `qapi`, HMP lines, raw notification lines, exec commands | transport (endpoints), metrics |
//! | `config` | one validated model from the seed's `-chardev`/`-object` syntax or TOML | engine, auth, transport, action |
//! | `control` | the control socket behind `awd status`, `enable`, `disable`, `condition` | none |
//! | `daemon` | wiring: one task per watchdog, transports feeding it, action runners behind it | all of the above |
//! | `cli` | the `awd` command line | config, control, daemon, metrics |

pub mod agent;
pub mod auth;
pub mod client;
pub mod engine;
pub mod protocol;
pub mod util;

#[cfg(feature = "daemon")]
pub mod action;
#[cfg(feature = "daemon")]
pub mod cli;
#[cfg(feature = "daemon")]
pub mod config;
#[cfg(feature = "daemon")]
pub mod control;
#[cfg(feature = "daemon")]
pub mod daemon;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
#[cfg(feature = "daemon")]
pub mod metrics;
#[cfg(feature = "daemon")]
pub mod transport;
