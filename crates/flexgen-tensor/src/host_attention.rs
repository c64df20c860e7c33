//! Decode attention on the CPU cores over an fp16 KV cache held in place (the CUDA executor's
//! CPU attention, and what `flexgen-profile` times as the CPU attention rate): each (sequence,
//! head) row appends its new key and value at position `past`, then attends over positions
//! `start..=past` of its row. Rows are split among threads. Where the processor has AVX2, FMA and
//! F16C, a row's query heads (up to four at a time: grouped-query attention has several per cache
//! row) share one pass over its keys and one over its values, 8 fp16 values converted once and
//! multiplied-added into every head's sums in registers, with no f32 copy of the cache; elsewhere
//! each thread converts a row's keys and values to f32 a cache-sized block at a time and runs
//! vectorizable f32 loops, head by head. `examples/host_attention_bench.rs` times it.

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::quant::{QuantSpec, quantize_line};

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

/// A thread's working memory, reused across rows: f32 blocks of keys and values (portable path)
/// or the heads' f32 queries and value sums (AVX2 path), and the scores.
#[derive(Default)]
struct Scratch {
    a: Vec<f32>,
    b: Vec<f32>,
    scores: Vec<f32>,
}

/// `scores[i] ← exp(scores[i] − max)` with `max` their largest; returns their sum. Eight lanes
/// for the maximum and the sum, so that the compiler vectorizes all three loops.
fn softmax_numerators(scores: &mut [f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 8];
    let mut chunks = scores.chunks_exact(8);
    for c in &mut chunks {
        for (a, &x) in m.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    let max = chunks.remainder().iter().chain(&m).copied().fold(f32::NEG_INFINITY, f32::max);
    for s in scores.iter_mut() {
        *s = crate::math::exp_nonpositive(*s - max);
    }
    let mut acc = [0f32; 8];
    let mut chunks = scores.chunks_exact(8);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// One row's attention: `q` (already scaled, `hd`) over `keys` and `values` (the row's attended
/// positions, `n · hd` each), into `out` (`hd`). `scratch` holds the f32 blocks of keys and
/// values, the scores and the query (resized here).
fn row_portable(q: &[f16], keys: &[f16], values: &[f16], out: &mut [f16], scratch: &mut Scratch) {
    let hd = q.len();
    let n = keys.len() / hd;
    let Scratch { a: kf, b: vf, scores } = scratch;
    let mut qf = vec![0f32; hd];
    q.convert_to_f32_slice(&mut qf);
    scores.resize(n, 0.0);
    // Keys and values are converted to f32 a block of positions at a time into a buffer that
    // stays in the core's L1/L2, so the cache row itself is read once, as fp16.
    let block = (BLOCK_VALUES / hd).max(1);
    kf.resize(block * hd, 0.0);
    vf.resize(block * hd, 0.0);
    for (chunk, sc) in keys.chunks(block * hd).zip(scores.chunks_mut(block)) {
        let kb = &mut kf[..chunk.len()];
        chunk.convert_to_f32_slice(kb);
        for (s, k) in sc.iter_mut().zip(kb.chunks_exact(hd)) {
            *s = dot(&qf, k);
        }
    }
    let sum = softmax_numerators(scores);
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

/// Query heads a pass of the AVX2 path serves at once: their sums stay in registers.
#[cfg(target_arch = "x86_64")]
const AVX2_HEADS: usize = 4;

/// Eight fp16 values at `p + 8·i` as f32.
///
/// # Safety
/// 8·(i+1) values behind `p`; the processor has F16C.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load8(p: *const f16, i: usize) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm256_cvtph_ps};
    // SAFETY: as the caller promises; `loadu` reads unaligned.
    #[expect(clippy::cast_ptr_alignment, reason = "an unaligned load")]
    unsafe {
        _mm256_cvtph_ps(_mm_loadu_si128(p.add(8 * i).cast::<__m128i>()))
    }
}

/// One cache row's keys (or values) as the AVX2 attention reads them: `n` positions of `hd` values,
/// 8-value pieces as f32. With `PACKED` false, `fp16` holds all `n` positions; with it true, the
/// first `n − 1` positions are 4-bit codes (`code_b` bytes per position, groups of `group` along
/// the head dimension: a packed cache's home) with their (min, scale) pairs as f32 (`par` values
/// per position) and `fp16` holds the last (the new position, exact). A packed piece is expanded
/// where it is read, to the value [`expand`] would have stored: `min + code · scale` in one
/// multiply-add, rounded to fp16.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Src<'a> {
    fp16: &'a [f16],
    codes: &'a [u8],
    params: &'a [f32],
    n: usize,
    code_b: usize,
    par: usize,
    /// Where piece `i`'s (min, scale) pair starts in a position's `par` values (`hd ≤ 256`).
    pair_at: [u16; 32],
}

#[cfg(target_arch = "x86_64")]
impl<'a> Src<'a> {
    /// A packed row's attended past (`codes`, and `params` as f32: its positions from the first
    /// attended on) and its new position `new` (`hd` values).
    fn packed(
        new: &'a [f16],
        (codes, params): (&'a [u8], &'a [f32]),
        p: Packing,
        hd: usize,
    ) -> Self {
        let (code_b, par) = p.per_position(hd);
        let mut pair_at = [0u16; 32];
        for (i, a) in pair_at.iter_mut().enumerate().take(hd / 8) {
            *a = u16::try_from(2 * (8 * i / p.group)).expect("hd ≤ 256");
        }
        Src { fp16: new, codes, params, n: codes.len() / code_b + 1, code_b, par, pair_at }
    }

    fn fp16(values: &'a [f16], hd: usize) -> Self {
        Src {
            fp16: values,
            codes: &[],
            params: &[],
            n: values.len() / hd,
            code_b: 0,
            par: 0,
            pair_at: [0; 32],
        }
    }
}

/// Piece `i` (values `8i..8i + 8`) of position `p` of `src` as f32.
///
/// # Safety
/// The processor has AVX2, FMA and F16C; `p < src.n`, `8i + 8 ≤ hd`, `hd % 8 == 0`; packed:
/// 4-bit codes, `group % 8 == 0`, `src.codes` and `src.params` hold `n − 1` positions.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn piece<const PACKED: bool>(
    src: &Src<'_>,
    hd: usize,
    p: usize,
    i: usize,
) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::_mm256_cvtph_ps;
    if !PACKED || p + 1 == src.n {
        // A packed row's `fp16` is its last position alone.
        let at = if PACKED { i } else { p * hd / 8 + i };
        // SAFETY: as the caller promises.
        return unsafe { load8(src.fp16.as_ptr(), at) };
    }
    // SAFETY: as the caller promises.
    unsafe { _mm256_cvtph_ps(packed_half(src, p, i)) }
}

