//! The CUDA stage: the block schedule's steps on GPU 0, placing weights, KV cache and
//! activations by the policy's shares. This file holds the stage's state, its set-up (`new`) and
//! its reports and its refusals (from the one memory plan, `crate::memory`); `weights.rs` the weight homes and their streaming,
//! `buffers.rs` the run buffers, `visits.rs` the visit order and what is staged ahead,
//! `layer.rs` a decoder layer's kernels, `cache.rs` cache rows off the GPU (CPU attention, disk),
//! `step.rs` the steps the schedule drives.
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
use flexgen_model::{DummyInit, LayerLayout, Model, PackedLayout, fused};
use flexgen_policy::{Policy, Tier, micro_batch_scores_len};
use flexgen_tensor::cuda::exec::{
    AttnDims, CacheQuant, Copy2d, Gemm, Mem, NewKv, SplitPack, addr, at, copy_2d,
};
use flexgen_tensor::cuda::{
    CudaError, CudaSlice, CudaStream, Gpu, GpuTensor, HostMem, NcclLink, PinnedHostSlice,
};
use flexgen_tensor::host::{DirectFile, align_up};
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::disk::{DiskCache, READ_THREADS, disk_pos_bytes, read_parallel};
use crate::memory;
use crate::stage::{self, BlockInput, Feed, Picks, Stage};
use crate::tiers::{Traffic, io_err};
use crate::{Error, Result, RunStats};

mod buffers;
mod cache;
mod layer;
mod pipeline;
mod ranks;
mod step;
mod visits;
mod weights;

use buffers::{PackedKv, RunBuffers};
use layer::Deferred;
pub(crate) use pipeline::{CudaPipeline, Link};
use pipeline::{is_stopped, stopped};
pub(crate) use ranks::CudaRank;
pub(crate) use visits::Prefetch;
use visits::visit_order;
use weights::Reader;

