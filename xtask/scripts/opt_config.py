#!/usr/bin/env python3
"""Writes an OPT-family config.json of the given shape, which `flexgen-run --model DIR --dummy`
takes alone (no weights, no tokenizer): the GPU scripts' stand-in models.

Usage: opt_config.py DIR HIDDEN FFN HEADS LAYERS VOCAB POSITIONS
"""
import json
import os
import sys

if len(sys.argv) != 8:
    sys.exit(__doc__.strip())
out, hidden, ffn, heads, layers, vocab, positions = sys.argv[1], *map(int, sys.argv[2:])
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "config.json"), "w") as f:
    json.dump({"architectures": ["OPTForCausalLM"], "model_type": "opt",
               "hidden_size": hidden, "ffn_dim": ffn, "num_attention_heads": heads,
               "num_hidden_layers": layers, "vocab_size": vocab,
               "max_position_embeddings": positions, "word_embed_proj_dim": hidden,
               "do_layer_norm_before": True, "activation_function": "relu", "enable_bias": True,
               "torch_dtype": "float16", "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2},
              f)