/// Piece `i` of packed position `p` of `src` as the 8 fp16 values [`expand`] stores.
///
/// # Safety
/// As [`piece`], with `p < src.n − 1` and `src` packed.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn packed_half(src: &Src<'_>, p: usize, i: usize) -> std::arch::x86_64::__m128i {
    use std::arch::x86_64::{
        _mm256_and_si256, _mm256_broadcast_ss, _mm256_cvtepi32_ps, _mm256_cvtps_ph,
        _mm256_fmadd_ps, _mm256_set1_epi32, _mm256_setr_epi32, _mm256_srlv_epi32,
    };
    // SAFETY: the caller's bounds: the word of codes 8i..8i + 8 and the (min, scale) pair of
    // their group lie in position p's bytes.
    unsafe {
        let word = src.codes.as_ptr().add(p * src.code_b + 4 * i).cast::<i32>().read_unaligned();
        let pair = src.params.as_ptr().add(p * src.par + usize::from(src.pair_at[i]));
        let (m, s) = (_mm256_broadcast_ss(&*pair), _mm256_broadcast_ss(&*pair.add(1)));
        let shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
        let q = _mm256_and_si256(
            _mm256_srlv_epi32(_mm256_set1_epi32(word), shifts),
            _mm256_set1_epi32(15),
        );
        let v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), s, m);
        _mm256_cvtps_ph::<0>(v)
    }
}

/// The packed positions of `src` (all but its last) expanded into `out` (`(n − 1) · hd` fp16), as
/// [`expand`] does.
///
/// # Safety
/// As [`packed_half`] for every packed position and piece.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn expand4_avx2(src: &Src<'_>, hd: usize, out: &mut [f16]) {
    use std::arch::x86_64::{__m128i, _mm_storeu_si128};
    assert!(out.len() >= (src.n - 1) * hd);
    for p in 0..src.n - 1 {
        for i in 0..hd / 8 {
            // SAFETY: as the caller promises; 8i + 8 ≤ hd values of position p's output.
            #[expect(clippy::cast_ptr_alignment, reason = "an unaligned store")]
            unsafe {
                _mm_storeu_si128(
                    out.as_mut_ptr().add(p * hd + 8 * i).cast::<__m128i>(),
                    packed_half(src, p, i),
                );
            }
        }
    }
}

