//! The execution policy: where weights, KV cache and activations live, how big the block is, and
//! which optional paths (CPU attention, pinning, compression) are on. See docs/policy-format.md.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, ModelSpec, Result};

/// Version of the policy file format this build reads and writes.
pub const POLICY_VERSION: u32 = 1;

/// A memory tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Gpu,
    Cpu,
    Disk,
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tier::Gpu => "GPU",
            Tier::Cpu => "CPU",
            Tier::Disk => "disk",
        })
    }
}

/// Percent of one kind of data held on each tier. The three shares sum to 100; the disk share is
/// written out so that nobody has to derive it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierShares {
    pub gpu: f64,
    pub cpu: f64,
    pub disk: f64,
}

impl TierShares {
    /// Everything on one tier.
    pub fn all_on(tier: Tier) -> Self {
        let mut s = Self { gpu: 0.0, cpu: 0.0, disk: 0.0 };
        *s.get_mut(tier) = 100.0;
        s
    }

    /// GPU and CPU percent as given; the disk takes the rest (the original's `--percent` rule).
    pub fn from_gpu_cpu(gpu: f64, cpu: f64) -> Self {
        Self { gpu, cpu, disk: 100.0 - gpu - cpu }
    }

    /// The percent on `tier`.
    pub fn get(&self, tier: Tier) -> f64 {
        match tier {
            Tier::Gpu => self.gpu,
            Tier::Cpu => self.cpu,
            Tier::Disk => self.disk,
        }
    }

    fn get_mut(&mut self, tier: Tier) -> &mut f64 {
        match tier {
            Tier::Gpu => &mut self.gpu,
            Tier::Cpu => &mut self.cpu,
            Tier::Disk => &mut self.disk,
        }
    }

    /// The tier that holds everything, if one does.
    pub fn single_tier(&self) -> Option<Tier> {
        [Tier::Gpu, Tier::Cpu, Tier::Disk].into_iter().find(|&t| self.get(t) >= 100.0 - 1e-9)
    }

    fn validate(&self, field: &str) -> Result<()> {
        for tier in [Tier::Gpu, Tier::Cpu, Tier::Disk] {
            let v = self.get(tier);
            if !(0.0..=100.0).contains(&v) || v.is_nan() {
                let name = format!("{field}.{}", format!("{tier:?}").to_lowercase());
                return Err(Error::invalid(
                    name,
                    v,
                    "a share must be between 0 and 100 percent",
                    "set it within 0..=100",
                ));
            }
        }
        let sum = self.gpu + self.cpu + self.disk;
        if (sum - 100.0).abs() > 1e-6 {
            return Err(Error::invalid(
                format!("{field} gpu+cpu+disk"),
                sum,
                "the three shares must sum to 100",
                format!("lower or raise one tier by {:.3}", sum - 100.0),
            ));
        }
        Ok(())
    }
}

/// Where each kind of data lives.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    pub weights: TierShares,
    pub kv_cache: TierShares,
    pub activations: TierShares,
}

impl Placement {
    /// Everything on the GPU (`FlexGen`'s default `100 0 100 0 100 0`).
    pub fn all_gpu() -> Self {
        let g = TierShares::all_on(Tier::Gpu);
        Self { weights: g, kv_cache: g, activations: g }
    }

    /// The six numbers of the original's `--percent`: weights GPU/CPU, cache GPU/CPU,
    /// activations GPU/CPU; the rest of each goes to disk.
    pub fn from_percent(p: [f64; 6]) -> Result<Self> {
        for (what, g, c) in
            [("weights", p[0], p[1]), ("KV cache", p[2], p[3]), ("activations", p[4], p[5])]
        {
            if g + c > 100.0 + 1e-9 {
                return Err(Error::invalid(
                    format!("--percent ({what})"),
                    format!("GPU {g} + CPU {c} = {}", g + c),
                    "a GPU+CPU pair cannot exceed 100 percent",
                    "lower one of the two; the disk gets 100 minus their sum",
                ));
            }
        }
        let placement = Self {
            weights: TierShares::from_gpu_cpu(p[0], p[1]),
            kv_cache: TierShares::from_gpu_cpu(p[2], p[3]),
            activations: TierShares::from_gpu_cpu(p[4], p[5]),
        };
        placement.validate().map_err(|e| match e {
            Error::Invalid { field, value, problem, .. } => Error::Invalid {
                field: format!("--percent ({field})"),
                value,
                problem,
                fix: "each gpu+cpu pair must be at most 100 (the disk gets the rest)".into(),
            },
            e => e,
        })?;
        Ok(placement)
    }

