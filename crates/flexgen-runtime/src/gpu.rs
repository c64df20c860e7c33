//! The CUDA executor: greedy generation on GPU 0 with the zig-zag block schedule.
//!
//! Each decoder layer's weights are one fp16 arena ([`LayerLayout`]). The policy's weight shares
//! are exact slices of every arena: the first `gpu %` of each layer's bytes live on the GPU, the
//! next `cpu %` in CPU memory (pinned when `pin_weight`, else pageable), the rest on disk (one
//! file in `offload_dir`, read with direct I/O so the page cache cannot serve it, by a reader
//! thread that runs ahead of the GPU into a ring of pinned buffers). A layer that is not wholly
//! resident is assembled in one of two device staging arenas before use: its CPU and disk parts
//! are copied on the load stream (two layers ahead), its GPU part by a device-to-device copy on
//! the compute stream. Events order the two streams: a staging arena is
//! refilled only after the layer that used it has been computed for every GPU batch, and a layer
//! is computed only after its copy has landed. So the PCIe link stays busy across layer and step
//! boundaries while the GPU computes.
//!
//! The KV cache is preallocated for the whole sequence (prompt + new tokens) per layer and GPU
//! batch, written in place by the fused q/k/v split; attention reads it with strided GEMMs in
//! prefill and with one kernel per (sequence, head) in decode. The cache's shares split each
//! (layer, batch) by (sequence, head) rows: the first rows live on the GPU, the rest in pinned
//! CPU memory. For CPU rows, with `cpu_cache_compute` the decode attention runs on the CPU cores
//! (only q, the new k and v, and the output cross PCIe); without it the rows' cache is copied to
//! a GPU working area for the step and the new position copied back. Prefill attention always
//! runs on the GPU. Activations live whole on the GPU or in pinned CPU memory (then each GPU
//! batch's hidden state is copied in before and out after every layer). The next tokens are chosen on the
//! GPU (argmax), so one sync and a few bytes cross to the host per step.
//!
//! Everything the run needs on the GPU is counted before anything is allocated; a policy that
//! does not fit is refused with the tier, the bytes and the field to change.

use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Instant;

use cudarc::driver::CudaEvent;
use flexgen_model::{DummyInit, LayerLayout, Model, PackedLayout};
use flexgen_policy::{ModelSpec, Policy, Tier};
use flexgen_tensor::cuda::exec::{
    AttnDims, CacheQuant, Copy2d, Gemm, Mem, NewKv, addr, at, copy_2d,
};
use flexgen_tensor::cuda::{
    CudaError, CudaSlice, CudaStream, Gpu, GpuTensor, HostMem, PinnedHostSlice,
};
use flexgen_tensor::host::{DirectFile, align_up};
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::disk::{DiskCache, READ_THREADS, disk_pos_bytes, read_parallel};
use crate::stage::{self, BlockInput, Feed, Picks, Stage};
use crate::tiers::split_counts;
use crate::{Error, Result, RunStats, tiers::Traffic};

/// Where the weights come from: a loaded model's layers, or dummy values made in place.
#[derive(Debug, Clone, Copy)]
pub enum LayerSource {
    /// `model.weights.layers`.
    Loaded,
    /// [`LayerLayout::fill_dummy`] values, never materialized as f32.
    Dummy(DummyInit),
}

/// The longest prompt and the most new tokens a [`CudaStage`] is sized for, and the GPU memory
/// it may use (`None`: what the device reports free, less a margin).
#[derive(Debug, Clone, Copy)]
pub struct GpuCapacity {
    pub max_prompt: usize,
    pub max_new: usize,
    pub gpu_limit: Option<u64>,
}

struct LayerHome {
    /// Elements `0..g_end` of the arena (the whole arena when it is wholly resident).
    gpu: Option<CudaSlice<f16>>,
    /// Elements `g_end..c_end`.
    cpu: Option<HostMem>,
}

/// The disk parts of every layer (elements `c_end..len`): layer `j` at `j · slot_bytes`.
struct DiskPart {
    file: DirectFile,
    slot_bytes: usize,
    layers: usize,
    /// Pinned buffers the reader thread fills, each `slot_bytes`.
    ring: Vec<HostMem>,
    /// Recorded on the load stream after each ring buffer's copy to the GPU.
    copied: Vec<CudaEvent>,
}

/// A layer arena as a policy places it: the layout, its packed form with `compress_weight`, its
/// length in units (fp16 values, or packed bytes two to a unit), and where the GPU part and the
/// CPU part end.
struct Arena {
    layout: LayerLayout,
    packed: Option<PackedLayout>,
    unit_len: usize,
    ends: [usize; 2],
}

/// GPU memory of a run, by use (bytes).
#[derive(Debug, Clone, Copy, Default)]
pub struct GpuBytes {
    pub weights: u64,
    pub staging: u64,
    pub tables: u64,
    pub cache: u64,
    pub activations: u64,
}

impl GpuBytes {
    pub fn total(&self) -> u64 {
        self.weights + self.staging + self.tables + self.cache + self.activations
    }
}

/// Runs greedy generation of token prompts on the GPU.
pub struct CudaStage<'m> {
    model: &'m Model,
    policy: Policy,
    gpu: Gpu,
    load: Arc<CudaStream>,
    /// The stream of the prefetched activation and cache copies (`Prefetch`).
    copy: Arc<CudaStream>,
    prefetch: Prefetch,
    /// Recorded on the copy stream once visit buffer `slot` is staged.
    staged: [CudaEvent; 2],
    /// Recorded on the compute stream before a prefetch: the copy stream waits for it.
    mark: CudaEvent,
    layout: LayerLayout,
    /// With `compress_weight`: the packed form of each arena, which the tiers hold and move.
    packed: Option<PackedLayout>,
    /// fp16 units of the stored arena: `layout.len`, or half the packed bytes.
    unit_len: usize,
    /// With `compress_weight`: the fp16 arena each layer is dequantized into before use.
    unpacked: Option<CudaSlice<f16>>,
    /// The last layer packed at set-up (packing once serves its GPU, CPU and disk parts), by
    /// layer, or 0 for `ones` dummy layers (all alike).
    packed_memo: RefCell<Option<(usize, Vec<f16>)>>,
    /// Units of each stored arena resident on the GPU (`0..g_end`), in CPU memory
    /// (`g_end..c_end`); the rest is on disk.
    g_end: usize,
    c_end: usize,
    /// (sequence, head) rows of each (layer, batch) cache on the GPU; the rest are on the CPU.
    gpu_rows: usize,
    /// Decode attention of the CPU rows runs on the CPU.
    cpu_attention: bool,
    /// With `compress_cache`: (bits, group) of the packed cache.
    cache_quant: Option<(u8, usize)>,
    /// (sequence, head) rows of each (layer, batch) cache on disk (the last rows).
    disk_rows: usize,
    /// Bytes of KV cache read from and written to disk.
    cache_disk_io: Cell<(u64, u64)>,
    /// Host time inside the steps (CPU attention, waits on the compute stream).
    host_times: Cell<crate::generate::HostTimes>,
    /// Hidden states between layers live on the GPU (else in pinned CPU memory).
    act_on_gpu: bool,
    embed: GpuTensor,
    pos_embed: Option<GpuTensor>,
    final_norm: (GpuTensor, GpuTensor),
    lm_head: Option<GpuTensor>,
    layers: Vec<LayerHome>,
    disk: Option<DiskPart>,
    stage: Vec<CudaSlice<f16>>,
    loaded: [CudaEvent; 2],
    freed: [CudaEvent; 2],
    capacity: GpuCapacity,
    bytes: GpuBytes,
    /// The run buffers (allocated on first use, for `capacity`).
    run: RefCell<Option<RunBuffers>>,
    /// Page-locked CPU memory held for weights.
    pub pinned_bytes: u64,
    /// Pageable CPU memory held for weights.
    pub pageable_bytes: u64,
    /// Pinned host-to-device bandwidth measured at set-up (bytes/s), when weights are offloaded.
    pub h2d_bytes_per_s: Option<f64>,
    /// Direct-read bandwidth of the offload directory measured at set-up (bytes/s), when
    /// weights are on disk.
    pub disk_bytes_per_s: Option<f64>,
    /// Whether the disk tier bypasses the page cache (`None`: no weights on disk).
    pub direct_io: Option<bool>,
    /// Seconds of set-up: (filling and placing weights, pinning, writing the disk tier).
    pub setup_times: SetupTimes,
}

/// Where set-up time went (seconds).
#[derive(Debug, Clone, Copy, Default)]
#[expect(clippy::struct_field_names, reason = "seconds, named like the report fields")]
pub struct SetupTimes {
    pub fill_s: f64,
    pub pin_s: f64,
    pub disk_write_s: f64,
    pub total_s: f64,
}

fn cuda(e: CudaError) -> Error {
    Error::Model(flexgen_model::Error::Gpu(e))
}

fn drv(e: cudarc::driver::DriverError) -> Error {
    cuda(e.into())
}

/// What the copy stream stages one (layer, batch) visit ahead while the compute stream works on
/// the current visit, into the other of two buffers: the hidden states kept on the CPU (with two
/// or more GPU batches, so that the next visit's input is not the current one's output), and the
/// past positions of the cache rows kept on the CPU when the GPU attends them (fp16 or packed; not
/// with rows on disk, whose staging the host fills). Without it these copies run on the compute
/// stream between a visit's kernels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Prefetch {
    act: bool,
    cache: bool,
}

impl Prefetch {
    fn of(policy: &Policy, gpu_rows: usize, rows: usize, disk_rows: usize) -> Self {
        let cpu_rows = rows - gpu_rows;
        Self {
            act: policy.placement.activations.single_tier() == Some(Tier::Cpu)
                && policy.num_gpu_batches >= 2,
            cache: cpu_rows > 0 && disk_rows == 0 && !cpu_attention(policy, gpu_rows, rows),
        }
    }

    /// Buffers of a kind: two when the kind is prefetched.
    fn slots(on: bool) -> usize {
        if on { 2 } else { 1 }
    }

    /// What is staged ahead in a step whose visits have `past` cached positions (no cache to copy
    /// in during prefill).
    fn in_step(self, past: usize) -> Self {
        Self { act: self.act, cache: self.cache && past > 0 }
    }
}

/// Visit (layer `j`, batch `kb`) of a step of `layers` × `k` visits, in the executor's order
/// (every batch through a layer before the next layer): its buffer slot, whether it is the step's
/// first (staged in place; each later visit is staged by the one before it), and the visit after
/// it in the step, whose inputs it stages.
fn visit_order(
    (j, kb): (usize, usize),
    (layers, k): (usize, usize),
) -> (usize, bool, Option<(usize, usize)>) {
    let v = j * k + kb;
    let next = if kb + 1 < k { Some((j, kb + 1)) } else { (j + 1 < layers).then_some((j + 1, 0)) };
    (v % 2, v == 0, next)
}

/// Whether the off-GPU cache rows (of `rows` per (layer, batch), `gpu_rows` on the GPU) attend on
/// the CPU. A compressed cache is attended on the GPU (as the original's compressed path is).
fn cpu_attention(policy: &Policy, gpu_rows: usize, rows: usize) -> bool {
    policy.cpu_cache_compute && gpu_rows < rows && !policy.compress_cache.enabled
}

/// One (layer, batch) of a compressed cache: codes of k and v, and their (min, scale) pairs.
type PackedKv = ([CudaSlice<u8>; 2], [CudaSlice<f16>; 2]);

/// Per-run buffers: the hidden state of every GPU batch, shared scratch, the KV cache.
struct RunBuffers {
    /// Hidden states: one per GPU batch on the GPU, or the staging of those kept on the CPU (two
    /// when prefetched, indexed by the visit's slot).
    x: Vec<CudaSlice<f16>>,
    hn: CudaSlice<f16>,
    qkv: CudaSlice<f16>,
    q: CudaSlice<f16>,
    scores: CudaSlice<f16>,
    ctx: CudaSlice<f16>,
    att: CudaSlice<f16>,
    f1: CudaSlice<f16>,
    last: CudaSlice<f16>,
    logits: CudaSlice<f16>,
    /// `[layer][batch]` → (k, v) of the GPU rows, each `[gpu_rows, cap, hd]`.
    kv: Vec<Vec<(CudaSlice<f16>, CudaSlice<f16>)>>,
    /// With a compressed cache: `[layer][batch]` → codes (k, v) and params (k, v) of the GPU rows.
    kvq: Vec<Vec<PackedKv>>,
    /// … of the CPU rows, pinned: codes (k, v) as pairs of bytes, params (k, v).
    kvq_cpu: Vec<Vec<[HostMem; 4]>>,
    /// The CPU rows' packed cache on its way through the GPU (one (layer, batch) at a time; two
    /// when prefetched; none without CPU rows).
    kvq_stage: Vec<PackedKv>,
    /// The disk rows' cache: one file, `[layer][batch][k|v]` regions of `[disk_rows, cap, hd]`,
    /// and two pinned staging regions for the (layer, batch) in use.
    disk_cache: Option<DiskCache>,
    /// `[layer][batch]` → (k, v) of the CPU rows, each `[cpu_rows, cap, hd]`, pinned.
    kv_cpu: Vec<Vec<(HostMem, HostMem)>>,
    /// k and v of the CPU rows on the GPU: the new positions (CPU attention, `[cpu_rows, t, hd]`)
    /// or the whole working cache of one (layer, batch) (`[cpu_rows, cap, hd]`; every row when
    /// packed); two when the fp16 cache is prefetched, indexed by the visit's slot.
    work: Vec<(CudaSlice<f16>, CudaSlice<f16>)>,
    /// Hidden states of each GPU batch when activations live on the CPU (`[b·t, h]`, pinned).
    x_host: Vec<HostMem>,
    /// The last positions' logits of each GPU batch (`[b, vocab]`, pinned).
    logits_host: Vec<HostMem>,
    /// Pinned staging of CPU attention: q, new k, new v, output (`[cpu_rows, hd]` each).
    cpu_att: Vec<HostMem>,
    ids: Vec<CudaSlice<u32>>,
    pos: Vec<CudaSlice<u32>>,
    start: Vec<CudaSlice<i32>>,
    tok: Vec<CudaSlice<u32>>,
}

