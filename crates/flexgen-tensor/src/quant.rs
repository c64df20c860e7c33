//! Group-wise asymmetric min–max quantization to 4 or 8 bits (`FlexGen`'s compression), the
//! reference implementation the executors and the GPU kernels must match.
//!
//! Layout (docs/compression.md): a tensor of shape `[outer…, n, inner…]` quantized along dimension
//! `g` (of size `n`) is cut into lines `x[o, :, i]`, each line into `⌈n / group⌉` groups of
//! `group` values (the last padded). Groups are stored in (o, i, chunk) order, each as `group`
//! codes: 4-bit codes two per byte (the first value in the low nibble), 8-bit codes one per byte.
//! Each group has an fp16 minimum and an fp16 scale (`params`: min, scale, min, scale, …);
//! `x̂ = min + code · scale`. The minimum is rounded down and the scale up when they are made fp16,
//! so every value lies on the grid's span and `|x − x̂| ≤ scale / 2` holds for the stored scale.

use half::f16;

/// How a tensor is quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantSpec {
    /// 4 or 8.
    pub bits: u8,
    /// Values per group (even).
    pub group: usize,
    /// The dimension groups run along.
    pub dim: usize,
}

/// A quantized tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    pub shape: Vec<usize>,
    pub spec: QuantSpec,
    /// Codes, group after group.
    pub data: Vec<u8>,
    /// Per group: min, scale.
    pub params: Vec<f16>,
}

/// (outer, n, inner) of `shape` around dimension `dim` (the last dimension if `dim` is past it).
fn split(shape: &[usize], dim: usize) -> (usize, usize, usize) {
    if shape.is_empty() {
        return (1, 1, 1);
    }
    let d = dim.min(shape.len() - 1);
    (shape[..d].iter().product(), shape[d], shape[d + 1..].iter().product())
}

/// fp16 at or below `x`.
fn f16_down(x: f32) -> f16 {
    let h = f16::from_f32(x);
    if h.to_f32() > x { f16::from_bits(step_down(h.to_bits())) } else { h }
}

/// fp16 at or above `x` (non-negative `x`).
fn f16_up(x: f32) -> f16 {
    let h = f16::from_f32(x);
    if h.to_f32() < x { f16::from_bits(h.to_bits() + 1) } else { h }
}

/// The next fp16 toward −∞ of a finite value's bits.
fn step_down(bits: u16) -> u16 {
    if bits == 0 {
        0x8001 // the smallest negative subnormal
    } else if bits & 0x8000 == 0 {
        bits - 1
    } else {
        bits + 1
    }
}

impl Packed {
    /// Bytes this tensor takes (codes and parameters).
    pub fn bytes(&self) -> usize {
        self.data.len() + 2 * self.params.len()
    }

    /// Number of groups.
    pub fn groups(&self) -> usize {
        self.params.len() / 2
    }
}

/// Bytes of codes and bytes of (min, scale) parameters of a tensor of `shape` packed by `spec`,
/// without packing it.
pub fn packed_len(shape: &[usize], spec: QuantSpec) -> (usize, usize) {
    let (outer, n, inner) = split(shape, spec.dim);
    let groups = outer * inner * n.div_ceil(spec.group);
    (groups * spec.group / per_byte(spec.bits), groups * 4)
}

/// Codes per byte.
fn per_byte(bits: u8) -> usize {
    if bits == 4 { 2 } else { 1 }
}

/// `x.round().clamp(0.0, levels)` as a code, without the library call that `f32::round` is on
/// x86-64 without SSE4.1: rounding half away from zero of a value clamped to [0, levels] (levels
/// is a whole number, so clamping first changes nothing).
#[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "in [0, 255]")]
#[inline]
fn round_code(x: f32, levels: f32) -> u8 {
    // NaN → 0, as `round().clamp()` then `as u8` gives; written with comparisons so that the
    // loops calling it vectorize.
    let x = if x > 0.0 { x } else { 0.0 };
    let x = if x < levels { x } else { levels };
    let t = x as i32;
    #[expect(clippy::cast_precision_loss, reason = "t ≤ 255")]
    let up = i32::from(x - t as f32 >= 0.5);
    (t + up) as u8
}

