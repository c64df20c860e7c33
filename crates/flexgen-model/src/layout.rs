//! One decoder layer's weights as a single contiguous fp16 buffer (an "arena"): the unit the
//! offloading runtime places, copies and pins. The large matrices come first, in the order the
//! layer uses them (q, k and v adjacent, so they form one `[h + 2·kv, h]` matrix and one GEMM;
//! for a SwiGLU MLP gate and up adjacent, one `[2·ffn, h]` matrix), then the vectors. Tensors a
//! family does not have (biases of Llama, the norms' biases of RMSNorm) are empty ranges. A placement share of `p` % of a layer's bytes is the prefix of `p` % of
//! this buffer: exact shares, splitting a tensor where the boundary falls.
//!
//! Dummy values are a hash of (seed, layer, index), so any part of any layer can be filled
//! independently, in parallel, with the same values wherever it is placed.

use std::ops::Range;

use flexgen_policy::{MlpKind, ModelSpec, NormKind};
use half::f16;

use crate::weights::{DummyInit, LayerWeights, Mlp};
use crate::{Error, Result};

/// Offsets (in fp16 elements) of every tensor of a layer in its arena.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerLayout {
    /// `[h + 2·kv, h]`: q rows, then k rows, then v rows.
    pub qkv_w: Range<usize>,
    /// `[h, h]`.
    pub o_w: Range<usize>,
    /// The MLP's first matrix: `[ffn, h]` (`ReLU`), or gate rows then up rows `[2·ffn, h]`
    /// (SwiGLU).
    pub fc1_w: Range<usize>,
    /// `[h, ffn]` (down for SwiGLU).
    pub fc2_w: Range<usize>,
    pub attn_norm_w: Range<usize>,
    /// Empty for RMSNorm.
    pub attn_norm_b: Range<usize>,
    /// `[h + 2·kv]`, or empty where the family has no q/k/v bias.
    pub qkv_b: Range<usize>,
    pub o_b: Range<usize>,
    pub mlp_norm_w: Range<usize>,
    pub mlp_norm_b: Range<usize>,
    pub fc1_b: Range<usize>,
    pub fc2_b: Range<usize>,
    /// Elements of the whole arena (a multiple of [`LayerLayout::ALIGN`]).
    pub len: usize,
    /// The model's hidden size.
    pub hidden: usize,
    /// Width of k (and of v): kv heads × head size.
    pub kv: usize,
    /// The MLP's inner size.
    pub ffn: usize,
    /// The MLP is SwiGLU (gate and up in `fc1_w`).
    pub swiglu: bool,
}

impl LayerLayout {
    /// Every tensor starts at a multiple of this many elements (256 bytes).
    pub const ALIGN: usize = 128;

    /// The layout of `spec`'s layers: OPT's (`LayerNorm`, biases, `ReLU` MLP) or the Llama
    /// family's (RMSNorm, no biases but Qwen2's on q/k/v, SwiGLU MLP).
    pub fn new(spec: &ModelSpec) -> Result<Self> {
        let h = spec.hidden_size as usize;
        let kv = (spec.num_kv_heads * spec.head_dim()) as usize;
        let f = spec.ffn_size as usize;
        let swiglu = spec.mlp == MlpKind::SwiGlu;
        let ln = matches!(spec.norm, NormKind::LayerNorm { .. });
        let (bias, qkv_bias) = (spec.bias, spec.bias || spec.qkv_bias);
        let mut at = 0;
        let mut take = |n: usize, present: bool| {
            let n = if present { n } else { 0 };
            let r = at..at + n;
            at = (at + n).next_multiple_of(Self::ALIGN);
            r
        };
        let qkv_w = take((h + 2 * kv) * h, true);
        let o_w = take(h * h, true);
        let fc1_w = take(if swiglu { 2 * f * h } else { f * h }, true);
        let fc2_w = take(h * f, true);
        let attn_norm_w = take(h, true);
        let attn_norm_b = take(h, ln);
        let qkv_b = take(h + 2 * kv, qkv_bias);
        let o_b = take(h, bias);
        let mlp_norm_w = take(h, true);
        let mlp_norm_b = take(h, ln);
        let fc1_b = take(if swiglu { 2 * f } else { f }, bias);
        let fc2_b = take(h, bias);
        Ok(Self {
            qkv_w,
            o_w,
            fc1_w,
            fc2_w,
            attn_norm_w,
            attn_norm_b,
            qkv_b,
            o_b,
            mlp_norm_w,
            mlp_norm_b,
            fc1_b,
            fc2_b,
            len: at,
            hidden: h,
            kv,
            ffn: f,
            swiglu,
        })
    }

