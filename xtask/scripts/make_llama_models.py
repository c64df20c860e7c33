#!/usr/bin/env python3
"""Builds the tiny random Llama-family models the golden tests compare against (issue 17):

- `tiny-random-llama`: Llama 3 structure — grouped-query attention (4 heads, 2 key/value heads),
  rotary positions with `rope_type` "llama3" scaling (an original context of 32, so that the
  scaling moves most frequencies), RMSNorm, SwiGLU, an untied LM head;
- `tiny-random-mistral`: Mistral — one key/value head for four query heads, untied head;
- `tiny-random-qwen2`: Qwen2 — q/k/v biases, tied embeddings;
- `tiny-random-llama-bf16`: the Llama above stored in bfloat16, as published checkpoints are
  (its golden files are transformers' fp32 computation from those bf16 weights);
- `tiny-random-opt-350m`: OPT-350M's structure — embeddings narrower than the hidden size
  (`word_embed_proj_dim` 32, projected in to 64 and out again before the tied LM head) and
  LayerNorm after each residual (`do_layer_norm_before` false, no final LayerNorm).

Each is 2 layers, 64 wide, seeded random fp32 weights in the Hugging Face layout (config.json,
model.safetensors) with the tiny OPT's tokenizer.json, and golden files of what transformers
computes from exactly these files (CPU, fp32, eager attention): prefill logits, per-step logits and
greedy tokens for single prompts and for a left-padded batch, as make_models.py writes for OPT.

    python3 xtask/scripts/make_llama_models.py [--out crates/flexgen-model/test_data] [--only NAME]
"""
import argparse
import json
import os

import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

PAD, BOS, EOS = 1, 2, 2
PROMPTS = [
    "In the beginning God created",
    "And the earth was",
    "Jesus wept.",
    "The LORD is my shepherd; I shall not want. He maketh me to lie down in green pastures:",
]
NEW_TOKENS = 16


def configs(vocab):
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5,
                  bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    return {
        "tiny-random-llama": LlamaConfig(
            **common, num_key_value_heads=2, tie_word_embeddings=False,
            rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
        "tiny-random-mistral": MistralConfig(
            **common, num_key_value_heads=1, tie_word_embeddings=False, rope_theta=10000.0,
            sliding_window=None),
        "tiny-random-qwen2": Qwen2Config(
            **common, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0),
        # Last, so that the models above keep their seeds.
        "tiny-random-opt-350m": OPTConfig(
            vocab_size=vocab, hidden_size=64, ffn_dim=160, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32,
            do_layer_norm_before=False, enable_bias=True, activation_function="relu",
            tie_word_embeddings=True, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
            dropout=0.0, attention_dropout=0.0),
    }


def randomize(model, seed):
    """Seeded random weights, larger than HF's init so that greedy choices have clear margins."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


@torch.no_grad()
def golden(out_dir, tok):
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    model.generation_config.eos_token_id = None  # golden runs generate a fixed number of tokens
    model.generation_config.pad_token_id = PAD
    tensors, record = {}, {"prompts": [], "new_tokens": NEW_TOKENS}
    for i, text in enumerate(PROMPTS):
        ids = tok.encode(text).ids
        x = torch.tensor([ids])
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
        gen = out.sequences[0, len(ids):].tolist()
        record["prompts"].append({"text": text, "input_ids": ids, "greedy": gen,
                                  "greedy_text": tok.decode(gen)})
        tensors[f"prompt{i}.prefill_logits"] = model(x).logits[0].contiguous()
        tensors[f"prompt{i}.step_logits"] = torch.stack([l[0] for l in out.logits]).contiguous()
    encs = [tok.encode(t).ids for t in PROMPTS]
    width = max(len(e) for e in encs)
    ids = torch.tensor([[PAD] * (width - len(e)) + e for e in encs])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encs])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    record["batch"] = {"input_ids": ids.tolist(), "attention_mask": mask.tolist(),
                       "greedy": out.sequences[:, width:].tolist()}
    tensors["batch.step_logits"] = torch.stack(list(out.logits)).contiguous()
    record["transformers"] = transformers.__version__
    record["torch"] = torch.__version__
    with open(os.path.join(out_dir, "golden.json"), "w") as f:
        json.dump(record, f, indent=1)
    save_file(tensors, os.path.join(out_dir, "golden.safetensors"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="crates/flexgen-model/test_data")
    ap.add_argument("--only", help="write only this model (its seed is unchanged)")
    a = ap.parse_args()
    tok_path = os.path.join(a.out, "tiny-random-opt", "tokenizer.json")
    tok = Tokenizer.from_file(tok_path)
    torch.manual_seed(0)
    for seed, (name, cfg) in enumerate(configs(tok.get_vocab_size()).items()):
        if a.only and name != a.only:
            continue
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
        randomize(model, 4321 + seed)
        out_dir = os.path.join(a.out, name)
        os.makedirs(out_dir, exist_ok=True)
        model.to(torch.float32).save_pretrained(out_dir)
        with open(tok_path) as f, open(os.path.join(out_dir, "tokenizer.json"), "w") as g:
            g.write(f.read())
        golden(out_dir, tok)
        print(name, "written to", out_dir)
        if name == "tiny-random-llama":
            bf16_dir = out_dir + "-bf16"
            os.makedirs(bf16_dir, exist_ok=True)
            model.to(torch.bfloat16).save_pretrained(bf16_dir)
            with open(tok_path) as f, open(os.path.join(bf16_dir, "tokenizer.json"), "w") as g:
                g.write(f.read())
            golden(bf16_dir, tok)
            print(name + "-bf16", "written to", bf16_dir)


if __name__ == "__main__":
    main()
