"""Hugging Face Accelerate offloading baseline for the Llama family (random fp16 weights, no hub):
the anchor script ../shared/anchors/hf_accel_opt.py with LlamaForCausalLM (issue 17).

Builds LlamaForCausalLM from the published Llama config on 'meta', materialises it on the CPU
with random fp16 values, places it with accelerate.infer_auto_device_map(max_memory=...)
and accelerate.dispatch_model (layers mapped to 'cpu' are offloaded: their weights are
copied to the GPU at every forward), then times model.generate (greedy).
Per-forward times come from a logits processor that synchronises the GPU, so the first
one is the prefill (prompt) step. Usage:
  python3 hf_accel_llama.py --model llama-2-13b --batch 4 8 --prompt-len 512 --gen-len 32 \
      --gpu-mem 12GiB --cpu-mem 110GiB
"""
import argparse, time
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList
import accelerate
from accelerate import init_empty_weights, infer_auto_device_map, dispatch_model

CONFIGS = {  # hidden, layers, heads, kv heads, ffn, vocab (published config.json files)
    "llama-tiny": (64, 2, 4, 2, 160, 4096),
    "llama-2-7b": (4096, 32, 32, 32, 11008, 32000),
    "llama-2-13b": (5120, 40, 40, 40, 13824, 32000),
    "llama-3.1-8b": (4096, 32, 32, 8, 14336, 128256),
}


class StepTimer(LogitsProcessor):
    def __init__(self, sync):
        self.times, self.sync = [], sync

    def __call__(self, input_ids, scores):
        if self.sync:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores


def build(name):
    h, L, nh, nkv, ffn, vocab = CONFIGS[name]
    cfg = LlamaConfig(hidden_size=h, num_hidden_layers=L, num_attention_heads=nh,
                      num_key_value_heads=nkv, intermediate_size=ffn, vocab_size=vocab,
                      max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with init_empty_weights():
        model = LlamaForCausalLM(cfg)
    model = model.to(torch.float16).to_empty(device="cpu")
    # one random pool (std 0.02) tiled into every matrix; RMSNorm weights 1
    nmax = max(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    pool = (torch.randn(nmax, generator=g) * 0.02).to(torch.float16)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(pool[:p.numel()].view(p.shape))
            else:
                p.fill_(1.0)
        # to_empty left the rotary buffers uninitialised: recompute them
        for m in model.modules():
            if hasattr(m, "inv_freq") and hasattr(m, "compute_default_rope_parameters"):
                inv, _ = m.compute_default_rope_parameters(m.config)
                m.inv_freq.copy_(inv)
                m.original_inv_freq.copy_(inv)
                print("rotary inverse frequencies recomputed", flush=True)
    model.eval()
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-2-13b", choices=list(CONFIGS))
    ap.add_argument("--batch", type=int, nargs="+", default=[32])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--gpu-mem", default="20GiB")
    ap.add_argument("--cpu-mem", default="120GiB")
    ap.add_argument("--cpu-only", action="store_true", help="local smoke test without a GPU")
    a = ap.parse_args()
    print("torch", torch.__version__, "transformers", transformers.__version__,
          "accelerate", accelerate.__version__, flush=True)

    t0 = time.perf_counter()
    model = build(a.model)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"built {a.model}: {nbytes/1e9:.2f} GB fp16 params in {time.perf_counter()-t0:.1f} s",
          flush=True)
    if a.cpu_only:
        dev = "cpu"
    else:
        t0 = time.perf_counter()
        dmap = infer_auto_device_map(model, max_memory={0: a.gpu_mem, "cpu": a.cpu_mem},
                                     no_split_module_classes=["LlamaDecoderLayer"],
                                     dtype=torch.float16)
        on = {}
        for k, v in dmap.items():
            on.setdefault(str(v), []).append(k)
        for v, ks in on.items():
            print(f"device {v}: {len(ks)} modules, e.g. {ks[:3]} ... {ks[-2:]}")
        model = dispatch_model(model, device_map=dmap)
        dev = "cuda:0"
        gpu_w = torch.cuda.memory_allocated() / 1e9
        print(f"dispatched in {time.perf_counter()-t0:.1f} s; GPU-resident weights {gpu_w:.2f} GB, "
              f"offloaded (copied every forward) ~{nbytes/1e9 - gpu_w:.2f} GB", flush=True)

    sync = dev != "cpu"
    # warm-up: tiny prompt, one new token (one pass over all weights)
    with torch.no_grad():
        model.generate(torch.full((2, 8), 100, device=dev), attention_mask=torch.ones(2, 8, device=dev, dtype=torch.long),
                       max_new_tokens=1, do_sample=False, pad_token_id=0)
    for bs in a.batch:
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(4, model.config.vocab_size, (bs, a.prompt_len), generator=g).to(dev)
        mask = torch.ones_like(ids)
        st = StepTimer(sync)
        if sync:
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        try:
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(ids, attention_mask=mask, max_new_tokens=a.gen_len,
                                     min_new_tokens=a.gen_len, do_sample=False, pad_token_id=0,
                                     logits_processor=LogitsProcessorList([st]))
            if sync:
                torch.cuda.synchronize()
            t1 = time.perf_counter()
        except torch.OutOfMemoryError as e:
            print(f"batch {bs}: OOM: {str(e)[:200]}", flush=True)
            continue
        ntok = out.shape[1] - a.prompt_len
        total = t1 - t0
        prefill = st.times[0] - t0
        decode = t1 - st.times[0]
        peak = torch.cuda.max_memory_allocated() / (1 << 30) if sync else 0.0
        print(f"RESULT model={a.model} batch={bs} prompt={a.prompt_len} new_tokens={ntok} "
              f"gpu_mem={a.gpu_mem}: generate {total:.2f} s, total {bs*ntok/total:.2f} tok/s | "
              f"prefill step {prefill:.2f} s ({bs*a.prompt_len/prefill:.1f} prompt tok/s) | "
              f"decode {decode:.2f} s ({bs*(ntok-1)/decode:.2f} tok/s, "
              f"{decode/max(ntok-1,1):.3f} s/step) | peak GPU mem {peak:.2f} GiB", flush=True)
        del out


if __name__ == "__main__":
    main()
