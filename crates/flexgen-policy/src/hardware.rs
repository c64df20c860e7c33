//! The hardware profile that `flexgen-profile` measures and `flexgen-plan` reads. Units are in the
//! field names: bytes, bytes per second, FLOP per second.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Version of the profile file format.
pub const PROFILE_VERSION: u32 = 1;

/// One GPU as measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuProfile {
    pub name: String,
    /// Memory the runtime may use (the card's, or `--gpu-mem-limit`).
    pub memory_bytes: u64,
    /// `PCIe` generation and lane count, where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcie: Option<String>,
    /// Pinned host→device copy rate.
    pub h2d_pinned_bytes_per_s: f64,
    /// Pinned device→host copy rate.
    pub d2h_pinned_bytes_per_s: f64,
    /// Pageable host→device copy rate.
    pub h2d_pageable_bytes_per_s: f64,
    /// fp16 GEMM rate (fp32 accumulation) at prefill shapes of the decoder's linear layers.
    pub gemm_flops_per_s: f64,
    /// Batched attention rate at prefill shapes.
    pub attention_flops_per_s: f64,
    /// Device-memory bandwidth: decode-time GEMMs and attention read weights and cache at this
    /// rate (they are memory-bound at small batch).
    pub hbm_bytes_per_s: f64,
    /// How many GPUs like this one the host has (1 when absent): the most pipeline stages
    /// `flexgen-plan --stages` plans for it.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub count: u32,
    /// Pinned host→device bytes per second of all `count` GPUs copying at once, summed: below
    /// `count` times the one GPU's rate where the GPUs share the host's links. Absent: not shared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub h2d_pinned_all_bytes_per_s: Option<f64>,
    /// GPU-to-GPU copy rate (hidden states between pipeline stages). Absent: through the host,
    /// at the pinned device→host and host→device rates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p2p_bytes_per_s: Option<f64>,
    /// CUDA compute capability, "major.minor" (NVML's): whether the GPU has the tensor cores'
    /// mma.sync (8.0 on) that the fused 4-bit product takes beyond a few rows
    /// ([`GpuProfile::tensor_cores`]). Absent (profiles written before it was recorded): taken
    /// as a GPU that has them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_capability: Option<String>,
}

/// "major.minor" as two numbers, or `None`.
fn parse_compute_capability(s: &str) -> Option<(u32, u32)> {
    let (major, minor) = s.trim().split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// The most GPUs a profile may list.
pub const MAX_GPUS: u32 = 64;

fn one() -> u32 {
    1
}

#[expect(clippy::trivially_copy_pass_by_ref, reason = "serde's skip_serializing_if signature")]
fn is_one(n: &u32) -> bool {
    *n == 1
}

impl GpuProfile {
    /// Whether the GPU has the tensor-core product (compute capability 8.0 on; absent or
    /// unreadable: yes, as before the profile recorded it). `Policy::fuses_decode_on` takes it.
    pub fn tensor_cores(&self) -> bool {
        self.compute_capability
            .as_deref()
            .and_then(parse_compute_capability)
            .is_none_or(|(major, _)| major >= 8)
    }

    /// The pinned host→device rate each of `n` GPUs copying at once gets.
    pub fn h2d_pinned_each(&self, n: u32) -> f64 {
        let alone = self.h2d_pinned_bytes_per_s;
        self.h2d_pinned_all_bytes_per_s
            .filter(|_| n > 1)
            .map_or(alone, |all| alone.min(all / f64::from(n.min(self.count).max(1))))
    }
}

/// The host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuProfile {
    pub model: String,
    pub cores: u32,
    /// Memory the runtime may use.
    pub memory_bytes: u64,
    /// fp32 GEMM rate.
    pub gemm_flops_per_s: f64,
    /// Rate of the CPU attention path (decode attention over the cache in host memory).
    pub attention_flops_per_s: f64,
    /// The same over a 4-bit packed cache (read straight from its codes). Profiles from before
    /// it was measured have none: the planner then assumes a fixed fraction of the fp16 rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packed_attention_flops_per_s: Option<f64>,
}

impl CpuProfile {
    /// The CPU attention rates the profile has (fp16, and over a packed cache where measured), to
    /// scale together: they are one path's.
    pub fn attention_rates_mut(&mut self) -> impl Iterator<Item = &mut f64> {
        std::iter::once(&mut self.attention_flops_per_s)
            .chain(self.packed_attention_flops_per_s.as_mut())
    }
}