/// Where the weights come from: a loaded model's layers, or dummy values made in place.
#[derive(Debug, Clone, Copy)]
pub enum LayerSource {
    /// The model's layers ([`Model::layer`]: loaded, or read from its files when placed).
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

impl GpuCapacity {
    /// The requests it is sized for, as the memory plan takes them (whole blocks).
    pub fn requests(&self) -> memory::Capacity {
        memory::Capacity { max_prompt: self.max_prompt, max_new: self.max_new, sequences: None }
    }
}

struct LayerHome {
    /// Elements `0..g_end` of the arena (the whole arena when it is wholly resident).
    gpu: Option<CudaSlice<f16>>,
    /// Elements `g_end..c_end`.
    cpu: Option<HostMem>,
}

/// The error of a stage asked to place a model's own layers where none were loaded.
const LAYERS_NOT_LOADED: &str = "the model's layers were not loaded";

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

/// Runs greedy generation of token prompts on the GPU.
pub struct CudaStage<'m> {
    model: &'m Model,
    /// The model's layers this stage holds (all of them but in a pipeline).
    range: std::ops::Range<u32>,
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
    /// Recorded after the copies of CPU attention's inputs into pinned staging `p`.
    cpu_in: [CudaEvent; 2],
    layout: LayerLayout,
    /// With `compress_weight`: the packed form of each arena, which the tiers hold and move.
    packed: Option<PackedLayout>,
    /// fp16 units of the stored arena: `layout.len`, or half the packed bytes.
    unit_len: usize,
    /// With `compress_weight`: the fp16 buffer (the largest slice of a matrix:
    /// `memory::expand_len`) each packed matrix is dequantized into, a slice of outputs at a
    /// time, just before that slice's product.
    expanded: Option<CudaSlice<f16>>,
    /// The fused 4-bit product's fp32 output, where decode steps take it
    /// (`Policy::fuses_decode`; `FLEXGEN_FUSED4=0` in the environment turns it off:
    /// `weights::fused_decode_on`; weights not in the tensor-core order take it only up to
    /// `FUSED_DECODE_OTHER_GROUP_ROWS` rows).
    fused_scratch: Option<CudaSlice<f32>>,
    /// The last layer built whole at set-up (packed, or read from the model's files: built once
    /// for its GPU, CPU and disk parts), by layer, or 0 for packed `ones` dummy layers (all alike).
    layer_memo: RefCell<Option<(usize, Vec<f16>)>>,
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
    /// Timing events around each decode step's layer copies on the load stream, read at the
    /// block's end into `host_times`.
    copy_spans: RefCell<Vec<(CudaEvent, CudaEvent)>>,
    /// Hidden states between layers live on the GPU (else in pinned CPU memory).
    act_on_gpu: bool,
    /// The token embedding, with the first layer (and with the last, as a tied LM head).
    embed: Option<GpuTensor>,
    pos_embed: Option<GpuTensor>,
    /// The rotary inverse frequencies (`[hd/2]` f32) of a family with rotary positions.
    inv_freq: Option<CudaSlice<f32>>,
    /// The final norm's weight and, for `LayerNorm`, bias.
    /// The final norm (weight, bias) of a pre-norm model.
    final_norm: Option<(GpuTensor, Option<GpuTensor>)>,
    /// OPT-350M's projections of the token embedding to the hidden size and back.
    project: Option<(GpuTensor, GpuTensor)>,
    lm_head: Option<GpuTensor>,
    layers: Vec<LayerHome>,
    disk: Option<DiskPart>,
    stage: Vec<CudaSlice<f16>>,
    loaded: [CudaEvent; 2],
    freed: [CudaEvent; 2],
    capacity: GpuCapacity,
    bytes: memory::Use,
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

/// Whether a measuring knob leaves its path on: unless `var=0` is in the environment (read once,
/// into `cell`).
fn knob_on(var: &str, cell: &'static std::sync::OnceLock<bool>) -> bool {
    *cell.get_or_init(|| std::env::var(var).map_or(true, |v| v != "0"))
}

fn cuda(e: CudaError) -> Error {
    Error::Model(flexgen_model::Error::Gpu(e))
}

fn drv(e: cudarc::driver::DriverError) -> Error {
    cuda(e.into())
}

/// Whether the off-GPU cache rows (of `rows` per (layer, batch), `gpu_rows` on the GPU) attend on
/// the CPU in decode steps: fp16 rows in place, packed rows expanded on the cores
/// (`host_attention::decode_packed`), so that only the new position crosses PCIe.
fn cpu_attention(policy: &Policy, gpu_rows: usize, rows: usize) -> bool {
    policy.cpu_cache_compute && gpu_rows < rows
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
        let all = 0..model.spec.num_layers;
        Self::part(model, policy, source, capacity, all, 0)
    }

