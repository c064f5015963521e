#!/usr/bin/env python3
"""Makes the golden fixtures: tiny random-weight checkpoints of every architecture qilin runs,
with Hugging Face transformers' reference logits and greedy continuations.

Runs on the GPU machine (torch + transformers are there; the CPU is enough):
    python3 tools/golden/make_fixtures.py --out tests/fixtures/golden

For each fixture it writes <out>/<name>/:
    config.json          as transformers saves it (Qwen v1: written by hand, its own keys)
    model.safetensors    bf16 weights
    reference.safetensors  logits_<p> F32 [len(prompt_p), vocab]: every position of prompt p,
                           computed in float32 from the bf16 weights
    reference.json       prompts, greedy continuations with each step's top-1/top-2 margin, the
                         rotary inv_freq and attention scaling transformers used, versions

Qwen v1 (QWenLMHeadModel) is not in transformers. Two fixtures cover it:
  qwen-v1: the weights of an equivalent Qwen2 model (MHA, qkv bias, rope base 10000) written under
           Qwen v1's names and config; within its trained length its math equals Qwen2's, so the
           reference is transformers' Qwen2.
  qwen-v1-long: prompts past a short seq_length, so dynamic NTK and logn attention are active. The
           reference is a float32 transcription of modeling_qwen.py's forward in torch
           (qwen_v1_reference below), which is first checked against transformers' Qwen2 on the
           short prompts, where the two must agree.
"""
import argparse
import json
import math
import os
import sys

import torch
import transformers
from safetensors.torch import save_file

GEN_TOKENS = 12
PROMPT_LENS = [1, 6, 17, 37]


def make_prompts(vocab, seed, lens=PROMPT_LENS):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]


def rope_info(model):
    rot = model.model.rotary_emb
    return {
        "inv_freq": [float(x) for x in rot.inv_freq.float().cpu()],
        "attention_scaling": float(getattr(rot, "attention_scaling", 1.0)),
        "rope_type": str(getattr(rot, "rope_type", "default")),
    }


def reset_dynamic_rope(model):
    # transformers' dynamic rope keeps the longest length seen; each prompt starts fresh, as a new
    # request does in qilin.
    rot = model.model.rotary_emb
    if hasattr(rot, "original_inv_freq"):
        rot.inv_freq = rot.original_inv_freq.clone()
    if hasattr(rot, "original_max_seq_len"):
        rot.max_seq_len_cached = rot.original_max_seq_len


@torch.no_grad()
def hf_reference(model, prompts):
    """Logits of every prompt position, and greedy continuations with the KV cache (as
    generate() runs them), each step's top-1/top-2 margin."""
    logits_all, greedy = [], []
    for ids in prompts:
        reset_dynamic_rope(model)
        out = model(torch.tensor([ids]), use_cache=False)
        logits_all.append(out.logits[0].float().clone())
        reset_dynamic_rope(model)
        out = model(torch.tensor([ids]), use_cache=True)
        past = out.past_key_values
        last = out.logits[0, -1].float()
        toks, margins = [], []
        for _ in range(GEN_TOKENS):
            top2 = torch.topk(last, 2)
            tok = int(top2.indices[0])
            toks.append(tok)
            margins.append(float(top2.values[0] - top2.values[1]))
            out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            last = out.logits[0, -1].float()
        greedy.append({"tokens": toks, "margins": margins})
    return logits_all, greedy


def to_bf16_then_f32(model):
    """Rounds the parameters to bf16 (what is saved) and computes in float32 from them. Only
    parameters: buffers such as rotary inv_freq stay float32, as in a bf16 checkpoint loaded in
    float32."""
    bf16_state = {}
    with torch.no_grad():
        for n, p in model.named_parameters():
            b = p.detach().to(torch.bfloat16)
            bf16_state[n] = b.clone().contiguous()
            p.copy_(b.to(torch.float32))
    if "lm_head.weight" not in bf16_state and hasattr(model, "lm_head"):
        bf16_state["lm_head.weight"] = model.lm_head.weight.detach().to(torch.bfloat16).clone()
    return bf16_state


