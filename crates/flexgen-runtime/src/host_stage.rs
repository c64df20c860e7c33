//! The host stage: the tiered CPU executor. The compute device is the CPU; weights, KV cache and
//! activations sit on the three tiers by the policy's exact shares (`tiers.rs`: the "GPU" tier
//! is host memory under a budget, the disk tier is real), and each visit of the zig-zag moves
//! what it needs between them, counting the bytes.

use std::ops::Range;
use std::sync::mpsc;
use std::time::Instant;

use flexgen_model::layers;
use flexgen_model::{LayerWeights, Model};
use flexgen_policy::Policy;
use flexgen_tensor::{Cpu, Device, Tensor};

use crate::memory;
use crate::ranks::{self, Group, Msg, RankSpec, Wire};
use crate::stage::{self, BlockInput, Feed, Picks, Stage};
use crate::tiers::{self, ActStore, Budgets, KvStore, Traffic, WeightStore};
use crate::{Result, RunStats};

/// The tiered CPU executor of one model: one stage over all layers, or a pipeline of stages
/// over contiguous layer ranges, each under its own placement, whose hidden states cross from
/// one to the next through an in-process link (what NCCL carries between GPUs).
pub(crate) struct HostStage<'m> {
    model: &'m Model,
    device: Device,
    budgets: Budgets,
    parts: Vec<Part>,
    /// On rank 0 of a pipeline over processes: the ring through the other ranks' stages, which
    /// run after `parts` (its first stage).
    ring: Option<Wire>,
    /// On rank 0 of a pipeline over processes: the other ranks' stages (layers, policy), whose
    /// memory the report counts with its own.
    rest: Vec<(Range<u32>, Policy)>,
}

/// One stage of the pipeline: its layers, the policy its tensors are placed by, its weights.
struct Part {
    layers: Range<u32>,
    policy: Policy,
    weights: WeightStore,
}

impl Part {
    /// Its layers as indices into the model's.
    fn indices(&self) -> Range<usize> {
        self.layers.start as usize..self.layers.end as usize
    }
}

impl<'m> HostStage<'m> {
    /// Places the weights on their tiers; a policy whose weights do not fit `budgets` is refused
    /// before anything is allocated.
    pub(crate) fn new(model: &'m Model, policy: &Policy, budgets: Budgets) -> Result<Self> {
        let all = 0..model.spec.num_layers;
        Self::pipeline(model, &[(all, policy.clone())], budgets)
    }

