//! The host stage: the tiered CPU executor. The compute device is the CPU; weights, KV cache and
//! activations sit on the three tiers by the policy's exact shares (`tiers.rs`: the "GPU" tier
//! is host memory under a budget, the disk tier is real), and each visit of the zig-zag moves
//! what it needs between them, counting the bytes.

use std::time::Instant;

use flexgen_model::layers;
use flexgen_model::{LayerWeights, Model};
use flexgen_policy::Policy;
use flexgen_tensor::{Cpu, Device, Tensor};

use crate::memory;
use crate::stage::{self, BlockInput, Feed, Picks, Stage};
use crate::tiers::{self, ActStore, Budgets, KvStore, Traffic, WeightStore};
use crate::{Result, RunStats};

/// The tiered CPU executor of one model under one policy.
pub(crate) struct HostStage<'m> {
    model: &'m Model,
    policy: Policy,
    device: Device,
    budgets: Budgets,
    weights: WeightStore,
}

impl<'m> HostStage<'m> {
    /// Places the weights on their tiers; a policy whose weights do not fit `budgets` is refused
    /// before anything is allocated.
    pub(crate) fn new(model: &'m Model, policy: &Policy, budgets: Budgets) -> Result<Self> {
        let weights_only = memory::Capacity { max_prompt: 0, max_new: 0, sequences: Some(0) };
        tiers::check(&Self::plan(model, policy, weights_only)?.totals(), &budgets)?;
        let weights = WeightStore::build(
            model,
            &policy.placement.weights,
            policy.offload_dir.as_deref(),
            tiers::quant_spec(&policy.compress_weight),
        )?;
        Ok(Self { model, policy: policy.clone(), device: Device::Cpu, budgets, weights })
    }

    /// The memory plan of `policy` on this stage, for all layers.
    fn plan(model: &Model, policy: &Policy, c: memory::Capacity) -> Result<memory::MemoryPlan> {
        let layers = 0..model.spec.num_layers;
        memory::plan(&model.spec, policy, c, layers, memory::Compute::Host)
    }

    /// Embedding of micro-batch rows `ids` (`[b, t]`, row-major) at positions `past..past + t`,
    /// and what its layers share (the attention mask, causal and padding; rotary tables).
    fn embed_step(
        &self,
        ids: &[u32],
        starts: &[usize],
        past: usize,
        t: usize,
    ) -> Result<(Tensor, layers::StepInputs<Cpu>)> {
        let spec = &self.model.spec;
        let masks: Vec<Vec<bool>> = starts.iter().map(|&s| stage::mask(s, past + t)).collect();
        let (pos, allowed) = layers::step_inputs(spec, &masks, t);
        let step = layers::StepInputs::new(&Cpu, spec, &allowed, &pos)?;
        Ok((layers::embed(&Cpu, &self.model.weights, ids, &pos, (starts.len(), t))?, step))
    }
}

impl Stage for HostStage<'_> {
    fn run_block(
        &self,
        block: &BlockInput,
        stats: &mut RunStats,
        after_step: &mut dyn FnMut(usize, Vec<Picks>) -> Result<Feed>,
    ) -> Result<()> {
        let spec = &self.model.spec;
        let num_layers = self.model.weights.layers.len();
        let templates = &self.model.weights.layers;
        let n_batches = block.ids.len();
        let shapes: Vec<(usize, usize)> =
            (0..n_batches).map(|k| (block.rows(k), block.width)).collect();
        let max_len = block.width + block.steps;
        // Check every tier before allocating the block's cache and activations.
        let capacity = memory::Capacity {
            max_prompt: block.width,
            max_new: block.steps,
            sequences: Some(shapes.iter().map(|s| s.0).sum()),
        };
        let need = Self::plan(self.model, &self.policy, capacity)?.totals();
        tiers::check(&need, &self.budgets)?;
        let sizes: Vec<usize> = shapes.iter().map(|s| s.0).collect();
        let mut kv = KvStore::new(
            num_layers,
            &sizes,
            max_len,
            spec.num_kv_heads as usize,
            spec.head_dim() as usize,
            &self.policy,
        )?;
        let act = ActStore::new(&self.policy, &shapes, spec.hidden_size as usize)?;
        let mut traffic = Traffic::default();
        stats.direct_io = self.weights.direct_io();
        let mut input: Vec<Vec<u32>> = block.ids.clone();
        for step in 0..block.steps {
            let started = Instant::now();
            let (t, past) = if step == 0 { (block.width, 0) } else { (1, block.width + step - 1) };
            let mut hidden: Vec<Tensor> = Vec::with_capacity(n_batches);
            let mut steps: Vec<layers::StepInputs<Cpu>> = Vec::with_capacity(n_batches);
            for (ids, starts) in input.iter().zip(&block.starts) {
                let (x, inputs) = self.embed_step(ids, starts, past, t)?;
                hidden.push(x);
                steps.push(inputs);
            }
            // The zig-zag block schedule: a layer runs over every micro-batch before the next,
            // while the next layer's weights are loaded from their tiers on another thread.
            let (mut current, t0) = self.weights.load(0, &templates[0], &self.device)?;
            traffic.cpu_to_gpu += t0.cpu_to_gpu;
            traffic.disk_read += t0.disk_read;
            for j in 0..num_layers {
                let next =
                    std::thread::scope(|scope| -> Result<Option<(LayerWeights, Traffic)>> {
                        let prefetch = (j + 1 < num_layers).then(|| {
                            scope
                                .spawn(|| self.weights.load(j + 1, &templates[j + 1], &self.device))
                        });
                        for k in 0..n_batches {
                            let past_kv = kv.gather(j, k, &self.device, &mut traffic)?;
                            let (x, new_kv) = layers::decoder_layer(
                                &Cpu,
                                spec,
                                &current,
                                &hidden[k],
                                past_kv.as_ref(),
                                &steps[k],
                            )?;
                            kv.append(j, k, &new_kv, &self.device, &mut traffic)?;
                            hidden[k] = if j + 1 < num_layers {
                                act.round_trip(k, x, &mut traffic)?
                            } else {
                                x
                            };
                        }
                        prefetch
                            .map(|h| h.join().expect("weight prefetch thread panicked"))
                            .transpose()
                    })?;
                if let Some((w, t1)) = next {
                    current = w;
                    traffic.cpu_to_gpu += t1.cpu_to_gpu;
                    traffic.disk_read += t1.disk_read;
                }
            }
            // LM head on the last position only.
            let mut picks = Vec::with_capacity(n_batches);
            for (k, x) in hidden.iter().enumerate() {
                let last = x.narrow(1, t - 1, 1)?;
                let rows = layers::logits(&Cpu, spec, &self.model.weights, &last)?
                    .squeeze(1)?
                    .to_vec2::<f32>()?;
                let greedy = rows.iter().map(|r| crate::sampling::argmax(r)).collect();
                let logits = rows
                    .into_iter()
                    .zip(&block.want_logits[k])
                    .map(|(r, &want)| want.then_some(r))
                    .collect();
                picks.push(Picks { greedy, logits });
            }
            let feed = after_step(step, picks)?;
            stage::record_step(stats, step, started.elapsed().as_secs_f64());
            match feed {
                Some(next) => input = next,
                None => break,
            }
        }
        stats.tiers.merge(need, traffic);
        Ok(())
    }

    fn finish(&self, _stats: &mut RunStats) -> Result<()> {
        Ok(())
    }
}