/// `N` heads' scores against every key: `scores[h·n + p] = qf[h] · keys[p]` (`qf` is `N × hd`
/// f32, `keys` `n` positions, [`Src`]). Each key's 8-value pieces are read once for all `N`
/// heads; two sums per head keep the multiply-adds independent.
///
/// # Safety
/// The processor has AVX2, FMA and F16C; `hd % 8 == 0`; `qf` holds `N·hd` values, `scores`
/// `N·n`; `keys` as [`piece`] needs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scores_avx2<const N: usize, const PACKED: bool>(
    qf: &[f32],
    keys: &Src<'_>,
    hd: usize,
    scores: &mut [f32],
) {
    use std::arch::x86_64::{
        _mm_add_ps, _mm_cvtss_f32, _mm_hadd_ps, _mm256_add_ps, _mm256_castps256_ps128,
        _mm256_extractf128_ps, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_setzero_ps,
    };
    let (lanes, n) = (hd / 8, keys.n);
    debug_assert!(qf.len() >= N * hd && scores.len() >= N * n);
    let q = qf.as_ptr();
    for p in 0..n {
        let (mut a0, mut a1) = ([_mm256_setzero_ps(); N], [_mm256_setzero_ps(); N]);
        let mut i = 0;
        // SAFETY (loads below): i + 1 < lanes, so 8·(i+2) ≤ hd values behind the key and behind
        // each head's query.
        while i + 1 < lanes {
            let (k0, k1) =
                unsafe { (piece::<PACKED>(keys, hd, p, i), piece::<PACKED>(keys, hd, p, i + 1)) };
            for (h, (x0, x1)) in a0.iter_mut().zip(a1.iter_mut()).enumerate() {
                let (q0, q1) = unsafe {
                    (
                        _mm256_loadu_ps(q.add(h * hd + 8 * i)),
                        _mm256_loadu_ps(q.add(h * hd + 8 * i + 8)),
                    )
                };
                *x0 = _mm256_fmadd_ps(k0, q0, *x0);
                *x1 = _mm256_fmadd_ps(k1, q1, *x1);
            }
            i += 2;
        }
        if i < lanes {
            // SAFETY: i < lanes.
            let k0 = unsafe { piece::<PACKED>(keys, hd, p, i) };
            for (h, x0) in a0.iter_mut().enumerate() {
                // SAFETY: i < lanes.
                let q0 = unsafe { _mm256_loadu_ps(q.add(h * hd + 8 * i)) };
                *x0 = _mm256_fmadd_ps(k0, q0, *x0);
            }
        }
        for (h, (x0, x1)) in a0.iter().zip(&a1).enumerate() {
            let a = _mm256_add_ps(*x0, *x1);
            let s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
            let s = _mm_hadd_ps(s, s);
            scores[h * n + p] = _mm_cvtss_f32(_mm_hadd_ps(s, s));
        }
    }
}

/// `N` heads' weighted sums of the values' 8-value pieces `lane0..lane0 + L`:
/// `acc[h·hd + 8·l + …] = Σ_p scores[h·n + p] · values[p][8·(lane0 + l) + …]`. `N·L` sums stay
/// in registers over all positions.
///
/// # Safety
/// The processor has AVX2, FMA and F16C; `hd % 8 == 0`; `lane0 + L ≤ hd / 8`; `scores` holds
/// `N·n` values, `acc` `N·hd`; `values` as [`piece`] needs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn values_avx2<const N: usize, const L: usize, const PACKED: bool>(
    scores: &[f32],
    values: &Src<'_>,
    hd: usize,
    lane0: usize,
    acc: &mut [f32],
) {
    use std::arch::x86_64::{_mm256_fmadd_ps, _mm256_set1_ps, _mm256_setzero_ps, _mm256_storeu_ps};
    let n = values.n;
    debug_assert!(lane0 + L <= hd / 8 && scores.len() >= N * n && acc.len() >= N * hd);
    let mut a = [[_mm256_setzero_ps(); L]; N];
    for p in 0..n {
        let mut vv = [_mm256_setzero_ps(); L];
        for (l, x) in vv.iter_mut().enumerate() {
            // SAFETY: lane0 + l < hd / 8.
            *x = unsafe { piece::<PACKED>(values, hd, p, lane0 + l) };
        }
        for (h, ah) in a.iter_mut().enumerate() {
            let w = _mm256_set1_ps(scores[h * n + p]);
            for (x, y) in ah.iter_mut().zip(&vv) {
                *x = _mm256_fmadd_ps(*y, w, *x);
            }
        }
    }
    for (h, ah) in a.iter().enumerate() {
        for (l, x) in ah.iter().enumerate() {
            // SAFETY: h·hd + 8·(lane0 + l) + 8 ≤ N·hd values in `acc`.
            unsafe { _mm256_storeu_ps(acc.as_mut_ptr().add(h * hd + 8 * (lane0 + l)), *x) };
        }
    }
}