    /// A pipeline of `stages` (contiguous layer ranges covering the model, each with the policy
    /// its weights, cache and activations are placed by; the block shape is the generator's).
    /// Each stage's tiers may hold `budgets` (each stage has its own device).
    pub(crate) fn pipeline(
        model: &'m Model,
        stages: &[(Range<u32>, Policy)],
        budgets: Budgets,
    ) -> Result<Self> {
        check_stages(model, stages)?;
        let parts = stages
            .iter()
            .map(|(r, p)| Self::part(model, r, p, budgets))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { model, device: Device::Cpu, budgets, parts, ring: None, rest: Vec::new() })
    }

    /// Rank 0 of a pipeline over processes, one stage each (`stages` has one per rank): builds
    /// the first stage, then waits at the coordinator address until every rank has joined.
    pub(crate) fn rank0(
        model: &'m Model,
        stages: &[(Range<u32>, Policy)],
        budgets: Budgets,
        spec: &RankSpec,
    ) -> Result<Self> {
        check_ranks(stages, spec)?;
        check_stages(model, stages)?;
        let part = Self::part(model, &stages[0].0, &stages[0].1, budgets)?;
        let ring = ranks::coordinate(spec)?;
        let rest = stages[1..].to_vec();
        Ok(Self { model, device: Device::Cpu, budgets, parts: vec![part], ring: Some(ring), rest })
    }

    /// Rank r > 0 of a pipeline over processes: joins the ring, builds stage r, and runs it on
    /// every group that comes round until rank 0 is done. A failure here goes round the ring
    /// (rank 0 reports it) and is returned.
    pub(crate) fn serve(
        model: &'m Model,
        stages: &[(Range<u32>, Policy)],
        budgets: Budgets,
        spec: &RankSpec,
    ) -> Result<()> {
        check_ranks(stages, spec)?;
        let wire = ranks::join(spec)?;
        let fail = |e: crate::Error| wire.fail(e);
        check_stages(model, stages).map_err(fail)?;
        let (r, p) = &stages[spec.rank as usize];
        let part = Self::part(model, r, p, budgets).map_err(fail)?;
        let me = Self {
            model,
            device: Device::Cpu,
            budgets,
            parts: Vec::new(),
            ring: None,
            rest: Vec::new(),
        };
        let mut stores = None;
        loop {
            match wire.recv()? {
                Msg::Block { shapes, max_len } => {
                    stores = Some(me.stores(&part, &shapes, max_len).map_err(fail)?);
                    wire.send(&Msg::Block { shapes, max_len })?;
                }
                Msg::Group(mut g) => {
                    let (kv, act) = stores.as_mut().ok_or_else(|| {
                        fail(crate::Error::Config {
                            field: "coordinator",
                            message: "a group came before its block: rank 0 is not this \
                                      flexgen's"
                                .into(),
                        })
                    })?;
                    let steps = g
                        .starts
                        .iter()
                        .map(|st| step_inputs(&model.spec, st, g.past, g.t).map(|(_, s)| s))
                        .collect::<Result<Vec<_>>>()
                        .map_err(fail)?;
                    let mut moved = Traffic::default();
                    me.run_part(&part, (kv, act), (g.first, &mut g.hidden), &steps, &mut moved)
                        .map_err(fail)?;
                    g.traffic.add(moved);
                    wire.send(&Msg::Group(g))?;
                }
                m @ Msg::Failed { .. } => return Err(wire.not_due(m)),
                Msg::Done => {
                    let _ = wire.send(&Msg::Done);
                    return Ok(());
                }
                other => return Err(fail(other.unexpected())),
            }
        }
    }

    /// A stage's weights on their tiers, checked against `budgets` first.
    fn part(model: &Model, r: &Range<u32>, p: &Policy, budgets: Budgets) -> Result<Part> {
        if model.weights.layers.len() != model.spec.num_layers as usize {
            return Err(crate::Error::Config {
                field: "model",
                message: "the host stage computes on the model's weights in memory, and these \
                          are made when an executor places them (Model::open_lazy, \
                          Model::dummy_lazy: for the CUDA executor); load it with Model::load or \
                          Model::dummy"
                    .into(),
            });
        }
        let weights_only = memory::Capacity { max_prompt: 0, max_new: 0, sequences: Some(0) };
        tiers::check(&Self::plan(model, p, weights_only, r.clone())?.totals(), &budgets)?;
        let weights = WeightStore::build(
            &model.weights.layers[r.start as usize..r.end as usize],
            &p.placement.weights,
            p.offload_dir.as_deref(),
            tiers::quant_spec(&p.compress_weight),
        )?;
        Ok(Part { layers: r.clone(), policy: p.clone(), weights })
    }

    /// A stage's cache and activations for a block of micro-batches of `shapes` (rows, width).
    fn stores(
        &self,
        part: &Part,
        shapes: &[(usize, usize)],
        max_len: usize,
    ) -> Result<(KvStore, ActStore)> {
        let spec = &self.model.spec;
        let sizes: Vec<usize> = shapes.iter().map(|s| s.0).collect();
        let kv = KvStore::new(
            part.indices().len(),
            &sizes,
            max_len,
            spec.num_kv_heads as usize,
            spec.head_dim() as usize,
            &part.policy,
        )?;
        Ok((kv, ActStore::new(&part.policy, shapes, spec.hidden_size as usize)?))
    }

    /// The memory plan of `policy` for layers `layers` on a host stage.
    fn plan(
        model: &Model,
        policy: &Policy,
        c: memory::Capacity,
        layers: Range<u32>,
    ) -> Result<memory::MemoryPlan> {
        memory::plan(&model.spec, policy, c, layers, memory::Compute::Host)
    }

    /// One stage's layers over some micro-batches' hidden states, in the zig-zag block schedule:
    /// a layer runs over each of them before the next, while the next layer's weights are loaded
    /// from their tiers on another thread.
    /// `hidden` holds micro-batches `first..`, `steps` their inputs.
    fn run_part(
        &self,
        part: &Part,
        (kv, act): (&mut KvStore, &mut ActStore),
        (first, hidden): (usize, &mut [Tensor]),
        steps: &[layers::StepInputs<Cpu>],
        traffic: &mut Traffic,
    ) -> Result<()> {
        let spec = &self.model.spec;
        let templates = &self.model.weights.layers[part.indices()];
        let n = templates.len();
        let (mut current, t0) = part.weights.load(0, &templates[0], &self.device)?;
        traffic.cpu_to_gpu += t0.cpu_to_gpu;
        traffic.disk_read += t0.disk_read;
        for j in 0..n {
            let next = std::thread::scope(|scope| -> Result<Option<(LayerWeights, Traffic)>> {
                let prefetch = (j + 1 < n).then(|| {
                    scope.spawn(|| part.weights.load(j + 1, &templates[j + 1], &self.device))
                });
                for (i, x) in hidden.iter_mut().enumerate() {
                    let k = first + i;
                    let past_kv = kv.gather(j, k, &self.device, traffic)?;
                    let (y, new_kv) = layers::decoder_layer(
                        &Cpu,
                        spec,
                        &current,
                        x,
                        past_kv.as_ref(),
                        &steps[i],
                    )?;
                    kv.append(j, k, &new_kv, &self.device, traffic)?;
                    *x = if j + 1 < n { act.round_trip(k, y, traffic)? } else { y };
                }
                prefetch.map(|h| h.join().expect("weight prefetch thread panicked")).transpose()
            })?;
            if let Some((w, t1)) = next {
                current = w;
                traffic.cpu_to_gpu += t1.cpu_to_gpu;
                traffic.disk_read += t1.disk_read;
            }
        }
        Ok(())
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
        let (pos, step) = step_inputs(&self.model.spec, starts, past, t)?;
        Ok((layers::embed(&Cpu, &self.model.weights, ids, &pos, (starts.len(), t))?, step))
    }
}

