#!/usr/bin/env python3
"""Trains qilin's bundled demo model: a small Qwen2ForCausalLM with the real Qwen tokenizer, on
Jane Austen's novels (tools/train-demo/prepare_corpus.py), in one GPU run of a few minutes.

    python3 tools/train-demo/train.py --data .dev/train --tokenizer .dev/train --out /tmp/demo \
        --minutes 5

Writes a Hugging Face checkpoint (config.json, model.safetensors in bf16, generation_config.json)
and train_report.json: steps, tokens, held-out perplexity of the saved bf16 weights computed by
transformers in float32 with the same sliding windows as `qilin perplexity`, and a unigram
baseline. The width is set by the size budget: Qwen's 151,936-row embedding at hidden 64 is
19.4 MB in bf16, leaving the repo's 30 MB for the layers and the tokenizer files.
"""
import argparse
import json
import math
import os
import time

import torch
import transformers
from tokenizers import Tokenizer

CONTEXT = 512


def model_config(vocab_size):
    return transformers.Qwen2Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        bos_token_id=151643, eos_token_id=151643, use_sliding_window=False)


def encode_file(tok, path):
    return tok.encode(open(path, encoding="utf-8").read()).ids


def windows(n, context):
    """Sliding windows with stride context/2; each window scores the positions not scored
    before. Yields (begin, end, first_scored). Every position 1..n-1 is scored exactly once."""
    stride = context // 2
    begin, done = 0, 1
    while done < n:
        end = min(begin + context, n)
        yield begin, end, done
        done = end
        begin += stride


@torch.no_grad()
def perplexity(model, ids, context, device):
    model.eval()
    nll, count = 0.0, 0
    for b, e, first in windows(len(ids), context):
        x = torch.tensor([ids[b:e]], device=device)
        logits = model(x).logits[0].float()
        logp = torch.log_softmax(logits[:-1], dim=-1)
        targets = x[0, 1:]
        lp = logp.gather(1, targets[:, None])[:, 0]
        # position p (absolute) is predicted by row p-1-b
        sel = lp[first - 1 - b:]
        nll -= float(sel.double().sum())
        count += sel.numel()
    return math.exp(nll / count), count


def unigram_ppl(train_ids, held_ids, vocab):
    counts = torch.bincount(torch.tensor(train_ids), minlength=vocab).double() + 1.0
    logp = torch.log(counts / counts.sum())
    lp = logp[torch.tensor(held_ids[1:])]
    return math.exp(-float(lp.mean()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--patience", type=int, default=600, help="steps without held-out gain")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    device = "cuda"
    t0 = time.time()
    tok = Tokenizer.from_file(os.path.join(args.tokenizer, "tokenizer.json"))
    train_ids = encode_file(tok, os.path.join(args.data, "train.txt"))
    held_ids = encode_file(tok, os.path.join(args.data, "heldout.txt"))
    print(f"tokens: train {len(train_ids)}, heldout {len(held_ids)} ({time.time()-t0:.1f}s)",
          flush=True)

    cfg = model_config(151936)
    model = transformers.Qwen2ForCausalLM(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget = args.minutes * 60
    warmup = 200
    step, best, best_step, best_state, tokens_seen = 0, float("inf"), 0, None, 0
    start = time.time()
    # Model selection on a validation slice cut from the end of the training text, so the
    # reported held-out perplexity is of text never used for any choice.
    val_ids = train_ids[-16384:]
    train_ids = train_ids[:-16384]
    data = torch.tensor(train_ids, device=device)
    while True:
        elapsed = time.time() - start
        if elapsed > budget:
            break
        frac = elapsed / budget
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(train_ids) - CONTEXT - 1, (args.batch,), device=device)
        idx = starts[:, None] + torch.arange(CONTEXT + 1, device=device)[None, :]
        chunk = data[idx]
        model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(chunk[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                 chunk[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += args.batch * CONTEXT
        if step % 100 == 0:
            ppl, _ = perplexity(model, val_ids, CONTEXT, device)
            print(f"step {step} loss {loss.item():.3f} lr {lr:.2e} val ppl {ppl:.2f} "
                  f"({time.time()-start:.0f}s)", flush=True)
            if ppl < best:
                best, best_step = ppl, step
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            elif step - best_step >= args.patience:
                print(f"held-out perplexity has not improved for {args.patience} steps: stop")
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    train_seconds = time.time() - start

    # Save in bf16, then measure the saved weights in float32 (what qilin's CPU backend runs).
    model = model.to(torch.bfloat16)
    model.config.architectures = ["Qwen2ForCausalLM"]
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    gen = {"bos_token_id": 151643, "eos_token_id": [151643], "pad_token_id": 151643,
           "do_sample": False, "max_new_tokens": 128}
    json.dump(gen, open(os.path.join(args.out, "generation_config.json"), "w"), indent=2)
    ref = transformers.Qwen2ForCausalLM.from_pretrained(args.out, dtype=torch.float32,
                                                        attn_implementation="eager").to(device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ppl_gpu, n_scored = perplexity(ref, held_ids, CONTEXT, device)
    ref_cpu = ref.to("cpu")
    ppl_cpu, _ = perplexity(ref_cpu, held_ids, CONTEXT, "cpu")
    uni = unigram_ppl(train_ids, held_ids, 151936)
    report = {
        "parameters": n_params, "steps": step, "batch": args.batch, "context": CONTEXT,
        "train_tokens": len(train_ids), "tokens_seen": tokens_seen,
        "train_seconds": round(train_seconds, 1), "heldout_tokens": len(held_ids),
        "heldout_scored": n_scored,
        "heldout_ppl_transformers_fp32_cpu": ppl_cpu,
        "heldout_ppl_transformers_fp32_gpu": ppl_gpu,
        "unigram_ppl": uni, "best_val_ppl": best, "best_step": best_step,
        "transformers": transformers.__version__, "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0),
    }
    json.dump(report, open(os.path.join(args.out, "train_report.json"), "w"), indent=2)
    print(json.dumps(report, indent=2))
    # A greedy sample so a person can judge it.
    prompt = "It is a truth universally acknowledged, that"
    x = torch.tensor([tok.encode(prompt).ids])
    out = ref_cpu.generate(x, max_new_tokens=60, do_sample=False)
    print("sample:", tok.decode(out[0].tolist()))


if __name__ == "__main__":
    main()