def save_fixture(out_dir, name, weights_bf16, config_dict, prompts, logits_all, greedy, extra):
    d = os.path.join(out_dir, name)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config_dict, f, indent=2, sort_keys=True)
    save_file(weights_bf16, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    save_file({f"logits_{i}": l.contiguous() for i, l in enumerate(logits_all)},
              os.path.join(d, "reference.safetensors"))
    ref = {
        "fixture": name,
        "prompts": prompts,
        "greedy": greedy,
        "gen_tokens": GEN_TOKENS,
        "reference": "transformers %s, torch %s, float32 from bf16 weights, eager attention" % (
            transformers.__version__, torch.__version__),
    }
    ref.update(extra)
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1)
    print(f"{name}: {sum(v.numel() for v in weights_bf16.values())} params, "
          f"prompts {[len(p) for p in prompts]}, greedy[0] {greedy[0]['tokens'][:6]}")


def build_hf(cls_cfg, cls_model, seed, **kw):
    torch.manual_seed(seed)
    cfg = cls_cfg(**kw)
    cfg._attn_implementation = "eager"
    model = cls_model(cfg).eval()
    # Wider random init than the default 0.02 so that the tiny models' logits are not all alike.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (1.0 / math.sqrt(p.shape[-1])))
    return cfg, model


def hf_fixture(out, name, cfg_cls, model_cls, seed, config_kwargs):
    cfg, model = build_hf(cfg_cls, model_cls, seed, **config_kwargs)
    weights = to_bf16_then_f32(model)
    if cfg.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    prompts = make_prompts(cfg.vocab_size, seed + 1)
    logits, greedy = hf_reference(model, prompts)
    config_dict = cfg.to_dict()
    config_dict["architectures"] = [model_cls.__name__]
    config_dict["dtype"] = "bfloat16"  # what model.safetensors holds
    save_fixture(out, name, weights, config_dict, prompts, logits, greedy,
                 {"rope": rope_info(model)})
    return cfg, model, weights, prompts, logits, greedy


# ---- Qwen v1 --------------------------------------------------------------------------------