/// `N` query heads (`q`, `N × hd`, already scaled) attending one cache row (`keys`, `values`,
/// `n × hd` each) into `out` (`N × hd`): one pass over the keys, the softmax per head, then one
/// pass over the values per `8·8/N` of the head dimension (`N·L` = 8 sums in registers).
///
/// # Safety
/// The processor has AVX2, FMA and F16C; `hd % 8 == 0`; `1 ≤ N ≤ 4`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn heads_avx2<const N: usize, const L: usize, const PACKED: bool>(
    q: &[f16],
    (keys, values): (&Src<'_>, &Src<'_>),
    out: &mut [f16],
    scratch: &mut Scratch,
) {
    let hd = q.len() / N;
    let (lanes, n) = (hd / 8, keys.n);
    let Scratch { a: qf, b: acc, scores } = scratch;
    qf.resize(N * hd, 0.0);
    q.convert_to_f32_slice(qf);
    acc.resize(N * hd, 0.0);
    scores.resize(N * n, 0.0);
    // SAFETY: as this function's caller promises; the buffers are sized above.
    unsafe { scores_avx2::<N, PACKED>(qf, keys, hd, scores) };
    let mut inv = [0f32; N];
    for (h, i) in inv.iter_mut().enumerate() {
        *i = 1.0 / softmax_numerators(&mut scores[h * n..(h + 1) * n]);
    }
    let mut lane = 0;
    while lane + L <= lanes {
        // SAFETY: lane + L ≤ lanes.
        unsafe { values_avx2::<N, L, PACKED>(scores, values, hd, lane, acc) };
        lane += L;
    }
    while lane < lanes {
        // SAFETY: lane < lanes.
        unsafe { values_avx2::<N, 1, PACKED>(scores, values, hd, lane, acc) };
        lane += 1;
    }
    for ((o, a), i) in out.chunks_exact_mut(hd).zip(acc.chunks_exact_mut(hd)).zip(inv) {
        for x in a.iter_mut() {
            *x *= i;
        }
        o.convert_from_f32_slice(a); // round to nearest even
    }
}

/// Every query head of one cache row (`q` and `out`: `rep × hd`, the heads adjacent) over `keys`
/// and `values` ([`Src`]), up to `AVX2_HEADS` query heads per pass over the row.
///
/// # Safety
/// The processor has AVX2, FMA and F16C; `hd % 8 == 0`; the sources as [`piece`] needs.
#[cfg(target_arch = "x86_64")]
unsafe fn row_avx2<const PACKED: bool>(
    q: &[f16],
    kv: (&Src<'_>, &Src<'_>),
    out: &mut [f16],
    hd: usize,
    scratch: &mut Scratch,
) {
    let per = AVX2_HEADS * hd;
    for (qg, og) in q.chunks(per).zip(out.chunks_mut(per)) {
        // SAFETY: as the caller promises.
        unsafe {
            match qg.len() / hd {
                4 => heads_avx2::<4, 2, PACKED>(qg, kv, og, scratch),
                3 => heads_avx2::<3, 2, PACKED>(qg, kv, og, scratch),
                2 => heads_avx2::<2, 4, PACKED>(qg, kv, og, scratch),
                _ => heads_avx2::<1, 8, PACKED>(qg, kv, og, scratch),
            }
        }
    }
}

/// Every query head of one cache row (`q` and `out`: `rep × hd`, the heads adjacent) on the
/// fastest path this processor and head dimension allow.
fn row(
    simd: bool,
    q: &[f16],
    keys: &[f16],
    values: &[f16],
    out: &mut [f16],
    hd: usize,
    scratch: &mut Scratch,
) {
    #[cfg(target_arch = "x86_64")]
    if simd && hd.is_multiple_of(8) {
        let (k, v) = (Src::fp16(keys, hd), Src::fp16(values, hd));
        // SAFETY: `simd` is true only where `simd_available()` said so; hd % 8 == 0.
        unsafe { row_avx2::<false>(q, (&k, &v), out, hd, scratch) };
        return;
    }
    let _ = simd;
    for (qh, oh) in q.chunks_exact(hd).zip(out.chunks_exact_mut(hd)) {
        row_portable(qh, keys, values, oh, scratch);
    }
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
    // Rows in parts on rayon's standing pool (no threads are started per call: the CUDA
    // executor calls this once per layer and micro-batch).
    let per = rows_per_part(d.rows);
    out[..d.rows * qw]
        .par_chunks_mut(per * qw)
        .zip(kcache.par_chunks_mut(per * cap * hd))
        .zip(vcache.par_chunks_mut(per * cap * hd))
        .enumerate()
        .for_each(|(c, ((o, kc), vc))| {
            let mut scratch = Scratch::default();
            for i in 0..o.len() / qw {
                let r = c * per + i;
                let seq = (d.row0 + r) / d.nkv;
                let lo = usize::try_from(starts[seq]).unwrap_or(0).min(d.past);
                let rows = r * hd..(r + 1) * hd;
                // The new position first, then positions lo..=past of the row for all of its
                // query heads.
                let new = (i * cap + d.past) * hd..(i * cap + d.past + 1) * hd;
                kc[new.clone()].copy_from_slice(&k_new[rows.clone()]);
                vc[new].copy_from_slice(&v_new[rows]);
                let span = (i * cap + lo) * hd..(i * cap + d.past + 1) * hd;
                row(
                    simd,
                    &q[r * qw..(r + 1) * qw],
                    &kc[span.clone()],
                    &vc[span],
                    &mut o[i * qw..(i + 1) * qw],
                    hd,
                    &mut scratch,
                );
            }
        });
}

