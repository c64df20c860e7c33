//! The CUDA executor (first stage): greedy generation on the GPU backend with the zig-zag block
//! schedule. Weights are placed by layer: the first `round(L · weights.gpu / 100)` layers live on
//! the GPU, the others in pinned CPU memory and are copied to the GPU on a separate stream one
//! layer ahead, overlapping the compute of the current layer (the copies are ordered against the
//! compute by cudarc's per-buffer events). KV cache and activations live on the GPU; other
//! placements are refused with a clear error until this executor supports them.

use std::sync::Arc;
use std::time::Instant;

use flexgen_model::layers::{self, Kv};
use flexgen_model::{LayerWeights, Model, Weights};
use flexgen_policy::{Policy, Tier};
use flexgen_tensor::cuda::{CudaError, CudaStream, Gpu, GpuTensor, PinnedHostSlice};
use flexgen_tensor::{Backend, Tensor};
use half::f16;

use crate::{Error, Result, RunStats, tiers::Traffic};

enum Layer {
    Resident(Box<LayerWeights<GpuTensor>>),
    /// Each tensor in pinned host memory, with its shape.
    Host(Vec<(PinnedHostSlice<f16>, Vec<usize>)>),
}

/// Runs greedy generation of token prompts on the GPU.
pub struct GpuGenerator<'m> {
    model: &'m Model,
    policy: Policy,
    gpu: Gpu,
    load: Arc<CudaStream>,
    tables: Weights<GpuTensor>,
    layers: Vec<Layer>,
}

fn cuda(e: CudaError) -> Error {
    Error::Model(flexgen_model::Error::Gpu(e))
}

fn host_f16(t: &Tensor) -> Result<Vec<f16>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?.into_iter().map(f16::from_f32).collect())
}

