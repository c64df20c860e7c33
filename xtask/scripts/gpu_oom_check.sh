#!/bin/bash
# On the GPU machine (issue 22): a GPU that runs out of memory in the middle of a run gives a clear
# error, exit status 1, no hang and no offload files left behind. Another process (torch) takes the
# GPU's memory (A) before set-up, with --gpu-mem-limit claiming room that is not free, so the first
# weights cannot be placed; (B) while flexgen places its weights (once 30 GiB are in use), so
# placement fails part-way with pinned CPU parts held. Every device allocation is made before the
# first step (the block's buffers with the first block), so a run cannot fail later for memory.
# Usage: gpu_oom_check.sh [BIN_DIR]
B=${1:-target/release}
fail=0
D=$(mktemp -d)
HOG=$D/hog.py
cat > $HOG <<'PY'
import sys, time, torch
# hog.py WAIT_GIB LEAVE_GIB: once the GPU's used memory reaches WAIT_GIB, take all but LEAVE_GIB.
wait_gib, leave_gib = float(sys.argv[1]), float(sys.argv[2])
GiB = 1 << 30
t0 = time.time()
while True:
    free, total = torch.cuda.mem_get_info()
    if (total - free) / GiB >= wait_gib or time.time() - t0 > 300:
        break
    time.sleep(0.02)
free, total = torch.cuda.mem_get_info()
take = max(0, free - int(leave_gib * GiB))
held = []
while take > 0:
    n = min(take, 4 * GiB)
    try:
        held.append(torch.empty(n, dtype=torch.uint8, device="cuda"))
    except RuntimeError:
        break
    take -= n
print(f"hog: took {sum(h.numel() for h in held) / GiB:.1f} GiB at {time.time() - t0:.1f} s", flush=True)
open(sys.argv[3], "w").write("ready")
time.sleep(600)
PY
# case NAME WAIT_GIB then flexgen-run arguments
case_() {
  local name=$1 wait=$2; shift 2
  rm -f $D/ready; mkdir -p $D/off
  python3 $HOG "$wait" 1 $D/ready > $D/hog.txt 2>&1 &
  local hog=$!
  if [ "$wait" = 0 ]; then while [ ! -f $D/ready ]; do sleep 0.2; done; fi
  local t0=$SECONDS
  timeout 300 "$B/flexgen-run" "$@" --offload-dir $D/off > $D/out.txt 2> $D/err.txt
  local rc=$? secs=$((SECONDS - t0))
  kill $hog 2>/dev/null; wait $hog 2>/dev/null
  local left=$(ls -A $D/off | wc -l)
  echo "== $name: exit $rc after ${secs}s; $(cat $D/hog.txt); offload files left: $left; stdout lines: $(wc -l < $D/out.txt)"
  tail -3 $D/err.txt
  if [ $rc -ne 1 ] || ! grep -q "ran out of memory" $D/err.txt || [ $left -ne 0 ] || [ -s $D/out.txt ]; then
    echo "FAIL $name"; fail=1
  fi
}
M="--model opt-30b --dummy ones --prompt-len 512 --num-prompts 64 --max-new-tokens 32 --device cuda"
# (A) 1 GiB free, a limit that claims 120 GiB (the plan needs 104): the weights cannot be placed.
case_ "A: out of memory while placing the weights (some on disk)" 0 $M --percent 90 5 100 0 100 0 \
  --gpu-batch-size 64 --num-gpu-batches 1 --gpu-mem-limit 120GiB
# (B) once 30 GiB are in use (the weights being placed), all but 1 GiB of the rest is taken.
case_ "B: out of memory while placing the weights, part-way" 30 $M --percent 80 20 100 0 100 0 \
  --gpu-batch-size 64 --num-gpu-batches 1
rm -rf $D
echo "OOM checks: $( [ $fail = 0 ] && echo PASS || echo FAILURES )"
exit $fail
