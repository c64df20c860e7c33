//! GPU probes: NVML inventory, host↔device copy bandwidth (pinned and pageable, each direction and
//! both at once, on non-default streams timed with events), device-memory bandwidth, and fp16 GEMM
//! and batched-attention rates with cuBLAS at the shapes the decoder uses.

use std::sync::Arc;

use flexgen_policy::GpuProfile;
use flexgen_tensor::cuda::{self, CudaContext, CudaError, CudaSlice};
use half::f16;

use crate::Mode;

/// Facts NVML reports without timing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuInventory {
    pub name: String,
    pub memory_total_bytes: u64,
    pub memory_free_bytes: u64,
    /// "gen5 x16" (current link; the max in parentheses when it differs).
    pub pcie: Option<String>,
    pub driver: Option<String>,
    /// GPUs of device 0's model on this host (device 0 among them).
    pub count: u32,
    /// CUDA compute capability, "major.minor".
    pub compute_capability: Option<String>,
}

/// What NVML says about device 0, or why it could not say.
pub fn inventory() -> Result<GpuInventory, String> {
    let nvml = nvml_wrapper::Nvml::init().map_err(|e| format!("NVML: {e}"))?;
    let dev = nvml.device_by_index(0).map_err(|e| format!("NVML device 0: {e}"))?;
    let mem = dev.memory_info().map_err(|e| format!("NVML memory info: {e}"))?;
    let pcie = match (dev.current_pcie_link_gen(), dev.current_pcie_link_width()) {
        (Ok(g), Ok(w)) => {
            let max = match (dev.max_pcie_link_gen(), dev.max_pcie_link_width()) {
                (Ok(mg), Ok(mw)) if (mg, mw) != (g, w) => format!(" (max gen{mg} x{mw})"),
                _ => String::new(),
            };
            Some(format!("gen{g} x{w}{max}"))
        }
        _ => None,
    };
    let name = dev.name().unwrap_or_else(|_| "unknown".into());
    let count = (0..nvml.device_count().unwrap_or(1))
        .filter(|&i| nvml.device_by_index(i).and_then(|d| d.name()).is_ok_and(|n| n == name))
        .count();
    Ok(GpuInventory {
        count: u32::try_from(count).unwrap_or(1).clamp(1, flexgen_policy::MAX_GPUS),
        name,
        memory_total_bytes: mem.total,
        memory_free_bytes: mem.free,
        pcie,
        driver: nvml.sys_driver_version().ok(),
        compute_capability: dev
            .cuda_compute_capability()
            .ok()
            .map(|c| format!("{}.{}", c.major, c.minor)),
    })
}

/// Measured GPU rates, with the PyTorch-comparable figures spelled out.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GpuRates {
    pub h2d_pinned: f64,
    pub d2h_pinned: f64,
    pub h2d_pageable: f64,
    pub d2h_pageable: f64,
    /// Both directions at once, pinned, total bytes per second.
    pub bidirectional_pinned: f64,
    /// Pinned host→device while the CPU attention runs on every core, and the CPU attention's
    /// FLOP/s meanwhile: whether the two share the host's memory (a diagnostic; the planner does
    /// not read it).
    pub h2d_pinned_with_cpu_attention: f64,
    pub cpu_attention_with_h2d: f64,
    /// Device-to-device copy, bytes read + written per second.
    pub hbm: f64,
    pub gemm: f64,
    pub attention: f64,
}

fn ms(a: &cuda::CudaEvent, b: &cuda::CudaEvent) -> Result<f64, CudaError> {
    Ok(f64::from(a.elapsed_ms(b)?) / 1e3)
}

/// Runs `f` once to warm up, then `reps` times between two events on `stream`; best seconds per run.
fn time_on(
    stream: &Arc<cuda::CudaStream>,
    reps: usize,
    mut f: impl FnMut() -> Result<(), CudaError>,
) -> Result<f64, CudaError> {
    f()?;
    stream.synchronize()?;
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let a = cuda::timing_event(stream)?;
        f()?;
        let b = cuda::timing_event(stream)?;
        b.synchronize()?;
        best = best.min(ms(&a, &b)?);
    }
    Ok(best)
}

