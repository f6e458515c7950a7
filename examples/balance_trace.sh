#!/bin/bash
# Usage (from the checkout, after cargo build): bash examples/balance_trace.sh > trace.csv
# The output is the format of src/balance/traces/*.csv, replayed by the planner's tests.
# Records per-vCPU demand ((Δrun + Δwait) / Δt) of 4 one-vCPU test-guest VMs, 2 busy and 2 at
# a 50 % duty cycle, unpinned, every 2 s for 40 s.
bin=${BURST_QEMU:-target/debug/burst-qemu}   # cargo build first
$bin test-guest ${TMPDIR:-/tmp}/bq-trace-busy.bin; $bin test-guest --duty 50 ${TMPDIR:-/tmp}/bq-trace-d50.bin
pids=()
for img in busy d50 busy d50; do
  qemu-system-x86_64 -machine pc -nodefaults -display none -m 16 -accel tcg,thread=multi -name t,debug-threads=on -bios ${TMPDIR:-/tmp}/bq-trace-$img.bin &
  pids+=($!)
done
sleep 2
tids=()
for p in "${pids[@]}"; do for t in /proc/$p/task/*; do grep -q "CPU 0" $t/comm && tids+=("$p/task/$(basename $t)"); done; done
declare -A last
now() { date +%s%N; }
t0=$(now)
for t in "${tids[@]}"; do read r w x < /proc/$t/schedstat; last[$t]=$((r + w)); done
tl=$t0
echo "# t_s,heavy0,light1,heavy2,light3 (demand in CPUs); loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
for i in $(seq 1 20); do
  sleep 2
  tn=$(now); line=$(awk "BEGIN{printf \"%.1f\", ($tn-$t0)/1e9}")
  for t in "${tids[@]}"; do read r w x < /proc/$t/schedstat; s=$((r + w)); line+=",$(awk "BEGIN{printf \"%.3f\", ($s-${last[$t]})/($tn-$tl)}")"; last[$t]=$s; done
  tl=$tn; echo "$line"
done
echo "# loadavg at the end $(cut -d' ' -f1-3 /proc/loadavg)"
kill "${pids[@]}"; wait 2>/dev/null