    /// The six numbers of `--percent`.
    pub fn to_percent(&self) -> [f64; 6] {
        [
            self.weights.gpu,
            self.weights.cpu,
            self.kv_cache.gpu,
            self.kv_cache.cpu,
            self.activations.gpu,
            self.activations.cpu,
        ]
    }

    fn validate(&self) -> Result<()> {
        self.weights.validate("placement.weights")?;
        self.kv_cache.validate("placement.kv_cache")?;
        self.activations.validate("placement.activations")
    }

    fn uses_disk(&self) -> bool {
        [self.weights, self.kv_cache, self.activations].iter().any(|s| s.disk > 0.0)
    }
}

/// Group-wise quantization of weights or KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Compression {
    pub enabled: bool,
    /// Bits per value: 4 or 8.
    pub bits: u8,
    /// Values per group sharing one min and scale.
    pub group_size: u32,
    /// Dimension along which groups are formed (weights: 0; KV cache: 2, the head dimension).
    pub group_dim: u32,
}

impl Compression {
    /// `FlexGen`'s weight compression (4 bits, groups of 64 along dim 0), off.
    pub fn weights_default() -> Self {
        Self { enabled: false, bits: 4, group_size: 64, group_dim: 0 }
    }

    /// `FlexGen`'s cache compression (4 bits, groups of 64 along the head dimension), off.
    pub fn cache_default() -> Self {
        Self { enabled: false, bits: 4, group_size: 64, group_dim: 2 }
    }

    fn validate(&self, field: &str) -> Result<()> {
        if !matches!(self.bits, 4 | 8) {
            return Err(Error::invalid(
                format!("{field}.bits"),
                self.bits,
                "only 4- and 8-bit quantization exist",
                "use 4 or 8",
            ));
        }
        if self.group_size == 0 || !self.group_size.is_multiple_of(2) || self.group_size > 4096 {
            return Err(Error::invalid(
                format!("{field}.group_size"),
                self.group_size,
                "groups must hold a positive, even number of values, at most 4096",
                "use 64 (FlexGen's default) or another even number up to 4096",
            ));
        }
        if self.group_dim > 2 {
            return Err(Error::invalid(
                format!("{field}.group_dim"),
                self.group_dim,
                "tensors have at most 3 dimensions here",
                "use 0 for weights or 2 for the KV cache",
            ));
        }
        Ok(())
    }
}

/// What the planner predicted for this policy. Informative only: never read back as truth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Prediction {
    /// Generated tokens per second of the whole workload.
    pub throughput_tokens_per_s: f64,
    pub prefill_s: f64,
    pub decode_s: f64,
    pub total_s: f64,
    pub peak_gpu_bytes: u64,
    pub peak_cpu_bytes: u64,
    pub peak_disk_bytes: u64,
    /// The resource that bounds the decode step ("compute", "cpu->gpu", "disk->cpu", ...).
    pub binding: String,
    /// The hardware profile and model the prediction was made for.
    pub hardware: String,
    pub model: String,
    pub planner_version: String,
}