impl<'m> CudaStage<'m> {
    /// Opens GPU 0, checks that the policy is one this executor runs and that everything fits,
    /// then places the weights (`source` says where layer values come from).
    pub fn new(
        model: &'m Model,
        policy: Policy,
        source: LayerSource,
        capacity: GpuCapacity,
    ) -> Result<Self> {
        let started = Instant::now();
        policy.validate()?;
        let p = &policy.placement;
        let refuse = |field: &'static str, what: &str| Error::Config {
            field,
            message: format!(
                "the CUDA executor does not run {what} yet; {:?} with this setting needs the CPU \
                 executor (--device cpu)",
                p.to_percent()
            ),
        };
        let act_on_gpu = match p.activations.single_tier() {
            Some(Tier::Gpu) => true,
            Some(Tier::Cpu) => false,
            _ => {
                return Err(refuse(
                    "placement.activations",
                    "activations split across tiers or on disk (give them one tier, GPU or CPU)",
                ));
            }
        };

        if policy.compress_weight.enabled && policy.compress_weight.group_dim != 0 {
            return Err(refuse(
                "compress_weight.group_dim",
                "weight groups along a dimension other than 0",
            ));
        }
        let spec = &model.spec;
        if spec.num_kv_heads != spec.num_heads {
            return Err(refuse("model", "grouped-query attention"));
        }
        let (rows, [gpu_rows, _, disk_rows]) = Self::cache_rows(spec, &policy);
        if disk_rows > 0 && policy.compress_cache.enabled {
            return Err(refuse("placement.kv_cache.disk", "a compressed KV cache on disk"));
        }
        if disk_rows > 0 && policy.offload_dir.is_none() {
            return Err(Error::Config {
                field: "offload_dir",
                message: "a KV cache on disk needs offload_dir (--offload-dir DIR)".into(),
            });
        }
        let cpu_attention = cpu_attention(&policy, gpu_rows, rows);
        let cache_quant = policy
            .compress_cache
            .enabled
            .then_some((policy.compress_cache.bits, policy.compress_cache.group_size as usize));
        let Arena { layout, packed, unit_len, ends: [g_end, c_end] } = Self::arena(spec, &policy)?;
        let n_layers = spec.num_layers as usize;
        if matches!(source, LayerSource::Loaded) && model.weights.layers.len() != n_layers {
            return Err(Error::Config {
                field: "model",
                message: "the model's layers were not loaded".into(),
            });
        }
        let disk_dir = if c_end < unit_len {
            Some(policy.offload_dir.clone().ok_or_else(|| Error::Config {
                field: "offload_dir",
                message: "weights on disk need offload_dir (--offload-dir DIR)".into(),
            })?)
        } else {
            None
        };
        let gpu = Gpu::new(0).map_err(cuda)?;
        // The executor orders its two streams with its own events.
        // SAFETY: every buffer below is used on the compute stream, except the staging arenas,
        // which the load stream writes only between `freed` and `loaded` events, and the visit
        // buffers of `Prefetch`, which the copy stream writes only between `mark` and `staged`.
        unsafe { gpu.ctx.disable_event_tracking() };
        let load = gpu.ctx.new_stream().map_err(drv)?;
        let copy = gpu.ctx.new_stream().map_err(drv)?;
        let prefetch = Prefetch::of(&policy, gpu_rows, rows, disk_rows);
        // The figures bytes_needed and host_bytes_needed give the planner's tests, from the same
        // arena and rows.
        let bytes = Self::plan_bytes(spec, &policy, (&layout, unit_len), g_end, gpu_rows, capacity);
        let host =
            Self::plan_host_bytes(spec, &policy, unit_len, (g_end, c_end), gpu_rows, capacity);
        if let Some(avail) = mem_available() {
            let avail = avail.saturating_sub(2 << 30);
            if host > avail {
                #[expect(clippy::cast_precision_loss, reason = "a report")]
                let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
                return Err(Error::Config {
                    field: "placement",
                    message: format!(
                        "the CPU tier cannot hold this run: weights, KV cache and activations \
                         placed on the CPU need {:.2} GiB but {:.2} GiB of memory are available \
                         (MemAvailable less 2 GiB), {:.2} GiB short. Lower the CPU shares \
                         (placement.*.cpu), gpu_batch_size or num_gpu_batches.",
                        gib(host),
                        gib(avail),
                        gib(host - avail)
                    ),
                });
            }
        }
        let available = if let Some(l) = capacity.gpu_limit {
            l
        } else {
            let (free, _) = gpu.ctx.mem_get_info().map_err(drv)?;
            (free as u64).saturating_sub(1 << 30)
        };
        if bytes.total() > available {
            return Err(Self::refusal(&bytes, available, capacity.gpu_limit.is_some()));
        }
        let w = &model.weights;
        let up = |t: &flexgen_tensor::Tensor| gpu.upload(t).map_err(cuda);
        let embed = up(&w.token_embedding)?;
        let pos_embed = w.position_embedding.as_ref().map(up).transpose()?;
        let final_norm = (
            up(&w.final_norm.weight)?,
            up(w.final_norm.bias.as_ref().ok_or_else(|| Error::Config {
                field: "model",
                message: "the final LayerNorm has no bias".into(),
            })?)?,
        );
        let lm_head = w.lm_head.as_ref().map(up).transpose()?;
        let loaded = [new_event(&gpu)?, new_event(&gpu)?];
        let freed = [new_event(&gpu)?, new_event(&gpu)?];
        let staged = [new_event(&gpu)?, new_event(&gpu)?];
        let mark = new_event(&gpu)?;
        let mut this = Self {
            model,
            policy,
            gpu,
            load,
            copy,
            prefetch,
            staged,
            mark,
            layout,
            packed,
            unit_len,
            unpacked: None,
            packed_memo: std::cell::RefCell::new(None),
            g_end,
            c_end,
            gpu_rows,
            cpu_attention,
            cache_quant,
            disk_rows,
            cache_disk_io: std::cell::Cell::new((0, 0)),
            host_times: std::cell::Cell::default(),
            act_on_gpu,
            embed,
            pos_embed,
            final_norm,
            lm_head,
            layers: Vec::with_capacity(n_layers),
            disk: None,
            stage: Vec::new(),
            loaded,
            freed,
            capacity,
            bytes,
            run: RefCell::new(None),
            pinned_bytes: 0,
            pageable_bytes: 0,
            h2d_bytes_per_s: None,
            disk_bytes_per_s: None,
            direct_io: None,
            setup_times: SetupTimes::default(),
        };
        this.place_weights(source, disk_dir.as_deref())?;
        this.setup_times.total_s = started.elapsed().as_secs_f64();
        Ok(this)
    }

    fn refusal(bytes: &GpuBytes, available: u64, limited: bool) -> Error {
        #[expect(clippy::cast_precision_loss, reason = "a report")]
        let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
        Error::Config {
            field: "placement",
            message: format!(
                "the GPU tier cannot hold this run: it needs {:.2} GiB (weights {:.2}, staging \
                 {:.2}, embeddings {:.2}, KV cache {:.2}, activations {:.2}) but {:.2} GiB are \
                 available{}, {:.2} GiB short. Lower placement.weights.gpu, gpu_batch_size or \
                 num_gpu_batches, or shorten the prompt or generation.",
                gib(bytes.total()),
                gib(bytes.weights),
                gib(bytes.staging),
                gib(bytes.tables),
                gib(bytes.cache),
                gib(bytes.activations),
                gib(available),
                if limited { " under --gpu-mem-limit" } else { "" },
                gib(bytes.total() - available)
            ),
        }
    }

    /// The GPU bytes a run of `policy` on a model of `spec` needs, by use: what [`Self::new`]
    /// checks against the GPU's memory before it allocates anything. Needs no GPU, so that a
    /// planner's figures can be checked against it.
    pub fn bytes_needed(
        spec: &ModelSpec,
        policy: &Policy,
        capacity: GpuCapacity,
    ) -> Result<GpuBytes> {
        policy.validate()?;
        let a = Self::arena(spec, policy)?;
        let gpu_rows = Self::cache_rows(spec, policy).1[0];
        Ok(Self::plan_bytes(spec, policy, (&a.layout, a.unit_len), a.ends[0], gpu_rows, capacity))
    }

    /// The CPU bytes a run of `policy` holds (weights, cache rows and activations placed on the
    /// CPU, the disk reader's ring): what [`Self::new`] checks against `MemAvailable` less 2 GiB.
    pub fn host_bytes_needed(
        spec: &ModelSpec,
        policy: &Policy,
        capacity: GpuCapacity,
    ) -> Result<u64> {
        policy.validate()?;
        let a = Self::arena(spec, policy)?;
        let gpu_rows = Self::cache_rows(spec, policy).1[0];
        let ends = (a.ends[0], a.ends[1]);
        Ok(Self::plan_host_bytes(spec, policy, a.unit_len, ends, gpu_rows, capacity))
    }

    /// A policy's layer arena: its layout, packed with `compress_weight`, and where its GPU and
    /// CPU parts end.
    fn arena(spec: &ModelSpec, policy: &Policy) -> Result<Arena> {
        let layout = LayerLayout::new(spec)?;
        let c = &policy.compress_weight;
        let packed = c.enabled.then(|| layout.packed(c.bits, c.group_size as usize));
        let unit_len = packed.as_ref().map_or(layout.len, |p| p.len / 2);
        let [on_gpu, on_cpu, _] = split_counts(unit_len, &policy.placement.weights);
        Ok(Arena { layout, packed, unit_len, ends: [on_gpu, on_gpu + on_cpu] })
    }

    /// A micro-batch's cache rows (sequence, head) and their split `[gpu, cpu, disk]`.
    fn cache_rows(spec: &ModelSpec, policy: &Policy) -> (usize, [usize; 3]) {
        let rows = (policy.gpu_batch_size * spec.num_kv_heads) as usize;
        (rows, split_counts(rows, &policy.placement.kv_cache))
    }

    /// The GPU bytes a run of this policy needs, by use.
    fn plan_bytes(
        spec: &ModelSpec,
        policy: &Policy,
        (layout, unit_len): (&LayerLayout, usize),
        g_end: usize,
        gpu_rows: usize,
        c: GpuCapacity,
    ) -> GpuBytes {
        let s = spec;
        let (h, nh, ffn, v) = (
            u64::from(s.hidden_size),
            u64::from(s.num_heads),
            u64::from(s.ffn_size),
            u64::from(s.vocab_size),
        );
        let hd = u64::from(s.head_dim());
        let kvw = u64::from(s.num_kv_heads) * hd;
        let layers = u64::from(s.num_layers);
        let (b, k) = (u64::from(policy.gpu_batch_size), u64::from(policy.num_gpu_batches));
        let t = c.max_prompt as u64;
        let cap = (c.max_prompt + c.max_new) as u64;
        let rows = b * t;
        let cpu_rows = b * u64::from(s.num_kv_heads) - gpu_rows as u64;
        let act_on_gpu = policy.placement.activations.single_tier() == Some(Tier::Gpu);
        let mut staging = if g_end < unit_len { 4 * unit_len as u64 } else { 0 };
        if policy.compress_weight.enabled {
            staging += layout.bytes() as u64; // the dequantized arena
        }
        let tables = 2 * (spec.embedding_params());
        let all_rows = b * u64::from(s.num_kv_heads);
        let rows_n = (policy.gpu_batch_size * s.num_kv_heads) as usize;
        let pf = Prefetch::of(
            policy,
            gpu_rows,
            rows_n,
            split_counts(rows_n, &policy.placement.kv_cache)[2],
        );
        let slots = Prefetch::slots(pf.cache) as u64;
        let new_kv = if policy.compress_cache.enabled {
            // The fp16 working area of one (layer, batch), and the CPU rows' packed staging.
            let packed = packed_cache_bytes(policy, cpu_rows, cap, hd);
            2 * all_rows * cap * hd + slots * packed
        } else if cpu_rows == 0 {
            0
        } else if policy.cpu_cache_compute {
            2 * cpu_rows * t * hd
        } else {
            slots * 2 * cpu_rows * cap * hd
        };
        let scratch = rows * h * 4 // hn, q, ctx, att
            + rows * (h + 2 * kvw)
            + b * nh * t * t
            + rows * ffn
            + b * h
            + b * v
            + new_kv;
        GpuBytes {
            weights: layers * g_end as u64 * 2,
            staging,
            tables,
            cache: if policy.compress_cache.enabled {
                let packed = packed_cache_bytes(policy, gpu_rows, cap, hd);
                layers * k * 2 * packed
            } else {
                layers * k * 2 * gpu_rows as u64 * cap * hd * 2
            },
            activations: 2
                * (if act_on_gpu { k } else { Prefetch::slots(pf.act) as u64 } * rows * h
                    + scratch),
        }
    }

    /// The CPU bytes a run of this policy holds: weights, the CPU rows of the cache,
    /// activations, the disk reader's ring.
    fn plan_host_bytes(
        spec: &ModelSpec,
        policy: &Policy,
        unit_len: usize,
        (g_end, c_end): (usize, usize),
        gpu_rows: usize,
        c: GpuCapacity,
    ) -> u64 {
        let s = spec;
        let layers = u64::from(s.num_layers);
        let (b, k) = (u64::from(policy.gpu_batch_size), u64::from(policy.num_gpu_batches));
        let hd = u64::from(s.head_dim());
        let cap = (c.max_prompt + c.max_new) as u64;
        let all_rows = usize::try_from(b * u64::from(s.num_kv_heads)).expect("fits");
        let [_, host_rows, disk_rows] = split_counts(all_rows, &policy.placement.kv_cache);
        debug_assert_eq!(all_rows - gpu_rows, host_rows + disk_rows);
        let cpu_rows = host_rows as u64;
        let disk_stage = if disk_rows > 0 {
            let (capu, hdu) =
                (usize::try_from(cap).expect("fits"), usize::try_from(hd).expect("fits"));
            // Row-major staging and two pairs of position-major I/O buffers, k and v.
            2 * (align_up(disk_rows * capu * hdu * 2) + 2 * capu * disk_pos_bytes(disk_rows, hdu))
                as u64
        } else {
            0
        };
        let weights = layers * (c_end - g_end) as u64 * 2;
        let cache = if policy.compress_cache.enabled {
            let packed = packed_cache_bytes(policy, cpu_rows, cap, hd);
            layers * k * 2 * packed
        } else {
            layers * k * 2 * cpu_rows * cap * hd * 2
        };
        let act = if policy.placement.activations.single_tier() == Some(Tier::Gpu) {
            0
        } else {
            k * b * c.max_prompt as u64 * u64::from(s.hidden_size) * 2
        };
        let ring = if c_end < unit_len { 3 * align_up((unit_len - c_end) * 2) as u64 } else { 0 };
        weights + cache + act + ring + disk_stage + Self::logits_host_bytes(spec, policy)
    }

    /// Pinned CPU memory for the last positions' logits of every GPU batch (copied for the rows
    /// that sample or report their logits).
    fn logits_host_bytes(spec: &ModelSpec, policy: &Policy) -> u64 {
        u64::from(policy.num_gpu_batches)
            * u64::from(policy.gpu_batch_size)
            * u64::from(spec.vocab_size)
            * 2
    }

    /// Fills `out` with units `range` of layer `j`'s stored arena (fp16 values, or the packed
    /// bytes two to a unit).
    fn fill(
        &self,
        source: LayerSource,
        j: usize,
        range: std::ops::Range<usize>,
        out: &mut [f16],
    ) -> Result<()> {
        if let Some(p) = &self.packed {
            // `ones` dummy layers are all alike: one packing serves every layer.
            let key = if matches!(source, LayerSource::Dummy(DummyInit::Ones)) { 0 } else { j };
            let mut memo = self.packed_memo.borrow_mut();
            if memo.as_ref().is_none_or(|(l, _)| *l != key) {
                let mut arena = vec![f16::ZERO; self.layout.len];
                self.fill_plain(source, j, 0..self.layout.len, &mut arena)?;
                let mut units = vec![f16::ZERO; p.len / 2];
                p.pack(&arena, bytemuck::cast_slice_mut(&mut units));
                *memo = Some((key, units));
            }
            let (_, units) = memo.as_ref().expect("filled above");
            out.copy_from_slice(&units[range]);
            return Ok(());
        }
        self.fill_plain(source, j, range, out)
    }

    /// Fills `out` with elements `range` of layer `j`'s fp16 arena.
    fn fill_plain(
        &self,
        source: LayerSource,
        j: usize,
        range: std::ops::Range<usize>,
        out: &mut [f16],
    ) -> Result<()> {
        match source {
            LayerSource::Dummy(init) => {
                self.layout.fill_dummy(init, j, range, out);
                Ok(())
            }
            LayerSource::Loaded => {
                let mut whole = vec![f16::ZERO; self.layout.len];
                self.layout.fill_from(&self.model.weights.layers[j], &mut whole)?;
                out.copy_from_slice(&whole[range]);
                Ok(())
            }
        }
    }

    /// Fills every layer's GPU, CPU and disk parts. CPU parts are filled on all cores and pinned
    /// by a second thread, one layer behind; GPU parts go through two pinned buffers. Measures
    /// the pinned copy and direct-read bandwidths when layers are offloaded.
    fn place_weights(
        &mut self,
        source: LayerSource,
        disk_dir: Option<&std::path::Path>,
    ) -> Result<()> {
        let (len, g_end, c_end) = (self.unit_len, self.g_end, self.c_end);
        let n_layers = self.model.spec.num_layers as usize;
        let stream = self.gpu.stream.clone();
        let fill_started = Instant::now();
        // GPU parts: fill one pinned buffer while the other is copied.
        if g_end > 0 {
            let mut host_stage: Vec<PinnedHostSlice<f16>> = (0..2)
                .map(|_| flexgen_tensor::cuda::alloc_pinned_f16(&self.gpu.ctx, g_end).map_err(cuda))
                .collect::<Result<_>>()?;
            let copied = [new_event(&self.gpu)?, new_event(&self.gpu)?];
            for j in 0..n_layers {
                let slot = j % 2;
                copied[slot].synchronize().map_err(drv)?;
                let buf = host_stage[slot].as_mut_slice().map_err(drv)?;
                self.fill(source, j, 0..g_end, buf)?;
                // SAFETY: written by the copy below before any use.
                let dev = unsafe { stream.alloc::<f16>(g_end) }.map_err(drv)?;
                // SAFETY: `buf` is pinned and stays alive and unwritten until `copied[slot]`.
                unsafe {
                    cudarc::driver::result::memcpy_htod_async(
                        addr(&dev),
                        &buf[..],
                        stream.cu_stream(),
                    )
                }
                .map_err(drv)?;
                copied[slot].record(&stream).map_err(drv)?;
                self.layers.push(LayerHome { gpu: Some(dev), cpu: None });
            }
            stream.synchronize().map_err(drv)?;
        } else {
            self.layers.extend((0..n_layers).map(|_| LayerHome { gpu: None, cpu: None }));
        }
        // CPU parts: fill (all cores, first touch) and pin (driver, one layer behind) overlap.
        if c_end > g_end {
            let pin = self.policy.pin_weight;
            let ctx = self.gpu.ctx.clone();
            let (tx, rx) = mpsc::sync_channel::<(usize, HostMem)>(1);
            let mut pin_s = 0.0;
            let parts = std::thread::scope(|s| -> Result<Vec<(usize, HostMem)>> {
                let pinner = s.spawn(move || -> Result<(Vec<(usize, HostMem)>, f64)> {
                    let mut done = Vec::new();
                    let mut secs = 0.0;
                    for (j, mut m) in rx {
                        let t = Instant::now();
                        if pin {
                            m.pin(&ctx).map_err(cuda)?;
                        }
                        secs += t.elapsed().as_secs_f64();
                        done.push((j, m));
                    }
                    Ok((done, secs))
                });
                for j in 0..n_layers {
                    let mut m = HostMem::new_f16(c_end - g_end).map_err(cuda)?;
                    self.fill(source, j, g_end..c_end, m.as_f16_mut())?;
                    if tx.send((j, m)).is_err() {
                        break; // the pinner failed; its error is returned below
                    }
                }
                drop(tx);
                let (done, secs) = pinner.join().expect("pinning thread")?;
                pin_s = secs;
                Ok(done)
            })?;
            self.setup_times.pin_s = pin_s;
            for (j, m) in parts {
                let bytes = 2 * (c_end - g_end) as u64;
                if m.is_pinned() {
                    self.pinned_bytes += bytes;
                } else {
                    self.pageable_bytes += bytes;
                }
                self.layers[j].cpu = Some(m);
            }
        }
        self.setup_times.fill_s = fill_started.elapsed().as_secs_f64();
        if let Some(dir) = disk_dir {
            let t = Instant::now();
            self.write_disk_tier(source, dir)?;
            self.setup_times.disk_write_s = t.elapsed().as_secs_f64();
        }
        if self.packed.is_some() {
            // SAFETY: fully written by the dequantizing kernels and the vector copy before use.
            self.unpacked = Some(unsafe { stream.alloc::<f16>(self.layout.len) }.map_err(drv)?);
        }
        *self.packed_memo.borrow_mut() = None;
        if g_end < len {
            for _ in 0..2 {
                // SAFETY: every staging arena is fully written before each use.
                self.stage.push(unsafe { self.load.alloc::<f16>(len) }.map_err(drv)?);
            }
            self.h2d_bytes_per_s = Some(self.measure_h2d()?);
        }
        Ok(())
    }

    /// Writes every layer's disk part to one file in `dir` with direct I/O, and times direct
    /// reads of it.
    fn write_disk_tier(&mut self, source: LayerSource, dir: &std::path::Path) -> Result<()> {
        let io = |path: &std::path::Path, e: &std::io::Error| Error::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| io(dir, &e))?;
        let path = dir.join(format!("flexgen-weights-{}.bin", std::process::id()));
        let file = DirectFile::create(&path).map_err(|e| io(&path, &e))?;
        let elems = self.unit_len - self.c_end;
        let slot_bytes = align_up(elems * 2);
        let mut ring = Vec::new();
        let mut copied = Vec::new();
        for _ in 0..3 {
            let mut m = HostMem::new_f16(slot_bytes / 2).map_err(cuda)?;
            m.pin(&self.gpu.ctx).map_err(cuda)?;
            ring.push(m);
            copied.push(new_event(&self.gpu)?);
        }
        let n_layers = self.model.spec.num_layers as usize;
        for j in 0..n_layers {
            let buf = ring[0].as_f16_mut();
            self.fill(source, j, self.c_end..self.unit_len, &mut buf[..elems])?;
            file.write_aligned((j * slot_bytes) as u64, ring[0].as_bytes_mut())
                .map_err(|e| io(&path, &e))?;
        }
        // Time direct reads of up to three layers' parts (the page cache cannot serve them).
        let t = Instant::now();
        let probe = n_layers.min(3);
        for j in 0..probe {
            read_parallel(&file, (j * slot_bytes) as u64, ring[j % 3].as_bytes_mut(), READ_THREADS)
                .map_err(|e| io(&path, &e))?;
        }
        #[expect(clippy::cast_precision_loss, reason = "a rate")]
        let rate = (probe * slot_bytes) as f64 / t.elapsed().as_secs_f64();
        self.disk_bytes_per_s = Some(rate);
        self.direct_io = Some(file.is_direct());
        self.disk = Some(DiskPart { file, slot_bytes, layers: n_layers, ring, copied });
        Ok(())
    }

    /// Times copies of the first offloaded layer part into a staging arena (pinned bandwidth
    /// of this link, in this process).
    fn measure_h2d(&self) -> Result<f64> {
        let (src, dst): (&[f16], u64) = match (&self.layers[0].cpu, &self.disk) {
            (Some(m), _) => (m.as_f16(), at(addr(&self.stage[0]), self.g_end)),
            (None, Some(d)) => (d.ring[0].as_f16(), at(addr(&self.stage[0]), self.c_end)),
            (None, None) => return Ok(0.0),
        };
        let src = &src[..src.len().min(self.unit_len - self.g_end)];
        let t0 = new_timing_event(&self.gpu)?;
        let t1 = new_timing_event(&self.gpu)?;
        let reps = 3;
        t0.record(&self.load).map_err(drv)?;
        for _ in 0..reps {
            // SAFETY: the staging arena holds `len` elements from `dst`'s offset on.
            unsafe { cudarc::driver::result::memcpy_htod_async(dst, src, self.load.cu_stream()) }
                .map_err(drv)?;
        }
        t1.record(&self.load).map_err(drv)?;
        t1.synchronize().map_err(drv)?;
        let ms = f64::from(t0.elapsed_ms(&t1).map_err(drv)?);
        #[expect(clippy::cast_precision_loss, reason = "a rate")]
        let rate = (reps * src.len() * 2) as f64 / (ms / 1e3);
        Ok(rate)
    }

    /// The GPU memory this generator planned, by use.
    pub fn gpu_bytes(&self) -> GpuBytes {
        self.bytes
    }

    /// Bytes of weights that cross PCIe for every pass over the layers.
    pub fn weight_bytes_per_pass(&self) -> u64 {
        (self.unit_len - self.g_end) as u64 * 2 * u64::from(self.model.spec.num_layers)
    }

    /// KV-cache bytes a decode step at `past` positions moves: (over PCIe, read from disk). Off-GPU
    /// rows attended on the GPU bring their past in (packed rows whole) and send the new position
    /// back; with CPU attention only q, k, v of the new position go out and the output comes
    /// back; disk rows are read up to `past` (their new position's write is not counted).
    pub fn cache_bytes_per_decode_step(&self, past: usize) -> (u64, u64) {
        let (_, _, nkv, hd) = self.dims();
        let off = self.policy.gpu_batch_size as usize * nkv - self.gpu_rows;
        let times = u64::from(self.model.spec.num_layers) * u64::from(self.policy.num_gpu_batches);
        let pcie = match self.cache_quant {
            Some(_) => 2 * packed_cache_bytes(&self.policy, off, self.cap() as u64, hd as u64),
            None if self.cpu_attention => (4 * off * hd * 2) as u64,
            None => (2 * off * (past + 1) * hd * 2) as u64,
        };
        let disk = if self.cpu_attention || self.cache_quant.is_none() {
            (2 * self.disk_rows * past * hd * 2) as u64
        } else {
            0
        };
        (times * pcie, times * disk)
    }

    /// Bytes of weights read from disk for every pass over the layers.
    pub fn disk_bytes_per_pass(&self) -> u64 {
        (self.unit_len - self.c_end) as u64 * 2 * u64::from(self.model.spec.num_layers)
    }

    /// Bytes of KV cache held on disk.
    pub fn disk_cache_bytes(&self) -> u64 {
        let s = &self.model.spec;
        let cap = self.cap();
        let region = (cap * disk_pos_bytes(self.disk_rows, s.head_dim() as usize)) as u64;
        u64::from(s.num_layers) * u64::from(self.policy.num_gpu_batches) * 2 * region
    }

    /// Bytes of weights held on disk (the file's size).
    pub fn disk_bytes(&self) -> u64 {
        self.disk.as_ref().map_or(0, |d| (d.slot_bytes * self.layers.len()) as u64)
    }

    /// Positions of every cache row: the longest prompt plus the new tokens.
    fn cap(&self) -> usize {
        self.capacity.max_prompt + self.capacity.max_new
    }

    fn dims(&self) -> (usize, usize, usize, usize) {
        let s = &self.model.spec;
        (
            s.hidden_size as usize,
            s.num_heads as usize,
            s.num_kv_heads as usize,
            s.head_dim() as usize,
        )
    }

    fn eps(&self) -> f32 {
        let (flexgen_policy::NormKind::LayerNorm { eps }
        | flexgen_policy::NormKind::RmsNorm { eps }) = self.model.spec.norm;
        #[expect(clippy::cast_possible_truncation, reason = "a small epsilon")]
        let e = eps as f32;
        e
    }

    fn alloc_run(&self, t: usize) -> Result<RunBuffers> {
        let s = &self.model.spec;
        let (h, nh, nkv, hd) = self.dims();
        let (b, k) = (self.policy.gpu_batch_size as usize, self.policy.num_gpu_batches as usize);
        let cap = self.cap();
        let rows = b * t;
        let cpu_rows = b * nkv - self.gpu_rows;
        let st = &self.gpu.stream;
        // SAFETY: every buffer is written by a kernel or copy before it is read.
        let f = |n: usize| unsafe { st.alloc::<f16>(n.max(1)) }.map_err(drv);
        // A compressed cache keeps no fp16 rows: every row is packed, and the working area holds
        // one (layer, batch) in fp16 while it is used.
        let gr = if self.cache_quant.is_some() { 0 } else { self.gpu_rows };
        let kvq = match self.cache_quant {
            Some((bits, group)) => {
                let q = CacheQuant { rows: self.gpu_rows, cap, hd, group, bits };
                let (cb, pv) = q.sizes();
                // SAFETY: written by `quant_cache` before `dequant_cache` reads a position.
                let u8s = |n: usize| unsafe { st.alloc::<u8>(n.max(1)) }.map_err(drv);
                (0..s.num_layers)
                    .map(|_| {
                        (0..k)
                            .map(|_| Ok(([u8s(cb)?, u8s(cb)?], [f(pv)?, f(pv)?])))
                            .collect::<Result<Vec<_>>>()
                    })
                    .collect::<Result<Vec<_>>>()?
            }
            None => Vec::new(),
        };
        let kv = (0..s.num_layers)
            .map(|_| (0..k).map(|_| Ok((f(gr * cap * hd)?, f(gr * cap * hd)?))).collect())
            .collect::<Result<Vec<Vec<_>>>>()?;
        let pinned = |n: usize| -> Result<HostMem> {
            let mut m = HostMem::new_f16(n.max(1)).map_err(cuda)?;
            m.zero_parallel();
            m.pin(&self.gpu.ctx).map_err(cuda)?;
            Ok(m)
        };
        let (kvq_cpu, kvq_stage) = match self.cache_quant {
            Some((bits, group)) if cpu_rows > 0 => {
                let q = CacheQuant { rows: cpu_rows, cap, hd, group, bits };
                let (cb, pv) = q.sizes();
                let host = (0..s.num_layers)
                    .map(|_| {
                        (0..k)
                            .map(|_| {
                                Ok([pinned(cb / 2)?, pinned(cb / 2)?, pinned(pv)?, pinned(pv)?])
                            })
                            .collect::<Result<Vec<_>>>()
                    })
                    .collect::<Result<Vec<_>>>()?;
                // SAFETY: filled by a copy or by `quant_cache` before each read.
                let u8s = |n: usize| unsafe { st.alloc::<u8>(n.max(1)) }.map_err(drv);
                let stage = (0..Prefetch::slots(self.prefetch.cache))
                    .map(|_| Ok(([u8s(cb)?, u8s(cb)?], [f(pv)?, f(pv)?])))
                    .collect::<Result<Vec<_>>>()?;
                (host, stage)
            }
            _ => (Vec::new(), Vec::new()),
        };
        let dr = self.disk_rows;
        let host_rows = cpu_rows - dr; // rows whose home is pinned CPU memory
        let disk_cache = if dr > 0 {
            let dir = self.policy.offload_dir.as_deref().expect("checked in new");
            let io =
                |e: std::io::Error| Error::Io { path: dir.to_path_buf(), message: e.to_string() };
            std::fs::create_dir_all(dir).map_err(io)?;
            let path = dir.join(format!("flexgen-kv-{}.bin", std::process::id()));
            let file = DirectFile::create(&path).map_err(io)?;
            let layers = s.num_layers as usize;
            Some(DiskCache::new(file, (dr, cap, hd), (layers, k), pinned)?)
        } else {
            None
        };
        let kv_cpu = if host_rows > 0 && self.cache_quant.is_none() {
            (0..s.num_layers)
                .map(|_| {
                    (0..k)
                        .map(|_| Ok((pinned(host_rows * cap * hd)?, pinned(host_rows * cap * hd)?)))
                        .collect()
                })
                .collect::<Result<Vec<Vec<_>>>>()?
        } else {
            Vec::new()
        };
        let ncap = if self.cpu_attention { t } else { cap };
        // The working area: the CPU rows' new positions or cache, or every row when compressed.
        let work_rows = if self.cache_quant.is_some() { b * nkv } else { cpu_rows };
        let x_count = if self.act_on_gpu { k } else { Prefetch::slots(self.prefetch.act) };
        // Packed, the copy stream stages packed rows (above), not this fp16 working area.
        let work_slots =
            if self.cache_quant.is_some() { 1 } else { Prefetch::slots(self.prefetch.cache) };
        // SAFETY: as above.
        let u = |n: usize| unsafe { st.alloc::<u32>(n.max(1)) }.map_err(drv);
        Ok(RunBuffers {
            x: (0..x_count).map(|_| f(rows * h)).collect::<Result<_>>()?,
            hn: f(rows * h)?,
            qkv: f(rows * (h + 2 * nkv * hd))?,
            q: f(rows * h)?,
            scores: f(b * nh * t * t)?,
            ctx: f(rows * h)?,
            att: f(rows * h)?,
            f1: f(rows * s.ffn_size as usize)?,
            last: f(b * h)?,
            logits: f(b * s.vocab_size as usize)?,
            kv,
            kv_cpu,
            work: (0..work_slots)
                .map(|_| Ok((f(work_rows * ncap * hd)?, f(work_rows * ncap * hd)?)))
                .collect::<Result<_>>()?,
            kvq,
            kvq_cpu,
            kvq_stage,
            disk_cache,
            x_host: if self.act_on_gpu {
                Vec::new()
            } else {
                (0..k).map(|_| pinned(rows * h)).collect::<Result<_>>()?
            },
            logits_host: (0..k)
                .map(|_| pinned(b * s.vocab_size as usize))
                .collect::<Result<_>>()?,
            cpu_att: if self.cpu_attention {
                (0..4).map(|_| pinned(cpu_rows * hd)).collect::<Result<_>>()?
            } else {
                Vec::new()
            },
            ids: (0..k).map(|_| u(rows)).collect::<Result<_>>()?,
            pos: (0..k).map(|_| u(rows)).collect::<Result<_>>()?,
            // SAFETY: as above.
            start: (0..k)
                .map(|_| unsafe { st.alloc::<i32>(b) }.map_err(drv))
                .collect::<Result<_>>()?,
            tok: (0..k).map(|_| u(b)).collect::<Result<_>>()?,
        })
    }

    /// Issues the copies of layer `j`'s CPU part, and its disk part once the reader has it, into
    /// staging arena `slot` on the load stream, after the layer that last used that arena has
    /// been computed.
    fn issue_load(
        &self,
        j: usize,
        slot: usize,
        reader: Option<&Reader>,
        traffic: &mut Traffic,
    ) -> Result<()> {
        self.load.wait(&self.freed[slot]).map_err(drv)?;
        let stage = addr(&self.stage[slot]);
        if let Some(m) = &self.layers[j].cpu {
            let src = m.as_f16();
            // SAFETY: the arena holds `len` elements and the layer that used it is done (`freed`).
            unsafe {
                cudarc::driver::result::memcpy_htod_async(
                    at(stage, self.g_end),
                    src,
                    self.load.cu_stream(),
                )
            }
            .map_err(drv)?;
            traffic.cpu_to_gpu += 2 * src.len() as u64;
        }
        if let (Some(d), Some(r)) = (&self.disk, reader) {
            let ring = r.filled.recv().map_err(|_| Error::Config {
                field: "offload_dir",
                message: "the disk reader stopped".into(),
            })??;
            let elems = self.unit_len - self.c_end;
            let src = &d.ring[ring].as_f16()[..elems];
            // SAFETY: the reader filled this ring buffer and touches it again only after
            // `copied[ring]` fires.
            unsafe {
                cudarc::driver::result::memcpy_htod_async(
                    at(stage, self.c_end),
                    src,
                    self.load.cu_stream(),
                )
            }
            .map_err(drv)?;
            d.copied[ring].record(&self.load).map_err(drv)?;
            let _ = r.free.send(ring);
            traffic.cpu_to_gpu += 2 * elems as u64;
            traffic.disk_read += d.slot_bytes as u64;
        }
        self.loaded[slot].record(&self.load).map_err(drv)?;
        Ok(())
    }

    /// The device address of layer `j`'s arena for this pass: its resident arena, or staging
    /// arena `slot` once the copies have landed and the GPU part has been copied in.
    fn layer_weights(&self, j: usize, slot: usize) -> Result<u64> {
        let home = &self.layers[j];
        let stored = if self.g_end == self.unit_len {
            addr(home.gpu.as_ref().expect("a resident layer"))
        } else {
            let st = &self.gpu.stream;
            st.wait(&self.loaded[slot]).map_err(drv)?;
            let dst = addr(&self.stage[slot]);
            if let Some(g) = &home.gpu {
                // SAFETY: the staging arena's first `g_end` units, from the resident part.
                unsafe {
                    cudarc::driver::result::memcpy_dtod_async(
                        dst,
                        addr(g),
                        2 * self.g_end,
                        st.cu_stream(),
                    )
                }
                .map_err(drv)?;
            }
            dst
        };
        let Some(p) = &self.packed else { return Ok(stored) };
        // Packed: dequantize every matrix into the fp16 arena, copy the vectors beside them.
        let out = addr(self.unpacked.as_ref().expect("allocated with the packed layout"));
        let g = &self.gpu;
        for m in &p.mats {
            let (codes, params) = (stored + m.codes.start as u64, stored + m.params.start as u64);
            // SAFETY: this executor's weights and buffers, sized for these shapes.
            unsafe {
                g.dequant_dim0(codes, params, at(out, m.src.start), m.rows, m.cols, p.group, p.bits)
            }
            .map_err(cuda)?;
        }
        // SAFETY: the vectors' bytes inside the stored arena, into their place in the fp16 one.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(
                at(out, p.vec_src.start),
                stored + p.vectors.start as u64,
                p.vectors.len(),
                g.stream.cu_stream(),
            )
        }
        .map_err(drv)?;
        Ok(out)
    }

    /// The GPU address of GPU batch `kb`'s hidden state: its own buffer when activations live on
    /// the GPU, else staging `slot`, into which it is copied from the CPU here unless the copy
    /// stream staged it already (`staged`).
    fn hidden_in(
        &self,
        buf: &RunBuffers,
        kb: usize,
        n: usize,
        slot: usize,
        staged: bool,
    ) -> Result<u64> {
        if self.act_on_gpu {
            return Ok(addr(&buf.x[kb]));
        }
        let x = addr(&buf.x[slot % buf.x.len()]);
        if !staged {
            htod(&self.gpu.stream, x, &buf.x_host[kb].as_f16()[..n])?;
        }
        Ok(x)
    }

    /// Copies GPU batch `kb`'s hidden state (staging `slot`) back to the CPU when activations
    /// live there.
    fn hidden_out(&self, buf: &RunBuffers, kb: usize, n: usize, slot: usize) -> Result<()> {
        if self.act_on_gpu {
            return Ok(());
        }
        let dst = buf.x_host[kb].ptr();
        // SAFETY: pinned destination of n values; stream-ordered before its next use.
        unsafe {
            copy_2d(
                &self.gpu.stream,
                Mem::Device(addr(&buf.x[slot % buf.x.len()])),
                Mem::Host(dst.cast_const().cast()),
                Copy2d { width: n * 2, height: 1, src_pitch: n * 2, dst_pitch: n * 2 },
            )
        }
        .map_err(cuda)
    }

    /// Copies the `past` positions of off-GPU cache rows (`homes`, rows of `cap` positions) into
    /// the working cache (`kn`, `vn`) on `stream`.
    fn copy_homes_in(
        &self,
        homes: &[(usize, usize, &HostMem, &HostMem)],
        (kn, vn): (u64, u64),
        past: usize,
        stream: &CudaStream,
    ) -> Result<()> {
        let (cap, hd) = (self.cap(), self.dims().3);
        let row_bytes = cap * hd * 2;
        for &(off, n, hk, hv) in homes {
            for (src, dst) in [(hk, kn), (hv, vn)] {
                // SAFETY: pinned source rows of `cap` positions; the working cache has as many.
                unsafe {
                    copy_2d(
                        stream,
                        Mem::Host(src.ptr().cast_const().cast()),
                        Mem::Device(at(dst, off * cap * hd)),
                        Copy2d {
                            width: past * hd * 2,
                            height: n,
                            src_pitch: row_bytes,
                            dst_pitch: row_bytes,
                        },
                    )
                }
                .map_err(cuda)?;
            }
        }
        Ok(())
    }

    /// Stages visit (layer `j`, batch `kb`)'s inputs that `Prefetch` names (its hidden state, `n`
    /// values, and the `past` positions of its CPU cache rows) into buffers `slot` on the copy
    /// stream, after everything issued so far on the compute stream — the visit that last used
    /// those buffers and the one that wrote that hidden state — then records `staged[slot]`.
    fn prefetch_visit(
        &self,
        buf: &RunBuffers,
        (j, kb): (usize, usize),
        (n, past): (usize, usize),
        slot: usize,
    ) -> Result<()> {
        let ahead = self.prefetch.in_step(past);
        if ahead == Prefetch::default() {
            return Ok(());
        }
        let c = &self.copy;
        self.mark.record(&self.gpu.stream).map_err(drv)?;
        c.wait(&self.mark).map_err(drv)?;
        if ahead.act {
            htod(c, addr(&buf.x[slot]), &buf.x_host[kb].as_f16()[..n])?;
        }
        if ahead.cache {
            if self.cache_quant.is_some() {
                Self::copy_packed_in(buf, (j, kb), &buf.kvq_stage[slot], c)?;
            } else {
                let (k, v) = &buf.work[slot];
                let homes = self.homes(buf, j, kb, past)?;
                self.copy_homes_in(&homes, (addr(k), addr(v)), past, c)?;
            }
        }
        self.staged[slot].record(c).map_err(drv)
    }

    /// Copies (layer `j`, batch `kb`)'s packed CPU rows into the packed staging `stage` on
    /// `stream`.
    fn copy_packed_in(
        buf: &RunBuffers,
        (j, kb): (usize, usize),
        stage: &PackedKv,
        stream: &CudaStream,
    ) -> Result<()> {
        let ([sck, scv], [spk, spv]) = stage;
        let dst = [addr(sck), addr(scv), addr(spk), addr(spv)];
        for (host, dst) in buf.kvq_cpu[j][kb].iter().zip(dst) {
            htod(stream, dst, host.as_f16())?;
        }
        Ok(())
    }

    /// One layer for one GPU batch `kb` (`b` sequences of `t` new positions after `past`): its
    /// hidden state is updated in place; k and v of the new positions go to the cache.
    #[expect(clippy::too_many_arguments, reason = "one layer's inputs")]
    fn layer(
        &self,
        w: u64,
        j: usize,
        kb: usize,
        buf: &RunBuffers,
        starts: &[i32],
        b: usize,
        t: usize,
        past: usize,
        (slot, staged): (usize, Prefetch),
    ) -> Result<()> {
        let l = &self.layout;
        let g = &self.gpu;
        let st = &g.stream;
        let (h, nh, nkv, hd) = self.dims();
        let eps = self.eps();
        let rows = b * t;
        let cap = self.cap();
        let d = AttnDims { b, t, nh, nkv, hd, cap, past };
        let (gr, all_rows) = (self.gpu_rows, b * nkv);
        let cpu_rows = all_rows - gr;
        let gr_all = gr; // GPU rows of a compressed cache
        let (hn, qkv, q, att) = (addr(&buf.hn), addr(&buf.qkv), addr(&buf.q), addr(&buf.att));
        let start = addr(&buf.start[kb]);
        let (kn, vn) = {
            let (k, v) = &buf.work[slot % buf.work.len()];
            (addr(k), addr(v))
        };
        let wq = |r: &std::ops::Range<usize>| at(w, r.start);
        let x = self.hidden_in(buf, kb, rows * h, slot, staged.act)?;
        let row_bytes = cap * hd * 2;
        // The off-GPU rows' homes (CPU rows, then disk rows read into their staging).
        let homes = if cpu_rows > 0 && self.cache_quant.is_none() {
            self.homes(buf, j, kb, past)?
        } else {
            Vec::new()
        };
        // Without CPU attention the off-GPU rows attend on the GPU: bring their past positions in
        // (unless the copy stream did).
        if !self.cpu_attention && past > 0 && !staged.cache {
            self.copy_homes_in(&homes, (kn, vn), past, st)?;
        }
        // SAFETY: this executor's weights and buffers, sized for these shapes.
        unsafe { g.layer_norm_raw(x, wq(&l.attn_norm_w), wq(&l.attn_norm_b), hn, rows, h, eps) }
            .map_err(cuda)?;
        // SAFETY: this executor's weights and buffers, sized for these shapes.
        unsafe { g.gemm(&Gemm::linear(rows, h + 2 * nkv * hd, h, hn, wq(&l.qkv_w), qkv, false)) }
            .map_err(cuda)?;
        #[expect(clippy::cast_precision_loss, clippy::cast_possible_truncation, reason = "1/√hd")]
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        if let Some((bits, group)) = self.cache_quant {
            // Every row packed (GPU rows in GPU memory, CPU rows in pinned memory): the past
            // positions are expanded into the working area, the new ones written there, attention
            // reads it, then the new positions are packed back to each row's home.
            let qg = CacheQuant { rows: gr_all, cap, hd, group, bits };
            let qc = CacheQuant { rows: cpu_rows, ..qg };
            let ([ck, cv], [pk, pv]) = &buf.kvq[j][kb];
            let (kn_c, vn_c) = (at(kn, gr_all * cap * hd), at(vn, gr_all * cap * hd));
            // SAFETY: this executor's weights and buffers, sized for these shapes.
            unsafe { g.dequant_cache(addr(ck), addr(pk), kn, qg, (0, past)) }.map_err(cuda)?;
            // SAFETY: this executor's weights and buffers, sized for these shapes.
            unsafe { g.dequant_cache(addr(cv), addr(pv), vn, qg, (0, past)) }.map_err(cuda)?;
            let packed_stage = buf.kvq_stage.get(slot % buf.kvq_stage.len().max(1));
            if let Some(ps @ ([sck, scv], [spk, spv])) = packed_stage {
                let stage = [addr(sck), addr(scv), addr(spk), addr(spv)];
                if past > 0 {
                    if !staged.cache {
                        Self::copy_packed_in(buf, (j, kb), ps, st)?;
                    }
                    // SAFETY: this executor's weights and buffers, sized for these shapes.
                    unsafe { g.dequant_cache(stage[0], stage[2], kn_c, qc, (0, past)) }
                        .map_err(cuda)?;
                    // SAFETY: this executor's weights and buffers, sized for these shapes.
                    unsafe { g.dequant_cache(stage[1], stage[3], vn_c, qc, (0, past)) }
                        .map_err(cuda)?;
                }
            }
            let new = NewKv { gpu_rows: 0, k: kn, v: vn, cap, past };
            // SAFETY: this executor's weights and buffers, sized for these shapes.
            unsafe { g.qkv_split(qkv, wq(&l.qkv_b), q, kn, vn, new, d, scale) }.map_err(cuda)?;
            if t > 1 {
                let (sc, cx) = (addr(&buf.scores), addr(&buf.ctx));
                // SAFETY: this executor's weights and buffers, sized for these shapes.
                unsafe { g.attention_prefill(q, kn, vn, cap, start, sc, cx, d, 0..all_rows) }
                    .map_err(cuda)?;
                // SAFETY: this executor's weights and buffers, sized for these shapes.
                unsafe { g.merge_heads_raw(cx, att, d) }.map_err(cuda)?;
            } else {
                // SAFETY: this executor's weights and buffers, sized for these shapes.
                unsafe { g.attention_decode(q, kn, vn, cap, start, att, d, 0..all_rows) }
                    .map_err(cuda)?;
            }
            // SAFETY: this executor's weights and buffers, sized for these shapes.
            unsafe { g.quant_cache(kn, addr(ck), addr(pk), qg, (past, t)) }.map_err(cuda)?;
            // SAFETY: this executor's weights and buffers, sized for these shapes.
            unsafe { g.quant_cache(vn, addr(cv), addr(pv), qg, (past, t)) }.map_err(cuda)?;
            if let Some(([sck, scv], [spk, spv])) = packed_stage {
                // SAFETY: this executor's weights and buffers, sized for these shapes.
                unsafe { g.quant_cache(kn_c, addr(sck), addr(spk), qc, (past, t)) }
                    .map_err(cuda)?;
                // SAFETY: this executor's weights and buffers, sized for these shapes.
                unsafe { g.quant_cache(vn_c, addr(scv), addr(spv), qc, (past, t)) }
                    .map_err(cuda)?;
                // Only the new positions go back to the CPU rows' home.
                let groups = hd.div_ceil(group);
                let code_b = groups * group * usize::from(bits) / 8; // per (row, position)
                let par_b = groups * 4;
                let stage = [addr(sck), addr(scv), addr(spk), addr(spv)];
                for (i, (host, src)) in buf.kvq_cpu[j][kb].iter().zip(stage).enumerate() {
                    let per = if i < 2 { code_b } else { par_b };
                    let off = past * per;
                    // SAFETY: rows of `cap` positions on both sides; t positions from `past`.
                    unsafe {
                        copy_2d(
                            st,
                            Mem::Device(src + off as u64),
                            Mem::Host(host.ptr().cast::<u8>().add(off).cast_const()),
                            Copy2d {
                                width: t * per,
                                height: cpu_rows,
                                src_pitch: cap * per,
                                dst_pitch: cap * per,
                            },
                        )
                    }
                    .map_err(cuda)?;
                }
            }
            self.layer_mlp(w, x, buf, rows)?;
            return self.hidden_out(buf, kb, rows * h, slot);
        }
        let (kc, vc) = (addr(&buf.kv[j][kb].0), addr(&buf.kv[j][kb].1));
        // Where the CPU rows' new k/v go on the GPU, and that buffer's positions per row.
        let (ncap, npast) = if self.cpu_attention { (t, 0) } else { (cap, past) };
        let new = NewKv { gpu_rows: gr, k: kn, v: vn, cap: ncap, past: npast };
        // SAFETY: this executor's weights and buffers, sized for these shapes.
        unsafe { g.qkv_split(qkv, wq(&l.qkv_b), q, kc, vc, new, d, scale) }.map_err(cuda)?;
        if t > 1 {
            // SAFETY: this executor's weights and buffers, sized for these shapes.
            unsafe {
                g.attention_prefill(
                    q,
                    kc,
                    vc,
                    cap,
                    start,
                    addr(&buf.scores),
                    addr(&buf.ctx),
                    d,
                    0..gr,
                )
            }
            .map_err(cuda)?;
            // SAFETY: this executor's weights and buffers, sized for these shapes.
            unsafe {
                g.attention_prefill(
                    q,
                    kn,
                    vn,
                    ncap,
                    start,
                    addr(&buf.scores),
                    addr(&buf.ctx),
                    d,
                    gr..all_rows,
                )
            }
            .map_err(cuda)?;
            // SAFETY: this executor's weights and buffers, sized for these shapes.
            unsafe { g.merge_heads_raw(addr(&buf.ctx), att, d) }.map_err(cuda)?;
        } else {
            // SAFETY: this executor's weights and buffers, sized for these shapes.
            unsafe { g.attention_decode(q, kc, vc, cap, start, att, d, 0..gr) }.map_err(cuda)?;
            if cpu_rows > 0 && !self.cpu_attention {
                // SAFETY: this executor's weights and buffers, sized for these shapes.
                unsafe { g.attention_decode(q, kn, vn, cap, start, att, d, gr..all_rows) }
                    .map_err(cuda)?;
            }
        }
        if cpu_rows > 0 {
            if self.cpu_attention && t == 1 {
                self.cpu_attention_step(buf, &homes, starts, past)?;
            } else {
                // Store the new positions of the off-GPU rows into their homes.
                for &(off, n, hk, hv) in &homes {
                    for (src, dst) in [(kn, hk), (vn, hv)] {
                        // SAFETY: position `past` of the first row lies inside the buffer.
                        let dst = unsafe { dst.ptr().add(past * hd) }.cast_const();
                        // SAFETY: rows of `cap` positions in pinned memory; t positions from
                        // `past`; the source rows start at `off` in the working area.
                        unsafe {
                            copy_2d(
                                st,
                                Mem::Device(at(src, (off * ncap + npast) * hd)),
                                Mem::Host(dst.cast()),
                                Copy2d {
                                    width: t * hd * 2,
                                    height: n,
                                    src_pitch: ncap * hd * 2,
                                    dst_pitch: row_bytes,
                                },
                            )
                        }
                        .map_err(cuda)?;
                    }
                }
            }
            self.flush_disk(buf, j, kb, past, t)?;
        }
        self.layer_mlp(w, x, buf, rows)?;
        self.hidden_out(buf, kb, rows * h, slot)
    }

    /// The rest of a layer after attention (`att` in the buffers): output projection and residual,
    /// then the MLP block, on `x` (`rows` rows) in place.
    fn layer_mlp(&self, w: u64, x: u64, buf: &RunBuffers, rows: usize) -> Result<()> {
        let (l, g) = (&self.layout, &self.gpu);
        let h = self.dims().0;
        let (hn, att, eps) = (addr(&buf.hn), addr(&buf.att), self.eps());
        let wq = |r: &std::ops::Range<usize>| at(w, r.start);
        // SAFETY: this executor's weights and buffers, sized for these shapes.
        unsafe { g.gemm(&Gemm::linear(rows, h, h, att, wq(&l.o_w), x, true)) }.map_err(cuda)?;
        // SAFETY: this executor's weights and buffers, sized for these shapes.
        unsafe { g.bias_act_raw(x, wq(&l.o_b), rows, h, false) }.map_err(cuda)?;
        // SAFETY: this executor's weights and buffers, sized for these shapes.
        unsafe { g.layer_norm_raw(x, wq(&l.mlp_norm_w), wq(&l.mlp_norm_b), hn, rows, h, eps) }
            .map_err(cuda)?;
        let f = self.model.spec.ffn_size as usize;
        let f1 = addr(&buf.f1);
        // SAFETY: this executor's weights and buffers, sized for these shapes.
        unsafe { g.gemm(&Gemm::linear(rows, f, h, hn, wq(&l.fc1_w), f1, false)) }.map_err(cuda)?;
        // SAFETY: this executor's weights and buffers, sized for these shapes.
        unsafe { g.bias_act_raw(f1, wq(&l.fc1_b), rows, f, true) }.map_err(cuda)?;
        // SAFETY: this executor's weights and buffers, sized for these shapes.
        unsafe { g.gemm(&Gemm::linear(rows, h, f, f1, wq(&l.fc2_w), x, true)) }.map_err(cuda)?;
        // SAFETY: this executor's weights and buffers, sized for these shapes.
        unsafe { g.bias_act_raw(x, wq(&l.fc2_b), rows, h, false) }.map_err(cuda)
    }

    /// Blocks until the compute stream is idle, counting the wait in `host_times`.
    fn wait_for_gpu(&self) -> Result<()> {
        let t = Instant::now();
        self.gpu.stream.synchronize().map_err(drv)?;
        let mut h = self.host_times.get();
        h.gpu_wait_s += t.elapsed().as_secs_f64();
        self.host_times.set(h);
        Ok(())
    }

    /// Decode attention of the CPU rows on the CPU: q and the new k/v of those rows come to
    /// pinned memory, the new position is appended to the CPU cache, every core computes the
    /// rows' attention over the cache in place (fp16 values, fp32 arithmetic), and the output
    /// goes back into `att`. Only `4 · rows · hd` values cross PCIe.
    fn cpu_attention_step(
        &self,
        buf: &RunBuffers,
        homes: &[(usize, usize, &HostMem, &HostMem)],
        starts: &[i32],
        past: usize,
    ) -> Result<()> {
        let (_, nh, nkv, hd) = self.dims();
        let gr = self.gpu_rows;
        let b = self.policy.gpu_batch_size as usize;
        let cpu_rows = b * nkv - gr;
        let cap = self.cap();
        let st = &self.gpu.stream;
        let n = cpu_rows * hd;
        let [qh, kh, vh, oh] = [0, 1, 2, 3].map(|i| buf.cpu_att[i].ptr());
        for (src, dst) in [
            (at(addr(&buf.q), gr * hd), qh),
            (addr(&buf.work[0].0), kh),
            (addr(&buf.work[0].1), vh),
        ] {
            // SAFETY: n contiguous values into pinned staging of n.
            unsafe {
                copy_2d(
                    st,
                    Mem::Device(src),
                    Mem::Host(dst.cast_const().cast()),
                    Copy2d { width: n * 2, height: 1, src_pitch: n * 2, dst_pitch: n * 2 },
                )
            }
            .map_err(cuda)?;
        }
        self.wait_for_gpu()?;
        let t = Instant::now();
        for &(off, rows, hk, hv) in homes {
            let r = off * hd..(off + rows) * hd;
            // SAFETY: the stream is idle (synchronized above), so no copy touches these pinned
            // buffers while the cores read and write them; no other reference to them is live,
            // and each home's rows are disjoint from the others'.
            let (q, k_new, v_new, out, kcache, vcache) = unsafe {
                (
                    std::slice::from_raw_parts(qh.cast_const().add(r.start), r.len()),
                    std::slice::from_raw_parts(kh.cast_const().add(r.start), r.len()),
                    std::slice::from_raw_parts(vh.cast_const().add(r.start), r.len()),
                    std::slice::from_raw_parts_mut(oh.add(r.start), r.len()),
                    std::slice::from_raw_parts_mut(hk.ptr(), rows * cap * hd),
                    std::slice::from_raw_parts_mut(hv.ptr(), rows * cap * hd),
                )
            };
            let d =
                flexgen_tensor::host_attention::Dims { rows, hd, cap, past, nh, row0: gr + off };
            flexgen_tensor::host_attention::decode(q, k_new, v_new, kcache, vcache, out, starts, d);
        }
        let mut h = self.host_times.get();
        h.cpu_attention_s += t.elapsed().as_secs_f64();
        self.host_times.set(h);
        // SAFETY: the output staging holds n values, written above.
        let out = unsafe { std::slice::from_raw_parts(oh.cast_const(), n) };
        htod(st, at(addr(&buf.att), gr * hd), out)
    }

    /// The homes of (layer `j`, batch `kb`)'s off-GPU cache rows: (first row among the off-GPU
    /// rows, rows, k, v). CPU rows first, then disk rows, whose `past` positions are read into
    /// their (row-major) staging first.
    fn homes<'b>(
        &self,
        buf: &'b RunBuffers,
        j: usize,
        kb: usize,
        past: usize,
    ) -> Result<Vec<(usize, usize, &'b HostMem, &'b HostMem)>> {
        let load = past > 0;
        let b = self.policy.gpu_batch_size as usize;
        let host_rows = b * self.dims().2 - self.gpu_rows - self.disk_rows;
        let mut out = Vec::with_capacity(2);
        if host_rows > 0 {
            let (k, v) = &buf.kv_cpu[j][kb];
            out.push((0, host_rows, k, v));
        }
        if let Some(dc) = &buf.disk_cache {
            if load {
                // The staging is free once earlier copies from and to it are done.
                let read = dc.load(j, kb, past, || self.wait_for_gpu())?;
                let (r, w) = self.cache_disk_io.get();
                self.cache_disk_io.set((r + read, w));
            }
            out.push((host_rows, self.disk_rows, &dc.stage[0], &dc.stage[1]));
        }
        Ok(out)
    }

    /// Appends (layer `j`, batch `kb`)'s new positions `past..past + t` of the disk rows to their
    /// regions, from the staging, once the copies of those positions into it have landed.
    fn flush_disk(
        &self,
        buf: &RunBuffers,
        j: usize,
        kb: usize,
        past: usize,
        t: usize,
    ) -> Result<()> {
        let Some(dc) = &buf.disk_cache else { return Ok(()) };
        self.wait_for_gpu()?;
        let written = dc.append(j, kb, past, t)?;
        let (r, w) = self.cache_disk_io.get();
        self.cache_disk_io.set((r, w + written));
        Ok(())
    }

    /// Embeds GPU batch `kb`'s `n` input tokens into its hidden state.
    fn embed_batch(&self, buf: &RunBuffers, kb: usize, n: usize) -> Result<()> {
        let h = self.dims().0;
        let pos_table = self.pos_embed.as_ref().map(|p| addr(&p.data));
        let x = addr(&buf.x[if self.act_on_gpu { kb } else { 0 }]);
        let (ids, pos, tok) = (addr(&buf.ids[kb]), addr(&buf.pos[kb]), addr(&self.embed.data));
        // SAFETY: this executor's weights and buffers, sized for these shapes.
        unsafe { self.gpu.embed_raw(ids, pos, tok, pos_table, x, n, h) }.map_err(cuda)?;
        self.hidden_out(buf, kb, n * h, 0)
    }

    /// Final norm, LM head and argmax of GPU batch `kb`'s last positions (`x` holds `b·t` rows):
    /// the most likely next token of each of its `b` sequences, copied to `out`; with `logits`,
    /// the logits of the last positions (`b × vocab` fp16) to `buf.logits_host[kb]` too. Both
    /// copies land by the stream's next synchronization.
    fn next_tokens(
        &self,
        buf: &RunBuffers,
        kb: usize,
        (b, t): (usize, usize),
        out: &mut [u32],
        logits: bool,
    ) -> Result<()> {
        let g = &self.gpu;
        let (h, ..) = self.dims();
        let vocab = self.model.spec.vocab_size as usize;
        let x = self.hidden_in(buf, kb, b * t * h, 0, false)?;
        let xs = if t == 1 {
            x
        } else {
            // SAFETY: this executor's weights and buffers, sized for these shapes.
            unsafe { g.last_rows(x, addr(&buf.last), b, t, h) }.map_err(cuda)?;
            addr(&buf.last)
        };
        let (nw, nb) = (addr(&self.final_norm.0.data), addr(&self.final_norm.1.data));
        // SAFETY: this executor's weights and buffers, sized for these shapes.
        unsafe { g.layer_norm_raw(xs, nw, nb, addr(&buf.hn), b, h, self.eps()) }.map_err(cuda)?;
        let head = addr(&self.lm_head.as_ref().unwrap_or(&self.embed).data);
        // SAFETY: this executor's weights and buffers, sized for these shapes.
        unsafe {
            g.gemm(&Gemm::linear(b, vocab, h, addr(&buf.hn), head, addr(&buf.logits), false))
        }
        .map_err(cuda)?;
        if logits {
            let dst = buf.logits_host[kb].ptr();
            let bytes = b * vocab * 2;
            // SAFETY: a pinned destination of b·vocab values, read only after the stream's next
            // synchronization.
            unsafe {
                copy_2d(
                    &g.stream,
                    Mem::Device(addr(&buf.logits)),
                    Mem::Host(dst.cast_const().cast()),
                    Copy2d { width: bytes, height: 1, src_pitch: bytes, dst_pitch: bytes },
                )
            }
            .map_err(cuda)?;
        }
        // SAFETY: this executor's weights and buffers, sized for these shapes.
        unsafe { g.argmax_rows(addr(&buf.logits), addr(&buf.tok[kb]), b, vocab) }.map_err(cuda)?;
        // SAFETY: b tokens into a pageable slice of b (the call returns once copied).
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(
                &mut out[..b],
                addr(&buf.tok[kb]),
                g.stream.cu_stream(),
            )
        }
        .map_err(drv)
    }

    /// Runs every kernel shape of a block once on layer 0 (prefill of `t` positions and one
    /// decode step) so that module loading and cuBLAS's first-call set-up stay out of the
    /// timings, as the original's warm-up generation does. The cache positions it writes are
    /// overwritten by the real prefill.
    fn warm_up(&self, buf: &RunBuffers, t: usize) -> Result<()> {
        let b = self.policy.gpu_batch_size as usize;
        let st = &self.gpu.stream;
        let w = if self.g_end == self.unit_len {
            self.layer_weights(0, 0)?
        } else {
            // Only the resident and CPU parts: the disk tier is warmed by the reader itself.
            if let Some(m) = &self.layers[0].cpu {
                htod(&self.load, at(addr(&self.stage[0]), self.g_end), m.as_f16())?;
            }
            self.loaded[0].record(&self.load).map_err(drv)?;
            self.layer_weights(0, 0)?
        };
        let zeros = vec![0u32; b * t];
        let starts = vec![0i32; b];
        htod(st, addr(&buf.ids[0]), &zeros)?;
        htod(st, addr(&buf.pos[0]), &zeros)?;
        htod(st, addr(&buf.start[0]), &starts)?;
        let mut out = vec![0u32; b];
        for (tt, past) in [(t, 0), (1, t)] {
            self.embed_batch(buf, 0, b * tt)?;
            self.layer(w, 0, 0, buf, &starts, b, tt, past, (0, Prefetch::default()))?;
            self.next_tokens(buf, 0, (b, tt), &mut out, false)?;
        }
        self.freed[0].record(st).map_err(drv)?;
        st.synchronize().map_err(drv)?;
        Ok(())
    }

    /// The run buffers, allocated for the longest prompt and warmed up on first use, then kept
    /// for every later block and call.
    fn run_buffers(&self) -> Result<std::cell::Ref<'_, RunBuffers>> {
        if self.run.borrow().is_none() {
            let t = self.capacity.max_prompt;
            let buf = self.alloc_run(t)?;
            self.warm_up(&buf, t)?;
            self.host_times.take(); // the warm-up's
            *self.run.borrow_mut() = Some(buf);
        }
        Ok(std::cell::Ref::map(self.run.borrow(), |b| b.as_ref().expect("allocated above")))
    }

    /// One block: every GPU batch holds `b` rows (a short block is padded with copies of its
    /// first prompt, whose picks are dropped); prefill, then decode steps as long as the schedule
    /// feeds them, layer by layer, every GPU batch through a layer before the next layer.
    fn run_block_on(
        &self,
        input: &BlockInput,
        buf: &RunBuffers,
        reader: Option<&Reader>,
        stats: &mut RunStats,
        after_step: &mut dyn FnMut(usize, Vec<Picks>) -> Result<Feed>,
    ) -> Result<()> {
        let spec = &self.model.spec;
        let vocab = spec.vocab_size as usize;
        let (b, k) = (self.policy.gpu_batch_size as usize, self.policy.num_gpu_batches as usize);
        let n_layers = self.layers.len();
        let st = &self.gpu.stream;
        let offloaded = self.g_end < self.unit_len;
        let t = input.width;
        let mut traffic = Traffic::default();
        // Row r of GPU batch kb is row r of the block's micro-batch kb, or a copy of the block's
        // first row (padding rows: computed, never reported).
        let real_rows: Vec<usize> =
            (0..k).map(|kb| if kb < input.ids.len() { input.rows(kb) } else { 0 }).collect();
        let mut starts_host: Vec<Vec<i32>> = Vec::with_capacity(k);
        let mut row_starts: Vec<Vec<usize>> = Vec::with_capacity(k);
        for (kb, &n) in real_rows.iter().enumerate() {
            let mut ids = Vec::with_capacity(b * t);
            let mut pos = Vec::with_capacity(b * t);
            let mut starts = Vec::with_capacity(b);
            for r in 0..b {
                let (src_kb, src_r) = if r < n { (kb, r) } else { (0, 0) };
                let start = input.starts[src_kb][src_r];
                ids.extend_from_slice(&input.ids[src_kb][src_r * t..(src_r + 1) * t]);
                pos.extend(stage::positions(spec, start, 0, t));
                starts.push(start);
            }
            htod(st, addr(&buf.ids[kb]), &ids)?;
            htod(st, addr(&buf.pos[kb]), &pos)?;
            starts_host.push(starts.iter().map(|&s| i32::try_from(s).expect("fits")).collect());
            htod(st, addr(&buf.start[kb]), &starts_host[kb])?;
            row_starts.push(starts);
        }
        let max_new = input.steps;
        let passes = max_new * n_layers;
        if offloaded {
            self.issue_load(0, 0, reader, &mut traffic)?;
            if passes > 1 {
                self.issue_load(1 % n_layers, 1, reader, &mut traffic)?;
            }
        }
        let mut pass = 0usize;
        let mut host_tok = vec![vec![0u32; b]; k];
        // GPU batches with rows whose logits the schedule needs.
        let want_logits: Vec<bool> = real_rows
            .iter()
            .enumerate()
            .map(|(kb, &n)| n > 0 && input.want_logits[kb].iter().any(|&w| w))
            .collect();
        for step in 0..max_new {
            let started = Instant::now();
            let (tt, past) = if step == 0 { (t, 0) } else { (1, t + step - 1) };
            for kb in 0..k {
                self.embed_batch(buf, kb, b * tt)?;
            }
            // Visits (layer, batch) of this step: each stages the next one's inputs on the copy
            // stream (`Prefetch`), alternating between two buffers; the first is staged in place.
            let h = self.dims().0;
            let ahead = self.prefetch.in_step(past);
            for j in 0..n_layers {
                let slot = pass % 2;
                let w = self.layer_weights(j, slot)?;
                for (kb, starts) in starts_host.iter().enumerate() {
                    let (vs, first, next) = visit_order((j, kb), (n_layers, k));
                    let staged = if first { Prefetch::default() } else { ahead };
                    if staged != Prefetch::default() {
                        st.wait(&self.staged[vs]).map_err(drv)?;
                    }
                    if let Some(next) = next {
                        self.prefetch_visit(buf, next, (b * tt * h, past), 1 - vs)?;
                    }
                    self.layer(w, j, kb, buf, starts, b, tt, past, (vs, staged))?;
                }
                if offloaded {
                    self.freed[slot].record(st).map_err(drv)?;
                    // Prefetch two layers ahead into the arena just released; across the step
                    // boundary that is the next step's first layers.
                    if pass + 2 < passes {
                        self.issue_load((pass + 2) % n_layers, slot, reader, &mut traffic)?;
                    }
                }
                pass += 1;
            }
            for (kb, toks) in host_tok.iter_mut().enumerate() {
                self.next_tokens(buf, kb, (b, tt), toks, want_logits[kb])?;
            }
            st.synchronize().map_err(drv)?;
            let picks: Vec<Picks> = (0..input.ids.len())
                .map(|kb| {
                    let host = buf.logits_host[kb].as_f16();
                    let n = real_rows[kb];
                    let logits = (0..n)
                        .into_par_iter()
                        .map(|r| {
                            input.want_logits[kb][r].then(|| {
                                let mut row = vec![0f32; vocab];
                                host[r * vocab..(r + 1) * vocab].convert_to_f32_slice(&mut row);
                                row
                            })
                        })
                        .collect();
                    Picks { greedy: host_tok[kb][..n].to_vec(), logits }
                })
                .collect();
            let feed = after_step(step, picks)?;
            if let Some(feed) = &feed {
                for kb in 0..k {
                    let n = real_rows[kb];
                    let toks: Vec<u32> =
                        (0..b).map(|r| if r < n { feed[kb][r] } else { input.pad }).collect();
                    let pos: Vec<u32> = row_starts[kb]
                        .iter()
                        .flat_map(|&s| stage::positions(spec, s, t + step, 1))
                        .collect();
                    htod(st, addr(&buf.ids[kb]), &toks)?;
                    htod(st, addr(&buf.pos[kb]), &pos)?;
                }
            }
            stage::record_step(stats, step, started.elapsed().as_secs_f64());
            if feed.is_none() {
                break;
            }
        }
        self.load.synchronize().map_err(drv)?;
        stats.tiers.traffic.cpu_to_gpu += traffic.cpu_to_gpu;
        stats.tiers.traffic.disk_read += traffic.disk_read;
        Ok(())
    }
}

