//! What the engine counts: frames in and out, drops by reason, flow churn.

use serde::{Deserialize, Serialize};

/// Monotonic counters; read them with [`crate::net::Nat::counters`].
/// Missing fields read as 0, so counters added later do not break older
/// readers of a snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counters {
    pub frames_from_guest: u64,
    pub frames_to_guest: u64,
    /// Frames that did not parse (bad lengths, headers, options).
    pub malformed: u64,
    /// Frames whose IPv4 or L4 checksum was wrong.
    pub bad_checksum: u64,
    /// Well-formed frames the NAT does not handle (IPv6, fragments, ...).
    pub unsupported: u64,
    /// Guest packets dropped for policy, full host sockets or a full table.
    pub dropped_from_guest: u64,
    /// Frames for the guest dropped because its queue was at its hard cap.
    pub dropped_to_guest: u64,
    /// TCP segments from the guest beyond the next expected byte.
    pub tcp_out_of_order: u64,
    /// TCP retransmissions toward the guest (timeouts and fast retransmits).
    pub tcp_retransmits: u64,
    pub flows_opened: u64,
    pub flows_closed: u64,
    /// Flows closed early to make room in a full table.
    pub flows_evicted: u64,
    /// Times TCP flows stopped reading because the NAT's buffer budget was
    /// spent.
    pub budget_waits: u64,
    /// Host sockets not opened or accepted for lack of file descriptors.
    pub fd_exhausted: u64,
    /// New flows dropped over `NatConfig::new_flows_per_sec`.
    pub rate_limited: u64,
    /// IPv4 frames for another member's MAC (flooded by a switch).
    pub not_for_gateway: u64,
}

impl Counters {
    /// Every counter with its field name, sorted by name (for listings).
    pub fn named(&self) -> Vec<(String, u64)> {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(map)) => {
                let mut named: Vec<(String, u64)> = map
                    .into_iter()
                    .filter_map(|(k, v)| v.as_u64().map(|v| (k, v)))
                    .collect();
                named.sort();
                named
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_lists_every_field_once() {
        let c = Counters {
            flows_evicted: 3,
            ..Counters::default()
        };
        let named = c.named();
        assert_eq!(named.len(), 16);
        assert!(named.contains(&("flows_evicted".to_string(), 3)));
        assert!(named.windows(2).all(|w| w[0].0 < w[1].0));
    }
}
