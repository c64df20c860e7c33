//! The CUDA stage's memory plan: what a policy needs on the GPU and in CPU memory, computed
//! without a GPU from the model's spec, the policy and the capacity (the figures `new` checks
//! before allocating, and the planner's tests hold the cost model to).

#[allow(clippy::wildcard_imports)]
use super::*;

/// Bytes of one packed k (or v) cache of `rows` rows of `cap` positions: codes and parameters.
pub(super) fn packed_cache_bytes(
    policy: &Policy,
    rows: impl TryInto<usize>,
    cap: u64,
    hd: u64,
) -> u64 {
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

impl CudaStage<'_> {
    pub(super) fn refusal(bytes: &GpuBytes, available: u64, limited: bool) -> Error {
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
    pub(super) fn arena(spec: &ModelSpec, policy: &Policy) -> Result<Arena> {
        let layout = LayerLayout::new(spec)?;
        let c = &policy.compress_weight;
        let packed = c.enabled.then(|| layout.packed(c.bits, c.group_size as usize));
        let unit_len = packed.as_ref().map_or(layout.len, |p| p.len / 2);
        let [on_gpu, on_cpu, _] = split_counts(unit_len, &policy.placement.weights);
        Ok(Arena { layout, packed, unit_len, ends: [on_gpu, on_gpu + on_cpu] })
    }

    /// A micro-batch's cache rows (sequence, head) and their split `[gpu, cpu, disk]`.
    pub(super) fn cache_rows(spec: &ModelSpec, policy: &Policy) -> (usize, [usize; 3]) {
        let rows = (policy.gpu_batch_size * spec.num_kv_heads) as usize;
        (rows, split_counts(rows, &policy.placement.kv_cache))
    }

    /// The GPU bytes a run of this policy needs, by use.
    pub(super) fn plan_bytes(
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
    pub(super) fn plan_host_bytes(
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
    pub(super) fn logits_host_bytes(spec: &ModelSpec, policy: &Policy) -> u64 {
        u64::from(policy.num_gpu_batches)
            * u64::from(policy.gpu_batch_size)
            * u64::from(spec.vocab_size)
            * 2
    }
}
