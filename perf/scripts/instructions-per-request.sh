#!/usr/bin/env bash
# Instructions per request of one shoal proxy, counted by callgrind while `shoal-bench bench compare`
# drives its rr-50 phase: a figure that, unlike time, does not move with the host's noise. The
# proxy runs under valgrind (about 50× slower, so it alone sets the pace); the count covers user
# space only and is taken over a window of the phase, divided by the requests its metrics report
# for that window. Repeats agree within about 3%.
#
# usage: perf/scripts/instructions-per-request.sh [sidecar|ambient-l7] [BIN_DIR]
#   sidecar     the client's sidecar (shoal's sidecar mode)          (default)
#   ambient-l7  the waypoint between the two ztunnels
#   BIN_DIR     holds shoal-bench, ztunnel and waypoint (default: target/release)
# Needs valgrind (callgrind_control), curl and ss.
set -euo pipefail
trap 'echo "failed at line $LINENO: $BASH_COMMAND" >&2' ERR
topology=${1:-sidecar}
bin=$(cd "${2:-target/release}" && pwd)
case "$topology" in
  sidecar) match='bench-sidecar/client' ;;
  ambient-l7) match='--gateway' ;;
  *) echo "unknown topology $topology (sidecar or ambient-l7)" >&2; exit 2 ;;
esac
for tool in valgrind callgrind_control curl ss; do
  command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 2; }
done
work=$(mktemp -d)
bench_pid=
cleanup() {
  # The bench's proxies get SIGTERM when it goes (PR_SET_PDEATHSIG) and drain; wait for them.
  if [ -n "$bench_pid" ]; then
    kill "$bench_pid" 2>/dev/null || true
    wait "$bench_pid" 2>/dev/null || true
  fi
  for _ in $(seq 50); do
    pgrep -f "$work" >/dev/null || break
    sleep 0.2
  done
  rm -rf "$work"
}
trap cleanup EXIT

# The bench starts its proxies from --bin-dir: the chosen one under callgrind, the rest as they are.
ln -s "$bin/ztunnel" "$work/ztunnel"
cat >"$work/waypoint" <<WRAP
#!/usr/bin/env bash
case "\$*" in
  *"$match"*) SHOAL_DRIVER=epoll exec valgrind --tool=callgrind --instr-atstart=no \
      --callgrind-out-file="$work/callgrind.out" "$bin/waypoint" "\$@" 2>"$work/valgrind.log" ;;
  *) exec "$bin/waypoint" "\$@" ;;
esac
WRAP
chmod +x "$work/waypoint"

SHOAL_LOG=warn "$bin/shoal-bench" bench compare --only "$topology" --repeats 1 --duration-s 10 \
  --bin-dir "$work" --out "$work/out" >"$work/bench.log" 2>&1 &
bench_pid=$!
until grep -q "direct rr-50" "$work/bench.log"; do
  kill -0 "$bench_pid" 2>/dev/null || { tail "$work/bench.log" >&2; exit 1; }
  sleep 0.2
done
sleep 2
proxy=$(pgrep -f "valgrind.*callgrind.*$work" | head -1)
metrics=$(ss -ltnp | grep "pid=$proxy," | awk '{print $4}' | while read -r a; do
  if curl -s -m 5 "http://$a/metrics" | grep -q '^istio_requests_total'; then echo "$a"; fi
done | head -1) || true
[ -n "$metrics" ] || { echo "the proxy's metrics listener was not found" >&2; exit 1; }
requests() { curl -s -m 5 "http://$metrics/metrics" | awk '/^istio_requests_total/ {s += $NF} END {print s + 0}'; }

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
echo "$topology: $served requests, $instructions instructions, $((instructions / served)) per request"
