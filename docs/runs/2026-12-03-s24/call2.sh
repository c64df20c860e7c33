# Session 24, call 2: gemv4_bench under kernels.cu tunings of the tensor-core layout (GT_TC=1),
# then as built (dim-0 layout), then Marlin, in one call. Run from the repository root on the GPU
# machine with .gpu/pack carried: bash docs/runs/2026-12-03-s24/call2.sh
set -u
mkdir -p .gpu/bin && tar xJf .gpu/pack/bin.tar.xz -C .gpu/bin
L=$OUT/l; mkdir -p "$L"
run() { local name=$1; shift; local s; s=$(date +%s)
  FLEXGEN_NVRTC_DEFINES="$*" timeout 120 .gpu/bin/gemv4_bench > "$L/gemv4_$name.log" 2>&1
  echo "$name ($*) rc=$? $(( $(date +%s) - s )) s" | tee -a "$L/times.txt"; }
run tc GT_TC=1
run tc_k864 GT_TC=1 GT_K8=64
run tc_st4 GT_TC=1 GT_STAGES=4
run tc_mb83 GT_TC=1 GT_MINB8=3
run tc_mb44 GT_TC=1 GT_MINB4=4
run base
s=$(date +%s); timeout 200 bash xtask/scripts/marlin_anchor.sh .gpu/pack/marlin > "$L/marlin.log" 2>&1
echo "marlin rc=$? $(( $(date +%s) - s )) s" | tee -a "$L/times.txt"
grep -h "FAIL" "$L"/gemv4_*.log
tar czf "$OUT/call2.tgz" -C "$L" .
