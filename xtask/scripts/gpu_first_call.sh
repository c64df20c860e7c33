#!/bin/bash
# The first device call of a session on the GPU machine: the checks every change to the CUDA path
# must pass and the few figures each session re-reads, in one call, every log packed into
# $OUT/first_call.tgz (a call returns a handful of files; a tarball keeps every log).
# Usage (after unpacking .gpu/pack/bin.tar.xz into BIN_DIR): gpu_first_call.sh [BIN_DIR]
#   PARTS   which parts to run, in order (default "check bench executor pipeline ranks s4"):
#           check     cuda_check (kernels against the CPU, then kernel timings)
#           gemv4     gemv4_bench alone (the 4-bit products: checks, then timings)
#           engine    gpu_engine_check.sh equal (the CLI on CUDA against the CPU: bundled and tiny
#                     models, several placements; logs in engine/)
#           gemv4envs gemv4_bench once under each of GEMV4ENVS (environments, `;` apart, e.g.
#                     "FLEXGEN_NVRTC_DEFINES=GT_K=32")
#           marlin    Marlin's 4-bit product built and timed beside cuBLAS (marlin_anchor.sh; MARLIN:
#                     the folder of its marlin_cuda_kernel.cu, default .gpu/pack/marlin)
#           variants  gemv4_bench and cuda_check under each of VARIANTS (FLEXGEN_NVRTC_DEFINES
#                     values, `;` apart)
#           envs      cuda_check under each of ENVS (environments, `;` apart)
#           ncu       Nsight Compute on gemm4_tc at 1, 32 and 64 rows (OPT-175B fc1)
#           bench     gemv4_bench and
#                     host_attention_bench at 1,024 × 1 and 64 × 8, fp16 and 4-bit packed
#           executor  gpu_executor_check.sh (every placement's tokens; JOBS at a time, default 8)
#           pipeline  gpu_pipeline_check.sh with RANKS=1 LINK=tcp (in-process and over-process)
#           ranks     gpu_ranks_check.sh
#           s4        OPT-6.7B all on the GPU, 64×1, prompt 512, 32 new tokens, twice with
#                     FLEXGEN_LT=all, between them as shipped and with FLEXGEN_LT=0
#           s3        OPT-175B, 4-bit weights and cache all on the GPU, 32×1 (not by default)
#           s3b       s3 with FLEXGEN_FUSED4_STORE=0 (each 4-bit product's store a kernel of its own)
#           s3envs    s3 once under each of S3ENVS (environments, `;` apart, each "NAME=VALUE ...")
#           s4envs    S4 (as shipped) once under each of S4ENVS, the same way
#           s10       OPT-175B under a 15 GiB cap (S10), prompt 512, 32 new tokens, once under each
#                     policy file of S10POLICIES (paths, space apart; default .gpu/pack/s10*.toml)
#           ncu_attn  Nsight Compute's full set on S3's decode attention and 32-row products
#           ncu_s3    S3's shape with 4 layers and 2 new tokens under Nsight Compute, every kernel's time (one metric,
#                     clocks as they run) in ncu_s3.csv: where a decode step goes (not by default;
#                     `python3 xtask/scripts/ncu_step.py ncu_s3.csv` sums the last step by kernel)
# Each part's wall time and exit status go to times.txt; the script's status is 1 if any failed.
B=$(cd "${1:-.gpu/bin}" && pwd) || exit 2
export PATH="$B:$PATH" NCCL_NVLS_ENABLE=0
LOGS=$(mktemp -d)
OUT=${OUT:-/tmp}
fail=0
t() { # name, time limit (s), command... (a part run again keeps each log: NAME_2.log, …)
  local n=$1 lim=$2 base=$1 i=2; shift 2
  while [ -e "$LOGS/$n.log" ]; do n="${base}_$i" i=$((i + 1)); done
  local s; s=$(date +%s)
  timeout "$lim" "$@" > "$LOGS/$n.log" 2>&1
  local rc=$?
  echo "$n rc=$rc $(( $(date +%s) - s )) s" >> "$LOGS/times.txt"
  [ $rc -eq 0 ] || fail=1
  pack # after every part: a call cut at its time limit still returns the logs so far
}
pack() { tar czf "$OUT/first_call.tgz.part" -C "$LOGS" . && mv "$OUT/first_call.tgz.part" "$OUT/first_call.tgz"; }
under_each() { # environments (`;` apart, each "NAME=VALUE ..."), log prefix, time limit (s), command...
  local list=$1 prefix=$2 lim=$3 es e kv name; shift 3
  IFS=';' read -ra es <<< "$list"
  for e in "${es[@]}"; do
    read -ra kv <<< "$e"
    name="${prefix}_${e// /_}"
    t "$name" "$lim" env "${kv[@]}" "$@"
  done
}
trap pack EXIT
{ echo "binaries built from $(cat "$B/BUILT_FROM" 2>/dev/null || echo '?')"; git log --oneline -1; } > "$LOGS/commit.txt" 2>/dev/null
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >> "$LOGS/commit.txt" 2>&1
# OPT-175B's layers, four of them, as a config.json alone (flexgen-run --dummy takes its shape):
# the same kernels a layer, and ncu's time per launch spent on 24 times fewer launches.
opt175_4() {
  python3 xtask/scripts/opt_config.py "$LOGS/opt-175b-4" 12288 49152 96 4 50272 2048
}
# S3's policy and workload (the model and new tokens after them).
S3=(--device cuda --dummy --percent 100 0 100 0 100 0 --gpu-batch-size 32 --num-gpu-batches 1
  --compress-weight --compress-cache --prompt-len 512 --json)
