//! `run --net tap:DEV`'s backend against the kernel, natively: a TAP made
//! in a namespace of the test's, the card's backend attached to it (with
//! and without vnet headers) and driven as the VM's event loop would. The
//! "guest" asks the namespace's address by ARP and hears the kernel's
//! reply; the kernel's own ARP request for the guest reaches it. Missing
//! devices and devices that are not TAPs are refused, nothing created.

mod common;

use std::time::{Duration, Instant};

use common::{require_root_and_tools, Guest, Netns};
use vmlab::devices::virtio::net::{NetBackend, TapLink};
use vmlab::net::{EpollRegistry, NatError, NetHdr, Tap};

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const GUEST_IP: [u8; 4] = [10, 77, 0, 2];
const HOST_IP: [u8; 4] = [10, 77, 0, 1];

/// An ARP frame from the guest: a request for `target`, or a reply to
/// `to_mac` saying the guest is at GUEST_IP.
fn arp(op: u16, dst_mac: [u8; 6], target_mac: [u8; 6], target: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&GUEST_IP);
    f.extend_from_slice(&target_mac);
    f.extend_from_slice(&target);
    f
}

fn is_arp(frame: &[u8], op: u16, sender: [u8; 4]) -> bool {
    frame.len() >= 42
        && frame[12..14] == [0x08, 0x06]
        && frame[20..22] == op.to_be_bytes()
        && frame[28..32] == sender
}

/// Drives `link` until `guest` holds a frame `want` accepts.
fn drive_until(
    link: &mut TapLink,
    reg: &mut EpollRegistry,
    guest: &mut Guest,
    want: impl Fn(&[u8]) -> bool,
) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        for (token, events) in reg.wait(Duration::from_millis(20)).unwrap() {
            link.event(token, events, reg);
        }
        link.flush(guest, reg);
        if guest.frames.iter().any(|f| want(f)) {
            return true;
        }
    }
    false
}

#[test]
fn a_tap_card_carries_frames_both_ways_with_and_without_vnet_headers() {
    require_root_and_tools(&["ip", "busybox"]);
    for vnet_hdr in [true, false] {
        let ns = Netns::new();
        ns.sh_ok("ip tuntap add tapc0 mode tap && ip addr add 10.77.0.1/24 dev tapc0 && ip link set tapc0 up && ip link set lo up");
        let tap = ns
            .run(move || Tap::attach_existing("tapc0", vnet_hdr))
            .unwrap();
        assert_eq!(tap.has_vnet_hdr(), vnet_hdr);
        let mut link = TapLink::new(tap);
        let accepts = link.accepts();
        assert_eq!(
            accepts.tso4, vnet_hdr,
            "offloads offered only with vnet headers"
        );
        assert_eq!(accepts.csum, vnet_hdr);
        let mut reg = EpollRegistry::new().unwrap();
        link.start(&mut reg);
        let mut guest = Guest::default();
        // Guest to kernel and back: the kernel answers the guest's ARP.
        let request = arp(1, [0xff; 6], [0; 6], HOST_IP);
        // Sent again if unanswered, as a guest's ARP would be: the first one
        // can meet the TAP before its carrier is up (seen on a loaded host).
        assert!(
            (0..3).any(|_| {
                link.guest_frame(&NetHdr::default(), &request, &mut reg);
                drive_until(&mut link, &mut reg, &mut guest, |f| {
                    is_arp(f, 2, HOST_IP) && f[..6] == GUEST_MAC
                })
            }),
            "vnet_hdr {vnet_hdr}: the kernel's ARP reply reaches the guest"
        );
        // Kernel to guest first: a ping from the namespace reaches the
        // guest (after an ARP request for it, answered, unless the kernel
        // learned the guest's MAC from its request above).
        let pinger = std::thread::spawn({
            let path = ns.path();
            move || {
                std::process::Command::new("ip")
                    .args(["netns", "exec"])
                    .arg(path.file_name().unwrap())
                    .args(["busybox", "ping", "-c", "1", "-W", "1", "10.77.0.2"])
                    .output()
                    .unwrap()
            }
        });
        let echo = |f: &[u8]| {
            f.len() > 34 && f[12..14] == [0x08, 0x00] && f[23] == 1 && f[30..34] == GUEST_IP
        };
        let asked = |f: &[u8]| is_arp(f, 1, HOST_IP) && f[38..42] == GUEST_IP;
        guest.frames.clear();
        assert!(
            drive_until(&mut link, &mut reg, &mut guest, |f| echo(f) || asked(f)),
            "vnet_hdr {vnet_hdr}: the ping or its ARP request reaches the guest"
        );
        if let Some(request) = guest.frames.iter().find(|f| asked(f)) {
            let host_mac: [u8; 6] = request[6..12].try_into().unwrap();
            let reply = arp(2, host_mac, host_mac, HOST_IP);
            link.guest_frame(&NetHdr::default(), &reply, &mut reg);
            assert!(
                drive_until(&mut link, &mut reg, &mut guest, echo),
                "vnet_hdr {vnet_hdr}: then the echo request"
            );
        }
        let _ = pinger.join();
        assert_eq!(link.counters.dropped_to_tap, 0);
    }
}

#[test]
fn a_missing_device_or_one_that_is_no_tap_is_refused_and_nothing_is_created() {
    require_root_and_tools(&["ip"]);
    let ns = Netns::new();
    ns.sh_ok("ip tuntap add tunc0 mode tun && ip link add vethc0 type veth peer name vethc1");
    let missing = ns.run(|| Tap::attach_existing("tapc9", true).err().unwrap());
    assert!(matches!(missing, NatError::TapMissing(_)), "{missing}");
    assert!(missing.to_string().contains("creates none"), "{missing}");
    assert!(
        !ns.sh("ip link show tapc9").status.success(),
        "vmlab made no device"
    );
    for dev in ["tunc0", "vethc0", "lo"] {
        let err = ns.run(move || Tap::attach_existing(dev, true).err().unwrap());
        assert!(matches!(err, NatError::NotATap(_)), "{dev}: {err}");
        assert_eq!(err.to_string().lines().count(), 1);
    }
    // One reader per TAP: a second card on it is refused.
    ns.sh_ok("ip tuntap add tapc1 mode tap");
    let first = ns.run(|| Tap::attach_existing("tapc1", true)).unwrap();
    let busy = ns.run(|| Tap::attach_existing("tapc1", true).err().unwrap());
    assert!(matches!(busy, NatError::TapBusy(_)), "{busy}");
    drop(first);
}