impl Stage for CudaStage<'_> {
    fn run_block(
        &self,
        input: &BlockInput,
        stats: &mut RunStats,
        after_step: &mut dyn FnMut(usize, Vec<Picks>) -> Result<Feed>,
    ) -> Result<()> {
        let (b, k) = (self.policy.gpu_batch_size as usize, self.policy.num_gpu_batches as usize);
        if input.ids.len() > k || (0..input.ids.len()).any(|kb| input.rows(kb) > b) {
            return Err(Error::Config {
                field: "gpu_batch_size",
                message: format!("a block larger than the executor's {b}×{k}"),
            });
        }
        if input.width > self.capacity.max_prompt || input.steps > self.capacity.max_new {
            return Err(Error::Config {
                field: "capacity",
                message: format!(
                    "prompts of up to {} tokens and {} new tokens exceed what the CUDA executor \
                     was sized for ({} and {}); size it for the longest request",
                    input.width, input.steps, self.capacity.max_prompt, self.capacity.max_new
                ),
            });
        }
        if input.steps == 0 || input.ids.is_empty() {
            return Ok(());
        }
        stats.direct_io = self.direct_io;
        let buf = self.run_buffers()?;
        let passes = input.steps * self.layers.len();
        std::thread::scope(|s| -> Result<()> {
            let reader = self.disk.as_ref().map(|d| Reader::spawn(s, d, &self.gpu, passes));
            self.run_block_on(input, &buf, reader.as_ref(), stats, after_step)
        })
    }

    fn finish(&self, stats: &mut RunStats) -> Result<()> {
        let (free, total) = self.gpu.ctx.mem_get_info().map_err(drv)?;
        stats.tiers.required.gpu = (total - free) as u64;
        stats.tiers.required.cpu = self.pinned_bytes + self.pageable_bytes;
        stats.tiers.required.disk = self.disk_bytes() + self.disk_cache_bytes();
        stats.host = self.host_times.take();
        let (read, written) = self.cache_disk_io.take();
        stats.tiers.traffic.disk_read += read;
        stats.tiers.traffic.disk_write += written;
        Ok(())
    }
}

