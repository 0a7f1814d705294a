# Sourced by the perf scripts: a scratch directory that is cleaned up on exit, and `shoal-bench bench
# compare` started on one topology in the background, returning once that topology's PHASE has
# begun; `bench_pid` is the bench's.

# Makes the scratch directory `work`; on exit, stops the bench if it was started, waits for the
# proxies started from `work` (they get SIGTERM when the bench goes, PR_SET_PDEATHSIG, and drain),
# and removes `work`.
compare_work_dir() {
  work=$(mktemp -d)
  bench_pid=
  trap compare_cleanup EXIT
}
compare_cleanup() {
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
