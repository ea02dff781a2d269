//! What the engine counts: frames in and out, drops by reason, flow churn.

/// Monotonic counters; read them with [`crate::net::Nat::counters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
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
}
