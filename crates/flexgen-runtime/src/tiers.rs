//! The tiers of the offloading executor: where each weight, KV-cache and activation byte lives,
//! how much each tier must hold (checked before anything is allocated), and the bytes that cross
//! between tiers during a run.
//!
//! Placement rule (docs/policy-format.md): shares mean what they say.
//! - Weights: every tensor of every layer is split by elements, in flat order: the first
//!   `gpu` percent on the GPU, the next `cpu` percent on the CPU, the rest on disk (one file in
//!   `offload_dir`, read with direct I/O). The same split holds in every layer.
//! - KV cache: each micro-batch's (sequence, head) rows are split: the first `gpu` percent of them
//!   on the GPU, the next `cpu` percent on the CPU, the rest on disk (cumulative rounding, so the
//!   counts add up; the original splits the same `batch × heads` axis, in whole sequences).
//! - Activations live whole on one tier.
//! - Compression (`compress_weight`, `compress_cache`): weight matrices are quantized once here
//!   (vectors stay as they are, as in the original) and their packed bytes are what the tiers
//!   hold and move; the cache's new positions are quantized as they are stored and the rows
//!   dequantized when gathered, so every tier holds and moves packed bytes. Layout and error
//!   bound: `flexgen_tensor::quant`, docs/compression.md.
//!
//! On the CPU executor the compute device is the CPU and the "GPU" tier is host memory with a
//! budget; the disk tier is real. Embedding tables and the LM head stay on the compute device.

use std::path::{Path, PathBuf};

use flexgen_model::LayerWeights;
use flexgen_model::layers::Kv;
use flexgen_policy::{Compression, Policy, Tier, TierShares};
use flexgen_tensor::host::{DirectFile, align_up};
use flexgen_tensor::quant::{self, Packed, QuantSpec, packed_len};
use flexgen_tensor::{Device, Tensor};

use crate::{Error, Result};

const TIERS: [Tier; 3] = [Tier::Gpu, Tier::Cpu, Tier::Disk];

/// The quantization a policy's compression setting asks for (`None` when off).
pub(crate) fn quant_spec(c: &Compression) -> Option<QuantSpec> {
    c.enabled.then_some(QuantSpec {
        bits: c.bits,
        group: c.group_size as usize,
        dim: c.group_dim as usize,
    })
}

/// A packed tensor as bytes: codes, then (min, scale) pairs as little-endian fp16.
fn to_blob(p: &Packed) -> Vec<u8> {
    let mut out = p.data.clone();
    out.extend(p.params.iter().flat_map(|v| v.to_le_bytes()));
    out
}

/// The inverse of [`to_blob`] for a tensor of `shape`.
fn from_blob(bytes: &[u8], shape: &[usize], spec: QuantSpec) -> Packed {
    let (data, params) = packed_len(shape, spec);
    assert_eq!(bytes.len(), data + params, "a whole packed tensor");
    let params =
        bytes[data..].chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]])).collect();
    Packed { shape: shape.to_vec(), spec, data: bytes[..data].to_vec(), params }
}

/// The f32 tensor a packed one stands for.
fn unpack(p: &Packed, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(quant::dequantize(p), p.shape.clone(), device)?)
}

/// Packs `t` by `spec`.
fn pack(t: &Tensor, spec: QuantSpec) -> Result<Packed> {
    Ok(quant::quantize(&t.flatten_all()?.to_vec1::<f32>()?, t.dims(), spec))
}

/// Bytes that crossed between tiers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    pub cpu_to_gpu: u64,
    pub gpu_to_cpu: u64,
    pub disk_read: u64,
    pub disk_write: u64,
}

impl Traffic {
    pub(crate) fn add(&mut self, o: Traffic) {
        self.cpu_to_gpu += o.cpu_to_gpu;
        self.gpu_to_cpu += o.gpu_to_cpu;
        self.disk_read += o.disk_read;
        self.disk_write += o.disk_write;
    }
}