impl<'m> GpuGenerator<'m> {
    /// Opens GPU 0, checks that the policy is one this executor runs, and places the weights.
    pub fn new(model: &'m Model, policy: Policy) -> Result<Self> {
        policy.validate()?;
        let p = &policy.placement;
        if p.kv_cache.single_tier() != Some(Tier::Gpu)
            || p.activations.single_tier() != Some(Tier::Gpu)
            || p.weights.disk > 0.0
        {
            return Err(Error::Config {
                field: "placement",
                message: format!(
                    "the CUDA executor runs weights split between GPU and CPU with the KV cache and \
                     activations on the GPU (e.g. --percent 0 100 100 0 100 0); {:?} needs the CPU executor (--device cpu) for now",
                    p.to_percent()
                ),
            });
        }
        let gpu = Gpu::new(0).map_err(cuda)?;
        let load = gpu.ctx.new_stream().map_err(|e| cuda(e.into()))?;
        let w = &model.weights;
        let up = |t: &Tensor| gpu.upload(t);
        let tables = Weights {
            token_embedding: up(&w.token_embedding).map_err(cuda)?,
            position_embedding: w.position_embedding.as_ref().map(up).transpose().map_err(cuda)?,
            final_norm: flexgen_model::Norm {
                weight: up(&w.final_norm.weight).map_err(cuda)?,
                bias: w.final_norm.bias.as_ref().map(up).transpose().map_err(cuda)?,
            },
            lm_head: w.lm_head.as_ref().map(up).transpose().map_err(cuda)?,
            layers: Vec::new(),
        };
        let n = w.layers.len();
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "0 ≤ share·layers ≤ layers"
        )]
        let resident = ((n as f64 * p.weights.gpu / 100.0).round() as usize).min(n);
        let mut layers = Vec::with_capacity(n);
        for (j, l) in w.layers.iter().enumerate() {
            if j < resident {
                let tensors = l
                    .tensors()
                    .into_iter()
                    .map(&up)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(cuda)?;
                layers.push(Layer::Resident(Box::new(gpu_layer(l, tensors))));
            } else {
                let mut host = Vec::new();
                for t in l.tensors() {
                    let data = host_f16(t)?;
                    let mut pinned = flexgen_tensor::cuda::alloc_pinned_f16(&gpu.ctx, data.len())
                        .map_err(cuda)?;
                    pinned.as_mut_slice().map_err(|e| cuda(e.into()))?.copy_from_slice(&data);
                    host.push((pinned, t.dims().to_vec()));
                }
                layers.push(Layer::Host(host));
            }
        }
        Ok(Self { model, policy, gpu, load, tables, layers })
    }

    /// Starts copying layer `j` to the GPU on the load stream (no copy for resident layers).
    fn fetch(&self, j: usize, traffic: &mut Traffic) -> Result<Option<LayerWeights<GpuTensor>>> {
        match &self.layers[j] {
            Layer::Resident(_) => Ok(None),
            Layer::Host(host) => {
                let mut tensors = Vec::with_capacity(host.len());
                for (pinned, shape) in host {
                    let data = self.load.clone_htod(pinned).map_err(|e| cuda(e.into()))?;
                    traffic.cpu_to_gpu += (pinned.len() * 2) as u64;
                    tensors.push(GpuTensor { data, shape: shape.clone() });
                }
                Ok(Some(gpu_layer(&self.model.weights.layers[j], tensors)))
            }
        }
    }

    /// Greedy generation of `max_new` tokens for each prompt (token ids); returns the tokens.
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        max_new: usize,
    ) -> Result<(Vec<Vec<u32>>, RunStats)> {
        let spec = &self.model.spec;
        let gpu = &self.gpu;
        let pad = spec.pad_token_id.unwrap_or(0);
        let b = self.policy.gpu_batch_size as usize;
        let mut stats = RunStats::default();
        let mut traffic = Traffic::default();
        let mut outputs = vec![Vec::new(); prompts.len()];
        for block in (0..prompts.len()).collect::<Vec<_>>().chunks(self.policy.block_size()) {
            stats.blocks += 1;
            let groups: Vec<&[usize]> = block.chunks(b).collect();
            let mut masks: Vec<Vec<Vec<bool>>> = Vec::new();
            let mut inputs: Vec<Vec<Vec<u32>>> = Vec::new();
            for g in &groups {
                let (input, mask) =
                    crate::generate::left_pad(g.iter().map(|&i| prompts[i].as_slice()), pad);
                inputs.push(input);
                masks.push(mask);
                stats.prompt_tokens += g.iter().map(|&i| prompts[i].len()).sum::<usize>();
            }
            let mut kv: Vec<Vec<Option<Kv<GpuTensor>>>> =
                (0..self.layers.len()).map(|_| (0..groups.len()).map(|_| None).collect()).collect();
            for step in 0..max_new {
                let started = Instant::now();
                let mut hidden = Vec::with_capacity(groups.len());
                let mut biases = Vec::with_capacity(groups.len());
                for (k, inp) in inputs.iter().enumerate() {
                    let (bs, t) = (inp.len(), inp[0].len());
                    let ids: Vec<u32> = inp.iter().flatten().copied().collect();
                    let (pos, allowed) = layers::step_inputs(spec, &masks[k], t);
                    biases.push(gpu.attention_bias(&allowed).map_err(cuda)?);
                    hidden.push(layers::embed(gpu, &self.tables, &ids, &pos, (bs, t))?);
                }
                let mut current = self.fetch(0, &mut traffic)?;
                for (j, (layer, layer_kv)) in self.layers.iter().zip(kv.iter_mut()).enumerate() {
                    // Prefetch the next layer on the load stream while this one computes.
                    let next = if j + 1 < self.layers.len() {
                        self.fetch(j + 1, &mut traffic)?
                    } else {
                        None
                    };
                    let w: &LayerWeights<GpuTensor> = match (layer, &current) {
                        (Layer::Resident(w), _) => w,
                        (Layer::Host(_), fetched) => {
                            fetched.as_ref().expect("host layers are fetched")
                        }
                    };
                    for (k, slot) in layer_kv.iter_mut().enumerate() {
                        let (x, new) = layers::decoder_layer(
                            gpu,
                            spec,
                            w,
                            &hidden[k],
                            slot.as_ref(),
                            &biases[k],
                        )?;
                        *slot = Some(match slot.take() {
                            Some(p) => p.append_on(gpu, &new)?,
                            None => new,
                        });
                        hidden[k] = x;
                    }
                    current = next;
                }
                for (k, g) in groups.iter().enumerate() {
                    let last = gpu.last_position(&hidden[k]).map_err(cuda)?;
                    let logits = gpu
                        .to_cpu(&layers::logits(gpu, spec, &self.tables, &last)?)
                        .map_err(cuda)?;
                    let rows = logits.squeeze(1)?.to_vec2::<f32>()?;
                    let mut next = Vec::with_capacity(g.len());
                    for (row, &i) in rows.iter().zip(g.iter()) {
                        let t = crate::argmax(row);
                        outputs[i].push(t);
                        next.push(t);
                    }
                    stats.generated_tokens += g.len();
                    for m in &mut masks[k] {
                        m.push(true);
                    }
                    inputs[k] = next.into_iter().map(|t| vec![t]).collect();
                }
                gpu.stream.synchronize().map_err(|e| cuda(e.into()))?;
                let s = started.elapsed().as_secs_f64();
                if step == 0 {
                    stats.prefill_s += s;
                } else {
                    stats.decode_s += s;
                }
            }
        }
        let (free, total) = gpu.ctx.mem_get_info().map_err(|e| cuda(e.into()))?;
        stats.tiers.required.gpu = (total - free) as u64;
        stats.tiers.traffic = traffic;
        Ok((outputs, stats))
    }
}

fn gpu_layer(template: &LayerWeights, tensors: Vec<GpuTensor>) -> LayerWeights<GpuTensor> {
    template.with_tensors(tensors)
}
