# Session 25, call 5: flexgen-profile --quick on the H200 with the profile's new
# gpu.compute_capability (from NVML), and flexgen-plan reading it back. Run from the repository
# root on the GPU machine with .gpu/pack carried: bash docs/runs/2026-12-04-s25/call5.sh
set -u
mkdir -p .gpu/bin && tar xJf .gpu/pack/bin.tar.xz -C .gpu/bin
cat .gpu/bin/BUILT_FROM > "$OUT/commit.txt"
timeout 150 .gpu/bin/flexgen-profile --quick --name h200-quick --out "$OUT/h200-quick.toml" > "$OUT/profile.log" 2>&1
echo "rc=$?" >> "$OUT/profile.log"
timeout 30 .gpu/bin/flexgen-plan --hardware "$OUT/h200-quick.toml" --model opt-30b --prompt-len 512 \
  --gen-len 32 --compress-weight --gpu-batch-size 16 --num-gpu-batches 1 --out "$OUT/plan.toml" > "$OUT/plan.log" 2>&1
echo "rc=$?" >> "$OUT/plan.log"
cat "$OUT/profile.log" "$OUT/plan.log"; grep -A14 "^\[gpu\]" "$OUT/h200-quick.toml"
