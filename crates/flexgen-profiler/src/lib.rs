//! Hardware probes that produce a [`HardwareProfile`]: inventory of the CPU, memory and the offload
//! directory's file system (sysinfo), CPU GEMM and CPU-attention rates (the CPU backend's own
//! kernels), and sequential disk write/read bandwidth in the offload directory with direct I/O
//! (`O_DIRECT`, so the page cache cannot serve the reads). The temporary file is removed when the
//! probe ends, also on error; the binary removes it on Ctrl-C too.
//!
//! GPU probes (`gpu.rs`): NVML inventory, pinned/pageable copies both ways and both at once, device
//! memory bandwidth, fp16 GEMM and batched attention with cuBLAS. Without a GPU, NVML or the CUDA
//! libraries, the profile records no GPU and says why.

pub mod gpu;

use std::path::{Path, PathBuf};
use std::time::Instant;

use flexgen_policy::{CpuProfile, DiskProfile, HardwareProfile, PROFILE_VERSION};
use flexgen_tensor::host::{AlignedBuf, DirectFile};
use flexgen_tensor::{Device, Tensor};

/// Errors from probing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("system inventory: {0}")]
    Inventory(String),
    #[error("CPU probe: {0}")]
    Tensor(#[from] flexgen_tensor::Error),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How long to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Seconds: small sizes, one repetition.
    Quick,
    /// Sizes that reach steady state, several repetitions.
    Full,
}

impl Mode {
    fn disk_bytes(self) -> usize {
        match self {
            Mode::Quick => 64 << 20,
            Mode::Full => 1 << 30,
        }
    }
    fn gemm_n(self) -> usize {
        match self {
            Mode::Quick => 256,
            Mode::Full => 1024,
        }
    }
    fn reps(self) -> usize {
        match self {
            Mode::Quick => 1,
            Mode::Full => 3,
        }
    }
}

/// The probes in order, for progress reporting.
pub const STEPS: [&str; 5] = ["inventory", "cpu gemm", "cpu attention", "disk", "gpu"];

/// What to profile.
#[derive(Debug, Clone)]
pub struct Options {
    pub mode: Mode,
    /// Where the disk tier would live; probed and recorded.
    pub offload_dir: PathBuf,
    /// Name written into the profile.
    pub name: String,
    /// Record at most this much GPU memory (to plan for a smaller card).
    pub gpu_mem_limit_bytes: Option<u64>,
}

/// Everything one run measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub profile: HardwareProfile,
    pub inventory: Inventory,
    /// Whether the disk was measured with direct I/O.
    pub direct_io: bool,
    pub gpu_inventory: Option<gpu::GpuInventory>,
    pub gpu_rates: Option<gpu::GpuRates>,
    /// Why there is no GPU section, when there is none.
    pub no_gpu_reason: Option<String>,
}

/// Host facts that need no timing.
#[derive(Debug, Clone, PartialEq)]
pub struct Inventory {
    pub cpu_model: String,
    pub cores: u32,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    /// File system and free space of the offload directory's mount.
    pub fs_type: String,
    pub disk_free_bytes: u64,
}

/// Reads CPU, memory and the offload directory's file system.
pub fn inventory(offload_dir: &Path) -> Result<Inventory> {
    let mut sys = sysinfo::System::new().map_err(|e| Error::Inventory(e.to_string()))?;
    sys.refresh_memory();
    sys.refresh_cpu_all();
    let cpu_model =
        sys.cpus().first().map_or_else(|| "unknown".into(), |c| c.brand().trim().to_string());
    let cores = u32::try_from(sys.cpus().len()).unwrap_or(u32::MAX).max(1);
    let disks =
        sysinfo::Disks::new_with_refreshed_list().map_err(|e| Error::Inventory(e.to_string()))?;
    let dir = std::fs::canonicalize(offload_dir).unwrap_or_else(|_| offload_dir.to_path_buf());
    let mount = disks
        .iter()
        .filter(|d| dir.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len());
    Ok(Inventory {
        cpu_model,
        cores,
        memory_total_bytes: sys.total_memory(),
        memory_available_bytes: sys.available_memory(),
        fs_type: mount
            .map_or_else(|| "unknown".into(), |d| d.file_system().to_string_lossy().into_owned()),
        disk_free_bytes: mount.map_or(0, sysinfo::Disk::available_space),
    })
}

