//! The one schedule, the same on every device: requests are tokenized and checked, cut into blocks
//! of the policy's effective batch (`gpu_batch_size × num_gpu_batches`) and micro-batches of
//! `gpu_batch_size`, left-padded; a device stage runs each block (the zig-zag over layers and
//! micro-batches) and after every step the schedule chooses each sequence's next token (greedy,
//! or sampled from the request's own random stream), applies teacher forcing, EOS, length and
//! stop strings, streams the printable text, and feeds the chosen tokens back. A block ends when
//! every sequence in it has finished, or, with refill, when enough of them have that its free
//! slots are worth filling from the queue: the unfinished ones then move to the next block.

use std::collections::VecDeque;

use flexgen_model::Model;
use rand::SeedableRng;
use rayon::prelude::*;

use crate::generate::{Completion, Event, FinishReason, GenerationConfig, Prompt, Request};
use crate::sampling::{self, Sampling};
use crate::stage::{BlockInput, Picks, Stage};
use crate::stream::TextStream;
use crate::{Error, Result, RunStats};

/// One sequence in flight.
struct Seq {
    request: usize,
    max_new: usize,
    sampling: Sampling,
    prompt: Vec<u32>,
    generated: Vec<u32>,
    /// The tokens fed back so far (the generated ones, or the forced ones in their place): with
    /// the prompt, the context a later block prefills when the sequence moves there.
    fed: Vec<u32>,
    finish: Option<FinishReason>,
    stream: TextStream,
    rng: rand_chacha::ChaCha8Rng,
    logits: Option<Vec<Vec<f32>>>,
}

/// The random stream of request `index`: its own seed when the request carries its sampling, the
/// shared seed mixed with the index otherwise (so a sequence's draws do not depend on its block).
pub(crate) fn request_rng(sampling: Sampling, own: bool, index: usize) -> rand_chacha::ChaCha8Rng {
    let seed = match (sampling, own) {
        (Sampling::Random { seed, .. }, true) => seed,
        (Sampling::Random { seed, .. }, false) => {
            seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        }
        (Sampling::Greedy, _) => 0,
    };
    rand_chacha::ChaCha8Rng::seed_from_u64(seed)
}

