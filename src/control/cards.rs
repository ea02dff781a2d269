//! A VM's network cards: one virtio-net card per `--net`, eth0, eth1, ...
//! in the order given. The per-card options (`--mac`, `--forward`, `--ip`,
//! `--ingress`)
//! apply to the card of the closest `--net` before them; before the first
//! `--net` (or without any), to the first card.

use std::net::Ipv4Addr;

use super::error::{ControlError, Result};
use super::settings::NetChoice;
use crate::cli::{ForwardRule, IngressRule, MacAddress};

/// Most cards a VM may have: each takes a virtio-mmio slot and an
/// interrupt line, which disks and the RNG need too.
pub const MAX_CARDS: usize = 8;

/// One card: what it is on and its own options.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CardSettings {
    pub net: NetChoice,
    /// None: derived from the VM's name and the card's place (see
    /// [`card_macs`]).
    pub mac: Option<[u8; 6]>,
    /// Host ports forwarded to this card's address (bound by its NAT).
    pub forwards: Vec<ForwardRule>,
    /// A reserved address on the card's lab network.
    pub ip: Option<Ipv4Addr>,
    /// What may open connections toward the card on its lab network.
    pub ingress: Vec<IngressRule>,
}

/// The per-card options of one `run` command line, each with the position
/// clap saw it at (`ArgMatches::indices_of`).
#[derive(Clone, Debug, Default)]
pub struct CardFlags {
    pub nets: Vec<(usize, NetChoice)>,
    pub macs: Vec<(usize, MacAddress)>,
    pub forwards: Vec<(usize, ForwardRule)>,
    pub ips: Vec<(usize, Ipv4Addr)>,
    pub ingress: Vec<(usize, IngressRule)>,
}

impl CardFlags {
    /// Which card an option at command-line position `at` belongs to.
    pub fn card_of(&self, at: usize) -> usize {
        let before = self.nets.iter().filter(|(n, _)| *n < at).count();
        before.saturating_sub(1)
    }

    /// The cards the VM gets: the command line's over `saved` (a named
    /// VM's). With `--net`, the card list is the one given, each card
    /// keeping its saved MAC and (on a NAT) its saved forwards unless the
    /// command line gives its own; without, the options change the saved
    /// cards.
    pub fn apply(&self, saved: Vec<CardSettings>) -> Result<Vec<CardSettings>> {
        let mut cards = if self.nets.is_empty() {
            saved.clone()
        } else {
            self.given_cards()?
        };
        let count = cards.len().max(1);
        let mut macs = vec![None; count];
        let mut forwards = vec![Vec::new(); count];
        let mut ips = vec![None; count];
        let mut ingress = vec![Vec::new(); count];
        for (at, mac) in &self.macs {
            let card = self.card_of(*at);
            if macs[card].replace(mac.octets()).is_some() {
                return Err(refused(format!(
                    "--mac given twice for eth{card}: give one --mac after each --net"
                )));
            }
        }
        for (at, rule) in &self.forwards {
            forwards[self.card_of(*at)].push(*rule);
        }
        for (at, rule) in &self.ingress {
            ingress[self.card_of(*at)].push(*rule);
        }
        for (at, ip) in &self.ips {
            let card = self.card_of(*at);
            if ips[card].replace(*ip).is_some() {
                return Err(refused(format!(
                    "--ip given twice for eth{card}: a card has one address"
                )));
            }
        }
        if cards.is_empty() {
            if !self.forwards.is_empty()
                || !self.macs.is_empty()
                || !self.ips.is_empty()
                || !self.ingress.is_empty()
            {
                return Err(refused(
                    "--forward, --mac, --ip and --ingress need a network card: drop them or --net none"
                        .to_string(),
                ));
            }
            return Ok(cards);
        }
        let replaced = !self.nets.is_empty();
        for (index, card) in cards.iter_mut().enumerate() {
            let before = saved.get(index);
            card.mac = macs[index].or(if replaced {
                before.and_then(|c| c.mac)
            } else {
                card.mac
            });
            if !forwards[index].is_empty() {
                card.forwards = std::mem::take(&mut forwards[index]);
            } else if replaced && card.net.has_nat() {
                card.forwards = before.map(|c| c.forwards.clone()).unwrap_or_default();
            }
            if ips[index].is_some() || replaced {
                card.ip = ips[index];
            }
            if !ingress[index].is_empty() {
                card.ingress = std::mem::take(&mut ingress[index]);
            } else if replaced {
                // A card on the same network as before keeps its rules.
                card.ingress = before
                    .filter(|c| c.net == card.net)
                    .map(|c| c.ingress.clone())
                    .unwrap_or_default();
            }
        }
        Ok(cards)
    }