fn best_of<T>(reps: usize, mut f: impl FnMut() -> Result<(f64, T)>) -> Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        best = best.min(f()?.0);
    }
    Ok(best)
}

/// fp32 GEMM rate of the CPU backend (FLOP/s) on `n × n × n`.
pub fn cpu_gemm_flops(mode: Mode) -> Result<f64> {
    let n = mode.gemm_n();
    let a = Tensor::ones((n, n), flexgen_tensor::DType::F32, &Device::Cpu)?;
    let b = Tensor::ones((n, n), flexgen_tensor::DType::F32, &Device::Cpu)?;
    let _ = a.matmul(&b)?; // warm-up
    let secs = best_of(mode.reps(), || {
        let t = Instant::now();
        let c = a.matmul(&b)?;
        Ok((t.elapsed().as_secs_f64(), c))
    })?;
    Ok(2.0 * (n as f64).powi(3) / secs)
}

/// One decode attention call on the CPU: the runtime's own CPU attention
/// (`flexgen_tensor::host_attention`) over an fp16 cache of `rows` (sequence, head) rows of `s`
/// positions of `hd` values, one new query per row, counted as 4·rows·s·hd FLOPs (the planner's
/// measure). The cache is larger than a processor's caches, so the rate is memory-bound, as it is
/// in a real decode step.
pub(crate) struct CpuAttention {
    k: Vec<half::f16>,
    v: Vec<half::f16>,
    q: Vec<half::f16>,
    out: Vec<half::f16>,
    starts: Vec<i32>,
    d: flexgen_tensor::host_attention::Dims,
}

impl CpuAttention {
    /// The probe's shape: rows of `s` positions and one new one.
    fn new_dims(mode: Mode) -> flexgen_tensor::host_attention::Dims {
        let (rows, s, hd) = match mode {
            Mode::Quick => (512, 512, 128),
            Mode::Full => (2048, 1024, 128),
        };
        flexgen_tensor::host_attention::Dims {
            rows,
            hd,
            cap: s + 1,
            past: s,
            nkv: 1,
            rep: 1,
            row0: 0,
        }
    }

    pub(crate) fn new(mode: Mode) -> Self {
        use half::f16;
        let d = Self::new_dims(mode);
        let (rows, cap, hd) = (d.rows, d.cap, d.hd);
        Self {
            k: vec![f16::from_f32(0.01); rows * cap * hd],
            v: vec![f16::ONE; rows * cap * hd],
            q: vec![f16::from_f32(0.1); rows * hd],
            out: vec![f16::ZERO; rows * hd],
            starts: vec![0i32; rows],
            d,
        }
    }

    /// FLOPs of one call.
    pub(crate) fn flops(&self) -> f64 {
        attention_flops(&self.d)
    }

    pub(crate) fn run(&mut self) {
        let Self { k, v, q, out, starts, d } = self;
        flexgen_tensor::host_attention::decode(q, q, q, k, v, out, starts, *d);
    }
}

/// [`CpuAttention`]'s rows as a 4-bit packed cache (groups of 64 along the head dimension, as the
/// CUDA executor packs one): `host_attention::decode_packed`, counted with the same FLOPs.
pub(crate) struct PackedCpuAttention {
    codes: [Vec<u8>; 2],
    params: [Vec<half::f16>; 2],
    q: Vec<half::f16>,
    out: Vec<half::f16>,
    starts: Vec<i32>,
    d: flexgen_tensor::host_attention::Dims,
    p: flexgen_tensor::host_attention::Packing,
}

