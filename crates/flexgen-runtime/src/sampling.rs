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

/// Picks the next token.
pub fn choose(logits: &[f32], sampling: &Sampling, rng: &mut impl Rng) -> u32 {
    let Sampling::Random { temperature, top_k, top_p, .. } = *sampling else {
        return argmax(logits);
    };
    let mut cand: Vec<(usize, f32)> = logits.iter().map(|&l| l / temperature).enumerate().collect();
    cand.sort_by(|a, b| b.1.total_cmp(&a.1));
    if let Some(k) = top_k {
        cand.truncate(k.max(1));
    }
    let max = cand[0].1;
    let mut probs: Vec<f32> = cand.iter().map(|c| (c.1 - max).exp()).collect();
    let sum: f32 = probs.iter().sum();
    for p in &mut probs {
        *p /= sum;
    }
    if let Some(p) = top_p {
        let mut acc = 0.0;
        let keep = probs
            .iter()
            .position(|&q| {
                acc += q;
                acc >= p
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        let s: f32 = probs.iter().sum();
        for q in &mut probs {
            *q /= s;
        }
    }
    let mut r: f32 = rng.random_range(0.0..1.0);
    for (i, &q) in probs.iter().enumerate() {
        if r < q {
            return u32::try_from(cand[i].0).expect("vocabulary fits in u32");
        }
        r -= q;
    }
    u32::try_from(cand[probs.len() - 1].0).expect("vocabulary fits in u32")
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
    fn invalid_parameters_name_the_field() {
        let s = Sampling::Random { temperature: 0.0, top_k: None, top_p: None, seed: 0 };
        let Err(crate::Error::Config { field, .. }) = s.validate() else { panic!() };
        assert_eq!(field, "temperature");
        let s = Sampling::Random { temperature: 1.0, top_k: None, top_p: Some(1.5), seed: 0 };
        let Err(crate::Error::Config { field, .. }) = s.validate() else { panic!() };
        assert_eq!(field, "top_p");
    }
}