/// The offload directory's disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskProfile {
    pub path: PathBuf,
    /// Space the runtime may use.
    pub capacity_bytes: u64,
    pub read_bytes_per_s: f64,
    pub write_bytes_per_s: f64,
}

/// A machine as the cost model sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HardwareProfile {
    pub version: u32,
    /// A short name ("t4-16gb", "h200").
    pub name: String,
    /// Where the figures came from (a `flexgen-profile` run, a paper).
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuProfile>,
    pub cpu: CpuProfile,
    pub disk: DiskProfile,
}

impl HardwareProfile {
    /// Checks that every rate is positive and finite.
    pub fn validate(&self) -> Result<()> {
        if self.version != PROFILE_VERSION {
            return Err(Error::invalid(
                "version",
                self.version,
                format!("this flexgen reads profile format {PROFILE_VERSION}"),
                "measure the machine again with this version's flexgen-profile",
            ));
        }
        if self.cpu.cores == 0 {
            return Err(Error::invalid(
                "cpu.cores",
                self.cpu.cores,
                "a machine has at least one core",
                "measure the machine with flexgen-profile or write its core count",
            ));
        }
        let mut rates = vec![
            ("cpu.gemm_flops_per_s", self.cpu.gemm_flops_per_s),
            ("cpu.attention_flops_per_s", self.cpu.attention_flops_per_s),
            ("disk.read_bytes_per_s", self.disk.read_bytes_per_s),
            ("disk.write_bytes_per_s", self.disk.write_bytes_per_s),
        ];
        if let Some(v) = self.cpu.packed_attention_flops_per_s {
            rates.push(("cpu.packed_attention_flops_per_s", v));
        }
        if let Some(g) = &self.gpu {
            if let Some(cc) = &g.compute_capability
                && parse_compute_capability(cc).is_none()
            {
                return Err(Error::invalid(
                    "gpu.compute_capability",
                    format!("{cc:?}"),
                    "a compute capability is written major.minor, as \"8.6\"",
                    "write the GPU's (nvidia-smi --query-gpu=compute_cap --format=csv), or leave the key out",
                ));
            }
            if !(1..=MAX_GPUS).contains(&g.count) {
                return Err(Error::invalid(
                    "gpu.count",
                    g.count,
                    format!("a host has 1 to {MAX_GPUS} GPUs"),
                    "write the number of GPUs like this one, or leave the key out for one",
                ));
            }
            for (field, v) in [
                ("gpu.h2d_pinned_all_bytes_per_s", g.h2d_pinned_all_bytes_per_s),
                ("gpu.p2p_bytes_per_s", g.p2p_bytes_per_s),
            ] {
                if let Some(v) = v {
                    rates.push((field, v));
                }
            }
            rates.extend([
                ("gpu.h2d_pinned_bytes_per_s", g.h2d_pinned_bytes_per_s),
                ("gpu.d2h_pinned_bytes_per_s", g.d2h_pinned_bytes_per_s),
                ("gpu.h2d_pageable_bytes_per_s", g.h2d_pageable_bytes_per_s),
                ("gpu.gemm_flops_per_s", g.gemm_flops_per_s),
                ("gpu.attention_flops_per_s", g.attention_flops_per_s),
                ("gpu.hbm_bytes_per_s", g.hbm_bytes_per_s),
            ]);
        }
        for (field, v) in rates {
            if !(v.is_finite() && v > 0.0) {
                return Err(Error::invalid(
                    field,
                    v,
                    "a rate must be a positive number",
                    "measure it with flexgen-profile or write the measured figure",
                ));
            }
        }
        Ok(())
    }

    /// Parses and validates profile TOML.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let p: Self = toml::from_str(text).map_err(|e| Error::Parse(e.to_string()))?;
        p.validate()?;
        Ok(p)
    }

    /// Reads a profile file; errors name the file.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        crate::read_toml_file(path, Self::from_toml_str)
    }

    /// The profile as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a profile always serializes")
    }

    /// Writes the profile as TOML, atomically.
    pub fn write_toml_file(&self, path: &Path) -> Result<()> {
        crate::write_file_atomic(path, &self.to_toml())
    }
}