/// Rows of each part the cores attend in parallel: `PARTS_PER_THREAD` parts a thread of rayon's
/// pool, so that a thread the run's other work delays (the CUDA driver, the thread that
/// orchestrates the stage) leaves its later parts to the others instead of holding up the call.
/// `FLEXGEN_CPU_ATTN_PARTS` (parts a thread; 1 splits the rows once per thread, as before
/// session 19) compares; a value that is not a positive integer is named on stderr and left out.
fn rows_per_part(rows: usize) -> usize {
    const PARTS_PER_THREAD: usize = 4;
    static PARTS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let parts = *PARTS.get_or_init(|| {
        let Ok(v) = std::env::var("FLEXGEN_CPU_ATTN_PARTS") else { return PARTS_PER_THREAD };
        v.trim().parse().ok().filter(|&n: &usize| n > 0).unwrap_or_else(|| {
            eprintln!(
                "warning: FLEXGEN_CPU_ATTN_PARTS={v:?} is not a positive integer (parts a thread); \
                 using {PARTS_PER_THREAD}"
            );
            PARTS_PER_THREAD
        })
    });
    rows.div_ceil(rayon::current_num_threads() * parts).max(1)
}

/// One k (or v) cache of packed rows, in place: codes `[rows, cap, groups · group]` (`bits` per
/// value, two to a byte at 4 bits, padding code 0) and fp16 (min, scale) pairs `[rows, cap,
/// groups]`, in groups of `group` along the head dimension: the CUDA executor's packed cache
/// (`quant_cache`'s layout, `quant::quantize_line` per position).
#[derive(Debug)]
pub struct PackedRows<'a> {
    pub codes: &'a mut [u8],
    pub params: &'a mut [f16],
}

/// How a packed cache is quantized.
#[derive(Debug, Clone, Copy)]
pub struct Packing {
    pub group: usize,
    pub bits: u8,
}

impl Packing {
    /// Code bytes and (min, scale) values of one position of one row.
    pub fn per_position(&self, hd: usize) -> (usize, usize) {
        let groups = hd.div_ceil(self.group);
        (groups * self.group * usize::from(self.bits) / 8, 2 * groups)
    }

    fn spec(&self) -> QuantSpec {
        QuantSpec { bits: self.bits, group: self.group, dim: 0 }
    }
}

/// Positions of packed codes (`n` positions of `code_b` bytes) and their (min, scale) pairs
/// expanded into `out` (`n × hd` fp16) as the GPU's `dequant_cache` does: `min + code · scale` with
/// one rounding to f32 (a fused multiply-add), then to fp16 (nearest, ties to even).
#[inline]
fn expand(codes: &[u8], params: &[f16], hd: usize, p: Packing, out: &mut [f16], tmp: &mut [f32]) {
    let (code_b, par) = p.per_position(hd);
    let per = code_b * 8 / usize::from(p.bits); // codes per position, padding included
    let tmp = &mut tmp[..per];
    for ((c, pr), o) in
        codes.chunks_exact(code_b).zip(params.chunks_exact(par)).zip(out.chunks_exact_mut(hd))
    {
        if p.bits == 4 {
            for (pair, &byte) in tmp.chunks_exact_mut(2).zip(c) {
                pair[0] = f32::from(byte & 15);
                pair[1] = f32::from(byte >> 4);
            }
        } else {
            for (t, &byte) in tmp.iter_mut().zip(c) {
                *t = f32::from(byte);
            }
        }
        for (g, mp) in tmp.chunks_exact_mut(p.group).zip(pr.chunks_exact(2)) {
            let (m, s) = (mp[0].to_f32(), mp[1].to_f32());
            for t in g.iter_mut() {
                *t = t.mul_add(s, m);
            }
        }
        o.convert_from_f32_slice(&tmp[..hd]);
    }
}

