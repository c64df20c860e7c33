#!/bin/bash
# Issue 8's suite on the GPU machine, one part per device call (each fits the 10-minute limit):
#   s2       OPT-30B with the GPU capped at 16 GiB, prompt 512, gen 32: flexgen with the policy
#            flexgen-plan chose from flexgen-profile's profile of this machine; FlexLLMGen with its
#            T4 policy at the largest block that survives here; HF Accelerate at batch 32 and 128.
#   sweep30  OPT-30B latency–throughput: flexgen and FlexLLMGen over block sizes (weights on the
#            CPU, cache and activations on the GPU), as JSON lines for `cargo xtask plot`.
# Usage, in the repository root there: bash xtask/scripts/gpu_suite.sh s2|sweep30
# BIN: stripped release binaries (default .gpu/bin); ANCHORS: the anchors folder with FlexLLMGen's
# source in src/ (default .gpu/flex, hf_accel_opt.py from .gpu/anchors). Results go to $OUT:
# PART.jsonl (one line per run) and PART.md (the table), plus each run's log.
set -o pipefail
BIN=${BIN:-.gpu/bin}; FLEX=${FLEX:-.gpu/flex}; ANCHORS=${ANCHORS:-.gpu/anchors}; OUT=${OUT:-/tmp}
export OUT PATH=$PWD/$BIN:$PATH PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
part=${1:?usage: gpu_suite.sh s2|sweep30}
res=$OUT/$part.jsonl; : > "$res"

# Appends one result line: system, label, then the numbers parsed from a log or a JSON report.
ours() { # label, json report
  python3 - "$1" "$2" >> "$res" <<'EOF'
import json, sys
label, path = sys.argv[1], sys.argv[2]
try:
    r = json.load(open(path))
except Exception as e:
    print(json.dumps({"system": "flexgen", "label": label, "error": str(e)})); sys.exit()
print(json.dumps({"system": "flexgen", "label": label,
    "prefill_tok_s": r["prefill_tokens_per_s"], "decode_tok_s": r["decode_tokens_per_s"],
    "throughput": r["total_tokens_per_s"], "latency_s": r["prefill_s"] + r["decode_s"],
    "wall_s": r["wall_s"], "predicted_tok_s": r.get("predicted_tokens_per_s")}))
EOF
}
flex() { # label, log
  python3 - "$1" "$2" >> "$res" <<'EOF'
import json, re, sys
label, path = sys.argv[1], sys.argv[2]
t = open(path, errors="replace").read()
def f(key):
    m = re.search(key + r" throughput: ([0-9.]+)", t); return float(m.group(1)) if m else None
lat = re.search(r"total latency: ([0-9.]+)", t)
print(json.dumps({"system": "FlexLLMGen", "label": label, "prefill_tok_s": f("prefill"),
    "decode_tok_s": f("decode"), "throughput": f("total"),
    "latency_s": float(lat.group(1)) if lat else None,
    "error": None if lat else (t.strip().splitlines() or ["no output"])[-1][:200]}))
EOF
}
accel() { # label, log
  python3 - "$1" "$2" >> "$res" <<'EOF'
import json, re, sys
label, path = sys.argv[1], sys.argv[2]
t = open(path, errors="replace").read()
m = re.search(r"RESULT .*generate ([0-9.]+) s, total ([0-9.]+) tok/s \| prefill step [0-9.]+ s "
              r"\(([0-9.]+) prompt tok/s\) \| decode [0-9.]+ s \(([0-9.]+) tok/s", t)
row = {"system": "HF Accelerate", "label": label}
if m:
    row.update(latency_s=float(m.group(1)), throughput=float(m.group(2)),
               prefill_tok_s=float(m.group(3)), decode_tok_s=float(m.group(4)))
else:
    row["error"] = (t.strip().splitlines() or ["no output"])[-1][:200]
print(json.dumps(row))
EOF
}

case $part in
s2)
  flexgen-profile --quick --out "$OUT/profile.toml" > "$OUT/profile.log" 2>&1
  flexgen-plan --hardware "$OUT/profile.toml" --model opt-30b --prompt-len 512 --gen-len 32 \
    --gpu-mem-limit 16GiB --no-compression --explain --out "$OUT/s2-policy.toml" 2>&1 | tee "$OUT/plan.log" | tail -12
  flexgen-run --device cuda --policy "$OUT/s2-policy.toml" --model opt-30b --dummy --prompt-len 512 \
    --max-new-tokens 32 --gpu-mem-limit 16GiB -q --json > "$OUT/s2-ours.json" 2> "$OUT/s2-ours.err"
  ours "planned, 16 GiB" "$OUT/s2-ours.json"; tail -3 "$OUT/s2-ours.err"
  # The original's T4 policy, at the largest block that is not killed for memory here.
  for k in 3 2 1; do
    FLEX_TAG=s2flex$k FLEX_TIMEOUT=200 bash "$FLEX/flexllmgen.sh" \
      "--model facebook/opt-30b --percent 20 80 0 100 0 100 --gpu-batch-size 48 --num-gpu-batches $k --prompt-len 512 --gen-len 32 --cpu-cache-compute"
    flex "T4 policy 48x$k" "$OUT/s2flex${k}_1.log"
    grep -q "total throughput" "$OUT/s2flex${k}_1.log" && break
  done
  for b in 32 128; do
    timeout 200 python3 "$ANCHORS/hf_accel_opt.py" --model opt-30b --batch $b --prompt-len 512 \
      --gen-len 32 --gpu-mem 16GiB --cpu-mem 110GiB > "$OUT/s2-accel$b.log" 2>&1
    accel "batch $b, 16 GiB" "$OUT/s2-accel$b.log"
  done
  ;;
sweep30)
  for bk in "8 1" "16 1" "32 1" "32 2"; do
    set -- $bk
    flexgen-run --device cuda --model opt-30b --dummy --percent 0 100 100 0 100 0 --gpu-batch-size $1 \
      --num-gpu-batches $2 --prompt-len 512 --max-new-tokens 32 -q --json > "$OUT/sw-$1x$2.json" 2> "$OUT/sw-$1x$2.err"
    ours "$1x$2" "$OUT/sw-$1x$2.json"
    FLEX_TAG=sw$1x$2 FLEX_TIMEOUT=200 bash "$FLEX/flexllmgen.sh" \
      "--model facebook/opt-30b --percent 0 100 100 0 100 0 --gpu-batch-size $1 --num-gpu-batches $2 --prompt-len 512 --gen-len 32"
    flex "$1x$2" "$OUT/sw$1x$2_1.log"
  done
  ;;
*) echo "unknown part $part"; exit 2 ;;
esac
python3 - "$res" > "$OUT/$part.md" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| system | run | prefill tok/s | decode tok/s | total tok/s | latency s | note |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    g = lambda k: "" if r.get(k) is None else f"{r[k]:,.1f}"
    print(f"| {r['system']} | {r['label']} | {g('prefill_tok_s')} | {g('decode_tok_s')} | {g('throughput')} | {g('latency_s')} | {r.get('error') or ''} |")
EOF
cat "$OUT/$part.md"