    /// The cards `--net` names, in order; `none` stands alone.
    fn given_cards(&self) -> Result<Vec<CardSettings>> {
        if self.nets.iter().any(|(_, n)| *n == NetChoice::None) {
            if self.nets.len() > 1 {
                return Err(refused(
                    "--net none means no card at all: drop it or the other --net".to_string(),
                ));
            }
            return Ok(Vec::new());
        }
        Ok(self
            .nets
            .iter()
            .map(|(_, net)| CardSettings {
                net: net.clone(),
                ..CardSettings::default()
            })
            .collect())
    }
}

/// Refuses a set of cards that cannot work together, in one line.
pub fn check_cards(cards: &[CardSettings]) -> Result<()> {
    if cards.len() > MAX_CARDS {
        return Err(refused(format!(
            "{} network cards asked for, at most {MAX_CARDS} fit: give fewer --net",
            cards.len()
        )));
    }
    for (index, card) in cards.iter().enumerate() {
        let same = cards[..index].iter().position(|c| c.net == card.net);
        match (&card.net, same) {
            (NetChoice::None, _) => {
                return Err(refused(
                    "--net none means no card at all: drop it or the other --net".to_string(),
                ))
            }
            (NetChoice::User, Some(first)) => {
                return Err(refused(format!(
                    "--net user is given for eth{first} and eth{index}: a VM has one card behind its own NAT (both would be 10.0.2.15); use a lab network for the others"
                )))
            }
            (NetChoice::Lab(name), Some(first)) => {
                return Err(refused(format!(
                    "--net {name} is given for eth{first} and eth{index}: a VM has one card on a network"
                )))
            }
            (NetChoice::Tap(dev), Some(first)) => {
                return Err(refused(format!(
                    "--net tap:{dev} is given for eth{first} and eth{index}: a TAP device serves one card"
                )))
            }
            _ => {}
        }
        if card.ip.is_some() && !matches!(card.net, NetChoice::Lab(_)) {
            return Err(refused(format!(
                "--ip is an address on a lab network, and eth{index} is on {}: add --net NETWORK before it (see vmlab network ls)",
                card.net
            )));
        }
        if !card.ingress.is_empty() && !matches!(card.net, NetChoice::Lab(_)) {
            return Err(refused(format!(
                "--ingress guards a card on a lab network, and eth{index} is on {}: put it after --net NETWORK (with --net user only the --forwards you give reach the VM)",
                card.net
            )));
        }
        if let (NetChoice::Tap(dev), false) = (&card.net, card.forwards.is_empty()) {
            return Err(refused(format!(
                "--forward on eth{index} (tap:{dev}): a TAP card is bridged, with no NAT to forward through; reach the guest at its own address, or put the --forward after a user or network card"
            )));
        }
    }
    Ok(())
}

/// Each card's MAC: its own, else derived from the VM's name (the first
/// card as it always was, the others from the name and the card's place),
/// stable across runs and distinct within the VM.
pub fn card_macs(name: &str, cards: &[CardSettings]) -> Result<Vec<MacAddress>> {
    let mut macs: Vec<MacAddress> = Vec::with_capacity(cards.len());
    for (index, card) in cards.iter().enumerate() {
        let mac = match card.mac {
            Some(mac) => {
                let mac = MacAddress(mac);
                if let Some(other) = macs.iter().position(|m| *m == mac) {
                    return Err(refused(format!(
                        "eth{other} and eth{index} both have MAC {mac}: give each card its own --mac"
                    )));
                }
                mac
            }
            None => derived_card_mac(name, index, &macs, cards),
        };
        macs.push(mac);
    }
    Ok(macs)
}

