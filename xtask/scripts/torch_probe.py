#!/usr/bin/env python3
"""The same measurements as `flexgen-profile` (full mode), made with PyTorch, for comparison:
pinned/pageable host<->device copies of 1 GiB timed with CUDA events on a side stream, both
directions at once, a device-to-device copy, an fp16 GEMM 8192 x 28672 x 7168 and the batched
attention-score GEMM (1792 x 512 x 512 x 128). Prints one JSON line."""
import json
import torch

def timed(fn, reps=5):
    fn(); torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize()
        best = min(best, a.elapsed_time(b) / 1e3)
    return best

N = 1 << 30
s = torch.cuda.Stream()
with torch.cuda.stream(s):
    pin = torch.ones(N, dtype=torch.uint8).pin_memory()
    pin2 = torch.empty(N, dtype=torch.uint8).pin_memory()
    page = torch.ones(N, dtype=torch.uint8)
    dev = torch.empty(N, dtype=torch.uint8, device="cuda")
    dev2 = torch.ones(N, dtype=torch.uint8, device="cuda")
    r = {}
    r["h2d_pinned"] = N / timed(lambda: dev.copy_(pin, non_blocking=True))
    r["d2h_pinned"] = N / timed(lambda: pin2.copy_(dev2, non_blocking=True))
    r["h2d_pageable"] = N / timed(lambda: dev.copy_(page, non_blocking=True))
    r["hbm_copy"] = 2 * N / timed(lambda: dev.copy_(dev2))
    m, n, k = 8192, 4 * 7168, 7168
    a = torch.randn(m, k, dtype=torch.float16, device="cuda") / 10
    w = torch.randn(n, k, dtype=torch.float16, device="cuda") / 10
    r["gemm_fp16"] = 2 * m * n * k / timed(lambda: a @ w.t())
    q = torch.randn(1792, 512, 128, dtype=torch.float16, device="cuda")
    r["attention_scores"] = 2 * 1792 * 512 * 512 * 128 / timed(lambda: torch.bmm(q, q.transpose(1, 2)))
# both directions at once, on two streams
s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
def both():
    with torch.cuda.stream(s1):
        dev.copy_(pin, non_blocking=True)
    with torch.cuda.stream(s2):
        pin2.copy_(dev2, non_blocking=True)
    torch.cuda.current_stream().wait_stream(s1); torch.cuda.current_stream().wait_stream(s2)
r["bidirectional_pinned"] = 2 * N / timed(both)
r["device"] = torch.cuda.get_device_name(0)
r["torch"] = torch.__version__
print(json.dumps(r))
