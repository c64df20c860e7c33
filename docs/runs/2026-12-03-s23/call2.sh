#!/bin/bash
# Session 23, call 2: the 4-bit product beside Marlin with groups of 64 (FlexGen's, our default)
# and of 128 (Marlin's), S3 under each group size, and Nsight Compute on our 32- and 64-row tiles
# at OPT-175B's fc1 (as session 21's call 5, on today's kernels).
# Run: OUT=$OUT bash docs/runs/2026-12-03-s23/call2.sh (after unpacking .gpu/pack/bin.tar.xz;
# .gpu/pack/s3g64.toml and s3g128.toml are call2-s3g64.toml and call2-s3g128.toml here).
PARTS="gemv4 gemv4envs marlin" GEMV4ENVS="GEMV4_GROUP=128" OUT=$OUT bash xtask/scripts/gpu_first_call.sh .gpu/bin
B=.gpu/bin
for g in 64 128; do
  timeout 240 "$B/flexgen-run" --device cuda --model opt-175b --dummy --policy .gpu/pack/s3g$g.toml \
    --prompt-len 512 --max-new-tokens 32 --json > "$OUT/s3_g$g.log" 2>&1
  echo "s3_g$g rc=$?" >> "$OUT/times2.txt"
done
NCU=(ncu --clock-control none --set full --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum")
# gemm4_tc_4: its first launch is fc1 at 32 rows; gemm4_tc_8: five launches in the checks, then fc1 at 64.
timeout 150 "${NCU[@]}" -k regex:gemm4_tc_4 -s 1 -c 1 "$B/gemv4_bench" > "$OUT/ncu_tc4.log" 2>&1
timeout 150 "${NCU[@]}" -k regex:gemm4_tc_8 -s 5 -c 1 "$B/gemv4_bench" > "$OUT/ncu_tc8.log" 2>&1
for f in "$OUT"/s3_g*.log; do echo "== $f"; grep -E '"(decode|total)_tokens_per_s"' "$f"; done
for f in "$OUT"/ncu_*.log; do
  echo "== $f"
  grep -E "gemm4_tc|Duration|DRAM Throughput|Registers Per|inst_executed.sum|hmma_cycles" "$f" | head -10
done
