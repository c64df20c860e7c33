"""Greedy generation with transformers (fp32, CPU) printing, at every step, the top two tokens and
their logit gap relative to the largest |logit|: where the gap is below fp16's resolution
(about 2e-3 here), an fp16 executor may pick the other token. Usage:
  python3 xtask/scripts/near_tie.py crates/flexgen-model/test_data/tiny-random-llama Hello 16
"""
import sys

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

d, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 16
tok = Tokenizer.from_file(d + "/tokenizer.json")
m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
ids = tok.encode(prompt).ids
print("prompt ids", ids)
x = torch.tensor([ids])
with torch.no_grad():
    for step in range(n):
        logits = m(x).logits[0, -1]
        v, i = logits.topk(2)
        rel = float((v[0] - v[1]) / logits.abs().max())
        print(f"step {step}: {int(i[0])} {tok.decode([int(i[0])])!r} over {int(i[1])} "
              f"{tok.decode([int(i[1])])!r}: gap {float(v[0] - v[1]):.5f}, relative {rel:.1e}"
              + ("  <- near tie" if rel < 2e-3 else ""))
        x = torch.cat([x, i[:1].view(1, 1)], 1)
