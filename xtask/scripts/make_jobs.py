#!/usr/bin/env python3
"""Writes a JSONL batch job for `flexgen-run batch`: N requests whose prompts are P tokens long
(uniform in [--min-prompt, --max-prompt] under the given tokenizer.json, BOS not counted),
max_new_tokens drawn from --gen (a comma list), and a mix of greedy lines, sampled lines
(temperature 0.8) and lines with stop strings. Seeded: the same arguments give the same file.

usage: make_jobs.py TOKENIZER_JSON N OUT [--min-prompt 64] [--max-prompt 512] [--gen 16,32,64,128]
       [--seed 0]
Prints the mean prompt tokens and mean max_new_tokens (the fixed-shape benchmark's lengths)."""
import argparse
import json
import random

from tokenizers import Tokenizer

ap = argparse.ArgumentParser()
ap.add_argument("tokenizer")
ap.add_argument("n", type=int)
ap.add_argument("out")
ap.add_argument("--min-prompt", type=int, default=64)
ap.add_argument("--max-prompt", type=int, default=512)
ap.add_argument("--gen", default="16,32,64,128")
ap.add_argument("--seed", type=int, default=0)
a = ap.parse_args()
tok = Tokenizer.from_file(a.tokenizer)
vocab = tok.get_vocab_size()
gens = [int(g) for g in a.gen.split(",")]
rng = random.Random(a.seed)
total_p = total_g = 0
with open(a.out, "w") as f:
    for i in range(a.n):
        want = rng.randint(a.min_prompt, a.max_prompt)
        ids = [rng.randrange(4, vocab) for _ in range(want)]
        text = tok.decode(ids)
        # Re-encoding merges some pieces: trim or extend until the prompt has `want` tokens.
        enc = tok.encode(text, add_special_tokens=False).ids
        while len(enc) < want:
            enc += [rng.randrange(4, vocab) for _ in range(want - len(enc))]
            text = tok.decode(enc)
            enc = tok.encode(text, add_special_tokens=False).ids
        text = tok.decode(enc[:want])
        n = len(tok.encode(text, add_special_tokens=False).ids)
        gen = rng.choice(gens)
        line = {"id": f"r{i}", "prompt": text, "max_new_tokens": gen}
        kind = i % 3
        if kind == 1:
            line["temperature"] = 0.8
        elif kind == 2:
            line["stop"] = ["\n\n", " the"]
        f.write(json.dumps(line) + "\n")
        total_p += n
        total_g += gen
print(f"requests {a.n} mean_prompt_tokens {total_p / a.n:.0f} mean_max_new_tokens {total_g / a.n:.0f}")
