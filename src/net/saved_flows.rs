//! What a NAT's flows leave behind when its VM is suspended. The flows
//! themselves cannot be carried over (their host sockets end with the
//! process), so a resumed VM's NAT starts empty and resets, in the guest,
//! every TCP flow the old one had: the guest's connections end at once
//! with "connection reset" instead of hanging on a peer that is gone.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use smoltcp::wire::EthernetAddress;

use super::engine::Nat;
use super::flow_table::Flow;
use super::tcp::{reset_guest, TcpReset};

/// The TCP flows a NAT had toward its guests, and where those guests are
/// on the link (a resumed NAT has not heard from them yet).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedFlows {
    pub neighbors: Vec<(Ipv4Addr, [u8; 6])>,
    pub tcp: Vec<TcpReset>,
}

impl Nat {
    /// Its TCP flows as a suspend saves them.
    pub fn saved_flows(&self) -> SavedFlows {
        let tcp: Vec<TcpReset> = self
            .table
            .iter()
            .filter_map(|flow| match flow {
                Flow::Tcp(f) => f.reset_point(),
                _ => None,
            })
            .collect();
        let mut neighbors: Vec<(Ipv4Addr, [u8; 6])> = tcp
            .iter()
            .filter_map(|f| Some((*f.guest.ip(), self.out.neighbor(*f.guest.ip())?.0)))
            .collect();
        neighbors.sort();
        neighbors.dedup();
        SavedFlows { neighbors, tcp }
    }

    /// Queues a reset toward the guest for each flow of a NAT before this
    /// one (see [`Nat::saved_flows`]).
    pub fn reset_saved_flows(&mut self, saved: &SavedFlows) {
        for &(ip, mac) in &saved.neighbors {
            if self.out.neighbor(ip).is_none() {
                self.out.learn(ip, EthernetAddress(mac));
            }
        }
        for flow in &saved.tcp {
            log::debug!(
                "nat: tcp {} -> {}: reset, the VM was resumed",
                flow.guest,
                flow.remote
            );
            reset_guest(&mut self.out, flow);
        }
    }
}