/// One pipeline stage (`[[stage]]` in a policy file): a contiguous range of layers placed by its
/// own shares. The block shape, compression, pinning and the rest are the policy's; the first
/// stage holds the embeddings, the last the LM head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    /// The stage's first layer and one past its last: `layers = [0, 12]`.
    pub layers: [u32; 2],
    /// Where the stage keeps its weights, KV cache and activations; the policy's when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
    /// Whether the stage attends its CPU cache rows on the CPU; the policy's when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_cache_compute: Option<bool>,
}

/// A complete execution policy. Build one with [`Policy::default`] and the override methods, or
/// read it with [`Policy::from_toml_file`]; both paths validate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// File format version; must be 1.
    pub version: u32,
    /// Sequences per GPU micro-batch.
    pub gpu_batch_size: u32,
    /// Micro-batches per block; the block (effective batch) is `gpu_batch_size * num_gpu_batches`.
    pub num_gpu_batches: u32,
    /// Run decode attention on the CPU where the KV cache lives there.
    pub cpu_cache_compute: bool,
    /// Keep CPU-resident weights in page-locked (pinned) memory.
    pub pin_weight: bool,
    /// Folder for the disk tier; required when any share is on disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offload_dir: Option<PathBuf>,
    pub placement: Placement,
    pub compress_weight: Compression,
    pub compress_cache: Compression,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction: Option<Prediction>,
    /// Pipeline stages (`[[stage]]`) in layer order, together covering every layer; none: the
    /// whole model is one stage placed by `placement`.
    #[serde(default, rename = "stage", skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<Stage>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            version: POLICY_VERSION,
            gpu_batch_size: 1,
            num_gpu_batches: 1,
            cpu_cache_compute: false,
            pin_weight: true,
            offload_dir: None,
            placement: Placement::all_gpu(),
            compress_weight: Compression::weights_default(),
            compress_cache: Compression::cache_default(),
            prediction: None,
            stages: Vec::new(),
        }
    }
}

/// Decode micro-batches of at most this many rows run their products straight from 4-bit packed
/// weights ([`Policy::fuses_decode`]; on the tensor cores from `sm_80`, on the CUDA cores before; 64
/// a launch), however many micro-batches a block has: the dequantizing path expands each matrix
/// before each product (a slice at a time, [`expand_slice_outputs`]), so once per micro-batch
/// too, and on the H200 the fused product is the faster at every row count up to 128 on OPT's
/// matrices (session 25's `gemv4_bench`: at 128 rows 0.36 against 0.93 ms on OPT-175B's fc1,
/// 0.045 against 0.045 on OPT-6.7B's out; session 26: OPT-30B 4-bit at 1×4 decodes at 132.0
/// tok/s fused against 17.6 dequantizing).
pub const FUSED_DECODE_ROWS: u32 = 128;

/// The rows [`FUSED_DECODE_ROWS`] comes down to for 4-bit groups other than 64 and 128: the
/// CUDA-core product alone serves them, and from 8 rows on it is slower than dequantizing first
/// (session 17's `gemv4_bench`: OPT-175B's fc1 at 8 rows 1.05 ms against 0.93).
pub const FUSED_DECODE_OTHER_GROUP_ROWS: u32 = 4;

/// fp16 values of the CUDA stage's buffer for one dequantized slice of a packed matrix (128 MiB):
/// a matrix larger than that is dequantized and multiplied a slice of its outputs at a time, so
/// that a small GPU does not give a whole matrix (OPT-175B's fc1: 1.2 GB) to the buffer.
pub const EXPAND_SLICE_VALUES: usize = 64 << 20;

/// Outputs per slice of a packed `[outs, ins]` matrix whose groups run over `group` outputs:
/// all of them where they fit [`EXPAND_SLICE_VALUES`], else the fewest slices that fit, made
/// equal and rounded up to whole groups (at least one group). The memory plan and the planner
/// size the buffer by it; the CUDA stage slices its products by it.
pub fn expand_slice_outputs(outs: usize, ins: usize, group: usize) -> usize {
    if outs.saturating_mul(ins) <= EXPAND_SLICE_VALUES {
        return outs.max(1); // whole, also where its outputs are not whole groups
    }
    let group = group.max(1);
    let most = (EXPAND_SLICE_VALUES / ins.max(1) / group).max(1) * group;
    let slices = outs.div_ceil(most).max(1);
    outs.div_ceil(slices).next_multiple_of(group).min(outs)
}