/// [`expand`] compiled for AVX2 and FMA, so that its loops become vector code (the rows
/// `decode_packed` does not attend straight from their codes: 8-bit, or groups or head dimensions
/// that are not multiples of 8).
///
/// # Safety
/// The processor has AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn expand_avx2(
    codes: &[u8],
    params: &[f16],
    hd: usize,
    p: Packing,
    out: &mut [f16],
    tmp: &mut [f32],
) {
    expand(codes, params, hd, p, out, tmp);
}

/// Decode attention of `d.rows` packed cache rows (the CPU attention of a compressed cache): each
/// row's new key and value (`k_new`, `v_new`, `[rows, hd]`) are quantized into position `d.past`
/// of its packed home, and its query heads (`q`, `[rows · rep, hd]`) attend positions
/// `start..past` expanded to fp16 as the GPU expands them and the new position as computed (as
/// the GPU attends a packed cache: the past expanded, the new position exact), into `out`. Only
/// the packed bytes are read from memory; each thread expands a row into a buffer that stays in
/// its core's cache and runs [`decode`]'s arithmetic over it.
#[expect(clippy::too_many_arguments, reason = "the buffers of one step")]
pub fn decode_packed(
    q: &[f16],
    k_new: &[f16],
    v_new: &[f16],
    k: PackedRows<'_>,
    v: PackedRows<'_>,
    out: &mut [f16],
    starts: &[i32],
    d: Dims,
    p: Packing,
) {
    decode_packed_with(simd_available(), q, (k_new, v_new), [k, v], out, starts, d, p);
}