/// A group of micro-batches on its way through a pipeline: its index and hidden states.
type GroupOf = (usize, Vec<Tensor>);

/// Where a step is: every micro-batch's rows' padding, and its `t` new positions after `past`.
#[derive(Clone, Copy)]
struct Step<'a> {
    starts: &'a [Vec<usize>],
    t: usize,
    past: usize,
}

/// The position-table indices (`[rows, t]`, row-major) and the attention mask and rotary tables
/// of a step of `t` positions after `past`, for rows with `starts` padding positions.
fn step_inputs(
    spec: &flexgen_policy::ModelSpec,
    starts: &[usize],
    past: usize,
    t: usize,
) -> Result<(Vec<u32>, layers::StepInputs<Cpu>)> {
    let masks: Vec<Vec<bool>> = starts.iter().map(|&s| stage::mask(s, past + t)).collect();
    let (pos, allowed) = layers::step_inputs(spec, &masks, t);
    let step = layers::StepInputs::new(&Cpu, spec, &allowed, &pos)?;
    Ok((pos, step))
}

impl HostStage<'_> {
    /// Rank 0: the other ranks stop once the end has gone round.
    pub(crate) fn stop_ranks(&self) {
        if let Some(ring) = &self.ring {
            let _ = ring.send(&Msg::Done);
        }
    }
}

impl Drop for HostStage<'_> {
    fn drop(&mut self) {
        self.stop_ranks();
    }
}

