//! Decode attention on the CPU cores over an fp16 KV cache held in place (the CUDA executor's
//! CPU attention, and what `flexgen-profile` times as the CPU attention rate): each (sequence,
//! head) row appends its new key and value at position `past`, then attends over positions
//! `start..=past` of its row. Rows are split among threads. Where the processor has AVX2, FMA and
//! F16C, a row is one pass over its keys and one over its values, 8 fp16 values converted and
//! multiplied-added per instruction, with no f32 copy of the cache; elsewhere each thread
//! converts a row's keys and values to f32 a cache-sized block at a time and runs vectorizable
//! f32 loops. `examples/host_attention_bench.rs` times it.

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// Shapes of one call.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    /// Cache rows in this call: (sequence, kv head) rows, each attended by `rep` query heads
    /// (grouped-query attention; 1 for multi-head attention).
    pub rows: usize,
    pub hd: usize,
    /// Positions each cache row can hold.
    pub cap: usize,
    /// Position of the new token (= cached positions before it).
    pub past: usize,
    /// Kv heads per sequence.
    pub nkv: usize,
    /// Query heads per kv head.
    pub rep: usize,
    /// Global (sequence, kv head) index of the first row (sequence = global row / `nkv`).
    pub row0: usize,
}

/// Values of keys (or values) converted to f32 at a time: 16 KiB, a core's L1.
const BLOCK_VALUES: usize = 4096;

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent sums so the compiler keeps them in vector lanes.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

type Scratch = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

/// `scores[i] ← exp(scores[i] − max)`; returns their sum.
fn softmax_numerators(scores: &mut [f32], max: f32) -> f32 {
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    sum
}

/// One row's attention: `q` (already scaled, `hd`) over `keys` and `values` (the row's attended
/// positions, `n · hd` each), into `out` (`hd`). `scratch` holds the f32 blocks of keys and
/// values, the scores and the query (resized here).
fn row_portable(q: &[f16], keys: &[f16], values: &[f16], out: &mut [f16], scratch: &mut Scratch) {
    let hd = q.len();
    let n = keys.len() / hd;
    let (kf, vf, scores, qf) = scratch;
    qf.resize(hd, 0.0);
    q.convert_to_f32_slice(qf);
    scores.resize(n, 0.0);
    // Keys and values are converted to f32 a block of positions at a time into a buffer that
    // stays in the core's L1/L2, so the cache row itself is read once, as fp16.
    let block = (BLOCK_VALUES / hd).max(1);
    kf.resize(block * hd, 0.0);
    vf.resize(block * hd, 0.0);
    let mut m = f32::NEG_INFINITY;
    for (chunk, sc) in keys.chunks(block * hd).zip(scores.chunks_mut(block)) {
        let kb = &mut kf[..chunk.len()];
        chunk.convert_to_f32_slice(kb);
        for (s, k) in sc.iter_mut().zip(kb.chunks_exact(hd)) {
            *s = dot(qf, k);
            m = m.max(*s);
        }
    }
    let sum = softmax_numerators(scores, m);
    let mut acc = vec![0f32; hd];
    for (chunk, sc) in values.chunks(block * hd).zip(scores.chunks(block)) {
        let vb = &mut vf[..chunk.len()];
        chunk.convert_to_f32_slice(vb);
        for (s, v) in sc.iter().zip(vb.chunks_exact(hd)) {
            for (a, x) in acc.iter_mut().zip(v) {
                *a += s * x;
            }
        }
    }
    let inv = 1.0 / sum;
    for a in &mut acc {
        *a *= inv;
    }
    out.convert_from_f32_slice(&acc);
}

/// Largest head dimension of the AVX2 path (its query and accumulator live in 32 registers' worth
/// of stack).
#[cfg(target_arch = "x86_64")]
const AVX2_MAX_HD: usize = 256;