/// Bytes per tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierBytes {
    pub gpu: u64,
    pub cpu: u64,
    pub disk: u64,
}

/// What each tier may hold; `None` = unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Budgets {
    pub gpu_bytes: Option<u64>,
    pub cpu_bytes: Option<u64>,
    pub disk_bytes: Option<u64>,
}

/// `n` items split by `shares` into (GPU, CPU, disk) counts that add up to `n`.
pub fn split_counts(n: usize, shares: &TierShares) -> [usize; 3] {
    #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "0 ≤ share·n ≤ n")]
    let upto = |pct: f64| ((n as f64 * pct / 100.0).round() as usize).min(n);
    let g = upto(shares.gpu);
    let gc = upto(shares.gpu + shares.cpu).max(g);
    [g, gc - g, n - gc]
}

impl TierBytes {
    fn get(&self, t: Tier) -> u64 {
        match t {
            Tier::Gpu => self.gpu,
            Tier::Cpu => self.cpu,
            Tier::Disk => self.disk,
        }
    }
}

/// Refuses a run whose tiers cannot hold what it needs, naming the tier, both sizes and the fix.
pub(crate) fn check(need: &TierBytes, budgets: &Budgets) -> Result<()> {
    for (tier, have, fix) in [
        (
            Tier::Gpu,
            budgets.gpu_bytes,
            "lower gpu_batch_size or move weights/kv_cache off the GPU (placement.*.gpu)",
        ),
        (
            Tier::Cpu,
            budgets.cpu_bytes,
            "move shares to disk (placement.*.disk, offload_dir) or lower the block size",
        ),
        (Tier::Disk, budgets.disk_bytes, "free space in offload_dir or move shares to the CPU"),
    ] {
        if let Some(have) = have
            && need.get(tier) > have
        {
            return Err(Error::Capacity {
                tier,
                needed_bytes: need.get(tier),
                available_bytes: have,
                detail: String::new(),
                fix,
            });
        }
    }
    Ok(())
}

/// A scratch file in the offload directory, with a bump allocator of aligned slots.
struct Scratch {
    file: DirectFile,
    next: u64,
}

impl Scratch {
    fn create(dir: &Path, what: &str) -> Result<Self> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, &e))?;
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("flexgen-{what}-{}-{n}.bin", std::process::id()));
        let file = DirectFile::create(&path).map_err(|e| io_err(&path, &e))?;
        Ok(Self { file, next: 0 })
    }

    fn slot(&mut self, bytes: usize) -> u64 {
        let at = self.next;
        self.next += align_up(bytes) as u64;
        at
    }

    fn write_f32(&self, at: u64, data: &[f32]) -> Result<()> {
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.file.write_at(at, &bytes).map_err(|e| io_err(self.file.path(), &e))
    }

    fn write_bytes(&self, at: u64, data: &[u8]) -> Result<()> {
        self.file.write_at(at, data).map_err(|e| io_err(self.file.path(), &e))
    }

    fn read_bytes(&self, at: u64, len: usize) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.file.read_at(at, len, &mut out).map_err(|e| io_err(self.file.path(), &e))?;
        Ok(out)
    }

    fn read_f32(&self, at: u64, elems: usize) -> Result<Vec<f32>> {
        let mut bytes = Vec::new();
        self.file.read_at(at, elems * 4, &mut bytes).map_err(|e| io_err(self.file.path(), &e))?;
        Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
}

/// An I/O error on `path`.
pub(crate) fn io_err(path: &Path, e: &std::io::Error) -> Error {
    Error::Io { path: PathBuf::from(path), message: e.to_string() }
}

enum Part {
    Mem(Tensor),
    Disk {
        at: u64,
        elems: usize,
    },
    /// Packed bytes of a quantized tensor, in memory or on disk.
    Bytes(Vec<u8>),
    DiskBytes {
        at: u64,
        len: usize,
    },
}

