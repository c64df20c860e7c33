//! One decoder layer's weights as a single contiguous fp16 buffer (an "arena"): the unit the
//! offloading runtime places, copies and pins. The large matrices come first, in the order the
//! layer uses them (q, k and v adjacent, so they form one `[h + 2·kv, h]` matrix and one GEMM),
//! then the vectors. A placement share of `p` % of a layer's bytes is the prefix of `p` % of
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
    /// `[ffn, h]`.
    pub fc1_w: Range<usize>,
    /// `[h, ffn]`.
    pub fc2_w: Range<usize>,
    pub attn_norm_w: Range<usize>,
    pub attn_norm_b: Range<usize>,
    /// `[h + 2·kv]`.
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
}

impl LayerLayout {
    /// Every tensor starts at a multiple of this many elements (256 bytes).
    pub const ALIGN: usize = 128;

    /// The layout of `spec`'s layers. Only the OPT structure (`LayerNorm`, biases, `ReLU` MLP) has
    /// an arena layout so far.
    pub fn new(spec: &ModelSpec) -> Result<Self> {
        if !matches!(spec.norm, NormKind::LayerNorm { .. })
            || !spec.bias
            || spec.mlp != MlpKind::Relu
        {
            return Err(Error::Unsupported {
                what: format!(
                    "{}: the CUDA executor runs OPT-structured layers (LayerNorm, biases, ReLU MLP)",
                    spec.name
                ),
            });
        }
        let h = spec.hidden_size as usize;
        let kv = (spec.num_kv_heads * spec.head_dim()) as usize;
        let f = spec.ffn_size as usize;
        let mut at = 0;
        let mut take = |n: usize| {
            let r = at..at + n;
            at = (at + n).next_multiple_of(Self::ALIGN);
            r
        };
        let qkv_w = take((h + 2 * kv) * h);
        let o_w = take(h * h);
        let fc1_w = take(f * h);
        let fc2_w = take(h * f);
        let attn_norm_w = take(h);
        let attn_norm_b = take(h);
        let qkv_b = take(h + 2 * kv);
        let o_b = take(h);
        let mlp_norm_w = take(h);
        let mlp_norm_b = take(h);
        let fc1_b = take(f);
        let fc2_b = take(h);
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
        })
    }

    /// Bytes of one arena.
    pub fn bytes(&self) -> usize {
        self.len * 2
    }

    /// Where the tensor `suffix` of a layer (Hugging Face name after `decoder.layers.N.`) starts
    /// in the arena; `h` and `kv` are the q and k/v row counts.
    pub fn offset_of(&self, suffix: &str) -> Option<usize> {
        let h = self.hidden;
        let kv = (self.qkv_b.len() - h) / 2;
        Some(match suffix {
            "self_attn.q_proj.weight" => self.qkv_w.start,
            "self_attn.k_proj.weight" => self.qkv_w.start + h * h,
            "self_attn.v_proj.weight" => self.qkv_w.start + h * h + kv * h,
            "self_attn.q_proj.bias" => self.qkv_b.start,
            "self_attn.k_proj.bias" => self.qkv_b.start + h,
            "self_attn.v_proj.bias" => self.qkv_b.start + h + kv,
            "self_attn.out_proj.weight" => self.o_w.start,
            "self_attn.out_proj.bias" => self.o_b.start,
            "fc1.weight" => self.fc1_w.start,
            "fc1.bias" => self.fc1_b.start,
            "fc2.weight" => self.fc2_w.start,
            "fc2.bias" => self.fc2_b.start,
            "self_attn_layer_norm.weight" => self.attn_norm_w.start,
            "self_attn_layer_norm.bias" => self.attn_norm_b.start,
            "final_layer_norm.weight" => self.mlp_norm_w.start,
            "final_layer_norm.bias" => self.mlp_norm_b.start,
            _ => return None,
        })
    }

    /// The LayerNorm-weight ranges (their dummy values sit around 1, not 0).
    fn norm_weights(&self) -> [&Range<usize>; 2] {
        [&self.attn_norm_w, &self.mlp_norm_w]
    }

    /// Copies `w` (a loaded layer, f32 CPU tensors) into `out` (`len` elements).
    pub fn fill_from(&self, w: &LayerWeights, out: &mut [f16]) -> Result<()> {
        assert_eq!(out.len(), self.len, "the arena holds one layer");
        out.fill(f16::ZERO);
        let mut put = |t: &flexgen_tensor::Tensor, at: usize| -> Result<()> {
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            for (d, s) in out[at..at + v.len()].iter_mut().zip(&v) {
                *d = f16::from_f32(*s);
            }
            Ok(())
        };
        let (qn, kn) = (w.q.weight.elem_count(), w.k.weight.elem_count());
        put(&w.q.weight, self.qkv_w.start)?;
        put(&w.k.weight, self.qkv_w.start + qn)?;
        put(&w.v.weight, self.qkv_w.start + qn + kn)?;
        put(&w.o.weight, self.o_w.start)?;
        let Mlp::Relu { fc1, fc2 } = &w.mlp;
        put(&fc1.weight, self.fc1_w.start)?;
        put(&fc2.weight, self.fc2_w.start)?;
        let bias = |l: &crate::Linear| {
            l.bias
                .clone()
                .ok_or_else(|| Error::Unsupported { what: "a linear without bias".into() })
        };
        put(&w.attn_norm.weight, self.attn_norm_w.start)?;
        put(
            w.attn_norm
                .bias
                .as_ref()
                .ok_or_else(|| Error::Unsupported { what: "LayerNorm without bias".into() })?,
            self.attn_norm_b.start,
        )?;
        let (qb, kb) = (self.qkv_b.start, self.qkv_b.start + w.q.weight.dim(0)?);
        put(&bias(&w.q)?, qb)?;
        put(&bias(&w.k)?, kb)?;
        put(&bias(&w.v)?, kb + w.k.weight.dim(0)?)?;
        put(&bias(&w.o)?, self.o_b.start)?;
        put(&w.mlp_norm.weight, self.mlp_norm_w.start)?;
        put(
            w.mlp_norm
                .bias
                .as_ref()
                .ok_or_else(|| Error::Unsupported { what: "LayerNorm without bias".into() })?,
            self.mlp_norm_b.start,
        )?;
        put(&bias(fc1)?, self.fc1_b.start)?;
        put(&bias(fc2)?, self.fc2_b.start)?;
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

    #[test]
    fn layout_covers_every_tensor_once_aligned() {
        let spec = crate::spec_by_name("opt-125m").unwrap();
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
        assert_eq!(total as u64, spec.layer_params());
        for w in ranges.windows(2) {
            assert!(w[0].end <= w[1].start, "ordered, disjoint");
            assert_eq!(w[1].start % LayerLayout::ALIGN, 0);
        }
        assert!(l.len >= ranges[11].end && l.len.is_multiple_of(LayerLayout::ALIGN));
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
        let spec = ModelSpec { num_layers: 2, ..crate::spec_by_name("opt-125m").unwrap() };
        let init = DummyInit::Random { seed: 5 };
        let w = crate::Weights::dummy(&spec, init).unwrap();
        let l = LayerLayout::new(&spec).unwrap();
        let mut from_tensors = vec![f16::ZERO; l.len];
        l.fill_from(&w.layers[1], &mut from_tensors).unwrap();
        let mut direct = vec![f16::ZERO; l.len];
        l.fill_dummy(init, 1, 0..l.len, &mut direct);
        // Padding between tensors is zero in one and hashed in the other: compare the tensors.
        for r in [&l.qkv_w, &l.o_w, &l.fc1_w, &l.fc2_w, &l.qkv_b, &l.attn_norm_w, &l.mlp_norm_b] {
            assert_eq!(&from_tensors[r.clone()], &direct[r.clone()]);
        }
    }

    #[test]
    fn fill_from_places_q_k_v_rows_in_order() {
        let spec = crate::spec_by_name("opt-125m").unwrap();
        let w = crate::Weights::dummy(
            &ModelSpec { num_layers: 1, ..spec.clone() },
            DummyInit::Random { seed: 1 },
        )
        .unwrap();
        let l = LayerLayout::new(&spec).unwrap();
        let mut out = vec![f16::ZERO; l.len];
        l.fill_from(&w.layers[0], &mut out).unwrap();
        let h = spec.hidden_size as usize;
        let k0 = w.layers[0].k.weight.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
        assert_eq!(out[l.qkv_w.start + h * h], f16::from_f32(k0));
        let vb = w.layers[0].v.bias.as_ref().unwrap().to_vec1::<f32>().unwrap()[0];
        assert_eq!(out[l.qkv_b.start + 2 * h], f16::from_f32(vb));
    }
}