    /// Bytes of one arena.
    pub fn bytes(&self) -> usize {
        self.len * 2
    }

    /// Where the tensor `suffix` of a layer (Hugging Face name after `decoder.layers.N.` for
    /// OPT, `layers.N.` for the Llama family) starts in the arena.
    pub fn offset_of(&self, suffix: &str) -> Option<usize> {
        let (h, kv, f) = (self.hidden, self.kv, self.ffn);
        let opt = !self.swiglu;
        let nonempty = |r: &Range<usize>| (!r.is_empty()).then_some(r.start);
        match suffix {
            "self_attn.q_proj.weight" => Some(self.qkv_w.start),
            "self_attn.k_proj.weight" => Some(self.qkv_w.start + h * h),
            "self_attn.v_proj.weight" => Some(self.qkv_w.start + h * h + kv * h),
            "self_attn.q_proj.bias" => nonempty(&self.qkv_b),
            "self_attn.k_proj.bias" => nonempty(&self.qkv_b).map(|s| s + h),
            "self_attn.v_proj.bias" => nonempty(&self.qkv_b).map(|s| s + h + kv),
            "self_attn.out_proj.weight" if opt => Some(self.o_w.start),
            "self_attn.o_proj.weight" if !opt => Some(self.o_w.start),
            "self_attn.out_proj.bias" | "self_attn.o_proj.bias" => nonempty(&self.o_b),
            "fc1.weight" if opt => Some(self.fc1_w.start),
            "fc1.bias" if opt => nonempty(&self.fc1_b),
            "fc2.weight" if opt => Some(self.fc2_w.start),
            "fc2.bias" if opt => nonempty(&self.fc2_b),
            "mlp.gate_proj.weight" if !opt => Some(self.fc1_w.start),
            "mlp.up_proj.weight" if !opt => Some(self.fc1_w.start + f * h),
            "mlp.down_proj.weight" if !opt => Some(self.fc2_w.start),
            "self_attn_layer_norm.weight" if opt => Some(self.attn_norm_w.start),
            "self_attn_layer_norm.bias" if opt => nonempty(&self.attn_norm_b),
            "final_layer_norm.weight" if opt => Some(self.mlp_norm_w.start),
            "final_layer_norm.bias" if opt => nonempty(&self.mlp_norm_b),
            "input_layernorm.weight" if !opt => Some(self.attn_norm_w.start),
            "post_attention_layernorm.weight" if !opt => Some(self.mlp_norm_w.start),
            _ => None,
        }
    }

    /// The LayerNorm-weight ranges (their dummy values sit around 1, not 0).
    fn norm_weights(&self) -> [&Range<usize>; 2] {
        [&self.attn_norm_w, &self.mlp_norm_w]
    }

