#!/usr/bin/env bash
# Where the threads on a request's path are woken, and how long each waits to run, while `shoal-bench
# bench compare` drives one topology's open-loop phase (1,000 req/s by default): recorded with
# `perf sched record -a` over a window of the phase. At that rate latency is mostly hops, and a hop
# costs what its wake-up costs: onto the waker's own vCPU (it runs once the waker sleeps or is
# preempted), onto an idle vCPU (which this guest halts, so the host must bring it back), or onto a
# vCPU already running another thread (it waits its turn). Then, per process, the time from being
# switched in to the first wake-up it makes: a hop's own part of the critical path.
#
# usage: perf/scripts/wake-ups.sh [ambient-l7|ambient-l4|sidecar|nginx|haproxy] [BIN_DIR]
#   BIN_DIR holds shoal-bench, ztunnel and waypoint (default: target/release)
# RATE=N drives the open loop at N requests per second instead.
# Needs perf (linux-perf) and root, as `perf sched record -a` does.
set -euo pipefail
trap 'echo "failed at line $LINENO: $BASH_COMMAND" >&2' ERR
topology=${1:-ambient-l7}
bin=$(cd "${2:-target/release}" && pwd)
rate=${RATE:-1000}
window_s=4
command -v perf >/dev/null || { echo "needs perf" >&2; exit 2; }
# shellcheck source=compare-phase.sh
source "$(dirname "$0")/compare-phase.sh"
compare_work_dir
compare_until_phase "$bin/shoal-bench" "$topology" "open-$rate" $((window_s + 4)) "$bin" "$work" "$rate"
sleep 2
ps -eLo pid=,tid=,args= >"$work/threads"
perf sched record -a -o "$work/sched.data" -- sleep "$window_s" >/dev/null 2>&1
perf script -i "$work/sched.data" -F cpu,time,event,trace 2>/dev/null >"$work/events"
wait "$bench_pid" || true
bench_pid=

# One pass over the events. Each wake-up of a path thread (shoal's shards, nginx's and HAProxy's
# workers, which include the load generator's and the backend's), judged when it is switched in:
# on the waker's vCPU it was woken "beside the waker"; on another, "onto an idle vCPU" if that
# vCPU was idle until then, else "behind another thread" (to hops). And, per thread, the time from
# each switch-in to the first thread it wakes (to firsts).
awk -v threads="$work/threads" -v requests=$((rate * window_s)) -v hops="$work/hops" -v firsts="$work/firsts" '
  BEGIN {
    while ((getline line < threads) > 0) {
      split(line, f, " "); name = f[3]; sub(/.*\//, "", name)
      for (i = 4; i <= length(f); i++) if (f[i] ~ /^--(node|gateway|sidecar)$/) name = name " " f[i+1]
      if (f[3] ~ /shoal-bench/ && line ~ / bench compare /) name = "load generator"
      if (f[3] ~ /shoal-bench/ && line ~ / backend /) name = "backend"
      proc[f[2]] = name
    }
  }
  function field(key,   i) { for (i = 1; i <= NF; i++) if (index($i, key "=") == 1) return substr($i, length(key) + 2); return "" }
  {
    cpu = $1; gsub(/[\[\]]/, "", cpu); cpu += 0; t = $2 + 0
  }
  $3 == "sched:sched_waking:" {
    me = cur[cpu]
    if (me != 0 && first[me] && (me in proc)) { printf "%s (%s)\t%.1f\n", proc[me], me, (t - since[me]) * 1e6 > firsts; first[me] = 0 }
    p = field("pid"); woken_at[p] = t; waker_cpu[p] = cpu; next
  }
  $3 == "sched:sched_switch:" {
    prev = field("prev_pid"); nxt = field("next_pid"); comm = field("next_comm")
    if ((nxt in woken_at) && comm ~ /^(shoal-shard|nginx|haproxy)/) {
      kind = (cpu == waker_cpu[nxt]) ? "beside the waker" : (prev == 0 ? "onto an idle vCPU" : "behind another thread")
      print kind "\t" (t - woken_at[nxt]) * 1e6 > hops
      n++
    }
    delete woken_at[nxt]
    cur[cpu] = nxt; since[nxt] = t; first[nxt] = 1; next
  }
  END { printf "%.1f wake-ups of the path'"'"'s threads per request (%d over %d requests)\n", n / requests, n, requests }
' "$work/events"
for kind in "beside the waker" "onto an idle vCPU" "behind another thread"; do
  grep -F "$kind	" "$work/hops" | cut -f2 | sort -n | awk -v kind="$kind" -v all="$(wc -l <"$work/hops")" '
    { v[NR] = $1 }
    END {
      if (!NR) exit
      p90 = int(NR * 0.9); if (p90 < 1) p90 = 1
      printf "  %-22s %3.0f%%  wait p50 %5.0f µs  p90 %5.0f µs\n", kind, 100 * NR / all, v[int((NR + 1) / 2)], v[p90]
    }'
done

echo "switched in → first thread it wakes, p50 (µs), per thread:"
sort -t'	' -k1,1 -k2,2n "$work/firsts" | awk -F'	' '
  $1 != key { if (key != "") emit(); key = $1; n = 0 } { v[++n] = $2 }
  function emit() { if (n >= 100) printf "  %-40s %6.1f  (%d hops)\n", key, v[int((n + 1) / 2)], n }
  END { if (key != "") emit() }'