/// Whether this processor runs the AVX2 path.
fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `row_portable`'s work with AVX2, FMA and F16C, for `hd` a multiple of 8 up to `AVX2_MAX_HD`:
/// scores from fp16 keys converted 8 at a time into fused multiply-adds with the query, the
/// softmax, then the values accumulated the same way. `scores` is resized here.
///
/// # Safety
/// The processor must have AVX2, FMA and F16C (`simd_available`), and `hd % 8 == 0`,
/// `hd <= AVX2_MAX_HD`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row_avx2(
    q: &[f16],
    keys: &[f16],
    values: &[f16],
    out: &mut [f16],
    scores: &mut Vec<f32>,
) {
    use std::arch::x86_64::{
        __m128i, __m256, _mm_add_ps, _mm_cvtss_f32, _mm_hadd_ps, _mm_loadu_si128, _mm_storeu_si128,
        _mm256_add_ps, _mm256_castps256_ps128, _mm256_cvtph_ps, _mm256_cvtps_ph,
        _mm256_extractf128_ps, _mm256_fmadd_ps, _mm256_mul_ps, _mm256_set1_ps, _mm256_setzero_ps,
    };
    let hd = q.len();
    let lanes = hd / 8;
    debug_assert!(hd.is_multiple_of(8) && hd <= AVX2_MAX_HD);
    let load8 = |p: *const f16, i: usize| -> __m256 {
        // SAFETY: callers pass pointers with 8·(i+1) values behind them (hd per position);
        // `loadu` reads unaligned.
        #[expect(clippy::cast_ptr_alignment, reason = "an unaligned load")]
        unsafe {
            _mm256_cvtph_ps(_mm_loadu_si128(p.add(8 * i).cast::<__m128i>()))
        }
    };
    let mut qv = [_mm256_setzero_ps(); AVX2_MAX_HD / 8];
    for (i, v) in qv.iter_mut().take(lanes).enumerate() {
        *v = load8(q.as_ptr(), i);
    }
    scores.resize(keys.len() / hd, 0.0);
    let mut m = f32::NEG_INFINITY;
    for (s, k) in scores.iter_mut().zip(keys.chunks_exact(hd)) {
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 1 < lanes {
            a0 = _mm256_fmadd_ps(load8(k.as_ptr(), i), qv[i], a0);
            a1 = _mm256_fmadd_ps(load8(k.as_ptr(), i + 1), qv[i + 1], a1);
            i += 2;
        }
        if i < lanes {
            a0 = _mm256_fmadd_ps(load8(k.as_ptr(), i), qv[i], a0);
        }
        let a = _mm256_add_ps(a0, a1);
        let h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
        let h = _mm_hadd_ps(h, h);
        *s = _mm_cvtss_f32(_mm_hadd_ps(h, h));
        m = m.max(*s);
    }
    let sum = softmax_numerators(scores, m);
    let mut acc = [_mm256_setzero_ps(); AVX2_MAX_HD / 8];
    for (s, v) in scores.iter().zip(values.chunks_exact(hd)) {
        let w = _mm256_set1_ps(*s);
        for (i, a) in acc.iter_mut().take(lanes).enumerate() {
            *a = _mm256_fmadd_ps(load8(v.as_ptr(), i), w, *a);
        }
    }
    let inv = _mm256_set1_ps(1.0 / sum);
    for (i, a) in acc.iter().take(lanes).enumerate() {
        let h = _mm256_cvtps_ph::<0>(_mm256_mul_ps(*a, inv)); // round to nearest even
        // SAFETY: `out` holds hd = 8·lanes values; `storeu` writes unaligned.
        #[expect(clippy::cast_ptr_alignment, reason = "an unaligned store")]
        unsafe {
            _mm_storeu_si128(out.as_mut_ptr().add(8 * i).cast::<__m128i>(), h);
        }
    }
}

/// One row's attention on the fastest path this processor and head dimension allow.
fn row(
    simd: bool,
    q: &[f16],
    keys: &[f16],
    values: &[f16],
    out: &mut [f16],
    scratch: &mut Scratch,
) {
    #[cfg(target_arch = "x86_64")]
    if simd && q.len().is_multiple_of(8) && q.len() <= AVX2_MAX_HD {
        // SAFETY: `simd` is true only where `simd_available()` said so; the shape is checked.
        unsafe { row_avx2(q, keys, values, out, &mut scratch.2) };
        return;
    }
    let _ = simd;
    row_portable(q, keys, values, out, scratch);
}

/// Decode attention of `d.rows` cache rows: `k_new`, `v_new` are `[rows, hd]`, `q` and `out`
/// `[rows · rep, hd]` (the query heads of a kv row adjacent); the caches `[rows, cap, hd]`;
/// `starts[sequence]` is each sequence's first real position.
#[expect(clippy::too_many_arguments, reason = "the buffers of one step")]
pub fn decode(
    q: &[f16],
    k_new: &[f16],
    v_new: &[f16],
    kcache: &mut [f16],
    vcache: &mut [f16],
    out: &mut [f16],
    starts: &[i32],
    d: Dims,
) {
    decode_with(simd_available(), q, k_new, v_new, kcache, vcache, out, starts, d);
}

