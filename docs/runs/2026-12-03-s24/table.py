"""Marlin's time beside gemm4_tc's from gemv4_bench logs of one call:
python3 table.py MARLIN_LOG LABEL=GEMV4_LOG ... (rows 1, 8, 16, 32, 64 of each weight)."""
import sys


def ours(path):
    d = {}
    for l in open(path):
        if l.startswith("| OPT"):
            c = [x.strip() for x in l.strip().strip("|").split("|")]
            d[(c[0].split(" (")[0], int(c[1]))] = float(c[9].split()[0])
    return d


def marlin(path):
    d = {}
    for l in open(path):
        if l.startswith("|") and "OPT" in l:
            c = [x.strip() for x in l.strip().strip("|").split("|")]
            d[(c[0].split(" (")[0], int(c[1]))] = float(c[3])
    return d


m = marlin(sys.argv[1])
runs = [(a.split("=", 1)[0], ours(a.split("=", 1)[1])) for a in sys.argv[2:]]
print("| weight | rows | Marlin ms | " + " | ".join(f"{n} ms" for n, _ in runs) + " | " + " | ".join(f"Marlin / {n}" for n, _ in runs) + " |")
print("|---|---|---|" + "---|" * (2 * len(runs)))
for k in runs[0][1]:
    if k in m and k[1] in (1, 8, 16, 32, 64):
        print(f"| {k[0]} | {k[1]} | {m[k]:.3f} | " + " | ".join(f"{r[k]:.3f}" for _, r in runs) + " | " + " | ".join(f"{m[k] / r[k]:.2f}" for _, r in runs) + " |")