    /// Copies `w` (a loaded layer, f32 CPU tensors; bf16 and fp16 checkpoints were widened to
    /// f32 exactly) into `out` (`len` elements), rounding to fp16.
    pub fn fill_from(&self, w: &LayerWeights, out: &mut [f16]) -> Result<()> {
        assert_eq!(out.len(), self.len, "the arena holds one layer");
        out.fill(f16::ZERO);
        let mut put = |t: &flexgen_tensor::Tensor, r: Range<usize>, at: usize| -> Result<()> {
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            if at + v.len() > r.end || at < r.start {
                return Err(Error::Unsupported {
                    what: format!("a tensor of {} values outside its arena range", v.len()),
                });
            }
            for (d, s) in out[at..at + v.len()].iter_mut().zip(&v) {
                *d = f16::from_f32(*s);
            }
            Ok(())
        };
        let mut put_opt = |t: Option<&flexgen_tensor::Tensor>, r: &Range<usize>, at: usize| match (
            t,
            r.is_empty(),
        ) {
            (Some(t), false) => put(t, r.clone(), at),
            (None, true) => Ok(()),
            _ => Err(Error::Unsupported {
                what: "a layer whose biases do not match its family's layout".into(),
            }),
        };
        let (qn, kn) = (w.q.weight.elem_count(), w.k.weight.elem_count());
        let qkv = self.qkv_w.clone();
        put_opt(Some(&w.q.weight), &qkv, qkv.start)?;
        put_opt(Some(&w.k.weight), &qkv, qkv.start + qn)?;
        put_opt(Some(&w.v.weight), &qkv, qkv.start + qn + kn)?;
        put_opt(Some(&w.o.weight), &self.o_w, self.o_w.start)?;
        let (h, kv) = (self.hidden, self.kv);
        put_opt(w.q.bias.as_ref(), &self.qkv_b, self.qkv_b.start)?;
        put_opt(w.k.bias.as_ref(), &self.qkv_b, self.qkv_b.start + h)?;
        put_opt(w.v.bias.as_ref(), &self.qkv_b, self.qkv_b.start + h + kv)?;
        put_opt(w.o.bias.as_ref(), &self.o_b, self.o_b.start)?;
        put_opt(Some(&w.attn_norm.weight), &self.attn_norm_w, self.attn_norm_w.start)?;
        put_opt(w.attn_norm.bias.as_ref(), &self.attn_norm_b, self.attn_norm_b.start)?;
        put_opt(Some(&w.mlp_norm.weight), &self.mlp_norm_w, self.mlp_norm_w.start)?;
        put_opt(w.mlp_norm.bias.as_ref(), &self.mlp_norm_b, self.mlp_norm_b.start)?;
        match (&w.mlp, self.swiglu) {
            (Mlp::Relu { fc1, fc2 }, false) => {
                put_opt(Some(&fc1.weight), &self.fc1_w, self.fc1_w.start)?;
                put_opt(Some(&fc2.weight), &self.fc2_w, self.fc2_w.start)?;
                put_opt(fc1.bias.as_ref(), &self.fc1_b, self.fc1_b.start)?;
                put_opt(fc2.bias.as_ref(), &self.fc2_b, self.fc2_b.start)?;
            }
            (Mlp::SwiGlu { gate, up, down }, true) => {
                let f = self.ffn;
                put_opt(Some(&gate.weight), &self.fc1_w, self.fc1_w.start)?;
                put_opt(Some(&up.weight), &self.fc1_w, self.fc1_w.start + f * h)?;
                put_opt(Some(&down.weight), &self.fc2_w, self.fc2_w.start)?;
                put_opt(gate.bias.as_ref(), &self.fc1_b, self.fc1_b.start)?;
                put_opt(up.bias.as_ref(), &self.fc1_b, self.fc1_b.start + f)?;
                put_opt(down.bias.as_ref(), &self.fc2_b, self.fc2_b.start)?;
            }
            _ => {
                return Err(Error::Unsupported {
                    what: "a layer whose MLP does not match its family's layout".into(),
                });
            }
        }
        Ok(())
    }

    /// Fills `out`, which is elements `range` of layer `layer`'s arena, with dummy values: all 1
    /// for [`DummyInit::Ones`]; for [`DummyInit::Random`], a hash of (seed, layer, index) mapped
    /// to ±`scale` (`scale` = 1/√h, LayerNorm weights 1 ± `scale`). Runs on all cores.
    pub fn fill_dummy(&self, init: DummyInit, layer: usize, range: Range<usize>, out: &mut [f16]) {
        assert_eq!(out.len(), range.len(), "out covers the range");
        let norms = self.norm_weights().map(Clone::clone);
        #[expect(clippy::cast_precision_loss, reason = "hidden sizes are small")]
        let scale = 1.0 / (self.hidden as f32).sqrt();
        let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let chunk = out.len().div_ceil(threads).max(1 << 16);
        std::thread::scope(|s| {
            for (i, part) in out.chunks_mut(chunk).enumerate() {
                let start = range.start + i * chunk;
                let norms = &norms;
                s.spawn(move || {
                    for (j, d) in part.iter_mut().enumerate() {
                        let idx = start + j;
                        *d = match init {
                            DummyInit::Ones => f16::ONE,
                            DummyInit::Random { seed } => {
                                let base =
                                    if norms.iter().any(|r| r.contains(&idx)) { 1.0 } else { 0.0 };
                                f16::from_f32(base + scale * unit(seed, layer, idx))
                            }
                        };
                    }
                });
            }
        });
    }
}

