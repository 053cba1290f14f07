#!/usr/bin/env bash
# two-hosts.sh: a live migration between two "hosts" on one machine.
#
# Host A and host B are network namespaces joined by a veth pair (A 10.78.0.1, B
# 10.78.0.2), and the link is shaped with a token bucket (tc tbf) in both directions.
# In B, `ferry receive` listens on 10.78.0.2:4444; in A, `ferry loadgen` runs a
# synthetic guest that keeps dirtying its RAM, and `ferry send` migrates it live
# across the link. Then the script checks the result and tears everything down.
#
#   sudo deploy/two-hosts.sh [--rate 1gbit] [--size 512M] [--dirty-rate 32M]
#                            [--compress] [--max-bandwidth RATE] [--keep]
#
#   --rate           link rate, tc syntax (default 1gbit)
#   --size           guest RAM (default 512M)
#   --dirty-rate     how fast the guest dirties its RAM, bytes/s (default 32M)
#   --compress       send zlib-compressed pages
#   --max-bandwidth  ferry's own cap (default: none; the link limits)
#   --keep           keep the work directory (logs, statistics, RAM files)
#
# Needs root (ip netns, tc), iproute2 and cmp. FERRY=/path/to/ferry selects the
# binary (default: target/release/ferry of this checkout, built if missing). Files go
# to a directory under /dev/shm (guest RAM lives in tmpfs, as on a real host; the
# namespaces share the file system). Verified: both ferry ends exit 0, the sender
# saw the receiver's RAM digests match, the guest is `postmigrate` (stopped for
# good: the destination owns it now), and the destination RAM equals the source
# byte for byte. Exit status 0 when all of that holds.
#
# On real hosts, run the `receive` line on the destination and the `loadgen`/`send`
# lines on the source (with your VMM in place of loadgen); see deploy/README.md.

set -euo pipefail

RATE=1gbit
SIZE=512M
DIRTY=32M
KEEP=0
SEND_FLAGS=()
while [ $# -gt 0 ]; do
    case "$1" in
    --rate) RATE=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --dirty-rate) DIRTY=$2; shift 2 ;;
    --compress) SEND_FLAGS+=(--compress); shift ;;
    --max-bandwidth) SEND_FLAGS+=(--max-bandwidth "$2"); shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h | --help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) echo "two-hosts.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done

[ "$(id -u)" = 0 ] || { echo "two-hosts.sh: needs root (ip netns, tc)" >&2; exit 2; }

ROOT=$(cd "$(dirname "$0")/.." && pwd)
FERRY=${FERRY:-$ROOT/target/release/ferry}
if [ ! -x "$FERRY" ]; then
    echo "== building ferry"
    (cd "$ROOT" && cargo build --release -p ferry)
fi

A=ferry-sh-$$-a
B=ferry-sh-$$-b
ADDR_A=10.78.0.1
ADDR_B=10.78.0.2
PORT=4444
WORK=$(mktemp -d /dev/shm/ferry-two-hosts.XXXXXX)
LOADGEN_PID=
RECEIVE_PID=

cleanup() {
    set +e
    [ -n "$RECEIVE_PID" ] && kill "$RECEIVE_PID" 2>/dev/null
    # SIGTERM: loadgen exits 0 and removes its control socket.
    [ -n "$LOADGEN_PID" ] && kill "$LOADGEN_PID" 2>/dev/null
    wait 2>/dev/null
    ip netns del "$A" 2>/dev/null
    ip netns del "$B" 2>/dev/null
    if [ "$KEEP" = 1 ]; then
        echo "== kept $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

echo "== creating hosts $A ($ADDR_A) and $B ($ADDR_B), link $RATE"
ip netns add "$A"
ip netns add "$B"
ip link add veth-a netns "$A" type veth peer name veth-b netns "$B"
ip -n "$A" addr add "$ADDR_A/24" dev veth-a
ip -n "$B" addr add "$ADDR_B/24" dev veth-b
for ns in "$A" "$B"; do ip -n "$ns" link set lo up; done
ip -n "$A" link set veth-a up
ip -n "$B" link set veth-b up
ip netns exec "$A" tc qdisc add dev veth-a root tbf rate "$RATE" burst 1mb latency 50ms
ip netns exec "$B" tc qdisc add dev veth-b root tbf rate "$RATE" burst 1mb latency 50ms

echo "== host B: ferry receive on tcp:$ADDR_B:$PORT"
ip netns exec "$B" "$FERRY" receive --listen "tcp:$ADDR_B:$PORT" \
    --ram "$WORK/dst.ram,name=pc.ram" --stats-json "$WORK/receive.json" \
    2>"$WORK/receive.log" &
RECEIVE_PID=$!

echo "== host A: guest of $SIZE dirtying $DIRTY/s"
ip netns exec "$A" "$FERRY" loadgen --ram "$WORK/src.ram" --size "$SIZE" \
    --dirty-log "$WORK/dirty.log" --control "unix:$WORK/guest.sock" --dirty-rate "$DIRTY" \
    2>"$WORK/loadgen.log" &
LOADGEN_PID=$!

for _ in $(seq 200); do
    [ -S "$WORK/guest.sock" ] && grep -q "listening on" "$WORK/receive.log" && break
    sleep 0.1
done
[ -S "$WORK/guest.sock" ] || { echo "loadgen did not start:"; cat "$WORK/loadgen.log"; exit 1; }
grep -q "listening on" "$WORK/receive.log" || { echo "receive did not start:"; cat "$WORK/receive.log"; exit 1; }

echo "== host A: ferry send ${SEND_FLAGS[*]:-}"
status=0
ip netns exec "$A" "$FERRY" send --ram "$WORK/src.ram,name=pc.ram" \
    --dirty-log "$WORK/dirty.log" --guest-control "unix:$WORK/guest.sock" \
    --to "tcp:$ADDR_B:$PORT" --no-progress --stats-json "$WORK/send.json" \
    ${SEND_FLAGS[@]+"${SEND_FLAGS[@]}"} 2>"$WORK/send.log" || status=$?
sed 's/^/   send: /' "$WORK/send.log"
rstatus=0
wait "$RECEIVE_PID" || rstatus=$?
RECEIVE_PID=
sed 's/^/   receive: /' "$WORK/receive.log"

echo "== verifying"
fail=0
check() { if "$@"; then echo "   ok: $DESC"; else echo "   FAILED: $DESC"; fail=1; fi; }
DESC="ferry send exited 0 (it was $status)"; check [ "$status" = 0 ]
DESC="ferry receive exited 0 (it was $rstatus)"; check [ "$rstatus" = 0 ]
DESC="the receiver's RAM digests match"; check grep -q "RAM digests match" "$WORK/send.log"
if command -v python3 >/dev/null; then
    guest=$(python3 -c 'import json,socket,sys
s=socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(sys.argv[1])
s.sendall(b"{\"execute\":\"query-status\"}\n")
print(json.loads(s.makefile().readline())["return"]["status"])' "$WORK/guest.sock" || echo "?")
    DESC="the guest is postmigrate (it is $guest)"; check [ "$guest" = postmigrate ]
fi
DESC="destination RAM equals the source"; check cmp -s "$WORK/src.ram" "$WORK/dst.ram"
[ "$fail" = 0 ] && echo "== migration across the link verified"
exit "$fail"