fn derived_card_mac(
    name: &str,
    index: usize,
    taken: &[MacAddress],
    cards: &[CardSettings],
) -> MacAddress {
    let explicit: Vec<MacAddress> = cards.iter().filter_map(|c| c.mac.map(MacAddress)).collect();
    let free = |mac: &MacAddress| !taken.contains(mac) && !explicit.contains(mac);
    // '#' never appears in a VM name, so no other VM's first card shares
    // these; a collision in 24 bits moves on to the next candidate.
    let mut candidate = match index {
        0 => MacAddress::for_vm(name),
        _ => MacAddress::for_vm(&format!("{name}#eth{index}")),
    };
    let mut attempt = 0u32;
    while !free(&candidate) {
        attempt += 1;
        candidate = MacAddress::for_vm(&format!("{name}#eth{index}#{attempt}"));
    }
    candidate
}

fn refused(message: String) -> ControlError {
    ControlError::Refused(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lab(name: &str) -> NetChoice {
        NetChoice::Lab(name.into())
    }

    fn card(net: NetChoice) -> CardSettings {
        CardSettings {
            net,
            ..CardSettings::default()
        }
    }

    fn rule(text: &str) -> ForwardRule {
        text.parse().unwrap()
    }

    #[test]
    fn options_belong_to_the_card_they_follow() {
        // run --forward tcp:2222:22 --net user --mac M1 --net lab --forward tcp:8080:80 --ip X --net dmz
        let flags = CardFlags {
            nets: vec![(2, NetChoice::User), (6, lab("lab")), (12, lab("dmz"))],
            macs: vec![(4, "52:54:00:00:00:01".parse().unwrap())],
            forwards: vec![(0, rule("tcp:2222:22")), (8, rule("tcp:8080:80"))],
            ips: vec![(10, Ipv4Addr::new(192, 168, 100, 20))],
            ingress: vec![(11, "tcp:5432".parse().unwrap())],
        };
        assert_eq!(flags.card_of(0), 0);
        assert_eq!(flags.card_of(3), 0);
        assert_eq!(flags.card_of(7), 1);
        assert_eq!(flags.card_of(13), 2);
        let cards = flags.apply(Vec::new()).unwrap();
        assert_eq!(cards.len(), 3);
        assert_eq!(cards[0].net, NetChoice::User);
        assert_eq!(cards[0].mac, Some([0x52, 0x54, 0, 0, 0, 1]));
        assert_eq!(cards[0].forwards, [rule("tcp:2222:22")]);
        assert_eq!(cards[1].net, lab("lab"));
        assert_eq!(cards[1].forwards, [rule("tcp:8080:80")]);
        assert_eq!(cards[1].ip, Some(Ipv4Addr::new(192, 168, 100, 20)));
        assert_eq!(cards[1].ingress, ["tcp:5432".parse().unwrap()]);
        assert_eq!(cards[2], card(lab("dmz")));
        check_cards(&cards).unwrap();
    }

    #[test]
    fn ingress_is_refused_on_a_card_that_is_not_on_a_lab_network() {
        let cards = vec![CardSettings {
            net: NetChoice::User,
            ingress: vec!["icmp".parse().unwrap()],
            ..CardSettings::default()
        }];
        let err = check_cards(&cards).unwrap_err().to_string();
        assert!(
            err.contains("--ingress guards a card on a lab network"),
            "{err}"
        );
    }

    #[test]
    fn a_new_card_list_keeps_saved_macs_and_forwards_a_bare_option_changes_the_first() {
        let saved = vec![
            CardSettings {
                net: NetChoice::User,
                mac: Some([2, 0, 0, 0, 0, 1]),
                forwards: vec![rule("tcp:2222:22")],
                ip: None,
                ingress: Vec::new(),
            },
            CardSettings {
                net: lab("lab"),
                ip: Some(Ipv4Addr::new(192, 168, 100, 20)),
                ..CardSettings::default()
            },
        ];
        let renet = CardFlags {
            nets: vec![(0, lab("dmz")), (2, lab("lab"))],
            ..CardFlags::default()
        };
        let cards = renet.apply(saved.clone()).unwrap();
        assert_eq!(cards[0].mac, Some([2, 0, 0, 0, 0, 1]));
        assert_eq!(cards[0].forwards, [rule("tcp:2222:22")]);
        assert_eq!(cards[1].ip, None, "a new --net drops the saved --ip");
        let bare = CardFlags {
            forwards: vec![(0, rule("tcp:2200:22"))],
            ..CardFlags::default()
        };
        let cards = bare.apply(saved.clone()).unwrap();
        assert_eq!(cards[0].forwards, [rule("tcp:2200:22")]);
        assert_eq!(cards[1], saved[1], "the other cards stay as saved");
        assert_eq!(CardFlags::default().apply(saved.clone()).unwrap(), saved);
    }

    #[test]
    fn conflicting_cards_are_refused_in_one_line() {
        let flags = |nets: Vec<NetChoice>| CardFlags {
            nets: nets
                .into_iter()
                .enumerate()
                .map(|(i, n)| (i * 2, n))
                .collect(),
            ..CardFlags::default()
        };
        let err = flags(vec![NetChoice::User, NetChoice::None])
            .apply(Vec::new())
            .unwrap_err();
        assert!(
            err.to_string().contains("--net none means no card"),
            "{err}"
        );
        for (cards, needle) in [
            (
                vec![card(NetChoice::User), card(NetChoice::User)],
                "one card behind its own NAT",
            ),
            (
                vec![card(lab("a")), card(lab("a"))],
                "one card on a network",
            ),
            (
                vec![
                    card(NetChoice::Tap("t0".into())),
                    card(NetChoice::Tap("t0".into())),
                ],
                "a TAP device serves one card",
            ),
            (
                vec![CardSettings {
                    forwards: vec![rule("tcp:2222:22")],
                    ..card(NetChoice::Tap("t0".into()))
                }],
                "a TAP card is bridged",
            ),
            (
                vec![CardSettings {
                    ip: Some(Ipv4Addr::new(10, 0, 0, 1)),
                    ..card(NetChoice::User)
                }],
                "add --net NETWORK",
            ),
            (vec![card(lab("a")); MAX_CARDS + 1], "at most 8 fit"),
        ] {
            let err = check_cards(&cards).unwrap_err().to_string();
            assert!(err.contains(needle), "{cards:?}: {err}");
            assert_eq!(err.lines().count(), 1);
        }
        let twice = CardFlags {
            nets: vec![(0, lab("a"))],
            macs: vec![
                (2, "52:54:00:00:00:01".parse().unwrap()),
                (4, "52:54:00:00:00:02".parse().unwrap()),
            ],
            ..CardFlags::default()
        };
        let err = twice.apply(Vec::new()).unwrap_err().to_string();
        assert!(err.contains("--mac given twice for eth0"), "{err}");
        let none = CardFlags {
            nets: vec![(0, NetChoice::None)],
            forwards: vec![(1, rule("tcp:2222:22"))],
            ..CardFlags::default()
        };
        let err = none.apply(Vec::new()).unwrap_err().to_string();
        assert!(err.contains("need a network card"), "{err}");
    }

    #[test]
    fn card_macs_are_stable_distinct_and_the_first_is_the_vms_own() {
        let cards = vec![card(NetChoice::User), card(lab("a")), card(lab("b"))];
        let macs = card_macs("router", &cards).unwrap();
        assert_eq!(macs, card_macs("router", &cards).unwrap(), "stable");
        assert_eq!(macs[0], MacAddress::for_vm("router"), "eth0 as before");
        assert_ne!(macs[1], macs[0]);
        assert_ne!(macs[2], macs[1]);
        assert_ne!(macs[1], card_macs("router2", &cards).unwrap()[1]);
        for mac in &macs {
            assert_eq!(mac.0[..3], MacAddress::VM_PREFIX);
        }
        // An explicit MAC that happens to be eth1's derived one moves eth1 on.
        let mut pinned = cards.clone();
        pinned[0].mac = Some(macs[1].octets());
        let moved = card_macs("router", &pinned).unwrap();
        assert_eq!(moved[0], macs[1]);
        assert_ne!(moved[1], macs[1]);
        let mut same = cards;
        same[0].mac = Some([2, 0, 0, 0, 0, 9]);
        same[2].mac = Some([2, 0, 0, 0, 0, 9]);
        let err = card_macs("router", &same).unwrap_err().to_string();
        assert!(
            err.contains("eth0 and eth2 both have MAC 02:00:00:00:00:09"),
            "{err}"
        );
    }
}