struct StoredTensor {
    shape: Vec<usize>,
    /// Set when the tensor is held packed.
    quant: Option<QuantSpec>,
    /// Flat segments in order, each with its tier.
    parts: Vec<(Tier, Part)>,
}

/// Every decoder layer's weights, split across the tiers.
pub(crate) struct WeightStore {
    layers: Vec<Vec<StoredTensor>>,
    scratch: Option<Scratch>,
}

impl WeightStore {
    /// Splits the weights of `layers` by `shares`; disk segments are written to `offload_dir`.
    pub(crate) fn build(
        layers_in: &[LayerWeights],
        shares: &TierShares,
        offload_dir: Option<&Path>,
        compress: Option<QuantSpec>,
    ) -> Result<Self> {
        let mut scratch = match (shares.disk > 0.0, offload_dir) {
            (true, Some(dir)) => Some(Scratch::create(dir, "weights")?),
            (true, None) => {
                return Err(Error::Policy(flexgen_policy::Error::Invalid {
                    field: "offload_dir".into(),
                    value: "(unset)".into(),
                    problem: "weights are placed on disk".into(),
                    fix: "set offload_dir".into(),
                }));
            }
            _ => None,
        };
        let mut layers = Vec::with_capacity(layers_in.len());
        for layer in layers_in {
            let mut stored = Vec::new();
            for t in layer.tensors() {
                if let Some(q) = compress.filter(|_| t.rank() >= 2) {
                    let blob = to_blob(&pack(t, q)?);
                    let counts = split_counts(blob.len(), shares);
                    let mut start = 0;
                    let mut parts = Vec::new();
                    for (tier, n) in TIERS.into_iter().zip(counts) {
                        if n == 0 {
                            continue;
                        }
                        let seg = &blob[start..start + n];
                        let part = if tier == Tier::Disk {
                            let s = scratch.as_mut().expect("disk share implies a scratch file");
                            let at = s.slot(n);
                            s.write_bytes(at, seg)?;
                            Part::DiskBytes { at, len: n }
                        } else {
                            Part::Bytes(seg.to_vec())
                        };
                        parts.push((tier, part));
                        start += n;
                    }
                    stored.push(StoredTensor { shape: t.dims().to_vec(), quant: Some(q), parts });
                    continue;
                }
                let flat = t.flatten_all()?;
                let counts = split_counts(t.elem_count(), shares);
                let mut start = 0;
                let mut parts = Vec::new();
                for (tier, n) in TIERS.into_iter().zip(counts) {
                    if n == 0 {
                        continue;
                    }
                    let seg = flat.narrow(0, start, n)?;
                    let part = match tier {
                        Tier::Disk => {
                            let s = scratch.as_mut().expect("disk share implies a scratch file");
                            let at = s.slot(n * 4);
                            s.write_f32(at, &seg.to_vec1::<f32>()?)?;
                            Part::Disk { at, elems: n }
                        }
                        _ => Part::Mem(seg.copy()?),
                    };
                    parts.push((tier, part));
                    start += n;
                }
                stored.push(StoredTensor { shape: t.dims().to_vec(), quant: None, parts });
            }
            layers.push(stored);
        }
        Ok(Self { layers, scratch })
    }

    /// Whether disk reads bypass the page cache (`None` without a disk share).
    pub(crate) fn direct_io(&self) -> Option<bool> {
        self.scratch.as_ref().map(|s| s.file.is_direct())
    }

