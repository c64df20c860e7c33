#!/usr/bin/env python3
"""Where a decode step's GPU time goes, from `gpu_first_call.sh`'s ncu_s3 part.

Reads the CSV that `ncu --metrics gpu__time_duration.sum --csv --print-units base` wrote (one row
per kernel launch, in launch order), takes the launches of the last decode step (after the
second-to-last `argmax_rows`, which ends each step, through the last one) and prints each kernel's
count, total and share of the step, largest first.

Usage: ncu_step.py ncu_s3.csv
"""
import csv
import sys
from collections import defaultdict


def launches(path):
    """(kernel name, nanoseconds) per launch, in order."""
    with open(path, newline="") as f:
        lines = [l for l in f if l.startswith('"')]  # ncu's own messages are not quoted
    rows = list(csv.DictReader(lines))
    out = []
    for r in rows:
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        name = r["Kernel Name"].split("(")[0].strip()
        out.append((name, float(r["Metric Value"].replace(",", ""))))
    return out


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    ks = launches(sys.argv[1])
    ends = [i for i, (n, _) in enumerate(ks) if n == "argmax_rows"]
    if len(ends) < 2:
        sys.exit(f"{sys.argv[1]}: fewer than two argmax_rows launches ({len(ks)} kernels read)")
    step = ks[ends[-2] + 1 : ends[-1] + 1]
    total = sum(t for _, t in step)
    by = defaultdict(lambda: [0, 0.0])
    for n, t in step:
        by[n][0] += 1
        by[n][1] += t
    print(f"last decode step: {len(step)} launches, {total / 1e6:.3f} ms of kernel time")
    print("| kernel | launches | ms | share |")
    print("|---|---|---|---|")
    for n, (c, t) in sorted(by.items(), key=lambda kv: -kv[1][1]):
        print(f"| {n} | {c} | {t / 1e6:.3f} | {100 * t / total:.1f} % |")


if __name__ == "__main__":
    main()