/// Quantizes one line of values whose groups are contiguous (`x` split into groups of
/// `spec.group`, the last one padded with code 0): the codes of group `c` go to
/// `codes[c·group/per_byte ..]` and its (min, scale) to `params[2c..2c + 2]`. This is `quantize`'s
/// layout for a line along the grouped dimension; `codes` must be zeroed.
pub fn quantize_line(x: &[f32], spec: QuantSpec, codes: &mut [u8], params: &mut [f16]) {
    let levels = f32::from((1u16 << spec.bits) - 1);
    let pb = per_byte(spec.bits);
    let gb = spec.group / pb;
    // One group's codes, on the stack for the usual group sizes (this runs once per group of
    // every packed weight: an allocation each time was a third of packing's time).
    let (mut stack, mut heap) = ([0u8; 256], Vec::new());
    let q: &mut [u8] = if spec.group <= stack.len() {
        &mut stack[..spec.group]
    } else {
        heap.resize(spec.group, 0);
        &mut heap
    };
    for ((chunk, codes), par) in
        x.chunks(spec.group).zip(codes.chunks_mut(gb)).zip(params.chunks_exact_mut(2))
    {
        let (lo, hi) = chunk
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
        let min = f16_down(lo);
        let scale = f16_up((hi - min.to_f32()) / levels);
        par[0] = min;
        par[1] = scale;
        let (m, s) = (min.to_f32(), scale.to_f32());
        // Codes first (a loop the compiler vectorizes), then two to a byte; padding is code 0.
        let q = &mut q[..chunk.len()];
        if s > 0.0 {
            for (d, &v) in q.iter_mut().zip(chunk) {
                *d = round_code((v - m) / s, levels);
            }
        } else {
            q.fill(0);
        }
        if spec.bits == 4 {
            for (byte, pair) in codes.iter_mut().zip(q.chunks(2)) {
                *byte = pair[0] | pair.get(1).map_or(0, |&v| v << 4);
            }
        } else {
            codes[..q.len()].copy_from_slice(q);
        }
    }
}

/// Quantizes `x` (row-major, `shape`) by `spec`.
///
/// # Panics
/// If `x` does not hold `shape`'s elements, or the spec is not 4/8 bits with an even group.
pub fn quantize(x: &[f32], shape: &[usize], spec: QuantSpec) -> Packed {
    assert_eq!(x.len(), shape.iter().product::<usize>(), "values fill the shape");
    assert!(matches!(spec.bits, 4 | 8) && spec.group >= 2 && spec.group.is_multiple_of(2));
    let (outer, n, inner) = split(shape, spec.dim);
    let chunks = n.div_ceil(spec.group);
    let (code_bytes, param_bytes) = packed_len(shape, spec);
    let levels = f32::from((1u16 << spec.bits) - 1);
    let mut data = vec![0u8; code_bytes];
    let mut params = vec![f16::ZERO; param_bytes / 2];
    let pb = per_byte(spec.bits);
    // The `inner` groups of one chunk of the grouped dimension are done together, reading x row
    // by row (contiguous) rather than down a column; padding past `n` keeps code 0 (= min).
    if inner == 1 {
        let gb = chunks * spec.group / pb;
        for o in 0..outer {
            quantize_line(
                &x[o * n..(o + 1) * n],
                spec,
                &mut data[o * gb..(o + 1) * gb],
                &mut params[o * 2 * chunks..(o + 1) * 2 * chunks],
            );
        }
        return Packed { shape: shape.to_vec(), spec, data, params };
    }
    let (mut lo, mut hi) = (vec![0f32; inner], vec![0f32; inner]);
    let (mut mins, mut scales) = (vec![0f32; inner], vec![0f32; inner]);
    for o in 0..outer {
        for c in 0..chunks {
            let len = spec.group.min(n - c * spec.group);
            let row = |k: usize| &x[(o * n + c * spec.group + k) * inner..][..inner];
            lo.fill(f32::INFINITY);
            hi.fill(f32::NEG_INFINITY);
            for k in 0..len {
                for ((a, b), &v) in lo.iter_mut().zip(hi.iter_mut()).zip(row(k)) {
                    *a = a.min(v);
                    *b = b.max(v);
                }
            }
            for i in 0..inner {
                let g = (o * inner + i) * chunks + c;
                let min = f16_down(lo[i]);
                let scale = f16_up((hi[i] - min.to_f32()) / levels);
                params[2 * g] = min;
                params[2 * g + 1] = scale;
                (mins[i], scales[i]) = (min.to_f32(), scale.to_f32());
            }
            for k in 0..len {
                for (i, &v) in row(k).iter().enumerate() {
                    let (m, s) = (mins[i], scales[i]);
                    #[expect(
                        clippy::cast_possible_truncation,
                        clippy::cast_sign_loss,
                        reason = "clamped"
                    )]
                    let q =
                        if s > 0.0 { ((v - m) / s).round().clamp(0.0, levels) as u8 } else { 0 };
                    let g = (o * inner + i) * chunks + c;
                    let at = (g * spec.group + k) / pb;
                    if spec.bits == 4 {
                        data[at] |= q << (4 * (k % 2));
                    } else {
                        data[at] = q;
                    }
                }
            }
        }
    }
    Packed { shape: shape.to_vec(), spec, data, params }
}