/// Runs `requests` through `stage` in blocks of `block_size` sequences, micro-batches of
/// `batch_size`, in the order given (with refill, a block's unfinished sequences first).
pub(crate) fn run(
    model: &Model,
    stage: &dyn Stage,
    (batch_size, block_size): (usize, usize),
    requests: &[Request],
    config: &GenerationConfig,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<(Vec<Completion>, RunStats)> {
    config.sampling.validate()?;
    let mut queue: VecDeque<Seq> = prepare(model, requests, config)?.into();
    let mut stats = RunStats::default();
    let mut done: Vec<Option<Completion>> = vec![None; requests.len()];
    let mut moved: Vec<Seq> = Vec::new();
    while !(queue.is_empty() && moved.is_empty()) {
        let mut block = std::mem::take(&mut moved);
        while block.len() < block_size {
            let Some(s) = queue.pop_front() else { break };
            block.push(s);
        }
        stats.blocks += 1;
        let refill = config.refill && !queue.is_empty();
        let shape = (batch_size, block_size);
        let block = run_block(model, stage, shape, block, config, refill, &mut stats, on_event)?;
        for s in block {
            if s.finish.is_none() {
                moved.push(s);
                continue;
            }
            let request = s.request;
            let completion = done[request].insert(s.into_completion(model));
            on_event(Event::Completed { request, completion });
        }
        on_event(Event::BlockEnd);
    }
    stage.finish(&mut stats)?;
    Ok((done.into_iter().map(|c| c.expect("every request completes")).collect(), stats))
}

impl Seq {
    /// Its prompt and the tokens fed back so far.
    fn context(&self) -> Vec<u32> {
        [self.prompt.as_slice(), &self.fed].concat()
    }

    /// Steps it may still run.
    fn remaining(&self) -> usize {
        self.max_new - self.generated.len()
    }

    fn into_completion(self, model: &Model) -> Completion {
        let text = model.tokenizer.as_ref().map(|_| self.stream.final_text().to_string());
        Completion {
            prompt_tokens: self.prompt,
            tokens: self.generated,
            text,
            finish: self.finish.unwrap_or(FinishReason::Length),
            logits: self.logits,
        }
    }
}

/// Whether a block of `block_size` slots should end now so that its free slots take queued
/// requests: at least half its slots are free, the unfinished sequences' contexts fit the stage,
/// and the slot-steps the free slots would idle (free slots × the longest remaining run) are
/// worth more than prefilling those contexts again (a prefill token costs about an eighth of a
/// decode slot-step on the GPU with resident weights, less when weights stream).
fn worth_refilling(block: &[Seq], block_size: usize, max_width: Option<usize>) -> bool {
    let live: Vec<&Seq> = block.iter().filter(|s| s.finish.is_none()).collect();
    let free = block_size - live.len();
    let contexts: Vec<usize> = live.iter().map(|s| s.prompt.len() + s.fed.len()).collect();
    let longest_run = live.iter().map(|s| s.remaining()).max().unwrap_or(0);
    2 * live.len() <= block_size
        && !live.is_empty()
        && contexts.iter().all(|&c| max_width.is_none_or(|w| c <= w))
        && free * longest_run * 8 > contexts.iter().sum::<usize>()
}

/// Tokenizes and checks every request before anything runs.
fn prepare(model: &Model, requests: &[Request], config: &GenerationConfig) -> Result<Vec<Seq>> {
    let spec = &model.spec;
    let mut seqs = Vec::with_capacity(requests.len());
    for (index, r) in requests.iter().enumerate() {
        let bad = |message: String| Error::Request { index, message };
        let prompt = match &r.prompt {
            Prompt::Tokens(ids) => ids.clone(),
            Prompt::Text(text) => {
                let tok = model.tokenizer.as_ref().ok_or_else(|| {
                    bad("a text prompt needs a tokenizer; this model has none (dummy weights): \
                         pass token ids, or give the dummy model a tokenizer"
                        .into())
                })?;
                tok.encode(text)?
            }
        };
        if prompt.is_empty() {
            return Err(bad("the prompt has no tokens".into()));
        }
        if let Some(&t) = prompt.iter().find(|&&t| t >= spec.vocab_size) {
            return Err(bad(format!(
                "token id {t} is outside the vocabulary (size {})",
                spec.vocab_size
            )));
        }
        let max_new = r.max_new_tokens.unwrap_or(config.max_new_tokens);
        if max_new == 0 {
            return Err(bad("max_new_tokens is 0: nothing to generate".into()));
        }
        if prompt.len().saturating_add(max_new) > spec.max_positions as usize {
            return Err(bad(format!(
                "prompt ({} tokens) + max_new_tokens ({max_new}) exceeds the model's {} positions; \
                 shorten the prompt or lower max_new_tokens",
                prompt.len(),
                spec.max_positions
            )));
        }
        let stop = r.stop.clone().unwrap_or_else(|| config.stop.clone());
        if !stop.is_empty() && model.tokenizer.is_none() {
            return Err(bad("stop strings need a tokenizer; this model has none".into()));
        }
        let sampling = r.sampling.unwrap_or(config.sampling);
        sampling.validate()?;
        seqs.push(Seq {
            request: index,
            max_new,
            stream: TextStream::new(&stop),
            sampling,
            prompt,
            generated: Vec::new(),
            fed: Vec::new(),
            finish: None,
            rng: request_rng(sampling, r.sampling.is_some(), index),
            logits: config.output_logits.then(Vec::new),
        });
    }
    Ok(seqs)
}

/// Runs one block on `stage` until every sequence in it has finished or, with `refill`, until
/// its free slots are worth filling ([`worth_refilling`]); returns its sequences.
#[allow(clippy::too_many_arguments)]
fn run_block(
    model: &Model,
    stage: &dyn Stage,
    (batch_size, block_size): (usize, usize),
    mut block: Vec<Seq>,
    config: &GenerationConfig,
    refill: bool,
    stats: &mut RunStats,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<Vec<Seq>> {
    let pad = model.spec.pad_token_id.unwrap_or(0);
    let steps = block.iter().map(Seq::remaining).max().unwrap_or(0);
    for s in &block {
        if s.fed.is_empty() {
            stats.prompt_tokens += s.prompt.len();
        } else {
            stats.recomputed_tokens += s.prompt.len() + s.fed.len();
        }
    }
    let max_width = stage.max_width();
    let input = {
        let contexts: Vec<Vec<u32>> = block.iter().map(Seq::context).collect();
        let batches: Vec<Vec<&[u32]>> =
            contexts.chunks(batch_size).map(|mb| mb.iter().map(Vec::as_slice).collect()).collect();
        let want: Vec<Vec<bool>> = block
            .chunks(batch_size)
            .map(|mb| {
                mb.iter()
                    .map(|s| s.logits.is_some() || matches!(s.sampling, Sampling::Random { .. }))
                    .collect()
            })
            .collect();
        BlockInput::new(&batches, want, steps, pad)
    };
    let mut generated = 0usize;
    let micro_batches = input.ids.len();
    let mut after_step =
        |_step: usize, first: usize, picks: Vec<Picks>| -> Result<Option<Vec<Vec<u32>>>> {
            // Micro-batches first.. of the block (a pipeline's group; the whole block at once
            // elsewhere); the block may end only once the step's last group is in.
            let step_done = first + picks.len() >= micro_batches;
            let lo = (first * batch_size).min(block.len());
            let hi = ((first + picks.len()) * batch_size).min(block.len());
            let rows: Vec<(u32, Option<Vec<f32>>)> =
                picks.into_iter().flat_map(|p| p.greedy.into_iter().zip(p.logits)).collect();
            let part = &mut block[lo..hi];
            // Each live sequence's token (its greedy pick, or a draw from its logits on its own
            // stream) and, with a tokenizer, the text of its tokens so far, EOS left out: per
            // sequence, in parallel (a draw and a decode are each O(vocabulary) or O(length)).
            let chosen: Vec<(u32, Option<Result<String>>)> = part
                .par_iter_mut()
                .zip(&rows)
                .map(|(s, (greedy, logits))| {
                    if s.finish.is_some() {
                        return (*greedy, None);
                    }
                    let token = match (&s.sampling, logits) {
                        (Sampling::Random { .. }, Some(row)) => {
                            sampling::choose(row, &s.sampling, &mut s.rng)
                        }
                        _ => *greedy,
                    };
                    // Without a per-step decode, the text is decoded once, when the sequence ends.
                    let last =
                        s.generated.len() + 1 >= s.max_new || ends_at_eos(model, config, token);
                    let decode = config.stream_text || s.stream.has_stops() || last;
                    let text = model.tokenizer.as_ref().filter(|_| decode).map(|tok| {
                        let mut ids = s.generated.clone();
                        if !ends_at_eos(model, config, token) {
                            ids.push(token);
                        }
                        Ok(tok.decode(&ids)?)
                    });
                    (token, text)
                })
                .collect();
            let mut feed = Vec::with_capacity(part.len().div_ceil(batch_size));
            let mut rows = rows.into_iter().zip(chosen);
            for mb in part.chunks_mut(batch_size) {
                let mut next = Vec::with_capacity(mb.len());
                for (s, ((_, logits), (token, text))) in mb.iter_mut().zip(rows.by_ref()) {
                    if s.finish.is_some() {
                        next.push(pad);
                        continue;
                    }
                    let fed = config
                        .forced
                        .as_ref()
                        .and_then(|f| f.get(s.request)?.get(s.generated.len()).copied())
                        .unwrap_or(token);
                    if let (Some(l), Some(row)) = (&mut s.logits, logits) {
                        l.push(row);
                    }
                    let text = text.transpose()?;
                    accept(model, s, (token, text.as_deref()), config, &mut generated, on_event);
                    if s.finish.is_none() {
                        s.fed.push(fed);
                    }
                    next.push(fed);
                }
                feed.push(next);
            }
            if !step_done {
                return Ok(Some(feed));
            }
            let all_done = block.iter().all(|s| s.finish.is_some());
            let cut = refill && worth_refilling(&block, block_size, max_width);
            Ok((!all_done && !cut).then_some(feed))
        };
    stage.run_block(&input, stats, &mut after_step)?;
    stats.generated_tokens += generated;
    Ok(block)
}

/// Whether `token` ends its sequence as one of the model's EOS ids.
fn ends_at_eos(model: &Model, config: &GenerationConfig, token: u32) -> bool {
    config.stop_on_eos && model.spec.is_eos(token)
}

/// Records `token` for `s`, streams its text (`text`: the decoded text of its tokens with this
/// one, EOS left out; `None` without a tokenizer), and decides whether `s` is finished.
fn accept(
    model: &Model,
    s: &mut Seq,
    (token, text): (u32, Option<&str>),
    config: &GenerationConfig,
    generated: &mut usize,
    on_event: &mut dyn FnMut(Event<'_>),
) {
    s.generated.push(token);
    *generated += 1;
    let is_eos = ends_at_eos(model, config, token);
    let mut finish = if is_eos {
        Some(FinishReason::Eos)
    } else if s.generated.len() >= s.max_new {
        Some(FinishReason::Length)
    } else {
        None
    };
    let delta = match text {
        Some(text) => {
            let (delta, hit_stop) = s.stream.update(text, finish.is_some());
            if hit_stop {
                finish = Some(FinishReason::Stop);
            }
            delta
        }
        None => String::new(),
    };
    on_event(Event::Token { request: s.request, token, text: &delta });
    if let Some(reason) = finish {
        s.finish = Some(reason);
        on_event(Event::Finished { request: s.request, reason });
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::stage::{Feed, Picks};

    fn tiny() -> Model {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../flexgen-model/test_data/tiny-random-opt");
        Model::load(&dir).unwrap()
    }

    /// A stage whose row `r` of micro-batch `k` picks `script[k][r][step]` (logits: one-hot
    /// rows), recording every feed it is given and how many steps it ran; with `groups` > 1 it
    /// reports each step's picks in that many groups of micro-batches, as a pipeline does.
    struct Scripted {
        script: Vec<Vec<Vec<u32>>>,
        vocab: usize,
        feeds: RefCell<Vec<Vec<Vec<u32>>>>,
        steps: RefCell<usize>,
        groups: usize,
    }

    impl Stage for Scripted {
        fn run_block(
            &self,
            block: &BlockInput,
            _stats: &mut RunStats,
            after_step: &mut dyn FnMut(usize, usize, Vec<Picks>) -> Result<Feed>,
        ) -> Result<()> {
            for step in 0..block.steps {
                *self.steps.borrow_mut() += 1;
                let picks = (0..block.ids.len())
                    .map(|k| {
                        let greedy: Vec<u32> =
                            (0..block.rows(k)).map(|r| self.script[k][r][step]).collect();
                        let logits = greedy
                            .iter()
                            .zip(&block.want_logits[k])
                            .map(|(&g, &w)| {
                                w.then(|| {
                                    let mut row = vec![0.0; self.vocab];
                                    row[g as usize] = 50.0;
                                    row
                                })
                            })
                            .collect();
                        Picks { greedy, logits }
                    })
                    .collect::<Vec<Picks>>();
                let per = picks.len().div_ceil(self.groups.max(1)).max(1);
                let (mut feed, mut ended, mut first) = (Vec::new(), false, 0);
                let mut picks = picks.into_iter().peekable();
                while picks.peek().is_some() {
                    let group: Vec<Picks> = picks.by_ref().take(per).collect();
                    let n = group.len();
                    if let Some(part) = after_step(step, first, group)? {
                        feed.extend(part);
                    } else {
                        assert!(picks.peek().is_none(), "a block ends at a step's last group");
                        ended = true;
                    }
                    first += n;
                }
                if ended {
                    break;
                }
                self.feeds.borrow_mut().push(feed);
            }
            Ok(())
        }

        fn finish(&self, _stats: &mut RunStats) -> Result<()> {
            Ok(())
        }
    }

    fn scripted(script: Vec<Vec<Vec<u32>>>) -> Scripted {
        Scripted {
            script,
            vocab: 4096,
            feeds: RefCell::default(),
            steps: RefCell::default(),
            groups: 1,
        }
    }

    /// A pipeline's groups: each step's picks reported group by group give the same tokens,
    /// feeds and finish reasons as the whole step at once, and the block ends at the same step.
    #[test]
    fn picks_reported_in_groups_change_nothing() {
        let model = tiny();
        let eos = 2;
        let script = vec![
            vec![vec![7, eos, 9, 9, 9], vec![3, 4, 5, 6, 7]],
            vec![vec![5, 6, 7, 8, 9], vec![eos, 1, 1, 1, 1]],
            vec![vec![8, 8, eos, 8, 8], vec![9, 9, 9, 9, 9]],
        ];
        let requests: Vec<Request> =
            (0..6).map(|i| Request::tokens(vec![2, 10 + i, 20 + i])).collect();
        // One block of three micro-batches; then blocks of two, refilled (whose decision, taken
        // at a step's last group, would differ if taken at an earlier one).
        for (shape, refill) in [((2, 6), false), ((2, 4), true)] {
            let config =
                GenerationConfig { max_new_tokens: 4, refill, ..GenerationConfig::default() };
            let mut outcomes = Vec::new();
            for groups in [1, 2, 3] {
                let stage = Scripted { groups, ..scripted(script.clone()) };
                let (done, stats) =
                    run(&model, &stage, shape, &requests, &config, &mut |_| {}).unwrap();
                let tokens: Vec<(Vec<u32>, FinishReason)> =
                    done.into_iter().map(|c| (c.tokens, c.finish)).collect();
                outcomes.push((tokens, stats.generated_tokens, stage.feeds.take()));
            }
            assert_eq!(outcomes[0].0[0], (vec![7, eos], FinishReason::Eos));
            assert_eq!(outcomes[1], outcomes[0], "two groups, refill {refill}");
            assert_eq!(outcomes[2], outcomes[0], "three groups, refill {refill}");
        }
    }

    #[test]
    fn a_sequence_ends_at_eos_is_fed_padding_and_the_block_ends_with_its_last_sequence() {
        let model = tiny();
        let eos = 2;
        // Two micro-batches of one row: the first emits EOS at its second step, the second runs
        // to its length (4).
        let stage = scripted(vec![vec![vec![7, eos, 9, 9]], vec![vec![5, 6, 7, 8]]]);
        let requests = vec![Request::tokens(vec![2, 10, 11]), Request::tokens(vec![2, 12])];
        let config = GenerationConfig { max_new_tokens: 4, ..GenerationConfig::default() };
        let mut events = Vec::new();
        let (done, stats) = run(&model, &stage, (1, 2), &requests, &config, &mut |e| {
            if let Event::Finished { request, reason } = e {
                events.push((request, reason));
            }
        })
        .unwrap();
        assert_eq!(done[0].tokens, [7, eos]);
        assert_eq!(done[0].finish, FinishReason::Eos);
        assert_eq!(done[1].tokens, [5, 6, 7, 8]);
        assert_eq!(done[1].finish, FinishReason::Length);
        assert_eq!(stats.generated_tokens, 6);
        assert_eq!(events, [(0, FinishReason::Eos), (1, FinishReason::Length)]);
        // After its EOS the first sequence is fed padding (1); the block stops once both end:
        // three feeds, no fourth.
        let feeds = stage.feeds.borrow();
        assert_eq!(feeds.len(), 3);
        assert_eq!(feeds[0], [vec![7], vec![5]]);
        assert_eq!(feeds[1], [vec![eos], vec![6]]);
        assert_eq!(feeds[2], [vec![1], vec![7]]);
        assert_eq!(*stage.steps.borrow(), 4);
    }

    #[test]
    fn a_block_stops_early_when_every_sequence_has_finished() {
        let model = tiny();
        let stage = scripted(vec![vec![vec![3, 2, 4, 4, 4, 4], vec![2, 4, 4, 4, 4, 4]]]);
        let requests = vec![Request::tokens(vec![2, 10]), Request::tokens(vec![2, 11])];
        let config = GenerationConfig { max_new_tokens: 6, ..GenerationConfig::default() };
        let (done, _) = run(&model, &stage, (2, 2), &requests, &config, &mut |_| {}).unwrap();
        assert_eq!(done[0].tokens, [3, 2]);
        assert_eq!(done[1].tokens, [2]);
        assert_eq!(*stage.steps.borrow(), 2, "two steps of six: both ended by then");
    }

    #[test]
    fn sampled_rows_draw_from_their_logits_and_forced_tokens_are_fed() {
        let model = tiny();
        // The logits are one-hot at the script's token, so a draw at any temperature picks it.
        let stage = scripted(vec![vec![vec![40, 41, 42], vec![50, 51, 52]]]);
        let mut sampled = Request::tokens(vec![2, 10]);
        sampled.sampling =
            Some(Sampling::Random { temperature: 1.0, top_k: None, top_p: None, seed: 1 });
        let requests = vec![sampled, Request::tokens(vec![2, 11])];
        let config = GenerationConfig {
            max_new_tokens: 3,
            output_logits: true,
            forced: Some(vec![vec![], vec![60, 61]]),
            ..GenerationConfig::default()
        };
        let (done, _) = run(&model, &stage, (2, 2), &requests, &config, &mut |_| {}).unwrap();
        assert_eq!(done[0].tokens, [40, 41, 42]);
        assert_eq!(done[1].tokens, [50, 51, 52], "the chosen tokens are reported");
        assert_eq!(stage.feeds.borrow()[0], [vec![40, 60]], "the forced ones are fed");
        assert_eq!(done[1].logits.as_ref().map(Vec::len), Some(3));
    }

    /// A stage whose every row picks its last token + 1, whatever block it runs in: a
    /// sequence's tokens do not depend on where it runs. Records each block's widest context
    /// and its rows, and counts row-steps (slots used, finished rows included).
    #[derive(Default)]
    struct Counting {
        blocks: RefCell<Vec<(usize, Vec<Vec<u32>>)>>,
        slot_steps: RefCell<usize>,
    }

    impl Stage for Counting {
        fn run_block(
            &self,
            block: &BlockInput,
            _stats: &mut RunStats,
            after_step: &mut dyn FnMut(usize, usize, Vec<Picks>) -> Result<Feed>,
        ) -> Result<()> {
            let w = block.width;
            let rows: Vec<Vec<u32>> = (0..block.ids.len())
                .flat_map(|k| {
                    (0..block.rows(k)).map(move |r| block.ids[k][r * w..(r + 1) * w].to_vec())
                })
                .collect();
            self.blocks.borrow_mut().push((w, rows));
            let mut last: Vec<Vec<u32>> = (0..block.ids.len())
                .map(|k| (0..block.rows(k)).map(|r| block.ids[k][(r + 1) * w - 1]).collect())
                .collect();
            for step in 0..block.steps {
                *self.slot_steps.borrow_mut() += block.starts.iter().map(Vec::len).sum::<usize>();
                let picks = last
                    .iter()
                    .map(|mb| Picks {
                        greedy: mb.iter().map(|t| t + 1).collect(),
                        logits: mb.iter().map(|_| None).collect(),
                    })
                    .collect();
                match after_step(step, 0, picks)? {
                    Some(feed) => last = feed,
                    None => break,
                }
            }
            Ok(())
        }

        fn finish(&self, _stats: &mut RunStats) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn refill_moves_unfinished_sequences_with_their_context_and_changes_no_token() {
        let model = tiny();
        // Blocks of two: the long request (12 tokens) shares its first block with a short one;
        // once the short one ends, the long one moves on beside the next request.
        let lens: [usize; 5] = [12, 1, 2, 3, 1];
        let prompts: [u32; 5] = [100, 200, 300, 400, 500];
        let requests: Vec<Request> = lens
            .iter()
            .zip(prompts)
            .map(|(&n, p)| {
                let mut r = Request::tokens(vec![2, p]);
                r.max_new_tokens = Some(n);
                r
            })
            .collect();
        let mut runs = Vec::new();
        for refill in [false, true] {
            let stage = Counting::default();
            let config =
                GenerationConfig { refill, stop_on_eos: false, ..GenerationConfig::default() };
            let mut completed = Vec::new();
            let mut events = Vec::new();
            let (done, stats) = run(&model, &stage, (1, 2), &requests, &config, &mut |e| match e {
                Event::Completed { request, completion } => {
                    completed.push(request);
                    events.push(format!("c{request}"));
                    assert_eq!(completion.tokens.len(), lens[request]);
                }
                Event::BlockEnd => events.push("end".into()),
                _ => {}
            })
            .unwrap();
            completed.sort_unstable();
            assert_eq!(completed, [0, 1, 2, 3, 4], "each request completes once");
            assert_eq!(events.last().map(String::as_str), Some("end"));
            for ((c, p), n) in done.iter().zip(prompts).zip(lens) {
                assert_eq!(c.tokens, (p + 1..).take(n).collect::<Vec<_>>());
                assert_eq!(c.prompt_tokens, [2, p]);
            }
            runs.push((stage, stats));
        }
        let ((plain, plain_stats), (refilled, stats)) = (&runs[0], &runs[1]);
        assert_eq!(plain_stats.recomputed_tokens, 0);
        assert_eq!(stats.prompt_tokens, plain_stats.prompt_tokens);
        assert!(stats.recomputed_tokens > 0);
        // The long request's second block prefills its prompt and the tokens fed so far.
        let blocks = refilled.blocks.borrow();
        assert_eq!(blocks[1].1[0], [2, 100, 101]);
        let pad = model.spec.pad_token_id.unwrap();
        assert_eq!(blocks[1].1[1], [pad, 2, 300], "the next request, left-padded");
        assert!(
            *refilled.slot_steps.borrow() < *plain.slot_steps.borrow(),
            "refill uses fewer slot-steps: {} against {}",
            refilled.slot_steps.borrow(),
            plain.slot_steps.borrow()
        );
    }
}
