//! # awd: an out-of-process Advanced Watch Dog for QEMU/KVM hosts
//!
//! awd watches heartbeat channels (a guest service, a peer VMM, a remote service) and, when a
//! channel falls silent for longer than its timeout, runs a pre-set script against a QEMU monitor
//! (typed QMP, HMP or a raw notification socket). It is QEMU's proposed `-object
//! advanced-watchdog` taken out of QEMU into its own process.
//!
//! ## Map of the crate
//!
//! The guest-side pieces build without the `daemon` feature, so the static guest agent stays small.
//!
//! | module | job |
//! |---|---|
//! | [`protocol`] | the bytes on a heartbeat channel: line protocol, AWD pulse frames, decoder |
//! | [`engine`] | pure supervision: events and the current time in, status changes and the next deadline out |
//! | [`agent`] | the guest agent behind the `awd-agent` binary |
//! | [`client`] | the health-monitoring API for guest programs |
//! | `config` | one validated model from the seed's `-chardev`/`-object` syntax or TOML |
//! | `transport` | heartbeat channels: TCP/Unix sockets (server or client with reconnect), and awd's own vhost-user vsock device |
//! | `action` | what runs on expiry: typed QMP through `qapi`, HMP lines, raw notification lines |
//! | `daemon` | wiring: one task per watchdog, transports feeding it, action runners behind it |
//! | `metrics` | counters shared by the daemon's parts, exposed for Prometheus |
//! | `control` | the control socket behind `awd status`, `enable`, `disable`, `condition` |
//! | `cli` | the `awd` command line |

pub mod agent;
pub mod client;
pub mod engine;
pub mod protocol;

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
#[cfg(feature = "daemon")]
pub mod metrics;
#[cfg(feature = "daemon")]
pub mod transport;