/// The disk reader of one block: a thread that reads every pass's disk part, in order, into
/// the pinned ring as buffers come free, running ahead of the GPU.
struct Reader {
    /// Ring buffers filled, in pass order.
    filled: mpsc::Receiver<Result<usize>>,
    /// Ring buffers whose copy has been issued (the reader waits for the copy's event).
    free: mpsc::Sender<usize>,
}

impl Reader {
    fn spawn<'scope>(
        s: &'scope std::thread::Scope<'scope, '_>,
        d: &'scope DiskPart,
        gpu: &'scope Gpu,
        passes: usize,
    ) -> Self {
        let (filled_tx, filled) = mpsc::sync_channel(d.ring.len());
        let (free, free_rx) = mpsc::channel::<usize>();
        for i in 0..d.ring.len() {
            let _ = free.send(i);
        }
        let n_layers = d.layers;
        let ring: Vec<(usize, usize)> =
            d.ring.iter().map(|m| (m.as_f16().as_ptr() as usize, d.slot_bytes)).collect();
        let ctx = gpu.ctx.clone();
        s.spawn(move || {
            let _ = ctx.bind_to_thread();
            for pass in 0..passes {
                let Ok(i) = free_rx.recv() else { return };
                let r = (|| -> Result<usize> {
                    d.copied[i].synchronize().map_err(drv)?;
                    // SAFETY: ring buffer i is not read by any copy now (its event fired) and
                    // the main thread reads it only after receiving i from `filled`.
                    let out =
                        unsafe { std::slice::from_raw_parts_mut(ring[i].0 as *mut u8, ring[i].1) };
                    let j = pass % n_layers;
                    read_parallel(&d.file, (j * d.slot_bytes) as u64, out, READ_THREADS).map_err(
                        |e| Error::Io { path: d.file.path().to_path_buf(), message: e.to_string() },
                    )?;
                    Ok(i)
                })();
                let failed = r.is_err();
                if filled_tx.send(r).is_err() || failed {
                    return;
                }
            }
        });
        Self { filled, free }
    }
}