impl PackedCpuAttention {
    pub(crate) fn new(mode: Mode) -> Self {
        use half::f16;
        let d = CpuAttention::new_dims(mode);
        let p = flexgen_tensor::host_attention::Packing { group: 64, bits: 4 };
        let (code_b, par) = p.per_position(d.hd);
        let codes: Vec<u8> =
            (0..d.rows * d.cap * code_b).map(|i| (i * 37).to_le_bytes()[0]).collect();
        let params: Vec<f16> = (0..d.rows * d.cap * par)
            .map(|i| f16::from_f32(if i % 2 == 0 { -0.1 } else { 0.01 }))
            .collect();
        Self {
            codes: [codes.clone(), codes],
            params: [params.clone(), params],
            q: vec![f16::from_f32(0.1); d.rows * d.hd],
            out: vec![f16::ZERO; d.rows * d.hd],
            starts: vec![0i32; d.rows],
            d,
            p,
        }
    }

    pub(crate) fn run(&mut self) {
        use flexgen_tensor::host_attention::{PackedRows, decode_packed};
        let Self { codes: [ck, cv], params: [pk, pv], q, out, starts, d, p } = self;
        let (k, v) = (PackedRows { codes: ck, params: pk }, PackedRows { codes: cv, params: pv });
        decode_packed(q, q, q, k, v, out, starts, *d, *p);
    }
}

/// FLOPs of one decode attention call over `d`'s rows (the planner's measure: 4·rows·s·hd).
fn attention_flops(d: &flexgen_tensor::host_attention::Dims) -> f64 {
    4.0 * (d.rows * d.cap * d.hd) as f64
}

/// The rate (FLOP/s) of `run`, a decode attention call over `d`'s rows: once to warm up (pages
/// touched, threads started), then the best of the mode's repetitions.
fn attention_rate(
    mode: Mode,
    d: &flexgen_tensor::host_attention::Dims,
    mut run: impl FnMut(),
) -> Result<f64> {
    run();
    let secs = best_of(mode.reps().max(2), || {
        let t = Instant::now();
        run();
        Ok((t.elapsed().as_secs_f64(), ()))
    })?;
    Ok(attention_flops(d) / secs)
}

/// Rate of decode attention on the CPU (FLOP/s), [`CpuAttention`] alone on every core.
pub fn cpu_attention_flops(mode: Mode) -> Result<f64> {
    let mut a = CpuAttention::new(mode);
    let d = a.d;
    attention_rate(mode, &d, || a.run())
}

/// Rate of decode attention on the CPU over a 4-bit packed cache (FLOP/s, counted as over fp16
/// rows), [`PackedCpuAttention`] alone on every core.
pub fn cpu_packed_attention_flops(mode: Mode) -> Result<f64> {
    let mut a = PackedCpuAttention::new(mode);
    let d = a.d;
    attention_rate(mode, &d, || a.run())
}

/// The name of the probe's temporary file in `dir` (removed as soon as it is opened).
fn disk_probe_path(dir: &Path) -> PathBuf {
    dir.join(format!(".flexgen-disk-probe-{}", std::process::id()))
}

/// Sequential write and read bandwidth (bytes/s) in `dir`, and whether direct I/O was used.
/// Falls back to buffered I/O with `fsync` and page-cache eviction where the file system refuses
/// `O_DIRECT` (tmpfs). The probe file's name is removed as soon as it is opened, so no way out
/// of the process leaves it behind.
pub fn disk_bandwidth(dir: &Path, mode: Mode) -> Result<(f64, f64, bool)> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io { path: dir.to_path_buf(), source })?;
    let path = disk_probe_path(dir);
    let io = |source| Error::Io { path: path.clone(), source };
    let file = DirectFile::create(&path).map_err(io)?;
    let chunk = 16 << 20;
    let total = mode.disk_bytes().max(chunk);
    let mut buf = AlignedBuf::new(chunk);
    for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
        *b = u8::try_from(i % 251).unwrap_or(0);
    }
    let t = Instant::now();
    let mut written = 0;
    while written < total {
        file.write_buf_at(written as u64, &buf).map_err(io)?;
        written += chunk;
    }
    file.sync().map_err(io)?;
    let write_s = t.elapsed().as_secs_f64();
    if !file.is_direct() {
        file.drop_cache();
    }
    let t = Instant::now();
    let mut read = 0;
    while read < total {
        file.read_buf_at(read as u64, &mut buf).map_err(io)?;
        read += chunk;
    }
    let read_s = t.elapsed().as_secs_f64();
    Ok((written as f64 / write_s, read as f64 / read_s, file.is_direct()))
}