    /// Layer `j` assembled on the compute device, with the bytes that had to move.
    pub(crate) fn load(
        &self,
        j: usize,
        template: &LayerWeights,
        device: &Device,
    ) -> Result<(LayerWeights, Traffic)> {
        let mut traffic = Traffic::default();
        let mut tensors = Vec::with_capacity(self.layers[j].len());
        for st in &self.layers[j] {
            if let Some(q) = st.quant {
                let mut bytes = Vec::new();
                for (tier, part) in &st.parts {
                    let n0 = bytes.len();
                    match part {
                        Part::Bytes(b) => bytes.extend_from_slice(b),
                        Part::DiskBytes { at, len } => {
                            let s = self.scratch.as_ref().expect("disk parts live in the scratch");
                            bytes.extend(s.read_bytes(*at, *len)?);
                            traffic.disk_read += *len as u64;
                        }
                        Part::Mem(_) | Part::Disk { .. } => {
                            unreachable!("packed tensors hold bytes")
                        }
                    }
                    if *tier != Tier::Gpu {
                        traffic.cpu_to_gpu += (bytes.len() - n0) as u64;
                    }
                }
                // Dequantized on the compute device just before use.
                tensors.push(unpack(&from_blob(&bytes, &st.shape, q), device)?);
                continue;
            }
            let mut segs = Vec::with_capacity(st.parts.len());
            for (tier, part) in &st.parts {
                let seg = match part {
                    Part::Mem(t) => t.clone(),
                    Part::Disk { at, elems } => {
                        let s = self.scratch.as_ref().expect("disk parts live in the scratch file");
                        traffic.disk_read += (*elems * 4) as u64;
                        Tensor::from_vec(s.read_f32(*at, *elems)?, *elems, device)?
                    }
                    Part::Bytes(_) | Part::DiskBytes { .. } => {
                        unreachable!("plain tensors hold f32")
                    }
                };
                if *tier != Tier::Gpu {
                    traffic.cpu_to_gpu += (seg.elem_count() * 4) as u64;
                }
                segs.push(seg);
            }
            let flat = if segs.len() == 1 {
                segs.pop().expect("one segment")
            } else {
                Tensor::cat(&segs, 0)?
            };
            tensors.push(flat.reshape(st.shape.clone())?);
        }
        Ok((template.with_tensors(tensors), traffic))
    }
}

/// The KV cache of one (layer, micro-batch), its (sequence, head) rows split across the tiers.
/// Parts are stored as `[rows, 1, positions, head_dim]`.
pub(crate) struct KvSlot {
    counts: [usize; 3],
    mem: [Option<Kv>; 2],
    /// With a compressed cache: the GPU and CPU parts as packed (k, v) chunks of positions.
    packed: [Vec<(Packed, Packed)>; 2],
    /// With a compressed cache: the disk part's chunks (offset, bytes of k or v, positions).
    disk_chunks: Vec<(u64, usize, usize)>,
    /// Disk part: slot offset and positions held.
    disk: Option<(u64, usize)>,
    /// (sequences, heads, head size) of the whole micro-batch.
    shape: (usize, usize, usize),
}

/// All KV slots of a block, with the scratch file of their disk parts.
pub(crate) struct KvStore {
    pub(crate) slots: Vec<Vec<KvSlot>>, // [layer][micro-batch]
    scratch: Option<Scratch>,
    cpu_attention: bool,
    /// Quantization of stored positions (groups along the head dimension).
    quant: Option<QuantSpec>,
}

impl KvStore {
    /// Slots for `batch_sizes` micro-batches of up to `max_len` positions in `layers` layers.
    pub(crate) fn new(
        layers: usize,
        batch_sizes: &[usize],
        max_len: usize,
        heads: usize,
        head_dim: usize,
        policy: &Policy,
    ) -> Result<Self> {
        let shares = &policy.placement.kv_cache;
        let mut scratch = None;
        let mut slots = Vec::with_capacity(layers);
        for _ in 0..layers {
            let mut row = Vec::with_capacity(batch_sizes.len());
            for &b in batch_sizes {
                let counts = split_counts(b * heads, shares);
                let disk = if counts[2] > 0 {
                    let dir = policy.offload_dir.as_deref().ok_or_else(|| {
                        Error::Policy(flexgen_policy::Error::Invalid {
                            field: "offload_dir".into(),
                            value: "(unset)".into(),
                            problem: "the KV cache is placed on disk".into(),
                            fix: "set offload_dir".into(),
                        })
                    })?;
                    if scratch.is_none() {
                        scratch = Some(Scratch::create(dir, "kv")?);
                    }
                    let s = scratch.as_mut().expect("created above");
                    // A compressed cache appends packed chunks as they come instead.
                    let plain = if policy.compress_cache.enabled { 0 } else { max_len };
                    Some((s.slot(2 * counts[2] * plain * head_dim * 4), 0))
                } else {
                    None
                };
                row.push(KvSlot {
                    counts,
                    mem: [None, None],
                    packed: [Vec::new(), Vec::new()],
                    disk_chunks: Vec::new(),
                    disk,
                    shape: (b, heads, head_dim),
                });
            }
            slots.push(row);
        }
        // Our rows are [rows, 1, positions, head_dim]: the head dimension is 3.
        let quant = quant_spec(&policy.compress_cache).map(|q| QuantSpec { dim: 3, ..q });
        Ok(Self { slots, scratch, cpu_attention: policy.cpu_cache_compute, quant })
    }

