//! The network process's socket: one JSON request line, one JSON answer
//! line (the framing of VMs' control sockets, `control::protocol`). After
//! a `join` answer the same connection carries the member's frames in the
//! [`wire`](crate::switch::wire) format until either side closes it, and
//! closing it is how a member leaves.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::view::{MemberView, NetworkView};
use crate::cli::{ForwardRule, IngressRule, MacAddress};
use crate::net::NatSnapshot;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum NetRequest {
    /// A VM joins; frames follow the answer.
    Join(JoinRequest),
    /// Everything `network show` prints.
    Status,
    /// One member's forwards and flows (`nat show` of a member VM).
    MemberNat {
        name: String,
    },
    /// A namespace joins through a TAP device the network process makes.
    Attach(AttachRequest),
    Detach {
        netns: PathBuf,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    pub name: String,
    pub mac: MacAddress,
    /// A reserved address (`run --ip`).
    pub ip: Option<Ipv4Addr>,
    pub forwards: Vec<ForwardRule>,
    /// Ingress rules (`run --ingress`): none, every connection comes in.
    #[serde(default)]
    pub ingress: Vec<IngressRule>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachRequest {
    pub netns: PathBuf,
    pub name: String,
    /// Address, prefix and default route set on the TAP by vmlab (else a
    /// DHCP client in the namespace asks for the same lease).
    pub configure: bool,
    #[serde(default)]
    pub ingress: Vec<IngressRule>,
}

/// A member's place on the network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Joined {
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum NetResponse {
    Joined(Joined),
    Status(NetworkView),
    Nat { nat: NatSnapshot },
    Attached(MemberView),
    Detached,
    Error { message: String },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::{encode, read_message};

    #[test]
    fn requests_and_answers_are_lines_of_typed_json() {
        let join = NetRequest::Join(JoinRequest {
            name: "web".into(),
            mac: "52:54:00:12:34:56".parse().unwrap(),
            ip: Some(Ipv4Addr::new(192, 168, 100, 20)),
            forwards: vec!["tcp:8080:80".parse().unwrap()],
            ingress: vec!["tcp:5432 from 192.168.100.0/24".parse().unwrap()],
        });
        for request in [
            join,
            NetRequest::Status,
            NetRequest::Detach { netns: "/x".into() },
        ] {
            let bytes = encode(&request);
            let back: NetRequest = read_message(&mut &bytes[..]).unwrap();
            assert_eq!(back, request);
        }
        let answer = NetResponse::Joined(Joined {
            ip: Ipv4Addr::new(192, 168, 100, 20),
            prefix: 24,
            gateway: Ipv4Addr::new(192, 168, 100, 1),
        });
        let bytes = encode(&answer);
        assert_eq!(
            read_message::<NetResponse>(&mut &bytes[..]).unwrap(),
            answer
        );
    }
}
