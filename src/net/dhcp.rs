//! The DHCP server: an address from the leases (one for `--net user`, a
//! stable one per MAC on a lab network), with the router, DNS, mask, lease
//! time, MTU, hostname and domain options.

use std::net::{Ipv4Addr, SocketAddrV4};

use smoltcp::wire::{
    DhcpMessageType, DhcpOption, DhcpPacket, DhcpRepr, EthernetAddress, DHCP_CLIENT_PORT,
    DHCP_SERVER_PORT,
};

use super::config::NatConfig;
use super::leases::Leases;
use super::output::Output;

const OPT_DNS: u8 = 6;
const OPT_HOSTNAME: u8 = 12;
const OPT_DOMAIN: u8 = 15;
const OPT_MTU: u8 = 26;
/// Room for the fixed part, our options and a generous hostname.
const MAX_REPLY: usize = 576 + 256;

/// What happened to a DHCP message, for logs and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DhcpOutcome {
    Offered,
    Acked,
    Naked,
    Released,
    Ignored,
    Malformed,
}

/// Answers one DHCP message (UDP payload to port 67) that came in a frame
/// from `sender`. A client may only ask for itself: a guest making up MACs
/// cannot drain the pool.
pub(crate) fn answer(
    cfg: &NatConfig,
    leases: &mut Leases,
    out: &mut Output,
    sender: EthernetAddress,
    payload: &[u8],
) -> DhcpOutcome {
    let Ok(packet) = DhcpPacket::new_checked(payload) else {
        return DhcpOutcome::Malformed;
    };
    let Ok(request) = DhcpRepr::parse(&packet) else {
        return DhcpOutcome::Malformed;
    };
    let mac = request.client_hardware_address;
    if mac != sender || !mac.is_unicast() {
        return DhcpOutcome::Ignored;
    }
    let Some(address) = leases.lease_for(mac) else {
        log::warn!("nat: dhcp: no address left for {mac}: the pool is exhausted");
        return DhcpOutcome::Ignored;
    };
    let (reply_type, outcome) = match request.message_type {
        DhcpMessageType::Discover => (DhcpMessageType::Offer, DhcpOutcome::Offered),
        DhcpMessageType::Request => {
            if request
                .server_identifier
                .is_some_and(|server| server != cfg.gateway)
            {
                // The client chose another server.
                return DhcpOutcome::Ignored;
            }
            let wanted = request.requested_ip.unwrap_or(request.client_ip);
            if wanted == address {
                (DhcpMessageType::Ack, DhcpOutcome::Acked)
            } else {
                (DhcpMessageType::Nak, DhcpOutcome::Naked)
            }
        }
        DhcpMessageType::Inform => (DhcpMessageType::Ack, DhcpOutcome::Acked),
        DhcpMessageType::Release => {
            crate::info_limited!("nat: dhcp: {mac} released {}", request.client_ip);
            return DhcpOutcome::Released;
        }
        DhcpMessageType::Decline => {
            crate::warn_limited!(
                "nat: dhcp: {mac} declined {address}: address in use on its link?"
            );
            return DhcpOutcome::Ignored;
        }
        _ => return DhcpOutcome::Ignored,
    };
    out.learn(address, mac);
    let nak = reply_type == DhcpMessageType::Nak;
    let inform = request.message_type == DhcpMessageType::Inform;
    let dns = cfg.dns.octets();
    let mtu = cfg.mtu.to_be_bytes();
    let name = leases
        .get(mac)
        .and_then(|l| l.name.as_deref())
        .unwrap_or(&cfg.hostname);
    let hostname = &name.as_bytes()[..name.len().min(255)];
    let mut options = vec![
        DhcpOption {
            kind: OPT_DNS,
            data: &dns,
        },
        DhcpOption {
            kind: OPT_MTU,
            data: &mtu,
        },
    ];
    if !hostname.is_empty() {
        options.push(DhcpOption {
            kind: OPT_HOSTNAME,
            data: hostname,
        });
    }
    if let Some(domain) = &cfg.domain {
        options.push(DhcpOption {
            kind: OPT_DOMAIN,
            data: domain.as_bytes(),
        });
    }
    let lease = cfg.lease_time.as_secs().min(u64::from(u32::MAX)) as u32;
    let reply = DhcpRepr {
        message_type: reply_type,
        transaction_id: request.transaction_id,
        secs: 0,
        client_hardware_address: mac,
        client_ip: if inform {
            request.client_ip
        } else {
            Ipv4Addr::UNSPECIFIED
        },
        your_ip: if nak || inform {
            Ipv4Addr::UNSPECIFIED
        } else {
            address
        },
        server_ip: cfg.gateway,
        router: (!nak).then_some(cfg.gateway),
        subnet_mask: (!nak).then_some(cfg.netmask),
        relay_agent_ip: Ipv4Addr::UNSPECIFIED,
        broadcast: request.broadcast,
        requested_ip: None,
        client_identifier: None,
        server_identifier: Some(cfg.gateway),
        parameter_request_list: None,
        dns_servers: None,
        max_size: None,
        lease_duration: (!nak && !inform).then_some(lease),
        renew_duration: (!nak && !inform).then_some(lease / 2),
        rebind_duration: (!nak && !inform).then_some(lease / 8 * 7),
        additional_options: if nak { &[] } else { &options },
    };
    let mut buf = vec![0u8; MAX_REPLY];
    let len = reply.buffer_len().min(MAX_REPLY);
    let mut packet = DhcpPacket::new_unchecked(&mut buf[..len]);
    if reply.emit(&mut packet).is_err() {
        return DhcpOutcome::Malformed;
    }
    // Clients without an address take broadcasts; ones with an address
    // (renewals) get unicast.
    let dst = if request.client_ip.is_unspecified() || nak {
        Ipv4Addr::BROADCAST
    } else {
        request.client_ip
    };
    let dst_mac = if dst == Ipv4Addr::BROADCAST {
        EthernetAddress::BROADCAST
    } else {
        mac
    };
    out.udp_to(
        dst_mac,
        SocketAddrV4::new(cfg.gateway, DHCP_SERVER_PORT),
        SocketAddrV4::new(dst, DHCP_CLIENT_PORT),
        &buf[..len],
    );
    crate::debug_limited!(
        "nat: dhcp: {:?} from {mac} -> {outcome:?}",
        request.message_type
    );
    outcome
}