    /// The past keys/values of (`j`, `k`) gathered for attention, `None` before the first step.
    pub(crate) fn gather(
        &self,
        j: usize,
        k: usize,
        device: &Device,
        traffic: &mut Traffic,
    ) -> Result<Option<Kv>> {
        let slot = &self.slots[j][k];
        let mut parts: Vec<Kv> = Vec::new();
        if let Some(q) = self.quant {
            for (i, chunks) in slot.packed.iter().enumerate() {
                if let Some(kv) = Self::unpack_chunks(chunks, device)? {
                    if i == 1 && !self.cpu_attention {
                        traffic.cpu_to_gpu +=
                            chunks.iter().map(|(k, v)| (k.bytes() + v.bytes()) as u64).sum::<u64>();
                    }
                    parts.push(kv);
                }
            }
            let s = self.scratch.as_ref();
            let mut disk = Vec::with_capacity(slot.disk_chunks.len());
            for &(at, len, t) in &slot.disk_chunks {
                let s = s.expect("disk chunks live in the scratch file");
                let bytes = s.read_bytes(at, 2 * len)?;
                traffic.disk_read += (2 * len) as u64;
                if !self.cpu_attention {
                    traffic.cpu_to_gpu += (2 * len) as u64;
                }
                let shape = [slot.counts[2], 1, t, slot.shape.2];
                disk.push((
                    from_blob(&bytes[..len], &shape, q),
                    from_blob(&bytes[len..], &shape, q),
                ));
            }
            if let Some(kv) = Self::unpack_chunks(&disk, device)? {
                parts.push(kv);
            }
        }
        for (i, part) in slot.mem.iter().enumerate() {
            if let Some(kv) = part {
                if i == 1 && !self.cpu_attention {
                    traffic.cpu_to_gpu += kv_bytes(kv);
                }
                parts.push(kv.clone());
            }
        }
        if let Some((at, len)) = slot.disk
            && len > 0
        {
            let kv = self.read_disk(slot, at, len, device)?;
            traffic.disk_read += kv_bytes(&kv);
            if !self.cpu_attention {
                traffic.cpu_to_gpu += kv_bytes(&kv);
            }
            parts.push(kv);
        }
        if parts.is_empty() {
            return Ok(None);
        }
        let (b, h, d) = slot.shape;
        let len = parts[0].len();
        let k: Vec<&Tensor> = parts.iter().map(|p| &p.k).collect();
        let v: Vec<&Tensor> = parts.iter().map(|p| &p.v).collect();
        Ok(Some(Kv {
            k: Tensor::cat(&k, 0)?.reshape((b, h, len, d))?,
            v: Tensor::cat(&v, 0)?.reshape((b, h, len, d))?,
        }))
    }