/// Runs `f` back to back on `stream` for about `secs` to bring the GPU to the clock it holds under
/// sustained load, then for about `secs` more between two events: seconds per run, averaged over
/// that window. A prefill runs GEMMs for tens of seconds, at the power-limited clock, not at the
/// boost clock that a best-of-few timing of one GEMM sees (a quarter faster on the H200).
fn time_sustained(
    stream: &Arc<cuda::CudaStream>,
    secs: f64,
    mut f: impl FnMut() -> Result<(), CudaError>,
) -> Result<f64, CudaError> {
    let one = time_on(stream, 1, &mut f)?;
    #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "a small count")]
    let n = ((secs / one.max(1e-6)).ceil() as usize).clamp(1, 100_000);
    for _ in 0..n {
        f()?;
    }
    let a = cuda::timing_event(stream)?;
    for _ in 0..n {
        f()?;
    }
    let b = cuda::timing_event(stream)?;
    b.synchronize()?;
    #[expect(clippy::cast_precision_loss, reason = "a small count")]
    Ok(ms(&a, &b)? / n as f64)
}

/// Measures every rate on device 0.
pub fn rates(mode: Mode) -> Result<(Arc<CudaContext>, GpuRates), CudaError> {
    let ctx = cuda::open(0)?;
    let reps = if mode == Mode::Quick { 2 } else { 5 };
    let bytes: usize = if mode == Mode::Quick { 256 << 20 } else { 1 << 30 };
    let up = ctx.new_stream()?;
    let down = ctx.new_stream()?;
    let mut pinned = cuda::alloc_pinned(&ctx, bytes)?;
    pinned.as_mut_slice()?.fill(1);
    let mut pinned2 = cuda::alloc_pinned(&ctx, bytes)?;
    let pageable = vec![1u8; bytes];
    let mut pageable_back = vec![0u8; bytes];
    let mut dev: CudaSlice<u8> = up.alloc_zeros(bytes)?;
    let dev2: CudaSlice<u8> = down.alloc_zeros(bytes)?;
    let b = bytes as f64;
    let h2d_pinned = b / time_on(&up, reps, || Ok(up.memcpy_htod(&pinned, &mut dev)?))?;
    let d2h_pinned = b / time_on(&down, reps, || Ok(down.memcpy_dtoh(&dev2, &mut pinned2)?))?;
    let h2d_pageable = b / time_on(&up, reps, || Ok(up.memcpy_htod(&pageable, &mut dev)?))?;
    let d2h_pageable =
        b / time_on(&down, reps, || Ok(down.memcpy_dtoh(&dev2, &mut pageable_back)?))?;
    // Both directions at once: start both streams after one event, time until both finish.
    let bidirectional_pinned = {
        up.synchronize()?;
        down.synchronize()?;
        let mut best = f64::INFINITY;
        for _ in 0..reps {
            let start = cuda::timing_event(&up)?;
            down.wait(&start)?;
            up.memcpy_htod(&pinned, &mut dev)?;
            down.memcpy_dtoh(&dev2, &mut pinned2)?;
            up.join(&down)?;
            let end = cuda::timing_event(&up)?;
            end.synchronize()?;
            best = best.min(ms(&start, &end)?);
        }
        2.0 * b / best
    };
    let (h2d_pinned_with_cpu_attention, cpu_attention_with_h2d) =
        contended(&up, reps, (&pinned, &mut dev), mode)?;
    let hbm = 2.0 * b / time_on(&up, reps, || Ok(up.memcpy_dtod(&dev2, &mut dev)?))?;
    drop((dev, dev2, pinned, pinned2));

    // fp16 GEMM at decoder shapes: tokens × hidden · (4·hidden × hidden)ᵀ.
    let compute = ctx.new_stream()?;
    let blas = cuda::blas(&compute)?;
    let (m, n, k) = if mode == Mode::Quick { (4096, 4096, 4096) } else { (8192, 4 * 7168, 7168) };
    let a: CudaSlice<f16> = compute.alloc_zeros(m * k)?;
    let w: CudaSlice<f16> = compute.alloc_zeros(n * k)?;
    let mut c: CudaSlice<f16> = compute.alloc_zeros(m * n)?;
    let a = fill(&compute, a)?;
    let w = fill(&compute, w)?;
    // Sustained for a second in full mode (a prefill's GEMMs run for many).
    let hold = if mode == Mode::Quick { 0.05 } else { 1.0 };
    let secs =
        time_sustained(&compute, hold, || cuda::gemm_f16_nt(&blas, m, n, k, &a, &w, &mut c))?;
    let gemm = 2.0 * (m * n * k) as f64 / secs;
    drop((a, w, c));
    // Prefill attention scores: (batch·heads) × s × s × head_dim.
    let (bh, s, hd) = if mode == Mode::Quick { (256, 512, 128) } else { (32 * 56, 512, 128) };
    let q: CudaSlice<f16> = fill(&compute, compute.alloc_zeros(bh * s * hd)?)?;
    let kk: CudaSlice<f16> = fill(&compute, compute.alloc_zeros(bh * s * hd)?)?;
    let mut sc: CudaSlice<f16> = compute.alloc_zeros(bh * s * s)?;
    let secs = time_sustained(&compute, hold, || {
        cuda::gemm_f16_nt_batched(&blas, bh, s, s, hd, &q, &kk, &mut sc)
    })?;
    let attention = 2.0 * (bh * s * s * hd) as f64 / secs;
    Ok((
        ctx,
        GpuRates {
            h2d_pinned,
            d2h_pinned,
            h2d_pageable,
            d2h_pageable,
            bidirectional_pinned,
            h2d_pinned_with_cpu_attention,
            cpu_attention_with_h2d,
            hbm,
            gemm,
            attention,
        },
    ))
}