impl HostStage<'_> {
    /// Every stage's layers over the micro-batches' hidden states (`hidden`, in order; `stores`:
    /// each stage's cache and activations). One stage runs them in the zig-zag order. A pipeline
    /// splits them into as many groups as it has stages (fewer with fewer micro-batches), runs
    /// each stage on its own thread, and passes a group from one stage to the next through the
    /// link as soon as the stage is done with it: group g runs on stage s while group g − 1 runs
    /// on stage s + 1. A failed stage stops the others: its neighbours find the link closed, and
    /// its own error is the one returned.
    fn run_stages(
        &self,
        stores: &mut [(KvStore, ActStore)],
        mut hidden: Vec<Tensor>,
        steps: &[layers::StepInputs<Cpu>],
        at: Step<'_>,
        traffic: &mut Traffic,
    ) -> Result<Vec<Tensor>> {
        if let ([part], [(kv, act)], None) = (&self.parts[..], &mut *stores, &self.ring) {
            self.run_part(part, (kv, act), (0, &mut hidden), steps, traffic)?;
            return Ok(hidden);
        }
        let n = hidden.len();
        let stages = self.parts.len() + self.ring.as_ref().map_or(0, |r| r.world() - 1);
        let groups = stages.min(n);
        // Group g: micro-batches g·n/groups .. (g + 1)·n/groups.
        let first = |g: usize| g * n / groups;
        let (to_first, mut from_prev) = mpsc::channel::<GroupOf>();
        let mut out: Vec<Option<Vec<Tensor>>> = (0..groups).map(|_| None).collect();
        // What the other ranks moved, reported with the groups that come back round.
        let mut moved = Traffic::default();
        let results = std::thread::scope(|s| {
            let mut threads = Vec::with_capacity(self.parts.len());
            let last = self.parts.len() - 1;
            for (i, (part, (kv, act))) in self.parts.iter().zip(stores.iter_mut()).enumerate() {
                let (to_next, from_this) = mpsc::channel::<GroupOf>();
                let input = std::mem::replace(&mut from_prev, from_this);
                let ring = self.ring.as_ref().filter(|_| i == last);
                threads.push(s.spawn(move || -> Result<Traffic> {
                    let mut traffic = Traffic::default();
                    for (g, mut x) in input {
                        if i > 0 {
                            x = link(&x)?;
                        }
                        let (a, b) = (first(g), first(g + 1));
                        let run =
                            self.run_part(part, (kv, act), (a, &mut x), &steps[a..b], &mut traffic);
                        if let Some(ring) = ring {
                            // On round the other ranks; a failure here goes round too, so that
                            // the receiving end below learns of it.
                            if let Err(e) = run {
                                let _ = ring.send(&Msg::Failed { rank: 0, message: e.to_string() });
                                return Err(e);
                            }
                            let starts = at.starts[a..b].to_vec();
                            let (t, past) = (at.t, at.past);
                            let traffic = Traffic::default();
                            let group = Group { g, first: a, t, past, starts, hidden: x, traffic };
                            ring.send(&Msg::Group(group))?;
                            continue;
                        }
                        run?;
                        if to_next.send((g, x)).is_err() {
                            break; // a later stage failed: its error is returned
                        }
                    }
                    Ok(traffic)
                }));
            }
            let mut rest = hidden.into_iter();
            for g in 0..groups {
                let x: Vec<Tensor> = rest.by_ref().take(first(g + 1) - first(g)).collect();
                if to_first.send((g, x)).is_err() {
                    break; // the first stage failed
                }
            }
            drop(to_first);
            let mut received = Ok(());
            if let Some(ring) = &self.ring {
                // The groups come back round from the last rank.
                for _ in 0..groups {
                    match ring.recv() {
                        Ok(Msg::Group(g)) if g.g < groups => {
                            moved.add(g.traffic);
                            out[g.g] = Some(g.hidden);
                        }
                        Ok(Msg::Failed { rank, message }) => {
                            received = Err(crate::Error::Rank { rank, message });
                            break;
                        }
                        Ok(other) => {
                            received = Err(other.unexpected());
                            break;
                        }
                        Err(e) => {
                            received = Err(e);
                            break;
                        }
                    }
                }
            } else {
                for (g, x) in from_prev {
                    out[g] = Some(x);
                }
            }
            let done: Vec<Result<Traffic>> =
                threads.into_iter().map(|t| t.join().expect("pipeline stage panicked")).collect();
            (done, received)
        });
        let (results, received): (Vec<Result<Traffic>>, Result<()>) = results;
        for r in results {
            traffic.add(r?);
        }
        received?;
        traffic.add(moved);
        Ok(out.into_iter().flat_map(|x| x.expect("every stage succeeded")).collect())
    }
}