/// fp16 values of the CUDA stage's prefill attention scores buffer at most (64 MiB): prefill
/// attends as many cache rows at a time as fit, so that the scores (quadratic in the prompt:
/// OPT-175B's 8 × 96 heads over 2,048 positions would take 6.4 GB) stay small next to a layer.
pub const PREFILL_SCORES_VALUES: usize = 32 << 20;

/// Values of the prefill scores buffer for `rows` cache rows of `per_row` scores each: all of
/// them where they fit [`PREFILL_SCORES_VALUES`], else as many whole rows as fit (at least one).
/// The CUDA stage attends that many rows at a time.
pub fn prefill_scores_len(rows: usize, per_row: usize) -> usize {
    rows.min((PREFILL_SCORES_VALUES / per_row.max(1)).max(1)) * per_row
}

/// [`prefill_scores_len`] of a micro-batch of `gpu_batch_size` sequences of `prompt` positions
/// of `spec`: a cache row per (sequence, kv head), its query heads' `prompt × prompt` scores. The
/// memory plan, the planner and the CUDA stage's buffer all take the size from here.
pub fn micro_batch_scores_len(spec: &ModelSpec, gpu_batch_size: usize, prompt: usize) -> usize {
    let nkv = spec.num_kv_heads as usize;
    prefill_scores_len(gpu_batch_size * nkv, spec.num_heads as usize / nkv * prompt * prompt)
}

impl Policy {
    /// Stage `i`'s own policy: this one with the stage's placement and CPU-attention choice, and
    /// no stages.
    ///
    /// # Panics
    /// If there is no stage `i`.
    #[must_use]
    pub fn stage_policy(&self, i: usize) -> Policy {
        let s = &self.stages[i];
        Policy {
            placement: s.placement.unwrap_or(self.placement),
            cpu_cache_compute: s.cpu_cache_compute.unwrap_or(self.cpu_cache_compute),
            stages: Vec::new(),
            prediction: None,
            ..self.clone()
        }
    }

    /// The pipeline as (layers, policy) per stage: the `[[stage]]` entries, or one stage of
    /// `num_layers` layers placed by this policy. Whether the ranges cover the model is the
    /// runtime's check (it knows the model).
    pub fn pipeline(&self, num_layers: u32) -> Vec<(std::ops::Range<u32>, Policy)> {
        if self.stages.is_empty() {
            return vec![(0..num_layers, Policy { prediction: None, ..self.clone() })];
        }
        (0..self.stages.len())
            .map(|i| {
                let [a, b] = self.stages[i].layers;
                (a..b, self.stage_policy(i))
            })
            .collect()
    }

    /// Sequences per block: `gpu_batch_size * num_gpu_batches`.
    pub fn block_size(&self) -> usize {
        self.gpu_batch_size as usize * self.num_gpu_batches as usize
    }

    /// Whether the CUDA stage's decode steps run their products straight from the packed 4-bit
    /// weights (the fused 4-bit product) rather than dequantizing each layer first: 4-bit
    /// weights, micro-batches of at most [`FUSED_DECODE_ROWS`] rows, in groups of 64 or 128 (the
    /// tensor-core product's: a warp's outputs share their scales); other groups of a multiple of 8 only up to
    /// [`FUSED_DECODE_OTHER_GROUP_ROWS`] rows, where the CUDA-core product keeps up. This is
    /// on a GPU with the tensor-core product, the most a device fuses: the memory plan counts the
    /// fused product's scratch by it. [`Policy::fuses_decode_on`] gives a device's own answer.
    pub fn fuses_decode(&self) -> bool {
        self.fuses_decode_on(true)
    }