/// Pinned host→device copies of `src` into `dst`, `reps` + 1 of them back to back, while the CPU
/// attention runs in a loop on every core (as a decode step with CPU attention and weights
/// streaming from the CPU does): the copies' bytes per second and the attention's FLOP/s over the
/// same window.
fn contended(
    up: &Arc<cuda::CudaStream>,
    reps: usize,
    (src, dst): (&cuda::PinnedHostSlice<u8>, &mut CudaSlice<u8>),
    mode: Mode,
) -> Result<(f64, f64), CudaError> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut attention = crate::CpuAttention::new(mode);
    attention.run(); // pages touched, threads started
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let worker = s.spawn(|| {
            let (t, mut calls) = (std::time::Instant::now(), 0u32);
            while !stop.load(Ordering::Relaxed) {
                attention.run();
                calls += 1;
            }
            f64::from(calls) * attention.flops() / t.elapsed().as_secs_f64()
        });
        let copies = (|| {
            let start = cuda::timing_event(up)?;
            for _ in 0..=reps {
                up.memcpy_htod(src, dst)?;
            }
            let end = cuda::timing_event(up)?;
            end.synchronize()?;
            Ok((reps + 1) as f64 * src.len() as f64 / ms(&start, &end)?)
        })();
        stop.store(true, Ordering::Relaxed);
        let flops = worker.join().unwrap_or(0.0);
        copies.map(|bytes_per_s| (bytes_per_s, flops))
    })
}