/// `decode_packed`, on the AVX2 path only if `simd` (which must then be `simd_available()`).
#[expect(clippy::too_many_arguments, reason = "the buffers of one step")]
fn decode_packed_with(
    simd: bool,
    q: &[f16],
    (k_new, v_new): (&[f16], &[f16]),
    [k, v]: [PackedRows<'_>; 2],
    out: &mut [f16],
    starts: &[i32],
    d: Dims,
    p: Packing,
) {
    let (hd, cap, rep) = (d.hd, d.cap, d.rep.max(1));
    let qw = rep * hd;
    let (code_b, par) = p.per_position(hd);
    assert!(matches!(p.bits, 4 | 8) && p.group >= 2 && p.group.is_multiple_of(2));
    assert!(
        q.len() >= d.rows * qw
            && out.len() >= d.rows * qw
            && k_new.len() >= d.rows * hd
            && v_new.len() >= d.rows * hd
            && k.codes.len() >= d.rows * cap * code_b
            && v.codes.len() >= d.rows * cap * code_b
            && k.params.len() >= d.rows * cap * par
            && v.params.len() >= d.rows * cap * par
    );
    assert!(d.past < cap, "the new position fits the cache");
    // 4-bit rows whose pieces hold whole code words, attended in one pass (at most AVX2_HEADS
    // query heads), are attended straight from their codes: the AVX2 path expands each piece
    // where it reads it. Others are expanded into a buffer first (more passes would expand the
    // row again each time).
    let packed4 = cfg!(target_arch = "x86_64")
        && simd
        && p.bits == 4
        && hd.is_multiple_of(8)
        && hd <= 256
        && p.group.is_multiple_of(8);
    let fused = packed4 && rep <= AVX2_HEADS;
    let per = rows_per_part(d.rows);
    let (rc, rp) = (cap * code_b, cap * par); // bytes and params of one row
    out[..d.rows * qw]
        .par_chunks_mut(per * qw)
        .zip(k.codes.par_chunks_mut(per * rc).zip(k.params.par_chunks_mut(per * rp)))
        .zip(v.codes.par_chunks_mut(per * rc).zip(v.params.par_chunks_mut(per * rp)))
        .enumerate()
        .for_each(|(c, ((o, (kc, kp)), (vc, vp)))| {
            let mut scratch = Scratch::default();
            let (mut kx, mut vx) = (Vec::new(), Vec::new());
            let mut tmp = vec![0f32; code_b * 8 / usize::from(p.bits)];
            let (mut kms, mut vms) = (Vec::new(), Vec::new());
            let mut line = vec![0f32; hd];
            for i in 0..o.len() / qw {
                let r = c * per + i;
                let seq = (d.row0 + r) / d.nkv;
                let lo = usize::try_from(starts[seq]).unwrap_or(0).min(d.past);
                let n = d.past + 1 - lo;
                let rows = r * hd..(r + 1) * hd;
                let (qr, or) = (&q[r * qw..(r + 1) * qw], &mut o[i * qw..(i + 1) * qw]);
                // The new position into its home (the attended past ends before it).
                for ((codes, params), new) in
                    [(&mut *kc, &mut *kp), (&mut *vc, &mut *vp)].into_iter().zip([k_new, v_new])
                {
                    new[rows.clone()].convert_to_f32_slice(&mut line);
                    let at = i * rc + d.past * code_b;
                    let pt = i * rp + d.past * par;
                    quantize_line(
                        &line,
                        p.spec(),
                        &mut codes[at..at + code_b],
                        &mut params[pt..pt + par],
                    );
                }
                // The attended past's codes and pairs in this part's slices.
                let (cr, pr) = (
                    i * rc + lo * code_b..i * rc + d.past * code_b,
                    i * rp + lo * par..i * rp + d.past * par,
                );
                // 4-bit rows on the AVX2 path are read from their codes (`Src`), the pairs
                // converted to f32 once per row (F16C, eight at a time), not once per piece.
                #[cfg(target_arch = "x86_64")]
                let srcs = if packed4 {
                    for (ms, ps) in [(&mut kms, &kp[pr.clone()]), (&mut vms, &vp[pr.clone()])] {
                        ms.resize(ps.len(), 0.0);
                        ps.convert_to_f32_slice(ms);
                    }
                    Some([
                        Src::packed(&k_new[rows.clone()], (&kc[cr.clone()], &kms), p, hd),
                        Src::packed(&v_new[rows.clone()], (&vc[cr.clone()], &vms), p, hd),
                    ])
                } else {
                    None
                };
                // SAFETY (the unsafe calls on `srcs` below): `packed4` needs `simd` (true only
                // where `simd_available()` said so), 4-bit codes, hd and group multiples of 8;
                // the sources hold n − 1 packed positions and the new one.
                #[cfg(target_arch = "x86_64")]
                if fused && let Some([k, v]) = &srcs {
                    unsafe { row_avx2::<true>(qr, (k, v), or, hd, &mut scratch) };
                    continue;
                }
                // Otherwise each row's past is expanded into a buffer, its new position after it.
                for (j, ((codes, params), (new, x))) in [(&*kc, &*kp), (&*vc, &*vp)]
                    .into_iter()
                    .zip([(k_new, &mut kx), (v_new, &mut vx)])
                    .enumerate()
                {
                    x.resize(n * hd, f16::ZERO);
                    let (cs, ps) = (&codes[cr.clone()], &params[pr.clone()]);
                    let past = &mut x[..(n - 1) * hd];
                    #[cfg(target_arch = "x86_64")]
                    if let Some(srcs) = &srcs {
                        // SAFETY: as for `srcs` above.
                        unsafe { expand4_avx2(&srcs[j], hd, past) };
                    } else if simd {
                        // SAFETY: `simd` is true only where `simd_available()` said so.
                        unsafe { expand_avx2(cs, ps, hd, p, past, &mut tmp) };
                    } else {
                        expand(cs, ps, hd, p, past, &mut tmp);
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    expand(cs, ps, hd, p, past, &mut tmp);
                    x[(n - 1) * hd..].copy_from_slice(&new[rows.clone()]);
                }
                row(simd, qr, &kx, &vx, or, hd, &mut scratch);
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
            // Grouped-query attention: 2, 3 and 4 query heads per cache row (one pass of the
            // AVX2 path), 7 and 8 (two passes: 4 + 3 and 4 + 4); a head dimension of 40 leaves
            // pieces outside the value pass's blocks.
            for rep in [2, 3, 4, 7, 8] {
                check(40, 33, 64, rep, simd);
            }
            check(70, 61, 40, 8, simd);
        }
    }

    /// The packed cache's attention equals the fp16 one over the same cache expanded (the past as
    /// the GPU expands it: `min + code · scale` rounded to fp16; the new position exact), the new
    /// position is quantized into its home as `quantize_line` does, and nothing else changes.
    #[test]
    fn packed_rows_attend_as_their_expansion_and_store_the_new_position() {
        let paths: &[bool] = if simd_available() { &[false, true] } else { &[false] };
        for &simd in paths {
            // 4 and 8 bits; a group that splits the head dimension in two, one with padding (hd
            // 40 in groups of 32), grouped-query heads (8: more than one pass over a row).
            for (cap, past, hd, rep, group, bits) in [
                (12, 9, 64, 1, 32, 4),
                (70, 69, 128, 1, 64, 4),
                (40, 33, 40, 3, 32, 4),
                (30, 20, 64, 2, 64, 8),
                (5, 0, 64, 1, 64, 4),
                (40, 33, 64, 8, 32, 4),
            ] {
                check_packed(cap, past, hd, rep, Packing { group, bits }, simd);
            }
        }
    }

    fn check_packed(cap: usize, past: usize, hd: usize, rep: usize, p: Packing, simd: bool) {
        let (rows, nkv, row0) = (5, 2, 1);
        let mut rnd = values(777);
        let (q, kn, vn) = (rnd(rows * rep * hd), rnd(rows * hd), rnd(rows * hd));
        let (code_b, par) = p.per_position(hd);
        // Homes filled by quantizing random positions, as the GPU's prefill does.
        let pack = |x: &[f16]| {
            let (mut c, mut pr) =
                (vec![0u8; rows * cap * code_b], vec![f16::ZERO; rows * cap * par]);
            for (slot, v) in x.chunks_exact(hd).enumerate() {
                let f: Vec<f32> = v.iter().map(|h| h.to_f32()).collect();
                quantize_line(
                    &f,
                    p.spec(),
                    &mut c[slot * code_b..][..code_b],
                    &mut pr[slot * par..][..par],
                );
            }
            (c, pr)
        };
        let ((mut kc, mut kp), (mut vc, mut vp)) =
            (pack(&rnd(rows * cap * hd)), pack(&rnd(rows * cap * hd)));
        let (kc0, kp0, vc0, vp0) = (kc.clone(), kp.clone(), vc.clone(), vp.clone());
        let starts = [0, 3, 5, 1];
        let d = Dims { rows, hd, cap, past, nkv, rep, row0 };
        let mut out = vec![f16::ZERO; rows * rep * hd];
        decode_packed_with(
            simd,
            &q,
            (&kn, &vn),
            [
                PackedRows { codes: &mut kc, params: &mut kp },
                PackedRows { codes: &mut vc, params: &mut vp },
            ],
            &mut out,
            &starts,
            d,
            p,
        );
        // The expansion by the reference formula, element by element.
        let expand_ref = |c: &[u8], pr: &[f16]| -> Vec<f16> {
            let mut x = vec![f16::ZERO; rows * cap * hd];
            for slot in 0..rows * cap {
                for e in 0..hd {
                    let (g, k) = (e / p.group, e % p.group);
                    let at = slot * code_b * 8 / usize::from(p.bits) + g * p.group + k;
                    let code = if p.bits == 4 { (c[at / 2] >> (4 * (at % 2))) & 15 } else { c[at] };
                    let (m, s) =
                        (pr[slot * par + 2 * g].to_f32(), pr[slot * par + 2 * g + 1].to_f32());
                    x[slot * hd + e] = f16::from_f32(f32::from(code).mul_add(s, m));
                }
            }
            x
        };
        let (mut ke, mut ve) = (expand_ref(&kc0, &kp0), expand_ref(&vc0, &vp0));
        let mut want = vec![f16::ZERO; rows * rep * hd];
        decode_with(simd, &q, &kn, &vn, &mut ke, &mut ve, &mut want, &starts, d);
        assert_eq!(out, want, "simd {simd}, hd {hd}, {p:?}: the expansion's attention");
        // The new position stored as quantize_line stores it; every other position untouched.
        for r in 0..rows {
            for (new, (c, pr), (c0, pr0)) in
                [(&kn, (&kc, &kp), (&kc0, &kp0)), (&vn, (&vc, &vp), (&vc0, &vp0))]
            {
                let f: Vec<f32> = new[r * hd..(r + 1) * hd].iter().map(|h| h.to_f32()).collect();
                let (mut wc, mut wp) = (vec![0u8; code_b], vec![f16::ZERO; par]);
                quantize_line(&f, p.spec(), &mut wc, &mut wp);
                let slot = r * cap + past;
                assert_eq!(&c[slot * code_b..][..code_b], &wc[..]);
                assert_eq!(&pr[slot * par..][..par], &wp[..]);
                for other in (0..cap).filter(|&x| x != past) {
                    let s = r * cap + other;
                    assert_eq!(&c[s * code_b..][..code_b], &c0[s * code_b..][..code_b]);
                    assert_eq!(&pr[s * par..][..par], &pr0[s * par..][..par]);
                }
            }
        }
    }

    /// Pseudo-random fp16 values in [−0.5, 0.5), `n` per call, from `seed`.
    fn values(seed: u64) -> impl FnMut(usize) -> Vec<f16> {
        let mut z = seed;
        move |n| {
            (0..n)
                .map(|_| {
                    z = z.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    #[expect(clippy::cast_precision_loss, reason = "test data")]
                    let u = (z >> 40) as f32 / (1u64 << 24) as f32;
                    f16::from_f32(u - 0.5)
                })
                .collect()
        }
    }

    fn check(cap: usize, past: usize, hd: usize, rep: usize, simd: bool) {
        let (rows, nkv, row0) = (7, 3, 2);
        let mut rnd = values(12345);
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