/// One quantized matrix of a packed arena.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedMatrix {
    /// Elements of the fp16 arena it comes from (`rows × cols`, row-major).
    pub src: Range<usize>,
    pub rows: usize,
    pub cols: usize,
    /// Bytes of its codes and of its (min, scale) fp16 pairs in the packed arena.
    pub codes: Range<usize>,
    pub params: Range<usize>,
}

/// A layer's arena with its four matrices quantized (groups along dimension 0, the output rows,
/// as `flexgen_tensor::quant` lays them out, or in its tensor-core order) and its vectors kept in
/// fp16: the bytes that the tiers hold and PCIe carries when `compress_weight` is on.
/// Dequantizing every matrix into its `src` range and copying `vectors` to `vec_src` gives back
/// the (quantized) fp16 arena.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedLayout {
    pub bits: u8,
    pub group: usize,
    /// Whether the matrices' codes and pairs are in the tensor-core order
    /// (`flexgen_tensor::quant::TcOrder`, the same bytes permuted: what the GPU's tensor-core
    /// product reads), else in `quantize`'s. [`LayerLayout::packed`] sets it where the order
    /// applies to every matrix (4 bits, groups of 64 or 128, inputs a multiple of 16); a device
    /// without that product clears it.
    pub tc: bool,
    /// q/k/v, o, fc1, fc2.
    pub mats: [PackedMatrix; 4],
    /// Bytes of the fp16 vectors (the arena's tail from the first LayerNorm weight).
    pub vectors: Range<usize>,
    /// Their elements in the fp16 arena.
    pub vec_src: Range<usize>,
    /// Bytes of the whole packed arena (a multiple of 256).
    pub len: usize,
}

impl LayerLayout {
    /// The packed form of this layout for `bits`-bit groups of `group` values.
    pub fn packed(&self, bits: u8, group: usize) -> PackedLayout {
        let h = self.hidden;
        let mut at = 0usize;
        let mut take = |n: usize| {
            let r = at..at + n;
            at = (at + n).next_multiple_of(256);
            r
        };
        let spec = flexgen_tensor::quant::QuantSpec { bits, group, dim: 0 };
        let mut mat = |src: &Range<usize>, rows: usize| {
            let cols = src.len() / rows;
            let (code_bytes, param_bytes) = flexgen_tensor::quant::packed_len(&[rows, cols], spec);
            let codes = take(code_bytes);
            let params = take(param_bytes);
            PackedMatrix { src: src.clone(), rows, cols, codes, params }
        };
        let mats = [
            mat(&self.qkv_w, h + 2 * self.kv),
            mat(&self.o_w, h),
            mat(&self.fc1_w, self.fc1_w.len() / h),
            mat(&self.fc2_w, h),
        ];
        let vec_src = self.attn_norm_w.start..self.len;
        let vectors = take(2 * vec_src.len());
        let tc = bits == 4 && mats.iter().all(|m| m.tc_order(group).is_some());
        PackedLayout { bits, group, tc, mats, vectors, vec_src, len: at }
    }
}

impl PackedMatrix {
    /// Its tensor-core order in groups of `group`, where that applies.
    pub fn tc_order(&self, group: usize) -> Option<flexgen_tensor::quant::TcOrder> {
        flexgen_tensor::quant::TcOrder::new((self.rows, self.cols), group)
    }
}