impl Stage for HostStage<'_> {
    fn run_block(
        &self,
        block: &BlockInput,
        stats: &mut RunStats,
        after_step: &mut dyn FnMut(usize, usize, Vec<Picks>) -> Result<Feed>,
    ) -> Result<()> {
        let spec = &self.model.spec;
        let n_batches = block.ids.len();
        let shapes: Vec<(usize, usize)> =
            (0..n_batches).map(|k| (block.rows(k), block.width)).collect();
        let max_len = block.width + block.steps;
        // Check every stage's tiers before allocating the block's cache and activations.
        let capacity = memory::Capacity {
            max_prompt: block.width,
            max_new: block.steps,
            sequences: Some(shapes.iter().map(|s| s.0).sum()),
        };
        let mut need = tiers::TierBytes::default();
        let mut stores = Vec::with_capacity(self.parts.len());
        // Each stage checked against the budgets, the other ranks' too (every rank has the same
        // command line; they do not check their blocks); the report sums the stages (each a
        // device of its own in a real pipeline).
        let mut add = |policy: &Policy, layers: &Range<u32>| -> Result<tiers::TierBytes> {
            let n = Self::plan(self.model, policy, capacity, layers.clone())?.totals();
            need = tiers::TierBytes {
                gpu: need.gpu + n.gpu,
                cpu: need.cpu + n.cpu,
                disk: need.disk + n.disk,
            };
            Ok(n)
        };
        for part in &self.parts {
            tiers::check(&add(&part.policy, &part.layers)?, &self.budgets)?;
            stores.push(self.stores(part, &shapes, max_len)?);
        }
        for (layers, policy) in &self.rest {
            tiers::check(&add(policy, layers)?, &self.budgets)?;
        }
        // The other ranks' stages set up theirs; the block comes back round once they have.
        if let Some(ring) = &self.ring {
            let block = Msg::Block { shapes: shapes.clone(), max_len };
            if let Err(e) = ring.send(&block) {
                // The next rank stopped: what went round before it did says why.
                return Err(match ring.recv() {
                    Ok(Msg::Failed { rank, message }) => crate::Error::Rank { rank, message },
                    _ => e,
                });
            }
            match ring.recv()? {
                Msg::Block { .. } => {}
                Msg::Failed { rank, message } => return Err(crate::Error::Rank { rank, message }),
                other => return Err(other.unexpected()),
            }
        }
        let mut traffic = Traffic::default();
        stats.direct_io = self.parts.iter().find_map(|p| p.weights.direct_io());
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
            let at = Step { starts: &block.starts, t, past };
            hidden = self.run_stages(&mut stores, hidden, &steps, at, &mut traffic)?;
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
            let feed = after_step(step, 0, picks)?;
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

/// Stages must be contiguous, non-empty layer ranges covering the model in order.
pub(crate) fn check_stages(model: &Model, stages: &[(Range<u32>, Policy)]) -> Result<()> {
    let mut next = 0;
    for (i, (r, p)) in stages.iter().enumerate() {
        p.validate()?;
        flexgen_policy::check_stage_layers(i, [r.start, r.end], next)
            .map_err(|e| crate::Error::Config { field: "stage", message: e.to_string() })?;
        next = r.end;
    }
    if next != model.spec.num_layers {
        return Err(crate::Error::Config {
            field: "stage",
            message: format!(
                "the stages end at layer {next}, the model has {} layers; end the last \
                     stage's `layers` at {}",
                model.spec.num_layers, model.spec.num_layers
            ),
        });
    }
    Ok(())
}

/// A pipeline over processes has one stage per rank.
pub(crate) fn check_ranks(stages: &[(Range<u32>, Policy)], spec: &RankSpec) -> Result<()> {
    if stages.len() != spec.world_size as usize || spec.rank >= spec.world_size {
        return Err(crate::Error::Config {
            field: "stage",
            message: format!(
                "rank {} of {}: the policy has {} stages; a pipeline over processes runs one \
                 stage per rank (give [[stage]] entries for {} ranks, or none to split the \
                 layers evenly)",
                spec.rank,
                spec.world_size,
                stages.len(),
                spec.world_size
            ),
        });
    }
    Ok(())
}

/// The in-process link between two stages: each micro-batch's hidden state leaves one stage as
/// the values the TCP ring carries (what a device-to-device copy or NCCL carries between GPUs)
/// and is rebuilt from them on the other side.
fn link(hidden: &[Tensor]) -> Result<Vec<Tensor>> {
    let io = |e: std::io::Error| crate::Error::Config { field: "stage", message: e.to_string() };
    hidden
        .iter()
        .map(|x| ranks::hidden_tensor(ranks::hidden_values(x).map_err(io)?, x.dims()).map_err(io))
        .collect()
}
