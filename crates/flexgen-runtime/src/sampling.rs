//! Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p
//! (applied in that order, as Hugging Face `generate` does).

use rand::Rng;

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// The most likely token (the first one on ties, as `argmax` does).
    Greedy,
    /// A random token from the tempered, truncated distribution.
    Random {
        /// Divides the logits; must be positive.
        temperature: f32,
        /// Keep only the `k` most likely tokens.
        top_k: Option<usize>,
        /// Keep the smallest set of most likely tokens whose probability reaches `p`.
        top_p: Option<f32>,
        /// Seed; each sequence draws from its own stream (seed, request index), so a sequence's
        /// output does not depend on how requests are batched.
        seed: u64,
    },
}

impl Sampling {
    /// Checks the parameters.
    pub fn validate(&self) -> crate::Result<()> {
        if let Sampling::Random { temperature, top_k, top_p, .. } = *self {
            let bad = |field, message: String| Err(crate::Error::Config { field, message });
            if !(temperature.is_finite() && temperature > 0.0) {
                return bad(
                    "temperature",
                    format!("{temperature} must be positive (use greedy decoding for 0)"),
                );
            }
            if top_k == Some(0) {
                return bad("top_k", "0 keeps no token; use at least 1".into());
            }
            if let Some(p) = top_p
                && !(p > 0.0 && p <= 1.0)
            {
                return bad("top_p", format!("{p} must be in (0, 1]"));
            }
        }
        Ok(())
    }
}

/// Index of the largest value; the first one on ties.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    u32::try_from(best).expect("vocabulary fits in u32")
}

/// Tokens per chunk of the draw's running total.
const DRAW_CHUNK: usize = 1024;