/// Small non-zero values (GEMMs on zeros run faster than on real data).
fn fill(
    stream: &Arc<cuda::CudaStream>,
    mut buf: CudaSlice<f16>,
) -> Result<CudaSlice<f16>, CudaError> {
    // Pseudo-random values in ±0.1, as dummy random weights are: the tensor cores draw more
    // power, and so run slower, on varied bits than on a short repeating pattern.
    let host: Vec<f16> = (0..buf.len() as u64)
        .map(|i| {
            let u = (i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as f32;
            f16::from_f32((u / (1u64 << 24) as f32 - 0.5) / 5.0)
        })
        .collect();
    stream.memcpy_htod(&host, &mut buf)?;
    Ok(buf)
}

/// The links between the host and several GPUs (issue 18): pinned host→device copies on every
/// GPU at once, each GPU from its own thread, buffer and stream (the bytes of all of them per
/// second of the slowest: where the GPUs share the host's links this is less than `count` times
/// one GPU's rate), and device 0 → device 1 copies. Both `None` with one GPU.
pub fn links(count: u32, mode: Mode) -> Result<(Option<f64>, Option<f64>), CudaError> {
    if count < 2 {
        return Ok((None, None));
    }
    let reps = if mode == Mode::Quick { 2 } else { 5 };
    let bytes: usize = if mode == Mode::Quick { 256 << 20 } else { 1 << 30 };
    let n = count as usize;
    let barrier = std::sync::Barrier::new(n);
    let secs: Vec<Result<f64, CudaError>> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..n)
            .map(|i| {
                let barrier = &barrier;
                s.spawn(move || -> Result<f64, CudaError> {
                    let setup = (|| {
                        let ctx = cuda::open(i)?;
                        let st = ctx.new_stream()?;
                        let mut pinned = cuda::alloc_pinned(&ctx, bytes)?;
                        pinned.as_mut_slice()?.fill(1);
                        let mut dev: CudaSlice<u8> = st.alloc_zeros(bytes)?;
                        st.memcpy_htod(&pinned, &mut dev)?;
                        st.synchronize()?;
                        Ok::<_, CudaError>((st, pinned, dev))
                    })();
                    // Every thread reaches the barrier, set up or not, so none waits forever.
                    barrier.wait();
                    let (st, pinned, mut dev) = setup?;
                    let t = std::time::Instant::now();
                    for _ in 0..reps {
                        st.memcpy_htod(&pinned, &mut dev)?;
                    }
                    st.synchronize()?;
                    Ok(t.elapsed().as_secs_f64())
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().expect("a copy thread panicked")).collect()
    });
    let mut slowest = 0f64;
    for r in secs {
        slowest = slowest.max(r?);
    }
    #[expect(clippy::cast_precision_loss, reason = "a rate")]
    let all = (n * reps * bytes) as f64 / slowest;
    // Device 0 → device 1 (peer access as the driver sets it up).
    let (c0, c1) = (cuda::open(0)?, cuda::open(1)?);
    let (s0, s1) = (c0.new_stream()?, c1.new_stream()?);
    let src: CudaSlice<u8> = s0.alloc_zeros(bytes)?;
    let dst: CudaSlice<u8> = s1.alloc_zeros(bytes)?;
    s1.synchronize()?;
    let (src_ptr, dst_ptr) =
        (flexgen_tensor::cuda::exec::addr(&src), flexgen_tensor::cuda::exec::addr(&dst));
    let peer = || -> Result<(), CudaError> {
        // SAFETY: both buffers hold `bytes` and live until the stream is synchronized below.
        unsafe { cuda::copy_peer(&s0, (dst_ptr, &c1), (src_ptr, &c0), bytes) }
    };
    peer()?;
    s0.synchronize()?;
    let t = std::time::Instant::now();
    for _ in 0..reps {
        peer()?;
    }
    s0.synchronize()?;
    #[expect(clippy::cast_precision_loss, reason = "a rate")]
    let p2p = (reps * bytes) as f64 / t.elapsed().as_secs_f64();
    Ok((Some(all), Some(p2p)))
}

/// The profile section for the planner (`links`: [`links`]' rates).
pub fn profile_section(
    inv: &GpuInventory,
    r: &GpuRates,
    mem_limit: Option<u64>,
    (all, p2p): (Option<f64>, Option<f64>),
) -> GpuProfile {
    GpuProfile {
        name: inv.name.clone(),
        memory_bytes: mem_limit.map_or(inv.memory_total_bytes, |l| l.min(inv.memory_total_bytes)),
        pcie: inv.pcie.clone(),
        h2d_pinned_bytes_per_s: r.h2d_pinned,
        d2h_pinned_bytes_per_s: r.d2h_pinned,
        h2d_pageable_bytes_per_s: r.h2d_pageable,
        gemm_flops_per_s: r.gemm,
        attention_flops_per_s: r.attention,
        // A copy reads and writes every byte; a GEMM streaming weights only reads.
        hbm_bytes_per_s: r.hbm,
        count: inv.count,
        h2d_pinned_all_bytes_per_s: all,
        p2p_bytes_per_s: p2p,
        compute_capability: inv.compute_capability.clone(),
    }
}