    /// [`Policy::fuses_decode`] on a GPU with the tensor-core product (`tensor_cores`: compute
    /// capability 8.0 on, and the weights packed in its order) or without it, where every group
    /// takes the CUDA-core product, so only up to [`FUSED_DECODE_OTHER_GROUP_ROWS`] rows.
    pub fn fuses_decode_on(&self, tensor_cores: bool) -> bool {
        Self::fuses_decode_with(&self.compress_weight, self.gpu_batch_size, tensor_cores)
    }

    /// [`Policy::fuses_decode_on`] of a policy with this weight compression and micro-batch rows
    /// (the planner asks it of the shapes it weighs).
    pub fn fuses_decode_with(c: &Compression, gpu_batch_size: u32, tensor_cores: bool) -> bool {
        let rows = if tensor_cores && matches!(c.group_size, 64 | 128) {
            FUSED_DECODE_ROWS
        } else if c.group_size.is_multiple_of(8) {
            FUSED_DECODE_OTHER_GROUP_ROWS
        } else {
            0
        };
        c.enabled && c.bits == 4 && gpu_batch_size <= rows
    }

    /// Checks every field and the consistency between fields.
    pub fn validate(&self) -> Result<()> {
        if self.version != POLICY_VERSION {
            return Err(Error::invalid(
                "version",
                self.version,
                format!("this flexgen reads policy format {POLICY_VERSION}"),
                "write the policy again with this version's flexgen-plan",
            ));
        }
        if self.gpu_batch_size == 0 {
            return Err(Error::invalid(
                "gpu_batch_size",
                0,
                "a micro-batch needs at least one sequence",
                "set it to 1 or more",
            ));
        }
        if self.num_gpu_batches == 0 {
            return Err(Error::invalid(
                "num_gpu_batches",
                0,
                "a block needs at least one micro-batch",
                "set it to 1 or more",
            ));
        }
        self.placement.validate()?;
        if self.placement.activations.single_tier().is_none() {
            return Err(Error::invalid(
                "placement.activations",
                format!("{:?}", self.placement.activations),
                "activations live whole on one tier",
                "put 100 on one of gpu, cpu or disk",
            ));
        }
        self.compress_weight.validate("compress_weight")?;
        self.compress_cache.validate("compress_cache")?;
        if self.placement.uses_disk() && self.offload_dir.is_none() {
            return Err(Error::invalid(
                "offload_dir",
                "(unset)",
                "the placement puts data on disk",
                "set offload_dir to a folder on a fast disk, or give the disk share to gpu/cpu",
            ));
        }
        // After the policy's own keys, so that an error in them is not reported as a stage's.
        for (i, stage) in self.stages.iter().enumerate() {
            let want = i.checked_sub(1).map_or(0, |p| self.stages[p].layers[1]);
            check_stage_layers(i, stage.layers, want)?;
            self.stage_policy(i).validate().map_err(|e| e.in_stage(i))?;
        }
        Ok(())
    }

    /// Parses and validates policy TOML.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let policy: Self = toml::from_str(text).map_err(|e| parse_error(&e))?;
        policy.validate()?;
        Ok(policy)
    }

    /// Reads, parses and validates a policy file; errors name the file.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        crate::read_toml_file(path, Self::from_toml_str)
    }

    /// Reads and parses a policy file without validating it, for a caller that applies its own
    /// overrides (a command line's `--offload-dir` may supply what the file lacks) and then
    /// calls [`Policy::validate`]; errors name the file.
    pub fn parse_toml_file(path: &Path) -> Result<Self> {
        crate::read_toml_file(path, |text| toml::from_str(text).map_err(|e| parse_error(&e)))
    }

    /// The policy as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a policy always serializes")
    }

    /// Writes the policy as TOML, atomically.
    pub fn write_toml_file(&self, path: &Path) -> Result<()> {
        crate::write_file_atomic(path, &self.to_toml())
    }
}

