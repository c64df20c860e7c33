#!/bin/bash
# On the GPU machine: CUDA pipeline stages on one GPU (issue 18). A policy's [[stage]] entries run
# as CUDA stages on GPU 0, each on its own thread under its own placement, the hidden states
# crossing by device-to-device (or pinned host) copies. The greedy tokens must equal the one-stage
# CUDA run's under every placement and split. Usage: gpu_pipeline_check.sh [BIN_DIR] (DEVICE=cpu:
# the same checks of the host pipeline, to try the script without a GPU; RANKS=1: each pipeline
# over processes instead, `--nproc` one per stage, with `--link ${LINK:-auto}`)
B=${1:-target/release}
fail=0
D=$(mktemp -d)
# stage_policy FILE "RANGES" "STAGE-PLACEMENT": the default policy with stages over RANGES (e.g.
# "0,2 2,4"); every stage after the first takes STAGE-PLACEMENT ("w_gpu w_cpu c_gpu c_cpu a_gpu
# a_cpu", remainders on disk), the first the top-level one (--percent).
stage_policy() {
  local file=$1 ranges=$2 pl=($3) i=0
  cp policies/default.toml "$file"
  for r in $ranges; do
    printf '\n[[stage]]\nlayers = [%s]\n' "$r" >> "$file"
    if [ $i -gt 0 ]; then
      printf '[stage.placement]\nweights = { gpu = %s, cpu = %s, disk = %s }\n' "${pl[0]}" "${pl[1]}" $((100 - pl[0] - pl[1])) >> "$file"
      printf 'kv_cache = { gpu = %s, cpu = %s, disk = %s }\n' "${pl[2]}" "${pl[3]}" $((100 - pl[2] - pl[3])) >> "$file"
      printf 'activations = { gpu = %s, cpu = %s, disk = %s }\n' "${pl[4]}" "${pl[5]}" $((100 - pl[4] - pl[5])) >> "$file"
    fi
    i=$((i + 1))
  done
}
SPLITS=("--gpu-batch-size 4 --num-gpu-batches 1" "--gpu-batch-size 2 --num-gpu-batches 2" "--gpu-batch-size 1 --num-gpu-batches 4")
# Later stages' placements, with CPU attention on or off.
LATER=("100 0 100 0 100 0|false" "0 100 0 100 100 0|true" "0 100 0 100 100 0|false" "30 40 50 50 0 100|true" "0 50 100 0 0 100|false")
RESULTS=$D/results; JOBS=${JOBS:-8}; : > $RESULTS
check() { # name, "RANGES…" (one per pipeline, ';'-separated), then flexgen-run arguments
  local name=$1 pipelines=$2; shift 2
  local ref=$D/ref-$name.txt
  if ! "$B/flexgen-run" "$@" --ignore-eos --device ${DEVICE:-cuda} > $ref 2> $D/ref.err; then
    echo "FAIL $name: one-stage CUDA run"; tail -3 $D/ref.err; fail=1; return
  fi
  IFS=';' read -ra PIPES <<< "$pipelines"
  for ranges in "${PIPES[@]}"; do
    for first in "100 0 100 0 100 0" "0 100 100 0 100 0"; do
      for later in "${LATER[@]}"; do
        for split in "${SPLITS[@]}"; do
          while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
          (
            w=$D/$BASHPID; mkdir -p $w
            stage_policy $w/p.toml "$ranges" "${later%|*}"
            label="$name [$ranges] first [$first] later [$later] $split"
            ranks=()
            [ -n "$RANKS" ] && ranks=(--nproc $(wc -w <<< "$ranges") --link ${LINK:-auto})
            if ! timeout 300 "$B/flexgen-run" "$@" "${ranks[@]}" --ignore-eos --device ${DEVICE:-cuda} --policy $w/p.toml --percent $first \
                 --cpu-cache-compute ${later#*|} $split --offload-dir $w/off > $w/out.txt 2> $w/err.txt; then
              echo "FAIL $label: $(tail -2 $w/err.txt | tr '\n' ' ')" >> $RESULTS
            elif ! cmp -s $ref $w/out.txt; then
              echo "DIFF $label: $(diff $ref $w/out.txt | head -3 | tr '\n' ' ')" >> $RESULTS
            else
              echo "OK $label" >> $RESULTS
            fi
            rm -rf $w
          ) &
        done
      done
    done
  done
  wait
  echo "checked $name: $(wc -l < $ref) sequences"; head -2 $ref | cut -c1-120
}
check bundled "0,2 2,4;0,1 1,3 3,4" --model crates/flexgen-model/models/opt-kjv --max-new-tokens 16 \
  --prompt "In the beginning" --prompt "And God said, Let there be light: and there was light" \
  --prompt "Jesus wept" --prompt "The LORD is my shepherd; I shall not want"
check tiny-llama "0,1 1,2" --model crates/flexgen-model/test_data/tiny-random-llama --max-new-tokens 12 \
  --prompt "Hello" --prompt "the quick brown fox jumps over" --prompt "a" --prompt "to be or not to be"
check opt-125m-random "0,4 4,8 8,12" --model opt-125m --dummy random --seed 3 --prompt-len 12 --num-prompts 4 --max-new-tokens 8
grep -v '^OK' $RESULTS && fail=1
echo "$(wc -l < $RESULTS) ${RANKS:+over-process }CUDA pipeline runs compared; $( [ $fail = 0 ] && echo ALL EQUAL || echo FAILURES )"
rm -rf $D
exit $fail
