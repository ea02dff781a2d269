//! The guest's network end to end, in the emulated-SVM rig (tests/rig): one
//! L1 boot runs vmlab's default guest with its virtio-net card behind the
//! NAT and checks what a user sees — a DHCP lease (10.0.2.15, route, DNS,
//! hostname = `--name`), a file fetched from a server on L1's loopback via
//! 10.0.2.2 with a matching checksum, a name resolved through 10.0.2.3 by a
//! resolver on L1's loopback (so vmlab's relay is exercised), a forwarded
//! host port reaching a server in the guest, a second `vmlab run` on the
//! same forward port refused at once, and `--net none` hiding the card.

mod rig;

use std::sync::OnceLock;
use std::time::Duration;

/// L1's side (tests/rig/servers.sh): a 1 MiB blob served on
/// 127.0.0.1:8000 and a DNS responder on 127.0.0.1:53, L1's resolver.
const L1_SERVERS: &str = r#"
. "$RIG_REPO/tests/rig/servers.sh"
rig_servers_start

# Echoes the guest's last KEY=... console line into the scenario's output.
guest_value() {
    rig_console_wait vm "^$1=${2:-}" "${3:-60}"
    grep -a "^$1=" "$RIG_OUT/vm.console" | tail -n 1 | tr -d '\r'
}
"#;

const GUEST_SESSION: &str = r#"
rig_console_start vm "$VMLAB" run --kernel "$VMLAB_VMLINUX" --initrd "$VMLAB_INITRAMFS" \
    --mem 256M --name labvm --forward tcp:8080:80
rig_console_wait vm 'root@labvm:.*# ' 240

rig_console_send vm 'echo "addr=$(ip -4 -o addr show dev eth0 | grep -o "inet [0-9./]*")"'
guest_value addr inet
rig_console_send vm 'echo "route=$(ip route show default)"'
guest_value route
rig_console_send vm 'echo "resolver=$(grep nameserver /etc/resolv.conf)"'
guest_value resolver
rig_console_send vm 'echo "host=$(hostname)"'
guest_value host
rig_console_send vm 'echo "mac=$(cat /sys/class/net/eth0/address)"'
guest_value mac

rig_console_send vm 'echo "blob_sha=$(wget -q -O - http://10.0.2.2:8000/blob | sha256sum | cut -d" " -f1)"'
guest_value blob_sha '[0-9a-f]{64}' 180
rig_console_send vm 'echo "dns=$(nslookup www.lab.test | grep -o "10\.9\.8\.7" | head -n 1)"'
guest_value dns '' 60

# A server in the guest, reached through the forward.
rig_console_send vm 'mkdir -p /www && dd if=/dev/urandom of=/www/g.bin bs=1024 count=512 2>/dev/null && httpd -p 80 -h /www && echo "guest_file_sha=$(sha256sum /www/g.bin | cut -d" " -f1)"'
guest_value guest_file_sha '[0-9a-f]{64}' 60
echo "forward_sha=$(busybox wget -q -O - http://127.0.0.1:8080/g.bin | sha256sum | cut -d' ' -f1)"

# The forward port is vmlab's now: a second VM on it must fail at once.
start=$(rig_ms)
status=0
"$VMLAB" run --kernel "$VMLAB_VMLINUX" --initrd "$VMLAB_INITRAMFS" --mem 256M \
    --forward tcp:8080:80 </dev/null >"$RIG_OUT/busy.out" 2>&1 || status=$?
echo "busy_status=$status"
echo "busy_ms=$(($(rig_ms) - start))"

rig_console_send vm poweroff
rig_console_exit vm 90
"#;

fn l1() -> &'static rig::Run {
    static RUN: OnceLock<rig::Run> = OnceLock::new();
    RUN.get_or_init(|| {
        rig::Batch::new("e2e_net")
            .scenario(
                "guest_network",
                Duration::from_secs(8 * 60),
                &format!("{L1_SERVERS}\n{GUEST_SESSION}"),
            )
            .scenario(
                "no_network",
                Duration::from_secs(5 * 60),
                r#"
                rig_console_start vm "$VMLAB" run --kernel "$VMLAB_VMLINUX" \
                    --initrd "$VMLAB_INITRAMFS" --mem 256M --net none
                rig_console_wait vm 'root@vmlab:.*# ' 240
                rig_console_send vm 'echo "nics=$(ls /sys/class/net | tr "\n" " ")"'
                rig_console_wait vm '^nics=' 60
                grep -a '^nics=' "$RIG_OUT/vm.console" | tail -n 1 | tr -d '\r'
                rig_console_send vm poweroff
                rig_console_exit vm 90
                "#,
            )
            .run()
    })
}

fn guest() -> &'static rig::Scenario {
    l1().scenario("guest_network").assert_success()
}

#[test]
fn l1_runs_the_batch() {
    l1().assert_l1_ok();
}

#[test]
fn dhcp_gives_address_route_dns_and_hostname() {
    let s = guest();
    assert_eq!(s.value("addr"), "inet 10.0.2.15/24", "{}", s.diagnostics());
    assert!(
        s.value("route")
            .starts_with("default via 10.0.2.2 dev eth0"),
        "{}",
        s.diagnostics()
    );
    assert_eq!(s.value("resolver"), "nameserver 10.0.2.3");
    assert_eq!(s.value("host"), "labvm", "DHCP hostname is the VM's --name");
}

#[test]
fn mac_is_derived_from_the_vm_name() {
    let s = guest();
    let want = vmlab::cli::MacAddress::for_vm("labvm").to_string();
    assert_eq!(s.value("mac"), want, "{}", s.diagnostics());
}

#[test]
fn guest_fetches_a_file_from_l1_loopback_via_the_gateway() {
    let s = guest();
    let want = s.value("l1_blob_sha");
    assert_eq!(want.len(), 64);
    assert_eq!(s.value("blob_sha"), want, "{}", s.diagnostics());
}

#[test]
fn guest_resolves_a_name_through_the_dns_relay() {
    let s = guest();
    assert_eq!(s.value("dns"), "10.9.8.7", "{}", s.diagnostics());
}

#[test]
fn forwarded_host_port_reaches_a_server_in_the_guest() {
    let s = guest();
    let want = s.value("guest_file_sha");
    assert_eq!(want.len(), 64);
    assert_eq!(s.value("forward_sha"), want, "{}", s.diagnostics());
}

#[test]
fn busy_forward_port_fails_at_once_without_a_guest() {
    let s = guest();
    assert_eq!(s.value("busy_status"), "1", "{}", s.diagnostics());
    let out = s.file("busy.out").replace('\r', "");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {out}");
    assert!(lines[0].contains("127.0.0.1:8080"), "{out}");
    assert!(lines[0].contains("choose another host port"), "{out}");
    println!("busy port refused after {} ms", s.value("busy_ms"));
}

#[test]
fn net_none_gives_the_guest_no_card() {
    let s = l1().scenario("no_network").assert_success();
    assert_eq!(s.value("nics").trim(), "lo", "{}", s.diagnostics());
}
