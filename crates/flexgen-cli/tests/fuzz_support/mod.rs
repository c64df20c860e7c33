//! The mutation fuzzer the fuzz tests share (`crates/flexgen-cli/tests/fuzz.rs` and
//! `crates/flexgen-serve/tests/fuzz.rs` include this file): deterministic inputs made from
//! examples by byte flips, cuts, insertions, splices and numbers replaced by extremes.
//! `FUZZ_INPUTS` sets how many per format (default 10,000), `FUZZ_SEED` the stream.

#![allow(dead_code, reason = "each fuzz test uses part of it")]

use std::panic::{AssertUnwindSafe, catch_unwind};

pub(crate) fn inputs() -> usize {
    std::env::var("FUZZ_INPUTS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000)
}

/// A small deterministic generator (xorshift64*).
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(salt: u64) -> Self {
        let seed: u64 = std::env::var("FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
        Self((seed ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub(crate) fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % (n.max(1) as u64)).expect("fits")
    }
}

/// Values that break arithmetic and allocations when a parser trusts them.
pub(crate) const EXTREMES: [&str; 10] = [
    "0",
    "-1",
    "4294967295",
    "18446744073709551615",
    "1e308",
    "-1e308",
    "NaN",
    "inf",
    "0.5",
    "65536",
];

/// One mutation of `seed`, one to four edits deep.
pub(crate) fn mutate(seed: &[u8], rng: &mut Rng, others: &[Vec<u8>]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..=rng.below(4) {
        let len = v.len().max(1);
        match rng.below(6) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                let n = rng.below(16).min(v.len() - i);
                v.drain(i..i + n);
            }
            2 => {
                let i = rng.below(len).min(v.len());
                let bytes: Vec<u8> =
                    (0..=rng.below(8)).map(|_| rng.next().to_le_bytes()[0]).collect();
                v.splice(i..i, bytes);
            }
            3 if !others.is_empty() => {
                // Splice a piece of another example in.
                let o = &others[rng.below(others.len())];
                let a = rng.below(o.len());
                let b = (a + rng.below(64)).min(o.len());
                let i = rng.below(len).min(v.len());
                v.splice(i..i, o[a..b].iter().copied());
            }
            _ => {
                // Replace a run of digits with an extreme value.
                let digits: Vec<usize> = (0..v.len()).filter(|&i| v[i].is_ascii_digit()).collect();
                if let Some(&i) = digits.get(rng.below(digits.len())) {
                    let mut j = i;
                    while j < v.len() && (v[j].is_ascii_digit() || v[j] == b'.') {
                        j += 1;
                    }
                    let x = EXTREMES[rng.below(EXTREMES.len())];
                    v.splice(i..j, x.bytes());
                }
            }
        }
    }
    v
}

/// Runs `check` on `inputs()` mutations of `seeds`; panics name the input that panicked.
pub(crate) fn fuzz(name: &str, salt: u64, seeds: &[Vec<u8>], mut check: impl FnMut(&[u8])) {
    assert!(!seeds.is_empty(), "{name}: no seed inputs");
    let mut rng = Rng::new(salt);
    let (mut ok, n) = (0usize, inputs());
    for i in 0..n {
        let input = mutate(&seeds[i % seeds.len()], &mut rng, seeds);
        let r = catch_unwind(AssertUnwindSafe(|| check(&input)));
        assert!(
            r.is_ok(),
            "{name}: input {i} panicked (FUZZ_SEED as set, salt {salt}): {:?}",
            String::from_utf8_lossy(&input)
        );
        ok += 1;
    }
    eprintln!("{name}: {ok} inputs, no panic");
}