S3_4=("${S3[@]}" --model "$LOGS/opt-175b-4" --max-new-tokens 2)
S4=(--device cuda --model opt-6.7b --dummy --percent 100 0 100 0 100 0 --gpu-batch-size 64
  --num-gpu-batches 1 --prompt-len 512 --max-new-tokens 32 --json)
for part in ${PARTS:-check bench executor pipeline ranks s4}; do
  case $part in
    check) t cuda_check 120 "$B/cuda_check" ;;
    gemv4) t gemv4 180 "$B/gemv4_bench" ;;
    engine) t engine 300 env BIN="$B" OUT="$LOGS/engine" bash xtask/scripts/gpu_engine_check.sh equal ;;
    gemv4envs) under_each "${GEMV4ENVS:?gemv4envs needs GEMV4ENVS}" gemv4 180 "$B/gemv4_bench" ;;
    marlin) t marlin 300 bash xtask/scripts/marlin_anchor.sh "${MARLIN:-.gpu/pack/marlin}" ;;
    variants)
      # gemv4_bench and cuda_check once per kernels.cu tuning (VARIANTS: FLEXGEN_NVRTC_DEFINES
      # values, `;` apart).
      IFS=';' read -ra vs <<< "${VARIANTS:-GT_MINB=5}"
      for v in "${vs[@]}"; do
        FLEXGEN_NVRTC_DEFINES="$v" t "gemv4_${v// /_}" 120 "$B/gemv4_bench"
        FLEXGEN_NVRTC_DEFINES="$v" t "check_${v// /_}" 120 "$B/cuda_check"
      done ;;
    envs)
      # cuda_check once per environment (ENVS: `;` apart, each "NAME=VALUE ..."), e.g.
      # ENVS="FLEXGEN_Q4_WARPS=8;FLEXGEN_Q4_WARPS=2" for the attention's timing line.
      under_each "${ENVS:-FLEXGEN_Q4_WARPS=8}" check 120 "$B/cuda_check" ;;
    ncu)
      # Nsight Compute on the tensor-core 4-bit product at OPT-175B fc1's shape, 1, 32 and 64 rows
      # (gemm4_tc_1, _4, _8: each kernel's sixth launch in gemv4_bench, after its five in the
      # checks): stalls, pipes, instructions.
      NCU=(ncu --clock-control none --set full --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum")
      for k in 1 4 8; do t "ncu_tc$k" 150 "${NCU[@]}" -k "regex:gemm4_tc_$k" -s 5 -c 1 "$B/gemv4_bench"; done ;;
    bench)
      t gemv4 180 "$B/gemv4_bench"
      for a in "1024 512 1 15 0" "1024 512 1 15 4" "64 512 8 15 0" "64 512 8 15 4"; do
        t "hab_${a// /_}" 60 "$B/host_attention_bench" $a
      done ;;
    executor) JOBS=${JOBS:-8} t executor 480 bash xtask/scripts/gpu_executor_check.sh "$B" ;;
    pipeline) JOBS=${JOBS:-8} RANKS=1 LINK=tcp t pipeline 240 bash xtask/scripts/gpu_pipeline_check.sh "$B" ;;
    ranks) t ranks 120 bash xtask/scripts/gpu_ranks_check.sh "$B" ;;
    s4)
      # a and b with every single GEMM through cuBLASLt (FLEXGEN_LT=all); between them d as
      # shipped (cuBLASLt for the GEMMs with a bias) and c with cuBLAS only (FLEXGEN_LT=0).
      for r in a:all d:bias c:0 b:all; do
        FLEXGEN_LT=${r#*:} t "s4${r%%:*}" 90 "$B/flexgen-run" "${S4[@]}"
      done ;;
    s4envs)
      under_each "${S4ENVS:-FLEXGEN_LT=0}" s4 90 "$B/flexgen-run" "${S4[@]}" ;;
    s10)
      for p in ${S10POLICIES:-.gpu/pack/s10*.toml}; do
        t "s10_$(basename "$p" .toml)" 300 "$B/flexgen-run" --device cuda --model opt-175b --dummy \
          --policy "$p" --gpu-mem-limit 15GiB --prompt-len 512 --max-new-tokens 32 --json
      done ;;
    s3)
      t s3 240 "$B/flexgen-run" "${S3[@]}" --model opt-175b --max-new-tokens 32 ;;
    s3b)
      # S3 with each 4-bit product's store as a kernel of its own (as before session 18).
      FLEXGEN_FUSED4_STORE=0 t s3b 240 "$B/flexgen-run" "${S3[@]}" --model opt-175b --max-new-tokens 32 ;;
    s3envs)
      under_each "${S3ENVS:-FLEXGEN_SPLIT_PACK=0}" s3 240 "$B/flexgen-run" "${S3[@]}" --model opt-175b --max-new-tokens 32 ;;
    ncu_s3)
      opt175_4
      t ncu_s3 300 ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
        --log-file "$LOGS/ncu_s3.csv" "$B/flexgen-run" "${S3_4[@]}" ;;
    ncu_attn)
      # Nsight Compute's full set on one decode step's attention over the packed cache and its
      # 32-row products (gemm4_tc_4: qkv, out, fc1, fc2 of the first decode layer), at S3's shape.
      opt175_4
      NCU=(ncu --clock-control none --set full)
      t ncu_attn 200 "${NCU[@]}" -k regex:decode_attention_q4 -c 1 "$B/flexgen-run" "${S3_4[@]}"
      t ncu_s3tc4 250 "${NCU[@]}" -k regex:gemm4_tc_4 -s 16 -c 4 "$B/flexgen-run" "${S3_4[@]}" ;;
    *) echo "unknown part $part (check gemv4 variants envs ncu bench executor pipeline ranks s4 s4envs s10 s3 s3b s3envs ncu_s3 ncu_attn)" >&2; fail=1 ;;
  esac
done
cat "$LOGS/times.txt"
tail -n 1 "$LOGS"/executor.log "$LOGS"/pipeline.log 2>/dev/null
grep -H '"decode_tokens_per_s"\|"total_tokens_per_s"\|"predicted_tokens_per_s"' "$LOGS"/s[134]*.log 2>/dev/null
exit $fail
