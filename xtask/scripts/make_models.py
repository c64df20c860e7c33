#!/usr/bin/env python3
"""Builds flexgen's two committed models and the golden outputs that the Rust tests compare against.

1. A byte-level BPE tokenizer (tokenizer.json, OPT's special tokens: <s>=0 <pad>=1 </s>=2 <unk>=3, and
   `</s>` prepended as BOS, as OPT's tokenizer does) trained on the King James Bible (public domain,
   from Debian's bible-kjv package: see kjv_corpus.sh).
2. `tiny-random-opt`: a 2-layer, 64-wide OPT with seeded random weights (fp32) in the real Hugging Face
   layout. The golden file holds what Hugging Face transformers computes from exactly these files:
   prefill logits, per-step logits and greedy tokens for single prompts and for a left-padded batch.
3. `opt-kjv`: a 4-layer, 256-wide OPT trained for a few minutes on the same text, stored in fp16,
   the bundled default model of `flexgen-run`. Its golden file holds HF's greedy continuations.

Run on a machine with torch + transformers (the GPU machine; training uses CUDA when present):
    python3 make_models.py --corpus kjv.txt --out OUTDIR [--train-seconds 240]
Reference outputs are always computed on the CPU in fp32 with eager attention.
"""
import argparse
import json
import math
import os
import random
import time

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import OPTConfig, OPTForCausalLM
import transformers

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
PAD, BOS, EOS = 1, 2, 2

GOLDEN_PROMPTS = [
    "In the beginning God created",
    "And the earth was",
    "Jesus wept.",
    "The LORD is my shepherd; I shall not want. He maketh me to lie down in green pastures:",
]


def train_tokenizer(corpus, vocab_size, path):
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train([corpus], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", BOS)]
    )
    tok.save(path)
    return tok


def opt_config(vocab, hidden, layers, heads, ffn, max_pos):
    return OPTConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        ffn_dim=ffn,
        num_attention_heads=heads,
        max_position_embeddings=max_pos,
        word_embed_proj_dim=hidden,
        do_layer_norm_before=True,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        activation_function="relu",
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        enable_bias=True,
        layer_norm_elementwise_affine=True,
        tie_word_embeddings=True,
    )


def write_hf_dir(model, tok_path, out_dir, dtype):
    os.makedirs(out_dir, exist_ok=True)
    model.to(dtype).save_pretrained(out_dir)
    with open(tok_path) as f, open(os.path.join(out_dir, "tokenizer.json"), "w") as g:
        g.write(f.read())
    model.to(torch.float32)


def load_reference(out_dir):
    m = OPTForCausalLM.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager")
    m.generation_config.eos_token_id = None  # golden runs generate a fixed number of tokens
    m.generation_config.pad_token_id = PAD
    return m.eval()


@torch.no_grad()
def golden(out_dir, tok, prompts, new_tokens, with_logits):
    """Reference outputs of HF transformers (CPU, fp32, eager attention) for the model in out_dir."""
    model = load_reference(out_dir)
    tensors, record = {}, {"prompts": [], "new_tokens": new_tokens}
    for i, text in enumerate(prompts):
        ids = tok.encode(text).ids
        x = torch.tensor([ids])
        out = model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )
        gen = out.sequences[0, len(ids):].tolist()
        record["prompts"].append({"text": text, "input_ids": ids, "greedy": gen,
                                  "greedy_text": tok.decode(gen)})
        if with_logits:
            tensors[f"prompt{i}.prefill_logits"] = model(x).logits[0].contiguous()
            tensors[f"prompt{i}.step_logits"] = torch.stack([l[0] for l in out.logits]).contiguous()
    # The same prompts as one left-padded batch.
    encs = [tok.encode(t).ids for t in prompts]
    width = max(len(e) for e in encs)
    ids = torch.tensor([[PAD] * (width - len(e)) + e for e in encs])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encs])
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
        output_logits=True, return_dict_in_generate=True,
    )
    record["batch"] = {"input_ids": ids.tolist(), "attention_mask": mask.tolist(),
                       "greedy": out.sequences[:, width:].tolist()}
    if with_logits:
        tensors["batch.step_logits"] = torch.stack(list(out.logits)).contiguous()
    record["transformers"] = transformers.__version__
    record["torch"] = torch.__version__
    with open(os.path.join(out_dir, "golden.json"), "w") as f:
        json.dump(record, f, indent=1)
    if tensors:
        save_file(tensors, os.path.join(out_dir, "golden.safetensors"))
    return record


def randomize(model, seed):
    """Seeded random weights, larger than HF's init so that greedy choices have clear margins."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def train(model, data, seconds, device, seq=128, batch=96, lr=2e-3):
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    data = torch.tensor(data, dtype=torch.long)
    rng = random.Random(0)
    start, step, est_steps = time.time(), 0, None
    while True:
        elapsed = time.time() - start
        if elapsed > seconds:
            break
        if step == 50:
            est_steps = int(seconds / (elapsed / 50))
        total = est_steps or 10**9
        warm = 100
        f = min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total))))
        for gr in opt.param_groups:
            gr["lr"] = lr * f
        starts = [rng.randrange(0, len(data) - seq) for _ in range(batch)]
        x = torch.stack([torch.cat([torch.tensor([BOS]), data[s:s + seq - 1]]) for s in starts]).to(device)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 500 == 0:
            print(f"step {step} loss {loss.item():.3f} lr {lr * f:.2e} t {elapsed:.0f}s", flush=True)
        step += 1
    print(f"trained {step} steps, final loss {loss.item():.3f}", flush=True)
    return model.to("cpu").eval(), step, loss.item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--train-seconds", type=float, default=240)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    tok_path = os.path.join(args.out, "tokenizer.json")
    tok = train_tokenizer(args.corpus, args.vocab, tok_path)
    vocab = tok.get_vocab_size()
    print("tokenizer vocab", vocab, flush=True)

    # 2. tiny random model + full golden logits.
    tiny = OPTForCausalLM(opt_config(vocab, 64, 2, 4, 256, 128))
    randomize(tiny, 1234)
    tiny_dir = os.path.join(args.out, "tiny-random-opt")
    write_hf_dir(tiny, tok_path, tiny_dir, torch.float32)
    rec = golden(tiny_dir, tok, GOLDEN_PROMPTS, 16, with_logits=True)
    print("tiny golden:", [p["greedy"][:6] for p in rec["prompts"]], flush=True)

    # 3. bundled model trained on the corpus.
    text = open(args.corpus).read()
    data = tok.encode(text, add_special_tokens=False).ids
    print("corpus tokens", len(data), flush=True)
    kjv = OPTForCausalLM(opt_config(vocab, 256, 4, 4, 1024, 256))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kjv, steps, loss = train(kjv, data, args.train_seconds, device)
    kjv_dir = os.path.join(args.out, "opt-kjv")
    write_hf_dir(kjv, tok_path, kjv_dir, torch.float16)
    with open(os.path.join(kjv_dir, "TRAINING.json"), "w") as f:
        json.dump({"corpus": "King James Bible (Debian bible-kjv), see kjv_corpus.sh",
                   "corpus_tokens": len(data), "steps": steps, "final_loss": loss,
                   "train_seconds": args.train_seconds, "device": device,
                   "gpu": torch.cuda.get_device_name() if device == "cuda" else None}, f, indent=1)
    rec = golden(kjv_dir, tok, ["In the beginning", "And Jesus said unto them,"], 32, with_logits=False)
    for p in rec["prompts"]:
        print(repr(p["text"] + p["greedy_text"]), flush=True)


if __name__ == "__main__":
    main()
