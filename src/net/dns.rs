//! The gateway's own DNS answers: on a lab network each member's name and
//! NAME.NETWORK resolve to its address. Queries for other names are the
//! relay's (to the host's resolvers), or refused where nothing may leave.
//!
//! Only what a resolver asks is handled: one question, class IN; an A query
//! for a known name gets one record, any other type for it an empty answer
//! (so a resolver asking AAAA first moves on at once), and an unknown name
//! inside the network's domain NXDOMAIN. Parsing uses smoltcp's DNS wire
//! format.

use std::net::Ipv4Addr;

use smoltcp::wire::{DnsFlags, DnsOpcode, DnsPacket, DnsQueryType, DnsQuestion, DnsRcode};

/// How long answers may be cached: members come and go.
const TTL: u32 = 10;
const HEADER_LEN: usize = 12;
/// Longest name considered (RFC 1035 limits names to 255 bytes).
const MAX_NAME: usize = 255;

/// What to do with a query.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Send this reply to the guest.
    Reply(Vec<u8>),
    /// Not a local name: relay it (if the NAT may).
    Relay,
    /// Not even a query: drop it.
    Malformed,
}

/// Where local names come from.
pub(crate) struct Zone<'a> {
    /// The network's name: NAME.DOMAIN is NAME.
    pub domain: Option<&'a str>,
    /// A member's address by its name.
    pub lookup: &'a dyn Fn(&str) -> Option<Ipv4Addr>,
    /// Nothing leaves the network (`--no-nat`): unknown names are refused
    /// here instead of relayed.
    pub closed: bool,
}

/// Decides on one query (a UDP payload sent to the DNS address, port 53).
pub(crate) fn decide(query: &[u8], zone: &Zone<'_>) -> Decision {
    let Ok(packet) = DnsPacket::new_checked(query) else {
        return Decision::Malformed;
    };
    if packet.flags().contains(DnsFlags::RESPONSE)
        || packet.opcode() != DnsOpcode::Query
        || packet.question_count() != 1
    {
        return Decision::Malformed;
    }
    let Ok((_, question)) = DnsQuestion::parse(packet.payload()) else {
        return Decision::Malformed;
    };
    let Some(name) = dotted(&packet, question.name) else {
        return Decision::Malformed;
    };
    let local = match zone.domain {
        Some(domain) => match name.strip_suffix(domain) {
            Some("") => Some(None),
            Some(rest) => rest.strip_suffix('.').map(Some),
            None => None,
        },
        None => None,
    };
    let member = match local {
        // Under the network's domain: ours to answer, known or not.
        Some(Some(label)) if !label.contains('.') => (zone.lookup)(label),
        Some(_) => None,
        // A bare name may be a member's.
        None if !name.contains('.') => match (zone.lookup)(&name) {
            Some(ip) => Some(ip),
            None if zone.closed => None,
            None => return Decision::Relay,
        },
        None if zone.closed => None,
        None => return Decision::Relay,
    };
    let rcode = match member {
        Some(_) => DnsRcode::NoError,
        None if zone.closed && local.is_none() => DnsRcode::Refused,
        None => DnsRcode::NXDomain,
    };
    let address = member.filter(|_| question.type_ == DnsQueryType::A);
    Decision::Reply(reply(&packet, &question, rcode, address))
}

/// The question's name, lowercase, without the final dot.
fn dotted<T: AsRef<[u8]>>(packet: &DnsPacket<T>, raw: &[u8]) -> Option<String> {
    let mut name = String::new();
    for label in packet.parse_name(raw) {
        let label = std::str::from_utf8(label.ok()?).ok()?;
        if !name.is_empty() {
            name.push('.');
        }
        name.push_str(&label.to_ascii_lowercase());
        if name.len() > MAX_NAME {
            return None;
        }
    }
    Some(name)
}