    /// Appends the new positions `new` (all sequences of the micro-batch) to each tier's part.
    pub(crate) fn append(
        &mut self,
        j: usize,
        k: usize,
        new: &Kv,
        device: &Device,
        traffic: &mut Traffic,
    ) -> Result<()> {
        let cpu_attention = self.cpu_attention;
        let counts = self.slots[j][k].counts;
        let (b, h, d) = self.slots[j][k].shape;
        let t = new.k.dim(2)?;
        let rows_k = new.k.reshape((b * h, 1, t, d))?;
        let rows_v = new.v.reshape((b * h, 1, t, d))?;
        let mut start = 0;
        for (i, n) in counts.into_iter().enumerate() {
            if n == 0 {
                continue;
            }
            let rows = Kv { k: rows_k.narrow(0, start, n)?, v: rows_v.narrow(0, start, n)? };
            start += n;
            if let Some(q) = self.quant {
                // Quantized as stored (on the compute device), kept packed on every tier.
                let (pk, pv) = (pack(&rows.k, q)?, pack(&rows.v, q)?);
                let bytes = (pk.bytes() + pv.bytes()) as u64;
                if i == 2 {
                    let s = self.scratch.as_mut().expect("disk slots have a scratch file");
                    let (bk, bv) = (to_blob(&pk), to_blob(&pv));
                    let at = s.slot(bk.len() + bv.len());
                    s.write_bytes(at, &[bk.as_slice(), bv.as_slice()].concat())?;
                    traffic.gpu_to_cpu += bytes;
                    traffic.disk_write += bytes;
                    self.slots[j][k].disk_chunks.push((at, bk.len(), t));
                } else {
                    if i == 1 && !cpu_attention {
                        traffic.gpu_to_cpu += bytes;
                    }
                    self.slots[j][k].packed[i].push((pk, pv));
                }
                continue;
            }
            if i == 2 {
                let slot = &self.slots[j][k];
                let (at, len) = slot.disk.expect("disk rows have a slot");
                let past =
                    if len > 0 { Some(self.read_disk(slot, at, len, device)?) } else { None };
                let all = match past {
                    Some(p) => p.append(&rows)?,
                    None => rows.clone(),
                };
                let s = self.scratch.as_ref().expect("disk slots have a scratch file");
                let flat: Vec<f32> = [
                    all.k.flatten_all()?.to_vec1::<f32>()?,
                    all.v.flatten_all()?.to_vec1::<f32>()?,
                ]
                .concat();
                s.write_f32(at, &flat)?;
                traffic.gpu_to_cpu += kv_bytes(&rows);
                traffic.disk_write += (flat.len() * 4) as u64;
                self.slots[j][k].disk = Some((at, all.len()));
            } else {
                if i == 1 && !cpu_attention {
                    traffic.gpu_to_cpu += kv_bytes(&rows);
                }
                let slot = &mut self.slots[j][k];
                slot.mem[i] = Some(match slot.mem[i].take() {
                    Some(p) => p.append(&rows)?,
                    None => Kv { k: rows.k.contiguous()?, v: rows.v.contiguous()? },
                });
            }
        }
        Ok(())
    }

    /// Packed (k, v) chunks dequantized and joined along the position axis (`None` if none).
    fn unpack_chunks(chunks: &[(Packed, Packed)], device: &Device) -> Result<Option<Kv>> {
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (k, v) in chunks {
            ks.push(unpack(k, device)?);
            vs.push(unpack(v, device)?);
        }
        if ks.is_empty() {
            return Ok(None);
        }
        Ok(Some(Kv { k: Tensor::cat(&ks, 2)?, v: Tensor::cat(&vs, 2)? }))
    }

    fn read_disk(&self, slot: &KvSlot, at: u64, len: usize, device: &Device) -> Result<Kv> {
        let d = slot.shape.2;
        let n = slot.counts[2];
        let elems = n * len * d;
        let s = self.scratch.as_ref().expect("disk slots have a scratch file");
        let data = s.read_f32(at, 2 * elems)?;
        let k = Tensor::from_slice(&data[..elems], (n, 1, len, d), device)?;
        let v = Tensor::from_slice(&data[elems..], (n, 1, len, d), device)?;
        Ok(Kv { k, v })
    }
}

fn kv_bytes(kv: &Kv) -> u64 {
    2 * (kv.k.elem_count() * 4) as u64
}

