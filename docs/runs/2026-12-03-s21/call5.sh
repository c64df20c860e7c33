#!/bin/bash
# Session 21, call 5: Nsight Compute on our 4-bit product and Marlin's at 32 and 64 rows of
# OPT-175B's fc1 (49152 × 12288), same metrics as gpu_first_call.sh's ncu part.
# Run: OUT=$OUT bash docs/runs/2026-12-03-s21/call5.sh (after unpacking .gpu/pack/bin.tar.xz).
B=.gpu/bin
NCU=(ncu --clock-control none --set full --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum")
mb=$(mktemp -d)
MARLIN_RUN=0 bash xtask/scripts/marlin_anchor.sh .gpu/pack/marlin "$mb" > "$OUT/marlin_build.log" 2>&1
# gemm4_tc_4: its first launch is fc1 at 32 rows; gemm4_tc_8: five launches in the checks, then fc1 at 64.
timeout 150 "${NCU[@]}" -k regex:gemm4_tc_4 -s 1 -c 1 "$B/gemv4_bench" > "$OUT/ncu_tc4.log" 2>&1
timeout 150 "${NCU[@]}" -k regex:gemm4_tc_8 -s 5 -c 1 "$B/gemv4_bench" > "$OUT/ncu_tc8.log" 2>&1
# Marlin: 8 launches a configuration (a warm-up and 7), fc1 first: 32 rows from launch 40, 64 from 48.
timeout 150 "${NCU[@]}" -k regex:Marlin -s 40 -c 1 "$mb/marlin_bench" > "$OUT/ncu_marlin32.log" 2>&1
timeout 150 "${NCU[@]}" -k regex:Marlin -s 48 -c 1 "$mb/marlin_bench" > "$OUT/ncu_marlin64.log" 2>&1
for f in "$OUT"/ncu_*.log; do
  echo "== $f"
  grep -E "gemm4_tc|Marlin<|Grid Size|Duration|DRAM Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Executed Ipc A|inst_executed.sum|hmma_cycles|stalled_(long_scoreboard|short_scoreboard|wait|math_pipe_throttle|barrier|mio_throttle|not_selected|selected|dispatch_stall|lg_throttle|no_instruction)_per" "$f" | head -40
done