/// The values `p` stands for, row-major in `p.shape`.
pub fn dequantize(p: &Packed) -> Vec<f32> {
    let spec = p.spec;
    let (outer, n, inner) = split(&p.shape, spec.dim);
    let chunks = n.div_ceil(spec.group);
    let mut out = vec![0f32; outer * n * inner];
    let mut g = 0;
    for o in 0..outer {
        for i in 0..inner {
            for c in 0..chunks {
                let (m, s) = (p.params[2 * g].to_f32(), p.params[2 * g + 1].to_f32());
                let codes = &p.data[g * spec.group / per_byte(spec.bits)..];
                for k in 0..spec.group.min(n - c * spec.group) {
                    let q = if spec.bits == 4 {
                        (codes[k / 2] >> (4 * (k % 2))) & 0xF
                    } else {
                        codes[k]
                    };
                    out[(o * n + c * spec.group + k) * inner + i] = m + f32::from(q) * s;
                }
                g += 1;
            }
        }
    }
    out
}

/// The scale of the group that holds element `index` (row-major) of `p`'s tensor.
pub fn scale_of(p: &Packed, index: usize) -> f32 {
    let (_, n, inner) = split(&p.shape, p.spec.dim);
    let (o, rest) = (index / (n * inner), index % (n * inner));
    let (along, i) = (rest / inner, rest % inner);
    let chunks = n.div_ceil(p.spec.group);
    let g = (o * inner + i) * chunks + along / p.spec.group;
    p.params[2 * g + 1].to_f32()
}

/// The tensor-core order of a 4-bit weight `[outs, ins]` packed along dimension 0 (groups of
/// `group` outputs; [`quantize`]'s layout: input i's codes for outputs 0, 1, … from byte
/// i·coded/2, coded = ⌈outs/group⌉·group, and its groups' (min, scale) pairs from pair
/// i·⌈outs/group⌉): the same bytes permuted into the order the GPU's tensor-core product
/// (`gemm4_tc_*` of kernels.cu) reads, so that a lane loads the codes it expands and their pairs
/// with one 16-byte load each and needs no byte permutes. Per 16 inputs (kq), per 8 outputs
/// (word w), per lane t of a quad (of the mma's k order: inputs a = 2t, b = 2t + 1, c = 2t + 8,
/// d = 2t + 9 of the 16), 16 code bytes: (a, 0), (a, 1), (b, 0), (b, 1); (c, 0), (c, 1), (d, 0),
/// (d, 1); then the same with bytes 2 and 3, where byte (i, m) is input i's byte 4w + m (outputs
/// 8w + 2m and 8w + 2m + 1). The pairs per kq, per group, per t: four 4-byte words, the mins of
/// a and b, their scales, the mins of c and d, their scales. Only for `ins` a multiple of 16
/// and groups of 64 or 128 ([`TcOrder::new`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcOrder {
    ins: usize,
    /// Code bytes of one input (coded/2).
    per_input: usize,
    /// Groups of one input (⌈outs/group⌉).
    chunks: usize,
}

