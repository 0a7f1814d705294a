# Sourced by the perf scripts: a scratch directory that is cleaned up on exit, and `shoal-bench bench
# compare` started on one topology in the background, returning once that topology's PHASE has
# begun; `bench_pid` is the bench's.

# Makes the scratch directory `work`; on exit, stops the bench if it was started, waits for the
# proxies started from `work` (they get SIGTERM when the bench goes, PR_SET_PDEATHSIG, and drain)
# and for the bench's capture guard (it removes the capture a second after the bench is gone), so
# the script leaves no process behind, and removes `work`.
compare_work_dir() {
  work=$(mktemp -d)
  bench_pid=
  trap compare_cleanup EXIT
}
compare_cleanup() {
  local guard=
  if [ -n "$bench_pid" ]; then
    guard="capture-guard .*--owner $bench_pid( |$)"
    kill "$bench_pid" 2>/dev/null || true
    wait "$bench_pid" 2>/dev/null || true
  fi
  for _ in $(seq 50); do
    pgrep -f "$work" >/dev/null || { [ -n "$guard" ] && pgrep -f "$guard" >/dev/null; } || break
    sleep 0.2
  done
  rm -rf "$work"
}

# usage: compare_until_phase SHOAL_BENCH TOPOLOGY PHASE DURATION_S BIN_DIR WORK_DIR [RATE]
#   PHASE is a phase's full name (rr-50, open-RATE, new-conn, bulk); only that phase runs.
#   RATE is the open-loop phase's requests per second (compare's default when not given).
compare_until_phase() {
  local shoal_bench=$1 topology=$2 phase=$3 duration=$4 bin_dir=$5 work=$6 rate=${7:-}
  SHOAL_LOG=warn "$shoal_bench" bench compare --only "$topology" --repeats 1 \
    --phases "$phase" ${rate:+--rate "$rate"} \
    --duration-s "$duration" --bin-dir "$bin_dir" --out "$work/out" >"$work/bench.log" 2>&1 &
  bench_pid=$!
  # Phases run one topology after another, direct first: its line for PHASE means ours has begun.
  until grep -q "direct $phase" "$work/bench.log"; do
    kill -0 "$bench_pid" 2>/dev/null || { tail "$work/bench.log" >&2; exit 1; }
    sleep 0.2
  done
}

# Prints the address of PID's metrics listener, the one whose page has SERIES; a proxy under
# valgrind may still be coming up, so it looks for a while. Only 127.0.0.1, where compare binds
# every proxy's admin and metrics listeners: a request to a capture or HBONE port would be
# proxied, and one to a ztunnel's capture port would loop back into it.
# usage: find_metrics PID SERIES
find_metrics() {
  local pid=$1 series=$2 found= page
  for _ in $(seq 40); do
    # (The page is read whole before it is searched: `grep -q` would stop early and, under
    # pipefail, fail the pipe of a large page.)
    found=$(ss -ltnpH | grep "pid=$pid," | awk '{print $4}' | grep '^127\.0\.0\.1:' |
      while read -r a; do
        page=$(curl -s -m 5 "http://$a/metrics" || true)
        if grep -q "^$series" <<<"$page"; then echo "$a"; fi
      done | head -1) || true
    [ -n "$found" ] && break
    sleep 0.5
  done
  [ -n "$found" ] || { echo "the proxy's metrics listener was not found" >&2; exit 1; }
  echo "$found"
}
