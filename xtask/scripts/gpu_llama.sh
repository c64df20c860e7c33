#!/bin/bash
# Issue 17 on the GPU machine: the Llama family on the CUDA executor. Parts:
#   check   gpu_check (the GPU backend's layer math against the CPU and transformers) and the
#           executor checks (logits against transformers under four placements; tokens equal to
#           the CPU executor under every placement) on the tiny OPT, Llama, Llama-bf16, Mistral
#           and Qwen2 models
#   s9      Llama-3.1-70B, fp16, the planner's policy for the whole H200 (prompt 512, gen 32)
#   caps    the same model planned under a 24 GiB and a 16 GiB cap (CAPS), 4-bit weights allowed
#   accel   Llama-2-13B under a 16 GiB cap: ours (planned, fp16) and HF Accelerate offloading
#           (ACCEL_BATCHES, default "4 8"; weights on the GPU up to ACCEL_GPU_MEM, default 12GiB,
#           leaving the rest of the cap to its cache and activations)
#   ds      Llama-2-70B under a 48 GiB cap (DeepSpeed ZeRO-Inference's published shapes): fp16
#           with the cache offloaded, and 4-bit weights (DS="fp16 4bit"; JOB as for caps: the
#           unbounded 4-bit plan is a 1,536-prompt block, longer than one call)
# Usage, in the repository root: `bash xtask/scripts/gpu_llama.sh check|s9|caps|accel|ds ...`
# BIN: stripped release binaries (default .gpu/bin). HW: the hardware profile to plan with
# (default policies/hardware/h200.toml). Logs go to $OUT (default /tmp).
set -o pipefail
BIN=${BIN:-.gpu/bin}; OUT=${OUT:-/tmp}
export PATH=$PWD/$BIN:$PATH
T="/usr/bin/time -f process_wall=%es_maxRSS=%MKiB"
HW=${HW:-policies/hardware/h200.toml}  # the hardware profile the planner reads
W="--prompt-len 512 --gen-len 32"
# plan NAME MODEL PLAN-ARGS…: writes $OUT/NAME.toml and prints the planner's line
plan() { local n=$1 m=$2; shift 2; flexgen-plan --hardware $HW --model $m $W "$@" --out $OUT/$n.toml 2>&1 | tail -1; }
# run NAME MODEL RUN-ARGS…: the planned policy on dummy random weights
run() {
  local n=$1 m=$2; shift 2
  echo "=== $n ours: $(grep -E '^(gpu_batch_size|num_gpu_batches)' $OUT/$n.toml | tr '\n' ' ')"
  $T flexgen-run --device cuda --policy $OUT/$n.toml --model $m --dummy random --prompt-len 512 \
    --max-new-tokens 32 --offload-dir /tmp/flexgen-offload -q --json "$@" > $OUT/$n.json 2> $OUT/$n.err
  echo "rc=$?"; tail -6 $OUT/$n.err
  grep -E '"(prefill|decode|total)_tokens_per_s"|"predicted_tokens_per_s"|roofline' $OUT/$n.json | head -8
}
for part in "$@"; do case $part in
check)
  for m in opt opt-350m llama llama-bf16 mistral qwen2; do
    echo "== gpu_check tiny-random-$m"; $BIN/gpu_check crates/flexgen-model/test_data/tiny-random-$m
  done 2>&1 | tee $OUT/gpu_check.log | grep -E "==|FAIL|rel err" | head -60
  JOBS=8 bash xtask/scripts/gpu_executor_check.sh $BIN > $OUT/executor_check.log 2>&1; echo "executor check rc=$?"
  grep -E "^\||FAIL|DIFF|checked|compressed cache .*DIFF|runs compared|sampling" $OUT/executor_check.log | head -80
  ;;
s9)
  plan s9 llama-3.1-70b --no-compression; run s9 llama-3.1-70b ;;
caps) # CAPS (default "24 16") GiB; JOB: the planner's --num-prompts (default: free block size)
  for c in ${CAPS:-24 16}; do
    plan s9-${c}g llama-3.1-70b --gpu-mem-limit ${c}GiB ${JOB:+--num-prompts $JOB}
    run s9-${c}g llama-3.1-70b --gpu-mem-limit ${c}GiB
  done ;;
accel)
  plan l13-16g llama-2-13b --no-compression --gpu-mem-limit 16GiB; run l13-16g llama-2-13b --gpu-mem-limit 16GiB
  # One process (the model is built once) runs every batch size.
  timeout ${ACCEL_TIMEOUT:-300} python3 xtask/scripts/hf_accel_llama.py --model llama-2-13b \
    --batch ${ACCEL_BATCHES:-4 8} --prompt-len 512 --gen-len 32 --gpu-mem ${ACCEL_GPU_MEM:-12GiB} \
    --cpu-mem 110GiB > $OUT/accel.log 2>&1
  grep -E "RESULT|OOM|dispatched|built|Error" $OUT/accel.log | tail -6 ;;
ds) # DS (default "fp16 4bit"): which of the two; JOB: the planner's --num-prompts
  for d in ${DS:-fp16 4bit}; do
    case $d in fp16) f=--no-compression ;; 4bit) f=--compress-weight ;; *) echo "unknown DS $d"; exit 2 ;; esac
    plan ds-$d llama-2-70b $f --gpu-mem-limit 48GiB ${JOB:+--num-prompts $JOB}
    run ds-$d llama-2-70b --gpu-mem-limit 48GiB
  done ;;
*) echo "unknown part $part"; exit 2 ;;
esac; done