impl PackedLayout {
    /// Packs the fp16 `arena` into `out` (`len` bytes), quantizing on all cores.
    pub fn pack(&self, arena: &[f16], out: &mut [u8]) {
        use flexgen_tensor::quant::{QuantSpec, quantize_line};
        use half::slice::HalfFloatSliceExt;
        assert_eq!(out.len(), self.len, "out holds the packed arena");
        out.fill(0);
        let spec = QuantSpec { bits: self.bits, group: self.group, dim: 0 };
        let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        // Columns are the lines of groups: column c packs to its own run of codes and params, so
        // each thread takes a range of columns and, one chunk of `group` rows at a time, reads
        // those rows (contiguous), transposes them and packs one group per column.
        let g = self.group;
        let gb = g * usize::from(self.bits) / 8; // code bytes per group
        for m in &self.mats {
            let src = &arena[m.src.clone()];
            let chunks = m.rows.div_ceil(g);
            let (code_b, par_b) = (chunks * gb, chunks * 4); // per column
            // In the tensor-core order each thread's columns are whole runs of 16, whose bytes
            // lie where their dim-0 bytes would (permuted among themselves).
            let order = m.tc_order(g).filter(|_| self.tc);
            let per =
                m.cols.div_ceil(threads).next_multiple_of(if order.is_some() { 16 } else { 1 });
            let (codes, rest) = out[m.codes.start..].split_at_mut(m.codes.len());
            let params = &mut rest[m.params.start - m.codes.end..][..m.params.len()];
            std::thread::scope(|s| {
                for ((t, codes), params) in
                    codes.chunks_mut(per * code_b).enumerate().zip(params.chunks_mut(per * par_b))
                {
                    s.spawn(move || {
                        let c0 = t * per;
                        let w = per.min(m.cols - c0);
                        let mut row = vec![0f32; w];
                        let mut lines = vec![0f32; w * g];
                        let mut par = [f16::ZERO; 2];
                        let mut group_codes = vec![0u8; gb];
                        for ch in 0..chunks {
                            let len = g.min(m.rows - ch * g);
                            for k in 0..len {
                                let r = ch * g + k;
                                src[r * m.cols + c0..][..w].convert_to_f32_slice(&mut row);
                                for (i, &v) in row.iter().enumerate() {
                                    lines[i * g + k] = v;
                                }
                            }
                            for i in 0..w {
                                let line = &lines[i * g..i * g + len];
                                let Some(o) = order else {
                                    let codes = &mut codes[i * code_b + ch * gb..][..gb];
                                    quantize_line(line, spec, codes, &mut par);
                                    let at = i * par_b + ch * 4;
                                    params[at..at + 2].copy_from_slice(&par[0].to_le_bytes());
                                    params[at + 2..at + 4].copy_from_slice(&par[1].to_le_bytes());
                                    continue;
                                };
                                // Where the order puts them, less the thread's first byte.
                                quantize_line(line, spec, &mut group_codes, &mut par);
                                let (col, base) = (c0 + i, c0 * code_b);
                                o.scatter_codes(col, ch * gb, &group_codes, codes, base);
                                for (k, v) in par.iter().enumerate() {
                                    let at = 2 * o.param(col, ch, k) - c0 * par_b;
                                    params[at..at + 2].copy_from_slice(&v.to_le_bytes());
                                }
                            }
                        }
                    });
                }
            });
        }
        for (i, v) in arena[self.vec_src.clone()].iter().enumerate() {
            let at = self.vectors.start + 2 * i;
            out[at..at + 2].copy_from_slice(&v.to_le_bytes());
        }
    }

    /// Matrix `m`'s codes and (min, scale) pairs in `packed`, in `quantize`'s dim-0 layout (put back
    /// from the tensor-core order where the layout is in it).
    pub fn dim0_matrix(&self, packed: &[u8], m: &PackedMatrix) -> (Vec<u8>, Vec<f16>) {
        let params: Vec<f16> = packed[m.params.clone()]
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]))
            .collect();
        let codes = &packed[m.codes.clone()];
        match m.tc_order(self.group).filter(|_| self.tc) {
            Some(o) => o.permute(codes, &params, true),
            None => (codes.to_vec(), params),
        }
    }

    /// The fp16 arena `packed` stands for (`arena_len` elements): the reference that the GPU's
    /// dequantizing kernel must match.
    pub fn unpack(&self, packed: &[u8], arena_len: usize) -> Vec<f16> {
        use flexgen_tensor::quant::{Packed, QuantSpec, dequantize};
        let mut arena = vec![f16::ZERO; arena_len];
        for m in &self.mats {
            let (data, params) = self.dim0_matrix(packed, m);
            let p = Packed {
                shape: vec![m.rows, m.cols],
                spec: QuantSpec { bits: self.bits, group: self.group, dim: 0 },
                data,
                params,
            };
            for (d, v) in arena[m.src.clone()].iter_mut().zip(dequantize(&p)) {
                *d = f16::from_f32(v);
            }
        }
        for (i, d) in arena[self.vec_src.clone()].iter_mut().enumerate() {
            let at = self.vectors.start + 2 * i;
            *d = f16::from_le_bytes([packed[at], packed[at + 1]]);
        }
        arena
    }
}