/// Hidden states between layers, on the activation tier.
pub(crate) struct ActStore {
    tier: Tier,
    scratch: Option<Scratch>,
    slots: Vec<u64>,
}

impl ActStore {
    pub(crate) fn new(
        policy: &Policy,
        batch_sizes: &[(usize, usize)],
        hidden: usize,
    ) -> Result<Self> {
        let tier = policy.placement.activations.single_tier().unwrap_or(Tier::Gpu);
        if tier != Tier::Disk {
            return Ok(Self { tier, scratch: None, slots: Vec::new() });
        }
        let dir = policy.offload_dir.as_deref().ok_or_else(|| Error::Config {
            field: "offload_dir",
            message: "activations are placed on disk: set offload_dir".into(),
        })?;
        let mut s = Scratch::create(dir, "act")?;
        let slots = batch_sizes.iter().map(|&(b, w)| s.slot(b * w * hidden * 4)).collect();
        Ok(Self { tier, scratch: Some(s), slots })
    }

    /// Moves micro-batch `k`'s output to the activation tier and back for the next layer.
    pub(crate) fn round_trip(&self, k: usize, x: Tensor, traffic: &mut Traffic) -> Result<Tensor> {
        let bytes = (x.elem_count() * 4) as u64;
        match self.tier {
            Tier::Gpu => Ok(x),
            Tier::Cpu => {
                traffic.gpu_to_cpu += bytes;
                traffic.cpu_to_gpu += bytes;
                Ok(x)
            }
            Tier::Disk => {
                let s = self.scratch.as_ref().expect("disk activations have a scratch file");
                let dims = x.dims().to_vec();
                let data = x.flatten_all()?.to_vec1::<f32>()?;
                s.write_f32(self.slots[k], &data)?;
                let back = s.read_f32(self.slots[k], data.len())?;
                traffic.gpu_to_cpu += bytes;
                traffic.disk_write += bytes;
                traffic.disk_read += bytes;
                traffic.cpu_to_gpu += bytes;
                Ok(Tensor::from_vec(back, dims, x.device())?)
            }
        }
    }
}

/// Peak bytes per tier of a run and the traffic between them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierReport {
    pub required: TierBytes,
    pub traffic: Traffic,
}

impl TierReport {
    pub(crate) fn merge(&mut self, need: TierBytes, traffic: Traffic) {
        self.required.gpu = self.required.gpu.max(need.gpu);
        self.required.cpu = self.required.cpu.max(need.cpu);
        self.required.disk = self.required.disk.max(need.disk);
        self.traffic.add(traffic);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_counts_add_up_and_follow_the_shares() {
        let s = TierShares { gpu: 20.0, cpu: 50.0, disk: 30.0 };
        assert_eq!(split_counts(10, &s), [2, 5, 3]);
        assert_eq!(split_counts(0, &s), [0, 0, 0]);
        let third = TierShares { gpu: 100.0 / 3.0, cpu: 100.0 / 3.0, disk: 100.0 / 3.0 };
        assert_eq!(split_counts(4, &third).iter().sum::<usize>(), 4);
        assert_eq!(split_counts(7, &TierShares::all_on(Tier::Disk)), [0, 0, 7]);
    }

    #[test]
    fn capacity_errors_name_tier_sizes_and_fix() {
        let need = TierBytes { gpu: 100, cpu: 10, disk: 0 };
        let Err(Error::Capacity { tier, needed_bytes, available_bytes, fix, .. }) =
            check(&need, &Budgets { gpu_bytes: Some(60), ..Budgets::default() })
        else {
            panic!()
        };
        assert_eq!((tier, needed_bytes, available_bytes), (Tier::Gpu, 100, 60));
        assert!(fix.contains("gpu_batch_size"));
        check(&need, &Budgets { gpu_bytes: Some(100), cpu_bytes: Some(10), disk_bytes: Some(0) })
            .unwrap();
    }
}