/// Bytes of one packed k (or v) cache of `rows` rows of `cap` positions: codes and parameters.
fn packed_cache_bytes(policy: &Policy, rows: impl TryInto<usize>, cap: u64, hd: u64) -> u64 {
    let n = |v: u64| usize::try_from(v).expect("fits");
    let q = CacheQuant {
        rows: rows.try_into().ok().expect("fits"),
        cap: n(cap),
        hd: n(hd),
        group: policy.compress_cache.group_size as usize,
        bits: policy.compress_cache.bits,
    };
    let (codes, params) = q.sizes();
    (codes + 2 * params) as u64
}

/// `MemAvailable` of `/proc/meminfo` in bytes (`None` where it cannot be read).
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Copies pageable `src` to `dst` in stream order (the call returns once `src` has been staged,
/// so `src` may be dropped after it).
fn htod<T>(st: &CudaStream, dst: u64, src: &[T]) -> Result<()> {
    // SAFETY: every destination buffer is sized for what the executor copies into it.
    unsafe { cudarc::driver::result::memcpy_htod_async(dst, src, st.cu_stream()) }.map_err(drv)
}

fn new_event(gpu: &Gpu) -> Result<CudaEvent> {
    gpu.ctx
        .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))
        .map_err(drv)
}

fn new_timing_event(gpu: &Gpu) -> Result<CudaEvent> {
    gpu.ctx.new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT)).map_err(drv)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(name: &str) -> Model {
        let spec = flexgen_model::spec_by_name(name).unwrap();
        // Only the spec matters for planning; no weights are built.
        Model {
            weights: flexgen_model::Weights::dummy_tables(
                &flexgen_model::ModelSpec { vocab_size: 8, max_positions: 8, ..spec.clone() },
                flexgen_model::DummyInit::Ones,
            )
            .unwrap(),
            spec,
            tokenizer: None,
            dir: None,
        }
    }

    /// S1: OPT-30B weights on the CPU, cache and activations on the GPU, 32×2.
    fn s1_policy() -> Policy {
        Policy {
            placement: flexgen_policy::Placement::from_percent([
                0.0, 100.0, 100.0, 0.0, 100.0, 0.0,
            ])
            .unwrap(),
            gpu_batch_size: 32,
            num_gpu_batches: 2,
            ..Policy::default()
        }
    }

    fn gib(b: u64) -> f64 {
        b as f64 / f64::from(1u32 << 30)
    }

    /// The GPU bytes the executor planned in the device runs of docs/benchmarks.md (S1, S8 28×2).

    #[test]
    fn planned_gpu_bytes_match_the_device_reports() {
        let m = model("opt-30b");
        let layout = LayerLayout::new(&m.spec).unwrap();
        let cap = GpuCapacity { max_prompt: 512, max_new: 32, gpu_limit: None };
        let s1 = s1_policy();
        let b = CudaStage::plan_bytes(&m.spec, &s1, (&layout, layout.len), 0, 32 * 56, cap);
        // Reported: GPU 51.34 GiB (staging 2.30, KV cache 44.62, activations 3.72).
        assert!((gib(b.total()) - 51.34).abs() < 0.01, "{}", gib(b.total()));
        assert!((gib(b.cache) - 44.62).abs() < 0.01 && (gib(b.staging) - 2.30).abs() < 0.01);
        let host =
            CudaStage::plan_host_bytes(&m.spec, &s1, layout.len, (0, layout.len), 32 * 56, cap);
        assert!((gib(host) - 55.13).abs() < 0.01, "{}", gib(host)); // 55.13 GiB pinned
        // With packed 4-bit weights the same run holds and moves about 0.28 of the bytes.
        let p = layout.packed(4, 64);
        let host_c =
            CudaStage::plan_host_bytes(&m.spec, &s1, p.len / 2, (0, p.len / 2), 32 * 56, cap);
        let ratio = host_c as f64 / host as f64;
        assert!((0.26..0.30).contains(&ratio), "{ratio}");
    }

    #[test]
    fn a_compressed_cache_plans_about_a_quarter_of_the_bytes() {
        let m = model("opt-30b");
        let layout = LayerLayout::new(&m.spec).unwrap();
        let cap = GpuCapacity { max_prompt: 512, max_new: 32, gpu_limit: None };
        let mut p = s1_policy();
        let plain = CudaStage::plan_bytes(&m.spec, &p, (&layout, layout.len), 0, 32 * 56, cap);
        p.compress_cache.enabled = true;
        let packed = CudaStage::plan_bytes(&m.spec, &p, (&layout, layout.len), 0, 32 * 56, cap);
        // 4-bit codes and an fp16 pair per 64 values: (32 + 4) / 128 of the fp16 bytes.
        let ratio = packed.cache as f64 / plain.cache as f64;
        assert!((ratio - 36.0 / 128.0).abs() < 1e-9, "{ratio}");
        // One (layer, batch) in fp16 is the working area.
        assert_eq!(packed.activations - plain.activations, 2 * 2 * 32 * 56 * 544 * 128);
        // The original's compressed T4 policy: the packed cache on the CPU, none on the GPU.
        p.placement =
            flexgen_policy::Placement::from_percent([0.0, 100.0, 0.0, 100.0, 0.0, 100.0]).unwrap();
        let on_cpu = CudaStage::plan_bytes(&m.spec, &p, (&layout, layout.len), 0, 0, cap);
        assert_eq!(on_cpu.cache, 0);
        let host = CudaStage::plan_host_bytes(&m.spec, &p, layout.len, (0, layout.len), 0, cap);
        let weights = 48 * layout.len as u64 * 2;
        let acts = 2 * 32 * 512 * 7168 * 2;
        let logits = CudaStage::logits_host_bytes(&m.spec, &p);
        assert_eq!(
            host - weights - acts - logits,
            packed.cache,
            "the same packed bytes, on the CPU"
        );
    }

    #[test]
    fn cache_rows_split_three_ways_and_disk_rows_stay_off_the_cpu_plan() {
        let shares = flexgen_policy::TierShares::from_gpu_cpu(50.0, 25.0);
        assert_eq!(split_counts(64 * 32, &shares), [1024, 512, 512]);
        let m = model("opt-6.7b");
        let cap = GpuCapacity { max_prompt: 512, max_new: 32, gpu_limit: None };
        let mut p = Policy {
            gpu_batch_size: 64,
            placement: flexgen_policy::Placement::from_percent([
                100.0, 0.0, 50.0, 50.0, 100.0, 0.0,
            ])
            .unwrap(),
            offload_dir: Some("/unused".into()), // the plan names it only
            ..Policy::default()
        };
        let cpu_only = CudaStage::host_bytes_needed(&m.spec, &p, cap).unwrap();
        p.placement =
            flexgen_policy::Placement::from_percent([100.0, 0.0, 50.0, 25.0, 100.0, 0.0]).unwrap();
        let with_disk = CudaStage::host_bytes_needed(&m.spec, &p, cap).unwrap();
        // Half of the CPU rows moved to disk; the disk rows' row-major staging and two pairs of
        // position-major I/O buffers (k and v) stay.
        let stage = 2 * (align_up(512 * 544 * 128 * 2) + 2 * 544 * disk_pos_bytes(512, 128)) as u64;
        let logits = CudaStage::logits_host_bytes(&m.spec, &p);
        assert_eq!(with_disk - logits, (cpu_only - logits) / 2 + stage);
    }

    /// The copy stream's schedule: each visit after a step's first finds its inputs staged, in
    /// its own slot, by the visit just before it; that visit's `mark` follows every earlier
    /// visit, so the slot's previous user and, with hidden states on the CPU (two or more GPU
    /// batches), the visit that wrote the staged hidden state are done before the copy.
    #[test]
    fn every_visit_is_staged_by_the_one_before_after_its_inputs_exist() {
        for layers in 1..5 {
            for k in 1..5 {
                let order: Vec<(usize, usize)> =
                    (0..layers).flat_map(|j| (0..k).map(move |kb| (j, kb))).collect();
                let mut pending: [Option<(usize, usize)>; 2] = [None, None];
                for (v, &(j, kb)) in order.iter().enumerate() {
                    let (slot, first, next) = visit_order((j, kb), (layers, k));
                    assert_eq!(first, v == 0);
                    if !first {
                        assert_eq!(pending[slot].take(), Some((j, kb)), "{layers}x{k} visit {v}");
                    }
                    assert_eq!(next, order.get(v + 1).copied());
                    if let Some((nj, nkb)) = next {
                        assert_eq!(pending[1 - slot], None, "slot {} still awaited", 1 - slot);
                        pending[1 - slot] = Some((nj, nkb));
                        // The staged hidden state was written by (nj − 1, nkb): before visit v
                        // (covered by its mark) exactly when k ≥ 2, as Prefetch::of requires.
                        if nj > 0 {
                            let writer = (nj - 1) * k + nkb;
                            assert_eq!(writer < v, k >= 2);
                        }
                    }
                }
                assert_eq!(pending, [None, None], "every staged visit ran");
            }
        }
        let pf = Prefetch { act: true, cache: true };
        assert_eq!(pf.in_step(0), Prefetch { act: true, cache: false }, "prefill: no past");
        assert_eq!(pf.in_step(5), pf);
    }

    #[test]
    fn prefetched_copies_plan_a_second_buffer() {
        let m = model("opt-6.7b");
        let layout = LayerLayout::new(&m.spec).unwrap();
        let cap = GpuCapacity { max_prompt: 512, max_new: 32, gpu_limit: None };
        let plan = |pct: [f64; 6], k: u32, cpu_attn: bool| {
            let p = Policy {
                gpu_batch_size: 8,
                num_gpu_batches: k,
                cpu_cache_compute: cpu_attn,
                placement: flexgen_policy::Placement::from_percent(pct).unwrap(),
                offload_dir: Some("/tmp".into()),
                ..Policy::default()
            };
            let rows = 8 * 32;
            let gpu_rows = split_counts(rows, &p.placement.kv_cache)[0];
            CudaStage::plan_bytes(&m.spec, &p, (&layout, layout.len), layout.len, gpu_rows, cap)
        };
        // The cache on the CPU, attended on the GPU: two working caches of all 256 rows.
        let two = plan([100.0, 0.0, 0.0, 100.0, 100.0, 0.0], 1, false);
        assert_eq!(
            Prefetch::of(&Policy::default(), 0, 256, 0),
            Prefetch { act: false, cache: true }
        );
        // With a share on disk the host fills the staging: one working cache.
        let one = plan([100.0, 0.0, 0.0, 50.0, 100.0, 0.0], 1, false);
        assert_eq!(two.activations - one.activations, 2 * 2 * 256 * 544 * 128);
        // CPU attention moves only new positions: no working cache to double.
        let attn = plan([100.0, 0.0, 0.0, 100.0, 100.0, 0.0], 1, true);
        assert_eq!(
            two.activations - attn.activations,
            2 * 2 * (2 * 256 * 544 * 128 - 256 * 512 * 128)
        );
        // Hidden states on the CPU: two staging buffers with two or more GPU batches.
        let act1 = plan([100.0, 0.0, 100.0, 0.0, 0.0, 100.0], 1, false);
        let act2 = plan([100.0, 0.0, 100.0, 0.0, 0.0, 100.0], 2, false);
        assert_eq!(act2.activations - act1.activations, 2 * 8 * 512 * 4096);
    }

    #[test]
    fn cache_rows_on_the_cpu_move_out_of_the_gpu_plan() {
        let m = model("opt-6.7b");
        let layout = LayerLayout::new(&m.spec).unwrap();
        let cap = GpuCapacity { max_prompt: 512, max_new: 32, gpu_limit: None };
        let mut p = Policy { gpu_batch_size: 64, ..Policy::default() };
        let all =
            CudaStage::plan_bytes(&m.spec, &p, (&layout, layout.len), layout.len, 64 * 32, cap);
        // Reported for S4: GPU 33.41 GiB (weights 12.00, KV cache 17.00, activations 4.01).
        assert!((gib(all.total()) - 33.41).abs() < 0.01, "{}", gib(all.total()));
        p.placement =
            flexgen_policy::Placement::from_percent([100.0, 0.0, 25.0, 75.0, 100.0, 0.0]).unwrap();
        p.cpu_cache_compute = true;
        let quarter =
            CudaStage::plan_bytes(&m.spec, &p, (&layout, layout.len), layout.len, 16 * 32, cap);
        assert_eq!(quarter.cache * 4, all.cache, "a quarter of the rows on the GPU");
        let host = CudaStage::plan_host_bytes(
            &m.spec,
            &p,
            layout.len,
            (layout.len, layout.len),
            16 * 32,
            cap,
        );
        let logits = CudaStage::logits_host_bytes(&m.spec, &p);
        assert_eq!(host - logits, all.cache * 3 / 4, "the rest on the CPU");
    }
}