    /// The stage of a pipeline that holds layers `range` (the whole model: [`CudaStage::new`]):
    /// the embedding with the first layer, the final norm and LM head with the last; on GPU
    /// `ordinal`.
    pub(crate) fn part(
        model: &'m Model,
        policy: Policy,
        source: LayerSource,
        capacity: GpuCapacity,
        range: std::ops::Range<u32>,
        ordinal: usize,
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
        if spec.embed_width() > spec.hidden_size {
            // The projection's input rows are staged in a buffer of hidden-state rows.
            return Err(refuse("model", "token embeddings wider than the hidden state"));
        }
        let (rows, [gpu_rows, _, disk_rows]) = memory::cache_rows(spec, &policy);
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
        let memory::Arena { layout, mut packed, unit_len, ends: [g_end, c_end] } =
            memory::arena(spec, &policy)?;
        let n_layers = range.len();
        if matches!(source, LayerSource::Loaded) && !model.has_layers() {
            return Err(Error::Config { field: "model", message: LAYERS_NOT_LOADED.into() });
        }
        let disk_dir = if c_end < unit_len {
            Some(policy.offload_dir.clone().ok_or_else(|| Error::Config {
                field: "offload_dir",
                message: "weights on disk need offload_dir (--offload-dir DIR)".into(),
            })?)
        } else {
            None
        };
        let gpu = Gpu::new(ordinal).map_err(cuda)?;
        if let Some(p) = packed.as_mut() {
            // The tensor-core order only where the device runs the product that reads it (the
            // same bytes: the memory plan holds either way).
            p.tc &= gpu.tensor_cores() && weights::tc_order_on();
        }
        // The executor orders its two streams with its own events.
        // SAFETY: every buffer below is used on the compute stream, except the staging arenas,
        // which the load stream writes only between `freed` and `loaded` events, and the visit
        // buffers of `Prefetch`, which the copy stream writes only between `mark` and `staged`.
        unsafe { gpu.ctx.disable_event_tracking() };
        let load = gpu.ctx.new_stream().map_err(drv)?;
        let copy = gpu.ctx.new_stream().map_err(drv)?;
        let prefetch = Prefetch::of(&policy, gpu_rows, rows, disk_rows);
        // The one memory plan (the planner's tests hold the cost model to the same figures).
        let plan =
            memory::plan(spec, &policy, capacity.requests(), range.clone(), memory::Compute::Cuda)?;
        let (bytes, host) = (plan.gpu, plan.cpu.total());
        if let Some(avail) = mem_available() {
            let avail = avail.saturating_sub(2 << 30);
            if host > avail {
                return Err(Error::Capacity {
                    tier: Tier::Cpu,
                    needed_bytes: host,
                    available_bytes: avail,
                    detail: " (weights, KV cache and activations placed on the CPU; available: \
                             MemAvailable less 2 GiB)"
                        .into(),
                    fix: "lower the CPU shares (placement.*.cpu), gpu_batch_size or \
                          num_gpu_batches",
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
        // The tables of the ends this stage holds (`memory::plan` counts the same): held by the
        // model, or (a lazy model) read or made now and dropped once uploaded, before the layers
        // are placed. A middle stage holds none (and reads none).
        let (first, last) = (range.start == 0, range.end == spec.num_layers);
        let tables = if first || last {
            model.tables()?
        } else {
            std::borrow::Cow::Borrowed(&model.weights)
        };
        let w = &*tables;
        let up = |t: &flexgen_tensor::Tensor| gpu.upload(t).map_err(cuda);
        let embed = if first || (last && w.lm_head.is_none()) {
            Some(up(&w.token_embedding)?)
        } else {
            None
        };
        let pos_embed = w.position_embedding.as_ref().filter(|_| first).map(up).transpose()?;
        let final_norm = w
            .final_norm
            .as_ref()
            .filter(|_| last)
            .map(|n| Ok::<_, Error>((up(&n.weight)?, n.bias.as_ref().map(up).transpose()?)))
            .transpose()?;
        let project = match (&w.project_in, &w.project_out) {
            (Some(i), Some(o)) if first || last => Some((up(i)?, up(o)?)),
            _ => None,
        };
        // f32, as Hugging Face multiplies positions by them; none for learned positions.
        #[expect(clippy::cast_possible_truncation, reason = "f32 as the reference")]
        let inv_freq: Vec<f32> =
            spec.positions.inv_freq(spec.head_dim()).iter().map(|&f| f as f32).collect();
        let inv_freq = (!inv_freq.is_empty())
            .then(|| gpu.stream.clone_htod(&inv_freq).map_err(drv))
            .transpose()?;
        let lm_head = w.lm_head.as_ref().filter(|_| last).map(up).transpose()?;
        drop(tables);
        let loaded = [new_event(&gpu)?, new_event(&gpu)?];
        let freed = [new_event(&gpu)?, new_event(&gpu)?];
        let staged = [new_event(&gpu)?, new_event(&gpu)?];
        let mark = new_event(&gpu)?;
        let cpu_in = [new_event(&gpu)?, new_event(&gpu)?];
        let mut this = Self {
            model,
            range,
            policy,
            gpu,
            load,
            copy,
            prefetch,
            staged,
            mark,
            cpu_in,
            layout,
            packed,
            unit_len,
            expanded: None,
            fused_scratch: None,
            layer_memo: std::cell::RefCell::new(None),
            g_end,
            c_end,
            gpu_rows,
            cpu_attention,
            cache_quant,
            disk_rows,
            cache_disk_io: std::cell::Cell::new((0, 0)),
            host_times: std::cell::Cell::default(),
            copy_spans: RefCell::default(),
            act_on_gpu,
            embed,
            pos_embed,
            inv_freq,
            final_norm,
            project,
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

    /// The GPU capacity error of a plan `bytes` that `available` cannot hold.
    pub(super) fn refusal(bytes: &memory::Use, available: u64, limited: bool) -> Error {
        #[expect(clippy::cast_precision_loss, reason = "a report")]
        let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
        Error::Capacity {
            tier: Tier::Gpu,
            needed_bytes: bytes.total(),
            available_bytes: available,
            detail: format!(
                " (needed: weights {:.2} GiB, staging {:.2}, embeddings {:.2}, KV cache {:.2}, \
                 activations {:.2}; available: {})",
                gib(bytes.weights),
                gib(bytes.staging),
                gib(bytes.tables),
                gib(bytes.cache),
                gib(bytes.activations),
                if limited { "--gpu-mem-limit" } else { "free device memory less 1 GiB" }
            ),
            fix: "lower placement.weights.gpu, gpu_batch_size or num_gpu_batches, or shorten the \
                  prompt or generation",
        }
    }

    /// The GPU memory this generator planned, by use.
    pub fn gpu_bytes(&self) -> memory::Use {
        self.bytes
    }

    /// Bytes of weights that cross PCIe for every pass over the layers.
    pub fn weight_bytes_per_pass(&self) -> u64 {
        (self.unit_len - self.g_end) as u64 * 2 * self.range.len() as u64
    }

    /// KV-cache bytes a decode step at `past` positions moves: (over PCIe, read from disk). Off-GPU
    /// rows attended on the GPU bring their past in (packed rows whole) and send the new position
    /// back; with CPU attention only q, k, v of the new position go out and the output comes
    /// back; disk rows are read up to `past` (their new position's write is not counted).
    pub fn cache_bytes_per_decode_step(&self, past: usize) -> (u64, u64) {
        let (_, _, nkv, hd) = self.dims();
        let off = self.policy.gpu_batch_size as usize * nkv - self.gpu_rows;
        let times = self.range.len() as u64 * u64::from(self.policy.num_gpu_batches);
        let pcie = match self.cache_quant {
            _ if self.cpu_attention => (4 * off * hd * 2) as u64,
            Some(_) => 2 * memory::packed_cache_bytes(&self.policy, off, self.cap(), hd),
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
        (self.unit_len - self.c_end) as u64 * 2 * self.range.len() as u64
    }

    /// Bytes of KV cache held on disk.
    pub fn disk_cache_bytes(&self) -> u64 {
        let s = &self.model.spec;
        let cap = self.cap();
        let region = (cap * disk_pos_bytes(self.disk_rows, s.head_dim() as usize)) as u64;
        self.range.len() as u64 * u64::from(self.policy.num_gpu_batches) * 2 * region
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
    fn a_gpu_refusal_is_the_one_capacity_error_with_its_parts_and_fix() {
        let bytes = memory::Use {
            weights: 10 << 30,
            staging: 2 << 30,
            tables: 1 << 30,
            cache: 3 << 30,
            activations: 1 << 29,
        };
        let err = CudaStage::refusal(&bytes, 16 << 30, true);
        let Error::Capacity { tier, needed_bytes, available_bytes, .. } = &err else {
            panic!("{err}")
        };
        assert_eq!((*tier, *needed_bytes, *available_bytes), (Tier::Gpu, bytes.total(), 16 << 30));
        let text = err.to_string();
        for part in ["GPU tier needs 16.5 GiB", "has 16.0 GiB", "KV cache 3.00", "--gpu-mem-limit"]
        {
            assert!(text.contains(part), "{part} missing: {text}");
        }
        assert!(text.contains("short by 512.0 MiB") && text.contains("gpu_batch_size"), "{text}");
    }
}