fn reply<T: AsRef<[u8]>>(
    query: &DnsPacket<T>,
    question: &DnsQuestion<'_>,
    rcode: DnsRcode,
    address: Option<Ipv4Addr>,
) -> Vec<u8> {
    let question_len = question.buffer_len();
    let mut buf = vec![0u8; HEADER_LEN + question_len + if address.is_some() { 16 } else { 0 }];
    {
        let mut packet = DnsPacket::new_unchecked(&mut buf[..]);
        packet.set_transaction_id(query.transaction_id());
        let recursion = query.flags() & DnsFlags::RECURSION_DESIRED;
        packet.set_flags(
            DnsFlags::RESPONSE
                | DnsFlags::AUTHORITATIVE
                | DnsFlags::RECURSION_AVAILABLE
                | recursion,
        );
        packet.set_opcode(DnsOpcode::Query);
        packet.set_question_count(1);
        packet.set_answer_record_count(u16::from(address.is_some()));
        question.emit(&mut packet.payload_mut()[..question_len]);
    }
    // The response code: the low four bits of the flags (smoltcp has no
    // setter for it).
    buf[3] = (buf[3] & 0xf0) | (u8::from(rcode) & 0x0f);
    if let Some(ip) = address {
        let at = HEADER_LEN + question_len;
        // Name: a pointer to the question's, at the end of the header.
        buf[at..at + 2].copy_from_slice(&[0xc0, HEADER_LEN as u8]);
        buf[at + 2..at + 4].copy_from_slice(&1u16.to_be_bytes()); // A
        buf[at + 4..at + 6].copy_from_slice(&1u16.to_be_bytes()); // IN
        buf[at + 6..at + 10].copy_from_slice(&TTL.to_be_bytes());
        buf[at + 10..at + 12].copy_from_slice(&4u16.to_be_bytes());
        buf[at + 12..at + 16].copy_from_slice(&ip.octets());
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::testkit::dns_query as query;

    fn lookup(name: &str) -> Option<Ipv4Addr> {
        (name == "db").then_some(Ipv4Addr::new(192, 168, 100, 20))
    }

    fn zone(closed: bool) -> Zone<'static> {
        Zone {
            domain: Some("lab"),
            lookup: &lookup,
            closed,
        }
    }

    fn answer(reply: &[u8]) -> (DnsRcode, Option<[u8; 4]>) {
        let p = DnsPacket::new_checked(reply).unwrap();
        assert!(p.flags().contains(DnsFlags::RESPONSE));
        assert_eq!(p.transaction_id(), 0x1234);
        let ip = (p.answer_record_count() == 1).then(|| {
            let n = reply.len();
            [reply[n - 4], reply[n - 3], reply[n - 2], reply[n - 1]]
        });
        (p.rcode(), ip)
    }

    #[test]
    fn members_resolve_by_name_and_name_dot_network() {
        for name in ["db", "db.lab", "DB.Lab"] {
            let Decision::Reply(r) = decide(&query(name, 1), &zone(false)) else {
                panic!("{name} not answered")
            };
            assert_eq!(answer(&r), (DnsRcode::NoError, Some([192, 168, 100, 20])));
        }
        // AAAA for a member: no records, no error.
        let Decision::Reply(r) = decide(&query("db.lab", 28), &zone(false)) else {
            panic!()
        };
        assert_eq!(answer(&r), (DnsRcode::NoError, None));
    }

    #[test]
    fn other_names_are_relayed_or_refused_when_closed() {
        assert_eq!(
            decide(&query("example.com", 1), &zone(false)),
            Decision::Relay
        );
        assert_eq!(decide(&query("web", 1), &zone(false)), Decision::Relay);
        let Decision::Reply(r) = decide(&query("web.lab", 1), &zone(false)) else {
            panic!()
        };
        assert_eq!(answer(&r).0, DnsRcode::NXDomain);
        let Decision::Reply(r) = decide(&query("example.com", 1), &zone(true)) else {
            panic!()
        };
        assert_eq!(answer(&r).0, DnsRcode::Refused);
    }

    #[test]
    fn garbage_is_malformed() {
        assert_eq!(decide(&[1, 2, 3], &zone(false)), Decision::Malformed);
        let mut loop_ = query("db", 1);
        loop_[12] = 0xc0;
        loop_[13] = 12;
        assert_eq!(decide(&loop_, &zone(false)), Decision::Malformed);
        let mut answer_ = query("db", 1);
        answer_[2] |= 0x80;
        assert_eq!(decide(&answer_, &zone(false)), Decision::Malformed);
    }
}
