//! Calibration: refit a hardware profile's rates so that the cost model predicts measured runs.
//!
//! Each rate the cost model reads (pinned copies, GEMM, attention and HBM rates of the GPU, CPU
//! attention, disk reads and writes) gets a factor. The factors minimize the sum over runs and
//! phases (prefill, decode) of the squared log ratio of predicted to measured time, by coordinate
//! descent on a log grid that narrows each round; a rate no run depends on keeps factor 1. The
//! result is the profile with its rates multiplied, and both predictions for every run.

use flexgen_policy::{HardwareProfile, ModelSpec, Policy, Workload};

use crate::{Margins, Result, predict};

/// One measured run.
#[derive(Debug, Clone)]
pub struct Observation {
    pub label: String,
    pub spec: ModelSpec,
    pub workload: Workload,
    pub policy: Policy,
    pub prefill_s: f64,
    pub decode_s: f64,
}

impl Observation {
    /// One measured run from the JSON report of `flexgen-run --json` (its `calibration` record:
    /// spec, policy and workload; and the measured `prefill_s` and `decode_s`), named `label`.
    /// Every part is checked: a report that is damaged or not flexgen's is refused naming the
    /// field.
    pub fn from_run_report(text: &str, label: &str) -> Result<Self> {
        let bad = |field: &str, why: String| crate::Error::Invalid {
            field: "calibration",
            message: format!("{label}: `{field}`: {why}"),
        };
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| {
            bad("(file)", format!("not a JSON run report (flexgen-run --json): {e}"))
        })?;
        let rec = v.get("calibration").filter(|r| r.is_object()).ok_or_else(|| {
            bad("calibration", "missing; rerun with this version of flexgen-run --json".into())
        })?;
        let spec: ModelSpec = serde_json::from_value(rec["spec"].clone())
            .map_err(|e| bad("calibration.spec", e.to_string()))?;
        spec.validate().map_err(|e| bad("calibration.spec", e.to_string()))?;
        let policy: Policy = serde_json::from_value(rec["policy"].clone())
            .map_err(|e| bad("calibration.policy", e.to_string()))?;
        policy.validate().map_err(|e| bad("calibration.policy", e.to_string()))?;
        let num = |k: &str| -> Result<u32> {
            rec["workload"][k]
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|&n| (1..=1 << 24).contains(&n))
                .ok_or_else(|| bad(&format!("calibration.workload.{k}"), "not a count".into()))
        };
        let workload = Workload {
            prompt_len: num("prompt_len")?,
            gen_len: num("gen_len")?,
            num_prompts: Some(num("num_prompts")?),
        };
        let seconds = |k: &str| -> Result<f64> {
            v.get(k)
                .and_then(serde_json::Value::as_f64)
                .filter(|s| s.is_finite() && *s > 0.0)
                .ok_or_else(|| bad(k, "not a positive number of seconds".into()))
        };
        Ok(Self {
            label: label.to_string(),
            spec,
            policy,
            workload,
            prefill_s: seconds("prefill_s")?,
            decode_s: seconds("decode_s")?,
        })
    }
}

/// A run's predicted phase times.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Phases {
    pub prefill_s: f64,
    pub decode_s: f64,
}

impl Phases {
    pub fn total_s(&self) -> f64 {
        self.prefill_s + self.decode_s
    }
}