/// `decode`, on the AVX2 path only if `simd` (which must then be `simd_available()`).
#[expect(clippy::too_many_arguments, reason = "the buffers of one step")]
fn decode_with(
    simd: bool,
    q: &[f16],
    k_new: &[f16],
    v_new: &[f16],
    kcache: &mut [f16],
    vcache: &mut [f16],
    out: &mut [f16],
    starts: &[i32],
    d: Dims,
) {
    let (hd, cap, rep) = (d.hd, d.cap, d.rep.max(1));
    let qw = rep * hd; // query values per cache row
    assert!(
        q.len() >= d.rows * qw
            && out.len() >= d.rows * qw
            && kcache.len() >= d.rows * cap * hd
            && k_new.len() >= d.rows * hd
    );
    assert!(d.past < cap, "the new position fits the cache");
    // Rows in as many parts as the pool has threads, on rayon's standing pool (no threads are
    // started per call: the CUDA executor calls this once per layer and micro-batch).
    let per = d.rows.div_ceil(rayon::current_num_threads()).max(1);
    out[..d.rows * qw]
        .par_chunks_mut(per * qw)
        .zip(kcache.par_chunks_mut(per * cap * hd))
        .zip(vcache.par_chunks_mut(per * cap * hd))
        .enumerate()
        .for_each(|(c, ((o, kc), vc))| {
            let mut scratch = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for i in 0..o.len() / qw {
                let r = c * per + i;
                let seq = (d.row0 + r) / d.nkv;
                let lo = usize::try_from(starts[seq]).unwrap_or(0).min(d.past);
                let rows = r * hd..(r + 1) * hd;
                // The new position first, then positions lo..=past of the row, for each of its
                // query heads.
                let new = (i * cap + d.past) * hd..(i * cap + d.past + 1) * hd;
                kc[new.clone()].copy_from_slice(&k_new[rows.clone()]);
                vc[new].copy_from_slice(&v_new[rows]);
                let span = (i * cap + lo) * hd..(i * cap + d.past + 1) * hd;
                for h in 0..rep {
                    let qr = (r * rep + h) * hd..(r * rep + h + 1) * hd;
                    row(
                        simd,
                        &q[qr],
                        &kc[span.clone()],
                        &vc[span.clone()],
                        &mut o[(i * rep + h) * hd..(i * rep + h + 1) * hd],
                        &mut scratch,
                    );
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_plain_f64_attention_and_appends_the_new_position() {
        // A row within one block of converted values, and rows over several (a partial last one);
        // head dimensions the AVX2 path takes (40: an odd number of 8-lanes, 128) and one it
        // leaves to the portable path (36); both paths where the processor has AVX2.
        let paths: &[bool] = if simd_available() { &[false, true] } else { &[false] };
        for &simd in paths {
            for (cap, past, hd) in [(12, 9, 40), (300, 250, 40), (70, 69, 128), (30, 20, 36)] {
                check(cap, past, hd, 1, simd);
            }
            // Grouped-query attention: three query heads per cache row.
            check(40, 33, 64, 3, simd);
        }
    }

    fn check(cap: usize, past: usize, hd: usize, rep: usize, simd: bool) {
        let (rows, nkv, row0) = (7, 3, 2);
        let mut z = 12345u64;
        let mut rnd = |n: usize| -> Vec<f16> {
            (0..n)
                .map(|_| {
                    z = z.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    #[expect(clippy::cast_precision_loss, reason = "test data")]
                    let u = (z >> 40) as f32 / (1u64 << 24) as f32;
                    f16::from_f32(u - 0.5)
                })
                .collect()
        };
        let (q, kn, vn) = (rnd(rows * rep * hd), rnd(rows * hd), rnd(rows * hd));
        let (mut kc, mut vc) = (rnd(rows * cap * hd), rnd(rows * cap * hd));
        let (k0, v0) = (kc.clone(), vc.clone());
        let starts = [0, 3, 5, 1];
        let mut out = vec![f16::ZERO; rows * rep * hd];
        let d = Dims { rows, hd, cap, past, nkv, rep, row0 };
        decode_with(simd, &q, &kn, &vn, &mut kc, &mut vc, &mut out, &starts, d);
        for qr in 0..rows * rep {
            let r = qr / rep;
            let lo = usize::try_from(starts[(row0 + r) / nkv]).unwrap();
            let key = |p: usize| {
                if p == past {
                    &kn[r * hd..(r + 1) * hd]
                } else {
                    &k0[(r * cap + p) * hd..(r * cap + p + 1) * hd]
                }
            };
            let val = |p: usize| {
                if p == past {
                    &vn[r * hd..(r + 1) * hd]
                } else {
                    &v0[(r * cap + p) * hd..(r * cap + p + 1) * hd]
                }
            };
            let s: Vec<f64> = (lo..=past)
                .map(|p| {
                    key(p)
                        .iter()
                        .zip(&q[qr * hd..])
                        .map(|(a, b)| f64::from(a.to_f32()) * f64::from(b.to_f32()))
                        .sum()
                })
                .collect();
            let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let sum: f64 = e.iter().sum();
            for j in 0..hd {
                let want: f64 = (lo..=past)
                    .zip(&e)
                    .map(|(p, w)| w * f64::from(val(p)[j].to_f32()))
                    .sum::<f64>()
                    / sum;
                let got = f64::from(out[qr * hd + j].to_f32());
                assert!(
                    (want - got).abs() < 2e-3,
                    "simd {simd}, hd {hd}, row {r} dim {j}: {want} vs {got}"
                );
            }
            assert_eq!(
                &kc[(r * cap + past) * hd..(r * cap + past + 1) * hd],
                &kn[r * hd..(r + 1) * hd]
            );
            assert_eq!(
                &vc[(r * cap + past) * hd..(r * cap + past + 1) * hd],
                &vn[r * hd..(r + 1) * hd]
            );
            assert_eq!(kc[(r * cap) * hd], k0[(r * cap) * hd], "earlier positions untouched");
        }
    }
}
