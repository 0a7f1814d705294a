#!/usr/bin/env bash
# System calls per connection of one shoal proxy, counted by `strace -c` while `shoal-bench bench
# compare` drives its new-conn phase (a new connection per request, 16 at a time): a figure that,
# unlike time, does not move with the host's noise, and the one that matters most for short
# connections on a guest where a system call is dear. Connections are the proxy's own count over
# the same window (its metrics). strace slows the proxy, so the rate during the window is lower
# than the bench reports; the count per connection is what to read.
#
# usage: perf/scripts/syscalls-per-connection.sh [sidecar|sidecar-server|ambient-l4|ambient-l4-server] [BIN_DIR]
#   sidecar            the client's sidecar: accepts each captured connection     (default)
#   sidecar-server     the server's sidecar: requests over pooled HBONE streams, to the app pooled
#   ambient-l4         the client node's ztunnel
#   ambient-l4-server  the server node's ztunnel
#   BIN_DIR     holds shoal-bench, ztunnel and waypoint (default: target/release)
# Needs strace, curl and ss; captures with iptables when run as root, as the bench does.
set -euo pipefail
trap 'echo "failed at line $LINENO: $BASH_COMMAND" >&2' ERR
label=${1:-sidecar}
bin=$(cd "${2:-target/release}" && pwd)
case "$label" in
  sidecar) topology=sidecar match='waypoint.*bench-sidecar/client' metric=istio_requests_total ;;
  sidecar-server) topology=sidecar match='waypoint.*bench-sidecar/server' metric=istio_requests_total ;;
  ambient-l4) topology=ambient-l4 match='ztunnel.*--node node-a' metric=istio_tcp_connections_opened_total ;;
  ambient-l4-server) topology=ambient-l4 match='ztunnel.*--node node-b' metric=istio_tcp_connections_opened_total ;;
  *) echo "unknown proxy $label (sidecar, sidecar-server, ambient-l4 or ambient-l4-server)" >&2; exit 2 ;;
esac
for tool in strace curl ss; do
  command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 2; }
done
# shellcheck source=compare-phase.sh
source "$(dirname "$0")/compare-phase.sh"
compare_work_dir
compare_until_phase "$bin/shoal-bench" "$topology" new-conn 8 "$bin" "$work"
sleep 1.5
proxy=$(pgrep -f "$match" | head -1)
[ -n "$proxy" ] || { echo "the proxy ($match) was not found" >&2; exit 1; }
metrics=$(find_metrics "$proxy" "$metric")
connections() { curl -s -m 5 "http://$metrics/metrics" | awk -v m="^$metric" '$0 ~ m {s += $NF} END {printf "%d\n", s}'; }

before=$(connections)
timeout -s INT 3 strace -c -f -p "$proxy" -o "$work/strace.txt" 2>/dev/null || true
after=$(connections)
served=$((after - before))
[ "$served" -gt 0 ] || { echo "no connections were counted" >&2; exit 1; }
# The shard threads' calls; the control, DNS and signal threads' sleeps and futex waits are not
# the connections'.
awk -v n="$served" '
  $1 ~ /^(%|-)/ || NF < 5 || $NF == "total" {next}
  $NF ~ /^(futex|clock_nanosleep|restart_syscall|madvise|nanosleep)$/ {next}
  {printf "%s %.2f\n", $NF, $4 / n}' "$work/strace.txt" | sort -k2 -n -r >"$work/per.txt"
total=$(awk '{s += $2} END {printf "%.1f", s}' "$work/per.txt")
echo "$label: $served connections, $total system calls per connection"
awk '{printf "  %-16s %5.2f\n", $1, $2}' "$work/per.txt"
