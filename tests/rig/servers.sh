# L1's side of the network tests, sourced after lib.sh:
#   . "$RIG_REPO/tests/rig/servers.sh"; rig_servers_start
# Starts, on L1's loopback, busybox httpd on 127.0.0.1:8000 serving a 1 MiB
# random blob ($RIG_TMP/www/blob; its sha256 is printed as l1_blob_sha=...)
# and a DNS responder on 127.0.0.1:53 answering every A query with
# 10.9.8.7, made L1's resolver by a bind mount over /etc/resolv.conf (which
# vmlab's NAT reads at start, so its relay at 10.0.2.3 is exercised). Both
# stop, and the mount goes, when the scenario exits.

rig_servers_start() {
    ip link set lo up 2>/dev/null || true
    local www=$RIG_TMP/www
    mkdir -p "$www"
    head -c 1048576 /dev/urandom >"$www/blob"
    echo "l1_blob_sha=$(sha256sum <"$www/blob" | cut -d' ' -f1)"
    busybox httpd -f -p 127.0.0.1:8000 -h "$www" &
    rig_httpd_pid=$!
    cat >"$RIG_TMP/dns.py" <<'PY'
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 53))
open(sys.argv[1], "w").close()
while True:
    q, peer = s.recvfrom(512)
    if len(q) < 17:
        continue
    i = 12
    while i < len(q) and q[i]:
        i += q[i] + 1
    end = i + 5
    answer = b""
    if q[i + 1:i + 3] == b"\x00\x01":
        answer = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + bytes([10, 9, 8, 7])
    header = q[:2] + b"\x81\x80" + q[4:6] + (1 if answer else 0).to_bytes(2, "big") + bytes(4)
    s.sendto(header + q[12:end] + answer, peer)
PY
    python3 "$RIG_TMP/dns.py" "$RIG_TMP/dns.ready" &
    rig_dns_pid=$!
    local _
    for _ in $(seq 100); do [ -e "$RIG_TMP/dns.ready" ] && break; sleep 0.1; done
    [ -e "$RIG_TMP/dns.ready" ] || { echo "rig: the DNS responder did not start" >&2; return 1; }
    printf 'nameserver 127.0.0.1\n' >"$RIG_TMP/resolv.conf"
    mount --bind "$RIG_TMP/resolv.conf" /etc/resolv.conf
    rig_at_exit rig_servers_stop
}

rig_servers_stop() {
    kill "$rig_httpd_pid" "$rig_dns_pid" 2>/dev/null || true
    umount /etc/resolv.conf 2>/dev/null || true
}