/// Checks pipeline stage `i`'s layers `[start, end]`: at least one layer, starting at `want`,
/// where the stage before ends (0 for the first). The one check of stage order, for a policy's
/// `[[stage]]` entries and for the runtime's pipelines alike.
pub fn check_stage_layers(i: usize, [start, end]: [u32; 2], want: u32) -> Result<()> {
    if start < end && start == want {
        return Ok(());
    }
    let problem = if start >= end {
        "a stage holds at least one layer".to_string()
    } else if i == 0 {
        "the first stage must start at layer 0".to_string()
    } else {
        format!("the stage before ends at layer {want}")
    };
    Err(Error::invalid(
        format!("stage[{i}].layers"),
        format!("[{start}, {end}]"),
        problem,
        format!(
            "write [first layer, one past the last], in layer order, this one starting at {want}"
        ),
    ))
}

/// A policy that does not parse; a missing key gets the fix (every key but the optional ones is
/// required, so that nothing is left to a default the writer did not see).
fn parse_error(e: &toml::de::Error) -> Error {
    let mut m = e.to_string();
    if m.contains("missing field") {
        m.push_str(
            "every key of docs/policy-format.md is required except offload_dir, [prediction] \
             and [[stage]]: copy the missing one from policies/default.toml",
        );
    }
    Error::Parse(m)
}

#[cfg(test)]
mod tests {
    #[test]
    fn expand_slices_and_prefill_score_rows_fit_their_buffers() {
        for (outs, ins, group) in [
            (49_152usize, 12_288usize, 64usize), // OPT-175B fc1: ten slices
            (12_288, 49_152, 64),
            (36_864, 12_288, 64),
            (16_384, 4_096, 64), // OPT-6.7B fc1: exactly one slice
            (50, 3, 64),
            (1_000_000, 1_000, 32),
            (7, 40_000_000, 64), // one group wider than the buffer: a group a slice
        ] {
            let per = expand_slice_outputs(outs, ins, group);
            assert!(per > 0 && per <= outs, "{outs}×{ins}: {per}");
            assert!(
                per == outs || per.is_multiple_of(group),
                "{outs}×{ins}: {per} not whole groups"
            );
            assert!(per * ins <= EXPAND_SLICE_VALUES || per <= group, "{outs}×{ins}: {per}");
            let slices = outs.div_ceil(per);
            // Equal slices: the last one is not a sliver.
            assert!(outs - (slices - 1) * per + group >= per.min(outs) / 2, "{outs}×{ins}");
        }
        assert_eq!(expand_slice_outputs(49_152, 12_288, 64), 4_928);
        // Prefill scores: OPT-175B, 8 sequences × 96 heads of 512 × 512 scores: 128 rows at once.
        assert_eq!(prefill_scores_len(768, 512 * 512), 128 * 512 * 512);
        assert_eq!(prefill_scores_len(4, 1000), 4000, "all rows where they fit");
        assert_eq!(prefill_scores_len(3, PREFILL_SCORES_VALUES * 2), PREFILL_SCORES_VALUES * 2);
        assert_eq!(expand_slice_outputs(16_384, 4_096, 64), 16_384);
    }

    use super::*;

    #[test]
    fn a_missing_key_is_named_with_the_fix() {
        let Err(e) = Policy::from_toml_str("version = 1\ngpu_batch_size = 4\n") else {
            panic!("a policy of two keys accepted")
        };
        let m = e.to_string();
        assert!(m.contains("num_gpu_batches") || m.contains("cpu_cache_compute"), "{m}");
        assert!(m.contains("policies/default.toml"), "{m}");
    }

    #[test]
    fn default_round_trips_and_validates() {
        let p = Policy::default();
        p.validate().unwrap();
        assert_eq!(Policy::from_toml_str(&p.to_toml()).unwrap(), p);
    }

