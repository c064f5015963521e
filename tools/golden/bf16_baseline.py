#!/usr/bin/env python3
"""What bf16 costs transformers itself on the golden fixtures: each fixture run by transformers in
bfloat16 (bf16 weights, activations and KV, as qilin's CUDA backend computes), compared with the
float32 reference logits the fixture holds, by the measure the CUDA golden test uses (max
per-position relative L2). Runs on the GPU machine:
    python3 tools/golden/bf16_baseline.py tests/fixtures/golden
Qwen v1 fixtures are left out (not a transformers architecture)."""
import json
import os
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

root = sys.argv[1]
for name in sorted(os.listdir(root)):
    d = os.path.join(root, name)
    if not os.path.isfile(os.path.join(d, "reference.json")) or name.startswith("qwen-v1"):
        continue
    ref = json.load(open(os.path.join(d, "reference.json")))
    want = load_file(os.path.join(d, "reference.safetensors"))
    for attn in ("eager", "sdpa"):
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16,
                                                     attn_implementation=attn).cuda().eval()
        worst = 0.0
        for p, ids in enumerate(ref["prompts"]):
            with torch.no_grad():
                got = model(torch.tensor([ids], device="cuda")).logits[0].float().cpu()
            w = want[f"logits_{p}"]
            rel = ((got - w).norm(dim=-1) / w.norm(dim=-1)).max().item()
            worst = max(worst, rel)
        print(f"[transformers bf16 {attn:5}] {name:16} max relative L2 {worst:.2e}")