/// The sum of `v` in eight lanes (which the compiler vectorizes; a serial sum is a chain of
/// dependent additions).
fn lane_sum(v: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut lanes = v.chunks_exact(8);
    for c in &mut lanes {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + lanes.remainder().iter().sum::<f32>()
}

/// Picks the next token.
///
/// Costs O(vocabulary) per call (plus a partial sort of the nucleus with `top_p`): weights are
/// computed in vocabulary order, top-k keeps the k largest by selection, top-p sorts only as many
/// of the largest as its nucleus needs. The draw walks the kept tokens in vocabulary order, not by
/// probability: logits that differ by rounding (fp16 on the GPU, f32 on the CPU) reorder
/// near-equal tokens but move the cumulative distribution only as much as the probabilities move,
/// so the same random number picks the same token on both devices except at a boundary.
pub fn choose(logits: &[f32], sampling: &Sampling, rng: &mut impl Rng) -> u32 {
    let Sampling::Random { temperature, top_k, top_p, .. } = *sampling else {
        return argmax(logits);
    };
    thread_local! {
        /// The weights of the last draw on this thread, reused: a vocabulary's worth of fresh
        /// memory per draw costs page faults each step.
        static WEIGHTS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    WEIGHTS.with_borrow_mut(|w| draw(logits, (temperature, top_k, top_p), rng, w))
}

/// [`choose`]'s draw at (temperature, top-k, top-p), with `w` as the weights' memory.
fn draw(
    logits: &[f32],
    (temperature, top_k, top_p): (f32, Option<usize>, Option<f32>),
    rng: &mut impl Rng,
    w: &mut Vec<f32>,
) -> u32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let inv_t = 1.0 / temperature;
    w.clear();
    w.extend(logits.iter().map(|&l| flexgen_tensor::math::exp_nonpositive((l - max) * inv_t)));
    let w = w.as_mut_slice();
    // Larger weight first; on ties the lower id first (a total order, so selections are exact).
    let before = |w: &[f32], a: usize, b: usize| w[b].total_cmp(&w[a]).then(a.cmp(&b));
    if let Some(k) = top_k
        && k.max(1) < w.len()
    {
        let mut ids: Vec<usize> = (0..w.len()).collect();
        ids.select_nth_unstable_by(k.max(1) - 1, |&a, &b| before(w, a, b));
        for &i in &ids[k.max(1)..] {
            w[i] = 0.0;
        }
    }
    if let Some(p) = top_p {
        let total: f32 = w.iter().sum();
        let mut ids: Vec<usize> = (0..w.len()).filter(|&i| w[i] > 0.0).collect();
        let mut m = ids.len().min(64);
        loop {
            // The m largest, sorted: enough when they reach p (or when they are all).
            if m < ids.len() {
                ids.select_nth_unstable_by(m - 1, |&a, &b| before(w, a, b));
            }
            ids[..m].sort_unstable_by(|&a, &b| before(w, a, b));
            let mut acc = 0.0;
            let keep = ids[..m].iter().position(|&i| {
                acc += w[i] / total;
                acc >= p
            });
            if let Some(j) = keep {
                for &i in &ids[j + 1..] {
                    w[i] = 0.0;
                }
                break;
            }
            if m == ids.len() {
                break;
            }
            m = (m * 4).min(ids.len());
        }
    }
    // The draw: the chunk whose running total passes r (chunk sums vectorize), then the token
    // inside it, in vocabulary order.
    let sums: Vec<f32> = w.chunks(DRAW_CHUNK).map(lane_sum).collect();
    let total: f32 = sums.iter().sum();
    let mut r: f32 = rng.random_range(0.0..1.0) * total;
    for (c, (chunk, &sum)) in w.chunks(DRAW_CHUNK).zip(&sums).enumerate() {
        if r < sum {
            let mut last = None;
            for (i, &q) in chunk.iter().enumerate() {
                if r < q {
                    return u32::try_from(c * DRAW_CHUNK + i).expect("vocabulary fits in u32");
                }
                r -= q;
                if q > 0.0 {
                    last = Some(i);
                }
            }
            // Rounding left r past the chunk's own walk: its last kept token.
            if let Some(i) = last {
                return u32::try_from(c * DRAW_CHUNK + i).expect("vocabulary fits in u32");
            }
        }
        r -= sum;
    }
    let last = w.iter().rposition(|&q| q > 0.0).unwrap_or(0);
    u32::try_from(last).expect("vocabulary fits in u32")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rng() -> rand_chacha::ChaCha8Rng {
        rand_chacha::ChaCha8Rng::seed_from_u64(7)
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.0, 3.0, 3.0, 1.0]), 1);
        assert_eq!(choose(&[0.0, 3.0, 1.0], &Sampling::Greedy, &mut rng()), 1);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let s = Sampling::Random { temperature: 5.0, top_k: Some(1), top_p: None, seed: 0 };
        let mut r = rng();
        for _ in 0..50 {
            assert_eq!(choose(&[0.1, 0.3, 0.2], &s, &mut r), 1);
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // softmax([10, 9, -10, -10]) puts > 99.99 % on the first two tokens.
        let s = Sampling::Random { temperature: 1.0, top_k: None, top_p: Some(0.9), seed: 0 };
        let mut r = rng();
        let mut seen = [0usize; 4];
        for _ in 0..400 {
            seen[choose(&[10.0, 9.0, -10.0, -10.0], &s, &mut r) as usize] += 1;
        }
        assert!(seen[0] > 0 && seen[1] > 0, "{seen:?}");
        assert_eq!(seen[2] + seen[3], 0, "{seen:?}");
    }

    #[test]
    fn a_nucleus_larger_than_the_first_selection_is_found_whole() {
        // 1000 equal logits: top-p 0.4995 keeps 500 of them (the lower ids on ties); after top-k 300, half
        // of those, 150; every draw lands inside, and both halves of the nucleus are drawn.
        let logits = vec![1.0f32; 1000];
        let mut r = rng();
        for (top_k, bound) in [(None, 500), (Some(300), 150)] {
            let s = Sampling::Random { temperature: 1.0, top_k, top_p: Some(0.4995), seed: 0 };
            let draws: Vec<u32> = (0..2000).map(|_| choose(&logits, &s, &mut r)).collect();
            assert!(draws.iter().all(|&t| t < bound), "{top_k:?}");
            assert!(draws.iter().any(|&t| t < bound / 2) && draws.iter().any(|&t| t >= bound / 2));
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // p = softmax([ln 3, 0]) = [0.75, 0.25]
        let s = Sampling::Random { temperature: 1.0, top_k: None, top_p: None, seed: 0 };
        let mut r = rng();
        let n = 4000;
        let first = (0..n).filter(|_| choose(&[3f32.ln(), 0.0], &s, &mut r) == 0).count();
        let frac = first as f64 / f64::from(n);
        assert!((frac - 0.75).abs() < 0.03, "{frac}");
    }

    #[test]
    fn logits_rounded_to_fp16_draw_the_same_tokens() {
        // 4096 random logits, as a random model gives: many near-equal values, whose order fp16
        // rounding changes. The draws must follow the distribution, not that order.
        let mut g = rng();
        let logits: Vec<f32> = (0..4096).map(|_| g.random_range(-2.0f32..2.0)).collect();
        let rounded: Vec<f32> = logits.iter().map(|&l| half::f16::from_f32(l).to_f32()).collect();
        for s in [
            Sampling::Random { temperature: 0.9, top_k: None, top_p: None, seed: 0 },
            Sampling::Random { temperature: 0.7, top_k: None, top_p: Some(0.95), seed: 0 },
            Sampling::Random { temperature: 0.7, top_k: Some(2000), top_p: Some(0.8), seed: 0 },
        ] {
            let (mut a, mut b) = (rng(), rng());
            let same =
                (0..500).filter(|_| choose(&logits, &s, &mut a) == choose(&rounded, &s, &mut b));
            let same = same.count();
            assert!(same >= 490, "{same} of 500 for {s:?}");
        }
    }

    #[test]
    fn invalid_parameters_name_the_field() {
        let s = Sampling::Random { temperature: 0.0, top_k: None, top_p: None, seed: 0 };
        let Err(crate::Error::Config { field, .. }) = s.validate() else { panic!() };
        assert_eq!(field, "temperature");
        let s = Sampling::Random { temperature: 1.0, top_k: None, top_p: Some(1.5), seed: 0 };
        let Err(crate::Error::Config { field, .. }) = s.validate() else { panic!() };
        assert_eq!(field, "top_p");
    }
}
