#!/bin/bash
# On the GPU machine (issue 18): CUDA stages over processes, the cases the token check
# (`RANKS=1 gpu_pipeline_check.sh`) does not cover. (1) `--link nccl` with two ranks on one GPU:
# NCCL refuses two ranks on one device, so the run must stop with NCCL's reason, exit 1 and no
# hang. (2) A rank whose stage cannot be built is named by rank 0 and no rank hangs. (4) The
# report's memory counts every rank's (rank 1's weights on disk: disk bytes above 0). (3) Speed:
# OPT-6.7B (dummy), all on the GPU, prompt 512, gen 32, 64×2: one process, and two ranks over the
# TCP ring (hidden states through host memory) on the same GPU, and two stages in one process. Usage: gpu_ranks_check.sh [BIN_DIR]
B=${1:-target/release}
fail=0
D=$(mktemp -d)
M=crates/flexgen-model/models/opt-kjv
P=(--model $M --max-new-tokens 8 --prompt "In the beginning" --prompt "Jesus wept" --ignore-eos --device cuda)

echo "== (1) --link nccl, two ranks on one GPU"
start=$(date +%s)
timeout 180 "$B/flexgen-run" "${P[@]}" --nproc 2 --link nccl > $D/1.out 2> $D/1.err; rc=$?
echo "exit $rc after $(( $(date +%s) - start )) s; stdout $(wc -c < $D/1.out) bytes"; tail -4 $D/1.err
if [ $rc = 0 ] || [ $rc = 124 ] || ! grep -qi nccl $D/1.err; then echo "FAIL (1)"; fail=1; fi

echo "== (2) rank 1's stage cannot be built (offload folder blocked by a file)"
: > $D/blocker
cp policies/default.toml $D/p.toml
printf '\n[[stage]]\nlayers = [0, 2]\n[[stage]]\nlayers = [2, 4]\n[stage.placement]\nweights = { gpu = 0, cpu = 0, disk = 100 }\nkv_cache = { gpu = 100, cpu = 0, disk = 0 }\nactivations = { gpu = 100, cpu = 0, disk = 0 }\n' >> $D/p.toml
start=$(date +%s)
timeout 180 "$B/flexgen-run" "${P[@]}" --nproc 2 --policy $D/p.toml --offload-dir $D/blocker/off > $D/2.out 2> $D/2.err; rc=$?
echo "exit $rc after $(( $(date +%s) - start )) s"; tail -3 $D/2.err
if [ $rc = 0 ] || [ $rc = 124 ] || ! grep -q "rank 1" $D/2.err; then echo "FAIL (2)"; fail=1; fi
sleep 2; if pgrep -f "flexgen-run.*$D" > /dev/null; then echo "FAIL (2): a rank outlived rank 0"; fail=1; fi

echo "== (4) the report counts every rank: rank 1's weights on disk, two ranks over the TCP ring"
# (2)'s policy: rank 1's layers [2, 4) on disk, rank 0's on the GPU.
timeout 180 "$B/flexgen-run" "${P[@]}" --nproc 2 --link tcp --policy $D/p.toml --offload-dir $D/off4 --json > $D/4.out 2> $D/4.err; rc=$?
disk=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["tier_bytes"]["disk"])' $D/4.out 2>/dev/null)
echo "exit $rc; tier_bytes.disk ${disk:-?}"
if [ $rc != 0 ] || [ "${disk:-0}" -le 0 ]; then echo "FAIL (4): $(tail -3 $D/4.err | tr '\n' ' ')"; fail=1; fi

echo "== (3) speed: OPT-6.7B all on the GPU, 64x2, prompt 512, gen 32"
S=(--model opt-6.7b --dummy --prompt-len 512 --num-prompts 128 --max-new-tokens 32 --ignore-eos --device cuda
   --gpu-batch-size 64 --num-gpu-batches 2 --percent 100 0 100 0 100 0 --quiet)
cp policies/default.toml $D/two.toml
printf '\n[[stage]]\nlayers = [0, 16]\n[[stage]]\nlayers = [16, 32]\n' >> $D/two.toml
for run in "one process|" "two stages, one process|--policy $D/two.toml" "two ranks, tcp|--nproc 2 --link tcp"; do
  label=${run%|*}
  if "$B/flexgen-run" "${S[@]}" ${run#*|} > $D/3.out 2> $D/3.err; then
    echo "$label: $(grep -E 'throughput|decode' $D/3.out $D/3.err | head -4 | tr '\n' ' ')"
  else
    echo "FAIL (3) $label: $(tail -3 $D/3.err | tr '\n' ' ')"; fail=1
  fi
done
rm -rf $D
echo "ranks check: $( [ $fail = 0 ] && echo OK || echo FAILURES )"
exit $fail