/// The refit profile and what it changes.
#[derive(Debug, Clone)]
pub struct Calibration {
    pub profile: HardwareProfile,
    /// (rate, factor applied).
    pub factors: Vec<(&'static str, f64)>,
    /// Per observation: predictions with the original and the refit profile.
    pub before: Vec<Phases>,
    pub after: Vec<Phases>,
    /// Per observation: its prediction by the profile refit to all the *other* runs (empty with
    /// fewer than two runs): how well the refit predicts a run it has not seen.
    pub left_out: Vec<Phases>,
}

/// Measured runs used the memory they used: no safety margins when predicting them.
const FULL: Margins = Margins { gpu: 1.0, cpu: 1.0, disk: 1.0 };

/// The rates calibration may scale.
const RATES: [&str; 9] = [
    "gpu.h2d_pinned_bytes_per_s",
    "gpu.d2h_pinned_bytes_per_s",
    "gpu.gemm_flops_per_s",
    "gpu.attention_flops_per_s",
    "gpu.hbm_bytes_per_s",
    "cpu.attention_flops_per_s",
    "cpu.gemm_flops_per_s",
    "disk.read_bytes_per_s",
    "disk.write_bytes_per_s",
];

fn scaled(hw: &HardwareProfile, f: &[f64]) -> HardwareProfile {
    let mut h = hw.clone();
    if let Some(g) = h.gpu.as_mut() {
        g.h2d_pinned_bytes_per_s *= f[0];
        g.d2h_pinned_bytes_per_s *= f[1];
        g.gemm_flops_per_s *= f[2];
        g.attention_flops_per_s *= f[3];
        g.hbm_bytes_per_s *= f[4];
    }
    for r in h.cpu.attention_rates_mut() {
        *r *= f[5];
    }
    h.cpu.gemm_flops_per_s *= f[6];
    h.disk.read_bytes_per_s *= f[7];
    h.disk.write_bytes_per_s *= f[8];
    h
}

fn predict_all(hw: &HardwareProfile, obs: &[Observation]) -> Result<Vec<Phases>> {
    obs.iter()
        .map(|o| {
            let c = predict(&o.spec, hw, &o.workload, &o.policy, FULL)?;
            Ok(Phases { prefill_s: c.prefill_s, decode_s: c.decode_s })
        })
        .collect()
}

/// Sum over runs and phases of the squared log ratio predicted / measured.
fn loss(pred: &[Phases], obs: &[Observation]) -> f64 {
    pred.iter()
        .zip(obs)
        .map(|(p, o)| {
            let l = |a: f64, b: f64| if a > 0.0 && b > 0.0 { (a / b).ln().powi(2) } else { 0.0 };
            l(p.prefill_s, o.prefill_s) + l(p.decode_s, o.decode_s)
        })
        .sum()
}

/// Refits `hw` to the observed runs, and to every set of all runs but one (leave-one-out).
pub fn calibrate(hw: &HardwareProfile, obs: &[Observation]) -> Result<Calibration> {
    let (profile, f, before, after) = refit(hw, obs)?;
    let mut left_out = Vec::new();
    if obs.len() > 1 {
        for i in 0..obs.len() {
            let mut rest = obs.to_vec();
            let one = rest.remove(i);
            let (p, ..) = refit(hw, &rest)?;
            left_out.extend(predict_all(&p, std::slice::from_ref(&one))?);
        }
    }
    Ok(Calibration {
        profile,
        factors: RATES.iter().copied().zip(f).collect(),
        before,
        after,
        left_out,
    })
}

type Refit = (HardwareProfile, Vec<f64>, Vec<Phases>, Vec<Phases>);

/// The profile refit to `obs`, its factors, and the predictions before and after.
fn refit(hw: &HardwareProfile, obs: &[Observation]) -> Result<Refit> {
    let before = predict_all(hw, obs)?;
    let mut f = vec![1.0f64; RATES.len()];
    let mut best = loss(&before, obs);
    // Coordinate descent over log-factors; each round tries a grid around the current value and
    // halves the grid's span.
    let mut span = 4.0f64.ln();
    for _ in 0..12 {
        for i in 0..f.len() {
            let center = f[i].ln();
            for step in -4..=4 {
                let trial = (center + span * f64::from(step) / 4.0).exp().clamp(1e-3, 1e3);
                let mut g = f.clone();
                g[i] = trial;
                let l = loss(&predict_all(&scaled(hw, &g), obs)?, obs);
                if l < best - 1e-12 {
                    best = l;
                    f = g;
                }
            }
        }
        span /= 2.0;
    }
    let profile = scaled(hw, &f);
    let after = predict_all(&profile, obs)?;
    Ok((profile, f, before, after))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flexgen_policy::Placement;

    fn h200() -> HardwareProfile {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../policies/hardware/h200.toml");
        HardwareProfile::from_toml_file(std::path::Path::new(path)).unwrap()
    }

    fn spec() -> ModelSpec {
        flexgen_model::spec_by_name("opt-30b").unwrap()
    }

    #[test]
    fn recovers_rates_that_explain_the_runs() {
        let hw = h200();
        // The "machine" is the profile with slower copies and GEMMs and faster CPU attention.
        let truth = [0.8, 1.0, 0.6, 1.0, 1.0, 1.5, 1.0, 1.0, 1.0];
        let machine = scaled(&hw, &truth);
        let w = Workload { prompt_len: 512, gen_len: 32, num_prompts: None };
        let mut obs = Vec::new();
        for (i, (pct, b, k, cc)) in [
            ([0.0, 100.0, 100.0, 0.0, 100.0, 0.0], 32, 2, false),
            ([50.0, 50.0, 100.0, 0.0, 100.0, 0.0], 32, 2, false),
            ([20.0, 80.0, 0.0, 100.0, 0.0, 100.0], 48, 1, true),
            ([0.0, 70.0, 100.0, 0.0, 100.0, 0.0], 32, 2, false),
            ([100.0, 0.0, 100.0, 0.0, 100.0, 0.0], 16, 1, false),
        ]
        .into_iter()
        .enumerate()
        {
            let policy = Policy {
                placement: Placement::from_percent(pct).unwrap(),
                gpu_batch_size: b,
                num_gpu_batches: k,
                cpu_cache_compute: cc,
                ..Policy::default()
            };
            let c = predict(&spec(), &machine, &w, &policy, FULL).unwrap();
            obs.push(Observation {
                label: format!("run {i}"),
                spec: spec(),
                workload: w,
                policy,
                prefill_s: c.prefill_s,
                decode_s: c.decode_s,
            });
        }
        let cal = calibrate(&hw, &obs).unwrap();
        let err = |p: &[Phases]| {
            p.iter()
                .zip(&obs)
                .map(|(p, o)| (p.total_s() / (o.prefill_s + o.decode_s) - 1.0).abs())
                .fold(0.0, f64::max)
        };
        assert!(err(&cal.before) > 0.15, "the uncalibrated profile is off: {}", err(&cal.before));
        assert!(err(&cal.after) < 0.03, "calibrated within 3 %: {}", err(&cal.after));
        let h2d = cal.factors.iter().find(|(n, _)| *n == "gpu.h2d_pinned_bytes_per_s").unwrap().1;
        assert!((h2d - 0.8).abs() < 0.08, "recovers the copy rate: {h2d}");
        // Each run predicted by the refit to the other four: the two PCIe-bound runs share their
        // binding rate with others and are predicted well without being seen.
        assert_eq!(cal.left_out.len(), obs.len());
        let left = |i: usize| {
            (cal.left_out[i].total_s() / (obs[i].prefill_s + obs[i].decode_s) - 1.0).abs()
        };
        eprintln!("left out: {:?}", (0..obs.len()).map(left).collect::<Vec<_>>());
        assert!(left(0) < 0.1 && left(1) < 0.1, "PCIe-bound runs: {} {}", left(0), left(1));
    }

    /// A device run's report reads back; damaged ones are refused naming the field.
    #[test]
    fn run_reports_are_read_and_damaged_ones_refused_by_field() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/runs/2026-12-02-s8/s9.json");
        let text = std::fs::read_to_string(path).unwrap();
        let obs = Observation::from_run_report(&text, "s9.json").unwrap();
        assert_eq!((obs.spec.name.as_str(), obs.workload.prompt_len), ("llama-3.1-70b", 512));
        assert!(obs.prefill_s > 0.0 && obs.decode_s > 0.0);
        for (from, to, field) in [
            ("\"num_heads\": 64", "\"num_heads\": 0", "calibration.spec"),
            ("\"num_kv_heads\": 8", "\"num_kv_heads\": 7", "calibration.spec"),
            ("\"gpu_batch_size\": 64", "\"gpu_batch_size\": 0", "calibration.policy"),
            ("\"prompt_len\": 512", "\"prompt_len\": -1", "workload.prompt_len"),
        ] {
            assert!(text.contains(from), "{from}");
            let e =
                Observation::from_run_report(&text.replacen(from, to, 2), "s9.json").unwrap_err();
            assert!(e.to_string().contains(field), "{to}: {e}");
        }
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["decode_s"] = serde_json::json!(-1.0);
        let e = Observation::from_run_report(&v.to_string(), "s9.json").unwrap_err();
        assert!(e.to_string().contains("decode_s"), "{e}");
    }
}
