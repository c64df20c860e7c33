#!/bin/bash
# Issue 8's suite on the GPU machine: flexgen with the policy flexgen-plan chose from
# flexgen-profile's profile of this machine, against the original FlexLLMGen and HF Accelerate, on
# the same scenarios, writing PART.jsonl (one line per run), PART.md (the table) and each run's log
# to $OUT. Parts (each fits one 10-minute device call; `all` runs them in order and draws the plots):
#   s2        OPT-30B with the GPU capped at 16 GiB, prompt 512, gen 32: the planner's policy with
#             compression allowed and with --no-compression.
#   s2flex    FlexLLMGen with its T4 policy (`20 80 0 100 0 100`, CPU attention) under the same
#             scenario at 48×K for K in FLEX_S2_BLOCKS (default 1: 48×3 and 48×2 are killed for
#             memory on a 125 GiB machine; give "3 2 1" to retry them), the first that survives.
#   s2accel   HF Accelerate under the same cap at the batches in ACCEL_BATCHES (default "14"). The
#             whole process is capped at ACCEL_WHOLE_CAP (default 16GiB), with ACCEL_GPU_MEM (default
#             3GiB) for the weights: its `max_memory` alone caps where weights go only (its KV cache
#             grew to 109 GiB at batch 128 in session 4), and with 8GiB of weights batch 8 ran out
#             of memory. Batch 14 peaked at 12.3 GiB (session 5). ACCEL_WHOLE_CAP= (empty) and
#             ACCEL_GPU_MEM=16GiB ACCEL_BATCHES="32 128" give session 4's weights-only cap.
#   sweep30   the latency–throughput sweep under the same cap: the planner's uncompressed policy at
#             fixed blocks (SWEEP30_BLOCKS, e.g. "8x1 24x1 12x6") and FlexLLMGen's T4 policy at FLEX_SWEEP30 blocks (set
#             it empty to skip them); the plot joins these with the s2, s2flex and s2accel points.
#   sweep175  OPT-175B, weights and cache compressed, the whole H200: the planner's policy at fixed
#             blocks (SWEEP175_BLOCKS) and FlexLLMGen with the same policy at FLEX_SWEEP175 blocks
#             (empty: none)
#             (Accelerate cannot hold OPT-175B's 350 GB of fp16 weights in this machine's memory).
# Usage, in the repository root there:
#   bash xtask/scripts/gpu_suite.sh s2|s2flex|s2accel|sweep30|sweep175|plots|all
# BIN: stripped release binaries incl. xtask (default .gpu/bin, from `cargo xtask bench gpu`);
# FLEX: FlexLLMGen's source and runner (default .gpu/flex); ANCHORS: hf_accel_opt.py (.gpu/anchors).
set -o pipefail
BIN=${BIN:-.gpu/bin}; FLEX=${FLEX:-.gpu/flex}; ANCHORS=${ANCHORS:-.gpu/anchors}; OUT=${OUT:-/tmp}
case $BIN in /*) ;; *) BIN=$PWD/$BIN ;; esac
export OUT PATH=$BIN:$PATH PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
part=${1:?usage: gpu_suite.sh s2|s2flex|s2accel|sweep30|sweep175|plots|all}
WORK=512; GEN=32
say() { echo "[$(date +%T)] $*"; }

# Appends one result line to $res: system, label, then the numbers parsed from a log or a report.
ours() { # label, json report
  python3 - "$1" "$2" >> "$res" <<'EOF'
import json, sys
label, path = sys.argv[1], sys.argv[2]
try:
    r = json.load(open(path))
except Exception as e:
    print(json.dumps({"system": "flexgen", "label": label, "error": str(e)[:200]})); sys.exit()
pol = r.get("policy", {})
bits = [k for k in ("compress_weight", "compress_cache") if pol.get(k)]
series = "flexgen, 4-bit " + " and ".join(k[9:] for k in bits) if bits else "flexgen"
print(json.dumps({"system": "flexgen", "series": series, "label": label,
    "prefill_tok_s": r["prefill_tokens_per_s"], "decode_tok_s": r["decode_tokens_per_s"],
    "throughput": r["total_tokens_per_s"], "latency_s": r["prefill_s"] + r["decode_s"],
    "wall_s": r["wall_s"], "predicted_tok_s": r.get("predicted_tokens_per_s"),
    "roofline_fraction": r.get("roofline_fraction")}))
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
row = {"system": "FlexLLMGen", "label": label, "prefill_tok_s": f("prefill"),
       "decode_tok_s": f("decode"), "throughput": f("total"),
       "latency_s": float(lat.group(1)) if lat else None}
if not lat:
    row["error"] = (t.strip().splitlines() or ["no output (killed?)"])[-1][:200]
print(json.dumps(row))
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
    row["error"] = (t.strip().splitlines() or ["no output (killed or timed out?)"])[-1][:200]
print(json.dumps(row))
EOF
}
table() { # jsonl → markdown
  python3 - "$1" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| system | run | prefill tok/s | decode tok/s | total tok/s | latency s | note |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    g = lambda k: "" if r.get(k) is None else f"{r[k]:,.1f}"
    note = r.get("error") or ""
    if r.get("predicted_tok_s"):
        note = f"planner predicted {r['predicted_tok_s']:.1f} tok/s"
    print(f"| {r['system']} | {r['label']} | {g('prefill_tok_s')} | {g('decode_tok_s')} | {g('throughput')} | {g('latency_s')} | {note} |")
EOF
}
run_ours() { # tag, label, flexgen-run arguments…
  local tag=$1 label=$2; shift 2
  say "flexgen $label"
  /usr/bin/time -f "process_wall=%es" flexgen-run --device cuda --dummy --prompt-len $WORK \
    --max-new-tokens $GEN -q --json "$@" > "$OUT/$tag.json" 2> "$OUT/$tag.err"
  ours "$label" "$OUT/$tag.json"; tail -2 "$OUT/$tag.err"
}
run_flex() { # tag, label, timeout, flex_opt arguments
  say "FlexLLMGen $2"
  FLEX_TAG=$1 FLEX_TIMEOUT=$3 bash "$FLEX/flexllmgen.sh" "$4" > /dev/null
  flex "$2" "$OUT/${1}_1.log"; grep -E "total throughput|rc=" "$OUT/${1}_1.log" | tail -1
}
profile() { # the machine's profile, measured once per $OUT
  [ -s "$OUT/profile.toml" ] || flexgen-profile --quick --out "$OUT/profile.toml" > "$OUT/profile.log" 2>&1
}
S2CAP="--gpu-mem-limit 16GiB"
T4="--model facebook/opt-30b --percent 20 80 0 100 0 100 --prompt-len $WORK --gen-len $GEN --cpu-cache-compute"

s2() {
  res=$OUT/s2.jsonl; : > "$res"; profile
  for mode in planned no-compression; do
    flag=; [ $mode = no-compression ] && flag=--no-compression
    flexgen-plan --hardware "$OUT/profile.toml" --model opt-30b --prompt-len $WORK --gen-len $GEN \
      $S2CAP $flag --explain --out "$OUT/s2-$mode.toml" > "$OUT/plan-$mode.log" 2>&1
    tail -1 "$OUT/plan-$mode.log"
    label=plan; [ $mode = no-compression ] && label="plan, fp16"
    run_ours "s2-$mode" "$label" --policy "$OUT/s2-$mode.toml" --model opt-30b $S2CAP
  done
}
s2flex() {
  res=$OUT/s2flex.jsonl; : > "$res"
  for k in ${FLEX_S2_BLOCKS:-1}; do
    run_flex "s2flex$k" "T4 48x$k" 300 "$T4 --gpu-batch-size 48 --num-gpu-batches $k"
    grep -q "total throughput" "$OUT/s2flex${k}_1.log" && break
  done
}
s2accel() {
  res=$OUT/s2accel.jsonl; : > "$res"
  local cap=${ACCEL_WHOLE_CAP-16GiB} whole=
  [ -n "$cap" ] && whole="--whole-cap $cap"
  for b in ${ACCEL_BATCHES:-14}; do
    say "HF Accelerate batch $b"
    timeout ${ACCEL_TIMEOUT:-450} python3 "$ANCHORS/hf_accel_opt.py" --model opt-30b --batch $b \
      --prompt-len $WORK --gen-len $GEN --gpu-mem ${ACCEL_GPU_MEM:-3GiB} --cpu-mem 110GiB \
      $whole > "$OUT/s2-accel$b.log" 2>&1
    accel "b$b" "$OUT/s2-accel$b.log"; tail -1 "$OUT/s2-accel$b.log"
  done
}
sweep30() {
  res=$OUT/sweep30.jsonl; : > "$res"; profile
  for bk in ${SWEEP30_BLOCKS:-8x1 24x1 12x6}; do
    set -- ${bk/x/ }
    flexgen-plan --hardware "$OUT/profile.toml" --model opt-30b --prompt-len $WORK --gen-len $GEN \
      $S2CAP --no-compression --gpu-batch-size $1 --num-gpu-batches $2 --out "$OUT/sw30-$1x$2.toml" > /dev/null 2>&1
    run_ours "sw30-$1x$2" "fp16 $1x$2" --policy "$OUT/sw30-$1x$2.toml" --model opt-30b $S2CAP
  done
  for bk in ${FLEX_SWEEP30-16x1}; do
    set -- ${bk/x/ }
    run_flex "sw30flex$1x$2" "T4 $1x$2" 300 "$T4 --gpu-batch-size $1 --num-gpu-batches $2"
  done
}
sweep175() {
  res=$OUT/sweep175.jsonl; : > "$res"
  for bk in ${SWEEP175_BLOCKS:-8x1 16x1 32x1}; do
    set -- ${bk/x/ }
    flexgen-plan --hardware policies/hardware/h200.toml --model opt-175b --prompt-len $WORK \
      --gen-len $GEN --compress-weight --compress-cache --gpu-batch-size $1 --num-gpu-batches $2 \
      --out "$OUT/sw175-$1x$2.toml" > /dev/null 2>&1
    run_ours "sw175-$1x$2" "$1x$2" --policy "$OUT/sw175-$1x$2.toml" --model opt-175b
  done
  for bk in ${FLEX_SWEEP175-8x1}; do
    set -- ${bk/x/ }
    pct=$(python3 -c "import tomllib;p=tomllib.load(open('$OUT/sw175-$1x$2.toml','rb'));pl=p['placement'];print(*[round(pl[k][t]) for k in ('weights','kv_cache','activations') for t in ('gpu','cpu')])")
    run_flex "sw175flex$1x$2" "$1x$2" 400 "--model facebook/opt-175b --percent $pct --gpu-batch-size $1 --num-gpu-batches $2 --prompt-len $WORK --gen-len $GEN --compress-weight --compress-cache"
  done
}
plots() { # the figures, from every part's lines that are present
  local in30 in175
  in30=$(ls "$OUT"/s2.jsonl "$OUT"/s2flex.jsonl "$OUT"/s2accel.jsonl "$OUT"/sweep30.jsonl 2>/dev/null | paste -sd,)
  [ -n "$in30" ] && xtask plot --input "$in30" --out "$OUT/opt-30b-16gib.png" --title "OPT-30B, GPU capped at 16 GiB (H200), prompt 512, gen 32"
  [ -s "$OUT/sweep175.jsonl" ] && xtask plot --input "$OUT/sweep175.jsonl" --out "$OUT/opt-175b-compressed.png" --title "OPT-175B, 4-bit weights and cache (H200), prompt 512, gen 32"
}

case $part in
  s2|s2flex|s2accel|sweep30|sweep175) $part; table "$res" > "$OUT/$part.md"; cat "$OUT/$part.md" ;;
  all) for p in s2 s2flex s2accel sweep30 sweep175; do $p; table "$res" > "$OUT/$p.md"; cat "$OUT/$p.md"; done; plots ;;
  plots) plots ;;
  *) echo "unknown part $part"; exit 2 ;;
esac