/// Runs every probe; `progress(step_index)` is called before each of [`STEPS`].
pub fn profile(opts: &Options, progress: &mut dyn FnMut(usize)) -> Result<Report> {
    progress(0);
    let inv = inventory(&opts.offload_dir)?;
    progress(1);
    let gemm = cpu_gemm_flops(opts.mode)?;
    progress(2);
    let attn = cpu_attention_flops(opts.mode)?;
    let packed_attn = cpu_packed_attention_flops(opts.mode)?;
    progress(3);
    let (write, read, direct) = disk_bandwidth(&opts.offload_dir, opts.mode)?;
    progress(4);
    let (gpu_section, gpu_inventory, gpu_rates, no_gpu_reason) = match gpu::inventory() {
        Err(why) => (None, None, None, Some(why)),
        Ok(ginv) => match gpu::rates(opts.mode)
            .and_then(|(_ctx, r)| Ok((r, gpu::links(ginv.count, opts.mode)?)))
        {
            Ok((r, links)) => (
                Some(gpu::profile_section(&ginv, &r, opts.gpu_mem_limit_bytes, links)),
                Some(ginv),
                Some(r),
                None,
            ),
            Err(e) => (None, Some(ginv), None, Some(e.to_string())),
        },
    };
    let profile = HardwareProfile {
        version: PROFILE_VERSION,
        name: opts.name.clone(),
        source: format!(
            "flexgen-profile {} ({} mode){}",
            env!("CARGO_PKG_VERSION"),
            if opts.mode == Mode::Quick { "quick" } else { "full" },
            if direct { "" } else { "; disk measured with buffered I/O (O_DIRECT refused)" }
        ),
        gpu: gpu_section,
        cpu: CpuProfile {
            model: inv.cpu_model.clone(),
            cores: inv.cores,
            memory_bytes: inv.memory_available_bytes,
            gemm_flops_per_s: gemm,
            attention_flops_per_s: attn,
            packed_attention_flops_per_s: Some(packed_attn),
        },
        disk: DiskProfile {
            path: opts.offload_dir.clone(),
            capacity_bytes: inv.disk_free_bytes,
            read_bytes_per_s: read,
            write_bytes_per_s: write,
        },
    };
    Ok(Report {
        profile,
        inventory: inv,
        direct_io: direct,
        gpu_inventory,
        gpu_rates,
        no_gpu_reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_profile_measures_cpu_and_disk_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let mut steps = Vec::new();
        let opts = Options {
            mode: Mode::Quick,
            offload_dir: dir.path().to_path_buf(),
            name: "test".into(),
            gpu_mem_limit_bytes: None,
        };
        let report = profile(&opts, &mut |s| steps.push(s)).unwrap();
        let (p, inv) = (report.profile, report.inventory);
        assert_eq!(steps, [0, 1, 2, 3, 4]);
        // Either a GPU was measured, or the report says why not.
        assert_eq!(p.gpu.is_none(), report.no_gpu_reason.is_some());
        p.validate().unwrap();
        assert!(inv.memory_total_bytes >= inv.memory_available_bytes && inv.memory_total_bytes > 0);
        assert!(p.cpu.gemm_flops_per_s > 1e6 && p.disk.read_bytes_per_s > 1e5);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "probe file left behind");
        let back = HardwareProfile::from_toml_str(&p.to_toml()).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn unwritable_offload_dir_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain-file");
        std::fs::write(&file, b"x").unwrap();
        let Err(Error::Io { path, .. }) = disk_bandwidth(&file.join("sub"), Mode::Quick) else {
            panic!()
        };
        assert!(path.starts_with(&file));
    }
}