impl TcOrder {
    /// The order of a `[outs, ins]` weight in groups of `group`, where it applies.
    pub fn new((outs, ins): (usize, usize), group: usize) -> Option<Self> {
        let chunks = outs.div_ceil(group);
        (matches!(group, 64 | 128) && ins.is_multiple_of(16) && outs > 0).then_some(Self {
            ins,
            per_input: chunks * group / 2,
            chunks,
        })
    }

    /// Where dim-0 code byte `b` of input `i` (byte `i·coded/2 + b`) lies in this order.
    pub fn code_byte(&self, i: usize, b: usize) -> usize {
        let (kq, r, w, m) = (i / 16, i % 16, b / 4, b % 4);
        let j = 2 * (m >> 1) + usize::from(r >= 8);
        let bb = 2 * (r % 2) + (m & 1);
        ((kq * (self.per_input / 4) + w) * 4 + (r % 8) / 2) * 16 + 4 * j + bb
    }

    /// Writes `bytes`, dim-0 code bytes `b0..b0 + bytes.len()` of input `i` (`b0` and the length
    /// multiples of 4), where this order puts them in `out`, less `offset`: what
    /// [`TcOrder::code_byte`] gives, a word of 4 bytes at a time (bytes 0, 1, 2, 3 of a word at
    /// 0, 1, 8, 9 from its first, the next word 64 on).
    pub fn scatter_codes(&self, i: usize, b0: usize, bytes: &[u8], out: &mut [u8], offset: usize) {
        debug_assert!(b0.is_multiple_of(4) && bytes.len().is_multiple_of(4));
        let first = self.code_byte(i, b0) - offset;
        for (w, q) in bytes.chunks_exact(4).enumerate() {
            let at = first + 64 * w;
            out[at..at + 2].copy_from_slice(&q[..2]);
            out[at + 8..at + 10].copy_from_slice(&q[2..]);
        }
    }

    /// Where dim-0 parameter `2·(i·chunks + ch) + k` (group `ch` of input `i`; k 0: its min, 1:
    /// its scale) lies in this order, in fp16 values.
    pub fn param(&self, i: usize, ch: usize, k: usize) -> usize {
        let (kq, r) = (i / 16, i % 16);
        let q = 2 * usize::from(r >= 8) + k;
        (((kq * self.chunks + ch) * 4 + (r % 8) / 2) * 4 + q) * 2 + r % 2
    }

