//! The vsock devices' counters in the Prometheus exposition.
//!
//! The device thread bumps plain atomics ([`VsockCounters`]); this collector reads them at each
//! scrape, labelled with the device's vhost-user socket path. It lives with the device, as
//! Firecracker keeps device metrics in the device's module, so the metrics registry knows
//! nothing of vsock and the two modules do not import each other.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::stats::{Malformed, VsockCounters};

/// The running vsock devices whose counters each scrape exports. Clones share one set: the
/// daemon keeps one to add and remove devices, the registry holds another.
#[derive(Debug, Clone, Default)]
pub struct VsockCollector {
    by_path: Arc<Mutex<BTreeMap<String, Arc<VsockCounters>>>>,
}

impl VsockCollector {
    /// Exports a device's counters, labelled with its socket path.
    pub fn add(&self, path: &str, counters: Arc<VsockCounters>) {
        self.lock().insert(path.into(), counters);
    }

    /// Stops exporting a device's counters (the device was removed by a reload).
    pub fn remove(&self, path: &str) {
        self.lock().remove(path);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<VsockCounters>>> {
        self.by_path.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabels {
    device: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceDirLabels {
    device: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceReasonLabels {
    device: String,
    reason: &'static str,
}

/// Encodes one family under `name` with its help text.
fn put<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    family: &M,
) -> Result<(), std::fmt::Error> {
    family.encode(encoder.encode_descriptor(name, help, None, family.metric_type())?)
}

impl Collector for VsockCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counter = Family::<DeviceLabels, Counter>::default;
        let (frontends, connections, refused, resets) =
            (counter(), counter(), counter(), counter());
        let (credit_updates, events_dropped, control_dropped) = (counter(), counter(), counter());
        let frontends_refused = counter();
        let open = Family::<DeviceLabels, Gauge>::default();
        let packets = Family::<DeviceDirLabels, Counter>::default();
        let bytes = Family::<DeviceDirLabels, Counter>::default();
        let malformed = Family::<DeviceReasonLabels, Counter>::default();
        for (path, c) in self.lock().iter() {
            let st = c.snapshot();
            let d = DeviceLabels {
                device: path.clone(),
            };
            frontends.get_or_create(&d).inc_by(st.frontends);
            frontends_refused
                .get_or_create(&d)
                .inc_by(st.frontends_refused);
            connections.get_or_create(&d).inc_by(st.connections_opened);
            open.get_or_create(&d).set(st.connections_open as i64);
            refused.get_or_create(&d).inc_by(st.connections_refused);
            resets.get_or_create(&d).inc_by(st.resets_sent);
            credit_updates
                .get_or_create(&d)
                .inc_by(st.credit_updates_sent);
            events_dropped.get_or_create(&d).inc_by(st.events_dropped);
            control_dropped.get_or_create(&d).inc_by(st.control_dropped);
            for (direction, p, b) in [
                ("from_guest", st.packets_from_guest, st.bytes_from_guest),
                ("to_guest", st.packets_to_guest, st.bytes_to_guest),
            ] {
                let l = DeviceDirLabels {
                    device: path.clone(),
                    direction,
                };
                packets.get_or_create(&l).inc_by(p);
                bytes.get_or_create(&l).inc_by(b);
            }
            for r in Malformed::ALL {
                malformed
                    .get_or_create(&DeviceReasonLabels {
                        device: path.clone(),
                        reason: r.as_str(),
                    })
                    .inc_by(st.malformed(r));
            }
        }
        let e = &mut encoder;
        put(
            e,
            "vsock_frontends",
            "QEMU frontends served (each connect of QEMU to the socket)",
            &frontends,
        )?;
        put(
            e,
            "vsock_frontends_refused",
            "QEMU connections closed at once: the peer process is not the peer-uid/peer-gid asked for",
            &frontends_refused,
        )?;
        put(
            e,
            "vsock_connections",
            "Guest vsock connections accepted",
            &connections,
        )?;
        put(
            e,
            "vsock_connections_open",
            "Guest vsock connections open",
            &open,
        )?;
        put(
            e,
            "vsock_connections_refused",
            "Guest connection requests answered with a reset",
            &refused,
        )?;
        put(e, "vsock_packets", "Packets on the virtqueues", &packets)?;
        put(e, "vsock_bytes", "Payload bytes on the virtqueues", &bytes)?;
        put(
            e,
            "vsock_resets",
            "OP_RST packets sent to the guest",
            &resets,
        )?;
        put(
            e,
            "vsock_credit_updates",
            "OP_CREDIT_UPDATE packets sent to the guest",
            &credit_updates,
        )?;
        put(
            e,
            "vsock_events_dropped",
            "Signals counted as plain heartbeats because a watchdog's channel stayed full",
            &events_dropped,
        )?;
        put(
            e,
            "vsock_control_dropped",
            "Control packets dropped because the guest posted no rx buffers",
            &control_dropped,
        )?;
        put(
            e,
            "vsock_malformed",
            "Malformed guest input, by reason",
            &malformed,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    #[test]
    fn every_device_counter_is_exported_and_a_removed_device_is_not() {
        let m = Metrics::new();
        let collector = VsockCollector::default();
        m.register_collector(Box::new(collector.clone()));
        let counters = Arc::new(VsockCounters::default());
        counters.malformed(Malformed::BadLen);
        collector.add("/run/vm1.sock", counters);
        let text = m.encode();
        for family in [
            "awd_vsock_frontends_total",
            "awd_vsock_frontends_refused_total",
            "awd_vsock_connections_total",
            "awd_vsock_connections_open",
            "awd_vsock_connections_refused_total",
            "awd_vsock_packets_total",
            "awd_vsock_bytes_total",
            "awd_vsock_resets_total",
            "awd_vsock_credit_updates_total",
            "awd_vsock_events_dropped_total",
            "awd_vsock_control_dropped_total",
        ] {
            assert!(
                text.contains(&format!("{family}{{device=\"/run/vm1.sock\"")),
                "missing {family} in\n{text}"
            );
        }
        assert!(
            text.contains(
                "awd_vsock_malformed_total{device=\"/run/vm1.sock\",reason=\"bad_len\"} 1"
            )
        );
        collector.remove("/run/vm1.sock");
        assert!(!m.encode().contains("vm1.sock"));
    }
}