def to_qwen_v1_names(w, n_layers):
    v1 = {"transformer.wte.weight": w["model.embed_tokens.weight"],
          "transformer.ln_f.weight": w["model.norm.weight"],
          "lm_head.weight": w["lm_head.weight"]}
    for i in range(n_layers):
        p, q = f"model.layers.{i}.", f"transformer.h.{i}."
        v1[q + "ln_1.weight"] = w[p + "input_layernorm.weight"]
        v1[q + "attn.c_attn.weight"] = torch.cat([w[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        v1[q + "attn.c_attn.bias"] = torch.cat([w[p + f"self_attn.{x}_proj.bias"] for x in "qkv"])
        v1[q + "attn.c_proj.weight"] = w[p + "self_attn.o_proj.weight"]
        v1[q + "ln_2.weight"] = w[p + "post_attention_layernorm.weight"]
        v1[q + "mlp.w1.weight"] = w[p + "mlp.up_proj.weight"]    # w1: up
        v1[q + "mlp.w2.weight"] = w[p + "mlp.gate_proj.weight"]  # w2: gate, silu
        v1[q + "mlp.c_proj.weight"] = w[p + "mlp.down_proj.weight"]
    return {k: v.contiguous() for k, v in v1.items()}


def qwen_v1_config(hidden, heads, inter, layers, vocab, seq_length, eps):
    return {
        "architectures": ["QWenLMHeadModel"], "model_type": "qwen",
        "hidden_size": hidden, "num_attention_heads": heads, "num_hidden_layers": layers,
        "intermediate_size": 2 * inter, "kv_channels": hidden // heads,
        "rotary_emb_base": 10000, "rotary_pct": 1.0, "layer_norm_epsilon": eps,
        "seq_length": seq_length, "max_position_embeddings": 8192, "vocab_size": vocab,
        "use_dynamic_ntk": True, "use_logn_attn": True, "no_bias": True,
        "tie_word_embeddings": False, "bf16": True, "fp16": False, "fp32": False,
        "scale_attn_weights": True, "softmax_in_fp32": False, "use_flash_attn": False,
        "torch_dtype": "bfloat16", "emb_dropout_prob": 0.0, "attn_dropout_prob": 0.0,
    }


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def qwen_v1_ntk_alpha(true_seq_len, seq_length):
    # QWenModel.get_ntk_alpha
    context_value = math.log(true_seq_len / seq_length, 2) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)


@torch.no_grad()
def qwen_v1_reference(w, c, ids, ntk_alpha):
    """Float32 transcription of modeling_qwen.py (QWenLMHeadModel) for one sequence, every
    position at once. Rotary: base * alpha^(dim/(dim-2)) (RotaryEmbedding.update_rotary_pos_emb),
    neox rotate-half; logn: query at 1-based index i > seq_length scaled by log(i)/log(seq_length),
    after rotary; MLP: w1(x) * silu(w2(x)) -> c_proj."""
    f = {k: v.float() for k, v in w.items()}
    T = len(ids)
    H, hd = c["num_attention_heads"], c["kv_channels"]
    eps = c["layer_norm_epsilon"]
    x = f["transformer.wte.weight"][torch.tensor(ids)]
    base = c["rotary_emb_base"] * ntk_alpha ** (hd / (hd - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, hd, 2).float() / hd))
    freqs = torch.outer(torch.arange(T).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
    seq_length = c["seq_length"]
    logn = torch.tensor([math.log(i, seq_length) if i > seq_length else 1.0
                         for i in range(1, T + 1)])[:, None, None]
    mask = torch.full((T, T), float("-inf")).triu(1)
    for i in range(c["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        h = rms_norm(x, f[p + "ln_1.weight"], eps)
        qkv = h @ f[p + "attn.c_attn.weight"].T + f[p + "attn.c_attn.bias"]
        q, k, v = qkv.split(H * hd, dim=-1)
        q, k, v = (t.view(T, H, hd) for t in (q, k, v))
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if c["use_logn_attn"]:
            q = q * logn
        att = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd) + mask
        att = torch.softmax(att, dim=-1)
        o = torch.einsum("hts,shd->thd", att, v).reshape(T, H * hd)
        x = x + o @ f[p + "attn.c_proj.weight"].T
        h = rms_norm(x, f[p + "ln_2.weight"], eps)
        a1 = h @ f[p + "mlp.w1.weight"].T
        a2 = h @ f[p + "mlp.w2.weight"].T
        x = x + (a1 * torch.nn.functional.silu(a2)) @ f[p + "mlp.c_proj.weight"].T
    x = rms_norm(x, f["transformer.ln_f.weight"], eps)
    return x @ f["lm_head.weight"].T


def qwen_v1_greedy(w, c, prompt):
    # Qwen v1 fixes the NTK alpha from the prompt length at prefill and keeps it for the decode
    # steps (_ntk_alpha_cached_list); keys are cached already rotated. Recomputing every position
    # with that alpha gives the same numbers as the cached decode.
    alpha = qwen_v1_ntk_alpha(len(prompt), c["seq_length"]) if c["use_dynamic_ntk"] and \
        len(prompt) > c["seq_length"] else 1.0
    ids = list(prompt)
    toks, margins = [], []
    for _ in range(GEN_TOKENS):
        last = qwen_v1_reference(w, c, ids, alpha)[-1]
        top2 = torch.topk(last, 2)
        tok = int(top2.indices[0])
        toks.append(tok)
        margins.append(float(top2.values[0] - top2.values[1]))
        ids.append(tok)
    return alpha, {"tokens": toks, "margins": margins}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/golden")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    torch.backends.cuda.matmul.allow_tf32 = False
    print("transformers", transformers.__version__, "torch", torch.__version__)
    T = transformers

    hf_fixture(args.out, "qwen2", T.Qwen2Config, T.Qwen2ForCausalLM, 11, dict(
        vocab_size=503, hidden_size=48, intermediate_size=72, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False))
    hf_fixture(args.out, "qwen2-yarn-tied", T.Qwen2Config, T.Qwen2ForCausalLM, 21, dict(
        vocab_size=419, hidden_size=40, intermediate_size=56, num_hidden_layers=2,
        num_attention_heads=5, num_key_value_heads=1, max_position_embeddings=128,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_scaling={"type": "yarn", "rope_type": "yarn", "factor": 4.0,
                      "original_max_position_embeddings": 32}))
    hf_fixture(args.out, "qwen3", T.Qwen3Config, T.Qwen3ForCausalLM, 31, dict(
        vocab_size=461, hidden_size=40, intermediate_size=60, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, head_dim=12, max_position_embeddings=256,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        attention_bias=False))
    hf_fixture(args.out, "llama-linear", T.LlamaConfig, T.LlamaForCausalLM, 41, dict(
        vocab_size=397, hidden_size=40, intermediate_size=52, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_scaling={"type": "linear", "rope_type": "linear", "factor": 2.0}))
    hf_fixture(args.out, "llama-dynamic", T.LlamaConfig, T.LlamaForCausalLM, 51, dict(
        vocab_size=389, hidden_size=32, intermediate_size=44, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=24,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_scaling={"type": "dynamic", "rope_type": "dynamic", "factor": 2.0}))

    # Qwen v1 within its trained length: transformers' Qwen2 (MHA, qkv bias, base 10000).
    hidden, heads, inter, layers, vocab = 48, 4, 64, 2, 509
    cfg, model = build_hf(T.Qwen2Config, T.Qwen2ForCausalLM, 61, vocab_size=vocab,
                          hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=heads,
                          max_position_embeddings=8192, rope_theta=10000.0, rms_norm_eps=1e-6,
                          tie_word_embeddings=False)
    w = to_bf16_then_f32(model)
    v1w = to_qwen_v1_names(w, layers)
    v1c = qwen_v1_config(hidden, heads, inter, layers, vocab, seq_length=64, eps=1e-6)
    prompts = make_prompts(vocab, 62)
    logits, greedy = hf_reference(model, prompts)
    # The transcription must agree with transformers where both apply.
    worst = 0.0
    for ids, ref in zip(prompts, logits):
        mine = qwen_v1_reference(v1w, v1c, ids, 1.0)
        worst = max(worst, float((mine - ref).norm() / ref.norm()))
    print(f"qwen_v1_reference vs transformers Qwen2 within seq_length: rel L2 {worst:.2e}")
    assert worst < 1e-5, "the Qwen v1 transcription disagrees with transformers"
    save_fixture(args.out, "qwen-v1", v1w, v1c, prompts, logits, greedy,
                 {"rope": rope_info(model), "v1_transcription_rel_l2": worst})

    # Qwen v1 past its trained length (seq_length 16): dynamic NTK and logn attention active.
    v1c_long = dict(v1c, seq_length=16)
    long_prompts = make_prompts(vocab, 63, lens=[5, 20, 33, 47])
    logits_long, greedy_long, alphas = [], [], []
    for ids in long_prompts:
        alpha, g = qwen_v1_greedy(v1w, v1c_long, ids)
        logits_long.append(qwen_v1_reference(v1w, v1c_long, ids, alpha))
        greedy_long.append(g)
        alphas.append(alpha)
    save_fixture(args.out, "qwen-v1-long", v1w, v1c_long, long_prompts, logits_long, greedy_long,
                 {"ntk_alpha": alphas,
                  "reference_kind": "float32 transcription of modeling_qwen.py "
                                    "(tools/golden/make_fixtures.py: qwen_v1_reference)"})


if __name__ == "__main__":
    sys.exit(main())
