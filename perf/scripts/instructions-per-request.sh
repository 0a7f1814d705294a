#!/usr/bin/env bash
# Instructions per request of one shoal proxy, counted by callgrind while `shoal-bench bench compare`
# drives its rr-50 phase: a figure that, unlike time, does not move with the host's noise. The
# proxy runs under valgrind (about 50× slower, so it alone sets the pace); the count covers user
# space only and is taken over a window of the phase, divided by the requests its metrics report
# for that window. Repeats agree within about 3%.
#
# usage: perf/scripts/instructions-per-request.sh [sidecar|sidecar-server|ambient-l7|ambient-l4|ambient-l4-server] [BIN_DIR]
#   sidecar            the client's sidecar (shoal's sidecar mode)          (default)
#   sidecar-server     the server's sidecar (HBONE in, plaintext HTTP to the app)
#   ambient-l7         the waypoint between the two ztunnels
#   ambient-l4         the client node's ztunnel (SOCKS5 in, HBONE out), in ambient-l4
#   ambient-l4-server  the server node's ztunnel (HBONE in, TCP to the app), in ambient-l4
#   An L4 proxy does not count requests: its requests are the request bytes it carried (its
#   istio_tcp_sent_bytes_total: client to server, as Istio's ztunnel counts it) divided by the
#   size of the load generator's request.
#   BIN_DIR     holds shoal-bench, ztunnel and waypoint (default: target/release)
# CALLGRIND_OUT=FILE keeps the profile (callgrind_annotate FILE).
# PHASE=new-conn (or bulk) counts over that phase of compare instead of rr-50.
# RATE=N counts over compare's open-loop phase at N requests per second instead of rr-50: a proxy
#   woken for every request, as at low load, rather than one that finds requests batched. Keep N
#   well below what the proxy does under valgrind (200 leaves it mostly idle).
# Needs valgrind (callgrind_control), curl and ss.
set -euo pipefail
trap 'echo "failed at line $LINENO: $BASH_COMMAND" >&2' ERR
topology=${1:-sidecar}
label=$topology
bin=$(cd "${2:-target/release}" && pwd)
proxy_bin=waypoint
case "$topology" in
  sidecar) match='bench-sidecar/client' ;;
  sidecar-server) match='bench-sidecar/server' topology=sidecar ;;
  ambient-l7) match='--gateway' ;;
  ambient-l4) match='--node node-a' proxy_bin=ztunnel ;;
  ambient-l4-server) match='--node node-b' proxy_bin=ztunnel topology=ambient-l4 ;;
  *) echo "unknown topology $topology (sidecar, sidecar-server, ambient-l7, ambient-l4 or ambient-l4-server)" >&2; exit 2 ;;
esac
other_bin=$([ "$proxy_bin" = waypoint ] && echo ztunnel || echo waypoint)
for tool in valgrind callgrind_control curl ss; do
  command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 2; }
done
# shellcheck source=compare-phase.sh
source "$(dirname "$0")/compare-phase.sh"
compare_work_dir

# The bench starts its proxies from --bin-dir: the chosen one under callgrind, the rest as they are.
ln -s "$bin/$other_bin" "$work/$other_bin"
cat >"$work/$proxy_bin" <<WRAP
#!/usr/bin/env bash
case "\$*" in
  *"$match"*) SHOAL_DRIVER=epoll exec valgrind --tool=callgrind --instr-atstart=no \
      --callgrind-out-file="$work/callgrind.out" "$bin/$proxy_bin" "\$@" 2>"$work/valgrind.log" ;;
  *) exec "$bin/$proxy_bin" "\$@" ;;
esac
WRAP
chmod +x "$work/$proxy_bin"

if [ -n "${RATE:-}" ]; then
  compare_until_phase "$bin/shoal-bench" "$topology" "open-$RATE" 10 "$work" "$work" "$RATE"
else
  compare_until_phase "$bin/shoal-bench" "$topology" "${PHASE:-rr-50}" 10 "$work" "$work"
fi
sleep 2
proxy=$(pgrep -f "valgrind.*callgrind.*$work" | head -1)
if [ "$proxy_bin" = waypoint ]; then
  metrics=$(find_metrics "$proxy" istio_requests_total)
  requests() { curl -s -m 5 "http://$metrics/metrics" | awk '/^istio_requests_total/ {s += $NF} END {print s + 0}'; }
elif [ "${PHASE:-}" = new-conn ]; then
  # A connection per request: the connections the ztunnel opened.
  metrics=$(find_metrics "$proxy" istio_tcp_connections_opened_total)
  requests() { curl -s -m 5 "http://$metrics/metrics" | awk '/^istio_tcp_connections_opened_total/ {s += $NF} END {print s + 0}'; }
else
  # The request bytes the ztunnel carried, client to server: the load generator's GET is 63 bytes
  # ("GET / HTTP/1.1", host 10.42.0.1:80, user-agent). (Counted before from the app's sockets with
  # `ss`, which found none when the proxy under valgrind had not yet carried the load's first
  # connections.)
  metrics=$(find_metrics "$proxy" istio_tcp_sent_bytes_total)
  requests() {
    curl -s -m 5 "http://$metrics/metrics" |
      awk '/^istio_tcp_sent_bytes_total/ {s += $NF} END {printf "%d\n", s / 63}'
  }
fi

before=$(requests)
callgrind_control -i on "$proxy" >/dev/null 2>&1
sleep 5
callgrind_control -i off "$proxy" >/dev/null 2>&1
after=$(requests)
callgrind_control -d "$proxy" >/dev/null 2>&1
sleep 1
instructions=$(cat "$work"/callgrind.out* | awk '/^totals:/ {if ($2 > m) m = $2} END {print m + 0}')
served=$((after - before))
[ "$served" -gt 0 ] || { echo "no requests were counted" >&2; exit 1; }
if [ -n "${CALLGRIND_OUT:-}" ]; then cat "$work"/callgrind.out* >"$CALLGRIND_OUT"; fi
echo "$label: $served requests, $instructions instructions, $((instructions / served)) per request"
