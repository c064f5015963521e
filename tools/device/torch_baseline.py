"""Plain PyTorch / transformers baseline for bench/cuda_decode.cc on the same shape: Qwen2ForCausalLM
built from config.json with random bf16 weights on the GPU (no checkpoint), batch-1 greedy decode
with the HF KV cache (eager, no graphs) and one 4096-token prefill; with --batched, generate() on 64
prompts of 128 tokens, 256 new tokens each. Usage: torch_baseline.py CONFIG_DIR [--batched]"""
import json
import sys
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

cfg = json.load(open(sys.argv[1] + "/config.json"))
config = Qwen2Config(**cfg)
config._attn_implementation = "sdpa"
torch.set_default_dtype(torch.bfloat16)
with torch.device("cuda"):
    model = Qwen2ForCausalLM(config).eval()
dev = "cuda"


@torch.no_grad()
def decode(steps):
    ids = torch.randint(0, config.vocab_size, (1, 128), device=dev)
    out = model(ids, use_cache=True)
    past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    for _ in range(8):
        out = model(tok, past_key_values=past, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        out = model(tok, past_key_values=past, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    return steps / (time.perf_counter() - t)


@torch.no_grad()
def prefill():
    ids = torch.randint(0, config.vocab_size, (1, 4096), device=dev)
    ts = []
    for _ in range(3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model(ids, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[1]


@torch.no_grad()
def batched(batch=64, prompt=128, new=256):
    ids = torch.randint(0, config.vocab_size, (batch, prompt), device=dev)
    mask = torch.ones_like(ids)
    model.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                         do_sample=False)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    made = (out.shape[1] - prompt) * batch
    print(f"torch generate() batch {batch}, {prompt} in / {new} out: {made / dt:.0f} output tok/s "
          f"({dt:.1f} s)")


if "--batched" in sys.argv:
    batched()
    sys.exit(0)
tps = decode(128)
pf = prefill()
print(f"torch {torch.__version__} transformers eager sdpa, bf16, {torch.cuda.get_device_name()}")
print(f"torch batch-1 decode (128-token context): {tps:.1f} tok/s")
print(f"torch prefill 4096 tokens: {pf * 1e3:.1f} ms ({4096 / pf:.0f} tok/s)")
