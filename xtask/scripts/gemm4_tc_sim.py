# gemm4_tc_tile (crates/flexgen-tensor/src/cuda/kernels.cu) transcribed to numpy, block by block,
# thread by thread: its loads into shared memory, each lane's A and B fragments and the mma
# m16n8k16 layout (PTX ISA: a0..a7 / b0..b3 / c0..c3 by groupID = lane / 4 and lane % 4), against
# a plain product of the dequantized weight. A check of the kernel's index arithmetic on a machine
# without a GPU (`python3 xtask/scripts/gemm4_tc_sim.py`, needs numpy); it is a transcription, so
# the kernel itself is checked on the GPU by `gemv4_bench`. Fails (AssertionError) on a wrong index.
import numpy as np
rng = np.random.default_rng(0)
def f16(v): return np.float16(v)
def run(outs, ins, ldx, nb, gs, NT):
    GT_K, GT_O = 64, 256
    chunks = -(-outs // gs)
    assert (chunks * gs) % 32 == 0
    per_input = chunks * gs // 2
    # codes: [ins][chunks*gs] nibbles; params pairs [ins*chunks] (min, scale)
    q = rng.integers(0, 16, size=(ins, chunks * gs))
    codes = np.zeros(ins * per_input, dtype=np.uint8)
    for i in range(ins):
        for o in range(chunks * gs):
            codes[i * per_input + o // 2] |= q[i, o] << (4 * (o & 1))
    mn = rng.uniform(-0.1, 0, size=ins * chunks).astype(np.float16)
    sc = rng.uniform(0, 0.02, size=ins * chunks).astype(np.float16)
    x = rng.uniform(-1, 1, size=(nb, ldx)).astype(np.float16)
    # reference W[o, i]
    W = np.zeros((outs, ins), dtype=np.float32)
    for i in range(ins):
        for o in range(outs):
            g = i * chunks + o // gs
            W[o, i] = np.float16(np.float32(mn[g]) + np.float32(q[i, o]) * np.float32(sc[g]))
    ref = x[:, :ins].astype(np.float64) @ W.T.astype(np.float64)
    y = np.zeros((nb, outs), dtype=np.float64)
    # plan
    blocks = -(-outs // GT_O); steps = max(-(-ins // GT_K), 1)
    slices = min(max(-(-(4 * 132) // blocks), 1), steps)
    per_slice = -(-steps // slices) * GT_K
    slices = max(-(-ins // per_slice), 1)
    gpb = GT_O // gs
    for bx in range(blocks):
        for by in range(slices):
            o_blk = bx * GT_O
            i0 = by * per_slice; i1 = min(ins, i0 + per_slice)
            acc = np.zeros((8, 2, 32, NT, 4))
            for k0 in range(i0, i1, GT_K):
                # shared memory: codes [quad][byte column] as 4 bytes (inputs 4p..4p+3), pairs
                # [group][input], x [row][input]
                cs = np.zeros((GT_K // 4, GT_O // 2 + 8, 4), dtype=np.uint8)
                ps_min = np.zeros((GT_O // 16, GT_K + 4)); ps_sc = np.zeros((GT_O // 16, GT_K + 4))
                xs = np.zeros((8 * NT, GT_K + 16))
                for tid in range(256):
                    cq, cb = tid >> 4, tid & 15
                    rc = np.zeros((4, 8), dtype=np.uint8)
                    for j in range(4):
                        i = k0 + 4 * cq + j
                        if i < i1 and o_blk + 16 * cb < chunks * gs:
                            off = i * per_input + o_blk // 2 + 8 * cb
                            rc[j] = codes[off:off + 8]
                    for m in range(8):  # the transpose: word 8cb + m holds column m of the 4 inputs
                        cs[cq, 8 * cb + m] = rc[:, m]
                    for u in range(1 if NT < 4 else NT // 4):
                        e = tid + 256 * u; r = e // (GT_K // 8); c8 = e % (GT_K // 8); i = k0 + 8 * c8
                        if r < 8 * NT and r < nb and i < i1:
                            for j in range(8):
                                if i + j < i1: xs[r, 8 * c8 + j] = x[r, i + j]
                    for u in range(4):
                        e = tid + 256 * u; i = k0 + e // gpb; qq = e % gpb; ch = o_blk // gs + qq
                        if e < GT_K * gpb and i < i1 and ch < chunks:
                            ps_min[e % gpb, e // gpb] = mn[i * chunks + ch]; ps_sc[e % gpb, e // gpb] = sc[i * chunks + ch]
                for warp in range(8):
                  for mt in range(2):
                    grp = (32 * warp + 16 * mt) // gs
                    for kb in range(0, GT_K, 16):
                        Am = np.zeros((16, 16))
                        Bn = [np.zeros((16, 8)) for _ in range(NT)]
                        for lane in range(32):
                            g = lane >> 2; t = lane & 3; col = 16 * warp + 8 * mt + g
                            wb = cs[kb // 4 + t, col]  # bytes of inputs kb + 4t + j
                            def dq(j, hi):
                                i = kb + 4 * t + j
                                q = (int(wb[j]) >> (4 * hi)) & 15
                                return np.float16(np.float32(ps_min[grp, i]) + np.float32(q) * np.float32(ps_sc[grp, i]))
                            # logical k 2t, 2t+1, 2t+8, 2t+9 = inputs 4t .. 4t+3; rows g / g+8 = low / high nibble
                            Am[g, 2*t] = dq(0, 0); Am[g, 2*t+1] = dq(1, 0)
                            Am[g+8, 2*t] = dq(0, 1); Am[g+8, 2*t+1] = dq(1, 1)
                            Am[g, 2*t+8] = dq(2, 0); Am[g, 2*t+9] = dq(3, 0)
                            Am[g+8, 2*t+8] = dq(2, 1); Am[g+8, 2*t+9] = dq(3, 1)
                            for n in range(NT):
                                Bn[n][2*t, g] = xs[8*n+g, kb+4*t]; Bn[n][2*t+1, g] = xs[8*n+g, kb+4*t+1]
                                Bn[n][2*t+8, g] = xs[8*n+g, kb+4*t+2]; Bn[n][2*t+9, g] = xs[8*n+g, kb+4*t+3]
                        for n in range(NT):
                            D = Am @ Bn[n]
                            for lane in range(32):
                                g = lane >> 2; t = lane & 3
                                acc[warp, mt, lane, n, 0] += D[g, 2*t]; acc[warp, mt, lane, n, 1] += D[g, 2*t+1]
                                acc[warp, mt, lane, n, 2] += D[g+8, 2*t]; acc[warp, mt, lane, n, 3] += D[g+8, 2*t+1]
            for warp in range(8):
              for mt in range(2):
                for lane in range(32):
                    g = lane >> 2; t = lane & 3
                    for n in range(NT):
                        for j in range(4):
                            o = o_blk + 32 * warp + 16 * mt + 2 * g + (j >> 1); b = 8 * n + 2 * t + (j & 1)
                            if o < outs and b < nb: y[b, o] += acc[warp, mt, lane, n, j]
    err = np.abs(y - ref).max(); print(outs, ins, ldx, nb, gs, NT, "max err", err, "max ref", np.abs(ref).max())
    assert err < 1e-3 * max(1, np.abs(ref).max())
run(300, 300, 304, 13, 64, 2)
run(220, 260, 264, 8, 16, 1)
run(256, 131, 136, 30, 32, 4)
run(544, 200, 208, 40, 16, 8)