/// A uniform value in [-1, 1) from a hash of (seed, layer, index) (the `SplitMix64` finalizer).
fn unit(seed: u64, layer: usize, idx: usize) -> f32 {
    let mut z = seed
        ^ (layer as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (idx as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    #[expect(clippy::cast_precision_loss, reason = "24 random bits")]
    let u = (z >> 40) as f32 / (1u64 << 24) as f32;
    2.0 * u - 1.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// OPT-125M and small specs of the Llama family (grouped-query attention; Qwen2's q/k/v
    /// biases).
    fn specs() -> Vec<ModelSpec> {
        let small = |name: &str| ModelSpec {
            hidden_size: 256,
            num_heads: 8,
            num_kv_heads: 2,
            ffn_size: 640,
            num_layers: 2,
            vocab_size: 512,
            ..crate::spec_by_name(name).unwrap()
        };
        vec![
            ModelSpec { num_layers: 2, ..crate::spec_by_name("opt-125m").unwrap() },
            small("llama-3.1-8b"),
            small("qwen2.5-7b"),
        ]
    }

    #[test]
    fn layout_covers_every_tensor_once_aligned() {
        for spec in specs() {
            let l = LayerLayout::new(&spec).unwrap();
            let ranges = [
                &l.qkv_w,
                &l.o_w,
                &l.fc1_w,
                &l.fc2_w,
                &l.attn_norm_w,
                &l.attn_norm_b,
                &l.qkv_b,
                &l.o_b,
                &l.mlp_norm_w,
                &l.mlp_norm_b,
                &l.fc1_b,
                &l.fc2_b,
            ];
            let total: usize = ranges.iter().map(|r| r.len()).sum();
            assert_eq!(total as u64, spec.layer_params(), "{}", spec.name);
            for w in ranges.windows(2) {
                assert!(w[0].end <= w[1].start, "ordered, disjoint");
                assert_eq!(w[1].start % LayerLayout::ALIGN, 0);
            }
            assert!(l.len >= ranges[11].end && l.len.is_multiple_of(LayerLayout::ALIGN));
            assert_eq!(l.qkv_b.is_empty(), !(spec.bias || spec.qkv_bias), "{}", spec.name);
        }
    }

    #[test]
    fn dummy_values_do_not_depend_on_how_the_arena_is_cut() {
        let spec = crate::spec_by_name("opt-125m").unwrap();
        let l = LayerLayout::new(&spec).unwrap();
        let init = DummyInit::Random { seed: 7 };
        let mut whole = vec![f16::ZERO; l.len];
        l.fill_dummy(init, 3, 0..l.len, &mut whole);
        let cut = l.len / 3 + 5;
        let mut tail = vec![f16::ZERO; l.len - cut];
        l.fill_dummy(init, 3, cut..l.len, &mut tail);
        assert_eq!(&whole[cut..], &tail[..]);
        let mut other = vec![f16::ZERO; l.len];
        l.fill_dummy(init, 4, 0..l.len, &mut other);
        assert_ne!(whole, other, "layers differ");
        assert!((whole[l.attn_norm_w.start].to_f32() - 1.0).abs() < 0.2);
        assert!(whole[l.qkv_w.start..l.qkv_w.end].iter().all(|v| v.to_f32().abs() <= 0.2));
    }

    #[test]
    fn dummy_layer_tensors_equal_the_dummy_arena() {
        for spec in specs() {
            let init = DummyInit::Random { seed: 5 };
            let w = crate::Weights::dummy(&spec, init).unwrap();
            let l = LayerLayout::new(&spec).unwrap();
            let mut from_tensors = vec![f16::ZERO; l.len];
            l.fill_from(&w.layers[1], &mut from_tensors).unwrap();
            let mut direct = vec![f16::ZERO; l.len];
            l.fill_dummy(init, 1, 0..l.len, &mut direct);
            // Padding between tensors is zero in one and hashed in the other: compare the
            // tensors.
            for r in [&l.qkv_w, &l.o_w, &l.fc1_w, &l.fc2_w, &l.qkv_b, &l.attn_norm_w, &l.mlp_norm_w]
            {
                assert_eq!(&from_tensors[r.clone()], &direct[r.clone()], "{}", spec.name);
            }
        }
    }

    #[test]
    fn a_packed_arena_unpacks_to_each_matrix_quantized_and_the_vectors_unchanged() {
        use flexgen_tensor::quant::{QuantSpec, dequantize, quantize};
        let spec = ModelSpec { num_layers: 1, ..crate::spec_by_name("opt-125m").unwrap() };
        let l = LayerLayout::new(&spec).unwrap();
        let mut arena = vec![f16::ZERO; l.len];
        l.fill_dummy(DummyInit::Random { seed: 3 }, 0, 0..l.len, &mut arena);
        for bits in [4u8, 8] {
            let p = l.packed(bits, 64);
            assert!(p.len < l.bytes() * usize::from(bits) / 12, "packed is smaller");
            // The planner's matrices (`ModelSpec::layer_matrices`) are these.
            for s in specs() {
                let shapes =
                    LayerLayout::new(&s).unwrap().packed(bits, 64).mats.map(|m| (m.rows, m.cols));
                assert_eq!(shapes, s.layer_matrices(), "{}", s.name);
            }
            // 4 bits in groups of 64 on OPT-125M's shapes: the tensor-core order, whose bytes are
            // the dim-0 layout's permuted (and unpack the same).
            assert_eq!(p.tc, bits == 4);
            let dim0 = PackedLayout { tc: false, ..p.clone() };
            let mut bytes = vec![0u8; p.len];
            dim0.pack(&arena, &mut bytes);
            if p.tc {
                let mut tc = vec![0u8; p.len];
                p.pack(&arena, &mut tc);
                assert_ne!(tc, bytes, "permuted");
                assert_eq!(p.unpack(&tc, l.len), dim0.unpack(&bytes, l.len));
                for m in &p.mats {
                    let (codes, params) = p.dim0_matrix(&tc, m);
                    assert_eq!(codes, &bytes[m.codes.clone()], "codes at {:?}", m.src);
                    let want: Vec<u8> = params.iter().flat_map(|v| v.to_le_bytes()).collect();
                    assert_eq!(want, &bytes[m.params.clone()], "pairs at {:?}", m.src);
                }
            }
            let back = dim0.unpack(&bytes, l.len);
            for m in &p.mats {
                let x: Vec<f32> = arena[m.src.clone()].iter().map(|v| v.to_f32()).collect();
                let want = dequantize(&quantize(
                    &x,
                    &[m.rows, m.cols],
                    QuantSpec { bits, group: 64, dim: 0 },
                ));
                let got: Vec<f32> = back[m.src.clone()].iter().map(|v| v.to_f32()).collect();
                let close =
                    want.iter().zip(&got).all(|(a, b)| (a - b).abs() <= 1e-3 * a.abs().max(1e-2));
                assert!(close, "matrix at {:?}, {bits} bits", m.src);
            }
            assert_eq!(&back[p.vec_src.clone()], &arena[p.vec_src.clone()]);
        }
    }

    #[test]
    fn fill_from_places_q_k_v_and_gate_up_rows_in_order() {
        for spec in specs() {
            let w = crate::Weights::dummy(&spec, DummyInit::Random { seed: 1 }).unwrap();
            let l = LayerLayout::new(&spec).unwrap();
            let mut out = vec![f16::ZERO; l.len];
            l.fill_from(&w.layers[0], &mut out).unwrap();
            let (h, kv) = (l.hidden, l.kv);
            let first = |t: &flexgen_tensor::Tensor| {
                f16::from_f32(t.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0])
            };
            let lw = &w.layers[0];
            assert_eq!(out[l.qkv_w.start + h * h], first(&lw.k.weight));
            assert_eq!(out[l.qkv_w.start + h * h + kv * h], first(&lw.v.weight));
            if let Some(vb) = &lw.v.bias {
                assert_eq!(out[l.qkv_b.start + h + kv], first(vb));
            }
            if let crate::weights::Mlp::SwiGlu { up, down, .. } = &lw.mlp {
                assert_eq!(out[l.fc1_w.start + l.ffn * h], first(&up.weight));
                assert_eq!(out[l.fc2_w.start], first(&down.weight));
            }
        }
    }
}