    /// Dim-0 `codes` and `params` in this order (`back`: this order's back to dim 0's).
    ///
    /// # Panics
    /// If they are not the lengths of the weight's dim-0 layout.
    pub fn permute(&self, codes: &[u8], params: &[f16], back: bool) -> (Vec<u8>, Vec<f16>) {
        assert_eq!(codes.len(), self.ins * self.per_input, "the weight's code bytes");
        assert_eq!(params.len(), 2 * self.ins * self.chunks, "the weight's pairs");
        let (mut c, mut p) = (vec![0u8; codes.len()], vec![f16::ZERO; params.len()]);
        for i in 0..self.ins {
            for b in 0..self.per_input {
                let (d0, tc) = (i * self.per_input + b, self.code_byte(i, b));
                if back { c[d0] = codes[tc] } else { c[tc] = codes[d0] }
            }
            for ch in 0..self.chunks {
                for k in 0..2 {
                    let (d0, tc) = (2 * (i * self.chunks + ch) + k, self.param(i, ch, k));
                    if back { p[d0] = params[tc] } else { p[tc] = params[d0] }
                }
            }
        }
        (c, p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The tensor-core order is a permutation of the dim-0 layout's bytes and pairs (every
    /// position taken once), `permute` back undoes it, and it applies where it should.
    #[test]
    fn the_tensor_core_order_permutes_and_comes_back() {
        for (outs, ins, group) in [(256, 32, 64), (300, 48, 128), (200, 16, 64)] {
            let o = TcOrder::new((outs, ins), group).unwrap();
            let (per_input, chunks) = (outs.div_ceil(group) * group / 2, outs.div_ceil(group));
            let mut seen = vec![false; ins * per_input];
            for i in 0..ins {
                for b in 0..per_input {
                    assert!(!std::mem::replace(&mut seen[o.code_byte(i, b)], true), "{i}, {b}");
                }
            }
            let mut seen_p = vec![false; 2 * ins * chunks];
            for i in 0..ins {
                for ch in 0..chunks {
                    for k in 0..2 {
                        assert!(!std::mem::replace(&mut seen_p[o.param(i, ch, k)], true));
                    }
                }
            }
            let codes: Vec<u8> =
                (0..ins * per_input).map(|v| (v * 7 % 251).to_le_bytes()[0]).collect();
            let params: Vec<f16> = (0..2 * ins * chunks).map(|v| f16::from_f32(v as f32)).collect();
            let (c, p) = o.permute(&codes, &params, false);
            assert_ne!(c, codes);
            // Scattered 32 bytes at a time, the same bytes where permute puts them.
            let mut scattered = vec![0u8; c.len()];
            for i in 0..ins {
                for b0 in (0..per_input).step_by(32) {
                    let bytes = &codes[i * per_input + b0..][..32];
                    o.scatter_codes(i, b0, bytes, &mut scattered, 0);
                }
            }
            assert_eq!(scattered, c);
            assert_eq!(o.permute(&c, &p, true), (codes, params));
        }
        assert!(TcOrder::new((256, 40), 64).is_none(), "inputs not a multiple of 16");
        assert!(TcOrder::new((256, 32), 32).is_none(), "groups of 32");
    }

    /// The first, group-by-group implementation: `quantize` must give the same bytes.
    fn quantize_reference(x: &[f32], shape: &[usize], spec: QuantSpec) -> Packed {
        assert_eq!(x.len(), shape.iter().product::<usize>(), "values fill the shape");
        assert!(matches!(spec.bits, 4 | 8) && spec.group >= 2 && spec.group.is_multiple_of(2));
        let (outer, n, inner) = split(shape, spec.dim);
        let chunks = n.div_ceil(spec.group);
        let (code_bytes, param_bytes) = packed_len(shape, spec);
        let levels = f32::from((1u16 << spec.bits) - 1);
        let mut data = vec![0u8; code_bytes];
        let groups = param_bytes / 4;
        let mut params = Vec::with_capacity(2 * groups);
        let mut line = vec![0f32; spec.group];
        let mut g = 0;
        for o in 0..outer {
            for i in 0..inner {
                for c in 0..chunks {
                    let len = spec.group.min(n - c * spec.group);
                    for (k, v) in line[..len].iter_mut().enumerate() {
                        *v = x[(o * n + c * spec.group + k) * inner + i];
                    }
                    let (lo, hi) = line[..len]
                        .iter()
                        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                            (a.min(v), b.max(v))
                        });
                    let min = f16_down(lo);
                    let scale = f16_up((hi - min.to_f32()) / levels);
                    params.extend([min, scale]);
                    let (m, s) = (min.to_f32(), scale.to_f32());
                    let codes = &mut data[g * spec.group / per_byte(spec.bits)..];
                    for k in 0..spec.group {
                        let v = if k < len { line[k] } else { m };
                        #[expect(
                            clippy::cast_possible_truncation,
                            clippy::cast_sign_loss,
                            reason = "clamped"
                        )]
                        let q = if s > 0.0 {
                            ((v - m) / s).round().clamp(0.0, levels) as u8
                        } else {
                            0
                        };
                        if spec.bits == 4 {
                            codes[k / 2] |= q << (4 * (k % 2));
                        } else {
                            codes[k] = q;
                        }
                    }
                    g += 1;
                }
            }
        }
        Packed { shape: shape.to_vec(), spec, data, params }
    }

    fn shape_and_spec() -> impl Strategy<Value = (Vec<usize>, QuantSpec)> {
        (prop::collection::vec(1usize..40, 1..4), prop::sample::select(vec![4u8, 8]), 1usize..33)
            .prop_flat_map(|(shape, bits, half_group)| {
                let nd = shape.len();
                (Just(shape), 0..nd).prop_map(move |(shape, dim)| {
                    (shape, QuantSpec { bits, group: 2 * half_group, dim })
                })
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn every_value_is_within_half_a_step((shape, spec) in shape_and_spec(), seed in any::<u64>(), spread in 1e-3f32..100.0) {
            let n: usize = shape.iter().product();
            let mut z = seed;
            let x: Vec<f32> = (0..n).map(|_| {
                z = z.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                #[expect(clippy::cast_precision_loss, reason = "test data")]
                let u = (z >> 40) as f32 / (1u64 << 24) as f32;
                (u - 0.3) * spread
            }).collect();
            let p = quantize(&x, &shape, spec);
            let r = quantize_reference(&x, &shape, spec);
            prop_assert_eq!((&p.data, &p.params), (&r.data, &r.params), "same bytes as the reference");
            let (outer, along, inner) = split(&shape, spec.dim);
            prop_assert_eq!(p.groups(), outer * inner * along.div_ceil(spec.group));
            prop_assert_eq!(p.data.len(), p.groups() * spec.group * usize::from(spec.bits) / 8);
            prop_assert_eq!(packed_len(&shape, spec), (p.data.len(), 2 * p.params.len()));
            let y = dequantize(&p);
            prop_assert_eq!(y.len(), n);
            for (i, (a, b)) in x.iter().zip(&y).enumerate() {
                let s = scale_of(&p, i);
                // Half a step, plus f32 rounding of min + code·scale.
                let tol = s / 2.0 + 4.0 * f32::EPSILON * (a.abs() + s * 16.0);
                prop_assert!((a - b).abs() <= tol, "element {i}: {a} vs {b}, scale {s}");
            }
        }
    }

    #[test]
    fn codes_round_like_the_library_round() {
        #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "clamped")]
        let want = |x: f32, l: f32| x.round().clamp(0.0, l) as u8;
        let mut xs = vec![f32::NAN, -0.0, -3.0, 0.5, 14.5, 15.0, 15.49, 16.0, 300.0, 1e30];
        for k in 0..=255u16 {
            let k = f32::from(k);
            xs.extend([k + 0.5, (k + 0.5).next_down(), (k + 0.5).next_up(), k.next_down(), k]);
        }
        for l in [15.0, 255.0] {
            for &x in &xs {
                assert_eq!(round_code(x, l), want(x, l), "x = {x}, levels {l}");
            }
        }
    }

    #[test]
    fn constant_groups_and_grid_values_are_exact() {
        let x = vec![1.5f32; 10];
        let p = quantize(&x, &[10], QuantSpec { bits: 4, group: 4, dim: 0 });
        assert_eq!(dequantize(&p), x);
        // Values on a 4-bit grid with fp16-exact min and scale come back exactly.
        let grid: Vec<f32> = (0..16).map(|q| -2.0 + 0.25 * q as f32).collect();
        let p = quantize(&grid, &[16], QuantSpec { bits: 4, group: 16, dim: 0 });
        assert_eq!(dequantize(&p), grid);
        assert_eq!(p.bytes(), 8 + 4);
    }

    #[test]
    fn groups_run_along_the_chosen_dimension() {
        // [3, 4]: along dim 0 each column is one group of 3 (padded to 4); along dim 1 each row.
        let x: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let col = quantize(&x, &[3, 4], QuantSpec { bits: 8, group: 4, dim: 0 });
        assert_eq!(col.groups(), 4);
        assert_eq!(col.params[0].to_f32(), 0.0); // column 0: 0, 4, 8
        assert_eq!(col.params[2].to_f32(), 1.0); // column 1: 1, 5, 9
        let row = quantize(&x, &[3, 4], QuantSpec { bits: 8, group: 4, dim: 1 });
        assert_eq!(row.params[2].to_f32(), 4.0); // row 1 starts at 4
        for p in [&col, &row] {
            let y = dequantize(p);
            for (a, b) in x.iter().zip(&y) {
                assert!((a - b).abs() <= 0.02, "{a} {b}");
            }
        }
    }
}