    #[test]
    fn stages_round_trip_and_each_is_validated_under_its_name() {
        let mut p = Policy::default();
        let cpu =
            Placement { weights: TierShares::from_gpu_cpu(0.0, 100.0), ..Placement::all_gpu() };
        p.stages = vec![
            Stage { layers: [0, 3], placement: None, cpu_cache_compute: None },
            Stage { layers: [3, 8], placement: Some(cpu), cpu_cache_compute: Some(true) },
        ];
        p.validate().unwrap();
        assert_eq!(Policy::from_toml_str(&p.to_toml()).unwrap(), p);
        let stages = p.pipeline(8);
        assert_eq!(stages[0].0, 0..3);
        assert_eq!(stages[0].1.placement, p.placement);
        assert_eq!((stages[1].1.placement, stages[1].1.cpu_cache_compute), (cpu, true));
        assert!(stages.iter().all(|(_, s)| s.stages.is_empty()));
        assert_eq!(Policy::default().pipeline(8), vec![(0..8, Policy::default())]);
        // Out of order, empty, not from layer 0, and a stage's own bad placement: each named.
        for (stages, field) in [
            (vec![[0, 3], [4, 8]], "stage[1].layers"),
            (vec![[0, 3], [3, 3]], "stage[1].layers"),
            (vec![[1, 8]], "stage[0].layers"),
        ] {
            let mut q = p.clone();
            q.stages = stages
                .into_iter()
                .map(|layers| Stage { layers, placement: None, cpu_cache_compute: None })
                .collect();
            let Error::Invalid { field: f, .. } = q.validate().unwrap_err() else { panic!() };
            assert_eq!(f, field);
        }
        let mut q = p.clone();
        q.stages[1].placement.as_mut().unwrap().activations = TierShares::from_gpu_cpu(50.0, 50.0);
        let Error::Invalid { field, .. } = q.validate().unwrap_err() else { panic!() };
        assert_eq!(field, "stage[1].placement.activations");
        // A stage's disk share needs the policy's own folder, named as the policy's key.
        q.stages[1].placement.as_mut().unwrap().activations = TierShares::all_on(Tier::Gpu);
        q.stages[1].placement.as_mut().unwrap().weights = TierShares::from_gpu_cpu(0.0, 60.0);
        let Error::Invalid { field, .. } = q.validate().unwrap_err() else { panic!() };
        assert_eq!(field, "offload_dir");
    }

    #[test]
    fn percent_sets_disk_to_the_rest() {
        let pl = Placement::from_percent([20.0, 50.0, 0.0, 100.0, 100.0, 0.0]).unwrap();
        assert_eq!(pl.weights, TierShares { gpu: 20.0, cpu: 50.0, disk: 30.0 });
        assert_eq!(pl.to_percent(), [20.0, 50.0, 0.0, 100.0, 100.0, 0.0]);
    }

    #[test]
    fn percent_over_100_names_the_flag() {
        let err = Placement::from_percent([60.0, 50.0, 100.0, 0.0, 100.0, 0.0]).unwrap_err();
        let Error::Invalid { field, value, .. } = &err else { panic!("{err:?}") };
        assert_eq!(field, "--percent (weights)");
        assert!(value.contains("= 110"), "{value}");
    }

    #[test]
    fn disk_share_needs_offload_dir() {
        let mut p = Policy::default();
        p.placement.weights = TierShares::from_gpu_cpu(0.0, 70.0);
        let Error::Invalid { field, .. } = p.validate().unwrap_err() else { panic!() };
        assert_eq!(field, "offload_dir");
        p.offload_dir = Some("/tmp/x".into());
        p.validate().unwrap();
    }

    #[test]
    fn zero_batch_is_refused() {
        let p = Policy { gpu_batch_size: 0, ..Policy::default() };
        let Error::Invalid { field, .. } = p.validate().unwrap_err() else { panic!() };
        assert_eq!(field, "gpu_batch_size");
    }

    #[test]
    fn split_activations_are_refused() {
        let mut p = Policy::default();
        p.placement.activations = TierShares::from_gpu_cpu(50.0, 50.0);
        let Error::Invalid { field, .. } = p.validate().unwrap_err() else { panic!() };
        assert_eq!(field, "placement.activations");
    }