#[cfg(test)]
mod tests {
    use smoltcp::wire::{DhcpPacket, DhcpRepr};

    use super::*;
    use crate::net::testkit::{dhcp_request, Harness, GUEST_MAC};

    fn request(
        kind: DhcpMessageType,
        requested: Option<Ipv4Addr>,
        server: Option<Ipv4Addr>,
    ) -> Vec<u8> {
        dhcp_request(GUEST_MAC, kind, requested, server)
    }

    fn exchange(h: &mut Harness, payload: &[u8]) -> Vec<(DhcpMessageType, Vec<u8>)> {
        let frame = h.guest.udp(
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, DHCP_CLIENT_PORT),
            SocketAddrV4::new(Ipv4Addr::BROADCAST, DHCP_SERVER_PORT),
            payload,
        );
        h.send(&frame);
        h.frames()
            .into_iter()
            .map(|seen| {
                assert_eq!(seen.src_port, DHCP_SERVER_PORT);
                assert_eq!(seen.dst_port, DHCP_CLIENT_PORT);
                let p = DhcpPacket::new_checked(&seen.payload[..]).unwrap();
                (
                    DhcpRepr::parse(&p).unwrap().message_type,
                    seen.payload.clone(),
                )
            })
            .collect()
    }

    fn option(payload: &[u8], kind: u8) -> Option<Vec<u8>> {
        let p = DhcpPacket::new_checked(payload).unwrap();
        let found = p
            .options()
            .find(|o| o.kind == kind)
            .map(|o| o.data.to_vec());
        found
    }

    #[test]
    fn discover_request_ack_with_all_options() {
        let mut h = Harness::new(NatConfig {
            hostname: "lab-vm-1".into(),
            mtu: 1400,
            ..NatConfig::default()
        });
        let replies = exchange(&mut h, &request(DhcpMessageType::Discover, None, None));
        assert_eq!(replies.len(), 1);
        let (kind, offer) = &replies[0];
        assert_eq!(*kind, DhcpMessageType::Offer);
        let p = DhcpPacket::new_checked(&offer[..]).unwrap();
        let repr = DhcpRepr::parse(&p).unwrap();
        assert_eq!(repr.your_ip, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(repr.router, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(repr.subnet_mask, Some(Ipv4Addr::new(255, 255, 255, 0)));
        assert_eq!(repr.lease_duration, Some(86400));
        assert_eq!(repr.server_identifier, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(option(offer, OPT_DNS).unwrap(), [10, 0, 2, 3]);
        assert_eq!(option(offer, OPT_MTU).unwrap(), 1400u16.to_be_bytes());
        assert_eq!(option(offer, OPT_HOSTNAME).unwrap(), b"lab-vm-1");

        let replies = exchange(
            &mut h,
            &request(
                DhcpMessageType::Request,
                Some(Ipv4Addr::new(10, 0, 2, 15)),
                Some(Ipv4Addr::new(10, 0, 2, 2)),
            ),
        );
        assert_eq!(replies[0].0, DhcpMessageType::Ack);
        // Renewal: ciaddr set, no server identifier.
        let replies = exchange(
            &mut h,
            &request(
                DhcpMessageType::Request,
                Some(Ipv4Addr::new(10, 0, 2, 15)),
                None,
            ),
        );
        assert_eq!(replies[0].0, DhcpMessageType::Ack);
    }

    #[test]
    fn wrong_address_is_naked_and_release_is_silent() {
        let mut h = Harness::new(NatConfig::default());
        let replies = exchange(
            &mut h,
            &request(
                DhcpMessageType::Request,
                Some(Ipv4Addr::new(10, 0, 2, 99)),
                None,
            ),
        );
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].0, DhcpMessageType::Nak);
        assert!(exchange(&mut h, &request(DhcpMessageType::Release, None, None)).is_empty());
        // A request aimed at another server is not ours to answer.
        let other = Some(Ipv4Addr::new(10, 0, 2, 4));
        assert!(exchange(
            &mut h,
            &request(
                DhcpMessageType::Request,
                Some(Ipv4Addr::new(10, 0, 2, 15)),
                other
            )
        )
        .is_empty());
    }

    #[test]
    fn a_guest_repeating_itself_gets_a_few_log_lines() {
        let mut h = Harness::new(NatConfig::default());
        let decline = request(DhcpMessageType::Decline, None, None);
        let discover = request(DhcpMessageType::Discover, None, None);
        let lines = crate::logging::capture::lines(|| {
            for _ in 0..200 {
                exchange(&mut h, &decline);
                exchange(&mut h, &discover);
            }
        });
        let dhcp: Vec<_> = lines.iter().filter(|l| l.contains("dhcp:")).collect();
        let burst = crate::rate_limit::LOG_BURST as usize;
        assert_eq!(dhcp.len(), 2 * burst, "{dhcp:#?}");
    }

    #[test]
    fn garbage_is_ignored() {
        let mut h = Harness::new(NatConfig::default());
        assert!(exchange(&mut h, &[1, 2, 3]).is_empty());
        assert!(exchange(&mut h, &[0u8; 300]).is_empty());
    }
}