    #[test]
    fn unknown_key_is_a_parse_error_naming_it() {
        let text = Policy::default().to_toml().replace("pin_weight", "pin_weights");
        let Error::Parse(msg) = Policy::from_toml_str(&text).unwrap_err() else { panic!() };
        assert!(msg.contains("pin_weights"), "{msg}");
    }

    #[test]
    fn bad_bits_name_the_field() {
        let mut p = Policy::default();
        p.compress_cache.bits = 3;
        let Error::Invalid { field, .. } = p.validate().unwrap_err() else { panic!() };
        assert_eq!(field, "compress_cache.bits");
    }

    #[test]
    fn decode_reads_the_codes_straight_in_groups_the_tensor_core_product_takes() {
        let c = |group_size, bits| Compression { enabled: true, bits, group_size, group_dim: 0 };
        let fuses = |cw: Compression, rows| Policy::fuses_decode_with(&cw, rows, true);
        for group in [64, 128] {
            assert!(fuses(c(group, 4), FUSED_DECODE_ROWS), "group {group}");
            assert!(!fuses(c(group, 4), FUSED_DECODE_ROWS + 1), "group {group}");
        }
        for group in [16, 32, 256] {
            assert!(fuses(c(group, 4), FUSED_DECODE_OTHER_GROUP_ROWS), "group {group}");
            assert!(!fuses(c(group, 4), FUSED_DECODE_OTHER_GROUP_ROWS + 1), "group {group}");
        }
        assert!(!fuses(c(30, 4), 1), "groups of a multiple of 8 only");
        assert!(!fuses(c(64, 8), 1), "4-bit codes only");
        assert!(!fuses(Compression { enabled: false, ..c(64, 4) }, 1), "compressed weights only");
        // However many micro-batches: the dequantizing path expands per micro-batch too.
        let p = Policy { compress_weight: c(64, 4), gpu_batch_size: 32, ..Policy::default() };
        assert!(p.fuses_decode());
        assert!(Policy { num_gpu_batches: 64, ..p.clone() }.fuses_decode());
        // Without the tensor-core product (before compute capability 8.0) every group takes the
        // CUDA-core one: a few rows only. `fuses_decode` is the most any device fuses.
        assert!(!p.fuses_decode_on(false), "32 rows on the CUDA cores dequantize");
        for group in [64, 128, 32] {
            let at = |rows| Policy::fuses_decode_with(&c(group, 4), rows, false);
            assert!(at(FUSED_DECODE_OTHER_GROUP_ROWS) && !at(FUSED_DECODE_OTHER_GROUP_ROWS + 1));
        }
    }

    #[test]
    fn a_group_size_beyond_the_bound_is_refused_before_it_sizes_anything() {
        let mut p = Policy::default();
        p.compress_weight.group_size = 1 << 30;
        let Error::Invalid { field, .. } = p.validate().unwrap_err() else { panic!() };
        assert_eq!(field, "compress_weight.group_size");
        p.compress_weight.group_size = 4096;
        p.validate().unwrap();
    }

    proptest::proptest! {
        #[test]
        fn any_valid_placement_round_trips(w in 0u8..=100, wc in 0u8..=100, c in 0u8..=100,
                                           b in 1u32..512, k in 1u32..16) {
            let wc = wc.min(100 - w);
            let cc = 100 - c;
            let p = Policy {
                gpu_batch_size: b,
                num_gpu_batches: k,
                placement: Placement::from_percent(
                    [f64::from(w), f64::from(wc), f64::from(c), f64::from(cc), 100.0, 0.0]).unwrap(),
                offload_dir: Some("/tmp/offload".into()),
                ..Policy::default()
            };
            p.validate().unwrap();
            proptest::prop_assert_eq!(Policy::from_toml_str(&p.to_toml()).unwrap(), p);
        }
    }
}
